//! Faultline coordinator: holds experiment plans, runs and safety interlocks (halt-all,
//! leases), and sends signed fault commands to host agents over mTLS gRPC.
//!
//! Layout: [`agent_link`] and [`operator`] are thin gRPC edges; [`hub`] is the one actor that
//! owns live state; [`runner`] drives a run; [`store`] is the embedded SQLite database;
//! [`telemetry`] subscribes agents to a run's kernel telemetry and stores what they stream.

pub mod agent_link;
pub mod audit;
pub mod clock;
pub mod halt;
pub mod hub;
pub mod load;
pub mod metrics;
pub mod metrics_registry;
pub mod observability;
pub mod operator;
pub mod probe;
pub mod runner;
pub mod steady;
pub mod store;
pub mod telemetry;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use faultline_domain::plan::{Policy, parse_policy, render_errors};
use faultline_proto::v1 as pb;
use faultline_tls::layout::CertDir;

use crate::audit::Auditor;
use crate::hub::HubHandle;
use crate::runner::RunEvents;
use crate::store::Store;

/// Where and how the coordinator serves.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub certs: PathBuf,
    pub db: PathBuf,
    /// Safety policy file (`blast_radius`, `protected`) applied to every run on top of the
    /// plan's own settings; `None` for none.
    pub policy: Option<PathBuf>,
}

/// Start-up and serving failures.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("loading TLS material from {dir}: {source}")]
    Tls {
        dir: PathBuf,
        source: faultline_tls::TlsError,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reading policy {path}: {source}")]
    PolicyRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every problem of the policy file, one per line, located.
    #[error("invalid policy:\n{0}")]
    PolicyInvalid(String),
}

/// Reads and validates a policy file (the same `blast_radius` and `protected` keys as a plan).
pub fn load_policy(path: &Path) -> Result<Policy, CoordinatorError> {
    let text = std::fs::read_to_string(path).map_err(|source| CoordinatorError::PolicyRead {
        path: path.to_path_buf(),
        source,
    })?;
    parse_policy(&text).map_err(|errors| {
        let rendered = render_errors(&path.display().to_string(), &errors);
        CoordinatorError::PolicyInvalid(rendered.trim_end().to_string())
    })
}

const REASON_RESTART: &str = "coordinator restarted while the run was in progress; \
    the agents' leases reverted its faults";

/// Opens the store, recovers from a previous crash, binds, and serves until `shutdown`
/// completes. `on_listening` receives the bound address (useful with port 0).
pub async fn serve(
    config: CoordinatorConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    // A bad policy must stop the start before anything listens: running without the
    // protection the operator asked for would be worse than not running.
    let policy = match &config.policy {
        Some(path) => load_policy(path)?,
        None => Policy::default(),
    };
    let store = Store::open(&config.db)?;
    let auditor = Auditor::new(store.clone());
    let aborted = store
        .abort_unfinished_runs(REASON_RESTART, clock::now_ms())
        .await?;
    for run_id in &aborted {
        tracing::warn!(run = %run_id, "run aborted: {REASON_RESTART}");
        auditor
            .ok(
                "coordinator",
                "run-aborted",
                &format!("run {run_id}: {REASON_RESTART}"),
            )
            .await;
    }

    let certs = CertDir::new(&config.certs);
    let tls_err = |source| CoordinatorError::Tls {
        dir: config.certs.clone(),
        source,
    };
    let signing_key =
        faultline_tls::layout::load_signing_key(&certs.signing_key()).map_err(tls_err)?;
    let tls = faultline_tls::server::server_config(&certs).map_err(tls_err)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let policy_note = match &config.policy {
        Some(path) => format!("policy {}: {policy}", path.display()),
        None => "no policy file".to_string(),
    };
    tracing::info!("safety {policy_note}");
    auditor
        .ok(
            "coordinator",
            "start",
            &format!("listening on {bound}; {policy_note}"),
        )
        .await;

    let hub = HubHandle::spawn(signing_key, store.clone());
    let events = RunEvents::new(store.clone());
    let tls_auditor = auditor.clone();
    let incoming = faultline_tls::server::incoming(listener, tls, move |peer, reason| {
        tls_auditor.spawn_refused(format!("tls {peer}"), "tls-handshake", reason);
    });
    let agent_link = agent_link::AgentLinkService {
        hub: hub.clone(),
        auditor: auditor.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let telemetry = telemetry::TelemetryService {
        auditor: auditor.clone(),
    };
    let operator = operator::OperatorService {
        hub,
        auditor,
        events,
        policy: Arc::new(policy),
    };
    on_listening(bound);
    tonic::transport::Server::builder()
        // Keepalives notice a silently dead agent connection (partition, host loss).
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(pb::agent_link_server::AgentLinkServer::new(agent_link))
        .add_service(pb::operator_server::OperatorServer::new(operator))
        .add_service(pb::agent_telemetry_server::AgentTelemetryServer::new(
            telemetry,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_files_load_or_fail_with_located_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("policy.yaml");
        std::fs::write(
            &good,
            "blast_radius:\n  max_agents: 2\nprotected:\n  - { agent: agent-1 }\n",
        )
        .unwrap();
        let policy = load_policy(&good).unwrap();
        assert_eq!(policy.blast_radius.max_agents, Some(2));
        assert_eq!(policy.protected.len(), 1);

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "protected:\n  - { agent: 'no spaces' }\n").unwrap();
        let err = load_policy(&bad).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{}:2:14: protected[0].agent: invalid agent name",
                bad.display()
            )),
            "{err}"
        );

        let missing = dir.path().join("missing.yaml");
        let err = load_policy(&missing).unwrap_err().to_string();
        assert!(err.starts_with("reading policy "), "{err}");
    }
}
