//! OpenTelemetry traces of the agent (same scheme as the coordinator's): logging set-up with an optional OTLP exporter, and the W3C
//! `traceparent` carried inside signed commands, which makes the agent's apply and revert
//! spans children of the coordinator's fault span.
//!
//! Tracing spans whose target is [`OTEL_TARGET`] are exported (and kept out of the log lines);
//! everything else is only logged. Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not `true`, and
//! `OTEL_TRACES_EXPORTER` is not `none`); the protocol comes from
//! `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` (`grpc` or `http/protobuf`, the default). Spans go
//! through the SDK's batch processor: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) that
//! drops when full, exported from a thread of its own, so a slow or dead collector never
//! blocks a run. Attribute names are documented in `deploy/OBSERVABILITY.md`.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The tracing target of every span meant for export.
pub const OTEL_TARGET: &str = "faultline_otel";

/// Keeps the exporter alive; [`TracingGuard::shutdown`] flushes what is queued.
#[derive(Debug)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Flushes queued spans (bounded by the exporter's timeout) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The flush blocks on the export thread; never from a runtime worker.
            let flushed = std::thread::spawn(move || provider.shutdown()).join();
            if !matches!(flushed, Ok(Ok(()))) {
                tracing::warn!("could not flush every trace span to the collector");
            }
        }
    }
}

/// Whether the environment asks for trace export.
pub fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Logging to stderr (`RUST_LOG`, default `default_filter`) plus, when configured, OTLP
/// export of the [`OTEL_TARGET`] spans. Must run inside the Tokio runtime (gRPC export).
pub fn init_tracing(default_service: &str, default_filter: &str, agent: &str) -> TracingGuard {
    let env_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(env_filter.and(filter_fn(|meta| meta.target() != OTEL_TARGET)));
    let (provider, export_error) = if otlp_configured() {
        match build_provider(default_service, agent) {
            Ok(provider) => (Some(provider), None),
            Err(err) => (None, Some(err)),
        }
    } else {
        (None, None)
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("faultline"))
            .with_filter(filter_fn(|meta| meta.target() == OTEL_TARGET))
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(err) = export_error {
        tracing::warn!(%err, "OpenTelemetry export not started; traces are off");
    } else if provider.is_some() {
        tracing::info!("OpenTelemetry trace export on");
    }
    TracingGuard { provider }
}

fn build_provider(default_service: &str, agent: &str) -> anyhow::Result<SdkTracerProvider> {
    // The HTTP exporter's client uses rustls without a built-in provider: give it ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".into());
    let exporter = match protocol.trim() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?,
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?,
        other => anyhow::bail!("unsupported OTLP protocol {other:?} (grpc or http/protobuf)"),
    };
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut resource = opentelemetry_sdk::Resource::builder().with_attributes([
        opentelemetry::KeyValue::new("host.name", host),
        opentelemetry::KeyValue::new("faultline.agent", agent.to_string()),
    ]);
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(default_service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

struct Header<'a>(&'a mut Option<String>);

impl Injector for Header<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            *self.0 = Some(value);
        }
    }
}

struct Parent<'a>(&'a str);

impl Extractor for Parent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The W3C traceparent of `span`, or empty when it is not exported.
pub fn traceparent_of(span: &tracing::Span) -> String {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return String::new();
    }
    let mut header = None;
    TraceContextPropagator::new().inject_context(&context, &mut Header(&mut header));
    header.unwrap_or_default()
}

/// Makes `span` a child of the span named by `traceparent` (ignored when empty or invalid).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&Parent(traceparent));
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}
