//! Safety interlocks: may this run start? Pure functions over values — the plan, the
//! coordinator's [`Policy`], the number of connected agents, the halt switch, the targets other
//! runs hold — so that every rule is pinned down by table tests. The coordinator calls them in
//! `StartRun`, in this order, and refuses the run (nothing applied, no run created) with every
//! reason at once:
//!
//! 1. [`admit_start`]: halt-all engaged blocks new runs.
//! 2. [`check_blast_radius`]: how many targets and agents the plan faults, and what share of
//!    the connected fleet, against the plan's `blast_radius` and the policy's (the stricter
//!    limit wins).
//! 3. [`check_protected`]: no fault may target what the plan's or the policy's `protected`
//!    lists.
//! 4. [`TargetLocks::try_lock`]: two runs may not fault the same target at once; a run holds
//!    its targets from admission until it ends.
//!
//! # Matching targets
//!
//! A target is a selector on an agent ([`Target`]). The check is static — no agent is asked
//! what a selector resolves to — so selectors are compared as written: two selectors denote
//! the same thing when they are equal, or when one is a container-name regex (`re:`) that
//! matches the other's container name ([`selectors_overlap`]). A container targeted by label
//! or id is therefore not recognised as the container of the same name: protect a whole agent,
//! or each selector a plan may use, when that matters.
//!
//! # Stop conditions
//!
//! Interlocks that stop a run already under way (error rate, latency, a probe failing) come
//! with probes. They belong here too, as pure functions from the probes' latest readings and
//! the plan's thresholds to the reasons to halt, which the run task acts on like a halt.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::fault::TargetSelector;
use crate::plan::{Plan, Policy, Protected};

/// Where a limit or a protection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The plan's own `blast_radius` or `protected`.
    Plan,
    /// The coordinator's `--policy` file.
    Coordinator,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plan => "the plan",
            Self::Coordinator => "the coordinator policy",
        })
    }
}

/// The halt-all switch as the interlocks see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaltState {
    pub engaged: bool,
    /// Why it was engaged; empty when released.
    pub reason: String,
}

/// One target of a plan: a selector on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub agent: String,
    pub selector: TargetSelector,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on agent {}", self.selector, self.agent)
    }
}

/// A target a run wants that another run holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// What the refused run wants.
    pub target: Target,
    /// The run holding it.
    pub run_id: String,
    /// What that run holds: `target` itself, or a selector that may denote the same thing.
    pub held: Target,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is being faulted by run {}", self.target, self.run_id)?;
        if self.held != self.target {
            write!(f, " (as {})", self.held.selector)?;
        }
        Ok(())
    }
}

/// One reason a run may not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Halt-all is engaged.
    Halted { reason: String },
    /// More distinct targets than `max_targets`.
    TooManyTargets {
        planned: usize,
        limit: u32,
        source: Source,
    },
    /// More distinct agents than `max_agents`.
    TooManyAgents {
        agents: Vec<String>,
        limit: u32,
        source: Source,
    },
    /// A larger share of the connected agents than `max_fleet_percent`.
    FleetShare {
        faulted: usize,
        connected: usize,
        limit_percent: u8,
        source: Source,
    },
    /// A fault targets something protected.
    Protected {
        stage: String,
        /// Index of the fault in its stage.
        fault: usize,
        /// The fault's kind name.
        kind: &'static str,
        target: Target,
        /// Every protection it matches, and where each comes from.
        by: Vec<(Protected, Source)>,
    },
    /// Another run is faulting the same target.
    Locked(Conflict),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Halted { reason } => write!(
                f,
                "halt-all is engaged ({reason}); release it with `faultline halt --release` first"
            ),
            Self::TooManyTargets {
                planned,
                limit,
                source,
            } => write!(
                f,
                "blast radius: the plan faults {}, more than max_targets {limit} set by {source}",
                count(*planned, "target")
            ),
            Self::TooManyAgents {
                agents,
                limit,
                source,
            } => write!(
                f,
                "blast radius: the plan faults {} ({}), more than max_agents {limit} set by \
                 {source}",
                count(agents.len(), "agent"),
                agents.join(", ")
            ),
            Self::FleetShare {
                faulted,
                connected: 0,
                limit_percent,
                source,
            } => write!(
                f,
                "blast radius: the plan faults {} but no agent is connected, so any share is \
                 more than max_fleet_percent {limit_percent}% set by {source}",
                count(*faulted, "agent")
            ),
            Self::FleetShare {
                faulted,
                connected,
                limit_percent,
                source,
            } => write!(
                f,
                "blast radius: the plan faults {faulted} of the {} ({}), more than \
                 max_fleet_percent {limit_percent}% set by {source}",
                count(*connected, "connected agent"),
                percent(*faulted, *connected)
            ),
            Self::Protected {
                stage,
                fault,
                kind,
                target,
                by,
            } => {
                let by: Vec<String> = by
                    .iter()
                    .map(|(protected, source)| format!("{protected} (in {source})"))
                    .collect();
                write!(
                    f,
                    "protected: stage {stage}, faults[{fault}]: {kind} on {target} is protected \
                     by {}",
                    by.join(" and ")
                )
            }
            Self::Locked(conflict) => write!(f, "target locked: {conflict}"),
        }
    }
}

/// `1 agent`, `3 agents`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `part / whole` in percent with at most one decimal, rounded down: `75%`, `33.3%`.
fn percent(part: usize, whole: usize) -> String {
    let tenths = part.saturating_mul(1000) / whole.max(1);
    if tenths.is_multiple_of(10) {
        format!("{}%", tenths / 10)
    } else {
        format!("{}.{}%", tenths / 10, tenths % 10)
    }
}

/// Why a run may not start: every violation found, in the order of the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub violations: Vec<Violation>,
}

impl Refusal {
    /// `Ok` when there is nothing to refuse.
    pub fn unless_empty(violations: Vec<Violation>) -> Result<(), Refusal> {
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Refusal { violations })
        }
    }

    /// One line per violation.
    pub fn lines(&self) -> Vec<String> {
        self.violations.iter().map(ToString::to_string).collect()
    }
}

/// The violations, one per line.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

impl From<Vec<Conflict>> for Refusal {
    fn from(conflicts: Vec<Conflict>) -> Self {
        Refusal {
            violations: conflicts.into_iter().map(Violation::Locked).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Halt.
// ---------------------------------------------------------------------------------------------

/// New runs may start only while halt-all is released.
pub fn admit_start(halt: &HaltState) -> Result<(), Refusal> {
    if halt.engaged {
        Refusal::unless_empty(vec![Violation::Halted {
            reason: halt.reason.clone(),
        }])
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Blast radius and protection.
// ---------------------------------------------------------------------------------------------

/// [`check_blast_radius`] and [`check_protected`] together: every violation, or `Ok`.
pub fn admit_plan(plan: &Plan, policy: &Policy, connected_agents: usize) -> Result<(), Refusal> {
    let mut violations = check_blast_radius(plan, policy, connected_agents);
    violations.extend(check_protected(plan, policy));
    Refusal::unless_empty(violations)
}

/// The stricter of the plan's and the policy's limit, with where it comes from. On a tie the
/// plan's is named: its author asked for it.
fn stricter<T: Ord + Copy>(plan: Option<T>, coordinator: Option<T>) -> Option<(T, Source)> {
    match (plan, coordinator) {
        (Some(p), Some(c)) if c < p => Some((c, Source::Coordinator)),
        (Some(p), _) => Some((p, Source::Plan)),
        (None, Some(c)) => Some((c, Source::Coordinator)),
        (None, None) => None,
    }
}

/// The plan against its own `blast_radius` and the policy's, the stricter limit winning.
/// `connected_agents` is the number of agents connected now (the `max_fleet_percent` base).
pub fn check_blast_radius(plan: &Plan, policy: &Policy, connected_agents: usize) -> Vec<Violation> {
    let (mine, theirs) = (&plan.blast_radius, &policy.blast_radius);
    let mut violations = Vec::new();
    if let Some((limit, source)) = stricter(mine.max_targets, theirs.max_targets) {
        let planned = plan_targets(plan).len();
        if planned > limit as usize {
            violations.push(Violation::TooManyTargets {
                planned,
                limit,
                source,
            });
        }
    }
    let agents = plan.agents();
    if let Some((limit, source)) = stricter(mine.max_agents, theirs.max_agents)
        && agents.len() > limit as usize
    {
        violations.push(Violation::TooManyAgents {
            agents: agents.iter().map(|agent| agent.to_string()).collect(),
            limit,
            source,
        });
    }
    if let Some((limit_percent, source)) =
        stricter(mine.max_fleet_percent, theirs.max_fleet_percent)
    {
        let faulted = agents.len();
        // faulted / connected > limit / 100, without division.
        let over = faulted.saturating_mul(100)
            > usize::from(limit_percent).saturating_mul(connected_agents);
        if over {
            violations.push(Violation::FleetShare {
                faulted,
                connected: connected_agents,
                limit_percent,
                source,
            });
        }
    }
    violations
}

/// Every fault that targets something the plan's or the policy's `protected` lists, in plan
/// order; each names every protection it matches.
pub fn check_protected(plan: &Plan, policy: &Policy) -> Vec<Violation> {
    let protections: Vec<(&Protected, Source)> = policy
        .protected
        .iter()
        .map(|p| (p, Source::Coordinator))
        .chain(plan.protected.iter().map(|p| (p, Source::Plan)))
        .collect();
    let mut violations = Vec::new();
    if protections.is_empty() {
        return violations;
    }
    for stage in &plan.stages {
        for (index, fault) in stage.faults.iter().enumerate() {
            let target = Target {
                agent: fault.agent.clone(),
                selector: fault.spec.target.clone(),
            };
            let by: Vec<(Protected, Source)> = protections
                .iter()
                .filter(|(protected, _)| protects(protected, &target))
                .map(|(protected, source)| ((*protected).clone(), *source))
                .collect();
            if !by.is_empty() {
                violations.push(Violation::Protected {
                    stage: stage.name.clone(),
                    fault: index,
                    kind: fault.spec.kind.name(),
                    target,
                    by,
                });
            }
        }
    }
    violations
}

/// Whether `protected` covers `target`: same agent (or any, when the protection names none)
/// and an overlapping selector (or any, when it names none).
pub fn protects(protected: &Protected, target: &Target) -> bool {
    protected
        .agent
        .as_deref()
        .is_none_or(|agent| agent == target.agent)
        && protected
            .target
            .as_ref()
            .is_none_or(|selector| selectors_overlap(selector, &target.selector))
}

/// Whether two selectors, as written, may denote the same thing: they are equal, or one is a
/// container-name regex matching the other's container name (unanchored, as agents match it).
/// A regex that does not compile counts as matching: when in doubt, refuse.
pub fn selectors_overlap(a: &TargetSelector, b: &TargetSelector) -> bool {
    match (a, b) {
        _ if a == b => true,
        (TargetSelector::ContainerRegex(pattern), TargetSelector::Container(name))
        | (TargetSelector::Container(name), TargetSelector::ContainerRegex(pattern)) => {
            regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map_or(true, |regex| regex.is_match(name))
        }
        _ => false,
    }
}

/// The distinct targets of a plan over all stages, in plan order.
pub fn plan_targets(plan: &Plan) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
    for fault in plan.stages.iter().flat_map(|stage| &stage.faults) {
        let target = Target {
            agent: fault.agent.clone(),
            selector: fault.spec.target.clone(),
        };
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    targets
}

// ---------------------------------------------------------------------------------------------
// Per-target locks.
// ---------------------------------------------------------------------------------------------

/// Which run holds which targets. A run locks every target of its plan when it is admitted and
/// releases them when it ends, so two runs never fault the same target at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetLocks {
    /// Run id -> the targets it holds.
    held: BTreeMap<String, Vec<Target>>,
}

impl TargetLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks every target of `plan` for `run_id`, or none: on any conflict with another run
    /// nothing changes and every conflict is returned. Locking again for the same run adds
    /// what it does not hold yet.
    pub fn try_lock(&mut self, run_id: &str, plan: &Plan) -> Result<(), Vec<Conflict>> {
        let wanted = plan_targets(plan);
        let mut conflicts = Vec::new();
        for target in &wanted {
            let holder = self
                .held
                .iter()
                .filter(|(holder, _)| holder.as_str() != run_id)
                .flat_map(|(holder, targets)| targets.iter().map(move |held| (holder, held)))
                .find(|(_, held)| {
                    held.agent == target.agent
                        && selectors_overlap(&held.selector, &target.selector)
                });
            if let Some((holder, held)) = holder {
                conflicts.push(Conflict {
                    target: target.clone(),
                    run_id: holder.clone(),
                    held: held.clone(),
                });
            }
        }
        if !conflicts.is_empty() {
            return Err(conflicts);
        }
        let mine = self.held.entry(run_id.to_string()).or_default();
        for target in wanted {
            if !mine.contains(&target) {
                mine.push(target);
            }
        }
        Ok(())
    }

    /// Releases everything `run_id` holds; returns how many targets that was.
    pub fn release(&mut self, run_id: &str) -> usize {
        self.held.remove(run_id).map_or(0, |targets| targets.len())
    }

    /// The run holding `target` exactly, if any.
    pub fn holder(&self, target: &Target) -> Option<&str> {
        self.held
            .iter()
            .find(|(_, targets)| targets.contains(target))
            .map(|(run_id, _)| run_id.as_str())
    }

    /// The runs holding locks.
    pub fn runs(&self) -> BTreeSet<&str> {
        self.held.keys().map(String::as_str).collect()
    }

    /// True when no run holds anything.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Stop conditions: to come with probes (see the module documentation).
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fault::{FaultKind, FaultSpec};
    use crate::plan::{BlastRadius, PlannedFault, Stage};

    fn container(name: &str) -> TargetSelector {
        TargetSelector::Container(name.into())
    }

    fn regex(pattern: &str) -> TargetSelector {
        TargetSelector::ContainerRegex(pattern.into())
    }

    fn label(label: &str) -> TargetSelector {
        TargetSelector::Label(label.into())
    }

    /// A plan of stages `s0`, `s1`..., each pausing `(agent, target)` pairs for a second.
    fn staged(stages: &[&[(&str, TargetSelector)]]) -> Plan {
        Plan {
            api_version: "faultline/v1".into(),
            title: "t".into(),
            description: None,
            hypothesis: None,
            tolerances: Vec::new(),
            lease: Duration::from_secs(10),
            stages: stages
                .iter()
                .enumerate()
                .map(|(index, faults)| Stage {
                    name: format!("s{index}"),
                    after: Duration::ZERO,
                    when: None,
                    overlap: false,
                    faults: faults
                        .iter()
                        .map(|(agent, target)| PlannedFault {
                            agent: agent.to_string(),
                            spec: FaultSpec {
                                kind: FaultKind::ContainerPause,
                                target: target.clone(),
                                duration: Duration::from_secs(1),
                            },
                        })
                        .collect(),
                })
                .collect(),
            blast_radius: BlastRadius::default(),
            protected: Vec::new(),
            steady_state: None,
            stop_conditions: Vec::new(),
            load: None,
        }
    }

    /// A one-stage plan.
    fn plan(faults: &[(&str, TargetSelector)]) -> Plan {
        staged(&[faults])
    }

    /// One stage pausing container `c{i}` on each of these agents.
    fn on_agents(agents: &[&str]) -> Plan {
        let faults: Vec<(&str, TargetSelector)> = agents
            .iter()
            .enumerate()
            .map(|(i, agent)| (*agent, container(&format!("c{i}"))))
            .collect();
        plan(&faults)
    }

    fn limits(targets: Option<u32>, agents: Option<u32>, fleet: Option<u8>) -> BlastRadius {
        BlastRadius {
            max_targets: targets,
            max_agents: agents,
            max_fleet_percent: fleet,
        }
    }

    fn with_limits(mut plan: Plan, limits: BlastRadius) -> Plan {
        plan.blast_radius = limits;
        plan
    }

    fn policy_limits(limits: BlastRadius) -> Policy {
        Policy {
            blast_radius: limits,
            protected: Vec::new(),
        }
    }

    fn guard(agent: Option<&str>, target: Option<TargetSelector>) -> Protected {
        Protected {
            agent: agent.map(str::to_string),
            target,
        }
    }

    fn protecting(protected: Vec<Protected>) -> Policy {
        Policy {
            blast_radius: BlastRadius::default(),
            protected,
        }
    }

    fn strings<T: ToString>(items: &[T]) -> Vec<String> {
        items.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn halt_table() {
        type Case = (&'static str, HaltState, Result<(), Vec<&'static str>>);
        let cases: Vec<Case> = vec![
            ("released", HaltState::default(), Ok(())),
            (
                "released, old reason left over",
                HaltState {
                    engaged: false,
                    reason: "game day over".into(),
                },
                Ok(()),
            ),
            (
                "engaged",
                HaltState {
                    engaged: true,
                    reason: "error budget burnt".into(),
                },
                Err(vec![
                    "halt-all is engaged (error budget burnt); release it with `faultline halt \
                     --release` first",
                ]),
            ),
        ];
        for (name, halt, expected) in cases {
            let got = admit_start(&halt).map_err(|refusal| refusal.lines());
            let expected = expected.map_err(|lines| strings(&lines));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn blast_radius_table() {
        let none = BlastRadius::default();
        let three = ["a1", "a2", "a3"];
        // Name, plan, policy limits, connected agents, expected violations.
        let cases: Vec<(&str, Plan, BlastRadius, usize, Vec<&str>)> = vec![
            ("no limits at all", on_agents(&three), none, 3, vec![]),
            (
                "max_agents: under",
                with_limits(on_agents(&["a1"]), limits(None, Some(2), None)),
                none,
                3,
                vec![],
            ),
            (
                "max_agents: at the limit",
                with_limits(on_agents(&["a1", "a2"]), limits(None, Some(2), None)),
                none,
                3,
                vec![],
            ),
            (
                "max_agents: over",
                with_limits(on_agents(&three), limits(None, Some(2), None)),
                none,
                3,
                vec![
                    "blast radius: the plan faults 3 agents (a1, a2, a3), more than max_agents 2 \
                     set by the plan",
                ],
            ),
            (
                "max_agents: one agent, many targets",
                with_limits(
                    plan(&[("a1", container("x")), ("a1", container("y"))]),
                    limits(None, Some(1), None),
                ),
                none,
                3,
                vec![],
            ),
            (
                "max_agents: agents counted over every stage",
                with_limits(
                    staged(&[&[("a1", container("x"))], &[("a2", container("x"))]]),
                    limits(None, Some(1), None),
                ),
                none,
                3,
                vec![
                    "blast radius: the plan faults 2 agents (a1, a2), more than max_agents 1 set \
                     by the plan",
                ],
            ),
            (
                "max_targets: at the limit",
                with_limits(on_agents(&three), limits(Some(3), None, None)),
                none,
                3,
                vec![],
            ),
            (
                "max_targets: over",
                with_limits(on_agents(&three), limits(Some(2), None, None)),
                none,
                3,
                vec![
                    "blast radius: the plan faults 3 targets, more than max_targets 2 set by the \
                     plan",
                ],
            ),
            (
                "max_targets: one target in two stages counts once",
                with_limits(
                    staged(&[&[("a1", container("x"))], &[("a1", container("x"))]]),
                    limits(Some(1), None, None),
                ),
                none,
                3,
                vec![],
            ),
            (
                "max_targets: one name on two agents is two targets",
                with_limits(
                    plan(&[("a1", container("x")), ("a2", container("x"))]),
                    limits(Some(1), None, None),
                ),
                none,
                3,
                vec![
                    "blast radius: the plan faults 2 targets, more than max_targets 1 set by the \
                     plan",
                ],
            ),
            (
                "max_targets: two selectors on one agent are two targets",
                with_limits(
                    plan(&[("a1", container("x")), ("a1", label("app=x"))]),
                    limits(Some(1), None, None),
                ),
                none,
                3,
                vec![
                    "blast radius: the plan faults 2 targets, more than max_targets 1 set by the \
                     plan",
                ],
            ),
            (
                "max_fleet_percent: at the limit (2 of 4 is 50%)",
                with_limits(on_agents(&["a1", "a2"]), limits(None, None, Some(50))),
                none,
                4,
                vec![],
            ),
            (
                "max_fleet_percent: over (3 of 4)",
                with_limits(on_agents(&three), limits(None, None, Some(50))),
                none,
                4,
                vec![
                    "blast radius: the plan faults 3 of the 4 connected agents (75%), more than \
                     max_fleet_percent 50% set by the plan",
                ],
            ),
            (
                "max_fleet_percent: just over (1 of 3 against 33%)",
                with_limits(on_agents(&["a1"]), limits(None, None, Some(33))),
                none,
                3,
                vec![
                    "blast radius: the plan faults 1 of the 3 connected agents (33.3%), more \
                     than max_fleet_percent 33% set by the plan",
                ],
            ),
            (
                "max_fleet_percent: 100% allows the whole fleet",
                with_limits(on_agents(&three), limits(None, None, Some(100))),
                none,
                3,
                vec![],
            ),
            (
                "max_fleet_percent: nobody connected",
                with_limits(on_agents(&["a1"]), limits(None, None, Some(100))),
                none,
                0,
                vec![
                    "blast radius: the plan faults 1 agent but no agent is connected, so any \
                     share is more than max_fleet_percent 100% set by the plan",
                ],
            ),
            (
                "policy only",
                on_agents(&three),
                limits(None, Some(2), None),
                3,
                vec![
                    "blast radius: the plan faults 3 agents (a1, a2, a3), more than max_agents 2 \
                     set by the coordinator policy",
                ],
            ),
            (
                "the stricter wins: the policy's",
                with_limits(on_agents(&three), limits(None, Some(5), None)),
                limits(None, Some(2), None),
                3,
                vec![
                    "blast radius: the plan faults 3 agents (a1, a2, a3), more than max_agents 2 \
                     set by the coordinator policy",
                ],
            ),
            (
                "the stricter wins: the plan's",
                with_limits(on_agents(&three), limits(Some(1), None, None)),
                limits(Some(10), None, None),
                3,
                vec![
                    "blast radius: the plan faults 3 targets, more than max_targets 1 set by the \
                     plan",
                ],
            ),
            (
                "the stricter wins: a looser plan cannot lift the policy",
                with_limits(on_agents(&["a1", "a2"]), limits(None, None, Some(100))),
                limits(None, None, Some(25)),
                4,
                vec![
                    "blast radius: the plan faults 2 of the 4 connected agents (50%), more than \
                     max_fleet_percent 25% set by the coordinator policy",
                ],
            ),
            (
                "every limit over at once, from both sources",
                with_limits(on_agents(&three), limits(Some(2), None, Some(50))),
                limits(None, Some(1), Some(60)),
                3,
                vec![
                    "blast radius: the plan faults 3 targets, more than max_targets 2 set by the \
                     plan",
                    "blast radius: the plan faults 3 agents (a1, a2, a3), more than max_agents 1 \
                     set by the coordinator policy",
                    "blast radius: the plan faults 3 of the 3 connected agents (100%), more than \
                     max_fleet_percent 50% set by the plan",
                ],
            ),
        ];
        for (name, plan, policy, connected, expected) in cases {
            let got = strings(&check_blast_radius(
                &plan,
                &policy_limits(policy),
                connected,
            ));
            assert_eq!(got, strings(&expected), "{name}");
        }
    }

    #[test]
    fn protection_table() {
        let db = || container("db");
        // Name, plan (its own `protected` included), coordinator protections, expected.
        let cases: Vec<(&str, Plan, Vec<Protected>, Vec<&str>)> = vec![
            ("nothing protected", plan(&[("a1", db())]), vec![], vec![]),
            (
                "protected agent: every target on it",
                plan(&[
                    ("a1", db()),
                    ("a1", label("tier=web")),
                    ("a1", TargetSelector::Pid(4242)),
                ]),
                vec![guard(Some("a1"), None)],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container db on agent a1 \
                     is protected by agent a1 (in the coordinator policy)",
                    "protected: stage s0, faults[1]: container-pause on container labelled \
                     tier=web on agent a1 is protected by agent a1 (in the coordinator policy)",
                    "protected: stage s0, faults[2]: container-pause on process 4242 on agent a1 \
                     is protected by agent a1 (in the coordinator policy)",
                ],
            ),
            (
                "protected agent: other agents are fine",
                plan(&[("a2", db())]),
                vec![guard(Some("a1"), None)],
                vec![],
            ),
            (
                "protected container: exact match",
                plan(&[("a2", container("postgres"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container postgres on \
                     agent a2 is protected by container postgres on agent a2 (in the \
                     coordinator policy)",
                ],
            ),
            (
                "protected container: another container on that agent is fine",
                plan(&[("a2", container("postgres-replica"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![],
            ),
            (
                "protected container: the same name on another agent is fine",
                plan(&[("a1", container("postgres"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![],
            ),
            (
                "protected container on every agent",
                plan(&[("a1", container("vault")), ("a7", container("vault"))]),
                vec![guard(None, Some(container("vault")))],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container vault on agent \
                     a1 is protected by container vault on every agent (in the coordinator \
                     policy)",
                    "protected: stage s0, faults[1]: container-pause on container vault on agent \
                     a7 is protected by container vault on every agent (in the coordinator \
                     policy)",
                ],
            ),
            (
                "regex target matching the protected name",
                plan(&[("a2", regex("^post"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container matching \
                     re:^post on agent a2 is protected by container postgres on agent a2 (in the \
                     coordinator policy)",
                ],
            ),
            (
                "unanchored regex target matching inside the name",
                plan(&[("a2", regex("gre"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container matching re:gre \
                     on agent a2 is protected by container postgres on agent a2 (in the \
                     coordinator policy)",
                ],
            ),
            (
                "regex target not matching the protected name",
                plan(&[("a2", regex("^web-[0-9]+$"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![],
            ),
            (
                "protected regex covers the containers it matches",
                plan(&[
                    ("a2", container("prod-api")),
                    ("a2", container("staging-api")),
                ]),
                vec![guard(None, Some(regex("^prod-")))],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container prod-api on \
                     agent a2 is protected by container matching re:^prod- on every agent (in \
                     the coordinator policy)",
                ],
            ),
            (
                "selectors of different keys are not compared",
                plan(&[("a2", label("app=postgres"))]),
                vec![guard(Some("a2"), Some(container("postgres")))],
                vec![],
            ),
            (
                "protected label, cgroup and process: exact matches",
                plan(&[
                    ("a3", label("tier=db")),
                    (
                        "a3",
                        TargetSelector::Cgroup("system.slice/sshd.service".into()),
                    ),
                    ("a3", TargetSelector::ProcessName("sshd".into())),
                    ("a3", TargetSelector::ProcessName("nginx".into())),
                ]),
                vec![
                    guard(Some("a3"), Some(label("tier=db"))),
                    guard(
                        None,
                        Some(TargetSelector::Cgroup("system.slice/sshd.service".into())),
                    ),
                    guard(Some("a3"), Some(TargetSelector::ProcessName("sshd".into()))),
                ],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container labelled \
                     tier=db on agent a3 is protected by container labelled tier=db on agent a3 \
                     (in the coordinator policy)",
                    "protected: stage s0, faults[1]: container-pause on cgroup \
                     system.slice/sshd.service on agent a3 is protected by cgroup \
                     system.slice/sshd.service on every agent (in the coordinator policy)",
                    "protected: stage s0, faults[2]: container-pause on process named sshd on \
                     agent a3 is protected by process named sshd on agent a3 (in the \
                     coordinator policy)",
                ],
            ),
            (
                "the plan's own protection, in a later stage",
                Plan {
                    protected: vec![guard(Some("a1"), Some(db()))],
                    ..staged(&[&[("a2", db())], &[("a1", db())]])
                },
                vec![],
                vec![
                    "protected: stage s1, faults[0]: container-pause on container db on agent a1 \
                     is protected by container db on agent a1 (in the plan)",
                ],
            ),
            (
                "protected by both the policy and the plan",
                Plan {
                    protected: vec![guard(Some("a1"), Some(db()))],
                    ..plan(&[("a1", db())])
                },
                vec![guard(Some("a1"), None)],
                vec![
                    "protected: stage s0, faults[0]: container-pause on container db on agent a1 \
                     is protected by agent a1 (in the coordinator policy) and container db on \
                     agent a1 (in the plan)",
                ],
            ),
        ];
        for (name, plan, protected, expected) in cases {
            let got = strings(&check_protected(&plan, &protecting(protected)));
            assert_eq!(got, strings(&expected), "{name}");
        }
    }

    #[test]
    fn selector_overlap_table() {
        let cases: Vec<(TargetSelector, TargetSelector, bool)> = vec![
            (container("db"), container("db"), true),
            (container("db"), container("db2"), false),
            (regex("^db$"), container("db"), true),
            (container("db"), regex("^db$"), true),
            (regex("^db$"), container("db2"), false),
            (regex("d"), container("db"), true),
            (regex("^db"), regex("^db"), true),
            (regex("^db"), regex("^d"), false),
            (regex("("), container("db"), true),
            (label("app=db"), container("db"), false),
            (
                TargetSelector::ContainerId("0123456789ab".into()),
                container("db"),
                false,
            ),
            (TargetSelector::Pid(7), TargetSelector::Pid(7), true),
            (TargetSelector::Pid(7), TargetSelector::Pid(8), false),
        ];
        for (a, b, expected) in cases {
            assert_eq!(selectors_overlap(&a, &b), expected, "{a} / {b}");
        }
    }

    /// Steps applied in order to one lock table.
    #[allow(clippy::large_enum_variant)] // a test table; boxing would only add noise
    enum Step {
        Lock(&'static str, Plan, Result<(), Vec<&'static str>>),
        Release(&'static str, usize),
    }

    #[test]
    fn target_lock_table() {
        use Step::{Lock, Release};
        let db = || container("db");
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "two runs on different targets",
                vec![
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Lock("r2", plan(&[("a1", container("cache"))]), Ok(())),
                    Lock("r3", plan(&[("a2", db())]), Ok(())),
                ],
            ),
            (
                "the same target at once",
                vec![
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Lock(
                        "r2",
                        plan(&[("a1", db())]),
                        Err(vec!["container db on agent a1 is being faulted by run r1"]),
                    ),
                ],
            ),
            (
                "release then relock",
                vec![
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Lock(
                        "r2",
                        plan(&[("a1", db())]),
                        Err(vec!["container db on agent a1 is being faulted by run r1"]),
                    ),
                    Release("r1", 1),
                    Lock("r2", plan(&[("a1", db())]), Ok(())),
                    Lock(
                        "r1",
                        plan(&[("a1", db())]),
                        Err(vec!["container db on agent a1 is being faulted by run r2"]),
                    ),
                ],
            ),
            (
                "a regex overlapping a held name",
                vec![
                    Lock("r1", plan(&[("a1", container("db-1"))]), Ok(())),
                    Lock(
                        "r2",
                        plan(&[("a1", regex("^db-"))]),
                        Err(vec![
                            "container matching re:^db- on agent a1 is being faulted by run r1 \
                             (as container db-1)",
                        ]),
                    ),
                    Lock("r3", plan(&[("a1", regex("^web-"))]), Ok(())),
                ],
            ),
            (
                "all or nothing: a refused run locks none of its targets",
                vec![
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Lock(
                        "r2",
                        staged(&[&[("a1", container("free"))], &[("a1", db())]]),
                        Err(vec!["container db on agent a1 is being faulted by run r1"]),
                    ),
                    Lock("r3", plan(&[("a1", container("free"))]), Ok(())),
                ],
            ),
            (
                "every conflict is listed, with its holder",
                vec![
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Lock("r2", plan(&[("a2", db())]), Ok(())),
                    Lock(
                        "r3",
                        plan(&[("a1", db()), ("a3", db()), ("a2", db())]),
                        Err(vec![
                            "container db on agent a1 is being faulted by run r1",
                            "container db on agent a2 is being faulted by run r2",
                        ]),
                    ),
                ],
            ),
            (
                "a run's own targets in later stages do not conflict",
                vec![Lock(
                    "r1",
                    staged(&[&[("a1", db())], &[("a1", db())]]),
                    Ok(()),
                )],
            ),
            (
                "locking again for the same run",
                vec![
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Lock("r1", plan(&[("a1", db()), ("a1", container("x"))]), Ok(())),
                    Release("r1", 2),
                ],
            ),
            (
                "releasing what is not held",
                vec![
                    Release("nobody", 0),
                    Lock("r1", plan(&[("a1", db())]), Ok(())),
                    Release("r1", 1),
                    Release("r1", 0),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut locks = TargetLocks::new();
            for (index, step) in steps.into_iter().enumerate() {
                match step {
                    Lock(run, plan, expected) => {
                        let got = locks
                            .try_lock(run, &plan)
                            .map_err(|conflicts| strings(&conflicts));
                        let expected = expected.map_err(|lines| strings(&lines));
                        assert_eq!(got, expected, "{name}, step {index}");
                    }
                    Release(run, expected) => {
                        assert_eq!(locks.release(run), expected, "{name}, step {index}");
                    }
                }
            }
        }
    }

    #[test]
    fn lock_bookkeeping() {
        let mut locks = TargetLocks::new();
        assert!(locks.is_empty());
        let target = Target {
            agent: "a1".into(),
            selector: container("db"),
        };
        locks
            .try_lock("r1", &plan(&[("a1", container("db"))]))
            .unwrap();
        assert_eq!(locks.holder(&target), Some("r1"));
        assert_eq!(locks.runs().into_iter().collect::<Vec<_>>(), ["r1"]);
        let refusal = Refusal::from(
            locks
                .try_lock("r2", &plan(&[("a1", container("db"))]))
                .unwrap_err(),
        );
        assert_eq!(
            refusal.to_string(),
            "target locked: container db on agent a1 is being faulted by run r1"
        );
        locks.release("r1");
        assert_eq!(locks.holder(&target), None);
        assert!(locks.is_empty());
    }

    #[test]
    fn admit_plan_lists_every_violation_in_check_order() {
        let plan = Plan {
            blast_radius: limits(None, Some(1), None),
            ..plan(&[("a1", container("db")), ("a2", container("db"))])
        };
        let policy = protecting(vec![guard(Some("a2"), None)]);
        let refusal = admit_plan(&plan, &policy, 2).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "blast radius: the plan faults 2 agents (a1, a2), more than max_agents 1 set by the \
             plan\n\
             protected: stage s0, faults[1]: container-pause on container db on agent a2 is \
             protected by agent a2 (in the coordinator policy)"
        );
        assert_eq!(
            admit_plan(&plan, &Policy::default(), 2)
                .unwrap_err()
                .violations
                .len(),
            1
        );
        let fine = Plan {
            blast_radius: BlastRadius::default(),
            ..plan.clone()
        };
        assert_eq!(admit_plan(&fine, &Policy::default(), 2), Ok(()));
    }
}
