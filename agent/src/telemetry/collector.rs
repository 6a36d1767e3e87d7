//! The collector: one thread owning the loaded programs ([`Telemetry`] is `Send`, not `Sync`),
//! the subscriptions, their scopes and their deltas.
//!
//! Each subscription keeps, per aggregate row it watches, the row as last reported; a batch
//! holds the change since then (`since()`), so two subscriptions on one target, or a target
//! added later, each see exactly what happened while they watched. The kernel counts only the
//! union of the subscriptions' cgroups, keyed by the scoped cgroup, so a row's cgroup id says
//! which target it belongs to in each group's hierarchy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use faultline_bpf::fallback::{CpuStat, MemoryOom, TcpSnmp};
use faultline_bpf::{
    BlockStats, CgroupMounts, Direction, Group, GroupState, Hierarchy, Options, SchedStats,
    Snapshot, TcpStats, Telemetry, TelemetryEvent, V1Controller,
};
use faultline_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::resolve::ResolvedTarget;
use super::uplink::AckTimes;
use super::{ActiveRuns, LEASE, MAX_EVENTS_PER_BATCH, MODE_ENV, convert, lock};

/// How long the programs stay loaded after the last subscription ended (runs often follow
/// each other).
const LINGER: Duration = Duration::from_secs(10);
/// Longest wait for ring buffer events before looking at control messages and deadlines.
const POLL_MAX: Duration = Duration::from_millis(100);

/// How the agent collects telemetry, from [`MODE_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// eBPF programs where they load, `/proc` and cgroup fallbacks where they do not.
    Auto,
    /// Only the `/proc` and cgroup fallbacks (no programs are loaded).
    Fallback,
    /// No telemetry: subscriptions are answered with one batch saying so.
    Off,
}

impl Mode {
    /// Parses `auto`, `fallback` or `off`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" | "auto" => Ok(Mode::Auto),
            "fallback" => Ok(Mode::Fallback),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "{MODE_ENV}={other:?}: expected auto, fallback or off"
            )),
        }
    }

    /// The mode [`MODE_ENV`] asks for (unset: auto).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(MODE_ENV) {
            Ok(text) => Self::parse(&text),
            Err(_) => Ok(Mode::Auto),
        }
    }
}

/// What loading the programs at start-up found: how each group would be collected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub sources: Vec<pb::TelemetrySource>,
}

/// Messages to the collector thread.
#[derive(Debug)]
pub(crate) enum Control {
    Subscribe {
        run_id: String,
        interval: Duration,
        max_duration: Duration,
        selectors: Vec<String>,
        targets: Vec<Result<ResolvedTarget, String>>,
    },
    Retarget {
        run_id: String,
        targets: Vec<Result<ResolvedTarget, String>>,
    },
    Unsubscribe {
        run_id: String,
        reason: String,
    },
    /// The uplink dropped batches of this run (backlog full, stream lost).
    BatchesLost {
        run_id: String,
        count: u64,
    },
    /// The coordinator asked to stop this run's telemetry.
    Stop {
        run_id: String,
        reason: String,
    },
}

/// What the fallback can stand in for.
fn fallback_for(group: Group) -> Option<&'static str> {
    match group {
        Group::Tcp => Some(
            "/proc/<pid>/net/snmp of the target's network namespace (retransmits, failed \
             attempts, resets: namespace-wide, no errno, no peers)",
        ),
        Group::Sched => Some("cpu.stat of the target's cgroup (throttling; no run-queue latency)"),
        Group::Oom => Some("OOM-kill count of the target's memory cgroup (no victims)"),
        Group::Proc | Group::Block => None,
    }
}

/// How one group is collected now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GroupMode {
    Bpf(Hierarchy),
    Fallback,
    None,
}

/// Sources and group modes of a mode and a load result.
fn modes_of(
    mode: Mode,
    loaded: Result<&Telemetry, &str>,
) -> (BTreeMap<Group, GroupMode>, Vec<pb::TelemetrySource>) {
    let mut modes = BTreeMap::new();
    let mut sources = Vec::new();
    for group in Group::ALL {
        let fallback = |why: &str| match fallback_for(group) {
            Some(text) => (
                GroupMode::Fallback,
                pb::TelemetrySource {
                    group: group.name().into(),
                    mechanism: "fallback".into(),
                    detail: format!("{text}; programs not loaded: {why}"),
                },
            ),
            None => (
                GroupMode::None,
                pb::TelemetrySource {
                    group: group.name().into(),
                    mechanism: "none".into(),
                    detail: format!("programs not loaded ({why}) and nothing stands in"),
                },
            ),
        };
        let (group_mode, source) = match (mode, loaded) {
            (Mode::Off, _) => (
                GroupMode::None,
                pb::TelemetrySource {
                    group: group.name().into(),
                    mechanism: "none".into(),
                    detail: format!("telemetry is off on this agent ({MODE_ENV}=off)"),
                },
            ),
            (Mode::Fallback, _) => fallback(&format!("{MODE_ENV}=fallback")),
            (Mode::Auto, Err(why)) => fallback(why),
            (Mode::Auto, Ok(telemetry)) => {
                match telemetry.status().iter().find(|s| s.group == group) {
                    Some(status) => match (&status.state, &status.hierarchy) {
                        (GroupState::Loaded { .. }, Some(h)) => {
                            (GroupMode::Bpf(h.clone()), convert::source(status))
                        }
                        (GroupState::Loaded { .. }, None) => {
                            fallback("no cgroup hierarchy to attribute its events to")
                        }
                        (
                            GroupState::Fallback { reason, .. } | GroupState::Failed { reason },
                            _,
                        ) => fallback(reason),
                        (GroupState::Disabled, _) => fallback("disabled"),
                    },
                    None => fallback("not reported by the loader"),
                }
            }
        };
        modes.insert(group, group_mode);
        sources.push(source);
    }
    (modes, sources)
}

/// One target of a subscription, as the collector watches it.
#[derive(Debug, Clone)]
struct Watched {
    selector: String,
    /// How batches name it: the resolved name, kept while it cannot be resolved again (a
    /// killed container), else the selector.
    name: String,
    resolved: Option<ResolvedTarget>,
    /// Per group loaded as BPF: the cgroup id counted, and its path.
    ids: BTreeMap<Group, u64>,
    /// The cgroup path shown in batches (the TCP/process hierarchy's, else any).
    cgroup: String,
    /// Fallback files.
    cpu_dir: Option<PathBuf>,
    memory_dir: Option<PathBuf>,
    /// Why it is not (fully) watched.
    notes: Vec<String>,
}

impl Watched {
    fn name(&self) -> &str {
        &self.name
    }

    fn pid(&self) -> Option<u32> {
        self.resolved.as_ref().and_then(|r| r.pid)
    }
}

/// The path of a target's cgroup in `hierarchy`.
fn path_in(hierarchy: &Hierarchy, target: &ResolvedTarget) -> Result<PathBuf, String> {
    match (&target.cgroup, target.pid) {
        (Some(path), _) => Ok(PathBuf::from(path)),
        (None, Some(pid)) => hierarchy.path_of_pid(pid).map_err(|e| e.to_string()),
        (None, None) => Err("neither a process nor a cgroup".into()),
    }
}

/// What the collector watches for `target`; `previous` is what it watched for it before (its
/// name and cgroup stay shown while it cannot be resolved).
fn watch(
    selector: &str,
    target: &Result<ResolvedTarget, String>,
    previous: Option<&Watched>,
    modes: &BTreeMap<Group, GroupMode>,
    mounts: Option<&CgroupMounts>,
) -> Watched {
    let mut watched = Watched {
        selector: selector.to_string(),
        name: previous.map_or_else(|| selector.to_string(), |p| p.name.clone()),
        resolved: None,
        ids: BTreeMap::new(),
        cgroup: previous.map(|p| p.cgroup.clone()).unwrap_or_default(),
        cpu_dir: None,
        memory_dir: None,
        notes: Vec::new(),
    };
    let target = match target {
        Ok(target) => target,
        Err(why) => {
            watched.notes.push(format!(
                "{selector}: not watched (for a while at least): {why}"
            ));
            return watched;
        }
    };
    watched.name.clone_from(&target.name);
    watched.cgroup.clear();
    for (group, mode) in modes {
        if let GroupMode::Bpf(hierarchy) = mode {
            match path_in(hierarchy, target).and_then(|path| {
                hierarchy
                    .id_of(&path)
                    .map(|id| (path, id))
                    .map_err(|e| e.to_string())
            }) {
                Ok((path, id)) => {
                    watched.ids.insert(*group, id);
                    if watched.cgroup.is_empty() || matches!(group, Group::Tcp | Group::Proc) {
                        watched.cgroup = path.display().to_string();
                    }
                }
                Err(why) => watched
                    .notes
                    .push(format!("{selector}: {group} not watched: {why}")),
            }
        }
    }
    if let Some(mounts) = mounts {
        let dir_of = |controller| {
            let hierarchy = mounts.for_controller(controller)?;
            let path = path_in(&hierarchy, target).ok()?;
            hierarchy.dir(path).ok()
        };
        if modes.get(&Group::Sched) == Some(&GroupMode::Fallback) {
            watched.cpu_dir = dir_of(V1Controller::Cpu);
        }
        if modes.get(&Group::Oom) == Some(&GroupMode::Fallback) {
            watched.memory_dir = dir_of(V1Controller::Memory);
        }
        if watched.cgroup.is_empty()
            && let Some(h) = mounts.primary(faultline_bpf::Attribution::Auto)
            && let Ok(path) = path_in(&h, target)
        {
            watched.cgroup = path.display().to_string();
        }
    }
    watched.resolved = Some(target.clone());
    watched
}

type TcpKey = (u64, Direction, Option<IpAddr>, u16);

fn tcp_key(row: &TcpStats) -> TcpKey {
    (row.cgroup_id, row.direction, row.peer, row.port)
}

/// The rows of a subscription as last reported.
#[derive(Debug, Default)]
struct Reported {
    tcp: HashMap<TcpKey, TcpStats>,
    sched: HashMap<u64, SchedStats>,
    block: HashMap<(u64, (u32, u32)), BlockStats>,
}

impl Reported {
    /// Records the rows of `snapshot` for `ids` (per group) as reported, without reporting
    /// them: what a subscription, or a target new to it, starts from.
    fn baseline(&mut self, snapshot: &Snapshot, ids: &HashSet<(Group, u64)>) {
        for row in &snapshot.tcp {
            if ids.contains(&(Group::Tcp, row.cgroup_id)) {
                self.tcp.insert(tcp_key(row), row.clone());
            }
        }
        for row in &snapshot.sched {
            if ids.contains(&(Group::Sched, row.cgroup_id)) {
                self.sched.insert(row.cgroup_id, row.clone());
            }
        }
        for row in &snapshot.block {
            if ids.contains(&(Group::Block, row.cgroup_id)) {
                self.block.insert((row.cgroup_id, row.device), row.clone());
            }
        }
    }
}

/// Fallback figures of one target (cumulative).
#[derive(Debug, Clone, Copy, Default)]
struct FallbackFigures {
    snmp: Option<TcpSnmp>,
    cpu: Option<CpuStat>,
    oom_kills: Option<u64>,
}

/// What a target's events add up to within an interval.
#[derive(Debug, Default)]
struct Tally {
    exits: BTreeMap<(String, Option<i32>, Option<i32>), u64>,
    execs: u64,
    oom_kills: u64,
}

#[derive(Debug)]
struct Sub {
    run_id: String,
    interval: Duration,
    started: Instant,
    deadline: Instant,
    next_flush: Instant,
    from: SystemTime,
    seq: u64,
    targets: Vec<Watched>,
    reported: Reported,
    fallback: Vec<FallbackFigures>,
    tallies: Vec<Tally>,
    events: Vec<pb::TelemetryEvent>,
    drops: pb::TelemetryDrops,
    /// Kernel loss counters when the subscription started (ring buffer drops, map full).
    kernel_base: (u64, u64),
}

impl Sub {
    fn ids(&self) -> HashSet<(Group, u64)> {
        self.targets
            .iter()
            .flat_map(|t| t.ids.iter().map(|(g, id)| (*g, *id)))
            .collect()
    }

    fn notes(&self) -> Vec<String> {
        self.targets
            .iter()
            .flat_map(|t| t.notes.iter().cloned())
            .collect()
    }
}

fn kernel_losses(snapshot: Option<&Snapshot>) -> (u64, u64) {
    snapshot.map_or((0, 0), |s| {
        s.counters.values().fold((0, 0), |(drops, full), c| {
            (drops + c.ringbuf_drops, full + c.map_full)
        })
    })
}

pub(crate) struct Collector {
    mode: Mode,
    control: Receiver<Control>,
    out: mpsc::Sender<pb::TelemetryBatch>,
    active: ActiveRuns,
    acks: AckTimes,
    telemetry: Option<Telemetry>,
    mounts: Option<CgroupMounts>,
    modes: BTreeMap<Group, GroupMode>,
    sources: Vec<pb::TelemetrySource>,
    subs: Vec<Sub>,
    idle_since: Instant,
    lease: Duration,
}

impl Collector {
    pub(crate) fn new(
        mode: Mode,
        control: Receiver<Control>,
        out: mpsc::Sender<pb::TelemetryBatch>,
        active: ActiveRuns,
        acks: AckTimes,
    ) -> Self {
        Self {
            mode,
            control,
            out,
            active,
            acks,
            telemetry: None,
            mounts: CgroupMounts::discover().ok(),
            modes: BTreeMap::new(),
            sources: Vec::new(),
            subs: Vec::new(),
            idle_since: Instant::now(),
            lease: LEASE,
        }
    }

    /// A shorter lease, for tests.
    #[cfg(test)]
    fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The thread's body: reports what loads, then serves subscriptions until every sender of
    /// control messages is gone.
    pub(crate) fn run(mut self, loaded: tokio::sync::oneshot::Sender<super::LoadReport>) {
        self.load();
        let _ = loaded.send(super::LoadReport {
            sources: self.sources.clone(),
        });
        // Loaded only to learn what this host supports: nothing is watched yet.
        self.telemetry = None;
        loop {
            if self.subs.is_empty() {
                if self.telemetry.is_some() && self.idle_since.elapsed() > LINGER {
                    tracing::debug!("no telemetry subscriptions: unloading the programs");
                    self.telemetry = None;
                }
                match self.control.recv_timeout(Duration::from_secs(1)) {
                    Ok(message) => self.on_control(message),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            loop {
                match self.control.try_recv() {
                    Ok(message) => self.on_control(message),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            let wait = self
                .subs
                .iter()
                .map(|s| s.next_flush.saturating_duration_since(now))
                .min()
                .unwrap_or(POLL_MAX)
                .min(POLL_MAX);
            self.poll(wait);
            self.end_expired();
            let now = Instant::now();
            if self.subs.iter().any(|s| s.next_flush <= now) {
                let snapshot = self.snapshot();
                let due: Vec<usize> = (0..self.subs.len())
                    .filter(|&i| self.subs[i].next_flush <= now)
                    .collect();
                for index in due {
                    self.flush(index, snapshot.as_ref(), false);
                }
            }
        }
    }

    /// Loads the programs (in auto mode) and works out how each group is collected.
    fn load(&mut self) {
        let loaded = match self.mode {
            Mode::Auto => match Telemetry::load(&Options::default()) {
                Ok(telemetry) => Ok(telemetry),
                Err(err) => Err(err.to_string()),
            },
            Mode::Fallback | Mode::Off => Err(String::new()),
        };
        let (modes, sources) = modes_of(self.mode, loaded.as_ref().map_err(String::as_str));
        if let Err(why) = &loaded
            && self.mode == Mode::Auto
        {
            tracing::warn!("telemetry programs not loaded: {why}");
        }
        crate::metrics::telemetry_sources(&sources);
        self.modes = modes;
        self.sources = sources;
        self.telemetry = loaded.ok();
    }

    fn snapshot(&self) -> Option<Snapshot> {
        let telemetry = self.telemetry.as_ref()?;
        match telemetry.snapshot() {
            Ok(snapshot) => Some(snapshot),
            Err(err) => {
                tracing::warn!(%err, "reading telemetry aggregates failed");
                None
            }
        }
    }

    fn on_control(&mut self, message: Control) {
        match message {
            Control::Subscribe {
                run_id,
                interval,
                max_duration,
                selectors,
                targets,
            } => self.subscribe(run_id, interval, max_duration, &selectors, &targets),
            Control::Retarget { run_id, targets } => self.retarget(&run_id, &targets),
            Control::Unsubscribe { run_id, reason } | Control::Stop { run_id, reason } => {
                if let Some(index) = self.subs.iter().position(|s| s.run_id == run_id) {
                    tracing::info!(run = %run_id, "telemetry subscription ended: {reason}");
                    self.end(index);
                }
            }
            Control::BatchesLost { run_id, count } => {
                if let Some(sub) = self.subs.iter_mut().find(|s| s.run_id == run_id) {
                    sub.drops.batches += count;
                }
            }
        }
    }

    fn subscribe(
        &mut self,
        run_id: String,
        interval: Duration,
        max_duration: Duration,
        selectors: &[String],
        targets: &[Result<ResolvedTarget, String>],
    ) {
        if let Some(sub) = self.subs.iter_mut().find(|s| s.run_id == run_id) {
            // Subscribed again (the coordinator retried): same batches, new targets.
            sub.deadline = Instant::now() + max_duration;
            sub.interval = interval;
            self.retarget(&run_id, targets);
            return;
        }
        if self.mode == Mode::Auto && self.telemetry.is_none() {
            self.load();
        }
        let now = Instant::now();
        let watched: Vec<Watched> = selectors
            .iter()
            .zip(targets)
            .map(|(selector, target)| {
                watch(selector, target, None, &self.modes, self.mounts.as_ref())
            })
            .collect();
        let count = watched.len();
        let sub = Sub {
            run_id,
            interval,
            started: now,
            deadline: now + max_duration,
            next_flush: now + until_boundary(interval),
            from: SystemTime::now(),
            seq: 0,
            targets: watched,
            reported: Reported::default(),
            fallback: vec![FallbackFigures::default(); count],
            tallies: (0..count).map(|_| Tally::default()).collect(),
            events: Vec::new(),
            drops: pb::TelemetryDrops::default(),
            kernel_base: (0, 0),
        };
        let run_id = sub.run_id.clone();
        let ids = sub.ids();
        self.subs.push(sub);
        self.apply_scope();
        let snapshot = self.snapshot();
        let index = self.subs.len() - 1;
        let figures: Vec<FallbackFigures> = self.subs[index]
            .targets
            .iter()
            .map(|t| self.read_fallback(t))
            .collect();
        let sub = &mut self.subs[index];
        if let Some(snapshot) = &snapshot {
            sub.reported.baseline(snapshot, &ids);
        }
        sub.kernel_base = kernel_losses(snapshot.as_ref());
        sub.fallback = figures;
        if self.mode == Mode::Off {
            // Nothing to watch: one batch saying so, then done.
            let index = self.subs.len() - 1;
            self.end(index);
            return;
        }
        lock(&self.active).insert(run_id);
    }

    fn retarget(&mut self, run_id: &str, targets: &[Result<ResolvedTarget, String>]) {
        let Some(index) = self.subs.iter().position(|s| s.run_id == run_id) else {
            return;
        };
        let before = self.subs[index].ids();
        let watched: Vec<Watched> = self.subs[index]
            .targets
            .iter()
            .zip(targets)
            .map(|(old, target)| {
                watch(
                    &old.selector,
                    target,
                    Some(old),
                    &self.modes,
                    self.mounts.as_ref(),
                )
            })
            .collect();
        let figures: Vec<FallbackFigures> = watched.iter().map(|t| self.read_fallback(t)).collect();
        {
            let sub = &mut self.subs[index];
            for (i, (new, old)) in watched.iter().zip(&sub.targets).enumerate() {
                // A new process or cgroup starts a new fallback baseline.
                if new.pid() != old.pid() || new.cgroup != old.cgroup {
                    sub.fallback[i] = figures[i];
                }
            }
            sub.targets = watched;
        }
        let added: HashSet<(Group, u64)> = self.subs[index]
            .ids()
            .difference(&before)
            .copied()
            .collect();
        self.apply_scope();
        if !added.is_empty()
            && let Some(snapshot) = self.snapshot()
        {
            self.subs[index].reported.baseline(&snapshot, &added);
        }
    }

    /// Scopes every loaded group to the union of the subscriptions' cgroups.
    fn apply_scope(&mut self) {
        let Some(telemetry) = self.telemetry.as_mut() else {
            return;
        };
        for (group, mode) in &self.modes {
            if !matches!(mode, GroupMode::Bpf(_)) {
                continue;
            }
            let mut ids: Vec<u64> = self
                .subs
                .iter()
                .flat_map(|s| s.targets.iter().filter_map(|t| t.ids.get(group).copied()))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            if let Err(err) = telemetry.set_scope_ids(*group, &ids) {
                tracing::warn!(%group, %err, "could not scope the telemetry programs");
                for sub in &mut self.subs {
                    for target in &mut sub.targets {
                        let note = format!("{group} scope not set: {err}");
                        if !target.notes.contains(&note) {
                            target.notes.push(note);
                        }
                    }
                }
            }
        }
    }

    /// Waits up to `wait` for events and hands each to the subscriptions watching its cgroup.
    fn poll(&mut self, wait: Duration) {
        let events = match self.telemetry.as_mut() {
            Some(telemetry) => match telemetry.poll_events(wait) {
                Ok(events) => events,
                Err(err) => {
                    tracing::warn!(%err, "polling telemetry events failed");
                    std::thread::sleep(wait);
                    Vec::new()
                }
            },
            None => {
                std::thread::sleep(wait);
                Vec::new()
            }
        };
        for event in &events {
            self.route(event);
        }
    }

    fn route(&mut self, event: &TelemetryEvent) {
        let group = match event {
            TelemetryEvent::ConnectFailed(_) | TelemetryEvent::ConnectionError(_) => Group::Tcp,
            TelemetryEvent::Exec(_) | TelemetryEvent::Exit(_) => Group::Proc,
            TelemetryEvent::OomKill(_) => Group::Oom,
        };
        let kind = match event {
            TelemetryEvent::ConnectFailed(_) => "connect-failed",
            TelemetryEvent::ConnectionError(_) => "connection-error",
            TelemetryEvent::Exec(_) => "exec",
            TelemetryEvent::Exit(_) => "exit",
            TelemetryEvent::OomKill(_) => "oom-kill",
        };
        crate::metrics::count("faultline_agent_telemetry_events_total", &[kind], 1);
        let cgroup = event.cgroup_id();
        for sub in &mut self.subs {
            for (index, target) in sub.targets.iter().enumerate() {
                if target.ids.get(&group) != Some(&cgroup) {
                    continue;
                }
                let tally = &mut sub.tallies[index];
                let keep = match event {
                    TelemetryEvent::Exec(_) => {
                        tally.execs += 1;
                        false
                    }
                    TelemetryEvent::Exit(exit) => {
                        *tally
                            .exits
                            .entry((exit.comm.clone(), exit.code, exit.signal))
                            .or_default() += 1;
                        // Clean exits are only counted; crashes and kills are shown.
                        exit.failed()
                    }
                    TelemetryEvent::OomKill(_) => {
                        tally.oom_kills += 1;
                        true
                    }
                    TelemetryEvent::ConnectFailed(_) | TelemetryEvent::ConnectionError(_) => true,
                };
                if keep {
                    if sub.events.len() < MAX_EVENTS_PER_BATCH {
                        sub.events.push(convert::event(event, target.name()));
                    } else {
                        sub.drops.agent_events += 1;
                        crate::metrics::count(
                            "faultline_agent_telemetry_drops_total",
                            &["agent-events"],
                            1,
                        );
                    }
                }
            }
        }
    }

    /// Ends subscriptions past their deadline or lease.
    fn end_expired(&mut self) {
        let now = Instant::now();
        let acks = self.acks.snapshot();
        let mut index = 0;
        while index < self.subs.len() {
            let sub = &self.subs[index];
            let acked = acks
                .get(&sub.run_id)
                .copied()
                .map_or(sub.started, |at| at.max(sub.started));
            let why = if now >= sub.deadline {
                Some("its maximum duration passed".to_string())
            } else if now.duration_since(acked) > self.lease {
                Some(format!(
                    "no acknowledgement from the coordinator for {} ms",
                    self.lease.as_millis()
                ))
            } else {
                None
            };
            match why {
                Some(why) => {
                    tracing::warn!(run = %sub.run_id, "telemetry subscription ended: {why}");
                    self.end(index);
                }
                None => index += 1,
            }
        }
    }

    /// Sends the subscription's last batch and forgets it.
    fn end(&mut self, index: usize) {
        let snapshot = self.snapshot();
        self.flush(index, snapshot.as_ref(), true);
        let sub = self.subs.remove(index);
        lock(&self.active).remove(&sub.run_id);
        self.acks.forget(&sub.run_id);
        self.apply_scope();
        if self.subs.is_empty() {
            self.idle_since = Instant::now();
        }
    }

    fn read_fallback(&self, target: &Watched) -> FallbackFigures {
        let mut figures = FallbackFigures::default();
        if self.modes.get(&Group::Tcp) == Some(&GroupMode::Fallback)
            && let Some(pid) = target.pid()
        {
            figures.snmp = TcpSnmp::read_for_pid(pid).ok();
        }
        if let Some(dir) = &target.cpu_dir {
            figures.cpu = CpuStat::read(dir).ok();
        }
        if let Some(dir) = &target.memory_dir {
            figures.oom_kills = MemoryOom::read(dir).ok().map(|m| m.oom_kills);
        }
        figures
    }

    /// Builds and sends the batch of subscription `index` (its last one when `last`).
    fn flush(&mut self, index: usize, snapshot: Option<&Snapshot>, last: bool) {
        let figures: Vec<FallbackFigures> = self.subs[index]
            .targets
            .iter()
            .map(|t| self.read_fallback(t))
            .collect();
        let sources = self.sources.clone();
        let sub = &mut self.subs[index];
        let to = SystemTime::now();
        let mut targets = Vec::with_capacity(sub.targets.len());
        for (i, target) in sub.targets.iter().enumerate() {
            let mut wire = pb::TargetTelemetry {
                name: target.name().to_string(),
                selector: target.selector.clone(),
                cgroup: target.cgroup.clone(),
                ..Default::default()
            };
            if let Some(snapshot) = snapshot {
                collect_rows(&mut wire, target, snapshot, &mut sub.reported);
            }
            let tally = std::mem::take(&mut sub.tallies[i]);
            wire.execs = tally.execs;
            wire.oom_kills = tally.oom_kills;
            wire.exits = tally
                .exits
                .into_iter()
                .map(|((comm, code, signal), count)| pb::ExitCount {
                    comm,
                    code,
                    signal,
                    count,
                })
                .collect();
            wire.fallback = fallback_delta(&sub.fallback[i], &figures[i]);
            if figures[i].snmp.is_some()
                || figures[i].cpu.is_some()
                || figures[i].oom_kills.is_some()
            {
                sub.fallback[i] = figures[i];
            }
            targets.push(wire);
        }
        let (ringbuf, full) = kernel_losses(snapshot);
        if snapshot.is_some() {
            crate::metrics::kernel_losses(ringbuf, full);
        }
        sub.drops.kernel_events = ringbuf.saturating_sub(sub.kernel_base.0);
        sub.drops.kernel_map_full = full.saturating_sub(sub.kernel_base.1);
        let mut events = std::mem::take(&mut sub.events);
        events.sort_by_key(|e| e.at_unix_ms);
        sub.seq += 1;
        let batch = pb::TelemetryBatch {
            run_id: sub.run_id.clone(),
            seq: sub.seq,
            from_unix_ms: convert::unix_ms(sub.from),
            to_unix_ms: convert::unix_ms(to),
            sources,
            targets,
            events,
            drops: Some(sub.drops),
            notes: sub.notes(),
            last,
        };
        sub.from = to;
        sub.next_flush = Instant::now() + until_boundary(sub.interval);
        match self.out.try_send(batch) {
            Ok(()) => crate::metrics::count("faultline_agent_telemetry_batches_total", &[], 1),
            Err(TrySendError::Full(_)) => {
                sub.drops.batches += 1;
                crate::metrics::count("faultline_agent_telemetry_drops_total", &["batches"], 1);
                tracing::warn!(run = %sub.run_id, "telemetry queue full; batch dropped");
            }
            Err(TrySendError::Closed(_)) => {
                crate::metrics::count("faultline_agent_telemetry_drops_total", &["batches"], 1);
                tracing::debug!("telemetry uplink gone; batch dropped");
            }
        }
    }
}

/// Time to the next wall-clock multiple of `interval` (at least a tenth of it away): batches
/// cover whole seconds, so the coordinator's 1 s buckets hold exactly one batch each and
/// reports can tell which second an event fell in.
fn until_boundary(interval: Duration) -> Duration {
    let interval_ms = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let now_ms = u64::try_from(convert::unix_ms(SystemTime::now())).unwrap_or(0);
    let mut wait = interval_ms - now_ms % interval_ms;
    if wait < interval_ms / 10 {
        wait += interval_ms;
    }
    Duration::from_millis(wait)
}

/// Adds the changes of `target`'s rows since they were last reported, and records them as
/// reported.
fn collect_rows(
    wire: &mut pb::TargetTelemetry,
    target: &Watched,
    snapshot: &Snapshot,
    reported: &mut Reported,
) {
    if let Some(id) = target.ids.get(&Group::Tcp) {
        for row in snapshot.tcp_for(*id) {
            let key = tcp_key(row);
            let delta = reported
                .tcp
                .get(&key)
                .map_or_else(|| row.clone(), |before| row.since(before));
            reported.tcp.insert(key, row.clone());
            if !delta.is_zero() {
                wire.tcp.push(convert::tcp(&delta));
            }
        }
    }
    if let Some(id) = target.ids.get(&Group::Sched)
        && let Some(row) = snapshot.sched_for(*id)
    {
        let delta = reported
            .sched
            .get(id)
            .map_or_else(|| row.clone(), |before| row.since(before));
        reported.sched.insert(*id, row.clone());
        if delta.switches > 0 || delta.runq_latency.count > 0 {
            wire.sched = Some(convert::sched(&delta));
        }
    }
    if let Some(id) = target.ids.get(&Group::Block) {
        for row in snapshot.block_for(*id) {
            let key = (row.cgroup_id, row.device);
            let delta = reported
                .block
                .get(&key)
                .map_or_else(|| row.clone(), |before| row.since(before));
            reported.block.insert(key, row.clone());
            if delta.read_ops + delta.write_ops + delta.other_ops + delta.errors > 0 {
                wire.block.push(convert::block(&delta));
            }
        }
    }
}

/// The change of the fallback figures; `None` when nothing was read.
fn fallback_delta(
    before: &FallbackFigures,
    now: &FallbackFigures,
) -> Option<pb::FallbackTelemetry> {
    if now.snmp.is_none() && now.cpu.is_none() && now.oom_kills.is_none() {
        return None;
    }
    let mut wire = pb::FallbackTelemetry::default();
    if let (Some(b), Some(n)) = (before.snmp, now.snmp) {
        let d = n.since(&b);
        wire.retrans_segs = Some(d.retrans_segs);
        wire.attempt_fails = Some(d.attempt_fails);
        wire.estab_resets = Some(d.estab_resets);
        wire.out_rsts = Some(d.out_rsts);
        wire.active_opens = Some(d.active_opens);
    }
    if let (Some(b), Some(n)) = (before.cpu, now.cpu) {
        wire.nr_periods = Some(n.nr_periods.saturating_sub(b.nr_periods));
        wire.nr_throttled = Some(n.nr_throttled.saturating_sub(b.nr_throttled));
        wire.throttled_us = Some(
            u64::try_from(n.throttled.saturating_sub(b.throttled).as_micros()).unwrap_or(u64::MAX),
        );
    }
    if let (Some(b), Some(n)) = (before.oom_kills, now.oom_kills) {
        wire.oom_kills = Some(n.saturating_sub(b));
    }
    // The first reading is only a baseline.
    (wire != pb::FallbackTelemetry::default()).then_some(wire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_say_why_nothing_loads() {
        assert_eq!(Mode::parse("auto"), Ok(Mode::Auto));
        assert_eq!(Mode::parse(""), Ok(Mode::Auto));
        assert_eq!(Mode::parse("fallback"), Ok(Mode::Fallback));
        assert_eq!(Mode::parse("off"), Ok(Mode::Off));
        assert!(
            Mode::parse("bpf-only")
                .unwrap_err()
                .contains("auto, fallback or off")
        );

        let (modes, sources) = modes_of(Mode::Fallback, Err(""));
        assert_eq!(modes.get(&Group::Tcp), Some(&GroupMode::Fallback));
        assert_eq!(modes.get(&Group::Proc), Some(&GroupMode::None));
        let tcp = &sources[0];
        assert_eq!(
            (tcp.group.as_str(), tcp.mechanism.as_str()),
            ("tcp", "fallback")
        );
        assert!(tcp.detail.contains("net/snmp"), "{}", tcp.detail);
        assert!(
            tcp.detail.contains("FAULTLINE_TELEMETRY=fallback"),
            "{}",
            tcp.detail
        );

        let (modes, sources) = modes_of(Mode::Auto, Err("no BTF"));
        assert_eq!(modes.get(&Group::Sched), Some(&GroupMode::Fallback));
        assert!(
            sources[1].detail.contains("no BTF"),
            "{}",
            sources[1].detail
        );
        assert_eq!(sources[3].mechanism, "none");

        let (modes, sources) = modes_of(Mode::Off, Err(""));
        assert!(modes.values().all(|m| *m == GroupMode::None));
        assert!(sources.iter().all(|s| s.detail.contains("off")));
    }

    #[test]
    fn fallback_deltas_start_from_the_first_reading() {
        let first = FallbackFigures {
            snmp: Some(TcpSnmp {
                retrans_segs: 10,
                attempt_fails: 1,
                ..TcpSnmp::default()
            }),
            cpu: Some(CpuStat {
                nr_periods: 100,
                nr_throttled: 5,
                throttled: Duration::from_millis(20),
                usage: None,
            }),
            oom_kills: Some(0),
        };
        let later = FallbackFigures {
            snmp: Some(TcpSnmp {
                retrans_segs: 17,
                attempt_fails: 4,
                ..TcpSnmp::default()
            }),
            cpu: Some(CpuStat {
                nr_periods: 110,
                nr_throttled: 14,
                throttled: Duration::from_millis(920),
                usage: None,
            }),
            oom_kills: Some(1),
        };
        assert_eq!(
            fallback_delta(&FallbackFigures::default(), &first),
            None,
            "no baseline yet: no figure"
        );
        let d = fallback_delta(&first, &later).unwrap();
        assert_eq!(
            (
                d.retrans_segs,
                d.attempt_fails,
                d.nr_throttled,
                d.throttled_us,
                d.oom_kills
            ),
            (Some(7), Some(3), Some(9), Some(900_000), Some(1))
        );
        assert!(fallback_delta(&first, &FallbackFigures::default()).is_none());
    }

    /// A collector thread in `mode` with a short lease, its control channel, batches and acks.
    fn collector(
        mode: Mode,
        lease: Duration,
    ) -> (
        std::sync::mpsc::Sender<Control>,
        mpsc::Receiver<pb::TelemetryBatch>,
        AckTimes,
        ActiveRuns,
    ) {
        let (control, control_rx) = std::sync::mpsc::channel();
        let (out, batches) = mpsc::channel(64);
        let acks = AckTimes::default();
        let active = ActiveRuns::default();
        let collector =
            Collector::new(mode, control_rx, out, active.clone(), acks.clone()).with_lease(lease);
        let (loaded, _) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || collector.run(loaded));
        (control, batches, acks, active)
    }

    fn subscribe(run_id: &str, interval: Duration) -> Control {
        Control::Subscribe {
            run_id: run_id.into(),
            interval,
            max_duration: Duration::from_secs(60),
            selectors: vec!["cgroup nowhere".into(), "container gone".into()],
            targets: vec![
                Ok(ResolvedTarget {
                    selector: "cgroup nowhere".into(),
                    name: "nowhere".into(),
                    pid: None,
                    cgroup: Some("faultline-test/nowhere".into()),
                }),
                Err("no container matches container gone".into()),
            ],
        }
    }

    fn next(batches: &mut mpsc::Receiver<pb::TelemetryBatch>) -> pb::TelemetryBatch {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(batch) = batches.try_recv() {
                return batch;
            }
            assert!(Instant::now() < deadline, "no batch within 5 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn subscriptions_stream_until_unsubscribed_and_lapse_without_acknowledgements() {
        let (control, mut batches, acks, active) =
            collector(Mode::Fallback, Duration::from_millis(600));
        control
            .send(subscribe("run-a", Duration::from_millis(100)))
            .unwrap();
        let first = next(&mut batches);
        assert_eq!(
            (first.run_id.as_str(), first.seq, first.last),
            ("run-a", 1, false)
        );
        assert!(
            first.sources.iter().all(|s| s.mechanism != "bpf"),
            "{:?}",
            first.sources
        );
        assert_eq!(first.targets.len(), 2);
        assert_eq!(first.targets[0].name, "nowhere");
        assert_eq!(
            first.targets[1].name, "container gone",
            "unresolved: the selector"
        );
        assert!(
            first
                .notes
                .iter()
                .any(|n| n.contains("no container matches")),
            "{:?}",
            first.notes
        );
        assert!(first.to_unix_ms >= first.from_unix_ms);
        let second = next(&mut batches);
        assert_eq!(second.seq, 2);
        assert_eq!(
            second.from_unix_ms, first.to_unix_ms,
            "intervals follow each other"
        );
        assert!(lock(&active).contains("run-a"));

        // Unsubscribed: one last batch, then nothing.
        control
            .send(Control::Unsubscribe {
                run_id: "run-a".into(),
                reason: "test".into(),
            })
            .unwrap();
        let last = loop {
            let batch = next(&mut batches);
            if batch.last {
                break batch;
            }
        };
        assert_eq!(last.run_id, "run-a");
        std::thread::sleep(Duration::from_millis(300));
        assert!(batches.try_recv().is_err(), "nothing after the last batch");
        assert!(!lock(&active).contains("run-a"));

        // Acknowledged: it goes on; no longer acknowledged: it lapses after the lease.
        control
            .send(subscribe("run-b", Duration::from_millis(100)))
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1200) {
            acks.acked("run-b");
            let batch = next(&mut batches);
            assert!(!batch.last, "acknowledged batches keep it alive");
        }
        let lapsed = Instant::now();
        let last = loop {
            let batch = next(&mut batches);
            if batch.last {
                break batch;
            }
        };
        assert_eq!(last.run_id, "run-b");
        let waited = lapsed.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert!(!lock(&active).contains("run-b"));
    }

    #[test]
    fn with_telemetry_off_a_subscription_gets_one_batch_saying_so() {
        let (control, mut batches, _, active) = collector(Mode::Off, LEASE);
        control
            .send(subscribe("run-c", Duration::from_millis(100)))
            .unwrap();
        let only = next(&mut batches);
        assert!(only.last);
        assert!(
            only.sources
                .iter()
                .all(|s| s.mechanism == "none" && s.detail.contains("off")),
            "{:?}",
            only.sources
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(batches.try_recv().is_err());
        assert!(!lock(&active).contains("run-c"));
    }

    #[test]
    fn batches_end_on_wall_clock_boundaries() {
        for interval in [Duration::from_millis(100), Duration::from_secs(1)] {
            let wait = until_boundary(interval);
            assert!(
                wait >= interval / 10 && wait <= interval + interval / 10,
                "{wait:?}"
            );
            let end = convert::unix_ms(SystemTime::now() + wait);
            let ms = i64::try_from(interval.as_millis()).unwrap();
            // Within a few ms of a multiple of the interval.
            assert!(end % ms < 5 || end % ms > ms - 5, "{end} for {interval:?}");
        }
    }

    #[test]
    fn rows_are_reported_once_as_changes() {
        let row = |retransmits: u64| TcpStats {
            cgroup_id: 42,
            peer: Some("10.0.0.9".parse().unwrap()),
            port: 80,
            retransmits,
            ..TcpStats::default()
        };
        let snapshot = |retransmits: u64| Snapshot {
            taken_at: SystemTime::now(),
            tcp: vec![row(retransmits)],
            tcp_unsolicited_resets: 0,
            sched: Vec::new(),
            block: Vec::new(),
            counters: BTreeMap::new(),
            fallback: None,
        };
        let target = Watched {
            selector: "container api".into(),
            name: "api".into(),
            resolved: None,
            ids: [(Group::Tcp, 42)].into_iter().collect(),
            cgroup: "/docker/abc".into(),
            cpu_dir: None,
            memory_dir: None,
            notes: Vec::new(),
        };
        let mut reported = Reported::default();
        // Counts from before the subscription are a baseline, not news.
        reported.baseline(&snapshot(5), &[(Group::Tcp, 42)].into_iter().collect());
        let mut wire = pb::TargetTelemetry::default();
        collect_rows(&mut wire, &target, &snapshot(9), &mut reported);
        assert_eq!(wire.tcp.len(), 1);
        assert_eq!(wire.tcp[0].retransmits, 4);
        let mut wire = pb::TargetTelemetry::default();
        collect_rows(&mut wire, &target, &snapshot(9), &mut reported);
        assert!(wire.tcp.is_empty(), "unchanged rows are left out");
    }
}
