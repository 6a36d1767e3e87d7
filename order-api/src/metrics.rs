//! Prometheus metrics of the API and of the load generator, rendered with `prometheus-client`
//! in the OpenMetrics text format (which Prometheus scrapes natively).
//!
//! Counters are registered without their `_total` suffix: the encoder appends it.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`ApiMetrics::render`] and [`LoadMetrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets (seconds): from a cache hit on loopback to the 2 s timeouts.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Labels of `order_api_http_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template (`/orders/{id}`), never the raw path, to bound the series count.
    pub route: String,
    pub method: String,
    pub status: u16,
}

/// Labels of `order_api_http_request_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

/// The API's metrics.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    registry: Arc<Registry>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub db_errors: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_errors: Counter,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics::new()
    }
}

impl ApiMetrics {
    pub fn new() -> ApiMetrics {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "order_api_http_requests",
            "HTTP requests answered, by route template, method and status code",
            http_requests.clone(),
        );
        let http_duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "order_api_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method",
            http_duration.clone(),
        );
        let db_errors = Counter::default();
        registry.register(
            "order_api_db_errors",
            "PostgreSQL operations that failed or timed out",
            db_errors.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "order_api_cache_hits",
            "Order lists served from Redis",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "order_api_cache_misses",
            "Order lists not in Redis, read from PostgreSQL",
            cache_misses.clone(),
        );
        let cache_errors = Counter::default();
        registry.register(
            "order_api_cache_errors",
            "Redis operations that failed or timed out (the request went on without the cache)",
            cache_errors.clone(),
        );
        ApiMetrics {
            registry: Arc::new(registry),
            http_requests,
            http_duration,
            db_errors,
            cache_hits,
            cache_misses,
            cache_errors,
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                method: method.to_string(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_string(),
                method: method.to_string(),
            })
            .observe(seconds);
    }

    /// The exposition text.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        render(&self.registry)
    }
}

/// What the load generator sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Post,
    Get,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Post => "post",
            Kind::Get => "get",
        }
    }
}

/// How a load-generator request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A 2xx answer.
    Ok,
    /// Any other answer, or a connection failure.
    Error,
    /// No answer within the request timeout.
    Timeout,
    /// Never sent: too many requests were already in flight.
    Dropped,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Labels of `order_load_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

/// Labels of `order_load_request_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The load generator's metrics.
#[derive(Debug, Clone)]
pub struct LoadMetrics {
    registry: Arc<Registry>,
    requests: Family<LoadLabels, Counter>,
    duration: Family<KindLabels, Histogram, fn() -> Histogram>,
}

impl Default for LoadMetrics {
    fn default() -> Self {
        LoadMetrics::new()
    }
}

impl LoadMetrics {
    pub fn new() -> LoadMetrics {
        let mut registry = Registry::default();
        let requests = Family::<LoadLabels, Counter>::default();
        registry.register(
            "order_load_requests",
            "Load-generator requests, by kind (post|get) and outcome (ok|error|timeout|dropped)",
            requests.clone(),
        );
        let duration: Family<KindLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "order_load_request_duration_seconds",
            "Latency of answered load-generator requests, by kind",
            duration.clone(),
        );
        // Every series from the start, so that a rate() over "no errors yet" is 0, not absent.
        for kind in [Kind::Post, Kind::Get] {
            for outcome in Outcome::ALL {
                drop(requests.get_or_create(&LoadLabels {
                    kind: kind.as_str(),
                    outcome: outcome.as_str(),
                }));
            }
        }
        LoadMetrics {
            registry: Arc::new(registry),
            requests,
            duration,
        }
    }

    /// Records one request; `seconds` is `None` for a dropped one.
    pub fn observe(&self, kind: Kind, outcome: Outcome, seconds: Option<f64>) {
        self.requests
            .get_or_create(&LoadLabels {
                kind: kind.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(seconds) = seconds
            && matches!(outcome, Outcome::Ok | Outcome::Error)
        {
            self.duration
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .observe(seconds);
        }
    }

    /// The exposition text.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        render(&self.registry)
    }
}

fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_metrics_render_with_the_documented_names() -> Result<(), std::fmt::Error> {
        let metrics = ApiMetrics::new();
        metrics.observe_request("/orders/{id}", "GET", 404, 0.003);
        metrics.observe_request("/orders/{id}", "GET", 404, 0.004);
        metrics.db_errors.inc();
        metrics.cache_hits.inc();
        metrics.cache_hits.inc();
        let text = metrics.render()?;
        for line in [
            "order_api_http_requests_total{route=\"/orders/{id}\",method=\"GET\",status=\"404\"} 2",
            "order_api_http_request_duration_seconds_count{route=\"/orders/{id}\",method=\"GET\"} 2",
            "order_api_http_request_duration_seconds_bucket{le=\"0.005\",route=\"/orders/{id}\",method=\"GET\"} 2",
            "order_api_db_errors_total 1",
            "order_api_cache_hits_total 2",
            "order_api_cache_misses_total 0",
            "order_api_cache_errors_total 0",
            "# TYPE order_api_http_request_duration_seconds histogram",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        Ok(())
    }

    #[test]
    fn load_metrics_start_at_zero_and_count_outcomes() -> Result<(), std::fmt::Error> {
        let metrics = LoadMetrics::new();
        let text = metrics.render()?;
        assert!(
            text.contains("order_load_requests_total{kind=\"post\",outcome=\"dropped\"} 0"),
            "{text}"
        );
        metrics.observe(Kind::Get, Outcome::Ok, Some(0.01));
        metrics.observe(Kind::Get, Outcome::Timeout, Some(2.0));
        metrics.observe(Kind::Post, Outcome::Dropped, None);
        let text = metrics.render()?;
        for line in [
            "order_load_requests_total{kind=\"get\",outcome=\"ok\"} 1",
            "order_load_requests_total{kind=\"get\",outcome=\"timeout\"} 1",
            "order_load_requests_total{kind=\"post\",outcome=\"dropped\"} 1",
            // Timeouts are not latencies: only the answered request is in the histogram.
            "order_load_request_duration_seconds_count{kind=\"get\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        Ok(())
    }
}
