//! Executes one run: stages in order, the faults of a stage in parallel, each fault applied by
//! its agent, held for its duration (the hub renews its lease meanwhile) and reverted. Every step
//! is recorded as a run event, stored and broadcast to watchers.
//!
//! The run task never owns a fault's safety: if it dies, the coordinator dies or a halt cancels
//! it, the agents' leases and the halt path revert what was applied.

use std::time::Duration;

use faultline_domain::duration::format_duration;
use std::sync::Mutex;

use faultline_domain::plan::{Plan, PlannedFault, SteadyState, stop_condition_fired};
use faultline_domain::probe::Window;
use faultline_proto::v1 as pb;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::clock::now_ms;
use crate::halt::{RunRevert, revert_run};
use crate::hub::{AgentReport, HubHandle};
use crate::steady::ProbeSession;
use crate::store::{RunEventRecord, RunState, Store, StoreError};
use crate::wire::fault_to_wire;

/// How long an agent has to answer an apply.
const APPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Slack after a fault's duration for the agent's scheduled revert to be reported.
const REVERT_GRACE: Duration = Duration::from_secs(10);
/// How often the stop conditions are evaluated during the stages.
const STOP_CHECK_EVERY: Duration = Duration::from_millis(250);

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
    let (state, reason) = match drive(&ctx, &run_id, &plan, &mut cancel).await {
        Ok((state, reason)) => (state, reason),
        Err(err) => (RunState::Failed, format!("coordinator store failed: {err}")),
    };
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
        return run_stages(ctx, run_id, plan, cancel).await;
    };
    let probes = match ProbeSession::start(steady) {
        Ok(probes) => probes,
        Err(err) => {
            let reason = format!("could not start the probes: {err}; nothing was applied");
            return Ok((RunState::Failed, reason));
        }
    };
    let result = drive_with_probes(ctx, run_id, plan, steady, &probes, cancel).await;
    probes.stop().await;
    result
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
) -> Result<(RunState, String), StoreError> {
    let started = now_ms();
    if let Some(reason) = sleep_or_cancel(steady.baseline, cancel).await {
        return Ok((RunState::Halted, reason));
    }
    let check = probes.check(steady, Window::new(started, now_ms() + 1));
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

    // The stages see a switch of their own, flipped by a halt (forwarded) or a stop condition.
    let (stop_tx, mut stop_rx) = watch::channel(None::<String>);
    let fired: Mutex<Option<(String, JoinHandle<RunRevert>)>> = Mutex::new(None);
    let outcome = {
        let stages = run_stages(ctx, run_id, plan, &mut stop_rx);
        let monitor = watch_stop_conditions(ctx, run_id, plan, probes, cancel, &stop_tx, &fired);
        tokio::select! {
            biased;
            outcome = stages => outcome?,
            () = monitor => (RunState::Failed, "internal error: stop-condition monitor ended".into()),
        }
    };
    let fired = fired
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((reason, revert)) = fired {
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
    if outcome.0 != RunState::Completed {
        return Ok(outcome);
    }

    let recovery_start = now_ms();
    if let Some(reason) = sleep_or_cancel(steady.baseline, cancel).await {
        return Ok((RunState::Halted, reason));
    }
    let check = probes.check(steady, Window::new(recovery_start, now_ms() + 1));
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

/// Forwards a halt from `cancel` to `stop`, and every [`STOP_CHECK_EVERY`] evaluates the plan's
/// stop conditions: the first that fires is recorded, flips `stop` and starts reverting the
/// run's faults (in a task of its own, so that it finishes even when this future is dropped).
/// Never returns.
async fn watch_stop_conditions(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    probes: &ProbeSession,
    cancel: &mut watch::Receiver<Option<String>>,
    stop: &watch::Sender<Option<String>>,
    fired: &Mutex<Option<(String, JoinHandle<RunRevert>)>>,
) {
    if let Some(reason) = cancel.borrow().clone() {
        stop.send_replace(Some(reason));
    }
    let mut ticker = tokio::time::interval(STOP_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancellable = true;
    let mut watching = !plan.stop_conditions.is_empty();
    loop {
        tokio::select! {
            changed = cancel.changed(), if cancellable => {
                if changed.is_err() {
                    cancellable = false;
                } else if let Some(reason) = cancel.borrow().clone() {
                    stop.send_replace(Some(reason));
                    watching = false;
                }
            }
            _ = ticker.tick(), if watching => {
                let now = now_ms();
                let hit = plan.stop_conditions.iter().find_map(|condition| {
                    stop_condition_fired(&probes.samples(&condition.probe), condition, now)
                });
                let Some(reason) = hit else { continue };
                watching = false;
                // The stages stop first, so that no fault counts a revert as its normal end.
                stop.send_replace(Some(reason.clone()));
                let hub = ctx.hub.clone();
                let run = run_id.to_string();
                let revert = tokio::spawn(async move {
                    revert_run(&hub, &run, "stop condition").await
                });
                *fired.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((reason.clone(), revert));
                let message = format!("{reason}; reverting the run's faults");
                if let Err(err) = ctx
                    .events
                    .emit(run_id, event("stop-condition", "", "", "", message), None)
                    .await
                {
                    tracing::error!(run = %run_id, %err, "could not record the stop condition");
                }
            }
            else => std::future::pending::<()>().await,
        }
    }
}

/// The stages in order, each fault applied, held and reverted; ends at the first failure or
/// when `cancel` is flipped.
async fn run_stages(
    ctx: &RunContext,
    run_id: &str,
    plan: &Plan,
    cancel: &mut watch::Receiver<Option<String>>,
) -> Result<(RunState, String), StoreError> {
    for (stage_index, stage) in plan.stages.iter().enumerate() {
        if !stage.after.is_zero() {
            let message = format!("waiting {} before the stage", format_duration(stage.after));
            ctx.events
                .emit(
                    run_id,
                    event("stage-waiting", &stage.name, "", "", message),
                    None,
                )
                .await?;
            if let Some(reason) = sleep_or_cancel(stage.after, cancel).await {
                return Ok((RunState::Halted, reason));
            }
        }
        let message = format!(
            "stage {} of {}: {} fault(s)",
            stage_index + 1,
            plan.stages.len(),
            stage.faults.len()
        );
        ctx.events
            .emit(
                run_id,
                event("stage-started", &stage.name, "", "", message),
                None,
            )
            .await?;

        let faults = stage.faults.iter().enumerate().map(|(index, fault)| {
            let fault_id = format!("{run_id}/{}/{index}", stage.name);
            run_fault(
                ctx,
                run_id,
                &stage.name,
                fault_id,
                fault,
                plan.lease,
                cancel.clone(),
            )
        });
        let outcomes = futures::future::join_all(faults).await;
        let mut failures = Vec::new();
        let mut cancelled = false;
        for outcome in outcomes {
            match outcome? {
                FaultOutcome::Done => {}
                FaultOutcome::Failed(reason) => failures.push(reason),
                FaultOutcome::Cancelled => cancelled = true,
            }
        }
        if cancelled {
            let reason = cancel.borrow().clone().unwrap_or_else(|| "halted".into());
            return Ok((RunState::Halted, reason));
        }
        if !failures.is_empty() {
            return Ok((RunState::Failed, failures.join("; ")));
        }
        let message = format!("stage {} finished", stage.name);
        ctx.events
            .emit(
                run_id,
                event("stage-finished", &stage.name, "", "", message),
                None,
            )
            .await?;
    }
    Ok((RunState::Completed, String::new()))
}

async fn run_fault(
    ctx: &RunContext,
    run_id: &str,
    stage: &str,
    fault_id: String,
    planned: &PlannedFault,
    lease: Duration,
    mut cancel: watch::Receiver<Option<String>>,
) -> Result<FaultOutcome, StoreError> {
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
    match applied {
        Waited::Report(report) if kind_of(&report.report) == pb::ReportKind::Applied => {
            let message = format!(
                "applied to {}: {}",
                report.report.resolved_target, report.report.detail
            );
            emit("fault-applied", message).await?;
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
