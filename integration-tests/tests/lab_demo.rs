#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! `faultline lab demo` with the real binaries on the real Docker Engine: the lab fleet with the
//! demo stack (PostgreSQL, Redis, the order API, nginx, the market simulator — images built
//! from this machine's files), healthy; the multi-service cascade
//! (examples/game-day/10-multi-service-cascade.yaml, embedded) run through the lab's
//! coordinator to completion; its JSON report showing what the cascade did to the order API
//! and how long it took to recover; `lab up` again changes nothing; a same-named container
//! that is not the lab's stops `lab up` before it changes anything; and `lab down` leaves no
//! container, network or image of the lab behind.

use std::path::Path;
use std::time::Instant;

use faultline_integration_tests::cluster::cli_raw;
use faultline_integration_tests::docker::{TestContainer, docker};
use faultline_integration_tests::lab::{
    Down, down_leaves_nothing, exported, faultline, leftovers, text,
};

/// The stack's containers, which the plans name.
const STACK: [&str; 5] = [
    "postgres",
    "redis",
    "trading-api",
    "nginx",
    "market-simulator",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_demo_runs_the_cascade_against_the_stack_and_down_leaves_nothing() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");
    let lab_dir = lab_dir.to_str().unwrap();
    let _down = Down;

    // Someone else's `redis`: `lab up` refuses and touches nothing.
    {
        let foreign = TestContainer::start_named("redis", &[]).await.unwrap();
        let out = faultline(&["lab", "up", "--dir", lab_dir]).await.unwrap();
        let refused = text(&out);
        assert!(!out.status.success(), "{refused}");
        assert!(
            refused.contains("container redis") && refused.contains("nothing was changed"),
            "{refused}"
        );
        assert_eq!(
            leftovers().await.unwrap(),
            "",
            "nothing of the lab was made"
        );
        assert_eq!(foreign.state().await.unwrap(), "running", "not touched");
    }

    // The demo: lab up with the stack, the cascade followed live, the findings, the HTML report.
    let out = faultline(&["lab", "demo", "--dir", lab_dir]).await.unwrap();
    let demo = text(&out);
    let demo_took = started.elapsed();
    assert!(out.status.success(), "{demo}");
    let url = exported(&demo, "FAULTLINE_COORDINATOR")
        .unwrap_or_else(|| panic!("no FAULTLINE_COORDINATOR in {}", demo))
        .to_string();
    let certs = exported(&demo, "FAULTLINE_CERTS")
        .unwrap_or_else(|| panic!("no FAULTLINE_CERTS in {}", demo))
        .to_string();
    let certs = Path::new(&certs);
    for container in STACK {
        assert!(demo.contains(container), "{container} not listed: {demo}");
    }
    let run_id = demo
        .lines()
        .find_map(|line| line.strip_prefix("run ")?.strip_suffix(": completed"))
        .unwrap_or_else(|| panic!("no completed run in: {demo}"))
        .to_string();
    let html = demo
        .lines()
        .find_map(|line| line.strip_prefix("HTML report: "))
        .unwrap_or_else(|| panic!("no HTML report named in: {demo}"));
    let html = std::fs::read_to_string(html.trim()).unwrap();
    assert!(html.contains("<html"), "not HTML");
    assert!(
        demo.contains("faultline lab down"),
        "says how to tear down: {demo}"
    );

    // The stored run: what the cascade did to the order API, measured by its probe.
    let report = cli_raw(certs, &url, &["report", &run_id, "--format", "json"])
        .await
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&report.stdout).unwrap_or_else(|_| panic!("{}", text(&report)));
    assert_eq!(report["run"]["state"], "completed", "{report:#}");
    let faults = report["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 3, "cache, database, API: {report:#}");
    let api = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "api")
        .unwrap_or_else(|| panic!("no api probe: {report:#}"));
    let figure = |phase: &str, key: &str| api[phase][key].as_f64().unwrap_or(0.0);
    assert!(
        figure("during", "error_rate") > figure("baseline", "error_rate")
            || figure("during", "p95_ms") > figure("baseline", "p95_ms") * 2.0,
        "the cascade shows on the API: {api:#}"
    );
    assert!(
        api["recovery_ms"].as_i64().is_some(),
        "the API recovered after the last revert: {api:#}"
    );
    eprintln!(
        "api: baseline error rate {} p95 {}ms; during {} p95 {}ms; recovered {}ms after the \
         last revert",
        figure("baseline", "error_rate"),
        figure("baseline", "p95_ms"),
        figure("during", "error_rate"),
        figure("during", "p95_ms"),
        api["recovery_ms"]
    );

    // The stack is all there, each container on its plan host, and healthy again.
    let out = faultline(&["lab", "status"]).await.unwrap();
    let status = text(&out);
    assert!(out.status.success(), "{status}");
    for (container, host) in [
        ("postgres", "agent-2"),
        ("redis", "agent-3"),
        ("trading-api", "agent-1"),
        ("nginx", "agent-3"),
        ("market-simulator", "agent-2"),
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(&format!("{container} "))
                    && l.contains("running")
                    && l.ends_with(&format!("on {host}"))),
            "{container} on {host}: {status}"
        );
    }
    // The plans' command probe, as an agent host runs it.
    docker(&[
        "exec",
        "faultline-lab-agent-2",
        "docker",
        "exec",
        "postgres",
        "pg_isready",
        "-q",
    ])
    .await
    .unwrap();

    // `up` again: the stack's containers keep running (and pass their checks again). The
    // fleet's own idempotence is lab_fleet.rs's; here a coordinator or agent binary rebuilt in
    // the meantime (a shared target directory) would rightly replace its container.
    let stack_ids = || async {
        let mut ids = Vec::new();
        for container in STACK {
            ids.push(
                docker(&[
                    "inspect",
                    "--format",
                    "{{.Id}} {{.State.Status}}",
                    container,
                ])
                .await
                .unwrap(),
            );
        }
        ids
    };
    let before = stack_ids().await;
    let out = faultline(&["lab", "up", "--dir", lab_dir]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(before, stack_ids().await, "lab up keeps the running stack");

    // Images not counted: 6, or more when a binary was rebuilt while the lab was up.
    down_leaves_nothing("removed 9 container(s), 1 network(s), ").await;
    eprintln!(
        "lab demo took {demo_took:?}; the whole test {:?}",
        started.elapsed()
    );
}
