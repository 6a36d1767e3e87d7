//! The agent's link to the coordinator: dials out over mTLS, registers, sends heartbeats and
//! reports, receives signed commands, verifies them and hands them to the engine. Reconnects
//! with capped, jittered backoff. Reports produced while disconnected are kept (bounded) and
//! sent after reconnecting.
//!
//! With several coordinator addresses (replicas of a highly available coordinator, of which
//! only the active one listens) the link tries them in turn and sticks to the one that
//! answers: after a lost or refused session it moves on to the next address, a short pause
//! between addresses, the growing backoff only between full rounds. The address in use is
//! published on a watch ([`Link::active_channel`]) so the telemetry uplink follows it.
//!
//! Verified probe requests do not go to the engine: each runs in a task of its own
//! ([`ProbeExecutor`]), so a slow probe never delays a fault or a revert, and its result goes
//! back on the session that asked for it (a result for a lost session is dropped: the
//! coordinator has stopped waiting for it).
//!
//! Verified telemetry subscriptions go to the telemetry service ([`TelemetryHandle`]), which
//! streams on a gRPC stream of its own.

use std::collections::VecDeque;
use std::time::Duration;

use faultline_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::clock::now_ms;
use crate::engine::EngineHandle;
use crate::probe::ProbeExecutor;
use crate::telemetry::TelemetryHandle;
use crate::verify::{Action, Verifier};

const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Reports kept while disconnected; older ones are dropped (and counted) past this.
const PENDING_REPORTS_MAX: usize = 10_000;

/// What the agent says about itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub version: String,
    pub host: pb::HostFacts,
    pub capabilities: Vec<pb::Capability>,
}

/// One coordinator address and its (lazily connecting) channel.
#[derive(Debug, Clone)]
pub struct CoordinatorAddress {
    pub url: String,
    pub channel: Channel,
}

/// Drives the connection until `shutdown` turns true.
#[derive(Debug)]
pub struct Link {
    /// Never empty (checked by [`Link::new`]'s caller; an empty list would never connect).
    pub coordinators: Vec<CoordinatorAddress>,
    /// Index into `coordinators` of the address tried next / in use.
    current: usize,
    active: watch::Sender<Channel>,
    pub registration: Registration,
    pub verifier: Verifier,
    pub engine: EngineHandle,
    pub reports: mpsc::Receiver<pb::CommandReport>,
    pending: VecDeque<pb::CommandReport>,
    dropped_reports: u64,
    probes: ProbeExecutor,
    telemetry: Option<TelemetryHandle>,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Link {
    /// A link over `coordinators` (in the order they are tried); `first` is their first entry
    /// and makes an empty list impossible.
    pub fn new(
        first: CoordinatorAddress,
        more: Vec<CoordinatorAddress>,
        registration: Registration,
        verifier: Verifier,
        engine: EngineHandle,
        reports: mpsc::Receiver<pb::CommandReport>,
    ) -> Self {
        let (active, _) = watch::channel(first.channel.clone());
        let mut coordinators = vec![first];
        coordinators.extend(more);
        Self {
            coordinators,
            current: 0,
            active,
            registration,
            verifier,
            engine,
            reports,
            pending: VecDeque::new(),
            dropped_reports: 0,
            probes: ProbeExecutor::default(),
            telemetry: None,
        }
    }

    /// The channel of the coordinator address in use (the last one that answered), for
    /// streams of their own such as telemetry.
    pub fn active_channel(&self) -> watch::Receiver<Channel> {
        self.active.subscribe()
    }

    /// Publishes the channel in use on `active` (made before the link, for services started
    /// earlier) instead of a watch of its own.
    pub fn publishing_active(mut self, active: watch::Sender<Channel>) -> Self {
        self.active = active;
        self
    }

    /// The address in use.
    fn coordinator(&self) -> &CoordinatorAddress {
        // `current` is always kept below the length, and the list is never empty.
        &self.coordinators[self.current % self.coordinators.len()]
    }

    /// Hands telemetry subscriptions to `telemetry` (without it they are logged and ignored).
    pub fn with_telemetry(mut self, telemetry: TelemetryHandle) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_START;
        // Addresses tried since the last full round (or the last session that lasted).
        let mut tried_in_round = 0usize;
        loop {
            let started = tokio::time::Instant::now();
            let url = self.coordinator().url.clone();
            match self.session(&mut shutdown).await {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(why) => {
                    // A session that lasted a while resets the backoff.
                    if started.elapsed() > BACKOFF_MAX * 2 {
                        backoff = BACKOFF_START;
                        tried_in_round = 0;
                    }
                    tracing::warn!(coordinator = %url, "coordinator link lost: {why}");
                }
            }
            // The address that failed may be a replica that stopped being (or never was)
            // active: the next one is tried first.
            self.current = (self.current + 1) % self.coordinators.len();
            tried_in_round += 1;
            let round_done = tried_in_round >= self.coordinators.len();
            // Within a round, a short pause: a standby that just took over is listening
            // already. Between rounds, the growing backoff.
            let pause = if round_done { backoff } else { BACKOFF_START };
            if round_done {
                tried_in_round = 0;
            }
            tracing::info!(retry_in = ?pause, next = %self.coordinator().url,
                "reconnecting to coordinator");
            let wait = pause + jitter(pause / 4);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            // Keep collecting reports while waiting, so the engine never blocks on us.
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    report = self.reports.recv() => match report {
                        Some(report) => self.keep(report),
                        None => return,
                    },
                    _ = shutdown.changed() => if *shutdown.borrow() { return },
                }
            }
            if round_done {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn keep(&mut self, report: pb::CommandReport) {
        if self.pending.len() >= PENDING_REPORTS_MAX {
            self.pending.pop_front();
            self.dropped_reports += 1;
            tracing::warn!(
                dropped = self.dropped_reports,
                "report buffer full; dropped oldest"
            );
        }
        self.pending.push_back(report);
    }

    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> SessionEnd {
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
        let register = pb::Register {
            agent_name: self.registration.name.clone(),
            version: self.registration.version.clone(),
            host: Some(self.registration.host.clone()),
            capabilities: self.registration.capabilities.clone(),
            active_fault_ids: self.engine.active_ids().await,
        };
        let body = pb::agent_message::Body::Register(register);
        if tx
            .send(pb::AgentMessage { body: Some(body) })
            .await
            .is_err()
        {
            return SessionEnd::Lost("local stream closed".into());
        }
        let coordinator = self.coordinator().clone();
        let mut client = pb::agent_link_client::AgentLinkClient::new(coordinator.channel.clone());
        let response = tokio::select! {
            response = client.session(ReceiverStream::new(rx)) => response,
            _ = shutdown.changed() => return SessionEnd::Shutdown,
        };
        let mut inbound = match response {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return SessionEnd::Lost(format!("{}: {}", status.code(), status.message()));
            }
        };
        tracing::info!(agent = %self.registration.name, coordinator = %coordinator.url,
            "connected to coordinator {}", coordinator.url);
        // Streams of their own (telemetry) follow the address that answered.
        self.active.send_replace(coordinator.channel.clone());

        // Deliver what piled up while we were away.
        while let Some(report) = self.pending.pop_front() {
            let body = pb::agent_message::Body::Report(report);
            if tx
                .send(pb::AgentMessage { body: Some(body) })
                .await
                .is_err()
            {
                return SessionEnd::Lost("stream closed while flushing reports".into());
            }
        }

        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(pb::CoordinatorMessage { body: Some(body) })) => {
                        self.on_message(body, &tx).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return SessionEnd::Lost("coordinator closed the stream".into()),
                    Err(status) => return SessionEnd::Lost(status.to_string()),
                },
                report = self.reports.recv() => match report {
                    Some(report) => {
                        let body = pb::agent_message::Body::Report(report.clone());
                        if tx.send(pb::AgentMessage { body: Some(body) }).await.is_err() {
                            self.keep(report);
                            return SessionEnd::Lost("stream closed while reporting".into());
                        }
                    }
                    None => return SessionEnd::Shutdown,
                },
                _ = heartbeat.tick() => {
                    let hb = pb::Heartbeat {
                        sent_at_unix_ms: now_ms(),
                        active_faults: self.engine.active_ids().await.len() as u32,
                    };
                    let body = pb::agent_message::Body::Heartbeat(hb);
                    if tx.send(pb::AgentMessage { body: Some(body) }).await.is_err() {
                        return SessionEnd::Lost("stream closed".into());
                    }
                }
                _ = shutdown.changed() => if *shutdown.borrow() { return SessionEnd::Shutdown },
            }
        }
    }

    async fn on_message(
        &mut self,
        body: pb::coordinator_message::Body,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) {
        match body {
            pb::coordinator_message::Body::Welcome(welcome) => {
                let skew = welcome.server_time_unix_ms - now_ms();
                tracing::info!(version = %welcome.coordinator_version, skew_ms = skew,
                    "coordinator welcomed us");
            }
            pb::coordinator_message::Body::Command(signed) => {
                match self.verifier.verify(&signed, now_ms()) {
                    Ok(command) => match &command.action {
                        Action::Probe(request) => {
                            self.start_probe(command.command_id.clone(), request.clone(), tx);
                        }
                        Action::DryRun { fault_id, spec } => {
                            self.start_dry_run(
                                command.command_id.clone(),
                                fault_id.clone(),
                                spec.clone(),
                                tx,
                            );
                        }
                        Action::TelemetrySubscribe(subscription) => match &self.telemetry {
                            Some(telemetry) => {
                                telemetry.subscribe(command.run_id.clone(), subscription.clone());
                            }
                            None => tracing::warn!(run = %command.run_id,
                                "telemetry subscription ignored: no telemetry service"),
                        },
                        Action::TelemetryUnsubscribe => {
                            if let Some(telemetry) = &self.telemetry {
                                telemetry.unsubscribe(&command.run_id);
                            }
                        }
                        _ => self.engine.command(command).await,
                    },
                    Err(refused) => {
                        tracing::warn!(command = %refused.command_id, "refused command: {}",
                            refused.refusal);
                        let report = pb::CommandReport {
                            command_id: refused.command_id,
                            fault_id: refused.fault_id,
                            run_id: refused.run_id,
                            kind: pb::ReportKind::Refused as i32,
                            detail: refused.refusal.to_string(),
                            at_unix_ms: now_ms(),
                            ..Default::default()
                        };
                        let body = pb::agent_message::Body::Report(report.clone());
                        if tx
                            .send(pb::AgentMessage { body: Some(body) })
                            .await
                            .is_err()
                        {
                            self.keep(report);
                        }
                    }
                }
            }
        }
    }
}

impl Link {
    /// Has the engine resolve and prepare a fault without applying it, in a task of its own,
    /// and sends what it would do on `tx`.
    fn start_dry_run(
        &self,
        request_id: String,
        fault_id: String,
        spec: faultline_domain::fault::FaultSpec,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) {
        let engine = self.engine.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut result = pb::DryRunResult {
                request_id,
                fault_id: fault_id.clone(),
                ..Default::default()
            };
            match engine.dry_run(fault_id, spec).await {
                Ok(dry_run) => {
                    result.resolved = dry_run.resolved;
                    result.mechanism = dry_run.mechanism;
                    result.actions = dry_run.actions;
                }
                Err(error) => result.error = error,
            }
            let body = pb::agent_message::Body::DryRunResult(result);
            if tx
                .send(pb::AgentMessage { body: Some(body) })
                .await
                .is_err()
            {
                tracing::debug!("session gone; dry-run result dropped");
            }
        });
    }

    /// Runs a verified probe request in a task of its own and sends its result on `tx`.
    fn start_probe(
        &self,
        request_id: String,
        request: crate::probe::ProbeRequest,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) {
        tracing::debug!(request = %request_id, argv = ?request.argv, "running probe");
        let probes = self.probes.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = probes.run(request_id, &request).await;
            let body = pb::agent_message::Body::ProbeResult(result);
            if tx
                .send(pb::AgentMessage { body: Some(body) })
                .await
                .is_err()
            {
                tracing::debug!("session gone; probe result dropped");
            }
        });
    }
}

/// A pseudo-random duration below `max`, so a fleet does not reconnect in lockstep.
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let max_ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from(nanos) % max_ms)
}
