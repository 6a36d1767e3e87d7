#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! A triggered cascade across three agents, end to end: real binaries, real mTLS, real Docker.
//!
//! Stage 1 pauses a container on agent-1; stage 2, a second after stage 1 ended, pauses one on
//! agent-2; stage 3 waits (`when`) until a steady-state probe fails, then pauses one on
//! agent-3. The probed "service" is a TCP listener of this test, which closes it only well
//! after stage 3 started waiting: stage 3 must not start before that. The plan also uses a
//! variable given with `--var`, probes from an included file and a load generator against a
//! loopback HTTP server, so the CLI's expansion and the run's load figures are covered too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod report_support;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::{TestContainer, docker};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A TCP "service" accepting (and closing) connections until the task is aborted.
async fn gate() -> (String, JoinHandle<()>) {
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

/// An HTTP server answering every request `200 ok` (one request per connection), counting
/// the requests it answered.
async fn http_server() -> (String, Arc<AtomicU64>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/checkout", listener.local_addr().unwrap());
    let answered = Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, answered, task)
}

fn plan(containers: [&str; 3], load_url: &str) -> String {
    let [a, b, c] = containers;
    format!(
        "apiVersion: faultline/v1
title: Triggered cascade over three agents
vars:
  GATE: 127.0.0.1:9        # given with --var
  HOLD: 2s
lease: 30s
steady_state:
  probes:
    - include: probes/gate.yaml
  baseline: 1s
load: {{ url: \"{load_url}\", rate: 20/s, timeout: 1s }}
stages:
  - name: stall
    faults:
      - {{ kind: container-pause, agent: agent-1, target: {{ container: {a} }}, duration: \"${{HOLD}}\" }}
  - name: fallout
    after: 1s
    faults:
      - {{ kind: container-pause, agent: agent-2, target: {{ container: {b} }}, duration: 1s }}
  - name: escalate
    when: {{ probe: gate, metric: error_rate, above: 0%, window: 1s, timeout: 1m }}
    faults:
      - {{ kind: container-pause, agent: agent-3, target: {{ container: {c} }}, duration: 1s }}
"
    )
}

const GATE_PROBES: &str = "# The probe stage 3 waits on.
- { name: gate, kind: tcp, address: \"${GATE}\", interval: 100ms, timeout: 500ms }
";

async fn run_json(cluster: &Cluster, run_id: &str) -> Value {
    cluster
        .cli_json(&["runs", "show", run_id, "--output", "json"])
        .await
        .unwrap()
}

fn events(run: &Value) -> Vec<Value> {
    run["events"].as_array().cloned().unwrap_or_default()
}

/// The first event of `kind` in `stage` ("" for run-level events).
fn find<'a>(events: &'a [Value], kind: &str, stage: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["kind"] == kind && e["stage"] == stage)
}

fn at(event: &Value) -> i64 {
    event["at_unix_ms"].as_i64().unwrap()
}

async fn started_at(container: &TestContainer) -> String {
    docker(&["inspect", "-f", "{{.State.StartedAt}}", &container.id])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_stage_starts_only_once_its_condition_holds() {
    let cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let containers = [
        TestContainer::start("fl-cascade-a").await.unwrap(),
        TestContainer::start("fl-cascade-b").await.unwrap(),
        TestContainer::start("fl-cascade-c").await.unwrap(),
    ];
    let mut started_before = Vec::new();
    for container in &containers {
        started_before.push(started_at(container).await);
    }
    let (address, gate) = gate().await;
    let (load_url, answered, http) = http_server().await;

    let names = [
        containers[0].name.as_str(),
        containers[1].name.as_str(),
        containers[2].name.as_str(),
    ];
    let path = cluster
        .write_plan("cascade.yaml", &plan(names, &load_url))
        .unwrap();
    std::fs::create_dir_all(path.parent().unwrap().join("probes")).unwrap();
    std::fs::write(path.parent().unwrap().join("probes/gate.yaml"), GATE_PROBES).unwrap();
    let path = path.to_str().unwrap();

    // The CLI resolves the variable and the include locally.
    let gate_var = format!("GATE={address}");
    let out = cluster
        .cli(&["plan", "validate", path, "--var", &gate_var])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster
        .cli(&["run", path, "--var", &gate_var])
        .await
        .unwrap();
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
    let run_id = runs[0]["id"].as_str().unwrap().to_string();

    // Wait until stage 3 waits for its condition.
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = loop {
        let run = run_json(&cluster, &run_id).await;
        let events = events(&run);
        if let Some(waiting) = find(&events, "stage-waiting", "escalate") {
            break waiting.clone();
        }
        assert_eq!(run["state"], "running", "{run:#}");
        assert!(Instant::now() < deadline, "stage 3 never waited: {run:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let message = waiting["message"].as_str().unwrap();
    assert!(
        message.contains("gate error rate above 0% over the last 1s"),
        "{message}"
    );
    // The stages before it have reverted their faults already.
    for container in &containers[..2] {
        assert_eq!(container.state().await.unwrap(), "running");
    }

    // The condition cannot hold while the gate is open: stage 3 keeps waiting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let run = run_json(&cluster, &run_id).await;
    assert!(
        find(&events(&run), "stage-started", "escalate").is_none(),
        "stage 3 started before its condition held: {run:#}"
    );
    assert_eq!(containers[2].state().await.unwrap(), "running");

    // The service goes down: stage 3 fires.
    gate.abort();
    let _ = gate.await;
    let closed_ms = now_ms();

    let deadline = Instant::now() + Duration::from_secs(60);
    let run = loop {
        let run = run_json(&cluster, &run_id).await;
        if run["state"] != "running" {
            break run;
        }
        assert!(Instant::now() < deadline, "run never ended: {run:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    http.abort();
    assert_eq!(run["state"], "completed", "{run:#}");
    let events = events(&run);

    // The stages ran in order, each after the previous one finished.
    let stage_starts: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "stage-started")
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stage_starts, ["stall", "fallout", "escalate"], "{run:#}");
    let start = |stage| at(find(&events, "stage-started", stage).unwrap());
    let finish = |stage| at(find(&events, "stage-finished", stage).unwrap());
    assert!(finish("stall") <= start("fallout"));
    assert!(
        start("fallout") - finish("stall") >= 1000,
        "fallout waited its 1s"
    );
    assert!(finish("fallout") <= at(&waiting));

    // Stage 3 started only once its condition held, after the gate closed.
    let triggered = find(&events, "stage-triggered", "escalate").expect("stage-triggered");
    let message = triggered["message"].as_str().unwrap();
    assert!(message.contains("gate error rate"), "{message}");
    assert!(!message.contains("error rate 0%"), "{message}");
    assert!(
        at(triggered) >= closed_ms,
        "triggered at {} before the gate closed at {closed_ms}",
        at(triggered)
    );
    assert!(at(triggered) - closed_ms < 5000, "{run:#}");
    assert!(start("escalate") >= at(triggered));
    assert!(start("escalate") - at(&waiting) >= 1500, "{run:#}");

    // One fault per agent, each applied and reverted, agent-3's after the trigger.
    for (agent, stage) in [
        ("agent-1", "stall"),
        ("agent-2", "fallout"),
        ("agent-3", "escalate"),
    ] {
        let applied = events
            .iter()
            .find(|e| e["kind"] == "fault-applied" && e["agent"] == agent)
            .unwrap_or_else(|| panic!("{agent} applied nothing: {run:#}"));
        assert_eq!(applied["stage"], stage);
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "fault-reverted" && e["agent"] == agent),
            "{agent}: {run:#}"
        );
    }
    let applied_3 = events
        .iter()
        .find(|e| e["kind"] == "fault-applied" && e["agent"] == "agent-3")
        .unwrap();
    assert!(at(applied_3) >= at(triggered));

    // The load ran through every phase.
    let load = find(&events, "load-finished", "").expect("load-finished");
    let message = load["message"].as_str().unwrap();
    assert!(message.contains("; baseline: "), "{message}");
    assert!(message.contains("; faults: "), "{message}");
    assert!(message.contains("; recovery: "), "{message}");
    assert!(answered.load(Ordering::SeqCst) >= 50, "{message}");
    assert!(find(&events, "load-started", "").is_some());

    // Every container is running, and was never restarted.
    for (container, before) in containers.iter().zip(&started_before) {
        assert_eq!(container.state().await.unwrap(), "running");
        assert_eq!(&started_at(container).await, before, "{}", container.name);
    }

    // The run's report validates and tells the same story.
    let report = report_support::validated_report(&cluster, &run_id).await;
    assert_eq!(report["totals"]["stages_finished"], 3, "{report:#}");
    assert_eq!(report["totals"]["faults_reverted"], 3, "{report:#}");
}
