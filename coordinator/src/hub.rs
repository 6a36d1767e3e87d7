//! The hub: one actor that owns the coordinator's live state — connected agents and their
//! outbound streams, faults in flight and their leases, the cancel switches of active runs and
//! the targets each run holds ([`TargetLocks`]).
//! gRPC handlers and run tasks talk to it through [`HubHandle`]; it never waits on anything but
//! its own mailbox, so a slow agent cannot stall it.
//!
//! Every command leaves here signed. Reports from agents are fanned out on a broadcast channel
//! that run tasks and halts subscribe to before they send, so no report can be missed.
//!
//! `command` steady-state probes are request/response: [`HubHandle::probe`] sends a signed
//! command carrying a `ProbeRequest` and waits for the `ProbeResult` whose `request_id` is that
//! command's id. The hub keeps the waiters by request id; an answer from any other agent than
//! the one asked is ignored, and a refusal, a disconnect or the deadline ends the wait.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use faultline_domain::interlock::{Conflict, TargetLocks};
use faultline_domain::plan::Plan;
use faultline_proto::v1 as pb;
use prost::Message;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::Status;

use crate::clock::now_ms;
use crate::store::Store;

/// How long a command stays valid after it is issued.
pub const COMMAND_VALIDITY: Duration = Duration::from_secs(30);
/// How often the hub looks for leases due for renewal (and for probe waiters to forget).
const RENEW_TICK: Duration = Duration::from_millis(250);
/// How much longer than a probe's own time-out the coordinator waits for its result: the agent
/// kills the program at the time-out, then the result still has to travel.
pub const PROBE_ANSWER_GRACE: Duration = Duration::from_secs(2);

/// Outbound half of an agent's stream.
pub type AgentSender = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// A report from an agent, as fanned out to subscribers.
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub agent: String,
    pub report: pb::CommandReport,
}

/// What the coordinator knows about a connected agent.
#[derive(Debug, Clone)]
pub struct AgentSession {
    pub name: String,
    pub version: String,
    pub host: Option<pb::HostFacts>,
    pub capabilities: Vec<pb::Capability>,
    pub peer_address: String,
    pub connected_at_ms: i64,
    pub last_seen_ms: i64,
    pub active_faults: u32,
}

/// A fault the hub believes may be applied on an agent: sent and not yet reported reverted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedFault {
    pub fault_id: String,
    pub agent: String,
    pub run_id: String,
    pub lease_ms: u64,
    last_renewed_ms: i64,
}

/// Why a command could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {0}'s stream closed while sending")]
    StreamClosed(String),
    #[error("coordinator is shutting down")]
    HubGone,
}

/// Why a probe request got no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("agent {0} not connected")]
    NotConnected(String),
    #[error("agent {0}'s stream closed while sending the request")]
    StreamClosed(String),
    #[error("agent {agent} refused the request: {detail}")]
    Refused { agent: String, detail: String },
    #[error("agent {0} disconnected before answering")]
    Disconnected(String),
    #[error("agent {0} answered with a result of another kind")]
    WrongAnswer(String),
    #[error("no answer from agent {agent} within {waited:?}")]
    NoAnswer { agent: String, waited: Duration },
    #[error("coordinator is shutting down")]
    HubGone,
}

impl From<SendError> for ProbeError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::NotConnected(agent) => ProbeError::NotConnected(agent),
            SendError::StreamClosed(agent) => ProbeError::StreamClosed(agent),
            SendError::HubGone => ProbeError::HubGone,
        }
    }
}

/// What an agent answers to a request (a command that is not a fault command).
#[derive(Debug)]
enum Answer {
    Probe(pb::ProbeResult),
    DryRun(pb::DryRunResult),
}

type ProbeReply = oneshot::Sender<Result<Answer, ProbeError>>;

/// Someone waiting for the answer to a probe or dry-run request.
struct PendingProbe {
    agent: String,
    /// Forgotten after this (the waiter has given up by then).
    deadline: Instant,
    reply: ProbeReply,
}

/// Why a run's targets were not locked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("other runs are faulting some of the plan's targets")]
    Conflicts(Vec<Conflict>),
    #[error("coordinator is shutting down")]
    HubGone,
}

enum HubMsg {
    Connected {
        session: AgentSession,
        outbound: AgentSender,
        conn_id: u64,
    },
    Disconnected {
        name: String,
        conn_id: u64,
    },
    Heartbeat {
        name: String,
        active_faults: u32,
    },
    Report(AgentReport),
    ListSessions {
        reply: oneshot::Sender<Vec<AgentSession>>,
    },
    Send {
        agent: String,
        run_id: String,
        action: pb::command::Action,
        /// W3C traceparent of the caller's span (empty when traces are off).
        traceparent: String,
        reply: oneshot::Sender<Result<String, SendError>>,
    },
    Tracked {
        reply: oneshot::Sender<Vec<TrackedFault>>,
    },
    Probe {
        agent: String,
        request: pb::command::Action,
        deadline: Instant,
        reply: ProbeReply,
    },
    ProbeResult {
        agent: String,
        request_id: String,
        result: Answer,
    },
    LockTargets {
        run_id: String,
        plan: Box<Plan>,
        reply: oneshot::Sender<Result<(), Vec<Conflict>>>,
    },
    RegisterRun {
        run_id: String,
        cancel: watch::Sender<Option<String>>,
    },
    UnregisterRun {
        run_id: String,
    },
    CancelRuns {
        reason: String,
        reply: oneshot::Sender<Vec<String>>,
    },
}

/// Cheap, cloneable access to the hub.
#[derive(Clone, Debug)]
pub struct HubHandle {
    tx: mpsc::Sender<HubMsg>,
    reports: broadcast::Sender<AgentReport>,
}

impl std::fmt::Debug for HubMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubMsg")
    }
}

impl HubHandle {
    /// Starts the hub actor.
    pub fn spawn(signing_key: SigningKey, store: Store) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let (reports, _) = broadcast::channel(4096);
        let hub = Hub {
            signing_key,
            store,
            sessions: BTreeMap::new(),
            tracked: BTreeMap::new(),
            runs: HashMap::new(),
            locks: TargetLocks::new(),
            reports: reports.clone(),
            probes: HashMap::new(),
        };
        tokio::spawn(hub.run(rx));
        Self { tx, reports }
    }

    /// Subscribe before sending a command whose report you will wait for.
    pub fn subscribe_reports(&self) -> broadcast::Receiver<AgentReport> {
        self.reports.subscribe()
    }

    pub async fn connected(&self, session: AgentSession, outbound: AgentSender, conn_id: u64) {
        let _ = self
            .tx
            .send(HubMsg::Connected {
                session,
                outbound,
                conn_id,
            })
            .await;
    }

    pub async fn disconnected(&self, name: String, conn_id: u64) {
        let _ = self.tx.send(HubMsg::Disconnected { name, conn_id }).await;
    }

    pub async fn heartbeat(&self, name: String, active_faults: u32) {
        let _ = self
            .tx
            .send(HubMsg::Heartbeat {
                name,
                active_faults,
            })
            .await;
    }

    pub async fn report(&self, report: AgentReport) {
        let _ = self.tx.send(HubMsg::Report(report)).await;
    }

    pub async fn sessions(&self) -> Vec<AgentSession> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(HubMsg::ListSessions { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Signs and sends a command to `agent`; returns its command id.
    pub async fn send(
        &self,
        agent: &str,
        run_id: &str,
        action: pb::command::Action,
    ) -> Result<String, SendError> {
        let (reply, rx) = oneshot::channel();
        let msg = HubMsg::Send {
            agent: agent.into(),
            run_id: run_id.into(),
            action,
            traceparent: crate::observability::traceparent_of(&tracing::Span::current()),
            reply,
        };
        self.tx.send(msg).await.map_err(|_| SendError::HubGone)?;
        rx.await.map_err(|_| SendError::HubGone)?
    }

    /// Has `agent` run `argv` (signed like any command) and waits for its result: at most
    /// `timeout` (the agent kills the program then) plus [`PROBE_ANSWER_GRACE`].
    pub async fn probe(
        &self,
        agent: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<pb::ProbeResult, ProbeError> {
        let waited = timeout + PROBE_ANSWER_GRACE;
        let deadline = Instant::now() + waited;
        let (reply, rx) = oneshot::channel();
        let msg = HubMsg::Probe {
            agent: agent.into(),
            request: pb::command::Action::Probe(pb::ProbeRequest {
                argv,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            deadline,
            reply,
        };
        self.tx.send(msg).await.map_err(|_| ProbeError::HubGone)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(Answer::Probe(result)))) => Ok(result),
            Ok(Ok(Ok(Answer::DryRun(_)))) => Err(ProbeError::WrongAnswer(agent.into())),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(ProbeError::HubGone),
            Err(_) => Err(ProbeError::NoAnswer {
                agent: agent.into(),
                waited,
            }),
        }
    }

    /// Has `agent` resolve and prepare `request`'s fault without applying it (signed like any
    /// command) and waits at most `waited` for what it would do.
    pub async fn dry_run(
        &self,
        agent: &str,
        request: pb::DryRunFault,
        waited: Duration,
    ) -> Result<pb::DryRunResult, ProbeError> {
        let deadline = Instant::now() + waited;
        let (reply, rx) = oneshot::channel();
        let msg = HubMsg::Probe {
            agent: agent.into(),
            request: pb::command::Action::DryRun(request),
            deadline,
            reply,
        };
        self.tx.send(msg).await.map_err(|_| ProbeError::HubGone)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(Answer::DryRun(result)))) => Ok(result),
            Ok(Ok(Ok(Answer::Probe(_)))) => Err(ProbeError::WrongAnswer(agent.into())),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(ProbeError::HubGone),
            Err(_) => Err(ProbeError::NoAnswer {
                agent: agent.into(),
                waited,
            }),
        }
    }

    /// A probe result that arrived from `agent`.
    pub async fn probe_result(&self, agent: String, result: pb::ProbeResult) {
        let request_id = result.request_id.clone();
        let result = Answer::Probe(result);
        let msg = HubMsg::ProbeResult {
            agent,
            request_id,
            result,
        };
        let _ = self.tx.send(msg).await;
    }

    /// A dry-run result that arrived from `agent`.
    pub async fn dry_run_result(&self, agent: String, result: pb::DryRunResult) {
        let request_id = result.request_id.clone();
        let result = Answer::DryRun(result);
        let msg = HubMsg::ProbeResult {
            agent,
            request_id,
            result,
        };
        let _ = self.tx.send(msg).await;
    }

    /// Faults that may still be applied somewhere.
    pub async fn tracked_faults(&self) -> Vec<TrackedFault> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(HubMsg::Tracked { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Locks every target of `plan` for `run_id`, or none: refused with every conflict when
    /// another run holds one of them. [`HubHandle::unregister_run`] releases them.
    pub async fn lock_targets(&self, run_id: &str, plan: &Plan) -> Result<(), LockError> {
        let (reply, rx) = oneshot::channel();
        let msg = HubMsg::LockTargets {
            run_id: run_id.into(),
            plan: Box::new(plan.clone()),
            reply,
        };
        self.tx.send(msg).await.map_err(|_| LockError::HubGone)?;
        rx.await
            .map_err(|_| LockError::HubGone)?
            .map_err(LockError::Conflicts)
    }

    pub async fn register_run(&self, run_id: &str, cancel: watch::Sender<Option<String>>) {
        let _ = self
            .tx
            .send(HubMsg::RegisterRun {
                run_id: run_id.into(),
                cancel,
            })
            .await;
    }

    /// Forgets a run that ended (or never started): drops its cancel switch and releases its
    /// target locks.
    pub async fn unregister_run(&self, run_id: &str) {
        let _ = self
            .tx
            .send(HubMsg::UnregisterRun {
                run_id: run_id.into(),
            })
            .await;
    }

    /// Cancels every active run with `reason`; returns their ids.
    pub async fn cancel_runs(&self, reason: &str) -> Vec<String> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(HubMsg::CancelRuns {
                reason: reason.into(),
                reply,
            })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

struct Connection {
    session: AgentSession,
    outbound: AgentSender,
    conn_id: u64,
}

struct Hub {
    signing_key: SigningKey,
    store: Store,
    sessions: BTreeMap<String, Connection>,
    tracked: BTreeMap<String, TrackedFault>,
    runs: HashMap<String, watch::Sender<Option<String>>>,
    /// Targets held by runs, from admission until they are unregistered.
    locks: TargetLocks,
    reports: broadcast::Sender<AgentReport>,
    /// Probe requests sent and not yet answered, by request (command) id.
    probes: HashMap<String, PendingProbe>,
}

impl Hub {
    async fn run(mut self, mut rx: mpsc::Receiver<HubMsg>) {
        let mut tick = tokio::time::interval(RENEW_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => return,
                },
                _ = tick.tick() => {
                    self.forget_expired_probes();
                    self.renew_due_leases().await;
                }
            }
        }
    }

    async fn handle(&mut self, msg: HubMsg) {
        match msg {
            HubMsg::Connected {
                session,
                outbound,
                conn_id,
            } => {
                let name = session.name.clone();
                if let Some(previous) = self.sessions.insert(
                    name.clone(),
                    Connection {
                        session,
                        outbound,
                        conn_id,
                    },
                ) {
                    tracing::warn!(agent = %name, old = previous.conn_id, new = conn_id,
                        "agent reconnected; replacing its previous stream");
                    // Results of probes sent on the old stream cannot come back on the new one.
                    self.fail_probes_of(&name);
                }
                crate::metrics::REGISTRY.set(
                    "faultline_agents_connected",
                    &[],
                    self.sessions.len() as f64,
                );
            }
            HubMsg::Disconnected { name, conn_id } => {
                // A late disconnect of a replaced stream must not drop the new one.
                if self
                    .sessions
                    .get(&name)
                    .is_some_and(|c| c.conn_id == conn_id)
                {
                    self.sessions.remove(&name);
                    tracing::info!(agent = %name, "agent disconnected");
                    self.fail_probes_of(&name);
                    crate::metrics::REGISTRY.set(
                        "faultline_agents_connected",
                        &[],
                        self.sessions.len() as f64,
                    );
                }
            }
            HubMsg::Heartbeat {
                name,
                active_faults,
            } => {
                if let Some(conn) = self.sessions.get_mut(&name) {
                    conn.session.last_seen_ms = now_ms();
                    conn.session.active_faults = active_faults;
                }
            }
            HubMsg::Report(report) => self.on_report(report),
            HubMsg::ListSessions { reply } => {
                let _ = reply.send(self.sessions.values().map(|c| c.session.clone()).collect());
            }
            HubMsg::Send {
                agent,
                run_id,
                action,
                traceparent,
                reply,
            } => {
                let result = self
                    .send_command_traced(&agent, &run_id, action, traceparent)
                    .await;
                let _ = reply.send(result);
            }
            HubMsg::Tracked { reply } => {
                let _ = reply.send(self.tracked.values().cloned().collect());
            }
            HubMsg::Probe {
                agent,
                request,
                deadline,
                reply,
            } => match self.send_command(&agent, "", request).await {
                Ok(request_id) => {
                    self.probes.insert(
                        request_id,
                        PendingProbe {
                            agent,
                            deadline,
                            reply,
                        },
                    );
                }
                Err(err) => {
                    let _ = reply.send(Err(err.into()));
                }
            },
            HubMsg::ProbeResult {
                agent,
                request_id,
                result,
            } => self.on_probe_result(&agent, &request_id, result),
            HubMsg::LockTargets {
                run_id,
                plan,
                reply,
            } => {
                let _ = reply.send(self.locks.try_lock(&run_id, &plan));
            }
            HubMsg::RegisterRun { run_id, cancel } => {
                self.runs.insert(run_id, cancel);
            }
            HubMsg::UnregisterRun { run_id } => {
                self.runs.remove(&run_id);
                let released = self.locks.release(&run_id);
                if released > 0 {
                    tracing::debug!(run = %run_id, released, "target locks released");
                }
            }
            HubMsg::CancelRuns { reason, reply } => {
                let ids: Vec<String> = self.runs.keys().cloned().collect();
                for cancel in self.runs.values() {
                    let _ = cancel.send(Some(reason.clone()));
                }
                let _ = reply.send(ids);
            }
        }
    }

    fn on_probe_result(&mut self, agent: &str, request_id: &str, result: Answer) {
        match self.probes.get(request_id) {
            Some(pending) if pending.agent == agent => {
                if let Some(pending) = self.probes.remove(request_id) {
                    let _ = pending.reply.send(Ok(result));
                }
            }
            Some(pending) => {
                tracing::warn!(%agent, asked = %pending.agent, request = %request_id,
                    "ignoring a result from an agent that was not asked");
            }
            None => {
                tracing::debug!(%agent, request = %request_id,
                    "result after its waiter gave up");
            }
        }
    }

    /// Ends the wait of every probe sent to `agent`: its stream is gone.
    fn fail_probes_of(&mut self, agent: &str) {
        let ids: Vec<String> = self
            .probes
            .iter()
            .filter(|(_, pending)| pending.agent == agent)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(pending) = self.probes.remove(&id) {
                let _ = pending
                    .reply
                    .send(Err(ProbeError::Disconnected(agent.to_string())));
            }
        }
    }

    /// Forgets waiters that gave up (or whose deadline passed without an answer).
    fn forget_expired_probes(&mut self) {
        let now = Instant::now();
        self.probes
            .retain(|_, pending| now < pending.deadline && !pending.reply.is_closed());
    }

    fn on_report(&mut self, report: AgentReport) {
        let kind = pb::ReportKind::try_from(report.report.kind).unwrap_or_default();
        if kind == pb::ReportKind::Refused
            && self
                .probes
                .get(&report.report.command_id)
                .is_some_and(|pending| pending.agent == report.agent)
            && let Some(pending) = self.probes.remove(&report.report.command_id)
        {
            let _ = pending.reply.send(Err(ProbeError::Refused {
                agent: report.agent.clone(),
                detail: report.report.detail.clone(),
            }));
        }
        let fault_id = &report.report.fault_id;
        match kind {
            pb::ReportKind::Reverted if !report.report.revert_reason.is_empty() => {
                let reason = report.report.revert_reason.as_str();
                crate::metrics::REGISTRY.add("faultline_reverts_total", &[reason], 1.0);
            }
            pb::ReportKind::RevertFailed => {
                crate::metrics::REGISTRY.add("faultline_revert_failures_total", &[], 1.0);
            }
            _ => {}
        }
        match kind {
            pb::ReportKind::Reverted | pb::ReportKind::ApplyFailed | pb::ReportKind::Refused => {
                self.tracked.remove(fault_id);
            }
            pb::ReportKind::Applied => {
                if let Some(fault) = self.tracked.get_mut(fault_id) {
                    fault.last_renewed_ms = now_ms();
                }
            }
            _ => {}
        }
        if kind == pb::ReportKind::Refused {
            // Refusals are security events: they go to the audit log, not just the run.
            let store = self.store.clone();
            let actor = format!("agent/{}", report.agent);
            let detail = format!(
                "command {}: {}",
                report.report.command_id, report.report.detail
            );
            tokio::spawn(async move {
                if let Err(err) = store
                    .audit(now_ms(), &actor, "command-refused", "refused", &detail)
                    .await
                {
                    tracing::error!(%err, "could not write audit entry");
                }
            });
        }
        // No subscriber is fine: nobody is waiting for this report.
        let _ = self.reports.send(report);
    }

    async fn send_command(
        &mut self,
        agent: &str,
        run_id: &str,
        action: pb::command::Action,
    ) -> Result<String, SendError> {
        self.send_command_traced(agent, run_id, action, String::new())
            .await
    }

    async fn send_command_traced(
        &mut self,
        agent: &str,
        run_id: &str,
        action: pb::command::Action,
        traceparent: String,
    ) -> Result<String, SendError> {
        let Some(conn) = self.sessions.get(agent) else {
            return Err(SendError::NotConnected(agent.to_string()));
        };
        let (signed, command_id) = sign_command_traced(
            &self.signing_key,
            agent,
            run_id,
            action.clone(),
            traceparent,
        );
        let summary = describe_action(&action);
        if let pb::command::Action::Apply(apply) = &action {
            // Tracked from the moment it is sent: an apply whose report is lost may still have
            // happened, and must be renewed/reverted like any other.
            self.tracked.insert(
                apply.fault_id.clone(),
                TrackedFault {
                    fault_id: apply.fault_id.clone(),
                    agent: agent.to_string(),
                    run_id: run_id.to_string(),
                    lease_ms: apply.lease_ms,
                    last_renewed_ms: now_ms(),
                },
            );
        }
        let message = pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Command(signed)),
        };
        let sent = conn.outbound.send(Ok(message)).await;
        if sent.is_ok() {
            let action_label = crate::metrics::action_label(&action);
            crate::metrics::REGISTRY.add("faultline_commands_sent_total", &[action_label], 1.0);
            if action_label == "renew" {
                crate::metrics::REGISTRY.add("faultline_lease_renewals_total", &[], 1.0);
            }
        }
        let store = self.store.clone();
        let (actor, agent_name) = ("coordinator".to_string(), agent.to_string());
        let (outcome, detail) = match &sent {
            Ok(()) => (
                "ok",
                format!("to agent/{agent_name} run {run_id}: {summary}"),
            ),
            Err(_) => (
                "failed",
                format!("to agent/{agent_name}: stream closed: {summary}"),
            ),
        };
        let detail = format!("command {command_id} {detail}");
        tokio::spawn(async move {
            if let Err(err) = store
                .audit(now_ms(), &actor, "command-sent", outcome, &detail)
                .await
            {
                tracing::error!(%err, "could not write audit entry");
            }
        });
        sent.map_err(|_| SendError::StreamClosed(agent.to_string()))?;
        Ok(command_id)
    }

    async fn renew_due_leases(&mut self) {
        let now = now_ms();
        let mut due: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for fault in self.tracked.values_mut() {
            // Renew at a third of the lease so two renewals can be lost before it runs out.
            let interval = (fault.lease_ms / 3).max(100) as i64;
            if now - fault.last_renewed_ms >= interval {
                fault.last_renewed_ms = now;
                due.entry((fault.agent.clone(), fault.lease_ms))
                    .or_default()
                    .push(fault.fault_id.clone());
            }
        }
        for ((agent, lease_ms), fault_ids) in due {
            if !self.sessions.contains_key(&agent) {
                // Cannot renew: the agent's own lease will revert these faults.
                continue;
            }
            let action = pb::command::Action::Renew(pb::RenewLeases {
                fault_ids,
                lease_ms,
            });
            if let Err(err) = self.send_command(&agent, "", action).await {
                tracing::warn!(%agent, %err, "lease renewal not sent");
            }
        }
    }
}

/// Builds and signs a command: the signature covers the exact encoded bytes.
pub fn sign_command(
    key: &SigningKey,
    agent: &str,
    run_id: &str,
    action: pb::command::Action,
) -> (pb::SignedCommand, String) {
    sign_command_traced(key, agent, run_id, action, String::new())
}

/// [`sign_command`] carrying the W3C `traceparent` of the span it belongs to (signed too).
pub fn sign_command_traced(
    key: &SigningKey,
    agent: &str,
    run_id: &str,
    action: pb::command::Action,
    traceparent: String,
) -> (pb::SignedCommand, String) {
    let command_id = uuid::Uuid::now_v7().to_string();
    let issued_at = now_ms();
    let command = pb::Command {
        command_id: command_id.clone(),
        run_id: run_id.to_string(),
        target_agent: agent.to_string(),
        issued_at_unix_ms: issued_at,
        not_after_unix_ms: issued_at + COMMAND_VALIDITY.as_millis() as i64,
        nonce: random_nonce(),
        traceparent,
        action: Some(action),
    };
    let bytes = command.encode_to_vec();
    let signature = faultline_domain::command::sign(key, &bytes);
    (
        pb::SignedCommand {
            command: bytes,
            signature,
        },
        command_id,
    )
}

fn random_nonce() -> Vec<u8> {
    let mut nonce = vec![0u8; 16];
    // The OS RNG only fails on a broken system; a time-derived fallback would be guessable,
    // so fall back to the uuid's random bits (v4 is OS-random too) rather than to zeros.
    if getrandom::fill(&mut nonce).is_err() {
        nonce = uuid::Uuid::new_v4().as_bytes().to_vec();
    }
    nonce
}

fn describe_action(action: &pb::command::Action) -> String {
    match action {
        pb::command::Action::Apply(apply) => format!(
            "apply fault {} for {} ms (lease {} ms)",
            apply.fault_id, apply.duration_ms, apply.lease_ms
        ),
        pb::command::Action::Revert(revert) => {
            format!("revert fault {} ({})", revert.fault_id, revert.reason)
        }
        pb::command::Action::Renew(renew) => {
            format!(
                "renew {} lease(s) for {} ms",
                renew.fault_ids.len(),
                renew.lease_ms
            )
        }
        pb::command::Action::Probe(probe) => {
            format!(
                "run probe {:?} (timeout {} ms)",
                probe.argv, probe.timeout_ms
            )
        }
        pb::command::Action::DryRun(dry_run) => {
            format!("dry-run fault {}", dry_run.fault_id)
        }
        pb::command::Action::TelemetrySubscribe(subscribe) => format!(
            "subscribe to telemetry of {} target(s) every {} ms",
            subscribe.targets.len(),
            subscribe.interval_ms
        ),
        pb::command::Action::TelemetryUnsubscribe(_) => "unsubscribe from telemetry".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(fault_id: &str) -> AgentReport {
        AgentReport {
            agent: "agent-1".into(),
            report: pb::CommandReport {
                command_id: "c-9".into(),
                fault_id: fault_id.into(),
                kind: pb::ReportKind::Refused as i32,
                detail: "command c-9 replays nonce 07…, already seen".into(),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn a_refusal_reported_by_an_agent_lands_in_the_audit_log_and_reaches_subscribers() {
        let store = Store::open_in_memory().unwrap();
        let hub = HubHandle::spawn(SigningKey::from_bytes(&[1; 32]), store.clone());
        let mut reports = hub.subscribe_reports();
        hub.report(refused("f")).await;
        let seen = tokio::time::timeout(Duration::from_secs(5), reports.recv())
            .await
            .unwrap();
        assert_eq!(seen.unwrap().report.command_id, "c-9");
        for _ in 0..100 {
            let audit = store.list_audit(10).await.unwrap();
            if let Some(entry) = audit.iter().find(|e| e.action == "command-refused") {
                assert_eq!(
                    (entry.actor.as_str(), entry.outcome.as_str()),
                    ("agent/agent-1", "refused")
                );
                assert!(entry.detail.contains("replays nonce"), "{}", entry.detail);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("refusal never audited");
    }

    fn pause_plan(agent: &str, container: &str) -> Plan {
        let yaml = format!(
            "apiVersion: faultline/v1\ntitle: t\nstages:\n  - name: s\n    faults:\n      \
             - {{ kind: container-pause, agent: {agent}, target: {{ container: {container} }}, \
             duration: 1s }}\n"
        );
        faultline_domain::plan::parse_plan(&yaml).unwrap()
    }

    #[tokio::test]
    async fn target_locks_conflict_across_runs_until_the_holder_is_unregistered() {
        let hub = HubHandle::spawn(
            SigningKey::from_bytes(&[1; 32]),
            Store::open_in_memory().unwrap(),
        );
        let db = pause_plan("agent-1", "db");
        hub.lock_targets("run-1", &db).await.unwrap();
        hub.lock_targets("run-2", &pause_plan("agent-1", "cache"))
            .await
            .unwrap();
        hub.lock_targets("run-3", &pause_plan("agent-2", "db"))
            .await
            .unwrap();
        let Err(LockError::Conflicts(conflicts)) = hub.lock_targets("run-4", &db).await else {
            panic!("the second run on the same target must be refused");
        };
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].run_id, "run-1");
        assert_eq!(
            conflicts[0].to_string(),
            "container db on agent agent-1 is being faulted by run run-1"
        );
        // Registration is independent of locks; unregistering releases both.
        let (cancel, _watch) = watch::channel(None);
        hub.register_run("run-1", cancel).await;
        assert_eq!(hub.cancel_runs("test").await, ["run-1"]);
        hub.unregister_run("run-1").await;
        hub.lock_targets("run-4", &db).await.unwrap();
        assert!(hub.cancel_runs("test").await.is_empty());
    }

    #[tokio::test]
    async fn commands_to_absent_agents_are_not_sent_and_signatures_cover_the_exact_bytes() {
        let store = Store::open_in_memory().unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        let hub = HubHandle::spawn(key.clone(), store);
        let revert = pb::command::Action::Revert(pb::RevertFault::default());
        assert_eq!(
            hub.send("agent-9", "run", revert.clone()).await,
            Err(SendError::NotConnected("agent-9".into()))
        );
        let (signed, id) = sign_command(&key, "agent-1", "run", revert);
        faultline_domain::command::verify_signature(
            &key.verifying_key(),
            &signed.command,
            &signed.signature,
        )
        .unwrap();
        let decoded = pb::Command::decode(signed.command.as_slice()).unwrap();
        assert_eq!(
            (decoded.command_id, decoded.target_agent.as_str()),
            (id, "agent-1")
        );
        assert_eq!(decoded.nonce.len(), 16);
        assert_eq!(
            decoded.not_after_unix_ms - decoded.issued_at_unix_ms,
            30_000
        );
    }

    /// Connects a fake `agent-1` (connection `conn_id`) and returns its outbound stream.
    async fn connect(
        hub: &HubHandle,
        conn_id: u64,
    ) -> mpsc::Receiver<Result<pb::CoordinatorMessage, Status>> {
        let (outbound, inbound) = mpsc::channel(16);
        let session = AgentSession {
            name: "agent-1".into(),
            version: "test".into(),
            host: None,
            capabilities: Vec::new(),
            peer_address: String::new(),
            connected_at_ms: 0,
            last_seen_ms: 0,
            active_faults: 0,
        };
        hub.connected(session, outbound, conn_id).await;
        inbound
    }

    /// The next command on `inbound`, checked against `key` and decoded.
    async fn next_command(
        inbound: &mut mpsc::Receiver<Result<pb::CoordinatorMessage, Status>>,
        key: &SigningKey,
    ) -> pb::Command {
        let message = tokio::time::timeout(Duration::from_secs(5), inbound.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(pb::coordinator_message::Body::Command(signed)) = message.body else {
            panic!("not a command: {message:?}");
        };
        faultline_domain::command::verify_signature(
            &key.verifying_key(),
            &signed.command,
            &signed.signature,
        )
        .unwrap();
        pb::Command::decode(signed.command.as_slice()).unwrap()
    }

    #[tokio::test]
    async fn probe_requests_are_signed_commands_answered_only_by_the_agent_asked() {
        let store = Store::open_in_memory().unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        let hub = HubHandle::spawn(key.clone(), store.clone());
        let err = hub
            .probe("agent-9", vec!["/bin/true".into()], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "agent agent-9 not connected");

        let mut inbound = connect(&hub, 1).await;
        let asking = tokio::spawn({
            let hub = hub.clone();
            async move {
                hub.probe(
                    "agent-1",
                    vec!["test".into(), "-e".into(), "/x".into()],
                    Duration::from_millis(1500),
                )
                .await
            }
        });
        let command = next_command(&mut inbound, &key).await;
        assert_eq!(command.target_agent, "agent-1");
        assert_eq!(command.nonce.len(), 16);
        assert_eq!(
            command.not_after_unix_ms - command.issued_at_unix_ms,
            30_000
        );
        assert_eq!(
            command.action,
            Some(pb::command::Action::Probe(pb::ProbeRequest {
                argv: vec!["test".into(), "-e".into(), "/x".into()],
                timeout_ms: 1500,
            }))
        );
        let answer = pb::ProbeResult {
            request_id: command.command_id.clone(),
            exit_code: Some(1),
            ..Default::default()
        };
        // Another agent cannot answer for agent-1; an unknown request id is ignored.
        hub.probe_result("agent-2".into(), answer.clone()).await;
        hub.probe_result(
            "agent-1".into(),
            pb::ProbeResult {
                request_id: "unknown".into(),
                exit_code: Some(0),
                ..Default::default()
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!asking.is_finished());
        hub.probe_result("agent-1".into(), answer.clone()).await;
        assert_eq!(asking.await.unwrap(), Ok(answer));
        // The request was audited like every command.
        for _ in 0..100 {
            let audit = store.list_audit(10).await.unwrap();
            if audit.iter().any(|e| {
                e.action == "command-sent"
                    && e.detail.contains(&command.command_id)
                    && e.detail
                        .contains("run probe [\"test\", \"-e\", \"/x\"] (timeout 1500 ms)")
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("probe request never audited");
    }

    #[tokio::test]
    async fn a_refusal_or_a_disconnect_ends_a_probe_wait_and_silence_times_out() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let hub = HubHandle::spawn(key.clone(), Store::open_in_memory().unwrap());
        let probe = |timeout_ms| {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.probe(
                    "agent-1",
                    vec!["/bin/true".into()],
                    Duration::from_millis(timeout_ms),
                )
                .await
            })
        };

        let mut inbound = connect(&hub, 1).await;
        let asking = probe(1000);
        let command = next_command(&mut inbound, &key).await;
        hub.report(AgentReport {
            agent: "agent-1".into(),
            report: pb::CommandReport {
                command_id: command.command_id,
                kind: pb::ReportKind::Refused as i32,
                detail: "command c expired".into(),
                ..Default::default()
            },
        })
        .await;
        assert_eq!(
            asking.await.unwrap().unwrap_err().to_string(),
            "agent agent-1 refused the request: command c expired"
        );

        let asking = probe(1000);
        next_command(&mut inbound, &key).await;
        hub.disconnected("agent-1".into(), 1).await;
        assert_eq!(
            asking.await.unwrap(),
            Err(ProbeError::Disconnected("agent-1".into()))
        );

        let mut inbound = connect(&hub, 2).await;
        let started = std::time::Instant::now();
        let asking = probe(50);
        next_command(&mut inbound, &key).await;
        assert_eq!(
            asking.await.unwrap(),
            Err(ProbeError::NoAnswer {
                agent: "agent-1".into(),
                waited: Duration::from_millis(50) + PROBE_ANSWER_GRACE,
            })
        );
        assert!(started.elapsed() >= PROBE_ANSWER_GRACE);
    }
}
