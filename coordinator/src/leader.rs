//! Leader election between coordinator replicas sharing one PostgreSQL store.
//!
//! The active coordinator is the one holding the session-level advisory lock [`LOCK_KEY`] on
//! a connection of its own (not the store's, whose statements could otherwise queue behind a
//! long poll). A standby polls `pg_try_advisory_lock` every [`POLL_INTERVAL`] and does not
//! listen at all until it wins: agents and operators configured with every replica's address
//! simply find the one that answers.
//!
//! PostgreSQL releases the lock when the holder's session ends — its process died, or its
//! connection broke. The holder must then stop at once, since another replica may already be
//! active: [`Leadership::lost`] resolves when the lock session closes or stops answering
//! health checks, and the coordinator exits non-zero (fail-stop) rather than risk two
//! actives. Faults it had applied are reverted by the agents' leases; the new active aborts
//! its runs at start-up (runs are not resumed across a failover).

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::store::{self, StoreError};

/// Advisory lock key of "the active coordinator" ("faultlin" in ASCII).
pub const LOCK_KEY: i64 = 0x6661_756c_746c_696e;

/// How often a standby tries to take the lock.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often the active coordinator checks that its lock session still answers.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// How long a health check may take before the session counts as lost.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Election failures.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election: {0}")]
    Store(#[from] StoreError),
    #[error("leader election: {operation} on {target}: {source}")]
    Query {
        operation: &'static str,
        target: String,
        source: tokio_postgres::Error,
    },
}

/// The advisory lock, held: dropping it closes the session and releases the lock.
#[derive(Debug)]
pub struct Leadership {
    client: Client,
    closed: watch::Receiver<bool>,
    target: String,
}

/// What a standby reports while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The lock is held by another replica: this one is standby.
    Standby,
}

/// Blocks until this replica holds the lock, polling every [`POLL_INTERVAL`]. `on_standby`
/// is called once, the first time the lock turns out to be held elsewhere. A session that
/// breaks while waiting is reconnected (a standby holds nothing, so it can simply retry);
/// only a PostgreSQL that was never reachable ends the wait with an error.
pub async fn acquire(
    url: &str,
    mut on_standby: impl FnMut(Waiting),
) -> Result<Leadership, LeaderError> {
    let target = store::describe_postgres_url(url);
    let mut reported = false;
    let mut connected_once = false;
    let mut failures = 0u32;
    loop {
        let (client, closed) = match store::pg_connect(url).await {
            Ok(session) => session,
            Err(err) => {
                failures += 1;
                // Never reachable: most likely a wrong URL; stop rather than wait forever.
                if !connected_once && failures >= 10 {
                    return Err(err.into());
                }
                tracing::warn!(%err, "leader election: cannot connect; retrying");
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
        };
        connected_once = true;
        loop {
            let won = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
                .await
                .and_then(|row| row.try_get::<_, bool>(0));
            match won {
                Ok(true) => {
                    return Ok(Leadership {
                        client,
                        closed,
                        target,
                    });
                }
                Ok(false) => {
                    if !reported {
                        reported = true;
                        on_standby(Waiting::Standby);
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                Err(source) => {
                    let err = LeaderError::Query {
                        operation: "pg_try_advisory_lock",
                        target: target.clone(),
                        source,
                    };
                    tracing::warn!(%err, "leader election session failed; reconnecting");
                    tokio::time::sleep(POLL_INTERVAL).await;
                    break;
                }
            }
        }
    }
}

impl Leadership {
    /// Resolves (with the reason) when leadership can no longer be vouched for: the lock
    /// session closed, or a health check failed or took longer than [`HEALTH_TIMEOUT`].
    pub async fn lost(&self) -> String {
        let mut closed = self.closed.clone();
        let closed = async move {
            let _ = closed.wait_for(|closed| *closed).await;
            format!("the leader-lock session to {} closed", self.target)
        };
        let health = async {
            loop {
                tokio::time::sleep(HEALTH_INTERVAL).await;
                // Ask PostgreSQL whether this session still holds the lock, not just whether
                // it answers: the lock is the only thing that makes this replica active.
                let check = self.client.query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
                     AND ((classid::bigint << 32) | objid::bigint) = $1",
                    &[&LOCK_KEY],
                );
                match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
                    Ok(Ok(row)) => match row.try_get::<_, i64>(0) {
                        Ok(held) if held > 0 => continue,
                        Ok(_) => return "the leader lock is no longer held".to_string(),
                        Err(err) => return format!("leader-lock check failed: {err}"),
                    },
                    Ok(Err(err)) => return format!("leader-lock check failed: {err}"),
                    Err(_) => {
                        return format!(
                            "leader-lock check got no answer within {HEALTH_TIMEOUT:?}"
                        );
                    }
                }
            }
        };
        tokio::select! {
            reason = closed => reason,
            reason = health => reason,
        }
    }
}
