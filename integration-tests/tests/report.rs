#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! `faultline report` end to end: a two-stage plan pauses one real container, then stops
//! another; the report of that run, in every format, says what happened: each fault's
//! mechanism, that it was verified, and how long it was in force.

use std::time::Duration;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;

const NOT_EVALUATED: &str = "not evaluated (no hypothesis probes)";

fn two_stage_plan(db: &str, api: &str) -> String {
    format!(
        "apiVersion: faultline/v1
title: Pause the db, then stop the api
hypothesis: Both containers run again once their faults are reverted.
lease: 10s
stages:
  - name: db-stall
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {db} }}
        duration: 3s
  - name: api-down
    after: 1s
    faults:
      - kind: container-stop
        agent: agent-2
        target: {{ container: {api} }}
        grace: 1s
        duration: 2s
"
    )
}

fn schema() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/report.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn schema_errors(report: &Value) -> Vec<String> {
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema())
        .unwrap();
    validator
        .iter_errors(report)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

fn int(value: &Value) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("not an integer: {value}"))
}

fn assert_near(what: &str, value: i64, expected: i64, slack_below: i64, slack_above: i64) {
    assert!(
        (expected - slack_below..=expected + slack_above).contains(&value),
        "{what}: {value} ms, expected about {expected} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_of_a_two_stage_run_in_every_format() {
    let cluster = Cluster::start(&["agent-1", "agent-2"]).await.unwrap();
    let db = TestContainer::start("fl-report-db").await.unwrap();
    let api = TestContainer::start("fl-report-api").await.unwrap();
    let plan = cluster
        .write_plan("two-stage.yaml", &two_stage_plan(&db.name, &api.name))
        .unwrap();

    let out = cluster
        .cli(&["run", plan.to_str().unwrap(), "--follow"])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "run --follow failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.wait_for_state("running", Duration::from_secs(10))
        .await
        .unwrap();
    api.wait_for_state("running", Duration::from_secs(10))
        .await
        .unwrap();
    let runs = cluster
        .cli_json(&["runs", "list", "--output", "json"])
        .await
        .unwrap();
    let id = runs[0]["id"].as_str().unwrap().to_string();

    // JSON: valid against the schema, and it says what happened.
    let report = cluster
        .cli_json(&["report", &id, "--format", "json"])
        .await
        .unwrap();
    let errors = schema_errors(&report);
    assert!(errors.is_empty(), "{errors:#?}\n{report:#}");
    assert_eq!(report["run"]["id"], id.as_str());
    assert_eq!(report["run"]["state"], "completed", "{report:#}");
    assert_eq!(report["verdict"], NOT_EVALUATED);
    assert_eq!(
        report["hypothesis"],
        "Both containers run again once their faults are reverted."
    );
    assert_eq!(report["report_version"], 2);
    assert_eq!(report["probes"], serde_json::json!([]));
    // Both agents streamed telemetry about their containers (eBPF on this project's kernels).
    assert_eq!(report["telemetry"]["mechanism"], "bpf", "{report:#}");
    assert!(report["failure_detection_ms"].is_null());
    assert!(report["recovery_ms"].is_null());
    assert!(report["halt"].is_null());
    assert_eq!(report["notes"], serde_json::json!([]));

    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    assert!(
        stages.iter().all(|s| s["outcome"] == "finished"),
        "{stages:#?}"
    );
    assert_eq!(stages[1]["after_ms"], 1_000);
    // The second stage waits 1s after the first one finished.
    let gap = int(&stages[1]["started"]["offset_ms"]) - int(&stages[0]["finished"]["offset_ms"]);
    assert_near("gap between the stages", gap, 1_000, 50, 1_000);

    let faults = report["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{faults:#?}");
    let expected = [
        (
            "db-stall",
            "agent-1",
            "container-pause",
            "docker pause",
            3_000,
            &db,
        ),
        (
            "api-down",
            "agent-2",
            "container-stop",
            "docker stop",
            2_000,
            &api,
        ),
    ];
    for (fault, (stage, agent, kind, mechanism, duration, container)) in faults.iter().zip(expected)
    {
        assert_eq!(fault["id"], format!("{id}/{stage}/0"));
        assert_eq!(fault["stage"], stage);
        assert_eq!(fault["agent"], agent);
        assert_eq!(fault["kind"], kind);
        assert_eq!(fault["target"], format!("container {}", container.name));
        assert_eq!(fault["mechanism"], mechanism, "{fault:#}");
        assert_eq!(fault["verified"], true, "{fault:#}");
        assert!(
            fault["resolved_target"]
                .as_str()
                .unwrap()
                .contains(&container.id[..12]),
            "{fault:#}"
        );
        assert_eq!(fault["outcome"], "reverted");
        assert_eq!(fault["revert_reason"], "schedule");
        assert_eq!(fault["failures"], serde_json::json!([]));
        assert_eq!(fault["planned_duration_ms"], duration);
        // In force for about its duration: the agent schedules the revert when it applied
        // the fault, just before the coordinator records the applied report.
        assert_near("in force", int(&fault["in_force_ms"]), duration, 300, 2_000);
        assert_near(
            "revert latency",
            int(&fault["revert_latency_ms"]),
            0,
            300,
            2_000,
        );
        assert_eq!(
            int(&fault["scheduled_end"]["offset_ms"]) - int(&fault["applied"]["offset_ms"]),
            duration
        );
    }
    let totals = &report["totals"];
    assert_eq!(totals["faults_applied"], 2);
    assert_eq!(totals["faults_verified"], 2);
    assert_eq!(totals["faults_reverted"], 2);
    assert_eq!(totals["faults_failed"], 0);
    // The faults' window: the first apply to the last revert.
    let during = &report["phases"]["during"];
    assert_eq!(
        during["start"]["offset_ms"], faults[0]["applied"]["offset_ms"],
        "{report:#}"
    );
    assert_eq!(
        during["end"]["offset_ms"], faults[1]["reverted"]["offset_ms"],
        "{report:#}"
    );
    let timeline = report["timeline"].as_array().unwrap();
    assert_eq!(timeline[0]["kind"], "run-started");
    assert_eq!(timeline[0]["offset_ms"], 0);
    assert_eq!(timeline.last().unwrap()["kind"], "run-finished");

    // HTML: one self-contained file with an SVG timeline, one lane per fault.
    let html_path = cluster.dir.path().join("report.html");
    let out = cluster
        .cli(&[
            "report",
            &id,
            "--format",
            "html",
            "--out",
            html_path.to_str().unwrap(),
        ])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "--out writes the file, not stdout");
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), 1);
    let svg = &html[html.find("<svg").unwrap()..html.find("</svg>").unwrap()];
    assert_eq!(svg.matches("<g class=\"lane\"").count(), 2, "{svg}");
    for fault in faults {
        let lane = format!("data-fault=\"{}\"", fault["id"].as_str().unwrap());
        assert!(svg.contains(&lane), "{lane} in {svg}");
    }
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
    assert!(html.contains("docker pause") && html.contains("docker stop"));

    // Markdown and text.
    let out = cluster
        .cli(&["report", &id, "--format", "md"])
        .await
        .unwrap();
    assert!(out.status.success());
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        md.starts_with("# Run report: Pause the db, then stop the api"),
        "{md}"
    );
    assert!(
        md.contains(&format!("| Verdict | {NOT_EVALUATED} |")),
        "{md}"
    );
    assert!(
        md.contains("| docker pause | yes: container is paused |"),
        "{md}"
    );
    assert!(
        md.contains("| docker stop | yes: container is stopped |"),
        "{md}"
    );

    let out = cluster.cli(&["report", &id]).await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        format!("run         {id}"),
        format!("verdict     {NOT_EVALUATED}"),
        "mechanism       docker pause".into(),
        "mechanism       docker stop".into(),
        "verified        yes: container is stopped".into(),
        "none: the run was not halted".into(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in\n{text}");
    }

    // An unknown run is an error, not an empty report.
    let out = cluster
        .cli(&["report", "no-such-run", "--format", "json"])
        .await
        .unwrap();
    assert!(!out.status.success());
}
