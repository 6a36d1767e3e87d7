//! `faultline run --follow`: the live view of a run in the terminal.
//!
//! [`Follow`] is a pure state machine fed with the run's events (and, when known, the latest
//! probe samples); [`Follow::status`] turns it into what the progress bar shows at a given
//! moment: the phase and stage, a countdown to the next scheduled change, the faults in force
//! with their time left, the latest probe values, and the expected elapsed/total time. The
//! terminal side lives in `main.rs`: it prints every event as a line and redraws one status
//! bar under them (nothing is drawn when stderr is not a terminal, so logs stay clean).

use std::collections::BTreeMap;
use std::time::Duration;

use faultline_domain::duration::format_duration;
use faultline_domain::plan::Plan;
use faultline_proto::v1 as pb;

/// What the status bar shows at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Milliseconds since `run-started`.
    pub elapsed_ms: u64,
    /// The plan's expected length (baseline, delays, faults, recovery); `None` without a plan.
    /// A `when` trigger or a slow agent can make the run longer: the bar then stays full.
    pub expected_ms: Option<u64>,
    /// One line: phase, countdown, faults in force, probe values.
    pub line: String,
}

/// A fault in force, as far as the events tell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Active {
    agent: String,
    kind: String,
    /// When the agent will revert it on schedule (Unix ms), if the plan says how long it lasts.
    ends_at_ms: Option<i64>,
}

/// Where the run is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Baseline {
        since_ms: i64,
    },
    Waiting {
        stage: String,
        until_ms: Option<i64>,
    },
    Stage {
        index: usize,
        name: String,
    },
    BetweenStages,
    Recovery {
        since_ms: i64,
    },
    Finished {
        state: String,
    },
}

/// The live state of one followed run.
#[derive(Debug, Clone)]
pub struct Follow {
    plan: Option<Plan>,
    started_ms: Option<i64>,
    phase: Phase,
    active: BTreeMap<String, Active>,
    probes: BTreeMap<String, String>,
    applied: usize,
    reverted: usize,
}

impl Follow {
    /// A view of a run of `plan` (`None` when the plan could not be read: the view then shows
    /// the events' facts without an expected length).
    pub fn new(plan: Option<Plan>) -> Self {
        Follow {
            plan,
            started_ms: None,
            phase: Phase::NotStarted,
            active: BTreeMap::new(),
            probes: BTreeMap::new(),
            applied: 0,
            reverted: 0,
        }
    }

    /// Expected length of the run: baseline, each stage's delay and longest fault, recovery.
    pub fn expected(&self) -> Option<Duration> {
        let plan = self.plan.as_ref()?;
        let probing = plan
            .steady_state
            .as_ref()
            .map_or(Duration::ZERO, |steady| steady.baseline * 2);
        let stages: Duration = plan
            .stages
            .iter()
            .map(|stage| {
                let longest = stage
                    .faults
                    .iter()
                    .map(|fault| fault.spec.duration)
                    .max()
                    .unwrap_or_default();
                stage.after + longest
            })
            .sum();
        Some(probing + stages)
    }

    /// The latest reading of a probe, e.g. `ok 3ms` or `FAIL connection refused`.
    pub fn set_probe(&mut self, probe: &str, reading: String) {
        self.probes.insert(probe.to_string(), reading);
    }

    /// Whether the run has ended.
    pub fn finished(&self) -> Option<&str> {
        match &self.phase {
            Phase::Finished { state } => Some(state),
            _ => None,
        }
    }

    /// Takes one event of the run into account.
    pub fn observe(&mut self, event: &pb::RunEvent) {
        let at = event.at_unix_ms;
        match event.kind.as_str() {
            "run-started" => {
                self.started_ms = Some(at);
                let probing = self.plan.as_ref().is_some_and(|p| p.steady_state.is_some());
                self.phase = if probing {
                    Phase::Baseline { since_ms: at }
                } else {
                    Phase::BetweenStages
                };
            }
            "steady-state-check" => self.phase = Phase::BetweenStages,
            "stage-waiting" => {
                let after = self.stage(&event.stage).map(|(_, stage)| stage.after);
                self.phase = Phase::Waiting {
                    stage: event.stage.clone(),
                    until_ms: after.map(|after| at + millis(after)),
                };
            }
            "stage-started" => {
                let index = self.stage(&event.stage).map_or(0, |(index, _)| index);
                self.phase = Phase::Stage {
                    index,
                    name: event.stage.clone(),
                };
            }
            "fault-applied" => {
                self.applied += 1;
                let planned = self.planned_fault(&event.fault_id);
                self.active.insert(
                    event.fault_id.clone(),
                    Active {
                        agent: event.agent.clone(),
                        kind: planned.map_or_else(
                            || "fault".to_string(),
                            |fault| fault.spec.kind.name().to_string(),
                        ),
                        ends_at_ms: planned.map(|fault| at + millis(fault.spec.duration)),
                    },
                );
            }
            "fault-reverted" | "fault-revert-failed" | "fault-failed" | "fault-refused"
                if self.active.remove(&event.fault_id).is_some() =>
            {
                self.reverted += 1;
            }
            "stage-finished" => {
                let last = self
                    .plan
                    .as_ref()
                    .and_then(|plan| plan.stages.last())
                    .is_some_and(|stage| stage.name == event.stage);
                let probing = self.plan.as_ref().is_some_and(|p| p.steady_state.is_some());
                self.phase = if last && probing {
                    Phase::Recovery { since_ms: at }
                } else {
                    Phase::BetweenStages
                };
            }
            _ => {}
        }
        if !event.final_state.is_empty() {
            self.active.clear();
            self.phase = Phase::Finished {
                state: event.final_state.clone(),
            };
        }
    }

    /// What to show at `now_ms`.
    pub fn status(&self, now_ms: i64) -> Status {
        let elapsed_ms = self
            .started_ms
            .map_or(0, |start| u64::try_from(now_ms - start).unwrap_or(0));
        let expected_ms = self.expected().map(millis_u64);
        let baseline = self
            .plan
            .as_ref()
            .and_then(|plan| plan.steady_state.as_ref())
            .map(|steady| steady.baseline);
        let stage_count = self.plan.as_ref().map(|plan| plan.stages.len());
        let mut parts = vec![match &self.phase {
            Phase::NotStarted => "starting".to_string(),
            Phase::Baseline { since_ms } => format!(
                "baseline{}",
                baseline.map_or(String::new(), |b| countdown(since_ms + millis(b), now_ms))
            ),
            Phase::Waiting { stage, until_ms } => format!(
                "waiting for stage {stage}{}",
                until_ms.map_or(String::new(), |until| countdown(until, now_ms))
            ),
            Phase::Stage { index, name } => match stage_count {
                Some(count) => format!("stage {}/{count} {name}", index + 1),
                None => format!("stage {name}"),
            },
            Phase::BetweenStages => "between stages".to_string(),
            Phase::Recovery { since_ms } => format!(
                "recovery check{}",
                baseline.map_or(String::new(), |b| countdown(since_ms + millis(b), now_ms))
            ),
            Phase::Finished { state } => format!("run {state}"),
        }];
        if !self.active.is_empty() {
            let faults: Vec<String> = self
                .active
                .values()
                .map(|fault| {
                    let left = fault
                        .ends_at_ms
                        .map_or(String::new(), |end| countdown(end, now_ms));
                    format!("{}@{}{left}", fault.kind, fault.agent)
                })
                .collect();
            parts.push(format!("in force: {}", faults.join(", ")));
        }
        parts.push(format!(
            "applied {} reverted {}",
            self.applied, self.reverted
        ));
        if !self.probes.is_empty() {
            let probes: Vec<String> = self
                .probes
                .iter()
                .map(|(name, reading)| format!("{name} {reading}"))
                .collect();
            parts.push(probes.join(", "));
        }
        Status {
            elapsed_ms,
            expected_ms,
            line: parts.join(" | "),
        }
    }

    fn stage(&self, name: &str) -> Option<(usize, &faultline_domain::plan::Stage)> {
        self.plan
            .as_ref()?
            .stages
            .iter()
            .enumerate()
            .find(|(_, stage)| stage.name == name)
    }

    /// The planned fault behind a fault id `RUN/STAGE/INDEX`.
    fn planned_fault(&self, fault_id: &str) -> Option<&faultline_domain::plan::PlannedFault> {
        let mut parts = fault_id.rsplitn(3, '/');
        let index: usize = parts.next()?.parse().ok()?;
        let stage = parts.next()?;
        self.stage(stage)?.1.faults.get(index)
    }
}

/// ` (3s left)`, or ` (due)` once the moment has passed.
fn countdown(until_ms: i64, now_ms: i64) -> String {
    let left = until_ms - now_ms;
    if left <= 0 {
        " (due)".to_string()
    } else {
        // Whole seconds, rounded up: a countdown never shows 0 while time is left.
        let seconds = u64::try_from(left).unwrap_or(0).div_ceil(1000);
        format!(" ({} left)", format_duration(Duration::from_secs(seconds)))
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn millis_u64(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_domain::plan::parse_plan;

    const PLAN: &str = r#"
apiVersion: faultline/v1
title: follow
steady_state:
  probes:
    - { name: api, kind: tcp, address: "127.0.0.1:9", interval: 200ms }
  baseline: 2s
stages:
  - name: one
    faults:
      - { kind: container-pause, agent: a1, target: { container: db }, duration: 4s }
  - name: two
    after: 1s
    faults:
      - { kind: container-pause, agent: a2, target: { container: api }, duration: 3s }
      - { kind: container-pause, agent: a3, target: { container: web }, duration: 5s }
"#;

    fn ev(kind: &str, at: i64, stage: &str, agent: &str, fault_id: &str) -> pb::RunEvent {
        pb::RunEvent {
            kind: kind.into(),
            at_unix_ms: at,
            stage: stage.into(),
            agent: agent.into(),
            fault_id: fault_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_expected_length_adds_baseline_recovery_delays_and_longest_faults() {
        let follow = Follow::new(Some(parse_plan(PLAN).unwrap()));
        // 2s baseline + 4s + (1s + 5s) + 2s recovery.
        assert_eq!(follow.expected(), Some(Duration::from_secs(14)));
        assert_eq!(Follow::new(None).expected(), None);
    }

    #[test]
    fn the_status_follows_phases_countdowns_and_faults_in_force() {
        let mut follow = Follow::new(Some(parse_plan(PLAN).unwrap()));
        let t0 = 1_000_000;
        assert_eq!(follow.status(t0).line, "starting | applied 0 reverted 0");
        follow.observe(&ev("run-started", t0, "", "", ""));
        let status = follow.status(t0 + 500);
        assert_eq!(status.elapsed_ms, 500);
        assert_eq!(status.expected_ms, Some(14_000));
        assert_eq!(status.line, "baseline (2s left) | applied 0 reverted 0");

        follow.observe(&ev("steady-state-check", t0 + 2000, "", "", ""));
        follow.observe(&ev("stage-started", t0 + 2000, "one", "", ""));
        follow.observe(&ev("fault-applied", t0 + 2100, "one", "a1", "r/one/0"));
        assert_eq!(
            follow.status(t0 + 3000).line,
            "stage 1/2 one | in force: container-pause@a1 (4s left) | applied 1 reverted 0"
        );
        follow.observe(&ev("fault-reverted", t0 + 6100, "one", "a1", "r/one/0"));
        follow.observe(&ev("stage-finished", t0 + 6100, "one", "", ""));
        follow.observe(&ev("stage-waiting", t0 + 6100, "two", "", ""));
        assert_eq!(
            follow.status(t0 + 6200).line,
            "waiting for stage two (1s left) | applied 1 reverted 1"
        );
        follow.observe(&ev("stage-started", t0 + 7100, "two", "", ""));
        follow.observe(&ev("fault-applied", t0 + 7200, "two", "a2", "r/two/0"));
        follow.observe(&ev("fault-applied", t0 + 7200, "two", "a3", "r/two/1"));
        follow.set_probe("api", "FAIL refused".into());
        assert_eq!(
            follow.status(t0 + 9300).line,
            "stage 2/2 two | in force: container-pause@a2 (1s left), \
             container-pause@a3 (3s left) | applied 3 reverted 1 | api FAIL refused"
        );
        // A countdown past its moment says so instead of going negative.
        assert!(follow.status(t0 + 20_000).line.contains("(due)"));
        follow.observe(&ev("fault-reverted", t0 + 10_200, "two", "a2", "r/two/0"));
        follow.observe(&ev("fault-reverted", t0 + 12_200, "two", "a3", "r/two/1"));
        follow.observe(&ev("stage-finished", t0 + 12_200, "two", "", ""));
        assert!(
            follow
                .status(t0 + 12_300)
                .line
                .starts_with("recovery check (2s left)")
        );
        assert_eq!(follow.finished(), None);
        let mut last = ev("run-finished", t0 + 14_300, "", "", "");
        last.final_state = "completed".into();
        follow.observe(&last);
        assert_eq!(follow.finished(), Some("completed"));
        assert!(follow.status(t0 + 14_300).line.starts_with("run completed"));
    }

    #[test]
    fn without_a_plan_the_view_still_counts_faults() {
        let mut follow = Follow::new(None);
        follow.observe(&ev("run-started", 0, "", "", ""));
        follow.observe(&ev("stage-started", 0, "x", "", ""));
        follow.observe(&ev("fault-applied", 10, "x", "a1", "r/x/0"));
        let status = follow.status(100);
        assert_eq!(status.expected_ms, None);
        assert_eq!(
            status.line,
            "stage x | in force: fault@a1 | applied 1 reverted 0"
        );
    }
}
