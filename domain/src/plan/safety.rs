//! A plan's safety settings, `blast_radius` and `protected`, and the coordinator's policy file,
//! which holds the same two keys and is read by the same code. What they mean at run time is
//! decided in [`crate::interlock`]; this module only reads and validates them.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::{Checker, PlanError, agent_name, child, given_keys, read_raw, units};
use crate::fault::TargetSelector;

/// Highest `max_targets` and `max_agents`: far above any fleet, low enough to stay readable.
pub const MAX_BLAST_LIMIT: u32 = 100_000;

/// How much one run may fault. `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct BlastRadius {
    /// Most distinct (agent, target) pairs faulted over the whole plan.
    pub max_targets: Option<u32>,
    /// Most distinct agents faulted over the whole plan.
    pub max_agents: Option<u32>,
    /// Most agents faulted, as a percentage (1..=100) of the agents connected at start.
    pub max_fleet_percent: Option<u8>,
}

impl BlastRadius {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Something a plan may never target: every target on an agent (`target` is `None`), one
/// target on every agent (`agent` is `None`), or one target on one agent. Never both `None`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Protected {
    pub agent: Option<String>,
    pub target: Option<TargetSelector>,
}

impl fmt::Display for Protected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.agent, &self.target) {
            (Some(agent), None) => write!(f, "agent {agent}"),
            (Some(agent), Some(target)) => write!(f, "{target} on agent {agent}"),
            (None, Some(target)) => write!(f, "{target} on every agent"),
            (None, None) => f.write_str("nothing"),
        }
    }
}

/// Safety settings: a plan's own, or the coordinator's (`--policy FILE`), which apply to every
/// run on top of the plan's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub blast_radius: BlastRadius,
    pub protected: Vec<Protected>,
}

impl Policy {
    /// True when the policy neither limits nor protects anything.
    pub fn is_empty(&self) -> bool {
        self.blast_radius.is_unlimited() && self.protected.is_empty()
    }
}

/// A one-line summary, for logs and the audit log.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limits = &self.blast_radius;
        let mut parts = Vec::new();
        if let Some(max) = limits.max_targets {
            parts.push(format!("max_targets {max}"));
        }
        if let Some(max) = limits.max_agents {
            parts.push(format!("max_agents {max}"));
        }
        if let Some(max) = limits.max_fleet_percent {
            parts.push(format!("max_fleet_percent {max}%"));
        }
        if !self.protected.is_empty() {
            let list: Vec<String> = self.protected.iter().map(ToString::to_string).collect();
            parts.push(format!("protected: {}", list.join(", ")));
        }
        if parts.is_empty() {
            f.write_str("no limits, nothing protected")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// Parses and validates a coordinator policy file: `blast_radius` and `protected`, both
/// optional, with the same rules as in a plan. An empty document is an empty policy.
pub fn parse_policy(yaml: &str) -> Result<Policy, Vec<PlanError>> {
    let Some(raw) = read_raw::<RawPolicy>(yaml).map_err(|error| vec![error])? else {
        return Ok(Policy::default());
    };
    let mut checker = Checker::default();
    let blast_radius = checker.blast_radius(raw.value.blast_radius.as_ref());
    let protected = checker.protections(raw.value.protected.as_ref());
    let policy = blast_radius
        .zip(protected)
        .map(|(blast_radius, protected)| Policy {
            blast_radius,
            protected,
        });
    checker.finish(policy, "the policy is invalid")
}

// ---------------------------------------------------------------------------------------------
// Raw, located values.
// ---------------------------------------------------------------------------------------------

/// The policy file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    blast_radius: Option<Spanned<RawBlastRadius>>,
    protected: Option<Spanned<Vec<Spanned<RawProtected>>>>,
}

/// `blast_radius:`; every key optional. Numbers are read as text, as in faults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBlastRadius {
    max_targets: Option<Spanned<String>>,
    max_agents: Option<Spanned<String>>,
    max_fleet_percent: Option<Spanned<String>>,
}

/// One item of `protected:`: `agent`, one target key, or both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProtected {
    agent: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
    id: Option<Spanned<String>>,
    label: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    pid: Option<Spanned<String>>,
    process: Option<Spanned<String>>,
}

impl RawProtected {
    fn target_keys(&self) -> Vec<(&'static str, &Spanned<String>)> {
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

// ---------------------------------------------------------------------------------------------
// Rules.
// ---------------------------------------------------------------------------------------------

impl Checker {
    /// `blast_radius:`; no limits when absent.
    pub(super) fn blast_radius(
        &mut self,
        raw: Option<&Spanned<RawBlastRadius>>,
    ) -> Option<BlastRadius> {
        let Some(raw) = raw else {
            return Some(BlastRadius::default());
        };
        let limits = &raw.value;
        let count = |name: &'static str| {
            move |text: &str| {
                units::whole(text, (1, u64::from(MAX_BLAST_LIMIT)))
                    .map(|n| u32::try_from(n).unwrap_or(MAX_BLAST_LIMIT))
                    .map_err(|message| format!("{name} {message}"))
            }
        };
        let max_targets = self.optional(
            &limits.max_targets,
            "blast_radius.max_targets",
            count("max_targets"),
        );
        let max_agents = self.optional(
            &limits.max_agents,
            "blast_radius.max_agents",
            count("max_agents"),
        );
        let max_fleet_percent = self.optional(
            &limits.max_fleet_percent,
            "blast_radius.max_fleet_percent",
            |text| {
                units::whole_percent(text).map_err(|message| format!("max_fleet_percent {message}"))
            },
        );
        Some(BlastRadius {
            max_targets: max_targets?,
            max_agents: max_agents?,
            max_fleet_percent: max_fleet_percent?,
        })
    }

    /// `protected:`; nothing protected when absent.
    pub(super) fn protections(
        &mut self,
        raw: Option<&Spanned<Vec<Spanned<RawProtected>>>>,
    ) -> Option<Vec<Protected>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let checked: Vec<Option<Protected>> = raw
            .value
            .iter()
            .enumerate()
            .map(|(index, item)| self.protection(item, &format!("protected[{index}]")))
            .collect();
        checked.into_iter().collect()
    }

    fn protection(&mut self, raw: &Spanned<RawProtected>, field: &str) -> Option<Protected> {
        let item = &raw.value;
        let agent = match &item.agent {
            None => Some(None),
            Some(agent) => self
                .parse_at(agent, &child(field, "agent"), agent_name)
                .map(Some),
        };
        let target = self.one_selector(item.target_keys(), field);
        if item.agent.is_none() && item.target_keys().is_empty() {
            let message = "a protection needs `agent`, one target key (`container`, `id`, \
                           `label`, `cgroup`, `pid` or `process`), or both";
            self.report(&raw.referenced, field, message);
            return None;
        }
        Some(Protected {
            agent: agent?,
            target: target?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{doc, one_fault};
    use super::super::{parse_plan, render_errors as render};
    use super::*;

    const FAULT: &[&str] = &[
        "kind: container-pause",
        "agent: agent-2",
        "target: { container: db }",
        "duration: 3s",
    ];

    /// Every `(line, field)` a document must produce.
    type Expected = &'static [(u32, &'static str)];

    /// A valid plan whose last lines are `extra` (the plan's fault ends on line 9).
    fn plan_with(extra: &[&str]) -> String {
        one_fault(FAULT) + &doc(extra)
    }

    #[test]
    fn safety_settings_parse_into_exactly_these_values() {
        let yaml = plan_with(&[
            "blast_radius:",
            "  max_targets: 3",
            "  max_agents: 2",
            "  max_fleet_percent: 50%",
            "protected:",
            "  - { agent: agent-1 }",
            "  - { agent: agent-2, container: postgres }",
            "  - { container: 're:^vault-' }",
            "  - { agent: agent-3, label: tier=db }",
            "  - { id: 0123456789ab }",
            "  - { agent: a, cgroup: /system.slice/sshd.service }",
            "  - { pid: 42 }",
            "  - { agent: a, process: sshd }",
        ]);
        let plan = parse_plan(&yaml).unwrap();
        assert_eq!(
            plan.blast_radius,
            BlastRadius {
                max_targets: Some(3),
                max_agents: Some(2),
                max_fleet_percent: Some(50),
            }
        );
        let on = |agent: Option<&str>, target: Option<TargetSelector>| Protected {
            agent: agent.map(str::to_string),
            target,
        };
        assert_eq!(
            plan.protected,
            vec![
                on(Some("agent-1"), None),
                on(
                    Some("agent-2"),
                    Some(TargetSelector::Container("postgres".into()))
                ),
                on(None, Some(TargetSelector::ContainerRegex("^vault-".into()))),
                on(
                    Some("agent-3"),
                    Some(TargetSelector::Label("tier=db".into()))
                ),
                on(
                    None,
                    Some(TargetSelector::ContainerId("0123456789ab".into()))
                ),
                on(
                    Some("a"),
                    Some(TargetSelector::Cgroup("system.slice/sshd.service".into()))
                ),
                on(None, Some(TargetSelector::Pid(42))),
                on(Some("a"), Some(TargetSelector::ProcessName("sshd".into()))),
            ]
        );
        assert_eq!(plan.policy().protected.len(), 8);
        let shown: Vec<String> = plan.protected[..3].iter().map(|p| p.to_string()).collect();
        assert_eq!(
            shown,
            [
                "agent agent-1",
                "container postgres on agent agent-2",
                "container matching re:^vault- on every agent"
            ]
        );
    }

    #[test]
    fn absent_or_empty_settings_limit_nothing() {
        for extra in [
            &[][..],
            &["blast_radius: {}", "protected: []"],
            &["blast_radius:", "protected:"],
        ] {
            let plan = parse_plan(&plan_with(extra)).unwrap();
            assert!(plan.blast_radius.is_unlimited(), "{extra:?}");
            assert!(plan.protected.is_empty(), "{extra:?}");
            assert!(plan.policy().is_empty());
        }
    }

    #[test]
    fn boundary_limits_are_accepted() {
        let plan = parse_plan(&plan_with(&[
            "blast_radius: { max_targets: 1, max_agents: 100000, max_fleet_percent: 100 }",
        ]))
        .unwrap();
        assert_eq!(plan.blast_radius.max_targets, Some(1));
        assert_eq!(plan.blast_radius.max_agents, Some(MAX_BLAST_LIMIT));
        assert_eq!(plan.blast_radius.max_fleet_percent, Some(100));
        let plan = parse_plan(&plan_with(&["blast_radius: { max_fleet_percent: '1%' }"])).unwrap();
        assert_eq!(plan.blast_radius.max_fleet_percent, Some(1));
    }

    /// Every rule: the lines after the plan's fault (which start on line 10), every
    /// `(line, field)` expected, and a fragment of the first message.
    #[test]
    fn every_safety_rule_reports_the_right_field_and_line() {
        // Name, extra lines, every (line, field) expected, a fragment of the first message.
        type Case = (
            &'static str,
            &'static [&'static str],
            Expected,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                "zero targets",
                &["blast_radius:", "  max_targets: 0"],
                &[(11, "blast_radius.max_targets")],
                "max_targets must be between 1 and 100000, got 0",
            ),
            (
                "too many agents",
                &["blast_radius:", "  max_agents: 100001"],
                &[(11, "blast_radius.max_agents")],
                "max_agents must be between 1 and 100000",
            ),
            (
                "fractional agents",
                &["blast_radius:", "  max_agents: 1.5"],
                &[(11, "blast_radius.max_agents")],
                "whole number",
            ),
            (
                "fleet share over 100%",
                &["blast_radius:", "  max_fleet_percent: 101"],
                &[(11, "blast_radius.max_fleet_percent")],
                "max_fleet_percent must be between 1% and 100%",
            ),
            (
                "fleet share of zero",
                &["blast_radius:", "  max_fleet_percent: 0%"],
                &[(11, "blast_radius.max_fleet_percent")],
                "between 1% and 100%",
            ),
            (
                "every bad limit at once",
                &[
                    "blast_radius:",
                    "  max_targets: many",
                    "  max_agents: -1",
                    "  max_fleet_percent: 12.5",
                ],
                &[
                    (11, "blast_radius.max_targets"),
                    (12, "blast_radius.max_agents"),
                    (13, "blast_radius.max_fleet_percent"),
                ],
                "max_targets must be a whole number",
            ),
            (
                "misspelt limit",
                &["blast_radius:", "  max_agent: 2"],
                &[(11, "blast_radius.max_agent")],
                "unknown field `max_agent`",
            ),
            (
                "blast radius that is a number",
                &["blast_radius: 3"],
                &[(10, "blast_radius")],
                "expected a mapping",
            ),
            (
                "empty protection",
                &["protected:", "  - {}"],
                &[(11, "protected[0]")],
                "a protection needs `agent`, one target key",
            ),
            (
                "bad protected agent",
                &["protected:", "  - { agent: agent 1 }"],
                &[(11, "protected[0].agent")],
                "invalid agent name \"agent 1\"",
            ),
            (
                "two target keys",
                &[
                    "protected:",
                    "  - { agent: a, container: db, label: app=db }",
                ],
                &[(11, "protected[0].label")],
                "give `container` or `label`, not both",
            ),
            (
                "bad protected container",
                &["protected:", "  - { agent: a, container: /db }"],
                &[(11, "protected[0].container")],
                "invalid container name \"/db\"",
            ),
            (
                "bad protected regex",
                &["protected:", "  - { container: 're:(' }"],
                &[(11, "protected[0].container")],
                "invalid regular expression",
            ),
            (
                "protected pid 1",
                &["protected:", "  - { agent: a }", "  - { pid: 1 }"],
                &[(12, "protected[1].pid")],
                "pid 1 is the host's init process",
            ),
            (
                "misspelt protection key",
                &["protected:", "  - { agnet: a }"],
                &[(11, "protected[0].agnet")],
                "unknown field `agnet`",
            ),
            (
                "protected that is a mapping",
                &["protected: { agent: a }"],
                &[(10, "protected")],
                "expected a list",
            ),
        ];
        for (name, extra, expected, fragment) in cases {
            let yaml = plan_with(extra);
            let errors = parse_plan(&yaml).unwrap_err();
            let found: Vec<(u32, &str)> =
                errors.iter().map(|e| (e.line, e.field.as_str())).collect();
            assert_eq!(&found, expected, "{name}: {errors:#?}");
            assert!(
                errors[0].message.contains(fragment),
                "{name}: {:?} lacks {fragment:?}",
                errors[0].message
            );
            assert!(errors.iter().all(|e| e.column > 0), "{name}: {errors:?}");
        }
    }

    #[test]
    fn safety_errors_are_reported_with_the_plan_s_other_errors() {
        let yaml = one_fault(&[
            "kind: container-pause",
            "agent: agent-2",
            "target: { container: db }",
            "duration: 0s",
        ]) + &doc(&["blast_radius: { max_agents: 0 }", "protected: [{}]"]);
        let found: Vec<(u32, String)> = parse_plan(&yaml)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.line, e.field))
            .collect();
        assert_eq!(
            found,
            vec![
                (9, "stages[0].faults[0].duration".to_string()),
                (10, "blast_radius.max_agents".to_string()),
                (11, "protected[0]".to_string()),
            ]
        );
    }

    #[test]
    fn the_shipped_safety_examples_parse() {
        let plan = parse_plan(include_str!("../../../examples/guarded-rollout.yaml"))
            .unwrap_or_else(|errors| panic!("{}", render("guarded-rollout.yaml", &errors)));
        assert_eq!(
            plan.blast_radius,
            BlastRadius {
                max_targets: Some(2),
                max_agents: Some(2),
                max_fleet_percent: Some(50),
            }
        );
        assert_eq!(plan.protected.len(), 3);
        let policy = parse_policy(include_str!("../../../examples/coordinator-policy.yaml"))
            .unwrap_or_else(|errors| panic!("{}", render("coordinator-policy.yaml", &errors)));
        assert_eq!(policy.blast_radius.max_agents, Some(3));
        assert_eq!(policy.protected.len(), 3);
    }

    #[test]
    fn policy_files_use_the_same_keys_and_rules() {
        let policy = parse_policy(&doc(&[
            "# Applied to every run.",
            "blast_radius:",
            "  max_agents: 2",
            "protected:",
            "  - agent: agent-1",
            "  - { agent: agent-2, container: postgres }",
        ]))
        .unwrap();
        assert_eq!(policy.blast_radius.max_agents, Some(2));
        assert_eq!(policy.blast_radius.max_targets, None);
        assert_eq!(policy.protected.len(), 2);
        assert_eq!(
            policy.to_string(),
            "max_agents 2; protected: agent agent-1, container postgres on agent agent-2"
        );

        for empty in ["", "# nothing yet\n", "blast_radius: {}\n"] {
            let policy = parse_policy(empty).unwrap();
            assert!(policy.is_empty(), "{empty:?}");
            assert_eq!(policy.to_string(), "no limits, nothing protected");
        }

        let cases: &[(&str, Expected, &str)] = &[
            (
                "blast_radius:\n  max_targets: 0\nprotected:\n  - { agent: 'a b' }\n",
                &[(2, "blast_radius.max_targets"), (4, "protected[0].agent")],
                "max_targets must be between 1",
            ),
            (
                "apiVersion: faultline/v1\n",
                &[(1, "apiVersion")],
                "unknown field `apiVersion`",
            ),
            ("stages: []\n", &[(1, "stages")], "unknown field `stages`"),
            ("- agent: a\n", &[(1, "")], "expected a mapping"),
        ];
        for (yaml, expected, fragment) in cases {
            let errors = parse_policy(yaml).unwrap_err();
            let found: Vec<(u32, &str)> =
                errors.iter().map(|e| (e.line, e.field.as_str())).collect();
            assert_eq!(&found, expected, "{yaml}: {errors:#?}");
            assert!(
                errors[0].message.contains(fragment),
                "{yaml}: {:?} lacks {fragment:?}",
                errors[0].message
            );
        }
    }
}
