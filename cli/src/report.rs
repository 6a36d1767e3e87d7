//! `faultline report RUN`: what a run did, computed on this side from the Operator service's
//! `GetRun` answer (summary, stored plan, events, probe samples) and rendered as text,
//! Markdown, JSON or a self-contained HTML page.
//!
//! The report holds what runs record: the run's state, its timeline, each fault's mechanism,
//! verification, time in force and revert latency, the halt, and the steady-state probes'
//! samples. The samples are split into three phases found from the events ([`Phases`]):
//! *baseline* (run started -> steady-state check), *during* (first fault applied -> last fault
//! reverted) and *after* (last revert -> recovery check); each probe gets its statistics per
//! phase (count, errors, percentiles, throughput, values; [`faultline_domain::probe::summarize`])
//! and the changes against the baseline. Failure detection time is the first failed sample at
//! or after the first fault was applied (while the faults were in force) minus that fault's
//! applied time; recovery time is the last revert to the first sample from which every probe
//! stayed ok to the end of the run. Figures that cannot be worked out are `null` with a note
//! saying why; nothing is estimated. The JSON form is described by `docs/report.schema.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use faultline_domain::duration::parse_duration;
use faultline_domain::plan::{Plan, format_rate, parse_plan};
use faultline_domain::probe::{ProbeKind, ProbeSample, ProbeStats, Window, summarize};
use faultline_proto::v1 as pb;
use serde::Serialize;

/// Version of the report's JSON shape; `docs/report.schema.json` pins it.
pub const REPORT_VERSION: u32 = 2;

use faultline_domain::plan::NOT_EVALUATED;
#[cfg(test)]
use faultline_domain::plan::{CONFIRMED, REFUTED};

/// Most samples drawn one by one in a probe's chart; more are drawn as one point per pixel
/// column (the column's highest latency, and a failure mark if any sample there failed).
const CHART_MAX_POINTS: usize = 1500;

/// A point in the run: milliseconds since the run started (`run-started`), and absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moment {
    /// Milliseconds since the run started; negative before it (e.g. the run's creation).
    pub offset_ms: i64,
    /// Unix time in milliseconds.
    pub unix_ms: i64,
    /// RFC 3339 UTC with milliseconds.
    pub at: String,
}

/// A run's report. Field order is the JSON order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub report_version: u32,
    pub run: RunInfo,
    /// The plan's hypothesis text, if it states one.
    pub hypothesis: Option<String>,
    /// [`CONFIRMED`], [`REFUTED`] or [`NOT_EVALUATED`]; see `verdict`.
    pub verdict: String,
    /// The hypothesis's measurable tolerances, each judged over the faults' window; empty when
    /// the plan states none or no fault was in force.
    pub tolerances: Vec<ToleranceReport>,
    pub totals: Totals,
    pub stages: Vec<StageReport>,
    pub faults: Vec<FaultReport>,
    /// The halt that stopped this run, if one did.
    pub halt: Option<HaltReport>,
    /// The run's phases, as the probes' statistics use them.
    pub phases: Phases,
    /// Steady-state probes, in plan order; empty when the plan has none.
    pub probes: Vec<ProbeReport>,
    /// First fault applied -> the first failed probe sample while faults were in force;
    /// `null` without probes, without an applied fault, or when no probe failed.
    pub failure_detection_ms: Option<i64>,
    /// Last fault reverted -> the first sample from which every probe stayed ok to the end of
    /// the run; `null` without probes or reverts, or when a probe never recovered.
    pub recovery_ms: Option<i64>,
    /// The "eBPF insights": kernel evidence of what the faults did to their targets, judged in
    /// the same phases as the probes; `null` when no agent sent telemetry.
    pub telemetry: Option<crate::telemetry::Insights>,
    pub timeline: Vec<TimelineEntry>,
    /// What the report could not work out, and why.
    pub notes: Vec<String>,
}

/// One tolerance of the hypothesis, judged over the faults' window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToleranceReport {
    pub probe: String,
    /// `error_rate`, `p50`, `p95`, `p99` or `value`.
    pub metric: String,
    /// `p95 latency at most 300ms`.
    pub what: String,
    /// The figure seen, for a person; `null` when the window had nothing to measure.
    pub observed: Option<String>,
    /// The figure seen in the metric's unit (a fraction for error rates, milliseconds for
    /// latencies).
    pub observed_value: Option<f64>,
    pub held: bool,
    /// `api p95 latency 120ms, at most 300ms: held`.
    pub summary: String,
}

/// The run itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
    /// running, completed, failed, halted or aborted.
    pub state: String,
    /// Why it ended as it did (failed, halted, aborted); `null` when nothing to say.
    pub reason: Option<String>,
    pub operator: String,
    pub created: Option<Moment>,
    /// The `run-started` event: offset 0.
    pub started: Option<Moment>,
    pub finished: Option<Moment>,
    /// Started (or created) to finished; `null` while running.
    pub duration_ms: Option<i64>,
    /// The plan's dead-man lease.
    pub lease_ms: Option<u64>,
}

/// Counts over the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub stages_planned: usize,
    pub stages_finished: usize,
    pub faults_planned: usize,
    pub faults_applied: usize,
    pub faults_verified: usize,
    pub faults_reverted: usize,
    /// Faults with at least one failure event (failed, revert failed, revert unconfirmed).
    pub faults_failed: usize,
    /// The largest revert latency over the faults, when any was measured.
    pub max_revert_latency_ms: Option<i64>,
    pub events: usize,
}

/// How far a stage got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageOutcome {
    NotStarted,
    Waiting,
    Running,
    Finished,
    /// Started (or waiting) when the run ended.
    Interrupted,
}

/// One stage of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageReport {
    pub index: usize,
    pub name: String,
    /// The planned delay before the stage.
    pub after_ms: Option<u64>,
    pub fault_count: usize,
    /// `stage-waiting`: the delay began.
    pub waiting: Option<Moment>,
    pub started: Option<Moment>,
    pub finished: Option<Moment>,
    pub duration_ms: Option<i64>,
    pub outcome: StageOutcome,
}

/// How a fault ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultOutcome {
    /// The run never got to it.
    NotStarted,
    /// Sent; no answer recorded.
    Sent,
    /// Not sent, refused, failed or unanswered: not (knowingly) in force.
    NotApplied,
    /// Applied; no revert recorded (yet).
    InForce,
    Reverted,
    /// The agent did not confirm the revert; its lease reverts the fault.
    RevertUnconfirmed,
}

/// A failure event of one fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultFailure {
    pub at: Moment,
    /// fault-failed, fault-revert-failed or fault-revert-unconfirmed.
    pub kind: String,
    pub message: String,
}

/// One fault of the plan, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultReport {
    /// `RUN/STAGE/INDEX`, as the coordinator names it.
    pub id: String,
    pub stage: String,
    /// Position within its stage.
    pub index: usize,
    pub agent: String,
    /// Fault kind, e.g. container-pause; `null` when unknown (no plan, never sent).
    pub kind: Option<String>,
    /// The plan's target selector, e.g. "container db".
    pub target: Option<String>,
    pub planned_duration_ms: Option<u64>,
    /// What the agent resolved the target to.
    pub resolved_target: Option<String>,
    /// How the agent applied it (the `[...]` suffix of its report), e.g. "docker pause".
    pub mechanism: Option<String>,
    /// The agent read the fault back in force before counting it applied.
    pub verified: bool,
    /// The evidence, e.g. "container is paused".
    pub verification: Option<String>,
    pub sent: Option<Moment>,
    pub applied: Option<Moment>,
    /// Applied + planned duration: when the agent's scheduled revert was due.
    pub scheduled_end: Option<Moment>,
    pub reverted: Option<Moment>,
    /// Applied -> reverted.
    pub in_force_ms: Option<i64>,
    /// The agent's reason: schedule, halt, lease-expired, shutdown, journal-recovery...
    pub revert_reason: Option<String>,
    pub revert_detail: Option<String>,
    /// Reverted - scheduled end (negative when reverted early, e.g. by a halt).
    pub revert_latency_ms: Option<i64>,
    /// The coordinator had to ask for the revert (the scheduled one was not reported).
    pub revert_requested: bool,
    pub outcome: FaultOutcome,
    pub failures: Vec<FaultFailure>,
}

/// The halt that stopped the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaltReport {
    /// When the halt was requested: recorded minus its latency, when known.
    pub requested: Option<Moment>,
    /// The `halt` event, recorded once the reverts were acknowledged (or timed out).
    pub recorded: Moment,
    pub reason: Option<String>,
    /// Request -> the last agent's revert acknowledgement.
    pub latency_ms: Option<u64>,
    /// Faults the halt reverted, over all runs.
    pub faults_reverted: Option<u32>,
    /// Reverts the halt could not confirm (their leases revert them).
    pub unconfirmed: Option<String>,
    /// This run's faults reverted with reason "halt".
    pub fault_ids: Vec<String>,
    pub message: String,
}

impl HaltReport {
    /// The halt's facts as (label, value) rows, shared by every format.
    fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = vec![
            ("Reason", or_dash(self.reason.as_deref()).to_string()),
            ("Requested", opt_offset(self.requested.as_ref())),
            ("Acknowledged", fmt_offset(self.recorded.offset_ms)),
            ("Halt latency", opt_u64_span(self.latency_ms)),
            (
                "Faults reverted (all runs)",
                self.faults_reverted
                    .map_or_else(|| "-".into(), |n| n.to_string()),
            ),
            (
                "This run's faults reverted by the halt",
                if self.fault_ids.is_empty() {
                    "none".to_string()
                } else {
                    self.fault_ids.join(", ")
                },
            ),
        ];
        if let Some(unconfirmed) = &self.unconfirmed {
            rows.push(("Unconfirmed", unconfirmed.clone()));
        }
        rows
    }
}

/// A phase of the run: `start` to `end`, the end excluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseSpan {
    pub start: Moment,
    pub end: Moment,
    pub duration_ms: i64,
}

impl PhaseSpan {
    fn window(&self) -> Window {
        Window::new(self.start.unix_ms, self.end.unix_ms)
    }
}

/// The phases the probes' samples are judged in; `null` when the run has no such phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phases {
    /// `run-started` -> the `steady-state-check` (else -> the first stage, else -> the end).
    pub baseline: Option<PhaseSpan>,
    /// First fault applied -> last fault reverted (-> the run's end when a revert is missing);
    /// without an applied fault, the first `stage-started` -> the run's end.
    pub during: Option<PhaseSpan>,
    /// Last fault reverted -> the `recovery-check` (else -> the run's end).
    pub after: Option<PhaseSpan>,
}

/// A probe's figures over one phase; the figures are `null` without samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeWindow {
    pub samples: u64,
    pub errors: u64,
    /// Failed / all, 0..=1.
    pub error_rate: Option<f64>,
    /// Nearest-rank latency percentiles (milliseconds, to the microsecond).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Successful samples per second of the phase.
    pub throughput_per_sec: Option<f64>,
    /// Over the samples with a value (Prometheus probes).
    pub value_min: Option<f64>,
    pub value_mean: Option<f64>,
    pub value_max: Option<f64>,
}

impl ProbeWindow {
    fn empty() -> Self {
        ProbeWindow {
            samples: 0,
            errors: 0,
            error_rate: None,
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
            throughput_per_sec: None,
            value_min: None,
            value_mean: None,
            value_max: None,
        }
    }

    fn of(stats: &ProbeStats) -> Self {
        let ms = |d: Option<Duration>| d.map(duration_ms);
        ProbeWindow {
            samples: stats.count as u64,
            errors: stats.errors as u64,
            error_rate: stats.error_rate.map(|r| round_to(r, 6)),
            p50_ms: ms(stats.latency_p50),
            p95_ms: ms(stats.latency_p95),
            p99_ms: ms(stats.latency_p99),
            throughput_per_sec: stats.throughput_per_sec.map(|t| round_to(t, 3)),
            value_min: stats.value_min,
            value_mean: stats.value_mean.map(|v| round_to(v, 6)),
            value_max: stats.value_max,
        }
    }
}

/// How a later phase compares with the baseline; `null` when either side has no figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeDelta {
    /// Error rate change in percentage points: 0% -> 40% is `40.0`.
    pub error_rate_pp: Option<f64>,
    /// p95 latency change in milliseconds.
    pub p95_ms: Option<f64>,
}

impl ProbeDelta {
    fn between(baseline: &ProbeWindow, other: &ProbeWindow) -> Self {
        let diff = |a: Option<f64>, b: Option<f64>, scale: f64| {
            a.zip(b).map(|(a, b)| round_to((b - a) * scale, 3))
        };
        ProbeDelta {
            error_rate_pp: diff(baseline.error_rate, other.error_rate, 100.0),
            p95_ms: diff(baseline.p95_ms, other.p95_ms, 1.0),
        }
    }
}

/// One failed sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeFailure {
    pub at: Moment,
    /// What the probe saw; `null` when the coordinator left it out.
    pub detail: Option<String>,
}

/// One sample, for plots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbePoint {
    /// Milliseconds since the run started.
    pub offset_ms: i64,
    pub ok: bool,
    pub latency_ms: Option<f64>,
    pub value: Option<f64>,
    /// Why it failed (failed samples only, when known).
    pub detail: Option<String>,
}

/// A steady-state probe: its figures before, during and after the faults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    pub name: String,
    /// http, tcp, command or prometheus; `null` for a probe the plan does not describe.
    pub kind: Option<String>,
    /// What it checks: the URL, address, command or query.
    pub target: Option<String>,
    pub interval_ms: Option<u64>,
    /// Every sample of the run.
    pub total: ProbeWindow,
    pub baseline: ProbeWindow,
    pub during: ProbeWindow,
    pub after: ProbeWindow,
    pub during_vs_baseline: ProbeDelta,
    pub after_vs_baseline: ProbeDelta,
    /// The run's first failed sample of this probe, in any phase.
    pub first_failure: Option<ProbeFailure>,
    /// First fault applied -> this probe's first failed sample while faults were in force.
    pub detection_ms: Option<i64>,
    /// The first sample after the last revert from which this probe stayed ok.
    pub recovered: Option<Moment>,
    /// Last fault reverted -> `recovered`.
    pub recovery_ms: Option<i64>,
    /// The `steady-state-check`'s judgement of this probe; `null` without one.
    pub steady_before: Option<bool>,
    /// The `recovery-check`'s judgement of this probe; `null` without one.
    pub steady_after: Option<bool>,
    pub samples: Vec<ProbePoint>,
}

/// One event of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEntry {
    pub seq: u64,
    #[serde(flatten)]
    pub at: Moment,
    pub kind: String,
    pub stage: Option<String>,
    pub agent: Option<String>,
    pub fault_id: Option<String>,
    pub message: String,
}

/// A Unix time in milliseconds as RFC 3339 UTC, e.g. `2025-01-31T12:00:00.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default());
    humantime::format_rfc3339_millis(at).to_string()
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_string())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `value` rounded to `decimals` decimal places.
fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    // `+ 0.0` turns a negative zero into zero.
    (value * scale).round() / scale + 0.0
}

/// A latency in milliseconds, to the microsecond.
fn duration_ms(duration: Duration) -> f64 {
    round_to(duration.as_nanos() as f64 / 1e6, 3)
}

/// The trailing `[...]` of an agent's report (brackets may nest): the mechanism.
fn split_mechanism(text: &str) -> (&str, Option<&str>) {
    let trimmed = text.trim_end();
    if !trimmed.ends_with(']') {
        return (text, None);
    }
    let mut depth = 0i32;
    for (index, ch) in trimmed.char_indices().rev() {
        match ch {
            ']' => depth += 1,
            '[' => {
                depth -= 1;
                if depth == 0 {
                    let inner = trimmed[index + 1..trimmed.len() - 1].trim();
                    return (trimmed[..index].trim_end(), non_empty_str(inner));
                }
            }
            _ => {}
        }
    }
    (text, None)
}

fn non_empty_str(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// "verified" as a word, not "unverified" nor "not verified".
fn says_verified(text: &str) -> bool {
    text.match_indices("verified").any(|(index, _)| {
        let before = &text[..index];
        let glued = before.chars().next_back().is_some_and(char::is_alphabetic);
        !glued && !before.trim_end().to_ascii_lowercase().ends_with("not")
    })
}

/// What a `fault-applied` message says: `applied to RESOLVED: DETAIL [MECHANISM]`.
#[derive(Debug, Default, PartialEq, Eq)]
struct AppliedMessage {
    resolved: Option<String>,
    mechanism: Option<String>,
    verified: bool,
    verification: Option<String>,
}

fn parse_applied(message: &str) -> AppliedMessage {
    let (body, mechanism) = split_mechanism(message);
    let (resolved, detail) = match body.strip_prefix("applied to ") {
        Some(rest) => match rest.split_once(": ") {
            Some((resolved, detail)) => (non_empty(resolved), detail),
            None => (non_empty(rest), ""),
        },
        None => (None, body),
    };
    let verified = says_verified(message);
    let verification = if verified {
        let evidence = detail
            .find("verified")
            .map(|i| &detail[i + "verified".len()..])
            .unwrap_or(detail);
        non_empty(evidence.trim_start_matches(':').trim())
    } else {
        non_empty(detail.trim())
    };
    AppliedMessage {
        resolved,
        mechanism: mechanism.map(str::to_string),
        verified,
        verification,
    }
}

/// `reverted (REASON): DETAIL` -> (REASON, DETAIL).
fn parse_reverted(message: &str) -> (Option<String>, Option<String>) {
    let Some(rest) = message.strip_prefix("reverted (") else {
        return (None, non_empty(message));
    };
    match rest.split_once("): ") {
        Some((reason, detail)) => (non_empty(reason), non_empty(detail)),
        None => (rest.strip_suffix(')').and_then(non_empty), None),
    }
}

/// What a `halt` event says:
/// `halt-all (REASON): N fault(s) reverted in MS ms[; unconfirmed: ...]`.
#[derive(Debug, Default, PartialEq, Eq)]
struct HaltMessage {
    reason: Option<String>,
    faults_reverted: Option<u32>,
    latency_ms: Option<u64>,
    unconfirmed: Option<String>,
}

fn parse_halt(message: &str) -> HaltMessage {
    const COUNTED: &str = " fault(s) reverted in ";
    let mut parsed = HaltMessage::default();
    let Some(counted_at) = message.find(COUNTED) else {
        return parsed;
    };
    let head = &message[..counted_at];
    if let Some((reason, count)) = head.rsplit_once("): ") {
        parsed.reason = reason.strip_prefix("halt-all (").and_then(non_empty);
        parsed.faults_reverted = count.trim().parse().ok();
    }
    let tail = &message[counted_at + COUNTED.len()..];
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    if tail[digits.len()..].starts_with(" ms") {
        parsed.latency_ms = digits.parse().ok();
    }
    if let Some((_, unconfirmed)) = tail.split_once("; unconfirmed: ") {
        parsed.unconfirmed = non_empty(unconfirmed);
    }
    parsed
}

/// `KIND on TARGET for DURATION (command ID)` of a `fault-sent` event, for faults the plan does
/// not describe.
fn parse_sent(message: &str) -> (Option<String>, Option<String>, Option<u64>) {
    let body = message
        .rsplit_once(" (command ")
        .map_or(message, |(body, _)| body);
    let Some((kind, rest)) = body.split_once(" on ") else {
        return (None, None, None);
    };
    let (target, duration) = match rest.rsplit_once(" for ") {
        Some((target, duration)) => (target, parse_duration(duration).ok().map(millis)),
        None => (rest, None),
    };
    (non_empty(kind), non_empty(target), duration)
}

/// A fault to report on, before its events are read.
#[derive(Debug)]
struct FaultSeed {
    id: String,
    stage: String,
    index: usize,
    agent: String,
    kind: Option<String>,
    target: Option<String>,
    duration_ms: Option<u64>,
}

/// Builds the report of one run from what `GetRun` returns. Pure: no clock, no I/O.
pub fn build_report(run: &pb::RunDetail) -> Report {
    let summary = run.summary.clone().unwrap_or_default();
    let mut events = run.events.clone();
    events.sort_by_key(|e| (e.seq, e.at_unix_ms));
    let mut notes = Vec::new();

    let plan: Option<Plan> = if run.plan_yaml.trim().is_empty() {
        notes.push(
            "the run has no stored plan: fault kinds and durations come from its events".into(),
        );
        None
    } else {
        match parse_plan(&run.plan_yaml) {
            Ok(plan) => Some(plan),
            Err(errors) => {
                let first = errors.first().map(ToString::to_string).unwrap_or_default();
                notes.push(format!(
                    "the stored plan does not parse ({} problem(s), first: {first}): fault kinds \
                     and durations come from the run's events",
                    errors.len()
                ));
                None
            }
        }
    };

    let first_of = |kind: &str| events.iter().find(|e| e.kind == kind);
    let positive = |ms: i64| (ms > 0).then_some(ms);
    let started_ms = first_of("run-started").map(|e| e.at_unix_ms);
    let t0 = started_ms
        .or_else(|| events.first().map(|e| e.at_unix_ms))
        .or(positive(summary.created_at_unix_ms))
        .unwrap_or_default();
    let moment = |ms: i64| Moment {
        offset_ms: ms - t0,
        unix_ms: ms,
        at: rfc3339(ms),
    };

    let last_event = events.iter().rev().find(|e| {
        matches!(e.kind.as_str(), "run-finished" | "run-aborted") || !e.final_state.is_empty()
    });
    let finished_ms = positive(summary.finished_at_unix_ms).or(last_event.map(|e| e.at_unix_ms));
    let state = if summary.state.is_empty() {
        last_event
            .map(|e| e.final_state.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    } else {
        summary.state.clone()
    };
    let over = state != "running" || finished_ms.is_some();
    let begin_ms = started_ms.or(positive(summary.created_at_unix_ms));
    let run_info = RunInfo {
        id: summary.run_id.clone(),
        title: summary.title.clone(),
        description: plan
            .as_ref()
            .and_then(|p| p.description.as_deref())
            .and_then(non_empty),
        state,
        reason: non_empty(&run.reason),
        operator: summary.operator.clone(),
        created: positive(summary.created_at_unix_ms).map(moment),
        started: started_ms.map(moment),
        finished: finished_ms.map(moment),
        duration_ms: begin_ms.zip(finished_ms).map(|(b, f)| f - b),
        lease_ms: plan.as_ref().map(|p| millis(p.lease)),
    };

    // Stages: the plan's, else those the events name, in order.
    let stage_plan: Vec<(String, Option<u64>, usize)> = match &plan {
        Some(plan) => plan
            .stages
            .iter()
            .map(|s| (s.name.clone(), Some(millis(s.after)), s.faults.len()))
            .collect(),
        None => {
            let mut names: Vec<String> = Vec::new();
            for e in events.iter().filter(|e| !e.stage.is_empty()) {
                if !names.contains(&e.stage) {
                    names.push(e.stage.clone());
                }
            }
            names
                .into_iter()
                .map(|name| {
                    let faults: BTreeSet<&str> = events
                        .iter()
                        .filter(|e| e.stage == name && !e.fault_id.is_empty())
                        .map(|e| e.fault_id.as_str())
                        .collect();
                    (name, None, faults.len())
                })
                .collect()
        }
    };
    let stages: Vec<StageReport> = stage_plan
        .into_iter()
        .enumerate()
        .map(|(index, (name, after_ms, fault_count))| {
            let at = |kind: &str| {
                events
                    .iter()
                    .find(|e| e.kind == kind && e.stage == name)
                    .map(|e| moment(e.at_unix_ms))
            };
            let (waiting, started, finished) = (
                at("stage-waiting"),
                at("stage-started"),
                at("stage-finished"),
            );
            let outcome = match (&waiting, &started, &finished) {
                (_, _, Some(_)) => StageOutcome::Finished,
                (_, Some(_), None) if over => StageOutcome::Interrupted,
                (_, Some(_), None) => StageOutcome::Running,
                (Some(_), None, None) if over => StageOutcome::Interrupted,
                (Some(_), None, None) => StageOutcome::Waiting,
                (None, None, None) => StageOutcome::NotStarted,
            };
            let duration_ms = started
                .as_ref()
                .zip(finished.as_ref())
                .map(|(s, f)| f.unix_ms - s.unix_ms);
            StageReport {
                index,
                name,
                after_ms,
                fault_count,
                waiting,
                started,
                finished,
                duration_ms,
                outcome,
            }
        })
        .collect();

    // Faults: the plan's (the coordinator names fault i of stage s of run r `r/s/i`), then any
    // other fault the events mention.
    let mut seeds: Vec<FaultSeed> = Vec::new();
    if let Some(plan) = &plan {
        for stage in &plan.stages {
            for (index, fault) in stage.faults.iter().enumerate() {
                seeds.push(FaultSeed {
                    id: format!("{}/{}/{index}", summary.run_id, stage.name),
                    stage: stage.name.clone(),
                    index,
                    agent: fault.agent.clone(),
                    kind: Some(fault.spec.kind.name().to_string()),
                    target: Some(fault.spec.target.to_string()),
                    duration_ms: Some(millis(fault.spec.duration)),
                });
            }
        }
    }
    for e in events.iter().filter(|e| !e.fault_id.is_empty()) {
        if seeds.iter().any(|s| s.id == e.fault_id) {
            continue;
        }
        let sent = events
            .iter()
            .find(|s| s.fault_id == e.fault_id && s.kind == "fault-sent")
            .or_else(|| {
                events
                    .iter()
                    .find(|s| s.fault_id == e.fault_id && s.kind == "fault-failed")
            });
        let (kind, target, duration_ms) =
            sent.map_or((None, None, None), |s| parse_sent(&s.message));
        let index = e
            .fault_id
            .rsplit_once('/')
            .and_then(|(_, i)| i.parse().ok())
            .unwrap_or_default();
        seeds.push(FaultSeed {
            id: e.fault_id.clone(),
            stage: e.stage.clone(),
            index,
            agent: e.agent.clone(),
            kind,
            target,
            duration_ms,
        });
    }
    let faults: Vec<FaultReport> = seeds
        .into_iter()
        .map(|seed| fault_report(seed, &events, &moment))
        .collect();

    // The halt, if one stopped this run.
    let halt = events.iter().find(|e| e.kind == "halt").map(|e| {
        let parsed = parse_halt(&e.message);
        let requested = parsed
            .latency_ms
            .and_then(|l| i64::try_from(l).ok())
            .map(|l| moment(e.at_unix_ms - l));
        HaltReport {
            requested,
            recorded: moment(e.at_unix_ms),
            reason: parsed.reason,
            latency_ms: parsed.latency_ms,
            faults_reverted: parsed.faults_reverted,
            unconfirmed: parsed.unconfirmed,
            fault_ids: faults
                .iter()
                .filter(|f| f.revert_reason.as_deref() == Some("halt"))
                .map(|f| f.id.clone())
                .collect(),
            message: e.message.clone(),
        }
    });

    let totals = Totals {
        stages_planned: stages.len(),
        stages_finished: stages
            .iter()
            .filter(|s| s.outcome == StageOutcome::Finished)
            .count(),
        faults_planned: faults.len(),
        faults_applied: faults.iter().filter(|f| f.applied.is_some()).count(),
        faults_verified: faults.iter().filter(|f| f.verified).count(),
        faults_reverted: faults.iter().filter(|f| f.reverted.is_some()).count(),
        faults_failed: faults.iter().filter(|f| !f.failures.is_empty()).count(),
        max_revert_latency_ms: faults.iter().filter_map(|f| f.revert_latency_ms).max(),
        events: events.len(),
    };

    let timeline = events
        .iter()
        .map(|e| TimelineEntry {
            seq: e.seq,
            at: moment(e.at_unix_ms),
            kind: e.kind.clone(),
            stage: non_empty(&e.stage),
            agent: non_empty(&e.agent),
            fault_id: non_empty(&e.fault_id),
            message: e.message.clone(),
        })
        .collect();

    // Probes: phases from the events, then each probe's samples judged in them.
    let last_seen = events
        .iter()
        .map(|e| e.at_unix_ms)
        .chain(run.probe_samples.iter().map(|s| s.at_unix_ms + 1))
        .max();
    let run_end = finished_ms.or(last_seen).unwrap_or(t0);
    let bounds = phase_bounds(&events, &faults, started_ms, run_end, &moment);
    let checks = SteadyChecks::of(&events);
    let analysis = analyze_probes(
        run,
        plan.as_ref(),
        &bounds,
        &checks,
        run_end,
        &moment,
        &mut notes,
    );
    let tolerances = judge_tolerances(plan.as_ref(), &bounds, &analysis.during, &mut notes);
    let verdict = verdict(plan.as_ref(), &run_info.state, &checks, &tolerances);
    let telemetry = run
        .telemetry
        .as_ref()
        .map(|t| crate::telemetry::insights(t, &bounds.phases, bounds.first_applied, &moment));
    if verdict == NOT_EVALUATED
        && let Some(note) = not_evaluated_note(plan.as_ref(), &run_info.state, &checks)
    {
        notes.push(note);
    }

    Report {
        report_version: REPORT_VERSION,
        run: run_info,
        hypothesis: plan
            .as_ref()
            .and_then(|p| p.hypothesis.as_deref())
            .and_then(non_empty)
            .map(|h| h.trim().to_string()),
        verdict: verdict.into(),
        tolerances,
        totals,
        stages,
        faults,
        halt,
        phases: bounds.phases,
        probes: analysis.probes,
        failure_detection_ms: analysis.detection_ms,
        recovery_ms: analysis.recovery_ms,
        telemetry,
        timeline,
        notes,
    }
}

/// What a `steady-state-check` or `recovery-check` event said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CheckMessage {
    steady: bool,
    /// Per probe: judged steady or not.
    probes: BTreeMap<String, bool>,
}

/// `baseline 1s (steady): api: steady, 5 samples, ...; db: not steady, ...` (also `after 1s
/// (...)`); `None` when the message does not say.
fn parse_check(message: &str) -> Option<CheckMessage> {
    let (head, tail) = message
        .split_once("): ")
        .unwrap_or((message.trim_end().trim_end_matches(')'), ""));
    let steady = if head.ends_with("(not steady") {
        false
    } else if head.ends_with("(steady") {
        true
    } else {
        return None;
    };
    let probes = tail
        .split("; ")
        .filter_map(|part| {
            let (name, rest) = part.split_once(": ")?;
            let judged = if rest.starts_with("not steady") {
                false
            } else if rest.starts_with("steady") {
                true
            } else {
                return None;
            };
            Some((name.trim().to_string(), judged))
        })
        .collect();
    Some(CheckMessage { steady, probes })
}

/// The steady-state events of a run.
#[derive(Debug, Default)]
struct SteadyChecks {
    /// The `steady-state-check`, before injecting.
    baseline: Option<CheckMessage>,
    /// The `recovery-check`, after the last stage.
    recovery: Option<CheckMessage>,
    /// The `stop-condition` event's message, if one fired.
    stop_condition: Option<String>,
}

impl SteadyChecks {
    fn of(events: &[pb::RunEvent]) -> Self {
        let check = |kind: &str| {
            events
                .iter()
                .find(|e| e.kind == kind)
                .and_then(|e| parse_check(&e.message))
        };
        SteadyChecks {
            baseline: check("steady-state-check"),
            recovery: check("recovery-check"),
            stop_condition: events
                .iter()
                .find(|e| e.kind == "stop-condition")
                .map(|e| e.message.clone()),
        }
    }
}

/// The hypothesis verdict ([`faultline_domain::plan::run_verdict`]) from the plan, the run's
/// final state, its steady-state checks and the tolerances judged over the faults' window.
fn verdict(
    plan: Option<&Plan>,
    state: &str,
    checks: &SteadyChecks,
    tolerances: &[ToleranceReport],
) -> &'static str {
    faultline_domain::plan::run_verdict(faultline_domain::plan::VerdictInputs {
        has_steady_state: plan.is_some_and(|plan| plan.steady_state.is_some()),
        completed: state == "completed",
        stop_condition_fired: checks.stop_condition.is_some(),
        recovered: checks.recovery.as_ref().map(|check| check.steady),
        tolerance_broken: tolerances.iter().any(|t| !t.held),
    })
}

/// The plan's tolerances judged over the faults' window (the "during" phase), when there was
/// one; otherwise none, with a note.
fn judge_tolerances(
    plan: Option<&Plan>,
    bounds: &PhaseBounds,
    during: &BTreeMap<String, ProbeStats>,
    notes: &mut Vec<String>,
) -> Vec<ToleranceReport> {
    let Some(plan) = plan.filter(|plan| !plan.tolerances.is_empty()) else {
        return Vec::new();
    };
    if bounds.first_applied.is_none() {
        notes.push(format!(
            "no fault was in force: the hypothesis's {} tolerance(s) were not judged",
            plan.tolerances.len()
        ));
        return Vec::new();
    }
    faultline_domain::plan::judge_hypothesis(&plan.tolerances, during)
        .into_iter()
        .map(|result| ToleranceReport {
            metric: serde_json::to_value(result.metric)
                .ok()
                .and_then(|value| value.as_str().map(str::to_string))
                .unwrap_or_default(),
            probe: result.probe,
            what: result.what,
            observed: result.observed,
            observed_value: result.observed_value,
            held: result.held,
            summary: result.summary,
        })
        .collect()
}

/// Why a run whose plan has probes was not evaluated.
fn not_evaluated_note(plan: Option<&Plan>, state: &str, checks: &SteadyChecks) -> Option<String> {
    plan?.steady_state.as_ref()?;
    Some(match (&checks.baseline, &checks.recovery) {
        (Some(baseline), _) if !baseline.steady => "the system was not steady before injection, so nothing was applied: the hypothesis was not evaluated"
            .to_string(),
        (_, None) => format!(
            "the run ended {state} before its recovery check: the hypothesis was not evaluated"
        ),
        (_, Some(_)) => format!("the run ended {state}: the hypothesis was not evaluated"),
    })
}

/// The phases, and the moments they hinge on.
#[derive(Debug)]
struct PhaseBounds {
    phases: Phases,
    /// The first `fault-applied`.
    first_applied: Option<i64>,
    /// The last `fault-reverted`, when every applied fault has one.
    last_revert: Option<i64>,
}

fn phase_bounds(
    events: &[pb::RunEvent],
    faults: &[FaultReport],
    run_start: Option<i64>,
    run_end: i64,
    moment: &impl Fn(i64) -> Moment,
) -> PhaseBounds {
    let span = |start: i64, end: i64| {
        (end > start).then(|| PhaseSpan {
            start: moment(start),
            end: moment(end),
            duration_ms: end - start,
        })
    };
    let first_of = |kinds: &[&str]| {
        events
            .iter()
            .filter(|e| kinds.contains(&e.kind.as_str()))
            .map(|e| e.at_unix_ms)
            .min()
    };
    let baseline = run_start.and_then(|start| {
        let end = first_of(&["steady-state-check"])
            .or_else(|| first_of(&["stage-waiting", "stage-started", "fault-sent"]))
            .unwrap_or(run_end);
        span(start, end)
    });
    let applied: Vec<&FaultReport> = faults.iter().filter(|f| f.applied.is_some()).collect();
    let first_applied = applied
        .iter()
        .filter_map(|f| f.applied.as_ref().map(|m| m.unix_ms))
        .min();
    let last_revert = if applied.iter().all(|f| f.reverted.is_some()) {
        applied
            .iter()
            .filter_map(|f| f.reverted.as_ref().map(|m| m.unix_ms))
            .max()
    } else {
        None
    };
    let during = match first_applied {
        Some(start) => span(start, last_revert.unwrap_or(run_end)),
        None => first_of(&["stage-started"]).and_then(|start| span(start, run_end)),
    };
    let after = last_revert.and_then(|start| {
        let end = events
            .iter()
            .filter(|e| e.kind == "recovery-check" && e.at_unix_ms >= start)
            .map(|e| e.at_unix_ms)
            .min()
            .unwrap_or(run_end);
        span(start, end)
    });
    PhaseBounds {
        phases: Phases {
            baseline,
            during,
            after,
        },
        first_applied,
        last_revert,
    }
}

/// The probes' part of a report.
#[derive(Debug, Default)]
struct ProbeAnalysis {
    probes: Vec<ProbeReport>,
    detection_ms: Option<i64>,
    recovery_ms: Option<i64>,
    /// Per probe, its statistics over the `during` phase.
    during: BTreeMap<String, ProbeStats>,
}

/// The sample as the domain's statistics take it.
fn domain_sample(sample: &pb::ProbeSampleRecord) -> ProbeSample {
    ProbeSample {
        at_ms: sample.at_unix_ms,
        ok: sample.ok,
        latency: sample
            .latency_ms
            .filter(|l| l.is_finite() && *l >= 0.0)
            .map(|l| Duration::from_nanos((l * 1e6).round() as u64)),
        value: sample.value.filter(|v| v.is_finite()),
        detail: sample.detail.clone(),
    }
}

/// `GET http://...`, `10.0.0.1:5432`, `agent-1: rabbitmqctl status`, `QUERY @ URL`.
fn probe_target(kind: &ProbeKind) -> String {
    match kind {
        ProbeKind::Http { url, method, .. } => format!("{method} {url}"),
        ProbeKind::Tcp { address, .. } => address.clone(),
        ProbeKind::Command { agent, argv, .. } => format!("{agent}: {}", argv.join(" ")),
        ProbeKind::Prometheus { url, query, .. } => format!("{query} @ {url}"),
    }
}

/// The first sample at or after `from_ms` from which every later sample is ok.
fn recovered_at(samples: &[ProbeSample], from_ms: i64) -> Option<i64> {
    let mut candidate = None;
    for sample in samples.iter().filter(|s| s.at_ms >= from_ms) {
        if !sample.ok {
            candidate = None;
        } else if candidate.is_none() {
            candidate = Some(sample.at_ms);
        }
    }
    candidate
}

fn analyze_probes(
    run: &pb::RunDetail,
    plan: Option<&Plan>,
    bounds: &PhaseBounds,
    checks: &SteadyChecks,
    run_end: i64,
    moment: &impl Fn(i64) -> Moment,
    notes: &mut Vec<String>,
) -> ProbeAnalysis {
    let specs = plan
        .and_then(|p| p.steady_state.as_ref())
        .map(|steady| steady.probes.as_slice())
        .unwrap_or_default();
    // The plan's probes in order, then any other probe the samples name.
    let mut by_probe: Vec<(String, Vec<ProbeSample>)> = specs
        .iter()
        .map(|spec| (spec.name.clone(), Vec::new()))
        .collect();
    for sample in &run.probe_samples {
        let index = match by_probe.iter().position(|(name, _)| *name == sample.probe) {
            Some(index) => index,
            None => {
                by_probe.push((sample.probe.clone(), Vec::new()));
                by_probe.len() - 1
            }
        };
        by_probe[index].1.push(domain_sample(sample));
    }
    if by_probe.is_empty() {
        return ProbeAnalysis::default();
    }
    let phases = &bounds.phases;
    let mut analysis = ProbeAnalysis::default();
    for (name, mut samples) in by_probe {
        samples.sort_by_key(|s| s.at_ms);
        let spec = specs.iter().find(|spec| spec.name == name);
        let stats_in = |phase: &Option<PhaseSpan>| {
            phase
                .as_ref()
                .map(|phase| summarize(&samples, phase.window()))
        };
        let window_of = |stats: &Option<ProbeStats>| {
            stats
                .as_ref()
                .map_or_else(ProbeWindow::empty, ProbeWindow::of)
        };
        let (baseline, during, after) = (
            stats_in(&phases.baseline),
            stats_in(&phases.during),
            stats_in(&phases.after),
        );
        let total = match (samples.first(), samples.last()) {
            (Some(first), Some(last)) => ProbeWindow::of(&summarize(
                &samples,
                Window::new(first.at_ms, run_end.max(last.at_ms + 1)),
            )),
            _ => ProbeWindow::empty(),
        };
        let detection_ms =
            bounds
                .first_applied
                .zip(phases.during.as_ref())
                .and_then(|(applied, during)| {
                    samples
                        .iter()
                        .find(|s| !s.ok && s.at_ms >= applied && s.at_ms < during.end.unix_ms)
                        .map(|s| s.at_ms - applied)
                });
        let recovered = bounds
            .last_revert
            .and_then(|revert| recovered_at(&samples, revert));
        if let Some(stats) = &during {
            analysis.during.insert(name.clone(), stats.clone());
        }
        let (baseline, during, after) =
            (window_of(&baseline), window_of(&during), window_of(&after));
        let judged = |check: &Option<CheckMessage>| {
            check
                .as_ref()
                .and_then(|check| check.probes.get(&name).copied())
        };
        analysis.probes.push(ProbeReport {
            kind: spec.map(|spec| spec.kind.name().to_string()),
            target: spec.map(|spec| probe_target(&spec.kind)),
            interval_ms: spec.map(|spec| millis(spec.interval)),
            total,
            during_vs_baseline: ProbeDelta::between(&baseline, &during),
            after_vs_baseline: ProbeDelta::between(&baseline, &after),
            baseline,
            during,
            after,
            first_failure: samples.iter().find(|s| !s.ok).map(|s| ProbeFailure {
                at: moment(s.at_ms),
                detail: non_empty(&s.detail),
            }),
            detection_ms,
            recovered: recovered.map(moment),
            recovery_ms: recovered
                .zip(bounds.last_revert)
                .map(|(at, revert)| at - revert),
            steady_before: judged(&checks.baseline),
            steady_after: judged(&checks.recovery),
            samples: samples
                .iter()
                .map(|s| ProbePoint {
                    offset_ms: moment(s.at_ms).offset_ms,
                    ok: s.ok,
                    latency_ms: s.latency.map(duration_ms),
                    value: s.value,
                    detail: if s.ok { None } else { non_empty(&s.detail) },
                })
                .collect(),
            name,
        });
    }

    let sampled: Vec<&ProbeReport> = analysis
        .probes
        .iter()
        .filter(|p| !p.samples.is_empty())
        .collect();
    analysis.detection_ms = sampled.iter().filter_map(|p| p.detection_ms).min();
    let recovered: Option<Vec<i64>> = sampled
        .iter()
        .map(|p| p.recovered.as_ref().map(|m| m.unix_ms))
        .collect();
    analysis.recovery_ms = bounds
        .last_revert
        .zip(recovered.and_then(|r| r.into_iter().max()))
        .map(|(revert, at)| at - revert);

    // Notes: every figure left out says why.
    if run.probe_samples.is_empty() {
        notes.push(
            "the plan has steady-state probes but the run stored no samples (it ended before              its probes started, or its coordinator did not store samples): no probe figures"
                .into(),
        );
        return analysis;
    }
    if run.probe_samples_truncated {
        let last = run
            .probe_samples
            .iter()
            .map(|s| s.at_unix_ms)
            .max()
            .unwrap_or_default();
        notes.push(format!(
            "the run reached the coordinator's per-run sample limit ({} samples): samples              after {} were not stored, and figures after it are incomplete",
            run.probe_samples.len(),
            fmt_offset(moment(last).offset_ms)
        ));
    }
    for probe in analysis.probes.iter().filter(|p| p.samples.is_empty()) {
        notes.push(format!("probe {} has no samples", probe.name));
    }
    match (bounds.first_applied, &phases.during) {
        (None, _) => notes.push(
            "no fault was applied: failure detection and recovery times are not defined".into(),
        ),
        (Some(_), Some(during)) if analysis.detection_ms.is_none() => notes.push(format!(
            "no probe failed while the faults were in force ({} to {}): failure detection              time is not defined",
            fmt_offset(during.start.offset_ms),
            fmt_offset(during.end.offset_ms)
        )),
        _ => {}
    }
    if bounds.first_applied.is_some() {
        match bounds.last_revert {
            None => notes.push(
                "not every applied fault has a recorded revert: recovery time is not defined"
                    .into(),
            ),
            Some(revert) => {
                for probe in sampled.iter().filter(|p| p.recovered.is_none()) {
                    let after = probe
                        .samples
                        .iter()
                        .any(|s| s.offset_ms >= moment(revert).offset_ms);
                    notes.push(if after {
                        format!(
                            "probe {} was still failing at its last sample: the run did not                              recover, recovery time is not defined",
                            probe.name
                        )
                    } else {
                        format!(
                            "probe {} has no sample after the last revert: recovery time is                              not defined",
                            probe.name
                        )
                    });
                }
            }
        }
    }
    analysis
}

fn fault_report(
    seed: FaultSeed,
    events: &[pb::RunEvent],
    moment: &impl Fn(i64) -> Moment,
) -> FaultReport {
    let mut report = FaultReport {
        id: seed.id,
        stage: seed.stage,
        index: seed.index,
        agent: seed.agent,
        kind: seed.kind,
        target: seed.target,
        planned_duration_ms: seed.duration_ms,
        resolved_target: None,
        mechanism: None,
        verified: false,
        verification: None,
        sent: None,
        applied: None,
        scheduled_end: None,
        reverted: None,
        in_force_ms: None,
        revert_reason: None,
        revert_detail: None,
        revert_latency_ms: None,
        revert_requested: false,
        outcome: FaultOutcome::NotStarted,
        failures: Vec::new(),
    };
    let mut failed = false;
    let mut unconfirmed = false;
    for e in events.iter().filter(|e| e.fault_id == report.id) {
        match e.kind.as_str() {
            "fault-sent" if report.sent.is_none() => report.sent = Some(moment(e.at_unix_ms)),
            "fault-applied" if report.applied.is_none() => {
                let parsed = parse_applied(&e.message);
                report.applied = Some(moment(e.at_unix_ms));
                report.resolved_target = parsed.resolved;
                report.mechanism = parsed.mechanism;
                report.verified = parsed.verified;
                report.verification = parsed.verification;
            }
            "fault-reverted" if report.reverted.is_none() => {
                let (reason, detail) = parse_reverted(&e.message);
                report.reverted = Some(moment(e.at_unix_ms));
                report.revert_reason = reason;
                report.revert_detail = detail;
            }
            "fault-revert-requested" => report.revert_requested = true,
            "fault-failed" | "fault-revert-failed" | "fault-revert-unconfirmed" => {
                failed |= e.kind == "fault-failed";
                unconfirmed |= e.kind == "fault-revert-unconfirmed";
                report.failures.push(FaultFailure {
                    at: moment(e.at_unix_ms),
                    kind: e.kind.clone(),
                    message: e.message.clone(),
                });
            }
            _ => {}
        }
    }
    let duration = seed.duration_ms.and_then(|d| i64::try_from(d).ok());
    if let (Some(applied), Some(duration)) = (&report.applied, duration) {
        report.scheduled_end = Some(moment(applied.unix_ms + duration));
    }
    if let (Some(applied), Some(reverted)) = (&report.applied, &report.reverted) {
        report.in_force_ms = Some(reverted.unix_ms - applied.unix_ms);
    }
    if let (Some(end), Some(reverted)) = (&report.scheduled_end, &report.reverted) {
        report.revert_latency_ms = Some(reverted.unix_ms - end.unix_ms);
    }
    report.outcome = if report.reverted.is_some() {
        FaultOutcome::Reverted
    } else if unconfirmed {
        FaultOutcome::RevertUnconfirmed
    } else if report.applied.is_some() {
        FaultOutcome::InForce
    } else if failed {
        FaultOutcome::NotApplied
    } else if report.sent.is_some() {
        FaultOutcome::Sent
    } else {
        FaultOutcome::NotStarted
    };
    report
}

// ---------------------------------------------------------------------------------------------
// Formatting helpers shared by the renderers.

/// `+1.234s` (or `-0.005s`): an offset from the run's start.
pub fn fmt_offset(ms: i64) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03}s", abs / 1000, abs % 1000)
}

/// `812 ms` or `3.011s`.
pub fn fmt_span(ms: i64) -> String {
    let abs = ms.unsigned_abs();
    let sign = if ms < 0 { "-" } else { "" };
    if abs < 1000 {
        format!("{sign}{abs} ms")
    } else {
        format!("{sign}{}.{:03}s", abs / 1000, abs % 1000)
    }
}

/// A signed latency: `+11 ms`, `-2.300s`.
pub fn fmt_latency(ms: i64) -> String {
    if ms < 0 {
        fmt_span(ms)
    } else {
        format!("+{}", fmt_span(ms))
    }
}

/// A revert latency, `-` when unknown; negative ones say the revert came early.
fn opt_latency(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 0 => format!("{} (early)", fmt_latency(ms)),
        Some(ms) => fmt_latency(ms),
    }
}

fn opt_offset(moment: Option<&Moment>) -> String {
    moment.map_or_else(|| "-".into(), |m| fmt_offset(m.offset_ms))
}

fn opt_span(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), fmt_span)
}

fn opt_u64_span(ms: Option<u64>) -> String {
    opt_span(ms.and_then(|ms| i64::try_from(ms).ok()))
}

fn or_dash(text: Option<&str>) -> &str {
    text.unwrap_or("-")
}

fn fault_outcome_text(outcome: FaultOutcome) -> &'static str {
    match outcome {
        FaultOutcome::NotStarted => "not started",
        FaultOutcome::Sent => "sent, no answer",
        FaultOutcome::NotApplied => "not applied",
        FaultOutcome::InForce => "applied, no revert recorded",
        FaultOutcome::Reverted => "reverted",
        FaultOutcome::RevertUnconfirmed => "revert unconfirmed (lease reverts it)",
    }
}

fn stage_outcome_text(outcome: StageOutcome) -> &'static str {
    match outcome {
        StageOutcome::NotStarted => "not started",
        StageOutcome::Waiting => "waiting",
        StageOutcome::Running => "running",
        StageOutcome::Finished => "finished",
        StageOutcome::Interrupted => "interrupted",
    }
}

fn verified_text(fault: &FaultReport) -> String {
    match (fault.applied.is_some(), fault.verified, &fault.verification) {
        (false, _, _) => "-".into(),
        (true, true, Some(evidence)) => format!("yes: {evidence}"),
        (true, true, None) => "yes".into(),
        (true, false, Some(detail)) => format!("NO (agent said: {detail})"),
        (true, false, None) => "NO".into(),
    }
}

fn fault_title(fault: &FaultReport) -> String {
    format!(
        "{} on {} via {}",
        or_dash(fault.kind.as_deref()),
        or_dash(fault.target.as_deref()),
        fault.agent
    )
}

fn reverted_text(fault: &FaultReport) -> String {
    match (&fault.reverted, &fault.revert_reason) {
        (None, _) => "-".into(),
        (Some(at), Some(reason)) => format!("{} ({reason})", fmt_offset(at.offset_ms)),
        (Some(at), None) => fmt_offset(at.offset_ms),
    }
}

const PROBES_ABSENT: &str = "none: the plan has no steady-state probes, so there are no \
baseline / during / after figures (latency p50/p95/p99, error rate, throughput)";
const NEEDS_PROBES: &str = "not measured (needs probes)";
const NOT_MEASURED: &str = "not measured (see notes)";

/// `0.42 ms`, `12.3 ms`, `512.0 ms`, `2.500s`.
fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.3}s", ms / 1000.0)
    }
}

fn opt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), fmt_ms)
}

fn opt_rate(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), format_rate)
}

fn opt_throughput(per_sec: Option<f64>) -> String {
    per_sec.map_or_else(|| "-".into(), |t| format!("{t:.2}/s"))
}

/// `min / mean / max` of a phase's values; `None` without values.
fn values_text(window: &ProbeWindow) -> Option<String> {
    let (min, mean, max) = (window.value_min?, window.value_mean?, window.value_max?);
    Some(format!("{min} / {mean} / {max}"))
}

/// `error rate +40.0 pp, p95 +498.8 ms`.
fn delta_text(delta: &ProbeDelta) -> String {
    let signed = |v: f64| format!("{:+.1}", round_to(v, 1));
    let rate = delta
        .error_rate_pp
        .map_or_else(|| "-".into(), |pp| format!("{} pp", signed(pp)));
    let p95 = delta
        .p95_ms
        .map_or_else(|| "-".into(), |ms| format!("{} ms", signed(ms)));
    format!("error rate {rate}, p95 {p95}")
}

/// A run-level probe figure, or why it is missing.
fn probe_figure(report: &Report, ms: Option<i64>) -> String {
    match ms {
        _ if report.probes.is_empty() => NEEDS_PROBES.into(),
        Some(ms) => fmt_span(ms),
        None => NOT_MEASURED.into(),
    }
}

fn phase_rows(phases: &Phases) -> [(&'static str, Option<&PhaseSpan>); 3] {
    [
        ("baseline", phases.baseline.as_ref()),
        ("during", phases.during.as_ref()),
        ("after", phases.after.as_ref()),
    ]
}

/// `+0.000s -> +1.003s (1.003s)`, or `-`.
fn phase_text(span: Option<&PhaseSpan>) -> String {
    span.map_or_else(
        || "-".into(),
        |span| {
            format!(
                "{} -> {} ({})",
                fmt_offset(span.start.offset_ms),
                fmt_offset(span.end.offset_ms),
                fmt_span(span.duration_ms)
            )
        },
    )
}

fn probe_windows(probe: &ProbeReport) -> [(&'static str, &ProbeWindow); 3] {
    [
        ("baseline", &probe.baseline),
        ("during", &probe.during),
        ("after", &probe.after),
    ]
}

/// `http GET http://... (every 200 ms)`.
fn probe_heading(probe: &ProbeReport) -> String {
    let mut text = probe.name.clone();
    if let Some(kind) = &probe.kind {
        let _ = write!(text, " ({kind}");
        if let Some(target) = &probe.target {
            let _ = write!(text, " {target}");
        }
        if let Some(interval) = probe.interval_ms {
            let _ = write!(text, ", every {}", opt_u64_span(Some(interval)));
        }
        text.push(')');
    }
    text
}

fn yes_no(judged: Option<bool>) -> &'static str {
    match judged {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

/// `detection 412 ms · recovery 180 ms (at +3.440s) · steady before: yes · after: yes`.
fn probe_outcome_text(probe: &ProbeReport) -> String {
    let recovery = match (&probe.recovery_ms, &probe.recovered) {
        (Some(ms), Some(at)) => format!("{} (at {})", fmt_span(*ms), fmt_offset(at.offset_ms)),
        _ => "-".into(),
    };
    format!(
        "detection {} · recovery {recovery} · steady before: {} · steady after: {}",
        opt_span(probe.detection_ms),
        yes_no(probe.steady_before),
        yes_no(probe.steady_after)
    )
}

fn first_failure_text(probe: &ProbeReport) -> String {
    probe.first_failure.as_ref().map_or_else(
        || "none".into(),
        |failure| {
            format!(
                "{}: {}",
                fmt_offset(failure.at.offset_ms),
                failure.detail.as_deref().unwrap_or("(no detail)")
            )
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Text.

/// A plain-text report for a terminal.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let run = &report.run;
    let kv = |out: &mut String, key: &str, value: &str| {
        let _ = writeln!(out, "{key:<11} {value}");
    };
    out.push_str("Faultline run report\n====================\n");
    kv(&mut out, "run", &run.id);
    kv(&mut out, "title", &run.title);
    if let Some(description) = &run.description {
        kv(&mut out, "about", description.trim());
    }
    kv(&mut out, "state", &run.state);
    if let Some(reason) = &run.reason {
        kv(&mut out, "reason", reason);
    }
    kv(&mut out, "verdict", &report.verdict);
    for tolerance in &report.tolerances {
        let mark = if tolerance.held { "held" } else { "BROKEN" };
        kv(
            &mut out,
            "tolerance",
            &format!("[{mark}] {}", tolerance.summary),
        );
    }
    kv(
        &mut out,
        "hypothesis",
        report
            .hypothesis
            .as_deref()
            .unwrap_or("(the plan states none)"),
    );
    kv(&mut out, "operator", &run.operator);
    let at = |m: Option<&Moment>| m.map_or_else(|| "-".into(), |m| m.at.clone());
    kv(&mut out, "created", &at(run.created.as_ref()));
    kv(&mut out, "started", &at(run.started.as_ref()));
    let finished = match &run.finished {
        Some(m) => format!("{}  ({})", m.at, fmt_offset(m.offset_ms)),
        None => "-".into(),
    };
    kv(&mut out, "finished", &finished);
    kv(&mut out, "duration", &opt_span(run.duration_ms));
    kv(&mut out, "lease", &opt_u64_span(run.lease_ms));

    let t = &report.totals;
    out.push_str("\nSummary\n");
    let _ = writeln!(
        out,
        "  stages   {} planned, {} finished",
        t.stages_planned, t.stages_finished
    );
    let _ = writeln!(
        out,
        "  faults   {} planned, {} applied, {} verified, {} reverted, {} with failures",
        t.faults_planned, t.faults_applied, t.faults_verified, t.faults_reverted, t.faults_failed
    );
    let _ = writeln!(
        out,
        "  max revert latency  {}",
        opt_latency(t.max_revert_latency_ms)
    );
    let _ = writeln!(
        out,
        "  halt latency        {}",
        report
            .halt
            .as_ref()
            .map_or_else(|| "- (no halt)".into(), |h| opt_u64_span(h.latency_ms))
    );

    out.push_str("\nStages\n");
    if report.stages.is_empty() {
        out.push_str("  none\n");
    }
    for stage in &report.stages {
        let _ = writeln!(
            out,
            "  {}. {:<20} started {:<9} finished {:<9} took {:<9} {}",
            stage.index + 1,
            stage.name,
            opt_offset(stage.started.as_ref()),
            opt_offset(stage.finished.as_ref()),
            opt_span(stage.duration_ms),
            stage_outcome_text(stage.outcome)
        );
    }

    out.push_str("\nFaults\n");
    if report.faults.is_empty() {
        out.push_str("  none\n");
    }
    let total = report.faults.len();
    for (number, fault) in report.faults.iter().enumerate() {
        let _ = writeln!(
            out,
            "  [{}/{total}] {} (stage {})",
            number + 1,
            fault_title(fault),
            fault.stage
        );
        let line = |out: &mut String, label: &str, value: &str| {
            let _ = writeln!(out, "        {label:<15} {value}");
        };
        if fault.outcome == FaultOutcome::NotStarted {
            let planned = format!(
                "not started (planned for {})",
                opt_u64_span(fault.planned_duration_ms)
            );
            line(&mut out, "outcome", &planned);
            continue;
        }
        line(&mut out, "outcome", fault_outcome_text(fault.outcome));
        line(
            &mut out,
            "resolved",
            or_dash(fault.resolved_target.as_deref()),
        );
        line(&mut out, "mechanism", or_dash(fault.mechanism.as_deref()));
        line(&mut out, "verified", &verified_text(fault));
        line(&mut out, "sent", &opt_offset(fault.sent.as_ref()));
        line(&mut out, "applied", &opt_offset(fault.applied.as_ref()));
        let scheduled = match &fault.scheduled_end {
            Some(end) => format!(
                "{}  (planned {})",
                fmt_offset(end.offset_ms),
                opt_u64_span(fault.planned_duration_ms)
            ),
            None => format!("-  (planned {})", opt_u64_span(fault.planned_duration_ms)),
        };
        line(&mut out, "scheduled end", &scheduled);
        line(&mut out, "reverted", &reverted_text(fault));
        line(&mut out, "in force", &opt_span(fault.in_force_ms));
        line(
            &mut out,
            "revert latency",
            &opt_latency(fault.revert_latency_ms),
        );
        if let Some(detail) = &fault.revert_detail {
            line(&mut out, "revert detail", detail);
        }
        if fault.revert_requested {
            line(
                &mut out,
                "revert asked",
                "yes: the scheduled revert was not reported in time",
            );
        }
        if fault.failures.is_empty() {
            line(&mut out, "failures", "none");
        }
        for failure in &fault.failures {
            let text = format!(
                "{}  {}: {}",
                fmt_offset(failure.at.offset_ms),
                failure.kind,
                failure.message
            );
            line(&mut out, "failure", &text);
        }
    }

    out.push_str("\nHalt\n");
    match &report.halt {
        None => out.push_str("  none: the run was not halted\n"),
        Some(halt) => {
            for (label, value) in halt.rows() {
                let _ = writeln!(out, "  {:<16} {value}", label.to_lowercase());
            }
        }
    }

    out.push_str("\nProbes\n");
    if report.probes.is_empty() {
        let _ = writeln!(out, "  {PROBES_ABSENT}");
    } else {
        for (n, (name, span)) in phase_rows(&report.phases).into_iter().enumerate() {
            let label = if n == 0 { "phases" } else { "" };
            let _ = writeln!(out, "  {label:<8}  {name:<9} {}", phase_text(span));
        }
    }
    let _ = writeln!(
        out,
        "  failure detection time  {}",
        probe_figure(report, report.failure_detection_ms)
    );
    let _ = writeln!(
        out,
        "  recovery time           {}",
        probe_figure(report, report.recovery_ms)
    );
    for probe in &report.probes {
        let _ = writeln!(out, "\n  {}", probe_heading(probe));
        let _ = writeln!(
            out,
            "    {:<9} {:>7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "phase", "samples", "errors", "error rate", "p50", "p95", "p99", "throughput"
        );
        for (name, window) in probe_windows(probe) {
            let _ = writeln!(
                out,
                "    {name:<9} {:>7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
                window.samples,
                window.errors,
                opt_rate(window.error_rate),
                opt_ms(window.p50_ms),
                opt_ms(window.p95_ms),
                opt_ms(window.p99_ms),
                opt_throughput(window.throughput_per_sec)
            );
        }
        let _ = writeln!(
            out,
            "    during vs baseline  {}",
            delta_text(&probe.during_vs_baseline)
        );
        let _ = writeln!(
            out,
            "    after vs baseline   {}",
            delta_text(&probe.after_vs_baseline)
        );
        for (name, window) in probe_windows(probe) {
            if let Some(values) = values_text(window) {
                let _ = writeln!(out, "    values {name:<12} {values} (min / mean / max)");
            }
        }
        let _ = writeln!(out, "    first failure       {}", first_failure_text(probe));
        let _ = writeln!(out, "    {}", probe_outcome_text(probe));
    }
    out.push_str(&crate::telemetry::render_text_section(
        report.telemetry.as_ref(),
    ));

    out.push_str("\nTimeline\n");
    for entry in &report.timeline {
        let mut scope = Vec::new();
        if let Some(stage) = &entry.stage {
            scope.push(format!("stage={stage}"));
        }
        if let Some(agent) = &entry.agent {
            scope.push(format!("agent={agent}"));
        }
        let _ = writeln!(
            out,
            "  {:>9}  {:<24} {} {}",
            fmt_offset(entry.at.offset_ms),
            entry.kind,
            scope.join(" "),
            entry.message
        );
    }
    if !report.notes.is_empty() {
        out.push_str("\nNotes\n");
        for note in &report.notes {
            let _ = writeln!(out, "  - {note}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Markdown.

/// Escapes text for a Markdown table cell or paragraph.
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

/// A GitHub-flavoured Markdown report.
pub fn render_markdown(report: &Report) -> String {
    let mut out = String::new();
    let run = &report.run;
    let _ = writeln!(out, "# Run report: {}\n", md(&run.title));
    let row = |out: &mut String, key: &str, value: &str| {
        let _ = writeln!(out, "| {key} | {} |", md(value));
    };
    out.push_str("| | |\n|---|---|\n");
    row(&mut out, "Run", &run.id);
    row(&mut out, "State", &run.state);
    if let Some(reason) = &run.reason {
        row(&mut out, "Reason", reason);
    }
    row(&mut out, "Verdict", &report.verdict);
    for tolerance in &report.tolerances {
        let mark = if tolerance.held { "held" } else { "**broken**" };
        row(
            &mut out,
            "Tolerance",
            &format!("{mark}: {}", tolerance.summary),
        );
    }
    row(
        &mut out,
        "Hypothesis",
        report
            .hypothesis
            .as_deref()
            .unwrap_or("(the plan states none)"),
    );
    if let Some(description) = &run.description {
        row(&mut out, "Description", description.trim());
    }
    row(&mut out, "Operator", &run.operator);
    let at = |m: Option<&Moment>| m.map_or_else(|| "-".into(), |m| m.at.clone());
    row(&mut out, "Created", &at(run.created.as_ref()));
    row(&mut out, "Started", &at(run.started.as_ref()));
    row(&mut out, "Finished", &at(run.finished.as_ref()));
    row(&mut out, "Duration", &opt_span(run.duration_ms));
    let t = &report.totals;
    row(
        &mut out,
        "Faults",
        &format!(
            "{} planned, {} applied, {} verified, {} reverted, {} with failures",
            t.faults_planned,
            t.faults_applied,
            t.faults_verified,
            t.faults_reverted,
            t.faults_failed
        ),
    );
    row(
        &mut out,
        "Max revert latency",
        &opt_latency(t.max_revert_latency_ms),
    );
    row(
        &mut out,
        "Halt latency",
        &report
            .halt
            .as_ref()
            .map_or_else(|| "- (no halt)".into(), |h| opt_u64_span(h.latency_ms)),
    );

    out.push_str("\n## Stages\n\n");
    out.push_str("| # | Stage | Delay | Faults | Started | Finished | Took | Outcome |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for stage in &report.stages {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            stage.index + 1,
            md(&stage.name),
            opt_u64_span(stage.after_ms),
            stage.fault_count,
            opt_offset(stage.started.as_ref()),
            opt_offset(stage.finished.as_ref()),
            opt_span(stage.duration_ms),
            stage_outcome_text(stage.outcome)
        );
    }

    out.push_str("\n## Faults\n\n");
    out.push_str(
        "| # | Stage | Agent | Kind | Target | Mechanism | Verified | Applied | Reverted (reason) \
         | In force | Planned | Revert latency | Outcome |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (number, fault) in report.faults.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            number + 1,
            md(&fault.stage),
            md(&fault.agent),
            md(or_dash(fault.kind.as_deref())),
            md(or_dash(fault.target.as_deref())),
            md(or_dash(fault.mechanism.as_deref())),
            md(&verified_text(fault)),
            opt_offset(fault.applied.as_ref()),
            md(&reverted_text(fault)),
            opt_span(fault.in_force_ms),
            opt_u64_span(fault.planned_duration_ms),
            opt_latency(fault.revert_latency_ms),
            fault_outcome_text(fault.outcome)
        );
    }
    let failures: Vec<_> = report
        .faults
        .iter()
        .enumerate()
        .flat_map(|(n, f)| f.failures.iter().map(move |failure| (n + 1, failure)))
        .collect();
    if !failures.is_empty() {
        out.push_str("\n**Failures**\n\n");
        for (number, failure) in failures {
            let _ = writeln!(
                out,
                "- fault {number}, {}: {}: {}",
                fmt_offset(failure.at.offset_ms),
                md(&failure.kind),
                md(&failure.message)
            );
        }
    }

    out.push_str("\n## Halt\n\n");
    match &report.halt {
        None => out.push_str("None: the run was not halted.\n"),
        Some(halt) => {
            out.push_str("| | |\n|---|---|\n");
            for (label, value) in halt.rows() {
                row(&mut out, label, &value);
            }
        }
    }

    out.push_str("\n## Probes\n\n");
    if report.probes.is_empty() {
        let _ = writeln!(out, "{}.\n", md(&capitalized(PROBES_ABSENT)));
    } else {
        out.push_str("| Phase | From | To | Length |\n|---|---|---|---|\n");
        for (name, span) in phase_rows(&report.phases) {
            match span {
                Some(span) => {
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {} | {} |",
                        fmt_offset(span.start.offset_ms),
                        fmt_offset(span.end.offset_ms),
                        fmt_span(span.duration_ms)
                    );
                }
                None => {
                    let _ = writeln!(out, "| {name} | - | - | - |");
                }
            }
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "- Failure detection time: {}",
        probe_figure(report, report.failure_detection_ms)
    );
    let _ = writeln!(
        out,
        "- Recovery time: {}",
        probe_figure(report, report.recovery_ms)
    );
    for probe in &report.probes {
        let _ = writeln!(out, "\n### Probe {}\n", md(&probe_heading(probe)));
        out.push_str(
            "| Phase | Samples | Errors | Error rate | p50 | p95 | p99 | Throughput | \
             Values (min / mean / max) |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for (name, window) in probe_windows(probe) {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
                window.samples,
                window.errors,
                opt_rate(window.error_rate),
                opt_ms(window.p50_ms),
                opt_ms(window.p95_ms),
                opt_ms(window.p99_ms),
                opt_throughput(window.throughput_per_sec),
                md(values_text(window).as_deref().unwrap_or("-"))
            );
        }
        let _ = writeln!(
            out,
            "\n- During vs baseline: {}",
            delta_text(&probe.during_vs_baseline)
        );
        let _ = writeln!(
            out,
            "- After vs baseline: {}",
            delta_text(&probe.after_vs_baseline)
        );
        let _ = writeln!(out, "- First failure: {}", md(&first_failure_text(probe)));
        let _ = writeln!(out, "- {}", capitalized(&probe_outcome_text(probe)));
    }
    out.push_str(&crate::telemetry::render_markdown_section(
        report.telemetry.as_ref(),
    ));

    out.push_str(
        "\n## Timeline\n\n| t | Event | Stage | Agent | Message |\n|---|---|---|---|---|\n",
    );
    for entry in &report.timeline {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            fmt_offset(entry.at.offset_ms),
            md(&entry.kind),
            md(or_dash(entry.stage.as_deref())),
            md(or_dash(entry.agent.as_deref())),
            md(&entry.message)
        );
    }
    if !report.notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for note in &report.notes {
            let _ = writeln!(out, "- {}", md(note));
        }
    }
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
// JSON.

/// The report as pretty-printed JSON (described by `docs/report.schema.json`).
pub fn render_json(report: &Report) -> serde_json::Result<String> {
    serde_json::to_string_pretty(report)
}

// ---------------------------------------------------------------------------------------------
// HTML.

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

const CSS: &str = r#"
:root { --ink:#1f2430; --muted:#667085; --line:#d9dde7; --bg:#f7f8fb; --card:#fff;
  --ok:#2b8a3e; --bad:#c92a2a; --warn:#e67700; --info:#1c7ed6; --fault:#e8590c; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 22px; margin-bottom: 18px; }
header h1 { margin: 0 0 6px; font-size: 22px; }
header .sub { color: var(--muted); font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 12.5px; }
.badges { margin-top: 10px; display: flex; gap: 8px; flex-wrap: wrap; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600;
  font-size: 12.5px; border: 1px solid transparent; }
.state-completed { background: #ebfbee; color: var(--ok); border-color: #b2f2bb; }
.state-failed, .state-aborted { background: #fff5f5; color: var(--bad); border-color: #ffc9c9; }
.state-halted { background: #fff4e6; color: var(--warn); border-color: #ffd8a8; }
.state-running, .state-unknown { background: #e7f5ff; color: var(--info); border-color: #a5d8ff; }
.verdict { background: #f1f3f5; color: #495057; border-color: #dee2e6; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 16px 20px; margin-bottom: 18px; }
section h2 { margin: 0 0 12px; font-size: 16px; }
section h2:not(:first-child) { margin-top: 20px; }
p.note { color: var(--muted); margin: 6px 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: var(--muted);
  font-weight: 600; background: #fafbfc; }
table.kv th { width: 190px; text-transform: none; font-size: 13px; letter-spacing: 0;
  background: none; }
td.num, th.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.mono, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
td.wrap { word-break: break-word; white-space: normal; }
table.faults td, table.events td { white-space: nowrap; }
table.faults td.fault { white-space: normal; min-width: 220px; }
table.events td.wrap { width: 100%; }
.sub { color: var(--muted); font-size: 12px; font-family: inherit; font-weight: normal; }
.yes { color: var(--ok); font-weight: 600; }
.no { color: var(--bad); font-weight: 600; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 0 28px; }
.scroll { overflow-x: auto; }
.legend { display: flex; gap: 18px; flex-wrap: wrap; color: var(--muted); font-size: 12.5px;
  margin-top: 8px; }
.legend span::before { content: ""; display: inline-block; width: 14px; height: 10px;
  margin-right: 6px; vertical-align: middle; border-radius: 2px; background: var(--sw); }
.legend .planned::before { background: none; border: 1.5px dashed #868e96; }
.legend .halt::before { width: 3px; height: 14px; background: var(--bad); }
svg text { font-family: -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
tr.ev-failed td { background: #fff5f5; }
tr.ev-halt td { background: #fff4e6; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"#;

/// Tick spacing for an axis spanning `span_ms`: at most about 10 ticks.
fn tick_step(span_ms: i64) -> i64 {
    const STEPS: [i64; 16] = [
        100, 200, 250, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000,
        600_000, 1_800_000, 3_600_000,
    ];
    STEPS
        .iter()
        .copied()
        .find(|step| span_ms / step <= 10)
        .unwrap_or(7_200_000)
}

/// The shared time axis of the charts: its end (a whole number of ticks, offset from the run's
/// start) and tick spacing.
fn time_axis(report: &Report) -> (i64, i64) {
    let mut end = report
        .run
        .finished
        .as_ref()
        .map_or(0, |m| m.offset_ms)
        .max(report.timeline.last().map_or(0, |e| e.at.offset_ms));
    for fault in &report.faults {
        for m in [&fault.reverted, &fault.scheduled_end]
            .into_iter()
            .flatten()
        {
            end = end.max(m.offset_ms);
        }
    }
    if let Some(halt) = &report.halt {
        end = end.max(halt.recorded.offset_ms);
    }
    for probe in &report.probes {
        if let Some(last) = probe.samples.last() {
            end = end.max(last.offset_ms);
        }
    }
    let step = tick_step(end.max(1_000));
    // Round the axis up to a whole tick so the last label sits at the edge.
    let end = ((end.max(1_000) + step - 1) / step) * step;
    (end, step)
}

/// Tick spacing for a latency axis up to `max_ms`: at most 5 ticks.
fn latency_step(max_ms: f64) -> f64 {
    let mut step = 0.1;
    for factor in [2.0, 2.5, 2.0].into_iter().cycle() {
        if max_ms / step <= 5.0 {
            break;
        }
        step *= factor;
    }
    step
}

fn tick_label(ms: i64, step: i64) -> String {
    if step >= 60_000 && ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if step >= 1_000 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{:.1}s", ms as f64 / 1_000.0)
    }
}

fn fault_color(fault: &FaultReport) -> &'static str {
    match fault.outcome {
        FaultOutcome::Reverted if fault.verified && fault.failures.is_empty() => "#e8590c",
        FaultOutcome::Reverted => "#f59f00",
        FaultOutcome::InForce | FaultOutcome::RevertUnconfirmed => "#c92a2a",
        _ => "#adb5bd",
    }
}

/// The run's timeline as an inline SVG: one lane per fault (applied -> reverted bar over its
/// planned window), fault windows shaded, stage boundaries, and the halt.
pub fn render_timeline_svg(report: &Report) -> String {
    const WIDTH: f64 = 1100.0;
    const LEFT: f64 = 290.0;
    const RIGHT: f64 = 24.0;
    const TOP: f64 = 40.0;
    const LANE: f64 = 40.0;
    const BAR: f64 = 16.0;

    let lanes = report.faults.len().max(1);
    let plot_h = LANE * lanes as f64;
    let height = TOP + plot_h + 34.0;
    let (end, step) = time_axis(report);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |ms: i64| LEFT + (ms.clamp(0, end) as f64 / end as f64) * plot_w;
    let bottom = TOP + plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="Run timeline: one lane per fault">"#
    );
    svg.push_str(r##"<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff0f0"/><line x1="0" y1="0" x2="0" y2="6" stroke="#c92a2a" stroke-width="2"/></pattern></defs>"##);
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fbfcfe" stroke="#d9dde7"/>"##
    );

    // Stage bands and boundaries.
    let run_end = report.run.finished.as_ref().map_or(end, |m| m.offset_ms);
    for (n, stage) in report.stages.iter().enumerate() {
        let Some(started) = &stage.started else {
            continue;
        };
        let stop = stage.finished.as_ref().map_or(run_end, |m| m.offset_ms);
        let (x0, x1) = (x(started.offset_ms), x(stop));
        let fill = if n % 2 == 0 { "#eef1f8" } else { "#f5f7fb" };
        let _ = write!(
            svg,
            r#"<g class="stage"><title>{}</title><rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="{fill}"/>"#,
            html_escape(&format!(
                "stage {}: {} -> {}",
                stage.name,
                fmt_offset(started.offset_ms),
                stage
                    .finished
                    .as_ref()
                    .map_or_else(|| "(not finished)".into(), |m| fmt_offset(m.offset_ms))
            )),
            (x1 - x0).max(1.0)
        );
        let _ = write!(
            svg,
            r##"<line x1="{x0:.1}" y1="{}" x2="{x0:.1}" y2="{bottom}" stroke="#5c7cfa" stroke-width="1.2" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" font-size="12" fill="#3b5bdb">{}</text></g>"##,
            TOP - 22.0,
            x0 + 4.0,
            TOP - 10.0,
            html_escape(&format!("stage {}: {}", stage.index + 1, stage.name))
        );
        if stage.finished.is_some() {
            let _ = write!(
                svg,
                r##"<line x1="{x1:.1}" y1="{TOP}" x2="{x1:.1}" y2="{bottom}" stroke="#5c7cfa" stroke-width="1" stroke-dasharray="2 3" opacity="0.6"/>"##
            );
        }
    }

    // Fault windows, shaded across the whole plot.
    for fault in &report.faults {
        let Some(applied) = &fault.applied else {
            continue;
        };
        let stop = fault.reverted.as_ref().map_or(end, |m| m.offset_ms);
        let (x0, x1) = (x(applied.offset_ms), x(stop));
        let _ = write!(
            svg,
            r##"<rect class="fault-window" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="#e8590c" fill-opacity="0.07"/>"##,
            (x1 - x0).max(1.0)
        );
    }

    // Axis.
    let mut tick = 0;
    while tick <= end {
        let tx = x(tick);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="{bottom}" x2="{tx:.1}" y2="{}" stroke="#868e96"/><line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{bottom}" stroke="#000" stroke-opacity="0.04"/><text x="{tx:.1}" y="{}" font-size="11" fill="#667085" text-anchor="middle">{}</text>"##,
            bottom + 5.0,
            bottom + 18.0,
            tick_label(tick, step)
        );
        tick += step;
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="11" fill="#667085" text-anchor="end">time since run start</text>"##,
        LEFT - 22.0,
        bottom + 18.0
    );

    // One lane per fault.
    if report.faults.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="13" fill="#667085" text-anchor="middle">no faults in this run</text>"##,
            LEFT + plot_w / 2.0,
            TOP + LANE / 2.0 + 4.0
        );
    }
    for (n, fault) in report.faults.iter().enumerate() {
        let lane_top = TOP + LANE * n as f64;
        let mid = lane_top + LANE / 2.0;
        let bar_y = mid - BAR / 2.0;
        let _ = write!(
            svg,
            r#"<g class="lane" data-fault="{}">"#,
            html_escape(&fault.id)
        );
        if n > 0 {
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" y1="{lane_top}" x2="{}" y2="{lane_top}" stroke="#d9dde7"/>"##,
                LEFT + plot_w
            );
        }
        let label = format!(
            "{}. {} · {}",
            n + 1,
            or_dash(fault.kind.as_deref()),
            fault.agent
        );
        let sublabel = format!(
            "{} · {}",
            fault
                .mechanism
                .as_deref()
                .unwrap_or_else(|| fault_outcome_text(fault.outcome)),
            or_dash(fault.target.as_deref())
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12.5" font-weight="600" fill="#1f2430" text-anchor="end">{}</text><text x="{}" y="{}" font-size="11" fill="#667085" text-anchor="end">{}</text>"##,
            LEFT - 10.0,
            mid - 2.0,
            html_escape(&truncate(&label, 40)),
            LEFT - 10.0,
            mid + 12.0,
            html_escape(&truncate(&sublabel, 46))
        );
        // The planned window: applied -> scheduled end, dashed outline.
        if let (Some(applied), Some(scheduled)) = (&fault.applied, &fault.scheduled_end) {
            let (x0, x1) = (x(applied.offset_ms), x(scheduled.offset_ms));
            let _ = write!(
                svg,
                r##"<rect class="planned" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#868e96" stroke-width="1.2" stroke-dasharray="4 3" rx="3"/>"##,
                bar_y - 4.0,
                (x1 - x0).max(1.0),
                BAR + 8.0
            );
        }
        // In force: applied -> reverted (or to the end, hatched, when no revert was recorded).
        if let Some(applied) = &fault.applied {
            let x0 = x(applied.offset_ms);
            let tooltip = format!(
                "{}\napplied {} · reverted {} · in force {}\nmechanism: {} · verified: {}\nrevert latency: {}",
                fault_title(fault),
                fmt_offset(applied.offset_ms),
                reverted_text(fault),
                opt_span(fault.in_force_ms),
                or_dash(fault.mechanism.as_deref()),
                verified_text(fault),
                opt_latency(fault.revert_latency_ms)
            );
            match &fault.reverted {
                Some(reverted) => {
                    let x1 = x(reverted.offset_ms);
                    let _ = write!(
                        svg,
                        r#"<rect class="in-force" x="{x0:.1}" y="{bar_y:.1}" width="{:.1}" height="{BAR}" fill="{}" rx="3"><title>{}</title></rect>"#,
                        (x1 - x0).max(2.0),
                        fault_color(fault),
                        html_escape(&tooltip)
                    );
                    let inside = (x1 - x0) > 70.0;
                    let text = opt_span(fault.in_force_ms);
                    let (tx, anchor, fill) = if inside {
                        ((x0 + x1) / 2.0, "middle", "#fff")
                    } else {
                        (x1 + 6.0, "start", "#495057")
                    };
                    let _ = write!(
                        svg,
                        r#"<text x="{tx:.1}" y="{:.1}" font-size="11" font-weight="600" fill="{fill}" text-anchor="{anchor}">{}</text>"#,
                        mid + 4.0,
                        html_escape(&text)
                    );
                }
                None => {
                    let _ = write!(
                        svg,
                        r##"<rect class="in-force open" x="{x0:.1}" y="{bar_y:.1}" width="{:.1}" height="{BAR}" fill="url(#hatch)" stroke="#c92a2a" rx="3"><title>{}</title></rect>"##,
                        (x(end) - x0).max(2.0),
                        html_escape(&tooltip)
                    );
                }
            }
            if !fault.verified {
                let _ = write!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10.5" font-weight="700" fill="#c92a2a">unverified</text>"##,
                    x0 + 2.0,
                    bar_y - 6.0
                );
            }
        }
        if let Some(sent) = &fault.sent {
            let _ = write!(
                svg,
                r##"<circle cx="{:.1}" cy="{mid:.1}" r="3" fill="#495057"><title>sent {}</title></circle>"##,
                x(sent.offset_ms),
                fmt_offset(sent.offset_ms)
            );
        }
        for failure in &fault.failures {
            let fx = x(failure.at.offset_ms);
            let _ = write!(
                svg,
                r##"<g><title>{}</title><path d="M{:.1} {:.1} l8 8 m0 -8 l-8 8" stroke="#c92a2a" stroke-width="2.2"/></g>"##,
                html_escape(&format!(
                    "{} {}: {}",
                    fmt_offset(failure.at.offset_ms),
                    failure.kind,
                    failure.message
                )),
                fx - 4.0,
                mid - 4.0
            );
        }
        svg.push_str("</g>");
    }

    // The halt: requested -> acknowledged.
    if let Some(halt) = &report.halt {
        let at = halt.requested.as_ref().unwrap_or(&halt.recorded);
        let (x0, x1) = (x(at.offset_ms), x(halt.recorded.offset_ms));
        let label = format!("HALT · {}", opt_u64_span(halt.latency_ms));
        let _ = write!(
            svg,
            r##"<g class="halt"><title>{}</title><rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="#c92a2a" fill-opacity="0.12"/><line x1="{x0:.1}" y1="{}" x2="{x0:.1}" y2="{bottom}" stroke="#c92a2a" stroke-width="2.5"/><text x="{:.1}" y="{}" font-size="12" font-weight="700" fill="#c92a2a" text-anchor="end">{}</text></g>"##,
            html_escape(&halt.message),
            (x1 - x0).max(0.0),
            TOP - 26.0,
            x0 - 4.0,
            TOP - 26.0 + 10.0,
            html_escape(&label)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The samples of a probe chart that fall in one pixel column.
#[derive(Debug, Default)]
struct ChartColumn<'a> {
    /// The highest latency of an ok sample.
    ok_latency: Option<f64>,
    failed: usize,
    /// The highest latency of a failed sample (the top edge for one without).
    failed_latency: Option<f64>,
    first_failed: Option<&'a ProbePoint>,
}

/// A mark of a probe chart, in time order.
#[derive(Debug)]
enum ChartMark {
    Ok { x: f64, y: f64 },
    Failed { x: f64, y: f64, title: String },
}

/// One probe's latency over time as an inline SVG, on the timeline's time axis: ok samples as
/// a line of points (broken where samples failed), failed samples as red crosses (at their
/// latency, on the top edge when none was measured), the baseline and after phases tinted,
/// the fault windows shaded, and when the probe first saw the faults and when it recovered.
/// Above [`CHART_MAX_POINTS`] samples, one mark per pixel column.
pub fn render_probe_svg(report: &Report, probe: &ProbeReport) -> String {
    const WIDTH: f64 = 1100.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 24.0;
    const TOP: f64 = 28.0;
    const PLOT_H: f64 = 170.0;

    let height = TOP + PLOT_H + 34.0;
    let (end, step) = time_axis(report);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |ms: i64| LEFT + (ms.clamp(0, end) as f64 / end as f64) * plot_w;
    let bottom = TOP + PLOT_H;
    let highest = probe
        .samples
        .iter()
        .filter_map(|s| s.latency_ms)
        .fold(0.0, f64::max);
    let highest = if highest.is_finite() && highest > 0.0 {
        highest
    } else {
        1.0
    };
    // Some headroom above the highest sample, up to a whole tick.
    let y_step = latency_step(highest * 1.1);
    let y_max = (highest * 1.1 / y_step).ceil().max(1.0) * y_step;
    let y = |ms: f64| bottom - (ms.clamp(0.0, y_max) / y_max) * PLOT_H;
    let e = html_escape;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="probe-chart" data-probe="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="{}">"#,
        e(&probe.name),
        e(&format!("Latency of probe {} over the run", probe.name))
    );
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PLOT_H}" fill="#fbfcfe" stroke="#d9dde7"/>"##
    );

    // Phases, tinted and named; the fault windows shaded.
    for (name, span) in phase_rows(&report.phases) {
        let Some(span) = span else { continue };
        let (x0, x1) = (x(span.start.offset_ms), x(span.end.offset_ms));
        let fill = match name {
            "baseline" => "#e7f5ff",
            "after" => "#ebfbee",
            _ => "none",
        };
        let _ = write!(
            svg,
            r##"<g class="phase"><title>{}</title><rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{PLOT_H}" fill="{fill}"/><text x="{:.1}" y="{}" font-size="11.5" fill="#495057">{name}</text></g>"##,
            e(&format!("{name}: {}", phase_text(Some(span)))),
            (x1 - x0).max(1.0),
            x0 + 3.0,
            TOP - 8.0
        );
    }
    for fault in &report.faults {
        let Some(applied) = &fault.applied else {
            continue;
        };
        let stop = fault.reverted.as_ref().map_or(end, |m| m.offset_ms);
        let (x0, x1) = (x(applied.offset_ms), x(stop));
        let _ = write!(
            svg,
            r##"<rect class="probe-fault-window" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{PLOT_H}" fill="#e8590c" fill-opacity="0.12"><title>{}</title></rect>"##,
            (x1 - x0).max(1.0),
            e(&format!(
                "{}: {} -> {}",
                fault_title(fault),
                fmt_offset(applied.offset_ms),
                fault.reverted.as_ref().map_or_else(
                    || "(no revert recorded)".into(),
                    |m| fmt_offset(m.offset_ms)
                )
            ))
        );
    }

    // Axes: latency on the left, time below.
    let _ = write!(
        svg,
        r##"<text x="14" y="{:.1}" font-size="11" fill="#667085" text-anchor="middle" transform="rotate(-90 14 {:.1})">latency</text>"##,
        TOP + PLOT_H / 2.0,
        TOP + PLOT_H / 2.0
    );
    let mut tick = 0.0;
    while tick <= y_max + y_step / 2.0 {
        let ty = y(tick);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#000" stroke-opacity="0.06"/><text x="{:.1}" y="{:.1}" font-size="11" fill="#667085" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            ty + 4.0,
            e(&fmt_ms(round_to(tick, 3)))
        );
        tick += y_step;
    }
    let mut tick = 0;
    while tick <= end {
        let tx = x(tick);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="{bottom}" x2="{tx:.1}" y2="{}" stroke="#868e96"/><text x="{tx:.1}" y="{}" font-size="11" fill="#667085" text-anchor="middle">{}</text>"##,
            bottom + 5.0,
            bottom + 18.0,
            tick_label(tick, step)
        );
        tick += step;
    }

    // The samples.
    let bucketed = probe.samples.len() > CHART_MAX_POINTS;
    let mut marks = Vec::new();
    if bucketed {
        // Per pixel column: the highest ok latency, and the failures.
        let mut columns: BTreeMap<i64, ChartColumn<'_>> = BTreeMap::new();
        for sample in &probe.samples {
            let column = columns
                .entry(x(sample.offset_ms).round() as i64)
                .or_default();
            let highest = |seen: Option<f64>, latency: f64| {
                Some(seen.map_or(latency, |l: f64| l.max(latency)))
            };
            if sample.ok {
                if let Some(latency) = sample.latency_ms {
                    column.ok_latency = highest(column.ok_latency, latency);
                }
            } else {
                column.failed += 1;
                column.failed_latency =
                    highest(column.failed_latency, sample.latency_ms.unwrap_or(y_max));
                column.first_failed.get_or_insert(sample);
            }
        }
        for (column, figures) in columns {
            if let Some(latency) = figures.ok_latency {
                marks.push(ChartMark::Ok {
                    x: column as f64,
                    y: y(latency),
                });
            }
            if let Some(first) = figures.first_failed {
                marks.push(ChartMark::Failed {
                    x: column as f64,
                    y: y(figures.failed_latency.unwrap_or(y_max)),
                    title: format!(
                        "{} failed sample(s) from {}: {}",
                        figures.failed,
                        fmt_offset(first.offset_ms),
                        first.detail.as_deref().unwrap_or("(no detail)")
                    ),
                });
            }
        }
    } else {
        for sample in &probe.samples {
            let sx = x(sample.offset_ms);
            match (sample.ok, sample.latency_ms) {
                (true, Some(latency)) => marks.push(ChartMark::Ok {
                    x: sx,
                    y: y(latency),
                }),
                (true, None) => {}
                (false, latency) => marks.push(ChartMark::Failed {
                    x: sx,
                    y: y(latency.unwrap_or(y_max)),
                    title: format!(
                        "{} failed{}: {}",
                        fmt_offset(sample.offset_ms),
                        latency.map_or_else(String::new, |l| format!(" after {}", fmt_ms(l))),
                        sample.detail.as_deref().unwrap_or("(no detail)")
                    ),
                }),
            }
        }
    }
    let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for mark in &marks {
        match mark {
            ChartMark::Ok { x, y } => {
                if let Some(segment) = segments.last_mut() {
                    segment.push((*x, *y));
                }
            }
            ChartMark::Failed { .. } => segments.push(Vec::new()),
        }
    }
    for segment in segments.iter().filter(|s| s.len() > 1) {
        let points: Vec<String> = segment
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline class="probe-line" points="{}" fill="none" stroke="#1c7ed6" stroke-width="1.5" stroke-linejoin="round"/>"##,
            points.join(" ")
        );
    }
    for mark in &marks {
        match mark {
            ChartMark::Ok { x, y } if !bucketed => {
                let _ = write!(
                    svg,
                    r##"<circle class="probe-ok" cx="{x:.1}" cy="{y:.1}" r="2" fill="#1c7ed6"/>"##
                );
            }
            ChartMark::Ok { .. } => {}
            ChartMark::Failed { x, y, title } => {
                let _ = write!(
                    svg,
                    r##"<g class="probe-failure"><title>{}</title><path d="M{:.1} {:.1} l7 7 m0 -7 l-7 7" stroke="#c92a2a" stroke-width="2"/></g>"##,
                    e(title),
                    x - 3.5,
                    y - 3.5
                );
            }
        }
    }
    if probe.samples.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="13" fill="#667085" text-anchor="middle">no samples</text>"##,
            LEFT + plot_w / 2.0,
            TOP + PLOT_H / 2.0
        );
    }

    // When the probe saw the faults, and when it recovered.
    let markers = [
        probe
            .detection_ms
            .zip(report.phases.during.as_ref())
            .map(|(ms, during)| {
                (
                    during.start.offset_ms + ms,
                    format!("detected +{}", fmt_span(ms)),
                    "#c92a2a",
                    "probe-detected",
                )
            }),
        probe.recovered.as_ref().map(|at| {
            (
                at.offset_ms,
                format!("recovered {}", opt_span(probe.recovery_ms)),
                "#2b8a3e",
                "probe-recovered",
            )
        }),
    ];
    for (at, label, colour, class) in markers.into_iter().flatten() {
        let mx = x(at);
        let _ = write!(
            svg,
            r##"<g class="{class}"><line x1="{mx:.1}" y1="{TOP}" x2="{mx:.1}" y2="{bottom}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="5 3"/><text x="{:.1}" y="{}" font-size="11.5" font-weight="600" fill="{colour}">{}</text></g>"##,
            mx + 4.0,
            TOP + 14.0,
            e(&label)
        );
    }
    svg.push_str("</svg>");
    svg
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

/// A self-contained HTML page (inline CSS and SVG, no scripts, no external assets).
pub fn render_html(report: &Report) -> String {
    let run = &report.run;
    let e = html_escape;
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Faultline report: {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        e(&run.title)
    );
    let state_class = match run.state.as_str() {
        "completed" | "failed" | "halted" | "aborted" | "running" => run.state.as_str(),
        _ => "unknown",
    };
    let _ = write!(
        out,
        "<header><h1>{}</h1><div class=\"sub\">run {} · operator {} · started {}</div>\
         <div class=\"badges\"><span class=\"badge state-{state_class}\">{}</span>\
         <span class=\"badge verdict\">verdict: {}</span></div>",
        e(&run.title),
        e(&run.id),
        e(&run.operator),
        e(&run
            .started
            .as_ref()
            .map_or_else(|| "-".into(), |m| m.at.clone())),
        e(&run.state),
        e(&report.verdict)
    );
    if let Some(reason) = &run.reason {
        let _ = write!(out, "<p class=\"note\">{}</p>", e(reason));
    }
    out.push_str("</header>\n");

    // Summary.
    let t = &report.totals;
    let kv = |out: &mut String, key: &str, value: &str| {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", e(key), e(value));
    };
    out.push_str("<section><h2>Summary</h2><div class=\"grid\"><table class=\"kv\">");
    kv(
        &mut out,
        "Hypothesis",
        report
            .hypothesis
            .as_deref()
            .unwrap_or("(the plan states none)"),
    );
    kv(&mut out, "Verdict", &report.verdict);
    for tolerance in &report.tolerances {
        let mark = if tolerance.held { "held" } else { "BROKEN" };
        kv(
            &mut out,
            "Tolerance",
            &format!("{mark}: {}", tolerance.summary),
        );
    }
    if let Some(description) = &run.description {
        kv(&mut out, "Description", description.trim());
    }
    kv(&mut out, "State", &run.state);
    kv(
        &mut out,
        "Created",
        &run.created
            .as_ref()
            .map_or_else(|| "-".into(), |m| m.at.clone()),
    );
    kv(
        &mut out,
        "Finished",
        &run.finished
            .as_ref()
            .map_or_else(|| "-".into(), |m| m.at.clone()),
    );
    kv(&mut out, "Duration", &opt_span(run.duration_ms));
    kv(&mut out, "Lease", &opt_u64_span(run.lease_ms));
    out.push_str("</table><table class=\"kv\">");
    kv(
        &mut out,
        "Stages",
        &format!(
            "{} planned, {} finished",
            t.stages_planned, t.stages_finished
        ),
    );
    kv(
        &mut out,
        "Faults",
        &format!(
            "{} planned, {} applied, {} verified, {} reverted",
            t.faults_planned, t.faults_applied, t.faults_verified, t.faults_reverted
        ),
    );
    kv(
        &mut out,
        "Faults with failures",
        &t.faults_failed.to_string(),
    );
    kv(
        &mut out,
        "Max revert latency",
        &opt_latency(t.max_revert_latency_ms),
    );
    kv(
        &mut out,
        "Halt latency",
        &report
            .halt
            .as_ref()
            .map_or_else(|| "- (no halt)".into(), |h| opt_u64_span(h.latency_ms)),
    );
    kv(
        &mut out,
        "Failure detection time",
        &probe_figure(report, report.failure_detection_ms),
    );
    kv(
        &mut out,
        "Recovery time",
        &probe_figure(report, report.recovery_ms),
    );
    kv(&mut out, "Events", &t.events.to_string());
    out.push_str("</table></div></section>\n");

    // Timeline.
    out.push_str("<section><h2>Timeline</h2><div class=\"scroll\">");
    out.push_str(&render_timeline_svg(report));
    out.push_str(
        "</div><div class=\"legend\">\
         <span style=\"--sw:#e8590c\">in force, verified, reverted</span>\
         <span style=\"--sw:#f59f00\">in force, unverified or with failures</span>\
         <span style=\"--sw:#c92a2a\">no revert recorded</span>\
         <span class=\"planned\">planned duration</span>\
         <span style=\"--sw:#fde3d3\">fault window</span>\
         <span style=\"--sw:#e3e8f5\">stage</span>\
         <span class=\"halt\">halt</span></div></section>\n",
    );

    // Faults.
    out.push_str(
        "<section><h2>Faults</h2><div class=\"scroll\"><table class=\"faults\"><thead><tr>\
         <th>#</th><th>Fault</th><th>Mechanism</th><th>Verified</th>\
         <th class=\"num\">Applied</th><th class=\"num\">Reverted</th>\
         <th class=\"num\">In force</th><th class=\"num\">Planned</th>\
         <th class=\"num\">Revert latency</th><th>Outcome</th></tr></thead><tbody>",
    );
    if report.faults.is_empty() {
        out.push_str("<tr><td colspan=\"10\">no faults</td></tr>");
    }
    for (n, fault) in report.faults.iter().enumerate() {
        let verified = if fault.applied.is_none() {
            "<td>-</td>".to_string()
        } else {
            let (class, word) = if fault.verified {
                ("yes", "yes")
            } else {
                ("no", "no")
            };
            format!(
                "<td class=\"wrap\"><span class=\"{class}\">{word}</span><div class=\"sub\">{}</div></td>",
                e(fault.verification.as_deref().unwrap_or(""))
            )
        };
        let reverted = match &fault.reverted {
            Some(at) => format!(
                "{}<div class=\"sub\">{}</div>",
                e(&fmt_offset(at.offset_ms)),
                e(or_dash(fault.revert_reason.as_deref()))
            ),
            None => "-".into(),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"fault\"><b class=\"mono\">{}</b><div class=\"sub\">{}</div>\
             <div class=\"sub\">{} · stage {}</div></td><td class=\"mono\">{}</td>{verified}<td class=\"num\">{}</td>\
             <td class=\"num\">{reverted}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            n + 1,
            e(or_dash(fault.kind.as_deref())),
            e(or_dash(fault.target.as_deref())),
            e(&fault.agent),
            e(&fault.stage),
            e(or_dash(fault.mechanism.as_deref())),
            e(&opt_offset(fault.applied.as_ref())),
            e(&opt_span(fault.in_force_ms)),
            e(&opt_u64_span(fault.planned_duration_ms)),
            e(&opt_latency(fault.revert_latency_ms)),
            e(fault_outcome_text(fault.outcome))
        );
        for failure in &fault.failures {
            let _ = write!(
                out,
                "<tr class=\"ev-failed\"><td></td><td colspan=\"9\" class=\"wrap\">{} <b>{}</b>: {}</td></tr>",
                e(&fmt_offset(failure.at.offset_ms)),
                e(&failure.kind),
                e(&failure.message)
            );
        }
    }
    out.push_str("</tbody></table></div></section>\n");

    // Halt.
    out.push_str("<section><h2>Halt</h2>");
    match &report.halt {
        None => out.push_str("<p class=\"note\">None: the run was not halted.</p>"),
        Some(halt) => {
            out.push_str("<table class=\"kv\">");
            for (label, value) in halt.rows() {
                kv(&mut out, label, &value);
            }
            out.push_str("</table>");
        }
    }
    out.push_str("</section>\n");

    // Probes (the eBPF insights follow in a section of their own).
    out.push_str("<section><h2>Probes</h2>");
    if report.probes.is_empty() {
        let _ = write!(
            out,
            "<p class=\"note\">{}.</p><p class=\"note\">Failure detection time and recovery \
             time: {NEEDS_PROBES}.</p>",
            e(&capitalized(PROBES_ABSENT))
        );
    } else {
        out.push_str("<div class=\"grid\"><table class=\"kv\">");
        for (name, span) in phase_rows(&report.phases) {
            kv(&mut out, &capitalized(name), &phase_text(span));
        }
        out.push_str("</table><table class=\"kv\">");
        kv(
            &mut out,
            "Failure detection time",
            &probe_figure(report, report.failure_detection_ms),
        );
        kv(
            &mut out,
            "Recovery time",
            &probe_figure(report, report.recovery_ms),
        );
        out.push_str("</table></div>");
    }
    for probe in &report.probes {
        let _ = write!(
            out,
            "<h2>Probe {}</h2><div class=\"scroll\"><table class=\"probe\"><thead><tr>\
             <th>Phase</th><th class=\"num\">Samples</th><th class=\"num\">Errors</th>\
             <th class=\"num\">Error rate</th><th class=\"num\">p50</th>\
             <th class=\"num\">p95</th><th class=\"num\">p99</th>\
             <th class=\"num\">Throughput</th><th class=\"num\">Values (min / mean / max)</th>\
             </tr></thead><tbody>",
            e(&probe_heading(probe))
        );
        for (name, window) in probe_windows(probe) {
            let _ = write!(
                out,
                "<tr><td>{name}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                window.samples,
                window.errors,
                e(&opt_rate(window.error_rate)),
                e(&opt_ms(window.p50_ms)),
                e(&opt_ms(window.p95_ms)),
                e(&opt_ms(window.p99_ms)),
                e(&opt_throughput(window.throughput_per_sec)),
                e(values_text(window).as_deref().unwrap_or("-"))
            );
        }
        let _ = write!(
            out,
            "</tbody></table></div><p class=\"note\">During vs baseline: {} · after vs \
             baseline: {}<br>First failure: {}<br>{}</p><div class=\"scroll\">{}</div>\
             <div class=\"legend\"><span style=\"--sw:#1c7ed6\">latency of ok samples</span>\
             <span style=\"--sw:#c92a2a\">failed sample</span>\
             <span style=\"--sw:#f6d5c4\">fault window</span>\
             <span style=\"--sw:#e7f5ff\">baseline</span>\
             <span style=\"--sw:#ebfbee\">after</span></div>",
            e(&delta_text(&probe.during_vs_baseline)),
            e(&delta_text(&probe.after_vs_baseline)),
            e(&first_failure_text(probe)),
            e(&capitalized(&probe_outcome_text(probe))),
            render_probe_svg(report, probe)
        );
    }
    out.push_str("</section>\n");
    out.push_str(&crate::telemetry::render_html_section(
        report.telemetry.as_ref(),
    ));

    // Event log.
    out.push_str(
        "<section><h2>Event log</h2><div class=\"scroll\"><table class=\"events\"><thead><tr>\
         <th class=\"num\">t</th><th>Event</th><th>Stage</th><th>Agent</th><th>Message</th>\
         </tr></thead><tbody>",
    );
    for entry in &report.timeline {
        let class = if entry.kind.contains("failed") || entry.kind.contains("unconfirmed") {
            " class=\"ev-failed\""
        } else if entry.kind == "halt" {
            " class=\"ev-halt\""
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr{class}><td class=\"num mono\" title=\"{}\">{}</td><td class=\"mono\">{}</td>\
             <td>{}</td><td>{}</td><td class=\"wrap\">{}</td></tr>",
            e(&entry.at.at),
            e(&fmt_offset(entry.at.offset_ms)),
            e(&entry.kind),
            e(or_dash(entry.stage.as_deref())),
            e(or_dash(entry.agent.as_deref())),
            e(&entry.message)
        );
    }
    out.push_str("</tbody></table></div></section>\n");
    if !report.notes.is_empty() {
        out.push_str("<section><h2>Notes</h2><ul>");
        for note in &report.notes {
            let _ = write!(out, "<li>{}</li>", e(note));
        }
        out.push_str("</ul></section>\n");
    }
    let _ = write!(
        out,
        "<footer>faultline report v{REPORT_VERSION} · times are relative to the run's start \
         ({})</footer>\n</main>\n</body>\n</html>\n",
        e(&run
            .started
            .as_ref()
            .map_or_else(|| "-".into(), |m| m.at.clone()))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "0190a0b0-0000-7000-8000-000000000001";
    const T0: i64 = 1_750_000_000_000;

    const PLAN: &str = "apiVersion: faultline/v1
title: Pause <db> then stop | api
description: Two stages.
hypothesis: The api keeps answering.
lease: 5s
stages:
  - name: pause
    faults:
      - kind: container-pause
        agent: agent-1
        target: { container: db }
        duration: 3s
  - name: stop
    after: 1s
    faults:
      - kind: container-stop
        agent: agent-2
        target: { container: api }
        duration: 2s
";

    fn ev(
        seq: u64,
        at: i64,
        kind: &str,
        stage: &str,
        agent: &str,
        fault: &str,
        msg: &str,
    ) -> pb::RunEvent {
        pb::RunEvent {
            run_id: RUN.into(),
            seq,
            at_unix_ms: T0 + at,
            kind: kind.into(),
            stage: stage.into(),
            agent: agent.into(),
            fault_id: if fault.is_empty() {
                String::new()
            } else {
                format!("{RUN}/{fault}")
            },
            message: msg.into(),
            final_state: String::new(),
        }
    }

    fn detail(state: &str, reason: &str, events: Vec<pb::RunEvent>) -> pb::RunDetail {
        let finished = events.last().map(|e| e.at_unix_ms).unwrap_or_default();
        pb::RunDetail {
            summary: Some(pb::RunSummary {
                run_id: RUN.into(),
                title: "Pause <db> then stop | api".into(),
                state: state.into(),
                created_at_unix_ms: T0 - 15,
                finished_at_unix_ms: if state == "running" { 0 } else { finished },
                operator: "operator".into(),
            }),
            plan_yaml: PLAN.into(),
            events,
            reason: reason.into(),
            probe_samples: Vec::new(),
            probe_samples_truncated: false,
            telemetry: None,
        }
    }

    const PROBED_PLAN: &str = "apiVersion: faultline/v1
title: Pause the db under probes
hypothesis: The api answers again once the db is back.
lease: 5s
steady_state:
  probes:
    - { name: api, kind: tcp, address: \"127.0.0.1:5432\", interval: 200ms, timeout: 500ms }
    - { name: errors, kind: prometheus, url: \"http://prom:9090\", query: \"sum(errors)\", max: 5, interval: 500ms }
  baseline: 1s
stages:
  - name: pause
    faults:
      - kind: container-pause
        agent: agent-1
        target: { container: db }
        duration: 2s
";

    fn sample(
        probe: &str,
        at: i64,
        ok: bool,
        latency: f64,
        value: Option<f64>,
    ) -> pb::ProbeSampleRecord {
        pb::ProbeSampleRecord {
            probe: probe.into(),
            at_unix_ms: T0 + at,
            ok,
            latency_ms: Some(latency),
            value,
            detail: if ok {
                String::new()
            } else {
                format!("failed at {at}")
            },
        }
    }

    /// A completed run of [`PROBED_PLAN`]: baseline 0-1000, the pause applied at 1040 and
    /// reverted at 3052, recovery check at 4060. `api` (every 200ms from 10) fails from 1210
    /// to 2810 and is ok again from 3010; `errors` (every 500ms from 100) fails from 1600 to
    /// 3100 and is ok again from 3600.
    fn probed(recovery: &str) -> pb::RunDetail {
        let mut events = vec![
            ev(
                1,
                0,
                "run-started",
                "",
                "",
                "",
                "1 stage(s), 1 fault(s): Pause",
            ),
            ev(
                2,
                1_000,
                "steady-state-check",
                "",
                "",
                "",
                "baseline 1s (steady): api: steady, 5 samples, 0 errors (0%), p50 1ms, p99 1ms; \
                 errors: steady, 2 samples, 0 errors (0%), p50 3ms, p99 3ms",
            ),
            ev(
                3,
                1_002,
                "stage-started",
                "pause",
                "",
                "",
                "stage 1 of 1: 1 fault(s)",
            ),
            ev(
                4,
                1_005,
                "fault-sent",
                "pause",
                "agent-1",
                "pause/0",
                "container-pause on container db for 2s (command c1)",
            ),
            ev(
                5,
                1_040,
                "fault-applied",
                "pause",
                "agent-1",
                "pause/0",
                "applied to container 0123456789ab (db): verified: container is paused [docker pause]",
            ),
            ev(
                6,
                3_052,
                "fault-reverted",
                "pause",
                "agent-1",
                "pause/0",
                "reverted (schedule): unpaused",
            ),
            ev(
                7,
                3_053,
                "stage-finished",
                "pause",
                "",
                "",
                "stage pause finished",
            ),
            ev(8, 4_060, "recovery-check", "", "", "", recovery),
            ev(9, 4_062, "run-finished", "", "", "", "run completed"),
        ];
        if let Some(last) = events.last_mut() {
            last.final_state = "completed".into();
        }
        let mut run = detail("completed", "", events);
        run.plan_yaml = PROBED_PLAN.into();
        run.summary.as_mut().unwrap().title = "Pause the db under probes".into();
        let mut samples = Vec::new();
        for at in (10..4_060).step_by(200) {
            let failing = (1_210..=2_810).contains(&at);
            samples.push(sample(
                "api",
                at,
                !failing,
                if failing { 500.0 } else { 1.0 },
                None,
            ));
        }
        for at in (100..4_060).step_by(500) {
            let failing = (1_600..=3_100).contains(&at);
            let value = match at {
                _ if failing => 9.0,
                a if a < 1_000 => 0.0,
                a if a < 3_052 => 2.0,
                _ => 1.0,
            };
            samples.push(sample("errors", at, !failing, 3.0, Some(value)));
        }
        samples.sort_by_key(|s| s.at_unix_ms);
        run.probe_samples = samples;
        run
    }

    const STEADY_AFTER: &str = "after 1s (steady): api: steady, 5 samples, 0 errors (0%), p50 \
        1ms, p99 1ms; errors: steady, 2 samples, 0 errors (0%), p50 3ms, p99 3ms";

    fn completed() -> pb::RunDetail {
        let mut events = vec![
            ev(
                1,
                0,
                "run-started",
                "",
                "",
                "",
                "2 stage(s), 2 fault(s): Pause",
            ),
            ev(
                2,
                2,
                "stage-started",
                "pause",
                "",
                "",
                "stage 1 of 2: 1 fault(s)",
            ),
            ev(
                3,
                5,
                "fault-sent",
                "pause",
                "agent-1",
                "pause/0",
                "container-pause on container db for 3s (command c1)",
            ),
            ev(
                4,
                40,
                "fault-applied",
                "pause",
                "agent-1",
                "pause/0",
                "applied to container 0123456789ab (db): verified: container is paused [docker pause]",
            ),
            ev(
                5,
                3_052,
                "fault-reverted",
                "pause",
                "agent-1",
                "pause/0",
                "reverted (schedule): unpaused (container 0123456789ab (db))",
            ),
            ev(
                6,
                3_053,
                "stage-finished",
                "pause",
                "",
                "",
                "stage pause finished",
            ),
            ev(
                7,
                3_054,
                "stage-waiting",
                "stop",
                "",
                "",
                "waiting 1s before the stage",
            ),
            ev(
                8,
                4_055,
                "stage-started",
                "stop",
                "",
                "",
                "stage 2 of 2: 1 fault(s)",
            ),
            ev(
                9,
                4_057,
                "fault-sent",
                "stop",
                "agent-2",
                "stop/0",
                "container-stop on container api for 2s (command c2)",
            ),
            ev(
                10,
                4_300,
                "fault-applied",
                "stop",
                "agent-2",
                "stop/0",
                "applied to container abcdefabcdef (api): in force [docker stop]",
            ),
            ev(
                11,
                6_320,
                "fault-reverted",
                "stop",
                "agent-2",
                "stop/0",
                "reverted (schedule): started (container abcdefabcdef (api))",
            ),
            ev(
                12,
                6_321,
                "stage-finished",
                "stop",
                "",
                "",
                "stage stop finished",
            ),
            ev(13, 6_322, "run-finished", "", "", "", "run completed"),
        ];
        if let Some(last) = events.last_mut() {
            last.final_state = "completed".into();
        }
        detail("completed", "", events)
    }

    fn halted() -> pb::RunDetail {
        let events = vec![
            ev(
                1,
                0,
                "run-started",
                "",
                "",
                "",
                "2 stage(s), 2 fault(s): Pause",
            ),
            ev(
                2,
                1,
                "stage-started",
                "pause",
                "",
                "",
                "stage 1 of 2: 1 fault(s)",
            ),
            ev(
                3,
                3,
                "fault-sent",
                "pause",
                "agent-1",
                "pause/0",
                "container-pause on container db for 3s (command c1)",
            ),
            ev(
                4,
                30,
                "fault-applied",
                "pause",
                "agent-1",
                "pause/0",
                "applied to container 0123456789ab (db): verified: container is paused [docker pause]",
            ),
            ev(
                5,
                1_010,
                "fault-reverted",
                "pause",
                "agent-1",
                "pause/0",
                "reverted (halt): unpaused (container 0123456789ab (db))",
            ),
            ev(
                6,
                1_020,
                "halt",
                "",
                "",
                "",
                "halt-all (operator/alice: db looks sick): 1 fault(s) reverted in 25 ms",
            ),
            ev(
                7,
                1_021,
                "run-finished",
                "",
                "",
                "",
                "run halted: halted: db looks sick",
            ),
        ];
        detail("halted", "halted: db looks sick", events)
    }

    fn schema() -> serde_json::Value {
        serde_json::from_str(include_str!("../../docs/report.schema.json")).unwrap()
    }

    fn validator() -> jsonschema::Validator {
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&schema())
            .unwrap()
    }

    fn errors_of(value: &serde_json::Value) -> Vec<String> {
        validator()
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    fn as_json(report: &Report) -> serde_json::Value {
        serde_json::from_str(&render_json(report).unwrap()).unwrap()
    }

    #[test]
    fn a_completed_run_reports_each_fault_with_mechanism_verification_and_latencies() {
        let report = build_report(&completed());
        assert_eq!(report.verdict, NOT_EVALUATED);
        assert_eq!(
            report.hypothesis.as_deref(),
            Some("The api keeps answering.")
        );
        assert!(report.probes.is_empty());
        assert_eq!(report.failure_detection_ms, None);
        assert_eq!(report.recovery_ms, None);
        assert_eq!(report.telemetry, None);
        assert!(report.notes.is_empty(), "{:?}", report.notes);

        let run = &report.run;
        assert_eq!(run.state, "completed");
        assert_eq!(run.reason, None);
        assert_eq!(run.started.as_ref().unwrap().offset_ms, 0);
        assert_eq!(run.created.as_ref().unwrap().offset_ms, -15);
        assert_eq!(run.duration_ms, Some(6_322));
        assert_eq!(run.lease_ms, Some(5_000));
        assert_eq!(run.description.as_deref(), Some("Two stages."));

        assert_eq!(report.stages.len(), 2);
        assert_eq!(report.stages[0].outcome, StageOutcome::Finished);
        assert_eq!(report.stages[1].after_ms, Some(1_000));
        assert_eq!(report.stages[1].waiting.as_ref().unwrap().offset_ms, 3_054);
        assert_eq!(report.stages[1].duration_ms, Some(6_321 - 4_055));

        let [pause, stop] = &report.faults[..] else {
            panic!("{:?}", report.faults)
        };
        assert_eq!(pause.id, format!("{RUN}/pause/0"));
        assert_eq!(pause.kind.as_deref(), Some("container-pause"));
        assert_eq!(pause.target.as_deref(), Some("container db"));
        assert_eq!(
            pause.resolved_target.as_deref(),
            Some("container 0123456789ab (db)")
        );
        assert_eq!(pause.mechanism.as_deref(), Some("docker pause"));
        assert!(pause.verified);
        assert_eq!(pause.verification.as_deref(), Some("container is paused"));
        assert_eq!(pause.planned_duration_ms, Some(3_000));
        assert_eq!(pause.sent.as_ref().unwrap().offset_ms, 5);
        assert_eq!(pause.applied.as_ref().unwrap().offset_ms, 40);
        assert_eq!(pause.scheduled_end.as_ref().unwrap().offset_ms, 3_040);
        assert_eq!(pause.reverted.as_ref().unwrap().offset_ms, 3_052);
        assert_eq!(pause.in_force_ms, Some(3_012));
        assert_eq!(pause.revert_latency_ms, Some(12));
        assert_eq!(pause.revert_reason.as_deref(), Some("schedule"));
        assert_eq!(
            pause.revert_detail.as_deref(),
            Some("unpaused (container 0123456789ab (db))")
        );
        assert_eq!(pause.outcome, FaultOutcome::Reverted);
        assert!(pause.failures.is_empty());

        // "in force" without "verified": applied, not verified.
        assert_eq!(stop.mechanism.as_deref(), Some("docker stop"));
        assert!(!stop.verified);
        assert_eq!(stop.verification.as_deref(), Some("in force"));
        assert_eq!(stop.in_force_ms, Some(2_020));
        assert_eq!(stop.revert_latency_ms, Some(20));

        let t = &report.totals;
        assert_eq!(
            (
                t.stages_planned,
                t.stages_finished,
                t.faults_planned,
                t.faults_applied
            ),
            (2, 2, 2, 2)
        );
        assert_eq!(
            (t.faults_verified, t.faults_reverted, t.faults_failed),
            (1, 2, 0)
        );
        assert_eq!(t.max_revert_latency_ms, Some(20));
        assert_eq!(t.events, 13);
        assert!(report.halt.is_none());
        assert_eq!(report.timeline.len(), 13);
        assert_eq!(report.timeline[3].at.offset_ms, 40);
        assert_eq!(report.timeline[0].fault_id, None);
    }

    #[test]
    fn a_halted_run_reports_the_halt_latency_and_the_early_revert() {
        let report = build_report(&halted());
        assert_eq!(report.run.state, "halted");
        assert_eq!(report.run.reason.as_deref(), Some("halted: db looks sick"));
        let halt = report.halt.as_ref().unwrap();
        assert_eq!(halt.latency_ms, Some(25));
        assert_eq!(
            halt.reason.as_deref(),
            Some("operator/alice: db looks sick")
        );
        assert_eq!(halt.faults_reverted, Some(1));
        assert_eq!(halt.unconfirmed, None);
        assert_eq!(halt.recorded.offset_ms, 1_020);
        assert_eq!(halt.requested.as_ref().unwrap().offset_ms, 995);
        assert_eq!(halt.fault_ids, vec![format!("{RUN}/pause/0")]);

        let pause = &report.faults[0];
        assert_eq!(pause.revert_reason.as_deref(), Some("halt"));
        assert_eq!(pause.revert_latency_ms, Some(1_010 - 3_030));
        assert_eq!(report.faults[1].outcome, FaultOutcome::NotStarted);
        assert_eq!(report.faults[1].planned_duration_ms, Some(2_000));
        assert_eq!(report.stages[0].outcome, StageOutcome::Interrupted);
        assert_eq!(report.stages[1].outcome, StageOutcome::NotStarted);
        assert_eq!(report.totals.max_revert_latency_ms, Some(-2_020));
        assert_eq!(report.verdict, NOT_EVALUATED);
        let text = render_text(&report);
        for needle in [
            "outcome         not started (planned for 2.000s)",
            "revert latency  -2.020s (early)",
            "reverted        +1.010s (halt)",
            "halt latency     25 ms",
            "requested        +0.995s",
        ] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
    }

    #[test]
    fn a_refused_fault_and_an_unconfirmed_revert_are_failures() {
        let events = vec![
            ev(1, 0, "run-started", "", "", "", "x"),
            ev(2, 1, "stage-started", "pause", "", "", "stage 1 of 2"),
            ev(
                3,
                2,
                "fault-sent",
                "pause",
                "agent-1",
                "pause/0",
                "container-pause on container db for 3s (command c1)",
            ),
            ev(
                4,
                9,
                "fault-failed",
                "pause",
                "agent-1",
                "pause/0",
                "container-pause on container db for 3s: refused: no such container",
            ),
            ev(
                5,
                10,
                "run-finished",
                "",
                "",
                "",
                "run failed: agent-1: refused",
            ),
        ];
        let report = build_report(&detail("failed", "agent-1: refused", events));
        let pause = &report.faults[0];
        assert_eq!(pause.outcome, FaultOutcome::NotApplied);
        assert!(!pause.verified);
        assert_eq!(pause.mechanism, None);
        assert_eq!(pause.failures.len(), 1);
        assert_eq!(pause.failures[0].kind, "fault-failed");
        assert_eq!(report.totals.faults_failed, 1);
        assert_eq!(report.stages[0].outcome, StageOutcome::Interrupted);

        let events = vec![
            ev(1, 0, "run-started", "", "", "", "x"),
            ev(2, 1, "stage-started", "pause", "", "", "stage 1 of 2"),
            ev(
                3,
                20,
                "fault-applied",
                "pause",
                "agent-1",
                "pause/0",
                "applied to container 0123456789ab (db): verified: container is paused [docker pause]",
            ),
            ev(
                4,
                13_030,
                "fault-revert-requested",
                "pause",
                "agent-1",
                "pause/0",
                "asking",
            ),
            ev(
                5,
                23_030,
                "fault-revert-unconfirmed",
                "pause",
                "agent-1",
                "pause/0",
                "lease reverts",
            ),
            ev(6, 23_031, "run-finished", "", "", "", "run failed"),
        ];
        let report = build_report(&detail("failed", "x", events));
        let pause = &report.faults[0];
        assert_eq!(pause.outcome, FaultOutcome::RevertUnconfirmed);
        assert!(pause.revert_requested);
        assert_eq!(pause.in_force_ms, None);
        assert_eq!(pause.revert_latency_ms, None);
        assert!(errors_of(&as_json(&report)).is_empty());
    }

    #[test]
    fn without_a_parsable_plan_faults_come_from_the_events() {
        let mut run = completed();
        run.plan_yaml = "not: a plan".into();
        let report = build_report(&run);
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        assert!(
            report.notes[0].contains("does not parse"),
            "{:?}",
            report.notes
        );
        assert_eq!(report.hypothesis, None);
        assert_eq!(report.run.lease_ms, None);
        assert_eq!(report.stages.len(), 2);
        assert_eq!(report.stages[0].after_ms, None);
        assert_eq!(report.stages[0].fault_count, 1);
        let pause = &report.faults[0];
        assert_eq!(pause.kind.as_deref(), Some("container-pause"));
        assert_eq!(pause.target.as_deref(), Some("container db"));
        assert_eq!(pause.planned_duration_ms, Some(3_000));
        assert_eq!(pause.revert_latency_ms, Some(12));
        assert_eq!(report.faults[1].index, 0);
        assert!(errors_of(&as_json(&report)).is_empty());

        run.plan_yaml.clear();
        assert!(build_report(&run).notes[0].contains("no stored plan"));
    }

    #[test]
    fn message_parsers() {
        assert_eq!(
            split_mechanism("verified: limits now x [docker update: [cpus 1] -> [cpus 0.5]]"),
            (
                "verified: limits now x",
                Some("docker update: [cpus 1] -> [cpus 0.5]")
            )
        );
        assert_eq!(split_mechanism("no mechanism"), ("no mechanism", None));
        assert_eq!(split_mechanism("unbalanced]"), ("unbalanced]", None));
        assert!(says_verified("verified: yes"));
        assert!(says_verified("applied to x: verified: y [z]"));
        assert!(!says_verified("unverified"));
        assert!(!says_verified("not verified"));
        assert!(!says_verified("in force [kill]"));
        assert_eq!(
            parse_reverted("reverted (lease-expired): unpaused after 2 failed attempt(s)"),
            (
                Some("lease-expired".into()),
                Some("unpaused after 2 failed attempt(s)".into())
            )
        );
        assert_eq!(
            parse_reverted("reverted (halt)"),
            (Some("halt".into()), None)
        );
        let halt = parse_halt(
            "halt-all (why (really)): 3 fault(s) reverted in 1234 ms; unconfirmed: f on a: gone",
        );
        assert_eq!(halt.reason.as_deref(), Some("why (really)"));
        assert_eq!(halt.faults_reverted, Some(3));
        assert_eq!(halt.latency_ms, Some(1_234));
        assert_eq!(halt.unconfirmed.as_deref(), Some("f on a: gone"));
        assert_eq!(parse_halt("something else"), HaltMessage::default());
        assert_eq!(
            parse_sent("latency on container a for 1m 30s (command c-1)"),
            (
                Some("latency".into()),
                Some("container a".into()),
                Some(90_000)
            )
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_offset(0), "+0.000s");
        assert_eq!(fmt_offset(3_052), "+3.052s");
        assert_eq!(fmt_offset(-15), "-0.015s");
        assert_eq!(fmt_span(812), "812 ms");
        assert_eq!(fmt_span(3_012), "3.012s");
        assert_eq!(fmt_latency(12), "+12 ms");
        assert_eq!(fmt_latency(-2_020), "-2.020s");
        assert_eq!(tick_step(6_322), 1_000);
        assert_eq!(tick_step(500), 100);
        assert_eq!(tick_step(90_000), 10_000);
        let delta = ProbeDelta {
            error_rate_pp: Some(-0.04),
            p95_ms: Some(-0.0),
        };
        assert_eq!(delta_text(&delta), "error rate +0.0 pp, p95 +0.0 ms");
        assert_eq!(round_to(-0.0001, 3).to_string(), "0");
        assert_eq!(latency_step(1.0), 0.2);
        assert_eq!(latency_step(440.0), 100.0);
        assert_eq!(fmt_ms(0.456), "0.46 ms");
        assert_eq!(fmt_ms(401.25), "401.2 ms");
        assert_eq!(fmt_ms(2_500.0), "2.500s");
    }

    #[test]
    fn the_schema_is_valid_draft_2020_12() {
        jsonschema::draft202012::meta::validate(&schema()).unwrap();
    }

    #[test]
    fn generated_reports_validate_against_the_schema() {
        for run in [completed(), halted()] {
            let json = as_json(&build_report(&run));
            let errors = errors_of(&json);
            assert!(errors.is_empty(), "{errors:#?}\n{json:#}");
            assert_eq!(json["verdict"], NOT_EVALUATED);
            assert_eq!(json["probes"], serde_json::json!([]));
            assert!(json["telemetry"].is_null());
            assert!(json["failure_detection_ms"].is_null());
            assert!(json["recovery_ms"].is_null());
        }
        // Reports with probes, in every shape the figures take.
        let mut never_recovered = probed(STEADY_AFTER);
        if let Some(last) = never_recovered.probe_samples.last_mut() {
            last.ok = false;
            last.latency_ms = None;
        }
        let mut truncated = probed(STEADY_AFTER);
        truncated.probe_samples_truncated = true;
        let mut no_samples = probed(STEADY_AFTER);
        no_samples.probe_samples.clear();
        for run in [
            probed(STEADY_AFTER),
            probed("after 1s (not steady): api: not steady, 5 samples"),
            never_recovered,
            truncated,
            no_samples,
        ] {
            let json = as_json(&build_report(&run));
            let errors = errors_of(&json);
            assert!(errors.is_empty(), "{errors:#?}\n{json:#}");
            assert_eq!(json["probes"].as_array().unwrap().len(), 2, "{json:#}");
            assert_eq!(json["report_version"], 2);
        }
    }

    #[test]
    fn the_hypothesis_tolerances_are_judged_over_the_faults_window() {
        let with_tolerances = |tolerances: &str| {
            let mut run = probed(STEADY_AFTER);
            run.plan_yaml = PROBED_PLAN.replace(
                "hypothesis: The api answers again once the db is back.",
                &format!(
                    "hypothesis:\n  text: The api answers again once the db is back.\n  tolerances:\n{tolerances}"
                ),
            );
            build_report(&run)
        };
        // During the pause, api failed 90% of its samples at a p95 of 500 ms.
        let report = with_tolerances(
            "    - { probe: api, max_error_rate: 95% }\n    - { probe: api, max_p95: 300ms }\n",
        );
        assert_eq!(report.verdict, REFUTED);
        let judged: Vec<(&str, &str, bool, Option<f64>)> = report
            .tolerances
            .iter()
            .map(|t| {
                (
                    t.probe.as_str(),
                    t.metric.as_str(),
                    t.held,
                    t.observed_value,
                )
            })
            .collect();
        assert_eq!(
            judged,
            vec![
                ("api", "error_rate", true, Some(0.9)),
                ("api", "p95", false, Some(500.0)),
            ]
        );
        assert!(render_text(&report).contains("[BROKEN]"));
        assert!(errors_of(&as_json(&report)).is_empty());

        let report = with_tolerances("    - { probe: api, max_error_rate: 95% }\n");
        assert_eq!(report.verdict, CONFIRMED);
        assert!(report.tolerances.iter().all(|t| t.held));
        assert!(render_markdown(&report).contains("Tolerance"));
    }

    #[test]
    fn probes_are_judged_per_phase_with_detection_and_recovery_times() {
        let report = build_report(&probed(STEADY_AFTER));
        assert_eq!(report.verdict, CONFIRMED);
        assert!(report.notes.is_empty(), "{:?}", report.notes);

        let phases = &report.phases;
        let span = |p: &Option<PhaseSpan>| {
            p.as_ref()
                .map(|p| (p.start.offset_ms, p.end.offset_ms, p.duration_ms))
        };
        assert_eq!(span(&phases.baseline), Some((0, 1_000, 1_000)));
        assert_eq!(span(&phases.during), Some((1_040, 3_052, 2_012)));
        assert_eq!(span(&phases.after), Some((3_052, 4_060, 1_008)));

        // api fails 170 ms after the pause is applied; errors 560 ms after it.
        assert_eq!(report.failure_detection_ms, Some(1_210 - 1_040));
        // api is ok from 3210 (the first sample after the revert), errors from 3600.
        assert_eq!(report.recovery_ms, Some(3_600 - 3_052));

        let [api, errors] = &report.probes[..] else {
            panic!("{:?}", report.probes)
        };
        assert_eq!(api.name, "api");
        assert_eq!(api.kind.as_deref(), Some("tcp"));
        assert_eq!(api.target.as_deref(), Some("127.0.0.1:5432"));
        assert_eq!(api.interval_ms, Some(200));
        let figures = |w: &ProbeWindow| (w.samples, w.errors, w.error_rate, w.p50_ms, w.p95_ms);
        assert_eq!(
            figures(&api.baseline),
            (5, 0, Some(0.0), Some(1.0), Some(1.0))
        );
        assert_eq!(api.baseline.throughput_per_sec, Some(5.0));
        // 1210..=3010: nine failures at 500 ms, then one ok sample.
        assert_eq!(
            figures(&api.during),
            (10, 9, Some(0.9), Some(500.0), Some(500.0))
        );
        assert_eq!(figures(&api.after), (5, 0, Some(0.0), Some(1.0), Some(1.0)));
        assert_eq!(api.total.samples, 21);
        assert_eq!(api.during_vs_baseline.error_rate_pp, Some(90.0));
        assert_eq!(api.during_vs_baseline.p95_ms, Some(499.0));
        assert_eq!(api.after_vs_baseline.error_rate_pp, Some(0.0));
        assert_eq!(api.after_vs_baseline.p95_ms, Some(0.0));
        assert_eq!(api.detection_ms, Some(170));
        assert_eq!(api.recovery_ms, Some(3_210 - 3_052));
        assert_eq!(api.recovered.as_ref().unwrap().offset_ms, 3_210);
        let first = api.first_failure.as_ref().unwrap();
        assert_eq!(
            (first.at.offset_ms, first.detail.as_deref()),
            (1_210, Some("failed at 1210"))
        );
        assert_eq!(
            (api.steady_before, api.steady_after),
            (Some(true), Some(true))
        );
        assert_eq!(api.samples.len(), 21);
        assert_eq!(api.samples[6].offset_ms, 1_210);
        assert!(!api.samples[6].ok);
        assert_eq!(api.samples[0].detail, None);

        assert_eq!(errors.kind.as_deref(), Some("prometheus"));
        assert_eq!(
            errors.target.as_deref(),
            Some("sum(errors) @ http://prom:9090")
        );
        assert_eq!(errors.detection_ms, Some(1_600 - 1_040));
        assert_eq!(errors.recovery_ms, Some(3_600 - 3_052));
        assert_eq!(
            (
                errors.baseline.value_min,
                errors.baseline.value_mean,
                errors.baseline.value_max
            ),
            (Some(0.0), Some(0.0), Some(0.0))
        );
        // 1100 (2), 1600, 2100, 2600 (9 each): mean 7.25.
        assert_eq!(
            (
                errors.during.value_min,
                errors.during.value_mean,
                errors.during.value_max
            ),
            (Some(2.0), Some(7.25), Some(9.0))
        );
        assert_eq!(errors.during.error_rate, Some(0.75));
        assert_eq!(errors.during_vs_baseline.error_rate_pp, Some(75.0));
    }

    #[test]
    fn the_verdict_follows_the_checks_and_every_missing_figure_has_a_note() {
        // The recovery check found the system not steady.
        let report = build_report(&probed("after 1s (not steady): api: not steady, 5 samples"));
        assert_eq!(report.verdict, REFUTED);
        assert_eq!(report.probes[0].steady_after, Some(false));
        assert_eq!(report.probes[1].steady_after, None);

        // A stop condition fired (the run was aborted, no recovery check).
        let mut stopped = probed(STEADY_AFTER);
        stopped.events.retain(|e| e.kind != "recovery-check");
        stopped.events.push(ev(
            10,
            2_000,
            "stop-condition",
            "",
            "",
            "",
            "stop condition on probe api: error rate 100% > 50% over the last 1s",
        ));
        stopped.summary.as_mut().unwrap().state = "aborted".into();
        let report = build_report(&stopped);
        assert_eq!(report.verdict, REFUTED);
        // Without a recovery check, the after phase runs to the run's end.
        let after = report.phases.after.as_ref().unwrap();
        assert_eq!((after.start.offset_ms, after.end.offset_ms), (3_052, 4_062));

        // Halted before the recovery check: not evaluated, and the notes say why.
        let mut halted = probed(STEADY_AFTER);
        halted.events.retain(|e| e.kind != "recovery-check");
        halted.summary.as_mut().unwrap().state = "halted".into();
        let report = build_report(&halted);
        assert_eq!(report.verdict, NOT_EVALUATED);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("ended halted before its recovery check")),
            "{:?}",
            report.notes
        );

        // Not steady before injection: nothing applied, nothing to detect.
        let mut not_steady = probed(STEADY_AFTER);
        not_steady.events.retain(|e| {
            matches!(
                e.kind.as_str(),
                "run-started" | "steady-state-check" | "run-finished"
            )
        });
        not_steady.events[1].message =
            "baseline 1s (not steady): api: not steady, 5 samples".into();
        not_steady.summary.as_mut().unwrap().state = "aborted".into();
        let report = build_report(&not_steady);
        assert_eq!(report.verdict, NOT_EVALUATED);
        assert_eq!(report.probes[0].steady_before, Some(false));
        assert!(report.phases.during.is_none() && report.phases.after.is_none());
        assert_eq!(report.failure_detection_ms, None);
        assert_eq!(report.recovery_ms, None);
        for needle in ["not steady before injection", "no fault was applied"] {
            assert!(
                report.notes.iter().any(|n| n.contains(needle)),
                "{needle}: {:?}",
                report.notes
            );
        }

        // A probe still failing at the end: no recovery time.
        let mut never = probed(STEADY_AFTER);
        let last_api = never
            .probe_samples
            .iter_mut()
            .rev()
            .find(|s| s.probe == "api")
            .unwrap();
        last_api.ok = false;
        let report = build_report(&never);
        assert_eq!(report.recovery_ms, None);
        assert_eq!(report.probes[0].recovery_ms, None);
        assert_eq!(report.probes[1].recovery_ms, Some(548));
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("probe api was still failing at its last sample")),
            "{:?}",
            report.notes
        );

        // Probes that never failed: no detection time, and a note.
        let mut healthy = probed(STEADY_AFTER);
        for sample in &mut healthy.probe_samples {
            sample.ok = true;
        }
        let report = build_report(&healthy);
        assert_eq!(report.failure_detection_ms, None);
        assert_eq!(report.recovery_ms, Some(3_210 - 3_052));
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("no probe failed while the faults were in force")),
            "{:?}",
            report.notes
        );

        // Truncated samples are noted.
        let mut truncated = probed(STEADY_AFTER);
        truncated.probe_samples_truncated = true;
        let report = build_report(&truncated);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("per-run sample limit")),
            "{:?}",
            report.notes
        );

        // A plan with probes but no stored samples.
        let mut empty = probed(STEADY_AFTER);
        empty.probe_samples.clear();
        let report = build_report(&empty);
        assert_eq!(report.probes.len(), 2);
        assert_eq!(report.probes[0].during.samples, 0);
        assert!(
            report.notes.iter().any(|n| n.contains("stored no samples")),
            "{:?}",
            report.notes
        );
    }

    #[test]
    fn check_messages_parse() {
        let check = parse_check(
            "baseline 1m 30s (not steady): api: steady, 3 samples, 0 errors (0%); db: not \
             steady, 3 samples, 3 errors (100%)",
        )
        .unwrap();
        assert!(!check.steady);
        assert_eq!(check.probes.get("api"), Some(&true));
        assert_eq!(check.probes.get("db"), Some(&false));
        assert!(
            parse_check("after 1s (steady): api: steady, 1 samples")
                .unwrap()
                .steady
        );
        assert_eq!(parse_check("something else"), None);
    }

    #[test]
    fn probes_render_in_text_markdown_and_html() {
        let report = build_report(&probed(STEADY_AFTER));
        let text = render_text(&report);
        for needle in [
            "verdict     confirmed",
            "phases    baseline  +0.000s -> +1.000s (1.000s)",
            "during    +1.040s -> +3.052s (2.012s)",
            "failure detection time  170 ms",
            "recovery time           548 ms",
            "api (tcp 127.0.0.1:5432, every 200 ms)",
            "during vs baseline  error rate +90.0 pp, p95 +499.0 ms",
            "first failure       +1.210s: failed at 1210",
            "detection 170 ms · recovery 158 ms (at +3.210s) · steady before: yes · steady after: yes",
            "values during       2 / 7.25 / 9 (min / mean / max)",
        ] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
        let during_row = text
            .lines()
            .find(|l| l.trim_start().starts_with("during ") && l.contains("500.0 ms"))
            .unwrap_or_else(|| panic!("no during row:\n{text}"));
        assert!(during_row.contains("90%"), "{during_row}");

        let md = render_markdown(&report);
        for needle in [
            "| Verdict | confirmed |",
            "| during | +1.040s | +3.052s | 2.012s |",
            "- Failure detection time: 170 ms",
            "- Recovery time: 548 ms",
            "### Probe api (tcp 127.0.0.1:5432, every 200 ms)",
            "| during | 10 | 9 | 90% | 500.0 ms | 500.0 ms | 500.0 ms | 0.50/s | - |",
            "| during | 4 | 3 | 75% | 3.00 ms | 3.00 ms | 3.00 ms | 0.50/s | 2 / 7.25 / 9 |",
            "- During vs baseline: error rate +90.0 pp, p95 +499.0 ms",
        ] {
            assert!(md.contains(needle), "{needle:?} not in:\n{md}");
        }

        let html = render_html(&report);
        assert_eq!(
            html.matches("<svg").count(),
            3,
            "a timeline and one chart per probe"
        );
        assert_eq!(html.matches("class=\"probe-chart\"").count(), 2);
        assert_eq!(html.matches("class=\"probe-fault-window\"").count(), 2);
        // Nine failed api samples, four failed errors samples.
        assert_eq!(html.matches("<g class=\"probe-failure\">").count(), 13);
        assert_eq!(html.matches("<g class=\"probe-detected\">").count(), 2);
        assert_eq!(html.matches("<g class=\"probe-recovered\">").count(), 2);
        assert_eq!(html.matches("class=\"probe-ok\"").count(), 12 + 4);
        assert!(html.contains("+1.210s failed after 500.0 ms: failed at 1210"));
        assert!(html.contains("detected +170 ms"));
        assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
        assert!(html.contains("Failure detection time</th><td>170 ms"));
    }

    #[test]
    fn a_chart_with_many_samples_draws_one_mark_per_pixel_column() {
        let mut run = probed(STEADY_AFTER);
        // 20 000 samples of one probe, every failing from 2000 to 2500.
        run.probe_samples = (0..20_000)
            .map(|i| {
                let at = i64::from(i) / 5;
                let failing = (2_000..2_500).contains(&at);
                sample("api", at, !failing, 1.0 + f64::from(i % 7), None)
            })
            .collect();
        let report = build_report(&run);
        let svg = render_probe_svg(&report, &report.probes[0]);
        let failures = svg.matches("<g class=\"probe-failure\">").count();
        assert!((1..=200).contains(&failures), "{failures} failure marks");
        assert_eq!(svg.matches("class=\"probe-ok\"").count(), 0);
        assert!(
            svg.matches("<polyline").count() >= 2,
            "broken by the failures"
        );
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
    }

    #[test]
    fn broken_reports_fail_validation() {
        let good = as_json(&build_report(&completed()));
        type Breakage = Box<dyn Fn(&mut serde_json::Value)>;
        let breakages: Vec<(&str, Breakage)> = vec![
            (
                "missing verdict",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("verdict");
                }),
            ),
            (
                "invented verdict",
                Box::new(|v| v["verdict"] = "probably fine".into()),
            ),
            (
                "verified as text",
                Box::new(|v| v["faults"][0]["verified"] = "yes".into()),
            ),
            (
                "unknown field",
                Box::new(|v| v["faults"][0]["colour"] = "red".into()),
            ),
            (
                "mechanism as number",
                Box::new(|v| v["faults"][0]["mechanism"] = 3.into()),
            ),
            (
                "bad outcome",
                Box::new(|v| v["faults"][1]["outcome"] = "done".into()),
            ),
            (
                "fractional ms",
                Box::new(|v| v["faults"][0]["in_force_ms"] = 3.5.into()),
            ),
            (
                "moment without at",
                Box::new(|v| {
                    v["run"]["started"].as_object_mut().unwrap().remove("at");
                }),
            ),
            (
                "bad date",
                Box::new(|v| v["timeline"][0]["at"] = "yesterday".into()),
            ),
            (
                "probes as object",
                Box::new(|v| v["probes"] = serde_json::json!({})),
            ),
            (
                "wrong version",
                Box::new(|v| v["report_version"] = 1.into()),
            ),
            (
                "missing phases",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("phases");
                }),
            ),
            (
                "probe with figures of the wrong type",
                Box::new(|v| {
                    v["probes"] =
                        serde_json::json!([{"name": "api", "baseline": {"p50_ms": "fast"}}]);
                }),
            ),
        ];
        assert!(errors_of(&good).is_empty());
        for (what, breakage) in breakages {
            let mut broken = good.clone();
            breakage(&mut broken);
            assert!(!errors_of(&broken).is_empty(), "{what}: still valid");
        }
        // The same for a report with probes.
        let good = as_json(&build_report(&probed(STEADY_AFTER)));
        assert!(errors_of(&good).is_empty());
        let breakages: Vec<(&str, Breakage)> = vec![
            (
                "p95 as text",
                Box::new(|v| v["probes"][0]["during"]["p95_ms"] = "slow".into()),
            ),
            (
                "negative sample count",
                Box::new(|v| v["probes"][0]["baseline"]["samples"] = (-1).into()),
            ),
            (
                "error rate above 1",
                Box::new(|v| v["probes"][0]["during"]["error_rate"] = 1.5.into()),
            ),
            (
                "fractional detection",
                Box::new(|v| v["failure_detection_ms"] = 1.5.into()),
            ),
            (
                "delta missing",
                Box::new(|v| {
                    v["probes"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("during_vs_baseline");
                }),
            ),
            (
                "sample without ok",
                Box::new(|v| {
                    v["probes"][0]["samples"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("ok");
                }),
            ),
            (
                "phase without end",
                Box::new(|v| {
                    v["phases"]["during"].as_object_mut().unwrap().remove("end");
                }),
            ),
            (
                "unknown probe field",
                Box::new(|v| v["probes"][0]["colour"] = "red".into()),
            ),
        ];
        for (what, breakage) in breakages {
            let mut broken = good.clone();
            breakage(&mut broken);
            assert!(!errors_of(&broken).is_empty(), "{what}: still valid");
        }
    }

    #[test]
    fn html_is_self_contained_escaped_and_has_one_lane_per_fault() {
        let mut run = completed();
        run.reason = "<script>alert(1)</script>".into();
        let html = render_html(&build_report(&run));
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<svg"));
        assert_eq!(html.matches("class=\"lane\"").count(), 2);
        assert_eq!(html.matches("class=\"fault-window\"").count(), 2);
        assert_eq!(html.matches("<g class=\"stage\">").count(), 2);
        assert!(!html.contains("<script"), "escaped");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("Pause &lt;db&gt; then stop | api"));
        assert!(!html.contains("src="), "no external assets");
        assert!(!html.contains("href="), "no external assets");
        assert!(!html.contains("@import"));
        assert!(html.contains("docker pause"));
        assert!(html.contains(NOT_EVALUATED));

        let halted = render_html(&build_report(&halted()));
        assert_eq!(halted.matches("class=\"lane\"").count(), 2);
        assert!(halted.contains("<g class=\"halt\">"));
        assert!(halted.contains("HALT · 25 ms"));
    }

    #[test]
    fn text_and_markdown_carry_the_same_facts() {
        let report = build_report(&completed());
        let text = render_text(&report);
        for needle in [
            RUN,
            "verdict     not evaluated (no hypothesis probes)",
            "[1/2] container-pause on container db via agent-1 (stage pause)",
            "mechanism       docker pause",
            "verified        yes: container is paused",
            "verified        NO (agent said: in force)",
            "in force        3.012s",
            "revert latency  +12 ms",
            "reverted        +3.052s (schedule)",
            "failure detection time  not measured (needs probes)",
            "none: the run was not halted",
            "+0.040s  fault-applied",
        ] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
        let md = render_markdown(&report);
        assert!(
            md.starts_with("# Run report: Pause \\<db\\> then stop \\| api\n"),
            "{md}"
        );
        assert!(
            md.contains("| Verdict | not evaluated (no hypothesis probes) |"),
            "{md}"
        );
        assert!(md.contains("| docker pause | yes: container is paused | +0.040s | +3.052s (schedule) | 3.012s | 3.000s | +12 ms | reverted |"), "{md}");
        // Every table row has as many cells as its header.
        for table_row in md
            .lines()
            .filter(|l| l.starts_with("| 1 | pause | agent-1"))
        {
            assert_eq!(table_row.matches(" | ").count(), 12, "{table_row}");
        }
        let halted = render_markdown(&build_report(&halted()));
        assert!(halted.contains("| Halt latency | 25 ms |"), "{halted}");
    }
}
