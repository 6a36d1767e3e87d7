//! A plan's `steady_state` and `stop_conditions`: the probes sampled around a run, what counts
//! as steady before the faults and after them, and when to abort while the faults are applied.
//!
//! ```yaml
//! steady_state:
//!   probes:                       # probe specs (see crate::probe), names unique
//!     - { name: api, kind: tcp, address: "127.0.0.1:8080", interval: 200ms }
//!   baseline: 2s                  # sampled before injecting (default 3s)
//!   max_error_rate: 0%            # steady = error rate <= this over the baseline (default 0%)
//! stop_conditions:                # checked continuously during the stages
//!   - { probe: api, max_error_rate: 50%, window: 2s }
//! ```
//!
//! The decisions ([`baseline_verdict`], [`stop_condition_fired`]) are pure and live here; the
//! coordinator samples and acts on them.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::telemetry::TelemetryCondition;
use super::units::{NumberError, exact};
use super::{Checker, child};
use crate::duration::format_duration;
use crate::probe::{ProbeSample, ProbeSpec, ProbeStats, Window, summarize};

/// Baseline length when a plan gives none.
pub const DEFAULT_BASELINE: Duration = Duration::from_secs(3);
/// Shortest and longest baseline.
pub const MIN_BASELINE: Duration = Duration::from_millis(500);
pub const MAX_BASELINE: Duration = Duration::from_secs(600);
/// Shortest and longest stop-condition window.
pub const MIN_WINDOW: Duration = Duration::from_millis(250);
pub const MAX_WINDOW: Duration = Duration::from_secs(600);

/// `steady_state:` of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SteadyState {
    /// At least one probe, names unique.
    pub probes: Vec<ProbeSpec>,
    /// How long to sample before injecting (and again after the last stage).
    pub baseline: Duration,
    /// Steady = every probe's error rate over the baseline is at most this (0..=1).
    pub max_error_rate: f64,
}

/// One item of `stop_conditions:`: on a probe's error rate, or on the run's telemetry.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StopCondition {
    Probe(ProbeStopCondition),
    Telemetry(TelemetryCondition),
}

/// `{ probe: api, max_error_rate: 50%, window: 2s }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeStopCondition {
    /// Names a `steady_state` probe.
    pub probe: String,
    /// Abort when the error rate over the last `window` exceeds this (0..=1).
    pub max_error_rate: f64,
    pub window: Duration,
}

/// `0.5` as `50%`, `1/3` as `33.3%`.
pub fn format_rate(fraction: f64) -> String {
    let p = (fraction * 1000.0).round() / 10.0;
    format!("{p}%")
}

/// Whether one probe's samples within `window` are steady: at least one sample, and an error
/// rate of at most `max_error_rate`. `Err` holds why not, for a person.
pub fn baseline_verdict(
    samples: &[ProbeSample],
    window: Window,
    max_error_rate: f64,
) -> (ProbeStats, Result<(), String>) {
    let stats = summarize(samples, window);
    let verdict = match stats.error_rate {
        None => Err("no samples".to_string()),
        Some(rate) if rate <= max_error_rate => Ok(()),
        Some(rate) => {
            let latest = samples
                .iter()
                .rev()
                .find(|s| window.contains(s.at_ms) && !s.ok)
                .map_or(String::new(), |s| format!("; latest: {}", s.detail));
            Err(format!(
                "error rate {} > {} ({} of {} samples failed{latest})",
                format_rate(rate),
                format_rate(max_error_rate),
                stats.errors,
                stats.count
            ))
        }
    };
    (stats, verdict)
}

/// Whether `condition` fires at `now_ms` on its probe's `samples`: the error rate of the
/// samples taken within the last `window` (up to and including `now_ms`) exceeds the limit.
/// A window without samples never fires. The reason names the probe, the rate and the limit.
pub fn stop_condition_fired(
    samples: &[ProbeSample],
    condition: &ProbeStopCondition,
    now_ms: i64,
) -> Option<String> {
    let window_ms = i64::try_from(condition.window.as_millis()).unwrap_or(i64::MAX);
    let window = Window::new(now_ms.saturating_sub(window_ms), now_ms.saturating_add(1));
    let stats = summarize(samples, window);
    let rate = stats.error_rate?;
    (rate > condition.max_error_rate).then(|| {
        format!(
            "stop condition on probe {}: error rate {} > {} over the last {} ({} of {} samples failed)",
            condition.probe,
            format_rate(rate),
            format_rate(condition.max_error_rate),
            format_duration(condition.window),
            stats.errors,
            stats.count
        )
    })
}

/// An error rate `0%`..=`100%` (the `%` optional), at most two decimals.
fn error_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches('%').trim_end();
    match exact(number, 100) {
        Ok(bp) if bp <= 10_000 => Ok(bp as f64 / 10_000.0),
        Ok(_) | Err(NumberError::TooLarge) => Err(format!(
            "max_error_rate must be between 0% and 100%, got {text}"
        )),
        Err(NumberError::NotWhole) => Err(format!(
            "max_error_rate must have at most two decimals, got {text}"
        )),
        Err(NumberError::Invalid) => Err(format!(
            "max_error_rate must be a percentage such as 0%, 5 or 2.5%, got {text:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, located values.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSteadyState {
    probes: Option<Spanned<Vec<Spanned<ProbeSpec>>>>,
    baseline: Option<Spanned<String>>,
    max_error_rate: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStopCondition {
    probe: Option<Spanned<String>>,
    /// `METRIC{LABELS} > THRESHOLD`: a telemetry condition instead of a probe's.
    pub(super) telemetry: Option<Spanned<String>>,
    max_error_rate: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Rules.
// ---------------------------------------------------------------------------------------------

impl Checker {
    /// `steady_state:`; `Some(None)` when absent.
    pub(super) fn steady_state(
        &mut self,
        raw: Option<&Spanned<RawSteadyState>>,
    ) -> Option<Option<SteadyState>> {
        let Some(raw) = raw else {
            return Some(None);
        };
        let section = &raw.value;
        let probes = self
            .required(&section.probes, &raw.referenced, "steady_state", "probes")
            .and_then(|probes| {
                if probes.value.is_empty() {
                    self.report(
                        &probes.referenced,
                        "steady_state.probes",
                        "steady_state needs at least one probe",
                    );
                    return None;
                }
                let mut names: HashMap<&str, usize> = HashMap::new();
                let mut ok = true;
                for (index, probe) in probes.value.iter().enumerate() {
                    let name = probe.value.name.as_str();
                    if let Some(first) = names.get(name) {
                        let message = format!(
                            "probe name {name:?} is already used by steady_state.probes[{first}]"
                        );
                        self.report(
                            &probe.referenced,
                            &format!("steady_state.probes[{index}].name"),
                            message,
                        );
                        ok = false;
                    } else {
                        names.insert(name, index);
                    }
                }
                ok.then(|| probes.value.iter().map(|p| p.value.clone()).collect())
            });
        let baseline = match &section.baseline {
            None => Some(DEFAULT_BASELINE),
            Some(baseline) => self.duration(
                baseline,
                "steady_state.baseline",
                (MIN_BASELINE, MAX_BASELINE),
                "between 500ms and 10m",
            ),
        };
        let max_error_rate = self.with_default(
            &section.max_error_rate,
            "steady_state.max_error_rate",
            0.0,
            error_rate,
        );
        Some(Some(SteadyState {
            probes: probes?,
            baseline: baseline?,
            max_error_rate: max_error_rate?,
        }))
    }

    /// `stop_conditions:`; empty when absent. A probe condition must name a probe of
    /// `steady`; a telemetry condition needs no probes.
    pub(super) fn stop_conditions(
        &mut self,
        raw: Option<&Spanned<Vec<Spanned<RawStopCondition>>>>,
        steady: Option<&Option<SteadyState>>,
    ) -> Option<Vec<StopCondition>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let checked: Vec<Option<StopCondition>> = raw
            .value
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let path = format!("stop_conditions[{index}]");
                let at = &item.referenced;
                let item = &item.value;
                if let Some(expression) = &item.telemetry {
                    return self.telemetry_stop_condition(item, expression, at, &path);
                }
                let probe = self
                    .required(&item.probe, at, &path, "probe")
                    .and_then(|probe| {
                        let name = probe.value.trim();
                        match steady {
                            // The steady_state section itself is invalid: already reported.
                            None => None,
                            Some(Some(steady)) if steady.probes.iter().any(|p| p.name == name) => {
                                Some(name.to_string())
                            }
                            Some(_) => {
                                let message = format!(
                                    "probe {name:?} is not a steady_state probe; \
                                     stop conditions watch the probes of steady_state"
                                );
                                self.report(&probe.referenced, &child(&path, "probe"), message);
                                None
                            }
                        }
                    });
                let max_error_rate = self.needed(
                    &item.max_error_rate,
                    at,
                    &path,
                    "max_error_rate",
                    error_rate,
                );
                let window = self.condition_window(&item.window, at, &path);
                Some(StopCondition::Probe(ProbeStopCondition {
                    probe: probe?,
                    max_error_rate: max_error_rate?,
                    window: window?,
                }))
            })
            .collect();
        checked.into_iter().collect()
    }

    /// `{ telemetry: EXPRESSION, window: W }`: no probe, no error rate.
    fn telemetry_stop_condition(
        &mut self,
        item: &RawStopCondition,
        expression: &Spanned<String>,
        at: &serde_saphyr::Location,
        path: &str,
    ) -> Option<StopCondition> {
        let probe_keys = [
            ("probe", &item.probe),
            ("max_error_rate", &item.max_error_rate),
        ];
        self.telemetry_condition(
            expression,
            &item.window,
            &probe_keys,
            at,
            path,
            "a probe's stop condition",
        )
        .map(StopCondition::Telemetry)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::doc;
    use super::super::{parse_plan, render_errors};
    use super::*;
    use crate::probe::ProbeKind;

    /// A valid plan (fault ends on line 9) followed by `extra`, which starts on line 10.
    fn plan_with(extra: &[&str]) -> String {
        let mut lines = vec![
            "apiVersion: faultline/v1",
            "title: t",
            "stages:",
            "  - name: s",
            "    faults:",
            "      - kind: container-pause",
            "        agent: agent-2",
            "        target: { container: db }",
            "        duration: 3s",
        ];
        lines.extend_from_slice(extra);
        doc(&lines)
    }

    const PROBES: &[&str] = &[
        "steady_state:",
        "  probes:",
        "    - { name: api, kind: tcp, address: \"127.0.0.1:8080\", interval: 200ms }",
    ];

    fn with_probes(extra: &[&str]) -> String {
        let mut lines = PROBES.to_vec();
        lines.extend_from_slice(extra);
        plan_with(&lines)
    }

    #[test]
    fn sections_parse_with_defaults_and_values() {
        let absent = parse_plan(&plan_with(&[])).unwrap();
        assert_eq!(absent.steady_state, None);
        assert!(absent.stop_conditions.is_empty());

        let defaults = parse_plan(&with_probes(&[])).unwrap();
        let mut api = ProbeSpec::new("api", ProbeKind::tcp("127.0.0.1:8080"));
        api.interval = Duration::from_millis(200);
        assert_eq!(
            defaults.steady_state,
            Some(SteadyState {
                probes: vec![api.clone()],
                baseline: DEFAULT_BASELINE,
                max_error_rate: 0.0,
            })
        );

        let full = parse_plan(&with_probes(&[
            "  baseline: 2s",
            "  max_error_rate: 12.5%",
            "stop_conditions:",
            "  - { probe: api, max_error_rate: 50%, window: 2s }",
            "  - { probe: api, max_error_rate: 0, window: 250ms }",
        ]))
        .unwrap();
        assert_eq!(
            full.steady_state,
            Some(SteadyState {
                probes: vec![api],
                baseline: Duration::from_secs(2),
                max_error_rate: 0.125,
            })
        );
        assert_eq!(
            full.stop_conditions,
            vec![
                StopCondition::Probe(ProbeStopCondition {
                    probe: "api".into(),
                    max_error_rate: 0.5,
                    window: Duration::from_secs(2),
                }),
                StopCondition::Probe(ProbeStopCondition {
                    probe: "api".into(),
                    max_error_rate: 0.0,
                    window: Duration::from_millis(250),
                }),
            ]
        );
    }

    #[test]
    fn every_rule_reports_the_right_field_and_line() {
        type Case = (&'static str, String, &'static [(u32, &'static str)]);
        let cases: Vec<Case> = vec![
            (
                "no probes key",
                plan_with(&["steady_state:", "  baseline: 2s"]),
                &[(11, "steady_state.probes")],
            ),
            (
                "empty probes",
                plan_with(&["steady_state:", "  probes: []"]),
                &[(11, "steady_state.probes")],
            ),
            (
                "duplicate probe name",
                with_probes(&["    - { name: api, kind: tcp, address: \"127.0.0.1:9\" }"]),
                &[(13, "steady_state.probes[1].name")],
            ),
            (
                "baseline too short",
                with_probes(&["  baseline: 100ms"]),
                &[(13, "steady_state.baseline")],
            ),
            (
                "baseline not a duration",
                with_probes(&["  baseline: soon"]),
                &[(13, "steady_state.baseline")],
            ),
            (
                "error rate above 100%",
                with_probes(&["  max_error_rate: 101%"]),
                &[(13, "steady_state.max_error_rate")],
            ),
            (
                "error rate not a number",
                with_probes(&["  max_error_rate: lots"]),
                &[(13, "steady_state.max_error_rate")],
            ),
            (
                "stop condition on an unknown probe",
                with_probes(&[
                    "stop_conditions:",
                    "  - { probe: db, max_error_rate: 50%, window: 2s }",
                ]),
                &[(14, "stop_conditions[0].probe")],
            ),
            (
                "stop condition without steady_state",
                plan_with(&[
                    "stop_conditions:",
                    "  - { probe: api, max_error_rate: 50%, window: 2s }",
                ]),
                &[(11, "stop_conditions[0].probe")],
            ),
            (
                "stop condition missing fields",
                with_probes(&["stop_conditions:", "  - { probe: api }"]),
                &[
                    (14, "stop_conditions[0].max_error_rate"),
                    (14, "stop_conditions[0].window"),
                ],
            ),
            (
                "stop condition bad values",
                with_probes(&[
                    "stop_conditions:",
                    "  - probe: api",
                    "    max_error_rate: 0.001",
                    "    window: 10ms",
                ]),
                &[
                    (15, "stop_conditions[0].max_error_rate"),
                    (16, "stop_conditions[0].window"),
                ],
            ),
        ];
        for (name, yaml, expected) in cases {
            let errors = match parse_plan(&yaml) {
                Ok(plan) => panic!("{name}: expected errors, got {plan:#?}"),
                Err(errors) => errors,
            };
            let got: Vec<(u32, String)> =
                errors.iter().map(|e| (e.line, e.field.clone())).collect();
            let expected: Vec<(u32, String)> =
                expected.iter().map(|(l, f)| (*l, f.to_string())).collect();
            assert_eq!(
                got,
                expected,
                "{name}\n{}",
                render_errors("plan.yaml", &errors)
            );
        }
    }

    #[test]
    fn an_invalid_probe_is_a_located_error() {
        let yaml = plan_with(&[
            "steady_state:",
            "  probes:",
            "    - { name: api, kind: tcp, url: \"http://x\" }",
        ]);
        let errors = parse_plan(&yaml).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 12, "{errors:?}");
        assert!(errors[0].message.contains("api"), "{errors:?}");
    }

    fn sample(at_ms: i64, ok: bool) -> ProbeSample {
        ProbeSample {
            at_ms,
            ok,
            latency: Some(Duration::from_millis(1)),
            value: None,
            detail: if ok {
                "ok".into()
            } else {
                format!("refused at {at_ms}")
            },
        }
    }

    #[test]
    fn stop_condition_table() {
        let half = ProbeStopCondition {
            probe: "api".into(),
            max_error_rate: 0.5,
            window: Duration::from_secs(2),
        };
        let strict = ProbeStopCondition {
            max_error_rate: 0.0,
            ..half.clone()
        };
        // One sample every 500ms from 0 to 4500; failures from 3000 on.
        let failing_late: Vec<ProbeSample> =
            (0..10).map(|i| sample(i * 500, i * 500 < 3000)).collect();
        type Case<'a> = (
            &'a str,
            &'a [ProbeSample],
            &'a ProbeStopCondition,
            i64,
            Option<&'a str>,
        );
        let cases: Vec<Case> = vec![
            ("no samples", &[], &half, 10_000, None),
            (
                "window before the failures",
                &failing_late,
                &half,
                2500,
                None,
            ),
            (
                "two of five failed is within 50%",
                &failing_late,
                &half,
                3500,
                None,
            ),
            (
                "more than half failed",
                &failing_late,
                &half,
                4500,
                Some(
                    "stop condition on probe api: error rate 80% > 50% over the last 2s \
                     (4 of 5 samples failed)",
                ),
            ),
            (
                "strict fires on one failure",
                &failing_late,
                &strict,
                3000,
                Some(
                    "stop condition on probe api: error rate 20% > 0% over the last 2s \
                     (1 of 5 samples failed)",
                ),
            ),
            (
                "old samples outside the window",
                &failing_late,
                &half,
                20_000,
                None,
            ),
        ];
        for (name, samples, condition, now, expected) in cases {
            assert_eq!(
                stop_condition_fired(samples, condition, now).as_deref(),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn baseline_table() {
        let all_ok: Vec<ProbeSample> = (0..4).map(|i| sample(i * 500, true)).collect();
        let one_bad: Vec<ProbeSample> = (0..4).map(|i| sample(i * 500, i != 2)).collect();
        let window = Window::new(0, 2000);
        type Case<'a> = (&'a str, &'a [ProbeSample], f64, Result<(), &'a str>);
        let cases: Vec<Case> = vec![
            ("no samples", &[], 0.0, Err("no samples")),
            ("all ok", &all_ok, 0.0, Ok(())),
            (
                "one failure, none allowed",
                &one_bad,
                0.0,
                Err("error rate 25% > 0% (1 of 4 samples failed; latest: refused at 1000)"),
            ),
            ("one failure within tolerance", &one_bad, 0.25, Ok(())),
        ];
        for (name, samples, max, expected) in cases {
            let (stats, verdict) = baseline_verdict(samples, window, max);
            assert_eq!(verdict, expected.map_err(String::from), "{name}");
            assert_eq!(stats.count, samples.len(), "{name}");
        }
    }
}
