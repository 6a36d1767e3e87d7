//! `faultline demo` end to end: the real CLI binary starts a real coordinator and three agents,
//! real Docker containers, runs the cascade plan, reports, and cleans up after itself.
//!
//! This is its own test binary, so it never runs at the same time as the cluster tests (cargo
//! runs test binaries one after another), and needs no lock of theirs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::bin;
use faultline_integration_tests::docker::docker;
use faultline_lab::local::processes_using;

/// The demo takes about 10s (the plan is 8s long); allow for a first image build.
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

const TARGETS: [&str; 3] = [
    "faultline-demo-db",
    "faultline-demo-cache",
    "faultline-demo-api",
];

/// The findings block of one target: from its `[n/3] TARGET:` line to the next block.
fn finding_block<'a>(findings: &'a str, target: &str) -> &'a str {
    let header = format!("] {target}: ");
    let Some(start) = findings.find(&header) else {
        return "";
    };
    let rest = &findings[start..];
    let end = rest[1..].find("\n  [").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

#[test]
fn the_demo_runs_a_three_host_game_day_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("demo-work");
    let out_path = dir.path().join("stdout.txt");
    let err_path = dir.path().join("stderr.txt");
    let faultline = bin("faultline");
    assert!(
        faultline.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        faultline.display()
    );

    let started = Instant::now();
    let mut child = Command::new(&faultline)
        .arg("demo")
        .arg("--dir")
        .arg(&work)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEMO_TIMEOUT {
            // SIGINT makes the demo tear down before it exits.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = child.wait();
            panic!(
                "faultline demo did not finish within {DEMO_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    let shown = format!(
        "stdout:\n{stdout}\nstderr:\n{stderr}\n(if `demo` is an unknown subcommand, {} is \
         stale: run `cargo build --workspace --bins`)",
        faultline.display()
    );
    assert!(
        status.success(),
        "faultline demo failed ({status})\n{shown}"
    );
    eprintln!("faultline demo took {:?}", started.elapsed());

    // Progress of the real cluster: three agents, each a separate process.
    for agent in ["agent-1", "agent-2", "agent-3"] {
        assert!(
            stdout.contains(&format!("  {agent:<12} pid ")),
            "{agent} not started\n{shown}"
        );
    }
    assert!(stdout.contains("all 3 agents connected"), "{shown}");
    assert!(stdout.contains("run-finished"), "no live events\n{shown}");

    // Findings for all three faults, each verified and reverted.
    let findings = stdout
        .split_once("Findings")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    assert!(findings.contains("final state  completed"), "{shown}");
    for (target, agent) in TARGETS.iter().zip(["agent-2", "agent-1", "agent-3"]) {
        let block = finding_block(findings, target);
        assert!(
            block.contains(&format!("via {agent}")),
            "{target}: {block}\n{shown}"
        );
        assert!(
            block.contains("verified    yes"),
            "{target}: {block}\n{shown}"
        );
        assert!(block.contains("verified:"), "{target}: {block}\n{shown}");
        assert!(
            block.contains("reason: schedule"),
            "{target}: {block}\n{shown}"
        );
        assert!(block.contains("in force"), "{target}: {block}\n{shown}");
    }
    assert!(
        findings.contains("3 of 3 faults applied, verified and reverted"),
        "{shown}"
    );
    assert!(findings.contains("all targets restored"), "{shown}");

    // The teardown left nothing behind: no demo container, no process of this demo.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let left = rt
        .block_on(docker(&[
            "ps",
            "--all",
            "--quiet",
            "--filter",
            "label=faultline.demo=1",
        ]))
        .unwrap();
    assert!(left.is_empty(), "demo containers left: {left}\n{shown}");
    let processes = processes_using(&work);
    assert!(
        processes.is_empty(),
        "processes left: {processes:?}\n{shown}"
    );

    // What it recorded stays in the work directory.
    for path in [
        "coordinator.db",
        "certs/ca.pem",
        "logs/coordinator.log",
        "logs/agent-1.log",
        "state/agent-3",
    ] {
        assert!(
            Path::new(&work).join(path).exists(),
            "{path} missing\n{shown}"
        );
    }
}
