//! PostgreSQL access: a small connection pool whose every operation is bounded by a deadline,
//! so a stopped or partitioned database turns into a prompt error instead of a hung request.
//!
//! Connections are made lazily (the service starts before the database does) and replaced on
//! their own: a closed connection fails the pool's recycle check, and a connection whose
//! query timed out is thrown away, since its reply may still be in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout_at};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use crate::order::{NewOrder, Order};

/// Budget of one database operation, connection included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Budget of the health check's `SELECT 1`.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How many orders `GET /orders` returns.
pub const RECENT_LIMIT: i64 = 20;
/// Connections kept open at most (the lab's load is a few requests per second).
const POOL_SIZE: usize = 8;

/// Created at start and again by the first operation after that failed. The advisory lock
/// serialises concurrent creators (two replicas starting together), which `IF NOT EXISTS`
/// alone does not: both can race to insert the same catalog rows.
const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(7226351);
CREATE TABLE IF NOT EXISTS orders (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    symbol TEXT NOT NULL CHECK (symbol ~ '^[A-Z0-9]{1,12}$'),
    qty INTEGER NOT NULL CHECK (qty BETWEEN 1 AND 1000000),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";
const INSERT: &str =
    "INSERT INTO orders (symbol, qty) VALUES ($1, $2) RETURNING id, symbol, qty, created_at";
const RECENT: &str = "SELECT id, symbol, qty, created_at FROM orders ORDER BY id DESC LIMIT $1";
const BY_ID: &str = "SELECT id, symbol, qty, created_at FROM orders WHERE id = $1";

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("building the connection pool: {0}")]
    Pool(String),
    #[error("no database connection: {0}")]
    Connect(#[source] deadpool_postgres::PoolError),
    #[error("database {what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("database {what} failed: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database returned an unreadable row: {0}")]
    Row(String),
}

/// The order store.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
    /// Whether the schema is known to exist; cleared when a query says the table is gone (a
    /// fresh database volume after a restart).
    schema_ready: Arc<AtomicBool>,
    /// Held while the schema is being created, so one request creates it and others wait.
    schema_lock: Arc<Mutex<()>>,
}

impl Db {
    /// Parses the URL and builds the pool; connects nothing yet.
    pub fn new(url: &str) -> Result<Db, DbError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
        config
            .application_name("faultline-order-api")
            .connect_timeout(OP_TIMEOUT)
            // A peer that vanishes (partition, host down) would otherwise keep a connection
            // "open" for the kernel's 15-minute retransmission limit.
            .tcp_user_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // `Fast` only checks that the connection task is alive: a restart of the
                // server closes it, which is what we need to detect; a partition is caught by
                // the operation deadline below.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(OP_TIMEOUT))
            .recycle_timeout(Some(OP_TIMEOUT))
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        Ok(Db {
            pool,
            schema_ready: Arc::new(AtomicBool::new(false)),
            schema_lock: Arc::new(Mutex::new(())),
        })
    }

    /// Creates the schema if needed, within [`OP_TIMEOUT`].
    pub async fn ensure_schema(&self) -> Result<(), DbError> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let client = self.client(deadline).await?;
        self.schema_on(client, deadline).await
    }

    /// `SELECT 1` within [`PING_TIMEOUT`] (the health check).
    pub async fn ping(&self) -> Result<(), DbError> {
        let deadline = Instant::now() + PING_TIMEOUT;
        let client = self.client(deadline).await?;
        let result = timeout_at(deadline, client.simple_query("SELECT 1")).await;
        settle(client, result, "ping", PING_TIMEOUT).map(drop)
    }

    /// Inserts a validated order and returns it as stored.
    pub async fn insert(&self, order: &NewOrder) -> Result<Order, DbError> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let client = self.ready_client(deadline).await?;
        let result = timeout_at(deadline, async {
            let statement = client.prepare_cached(INSERT).await?;
            client
                .query_one(&statement, &[&order.symbol, &order.qty])
                .await
        })
        .await;
        row_to_order(&self.check(settle(client, result, "insert", OP_TIMEOUT))?)
    }

    /// The [`RECENT_LIMIT`] most recent orders, newest first.
    pub async fn recent(&self) -> Result<Vec<Order>, DbError> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let client = self.ready_client(deadline).await?;
        let result = timeout_at(deadline, async {
            let statement = client.prepare_cached(RECENT).await?;
            client.query(&statement, &[&RECENT_LIMIT]).await
        })
        .await;
        self.check(settle(client, result, "list", OP_TIMEOUT))?
            .iter()
            .map(row_to_order)
            .collect()
    }

    /// One order, if it exists.
    pub async fn get(&self, id: i64) -> Result<Option<Order>, DbError> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let client = self.ready_client(deadline).await?;
        let result = timeout_at(deadline, async {
            let statement = client.prepare_cached(BY_ID).await?;
            client.query_opt(&statement, &[&id]).await
        })
        .await;
        self.check(settle(client, result, "get", OP_TIMEOUT))?
            .as_ref()
            .map(row_to_order)
            .transpose()
    }

    /// A pooled connection, checked out before `deadline`.
    async fn client(&self, deadline: Instant) -> Result<Object, DbError> {
        let after = deadline.saturating_duration_since(Instant::now());
        match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(DbError::Connect(e)),
            Err(_) => Err(DbError::Timeout {
                what: "connect",
                after,
            }),
        }
    }

    /// A pooled connection on a database that has the schema (created now if it was not yet:
    /// the database may have come up after this service did).
    async fn ready_client(&self, deadline: Instant) -> Result<Object, DbError> {
        let client = self.client(deadline).await?;
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(client);
        }
        // Creating the schema hands the connection back through the pool; take another.
        self.schema_on(client, deadline).await?;
        self.client(deadline).await
    }

    async fn schema_on(&self, client: Object, deadline: Instant) -> Result<(), DbError> {
        let after = deadline.saturating_duration_since(Instant::now());
        let Ok(_creating) = timeout_at(deadline, self.schema_lock.lock()).await else {
            return Err(DbError::Timeout {
                what: "schema creation",
                after,
            });
        };
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        // One simple-protocol batch runs as one implicit transaction, so the advisory lock is
        // held until the table exists.
        let result = timeout_at(deadline, client.batch_execute(SCHEMA)).await;
        settle(client, result, "schema creation", after)?;
        self.schema_ready.store(true, Ordering::Release);
        tracing::info!("database schema ready");
        Ok(())
    }

    /// Notices a vanished table so the next operation creates the schema again.
    fn check<T>(&self, result: Result<T, DbError>) -> Result<T, DbError> {
        if let Err(DbError::Query { source, .. }) = &result
            && source.code() == Some(&SqlState::UNDEFINED_TABLE)
        {
            self.schema_ready.store(false, Ordering::Release);
        }
        result
    }
}

/// Turns a bounded operation's outcome into a result. A connection whose operation timed out
/// is removed from the pool: its reply may still arrive and would confuse the next user, and
/// on a partitioned link it would only time out again.
fn settle<T>(
    client: Object,
    result: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    what: &'static str,
    after: Duration,
) -> Result<T, DbError> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(DbError::Query { what, source }),
        Err(_) => {
            drop(Object::take(client));
            Err(DbError::Timeout { what, after })
        }
    }
}

fn row_to_order(row: &Row) -> Result<Order, DbError> {
    let created_at: OffsetDateTime = row
        .try_get("created_at")
        .map_err(|e| DbError::Row(e.to_string()))?;
    Ok(Order {
        id: row.try_get("id").map_err(|e| DbError::Row(e.to_string()))?,
        symbol: row
            .try_get("symbol")
            .map_err(|e| DbError::Row(e.to_string()))?,
        qty: row
            .try_get("qty")
            .map_err(|e| DbError::Row(e.to_string()))?,
        created_at: created_at
            .to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(|e| DbError::Row(e.to_string()))?,
    })
}
