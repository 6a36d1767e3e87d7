//! A local Faultline cluster of real processes on one machine: certificates, a coordinator on a
//! free loopback port, and N agents — separate processes, each with its own identity, state
//! directory and log — all inside one work directory that is reused across runs.
//!
//! The processes run in their own process group, so a terminal's Ctrl-C reaches only the
//! program that owns the [`LocalCluster`]; that program stops them in a safe order with
//! [`LocalCluster::stop`] (or, failing that, `Drop` does): SIGTERM to every agent first — an
//! agent reverts the faults it holds on SIGTERM — then the coordinator, each escalated to
//! SIGKILL after a grace period. [`spawn`] is the one place processes are started.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use faultline_proto::v1 as pb;
use faultline_tls::identity::Role;
use faultline_tls::layout::CertDir;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::LabError;

/// The coordinator binary, looked for next to the current executable.
pub const COORDINATOR_BIN: &str = "faultline-coordinator";
/// The agent binary, looked for next to the current executable.
pub const AGENT_BIN: &str = "faultline-agent";
/// How the coordinator announces its address on stdout.
pub const LISTENING_PREFIX: &str = "faultline-coordinator listening on ";
/// Time a process gets to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the coordinator may take to print its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Log filter of every process (quiet transport crates).
const RUST_LOG: &str = "info,h2=warn,tower=warn,hyper=warn";
/// Lines of a log quoted in an error about its process.
const LOG_TAIL_LINES: usize = 15;

/// A tonic client of the coordinator's Operator service.
pub type OperatorClient = pb::operator_client::OperatorClient<tonic::transport::Channel>;

/// The directory that holds the coordinator and agent binaries: the current executable's own
/// directory or, for a test executable in `target/<profile>/deps`, its parent.
pub fn sibling_bin_dir() -> Result<PathBuf, LabError> {
    let exe = std::env::current_exe()
        .map_err(|e| LabError::io("locating the current executable", "/proc/self/exe", e))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let has_all = |dir: &Path| {
        [COORDINATOR_BIN, AGENT_BIN]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if !has_all(&dir)
        && dir.file_name().is_some_and(|name| name == "deps")
        && let Some(parent) = dir.parent().filter(|parent| has_all(parent))
    {
        return Ok(parent.to_path_buf());
    }
    for binary in [COORDINATOR_BIN, AGENT_BIN] {
        let path = dir.join(binary);
        if !path.is_file() {
            return Err(LabError::MissingBinary {
                path,
                hint: "build every workspace binary first: `make demo`, or \
                       `cargo build --release --workspace --bins` and run \
                       ./target/release/faultline"
                    .to_string(),
            });
        }
    }
    Ok(dir)
}

/// Where everything of a local cluster lives inside its work directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The work directory itself.
    pub work_dir: PathBuf,
    /// Certificates from `faultline certs init` (`certs/`).
    pub certs: PathBuf,
    /// The coordinator's SQLite database (`coordinator.db`).
    pub db: PathBuf,
    /// One log file per process (`logs/`).
    pub logs: PathBuf,
    /// One state directory (journal, nonce ledger) per agent (`state/<agent>/`).
    pub state: PathBuf,
}

impl Layout {
    /// The layout of `work_dir` (nothing is created).
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        let work_dir = work_dir.into();
        Self {
            certs: work_dir.join("certs"),
            db: work_dir.join("coordinator.db"),
            logs: work_dir.join("logs"),
            state: work_dir.join("state"),
            work_dir,
        }
    }

    /// Log file of a process (`coordinator`, `agent-1`...).
    pub fn log(&self, process: &str) -> PathBuf {
        self.logs.join(format!("{process}.log"))
    }

    /// State directory of an agent.
    pub fn agent_state(&self, agent: &str) -> PathBuf {
        self.state.join(agent)
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    /// Work directory; created if missing, reused (certificates, database, agent state) if not.
    pub work_dir: PathBuf,
    /// Agent names, one process each.
    pub agents: Vec<String>,
    /// Directory holding [`COORDINATOR_BIN`] and [`AGENT_BIN`] (see [`sibling_bin_dir`]).
    pub bin_dir: PathBuf,
    /// How long the agents may take to connect.
    pub connect_timeout: Duration,
}

/// What happened to the certificate directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Certs {
    /// A new CA and every certificate were created.
    Created,
    /// Everything needed was there already.
    Reused,
    /// The CA was reused and certificates were issued for these new agents.
    Extended(Vec<String>),
}

/// A running process of the lab; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct LabProcess {
    name: String,
    pid: u32,
    log: PathBuf,
    child: Option<Child>,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// Process name (`coordinator`, `agent-1`...).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// For a person: "exited cleanly after SIGTERM", "killed after 10s"...
    pub outcome: String,
}

impl LabProcess {
    /// Process name (`coordinator`, `agent-1`...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its exit status if it has exited (it is then reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn signal(&self, signal: Signal) {
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Sends SIGKILL and reaps, without waiting for an async runtime.
    fn kill_blocking(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            stop_blocking(std::slice::from_mut(self), STOP_GRACE);
        }
    }
}

/// Starts `program args…` in its own process group with stdin closed, stderr appended to
/// `log`, and stdout either discarded or handed back. The one place the lab spawns processes.
pub fn spawn(
    name: &str,
    program: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
    capture_stdout: bool,
) -> Result<(LabProcess, Option<ChildStdout>), LabError> {
    let log_file = File::create(log).map_err(|e| LabError::io("creating log file", log, e))?;
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", RUST_LOG)
        // Plain text in the log files, not terminal colour codes.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(log_file)
        // Our own process group: the owner decides when and in which order we stop.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: program.display().to_string(),
            hint: String::new(),
            source,
        })?;
    let stdout = child.stdout.take();
    let pid = child.id().ok_or_else(|| LabError::Process {
        what: format!("starting {name}"),
        detail: "it exited at once".to_string(),
    })?;
    let process = LabProcess {
        name: name.to_string(),
        pid,
        log: log.to_path_buf(),
        child: Some(child),
    };
    Ok((process, stdout))
}

/// Sends SIGTERM to every process at once, waits up to `grace` for all of them, and kills
/// what is left. Blocking, for `Drop`.
fn stop_blocking(processes: &mut [LabProcess], grace: Duration) -> Vec<Stopped> {
    for process in processes.iter() {
        process.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut stopped = Vec::new();
    for process in processes.iter_mut() {
        if process.child.is_none() {
            continue;
        }
        let mut status = None;
        while Instant::now() < deadline {
            status = process.exited();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let outcome = match status {
            Some(status) => describe_exit(status),
            None => match process.kill_blocking() {
                Some(_) => format!("killed (SIGKILL) after a {grace:?} grace"),
                None => "did not die even after SIGKILL".to_string(),
            },
        };
        process.child = None;
        stopped.push(Stopped {
            name: process.name.clone(),
            pid: process.pid,
            outcome,
        });
    }
    stopped
}

/// Async variant of [`stop_blocking`].
async fn stop(processes: &mut [LabProcess], grace: Duration) -> Vec<Stopped> {
    for process in processes.iter() {
        process.signal(Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    let mut stopped = Vec::new();
    for process in processes.iter_mut() {
        let Some(mut child) = process.child.take() else {
            continue;
        };
        let outcome = match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(Ok(status)) => describe_exit(status),
            Ok(Err(err)) => format!("could not be waited for: {err}"),
            Err(_) => {
                let _ = child.start_kill();
                match child.wait().await {
                    Ok(_) => format!("killed (SIGKILL) after a {grace:?} grace"),
                    Err(err) => format!("could not be killed: {err}"),
                }
            }
        };
        stopped.push(Stopped {
            name: process.name.clone(),
            pid: process.pid,
            outcome,
        });
    }
    stopped
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited cleanly".to_string(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("ended by signal {signal}"),
        (None, None) => format!("ended ({status})"),
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file, indented, or a note that it is empty.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!("(log {} is empty)", path.display());
    }
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = format!("last lines of {}:", path.display());
    for line in &lines[start..] {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

/// The address in the coordinator's `faultline-coordinator listening on ADDR` line.
pub fn parse_listening_line(line: &str) -> Option<&str> {
    let addr = line.trim().strip_prefix(LISTENING_PREFIX)?.trim();
    (addr.contains(':') && !addr.contains(char::is_whitespace)).then_some(addr)
}

/// Live processes whose arguments include this work directory's certificate directory (as
/// every lab process's do): leftovers of an earlier cluster in the same work directory, e.g.
/// after its owner was killed with SIGKILL. Returns `(pid, command line)` pairs.
pub fn processes_using(work_dir: &Path) -> Vec<(u32, String)> {
    let certs = Layout::new(work_dir).certs;
    let needle = certs.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Unreadable or vanished meanwhile: not ours to worry about.
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if raw.split(|b| *b == 0).any(|arg| arg == needle) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// Creates the certificate directory for `agents` if it has no CA yet, or issues certificates
/// for agents that are new to an existing one.
pub fn ensure_certs(certs: &Path, agents: &[String]) -> Result<Certs, LabError> {
    let hosts = faultline_tls::pki::InitOptions::new(certs).coordinator_hosts;
    ensure_certs_for(certs, agents, &hosts)
}

/// As [`ensure_certs`], with the coordinator certificate made for `coordinator_hosts` (DNS
/// names or IP addresses) when the directory is new.
pub fn ensure_certs_for(
    certs: &Path,
    agents: &[String],
    coordinator_hosts: &[String],
) -> Result<Certs, LabError> {
    let dir = CertDir::new(certs);
    if !dir.ca_cert().exists() {
        let mut options = faultline_tls::pki::InitOptions::new(certs);
        options.agents = agents.to_vec();
        options.coordinator_hosts = coordinator_hosts.to_vec();
        faultline_tls::pki::init(&options).map_err(|source| LabError::Tls {
            action: format!("creating certificates in {}", certs.display()),
            source,
        })?;
        return Ok(Certs::Created);
    }
    let missing: Vec<String> = agents
        .iter()
        .filter(|agent| !dir.agent_cert(agent).exists() || !dir.agent_key(agent).exists())
        .cloned()
        .collect();
    for agent in &missing {
        faultline_tls::pki::issue_leaf(&dir, Role::Agent, agent, &dir, true).map_err(|source| {
            LabError::Tls {
                action: format!("issuing a certificate for {agent} in {}", certs.display()),
                source,
            }
        })?;
    }
    Ok(if missing.is_empty() {
        Certs::Reused
    } else {
        Certs::Extended(missing)
    })
}

/// A coordinator and agents running as local processes.
#[derive(Debug)]
pub struct LocalCluster {
    layout: Layout,
    certs: Certs,
    addr: String,
    coordinator: Option<LabProcess>,
    agents: Vec<LabProcess>,
}

impl LocalCluster {
    /// Prepares the work directory and certificates, starts the coordinator on a free
    /// loopback port and every agent, and waits until all agents are connected.
    ///
    /// On error — or if this future is dropped half-way — whatever was started is stopped.
    pub async fn start(config: &LocalClusterConfig) -> Result<LocalCluster, LabError> {
        let layout = Layout::new(&config.work_dir);
        let leftovers = processes_using(&layout.work_dir);
        if !leftovers.is_empty() {
            let list: Vec<String> = leftovers
                .iter()
                .map(|(pid, cmdline)| format!("pid {pid}: {cmdline}"))
                .collect();
            return Err(LabError::Process {
                what: format!("using {}", layout.work_dir.display()),
                detail: format!(
                    "processes of an earlier cluster still run there; stop them first (kill \
                     -TERM PID: agents revert their faults on SIGTERM) or use another \
                     directory:\n    {}",
                    list.join("\n    ")
                ),
            });
        }
        for dir in [&layout.work_dir, &layout.logs, &layout.state] {
            std::fs::create_dir_all(dir).map_err(|e| LabError::io("creating", dir, e))?;
        }
        let certs = ensure_certs(&layout.certs, &config.agents)?;
        let mut cluster = LocalCluster {
            layout,
            certs,
            addr: String::new(),
            coordinator: None,
            agents: Vec::new(),
        };
        cluster.start_coordinator(&config.bin_dir).await?;
        for agent in &config.agents {
            cluster.start_agent(&config.bin_dir, agent)?;
        }
        cluster
            .wait_connected(&config.agents, config.connect_timeout)
            .await?;
        Ok(cluster)
    }

    async fn start_coordinator(&mut self, bin_dir: &Path) -> Result<(), LabError> {
        let log = self.layout.log("coordinator");
        let args = [
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--certs".as_ref(),
            self.layout.certs.as_os_str(),
            "--db".as_ref(),
            self.layout.db.as_os_str(),
        ];
        let (process, stdout) = spawn(
            "coordinator",
            &bin_dir.join(COORDINATOR_BIN),
            &args,
            &log,
            true,
        )?;
        self.coordinator = Some(process);
        let stdout = stdout.ok_or_else(|| LabError::Process {
            what: "starting the coordinator".to_string(),
            detail: "its stdout was not captured".to_string(),
        })?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(LISTEN_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| LabError::Timeout {
                what: format!("the coordinator to listen; {}", log_tail(&log)),
                after: LISTEN_TIMEOUT,
            })?
            .map_err(|e| LabError::io("reading the stdout of", COORDINATOR_BIN, e))?;
        let Some(line) = line else {
            // Give the log a moment to receive the coordinator's last words.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(LabError::Process {
                what: "starting the coordinator".to_string(),
                detail: format!("it exited before listening; {}", log_tail(&log)),
            });
        };
        let addr = parse_listening_line(&line).ok_or_else(|| LabError::Process {
            what: "starting the coordinator".to_string(),
            detail: format!("unexpected first line on its stdout: {line:?}"),
        })?;
        self.addr = addr.to_string();
        // Keep draining stdout so the coordinator never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(())
    }

    fn start_agent(&mut self, bin_dir: &Path, name: &str) -> Result<(), LabError> {
        let state = self.layout.agent_state(name);
        std::fs::create_dir_all(&state).map_err(|e| LabError::io("creating", &state, e))?;
        let url = self.url();
        let args = [
            "--coordinator".as_ref(),
            url.as_ref(),
            "--name".as_ref(),
            name.as_ref(),
            "--certs".as_ref(),
            self.layout.certs.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            // Several agents share this machine: each gets a free port for /metrics rather
            // than all but one failing to bind the default.
            "--metrics-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
        ];
        let log = self.layout.log(name);
        let (process, _) = spawn(name, &bin_dir.join(AGENT_BIN), &args, &log, false)?;
        self.agents.push(process);
        Ok(())
    }

    /// Polls ListAgents until every agent in `names` is connected; fails early, quoting its
    /// log, if a process exits meanwhile.
    async fn wait_connected(
        &mut self,
        names: &[String],
        timeout: Duration,
    ) -> Result<(), LabError> {
        let mut client = self.operator_client()?;
        let deadline = Instant::now() + timeout;
        loop {
            for process in self.coordinator.iter_mut().chain(self.agents.iter_mut()) {
                if let Some(status) = process.exited() {
                    process.child = None;
                    return Err(LabError::Process {
                        what: format!("{} (pid {})", process.name, process.pid),
                        detail: format!(
                            "{} while the agents connected; {}",
                            describe_exit(status),
                            process.log_tail()
                        ),
                    });
                }
            }
            let listed = client.list_agents(pb::ListAgentsRequest {}).await;
            let waiting: Vec<&str> = match &listed {
                Ok(response) => names
                    .iter()
                    .filter(|name| {
                        !response
                            .get_ref()
                            .agents
                            .iter()
                            .any(|a| &a.name == *name && a.connected)
                    })
                    .map(String::as_str)
                    .collect(),
                Err(_) => names.iter().map(String::as_str).collect(),
            };
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut what = format!("agent(s) {} to connect", waiting.join(", "));
                if let Err(status) = listed {
                    what.push_str(&format!(" (last ListAgents error: {status})"));
                }
                for process in &self.agents {
                    if waiting.contains(&process.name.as_str()) {
                        what.push_str(&format!("; {}", process.log_tail()));
                    }
                }
                return Err(LabError::Timeout {
                    what,
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `https://ADDR` of the coordinator.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The coordinator's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where everything lives.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether the certificates were created, reused or extended.
    pub fn certs(&self) -> &Certs {
        &self.certs
    }

    /// The coordinator process (absent once stopped).
    pub fn coordinator(&self) -> Option<&LabProcess> {
        self.coordinator.as_ref().filter(|p| p.child.is_some())
    }

    /// The running agent processes.
    pub fn agents(&self) -> impl Iterator<Item = &LabProcess> {
        self.agents.iter().filter(|p| p.child.is_some())
    }

    /// An Operator client authenticated with the cluster's operator certificate. Must be
    /// called inside a Tokio runtime; nothing is dialled until the first request.
    pub fn operator_client(&self) -> Result<OperatorClient, LabError> {
        let dir = CertDir::new(&self.layout.certs);
        let channel = faultline_tls::client::channel(&self.url(), &dir, Role::Operator, "operator")
            .map_err(|source| LabError::Tls {
                action: format!("preparing mTLS to {} as the operator", self.url()),
                source,
            })?;
        Ok(OperatorClient::new(channel))
    }

    /// Stops the agents (SIGTERM: they revert what they hold), then the coordinator, each
    /// killed if still there after `grace`. Returns how each ended, agents first.
    pub async fn stop(&mut self, grace: Duration) -> Vec<Stopped> {
        let mut stopped = stop(&mut self.agents, grace).await;
        stopped.extend(stop(self.coordinator.as_mut_slice(), grace).await);
        stopped
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Same order as `stop`; the processes' own Drop then has nothing left to do.
        stop_blocking(&mut self.agents, STOP_GRACE);
        stop_blocking(self.coordinator.as_mut_slice(), STOP_GRACE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_yields_the_address() {
        assert_eq!(
            parse_listening_line("faultline-coordinator listening on 127.0.0.1:40123\n"),
            Some("127.0.0.1:40123")
        );
        assert_eq!(
            parse_listening_line("faultline-coordinator listening on [::1]:7443"),
            Some("[::1]:7443")
        );
        assert_eq!(parse_listening_line("something else 127.0.0.1:1"), None);
        assert_eq!(
            parse_listening_line("faultline-coordinator listening on soon"),
            None
        );
    }

    #[test]
    fn the_layout_keeps_everything_in_the_work_dir() {
        let layout = Layout::new("/w");
        assert_eq!(layout.certs, Path::new("/w/certs"));
        assert_eq!(layout.db, Path::new("/w/coordinator.db"));
        assert_eq!(layout.log("agent-2"), Path::new("/w/logs/agent-2.log"));
        assert_eq!(layout.agent_state("agent-2"), Path::new("/w/state/agent-2"));
    }

    #[test]
    fn certificates_are_created_reused_and_extended() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let one = vec!["agent-1".to_string()];
        assert_eq!(ensure_certs(&certs, &one).unwrap(), Certs::Created);
        assert_eq!(ensure_certs(&certs, &one).unwrap(), Certs::Reused);
        let two = vec!["agent-1".to_string(), "agent-2".to_string()];
        assert_eq!(
            ensure_certs(&certs, &two).unwrap(),
            Certs::Extended(vec!["agent-2".to_string()])
        );
        assert!(CertDir::new(&certs).agent_cert("agent-2").exists());
    }

    #[tokio::test]
    async fn leftover_processes_of_a_work_dir_are_found_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        assert!(processes_using(&work).is_empty());
        // A stand-in for an orphaned agent: a long-lived process with the certificate directory
        // among its arguments, as an agent has `--certs DIR`. Python sleeping never forks, so
        // exactly one process matches (a shell loop would briefly show a forked copy of itself;
        // so would a version-manager shim, hence the interpreter's own path).
        let certs = Layout::new(&work).certs;
        let mut orphan = std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg("import time; time.sleep(600)")
            .arg(&certs)
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still this test's.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while processes_using(&work).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let found = processes_using(&work);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, orphan.id());

        let config = LocalClusterConfig {
            work_dir: work.clone(),
            agents: vec!["agent-1".to_string()],
            bin_dir: dir.path().join("no-binaries-here"),
            connect_timeout: Duration::from_secs(1),
        };
        let err = LocalCluster::start(&config).await.unwrap_err();
        assert!(
            err.to_string().contains("processes of an earlier cluster"),
            "{err}"
        );
        assert!(err.to_string().contains(&orphan.id().to_string()), "{err}");

        orphan.kill().unwrap();
        orphan.wait().unwrap();
        let left = processes_using(&work);
        assert!(left.is_empty(), "{left:?}");
    }

    /// Writes an executable shell script `name` into `dir`.
    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn a_coordinator_that_dies_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        script(
            &bin_dir,
            COORDINATOR_BIN,
            "echo 'cannot open database' >&2; exit 3",
        );
        script(&bin_dir, AGENT_BIN, "sleep 30");
        let config = LocalClusterConfig {
            work_dir: dir.path().join("work"),
            agents: vec!["agent-1".to_string()],
            bin_dir,
            connect_timeout: Duration::from_secs(5),
        };
        let err = LocalCluster::start(&config).await.unwrap_err().to_string();
        assert!(err.contains("exited before listening"), "{err}");
        assert!(err.contains("cannot open database"), "{err}");
        // The certificates were made, and no agent was started.
        assert!(
            CertDir::new(dir.path().join("work/certs"))
                .agent_cert("agent-1")
                .exists()
        );
        assert!(processes_using(&config.work_dir).is_empty());
    }

    #[test]
    fn log_tails_quote_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(
            &log,
            (1..=20).map(|n| format!("line {n}\n")).collect::<String>(),
        )
        .unwrap();
        let tail = log_tail(&log);
        assert!(
            tail.contains("line 20") && tail.contains("line 6"),
            "{tail}"
        );
        assert!(!tail.lines().any(|l| l.trim() == "line 5"), "{tail}");
        assert!(log_tail(&dir.path().join("none.log")).contains("is empty"));
    }
}
