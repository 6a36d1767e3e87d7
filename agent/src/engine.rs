//! The fault engine: one actor that owns every fault in force on this host and guarantees its
//! revert — on schedule, on the coordinator's request or halt, when the lease runs out, on
//! shutdown, and (through the journal) after a crash. Docker calls run in tasks whose results
//! come back as messages, so a slow `docker stop` never delays a lease check.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use faultline_domain::fault::FaultSpec;
use faultline_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::clock::now_ms;
use crate::faults::{self, Backends, FaultIds};
use crate::journal::{Journal, JournalEntry};
use crate::runtime::ContainerRuntime;
use crate::sys::command::CommandRunner;
use crate::verify::{Action, VerifiedCommand};

/// Wait between attempts to revert a fault whose revert failed (engine down, for example).
const REVERT_RETRY: Duration = Duration::from_secs(2);
/// How long shutdown waits for in-flight reverts.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a revert happened, as reported to the coordinator.
pub mod reason {
    pub const SCHEDULE: &str = "schedule";
    pub const LEASE: &str = "lease-expired";
    pub const RECOVERY: &str = "journal-recovery";
    pub const SHUTDOWN: &str = "shutdown";
}

#[derive(Debug)]
enum Phase {
    /// The apply task is running; a revert requested meanwhile waits for it.
    Applying {
        revert_requested: Option<String>,
    },
    Active,
    Reverting,
    /// The last revert failed; try again at the instant.
    RetryRevert {
        at: Instant,
        reason: String,
        attempts: u32,
    },
}

#[derive(Debug)]
struct Fault {
    fault_id: String,
    run_id: String,
    /// The apply command's id; revert reports answer `revert_command` instead when a revert
    /// command asked for the revert.
    command_id: String,
    revert_command: Option<String>,
    spec: FaultSpec,
    entry: Option<JournalEntry>,
    phase: Phase,
    end_at: Instant,
    lease: Duration,
    lease_deadline: Instant,
    /// The apply command's W3C traceparent: the parent of this fault's agent spans.
    traceparent: String,
}

enum Msg {
    Command(VerifiedCommand),
    ApplyDone {
        fault_id: String,
        // Boxed: a journal entry is large and most messages are small.
        result: Result<Box<(JournalEntry, String)>, String>,
    },
    RevertDone {
        fault_id: String,
        reason: String,
        result: Result<String, String>,
    },
    ActiveIds(oneshot::Sender<Vec<String>>),
    DryRun {
        fault_id: String,
        spec: FaultSpec,
        reply: oneshot::Sender<Result<faults::DryRun, String>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// Handle to the engine actor.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("engine message")
    }
}

impl EngineHandle {
    /// Starts the engine. It first reverts everything its journal holds (a previous run of
    /// this agent crashed with those faults in force), reporting each revert.
    pub fn spawn<R: ContainerRuntime, C: CommandRunner>(
        backends: Backends<R, C>,
        journal: Journal,
        reports: mpsc::Sender<pb::CommandReport>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(256);
        let engine = Engine {
            backends,
            journal,
            faults: BTreeMap::new(),
            reports,
            self_tx: tx.downgrade(),
            shutdown: None,
        };
        tokio::spawn(engine.run(rx));
        Self { tx }
    }

    pub async fn command(&self, command: VerifiedCommand) {
        let _ = self.tx.send(Msg::Command(command)).await;
    }

    pub async fn active_ids(&self) -> Vec<String> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::ActiveIds(reply)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// What applying `spec` would do on this host; changes nothing.
    pub async fn dry_run(
        &self,
        fault_id: String,
        spec: FaultSpec,
    ) -> Result<faults::DryRun, String> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::DryRun {
            fault_id,
            spec,
            reply,
        };
        if self.tx.send(msg).await.is_err() {
            return Err("the agent is shutting down".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the agent is shutting down".into()))
    }

    /// Reverts every fault and waits (bounded) for the reverts to finish.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(reply)).await.is_ok() {
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, rx).await;
        }
    }
}

struct Engine<R, C> {
    backends: Backends<R, C>,
    journal: Journal,
    faults: BTreeMap<String, Fault>,
    reports: mpsc::Sender<pb::CommandReport>,
    self_tx: mpsc::WeakSender<Msg>,
    shutdown: Option<oneshot::Sender<()>>,
}

fn report(
    kind: pb::ReportKind,
    command_id: &str,
    fault_id: &str,
    run_id: &str,
) -> pb::CommandReport {
    pb::CommandReport {
        command_id: command_id.to_string(),
        fault_id: fault_id.to_string(),
        run_id: run_id.to_string(),
        kind: kind as i32,
        at_unix_ms: now_ms(),
        ..Default::default()
    }
}

impl<R: ContainerRuntime, C: CommandRunner> Engine<R, C> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let live: HashSet<String> = self
            .journal
            .entries()
            .unwrap_or_default()
            .iter()
            .map(|entry| faults::fault_tag(&self.backends.agent, &entry.fault_id))
            .collect();
        self.recover();
        // Anything tagged by this agent that no journal entry covers is a leftover (a journal
        // lost with its disk, a bug): remove it. In the background: it visits every namespace.
        tokio::spawn(faults::sweep_leftovers(self.backends.clone(), live));
        loop {
            let next = self.next_deadline();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => return,
                },
                _ = sleep_until_opt(next) => self.on_deadlines(),
            }
            if self.faults.is_empty()
                && let Some(done) = self.shutdown.take()
            {
                let _ = done.send(());
            }
        }
    }

    /// Re-adopts every journaled fault and reverts it.
    fn recover(&mut self) {
        let entries = match self.journal.entries() {
            Ok(entries) => entries,
            Err(err) => {
                // Cannot know what is in force: say so loudly; nothing can be reverted blindly.
                tracing::error!(%err, "cannot read the journal; faults from before may remain");
                return;
            }
        };
        for entry in entries {
            tracing::warn!(fault = %entry.fault_id, target = %entry.resolved,
                "reverting fault left by a previous run of this agent");
            let now = Instant::now();
            let fault = Fault {
                fault_id: entry.fault_id.clone(),
                run_id: entry.run_id.clone(),
                command_id: entry.command_id.clone(),
                revert_command: None,
                spec: entry.spec.clone(),
                entry: Some(entry),
                phase: Phase::Active,
                end_at: now,
                lease: Duration::ZERO,
                lease_deadline: now,
                traceparent: String::new(),
            };
            let id = fault.fault_id.clone();
            crate::metrics::REGISTRY.add(
                "faultline_agent_faults_active",
                &[fault.spec.kind.name()],
                1.0,
            );
            self.faults.insert(id.clone(), fault);
            self.start_revert(&id, reason::RECOVERY.to_string());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.faults
            .values()
            .filter_map(|f| match &f.phase {
                Phase::Active => Some(f.end_at.min(f.lease_deadline)),
                Phase::RetryRevert { at, .. } => Some(*at),
                Phase::Applying {
                    revert_requested: None,
                } => Some(f.lease_deadline),
                _ => None,
            })
            .min()
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for fault in self.faults.values_mut() {
            match &fault.phase {
                Phase::Active if now >= fault.end_at => {
                    due.push((fault.fault_id.clone(), reason::SCHEDULE.to_string()))
                }
                Phase::Active if now >= fault.lease_deadline => {
                    due.push((fault.fault_id.clone(), reason::LEASE.to_string()))
                }
                Phase::RetryRevert { at, reason, .. } if now >= *at => {
                    due.push((fault.fault_id.clone(), reason.clone()))
                }
                Phase::Applying {
                    revert_requested: None,
                } if now >= fault.lease_deadline => {
                    fault.phase = Phase::Applying {
                        revert_requested: Some(reason::LEASE.into()),
                    };
                }
                _ => {}
            }
        }
        for (fault_id, why) in due {
            if why == reason::LEASE {
                crate::metrics::REGISTRY.add("faultline_agent_lease_expiries_total", &[], 1.0);
                tracing::warn!(fault = %fault_id, "lease expired without renewal; reverting");
            }
            self.start_revert(&fault_id, why);
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Command(command) => self.on_command(command).await,
            Msg::ApplyDone { fault_id, result } => self.on_apply_done(fault_id, result).await,
            Msg::RevertDone {
                fault_id,
                reason,
                result,
            } => self.on_revert_done(fault_id, reason, result).await,
            Msg::ActiveIds(reply) => {
                let _ = reply.send(self.faults.keys().cloned().collect());
            }
            Msg::DryRun {
                fault_id,
                spec,
                reply,
            } => {
                // Resolution talks to Docker and reads /proc: not on the actor's own time.
                let backends = self.backends.clone();
                tokio::spawn(async move {
                    let _ = reply.send(faults::dry_run_fault(&backends, &fault_id, &spec).await);
                });
            }
            Msg::Shutdown(done) => {
                let ids: Vec<String> = self.faults.keys().cloned().collect();
                for id in ids {
                    self.request_revert(&id, reason::SHUTDOWN.to_string());
                }
                self.shutdown = Some(done);
            }
        }
    }

    async fn send_report(&self, report: pb::CommandReport) {
        if self.reports.send(report).await.is_err() {
            tracing::error!("report channel closed; report lost");
        }
    }

    async fn on_command(&mut self, command: VerifiedCommand) {
        let VerifiedCommand {
            command_id,
            run_id,
            action,
            traceparent,
        } = command;
        match action {
            Action::Apply {
                fault_id,
                spec,
                lease,
            } => {
                if self.shutdown.is_some() {
                    let mut r =
                        report(pb::ReportKind::ApplyFailed, &command_id, &fault_id, &run_id);
                    r.detail = "agent is shutting down; nothing applied".into();
                    return self.send_report(r).await;
                }
                if self.faults.contains_key(&fault_id) {
                    let mut r =
                        report(pb::ReportKind::ApplyFailed, &command_id, &fault_id, &run_id);
                    r.detail = format!("fault {fault_id} is already in force; nothing applied");
                    return self.send_report(r).await;
                }
                let now = Instant::now();
                self.faults.insert(
                    fault_id.clone(),
                    Fault {
                        fault_id: fault_id.clone(),
                        run_id: run_id.clone(),
                        command_id: command_id.clone(),
                        revert_command: None,
                        spec: spec.clone(),
                        entry: None,
                        phase: Phase::Applying {
                            revert_requested: None,
                        },
                        end_at: now + spec.duration,
                        lease,
                        lease_deadline: now + lease,
                        traceparent: traceparent.clone(),
                    },
                );
                let backends = self.backends.clone();
                let journal = self.journal.clone();
                let tx = self.self_tx.clone();
                let span = tracing::info_span!(
                    target: crate::observability::OTEL_TARGET,
                    "faultline.agent.apply",
                    faultline.run.id = %run_id,
                    faultline.fault.id = %fault_id,
                    faultline.fault.kind = spec.kind.name(),
                    faultline.target = %spec.target,
                    faultline.command.id = %command_id,
                    faultline.target.resolved = tracing::field::Empty,
                    faultline.verified = tracing::field::Empty,
                    faultline.error = tracing::field::Empty,
                );
                crate::observability::set_parent(&span, &traceparent);
                tokio::spawn(async move {
                    let ids = FaultIds {
                        fault_id: &fault_id,
                        command_id: &command_id,
                        run_id: &run_id,
                    };
                    let started = Instant::now();
                    let result = faults::apply_fault(&backends, &journal, ids, &spec)
                        .instrument(span.clone())
                        .await
                        .map(|applied| Box::new((applied.entry, applied.detail)));
                    let kind = spec.kind.name();
                    crate::metrics::REGISTRY.observe(
                        "faultline_agent_apply_duration_seconds",
                        &[kind],
                        started.elapsed().as_secs_f64(),
                    );
                    let outcome = if result.is_ok() { "applied" } else { "failed" };
                    crate::metrics::REGISTRY.add(
                        "faultline_agent_applies_total",
                        &[kind, outcome],
                        1.0,
                    );
                    match &result {
                        Ok(applied) => {
                            span.record(
                                "faultline.target.resolved",
                                applied.0.resolved.to_string().as_str(),
                            );
                            span.record("faultline.verified", true);
                        }
                        Err(err) => {
                            span.record("faultline.verified", false);
                            span.record("faultline.error", err.as_str());
                        }
                    }
                    drop(span);
                    if let Some(tx) = tx.upgrade() {
                        let _ = tx.send(Msg::ApplyDone { fault_id, result }).await;
                    }
                });
            }
            Action::Revert { fault_id, reason } => {
                if self.faults.contains_key(&fault_id) {
                    let why = if reason.is_empty() {
                        "coordinator".to_string()
                    } else {
                        reason
                    };
                    if let Some(fault) = self.faults.get_mut(&fault_id) {
                        fault.revert_command = Some(command_id.clone());
                    }
                    self.request_revert(&fault_id, why);
                } else {
                    // Idempotent: the fault is not (or no longer) in force here.
                    let mut r = report(pb::ReportKind::Reverted, &command_id, &fault_id, &run_id);
                    r.detail = "not in force on this host; nothing to revert".into();
                    r.revert_reason = reason;
                    self.send_report(r).await;
                }
            }
            Action::Renew { fault_ids, lease } => {
                let now = Instant::now();
                for id in fault_ids {
                    if let Some(fault) = self.faults.get_mut(&id) {
                        fault.lease = lease;
                        fault.lease_deadline = now + lease;
                    }
                }
            }
            // The link runs probes itself (crate::probe); they never touch faults.
            Action::Probe(_)
            | Action::DryRun { .. }
            | Action::TelemetrySubscribe(_)
            | Action::TelemetryUnsubscribe => {
                tracing::error!(command = %command_id, "probe request sent to the engine; ignored");
            }
        }
    }

    /// Reverts now if the fault is active; remembers the request if it is still applying.
    fn request_revert(&mut self, fault_id: &str, why: String) {
        let Some(fault) = self.faults.get_mut(fault_id) else {
            return;
        };
        match &fault.phase {
            Phase::Applying { .. } => {
                fault.phase = Phase::Applying {
                    revert_requested: Some(why),
                }
            }
            Phase::Active | Phase::RetryRevert { .. } => self.start_revert(fault_id, why),
            Phase::Reverting => {}
        }
    }

    fn start_revert(&mut self, fault_id: &str, why: String) {
        let Some(fault) = self.faults.get_mut(fault_id) else {
            return;
        };
        let Some(entry) = fault.entry.clone() else {
            return;
        };
        fault.phase = Phase::Reverting;
        let span = tracing::info_span!(
            target: crate::observability::OTEL_TARGET,
            "faultline.agent.revert",
            faultline.run.id = %fault.run_id,
            faultline.fault.id = %fault_id,
            faultline.fault.kind = fault.spec.kind.name(),
            faultline.target = %fault.spec.target,
            faultline.target.resolved = %entry.resolved,
            faultline.revert.reason = %why,
            faultline.error = tracing::field::Empty,
        );
        crate::observability::set_parent(&span, &fault.traceparent);
        let backends = self.backends.clone();
        let journal = self.journal.clone();
        let tx = self.self_tx.clone();
        let fault_id = fault_id.to_string();
        tokio::spawn(async move {
            let result = faults::revert_fault(&backends, &journal, &entry)
                .instrument(span.clone())
                .await;
            if let Err(err) = &result {
                span.record("faultline.error", err.as_str());
            }
            drop(span);
            if let Some(tx) = tx.upgrade() {
                let _ = tx
                    .send(Msg::RevertDone {
                        fault_id,
                        reason: why,
                        result,
                    })
                    .await;
            }
        });
    }

    async fn on_apply_done(
        &mut self,
        fault_id: String,
        result: Result<Box<(JournalEntry, String)>, String>,
    ) {
        let Some(fault) = self.faults.get_mut(&fault_id) else {
            return;
        };
        let (command_id, run_id) = (fault.command_id.clone(), fault.run_id.clone());
        match result {
            Ok(applied) => {
                let (entry, detail) = *applied;
                let resolved = entry.resolved.to_string();
                crate::metrics::REGISTRY.add(
                    "faultline_agent_faults_active",
                    &[fault.spec.kind.name()],
                    1.0,
                );
                fault.entry = Some(entry);
                fault.end_at = Instant::now() + fault.spec.duration;
                let pending = match &fault.phase {
                    Phase::Applying { revert_requested } => revert_requested.clone(),
                    _ => None,
                };
                fault.phase = Phase::Active;
                let mut r = report(pb::ReportKind::Applied, &command_id, &fault_id, &run_id);
                r.detail = detail;
                r.resolved_target = resolved;
                self.send_report(r).await;
                if let Some(why) = pending {
                    self.start_revert(&fault_id, why);
                }
            }
            Err(detail) => {
                self.faults.remove(&fault_id);
                let mut r = report(pb::ReportKind::ApplyFailed, &command_id, &fault_id, &run_id);
                r.detail = detail;
                self.send_report(r).await;
            }
        }
    }

    async fn on_revert_done(
        &mut self,
        fault_id: String,
        why: String,
        result: Result<String, String>,
    ) {
        let Some(fault) = self.faults.get_mut(&fault_id) else {
            return;
        };
        let command_id = fault
            .revert_command
            .clone()
            .unwrap_or_else(|| fault.command_id.clone());
        let run_id = fault.run_id.clone();
        let resolved = fault
            .entry
            .as_ref()
            .map(|e| e.resolved.to_string())
            .unwrap_or_default();
        match result {
            Ok(detail) => {
                crate::metrics::REGISTRY.add(
                    "faultline_agent_faults_active",
                    &[fault.spec.kind.name()],
                    -1.0,
                );
                crate::metrics::REGISTRY.add("faultline_agent_reverts_total", &[why.as_str()], 1.0);
                self.faults.remove(&fault_id);
                let mut r = report(pb::ReportKind::Reverted, &command_id, &fault_id, &run_id);
                r.detail = detail;
                r.revert_reason = why;
                r.resolved_target = resolved;
                self.send_report(r).await;
            }
            Err(detail) => {
                crate::metrics::REGISTRY.add("faultline_agent_revert_failures_total", &[], 1.0);
                let attempts = match &fault.phase {
                    Phase::RetryRevert { attempts, .. } => attempts + 1,
                    _ => 1,
                };
                tracing::error!(fault = %fault_id, attempts, "revert failed, will retry: {detail}");
                fault.phase = Phase::RetryRevert {
                    at: Instant::now() + REVERT_RETRY,
                    reason: why.clone(),
                    attempts,
                };
                // Report the first failure and then every tenth, not every two seconds.
                if attempts == 1 || attempts % 10 == 0 {
                    let mut r = report(
                        pb::ReportKind::RevertFailed,
                        &command_id,
                        &fault_id,
                        &run_id,
                    );
                    r.detail = format!("{detail} (attempt {attempts}; retrying every 2s)");
                    r.revert_reason = why;
                    r.resolved_target = resolved;
                    self.send_report(r).await;
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use faultline_domain::fault::{FaultKind, Signal, TargetSelector};

    use super::*;
    use crate::faults::container::ContainerUndo;
    use crate::faults::{Resolved, Undo};
    use crate::runtime::ContainerState;
    use crate::runtime::fake::FakeRuntime;
    use crate::sys::command::RecordingRunner;

    fn backends(runtime: &Arc<FakeRuntime>) -> Backends<FakeRuntime, RecordingRunner> {
        Backends {
            runtime: Arc::clone(runtime),
            commands: Arc::new(RecordingRunner::new()),
            caps: Arc::new(crate::preflight::HostCaps::everything_for_tests()),
            agent: "agent-test".into(),
            protect: Vec::new(),
            agent_exe: "/nonexistent/faultline-agent".into(),
        }
    }

    fn apply_cmd(
        fault_id: &str,
        kind: FaultKind,
        duration: Duration,
        lease: Duration,
    ) -> VerifiedCommand {
        VerifiedCommand {
            command_id: format!("c-{fault_id}"),
            run_id: "run".into(),
            action: Action::Apply {
                fault_id: fault_id.into(),
                spec: FaultSpec {
                    kind,
                    target: TargetSelector::Container("db".into()),
                    duration,
                },
                lease,
            },
            traceparent: String::new(),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<pb::CommandReport>) -> pb::CommandReport {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    fn kind(r: &pb::CommandReport) -> pb::ReportKind {
        pb::ReportKind::try_from(r.kind).unwrap()
    }

    fn setup() -> (Arc<FakeRuntime>, tempfile::TempDir, Journal) {
        let runtime =
            Arc::new(FakeRuntime::default().with_container("db", &[], ContainerState::Running));
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        (runtime, dir, journal)
    }

    #[tokio::test(start_paused = true)]
    async fn pause_is_journaled_verified_and_reverted_on_schedule() {
        let (runtime, _dir, journal) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let engine = EngineHandle::spawn(backends(&runtime), journal.clone(), tx);
        let long_lease = Duration::from_secs(60);
        engine
            .command(apply_cmd(
                "f",
                FaultKind::ContainerPause,
                Duration::from_secs(3),
                long_lease,
            ))
            .await;
        let applied = next(&mut rx).await;
        assert_eq!(kind(&applied), pb::ReportKind::Applied, "{applied:?}");
        assert!(applied.detail.contains("verified"), "{}", applied.detail);
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Paused));
        assert_eq!(journal.entries().unwrap().len(), 1);

        let reverted = next(&mut rx).await;
        assert_eq!(kind(&reverted), pb::ReportKind::Reverted);
        assert_eq!(reverted.revert_reason, reason::SCHEDULE);
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Running));
        assert!(journal.entries().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unrenewed_lease_reverts_before_the_schedule_and_renewals_extend_it() {
        let (runtime, _dir, journal) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let engine = EngineHandle::spawn(backends(&runtime), journal, tx);
        let lease = Duration::from_secs(2);
        engine
            .command(apply_cmd(
                "f",
                FaultKind::ContainerPause,
                Duration::from_secs(600),
                lease,
            ))
            .await;
        assert_eq!(kind(&next(&mut rx).await), pb::ReportKind::Applied);
        let started = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let renew = VerifiedCommand {
                command_id: "renew".into(),
                run_id: String::new(),
                action: Action::Renew {
                    fault_ids: vec!["f".into()],
                    lease,
                },
                traceparent: String::new(),
            };
            engine.command(renew).await;
        }
        assert_eq!(
            runtime.state_of("db"),
            Some(ContainerState::Paused),
            "renewed lease holds"
        );
        let reverted = next(&mut rx).await;
        assert_eq!(reverted.revert_reason, reason::LEASE);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Running));
    }

    #[tokio::test(start_paused = true)]
    async fn journaled_faults_are_reverted_on_start() {
        let (runtime, _dir, journal) = setup();
        runtime.set_state("db", ContainerState::Paused);
        let container = runtime
            .resolve(&TargetSelector::Container("db".into()))
            .await
            .unwrap();
        journal
            .record(&JournalEntry {
                fault_id: "old".into(),
                command_id: "c-old".into(),
                run_id: "run-old".into(),
                spec: FaultSpec {
                    kind: FaultKind::ContainerPause,
                    target: TargetSelector::Container("db".into()),
                    duration: Duration::from_secs(60),
                },
                undo: Undo::Container(ContainerUndo::Unpause {
                    id: container.id.clone(),
                }),
                resolved: Resolved {
                    container: Some(container),
                    ..Default::default()
                },
                mechanism: "docker pause".into(),
                journaled_at_ms: 1,
            })
            .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _engine = EngineHandle::spawn(backends(&runtime), journal.clone(), tx);
        let reverted = next(&mut rx).await;
        assert_eq!(
            (kind(&reverted), reverted.revert_reason.as_str()),
            (pb::ReportKind::Reverted, reason::RECOVERY)
        );
        assert_eq!(reverted.run_id, "run-old");
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Running));
        assert!(journal.entries().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_revert_keeps_the_journal_entry_and_is_retried() {
        let (runtime, _dir, journal) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let engine = EngineHandle::spawn(backends(&runtime), journal.clone(), tx);
        engine
            .command(apply_cmd(
                "f",
                FaultKind::ContainerPause,
                Duration::from_secs(1),
                Duration::from_secs(60),
            ))
            .await;
        assert_eq!(kind(&next(&mut rx).await), pb::ReportKind::Applied);
        runtime.fail_next("unpause");
        let failed = next(&mut rx).await;
        assert_eq!(kind(&failed), pb::ReportKind::RevertFailed, "{failed:?}");
        assert_eq!(
            journal.entries().unwrap().len(),
            1,
            "entry kept until the revert succeeds"
        );
        let reverted = next(&mut rx).await;
        assert_eq!(kind(&reverted), pb::ReportKind::Reverted);
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Running));
        assert!(journal.entries().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_apply_leaves_nothing_applied_or_journaled() {
        let (runtime, _dir, journal) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let engine = EngineHandle::spawn(backends(&runtime), journal.clone(), tx);
        runtime.fail_next("pause");
        engine
            .command(apply_cmd(
                "f",
                FaultKind::ContainerPause,
                Duration::from_secs(1),
                Duration::from_secs(60),
            ))
            .await;
        let failed = next(&mut rx).await;
        assert_eq!(kind(&failed), pb::ReportKind::ApplyFailed);
        assert!(
            failed.detail.contains("state restored"),
            "{}",
            failed.detail
        );
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Running));
        assert!(journal.entries().unwrap().is_empty());
        assert!(engine.active_ids().await.is_empty());

        // A target that is not running is refused before anything is journaled.
        runtime.set_state("db", ContainerState::Stopped);
        engine
            .command(apply_cmd(
                "g",
                FaultKind::ContainerPause,
                Duration::from_secs(1),
                Duration::from_secs(60),
            ))
            .await;
        let failed = next(&mut rx).await;
        assert!(failed.detail.contains("not running"), "{}", failed.detail);
        assert!(journal.entries().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn revert_requests_are_idempotent_and_shutdown_reverts_everything() {
        let (runtime, _dir, journal) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let engine = EngineHandle::spawn(backends(&runtime), journal.clone(), tx);
        let kill = FaultKind::ContainerKill {
            signal: Signal::KILL,
            restart_on_revert: true,
        };
        engine
            .command(apply_cmd(
                "k",
                kill,
                Duration::from_secs(600),
                Duration::from_secs(60),
            ))
            .await;
        assert_eq!(kind(&next(&mut rx).await), pb::ReportKind::Applied);
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Stopped));

        let unknown = VerifiedCommand {
            command_id: "r".into(),
            run_id: "run".into(),
            action: Action::Revert {
                fault_id: "nope".into(),
                reason: "halt".into(),
            },
            traceparent: String::new(),
        };
        engine.command(unknown).await;
        let noop = next(&mut rx).await;
        assert_eq!(kind(&noop), pb::ReportKind::Reverted);
        assert!(noop.detail.contains("not in force"));

        engine.shutdown().await;
        let reverted = next(&mut rx).await;
        assert_eq!(reverted.revert_reason, reason::SHUTDOWN);
        assert_eq!(runtime.state_of("db"), Some(ContainerState::Running));
        assert!(journal.entries().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_revert_command_is_answered_under_its_own_id() {
        let (runtime, _dir, journal) = setup();
        let (tx, mut rx) = mpsc::channel(16);
        let engine = EngineHandle::spawn(backends(&runtime), journal, tx);
        let long = Duration::from_secs(600);
        engine
            .command(apply_cmd("f", FaultKind::ContainerPause, long, long))
            .await;
        assert_eq!(kind(&next(&mut rx).await), pb::ReportKind::Applied);
        let revert = VerifiedCommand {
            command_id: "undo-1".into(),
            run_id: "run".into(),
            action: Action::Revert {
                fault_id: "f".into(),
                reason: "halt".into(),
            },
            traceparent: String::new(),
        };
        engine.command(revert).await;
        let reverted = next(&mut rx).await;
        assert_eq!(kind(&reverted), pb::ReportKind::Reverted);
        assert_eq!(
            (reverted.command_id.as_str(), reverted.fault_id.as_str()),
            ("undo-1", "f")
        );
        assert_eq!(reverted.revert_reason, "halt");
    }
}
