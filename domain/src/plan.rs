//! Experiment plans: the YAML format (`apiVersion: faultline/v1`), its parser and its rules.
//!
//! Parsing happens in two passes. serde-saphyr first reads the text into private `Raw*`
//! structs whose values are [`Spanned`], so that syntax and type errors come with a location
//! and, through `serde_path_to_error`, a field path. A second pass then checks every rule and
//! collects *all* semantic errors, each located at the offending value, instead of stopping at
//! the first: whoever fixes a plan wants the whole list at once.
//!
//! # Faults
//!
//! Every fault has `kind`, `agent`, `target` and `duration`; the fields below are specific to
//! a kind (a field given to a kind that does not take it is an error). Units: durations as in
//! `1m 30s` or `250ms` (whole milliseconds); percentages `30`, `30%` or `0.5` (steps of 0.01%);
//! cpus `2` or `0.5` (steps of 0.001); sizes `4096` (bytes), `256Mi`/`256MiB` (powers of 1024)
//! or `256M`/`256MB` (powers of 1000); rates as `tc` reads them: `500kbit`, `1mbit`, `1gbit`
//! (bits/s) or `1kbps`, `1mbps` (**bytes**/s).
//!
//! | kind | fields (default) |
//! |---|---|
//! | `container-pause` | — |
//! | `container-stop` | `grace` (10s; whole seconds, at most 5m) |
//! | `container-kill` | `signal` (SIGKILL), `restart` (true) |
//! | `container-restart` | `grace` (10s; whole seconds, at most 5m) |
//! | `container-limit` | `cpus`, `memory` (at least 6Mi) — at least one |
//! | `network-disconnect` | `network` (required) |
//! | `partition` | `scope`, `mode` (drop \| reject; drop) |
//! | `loss`, `duplicate`, `corrupt` | `scope`, `percent` (required) |
//! | `latency` | `scope`, `delay` (required, 1ms..=1m), `jitter` (0s; at most `delay`) |
//! | `reorder` | `scope`, `percent` (required), `delay` (10ms; 1ms..=1m) |
//! | `bandwidth` | `rate` (required) |
//! | `dns` | `mode` (drop \| reject; drop) |
//! | `cpu-throttle` | `cpus` (required) |
//! | `memory-limit` | `limit` (required, at least 6Mi) |
//! | `io-throttle` | `device` (`MAJ:MIN`; the root fs's), `read_bps`, `write_bps` (sizes per second), `read_iops`, `write_iops` — at least one limit |
//! | `pids-limit` | `max` (required, 1..=4194304) |
//! | `freeze` | — |
//! | `cpu-hog` | `workers` (1; 1..=256), `load` (100; percent 1..=100) |
//! | `memory-hog` | `size` (required) |
//! | `io-hog` | `workers` (1; 1..=256) |
//! | `disk-fill` | `path` (the root; absolute), `fill` (required: `90%` or a size) |
//! | `process-kill` | `signal` (SIGKILL), `name` (the main process), `count` (1; 1..=1000), `interval` (1s; 1ms..=1h) |
//! | `process-stop` | `name` (the main process) |
//!
//! `scope` (network faults but `bandwidth` and `dns`) is
//! `{ peers: [CIDR...], ports: [PORT...], protocol: tcp|udp|icmp|any, direction: both|ingress|egress }`,
//! every key optional: no peers or ports means all, protocol defaults to `any`, direction to
//! `both`. A `target` has exactly one key: `container` (a name, or `re:PATTERN`, unanchored,
//! which must match exactly one container name), `id` (12 to 64 lowercase hex digits),
//! `label` (`key=value` or `key`), `cgroup`, `pid` or `process` (command name). Container
//! faults need a container target; network, disk-fill and process faults any target but a
//! cgroup; cgroup faults and the cpu, memory and io hogs take any target.
//!
//! # Safety settings
//!
//! Two optional top-level keys limit what a plan may do; the coordinator's `--policy` file
//! holds the same keys ([`parse_policy`]) and applies them to every run on top of the plan's,
//! the stricter winning. The checks themselves are in [`crate::interlock`].
//!
//! ```yaml
//! blast_radius:            # every limit optional, each a whole number of at least 1
//!   max_targets: 3         # distinct (agent, target) pairs the plan faults, over all stages
//!   max_agents: 2          # distinct agents the plan faults
//!   max_fleet_percent: 50  # agents faulted / agents connected at start, in percent (1..=100)
//! protected:               # selectors this plan may never target
//!   - { agent: agent-1 }                       # every target on agent-1
//!   - { agent: agent-2, container: postgres }  # one target on one agent
//!   - { container: vault }                     # this target on every agent
//! ```
//!
//! Two more optional keys, `steady_state` and `stop_conditions`, name probes sampled around
//! the run and when to abort it; see the `steady` module ([`SteadyState`], [`StopCondition`]).
//! Stop conditions and stage triggers may also watch the run's kernel telemetry
//! (`{ telemetry: "tcp_retransmits_per_s{target=db} > 50", window: 5s }`); see the
//! `telemetry` module ([`TelemetryCondition`], [`check_telemetry`]).
//!
//! A protection has `agent`, one target key (as in `target`: `container`, `id`, `label`,
//! `cgroup`, `pid`, `process`) or both.
//!
//! # Triggers and the hypothesis
//!
//! A stage may wait for a condition on a `steady_state` probe before it starts (after its
//! `after` delay), and the hypothesis may state measurable tolerances; see the `condition`
//! module ([`Condition`], [`StageTrigger`], [`Tolerance`], [`judge_hypothesis`]).
//!
//! ```yaml
//! hypothesis:                       # or just a sentence, as before
//!   text: Checkout stays within its SLO while the database is paused.
//!   tolerances:                     # judged over the faults' window
//!     - { probe: api, max_error_rate: 5%, max_p95: 300ms }
//! stages:
//!   - name: second-wave
//!     after: 1s
//!     when: { probe: api, metric: p95, above: 500ms, window: 5s, timeout: 2m }
//!     faults: [...]
//! ```
//!
//! Stages normally run one after another: a stage starts (after its `after` delay) once the
//! previous stage's faults are all reverted. `overlap: true` starts it instead once they are
//! all *applied*, while they are still in force (`after` then counts from that moment), so
//! that a cascade piles faults up across hosts: kill the cache; 10s later, with the cache
//! still down, partition the database; when the API's p95 passes 500ms, throttle it too.
//! A target may not be faulted by an overlapping stage while an earlier stage of its chain
//! still holds a fault on it.
//!
//! ```yaml
//! stages:
//!   - { name: cache-down, faults: [...] }
//!   - { name: db-partition, overlap: true, after: 10s, faults: [...] }
//!   - { name: api-throttle, overlap: true, when: { probe: api, metric: p95, above: 500ms, window: 5s }, faults: [...] }
//! ```
//!
//! `metric` is `error_rate` (threshold a percentage), `p50`/`p95`/`p99` (a duration) or
//! `value` (the mean of a Prometheus probe's values; a number); exactly one of `above` and
//! `below` (strict). The condition is judged every 250ms over the samples of the trailing
//! `window` (250ms..=10m); a window with nothing to measure never holds. `timeout` (default 5m,
//! 1s..=1h) bounds the wait: then the run is aborted, and since the stages before it have
//! already reverted their faults, nothing is left applied.
//!
//! # Variables
//!
//! `${NAME}` anywhere in the text (but in comment-only lines) is replaced before the YAML is
//! read: by the value given to the CLI with `--var NAME=VALUE`, else by the plan's own default
//! under the top-level `vars:` mapping. The environment is never read: a plan means the same
//! on every machine. A name used but given nowhere is an error at its `${`; a `--var` the plan
//! neither declares nor uses is an error too (a typo would otherwise go unnoticed). `$${`
//! writes a literal `${`. Values are single lines; substitution keeps every line where it was,
//! and errors point at the text as written. See the `vars` module.
//!
//! ```yaml
//! vars:                        # top-level block, found before the rest is read
//!   DB_HOST: agent-2
//!   HOLD: 30s
//! stages:
//!   - name: pause-db
//!     faults:
//!       - { kind: container-pause, agent: "${DB_HOST}", target: { container: db }, duration: "${HOLD}" }
//! ```
//!
//! # Includes
//!
//! An item of `steady_state.probes` may be `- include: probes/api.yaml`, alone on its line: a
//! file (relative to the plan's directory; not absolute, not outside it) holding a block list of
//! probe specs, which may include further files (at most [`MAX_INCLUDE_DEPTH`] deep, never in
//! a cycle). Variables apply inside included files too. Errors in an included file name that
//! file ([`PlanError::file`]). The domain reads no files: [`parse_plan_with`] takes a reader,
//! and returns the plan's text with its includes inlined ([`ExpandedPlan::text`]), which is
//! what the CLI sends to the coordinator.
//!
//! # Load
//!
//! `load:` starts a built-in open-loop HTTP load generator for the whole run, so that the
//! baseline, the faults and the recovery see the same traffic; see the `load` module
//! ([`LoadSpec`]).
//!
//! ```yaml
//! load: { url: "http://10.0.0.7:8080/checkout", rate: 50/s, method: POST, body: "{}", timeout: 2s }
//! ```

mod condition;
mod load;
mod rules;
mod safety;
mod source;
mod steady;
mod telemetry;
mod units;
mod vars;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, MessageFormatter as _, Spanned};

pub use self::condition::{
    CONFIRMED, Comparison, Condition, ConditionCheck, DEFAULT_WHEN_TIMEOUT, Limit,
    MAX_WHEN_TIMEOUT, MIN_WHEN_TIMEOUT, Metric, NOT_EVALUATED, REFUTED, StageTrigger, Tolerance,
    ToleranceResult, TriggerCondition, VerdictInputs, check_condition, hypothesis_held,
    judge_hypothesis, run_verdict,
};
pub use self::load::{
    DEFAULT_LOAD_TIMEOUT, DEFAULT_MAX_IN_FLIGHT, LoadRate, LoadSpec, MAX_IN_FLIGHT,
    MAX_LOAD_PER_SEC, MAX_LOAD_TIMEOUT,
};
pub use self::rules::check_spec;
#[doc(hidden)]
pub use self::rules::{example_kinds, example_selectors, example_specs};
pub use self::safety::{BlastRadius, MAX_BLAST_LIMIT, Policy, Protected, parse_policy};
pub use self::source::MAX_INCLUDE_DEPTH;
pub use self::steady::{
    DEFAULT_BASELINE, ProbeStopCondition, SteadyState, StopCondition, baseline_verdict,
    format_rate, stop_condition_fired,
};
pub use self::telemetry::{
    TelemetryCondition, TelemetryExpression, TelemetryMetric, TelemetryPoint, check_telemetry,
    errno_name, log2_quantile_us, parse_expression, target_label, telemetry_stop_fired,
};
pub use self::vars::{MAX_VAR_NAME_LEN, MAX_VAR_VALUE_LEN};
use crate::duration::{format_duration, parse_duration};
use crate::fault::{
    Direction, FaultKind, FaultSpec, FillAmount, IoLimits, NetScope, PartitionMode, Protocol,
    Signal, TargetSelector,
};

/// The only plan format this build reads.
pub const API_VERSION: &str = "faultline/v1";
/// The agents' dead-man lease when a plan sets none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// Shortest lease a plan may ask for.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// Longest lease a plan may ask for: a lost coordinator must not leave faults in place long.
pub const MAX_LEASE: Duration = Duration::from_secs(10 * 60);
/// Longest delay a stage may wait (`after`) before it starts.
pub const MAX_STAGE_DELAY: Duration = Duration::from_secs(60 * 60);
/// Longest a single fault may last.
pub const MAX_FAULT_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Grace period of `container-stop` and `container-restart` when a plan sets none (Docker's
/// own default).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest grace period of `container-stop` and `container-restart`.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(5 * 60);
/// Longest stage or agent name.
pub const MAX_NAME_LEN: usize = 63;
/// Most cpus a limit or throttle may name, in milli-cpus (1024 cpus).
pub const MAX_MILLICPUS: u64 = 1_024_000;
/// Smallest memory limit, in bytes: Docker's own minimum (6 MiB).
pub const MIN_MEMORY_LIMIT: u64 = 6 << 20;
/// Longest delay of `latency` and `reorder`.
pub const MAX_NET_DELAY: Duration = Duration::from_secs(60);
/// Delay of `reorder` when a plan sets none (netem reorders only delayed packets).
pub const DEFAULT_REORDER_DELAY: Duration = Duration::from_millis(10);
/// Most worker threads of `cpu-hog` and `io-hog`.
pub const MAX_WORKERS: u32 = 256;
/// Most signals one `process-kill` sends.
pub const MAX_KILL_COUNT: u32 = 1000;
/// Time between the signals of `process-kill` when a plan sets none.
pub const DEFAULT_KILL_INTERVAL: Duration = Duration::from_secs(1);
/// Longest time between the signals of `process-kill`.
pub const MAX_KILL_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Highest pid and highest `pids-limit` (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PID: u64 = 4_194_304;
/// Most peers, and most ports, in one network scope.
pub const MAX_SCOPE_ENTRIES: usize = 64;
/// Longest cgroup or filesystem path.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest `re:` pattern.
pub const MAX_REGEX_LEN: usize = 1024;
/// Fewest hex digits of a container id target (the short id `docker ps` shows).
pub const MIN_CONTAINER_ID_LEN: usize = 12;
/// Most hex digits of a container id target (a full id).
pub const MAX_CONTAINER_ID_LEN: usize = 64;

/// Which fault kinds take each kind-specific field, in the order [`RawFault`] declares them.
const FIELD_OWNERS: &[(&str, &[&str])] = &[
    ("grace", &["container-stop", "container-restart"]),
    ("signal", &["container-kill", "process-kill"]),
    ("restart", &["container-kill"]),
    ("cpus", &["container-limit", "cpu-throttle"]),
    ("memory", &["container-limit"]),
    ("network", &["network-disconnect"]),
    ("scope", SCOPED),
    ("mode", &["partition", "dns"]),
    ("percent", &["loss", "duplicate", "corrupt", "reorder"]),
    ("delay", &["latency", "reorder"]),
    ("jitter", &["latency"]),
    ("rate", &["bandwidth"]),
    ("limit", &["memory-limit"]),
    ("device", IO_THROTTLE),
    ("read_bps", IO_THROTTLE),
    ("write_bps", IO_THROTTLE),
    ("read_iops", IO_THROTTLE),
    ("write_iops", IO_THROTTLE),
    ("max", &["pids-limit"]),
    ("workers", &["cpu-hog", "io-hog"]),
    ("load", &["cpu-hog"]),
    ("size", &["memory-hog"]),
    ("path", &["disk-fill"]),
    ("fill", &["disk-fill"]),
    ("name", &["process-kill", "process-stop"]),
    ("count", &["process-kill"]),
    ("interval", &["process-kill"]),
];
/// Network faults that a `scope` narrows.
const SCOPED: &[&str] = &[
    "partition",
    "loss",
    "latency",
    "duplicate",
    "corrupt",
    "reorder",
];
const IO_THROTTLE: &[&str] = &["io-throttle"];

/// A validated experiment plan: stages run in order, the faults of a stage in parallel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// One-line title, non-empty.
    pub title: String,
    /// Free text about the experiment.
    pub description: Option<String>,
    /// What the experiment expects to observe (the `text` of a detailed hypothesis).
    pub hypothesis: Option<String>,
    /// The hypothesis's measurable part, judged over the faults' window with
    /// [`judge_hypothesis`]; empty when the hypothesis is plain text or absent.
    pub tolerances: Vec<Tolerance>,
    /// The agents' dead-man lease: a fault whose lease is not renewed is reverted.
    pub lease: Duration,
    /// At least one stage, in execution order.
    pub stages: Vec<Stage>,
    /// Limits on how much the plan may fault; none when absent.
    pub blast_radius: BlastRadius,
    /// What the plan may never target; empty when absent.
    pub protected: Vec<Protected>,
    /// Probes sampled around the run and what counts as steady; none when absent.
    pub steady_state: Option<SteadyState>,
    /// When to abort while the faults are applied; empty when absent.
    pub stop_conditions: Vec<StopCondition>,
    /// Traffic sent from the baseline to the recovery check; none when absent.
    pub load: Option<LoadSpec>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stage {
    /// Unique within the plan, `[a-z0-9-]{1,63}`.
    pub name: String,
    /// Delay between the end of the previous stage (or the run's start) and this stage; with
    /// `overlap`, between the previous stage's faults being applied and this stage.
    pub after: Duration,
    /// Start while the previous stage's faults are still in force (counting `after` from when
    /// they were all applied) instead of once they are reverted: how a cascade piles faults up.
    pub overlap: bool,
    /// After the delay, wait for this condition before starting; none when absent.
    pub when: Option<StageTrigger>,
    /// At least one fault, applied in parallel.
    pub faults: Vec<PlannedFault>,
}

/// A fault and the agent that applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedFault {
    /// Agent name, `[A-Za-z0-9._-]{1,63}`.
    pub agent: String,
    /// What the agent does, to what, for how long.
    pub spec: FaultSpec,
}

impl Plan {
    /// Every agent the plan sends a fault to.
    pub fn agents(&self) -> BTreeSet<&str> {
        self.stages
            .iter()
            .flat_map(|stage| &stage.faults)
            .map(|fault| fault.agent.as_str())
            .collect()
    }

    /// Number of faults over all stages.
    pub fn total_faults(&self) -> usize {
        self.stages.iter().map(|stage| stage.faults.len()).sum()
    }

    /// The plan's own safety settings, as a [`Policy`] to combine with the coordinator's.
    pub fn policy(&self) -> Policy {
        Policy {
            blast_radius: self.blast_radius,
            protected: self.protected.clone(),
        }
    }
}

/// One located problem in a plan. `line`/`column` are 1-based; 0 when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}{line}:{column} {}{message}", file_prefix(.file), field_prefix(.field))]
pub struct PlanError {
    /// 1-based line of the offending value; 0 when unknown.
    pub line: u32,
    /// 1-based column of the offending value; 0 when unknown.
    pub column: u32,
    /// Dotted path such as `stages[0].faults[1].duration`; empty for the whole document.
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
    /// The included file the position is in (relative to the plan's directory); `None` for
    /// the plan itself.
    pub file: Option<String>,
}

/// `"FILE:"`, or nothing for the plan itself.
fn file_prefix(file: &Option<String>) -> String {
    file.as_ref()
        .map_or(String::new(), |file| format!("{file}:"))
}

/// `"FIELD: "`, or nothing for document-level errors.
fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// Formats errors as `SOURCE:LINE:COLUMN: FIELD: MESSAGE`, one per line.
///
/// Document-level errors (empty field) read `SOURCE:LINE:COLUMN: MESSAGE`. An error in an
/// included file names that file instead, as a path next to `source_name`.
pub fn render_errors(source_name: &str, errors: &[PlanError]) -> String {
    let mut out = String::new();
    for error in errors {
        let source = match &error.file {
            None => source_name.to_string(),
            Some(file) => match source_name.rsplit_once('/') {
                Some((dir, _)) => format!("{dir}/{file}"),
                None => file.clone(),
            },
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{source}:{}:{}: {}{}",
            error.line,
            error.column,
            field_prefix(&error.field),
            error.message
        );
    }
    out
}

/// Reads an included file, given its path relative to the plan's directory (normalized,
/// never absolute, never outside that directory); `Err` holds why it could not be read.
pub type IncludeResolver<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// What a plan's text may need from outside: variable values and included files.
#[derive(Clone, Copy, Default)]
pub struct PlanInputs<'a> {
    /// `--var NAME=VALUE` values; they override the plan's `vars:` defaults.
    pub vars: &'a [(String, String)],
    /// Reads included files; without it, a plan with an include is refused.
    pub include: Option<IncludeResolver<'a>>,
}

impl std::fmt::Debug for PlanInputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanInputs")
            .field("vars", &self.vars)
            .field("include", &self.include.map(|_| "resolver"))
            .finish()
    }
}

/// A plan and the self-contained text it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpandedPlan {
    pub plan: Plan,
    /// The plan's text with its variables substituted and its includes inlined:
    /// `parse_plan(&text)` reads the same plan without any input. This is what to send to
    /// the coordinator, which never sees the files or values the plan was made from.
    pub text: String,
}

/// Parses and validates a plan.
///
/// A syntax or type error yields exactly one error, since the YAML reader cannot go on past
/// it; otherwise every rule violation is reported, ordered by position in the text. Variables
/// take their `vars:` defaults; an include is refused (see [`parse_plan_with`]).
pub fn parse_plan(yaml: &str) -> Result<Plan, Vec<PlanError>> {
    parse_plan_with(yaml, &PlanInputs::default()).map(|expanded| expanded.plan)
}

/// Parses and validates a plan whose variables and includes are resolved with `inputs`.
/// Errors in an included file carry its name in [`PlanError::file`]; every position is one
/// of the text as written, before substitution.
pub fn parse_plan_with(
    yaml: &str,
    inputs: &PlanInputs<'_>,
) -> Result<ExpandedPlan, Vec<PlanError>> {
    let expanded = source::expand(yaml, inputs)?;
    match parse_text(&expanded.parse_text()) {
        Ok(plan) => Ok(ExpandedPlan {
            plan,
            text: expanded.canonical_text(),
        }),
        Err(mut errors) => {
            for error in &mut errors {
                expanded.locate(error);
            }
            Err(errors)
        }
    }
}

/// Parses and validates a plan's text once its variables and includes are resolved.
fn parse_text(yaml: &str) -> Result<Plan, Vec<PlanError>> {
    let Some(raw) = read_raw(yaml).map_err(|error| vec![error])? else {
        return Err(vec![PlanError {
            line: 1,
            column: 1,
            field: String::new(),
            message: "the plan is empty; expected a mapping with apiVersion, title and stages"
                .to_string(),
            file: None,
        }]);
    };
    let mut checker = Checker::default();
    let plan = checker.plan(&raw);
    checker.finish(plan, "the plan is invalid")
}

// ---------------------------------------------------------------------------------------------
// First pass: YAML into raw, located values.
// ---------------------------------------------------------------------------------------------

/// The document as written. Everything is optional so that a missing field becomes a located
/// semantic error, reported together with the others, instead of a lone serde error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(rename = "apiVersion")]
    api_version: Option<Spanned<String>>,
    title: Option<Spanned<String>>,
    description: Option<Spanned<String>>,
    hypothesis: Option<Spanned<condition::RawHypothesis>>,
    lease: Option<Spanned<String>>,
    stages: Option<Spanned<Vec<Spanned<RawStage>>>>,
    blast_radius: Option<Spanned<safety::RawBlastRadius>>,
    protected: Option<Spanned<Vec<Spanned<safety::RawProtected>>>>,
    steady_state: Option<Spanned<steady::RawSteadyState>>,
    stop_conditions: Option<Spanned<Vec<Spanned<steady::RawStopCondition>>>>,
    load: Option<Spanned<load::RawLoad>>,
    /// Read (and substituted) before the document is: see [`vars`].
    #[serde(rename = "vars")]
    _vars: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Option<Spanned<String>>,
    after: Option<Spanned<String>>,
    overlap: Option<Spanned<bool>>,
    when: Option<Spanned<condition::RawTrigger>>,
    faults: Option<Spanned<Vec<Spanned<RawFault>>>>,
}

/// One fault with the fields of every kind: which ones a kind accepts is a semantic rule
/// ([`FIELD_OWNERS`]), so that a misplaced field gets a message naming the field and the kind.
/// Numbers are read as text and parsed in the second pass, so that a bad one is a located
/// error reported with the others.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    kind: Option<Spanned<String>>,
    agent: Option<Spanned<String>>,
    target: Option<Spanned<RawTarget>>,
    duration: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    signal: Option<Spanned<String>>,
    restart: Option<Spanned<bool>>,
    cpus: Option<Spanned<String>>,
    memory: Option<Spanned<String>>,
    network: Option<Spanned<String>>,
    scope: Option<Spanned<RawScope>>,
    mode: Option<Spanned<String>>,
    percent: Option<Spanned<String>>,
    delay: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    limit: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    read_bps: Option<Spanned<String>>,
    write_bps: Option<Spanned<String>>,
    read_iops: Option<Spanned<String>>,
    write_iops: Option<Spanned<String>>,
    max: Option<Spanned<String>>,
    workers: Option<Spanned<String>>,
    load: Option<Spanned<String>>,
    size: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    fill: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    count: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
}

impl RawFault {
    /// The kind-specific fields present, with where each is written, in [`FIELD_OWNERS`] order.
    fn specific_fields(&self) -> Vec<(&'static str, &Location)> {
        let texts = [
            ("grace", &self.grace),
            ("signal", &self.signal),
            ("cpus", &self.cpus),
            ("memory", &self.memory),
            ("network", &self.network),
            ("mode", &self.mode),
            ("percent", &self.percent),
            ("delay", &self.delay),
            ("jitter", &self.jitter),
            ("rate", &self.rate),
            ("limit", &self.limit),
            ("device", &self.device),
            ("read_bps", &self.read_bps),
            ("write_bps", &self.write_bps),
            ("read_iops", &self.read_iops),
            ("write_iops", &self.write_iops),
            ("max", &self.max),
            ("workers", &self.workers),
            ("load", &self.load),
            ("size", &self.size),
            ("path", &self.path),
            ("fill", &self.fill),
            ("name", &self.name),
            ("count", &self.count),
            ("interval", &self.interval),
        ];
        let mut present: Vec<(&'static str, &Location)> = texts
            .into_iter()
            .filter_map(|(name, value)| value.as_ref().map(|value| (name, &value.referenced)))
            .collect();
        if let Some(restart) = &self.restart {
            present.push(("restart", &restart.referenced));
        }
        if let Some(scope) = &self.scope {
            present.push(("scope", &scope.referenced));
        }
        let order = |name: &str| FIELD_OWNERS.iter().position(|(field, _)| *field == name);
        present.sort_by_key(|(name, _)| order(name));
        present
    }
}

/// `scope:` of a network fault; every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    peers: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<String>>>>,
    protocol: Option<Spanned<String>>,
    direction: Option<Spanned<String>>,
}

/// `target:`; exactly one key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    container: Option<Spanned<String>>,
    id: Option<Spanned<String>>,
    label: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    pid: Option<Spanned<String>>,
    process: Option<Spanned<String>>,
}

impl RawTarget {
    /// The target keys given, with their values.
    fn keys(&self) -> Vec<(&'static str, &Spanned<String>)> {
        given_keys([
            ("container", &self.container),
            ("id", &self.id),
            ("label", &self.label),
            ("cgroup", &self.cgroup),
            ("pid", &self.pid),
            ("process", &self.process),
        ])
    }
}

/// The present entries of `keys`.
fn given_keys<'a, const N: usize>(
    keys: [(&'static str, &'a Option<Spanned<String>>); N],
) -> Vec<(&'static str, &'a Spanned<String>)> {
    keys.into_iter()
        .filter_map(|(key, value)| value.as_ref().map(|value| (key, value)))
        .collect()
}

/// The key under which [`Spanned`] exposes its inner value to serde, and so to the path.
const SPANNED_VALUE_KEY: &str = "value";

/// Reads the YAML; `Ok(None)` for an empty document.
fn read_raw<T: serde::de::DeserializeOwned>(yaml: &str) -> Result<Option<Spanned<T>>, PlanError> {
    // Snippets are for rendering to a terminal; PlanError keeps only position and message.
    let options = serde_saphyr::options! { with_snippet: false };
    let mut failed_at = None;
    serde_saphyr::with_deserializer_from_str_with_options(yaml, options, |deserializer| {
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            failed_at = Some(error.path().clone());
            error.into_inner()
        })
    })
    .map_err(|error| read_error(&error, failed_at.as_ref()))
}

/// Turns a serde-saphyr error into a [`PlanError`], with the field path when one is known.
fn read_error(error: &serde_saphyr::Error, path: Option<&serde_path_to_error::Path>) -> PlanError {
    let (line, column) = error
        .location()
        .map_or((0, 0), |location| position(&location));
    let cause = original_error(error);
    PlanError {
        line,
        column,
        field: path.map(|path| field_path(path, cause)).unwrap_or_default(),
        message: read_error_message(cause),
        file: None,
    }
}

/// The error itself, without the wrappers that add snippets or alias locations.
fn original_error(mut error: &serde_saphyr::Error) -> &serde_saphyr::Error {
    while let serde_saphyr::Error::WithSnippet { error: inner, .. }
    | serde_saphyr::Error::AliasError { error: inner, .. } = error
    {
        error = inner;
    }
    error
}

/// Renders a serde path as `stages[0].faults[1].duration`.
fn field_path(path: &serde_path_to_error::Path, error: &serde_saphyr::Error) -> String {
    use serde_path_to_error::Segment;

    let last = path.iter().len().saturating_sub(1);
    let mut out = String::new();
    for (index, segment) in path.iter().enumerate() {
        let key = match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
                continue;
            }
            // No plan field is called `value`, so such a segment comes from `Spanned`, unless
            // it is the misspelt key an unknown-field error is about.
            Segment::Map { key } | Segment::Enum { variant: key } => {
                let unknown_field =
                    index == last && matches!(error, serde_saphyr::Error::SerdeUnknownField { .. });
                if key == SPANNED_VALUE_KEY && !unknown_field {
                    continue;
                }
                key.as_str()
            }
            // The key could not be read; a duplicate key still names it.
            Segment::Unknown => match error {
                serde_saphyr::Error::DuplicateMappingKey { key: Some(key), .. }
                    if index == last =>
                {
                    key.as_str()
                }
                _ => continue,
            },
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    }
    out
}

/// A message for a person; serde-saphyr's wording names parser events.
fn read_error_message(error: &serde_saphyr::Error) -> String {
    let text = match error {
        serde_saphyr::Error::Unexpected { expected, .. } => match *expected {
            "mapping start" => "expected a mapping (`key: value` lines)".into(),
            "sequence start" => "expected a list (`- item` lines)".into(),
            "string scalar" => "expected a plain value, not a list or mapping".into(),
            _ => serde_saphyr::UserMessageFormatter.format_message(error),
        },
        serde_saphyr::Error::InvalidScalar { ty: "boolean", .. } => "expected true or false".into(),
        _ => serde_saphyr::UserMessageFormatter.format_message(error),
    };
    // The formatter leaves sanitising to its caller, and these messages reach terminals.
    let mut clean = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            clean.extend(c.escape_default());
        } else {
            clean.push(c);
        }
    }
    clean
}

/// serde-saphyr's 1-based position as PlanError's `u32`s; `(0, 0)` for an unknown location.
fn position(location: &Location) -> (u32, u32) {
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    (clamp(location.line()), clamp(location.column()))
}

// ---------------------------------------------------------------------------------------------
// Second pass: rules.
// ---------------------------------------------------------------------------------------------

/// `parent.name`, or `name` at the top.
fn child(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// Collects semantic errors. Each check reports what it finds and returns `None` when the
/// value is unusable, so callers keep checking siblings instead of returning early.
#[derive(Default)]
struct Checker {
    errors: Vec<PlanError>,
}

impl Checker {
    /// The checked value when no error was found, else every error in document order.
    /// `invalid` is the message when the value was dropped without a reported reason.
    fn finish<T>(self, value: Option<T>, invalid: &str) -> Result<T, Vec<PlanError>> {
        let mut errors = self.errors;
        match value {
            Some(value) if errors.is_empty() => Ok(value),
            _ => {
                if errors.is_empty() {
                    // Every path that drops a value reports why; this guards against one that
                    // forgets, so an invalid document can never look valid.
                    errors.push(PlanError {
                        line: 0,
                        column: 0,
                        field: String::new(),
                        message: invalid.to_string(),
                        file: None,
                    });
                }
                // Unknown positions (line 0) go last; the sort is stable, so errors at one
                // position keep the order the checks found them in.
                errors.sort_by_key(|error| (error.line == 0, error.line, error.column));
                Err(errors)
            }
        }
    }

    fn report(&mut self, at: &Location, field: &str, message: impl Into<String>) {
        let (line, column) = position(at);
        self.errors.push(PlanError {
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            file: None,
        });
    }

    /// Reports a missing field at the mapping (`at`) that should hold it.
    fn required<'a, T>(
        &mut self,
        value: &'a Option<Spanned<T>>,
        at: &Location,
        parent: &str,
        name: &str,
    ) -> Option<&'a Spanned<T>> {
        if value.is_none() {
            self.report(
                at,
                &child(parent, name),
                format!("missing required field `{name}`"),
            );
        }
        value.as_ref()
    }

    /// Parses a duration and checks `min <= d <= max`; `rule` words the bounds for messages.
    fn duration(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        (min, max): (Duration, Duration),
        rule: &str,
    ) -> Option<Duration> {
        match parse_duration(&value.value) {
            Ok(duration) if (min..=max).contains(&duration) => Some(duration),
            Ok(duration) => {
                let shown = format_duration(duration);
                let name = field.rsplit('.').next().unwrap_or(field);
                self.report(
                    &value.referenced,
                    field,
                    format!("{name} must be {rule}, got {shown}"),
                );
                None
            }
            Err(error) => {
                self.report(&value.referenced, field, error.to_string());
                None
            }
        }
    }

    /// Trims optional free text; blank counts as absent.
    fn free_text(value: &Option<Spanned<String>>) -> Option<String> {
        value
            .as_ref()
            .map(|text| text.value.trim().to_string())
            .filter(|text| !text.is_empty())
    }

    fn plan(&mut self, raw: &Spanned<RawPlan>) -> Option<Plan> {
        let at = &raw.referenced;
        let plan = &raw.value;

        let api_version = self.required(&plan.api_version, at, "", "apiVersion").and_then(|v| {
            if v.value == API_VERSION {
                Some(v.value.clone())
            } else {
                let message = format!(
                    "unsupported apiVersion {:?}; this version of Faultline reads {API_VERSION:?}",
                    v.value
                );
                self.report(&v.referenced, "apiVersion", message);
                None
            }
        });

        let title = self
            .required(&plan.title, at, "", "title")
            .and_then(|title| {
                let text = title.value.trim();
                if text.is_empty() {
                    self.report(&title.referenced, "title", "title must not be empty");
                    None
                } else if text.chars().any(char::is_control) {
                    // Titles head reports and terminal lines.
                    self.report(&title.referenced, "title", "title must be a single line");
                    None
                } else {
                    Some(text.to_string())
                }
            });

        let lease = match &plan.lease {
            None => Some(DEFAULT_LEASE),
            Some(lease) => {
                self.duration(lease, "lease", (MIN_LEASE, MAX_LEASE), "between 1s and 10m")
            }
        };

        // Stages and the hypothesis refer to the probes of steady_state.
        let steady_state = self.steady_state(plan.steady_state.as_ref());
        let stages = self
            .required(&plan.stages, at, "", "stages")
            .and_then(|stages| {
                if stages.value.is_empty() {
                    self.report(
                        &stages.referenced,
                        "stages",
                        "a plan needs at least one stage",
                    );
                    return None;
                }
                let mut names = HashMap::new();
                let checked: Vec<Option<Stage>> = stages
                    .value
                    .iter()
                    .enumerate()
                    .map(|(index, stage)| {
                        self.stage(stage, index, &mut names, steady_state.as_ref())
                    })
                    .collect();
                self.overlapping_targets(&stages.value, &checked);
                checked.into_iter().collect::<Option<Vec<Stage>>>()
            });

        let blast_radius = self.blast_radius(plan.blast_radius.as_ref());
        let protected = self.protections(plan.protected.as_ref());
        let stop_conditions =
            self.stop_conditions(plan.stop_conditions.as_ref(), steady_state.as_ref());
        if let Some(stages) = &stages {
            self.telemetry_labels(plan, stages);
        }
        let hypothesis = self.hypothesis(plan.hypothesis.as_ref(), steady_state.as_ref());
        let load = self.load(plan.load.as_ref());
        let (hypothesis, tolerances) = match hypothesis {
            Some((text, tolerances)) => (Some(text), Some(tolerances)),
            None => (None, None),
        };

        Some(Plan {
            api_version: api_version?,
            title: title?,
            description: Self::free_text(&plan.description),
            hypothesis: hypothesis?,
            tolerances: tolerances?,
            lease: lease?,
            stages: stages?,
            blast_radius: blast_radius?,
            protected: protected?,
            steady_state: steady_state?,
            stop_conditions: stop_conditions?,
            load: load?,
        })
    }

    /// Telemetry covers the targets of the run's faults and nothing else, so a telemetry
    /// condition's `target=` must name one of them (on its `agent=`, when given) and its
    /// `agent=` one of the plan's agents: anything else would wait or watch forever in vain.
    fn telemetry_labels(&mut self, plan: &RawPlan, stages: &[Stage]) {
        let faults: Vec<&PlannedFault> = stages.iter().flat_map(|s| &s.faults).collect();
        let stop_items = plan.stop_conditions.iter().flat_map(|list| {
            list.value.iter().enumerate().filter_map(|(index, item)| {
                let expression = item.value.telemetry.as_ref()?;
                Some((format!("stop_conditions[{index}].telemetry"), expression))
            })
        });
        let when_items = plan.stages.iter().flat_map(|list| {
            list.value.iter().enumerate().filter_map(|(index, stage)| {
                let expression = stage.value.when.as_ref()?.value.telemetry.as_ref()?;
                Some((format!("stages[{index}].when.telemetry"), expression))
            })
        });
        let items: Vec<(String, &Spanned<String>)> = stop_items.chain(when_items).collect();
        for (field, expression) in items {
            // Expressions that do not parse were reported where they were read.
            let Ok(parsed) = parse_expression(&expression.value) else {
                continue;
            };
            if let Some(agent) = &parsed.agent
                && !faults.iter().any(|fault| &fault.agent == agent)
            {
                let agents: BTreeSet<&str> = faults.iter().map(|f| f.agent.as_str()).collect();
                let message = format!(
                    "agent {agent:?} has no fault in this plan (its agents: {}); telemetry \
                     comes from the agents of the run's faults",
                    agents.into_iter().collect::<Vec<_>>().join(", ")
                );
                self.report(&expression.referenced, &field, message);
                continue;
            }
            let Some(target) = &parsed.target else {
                continue;
            };
            let candidates: Vec<&PlannedFault> = faults
                .iter()
                .copied()
                .filter(|fault| parsed.agent.as_ref().is_none_or(|a| &fault.agent == a))
                .collect();
            if candidates
                .iter()
                .any(|fault| label_names(&fault.spec.target, target))
            {
                continue;
            }
            let known: BTreeSet<String> = candidates
                .iter()
                .map(|fault| target_label(&fault.spec.target))
                .collect();
            let message = format!(
                "target {target:?} is not a target of the plan's faults{} (those are: {}); \
                 telemetry covers the targets of the run's faults",
                parsed
                    .agent
                    .as_ref()
                    .map_or(String::new(), |agent| format!(" on agent {agent}")),
                known.into_iter().collect::<Vec<_>>().join(", ")
            );
            self.report(&expression.referenced, &field, message);
        }
    }

    /// `names` maps each stage name seen so far to its index, for the uniqueness rule.
    fn stage(
        &mut self,
        raw: &Spanned<RawStage>,
        index: usize,
        names: &mut HashMap<String, usize>,
        steady: Option<&Option<SteadyState>>,
    ) -> Option<Stage> {
        let at = &raw.referenced;
        let stage = &raw.value;
        let path = format!("stages[{index}]");

        let name = self
            .required(&stage.name, at, &path, "name")
            .and_then(|name| {
                let field = child(&path, "name");
                if let Some(first) = names.get(&name.value) {
                    let message = format!(
                        "stage name {:?} is already used by stages[{first}]",
                        name.value
                    );
                    self.report(&name.referenced, &field, message);
                    return None;
                }
                names.insert(name.value.clone(), index);
                if is_stage_name(&name.value) {
                    Some(name.value.clone())
                } else {
                    let message = format!(
                        "invalid stage name {:?}: use 1 to {MAX_NAME_LEN} of a-z, 0-9 and -",
                        name.value
                    );
                    self.report(&name.referenced, &field, message);
                    None
                }
            });

        let after = match &stage.after {
            None => Some(Duration::ZERO),
            Some(after) => {
                let bounds = (Duration::ZERO, MAX_STAGE_DELAY);
                self.duration(after, &child(&path, "after"), bounds, "at most 1h")
            }
        };
        let when = match &stage.when {
            None => Some(None),
            Some(when) => self.trigger(when, &child(&path, "when"), steady).map(Some),
        };

        let faults = self
            .required(&stage.faults, at, &path, "faults")
            .and_then(|faults| {
                let field = child(&path, "faults");
                if faults.value.is_empty() {
                    self.report(
                        &faults.referenced,
                        &field,
                        "a stage needs at least one fault",
                    );
                    return None;
                }
                // Faults of a stage run in parallel, so two on the same target would fight.
                let mut targets: Vec<(String, TargetSelector, usize)> = Vec::new();
                let mut checked = Vec::with_capacity(faults.value.len());
                for (fault_index, raw_fault) in faults.value.iter().enumerate() {
                    let fault_path = format!("{field}[{fault_index}]");
                    let fault = self.fault(raw_fault, &fault_path);
                    if let (Some(fault), Some(target)) = (&fault, &raw_fault.value.target) {
                        let spec_target = &fault.spec.target;
                        let clash = targets.iter().find(|(agent, selector, _)| {
                            *agent == fault.agent && selector == spec_target
                        });
                        if let Some((_, _, first)) = clash {
                            let message = format!(
                                "{} on agent {} is already the target of faults[{first}] in this \
                             stage; faults within a stage run in parallel",
                                spec_target, fault.agent
                            );
                            self.report(&target.referenced, &child(&fault_path, "target"), message);
                        } else {
                            targets.push((fault.agent.clone(), spec_target.clone(), fault_index));
                        }
                    }
                    checked.push(fault);
                }
                checked.into_iter().collect::<Option<Vec<PlannedFault>>>()
            });

        let overlap = match &stage.overlap {
            Some(overlap) if overlap.value && index == 0 => {
                let message = "the first stage has no previous stage to overlap";
                self.report(&overlap.referenced, &child(&path, "overlap"), message);
                None
            }
            Some(overlap) => Some(overlap.value),
            None => Some(false),
        };

        Some(Stage {
            name: name?,
            after: after?,
            overlap: overlap?,
            when: when?,
            faults: faults?,
        })
    }

    /// A stage that overlaps its predecessor runs its faults while those of the previous
    /// stages it chains to are still in force: the same target in both would have two faults
    /// fighting over it (and reverting each other's changes).
    fn overlapping_targets(&mut self, raw: &[Spanned<RawStage>], checked: &[Option<Stage>]) {
        for (index, stage) in checked.iter().enumerate() {
            let Some(stage) = stage.as_ref().filter(|stage| stage.overlap) else {
                continue;
            };
            // Every earlier stage still in force when this one starts.
            let mut in_force = Vec::new();
            let mut earlier = index;
            while earlier > 0 {
                earlier -= 1;
                let Some(previous) = &checked[earlier] else {
                    break;
                };
                in_force.push((earlier, previous));
                if !previous.overlap {
                    break;
                }
            }
            for (fault_index, fault) in stage.faults.iter().enumerate() {
                let clash = in_force.iter().find_map(|(earlier, previous)| {
                    previous
                        .faults
                        .iter()
                        .position(|other| {
                            other.agent == fault.agent && other.spec.target == fault.spec.target
                        })
                        .map(|position| (*earlier, position))
                });
                let Some((earlier, position)) = clash else {
                    continue;
                };
                let raw_target = raw[index]
                    .value
                    .faults
                    .as_ref()
                    .and_then(|faults| faults.value.get(fault_index))
                    .and_then(|raw_fault| raw_fault.value.target.as_ref());
                if let Some(target) = raw_target {
                    let message = format!(
                        "{} on agent {} is still the target of stages[{earlier}].faults[{position}] \
                         when this overlapping stage starts; give it to a stage that does not \
                         overlap",
                        fault.spec.target, fault.agent
                    );
                    let field = format!("stages[{index}].faults[{fault_index}].target");
                    self.report(&target.referenced, &field, message);
                }
            }
        }
    }

    fn fault(&mut self, raw: &Spanned<RawFault>, path: &str) -> Option<PlannedFault> {
        let at = &raw.referenced;
        let fault = &raw.value;

        let kind = self
            .required(&fault.kind, at, path, "kind")
            .and_then(|kind| self.kind(raw, kind, path));

        let agent = self
            .required(&fault.agent, at, path, "agent")
            .and_then(|agent| self.parse_at(agent, &child(path, "agent"), agent_name));

        let target = self
            .required(&fault.target, at, path, "target")
            .and_then(|target| self.target(target, &child(path, "target")));

        let duration = self
            .required(&fault.duration, at, path, "duration")
            .and_then(|duration| {
                // Durations are whole milliseconds, so 1ms is the smallest one above zero.
                let bounds = (Duration::from_millis(1), MAX_FAULT_DURATION);
                let rule = "greater than 0s and at most 24h";
                self.duration(duration, &child(path, "duration"), bounds, rule)
            });

        // Rules across fields: the kind decides which targets make sense.
        let (kind, target) = match (kind, target, &fault.target) {
            (Some(kind), Some(target), Some(raw_target)) => {
                let mut fits = true;
                if let Err(message) = rules::target_fits(&kind, &target) {
                    self.report(&raw_target.referenced, &child(path, "target"), message);
                    fits = false;
                }
                if let (Some(name), FaultKind::ProcessKill { .. } | FaultKind::ProcessStop { .. }) =
                    (&fault.name, &kind)
                    && let Err(message) = rules::process_name_fits(&target)
                {
                    self.report(&name.referenced, &child(path, "name"), message);
                    fits = false;
                }
                (fits.then_some(kind), Some(target))
            }
            (kind, target, _) => (kind, target),
        };

        Some(PlannedFault {
            agent: agent?,
            spec: FaultSpec {
                kind: kind?,
                target: target?,
                duration: duration?,
            },
        })
    }

    /// Builds the kind from its name and the fields only some kinds take.
    fn kind(
        &mut self,
        raw: &Spanned<RawFault>,
        kind: &Spanned<String>,
        path: &str,
    ) -> Option<FaultKind> {
        let at = &raw.referenced;
        let fault = &raw.value;
        let Some(name) = FaultKind::NAMES
            .iter()
            .copied()
            .find(|name| *name == kind.value)
        else {
            let message = format!(
                "unknown fault kind {:?}; expected one of {}",
                kind.value,
                FaultKind::NAMES.join(", ")
            );
            self.report(&kind.referenced, &child(path, "kind"), message);
            return None;
        };
        for (field, location) in fault.specific_fields() {
            let owners = owners_of(field);
            if !owners.contains(&name) {
                let verb = if owners.len() == 1 { "takes" } else { "take" };
                let message = format!(
                    "`{field}` does not apply to {name}; only {} {verb} it",
                    join_or_and(owners, "and")
                );
                self.report(location, &child(path, field), message);
            }
        }
        let field = |name: &str| child(path, name);
        match name {
            "container-pause" => Some(FaultKind::ContainerPause),
            "container-stop" => Some(FaultKind::ContainerStop {
                grace_seconds: self.grace_seconds(&fault.grace, &field("grace"))?,
            }),
            "container-restart" => Some(FaultKind::ContainerRestart {
                grace_seconds: self.grace_seconds(&fault.grace, &field("grace"))?,
            }),
            "container-kill" => {
                let signal = self.signal(&fault.signal, &field("signal"));
                let restart_on_revert = fault.restart.as_ref().is_none_or(|restart| restart.value);
                Some(FaultKind::ContainerKill {
                    signal: signal?,
                    restart_on_revert,
                })
            }
            "container-limit" => {
                let millicpus = self.optional(&fault.cpus, &field("cpus"), cpus);
                let memory_bytes = self.optional(&fault.memory, &field("memory"), memory);
                if fault.cpus.is_none() && fault.memory.is_none() {
                    let message = "container-limit needs `cpus`, `memory` or both";
                    self.report(at, &field("cpus"), message);
                    return None;
                }
                Some(FaultKind::ContainerLimit {
                    millicpus: millicpus?,
                    memory_bytes: memory_bytes?,
                })
            }
            "network-disconnect" => {
                let network = self.needed(&fault.network, at, path, "network", |text| {
                    rules::network_name(text).map(|()| text.to_string())
                })?;
                Some(FaultKind::NetworkDisconnect { network })
            }
            "partition" => {
                let scope = self.scope(fault.scope.as_ref(), &field("scope"));
                let mode = self.mode(&fault.mode, &field("mode"));
                Some(FaultKind::Partition {
                    scope: scope?,
                    mode: mode?,
                })
            }
            "loss" | "duplicate" | "corrupt" => {
                let scope = self.scope(fault.scope.as_ref(), &field("scope"));
                let basis_points = self.needed(&fault.percent, at, path, "percent", percent);
                let (scope, basis_points) = (scope?, basis_points?);
                Some(match name {
                    "loss" => FaultKind::Loss {
                        scope,
                        basis_points,
                    },
                    "duplicate" => FaultKind::Duplicate {
                        scope,
                        basis_points,
                    },
                    _ => FaultKind::Corrupt {
                        scope,
                        basis_points,
                    },
                })
            }
            "latency" => {
                let scope = self.scope(fault.scope.as_ref(), &field("scope"));
                let delay = self
                    .required(&fault.delay, at, path, "delay")
                    .and_then(|delay| self.net_delay(delay, &field("delay")));
                let jitter = match &fault.jitter {
                    None => Some(0),
                    Some(jitter) => {
                        let bounds = (Duration::ZERO, MAX_NET_DELAY);
                        let jitter_ms = self
                            .duration(jitter, &field("jitter"), bounds, "at most 1m")
                            .map(duration_ms);
                        match (jitter_ms, delay) {
                            (Some(jitter_ms), Some(delay_ms)) if jitter_ms > delay_ms => {
                                let message = format!(
                                    "jitter must be at most delay ({}), got {}",
                                    format_duration(Duration::from_millis(delay_ms.into())),
                                    format_duration(Duration::from_millis(jitter_ms.into()))
                                );
                                self.report(&jitter.referenced, &field("jitter"), message);
                                None
                            }
                            (jitter_ms, _) => jitter_ms,
                        }
                    }
                };
                Some(FaultKind::Latency {
                    scope: scope?,
                    delay_ms: delay?,
                    jitter_ms: jitter?,
                })
            }
            "reorder" => {
                let scope = self.scope(fault.scope.as_ref(), &field("scope"));
                let basis_points = self.needed(&fault.percent, at, path, "percent", percent);
                let delay = match &fault.delay {
                    None => Some(duration_ms(DEFAULT_REORDER_DELAY)),
                    Some(delay) => self.net_delay(delay, &field("delay")),
                };
                Some(FaultKind::Reorder {
                    scope: scope?,
                    basis_points: basis_points?,
                    delay_ms: delay?,
                })
            }
            "bandwidth" => {
                let rate_bps = self.needed(&fault.rate, at, path, "rate", |text| {
                    units::bits_per_second(text).map_err(subject("rate"))
                })?;
                Some(FaultKind::Bandwidth { rate_bps })
            }
            "dns" => Some(FaultKind::Dns {
                mode: self.mode(&fault.mode, &field("mode"))?,
            }),
            "cpu-throttle" => Some(FaultKind::CpuThrottle {
                millicpus: self.needed(&fault.cpus, at, path, "cpus", cpus)?,
            }),
            "memory-limit" => Some(FaultKind::MemoryLimit {
                bytes: self.needed(&fault.limit, at, path, "limit", |text| {
                    memory(text).map_err(|message| message.replacen("memory", "limit", 1))
                })?,
            }),
            "io-throttle" => self.io_throttle(raw, path),
            "pids-limit" => Some(FaultKind::PidsLimit {
                max: self.needed(&fault.max, at, path, "max", |text| {
                    units::whole(text, (1, MAX_PID)).map_err(subject("max"))
                })?,
            }),
            "freeze" => Some(FaultKind::Freeze),
            "cpu-hog" => {
                let workers = self.with_default(&fault.workers, &field("workers"), 1, workers);
                let load = self.with_default(&fault.load, &field("load"), 100, |text| {
                    units::whole_percent(text).map_err(subject("load"))
                });
                Some(FaultKind::CpuHog {
                    workers: workers?,
                    load_percent: load?,
                })
            }
            "memory-hog" => Some(FaultKind::MemoryHog {
                bytes: self.needed(&fault.size, at, path, "size", |text| {
                    units::bytes(text).map_err(subject("size"))
                })?,
            }),
            "io-hog" => Some(FaultKind::IoHog {
                workers: self.with_default(&fault.workers, &field("workers"), 1, workers)?,
            }),
            "disk-fill" => {
                let disk_path = self.optional(&fault.path, &field("path"), |text| {
                    rules::disk_path(text).map(|()| text.to_string())
                });
                let amount = self.needed(&fault.fill, at, path, "fill", |text| {
                    if text.trim_end().ends_with('%') {
                        units::whole_percent(text)
                            .map(FillAmount::Percent)
                            .map_err(subject("fill"))
                    } else {
                        units::bytes(text)
                            .map(FillAmount::Bytes)
                            .map_err(|message| {
                                format!(
                                    "fill must be a percentage such as 90% or a size: {message}"
                                )
                                .replacen(": must", ", which", 1)
                            })
                    }
                });
                Some(FaultKind::DiskFill {
                    path: disk_path?,
                    amount: amount?,
                })
            }
            "process-kill" => {
                let signal = self.signal(&fault.signal, &field("signal"));
                let name = self.optional(&fault.name, &field("name"), process_name);
                let count = self.with_default(&fault.count, &field("count"), 1, |text| {
                    units::whole(text, (1, MAX_KILL_COUNT.into()))
                        .map(|count| u32::try_from(count).unwrap_or(u32::MAX))
                        .map_err(subject("count"))
                });
                let interval = match &fault.interval {
                    None => Some(DEFAULT_KILL_INTERVAL),
                    Some(interval) => {
                        let bounds = (Duration::from_millis(1), MAX_KILL_INTERVAL);
                        let rule = "greater than 0s and at most 1h";
                        self.duration(interval, &field("interval"), bounds, rule)
                    }
                };
                Some(FaultKind::ProcessKill {
                    signal: signal?,
                    name: name?,
                    count: count?,
                    interval_ms: u64::try_from(interval?.as_millis()).ok()?,
                })
            }
            "process-stop" => Some(FaultKind::ProcessStop {
                name: self.optional(&fault.name, &field("name"), process_name)?,
            }),
            // NAMES holds exactly the kinds matched above; a test parses every one of them.
            _ => {
                self.report(&kind.referenced, &field("kind"), "fault kind not handled");
                None
            }
        }
    }

    /// Parses a present value, reporting `parse`'s message at it.
    fn parse_at<T>(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(&value.value) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                self.report(&value.referenced, field, message);
                None
            }
        }
    }

    /// A field the kind requires.
    fn needed<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        at: &Location,
        path: &str,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.required(value, at, path, name)?;
        self.parse_at(value, &child(path, name), parse)
    }

    /// An optional field: `Some(None)` when absent, `None` when invalid.
    fn optional<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<Option<T>> {
        match value {
            None => Some(None),
            Some(value) => self.parse_at(value, field, parse).map(Some),
        }
    }

    /// An optional field with a default.
    fn with_default<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.optional(value, field, parse)
            .map(|parsed| parsed.unwrap_or(default))
    }

    /// `signal`, SIGKILL by default.
    fn signal(&mut self, value: &Option<Spanned<String>>, field: &str) -> Option<Signal> {
        self.with_default(value, field, Signal::KILL, Signal::parse)
    }

    /// `mode` of a partition or dns fault, `drop` by default.
    fn mode(&mut self, value: &Option<Spanned<String>>, field: &str) -> Option<PartitionMode> {
        self.with_default(value, field, PartitionMode::Drop, |text| match text {
            "drop" => Ok(PartitionMode::Drop),
            "reject" => Ok(PartitionMode::Reject),
            _ => Err(format!(
                "mode must be drop (peers time out) or reject (peers see errors at once), got \
                 {text:?}"
            )),
        })
    }

    /// `delay` of latency or reorder, in milliseconds.
    fn net_delay(&mut self, delay: &Spanned<String>, field: &str) -> Option<u32> {
        let bounds = (Duration::from_millis(1), MAX_NET_DELAY);
        self.duration(delay, field, bounds, "between 1ms and 1m")
            .map(duration_ms)
    }

    /// `grace` of container-stop and container-restart, in whole seconds.
    fn grace_seconds(&mut self, value: &Option<Spanned<String>>, field: &str) -> Option<u32> {
        let grace = match value {
            None => Some(DEFAULT_STOP_GRACE),
            Some(grace) => self.grace(grace, field),
        };
        // Bounded by MAX_STOP_GRACE, so the seconds always fit.
        u32::try_from(grace?.as_secs()).ok()
    }

    /// Docker takes the stop timeout in whole seconds.
    fn grace(&mut self, grace: &Spanned<String>, field: &str) -> Option<Duration> {
        let duration =
            self.duration(grace, field, (Duration::ZERO, MAX_STOP_GRACE), "at most 5m")?;
        if duration.subsec_nanos() != 0 {
            let message = format!(
                "grace must be whole seconds, got {}",
                format_duration(duration)
            );
            self.report(&grace.referenced, field, message);
            return None;
        }
        Some(duration)
    }

    fn io_throttle(&mut self, raw: &Spanned<RawFault>, path: &str) -> Option<FaultKind> {
        let fault = &raw.value;
        let field = |name: &str| child(path, name);
        let device = self.optional(&fault.device, &field("device"), |text| {
            rules::device(text).map(|()| text.to_string())
        });
        let bps = |name: &'static str| {
            move |text: &str| units::bytes_per_second(text).map_err(subject(name))
        };
        let iops = |name: &'static str| {
            move |text: &str| units::whole(text, (1, u64::MAX)).map_err(subject(name))
        };
        let read_bps = self.optional(&fault.read_bps, &field("read_bps"), bps("read_bps"));
        let write_bps = self.optional(&fault.write_bps, &field("write_bps"), bps("write_bps"));
        let read_iops = self.optional(&fault.read_iops, &field("read_iops"), iops("read_iops"));
        let write_iops = self.optional(&fault.write_iops, &field("write_iops"), iops("write_iops"));
        let limits = [
            &fault.read_bps,
            &fault.write_bps,
            &fault.read_iops,
            &fault.write_iops,
        ];
        if limits.iter().all(|limit| limit.is_none()) {
            let message =
                "io-throttle needs at least one of read_bps, write_bps, read_iops, write_iops";
            self.report(&raw.referenced, &field("read_bps"), message);
            return None;
        }
        Some(FaultKind::IoThrottle {
            limits: IoLimits {
                device: device?,
                read_bps: read_bps?,
                write_bps: write_bps?,
                read_iops: read_iops?,
                write_iops: write_iops?,
            },
        })
    }

    /// `scope:` of a network fault; everything when absent.
    fn scope(&mut self, raw: Option<&Spanned<RawScope>>, field: &str) -> Option<NetScope> {
        let Some(raw) = raw else {
            return Some(NetScope::default());
        };
        let scope = &raw.value;
        let peers = self.scope_list(scope.peers.as_ref(), &child(field, "peers"), rules::peer);
        let ports = self.scope_list(scope.ports.as_ref(), &child(field, "ports"), |text| {
            units::whole(text, (1, 65_535))
                .map(|port| u16::try_from(port).unwrap_or(u16::MAX))
                .map_err(subject("port"))
        });
        let protocol = self.with_default(
            &scope.protocol,
            &child(field, "protocol"),
            Protocol::Any,
            |text| match text {
                "any" => Ok(Protocol::Any),
                "tcp" => Ok(Protocol::Tcp),
                "udp" => Ok(Protocol::Udp),
                "icmp" => Ok(Protocol::Icmp),
                _ => Err(format!(
                    "protocol must be tcp, udp, icmp or any, got {text:?}"
                )),
            },
        );
        let direction = self.with_default(
            &scope.direction,
            &child(field, "direction"),
            Direction::Both,
            |text| match text {
                "both" => Ok(Direction::Both),
                "ingress" => Ok(Direction::Ingress),
                "egress" => Ok(Direction::Egress),
                _ => Err(format!(
                    "direction must be both, ingress (to the target) or egress (from the \
                     target), got {text:?}"
                )),
            },
        );
        if protocol == Some(Protocol::Icmp)
            && let Some(ports) = scope.ports.as_ref().filter(|ports| !ports.value.is_empty())
        {
            let message = "icmp has no ports; remove `ports` or use protocol tcp, udp or any";
            self.report(&ports.referenced, &child(field, "ports"), message);
            return None;
        }
        Some(NetScope {
            peers: peers?,
            ports: ports?,
            protocol: protocol?,
            direction: direction?,
        })
    }

    /// A list of a scope, each item parsed and located; empty when absent.
    fn scope_list<T>(
        &mut self,
        list: Option<&Spanned<Vec<Spanned<String>>>>,
        field: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let Some(list) = list else {
            return Some(Vec::new());
        };
        if list.value.len() > MAX_SCOPE_ENTRIES {
            let message = format!(
                "a scope lists at most {MAX_SCOPE_ENTRIES} entries, got {}",
                list.value.len()
            );
            self.report(&list.referenced, field, message);
            return None;
        }
        let parsed: Vec<Option<T>> = list
            .value
            .iter()
            .enumerate()
            .map(|(index, item)| self.parse_at(item, &format!("{field}[{index}]"), &parse))
            .collect();
        parsed.into_iter().collect()
    }

    fn target(&mut self, raw: &Spanned<RawTarget>, field: &str) -> Option<TargetSelector> {
        match self.one_selector(raw.value.keys(), field)? {
            Some(selector) => Some(selector),
            None => {
                let message = "target needs one key: `container: NAME` (or `re:PATTERN`), \
                               `id: ID`, `label: \"key=value\"`, `cgroup: PATH`, `pid: PID` or \
                               `process: NAME`";
                self.report(&raw.referenced, field, message);
                None
            }
        }
    }

    /// The selector of at most one target key: `Some(None)` when none is given, `None` when
    /// several are or the value is invalid (reported).
    fn one_selector(
        &mut self,
        mut given: Vec<(&'static str, &Spanned<String>)>,
        field: &str,
    ) -> Option<Option<TargetSelector>> {
        given.sort_by_key(|(_, value)| (value.referenced.line(), value.referenced.column()));
        match given.as_slice() {
            [] => Some(None),
            [(key, value)] => {
                let key_field = child(field, key);
                self.parse_at(value, &key_field, |text| selector(key, text))
                    .map(Some)
            }
            [(first, _), others @ ..] => {
                for (key, value) in others {
                    let message =
                        format!("a target names one thing: give `{first}` or `{key}`, not both");
                    self.report(&value.referenced, &child(field, key), message);
                }
                None
            }
        }
    }
}

/// The selector a target key and its value stand for.
fn selector(key: &str, text: &str) -> Result<TargetSelector, String> {
    match key {
        "container" => match text.strip_prefix("re:") {
            Some(pattern) => rules::container_regex(pattern)
                .map(|()| TargetSelector::ContainerRegex(pattern.to_string())),
            None => rules::container_name(text).map(|()| TargetSelector::Container(text.into())),
        },
        "id" => rules::container_id(text).map(|()| TargetSelector::ContainerId(text.into())),
        "label" => rules::label(text).map(|()| TargetSelector::Label(text.into())),
        "cgroup" => {
            // `/system.slice/x` as /proc/PID/cgroup shows it, or `system.slice/x`.
            let path = text.trim_matches('/');
            rules::cgroup_path(path).map(|()| TargetSelector::Cgroup(path.into()))
        }
        "pid" => {
            let pid = units::whole(text, (0, u64::from(u32::MAX))).map_err(subject("pid"))?;
            let pid = u32::try_from(pid).unwrap_or(u32::MAX);
            rules::pid(pid).map(|()| TargetSelector::Pid(pid))
        }
        _ => rules::process_name(text).map(|()| TargetSelector::ProcessName(text.into())),
    }
}

/// Kinds that take `field`, per [`FIELD_OWNERS`].
fn owners_of(field: &str) -> &'static [&'static str] {
    FIELD_OWNERS
        .iter()
        .find(|(name, _)| *name == field)
        .map_or(&[], |(_, owners)| owners)
}

/// `a`, `a and b`, `a, b and c`.
fn join_or_and(items: &[&str], last: &str) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., end] => format!("{} {last} {end}", init.join(", ")),
    }
}

/// Prefixes a `must ...` message from [`units`] with the field's name.
fn subject(name: &'static str) -> impl Fn(String) -> String {
    move |message| format!("{name} {message}")
}

/// A duration bounded by the caller to fit, in milliseconds.
fn duration_ms(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

fn cpus(text: &str) -> Result<u64, String> {
    units::millicpus(text, MAX_MILLICPUS).map_err(subject("cpus"))
}

fn memory(text: &str) -> Result<u64, String> {
    let bytes = units::bytes(text).map_err(subject("memory"))?;
    if bytes < MIN_MEMORY_LIMIT {
        return Err(format!(
            "memory must be at least 6Mi (Docker's minimum), got {text}"
        ));
    }
    Ok(bytes)
}

fn percent(text: &str) -> Result<u32, String> {
    units::basis_points(text).map_err(subject("percent"))
}

fn workers(text: &str) -> Result<u32, String> {
    units::whole(text, (1, MAX_WORKERS.into()))
        .map(|workers| u32::try_from(workers).unwrap_or(u32::MAX))
        .map_err(subject("workers"))
}

fn process_name(text: &str) -> Result<String, String> {
    rules::process_name(text).map(|()| text.to_string())
}

/// `[a-z0-9-]{1,63}`: stage names appear in run ids, logs and metrics labels.
/// Whether a telemetry condition's `target=` label names `selector`: its value as written
/// ([`target_label`]), or, for a name pattern, a container name the pattern matches.
fn label_names(selector: &TargetSelector, label: &str) -> bool {
    if target_label(selector) == label {
        return true;
    }
    match selector {
        TargetSelector::ContainerRegex(pattern) => {
            regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(label))
        }
        _ => false,
    }
}

fn is_stage_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An agent name, or why it is not one.
fn agent_name(name: &str) -> Result<String, String> {
    if is_agent_name(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "invalid agent name {name:?}: use 1 to {MAX_NAME_LEN} of A-Z, a-z, 0-9, '.', '_' and \
             '-'"
        ))
    }
}

/// `[A-Za-z0-9._-]{1,63}`.
fn is_agent_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod fault_tests;

#[cfg(test)]
mod language_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Joins lines into a document, so that a test's line numbers are its array indices + 1.
    pub(super) fn doc(lines: &[&str]) -> String {
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    /// A plan whose single stage holds one fault made of `fields`, one per line and
    /// unindented. The fault starts on line 6, so `fields[k]` sits on line `6 + k`.
    pub(super) fn one_fault(fields: &[&str]) -> String {
        let mut lines = vec![
            "apiVersion: faultline/v1".to_string(),
            "title: t".to_string(),
            "stages:".to_string(),
            "  - name: s".to_string(),
            "    faults:".to_string(),
        ];
        for (index, field) in fields.iter().enumerate() {
            let indent = if index == 0 { "      - " } else { "        " };
            lines.push(format!("{indent}{field}"));
        }
        doc(&lines.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `(line, field)` of every error, in reported order.
    pub(super) fn problems(yaml: &str) -> Vec<(u32, String)> {
        match parse_plan(yaml) {
            Ok(plan) => panic!("expected errors, got {plan:#?}\n{yaml}"),
            Err(errors) => errors.iter().map(|e| (e.line, e.field.clone())).collect(),
        }
    }

    const PAUSE: &str = "kind: container-pause";
    const STOP: &str = "kind: container-stop";
    const KILL: &str = "kind: container-kill";
    pub(super) const AGENT: &str = "agent: agent-2";
    pub(super) const TARGET: &str = "target: { container: db }";
    pub(super) const DURATION: &str = "duration: 3s";

    pub(super) fn fault_field(index: usize, name: &str) -> String {
        format!("stages[0].faults[{index}].{name}")
    }

    #[test]
    fn the_documented_example_parses_into_exactly_this_plan() {
        let yaml = doc(&[
            "apiVersion: faultline/v1",
            "title: Pause the database on host 2",
            "description: optional free text",
            "hypothesis: the API degrades gracefully",
            "lease: 30s",
            "stages:",
            "  - name: pause-db",
            "    after: 0s",
            "    faults:",
            "      - kind: container-pause",
            "        agent: agent-2",
            "        target: { container: db }",
            "        duration: 3s",
            "      - kind: container-stop",
            "        agent: agent-1",
            "        target: { label: \"app=cache\" }",
            "        duration: 5s",
            "        grace: 2s",
            "      - kind: container-kill",
            "        agent: agent-3",
            "        target: { container: api }",
            "        duration: 1m 30s",
            "        signal: SIGTERM",
            "        restart: false",
            "  - name: second",
            "    after: 500ms",
            "    faults:",
            "      - kind: container-pause",
            "        agent: agent-2",
            "        target: { container: db }",
            "        duration: 1s",
        ]);
        let fault = |agent: &str, kind, target, secs| PlannedFault {
            agent: agent.to_string(),
            spec: FaultSpec {
                kind,
                target,
                duration: Duration::from_secs(secs),
            },
        };
        let expected = Plan {
            api_version: "faultline/v1".to_string(),
            title: "Pause the database on host 2".to_string(),
            description: Some("optional free text".to_string()),
            hypothesis: Some("the API degrades gracefully".to_string()),
            tolerances: Vec::new(),
            lease: Duration::from_secs(30),
            stages: vec![
                Stage {
                    name: "pause-db".to_string(),
                    after: Duration::ZERO,
                    when: None,
                    overlap: false,
                    faults: vec![
                        fault(
                            "agent-2",
                            FaultKind::ContainerPause,
                            TargetSelector::Container("db".to_string()),
                            3,
                        ),
                        fault(
                            "agent-1",
                            FaultKind::ContainerStop { grace_seconds: 2 },
                            TargetSelector::Label("app=cache".to_string()),
                            5,
                        ),
                        fault(
                            "agent-3",
                            FaultKind::ContainerKill {
                                signal: Signal::parse("SIGTERM").unwrap(),
                                restart_on_revert: false,
                            },
                            TargetSelector::Container("api".to_string()),
                            90,
                        ),
                    ],
                },
                Stage {
                    name: "second".to_string(),
                    after: Duration::from_millis(500),
                    when: None,
                    overlap: false,
                    faults: vec![fault(
                        "agent-2",
                        FaultKind::ContainerPause,
                        TargetSelector::Container("db".to_string()),
                        1,
                    )],
                },
            ],
            blast_radius: BlastRadius::default(),
            protected: Vec::new(),
            steady_state: None,
            stop_conditions: Vec::new(),
            load: None,
        };
        let plan = parse_plan(&yaml).unwrap();
        assert_eq!(plan, expected);
        assert_eq!(
            plan.agents().into_iter().collect::<Vec<_>>(),
            ["agent-1", "agent-2", "agent-3"]
        );
        assert_eq!(plan.total_faults(), 4);
    }

    #[test]
    fn defaults_are_applied() {
        let yaml = doc(&[
            "apiVersion: faultline/v1",
            "title: '  Defaults  '",
            "description: '   '",
            "stages:",
            "  - name: only",
            "    faults:",
            "      - kind: container-stop",
            "        agent: a",
            "        target: { label: tier }",
            "        duration: 5s",
            "      - kind: container-kill",
            "        agent: a",
            "        target: { container: api }",
            "        duration: 5s",
        ]);
        let plan = parse_plan(&yaml).unwrap();
        assert_eq!(plan.title, "Defaults");
        assert_eq!(plan.description, None, "blank free text counts as absent");
        assert_eq!(plan.hypothesis, None);
        assert_eq!(plan.lease, DEFAULT_LEASE);
        assert_eq!(plan.lease, Duration::from_secs(10));
        let stage = &plan.stages[0];
        assert_eq!(stage.after, Duration::ZERO);
        assert_eq!(
            stage.faults[0].spec.kind,
            FaultKind::ContainerStop { grace_seconds: 10 }
        );
        assert_eq!(
            stage.faults[1].spec.kind,
            FaultKind::ContainerKill {
                signal: Signal::KILL,
                restart_on_revert: true
            }
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let plan = parse_plan(include_str!("../../examples/pause-database.yaml")).unwrap();
        assert_eq!(plan.api_version, API_VERSION);
        assert_eq!(plan.lease, Duration::from_secs(10));
        assert_eq!(plan.stages.len(), 1);
        let expected = PlannedFault {
            agent: "agent-2".to_string(),
            spec: FaultSpec {
                kind: FaultKind::ContainerPause,
                target: TargetSelector::Container("faultline-demo-db".to_string()),
                duration: Duration::from_secs(3),
            },
        };
        assert_eq!(plan.stages[0].faults, vec![expected]);
        assert!(plan.hypothesis.is_some() && plan.description.is_some());
    }

    #[test]
    fn boundary_values_are_accepted() {
        let cases: Vec<(&str, String)> = vec![
            (
                "shortest lease",
                doc(&["lease: 1s"]) + &one_fault(&[PAUSE, AGENT, TARGET, DURATION]),
            ),
            (
                "longest lease",
                doc(&["lease: 10m"]) + &one_fault(&[PAUSE, AGENT, TARGET, DURATION]),
            ),
            (
                "shortest fault",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 1ms"]),
            ),
            (
                "longest fault",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 24h"]),
            ),
            (
                "zero grace",
                one_fault(&[STOP, AGENT, TARGET, DURATION, "grace: 0s"]),
            ),
            (
                "longest grace",
                one_fault(&[STOP, AGENT, TARGET, DURATION, "grace: 5m"]),
            ),
            (
                "signal by short name",
                one_fault(&[KILL, AGENT, TARGET, DURATION, "signal: term"]),
            ),
            (
                "label key only",
                one_fault(&[PAUSE, AGENT, "target: { label: tier }", DURATION]),
            ),
            (
                "63-char agent",
                one_fault(&[
                    PAUSE,
                    &format!("agent: {}", "a".repeat(63)),
                    TARGET,
                    DURATION,
                ]),
            ),
            (
                "dotted agent",
                one_fault(&[PAUSE, "agent: Host_2.eu-west", TARGET, DURATION]),
            ),
            (
                "container charset",
                one_fault(&[PAUSE, AGENT, "target: { container: A1_b.c-d }", DURATION]),
            ),
            (
                "null description",
                doc(&["description: ~"]) + &one_fault(&[PAUSE, AGENT, TARGET, DURATION]),
            ),
            (
                "same target on two agents",
                one_fault(&[
                    PAUSE,
                    "agent: one",
                    TARGET,
                    DURATION,
                    "- kind: container-pause",
                    "agent: two",
                    TARGET,
                    DURATION,
                ]),
            ),
            (
                "same container by name and by label",
                one_fault(&[
                    PAUSE,
                    AGENT,
                    TARGET,
                    DURATION,
                    "- kind: container-pause",
                    AGENT,
                    "target: { label: db }",
                    DURATION,
                ]),
            ),
            (
                "anchors and aliases",
                one_fault(&[
                    PAUSE,
                    AGENT,
                    TARGET,
                    "duration: &d 3s",
                    "- kind: container-pause",
                    "agent: other",
                    TARGET,
                    "duration: *d",
                ]),
            ),
        ];
        for (name, yaml) in cases {
            // `one_fault` items after the first are plain lines; the `- ` ones start a second
            // fault, which the helper indents like the other fields, so re-indent them.
            let yaml = yaml.replace("        - kind", "      - kind");
            if let Err(errors) = parse_plan(&yaml) {
                panic!("{name}: {}\n{yaml}", render_errors("case", &errors));
            }
        }
    }

    /// Every rule: the YAML, every `(line, field)` it must produce, and a word of the first
    /// message.
    #[test]
    fn every_rule_reports_the_right_field_and_line() {
        let two_faults = |second: &[&str]| {
            let mut fields = vec![PAUSE, AGENT, TARGET, DURATION];
            fields.extend_from_slice(second);
            one_fault(&fields).replace("        - kind", "      - kind")
        };
        // Name, YAML, every (line, field) expected, a fragment of the first message.
        type Case = (&'static str, String, Vec<(u32, String)>, &'static str);
        const FLOW_FAULTS: &str = concat!(
            "    faults: [{kind: container-pause, agent: a, ",
            "target: {container: db}, duration: 1s}]"
        );
        let cases: Vec<Case> = vec![
            // Document level.
            (
                "empty document",
                "# nothing here\n".to_string(),
                vec![(1, String::new())],
                "the plan is empty",
            ),
            (
                "missing apiVersion, title and stages",
                doc(&["description: d"]),
                vec![
                    (1, "apiVersion".into()),
                    (1, "title".into()),
                    (1, "stages".into()),
                ],
                "missing required field `apiVersion`",
            ),
            (
                "wrong apiVersion",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]).replace("/v1", "/v2"),
                vec![(1, "apiVersion".into())],
                "unsupported apiVersion \"faultline/v2\"",
            ),
            (
                "blank title",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]).replace("title: t", "title: '  '"),
                vec![(2, "title".into())],
                "must not be empty",
            ),
            (
                "multi-line title",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION])
                    .replace("title: t", "title: \"a\\nb\""),
                vec![(2, "title".into())],
                "single line",
            ),
            (
                "lease too long",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]) + "lease: 11m\n",
                vec![(10, "lease".into())],
                "lease must be between 1s and 10m, got 11m",
            ),
            (
                "lease too short",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]) + "lease: 999ms\n",
                vec![(10, "lease".into())],
                "between 1s and 10m",
            ),
            (
                "lease below a millisecond",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]) + "lease: 2s 10us\n",
                vec![(10, "lease".into())],
                "finer than a millisecond",
            ),
            (
                "no stages",
                doc(&["apiVersion: faultline/v1", "title: t", "stages: []"]),
                vec![(3, "stages".into())],
                "at least one stage",
            ),
            // Stages.
            (
                "stage without name",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]).replace("- name: s", "- after: 1s"),
                vec![(4, "stages[0].name".into())],
                "missing required field `name`",
            ),
            (
                "bad stage name",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]).replace("name: s", "name: Pause_DB"),
                vec![(4, "stages[0].name".into())],
                "invalid stage name \"Pause_DB\"",
            ),
            (
                "stage name too long",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION])
                    .replace("name: s", &format!("name: {}", "s".repeat(64))),
                vec![(4, "stages[0].name".into())],
                "invalid stage name",
            ),
            (
                "duplicate stage name",
                doc(&[
                    "apiVersion: faultline/v1",
                    "title: t",
                    "stages:",
                    "  - name: same",
                    FLOW_FAULTS,
                    "  - name: same",
                    FLOW_FAULTS,
                ]),
                vec![(6, "stages[1].name".into())],
                "already used by stages[0]",
            ),
            (
                "stage delay too long",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION])
                    .replace("- name: s", "- name: s\n    after: 61m"),
                vec![(5, "stages[0].after".into())],
                "after must be at most 1h, got 1h 1m",
            ),
            (
                "stage without faults",
                doc(&[
                    "apiVersion: faultline/v1",
                    "title: t",
                    "stages:",
                    "  - name: s",
                ]),
                vec![(4, "stages[0].faults".into())],
                "missing required field `faults`",
            ),
            (
                "stage with empty faults",
                doc(&[
                    "apiVersion: faultline/v1",
                    "title: t",
                    "stages:",
                    "  - name: s",
                    "    faults: []",
                ]),
                vec![(5, "stages[0].faults".into())],
                "at least one fault",
            ),
            // Faults: required fields, reported at the fault's first line.
            (
                "missing kind",
                one_fault(&[AGENT, TARGET, DURATION]),
                vec![(6, fault_field(0, "kind"))],
                "missing required field `kind`",
            ),
            (
                "missing agent",
                one_fault(&[PAUSE, TARGET, DURATION]),
                vec![(6, fault_field(0, "agent"))],
                "missing required field `agent`",
            ),
            (
                "missing target",
                one_fault(&[PAUSE, AGENT, DURATION]),
                vec![(6, fault_field(0, "target"))],
                "missing required field `target`",
            ),
            (
                "missing duration",
                one_fault(&[PAUSE, AGENT, TARGET]),
                vec![(6, fault_field(0, "duration"))],
                "missing required field `duration`",
            ),
            (
                "unknown kind",
                one_fault(&["kind: container-teleport", AGENT, TARGET, DURATION]),
                vec![(6, fault_field(0, "kind"))],
                "unknown fault kind \"container-teleport\"",
            ),
            (
                "bad agent name",
                one_fault(&[PAUSE, "agent: agent 2", TARGET, DURATION]),
                vec![(7, fault_field(0, "agent"))],
                "invalid agent name",
            ),
            (
                "agent name too long",
                one_fault(&[
                    PAUSE,
                    &format!("agent: {}", "a".repeat(64)),
                    TARGET,
                    DURATION,
                ]),
                vec![(7, fault_field(0, "agent"))],
                "invalid agent name",
            ),
            // Durations.
            (
                "invalid duration",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 3x"]),
                vec![(9, fault_field(0, "duration"))],
                "invalid duration \"3x\"",
            ),
            (
                "duration without unit",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 3"]),
                vec![(9, fault_field(0, "duration"))],
                "invalid duration \"3\"",
            ),
            (
                "zero duration",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 0s"]),
                vec![(9, fault_field(0, "duration"))],
                "greater than 0s",
            ),
            (
                "duration over a day",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 24h 1ms"]),
                vec![(9, fault_field(0, "duration"))],
                "at most 24h",
            ),
            (
                "sub-millisecond duration",
                one_fault(&[PAUSE, AGENT, TARGET, "duration: 1500us"]),
                vec![(9, fault_field(0, "duration"))],
                "finer than a millisecond",
            ),
            // Targets.
            (
                "container and label",
                one_fault(&[
                    PAUSE,
                    AGENT,
                    "target: { container: db, label: app=db }",
                    DURATION,
                ]),
                vec![(8, fault_field(0, "target.label"))],
                "not both",
            ),
            (
                "empty target",
                one_fault(&[PAUSE, AGENT, "target: {}", DURATION]),
                vec![(8, fault_field(0, "target"))],
                "target needs",
            ),
            (
                "container name with a slash",
                one_fault(&[PAUSE, AGENT, "target: { container: /db }", DURATION]),
                vec![(8, fault_field(0, "target.container"))],
                "invalid container name \"/db\"",
            ),
            (
                "container name starting with a dot",
                one_fault(&[PAUSE, AGENT, "target: { container: .db }", DURATION]),
                vec![(8, fault_field(0, "target.container"))],
                "invalid container name",
            ),
            (
                "label without key",
                one_fault(&[PAUSE, AGENT, "target: { label: \"=db\" }", DURATION]),
                vec![(8, fault_field(0, "target.label"))],
                "key before `=` is empty",
            ),
            (
                "label key with a space",
                one_fault(&[PAUSE, AGENT, "target: { label: \"my app=db\" }", DURATION]),
                vec![(8, fault_field(0, "target.label"))],
                "whitespace",
            ),
            // Kind-specific fields.
            (
                "grace on a pause",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION, "grace: 2s"]),
                vec![(10, fault_field(0, "grace"))],
                "`grace` does not apply to container-pause; only container-stop and container-restart \
                 take it",
            ),
            (
                "signal on a pause",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION, "signal: SIGTERM"]),
                vec![(10, fault_field(0, "signal"))],
                "`signal` does not apply to container-pause",
            ),
            (
                "restart on a pause",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION, "restart: true"]),
                vec![(10, fault_field(0, "restart"))],
                "`restart` does not apply to container-pause",
            ),
            (
                "signal and restart on a stop",
                one_fault(&[
                    STOP,
                    AGENT,
                    TARGET,
                    DURATION,
                    "signal: SIGTERM",
                    "restart: false",
                ]),
                vec![
                    (10, fault_field(0, "signal")),
                    (11, fault_field(0, "restart")),
                ],
                "`signal` does not apply to container-stop; only container-kill and process-kill take \
                 it",
            ),
            (
                "grace on a kill",
                one_fault(&[KILL, AGENT, TARGET, DURATION, "grace: 2s"]),
                vec![(10, fault_field(0, "grace"))],
                "`grace` does not apply to container-kill",
            ),
            (
                "grace in milliseconds",
                one_fault(&[STOP, AGENT, TARGET, DURATION, "grace: 1500ms"]),
                vec![(10, fault_field(0, "grace"))],
                "whole seconds",
            ),
            (
                "grace too long",
                one_fault(&[STOP, AGENT, TARGET, DURATION, "grace: 5m 1s"]),
                vec![(10, fault_field(0, "grace"))],
                "grace must be at most 5m",
            ),
            (
                "unknown signal",
                one_fault(&[KILL, AGENT, TARGET, DURATION, "signal: SIGFOO"]),
                vec![(10, fault_field(0, "signal"))],
                "unknown signal \"SIGFOO\"",
            ),
            (
                "same agent and container twice in a stage",
                two_faults(&["- kind: container-kill", AGENT, TARGET, DURATION]),
                vec![(12, fault_field(1, "target"))],
                "already the target of faults[0]",
            ),
            (
                "same agent and label twice in a stage",
                one_fault(&[
                    PAUSE,
                    AGENT,
                    "target: { label: app=db }",
                    DURATION,
                    "- kind: container-stop",
                    AGENT,
                    "target: { label: app=db }",
                    DURATION,
                ])
                .replace("        - kind", "      - kind"),
                vec![(12, fault_field(1, "target"))],
                "container labelled app=db on agent agent-2",
            ),
            // Reading errors: one error, with the path serde was at.
            (
                "misspelt fault field",
                one_fault(&[PAUSE, AGENT, TARGET, "duraton: 3s"]),
                vec![(9, fault_field(0, "duraton"))],
                "unknown field `duraton`",
            ),
            (
                "misspelt top-level field",
                doc(&["apiVersion: faultline/v1", "titel: t"]),
                vec![(2, "titel".into())],
                "unknown field `titel`",
            ),
            (
                "unknown field called value",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION, "value: 1"]),
                vec![(10, fault_field(0, "value"))],
                "unknown field `value`",
            ),
            (
                "misspelt target field",
                one_fault(&[PAUSE, AGENT, "target: { name: db }", DURATION]),
                vec![(8, fault_field(0, "target.name"))],
                "unknown field `name`",
            ),
            (
                "restart that is not a boolean",
                one_fault(&[KILL, AGENT, TARGET, DURATION, "restart: maybe"]),
                vec![(10, fault_field(0, "restart"))],
                "expected true or false",
            ),
            (
                "stages that are not a list",
                doc(&["apiVersion: faultline/v1", "title: t", "stages: 5"]),
                vec![(3, "stages".into())],
                "expected a list",
            ),
            (
                "target that is not a mapping",
                one_fault(&[PAUSE, AGENT, "target: db", DURATION]),
                vec![(8, fault_field(0, "target"))],
                "expected a mapping",
            ),
            (
                "title that is a list",
                doc(&["apiVersion: faultline/v1", "title: [a, b]"]),
                vec![(2, "title".into())],
                "expected a plain value",
            ),
            (
                "duplicate key",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION, "kind: container-stop"]),
                vec![(10, fault_field(0, "kind"))],
                "duplicate mapping key `kind`",
            ),
            (
                "bad indentation",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]).replace("    faults:", "   faults:"),
                vec![(5, "stages".into())],
                "",
            ),
            (
                "two documents",
                one_fault(&[PAUSE, AGENT, TARGET, DURATION]) + "---\ntitle: again\n",
                vec![(11, String::new())],
                "single YAML document",
            ),
        ];
        for (name, yaml, expected, fragment) in cases {
            let errors = match parse_plan(&yaml) {
                Ok(plan) => panic!("{name}: expected errors, got {plan:#?}\n{yaml}"),
                Err(errors) => errors,
            };
            let found: Vec<(u32, String)> =
                errors.iter().map(|e| (e.line, e.field.clone())).collect();
            assert_eq!(
                found,
                expected,
                "{name}:\n{}\n{yaml}",
                render_errors("case", &errors)
            );
            assert!(
                errors[0].message.contains(fragment),
                "{name}: {:?} lacks {fragment:?}",
                errors[0].message
            );
            assert!(errors.iter().all(|e| e.column > 0), "{name}: {errors:?}");
        }
    }

    #[test]
    fn all_semantic_errors_are_reported_in_document_order() {
        let yaml = doc(&[
            "apiVersion: faultline/v9",
            "title: t",
            "lease: 1h",
            "stages:",
            "  - name: Bad Name",
            "    after: soon",
            "    faults:",
            "      - kind: container-pause",
            "        agent: agent-2",
            "        target: { container: db }",
            "        duration: 0s",
            "        restart: true",
            "      - kind: container-teleport",
            "        agent: agent-2",
            "        target: {}",
            "  - name: fine",
            "    faults:",
            "      - kind: container-kill",
            "        agent: agent-1",
            "        target: { container: api }",
            "        duration: 3s",
            "        signal: SIGWHATEVER",
        ]);
        let expected: Vec<(u32, String)> = vec![
            (1, "apiVersion".into()),
            (3, "lease".into()),
            (5, "stages[0].name".into()),
            (6, "stages[0].after".into()),
            (11, fault_field(0, "duration")),
            (12, fault_field(0, "restart")),
            // The missing field is reported at the fault's first key, left of the kind's value.
            (13, fault_field(1, "duration")),
            (13, fault_field(1, "kind")),
            (15, fault_field(1, "target")),
            (22, "stages[1].faults[0].signal".into()),
        ];
        assert_eq!(problems(&yaml), expected);
    }

    #[test]
    fn errors_locate_the_value_line_and_column() {
        let yaml = one_fault(&[PAUSE, AGENT, TARGET, "duration: 3x"]);
        let errors = parse_plan(&yaml).unwrap_err();
        assert_eq!(
            errors,
            vec![PlanError {
                line: 9,
                column: 19,
                field: "stages[0].faults[0].duration".to_string(),
                message: "invalid duration \"3x\": unknown time unit \"x\", supported units: \
                          ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few \
                          variations)"
                    .to_string(),
                file: None,
            }]
        );
        assert!(errors[0].to_string().starts_with(
            "9:19 stages[0].faults[0].duration: invalid duration \"3x\": unknown time unit"
        ));
    }

    #[test]
    fn errors_render_one_per_line() {
        let errors = vec![
            PlanError {
                line: 3,
                column: 5,
                field: "stages[0].faults[1].duration".to_string(),
                message: "invalid duration \"3x\"".to_string(),
                file: None,
            },
            PlanError {
                line: 1,
                column: 1,
                field: String::new(),
                message: "empty".to_string(),
                file: None,
            },
        ];
        assert_eq!(
            render_errors("plan.yaml", &errors),
            "plan.yaml:3:5: stages[0].faults[1].duration: invalid duration \"3x\"\n\
             plan.yaml:1:1: empty\n"
        );
        assert_eq!(errors[1].to_string(), "1:1 empty");
        assert_eq!(render_errors("plan.yaml", &[]), "");
    }

    #[test]
    fn control_characters_in_read_errors_are_escaped() {
        let yaml = one_fault(&[PAUSE, AGENT, TARGET, DURATION, "\"bad\\u0007key\": 1"]);
        let errors = parse_plan(&yaml).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            !errors[0].message.chars().any(char::is_control),
            "{:?}",
            errors[0].message
        );
        assert!(
            errors[0].message.contains("bad\\u{7}key"),
            "{:?}",
            errors[0].message
        );
    }

    /// Each fixture starts with `# expect: LINE FIELD`; the CLI's integration test feeds the
    /// same files to `faultline plan validate`.
    #[test]
    fn malformed_fixtures_fail_at_the_line_and_field_they_announce() {
        let fixtures: &[(&str, &str)] = &[
            (
                "bad-01-yaml-syntax.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-01-yaml-syntax.yaml"),
            ),
            (
                "bad-02-unknown-field.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-02-unknown-field.yaml"),
            ),
            (
                "bad-03-invalid-duration.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-03-invalid-duration.yaml"),
            ),
            (
                "bad-04-unknown-kind.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-04-unknown-kind.yaml"),
            ),
            (
                "bad-05-wrong-api-version.yaml",
                include_str!(
                    "../../integration-tests/fixtures/plans/bad-05-wrong-api-version.yaml"
                ),
            ),
            (
                "bad-06-field-of-other-kind.yaml",
                include_str!(
                    "../../integration-tests/fixtures/plans/bad-06-field-of-other-kind.yaml"
                ),
            ),
            (
                "bad-07-missing-target.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-07-missing-target.yaml"),
            ),
            (
                "bad-08-duplicate-target.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-08-duplicate-target.yaml"),
            ),
            (
                "bad-09-wrong-target-kind.yaml",
                include_str!(
                    "../../integration-tests/fixtures/plans/bad-09-wrong-target-kind.yaml"
                ),
            ),
            (
                "bad-10-invalid-cidr.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-10-invalid-cidr.yaml"),
            ),
            (
                "bad-11-percent-out-of-range.yaml",
                include_str!(
                    "../../integration-tests/fixtures/plans/bad-11-percent-out-of-range.yaml"
                ),
            ),
            (
                "bad-12-ambiguous-size.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-12-ambiguous-size.yaml"),
            ),
            (
                "bad-13-icmp-ports.yaml",
                include_str!("../../integration-tests/fixtures/plans/bad-13-icmp-ports.yaml"),
            ),
        ];
        for (name, text) in fixtures {
            let header = text.lines().next().unwrap();
            let expect = header
                .strip_prefix("# expect: ")
                .unwrap_or_else(|| panic!("{name}"));
            let (line, field) = expect.split_once(' ').unwrap();
            let errors = parse_plan(text).unwrap_err();
            let first = &errors[0];
            assert_eq!(
                (first.line, first.field.as_str()),
                (line.parse::<u32>().unwrap(), field),
                "{name}: {}",
                render_errors(name, &errors)
            );
        }
    }

    #[test]
    fn plans_serialize_for_reports() {
        let plan = parse_plan(&one_fault(&[PAUSE, AGENT, TARGET, DURATION])).unwrap();
        let yaml = serde_saphyr::to_string(&plan).unwrap();
        assert!(yaml.contains("api_version: faultline/v1"), "{yaml}");
        assert!(yaml.contains("agent: agent-2"), "{yaml}");
    }
}
