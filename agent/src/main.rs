//! `faultline-agent`: wires configuration, logging and signals to the agent library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use faultline_agent::{AgentConfig, run};

/// Faultline host agent: executes signed fault commands and always reverts them.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Coordinator URL, e.g. https://127.0.0.1:7443.
    #[arg(long, env = "FAULTLINE_COORDINATOR")]
    coordinator: String,
    /// This agent's name; must match its certificate (agent-NAME.pem).
    #[arg(long, env = "FAULTLINE_AGENT_NAME")]
    name: String,
    /// Directory holding ca.pem, agent-NAME.pem/.key and command-signing.pub.
    #[arg(long, env = "FAULTLINE_CERTS")]
    certs: PathBuf,
    /// Where the journal and nonce ledger live; must survive restarts.
    #[arg(
        long,
        env = "FAULTLINE_STATE_DIR",
        default_value = "/var/lib/faultline-agent"
    )]
    state_dir: PathBuf,
    /// Plain-HTTP listener for Prometheus (`GET /metrics`); `off` disables it, port 0 picks a
    /// free port (logged as `metrics listening on http://ADDR/metrics`). No authentication:
    /// keep it on loopback or a trusted network.
    #[arg(
        long,
        env = "FAULTLINE_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    metrics_listen: String,
}

fn main() -> std::process::ExitCode {
    // Stressors are this binary re-executed inside the target's cgroup: dispatch before
    // anything else (no runtime, no logging setup, no argument parsing).
    let args: Vec<String> = std::env::args().collect();
    if faultline_agent::stress::is_stress_invocation(&args) {
        return faultline_agent::stress::stress_main(&args);
    }
    match agent_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn agent_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing_guard = faultline_agent::observability::init_tracing(
        "faultline-agent",
        "info,h2=warn,tower=warn,hyper=warn",
        &args.name,
    );
    faultline_agent::metrics::preset();
    faultline_agent::metrics::start(&faultline_agent::metrics::REGISTRY, &args.metrics_listen)
        .await;
    let config = AgentConfig {
        coordinator: args.coordinator,
        name: args.name,
        certs: args.certs,
        state_dir: args.state_dir,
    };
    let ran = run(config, shutdown_signal()).await.context("agent failed");
    tracing_guard.shutdown();
    ran
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
