#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Steady state and stop conditions, on loopback: the "service" is a TCP listener in the test.
//! A run whose probe is not steady applies nothing; a run whose service goes down while its
//! fault is applied is stopped by its stop condition and reverted at once; a run that stays
//! steady records a steady recovery check.
//!
//! Probe statistics in reports: a run whose fault SIGSTOPs the very process its HTTP probe asks
//! (this test binary, re-executed as a small HTTP server) has a report with baseline, during
//! and after figures, a failure detection time and a recovery time; and a coordinator killed
//! mid-run keeps the samples it had stored.

use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod report_support;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Set in the environment of this test binary re-executed as an HTTP service.
const SERVE_HTTP: &str = "FAULTLINE_TEST_SERVE_HTTP";
/// The line the re-executed service prints once it listens, followed by its address.
const SERVING_ON: &str = "serving http on ";

/// A TCP "service" on 127.0.0.1 accepting (and closing) connections until the task is aborted.
async fn service() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        }
    });
    (address, task)
}

/// An address on which nothing listens.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

fn plan(title: &str, address: &str, container: &str, duration: &str) -> String {
    format!(
        "apiVersion: faultline/v1
title: {title}
lease: 30s
steady_state:
  probes:
    - {{ name: api, kind: tcp, address: \"{address}\", interval: 200ms, timeout: 500ms }}
  baseline: 1s
  max_error_rate: 0%
stop_conditions:
  - {{ probe: api, max_error_rate: 50%, window: 1s }}
stages:
  - name: pause
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {container} }}
        duration: {duration}
"
    )
}

/// Starts `yaml` and returns the run's id.
async fn start_run(cluster: &Cluster, name: &str, yaml: &str) -> String {
    let path = cluster.write_plan(name, yaml).unwrap();
    let out = cluster.cli(&["run", path.to_str().unwrap()]).await.unwrap();
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
    runs[0]["id"].as_str().unwrap().to_string()
}

/// The run once it has ended, polled for at most `timeout`.
async fn finished(cluster: &Cluster, run_id: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let run = cluster
            .cli_json(&["runs", "show", run_id, "--output", "json"])
            .await
            .unwrap();
        if run["state"] != "running" {
            return run;
        }
        assert!(Instant::now() < deadline, "run still running: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn events_of<'a>(run: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    run["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_is_not_steady_before_injection_applies_nothing() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-steady-a").await.unwrap();
    let address = closed_port().await;
    let yaml = plan("Not steady", &address, &target.name, "60s");
    let run_id = start_run(&cluster, "not-steady.yaml", &yaml).await;

    let run = finished(&cluster, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["state"], "aborted", "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(reason.contains("not steady before injection"), "{reason}");
    let checks = events_of(&run, "steady-state-check");
    assert_eq!(checks.len(), 1, "{run}");
    assert!(
        checks[0]["message"]
            .as_str()
            .unwrap()
            .contains("not steady"),
        "{run}"
    );
    assert!(events_of(&run, "fault-sent").is_empty(), "{run}");
    assert_eq!(target.state().await.unwrap(), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_condition_aborts_the_run_and_reverts_its_faults() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-steady-b").await.unwrap();
    let (address, service) = service().await;
    let yaml = plan("Stop on errors", &address, &target.name, "60s");
    let run_id = start_run(&cluster, "stop.yaml", &yaml).await;
    target
        .wait_for_state("paused", Duration::from_secs(30))
        .await
        .unwrap();

    // The service goes down while the fault is applied.
    service.abort();
    let _ = service.await;
    let closed = Instant::now();

    let run = finished(&cluster, &run_id, Duration::from_secs(30)).await;
    let took = closed.elapsed();
    assert_eq!(run["state"], "aborted", "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(reason.contains("stop condition on probe api"), "{reason}");
    let stops = events_of(&run, "stop-condition");
    assert_eq!(stops.len(), 1, "{run}");
    let message = stops[0]["message"].as_str().unwrap();
    assert!(message.contains("> 50%"), "{message}");
    assert_eq!(target.state().await.unwrap(), "running", "reverted");
    // Window (1s) + evaluation period + revert, far from the fault's 60s.
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
    assert!(!events_of(&run, "fault-reverted").is_empty(), "{run}");

    let report = report_support::validated_report(&cluster, &run_id).await;
    assert_eq!(report["run"]["state"], "aborted");
    assert_eq!(
        report["verdict"], "refuted",
        "a stop condition refutes: {report:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_run_completes_with_a_steady_recovery_check() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-steady-c").await.unwrap();
    let (address, service) = service().await;
    let yaml = plan("Steady", &address, &target.name, "1s");
    let run_id = start_run(&cluster, "steady.yaml", &yaml).await;

    let run = finished(&cluster, &run_id, Duration::from_secs(60)).await;
    service.abort();
    assert_eq!(run["state"], "completed", "{run}");
    let baseline = events_of(&run, "steady-state-check");
    assert_eq!(baseline.len(), 1, "{run}");
    assert!(
        baseline[0]["message"]
            .as_str()
            .unwrap()
            .contains("(steady)"),
        "{run}"
    );
    let recovery = events_of(&run, "recovery-check");
    assert_eq!(recovery.len(), 1, "{run}");
    let message = recovery[0]["message"].as_str().unwrap();
    assert!(message.contains("(steady)"), "{message}");
    assert!(message.contains("api: steady"), "{message}");
    assert_eq!(target.state().await.unwrap(), "running");
}

/// Not a test of its own: this binary, re-executed with [`SERVE_HTTP`] set, serves HTTP on
/// loopback (one request at a time, `200 ok` to anything) until killed. Without it, returns.
#[test]
#[ignore = "the HTTP service of a_stopped_service_shows_in_the_probe_statistics_of_the_report"]
fn serve_http_when_asked() {
    if std::env::var_os(SERVE_HTTP).is_none() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{SERVING_ON}{}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    }
}

/// This test binary re-executed as an HTTP service (see [`serve_http_when_asked`]), killed
/// when dropped; returns it with its address.
async fn http_service_process() -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "serve_http_when_asked",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(SERVE_HTTP, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest may print `test NAME ... ` on the same line first.
            if let Some((_, address)) = line.split_once(SERVING_ON) {
                return address.trim().to_string();
            }
        }
        panic!("the HTTP service process ended before listening");
    })
    .await
    .expect("the HTTP service process did not listen within 20s");
    (child, address)
}

fn schema_errors(report: &Value) -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/report.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    validator
        .iter_errors(report)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

fn count(window: &Value, field: &str) -> u64 {
    window[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count: {window}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_service_shows_in_the_probe_statistics_of_the_report() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let (service, address) = http_service_process().await;
    let pid = service.id().unwrap();
    let yaml = format!(
        "apiVersion: faultline/v1
title: Freeze the service under its probe
lease: 30s
steady_state:
  probes:
    - {{ name: api, kind: http, url: \"http://{address}/health\", interval: 200ms, timeout: 400ms }}
  baseline: 1s
  max_error_rate: 0%
stages:
  - name: freeze
    faults:
      - kind: process-stop
        agent: agent-1
        target: {{ pid: {pid} }}
        duration: 2s
"
    );
    let run_id = start_run(&cluster, "freeze.yaml", &yaml).await;
    let run = finished(&cluster, &run_id, Duration::from_secs(60)).await;
    assert_eq!(
        run["state"],
        "completed",
        "{run}\n{}",
        cluster.agent_log("agent-1")
    );

    let report = cluster
        .cli_json(&["report", &run_id, "--format", "json"])
        .await
        .unwrap();
    let errors = schema_errors(&report);
    assert!(errors.is_empty(), "{errors:#?}\n{report:#}");
    assert_eq!(report["report_version"], 2);
    assert_eq!(report["verdict"], "confirmed", "{report:#}");
    for phase in ["baseline", "during", "after"] {
        assert!(report["phases"][phase].is_object(), "{phase}: {report:#}");
    }
    let probes = report["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 1, "{report:#}");
    let api = &probes[0];
    assert_eq!(api["name"], "api");
    assert_eq!(api["kind"], "http");
    // Healthy before, failing while the process is stopped, healthy again after.
    assert!(count(&api["baseline"], "samples") >= 3, "{api:#}");
    assert_eq!(count(&api["baseline"], "errors"), 0, "{api:#}");
    assert!(count(&api["during"], "samples") >= 3, "{api:#}");
    assert!(count(&api["during"], "errors") >= 2, "{api:#}");
    assert!(count(&api["after"], "samples") >= 3, "{api:#}");
    assert_eq!(count(&api["after"], "errors"), 0, "{api:#}");
    assert_eq!(api["steady_before"], true);
    assert_eq!(api["steady_after"], true);
    // A stopped process accepts connections (the kernel does) but never answers: time-outs.
    let p95_up = api["during_vs_baseline"]["p95_ms"].as_f64().unwrap();
    assert!(p95_up >= 250.0, "p95 rose by {p95_up} ms: {api:#}");
    let rate_up = api["during_vs_baseline"]["error_rate_pp"].as_f64().unwrap();
    assert!(rate_up > 0.0, "{api:#}");
    let first = api["first_failure"]["detail"].as_str().unwrap();
    assert!(first.contains("timed out"), "{first}");

    // Detected within an interval plus a time-out of the stop; recovered as quickly.
    let detection = report["failure_detection_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no failure detection time: {report:#}"));
    assert!((0..=1_500).contains(&detection), "detection {detection} ms");
    assert_eq!(api["detection_ms"], detection);
    let recovery = report["recovery_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no recovery time: {report:#}"));
    assert!((0..=1_500).contains(&recovery), "recovery {recovery} ms");
    // The stop and the revert are where the report says the faults were in force.
    let fault = &report["faults"][0];
    assert_eq!(fault["kind"], "process-stop");
    assert_eq!(
        report["phases"]["during"]["start"]["offset_ms"],
        fault["applied"]["offset_ms"]
    );
    assert_eq!(
        report["phases"]["during"]["end"]["offset_ms"],
        fault["reverted"]["offset_ms"]
    );
    assert_eq!(report["notes"], serde_json::json!([]), "{report:#}");

    // Text and HTML carry the same figures; the HTML has a chart for the probe.
    let out = cluster.cli(&["report", &run_id]).await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        format!("failure detection time  {}", fmt_span(detection)),
        format!("recovery time           {}", fmt_span(recovery)),
        "verdict     confirmed".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in\n{text}");
    }
    let out = cluster
        .cli(&["report", &run_id, "--format", "html"])
        .await
        .unwrap();
    assert!(out.status.success());
    let html = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        html.matches("<svg").count(),
        2,
        "timeline and the probe's chart"
    );
    let chart = &html[html.find("class=\"probe-chart\"").unwrap()..];
    let failures = chart.matches("<g class=\"probe-failure\">").count() as u64;
    assert_eq!(
        failures,
        count(&api["total"], "errors"),
        "one mark per failed sample"
    );
    assert!(chart.contains("class=\"probe-detected\""));
    assert!(chart.contains("class=\"probe-recovered\""));
    drop(service);
}

/// `812 ms` or `3.011s`, as the report prints spans.
fn fmt_span(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_run_keeps_the_probe_samples_it_stored() {
    let mut cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-steady-d").await.unwrap();
    let (address, service) = service().await;
    // A short lease: once the coordinator is gone, the agent reverts the pause by itself.
    let yaml =
        plan("Crash mid-run", &address, &target.name, "60s").replace("lease: 30s", "lease: 3s");
    let run_id = start_run(&cluster, "crash.yaml", &yaml).await;
    target
        .wait_for_state("paused", Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Mid-run, the report already has the samples stored so far.
    let live = cluster
        .cli_json(&["report", &run_id, "--format", "json"])
        .await
        .unwrap();
    let stored = live["probes"][0]["samples"].as_array().unwrap().len();
    assert!(stored >= 5, "{live:#}");
    assert!(
        count(&live["probes"][0]["during"], "samples") >= 1,
        "{live:#}"
    );

    cluster.coordinator.kill9().await;
    cluster.restart_coordinator().await.unwrap();
    cluster
        .wait_connected(&["agent-1"], Duration::from_secs(30))
        .await
        .unwrap();
    service.abort();

    let report = cluster
        .cli_json(&["report", &run_id, "--format", "json"])
        .await
        .unwrap();
    let errors = schema_errors(&report);
    assert!(errors.is_empty(), "{errors:#?}\n{report:#}");
    assert_eq!(report["run"]["state"], "aborted", "{report:#}");
    let api = &report["probes"][0];
    let kept = api["samples"].as_array().unwrap().len();
    assert!(
        kept >= stored,
        "{kept} samples kept, {stored} seen before the crash"
    );
    assert!(count(&api["baseline"], "samples") >= 3, "{api:#}");
    assert!(count(&api["during"], "samples") >= 1, "{api:#}");
    assert_eq!(report["verdict"], "not evaluated (no hypothesis probes)");
    assert!(
        report["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("recovery time is not defined")),
        "{report:#}"
    );
    target
        .wait_for_state("running", Duration::from_secs(30))
        .await
        .unwrap();
}
