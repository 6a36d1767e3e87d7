#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! OpenTelemetry traces over OTLP/HTTP with protobuf bodies (`OTEL_EXPORTER_OTLP_PROTOCOL=
//! http/protobuf`, `POST /v1/traces`): the same run → stage → fault → agent span tree as over
//! gRPC (`otel.rs`), received by `otlp_receiver.py --http`, and the metrics (`POST
//! /v1/metrics`) of both processes. One test function: the exporter is configured through the
//! environment the cluster's processes inherit.

mod otel_support;

use std::collections::BTreeSet;
use std::time::Duration;

use faultline_integration_tests::cluster::{Cluster, eventually};
use faultline_integration_tests::netclient::{bridge_gateway, start_client};
use otel_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_one_trace_over_otlp_http_protobuf() {
    ensure_python_deps().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("spans.jsonl");
    let metrics_out = dir.path().join("metrics.jsonl");
    let (_receiver, addr) = start_receiver(&out, &metrics_out, true).await;
    // SAFETY: this binary has this one test, which sets the variables before any other
    // thread of its own reads the environment; the cluster's processes inherit them.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
        std::env::set_var("OTEL_SERVICE_NAME", "gameday-faultline");
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "500");
        std::env::set_var("FAULTLINE_METRICS_LISTEN", "127.0.0.1:0");
    }
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    // The target is a client that keeps connecting to a closed port: the agent's eBPF
    // programs see its connects refused, and the run's span gets the first one as an event.
    let gateway = bridge_gateway().await.unwrap();
    let closed = std::net::TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let target = start_client("otel-http-client", &gateway, port, &[])
        .await
        .unwrap();
    let plan_path = cluster
        .write_plan("traced.yaml", &plan("agent-1", &target.name))
        .unwrap();
    let (run, _) = run_plan(&cluster, &plan_path).await;
    assert_eq!(run["state"], "completed", "{run:#}");

    let wanted = [
        "faultline.run",
        "faultline.stage",
        "faultline.fault",
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
    let traces: BTreeSet<&str> = received
        .iter()
        .filter_map(|s| s["trace_id"].as_str())
        .collect();
    assert_eq!(traces.len(), 1, "one trace expected: {received:#?}");
    let root = one(&received, "faultline.run");
    assert_eq!(root["parent_span_id"], "");
    assert!(
        root["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "faultline.telemetry.first_connect_failure"),
        "the first refused connect is an event of the run span: {root:#}"
    );
    // OTEL_SERVICE_NAME wins over the built-in default, on both sides.
    assert!(received.iter().all(|s| s["service"] == "gameday-faultline"));
    let stage = one(&received, "faultline.stage");
    child_of(stage, root);
    let fault = one(&received, "faultline.fault");
    child_of(fault, stage);
    child_of(one(&received, "faultline.agent.apply"), fault);
    child_of(one(&received, "faultline.agent.revert"), fault);

    // Metrics over OTLP/HTTP from both processes, with the run's values.
    let points = eventually(
        Duration::from_secs(30),
        "run metrics over OTLP/HTTP",
        || {
            let metrics_out = metrics_out.clone();
            async move {
                let points = metric_points(&metrics_out);
                let completed = latest_point(
                    &points,
                    "faultline_runs_total",
                    &[("state", "completed")],
                    from_coordinator,
                )?;
                let reverted = latest_point(
                    &points,
                    "faultline_agent_reverts_total",
                    &[("reason", "schedule")],
                    from_agent,
                )?;
                (completed["value"] == 1.0 && reverted["value"] == 1.0).then_some(points)
            }
        },
    )
    .await
    .unwrap();
    assert!(points.iter().all(|p| p["service"] == "gameday-faultline"));
    let applies = latest_point(
        &points,
        "faultline_agent_apply_duration_seconds",
        &[("kind", "container-pause")],
        from_agent,
    )
    .unwrap();
    assert_eq!(applies["count"], 1, "{applies:#}");
    let took = applies["sum"].as_f64().unwrap();
    assert!(took > 0.0 && took < 20.0, "{applies:#}");
}
