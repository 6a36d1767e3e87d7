#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! OpenTelemetry traces end to end: a real OTLP/gRPC receiver (Python `grpcio` +
//! `opentelemetry-proto`, `integration-tests/otlp_receiver.py`), the real coordinator and agent
//! exporting to it through the standard `OTEL_EXPORTER_OTLP_*` variables, a plan pausing a
//! real container. The received spans must form one trace: `faultline.run` → `faultline.stage`
//! → `faultline.fault` → `faultline.fault.active`, and the agent's `faultline.agent.apply` /
//! `faultline.agent.revert` as children of the fault span through the traceparent carried in
//! the signed command; under each `faultline.steady_state.check`, one `faultline.probe.check`
//! per probe with its statistics. The registry's metrics arrive over OTLP too (MetricsService),
//! from both processes, with the run's values. Then the receiver is killed: a second run must
//! end exactly as well, and the lost spans and failed metric exports are counted on /metrics.
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
    let metrics_out = dir.path().join("metrics.jsonl");
    let (mut receiver, addr) = start_receiver(&out, &metrics_out, false).await;
    // SAFETY: this binary has this one test, which sets the variables before any other
    // thread of its own reads the environment; the cluster's processes inherit them.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
        std::env::set_var("OTEL_EXPORTER_OTLP_TIMEOUT", "2000");
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "500");
        std::env::set_var("FAULTLINE_METRICS_LISTEN", "127.0.0.1:0");
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
    // Steady before and after, completed: the hypothesis is confirmed (as the report says).
    assert_eq!(attrs["faultline.run.verdict"], "confirmed", "{attrs:#}");

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
    for check in &checks {
        child_of(check, root);
        assert_eq!(check["attributes"]["faultline.steady"], true, "{check:#}");
    }
    // One probe-check span per probe (the plan has one) under each phase's check.
    let probe_checks = eventually(Duration::from_secs(30), "probe check spans", || {
        let out = out.clone();
        async move {
            let all = spans(&out);
            let found: Vec<Value> = by_name(&all, "faultline.probe.check")
                .into_iter()
                .cloned()
                .collect();
            (found.len() >= 2).then_some(found)
        }
    })
    .await
    .unwrap();
    assert_eq!(probe_checks.len(), 2, "{probe_checks:#?}");
    for check in &checks {
        let children: Vec<&Value> = probe_checks
            .iter()
            .filter(|p| p["parent_span_id"] == check["span_id"])
            .collect();
        assert_eq!(children.len(), 1, "one probe check under {check:#}");
        let probe = children[0];
        child_of(probe, check);
        let a = &probe["attributes"];
        assert_eq!(a["faultline.probe.name"], "alive", "{probe:#}");
        assert_eq!(a["faultline.probe.kind"], "command", "{probe:#}");
        assert_eq!(a["faultline.steady"], true, "{probe:#}");
        assert_eq!(a["faultline.probe.errors"], 0, "{probe:#}");
        assert_eq!(a["faultline.probe.error_rate"], 0.0, "{probe:#}");
        // 1 s window, a sample every 200 ms.
        let samples = a["faultline.probe.samples"].as_i64().unwrap();
        assert!((2..=10).contains(&samples), "{probe:#}");
        let p95 = a["faultline.probe.latency_p95_ms"].as_f64().unwrap();
        assert!(p95 > 0.0 && p95 < 2_000.0, "{probe:#}");
        assert!(a.get("faultline.probe.reason").is_none(), "{probe:#}");
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

    // The same run in the metrics both processes export over OTLP (cumulative).
    let points = eventually(Duration::from_secs(30), "run metrics over OTLP", || {
        let metrics_out = metrics_out.clone();
        async move {
            let points = metric_points(&metrics_out);
            let completed = latest_point(
                &points,
                "faultline_runs_total",
                &[("state", "completed")],
                from_coordinator,
            )?;
            let applied = latest_point(
                &points,
                "faultline_agent_applies_total",
                &[("kind", "container-pause"), ("outcome", "applied")],
                from_agent,
            )?;
            let active = latest_point(
                &points,
                "faultline_agent_faults_active",
                &[("kind", "container-pause")],
                from_agent,
            )?;
            (completed["value"] == 1.0 && applied["value"] == 1.0 && active["value"] == 0.0)
                .then_some(points)
        }
    })
    .await
    .unwrap();
    let runs = latest_point(
        &points,
        "faultline_runs_total",
        &[("state", "completed")],
        from_coordinator,
    )
    .unwrap();
    assert_eq!(runs["type"], "sum", "{runs:#}");
    assert_eq!(runs["monotonic"], true, "{runs:#}");
    assert_eq!(runs["service"], "faultline-coordinator", "{runs:#}");
    let connected =
        latest_point(&points, "faultline_agents_connected", &[], from_coordinator).unwrap();
    assert_eq!(connected["type"], "gauge");
    assert_eq!(connected["value"], 1.0, "{connected:#}");
    let latency = latest_point(
        &points,
        "faultline_command_duration_seconds",
        &[("kind", "container-pause")],
        from_coordinator,
    )
    .unwrap();
    assert_eq!(latency["type"], "histogram", "{latency:#}");
    assert_eq!(latency["unit"], "s");
    assert_eq!(latency["count"], 1, "{latency:#}");
    let took = latency["sum"].as_f64().unwrap();
    assert!(took > 0.0 && took < 20.0, "{latency:#}");
    assert_eq!(
        latency["bounds"].as_array().unwrap().len(),
        11,
        "{latency:#}"
    );
    let agent_side = latest_point(
        &points,
        "faultline_agent_applies_total",
        &[("kind", "container-pause"), ("outcome", "applied")],
        from_agent,
    )
    .unwrap();
    assert_eq!(agent_side["service"], "faultline-agent");
    assert_eq!(agent_side["resource"]["faultline.agent"], "agent-1");
    // The exporters count themselves: spans went out, none were lost.
    let exported = latest_point(
        &points,
        "faultline_otel_spans_exported_total",
        &[],
        from_coordinator,
    )
    .unwrap();
    assert!(exported["value"].as_f64().unwrap() >= 1.0, "{exported:#}");
    let dropped = latest_point(
        &points,
        "faultline_otel_spans_dropped_total",
        &[],
        from_agent,
    )
    .unwrap();
    assert_eq!(dropped["value"], 0.0, "{dropped:#}");

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
    assert_eq!(
        halted["attributes"]["faultline.run.verdict"], "not evaluated (no hypothesis probes)",
        "a halted run is not judged: {halted:#}"
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
    // ... and what the dead collector cost is counted where Prometheus sees it.
    let coordinator_metrics = metrics_addr(&cluster.db.with_extension("log")).unwrap();
    eventually(Duration::from_secs(30), "export losses counted", || {
        let addr = coordinator_metrics.clone();
        async move {
            let dropped = scrape_value(&addr, "faultline_otel_spans_dropped_total").await?;
            let failed = scrape_value(
                &addr,
                "faultline_otel_metric_exports_total{outcome=\"failed\"}",
            )
            .await?;
            (dropped >= 1.0 && failed >= 1.0).then_some(())
        }
    })
    .await
    .unwrap();
}
