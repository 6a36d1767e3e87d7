#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! End to end: real binaries, real mTLS, real Docker Engine. The foundation's promises:
//! agents connect and are listed; a plan pauses a real container and it comes back; faults are
//! reverted when the coordinator or the agent dies; bad plans get located errors.

use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::{Cluster, eventually};
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;

fn pause_plan(agent: &str, container: &str, duration: &str, lease: &str) -> String {
    format!(
        "apiVersion: faultline/v1
title: Pause {container} on {agent}
lease: {lease}
stages:
  - name: pause
    faults:
      - kind: container-pause
        agent: {agent}
        target: {{ container: {container} }}
        duration: {duration}
"
    )
}

fn events_of(run: &Value) -> Vec<Value> {
    run["events"].as_array().cloned().unwrap_or_default()
}

fn event<'a>(events: &'a [Value], kind: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["kind"] == kind)
}

async fn latest_run(cluster: &Cluster) -> anyhow::Result<Value> {
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await?;
    let id = runs[0]["id"].as_str().unwrap_or_default().to_string();
    cluster
        .cli_json(&["runs", "show", &id, "--output", "json"])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_connect_and_are_listed_as_json() {
    let cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let agents = cluster
        .cli_json(&["agents", "list", "--output", "json"])
        .await
        .unwrap();
    let agents = agents.as_array().unwrap();
    assert_eq!(agents.len(), 3, "{agents:?}");
    for (agent, name) in agents.iter().zip(["agent-1", "agent-2", "agent-3"]) {
        assert_eq!(agent["name"], name);
        assert_eq!(agent["connected"], true);
        assert!(
            agent["peer_address"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        let docker = agent["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "docker")
            .cloned()
            .unwrap();
        assert_eq!(
            docker["available"], true,
            "agent {name} probed docker: {docker}"
        );
        assert!(agent["host"]["kernel"].as_str().unwrap().len() > 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_pauses_a_real_container_on_agent_2_and_it_runs_again() {
    let cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let target = TestContainer::start("fl-pause").await.unwrap();
    let plan = cluster
        .write_plan(
            "pause.yaml",
            &pause_plan("agent-2", &target.name, "3s", "5s"),
        )
        .unwrap();

    let follow = {
        let plan = plan.to_str().unwrap().to_string();
        let certs = cluster.certs.clone();
        let url = cluster.url();
        tokio::spawn(async move {
            faultline_integration_tests::cluster::cli_raw(&certs, &url, &["run", &plan, "--follow"])
                .await
        })
    };
    let paused_at = eventually(Duration::from_secs(20), "container paused", || async {
        (target.state().await.ok()? == "paused").then(Instant::now)
    })
    .await
    .unwrap();
    let running_at = eventually(
        Duration::from_secs(20),
        "container running again",
        || async { (target.state().await.ok()? == "running").then(Instant::now) },
    )
    .await
    .unwrap();
    let held = running_at - paused_at;
    assert!(
        held >= Duration::from_millis(2_700) && held < Duration::from_secs(5),
        "{held:?}"
    );

    let out = follow.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "run --follow failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("fault-applied") && stdout.contains("completed"),
        "{stdout}"
    );

    let run = latest_run(&cluster).await.unwrap();
    assert_eq!(run["state"], "completed", "{run}");
    let events = events_of(&run);
    let applied = event(&events, "fault-applied").expect("fault-applied recorded");
    let reverted = event(&events, "fault-reverted").expect("fault-reverted recorded");
    assert_eq!(applied["agent"], "agent-2");
    assert!(
        applied["message"]
            .as_str()
            .unwrap()
            .contains(&target.id[..12]),
        "{applied}"
    );
    assert!(
        applied["message"].as_str().unwrap().contains("verified"),
        "{applied}"
    );
    assert!(
        reverted["message"].as_str().unwrap().contains("schedule"),
        "{reverted}"
    );
    let applied_ms = applied["at_unix_ms"].as_i64().unwrap();
    let reverted_ms = reverted["at_unix_ms"].as_i64().unwrap();
    assert!(
        (2_900..6_000).contains(&(reverted_ms - applied_ms)),
        "{applied_ms} {reverted_ms}"
    );
    assert!(
        applied["at"].as_str().unwrap().ends_with('Z'),
        "timestamps are RFC 3339"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkill_mid_fault_the_agent_reverts_within_its_lease() {
    let mut cluster = Cluster::start(&["agent-1", "agent-2", "agent-3"])
        .await
        .unwrap();
    let target = TestContainer::start("fl-lease").await.unwrap();
    let lease = Duration::from_secs(3);
    let plan = cluster
        .write_plan(
            "long.yaml",
            &pause_plan("agent-2", &target.name, "120s", "3s"),
        )
        .unwrap();
    let out = cluster.cli(&["run", plan.to_str().unwrap()]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target
        .wait_for_state("paused", Duration::from_secs(20))
        .await
        .unwrap();
    // Let a few renewals happen, so the agent's lease is fresh when the coordinator dies.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        target.state().await.unwrap(),
        "paused",
        "renewals keep the fault in force"
    );

    cluster.coordinator.kill9().await;
    let killed = Instant::now();
    eventually(
        lease + Duration::from_secs(1),
        "unpause by lease after coordinator death",
        || async { (target.state().await.ok()? == "running").then_some(()) },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}\nagent log:\n{}", cluster.agent_log("agent-2")));
    let took = killed.elapsed();
    assert!(took <= lease + Duration::from_secs(1), "{took:?}");

    // A restarted coordinator marks the run aborted with the reason; no run is lost.
    cluster.restart_coordinator().await.unwrap();
    let run = latest_run(&cluster).await.unwrap();
    assert_eq!(run["state"], "aborted", "{run}");
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("coordinator restarted"),
        "{run}"
    );
    assert!(cluster.agent_log("agent-2").contains("lease expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_mid_fault_then_restart_reverts_from_the_journal() {
    let mut cluster = Cluster::start(&["agent-1", "agent-2"]).await.unwrap();
    let target = TestContainer::start("fl-journal").await.unwrap();
    let plan = cluster
        .write_plan(
            "long.yaml",
            &pause_plan("agent-2", &target.name, "120s", "60s"),
        )
        .unwrap();
    let out = cluster.cli(&["run", plan.to_str().unwrap()]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target
        .wait_for_state("paused", Duration::from_secs(20))
        .await
        .unwrap();

    let index = cluster
        .agent_names
        .iter()
        .position(|n| n == "agent-2")
        .unwrap();
    cluster.agents[index].kill9().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        target.state().await.unwrap(),
        "paused",
        "a SIGKILLed agent cannot revert"
    );
    let journal = cluster.state_dir("agent-2").join("journal");
    assert_eq!(
        std::fs::read_dir(&journal).unwrap().count(),
        1,
        "the fault is journaled"
    );

    // The coordinator aborts the run: the agent holding its fault is gone.
    let aborted = eventually(Duration::from_secs(30), "run aborted", || async {
        let run = latest_run(&cluster).await.ok()?;
        (run["state"] != "running").then_some(run)
    })
    .await
    .unwrap();
    assert_eq!(aborted["state"], "aborted", "{aborted}");
    assert!(
        aborted["reason"]
            .as_str()
            .unwrap()
            .contains("agent agent-2 lost contact with the coordinator"),
        "{aborted}"
    );
    assert_eq!(
        target.state().await.unwrap(),
        "paused",
        "nobody could revert it yet"
    );

    let restarted = cluster.spawn_agent("agent-2").unwrap();
    cluster.agents[index] = restarted;
    target
        .wait_for_state("running", Duration::from_secs(15))
        .await
        .unwrap_or_else(|err| panic!("{err}\nagent log:\n{}", cluster.agent_log("agent-2")));
    assert_eq!(
        std::fs::read_dir(&journal).unwrap().count(),
        0,
        "journal emptied after revert"
    );
    // The recovery revert is reported to the coordinator and lands in the ended run's
    // timeline.
    let reverted = eventually(
        Duration::from_secs(30),
        "the recovery revert in the timeline",
        || async {
            let run = latest_run(&cluster).await.ok()?;
            event(&events_of(&run), "fault-reverted").cloned()
        },
    )
    .await
    .unwrap();
    assert!(
        reverted["message"]
            .as_str()
            .unwrap()
            .contains("reverted after the run ended (journal-recovery)"),
        "{reverted}"
    );
    assert_eq!(reverted["agent"], "agent-2", "{reverted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_agent_reverts_its_faults_before_it_exits() {
    let mut cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-term").await.unwrap();
    let plan = cluster
        .write_plan(
            "long.yaml",
            &pause_plan("agent-1", &target.name, "120s", "60s"),
        )
        .unwrap();
    let out = cluster.cli(&["run", plan.to_str().unwrap()]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target
        .wait_for_state("paused", Duration::from_secs(20))
        .await
        .unwrap();
    let status = cluster.agents[0]
        .terminate(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "agent exit status {status:?}");
    assert_eq!(
        target.state().await.unwrap(),
        "running",
        "reverted before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_validate_gives_a_located_error_for_each_malformed_plan() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/plans");
    let mut files: Vec<_> = std::fs::read_dir(fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("bad-"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let certs = tempfile::tempdir().unwrap();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .unwrap();
        let (line, field) = expect.split_once(' ').unwrap();
        let path = file.to_str().unwrap();
        let out = faultline_integration_tests::cluster::cli_raw(
            certs.path(),
            "https://127.0.0.1:1",
            &["plan", "validate", path],
        )
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{path}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("{path}:{line}:")),
            "{path}: {first}"
        );
        assert!(first.contains(&format!(" {field}: ")), "{path}: {first}");
        assert!(
            first.len() > path.len() + field.len() + 15,
            "message present: {first}"
        );

        // `run` refuses the same plan locally: nothing reaches a coordinator (none listens).
        let run = faultline_integration_tests::cluster::cli_raw(
            certs.path(),
            "https://127.0.0.1:1",
            &["run", path],
        )
        .await
        .unwrap();
        assert_eq!(run.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&run.stderr).contains("nothing was sent"));
    }
    let good = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/pause-database.yaml"
    );
    let out = faultline_integration_tests::cluster::cli_raw(
        certs.path(),
        "https://127.0.0.1:1",
        &["plan", "validate", good],
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_issued_after_init_from_the_same_ca_can_join() {
    let mut cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let certs = cluster.certs.to_str().unwrap().to_string();
    let out = cluster
        .cli(&["certs", "issue-agent", "--dir", &certs, "--name", "agent-9"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let late = cluster.spawn_agent("agent-9").unwrap();
    cluster.agents.push(late);
    cluster
        .wait_connected(&["agent-1", "agent-9"], Duration::from_secs(20))
        .await
        .unwrap();
}
