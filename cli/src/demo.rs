//! `faultline demo`: a real multi-host game-day on one machine, with nothing to configure.
//!
//! It starts a coordinator and three agents as separate processes (three "hosts", each with its
//! own identity, state and log), three throwaway containers built from host binaries, runs the
//! embedded cascade plan (`examples/demo-cascade.yaml`) through the coordinator over mTLS,
//! prints every event live, then the findings of the stored run, checks that every target is
//! running again, and tears everything down — also on Ctrl-C, when the agents revert whatever
//! they still hold before they exit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use faultline_domain::fault::TargetSelector;
use faultline_domain::plan::{Plan, parse_plan, render_errors};
use faultline_lab::LabError;
use faultline_lab::docker;
use faultline_lab::local::{
    Certs, Layout, LocalCluster, LocalClusterConfig, OperatorClient, STOP_GRACE, sibling_bin_dir,
};
use faultline_proto::v1 as pb;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The plan the demo runs, shipped as `examples/demo-cascade.yaml`.
pub(crate) const PLAN_YAML: &str = include_str!("../../examples/demo-cascade.yaml");
/// How the plan is named in the coordinator's records.
const PLAN_SOURCE: &str = "examples/demo-cascade.yaml (embedded in faultline demo)";
/// One agent per simulated host.
const AGENTS: [&str; 3] = ["agent-1", "agent-2", "agent-3"];
/// The demo containers, in the order the plan hits them.
const CONTAINERS: [&str; 3] = [
    "faultline-demo-db",
    "faultline-demo-cache",
    "faultline-demo-api",
];
/// Image of the demo containers, built from host binaries (bump the tag when they change).
const IMAGE: &str = "faultline-demo-sleeper:1";
const IMAGE_BINARIES: &[&str] = &["/bin/sleep", "/bin/sh"];
const IMAGE_CMD: &[&str] = &["/bin/sleep", "infinity"];
/// Carried by the image and every demo container.
pub(crate) const DEMO_LABEL: &str = "faultline.demo=1";
/// Number of steps printed as `[n/STEPS]`.
const STEPS: u32 = 6;
/// How long the agents may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for the whole run (the plan itself takes about 8s).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a reverted container may take to report `running`.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(15);

/// Writes a line to stdout, ignoring failures: a closed terminal or pipe must not abort the
/// demo half-way, before it has torn down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn step(number: u32, text: &str) {
    say!("\n[{number}/{STEPS}] {text}");
}

/// Runs the demo in `dir`; `keep` leaves the demo containers behind.
pub(crate) async fn run(dir: &Path, keep: bool) -> anyhow::Result<ExitCode> {
    say!("Faultline demo: a game-day across three hosts, all on this machine.");
    step(1, "Checking prerequisites");
    let bin_dir = match check_prerequisites().await {
        Ok(bin_dir) => bin_dir,
        Err(problems) => {
            for problem in problems {
                eprintln!("  missing: {problem}");
            }
            eprintln!("Nothing was started.");
            return Ok(ExitCode::FAILURE);
        }
    };
    let work_dir = prepare_work_dir(dir)?;
    // Listen before anything is started, so no signal can kill us between a spawn and the
    // teardown. The processes run in their own process group: Ctrl-C reaches only us.
    let mut interrupts = Interrupts::listen()?;

    let mut session = Session::new(keep);
    let verdict = tokio::select! {
        result = game_day(&mut session, &work_dir, &bin_dir) => match result {
            Ok(problems) if problems.is_empty() => Verdict::Passed,
            Ok(problems) => Verdict::Failed(problems),
            Err(err) => Verdict::Error(err),
        },
        name = interrupts.recv() => Verdict::Interrupted(name),
    };
    match &verdict {
        Verdict::Passed | Verdict::Failed(_) => {}
        Verdict::Interrupted(name) => say!(
            "\n{name} received: stopping now; the agents revert every fault they hold on SIGTERM"
        ),
        Verdict::Error(err) => eprintln!("\ndemo failed: {err:#}"),
    }
    teardown(&mut session, &work_dir).await;

    match verdict {
        Verdict::Passed => {
            say!("\nDemo passed: every fault was applied, verified and reverted.");
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Failed(problems) => {
            say!("\nDemo FAILED:");
            for problem in problems {
                say!("  - {problem}");
            }
            Ok(ExitCode::FAILURE)
        }
        Verdict::Interrupted(_) => Ok(ExitCode::from(130)),
        Verdict::Error(_) => Ok(ExitCode::FAILURE),
    }
}

enum Verdict {
    Passed,
    Failed(Vec<String>),
    Interrupted(&'static str),
    Error(anyhow::Error),
}

/// SIGINT, SIGTERM and SIGHUP, any of which ends the demo (with a teardown).
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    fn listen() -> anyhow::Result<Self> {
        let listen = |kind| signal(kind).context("installing a signal handler");
        Ok(Self {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
            hup: listen(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C (SIGINT)",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Everything started so far, for the teardown.
struct Session {
    cluster: Option<LocalCluster>,
    containers: DemoContainers,
    run_id: Option<String>,
    /// Whether the findings already checked the containers.
    restoration_checked: bool,
}

impl Session {
    fn new(keep: bool) -> Self {
        Self {
            cluster: None,
            containers: DemoContainers {
                names: Vec::new(),
                keep,
            },
            run_id: None,
            restoration_checked: false,
        }
    }
}

/// Lists every missing prerequisite, or returns the directory of the sibling binaries.
async fn check_prerequisites() -> Result<PathBuf, Vec<String>> {
    let mut problems = Vec::new();
    match docker::engine_version().await {
        Ok(version) => say!("  docker engine {version}: reachable"),
        Err(err) => problems.push(explain_docker_error(&err)),
    }
    let bin_dir = match sibling_bin_dir() {
        Ok(dir) => {
            say!(
                "  faultline-coordinator and faultline-agent: found in {}",
                dir.display()
            );
            Some(dir)
        }
        Err(err) => {
            problems.push(format!("the coordinator and agent binaries: {err}"));
            None
        }
    };
    match bin_dir {
        Some(dir) if problems.is_empty() => Ok(dir),
        _ => Err(problems),
    }
}

fn explain_docker_error(err: &LabError) -> String {
    match err {
        LabError::Spawn { .. } => format!(
            "the docker CLI ({err}); install Docker Engine \
             (https://docs.docker.com/engine/install/) and make sure `docker` is on PATH"
        ),
        LabError::CommandFailed { stderr, .. } => format!(
            "a reachable Docker engine (`docker version` says: {stderr}); start the engine \
             (e.g. `sudo systemctl start docker`) and make sure you may use it (run as root or \
             join the `docker` group)"
        ),
        other => format!("a responsive Docker engine: {other}"),
    }
}

/// Creates the work directory and returns its absolute path.
fn prepare_work_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the work directory {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("resolving the work directory {}", dir.display()))
}

/// Steps 2 to 5; returns the problems found (none: the demo passed).
async fn game_day(
    session: &mut Session,
    work_dir: &Path,
    bin_dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let plan = demo_plan()?;

    step(
        2,
        "Starting a local cluster: a coordinator and three agents (three hosts)",
    );
    let config = LocalClusterConfig {
        work_dir: work_dir.to_path_buf(),
        agents: AGENTS.iter().map(|a| a.to_string()).collect(),
        bin_dir: bin_dir.to_path_buf(),
        connect_timeout: CONNECT_TIMEOUT,
    };
    let layout = Layout::new(work_dir);
    say!("  work directory {}", work_dir.display());
    let cluster = session.cluster.insert(
        LocalCluster::start(&config)
            .await
            .context("starting the local cluster")?,
    );
    match cluster.certs() {
        Certs::Created => say!("  certificates: created in {}", layout.certs.display()),
        Certs::Reused => say!("  certificates: reused from {}", layout.certs.display()),
        Certs::Extended(agents) => say!(
            "  certificates: reused, issued for {} in {}",
            agents.join(", "),
            layout.certs.display()
        ),
    }
    if let Some(coordinator) = cluster.coordinator() {
        say!(
            "  coordinator  pid {:<7} listening on {} (mTLS)",
            coordinator.pid(),
            cluster.addr()
        );
    }
    for agent in cluster.agents() {
        say!(
            "  {:<12} pid {:<7} state {}",
            agent.name(),
            agent.pid(),
            layout.agent_state(agent.name()).display()
        );
    }
    say!("  all {} agents connected", AGENTS.len());
    let mut client = cluster.operator_client()?;

    step(3, "Starting the demo containers");
    let existed = docker::image_exists(IMAGE).await?;
    faultline_lab::image::ensure_image(IMAGE, IMAGE_BINARIES, IMAGE_CMD, &[DEMO_LABEL])
        .await
        .with_context(|| format!("building the demo image {IMAGE}"))?;
    if existed {
        say!("  image {IMAGE}: present");
    } else {
        say!(
            "  image {IMAGE}: built from {} (no registry needed)",
            IMAGE_BINARIES.join(" and ")
        );
    }
    for name in CONTAINERS {
        let (id, replaced) = session.containers.start(name).await?;
        let short = id.get(..12).unwrap_or(&id);
        let note = if replaced {
            " (replaced a stale one)"
        } else {
            ""
        };
        say!("  {name:<21} running  {short}  network none{note}");
    }

    step(4, "Running the cascade plan");
    for line in describe_plan(&plan) {
        say!("  {line}");
    }
    let run_id = client
        .start_run(pb::StartRunRequest {
            source_name: PLAN_SOURCE.to_string(),
            plan_yaml: PLAN_YAML.to_string(),
        })
        .await
        .context("starting the run")?
        .into_inner()
        .run_id;
    session.run_id = Some(run_id.clone());
    say!("  run {run_id} started; live events:");
    let final_state = tokio::time::timeout(RUN_TIMEOUT, watch(&mut client, &run_id))
        .await
        .map_err(|_| anyhow!("run {run_id} did not end within {RUN_TIMEOUT:?}"))??;

    step(5, "Findings");
    let detail = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .context("reading the stored run")?
        .into_inner();
    let summary = detail.summary.clone().unwrap_or_default();
    let mut problems = Vec::new();
    say!("  final state  {} (streamed: {final_state})", summary.state);
    if !detail.reason.is_empty() {
        say!("  reason       {}", detail.reason);
    }
    if summary.state != "completed" {
        problems.push(format!(
            "the run ended {}: {}",
            summary.state, detail.reason
        ));
    }
    let findings = collect_findings(&plan, &run_id, &detail.events);
    let base = run_start_ms(&detail.events);
    say!(
        "  run started  {} (the times below count from it)",
        rfc3339(base)
    );
    for finding in &findings {
        say!("{}", finding.render(findings.len(), base));
    }
    let good = findings.iter().filter(|f| f.problem().is_none()).count();
    say!(
        "  {good} of {} faults applied, verified and reverted",
        findings.len()
    );
    problems.extend(findings.iter().filter_map(Finding::problem));

    let not_restored = check_restored().await;
    session.restoration_checked = true;
    if not_restored.is_empty() {
        say!(
            "  docker inspect: {} are running: all targets restored",
            CONTAINERS.join(", ")
        );
    } else {
        for (name, state) in &not_restored {
            say!("  docker inspect: {name} is {state}, not running: NOT restored");
            problems.push(format!("{name} was not restored: it is {state}"));
        }
    }
    Ok(problems)
}

/// The embedded plan, parsed.
fn demo_plan() -> anyhow::Result<Plan> {
    parse_plan(PLAN_YAML).map_err(|errors| {
        anyhow!(
            "the embedded plan is invalid:\n{}",
            render_errors(PLAN_SOURCE, &errors)
        )
    })
}

/// One line per stage and per fault: what will happen, where, for how long.
fn describe_plan(plan: &Plan) -> Vec<String> {
    let mut lines = vec![format!(
        "plan: {} ({} stages, {} faults on {})",
        plan.title,
        plan.stages.len(),
        plan.total_faults(),
        plan.agents().into_iter().collect::<Vec<_>>().join(", ")
    )];
    for (index, stage) in plan.stages.iter().enumerate() {
        let after = if stage.after.is_zero() {
            String::new()
        } else {
            format!(
                ", {} after the previous stage",
                humantime::format_duration(stage.after)
            )
        };
        lines.push(format!("stage {} {}{after}:", index + 1, stage.name));
        for fault in &stage.faults {
            lines.push(format!(
                "  {} {} via {} for {}",
                fault.spec.kind.name(),
                target_text(&fault.spec.target),
                fault.agent,
                humantime::format_duration(fault.spec.duration)
            ));
        }
    }
    lines
}

fn target_text(target: &TargetSelector) -> String {
    match target {
        TargetSelector::Container(name) => name.clone(),
        other => other.to_string(),
    }
}

/// Follows the run, printing each event with its time since the run started; returns the
/// final state.
async fn watch(client: &mut OperatorClient, run_id: &str) -> anyhow::Result<String> {
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .context("watching the run")?
        .into_inner();
    let mut base = None;
    while let Some(event) = stream.message().await.context("watching the run")? {
        let start = *base.get_or_insert(event.at_unix_ms);
        say!("{}", format_live(&event, start));
        if !event.final_state.is_empty() {
            return Ok(event.final_state);
        }
    }
    bail!("the coordinator closed the event stream before run {run_id} ended")
}

/// `+3.2s` for `at_ms` relative to `base_ms` (never negative).
fn relative(at_ms: i64, base_ms: i64) -> String {
    let ms = (at_ms - base_ms).max(0);
    format!("+{}.{}s", ms / 1000, (ms % 1000) / 100)
}

/// A live event line: relative time, kind, agent, stage, message.
fn format_live(event: &pb::RunEvent, base_ms: i64) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    format!(
        "  {:>7}  {:<24} {:<8} {:<9} {}",
        relative(event.at_unix_ms, base_ms),
        event.kind,
        dash(&event.agent),
        dash(&event.stage),
        event.message
    )
}

/// When the run started: its first event.
fn run_start_ms(events: &[pb::RunEvent]) -> i64 {
    events.first().map(|e| e.at_unix_ms).unwrap_or_default()
}

/// A Unix time in milliseconds as RFC 3339 UTC, e.g. `2025-01-31T12:00:00.123Z`.
fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default());
    humantime::format_rfc3339_millis(at).to_string()
}

/// An event's time and message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    at_ms: i64,
    message: String,
}

/// What the stored run says about one planned fault.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    number: usize,
    stage: String,
    agent: String,
    kind: &'static str,
    target: String,
    applied: Option<Stamp>,
    reverted: Option<Stamp>,
    /// The last failure event (`fault-failed`, `fault-revert-failed`...), if any.
    failure: Option<Stamp>,
}

impl Finding {
    /// The agent verified the fault in force ("verified: container is paused").
    fn verified(&self) -> bool {
        self.applied
            .as_ref()
            .is_some_and(|a| a.message.contains("verified"))
    }

    /// How long the fault was in force, from the applied to the reverted report.
    fn in_force(&self) -> Option<Duration> {
        let (applied, reverted) = (self.applied.as_ref()?, self.reverted.as_ref()?);
        u64::try_from(reverted.at_ms - applied.at_ms)
            .ok()
            .map(Duration::from_millis)
    }

    /// Why and how it was reverted, from `reverted (REASON): DETAIL`.
    fn revert_reason(&self) -> Option<(&str, &str)> {
        let message = self.reverted.as_ref()?.message.as_str();
        let rest = message.strip_prefix("reverted (")?;
        rest.split_once("): ")
            .or_else(|| rest.strip_suffix(')').map(|reason| (reason, "")))
    }

    /// Why this fault does not count as a success, if it does not.
    fn problem(&self) -> Option<String> {
        let who = format!("{} on {} via {}", self.kind, self.target, self.agent);
        if let Some(failure) = &self.failure {
            return Some(format!("{who}: {}", failure.message));
        }
        if self.applied.is_none() {
            return Some(format!("{who}: never applied"));
        }
        if !self.verified() {
            return Some(format!("{who}: applied but not verified"));
        }
        if self.reverted.is_none() {
            return Some(format!("{who}: no revert was recorded"));
        }
        None
    }

    /// A block of lines for the findings; times are relative to `base_ms`.
    fn render(&self, total: usize, base_ms: i64) -> String {
        let mut out = format!(
            "  [{}/{total}] {}: {} via {} (stage {})",
            self.number, self.target, self.kind, self.agent, self.stage
        );
        let mut line = |label: &str, value: String| {
            let _ = write!(out, "\n        {label:<11} {value}");
        };
        match &self.applied {
            Some(applied) => line(
                "applied",
                format!("{}  {}", relative(applied.at_ms, base_ms), applied.message),
            ),
            None => line("applied", "never".to_string()),
        }
        line(
            "verified",
            if self.verified() { "yes" } else { "NO" }.to_string(),
        );
        match &self.reverted {
            Some(reverted) => line(
                "reverted",
                match self.revert_reason() {
                    Some((reason, detail)) => format!(
                        "{}  reason: {reason}; {detail}",
                        relative(reverted.at_ms, base_ms)
                    ),
                    None => format!(
                        "{}  {}",
                        relative(reverted.at_ms, base_ms),
                        reverted.message
                    ),
                },
            ),
            None => line("reverted", "NOT recorded".to_string()),
        }
        if let Some(in_force) = self.in_force() {
            line("in force", format!("{:.2}s", in_force.as_secs_f64()));
        }
        if let Some(failure) = &self.failure {
            line(
                "problem",
                format!("{}  {}", relative(failure.at_ms, base_ms), failure.message),
            );
        }
        out
    }
}

/// One finding per planned fault, in plan order. The coordinator names the fault at index `i`
/// of stage `s` of run `r` `r/s/i`.
fn collect_findings(plan: &Plan, run_id: &str, events: &[pb::RunEvent]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for stage in &plan.stages {
        for (index, fault) in stage.faults.iter().enumerate() {
            let fault_id = format!("{run_id}/{}/{index}", stage.name);
            let mut finding = Finding {
                number: findings.len() + 1,
                stage: stage.name.clone(),
                agent: fault.agent.clone(),
                kind: fault.spec.kind.name(),
                target: target_text(&fault.spec.target),
                applied: None,
                reverted: None,
                failure: None,
            };
            for event in events.iter().filter(|e| e.fault_id == fault_id) {
                let stamp = Stamp {
                    at_ms: event.at_unix_ms,
                    message: event.message.clone(),
                };
                match event.kind.as_str() {
                    "fault-applied" => finding.applied = Some(stamp),
                    "fault-reverted" => finding.reverted = Some(stamp),
                    "fault-failed" | "fault-revert-failed" | "fault-revert-unconfirmed" => {
                        finding.failure = Some(stamp);
                    }
                    _ => {}
                }
            }
            findings.push(finding);
        }
    }
    findings
}

/// The demo containers that are not running (waiting a little for each), with their state.
async fn check_restored() -> Vec<(String, String)> {
    let mut not_running = Vec::new();
    for name in CONTAINERS {
        if docker::wait_for_state(name, "running", RESTORE_TIMEOUT)
            .await
            .is_err()
        {
            let state = docker::state(name)
                .await
                .unwrap_or_else(|err| format!("unknown ({err})"));
            not_running.push((name.to_string(), state));
        }
    }
    not_running
}

/// The demo containers started so far; removed on drop (unless kept) as a last resort.
struct DemoContainers {
    names: Vec<String>,
    keep: bool,
}

impl DemoContainers {
    /// Replaces any container of that name and starts a fresh one; returns its id and whether
    /// a stale one was replaced.
    async fn start(&mut self, name: &str) -> anyhow::Result<(String, bool)> {
        let replaced = docker::container_exists(name).await?;
        if replaced {
            docker::remove_blocking(name)
                .with_context(|| format!("removing a stale container {name}"))?;
        }
        // Recorded first: from here on the teardown removes it, whatever happens.
        self.names.push(name.to_string());
        let role = format!(
            "faultline.demo.role={}",
            name.trim_start_matches("faultline-demo-")
        );
        let id = docker::run_container(name, IMAGE, &[DEMO_LABEL, &role], &[])
            .await
            .with_context(|| format!("starting demo container {name}"))?;
        docker::wait_for_state(&id, "running", RESTORE_TIMEOUT)
            .await
            .with_context(|| format!("starting demo container {name}"))?;
        Ok((id, replaced))
    }

    /// Removes the containers unless kept; returns what was done, for the teardown report.
    fn finish(&mut self) -> Vec<String> {
        let names = std::mem::take(&mut self.names);
        if names.is_empty() {
            return Vec::new();
        }
        if self.keep {
            return vec![format!(
                "kept (--keep): {}; remove them with `docker rm -f {}`",
                names.join(", "),
                names.join(" ")
            )];
        }
        let mut report = Vec::new();
        let mut removed = Vec::new();
        for name in names {
            match docker::remove_blocking(&name) {
                Ok(()) => removed.push(name),
                Err(err) => report.push(format!("could not remove {name}: {err}")),
            }
        }
        if !removed.is_empty() {
            report.insert(0, format!("removed {}", removed.join(", ")));
        }
        report
    }
}

impl Drop for DemoContainers {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Step 6: agents (SIGTERM: they revert), coordinator, containers; then where things are.
async fn teardown(session: &mut Session, work_dir: &Path) {
    step(
        6,
        "Tearing down: agents first (they revert on SIGTERM), then the coordinator",
    );
    if let Some(cluster) = session.cluster.as_mut() {
        for stopped in cluster.stop(STOP_GRACE).await {
            say!(
                "  {:<12} pid {:<7} {}",
                stopped.name,
                stopped.pid,
                stopped.outcome
            );
        }
    } else {
        say!("  no processes were running");
    }
    if !session.restoration_checked && !session.containers.names.is_empty() {
        // The run did not reach its findings: show what the agents' shutdown left behind.
        for name in &session.containers.names {
            let state = docker::state(name)
                .await
                .unwrap_or_else(|err| format!("unknown ({err})"));
            say!("  {name} is {state} after the agents stopped");
        }
    }
    for line in session.containers.finish() {
        say!("  demo containers: {line}");
    }

    let layout = Layout::new(work_dir);
    say!(
        "\nEverything the demo recorded is in {}:",
        work_dir.display()
    );
    say!("  logs          {}", layout.logs.display());
    for process in std::iter::once("coordinator").chain(AGENTS) {
        say!("                  {}", layout.log(process).display());
    }
    say!(
        "  database      {} (runs, events, audit log)",
        layout.db.display()
    );
    say!("  certificates  {}", layout.certs.display());
    say!("  agent state   {}", layout.state.display());
    if let Some(run_id) = &session.run_id {
        say!(
            "Look at the run again: start `faultline-coordinator --certs {certs} --db {db}`, then \
             `faultline --certs {certs} runs show {run_id}`.",
            certs = layout.certs.display(),
            db = layout.db.display()
        );
    }
    say!("Run `faultline demo` again to repeat it; the directory is reused.");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use faultline_domain::fault::{FaultKind, Signal};

    use super::*;

    #[test]
    fn the_demo_plan_parses_into_two_stages_of_three_faults_on_three_agents() {
        let plan = demo_plan().unwrap();
        assert_eq!(plan.api_version, "faultline/v1");
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(plan.total_faults(), 3);
        assert_eq!(
            plan.agents().into_iter().collect::<Vec<_>>(),
            ["agent-1", "agent-2", "agent-3"]
        );

        let first = &plan.stages[0];
        assert_eq!(first.after, Duration::ZERO);
        assert_eq!(first.faults.len(), 1);
        assert_eq!(first.faults[0].agent, "agent-2");
        assert_eq!(first.faults[0].spec.kind, FaultKind::ContainerPause);
        assert_eq!(
            first.faults[0].spec.target,
            TargetSelector::Container("faultline-demo-db".into())
        );
        assert_eq!(first.faults[0].spec.duration, Duration::from_secs(4));

        let second = &plan.stages[1];
        assert_eq!(second.after, Duration::from_secs(1));
        let kill = &second.faults[0];
        assert_eq!(kill.agent, "agent-1");
        assert_eq!(
            kill.spec.kind,
            FaultKind::ContainerKill {
                signal: Signal::KILL,
                restart_on_revert: true
            }
        );
        assert_eq!(
            kill.spec.target,
            TargetSelector::Container("faultline-demo-cache".into())
        );
        assert_eq!(kill.spec.duration, Duration::from_secs(3));
        let stop = &second.faults[1];
        assert_eq!(stop.agent, "agent-3");
        assert_eq!(
            stop.spec.kind,
            FaultKind::ContainerStop { grace_seconds: 1 }
        );
        assert_eq!(
            stop.spec.target,
            TargetSelector::Container("faultline-demo-api".into())
        );
        assert_eq!(stop.spec.duration, Duration::from_secs(3));
    }

    #[test]
    fn every_demo_container_is_a_target_and_every_agent_a_plan_agent() {
        let plan = demo_plan().unwrap();
        let targets: Vec<String> = plan
            .stages
            .iter()
            .flat_map(|s| &s.faults)
            .map(|f| target_text(&f.spec.target))
            .collect();
        assert_eq!(
            targets,
            CONTAINERS.iter().map(|c| c.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(plan.agents().into_iter().collect::<Vec<_>>(), AGENTS);
    }

    #[test]
    fn the_plan_description_names_every_fault() {
        let lines = describe_plan(&demo_plan().unwrap());
        assert!(lines[0].contains("2 stages, 3 faults on agent-1, agent-2, agent-3"));
        assert_eq!(lines[1], "stage 1 db-stall:");
        assert_eq!(
            lines[2],
            "  container-pause faultline-demo-db via agent-2 for 4s"
        );
        assert_eq!(lines[3], "stage 2 fallout, 1s after the previous stage:");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn relative_times_have_one_decimal_and_never_go_negative() {
        assert_eq!(relative(1_000, 1_000), "+0.0s");
        assert_eq!(relative(4_290, 1_000), "+3.2s");
        assert_eq!(relative(61_000, 1_000), "+60.0s");
        assert_eq!(relative(900, 1_000), "+0.0s");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    fn event(kind: &str, fault_id: &str, at: i64, message: &str) -> pb::RunEvent {
        pb::RunEvent {
            run_id: "r1".into(),
            kind: kind.into(),
            fault_id: fault_id.into(),
            at_unix_ms: at,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn findings_follow_the_plan_and_read_the_stored_events() {
        let plan = demo_plan().unwrap();
        let events = vec![
            event("run-started", "", 1_000, "2 stage(s), 3 fault(s)"),
            event("fault-sent", "r1/db-stall/0", 1_010, "sent"),
            event(
                "fault-applied",
                "r1/db-stall/0",
                1_050,
                "applied to container 3f2a (faultline-demo-db): verified: container is paused",
            ),
            event(
                "fault-reverted",
                "r1/db-stall/0",
                5_080,
                "reverted (schedule): container unpaused (3f2a)",
            ),
            event(
                "fault-applied",
                "r1/fallout/0",
                6_100,
                "applied to container 77 (faultline-demo-cache): SIGKILL delivered but …",
            ),
            event(
                "fault-reverted",
                "r1/fallout/0",
                9_100,
                "reverted (schedule): container started again",
            ),
            event(
                "fault-failed",
                "r1/fallout/1",
                6_200,
                "refused: bad signature",
            ),
        ];
        let findings = collect_findings(&plan, "r1", &events);
        assert_eq!(findings.len(), 3);

        let db = &findings[0];
        assert_eq!((db.number, db.agent.as_str()), (1, "agent-2"));
        assert_eq!(db.target, "faultline-demo-db");
        assert!(db.verified());
        assert_eq!(db.in_force(), Some(Duration::from_millis(4_030)));
        assert_eq!(
            db.revert_reason(),
            Some(("schedule", "container unpaused (3f2a)"))
        );
        assert_eq!(db.problem(), None);
        let text = db.render(3, 1_000);
        assert_eq!(
            text,
            "  [1/3] faultline-demo-db: container-pause via agent-2 (stage db-stall)\n\
             \x20       applied     +0.0s  applied to container 3f2a (faultline-demo-db): \
             verified: container is paused\n\
             \x20       verified    yes\n\
             \x20       reverted    +4.0s  reason: schedule; container unpaused (3f2a)\n\
             \x20       in force    4.03s"
        );

        let cache = &findings[1];
        assert!(!cache.verified());
        assert!(cache.problem().unwrap().contains("not verified"));
        assert!(cache.render(3, 1_000).contains("verified    NO"));

        let api = &findings[2];
        assert_eq!(api.agent, "agent-3");
        assert!(api.problem().unwrap().contains("refused: bad signature"));
        let text = api.render(3, 1_000);
        assert!(text.contains("applied     never"), "{text}");
        assert!(text.contains("reverted    NOT recorded"), "{text}");
        assert!(text.contains("problem     +5.2s  refused"), "{text}");
    }

    #[test]
    fn live_events_show_relative_time_kind_agent_and_stage() {
        let mut e = event("fault-applied", "r1/db-stall/0", 4_250, "applied");
        e.agent = "agent-2".into();
        e.stage = "db-stall".into();
        assert_eq!(
            format_live(&e, 1_000),
            "    +3.2s  fault-applied            agent-2  db-stall  applied"
        );
        let start = event("run-started", "", 1_000, "go");
        assert_eq!(
            format_live(&start, 1_000),
            "    +0.0s  run-started              -        -         go"
        );
    }
}
