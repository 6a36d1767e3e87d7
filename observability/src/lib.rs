//! Faultline's observability plumbing, shared by the coordinator and the agent so that both
//! behave the same way towards a team's OpenTelemetry collector and Prometheus:
//!
//! - [`init_tracing`]: logging to stderr plus, when the standard `OTEL_EXPORTER_OTLP_*`
//!   variables ask for it, OTLP export (gRPC or http/protobuf) of the spans whose tracing
//!   target is [`OTEL_TARGET`] and of the process's [`Registry`] metrics. Both exports run
//!   on threads of their own behind bounded queues: a slow or dead collector loses data
//!   (counted in the `faultline_otel_*` metrics), it never blocks or fails a run.
//! - [`traceparent_of`] / [`set_parent`]: the W3C `traceparent` carried inside signed
//!   commands, which makes the agent's spans children of the coordinator's.
//! - [`Registry`] and [`serve_metrics`]: counters, gauges and histograms with labels,
//!   rendered in the Prometheus text format (0.0.4) on a listener of their own, plain HTTP or
//!   HTTPS ([`metrics_tls_config`]).
//!
//! Metric and attribute names are documented in `deploy/OBSERVABILITY.md`.

mod listener;
mod otlp;
mod propagation;
mod registry;

pub use listener::{MetricsTlsError, metrics_tls_config, serve_metrics, start_metrics};
pub use otlp::{
    OTEL_TARGET, TracingGuard, init_tracing, metrics_export_configured, otlp_configured,
};
pub use propagation::{set_parent, traceparent_of};
pub use registry::{Def, Kind, Registry};
