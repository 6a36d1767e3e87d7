#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! eBPF telemetry end to end for a drop-mode partition: a real coordinator and agent, a real
//! container, and the kernel's own account of connects that time out.
//!
//! The reject-mode counterpart (`telemetry.rs`) sees every connect refused at once. Here the
//! partition silently drops the container's SYNs, so each connect is retransmitted and then
//! given up by the kernel with ETIMEDOUT. The container runs with
//! `net.ipv4.tcp_syn_retries=1` in its own network namespace (one SYN retransmission, about
//! 3 s to ETIMEDOUT) so that several attempts time out within the partition.
//!
//! The client is a bash loop (`/dev/tcp`) that prints `ok` or `fail` for each attempt, with
//! bash's own error message (`connect: Connection timed out`) on the same stream: its log is
//! the application's view, errno included. The report must count exactly as many ETIMEDOUT
//! connect failures as the log shows, and nothing else, attributed to the container by its
//! cgroup, with SYN retransmits; the firewall state of the container's namespace must be
//! exactly what it was before the run, and the container must connect again.

use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::{TestContainer, docker};
use faultline_integration_tests::netclient::{
    accepting_service, bridge_gateway, connects_again, outcomes, start_client,
};
use serde_json::Value;

/// SYN retransmissions before the kernel gives up (RTO 1 s, doubled: ETIMEDOUT after ~3 s).
const SYN_RETRIES: u32 = 1;

/// The firewall state of the container's network namespace, as the host's tools print it.
async fn netns_firewall(container: &TestContainer) -> String {
    let pid = docker(&["inspect", "--format", "{{.State.Pid}}", &container.id])
        .await
        .unwrap();
    let pid = pid.trim();
    let mut state = String::new();
    for tool in [
        &["nft", "list", "ruleset"][..],
        &["iptables-save"][..],
        &["iptables-legacy-save"][..],
    ] {
        let out = std::process::Command::new("nsenter")
            .args(["-t", pid, "-n"])
            .args(tool)
            .output()
            .unwrap();
        // Comments and counters change by themselves; the rules do not.
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let line = line.split(" [").next().unwrap_or(line);
            state.push_str(line);
            state.push('\n');
        }
    }
    state
}

fn plan(container: &str, bystander: &str, gateway: &str, port: u16) -> String {
    // The second stage keeps the run (and so its telemetry subscription) going for a few
    // seconds after the partition: a connect whose last SYN was dropped just before the
    // revert still times out up to ~2 s later, and must be counted.
    format!(
        "apiVersion: faultline/v1
title: Partition the client from its service by dropping its packets
lease: 10s
stages:
  - name: cut
    after: 3s
    faults:
      - kind: partition
        agent: agent-1
        target: {{ container: {container} }}
        mode: drop
        scope: {{ peers: [\"{gateway}/32\"], ports: [{port}], protocol: tcp, direction: egress }}
        duration: 10s
  - name: settle
    after: 4s
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {bystander} }}
        duration: 1s
"
    )
}

fn target_of<'a>(report: &'a Value, target: &str) -> Option<&'a Value> {
    report["telemetry"]["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == target)
}

fn counted_failures(report: &Value, target: &str) -> u64 {
    target_of(report, target)
        .and_then(|t| t["connect_failures_by_errno"].as_object())
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

/// The run's JSON report, once it holds `failures` connect failures of `target` (batches are
/// stored within a second of being collected), or after 15 s.
async fn report_when_complete(
    cluster: &Cluster,
    run_id: &str,
    target: &str,
    failures: u64,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let report = cluster
            .cli_json(&["report", run_id, "--format", "json"])
            .await
            .unwrap();
        if counted_failures(&report, target) >= failures || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_partitions_report_counts_the_connects_that_timed_out() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let gateway = bridge_gateway().await.unwrap();
    let (port, service) = accepting_service(&gateway).await.unwrap();
    // A short SYN retry budget in the client's own network namespace: each connect into the
    // partition times out within seconds.
    let sysctl = format!("net.ipv4.tcp_syn_retries={SYN_RETRIES}");
    let client = start_client("fl-telemetry-drop", &gateway, port, &["--sysctl", &sysctl])
        .await
        .unwrap();
    let bystander = TestContainer::start("fl-telemetry-drop-by").await.unwrap();
    // The setting the whole test rests on: it is the container's, not the host's.
    let syn_retries = docker(&[
        "exec",
        &client.id,
        "/bin/bash",
        "-c",
        "read -r n </proc/sys/net/ipv4/tcp_syn_retries; echo $n",
    ])
    .await
    .unwrap();
    assert_eq!(syn_retries.trim(), SYN_RETRIES.to_string());
    let firewall_before = netns_firewall(&client).await;

    let yaml = plan(&client.name, &bystander.name, &gateway, port);
    let run_id = cluster
        .start_run("partition-drop.yaml", &yaml)
        .await
        .unwrap();
    let run = cluster
        .finished(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        run["state"],
        "completed",
        "{run:#}\nagent log:\n{}",
        cluster.agent_log("agent-1")
    );

    // What the container saw: every failure a timeout, several of them (10 s of partition,
    // ~3 s each).
    let seen = outcomes(&client).await.unwrap();
    let failures_seen = seen.get("fail").copied().unwrap_or(0);
    let timeouts_seen = seen.get("timed-out").copied().unwrap_or(0);
    assert!(
        timeouts_seen >= 2,
        "the drop partition made connects time out: {seen:?}"
    );
    assert_eq!(
        failures_seen, timeouts_seen,
        "every failure the container saw was a timeout: {seen:?}"
    );
    assert_eq!(seen.get("other-error"), None, "{seen:?}");

    let report = report_when_complete(&cluster, &run_id, &client.name, timeouts_seen).await;

    let t = &report["telemetry"];
    assert_eq!(t["mechanism"], "bpf", "{t:#}");
    let target = target_of(&report, &client.name)
        .unwrap_or_else(|| panic!("no target {} in {t:#}", client.name));
    assert_eq!(target["agent"], "agent-1");
    assert_eq!(target["selector"], format!("container {}", client.name));
    assert!(
        target["cgroup"].as_str().unwrap().contains(&client.id),
        "attributed by the container's cgroup: {target}"
    );
    // Exactly the container's timeouts, with the errno it saw, and nothing else.
    let by_errno = target["connect_failures_by_errno"].as_object().unwrap();
    assert_eq!(
        by_errno.keys().collect::<Vec<_>>(),
        vec!["ETIMEDOUT"],
        "a drop partition makes connects time out: {by_errno:?}"
    );
    assert_eq!(
        by_errno["ETIMEDOUT"].as_u64(),
        Some(timeouts_seen),
        "kernel-counted timeouts {by_errno:?} vs the container's own {seen:?}"
    );
    // None before the partition; the rest during it or in the seconds after the revert, when
    // a connect whose last SYN had been dropped gives up.
    let by_phase = &target["connect_failures_by_phase"];
    assert_eq!(by_phase["before"], 0, "{by_phase}");
    assert!(by_phase["during"].as_u64().unwrap() >= 1, "{by_phase}");
    // Each timed-out connect retransmitted its SYN (at least tcp_syn_retries times); the
    // unanswered SYNs are the container's, not the bystander's.
    let syn_retransmits = target["syn_retransmits"].as_u64().unwrap();
    assert!(
        syn_retransmits >= timeouts_seen * u64::from(SYN_RETRIES),
        "SYN retransmits {syn_retransmits} for {timeouts_seen} timeouts: {target}"
    );
    assert!(target["retransmits"].as_u64().unwrap() >= syn_retransmits);
    assert_eq!(
        t["totals"]["connect_failures"].as_u64(),
        Some(timeouts_seen),
        "{}",
        t["totals"]
    );
    assert_eq!(
        t["totals"]["connect_failures_by_errno"]["ETIMEDOUT"],
        timeouts_seen
    );
    assert!(t["totals"]["syn_retransmits"].as_u64().unwrap() >= syn_retransmits);
    if let Some(other) = target_of(&report, &bystander.name) {
        assert_eq!(other["syn_retransmits"], 0, "{other}");
    }
    // The first failure: a timeout of the container's bash to the service, a few seconds
    // (the SYN retry budget) after the partition was applied.
    let first = &t["first_failure"];
    assert_eq!(first["errno"], "ETIMEDOUT", "{first}");
    assert_eq!(first["comm"], "bash", "{first}");
    assert_eq!(first["remote"], format!("{gateway}:{port}"), "{first}");
    assert_eq!(first["target"], client.name.as_str(), "{first}");
    let ttff = t["time_to_first_failure_ms"].as_i64().unwrap();
    assert!(
        (1_000..8_000).contains(&ttff),
        "time to first failure {ttff} ms"
    );
    // Connections succeeded before the partition, and no more than the container saw.
    let established = target["established"].as_u64().unwrap();
    assert!(established >= 5, "{target}");
    assert!(
        seen.get("ok").copied().unwrap_or(0) >= established,
        "no more established than the container saw succeed: {established} vs {seen:?}"
    );
    assert_eq!(t["losses"]["kernel_events"], 0, "{}", t["losses"]);
    assert_eq!(t["losses"]["batches"], 0, "{}", t["losses"]);

    // The text report says the same.
    let out = cluster.cli(&["report", &run_id]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("eBPF insights"), "{text}");
    assert!(
        text.contains(&format!(
            "connect failures       {timeouts_seen} (ETIMEDOUT x{timeouts_seen})"
        )),
        "{text}"
    );

    // Everything reverted: the partition is gone (the firewall of the container's namespace
    // is what it was) and the container connects again; the bystander runs.
    assert_eq!(
        netns_firewall(&client).await,
        firewall_before,
        "the container's firewall was not restored"
    );
    assert!(
        connects_again(&client, 5).await,
        "the partition was not reverted: {:?}",
        outcomes(&client).await.unwrap()
    );
    service.abort();
    assert_eq!(bystander.state().await.unwrap(), "running");
    let runs = cluster
        .cli_json(&["runs", "show", &run_id, "--output", "json"])
        .await
        .unwrap();
    let reverted = runs["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "fault-reverted")
        .count();
    assert_eq!(reverted, 2, "{runs:#}");
}
