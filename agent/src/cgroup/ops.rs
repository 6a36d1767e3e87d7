//! Plan, apply, verify and undo of cgroup faults.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultline_domain::fault::{FaultKind, IoLimits};
use serde::{Deserialize, Serialize};

use super::CgroupError;
use super::cgref::{CgroupRef, read_procs};
use super::device::root_device_of_pid;
use super::layout::{CgroupLayout, Version, parse_dev};
use crate::verification::Verification;

/// The kernel's smallest CFS quota and period (1 ms) and largest period (1 s).
const MIN_QUOTA_US: u64 = 1_000;
const MIN_PERIOD_US: u64 = 1_000;
const MAX_PERIOD_US: u64 = 1_000_000;

/// One file to write back on undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreWrite {
    pub path: PathBuf,
    /// Written back on undo: the exact value in force before (for per-device files, the
    /// device's previous line, or the line that removes the device's limit).
    pub content: String,
    /// What the fault wrote; verification compares against it.
    pub applied: String,
}

/// How to restore everything a cgroup fault changed; journaled before the fault is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupUndo {
    /// In reverse order of application.
    pub writes: Vec<RestoreWrite>,
}

/// Exactly what [`apply`] will write, and how [`undo`] restores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    pub undo: CgroupUndo,
    /// For reports: `cgroup v1 cpu.cfs_quota_us=20000/100000 in /sys/fs/cgroup/cpu/docker/<id>`.
    pub mechanism: String,
    /// In order.
    pub writes: Vec<(PathBuf, String)>,
}

/// Collects writes with their restores.
struct Builder {
    writes: Vec<(PathBuf, String)>,
    restores: Vec<RestoreWrite>,
}

impl Builder {
    fn new() -> Self {
        Self {
            writes: Vec::new(),
            restores: Vec::new(),
        }
    }

    fn write(&mut self, path: PathBuf, value: String, previous: String) {
        self.writes.push((path.clone(), value.clone()));
        self.restores.push(RestoreWrite {
            path,
            content: previous,
            applied: value,
        });
    }

    fn finish(self, mechanism: String) -> CgroupPlan {
        let mut restores = self.restores;
        restores.reverse();
        CgroupPlan {
            undo: CgroupUndo { writes: restores },
            mechanism,
            writes: self.writes,
        }
    }
}

/// Reads a cgroup file, trimmed.
fn read_value(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a cgroup file in one `write(2)`, as the kernel wants.
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    let error = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(error)?;
    file.write_all(value.as_bytes()).map_err(error)
}

fn parse_error(path: &Path, content: &str, detail: &str) -> CgroupError {
    CgroupError::Parse {
        path: path.to_path_buf(),
        content: content.to_string(),
        detail: detail.to_string(),
    }
}

/// The directory through which `controller` is reached, and that it exists.
fn controller_dir(
    layout: &CgroupLayout,
    cgroup: &CgroupRef,
    controller: &str,
    fault: &FaultKind,
) -> Result<(Version, PathBuf), CgroupError> {
    let unsupported = |reason: String| CgroupError::Unsupported {
        fault: fault.name().to_string(),
        reason,
    };
    layout.supports(fault).map_err(unsupported)?;
    let (version, dir) = cgroup.controller_dir(layout, controller).ok_or_else(|| {
        unsupported(format!(
            "the target's cgroup ({}) has no directory for the {controller} controller",
            cgroup.describe()
        ))
    })?;
    if !dir.is_dir() {
        return Err(CgroupError::Missing { path: dir });
    }
    refuse_unsafe_target(layout, controller, version, &dir, fault)?;
    Ok((version, dir))
}

/// Blast-radius interlocks: never the root cgroup (that is the whole host), and never a
/// cgroup holding the agent itself (a frozen or starved agent cannot revert anything).
fn refuse_unsafe_target(
    layout: &CgroupLayout,
    controller: &str,
    version: Version,
    dir: &Path,
    fault: &FaultKind,
) -> Result<(), CgroupError> {
    let refused = |reason: String| CgroupError::Refused {
        fault: fault.name().to_string(),
        reason,
    };
    let root = match version {
        Version::V1 => layout
            .v1_mounts()
            .and_then(|mounts| mounts.get(controller))
            .map(PathBuf::as_path),
        Version::V2 => layout.v2_root(),
    };
    if root == Some(dir) {
        return Err(refused(format!(
            "{} is the root {controller} cgroup: the fault would apply to the whole host",
            dir.display()
        )));
    }
    // Where the agent runs; when that cannot be read, the check above is all there is.
    if let Ok(agent) = CgroupRef::of_pid(layout, std::process::id())
        && let Some((_, agent_dir)) = agent.controller_dir(layout, controller)
        && agent_dir.starts_with(dir)
    {
        return Err(refused(format!(
            "the agent itself runs in {} (at or below the target's {controller} cgroup): \
             it must stay able to revert",
            agent_dir.display()
        )));
    }
    Ok(())
}

/// `dir/name`, which must exist (on v2 a controller's files appear only once the parent
/// enables it in `cgroup.subtree_control`).
fn require_file(dir: &Path, name: &str, fault: &FaultKind) -> Result<PathBuf, CgroupError> {
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(CgroupError::Unsupported {
            fault: fault.name().to_string(),
            reason: format!(
                "{} does not exist: the controller is not enabled for this cgroup \
                 (cgroup v2: the parent's cgroup.subtree_control)",
                path.display()
            ),
        })
    }
}

fn invalid(fault: &FaultKind, reason: impl Into<String>) -> CgroupError {
    CgroupError::Invalid {
        fault: fault.name().to_string(),
        reason: reason.into(),
    }
}

/// Computes what to write for `fault` on `cgroup`, reading the values in force now so the undo
/// restores them exactly. Writes nothing.
pub fn plan(
    layout: &CgroupLayout,
    cgroup: &CgroupRef,
    fault: &FaultKind,
) -> Result<CgroupPlan, CgroupError> {
    match fault {
        FaultKind::CpuThrottle { millicpus } => plan_cpu(layout, cgroup, fault, *millicpus),
        FaultKind::MemoryLimit { bytes } => plan_memory(layout, cgroup, fault, *bytes),
        FaultKind::IoThrottle { limits } => plan_io(layout, cgroup, fault, limits),
        FaultKind::PidsLimit { max } => {
            let (version, dir) = controller_dir(layout, cgroup, "pids", fault)?;
            let path = require_file(&dir, "pids.max", fault)?;
            let previous = read_value(&path)?;
            let mut builder = Builder::new();
            builder.write(path.clone(), max.to_string(), previous);
            Ok(builder.finish(format!(
                "{} pids.max={max} in {}",
                label(version),
                dir.display()
            )))
        }
        FaultKind::Freeze => {
            let (version, dir) = controller_dir(layout, cgroup, "freezer", fault)?;
            let mut builder = Builder::new();
            let mechanism = match version {
                Version::V1 => {
                    let path = require_file(&dir, "freezer.state", fault)?;
                    // FREEZING is a freeze in progress: restoring means frozen.
                    let previous = match read_value(&path)?.as_str() {
                        "THAWED" => "THAWED",
                        _ => "FROZEN",
                    };
                    builder.write(path, "FROZEN".into(), previous.into());
                    format!("cgroup v1 freezer.state=FROZEN in {}", dir.display())
                }
                Version::V2 => {
                    let path = require_file(&dir, "cgroup.freeze", fault)?;
                    let previous = read_value(&path)?;
                    builder.write(path, "1".into(), previous);
                    format!("cgroup v2 cgroup.freeze=1 in {}", dir.display())
                }
            };
            Ok(builder.finish(mechanism))
        }
        other => Err(CgroupError::Unsupported {
            fault: other.name().to_string(),
            reason: "not a cgroup fault".into(),
        }),
    }
}

fn label(version: Version) -> &'static str {
    match version {
        Version::V1 => "cgroup v1",
        Version::V2 => "cgroup v2",
    }
}

/// Quota and period for `millicpus` thousandths of a CPU, keeping `period` unless the quota
/// would fall below the kernel's 1 ms minimum (then the period grows, up to 1 s).
pub fn cpu_quota(millicpus: u64, period: u64) -> (u64, u64) {
    let quota = millicpus.saturating_mul(period) / 1000;
    if quota >= MIN_QUOTA_US {
        return (quota, period);
    }
    let period = (MIN_QUOTA_US * 1000)
        .div_ceil(millicpus)
        .clamp(MIN_PERIOD_US, MAX_PERIOD_US);
    (
        (millicpus.saturating_mul(period) / 1000).max(MIN_QUOTA_US),
        period,
    )
}

fn plan_cpu(
    layout: &CgroupLayout,
    cgroup: &CgroupRef,
    fault: &FaultKind,
    millicpus: u64,
) -> Result<CgroupPlan, CgroupError> {
    if millicpus == 0 {
        return Err(invalid(fault, "0 millicpus: a CPU quota must be positive"));
    }
    let (version, dir) = controller_dir(layout, cgroup, "cpu", fault)?;
    let mut builder = Builder::new();
    match version {
        Version::V1 => {
            let period_path = require_file(&dir, "cpu.cfs_period_us", fault)?;
            let quota_path = require_file(&dir, "cpu.cfs_quota_us", fault)?;
            let period_text = read_value(&period_path)?;
            let period: u64 = period_text
                .parse()
                .map_err(|_| parse_error(&period_path, &period_text, "not a period in µs"))?;
            let previous_quota = read_value(&quota_path)?;
            let (quota, new_period) = cpu_quota(millicpus, period);
            if new_period != period {
                builder.write(period_path, new_period.to_string(), period_text);
            }
            builder.write(quota_path, quota.to_string(), previous_quota);
            Ok(builder.finish(format!(
                "cgroup v1 cpu.cfs_quota_us={quota}/{new_period} in {}",
                dir.display()
            )))
        }
        Version::V2 => {
            let path = require_file(&dir, "cpu.max", fault)?;
            let previous = read_value(&path)?;
            let period = match previous.split_whitespace().nth(1) {
                Some(period) => period
                    .parse()
                    .map_err(|_| parse_error(&path, &previous, "expected `quota period`"))?,
                None => 100_000,
            };
            let (quota, period) = cpu_quota(millicpus, period);
            let value = format!("{quota} {period}");
            builder.write(path, value.clone(), previous);
            Ok(builder.finish(format!(
                "cgroup v2 cpu.max=\"{value}\" in {}",
                dir.display()
            )))
        }
    }
}

/// `"max"` or a number of bytes.
fn parse_limit(path: &Path, text: &str) -> Result<u64, CgroupError> {
    if text == "max" {
        return Ok(u64::MAX);
    }
    text.parse()
        .map_err(|_| parse_error(path, text, "not a byte count"))
}

fn plan_memory(
    layout: &CgroupLayout,
    cgroup: &CgroupRef,
    fault: &FaultKind,
    bytes: u64,
) -> Result<CgroupPlan, CgroupError> {
    if bytes == 0 {
        return Err(invalid(fault, "a memory limit of 0 bytes"));
    }
    let (version, dir) = controller_dir(layout, cgroup, "memory", fault)?;
    let mut builder = Builder::new();
    match version {
        Version::V1 => {
            let limit_path = require_file(&dir, "memory.limit_in_bytes", fault)?;
            let limit_text = read_value(&limit_path)?;
            parse_limit(&limit_path, &limit_text)?;
            // The kernel keeps memory <= memory+swap: raising the memory limit above the
            // memsw limit needs memsw raised first (undo runs in reverse, so stays valid).
            let memsw_path = dir.join("memory.memsw.limit_in_bytes");
            let mut note = "";
            if memsw_path.exists() {
                let memsw_text = read_value(&memsw_path)?;
                let memsw = parse_limit(&memsw_path, &memsw_text)?;
                if bytes > memsw {
                    builder.write(memsw_path, bytes.to_string(), memsw_text);
                    note = " (memory.memsw.limit_in_bytes raised to match first)";
                }
            }
            builder.write(limit_path, bytes.to_string(), limit_text);
            Ok(builder.finish(format!(
                "cgroup v1 memory.limit_in_bytes={bytes}{note} in {}",
                dir.display()
            )))
        }
        Version::V2 => {
            let path = require_file(&dir, "memory.max", fault)?;
            let previous = read_value(&path)?;
            parse_limit(&path, &previous)?;
            builder.write(path, bytes.to_string(), previous);
            Ok(builder.finish(format!("cgroup v2 memory.max={bytes} in {}", dir.display())))
        }
    }
}

/// The `MAJ:MIN` to throttle: given, or the whole disk backing the root filesystem of the
/// first process in the cgroup.
fn io_device(limits: &IoLimits, dir: &Path, fault: &FaultKind) -> Result<String, CgroupError> {
    if let Some(device) = &limits.device {
        let (major, minor) = parse_dev(device)
            .ok_or_else(|| invalid(fault, format!("device {device:?} is not MAJOR:MINOR")))?;
        return Ok(format!("{major}:{minor}"));
    }
    let pids = read_procs(dir)?;
    let pid = *pids.first().ok_or_else(|| CgroupError::Unsupported {
        fault: fault.name().to_string(),
        reason: format!(
            "no device given and {} has no process whose root filesystem could name one",
            dir.display()
        ),
    })?;
    root_device_of_pid(pid).map_err(|detail| CgroupError::Process { pid, detail })
}

fn plan_io(
    layout: &CgroupLayout,
    cgroup: &CgroupRef,
    fault: &FaultKind,
    limits: &IoLimits,
) -> Result<CgroupPlan, CgroupError> {
    let requested: Vec<(&str, &str, u64)> = [
        ("read_bps", "rbps", limits.read_bps),
        ("write_bps", "wbps", limits.write_bps),
        ("read_iops", "riops", limits.read_iops),
        ("write_iops", "wiops", limits.write_iops),
    ]
    .into_iter()
    .filter_map(|(v1, v2, value)| value.map(|value| (v1, v2, value)))
    .collect();
    if requested.is_empty() {
        return Err(invalid(
            fault,
            "no limit given (read/write bps/iops all unset)",
        ));
    }
    if requested.iter().any(|(_, _, value)| *value == 0) {
        return Err(invalid(
            fault,
            "a limit of 0 (cgroup v1 reads 0 as \"no limit\")",
        ));
    }
    let (version, dir) = controller_dir(layout, cgroup, "blkio", fault)?;
    let device = io_device(limits, &dir, fault)?;
    let mut builder = Builder::new();
    match version {
        Version::V1 => {
            let mut parts = Vec::new();
            for (name, _, value) in &requested {
                let path = require_file(&dir, &format!("blkio.throttle.{name}_device"), fault)?;
                let current = read_value(&path)?;
                // One "MAJ:MIN value" line per limited device; writing 0 removes the limit.
                let previous = current
                    .lines()
                    .find_map(|line| {
                        let (dev, value) = line.split_once(' ')?;
                        (dev == device).then(|| value.trim().to_string())
                    })
                    .unwrap_or_else(|| "0".to_string());
                builder.write(
                    path,
                    format!("{device} {value}"),
                    format!("{device} {previous}"),
                );
                parts.push(format!("blkio.throttle.{name}_device={device} {value}"));
            }
            Ok(builder.finish(format!(
                "cgroup v1 {} in {}",
                parts.join(", "),
                dir.display()
            )))
        }
        Version::V2 => {
            let path = require_file(&dir, "io.max", fault)?;
            let current = read_value(&path)?;
            // The device's whole previous line restores it exactly; without one, all-"max"
            // removes the entry again.
            let previous = current
                .lines()
                .find(|line| line.split_whitespace().next() == Some(device.as_str()))
                .map(str::to_string)
                .unwrap_or_else(|| format!("{device} rbps=max wbps=max riops=max wiops=max"));
            let settings: Vec<String> = requested
                .iter()
                .map(|(_, key, value)| format!("{key}={value}"))
                .collect();
            let value = format!("{device} {}", settings.join(" "));
            builder.write(path, value.clone(), previous);
            Ok(builder.finish(format!("cgroup v2 io.max=\"{value}\" in {}", dir.display())))
        }
    }
}

/// Writes the plan in order. When a write fails, what was already written is restored before
/// the error is returned, so a failed apply leaves nothing behind.
pub fn apply(plan: &CgroupPlan) -> Result<(), CgroupError> {
    let total = plan.writes.len();
    for (index, (path, value)) in plan.writes.iter().enumerate() {
        if let Err(failed) = write_value(path, value) {
            // `undo.writes` is reversed: its last `index` entries restore writes[..index].
            let done = &plan.undo.writes[total.saturating_sub(index).min(plan.undo.writes.len())..];
            let rollback = match undo(&CgroupUndo {
                writes: done.to_vec(),
            }) {
                Ok(report) => report,
                Err(err) => format!("ROLLBACK FAILED: {err}"),
            };
            return Err(CgroupError::RolledBack {
                failed: Box::new(failed),
                rollback,
            });
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes the previous values back, in order. Idempotent. Directories that no longer exist
/// (the container was removed) are skipped: `Ok("cgroup gone ...")`. Every write is attempted
/// even after a failure; failures are returned together.
pub fn undo(undo: &CgroupUndo) -> Result<String, CgroupError> {
    if undo.writes.is_empty() {
        return Ok("nothing to restore".into());
    }
    let mut restored = Vec::new();
    let mut gone = Vec::new();
    let mut failures = Vec::new();
    for write in &undo.writes {
        let dir = write.path.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            gone.push(dir.display().to_string());
            continue;
        }
        match write_value(&write.path, &write.content) {
            Ok(()) => restored.push(format!("{}={}", file_name(&write.path), write.content)),
            // Removed between the check and the write.
            Err(_) if !dir.is_dir() => gone.push(dir.display().to_string()),
            Err(err) => failures.push(err.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(CgroupError::Restore { failures });
    }
    gone.dedup();
    if restored.is_empty() {
        return Ok(format!("cgroup gone: {}", gone.join(", ")));
    }
    let mut report = format!("restored {}", restored.join(", "));
    if !gone.is_empty() {
        report.push_str(&format!("; cgroup gone: {}", gone.join(", ")));
    }
    Ok(report)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|size| *size > 0)
        .unwrap_or(4096)
}

/// Polls `read` until `done` or `timeout`; returns the last value read.
fn poll_value(
    timeout: Duration,
    mut read: impl FnMut() -> Result<String, CgroupError>,
    done: impl Fn(&str) -> bool,
) -> Result<String, CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = read()?;
        if done(&value) || Instant::now() >= deadline {
            return Ok(value);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the value in force matches what the fault wrote, and what was read.
fn check(write: &RestoreWrite) -> Result<(bool, String), CgroupError> {
    let path = &write.path;
    let name = file_name(path);
    let applied = write.applied.as_str();
    let current = read_value(path)?;
    let ok = match name.as_str() {
        // The kernel rounds limits down to whole pages.
        "memory.limit_in_bytes" | "memory.memsw.limit_in_bytes" | "memory.max" => {
            let page = page_size();
            let want = parse_limit(path, applied)? / page * page;
            parse_limit(path, &current)? == want
        }
        "io.max" => {
            let mut wanted = applied.split_whitespace();
            let device = wanted.next().unwrap_or_default();
            let line = current
                .lines()
                .find(|line| line.split_whitespace().next() == Some(device))
                .unwrap_or_default();
            let have: Vec<&str> = line.split_whitespace().collect();
            wanted.all(|setting| have.contains(&setting))
        }
        name if name.starts_with("blkio.throttle.") => current
            .lines()
            .any(|line| line.split_whitespace().eq(applied.split_whitespace())),
        "freezer.state" => {
            let state = poll_value(
                Duration::from_secs(2),
                || read_value(path),
                |s| s != "FREEZING",
            )?;
            return Ok((state == applied, format!("freezer.state={state}")));
        }
        "cgroup.freeze" if applied == "1" => {
            let events = path.with_file_name("cgroup.events");
            let frozen = poll_value(
                Duration::from_secs(2),
                || read_value(&events),
                |text| text.lines().any(|line| line == "frozen 1"),
            )?;
            let frozen = frozen.lines().any(|line| line == "frozen 1");
            return Ok((
                current == "1" && frozen,
                format!(
                    "cgroup.freeze={current}, cgroup.events frozen={}",
                    u8::from(frozen)
                ),
            ));
        }
        _ => current == applied,
    };
    let shown = current.lines().collect::<Vec<_>>().join(" | ");
    Ok((
        ok,
        format!("{name}={shown}{}", if ok { "" } else { " (NOT as set)" }),
    ))
}

/// `nr_throttled` from a `cpu.stat` (v1 and v2 both have it).
fn nr_throttled(dir: &Path) -> Result<Option<u64>, CgroupError> {
    let path = dir.join("cpu.stat");
    if !path.exists() {
        return Ok(None);
    }
    let text = read_value(&path)?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("nr_throttled "))
        .and_then(|value| value.trim().parse().ok()))
}

/// Reads the values back and reports whether the fault is in force. For CPU throttling it also
/// samples `nr_throttled` over a few periods and says whether it rises (it only does while the
/// target wants more CPU than its quota). Blocks for up to ~2 s (CPU sampling, freeze settling):
/// call it from a blocking context.
pub fn verify(undo: &CgroupUndo, fault: &FaultKind) -> Result<Verification, CgroupError> {
    if undo.writes.is_empty() {
        return Ok(Verification {
            effective: false,
            detail: "nothing was applied".into(),
        });
    }
    let mut effective = true;
    let mut details = Vec::new();
    for write in undo.writes.iter().rev() {
        let dir = write.path.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            effective = false;
            details.push(format!("cgroup gone: {}", dir.display()));
            continue;
        }
        let (ok, detail) = check(write)?;
        effective &= ok;
        details.push(detail);
    }
    if let FaultKind::CpuThrottle { .. } = fault {
        let quota_file = undo.writes.iter().find(|write| {
            matches!(
                file_name(&write.path).as_str(),
                "cpu.max" | "cpu.cfs_quota_us"
            )
        });
        if let Some(write) = quota_file {
            let dir = write.path.parent().unwrap_or(Path::new("/"));
            details.push(throttling(dir, &write.applied)?);
        }
    }
    Ok(Verification {
        effective,
        detail: details.join("; "),
    })
}

/// Samples `nr_throttled` over ~5 CFS periods (0.3 s to 2 s).
fn throttling(dir: &Path, applied: &str) -> Result<String, CgroupError> {
    let period_us = match applied.split_whitespace().nth(1) {
        Some(period) => period.parse().unwrap_or(100_000),
        None => read_value(&dir.join("cpu.cfs_period_us"))
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(100_000u64),
    };
    let window = Duration::from_micros(period_us * 5)
        .clamp(Duration::from_millis(300), Duration::from_secs(2));
    let Some(before) = nr_throttled(dir)? else {
        return Ok("cpu.stat has no nr_throttled".into());
    };
    std::thread::sleep(window);
    let after = nr_throttled(dir)?.unwrap_or(before);
    Ok(if after > before {
        format!("nr_throttled {before} -> {after} in {window:?}: the target is being throttled")
    } else {
        format!(
            "nr_throttled {before} -> {after} in {window:?}: not rising (the target used less than its quota)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_domain::fault::IoLimits;

    /// Unlimited on cgroup v1, as the kernel prints it (`PAGE_COUNTER_MAX` pages, 4 KiB pages).
    const V1_UNLIMITED: &str = "9223372036854771712";

    /// A v2 tree in a temp dir: root with `cgroup.controllers`, and `test.slice/app` with the
    /// files a systemd-managed service has (contents as a 6.x kernel prints them).
    struct V2Tree {
        _dir: tempfile::TempDir,
        layout: CgroupLayout,
        cgroup: CgroupRef,
        app: PathBuf,
    }

    fn v2_tree() -> V2Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        let app = root.join("test.slice/app");
        std::fs::create_dir_all(&app).unwrap();
        for (name, content) in [
            ("cpu.max", "max 100000\n"),
            (
                "cpu.stat",
                "usage_usec 1000\nuser_usec 600\nsystem_usec 400\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
            ),
            ("memory.max", "max\n"),
            ("io.max", "8:16 rbps=2097152 wbps=max riops=max wiops=max\n"),
            ("pids.max", "max\n"),
            ("cgroup.freeze", "0\n"),
            ("cgroup.events", "populated 1\nfrozen 0\n"),
            ("cgroup.procs", &format!("{}\n", std::process::id())),
        ] {
            std::fs::write(app.join(name), content).unwrap();
        }
        let layout = CgroupLayout::V2 {
            root: root.clone(),
            controllers: ["cpu", "io", "memory", "pids"].map(String::from).into(),
        };
        let cgroup = CgroupRef::from_path(&layout, "test.slice/app").unwrap();
        V2Tree {
            _dir: dir,
            layout,
            cgroup,
            app,
        }
    }

    /// A v1 tree: one hierarchy per controller (as on this host), `docker/abc` in each.
    struct V1Tree {
        _dir: tempfile::TempDir,
        layout: CgroupLayout,
        cgroup: CgroupRef,
        dirs: std::collections::BTreeMap<&'static str, PathBuf>,
    }

    fn v1_tree() -> V1Tree {
        let dir = tempfile::tempdir().unwrap();
        let files: &[(&str, &[(&str, &str)])] = &[
            (
                "cpu",
                &[
                    ("cpu.cfs_period_us", "100000\n"),
                    ("cpu.cfs_quota_us", "-1\n"),
                    (
                        "cpu.stat",
                        "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
                    ),
                ],
            ),
            (
                "memory",
                &[
                    ("memory.limit_in_bytes", "9223372036854771712\n"),
                    ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
                ],
            ),
            (
                "blkio",
                &[
                    ("blkio.throttle.read_bps_device", ""),
                    ("blkio.throttle.write_bps_device", "8:0 1048576\n"),
                    ("blkio.throttle.read_iops_device", ""),
                    ("blkio.throttle.write_iops_device", ""),
                ],
            ),
            ("pids", &[("pids.max", "max\n")]),
            ("freezer", &[("freezer.state", "THAWED\n")]),
        ];
        let mut controllers = std::collections::BTreeMap::new();
        let mut dirs = std::collections::BTreeMap::new();
        for (controller, contents) in files {
            let mount = dir.path().join(controller);
            let cg = mount.join("docker/abc");
            std::fs::create_dir_all(&cg).unwrap();
            for (name, content) in *contents {
                std::fs::write(cg.join(name), content).unwrap();
            }
            std::fs::write(cg.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
            controllers.insert(controller.to_string(), mount);
            dirs.insert(*controller, cg);
        }
        let layout = CgroupLayout::V1 { controllers };
        let cgroup = CgroupRef::from_path(&layout, "docker/abc").unwrap();
        V1Tree {
            _dir: dir,
            layout,
            cgroup,
            dirs,
        }
    }

    fn writes(plan: &CgroupPlan) -> Vec<(String, String)> {
        plan.writes
            .iter()
            .map(|(path, value)| (file_name(path), value.clone()))
            .collect()
    }

    fn restores(plan: &CgroupPlan) -> Vec<(String, String)> {
        plan.undo
            .writes
            .iter()
            .map(|write| (file_name(&write.path), write.content.clone()))
            .collect()
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn quota_keeps_the_period_unless_below_the_kernel_minimum() {
        assert_eq!(cpu_quota(200, 100_000), (20_000, 100_000));
        assert_eq!(cpu_quota(1500, 100_000), (150_000, 100_000));
        assert_eq!(cpu_quota(5, 100_000), (1_000, 200_000));
        assert_eq!(cpu_quota(1, 100_000), (1_000, 1_000_000));
        assert_eq!(cpu_quota(10, 100_000), (1_000, 100_000));
    }

    #[test]
    fn v2_cpu_throttle_writes_cpu_max_and_restores_it_exactly() {
        let tree = v2_tree();
        let fault = FaultKind::CpuThrottle { millicpus: 200 };
        let plan = plan(&tree.layout, &tree.cgroup, &fault).unwrap();
        assert_eq!(writes(&plan), [pair("cpu.max", "20000 100000")]);
        assert_eq!(restores(&plan), [pair("cpu.max", "max 100000")]);
        assert!(
            plan.mechanism
                .starts_with("cgroup v2 cpu.max=\"20000 100000\""),
            "{}",
            plan.mechanism
        );
        apply(&plan).unwrap();
        assert_eq!(read(&tree.app.join("cpu.max")), "20000 100000");
        let verification = verify(&plan.undo, &fault).unwrap();
        assert!(verification.effective, "{verification:?}");
        assert!(
            verification.detail.contains("nr_throttled 0 -> 0"),
            "{verification:?}"
        );
        assert!(undo(&plan.undo).unwrap().contains("cpu.max=max 100000"));
        assert_eq!(read(&tree.app.join("cpu.max")), "max 100000");
        assert!(!verify(&plan.undo, &fault).unwrap().effective);
        // A small quota grows the period rather than going below 1 ms.
        let plan = super::plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::CpuThrottle { millicpus: 5 },
        )
        .unwrap();
        assert_eq!(writes(&plan), [pair("cpu.max", "1000 200000")]);
    }

    #[test]
    fn v2_memory_pids_and_freeze() {
        let tree = v2_tree();
        let memory = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::MemoryLimit { bytes: 64 << 20 },
        )
        .unwrap();
        assert_eq!(writes(&memory), [pair("memory.max", "67108864")]);
        assert_eq!(restores(&memory), [pair("memory.max", "max")]);
        let pids = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::PidsLimit { max: 10 },
        )
        .unwrap();
        assert_eq!(writes(&pids), [pair("pids.max", "10")]);
        assert_eq!(restores(&pids), [pair("pids.max", "max")]);
        let freeze = plan(&tree.layout, &tree.cgroup, &FaultKind::Freeze).unwrap();
        assert_eq!(writes(&freeze), [pair("cgroup.freeze", "1")]);
        assert_eq!(restores(&freeze), [pair("cgroup.freeze", "0")]);
        apply(&freeze).unwrap();
        // The kernel would flip cgroup.events; this tree does not, so the freeze is not (yet)
        // effective, and verification says so rather than trusting the write.
        let check = verify(&freeze.undo, &FaultKind::Freeze).unwrap();
        assert!(
            !check.effective && check.detail.contains("frozen=0"),
            "{check:?}"
        );
        std::fs::write(tree.app.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert!(verify(&freeze.undo, &FaultKind::Freeze).unwrap().effective);
        undo(&freeze.undo).unwrap();
        assert_eq!(read(&tree.app.join("cgroup.freeze")), "0");
        apply(&memory).unwrap();
        assert!(
            verify(&memory.undo, &FaultKind::MemoryLimit { bytes: 64 << 20 })
                .unwrap()
                .effective
        );
        undo(&memory.undo).unwrap();
        assert_eq!(read(&tree.app.join("memory.max")), "max");
    }

    #[test]
    fn v2_io_max_sets_only_the_given_keys_and_restores_the_device_line() {
        let tree = v2_tree();
        let limits = IoLimits {
            device: Some("8:16".into()),
            write_bps: Some(1 << 20),
            write_iops: Some(100),
            ..Default::default()
        };
        let fault = FaultKind::IoThrottle { limits };
        let plan = plan(&tree.layout, &tree.cgroup, &fault).unwrap();
        assert_eq!(
            writes(&plan),
            [pair("io.max", "8:16 wbps=1048576 wiops=100")]
        );
        // The device had a read limit: its whole line comes back.
        assert_eq!(
            restores(&plan),
            [pair(
                "io.max",
                "8:16 rbps=2097152 wbps=max riops=max wiops=max"
            )]
        );
        // A device without a line: restoring writes all-max, which removes the entry.
        let limits = IoLimits {
            device: Some("254:0".into()),
            read_bps: Some(4096),
            ..Default::default()
        };
        let plan = super::plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::IoThrottle { limits },
        )
        .unwrap();
        assert_eq!(writes(&plan), [pair("io.max", "254:0 rbps=4096")]);
        assert_eq!(
            restores(&plan),
            [pair(
                "io.max",
                "254:0 rbps=max wbps=max riops=max wiops=max"
            )]
        );
        // As the kernel would print it after the write.
        std::fs::write(
            tree.app.join("io.max"),
            "254:0 rbps=4096 wbps=max riops=max wiops=max\n",
        )
        .unwrap();
        let limits = IoLimits {
            device: Some("254:0".into()),
            read_bps: Some(4096),
            ..Default::default()
        };
        assert!(
            verify(&plan.undo, &FaultKind::IoThrottle { limits })
                .unwrap()
                .effective
        );
    }

    #[test]
    fn io_device_defaults_to_the_root_disk_of_a_process_in_the_cgroup() {
        let tree = v2_tree();
        let Ok(root) = root_device_of_pid(std::process::id()) else {
            eprintln!("skipped: this test runner's root filesystem is not on a block device");
            return;
        };
        let limits = IoLimits {
            write_bps: Some(1 << 20),
            ..Default::default()
        };
        let plan = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::IoThrottle { limits },
        )
        .unwrap();
        assert_eq!(
            writes(&plan),
            [pair("io.max", &format!("{root} wbps=1048576"))]
        );
        // No process in the cgroup and no device: refused with the reason.
        std::fs::write(tree.app.join("cgroup.procs"), "").unwrap();
        let limits = IoLimits {
            write_bps: Some(1 << 20),
            ..Default::default()
        };
        let err = super::plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::IoThrottle { limits },
        )
        .unwrap_err();
        assert!(err.to_string().contains("no process"), "{err}");
    }

    #[test]
    fn v1_plans_write_the_v1_files_and_restore_exact_values() {
        let tree = v1_tree();
        let cpu = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::CpuThrottle { millicpus: 100 },
        )
        .unwrap();
        assert_eq!(writes(&cpu), [pair("cpu.cfs_quota_us", "10000")]);
        assert_eq!(restores(&cpu), [pair("cpu.cfs_quota_us", "-1")]);
        assert!(
            cpu.mechanism
                .starts_with("cgroup v1 cpu.cfs_quota_us=10000/100000"),
            "{}",
            cpu.mechanism
        );
        // Below the 1 ms minimum: the period changes too, and comes back after the quota.
        let small = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::CpuThrottle { millicpus: 2 },
        )
        .unwrap();
        assert_eq!(
            writes(&small),
            [
                pair("cpu.cfs_period_us", "500000"),
                pair("cpu.cfs_quota_us", "1000")
            ]
        );
        assert_eq!(
            restores(&small),
            [
                pair("cpu.cfs_quota_us", "-1"),
                pair("cpu.cfs_period_us", "100000")
            ]
        );

        let memory = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::MemoryLimit { bytes: 128 << 20 },
        )
        .unwrap();
        assert_eq!(
            writes(&memory),
            [pair("memory.limit_in_bytes", "134217728")]
        );
        assert_eq!(
            restores(&memory),
            [pair("memory.limit_in_bytes", V1_UNLIMITED)]
        );

        let pids = plan(&tree.layout, &tree.cgroup, &FaultKind::PidsLimit { max: 3 }).unwrap();
        assert_eq!(
            (writes(&pids), restores(&pids)),
            (vec![pair("pids.max", "3")], vec![pair("pids.max", "max")])
        );

        let freeze = plan(&tree.layout, &tree.cgroup, &FaultKind::Freeze).unwrap();
        assert_eq!(writes(&freeze), [pair("freezer.state", "FROZEN")]);
        assert_eq!(restores(&freeze), [pair("freezer.state", "THAWED")]);
        apply(&freeze).unwrap();
        assert!(verify(&freeze.undo, &FaultKind::Freeze).unwrap().effective);
        undo(&freeze.undo).unwrap();
        assert_eq!(read(&tree.dirs["freezer"].join("freezer.state")), "THAWED");
    }

    #[test]
    fn v1_memory_above_the_memsw_limit_raises_memsw_first() {
        let tree = v1_tree();
        let memory = &tree.dirs["memory"];
        std::fs::write(memory.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        std::fs::write(memory.join("memory.memsw.limit_in_bytes"), "536870912\n").unwrap();
        let up = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::MemoryLimit { bytes: 1 << 30 },
        )
        .unwrap();
        assert_eq!(
            writes(&up),
            [
                pair("memory.memsw.limit_in_bytes", "1073741824"),
                pair("memory.limit_in_bytes", "1073741824")
            ]
        );
        assert_eq!(
            restores(&up),
            [
                pair("memory.limit_in_bytes", "268435456"),
                pair("memory.memsw.limit_in_bytes", "536870912")
            ]
        );
        assert!(up.mechanism.contains("memsw"), "{}", up.mechanism);
        let down = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::MemoryLimit { bytes: 64 << 20 },
        )
        .unwrap();
        assert_eq!(writes(&down), [pair("memory.limit_in_bytes", "67108864")]);
        // Not page aligned: the kernel rounds down, and verification knows it.
        let odd = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::MemoryLimit { bytes: 10_000_000 },
        )
        .unwrap();
        apply(&odd).unwrap();
        std::fs::write(memory.join("memory.limit_in_bytes"), "9998336\n").unwrap();
        assert!(
            verify(&odd.undo, &FaultKind::MemoryLimit { bytes: 10_000_000 })
                .unwrap()
                .effective
        );
    }

    #[test]
    fn v1_blkio_writes_one_line_per_limit_and_restores_each() {
        let tree = v1_tree();
        let limits = IoLimits {
            device: Some("8:0".into()),
            read_bps: Some(2 << 20),
            write_bps: Some(4 << 20),
            ..Default::default()
        };
        let plan = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::IoThrottle { limits },
        )
        .unwrap();
        assert_eq!(
            writes(&plan),
            [
                pair("blkio.throttle.read_bps_device", "8:0 2097152"),
                pair("blkio.throttle.write_bps_device", "8:0 4194304")
            ]
        );
        // write_bps had 1 MiB/s before; read_bps had no limit (0 removes it).
        assert_eq!(
            restores(&plan),
            [
                pair("blkio.throttle.write_bps_device", "8:0 1048576"),
                pair("blkio.throttle.read_bps_device", "8:0 0")
            ]
        );
        let bad = IoLimits {
            device: Some("sda".into()),
            read_bps: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            super::plan(
                &tree.layout,
                &tree.cgroup,
                &FaultKind::IoThrottle { limits: bad }
            ),
            Err(CgroupError::Invalid { .. })
        ));
        let none = IoLimits {
            device: Some("8:0".into()),
            ..Default::default()
        };
        assert!(matches!(
            super::plan(
                &tree.layout,
                &tree.cgroup,
                &FaultKind::IoThrottle { limits: none }
            ),
            Err(CgroupError::Invalid { .. })
        ));
    }

    #[test]
    fn undo_is_idempotent_and_reports_a_removed_cgroup() {
        let tree = v1_tree();
        let plan = plan(&tree.layout, &tree.cgroup, &FaultKind::PidsLimit { max: 3 }).unwrap();
        apply(&plan).unwrap();
        let first = undo(&plan.undo).unwrap();
        let second = undo(&plan.undo).unwrap();
        assert_eq!(first, second);
        assert_eq!(read(&tree.dirs["pids"].join("pids.max")), "max");
        std::fs::remove_dir_all(&tree.dirs["pids"]).unwrap();
        let gone = undo(&plan.undo).unwrap();
        assert!(gone.starts_with("cgroup gone"), "{gone}");
        let check = verify(&plan.undo, &FaultKind::PidsLimit { max: 3 }).unwrap();
        assert!(
            !check.effective && check.detail.contains("cgroup gone"),
            "{check:?}"
        );
        assert_eq!(
            undo(&CgroupUndo { writes: vec![] }).unwrap(),
            "nothing to restore"
        );
    }

    #[test]
    fn a_failed_write_rolls_back_the_earlier_ones() {
        let tree = v1_tree();
        let memory = &tree.dirs["memory"];
        std::fs::write(memory.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        std::fs::write(memory.join("memory.memsw.limit_in_bytes"), "268435456\n").unwrap();
        let plan = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::MemoryLimit { bytes: 1 << 30 },
        )
        .unwrap();
        assert_eq!(plan.writes.len(), 2);
        // The second write (memory.limit_in_bytes) fails: a directory cannot be opened for writing.
        std::fs::remove_file(memory.join("memory.limit_in_bytes")).unwrap();
        std::fs::create_dir(memory.join("memory.limit_in_bytes")).unwrap();
        let err = apply(&plan).unwrap_err();
        assert!(matches!(err, CgroupError::RolledBack { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("memory.memsw.limit_in_bytes=268435456"),
            "{err}"
        );
        assert_eq!(
            read(&memory.join("memory.memsw.limit_in_bytes")),
            "268435456"
        );
    }

    #[test]
    fn the_root_cgroup_and_the_agents_own_cgroup_are_refused() {
        let tree = v2_tree();
        let root = CgroupRef::from_path(&tree.layout, "/").unwrap();
        let err = plan(&tree.layout, &root, &FaultKind::PidsLimit { max: 5 }).unwrap_err();
        assert!(matches!(err, CgroupError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("whole host"), "{err}");
        // On the real host: the cgroup this test process (standing in for the agent) is in.
        let layout = CgroupLayout::detect().unwrap();
        let own = CgroupRef::of_pid(&layout, std::process::id()).unwrap();
        for fault in [
            FaultKind::Freeze,
            FaultKind::CpuThrottle { millicpus: 10 },
            FaultKind::MemoryLimit { bytes: 1 << 20 },
        ] {
            match plan(&layout, &own, &fault) {
                Err(CgroupError::Refused { .. } | CgroupError::Unsupported { .. }) => {}
                other => panic!("{fault:?} on our own cgroup: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_controller_files_and_other_faults_are_refused_with_the_reason() {
        let tree = v2_tree();
        std::fs::remove_file(tree.app.join("pids.max")).unwrap();
        let err = plan(&tree.layout, &tree.cgroup, &FaultKind::PidsLimit { max: 1 }).unwrap_err();
        assert!(err.to_string().contains("subtree_control"), "{err}");
        let err = plan(
            &tree.layout,
            &tree.cgroup,
            &FaultKind::CpuHog {
                workers: 1,
                load_percent: 50,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a cgroup fault"), "{err}");
        let v1_only_cpu = CgroupLayout::V1 {
            controllers: [("cpu".to_string(), PathBuf::from("/x"))].into(),
        };
        let err = plan(&v1_only_cpu, &tree.cgroup, &FaultKind::Freeze).unwrap_err();
        assert!(err.to_string().contains("freezer"), "{err}");
    }
}
