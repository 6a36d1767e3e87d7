//! The agent's Prometheus metrics (served by `--metrics-listen`, see
//! `deploy/OBSERVABILITY.md` for the list).

use std::sync::{Mutex, PoisonError};

use faultline_observability::{Def, Kind, Registry};
use faultline_proto::v1 as pb;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static DEFS: &[Def] = &[
    Def {
        name: "faultline_agent_faults_active",
        kind: Kind::Gauge,
        help: "Faults applied on this host and not yet reverted, by kind.",
        labels: &["kind"],
    },
    Def {
        name: "faultline_agent_applies_total",
        kind: Kind::Counter,
        help: "Fault applies, by kind and outcome (applied = verified in effect, failed).",
        labels: &["kind", "outcome"],
    },
    Def {
        name: "faultline_agent_apply_duration_seconds",
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Resolve + journal + apply + verify time of a fault, by kind.",
        labels: &["kind"],
    },
    Def {
        name: "faultline_agent_reverts_total",
        kind: Kind::Counter,
        help: "Confirmed reverts, by reason (schedule, lease-expired, coordinator, halt, journal-recovery, shutdown).",
        labels: &["reason"],
    },
    Def {
        name: "faultline_agent_revert_failures_total",
        kind: Kind::Counter,
        help: "Failed revert attempts (retried every 2 s; the journal entry is kept).",
        labels: &[],
    },
    Def {
        name: "faultline_agent_lease_expiries_total",
        kind: Kind::Counter,
        help: "Faults reverted because the coordinator stopped renewing their lease.",
        labels: &[],
    },
    Def {
        name: "faultline_agent_telemetry_events_total",
        kind: Kind::Counter,
        help: "Kernel telemetry events received from the eBPF programs, by kind (connect-failed, connection-error, exec, exit, oom-kill).",
        labels: &["kind"],
    },
    Def {
        name: "faultline_agent_telemetry_batches_total",
        kind: Kind::Counter,
        help: "Telemetry batches handed to the uplink for the coordinator.",
        labels: &[],
    },
    Def {
        name: "faultline_agent_telemetry_drops_total",
        kind: Kind::Counter,
        help: "Telemetry lost on this host, by kind: kernel-events (ring buffer full), kernel-map-full (aggregate map full), agent-events (over the per-batch cap), batches (queue or backlog full, stream lost).",
        labels: &["kind"],
    },
    Def {
        name: "faultline_agent_bpf_status",
        kind: Kind::Gauge,
        help: "How each telemetry group is collected now: 1 for its mechanism (bpf, fallback, none), 0 for the others.",
        labels: &["group", "mechanism"],
    },
];

/// The agent's registry.
pub static REGISTRY: Registry = Registry::new(DEFS);

/// Telemetry event kinds, as counted in `faultline_agent_telemetry_events_total`.
pub const TELEMETRY_EVENT_KINDS: &[&str] = &[
    "connect-failed",
    "connection-error",
    "exec",
    "exit",
    "oom-kill",
];

/// Telemetry drop kinds, as counted in `faultline_agent_telemetry_drops_total`.
pub const TELEMETRY_DROP_KINDS: &[&str] = &[
    "kernel-events",
    "kernel-map-full",
    "agent-events",
    "batches",
];

const MECHANISMS: &[&str] = &["bpf", "fallback", "none"];

/// Adds `n` to a counter.
pub fn count(name: &'static str, labels: &[&str], n: u64) {
    // u64 -> f64 is exact up to 2^53, far beyond any count a process reaches.
    #[allow(clippy::cast_precision_loss)]
    REGISTRY.add(name, labels, n as f64);
}

/// Sets `faultline_agent_bpf_status` from what loading the programs found.
pub fn telemetry_sources(sources: &[pb::TelemetrySource]) {
    for source in sources {
        for mechanism in MECHANISMS {
            let on = if source.mechanism == *mechanism {
                1.0
            } else {
                0.0
            };
            REGISTRY.set(
                "faultline_agent_bpf_status",
                &[&source.group, mechanism],
                on,
            );
        }
    }
}

/// The kernel's loss counters last seen (ring buffer drops, map full): they are global to the
/// loaded programs, while every subscription reads them, so only their growth is counted.
static KERNEL_LOSSES: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// Counts the growth of the kernel's cumulative loss counters since the last reading. A value
/// below the last one means the programs were loaded again (counters restart at 0).
pub fn kernel_losses(ringbuf_drops: u64, map_full: u64) {
    let mut last = KERNEL_LOSSES.lock().unwrap_or_else(PoisonError::into_inner);
    let grown = |now: u64, before: u64| if now >= before { now - before } else { now };
    count(
        "faultline_agent_telemetry_drops_total",
        &["kernel-events"],
        grown(ringbuf_drops, last.0),
    );
    count(
        "faultline_agent_telemetry_drops_total",
        &["kernel-map-full"],
        grown(map_full, last.1),
    );
    *last = (ringbuf_drops, map_full);
}

/// Creates the labelled counters at 0, so that `increase()` sees their first increment.
pub fn preset() {
    for kind in TELEMETRY_EVENT_KINDS {
        REGISTRY.add("faultline_agent_telemetry_events_total", &[kind], 0.0);
    }
    for kind in TELEMETRY_DROP_KINDS {
        REGISTRY.add("faultline_agent_telemetry_drops_total", &[kind], 0.0);
    }
    for reason in [
        "schedule",
        "lease-expired",
        "coordinator",
        "halt",
        "journal-recovery",
        "shutdown",
    ] {
        REGISTRY.add("faultline_agent_reverts_total", &[reason], 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(name: &str, labels: &[&str]) -> Option<f64> {
        REGISTRY
            .numbers(name)
            .into_iter()
            .find(|(l, _)| l.iter().map(String::as_str).eq(labels.iter().copied()))
            .map(|(_, v)| v)
    }

    #[test]
    fn kernel_losses_count_growth_once_and_survive_a_reload() {
        let drops =
            |kind: &str| value("faultline_agent_telemetry_drops_total", &[kind]).unwrap_or(0.0);
        let (events, full) = (drops("kernel-events"), drops("kernel-map-full"));
        kernel_losses(5, 1);
        kernel_losses(5, 1); // a second subscription reading the same snapshot
        kernel_losses(7, 1);
        kernel_losses(2, 0); // programs loaded again: counters restarted
        assert_eq!(drops("kernel-events") - events, 9.0);
        assert_eq!(drops("kernel-map-full") - full, 1.0);
    }

    #[test]
    fn bpf_status_marks_one_mechanism_per_group() {
        telemetry_sources(&[pb::TelemetrySource {
            group: "tcp".into(),
            mechanism: "fallback".into(),
            detail: String::new(),
        }]);
        assert_eq!(
            value("faultline_agent_bpf_status", &["tcp", "fallback"]),
            Some(1.0)
        );
        assert_eq!(
            value("faultline_agent_bpf_status", &["tcp", "bpf"]),
            Some(0.0)
        );
        assert_eq!(
            value("faultline_agent_bpf_status", &["tcp", "none"]),
            Some(0.0)
        );
    }
}
