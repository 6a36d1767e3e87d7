#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Pre-flight tells the truth about this host: `faultline preflight` reports what the kernel
//! really offers (checked here independently, by trying it), names the mechanism each fault
//! would use — the fallback included — and a plan using a fault an agent cannot do is refused
//! before anything is applied.

use std::process::Command;
use std::time::Duration;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;

/// Whether this kernel accepts a netem qdisc, tried on a dummy device in a scratch namespace.
fn kernel_has_netem() -> bool {
    let ns = format!("flt-pf-{}", std::process::id());
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    assert!(ip(&["netns", "add", &ns]), "creating a scratch netns");
    let ok = ip(&["-n", &ns, "link", "add", "d0", "type", "dummy"])
        && ip(&["-n", &ns, "link", "set", "d0", "up"])
        && Command::new("ip")
            .args([
                "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay",
                "1ms",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    ip(&["netns", "del", &ns]);
    ok
}

fn fault<'a>(agent: &'a Value, name: &str) -> &'a Value {
    agent["faults"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fault"] == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_reports_what_this_kernel_really_offers_and_refuses_impossible_plans() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let report = cluster
        .cli_json(&["preflight", "--agent", "agent-1", "--output", "json"])
        .await
        .unwrap();
    let agent = &report[0];
    assert_eq!(agent["connected"], true);
    let faults = agent["faults"].as_array().unwrap();
    assert_eq!(
        faults.len(),
        faultline_domain::fault::FaultKind::NAMES.len(),
        "every kind reported"
    );

    let netem = kernel_has_netem();
    let tc = agent["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tc")
        .unwrap();
    let says_netem = tc["mechanism"].as_str().unwrap().contains("netem: yes");
    assert_eq!(says_netem, netem, "tc probe vs reality: {tc}");
    let latency = fault(agent, "latency");
    let duplicate = fault(agent, "duplicate");
    if netem {
        assert_eq!(latency["mechanism"], "tc netem delay");
        assert_eq!(duplicate["available"], true);
    } else {
        assert_eq!(latency["available"], true);
        assert!(
            latency["mechanism"].as_str().unwrap().contains("NFQUEUE"),
            "{latency}"
        );
        assert!(
            latency["mechanism"].as_str().unwrap().contains("fallback"),
            "{latency}"
        );
        assert_eq!(duplicate["available"], false);
        assert!(
            duplicate["detail"].as_str().unwrap().contains("netem"),
            "{duplicate}"
        );
    }
    assert_eq!(fault(agent, "container-pause")["available"], true);

    let text = cluster.cli(&["preflight"]).await.unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("agent-1 (connected") && text.contains("latency"),
        "{text}"
    );

    if netem {
        println!("SKIPPED the refusal half: this kernel has netem, so every fault is possible");
        return;
    }
    // A plan asking for duplication on a kernel without netem: refused, nothing applied — the
    // first stage's pause does not happen either.
    let target = TestContainer::start("fl-preflight").await.unwrap();
    let plan = cluster
        .write_plan(
            "impossible.yaml",
            &format!(
                "apiVersion: faultline/v1
title: Needs netem
stages:
  - name: pause-first
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {name} }}
        duration: 2s
  - name: duplicate
    faults:
      - kind: duplicate
        agent: agent-1
        target: {{ container: {name} }}
        duration: 2s
        percent: 5
",
                name = target.name
            ),
        )
        .unwrap();
    let out = cluster.cli(&["run", plan.to_str().unwrap()]).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("pre-flight refused the plan"), "{stderr}");
    assert!(
        stderr.contains("stage duplicate: duplicate on agent-1: not available"),
        "{stderr}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        target.state().await.unwrap(),
        "running",
        "nothing was applied"
    );
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 0, "no run was created");
}
