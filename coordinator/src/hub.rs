//! The hub: one actor that owns the coordinator's live state — connected agents and their
//! outbound streams, faults in flight and their leases, the cancel switches of active runs and
//! the targets each run holds ([`TargetLocks`]).
//! gRPC handlers and run tasks talk to it through [`HubHandle`]; it never waits on anything but
//! its own mailbox, so a slow agent cannot stall it.
//!
//! Every command leaves here signed. Reports from agents are fanned out on a broadcast channel
//! that run tasks and halts subscribe to before they send, so no report can be missed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use faultline_domain::interlock::{Conflict, TargetLocks};
use faultline_domain::plan::Plan;
use faultline_proto::v1 as pb;
use prost::Message;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tonic::Status;

use crate::clock::now_ms;
use crate::store::Store;

/// How long a command stays valid after it is issued.
pub const COMMAND_VALIDITY: Duration = Duration::from_secs(30);
/// How often the hub looks for leases due for renewal.
const RENEW_TICK: Duration = Duration::from_millis(250);

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
        reply: oneshot::Sender<Result<String, SendError>>,
    },
    Tracked {
        reply: oneshot::Sender<Vec<TrackedFault>>,
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
            reply,
        };
        self.tx.send(msg).await.map_err(|_| SendError::HubGone)?;
        rx.await.map_err(|_| SendError::HubGone)?
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
                _ = tick.tick() => self.renew_due_leases().await,
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
                }
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
                reply,
            } => {
                let result = self.send_command(&agent, &run_id, action).await;
                let _ = reply.send(result);
            }
            HubMsg::Tracked { reply } => {
                let _ = reply.send(self.tracked.values().cloned().collect());
            }
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

    fn on_report(&mut self, report: AgentReport) {
        let kind = pb::ReportKind::try_from(report.report.kind).unwrap_or_default();
        let fault_id = &report.report.fault_id;
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
        let Some(conn) = self.sessions.get(agent) else {
            return Err(SendError::NotConnected(agent.to_string()));
        };
        let (signed, command_id) = sign_command(&self.signing_key, agent, run_id, action.clone());
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
    let command_id = uuid::Uuid::now_v7().to_string();
    let issued_at = now_ms();
    let command = pb::Command {
        command_id: command_id.clone(),
        run_id: run_id.to_string(),
        target_agent: agent.to_string(),
        issued_at_unix_ms: issued_at,
        not_after_unix_ms: issued_at + COMMAND_VALIDITY.as_millis() as i64,
        nonce: random_nonce(),
        traceparent: String::new(),
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
}
