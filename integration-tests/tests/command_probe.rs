#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! `command` steady-state probes, end to end: the coordinator has the named agent run a program
//! on its host (the real binaries, over mTLS), judges its exit code, and a run reacts to it —
//! steady while a file exists, stopped by its stop condition once the file is gone. Probe
//! requests are signed commands: the real agent refuses forged, tampered, expired,
//! misaddressed and replayed ones and runs nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::{TestContainer, unique_name};
use faultline_integration_tests::scripted::{self, AgentProcess, ScriptedCoordinator};
use faultline_proto::v1 as pb;
use faultline_tls::layout::CertDir;

/// A path in /tmp that nothing else uses, removed when dropped.
struct Marker(PathBuf);

impl Marker {
    fn new(prefix: &str) -> Self {
        Marker(std::env::temp_dir().join(unique_name(prefix)))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn create(&self) {
        std::fs::write(&self.0, b"").unwrap();
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
    }

    fn exists(&self) -> bool {
        self.0.exists()
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A plan whose steady state is `test -e MARKER` run by `agent-1` (plus `extra` probes), with a
/// stop condition on it, pausing `container` for `duration`.
fn plan(title: &str, marker: &str, extra: &str, container: &str, duration: &str) -> String {
    format!(
        "apiVersion: faultline/v1
title: {title}
lease: 30s
steady_state:
  probes:
    - {{ name: marker, kind: command, agent: agent-1, argv: [test, -e, \"{marker}\"], interval: 200ms, timeout: 2s }}
{extra}  baseline: 1s
  max_error_rate: 0%
stop_conditions:
  - {{ probe: marker, max_error_rate: 50%, window: 1s }}
stages:
  - name: pause
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {container} }}
        duration: {duration}
"
    )
}

/// Starts `yaml` and returns the run's id.
async fn start_run(cluster: &Cluster, name: &str, yaml: &str) -> String {
    let path = cluster.write_plan(name, yaml).unwrap();
    let out = cluster.cli(&["run", path.to_str().unwrap()]).await.unwrap();
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
    runs[0]["id"].as_str().unwrap().to_string()
}

async fn show(cluster: &Cluster, run_id: &str) -> serde_json::Value {
    cluster
        .cli_json(&["runs", "show", run_id, "--output", "json"])
        .await
        .unwrap()
}

/// The run once it has ended, polled for at most `timeout`.
async fn finished(cluster: &Cluster, run_id: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let run = show(cluster, run_id).await;
        if run["state"] != "running" {
            return run;
        }
        assert!(Instant::now() < deadline, "run still running: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn messages_of(run: &serde_json::Value, kind: &str) -> Vec<String> {
    run["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_probe_is_steady_while_its_file_exists_and_stops_the_run_once_it_is_gone() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-cmdprobe-a").await.unwrap();
    let marker = Marker::new("fl-cmdprobe-marker");
    marker.create();
    let yaml = plan("Command probe", marker.path(), "", &target.name, "60s");
    let run_id = start_run(&cluster, "command-probe.yaml", &yaml).await;

    // Steady: the baseline passed (the agent ran `test -e` and it exited 0), so the fault went in.
    target
        .wait_for_state("paused", Duration::from_secs(30))
        .await
        .unwrap();
    let run = show(&cluster, &run_id).await;
    let baseline = messages_of(&run, "steady-state-check");
    assert_eq!(baseline.len(), 1, "{run}");
    assert!(baseline[0].contains("(steady)"), "{}", baseline[0]);
    assert!(
        baseline[0].contains("marker: steady") && baseline[0].contains(" 0 errors"),
        "{}",
        baseline[0]
    );
    assert!(messages_of(&run, "stop-condition").is_empty(), "{run}");

    // The file goes: the same program now exits 1, and the stop condition ends the run.
    marker.remove();
    let removed = Instant::now();
    let run = finished(&cluster, &run_id, Duration::from_secs(30)).await;
    let took = removed.elapsed();
    assert_eq!(run["state"], "aborted", "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains("stop condition on probe marker"),
        "{reason}"
    );
    let stops = messages_of(&run, "stop-condition");
    assert_eq!(stops.len(), 1, "{run}");
    assert!(stops[0].contains("> 50%"), "{}", stops[0]);
    assert_eq!(target.state().await.unwrap(), "running", "reverted");
    assert!(took < Duration::from_secs(15), "stopped after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_unreachable_command_probes_keep_a_run_from_injecting() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("fl-cmdprobe-b").await.unwrap();
    let marker = Marker::new("fl-cmdprobe-absent");
    // Never created. A second probe names an agent that is not connected.
    let extra = "    - { name: elsewhere, kind: command, agent: agent-2, argv: [/bin/true], \
                 interval: 200ms, timeout: 1s }\n";
    let yaml = plan("Not steady", marker.path(), extra, &target.name, "60s");
    let run_id = start_run(&cluster, "not-steady.yaml", &yaml).await;

    let run = finished(&cluster, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["state"], "aborted", "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(reason.contains("not steady before injection"), "{reason}");
    // The agent's answer travelled back: `test -e` exited 1 on agent-1's host.
    assert!(
        reason.contains("marker: error rate 100% > 0%")
            && reason.contains("exit code 1, expected 0"),
        "{reason}"
    );
    assert!(
        reason.contains("elsewhere: error rate 100% > 0%")
            && reason.contains("agent agent-2 not connected"),
        "{reason}"
    );
    assert!(messages_of(&run, "fault-sent").is_empty(), "{run}");
    assert_eq!(target.state().await.unwrap(), "running");
}

/// Polls until `check` holds, for at most `timeout`.
async fn wait_until(timeout: Duration, what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kind(report: &pb::CommandReport) -> pb::ReportKind {
    pb::ReportKind::try_from(report.kind).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_only_signed_fresh_probe_requests_addressed_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs_path = dir.path().join("certs");
    let mut options = faultline_tls::pki::InitOptions::new(&certs_path);
    options.agents = vec!["agent-1".into()];
    faultline_tls::pki::init(&options).unwrap();
    let certs = CertDir::new(&certs_path);
    let key = faultline_tls::layout::load_signing_key(&certs.signing_key()).unwrap();
    let state = dir.path().join("state");

    let mut coordinator = ScriptedCoordinator::start(&certs).await.unwrap();
    let agent = AgentProcess::start(&coordinator.url(), &certs_path, &state).unwrap();
    coordinator
        .wait_register(Duration::from_secs(20))
        .await
        .unwrap();

    // The probe's only effect is creating this file, so "ran" is observable from outside.
    let marker = Marker::new("fl-cmdprobe-touch");
    let probe = |id: &str| {
        scripted::command(
            id,
            "agent-1",
            pb::command::Action::Probe(pb::ProbeRequest {
                argv: vec!["touch".into(), marker.path().into()],
                timeout_ms: 5_000,
            }),
        )
    };
    let timeout = Duration::from_secs(10);
    let mut refusals: Vec<(&str, pb::SignedCommand, &str)> = Vec::new();

    let mut unsigned = scripted::sign(&key, &probe("unsigned"));
    unsigned.signature.clear();
    refusals.push(("unsigned", unsigned, "unsigned"));

    let mut tampered = scripted::sign(&key, &probe("tampered"));
    let at = tampered.command.len() - 1; // the probe's time-out, after signing
    tampered.command[at] ^= 0x01;
    refusals.push(("tampered", tampered, "does not verify"));

    let forger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    refusals.push((
        "forged",
        scripted::sign(&forger, &probe("forged")),
        "does not verify",
    ));

    let mut expired = probe("expired");
    expired.issued_at_unix_ms -= 60_000;
    expired.not_after_unix_ms = expired.issued_at_unix_ms + 30_000;
    refusals.push(("expired", scripted::sign(&key, &expired), "expired"));

    let mut elsewhere = probe("elsewhere");
    elsewhere.target_agent = "agent-2".into();
    refusals.push((
        "elsewhere",
        scripted::sign(&key, &elsewhere),
        "addressed to agent",
    ));

    for (id, command, reason) in refusals {
        coordinator.send(command).await.unwrap();
        let report = coordinator.report_for(id, timeout).await.unwrap();
        assert_eq!(kind(&report), pb::ReportKind::Refused, "{id}: {report:?}");
        assert!(report.detail.contains(reason), "{id}: {}", report.detail);
        assert!(!marker.exists(), "{id} ran the probe");
    }

    // A good request runs; its exact bytes are refused when replayed, and run nothing.
    let good = scripted::sign(&key, &probe("good"));
    coordinator.send(good.clone()).await.unwrap();
    wait_until(timeout, "the good probe to run", || marker.exists()).await;
    marker.remove();

    coordinator.send(good).await.unwrap();
    let report = coordinator.report_for("good", timeout).await.unwrap();
    assert_eq!(kind(&report), pb::ReportKind::Refused, "{report:?}");
    assert!(report.detail.contains("replays nonce"), "{}", report.detail);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!marker.exists(), "the replay ran the probe");
    agent.stop().await.unwrap();
}
