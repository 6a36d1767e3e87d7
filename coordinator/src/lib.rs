//! Faultline coordinator: holds experiment plans, runs and safety interlocks (halt-all,
//! leases), and sends signed fault commands to host agents over mTLS gRPC.
//!
//! Layout: [`agent_link`] and [`operator`] are thin gRPC edges; [`hub`] is the one actor that
//! owns live state; [`runner`] drives a run; [`store`] is the embedded SQLite database (or a
//! shared PostgreSQL one); [`leader`] elects the active replica among coordinators sharing
//! PostgreSQL; [`telemetry`] subscribes agents to a run's kernel telemetry and stores what
//! they stream.

pub mod agent_link;
pub mod audit;
pub mod clock;
pub mod halt;
pub mod hub;
pub mod leader;
pub mod load;
pub mod metrics;
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
    /// A SQLite file, or a `postgres://` URL (shared by replicas: high availability).
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
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// Fail-stop: another replica may be active already, so this one must not serve on.
    #[error("stopped serving: {0}; another coordinator replica may take over")]
    LeadershipLost(String),
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

/// Why runs of a lost active coordinator end, recorded by the replica taking over (runs are
/// aborted, not resumed: their faults are gone by the time it is active).
pub const REASON_FAILOVER: &str =
    "the active coordinator was lost mid-run; agents' leases reverted its faults";

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
    // Certificates are checked before any election: a standby with broken TLS material
    // must fail now, not when it is needed.
    let certs = CertDir::new(&config.certs);
    let tls_err = |source| CoordinatorError::Tls {
        dir: config.certs.clone(),
        source,
    };
    let signing_key =
        faultline_tls::layout::load_signing_key(&certs.signing_key()).map_err(tls_err)?;
    let tls = faultline_tls::server::server_config(&certs).map_err(tls_err)?;
    // With a PostgreSQL store, replicas elect the active one before anything stateful: a
    // standby neither touches the store nor listens, so agents only ever find the active
    // replica.
    let leadership = match config.db.to_str() {
        Some(url) if store::is_postgres_url(url) => {
            let mut standby_since = None;
            let leadership = leader::acquire(url, |_| {
                standby_since = Some(clock::now_ms());
                tracing::info!(
                    "standby: another coordinator replica is active; polling the leader lock \
                     every {:?}",
                    leader::POLL_INTERVAL
                );
            })
            .await?;
            tracing::info!("became active: holding the leader lock");
            Some((leadership, standby_since))
        }
        _ => None,
    };
    let store = Store::open_db(&config.db).await?;
    let auditor = Auditor::new(store.clone());
    if let Some((_, standby_since)) = &leadership {
        let detail = match standby_since {
            Some(since) => format!("became active (standby since {since} ms)"),
            None => "became active (no other replica held the leader lock)".to_string(),
        };
        auditor.ok("coordinator", "became-active", &detail).await;
    }
    let reason = if leadership.is_some() {
        REASON_FAILOVER
    } else {
        REASON_RESTART
    };
    let aborted = store.abort_unfinished_runs(reason, clock::now_ms()).await?;
    for run_id in &aborted {
        tracing::warn!(run = %run_id, "run aborted: {reason}");
        auditor
            .ok(
                "coordinator",
                "run-aborted",
                &format!("run {run_id}: {reason}"),
            )
            .await;
    }

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
    tokio::spawn(runner::record_late_reverts(
        hub.clone(),
        store.clone(),
        events.clone(),
    ));
    let tls_auditor = auditor.clone();
    let incoming = faultline_tls::server::incoming(listener, tls, move |peer, reason| {
        tls_auditor.spawn_refused(format!("tls {peer}"), "tls-handshake", reason);
    });
    let agent_link = agent_link::AgentLinkService {
        hub: hub.clone(),
        auditor: auditor.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let live_telemetry = telemetry::LiveTelemetry::default();
    let telemetry = telemetry::TelemetryService {
        auditor: auditor.clone(),
        live: live_telemetry.clone(),
    };
    let operator = operator::OperatorService {
        hub,
        auditor,
        events,
        policy: Arc::new(policy),
        live_telemetry,
    };
    on_listening(bound);
    let server = tonic::transport::Server::builder()
        // Keepalives notice a silently dead agent connection (partition, host loss).
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(pb::agent_link_server::AgentLinkServer::new(agent_link))
        .add_service(pb::operator_server::OperatorServer::new(operator))
        .add_service(pb::agent_telemetry_server::AgentTelemetryServer::new(
            metrics::CountedTelemetry(telemetry),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown);
    let Some((leadership, _)) = leadership else {
        server.await?;
        return Ok(());
    };
    // Fail-stop: the moment the leader lock (or the store) is gone another replica may be
    // active, so stop serving at once instead of draining connections. Returning drops the
    // server; the binary exits non-zero and the agents' leases revert what was applied.
    tokio::select! {
        served = server => {
            served?;
            Ok(())
        }
        reason = leadership.lost() => {
            tracing::error!("leader lock lost: {reason}; stopping");
            Err(CoordinatorError::LeadershipLost(reason))
        }
        () = store.lost() => {
            let reason = "the PostgreSQL store connection closed".to_string();
            tracing::error!("{reason}; stopping");
            Err(CoordinatorError::LeadershipLost(reason))
        }
    }
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
