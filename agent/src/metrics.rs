//! The agent's Prometheus metrics (served by `--metrics-listen`, see
//! `deploy/OBSERVABILITY.md` for the list).

// The registry and `/metrics` server are the coordinator's, compiled into this crate too.
#[path = "../../coordinator/src/metrics_registry.rs"]
mod metrics_registry;

use metrics_registry::{Def, Kind};
pub use metrics_registry::{Registry, start};

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
];

/// The agent's registry.
pub static REGISTRY: Registry = Registry::new(DEFS);

/// Creates the labelled counters at 0, so that `increase()` sees their first increment.
pub fn preset() {
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
