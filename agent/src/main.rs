//! `faultline-agent`: wires configuration, logging and signals to the agent library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use faultline_agent::{AgentConfig, run};

/// Faultline host agent: executes signed fault commands and always reverts them.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Coordinator URL, e.g. https://127.0.0.1:7443. Several (comma-separated and/or the flag
    /// repeated) for replicas of a highly available coordinator: they are tried in turn and
    /// the agent sticks to the one that answers (only the active replica listens).
    #[arg(
        long,
        env = "FAULTLINE_COORDINATOR",
        value_delimiter = ',',
        required = true,
        num_args = 1
    )]
    coordinator: Vec<String>,
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
    /// Listener for Prometheus (`GET /metrics`); `off` disables it, port 0 picks a free port
    /// (logged as `metrics listening on http(s)://ADDR/metrics`). No authentication: keep it
    /// on loopback or a trusted network.
    #[arg(
        long,
        env = "FAULTLINE_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    metrics_listen: String,
    /// Serve /metrics over HTTPS with this agent's certificate (agent-NAME.pem/.key of
    /// --certs), which must allow server use (serverAuth); `faultline certs` issues agent
    /// certificates for client use only, so the listener then stays off (logged).
    #[arg(long, env = "FAULTLINE_METRICS_TLS")]
    metrics_tls: bool,
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
    let certs = faultline_tls::layout::CertDir::new(&args.certs);
    faultline_observability::start_metrics(
        &faultline_agent::metrics::REGISTRY,
        &args.metrics_listen,
        args.metrics_tls,
        &certs.agent_cert(&args.name),
        &certs.agent_key(&args.name),
    )
    .await;
    let config = AgentConfig {
        coordinators: args
            .coordinator
            .into_iter()
            .map(|url| url.trim().to_string())
            .filter(|url| !url.is_empty())
            .collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn coordinators(args: &[&str]) -> Vec<String> {
        let mut argv = vec!["faultline-agent", "--name", "a", "--certs", "c"];
        argv.extend_from_slice(args);
        match Args::try_parse_from(argv) {
            Ok(args) => args.coordinator,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn several_coordinators_comma_separated_and_repeated() {
        assert_eq!(
            coordinators(&["--coordinator", "https://a:1"]),
            ["https://a:1"]
        );
        assert_eq!(
            coordinators(&["--coordinator", "https://a:1,https://b:2"]),
            ["https://a:1", "https://b:2"]
        );
        assert_eq!(
            coordinators(&[
                "--coordinator",
                "https://a:1",
                "--coordinator",
                "https://b:2,https://c:3"
            ]),
            ["https://a:1", "https://b:2", "https://c:3"]
        );
    }
}
