//! `faultline-order-api load`: the "market simulator" that keeps orders flowing through the
//! demo stack, so that a fault shows up as errors and latency on a live workload.
//!
//! It is open loop: requests start on a fixed schedule whether or not earlier ones have been
//! answered, as real clients do; a slow target therefore builds up requests in flight instead
//! of quietly lowering the rate (closed-loop generators hide outages that way). In-flight
//! requests are capped; a request due while the cap is reached is counted as dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::MissedTickBehavior;

use crate::metrics::{self, Kind, LoadMetrics, Outcome};
use crate::shutdown::{ShutdownError, Signals};

/// Budget of one request, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the one-line summary is printed.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// One order in this many requests; the others list orders.
const POST_EVERY: u64 = 4;
/// The simulated tickers.
const SYMBOLS: [&str; 8] = [
    "ACME", "GLOBEX", "INITECH", "UMBRELLA", "HOOLI", "STARK", "WAYNE", "OSCORP",
];

/// Why the load generator could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the rate must be a positive number of requests per second, got {0}")]
    Rate(f64),
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("setting up the HTTP client's (unused) TLS: {0}")]
    Tls(#[source] rustls::Error),
    #[error("binding the metrics listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
}

/// The generator's settings.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Orders are POSTed to, and listed from, this URL.
    pub target: String,
    /// Requests per second.
    pub rate: f64,
    pub metrics_listen: SocketAddr,
    /// Most requests in flight at once; `None`: one second's worth, at least 8.
    pub max_in_flight: Option<usize>,
}

impl LoadConfig {
    fn in_flight_cap(&self) -> usize {
        self.max_in_flight
            .unwrap_or_else(|| (self.rate.ceil() as usize).max(8))
            .max(1)
    }
}

/// Counts since the last summary line.
#[derive(Debug, Default)]
struct Window {
    ok: u64,
    error: u64,
    timeout: u64,
    dropped: u64,
    /// Seconds, of answered requests (timeouts would only say "2 s").
    latencies: Vec<f64>,
}

impl Window {
    fn record(&mut self, outcome: Outcome, seconds: Option<f64>) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Error => self.error += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Dropped => self.dropped += 1,
        }
        if let (Outcome::Ok | Outcome::Error, Some(seconds)) = (outcome, seconds) {
            self.latencies.push(seconds);
        }
    }

    /// The summary line, e.g. `ok=97 err=2 timeouts=1 dropped=0 p50=3.1ms p99=20.4ms`.
    fn summary(&mut self) -> String {
        self.latencies.sort_by(f64::total_cmp);
        let quantile =
            |q: f64| percentile(&self.latencies, q).map_or_else(|| "-".to_string(), format_ms);
        format!(
            "ok={} err={} timeouts={} dropped={} p50={} p99={}",
            self.ok,
            self.error,
            self.timeout,
            self.dropped,
            quantile(0.50),
            quantile(0.99)
        )
    }
}

/// The `q` quantile of sorted samples (nearest rank), or `None` without samples.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn format_ms(seconds: f64) -> String {
    format!("{:.1}ms", seconds * 1000.0)
}

/// Whether the `n`-th request (from 0) places an order: 1 in [`POST_EVERY`].
pub fn kind_of(n: u64) -> Kind {
    if n.is_multiple_of(POST_EVERY) {
        Kind::Post
    } else {
        Kind::Get
    }
}

/// A small xorshift generator: the orders only need to look varied, not be unpredictable.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn order(&mut self) -> String {
        let symbol = SYMBOLS[(self.next() % SYMBOLS.len() as u64) as usize];
        let qty = 1 + self.next() % 1000;
        serde_json::json!({ "symbol": symbol, "qty": qty }).to_string()
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(config: LoadConfig) -> Result<(), LoadError> {
    if !(config.rate.is_finite() && config.rate > 0.0) {
        return Err(LoadError::Rate(config.rate));
    }
    let mut signals = Signals::install()?;
    // Plain HTTP only. But in a workspace build reqwest is unified with the coordinator's
    // rustls features: without a TLS configuration of its own, `build()` panics for want of
    // a crypto provider or fails loading the system's CA store, which the scratch image of
    // the lab does not have. So it gets one that trusts nothing: https targets fail
    // verification, plain HTTP is untouched.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(LoadError::Tls)?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(LoadError::Client)?;
    let metrics = LoadMetrics::new();
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| LoadError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let metrics_app = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(metrics.clone());
    let metrics_server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, metrics_app).await {
            tracing::error!(error = %e, "metrics listener failed");
        }
    });

    let cap = config.in_flight_cap();
    tracing::info!(
        target = %config.target,
        rate = config.rate,
        max_in_flight = cap,
        metrics = %config.metrics_listen,
        "load generator started"
    );
    let in_flight = Arc::new(Semaphore::new(cap));
    let window = Arc::new(Mutex::new(Window::default()));
    let mut rng = Rng::seeded();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate));
    // Open loop: if this task itself fell behind, the missed requests are still due.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut summary =
        tokio::time::interval_at(tokio::time::Instant::now() + SUMMARY_EVERY, SUMMARY_EVERY);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let kind = kind_of(n);
                n += 1;
                match in_flight.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let body = (kind == Kind::Post).then(|| rng.order());
                        tokio::spawn(one_request(
                            client.clone(),
                            config.target.clone(),
                            kind,
                            body,
                            metrics.clone(),
                            window.clone(),
                            permit,
                        ));
                    }
                    Err(_) => {
                        metrics.observe(kind, Outcome::Dropped, None);
                        lock(&window).record(Outcome::Dropped, None);
                    }
                }
            }
            _ = summary.tick() => {
                let line = std::mem::take(&mut *lock(&window)).summary();
                println!("load: last {}s: {line}", SUMMARY_EVERY.as_secs());
            }
            signal = signals.recv() => {
                tracing::info!(signal, "load generator stopping");
                break;
            }
        }
    }
    metrics_server.abort();
    Ok(())
}

fn lock(window: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    // A panic while counting leaves the counts usable.
    window.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn one_request(
    client: reqwest::Client,
    target: String,
    kind: Kind,
    body: Option<String>,
    metrics: LoadMetrics,
    window: Arc<Mutex<Window>>,
    _permit: OwnedSemaphorePermit,
) {
    let start = Instant::now();
    let request = match body {
        Some(body) => client
            .post(&target)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body),
        None => client.get(&target),
    };
    // The body is read too: a request is done when its answer has fully arrived.
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = request.send().await?;
        let status = response.status();
        response.bytes().await?;
        Ok::<_, reqwest::Error>(status)
    })
    .await;
    let seconds = start.elapsed().as_secs_f64();
    let outcome = match result {
        Ok(Ok(status)) if status.is_success() => Outcome::Ok,
        Ok(Ok(status)) => {
            tracing::debug!(%status, kind = kind.as_str(), "request refused");
            Outcome::Error
        }
        Ok(Err(e)) if e.is_timeout() => Outcome::Timeout,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, kind = kind.as_str(), "request failed");
            Outcome::Error
        }
        Err(_) => Outcome::Timeout,
    };
    metrics.observe(kind, outcome, Some(seconds));
    lock(&window).record(outcome, Some(seconds));
}

async fn render_metrics(
    axum::extract::State(metrics): axum::extract::State<LoadMetrics>,
) -> axum::response::Response {
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_post_for_three_gets() {
        let kinds: Vec<Kind> = (0..8).map(kind_of).collect();
        assert_eq!(
            kinds,
            [
                Kind::Post,
                Kind::Get,
                Kind::Get,
                Kind::Get,
                Kind::Post,
                Kind::Get,
                Kind::Get,
                Kind::Get
            ]
        );
    }

    #[test]
    fn generated_orders_are_valid() {
        let mut rng = Rng::seeded();
        for _ in 0..200 {
            let body = rng.order();
            assert!(
                crate::order::NewOrder::from_json(body.as_bytes()).is_ok(),
                "{body}"
            );
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.50), Some(50.0));
        assert_eq!(percentile(&samples, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn summary_counts_outcomes_and_ignores_timeouts_in_latency() {
        let mut window = Window::default();
        window.record(Outcome::Ok, Some(0.002));
        window.record(Outcome::Ok, Some(0.004));
        window.record(Outcome::Error, Some(0.001));
        window.record(Outcome::Timeout, Some(2.0));
        window.record(Outcome::Dropped, None);
        assert_eq!(
            window.summary(),
            "ok=2 err=1 timeouts=1 dropped=1 p50=2.0ms p99=4.0ms"
        );
        assert_eq!(
            Window::default().summary(),
            "ok=0 err=0 timeouts=0 dropped=0 p50=- p99=-"
        );
    }

    #[test]
    fn the_in_flight_cap_defaults_to_one_second_of_requests() {
        let config = |rate, max_in_flight| LoadConfig {
            target: String::new(),
            rate,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_in_flight,
        };
        assert_eq!(config(10.0, None).in_flight_cap(), 10);
        assert_eq!(config(0.5, None).in_flight_cap(), 8);
        assert_eq!(config(100.0, Some(3)).in_flight_cap(), 3);
        assert_eq!(config(100.0, Some(0)).in_flight_cap(), 1);
    }
}
