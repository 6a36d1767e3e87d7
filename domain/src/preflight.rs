//! Pre-flight: may these agents perform this plan? Agents report, per fault kind, whether they
//! can do it and by which mechanism (`fault:<name>` capabilities). A plan naming a fault an
//! agent cannot do is refused before anything is applied anywhere.

use std::collections::BTreeMap;

use crate::plan::Plan;

/// Prefix of fault capabilities in an agent's report.
pub const FAULT_CAPABILITY_PREFIX: &str = "fault:";

/// What one agent said it can do for one fault kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSupport {
    pub available: bool,
    /// The mechanism it would use, or why it cannot.
    pub detail: String,
}

/// Per agent name, per fault name.
pub type FleetSupport = BTreeMap<String, BTreeMap<String, FaultSupport>>;

/// One reason a plan cannot run on the fleet as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreflightProblem {
    pub stage: String,
    pub agent: String,
    pub fault: String,
    pub reason: String,
}

impl std::fmt::Display for PreflightProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage {}: {} on {}: {}",
            self.stage, self.fault, self.agent, self.reason
        )
    }
}

/// Every problem with running `plan` on agents whose support is `fleet` (agents absent from
/// `fleet` are not connected).
pub fn check_plan(plan: &Plan, fleet: &FleetSupport) -> Vec<PreflightProblem> {
    let mut problems = Vec::new();
    for stage in &plan.stages {
        for fault in &stage.faults {
            let name = fault.spec.kind.name();
            let problem = |reason: String| PreflightProblem {
                stage: stage.name.clone(),
                agent: fault.agent.clone(),
                fault: name.to_string(),
                reason,
            };
            match fleet.get(&fault.agent) {
                None => problems.push(problem("agent is not connected".into())),
                Some(support) => match support.get(name) {
                    None => problems.push(problem("agent does not offer this fault".into())),
                    Some(s) if !s.available => {
                        problems.push(problem(format!("not available: {}", s.detail)))
                    }
                    Some(_) => {}
                },
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fault::{FaultKind, FaultSpec, TargetSelector};
    use crate::plan::{PlannedFault, Stage};

    fn plan(faults: &[(&str, FaultKind)]) -> Plan {
        Plan {
            api_version: "faultline/v1".into(),
            title: "t".into(),
            description: None,
            hypothesis: None,
            tolerances: Vec::new(),
            lease: Duration::from_secs(10),
            stages: vec![Stage {
                name: "s".into(),
                after: Duration::ZERO,
                when: None,
                overlap: false,
                faults: faults
                    .iter()
                    .map(|(agent, kind)| PlannedFault {
                        agent: agent.to_string(),
                        spec: FaultSpec {
                            kind: kind.clone(),
                            target: TargetSelector::Container("x".into()),
                            duration: Duration::from_secs(1),
                        },
                    })
                    .collect(),
            }],
            blast_radius: Default::default(),
            protected: Vec::new(),
            steady_state: None,
            stop_conditions: Vec::new(),
            load: None,
        }
    }

    fn fleet(entries: &[(&str, &str, bool, &str)]) -> FleetSupport {
        let mut fleet = FleetSupport::new();
        for (agent, fault, available, detail) in entries {
            fleet.entry(agent.to_string()).or_default().insert(
                fault.to_string(),
                FaultSupport {
                    available: *available,
                    detail: detail.to_string(),
                },
            );
        }
        fleet
    }

    #[test]
    fn preflight_table() {
        let latency = FaultKind::Latency {
            scope: Default::default(),
            delay_ms: 100,
            jitter_ms: 0,
        };
        let duplicate = FaultKind::Duplicate {
            scope: Default::default(),
            basis_points: 100,
        };
        let cases: Vec<(&str, Plan, FleetSupport, Vec<&str>)> = vec![
            (
                "all supported",
                plan(&[("a", FaultKind::ContainerPause), ("b", latency.clone())]),
                fleet(&[
                    ("a", "container-pause", true, "docker"),
                    ("b", "latency", true, "nfqueue"),
                ]),
                vec![],
            ),
            (
                "agent not connected",
                plan(&[("c", FaultKind::ContainerPause)]),
                fleet(&[("a", "container-pause", true, "docker")]),
                vec!["stage s: container-pause on c: agent is not connected"],
            ),
            (
                "fault unavailable with reason",
                plan(&[("a", duplicate)]),
                fleet(&[("a", "duplicate", false, "needs netem; this kernel has none")]),
                vec!["stage s: duplicate on a: not available: needs netem; this kernel has none"],
            ),
            (
                "fault not offered at all",
                plan(&[("a", latency)]),
                fleet(&[("a", "container-pause", true, "docker")]),
                vec!["stage s: latency on a: agent does not offer this fault"],
            ),
        ];
        for (name, plan, fleet, expected) in cases {
            let got: Vec<String> = check_plan(&plan, &fleet)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, expected, "{name}");
        }
    }
}
