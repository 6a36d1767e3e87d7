#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Halt-all: during a run across three agents, `faultline halt` reverts every fault on every
//! agent at once, marks the run halted with the measured halt latency, and blocks new runs
//! until `faultline halt --release`.

use std::time::{Duration, Instant};

mod report_support;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_reverts_every_fault_on_every_agent_and_blocks_new_runs_until_released() {
    let cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(TestContainer::start("fl-halt").await.unwrap());
    }
    let faults: String = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "      - kind: container-pause\n        agent: agent-{}\n        target: {{ container: {} }}\n        duration: 120s\n",
                i + 1,
                t.name
            )
        })
        .collect();
    let plan = format!(
        "apiVersion: faultline/v1\ntitle: Pause everything\nlease: 30s\nstages:\n  - name: all\n    faults:\n{faults}"
    );
    let plan = cluster.write_plan("all.yaml", &plan).unwrap();
    let out = cluster.cli(&["run", plan.to_str().unwrap()]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for target in &targets {
        target
            .wait_for_state("paused", Duration::from_secs(20))
            .await
            .unwrap();
    }

    let asked = Instant::now();
    let out = cluster
        .cli(&["halt", "--reason", "game-day stopped by test"])
        .await
        .unwrap();
    let took = asked.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("HALTED: 3 fault(s) reverted, 1 run(s) aborted"),
        "{stdout}"
    );
    // When the halt command returns, every agent has acknowledged its revert.
    for target in &targets {
        assert_eq!(
            target.state().await.unwrap(),
            "running",
            "{} reverted by halt",
            target.name
        );
    }
    assert!(took < Duration::from_secs(10), "halt took {took:?}");

    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    let run_id = runs[0]["id"].as_str().unwrap().to_string();
    let mut run = serde_json::Value::Null;
    for _ in 0..100 {
        run = cluster
            .cli_json(&["runs", "show", &run_id, "--output", "json"])
            .await
            .unwrap();
        if run["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run["state"], "halted", "{run}");
    let events = run["events"].as_array().unwrap();
    let halt = events
        .iter()
        .find(|e| e["kind"] == "halt")
        .unwrap_or_else(|| panic!("{run}"));
    let message = halt["message"].as_str().unwrap();
    assert!(
        message.contains("3 fault(s) reverted in") && message.contains(" ms"),
        "{message}"
    );
    let reverted = events
        .iter()
        .filter(|e| e["kind"] == "fault-reverted")
        .count();
    assert_eq!(
        reverted, 3,
        "every fault's halt revert is in the timeline: {run}"
    );

    // Blocked until released.
    let out = cluster.cli(&["run", plan.to_str().unwrap()]).await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("halt-all is engaged"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for target in &targets {
        assert_eq!(
            target.state().await.unwrap(),
            "running",
            "a blocked run applies nothing"
        );
    }
    let out = cluster.cli(&["halt", "--release"]).await.unwrap();
    assert!(out.status.success());
    let short = cluster
        .write_plan(
            "short.yaml",
            &format!(
                "apiVersion: faultline/v1\ntitle: After release\nstages:\n  - name: one\n    faults:\n      - kind: container-pause\n        agent: agent-1\n        target: {{ container: {} }}\n        duration: 1s\n",
                targets[0].name
            ),
        )
        .unwrap();
    let out = cluster
        .cli(&["run", short.to_str().unwrap(), "--follow"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let audit = cluster
        .cli_json(&["audit", "--output", "json", "--limit", "1000"])
        .await
        .unwrap();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"halt") && actions.contains(&"halt-release"),
        "{actions:?}"
    );

    // The halted run's report validates and carries the halt and its latency.
    let report = report_support::validated_report(&cluster, &run_id).await;
    assert_eq!(report["run"]["state"], "halted");
    assert_eq!(report["halt"]["faults_reverted"], 3, "{report:#}");
    assert!(report["halt"]["latency_ms"].is_u64(), "{report:#}");
}
