#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Every plan under `examples/` — the ten seed game-days included — passes
//! `faultline plan validate` (the real binary: variables, probe includes and every rule), and
//! a bad variable value is caught with its location.

use std::path::{Path, PathBuf};
use std::process::Command;

use faultline_integration_tests::cluster::bin;

/// The ten experiments of the seeds, one plan each.
const SEEDS: &[&str] = &[
    "01-database-sudden-death.yaml",
    "02-network-partition.yaml",
    "03-memory-oom-kill.yaml",
    "04-cpu-throttling.yaml",
    "05-disk-io-starvation.yaml",
    "06-connection-pool-exhaustion.yaml",
    "07-redis-cache-failure.yaml",
    "08-proxy-failure.yaml",
    "09-network-latency.yaml",
    "10-multi-service-cascade.yaml",
];

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn validate(plan: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("faultline"))
        .arg("plan")
        .arg("validate")
        .arg(plan)
        .args(extra)
        .output()
        .unwrap()
}

/// Plan files: YAML with an `apiVersion` (not the coordinator policy, not included probe lists).
fn plans_in(dir: &Path) -> Vec<PathBuf> {
    let mut plans: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .filter(|path| {
            std::fs::read_to_string(path)
                .unwrap()
                .contains("apiVersion: faultline/v1")
        })
        .collect();
    plans.sort();
    plans
}

#[test]
fn every_example_plan_is_valid() {
    let mut plans = plans_in(&examples());
    plans.extend(plans_in(&examples().join("game-day")));
    assert!(plans.len() >= 10 + 5, "{plans:?}");
    for plan in &plans {
        let out = validate(plan, &[]);
        assert!(
            out.status.success(),
            "{}: {}{}",
            plan.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_ten_seed_experiments_have_plans_with_probes_and_a_measurable_hypothesis() {
    let dir = examples().join("game-day");
    for seed in SEEDS {
        let path = dir.join(seed);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.contains("include: probes/trading.yaml"), "{seed}");
        assert!(text.contains("tolerances:"), "{seed}");
        assert!(text.contains("stop_conditions:"), "{seed}");
    }
    let cascade = std::fs::read_to_string(dir.join(SEEDS[9])).unwrap();
    assert!(cascade.contains("when:"), "the cascade waits on a probe");
}

#[test]
fn variables_are_overridden_and_checked_where_they_are_used() {
    let plan = examples().join("game-day").join(SEEDS[0]);
    let out = validate(&plan, &["--var", "DB_AGENT=agent-7"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("on agent-7"), "{stdout}");

    let out = validate(&plan, &["--var", "DOWN_FOR=forever"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // The error points at the fault's duration, where the variable is used.
    assert!(stderr.contains("duration"), "{stderr}");
    assert!(stderr.contains("forever"), "{stderr}");

    let out = validate(&plan, &["--var", "NO_SUCH_VAR=1"]);
    assert_eq!(out.status.code(), Some(2));
}
