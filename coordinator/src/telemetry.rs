//! Run telemetry: kernel evidence of what a run's faults do to its targets.
//!
//! - [`TelemetrySubscription`] asks every agent of a run, with a signed `TelemetrySubscribe`
//!   command at the start of the run, for telemetry about the run's targets on its host, and
//!   unsubscribes at its end.
//! - [`TelemetryService`] serves `AgentTelemetry.Stream`: agents (agent certificates only) send
//!   one `TelemetryBatch` per run and interval; each is stored and acknowledged. The
//!   acknowledgement says `stop` once the run is over (batches are still taken for
//!   [`GRACE`] after its end, so the last interval is kept), for an unknown run, and for a run
//!   the agent has no fault in: the acknowledgements are the subscription's lease.
//! - Storage is downsampled: one row per (agent, target, time bucket) holding the merged
//!   aggregates (1 s buckets for the first hour of a run, 10 s up to six hours, then 60 s;
//!   [`bucket_width`]); at most [`LIMITS`] rows and events per run (the first events of each
//!   kind are kept, later ones counted). A batch resent after a lost stream is recognised by
//!   its sequence number and stored once; a gap in the sequence counts the batches lost.
//! - [`run_telemetry`] reads it back for `GetRun` (reports) and `GetTelemetry`
//!   (`faultline telemetry RUN --follow`), coarsening buckets until the answer fits its budget.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline_domain::fault::TargetSelector;
use faultline_domain::plan::{Plan, TelemetryPoint, errno_name, parse_plan};
use faultline_proto::v1 as pb;
use faultline_tls::identity::{Role, peer_identity};
use futures::Stream;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::Auditor;
use crate::clock::now_ms;
use crate::hub::HubHandle;
use crate::store::{
    RunState, Store, StoreError, TelemetryEventRow, TelemetryLimits, TelemetryRead,
    TelemetrySampleRow, TelemetryStored, TelemetryWrite,
};
use crate::wire::target_to_wire;

/// The aggregation interval asked of agents.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Batches of a run are still stored this long after it ended (the agents' last batches).
pub const GRACE: Duration = Duration::from_secs(15);
/// What one run may store.
pub const LIMITS: TelemetryLimits = TelemetryLimits {
    samples_per_run: 200_000,
    events_per_kind: 2_000,
    notes_per_agent: 50,
};
/// Bytes of telemetry a `GetRun` answer holds at most (buckets are coarsened to fit).
pub const GET_RUN_BUDGET: usize = 1 << 20;
/// Bytes of a `GetTelemetry` answer at most.
pub const QUERY_BUDGET: usize = 3 << 20;
/// Slack added to a plan's longest possible duration for the subscription's own limit.
const DURATION_SLACK: Duration = Duration::from_secs(600);
/// The longest subscription the agents accept.
const MAX_SUBSCRIPTION: Duration = Duration::from_secs(24 * 3600);

/// The width of the time buckets of a run `age_ms` after its creation.
pub fn bucket_width(age_ms: i64) -> i64 {
    const HOUR: i64 = 3_600_000;
    if age_ms < HOUR {
        1_000
    } else if age_ms < 6 * HOUR {
        10_000
    } else {
        60_000
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriptions.

/// The targets each agent of `plan` faults, each once, in plan order.
pub fn targets_by_agent(plan: &Plan) -> BTreeMap<String, Vec<TargetSelector>> {
    let mut targets: BTreeMap<String, Vec<TargetSelector>> = BTreeMap::new();
    for fault in plan.stages.iter().flat_map(|stage| &stage.faults) {
        let list = targets.entry(fault.agent.clone()).or_default();
        if !list.contains(&fault.spec.target) {
            list.push(fault.spec.target.clone());
        }
    }
    targets
}

/// An upper bound of how long a run of `plan` can last, plus slack: the subscription's own
/// limit, should its unsubscribe never come.
pub fn max_duration(plan: &Plan) -> Duration {
    let baseline = plan
        .steady_state
        .as_ref()
        .map_or(Duration::ZERO, |s| s.baseline);
    let stages: Duration = plan
        .stages
        .iter()
        .map(|stage| {
            let longest = stage
                .faults
                .iter()
                .map(|f| f.spec.duration)
                .max()
                .unwrap_or_default();
            let wait = stage.when.as_ref().map_or(Duration::ZERO, |w| w.timeout);
            stage.after + wait + longest + Duration::from_secs(30)
        })
        .sum();
    (baseline * 2 + stages + DURATION_SLACK).min(MAX_SUBSCRIPTION)
}

/// A run's telemetry subscriptions, from its start to its end.
#[derive(Debug)]
pub struct TelemetrySubscription {
    run_id: String,
    agents: Vec<String>,
}

impl TelemetrySubscription {
    /// Asks every agent of `plan` for telemetry about its targets. Never fails the run: an
    /// agent that cannot be asked is logged, and the report shows no telemetry from it.
    pub async fn start(hub: &HubHandle, run_id: &str, plan: &Plan) -> Self {
        let max_duration = u64::try_from(max_duration(plan).as_millis()).unwrap_or(u64::MAX);
        let mut agents = Vec::new();
        for (agent, targets) in targets_by_agent(plan) {
            let action = pb::command::Action::TelemetrySubscribe(pb::TelemetrySubscribe {
                targets: targets.iter().map(target_to_wire).collect(),
                interval_ms: u32::try_from(INTERVAL.as_millis()).unwrap_or(1000),
                max_duration_ms: max_duration,
            });
            match hub.send(&agent, run_id, action).await {
                Ok(_) => agents.push(agent),
                Err(err) => {
                    tracing::warn!(run = %run_id, %agent, %err, "telemetry not subscribed");
                }
            }
        }
        Self {
            run_id: run_id.to_string(),
            agents,
        }
    }

    /// Ends the subscriptions; the agents send a last batch each.
    pub async fn stop(self, hub: &HubHandle) {
        for agent in &self.agents {
            let action = pb::command::Action::TelemetryUnsubscribe(pb::TelemetryUnsubscribe {});
            if let Err(err) = hub.send(agent, &self.run_id, action).await {
                // The agent stops by itself: its acknowledgements now say stop.
                tracing::info!(run = %self.run_id, %agent, %err, "telemetry unsubscribe not sent");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The AgentTelemetry service.

/// Serves `AgentTelemetry.Stream`.
#[derive(Debug, Clone)]
pub struct TelemetryService {
    pub auditor: Auditor,
    /// Accepted batches of runs in progress also go here, for their conditions.
    pub live: LiveTelemetry,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::TelemetryAck, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_telemetry_server::AgentTelemetry for TelemetryService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::TelemetryBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let identity = match peer_identity(&request) {
            Ok(identity) => identity,
            Err(status) => {
                self.auditor
                    .refused(&format!("tls {peer}"), "telemetry", status.message())
                    .await;
                return Err(status);
            }
        };
        if identity.role != Role::Agent {
            let why = format!("{identity} may not send telemetry: agent certificate required");
            self.auditor
                .refused(&identity.to_string(), "telemetry", &why)
                .await;
            return Err(Status::permission_denied(why));
        }
        let agent = identity.name.clone();
        let store = self.auditor.store().clone();
        let live = self.live.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut runs = RunCache::default();
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(batch) => {
                        let watched = live.is_watched(&batch.run_id).then(|| batch.clone());
                        let ack = accept(&store, &agent, batch, &mut runs, now_ms()).await;
                        // `stop` also refuses strangers: only accepted batches feed conditions.
                        if let Some(batch) = watched
                            && !ack.stop
                        {
                            live.record(&agent, &batch);
                        }
                        if tx.send(Ok(ack)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        tracing::debug!(%agent, %status, "telemetry stream ended");
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a stream knows about the runs its agent sends batches for.
#[derive(Debug, Default)]
pub struct RunCache {
    /// Run id -> (created at, whether the agent has a fault in the run).
    runs: HashMap<String, (i64, bool)>,
}

/// Stores `batch` from `agent` if its run takes telemetry from it, and says whether to go on.
pub async fn accept(
    store: &Store,
    agent: &str,
    batch: pb::TelemetryBatch,
    runs: &mut RunCache,
    now: i64,
) -> pb::TelemetryAck {
    let mut ack = pb::TelemetryAck {
        run_id: batch.run_id.clone(),
        seq: batch.seq,
        stop: false,
        reason: String::new(),
    };
    let run = match store.run_record(&batch.run_id).await {
        Ok(Some(run)) => run,
        Ok(None) => {
            ack.stop = true;
            ack.reason = format!("no run {}", batch.run_id);
            return ack;
        }
        Err(err) => {
            // Not stored; the next batch's sequence number shows the gap.
            tracing::error!(%err, run = %batch.run_id, "telemetry batch not stored");
            return ack;
        }
    };
    let (created_ms, member) = *runs.runs.entry(run.id.clone()).or_insert_with(|| {
        let member = parse_plan(&run.plan_yaml)
            .map(|plan| plan.agents().contains(agent))
            .unwrap_or(false);
        (run.created_ms, member)
    });
    if !member {
        tracing::warn!(%agent, run = %run.id, "telemetry from an agent without faults in the run");
        ack.stop = true;
        ack.reason = format!("agent {agent} has no fault in run {}", run.id);
        return ack;
    }
    if run.state != RunState::Running.as_str() {
        ack.stop = true;
        ack.reason = format!("run {} is {}", run.id, run.state);
        let finished = run.finished_ms.unwrap_or(now);
        if now - finished > i64::try_from(GRACE.as_millis()).unwrap_or(i64::MAX) {
            return ack;
        }
    }
    let write = to_write(created_ms, agent, &batch, now);
    match store.append_telemetry(write, merge_encoded, LIMITS).await {
        Ok(TelemetryStored::Stored | TelemetryStored::Duplicate) => {}
        Err(err) => {
            tracing::error!(%err, run = %batch.run_id, %agent, "telemetry batch not stored")
        }
    }
    ack
}

/// The rows a batch becomes: its targets in the bucket of the interval's middle.
pub fn to_write(
    created_ms: i64,
    agent: &str,
    batch: &pb::TelemetryBatch,
    now: i64,
) -> TelemetryWrite {
    let middle = batch.from_unix_ms + (batch.to_unix_ms - batch.from_unix_ms).max(0) / 2;
    let width = bucket_width(middle - created_ms);
    let bucket_ms = middle - middle.rem_euclid(width);
    TelemetryWrite {
        run_id: batch.run_id.clone(),
        agent: agent.to_string(),
        seq: batch.seq,
        received_ms: now,
        sources: pb::AgentTelemetrySources {
            agent: agent.to_string(),
            sources: batch.sources.clone(),
        }
        .encode_to_vec(),
        drops: batch.drops.unwrap_or_default().encode_to_vec(),
        notes: batch.notes.clone(),
        samples: batch
            .targets
            .iter()
            .map(|target| TelemetrySampleRow {
                agent: agent.to_string(),
                target: target.name.clone(),
                bucket_ms,
                width_ms: width,
                data: target.encode_to_vec(),
            })
            .collect(),
        events: batch
            .events
            .iter()
            .map(|event| TelemetryEventRow {
                agent: agent.to_string(),
                kind: event.kind.clone(),
                at_ms: event.at_unix_ms,
                data: event.encode_to_vec(),
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Merging aggregates.

/// Two encoded `TargetTelemetry` of one bucket merged (an undecodable side is dropped).
pub fn merge_encoded(stored: &[u8], new: &[u8]) -> Vec<u8> {
    match (
        pb::TargetTelemetry::decode(stored),
        pb::TargetTelemetry::decode(new),
    ) {
        (Ok(mut into), Ok(other)) => {
            merge_target(&mut into, &other);
            into.encode_to_vec()
        }
        (Ok(_), Err(_)) => stored.to_vec(),
        (Err(_), _) => new.to_vec(),
    }
}

fn add_opt(into: &mut Option<u64>, other: Option<u64>) {
    if let Some(other) = other {
        *into = Some(into.unwrap_or(0) + other);
    }
}

fn merge_errnos(into: &mut Vec<pb::ErrnoCount>, other: &[pb::ErrnoCount]) {
    for e in other {
        match into.iter_mut().find(|x| x.errno == e.errno) {
            Some(x) => x.count += e.count,
            None => into.push(*e),
        }
    }
    into.sort_by_key(|e| e.errno);
}

/// Adds `other` to `into`.
pub fn merge_histogram(into: &mut pb::Log2Histogram, other: &pb::Log2Histogram) {
    if into.buckets.len() < other.buckets.len() {
        into.buckets.resize(other.buckets.len(), 0);
    }
    for (i, n) in other.buckets.iter().enumerate() {
        into.buckets[i] += n;
    }
    into.count += other.count;
    into.sum_ns += other.sum_ns;
    into.max_ns = into.max_ns.max(other.max_ns);
}

/// Adds the aggregates of `other` (the same target, another interval) to `into`.
pub fn merge_target(into: &mut pb::TargetTelemetry, other: &pb::TargetTelemetry) {
    for (mine, theirs) in [
        (&mut into.name, &other.name),
        (&mut into.selector, &other.selector),
        (&mut into.cgroup, &other.cgroup),
    ] {
        if !theirs.is_empty() {
            mine.clone_from(theirs);
        }
    }
    for row in &other.tcp {
        match into
            .tcp
            .iter_mut()
            .find(|r| (r.inbound, &r.peer, r.port) == (row.inbound, &row.peer, row.port))
        {
            Some(r) => {
                r.active_established += row.active_established;
                r.passive_established += row.passive_established;
                r.retransmits += row.retransmits;
                r.syn_retransmits += row.syn_retransmits;
                r.resets_sent += row.resets_sent;
                r.resets_received += row.resets_received;
                merge_errnos(&mut r.connect_failed, &row.connect_failed);
                merge_errnos(&mut r.connection_errors, &row.connection_errors);
            }
            None => into.tcp.push(row.clone()),
        }
    }
    if let Some(theirs) = &other.sched {
        let mine = into.sched.get_or_insert_with(Default::default);
        mine.switches += theirs.switches;
        mine.involuntary_switches += theirs.involuntary_switches;
        if let Some(h) = &theirs.runq_latency {
            merge_histogram(mine.runq_latency.get_or_insert_with(Default::default), h);
        }
    }
    for row in &other.block {
        match into.block.iter_mut().find(|r| r.device == row.device) {
            Some(r) => {
                r.read_bytes += row.read_bytes;
                r.write_bytes += row.write_bytes;
                r.read_ops += row.read_ops;
                r.write_ops += row.write_ops;
                r.errors += row.errors;
                if let Some(h) = &row.latency {
                    merge_histogram(r.latency.get_or_insert_with(Default::default), h);
                }
            }
            None => into.block.push(row.clone()),
        }
    }
    for exit in &other.exits {
        match into
            .exits
            .iter_mut()
            .find(|e| (&e.comm, e.code, e.signal) == (&exit.comm, exit.code, exit.signal))
        {
            Some(e) => e.count += exit.count,
            None => into.exits.push(exit.clone()),
        }
    }
    into.execs += other.execs;
    into.oom_kills += other.oom_kills;
    if let Some(theirs) = &other.fallback {
        let mine = into.fallback.get_or_insert_with(Default::default);
        add_opt(&mut mine.retrans_segs, theirs.retrans_segs);
        add_opt(&mut mine.attempt_fails, theirs.attempt_fails);
        add_opt(&mut mine.estab_resets, theirs.estab_resets);
        add_opt(&mut mine.out_rsts, theirs.out_rsts);
        add_opt(&mut mine.active_opens, theirs.active_opens);
        add_opt(&mut mine.nr_periods, theirs.nr_periods);
        add_opt(&mut mine.nr_throttled, theirs.nr_throttled);
        add_opt(&mut mine.throttled_us, theirs.throttled_us);
        add_opt(&mut mine.oom_kills, theirs.oom_kills);
    }
}

// ---------------------------------------------------------------------------------------------
// Live view, for stop conditions, `when` triggers and span events.

/// How much of a run's live telemetry is kept: the longest condition window, and a bound on
/// points (one per target, agent and second).
const LIVE_KEEP_MS: i64 = 600_000;
const LIVE_MAX_POINTS: usize = 100_000;
/// OOM kills reported as notable per run at most (the report lists them all).
const LIVE_MAX_OOM_NOTES: usize = 20;

/// The recent telemetry of the runs in progress, in memory, as the runner's conditions read
/// it ([`TelemetryPoint`]), plus notable kernel events (the first connect failure, OOM kills)
/// for the run's trace and timeline. Only runs the runner watches are kept.
#[derive(Debug, Clone, Default)]
pub struct LiveTelemetry {
    runs: Arc<Mutex<HashMap<String, LiveRun>>>,
}

#[derive(Debug, Default)]
struct LiveRun {
    points: VecDeque<TelemetryPoint>,
    notable: Vec<Notable>,
    connect_failure_seen: bool,
    oom_kills_noted: usize,
}

/// A kernel event worth a span event and a line in the run's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Notable {
    pub agent: String,
    pub event: pb::TelemetryEvent,
}

impl Notable {
    /// The span event's name.
    pub fn name(&self) -> &'static str {
        if self.event.kind == "oom-kill" {
            "faultline.telemetry.oom_kill"
        } else {
            "faultline.telemetry.first_connect_failure"
        }
    }

    /// For a person: `first connect failure: ECONNREFUSED, api (pid 7, curl) -> 10.0.0.3:5432`.
    pub fn describe(&self) -> String {
        let e = &self.event;
        if e.kind == "oom-kill" {
            format!(
                "OOM kill on {}: {} (pid {}) in {}",
                self.agent, e.comm, e.pid, e.target
            )
        } else {
            format!(
                "first connect failure on {}: {} in {} ({} pid {}) to {}",
                self.agent,
                errno_name(e.errno),
                e.target,
                e.comm,
                e.pid,
                e.remote
            )
        }
    }
}

impl LiveTelemetry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveRun>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts keeping `run_id`'s telemetry.
    pub fn watch(&self, run_id: &str) {
        self.lock().entry(run_id.to_string()).or_default();
    }

    /// Stops keeping it and drops what was kept.
    pub fn forget(&self, run_id: &str) {
        self.lock().remove(run_id);
    }

    pub fn is_watched(&self, run_id: &str) -> bool {
        self.lock().contains_key(run_id)
    }

    /// Keeps an accepted batch of a watched run (others are ignored).
    pub fn record(&self, agent: &str, batch: &pb::TelemetryBatch) {
        let mut runs = self.lock();
        let Some(run) = runs.get_mut(&batch.run_id) else {
            return;
        };
        for target in &batch.targets {
            run.points.push_back(to_point(
                agent,
                batch.from_unix_ms,
                batch.to_unix_ms,
                target,
            ));
        }
        let newest = run.points.iter().map(|p| p.to_ms).max().unwrap_or(0);
        while run.points.len() > LIVE_MAX_POINTS
            || run
                .points
                .front()
                .is_some_and(|p| p.to_ms < newest - LIVE_KEEP_MS)
        {
            run.points.pop_front();
        }
        for event in &batch.events {
            let notable = match event.kind.as_str() {
                "connect-failed" if !run.connect_failure_seen => {
                    run.connect_failure_seen = true;
                    true
                }
                "oom-kill" if run.oom_kills_noted < LIVE_MAX_OOM_NOTES => {
                    run.oom_kills_noted += 1;
                    true
                }
                _ => false,
            };
            if notable {
                run.notable.push(Notable {
                    agent: agent.to_string(),
                    event: event.clone(),
                });
            }
        }
    }

    /// The kept points of `run_id`, oldest first.
    pub fn points(&self, run_id: &str) -> Vec<TelemetryPoint> {
        self.lock()
            .get(run_id)
            .map(|run| run.points.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The notable events since the last call.
    pub fn take_notable(&self, run_id: &str) -> Vec<Notable> {
        self.lock()
            .get_mut(run_id)
            .map(|run| std::mem::take(&mut run.notable))
            .unwrap_or_default()
    }
}

/// What the conditions measure of one target's interval. Fallback figures (netns-wide
/// /proc counters, cgroup files) stand in where the programs did not load; both are never set
/// for the same signal.
pub fn to_point(
    agent: &str,
    from_ms: i64,
    to_ms: i64,
    target: &pb::TargetTelemetry,
) -> TelemetryPoint {
    let fallback = target.fallback.unwrap_or_default();
    let errnos = |counts: &[pb::ErrnoCount]| counts.iter().map(|c| c.count).sum::<u64>();
    let runq = target
        .sched
        .as_ref()
        .and_then(|sched| sched.runq_latency.clone())
        .unwrap_or_default();
    TelemetryPoint {
        agent: agent.to_string(),
        target: target.name.clone(),
        selector: target.selector.clone(),
        from_ms,
        to_ms,
        retransmits: target.tcp.iter().map(|t| t.retransmits).sum::<u64>()
            + fallback.retrans_segs.unwrap_or(0),
        connect_failures: target
            .tcp
            .iter()
            .map(|t| errnos(&t.connect_failed))
            .sum::<u64>()
            + fallback.attempt_fails.unwrap_or(0),
        resets: target
            .tcp
            .iter()
            .map(|t| t.resets_sent + t.resets_received)
            .sum::<u64>()
            + fallback.estab_resets.unwrap_or(0)
            + fallback.out_rsts.unwrap_or(0),
        runq_buckets: runq.buckets,
        runq_max_ns: runq.max_ns,
        oom_kills: target.oom_kills + fallback.oom_kills.unwrap_or(0),
        crashes: target
            .exits
            .iter()
            .filter(|exit| exit.signal.is_some() || exit.code.is_some_and(|code| code != 0))
            .map(|exit| exit.count)
            .sum(),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// A run's telemetry from `since_ms` on, within `budget` bytes; `None` when no agent sent any.
pub async fn run_telemetry(
    store: &Store,
    run_id: &str,
    since_ms: i64,
    budget: usize,
) -> Result<Option<pb::RunTelemetry>, StoreError> {
    let read = store.telemetry(run_id, since_ms).await?;
    if read.agents.is_empty() {
        return Ok(None);
    }
    let mut telemetry = from_read(read);
    fit(&mut telemetry, budget);
    Ok(Some(telemetry))
}

/// The stored rows in their wire form.
pub fn from_read(read: TelemetryRead) -> pb::RunTelemetry {
    let mut telemetry = pb::RunTelemetry::default();
    let mut drops = pb::TelemetryDrops::default();
    let mut notes = BTreeSet::new();
    for agent in read.agents {
        let mut sources =
            pb::AgentTelemetrySources::decode(agent.sources.as_slice()).unwrap_or_default();
        sources.agent.clone_from(&agent.agent);
        telemetry.sources.push(sources);
        let d = pb::TelemetryDrops::decode(agent.drops.as_slice()).unwrap_or_default();
        drops.kernel_events += d.kernel_events;
        drops.kernel_map_full += d.kernel_map_full;
        drops.agent_events += d.agent_events;
        drops.batches += d.batches + agent.seq_gaps;
        telemetry.events_not_stored += agent.events_not_stored;
        telemetry.samples_not_stored += agent.samples_not_stored;
        for note in agent.notes {
            notes.insert(format!("{}: {note}", agent.agent));
        }
    }
    telemetry.drops = Some(drops);
    telemetry.notes = notes.into_iter().collect();
    telemetry.samples = read
        .samples
        .into_iter()
        .filter_map(|row| {
            let target = pb::TargetTelemetry::decode(row.data.as_slice()).ok()?;
            Some(pb::TelemetrySample {
                agent: row.agent,
                at_unix_ms: row.bucket_ms,
                width_ms: u32::try_from(row.width_ms).unwrap_or(u32::MAX),
                target: Some(target),
            })
        })
        .collect();
    telemetry.events = read
        .events
        .into_iter()
        .filter_map(|row| {
            let event = pb::TelemetryEvent::decode(row.data.as_slice()).ok()?;
            Some(pb::AgentTelemetryEvent {
                agent: row.agent,
                event: Some(event),
            })
        })
        .collect();
    telemetry
}

/// Samples regrouped into buckets of `width_ms` (at least their own), merged, oldest first.
pub fn coarsen(samples: Vec<pb::TelemetrySample>, width_ms: u32) -> Vec<pb::TelemetrySample> {
    let width = i64::from(width_ms.max(1));
    let mut merged: BTreeMap<(i64, String, String), pb::TelemetrySample> = BTreeMap::new();
    for sample in samples {
        let at = sample.at_unix_ms - sample.at_unix_ms.rem_euclid(width);
        let name = sample
            .target
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        let key = (at, sample.agent.clone(), name);
        match merged.get_mut(&key) {
            Some(into) => {
                into.width_ms = into.width_ms.max(sample.width_ms);
                if let (Some(mine), Some(theirs)) = (into.target.as_mut(), sample.target.as_ref()) {
                    merge_target(mine, theirs);
                }
            }
            None => {
                merged.insert(
                    key,
                    pb::TelemetrySample {
                        at_unix_ms: at,
                        width_ms: sample.width_ms.max(width_ms),
                        ..sample
                    },
                );
            }
        }
    }
    merged.into_values().collect()
}

/// Coarsens the buckets (doubling their width) until the answer fits `budget` bytes, then,
/// if it still does not, leaves out the latest events (counted as not stored).
pub fn fit(telemetry: &mut pb::RunTelemetry, budget: usize) {
    let mut width = telemetry
        .samples
        .iter()
        .map(|s| s.width_ms)
        .max()
        .unwrap_or(1000)
        .max(1000);
    while telemetry.encoded_len() > budget && width < 3_600_000 && telemetry.samples.len() > 1 {
        width = width.saturating_mul(2);
        let samples = std::mem::take(&mut telemetry.samples);
        telemetry.samples = coarsen(samples, width);
    }
    while telemetry.encoded_len() > budget && !telemetry.events.is_empty() {
        let keep = telemetry.events.len() / 2;
        let cut = (telemetry.events.len() - keep) as u64;
        telemetry.events.truncate(keep);
        telemetry.events_not_stored += cut;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RunRecord;

    const T0: i64 = 1_700_000_000_000;

    fn hist(buckets: &[u64]) -> pb::Log2Histogram {
        pb::Log2Histogram {
            buckets: buckets.to_vec(),
            count: buckets.iter().sum(),
            sum_ns: 1_000,
            max_ns: 500,
        }
    }

    fn target(retransmits: u64, refused: u64) -> pb::TargetTelemetry {
        pb::TargetTelemetry {
            name: "db".into(),
            selector: "container db".into(),
            cgroup: "/docker/abc".into(),
            tcp: vec![pb::TcpTelemetry {
                peer: "10.0.0.5".into(),
                port: 5432,
                retransmits,
                connect_failed: vec![pb::ErrnoCount {
                    errno: 111,
                    count: refused,
                }],
                ..Default::default()
            }],
            sched: Some(pb::SchedTelemetry {
                runq_latency: Some(hist(&[1, 2])),
                switches: 3,
                involuntary_switches: 1,
            }),
            exits: vec![pb::ExitCount {
                comm: "sleep".into(),
                code: None,
                signal: Some(9),
                count: 1,
            }],
            ..Default::default()
        }
    }

    fn batch(seq: u64, from: i64, targets: Vec<pb::TargetTelemetry>) -> pb::TelemetryBatch {
        pb::TelemetryBatch {
            run_id: "run-1".into(),
            seq,
            from_unix_ms: from,
            to_unix_ms: from + 1000,
            sources: vec![pb::TelemetrySource {
                group: "tcp".into(),
                mechanism: "bpf".into(),
                detail: "tp_btf/inet_sock_set_state".into(),
            }],
            targets,
            events: vec![pb::TelemetryEvent {
                at_unix_ms: from + 10,
                kind: "connect-failed".into(),
                target: "db".into(),
                errno: 111,
                ..Default::default()
            }],
            drops: Some(pb::TelemetryDrops {
                agent_events: seq,
                ..Default::default()
            }),
            notes: vec!["container gone: not watched".into()],
            last: false,
        }
    }

    async fn store_with_run(plan_agent: &str) -> Store {
        let store = Store::open_in_memory().unwrap();
        let plan = format!(
            "apiVersion: faultline/v1
title: t
stages:
  - name: s
    faults:
      - {{ kind: container-pause, agent: {plan_agent}, target: {{ container: db }}, duration: 3s }}
"
        );
        assert!(parse_plan(&plan).is_ok(), "{:?}", parse_plan(&plan).err());
        store
            .create_run(RunRecord {
                id: "run-1".into(),
                title: "t".into(),
                state: RunState::Running.as_str().into(),
                plan_yaml: plan,
                operator: "operator/test".into(),
                created_ms: T0,
                finished_ms: None,
                reason: String::new(),
            })
            .await
            .unwrap();
        store
    }

    #[test]
    fn buckets_widen_as_runs_age() {
        assert_eq!(bucket_width(0), 1_000);
        assert_eq!(bucket_width(3_599_999), 1_000);
        assert_eq!(bucket_width(3_600_000), 10_000);
        assert_eq!(bucket_width(6 * 3_600_000), 60_000);
        let write = to_write(T0, "agent-1", &batch(1, T0 + 1_400, vec![target(1, 1)]), T0);
        // The interval [1.4 s, 2.4 s) has its middle in the second bucket.
        assert_eq!(write.samples[0].bucket_ms, T0 + 1_000);
        let late = to_write(T0, "agent-1", &batch(1, T0 + 7_200_000, vec![]), T0);
        assert_eq!(late.events.len(), 1);
    }

    #[test]
    fn merging_adds_counters_histograms_and_exits() {
        let mut into = target(2, 1);
        let mut other = target(3, 4);
        other.tcp.push(pb::TcpTelemetry {
            inbound: true,
            port: 80,
            passive_established: 7,
            ..Default::default()
        });
        other.fallback = Some(pb::FallbackTelemetry {
            retrans_segs: Some(5),
            ..Default::default()
        });
        merge_target(&mut into, &other);
        assert_eq!(into.tcp.len(), 2);
        assert_eq!(into.tcp[0].retransmits, 5);
        assert_eq!(into.tcp[0].connect_failed[0].count, 5);
        let sched = into.sched.as_ref().unwrap();
        assert_eq!(sched.switches, 6);
        assert_eq!(sched.runq_latency.as_ref().unwrap().buckets, vec![2, 4]);
        assert_eq!(into.exits[0].count, 2);
        assert_eq!(into.fallback.unwrap().retrans_segs, Some(5));
        let encoded = merge_encoded(&target(1, 0).encode_to_vec(), &target(1, 0).encode_to_vec());
        let decoded = pb::TargetTelemetry::decode(encoded.as_slice()).unwrap();
        assert_eq!(decoded.tcp[0].retransmits, 2);
    }

    #[tokio::test]
    async fn batches_are_stored_once_merged_per_bucket_and_read_back() {
        let store = store_with_run("agent-1").await;
        let mut runs = RunCache::default();
        // Two half-second batches in the same 1 s bucket, then one resent.
        let mut first = batch(1, T0 + 2_000, vec![target(2, 1)]);
        first.to_unix_ms = T0 + 2_500;
        let mut second = batch(2, T0 + 2_500, vec![target(3, 0)]);
        second.to_unix_ms = T0 + 2_900;
        for b in [first.clone(), second, first] {
            let ack = accept(&store, "agent-1", b, &mut runs, T0 + 3_000).await;
            assert!(!ack.stop, "{ack:?}");
        }
        // Seq 5 after 2: two batches were lost on the way.
        let ack = accept(
            &store,
            "agent-1",
            batch(5, T0 + 4_000, vec![target(1, 0)]),
            &mut runs,
            T0 + 5_000,
        )
        .await;
        assert_eq!(ack.seq, 5);
        let telemetry = run_telemetry(&store, "run-1", 0, QUERY_BUDGET)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(telemetry.samples.len(), 2);
        let first_bucket = telemetry.samples[0].target.as_ref().unwrap();
        assert_eq!(telemetry.samples[0].at_unix_ms, T0 + 2_000);
        assert_eq!(
            first_bucket.tcp[0].retransmits, 5,
            "merged, the resend ignored"
        );
        assert_eq!(telemetry.events.len(), 3);
        let drops = telemetry.drops.unwrap();
        assert_eq!(drops.agent_events, 5, "the latest cumulative figure");
        assert_eq!(drops.batches, 2, "the sequence gap");
        assert_eq!(telemetry.sources[0].agent, "agent-1");
        assert_eq!(telemetry.sources[0].sources[0].mechanism, "bpf");
        assert_eq!(
            telemetry.notes,
            vec!["agent-1: container gone: not watched".to_string()]
        );
        let later = run_telemetry(&store, "run-1", T0 + 4_000, QUERY_BUDGET)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(later.samples.len(), 1);
        assert_eq!(later.events.len(), 1);
    }

    #[tokio::test]
    async fn strangers_unknown_and_finished_runs_are_told_to_stop() {
        let store = store_with_run("agent-1").await;
        // One cache per stream, and a stream is one agent's.
        let ack = accept(
            &store,
            "agent-9",
            batch(1, T0, vec![]),
            &mut RunCache::default(),
            T0,
        )
        .await;
        let mut runs = RunCache::default();
        assert!(ack.stop && ack.reason.contains("no fault"), "{ack:?}");
        let mut unknown = batch(1, T0, vec![]);
        unknown.run_id = "run-x".into();
        let ack = accept(&store, "agent-1", unknown, &mut runs, T0).await;
        assert!(ack.stop && ack.reason.contains("no run"), "{ack:?}");
        assert!(
            run_telemetry(&store, "run-1", 0, QUERY_BUDGET)
                .await
                .unwrap()
                .is_none()
        );

        store
            .finish_run("run-1", RunState::Completed, "", T0 + 10_000)
            .await
            .unwrap();
        // Within the grace period the last batch is kept, and the agent is told to stop.
        let ack = accept(
            &store,
            "agent-1",
            batch(1, T0 + 9_000, vec![target(1, 1)]),
            &mut runs,
            T0 + 11_000,
        )
        .await;
        assert!(ack.stop && ack.reason.contains("completed"), "{ack:?}");
        let ack = accept(
            &store,
            "agent-1",
            batch(2, T0 + 30_000, vec![target(1, 1)]),
            &mut runs,
            T0 + 40_000,
        )
        .await;
        assert!(ack.stop);
        let telemetry = run_telemetry(&store, "run-1", 0, QUERY_BUDGET)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            telemetry.samples.len(),
            1,
            "nothing stored after the grace period"
        );
    }

    #[test]
    fn answers_are_coarsened_to_fit_their_budget() {
        let samples: Vec<pb::TelemetrySample> = (0..600)
            .map(|i| pb::TelemetrySample {
                agent: "agent-1".into(),
                at_unix_ms: T0 + i * 1000,
                width_ms: 1000,
                target: Some(target(1, 1)),
            })
            .collect();
        let mut telemetry = pb::RunTelemetry {
            samples,
            ..Default::default()
        };
        let full = telemetry.encoded_len();
        fit(&mut telemetry, full / 5);
        assert!(telemetry.encoded_len() <= full / 5);
        assert!(telemetry.samples.len() < 600);
        let total: u64 = telemetry
            .samples
            .iter()
            .map(|s| s.target.as_ref().unwrap().tcp[0].retransmits)
            .sum();
        assert_eq!(total, 600, "coarsening keeps every count");
        let width = telemetry.samples[0].width_ms;
        assert!(width >= 8000, "{width}");
        assert_eq!(telemetry.samples[0].at_unix_ms % i64::from(width), 0);
    }

    #[test]
    fn live_telemetry_keeps_watched_runs_and_notes_the_first_failure_once() {
        let live = LiveTelemetry::default();
        // Not watched: ignored.
        live.record("agent-1", &batch(1, T0, vec![target(4, 2)]));
        assert!(live.points("run-1").is_empty());
        live.watch("run-1");
        live.record("agent-1", &batch(1, T0, vec![target(4, 2)]));
        let mut oom = batch(2, T0 + 1000, vec![target(1, 3)]);
        oom.events.push(pb::TelemetryEvent {
            kind: "oom-kill".into(),
            target: "db".into(),
            comm: "hog".into(),
            pid: 42,
            ..Default::default()
        });
        live.record("agent-1", &oom);
        let points = live.points("run-1");
        assert_eq!(points.len(), 2);
        assert_eq!(
            (
                points[0].retransmits,
                points[0].connect_failures,
                points[0].crashes
            ),
            (4, 2, 1),
            "{points:?}"
        );
        assert_eq!((points[1].from_ms, points[1].to_ms), (T0 + 1000, T0 + 2000));
        assert_eq!(points[0].runq_buckets, vec![1, 2]);
        // Two batches each with a connect failure: noted once; the OOM kill noted too.
        let notable = live.take_notable("run-1");
        let names: Vec<&str> = notable.iter().map(Notable::name).collect();
        assert_eq!(
            names,
            vec![
                "faultline.telemetry.first_connect_failure",
                "faultline.telemetry.oom_kill"
            ]
        );
        assert!(
            notable[0].describe().contains("ECONNREFUSED in db"),
            "{notable:?}"
        );
        assert!(live.take_notable("run-1").is_empty(), "taken once");
        // Points older than the longest window are let go.
        live.record(
            "agent-1",
            &batch(3, T0 + LIVE_KEEP_MS + 5_000, vec![target(0, 0)]),
        );
        assert_eq!(live.points("run-1").len(), 1);
        live.forget("run-1");
        assert!(!live.is_watched("run-1"));
    }

    #[test]
    fn fallback_figures_stand_in_for_the_programs() {
        let fallback = pb::TargetTelemetry {
            name: "db".into(),
            fallback: Some(pb::FallbackTelemetry {
                retrans_segs: Some(7),
                attempt_fails: Some(3),
                estab_resets: Some(1),
                out_rsts: Some(2),
                oom_kills: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        let point = to_point("agent-1", 0, 1000, &fallback);
        assert_eq!(
            (
                point.retransmits,
                point.connect_failures,
                point.resets,
                point.oom_kills
            ),
            (7, 3, 3, 1)
        );
        assert!(
            point.runq_buckets.is_empty(),
            "no histogram in fallback mode"
        );
    }

    #[test]
    fn plans_give_each_agent_its_targets_once_and_a_bound() {
        let plan = parse_plan(
            "apiVersion: faultline/v1\ntitle: t\nstages:\n  - name: a\n    after: 2s\n    \
             faults:\n      - { kind: container-pause, agent: agent-1, target: { container: db }, \
             duration: 3s }\n      - { kind: container-pause, agent: agent-2, target: { container: \
             api }, duration: 5s }\n  - name: b\n    faults:\n      - { kind: container-stop, \
             agent: agent-1, target: { container: db }, duration: 4s }\n",
        )
        .unwrap();
        let targets = targets_by_agent(&plan);
        assert_eq!(
            targets.get("agent-1"),
            Some(&vec![TargetSelector::Container("db".into())])
        );
        assert_eq!(targets.len(), 2);
        let bound = max_duration(&plan);
        assert!(
            bound >= Duration::from_secs(2 + 5 + 4) + DURATION_SLACK,
            "{bound:?}"
        );
        assert!(bound < Duration::from_secs(3600));
    }
}
