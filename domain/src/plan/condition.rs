//! Conditions on a steady-state probe's recent samples: a stage's `when:` trigger, and the
//! measurable tolerances of a `hypothesis:`.
//!
//! ```yaml
//! steady_state:
//!   probes:
//!     - { name: api, kind: http, url: "http://10.0.0.7:8080/health" }
//! hypothesis:                     # a plain string, or text plus tolerances
//!   text: The API stays within its SLO while the database is paused.
//!   tolerances:                   # judged over the faults' window (the report does it)
//!     - { probe: api, max_error_rate: 5%, max_p95: 300ms }
//! stages:
//!   - name: second-wave
//!     after: 1s                   # first the delay ...
//!     when:                       # ... then wait until this holds (checked every 250ms)
//!       probe: api                # a steady_state probe
//!       metric: p95               # error_rate | p50 | p95 | p99 | value (the mean)
//!       above: 500ms              # or `below:`; percent for error_rate, a duration for
//!                                 # p50/p95/p99, a number for value
//!       window: 5s                # over the samples of the last 5s (250ms..=10m)
//!       timeout: 2m               # give up (the run is aborted) after this (default 5m, 1s..=1h)
//!     faults: [...]
//! ```
//!
//! A window without samples (or, for a latency, without a measured latency; for `value`, without
//! a value) never holds: a trigger keeps waiting and a tolerance is not met.
//!
//! Tolerance keys: `max_error_rate`, `max_p50`, `max_p95`, `max_p99`, `max_value` and
//! `min_value`; one item may set several, each becomes one [`Tolerance`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

use super::steady::{SteadyState, format_rate};
use super::telemetry::TelemetryCondition;
use super::units::{NumberError, exact};
use super::{Checker, MAX_STAGE_DELAY, child};
use crate::duration::{format_duration, parse_duration};
use crate::probe::{ProbeSample, ProbeStats, Window, format_latency, summarize};

/// How long a stage waits for its `when` when the plan sets no `timeout`.
pub const DEFAULT_WHEN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Shortest `when` timeout.
pub const MIN_WHEN_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `when` timeout (as long as the longest `after`).
pub const MAX_WHEN_TIMEOUT: Duration = MAX_STAGE_DELAY;

/// What a condition or tolerance measures over a window of one probe's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Failed samples / samples, `0..=1`; written as a percentage.
    ErrorRate,
    /// Nearest-rank latency percentiles, in milliseconds; written as durations.
    P50,
    P95,
    P99,
    /// The mean of the samples' values (Prometheus probes); written as a number.
    Value,
}

impl Metric {
    /// Every metric as written in a plan.
    pub const NAMES: &'static [&'static str] = &["error_rate", "p50", "p95", "p99", "value"];

    /// The metric named `name`, as written in a plan.
    pub fn parse(name: &str) -> Option<Metric> {
        match name {
            "error_rate" => Some(Metric::ErrorRate),
            "p50" => Some(Metric::P50),
            "p95" => Some(Metric::P95),
            "p99" => Some(Metric::P99),
            "value" => Some(Metric::Value),
            _ => None,
        }
    }

    /// As written in a plan.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::P50 => "p50",
            Metric::P95 => "p95",
            Metric::P99 => "p99",
            Metric::Value => "value",
        }
    }

    /// For a person: `error rate`, `p95 latency`, `mean value`.
    pub fn label(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error rate",
            Metric::P50 => "p50 latency",
            Metric::P95 => "p95 latency",
            Metric::P99 => "p99 latency",
            Metric::Value => "mean value",
        }
    }

    /// The metric's figure in `stats`: a fraction for the error rate, milliseconds for a
    /// latency, the mean for a value; `None` when the window has nothing to measure.
    pub fn observe(self, stats: &ProbeStats) -> Option<f64> {
        let ms = |latency: Option<Duration>| latency.map(|l| l.as_secs_f64() * 1000.0);
        match self {
            Metric::ErrorRate => stats.error_rate,
            Metric::P50 => ms(stats.latency_p50),
            Metric::P95 => ms(stats.latency_p95),
            Metric::P99 => ms(stats.latency_p99),
            Metric::Value => stats.value_mean,
        }
    }

    /// A figure of this metric for a person: `12.5%`, `300ms`, `42`.
    pub fn format(self, figure: f64) -> String {
        match self {
            Metric::ErrorRate => format_rate(figure),
            Metric::P50 | Metric::P95 | Metric::P99 => {
                format_latency(Duration::from_secs_f64(figure.max(0.0) / 1000.0))
            }
            Metric::Value => format!("{figure}"),
        }
    }

    /// Reads a threshold as a plan writes it for this metric. `field` names it in messages.
    fn threshold(self, text: &str, field: &str) -> Result<f64, String> {
        match self {
            Metric::ErrorRate => percent_fraction(text, field),
            Metric::P50 | Metric::P95 | Metric::P99 => match parse_duration(text) {
                Ok(duration) => Ok(duration.as_secs_f64() * 1000.0),
                Err(error) => Err(format!(
                    "{field} of a {} is a duration such as 300ms: {error}",
                    self.label()
                )),
            },
            Metric::Value => match text.trim().parse::<f64>() {
                Ok(number) if number.is_finite() => Ok(number),
                _ => Err(format!(
                    "{field} of a value is a number such as 5 or 0.25, got {text:?}"
                )),
            },
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which side of the threshold makes a condition hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Strictly greater than the threshold.
    Above,
    /// Strictly less than the threshold.
    Below,
}

impl Comparison {
    pub fn name(self) -> &'static str {
        match self {
            Comparison::Above => "above",
            Comparison::Below => "below",
        }
    }

    fn holds(self, observed: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => observed > threshold,
            Comparison::Below => observed < threshold,
        }
    }
}

/// A condition on one probe's samples over a trailing window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Condition {
    /// A `steady_state` probe.
    pub probe: String,
    pub metric: Metric,
    pub comparison: Comparison,
    /// In the metric's unit: a fraction, milliseconds or a plain number ([`Metric::observe`]).
    pub threshold: f64,
    /// The samples taken within this long before the check count.
    pub window: Duration,
}

impl Condition {
    /// `api p95 latency above 500ms over the last 5s`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {} {} over the last {}",
            self.probe,
            self.metric.label(),
            self.comparison.name(),
            self.metric.format(self.threshold),
            format_duration(self.window)
        )
    }
}

/// A stage's `when:`: the stage starts once `condition` holds, or the run is aborted after
/// `timeout`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTrigger {
    pub condition: TriggerCondition,
    pub timeout: Duration,
}

/// What a `when:` waits for: a probe's figure, or the run's telemetry.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TriggerCondition {
    Probe(Condition),
    Telemetry(TelemetryCondition),
}

impl TriggerCondition {
    /// For a person, as [`Condition::describe`] and [`TelemetryCondition::describe`].
    pub fn describe(&self) -> String {
        match self {
            TriggerCondition::Probe(condition) => condition.describe(),
            TriggerCondition::Telemetry(condition) => condition.describe(),
        }
    }
}

/// What [`check_condition`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionCheck {
    pub held: bool,
    /// The metric's figure over the window; `None` when there was nothing to measure.
    pub observed: Option<f64>,
    /// Samples in the window.
    pub samples: usize,
    /// For a person: `api p95 latency 620ms (12 samples over the last 5s)`.
    pub summary: String,
}

/// Judges `condition` at `now_ms` on its probe's `samples`: the samples taken within the last
/// `window`, up to and including `now_ms`, summarized with [`summarize`]. A window with nothing
/// to measure never holds.
pub fn check_condition(
    samples: &[ProbeSample],
    condition: &Condition,
    now_ms: i64,
) -> ConditionCheck {
    let window_ms = i64::try_from(condition.window.as_millis()).unwrap_or(i64::MAX);
    let window = Window::new(now_ms.saturating_sub(window_ms), now_ms.saturating_add(1));
    let stats = summarize(samples, window);
    let observed = condition.metric.observe(&stats);
    let over = format!(
        "{} sample(s) over the last {}",
        stats.count,
        format_duration(condition.window)
    );
    let summary = match observed {
        Some(figure) => format!(
            "{} {} {} ({over})",
            condition.probe,
            condition.metric.label(),
            condition.metric.format(figure)
        ),
        None => format!(
            "{} {}: nothing to measure ({over})",
            condition.probe,
            condition.metric.label()
        ),
    };
    ConditionCheck {
        held: observed
            .is_some_and(|figure| condition.comparison.holds(figure, condition.threshold)),
        observed,
        samples: stats.count,
        summary,
    }
}

// ---------------------------------------------------------------------------------------------
// Hypothesis tolerances.
// ---------------------------------------------------------------------------------------------

/// The bound a tolerance puts on its metric (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    AtMost(f64),
    AtLeast(f64),
}

impl Limit {
    /// The bound's figure, in the metric's unit.
    pub fn figure(self) -> f64 {
        match self {
            Limit::AtMost(figure) | Limit::AtLeast(figure) => figure,
        }
    }

    fn allows(self, observed: f64) -> bool {
        match self {
            Limit::AtMost(max) => observed <= max,
            Limit::AtLeast(min) => observed >= min,
        }
    }

    fn words(self) -> &'static str {
        match self {
            Limit::AtMost(_) => "at most",
            Limit::AtLeast(_) => "at least",
        }
    }
}

/// What the hypothesis expects of one probe while the faults are applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tolerance {
    /// A `steady_state` probe.
    pub probe: String,
    pub metric: Metric,
    pub limit: Limit,
}

impl Tolerance {
    /// `api p95 latency at most 300ms`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {} {}",
            self.probe,
            self.metric.label(),
            self.limit.words(),
            self.metric.format(self.limit.figure())
        )
    }
}

/// One tolerance, judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToleranceResult {
    pub probe: String,
    pub metric: Metric,
    /// `p95 latency at most 300ms`.
    pub what: String,
    /// The bound as written for a person: `300ms`, `5%`.
    pub limit: String,
    /// The figure seen, for a person; `None` when the window had nothing to measure.
    pub observed: Option<String>,
    /// The figure seen, in the metric's unit ([`Metric::observe`]).
    pub observed_value: Option<f64>,
    /// Whether the figure was within the bound; never when nothing was measured.
    pub held: bool,
    /// `api p95 latency 120ms, at most 300ms: held`.
    pub summary: String,
}

/// Judges each tolerance on `during`: the statistics of each probe over the faults' window
/// (a probe missing from the map counts as having no samples). One result per tolerance, in
/// order.
pub fn judge_hypothesis(
    tolerances: &[Tolerance],
    during: &BTreeMap<String, ProbeStats>,
) -> Vec<ToleranceResult> {
    tolerances
        .iter()
        .map(|tolerance| {
            let observed_value = during
                .get(&tolerance.probe)
                .and_then(|stats| tolerance.metric.observe(stats));
            let held = observed_value.is_some_and(|figure| tolerance.limit.allows(figure));
            let limit = tolerance.metric.format(tolerance.limit.figure());
            let what = format!(
                "{} {} {limit}",
                tolerance.metric.label(),
                tolerance.limit.words()
            );
            let observed = observed_value.map(|figure| tolerance.metric.format(figure));
            let summary = format!(
                "{} {} {}, {} {limit}: {}",
                tolerance.probe,
                tolerance.metric.label(),
                observed.as_deref().unwrap_or("not measured (no samples)"),
                tolerance.limit.words(),
                if held { "held" } else { "not held" }
            );
            ToleranceResult {
                probe: tolerance.probe.clone(),
                metric: tolerance.metric,
                what,
                limit,
                observed,
                observed_value,
                held,
                summary,
            }
        })
        .collect()
}

/// The hypothesis's verdict from its judged tolerances: `None` without tolerances (nothing to
/// judge), else whether every one held.
pub fn hypothesis_held(results: &[ToleranceResult]) -> Option<bool> {
    (!results.is_empty()).then(|| results.iter().all(|result| result.held))
}

/// The verdict of a run that was not (or could not be) judged.
pub const NOT_EVALUATED: &str = "not evaluated (no hypothesis probes)";
/// The hypothesis held: the run completed and its recovery check found the system steady.
pub const CONFIRMED: &str = "confirmed";
/// The hypothesis did not hold: a stop condition fired, a tolerance was broken, or the
/// recovery check found the system not steady.
pub const REFUTED: &str = "refuted";

/// What a run's verdict is judged on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictInputs {
    /// The plan has `steady_state` (without it nothing is judged).
    pub has_steady_state: bool,
    /// The run ended `completed`.
    pub completed: bool,
    /// A stop condition fired.
    pub stop_condition_fired: bool,
    /// The recovery check's outcome, when it ran.
    pub recovered: Option<bool>,
    /// A hypothesis tolerance was not held.
    pub tolerance_broken: bool,
}

/// The hypothesis verdict: [`NOT_EVALUATED`] without `steady_state`; [`REFUTED`] when a stop
/// condition fired, a tolerance broke or the recovery check found the system not steady;
/// [`CONFIRMED`] when the run completed and the recovery check found it steady; otherwise
/// (not steady before injection, halted, failed) [`NOT_EVALUATED`].
pub fn run_verdict(inputs: VerdictInputs) -> &'static str {
    if !inputs.has_steady_state {
        return NOT_EVALUATED;
    }
    if inputs.stop_condition_fired || inputs.recovered == Some(false) || inputs.tolerance_broken {
        return REFUTED;
    }
    if inputs.completed && inputs.recovered == Some(true) {
        return CONFIRMED;
    }
    NOT_EVALUATED
}

/// A percentage `0%`..=`100%` (the `%` optional, at most two decimals) as a fraction.
pub(super) fn percent_fraction(text: &str, field: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches('%').trim_end();
    match exact(number, 100) {
        Ok(bp) if bp <= 10_000 => Ok(bp as f64 / 10_000.0),
        Ok(_) | Err(NumberError::TooLarge) => {
            Err(format!("{field} must be between 0% and 100%, got {text}"))
        }
        Err(NumberError::NotWhole) => Err(format!(
            "{field} must have at most two decimals, got {text}"
        )),
        Err(NumberError::Invalid) => Err(format!(
            "{field} must be a percentage such as 0%, 5 or 2.5%, got {text:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, located values.
// ---------------------------------------------------------------------------------------------

/// A stage's `when:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrigger {
    probe: Option<Spanned<String>>,
    /// `METRIC{LABELS} > THRESHOLD`: a telemetry condition instead of a probe's.
    pub(super) telemetry: Option<Spanned<String>>,
    metric: Option<Spanned<String>>,
    above: Option<Spanned<String>>,
    below: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

/// `hypothesis:` as written: a string, or a mapping with `text` and `tolerances`.
#[derive(Debug)]
pub(super) enum RawHypothesis {
    Text(String),
    Detailed(RawHypothesisMap),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHypothesisMap {
    text: Option<Spanned<String>>,
    tolerances: Option<Spanned<Vec<Spanned<RawTolerance>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTolerance {
    probe: Option<Spanned<String>>,
    max_error_rate: Option<Spanned<String>>,
    max_p50: Option<Spanned<String>>,
    max_p95: Option<Spanned<String>>,
    max_p99: Option<Spanned<String>>,
    max_value: Option<Spanned<String>>,
    min_value: Option<Spanned<String>>,
}

impl RawTolerance {
    /// The limits given, in declaration order.
    fn limits(&self) -> Vec<(&'static str, Metric, bool, &Spanned<String>)> {
        let keys = [
            (
                "max_error_rate",
                Metric::ErrorRate,
                true,
                &self.max_error_rate,
            ),
            ("max_p50", Metric::P50, true, &self.max_p50),
            ("max_p95", Metric::P95, true, &self.max_p95),
            ("max_p99", Metric::P99, true, &self.max_p99),
            ("max_value", Metric::Value, true, &self.max_value),
            ("min_value", Metric::Value, false, &self.min_value),
        ];
        keys.into_iter()
            .filter_map(|(key, metric, at_most, value)| {
                value.as_ref().map(|value| (key, metric, at_most, value))
            })
            .collect()
    }
}

impl<'de> Deserialize<'de> for RawHypothesis {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawHypothesis;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sentence, or a mapping with `text` and `tolerances`")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawHypothesis, E> {
                Ok(RawHypothesis::Text(v.to_string()))
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawHypothesis, E> {
                Ok(RawHypothesis::Text(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawHypothesis, E> {
                Ok(RawHypothesis::Text(v.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawHypothesis, E> {
                Ok(RawHypothesis::Text(v.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawHypothesis, E> {
                Ok(RawHypothesis::Text(v.to_string()))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<RawHypothesis, E> {
                Ok(RawHypothesis::Text(String::new()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawHypothesis, A::Error> {
                RawHypothesisMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawHypothesis::Detailed)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Rules.
// ---------------------------------------------------------------------------------------------

impl Checker {
    /// A reference to a `steady_state` probe by `what` (`when`, a tolerance). `None` when the
    /// section is itself invalid (already reported) or lacks the probe (reported here).
    pub(super) fn probe_ref(
        &mut self,
        probe: &Spanned<String>,
        field: &str,
        steady: Option<&Option<SteadyState>>,
        what: &str,
    ) -> Option<String> {
        let name = probe.value.trim();
        match steady {
            None => None,
            Some(Some(steady)) if steady.probes.iter().any(|p| p.name == name) => {
                Some(name.to_string())
            }
            Some(Some(steady)) => {
                let known: Vec<&str> = steady.probes.iter().map(|p| p.name.as_str()).collect();
                let message = format!(
                    "probe {name:?} is not a steady_state probe (those are: {}); {what} \
                     watches the probes of steady_state",
                    known.join(", ")
                );
                self.report(&probe.referenced, field, message);
                None
            }
            Some(None) => {
                let message = format!(
                    "probe {name:?} is not a steady_state probe: the plan has no steady_state \
                     section; {what} watches the probes of steady_state"
                );
                self.report(&probe.referenced, field, message);
                None
            }
        }
    }

    /// A stage's `when:` at `path`.
    pub(super) fn trigger(
        &mut self,
        raw: &Spanned<RawTrigger>,
        path: &str,
        steady: Option<&Option<SteadyState>>,
    ) -> Option<StageTrigger> {
        let at = &raw.referenced;
        let trigger = &raw.value;
        if let Some(expression) = &trigger.telemetry {
            return self.telemetry_trigger(trigger, expression, at, path);
        }
        let probe = self
            .required(&trigger.probe, at, path, "probe")
            .and_then(|probe| self.probe_ref(probe, &child(path, "probe"), steady, "`when`"));
        let metric = self
            .required(&trigger.metric, at, path, "metric")
            .and_then(|metric| self.metric(metric, &child(path, "metric")));
        let comparison = match (&trigger.above, &trigger.below) {
            (Some(above), None) => Some((Comparison::Above, "above", above)),
            (None, Some(below)) => Some((Comparison::Below, "below", below)),
            (None, None) => {
                let message = "`when` needs `above: THRESHOLD` or `below: THRESHOLD`";
                self.report(at, &child(path, "above"), message);
                None
            }
            (Some(above), Some(below)) => {
                let (first, second) = if (below.referenced.line(), below.referenced.column())
                    > (above.referenced.line(), above.referenced.column())
                {
                    (("above", above), ("below", below))
                } else {
                    (("below", below), ("above", above))
                };
                let message = format!(
                    "give `{}` or `{}`, not both: a condition has one threshold",
                    first.0, second.0
                );
                self.report(&second.1.referenced, &child(path, second.0), message);
                None
            }
        };
        let threshold = match (metric, &comparison) {
            (Some(metric), Some((_, key, value))) => {
                let field = child(path, key);
                self.parse_at(value, &field, |text| metric.threshold(text, key))
            }
            _ => None,
        };
        let window = self.condition_window(&trigger.window, at, path);
        let timeout = self.when_timeout(trigger, path);
        Some(StageTrigger {
            condition: TriggerCondition::Probe(Condition {
                probe: probe?,
                metric: metric?,
                comparison: comparison?.0,
                threshold: threshold?,
                window: window?,
            }),
            timeout: timeout?,
        })
    }

    fn when_timeout(&mut self, trigger: &RawTrigger, path: &str) -> Option<Duration> {
        match &trigger.timeout {
            None => Some(DEFAULT_WHEN_TIMEOUT),
            Some(timeout) => self.duration(
                timeout,
                &child(path, "timeout"),
                (MIN_WHEN_TIMEOUT, MAX_WHEN_TIMEOUT),
                "between 1s and 1h",
            ),
        }
    }

    /// `when: { telemetry: EXPRESSION, window: W, timeout: T }`.
    fn telemetry_trigger(
        &mut self,
        trigger: &RawTrigger,
        expression: &Spanned<String>,
        at: &Location,
        path: &str,
    ) -> Option<StageTrigger> {
        let probe_keys = [
            ("probe", &trigger.probe),
            ("metric", &trigger.metric),
            ("above", &trigger.above),
            ("below", &trigger.below),
        ];
        let condition = self.telemetry_condition(
            expression,
            &trigger.window,
            &probe_keys,
            at,
            path,
            "a probe's `when`",
        );
        let timeout = self.when_timeout(trigger, path);
        Some(StageTrigger {
            condition: TriggerCondition::Telemetry(condition?),
            timeout: timeout?,
        })
    }

    fn metric(&mut self, metric: &Spanned<String>, field: &str) -> Option<Metric> {
        self.parse_at(metric, field, |text| {
            Metric::parse(text.trim()).ok_or_else(|| {
                format!(
                    "unknown metric {text:?}; expected one of {}",
                    Metric::NAMES.join(", ")
                )
            })
        })
    }

    /// `hypothesis:`: its text and tolerances; `Some((None, []))` when absent.
    pub(super) fn hypothesis(
        &mut self,
        raw: Option<&Spanned<RawHypothesis>>,
        steady: Option<&Option<SteadyState>>,
    ) -> Option<(Option<String>, Vec<Tolerance>)> {
        let Some(raw) = raw else {
            return Some((None, Vec::new()));
        };
        let detailed = match &raw.value {
            RawHypothesis::Text(text) => return Some((trimmed(text), Vec::new())),
            RawHypothesis::Detailed(detailed) => detailed,
        };
        let text = self
            .required(&detailed.text, &raw.referenced, "hypothesis", "text")
            .and_then(|text| match trimmed(&text.value) {
                Some(text) => Some(text),
                None => {
                    let message = "the hypothesis text must not be empty";
                    self.report(&text.referenced, "hypothesis.text", message);
                    None
                }
            });
        let tolerances = match &detailed.tolerances {
            None => Some(Vec::new()),
            Some(list) => {
                let checked: Vec<Option<Vec<Tolerance>>> = list
                    .value
                    .iter()
                    .enumerate()
                    .map(|(index, item)| {
                        self.tolerance(item, &format!("hypothesis.tolerances[{index}]"), steady)
                    })
                    .collect();
                checked
                    .into_iter()
                    .collect::<Option<Vec<Vec<Tolerance>>>>()
                    .map(|lists| lists.into_iter().flatten().collect())
            }
        };
        Some((Some(text?), tolerances?))
    }

    fn tolerance(
        &mut self,
        raw: &Spanned<RawTolerance>,
        path: &str,
        steady: Option<&Option<SteadyState>>,
    ) -> Option<Vec<Tolerance>> {
        let at: &Location = &raw.referenced;
        let item = &raw.value;
        let probe = self
            .required(&item.probe, at, path, "probe")
            .and_then(|probe| self.probe_ref(probe, &child(path, "probe"), steady, "a tolerance"));
        let limits = item.limits();
        if limits.is_empty() {
            let message = "a tolerance needs at least one of max_error_rate, max_p50, max_p95, \
                           max_p99, max_value, min_value";
            self.report(at, &child(path, "max_error_rate"), message);
            return None;
        }
        let checked: Vec<Option<(Metric, Limit)>> = limits
            .into_iter()
            .map(|(key, metric, at_most, value)| {
                self.parse_at(value, &child(path, key), |text| metric.threshold(text, key))
                    .map(|figure| {
                        let limit = if at_most {
                            Limit::AtMost(figure)
                        } else {
                            Limit::AtLeast(figure)
                        };
                        (metric, limit)
                    })
            })
            .collect();
        let checked: Vec<(Metric, Limit)> = checked.into_iter().collect::<Option<_>>()?;
        let probe = probe?;
        Some(
            checked
                .into_iter()
                .map(|(metric, limit)| Tolerance {
                    probe: probe.clone(),
                    metric,
                    limit,
                })
                .collect(),
        )
    }
}

/// Trimmed text; blank counts as absent.
fn trimmed(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: i64, ok: bool, latency_ms: u64, value: Option<f64>) -> ProbeSample {
        ProbeSample {
            at_ms,
            ok,
            latency: Some(Duration::from_millis(latency_ms)),
            value,
            detail: String::new(),
        }
    }

    fn condition(metric: Metric, comparison: Comparison, threshold: f64) -> Condition {
        Condition {
            probe: "api".into(),
            metric,
            comparison,
            threshold,
            window: Duration::from_secs(2),
        }
    }

    #[test]
    fn condition_table() {
        // One sample every 500ms from 0 to 4500: ok and fast until 3000, then failing and slow.
        let samples: Vec<ProbeSample> = (0..10)
            .map(|i| {
                let at = i * 500;
                let late = at >= 3000;
                sample(at, !late, if late { 900 } else { 10 }, Some(at as f64))
            })
            .collect();
        type Case<'a> = (
            &'a str,
            &'a [ProbeSample],
            Condition,
            i64,
            bool,
            Option<f64>,
        );
        let cases: Vec<Case> = vec![
            (
                "no samples never holds",
                &[],
                condition(Metric::ErrorRate, Comparison::Below, 0.5),
                1000,
                false,
                None,
            ),
            (
                "below never holds on an empty window either",
                &samples,
                condition(Metric::P95, Comparison::Below, 1000.0),
                60_000,
                false,
                None,
            ),
            (
                "error rate 0 is not above 0",
                &samples,
                condition(Metric::ErrorRate, Comparison::Above, 0.0),
                2500,
                false,
                Some(0.0),
            ),
            (
                "one failure of five is above 0",
                &samples,
                condition(Metric::ErrorRate, Comparison::Above, 0.0),
                3000,
                true,
                Some(0.2),
            ),
            (
                "a rate equal to the threshold is not above it",
                &samples,
                condition(Metric::ErrorRate, Comparison::Above, 0.2),
                3000,
                false,
                Some(0.2),
            ),
            (
                "error rate below 50%",
                &samples,
                condition(Metric::ErrorRate, Comparison::Below, 0.5),
                3000,
                true,
                Some(0.2),
            ),
            (
                "p95 above 500ms once a slow sample is in the window",
                &samples,
                condition(Metric::P95, Comparison::Above, 500.0),
                3000,
                true,
                Some(900.0),
            ),
            (
                "p50 still fast with one slow sample",
                &samples,
                condition(Metric::P50, Comparison::Above, 500.0),
                3000,
                false,
                Some(10.0),
            ),
            (
                "p99 below 20ms early on",
                &samples,
                condition(Metric::P99, Comparison::Below, 20.0),
                1000,
                true,
                Some(10.0),
            ),
            (
                "mean value over the window",
                &samples,
                condition(Metric::Value, Comparison::Above, 1999.0),
                3000,
                true,
                // 1000, 1500, 2000, 2500, 3000
                Some(2000.0),
            ),
        ];
        for (name, samples, condition, now, held, observed) in cases {
            let check = check_condition(samples, &condition, now);
            assert_eq!(check.held, held, "{name}: {check:?}");
            assert_eq!(check.observed, observed, "{name}: {check:?}");
        }
    }

    #[test]
    fn value_conditions_need_values() {
        let samples = vec![sample(0, true, 1, None)];
        let check = check_condition(
            &samples,
            &condition(Metric::Value, Comparison::Below, 5.0),
            0,
        );
        assert!(!check.held);
        assert_eq!(check.samples, 1);
        assert!(check.summary.contains("nothing to measure"), "{check:?}");
    }

    #[test]
    fn descriptions_read_as_sentences() {
        let p95 = condition(Metric::P95, Comparison::Above, 500.0);
        assert_eq!(
            p95.describe(),
            "api p95 latency above 500ms over the last 2s"
        );
        let rate = condition(Metric::ErrorRate, Comparison::Above, 0.125);
        assert_eq!(
            rate.describe(),
            "api error rate above 12.5% over the last 2s"
        );
        let samples = vec![sample(0, false, 620, None)];
        assert_eq!(
            check_condition(&samples, &p95, 100).summary,
            "api p95 latency 620ms (1 sample(s) over the last 2s)"
        );
    }

    fn stats(error_rate: Option<f64>, p95_ms: Option<u64>, mean: Option<f64>) -> ProbeStats {
        ProbeStats {
            count: usize::from(error_rate.is_some()) * 10,
            error_rate,
            latency_p95: p95_ms.map(Duration::from_millis),
            value_mean: mean,
            ..ProbeStats::default()
        }
    }

    #[test]
    fn tolerance_table() {
        let tolerance = |probe: &str, metric, limit| Tolerance {
            probe: probe.into(),
            metric,
            limit,
        };
        let during: BTreeMap<String, ProbeStats> = [
            ("api".to_string(), stats(Some(0.04), Some(250), None)),
            ("slow".to_string(), stats(Some(0.5), Some(1200), None)),
            ("gauge".to_string(), stats(Some(0.0), None, Some(7.5))),
            ("idle".to_string(), stats(None, None, None)),
        ]
        .into_iter()
        .collect();
        type Case = (&'static str, Tolerance, bool, Option<&'static str>);
        let cases: Vec<Case> = vec![
            (
                "error rate within 5%",
                tolerance("api", Metric::ErrorRate, Limit::AtMost(0.05)),
                true,
                Some("4%"),
            ),
            (
                "error rate equal to the limit holds",
                tolerance("api", Metric::ErrorRate, Limit::AtMost(0.04)),
                true,
                Some("4%"),
            ),
            (
                "error rate over the limit",
                tolerance("slow", Metric::ErrorRate, Limit::AtMost(0.05)),
                false,
                Some("50%"),
            ),
            (
                "p95 within 300ms",
                tolerance("api", Metric::P95, Limit::AtMost(300.0)),
                true,
                Some("250ms"),
            ),
            (
                "p95 over 300ms",
                tolerance("slow", Metric::P95, Limit::AtMost(300.0)),
                false,
                Some("1200ms"),
            ),
            (
                "minimum value met",
                tolerance("gauge", Metric::Value, Limit::AtLeast(5.0)),
                true,
                Some("7.5"),
            ),
            (
                "maximum value exceeded",
                tolerance("gauge", Metric::Value, Limit::AtMost(5.0)),
                false,
                Some("7.5"),
            ),
            (
                "no samples is not held",
                tolerance("idle", Metric::ErrorRate, Limit::AtMost(1.0)),
                false,
                None,
            ),
            (
                "a probe without statistics is not held",
                tolerance("unknown", Metric::P50, Limit::AtMost(1.0)),
                false,
                None,
            ),
        ];
        for (name, tolerance, held, observed) in cases {
            let results = judge_hypothesis(std::slice::from_ref(&tolerance), &during);
            assert_eq!(results.len(), 1, "{name}");
            let result = &results[0];
            assert_eq!(result.held, held, "{name}: {result:?}");
            assert_eq!(result.observed.as_deref(), observed, "{name}: {result:?}");
            assert_eq!(result.probe, tolerance.probe, "{name}");
        }
        let all = judge_hypothesis(
            &[
                tolerance("api", Metric::ErrorRate, Limit::AtMost(0.05)),
                tolerance("api", Metric::P95, Limit::AtMost(300.0)),
            ],
            &during,
        );
        assert_eq!(hypothesis_held(&all), Some(true));
        assert_eq!(all[1].summary, "api p95 latency 250ms, at most 300ms: held");
        assert_eq!(all[1].what, "p95 latency at most 300ms");
        let mixed = judge_hypothesis(
            &[
                tolerance("api", Metric::ErrorRate, Limit::AtMost(0.05)),
                tolerance("idle", Metric::ErrorRate, Limit::AtMost(0.05)),
            ],
            &during,
        );
        assert_eq!(hypothesis_held(&mixed), Some(false));
        assert_eq!(
            mixed[1].summary,
            "idle error rate not measured (no samples), at most 5%: not held"
        );
        assert_eq!(hypothesis_held(&[]), None);
    }

    #[test]
    fn thresholds_read_in_the_metric_unit() {
        type Case = (Metric, &'static str, Result<f64, &'static str>);
        let cases: Vec<Case> = vec![
            (Metric::ErrorRate, "5%", Ok(0.05)),
            (Metric::ErrorRate, "12.5", Ok(0.125)),
            (Metric::ErrorRate, "101%", Err("between 0% and 100%")),
            (Metric::ErrorRate, "0.001%", Err("two decimals")),
            (Metric::P95, "500ms", Ok(500.0)),
            (Metric::P99, "1s 500ms", Ok(1500.0)),
            (Metric::P50, "fast", Err("a duration such as 300ms")),
            (Metric::Value, "-2.5", Ok(-2.5)),
            (Metric::Value, "NaN", Err("a number")),
            (Metric::Value, "lots", Err("a number")),
        ];
        for (metric, text, expected) in cases {
            match (metric.threshold(text, "above"), expected) {
                (Ok(got), Ok(want)) => assert!((got - want).abs() < 1e-9, "{text}: {got}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{text}: {got}"),
                (got, want) => panic!("{metric} {text}: got {got:?}, want {want:?}"),
            }
        }
    }
}
