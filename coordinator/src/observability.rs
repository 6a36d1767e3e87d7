//! OpenTelemetry traces and metric export of the coordinator: the shared set-up of
//! [`faultline_observability`] with the coordinator's metrics registry. Spans meant for
//! export use the tracing target [`OTEL_TARGET`]; the traceparent of a fault span travels in
//! the signed command ([`traceparent_of`]). Attribute names: `deploy/OBSERVABILITY.md`.

pub use faultline_observability::{
    OTEL_TARGET, TracingGuard, metrics_export_configured, otlp_configured, set_parent,
    traceparent_of,
};

/// Logging to stderr (`RUST_LOG`, default `default_filter`) plus, when the `OTEL_*`
/// variables ask for it, OTLP export of the coordinator's spans and of its metrics registry.
/// Must run inside the Tokio runtime (gRPC export).
pub fn init_tracing(default_service: &str, default_filter: &str) -> TracingGuard {
    faultline_observability::init_tracing(
        default_service,
        default_filter,
        &[],
        &crate::metrics::REGISTRY,
    )
}
