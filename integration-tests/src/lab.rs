//! Fixtures of the container-lab tests (`lab_fleet.rs`, `lab_demo.rs`): the `faultline lab`
//! CLI, what `lab up` exported, what the lab left behind, and a guard that takes it down.

use std::process::Output;
use std::time::Duration;

use crate::cluster::bin;
use crate::docker::docker;

/// The label of everything the lab makes.
const LAB_FILTER: &str = "label=faultline.lab=1";

/// Runs `faultline ARGS` (no coordinator needed for `lab`), bounded by 15 minutes.
pub async fn faultline(args: &[&str]) -> anyhow::Result<Output> {
    let output = tokio::process::Command::new(bin("faultline"))
        .args(args)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), output)
        .await
        .map_err(|_| anyhow::anyhow!("faultline {args:?} did not finish in 15 minutes"))??;
    Ok(output)
}

/// stdout then stderr, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Everything labelled as the lab's, of every kind, one name per line; empty when none.
pub async fn leftovers() -> anyhow::Result<String> {
    let mut found = String::new();
    for args in [
        &[
            "ps",
            "--all",
            "--filter",
            LAB_FILTER,
            "--format",
            "{{.Names}}",
        ][..],
        &[
            "network",
            "ls",
            "--filter",
            LAB_FILTER,
            "--format",
            "{{.Name}}",
        ],
        &[
            "image",
            "ls",
            "--filter",
            LAB_FILTER,
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ],
    ] {
        found.push_str(&docker(args).await?);
    }
    Ok(found.trim().to_string())
}

/// `export NAME=VALUE` from `lab up`'s output.
pub fn exported<'a>(output: &'a str, name: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|line| line.strip_prefix(&format!("export {name}=")))
        .map(str::trim)
}

/// Takes the lab down when dropped, even when a test fails half-way.
#[derive(Debug)]
pub struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = std::process::Command::new(bin("faultline"))
            .args(["lab", "down"])
            .output();
    }
}

/// Runs `faultline lab down`, checks that its summary contains `removed` (e.g. `"removed 3
/// container(s), 1 network(s), "`) and that nothing labelled as the lab's is left. Panics
/// otherwise: it is an assertion of the tests.
#[allow(clippy::expect_used)]
pub async fn down_leaves_nothing(removed: &str) {
    let out = faultline(&["lab", "down"])
        .await
        .expect("running faultline lab down");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(removed), "{}", text(&out));
    assert_eq!(
        leftovers().await.expect("listing lab leftovers"),
        "",
        "lab down leaves nothing labelled"
    );
}
