//! Logging set-up with optional OTLP export of traces and metrics.
//!
//! Tracing spans whose target is [`OTEL_TARGET`] are exported (and kept out of the log lines);
//! everything else is only logged. Trace export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not `true`, and
//! `OTEL_TRACES_EXPORTER` is not `none`); metric export likewise with
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` and `OTEL_METRICS_EXPORTER`. The protocol comes from
//! `OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)PROTOCOL` (`grpc` or `http/protobuf`, the default).
//!
//! Spans go through the SDK's batch processor: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
//! 2048) that drops when full, exported from a thread of its own. Metrics are collected from
//! the [`Registry`] and exported every `OTEL_METRIC_EXPORT_INTERVAL` (60 s) by the SDK's
//! periodic reader, also on a thread of its own. Neither ever waits on a run, so a slow or dead
//! collector never blocks one. The SDK keeps its queue-full drop count to itself; what can be
//! seen from outside it is counted in the registry by wrappers around the processor and the
//! exporters (`faultline_otel_*`, see `deploy/OBSERVABILITY.md`).

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::Kind;
use crate::registry::Registry;

/// The tracing target of every span meant for export.
pub const OTEL_TARGET: &str = "faultline_otel";

/// Why an OTLP exporter could not be built.
#[derive(Debug, thiserror::Error)]
enum OtlpError {
    #[error("unsupported OTLP protocol {0:?} for {1} (grpc or http/protobuf)")]
    Protocol(String, &'static str),
    #[error("building the OTLP {signal} exporter: {source}")]
    Exporter {
        signal: &'static str,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps the exporters alive; [`TracingGuard::shutdown`] flushes what is queued.
#[derive(Debug)]
pub struct TracingGuard {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
}

impl TracingGuard {
    /// Flushes queued spans and a last round of metrics (each bounded by its exporter's
    /// timeout) and stops the exporters.
    pub fn shutdown(self) {
        let TracingGuard { traces, metrics } = self;
        // The flushes block on the export threads; never from a runtime worker.
        let flushed = std::thread::spawn(move || {
            let traces = traces.map(|p| p.shutdown());
            let metrics = metrics.map(|p| p.shutdown());
            (traces, metrics)
        })
        .join();
        match flushed {
            Ok((traces, metrics)) => {
                if matches!(traces, Some(Err(_))) {
                    tracing::warn!("could not flush every trace span to the collector");
                }
                if matches!(metrics, Some(Err(_))) {
                    tracing::warn!("could not export the last metrics to the collector");
                }
            }
            Err(_) => tracing::warn!("flushing the OTLP exporters failed"),
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// Whether the environment asks for trace export.
pub fn otlp_configured() -> bool {
    let disabled = env_is("OTEL_SDK_DISABLED", "true") || env_is("OTEL_TRACES_EXPORTER", "none");
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Whether the environment asks for metric export.
pub fn metrics_export_configured() -> bool {
    let disabled = env_is("OTEL_SDK_DISABLED", "true") || env_is("OTEL_METRICS_EXPORTER", "none");
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

/// `OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else the spec's
/// default `http/protobuf`.
fn protocol(signal: &str) -> String {
    std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .map(|p| p.trim().to_string())
        .unwrap_or_else(|_| "http/protobuf".into())
}

/// Logging to stderr (`RUST_LOG`, default `default_filter`) plus, when configured, OTLP
/// export of the [`OTEL_TARGET`] spans and of `registry`. `resource` is added to the
/// exported resource (e.g. `host.name`); `service.name` defaults to `default_service` unless
/// `OTEL_SERVICE_NAME` says otherwise. Must run inside the Tokio runtime (gRPC export).
pub fn init_tracing(
    default_service: &str,
    default_filter: &str,
    resource: &[(&'static str, String)],
    registry: &'static Registry,
) -> TracingGuard {
    let env_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(env_filter.and(filter_fn(|meta| meta.target() != OTEL_TARGET)));
    if otlp_configured() || metrics_export_configured() {
        // The HTTP exporters' client uses rustls without a built-in provider: give it ring.
        // An error only means a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let build_resource = || {
        let mut builder = opentelemetry_sdk::Resource::builder()
            .with_attributes(resource.iter().map(|(k, v)| KeyValue::new(*k, v.clone())));
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            builder = builder.with_service_name(default_service.to_string());
        }
        builder.build()
    };
    // Both outcomes exist from the start (0 while export is off), so that dashboards and
    // `increase()` see the first failure.
    for outcome in ["ok", "failed"] {
        registry.add("faultline_otel_metric_exports_total", &[outcome], 0.0);
    }
    let mut errors = Vec::new();
    let traces = if otlp_configured() {
        span_exporter()
            .map(|exporter| {
                let batch = BatchSpanProcessor::builder(CountingSpanExporter {
                    inner: exporter,
                    registry,
                })
                .build();
                SdkTracerProvider::builder()
                    .with_span_processor(CountingProcessor {
                        inner: batch,
                        registry,
                    })
                    .with_resource(build_resource())
                    .build()
            })
            .map_err(|err| errors.push(err))
            .ok()
    } else {
        None
    };
    let metrics = if metrics_export_configured() {
        metric_exporter()
            .map(|exporter| {
                let reader = PeriodicReader::builder(CountingMetricExporter {
                    inner: exporter,
                    registry,
                })
                .build();
                let provider = SdkMeterProvider::builder()
                    .with_reader(reader)
                    .with_resource(build_resource())
                    .build();
                register_instruments(&provider, registry);
                provider
            })
            .map_err(|err| errors.push(err))
            .ok()
    } else {
        None
    };
    let otel = traces.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("faultline"))
            .with_filter(filter_fn(|meta| meta.target() == OTEL_TARGET))
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    for err in errors {
        tracing::warn!(%err, "OpenTelemetry export not started");
    }
    if traces.is_some() {
        tracing::info!("OpenTelemetry trace export on");
    }
    if metrics.is_some() {
        tracing::info!("OpenTelemetry metric export on");
    }
    TracingGuard { traces, metrics }
}

fn span_exporter() -> Result<opentelemetry_otlp::SpanExporter, OtlpError> {
    let built = match protocol("TRACES").as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build(),
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
        other => return Err(OtlpError::Protocol(other.to_string(), "traces")),
    };
    built.map_err(|source| OtlpError::Exporter {
        signal: "trace",
        source,
    })
}

fn metric_exporter() -> Result<opentelemetry_otlp::MetricExporter, OtlpError> {
    // Temporality: cumulative unless OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE says
    // otherwise (read by the builder).
    let built = match protocol("METRICS").as_str() {
        "grpc" => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build(),
        "http/protobuf" => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
        other => return Err(OtlpError::Protocol(other.to_string(), "metrics")),
    };
    built.map_err(|source| OtlpError::Exporter {
        signal: "metric",
        source,
    })
}

/// One OpenTelemetry instrument per registry family, under the same name: counters and
/// gauges are observed from the registry at each collection (so the two views cannot
/// disagree), histograms are recorded as observations arrive (OpenTelemetry has no
/// asynchronous histogram), with the registry's bucket bounds.
fn register_instruments(provider: &SdkMeterProvider, registry: &'static Registry) {
    let meter = provider.meter("faultline");
    let mut histograms = Vec::new();
    for def in registry.defs() {
        let unit = if def.name.ends_with("_seconds") {
            "s"
        } else {
            ""
        };
        let observe = move |observer: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            for (labels, value) in registry.numbers(def.name) {
                observer.observe(value, &Registry::attributes(def, &labels));
            }
        };
        match def.kind {
            // The handles of observable instruments need not be kept: the callback stays
            // registered with the provider.
            Kind::Counter => {
                meter
                    .f64_observable_counter(def.name)
                    .with_description(def.help)
                    .with_unit(unit)
                    .with_callback(observe)
                    .build();
            }
            Kind::Gauge => {
                meter
                    .f64_observable_gauge(def.name)
                    .with_description(def.help)
                    .with_unit(unit)
                    .with_callback(observe)
                    .build();
            }
            Kind::Histogram(bounds) => {
                let histogram = meter
                    .f64_histogram(def.name)
                    .with_description(def.help)
                    .with_unit(unit)
                    .with_boundaries(bounds.to_vec())
                    .build();
                histograms.push((def.name, histogram));
            }
        }
    }
    registry.attach_otel_histograms(histograms);
}

fn count(registry: &Registry, def: &'static str, labels: &[&str], n: usize) {
    // usize -> f64 is exact far beyond any span count a process reaches.
    #[allow(clippy::cast_precision_loss)]
    registry.add(def, labels, n as f64);
}

/// Counts the spans handed to the batch processor's queue.
#[derive(Debug)]
struct CountingProcessor {
    inner: BatchSpanProcessor,
    registry: &'static Registry,
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        count(self.registry, "faultline_otel_spans_ended_total", &[], 1);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts the spans exported, and those lost with a failed export (the batch processor does
/// not retry).
#[derive(Debug)]
struct CountingSpanExporter<E> {
    inner: E,
    registry: &'static Registry,
}

impl<E: SpanExporter> SpanExporter for CountingSpanExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        let family = if result.is_ok() {
            "faultline_otel_spans_exported_total"
        } else {
            "faultline_otel_spans_dropped_total"
        };
        count(self.registry, family, &[], spans);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts metric exports by outcome.
#[derive(Debug)]
struct CountingMetricExporter<E> {
    inner: E,
    registry: &'static Registry,
}

impl<E: PushMetricExporter> PushMetricExporter for CountingMetricExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        count(
            self.registry,
            "faultline_otel_metric_exports_total",
            &[outcome],
            1,
        );
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}
