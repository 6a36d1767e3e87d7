//! The PostgreSQL backend of [`super::Store`]: the same tables and semantics as the SQLite
//! one, for coordinators that share one database (high availability, see `crate::leader`).
//!
//! One connection behind an async mutex, like the SQLite backend: statements are short and
//! only the active coordinator writes. The schema is migrated on open inside a transaction
//! holding a transaction-level advisory lock, so replicas starting together migrate once.
//! When the connection closes the store cannot record anything any more; [`PgStore::lost`]
//! resolves so the coordinator can stop (fail-stop) instead of running blind.

use std::sync::Arc;

use tokio::sync::{Mutex, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls, Row};

use super::{
    AgentRecord, AuditRecord, HaltRecord, MAX_PROBE_DETAIL_LEN, ProbeSampleRecord, RunEventRecord,
    RunRecord, RunState, StoreError, TelemetryAgentRow, TelemetryEventRow, TelemetryLimits,
    TelemetryRead, TelemetrySampleRow, TelemetryStored, TelemetryWrite, cap_detail,
};

/// Key of the transaction-level advisory lock serialising migrations ("fl-migr").
const MIGRATION_LOCK_KEY: i64 = 0x0066_6c2d_6d69_6772;

/// PostgreSQL migrations, applied in order; index + 1 is the version recorded in
/// `faultline_schema`. Version 1 is the SQLite schema's versions 1-3 at once, with native
/// types (BIGINT, BYTEA, BOOLEAN) and explicit serial ids where SQLite orders by `rowid`.
const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        host_json TEXT NOT NULL,
        capabilities_json TEXT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        state TEXT NOT NULL,
        plan_yaml TEXT NOT NULL,
        operator TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        finished_ms BIGINT,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE run_events (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq BIGINT NOT NULL,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        stage TEXT NOT NULL,
        agent TEXT NOT NULL,
        fault_id TEXT NOT NULL,
        message TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE halt (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        halted BOOLEAN NOT NULL,
        reason TEXT NOT NULL,
        since_ms BIGINT NOT NULL
    );
    INSERT INTO halt (id, halted, reason, since_ms) VALUES (1, FALSE, '', 0);
    CREATE TABLE probe_samples (
        id BIGSERIAL PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs(id),
        probe TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        ok BOOLEAN NOT NULL,
        latency_ms DOUBLE PRECISION,
        value DOUBLE PRECISION,
        detail TEXT NOT NULL
    );
    CREATE INDEX probe_samples_by_run ON probe_samples (run_id, at_ms);
    CREATE TABLE telemetry_agents (
        run_id TEXT NOT NULL REFERENCES runs(id),
        agent TEXT NOT NULL,
        first_ms BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        seq_gaps BIGINT NOT NULL DEFAULT 0,
        sources BYTEA NOT NULL,
        drops BYTEA NOT NULL,
        notes TEXT NOT NULL,
        samples_not_stored BIGINT NOT NULL DEFAULT 0,
        events_not_stored BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, agent)
    );
    CREATE TABLE telemetry_samples (
        run_id TEXT NOT NULL REFERENCES runs(id),
        agent TEXT NOT NULL,
        target TEXT NOT NULL,
        bucket_ms BIGINT NOT NULL,
        width_ms BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (run_id, agent, target, bucket_ms)
    );
    CREATE TABLE telemetry_events (
        id BIGSERIAL PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs(id),
        agent TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX telemetry_events_by_run ON telemetry_events (run_id, kind, at_ms);
"#];

/// Is `db` (the coordinator's `--db`) a PostgreSQL URL rather than a SQLite path?
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// `host:port/dbname` of a connection string, without user or password, for messages.
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(config) => {
            let host = config
                .get_hosts()
                .first()
                .map(|host| match host {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .unwrap_or_default();
            let port = config.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
        }
        Err(_) => "an unparsable PostgreSQL URL".to_string(),
    }
}

/// Connects to `url` and spawns the connection driver; the watch turns `true` when the
/// connection has closed (for whatever reason).
pub(crate) async fn connect(url: &str) -> Result<(Client, watch::Receiver<bool>), StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| StoreError::PgConnect {
            target: describe(url),
            source,
        })?;
    let (closed_tx, closed_rx) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::error!(%err, "PostgreSQL connection failed");
        }
        let _ = closed_tx.send(true);
    });
    Ok((client, closed_rx))
}

/// Resolves once the connection watched by `closed` has closed.
pub(crate) async fn wait_closed(mut closed: watch::Receiver<bool>) {
    // An error means the driver task is gone: closed too.
    let _ = closed.wait_for(|closed| *closed).await;
}

/// PostgreSQL-backed store; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct PgStore {
    client: Arc<Mutex<Client>>,
    closed: watch::Receiver<bool>,
}

fn pg(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Pg { operation, source }
}

/// BIGINT columns hold u64 counters; they are never negative.
fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

/// u64 counters into BIGINT (saturating: a counter beyond i64 is not a real case).
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn run_from_row(row: &Row) -> Result<RunRecord, tokio_postgres::Error> {
    Ok(RunRecord {
        id: row.try_get(0)?,
        title: row.try_get(1)?,
        state: row.try_get(2)?,
        plan_yaml: row.try_get(3)?,
        operator: row.try_get(4)?,
        created_ms: row.try_get(5)?,
        finished_ms: row.try_get(6)?,
        reason: row.try_get(7)?,
    })
}

/// Next sequence number of a run's timeline.
async fn next_seq(client: &impl GenericClient, run_id: &str) -> Result<i64, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id = $1",
            &[&run_id],
        )
        .await?
        .try_get(0)
}

impl PgStore {
    /// Connects and migrates.
    pub(crate) async fn open(url: &str) -> Result<Self, StoreError> {
        let (mut client, closed) = connect(url).await?;
        migrate(&mut client).await?;
        Ok(Self {
            client: Arc::new(Mutex::new(client)),
            closed,
        })
    }

    /// Resolves when the connection has closed: nothing can be stored any more.
    pub(crate) async fn lost(&self) {
        wait_closed(self.closed.clone()).await;
    }

    pub(crate) async fn audit(
        &self,
        at_ms: i64,
        actor: &str,
        action: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let client = self.client.lock().await;
        client
            .execute(
                "INSERT INTO audit (at_ms, actor, action, outcome, detail) VALUES ($1,$2,$3,$4,$5)",
                &[&at_ms, &actor, &action, &outcome, &detail],
            )
            .await
            .map_err(pg("writing audit entry"))?;
        Ok(())
    }

    pub(crate) async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let client = self.client.lock().await;
        let rows = client
            .query(
                "SELECT id, at_ms, actor, action, outcome, detail FROM audit
                 ORDER BY id DESC LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
            .map_err(pg("listing audit entries"))?;
        let mut entries = rows
            .iter()
            .map(|row| {
                Ok(AuditRecord {
                    id: unsigned(row.try_get(0)?),
                    at_ms: row.try_get(1)?,
                    actor: row.try_get(2)?,
                    action: row.try_get(3)?,
                    outcome: row.try_get(4)?,
                    detail: row.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg("listing audit entries"))?;
        entries.reverse();
        Ok(entries)
    }

    pub(crate) async fn upsert_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        let client = self.client.lock().await;
        client
            .execute(
                "INSERT INTO agents (name, version, host_json, capabilities_json, first_seen_ms,
                                     last_seen_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET version = excluded.version,
                     host_json = excluded.host_json,
                     capabilities_json = excluded.capabilities_json,
                     last_seen_ms = excluded.last_seen_ms",
                &[
                    &record.name,
                    &record.version,
                    &record.host_json,
                    &record.capabilities_json,
                    &record.first_seen_ms,
                    &record.last_seen_ms,
                ],
            )
            .await
            .map_err(pg("recording agent"))?;
        Ok(())
    }

    pub(crate) async fn touch_agent(
        &self,
        name: &str,
        last_seen_ms: i64,
    ) -> Result<(), StoreError> {
        let client = self.client.lock().await;
        client
            .execute(
                "UPDATE agents SET last_seen_ms = $2 WHERE name = $1",
                &[&name, &last_seen_ms],
            )
            .await
            .map_err(pg("updating agent last-seen"))?;
        Ok(())
    }

    pub(crate) async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let client = self.client.lock().await;
        let rows = client
            .query(
                "SELECT name, version, host_json, capabilities_json, first_seen_ms, last_seen_ms
                 FROM agents ORDER BY name",
                &[],
            )
            .await
            .map_err(pg("listing agents"))?;
        rows.iter()
            .map(|row| {
                Ok(AgentRecord {
                    name: row.try_get(0)?,
                    version: row.try_get(1)?,
                    host_json: row.try_get(2)?,
                    capabilities_json: row.try_get(3)?,
                    first_seen_ms: row.try_get(4)?,
                    last_seen_ms: row.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg("listing agents"))
    }

    pub(crate) async fn create_run(&self, run: RunRecord) -> Result<(), StoreError> {
        let client = self.client.lock().await;
        client
            .execute(
                "INSERT INTO runs (id, title, state, plan_yaml, operator, created_ms, finished_ms,
                                   reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &run.id,
                    &run.title,
                    &run.state,
                    &run.plan_yaml,
                    &run.operator,
                    &run.created_ms,
                    &run.finished_ms,
                    &run.reason,
                ],
            )
            .await
            .map_err(pg("creating run"))?;
        Ok(())
    }

    pub(crate) async fn append_event(
        &self,
        run_id: &str,
        mut event: RunEventRecord,
    ) -> Result<RunEventRecord, StoreError> {
        let operation = "appending run event";
        let mut client = self.client.lock().await;
        let tx = client.transaction().await.map_err(pg(operation))?;
        let next = next_seq(&tx, run_id).await.map_err(pg(operation))?;
        event.seq = unsigned(next);
        tx.execute(
            "INSERT INTO run_events (run_id, seq, at_ms, kind, stage, agent, fault_id, message)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &run_id,
                &next,
                &event.at_ms,
                &event.kind,
                &event.stage,
                &event.agent,
                &event.fault_id,
                &event.message,
            ],
        )
        .await
        .map_err(pg(operation))?;
        tx.commit().await.map_err(pg(operation))?;
        Ok(event)
    }

    pub(crate) async fn append_probe_samples(
        &self,
        run_id: &str,
        samples: Vec<ProbeSampleRecord>,
    ) -> Result<usize, StoreError> {
        if samples.is_empty() {
            return Ok(0);
        }
        let operation = "storing probe samples";
        let mut client = self.client.lock().await;
        let tx = client.transaction().await.map_err(pg(operation))?;
        let stmt = tx
            .prepare(
                "INSERT INTO probe_samples (run_id, probe, at_ms, ok, latency_ms, value, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await
            .map_err(pg(operation))?;
        for sample in &samples {
            let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
            let detail = cap_detail(&sample.detail, MAX_PROBE_DETAIL_LEN);
            tx.execute(
                &stmt,
                &[
                    &run_id,
                    &sample.probe,
                    &sample.at_ms,
                    &sample.ok,
                    &finite(sample.latency_ms),
                    &finite(sample.value),
                    &detail,
                ],
            )
            .await
            .map_err(pg(operation))?;
        }
        tx.commit().await.map_err(pg(operation))?;
        Ok(samples.len())
    }

    pub(crate) async fn probe_samples(
        &self,
        run_id: &str,
        limit: usize,
    ) -> Result<Vec<ProbeSampleRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client.lock().await;
        let rows = client
            .query(
                "SELECT probe, at_ms, ok, latency_ms, value, detail FROM probe_samples
                 WHERE run_id = $1 ORDER BY at_ms, id LIMIT $2",
                &[&run_id, &limit],
            )
            .await
            .map_err(pg("reading probe samples"))?;
        rows.iter()
            .map(|row| {
                Ok(ProbeSampleRecord {
                    probe: row.try_get(0)?,
                    at_ms: row.try_get(1)?,
                    ok: row.try_get(2)?,
                    latency_ms: row.try_get(3)?,
                    value: row.try_get(4)?,
                    detail: row.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg("reading probe samples"))
    }

    pub(crate) async fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let finished = state.is_final().then_some(at_ms);
        let client = self.client.lock().await;
        client
            .execute(
                "UPDATE runs SET state = $2, reason = $3, finished_ms = $4 WHERE id = $1",
                &[&run_id, &state.as_str(), &reason, &finished],
            )
            .await
            .map_err(pg("updating run state"))?;
        Ok(())
    }

    pub(crate) async fn list_runs(&self, limit: u32) -> Result<Vec<RunRecord>, StoreError> {
        let client = self.client.lock().await;
        let rows = client
            .query(
                "SELECT id, title, state, plan_yaml, operator, created_ms, finished_ms, reason
                 FROM runs ORDER BY created_ms DESC, id DESC LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
            .map_err(pg("listing runs"))?;
        rows.iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pg("listing runs"))
    }

    pub(crate) async fn run_record(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        let client = self.client.lock().await;
        let row = client
            .query_opt(
                "SELECT id, title, state, plan_yaml, operator, created_ms, finished_ms, reason
                 FROM runs WHERE id = $1",
                &[&run_id],
            )
            .await
            .map_err(pg("reading run"))?;
        row.as_ref()
            .map(run_from_row)
            .transpose()
            .map_err(pg("reading run"))
    }

    pub(crate) async fn get_run(
        &self,
        run_id: &str,
    ) -> Result<Option<(RunRecord, Vec<RunEventRecord>)>, StoreError> {
        let Some(run) = self.run_record(run_id).await? else {
            return Ok(None);
        };
        let client = self.client.lock().await;
        let rows = client
            .query(
                "SELECT seq, at_ms, kind, stage, agent, fault_id, message FROM run_events
                 WHERE run_id = $1 ORDER BY seq",
                &[&run_id],
            )
            .await
            .map_err(pg("reading run"))?;
        let events = rows
            .iter()
            .map(|row| {
                Ok(RunEventRecord {
                    seq: unsigned(row.try_get(0)?),
                    at_ms: row.try_get(1)?,
                    kind: row.try_get(2)?,
                    stage: row.try_get(3)?,
                    agent: row.try_get(4)?,
                    fault_id: row.try_get(5)?,
                    message: row.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg("reading run"))?;
        Ok(Some((run, events)))
    }

    pub(crate) async fn abort_unfinished_runs(
        &self,
        reason: &str,
        at_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let operation = "aborting unfinished runs";
        let mut client = self.client.lock().await;
        let tx = client.transaction().await.map_err(pg(operation))?;
        let ids = tx
            .query(
                "SELECT id FROM runs WHERE state = 'running' ORDER BY created_ms, id FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg(operation))?
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(pg(operation))?;
        for id in &ids {
            tx.execute(
                "UPDATE runs SET state = 'aborted', reason = $2, finished_ms = $3 WHERE id = $1",
                &[id, &reason, &at_ms],
            )
            .await
            .map_err(pg(operation))?;
            let next = next_seq(&tx, id).await.map_err(pg(operation))?;
            tx.execute(
                "INSERT INTO run_events (run_id, seq, at_ms, kind, stage, agent, fault_id, message)
                 VALUES ($1, $2, $3, 'run-aborted', '', '', '', $4)",
                &[id, &next, &at_ms, &reason],
            )
            .await
            .map_err(pg(operation))?;
        }
        tx.commit().await.map_err(pg(operation))?;
        Ok(ids)
    }

    pub(crate) async fn halt_state(&self) -> Result<HaltRecord, StoreError> {
        let client = self.client.lock().await;
        let row = client
            .query_one(
                "SELECT halted, reason, since_ms FROM halt WHERE id = 1",
                &[],
            )
            .await
            .map_err(pg("reading halt switch"))?;
        (|| {
            Ok(HaltRecord {
                halted: row.try_get(0)?,
                reason: row.try_get(1)?,
                since_ms: row.try_get(2)?,
            })
        })()
        .map_err(pg("reading halt switch"))
    }

    pub(crate) async fn set_halt(&self, record: HaltRecord) -> Result<(), StoreError> {
        let client = self.client.lock().await;
        client
            .execute(
                "UPDATE halt SET halted = $1, reason = $2, since_ms = $3 WHERE id = 1",
                &[&record.halted, &record.reason, &record.since_ms],
            )
            .await
            .map_err(pg("setting halt switch"))?;
        Ok(())
    }

    pub(crate) async fn append_telemetry(
        &self,
        write: TelemetryWrite,
        merge: fn(&[u8], &[u8]) -> Vec<u8>,
        limits: TelemetryLimits,
    ) -> Result<TelemetryStored, StoreError> {
        let operation = "storing telemetry";
        let e = pg(operation);
        let mut client = self.client.lock().await;
        let tx = client.transaction().await.map_err(pg(operation))?;
        let result: Result<TelemetryStored, tokio_postgres::Error> = async {
            let known = tx
                .query_opt(
                    "SELECT last_seq, notes FROM telemetry_agents
                     WHERE run_id = $1 AND agent = $2 FOR UPDATE",
                    &[&write.run_id, &write.agent],
                )
                .await?
                .map(|row| {
                    Ok::<_, tokio_postgres::Error>((
                        row.try_get::<_, i64>(0)?,
                        row.try_get::<_, String>(1)?,
                    ))
                })
                .transpose()?;
            let seq = signed(write.seq);
            let mut notes: Vec<String> = Vec::new();
            match &known {
                Some((last_seq, _)) if seq <= *last_seq => {
                    return Ok(TelemetryStored::Duplicate);
                }
                Some((last_seq, stored)) => {
                    notes = stored.lines().map(str::to_string).collect();
                    tx.execute(
                        "UPDATE telemetry_agents SET seq_gaps = seq_gaps + $3
                         WHERE run_id = $1 AND agent = $2",
                        &[&write.run_id, &write.agent, &(seq - last_seq - 1)],
                    )
                    .await?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO telemetry_agents (run_id, agent, first_ms, last_seq, seq_gaps,
                                                       sources, drops, notes)
                         VALUES ($1, $2, $3, 0, $4, '', '', '')",
                        &[
                            &write.run_id,
                            &write.agent,
                            &write.received_ms,
                            &signed(write.seq.saturating_sub(1)),
                        ],
                    )
                    .await?;
                }
            }
            for note in &write.notes {
                if notes.len() < limits.notes_per_agent && !notes.contains(note) {
                    notes.push(note.replace('\n', " "));
                }
            }
            let mut samples_not_stored = 0i64;
            let mut count: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM telemetry_samples WHERE run_id = $1",
                    &[&write.run_id],
                )
                .await?
                .try_get(0)?;
            for sample in &write.samples {
                let stored: Option<Vec<u8>> = tx
                    .query_opt(
                        "SELECT data FROM telemetry_samples
                         WHERE run_id = $1 AND agent = $2 AND target = $3 AND bucket_ms = $4",
                        &[
                            &write.run_id,
                            &sample.agent,
                            &sample.target,
                            &sample.bucket_ms,
                        ],
                    )
                    .await?
                    .map(|row| row.try_get(0))
                    .transpose()?;
                match stored {
                    Some(stored) => {
                        let merged = merge(&stored, &sample.data);
                        tx.execute(
                            "UPDATE telemetry_samples SET data = $5
                             WHERE run_id = $1 AND agent = $2 AND target = $3 AND bucket_ms = $4",
                            &[
                                &write.run_id,
                                &sample.agent,
                                &sample.target,
                                &sample.bucket_ms,
                                &merged,
                            ],
                        )
                        .await?;
                    }
                    None if count >= signed(limits.samples_per_run) => samples_not_stored += 1,
                    None => {
                        tx.execute(
                            "INSERT INTO telemetry_samples (run_id, agent, target, bucket_ms,
                                                            width_ms, data)
                             VALUES ($1, $2, $3, $4, $5, $6)",
                            &[
                                &write.run_id,
                                &sample.agent,
                                &sample.target,
                                &sample.bucket_ms,
                                &sample.width_ms,
                                &sample.data,
                            ],
                        )
                        .await?;
                        count += 1;
                    }
                }
            }
            let mut events_not_stored = 0i64;
            let mut per_kind: std::collections::BTreeMap<String, i64> = Default::default();
            for event in &write.events {
                let stored = match per_kind.get(&event.kind) {
                    Some(n) => *n,
                    None => tx
                        .query_one(
                            "SELECT COUNT(*) FROM telemetry_events WHERE run_id = $1 AND kind = $2",
                            &[&write.run_id, &event.kind],
                        )
                        .await?
                        .try_get(0)?,
                };
                if stored >= signed(limits.events_per_kind) {
                    events_not_stored += 1;
                    per_kind.insert(event.kind.clone(), stored);
                    continue;
                }
                tx.execute(
                    "INSERT INTO telemetry_events (run_id, agent, kind, at_ms, data)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &write.run_id,
                        &event.agent,
                        &event.kind,
                        &event.at_ms,
                        &event.data,
                    ],
                )
                .await?;
                per_kind.insert(event.kind.clone(), stored + 1);
            }
            let notes = notes.join("\n");
            let params: [&(dyn ToSql + Sync); 8] = [
                &write.run_id,
                &write.agent,
                &seq,
                &write.sources,
                &write.drops,
                &notes,
                &samples_not_stored,
                &events_not_stored,
            ];
            tx.execute(
                "UPDATE telemetry_agents SET last_seq = $3, sources = $4, drops = $5, notes = $6,
                        samples_not_stored = samples_not_stored + $7,
                        events_not_stored = events_not_stored + $8
                 WHERE run_id = $1 AND agent = $2",
                &params,
            )
            .await?;
            Ok(TelemetryStored::Stored)
        }
        .await;
        let stored = result.map_err(e)?;
        // A duplicate changed nothing: committing is as good as rolling back.
        tx.commit().await.map_err(pg(operation))?;
        Ok(stored)
    }

    pub(crate) async fn telemetry(
        &self,
        run_id: &str,
        since_ms: i64,
    ) -> Result<TelemetryRead, StoreError> {
        let operation = "reading telemetry";
        let client = self.client.lock().await;
        let agents = client
            .query(
                "SELECT agent, first_ms, last_seq, seq_gaps, sources, drops, notes,
                        samples_not_stored, events_not_stored
                 FROM telemetry_agents WHERE run_id = $1 ORDER BY agent",
                &[&run_id],
            )
            .await
            .map_err(pg(operation))?
            .iter()
            .map(|row| {
                let notes: String = row.try_get(6)?;
                Ok(TelemetryAgentRow {
                    agent: row.try_get(0)?,
                    first_ms: row.try_get(1)?,
                    last_seq: unsigned(row.try_get(2)?),
                    seq_gaps: unsigned(row.try_get(3)?),
                    sources: row.try_get(4)?,
                    drops: row.try_get(5)?,
                    notes: notes
                        .lines()
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect(),
                    samples_not_stored: unsigned(row.try_get(7)?),
                    events_not_stored: unsigned(row.try_get(8)?),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg(operation))?;
        let samples = client
            .query(
                "SELECT agent, target, bucket_ms, width_ms, data FROM telemetry_samples
                 WHERE run_id = $1 AND bucket_ms >= $2 ORDER BY bucket_ms, agent, target",
                &[&run_id, &since_ms],
            )
            .await
            .map_err(pg(operation))?
            .iter()
            .map(|row| {
                Ok(TelemetrySampleRow {
                    agent: row.try_get(0)?,
                    target: row.try_get(1)?,
                    bucket_ms: row.try_get(2)?,
                    width_ms: row.try_get(3)?,
                    data: row.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg(operation))?;
        let events = client
            .query(
                "SELECT agent, kind, at_ms, data FROM telemetry_events
                 WHERE run_id = $1 AND at_ms >= $2 ORDER BY at_ms, id",
                &[&run_id, &since_ms],
            )
            .await
            .map_err(pg(operation))?
            .iter()
            .map(|row| {
                Ok(TelemetryEventRow {
                    agent: row.try_get(0)?,
                    kind: row.try_get(1)?,
                    at_ms: row.try_get(2)?,
                    data: row.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg(operation))?;
        Ok(TelemetryRead {
            agents,
            samples,
            events,
        })
    }
}

/// Applies the missing migrations, serialised across replicas by an advisory lock held for
/// the transaction.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client
        .transaction()
        .await
        .map_err(|source| StoreError::PgMigrate { version: 0, source })?;
    let setup = async {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS faultline_schema (version INTEGER NOT NULL)")
            .await?;
        let current: Option<i32> = tx
            .query_one("SELECT MAX(version) FROM faultline_schema", &[])
            .await?
            .try_get(0)?;
        Ok::<_, tokio_postgres::Error>(current.unwrap_or(0))
    };
    let current = setup
        .await
        .map_err(|source| StoreError::PgMigrate { version: 0, source })?;
    let start = usize::try_from(current).unwrap_or(0);
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(start) {
        let version = index as u32 + 1;
        let err = |source| StoreError::PgMigrate { version, source };
        tx.batch_execute(migration).await.map_err(err)?;
        tx.execute(
            "INSERT INTO faultline_schema (version) VALUES ($1)",
            &[&i32::try_from(version).unwrap_or(i32::MAX)],
        )
        .await
        .map_err(err)?;
    }
    tx.commit().await.map_err(|source| StoreError::PgMigrate {
        version: MIGRATIONS.len() as u32,
        source,
    })
}
