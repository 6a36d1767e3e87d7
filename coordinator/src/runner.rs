//! Executes one run: stages in order, the faults of a stage in parallel, each fault applied by
//! its agent, held for its duration (the hub renews its lease meanwhile) and reverted. Every step
//! is recorded as a run event, stored and broadcast to watchers.
//!
//! The run task never owns a fault's safety: if it dies, the coordinator dies or a halt cancels
//! it, the agents' leases and the halt path revert what was applied.
//!
//! A stage with `when` waits, after its delay, until its condition holds on the probe's
//! samples (`stage-waiting`, then `stage-triggered` with the figure seen); a halt or a stop
//! condition ends the wait, and so does its timeout, which aborts the run (the stages before
//! it have already reverted their faults). A plan's `load` runs from the start of the
//! baseline to the end of the recovery check (`load-started`, `load-finished` with figures
//! per phase).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use faultline_domain::duration::format_duration;
use std::sync::Mutex;

use faultline_domain::plan::{
    ConditionCheck, Plan, PlannedFault, Stage, StageTrigger, SteadyState, StopCondition,
    TriggerCondition, VerdictInputs, check_condition, check_telemetry, judge_hypothesis,
    run_verdict, stop_condition_fired, telemetry_stop_fired,
};
use faultline_domain::probe::{ProbeStats, Window, summarize};
use faultline_proto::v1 as pb;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::clock::now_ms;
use crate::halt::{RunRevert, revert_run};
use crate::hub::{AgentReport, HubHandle};
use crate::load::{LoadGenerator, causes, load_stats};
use crate::steady::ProbeSession;
use crate::store::{RunEventRecord, RunState, Store, StoreError};
use crate::telemetry::LiveTelemetry;
use crate::wire::fault_to_wire;

/// How long an agent has to answer an apply.
const APPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Slack after a fault's duration for the agent's scheduled revert to be reported.
const REVERT_GRACE: Duration = Duration::from_secs(10);
/// How often the stop conditions are evaluated during the stages.
const STOP_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often a stage's `when` condition is evaluated while it waits.
const TRIGGER_CHECK_EVERY: Duration = Duration::from_millis(250);

/// A stored run event, broadcast to watchers.
#[derive(Debug, Clone)]
pub struct PublishedEvent {
    pub run_id: String,
    pub event: RunEventRecord,
    /// Set on a run's last event.
    pub final_state: Option<RunState>,
}

/// Stores run events and fans them out to `WatchRun` streams.
#[derive(Debug, Clone)]
pub struct RunEvents {
    store: Store,
    tx: broadcast::Sender<PublishedEvent>,
}

impl RunEvents {
    pub fn new(store: Store) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { store, tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PublishedEvent> {
        self.tx.subscribe()
    }

    /// Stores the event first (the timeline survives a crash), then publishes it.
    pub async fn emit(
        &self,
        run_id: &str,
        event: RunEventRecord,
        final_state: Option<RunState>,
    ) -> Result<(), StoreError> {
        let event = self.store.append_event(run_id, event).await?;
        tracing::info!(run = run_id, kind = %event.kind, stage = %event.stage,
            agent = %event.agent, "{}", event.message);
        let _ = self.tx.send(PublishedEvent {
            run_id: run_id.to_string(),
            event,
            final_state,
        });
        Ok(())
    }
}

/// Everything a run task needs.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub hub: HubHandle,
    pub store: Store,
    pub events: RunEvents,
    /// The run's recent telemetry, for telemetry conditions and span events.
    pub live: LiveTelemetry,
}

/// How one fault of a stage ended.
#[derive(Debug)]
enum FaultOutcome {
    Done,
    Failed(String),
    Cancelled,
}

fn event(kind: &str, stage: &str, agent: &str, fault_id: &str, message: String) -> RunEventRecord {
    RunEventRecord {
        seq: 0,
        at_ms: now_ms(),
        kind: kind.into(),
        stage: stage.into(),
        agent: agent.into(),
        fault_id: fault_id.into(),
        message,
    }
}

/// Runs `plan` to its end and records the final state. `cancel` carries a halt's reason.
pub async fn execute(
    ctx: RunContext,
    run_id: String,
    plan: Plan,
    mut cancel: watch::Receiver<Option<String>>,
) {
    ctx.live.watch(&run_id);
    let telemetry = crate::telemetry::TelemetrySubscription::start(&ctx.hub, &run_id, &plan).await;
    let run_span = tracing::info_span!(
        target: crate::observability::OTEL_TARGET,
        "faultline.run",
        faultline.run.id = %run_id,
        faultline.plan.title = %plan.title,
        faultline.plan.stages = plan.stages.len() as u64,
        faultline.plan.faults = plan.total_faults() as u64,
        faultline.run.state = tracing::field::Empty,
        faultline.run.reason = tracing::field::Empty,
        faultline.run.verdict = tracing::field::Empty,
    );
    let active_run = crate::metrics::ActiveRun::new();
    let mut judged = VerdictInputs::default();
    let driven = drive(&ctx, &run_id, &plan, &mut cancel, &mut judged)
        .instrument(run_span.clone())
        .await;
    let (state, reason) = match driven {
        Ok((state, reason)) => (state, reason),
        Err(err) => (RunState::Failed, format!("coordinator store failed: {err}")),
    };
    judged.completed = state == RunState::Completed;
    // The report judges the same way from the stored run (its tolerances over the faults'
    // confirmed window rather than the stages' window): the report is the reference.
    run_span.record("faultline.run.verdict", run_verdict(judged));
    run_span.record("faultline.run.state", state.as_str());
    run_span.record("faultline.run.reason", reason.as_str());
    if state == RunState::Halted {
        run_span.in_scope(|| {
            tracing::info!(
                target: crate::observability::OTEL_TARGET,
                reason = reason.as_str(),
                "faultline.halt"
            );
        });
    }
    drop(run_span);
    drop(active_run);
    crate::metrics::REGISTRY.add("faultline_runs_total", &[state.as_str()], 1.0);
    telemetry.stop(&ctx.hub).await;
    ctx.live.forget(&run_id);
    // Release the run's target locks first, so that whoever sees the run end may start the
    // next run on the same targets at once: its faults are reverted (or left to their leases).
    ctx.hub.unregister_run(&run_id).await;
    let message = if reason.is_empty() {
        format!("run {}", state.as_str())
    } else {
        format!("run {}: {reason}", state.as_str())
    };
    let last = event("run-finished", "", "", "", message);
    if let Err(err) = ctx.events.emit(&run_id, last, Some(state)).await {
        tracing::error!(run = %run_id, %err, "could not record the end of the run");
    }
    if let Err(err) = ctx
        .store
        .finish_run(&run_id, state, &reason, now_ms())
        .await
    {
        tracing::error!(run = %run_id, %err, "could not record the run's final state");
    }
}

async fn drive(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    cancel: &mut watch::Receiver<Option<String>>,
    judged: &mut VerdictInputs,
) -> Result<(RunState, String), StoreError> {
    let summary = format!(
        "{} stage(s), {} fault(s): {}",
        plan.stages.len(),
        plan.total_faults(),
        plan.title
    );
    ctx.events
        .emit(run_id, event("run-started", "", "", "", summary), None)
        .await?;

    let connected: Vec<String> = ctx
        .hub
        .sessions()
        .await
        .into_iter()
        .map(|s| s.name)
        .collect();
    let missing: Vec<&str> = plan
        .agents()
        .into_iter()
        .filter(|a| !connected.iter().any(|c| c == a))
        .collect();
    if !missing.is_empty() {
        let reason = format!(
            "agent(s) not connected: {}; nothing was applied",
            missing.join(", ")
        );
        return Ok((RunState::Failed, reason));
    }

    let Some(steady) = &plan.steady_state else {
        let load = match start_load(ctx, run_id, plan).await? {
            Ok(load) => load,
            Err(reason) => return Ok((RunState::Failed, reason)),
        };
        let started = now_ms();
        let result = watched_stages(ctx, run_id, plan, None, cancel, judged).await;
        let phases = Phases {
            faults: Some(Window::new(started, now_ms() + 1)),
            ..Phases::default()
        };
        finish_load(ctx, run_id, load, &phases).await;
        return result;
    };
    let probes = match ProbeSession::start(steady, ctx.hub.clone(), ctx.store.clone(), run_id) {
        Ok(probes) => probes,
        Err(err) => {
            let reason = format!("could not start the probes: {err}; nothing was applied");
            return Ok((RunState::Failed, reason));
        }
    };
    let load = match start_load(ctx, run_id, plan).await {
        Ok(Ok(load)) => load,
        Ok(Err(reason)) => {
            probes.stop().await;
            return Ok((RunState::Failed, reason));
        }
        Err(err) => {
            probes.stop().await;
            return Err(err);
        }
    };
    let mut phases = Phases::default();
    phases.verdict.has_steady_state = true;
    let result = drive_with_probes(ctx, run_id, plan, steady, &probes, cancel, &mut phases).await;
    *judged = phases.verdict;
    probes.stop().await;
    finish_load(ctx, run_id, load, &phases).await;
    result
}

/// When the baseline, the stages and the recovery check ran, for the load's figures, and
/// what the run's verdict is judged on.
#[derive(Debug, Default)]
struct Phases {
    baseline: Option<Window>,
    faults: Option<Window>,
    recovery: Option<Window>,
    verdict: VerdictInputs,
}

/// Starts the plan's load, if it has one: `Ok(Err(reason))` when it cannot start.
async fn start_load(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
) -> Result<Result<Option<LoadGenerator>, String>, StoreError> {
    let Some(spec) = &plan.load else {
        return Ok(Ok(None));
    };
    match LoadGenerator::start(spec) {
        Ok(load) => {
            let message = format!(
                "{} {} at {} (open loop, at most {} in flight, timeout {})",
                spec.method,
                spec.url,
                spec.rate,
                spec.max_in_flight,
                format_duration(spec.timeout)
            );
            ctx.events
                .emit(run_id, event("load-started", "", "", "", message), None)
                .await?;
            Ok(Ok(Some(load)))
        }
        Err(err) => Ok(Err(format!(
            "could not start the load generator: {err}; nothing was applied"
        ))),
    }
}

/// Stops the load and records its figures, in total and per phase.
async fn finish_load(ctx: &RunContext, run_id: &str, load: Option<LoadGenerator>, phases: &Phases) {
    let Some(load) = load else {
        return;
    };
    let records = load.stop().await;
    let mut message = load_stats(&records, None).describe();
    for (name, window) in [
        ("baseline", phases.baseline),
        ("faults", phases.faults),
        ("recovery", phases.recovery),
    ] {
        if let Some(window) = window {
            message.push_str(&format!(
                "; {name}: {}",
                load_stats(&records, Some(window)).describe()
            ));
        }
    }
    let causes = causes(&records);
    if !causes.is_empty() {
        let listed: Vec<String> = causes
            .iter()
            .take(5)
            .map(|(cause, count)| format!("{cause} x{count}"))
            .collect();
        message.push_str(&format!("; errors: {}", listed.join(", ")));
    }
    let finished = event("load-finished", "", "", "", message);
    if let Err(err) = ctx.events.emit(run_id, finished, None).await {
        tracing::error!(run = %run_id, %err, "could not record the load's figures");
    }
}

/// The run of a plan with `steady_state`: baseline check, stages watched by the stop
/// conditions, recovery check.
async fn drive_with_probes(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    steady: &SteadyState,
    probes: &ProbeSession,
    cancel: &mut watch::Receiver<Option<String>>,
    phases: &mut Phases,
) -> Result<(RunState, String), StoreError> {
    let started = now_ms();
    let check_span = tracing::info_span!(
        target: crate::observability::OTEL_TARGET,
        "faultline.steady_state.check",
        faultline.phase = "baseline",
        faultline.steady = tracing::field::Empty,
    );
    if let Some(reason) = sleep_or_cancel(steady.baseline, cancel)
        .instrument(check_span.clone())
        .await
    {
        return Ok((RunState::Halted, reason));
    }
    phases.baseline = Some(Window::new(started, now_ms() + 1));
    let check = check_span.in_scope(|| probes.check(steady, Window::new(started, now_ms() + 1)));
    check_span.record("faultline.steady", check.steady);
    drop(check_span);
    let message = format!(
        "baseline {} ({}): {}",
        format_duration(steady.baseline),
        if check.steady { "steady" } else { "not steady" },
        check.summary
    );
    ctx.events
        .emit(
            run_id,
            event("steady-state-check", "", "", "", message),
            None,
        )
        .await?;
    if !check.steady {
        let reason = format!(
            "not steady before injection: {}; nothing was applied",
            check.reasons.join("; ")
        );
        return Ok((RunState::Aborted, reason));
    }

    let stages_started = now_ms();
    let judged = &mut phases.verdict;
    let outcome = watched_stages(ctx, run_id, plan, Some(probes), cancel, judged).await?;
    let faults_window = Window::new(stages_started, now_ms() + 1);
    phases.faults = Some(faults_window);
    let during: BTreeMap<String, ProbeStats> = steady
        .probes
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                summarize(&probes.samples(&p.name), faults_window),
            )
        })
        .collect();
    judged.tolerance_broken = judge_hypothesis(&plan.tolerances, &during)
        .iter()
        .any(|result| !result.held);
    if outcome.0 != RunState::Completed {
        return Ok(outcome);
    }

    let recovery_start = now_ms();
    let check_span = tracing::info_span!(
        target: crate::observability::OTEL_TARGET,
        "faultline.steady_state.check",
        faultline.phase = "recovery",
        faultline.steady = tracing::field::Empty,
    );
    if let Some(reason) = sleep_or_cancel(steady.baseline, cancel)
        .instrument(check_span.clone())
        .await
    {
        return Ok((RunState::Halted, reason));
    }
    phases.recovery = Some(Window::new(recovery_start, now_ms() + 1));
    let check =
        check_span.in_scope(|| probes.check(steady, Window::new(recovery_start, now_ms() + 1)));
    check_span.record("faultline.steady", check.steady);
    drop(check_span);
    phases.verdict.recovered = Some(check.steady);
    let message = format!(
        "after {} ({}): {}",
        format_duration(steady.baseline),
        if check.steady { "steady" } else { "not steady" },
        check.summary
    );
    ctx.events
        .emit(run_id, event("recovery-check", "", "", "", message), None)
        .await?;
    Ok(outcome)
}

/// The stages, watched by the stop conditions (on the probes, when there are any, and on the
/// run's telemetry). A stop condition that fires stops the stages, reverts the run's faults and
/// makes the run aborted.
async fn watched_stages(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    probes: Option<&ProbeSession>,
    cancel: &mut watch::Receiver<Option<String>>,
    judged: &mut VerdictInputs,
) -> Result<(RunState, String), StoreError> {
    // The stages see a switch of their own, flipped by a halt (forwarded) or a stop condition.
    let (stop_tx, mut stop_rx) = watch::channel(None::<String>);
    let fired: Mutex<Option<(&'static str, String, JoinHandle<RunRevert>)>> = Mutex::new(None);
    let outcome = {
        let stages = run_stages(ctx, run_id, plan, probes, &mut stop_rx);
        let monitor = watch_stop_conditions(ctx, run_id, plan, probes, cancel, &stop_tx, &fired);
        tokio::select! {
            biased;
            outcome = stages => outcome?,
            () = monitor => (RunState::Failed, "internal error: stop-condition monitor ended".into()),
        }
    };
    // Kernel evidence of the last moments of the stages still belongs in the trace.
    emit_notable(ctx, run_id).await;
    let fired = fired
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((kind, reason, revert)) = fired {
        judged.stop_condition_fired = kind == "stop-condition";
        let reverted = revert.await.unwrap_or_default();
        let unconfirmed = if reverted.unconfirmed.is_empty() {
            String::new()
        } else {
            format!("; unconfirmed: {}", reverted.unconfirmed.join("; "))
        };
        let reason = format!(
            "{reason}; {} fault(s) of the run reverted{unconfirmed}",
            reverted.faults_reverted
        );
        return Ok((RunState::Aborted, reason));
    }
    Ok(outcome)
}

/// Records the run's notable kernel events seen since the last call (the first connect
/// failure, OOM kills): a span event on the current span (the run's) and a `telemetry-event`
/// in the timeline.
async fn emit_notable(ctx: &RunContext, run_id: &str) {
    for notable in ctx.live.take_notable(run_id) {
        let message = notable.describe();
        let e = &notable.event;
        match notable.name() {
            "faultline.telemetry.oom_kill" => tracing::event!(
                target: crate::observability::OTEL_TARGET,
                tracing::Level::INFO,
                faultline.agent = notable.agent.as_str(),
                faultline.target = e.target.as_str(),
                process.pid = i64::from(e.pid),
                process.command = e.comm.as_str(),
                "faultline.telemetry.oom_kill"
            ),
            _ => tracing::event!(
                target: crate::observability::OTEL_TARGET,
                tracing::Level::INFO,
                faultline.agent = notable.agent.as_str(),
                faultline.target = e.target.as_str(),
                faultline.telemetry.errno = faultline_domain::plan::errno_name(e.errno).as_str(),
                process.pid = i64::from(e.pid),
                process.command = e.comm.as_str(),
                server.address = e.remote.as_str(),
                "faultline.telemetry.first_connect_failure"
            ),
        }
        let record = event("telemetry-event", "", &notable.agent, "", message);
        if let Err(err) = ctx.events.emit(run_id, record, None).await {
            tracing::error!(run = %run_id, %err, "could not record a telemetry event");
        }
    }
}

/// Forwards a halt from `cancel` to `stop`, and every [`STOP_CHECK_EVERY`] evaluates the plan's
/// stop conditions: the first that fires is recorded, flips `stop` and starts reverting the
/// run's faults (in a task of its own, so that it finishes even when this future is dropped).
/// Also records the notable kernel events as they arrive. Never returns.
async fn watch_stop_conditions(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    probes: Option<&ProbeSession>,
    cancel: &mut watch::Receiver<Option<String>>,
    stop: &watch::Sender<Option<String>>,
    fired: &Mutex<Option<(&'static str, String, JoinHandle<RunRevert>)>>,
) {
    if let Some(reason) = cancel.borrow().clone() {
        stop.send_replace(Some(reason));
    }
    let mut ticker = tokio::time::interval(STOP_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancellable = true;
    let mut watching = !plan.stop_conditions.is_empty();
    // Contact with the run's agents is watched whether or not the plan has stop conditions.
    let mut watching_agents = true;
    let agents: Vec<&str> = plan.agents().into_iter().collect();
    loop {
        tokio::select! {
            changed = cancel.changed(), if cancellable => {
                if changed.is_err() {
                    cancellable = false;
                } else if let Some(reason) = cancel.borrow().clone() {
                    stop.send_replace(Some(reason));
                    watching = false;
                    watching_agents = false;
                }
            }
            _ = ticker.tick() => {
                emit_notable(ctx, run_id).await;
                if !watching && !watching_agents {
                    continue;
                }
                let now = now_ms();
                let on_telemetry = plan
                    .stop_conditions
                    .iter()
                    .any(|c| matches!(c, StopCondition::Telemetry(_)));
                let points = if on_telemetry {
                    ctx.live.points(run_id)
                } else {
                    Vec::new()
                };
                let hit = plan.stop_conditions.iter().filter(|_| watching).find_map(|condition| match condition {
                    // Plans are validated: a probe condition implies steady_state's probes.
                    StopCondition::Probe(condition) => probes.and_then(|probes| {
                        stop_condition_fired(&probes.samples(&condition.probe), condition, now)
                    }),
                    StopCondition::Telemetry(condition) => {
                        telemetry_stop_fired(&points, condition, now)
                    }
                });
                let hit = match hit {
                    Some(reason) => Some(("stop-condition", "stop condition", reason)),
                    None if watching_agents => lost_agent(ctx, &agents, plan.lease)
                        .await
                        .map(|reason| ("agent-lost", "agent lost", reason)),
                    None => None,
                };
                let Some((kind, why, reason)) = hit else { continue };
                watching = false;
                watching_agents = false;
                // The stages stop first, so that no fault counts a revert as its normal end.
                stop.send_replace(Some(reason.clone()));
                let hub = ctx.hub.clone();
                let run = run_id.to_string();
                let revert = tokio::spawn(async move { revert_run(&hub, &run, why).await });
                *fired.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((kind, reason.clone(), revert));
                let message = format!("{reason}; reverting the run's faults");
                if let Err(err) = ctx
                    .events
                    .emit(run_id, event(kind, "", "", "", message), None)
                    .await
                {
                    tracing::error!(run = %run_id, %err, "could not record the stop condition");
                }
            }
            else => std::future::pending::<()>().await,
        }
    }
}

/// The first of the run's `agents` that is no longer connected, as the reason to abort: the
/// stages cannot be driven without it, and the faults it holds are reverted by the agent
/// itself once their lease runs out (nobody renews them any more).
async fn lost_agent(ctx: &RunContext, agents: &[&str], lease: Duration) -> Option<String> {
    let connected = ctx.hub.sessions().await;
    let lost = agents
        .iter()
        .find(|agent| !connected.iter().any(|session| session.name == **agent))?;
    Some(format!(
        "agent {lost} lost contact with the coordinator; the faults it holds revert on the \
         agent when their lease ({}) runs out",
        format_duration(lease)
    ))
}

/// Records reverts reported after their run ended — an agent that lost contact reverting by
/// lease, a restarted agent reverting from its journal, a revert after a coordinator restart —
/// in that run's timeline, so that the run shows its faults did end. Runs until the hub goes.
pub async fn record_late_reverts(hub: HubHandle, store: Store, events: RunEvents) {
    let mut reports = hub.subscribe_reports();
    loop {
        let report = match reports.recv().await {
            Ok(report) => report,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "late-revert recorder lagged behind the agents' reports"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let kind = match kind_of(&report.report) {
            pb::ReportKind::Reverted => "fault-reverted",
            pb::ReportKind::RevertFailed => "fault-revert-failed",
            _ => continue,
        };
        let r = &report.report;
        if r.run_id.is_empty() {
            continue;
        }
        // A running run records its own reports (its faults wait for them).
        match store.run_record(&r.run_id).await {
            Ok(Some(run)) if run.state != RunState::Running.as_str() => {}
            _ => continue,
        }
        // Fault ids are RUN/STAGE/INDEX.
        let stage = r.fault_id.split('/').nth(1).unwrap_or_default();
        let message = if kind == "fault-reverted" {
            format!(
                "reverted after the run ended ({}): {}",
                r.revert_reason, r.detail
            )
        } else {
            format!("revert failed after the run ended: {}", r.detail)
        };
        let record = event(kind, stage, &report.agent, &r.fault_id, message);
        if let Err(err) = events.emit(&r.run_id, record, None).await {
            tracing::error!(run = %r.run_id, %err, "could not record a late revert");
        }
    }
}

/// A fault of a stage in flight: `(stage index, fault index, outcome)` once it ends.
type FaultFuture<'a> = Pin<Box<dyn Future<Output = FaultDone> + Send + 'a>>;
type FaultDone = (usize, usize, Result<FaultOutcome, StoreError>);

/// What the stages have seen end so far.
#[derive(Default)]
struct StageLedger {
    /// Faults of each stage not ended yet.
    remaining: Vec<usize>,
    /// Fault indices of each stage that ended.
    ended: Vec<std::collections::BTreeSet<usize>>,
    failures: Vec<String>,
    cancelled: bool,
}

impl StageLedger {
    fn stopped(&self) -> bool {
        self.cancelled || !self.failures.is_empty()
    }
}

/// The stages in order, each fault applied, held and reverted; ends at the first failure or
/// when `cancel` is flipped. A stage normally starts once the previous stage's faults are
/// reverted; an `overlap` stage starts (after its delay and trigger) once they are applied,
/// while they are still in force, so faults on several hosts can pile up as in a real cascade.
/// Faults of earlier stages keep being followed meanwhile.
async fn run_stages(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    probes: Option<&ProbeSession>,
    cancel: &mut watch::Receiver<Option<String>>,
) -> Result<(RunState, String), StoreError> {
    let mut in_flight: FuturesUnordered<FaultFuture<'_>> = FuturesUnordered::new();
    let mut ledger = StageLedger {
        remaining: plan.stages.iter().map(|stage| stage.faults.len()).collect(),
        ended: vec![Default::default(); plan.stages.len()],
        ..Default::default()
    };
    for (stage_index, stage) in plan.stages.iter().enumerate() {
        if !stage.overlap {
            while let Some(done) = in_flight.next().await {
                settle(ctx, run_id, plan, &mut ledger, done).await?;
            }
        }
        if let Some(ended) = stopped(&ledger, cancel) {
            drain(ctx, run_id, plan, &mut ledger, &mut in_flight).await?;
            return Ok(ended);
        }
        if !stage.after.is_zero() {
            let message = format!("waiting {} before the stage", format_duration(stage.after));
            ctx.events
                .emit(
                    run_id,
                    event("stage-waiting", &stage.name, "", "", message),
                    None,
                )
                .await?;
            let slept = following(
                ctx,
                run_id,
                plan,
                &mut ledger,
                &mut in_flight,
                sleep_or_cancel(stage.after, &mut cancel.clone()),
            )
            .await?;
            if let Some(Some(reason)) = slept {
                drain(ctx, run_id, plan, &mut ledger, &mut in_flight).await?;
                return Ok((RunState::Halted, reason));
            }
        }
        if let Some(trigger) = &stage.when {
            let mut trigger_cancel = cancel.clone();
            let waited = following(
                ctx,
                run_id,
                plan,
                &mut ledger,
                &mut in_flight,
                await_trigger(ctx, run_id, stage, trigger, probes, &mut trigger_cancel),
            )
            .await?;
            if let Some(Some(ended)) = waited.transpose()? {
                drain(ctx, run_id, plan, &mut ledger, &mut in_flight).await?;
                return Ok(ended);
            }
        }
        if let Some(ended) = stopped(&ledger, cancel) {
            drain(ctx, run_id, plan, &mut ledger, &mut in_flight).await?;
            return Ok(ended);
        }
        let message = format!(
            "stage {} of {}: {} fault(s){}",
            stage_index + 1,
            plan.stages.len(),
            stage.faults.len(),
            if stage.overlap {
                "; the previous stage's faults are still in force"
            } else {
                ""
            }
        );
        ctx.events
            .emit(
                run_id,
                event("stage-started", &stage.name, "", "", message),
                None,
            )
            .await?;

        let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<usize>();
        // Lives as long as its faults' spans (their parent), so it covers the stage.
        let stage_span = tracing::info_span!(
            target: crate::observability::OTEL_TARGET,
            "faultline.stage",
            faultline.run.id = %run_id,
            faultline.stage.name = %stage.name,
            faultline.stage.index = stage_index as u64,
            faultline.stage.overlap = stage.overlap,
        );
        for (index, fault) in stage.faults.iter().enumerate() {
            let job = FaultJob {
                stage: &stage.name,
                index,
                planned: fault,
                lease: plan.lease,
            };
            let fault_span = tracing::info_span!(
                target: crate::observability::OTEL_TARGET,
                parent: &stage_span,
                "faultline.fault",
                faultline.run.id = %run_id,
                faultline.fault.id = %format!("{run_id}/{}/{index}", stage.name),
                faultline.fault.kind = fault.spec.kind.name(),
                faultline.agent = %fault.agent,
                faultline.target = %fault.spec.target,
                faultline.fault.duration_ms = fault.spec.duration.as_millis() as u64,
                faultline.fault.outcome = tracing::field::Empty,
            );
            let run = run_fault(ctx, run_id, job, cancel.clone(), applied_tx.clone())
                .instrument(fault_span);
            in_flight.push(Box::pin(async move { (stage_index, index, run.await) }));
        }
        drop(stage_span);
        drop(applied_tx);

        // The next stage overlaps this one: it may start once every fault here is in force
        // (or has already ended).
        let next_overlaps = plan
            .stages
            .get(stage_index + 1)
            .is_some_and(|next| next.overlap);
        if next_overlaps {
            let mut in_force = std::collections::BTreeSet::new();
            loop {
                let settled = in_force.union(&ledger.ended[stage_index]).count();
                if settled >= stage.faults.len() || ledger.stopped() {
                    break;
                }
                tokio::select! {
                    applied = applied_rx.recv() => match applied {
                        Some(index) => { in_force.insert(index); }
                        // Every fault of the stage ended: the ledger has them.
                        None => {
                            if let Some(done) = in_flight.next().await {
                                settle(ctx, run_id, plan, &mut ledger, done).await?;
                            }
                        }
                    },
                    Some(done) = in_flight.next() => {
                        settle(ctx, run_id, plan, &mut ledger, done).await?;
                    }
                }
            }
            if !ledger.stopped() {
                let message = format!(
                    "stage {}: {} fault(s) in force; the next stage overlaps them",
                    stage.name,
                    in_force.len()
                );
                ctx.events
                    .emit(
                        run_id,
                        event("stage-applied", &stage.name, "", "", message),
                        None,
                    )
                    .await?;
            }
        }
    }
    drain(ctx, run_id, plan, &mut ledger, &mut in_flight).await?;
    Ok(stopped(&ledger, cancel).unwrap_or((RunState::Completed, String::new())))
}

/// How the run ends if a fault failed or the run was cancelled.
fn stopped(
    ledger: &StageLedger,
    cancel: &watch::Receiver<Option<String>>,
) -> Option<(RunState, String)> {
    if ledger.cancelled {
        let reason = cancel.borrow().clone().unwrap_or_else(|| "halted".into());
        return Some((RunState::Halted, reason));
    }
    if let Some(reason) = cancel.borrow().clone() {
        return Some((RunState::Halted, reason));
    }
    (!ledger.failures.is_empty()).then(|| (RunState::Failed, ledger.failures.join("; ")))
}

/// Records one ended fault; the last of its stage finishes the stage.
async fn settle(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    ledger: &mut StageLedger,
    (stage_index, fault_index, outcome): FaultDone,
) -> Result<(), StoreError> {
    match outcome? {
        FaultOutcome::Done => {}
        FaultOutcome::Failed(reason) => ledger.failures.push(reason),
        FaultOutcome::Cancelled => ledger.cancelled = true,
    }
    ledger.ended[stage_index].insert(fault_index);
    ledger.remaining[stage_index] = ledger.remaining[stage_index].saturating_sub(1);
    if ledger.remaining[stage_index] == 0 && !ledger.stopped() {
        let name = &plan.stages[stage_index].name;
        let message = format!("stage {name} finished");
        ctx.events
            .emit(run_id, event("stage-finished", name, "", "", message), None)
            .await?;
    }
    Ok(())
}

/// Follows every fault still in flight to its end.
async fn drain(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    ledger: &mut StageLedger,
    in_flight: &mut FuturesUnordered<FaultFuture<'_>>,
) -> Result<(), StoreError> {
    while let Some(done) = in_flight.next().await {
        settle(ctx, run_id, plan, ledger, done).await?;
    }
    Ok(())
}

/// Awaits `wait` while following the faults in flight. `None` when a fault failed or was
/// cancelled meanwhile (the wait is then abandoned), else what `wait` gave.
async fn following<T>(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    ledger: &mut StageLedger,
    in_flight: &mut FuturesUnordered<FaultFuture<'_>>,
    wait: impl Future<Output = T>,
) -> Result<Option<T>, StoreError> {
    tokio::pin!(wait);
    loop {
        tokio::select! {
            out = &mut wait => return Ok(Some(out)),
            Some(done) = in_flight.next() => {
                settle(ctx, run_id, plan, ledger, done).await?;
                if ledger.stopped() {
                    return Ok(None);
                }
            }
        }
    }
}

/// Waits for a stage's `when`: `None` once it holds, else how the run ends (timed out,
/// halted or stopped).
async fn await_trigger(
    ctx: &RunContext,
    run_id: &str,
    stage: &Stage,
    trigger: &StageTrigger,
    probes: Option<&ProbeSession>,
    cancel: &mut watch::Receiver<Option<String>>,
) -> Result<Option<(RunState, String)>, StoreError> {
    let condition = &trigger.condition;
    if let (TriggerCondition::Probe(_), None) = (condition, probes) {
        // Plans are validated: a probe's `when` implies steady_state's probes.
        let reason = format!(
            "stage {}: `when` needs the steady_state probes, which are not running",
            stage.name
        );
        return Ok(Some((RunState::Failed, reason)));
    }
    let message = format!(
        "waiting up to {} until {}",
        format_duration(trigger.timeout),
        condition.describe()
    );
    ctx.events
        .emit(
            run_id,
            event("stage-waiting", &stage.name, "", "", message),
            None,
        )
        .await?;
    let check = |now: i64| match condition {
        TriggerCondition::Probe(condition) => {
            let samples = probes
                .map(|p| p.samples(&condition.probe))
                .unwrap_or_default();
            check_condition(&samples, condition, now)
        }
        TriggerCondition::Telemetry(condition) => {
            check_telemetry(&ctx.live.points(run_id), condition, now)
        }
    };
    let waited = wait_for_condition(trigger.timeout, check, cancel).await;
    match waited {
        ConditionWait::Held(check) => {
            let message = format!("condition held: {}", check.summary);
            ctx.events
                .emit(
                    run_id,
                    event("stage-triggered", &stage.name, "", "", message),
                    None,
                )
                .await?;
            Ok(None)
        }
        ConditionWait::TimedOut(check) => {
            let reason = format!(
                "stage {}: `when` did not hold within {} ({}; last seen: {}); the stages \
                 before it had already reverted their faults",
                stage.name,
                format_duration(trigger.timeout),
                condition.describe(),
                check.summary
            );
            ctx.events
                .emit(
                    run_id,
                    event("stage-timeout", &stage.name, "", "", reason.clone()),
                    None,
                )
                .await?;
            Ok(Some((RunState::Aborted, reason)))
        }
        ConditionWait::Cancelled(reason) => Ok(Some((RunState::Halted, reason))),
    }
}

/// How [`wait_for_condition`] ended.
#[derive(Debug)]
enum ConditionWait {
    Held(ConditionCheck),
    /// With the last check.
    TimedOut(ConditionCheck),
    Cancelled(String),
}

/// Evaluates `check(now)` every [`TRIGGER_CHECK_EVERY`] (first at once) until it holds,
/// `timeout` has passed, or `cancel` is flipped.
async fn wait_for_condition(
    timeout: Duration,
    check: impl Fn(i64) -> ConditionCheck,
    cancel: &mut watch::Receiver<Option<String>>,
) -> ConditionWait {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ticker = tokio::time::interval(TRIGGER_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancellable = true;
    loop {
        if let Some(reason) = cancel.borrow().clone() {
            return ConditionWait::Cancelled(reason);
        }
        tokio::select! {
            _ = ticker.tick() => {
                let check = check(now_ms());
                if check.held {
                    return ConditionWait::Held(check);
                }
                if tokio::time::Instant::now() >= deadline {
                    return ConditionWait::TimedOut(check);
                }
            }
            changed = cancel.changed(), if cancellable => {
                if changed.is_err() {
                    cancellable = false;
                }
            }
        }
    }
}

/// One fault of a stage, as [`run_fault`] runs it.
struct FaultJob<'a> {
    stage: &'a str,
    /// Position in the stage: the fault id is `RUN/STAGE/INDEX`.
    index: usize,
    planned: &'a PlannedFault,
    lease: Duration,
}

/// Applies one fault, holds it and follows it to its revert. `in_force` hears the fault's index
/// once the agent confirmed it in force.
async fn run_fault(
    ctx: &RunContext,
    run_id: &str,
    job: FaultJob<'_>,
    mut cancel: watch::Receiver<Option<String>>,
    in_force: mpsc::UnboundedSender<usize>,
) -> Result<FaultOutcome, StoreError> {
    let FaultJob {
        stage,
        index,
        planned,
        lease,
    } = job;
    let fault_id = format!("{run_id}/{stage}/{index}");
    let agent = planned.agent.as_str();
    let emit = |kind: &'static str, message: String| {
        ctx.events
            .emit(run_id, event(kind, stage, agent, &fault_id, message), None)
    };
    let mut reports = ctx.hub.subscribe_reports();
    let apply = pb::ApplyFault {
        fault_id: fault_id.clone(),
        fault: Some(fault_to_wire(&planned.spec)),
        duration_ms: planned.spec.duration.as_millis() as u64,
        lease_ms: lease.as_millis() as u64,
    };
    let what = format!(
        "{} on {} for {}",
        planned.spec.kind.name(),
        planned.spec.target,
        format_duration(planned.spec.duration)
    );
    let sent_at = tokio::time::Instant::now();
    let command_id = match ctx
        .hub
        .send(agent, run_id, pb::command::Action::Apply(apply))
        .await
    {
        Ok(id) => id,
        Err(err) => {
            emit("fault-failed", format!("{what}: not sent: {err}")).await?;
            return Ok(FaultOutcome::Failed(format!("{agent}: {err}")));
        }
    };
    emit("fault-sent", format!("{what} (command {command_id})")).await?;

    // The end of this fault, whatever asked for it: the agent's schedule, a lease, a halt,
    // or the agent's own journal recovery after a crash.
    let is_end = |r: &AgentReport| {
        r.agent == agent
            && r.report.fault_id == fault_id
            && matches!(
                kind_of(&r.report),
                pb::ReportKind::Reverted | pb::ReportKind::RevertFailed
            )
    };
    let applied = wait_for(&mut reports, &mut cancel, APPLY_TIMEOUT, |r| {
        is_end(r)
            || (r.agent == agent
                && r.report.command_id == command_id
                && matches!(
                    kind_of(&r.report),
                    pb::ReportKind::Applied | pb::ReportKind::ApplyFailed | pb::ReportKind::Refused
                ))
    })
    .await;
    // An apply whose answer never came may still have happened (the agent can die between
    // applying and answering): it is then treated as applied, and its revert is awaited.
    let mut apply_unconfirmed = None;
    let mut early_end = None;
    // From the agent's "applied" to the end of this function (the revert): the fault window.
    let mut _active_span = None;
    let mut _active_metric = None;
    match applied {
        Waited::Report(report) if kind_of(&report.report) == pb::ReportKind::Applied => {
            crate::metrics::REGISTRY.observe(
                "faultline_command_duration_seconds",
                &[planned.spec.kind.name()],
                sent_at.elapsed().as_secs_f64(),
            );
            _active_metric = Some(crate::metrics::ActiveFault::new(planned.spec.kind.name()));
            _active_span = Some(tracing::info_span!(
                target: crate::observability::OTEL_TARGET,
                "faultline.fault.active",
                faultline.fault.id = %fault_id,
                faultline.fault.kind = planned.spec.kind.name(),
                faultline.agent = %agent,
                faultline.target = %planned.spec.target,
                faultline.target.resolved = %report.report.resolved_target,
            ));
            let message = format!(
                "applied to {}: {}",
                report.report.resolved_target, report.report.detail
            );
            emit("fault-applied", message).await?;
            let _ = in_force.send(index);
        }
        Waited::Report(report) if is_end(&report) => {
            let message = format!("{what}: reverted before its apply was confirmed");
            emit("fault-apply-unconfirmed", message.clone()).await?;
            apply_unconfirmed = Some(message);
            early_end = Some(Waited::Report(report));
        }
        Waited::Report(report) => {
            let kind = if kind_of(&report.report) == pb::ReportKind::Refused {
                "refused"
            } else {
                "failed"
            };
            emit(
                "fault-failed",
                format!("{what}: {kind}: {}", report.report.detail),
            )
            .await?;
            return Ok(FaultOutcome::Failed(format!(
                "{agent}: {kind}: {}",
                report.report.detail
            )));
        }
        Waited::Timeout => {
            let message = format!(
                "{what}: no answer within {}; treated as applied and asked to revert",
                format_duration(APPLY_TIMEOUT)
            );
            emit("fault-apply-unconfirmed", message.clone()).await?;
            request_revert(ctx, run_id, agent, &fault_id, "apply unanswered").await;
            apply_unconfirmed = Some(message);
        }
        Waited::Cancelled => {
            await_halt_revert(ctx, run_id, stage, agent, &fault_id, &mut reports).await?;
            return Ok(FaultOutcome::Cancelled);
        }
    }

    // Unconfirmed: the revert was already asked for; wait as long as the agent's lease (a
    // restarted agent reverts from its journal, a lost one when its lease runs out).
    let scheduled = if apply_unconfirmed.is_some() {
        lease + REVERT_GRACE
    } else {
        planned.spec.duration + REVERT_GRACE
    };
    let mut deadline = tokio::time::Instant::now() + scheduled;
    let mut asked = apply_unconfirmed.is_some();
    let mut failures = 0u32;
    let ended = loop {
        let next = match early_end.take() {
            Some(report) => report,
            None => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                wait_for(&mut reports, &mut cancel, left, is_end).await
            }
        };
        match next {
            // A failed revert is retried by the agent (its journal keeps the entry): record
            // it and keep waiting for the confirmed revert.
            Waited::Report(report) if kind_of(&report.report) == pb::ReportKind::RevertFailed => {
                failures += 1;
                let message = format!("revert failed, agent retrying: {}", report.report.detail);
                emit("fault-revert-failed", message).await?;
            }
            Waited::Timeout if !asked => {
                asked = true;
                emit(
                    "fault-revert-requested",
                    "scheduled revert not reported; asking the agent".into(),
                )
                .await?;
                request_revert(
                    ctx,
                    run_id,
                    agent,
                    &fault_id,
                    "scheduled revert not reported",
                )
                .await;
                deadline = tokio::time::Instant::now() + REVERT_GRACE;
            }
            other => break other,
        }
    };
    match ended {
        Waited::Report(report) => {
            let message = format!(
                "reverted ({}): {}{}",
                report.report.revert_reason,
                report.report.detail,
                if failures > 0 {
                    format!(" after {failures} failed attempt(s)")
                } else {
                    String::new()
                }
            );
            emit("fault-reverted", message).await?;
            match apply_unconfirmed {
                Some(why) => Ok(FaultOutcome::Failed(format!("{agent}: {why}"))),
                None => Ok(FaultOutcome::Done),
            }
        }
        Waited::Timeout => {
            let message = format!(
                "agent did not confirm the revert; its lease ({}) reverts the fault on its own",
                format_duration(lease)
            );
            emit("fault-revert-unconfirmed", message.clone()).await?;
            Ok(FaultOutcome::Failed(format!("{agent}: {message}")))
        }
        Waited::Cancelled => {
            await_halt_revert(ctx, run_id, stage, agent, &fault_id, &mut reports).await?;
            Ok(FaultOutcome::Cancelled)
        }
    }
}

/// After a halt cancelled the run, record the halt's revert of this fault if it arrives.
async fn await_halt_revert(
    ctx: &RunContext,
    run_id: &str,
    stage: &str,
    agent: &str,
    fault_id: &str,
    reports: &mut broadcast::Receiver<AgentReport>,
) -> Result<(), StoreError> {
    // A switch nobody flips: this wait is about the halt's own reverts, not cancellable.
    let (_never_flipped, mut never) = watch::channel(None);
    let reverted = wait_for(reports, &mut never, REVERT_GRACE, |r| {
        r.agent == agent
            && r.report.fault_id == fault_id
            && matches!(
                kind_of(&r.report),
                pb::ReportKind::Reverted | pb::ReportKind::RevertFailed
            )
    })
    .await;
    let (kind, message) = match reverted {
        Waited::Report(r) if kind_of(&r.report) == pb::ReportKind::Reverted => (
            "fault-reverted",
            format!("reverted ({}): {}", r.report.revert_reason, r.report.detail),
        ),
        Waited::Report(r) => (
            "fault-revert-failed",
            format!("revert failed: {}", r.report.detail),
        ),
        _ => (
            "fault-revert-unconfirmed",
            "halt revert not confirmed; lease will revert".into(),
        ),
    };
    ctx.events
        .emit(run_id, event(kind, stage, agent, fault_id, message), None)
        .await
}

async fn request_revert(ctx: &RunContext, run_id: &str, agent: &str, fault_id: &str, why: &str) {
    let revert = pb::RevertFault {
        fault_id: fault_id.to_string(),
        reason: why.to_string(),
    };
    if let Err(err) = ctx
        .hub
        .send(agent, run_id, pb::command::Action::Revert(revert))
        .await
    {
        tracing::warn!(%agent, %fault_id, %err, "revert request not sent; lease will revert");
    }
}

enum Waited {
    Report(AgentReport),
    Timeout,
    Cancelled,
}

async fn wait_for(
    reports: &mut broadcast::Receiver<AgentReport>,
    cancel: &mut watch::Receiver<Option<String>>,
    timeout: Duration,
    wanted: impl Fn(&AgentReport) -> bool,
) -> Waited {
    let deadline = tokio::time::Instant::now() + timeout;
    // Once the cancel switch's sender is gone nobody can cancel any more: stop watching it,
    // but keep listening for reports.
    let mut cancellable = true;
    loop {
        if cancel.borrow().is_some() {
            return Waited::Cancelled;
        }
        tokio::select! {
            received = reports.recv() => match received {
                Ok(report) if wanted(&report) => return Waited::Report(report),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "run task lagged behind agent reports");
                }
                Err(broadcast::error::RecvError::Closed) => return Waited::Timeout,
            },
            _ = tokio::time::sleep_until(deadline) => return Waited::Timeout,
            changed = cancel.changed(), if cancellable => {
                if changed.is_err() {
                    cancellable = false;
                }
            }
        }
    }
}

async fn sleep_or_cancel(
    duration: Duration,
    cancel: &mut watch::Receiver<Option<String>>,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + duration;
    loop {
        if let Some(reason) = cancel.borrow().clone() {
            return Some(reason);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            changed = cancel.changed() => if changed.is_err() {
                tokio::time::sleep_until(deadline).await;
                return None;
            },
        }
    }
}

fn kind_of(report: &pb::CommandReport) -> pb::ReportKind {
    pb::ReportKind::try_from(report.kind).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use faultline_domain::plan::{Comparison, Condition, Metric};
    use faultline_domain::probe::ProbeSample;

    use super::*;

    fn failing_rate_above_zero() -> Condition {
        Condition {
            probe: "api".into(),
            metric: Metric::ErrorRate,
            comparison: Comparison::Above,
            threshold: 0.0,
            window: Duration::from_millis(500),
        }
    }

    fn sample(ok: bool) -> ProbeSample {
        ProbeSample {
            at_ms: now_ms(),
            ok,
            latency: Some(Duration::from_millis(1)),
            value: None,
            detail: String::new(),
        }
    }

    /// Samples taken every 50ms in the background: ok until `fail_after`, failing afterwards.
    fn probe(fail_after: Duration) -> (Arc<Mutex<Vec<ProbeSample>>>, tokio::task::JoinHandle<()>) {
        let samples: Arc<Mutex<Vec<ProbeSample>>> = Arc::default();
        let sink = samples.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            loop {
                let ok = started.elapsed() < fail_after;
                sink.lock().unwrap().push(sample(ok));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (samples, task)
    }

    #[tokio::test]
    async fn a_trigger_fires_once_its_condition_holds() {
        let (samples, task) = probe(Duration::from_millis(600));
        let (_tx, mut cancel) = watch::channel(None);
        let started = Instant::now();
        let waited = wait_for_condition(
            Duration::from_secs(10),
            |now| check_condition(&samples.lock().unwrap(), &failing_rate_above_zero(), now),
            &mut cancel,
        )
        .await;
        let took = started.elapsed();
        task.abort();
        let ConditionWait::Held(check) = waited else {
            panic!("expected the condition to hold: {waited:?}");
        };
        assert!(check.held && check.observed.unwrap() > 0.0, "{check:?}");
        // Not before the first failure, and soon after it.
        assert!(took >= Duration::from_millis(600), "fired after {took:?}");
        assert!(took < Duration::from_millis(1500), "fired after {took:?}");
    }

    #[tokio::test]
    async fn a_trigger_that_never_holds_times_out() {
        let (samples, task) = probe(Duration::from_secs(3600));
        let (_tx, mut cancel) = watch::channel(None);
        let started = Instant::now();
        let waited = wait_for_condition(
            Duration::from_millis(700),
            |now| check_condition(&samples.lock().unwrap(), &failing_rate_above_zero(), now),
            &mut cancel,
        )
        .await;
        let took = started.elapsed();
        task.abort();
        let ConditionWait::TimedOut(check) = waited else {
            panic!("expected a time-out: {waited:?}");
        };
        assert_eq!(check.observed, Some(0.0), "{check:?}");
        assert!(took >= Duration::from_millis(700), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[tokio::test]
    async fn a_halt_ends_the_wait() {
        let (tx, mut cancel) = watch::channel(None);
        let halt = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send_replace(Some("halted by the operator".to_string()));
            // Keep the sender alive until the waiter has seen the change.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let started = Instant::now();
        // No samples at all: the condition can never hold.
        let waited = wait_for_condition(
            Duration::from_secs(30),
            |now| check_condition(&[], &failing_rate_above_zero(), now),
            &mut cancel,
        )
        .await;
        halt.abort();
        assert!(
            matches!(&waited, ConditionWait::Cancelled(reason) if reason == "halted by the operator"),
            "{waited:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
