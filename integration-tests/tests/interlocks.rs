#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Safety interlocks end to end: real binaries, real Docker Engine. A plan over its blast
//! radius, a plan touching a protected container, a second run on a target another run holds,
//! and a plan on an agent the coordinator's `--policy` protects are all refused before anything
//! is applied — FAILED_PRECONDITION with every reason, an audit entry `refused`, no run — and
//! the containers are left alone.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use faultline_integration_tests::cluster::{Cluster, bin, eventually};
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// One `container-pause` fault, indented for a stage's `faults:` list.
fn pause(agent: &str, target: &str, duration: &str) -> String {
    format!(
        "      - kind: container-pause\n        agent: {agent}\n        target: {{ container: \
         '{target}' }}\n        duration: {duration}\n"
    )
}

/// A one-stage plan of `faults`, then the extra top-level lines.
fn plan(title: &str, faults: &[String], extra: &str) -> String {
    format!(
        "apiVersion: faultline/v1\ntitle: {title}\nlease: 5s\nstages:\n  - name: s\n    \
         faults:\n{}{extra}",
        faults.concat()
    )
}

/// Runs `faultline run FILE` (`--follow` when asked) and returns (success, stdout, stderr).
async fn run(cluster: &Cluster, name: &str, yaml: &str, follow: bool) -> (bool, String, String) {
    let path = cluster.write_plan(name, yaml).unwrap();
    let mut args = vec!["run", path.to_str().unwrap()];
    if follow {
        args.push("--follow");
    }
    let out = cluster.cli(&args).await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn runs(cluster: &Cluster) -> Vec<Value> {
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    runs.as_array().cloned().unwrap_or_default()
}

/// Details of refused `start-run` audit entries, oldest first.
async fn refused_starts(cluster: &Cluster) -> Vec<String> {
    let audit = cluster
        .cli_json(&["audit", "--output", "json"])
        .await
        .unwrap();
    let mut details: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "start-run" && e["outcome"] == "refused")
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    details.reverse();
    details
}

/// Asserts a refused start: the CLI failed with FAILED_PRECONDITION and every fragment.
fn assert_refused(what: &str, (ok, stdout, stderr): &(bool, String, String), fragments: &[&str]) {
    assert!(!ok, "{what}: accepted: {stdout}");
    assert!(
        stderr.contains("safety interlocks refused the plan; nothing was applied"),
        "{what}: {stderr}"
    );
    // The CLI prints the status code by its canonical gRPC name.
    assert!(
        stderr.contains("error: FAILED_PRECONDITION: "),
        "{what}: not FAILED_PRECONDITION: {stderr}"
    );
    for fragment in fragments {
        assert!(
            stderr.contains(fragment),
            "{what}: {fragment:?} not in {stderr}"
        );
    }
}

/// Gives an apply the time it would take, then checks nothing was paused.
async fn assert_untouched(containers: &[&TestContainer]) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for container in containers {
        assert_eq!(
            container.state().await.unwrap(),
            "running",
            "{} was touched",
            container.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_over_its_max_agents_is_refused_and_its_containers_are_left_alone() {
    let cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(TestContainer::start("fl-blast").await.unwrap());
    }
    let faults: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| pause(&format!("agent-{}", i + 1), &t.name, "30s"))
        .collect();
    let yaml = plan(
        "Pause three hosts",
        &faults,
        "blast_radius:\n  max_agents: 2\n  max_fleet_percent: 100\n",
    );
    let refused = run(&cluster, "blast.yaml", &yaml, false).await;
    assert_refused(
        "max_agents",
        &refused,
        &[
            "blast radius: the plan faults 3 agents (agent-1, agent-2, agent-3), more than \
           max_agents 2 set by the plan",
        ],
    );
    assert_untouched(&targets.iter().collect::<Vec<_>>()).await;
    assert!(runs(&cluster).await.is_empty(), "no run was created");
    let audited = refused_starts(&cluster).await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert!(audited[0].contains("more than max_agents 2"), "{audited:?}");

    // Within the limit, the same kind of plan runs.
    let yaml = plan(
        "Pause two hosts",
        &faults[..2],
        "blast_radius: { max_agents: 2 }\n",
    );
    let (ok, stdout, stderr) = run(&cluster, "two.yaml", &yaml, true).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("completed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_touching_a_protected_container_is_refused_by_name_and_by_regex() {
    let cluster = Cluster::start(&["agent-1", "agent-2"]).await.unwrap();
    let db = TestContainer::start("fl-protected-db").await.unwrap();
    let other = TestContainer::start("fl-protected-other").await.unwrap();
    let protection = format!(
        "protected:\n  - {{ agent: agent-2, container: {} }}\n",
        db.name
    );

    let by_name = plan(
        "Pause the database",
        &[
            pause("agent-1", &other.name, "30s"),
            pause("agent-2", &db.name, "30s"),
        ],
        &protection,
    );
    let refused = run(&cluster, "by-name.yaml", &by_name, false).await;
    let expected = format!(
        "protected: stage s, faults[1]: container-pause on container {name} on agent agent-2 is \
         protected by container {name} on agent agent-2 (in the plan)",
        name = db.name
    );
    assert_refused("by name", &refused, &[&expected]);

    // A regex target that matches the protected name counts as touching it.
    let by_regex = plan(
        "Pause whatever matches",
        &[pause("agent-2", &format!("re:^{}$", db.name), "30s")],
        &protection,
    );
    let refused = run(&cluster, "by-regex.yaml", &by_regex, false).await;
    let expected = format!(
        "container-pause on container matching re:^{name}$ on agent agent-2 is protected by \
         container {name} on agent agent-2 (in the plan)",
        name = db.name
    );
    assert_refused("by regex", &refused, &[&expected]);

    assert_untouched(&[&db, &other]).await;
    assert!(runs(&cluster).await.is_empty(), "no run was created");
    assert_eq!(refused_starts(&cluster).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_a_held_container_is_refused_until_the_first_run_ends() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-lock").await.unwrap();
    let first = plan(
        "Hold the container",
        &[pause("agent-1", &target.name, "5s")],
        "",
    );
    let (ok, stdout, stderr) = run(&cluster, "first.yaml", &first, false).await;
    assert!(ok, "{stdout}{stderr}");
    let first_id = stdout
        .split_whitespace()
        .nth(1)
        .expect("run ID started")
        .to_string();
    target
        .wait_for_state("paused", Duration::from_secs(20))
        .await
        .unwrap();

    let second = plan("Pause it too", &[pause("agent-1", &target.name, "1s")], "");
    let refused = run(&cluster, "second.yaml", &second, false).await;
    let expected = format!(
        "target locked: container {} on agent agent-1 is being faulted by run {first_id}",
        target.name
    );
    assert_refused("while the first runs", &refused, &[&expected]);
    assert_eq!(runs(&cluster).await.len(), 1, "no second run was created");

    // The first run ends (its pause reverted on schedule) and releases the container.
    let ended = eventually(Duration::from_secs(30), "first run ends", || async {
        let run = cluster
            .cli_json(&["runs", "show", &first_id, "--output", "json"])
            .await
            .ok()?;
        (run["state"] != "running").then_some(run)
    })
    .await
    .unwrap();
    assert_eq!(ended["state"], "completed", "{ended}");
    assert_eq!(target.state().await.unwrap(), "running");

    let (ok, stdout, stderr) = run(&cluster, "second.yaml", &second, true).await;
    assert!(ok, "accepted after the first run ended: {stdout}{stderr}");
    assert!(stdout.contains("completed"), "{stdout}");
    assert_eq!(runs(&cluster).await.len(), 2);
    assert_eq!(target.state().await.unwrap(), "running");
}

/// A coordinator started with `--policy`, on the address and database of the cluster's own
/// (which must be stopped first). Killed when dropped; agents' leases cover that.
async fn coordinator_with_policy(cluster: &Cluster, policy: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cluster.dir.path().join("coordinator-policy.log"))
        .unwrap();
    let mut child = Command::new(bin("faultline-coordinator"))
        .args(["--listen", &cluster.addr])
        .arg("--certs")
        .arg(&cluster.certs)
        .arg("--db")
        .arg(&cluster.db)
        .arg("--policy")
        .arg(policy)
        .env("RUST_LOG", "info,h2=warn,tower=warn,hyper=warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .expect("coordinator reports its address")
    .unwrap()
    .expect("coordinator listening");
    assert!(line.contains("listening on"), "{line}");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_policy_protects_an_agent_for_every_plan() {
    let mut cluster = Cluster::start(&["agent-1", "agent-2"]).await.unwrap();
    let target = TestContainer::start("fl-policy").await.unwrap();
    let policy = cluster
        .write_plan(
            "policy.yaml",
            "# Nothing on agent-1, ever.\nprotected:\n  - { agent: agent-1 }\n",
        )
        .unwrap();
    cluster
        .coordinator
        .terminate(Duration::from_secs(10))
        .await
        .unwrap();
    let mut coordinator = coordinator_with_policy(&cluster, &policy).await;
    cluster
        .wait_connected(&["agent-1", "agent-2"], Duration::from_secs(30))
        .await
        .unwrap();

    // Plans that protect nothing themselves: the policy applies to every one, whatever the
    // target on agent-1.
    let by_container = plan(
        "Pause on agent-1",
        &[pause("agent-1", &target.name, "30s")],
        "",
    );
    let refused = run(&cluster, "container.yaml", &by_container, false).await;
    let expected = format!(
        "container-pause on container {} on agent agent-1 is protected by agent agent-1 (in the \
         coordinator policy)",
        target.name
    );
    assert_refused("container on agent-1", &refused, &[&expected]);
    let by_label = format!(
        "apiVersion: faultline/v1\ntitle: Pause by label\nstages:\n  - name: s\n    faults:\n      \
         - {{ kind: container-pause, agent: agent-1, target: {{ label: 'fl.none={}' }}, \
         duration: 30s }}\n",
        target.name
    );
    let refused = run(&cluster, "label.yaml", &by_label, false).await;
    assert_refused(
        "label on agent-1",
        &refused,
        &["is protected by agent agent-1 (in the coordinator policy)"],
    );
    assert_untouched(&[&target]).await;
    assert!(runs(&cluster).await.is_empty(), "no run was created");
    assert_eq!(refused_starts(&cluster).await.len(), 2);

    // The same container through agent-2, which the policy leaves alone, runs.
    let on_agent_2 = plan(
        "Pause on agent-2",
        &[pause("agent-2", &target.name, "1s")],
        "",
    );
    let (ok, stdout, stderr) = run(&cluster, "agent-2.yaml", &on_agent_2, true).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("completed"), "{stdout}");

    // The policy the coordinator runs with is on record.
    let audit = cluster
        .cli_json(&["audit", "--output", "json"])
        .await
        .unwrap();
    let started = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "start" && e["detail"].as_str().unwrap().contains("; policy "))
        .cloned()
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(
        started["detail"]
            .as_str()
            .unwrap()
            .ends_with("protected: agent agent-1"),
        "{started}"
    );

    let _ = coordinator.start_kill();
    let _ = coordinator.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_file_stops_the_coordinator_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "blast_radius:\n  max_agents: 0\nprotected:\n  - { agent: agent-1, container: /db }\n",
    )
    .unwrap();
    let out = Command::new(bin("faultline-coordinator"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--certs")
        .arg(dir.path().join("no-certs"))
        .arg("--db")
        .arg(dir.path().join("db.sqlite"))
        .arg("--policy")
        .arg(&policy)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = policy.display();
    for expected in [
        format!("{path}:2:15: blast_radius.max_agents: max_agents must be between 1 and 100000"),
        format!("{path}:4:34: protected[0].container: invalid container name \"/db\""),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
    }
    assert!(
        !dir.path().join("db.sqlite").exists(),
        "stopped before opening anything"
    );
}
