#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Steady state and stop conditions, on loopback: the "service" is a TCP listener in the test.
//! A run whose probe is not steady applies nothing; a run whose service goes down while its
//! fault is applied is stopped by its stop condition and reverted at once; a run that stays
//! steady records a steady recovery check.

use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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
