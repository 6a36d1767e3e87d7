//! Spawning stressor children: the one place besides `sys/command.rs` that starts processes.
//!
//! Why not `sys::command`: that seam runs short-lived host tools to completion, with a timeout
//! and `kill_on_drop`. A stressor is the opposite: it must outlive the call that starts it, die
//! with the agent (`PR_SET_PDEATHSIG(SIGKILL)`), and report that it joined the target's cgroups.
//!
//! Which thread spawns matters: the parent-death signal fires when the *thread* that forked the
//! child exits, not the process. Tokio's blocking-pool threads exit after being idle for a while
//! (so `spawn_blocking` would kill stressors at random), and a runtime worker that ever enters
//! `block_in_place` becomes such a pool thread. So every stressor is forked by one dedicated
//! thread, `faultline-stress-spawner`, started on first use and never ending: its exit, and so
//! the signal, coincides with the agent's.
//!
//! Each child gets a reaper thread that reads the child's one-line handshake (`ready` or
//! `error: ...` on stdout), then waits for it, so killed stressors never linger as zombies and
//! their exit status (e.g. SIGKILL from the OOM killer) is known to [`exit_status`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};

use tokio::sync::oneshot;

use crate::process::{ProcessId, Stat, signal_identity};

/// A started child: who it is, and whether it reached `ready`.
#[derive(Debug)]
pub struct Spawned {
    pub id: ProcessId,
    pub ready: oneshot::Receiver<Result<(), String>>,
}

struct Request {
    program: PathBuf,
    args: Vec<String>,
    reply: oneshot::Sender<std::io::Result<Spawned>>,
}

static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
static EXITS: OnceLock<Mutex<HashMap<ProcessId, String>>> = OnceLock::new();

/// How a stressor this agent spawned ended, once its reaper saw it end.
pub fn exit_status(id: &ProcessId) -> Option<String> {
    EXITS.get()?.lock().ok()?.get(id).cloned()
}

fn record_exit(id: ProcessId, how: String) {
    let exits = EXITS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Ok(mut exits) = exits.lock() {
        if exits.len() > 4096 {
            exits.clear();
        }
        exits.insert(id, how);
    }
}

/// Starts `program args` from the spawner thread.
pub async fn spawn(program: PathBuf, args: Vec<String>) -> std::io::Result<Spawned> {
    let sender = SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("faultline-stress-spawner".into())
            .spawn(move || {
                // Ends only with the process: the statics hold the sender forever.
                while let Ok(request) = receiver.recv() {
                    let result = spawn_here(&request.program, &request.args);
                    let _ = request.reply.send(result);
                }
            });
        if let Err(err) = started {
            tracing::error!(%err, "cannot start the stressor spawner thread");
        }
        Mutex::new(sender)
    });
    let (reply, answer) = oneshot::channel();
    let request = Request {
        program,
        args,
        reply,
    };
    sender
        .lock()
        .map_err(|_| std::io::Error::other("stressor spawner lock poisoned"))?
        .send(request)
        .map_err(|_| std::io::Error::other("stressor spawner thread is not running"))?;
    answer
        .await
        .map_err(|_| std::io::Error::other("stressor spawner thread dropped the request"))?
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| signal.to_string());
                format!("killed by signal {signal} ({name})")
            }
            _ => status.to_string(),
        },
        Err(err) => format!("wait failed: {err}"),
    }
}

/// Runs on the spawner thread.
fn spawn_here(program: &PathBuf, args: &[String]) -> std::io::Result<Spawned> {
    let parent = std::process::id() as libc::pid_t;
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: runs in the forked child before exec and calls only prctl(2) and getppid(2),
    // both async-signal-safe; errors are built from raw OS codes (no allocation).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died between fork and prctl: the signal would never come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    #[allow(clippy::disallowed_methods)] // The stressor spawn site: see the module docs.
    let mut child = command.spawn()?;
    let pid = child.id();
    // Our unreaped child: its /proc entry exists until the reaper waits for it (as a zombie if
    // it exited already, whose identity still counts for `exit_status`).
    let id = Stat::read(pid).ok().flatten().map_or_else(
        || ProcessId {
            pid,
            start_time: 0,
            comm: String::new(),
        },
        |stat| stat.identity(),
    );
    let (ready_tx, ready) = oneshot::channel();
    let stdout = child.stdout.take();
    let reaped = id.clone();
    let reaper = std::thread::Builder::new()
        .name("faultline-stress-reaper".into())
        .spawn(move || reap(child, reaped, stdout, ready_tx));
    if let Err(err) = reaper {
        // Without a reaper nobody would wait for it: do not leave it running.
        let _ = signal_identity(&id, nix::sys::signal::Signal::SIGKILL);
        return Err(err);
    }
    Ok(Spawned { id, ready })
}

fn reap(
    mut child: Child,
    id: ProcessId,
    stdout: Option<std::process::ChildStdout>,
    ready_tx: oneshot::Sender<Result<(), String>>,
) {
    let mut ready_tx = Some(ready_tx);
    if let Some(stdout) = stdout {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while let Ok(read) = reader.read_line(&mut line) {
            if read == 0 {
                break;
            }
            let text = line.trim();
            let outcome = if text == "ready" {
                Some(Ok(()))
            } else {
                text.strip_prefix("error: ")
                    .map(|reason| Err(reason.to_string()))
            };
            if let Some(outcome) = outcome {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(outcome);
                }
                break;
            }
            line.clear();
        }
    }
    let how = describe(child.wait());
    record_exit(id, how.clone());
    if let Some(tx) = ready_tx.take() {
        let _ = tx.send(Err(format!("it {how} before it was ready")));
    }
}
