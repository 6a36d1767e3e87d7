//! Conditions on a run's kernel telemetry: stop conditions and stage `when` triggers that
//! watch what the agents' eBPF programs (or their /proc and cgroup fallbacks) count for the
//! run's targets, rather than what a probe sees from outside.
//!
//! ```yaml
//! stop_conditions:
//!   - { telemetry: "tcp_retransmits_per_s{target=db} > 50", window: 5s }
//! stages:
//!   - name: second-wave
//!     when:                                 # start once the API's run queue is backing up
//!       telemetry: "runq_latency_p95{target=api, agent=host-2} > 5ms"
//!       window: 3s
//!       timeout: 2m
//!     faults: [...]
//! ```
//!
//! An expression is `METRIC[{LABELS}] > THRESHOLD` (or `<`). Labels are optional and narrow the
//! telemetry counted: `target=NAME` (a target of one of the plan's faults: the container name,
//! cgroup path, pid or command as the fault names it) and `agent=NAME` (one of the plan's
//! agents). Without labels, every target of the run on every agent counts. Metrics:
//!
//! | metric | unit | what |
//! |---|---|---|
//! | `tcp_retransmits_per_s` | per second | TCP retransmits (SYN retransmits included) |
//! | `tcp_connect_failures_per_s` | per second | failed `connect()`s, any errno |
//! | `tcp_resets_per_s` | per second | resets sent and received |
//! | `runq_latency_p95`, `runq_latency_p99` | duration (`500us`, `5ms`) | run-queue delay |
//! | `oom_kills` | count in the window | OOM kills in the target's cgroup |
//! | `process_crashes` | count in the window | exits by a signal or with a non-zero code |
//!
//! Rates are the counts of the aggregation intervals that ended within the window, divided by
//! the time those intervals cover. A window that no interval ended in has nothing to measure
//! and never holds; so does a run-queue percentile with no samples (fallback mode has no
//! histogram). The agents send one interval per second, so a window shorter than about 2s may
//! often be empty.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use serde_saphyr::{Location, Spanned};

use super::condition::{Comparison, ConditionCheck};
use super::steady::{MAX_WINDOW, MIN_WINDOW};
use super::{Checker, child};
use crate::duration::format_duration;
use crate::fault::TargetSelector;

/// What a telemetry condition measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TelemetryMetric {
    TcpRetransmitsPerS,
    TcpConnectFailuresPerS,
    TcpResetsPerS,
    RunqLatencyP95,
    RunqLatencyP99,
    OomKills,
    ProcessCrashes,
}

impl TelemetryMetric {
    /// Every metric as written in a plan.
    pub const NAMES: &'static [&'static str] = &[
        "tcp_retransmits_per_s",
        "tcp_connect_failures_per_s",
        "tcp_resets_per_s",
        "runq_latency_p95",
        "runq_latency_p99",
        "oom_kills",
        "process_crashes",
    ];

    const ALL: [TelemetryMetric; 7] = [
        Self::TcpRetransmitsPerS,
        Self::TcpConnectFailuresPerS,
        Self::TcpResetsPerS,
        Self::RunqLatencyP95,
        Self::RunqLatencyP99,
        Self::OomKills,
        Self::ProcessCrashes,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|metric| metric.name() == name)
    }

    /// As written in a plan.
    pub fn name(self) -> &'static str {
        match self {
            Self::TcpRetransmitsPerS => "tcp_retransmits_per_s",
            Self::TcpConnectFailuresPerS => "tcp_connect_failures_per_s",
            Self::TcpResetsPerS => "tcp_resets_per_s",
            Self::RunqLatencyP95 => "runq_latency_p95",
            Self::RunqLatencyP99 => "runq_latency_p99",
            Self::OomKills => "oom_kills",
            Self::ProcessCrashes => "process_crashes",
        }
    }

    fn is_latency(self) -> bool {
        matches!(self, Self::RunqLatencyP95 | Self::RunqLatencyP99)
    }

    fn is_rate(self) -> bool {
        matches!(
            self,
            Self::TcpRetransmitsPerS | Self::TcpConnectFailuresPerS | Self::TcpResetsPerS
        )
    }

    /// A figure of this metric for a person: `52.5/s`, `6.2ms`, `1`.
    pub fn format(self, figure: f64) -> String {
        if self.is_latency() {
            format_micros(figure)
        } else if self.is_rate() {
            format!("{}/s", round2(figure))
        } else {
            format!("{}", round2(figure))
        }
    }

    /// Reads a threshold: a duration for a latency (kept in microseconds), else a number.
    fn threshold(self, text: &str) -> Result<f64, String> {
        let text = text.trim();
        if self.is_latency() {
            return parse_micros(text).ok_or_else(|| {
                format!(
                    "the threshold of {} is a duration such as 500us, 5ms or 1s, got {text:?}",
                    self.name()
                )
            });
        }
        match text.parse::<f64>() {
            Ok(number) if number.is_finite() && number >= 0.0 => Ok(number),
            _ => Err(format!(
                "the threshold of {} is a number of at least 0 such as 50 or 2.5, got {text:?}",
                self.name()
            )),
        }
    }
}

impl fmt::Display for TelemetryMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A stop condition or trigger on telemetry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryCondition {
    pub metric: TelemetryMetric,
    /// Only telemetry of this target (see [`TelemetryPoint::is_target`]).
    pub target: Option<String>,
    /// Only telemetry from this agent.
    pub agent: Option<String>,
    pub comparison: Comparison,
    /// Per second for rates, microseconds for latencies, a count otherwise.
    pub threshold: f64,
    pub window: Duration,
}

impl TelemetryCondition {
    /// `tcp_retransmits_per_s{target=db} > 50/s over the last 5s`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {} over the last {}",
            self.selector(),
            match self.comparison {
                Comparison::Above => ">",
                Comparison::Below => "<",
            },
            self.metric.format(self.threshold),
            format_duration(self.window)
        )
    }

    /// `tcp_retransmits_per_s{target=db,agent=host-2}`, or the bare metric.
    pub fn selector(&self) -> String {
        let labels: Vec<String> = [("target", &self.target), ("agent", &self.agent)]
            .into_iter()
            .filter_map(|(key, value)| value.as_ref().map(|value| format!("{key}={value}")))
            .collect();
        if labels.is_empty() {
            self.metric.name().to_string()
        } else {
            format!("{}{{{}}}", self.metric.name(), labels.join(","))
        }
    }
}

/// An expression as parsed, before the window is added and the labels are checked against
/// the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryExpression {
    pub metric: TelemetryMetric,
    pub target: Option<String>,
    pub agent: Option<String>,
    pub comparison: Comparison,
    pub threshold: f64,
}

impl TelemetryExpression {
    pub fn with_window(self, window: Duration) -> TelemetryCondition {
        TelemetryCondition {
            metric: self.metric,
            target: self.target,
            agent: self.agent,
            comparison: self.comparison,
            threshold: self.threshold,
            window,
        }
    }
}

/// Parses `METRIC[{target=NAME,agent=NAME}] (>|<) THRESHOLD`; the message says what is wrong.
pub fn parse_expression(text: &str) -> Result<TelemetryExpression, String> {
    const SHAPE: &str = "a telemetry condition reads METRIC{target=NAME} > THRESHOLD, e.g. \
                         tcp_retransmits_per_s{target=db} > 50";
    let text = text.trim();
    let Some(op_at) = text.find(['>', '<']) else {
        return Err(format!("no comparison (> or <) in {text:?}; {SHAPE}"));
    };
    let comparison = if text[op_at..].starts_with('>') {
        Comparison::Above
    } else {
        Comparison::Below
    };
    let left = text[..op_at].trim();
    let right = text[op_at + 1..].trim();
    if right.starts_with('=') {
        return Err(format!(
            "use > or <, not >= or <=, in {text:?}: a condition holds strictly above or below"
        ));
    }
    let (name, labels) = match left.find('{') {
        None => (left, None),
        Some(open) => {
            let Some(inner) = left[open + 1..].strip_suffix('}') else {
                return Err(format!("unclosed or misplaced {{ in {left:?}; {SHAPE}"));
            };
            (left[..open].trim(), Some(inner))
        }
    };
    let metric = TelemetryMetric::parse(name).ok_or_else(|| {
        format!(
            "unknown telemetry metric {name:?}; expected one of {}",
            TelemetryMetric::NAMES.join(", ")
        )
    })?;
    let mut target = None;
    let mut agent = None;
    for label in labels
        .into_iter()
        .flat_map(|inner| inner.split(','))
        .map(str::trim)
        .filter(|label| !label.is_empty())
    {
        let Some((key, value)) = label.split_once('=') else {
            return Err(format!("label {label:?} is not KEY=VALUE; {SHAPE}"));
        };
        let value = value.trim().trim_matches('"').trim();
        if value.is_empty() {
            return Err(format!("label {label:?} has an empty value"));
        }
        let slot = match key.trim() {
            "target" => &mut target,
            "agent" => &mut agent,
            other => {
                return Err(format!(
                    "unknown label {other:?}; telemetry conditions take target= and agent="
                ));
            }
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(format!("label {:?} is given twice", key.trim()));
        }
    }
    if right.is_empty() {
        return Err(format!(
            "no threshold after the comparison in {text:?}; {SHAPE}"
        ));
    }
    let threshold = metric.threshold(right)?;
    Ok(TelemetryExpression {
        metric,
        target,
        agent,
        comparison,
        threshold,
    })
}

/// How a `target=` label names a fault's target: the container name, id, label or pattern, the
/// cgroup path, the pid, or the command name.
pub fn target_label(selector: &TargetSelector) -> String {
    match selector {
        TargetSelector::Container(text)
        | TargetSelector::ContainerId(text)
        | TargetSelector::Label(text)
        | TargetSelector::Cgroup(text)
        | TargetSelector::ProcessName(text) => text.clone(),
        TargetSelector::ContainerRegex(re) => format!("re:{re}"),
        TargetSelector::Pid(pid) => pid.to_string(),
    }
}

impl Checker {
    /// `telemetry: EXPRESSION` and its `window` at `path`. `probe_keys` are the fields of the
    /// probe form of the same condition (`owner`, e.g. "a probe's `when`"): a telemetry
    /// condition carries its metric and threshold in its expression, so they must be absent.
    /// Labels are checked against the plan's faults later ([`Checker::telemetry_labels`]).
    pub(super) fn telemetry_condition(
        &mut self,
        expression: &Spanned<String>,
        window: &Option<Spanned<String>>,
        probe_keys: &[(&str, &Option<Spanned<String>>)],
        at: &Location,
        path: &str,
        owner: &str,
    ) -> Option<TelemetryCondition> {
        let mut ok = true;
        for (key, value) in probe_keys {
            if let Some(value) = value {
                let message = format!(
                    "`{key}` belongs to {owner}; a `telemetry` condition carries its metric \
                     and threshold in its expression"
                );
                self.report(&value.referenced, &child(path, key), message);
                ok = false;
            }
        }
        let parsed = self.parse_at(expression, &child(path, "telemetry"), parse_expression);
        let window = self.condition_window(window, at, path);
        let condition = parsed?.with_window(window?);
        ok.then_some(condition)
    }

    /// A condition's required `window` at `path`, 250ms..=10m.
    pub(super) fn condition_window(
        &mut self,
        window: &Option<Spanned<String>>,
        at: &Location,
        path: &str,
    ) -> Option<Duration> {
        self.required(window, at, path, "window")
            .and_then(|window| {
                self.duration(
                    window,
                    &child(path, "window"),
                    (MIN_WINDOW, MAX_WINDOW),
                    "between 250ms and 10m",
                )
            })
    }
}

/// One target's telemetry over one aggregation interval from one agent, reduced to what
/// conditions measure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryPoint {
    pub agent: String,
    /// How the agent names the target (container name, cgroup path, `comm (pid N)`).
    pub target: String,
    /// The plan's selector as the agent echoes it, e.g. `container db`.
    pub selector: String,
    /// The interval, `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    pub retransmits: u64,
    pub connect_failures: u64,
    pub resets: u64,
    /// Run-queue delay, log2 buckets of microseconds (bucket `k`: `[2^k, 2^(k+1))`, bucket 0
    /// below 2us).
    pub runq_buckets: Vec<u64>,
    /// The largest run-queue delay seen, in nanoseconds; 0 when unknown.
    pub runq_max_ns: u64,
    pub oom_kills: u64,
    pub crashes: u64,
}

impl TelemetryPoint {
    /// Whether a `target=` label names this point's target: its name, or the value of the
    /// selector the plan wrote (`db` for `container db`, `re:db-.*` for a pattern).
    pub fn is_target(&self, label: &str) -> bool {
        self.target == label
            || self.selector == label
            || self
                .selector
                .strip_suffix(label)
                .is_some_and(|head| head.ends_with(' '))
    }

    fn selected_by(&self, condition: &TelemetryCondition) -> bool {
        condition
            .target
            .as_deref()
            .is_none_or(|label| self.is_target(label))
            && condition
                .agent
                .as_deref()
                .is_none_or(|agent| self.agent == agent)
    }
}

/// Judges `condition` at `now_ms` on `points`: those selected by its labels whose interval
/// ended within the last `window` (up to and including `now_ms`).
pub fn check_telemetry(
    points: &[TelemetryPoint],
    condition: &TelemetryCondition,
    now_ms: i64,
) -> ConditionCheck {
    let window_ms = i64::try_from(condition.window.as_millis()).unwrap_or(i64::MAX);
    let since = now_ms.saturating_sub(window_ms);
    let selected: Vec<&TelemetryPoint> = points
        .iter()
        .filter(|point| {
            point.to_ms > since && point.to_ms <= now_ms && point.selected_by(condition)
        })
        .collect();
    let observed = measure(condition.metric, &selected);
    let over = format!(
        "{} interval(s) over the last {}",
        selected.len(),
        format_duration(condition.window)
    );
    let summary = match observed {
        Some(figure) => format!(
            "{} {} ({over})",
            condition.selector(),
            condition.metric.format(figure)
        ),
        None => format!("{}: nothing to measure ({over})", condition.selector()),
    };
    let held = observed.is_some_and(|figure| match condition.comparison {
        Comparison::Above => figure > condition.threshold,
        Comparison::Below => figure < condition.threshold,
    });
    ConditionCheck {
        held,
        observed,
        samples: selected.len(),
        summary,
    }
}

/// Whether a telemetry stop condition fires at `now_ms`; the reason names the selector, the
/// figure seen and the threshold.
pub fn telemetry_stop_fired(
    points: &[TelemetryPoint],
    condition: &TelemetryCondition,
    now_ms: i64,
) -> Option<String> {
    let check = check_telemetry(points, condition, now_ms);
    let figure = check.observed?;
    check.held.then(|| {
        format!(
            "stop condition on telemetry: {} {} {} {} over the last {} ({} interval(s))",
            condition.selector(),
            condition.metric.format(figure),
            match condition.comparison {
                Comparison::Above => ">",
                Comparison::Below => "<",
            },
            condition.metric.format(condition.threshold),
            format_duration(condition.window),
            check.samples
        )
    })
}

/// The metric's figure over `points`; `None` when there is nothing to measure.
fn measure(metric: TelemetryMetric, points: &[&TelemetryPoint]) -> Option<f64> {
    if points.is_empty() {
        return None;
    }
    let total =
        |count: fn(&TelemetryPoint) -> u64| -> u64 { points.iter().map(|p| count(p)).sum() };
    // Intervals of several targets and agents cover the same time: the span is the union's
    // extent, so that the rate is the sum of their rates.
    let span_s = || {
        let from = points.iter().map(|p| p.from_ms).min().unwrap_or(0);
        let to = points.iter().map(|p| p.to_ms).max().unwrap_or(0);
        ((to - from).max(1)) as f64 / 1000.0
    };
    match metric {
        TelemetryMetric::TcpRetransmitsPerS => Some(total(|p| p.retransmits) as f64 / span_s()),
        TelemetryMetric::TcpConnectFailuresPerS => {
            Some(total(|p| p.connect_failures) as f64 / span_s())
        }
        TelemetryMetric::TcpResetsPerS => Some(total(|p| p.resets) as f64 / span_s()),
        TelemetryMetric::OomKills => Some(total(|p| p.oom_kills) as f64),
        TelemetryMetric::ProcessCrashes => Some(total(|p| p.crashes) as f64),
        TelemetryMetric::RunqLatencyP95 | TelemetryMetric::RunqLatencyP99 => {
            let q = if metric == TelemetryMetric::RunqLatencyP95 {
                0.95
            } else {
                0.99
            };
            let mut buckets: Vec<u64> = Vec::new();
            for point in points {
                if buckets.len() < point.runq_buckets.len() {
                    buckets.resize(point.runq_buckets.len(), 0);
                }
                for (into, n) in buckets.iter_mut().zip(&point.runq_buckets) {
                    *into += n;
                }
            }
            let max_ns = points.iter().map(|p| p.runq_max_ns).max().unwrap_or(0);
            log2_quantile_us(&buckets, q, max_ns)
        }
    }
}

/// The `q`-quantile, in microseconds, of a log2 histogram of microseconds (bucket `k` holds
/// `[2^k, 2^(k+1))`, bucket 0 everything below 2us), interpolated inside its bucket and never
/// above `max_ns` when that is known (non-zero). `None` without samples.
pub fn log2_quantile_us(buckets: &[u64], q: f64, max_ns: u64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (k, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (below + n) as f64 >= rank {
            let lo = if k == 0 {
                0.0
            } else {
                (1u64 << k.min(62)) as f64
            };
            let hi = (1u64 << (k + 1).min(63)) as f64;
            let fraction = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            let us = lo + (hi - lo) * fraction;
            return Some(if max_ns > 0 {
                us.min(max_ns as f64 / 1000.0)
            } else {
                us
            });
        }
        below += n;
    }
    Some(max_ns as f64 / 1000.0)
}

/// The symbolic name of an errno as the telemetry reports it (0: the application closed the
/// socket before the handshake completed; -1: an errno the programs do not single out).
pub fn errno_name(errno: i32) -> String {
    match errno {
        0 => "closed-by-application".into(),
        -1 => "other".into(),
        1 => "EPERM".into(),
        32 => "EPIPE".into(),
        101 => "ENETUNREACH".into(),
        104 => "ECONNRESET".into(),
        110 => "ETIMEDOUT".into(),
        111 => "ECONNREFUSED".into(),
        113 => "EHOSTUNREACH".into(),
        other => format!("E{other}"),
    }
}

fn round2(figure: f64) -> f64 {
    (figure * 100.0).round() / 100.0
}

/// `750us`, `6.2ms`, `1.5s`.
fn format_micros(us: f64) -> String {
    if us < 1000.0 {
        format!("{}us", us.round())
    } else if us < 1_000_000.0 {
        format!("{}ms", (us / 100.0).round() / 10.0)
    } else {
        format!("{}s", (us / 100_000.0).round() / 10.0)
    }
}

/// `500us`, `500µs`, `5ms`, `1.5ms`, `2s` in microseconds.
fn parse_micros(text: &str) -> Option<f64> {
    let (number, scale) = [("us", 1.0), ("µs", 1.0), ("ms", 1000.0), ("s", 1_000_000.0)]
        .into_iter()
        .find_map(|(unit, scale)| text.strip_suffix(unit).map(|number| (number, scale)))?;
    let number: f64 = number.trim().parse().ok()?;
    (number.is_finite() && number >= 0.0).then_some(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(agent: &str, target: &str, from_ms: i64, retransmits: u64) -> TelemetryPoint {
        TelemetryPoint {
            agent: agent.into(),
            target: target.into(),
            selector: format!("container {target}"),
            from_ms,
            to_ms: from_ms + 1000,
            retransmits,
            ..TelemetryPoint::default()
        }
    }

    fn condition(text: &str, window_s: u64) -> TelemetryCondition {
        parse_expression(text)
            .unwrap()
            .with_window(Duration::from_secs(window_s))
    }

    #[test]
    fn expressions_parse_into_metric_labels_and_threshold() {
        // (expression, metric, target, agent, comparison, threshold)
        type Case = (
            &'static str,
            TelemetryMetric,
            Option<&'static str>,
            Option<&'static str>,
            Comparison,
            f64,
        );
        let cases: &[Case] = &[
            (
                "tcp_retransmits_per_s{target=db} > 50",
                TelemetryMetric::TcpRetransmitsPerS,
                Some("db"),
                None,
                Comparison::Above,
                50.0,
            ),
            (
                " runq_latency_p95{ agent=host-2 , target=\"api\" }>5ms ",
                TelemetryMetric::RunqLatencyP95,
                Some("api"),
                Some("host-2"),
                Comparison::Above,
                5000.0,
            ),
            (
                "runq_latency_p99 < 750us",
                TelemetryMetric::RunqLatencyP99,
                None,
                None,
                Comparison::Below,
                750.0,
            ),
            (
                "oom_kills{} > 0",
                TelemetryMetric::OomKills,
                None,
                None,
                Comparison::Above,
                0.0,
            ),
            (
                "tcp_connect_failures_per_s{target=re:api-.*} > 2.5",
                TelemetryMetric::TcpConnectFailuresPerS,
                Some("re:api-.*"),
                None,
                Comparison::Above,
                2.5,
            ),
        ];
        for (text, metric, target, agent, comparison, threshold) in cases {
            let parsed = parse_expression(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.metric, *metric, "{text}");
            assert_eq!(parsed.target.as_deref(), *target, "{text}");
            assert_eq!(parsed.agent.as_deref(), *agent, "{text}");
            assert_eq!(parsed.comparison, *comparison, "{text}");
            assert_eq!(parsed.threshold, *threshold, "{text}");
        }
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        let cases = [
            ("tcp_retransmits_per_s 50", "no comparison"),
            ("tcp_retransmits_per_s >= 50", "not >= or <="),
            (
                "tcp_retrans > 50",
                "unknown telemetry metric \"tcp_retrans\"",
            ),
            ("tcp_retransmits_per_s{target=db > 50", "unclosed"),
            (
                "tcp_retransmits_per_s{host=a} > 50",
                "unknown label \"host\"",
            ),
            ("tcp_retransmits_per_s{target} > 50", "not KEY=VALUE"),
            ("tcp_retransmits_per_s{target=} > 50", "empty value"),
            (
                "tcp_retransmits_per_s{target=a,target=b} > 50",
                "given twice",
            ),
            ("tcp_retransmits_per_s >", "no threshold"),
            ("tcp_retransmits_per_s > -1", "at least 0"),
            ("tcp_retransmits_per_s > lots", "a number"),
            ("runq_latency_p95 > 5", "a duration such as 500us"),
        ];
        for (text, expected) in cases {
            let error = parse_expression(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn rates_count_the_intervals_ending_in_the_window_of_the_labelled_target() {
        let points = vec![
            point("a1", "db", 0, 1000), // ends at 1000: outside a 3s window at 4000
            point("a1", "db", 1000, 60),
            point("a1", "db", 2000, 60),
            point("a1", "db", 3000, 60),
            point("a1", "api", 3000, 5000), // another target
            point("a1", "db", 4000, 9999),  // ends after now
        ];
        let check = check_telemetry(
            &points,
            &condition("tcp_retransmits_per_s{target=db} > 50", 3),
            4000,
        );
        assert_eq!(check.samples, 3);
        assert_eq!(check.observed, Some(60.0));
        assert!(check.held, "{}", check.summary);
        assert_eq!(
            check.summary,
            "tcp_retransmits_per_s{target=db} 60/s (3 interval(s) over the last 3s)"
        );
        let higher = condition("tcp_retransmits_per_s{target=db} > 60", 3);
        assert!(
            !check_telemetry(&points, &higher, 4000).held,
            "strictly above"
        );
        // Without labels every target counts: (3 * 60 + 5000) over the 3s the intervals span.
        let all = check_telemetry(&points, &condition("tcp_retransmits_per_s > 0", 3), 4000);
        assert_eq!(all.observed.map(round2), Some(round2(5180.0 / 3.0)));
    }

    #[test]
    fn stop_reasons_name_the_figure_and_the_threshold() {
        let points = vec![point("a1", "db", 0, 80), point("a1", "db", 1000, 86)];
        let fired = telemetry_stop_fired(
            &points,
            &condition("tcp_retransmits_per_s{target=db} > 50", 5),
            2000,
        );
        assert_eq!(
            fired.as_deref(),
            Some(
                "stop condition on telemetry: tcp_retransmits_per_s{target=db} 83/s > 50/s over \
                 the last 5s (2 interval(s))"
            )
        );
        let quiet = condition("tcp_retransmits_per_s{target=db} > 90", 5);
        assert_eq!(telemetry_stop_fired(&points, &quiet, 2000), None);
        assert_eq!(telemetry_stop_fired(&[], &quiet, 2000), None);
    }

    #[test]
    fn agents_add_up_and_the_agent_label_narrows() {
        let points = vec![point("a1", "db", 0, 10), point("a2", "db", 0, 30)];
        let both = check_telemetry(
            &points,
            &condition("tcp_retransmits_per_s{target=db} > 0", 5),
            1000,
        );
        assert_eq!(both.observed, Some(40.0));
        let one = check_telemetry(
            &points,
            &condition("tcp_retransmits_per_s{target=db,agent=a2} > 0", 5),
            1000,
        );
        assert_eq!(one.observed, Some(30.0));
    }

    #[test]
    fn an_empty_window_never_holds_not_even_below() {
        let below = condition("tcp_resets_per_s < 1", 2);
        let check = check_telemetry(&[], &below, 10_000);
        assert!(!check.held);
        assert_eq!(check.observed, None);
        assert!(
            check.summary.contains("nothing to measure"),
            "{}",
            check.summary
        );
        // A point of another target is not this target's zero.
        let other = [point("a1", "api", 9000, 0)];
        assert!(
            !check_telemetry(
                &other,
                &condition("tcp_resets_per_s{target=db} < 1", 2),
                10_000
            )
            .held
        );
        assert!(
            check_telemetry(
                &other,
                &condition("tcp_resets_per_s{target=api} < 1", 2),
                10_000
            )
            .held
        );
    }

    #[test]
    fn counts_and_percentiles_over_the_window() {
        let mut a = point("a1", "api", 0, 0);
        a.oom_kills = 1;
        a.crashes = 2;
        // 90 samples below 2us, 10 in [4096, 8192)us.
        a.runq_buckets = vec![90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10];
        let mut b = point("a1", "api", 1000, 0);
        b.oom_kills = 1;
        let points = [a, b];
        let ooms = check_telemetry(&points, &condition("oom_kills{target=api} > 1", 5), 2000);
        assert_eq!(ooms.observed, Some(2.0));
        assert!(ooms.held);
        let crashes = check_telemetry(&points, &condition("process_crashes > 1", 5), 2000);
        assert_eq!(crashes.observed, Some(2.0));
        let p95 = check_telemetry(&points, &condition("runq_latency_p95 > 5ms", 5), 2000);
        // Rank 95 of 100 is half-way into the [4096, 8192)us bucket.
        assert_eq!(p95.observed, Some(6144.0));
        assert!(p95.held);
        assert!(p95.summary.contains("6.1ms"), "{}", p95.summary);
        // The second interval has no histogram: the first one's figures stand alone.
        assert_eq!(log2_quantile_us(&[], 0.95, 0), None);
    }

    #[test]
    fn quantiles_stay_within_the_largest_sample() {
        assert_eq!(log2_quantile_us(&[0, 0, 4], 1.0, 5_000), Some(5.0));
        assert_eq!(log2_quantile_us(&[0, 0, 4], 0.5, 0), Some(6.0));
        assert_eq!(log2_quantile_us(&[2], 0.5, 0), Some(1.0));
    }

    #[test]
    fn target_labels_match_names_and_selector_values() {
        let p = TelemetryPoint {
            target: "db-1".into(),
            selector: "container matching re:db-.*".into(),
            ..TelemetryPoint::default()
        };
        assert!(p.is_target("db-1"));
        assert!(p.is_target("re:db-.*"));
        assert!(!p.is_target("db"));
        assert!(!p.is_target("-.*"));
        assert_eq!(target_label(&TargetSelector::Pid(42)), "42");
        assert_eq!(target_label(&TargetSelector::Container("db".into())), "db");
    }

    #[test]
    fn figures_and_descriptions_read_well() {
        let c = condition("tcp_retransmits_per_s{target=db,agent=a2} > 50", 5);
        assert_eq!(
            c.describe(),
            "tcp_retransmits_per_s{target=db,agent=a2} > 50/s over the last 5s"
        );
        assert_eq!(TelemetryMetric::RunqLatencyP95.format(750.4), "750us");
        assert_eq!(TelemetryMetric::RunqLatencyP95.format(1_500_000.0), "1.5s");
        assert_eq!(TelemetryMetric::OomKills.format(1.0), "1");
    }
}
