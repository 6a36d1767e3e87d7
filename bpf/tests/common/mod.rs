//! Shared helpers of the privileged tests: scratch cgroups made *below the test process's own
//! cgroup* (so they stay inside whatever limits the test runs under), scratch network
//! namespaces, children placed in a cgroup before they run the workload, and event collection.
//! Every scratch resource is removed by a guard's `Drop`, so a failing assertion leaves
//! nothing behind.

// Helpers outside `#[test]` functions panic on purpose: a panic is the failure report we want.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use faultline_bpf::{Group, GroupState, Hierarchy, Options, Telemetry, TelemetryEvent};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Whether the tests can load BPF here; prints SKIPPED with the reason when not.
pub fn bpf_available() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: not root (loading BPF programs needs root)");
        return false;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("SKIPPED: this kernel has no BTF (/sys/kernel/btf/vmlinux)");
        return false;
    }
    true
}

/// Loads the given groups and insists they loaded: on a root machine with BTF a group that
/// does not load is a failure, not a skip.
pub fn load(groups: &[Group]) -> Telemetry {
    load_with(&Options {
        groups: groups.to_vec(),
        ..Options::default()
    })
}

/// Loads with these options; every requested group must load.
pub fn load_with(options: &Options) -> Telemetry {
    let groups = &options.groups;
    let t = Telemetry::load(options).unwrap();
    for s in t.status() {
        if groups.contains(&s.group) {
            println!("{s}");
            assert!(matches!(s.state, GroupState::Loaded { .. }), "{s}");
        }
    }
    t
}

/// A unique name for scratch resources of this test run.
pub fn unique(tag: &str) -> String {
    format!(
        "flbpf-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cgroup made below this process's own cgroup in one hierarchy; on drop, whatever is
/// left in it is killed and it is removed.
pub struct ScratchCgroup {
    /// Its path from the hierarchy's root (what `set_scope` takes).
    pub path: PathBuf,
    /// Its directory.
    pub dir: PathBuf,
    /// Its id (directory inode) in that hierarchy.
    pub id: u64,
}

impl ScratchCgroup {
    pub fn new(hierarchy: &Hierarchy, tag: &str) -> Self {
        let own = hierarchy.path_of_pid(std::process::id()).unwrap();
        let path = own.join(unique(tag));
        let dir = hierarchy.dir(&path).unwrap();
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let id = hierarchy.id_of(&path).unwrap();
        ScratchCgroup { path, dir, id }
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    pub fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
    }

    pub fn read(&self, file: &str) -> String {
        let path = self.dir.join(file);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    /// Runs `script` with bash after the shell has moved itself into this cgroup, so the
    /// workload (typically `exec`-ed by the script) runs here from its first instruction.
    pub fn spawn(&self, script: &str) -> Child {
        Command::new("bash")
            .arg("-c")
            .arg(format!("echo $$ > {} && {script}", self.procs().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids: Vec<i32> = fs::read_to_string(self.procs())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if (pids.is_empty() && fs::remove_dir(&self.dir).is_ok())
                || !self.dir.exists()
                || Instant::now() > deadline
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.dir.exists() {
            eprintln!(
                "warning: could not remove scratch cgroup {}",
                self.dir.display()
            );
        }
    }
}

/// A network namespace with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's own TCP counters (`/proc/net/snmp` is per network namespace).
    pub fn snmp(&self) -> faultline_bpf::fallback::TcpSnmp {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", "/proc/net/snmp"])
            .output()
            .unwrap();
        assert!(out.status.success(), "reading snmp in {}", self.name);
        faultline_bpf::fallback::TcpSnmp::parse(&String::from_utf8_lossy(&out.stdout)).unwrap()
    }

    /// Runs a command inside the namespace and insists it succeeds.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `child` (killing it after `timeout`); returns its status and stderr.
pub fn wait(mut child: Child, timeout: Duration) -> (ExitStatus, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut err);
            }
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!(
                "child {} did not finish within {timeout:?} (killed: {status})",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls events until `done` holds for what was collected, or `timeout` passes.
pub fn collect_until(
    t: &mut Telemetry,
    timeout: Duration,
    mut done: impl FnMut(&[TelemetryEvent]) -> bool,
) -> Vec<TelemetryEvent> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    while Instant::now() < deadline {
        events.extend(t.poll_events(Duration::from_millis(100)).unwrap());
        if done(&events) {
            break;
        }
    }
    events
}
