#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! `faultline lab up --no-stack | status | down` with the real binaries on the real Docker
//! Engine: a coordinator and two agent hosts, each its own container with its own address on
//! the lab's private network (the demo stack is `lab_demo.rs`'s); a fault applied through a
//! containerized agent; `up` twice is harmless; and `down` leaves no container, network or
//! image of the lab behind. And a lab host cut off from
//! the coordinator mid-fault: its agent reverts by lease, the run is aborted with the reason,
//! and the host comes back holding nothing.

use std::path::Path;
use std::time::Duration;

use faultline_integration_tests::cluster::cli_raw;
use faultline_integration_tests::docker::{TestContainer, docker};
use faultline_integration_tests::lab::{
    Down, down_leaves_nothing, exported, faultline, leftovers, text,
};

/// The lab is one per engine (fixed names): its tests take turns.
static LAB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_up_runs_agents_in_their_own_containers_and_down_leaves_nothing() {
    let _lab = LAB.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");
    let lab_dir = lab_dir.to_str().unwrap();
    let _down = Down;
    let out = two_agent_lab_up(lab_dir).await;
    let up = text(&out);
    assert!(out.status.success(), "{up}");
    let url = exported(&up, "FAULTLINE_COORDINATOR")
        .unwrap_or_else(|| panic!("no FAULTLINE_COORDINATOR in {}", up))
        .to_string();
    let certs = exported(&up, "FAULTLINE_CERTS")
        .unwrap_or_else(|| panic!("no FAULTLINE_CERTS in {}", up))
        .to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{up}");

    // Each host is a container with its own address on the lab network.
    let out = faultline(&["lab", "status"]).await.unwrap();
    let status = text(&out);
    assert!(out.status.success(), "{status}");
    let addresses: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("agent-") || l.starts_with("coordinator"))
        .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
        .collect();
    assert_eq!(addresses.len(), 3, "{status}");
    assert!(
        addresses
            .iter()
            .all(|a| a.parse::<std::net::Ipv4Addr>().is_ok()),
        "{status}"
    );
    let mut distinct = addresses.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{status}");
    let ids_before = docker(&[
        "ps",
        "--filter",
        "label=faultline.lab=1",
        "--format",
        "{{.ID}}",
    ])
    .await
    .unwrap();

    // The agents run in their containers, connected through the lab network, and say so.
    let listed = cli_raw(
        Path::new(&certs),
        &url,
        &["agents", "list", "--output", "json"],
    )
    .await
    .unwrap();
    let agents: serde_json::Value =
        serde_json::from_slice(&listed.stdout).unwrap_or_else(|_| panic!("{}", text(&listed)));
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["connected"] == true)
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["agent-1", "agent-2"], "{agents:#}");
    let hostnames: Vec<String> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a["host"]["hostname"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        hostnames,
        vec!["agent-1", "agent-2"],
        "each agent on its own host: {agents:#}"
    );

    // A fault through a containerized agent: agent-2 pauses a container of this engine.
    let target = TestContainer::start("fl-lab-target").await.unwrap();
    let plan = dir.path().join("pause.yaml");
    std::fs::write(
        &plan,
        format!(
            "apiVersion: faultline/v1
title: Pause through a lab host
lease: 10s
stages:
  - name: pause
    faults:
      - {{ kind: container-pause, agent: agent-2, target: {{ container: {} }}, duration: 2s }}
",
            target.name
        ),
    )
    .unwrap();
    let run = cli_raw(
        Path::new(&certs),
        &url,
        &["run", plan.to_str().unwrap(), "--follow"],
    )
    .await
    .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let followed = text(&run);
    assert!(followed.contains("completed"), "{followed}");
    assert_eq!(target.state().await.unwrap(), "running", "reverted");
    let runs = cli_raw(
        Path::new(&certs),
        &url,
        &["runs", "list", "--output", "json"],
    )
    .await
    .unwrap();
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let shown = cli_raw(
        Path::new(&certs),
        &url,
        &[
            "runs",
            "show",
            runs[0]["id"].as_str().unwrap(),
            "--output",
            "json",
        ],
    )
    .await
    .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let events = shown["events"].as_array().unwrap();
    let applied = events
        .iter()
        .find(|e| e["kind"] == "fault-applied")
        .unwrap_or_else(|| panic!("{shown:#}"));
    assert_eq!(applied["agent"], "agent-2", "{applied}");
    assert!(
        events.iter().any(|e| e["kind"] == "fault-reverted"),
        "{shown:#}"
    );

    // `up` again: the same containers keep running.
    let out = two_agent_lab_up(lab_dir).await;
    assert!(out.status.success(), "{}", text(&out));
    let ids_after = docker(&[
        "ps",
        "--filter",
        "label=faultline.lab=1",
        "--format",
        "{{.ID}}",
    ])
    .await
    .unwrap();
    assert_eq!(ids_before, ids_after, "lab up is idempotent");

    down_leaves_nothing("removed 3 container(s), 1 network(s), 2 image(s)").await;
    let out = faultline(&["lab", "status"]).await.unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("lab: down"), "{}", text(&out));
}

/// `nft` inside lab host `agent`'s network namespace (its image carries nft).
async fn host_nft(agent: &str, args: &[&str]) -> String {
    let container = format!("faultline-lab-{agent}");
    let mut full = vec!["exec", container.as_str(), "/usr/sbin/nft"];
    full.extend_from_slice(args);
    docker(&full).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_host_cut_off_from_the_coordinator_reverts_by_lease_and_the_run_is_aborted() {
    let _lab = LAB.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");
    let _down = Down;
    let out = faultline(&[
        "lab",
        "up",
        "--dir",
        lab_dir.to_str().unwrap(),
        "--agents",
        "agent-1",
        "--no-stack",
    ])
    .await
    .unwrap();
    let up = text(&out);
    assert!(out.status.success(), "{up}");
    let url = exported(&up, "FAULTLINE_COORDINATOR")
        .unwrap_or_else(|| panic!("no FAULTLINE_COORDINATOR in {}", up))
        .to_string();
    let certs = exported(&up, "FAULTLINE_CERTS")
        .unwrap_or_else(|| panic!("no FAULTLINE_CERTS in {}", up))
        .to_string();
    let certs = Path::new(&certs);
    let status = text(&faultline(&["lab", "status"]).await.unwrap());
    let coordinator_ip = status
        .lines()
        .find(|l| l.starts_with("coordinator"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("{status}"))
        .to_string();

    let target = TestContainer::start("fl-lab-lease").await.unwrap();
    let plan = dir.path().join("long-pause.yaml");
    std::fs::write(
        &plan,
        format!(
            "apiVersion: faultline/v1
title: A long pause on a host about to be cut off
lease: 5s
stages:
  - name: pause
    faults:
      - {{ kind: container-pause, agent: agent-1, target: {{ container: {} }}, duration: 120s }}
",
            target.name
        ),
    )
    .unwrap();
    let run = cli_raw(certs, &url, &["run", plan.to_str().unwrap()])
        .await
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let run_id = String::from_utf8_lossy(&run.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    target
        .wait_for_state("paused", Duration::from_secs(30))
        .await
        .unwrap();

    // Cut agent-1 off from the coordinator, both ways, inside its own network namespace.
    host_nft("agent-1", &["add", "table", "inet", "labcut"]).await;
    for (chain, hook, direction) in [("out", "output", "daddr"), ("in", "input", "saddr")] {
        let spec = format!("{{ type filter hook {hook} priority -10 ; }}");
        host_nft("agent-1", &["add", "chain", "inet", "labcut", chain, &spec]).await;
        host_nft(
            "agent-1",
            &[
                "add",
                "rule",
                "inet",
                "labcut",
                chain,
                "ip",
                direction,
                &coordinator_ip,
                "drop",
            ],
        )
        .await;
    }
    let cut = std::time::Instant::now();

    // Nobody renews the lease now: the agent reverts on its own within it (5s, checked
    // at a fine grain by the agent), long before the fault's 120s.
    target
        .wait_for_state("running", Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("not reverted by lease: {e}"));
    let reverted_after = cut.elapsed();
    assert!(
        reverted_after <= Duration::from_secs(12),
        "{reverted_after:?}"
    );

    // The coordinator notices the silence (keepalives) and aborts the run with the reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let shown = loop {
        let shown = cli_raw(certs, &url, &["runs", "show", &run_id, "--output", "json"])
            .await
            .unwrap();
        let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        if shown["state"] != "running" {
            break shown;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {shown:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(shown["state"], "aborted", "{shown:#}");
    let reason = shown["reason"].as_str().unwrap();
    assert!(
        reason.contains("agent agent-1 lost contact with the coordinator")
            && reason.contains("lease (5s)"),
        "{reason}"
    );
    let events = shown["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "agent-lost"),
        "{shown:#}"
    );

    // Back in contact: the agent reconnects and holds nothing.
    host_nft("agent-1", &["delete", "table", "inet", "labcut"]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let listed = cli_raw(certs, &url, &["agents", "list", "--output", "json"])
            .await
            .unwrap();
        let agents: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        let back =
            agents.as_array().into_iter().flatten().find(|a| {
                a["name"] == "agent-1" && a["connected"] == true && a["active_faults"] == 0
            });
        if back.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent-1 did not come back clean: {agents:#}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(target.state().await.unwrap(), "running");
    let out = faultline(&["lab", "down"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(leftovers().await.unwrap(), "");
}

/// `faultline lab up` with hosts agent-1 and agent-2 and no demo stack.
async fn two_agent_lab_up(lab_dir: &str) -> std::process::Output {
    faultline(&[
        "lab",
        "up",
        "--dir",
        lab_dir,
        "--agents",
        "agent-1,agent-2",
        "--no-stack",
    ])
    .await
    .unwrap()
}
