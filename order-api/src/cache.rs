//! The Redis read-through cache of the recent-orders list. Every command is bounded by
//! [`OP_TIMEOUT`]: the cache is an optimisation, so a slow or absent Redis must cost a request
//! at most that much before it falls back to the database.

use std::time::Duration;

use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Budget of one Redis command, reconnection included.
pub const OP_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a cached list lives: new orders also delete it, so this only bounds how stale it
/// can be when a delete was lost (Redis unreachable at that moment).
pub const RECENT_TTL: Duration = Duration::from_secs(2);
/// The key of the cached `GET /orders` body. Versioned so that a change of the body's shape
/// never serves the old shape from a Redis that outlived the deploy.
pub const RECENT_KEY: &str = "faultline:orders:recent:v1";

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
    #[error("Redis {what} timed out after {OP_TIMEOUT:?}")]
    Timeout { what: &'static str },
    #[error("Redis {what} failed: {source}")]
    Command {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
}

/// The cache client. Cloning shares the connection.
#[derive(Clone)]
pub struct Cache {
    connection: ConnectionManager,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl Cache {
    /// Parses the URL; connects lazily, on the first command, so the service starts without
    /// Redis. The manager reconnects by itself after Redis restarts.
    pub fn new(url: &str) -> Result<Cache, CacheError> {
        let client = redis::Client::open(url).map_err(CacheError::Url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            // Few, quick retries: a request never waits for more than OP_TIMEOUT anyway, and
            // the next command after a failure starts a fresh reconnection.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(CacheError::Url)?;
        Ok(Cache { connection })
    }

    /// `PING` (the health check).
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        bounded(
            "ping",
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await
        .map(drop)
    }

    /// The cached recent-orders body, if any.
    pub async fn get_recent(&self) -> Result<Option<Vec<u8>>, CacheError> {
        let mut connection = self.connection.clone();
        bounded("get", connection.get::<_, Option<Vec<u8>>>(RECENT_KEY)).await
    }

    /// Caches the recent-orders body for [`RECENT_TTL`].
    pub async fn set_recent(&self, body: &[u8]) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        let ttl_ms = u64::try_from(RECENT_TTL.as_millis()).unwrap_or(u64::MAX);
        bounded(
            "set",
            connection.pset_ex::<_, _, ()>(RECENT_KEY, body, ttl_ms),
        )
        .await
    }

    /// Drops the cached list (after an insert).
    pub async fn invalidate_recent(&self) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        bounded("delete", connection.del::<_, ()>(RECENT_KEY)).await
    }
}

async fn bounded<T>(
    what: &'static str,
    command: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, CacheError> {
    match tokio::time::timeout(OP_TIMEOUT, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(CacheError::Command { what, source }),
        Err(_) => Err(CacheError::Timeout { what }),
    }
}
