#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! A cascade whose faults pile up across three hosts, as real incidents do: stage 1 pauses a
//! container on agent-1; stage 2 (`overlap`, 1s after stage 1's fault is in force) freezes an
//! HTTP service on agent-2's host with SIGSTOP while the container is still paused; stage 3
//! (`overlap`) waits until the service's probe is actually failing — the effect of stage 2, not
//! a guess of its timing — and then pauses a container on agent-3, with the first two faults
//! still in force. Every fault is reverted in the end and the run completes.

use std::process::Stdio;
use std::time::Duration;

mod report_support;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A real HTTP service in a process of its own (python3's http.server on a free port),
/// killed when dropped.
async fn http_service() -> (tokio::process::Child, String) {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut child = tokio::process::Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Serving HTTP") {
                return;
            }
        }
        panic!("python3 http.server ended before serving");
    })
    .await
    .unwrap();
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://127.0.0.1:{port}/"))
}

fn find<'a>(events: &'a [Value], kind: &str, stage: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["kind"] == kind && e["stage"] == stage)
        .unwrap_or_else(|| panic!("no {kind} in stage {stage}: {events:#?}"))
}

fn at(event: &Value) -> i64 {
    event["at_unix_ms"].as_i64().unwrap()
}

/// The process state letter of `pid` (`T` when stopped).
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    after_comm.chars().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_stages_pile_faults_up_and_a_trigger_waits_for_their_effect() {
    let cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let first = TestContainer::start("fl-overlap-a").await.unwrap();
    let third = TestContainer::start("fl-overlap-c").await.unwrap();
    let (service, url) = http_service().await;
    let service_pid = service.id().unwrap();

    let plan = format!(
        "apiVersion: faultline/v1
title: Overlapping cascade
lease: 30s
steady_state:
  probes:
    - {{ name: svc, kind: http, url: \"{url}\", interval: 100ms, timeout: 300ms }}
  baseline: 1s
stages:
  - name: one
    faults:
      - {{ kind: container-pause, agent: agent-1, target: {{ container: {a} }}, duration: 14s }}
  - name: two
    overlap: true
    after: 1s
    faults:
      - {{ kind: process-stop, agent: agent-2, target: {{ pid: {service_pid} }}, duration: 8s }}
  - name: three
    overlap: true
    when: {{ probe: svc, metric: error_rate, above: 50%, window: 1s, timeout: 30s }}
    faults:
      - {{ kind: container-pause, agent: agent-3, target: {{ container: {c} }}, duration: 2s }}
",
        a = first.name,
        c = third.name
    );
    let path = cluster.write_plan("overlap.yaml", &plan).unwrap();
    let out = cluster
        .cli(&["run", path.to_str().unwrap(), "--follow"])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    let run_id = runs[0]["id"].as_str().unwrap().to_string();
    let run = cluster
        .cli_json(&["runs", "show", &run_id, "--output", "json"])
        .await
        .unwrap();
    assert_eq!(run["state"], "completed", "{run:#}");
    let events = run["events"].as_array().cloned().unwrap();

    let one_applied = at(find(&events, "fault-applied", "one"));
    let one_reverted = at(find(&events, "fault-reverted", "one"));
    let two_started = at(find(&events, "stage-started", "two"));
    let two_applied = at(find(&events, "fault-applied", "two"));
    let two_reverted = at(find(&events, "fault-reverted", "two"));
    let triggered = find(&events, "stage-triggered", "three");
    let three_started = at(find(&events, "stage-started", "three"));
    let three_applied = at(find(&events, "fault-applied", "three"));

    // Stage 2 started 1s after stage 1's fault was in force, while it still was.
    assert!(two_started >= one_applied + 1000, "{events:#?}");
    assert!(
        two_started < one_reverted,
        "stage 2 overlaps stage 1: {events:#?}"
    );
    // Stage 3 started only once the frozen service's probe was failing: after stage 2 applied
    // and a whole failing window later, with both earlier faults still in force.
    assert!(at(triggered) > two_applied, "{events:#?}");
    assert!(
        triggered["message"]
            .as_str()
            .unwrap()
            .contains("error rate"),
        "{triggered:#}"
    );
    assert!(three_started >= at(triggered));
    assert!(three_applied < two_reverted, "{events:#?}");
    assert!(three_applied < one_reverted, "{events:#?}");
    // Every stage finished, each after its own faults were reverted.
    for stage in ["one", "two", "three"] {
        find(&events, "stage-finished", stage);
    }

    // Nothing is left: containers run, the service is no longer stopped.
    assert_eq!(first.state().await.unwrap(), "running");
    assert_eq!(third.state().await.unwrap(), "running");
    assert_ne!(process_state(service_pid), 'T');
    drop(service);

    // The report: the service's probe failed while it was frozen, and came back.
    let report = report_support::validated_report(&cluster, &run_id).await;
    assert_eq!(report["totals"]["faults_reverted"], 3, "{report:#}");
    let svc = &report["probes"][0];
    assert_eq!(svc["name"], "svc");
    assert!(svc["during"]["errors"].as_u64().unwrap() > 0, "{svc:#}");
    assert_eq!(svc["baseline"]["errors"], 0, "{svc:#}");
    assert!(report["failure_detection_ms"].is_i64(), "{report:#}");
}
