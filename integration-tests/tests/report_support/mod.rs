//! `faultline report RUN --format json` for end-to-end tests: the real CLI's report, checked
//! against `docs/report.schema.json`.

use faultline_integration_tests::cluster::Cluster;
use serde_json::Value;

/// The run's JSON report; panics, listing every violation, unless it validates.
pub async fn validated_report(cluster: &Cluster, run_id: &str) -> Value {
    let report = cluster
        .cli_json(&["report", run_id, "--format", "json"])
        .await
        .unwrap_or_else(|e| panic!("faultline report {run_id}: {e:#}"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/report.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&report)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\n{report:#}");
    assert_eq!(report["run"]["id"], run_id);
    report
}
