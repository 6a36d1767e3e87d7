//! The coordinator's store: agents, runs, run events, the runs' steady-state probe samples,
//! the audit log and the halt switch. The schema is migrated on open; it survives restarts.
//!
//! Two backends behind one API: an embedded SQLite file (the default), and PostgreSQL
//! ([`pg`], a `postgres://` URL as `--db`) which several coordinator replicas share for high
//! availability (see `crate::leader`).
//!
//! SQLite calls are blocking, so every async method runs its statement on the blocking pool.
//! Statements are short; one connection behind a mutex is plenty for a coordinator.

#[cfg(any(test, feature = "store-conformance"))]
pub mod conformance;
mod pg;

pub(crate) use pg::connect as pg_connect;
pub use pg::{describe as describe_postgres_url, is_postgres_url};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

/// Store failures, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("migrating database schema to version {version}: {source}")]
    Migrate {
        version: u32,
        source: rusqlite::Error,
    },
    #[error("{operation}: {source}")]
    Sql {
        operation: &'static str,
        source: rusqlite::Error,
    },
    #[error("store worker failed during {operation}: {message}")]
    Worker {
        operation: &'static str,
        message: String,
    },
    #[error("connecting to PostgreSQL at {target}: {source}")]
    PgConnect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("migrating PostgreSQL schema to version {version}: {source}")]
    PgMigrate {
        version: u32,
        source: tokio_postgres::Error,
    },
    #[error("{operation} (PostgreSQL): {source}")]
    Pg {
        operation: &'static str,
        source: tokio_postgres::Error,
    },
}

/// Schema migrations, applied in order; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        host_json TEXT NOT NULL,
        capabilities_json TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        state TEXT NOT NULL,
        plan_yaml TEXT NOT NULL,
        operator TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE run_events (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        stage TEXT NOT NULL,
        agent TEXT NOT NULL,
        fault_id TEXT NOT NULL,
        message TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE halt (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        halted INTEGER NOT NULL,
        reason TEXT NOT NULL,
        since_ms INTEGER NOT NULL
    );
    INSERT INTO halt (id, halted, reason, since_ms) VALUES (1, 0, '', 0);
"#,
    r#"
    CREATE TABLE probe_samples (
        run_id TEXT NOT NULL REFERENCES runs(id),
        probe TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        latency_ms REAL,
        value REAL,
        detail TEXT NOT NULL
    );
    CREATE INDEX probe_samples_by_run ON probe_samples (run_id, at_ms);
"#,
    // Telemetry of runs (see crate::telemetry): per-agent state, aggregates per target and
    // time bucket (prost-encoded `TargetTelemetry`), and discrete events (`TelemetryEvent`).
    r#"
    CREATE TABLE telemetry_agents (
        run_id TEXT NOT NULL REFERENCES runs(id),
        agent TEXT NOT NULL,
        first_ms INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        seq_gaps INTEGER NOT NULL DEFAULT 0,
        sources BLOB NOT NULL,
        drops BLOB NOT NULL,
        notes TEXT NOT NULL,
        samples_not_stored INTEGER NOT NULL DEFAULT 0,
        events_not_stored INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, agent)
    );
    CREATE TABLE telemetry_samples (
        run_id TEXT NOT NULL REFERENCES runs(id),
        agent TEXT NOT NULL,
        target TEXT NOT NULL,
        bucket_ms INTEGER NOT NULL,
        width_ms INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (run_id, agent, target, bucket_ms)
    );
    CREATE TABLE telemetry_events (
        run_id TEXT NOT NULL REFERENCES runs(id),
        agent TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX telemetry_events_by_run ON telemetry_events (run_id, kind, at_ms);
"#,
];

/// Most probe samples stored for one run; later ones are not stored (the run's own checks
/// still see them). At 5 probes sampled every second that is 100 minutes; with the 64-byte
/// names at most, a `GetRun` answer of that many samples stays under 3 MiB.
pub const MAX_PROBE_SAMPLES_PER_RUN: usize = 30_000;

/// Longest stored `detail` of a probe sample, in bytes.
pub const MAX_PROBE_DETAIL_LEN: usize = 256;

/// Lifecycle of a run as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Completed,
    Failed,
    Halted,
    Aborted,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Halted => "halted",
            Self::Aborted => "aborted",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Self::Running)
    }
}

/// One event in a run's timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunEventRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub stage: String,
    pub agent: String,
    pub fault_id: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: String,
    pub title: String,
    pub state: String,
    pub plan_yaml: String,
    pub operator: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: u64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub name: String,
    pub version: String,
    pub host_json: String,
    pub capabilities_json: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// One steady-state probe sample of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeSampleRecord {
    pub probe: String,
    /// When the attempt started, Unix milliseconds.
    pub at_ms: i64,
    pub ok: bool,
    /// Wall time of the attempt in (fractional) milliseconds.
    pub latency_ms: Option<f64>,
    /// The measured value (Prometheus probes); NaN is stored as absent.
    pub value: Option<f64>,
    /// At most [`MAX_PROBE_DETAIL_LEN`] bytes (cut on a character boundary).
    pub detail: String,
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
pub fn cap_detail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let ellipsis = '…';
    let mut end = max.saturating_sub(ellipsis.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = text[..end].to_string();
    cut.push(ellipsis);
    cut
}

/// Halt switch: while set, no new run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaltRecord {
    pub halted: bool,
    pub reason: String,
    pub since_ms: i64,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(pg::PgStore),
}

impl Store {
    /// Opens the store named by the coordinator's `--db`: a `postgres://` (or
    /// `postgresql://`) URL connects to PostgreSQL, anything else is a SQLite file path.
    pub async fn open_db(db: &Path) -> Result<Self, StoreError> {
        match db.to_str() {
            Some(url) if is_postgres_url(url) => Self::open_postgres(url).await,
            _ => Self::open(db),
        }
    }

    /// Connects to PostgreSQL at `url` and migrates its schema.
    pub async fn open_postgres(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Postgres(pg::PgStore::open(url).await?),
        })
    }

    /// Is this store PostgreSQL (shared by replicas) rather than an embedded SQLite file?
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Resolves when the store can no longer record anything (its PostgreSQL connection
    /// closed); never for SQLite.
    pub async fn lost(&self) {
        match &self.backend {
            Backend::Sqlite(_) => std::future::pending().await,
            Backend::Postgres(pg) => pg.lost().await,
        }
    }

    /// Opens (creating if needed) and migrates the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn)
    }

    /// An in-memory database, for unit tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: ":memory:".into(),
            source,
        })?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        let sql = |operation| move |source| StoreError::Sql { operation, source };
        // WAL keeps readers (CLI queries) from blocking the run writer; full sync on commit
        // because the audit log must survive a crash.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enabling WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("setting synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("enabling foreign keys"))?;
        let current: u32 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sql("reading schema version"))?;
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = index as u32 + 1;
            let tx = conn
                .transaction()
                .map_err(|source| StoreError::Migrate { version, source })?;
            tx.execute_batch(migration)
                .map_err(|source| StoreError::Migrate { version, source })?;
            tx.pragma_update(None, "user_version", version)
                .map_err(|source| StoreError::Migrate { version, source })?;
            tx.commit()
                .map_err(|source| StoreError::Migrate { version, source })?;
        }
        Ok(Self {
            backend: Backend::Sqlite(Arc::new(Mutex::new(conn))),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        // Every public method hands PostgreSQL stores to `pg` before getting here.
        let Backend::Sqlite(conn) = &self.backend else {
            return Err(StoreError::Worker {
                operation,
                message: "SQLite statement on a PostgreSQL store".into(),
            });
        };
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Worker {
                operation,
                message: "connection mutex poisoned".into(),
            })?;
            work(&mut guard).map_err(|source| StoreError::Sql { operation, source })
        })
        .await
        .map_err(|join| StoreError::Worker {
            operation,
            message: join.to_string(),
        })?
    }

    /// Appends an audit entry.
    pub async fn audit(
        &self,
        at_ms: i64,
        actor: &str,
        action: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.audit(at_ms, actor, action, outcome, detail).await;
        }
        let row = (
            at_ms,
            actor.to_string(),
            action.to_string(),
            outcome.to_string(),
        );
        let detail = detail.to_string();
        self.with("writing audit entry", move |conn| {
            conn.execute(
                "INSERT INTO audit (at_ms, actor, action, outcome, detail) VALUES (?1,?2,?3,?4,?5)",
                params![row.0, row.1, row.2, row.3, detail],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.list_audit(limit).await;
        }
        self.with("listing audit entries", move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, at_ms, actor, action, outcome, detail FROM audit
                 ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], |row| {
                Ok(AuditRecord {
                    id: row.get(0)?,
                    at_ms: row.get(1)?,
                    actor: row.get(2)?,
                    action: row.get(3)?,
                    outcome: row.get(4)?,
                    detail: row.get(5)?,
                })
            })?;
            let mut entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            entries.reverse();
            Ok(entries)
        })
        .await
    }

    /// Records an agent's registration (first seen is kept across reconnects).
    pub async fn upsert_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.upsert_agent(record).await;
        }
        self.with("recording agent", move |conn| {
            conn.execute(
                "INSERT INTO agents (name, version, host_json, capabilities_json, first_seen_ms,
                                     last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET version = excluded.version,
                     host_json = excluded.host_json,
                     capabilities_json = excluded.capabilities_json,
                     last_seen_ms = excluded.last_seen_ms",
                params![
                    record.name,
                    record.version,
                    record.host_json,
                    record.capabilities_json,
                    record.first_seen_ms,
                    record.last_seen_ms
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn touch_agent(&self, name: &str, last_seen_ms: i64) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.touch_agent(name, last_seen_ms).await;
        }
        let name = name.to_string();
        self.with("updating agent last-seen", move |conn| {
            conn.execute(
                "UPDATE agents SET last_seen_ms = ?2 WHERE name = ?1",
                params![name, last_seen_ms],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.list_agents().await;
        }
        self.with("listing agents", |conn| {
            let mut stmt = conn.prepare(
                "SELECT name, version, host_json, capabilities_json, first_seen_ms, last_seen_ms
                 FROM agents ORDER BY name",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(AgentRecord {
                    name: row.get(0)?,
                    version: row.get(1)?,
                    host_json: row.get(2)?,
                    capabilities_json: row.get(3)?,
                    first_seen_ms: row.get(4)?,
                    last_seen_ms: row.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub async fn create_run(&self, run: RunRecord) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.create_run(run).await;
        }
        self.with("creating run", move |conn| {
            conn.execute(
                "INSERT INTO runs (id, title, state, plan_yaml, operator, created_ms, finished_ms,
                                   reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    run.id,
                    run.title,
                    run.state,
                    run.plan_yaml,
                    run.operator,
                    run.created_ms,
                    run.finished_ms,
                    run.reason
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// Appends an event to a run's timeline and returns it with its sequence number.
    pub async fn append_event(
        &self,
        run_id: &str,
        mut event: RunEventRecord,
    ) -> Result<RunEventRecord, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.append_event(run_id, event).await;
        }
        let run_id = run_id.to_string();
        self.with("appending run event", move |conn| {
            let tx = conn.transaction()?;
            let next: u64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id = ?1",
                [&run_id],
                |row| row.get(0),
            )?;
            event.seq = next;
            tx.execute(
                "INSERT INTO run_events (run_id, seq, at_ms, kind, stage, agent, fault_id, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    run_id,
                    event.seq,
                    event.at_ms,
                    event.kind,
                    event.stage,
                    event.agent,
                    event.fault_id,
                    event.message
                ],
            )?;
            tx.commit()?;
            Ok(event)
        })
        .await
    }

    /// Stores probe samples of a run in one transaction; details longer than
    /// [`MAX_PROBE_DETAIL_LEN`] are cut. Returns how many were stored.
    pub async fn append_probe_samples(
        &self,
        run_id: &str,
        samples: Vec<ProbeSampleRecord>,
    ) -> Result<usize, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.append_probe_samples(run_id, samples).await;
        }
        if samples.is_empty() {
            return Ok(0);
        }
        let run_id = run_id.to_string();
        self.with("storing probe samples", move |conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO probe_samples (run_id, probe, at_ms, ok, latency_ms, value, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for sample in &samples {
                    let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
                    stmt.execute(params![
                        run_id,
                        sample.probe,
                        sample.at_ms,
                        i64::from(sample.ok),
                        finite(sample.latency_ms),
                        finite(sample.value),
                        cap_detail(&sample.detail, MAX_PROBE_DETAIL_LEN)
                    ])?;
                }
            }
            tx.commit()?;
            Ok(samples.len())
        })
        .await
    }

    /// A run's probe samples, oldest first (ties in insertion order), at most `limit`.
    pub async fn probe_samples(
        &self,
        run_id: &str,
        limit: usize,
    ) -> Result<Vec<ProbeSampleRecord>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.probe_samples(run_id, limit).await;
        }
        let run_id = run_id.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with("reading probe samples", move |conn| {
            let mut stmt = conn.prepare(
                "SELECT probe, at_ms, ok, latency_ms, value, detail FROM probe_samples
                 WHERE run_id = ?1 ORDER BY at_ms, rowid LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![run_id, limit], |row| {
                Ok(ProbeSampleRecord {
                    probe: row.get(0)?,
                    at_ms: row.get(1)?,
                    ok: row.get::<_, i64>(2)? != 0,
                    latency_ms: row.get(3)?,
                    value: row.get(4)?,
                    detail: row.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Sets a run's state; a final state also stamps `finished_ms`.
    pub async fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.finish_run(run_id, state, reason, at_ms).await;
        }
        let run_id = run_id.to_string();
        let reason = reason.to_string();
        let finished = state.is_final().then_some(at_ms);
        self.with("updating run state", move |conn| {
            conn.execute(
                "UPDATE runs SET state = ?2, reason = ?3, finished_ms = ?4 WHERE id = ?1",
                params![run_id, state.as_str(), reason, finished],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn list_runs(&self, limit: u32) -> Result<Vec<RunRecord>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.list_runs(limit).await;
        }
        self.with("listing runs", move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, title, state, plan_yaml, operator, created_ms, finished_ms, reason
                 FROM runs ORDER BY created_ms DESC, id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], run_from_row)?;
            rows.collect()
        })
        .await
    }

    pub async fn get_run(
        &self,
        run_id: &str,
    ) -> Result<Option<(RunRecord, Vec<RunEventRecord>)>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.get_run(run_id).await;
        }
        let run_id = run_id.to_string();
        self.with("reading run", move |conn| {
            let run = conn
                .query_row(
                    "SELECT id, title, state, plan_yaml, operator, created_ms, finished_ms, reason
                     FROM runs WHERE id = ?1",
                    [&run_id],
                    run_from_row,
                )
                .optional()?;
            let Some(run) = run else { return Ok(None) };
            let mut stmt = conn.prepare(
                "SELECT seq, at_ms, kind, stage, agent, fault_id, message FROM run_events
                 WHERE run_id = ?1 ORDER BY seq",
            )?;
            let events = stmt
                .query_map([&run_id], |row| {
                    Ok(RunEventRecord {
                        seq: row.get(0)?,
                        at_ms: row.get(1)?,
                        kind: row.get(2)?,
                        stage: row.get(3)?,
                        agent: row.get(4)?,
                        fault_id: row.get(5)?,
                        message: row.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((run, events)))
        })
        .await
    }

    /// Marks every run still `running` as aborted with `reason`; returns their ids. Called on
    /// start-up: a run cannot survive its coordinator (the agents' leases revert its faults).
    pub async fn abort_unfinished_runs(
        &self,
        reason: &str,
        at_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.abort_unfinished_runs(reason, at_ms).await;
        }
        let reason = reason.to_string();
        self.with("aborting unfinished runs", move |conn| {
            let tx = conn.transaction()?;
            let ids = {
                let mut stmt = tx.prepare("SELECT id FROM runs WHERE state = 'running'")?;
                stmt.query_map([], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            for id in &ids {
                tx.execute(
                    "UPDATE runs SET state = 'aborted', reason = ?2, finished_ms = ?3
                     WHERE id = ?1",
                    params![id, reason, at_ms],
                )?;
                let next: u64 = tx.query_row(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id = ?1",
                    [id],
                    |row| row.get(0),
                )?;
                tx.execute(
                    "INSERT INTO run_events (run_id, seq, at_ms, kind, stage, agent, fault_id,
                                             message)
                     VALUES (?1, ?2, ?3, 'run-aborted', '', '', '', ?4)",
                    params![id, next, at_ms, reason],
                )?;
            }
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    pub async fn halt_state(&self) -> Result<HaltRecord, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.halt_state().await;
        }
        self.with("reading halt switch", |conn| {
            conn.query_row(
                "SELECT halted, reason, since_ms FROM halt WHERE id = 1",
                [],
                |row| {
                    Ok(HaltRecord {
                        halted: row.get::<_, i64>(0)? != 0,
                        reason: row.get(1)?,
                        since_ms: row.get(2)?,
                    })
                },
            )
        })
        .await
    }

    pub async fn set_halt(&self, record: HaltRecord) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.set_halt(record).await;
        }
        self.with("setting halt switch", move |conn| {
            conn.execute(
                "UPDATE halt SET halted = ?1, reason = ?2, since_ms = ?3 WHERE id = 1",
                params![i64::from(record.halted), record.reason, record.since_ms],
            )
            .map(|_| ())
        })
        .await
    }
}

/// One batch of a run's telemetry from one agent, ready to store (see crate::telemetry).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryWrite {
    pub run_id: String,
    pub agent: String,
    pub seq: u64,
    pub received_ms: i64,
    /// Encoded sources and drops of the batch (the latest replace the stored ones).
    pub sources: Vec<u8>,
    pub drops: Vec<u8>,
    pub notes: Vec<String>,
    pub samples: Vec<TelemetrySampleRow>,
    pub events: Vec<TelemetryEventRow>,
}

/// One target's aggregates over one time bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetrySampleRow {
    pub agent: String,
    pub target: String,
    pub bucket_ms: i64,
    pub width_ms: i64,
    pub data: Vec<u8>,
}

/// One discrete event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryEventRow {
    pub agent: String,
    pub kind: String,
    pub at_ms: i64,
    pub data: Vec<u8>,
}

/// Per-run limits of the telemetry store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryLimits {
    /// Sample rows per run; later buckets are counted, not stored.
    pub samples_per_run: u64,
    /// Events per run and kind; later ones are counted, not stored (the first are kept).
    pub events_per_kind: u64,
    /// Notes kept per agent.
    pub notes_per_agent: usize,
}

/// What became of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryStored {
    Stored,
    /// Its sequence number was stored already (a batch resent after a lost stream).
    Duplicate,
}

/// A run's telemetry state per agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryAgentRow {
    pub agent: String,
    pub first_ms: i64,
    pub last_seq: u64,
    pub seq_gaps: u64,
    pub sources: Vec<u8>,
    pub drops: Vec<u8>,
    pub notes: Vec<String>,
    pub samples_not_stored: u64,
    pub events_not_stored: u64,
}

/// A run's stored telemetry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryRead {
    pub agents: Vec<TelemetryAgentRow>,
    /// Oldest bucket first.
    pub samples: Vec<TelemetrySampleRow>,
    /// Oldest first.
    pub events: Vec<TelemetryEventRow>,
}

impl Store {
    /// Stores a telemetry batch in one transaction: the agent's state (a sequence number at
    /// or below the last stored one is a duplicate and changes nothing; a jump counts the
    /// batches missed), each sample merged into its bucket with `merge(stored, new)`, and the
    /// events within `limits`.
    pub async fn append_telemetry(
        &self,
        write: TelemetryWrite,
        merge: fn(&[u8], &[u8]) -> Vec<u8>,
        limits: TelemetryLimits,
    ) -> Result<TelemetryStored, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.append_telemetry(write, merge, limits).await;
        }
        self.with("storing telemetry", move |conn| {
            let tx = conn.transaction()?;
            let known: Option<(u64, String)> = tx
                .query_row(
                    "SELECT last_seq, notes FROM telemetry_agents WHERE run_id = ?1 AND agent = ?2",
                    params![write.run_id, write.agent],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let mut notes: Vec<String> = Vec::new();
            match &known {
                Some((last_seq, _)) if write.seq <= *last_seq => {
                    return Ok(TelemetryStored::Duplicate);
                }
                Some((last_seq, stored)) => {
                    notes = stored.lines().map(str::to_string).collect();
                    tx.execute(
                        "UPDATE telemetry_agents SET seq_gaps = seq_gaps + ?3
                         WHERE run_id = ?1 AND agent = ?2",
                        params![write.run_id, write.agent, write.seq - last_seq - 1],
                    )?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO telemetry_agents (run_id, agent, first_ms, last_seq, seq_gaps,
                                                       sources, drops, notes)
                         VALUES (?1, ?2, ?3, 0, ?4, x'', x'', '')",
                        params![
                            write.run_id,
                            write.agent,
                            write.received_ms,
                            write.seq.saturating_sub(1)
                        ],
                    )?;
                }
            }
            for note in &write.notes {
                if notes.len() < limits.notes_per_agent && !notes.contains(note) {
                    notes.push(note.replace('\n', " "));
                }
            }
            let mut samples_not_stored = 0u64;
            let mut count: u64 = tx.query_row(
                "SELECT COUNT(*) FROM telemetry_samples WHERE run_id = ?1",
                [&write.run_id],
                |row| row.get(0),
            )?;
            for sample in &write.samples {
                let stored: Option<Vec<u8>> = tx
                    .query_row(
                        "SELECT data FROM telemetry_samples
                         WHERE run_id = ?1 AND agent = ?2 AND target = ?3 AND bucket_ms = ?4",
                        params![write.run_id, sample.agent, sample.target, sample.bucket_ms],
                        |row| row.get(0),
                    )
                    .optional()?;
                match stored {
                    Some(stored) => {
                        tx.execute(
                            "UPDATE telemetry_samples SET data = ?5
                             WHERE run_id = ?1 AND agent = ?2 AND target = ?3 AND bucket_ms = ?4",
                            params![
                                write.run_id,
                                sample.agent,
                                sample.target,
                                sample.bucket_ms,
                                merge(&stored, &sample.data)
                            ],
                        )?;
                    }
                    None if count >= limits.samples_per_run => samples_not_stored += 1,
                    None => {
                        tx.execute(
                            "INSERT INTO telemetry_samples (run_id, agent, target, bucket_ms,
                                                            width_ms, data)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            params![
                                write.run_id,
                                sample.agent,
                                sample.target,
                                sample.bucket_ms,
                                sample.width_ms,
                                sample.data
                            ],
                        )?;
                        count += 1;
                    }
                }
            }
            let mut events_not_stored = 0u64;
            let mut per_kind: std::collections::BTreeMap<String, u64> = Default::default();
            for event in &write.events {
                let stored = match per_kind.get(&event.kind) {
                    Some(n) => *n,
                    None => tx.query_row(
                        "SELECT COUNT(*) FROM telemetry_events WHERE run_id = ?1 AND kind = ?2",
                        params![write.run_id, event.kind],
                        |row| row.get(0),
                    )?,
                };
                if stored >= limits.events_per_kind {
                    events_not_stored += 1;
                    per_kind.insert(event.kind.clone(), stored);
                    continue;
                }
                tx.execute(
                    "INSERT INTO telemetry_events (run_id, agent, kind, at_ms, data)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        write.run_id,
                        event.agent,
                        event.kind,
                        event.at_ms,
                        event.data
                    ],
                )?;
                per_kind.insert(event.kind.clone(), stored + 1);
            }
            tx.execute(
                "UPDATE telemetry_agents SET last_seq = ?3, sources = ?4, drops = ?5, notes = ?6,
                        samples_not_stored = samples_not_stored + ?7,
                        events_not_stored = events_not_stored + ?8
                 WHERE run_id = ?1 AND agent = ?2",
                params![
                    write.run_id,
                    write.agent,
                    write.seq,
                    write.sources,
                    write.drops,
                    notes.join("\n"),
                    samples_not_stored,
                    events_not_stored
                ],
            )?;
            tx.commit()?;
            Ok(TelemetryStored::Stored)
        })
        .await
    }

    /// A run's telemetry: every agent's state, and the samples and events at or after
    /// `since_ms`, oldest first.
    pub async fn telemetry(
        &self,
        run_id: &str,
        since_ms: i64,
    ) -> Result<TelemetryRead, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.telemetry(run_id, since_ms).await;
        }
        let run_id = run_id.to_string();
        self.with("reading telemetry", move |conn| {
            let mut stmt = conn.prepare(
                "SELECT agent, first_ms, last_seq, seq_gaps, sources, drops, notes,
                        samples_not_stored, events_not_stored
                 FROM telemetry_agents WHERE run_id = ?1 ORDER BY agent",
            )?;
            let agents = stmt
                .query_map([&run_id], |row| {
                    let notes: String = row.get(6)?;
                    Ok(TelemetryAgentRow {
                        agent: row.get(0)?,
                        first_ms: row.get(1)?,
                        last_seq: row.get(2)?,
                        seq_gaps: row.get(3)?,
                        sources: row.get(4)?,
                        drops: row.get(5)?,
                        notes: notes
                            .lines()
                            .filter(|l| !l.is_empty())
                            .map(str::to_string)
                            .collect(),
                        samples_not_stored: row.get(7)?,
                        events_not_stored: row.get(8)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = conn.prepare(
                "SELECT agent, target, bucket_ms, width_ms, data FROM telemetry_samples
                 WHERE run_id = ?1 AND bucket_ms >= ?2 ORDER BY bucket_ms, agent, target",
            )?;
            let samples = stmt
                .query_map(params![run_id, since_ms], |row| {
                    Ok(TelemetrySampleRow {
                        agent: row.get(0)?,
                        target: row.get(1)?,
                        bucket_ms: row.get(2)?,
                        width_ms: row.get(3)?,
                        data: row.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = conn.prepare(
                "SELECT agent, kind, at_ms, data FROM telemetry_events
                 WHERE run_id = ?1 AND at_ms >= ?2 ORDER BY at_ms, rowid",
            )?;
            let events = stmt
                .query_map(params![run_id, since_ms], |row| {
                    Ok(TelemetryEventRow {
                        agent: row.get(0)?,
                        kind: row.get(1)?,
                        at_ms: row.get(2)?,
                        data: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(TelemetryRead {
                agents,
                samples,
                events,
            })
        })
        .await
    }

    /// A run without its events (cheaper than [`Store::get_run`]).
    pub async fn run_record(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.run_record(run_id).await;
        }
        let run_id = run_id.to_string();
        self.with("reading run", move |conn| {
            conn.query_row(
                "SELECT id, title, state, plan_yaml, operator, created_ms, finished_ms, reason
                 FROM runs WHERE id = ?1",
                [&run_id],
                run_from_row,
            )
            .optional()
        })
        .await
    }
}

fn run_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: row.get(0)?,
        title: row.get(1)?,
        state: row.get(2)?,
        plan_yaml: row.get(3)?,
        operator: row.get(4)?,
        created_ms: row.get(5)?,
        finished_ms: row.get(6)?,
        reason: row.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::conformance::run;
    use super::*;

    #[tokio::test]
    async fn runs_events_and_audit_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = Store::open(&path).unwrap();
            store.create_run(run("r1", 10)).await.unwrap();
            let first = RunEventRecord {
                kind: "run-started".into(),
                ..Default::default()
            };
            let second = RunEventRecord {
                kind: "fault-applied".into(),
                ..Default::default()
            };
            assert_eq!(store.append_event("r1", first).await.unwrap().seq, 1);
            assert_eq!(store.append_event("r1", second).await.unwrap().seq, 2);
            store
                .audit(5, "operator/op", "start-run", "ok", "r1")
                .await
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let (record, events) = store.get_run("r1").await.unwrap().unwrap();
        assert_eq!(record.state, "running");
        let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["run-started", "fault-applied"]);
        let audit = store.list_audit(10).await.unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].action, "start-run");
    }

    fn sample(probe: &str, at_ms: i64, ok: bool) -> ProbeSampleRecord {
        ProbeSampleRecord {
            probe: probe.into(),
            at_ms,
            ok,
            latency_ms: Some(1.25),
            value: None,
            detail: if ok {
                "connected".into()
            } else {
                "refused".into()
            },
        }
    }

    #[tokio::test]
    async fn probe_samples_survive_reopening_in_time_order_with_capped_details() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = Store::open(&path).unwrap();
            store.create_run(run("r1", 10)).await.unwrap();
            store.create_run(run("r2", 11)).await.unwrap();
            let mut long = sample("api", 30, false);
            long.detail = "é".repeat(MAX_PROBE_DETAIL_LEN);
            long.latency_ms = None;
            long.value = Some(f64::NAN);
            let mut valued = sample("prom", 20, true);
            valued.value = Some(4.5);
            let first = vec![sample("api", 40, true), long, valued];
            assert_eq!(store.append_probe_samples("r1", first).await.unwrap(), 3);
            let other = vec![sample("api", 5, true)];
            assert_eq!(store.append_probe_samples("r2", other).await.unwrap(), 1);
            assert_eq!(store.append_probe_samples("r1", vec![]).await.unwrap(), 0);
            // Samples of a run that does not exist are refused.
            let err = store
                .append_probe_samples("nope", vec![sample("api", 1, true)])
                .await
                .unwrap_err();
            assert!(err.to_string().contains("storing probe samples"), "{err}");
        }
        let store = Store::open(&path).unwrap();
        let samples = store.probe_samples("r1", 100).await.unwrap();
        let order: Vec<(&str, i64)> = samples
            .iter()
            .map(|s| (s.probe.as_str(), s.at_ms))
            .collect();
        assert_eq!(order, [("prom", 20), ("api", 30), ("api", 40)]);
        assert_eq!(samples[0].value, Some(4.5));
        assert_eq!(samples[0].latency_ms, Some(1.25));
        assert!(samples[0].ok);
        let long = &samples[1];
        assert!(!long.ok);
        assert_eq!(
            (long.latency_ms, long.value),
            (None, None),
            "NaN is stored as absent"
        );
        assert!(
            long.detail.len() <= MAX_PROBE_DETAIL_LEN,
            "{}",
            long.detail.len()
        );
        assert!(long.detail.ends_with('…'));
        assert_eq!(store.probe_samples("r1", 2).await.unwrap().len(), 2);
        assert_eq!(store.probe_samples("r2", 100).await.unwrap().len(), 1);
        assert!(store.probe_samples("r3", 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_version_1_database_gains_the_probe_samples_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO runs (id, title, state, plan_yaml, operator, created_ms)
                 VALUES ('old', 't', 'completed', 'y', 'op', 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.get_run("old").await.unwrap().is_some());
        assert!(store.probe_samples("old", 10).await.unwrap().is_empty());
        store
            .append_probe_samples("old", vec![sample("api", 1, true)])
            .await
            .unwrap();
        assert_eq!(store.probe_samples("old", 10).await.unwrap().len(), 1);
    }

    #[test]
    fn details_are_cut_on_character_boundaries() {
        assert_eq!(cap_detail("short", 10), "short");
        assert_eq!(cap_detail("exactly10!", 10), "exactly10!");
        assert_eq!(cap_detail("abcdefghijkl", 10), "abcdefg…");
        let cut = cap_detail("ééééé", 6);
        assert_eq!(cut, "é…");
        assert!(cut.len() <= 6);
    }

    #[tokio::test]
    async fn the_sqlite_store_passes_the_conformance_suite() {
        // Two connections to one file, as two coordinators would have.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faultline.db");
        let store = Store::open(&path).unwrap();
        let other = Store::open(&path).unwrap();
        conformance::check_semantics(&store, &other).await;
    }
}
