#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! `faultline run --dry-run`: the real agent resolves and prepares each fault against a real
//! container and prints the exact actions — Docker calls, firewall commands in the container's
//! namespace, cgroup writes — while nothing changes: the container keeps running, its
//! namespace gets no rules, its cgroup keeps its quota, and no run is recorded. Unresolvable
//! targets and a halt make the dry run fail and say why.

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::{TestContainer, docker};

async fn container_pid(container: &TestContainer) -> String {
    docker(&["inspect", "-f", "{{.State.Pid}}", &container.name])
        .await
        .unwrap()
        .trim()
        .to_string()
}

/// Every firewall rule of the container's network namespace, nft and legacy iptables both.
async fn ruleset(pid: &str) -> String {
    let nft = tokio::process::Command::new("nsenter")
        .args(["-t", pid, "-n", "nft", "list", "ruleset"])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&nft.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_each_agents_exact_actions_and_changes_nothing() {
    let cluster = Cluster::start(&["agent-1", "agent-2"]).await.unwrap();
    let db = TestContainer::start("fl-dry-db").await.unwrap();
    let api = TestContainer::start("fl-dry-api").await.unwrap();
    let db_pid = container_pid(&db).await;
    let rules_before = ruleset(&db_pid).await;
    let plan = format!(
        r#"apiVersion: faultline/v1
title: Dry run
stages:
  - name: one
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {api} }}
        duration: 30s
      - kind: partition
        agent: agent-2
        target: {{ container: {db} }}
        scope: {{ ports: [5432], protocol: tcp }}
        duration: 30s
  - name: two
    faults:
      - kind: cpu-throttle
        agent: agent-2
        target: {{ container: {db} }}
        cpus: 0.2
        duration: 30s
"#,
        api = api.name,
        db = db.name
    );
    let plan = cluster.write_plan("dry.yaml", &plan).unwrap();
    let out = cluster
        .cli(&["run", "--dry-run", plan.to_str().unwrap()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("the coordinator would start this run"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("$ docker pause {}", api.name)),
        "{stdout}"
    );
    // The partition's commands name the container's namespace and port 5432.
    let agent2 = &stdout[stdout.find("agent agent-2:").unwrap()..];
    assert!(agent2.contains("[one#1] partition"), "{stdout}");
    assert!(agent2.contains("5432"), "{stdout}");
    assert!(
        agent2.contains("$ [netns ") || agent2.contains("$ nsenter"),
        "the firewall commands run inside the target's namespace: {stdout}"
    );
    // The cpu throttle writes the container's own cgroup files.
    assert!(
        agent2.contains("cfs_quota_us") || agent2.contains("cpu.max"),
        "{stdout}"
    );
    assert!(stdout.contains("3 fault(s), 3 resolved, 0 not resolved, 0 refusal(s)"));

    // Nothing happened.
    assert_eq!(api.state().await.unwrap(), "running");
    assert_eq!(ruleset(&db_pid).await, rules_before, "no rules were added");
    let quota_file = stdout
        .lines()
        .find_map(|line| {
            let line = line.trim();
            let path = line.strip_prefix("$ write ")?;
            path.split(" to ")
                .nth(1)
                .filter(|p| p.contains("cfs_quota_us"))
        })
        .map(ToString::to_string);
    if let Some(path) = quota_file {
        let quota = std::fs::read_to_string(&path).unwrap();
        assert_eq!(quota.trim(), "-1", "{path} still unlimited");
    }
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 0, "no run recorded: {runs}");

    // A target that does not exist is reported, and the dry run fails.
    let missing = cluster
        .write_plan(
            "missing.yaml",
            "apiVersion: faultline/v1\ntitle: Missing\nstages:\n  - name: one\n    faults:\n      - kind: container-pause\n        agent: agent-1\n        target: { container: fl-dry-no-such-container }\n        duration: 5s\n",
        )
        .unwrap();
    let out = cluster
        .cli(&["run", "--dry-run", missing.to_str().unwrap()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("NOT RESOLVED"), "{stdout}");
    assert!(stdout.contains("fl-dry-no-such-container"), "{stdout}");

    // Under a halt the dry run says the run would be refused.
    let out = cluster
        .cli(&["halt", "--reason", "dry-run test"])
        .await
        .unwrap();
    assert!(out.status.success());
    let out = cluster
        .cli(&["run", "--dry-run", plan.to_str().unwrap()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("would REFUSE"), "{stdout}");
    assert!(stdout.to_lowercase().contains("halt"), "{stdout}");
    let out = cluster.cli(&["halt", "--release"]).await.unwrap();
    assert!(out.status.success());
}
