//! Table tests of the plan language beyond faults: stage `when`, hypothesis tolerances,
//! variables, includes and `load`, each error checked for its file, line, column and field.

use std::collections::HashMap;
use std::time::Duration;

use super::tests::doc;
use super::*;

/// 1-based line of the first line of `yaml` containing `needle`.
fn line_of(yaml: &str, needle: &str) -> u32 {
    let index = yaml
        .lines()
        .position(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in\n{yaml}"));
    u32::try_from(index + 1).unwrap()
}

/// 1-based column of `needle` on the line `line_of(yaml, needle)`.
fn column_of(yaml: &str, needle: &str) -> u32 {
    let line = yaml.lines().find(|line| line.contains(needle)).unwrap();
    u32::try_from(line[..line.find(needle).unwrap()].chars().count() + 1).unwrap()
}

/// `(line, field)` of every error.
fn located(errors: &[PlanError]) -> Vec<(u32, String)> {
    errors.iter().map(|e| (e.line, e.field.clone())).collect()
}

const PROBES: &[&str] = &[
    "steady_state:",
    "  probes:",
    "    - { name: api, kind: tcp, address: \"127.0.0.1:8080\", interval: 200ms }",
];

/// Two stages; the second carries `when` (lines indented by 4, from line `first_when_line`).
fn cascade(with_probes: bool, when: &[&str]) -> String {
    let mut lines: Vec<String> = vec!["apiVersion: faultline/v1".into(), "title: t".into()];
    if with_probes {
        lines.extend(PROBES.iter().map(|l| l.to_string()));
    }
    lines.extend(
        [
            "stages:",
            "  - name: first",
            "    faults:",
            "      - { kind: container-pause, agent: agent-1, target: { container: db }, duration: 1s }",
            "  - name: second",
            "    after: 1s",
        ]
        .iter()
        .map(|l| l.to_string()),
    );
    lines.extend(when.iter().map(|l| format!("    {l}")));
    lines.extend(
        [
            "    faults:",
            "      - { kind: container-pause, agent: agent-2, target: { container: db }, duration: 1s }",
        ]
        .iter()
        .map(|l| l.to_string()),
    );
    doc(&lines.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn when_parses_into_a_trigger() {
    let plan = parse_plan(&cascade(
        true,
        &["when: { probe: api, metric: p95, above: 500ms, window: 5s }"],
    ))
    .unwrap();
    assert_eq!(plan.stages[0].when, None);
    assert_eq!(
        plan.stages[1].when,
        Some(StageTrigger {
            condition: TriggerCondition::Probe(Condition {
                probe: "api".into(),
                metric: Metric::P95,
                comparison: Comparison::Above,
                threshold: 500.0,
                window: Duration::from_secs(5),
            }),
            timeout: DEFAULT_WHEN_TIMEOUT,
        })
    );

    let plan = parse_plan(&cascade(
        true,
        &[
            "when:",
            "  probe: api",
            "  metric: error_rate",
            "  below: 12.5%",
            "  window: 250ms",
            "  timeout: 1h",
        ],
    ))
    .unwrap();
    let when = plan.stages[1].when.as_ref().unwrap();
    let TriggerCondition::Probe(condition) = &when.condition else {
        panic!("a probe condition: {when:?}");
    };
    assert_eq!(condition.metric, Metric::ErrorRate);
    assert_eq!(condition.comparison, Comparison::Below);
    assert_eq!(condition.threshold, 0.125);
    assert_eq!(when.timeout, Duration::from_secs(3600));
    assert_eq!(
        when.condition.describe(),
        "api error rate below 12.5% over the last 250ms"
    );

    let value = parse_plan(&cascade(
        true,
        &["when: { probe: api, metric: value, above: -1.5, window: 1s, timeout: 1s }"],
    ))
    .unwrap();
    let TriggerCondition::Probe(condition) = &value.stages[1].when.as_ref().unwrap().condition
    else {
        panic!("a probe condition");
    };
    assert_eq!(condition.threshold, -1.5);
}

#[test]
fn telemetry_conditions_parse_without_probes() {
    // No steady_state at all: telemetry needs no probes.
    let yaml = cascade(
        false,
        &[
            "when:",
            "  telemetry: \"runq_latency_p95{target=db,agent=agent-1} > 5ms\"",
            "  window: 3s",
            "  timeout: 1m",
        ],
    );
    let yaml = format!(
        "{yaml}stop_conditions:\n  - {{ telemetry: \"tcp_retransmits_per_s{{target=db}} > 50\", window: 5s }}\n"
    );
    let plan = parse_plan(&yaml).unwrap_or_else(|e| panic!("{}", render_errors("p", &e)));
    let when = plan.stages[1].when.as_ref().unwrap();
    assert_eq!(
        when.condition,
        TriggerCondition::Telemetry(TelemetryCondition {
            metric: TelemetryMetric::RunqLatencyP95,
            target: Some("db".into()),
            agent: Some("agent-1".into()),
            comparison: Comparison::Above,
            threshold: 5000.0,
            window: Duration::from_secs(3),
        })
    );
    assert_eq!(when.timeout, Duration::from_secs(60));
    assert_eq!(
        plan.stop_conditions,
        vec![StopCondition::Telemetry(TelemetryCondition {
            metric: TelemetryMetric::TcpRetransmitsPerS,
            target: Some("db".into()),
            agent: None,
            comparison: Comparison::Above,
            threshold: 50.0,
            window: Duration::from_secs(5),
        })]
    );
}

#[test]
fn telemetry_condition_rules_report_the_right_field_and_line() {
    type Case = (
        &'static str,
        Vec<&'static str>,
        &'static str,
        Vec<(&'static str, &'static str)>,
    );
    // (name, `when` lines, stop_conditions item, expected (text on its line, field)).
    let cases: Vec<Case> = vec![
        (
            "unknown target",
            vec!["when: { telemetry: \"oom_kills{target=web} > 0\", window: 2s }"],
            "",
            vec![("when:", "stages[1].when.telemetry")],
        ),
        (
            "target on another agent",
            vec!["when: { telemetry: \"oom_kills{target=db,agent=agent-3} > 0\", window: 2s }"],
            "",
            vec![("when:", "stages[1].when.telemetry")],
        ),
        (
            "probe keys beside telemetry",
            vec!["when: { telemetry: \"oom_kills > 0\", probe: api, above: 1, window: 2s }"],
            "",
            vec![
                ("when:", "stages[1].when.probe"),
                ("when:", "stages[1].when.above"),
            ],
        ),
        (
            "bad expression and no window",
            vec!["when: { telemetry: \"oom_kills >= 1\" }"],
            "",
            vec![
                ("when:", "stages[1].when.window"),
                ("when:", "stages[1].when.telemetry"),
            ],
        ),
        (
            "stop condition without window, with an error rate",
            vec![],
            "{ telemetry: \"tcp_resets_per_s > 1\", max_error_rate: 5% }",
            vec![
                ("max_error_rate", "stop_conditions[0].window"),
                ("max_error_rate", "stop_conditions[0].max_error_rate"),
            ],
        ),
        (
            "stop condition on an agent without faults",
            vec![],
            "{ telemetry: \"tcp_resets_per_s{agent=agent-9} > 1\", window: 1s }",
            vec![("agent-9", "stop_conditions[0].telemetry")],
        ),
    ];
    for (name, when, stop, expected) in cases {
        let mut yaml = cascade(false, &when);
        if !stop.is_empty() {
            yaml.push_str(&format!("stop_conditions:\n  - {stop}\n"));
        }
        let errors = match parse_plan(&yaml) {
            Ok(plan) => panic!("{name}: expected errors, got {plan:#?}"),
            Err(errors) => errors,
        };
        let expected: Vec<(u32, String)> = expected
            .iter()
            .map(|(text, field)| (line_of(&yaml, text), field.to_string()))
            .collect();
        assert_eq!(
            located(&errors),
            expected,
            "{name}\n{}",
            render_errors("plan.yaml", &errors)
        );
    }
    // The message lists the targets that telemetry covers.
    let yaml = cascade(
        false,
        &["when: { telemetry: \"oom_kills{target=web} > 0\", window: 2s }"],
    );
    let errors = parse_plan(&yaml).unwrap_err();
    assert!(errors[0].message.contains("(those are: db)"), "{errors:?}");
    // A pattern selector is named by a container name it matches.
    let pattern = cascade(
        false,
        &["when: { telemetry: \"oom_kills{target=db-7} > 0\", window: 2s }"],
    )
    .replace(
        "target: { container: db }, duration: 1s }\n  - name: second",
        "target: { container: \"re:db-[0-9]+\" }, duration: 1s }\n  - name: second",
    );
    assert!(pattern.contains("re:db-"), "{pattern}");
    parse_plan(&pattern).unwrap_or_else(|e| panic!("{}", render_errors("p", &e)));
}

#[test]
fn when_rules_report_the_right_field_and_line() {
    type Case = (
        &'static str,
        bool,
        Vec<&'static str>,
        Vec<(&'static str, &'static str)>,
    );
    // Each expected error: (text on its line, field).
    let cases: Vec<Case> = vec![
        (
            "unknown probe",
            true,
            vec![
                "when:",
                "  probe: db",
                "  metric: p95",
                "  above: 1s",
                "  window: 5s",
            ],
            vec![("probe: db", "stages[1].when.probe")],
        ),
        (
            "when without steady_state",
            false,
            vec!["when: { probe: api, metric: p95, above: 1s, window: 5s }"],
            vec![("when:", "stages[1].when.probe")],
        ),
        (
            "missing metric and window",
            true,
            vec!["when: { probe: api, above: 1s }"],
            vec![
                ("when:", "stages[1].when.metric"),
                ("when:", "stages[1].when.window"),
            ],
        ),
        (
            "no threshold",
            true,
            vec!["when: { probe: api, metric: p50, window: 5s }"],
            vec![("when:", "stages[1].when.above")],
        ),
        (
            "two thresholds",
            true,
            vec![
                "when:",
                "  probe: api",
                "  metric: p50",
                "  above: 1s",
                "  below: 2s",
                "  window: 5s",
            ],
            vec![("below: 2s", "stages[1].when.below")],
        ),
        (
            "unknown metric",
            true,
            vec![
                "when:",
                "  probe: api",
                "  metric: p90",
                "  above: 1s",
                "  window: 5s",
            ],
            vec![("metric: p90", "stages[1].when.metric")],
        ),
        (
            "a percentage for a latency",
            true,
            vec![
                "when:",
                "  probe: api",
                "  metric: p95",
                "  above: 5%",
                "  window: 5s",
            ],
            vec![("above: 5%", "stages[1].when.above")],
        ),
        (
            "a duration for an error rate",
            true,
            vec![
                "when:",
                "  probe: api",
                "  metric: error_rate",
                "  above: 1s",
                "  window: 5s",
            ],
            vec![("above: 1s", "stages[1].when.above")],
        ),
        (
            "timeout too long and window too short",
            true,
            vec![
                "when:",
                "  probe: api",
                "  metric: p95",
                "  above: 1s",
                "  window: 100ms",
                "  timeout: 2h",
            ],
            vec![
                ("window: 100ms", "stages[1].when.window"),
                ("timeout: 2h", "stages[1].when.timeout"),
            ],
        ),
        (
            "timeout too short",
            true,
            vec!["when: { probe: api, metric: p95, above: 1s, window: 1s, timeout: 500ms }"],
            vec![("when:", "stages[1].when.timeout")],
        ),
        (
            "unknown field",
            true,
            vec!["when: { probe: api, metric: p95, above: 1s, window: 1s, every: 1s }"],
            vec![("when:", "stages[1].when.every")],
        ),
    ];
    for (name, with_probes, when, expected) in cases {
        let yaml = cascade(with_probes, &when);
        let errors = match parse_plan(&yaml) {
            Ok(plan) => panic!("{name}: expected errors, got {plan:#?}"),
            Err(errors) => errors,
        };
        let expected: Vec<(u32, String)> = expected
            .iter()
            .map(|(text, field)| (line_of(&yaml, text), field.to_string()))
            .collect();
        assert_eq!(
            located(&errors),
            expected,
            "{name}\n{}",
            render_errors("plan.yaml", &errors)
        );
        assert!(errors.iter().all(|e| e.column > 0), "{name}: {errors:?}");
    }
    // The unknown probe is located at its value, and the message lists the known ones.
    let yaml = cascade(
        true,
        &[
            "when:",
            "  probe: db",
            "  metric: p95",
            "  above: 1s",
            "  window: 5s",
        ],
    );
    let errors = parse_plan(&yaml).unwrap_err();
    assert_eq!(errors[0].column, column_of(&yaml, "probe: db") + 7);
    assert!(errors[0].message.contains("those are: api"), "{errors:?}");
}

/// A plan with the probe `api` and `hypothesis` lines from line 6 on.
fn with_hypothesis(hypothesis: &[&str], with_probes: bool) -> String {
    let mut lines: Vec<&str> = vec!["apiVersion: faultline/v1", "title: t"];
    if with_probes {
        lines.extend_from_slice(PROBES);
    }
    lines.extend_from_slice(hypothesis);
    lines.extend_from_slice(&[
        "stages:",
        "  - name: s",
        "    faults:",
        "      - { kind: container-pause, agent: agent-1, target: { container: db }, duration: 1s }",
    ]);
    doc(&lines)
}

#[test]
fn hypotheses_are_text_or_text_with_tolerances() {
    let plain = parse_plan(&with_hypothesis(
        &["hypothesis: the API keeps answering"],
        false,
    ))
    .unwrap();
    assert_eq!(plain.hypothesis.as_deref(), Some("the API keeps answering"));
    assert!(plain.tolerances.is_empty());

    let detailed = parse_plan(&with_hypothesis(
        &[
            "hypothesis:",
            "  text: The API stays within its SLO.",
            "  tolerances:",
            "    - { probe: api, max_error_rate: 5%, max_p95: 300ms }",
            "    - probe: api",
            "      max_p99: 1s",
            "      min_value: 0",
        ],
        true,
    ))
    .unwrap();
    assert_eq!(
        detailed.hypothesis.as_deref(),
        Some("The API stays within its SLO.")
    );
    let described: Vec<String> = detailed
        .tolerances
        .iter()
        .map(Tolerance::describe)
        .collect();
    assert_eq!(
        described,
        [
            "api error rate at most 5%",
            "api p95 latency at most 300ms",
            "api p99 latency at most 1000ms",
            "api mean value at least 0",
        ]
    );
    assert_eq!(detailed.tolerances[0].limit, Limit::AtMost(0.05));

    let no_tolerances =
        parse_plan(&with_hypothesis(&["hypothesis: { text: fine }"], false)).unwrap();
    assert_eq!(no_tolerances.hypothesis.as_deref(), Some("fine"));
}

#[test]
fn tolerance_rules_report_the_right_field_and_line() {
    type Case = (
        &'static str,
        bool,
        Vec<&'static str>,
        Vec<(&'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        (
            "no text",
            true,
            vec!["hypothesis:", "  tolerances: []"],
            vec![("tolerances: []", "hypothesis.text")],
        ),
        (
            "blank text",
            true,
            vec!["hypothesis: { text: '  ' }"],
            vec![("hypothesis:", "hypothesis.text")],
        ),
        (
            "unknown probe",
            true,
            vec![
                "hypothesis:",
                "  text: t",
                "  tolerances:",
                "    - { probe: db, max_p95: 1s }",
            ],
            vec![("probe: db", "hypothesis.tolerances[0].probe")],
        ),
        (
            "tolerances without steady_state",
            false,
            vec![
                "hypothesis:",
                "  text: t",
                "  tolerances:",
                "    - { probe: api, max_p95: 1s }",
            ],
            vec![("probe: api", "hypothesis.tolerances[0].probe")],
        ),
        (
            "no limit",
            true,
            vec![
                "hypothesis:",
                "  text: t",
                "  tolerances:",
                "    - { probe: api }",
            ],
            vec![("probe: api }", "hypothesis.tolerances[0].max_error_rate")],
        ),
        (
            "bad limits",
            true,
            vec![
                "hypothesis:",
                "  text: t",
                "  tolerances:",
                "    - probe: api",
                "      max_p95: 5%",
                "      max_error_rate: 120%",
            ],
            vec![
                ("max_p95: 5%", "hypothesis.tolerances[0].max_p95"),
                (
                    "max_error_rate: 120%",
                    "hypothesis.tolerances[0].max_error_rate",
                ),
            ],
        ),
        (
            "unknown tolerance key",
            true,
            vec![
                "hypothesis:",
                "  text: t",
                "  tolerances:",
                "    - { probe: api, max_p90: 1s }",
            ],
            vec![("max_p90", "hypothesis.tolerances[0].max_p90")],
        ),
        (
            "a list is no hypothesis",
            true,
            vec!["hypothesis: [a, b]"],
            vec![("hypothesis:", "hypothesis")],
        ),
    ];
    for (name, with_probes, hypothesis, expected) in cases {
        let yaml = with_hypothesis(&hypothesis, with_probes);
        let errors = match parse_plan(&yaml) {
            Ok(plan) => panic!("{name}: expected errors, got {plan:#?}"),
            Err(errors) => errors,
        };
        let expected: Vec<(u32, String)> = expected
            .iter()
            .map(|(text, field)| (line_of(&yaml, text), field.to_string()))
            .collect();
        assert_eq!(
            located(&errors),
            expected,
            "{name}\n{}",
            render_errors("plan.yaml", &errors)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Variables.
// ---------------------------------------------------------------------------------------------

const VARS_PLAN: &[&str] = &[
    "apiVersion: faultline/v1",
    "title: Pause ${TARGET} on ${AGENT}",
    "description: costs $${not a variable}",
    "vars:",
    "  AGENT: agent-1",
    "  TARGET: db",
    "  HOLD: 3s",
    "# ${COMMENTS} are left alone",
    "stages:",
    "  - name: s",
    "    faults:",
    "      - { kind: container-pause, agent: \"${AGENT}\", target: { container: ${TARGET} }, duration: ${HOLD} }",
];

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with_vars(yaml: &str, pairs: &[(&str, &str)]) -> Result<ExpandedPlan, Vec<PlanError>> {
    let values = vars(pairs);
    parse_plan_with(
        yaml,
        &PlanInputs {
            vars: &values,
            include: None,
        },
    )
}

#[test]
fn variables_take_their_defaults_or_the_given_values() {
    let yaml = doc(VARS_PLAN);
    let plan = parse_plan(&yaml).unwrap();
    assert_eq!(plan.title, "Pause db on agent-1");
    assert_eq!(plan.description.as_deref(), Some("costs ${not a variable}"));
    let fault = &plan.stages[0].faults[0];
    assert_eq!(fault.agent, "agent-1");
    assert_eq!(fault.spec.duration, Duration::from_secs(3));

    let expanded = with_vars(&yaml, &[("AGENT", "agent-3"), ("HOLD", "1m")]).unwrap();
    assert_eq!(expanded.plan.title, "Pause db on agent-3");
    assert_eq!(expanded.plan.stages[0].faults[0].agent, "agent-3");
    assert_eq!(
        expanded.plan.stages[0].faults[0].spec.duration,
        Duration::from_secs(60)
    );
    // The text to send reads as the same plan without any input, literal `${` included.
    assert_eq!(parse_plan(&expanded.text).unwrap(), expanded.plan);
    assert_eq!(
        expanded.text.lines().count(),
        yaml.lines().count(),
        "{}",
        expanded.text
    );

    // A value holding `${` is inserted literally, and survives the round trip.
    let titled = doc(&[
        "apiVersion: faultline/v1",
        "title: ${T}{x}",
        "vars: { T: \"a$ ${b}\" }",
    ]);
    let titled = doc(&[
        &titled,
        "stages: [{ name: s, faults: [{ kind: container-pause, agent: a, target: { container: db }, duration: 1s }] }]",
    ]);
    let error = parse_plan(&titled).unwrap_err();
    assert_eq!(located(&error), [(3, "vars.T".to_string())], "{error:?}");
    let expanded = with_vars(
        &titled.replace("vars: { T: \"a$ ${b}\" }", "vars: { T: x }"),
        &[("T", "a$ ${b}$")],
    )
    .unwrap();
    assert_eq!(expanded.plan.title, "a$ ${b}${x}");
    assert_eq!(
        parse_plan(&expanded.text).unwrap().title,
        expanded.plan.title
    );
}

#[test]
fn variable_errors_are_located_where_they_are_written() {
    // An unknown variable: at its `${`.
    let yaml = doc(VARS_PLAN).replace("duration: ${HOLD}", "duration: ${HOLDS}");
    let errors = parse_plan(&yaml).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].line, errors[0].column),
        (line_of(&yaml, "${HOLDS}"), column_of(&yaml, "${HOLDS}"))
    );
    assert!(
        errors[0].message.contains("unknown variable ${HOLDS}"),
        "{errors:?}"
    );
    assert!(
        errors[0].message.contains("--var HOLDS=VALUE"),
        "{errors:?}"
    );

    // A bad value: at the `${` it came from.
    let errors = with_vars(&doc(VARS_PLAN), &[("HOLD", "3x")]).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let yaml = doc(VARS_PLAN);
    assert_eq!(
        (errors[0].line, errors[0].column, errors[0].field.as_str()),
        (
            line_of(&yaml, "${HOLD}"),
            column_of(&yaml, "${HOLD}"),
            "stages[0].faults[0].duration"
        )
    );

    // A later error on a substituted line: at its column as written.
    let yaml = doc(VARS_PLAN).replace("duration: ${HOLD} }", "duration: ${HOLD}, bogus: 1 }");
    let errors = with_vars(&yaml, &[("TARGET", "a-much-longer-container-name")]).unwrap_err();
    assert_eq!(
        (errors[0].line, errors[0].column, errors[0].field.as_str()),
        (
            line_of(&yaml, "bogus"),
            column_of(&yaml, "bogus"),
            "stages[0].faults[0].bogus"
        ),
        "{errors:?}"
    );

    // Bad references, bad declarations, bad and unused overrides.
    let yaml = doc(VARS_PLAN).replace("title: Pause ${TARGET}", "title: Pause ${TAR GET}");
    let errors = parse_plan(&yaml).unwrap_err();
    assert_eq!((errors[0].line, errors[0].column), (2, 14), "{errors:?}");
    assert!(errors[0].message.contains("$${"), "{errors:?}");

    let yaml = doc(VARS_PLAN).replace("  HOLD: 3s", "  HOLD: |\n    3s\n    4s");
    let errors = parse_plan(&yaml).unwrap_err();
    // At the block scalar's first line.
    assert_eq!(
        located(&errors),
        [(8, "vars.HOLD".to_string())],
        "{errors:?}"
    );

    let errors = with_vars(&doc(VARS_PLAN), &[("NOT_USED", "1"), ("bad-name", "x")]).unwrap_err();
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].starts_with("--var bad-name: is not a valid"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("--var NOT_USED: the plan neither declares"),
        "{messages:?}"
    );
    assert_eq!(errors[0].line, 0);

    let errors = with_vars(&doc(VARS_PLAN), &[("HOLD", "1s\n2s")]).unwrap_err();
    assert!(errors[0].message.contains("single line"), "{errors:?}");

    // A variable only given with --var is fine; one the plan uses but nobody gives is not.
    let yaml = doc(VARS_PLAN).replace("${HOLD}", "${EXTRA}");
    assert!(with_vars(&yaml, &[("EXTRA", "2s")]).is_ok());
    assert!(parse_plan(&yaml).is_err());
}

// ---------------------------------------------------------------------------------------------
// Includes.
// ---------------------------------------------------------------------------------------------

/// A plan whose probe list holds `items` (indented as list items under `probes:`).
fn including(items: &[&str]) -> String {
    let mut lines: Vec<String> = vec![
        "apiVersion: faultline/v1".into(),
        "title: t".into(),
        "vars: { HOST: 10.0.0.7 }".into(),
        "steady_state:".into(),
        "  probes:".into(),
    ];
    lines.extend(items.iter().map(|item| format!("    {item}")));
    lines.extend(
        [
            "  baseline: 1s",
            "stages:",
            "  - name: s",
            "    faults:",
            "      - { kind: container-pause, agent: agent-1, target: { container: db }, duration: 1s }",
        ]
        .iter()
        .map(|l| l.to_string()),
    );
    doc(&lines.iter().map(String::as_str).collect::<Vec<_>>())
}

fn files() -> HashMap<&'static str, &'static str> {
    [
        (
            "probes/api.yaml",
            "# shared probes\n\
             - { name: api, kind: tcp, address: \"${HOST}:8080\" }\n\
             - name: web\n  kind: http\n  url: http://${HOST}/health\n\
             \n\
             - include: db.yaml\n",
        ),
        ("probes/db.yaml", "---\n- { name: db, kind: tcp, address: \"db:5432\" }\n"),
        (
            "probes/bad.yaml",
            "- { name: ok, kind: tcp, address: \"x:1\" }\n- { name: broken, kind: tcp, url: \"http://x\" }\n",
        ),
        ("probes/unknown-var.yaml", "- { name: v, kind: tcp, address: \"${NOPE}:1\" }\n"),
        ("probes/not-a-list.yaml", "name: api\nkind: tcp\n"),
        ("probes/empty.yaml", "# nothing\n"),
        ("cycle/a.yaml", "- include: b.yaml\n"),
        ("cycle/b.yaml", "- { name: b, kind: tcp, address: \"b:1\" }\n- include: a.yaml\n"),
        ("deep/1.yaml", "- include: 2.yaml\n"),
        ("deep/2.yaml", "- include: 3.yaml\n"),
        ("deep/3.yaml", "- include: 4.yaml\n"),
        ("deep/4.yaml", "- include: 5.yaml\n"),
        ("deep/5.yaml", "- { name: deep, kind: tcp, address: \"d:1\" }\n"),
        ("deep/3b.yaml", "- include: 4b.yaml\n"),
        ("deep/4b.yaml", "- { name: deep, kind: tcp, address: \"d:1\" }\n"),
        ("shallow.yaml", "- include: deep/3b.yaml\n"),
    ]
    .into_iter()
    .collect()
}

fn with_files(yaml: &str) -> Result<ExpandedPlan, Vec<PlanError>> {
    let files = files();
    let read = |path: &str| -> Result<String, String> {
        files
            .get(path)
            .map(|text| text.to_string())
            .ok_or_else(|| "no such file".to_string())
    };
    parse_plan_with(
        yaml,
        &PlanInputs {
            vars: &[],
            include: Some(&read),
        },
    )
}

#[test]
fn includes_inline_probe_lists() {
    let yaml = including(&[
        "- include: probes/api.yaml",
        "- { name: local, kind: tcp, address: \"127.0.0.1:9\" }",
        "- { include: shallow.yaml }   # three levels deep",
    ]);
    let expanded = with_files(&yaml).unwrap();
    let steady = expanded.plan.steady_state.as_ref().unwrap();
    let names: Vec<&str> = steady.probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["api", "web", "db", "local", "deep"]);
    assert_eq!(
        steady.probes[0].kind,
        crate::probe::ProbeKind::tcp("10.0.0.7:8080")
    );
    assert_eq!(steady.baseline, Duration::from_secs(1));
    // The text to send has no include left and reads as the same plan.
    assert!(!expanded.text.contains("include"), "{}", expanded.text);
    assert_eq!(parse_plan(&expanded.text).unwrap(), expanded.plan);
}

#[test]
fn include_errors_name_the_file_line_and_column() {
    type Case = (
        &'static str,
        Vec<&'static str>,
        // (file, line, column, message fragment); line 0 = the line of `anchor` in the plan.
        (Option<&'static str>, u32, u32, &'static str),
    );
    let cases: Vec<Case> = vec![
        (
            "invalid probe in an included file",
            vec!["- include: probes/bad.yaml"],
            (Some("probes/bad.yaml"), 2, 3, "tcp probes do not take url"),
        ),
        (
            "unknown variable in an included file",
            vec!["- include: probes/unknown-var.yaml"],
            (
                Some("probes/unknown-var.yaml"),
                1,
                35,
                "unknown variable ${NOPE}",
            ),
        ),
        (
            "included file that is not a list",
            vec!["- include: probes/not-a-list.yaml"],
            (Some("probes/not-a-list.yaml"), 1, 1, "is a list of probes"),
        ),
        (
            "included file without probes",
            vec!["- include: probes/empty.yaml"],
            (None, 0, 7, "probes/empty.yaml holds no probes"),
        ),
        (
            "missing file",
            vec!["- include: probes/nope.yaml"],
            (None, 0, 7, "cannot include probes/nope.yaml: no such file"),
        ),
        (
            "cycle",
            vec!["- include: cycle/a.yaml"],
            (
                Some("cycle/b.yaml"),
                2,
                3,
                "include cycle: cycle/a.yaml -> cycle/b.yaml -> cycle/a.yaml",
            ),
        ),
        (
            "too deep",
            vec!["- include: deep/1.yaml"],
            (Some("deep/4.yaml"), 1, 3, "includes nest at most 4 deep"),
        ),
        (
            "absolute path",
            vec!["- include: /etc/faultline/probes.yaml"],
            (None, 0, 7, "absolute path"),
        ),
        (
            "escaping the plan directory",
            vec!["- include: ../probes.yaml"],
            (None, 0, 7, "leaves the plan's directory"),
        ),
        (
            "more than an include in the item",
            vec!["- { include: probes/api.yaml, name: api }"],
            (None, 0, 9, "alone on its line"),
        ),
        (
            "flow list",
            vec!["- [{ include: probes/api.yaml }]"],
            (None, 0, 7, ""),
        ),
    ];
    for (name, items, (file, line, column, fragment)) in cases {
        let yaml = including(&items);
        let errors = match with_files(&yaml) {
            Ok(plan) => panic!("{name}: expected errors, got {plan:#?}"),
            Err(errors) => errors,
        };
        let first = &errors[0];
        let line = if line == 0 {
            line_of(&yaml, "include")
        } else {
            line
        };
        assert_eq!(
            (first.file.as_deref(), first.line, first.column),
            (file, line, column),
            "{name}: {}",
            render_errors("plans/plan.yaml", &errors)
        );
        assert!(first.message.contains(fragment), "{name}: {errors:?}");
    }
    // Rendered next to the plan that includes them.
    let errors = with_files(&including(&["- include: probes/bad.yaml"])).unwrap_err();
    assert!(
        render_errors("plans/plan.yaml", &errors)
            .starts_with("plans/probes/bad.yaml:2:3: steady_state.probes[1]: probe \"broken\""),
        "{}",
        render_errors("plans/plan.yaml", &errors)
    );
    assert_eq!(
        errors[0].to_string(),
        format!(
            "probes/bad.yaml:2:3 steady_state.probes[1]: {}",
            errors[0].message
        )
    );
}

#[test]
fn includes_need_a_reader_and_a_probe_list() {
    // parse_plan (the coordinator's) reads no files.
    let yaml = including(&["- include: probes/api.yaml"]);
    let errors = parse_plan(&yaml).unwrap_err();
    assert_eq!(
        located(&errors),
        [(line_of(&yaml, "include"), String::new())]
    );
    assert!(
        errors[0].message.contains("faultline plan validate"),
        "{errors:?}"
    );

    // Anywhere but steady_state.probes.
    let yaml = doc(&[
        "apiVersion: faultline/v1",
        "title: t",
        "stages:",
        "  - include: probes/api.yaml",
    ]);
    let errors = with_files(&yaml).unwrap_err();
    assert_eq!(located(&errors), [(4, String::new())]);
    assert!(
        errors[0]
            .message
            .contains("only be an item of steady_state.probes")
    );

    // The compact list form (`-` under `probes:` at the same column) is a probe list too.
    let yaml = doc(&[
        "apiVersion: faultline/v1",
        "title: t",
        "steady_state:",
        "  probes:",
        "  - include: probes/db.yaml",
        "stages:",
        "  - name: s",
        "    faults:",
        "      - { kind: container-pause, agent: agent-1, target: { container: db }, duration: 1s }",
    ]);
    let plan = with_files(&yaml).unwrap().plan;
    assert_eq!(plan.steady_state.unwrap().probes[0].name, "db");
}

// ---------------------------------------------------------------------------------------------
// Load.
// ---------------------------------------------------------------------------------------------

fn with_load(load: &[&str]) -> String {
    let mut lines: Vec<&str> = vec![
        "apiVersion: faultline/v1",
        "title: t",
        "stages:",
        "  - name: s",
        "    faults:",
        "      - { kind: container-pause, agent: agent-1, target: { container: db }, duration: 1s }",
    ];
    lines.extend_from_slice(load);
    doc(&lines)
}

#[test]
fn load_parses_with_defaults_and_values() {
    let plan = parse_plan(&with_load(&[
        "load: { url: \"http://127.0.0.1:8080/\", rate: 50/s }",
    ]))
    .unwrap();
    assert_eq!(
        plan.load,
        Some(LoadSpec {
            url: "http://127.0.0.1:8080/".into(),
            method: "GET".into(),
            headers: Default::default(),
            body: None,
            rate: LoadRate {
                requests: 50,
                per: Duration::from_secs(1),
            },
            timeout: DEFAULT_LOAD_TIMEOUT,
            expect_status: crate::probe::StatusMatch::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        })
    );
    let plan = parse_plan(&with_load(&[
        "load:",
        "  url: https://shop.internal/checkout",
        "  rate: 600/m",
        "  method: post",
        "  headers: { Content-Type: application/json }",
        "  body: '{\"item\": 1}'",
        "  timeout: 500ms",
        "  expect_status: 2xx",
        "  max_in_flight: 8",
    ]))
    .unwrap();
    let load = plan.load.unwrap();
    assert_eq!(load.method, "POST");
    assert_eq!(load.rate.per_second(), 10.0);
    assert_eq!(load.headers["Content-Type"], "application/json");
    assert_eq!(load.body.as_deref(), Some("{\"item\": 1}"));
    assert_eq!(load.timeout, Duration::from_millis(500));
    assert!(load.expect_status.contains(204) && !load.expect_status.contains(301));
    assert_eq!(load.max_in_flight, 8);
}

#[test]
fn load_rules_report_the_right_field_and_line() {
    type Case = (
        &'static str,
        Vec<&'static str>,
        Vec<(&'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        (
            "missing url and rate",
            vec!["load: { method: GET }"],
            vec![("load:", "load.url"), ("load:", "load.rate")],
        ),
        (
            "bad rate",
            vec!["load:", "  url: http://x/", "  rate: 5000/s"],
            vec![("rate:", "load.rate")],
        ),
        (
            "bad url",
            vec!["load:", "  url: ftp://x/", "  rate: 1/s"],
            vec![("url:", "load.url")],
        ),
        (
            "bad method and cap",
            vec![
                "load:",
                "  url: http://x/",
                "  rate: 1/s",
                "  method: FETCH",
                "  max_in_flight: 0",
            ],
            vec![
                ("max_in_flight", "load.max_in_flight"),
                ("method:", "load.method"),
            ],
        ),
        (
            "bad status and timeout",
            vec![
                "load:",
                "  url: http://x/",
                "  rate: 1/s",
                "  timeout: 2m",
                "  expect_status: lots",
            ],
            vec![
                ("timeout:", "load.timeout"),
                ("expect_status:", "load.expect_status"),
            ],
        ),
        (
            "unknown field",
            vec!["load:", "  url: http://x/", "  rate: 1/s", "  duration: 1m"],
            vec![("duration: 1m", "load.duration")],
        ),
    ];
    for (name, load, expected) in cases {
        let yaml = with_load(&load);
        let errors = match parse_plan(&yaml) {
            Ok(plan) => panic!("{name}: expected errors, got {plan:#?}"),
            Err(errors) => errors,
        };
        let mut expected: Vec<(u32, String)> = expected
            .iter()
            .map(|(text, field)| (line_of(&yaml, text), field.to_string()))
            .collect();
        expected.sort_by_key(|(line, _)| *line);
        assert_eq!(
            located(&errors),
            expected,
            "{name}\n{}",
            render_errors("plan.yaml", &errors)
        );
    }
}

/// Three stages on `agents`/`containers`, the later ones with `overlap: true` where asked.
fn overlapping(stages: &[(&str, &str, bool)]) -> String {
    let mut yaml = String::from("apiVersion: faultline/v1\ntitle: t\nstages:\n");
    for (index, (agent, container, overlap)) in stages.iter().enumerate() {
        yaml.push_str(&format!("  - name: s{index}\n"));
        if *overlap {
            yaml.push_str("    overlap: true\n");
        }
        yaml.push_str(&format!(
            "    faults:\n      - {{ kind: container-pause, agent: {agent}, target: {{ container: {container} }}, duration: 5s }}\n"
        ));
    }
    yaml
}

#[test]
fn overlapping_stages_parse_and_may_not_share_a_target_in_force() {
    let plan = parse_plan(&overlapping(&[
        ("a1", "db", false),
        ("a2", "cache", true),
        ("a3", "api", true),
    ]))
    .unwrap();
    let overlaps: Vec<bool> = plan.stages.iter().map(|stage| stage.overlap).collect();
    assert_eq!(overlaps, vec![false, true, true]);

    // The same target is fine once the earlier fault is reverted (no overlap)...
    assert!(parse_plan(&overlapping(&[("a1", "db", false), ("a1", "db", false)])).is_ok());
    // ...but not while it is still in force, however far back the overlap chain goes.
    for stages in [
        vec![("a1", "db", false), ("a1", "db", true)],
        vec![("a1", "db", false), ("a2", "x", true), ("a1", "db", true)],
    ] {
        let yaml = overlapping(&stages);
        let errors = parse_plan(&yaml).unwrap_err();
        let last = stages.len() - 1;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, format!("stages[{last}].faults[0].target"));
        assert!(
            errors[0]
                .message
                .contains("still the target of stages[0].faults[0]")
        );
        let stage_line = line_of(&yaml, &format!("name: s{last}"));
        let fault_line = yaml
            .lines()
            .enumerate()
            .skip(stage_line as usize)
            .find(|(_, line)| line.contains("kind:"))
            .map(|(index, _)| index as u32 + 1)
            .unwrap();
        assert_eq!(errors[0].line, fault_line, "{errors:?}");
    }
    // A chain broken by a stage without overlap releases the earlier targets.
    assert!(
        parse_plan(&overlapping(&[
            ("a1", "db", false),
            ("a2", "x", false),
            ("a1", "db", true),
        ]))
        .is_ok()
    );
    // The first stage has nothing to overlap.
    let errors = parse_plan(&overlapping(&[("a1", "db", true)])).unwrap_err();
    assert_eq!(located(&errors), vec![(5, "stages[0].overlap".to_string())]);
}
