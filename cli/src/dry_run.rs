//! `faultline run --dry-run`: what a run of a plan would do, grouped by agent, and whether the
//! coordinator would start it at all. Nothing is applied; the coordinator records no run.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use faultline_domain::duration::format_duration;
use faultline_proto::v1 as pb;

/// Success only when the run would start and every fault resolved on its agent.
pub fn exit_code(answer: &pb::DryRunResponse) -> ExitCode {
    if answer.refusals.is_empty() && failures(answer) == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn failures(answer: &pb::DryRunResponse) -> usize {
    answer
        .faults
        .iter()
        .filter(|fault| fault.result.as_ref().is_none_or(|r| !r.error.is_empty()))
        .count()
}

/// The dry run as text: the verdict, then each agent's faults with their exact actions.
pub fn render(answer: &pb::DryRunResponse) -> String {
    let mut out = format!("dry run of \"{}\" — nothing was applied\n", answer.title);
    if answer.refusals.is_empty() {
        out.push_str("the coordinator would start this run\n");
    } else {
        out.push_str("the coordinator would REFUSE this run:\n");
        for refusal in &answer.refusals {
            for (index, line) in refusal.lines().enumerate() {
                let lead = if index == 0 { "  - " } else { "    " };
                out.push_str(&format!("{lead}{line}\n"));
            }
        }
    }
    let mut by_agent: BTreeMap<&str, Vec<&pb::DryRunFaultReport>> = BTreeMap::new();
    for fault in &answer.faults {
        by_agent.entry(&fault.agent).or_default().push(fault);
    }
    for (agent, faults) in by_agent {
        out.push_str(&format!("\nagent {agent}:\n"));
        for fault in faults {
            out.push_str(&format!(
                "  [{}#{}] {} on {} for {}\n",
                fault.stage,
                fault.index,
                fault.kind,
                fault.target,
                format_duration(Duration::from_millis(fault.duration_ms))
            ));
            let Some(result) = &fault.result else {
                out.push_str("    NOT RESOLVED: no answer\n");
                continue;
            };
            if !result.error.is_empty() {
                out.push_str(&format!("    NOT RESOLVED: {}\n", result.error));
                continue;
            }
            out.push_str(&format!("    target:    {}\n", result.resolved));
            out.push_str(&format!("    mechanism: {}\n", result.mechanism));
            for action in &result.actions {
                // Multi-line actions (a here-doc script) keep their shape, indented.
                for (index, line) in action.lines().enumerate() {
                    let lead = if index == 0 { "    $ " } else { "      " };
                    out.push_str(&format!("{lead}{line}\n"));
                }
            }
        }
    }
    let failed = failures(answer);
    out.push_str(&format!(
        "\n{} fault(s), {} resolved, {} not resolved, {} refusal(s)\n",
        answer.faults.len(),
        answer.faults.len() - failed,
        failed,
        answer.refusals.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(agent: &str, stage: &str, error: &str, actions: &[&str]) -> pb::DryRunFaultReport {
        pb::DryRunFaultReport {
            stage: stage.into(),
            index: 0,
            agent: agent.into(),
            kind: "partition".into(),
            target: "container=db".into(),
            duration_ms: 30_000,
            result: Some(pb::DryRunResult {
                resolved: "container 0123456789ab (db)".into(),
                mechanism: "nft".into(),
                actions: actions.iter().map(ToString::to_string).collect(),
                error: error.into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_clean_dry_run_lists_actions_by_agent_and_succeeds() {
        let answer = pb::DryRunResponse {
            title: "t".into(),
            refusals: vec![],
            faults: vec![
                fault("b", "two", "", &["nft -f -"]),
                fault(
                    "a",
                    "one",
                    "",
                    &["nft add table inet flt1", "nft add rule x"],
                ),
            ],
        };
        let text = render(&answer);
        assert!(text.contains("would start"), "{text}");
        let a = text.find("agent a:").unwrap();
        let b = text.find("agent b:").unwrap();
        assert!(a < b, "agents are sorted: {text}");
        assert!(text.contains("    $ nft add table inet flt1\n"), "{text}");
        assert!(
            text.contains("[one#0] partition on container=db for 30s"),
            "{text}"
        );
        assert!(text.contains("2 fault(s), 2 resolved, 0 not resolved, 0 refusal(s)"));
        assert_eq!(exit_code(&answer), ExitCode::SUCCESS);
    }

    #[test]
    fn refusals_and_unresolved_faults_fail() {
        let refused = pb::DryRunResponse {
            title: "t".into(),
            refusals: vec!["halt is engaged\nsince 10:00".into()],
            faults: vec![fault("a", "one", "", &[])],
        };
        let text = render(&refused);
        assert!(text.contains("would REFUSE"), "{text}");
        assert!(
            text.contains("  - halt is engaged\n    since 10:00\n"),
            "{text}"
        );
        assert_eq!(exit_code(&refused), ExitCode::FAILURE);

        let unresolved = pb::DryRunResponse {
            title: "t".into(),
            refusals: vec![],
            faults: vec![fault("a", "one", "no container named db", &[])],
        };
        let text = render(&unresolved);
        assert!(
            text.contains("NOT RESOLVED: no container named db"),
            "{text}"
        );
        assert_eq!(exit_code(&unresolved), ExitCode::FAILURE);
    }
}
