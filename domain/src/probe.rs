//! Steady-state probes: what to measure about the system under test, what counts as healthy,
//! and the statistics a report shows for the time before, during and after the faults.
//!
//! Pure: the coordinator performs the I/O and hands each result to [`evaluate`] as an
//! [`Observation`]; [`summarize`] and [`steady`] work on the [`ProbeSample`]s that come back.
//!
//! # The YAML form
//!
//! A probe is one flat mapping with a `kind`; a field that the kind does not take is an
//! error, as is any unknown field. Durations are humantime strings (`250ms`, `1m 30s`).
//!
//! ```yaml
//! - name: api                 # [A-Za-z0-9_.-], at most 64 characters
//!   kind: http
//!   url: http://shop:8080/health
//!   method: GET               # GET HEAD POST PUT PATCH DELETE OPTIONS; default GET
//!   headers: { Accept: application/json }
//!   body: '{"ping": 1}'       # request body, optional
//!   expect_status: 200-399    # default; or 200, [200, 204], "2xx"
//!   max_latency: 250ms        # optional: slower answers are failures
//!   body_contains: healthy    # optional
//!   interval: 1s              # default 1s (100ms..=1h)
//!   timeout: 2s               # default 2s (1ms..=1m)
//! - { name: db, kind: tcp, address: "postgres:5432", max_latency: 50ms }
//! - { name: queue, kind: command, agent: agent-1, argv: [rabbitmqctl, status], expect_exit: 0, stdout_contains: running }
//! - { name: errors, kind: prometheus, url: http://prometheus:9090, query: "sum(rate(http_errors_total[1m]))", max: 5 }
//! ```
//!
//! Field names are snake_case like the rest of the plan; kinds are kebab-case like fault kinds.
//!
//! # Samples and statistics
//!
//! Every attempt yields one [`ProbeSample`]. Its latency is the wall time of the whole attempt
//! (connect, request, full body), for failed attempts too: a time-out counts with the time it
//! took, so it shows in the high percentiles as it would for a client. Percentiles are
//! nearest-rank over every sample with a latency; the throughput is *successful* samples per
//! second of the window, so it falls when a probe starts failing or slowing down.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::{format_duration, parse_duration};

/// How often a probe runs unless its spec says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one attempt may take unless its spec says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest interval a plan may ask for: probes observe a system, they must not load it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval a plan may ask for.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest time-out a plan may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest probe name.
pub const MAX_NAME_LEN: usize = 64;
/// HTTP methods a probe may use.
pub const HTTP_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// One steady-state probe: what to check and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawProbeSpec", into = "RawProbeSpec")]
pub struct ProbeSpec {
    /// Unique within a plan; names the probe in samples and reports.
    pub name: String,
    /// What to check and the tolerance.
    pub kind: ProbeKind,
    /// Time between the starts of two attempts (an attempt that overruns delays the next).
    pub interval: Duration,
    /// Longest time one attempt may take; a slower attempt is a failed sample.
    pub timeout: Duration,
}

/// What a probe checks, with its tolerance.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeKind {
    /// An HTTP(S) request.
    Http {
        url: String,
        /// Upper case, one of [`HTTP_METHODS`].
        method: String,
        headers: BTreeMap<String, String>,
        /// Request body.
        body: Option<String>,
        expect_status: StatusMatch,
        /// Answers slower than this are failures.
        max_latency: Option<Duration>,
        /// The response body must contain this text.
        body_contains: Option<String>,
    },
    /// A TCP connect.
    Tcp {
        /// `host:port` (`[v6]:port` for an IPv6 literal).
        address: String,
        /// Connects slower than this are failures.
        max_latency: Option<Duration>,
    },
    /// A command run by an agent on its host.
    Command {
        agent: String,
        argv: Vec<String>,
        expect_exit: i32,
        stdout_contains: Option<String>,
    },
    /// A PromQL instant query; the first sample's value must lie in `min..=max`.
    Prometheus {
        /// Base URL of the Prometheus server (the probe asks `{url}/api/v1/query`).
        url: String,
        query: String,
        min: Option<f64>,
        max: Option<f64>,
    },
}

impl ProbeKind {
    /// The `kind` as written in a plan.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Http { .. } => "http",
            ProbeKind::Tcp { .. } => "tcp",
            ProbeKind::Command { .. } => "command",
            ProbeKind::Prometheus { .. } => "prometheus",
        }
    }

    /// A `GET url` probe expecting 200-399, with no other tolerance.
    pub fn http(url: impl Into<String>) -> Self {
        ProbeKind::Http {
            url: url.into(),
            method: "GET".into(),
            headers: BTreeMap::new(),
            body: None,
            expect_status: StatusMatch::default(),
            max_latency: None,
            body_contains: None,
        }
    }

    /// A TCP connect probe with no latency limit.
    pub fn tcp(address: impl Into<String>) -> Self {
        ProbeKind::Tcp {
            address: address.into(),
            max_latency: None,
        }
    }

    /// A Prometheus probe accepting any numeric value.
    pub fn prometheus(url: impl Into<String>, query: impl Into<String>) -> Self {
        ProbeKind::Prometheus {
            url: url.into(),
            query: query.into(),
            min: None,
            max: None,
        }
    }
}

impl ProbeSpec {
    /// A probe with the default interval and time-out.
    pub fn new(name: impl Into<String>, kind: ProbeKind) -> Self {
        ProbeSpec {
            name: name.into(),
            kind,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Every rule a spec must satisfy (parsing applies them; specs built in code may call it).
    pub fn validate(&self) -> Result<(), ProbeSpecError> {
        let mut problems = Vec::new();
        check_name(&self.name, &mut problems);
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&self.interval) {
            problems.push(format!(
                "interval must be between {} and {}",
                format_duration(MIN_INTERVAL),
                format_duration(MAX_INTERVAL)
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            problems.push(format!(
                "timeout must be between 1ms and {}",
                format_duration(MAX_TIMEOUT)
            ));
        }
        match &self.kind {
            ProbeKind::Http {
                url,
                method,
                headers,
                body: _,
                expect_status,
                max_latency,
                body_contains,
            } => {
                check_url("url", url, &mut problems);
                if !HTTP_METHODS.contains(&method.as_str()) {
                    problems.push(format!(
                        "method {method:?} is not one of {}",
                        HTTP_METHODS.join(", ")
                    ));
                }
                for (name, value) in headers {
                    if name.is_empty() || !name.bytes().all(is_token_byte) {
                        problems.push(format!("header name {name:?} is not a valid HTTP token"));
                    }
                    if value.chars().any(|c| c.is_control() && c != '\t') {
                        problems.push(format!("header {name} has control characters"));
                    }
                }
                expect_status.check(&mut problems);
                check_max_latency(*max_latency, &mut problems);
                check_not_empty("body_contains", body_contains.as_deref(), &mut problems);
            }
            ProbeKind::Tcp {
                address,
                max_latency,
            } => {
                if let Err(problem) = check_address(address) {
                    problems.push(problem);
                }
                check_max_latency(*max_latency, &mut problems);
            }
            ProbeKind::Command {
                agent,
                argv,
                expect_exit: _,
                stdout_contains,
            } => {
                if agent.trim().is_empty() {
                    problems.push("agent must not be empty".into());
                }
                if argv.first().is_none_or(|program| program.is_empty()) {
                    problems.push("argv must name a program".into());
                }
                check_not_empty("stdout_contains", stdout_contains.as_deref(), &mut problems);
            }
            ProbeKind::Prometheus {
                url,
                query,
                min,
                max,
            } => {
                check_url("url", url, &mut problems);
                if query.trim().is_empty() {
                    problems.push("query must not be empty".into());
                }
                for (field, bound) in [("min", min), ("max", max)] {
                    if bound.is_some_and(|b| !b.is_finite()) {
                        problems.push(format!("{field} must be a finite number"));
                    }
                }
                if let (Some(min), Some(max)) = (min, max)
                    && min > max
                {
                    problems.push(format!("min {min} is greater than max {max}"));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ProbeSpecError {
                name: self.name.clone(),
                problems,
            })
        }
    }
}

/// Why a probe spec was refused: every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("probe {name:?}: {}", problems.join("; "))]
pub struct ProbeSpecError {
    pub name: String,
    pub problems: Vec<String>,
}

/// Which HTTP status codes count as healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusMatch {
    /// `min..=max`, written `200-399` (or `2xx` for `200-299`).
    Range { min: u16, max: u16 },
    /// Exactly these codes.
    List(Vec<u16>),
}

impl Default for StatusMatch {
    /// Success and redirection: 200-399 (the probe does not follow redirects).
    fn default() -> Self {
        StatusMatch::Range { min: 200, max: 399 }
    }
}

impl StatusMatch {
    pub fn contains(&self, status: u16) -> bool {
        match self {
            StatusMatch::Range { min, max } => (*min..=*max).contains(&status),
            StatusMatch::List(codes) => codes.contains(&status),
        }
    }

    /// Reads `200-399`, `2xx` or a single code `204`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || format!("invalid status range {text:?}: expected e.g. 200-399 or 2xx");
        let code = |s: &str| s.trim().parse::<u16>().map_err(|_| bad());
        if let Some(class) = text.strip_suffix("xx").or_else(|| text.strip_suffix("XX")) {
            let class = code(class)?;
            if !(1..=5).contains(&class) {
                return Err(bad());
            }
            return Ok(StatusMatch::Range {
                min: class * 100,
                max: class * 100 + 99,
            });
        }
        match text.split_once('-') {
            Some((min, max)) => Ok(StatusMatch::Range {
                min: code(min)?,
                max: code(max)?,
            }),
            None => Ok(StatusMatch::List(vec![code(text)?])),
        }
    }

    fn check(&self, problems: &mut Vec<String>) {
        let valid = |code: &u16| (100..=599).contains(code);
        match self {
            StatusMatch::Range { min, max } => {
                if !valid(min) || !valid(max) || min > max {
                    problems.push(format!(
                        "expect_status {self} is not a range of status codes within 100-599"
                    ));
                }
            }
            StatusMatch::List(codes) => {
                if codes.is_empty() {
                    problems.push("expect_status must list at least one code".into());
                }
                for code in codes.iter().filter(|c| !valid(c)) {
                    problems.push(format!("expect_status {code} is not a status code"));
                }
            }
        }
    }
}

impl fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusMatch::Range { min, max } => write!(f, "{min}-{max}"),
            StatusMatch::List(codes) => {
                let codes: Vec<String> = codes.iter().map(u16::to_string).collect();
                write!(f, "[{}]", codes.join(", "))
            }
        }
    }
}

// --- evaluation ---------------------------------------------------------------------------------

/// What one attempt saw, before any tolerance is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// When the attempt started, Unix milliseconds.
    pub at_ms: i64,
    /// Wall time of the attempt, if measured.
    pub latency: Option<Duration>,
    pub outcome: Outcome,
}

/// The raw result of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An HTTP response (any status) and its body, possibly truncated.
    Http { status: u16, body: String },
    /// A TCP connection was established.
    Connected,
    /// A command ran to completion.
    Exited { code: i32, stdout: String },
    /// A query returned this value.
    Value(f64),
    /// The attempt did not finish within the probe's time-out.
    TimedOut { after: Duration },
    /// The attempt failed before yielding a result (refused, DNS, malformed answer, ...).
    Failed(String),
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Http { .. } => "an http",
            Outcome::Connected => "a tcp",
            Outcome::Exited { .. } => "a command",
            Outcome::Value(_) => "a prometheus",
            Outcome::TimedOut { .. } => "a timed-out",
            Outcome::Failed(_) => "a failed",
        }
    }
}

/// One attempt, judged against the probe's tolerance.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSample {
    /// When the attempt started, Unix milliseconds.
    pub at_ms: i64,
    /// Whether the attempt was within tolerance.
    pub ok: bool,
    /// Wall time of the attempt.
    pub latency: Option<Duration>,
    /// The measured value (Prometheus probes).
    pub value: Option<f64>,
    /// For a person: what was seen and, when not ok, why.
    pub detail: String,
}

/// Judges one observation against the probe's tolerance.
pub fn evaluate(kind: &ProbeKind, observation: &Observation) -> ProbeSample {
    let latency = observation.latency;
    let mut failures: Vec<String> = Vec::new();
    let mut value = None;
    let took = latency.map_or(String::new(), |l| format!(" in {}", format_latency(l)));
    let check_latency = |max: Option<Duration>, failures: &mut Vec<String>| {
        if let Some(max) = max {
            match latency {
                Some(l) if l <= max => {}
                Some(_) => {
                    failures.push(format!("slower than max_latency {}", format_latency(max)))
                }
                None => failures.push("latency not measured".into()),
            }
        }
    };
    let summary = match (kind, &observation.outcome) {
        (_, Outcome::TimedOut { after }) => {
            failures.push(format!("timed out after {}", format_duration(*after)));
            None
        }
        (_, Outcome::Failed(error)) => {
            failures.push(error.clone());
            None
        }
        (
            ProbeKind::Http {
                expect_status,
                max_latency,
                body_contains,
                ..
            },
            Outcome::Http { status, body },
        ) => {
            if !expect_status.contains(*status) {
                failures.push(format!("status {status} not in {expect_status}"));
            }
            check_latency(*max_latency, &mut failures);
            if let Some(needle) = body_contains
                && !body.contains(needle.as_str())
            {
                failures.push(format!("body does not contain {needle:?}"));
            }
            Some(format!("HTTP {status}{took}"))
        }
        (ProbeKind::Tcp { max_latency, .. }, Outcome::Connected) => {
            check_latency(*max_latency, &mut failures);
            Some(format!("connected{took}"))
        }
        (
            ProbeKind::Command {
                expect_exit,
                stdout_contains,
                ..
            },
            Outcome::Exited { code, stdout },
        ) => {
            if code != expect_exit {
                failures.push(format!("exit code {code}, expected {expect_exit}"));
            }
            if let Some(needle) = stdout_contains
                && !stdout.contains(needle.as_str())
            {
                failures.push(format!("stdout does not contain {needle:?}"));
            }
            Some(format!("exit {code}{took}"))
        }
        (ProbeKind::Prometheus { min, max, .. }, Outcome::Value(v)) => {
            value = Some(*v);
            if v.is_nan() {
                failures.push("value is NaN".into());
            } else {
                if let Some(min) = min
                    && v < min
                {
                    failures.push(format!("below min {min}"));
                }
                if let Some(max) = max
                    && v > max
                {
                    failures.push(format!("above max {max}"));
                }
            }
            Some(format!("value {v}{took}"))
        }
        (kind, outcome) => {
            failures.push(format!(
                "internal error: {} observation for a {} probe",
                outcome.name(),
                kind.name()
            ));
            None
        }
    };
    let detail = match (summary, failures.is_empty()) {
        (Some(summary), true) => summary,
        (Some(summary), false) => format!("{summary}: {}", failures.join("; ")),
        (None, _) => failures.join("; "),
    };
    ProbeSample {
        at_ms: observation.at_ms,
        ok: failures.is_empty(),
        latency,
        value,
        detail,
    }
}

/// `12ms` for whole milliseconds, else `0.4ms` (one decimal).
pub fn format_latency(latency: Duration) -> String {
    if latency.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", latency.as_millis())
    } else {
        format!("{:.1}ms", latency.as_secs_f64() * 1000.0)
    }
}

// --- statistics ---------------------------------------------------------------------------------

/// A span of time, `start_ms..end_ms` (Unix milliseconds, end excluded): the baseline, the
/// faults, or the recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Window {
    pub fn new(start_ms: i64, end_ms: i64) -> Self {
        Window { start_ms, end_ms }
    }

    pub fn contains(&self, at_ms: i64) -> bool {
        (self.start_ms..self.end_ms).contains(&at_ms)
    }

    /// Length of the window; zero when `end_ms <= start_ms`.
    pub fn length(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.end_ms.saturating_sub(self.start_ms)).unwrap_or(0))
    }
}

/// Figures for one probe over one window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeStats {
    /// Samples taken in the window.
    pub count: usize,
    /// Of those, how many were not ok.
    pub errors: usize,
    /// `errors / count`; `None` without samples.
    pub error_rate: Option<f64>,
    /// Nearest-rank latency percentiles over the samples with a latency.
    pub latency_p50: Option<Duration>,
    pub latency_p95: Option<Duration>,
    pub latency_p99: Option<Duration>,
    /// Successful samples per second of the window; `None` for an empty window.
    pub throughput_per_sec: Option<f64>,
    /// Over the samples with a (non-NaN) value.
    pub value_min: Option<f64>,
    pub value_max: Option<f64>,
    pub value_mean: Option<f64>,
}

/// Statistics of the samples (of one probe) taken within `window`.
pub fn summarize(samples: &[ProbeSample], window: Window) -> ProbeStats {
    let in_window: Vec<&ProbeSample> = samples
        .iter()
        .filter(|s| window.contains(s.at_ms))
        .collect();
    let count = in_window.len();
    let errors = in_window.iter().filter(|s| !s.ok).count();
    let mut latencies: Vec<Duration> = in_window.iter().filter_map(|s| s.latency).collect();
    latencies.sort_unstable();
    let values: Vec<f64> = in_window
        .iter()
        .filter_map(|s| s.value)
        .filter(|v| !v.is_nan())
        .collect();
    let seconds = window.length().as_secs_f64();
    ProbeStats {
        count,
        errors,
        error_rate: (count > 0).then(|| errors as f64 / count as f64),
        latency_p50: nearest_rank(&latencies, 50),
        latency_p95: nearest_rank(&latencies, 95),
        latency_p99: nearest_rank(&latencies, 99),
        throughput_per_sec: (seconds > 0.0).then(|| (count - errors) as f64 / seconds),
        value_min: values.iter().copied().reduce(f64::min),
        value_max: values.iter().copied().reduce(f64::max),
        value_mean: (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64),
    }
}

/// The nearest-rank `percent`th percentile of `sorted` (ascending): the smallest value such that
/// at least `percent`% of the values are at most it. `None` for no values; `percent` is clamped
/// to 1..=100.
pub fn nearest_rank<T: Copy>(sorted: &[T], percent: u32) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let percent = percent.clamp(1, 100) as usize;
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

// --- steady state -------------------------------------------------------------------------------

/// When a probe's recent samples count as steady: at most `max_error_rate` of the last `last`
/// samples failed, judged once at least `min_samples` exist.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteadyRule {
    last: usize,
    min_samples: usize,
    max_error_rate: f64,
}

/// Why a steady rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid steady-state rule: {0}")]
pub struct SteadyRuleError(String);

impl SteadyRule {
    /// `last >= 1`, `1 <= min_samples <= last`, `0 <= max_error_rate <= 1`.
    pub fn new(
        last: usize,
        min_samples: usize,
        max_error_rate: f64,
    ) -> Result<Self, SteadyRuleError> {
        if last == 0 {
            return Err(SteadyRuleError("last must be at least 1".into()));
        }
        if min_samples == 0 || min_samples > last {
            return Err(SteadyRuleError(format!(
                "min_samples must be between 1 and last ({last})"
            )));
        }
        if !(0.0..=1.0).contains(&max_error_rate) {
            return Err(SteadyRuleError(
                "max_error_rate must be between 0 and 1".into(),
            ));
        }
        Ok(SteadyRule {
            last,
            min_samples,
            max_error_rate,
        })
    }

    /// The last `n` samples (at least 1) must all be ok, and there must be `n` of them.
    pub fn all_ok(n: usize) -> Self {
        let n = n.max(1);
        SteadyRule {
            last: n,
            min_samples: n,
            max_error_rate: 0.0,
        }
    }

    pub fn last(&self) -> usize {
        self.last
    }

    pub fn min_samples(&self) -> usize {
        self.min_samples
    }

    pub fn max_error_rate(&self) -> f64 {
        self.max_error_rate
    }
}

/// The verdict of [`steady`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Steadiness {
    Steady,
    /// Too many recent failures; the reason names the latest one.
    NotSteady(String),
    /// Not enough samples yet to judge.
    Undecided(String),
}

/// Judges a probe's samples, in the order they were taken, against `rule`.
pub fn steady(samples: &[ProbeSample], rule: &SteadyRule) -> Steadiness {
    let recent = &samples[samples.len().saturating_sub(rule.last)..];
    if recent.len() < rule.min_samples {
        return Steadiness::Undecided(format!(
            "{} of {} samples needed",
            recent.len(),
            rule.min_samples
        ));
    }
    let errors = recent.iter().filter(|s| !s.ok).count();
    let rate = errors as f64 / recent.len() as f64;
    if rate <= rule.max_error_rate {
        return Steadiness::Steady;
    }
    let latest = recent
        .iter()
        .rev()
        .find(|s| !s.ok)
        .map_or(String::new(), |s| format!("; latest: {}", s.detail));
    Steadiness::NotSteady(format!(
        "{errors} of the last {} samples failed ({}% > {}% allowed){latest}",
        recent.len(),
        percent(rate),
        percent(rule.max_error_rate)
    ))
}

/// `0.4` as `40`, `1/3` as `33.3`.
fn percent(fraction: f64) -> String {
    let p = (fraction * 1000.0).round() / 10.0;
    format!("{p}")
}

// --- validation helpers ---------------------------------------------------------------------------

fn check_name(name: &str, problems: &mut Vec<String>) {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(valid_char) {
        problems.push(format!(
            "name must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -"
        ));
    }
}

fn check_url(field: &str, url: &str, problems: &mut Vec<String>) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        None => problems.push(format!("{field} must start with http:// or https://")),
        Some(rest) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if host.is_empty() || url.chars().any(char::is_whitespace) {
                problems.push(format!("{field} {url:?} is not a valid URL"));
            }
        }
    }
}

fn check_max_latency(max_latency: Option<Duration>, problems: &mut Vec<String>) {
    if max_latency.is_some_and(|d| d.is_zero()) {
        problems.push("max_latency must be more than 0s".into());
    }
}

fn check_not_empty(field: &str, value: Option<&str>, problems: &mut Vec<String>) {
    if value.is_some_and(str::is_empty) {
        problems.push(format!("{field} must not be empty"));
    }
}

/// `host:port` or `[v6]:port`, port 1..=65535.
fn check_address(address: &str) -> Result<(), String> {
    let bad = || format!("address {address:?} must be host:port");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').is_some_and(|h| !h.is_empty()),
        None => !host.is_empty() && !host.contains([':', '/', ' ']),
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// --- the YAML form ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawKind {
    Http,
    Tcp,
    Command,
    Prometheus,
}

/// The flat mapping as written; [`ProbeSpec`]'s `TryFrom` checks which fields apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbeSpec {
    name: String,
    kind: RawKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_status: Option<RawStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_latency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_contains: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_exit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdout_contains: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
}

/// `expect_status` as written: a code, a list of codes, or a range string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RawStatus {
    Code(u64),
    List(Vec<u64>),
    Text(String),
}

impl Serialize for RawStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RawStatus::Code(code) => serializer.serialize_u64(*code),
            RawStatus::List(codes) => codes.serialize(serializer),
            RawStatus::Text(text) => serializer.serialize_str(text),
        }
    }
}

impl<'de> Deserialize<'de> for RawStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawStatus;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code, a list of codes, or a range such as 200-399 or 2xx")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawStatus, E> {
                Ok(RawStatus::Code(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawStatus, E> {
                u64::try_from(v)
                    .map(RawStatus::Code)
                    .map_err(|_| E::custom(format!("{v} is not a status code")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawStatus, E> {
                Ok(RawStatus::Text(v.to_string()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawStatus, A::Error> {
                let mut codes = Vec::new();
                while let Some(code) = seq.next_element::<u64>()? {
                    codes.push(code);
                }
                Ok(RawStatus::List(codes))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A code beyond `u16` is kept as an invalid one (0) so that validation reports it.
fn status_code(code: u64) -> u16 {
    u16::try_from(code).unwrap_or(0)
}

impl TryFrom<RawProbeSpec> for ProbeSpec {
    type Error = ProbeSpecError;

    fn try_from(raw: RawProbeSpec) -> Result<Self, Self::Error> {
        let mut problems = Vec::new();
        let kind_name = match raw.kind {
            RawKind::Http => "http",
            RawKind::Tcp => "tcp",
            RawKind::Command => "command",
            RawKind::Prometheus => "prometheus",
        };
        let mut duration = |field: &str, text: Option<&String>| -> Option<Duration> {
            let text = text?;
            parse_duration(text)
                .map_err(|err| problems.push(format!("{field}: {err}")))
                .ok()
        };
        let interval = duration("interval", raw.interval.as_ref()).unwrap_or(DEFAULT_INTERVAL);
        let timeout = duration("timeout", raw.timeout.as_ref()).unwrap_or(DEFAULT_TIMEOUT);
        let max_latency = duration("max_latency", raw.max_latency.as_ref());
        let expect_status = match &raw.expect_status {
            None => StatusMatch::default(),
            Some(RawStatus::Code(code)) => StatusMatch::List(vec![status_code(*code)]),
            Some(RawStatus::List(codes)) => {
                StatusMatch::List(codes.iter().copied().map(status_code).collect())
            }
            Some(RawStatus::Text(text)) => StatusMatch::parse(text).unwrap_or_else(|problem| {
                problems.push(format!("expect_status: {problem}"));
                StatusMatch::default()
            }),
        };

        // Which kind-specific fields were given, so that those the kind does not take are
        // refused by name.
        let given: [(&str, bool); 14] = [
            ("url", raw.url.is_some()),
            ("method", raw.method.is_some()),
            ("headers", raw.headers.is_some()),
            ("body", raw.body.is_some()),
            ("expect_status", raw.expect_status.is_some()),
            ("max_latency", raw.max_latency.is_some()),
            ("body_contains", raw.body_contains.is_some()),
            ("address", raw.address.is_some()),
            ("agent", raw.agent.is_some()),
            ("argv", raw.argv.is_some()),
            ("expect_exit", raw.expect_exit.is_some()),
            ("stdout_contains", raw.stdout_contains.is_some()),
            ("query", raw.query.is_some()),
            ("min", raw.min.is_some() || raw.max.is_some()),
        ];
        let (takes, required): (&[&str], &[&str]) = match raw.kind {
            RawKind::Http => (
                &[
                    "url",
                    "method",
                    "headers",
                    "body",
                    "expect_status",
                    "max_latency",
                    "body_contains",
                ],
                &["url"],
            ),
            RawKind::Tcp => (&["address", "max_latency"], &["address"]),
            RawKind::Command => (
                &["agent", "argv", "expect_exit", "stdout_contains"],
                &["agent", "argv"],
            ),
            RawKind::Prometheus => (&["url", "query", "min"], &["url", "query"]),
        };
        for (field, present) in given {
            if present && !takes.contains(&field) {
                let field = match field {
                    "min" if raw.min.is_none() => "max",
                    other => other,
                };
                problems.push(format!("{kind_name} probes do not take {field}"));
            }
            if !present && required.contains(&field) {
                problems.push(format!("{kind_name} probes need {field}"));
            }
        }
        if !problems.is_empty() {
            return Err(ProbeSpecError {
                name: raw.name,
                problems,
            });
        }

        let kind = match raw.kind {
            RawKind::Http => ProbeKind::Http {
                url: raw.url.unwrap_or_default(),
                method: raw
                    .method
                    .map_or_else(|| "GET".to_string(), |m| m.to_ascii_uppercase()),
                headers: raw.headers.unwrap_or_default(),
                body: raw.body,
                expect_status,
                max_latency,
                body_contains: raw.body_contains,
            },
            RawKind::Tcp => ProbeKind::Tcp {
                address: raw.address.unwrap_or_default(),
                max_latency,
            },
            RawKind::Command => ProbeKind::Command {
                agent: raw.agent.unwrap_or_default(),
                argv: raw.argv.unwrap_or_default(),
                expect_exit: raw.expect_exit.unwrap_or(0),
                stdout_contains: raw.stdout_contains,
            },
            RawKind::Prometheus => ProbeKind::Prometheus {
                url: raw.url.unwrap_or_default(),
                query: raw.query.unwrap_or_default(),
                min: raw.min,
                max: raw.max,
            },
        };
        let spec = ProbeSpec {
            name: raw.name,
            kind,
            interval,
            timeout,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<ProbeSpec> for RawProbeSpec {
    fn from(spec: ProbeSpec) -> Self {
        let mut raw = RawProbeSpec {
            name: spec.name,
            kind: RawKind::Http,
            interval: Some(format_duration(spec.interval)),
            timeout: Some(format_duration(spec.timeout)),
            url: None,
            method: None,
            headers: None,
            body: None,
            expect_status: None,
            max_latency: None,
            body_contains: None,
            address: None,
            agent: None,
            argv: None,
            expect_exit: None,
            stdout_contains: None,
            query: None,
            min: None,
            max: None,
        };
        match spec.kind {
            ProbeKind::Http {
                url,
                method,
                headers,
                body,
                expect_status,
                max_latency,
                body_contains,
            } => {
                raw.url = Some(url);
                raw.method = Some(method);
                raw.headers = (!headers.is_empty()).then_some(headers);
                raw.body = body;
                raw.expect_status = Some(match expect_status {
                    range @ StatusMatch::Range { .. } => RawStatus::Text(range.to_string()),
                    StatusMatch::List(codes) => {
                        RawStatus::List(codes.into_iter().map(u64::from).collect())
                    }
                });
                raw.max_latency = max_latency.map(format_duration);
                raw.body_contains = body_contains;
            }
            ProbeKind::Tcp {
                address,
                max_latency,
            } => {
                raw.kind = RawKind::Tcp;
                raw.address = Some(address);
                raw.max_latency = max_latency.map(format_duration);
            }
            ProbeKind::Command {
                agent,
                argv,
                expect_exit,
                stdout_contains,
            } => {
                raw.kind = RawKind::Command;
                raw.agent = Some(agent);
                raw.argv = Some(argv);
                raw.expect_exit = Some(expect_exit);
                raw.stdout_contains = stdout_contains;
            }
            ProbeKind::Prometheus {
                url,
                query,
                min,
                max,
            } => {
                raw.kind = RawKind::Prometheus;
                raw.url = Some(url);
                raw.query = Some(query);
                raw.min = min;
                raw.max = max;
            }
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn http(
        url: &str,
        expect_status: StatusMatch,
        max_latency: Option<Duration>,
        body_contains: Option<&str>,
    ) -> ProbeKind {
        ProbeKind::Http {
            url: url.into(),
            method: "GET".into(),
            headers: BTreeMap::new(),
            body: None,
            expect_status,
            max_latency,
            body_contains: body_contains.map(Into::into),
        }
    }

    fn parse(yaml: &str) -> Result<ProbeSpec, String> {
        serde_saphyr::from_str::<ProbeSpec>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_every_kind_with_defaults_and_explicit_fields() {
        let cases: Vec<(&str, &str, ProbeSpec)> = vec![
            (
                "http defaults",
                "name: api\nkind: http\nurl: http://shop:8080/health\n",
                ProbeSpec::new("api", ProbeKind::http("http://shop:8080/health")),
            ),
            (
                "http everything",
                "name: api\nkind: http\nurl: https://shop/x\nmethod: post\n\
                 headers: { Accept: application/json }\nbody: '{}'\nexpect_status: [200, 204]\n\
                 max_latency: 250ms\nbody_contains: healthy\ninterval: 500ms\ntimeout: 1s\n",
                ProbeSpec {
                    name: "api".into(),
                    kind: ProbeKind::Http {
                        url: "https://shop/x".into(),
                        method: "POST".into(),
                        headers: BTreeMap::from([("Accept".into(), "application/json".into())]),
                        body: Some("{}".into()),
                        expect_status: StatusMatch::List(vec![200, 204]),
                        max_latency: Some(ms(250)),
                        body_contains: Some("healthy".into()),
                    },
                    interval: ms(500),
                    timeout: ms(1000),
                },
            ),
            (
                "status class",
                "name: a\nkind: http\nurl: http://h\nexpect_status: 2xx\n",
                ProbeSpec::new(
                    "a",
                    http(
                        "http://h",
                        StatusMatch::Range { min: 200, max: 299 },
                        None,
                        None,
                    ),
                ),
            ),
            (
                "status single code",
                "name: a\nkind: http\nurl: http://h\nexpect_status: 204\n",
                ProbeSpec::new(
                    "a",
                    http("http://h", StatusMatch::List(vec![204]), None, None),
                ),
            ),
            (
                "tcp",
                "name: db\nkind: tcp\naddress: \"[::1]:5432\"\nmax_latency: 50ms\n",
                ProbeSpec::new(
                    "db",
                    ProbeKind::Tcp {
                        address: "[::1]:5432".into(),
                        max_latency: Some(ms(50)),
                    },
                ),
            ),
            (
                "command",
                "name: q\nkind: command\nagent: agent-1\nargv: [rabbitmqctl, status]\n",
                ProbeSpec::new(
                    "q",
                    ProbeKind::Command {
                        agent: "agent-1".into(),
                        argv: vec!["rabbitmqctl".into(), "status".into()],
                        expect_exit: 0,
                        stdout_contains: None,
                    },
                ),
            ),
            (
                "prometheus",
                "name: e\nkind: prometheus\nurl: http://prom:9090\nquery: up\nmin: 1\nmax: 1.5\n",
                ProbeSpec::new(
                    "e",
                    ProbeKind::Prometheus {
                        url: "http://prom:9090".into(),
                        query: "up".into(),
                        min: Some(1.0),
                        max: Some(1.5),
                    },
                ),
            ),
        ];
        for (name, yaml, expected) in cases {
            let spec = parse(yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec, expected, "{name}");
            // Serializing and parsing again gives the same spec.
            let text = serde_saphyr::to_string(&spec).unwrap();
            assert_eq!(parse(&text).unwrap(), spec, "{name} round trip:\n{text}");
        }
    }

    #[test]
    fn refuses_bad_specs_with_every_problem() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "unknown field",
                "name: a\nkind: tcp\naddress: h:1\nbogus: 1\n",
                &["unknown field `bogus`"],
            ),
            (
                "unknown kind",
                "name: a\nkind: ping\n",
                &["unknown variant `ping`"],
            ),
            (
                "field of another kind, missing required",
                "name: a\nkind: tcp\nurl: http://x\n",
                &["tcp probes do not take url", "tcp probes need address"],
            ),
            (
                "max without min on tcp",
                "name: a\nkind: tcp\naddress: h:1\nmax: 3\n",
                &["tcp probes do not take max"],
            ),
            (
                "bad durations",
                "name: a\nkind: tcp\naddress: h:1\ninterval: 3\ntimeout: 1500us\n",
                &[
                    "interval: invalid duration \"3\"",
                    "timeout: invalid duration \"1500us\"",
                ],
            ),
            (
                "interval and timeout bounds",
                "name: a\nkind: tcp\naddress: h:1\ninterval: 10ms\ntimeout: 2m\n",
                &[
                    "interval must be between 100ms and 1h",
                    "timeout must be between 1ms and 1m",
                ],
            ),
            (
                "http problems",
                "name: 'bad name'\nkind: http\nurl: ftp://x\nmethod: FETCH\n\
                 headers: { 'Bad Header': x }\nexpect_status: [99, 200]\nbody_contains: ''\n\
                 max_latency: 0s\n",
                &[
                    "name must be 1 to 64 characters",
                    "url must start with http:// or https://",
                    "method \"FETCH\" is not one of GET, HEAD",
                    "header name \"Bad Header\" is not a valid HTTP token",
                    "expect_status 99 is not a status code",
                    "max_latency must be more than 0s",
                    "body_contains must not be empty",
                ],
            ),
            (
                "status range backwards",
                "name: a\nkind: http\nurl: http://h\nexpect_status: 399-200\n",
                &["expect_status 399-200 is not a range of status codes within 100-599"],
            ),
            (
                "status garbage",
                "name: a\nkind: tcp\nurl: http://h\nexpect_status: 7xx\n",
                &[
                    "expect_status: invalid status range \"7xx\"",
                    "tcp probes do not take url",
                ],
            ),
            (
                "url without host",
                "name: a\nkind: http\nurl: http:///x\n",
                &["url \"http:///x\" is not a valid URL"],
            ),
            (
                "tcp address",
                "name: a\nkind: tcp\naddress: localhost\n",
                &["address \"localhost\" must be host:port"],
            ),
            (
                "tcp port zero",
                "name: a\nkind: tcp\naddress: h:0\n",
                &["address \"h:0\" must be host:port"],
            ),
            (
                "command",
                "name: a\nkind: command\nagent: ' '\nargv: []\n",
                &["agent must not be empty", "argv must name a program"],
            ),
            (
                "prometheus bounds",
                "name: a\nkind: prometheus\nurl: http://p\nquery: up\nmin: 2\nmax: 1\n",
                &["min 2 is greater than max 1"],
            ),
            (
                "prometheus missing query",
                "name: a\nkind: prometheus\nurl: http://p\n",
                &["prometheus probes need query"],
            ),
        ];
        for (name, yaml, expected) in cases {
            let err = parse(yaml).expect_err(name);
            for fragment in *expected {
                assert!(err.contains(fragment), "{name}: {err:?} lacks {fragment:?}");
            }
        }
    }

    #[test]
    fn status_match_table() {
        let cases: &[(StatusMatch, u16, bool)] = &[
            (StatusMatch::default(), 200, true),
            (StatusMatch::default(), 399, true),
            (StatusMatch::default(), 199, false),
            (StatusMatch::default(), 400, false),
            (StatusMatch::List(vec![200, 204]), 204, true),
            (StatusMatch::List(vec![200, 204]), 201, false),
        ];
        for (matcher, status, expected) in cases {
            assert_eq!(matcher.contains(*status), *expected, "{matcher} {status}");
        }
        assert_eq!(StatusMatch::default().to_string(), "200-399");
        assert_eq!(StatusMatch::List(vec![200, 204]).to_string(), "[200, 204]");
    }

    fn obs(latency_ms: Option<u64>, outcome: Outcome) -> Observation {
        Observation {
            at_ms: 1000,
            latency: latency_ms.map(ms),
            outcome,
        }
    }

    fn http_ok(status: u16, body: &str) -> Outcome {
        Outcome::Http {
            status,
            body: body.into(),
        }
    }

    #[test]
    fn evaluation_table() {
        let strict_http = http(
            "http://h",
            StatusMatch::default(),
            Some(ms(100)),
            Some("healthy"),
        );
        let tcp = ProbeKind::Tcp {
            address: "h:1".into(),
            max_latency: Some(ms(50)),
        };
        let command = ProbeKind::Command {
            agent: "a".into(),
            argv: vec!["true".into()],
            expect_exit: 0,
            stdout_contains: Some("running".into()),
        };
        let prom = ProbeKind::Prometheus {
            url: "http://p".into(),
            query: "up".into(),
            min: Some(1.0),
            max: Some(10.0),
        };
        let plain_http = ProbeKind::http("http://h");
        let unbounded_prom = ProbeKind::prometheus("http://p", "up");
        // (name, probe, observation, ok, value, detail)
        type Case<'a> = (
            &'a str,
            &'a ProbeKind,
            Observation,
            bool,
            Option<f64>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "http ok",
                &strict_http,
                obs(Some(12), http_ok(200, "all healthy")),
                true,
                None,
                "HTTP 200 in 12ms",
            ),
            (
                "http latency exactly at the limit is ok",
                &strict_http,
                obs(Some(100), http_ok(204, "healthy")),
                true,
                None,
                "HTTP 204 in 100ms",
            ),
            (
                "http every failure at once",
                &strict_http,
                obs(Some(101), http_ok(500, "boom")),
                false,
                None,
                "HTTP 500 in 101ms: status 500 not in 200-399; slower than max_latency 100ms; \
                 body does not contain \"healthy\"",
            ),
            (
                "http sub-millisecond latency",
                &plain_http,
                Observation {
                    at_ms: 1000,
                    latency: Some(Duration::from_micros(450)),
                    outcome: http_ok(302, ""),
                },
                true,
                None,
                "HTTP 302 in 0.5ms",
            ),
            (
                "http latency not measured but limited",
                &strict_http,
                obs(None, http_ok(200, "healthy")),
                false,
                None,
                "HTTP 200: latency not measured",
            ),
            (
                "timed out",
                &strict_http,
                obs(Some(2000), Outcome::TimedOut { after: ms(2000) }),
                false,
                None,
                "timed out after 2s",
            ),
            (
                "transport failure",
                &tcp,
                obs(Some(1), Outcome::Failed("connection refused".into())),
                false,
                None,
                "connection refused",
            ),
            (
                "tcp ok",
                &tcp,
                obs(Some(3), Outcome::Connected),
                true,
                None,
                "connected in 3ms",
            ),
            (
                "tcp slow",
                &tcp,
                obs(Some(51), Outcome::Connected),
                false,
                None,
                "connected in 51ms: slower than max_latency 50ms",
            ),
            (
                "command ok",
                &command,
                obs(
                    Some(5),
                    Outcome::Exited {
                        code: 0,
                        stdout: "is running".into(),
                    },
                ),
                true,
                None,
                "exit 0 in 5ms",
            ),
            (
                "command bad exit and output",
                &command,
                obs(
                    Some(5),
                    Outcome::Exited {
                        code: 2,
                        stdout: "stopped".into(),
                    },
                ),
                false,
                None,
                "exit 2 in 5ms: exit code 2, expected 0; stdout does not contain \"running\"",
            ),
            (
                "prometheus in range (bounds inclusive)",
                &prom,
                obs(Some(4), Outcome::Value(10.0)),
                true,
                Some(10.0),
                "value 10 in 4ms",
            ),
            (
                "prometheus below",
                &prom,
                obs(Some(4), Outcome::Value(0.5)),
                false,
                Some(0.5),
                "value 0.5 in 4ms: below min 1",
            ),
            (
                "prometheus above",
                &prom,
                obs(Some(4), Outcome::Value(11.0)),
                false,
                Some(11.0),
                "value 11 in 4ms: above max 10",
            ),
            (
                "prometheus without bounds accepts anything numeric",
                &unbounded_prom,
                obs(Some(4), Outcome::Value(-3.0)),
                true,
                Some(-3.0),
                "value -3 in 4ms",
            ),
            (
                "kind mismatch",
                &tcp,
                obs(Some(4), http_ok(200, "")),
                false,
                None,
                "internal error: an http observation for a tcp probe",
            ),
        ];
        for (name, kind, observation, ok, value, detail) in cases {
            let sample = evaluate(kind, &observation);
            assert_eq!(sample.ok, ok, "{name}: {}", sample.detail);
            assert_eq!(sample.value, value, "{name}");
            assert_eq!(sample.detail, detail, "{name}");
            assert_eq!(sample.at_ms, observation.at_ms, "{name}");
            assert_eq!(sample.latency, observation.latency, "{name}");
        }
        // NaN compares unequal to itself, so outside the table.
        let nan = evaluate(&prom, &obs(Some(4), Outcome::Value(f64::NAN)));
        assert!(!nan.ok);
        assert_eq!(nan.detail, "value NaN in 4ms: value is NaN");
    }

    #[test]
    fn nearest_rank_table() {
        let one_to = |n: u64| (1..=n).collect::<Vec<u64>>();
        let cases: Vec<(&str, Vec<u64>, u32, Option<u64>)> = vec![
            ("empty", vec![], 50, None),
            ("single p50", vec![7], 50, Some(7)),
            ("single p99", vec![7], 99, Some(7)),
            ("three p50", vec![10, 20, 30], 50, Some(20)),
            ("three p95", vec![10, 20, 30], 95, Some(30)),
            ("ten p50", one_to(10), 50, Some(5)),
            ("ten p95", one_to(10), 95, Some(10)),
            ("ten p99", one_to(10), 99, Some(10)),
            ("twenty p95", one_to(20), 95, Some(19)),
            ("twenty p99", one_to(20), 99, Some(20)),
            ("hundred p50", one_to(100), 50, Some(50)),
            ("hundred p95", one_to(100), 95, Some(95)),
            ("hundred p99", one_to(100), 99, Some(99)),
            ("hundred p100", one_to(100), 100, Some(100)),
            ("p0 clamps to p1", one_to(100), 0, Some(1)),
            ("p1000 clamps to p100", one_to(100), 1000, Some(100)),
        ];
        for (name, values, percent, expected) in cases {
            assert_eq!(nearest_rank(&values, percent), expected, "{name}");
        }
    }

    fn sample(at_ms: i64, ok: bool, latency_ms: Option<u64>, value: Option<f64>) -> ProbeSample {
        ProbeSample {
            at_ms,
            ok,
            latency: latency_ms.map(ms),
            value,
            detail: if ok {
                "fine".into()
            } else {
                format!("failed at {at_ms}")
            },
        }
    }

    #[test]
    fn summary_table() {
        // Ten samples one second apart, latencies out of order, two failures.
        let latencies = [30, 10, 50, 20, 40, 100, 60, 90, 70, 80];
        let mixed: Vec<ProbeSample> = latencies
            .iter()
            .enumerate()
            .map(|(i, l)| sample(i as i64 * 1000, i != 3 && i != 7, Some(*l), None))
            .collect();
        let values: Vec<ProbeSample> = [Some(2.0), None, Some(f64::NAN), Some(4.0), Some(9.0)]
            .into_iter()
            .enumerate()
            .map(|(i, v)| sample(i as i64 * 1000, true, None, v))
            .collect();
        let all_errors: Vec<ProbeSample> = (0..4)
            .map(|i| sample(i * 500, false, Some(2000), None))
            .collect();

        let cases: Vec<(&str, &[ProbeSample], Window, ProbeStats)> = vec![
            (
                "empty window",
                &mixed,
                Window::new(50_000, 60_000),
                ProbeStats {
                    throughput_per_sec: Some(0.0),
                    ..ProbeStats::default()
                },
            ),
            (
                "zero-length window has no throughput",
                &[],
                Window::new(5, 5),
                ProbeStats::default(),
            ),
            (
                "single sample",
                &mixed,
                Window::new(0, 1000),
                ProbeStats {
                    count: 1,
                    errors: 0,
                    error_rate: Some(0.0),
                    latency_p50: Some(ms(30)),
                    latency_p95: Some(ms(30)),
                    latency_p99: Some(ms(30)),
                    throughput_per_sec: Some(1.0),
                    ..ProbeStats::default()
                },
            ),
            (
                "all ten",
                &mixed,
                Window::new(0, 10_000),
                ProbeStats {
                    count: 10,
                    errors: 2,
                    error_rate: Some(0.2),
                    latency_p50: Some(ms(50)),
                    latency_p95: Some(ms(100)),
                    latency_p99: Some(ms(100)),
                    throughput_per_sec: Some(0.8),
                    ..ProbeStats::default()
                },
            ),
            (
                "window end is excluded",
                &mixed,
                Window::new(2000, 4000),
                ProbeStats {
                    count: 2,
                    errors: 1,
                    error_rate: Some(0.5),
                    latency_p50: Some(ms(20)),
                    latency_p95: Some(ms(50)),
                    latency_p99: Some(ms(50)),
                    throughput_per_sec: Some(0.5),
                    ..ProbeStats::default()
                },
            ),
            (
                "all errors",
                &all_errors,
                Window::new(0, 2000),
                ProbeStats {
                    count: 4,
                    errors: 4,
                    error_rate: Some(1.0),
                    latency_p50: Some(ms(2000)),
                    latency_p95: Some(ms(2000)),
                    latency_p99: Some(ms(2000)),
                    throughput_per_sec: Some(0.0),
                    ..ProbeStats::default()
                },
            ),
            (
                "values skip None and NaN",
                &values,
                Window::new(0, 5000),
                ProbeStats {
                    count: 5,
                    errors: 0,
                    error_rate: Some(0.0),
                    throughput_per_sec: Some(1.0),
                    value_min: Some(2.0),
                    value_max: Some(9.0),
                    value_mean: Some(5.0),
                    ..ProbeStats::default()
                },
            ),
        ];
        for (name, samples, window, expected) in cases {
            assert_eq!(summarize(samples, window), expected, "{name}");
        }
    }

    #[test]
    fn steady_table() {
        let seq = |oks: &[bool]| -> Vec<ProbeSample> {
            oks.iter()
                .enumerate()
                .map(|(i, ok)| sample(i as i64 * 1000, *ok, Some(1), None))
                .collect()
        };
        let tolerant = SteadyRule::new(5, 3, 0.2).unwrap();
        let cases: Vec<(&str, Vec<ProbeSample>, SteadyRule, Steadiness)> =
            vec![
            (
                "no samples",
                vec![],
                SteadyRule::all_ok(3),
                Steadiness::Undecided("0 of 3 samples needed".into()),
            ),
            (
                "too few",
                seq(&[true, true]),
                SteadyRule::all_ok(3),
                Steadiness::Undecided("2 of 3 samples needed".into()),
            ),
            ("all ok", seq(&[true, true, true]), SteadyRule::all_ok(3), Steadiness::Steady),
            (
                "old failure outside the last n",
                seq(&[false, true, true, true]),
                SteadyRule::all_ok(3),
                Steadiness::Steady,
            ),
            (
                "one recent failure",
                seq(&[true, true, false, true]),
                SteadyRule::all_ok(3),
                Steadiness::NotSteady(
                    "1 of the last 3 samples failed (33.3% > 0% allowed); latest: failed at 2000"
                        .into(),
                ),
            ),
            (
                "within tolerance",
                seq(&[true, false, true, true, true]),
                tolerant,
                Steadiness::Steady,
            ),
            (
                "judged on fewer than last once min_samples exist",
                seq(&[true, false, true]),
                tolerant,
                Steadiness::NotSteady(
                    "1 of the last 3 samples failed (33.3% > 20% allowed); latest: failed at 1000"
                        .into(),
                ),
            ),
            (
                "all errors",
                seq(&[false, false, false, false, false]),
                tolerant,
                Steadiness::NotSteady(
                    "5 of the last 5 samples failed (100% > 20% allowed); latest: failed at 4000"
                        .into(),
                ),
            ),
            (
                "single sample rule",
                seq(&[false]),
                SteadyRule::all_ok(0),
                Steadiness::NotSteady(
                    "1 of the last 1 samples failed (100% > 0% allowed); latest: failed at 0"
                        .into(),
                ),
            ),
        ];
        for (name, samples, rule, expected) in cases {
            assert_eq!(steady(&samples, &rule), expected, "{name}");
        }
    }

    #[test]
    fn steady_rule_bounds() {
        let cases: &[(usize, usize, f64, Option<&str>)] = &[
            (5, 3, 0.2, None),
            (1, 1, 0.0, None),
            (1, 1, 1.0, None),
            (0, 0, 0.0, Some("last must be at least 1")),
            (
                3,
                0,
                0.0,
                Some("min_samples must be between 1 and last (3)"),
            ),
            (
                3,
                4,
                0.0,
                Some("min_samples must be between 1 and last (3)"),
            ),
            (3, 3, 1.5, Some("max_error_rate must be between 0 and 1")),
            (
                3,
                3,
                f64::NAN,
                Some("max_error_rate must be between 0 and 1"),
            ),
        ];
        for (last, min, rate, expected) in cases {
            let got = SteadyRule::new(*last, *min, *rate)
                .err()
                .map(|e| e.to_string());
            let expected = expected.map(|e| format!("invalid steady-state rule: {e}"));
            assert_eq!(got, expected, "{last} {min} {rate}");
        }
    }
}
