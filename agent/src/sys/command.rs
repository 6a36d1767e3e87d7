//! The one place the agent spawns processes. Host tools run with a timeout, optionally inside a
//! network namespace (entered in the child between fork and exec, so the target needs no tools
//! of its own), and their failures carry the exact command line.
//!
//! [`CommandRunner`] is the seam: [`HostRunner`] runs for real; [`RecordingRunner`] records
//! command lines and replays scripted answers for unit tests of the builders' callers.
//! [`run_bounded`] runs a program for its answer (command probes): minimal environment,
//! deadline enforced on its whole process group, bounded output.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::netns::{Netns, NetnsError};

/// How long any host tool may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A command line to run, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
    /// Run inside this network namespace instead of the agent's.
    pub netns: Option<Netns>,
    /// Bytes written to the command's stdin (e.g. an `nft -f -` script).
    pub stdin: Option<String>,
}

impl CommandSpec {
    pub fn new<I, S>(program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            program: program.to_string(),
            args: args.into_iter().map(Into::into).collect(),
            netns: None,
            stdin: None,
        }
    }

    pub fn in_netns(mut self, netns: &Netns) -> Self {
        self.netns = Some(netns.clone());
        self
    }

    pub fn with_stdin(mut self, stdin: impl Into<String>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// The command line as a person would type it, for errors and logs.
    pub fn display(&self) -> String {
        let mut line = String::new();
        if let Some(netns) = &self.netns {
            line.push_str(&format!("[netns {}] ", netns.inode));
        }
        line.push_str(&self.program);
        for arg in &self.args {
            line.push(' ');
            if arg.is_empty() || arg.contains(char::is_whitespace) {
                line.push_str(&format!("{arg:?}"));
            } else {
                line.push_str(arg);
            }
        }
        line
    }
}

/// What a finished command printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; -1 when killed by a signal.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn ok(stdout: &str) -> Self {
        Self {
            status: 0,
            stdout: stdout.to_string(),
            stderr: String::new(),
        }
    }

    pub fn failed(status: i32, stderr: &str) -> Self {
        Self {
            status,
            stdout: String::new(),
            stderr: stderr.to_string(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Failures running a command, always with its command line.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("`{command}` could not be started: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("`{command}` failed (exit {status}): {stderr}")]
    Failed {
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("`{command}`: {source}")]
    Netns { command: String, source: NetnsError },
}

/// Runs commands. Implementations must be usable from many tasks at once.
pub trait CommandRunner: Send + Sync + 'static {
    /// Runs `spec` and returns its output, whatever its exit status.
    fn run(
        &self,
        spec: &CommandSpec,
    ) -> impl Future<Output = Result<CommandOutput, CommandError>> + Send;

    /// Runs `spec` and fails unless it exits 0.
    fn run_checked(
        &self,
        spec: &CommandSpec,
    ) -> impl Future<Output = Result<CommandOutput, CommandError>> + Send {
        async move {
            let output = self.run(spec).await?;
            if output.success() {
                Ok(output)
            } else {
                Err(CommandError::Failed {
                    command: spec.display(),
                    status: output.status,
                    stderr: output.stderr.trim().to_string(),
                })
            }
        }
    }
}

/// Runs commands on this host for real.
#[derive(Debug, Default, Clone)]
pub struct HostRunner;

impl CommandRunner for HostRunner {
    async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
        let command_line = spec.display();
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Opened here, in the parent, so the child only has to call setns(2).
        let netns_file = match &spec.netns {
            Some(netns) => Some(netns.open().map_err(|source| CommandError::Netns {
                command: command_line.clone(),
                source,
            })?),
            None => None,
        };
        if let Some(file) = &netns_file {
            let fd = file.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
            // which is async-signal-safe; `fd` stays open in the parent (and so in the child)
            // until spawn returns because `netns_file` outlives the spawn call.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().map_err(|source| CommandError::Spawn {
            command: command_line.clone(),
            source,
        })?;
        drop(netns_file);
        if let (Some(input), Some(mut stdin)) = (&spec.stdin, child.stdin.take()) {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|source| CommandError::Spawn {
                    command: command_line.clone(),
                    source,
                })?;
        }
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| CommandError::Timeout {
                command: command_line.clone(),
                timeout: COMMAND_TIMEOUT,
            })?
            .map_err(|source| CommandError::Spawn {
                command: command_line,
                source,
            })?;
        Ok(CommandOutput {
            status: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// A fake runner: records every command line and answers from a script (default: success
/// with empty output).
#[derive(Debug, Default)]
pub struct RecordingRunner {
    calls: Mutex<Vec<CommandSpec>>,
    answers: Mutex<VecDeque<(String, CommandOutput)>>,
}

impl RecordingRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next command whose display contains `fragment` gets `output`.
    pub fn answer(&self, fragment: &str, output: CommandOutput) {
        if let Ok(mut answers) = self.answers.lock() {
            answers.push_back((fragment.to_string(), output));
        }
    }

    /// Command lines run so far.
    pub fn lines(&self) -> Vec<String> {
        self.calls
            .lock()
            .map(|c| c.iter().map(CommandSpec::display).collect())
            .unwrap_or_default()
    }

    /// Commands run so far, in full.
    pub fn calls(&self) -> Vec<CommandSpec> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl CommandRunner for RecordingRunner {
    async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
        let line = spec.display();
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(spec.clone());
        }
        let mut answers = match self.answers.lock() {
            Ok(answers) => answers,
            Err(_) => return Ok(CommandOutput::default()),
        };
        let position = answers
            .iter()
            .position(|(fragment, _)| line.contains(fragment.as_str()));
        Ok(position
            .and_then(|index| answers.remove(index))
            .map(|(_, output)| output)
            .unwrap_or_default())
    }
}

/// `PATH` of a bounded program ([`run_bounded`]); also where bare program names are looked up.
pub const BOUNDED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A program run for its answer rather than its effect (a steady-state probe): executed
/// directly (no shell), stdin from /dev/null, an environment of only `PATH=`[`BOUNDED_PATH`]
/// and `LC_ALL=C`, `/` as working directory, in a process group of its own that is killed
/// when `timeout` runs out, with only a bounded part of its output kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedSpec {
    /// Absolute path of the program (already resolved: nothing is looked up here).
    pub program: std::path::PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
    pub timeout: Duration,
    /// At most this many bytes of stdout are kept (from the start); the rest is read and dropped.
    pub stdout_limit: usize,
    /// At most this many bytes of stderr are kept (from the end).
    pub stderr_tail: usize,
}

impl BoundedSpec {
    /// The command line as a person would type it, for errors and logs.
    pub fn display(&self) -> String {
        CommandSpec::new(&self.program.to_string_lossy(), self.args.iter().cloned()).display()
    }
}

/// How a bounded program ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundedOutput {
    /// Set when the program exited by itself.
    pub exit_code: Option<i32>,
    /// Set when a signal ended it (SIGKILL when it timed out).
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    /// The program wrote more than `stdout_limit` bytes.
    pub stdout_truncated: bool,
    pub stderr_tail: Vec<u8>,
    /// Killed because it ran past its timeout.
    pub timed_out: bool,
    /// From spawn to exit (or kill).
    pub elapsed: Duration,
}

/// How long reaping a killed program may take before it is left to `kill_on_drop`.
const REAP_GRACE: Duration = Duration::from_secs(1);

/// Runs `spec` (see [`BoundedSpec`]). Fails only when the program cannot be started; a program
/// that fails, is killed or times out is an `Ok` output saying so.
///
/// The deadline covers the program *and* its output: a program that exits while something it
/// started keeps its stdout open is, at the deadline, treated like one that is still running
/// (its process group is killed) except that its exit code is kept.
pub async fn run_bounded(spec: &BoundedSpec) -> Result<BoundedOutput, CommandError> {
    use std::os::unix::process::ExitStatusExt;

    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .env("PATH", BOUNDED_PATH)
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = tokio::time::Instant::now();
    let mut child = command.spawn().map_err(|source| CommandError::Spawn {
        command: spec.display(),
        source,
    })?;
    // The group id is the child's pid (process_group(0)); taken now, before it is reaped.
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let (stdout_pipe, stderr_pipe) = (child.stdout.take(), child.stderr.take());
    let mut output = BoundedOutput::default();
    let mut stderr = Vec::new();
    let finished = tokio::time::timeout_at(started + spec.timeout, async {
        let (status, (), ()) = tokio::join!(
            child.wait(),
            read_head(
                stdout_pipe,
                &mut output.stdout,
                spec.stdout_limit,
                &mut output.stdout_truncated
            ),
            read_tail(stderr_pipe, &mut stderr, spec.stderr_tail),
        );
        status
    })
    .await;
    let status = match finished {
        Ok(status) => status,
        Err(_elapsed) => {
            // Still running, or exited with its output held open by something it started:
            // either way its whole process group goes.
            output.timed_out = !matches!(child.try_wait(), Ok(Some(_)));
            if let Some(group) = group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(group),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            match tokio::time::timeout(REAP_GRACE, child.wait()).await {
                Ok(status) => status,
                Err(_) => Err(std::io::Error::other("not reaped after SIGKILL")),
            }
        }
    };
    output.elapsed = started.elapsed();
    output.stderr_tail = stderr;
    match status {
        Ok(status) => {
            output.exit_code = status.code();
            output.signal = status.signal();
        }
        Err(error) => {
            tracing::warn!(command = %spec.display(), %error, "could not reap a probe program");
            output.signal = Some(libc::SIGKILL);
        }
    }
    Ok(output)
}

/// Reads `pipe` to its end, keeping the first `limit` bytes in `kept`.
async fn read_head(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    kept: &mut Vec<u8>,
    limit: usize,
    truncated: &mut bool,
) {
    use tokio::io::AsyncReadExt;

    let Some(mut pipe) = pipe else { return };
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let take = n.min(limit.saturating_sub(kept.len()));
                kept.extend_from_slice(&chunk[..take]);
                if take < n {
                    *truncated = true;
                }
            }
        }
    }
}

/// Reads `pipe` to its end, keeping the last `limit` bytes in `kept`.
async fn read_tail(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    kept: &mut Vec<u8>,
    limit: usize,
) {
    use tokio::io::AsyncReadExt;

    let Some(mut pipe) = pipe else { return };
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > limit {
                    kept.drain(..kept.len() - limit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_commands_report_output_and_failures_with_their_command_line() {
        let runner = HostRunner;
        let out = runner
            .run_checked(&CommandSpec::new("sh", ["-c", "echo hi"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, "hi\n");
        let err = runner
            .run_checked(&CommandSpec::new("sh", ["-c", "echo nope >&2; exit 3"]))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sh -c \"echo nope >&2; exit 3\"") && text.contains("exit 3"),
            "{text}"
        );
        assert!(text.contains("nope"), "{text}");
        let stdin = CommandSpec::new("cat", Vec::<String>::new()).with_stdin("piped");
        assert_eq!(runner.run_checked(&stdin).await.unwrap().stdout, "piped");
        let missing = runner
            .run(&CommandSpec::new("/nonexistent/tool", ["x"]))
            .await
            .unwrap_err();
        assert!(matches!(missing, CommandError::Spawn { .. }));
    }

    #[tokio::test]
    async fn commands_can_run_inside_a_network_namespace() {
        // Our own namespace: proves the setns path end to end without needing root.
        let me = Netns::current().unwrap();
        let spec = CommandSpec::new("readlink", ["/proc/self/ns/net"]).in_netns(&me);
        let out = HostRunner.run_checked(&spec).await.unwrap();
        assert!(out.stdout.contains(&me.inode.to_string()), "{}", out.stdout);
        assert!(
            spec.display()
                .starts_with(&format!("[netns {}] readlink", me.inode))
        );
    }

    #[tokio::test]
    async fn the_recording_runner_records_and_answers_by_fragment() {
        let runner = RecordingRunner::new();
        runner.answer("-L", CommandOutput::failed(1, "no chain"));
        let listed = runner
            .run(&CommandSpec::new("iptables", ["-L", "X"]))
            .await
            .unwrap();
        assert_eq!(listed.status, 1);
        assert!(
            runner
                .run(&CommandSpec::new("iptables", ["-L", "X"]))
                .await
                .unwrap()
                .success()
        );
        assert_eq!(runner.lines(), ["iptables -L X", "iptables -L X"]);
    }
}
