//! Host processes as fault targets: identities that survive pid reuse, exact-name resolution,
//! the processes of a container, SIGSTOP/SIGCONT with an undo record, and kill storms.
//!
//! A pid alone is not an identity: after a process exits its pid is handed to the next one.
//! [`ProcessId`] adds the start time (in clock ticks since boot, which never repeats for a
//! pid) and every signal goes through [`signal_identity`], which opens a pidfd first and only
//! then checks the start time, so the signal reaches that exact process or nothing. A revert
//! replayed from the journal hours later therefore never SIGCONTs (or kills) a stranger.
//! Stressors (`crate::stress`) use the same identities, signalling and [`Stat`] (the one parser
//! of `/proc/<pid>/stat`).
//!
//! Apply order for [`stop`]: build the [`ProcessUndo`] from the resolved identities and
//! journal it *before* stopping, so a crash in between leaves an undo that resumes them
//! (SIGCONT to a running process is harmless).

mod storm;

pub use storm::{
    KillStorm, StormEvent, StormRegistry, StormSpec, StormSummary, spawn_kill_storm, storms,
};

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use faultline_domain::fault::TargetSelector;
use nix::sys::signal::Signal as NixSignal;
use serde::{Deserialize, Serialize};

use crate::verification::Verification;

/// The kernel keeps at most this many bytes of a command name (`TASK_COMM_LEN` - 1).
pub const COMM_MAX: usize = 15;

/// `PF_KTHREAD` in `/proc/<pid>/stat` flags: a kernel thread, never a fault target.
const PF_KTHREAD: u64 = 0x0020_0000;

/// How long [`stop`] waits for its targets to show as stopped.
pub const STOP_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// How many candidates an error lists at most.
const LISTED: usize = 10;

/// A process identity that survives pid reuse: pid + start time (field 22 of
/// `/proc/<pid>/stat`, clock ticks since boot) + comm.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)
    }
}

impl ProcessId {
    /// The identity of the live process `pid`; exited (zombie) processes have none.
    pub fn of(pid: u32) -> Result<Self, ProcessError> {
        let stat = Stat::read(pid)?.ok_or(ProcessError::NoSuchProcess { pid })?;
        if !stat.is_live() {
            return Err(ProcessError::NoSuchProcess { pid });
        }
        Ok(stat.identity())
    }

    /// Whether this very process still runs: same pid AND same start time (not a zombie).
    pub fn is_alive(&self) -> bool {
        self.stat().is_some()
    }

    /// Whether any thread of this very process has yet to exit. When a multi-threaded
    /// process is killed its leader turns zombie as soon as it has exited, while its other
    /// threads may still be exiting: until they are done the process still runs code and is
    /// still listed in its cgroups' `cgroup.procs`. A kill is complete only when this is false.
    pub fn any_thread_live(&self) -> bool {
        let Some(leader) = Stat::read(self.pid).ok().flatten() else {
            return false;
        };
        if leader.start_time != self.start_time {
            return false;
        }
        if leader.is_live() {
            return true;
        }
        let Ok(threads) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return false;
        };
        threads.flatten().any(|thread| {
            std::fs::read_to_string(thread.path().join("stat"))
                .ok()
                .and_then(|text| parse_stat(self.pid, &text).ok())
                .is_some_and(|stat| stat.is_live())
        })
    }

    /// Scheduler state (`R`, `S`, `D`, `T`...) of this very process, `None` once it is gone.
    pub fn state(&self) -> Option<char> {
        self.stat().map(|stat| stat.state)
    }

    /// The live stat of this identity, `None` if the pid is gone, a zombie or reused.
    fn stat(&self) -> Option<Stat> {
        Stat::read(self.pid)
            .ok()
            .flatten()
            .filter(|stat| stat.is_live() && stat.start_time == self.start_time)
    }
}

/// Failures resolving or signalling processes.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    #[error("no process is named exactly {name:?}{similar}")]
    NoMatch {
        name: String,
        /// `"; similar: ..."` or empty.
        similar: String,
    },
    #[error("{count} processes are named {name:?} ({candidates}); a fault needs exactly one")]
    Ambiguous {
        name: String,
        count: usize,
        candidates: String,
    },
    #[error(
        "process name {name:?} has {len} bytes but the kernel keeps at most {COMM_MAX} \
         (comm), so it can never match; use the first {COMM_MAX}"
    )]
    NameTooLong { name: String, len: usize },
    #[error(
        "no process named {name:?} in the container whose main process is {main_pid}; it runs {present}"
    )]
    NotInContainer {
        main_pid: u32,
        name: String,
        present: String,
    },
    #[error("refusing to target {what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("{selector} does not name a host process")]
    NotAProcess { selector: String },
    #[error("reading {path}: {source}")]
    Proc { path: String, source: io::Error },
    #[error("unexpected contents of {path}: {detail}")]
    Malformed { path: String, detail: String },
    #[error("unknown signal {0}")]
    UnknownSignal(String),
    #[error("sending {signal} to {target}: {source}")]
    Signal {
        target: String,
        signal: String,
        source: io::Error,
    },
    /// A caller-supplied resolver (e.g. "the container's main process") failed.
    #[error("{0}")]
    Target(String),
}

/// Resolves a host process selector: `Pid(p)` is that process; `ProcessName(n)` the one process
/// whose `comm` is exactly `n` (not a substring: `grep 8001 | xargs kill` kills bystanders).
/// No match or several are errors listing candidates. The agent itself and kernel threads are
/// never targets.
pub fn resolve_host(selector: &TargetSelector) -> Result<ProcessId, ProcessError> {
    match selector {
        TargetSelector::Pid(pid) => {
            let stat = Stat::read(*pid)?
                .filter(Stat::is_live)
                .ok_or(ProcessError::NoSuchProcess { pid: *pid })?;
            if let Some(reason) = never_a_target(&stat) {
                return Err(ProcessError::Refused {
                    what: stat.identity().to_string(),
                    reason: reason.to_string(),
                });
            }
            Ok(stat.identity())
        }
        TargetSelector::ProcessName(name) => {
            check_name(name)?;
            let all: Vec<Stat> = scan()?
                .into_iter()
                .filter(|stat| stat.is_live() && never_a_target(stat).is_none())
                .collect();
            let mut found: Vec<&Stat> = all.iter().filter(|stat| stat.comm == *name).collect();
            match found.len() {
                0 => Err(ProcessError::NoMatch {
                    name: name.clone(),
                    similar: similar(&all, name),
                }),
                1 => Ok(found.remove(0).identity()),
                count => Err(ProcessError::Ambiguous {
                    name: name.clone(),
                    count,
                    candidates: describe_candidates(&found),
                }),
            }
        }
        other => Err(ProcessError::NotAProcess {
            selector: other.to_string(),
        }),
    }
}

/// Processes inside a container, given its main pid: all live processes in the same pid
/// namespace (same `/proc/<p>/ns/pid` inode). `name` `None` means just the main process;
/// `Some(n)` those whose comm is exactly `n` (at least one is required). Sorted by pid.
pub fn in_container(main_pid: u32, name: Option<&str>) -> Result<Vec<ProcessId>, ProcessError> {
    let main = ProcessId::of(main_pid)?;
    let Some(name) = name else {
        return Ok(vec![main]);
    };
    check_name(name)?;
    let namespace =
        pid_namespace(main_pid)?.ok_or(ProcessError::NoSuchProcess { pid: main_pid })?;
    if pid_namespace(std::process::id())? == Some(namespace) {
        return Err(ProcessError::Refused {
            what: format!("processes named {name:?} around {main}"),
            reason: "it shares the host's pid namespace, so the search would cover the whole host"
                .to_string(),
        });
    }
    let members: Vec<Stat> = scan()?
        .into_iter()
        .filter(|stat| stat.is_live() && pid_namespace(stat.pid).ok().flatten() == Some(namespace))
        .collect();
    let found: Vec<ProcessId> = members
        .iter()
        .filter(|stat| stat.comm == name)
        .map(Stat::identity)
        .collect();
    if found.is_empty() {
        let present: BTreeSet<&str> = members.iter().map(|stat| stat.comm.as_str()).collect();
        return Err(ProcessError::NotInContainer {
            main_pid,
            name: name.to_string(),
            present: present.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(found)
}

/// What reverting a process fault takes: resume the identities that were stopped and cancel
/// the kill storm registered under `tag`, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUndo {
    /// Kill-storm registry tag (see [`storms`]); unique per fault.
    pub tag: String,
    /// Identities to SIGCONT.
    pub stopped: Vec<ProcessId>,
}

/// SIGSTOPs each identity that is still alive, then waits briefly (at most
/// [`STOP_SETTLE`]) until they show as stopped: a signal takes effect only once its target
/// is scheduled, and a [`verify_stopped`] right after would otherwise race it. Fails if a
/// signal is refused, or if none of the targets is alive any more (the fault would be a
/// no-op).
pub fn stop(targets: &[ProcessId]) -> Result<(), ProcessError> {
    let mut delivered = Vec::new();
    for target in targets {
        if signal_identity(target, NixSignal::SIGSTOP)? {
            delivered.push(target);
        }
    }
    if delivered.is_empty() {
        return Err(ProcessError::Refused {
            what: "stopping processes".to_string(),
            reason: format!("none of {} is alive any more", list_ids(targets)),
        });
    }
    let deadline = std::time::Instant::now() + STOP_SETTLE;
    while delivered
        .iter()
        .any(|target| target.state().is_some_and(|state| state != 'T'))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// Effective when every target is alive and stopped (`T` in `/proc/<pid>/stat`).
pub fn verify_stopped(targets: &[ProcessId]) -> Verification {
    if targets.is_empty() {
        return Verification {
            effective: false,
            detail: "no target processes".to_string(),
        };
    }
    let mut effective = true;
    let mut parts = Vec::new();
    for target in targets {
        match target.state() {
            Some('T') => parts.push(format!("{target} stopped")),
            Some(state) => {
                effective = false;
                parts.push(format!("{target} not stopped (state {state})"));
            }
            None => {
                effective = false;
                parts.push(format!("{target} gone"));
            }
        }
    }
    Verification {
        effective,
        detail: parts.join("; "),
    }
}

/// Reverts a process fault: cancels the kill storm registered under the tag and SIGCONTs the
/// stopped identities still alive (never a recycled pid). Idempotent. Returns a summary.
pub fn undo(undo: &ProcessUndo) -> Result<String, ProcessError> {
    let mut parts = Vec::new();
    if storms().remove(&undo.tag) {
        parts.push("kill storm cancelled".to_string());
    }
    let mut resumed = Vec::new();
    let mut gone = Vec::new();
    for target in &undo.stopped {
        if signal_identity(target, NixSignal::SIGCONT)? {
            resumed.push(target.clone());
        } else {
            gone.push(target.clone());
        }
    }
    if !resumed.is_empty() {
        parts.push(format!("resumed {}", list_ids(&resumed)));
    }
    if !gone.is_empty() {
        parts.push(format!("already gone: {}", list_ids(&gone)));
    }
    if parts.is_empty() {
        parts.push("nothing to undo".to_string());
    }
    Ok(parts.join("; "))
}

/// Sends `signal` to exactly the process `target` names: `Ok(true)` if delivered,
/// `Ok(false)` if that process is gone (its pid may now belong to another, which is left
/// alone). A pidfd pins the process before its start time is checked, so the check cannot be
/// raced by pid reuse.
pub fn signal_identity(target: &ProcessId, signal: NixSignal) -> Result<bool, ProcessError> {
    let failed = |source: io::Error| ProcessError::Signal {
        target: target.to_string(),
        signal: signal.as_str().to_string(),
        source,
    };
    let pidfd = match pidfd_open(target.pid) {
        Ok(fd) => Some(fd),
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        // Kernels before 5.3: no pidfd; check then kill (a tiny window remains).
        Err(err) if err.raw_os_error() == Some(libc::ENOSYS) => None,
        Err(err) => return Err(failed(err)),
    };
    if !target.is_alive() {
        return Ok(false);
    }
    let sent = match &pidfd {
        Some(fd) => pidfd_send_signal(fd, signal),
        None => {
            let pid = nix::unistd::Pid::from_raw(to_pid_t(target.pid)?);
            nix::sys::signal::kill(pid, signal).map_err(io::Error::from)
        }
    };
    match sent {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(err) => Err(failed(err)),
    }
}

/// Parses a signal name (`SIGKILL`, as the domain's [`Signal`](faultline_domain::fault::Signal)
/// spells it).
pub fn parse_signal(name: &str) -> Result<NixSignal, ProcessError> {
    name.parse::<NixSignal>()
        .map_err(|_| ProcessError::UnknownSignal(name.to_string()))
}

// --- /proc ------------------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` the agent uses. This is the one parser of that file: other
/// modules (stressors) read it through here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    /// Field 2: the command name, at most [`COMM_MAX`] bytes.
    pub comm: String,
    /// Field 3: `R`, `S`, `D`, `T`, `Z`...
    pub state: char,
    /// Field 9: `PF_*` flags.
    pub flags: u64,
    /// Field 14: user CPU time in clock ticks (all threads).
    pub utime: u64,
    /// Field 15: system CPU time in clock ticks (all threads).
    pub stime: u64,
    /// Field 22: clock ticks after boot.
    pub start_time: u64,
}

impl Stat {
    /// `Ok(None)` when the process does not exist (or vanished while being read). Exited
    /// (zombie) processes are read too: see [`Stat::is_live`].
    pub fn read(pid: u32) -> Result<Option<Stat>, ProcessError> {
        let path = format!("/proc/{pid}/stat");
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_stat(pid, &text)
                .map(Some)
                .map_err(|detail| ProcessError::Malformed { path, detail }),
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(None),
            Err(source) => Err(ProcessError::Proc { path, source }),
        }
    }

    /// Not exited: zombies (`Z`) and dead tasks (`X`, `x`) only wait to be reaped.
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// The identity of this process, whether or not it is live.
    pub fn identity(&self) -> ProcessId {
        ProcessId {
            pid: self.pid,
            start_time: self.start_time,
            comm: self.comm.clone(),
        }
    }
}

/// Parses `/proc/<pid>/stat`. The comm (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so it runs to the *last* `)`.
fn parse_stat(pid: u32, text: &str) -> Result<Stat, String> {
    let open = text.find('(').ok_or("no '(' before the command name")?;
    let close = text.rfind(')').ok_or("no ')' after the command name")?;
    if close < open {
        return Err("')' before '('".to_string());
    }
    let comm = text[open + 1..close].to_string();
    // Fields from 3 (state) on.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |number: usize| -> Result<&str, String> {
        rest.get(number - 3)
            .copied()
            .ok_or_else(|| format!("only {} fields", rest.len() + 2))
    };
    let number = |n: usize| -> Result<u64, String> {
        let text = field(n)?;
        text.parse()
            .map_err(|_| format!("field {n} is not a number: {text:?}"))
    };
    let state = field(3)?.chars().next().ok_or("empty state field")?;
    Ok(Stat {
        pid,
        comm,
        state,
        flags: number(9)?,
        utime: number(14)?,
        stime: number(15)?,
        start_time: number(22)?,
    })
}

/// Every process (thread-group leader) on the host; processes vanishing meanwhile are skipped.
fn scan() -> Result<Vec<Stat>, ProcessError> {
    let entries = std::fs::read_dir("/proc").map_err(|source| ProcessError::Proc {
        path: "/proc".to_string(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Permission or parse trouble with one process must not hide all the others.
        if let Ok(Some(stat)) = Stat::read(pid) {
            found.push(stat);
        }
    }
    found.sort_by_key(|stat| stat.pid);
    Ok(found)
}

/// Inode of the pid namespace of `pid`, `None` if the process is gone.
fn pid_namespace(pid: u32) -> Result<Option<u64>, ProcessError> {
    let path = format!("/proc/{pid}/ns/pid");
    match std::fs::metadata(Path::new(&path)) {
        Ok(meta) => Ok(Some(meta.ino())),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(None),
        Err(source) => Err(ProcessError::Proc { path, source }),
    }
}

/// Why a process may never be a target, if it may not.
fn never_a_target(stat: &Stat) -> Option<&'static str> {
    if stat.pid == std::process::id() {
        Some("it is the agent itself")
    } else if stat.flags & PF_KTHREAD != 0 {
        Some("it is a kernel thread")
    } else {
        None
    }
}

fn check_name(name: &str) -> Result<(), ProcessError> {
    if name.is_empty() {
        return Err(ProcessError::NoMatch {
            name: String::new(),
            similar: "; a process name cannot be empty".to_string(),
        });
    }
    if name.len() > COMM_MAX {
        return Err(ProcessError::NameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    Ok(())
}

/// `"; similar: pid 12 (name-x), ..."` for processes whose comm contains `name` or is
/// contained in it, or an empty string.
fn similar(all: &[Stat], name: &str) -> String {
    let close: Vec<&Stat> = all
        .iter()
        .filter(|stat| {
            stat.comm.contains(name) || (stat.comm.len() >= 3 && name.contains(&stat.comm))
        })
        .collect();
    if close.is_empty() {
        String::new()
    } else {
        format!("; similar: {}", describe_candidates(&close))
    }
}

/// `pid 12 (cmdline...), pid 13 (...)`, at most [`LISTED`], then `and N more`.
fn describe_candidates(stats: &[&Stat]) -> String {
    let mut parts: Vec<String> = stats
        .iter()
        .take(LISTED)
        .map(|stat| format!("pid {} {:?}", stat.pid, command_line(stat)))
        .collect();
    if stats.len() > LISTED {
        parts.push(format!("and {} more", stats.len() - LISTED));
    }
    parts.join(", ")
}

/// The command line of a process (or its comm when that is unreadable), shortened.
fn command_line(stat: &Stat) -> String {
    let raw = std::fs::read(format!("/proc/{}/cmdline", stat.pid)).unwrap_or_default();
    let line = raw
        .split(|byte| *byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        return stat.comm.clone();
    }
    if line.chars().count() > 80 {
        let short: String = line.chars().take(77).collect();
        format!("{short}...")
    } else {
        line
    }
}

fn list_ids(ids: &[ProcessId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// --- pidfd ------------------------------------------------------------------------------------

fn to_pid_t(pid: u32) -> Result<libc::pid_t, ProcessError> {
    libc::pid_t::try_from(pid).map_err(|_| ProcessError::NoSuchProcess { pid })
}

/// `pidfd_open(2)`: a descriptor pinning the process `pid` (not whatever reuses the pid later).
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor or -1;
    // no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(2)` without siginfo: like kill(2), but to the pinned process only.
fn pidfd_send_signal(fd: &OwnedFd, signal: NixSignal) -> io::Result<()> {
    // SAFETY: the descriptor is open for the duration of the call, siginfo is NULL (allowed:
    // the kernel then fills it in as for kill(2)) and flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_parentheses_and_spaces_in_the_name() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_stat(4242, line).unwrap();
        assert_eq!(stat.comm, "we (ird) name");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.flags, 4_194_560);
        assert_eq!((stat.utime, stat.stime), (1, 2));
        assert_eq!(stat.start_time, 987_654);
        assert!(parse_stat(1, "1 (x) S 0").is_err());
        assert!(parse_stat(1, "garbage").is_err());
    }

    #[test]
    fn our_own_identity_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert!(me.start_time > 0);
        let recycled = ProcessId {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!recycled.is_alive());
        assert_eq!(recycled.state(), None);
        // Never signalled: a harmless signal proves the pidfd path refuses the mismatch.
        assert!(!signal_identity(&recycled, NixSignal::SIGCONT).unwrap());
    }

    #[test]
    fn the_agent_and_kernel_threads_are_never_targets() {
        let err = resolve_host(&TargetSelector::Pid(std::process::id())).unwrap_err();
        assert!(err.to_string().contains("agent itself"), "{err}");
        // kthreadd is pid 2 on every Linux host with its own pid namespace view of the host.
        if let Ok(Some(stat)) = Stat::read(2)
            && stat.flags & PF_KTHREAD != 0
        {
            let err = resolve_host(&TargetSelector::Pid(2)).unwrap_err();
            assert!(err.to_string().contains("kernel thread"), "{err}");
        }
    }

    #[test]
    fn names_longer_than_comm_and_other_selectors_are_refused() {
        let err = resolve_host(&TargetSelector::ProcessName(
            "a-very-long-process-name".into(),
        ))
        .unwrap_err();
        assert!(
            matches!(err, ProcessError::NameTooLong { len: 24, .. }),
            "{err}"
        );
        let err = resolve_host(&TargetSelector::Container("db".into())).unwrap_err();
        assert!(matches!(err, ProcessError::NotAProcess { .. }), "{err}");
        assert!(matches!(
            resolve_host(&TargetSelector::Pid(u32::MAX)),
            Err(ProcessError::NoSuchProcess { .. })
        ));
    }

    #[test]
    fn signal_names_parse() {
        assert_eq!(parse_signal("SIGKILL").unwrap(), NixSignal::SIGKILL);
        assert_eq!(parse_signal("SIGTERM").unwrap(), NixSignal::SIGTERM);
        assert!(parse_signal("SIGNOPE").is_err());
    }

    #[test]
    fn an_empty_undo_is_a_no_op() {
        let undo = ProcessUndo {
            tag: "process-test-nothing".into(),
            stopped: vec![],
        };
        assert_eq!(super::undo(&undo).unwrap(), "nothing to undo");
        let verification = verify_stopped(&[]);
        assert!(!verification.effective);
    }
}
