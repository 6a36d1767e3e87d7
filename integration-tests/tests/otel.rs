#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! OpenTelemetry traces end to end: a real OTLP/gRPC receiver (Python `grpcio` +
//! `opentelemetry-proto`, `integration-tests/otlp_receiver.py`), the real coordinator and agent
//! exporting to it through the standard `OTEL_EXPORTER_OTLP_*` variables, a plan pausing a
//! real container. The received spans must form one trace: `faultline.run` → `faultline.stage`
//! → `faultline.fault` → `faultline.fault.active`, and the agent's `faultline.agent.apply` /
//! `faultline.agent.revert` as children of the fault span through the traceparent carried in
//! the signed command. Then the receiver is killed and a second run must end exactly as well.
//!
//! One test function on purpose: the exporter is configured through the environment, which
//! the cluster's processes inherit from this (single-test) process.

mod otel_support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use faultline_integration_tests::cluster::{Cluster, eventually};
use faultline_integration_tests::docker::TestContainer;
use otel_support::*;
use serde_json::Value;

fn out_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("spans.jsonl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_one_trace_with_agent_spans_and_a_dead_collector_changes_nothing() {
    ensure_python_deps().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("spans.jsonl");
    let (mut receiver, addr) = start_receiver(&out, false).await;
    // SAFETY: this binary has this one test, which sets the variables before any other
    // thread of its own reads the environment; the cluster's processes inherit them.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
        std::env::set_var("OTEL_EXPORTER_OTLP_TIMEOUT", "2000");
        std::env::remove_var("OTEL_SERVICE_NAME");
    }
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let target = TestContainer::start("otel-db").await.unwrap();
    let plan_path = cluster
        .write_plan("traced.yaml", &plan("agent-1", &target.name))
        .unwrap();

    let (run, _) = run_plan(&cluster, &plan_path).await;
    assert_eq!(run["state"], "completed", "{run:#}");
    let run_id = run["id"].as_str().unwrap().to_string();

    let wanted = [
        "faultline.run",
        "faultline.steady_state.check",
        "faultline.stage",
        "faultline.fault",
        "faultline.fault.active",
        "faultline.agent.apply",
        "faultline.agent.revert",
    ];
    let received = eventually(Duration::from_secs(30), "every span exported", || {
        let out = out.clone();
        async move {
            let all = spans(&out);
            wanted
                .iter()
                .all(|name| all.iter().any(|s| s["name"] == *name))
                .then_some(all)
        }
    })
    .await
    .unwrap();

    // One trace id across both processes.
    let traces: BTreeSet<&str> = received
        .iter()
        .filter_map(|s| s["trace_id"].as_str())
        .collect();
    assert_eq!(traces.len(), 1, "one trace expected: {received:#?}");

    let root = one(&received, "faultline.run");
    assert_eq!(root["parent_span_id"], "", "the run span is the root");
    assert_eq!(root["service"], "faultline-coordinator");
    let attrs = &root["attributes"];
    assert_eq!(attrs["faultline.run.id"], run_id.as_str());
    assert_eq!(
        attrs["faultline.plan.title"],
        format!("Traced pause of {}", target.name)
    );
    assert_eq!(attrs["faultline.run.state"], "completed");

    let checks = by_name(&received, "faultline.steady_state.check");
    let phases: BTreeSet<&str> = checks
        .iter()
        .map(|c| c["attributes"]["faultline.phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        BTreeSet::from(["baseline", "recovery"]),
        "{checks:#?}"
    );
    for check in checks {
        child_of(check, root);
        assert_eq!(check["attributes"]["faultline.steady"], true, "{check:#}");
    }

    let stage = one(&received, "faultline.stage");
    child_of(stage, root);
    assert_eq!(stage["attributes"]["faultline.stage.name"], "pause-db");

    let fault = one(&received, "faultline.fault");
    child_of(fault, stage);
    let fault_id = format!("{run_id}/pause-db/0");
    let fa = &fault["attributes"];
    assert_eq!(fa["faultline.fault.id"], fault_id.as_str());
    assert_eq!(fa["faultline.fault.kind"], "container-pause");
    assert_eq!(fa["faultline.agent"], "agent-1");
    assert!(
        fa["faultline.target"]
            .as_str()
            .unwrap()
            .contains(&target.name),
        "{fa:#}"
    );

    let active = one(&received, "faultline.fault.active");
    child_of(active, fault);
    let window_ms =
        (active["end_ns"].as_u64().unwrap() - active["start_ns"].as_u64().unwrap()) / 1_000_000;
    assert!(
        (1_500..10_000).contains(&window_ms),
        "the active span covers the 2 s fault window: {window_ms} ms"
    );

    for name in ["faultline.agent.apply", "faultline.agent.revert"] {
        let span = one(&received, name);
        child_of(span, fault);
        assert_eq!(span["service"], "faultline-agent", "{span:#}");
        assert_eq!(span["resource"]["faultline.agent"], "agent-1");
        assert!(span["resource"]["host.name"].as_str().is_some());
        let a = &span["attributes"];
        assert_eq!(a["faultline.fault.id"], fault_id.as_str());
        assert_eq!(a["faultline.run.id"], run_id.as_str());
        assert!(
            a["faultline.target.resolved"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{span:#}"
        );
    }
    assert_eq!(
        one(&received, "faultline.agent.apply")["attributes"]["faultline.verified"],
        true
    );
    assert_eq!(
        one(&received, "faultline.agent.revert")["attributes"]["faultline.revert.reason"],
        "schedule"
    );
    let by_id: HashMap<&str, &Value> = received
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    assert_eq!(by_id.len(), received.len(), "span ids are unique");

    // A halted run: its span says so and carries a `faultline.halt` event.
    let long = cluster
        .write_plan(
            "long.yaml",
            &plan("agent-1", &target.name).replace("duration: 2s", "duration: 60s"),
        )
        .unwrap();
    let out = cluster.cli(&["run", long.to_str().unwrap()]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target
        .wait_for_state("paused", Duration::from_secs(20))
        .await
        .unwrap();
    let out = cluster
        .cli(&["halt", "--reason", "otel test"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let halted = eventually(Duration::from_secs(30), "halted run span", || {
        let out = out_path(&dir);
        async move {
            spans(&out).into_iter().find(|s| {
                s["name"] == "faultline.run" && s["attributes"]["faultline.run.state"] == "halted"
            })
        }
    })
    .await
    .unwrap();
    assert!(
        halted["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "faultline.halt"),
        "{halted:#}"
    );
    let out = cluster.cli(&["halt", "--release"]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target
        .wait_for_state("running", Duration::from_secs(20))
        .await
        .unwrap();

    // The collector dies: the next run ends the same way, in about the same time.
    receiver.start_kill().unwrap();
    receiver.wait().await.unwrap();
    let (second, took) = run_plan(&cluster, &plan_path).await;
    assert_eq!(second["state"], "completed", "{second:#}");
    assert!(
        took < Duration::from_secs(15),
        "a dead collector must not slow the run down: {took:?}"
    );
    assert_eq!(target.state().await.unwrap(), "running");
}
