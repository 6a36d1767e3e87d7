//! `faultline`: the operator's command-line tool. Creates certificates, validates plans, starts
//! and follows runs, halts everything, and lists agents, runs and the audit log. Talks to the
//! coordinator's Operator service over mTLS with the operator certificate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use faultline_domain::plan::{ExpandedPlan, PlanError, PlanInputs, parse_plan_with, render_errors};
use faultline_proto::v1 as pb;
use faultline_tls::identity::Role;
use faultline_tls::layout::CertDir;
use serde_json::json;

mod demo;
mod dry_run;
mod follow;
mod lab;
mod preflight;
mod report;
mod telemetry;

/// Faultline: chaos experiments across a fleet, with faults that are always reverted.
#[derive(Debug, Parser)]
#[command(name = "faultline", version)]
struct Cli {
    /// Coordinator URL; with several replicas (deploy/README.md, "High availability"), every
    /// one of them, comma-separated: the first that accepts a connection (the active one;
    /// standbys do not listen) is used.
    #[arg(
        long,
        global = true,
        env = "FAULTLINE_COORDINATOR",
        default_value = "https://127.0.0.1:7443"
    )]
    coordinator: String,
    /// Certificate directory (from `faultline certs init`); uses ca.pem and operator.pem/.key.
    #[arg(
        long,
        global = true,
        env = "FAULTLINE_CERTS",
        default_value = "faultline-certs"
    )]
    certs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum ReportFormat {
    #[default]
    Text,
    /// GitHub-flavoured Markdown.
    Md,
    /// JSON, described by docs/report.schema.json.
    Json,
    /// One self-contained HTML page with an SVG timeline.
    Html,
}

#[derive(Debug, Args)]
struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Build the images (from this machine's binaries and packages) and start what is not
    /// running — the fleet and the demo stack (postgres, redis, trading-api, nginx,
    /// market-simulator); waits until every agent is connected and the stack is healthy.
    /// Running twice is fine.
    Up {
        /// Certificates and state (created; reused).
        #[arg(long, default_value = "faultline-lab")]
        dir: PathBuf,
        /// Agent host names, comma-separated; the game-day plans use agent-1..3.
        #[arg(long, value_delimiter = ',', default_value = "agent-1,agent-2,agent-3")]
        agents: Vec<String>,
        /// Only the fleet: no demo stack.
        #[arg(long)]
        no_stack: bool,
    },
    /// `lab up` with the stack, then the multi-service cascade
    /// (examples/game-day/10-multi-service-cascade.yaml, embedded) against it, followed live;
    /// prints the findings, writes the HTML report into --dir, and leaves the lab up.
    Demo {
        /// Certificates, state and the report (created; reused).
        #[arg(long, default_value = "faultline-lab")]
        dir: PathBuf,
        /// Agent host names, comma-separated; the plan uses agent-1..3.
        #[arg(long, value_delimiter = ',', default_value = "agent-1,agent-2,agent-3")]
        agents: Vec<String>,
    },
    /// Stop the agents (they revert what they hold), then remove every container, network
    /// and image of the lab, and check nothing is left.
    Down,
    /// The lab's containers and their state; exit 1 unless all of them run.
    Status,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates and the command-signing key.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Connected and known agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Experiment plans.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Start a run of a plan.
    Run {
        /// Plan file (YAML).
        file: PathBuf,
        /// Stream the run's progress until it ends; exit non-zero unless it completed.
        #[arg(long)]
        follow: bool,
        /// Check everything a run would check and show, per agent, the exact actions each
        /// fault would take (resolved targets, commands, cgroup writes); apply nothing.
        #[arg(long, conflicts_with = "follow")]
        dry_run: bool,
        /// Set a plan variable (`${NAME}`), overriding its `vars:` default; repeatable.
        #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
        vars: Vec<(String, String)>,
    },
    /// Past and current runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Revert every fault on every agent now and block new runs (or lift that block).
    Halt {
        /// Lift a previous halt so new runs may start.
        #[arg(long)]
        release: bool,
        /// Why (recorded in the audit log and the affected runs).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Run a real game-day on this machine: a coordinator, three agents and three demo
    /// containers, the cascade plan, its findings, and a full teardown (needs Docker).
    Demo {
        /// Work directory for certificates, database, agent state and logs (created; reused).
        #[arg(long, default_value = "faultline-demo")]
        dir: PathBuf,
        /// Leave the demo containers running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// A lab fleet on this machine's Docker Engine: a coordinator and agent hosts, each its
    /// own container with its own address on a private network, and the demo stack the
    /// game-day plans break; `faultline lab demo` runs the cascade against it.
    #[command(subcommand)]
    Lab(LabCommand),
    /// What each agent's host can do, and which faults it offers by which mechanism.
    Preflight {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// A run's report: verdict, timeline, per-fault mechanism, verification, time in force and
    /// revert latency, and the halt; computed from the stored run.
    Report {
        /// Run id.
        id: String,
        /// Report format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Write the report to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// A run's kernel telemetry per target and second: TCP retransmits/s, connect failures by
    /// errno, run-queue p95, OOM kills and process exits (eBPF, or /proc and cgroup fallbacks).
    Telemetry {
        /// Run id.
        id: String,
        /// Keep printing as the run goes on, until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        output: OutputArg,
    },
    /// The coordinator's audit log.
    Audit {
        /// Newest N entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA, coordinator, agent and operator certificates, and a command-signing key.
    Init {
        /// Directory to write into (created with mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// Agent names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        agents: Vec<String>,
        /// Name in the operator certificate.
        #[arg(long, default_value = "operator")]
        operator: String,
        /// DNS names or IP addresses the coordinator is reached at (repeatable).
        #[arg(long = "coordinator-host", value_delimiter = ',',
              default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
        coordinator_hosts: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// Certificate validity in days.
        #[arg(long, default_value_t = 365)]
        validity_days: u32,
    },
    /// Issue one more agent certificate from an existing CA (ca.pem + ca.key in --dir), e.g.
    /// for a host added after `certs init`. Writes agent-NAME.pem/.key into --out (default:
    /// --dir) with ca.pem beside them.
    IssueAgent {
        /// Directory holding the CA (ca.pem, ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// The new agent's name.
        #[arg(long)]
        name: String,
        /// Where to write the agent's files (default: --dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// List agents known to the coordinator.
    List(OutputArg),
}

#[derive(Debug, Subcommand)]
enum PlanCommand {
    /// Check plan files; prints each problem as FILE:LINE:COLUMN: FIELD: MESSAGE.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Set a plan variable (`${NAME}`), overriding its `vars:` default; repeatable.
        #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
        vars: Vec<(String, String)>,
    },
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// List runs, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show one run with its timeline.
    Show {
        id: String,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(err) => {
            match err.downcast_ref::<tonic::Status>() {
                // The coordinator's refusals are written for people, one reason per line.
                Some(status) => {
                    eprintln!(
                        "error: {}: {}",
                        grpc_code_name(status.code()),
                        status.message()
                    )
                }
                None => eprintln!("error: {err:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Certs(CertsCommand::Init {
            dir,
            agents,
            operator,
            coordinator_hosts,
            force,
            validity_days,
        }) => {
            let options = faultline_tls::pki::InitOptions {
                dir: dir.clone(),
                agents,
                operator_name: operator,
                coordinator_hosts,
                force,
                validity_days,
            };
            let report = faultline_tls::pki::init(&options)
                .with_context(|| format!("creating certificates in {}", dir.display()))?;
            for path in &report.written {
                println!("wrote {}", path.display());
            }
            println!(
                "Keep ca.key and command-signing.key on the coordinator side only; agents need \
                 ca.pem, their agent-NAME.pem/.key and command-signing.pub."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::IssueAgent {
            dir,
            name,
            out,
            force,
        }) => {
            let ca = CertDir::new(&dir);
            let out = CertDir::new(out.unwrap_or_else(|| dir.clone()));
            let report = faultline_tls::pki::issue_leaf(&ca, Role::Agent, &name, &out, force)
                .with_context(|| {
                    format!("issuing agent {name} from the CA in {}", dir.display())
                })?;
            for path in &report.written {
                println!("wrote {}", path.display());
            }
            println!("Give the agent host ca.pem, agent-{name}.pem/.key and command-signing.pub.");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(PlanCommand::Validate { files, vars }) => Ok(validate_files(&files, &vars)),
        Command::Agents(AgentsCommand::List(output)) => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let agents = client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            print_agents(&agents, output.output);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            file,
            follow,
            dry_run,
            vars,
        } => {
            let yaml = read_plan(&file)?;
            let source = file.display().to_string();
            // The coordinator gets the plan with its variables and includes resolved.
            let (plan, yaml) = match expand_plan(&file, &yaml, &vars) {
                Ok(ExpandedPlan { plan, text }) => (plan, text),
                Err(errors) => {
                    eprint!("{}", render_errors(&source, &errors));
                    eprintln!("plan is invalid; nothing was sent");
                    return Ok(ExitCode::from(2));
                }
            };
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let request = pb::StartRunRequest {
                source_name: source,
                plan_yaml: yaml,
            };
            if dry_run {
                let answer = client.dry_run(request).await?.into_inner();
                print!("{}", dry_run::render(&answer));
                return Ok(dry_run::exit_code(&answer));
            }
            let run_id = client.start_run(request).await?.into_inner().run_id;
            println!("run {run_id} started: {}", plan.title);
            if !follow {
                println!("follow it with: faultline runs show {run_id}");
                return Ok(ExitCode::SUCCESS);
            }
            follow_run(&mut client, &run_id, Some(plan)).await
        }
        Command::Runs(RunsCommand::List { limit, output }) => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let runs = client
                .list_runs(pb::ListRunsRequest { limit })
                .await?
                .into_inner()
                .runs;
            print_runs(&runs, output.output);
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs(RunsCommand::Show { id, output }) => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let run = client
                .get_run(pb::GetRunRequest { run_id: id })
                .await?
                .into_inner();
            print_run(&run, output.output);
            Ok(ExitCode::SUCCESS)
        }
        Command::Halt { release, reason } => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let response = client
                .halt(pb::HaltRequest { release, reason })
                .await?
                .into_inner();
            if response.halted {
                println!(
                    "HALTED: {} fault(s) reverted, {} run(s) aborted, halt latency {} ms",
                    response.faults_reverted, response.runs_aborted, response.halt_latency_ms
                );
                println!("{}", response.detail);
                println!("new runs are blocked until `faultline halt --release`");
            } else {
                println!("{}", response.detail);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, keep } => demo::run(&dir, keep).await,
        Command::Lab(LabCommand::Up {
            dir,
            agents,
            no_stack,
        }) => lab::up(&dir, &agents, no_stack).await,
        Command::Lab(LabCommand::Demo { dir, agents }) => lab::demo(&dir, &agents).await,
        Command::Lab(LabCommand::Down) => lab::down().await,
        Command::Lab(LabCommand::Status) => lab::status().await,
        Command::Preflight { agent, output } => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let mut agents = client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            if let Some(name) = &agent {
                agents.retain(|a| &a.name == name);
                if agents.is_empty() {
                    bail!("the coordinator knows no agent named {name}");
                }
            }
            match output.output {
                Output::Text => print!("{}", preflight::render_text(&agents)),
                Output::Json => println!("{}", preflight::render_json(&agents)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { id, format, out } => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let run = client
                .get_run(pb::GetRunRequest { run_id: id })
                .await?
                .into_inner();
            let report = report::build_report(&run);
            let rendered = match format {
                ReportFormat::Text => report::render_text(&report),
                ReportFormat::Md => report::render_markdown(&report),
                ReportFormat::Json => report::render_json(&report)? + "\n",
                ReportFormat::Html => report::render_html(&report),
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, rendered)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{rendered}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Telemetry { id, follow, output } => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let json = matches!(output.output, Output::Json);
            telemetry::run(&mut client, &id, follow, json).await
        }
        Command::Audit { limit, output } => {
            let mut client = client(&cli.coordinator, &cli.certs).await?;
            let entries = client
                .list_audit(pb::ListAuditRequest { limit })
                .await?
                .into_inner()
                .entries;
            print_audit(&entries, output.output);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The canonical gRPC name of a status code (`FAILED_PRECONDITION`), as gRPC tools print it.
fn grpc_code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut name = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

type OperatorClient = pb::operator_client::OperatorClient<tonic::transport::Channel>;

/// An operator client of the coordinator at `urls` (one URL, or several replicas
/// comma-separated: the first that accepts a connection).
async fn client(urls: &str, certs: &Path) -> anyhow::Result<OperatorClient> {
    let dir = CertDir::new(certs);
    let urls = coordinator_urls(urls);
    let channel = match urls.as_slice() {
        // One coordinator: connect lazily, as before (the first call reports a dead one).
        [url] => faultline_tls::client::channel(url, &dir, Role::Operator, "operator"),
        _ => faultline_tls::client::first_reachable(&urls, &dir, Role::Operator, "operator")
            .await
            .map(|(_, channel)| channel),
    }
    .with_context(|| {
        format!(
            "connecting with mTLS to {} with certificates in {}",
            urls.join(", "),
            certs.display()
        )
    })?;
    Ok(OperatorClient::new(channel))
}

/// The URLs of a comma-separated `--coordinator`, blanks dropped.
fn coordinator_urls(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_string)
        .collect()
}

fn read_plan(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading plan {}", file.display()))
}

/// `NAME=VALUE` of `--var`.
fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

/// Largest included file read.
const MAX_INCLUDE_BYTES: u64 = 1 << 20;

/// Parses the plan `yaml` read from `file` with `vars`, reading its includes from files next
/// to it (the domain hands over paths that are relative and stay inside that directory).
fn expand_plan(
    file: &Path,
    yaml: &str,
    vars: &[(String, String)],
) -> Result<ExpandedPlan, Vec<PlanError>> {
    let dir = file.parent().unwrap_or(Path::new("")).to_path_buf();
    let read = move |relative: &str| -> Result<String, String> {
        let path = dir.join(relative);
        let size = std::fs::metadata(&path)
            .map_err(|err| err.to_string())?
            .len();
        if size > MAX_INCLUDE_BYTES {
            return Err(format!("{size} bytes, more than {MAX_INCLUDE_BYTES}"));
        }
        std::fs::read_to_string(&path).map_err(|err| err.to_string())
    };
    let inputs = PlanInputs {
        vars,
        include: Some(&read),
    };
    parse_plan_with(yaml, &inputs)
}

/// Validates each file locally; prints located errors. Exit 0 only if all are valid.
fn validate_files(files: &[PathBuf], vars: &[(String, String)]) -> ExitCode {
    let mut all_valid = true;
    for file in files {
        let source = file.display().to_string();
        match read_plan(file) {
            Err(err) => {
                all_valid = false;
                eprintln!("{source}: {err:#}");
            }
            Ok(yaml) => match expand_plan(file, &yaml, vars).map(|expanded| expanded.plan) {
                Ok(plan) => println!(
                    "{source}: valid: {} ({} stage(s), {} fault(s) on {})",
                    plan.title,
                    plan.stages.len(),
                    plan.total_faults(),
                    plan.agents().into_iter().collect::<Vec<_>>().join(", ")
                ),
                Err(errors) => {
                    all_valid = false;
                    eprint!("{}", render_errors(&source, &errors));
                }
            },
        }
    }
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

async fn follow_run(
    client: &mut OperatorClient,
    run_id: &str,
    plan: Option<faultline_domain::plan::Plan>,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.to_string(),
        })
        .await?
        .into_inner();
    let probing = plan.as_ref().is_some_and(|p| p.steady_state.is_some());
    let mut view = follow::Follow::new(plan);
    // Drawn on stderr only when it is a terminal; hidden (and silent) otherwise.
    let bar = indicatif::ProgressBar::new(
        view.expected()
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template("[{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut redraw = tokio::time::interval(Duration::from_millis(250));
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The latest probe readings come from the stored samples; only worth asking for when
    // the plan has probes and someone sees the bar.
    let mut readings = tokio::time::interval(Duration::from_secs(2));
    readings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let poll_probes = probing && !bar.is_hidden();
    let mut reader = client.clone();
    loop {
        tokio::select! {
            message = stream.message() => {
                let Some(event) = message? else { break };
                view.observe(&event);
                let line = format_event(&event);
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
                if view.finished().is_some() {
                    break;
                }
            }
            _ = readings.tick(), if poll_probes => {
                let request = pb::GetRunRequest { run_id: run_id.to_string() };
                if let Ok(detail) = reader.get_run(request).await {
                    for (probe, reading) in latest_readings(&detail.into_inner()) {
                        view.set_probe(&probe, reading);
                    }
                }
            }
            _ = redraw.tick() => {
                let status = view.status(now_unix_ms());
                bar.set_position(status.elapsed_ms.min(bar.length().unwrap_or(0)));
                let clock = match status.expected_ms {
                    Some(expected) => format!(
                        "{} / ~{}",
                        fmt_clock(status.elapsed_ms),
                        fmt_clock(expected)
                    ),
                    None => fmt_clock(status.elapsed_ms),
                };
                bar.set_message(format!("{clock} {}", status.line));
            }
        }
    }
    bar.finish_and_clear();
    let Some(final_state) = view.finished().map(str::to_string) else {
        bail!("the coordinator closed the stream before run {run_id} ended");
    };
    println!("run {run_id}: {final_state}");
    Ok(if final_state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Each probe's latest sample as `ok 3ms`, `ok 42` (a value) or `FAIL why`.
fn latest_readings(detail: &pb::RunDetail) -> Vec<(String, String)> {
    let mut latest: std::collections::BTreeMap<&str, &pb::ProbeSampleRecord> =
        std::collections::BTreeMap::new();
    for sample in &detail.probe_samples {
        latest.insert(&sample.probe, sample);
    }
    latest
        .into_iter()
        .map(|(probe, sample)| {
            let reading = if !sample.ok {
                let why: String = sample.detail.chars().take(40).collect();
                format!("FAIL {why}")
            } else if let Some(value) = sample.value {
                format!("ok {value}")
            } else if let Some(latency) = sample.latency_ms {
                format!("ok {latency:.0}ms")
            } else {
                "ok".to_string()
            };
            (probe.to_string(), reading)
        })
        .collect()
}

/// `mm:ss` of a millisecond count.
fn fmt_clock(ms: u64) -> String {
    let seconds = ms / 1000;
    format!("{:02}:{:02}", seconds / 60, seconds % 60)
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn timestamp(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let at = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

fn format_event(event: &pb::RunEvent) -> String {
    let mut scope = Vec::new();
    if !event.stage.is_empty() {
        scope.push(format!("stage={}", event.stage));
    }
    if !event.agent.is_empty() {
        scope.push(format!("agent={}", event.agent));
    }
    format!(
        "{} {:<24} {} {}",
        timestamp(event.at_unix_ms),
        event.kind,
        scope.join(" "),
        event.message
    )
}

fn event_json(event: &pb::RunEvent) -> serde_json::Value {
    json!({
        "seq": event.seq, "at": timestamp(event.at_unix_ms), "at_unix_ms": event.at_unix_ms,
        "kind": event.kind, "stage": event.stage, "agent": event.agent,
        "fault_id": event.fault_id, "message": event.message,
    })
}

fn print_agents(agents: &[pb::AgentInfo], output: Output) {
    match output {
        Output::Json => {
            let list: Vec<_> = agents
                .iter()
                .map(|a| {
                    let host = a.host.clone().unwrap_or_default();
                    json!({
                        "name": a.name, "connected": a.connected, "version": a.version,
                        "peer_address": a.peer_address, "active_faults": a.active_faults,
                        "last_seen": timestamp(a.last_seen_unix_ms),
                        "host": {"hostname": host.hostname, "kernel": host.kernel, "os": host.os,
                                 "cpus": host.cpus, "root": host.root},
                        "capabilities": a.capabilities.iter().map(|c| json!({
                            "name": c.name, "available": c.available,
                            "mechanism": c.mechanism, "detail": c.detail,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        Output::Text => {
            println!(
                "{:<16} {:<10} {:<8} {:<7} {:<24} LAST SEEN",
                "NAME", "STATE", "VERSION", "FAULTS", "ADDRESS"
            );
            for a in agents {
                let state = if a.connected { "connected" } else { "away" };
                println!(
                    "{:<16} {:<10} {:<8} {:<7} {:<24} {}",
                    a.name,
                    state,
                    a.version,
                    a.active_faults,
                    a.peer_address,
                    timestamp(a.last_seen_unix_ms)
                );
            }
        }
    }
}

fn run_json(run: &pb::RunSummary) -> serde_json::Value {
    json!({
        "id": run.run_id, "title": run.title, "state": run.state, "operator": run.operator,
        "created": timestamp(run.created_at_unix_ms),
        "finished": timestamp(run.finished_at_unix_ms),
    })
}

fn print_runs(runs: &[pb::RunSummary], output: Output) {
    match output {
        Output::Json => {
            println!(
                "{}",
                serde_json::Value::Array(runs.iter().map(run_json).collect())
            );
        }
        Output::Text => {
            println!("{:<38} {:<10} {:<26} TITLE", "ID", "STATE", "CREATED");
            for r in runs {
                println!(
                    "{:<38} {:<10} {:<26} {}",
                    r.run_id,
                    r.state,
                    timestamp(r.created_at_unix_ms),
                    r.title
                );
            }
        }
    }
}

fn print_run(run: &pb::RunDetail, output: Output) {
    let summary = run.summary.clone().unwrap_or_default();
    match output {
        Output::Json => {
            let mut value = run_json(&summary);
            value["reason"] = json!(run.reason);
            value["events"] = json!(run.events.iter().map(event_json).collect::<Vec<_>>());
            value["plan_yaml"] = json!(run.plan_yaml);
            println!("{value}");
        }
        Output::Text => {
            println!("run      {}", summary.run_id);
            println!("title    {}", summary.title);
            println!("state    {}", summary.state);
            if !run.reason.is_empty() {
                println!("reason   {}", run.reason);
            }
            println!("operator {}", summary.operator);
            println!("created  {}", timestamp(summary.created_at_unix_ms));
            println!("finished {}", timestamp(summary.finished_at_unix_ms));
            println!("timeline:");
            for event in &run.events {
                println!("  {}", format_event(event));
            }
        }
    }
}

fn print_audit(entries: &[pb::AuditEntry], output: Output) {
    match output {
        Output::Json => {
            let list: Vec<_> = entries
                .iter()
                .map(|e| {
                    json!({"id": e.id, "at": timestamp(e.at_unix_ms), "actor": e.actor,
                           "action": e.action, "outcome": e.outcome, "detail": e.detail})
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        Output::Text => {
            for e in entries {
                println!(
                    "{} {:<8} {:<24} {:<18} {}",
                    timestamp(e.at_unix_ms),
                    e.outcome,
                    e.actor,
                    e.action,
                    e.detail
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_lists_split_on_commas_and_drop_blanks() {
        assert_eq!(coordinator_urls("https://a:1"), ["https://a:1"]);
        assert_eq!(
            coordinator_urls("https://a:1, https://b:2,,"),
            ["https://a:1", "https://b:2"]
        );
        assert!(coordinator_urls(" , ").is_empty());
    }

    #[test]
    fn grpc_codes_print_with_their_canonical_names() {
        assert_eq!(
            grpc_code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        assert_eq!(
            grpc_code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(grpc_code_name(tonic::Code::Ok), "OK");
    }
}
