//! Stressor faults: CPU, memory and IO hogs running *inside* the target's cgroup(s), and disk
//! fill on the target's own filesystem.
//!
//! A hog is the agent binary re-executed with a hidden first argument ([`STRESS_ARG`]; the
//! agent's `main` hands such invocations to [`stress_main`]). The child joins the target's
//! cgroups before it does anything else, so its CPU, memory and IO count against the target —
//! a memory hog in a memory-limited target drives it into OOM as a real leak would. It dies with
//! the agent (`PR_SET_PDEATHSIG(SIGKILL)`, see [`spawn`] for why one dedicated thread spawns)
//! and carries `--faultline-tag=<tag>` in its argv, so [`undo`] and the start-up [`sweep`] find
//! it even when the pids never reached the journal (the undo is journaled before [`apply`]).
//! Recorded pids are always checked against their start time: a recycled pid is never killed.
//!
//! Disk fill is no process: a file `.faultline-fill-<tag>` in the target's filesystem, written
//! through `/proc/<pid>/root/...` from the host; undo deletes it.

mod child;
mod fill;
pub mod procfs;
mod spawn;

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use faultline_domain::fault::{FaultKind, FillAmount};
use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupError, CgroupRef, device, parse_mountinfo, read_procs};
use crate::process::{ProcessId, Stat, signal_identity};
use crate::verification::Verification;

pub use child::{STRESS_ARG, TAG_PREFIX, is_stress_invocation, stress_main};
pub use fill::Usage;
pub use spawn::exit_status;

/// How long a stressor may take to join the cgroups and say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long killed stressors may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_WORKERS: u32 = 1024;
const MAX_IO_WORKERS: u32 = 64;

/// How to find and remove everything a stressor fault made. Journaled before [`apply`], when
/// `processes` is still empty: the tag in the stressors' argv finds them regardless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StressorUndo {
    pub tag: String,
    /// `cpu-hog`, `memory-hog`, `io-hog` or `disk-fill`.
    pub kind: String,
    /// Stressor processes, as identities that survive pid reuse.
    pub processes: Vec<ProcessId>,
    /// Files to delete (disk fill; io-hog files the child did not get to unlink), as host
    /// paths — through `/proc/<pid>/root`, and for an overlay root also through its upper dir,
    /// which stays reachable after the container stops.
    pub files: Vec<PathBuf>,
}

impl StressorUndo {
    /// The argv token every stressor of this tag carries.
    pub fn marker(&self) -> String {
        format!("{TAG_PREFIX}{}", self.tag)
    }
}

/// What [`apply`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StressAction {
    /// Start the stressor process `program args`.
    Spawn { program: PathBuf, args: Vec<String> },
    /// Create `file` and make it take `amount`.
    Fill { file: PathBuf, amount: FillAmount },
}

/// A stressor fault, computed but not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StressPlan {
    pub undo: StressorUndo,
    /// For reports.
    pub mechanism: String,
    pub action: StressAction,
}

/// Failures, with the process, file or command concerned.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    #[error("{fault} is not a stressor fault")]
    NotAStressor { fault: String },
    #[error("invalid {fault}: {reason}")]
    Invalid { fault: String, reason: String },
    #[error("target process {pid}: {detail}")]
    Target { pid: u32, detail: String },
    #[error("spawning stressor `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("stressor `{command}` did not start: {reason}")]
    NotReady { command: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stressor(s) of tag {tag} still alive {waited:?} after SIGKILL: {pids:?}")]
    Unkillable {
        tag: String,
        pids: Vec<u32>,
        waited: Duration,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// Tags end up in file names and argv: keep them plain.
fn check_tag(tag: &str, fault: &FaultKind) -> Result<(), StressError> {
    let plain = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !tag.starts_with('.');
    if plain {
        Ok(())
    } else {
        Err(StressError::Invalid {
            fault: fault.name().to_string(),
            reason: format!("tag {tag:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'"),
        })
    }
}

fn invalid(fault: &FaultKind, reason: impl Into<String>) -> StressError {
    StressError::Invalid {
        fault: fault.name().to_string(),
        reason: reason.into(),
    }
}

/// `path` inside the target, as an absolute path without `..` (which could climb out of
/// `/proc/<pid>/root`).
fn inside_path(path: Option<&str>, fault: &FaultKind) -> Result<PathBuf, StressError> {
    let path = Path::new(path.unwrap_or("/"));
    if !path.is_absolute() {
        return Err(invalid(
            fault,
            format!("path {} is not absolute", path.display()),
        ));
    }
    if path
        .components()
        .any(|part| matches!(part, Component::ParentDir))
    {
        return Err(invalid(
            fault,
            format!("path {} contains `..`", path.display()),
        ));
    }
    Ok(path
        .components()
        .filter(|part| matches!(part, Component::Normal(_)))
        .collect())
}

/// Where the target's root filesystem keeps its files on the host when it is an overlay
/// (Docker): `upperdir/<path>` for a path on the root mount itself, else `None`.
fn overlay_path(target_pid: u32, inside: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{target_pid}/mountinfo")).ok()?;
    let entries = parse_mountinfo(&text).ok()?;
    // The mount holding `inside` is the one with the longest mount-point prefix.
    let absolute = Path::new("/").join(inside);
    let holder = entries
        .iter()
        .filter(|entry| absolute.starts_with(&entry.mount_point))
        .max_by_key(|entry| entry.mount_point.components().count())?;
    if holder.mount_point != Path::new("/") {
        return None;
    }
    device::overlay_upperdir(holder).map(|upper| upper.join(inside))
}

/// Computes a stressor fault: the command line of the child, or the file to fill. Reads only.
/// `agent_exe` is the binary to re-execute (`/proc/self/exe` works even after the file on disk
/// was replaced); `target_pid` is a process of the target (its root filesystem is used).
pub fn plan(
    fault: &FaultKind,
    cgroup: &CgroupRef,
    target_pid: u32,
    tag: &str,
    agent_exe: &Path,
) -> Result<StressPlan, StressError> {
    check_tag(tag, fault)?;
    let target_root = procfs::root_of(target_pid);
    // The target needs a `/proc` entry: its root filesystem is reached through it.
    if Stat::read(target_pid).ok().flatten().is_none() {
        return Err(StressError::Target {
            pid: target_pid,
            detail: "no such process".into(),
        });
    }
    let mut undo = StressorUndo {
        tag: tag.to_string(),
        kind: fault.name().to_string(),
        processes: Vec::new(),
        files: Vec::new(),
    };
    let mut args = vec![STRESS_ARG.to_string(), undo.marker()];
    args.extend(cgroup.dirs().iter().map(|dir| {
        format!(
            "{}{}",
            child::JOIN_PREFIX,
            dir.join("cgroup.procs").display()
        )
    }));
    let (kind_args, mechanism) = match fault {
        FaultKind::CpuHog {
            workers,
            load_percent,
        } => {
            if !(1..=MAX_WORKERS).contains(workers) {
                return Err(invalid(fault, format!("workers must be 1..={MAX_WORKERS}")));
            }
            if !(1..=100).contains(load_percent) {
                return Err(invalid(fault, "load_percent must be 1..=100"));
            }
            (
                vec![
                    "cpu-hog".into(),
                    format!("--workers={workers}"),
                    format!("--load={load_percent}"),
                ],
                format!("stressor process: {workers} busy thread(s) at {load_percent}%"),
            )
        }
        FaultKind::MemoryHog { bytes } => {
            if *bytes == 0 {
                return Err(invalid(fault, "0 bytes"));
            }
            (
                vec!["memory-hog".into(), format!("--bytes={bytes}")],
                format!("stressor process: {bytes} bytes allocated, every page written, mlocked"),
            )
        }
        FaultKind::IoHog { workers } => {
            if !(1..=MAX_IO_WORKERS).contains(workers) {
                return Err(invalid(
                    fault,
                    format!("workers must be 1..={MAX_IO_WORKERS}"),
                ));
            }
            let mut kind_args = vec!["io-hog".to_string()];
            for index in 0..*workers {
                let file = target_root.join(format!(".faultline-io-{tag}-{index}"));
                kind_args.push(format!("{}{}", child::FILE_PREFIX, file.display()));
                undo.files.push(file);
            }
            (
                kind_args,
                format!(
                    "stressor process: {workers} writer(s) with fsync, 1 MiB blocks over 64 MiB, \
                     on the target's root filesystem (files unlinked at once)"
                ),
            )
        }
        FaultKind::DiskFill { path, amount } => {
            let inside = inside_path(path.as_deref(), fault)?;
            if let FillAmount::Percent(percent) = amount
                && !(1..=100).contains(percent)
            {
                return Err(invalid(fault, "percent must be 1..=100"));
            }
            let name = format!(".faultline-fill-{tag}");
            let dir = target_root.join(&inside);
            let usage = Usage::of(&dir)?;
            let file = dir.join(&name);
            undo.files.push(file.clone());
            if let Some(upper) = overlay_path(target_pid, &inside) {
                undo.files.push(upper.join(&name));
            }
            let goal = match amount {
                FillAmount::Percent(percent) => format!("until {percent}% used"),
                FillAmount::Bytes(bytes) => format!("{bytes} bytes"),
            };
            let mechanism = format!(
                "file {} filled {goal} (now {:.1}% used, +{} bytes; fallocate, else writes)",
                file.display(),
                usage.percent(),
                usage.to_fill(*amount)
            );
            return Ok(StressPlan {
                undo,
                mechanism,
                action: StressAction::Fill {
                    file,
                    amount: *amount,
                },
            });
        }
        other => {
            return Err(StressError::NotAStressor {
                fault: other.name().to_string(),
            });
        }
    };
    args.extend(kind_args);
    Ok(StressPlan {
        mechanism: format!("{mechanism}, joined to {}", cgroup.describe()),
        undo,
        action: StressAction::Spawn {
            program: agent_exe.to_path_buf(),
            args,
        },
    })
}

fn command_line(program: &Path, args: &[String]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts the stressor (recording its pid and start time in `plan.undo` at once) and waits until
/// it has joined the target's cgroups; or creates the fill file. On failure nothing is left
/// running.
pub async fn apply(plan: &mut StressPlan) -> Result<(), StressError> {
    match plan.action.clone() {
        StressAction::Spawn { program, args } => {
            let command = command_line(&program, &args);
            let spawned =
                spawn::spawn(program, args)
                    .await
                    .map_err(|source| StressError::Spawn {
                        command: command.clone(),
                        source,
                    })?;
            plan.undo.processes.push(spawned.id);
            let outcome = match tokio::time::timeout(READY_TIMEOUT, spawned.ready).await {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(reason))) => reason,
                Ok(Err(_)) => "its reaper ended without an answer".to_string(),
                Err(_) => format!("no `ready` within {READY_TIMEOUT:?}"),
            };
            // Not started properly: leave nothing behind.
            let _ = undo(&plan.undo).await;
            Err(StressError::NotReady {
                command,
                reason: outcome,
            })
        }
        StressAction::Fill { file, amount } => {
            let result = tokio::task::spawn_blocking(move || fill::fill(&file, amount))
                .await
                .map_err(|err| StressError::Io {
                    op: "filling",
                    path: PathBuf::new(),
                    source: std::io::Error::other(err.to_string()),
                })?;
            if let Err(err) = result {
                // A partial file (e.g. a write error midway) must not stay.
                if !matches!(&err, StressError::Io { op: "creating", .. }) {
                    let _ = undo(&plan.undo).await;
                }
                return Err(err);
            }
            Ok(())
        }
    }
}

/// A stressor process found by its argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundStressor {
    pub id: ProcessId,
    pub tag: String,
    pub kind: String,
    /// `--file=` arguments (io-hog).
    pub files: Vec<PathBuf>,
}

/// Every stressor on this host: processes whose argv has [`STRESS_ARG`] in second place and
/// that run as root (an unprivileged process imitating one is ignored, never killed).
pub fn list_stressors() -> Vec<FoundStressor> {
    let mut found = Vec::new();
    for pid in procfs::all_pids() {
        let Some(args) = procfs::cmdline(pid) else {
            continue;
        };
        if args.get(1).map(String::as_str) != Some(STRESS_ARG) || procfs::uid(pid) != Some(0) {
            continue;
        }
        let Ok(id) = ProcessId::of(pid) else {
            continue;
        };
        let Some(tag) = args.iter().find_map(|arg| arg.strip_prefix(TAG_PREFIX)) else {
            continue;
        };
        let kind = args
            .iter()
            .find(|arg| matches!(arg.as_str(), "cpu-hog" | "memory-hog" | "io-hog"))
            .cloned()
            .unwrap_or_default();
        let files = args
            .iter()
            .filter_map(|arg| arg.strip_prefix(child::FILE_PREFIX))
            .map(PathBuf::from)
            .collect();
        found.push(FoundStressor {
            id,
            tag: tag.to_string(),
            kind,
            files,
        });
    }
    found
}

/// The stressors of `undo`: recorded ones still alive, plus any found by the tag.
fn stressors_of(undo: &StressorUndo) -> Vec<ProcessId> {
    let mut ids: Vec<ProcessId> = undo
        .processes
        .iter()
        .filter(|id| id.any_thread_live())
        .cloned()
        .collect();
    for found in list_stressors() {
        if found.tag == undo.tag && !ids.contains(&found.id) {
            ids.push(found.id);
        }
    }
    ids
}

/// Checks the fault is in force: each stressor alive and listed in every `cgroup.procs` of the
/// target's cgroup; for disk fill, the file present and its size.
pub async fn verify(undo: &StressorUndo, cgroup: &CgroupRef) -> Result<Verification, StressError> {
    if undo.kind == "disk-fill" {
        let Some((file, meta)) = undo
            .files
            .iter()
            .find_map(|file| Some((file, std::fs::symlink_metadata(file).ok()?)))
        else {
            return Ok(Verification {
                effective: false,
                detail: "fill file missing".into(),
            });
        };
        use std::os::unix::fs::MetadataExt;
        let usage = file.parent().and_then(|dir| Usage::of(dir).ok());
        return Ok(Verification {
            effective: meta.is_file(),
            detail: format!(
                "{} holds {} bytes; filesystem {} used",
                file.display(),
                meta.blocks() * 512,
                usage.map_or("?".to_string(), |usage| format!("{:.1}%", usage.percent()))
            ),
        });
    }
    let ids = stressors_of(undo);
    if ids.is_empty() {
        let how: Vec<String> = undo
            .processes
            .iter()
            .map(|id| {
                let end = exit_status(id).unwrap_or_else(|| "gone".into());
                format!("pid {} {end}", id.pid)
            })
            .collect();
        let detail = if how.is_empty() {
            format!("no {} stressor with tag {} is running", undo.kind, undo.tag)
        } else {
            format!("{} stressor not running: {}", undo.kind, how.join(", "))
        };
        return Ok(Verification {
            effective: false,
            detail,
        });
    }
    let dirs = cgroup.dirs();
    let mut effective = true;
    let mut details = Vec::new();
    for id in &ids {
        let mut missing = Vec::new();
        for dir in &dirs {
            if !read_procs(dir)?.contains(&id.pid) {
                missing.push(dir.display().to_string());
            }
        }
        effective &= missing.is_empty();
        let cpu = procfs::cpu_ticks(id.pid).unwrap_or(0) as f64 / procfs::ticks_per_second() as f64;
        let rss = procfs::rss_bytes(id.pid).unwrap_or(0);
        let place = if missing.is_empty() {
            format!("in all {} cgroup dir(s)", dirs.len())
        } else {
            format!("NOT in {}", missing.join(", "))
        };
        details.push(format!(
            "{} pid {} alive, {place}, cpu {cpu:.2} s, rss {} KiB",
            undo.kind,
            id.pid,
            rss / 1024
        ));
    }
    Ok(Verification {
        effective,
        detail: details.join("; "),
    })
}

/// SIGKILLs `ids` (each only if its pid still names that very process) and waits until they
/// are gone.
async fn kill_all(tag: &str, ids: &[ProcessId]) -> Result<(), StressError> {
    for id in ids {
        if let Err(err) = signal_identity(id, nix::sys::signal::Signal::SIGKILL) {
            // Reported below as unkillable if it does not go away.
            tracing::warn!(%err, tag, "killing a stressor");
        }
    }
    let start = Instant::now();
    loop {
        // Every thread, not only the leader: see `ProcessId::any_thread_live`.
        let alive: Vec<u32> = ids
            .iter()
            .filter(|id| id.any_thread_live())
            .map(|id| id.pid)
            .collect();
        if alive.is_empty() {
            return Ok(());
        }
        if start.elapsed() > KILL_TIMEOUT {
            return Err(StressError::Unkillable {
                tag: tag.to_string(),
                pids: alive,
                waited: KILL_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes `path` if it is one of ours (`.faultline-` file names only): true when removed.
fn remove_ours(path: &Path) -> Result<bool, StressError> {
    let ours = path
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| {
            name.starts_with(".faultline-fill-") || name.starts_with(".faultline-io-")
        });
    if !ours {
        return Ok(false);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        // The target (and its /proc/<pid>/root) is gone.
        Err(_) if !path.parent().is_some_and(Path::exists) => Ok(false),
        Err(source) => Err(StressError::Io {
            op: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Kills every stressor of this tag (recorded pids checked against their start time, plus any
/// found by the tag in argv), waits until they are gone, and deletes the files. Idempotent.
pub async fn undo(undo: &StressorUndo) -> Result<String, StressError> {
    let ids = stressors_of(undo);
    kill_all(&undo.tag, &ids).await?;
    let mut removed = Vec::new();
    for file in &undo.files {
        if remove_ours(file)? {
            removed.push(file.display().to_string());
        }
    }
    let mut parts = Vec::new();
    if !ids.is_empty() {
        let pids: Vec<String> = ids.iter().map(|id| id.pid.to_string()).collect();
        parts.push(format!(
            "killed {} stressor(s) (pid {})",
            undo.kind,
            pids.join(", ")
        ));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", removed.join(", ")));
    }
    Ok(if parts.is_empty() {
        format!("nothing left of {} tag {}", undo.kind, undo.tag)
    } else {
        parts.join("; ")
    })
}

/// Kills stressors whose tag is not in `live_tags` (left by a crashed agent) and removes the
/// files named in their argv. Returns what was done. Disk-fill files are not processes: they are
/// found through the journaled [`StressorUndo`], not here.
pub async fn sweep(live_tags: &HashSet<String>) -> Result<Vec<String>, StressError> {
    sweep_where(&|tag: &str| !live_tags.contains(tag)).await
}

/// Like [`sweep`], killing the stressors whose tag `is_leftover` says is left over.
pub async fn sweep_where(
    is_leftover: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Vec<String>, StressError> {
    let orphans: Vec<FoundStressor> = list_stressors()
        .into_iter()
        .filter(|found| is_leftover(&found.tag))
        .collect();
    let ids: Vec<ProcessId> = orphans.iter().map(|found| found.id.clone()).collect();
    kill_all("(sweep)", &ids).await?;
    let mut report = Vec::new();
    for orphan in &orphans {
        report.push(format!(
            "killed orphan {} stressor pid {} (tag {})",
            orphan.kind, orphan.id.pid, orphan.tag
        ));
        for file in &orphan.files {
            if remove_ours(file)? {
                report.push(format!("removed {}", file.display()));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupLayout;

    fn own_cgroup() -> CgroupRef {
        let layout = CgroupLayout::detect().unwrap();
        CgroupRef::of_pid(&layout, std::process::id()).unwrap()
    }

    #[test]
    fn hog_plans_carry_the_marker_the_joins_and_the_load() {
        let cgroup = own_cgroup();
        let me = std::process::id();
        let plan = plan(
            &FaultKind::CpuHog {
                workers: 2,
                load_percent: 50,
            },
            &cgroup,
            me,
            "f-1",
            Path::new("/proc/self/exe"),
        )
        .unwrap();
        let StressAction::Spawn { program, args } = &plan.action else {
            panic!()
        };
        assert_eq!(program, Path::new("/proc/self/exe"));
        assert_eq!(args[0], STRESS_ARG);
        assert_eq!(args[1], "--faultline-tag=f-1");
        assert_eq!(plan.undo.marker(), "--faultline-tag=f-1");
        let joins = args.iter().filter(|arg| arg.starts_with("--join=")).count();
        assert_eq!(joins, cgroup.dirs().len());
        assert!(args.ends_with(&["cpu-hog".into(), "--workers=2".into(), "--load=50".into()]));
        assert!(
            plan.mechanism.contains("2 busy thread(s) at 50%"),
            "{}",
            plan.mechanism
        );
        // The child's parser accepts exactly what plan produces.
        assert!(child::Invocation::parse(&args[1..]).is_ok());

        let io = super::plan(
            &FaultKind::IoHog { workers: 2 },
            &cgroup,
            me,
            "f-2",
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(
            io.undo.files,
            [
                PathBuf::from(format!("/proc/{me}/root/.faultline-io-f-2-0")),
                PathBuf::from(format!("/proc/{me}/root/.faultline-io-f-2-1")),
            ]
        );
    }

    #[test]
    fn bad_tags_paths_and_amounts_are_refused() {
        let cgroup = own_cgroup();
        let me = std::process::id();
        let exe = Path::new("/proc/self/exe");
        let hog = FaultKind::CpuHog {
            workers: 1,
            load_percent: 10,
        };
        for tag in ["", "a b", "../x", ".hidden", &"x".repeat(65)] {
            assert!(
                matches!(
                    plan(&hog, &cgroup, me, tag, exe),
                    Err(StressError::Invalid { .. })
                ),
                "{tag:?}"
            );
        }
        let climb = FaultKind::DiskFill {
            path: Some("/tmp/../../etc".into()),
            amount: FillAmount::Percent(50),
        };
        assert!(matches!(
            plan(&climb, &cgroup, me, "t", exe),
            Err(StressError::Invalid { .. })
        ));
        let relative = FaultKind::DiskFill {
            path: Some("tmp".into()),
            amount: FillAmount::Percent(50),
        };
        assert!(plan(&relative, &cgroup, me, "t", exe).is_err());
        let zero = FaultKind::CpuHog {
            workers: 0,
            load_percent: 10,
        };
        assert!(plan(&zero, &cgroup, me, "t", exe).is_err());
        assert!(matches!(
            plan(&FaultKind::Freeze, &cgroup, me, "t", exe),
            Err(StressError::NotAStressor { .. })
        ));
        assert!(matches!(
            plan(&hog, &cgroup, u32::MAX - 1, "t", exe),
            Err(StressError::Target { .. })
        ));
    }

    #[tokio::test]
    async fn disk_fill_plans_apply_verify_and_undo_in_a_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = own_cgroup();
        let me = std::process::id();
        let fault = FaultKind::DiskFill {
            path: Some(dir.path().display().to_string()),
            amount: FillAmount::Bytes(2 << 20),
        };
        let mut plan = plan(
            &fault,
            &cgroup,
            me,
            "unit-fill",
            Path::new("/proc/self/exe"),
        )
        .unwrap();
        let file = PathBuf::from(format!(
            "/proc/{me}/root{}/.faultline-fill-unit-fill",
            dir.path().display()
        ));
        assert_eq!(plan.undo.files[0], file);
        apply(&mut plan).await.unwrap();
        let check = verify(&plan.undo, &cgroup).await.unwrap();
        assert!(
            check.effective && check.detail.contains("holds"),
            "{check:?}"
        );
        assert!(dir.path().join(".faultline-fill-unit-fill").exists());
        let report = undo(&plan.undo).await.unwrap();
        assert!(report.contains("removed"), "{report}");
        assert!(!dir.path().join(".faultline-fill-unit-fill").exists());
        assert!(undo(&plan.undo).await.unwrap().starts_with("nothing left"));
        assert!(!verify(&plan.undo, &cgroup).await.unwrap().effective);
    }

    #[test]
    fn only_our_file_names_are_ever_removed() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("precious");
        std::fs::write(&other, "x").unwrap();
        assert!(!remove_ours(&other).unwrap());
        assert!(other.exists());
        let ours = dir.path().join(".faultline-io-t-0");
        std::fs::write(&ours, "x").unwrap();
        assert!(remove_ours(&ours).unwrap());
        assert!(!remove_ours(&ours).unwrap());
    }
}
