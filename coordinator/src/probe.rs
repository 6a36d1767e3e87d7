//! Runs steady-state probes: performs the I/O that [`faultline_domain::probe`] describes and
//! judges each result with [`evaluate`].
//!
//! * `http`: reqwest without default features, on rustls with the *ring* provider (the same
//!   provider the rest of Faultline uses; reqwest's default TLS would build aws-lc-sys, which
//!   needs cmake). Server certificates are checked against the system's roots through
//!   rustls-platform-verifier (which honours `SSL_CERT_FILE`/`SSL_CERT_DIR`), plus any extra
//!   roots given to [`ProbeRunner::with_extra_roots`]. Redirects are not followed (3xx is a
//!   status like any other), proxies from the environment are ignored, and every attempt opens
//!   a fresh connection, so a fault that stops new connections shows instead of hiding behind
//!   a pooled one. At most [`BODY_LIMIT`] bytes of a body are read.
//! * `tcp`: a connect, closed at once.
//! * `prometheus`: `GET {url}/api/v1/query?query=...`; the value of the first sample of an
//!   instant vector, or of a scalar. Series order is Prometheus's, so a query should return a
//!   single series (aggregate with `sum`, `max`, ...).
//! * `command`: the named agent runs `argv` on its host (see `faultline_agent::probe`): the
//!   request goes out through the hub as a signed command ([`HubHandle::probe`]) and the
//!   agent's `ProbeResult` comes back. The agent kills the program at the probe's time-out (a
//!   `timed out` sample); the coordinator waits that long plus
//!   [`PROBE_ANSWER_GRACE`](crate::hub::PROBE_ANSWER_GRACE) for the answer. `stdout_contains`
//!   looks at the first 4 KiB of stdout, which is all the agent sends. An agent that is not
//!   connected, refuses the request or cannot run the program yields a failed sample saying
//!   so. The latency is the whole round trip, as for the other kinds.
//!
//! [`ProbeScheduler`] runs a set of probes at their intervals and streams the samples.

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultline_domain::probe::{Observation, Outcome, ProbeKind, ProbeSample, ProbeSpec, evaluate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::clock;
use crate::hub::HubHandle;

/// Most bytes of a response body a probe reads (for `body_contains` and Prometheus answers).
pub const BODY_LIMIT: usize = 1 << 20;

/// What a command probe says when the runner has no way to reach agents.
pub const COMMAND_WITHOUT_HUB: &str =
    "command probes run on agents, and this probe runner is not connected to any";

/// Setting up the probe runner failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeRunnerError {
    #[error("setting up TLS for probes: {0}")]
    Tls(#[from] rustls::Error),
    #[error("building the probes' HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Performs probe attempts. Cheap to clone (the HTTP client is shared).
#[derive(Debug, Clone)]
pub struct ProbeRunner {
    http: reqwest::Client,
    /// How `command` probes reach their agents; without it they fail.
    hub: Option<HubHandle>,
}

impl ProbeRunner {
    /// A runner trusting the system's root certificates.
    pub fn new() -> Result<Self, ProbeRunnerError> {
        Self::with_extra_roots(Vec::new())
    }

    /// A runner trusting the system's roots and `extra_roots` (e.g. an internal CA).
    ///
    /// A host without any root certificate still gets a runner: plain `http` works, and every
    /// `https` attempt fails saying that no root certificate was found.
    pub fn with_extra_roots(
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, ProbeRunnerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> =
            match rustls_platform_verifier::Verifier::new_with_extra_roots(
                extra_roots,
                provider.clone(),
            ) {
                Ok(verifier) => Arc::new(verifier),
                Err(error) => {
                    tracing::warn!("https probes will fail: {error}");
                    Arc::new(NoRoots {
                        reason: error.to_string(),
                        provider: provider.clone(),
                    })
                }
            };
        Self::with_verifier(provider, verifier)
    }

    fn with_verifier(
        provider: Arc<CryptoProvider>,
        verifier: Arc<dyn ServerCertVerifier>,
    ) -> Result<Self, ProbeRunnerError> {
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .user_agent(concat!("faultline-probe/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(ProbeRunner { http, hub: None })
    }

    /// This runner, sending `command` probes to their agents through `hub`.
    pub fn with_hub(mut self, hub: HubHandle) -> Self {
        self.hub = Some(hub);
        self
    }

    /// One attempt of `spec`, judged against its tolerance. Never fails: every problem is a
    /// sample with `ok: false`.
    pub async fn run(&self, spec: &ProbeSpec) -> ProbeSample {
        let at_ms = clock::now_ms();
        let started = Instant::now();
        let attempt = async {
            match &spec.kind {
                ProbeKind::Http {
                    url,
                    method,
                    headers,
                    body,
                    ..
                } => self.http(url, method, headers, body.as_deref()).await,
                ProbeKind::Tcp { address, .. } => tcp(address).await,
                ProbeKind::Prometheus { url, query, .. } => self.prometheus(url, query).await,
                ProbeKind::Command { agent, argv, .. } => {
                    self.command(agent, argv, spec.timeout).await
                }
            }
        };
        let outcome = if let ProbeKind::Command { .. } = spec.kind {
            // The agent kills the program at the time-out and says so; the hub waits that
            // long plus a grace for the answer.
            attempt.await
        } else {
            tokio::time::timeout(spec.timeout, attempt)
                .await
                .unwrap_or(Outcome::TimedOut {
                    after: spec.timeout,
                })
        };
        let observation = Observation {
            at_ms,
            latency: Some(started.elapsed()),
            outcome,
        };
        evaluate(&spec.kind, &observation)
    }

    async fn http(
        &self,
        url: &str,
        method: &str,
        headers: &std::collections::BTreeMap<String, String>,
        body: Option<&str>,
    ) -> Outcome {
        let method = match reqwest::Method::from_bytes(method.as_bytes()) {
            Ok(method) => method,
            Err(_) => return Outcome::Failed(format!("invalid HTTP method {method:?}")),
        };
        let mut request = self.http.request(method, url);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Outcome::Failed(describe(&error)),
        };
        let status = response.status().as_u16();
        match read_body(&mut response).await {
            Ok(body) => Outcome::Http {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            },
            Err(error) => Outcome::Failed(format!(
                "HTTP {status}, reading the body: {}",
                describe(&error)
            )),
        }
    }

    async fn command(&self, agent: &str, argv: &[String], timeout: Duration) -> Outcome {
        let Some(hub) = &self.hub else {
            return Outcome::Failed(COMMAND_WITHOUT_HUB.into());
        };
        match hub.probe(agent, argv.to_vec(), timeout).await {
            Ok(result) => command_outcome(agent, &result, timeout),
            Err(error) => Outcome::Failed(error.to_string()),
        }
    }

    async fn prometheus(&self, base: &str, query: &str) -> Outcome {
        let endpoint = format!("{}/api/v1/query", base.trim_end_matches('/'));
        let mut url = match reqwest::Url::parse(&endpoint) {
            Ok(url) => url,
            Err(error) => return Outcome::Failed(format!("invalid URL {endpoint:?}: {error}")),
        };
        url.query_pairs_mut().append_pair("query", query);
        let request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Outcome::Failed(describe(&error)),
        };
        let status = response.status();
        let body = match read_body(&mut response).await {
            Ok(body) => body,
            Err(error) => return Outcome::Failed(describe(&error)),
        };
        match parse_prometheus_value(&body) {
            Ok(value) if status.is_success() => Outcome::Value(value),
            Ok(_) => Outcome::Failed(format!("HTTP {}", status.as_u16())),
            Err(error) if status.is_success() => Outcome::Failed(error),
            Err(error) => Outcome::Failed(format!("HTTP {}: {error}", status.as_u16())),
        }
    }
}

/// One attempt of `spec` with a runner of its own (for one-off checks; a scheduler shares one
/// runner between all attempts).
pub async fn run_probe(spec: &ProbeSpec) -> ProbeSample {
    match ProbeRunner::new() {
        Ok(runner) => runner.run(spec).await,
        Err(error) => ProbeSample {
            at_ms: clock::now_ms(),
            ok: false,
            latency: None,
            value: None,
            detail: error.to_string(),
        },
    }
}

/// What an agent's answer to a command probe amounts to.
pub fn command_outcome(
    agent: &str,
    result: &faultline_proto::v1::ProbeResult,
    timeout: Duration,
) -> Outcome {
    let stderr = result.stderr_tail.trim();
    let stderr = if stderr.is_empty() {
        String::new()
    } else {
        format!(" (stderr: {stderr})")
    };
    if !result.error.is_empty() {
        return Outcome::Failed(format!("agent {agent}: {}", result.error));
    }
    if result.timed_out {
        return Outcome::TimedOut { after: timeout };
    }
    match (result.exit_code, result.signal) {
        (Some(code), _) => Outcome::Exited {
            code,
            stdout: result.stdout.clone(),
        },
        (None, Some(signal)) => Outcome::Failed(format!("killed by signal {signal}{stderr}")),
        (None, None) => Outcome::Failed(format!(
            "agent {agent} answered without an exit code or signal"
        )),
    }
}

async fn tcp(address: &str) -> Outcome {
    match tokio::net::TcpStream::connect(address).await {
        Ok(_stream) => Outcome::Connected,
        Err(error) => Outcome::Failed(format!("connecting to {address}: {error}")),
    }
}

/// Reads at most [`BODY_LIMIT`] bytes of the body; the rest is left unread.
async fn read_body(response: &mut reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while body.len() < BODY_LIMIT {
        match response.chunk().await? {
            Some(chunk) => {
                let room = BODY_LIMIT - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            None => break,
        }
    }
    Ok(body)
}

/// An error and its causes, `outer: inner: innermost` (reqwest's own message names only the
/// outermost layer, such as "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The value a Prometheus `/api/v1/query` answer carries: the first sample of an instant
/// vector, or a scalar. Values are strings in the API (`"1"`, `"NaN"`, `"+Inf"`).
pub fn parse_prometheus_value(body: &[u8]) -> Result<f64, String> {
    let doc: serde_json::Value = serde_json::from_slice(body)
        .map_err(|error| format!("not a Prometheus API response: {error}"))?;
    match doc.get("status").and_then(serde_json::Value::as_str) {
        Some("success") => {}
        Some("error") => {
            let field = |name: &str| {
                doc.get(name)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown")
                    .to_string()
            };
            return Err(format!(
                "prometheus error ({}): {}",
                field("errorType"),
                field("error")
            ));
        }
        _ => return Err("not a Prometheus API response: no status".into()),
    }
    let data = doc.get("data");
    let result = data.and_then(|d| d.get("result"));
    let result_type = data
        .and_then(|d| d.get("resultType"))
        .and_then(serde_json::Value::as_str);
    match (result_type, result) {
        (Some("vector"), Some(serde_json::Value::Array(series))) => match series.first() {
            None => Err("query returned no samples".into()),
            Some(first) => sample_value(first.get("value")),
        },
        (Some("scalar" | "string"), result) => sample_value(result),
        (Some("matrix"), _) => {
            Err("query returned a range vector; a probe needs an instant vector or a scalar".into())
        }
        (other, _) => Err(format!(
            "unexpected Prometheus result type {}",
            other.unwrap_or("(none)")
        )),
    }
}

/// `[<unix time>, "<value>"]` to the value.
fn sample_value(pair: Option<&serde_json::Value>) -> Result<f64, String> {
    let text = pair
        .and_then(|p| p.get(1))
        .and_then(serde_json::Value::as_str)
        .ok_or("malformed sample: expected [time, \"value\"]")?;
    text.parse::<f64>()
        .map_err(|_| format!("sample value {text:?} is not a number"))
}

/// Stands in for the platform verifier on a host without root certificates: every server
/// certificate is refused with the reason.
#[derive(Debug)]
struct NoRoots {
    reason: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoRoots {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(format!(
            "cannot verify the server: {}",
            self.reason
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// --- scheduling -----------------------------------------------------------------------------

/// One sample of one probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeEvent {
    /// The probe's name.
    pub probe: String,
    pub sample: ProbeSample,
}

/// Samples sent and dropped so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerCounts {
    /// Samples delivered to the channel.
    pub sent: u64,
    /// Samples lost because the channel was full.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// Runs probes at their intervals until stopped (or dropped, or the receiver is dropped).
///
/// Each probe has its own task and at most one attempt in flight: an attempt that overruns its
/// interval delays the next one instead of piling up. Samples go to a bounded channel; when
/// it is full, a sample is dropped and counted rather than slowing the probes.
#[derive(Debug)]
pub struct ProbeScheduler {
    tasks: JoinSet<()>,
    counters: Arc<Counters>,
}

impl ProbeScheduler {
    /// Starts every probe in `specs` (first attempts at once) and returns the scheduler with
    /// the receiving end of a channel holding at most `capacity` (at least 1) samples.
    pub fn start(
        runner: ProbeRunner,
        specs: Vec<ProbeSpec>,
        capacity: usize,
    ) -> (Self, mpsc::Receiver<ProbeEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        for spec in specs {
            let runner = runner.clone();
            let tx = tx.clone();
            let counters = counters.clone();
            tasks.spawn(async move {
                // A zero interval would make tokio panic; specs from plans are at least 100ms.
                let mut ticker =
                    tokio::time::interval(spec.interval.max(Duration::from_millis(1)));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut dropping = false;
                loop {
                    ticker.tick().await;
                    let sample = runner.run(&spec).await;
                    let event = ProbeEvent {
                        probe: spec.name.clone(),
                        sample,
                    };
                    match tx.try_send(event) {
                        Ok(()) => {
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                            dropping = false;
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                            if !dropping {
                                tracing::warn!(probe = %spec.name, "probe channel full; dropping samples");
                                dropping = true;
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
            });
        }
        (ProbeScheduler { tasks, counters }, rx)
    }

    /// Samples sent and dropped so far.
    pub fn counts(&self) -> SchedulerCounts {
        SchedulerCounts {
            sent: self.counters.sent.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }

    /// Stops every probe (attempts in flight are abandoned) and returns the final counts.
    pub async fn stop(mut self) -> SchedulerCounts {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.counts()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use faultline_domain::probe::StatusMatch;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Reads a request head and answers `(status, body)` for its path, then closes.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        respond: impl Fn(&str) -> (u16, String),
    ) {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head);
        let path = head.split(' ').nth(1).unwrap_or("/");
        let (status, body) = respond(path);
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    async fn http_server(
        respond: impl Fn(&str) -> (u16, String) + Clone + Send + Sync + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, respond.clone()));
            }
        });
        addr
    }

    fn spec(name: &str, kind: ProbeKind, interval_ms: u64) -> ProbeSpec {
        ProbeSpec {
            interval: Duration::from_millis(interval_ms),
            ..ProbeSpec::new(name, kind)
        }
    }

    /// A port on loopback that nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[test]
    fn prometheus_answers_table() {
        let cases: &[(&str, &str, Result<f64, &str>)] = &[
            (
                "vector, first sample",
                r#"{"status":"success","data":{"resultType":"vector","result":[
                    {"metric":{"__name__":"up","job":"a"},"value":[1435781451.781,"1"]},
                    {"metric":{"__name__":"up","job":"b"},"value":[1435781451.781,"0"]}]}}"#,
                Ok(1.0),
            ),
            (
                "scalar",
                r#"{"status":"success","data":{"resultType":"scalar","result":[1435781451.781,"2.5"]}}"#,
                Ok(2.5),
            ),
            (
                "infinity",
                r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#,
                Ok(f64::INFINITY),
            ),
            (
                "empty vector",
                r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
                Err("query returned no samples"),
            ),
            (
                "not a number",
                r#"{"status":"success","data":{"resultType":"string","result":[1,"hello"]}}"#,
                Err("sample value \"hello\" is not a number"),
            ),
            (
                "matrix",
                r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
                Err("query returned a range vector; a probe needs an instant vector or a scalar"),
            ),
            (
                "api error",
                r#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#,
                Err("prometheus error (bad_data): parse error at char 4"),
            ),
            (
                "malformed sample",
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,2]}]}}"#,
                Err("malformed sample: expected [time, \"value\"]"),
            ),
            (
                "not json",
                "<html>",
                Err("not a Prometheus API response: expected value at line 1 column 1"),
            ),
            (
                "json without status",
                "{}",
                Err("not a Prometheus API response: no status"),
            ),
        ];
        for (name, body, expected) in cases {
            let got = parse_prometheus_value(body.as_bytes());
            assert_eq!(got, expected.map_err(str::to_string), "{name}");
        }
        let nan = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#;
        assert!(parse_prometheus_value(nan.as_bytes()).unwrap().is_nan());
    }

    #[tokio::test]
    async fn http_tcp_prometheus_and_command_attempts() {
        let addr = http_server(|path| match path {
            "/ok" => (200, "all healthy".into()),
            "/teapot" => (418, "short and stout".into()),
            p if p.starts_with("/api/v1/query?query=up") => (
                200,
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"3"]}]}}"#.into(),
            ),
            _ => (404, "no".into()),
        })
        .await;
        let runner = ProbeRunner::new().unwrap();

        let ok = runner
            .run(&spec(
                "ok",
                ProbeKind::http(format!("http://{addr}/ok")),
                1000,
            ))
            .await;
        assert!(ok.ok, "{}", ok.detail);
        assert!(ok.detail.starts_with("HTTP 200 in "), "{}", ok.detail);
        assert!(ok.latency.is_some());

        let teapot = ProbeKind::Http {
            url: format!("http://{addr}/teapot"),
            method: "GET".into(),
            headers: [("X-Probe".to_string(), "1".to_string())].into(),
            body: None,
            expect_status: StatusMatch::List(vec![418]),
            max_latency: None,
            body_contains: Some("stout".into()),
        };
        let sample = runner.run(&spec("teapot", teapot, 1000)).await;
        assert!(sample.ok, "{}", sample.detail);

        let tcp_ok = runner
            .run(&spec("tcp", ProbeKind::tcp(addr.to_string()), 1000))
            .await;
        assert!(tcp_ok.ok, "{}", tcp_ok.detail);
        let closed = closed_port().await;
        let refused = runner
            .run(&spec("tcp", ProbeKind::tcp(closed.to_string()), 1000))
            .await;
        assert!(!refused.ok);
        assert!(
            refused
                .detail
                .starts_with(&format!("connecting to {closed}: ")),
            "{}",
            refused.detail
        );

        let prom = ProbeKind::Prometheus {
            url: format!("http://{addr}/"),
            query: "up".into(),
            min: Some(1.0),
            max: Some(2.0),
        };
        let sample = runner.run(&spec("prom", prom, 1000)).await;
        assert!(!sample.ok);
        assert_eq!(sample.value, Some(3.0));
        assert!(
            sample.detail.ends_with(": above max 2"),
            "{}",
            sample.detail
        );

        let command = ProbeKind::Command {
            agent: "agent-1".into(),
            argv: vec!["true".into()],
            expect_exit: 0,
            stdout_contains: None,
        };
        let sample = run_probe(&spec("cmd", command, 1000)).await;
        assert!(!sample.ok);
        assert_eq!(sample.detail, COMMAND_WITHOUT_HUB);
    }

    /// A connected fake agent `agent-1` on `hub` that checks each probe command's signature
    /// and answers by argv[0]: `ok`, `bad`, `refuse`, `slow`, `killed`; anything else is not
    /// answered. Returns the argv of every request it saw.
    async fn fake_agent(
        hub: &HubHandle,
        key: ed25519_dalek::VerifyingKey,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Vec<String>> {
        use faultline_proto::v1 as pb;
        use prost::Message;

        let (outbound, mut inbound) = mpsc::channel(16);
        let session = crate::hub::AgentSession {
            name: "agent-1".into(),
            version: "test".into(),
            host: None,
            capabilities: Vec::new(),
            peer_address: String::new(),
            connected_at_ms: 0,
            last_seen_ms: 0,
            active_faults: 0,
        };
        hub.connected(session, outbound, 1).await;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let hub = hub.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.recv().await {
                let Some(pb::coordinator_message::Body::Command(signed)) = message.body else {
                    continue;
                };
                faultline_domain::command::verify_signature(
                    &key,
                    &signed.command,
                    &signed.signature,
                )
                .unwrap();
                let command = pb::Command::decode(signed.command.as_slice()).unwrap();
                assert_eq!(command.target_agent, "agent-1");
                let Some(pb::command::Action::Probe(probe)) = command.action else {
                    panic!("not a probe: {command:?}");
                };
                let _ = seen_tx.send(probe.argv.clone());
                let mut result = pb::ProbeResult {
                    request_id: command.command_id.clone(),
                    ..Default::default()
                };
                match probe.argv[0].as_str() {
                    "ok" => {
                        result.exit_code = Some(0);
                        result.stdout = "broker is running".into();
                    }
                    "bad" => {
                        result.exit_code = Some(2);
                        result.stdout = "stopped".into();
                    }
                    "refuse" => result.error = "refused: empty argv".into(),
                    "slow" => {
                        result.timed_out = true;
                        result.signal = Some(9);
                    }
                    "killed" => {
                        result.signal = Some(15);
                        result.stderr_tail = "terminated\n".into();
                    }
                    _ => continue,
                }
                hub.probe_result("agent-1".into(), result).await;
            }
        });
        seen
    }

    #[tokio::test]
    async fn command_probes_go_to_their_agent_and_are_judged_on_its_answer() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let hub = HubHandle::spawn(key.clone(), crate::store::Store::open_in_memory().unwrap());
        let mut seen = fake_agent(&hub, key.verifying_key()).await;
        let runner = ProbeRunner::new().unwrap().with_hub(hub);
        let command = |agent: &str, program: &str| ProbeKind::Command {
            agent: agent.into(),
            argv: vec![program.into(), "status".into()],
            expect_exit: 0,
            stdout_contains: Some("running".into()),
        };
        // (agent, argv[0], ok, detail or its prefix)
        let cases: &[(&str, &str, bool, &str)] = &[
            ("agent-1", "ok", true, "exit 0 in "),
            ("agent-1", "bad", false, "exit 2 in "),
            (
                "agent-1",
                "refuse",
                false,
                "agent agent-1: refused: empty argv",
            ),
            ("agent-1", "slow", false, "timed out after 2s"),
            (
                "agent-1",
                "killed",
                false,
                "killed by signal 15 (stderr: terminated)",
            ),
            ("agent-9", "ok", false, "agent agent-9 not connected"),
        ];
        for (agent, program, ok, detail) in cases {
            let sample = runner
                .run(&spec("cmd", command(agent, program), 1000))
                .await;
            assert_eq!(sample.ok, *ok, "{program}: {}", sample.detail);
            assert!(
                sample.detail.starts_with(detail),
                "{program}: {}",
                sample.detail
            );
            assert!(sample.latency.is_some());
        }
        let bad = runner
            .run(&spec("cmd", command("agent-1", "bad"), 1000))
            .await;
        assert!(
            bad.detail
                .ends_with("exit code 2, expected 0; stdout does not contain \"running\""),
            "{}",
            bad.detail
        );
        // Every attempt on a connected agent reached it, with its argv.
        let mut argvs = Vec::new();
        while let Ok(argv) = seen.try_recv() {
            argvs.push(argv[0].clone());
            assert_eq!(argv[1], "status");
        }
        assert_eq!(argvs, ["ok", "bad", "refuse", "slow", "killed", "bad"]);

        // An agent that never answers: the sample fails after the time-out plus the grace.
        let started = Instant::now();
        let silent = ProbeSpec {
            timeout: Duration::from_millis(100),
            ..spec("cmd", command("agent-1", "silent"), 1000)
        };
        let sample = runner.run(&silent).await;
        assert!(!sample.ok);
        assert_eq!(
            sample.detail, "no answer from agent agent-1 within 2.1s",
            "{}",
            sample.detail
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2100) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn scheduler_streams_samples_until_stopped() {
        let addr = http_server(|_| (200, "ok".into())).await;
        let closed = closed_port().await;
        let specs = vec![
            spec("web", ProbeKind::http(format!("http://{addr}/")), 50),
            spec("down", ProbeKind::tcp(closed.to_string()), 50),
        ];
        let (scheduler, mut rx) = ProbeScheduler::start(ProbeRunner::new().unwrap(), specs, 64);
        let mut web = Vec::new();
        let mut down = Vec::new();
        while web.len() < 3 || down.len() < 3 {
            let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("samples keep coming")
                .expect("channel open");
            match event.probe.as_str() {
                "web" => web.push(event.sample),
                "down" => down.push(event.sample),
                other => panic!("unexpected probe {other}"),
            }
        }
        let counts = scheduler.stop().await;
        assert!(web.iter().all(|s| s.ok), "{web:?}");
        assert!(down.iter().all(|s| !s.ok), "{down:?}");
        // Samples of one probe arrive in order, about an interval apart.
        assert!(web.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(web[2].at_ms - web[0].at_ms >= 80, "{web:?}");
        assert!(counts.sent >= 6, "{counts:?}");
        assert_eq!(counts.dropped, 0);
        // Stopped: the senders are gone once the buffered samples are read.
        while rx.recv().await.is_some() {}
    }

    #[tokio::test]
    async fn full_channel_drops_and_counts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        let specs = vec![spec("fast", ProbeKind::tcp(addr.to_string()), 5)];
        let (scheduler, mut rx) = ProbeScheduler::start(ProbeRunner::new().unwrap(), specs, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while scheduler.counts().dropped < 3 {
            assert!(Instant::now() < deadline, "{:?}", scheduler.counts());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let counts = scheduler.stop().await;
        assert_eq!(counts.sent, 1, "only the first sample fit: {counts:?}");
        assert!(rx.recv().await.expect("the one buffered sample").sample.ok);
        assert!(rx.recv().await.is_none());
    }

    /// A loopback HTTPS server with a certificate from a throwaway CA; returns its address and
    /// the CA certificate.
    async fn https_server() -> (SocketAddr, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        answer(tls, |_| (200, "secure".into())).await;
                    }
                });
            }
        });
        (addr, ca.der().clone())
    }

    #[tokio::test]
    async fn https_checks_the_server_certificate() {
        let (addr, ca) = https_server().await;
        let probe = spec("tls", ProbeKind::http(format!("https://{addr}/")), 1000);

        // The system's roots do not know the throwaway CA.
        let sample = ProbeRunner::new().unwrap().run(&probe).await;
        assert!(!sample.ok);
        assert!(
            sample.detail.contains("invalid peer certificate"),
            "{}",
            sample.detail
        );

        let sample = ProbeRunner::with_extra_roots(vec![ca])
            .unwrap()
            .run(&probe)
            .await;
        assert!(sample.ok, "{}", sample.detail);
        assert!(sample.detail.starts_with("HTTP 200"), "{}", sample.detail);

        // On a host without root certificates, https attempts say why they fail.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let no_roots = Arc::new(NoRoots {
            reason: "No CA certificates were loaded from the system".into(),
            provider: provider.clone(),
        });
        let sample = ProbeRunner::with_verifier(provider, no_roots)
            .unwrap()
            .run(&probe)
            .await;
        assert!(!sample.ok);
        assert!(
            sample.detail.ends_with(
                "cannot verify the server: No CA certificates were loaded from the system"
            ),
            "{}",
            sample.detail
        );
    }

    #[tokio::test]
    async fn attempts_time_out() {
        // Accepts but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let probe = ProbeSpec {
            timeout: Duration::from_millis(150),
            ..spec("hang", ProbeKind::http(format!("http://{addr}/")), 1000)
        };
        let sample = ProbeRunner::new().unwrap().run(&probe).await;
        assert!(!sample.ok);
        assert_eq!(sample.detail, "timed out after 150ms");
        let latency = sample.latency.unwrap();
        assert!(latency >= Duration::from_millis(150), "{latency:?}");
        assert!(latency < Duration::from_secs(2), "{latency:?}");
    }
}
