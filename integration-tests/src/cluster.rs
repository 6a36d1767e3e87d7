//! A local Faultline cluster made of the real binaries: certificates from `faultline certs init`,
//! a coordinator and N agents as separate processes on loopback, and the CLI to drive them.
//! Processes get SIGTERM (then SIGKILL) when dropped so a failing test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary, next to the test executable's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join(name)
}

fn require_bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace binaries first (`cargo test --workspace` does)",
            path.display()
        );
    }
    Ok(path)
}

/// Cluster tests measure timings (lease expiry within a second); on a 2-core machine they must
/// not compete with each other, so each holds this lock for its lifetime.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A child process that is stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    /// Wraps a child started by a test itself (stopped on drop like the cluster's own).
    pub fn from_child(name: &str, child: Child) -> Proc {
        Proc {
            name: name.to_string(),
            child: Some(child),
        }
    }

    /// Has the process exited (or been reaped already)? Its exit status if so.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .map(|id| Pid::from_raw(id as i32))
    }

    /// SIGKILL, as a crash would.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after `grace`).
    pub async fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(id) = child.id() {
            let _ = kill(Pid::from_raw(id as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Polite first: an agent reverts its faults on SIGTERM.
            if let Some(id) = child.id() {
                let _ = kill(Pid::from_raw(id as i32), Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.start_kill();
        }
    }
}

/// Coordinator + agents + CLI in a temporary directory.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub db: PathBuf,
    pub addr: String,
    pub coordinator: Proc,
    pub agents: Vec<Proc>,
    pub agent_names: Vec<String>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// Certificates for `agents`, a coordinator on a free loopback port, and every agent
    /// started and connected.
    pub async fn start(agents: &[&str]) -> anyhow::Result<Cluster> {
        let serial = SERIAL.lock().await;
        let dir = tempfile::tempdir().context("temp dir")?;
        let certs = dir.path().join("certs");
        let out = cli_raw(
            &certs,
            "https://127.0.0.1:1",
            &[
                "certs",
                "init",
                "--dir",
                path_str(&certs)?,
                "--agents",
                &agents.join(","),
            ],
        )
        .await?;
        if !out.status.success() {
            bail!(
                "certs init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let db = dir.path().join("coordinator.db");
        let (coordinator, addr) = start_coordinator(&certs, &db, "127.0.0.1:0").await?;
        let mut cluster = Cluster {
            dir,
            certs,
            db,
            addr,
            coordinator,
            agents: Vec::new(),
            agent_names: agents.iter().map(|s| s.to_string()).collect(),
            _serial: serial,
        };
        for name in agents {
            let agent = cluster.spawn_agent(name)?;
            cluster.agents.push(agent);
        }
        cluster
            .wait_connected(agents, Duration::from_secs(20))
            .await?;
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn state_dir(&self, agent: &str) -> PathBuf {
        self.dir.path().join("state").join(agent)
    }

    /// Starts (or restarts) an agent process with its persistent state directory.
    pub fn spawn_agent(&self, name: &str) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{name}.log")))?;
        let child = Command::new(require_bin("faultline-agent")?)
            .args(["--coordinator", &self.url(), "--name", name])
            .arg("--certs")
            .arg(&self.certs)
            .arg("--state-dir")
            .arg(self.state_dir(name))
            .env("RUST_LOG", "info,h2=warn,tower=warn,hyper=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting agent {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Restarts the coordinator on the same address and database.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        let (coordinator, addr) = start_coordinator(&self.certs, &self.db, &self.addr).await?;
        self.coordinator = coordinator;
        self.addr = addr;
        Ok(())
    }

    /// Runs the CLI with this cluster's coordinator and operator certificates.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        cli_raw(&self.certs, &self.url(), args).await
    }

    /// Runs the CLI and parses its stdout as JSON; fails on a non-zero exit.
    pub async fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.cli(args).await?;
        if !out.status.success() {
            bail!(
                "faultline {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Waits until every named agent is listed as connected.
    pub async fn wait_connected(&self, names: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let listed = self.cli_json(&["agents", "list", "--output", "json"]).await;
            if let Ok(serde_json::Value::Array(agents)) = &listed {
                let connected = |n: &&str| {
                    agents
                        .iter()
                        .any(|a| a["name"] == **n && a["connected"] == true)
                };
                if names.iter().all(connected) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("agents {names:?} not all connected after {timeout:?}: {listed:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The text of an agent's log, for assertion messages.
    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("agent-{name}.log")))
            .unwrap_or_default()
    }

    /// Writes a plan file into the cluster's directory.
    pub fn write_plan(&self, name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml)?;
        Ok(path)
    }

    /// Writes the plan as `name` and starts it with `faultline run`; returns the run id.
    pub async fn start_run(&self, name: &str, yaml: &str) -> anyhow::Result<String> {
        let path = self.write_plan(name, yaml)?;
        let out = self.cli(&["run", path_str(&path)?]).await?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "faultline run {name} failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // "run <ID> started: <title>"
        stdout
            .split_whitespace()
            .nth(1)
            .map(str::to_string)
            .with_context(|| format!("no run id in {stdout:?}"))
    }

    /// The run (`runs show --output json`) once it has ended, polled for at most `timeout`.
    pub async fn finished(
        &self,
        run_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self
                .cli_json(&["runs", "show", run_id, "--output", "json"])
                .await?;
            if run["state"] != "running" {
                return Ok(run);
            }
            if Instant::now() >= deadline {
                bail!("run {run_id} still running after {timeout:?}: {run:#}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("non-UTF-8 temp path")
}

/// Runs the `faultline` CLI.
pub async fn cli_raw(certs: &Path, url: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(require_bin("faultline")?)
        .args(args)
        .env("FAULTLINE_CERTS", certs)
        .env("FAULTLINE_COORDINATOR", url)
        .stdin(Stdio::null())
        .output();
    tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .with_context(|| format!("faultline {args:?} timed out"))?
        .with_context(|| format!("running faultline {args:?}"))
}

async fn start_coordinator(
    certs: &Path,
    db: &Path,
    listen: &str,
) -> anyhow::Result<(Proc, String)> {
    let log_path = db.with_extension("log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut child = Command::new(require_bin("faultline-coordinator")?)
        .args(["--listen", listen])
        .arg("--certs")
        .arg(certs)
        .arg("--db")
        .arg(db)
        .env("RUST_LOG", "info,h2=warn,tower=warn,hyper=warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting coordinator")?;
    let stdout = child.stdout.take().context("coordinator stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // Rebinding the same port right after a SIGKILL can take a moment; the line comes when
    // the listener is up.
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("coordinator did not report its address in time")??
        .with_context(|| {
            format!(
                "coordinator exited before listening: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
    let addr = line
        .rsplit(' ')
        .next()
        .filter(|a| a.contains(':'))
        .with_context(|| format!("unexpected coordinator output {line:?}"))?
        .to_string();
    Ok((
        Proc {
            name: "coordinator".into(),
            child: Some(child),
        },
        addr,
    ))
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
