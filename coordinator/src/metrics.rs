//! The coordinator's Prometheus metrics (served by `--metrics-listen`, see
//! `deploy/OBSERVABILITY.md` for the list).

pub use crate::metrics_registry::start;
use crate::metrics_registry::{Def, Kind, Registry};

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
