//! The coordinator's embedded store: one SQLite file holding agents, runs, run events, the
//! audit log and the halt switch. The schema is migrated on open; it survives restarts.
//!
//! SQLite calls are blocking, so every async method runs its statement on the blocking pool.
//! Statements are short; one connection behind a mutex is plenty for a coordinator.

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
}

/// Schema migrations, applied in order; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

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
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
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
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
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

    /// Sets a run's state; a final state also stamps `finished_ms`.
    pub async fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
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
    use super::*;

    fn run(id: &str, created_ms: i64) -> RunRecord {
        RunRecord {
            id: id.into(),
            title: "t".into(),
            state: RunState::Running.as_str().into(),
            plan_yaml: "y".into(),
            operator: "operator/op".into(),
            created_ms,
            finished_ms: None,
            reason: String::new(),
        }
    }

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

    #[tokio::test]
    async fn unfinished_runs_are_aborted_with_a_reason_and_an_event() {
        let store = Store::open_in_memory().unwrap();
        store.create_run(run("live", 1)).await.unwrap();
        store.create_run(run("done", 2)).await.unwrap();
        store
            .finish_run("done", RunState::Completed, "", 3)
            .await
            .unwrap();
        let aborted = store
            .abort_unfinished_runs("coordinator restarted", 9)
            .await
            .unwrap();
        assert_eq!(aborted, ["live"]);
        let (live, events) = store.get_run("live").await.unwrap().unwrap();
        assert_eq!(
            (live.state.as_str(), live.finished_ms),
            ("aborted", Some(9))
        );
        assert_eq!(live.reason, "coordinator restarted");
        assert_eq!(events.last().unwrap().kind, "run-aborted");
        let (done, _) = store.get_run("done").await.unwrap().unwrap();
        assert_eq!(done.state, "completed");
    }

    #[tokio::test]
    async fn halt_switch_round_trips() {
        let store = Store::open_in_memory().unwrap();
        assert!(!store.halt_state().await.unwrap().halted);
        let halted = HaltRecord {
            halted: true,
            reason: "game-day over".into(),
            since_ms: 4,
        };
        store.set_halt(halted.clone()).await.unwrap();
        assert_eq!(store.halt_state().await.unwrap(), halted);
    }

    #[tokio::test]
    async fn runs_list_newest_first_and_agents_keep_first_seen() {
        let store = Store::open_in_memory().unwrap();
        store.create_run(run("a", 1)).await.unwrap();
        store.create_run(run("b", 2)).await.unwrap();
        let ids: Vec<_> = store
            .list_runs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["b", "a"]);
        let agent = |seen| AgentRecord {
            name: "agent-1".into(),
            version: "0.1".into(),
            host_json: "{}".into(),
            capabilities_json: "[]".into(),
            first_seen_ms: seen,
            last_seen_ms: seen,
        };
        store.upsert_agent(agent(1)).await.unwrap();
        store.upsert_agent(agent(5)).await.unwrap();
        let agents = store.list_agents().await.unwrap();
        assert_eq!((agents[0].first_seen_ms, agents[0].last_seen_ms), (1, 5));
    }
}
