//! Faultline host agent: dials out to the coordinator over mTLS, verifies signed fault
//! commands, applies faults on this host and always reverts them — on schedule, on command,
//! when the coordinator's lease runs out, on shutdown, and from its journal after a crash.
//!
//! Layout: [`link`] is the network edge; [`verify`] turns signed bytes into commands or
//! refusals; [`engine`] is the one actor owning faults in force; [`journal`] and [`ledger`]
//! are its durable memory; [`runtime`] is the seam to the container engine; [`probe`] runs the
//! coordinator's `command` steady-state probes, beside the engine; [`telemetry`] streams kernel
//! evidence (eBPF, else `/proc` and cgroup figures) about a run's targets while it lasts.

pub mod cgroup;
pub mod clock;
pub mod engine;
pub mod faults;
pub mod host;
pub mod journal;
pub mod ledger;
pub mod link;
pub mod metrics;
pub mod net;
pub mod observability;
pub mod preflight;
pub mod probe;
pub mod process;
pub mod runtime;
pub mod stress;
pub mod sys;
pub mod telemetry;
pub mod verification;
pub mod verify;
pub mod wire;

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use faultline_tls::identity::Role;
use faultline_tls::layout::CertDir;
use tokio::sync::{mpsc, watch};

use crate::engine::EngineHandle;
use crate::faults::Backends;
use crate::journal::Journal;
use crate::ledger::DurableLedger;
use crate::link::{CoordinatorAddress, Link, Registration};
use crate::preflight::HostCaps;
use crate::runtime::docker::DockerRuntime;
use crate::sys::command::HostRunner;
use crate::verify::Verifier;

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator URLs, tried in turn (replicas of a highly available coordinator: only the
    /// active one listens). Must not be empty.
    pub coordinators: Vec<String>,
    pub name: String,
    pub certs: PathBuf,
    pub state_dir: PathBuf,
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("creating state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("loading TLS material from {dir}: {source}")]
    Tls {
        dir: PathBuf,
        source: faultline_tls::TlsError,
    },
    #[error("no coordinator address configured (--coordinator)")]
    NoCoordinator,
}

/// Runs the agent until `shutdown` resolves, then reverts every fault in force.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(|source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
    let journal = Journal::open(&config.state_dir)?;
    let ledger = DurableLedger::open(&config.state_dir, clock::now_ms())?;
    let certs = CertDir::new(&config.certs);
    let tls_err = |source| AgentError::Tls {
        dir: config.certs.clone(),
        source,
    };
    let key = faultline_tls::layout::load_verifying_key(&certs.verifying_key()).map_err(tls_err)?;
    let mut coordinators = Vec::with_capacity(config.coordinators.len());
    for url in &config.coordinators {
        let channel = faultline_tls::client::channel(url, &certs, Role::Agent, &config.name)
            .map_err(tls_err)?;
        coordinators.push(CoordinatorAddress {
            url: url.clone(),
            channel,
        });
    }
    let mut coordinators = coordinators.into_iter();
    let first = coordinators.next().ok_or(AgentError::NoCoordinator)?;
    let more: Vec<_> = coordinators.collect();
    let mut protect = Vec::new();
    for url in &config.coordinators {
        protect.extend(coordinator_addresses(url).await);
    }

    let runtime = Arc::new(connect_docker().await);
    let commands = Arc::new(HostRunner);
    let caps = Arc::new(HostCaps::probe(&*runtime, &*commands).await);
    let (reports_tx, reports_rx) = mpsc::channel(1024);
    let backends = Backends {
        runtime: Arc::clone(&runtime),
        commands,
        caps: Arc::clone(&caps),
        agent: config.name.clone(),
        protect,
        agent_exe: std::env::current_exe().unwrap_or_else(|_| "faultline-agent".into()),
    };
    // The engine starts first: it reverts journaled faults even while the coordinator is away.
    let engine = EngineHandle::spawn(backends, journal, reports_tx);
    // The telemetry uplink streams to whichever coordinator address the link is using.
    let (active_tx, active_rx) = watch::channel(first.channel.clone());
    let telemetry = telemetry::start_for_agent(Arc::clone(&runtime), active_rx).await;
    let mut capabilities = caps.capabilities();
    if let Some(telemetry) = &telemetry {
        capabilities.extend(preflight::telemetry_capabilities(
            &telemetry.load_report().sources,
        ));
    }
    let registration = Registration {
        name: config.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        host: host::facts(),
        capabilities,
    };
    let verifier = Verifier::new(key, config.name.clone(), ledger);
    let mut link = Link::new(
        first,
        more,
        registration,
        verifier,
        engine.clone(),
        reports_rx,
    )
    .publishing_active(active_tx);
    if let Some(telemetry) = telemetry {
        link = link.with_telemetry(telemetry);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let link_task = tokio::spawn(link.run(stop_rx));

    shutdown.await;
    tracing::info!("shutting down: reverting every fault in force");
    engine.shutdown().await;
    // Give the link a moment to deliver the revert reports before closing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), link_task).await;
    Ok(())
}

/// The socket addresses of the coordinator, which network faults must never cut.
async fn coordinator_addresses(url: &str) -> Vec<std::net::SocketAddr> {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    match tokio::net::lookup_host(with_port.as_str()).await {
        Ok(addrs) => addrs.collect(),
        Err(err) => {
            tracing::warn!(%err, coordinator = %url, "cannot resolve the coordinator address; \
                network faults in this host's own namespace will be refused");
            Vec::new()
        }
    }
}

/// Connects to the Docker Engine, retrying until it answers: faults (and reverts of journaled
/// ones) need it, and an agent that cannot reach it must say so rather than exit.
async fn connect_docker() -> DockerRuntime {
    let mut wait = Duration::from_millis(500);
    loop {
        match DockerRuntime::connect().await {
            Ok(runtime) => return runtime,
            Err(err) => {
                tracing::error!(%err, retry_in = ?wait, "docker engine unreachable");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}
