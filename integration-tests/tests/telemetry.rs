#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! eBPF telemetry end to end: a real coordinator and agent, a real container, the kernel's own
//! evidence in the run's report.
//!
//! The container runs a bash loop (the image is built from the host's `/bin/bash` and
//! `/bin/sleep`) that connects to a TCP service of this test on the Docker bridge's gateway
//! address every 200 ms and prints `ok` or `fail` for each attempt. A plan partitions it from
//! that service (reject mode: every connect fails at once), then kills the container (SIGKILL,
//! restarted on revert).
//! The report's eBPF insights must show, attributed to the container by its cgroup: exactly as
//! many connect failures as the container itself saw fail, with the errno it saw, all of them
//! while the partition was in force; connections established before and after it; the time
//! from the partition to the first failure; and the container's bash killed by SIGKILL.

use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::{TEST_LABEL, TestContainer, docker, unique_name};
use faultline_integration_tests::netclient::{
    accepting_service, bridge_gateway, connects_again, outcomes, start_client,
};
use serde_json::Value;

fn plan(container: &str, gateway: &str, port: u16) -> String {
    format!(
        "apiVersion: faultline/v1
title: Partition the client from its service, then kill it
lease: 10s
stages:
  - name: cut
    after: 3s
    faults:
      - kind: partition
        agent: agent-1
        target: {{ container: {container} }}
        mode: reject
        scope: {{ peers: [\"{gateway}/32\"], ports: [{port}], protocol: tcp, direction: egress }}
        duration: 4s
  - name: kill
    after: 2s
    faults:
      - kind: container-kill
        agent: agent-1
        target: {{ container: {container} }}
        signal: SIGKILL
        restart: true
        duration: 2s
"
    )
}

/// Starts the plan and follows its telemetry live (`faultline telemetry RUN
/// --follow`) to its end; returns the run id and what the follower printed.
async fn run_following_telemetry(cluster: &Cluster, name: &str, yaml: &str) -> (String, String) {
    let run_id = cluster.start_run(name, yaml).await.unwrap();
    let out = cluster
        .cli(&["telemetry", &run_id, "--follow"])
        .await
        .unwrap();
    let followed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the run did not complete: {followed}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.agent_log("agent-1")
    );
    (run_id, followed)
}

fn counted_failures(report: &Value, target: &str) -> u64 {
    report["telemetry"]["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["target"] == target)
        .flat_map(|t| {
            t["connect_failures_by_errno"]
                .as_object()
                .into_iter()
                .flatten()
        })
        .filter_map(|(_, n)| n.as_u64())
        .sum()
}

/// The run's JSON report, once it holds `failures` connect failures of `target` and an exit
/// by signal (the batches are stored within a second of being collected), or after 15 s.
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
        let killed = report["telemetry"]["totals"]["failed_exits"]
            .as_u64()
            .is_some_and(|n| n > 0);
        if (counted_failures(&report, target) == failures && killed) || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_runs_report_has_kernel_evidence_attributed_to_the_container() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let gateway = bridge_gateway().await.unwrap();
    let (port, service) = accepting_service(&gateway).await.unwrap();
    let client = start_client("fl-telemetry", &gateway, port, &[])
        .await
        .unwrap();

    // Pre-flight shows how each telemetry group is collected on this host.
    let preflight = cluster
        .cli_json(&["preflight", "--output", "json"])
        .await
        .unwrap();
    let probes = preflight[0]["probes"].as_array().unwrap();
    let tcp = probes
        .iter()
        .find(|p| p["name"] == "bpf:tcp")
        .unwrap_or_else(|| panic!("no bpf:tcp capability in {preflight:#}"));
    assert_eq!(tcp["available"], true, "{tcp}");
    assert!(
        tcp["mechanism"].as_str().unwrap().starts_with("bpf: "),
        "this project's kernels load the programs: {tcp}"
    );

    let yaml = plan(&client.name, &gateway, port);
    let (run_id, followed) = run_following_telemetry(&cluster, "partition.yaml", &yaml).await;
    // Followed live: one line per second, the failures as they happened, then the totals.
    assert!(followed.starts_with("time "), "{followed}");
    assert!(followed.contains("ECONNREFUSED x"), "{followed}");
    assert!(
        followed.contains(&format!("run {run_id} completed")),
        "{followed}"
    );
    // What the container saw: its failures all came during the partition, long over now.
    let seen = outcomes(&client).await.unwrap();
    let failures_seen = seen.get("fail").copied().unwrap_or(0);
    assert!(
        failures_seen >= 5,
        "the partition made connects fail: {seen:?}"
    );
    let report = report_when_complete(&cluster, &run_id, &client.name, failures_seen).await;
    let seen = outcomes(&client).await.unwrap();
    service.abort();

    let t = &report["telemetry"];
    assert_eq!(t["mechanism"], "bpf", "{t:#}");
    let targets = t["targets"].as_array().unwrap();
    let target = targets
        .iter()
        .find(|x| x["target"] == client.name.as_str())
        .unwrap_or_else(|| panic!("no target {} in {t:#}", client.name));
    assert_eq!(target["agent"], "agent-1");
    assert_eq!(target["selector"], format!("container {}", client.name));
    assert!(
        target["cgroup"].as_str().unwrap().contains(&client.id),
        "attributed by the container's cgroup: {target}"
    );
    // Every failure the container saw, with the errno it saw, and only those.
    let by_errno = target["connect_failures_by_errno"].as_object().unwrap();
    let counted: u64 = by_errno.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(
        counted, failures_seen,
        "kernel-counted connect failures {by_errno:?} vs the container's own {seen:?}"
    );
    assert_eq!(
        by_errno.keys().collect::<Vec<_>>(),
        vec!["ECONNREFUSED"],
        "a reject partition refuses connects: {by_errno:?}"
    );
    // All while the partition was in force.
    let by_phase = &target["connect_failures_by_phase"];
    assert_eq!(
        by_phase["during"].as_u64(),
        Some(failures_seen),
        "{by_phase}"
    );
    assert_eq!(by_phase["before"], 0, "{by_phase}");
    // Connections succeeded before and after it.
    let established = target["established"].as_u64().unwrap();
    assert!(established >= 10, "{target}");
    assert!(
        seen.get("ok").copied().unwrap_or(0) >= established,
        "no more established than the container saw succeed: {established} vs {seen:?}"
    );
    assert_eq!(
        t["totals"]["connect_failures"].as_u64(),
        Some(failures_seen)
    );
    // The first failure came right after the partition was applied.
    let ttff = t["time_to_first_failure_ms"].as_i64().unwrap();
    assert!(
        (0..2_000).contains(&ttff),
        "time to first failure {ttff} ms"
    );
    let first = &t["first_failure"];
    assert_eq!(first["errno"], "ECONNREFUSED");
    assert_eq!(first["comm"], "bash");
    assert_eq!(first["remote"], format!("{gateway}:{port}"));
    assert_eq!(first["target"], client.name.as_str());
    // The run-queue latency of the container's tasks is measured in each phase.
    assert!(
        target["runq_p95_ms"]["before"].is_number(),
        "{}",
        target["runq_p95_ms"]
    );
    // The container's main process killed by the second stage, by signal; the loop's
    // sleeps exiting cleanly, counted.
    let exits = t["exits"].as_array().unwrap();
    let killed = exits
        .iter()
        .find(|e| e["comm"] == "bash" && e["signal"] == "SIGKILL")
        .unwrap_or_else(|| {
            panic!(
                "no bash killed by SIGKILL in {exits:#?}\nagent log: {}",
                cluster
                    .agent_log("agent-1")
                    .lines()
                    .filter(|l| l.contains("storm"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    assert!(killed["count"].as_u64().unwrap() >= 1);
    assert!(target["failed_exits"].as_u64().unwrap() >= 1);
    assert!(
        target["exits"].as_u64().unwrap() >= 20,
        "the loop's sleeps exit every 200 ms: {target}"
    );
    // Nothing was lost on the way.
    assert_eq!(t["losses"]["kernel_events"], 0, "{}", t["losses"]);
    assert_eq!(t["losses"]["batches"], 0, "{}", t["losses"]);

    // The other formats carry the same section.
    let out = cluster.cli(&["report", &run_id]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("eBPF insights"), "{text}");
    assert!(
        text.contains(&format!(
            "connect failures       {failures_seen} (ECONNREFUSED x{failures_seen})"
        )),
        "{text}"
    );

    // `faultline telemetry RUN`: per second and per target.
    let out = cluster.cli(&["telemetry", &run_id]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ECONNREFUSED"), "{text}");
    assert!(text.contains("bash: SIGKILL"), "{text}");
    assert!(
        text.contains(&format!("{} on agent-1", client.name)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_in_a_memory_limited_container_is_reported_with_its_victim() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let image = faultline_integration_tests::docker::ensure_test_image()
        .await
        .unwrap();
    let name = unique_name("fl-telemetry-oom");
    let id = docker(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--label",
        TEST_LABEL,
        "--network",
        "none",
        "--memory",
        "64m",
        "--memory-swap",
        "64m",
        &image,
    ])
    .await
    .unwrap();
    let container = TestContainer { name, id };
    container
        .wait_for_state("running", Duration::from_secs(20))
        .await
        .unwrap();
    let yaml = format!(
        "apiVersion: faultline/v1
title: Hog more memory than the container may have
lease: 10s
stages:
  - name: hog
    after: 1s
    faults:
      - kind: memory-hog
        agent: agent-1
        target: {{ container: {} }}
        size: 256Mi
        duration: 3s
",
        container.name
    );
    let path = cluster.write_plan("oom.yaml", &yaml).unwrap();
    // The hog may die before or after the agent verified it: the run's outcome is not the
    // point here, the kernel's account of the kill is.
    let _ = cluster
        .cli(&["run", path.to_str().unwrap(), "--follow"])
        .await
        .unwrap();
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    let run_id = runs[0]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let report = loop {
        let report = cluster
            .cli_json(&["report", &run_id, "--format", "json"])
            .await
            .unwrap();
        let kills = report["telemetry"]["oom_kills"]
            .as_array()
            .map_or(0, Vec::len);
        if kills > 0 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let t = &report["telemetry"];
    let kills = t["oom_kills"].as_array().unwrap();
    assert!(!kills.is_empty(), "no OOM kill in {t:#}");
    let kill = &kills[0];
    assert_eq!(kill["target"], container.name.as_str(), "{kill}");
    assert_eq!(kill["agent"], "agent-1");
    assert!(kill["pid"].as_u64().unwrap() > 0, "{kill}");
    assert!(!kill["comm"].as_str().unwrap().is_empty(), "{kill}");
    assert!(t["totals"]["oom_kills"].as_u64().unwrap() >= 1, "{t:#}");
    // The victim's exit is there too, by SIGKILL.
    let exits = t["exits"].as_array().unwrap();
    assert!(
        exits
            .iter()
            .any(|e| e["comm"] == kill["comm"] && e["signal"] == "SIGKILL"),
        "{exits:#?}"
    );
    let out = cluster.cli(&["report", &run_id]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OOM kills"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agents_may_stream_telemetry_and_only_for_their_runs() {
    use faultline_proto::v1 as pb;
    use faultline_tls::identity::Role;
    use faultline_tls::layout::CertDir;

    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let certs = CertDir::new(&cluster.certs);
    let batch = pb::TelemetryBatch {
        run_id: "no-such-run".into(),
        seq: 1,
        ..Default::default()
    };

    // An operator certificate is refused, and the refusal audited.
    let channel =
        faultline_tls::client::channel(&cluster.url(), &certs, Role::Operator, "operator").unwrap();
    let mut client = pb::agent_telemetry_client::AgentTelemetryClient::new(channel);
    let status = client
        .stream(tokio_stream::iter(vec![batch.clone()]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    let audit = cluster
        .cli_json(&["audit", "--output", "json"])
        .await
        .unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "telemetry"
                && e["outcome"] == "refused"
                && e["actor"].as_str().unwrap().contains("operator")),
        "{audit:#}"
    );

    // An agent's batch for a run that does not exist is not stored; it is told to stop.
    let channel =
        faultline_tls::client::channel(&cluster.url(), &certs, Role::Agent, "agent-1").unwrap();
    let mut client = pb::agent_telemetry_client::AgentTelemetryClient::new(channel);
    let mut acks = client
        .stream(tokio_stream::iter(vec![batch]))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().unwrap();
    assert!(ack.stop, "{ack:?}");
    assert!(ack.reason.contains("no run no-such-run"), "{ack:?}");
}

/// The first event of `kind` (of `stage`, when given).
fn event<'a>(run: &'a Value, kind: &str, stage: Option<&str>) -> Option<&'a Value> {
    run["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == kind && stage.is_none_or(|s| e["stage"] == s))
}

fn at(event: &Value) -> i64 {
    event["at_unix_ms"].as_i64().unwrap()
}

/// A stop condition on the kernel's count of failed connects (no probe at all): the run is
/// aborted within seconds of the partition, long before its 60 s, with the figure that fired,
/// the partition is reverted, and the first connect failure is in the timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_stop_condition_aborts_a_partition_and_reverts_it() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let gateway = bridge_gateway().await.unwrap();
    let (port, service) = accepting_service(&gateway).await.unwrap();
    let client = start_client("fl-telemetry", &gateway, port, &[])
        .await
        .unwrap();
    let name = &client.name;
    // Five attempts a second, all refused once cut: about 5/s against a limit of 2/s. Before
    // the cut (the stage's 3 s delay) the rate is 0, so the condition must not fire early.
    let yaml = format!(
        "apiVersion: faultline/v1
title: Stop a partition on the kernel's evidence
lease: 10s
stop_conditions:
  - {{ telemetry: \"tcp_connect_failures_per_s{{target={name}}} > 2\", window: 3s }}
stages:
  - name: cut
    after: 3s
    faults:
      - kind: partition
        agent: agent-1
        target: {{ container: {name} }}
        mode: reject
        scope: {{ peers: [\"{gateway}/32\"], ports: [{port}], protocol: tcp, direction: egress }}
        duration: 60s
"
    );
    let run_id = cluster
        .start_run("telemetry-stop.yaml", &yaml)
        .await
        .unwrap();
    let run = cluster
        .finished(&run_id, Duration::from_secs(45))
        .await
        .unwrap();
    assert_eq!(run["state"], "aborted", "{run:#}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "stop condition on telemetry: tcp_connect_failures_per_s{{target={name}}}"
        )),
        "{reason}"
    );
    assert!(reason.contains("> 2/s over the last 3s"), "{reason}");
    assert!(
        reason.contains("1 fault(s) of the run reverted"),
        "{reason}"
    );
    let applied = event(&run, "fault-applied", Some("cut")).expect("fault-applied");
    let stopped = event(&run, "stop-condition", None).expect("stop-condition");
    // Not before the partition (the baseline had no failures), and within a few seconds of it.
    let after = at(stopped) - at(applied);
    assert!(
        (0..8_000).contains(&after),
        "stop condition {after} ms after the partition: {run:#}"
    );
    // The figure that fired is what the container itself saw: about 5 failures a second.
    let message = stopped["message"].as_str().unwrap();
    let figure: f64 = message
        .split(&format!("tcp_connect_failures_per_s{{target={name}}} "))
        .nth(1)
        .and_then(|rest| rest.split("/s").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {message:?}"));
    assert!((2.0..=6.0).contains(&figure), "{message}");
    // The kernel's first connect failure is in the timeline (and, as a span event, in the trace).
    let first = event(&run, "telemetry-event", None).expect("telemetry-event");
    let text = first["message"].as_str().unwrap();
    assert!(
        text.contains("first connect failure on agent-1: ECONNREFUSED")
            && text.contains(name)
            && text.contains(&format!("{gateway}:{port}")),
        "{text}"
    );
    // Reverted: the container connects again.
    assert!(
        connects_again(&client, 5).await,
        "the partition was not reverted: {:?}",
        outcomes(&client).await.unwrap()
    );
    service.abort();
}

/// A stage waits for kernel evidence: the second wave starts only once the first wave's
/// partition shows in the connect failures; a third stage waiting for an OOM kill that never
/// comes times out and aborts the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_waits_for_telemetry_evidence_before_it_starts() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let gateway = bridge_gateway().await.unwrap();
    let (port, service) = accepting_service(&gateway).await.unwrap();
    let client = start_client("fl-telemetry", &gateway, port, &[])
        .await
        .unwrap();
    let bystander = TestContainer::start("fl-telemetry-by").await.unwrap();
    let (name, other) = (&client.name, &bystander.name);
    let yaml = format!(
        "apiVersion: faultline/v1
title: Escalate on kernel evidence
lease: 10s
stages:
  - name: cut
    after: 2s
    faults:
      - kind: partition
        agent: agent-1
        target: {{ container: {name} }}
        mode: reject
        scope: {{ peers: [\"{gateway}/32\"], ports: [{port}], protocol: tcp, direction: egress }}
        duration: 8s
  - name: wave
    overlap: true
    when:
      telemetry: \"tcp_connect_failures_per_s{{target={name},agent=agent-1}} > 2\"
      window: 2s
      timeout: 20s
    faults:
      - {{ kind: container-pause, agent: agent-1, target: {{ container: {other} }}, duration: 1s }}
  - name: never
    when: {{ telemetry: \"oom_kills{{target={name}}} > 0\", window: 2s, timeout: 2s }}
    faults:
      - {{ kind: container-pause, agent: agent-1, target: {{ container: {other} }}, duration: 1s }}
"
    );
    let run_id = cluster
        .start_run("telemetry-when.yaml", &yaml)
        .await
        .unwrap();
    let run = cluster
        .finished(&run_id, Duration::from_secs(60))
        .await
        .unwrap();

    let cut = event(&run, "fault-applied", Some("cut")).expect("the partition applied");
    let waiting = event(&run, "stage-waiting", Some("wave")).expect("stage-waiting");
    assert!(
        waiting["message"].as_str().unwrap().contains(&format!(
            "until tcp_connect_failures_per_s{{target={name},agent=agent-1}} > 2/s"
        )),
        "{waiting}"
    );
    let triggered = event(&run, "stage-triggered", Some("wave")).expect("stage-triggered");
    let message = triggered["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "condition held: tcp_connect_failures_per_s{{target={name},agent=agent-1}} "
        )),
        "{message}"
    );
    // It held only once the partition made connects fail, and soon after.
    let after = at(triggered) - at(cut);
    assert!(
        (0..6_000).contains(&after),
        "triggered {after} ms after the cut: {run:#}"
    );
    let wave = event(&run, "fault-applied", Some("wave")).expect("the second wave applied");
    assert!(at(wave) >= at(triggered));
    // The third stage waited for an OOM kill that never came.
    assert_eq!(run["state"], "aborted", "{run:#}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains("stage never: `when` did not hold within 2s")
            && reason.contains(&format!("oom_kills{{target={name}}} > 0")),
        "{reason}"
    );
    assert!(
        event(&run, "fault-applied", Some("never")).is_none(),
        "{run:#}"
    );
    assert_eq!(bystander.state().await.unwrap(), "running");
    assert!(
        connects_again(&client, 5).await,
        "{:?}",
        outcomes(&client).await.unwrap()
    );
    service.abort();
}
