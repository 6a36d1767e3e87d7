//! The process module against real processes this test spawns: uniquely named copies of
//! `/bin/sleep` (a process's comm is its executable's file name), so nothing else on the host
//! can match, and every process is killed again when its guard drops.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use faultline_agent::process::{
    self, ProcessError, ProcessId, ProcessUndo, StormEvent, StormSpec, in_container, resolve_host,
    signal_identity, spawn_kill_storm, storms, verify_stopped,
};
use faultline_domain::fault::{Signal, TargetSelector};
use nix::sys::signal::{Signal as NixSignal, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A comm no other process has: `fl` + pid + counter, at most 12 bytes (room for suffixes).
fn unique_comm() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("fl{}x{n}", std::process::id() % 1_000_000)
}

/// A directory holding copies of `/bin/sleep` under chosen names.
struct Binaries {
    dir: tempfile::TempDir,
}

impl Binaries {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    /// Path of a `sleep` copy named `name` (created once).
    fn sleep_named(&self, name: &str) -> std::io::Result<PathBuf> {
        let path = self.dir.path().join(name);
        if !path.exists() {
            std::fs::copy("/bin/sleep", &path)?;
        }
        Ok(path)
    }
}

/// A spawned process group, SIGKILLed and reaped on drop.
struct Spawned {
    child: Child,
}

impl Spawned {
    fn run(program: &Path, args: &[&str]) -> std::io::Result<Self> {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Self { child })
    }

    fn sleeper(binaries: &Binaries, name: &str) -> std::io::Result<Self> {
        Self::run(&binaries.sleep_named(name)?, &["1000"])
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), NixSignal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `pid`'s comm is `name` (right after fork it is still the parent's).
fn wait_for_comm(pid: u32, name: &str) -> ProcessId {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(id) = ProcessId::of(pid)
            && id.comm == name
        {
            return id;
        }
        assert!(Instant::now() < deadline, "pid {pid} never became {name}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `check` holds, up to 5 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn by_name(name: &str) -> TargetSelector {
    TargetSelector::ProcessName(name.to_string())
}

#[test]
fn exact_name_resolution_refuses_substrings_and_ambiguity() {
    let binaries = Binaries::new().unwrap();
    let name = unique_comm();
    let longer = format!("{name}-b");
    let target = Spawned::sleeper(&binaries, &name).unwrap();
    let bystander = Spawned::sleeper(&binaries, &longer).unwrap();
    let target_id = wait_for_comm(target.pid(), &name);
    wait_for_comm(bystander.pid(), &longer);

    // The exact name finds only the target, not the process whose name merely contains it.
    assert_eq!(resolve_host(&by_name(&name)).unwrap(), target_id);
    assert_eq!(
        resolve_host(&by_name(&longer)).unwrap().pid,
        bystander.pid()
    );
    // A substring of both names matches neither; the error points at both.
    let prefix = &name[..name.len() - 1];
    let err = resolve_host(&by_name(prefix)).unwrap_err();
    assert!(matches!(err, ProcessError::NoMatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("pid {}", target.pid())), "{text}");
    assert!(text.contains(&format!("pid {}", bystander.pid())), "{text}");

    // Two processes with the name: ambiguous, both listed.
    let twin = Spawned::sleeper(&binaries, &name).unwrap();
    wait_for_comm(twin.pid(), &name);
    let err = resolve_host(&by_name(&name)).unwrap_err();
    match &err {
        ProcessError::Ambiguous {
            count, candidates, ..
        } => {
            assert_eq!(*count, 2);
            assert!(
                candidates.contains(&format!("pid {}", target.pid())),
                "{err}"
            );
            assert!(candidates.contains(&format!("pid {}", twin.pid())), "{err}");
        }
        other => panic!("expected Ambiguous, got {other}"),
    }

    // By pid: the same identity.
    assert_eq!(
        resolve_host(&TargetSelector::Pid(target.pid())).unwrap(),
        target_id
    );
}

#[test]
fn an_identity_with_another_start_time_is_never_signalled() {
    let binaries = Binaries::new().unwrap();
    let name = unique_comm();
    let victim = Spawned::sleeper(&binaries, &name).unwrap();
    let real = wait_for_comm(victim.pid(), &name);
    // What a journaled identity looks like once its pid has been reused by another process.
    let recycled = ProcessId {
        start_time: real.start_time.wrapping_sub(1),
        ..real.clone()
    };
    assert!(real.is_alive());
    assert!(!recycled.is_alive());

    assert!(!signal_identity(&recycled, NixSignal::SIGKILL).unwrap());
    let err = process::stop(std::slice::from_ref(&recycled)).unwrap_err();
    assert!(err.to_string().contains("alive"), "{err}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        real.is_alive(),
        "the process behind a recycled pid was killed"
    );
    assert_ne!(real.state(), Some('T'));

    let undo = ProcessUndo {
        tag: format!("test-recycled-{name}"),
        stopped: vec![recycled],
    };
    let summary = process::undo(&undo).unwrap();
    assert!(summary.contains("already gone"), "{summary}");

    // An identity whose process exited (even as an unreaped zombie) is not alive either.
    let mut short = Command::new(binaries.sleep_named(&unique_comm()).unwrap())
        .arg("1")
        .spawn()
        .unwrap();
    let short_id = wait_for_comm(short.id(), &short_comm(&short));
    eventually("the short sleeper to exit", || !short_id.is_alive());
    assert!(
        ProcessId::of(short.id()).is_err(),
        "a zombie has no identity"
    );
    short.wait().unwrap();
}

/// The comm of a just-spawned child (its executable's name).
fn short_comm(child: &Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id()))
            .unwrap_or_default()
            .trim()
            .to_string();
        if comm.starts_with("fl") || Instant::now() > deadline {
            return comm;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stop_then_undo_resumes_and_undo_is_idempotent() {
    let binaries = Binaries::new().unwrap();
    let name = unique_comm();
    let target = Spawned::sleeper(&binaries, &name).unwrap();
    let id = wait_for_comm(target.pid(), &name);
    let undo = ProcessUndo {
        tag: format!("test-stop-{name}"),
        stopped: vec![id.clone()],
    };

    assert!(!verify_stopped(std::slice::from_ref(&id)).effective);
    process::stop(std::slice::from_ref(&id)).unwrap();
    eventually("state T", || id.state() == Some('T'));
    let verification = verify_stopped(std::slice::from_ref(&id));
    assert!(verification.effective, "{}", verification.detail);
    assert!(
        verification.detail.contains("stopped"),
        "{}",
        verification.detail
    );

    let summary = process::undo(&undo).unwrap();
    assert!(
        summary.contains(&format!("resumed pid {}", id.pid)),
        "{summary}"
    );
    eventually("the process to run again", || {
        matches!(id.state(), Some('S' | 'R'))
    });
    assert!(!verify_stopped(std::slice::from_ref(&id)).effective);
    // Replayed from the journal: still fine, still running.
    process::undo(&undo).unwrap();
    assert!(matches!(id.state(), Some('S' | 'R')));
}

#[test]
fn processes_of_the_host_pid_namespace_are_not_searched_by_name() {
    let own = std::process::id();
    let err = in_container(own, Some("sleep")).unwrap_err();
    assert!(matches!(err, ProcessError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("host's pid namespace"), "{err}");
    // Without a name it is just the main process.
    assert_eq!(
        in_container(own, None).unwrap(),
        [ProcessId::of(own).unwrap()]
    );
}

/// A supervisor (`sh` loop) that restarts a uniquely named sleeper whenever it dies.
fn supervised(binaries: &Binaries, name: &str) -> std::io::Result<Spawned> {
    let program = binaries.sleep_named(name)?;
    let script = format!("while :; do '{}' 100 & wait; done", program.display());
    Spawned::run(Path::new("/bin/sh"), &["-c", &script])
}

/// A resolver for [`spawn_kill_storm`]: the one process named `name`, looked up afresh.
fn resolver(
    name: String,
) -> impl FnMut() -> std::future::Ready<Result<Vec<ProcessId>, ProcessError>> + Send + 'static {
    move || {
        std::future::ready(
            resolve_host(&TargetSelector::ProcessName(name.clone())).map(|id| vec![id]),
        )
    }
}

#[tokio::test]
async fn a_kill_storm_follows_a_restarted_process_and_stops_when_cancelled() {
    let binaries = Binaries::new().unwrap();
    let name = unique_comm();
    let _supervisor = supervised(&binaries, &name).unwrap();
    let tag = format!("test-storm-{name}");
    eventually("the supervised process", || {
        resolve_host(&by_name(&name)).is_ok()
    });

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let spec = StormSpec {
        tag: tag.clone(),
        signal: Signal::KILL,
        count: 3,
        interval: Duration::from_millis(300),
    };
    let started = Instant::now();
    let storm = spawn_kill_storm(spec, resolver(name.clone()), move |event| {
        let _ = events_tx.send(event);
    })
    .unwrap();
    assert_eq!(
        storms().get(&tag).map(|s| s.tag().to_string()),
        Some(tag.clone())
    );
    let summary = storm.wait().await;
    assert!(!summary.cancelled);
    assert_eq!(summary.rounds, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "rounds are an interval apart"
    );
    let mut pids: Vec<u32> = summary.hits.iter().map(|id| id.pid).collect();
    pids.dedup();
    assert_eq!(
        pids.len(),
        3,
        "three distinct processes killed: {:?}",
        summary.hits
    );
    assert!(summary.hits.iter().all(|id| id.comm == name));
    eventually("every hit process to be dead", || {
        summary.hits.iter().all(|id| !id.is_alive())
    });

    let mut killed = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            StormEvent::Killed { round, target } => killed.push((round, target.pid)),
            StormEvent::Missed { round, reason } => panic!("round {round} missed: {reason}"),
            StormEvent::Finished(finished) => {
                assert_eq!(finished, summary);
                break;
            }
        }
    }
    assert_eq!(
        killed,
        [(1, pids[0]), (2, pids[1]), (3, pids[2])],
        "each kill reported with the pid it hit"
    );
    assert!(
        storms().get(&tag).is_none(),
        "a finished storm unregisters itself"
    );

    // A long storm, cancelled from the registry (as a journaled revert does) after two kills.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let spec = StormSpec {
        tag: tag.clone(),
        signal: Signal::KILL,
        count: 1000,
        interval: Duration::from_millis(200),
    };
    let storm = spawn_kill_storm(spec, resolver(name.clone()), move |event| {
        let _ = events_tx.send(event);
    })
    .unwrap();
    let mut kills = 0;
    while kills < 2 {
        if let Some(StormEvent::Killed { .. }) = events.recv().await {
            kills += 1;
        }
    }
    let undo = ProcessUndo {
        tag: tag.clone(),
        stopped: vec![],
    };
    let summary_text = process::undo(&undo).unwrap();
    assert!(
        summary_text.contains("kill storm cancelled"),
        "{summary_text}"
    );
    let summary = storm.wait().await;
    assert!(summary.cancelled);
    assert!(summary.rounds < 1000);
    assert!(!storms().remove(&tag), "cancelling twice finds nothing");
    assert!(storms().take(&tag).is_none());
    // No more kills: the current process lives on. (The last one hit may take a moment to
    // die; the survivor is the one the supervisor started after it.)
    eventually("every hit process to be dead", || {
        summary.hits.iter().all(|id| !id.is_alive())
    });
    let survivor = {
        let mut found = None;
        eventually("the restarted process", || {
            found = resolve_host(&by_name(&name))
                .ok()
                .filter(|id| !summary.hits.contains(id));
            found.is_some()
        });
        found.unwrap()
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(survivor.is_alive(), "killed after the storm was cancelled");
}

#[tokio::test]
async fn a_storm_without_targets_reports_misses() {
    let name = unique_comm();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let spec = StormSpec {
        tag: format!("test-miss-{name}"),
        signal: Signal::parse("SIGTERM").unwrap(),
        count: 2,
        interval: Duration::from_millis(10),
    };
    let storm = spawn_kill_storm(spec, resolver(name.clone()), move |event| {
        let _ = events_tx.send(event);
    })
    .unwrap();
    let summary = storm.wait().await;
    assert_eq!(summary.rounds, 2);
    assert!(summary.hits.is_empty());
    let first = events.recv().await.unwrap();
    match first {
        StormEvent::Missed { round: 1, reason } => {
            assert!(reason.contains(&name), "{reason}")
        }
        other => panic!("expected a miss, got {other:?}"),
    }
}
