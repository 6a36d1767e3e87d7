//! Real cgroup v1 faults on this host (root; the project's machines are v1/v2 hybrids): each test
//! makes its own scratch cgroups *below the test's own cgroup* in every controller it needs,
//! runs workloads in them, applies a fault through the library, measures the effect, undoes it
//! and checks the exact previous values are back. Scratch cgroups are removed by a guard's
//! `Drop` (members thawed, killed and reaped first), so a failing assertion leaves nothing.
//!
//! Tests run one at a time (CPU measurements must not compete with each other). The v2 logic is
//! covered against temp-dir trees in the unit tests; here the unified mount (which has no
//! controllers on these hosts) still gets a real `cgroup.freeze` test.

// Test helpers outside `#[test]` functions (which clippy's allow-unwrap-in-tests does not
// cover) panic on purpose: a panic is the failure report we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use faultline_agent::cgroup::{self, CgroupLayout, CgroupRef};
use faultline_domain::fault::{FaultKind, IoLimits};
use support::Scratch;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The v1 mounts, or `None` (with the reason printed) on a host without cgroup v1.
fn v1_layout() -> Option<CgroupLayout> {
    assert!(
        nix::unistd::geteuid().is_root(),
        "cgroup tests need root (this project's machines run them as root)"
    );
    let layout = CgroupLayout::detect().unwrap();
    if layout.v1_mounts().is_none_or(|v1| v1.is_empty()) {
        eprintln!(
            "SKIPPED: no cgroup v1 hierarchy on this host ({})",
            layout.describe()
        );
        return None;
    }
    Some(layout)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
}

/// CPU use of `pid` over `window`, in percent of one CPU.
fn cpu_percent(pid: u32, window: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let start = Instant::now();
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    let ticks = cpu_ticks(pid) - before;
    ticks as f64 / hz / start.elapsed().as_secs_f64() * 100.0
}

fn stat_value(path: &Path, key: &str) -> u64 {
    read(path)
        .lines()
        .find_map(|line| line.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in {}", path.display()))
}

#[test]
fn cpu_throttle_holds_a_busy_process_to_its_quota_and_undo_restores_it() {
    let _serial = serial();
    let Some(layout) = v1_layout() else { return };
    let mut scratch = Scratch::new(&layout, &["cpu"], "cpu");
    let dir = scratch.dir("cpu").to_path_buf();
    // Fixture, not fault: a high weight so other load on this 2-CPU machine (parallel builds)
    // does not starve the measured process below its quota, or below 100% after the undo.
    std::fs::write(dir.join("cpu.shares"), "10240").unwrap();
    let pid = scratch.spawn("sh -c 'while :; do :; done'");
    let target = CgroupRef::of_pid(&layout, pid).unwrap();
    assert_eq!(target.v1["cpu"], dir);
    let quota_before = read(&dir.join("cpu.cfs_quota_us"));
    let period_before = read(&dir.join("cpu.cfs_period_us"));

    let fault = FaultKind::CpuThrottle { millicpus: 200 };
    let plan = cgroup::plan(&layout, &target, &fault).unwrap();
    println!("mechanism: {}", plan.mechanism);
    cgroup::apply(&plan).unwrap();
    assert_eq!(read(&dir.join("cpu.cfs_quota_us")), "20000");
    std::thread::sleep(Duration::from_millis(300));
    let throttled_before = stat_value(&dir.join("cpu.stat"), "nr_throttled");
    let throttled_use = cpu_percent(pid, Duration::from_secs(2));
    let throttled_after = stat_value(&dir.join("cpu.stat"), "nr_throttled");
    println!(
        "throttled to 200 millicpus: measured {throttled_use:.1}% CPU; nr_throttled {throttled_before} -> {throttled_after}"
    );
    assert!(
        (throttled_use - 20.0).abs() <= 5.0,
        "measured {throttled_use:.1}%, want 20% ± 5"
    );
    assert!(
        throttled_after > throttled_before + 5,
        "nr_throttled {throttled_before} -> {throttled_after}"
    );
    let verification = cgroup::verify(&plan.undo, &fault).unwrap();
    println!("verify: {verification:?}");
    assert!(
        verification.effective && verification.detail.contains("being throttled"),
        "{verification:?}"
    );

    let report = cgroup::undo(&plan.undo).unwrap();
    println!("undo: {report}");
    assert_eq!(read(&dir.join("cpu.cfs_quota_us")), quota_before);
    assert_eq!(read(&dir.join("cpu.cfs_period_us")), period_before);
    // Other load may share the CPUs: take the best of a few windows.
    let free_use = (0..3)
        .map(|_| cpu_percent(pid, Duration::from_secs(1)))
        .fold(0.0, f64::max);
    println!("after undo: measured {free_use:.1}% CPU (quota back to {quota_before})");
    assert!(free_use >= 80.0, "after undo only {free_use:.1}%");
    assert!(!cgroup::verify(&plan.undo, &fault).unwrap().effective);
    assert_eq!(
        cgroup::undo(&plan.undo).unwrap(),
        report,
        "undo is idempotent"
    );
}

#[test]
fn memory_limit_gets_a_process_allocating_beyond_it_oom_killed() {
    let _serial = serial();
    let Some(layout) = v1_layout() else { return };
    let mut scratch = Scratch::new(&layout, &["memory"], "memory");
    let dir = scratch.dir("memory").to_path_buf();
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let limit_before = read(&dir.join("memory.limit_in_bytes"));
    let memsw_before = read(&dir.join("memory.memsw.limit_in_bytes"));
    let fault = FaultKind::MemoryLimit { bytes: 64 << 20 };
    let plan = cgroup::plan(&layout, &cgroup_ref, &fault).unwrap();
    println!("mechanism: {}", plan.mechanism);
    cgroup::apply(&plan).unwrap();
    assert_eq!(
        read(&dir.join("memory.limit_in_bytes")),
        (64u64 << 20).to_string()
    );
    assert!(cgroup::verify(&plan.undo, &fault).unwrap().effective);

    // dd's 256 MiB buffer is written by read(2) from /dev/zero: every page becomes resident.
    let mut hog = scratch
        .command("dd if=/dev/zero of=/dev/null bs=256M count=1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = hog.wait().unwrap();
    let mut stderr = String::new();
    let _ = hog.stderr.take().unwrap().read_to_string(&mut stderr);
    use std::os::unix::process::ExitStatusExt;
    let oom_kills = stat_value(&dir.join("memory.oom_control"), "oom_kill");
    let failcnt: u64 = read(&dir.join("memory.failcnt")).parse().unwrap();
    println!(
        "allocating 256 MiB under 64 MiB: {status:?}, oom_kill {oom_kills}, failcnt {failcnt}, stderr {stderr:?}"
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the allocator was not OOM-killed: {status:?} {stderr}"
    );
    assert!(oom_kills >= 1 && failcnt > 0);
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(target as i32), None).is_ok(),
        "the small target survives"
    );

    println!("undo: {}", cgroup::undo(&plan.undo).unwrap());
    assert_eq!(read(&dir.join("memory.limit_in_bytes")), limit_before);
    assert_eq!(read(&dir.join("memory.memsw.limit_in_bytes")), memsw_before);
    let status = scratch
        .command("dd if=/dev/zero of=/dev/null bs=256M count=1")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "after undo the same allocation succeeds: {status:?}"
    );
}

#[test]
fn pids_limit_makes_fork_fail_beyond_it() {
    let _serial = serial();
    let Some(layout) = v1_layout() else { return };
    let mut scratch = Scratch::new(&layout, &["pids"], "pids");
    let dir = scratch.dir("pids").to_path_buf();
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let before = read(&dir.join("pids.max"));
    let fault = FaultKind::PidsLimit { max: 3 };
    let plan = cgroup::plan(&layout, &cgroup_ref, &fault).unwrap();
    cgroup::apply(&plan).unwrap();
    assert!(cgroup::verify(&plan.undo, &fault).unwrap().effective);
    // The target and this shell are 2 tasks: one `sleep` fits, the second fork fails.
    let output = scratch
        .command("sh -c 'for i in 1 2 3; do sleep 30 >/dev/null 2>&1 & done; echo forked-all'")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refused = stat_value(&dir.join("pids.events"), "max");
    println!(
        "forking 3 under pids.max=3: stdout {stdout:?} stderr {stderr:?}, pids.events max {refused}"
    );
    assert!(!stdout.contains("forked-all"), "every fork succeeded");
    assert!(stderr.to_lowercase().contains("fork"), "{stderr}");
    assert!(refused >= 1);
    println!("undo: {}", cgroup::undo(&plan.undo).unwrap());
    assert_eq!(read(&dir.join("pids.max")), before);
    let output = scratch
        .command("sh -c 'for i in 1 2 3; do sleep 1 >/dev/null 2>&1 & done; echo forked-all'")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("forked-all"));
}

#[test]
fn freeze_stops_all_progress_until_undo_thaws() {
    let _serial = serial();
    let Some(layout) = v1_layout() else { return };
    let mut scratch = Scratch::new(&layout, &["freezer"], "freezer");
    let dir = scratch.dir("freezer").to_path_buf();
    let pid = scratch.spawn("sh -c 'while :; do :; done'");
    let cgroup_ref = CgroupRef::of_pid(&layout, pid).unwrap();
    let plan = cgroup::plan(&layout, &cgroup_ref, &FaultKind::Freeze).unwrap();
    assert_eq!(
        plan.writes,
        [(dir.join("freezer.state"), "FROZEN".to_string())]
    );
    cgroup::apply(&plan).unwrap();
    let verification = cgroup::verify(&plan.undo, &FaultKind::Freeze).unwrap();
    assert!(verification.effective, "{verification:?}");
    assert_eq!(read(&dir.join("freezer.state")), "FROZEN");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(700));
    let frozen_ticks = cpu_ticks(pid) - before;
    println!(
        "frozen: state {:?}, {frozen_ticks} ticks in 0.7 s",
        state(pid)
    );
    assert_eq!(frozen_ticks, 0);
    assert_eq!(state(pid), 'D', "frozen tasks show as D");
    println!("undo: {}", cgroup::undo(&plan.undo).unwrap());
    assert_eq!(read(&dir.join("freezer.state")), "THAWED");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    assert!(cpu_ticks(pid) > before, "no progress after thaw");
}

#[test]
fn freeze_through_cgroup_v2_on_the_unified_mount() {
    let _serial = serial();
    assert!(nix::unistd::geteuid().is_root());
    let host = CgroupLayout::detect().unwrap();
    let Some(unified) = host.v2_root().map(Path::to_path_buf) else {
        eprintln!("SKIPPED: no cgroup2 mount ({})", host.describe());
        return;
    };
    // A pure-v2 view of the unified mount: cgroup.freeze needs no controller.
    let controllers = cgroup::read_controllers(&unified).unwrap();
    let layout = CgroupLayout::V2 {
        root: unified.clone(),
        controllers,
    };
    let mut scratch = Scratch::new(&host, &["unified"], "v2freeze");
    let dir = scratch.dirs[0].clone();
    let pid = scratch.spawn("sh -c 'while :; do :; done'");
    let cgroup_ref = CgroupRef::of_pid(&layout, pid).unwrap();
    assert_eq!(cgroup_ref.v2.as_deref(), Some(dir.as_path()));
    let plan = cgroup::plan(&layout, &cgroup_ref, &FaultKind::Freeze).unwrap();
    assert_eq!(plan.writes, [(dir.join("cgroup.freeze"), "1".to_string())]);
    assert_eq!(plan.undo.writes[0].content, "0");
    cgroup::apply(&plan).unwrap();
    let verification = cgroup::verify(&plan.undo, &FaultKind::Freeze).unwrap();
    println!("v2 freeze verify: {verification:?}");
    assert!(verification.effective, "{verification:?}");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cpu_ticks(pid), before, "progress while frozen");
    cgroup::undo(&plan.undo).unwrap();
    assert_eq!(read(&dir.join("cgroup.freeze")), "0");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    assert!(cpu_ticks(pid) > before, "no progress after thaw");
}

#[test]
fn io_throttle_limits_direct_writes_on_the_root_disk() {
    let _serial = serial();
    let Some(layout) = v1_layout() else { return };
    let mut scratch = Scratch::new(&layout, &["blkio"], "blkio");
    let dir = scratch.dir("blkio").to_path_buf();
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    // A file on the root filesystem, whose disk the fault picks when no device is given.
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = work.path().join("dd.out");
    let direct = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=1M",
            "count=16",
            "oflag=direct",
        ])
        .output()
        .unwrap();
    if !direct.status.success() {
        eprintln!(
            "SKIPPED: O_DIRECT writes are not supported under /var/tmp here: {}",
            String::from_utf8_lossy(&direct.stderr)
        );
        return;
    }
    println!(
        "unthrottled: {}",
        String::from_utf8_lossy(&direct.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );

    let before = read(&dir.join("blkio.throttle.write_bps_device"));
    let bps: u64 = 4 << 20;
    let fault = FaultKind::IoThrottle {
        limits: IoLimits {
            write_bps: Some(bps),
            ..Default::default()
        },
    };
    let plan = cgroup::plan(&layout, &cgroup_ref, &fault).unwrap();
    println!("mechanism: {}", plan.mechanism);
    let device = plan.writes[0].1.split(' ').next().unwrap().to_string();
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(work.path()).unwrap().dev();
    let file_disk = format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    assert_eq!(
        device, file_disk,
        "the root disk is not /var/tmp's disk on this host"
    );
    cgroup::apply(&plan).unwrap();
    assert!(cgroup::verify(&plan.undo, &fault).unwrap().effective);

    let bytes: u64 = 12 << 20;
    let start = Instant::now();
    let output = scratch
        .command(&format!(
            "dd if=/dev/zero of={} bs=256k count={} oflag=direct",
            file.display(),
            bytes / (256 << 10)
        ))
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let measured = bytes as f64 / elapsed.as_secs_f64();
    println!(
        "throttled to {bps} B/s: {bytes} bytes in {elapsed:?} = {measured:.0} B/s ({:+.1}%)",
        (measured / bps as f64 - 1.0) * 100.0
    );
    assert!(
        (measured / bps as f64 - 1.0).abs() <= 0.25,
        "measured {measured:.0} B/s, set {bps}"
    );

    println!("undo: {}", cgroup::undo(&plan.undo).unwrap());
    assert_eq!(read(&dir.join("blkio.throttle.write_bps_device")), before);
}

#[test]
fn a_removed_cgroup_undoes_as_gone() {
    let _serial = serial();
    let Some(layout) = v1_layout() else { return };
    let plan;
    {
        let mut scratch = Scratch::new(&layout, &["pids"], "gone");
        let target = scratch.spawn("sleep 600");
        let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
        plan = cgroup::plan(&layout, &cgroup_ref, &FaultKind::PidsLimit { max: 50 }).unwrap();
        cgroup::apply(&plan).unwrap();
    } // The scratch cgroup is killed and removed here, as when a container is deleted.
    let report = cgroup::undo(&plan.undo).unwrap();
    assert!(report.starts_with("cgroup gone"), "{report}");
}
