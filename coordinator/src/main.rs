//! `faultline-coordinator`: wires configuration, logging and the server together.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use faultline_coordinator::{CoordinatorConfig, serve};

/// Faultline coordinator: plans, runs, safety interlocks; signed commands to agents over mTLS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (mTLS gRPC for agents and operators). Port 0 picks a free port.
    #[arg(long, env = "FAULTLINE_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Directory made by `faultline certs init` (ca.pem, coordinator.pem/.key,
    /// command-signing.key).
    #[arg(long, env = "FAULTLINE_CERTS")]
    certs: PathBuf,
    /// SQLite database file (created and migrated on start), or a `postgres://` URL: replicas
    /// sharing one PostgreSQL elect one active coordinator (the others wait as standby
    /// without listening; see deploy/README.md, "High availability").
    #[arg(long, env = "FAULTLINE_DB", default_value = "faultline.db")]
    db: PathBuf,
    /// Safety policy YAML applied to every run on top of the plan's own: `blast_radius`
    /// (max_targets, max_agents, max_fleet_percent) and `protected` (selectors no plan may
    /// target). The stricter limit wins. Read once at start; an invalid file stops the start.
    #[arg(long, env = "FAULTLINE_POLICY")]
    policy: Option<PathBuf>,
    /// Listener for Prometheus (`GET /metrics`); `off` disables it, port 0 picks a free port
    /// (logged as `metrics listening on http(s)://ADDR/metrics`). Keep it on loopback or a
    /// trusted network: it has no authentication.
    #[arg(
        long,
        env = "FAULTLINE_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    metrics_listen: String,
    /// Serve /metrics over HTTPS with the coordinator's certificate (coordinator.pem/.key
    /// of --certs); scrapers verify it with the fleet CA (ca.pem) and one of its host names.
    #[arg(long, env = "FAULTLINE_METRICS_TLS")]
    metrics_tls: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tracing_guard = faultline_coordinator::observability::init_tracing(
        "faultline-coordinator",
        "info,h2=warn,tower=warn,hyper=warn",
    );
    let args = Args::parse();
    faultline_coordinator::metrics::preset();
    let certs = faultline_tls::layout::CertDir::new(&args.certs);
    faultline_observability::start_metrics(
        &faultline_coordinator::metrics::REGISTRY,
        &args.metrics_listen,
        args.metrics_tls,
        &certs.coordinator_cert(),
        &certs.coordinator_key(),
    )
    .await;
    let config = CoordinatorConfig {
        listen: args.listen,
        certs: args.certs,
        db: args.db,
        policy: args.policy,
    };
    let served = serve(
        config,
        |addr| println!("faultline-coordinator listening on {addr}"),
        shutdown_signal(),
    )
    .await
    .context("coordinator failed");
    tracing_guard.shutdown();
    served
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down; agents' leases revert any fault still applied");
}
