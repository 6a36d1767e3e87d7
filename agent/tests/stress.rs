//! Real stressors on this host (root). This test binary is its own stressor: `agent_exe` is
//! `current_exe()`, and `main` hands `__faultline-stress` invocations to the library's
//! `stress_main`, exactly as the agent's `main` does. That needs a `main` of our own, hence
//! `harness = false` (Cargo.toml) and the small runner below: tests run one at a time, each
//! catching its panic so the next still runs and guards still clean up.
//!
//! A second re-execution mode (env `FAULTLINE_STRESS_TEST_PARENT`) makes this binary a stand-in
//! agent that starts a stressor and exits, to show the stressor dies with its parent.
//!
//! Cleanup on every path: stressor guards kill by tag, scratch cgroups kill their members and
//! are removed, the tmpfs is unmounted — all in `Drop`.

// These are tests (clippy's allow-unwrap-in-tests only sees `#[test]` functions, which a
// `harness = false` binary has none of): a panic is the failure report we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use faultline_agent::cgroup::{self, CgroupLayout, CgroupRef, read_procs};
use faultline_agent::process::ProcessId;
use faultline_agent::stress::{self, StressorUndo};
use faultline_domain::fault::{FaultKind, FillAmount};
use support::Scratch;

const PARENT_ENV: &str = "FAULTLINE_STRESS_TEST_PARENT";

type Test = fn();

const TESTS: &[(&str, Test)] = &[
    (
        "cpu_hog_runs_inside_the_target_cgroup_and_undo_kills_it",
        cpu_hog_runs_inside_the_target_cgroup_and_undo_kills_it,
    ),
    (
        "a_stressor_dies_with_the_agent_that_started_it",
        a_stressor_dies_with_the_agent_that_started_it,
    ),
    (
        "memory_hog_in_a_memory_limited_cgroup_is_oom_killed",
        memory_hog_in_a_memory_limited_cgroup_is_oom_killed,
    ),
    (
        "io_hog_writes_are_charged_to_the_target_cgroup",
        io_hog_writes_are_charged_to_the_target_cgroup,
    ),
    (
        "disk_fill_to_half_of_a_small_tmpfs_and_undo_frees_it",
        disk_fill_to_half_of_a_small_tmpfs_and_undo_frees_it,
    ),
    (
        "sweep_kills_stressors_of_dead_tags_only",
        sweep_kills_stressors_of_dead_tags_only,
    ),
    (
        "a_stressor_that_cannot_join_its_cgroup_fails_apply_and_leaves_nothing",
        a_stressor_that_cannot_join_its_cgroup_fails_apply_and_leaves_nothing,
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if stress::is_stress_invocation(&args) {
        return stress::stress_main(&args);
    }
    if let Ok(spec) = std::env::var(PARENT_ENV) {
        return act_as_parent(&spec);
    }
    if args.iter().any(|arg| arg == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|arg| arg == "--ignored") {
        return ExitCode::SUCCESS; // none are ignored
    }
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let selected: Vec<&(&str, Test)> = TESTS
        .iter()
        .filter(|(name, _)| {
            filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str()))
        })
        .collect();
    println!("\nrunning {} tests (one at a time)", selected.len());
    let mut failed = Vec::new();
    for (name, test) in &selected {
        println!("--- {name}");
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(test);
        let verdict = if outcome.is_ok() { "ok" } else { "FAILED" };
        println!(
            "test {name} ... {verdict} ({:.1} s)",
            start.elapsed().as_secs_f64()
        );
        if outcome.is_err() {
            failed.push(*name);
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        for name in failed {
            println!("    {name}");
        }
        ExitCode::FAILURE
    }
}

// --- fixtures ---------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn layout() -> CgroupLayout {
    assert!(
        nix::unistd::geteuid().is_root(),
        "stressor tests need root (this project's machines run them as root)"
    );
    CgroupLayout::detect().unwrap()
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn tag(label: &str) -> String {
    format!("t{}-{label}", std::process::id())
}

/// Undoes a stressor on drop (kills by tag, removes files), whatever happened.
struct StressGuard(StressorUndo);

impl Drop for StressGuard {
    fn drop(&mut self) {
        let undo = self.0.clone();
        // Drop runs outside any runtime here (tests are synchronous): a small one is fine.
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            && let Err(err) = rt.block_on(stress::undo(&undo))
        {
            eprintln!("LEFT BEHIND? undo of {}: {err}", undo.tag);
        }
    }
}

/// A tmpfs mounted on a fresh temp dir; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap();
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if nix::mount::umount(self.dir.path()).is_err() {
            let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn cpu_percent(pid: u32, window: Duration) -> f64 {
    let hz = stress::procfs::ticks_per_second() as f64;
    let start = Instant::now();
    let before = stress::procfs::cpu_ticks(pid).unwrap();
    std::thread::sleep(window);
    let ticks = stress::procfs::cpu_ticks(pid).unwrap() - before;
    ticks as f64 / hz / start.elapsed().as_secs_f64() * 100.0
}

fn stat_value(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in {}", path.display()))
}

fn other_tags(mine: &[&str]) -> HashSet<String> {
    stress::list_stressors()
        .into_iter()
        .map(|found| found.tag)
        .filter(|tag| !mine.contains(&tag.as_str()))
        .collect()
}

// --- tests --------------------------------------------------------------------------------------

fn cpu_hog_runs_inside_the_target_cgroup_and_undo_kills_it() {
    let layout = layout();
    let rt = runtime();
    let mut scratch = Scratch::new(&layout, &["cpu", "memory"], "cpuhog");
    // Fixture: a high CPU weight, so parallel builds on this 2-CPU machine do not distort the
    // measured shares.
    std::fs::write(scratch.dir("cpu").join("cpu.shares"), "10240").unwrap();
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let tag = tag("cpu");
    let fault = FaultKind::CpuHog {
        workers: 1,
        load_percent: 100,
    };
    let mut plan = stress::plan(&fault, &cgroup_ref, target, &tag, &exe()).unwrap();
    println!("mechanism: {}", plan.mechanism);
    let _guard = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let id = plan.undo.processes[0].clone();
    assert!(
        read_procs(scratch.dir("cpu")).unwrap().contains(&id.pid),
        "not in the cpu cgroup"
    );
    assert!(
        read_procs(scratch.dir("memory")).unwrap().contains(&id.pid),
        "not in the memory cgroup"
    );
    let verification = rt
        .block_on(stress::verify(&plan.undo, &cgroup_ref))
        .unwrap();
    println!("verify: {verification:?}");
    assert!(verification.effective, "{verification:?}");
    let used = cpu_percent(id.pid, Duration::from_secs(1));
    println!("cpu-hog 1 worker at 100%: {used:.1}% CPU");
    assert!(used >= 50.0, "{used:.1}%");
    assert!(
        stress::list_stressors()
            .iter()
            .any(|found| found.tag == tag && found.kind == "cpu-hog")
    );

    let report = rt.block_on(stress::undo(&plan.undo)).unwrap();
    println!("undo: {report}");
    assert!(report.contains("killed"), "{report}");
    assert!(!id.is_alive());
    assert!(!read_procs(scratch.dir("cpu")).unwrap().contains(&id.pid));
    assert!(
        !rt.block_on(stress::verify(&plan.undo, &cgroup_ref))
            .unwrap()
            .effective
    );
    assert!(
        rt.block_on(stress::undo(&plan.undo))
            .unwrap()
            .starts_with("nothing left"),
        "idempotent"
    );

    // The duty cycle: one worker at 40%.
    let tag = self::tag("cpu40");
    let fault = FaultKind::CpuHog {
        workers: 1,
        load_percent: 40,
    };
    let mut plan = stress::plan(&fault, &cgroup_ref, target, &tag, &exe()).unwrap();
    let _guard40 = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let used = cpu_percent(plan.undo.processes[0].pid, Duration::from_secs(2));
    println!("cpu-hog 1 worker at 40%: {used:.1}% CPU");
    assert!((used - 40.0).abs() <= 10.0, "{used:.1}%");
    rt.block_on(stress::undo(&plan.undo)).unwrap();
}

/// Stand-in agent (re-executed with PARENT_ENV): starts a light cpu-hog, prints its identity
/// (pid, start time, comm), and exits at once.
fn act_as_parent(spec: &str) -> ExitCode {
    let (target, tag) = spec.split_once(' ').unwrap();
    let target: u32 = target.parse().unwrap();
    let layout = CgroupLayout::detect().unwrap();
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let fault = FaultKind::CpuHog {
        workers: 1,
        load_percent: 5,
    };
    let mut plan = stress::plan(&fault, &cgroup_ref, target, tag, &exe()).unwrap();
    runtime().block_on(stress::apply(&mut plan)).unwrap();
    let id = plan.undo.processes[0].clone();
    assert!(id.is_alive());
    println!("{} {} {}", id.pid, id.start_time, id.comm);
    std::io::stdout().flush().unwrap();
    // Exit without any cleanup, as a crashing agent would.
    std::process::exit(0);
}

fn a_stressor_dies_with_the_agent_that_started_it() {
    let layout = layout();
    let mut scratch = Scratch::new(&layout, &["cpu"], "pdeath");
    let target = scratch.spawn("sleep 600");
    let tag = tag("orphan");
    let _guard = StressGuard(StressorUndo {
        tag: tag.clone(),
        kind: "cpu-hog".into(),
        processes: vec![],
        files: vec![],
    });
    let mut parent = Command::new(exe())
        .env(PARENT_ENV, format!("{target} {tag}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let status = parent.wait().unwrap();
    assert!(status.success(), "stand-in agent failed: {status:?}");
    let mut fields = line.trim_end().splitn(3, ' ');
    let id = ProcessId {
        pid: fields.next().unwrap().parse().unwrap(),
        start_time: fields.next().unwrap().parse().unwrap(),
        comm: fields.next().unwrap().to_string(),
    };
    let start = Instant::now();
    let died = wait_for(Duration::from_secs(5), || !id.is_alive());
    println!(
        "stressor pid {} gone {:?} after its parent exited: {died}",
        id.pid,
        start.elapsed()
    );
    assert!(died, "the stressor outlived its agent");
    assert!(
        !stress::list_stressors()
            .iter()
            .any(|found| found.tag == tag)
    );
}

fn memory_hog_in_a_memory_limited_cgroup_is_oom_killed() {
    let layout = layout();
    let rt = runtime();
    let mut scratch = Scratch::new(&layout, &["memory"], "memhog");
    let dir = scratch.dir("memory").to_path_buf();
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let limit = FaultKind::MemoryLimit { bytes: 64 << 20 };
    let limit_plan = cgroup::plan(&layout, &cgroup_ref, &limit).unwrap();
    cgroup::apply(&limit_plan).unwrap();
    struct Restore(cgroup::CgroupUndo);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = cgroup::undo(&self.0);
        }
    }
    let _restore = Restore(limit_plan.undo.clone());

    // Within the limit: alive, and its memory is charged to the target's cgroup.
    let small = FaultKind::MemoryHog { bytes: 32 << 20 };
    let mut plan = stress::plan(&small, &cgroup_ref, target, &tag("mem32"), &exe()).unwrap();
    let _guard_small = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let charged = wait_for(Duration::from_secs(5), || {
        stat_value(&dir.join("memory.stat"), "rss ") >= 32 << 20
    });
    let usage = stat_value(&dir.join("memory.stat"), "rss ");
    println!(
        "memory-hog 32 MiB under a 64 MiB limit: cgroup rss {} MiB",
        usage >> 20
    );
    assert!(
        charged,
        "the hog's pages are not charged to the target cgroup"
    );
    assert!(
        rt.block_on(stress::verify(&plan.undo, &cgroup_ref))
            .unwrap()
            .effective
    );
    rt.block_on(stress::undo(&plan.undo)).unwrap();

    // Beyond the limit: the OOM killer takes the hog (the biggest task in the cgroup).
    let oom_before = stat_value(&dir.join("memory.oom_control"), "oom_kill");
    let big = FaultKind::MemoryHog { bytes: 256 << 20 };
    let mut plan = stress::plan(&big, &cgroup_ref, target, &tag("mem256"), &exe()).unwrap();
    let _guard_big = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let id = plan.undo.processes[0].clone();
    assert!(
        wait_for(Duration::from_secs(10), || !id.is_alive()),
        "the hog was not killed"
    );
    let oom_after = stat_value(&dir.join("memory.oom_control"), "oom_kill");
    assert!(wait_for(Duration::from_secs(2), || stress::exit_status(
        &id
    )
    .is_some()));
    let how = stress::exit_status(&id).unwrap();
    let verification = rt
        .block_on(stress::verify(&plan.undo, &cgroup_ref))
        .unwrap();
    println!(
        "memory-hog 256 MiB under 64 MiB: {how}; oom_kill {oom_before} -> {oom_after}; verify: {verification:?}"
    );
    assert!(how.contains("SIGKILL"), "{how}");
    assert!(oom_after > oom_before);
    assert!(
        !verification.effective && verification.detail.contains("SIGKILL"),
        "{verification:?}"
    );
    assert!(ProcessId::of(target).is_ok(), "the small target survives");
}

fn io_hog_writes_are_charged_to_the_target_cgroup() {
    let layout = layout();
    let rt = runtime();
    let mut scratch = Scratch::new(&layout, &["blkio"], "iohog");
    let dir = scratch.dir("blkio").to_path_buf();
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let written = |dir: &Path| -> u64 {
        std::fs::read_to_string(dir.join("blkio.throttle.io_service_bytes"))
            .unwrap()
            .lines()
            .filter(|line| line.split_whitespace().nth(1) == Some("Write"))
            .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok())
            .sum()
    };
    // Since Linux 6.9 the v1 blkio counters are only kept for a disk whose blk-throttle is
    // active, and it becomes active when some cgroup first sets a limit on that disk (before,
    // the test passed only when an earlier test had throttled the disk). A limit far above
    // what the disk can do turns the counting on without slowing anything.
    activate_blk_throttle(&dir, Path::new("/"));
    let before = written(&dir);
    let fault = FaultKind::IoHog { workers: 2 };
    let mut plan = stress::plan(&fault, &cgroup_ref, target, &tag("io"), &exe()).unwrap();
    println!("mechanism: {}", plan.mechanism);
    let _guard = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let verification = rt
        .block_on(stress::verify(&plan.undo, &cgroup_ref))
        .unwrap();
    assert!(verification.effective, "{verification:?}");
    std::thread::sleep(Duration::from_secs(2));
    let after = written(&dir);
    println!(
        "io-hog 2 workers: {} MiB written in the target's blkio cgroup in ~2 s",
        (after - before) >> 20
    );
    assert!(after - before >= 4 << 20, "{before} -> {after}");
    // The files were unlinked as soon as they were open: nothing to find on disk.
    for file in &plan.undo.files {
        assert!(!file.exists(), "{} still linked", file.display());
    }
    println!("undo: {}", rt.block_on(stress::undo(&plan.undo)).unwrap());
    assert!(!plan.undo.processes[0].is_alive());
}

/// Sets a write limit of 1 TiB/s in the v1 blkio cgroup `dir` on the whole disk holding
/// `path`, so that the kernel sets up blk-throttle on that disk and counts its IO per cgroup.
fn activate_blk_throttle(dir: &Path, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    // A partition's limits belong to its disk: /sys/dev/block/M:m/.. is the disk then.
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).unwrap();
    let disk = if sys.join("partition").exists() {
        sys.parent().unwrap().to_path_buf()
    } else {
        sys
    };
    let numbers = std::fs::read_to_string(disk.join("dev")).unwrap();
    let limit = format!("{} {}", numbers.trim(), 1u64 << 40);
    std::fs::write(dir.join("blkio.throttle.write_bps_device"), &limit)
        .unwrap_or_else(|err| panic!("setting {limit} in {}: {err}", dir.display()));
}

fn disk_fill_to_half_of_a_small_tmpfs_and_undo_frees_it() {
    let layout = layout();
    let rt = runtime();
    let tmpfs = Tmpfs::mount("64m");
    let me = std::process::id();
    let cgroup_ref = CgroupRef::of_pid(&layout, me).unwrap();
    let fault = FaultKind::DiskFill {
        path: Some(tmpfs.dir.path().display().to_string()),
        amount: FillAmount::Percent(50),
    };
    let tag = tag("fill");
    let mut plan = stress::plan(&fault, &cgroup_ref, me, &tag, &exe()).unwrap();
    println!("mechanism: {}", plan.mechanism);
    let _guard = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let usage = stress::Usage::of(tmpfs.dir.path()).unwrap();
    let verification = rt
        .block_on(stress::verify(&plan.undo, &cgroup_ref))
        .unwrap();
    println!(
        "filled: {:.1}% used; verify: {verification:?}",
        usage.percent()
    );
    assert!(
        (usage.percent() - 50.0).abs() <= 5.0,
        "{:.1}%",
        usage.percent()
    );
    assert!(verification.effective);
    assert!(
        tmpfs
            .dir
            .path()
            .join(format!(".faultline-fill-{tag}"))
            .exists()
    );
    println!("undo: {}", rt.block_on(stress::undo(&plan.undo)).unwrap());
    let usage = stress::Usage::of(tmpfs.dir.path()).unwrap();
    println!("after undo: {:.1}% used", usage.percent());
    assert!(usage.percent() < 1.0);
    assert!(
        !tmpfs
            .dir
            .path()
            .join(format!(".faultline-fill-{tag}"))
            .exists()
    );
    // Asking for more than there is fills what there is.
    let fault = FaultKind::DiskFill {
        path: Some(tmpfs.dir.path().display().to_string()),
        amount: FillAmount::Bytes(1 << 30),
    };
    let mut plan = stress::plan(&fault, &cgroup_ref, me, &self::tag("fill-all"), &exe()).unwrap();
    let _guard_all = StressGuard(plan.undo.clone());
    rt.block_on(stress::apply(&mut plan)).unwrap();
    let usage = stress::Usage::of(tmpfs.dir.path()).unwrap();
    println!("1 GiB asked of 64 MiB: {:.1}% used", usage.percent());
    assert!(usage.percent() > 99.0);
    rt.block_on(stress::undo(&plan.undo)).unwrap();
}

fn sweep_kills_stressors_of_dead_tags_only() {
    let layout = layout();
    let rt = runtime();
    let mut scratch = Scratch::new(&layout, &["cpu"], "sweep");
    let target = scratch.spawn("sleep 600");
    let cgroup_ref = CgroupRef::of_pid(&layout, target).unwrap();
    let live = tag("live");
    let dead = tag("dead");
    let fault = FaultKind::CpuHog {
        workers: 1,
        load_percent: 5,
    };
    let mut live_plan = stress::plan(&fault, &cgroup_ref, target, &live, &exe()).unwrap();
    let mut dead_plan = stress::plan(&fault, &cgroup_ref, target, &dead, &exe()).unwrap();
    let _guards = (
        StressGuard(live_plan.undo.clone()),
        StressGuard(dead_plan.undo.clone()),
    );
    rt.block_on(stress::apply(&mut live_plan)).unwrap();
    rt.block_on(stress::apply(&mut dead_plan)).unwrap();
    // Everything else running on this machine counts as live: only our dead tag may go.
    let mut keep = other_tags(&[&dead]);
    keep.insert(live.clone());
    let report = rt.block_on(stress::sweep(&keep)).unwrap();
    println!("sweep: {report:?}");
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(report[0].contains(&dead));
    assert!(!dead_plan.undo.processes[0].is_alive());
    assert!(live_plan.undo.processes[0].is_alive());
    // An undo journaled before apply (no pids) still finds its stressor by the tag.
    let journaled = StressorUndo {
        processes: vec![],
        ..live_plan.undo.clone()
    };
    let report = rt.block_on(stress::undo(&journaled)).unwrap();
    println!("undo by tag: {report}");
    assert!(report.contains("killed"));
    assert!(!live_plan.undo.processes[0].is_alive());
}

fn a_stressor_that_cannot_join_its_cgroup_fails_apply_and_leaves_nothing() {
    let layout = layout();
    let rt = runtime();
    let own = CgroupRef::of_pid(&layout, std::process::id()).unwrap();
    let mut gone = own.clone();
    let missing = own.dirs()[0].join(format!("faultline-no-such-{}", std::process::id()));
    gone.v1 = [("cpu".to_string(), missing)].into();
    gone.v2 = None;
    let tag = tag("nojoin");
    let fault = FaultKind::CpuHog {
        workers: 1,
        load_percent: 5,
    };
    let mut plan = stress::plan(&fault, &gone, std::process::id(), &tag, &exe()).unwrap();
    let _guard = StressGuard(plan.undo.clone());
    let err = rt.block_on(stress::apply(&mut plan)).unwrap_err();
    println!("apply: {err}");
    assert!(err.to_string().contains("joining"), "{err}");
    assert!(!plan.undo.processes[0].is_alive());
    assert!(
        !stress::list_stressors()
            .iter()
            .any(|found| found.tag == tag)
    );
}
