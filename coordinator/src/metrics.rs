//! The coordinator's Prometheus metrics (served by `--metrics-listen`, see
//! `deploy/OBSERVABILITY.md` for the list).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use faultline_observability::{Def, Kind, Registry};
use faultline_proto::v1 as pb;
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static DEFS: &[Def] = &[
    Def {
        name: "faultline_agents_connected",
        kind: Kind::Gauge,
        help: "Agents with a live command stream to this coordinator.",
        labels: &[],
    },
    Def {
        name: "faultline_runs_active",
        kind: Kind::Gauge,
        help: "Runs in progress.",
        labels: &[],
    },
    Def {
        name: "faultline_runs_total",
        kind: Kind::Counter,
        help: "Runs finished, by final state (completed, failed, aborted, halted).",
        labels: &["state"],
    },
    Def {
        name: "faultline_faults_active",
        kind: Kind::Gauge,
        help: "Faults confirmed applied and not yet reverted, by kind.",
        labels: &["kind"],
    },
    Def {
        name: "faultline_commands_sent_total",
        kind: Kind::Counter,
        help: "Signed commands sent to agents, by action.",
        labels: &["action"],
    },
    Def {
        name: "faultline_command_duration_seconds",
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "From sending an apply to the agent's applied (verified) report, by fault kind.",
        labels: &["kind"],
    },
    Def {
        name: "faultline_halt_duration_seconds",
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Halt-all latency: switch set, runs cancelled, every revert acknowledged.",
        labels: &[],
    },
    Def {
        name: "faultline_lease_renewals_total",
        kind: Kind::Counter,
        help: "Lease renewal commands sent.",
        labels: &[],
    },
    Def {
        name: "faultline_reverts_total",
        kind: Kind::Counter,
        help: "Reverts reported by agents, by reason (schedule, lease-expired, coordinator, halt, journal-recovery, shutdown).",
        labels: &["reason"],
    },
    Def {
        name: "faultline_revert_failures_total",
        kind: Kind::Counter,
        help: "Failed revert attempts reported by agents (the agent retries).",
        labels: &[],
    },
    Def {
        name: "faultline_telemetry_batches_received_total",
        kind: Kind::Counter,
        help: "Telemetry batches received from agents (each once, resent ones not counted again), by agent.",
        labels: &["agent"],
    },
    Def {
        name: "faultline_telemetry_batches_lost_total",
        kind: Kind::Counter,
        help: "Telemetry batches that never arrived (gaps in an agent's sequence numbers), by agent.",
        labels: &["agent"],
    },
];

/// The coordinator's registry.
pub static REGISTRY: Registry = Registry::new(DEFS);

/// Keeps `faultline_faults_active{kind}` raised while it lives.
#[derive(Debug)]
pub struct ActiveFault(&'static str);

impl ActiveFault {
    pub fn new(kind: &'static str) -> Self {
        REGISTRY.add("faultline_faults_active", &[kind], 1.0);
        ActiveFault(kind)
    }
}

impl Drop for ActiveFault {
    fn drop(&mut self) {
        REGISTRY.add("faultline_faults_active", &[self.0], -1.0);
    }
}

/// Keeps `faultline_runs_active` raised while it lives.
#[derive(Debug)]
pub struct ActiveRun(());

impl ActiveRun {
    pub fn new() -> Self {
        REGISTRY.add("faultline_runs_active", &[], 1.0);
        ActiveRun(())
    }
}

impl Default for ActiveRun {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ActiveRun {
    fn drop(&mut self) {
        REGISTRY.add("faultline_runs_active", &[], -1.0);
    }
}

/// The action label of a command.
pub fn action_label(action: &faultline_proto::v1::command::Action) -> &'static str {
    use faultline_proto::v1::command::Action;
    match action {
        Action::Apply(_) => "apply",
        Action::Revert(_) => "revert",
        Action::Renew(_) => "renew",
        Action::Probe(_) => "probe",
        Action::DryRun(_) => "dry-run",
        Action::TelemetrySubscribe(_) => "telemetry-subscribe",
        _ => "other",
    }
}

/// Reverts' reasons as agents report them.
pub const REVERT_REASONS: &[&str] = &[
    "schedule",
    "lease-expired",
    "coordinator",
    "halt",
    "journal-recovery",
    "shutdown",
];

/// Creates the labelled counters at 0, so that `increase()` sees their first increment.
pub fn preset() {
    for state in ["completed", "failed", "halted", "aborted"] {
        REGISTRY.add("faultline_runs_total", &[state], 0.0);
    }
    for reason in REVERT_REASONS {
        REGISTRY.add("faultline_reverts_total", &[reason], 0.0);
    }
}

/// How long the last sequence number of an (agent, run) stream is remembered after its last
/// batch: longer than a run's telemetry grace period and an agent's reconnection backoff.
const SEQ_MEMORY: Duration = Duration::from_secs(3600);

/// Per (agent, run): the highest batch sequence number acknowledged, and when.
type LastSeqs = HashMap<(String, String), (u64, Instant)>;

static LAST_SEQ: Mutex<Option<LastSeqs>> = Mutex::new(None);

/// Counts one acknowledged batch of `agent`: new sequence numbers are received batches, the
/// numbers skipped before them lost ones; a batch resent after a lost stream (its number seen
/// already) counts for nothing.
fn count_batch(agent: &str, ack: &pb::TelemetryAck) {
    let mut guard = LAST_SEQ.lock().unwrap_or_else(PoisonError::into_inner);
    let seqs = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    seqs.retain(|_, (_, at)| now.duration_since(*at) < SEQ_MEMORY);
    let (last, at) = seqs
        .entry((agent.to_string(), ack.run_id.clone()))
        .or_insert((0, now));
    *at = now;
    // Created at 0 so that the series exists (and `increase()` sees a first loss).
    REGISTRY.add("faultline_telemetry_batches_lost_total", &[agent], 0.0);
    if ack.seq > *last {
        let skipped = ack.seq - *last - 1;
        *last = ack.seq;
        REGISTRY.add("faultline_telemetry_batches_received_total", &[agent], 1.0);
        // u64 -> f64: exact for any realistic gap.
        #[allow(clippy::cast_precision_loss)]
        REGISTRY.add(
            "faultline_telemetry_batches_lost_total",
            &[agent],
            skipped as f64,
        );
    }
}

/// `AgentTelemetry.Stream` served by `inner`, with its acknowledgements counted into
/// `faultline_telemetry_batches_{received,lost}_total`: every batch is acknowledged once
/// with its sequence number, so the acknowledgements tell what arrived without touching the
/// batches themselves.
#[derive(Debug, Clone)]
pub struct CountedTelemetry<S>(pub S);

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::TelemetryAck, Status>> + Send>>;

#[tonic::async_trait]
impl<S: pb::agent_telemetry_server::AgentTelemetry> pb::agent_telemetry_server::AgentTelemetry
    for CountedTelemetry<S>
{
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::TelemetryBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        // Refusals (no agent identity) are the inner service's business; they send nothing.
        let agent = faultline_tls::identity::peer_identity(&request)
            .map(|identity| identity.name)
            .unwrap_or_default();
        let acks = self.0.stream(request).await?.into_inner();
        let counted = acks.inspect(move |ack| {
            if let Ok(ack) = ack {
                count_batch(&agent, ack);
            }
        });
        Ok(Response::new(Box::pin(counted)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(name: &str, agent: &str) -> Option<f64> {
        REGISTRY
            .numbers(name)
            .into_iter()
            .find(|(labels, _)| labels == &[agent.to_string()])
            .map(|(_, v)| v)
    }

    #[test]
    fn acknowledged_sequence_numbers_count_received_and_lost_batches() {
        let ack = |run: &str, seq| pb::TelemetryAck {
            run_id: run.into(),
            seq,
            ..Default::default()
        };
        for (run, seq) in [
            ("r1", 1),
            ("r1", 2),
            ("r1", 5),
            ("r1", 5),
            ("r1", 4),
            ("r2", 2),
        ] {
            count_batch("agent-test", &ack(run, seq));
        }
        // r1: 1, 2, 5 new (3 and 4 lost; 5 again and late 4 are resends); r2: 2 new, 1 lost.
        assert_eq!(
            value("faultline_telemetry_batches_received_total", "agent-test"),
            Some(4.0)
        );
        assert_eq!(
            value("faultline_telemetry_batches_lost_total", "agent-test"),
            Some(3.0)
        );
    }
}
