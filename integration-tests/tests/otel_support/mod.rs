//! Helpers of the OpenTelemetry tests (`otel.rs`, `otel_http.rs`): the Python OTLP receiver,
//! a traced plan, span-tree and metric assertions, the processes' own `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::Cluster;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub fn receiver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp_receiver.py")
}

/// Makes `grpcio` and `opentelemetry-proto` importable (pip, once), or fails loudly.
pub async fn ensure_python_deps() {
    let check = || {
        Command::new("python3")
            .args([
                "-c",
                "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc, \
                 opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    if check().await.is_ok_and(|s| s.success()) {
        return;
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--break-system-packages",
            "grpcio",
            "opentelemetry-proto",
        ])
        .output()
        .await
        .expect("running pip");
    assert!(
        check().await.is_ok_and(|s| s.success()),
        "cannot install grpcio + opentelemetry-proto for the OTLP receiver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the receiver (spans to `out`, metric data points to `metrics`); returns it and its
/// `host:port`.
pub async fn start_receiver(out: &Path, metrics: &Path, http: bool) -> (Child, String) {
    let mut child = Command::new("python3")
        .arg(receiver_script())
        .arg(out)
        .arg("--metrics")
        .arg(metrics)
        .args(if http { &["--http"][..] } else { &[][..] })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting otlp_receiver.py");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("receiver did not start in time")
        .unwrap()
        .expect("receiver exited before listening");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (child, addr)
}

pub fn spans(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn plan(agent: &str, container: &str) -> String {
    format!(
        "apiVersion: faultline/v1
title: Traced pause of {container}
lease: 5s
steady_state:
  probes:
    - {{ name: alive, kind: command, agent: {agent}, argv: [/bin/true], interval: 200ms, timeout: 2s }}
  baseline: 1s
stages:
  - name: pause-db
    faults:
      - kind: container-pause
        agent: {agent}
        target: {{ container: {container} }}
        duration: 2s
"
    )
}

pub async fn run_plan(cluster: &Cluster, plan: &Path) -> (Value, Duration) {
    let started = Instant::now();
    let out = cluster
        .cli(&["run", plan.to_str().unwrap(), "--follow"])
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    (runs[0].clone(), took)
}

pub fn by_name<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

pub fn one<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found = by_name(spans, name);
    assert_eq!(
        found.len(),
        1,
        "exactly one {name} span expected: {spans:#?}"
    );
    found[0]
}

pub fn child_of(child: &Value, parent: &Value) {
    assert_eq!(
        child["parent_span_id"], parent["span_id"],
        "{} must be a child of {}: {child:#} / {parent:#}",
        child["name"], parent["name"]
    );
    assert_eq!(child["trace_id"], parent["trace_id"]);
}

/// Every metric data point received so far.
pub fn metric_points(path: &Path) -> Vec<Value> {
    spans(path)
}

/// The latest data point of metric `name` whose attributes include `attrs`, among those
/// `from` (a predicate on the point, e.g. which process sent it) accepts.
pub fn latest_point<'a>(
    points: &'a [Value],
    name: &str,
    attrs: &[(&str, &str)],
    from: impl Fn(&Value) -> bool,
) -> Option<&'a Value> {
    points
        .iter()
        .filter(|p| p["name"] == name && from(p))
        .filter(|p| attrs.iter().all(|(k, v)| p["attributes"][*k] == *v))
        .max_by_key(|p| p["time_ns"].as_u64().unwrap_or(0))
}

/// Sent by the agent (its resource names it).
pub fn from_agent(point: &Value) -> bool {
    point["resource"]["faultline.agent"].is_string()
}

/// Sent by the coordinator.
pub fn from_coordinator(point: &Value) -> bool {
    !from_agent(point)
}

/// The address a process logged as `metrics listening on http://ADDR/metrics`.
pub fn metrics_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let marker = "metrics listening on http://";
    let at = text.find(marker)?;
    Some(
        text[at + marker.len()..]
            .split("/metrics")
            .next()?
            .to_string(),
    )
}

/// `GET /metrics` over plain HTTP: the value of series `name`, written with its labels as
/// rendered (e.g. `x_total{outcome="failed"}`).
pub async fn scrape_value(addr: &str, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .ok()?
    .ok()?;
    response
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}
