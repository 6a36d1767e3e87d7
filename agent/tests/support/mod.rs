//! Test fixtures shared by the agent's real-kernel tests: scratch cgroups below the test
//! process's own, whose members are killed and directories removed on drop.
// Each test binary uses a different subset of these fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultline_agent::cgroup::{CgroupLayout, CgroupRef, read_procs};

/// Scratch cgroups, one per controller, below this test process's own cgroups.
pub struct Scratch {
    pub dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Scratch {
    pub fn new(layout: &CgroupLayout, controllers: &[&str], label: &str) -> Self {
        let own = CgroupRef::of_pid(layout, std::process::id()).unwrap();
        let name = format!("faultline-test-{}-{label}", std::process::id());
        let mut scratch = Scratch {
            dirs: Vec::new(),
            children: Vec::new(),
        };
        for controller in controllers {
            let parent = match *controller {
                "unified" => own.v2.clone().unwrap(),
                other => own
                    .v1
                    .get(other)
                    .cloned()
                    .unwrap_or_else(|| panic!("no v1 {other}")),
            };
            let dir = parent.join(&name);
            std::fs::create_dir(&dir)
                .unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
            scratch.dirs.push(dir);
        }
        scratch
    }

    pub fn dir(&self, suffix_of_mount: &str) -> &Path {
        self.dirs
            .iter()
            .find(|dir| {
                dir.components()
                    .any(|part| part.as_os_str() == suffix_of_mount)
            })
            .unwrap()
    }

    /// `sh -c` that first moves itself into every scratch cgroup, then execs `script`.
    pub fn command(&self, script: &str) -> Command {
        let joins: Vec<String> = self
            .dirs
            .iter()
            .map(|dir| format!("echo $$ > '{}/cgroup.procs' || exit 99;", dir.display()))
            .collect();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{} exec {script}", joins.join(" ")));
        command
    }

    /// Starts `script` inside the scratch cgroups and waits until it is in all of them.
    pub fn spawn(&mut self, script: &str) -> u32 {
        let child = self.command(script).stdin(Stdio::null()).spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        wait_for(Duration::from_secs(5), || {
            self.dirs
                .iter()
                .all(|dir| read_procs(dir).unwrap().contains(&pid))
        });
        pid
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // Frozen tasks cannot die: thaw first.
            let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
            let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
        }
        for _ in 0..250 {
            let mut members = Vec::new();
            for dir in &self.dirs {
                members.extend(read_procs(dir).unwrap_or_default());
            }
            if members.is_empty() {
                break;
            }
            for pid in members {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if dir.exists() {
                eprintln!("LEFT BEHIND: could not remove {}", dir.display());
            }
        }
    }
}

/// Waits until `done` holds, failing the test after `limit`.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
