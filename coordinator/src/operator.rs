//! The `Operator` gRPC edge used by the CLI: authenticates the operator certificate, audits
//! every action, converts requests and delegates to the store, the hub and run tasks.
//!
//! `StartRun` is where the safety interlocks ([`faultline_domain::interlock`]) are enforced,
//! in this order: halt-all, plan validity, pre-flight, blast radius and protection (the plan's
//! settings and the coordinator's policy), then the per-target locks held in the hub. Any
//! refusal is `FAILED_PRECONDITION` listing every reason, audited as `refused`, and leaves
//! nothing applied and no run created.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use faultline_domain::interlock::{self, HaltState, Refusal};
use faultline_domain::plan::{PlanError, Policy, parse_plan, render_errors};
use faultline_domain::preflight::{self, FAULT_CAPABILITY_PREFIX, FaultSupport, FleetSupport};
use faultline_proto::v1 as pb;
use faultline_tls::identity::{PeerIdentity, Role, peer_identity};
use futures::Stream;
use prost::Message as _;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::Auditor;
use crate::clock::now_ms;
use crate::halt;
use crate::hub::{AgentSession, HubHandle, LockError};
use crate::runner::{self, RunContext, RunEvents};
use crate::store::{
    MAX_PROBE_SAMPLES_PER_RUN, ProbeSampleRecord, RunEventRecord, RunRecord, RunState, Store,
    StoreError,
};

/// The Operator service.
#[derive(Debug, Clone)]
pub struct OperatorService {
    pub hub: HubHandle,
    pub auditor: Auditor,
    pub events: RunEvents,
    /// The coordinator's safety policy, applied to every run on top of the plan's own.
    pub policy: Arc<Policy>,
    /// Fed by the telemetry service, read by the runs' conditions.
    pub live_telemetry: crate::telemetry::LiveTelemetry,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

fn internal(err: StoreError) -> Status {
    tracing::error!(%err, "store failure");
    Status::internal(format!("coordinator store failure: {err}"))
}

fn plan_errors_to_wire(source: &str, errors: &[PlanError]) -> Vec<pb::PlanError> {
    errors
        .iter()
        .map(|e| pb::PlanError {
            source_name: source.to_string(),
            line: e.line,
            column: e.column,
            field: e.field.clone(),
            message: e.message.clone(),
        })
        .collect()
}

fn event_to_wire(
    run_id: &str,
    event: &RunEventRecord,
    final_state: Option<RunState>,
) -> pb::RunEvent {
    pb::RunEvent {
        run_id: run_id.to_string(),
        seq: event.seq,
        at_unix_ms: event.at_ms,
        kind: event.kind.clone(),
        stage: event.stage.clone(),
        agent: event.agent.clone(),
        fault_id: event.fault_id.clone(),
        message: event.message.clone(),
        final_state: final_state
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
    }
}

/// How long a dry run waits for each agent's answer.
const DRY_RUN_WAIT: Duration = Duration::from_secs(10);

/// The size a `GetRun` answer keeps within, well under a gRPC client's default 4 MiB limit.
const GET_RUN_BUDGET: usize = 3 << 20;

/// A run's samples for a `GetRun` answer whose other fields take `used` bytes. Details of ok
/// samples are left out (they restate the latency); those of failed samples are sent, oldest
/// first, while the answer stays within [`GET_RUN_BUDGET`].
fn samples_to_wire(samples: Vec<ProbeSampleRecord>, used: usize) -> Vec<pb::ProbeSampleRecord> {
    let mut details = Vec::with_capacity(samples.len());
    let mut wire: Vec<pb::ProbeSampleRecord> = samples
        .into_iter()
        .map(|sample| {
            details.push((!sample.ok).then_some(sample.detail));
            pb::ProbeSampleRecord {
                probe: sample.probe,
                at_unix_ms: sample.at_ms,
                ok: sample.ok,
                latency_ms: sample.latency_ms,
                value: sample.value,
                detail: String::new(),
            }
        })
        .collect();
    // Each sample also costs a field tag and a length prefix (at most 4 bytes together here).
    let bare: usize = wire.iter().map(|w| w.encoded_len() + 4).sum();
    let mut budget = GET_RUN_BUDGET.saturating_sub(used.saturating_add(bare));
    for (record, detail) in wire.iter_mut().zip(details) {
        // A detail costs its bytes, a tag and a length prefix.
        match detail {
            Some(detail) if detail.len() + 3 <= budget => {
                budget -= detail.len() + 3;
                record.detail = detail;
            }
            _ => {}
        }
    }
    wire
}

fn summary_to_wire(run: &RunRecord) -> pb::RunSummary {
    pb::RunSummary {
        run_id: run.id.clone(),
        title: run.title.clone(),
        state: run.state.clone(),
        created_at_unix_ms: run.created_ms,
        finished_at_unix_ms: run.finished_ms.unwrap_or(0),
        operator: run.operator.clone(),
    }
}

/// The status of a refused start: the halt's own message alone, anything else under a heading
/// that says nothing was applied, one violation per line.
fn refusal_message(refusal: &Refusal) -> String {
    match refusal.violations.as_slice() {
        [only @ interlock::Violation::Halted { .. }] => only.to_string(),
        _ => format!(
            "safety interlocks refused the plan; nothing was applied:\n  {}",
            refusal.lines().join("\n  ")
        ),
    }
}

/// What each connected agent reported it can do, per fault kind.
fn fleet_support(sessions: &[AgentSession]) -> FleetSupport {
    sessions
        .iter()
        .map(|session| {
            let faults = session
                .capabilities
                .iter()
                .filter_map(|c| {
                    let name = c.name.strip_prefix(FAULT_CAPABILITY_PREFIX)?;
                    let detail = if c.available {
                        c.mechanism.clone()
                    } else {
                        c.detail.clone()
                    };
                    Some((
                        name.to_string(),
                        FaultSupport {
                            available: c.available,
                            detail,
                        },
                    ))
                })
                .collect();
            (session.name.clone(), faults)
        })
        .collect()
}

impl OperatorService {
    fn store(&self) -> &Store {
        self.auditor.store()
    }

    /// Audits a refused start and turns it into its status.
    async fn refuse(&self, actor: &str, refusal: &Refusal) -> Status {
        let why = refusal_message(refusal);
        self.auditor.refused(actor, "start-run", &why).await;
        Status::failed_precondition(why)
    }

    /// `StartRun` for an authorized `actor`: every interlock, then the run task.
    async fn start(
        &self,
        actor: &str,
        request: pb::StartRunRequest,
    ) -> Result<pb::StartRunResponse, Status> {
        // Halt first: while it is engaged, nothing else about the plan matters.
        self.admit_start(actor).await?;
        let plan = match parse_plan(&request.plan_yaml) {
            Ok(plan) => plan,
            Err(errors) => {
                let rendered = render_errors(&request.source_name, &errors);
                self.auditor
                    .refused(actor, "start-run", &format!("invalid plan: {rendered}"))
                    .await;
                return Err(Status::invalid_argument(format!(
                    "invalid plan:\n{rendered}"
                )));
            }
        };
        let sessions = self.hub.sessions().await;
        let fleet = fleet_support(&sessions);
        let problems = preflight::check_plan(&plan, &fleet);
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let why = format!(
                "pre-flight refused the plan; nothing was applied:\n  {}",
                list.join("\n  ")
            );
            self.auditor.refused(actor, "start-run", &why).await;
            return Err(Status::failed_precondition(why));
        }
        if let Err(refusal) = interlock::admit_plan(&plan, &self.policy, sessions.len()) {
            return Err(self.refuse(actor, &refusal).await);
        }
        let run_id = uuid::Uuid::now_v7().to_string();
        match self.hub.lock_targets(&run_id, &plan).await {
            Ok(()) => {}
            Err(LockError::Conflicts(conflicts)) => {
                return Err(self.refuse(actor, &Refusal::from(conflicts)).await);
            }
            Err(LockError::HubGone) => {
                return Err(Status::unavailable("coordinator is shutting down"));
            }
        }
        let record = RunRecord {
            id: run_id.clone(),
            title: plan.title.clone(),
            state: RunState::Running.as_str().into(),
            plan_yaml: request.plan_yaml.clone(),
            operator: actor.to_string(),
            created_ms: now_ms(),
            finished_ms: None,
            reason: String::new(),
        };
        if let Err(err) = self.store().create_run(record).await {
            self.hub.unregister_run(&run_id).await;
            return Err(internal(err));
        }
        let (cancel_tx, cancel_rx) = watch::channel(None);
        self.hub.register_run(&run_id, cancel_tx).await;
        // A halt engaged since the first check cancelled the runs registered before it; this
        // one may have registered just after. Then it must not start at all: the halt's
        // reverts are done and nothing would revert what it applied.
        if let Err(status) = self.admit_start(actor).await {
            let reason = format!("not started: {}", status.message());
            let last = RunEventRecord {
                at_ms: now_ms(),
                kind: "run-finished".into(),
                message: format!("run {}: {reason}", RunState::Halted.as_str()),
                ..Default::default()
            };
            if let Err(err) = self
                .events
                .emit(&run_id, last, Some(RunState::Halted))
                .await
            {
                tracing::error!(run = %run_id, %err, "could not record the end of the run");
            }
            let finished = self
                .store()
                .finish_run(&run_id, RunState::Halted, &reason, now_ms())
                .await;
            self.hub.unregister_run(&run_id).await;
            finished.map_err(internal)?;
            return Err(status);
        }
        let detail = format!("run {run_id}: {} ({})", plan.title, request.source_name);
        self.auditor.ok(actor, "start-run", &detail).await;

        let ctx = RunContext {
            hub: self.hub.clone(),
            store: self.store().clone(),
            events: self.events.clone(),
            live: self.live_telemetry.clone(),
        };
        tokio::spawn(runner::execute(ctx, run_id.clone(), plan, cancel_rx));
        Ok(pb::StartRunResponse { run_id })
    }

    /// Everything [`Self::start`] checks, without starting anything, then each fault resolved
    /// and prepared by its agent. Refusals are listed, not returned as errors, so that the
    /// operator sees every problem and every fault at once.
    async fn dry_run(
        &self,
        actor: &str,
        request: pb::StartRunRequest,
    ) -> Result<pb::DryRunResponse, Status> {
        let plan = match parse_plan(&request.plan_yaml) {
            Ok(plan) => plan,
            Err(errors) => {
                let rendered = render_errors(&request.source_name, &errors);
                return Err(Status::invalid_argument(format!(
                    "invalid plan:\n{rendered}"
                )));
            }
        };
        let mut refusals = Vec::new();
        if let Err(status) = self.admit_start(actor).await {
            refusals.push(status.message().to_string());
        }
        let sessions = self.hub.sessions().await;
        let fleet = fleet_support(&sessions);
        refusals.extend(
            preflight::check_plan(&plan, &fleet)
                .iter()
                .map(|problem| format!("pre-flight: {problem}")),
        );
        if let Err(refusal) = interlock::admit_plan(&plan, &self.policy, sessions.len()) {
            refusals.push(refusal.to_string());
        }
        // Taking the locks under a throwaway id and releasing them at once is the lock check.
        let probe_id = format!("dry-run-{}", uuid::Uuid::now_v7());
        match self.hub.lock_targets(&probe_id, &plan).await {
            Ok(()) => self.hub.unregister_run(&probe_id).await,
            Err(LockError::Conflicts(conflicts)) => {
                refusals.push(Refusal::from(conflicts).to_string());
            }
            Err(LockError::HubGone) => {
                return Err(Status::unavailable("coordinator is shutting down"));
            }
        }
        let connected: Vec<&str> = sessions.iter().map(|s| s.name.as_str()).collect();
        let connected = &connected;
        let asks = plan.stages.iter().flat_map(|stage| {
            stage.faults.iter().enumerate().map(move |(index, fault)| {
                let fault_id = format!("dry-run/{}/{index}", stage.name);
                let connected = connected.contains(&fault.agent.as_str());
                async move {
                    let duration_ms =
                        u64::try_from(fault.spec.duration.as_millis()).unwrap_or(u64::MAX);
                    let result = if connected {
                        let ask = pb::DryRunFault {
                            fault_id: fault_id.clone(),
                            fault: Some(crate::wire::fault_to_wire(&fault.spec)),
                            duration_ms,
                        };
                        match self.hub.dry_run(&fault.agent, ask, DRY_RUN_WAIT).await {
                            Ok(result) => result,
                            Err(err) => pb::DryRunResult {
                                fault_id,
                                error: err.to_string(),
                                ..Default::default()
                            },
                        }
                    } else {
                        pb::DryRunResult {
                            fault_id,
                            error: format!("agent {} not connected", fault.agent),
                            ..Default::default()
                        }
                    };
                    pb::DryRunFaultReport {
                        stage: stage.name.clone(),
                        index: u32::try_from(index).unwrap_or(u32::MAX),
                        agent: fault.agent.clone(),
                        kind: fault.spec.kind.name().to_string(),
                        target: fault.spec.target.to_string(),
                        duration_ms,
                        result: Some(result),
                    }
                }
            })
        });
        let faults = futures::future::join_all(asks).await;
        let detail = format!(
            "{} ({}): {} refusal(s), {} fault(s)",
            plan.title,
            request.source_name,
            refusals.len(),
            faults.len()
        );
        self.auditor.ok(actor, "dry-run", &detail).await;
        Ok(pb::DryRunResponse {
            title: plan.title,
            refusals,
            faults,
        })
    }

    /// The halt switch through [`interlock::admit_start`].
    async fn admit_start(&self, actor: &str) -> Result<(), Status> {
        let halt = self.store().halt_state().await.map_err(internal)?;
        let halt = HaltState {
            engaged: halt.halted,
            reason: halt.reason,
        };
        match interlock::admit_start(&halt) {
            Ok(()) => Ok(()),
            Err(refusal) => Err(self.refuse(actor, &refusal).await),
        }
    }

    async fn authorize<T>(
        &self,
        request: &Request<T>,
        action: &str,
    ) -> Result<PeerIdentity, Status> {
        let identity = match peer_identity(request) {
            Ok(identity) => identity,
            Err(status) => {
                let peer = request
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                self.auditor
                    .refused(&format!("tls {peer}"), action, status.message())
                    .await;
                return Err(status);
            }
        };
        if identity.role != Role::Operator {
            let why = format!("{identity} may not call the operator service ({action})");
            self.auditor
                .refused(&identity.to_string(), action, &why)
                .await;
            return Err(Status::permission_denied(why));
        }
        Ok(identity)
    }
}

#[tonic::async_trait]
impl pb::operator_server::Operator for OperatorService {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&request, "list-agents").await?;
        let mut agents: BTreeMap<String, pb::AgentInfo> = BTreeMap::new();
        for record in self.store().list_agents().await.map_err(internal)? {
            agents.insert(
                record.name.clone(),
                pb::AgentInfo {
                    name: record.name,
                    connected: false,
                    version: record.version,
                    last_seen_unix_ms: record.last_seen_ms,
                    ..Default::default()
                },
            );
        }
        for session in self.hub.sessions().await {
            agents.insert(
                session.name.clone(),
                pb::AgentInfo {
                    name: session.name,
                    connected: true,
                    version: session.version,
                    host: session.host,
                    capabilities: session.capabilities,
                    connected_at_unix_ms: session.connected_at_ms,
                    last_seen_unix_ms: session.last_seen_ms,
                    active_faults: session.active_faults,
                    peer_address: session.peer_address,
                },
            );
        }
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.into_values().collect(),
        }))
    }

    async fn validate_plan(
        &self,
        request: Request<pb::ValidatePlanRequest>,
    ) -> Result<Response<pb::ValidatePlanResponse>, Status> {
        self.authorize(&request, "validate-plan").await?;
        let request = request.into_inner();
        let response = match parse_plan(&request.plan_yaml) {
            Ok(plan) => pb::ValidatePlanResponse {
                valid: true,
                errors: vec![],
                title: plan.title,
            },
            Err(errors) => pb::ValidatePlanResponse {
                valid: false,
                errors: plan_errors_to_wire(&request.source_name, &errors),
                title: String::new(),
            },
        };
        Ok(Response::new(response))
    }

    async fn start_run(
        &self,
        request: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::StartRunResponse>, Status> {
        let identity = self.authorize(&request, "start-run").await?;
        let response = self
            .start(&identity.to_string(), request.into_inner())
            .await?;
        Ok(Response::new(response))
    }

    async fn dry_run(
        &self,
        request: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        let identity = self.authorize(&request, "dry-run").await?;
        let response = self
            .dry_run(&identity.to_string(), request.into_inner())
            .await?;
        Ok(Response::new(response))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        self.authorize(&request, "watch-run").await?;
        let run_id = request.into_inner().run_id;
        // Subscribe before reading history so no event falls between the two.
        let mut live = self.events.subscribe();
        let Some((run, history)) = self.store().get_run(&run_id).await.map_err(internal)? else {
            return Err(Status::not_found(format!("no run {run_id}")));
        };
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut last_seq = 0;
            let finished = run.state != RunState::Running.as_str();
            let count = history.len();
            for (index, event) in history.iter().enumerate() {
                last_seq = event.seq;
                let final_state = (finished && index + 1 == count).then_some(&run.state);
                let mut wire = event_to_wire(&run_id, event, None);
                if let Some(state) = final_state {
                    wire.final_state = state.clone();
                }
                if tx.send(Ok(wire)).await.is_err() {
                    return;
                }
            }
            if finished {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(published)
                        if published.run_id == run_id && published.event.seq > last_seq =>
                    {
                        let is_final = published.final_state.is_some();
                        let wire = event_to_wire(&run_id, &published.event, published.final_state);
                        if tx.send(Ok(wire)).await.is_err() || is_final {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let status = Status::data_loss(format!(
                            "watcher lagged, {missed} events \
                            skipped; use `faultline runs show {run_id}`"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn halt(
        &self,
        request: Request<pb::HaltRequest>,
    ) -> Result<Response<pb::HaltResponse>, Status> {
        let identity = self.authorize(&request, "halt").await?;
        let actor = identity.to_string();
        let request = request.into_inner();
        if request.release {
            halt::release(self.store()).await.map_err(internal)?;
            self.auditor
                .ok(&actor, "halt-release", "new runs may start again")
                .await;
            return Ok(Response::new(pb::HaltResponse {
                halted: false,
                detail: "halt released; new runs may start".into(),
                ..Default::default()
            }));
        }
        let reason = if request.reason.is_empty() {
            format!("requested by {actor}")
        } else {
            request.reason.clone()
        };
        let outcome = halt::halt_all(&self.hub, self.store(), &self.events, &reason)
            .await
            .map_err(internal)?;
        let detail = format!(
            "{} fault(s) reverted, {} run(s) aborted in {} ms{}",
            outcome.faults_reverted,
            outcome.runs_aborted.len(),
            outcome.latency.as_millis(),
            if outcome.unconfirmed.is_empty() {
                String::new()
            } else {
                format!("; unconfirmed: {}", outcome.unconfirmed.join("; "))
            }
        );
        self.auditor
            .ok(&actor, "halt", &format!("{reason}: {detail}"))
            .await;
        Ok(Response::new(pb::HaltResponse {
            halted: true,
            faults_reverted: outcome.faults_reverted,
            runs_aborted: outcome.runs_aborted.len() as u32,
            halt_latency_ms: outcome.latency.as_millis() as u64,
            detail,
        }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        self.authorize(&request, "list-runs").await?;
        let limit = match request.into_inner().limit {
            0 => 50,
            n => n.min(1000),
        };
        let runs = self.store().list_runs(limit).await.map_err(internal)?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(summary_to_wire).collect(),
        }))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunDetail>, Status> {
        self.authorize(&request, "get-run").await?;
        let run_id = request.into_inner().run_id;
        let Some((run, events)) = self.store().get_run(&run_id).await.map_err(internal)? else {
            return Err(Status::not_found(format!("no run {run_id}")));
        };
        let samples = self
            .store()
            .probe_samples(&run.id, MAX_PROBE_SAMPLES_PER_RUN)
            .await
            .map_err(internal)?;
        let mut detail = pb::RunDetail {
            summary: Some(summary_to_wire(&run)),
            plan_yaml: run.plan_yaml.clone(),
            events: events
                .iter()
                .map(|e| event_to_wire(&run.id, e, None))
                .collect(),
            reason: run.reason.clone(),
            probe_samples: Vec::new(),
            probe_samples_truncated: samples.len() >= MAX_PROBE_SAMPLES_PER_RUN,
            // Before the samples: they fill what the answer's budget leaves.
            telemetry: crate::telemetry::run_telemetry(
                self.store(),
                &run.id,
                0,
                crate::telemetry::GET_RUN_BUDGET,
            )
            .await
            .map_err(internal)?,
        };
        detail.probe_samples = samples_to_wire(samples, detail.encoded_len());
        Ok(Response::new(detail))
    }

    async fn get_telemetry(
        &self,
        request: Request<pb::GetTelemetryRequest>,
    ) -> Result<Response<pb::RunTelemetry>, Status> {
        self.authorize(&request, "get-telemetry").await?;
        let request = request.into_inner();
        let Some(run) = self
            .store()
            .run_record(&request.run_id)
            .await
            .map_err(internal)?
        else {
            return Err(Status::not_found(format!("no run {}", request.run_id)));
        };
        let mut telemetry = crate::telemetry::run_telemetry(
            self.store(),
            &run.id,
            request.since_unix_ms,
            crate::telemetry::QUERY_BUDGET,
        )
        .await
        .map_err(internal)?
        .unwrap_or_default();
        telemetry.run_state = run.state;
        Ok(Response::new(telemetry))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.authorize(&request, "list-audit").await?;
        let limit = match request.into_inner().limit {
            0 => 200,
            n => n.min(10_000),
        };
        let entries = self.store().list_audit(limit).await.map_err(internal)?;
        let entries = entries
            .into_iter()
            .map(|e| pb::AuditEntry {
                id: e.id,
                at_unix_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                outcome: e.outcome,
                detail: e.detail,
            })
            .collect();
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ed25519_dalek::SigningKey;
    use faultline_domain::plan::parse_policy;

    use super::*;
    use crate::hub::AgentSender;
    use crate::store::HaltRecord;

    const ACTOR: &str = "operator/test";

    /// An operator service over an in-memory store, with `agents` connected and able to pause
    /// containers. The receivers keep the agents' streams open.
    async fn service(
        agents: &[&str],
        policy: &str,
    ) -> (
        OperatorService,
        Vec<mpsc::Receiver<Result<pb::CoordinatorMessage, Status>>>,
    ) {
        let store = Store::open_in_memory().unwrap();
        let hub = HubHandle::spawn(SigningKey::from_bytes(&[7; 32]), store.clone());
        let mut streams = Vec::new();
        for (conn_id, name) in (0u64..).zip(agents) {
            let (outbound, inbound): (AgentSender, _) = mpsc::channel(64);
            let session = AgentSession {
                name: name.to_string(),
                version: "test".into(),
                host: None,
                capabilities: vec![pb::Capability {
                    name: "fault:container-pause".into(),
                    available: true,
                    mechanism: "docker pause".into(),
                    detail: String::new(),
                }],
                peer_address: "127.0.0.1:1".into(),
                connected_at_ms: 0,
                last_seen_ms: 0,
                active_faults: 0,
            };
            hub.connected(session, outbound, conn_id).await;
            streams.push(inbound);
        }
        let service = OperatorService {
            hub,
            auditor: Auditor::new(store.clone()),
            events: RunEvents::new(store),
            policy: Arc::new(parse_policy(policy).unwrap()),
            live_telemetry: Default::default(),
        };
        (service, streams)
    }

    /// A plan pausing container `db` on each agent, then the extra top-level lines.
    fn pause(agents: &[&str], extra: &str) -> pb::StartRunRequest {
        let faults: String = agents
            .iter()
            .map(|agent| {
                format!(
                    "      - {{ kind: container-pause, agent: {agent}, target: {{ container: db }}, \
                     duration: 1m }}\n"
                )
            })
            .collect();
        pb::StartRunRequest {
            source_name: "plan.yaml".into(),
            plan_yaml: format!(
                "apiVersion: faultline/v1\ntitle: t\nstages:\n  - name: s\n    faults:\n{faults}\
                 {extra}"
            ),
        }
    }

    async fn refused_entries(service: &OperatorService) -> Vec<String> {
        service
            .store()
            .list_audit(100)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == "start-run" && e.outcome == "refused")
            .map(|e| e.detail)
            .collect()
    }

    async fn run_count(service: &OperatorService) -> usize {
        service.store().list_runs(100).await.unwrap().len()
    }

    #[tokio::test]
    async fn each_interlock_refuses_with_every_reason_audits_it_and_creates_no_run() {
        let three = ["agent-1", "agent-2", "agent-3"];
        // Name, policy, plan, fragments of the refusal.
        let cases: Vec<(&str, &str, pb::StartRunRequest, Vec<&str>)> = vec![
            (
                "max_agents in the plan",
                "",
                pause(&three, "blast_radius: { max_agents: 2 }\n"),
                vec![
                    "safety interlocks refused the plan; nothing was applied:\n  blast radius: \
                     the plan faults 3 agents (agent-1, agent-2, agent-3), more than max_agents 2 \
                     set by the plan",
                ],
            ),
            (
                "fleet share against the connected agents",
                "blast_radius: { max_fleet_percent: 50 }\n",
                pause(&["agent-1", "agent-2"], ""),
                vec![
                    "the plan faults 2 of the 3 connected agents (66.6%), more than \
                     max_fleet_percent 50% set by the coordinator policy",
                ],
            ),
            (
                "protected container in the plan",
                "",
                pause(
                    &["agent-2"],
                    "protected:\n  - { agent: agent-2, container: db }\n",
                ),
                vec![
                    "protected: stage s, faults[0]: container-pause on container db on agent \
                     agent-2 is protected by container db on agent agent-2 (in the plan)",
                ],
            ),
            (
                "protected agent in the policy, with a blast radius violation",
                "protected: [{ agent: agent-1 }]\nblast_radius: { max_targets: 1 }\n",
                pause(&["agent-1", "agent-2"], ""),
                vec![
                    "\n  blast radius: the plan faults 2 targets, more than max_targets 1 set by \
                     the coordinator policy\n  protected: stage s, faults[0]",
                    "is protected by agent agent-1 (in the coordinator policy)",
                ],
            ),
        ];
        for (name, policy, request, fragments) in cases {
            let (service, _streams) = service(&three, policy).await;
            let status = service.start(ACTOR, request).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{name}");
            for fragment in fragments {
                assert!(
                    status.message().contains(fragment),
                    "{name}: {:?} lacks {fragment:?}",
                    status.message()
                );
            }
            assert_eq!(
                refused_entries(&service).await,
                [status.message()],
                "{name}: audited"
            );
            assert_eq!(run_count(&service).await, 0, "{name}: no run created");
        }
    }

    #[tokio::test]
    async fn halt_is_checked_first_with_its_own_message() {
        let (service, _streams) = service(&["agent-1"], "").await;
        service
            .store()
            .set_halt(HaltRecord {
                halted: true,
                reason: "game day over".into(),
                since_ms: 1,
            })
            .await
            .unwrap();
        // Even an invalid plan gets the halt's answer: nothing else matters while halted.
        let mut invalid = pause(&["agent-1"], "");
        invalid.plan_yaml.push_str("nonsense: true\n");
        let status = service.start(ACTOR, invalid).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "halt-all is engaged (game day over); release it with `faultline halt --release` \
             first"
        );
        assert_eq!(refused_entries(&service).await.len(), 1);
        assert_eq!(run_count(&service).await, 0);
    }

    #[tokio::test]
    async fn a_second_run_on_a_held_target_is_refused_and_other_targets_are_free() {
        let (service, mut streams) = service(&["agent-1", "agent-2"], "").await;
        let first = service.start(ACTOR, pause(&["agent-1"], "")).await.unwrap();
        // The first run really started: its apply reached agent-1.
        let sent = tokio::time::timeout(Duration::from_secs(5), streams[0].recv())
            .await
            .unwrap();
        assert!(sent.is_some());

        let status = service
            .start(ACTOR, pause(&["agent-2", "agent-1"], ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            format!(
                "safety interlocks refused the plan; nothing was applied:\n  target locked: \
                 container db on agent agent-1 is being faulted by run {}",
                first.run_id
            )
        );
        assert_eq!(run_count(&service).await, 1, "no second run");
        // All or nothing: the refused run did not keep agent-2's target.
        service.start(ACTOR, pause(&["agent-2"], "")).await.unwrap();
        assert_eq!(run_count(&service).await, 2);
        // The run's end releases its targets.
        service.hub.unregister_run(&first.run_id).await;
        service.start(ACTOR, pause(&["agent-1"], "")).await.unwrap();
    }

    #[test]
    fn a_halt_refusal_keeps_its_own_message_and_others_get_a_heading() {
        let halted = Refusal {
            violations: vec![interlock::Violation::Halted { reason: "r".into() }],
        };
        assert!(refusal_message(&halted).starts_with("halt-all is engaged (r)"));
        let conflict = interlock::Conflict {
            target: interlock::Target {
                agent: "a".into(),
                selector: faultline_domain::fault::TargetSelector::Pid(9),
            },
            run_id: "r1".into(),
            held: interlock::Target {
                agent: "a".into(),
                selector: faultline_domain::fault::TargetSelector::Pid(9),
            },
        };
        let mut both = Refusal::from(vec![conflict]);
        both.violations
            .push(interlock::Violation::Halted { reason: "r".into() });
        assert_eq!(
            refusal_message(&both),
            "safety interlocks refused the plan; nothing was applied:\n  target locked: process 9 \
             on agent a is being faulted by run r1\n  halt-all is engaged (r); release it with \
             `faultline halt --release` first"
        );
    }

    #[test]
    fn get_run_samples_leave_out_ok_details_and_stay_within_the_budget() {
        let sample = |ok: bool, detail: &str| ProbeSampleRecord {
            probe: "api".into(),
            at_ms: 1,
            ok,
            latency_ms: Some(1.5),
            value: None,
            detail: detail.into(),
        };
        let wire = samples_to_wire(
            vec![sample(true, "HTTP 200 in 1ms"), sample(false, "timed out")],
            100,
        );
        assert_eq!(wire[0].detail, "");
        assert_eq!(wire[1].detail, "timed out");
        assert_eq!((wire[1].latency_ms, wire[1].ok), (Some(1.5), false));

        // A run at its limit, with the longest names and details: every sample is sent, the
        // details while they fit.
        let many: Vec<ProbeSampleRecord> = (0..MAX_PROBE_SAMPLES_PER_RUN)
            .map(|_| ProbeSampleRecord {
                probe: "p".repeat(64),
                detail: "d".repeat(crate::store::MAX_PROBE_DETAIL_LEN),
                ..sample(false, "")
            })
            .collect();
        let used = 10_000;
        let detail = pb::RunDetail {
            probe_samples: samples_to_wire(many, used),
            ..Default::default()
        };
        assert_eq!(detail.probe_samples.len(), MAX_PROBE_SAMPLES_PER_RUN);
        let size = detail.encoded_len();
        assert!(size + used <= GET_RUN_BUDGET, "{size} bytes");
        let last = &detail.probe_samples[MAX_PROBE_SAMPLES_PER_RUN - 1];
        assert!(!detail.probe_samples[0].detail.is_empty());
        assert!(last.detail.is_empty());
    }
}
