//! The built-in HTTP load generator of a plan's `load:` ([`LoadSpec`]).
//!
//! Open-loop: request `n` starts `n / rate` after the start, whether or not earlier ones have
//! answered, so that a slowed system sees the same arrival rate as a healthy one (a closed
//! loop would back off exactly when the system is hurt, and hide it). At most
//! `max_in_flight` requests are outstanding; a request due while that many are is not sent
//! and is recorded as dropped. Each request is bounded by the spec's timeout; the whole body
//! is read (and discarded), so latencies are those a client sees.
//!
//! The client is reqwest on rustls with the *ring* provider, trusting the system's roots (as
//! the probes do); connections are kept alive and reused like a real client's, proxies from
//! the environment are ignored and redirects are not followed.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_domain::plan::{LoadSpec, format_rate};
use faultline_domain::probe::{Window, format_latency, nearest_rank};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::clock::now_ms;

/// Most bytes of a response body read per request; the rest is not waited for.
const BODY_LIMIT: usize = 1 << 20;
/// Slack after the request time-out for the requests in flight when the load stops.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Setting up the load generator failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("setting up TLS for the load generator: {0}")]
    Tls(#[from] rustls::Error),
    #[error("building the load generator's HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("invalid HTTP method {0:?}")]
    Method(String),
}

/// How one scheduled request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// An answer within `expect_status`.
    Ok,
    /// An answer outside `expect_status`.
    Status(u16),
    /// No answer within the time-out.
    TimedOut,
    /// Connecting, sending or reading failed; a short cause.
    Failed(&'static str),
    /// Not sent: `max_in_flight` requests were outstanding.
    Dropped,
}

impl LoadOutcome {
    /// Why the request counts as an error; `None` for `Ok`.
    pub fn cause(&self) -> Option<String> {
        match self {
            LoadOutcome::Ok => None,
            LoadOutcome::Status(status) => Some(format!("HTTP {status}")),
            LoadOutcome::TimedOut => Some("timed out".into()),
            LoadOutcome::Failed(cause) => Some((*cause).into()),
            LoadOutcome::Dropped => Some("dropped (max_in_flight reached)".into()),
        }
    }
}

/// One scheduled request.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRecord {
    /// When it started (or was due, if dropped), Unix milliseconds.
    pub at_ms: i64,
    /// From start to the end of the body (or the failure); `None` when dropped.
    pub latency: Option<Duration>,
    pub outcome: LoadOutcome,
}

/// Figures over a set of [`LoadRecord`]s.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadStats {
    /// Requests due (sent + dropped).
    pub due: u64,
    pub sent: u64,
    /// Sent requests that failed (status, time-out, transport).
    pub failed: u64,
    pub dropped: u64,
    /// Nearest-rank latency percentiles over the sent requests.
    pub latency_p50: Option<Duration>,
    pub latency_p95: Option<Duration>,
    pub latency_p99: Option<Duration>,
}

impl LoadStats {
    /// Errors (failed + dropped) / due; `None` when nothing was due.
    pub fn error_rate(&self) -> Option<f64> {
        (self.due > 0).then(|| (self.failed + self.dropped) as f64 / self.due as f64)
    }

    /// `500 requests, 3 failed, 0 dropped (0.6% errors), p50 2ms, p95 5ms, p99 9ms`.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} requests, {} failed, {} dropped ({} errors)",
            self.due,
            self.failed,
            self.dropped,
            self.error_rate().map_or("n/a".into(), format_rate)
        );
        let percentiles = [
            ("p50", self.latency_p50),
            ("p95", self.latency_p95),
            ("p99", self.latency_p99),
        ];
        for (name, latency) in percentiles {
            if let Some(latency) = latency {
                text.push_str(&format!(", {name} {}", format_latency(latency)));
            }
        }
        text
    }
}

/// Figures of the records within `window` (all of them when `None`).
pub fn load_stats(records: &[LoadRecord], window: Option<Window>) -> LoadStats {
    let mut stats = LoadStats::default();
    let mut latencies = Vec::new();
    for record in records
        .iter()
        .filter(|r| window.is_none_or(|w| w.contains(r.at_ms)))
    {
        stats.due += 1;
        match record.outcome {
            LoadOutcome::Dropped => stats.dropped += 1,
            LoadOutcome::Ok => stats.sent += 1,
            _ => {
                stats.sent += 1;
                stats.failed += 1;
            }
        }
        latencies.extend(record.latency);
    }
    latencies.sort_unstable();
    stats.latency_p50 = nearest_rank(&latencies, 50);
    stats.latency_p95 = nearest_rank(&latencies, 95);
    stats.latency_p99 = nearest_rank(&latencies, 99);
    stats
}

/// Error causes and how often each occurred, most frequent first.
pub fn causes(records: &[LoadRecord]) -> Vec<(String, u64)> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for cause in records.iter().filter_map(|r| r.outcome.cause()) {
        *counts.entry(cause).or_default() += 1;
    }
    let mut counts: Vec<(String, u64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

/// A running load; stopped with [`LoadGenerator::stop`] (dropping it stops the schedule too,
/// and lets the requests in flight finish in the background).
#[derive(Debug)]
pub struct LoadGenerator {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<LoadRecord>>,
}

impl LoadGenerator {
    /// Starts sending `spec`'s requests (the first at once).
    pub fn start(spec: &LoadSpec) -> Result<Self, LoadError> {
        let method = reqwest::Method::from_bytes(spec.method.as_bytes())
            .map_err(|_| LoadError::Method(spec.method.clone()))?;
        let client = client(spec)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(generate(client, method, Arc::new(spec.clone()), stopped));
        Ok(LoadGenerator { stop, task })
    }

    /// Stops the schedule, waits for the requests in flight (at most the time-out and a
    /// second), and returns every request's record in start order.
    pub async fn stop(self) -> Vec<LoadRecord> {
        self.stop.send_replace(true);
        self.task.await.unwrap_or_default()
    }
}

/// The HTTP client of one load: kept-alive connections, up to `max_in_flight` idle ones.
fn client(spec: &LoadSpec) -> Result<reqwest::Client, LoadError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let tls = match rustls_platform_verifier::Verifier::new_with_extra_roots(Vec::new(), provider) {
        Ok(verifier) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
        Err(error) => {
            // Plain http still works; every https request fails for want of a trusted root.
            tracing::warn!("https load will fail: {error}");
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(usize::try_from(spec.max_in_flight).unwrap_or(usize::MAX))
        .user_agent(concat!("faultline-load/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(client)
}

/// The schedule: one request per slot until `stop` flips (or its sender is gone).
async fn generate(
    client: reqwest::Client,
    method: reqwest::Method,
    spec: Arc<LoadSpec>,
    mut stop: watch::Receiver<bool>,
) -> Vec<LoadRecord> {
    let permits = Arc::new(Semaphore::new(
        usize::try_from(spec.max_in_flight).unwrap_or(usize::MAX),
    ));
    let mut in_flight: JoinSet<LoadRecord> = JoinSet::new();
    let mut records = Vec::new();
    let start = tokio::time::Instant::now();
    let mut slot: u64 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        let due = start + spec.rate.offset(slot);
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                continue;
            }
            () = tokio::time::sleep_until(due) => {}
        }
        while let Some(done) = in_flight.try_join_next() {
            records.extend(done.ok());
        }
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let client = client.clone();
                let method = method.clone();
                let spec = spec.clone();
                in_flight.spawn(async move {
                    let record = request(&client, method, &spec).await;
                    drop(permit);
                    record
                });
            }
            Err(_) => records.push(LoadRecord {
                at_ms: now_ms(),
                latency: None,
                outcome: LoadOutcome::Dropped,
            }),
        }
        slot += 1;
    }
    let drain = async {
        while let Some(done) = in_flight.join_next().await {
            records.extend(done.ok());
        }
    };
    let _ = tokio::time::timeout(spec.timeout + DRAIN_GRACE, drain).await;
    in_flight.abort_all();
    records.sort_by_key(|record| record.at_ms);
    records
}

/// One request, judged.
async fn request(client: &reqwest::Client, method: reqwest::Method, spec: &LoadSpec) -> LoadRecord {
    let at_ms = now_ms();
    let started = Instant::now();
    let mut builder = client.request(method, &spec.url);
    for (name, value) in &spec.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    if let Some(body) = &spec.body {
        builder = builder.body(body.clone());
    }
    let attempt = async {
        let mut response = builder.send().await.map_err(failure)?;
        let status = response.status().as_u16();
        let mut read = 0usize;
        while read < BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                Ok(None) => break,
                Err(_) => return Err(LoadOutcome::Failed("reading the body failed")),
            }
        }
        Ok(status)
    };
    let outcome = match tokio::time::timeout(spec.timeout, attempt).await {
        Err(_) => LoadOutcome::TimedOut,
        Ok(Err(outcome)) => outcome,
        Ok(Ok(status)) if spec.expect_status.contains(status) => LoadOutcome::Ok,
        Ok(Ok(status)) => LoadOutcome::Status(status),
    };
    LoadRecord {
        at_ms,
        latency: Some(started.elapsed()),
        outcome,
    }
}

/// A short cause for a failed send.
fn failure(error: reqwest::Error) -> LoadOutcome {
    if error.is_timeout() {
        return LoadOutcome::TimedOut;
    }
    if error.is_connect() {
        // A refused connection and a failed TLS handshake both surface as connect errors.
        let mut source = error.source();
        while let Some(cause) = source {
            if cause.to_string().to_ascii_lowercase().contains("refused") {
                return LoadOutcome::Failed("connection refused");
            }
            source = cause.source();
        }
        return LoadOutcome::Failed("connection failed");
    }
    LoadOutcome::Failed("request failed")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use faultline_domain::plan::{LoadRate, MAX_IN_FLIGHT};
    use faultline_domain::probe::StatusMatch;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1.1 server on loopback answering every request with `status` after `delay`
    /// (one request per connection), counting the most requests it held at once.
    struct Server {
        url: String,
        most_at_once: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn server(status: u16, delay: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/work", listener.local_addr().unwrap());
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let most = most_at_once.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (now, most) = (now.clone(), most.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(held, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                    now.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Server {
            url,
            most_at_once,
            task,
        }
    }

    fn spec(url: &str, rate: &str, max_in_flight: u32, timeout: Duration) -> LoadSpec {
        LoadSpec {
            url: url.to_string(),
            method: "GET".into(),
            headers: BTreeMap::new(),
            body: None,
            rate: LoadRate::parse(rate).unwrap(),
            timeout,
            expect_status: StatusMatch::default(),
            max_in_flight: max_in_flight.min(MAX_IN_FLIGHT),
        }
    }

    /// Runs `spec` for `run`, returns the records.
    async fn run(spec: &LoadSpec, run: Duration) -> Vec<LoadRecord> {
        let load = LoadGenerator::start(spec).unwrap();
        tokio::time::sleep(run).await;
        load.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_follow_the_rate() {
        let server = server(200, Duration::ZERO).await;
        let spec = spec(&server.url, "100/s", 64, Duration::from_secs(2));
        let records = run(&spec, Duration::from_millis(1000)).await;
        let stats = load_stats(&records, None);
        // Due at 0, 10ms, ..., so about 100 in a second (the schedule starts at once).
        assert!((90..=106).contains(&stats.due), "{stats:?}");
        assert_eq!(stats.failed, 0, "{:?}", causes(&records));
        assert_eq!(stats.dropped, 0, "{stats:?}");
        assert_eq!(stats.sent, stats.due);
        assert!(stats.latency_p95.is_some());
        assert!(records.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        // Start times are spread over the second, not bunched.
        let span = records.last().unwrap().at_ms - records[0].at_ms;
        assert!((850..=1100).contains(&span), "span {span}ms");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_server_gets_the_same_arrivals_up_to_the_cap() {
        let server = server(200, Duration::from_millis(400)).await;
        let spec = spec(&server.url, "50/s", 5, Duration::from_secs(2));
        let records = run(&spec, Duration::from_millis(1000)).await;
        let stats = load_stats(&records, None);
        // Open loop: as many due as against a fast server ...
        assert!((45..=53).contains(&stats.due), "{stats:?}");
        // ... but never more than 5 outstanding: the rest were dropped.
        assert!(server.most_at_once.load(Ordering::SeqCst) <= 5);
        assert!(stats.sent <= 5 * 4, "{stats:?}");
        assert!(stats.dropped >= 25, "{stats:?}");
        assert_eq!(stats.failed, 0, "{:?}", causes(&records));
        assert!(
            stats.latency_p50.unwrap() >= Duration::from_millis(400),
            "{stats:?}"
        );
        assert_eq!(causes(&records)[0].0, "dropped (max_in_flight reached)");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_are_counted_by_cause() {
        let unavailable = server(503, Duration::ZERO).await;
        let records = run(
            &spec(&unavailable.url, "20/s", 8, Duration::from_secs(2)),
            Duration::from_millis(300),
        )
        .await;
        let stats = load_stats(&records, None);
        assert!(stats.due > 0 && stats.failed == stats.due, "{stats:?}");
        assert_eq!(causes(&records), [("HTTP 503".to_string(), stats.due)]);
        assert_eq!(stats.error_rate(), Some(1.0));

        let hanging = server(200, Duration::from_secs(10)).await;
        let records = run(
            &spec(&hanging.url, "10/s", 8, Duration::from_millis(200)),
            Duration::from_millis(250),
        )
        .await;
        assert!(!records.is_empty());
        assert!(
            records.iter().all(|r| r.outcome == LoadOutcome::TimedOut),
            "{records:?}"
        );

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", closed.local_addr().unwrap());
        drop(closed);
        let records = run(
            &spec(&url, "10/s", 8, Duration::from_secs(1)),
            Duration::from_millis(250),
        )
        .await;
        assert!(!records.is_empty());
        assert!(
            records
                .iter()
                .all(|r| r.outcome == LoadOutcome::Failed("connection refused")),
            "{records:?}"
        );
    }

    #[test]
    fn stats_by_window() {
        let record = |at_ms, outcome, latency_ms: Option<u64>| LoadRecord {
            at_ms,
            latency: latency_ms.map(Duration::from_millis),
            outcome,
        };
        let records = vec![
            record(0, LoadOutcome::Ok, Some(1)),
            record(10, LoadOutcome::Ok, Some(2)),
            record(20, LoadOutcome::Status(500), Some(3)),
            record(30, LoadOutcome::Dropped, None),
            record(40, LoadOutcome::TimedOut, Some(100)),
        ];
        let all = load_stats(&records, None);
        assert_eq!((all.due, all.sent, all.failed, all.dropped), (5, 4, 2, 1));
        assert_eq!(all.error_rate(), Some(0.6));
        assert_eq!(all.latency_p50, Some(Duration::from_millis(2)));
        assert_eq!(all.latency_p99, Some(Duration::from_millis(100)));
        assert_eq!(
            all.describe(),
            "5 requests, 2 failed, 1 dropped (60% errors), p50 2ms, p95 100ms, p99 100ms"
        );
        let early = load_stats(&records, Some(Window::new(0, 20)));
        assert_eq!((early.due, early.failed), (2, 0));
        let none = load_stats(&records, Some(Window::new(100, 200)));
        assert_eq!(
            none.describe(),
            "0 requests, 0 failed, 0 dropped (n/a errors)"
        );
        assert_eq!(
            causes(&records),
            [
                ("HTTP 500".to_string(), 1),
                ("dropped (max_in_flight reached)".to_string(), 1),
                ("timed out".to_string(), 1)
            ]
        );
    }
}
