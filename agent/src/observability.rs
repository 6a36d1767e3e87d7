//! OpenTelemetry traces and metric export of the agent: the shared set-up of
//! [`faultline_observability`] with the agent's metrics registry and resource (`host.name`,
//! `faultline.agent`). The W3C `traceparent` carried inside signed commands makes the agent's
//! apply and revert spans children of the coordinator's fault span ([`set_parent`]).
//! Attribute names: `deploy/OBSERVABILITY.md`.

pub use faultline_observability::{
    OTEL_TARGET, TracingGuard, metrics_export_configured, otlp_configured, set_parent,
    traceparent_of,
};

/// Logging to stderr (`RUST_LOG`, default `default_filter`) plus, when the `OTEL_*`
/// variables ask for it, OTLP export of the agent's spans and metrics, with `host.name` and
/// `faultline.agent` (`agent`) on the resource. Must run inside the Tokio runtime.
pub fn init_tracing(default_service: &str, default_filter: &str, agent: &str) -> TracingGuard {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    faultline_observability::init_tracing(
        default_service,
        default_filter,
        &[("host.name", host), ("faultline.agent", agent.to_string())],
        &crate::metrics::REGISTRY,
    )
}
