//! Run telemetry in the terminal and in reports.
//!
//! - [`insights`] turns a run's stored telemetry (`RunDetail.telemetry`) into the report's
//!   "eBPF insights": per target, TCP retransmits, connect failures by the errno the
//!   application saw (ECONNREFUSED, ETIMEDOUT...), connection errors, run-queue latency p95 and
//!   context switches before / during / after the faults (the report's phases), OOM kills with
//!   their victims, and process exits by exit code or signal; across targets, the time from
//!   the first fault applied to the first connection failure; and how it was collected (eBPF
//!   programs, or `/proc` and cgroup fallbacks), with every loss counted.
//! - [`render_text_section`], [`render_markdown_section`] and [`render_html_section`] render
//!   it in the report's formats (JSON is the [`Insights`] structure itself).
//! - [`run`] is `faultline telemetry RUN [--follow]`: one line per target and second
//!   (retransmits/s, connect failures by errno, run-queue p95, OOM kills, exits), live while
//!   following.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use faultline_domain::plan::log2_quantile_us;
use faultline_proto::v1 as pb;
use serde::Serialize;

use crate::report::{Moment, PhaseSpan, Phases, fmt_offset, fmt_span, html_escape, rfc3339};

/// Peers listed per target at most (the ones with most failures and retransmits).
const PEERS_LISTED: usize = 10;
/// Exit rows listed at most (failures first).
const EXITS_LISTED: usize = 20;

pub use faultline_domain::plan::errno_name;

/// The name of a signal number (Linux x86-64/arm64 numbering).
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// The report's "eBPF insights". Field order is the JSON order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Insights {
    /// `bpf` (every signal from eBPF programs), `fallback` (only `/proc` and cgroup figures),
    /// `bpf+fallback`, or `none`.
    pub mechanism: String,
    /// How each agent collected each group of signals.
    pub sources: Vec<SourceInfo>,
    /// Sums over the targets.
    pub totals: InsightTotals,
    /// First fault applied -> the first connect failure or connection error at or after it;
    /// `null` without an applied fault or such a failure.
    pub time_to_first_failure_ms: Option<i64>,
    /// That failure.
    pub first_failure: Option<FailureInfo>,
    pub targets: Vec<TargetInsights>,
    /// OOM kills with their victims, oldest first.
    pub oom_kills: Vec<OomKillInfo>,
    /// Process exits by target, command and outcome: failures (signal or non-zero code)
    /// first, at most 20 rows.
    pub exits: Vec<ExitInfo>,
    pub losses: Losses,
    /// What the agents could not watch, and what the figures cannot say.
    pub notes: Vec<String>,
}

/// How one agent collected one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceInfo {
    pub agent: String,
    /// tcp, sched, oom, proc or block.
    pub group: String,
    /// bpf, fallback or none.
    pub mechanism: String,
    pub detail: String,
}

/// Sums over every target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InsightTotals {
    pub retransmits: u64,
    pub syn_retransmits: u64,
    pub connect_failures: u64,
    /// By errno name, e.g. `{"ECONNREFUSED": 12}`.
    pub connect_failures_by_errno: BTreeMap<String, u64>,
    pub connection_errors_by_errno: BTreeMap<String, u64>,
    pub oom_kills: u64,
    /// Exits with a signal or a non-zero code.
    pub failed_exits: u64,
    pub exits: u64,
}

/// A figure per phase of the run: before the first fault was applied, while faults were in
/// force (the report's `during` phase), after the last was reverted; `null` where it has none.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PhaseFigures {
    pub before: Option<f64>,
    pub during: Option<f64>,
    pub after: Option<f64>,
}

/// A count per phase of the run (see [`PhaseFigures`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PhaseCounts {
    pub before: u64,
    pub during: u64,
    pub after: u64,
}

/// One peer of a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerInsights {
    /// `10.0.0.5:5432` (outbound), or `inbound :80 from 10.0.0.9`.
    pub peer: String,
    pub established: u64,
    pub retransmits: u64,
    pub connect_failures_by_errno: BTreeMap<String, u64>,
}

/// Fallback figures of a target (`/proc/<pid>/net/snmp` of its network namespace, its cgroup
/// files): namespace- or cgroup-wide, without peers or errnos.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FallbackInsights {
    pub retransmitted_segments: Option<u64>,
    pub failed_connection_attempts: Option<u64>,
    pub established_resets: Option<u64>,
    pub throttled_periods: Option<u64>,
    pub throttled_ms: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// One target (a container, cgroup or process) on one agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetInsights {
    pub agent: String,
    /// The container name, cgroup path or `comm (pid N)`.
    pub target: String,
    /// The plan's selector.
    pub selector: String,
    pub cgroup: String,
    /// bpf or fallback: how this agent collected the TCP figures.
    pub mechanism: String,
    pub established: u64,
    pub retransmits: u64,
    pub syn_retransmits: u64,
    pub retransmits_by_phase: PhaseCounts,
    /// The largest per-second rate of retransmits over the run's buckets.
    pub peak_retransmits_per_sec: Option<f64>,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub connect_failures_by_errno: BTreeMap<String, u64>,
    pub connect_failures_by_phase: PhaseCounts,
    pub connection_errors_by_errno: BTreeMap<String, u64>,
    /// Up to 10, most failures and retransmits first.
    pub peers: Vec<PeerInsights>,
    /// Run-queue latency p95 (runnable -> running), milliseconds to the microsecond.
    pub runq_p95_ms: PhaseFigures,
    pub context_switches_per_sec: PhaseFigures,
    pub oom_kills: u64,
    pub exits: u64,
    pub failed_exits: u64,
    pub fallback: Option<FallbackInsights>,
}

/// The first connection failure after the first fault was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureInfo {
    pub at: Moment,
    pub agent: String,
    pub target: String,
    /// connect-failed or connection-error.
    pub kind: String,
    pub errno: String,
    pub remote: Option<String>,
    pub pid: u32,
    pub comm: String,
}

/// An OOM kill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OomKillInfo {
    pub at: Moment,
    pub agent: String,
    pub target: String,
    /// The victim.
    pub pid: u32,
    pub comm: String,
    pub detail: Option<String>,
}

/// Exits of one command of one target with one outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    pub agent: String,
    pub target: String,
    pub comm: String,
    /// Set for a normal exit.
    pub code: Option<i32>,
    /// Set when a signal ended the process.
    pub signal: Option<String>,
    pub count: u64,
}

/// Everything lost on the way, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// Events the kernel could not queue (ring buffer full).
    pub kernel_events: u64,
    /// Aggregate updates lost to a full kernel map.
    pub kernel_map_full: u64,
    /// Events agents left out of their batches.
    pub agent_events: u64,
    /// Batches dropped by agents or missing at the coordinator.
    pub batches: u64,
    /// Events and samples over the coordinator's per-run limits.
    pub events_not_stored: u64,
    pub samples_not_stored: u64,
}

impl Losses {
    fn any(&self) -> bool {
        self.kernel_events
            + self.kernel_map_full
            + self.agent_events
            + self.batches
            + self.events_not_stored
            + self.samples_not_stored
            > 0
    }

    fn text(&self) -> String {
        if !self.any() {
            return "none".into();
        }
        format!(
            "{} kernel event(s), {} kernel map update(s), {} agent event(s), {} batch(es), {} \
             event(s) and {} sample(s) over the coordinator's limits",
            self.kernel_events,
            self.kernel_map_full,
            self.agent_events,
            self.batches,
            self.events_not_stored,
            self.samples_not_stored
        )
    }
}

/// The `q`-quantile of a log2 histogram in milliseconds (to the microsecond), interpolated
/// inside its bucket and never above the largest sample; `None` without samples.
pub fn quantile_ms(h: &pb::Log2Histogram, q: f64) -> Option<f64> {
    log2_quantile_us(&h.buckets, q, h.max_ns).map(|us| us.round() / 1000.0)
}

fn merge_histogram(into: &mut pb::Log2Histogram, other: &pb::Log2Histogram) {
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

fn add_errnos(into: &mut BTreeMap<String, u64>, counts: &[pb::ErrnoCount]) {
    for c in counts.iter().filter(|c| c.count > 0) {
        *into.entry(errno_name(c.errno)).or_default() += c.count;
    }
}

fn failed_exit(e: &pb::ExitCount) -> bool {
    e.signal.is_some() || e.code.is_some_and(|c| c != 0)
}

/// Which phase a sample's bucket belongs to (by its middle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    During,
    After,
}

/// The telemetry's phases, `[start, end)` in Unix milliseconds: *during* is the report's
/// (first fault applied -> last fault reverted); *before* is everything before it and *after*
/// everything after it (telemetry runs from the run's start to its end, so the stage delays
/// before the first fault count as before). Without faults applied, the report's baseline
/// and after phases. A time bucket (1 s, aligned on the second) belongs to *during* when it
/// overlaps the faults' window at all: what happened in the second a fault was applied or
/// reverted is counted with the faults.
fn windows(phases: &Phases) -> [Option<(i64, i64)>; 3] {
    let bounds = |span: &Option<PhaseSpan>| span.as_ref().map(|s| (s.start.unix_ms, s.end.unix_ms));
    match bounds(&phases.during) {
        Some((start, end)) => [
            Some((i64::MIN, start)),
            Some((start, end)),
            Some((end, i64::MAX)),
        ],
        None => [bounds(&phases.baseline), None, bounds(&phases.after)],
    }
}

/// The phase of the bucket `[start, end)`: the first of during, before, after it overlaps.
fn phase_of(windows: &[Option<(i64, i64)>; 3], start: i64, end: i64) -> Option<Phase> {
    let overlaps = |w: &Option<(i64, i64)>| w.is_some_and(|(s, e)| start < e && s < end);
    [Phase::During, Phase::Before, Phase::After]
        .into_iter()
        .zip([&windows[1], &windows[0], &windows[2]])
        .find_map(|(phase, w)| overlaps(w).then_some(phase))
}

/// Per target, while reading the samples.
#[derive(Default)]
struct Acc {
    selector: String,
    cgroup: String,
    established: u64,
    retransmits: u64,
    syn_retransmits: u64,
    retransmits_by_phase: PhaseCounts,
    peak: Option<f64>,
    resets_sent: u64,
    resets_received: u64,
    connect_failed: BTreeMap<String, u64>,
    failures_by_phase: PhaseCounts,
    connection_errors: BTreeMap<String, u64>,
    peers: BTreeMap<String, PeerInsights>,
    runq: [pb::Log2Histogram; 3],
    switches: [u64; 3],
    /// Milliseconds of samples per phase.
    covered_ms: [u64; 3],
    oom_kills: u64,
    exits: BTreeMap<(String, Option<i32>, Option<i32>), u64>,
    fallback: Option<FallbackInsights>,
}

fn bump(counts: &mut PhaseCounts, phase: Option<Phase>, n: u64) {
    match phase {
        Some(Phase::Before) => counts.before += n,
        Some(Phase::During) => counts.during += n,
        Some(Phase::After) => counts.after += n,
        None => {}
    }
}

fn add_opt(into: &mut Option<u64>, other: Option<u64>) {
    if let Some(other) = other {
        *into = Some(into.unwrap_or(0) + other);
    }
}

fn peer_label(row: &pb::TcpTelemetry) -> String {
    match (row.inbound, row.peer.is_empty()) {
        (true, true) => format!("inbound :{}", row.port),
        (true, false) => format!("inbound :{} from {}", row.port, row.peer),
        (false, true) => format!("?:{}", row.port),
        (false, false) if row.peer.contains(':') => format!("[{}]:{}", row.peer, row.port),
        (false, false) => format!("{}:{}", row.peer, row.port),
    }
}

impl Acc {
    fn is_empty(&self) -> bool {
        self.established + self.retransmits + self.resets_sent + self.resets_received == 0
            && self.connect_failed.is_empty()
            && self.connection_errors.is_empty()
            && self.switches.iter().all(|n| *n == 0)
            && self.runq.iter().all(|h| h.count == 0)
            && self.oom_kills == 0
            && self.exits.is_empty()
            && self.fallback.is_none()
    }

    fn add(&mut self, sample: &pb::TelemetrySample, t: &pb::TargetTelemetry, phase: Option<Phase>) {
        if !t.selector.is_empty() {
            self.selector.clone_from(&t.selector);
        }
        if !t.cgroup.is_empty() {
            self.cgroup.clone_from(&t.cgroup);
        }
        let mut retransmits = 0;
        for row in &t.tcp {
            let failed: u64 = row.connect_failed.iter().map(|c| c.count).sum();
            retransmits += row.retransmits;
            self.established += row.active_established + row.passive_established;
            self.syn_retransmits += row.syn_retransmits;
            self.resets_sent += row.resets_sent;
            self.resets_received += row.resets_received;
            add_errnos(&mut self.connect_failed, &row.connect_failed);
            add_errnos(&mut self.connection_errors, &row.connection_errors);
            bump(&mut self.failures_by_phase, phase, failed);
            let peer = self
                .peers
                .entry(peer_label(row))
                .or_insert_with(|| PeerInsights {
                    peer: peer_label(row),
                    established: 0,
                    retransmits: 0,
                    connect_failures_by_errno: BTreeMap::new(),
                });
            peer.established += row.active_established + row.passive_established;
            peer.retransmits += row.retransmits;
            add_errnos(&mut peer.connect_failures_by_errno, &row.connect_failed);
        }
        self.retransmits += retransmits;
        bump(&mut self.retransmits_by_phase, phase, retransmits);
        if retransmits > 0 && sample.width_ms > 0 {
            let rate = retransmits as f64 * 1000.0 / f64::from(sample.width_ms);
            self.peak = Some(self.peak.map_or(rate, |p: f64| p.max(rate)));
        }
        if let Some(phase) = phase {
            self.covered_ms[phase as usize] += u64::from(sample.width_ms);
        }
        if let (Some(sched), Some(phase)) = (&t.sched, phase) {
            let i = phase as usize;
            self.switches[i] += sched.switches;
            if let Some(h) = &sched.runq_latency {
                merge_histogram(&mut self.runq[i], h);
            }
        }
        self.oom_kills += t.oom_kills;
        for e in &t.exits {
            *self
                .exits
                .entry((e.comm.clone(), e.code, e.signal))
                .or_default() += e.count;
        }
        if let Some(f) = &t.fallback {
            let mine = self.fallback.get_or_insert_with(FallbackInsights::default);
            add_opt(&mut mine.retransmitted_segments, f.retrans_segs);
            add_opt(&mut mine.failed_connection_attempts, f.attempt_fails);
            add_opt(&mut mine.established_resets, f.estab_resets);
            add_opt(&mut mine.throttled_periods, f.nr_throttled);
            add_opt(&mut mine.throttled_ms, f.throttled_us.map(|us| us / 1000));
            add_opt(&mut mine.oom_kills, f.oom_kills);
        }
    }
}

/// The overall mechanism of a set of sources.
fn overall_mechanism(sources: &[SourceInfo]) -> String {
    let used: BTreeSet<&str> = sources
        .iter()
        .filter(|s| matches!(s.group.as_str(), "tcp" | "sched" | "oom"))
        .map(|s| s.mechanism.as_str())
        .filter(|m| *m != "none")
        .collect();
    match (used.contains("bpf"), used.contains("fallback")) {
        (true, true) => "bpf+fallback",
        (true, false) => "bpf",
        (false, true) => "fallback",
        (false, false) => "none",
    }
    .to_string()
}

/// The "eBPF insights" of a run from its stored telemetry, judged in the report's `phases`.
pub fn insights(
    telemetry: &pb::RunTelemetry,
    phases: &Phases,
    first_applied_ms: Option<i64>,
    moment: &impl Fn(i64) -> Moment,
) -> Insights {
    let sources: Vec<SourceInfo> = telemetry
        .sources
        .iter()
        .flat_map(|agent| {
            agent.sources.iter().map(|s| SourceInfo {
                agent: agent.agent.clone(),
                group: s.group.clone(),
                mechanism: s.mechanism.clone(),
                detail: s.detail.clone(),
            })
        })
        .collect();
    let tcp_mechanism = |agent: &str| {
        sources
            .iter()
            .find(|s| s.agent == agent && s.group == "tcp")
            .map_or_else(|| "none".to_string(), |s| s.mechanism.clone())
    };

    let windows = windows(phases);
    let mut accs: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for sample in &telemetry.samples {
        let Some(t) = &sample.target else { continue };
        let end = sample.at_unix_ms + i64::from(sample.width_ms.max(1));
        let phase = phase_of(&windows, sample.at_unix_ms, end);
        accs.entry((sample.agent.clone(), t.name.clone()))
            .or_default()
            .add(sample, t, phase);
    }

    let mut totals = InsightTotals::default();
    let mut exits = Vec::new();
    let targets: Vec<TargetInsights> = accs
        .into_iter()
        // A target named by its selector and without any figure is one that was not resolved
        // (yet) when the agent reported it: its figures are under its resolved name.
        .filter(|((_, target), acc)| !(acc.is_empty() && *target == acc.selector))
        .map(|((agent, target), acc)| {
            let runq = |i: usize| quantile_ms(&acc.runq[i], 0.95);
            // Per second of the phase the target's samples cover.
            let rate = |i: usize| {
                let secs = acc.covered_ms[i] as f64 / 1000.0;
                (secs > 0.0 && (acc.runq[i].count > 0 || acc.switches[i] > 0))
                    .then(|| (acc.switches[i] as f64 / secs * 10.0).round() / 10.0)
            };
            let failed_exits: u64 = acc
                .exits
                .iter()
                .filter(|((_, code, signal), _)| signal.is_some() || code.is_some_and(|c| c != 0))
                .map(|(_, n)| n)
                .sum();
            let exit_count: u64 = acc.exits.values().sum();
            for ((comm, code, signal), count) in &acc.exits {
                exits.push(ExitInfo {
                    agent: agent.clone(),
                    target: target.clone(),
                    comm: comm.clone(),
                    code: *code,
                    signal: signal.map(signal_name),
                    count: *count,
                });
            }
            let mut peers: Vec<PeerInsights> = acc.peers.into_values().collect();
            peers.sort_by_key(|p| {
                std::cmp::Reverse(p.connect_failures_by_errno.values().sum::<u64>() + p.retransmits)
            });
            peers.truncate(PEERS_LISTED);
            totals.retransmits += acc.retransmits;
            totals.syn_retransmits += acc.syn_retransmits;
            for (errno, n) in &acc.connect_failed {
                *totals
                    .connect_failures_by_errno
                    .entry(errno.clone())
                    .or_default() += n;
                totals.connect_failures += n;
            }
            for (errno, n) in &acc.connection_errors {
                *totals
                    .connection_errors_by_errno
                    .entry(errno.clone())
                    .or_default() += n;
            }
            totals.oom_kills += acc.oom_kills;
            totals.failed_exits += failed_exits;
            totals.exits += exit_count;
            TargetInsights {
                mechanism: tcp_mechanism(&agent),
                agent,
                target,
                selector: acc.selector,
                cgroup: acc.cgroup,
                established: acc.established,
                retransmits: acc.retransmits,
                syn_retransmits: acc.syn_retransmits,
                retransmits_by_phase: acc.retransmits_by_phase,
                peak_retransmits_per_sec: acc.peak.map(|p| (p * 10.0).round() / 10.0),
                resets_sent: acc.resets_sent,
                resets_received: acc.resets_received,
                connect_failures_by_errno: acc.connect_failed,
                connect_failures_by_phase: acc.failures_by_phase,
                connection_errors_by_errno: acc.connection_errors,
                peers,
                runq_p95_ms: PhaseFigures {
                    before: runq(0),
                    during: runq(1),
                    after: runq(2),
                },
                context_switches_per_sec: PhaseFigures {
                    before: rate(0),
                    during: rate(1),
                    after: rate(2),
                },
                oom_kills: acc.oom_kills,
                exits: exit_count,
                failed_exits,
                fallback: acc.fallback,
            }
        })
        .collect();
    exits.sort_by_key(|e| {
        let failed = e.signal.is_some() || e.code.is_some_and(|c| c != 0);
        (!failed, std::cmp::Reverse(e.count))
    });
    exits.truncate(EXITS_LISTED);

    let mut events: Vec<(&str, &pb::TelemetryEvent)> = telemetry
        .events
        .iter()
        .filter_map(|e| e.event.as_ref().map(|ev| (e.agent.as_str(), ev)))
        .collect();
    events.sort_by_key(|(_, e)| e.at_unix_ms);
    let first_failure = first_applied_ms.and_then(|applied| {
        events
            .iter()
            .find(|(_, e)| {
                matches!(e.kind.as_str(), "connect-failed" | "connection-error")
                    && e.at_unix_ms >= applied
            })
            .map(|(agent, e)| FailureInfo {
                at: moment(e.at_unix_ms),
                agent: (*agent).to_string(),
                target: e.target.clone(),
                kind: e.kind.clone(),
                errno: errno_name(e.errno),
                remote: (!e.remote.is_empty()).then(|| e.remote.clone()),
                pid: e.pid,
                comm: e.comm.clone(),
            })
    });
    let oom_kills = events
        .iter()
        .filter(|(_, e)| e.kind == "oom-kill")
        .map(|(agent, e)| OomKillInfo {
            at: moment(e.at_unix_ms),
            agent: (*agent).to_string(),
            target: e.target.clone(),
            pid: e.pid,
            comm: e.comm.clone(),
            detail: (!e.detail.is_empty()).then(|| e.detail.clone()),
        })
        .collect();

    let drops = telemetry.drops.unwrap_or_default();
    let losses = Losses {
        kernel_events: drops.kernel_events,
        kernel_map_full: drops.kernel_map_full,
        agent_events: drops.agent_events,
        batches: drops.batches,
        events_not_stored: telemetry.events_not_stored,
        samples_not_stored: telemetry.samples_not_stored,
    };
    let mut notes = telemetry.notes.clone();
    if totals.connect_failures > 0 && first_failure.is_none() && first_applied_ms.is_some() {
        notes.push(
            "connect failures were counted but none of their events after the first fault \
             was kept: no time to first failure"
                .into(),
        );
    }
    Insights {
        mechanism: overall_mechanism(&sources),
        time_to_first_failure_ms: first_failure
            .as_ref()
            .zip(first_applied_ms)
            .map(|(f, applied)| f.at.unix_ms - applied),
        first_failure,
        sources,
        totals,
        targets,
        oom_kills,
        exits,
        losses,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering.

/// Heading of the section.
pub const TITLE: &str = "eBPF insights";

fn errno_text(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(name, n)| format!("{name} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms_text(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1.0 => format!("{:.0} µs", ms * 1000.0),
        Some(ms) => format!("{ms:.3} ms"),
    }
}

fn phases_text(f: &PhaseFigures, unit: impl Fn(Option<f64>) -> String) -> String {
    format!(
        "before {} · during {} · after {}",
        unit(f.before),
        unit(f.during),
        unit(f.after)
    )
}

fn counts_text(c: &PhaseCounts) -> String {
    format!(
        "before {} · during {} · after {}",
        c.before, c.during, c.after
    )
}

fn rate_text(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r}/s"))
}

fn exit_text(e: &ExitInfo) -> String {
    let outcome = match (&e.signal, e.code) {
        (Some(signal), _) => format!("killed by {signal}"),
        (None, Some(code)) => format!("exit code {code}"),
        (None, None) => "exited".into(),
    };
    format!(
        "{} x{}: {outcome} ({} on {})",
        e.comm, e.count, e.target, e.agent
    )
}

fn mechanism_text(insights: &Insights) -> String {
    match insights.mechanism.as_str() {
        "bpf" => "bpf (eBPF programs in the kernel)".into(),
        "fallback" => "fallback (/proc and cgroup figures: coarser, no errnos or peers)".into(),
        "bpf+fallback" => "bpf+fallback (some groups from /proc and cgroup figures)".into(),
        other => other.to_string(),
    }
}

/// The summary facts as (label, value) rows, shared by every format.
fn summary_rows(insights: &Insights) -> Vec<(&'static str, String)> {
    let t = &insights.totals;
    vec![
        ("Mechanism", mechanism_text(insights)),
        (
            "TCP retransmits",
            format!("{} ({} of them SYNs)", t.retransmits, t.syn_retransmits),
        ),
        (
            "Connect failures",
            format!(
                "{}{}",
                t.connect_failures,
                if t.connect_failures > 0 {
                    format!(" ({})", errno_text(&t.connect_failures_by_errno))
                } else {
                    String::new()
                }
            ),
        ),
        (
            "Connection errors",
            errno_text(&t.connection_errors_by_errno),
        ),
        (
            "Time to first failure",
            match (&insights.time_to_first_failure_ms, &insights.first_failure) {
                (Some(ms), Some(f)) => format!(
                    "{} after the first fault ({} {} of {}{})",
                    fmt_span(*ms),
                    f.kind,
                    f.errno,
                    f.target,
                    f.remote
                        .as_ref()
                        .map_or_else(String::new, |r| format!(" to {r}"))
                ),
                _ => "-".into(),
            },
        ),
        ("OOM kills", t.oom_kills.to_string()),
        (
            "Process exits",
            format!(
                "{} ({} failed: signal or non-zero code)",
                t.exits, t.failed_exits
            ),
        ),
        ("Losses", insights.losses.text()),
    ]
}

fn target_rows(t: &TargetInsights) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        (
            "selector",
            format!("{} (cgroup {})", t.selector, or_dash(&t.cgroup)),
        ),
        ("mechanism", t.mechanism.clone()),
        ("connections", format!("{} established", t.established)),
        (
            "retransmits",
            format!(
                "{} ({} SYN; {}; peak {})",
                t.retransmits,
                t.syn_retransmits,
                counts_text(&t.retransmits_by_phase),
                rate_text(t.peak_retransmits_per_sec)
            ),
        ),
        (
            "connect failures",
            format!(
                "{} ({})",
                errno_text(&t.connect_failures_by_errno),
                counts_text(&t.connect_failures_by_phase)
            ),
        ),
        (
            "connection errors",
            errno_text(&t.connection_errors_by_errno),
        ),
        (
            "resets",
            format!("{} sent, {} received", t.resets_sent, t.resets_received),
        ),
        ("run-queue p95", phases_text(&t.runq_p95_ms, ms_text)),
        (
            "context switches",
            phases_text(&t.context_switches_per_sec, rate_text),
        ),
        ("OOM kills", t.oom_kills.to_string()),
        ("exits", format!("{} ({} failed)", t.exits, t.failed_exits)),
    ];
    for p in &t.peers {
        rows.push((
            "peer",
            format!(
                "{}: {} established, {} retransmits, failures {}",
                p.peer,
                p.established,
                p.retransmits,
                errno_text(&p.connect_failures_by_errno)
            ),
        ));
    }
    if let Some(f) = &t.fallback {
        let o = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
        rows.push((
            "fallback",
            format!(
                "retransmitted segments {}, failed attempts {}, resets {}, throttled periods \
                 {} ({} ms), OOM kills {}",
                o(f.retransmitted_segments),
                o(f.failed_connection_attempts),
                o(f.established_resets),
                o(f.throttled_periods),
                o(f.throttled_ms),
                o(f.oom_kills)
            ),
        ));
    }
    rows
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// The section in the text report.
pub fn render_text_section(insights: Option<&Insights>) -> String {
    let mut out = format!("\n{TITLE}\n");
    let Some(insights) = insights else {
        out.push_str("  none collected\n");
        return out;
    };
    for (label, value) in summary_rows(insights) {
        let _ = writeln!(out, "  {:<22} {value}", label.to_lowercase());
    }
    for t in &insights.targets {
        let _ = writeln!(out, "\n  {} on {}", t.target, t.agent);
        for (label, value) in target_rows(t) {
            let _ = writeln!(out, "    {label:<18} {value}");
        }
    }
    if !insights.oom_kills.is_empty() {
        out.push_str("\n  OOM kills\n");
        for k in &insights.oom_kills {
            let _ = writeln!(
                out,
                "    {:>9}  {} (pid {}) in {} on {}{}",
                fmt_offset(k.at.offset_ms),
                k.comm,
                k.pid,
                k.target,
                k.agent,
                k.detail
                    .as_ref()
                    .map_or_else(String::new, |d| format!(": {d}"))
            );
        }
    }
    if !insights.exits.is_empty() {
        out.push_str("\n  process exits\n");
        for e in &insights.exits {
            let _ = writeln!(out, "    {}", exit_text(e));
        }
    }
    out.push_str("\n  sources\n");
    for s in &insights.sources {
        let _ = writeln!(
            out,
            "    {:<8} {:<6} {:<9} {}",
            s.agent, s.group, s.mechanism, s.detail
        );
    }
    for note in &insights.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}

fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '~' | '!' | '{' | '}' => {
                out.push('\\');
                out.push(ch);
            }
            '\n' | '\r' => out.push(' '),
            _ => out.push(ch),
        }
    }
    out
}

/// The section in the Markdown report.
pub fn render_markdown_section(insights: Option<&Insights>) -> String {
    let mut out = format!("\n## {TITLE}\n\n");
    let Some(insights) = insights else {
        out.push_str("None collected.\n");
        return out;
    };
    out.push_str("| | |\n|---|---|\n");
    for (label, value) in summary_rows(insights) {
        let _ = writeln!(out, "| {label} | {} |", md(&value));
    }
    for t in &insights.targets {
        let _ = write!(
            out,
            "\n### {} on {}\n\n| | |\n|---|---|\n",
            md(&t.target),
            md(&t.agent)
        );
        for (label, value) in target_rows(t) {
            let _ = writeln!(out, "| {} | {} |", md(label), md(&value));
        }
    }
    if !insights.oom_kills.is_empty() {
        out.push_str("\n### OOM kills\n\n");
        for k in &insights.oom_kills {
            let _ = writeln!(
                out,
                "- {} {} (pid {}) in {} on {}",
                fmt_offset(k.at.offset_ms),
                md(&k.comm),
                k.pid,
                md(&k.target),
                md(&k.agent)
            );
        }
    }
    if !insights.exits.is_empty() {
        out.push_str("\n### Process exits\n\n");
        for e in &insights.exits {
            let _ = writeln!(out, "- {}", md(&exit_text(e)));
        }
    }
    out.push_str("\n### Sources\n\n| Agent | Group | Mechanism | Detail |\n|---|---|---|---|\n");
    for s in &insights.sources {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            md(&s.agent),
            md(&s.group),
            md(&s.mechanism),
            md(&s.detail)
        );
    }
    for note in &insights.notes {
        let _ = writeln!(out, "\n- Note: {}", md(note));
    }
    out
}

/// The section in the HTML report (a `<section>` of its own).
pub fn render_html_section(insights: Option<&Insights>) -> String {
    let e = html_escape;
    let mut out = format!("<section><h2>{TITLE}</h2>");
    let Some(insights) = insights else {
        out.push_str("<p class=\"note\">None collected.</p></section>\n");
        return out;
    };
    let kv = |out: &mut String, label: &str, value: &str| {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", e(label), e(value));
    };
    out.push_str("<table class=\"kv\">");
    for (label, value) in summary_rows(insights) {
        kv(&mut out, label, &value);
    }
    out.push_str("</table>");
    for t in &insights.targets {
        let _ = write!(
            out,
            "<h2>{} on {}</h2><table class=\"kv\">",
            e(&t.target),
            e(&t.agent)
        );
        for (label, value) in target_rows(t) {
            kv(&mut out, &capitalized(label), &value);
        }
        out.push_str("</table>");
    }
    if !insights.oom_kills.is_empty() {
        out.push_str("<h2>OOM kills</h2><table class=\"kv\">");
        for k in &insights.oom_kills {
            kv(
                &mut out,
                &fmt_offset(k.at.offset_ms),
                &format!(
                    "{} (pid {}) in {} on {}{}",
                    k.comm,
                    k.pid,
                    k.target,
                    k.agent,
                    k.detail
                        .as_ref()
                        .map_or_else(String::new, |d| format!(": {d}"))
                ),
            );
        }
        out.push_str("</table>");
    }
    if !insights.exits.is_empty() {
        out.push_str("<h2>Process exits</h2><ul>");
        for x in &insights.exits {
            let _ = write!(out, "<li>{}</li>", e(&exit_text(x)));
        }
        out.push_str("</ul>");
    }
    out.push_str(
        "<h2>Sources</h2><div class=\"scroll\"><table><thead><tr><th>Agent</th><th>Group</th>\
         <th>Mechanism</th><th>Detail</th></tr></thead><tbody>",
    );
    for s in &insights.sources {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"wrap\">{}</td></tr>",
            e(&s.agent),
            e(&s.group),
            e(&s.mechanism),
            e(&s.detail)
        );
    }
    out.push_str("</tbody></table></div>");
    for note in &insights.notes {
        let _ = write!(out, "<p class=\"note\">{}</p>", e(note));
    }
    out.push_str("</section>\n");
    out
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// `faultline telemetry RUN [--follow]`.

/// One line of the live view: one target over one bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub at_unix_ms: i64,
    pub at: String,
    pub width_ms: u32,
    pub agent: String,
    pub target: String,
    pub retransmits_per_sec: f64,
    pub connect_failures: BTreeMap<String, u64>,
    pub runq_p95_ms: Option<f64>,
    pub oom_kills: u64,
    /// `comm: SIGKILL x2`, `comm: code 1 x1` for failed exits; clean exits are counted.
    pub failed_exits: Vec<String>,
    pub exits: u64,
}

/// The rows of a sample.
pub fn row(sample: &pb::TelemetrySample) -> Option<Row> {
    let t = sample.target.as_ref()?;
    let width = sample.width_ms.max(1);
    let retransmits: u64 = t.tcp.iter().map(|r| r.retransmits).sum();
    let mut failures = BTreeMap::new();
    for r in &t.tcp {
        add_errnos(&mut failures, &r.connect_failed);
    }
    Some(Row {
        at_unix_ms: sample.at_unix_ms,
        at: rfc3339(sample.at_unix_ms),
        width_ms: sample.width_ms,
        agent: sample.agent.clone(),
        target: t.name.clone(),
        retransmits_per_sec: (retransmits as f64 * 1000.0 / f64::from(width) * 10.0).round() / 10.0,
        connect_failures: failures,
        runq_p95_ms: t
            .sched
            .as_ref()
            .and_then(|s| s.runq_latency.as_ref())
            .and_then(|h| quantile_ms(h, 0.95)),
        oom_kills: t.oom_kills,
        failed_exits: t
            .exits
            .iter()
            .filter(|e| failed_exit(e))
            .map(|e| match (e.signal, e.code) {
                (Some(signal), _) => format!("{}: {} x{}", e.comm, signal_name(signal), e.count),
                (None, code) => format!("{}: code {} x{}", e.comm, code.unwrap_or(0), e.count),
            })
            .collect(),
        exits: t.exits.iter().map(|e| e.count).sum(),
    })
}

/// The live view's header line.
pub const HEADER: &str = "time          agent        target                 retrans/s  runq p95   \
                          OOM  connect failures / failed exits";

/// A row as a line of the live view.
pub fn format_row(row: &Row) -> String {
    let time = row.at.get(11..23).unwrap_or(&row.at);
    let mut tail = Vec::new();
    if !row.connect_failures.is_empty() {
        tail.push(errno_text(&row.connect_failures));
    }
    tail.extend(row.failed_exits.iter().cloned());
    format!(
        "{time:<13} {:<12} {:<22} {:>9}  {:>9}  {:>3}  {}",
        truncate(&row.agent, 12),
        truncate(&row.target, 22),
        row.retransmits_per_sec,
        ms_text(row.runq_p95_ms),
        row.oom_kills,
        if tail.is_empty() {
            "-".to_string()
        } else {
            tail.join("; ")
        }
    )
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Per-target totals of a whole answer, as text lines.
pub fn summary_lines(telemetry: &pb::RunTelemetry) -> Vec<String> {
    let phases = Phases {
        baseline: None,
        during: None,
        after: None,
    };
    let insights = insights(telemetry, &phases, None, &|ms| Moment {
        offset_ms: 0,
        unix_ms: ms,
        at: rfc3339(ms),
    });
    let mut lines = vec![format!("mechanism: {}", mechanism_text(&insights))];
    for t in &insights.targets {
        lines.push(format!(
            "{} on {}: {} retransmits (peak {}), connect failures {}, connection errors {}, \
             {} OOM kill(s), {} exit(s) ({} failed)",
            t.target,
            t.agent,
            t.retransmits,
            rate_text(t.peak_retransmits_per_sec),
            errno_text(&t.connect_failures_by_errno),
            errno_text(&t.connection_errors_by_errno),
            t.oom_kills,
            t.exits,
            t.failed_exits
        ));
    }
    for k in &insights.oom_kills {
        lines.push(format!(
            "OOM kill at {}: {} (pid {}) in {} on {}",
            k.at.at, k.comm, k.pid, k.target, k.agent
        ));
    }
    if insights.losses.any() {
        lines.push(format!("losses: {}", insights.losses.text()));
    }
    lines.extend(insights.notes.iter().map(|n| format!("note: {n}")));
    lines
}

type OperatorClient = pb::operator_client::OperatorClient<tonic::transport::Channel>;

/// How often a follower asks for news.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How long a follower keeps asking after the run ended (the agents' last batches).
const FOLLOW_GRACE: Duration = Duration::from_secs(4);

/// `faultline telemetry RUN [--follow]`: prints the run's telemetry per target and bucket,
/// then per-target totals; `json` prints the rows as JSON instead.
pub async fn run(
    client: &mut OperatorClient,
    run_id: &str,
    follow: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request = |since| pb::GetTelemetryRequest {
        run_id: run_id.to_string(),
        since_unix_ms: since,
    };
    if !follow {
        let telemetry = client.get_telemetry(request(0)).await?.into_inner();
        let rows: Vec<Row> = telemetry.samples.iter().filter_map(row).collect();
        if json {
            let value = serde_json::json!({
                "run_id": run_id,
                "run_state": telemetry.run_state,
                "rows": rows,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(ExitCode::SUCCESS);
        }
        if rows.is_empty() {
            println!(
                "no telemetry stored for run {run_id} ({})",
                telemetry.run_state
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!("{HEADER}");
        for r in &rows {
            println!("{}", format_row(r));
        }
        println!();
        for line in summary_lines(&telemetry) {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }

    // Following: a bucket is printed once a later one exists (it will not grow any more),
    // the last ones when the run is over.
    if !json {
        println!("{HEADER}");
    }
    let mut printed: BTreeSet<(i64, String, String)> = BTreeSet::new();
    let mut since = 0;
    let mut ended: Option<tokio::time::Instant> = None;
    let mut all = pb::RunTelemetry::default();
    loop {
        let answer = client.get_telemetry(request(since)).await?.into_inner();
        let newest = answer.samples.iter().map(|s| s.at_unix_ms).max();
        let over = answer.run_state != "running";
        if over && ended.is_none() {
            ended = Some(tokio::time::Instant::now());
        }
        let done = ended.is_some_and(|at| at.elapsed() >= FOLLOW_GRACE);
        for sample in &answer.samples {
            let Some(r) = row(sample) else { continue };
            let key = (r.at_unix_ms, r.agent.clone(), r.target.clone());
            let closed = newest.is_some_and(|n| r.at_unix_ms < n) || done;
            if closed && printed.insert(key) {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("{}", format_row(&r));
                }
                all.samples.push(sample.clone());
            }
        }
        all.sources = answer.sources;
        all.drops = answer.drops;
        all.notes = answer.notes;
        all.events_not_stored = answer.events_not_stored;
        all.samples_not_stored = answer.samples_not_stored;
        all.events.extend(
            answer
                .events
                .into_iter()
                .filter(|e| e.event.as_ref().is_some_and(|ev| ev.at_unix_ms >= since)),
        );
        if let Some(newest) = newest {
            since = newest;
        }
        if done {
            if !json {
                println!("\nrun {run_id} {}", answer.run_state);
                for line in summary_lines(&all) {
                    println!("{line}");
                }
            }
            return Ok(if answer.run_state == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn moment(ms: i64) -> Moment {
        Moment {
            offset_ms: ms - T0,
            unix_ms: ms,
            at: rfc3339(ms),
        }
    }

    fn span(start: i64, end: i64) -> Option<PhaseSpan> {
        Some(PhaseSpan {
            start: moment(start),
            end: moment(end),
            duration_ms: end - start,
        })
    }

    fn sample(at: i64, retransmits: u64, refused: u64, runq_bucket: usize) -> pb::TelemetrySample {
        let mut buckets = vec![0; runq_bucket + 1];
        buckets[runq_bucket] = 100;
        pb::TelemetrySample {
            agent: "agent-1".into(),
            at_unix_ms: at,
            width_ms: 1000,
            target: Some(pb::TargetTelemetry {
                name: "db".into(),
                selector: "container db".into(),
                cgroup: "/docker/abc".into(),
                tcp: vec![pb::TcpTelemetry {
                    peer: "172.17.0.1".into(),
                    port: 8080,
                    active_established: 5,
                    retransmits,
                    syn_retransmits: retransmits,
                    connect_failed: vec![pb::ErrnoCount {
                        errno: 111,
                        count: refused,
                    }],
                    ..Default::default()
                }],
                sched: Some(pb::SchedTelemetry {
                    runq_latency: Some(pb::Log2Histogram {
                        buckets,
                        count: 100,
                        sum_ns: 0,
                        max_ns: 0,
                    }),
                    switches: 100,
                    involuntary_switches: 0,
                }),
                exits: vec![pb::ExitCount {
                    comm: "sleep".into(),
                    code: None,
                    signal: Some(9),
                    count: 1,
                }],
                oom_kills: u64::from(refused > 0),
                ..Default::default()
            }),
        }
    }

    fn telemetry() -> pb::RunTelemetry {
        pb::RunTelemetry {
            sources: vec![pb::AgentTelemetrySources {
                agent: "agent-1".into(),
                sources: vec![
                    pb::TelemetrySource {
                        group: "tcp".into(),
                        mechanism: "bpf".into(),
                        detail: "tp_btf/inet_sock_set_state".into(),
                    },
                    pb::TelemetrySource {
                        group: "sched".into(),
                        mechanism: "bpf".into(),
                        detail: "tp_btf/sched_switch".into(),
                    },
                ],
            }],
            samples: vec![
                sample(T0 + 1000, 0, 0, 3),
                sample(T0 + 3000, 2, 4, 10),
                sample(T0 + 4000, 1, 3, 10),
                sample(T0 + 7000, 0, 0, 4),
            ],
            events: vec![
                pb::AgentTelemetryEvent {
                    agent: "agent-1".into(),
                    event: Some(pb::TelemetryEvent {
                        at_unix_ms: T0 + 1500,
                        kind: "connect-failed".into(),
                        target: "db".into(),
                        errno: 111,
                        ..Default::default()
                    }),
                },
                pb::AgentTelemetryEvent {
                    agent: "agent-1".into(),
                    event: Some(pb::TelemetryEvent {
                        at_unix_ms: T0 + 3210,
                        kind: "connect-failed".into(),
                        target: "db".into(),
                        errno: 111,
                        remote: "172.17.0.1:8080".into(),
                        pid: 77,
                        comm: "bash".into(),
                        ..Default::default()
                    }),
                },
                pb::AgentTelemetryEvent {
                    agent: "agent-1".into(),
                    event: Some(pb::TelemetryEvent {
                        at_unix_ms: T0 + 4100,
                        kind: "oom-kill".into(),
                        target: "db".into(),
                        pid: 90,
                        comm: "hog".into(),
                        detail: "triggered by hog (pid 90)".into(),
                        ..Default::default()
                    }),
                },
            ],
            drops: Some(pb::TelemetryDrops {
                kernel_events: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn phases() -> Phases {
        Phases {
            baseline: span(T0, T0 + 3000),
            during: span(T0 + 3000, T0 + 6000),
            after: span(T0 + 6000, T0 + 9000),
        }
    }

    #[test]
    fn quantiles_interpolate_within_log2_buckets() {
        let h = pb::Log2Histogram {
            buckets: vec![0, 0, 0, 90, 0, 0, 0, 0, 0, 0, 10],
            count: 100,
            sum_ns: 0,
            max_ns: 0,
        };
        // p50 in [8, 16) us; p95 in [1024, 2048) us.
        let p50 = quantile_ms(&h, 0.5).unwrap();
        assert!((0.008..0.016).contains(&p50), "{p50}");
        let p95 = quantile_ms(&h, 0.95).unwrap();
        assert!((1.024..2.048).contains(&p95), "{p95}");
        let capped = pb::Log2Histogram {
            max_ns: 1_100_000,
            ..h
        };
        assert!(quantile_ms(&capped, 0.99).unwrap() <= 1.1);
        assert_eq!(quantile_ms(&pb::Log2Histogram::default(), 0.95), None);
    }

    #[test]
    fn insights_count_per_phase_and_time_the_first_failure() {
        let i = insights(&telemetry(), &phases(), Some(T0 + 3000), &moment);
        assert_eq!(i.mechanism, "bpf");
        assert_eq!(i.totals.retransmits, 3);
        assert_eq!(i.totals.connect_failures, 7);
        assert_eq!(
            i.totals.connect_failures_by_errno.get("ECONNREFUSED"),
            Some(&7)
        );
        // The failure at +1.5 s came before the first fault: not the first failure.
        assert_eq!(i.time_to_first_failure_ms, Some(210));
        let first = i.first_failure.as_ref().unwrap();
        assert_eq!(
            (
                first.errno.as_str(),
                first.remote.as_deref(),
                first.comm.as_str()
            ),
            ("ECONNREFUSED", Some("172.17.0.1:8080"), "bash")
        );
        let db = &i.targets[0];
        assert_eq!((db.agent.as_str(), db.target.as_str()), ("agent-1", "db"));
        assert_eq!(
            db.connect_failures_by_phase,
            PhaseCounts {
                before: 0,
                during: 7,
                after: 0
            }
        );
        assert_eq!(db.retransmits_by_phase.during, 3);
        assert_eq!(db.peak_retransmits_per_sec, Some(2.0));
        // Before: bucket 3 ([8, 16) us); during: bucket 10 ([1, 2) ms).
        let before = db.runq_p95_ms.before.unwrap();
        let during = db.runq_p95_ms.during.unwrap();
        assert!(
            before <= 0.016 && (1.0..2.1).contains(&during),
            "{before} {during}"
        );
        assert!(db.runq_p95_ms.after.unwrap() < 0.032);
        assert_eq!(db.context_switches_per_sec.during, Some(100.0));
        assert_eq!(db.failed_exits, 4);
        assert_eq!(i.exits[0].signal.as_deref(), Some("SIGKILL"));
        assert_eq!(i.oom_kills.len(), 1);
        assert_eq!(i.oom_kills[0].comm, "hog");
        assert_eq!(i.losses.kernel_events, 2);
        assert_eq!(db.peers[0].peer, "172.17.0.1:8080");
    }

    #[test]
    fn sections_render_in_every_format() {
        let i = insights(&telemetry(), &phases(), Some(T0 + 3000), &moment);
        let text = render_text_section(Some(&i));
        assert!(text.contains("\neBPF insights\n"), "{text}");
        assert!(
            text.contains("connect failures       7 (ECONNREFUSED x7)"),
            "{text}"
        );
        assert!(
            text.contains("time to first failure  210 ms after the first fault"),
            "{text}"
        );
        assert!(text.contains("mechanism              bpf"), "{text}");
        assert!(
            text.contains("sleep x4: killed by SIGKILL (db on agent-1)"),
            "{text}"
        );
        assert!(text.contains("hog (pid 90) in db on agent-1"), "{text}");
        let md = render_markdown_section(Some(&i));
        assert!(md.contains("## eBPF insights"), "{md}");
        assert!(
            md.contains("| TCP retransmits | 3 (3 of them SYNs) |"),
            "{md}"
        );
        let html = render_html_section(Some(&i));
        assert!(html.contains("<h2>eBPF insights</h2>"), "{html}");
        assert!(html.contains("ECONNREFUSED x7"), "{html}");
        assert!(render_text_section(None).contains("none collected"));
        assert!(render_html_section(None).contains("None collected."));
        let fallback = pb::RunTelemetry {
            sources: vec![pb::AgentTelemetrySources {
                agent: "agent-1".into(),
                sources: vec![pb::TelemetrySource {
                    group: "tcp".into(),
                    mechanism: "fallback".into(),
                    detail: "/proc/<pid>/net/snmp".into(),
                }],
            }],
            ..Default::default()
        };
        let f = insights(&fallback, &phases(), None, &moment);
        assert_eq!(f.mechanism, "fallback");
        assert!(render_text_section(Some(&f)).contains("fallback (/proc and cgroup figures"));
    }

    #[test]
    fn reports_with_insights_validate_against_the_schema() {
        let event = |seq: u64, at: i64, kind: &str, fault_id: &str, message: &str| pb::RunEvent {
            run_id: "run-1".into(),
            seq,
            at_unix_ms: at,
            kind: kind.into(),
            stage: if fault_id.is_empty() { "" } else { "cut" }.into(),
            agent: if fault_id.is_empty() { "" } else { "agent-1" }.into(),
            fault_id: fault_id.into(),
            message: message.into(),
            final_state: String::new(),
        };
        let run = pb::RunDetail {
            summary: Some(pb::RunSummary {
                run_id: "run-1".into(),
                title: "partition db".into(),
                state: "completed".into(),
                created_at_unix_ms: T0 - 10,
                finished_at_unix_ms: T0 + 9000,
                operator: "operator/test".into(),
            }),
            plan_yaml: String::new(),
            events: vec![
                event(1, T0, "run-started", "", "1 stage(s), 1 fault(s)"),
                event(2, T0 + 3000, "fault-applied", "run-1/cut/0", "applied"),
                event(
                    3,
                    T0 + 6000,
                    "fault-reverted",
                    "run-1/cut/0",
                    "reverted (schedule)",
                ),
                event(4, T0 + 9000, "run-finished", "", "run completed"),
            ],
            telemetry: Some(telemetry()),
            ..Default::default()
        };
        let report = crate::report::build_report(&run);
        let insights = report.telemetry.as_ref().unwrap();
        assert_eq!(insights.totals.connect_failures, 7);
        let json: serde_json::Value =
            serde_json::from_str(&crate::report::render_json(&report).unwrap()).unwrap();
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/report.schema.json")).unwrap();
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}\n{:#}", json["telemetry"]);
        assert_eq!(json["telemetry"]["mechanism"], "bpf");
        assert_eq!(
            json["telemetry"]["targets"][0]["connect_failures_by_errno"]["ECONNREFUSED"],
            7
        );
        // A wrong shape is caught.
        let mut broken = json.clone();
        broken["telemetry"]["mechanism"] = "ebpf".into();
        assert!(validator.iter_errors(&broken).next().is_some());
        for text in [
            crate::report::render_text(&report),
            crate::report::render_markdown(&report),
            crate::report::render_html(&report),
        ] {
            assert!(text.contains("eBPF insights"));
            assert!(text.contains("ECONNREFUSED x7"));
        }
    }

    #[test]
    fn live_rows_show_rates_failures_and_exits() {
        let r = row(&sample(T0 + 3000, 2, 4, 10)).unwrap();
        assert_eq!(r.retransmits_per_sec, 2.0);
        assert_eq!(r.connect_failures.get("ECONNREFUSED"), Some(&4));
        assert_eq!(r.failed_exits, vec!["sleep: SIGKILL x1".to_string()]);
        let line = format_row(&r);
        assert!(
            line.contains("agent-1") && line.contains("ECONNREFUSED x4"),
            "{line}"
        );
        assert!(line.contains("sleep: SIGKILL x1"), "{line}");
        let lines = summary_lines(&telemetry());
        assert!(
            lines[1].starts_with("db on agent-1: 3 retransmits"),
            "{lines:?}"
        );
    }
}
