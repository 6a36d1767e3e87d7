//! `faultline lab up | down | status | demo`: a fleet on the local Docker Engine — a coordinator
//! and agent hosts, each its own container on a private network — with the demo stack the
//! game-day plans break (see `faultline_lab::fleet` and `faultline_lab::stack`), and the demo
//! that runs the multi-service cascade against it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use faultline_domain::plan::{ExpandedPlan, PlanInputs, parse_plan_with, render_errors};
use faultline_lab::fleet::{self, Fleet, FleetConfig, LabContainer};
use faultline_proto::v1 as pb;

use crate::report;

/// The plan `lab demo` runs, shipped as `examples/game-day/10-multi-service-cascade.yaml`.
const DEMO_PLAN: &str = include_str!("../../examples/game-day/10-multi-service-cascade.yaml");
/// The probe list it includes, embedded the same way so the binary needs no checkout.
const DEMO_PROBES: &str = include_str!("../../examples/game-day/probes/trading.yaml");
/// The include path the plan uses for [`DEMO_PROBES`].
const DEMO_PROBES_PATH: &str = "probes/trading.yaml";
/// How the plan is named in the coordinator's records.
const DEMO_SOURCE: &str =
    "examples/game-day/10-multi-service-cascade.yaml (embedded in faultline lab demo)";

/// `lab up`: builds the images if needed, starts what is not running, waits for the agents
/// (and the stack, unless `no_stack`), and says how to reach the coordinator.
pub async fn up(dir: &Path, agents: &[String], no_stack: bool) -> anyhow::Result<ExitCode> {
    let fleet = bring_up(dir, agents, !no_stack).await?;
    print_fleet(&fleet);
    println!("\nthen: faultline agents list; faultline run PLAN --follow; faultline lab down");
    Ok(ExitCode::SUCCESS)
}

async fn bring_up(dir: &Path, agents: &[String], stack: bool) -> anyhow::Result<Fleet> {
    let bin_dir = faultline_lab::local::sibling_bin_dir()
        .context("finding faultline-coordinator and faultline-agent next to this binary")?;
    let config = FleetConfig {
        dir: dir.to_path_buf(),
        agents: agents.to_vec(),
        bin_dir,
        stack,
    };
    fleet::up(&config).await.context("bringing the lab up")
}

fn print_fleet(fleet: &Fleet) {
    println!(
        "lab up: coordinator {} ({}), {} agent host(s){}",
        fleet.coordinator.container,
        fleet.coordinator.address,
        fleet.hosts.len(),
        if fleet.stack.is_empty() {
            String::new()
        } else {
            format!(", demo stack of {} containers", fleet.stack.len())
        }
    );
    for container in fleet.hosts.iter().chain(&fleet.stack) {
        println!("  {}", container_line(container));
    }
    if let Some(nginx) = fleet.stack.iter().find(|c| c.container == "nginx") {
        println!(
            "\norders, through nginx: http://{}/api/orders (from this machine); inside the lab \
             network: http://nginx/api/orders and {}/health",
            nginx.address,
            faultline_lab::stack::API_URL
        );
    }
    let certs = std::path::absolute(&fleet.certs).unwrap_or(fleet.certs.clone());
    println!("\nexport FAULTLINE_COORDINATOR={}", fleet.url);
    println!("export FAULTLINE_CERTS={}", certs.display());
}

/// `agent-1  faultline-lab-agent-1  172.20.0.3  running` (and `on agent-2` for the stack).
fn container_line(c: &LabContainer) -> String {
    let line = format!(
        "{:<16} {:<28} {:<15} {}",
        c.role, c.container, c.address, c.state
    );
    if c.host.is_empty() {
        line
    } else {
        format!("{line:<70} on {}", c.host)
    }
}

/// `lab down`: removes every container, network and image of the lab, agents first.
pub async fn down() -> anyhow::Result<ExitCode> {
    let removed = fleet::down().await.context("taking the lab down")?;
    println!(
        "lab down: removed {} container(s), {} network(s), {} image(s); nothing labelled {} is left",
        removed.containers.len(),
        removed.networks.len(),
        removed.images.len(),
        fleet::LABEL
    );
    Ok(ExitCode::SUCCESS)
}

/// `lab status`: the lab's containers; exit 1 when the lab is not (fully) running.
pub async fn status() -> anyhow::Result<ExitCode> {
    let found = fleet::status().await.context("listing the lab")?;
    if found.is_empty() {
        println!("lab: down (no containers labelled {})", fleet::LABEL);
        return Ok(ExitCode::from(1));
    }
    for c in &found {
        println!("{}", container_line(c));
    }
    let all_running = found.iter().all(|c| c.state == "running");
    Ok(if all_running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The demo plan with its include resolved, as the coordinator gets it.
pub(crate) fn demo_plan() -> anyhow::Result<ExpandedPlan> {
    let read = |path: &str| -> Result<String, String> {
        if path == DEMO_PROBES_PATH {
            Ok(DEMO_PROBES.to_string())
        } else {
            Err(format!("not embedded in faultline: {path}"))
        }
    };
    let inputs = PlanInputs {
        vars: &[],
        include: Some(&read),
    };
    parse_plan_with(DEMO_PLAN, &inputs).map_err(|errors| {
        anyhow::anyhow!(
            "the embedded demo plan is invalid:\n{}",
            render_errors(DEMO_SOURCE, &errors)
        )
    })
}

/// `lab demo`: the lab with its stack, the multi-service cascade against it followed live,
/// the findings, and an HTML report written to `dir`. The lab is left up to explore.
pub async fn demo(dir: &Path, agents: &[String]) -> anyhow::Result<ExitCode> {
    let ExpandedPlan { plan, text } = demo_plan()?;
    println!("Faultline lab demo: {}", plan.title);
    println!(
        "\n[1/3] Bringing up the lab: a coordinator, {} agent hosts and the demo stack \
         (postgres, redis, trading-api, nginx, market-simulator), images built from this \
         machine's binaries",
        agents.len()
    );
    let fleet = bring_up(dir, agents, true).await?;
    print_fleet(&fleet);

    println!(
        "\n[2/3] Running {DEMO_SOURCE}: {} stage(s), {} fault(s) on {}",
        plan.stages.len(),
        plan.total_faults(),
        plan.agents().into_iter().collect::<Vec<_>>().join(", ")
    );
    let mut client = fleet
        .operator_client()
        .context("connecting to the lab's coordinator")?;
    let run_id = client
        .start_run(pb::StartRunRequest {
            source_name: DEMO_SOURCE.to_string(),
            plan_yaml: text,
        })
        .await
        .map_err(|status| anyhow::anyhow!("the coordinator refused the run: {status}"))?
        .into_inner()
        .run_id;
    println!("run {run_id} started: {}", plan.title);
    let followed = crate::follow_run(&mut client, &run_id, Some(plan)).await?;

    println!("\n[3/3] Findings");
    let detail = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .map_err(|status| anyhow::anyhow!("reading run {run_id} back: {status}"))?
        .into_inner();
    let built = report::build_report(&detail);
    print!("{}", report::render_text(&built));
    let html = report_path(dir, &run_id);
    std::fs::write(&html, report::render_html(&built))
        .with_context(|| format!("writing {}", html.display()))?;
    let html = std::path::absolute(&html).unwrap_or(html);
    println!("\nHTML report: {}", html.display());

    let certs = std::path::absolute(&fleet.certs).unwrap_or(fleet.certs.clone());
    println!(
        "\nThe lab is still up, to explore:\n  export FAULTLINE_COORDINATOR={}\n  export \
         FAULTLINE_CERTS={}\n  faultline runs show {run_id}\n  faultline run \
         examples/game-day/01-database-sudden-death.yaml --follow\nTear it all down with: \
         faultline lab down",
        fleet.url,
        certs.display()
    );
    if followed != ExitCode::SUCCESS {
        bail!("run {run_id} did not complete (see the findings above)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `DIR/report-RUN.html`.
fn report_path(dir: &Path, run_id: &str) -> PathBuf {
    dir.join(format!("report-{run_id}.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_demo_plan_is_the_cascade_on_the_three_lab_agents() {
        let ExpandedPlan { plan, text } = demo_plan().expect("valid");
        assert_eq!(plan.stages.len(), 3);
        assert_eq!(
            plan.agents().into_iter().collect::<Vec<_>>(),
            ["agent-1", "agent-2", "agent-3"]
        );
        // The include is inlined for the coordinator, with the lab's names.
        assert!(text.contains("http://trading-api:8080/health"), "{text}");
        assert!(text.contains("pg_isready"), "{text}");
    }

    #[test]
    fn stack_lines_say_which_host_they_stand_on() {
        let mut c = LabContainer {
            role: "postgres".into(),
            container: "postgres".into(),
            address: "172.20.0.5".into(),
            state: "running".into(),
            host: "agent-2".into(),
        };
        let line = container_line(&c);
        assert!(line.starts_with("postgres "), "{line}");
        assert!(line.ends_with(" on agent-2"), "{line}");
        assert_eq!(line.split_whitespace().nth(2), Some("172.20.0.5"));
        c.host.clear();
        assert!(container_line(&c).ends_with("running"));
    }

    #[test]
    fn the_report_goes_into_the_lab_directory() {
        assert_eq!(
            report_path(Path::new("faultline-lab"), "r-1"),
            PathBuf::from("faultline-lab/report-r-1.html")
        );
    }
}
