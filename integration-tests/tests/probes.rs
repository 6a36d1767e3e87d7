#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Steady-state probes against real servers on loopback: an HTTP/1.1 server started here
//! (healthy, then failing; slow; a Prometheus `/api/v1/query` endpoint answering in the API's
//! documented JSON format) and a TCP listener that is open, then closed. Checks the samples
//! the runner and the scheduler produce and the statistics computed from them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use faultline_coordinator::probe::{ProbeRunner, ProbeScheduler};
use faultline_domain::probe::{
    ProbeKind, ProbeSample, ProbeSpec, StatusMatch, Steadiness, SteadyRule, Window, steady,
    summarize,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How many healthy answers `/health` gives before it starts failing.
const HEALTHY_ANSWERS: usize = 3;
/// How long `/slow` takes to answer.
const SLOW: Duration = Duration::from_millis(300);

/// The example instant-vector answer from the Prometheus HTTP API documentation.
const PROM_VECTOR: &str = r#"{
   "status" : "success",
   "data" : {
      "resultType" : "vector",
      "result" : [
         {
            "metric" : {
               "__name__" : "up",
               "job" : "prometheus",
               "instance" : "localhost:9090"
            },
            "value": [ 1435781451.781, "1" ]
         },
         {
            "metric" : {
               "__name__" : "up",
               "job" : "node",
               "instance" : "localhost:9100"
            },
            "value" : [ 1435781451.781, "0" ]
         }
      ]
   }
}"#;
const PROM_SCALAR: &str =
    r#"{"status":"success","data":{"resultType":"scalar","result":[1435781451.781,"42.5"]}}"#;
const PROM_EMPTY: &str = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
const PROM_ERROR: &str = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error: unexpected end of input"}"#;

/// A small HTTP/1.1 server: one request per connection, `Connection: close`.
///
/// * `/health`: `200 status: healthy` for the first [`HEALTHY_ANSWERS`] requests, then
///   `500 status: degraded`.
/// * `/slow`: `200 slow but healthy` after [`SLOW`].
/// * `/api/v1/query?query=Q`: Prometheus answers for Q = `up`, `answer`, `absent`, `broken`.
async fn start_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health_hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let health_hits = health_hits.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                let (status, body) = match target.split_once("?query=") {
                    Some(("/api/v1/query", "up")) => (200, PROM_VECTOR),
                    Some(("/api/v1/query", "answer")) => (200, PROM_SCALAR),
                    Some(("/api/v1/query", "absent")) => (200, PROM_EMPTY),
                    Some(("/api/v1/query", _)) => (400, PROM_ERROR),
                    _ => match target.as_str() {
                        "/health" => {
                            if health_hits.fetch_add(1, Ordering::SeqCst) < HEALTHY_ANSWERS {
                                (200, "status: healthy")
                            } else {
                                (500, "status: degraded")
                            }
                        }
                        "/slow" => {
                            tokio::time::sleep(SLOW).await;
                            (200, "slow but healthy")
                        }
                        _ => (404, "not found"),
                    },
                };
                let response = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

fn http(url: String, max_latency: Option<Duration>, body_contains: Option<&str>) -> ProbeKind {
    ProbeKind::Http {
        url,
        method: "GET".into(),
        headers: Default::default(),
        body: None,
        expect_status: StatusMatch::default(),
        max_latency,
        body_contains: body_contains.map(Into::into),
    }
}

fn spec(name: &str, kind: ProbeKind, interval: Duration) -> ProbeSpec {
    ProbeSpec {
        interval,
        ..ProbeSpec::new(name, kind)
    }
}

/// A window holding exactly `samples[from..to]` (by start time).
fn window(samples: &[ProbeSample], from: usize, to: usize) -> Window {
    let end = match samples.get(to) {
        Some(next) => next.at_ms,
        None => samples[to - 1].at_ms + 1,
    };
    Window::new(samples[from].at_ms, end)
}

#[tokio::test]
async fn scheduler_sees_a_healthy_service_degrade() {
    let addr = start_server().await;
    let interval = Duration::from_millis(100);
    let health = spec(
        "health",
        http(format!("http://{addr}/health"), None, Some("healthy")),
        interval,
    );
    let port = spec("port", ProbeKind::tcp(addr.to_string()), interval);
    let runner = ProbeRunner::new().unwrap();
    let (scheduler, mut rx) = ProbeScheduler::start(runner, vec![health, port], 64);

    let mut health_samples = Vec::new();
    let mut port_samples = Vec::new();
    while health_samples.len() < 6 {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a sample within 10s")
            .expect("the scheduler is running");
        match event.probe.as_str() {
            "health" => health_samples.push(event.sample),
            "port" => port_samples.push(event.sample),
            other => panic!("sample of an unknown probe {other}"),
        }
    }
    let counts = scheduler.stop().await;
    assert_eq!(counts.dropped, 0);
    assert!(counts.sent >= 6, "{counts:?}");

    let oks: Vec<bool> = health_samples.iter().map(|s| s.ok).collect();
    assert_eq!(
        oks,
        [true, true, true, false, false, false],
        "{health_samples:#?}"
    );
    assert!(health_samples[0].detail.starts_with("HTTP 200 in "));
    assert!(
        health_samples[3]
            .detail
            .ends_with(": status 500 not in 200-399; body does not contain \"healthy\""),
        "{}",
        health_samples[3].detail
    );
    // Attempts start about an interval apart.
    for pair in health_samples.windows(2) {
        let gap = pair[1].at_ms - pair[0].at_ms;
        assert!(
            (50..1000).contains(&gap),
            "gap {gap}ms: {health_samples:#?}"
        );
    }
    assert!(port_samples.iter().all(|s| s.ok), "{port_samples:#?}");

    // Baseline (the three healthy answers) versus the degraded period.
    let baseline = summarize(&health_samples, window(&health_samples, 0, 3));
    assert_eq!((baseline.count, baseline.errors), (3, 0));
    assert_eq!(baseline.error_rate, Some(0.0));
    let p50 = baseline.latency_p50.unwrap();
    let p95 = baseline.latency_p95.unwrap();
    let p99 = baseline.latency_p99.unwrap();
    assert!(p50 <= p95 && p95 <= p99 && p99 < Duration::from_secs(1));
    assert!(baseline.throughput_per_sec.unwrap() > 0.0);
    assert_eq!(baseline.value_mean, None);

    let degraded = summarize(&health_samples, window(&health_samples, 3, 6));
    assert_eq!((degraded.count, degraded.errors), (3, 3));
    assert_eq!(degraded.error_rate, Some(1.0));
    assert_eq!(degraded.throughput_per_sec, Some(0.0));

    let all = summarize(&health_samples, window(&health_samples, 0, 6));
    assert_eq!((all.count, all.errors), (6, 3));
    assert_eq!(all.error_rate, Some(0.5));

    // Before the faults the probe was steady; by the end it is not.
    let rule = SteadyRule::all_ok(3);
    assert_eq!(steady(&health_samples[..3], &rule), Steadiness::Steady);
    assert_eq!(
        steady(&health_samples[..2], &rule),
        Steadiness::Undecided("2 of 3 samples needed".into())
    );
    match steady(&health_samples, &rule) {
        Steadiness::NotSteady(reason) => assert!(
            reason.starts_with(
                "3 of the last 3 samples failed (100% > 0% allowed); latest: HTTP 500"
            ),
            "{reason}"
        ),
        other => panic!("expected not steady, got {other:?}"),
    }
    let tolerant = SteadyRule::new(6, 6, 0.5).unwrap();
    assert_eq!(steady(&health_samples, &tolerant), Steadiness::Steady);
}

#[tokio::test]
async fn max_latency_and_timeout_against_a_slow_endpoint() {
    let addr = start_server().await;
    let runner = ProbeRunner::new().unwrap();
    let url = format!("http://{addr}/slow");
    let second = Duration::from_secs(1);

    let strict = spec(
        "strict",
        http(url.clone(), Some(Duration::from_millis(100)), None),
        second,
    );
    let relaxed = spec(
        "relaxed",
        http(url.clone(), Some(Duration::from_secs(2)), None),
        second,
    );
    let impatient = ProbeSpec {
        timeout: Duration::from_millis(100),
        ..spec("impatient", http(url, None, None), second)
    };

    let mut samples = Vec::new();
    for probe in [&strict, &relaxed, &strict, &impatient] {
        samples.push(runner.run(probe).await);
        // Distinct start times for the window below.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let slow = &samples[0];
    assert!(!slow.ok);
    assert!(slow.latency.unwrap() >= SLOW, "{slow:?}");
    assert!(slow.detail.starts_with("HTTP 200 in "), "{}", slow.detail);
    assert!(
        slow.detail.ends_with(": slower than max_latency 100ms"),
        "{}",
        slow.detail
    );
    assert!(samples[1].ok, "{}", samples[1].detail);
    assert!(!samples[2].ok);

    let timed_out = &samples[3];
    assert!(!timed_out.ok);
    assert_eq!(timed_out.detail, "timed out after 100ms");
    let waited = timed_out.latency.unwrap();
    assert!(
        waited >= Duration::from_millis(100) && waited < SLOW,
        "{waited:?}"
    );

    // Nearest rank over 4 latencies: p50 is the 2nd smallest, p95 and p99 the largest. The
    // time-out (about 100ms) is the smallest; the three full answers took about 300ms.
    let stats = summarize(&samples, window(&samples, 0, 4));
    assert_eq!((stats.count, stats.errors), (4, 3));
    assert_eq!(stats.error_rate, Some(0.75));
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency.unwrap()).collect();
    latencies.sort();
    assert_eq!(stats.latency_p50, Some(latencies[1]));
    assert_eq!(stats.latency_p95, Some(latencies[3]));
    assert_eq!(stats.latency_p99, Some(latencies[3]));
    assert!(stats.latency_p50.unwrap() >= SLOW);
}

#[tokio::test]
async fn tcp_probe_sees_a_listener_open_then_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let runner = ProbeRunner::new().unwrap();
    let probe = ProbeSpec {
        kind: ProbeKind::Tcp {
            address: addr.to_string(),
            max_latency: Some(Duration::from_secs(1)),
        },
        ..ProbeSpec::new("port", ProbeKind::tcp(""))
    };
    let mut samples = Vec::new();
    for _ in 0..2 {
        samples.push(runner.run(&probe).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Close the port: the task owns the listener.
    accepting.abort();
    let _ = accepting.await;
    for _ in 0..2 {
        samples.push(runner.run(&probe).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let oks: Vec<bool> = samples.iter().map(|s| s.ok).collect();
    assert_eq!(oks, [true, true, false, false], "{samples:#?}");
    assert!(
        samples[0].detail.starts_with("connected in "),
        "{}",
        samples[0].detail
    );
    assert!(
        samples[2]
            .detail
            .starts_with(&format!("connecting to {addr}: "))
            && samples[2].detail.contains("refused"),
        "{}",
        samples[2].detail
    );
    let open = summarize(&samples, window(&samples, 0, 2));
    let closed = summarize(&samples, window(&samples, 2, 4));
    assert_eq!(
        (open.count, open.errors, open.error_rate),
        (2, 0, Some(0.0))
    );
    assert_eq!(
        (closed.count, closed.errors, closed.error_rate),
        (2, 2, Some(1.0))
    );
    assert!(open.latency_p99.unwrap() < Duration::from_secs(1));
}

#[tokio::test]
async fn prometheus_probe_reads_instant_queries() {
    let addr = start_server().await;
    let runner = ProbeRunner::new().unwrap();
    // (query, min, max, ok, value, end of detail)
    type Case = (
        &'static str,
        Option<f64>,
        Option<f64>,
        bool,
        Option<f64>,
        &'static str,
    );
    let cases: &[Case] = &[
        ("up", Some(1.0), None, true, Some(1.0), "value 1 in "),
        ("up", None, Some(0.5), false, Some(1.0), ": above max 0.5"),
        (
            "answer",
            Some(40.0),
            Some(45.0),
            true,
            Some(42.5),
            "value 42.5 in ",
        ),
        (
            "answer",
            Some(50.0),
            None,
            false,
            Some(42.5),
            ": below min 50",
        ),
        (
            "absent",
            None,
            None,
            false,
            None,
            "query returned no samples",
        ),
        (
            "broken",
            None,
            None,
            false,
            None,
            "HTTP 400: prometheus error (bad_data): invalid parameter \"query\": 1:5: parse error: \
             unexpected end of input",
        ),
    ];
    let mut samples = Vec::new();
    for (query, min, max, ok, value, detail) in cases {
        let probe = spec(
            "prom",
            ProbeKind::Prometheus {
                // A trailing slash on the base URL is fine.
                url: format!("http://{addr}/"),
                query: query.to_string(),
                min: *min,
                max: *max,
            },
            Duration::from_secs(1),
        );
        let sample = runner.run(&probe).await;
        assert_eq!(sample.ok, *ok, "{query}: {}", sample.detail);
        assert_eq!(sample.value, *value, "{query}");
        assert!(
            sample.detail.starts_with(detail) || sample.detail.ends_with(detail),
            "{query}: {:?} vs {detail:?}",
            sample.detail
        );
        samples.push(sample);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let stats = summarize(&samples, window(&samples, 0, samples.len()));
    assert_eq!((stats.count, stats.errors), (6, 4));
    assert_eq!(stats.value_min, Some(1.0));
    assert_eq!(stats.value_max, Some(42.5));
    assert_eq!(stats.value_mean, Some((1.0 + 1.0 + 42.5 + 42.5) / 4.0));
}

#[tokio::test]
async fn probe_specs_deserialize_and_run() {
    // The YAML form is tested in the domain crate; any serde format reads the same specs.
    let addr = start_server().await;
    let json = format!(
        r#"[
            {{"name": "web", "kind": "http", "url": "http://{addr}/slow", "max_latency": "2s",
              "body_contains": "healthy", "interval": "200ms", "timeout": "1s"}},
            {{"name": "port", "kind": "tcp", "address": "{addr}"}}
        ]"#
    );
    let specs: Vec<ProbeSpec> = serde_json::from_str(&json).unwrap();
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[0].interval, Duration::from_millis(200));
    assert_eq!(specs[1].timeout, Duration::from_secs(2));
    let runner = ProbeRunner::new().unwrap();
    for probe in &specs {
        let sample = runner.run(probe).await;
        assert!(sample.ok, "{}: {}", probe.name, sample.detail);
    }
}
