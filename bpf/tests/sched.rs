//! Run-queue latency rising under CPU throttling, for real: a busy loop runs in a scratch cgroup
//! of the cpu controller's hierarchy, first unthrottled, then with its CFS quota at 10% of
//! the period. Throttled, the task waits runnable for most of each period, so its run-queue
//! latency must jump to the order of (period - quota), far above the unthrottled figure; the
//! cgroup's own `cpu.stat` must confirm the throttling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::ScratchCgroup;
use faultline_bpf::fallback::CpuStat;
use faultline_bpf::{
    Group, GroupState, HierarchyKind, Options, RunqTimestamps, SchedStats, Telemetry,
};

fn sched_of(t: &Telemetry, id: u64) -> SchedStats {
    let snap = t.snapshot().unwrap();
    snap.sched_for(id).cloned().unwrap_or(SchedStats {
        cgroup_id: id,
        ..SchedStats::default()
    })
}

#[test]
fn runq_latency_rises_when_the_cgroup_is_throttled_to_ten_percent() {
    // Auto: the kernel's sched_info timestamps where this kernel keeps them (it does here).
    throttled_cgroup_shows_runq_latency(RunqTimestamps::Auto);
}

#[test]
fn runq_latency_rises_under_throttling_with_timestamps_in_task_storage() {
    // The fallback for kernels without sched_info, forced here so it stays proven too.
    throttled_cgroup_shows_runq_latency(RunqTimestamps::Programs);
}

fn throttled_cgroup_shows_runq_latency(timestamps: RunqTimestamps) {
    if !common::bpf_available() {
        return;
    }
    let mut t = common::load_with(&Options {
        groups: vec![Group::Sched],
        runq_timestamps: timestamps,
        ..Options::default()
    });
    let status = t.status().iter().find(|s| s.group == Group::Sched).unwrap();
    let GroupState::Loaded { programs, notes } = &status.state else {
        panic!("{status}");
    };
    let task_storage = programs.contains(&"tp_btf/sched_wakeup");
    match timestamps {
        RunqTimestamps::Programs => assert!(task_storage, "{status}"),
        RunqTimestamps::Auto if !task_storage => {
            assert_eq!(programs, &["tp_btf/sched_switch"], "{status}");
            assert!(
                notes
                    .iter()
                    .any(|n| n.contains("kernel's sched_info timestamps")),
                "{status}"
            );
        }
        // Falling back is right only where the kernel lacks what the program needs; the
        // verifier refusing our own program is a bug this test must catch.
        RunqTimestamps::Auto => {
            assert!(
                !notes.iter().any(|n| n.contains("program was refused")),
                "{status}"
            );
            eprintln!("NOTE: this kernel has no usable sched_info: {status}");
        }
    }
    let hierarchy = t.hierarchy(Group::Sched).unwrap().clone();
    if !matches!(hierarchy.kind, HierarchyKind::V1(_)) {
        // The v2 cpu.max path is the agent's business; the programs are the same.
        eprintln!(
            "SKIPPED: the cpu controller is not mounted as cgroup v1 here ({})",
            hierarchy.kind
        );
        return;
    }
    let cg = ScratchCgroup::new(&hierarchy, "throttle");
    t.set_scope(&[&cg.path]).unwrap();
    let period_us: u64 = cg.read("cpu.cfs_period_us").parse().unwrap();
    let quota_us = period_us / 10;
    let window = Duration::from_secs(3);

    let child = cg.spawn("while :; do :; done");
    std::thread::sleep(Duration::from_millis(300));

    // Unthrottled.
    let s0 = sched_of(&t, cg.id);
    std::thread::sleep(window);
    let s1 = sched_of(&t, cg.id);
    // Throttled to 10%.
    cg.write("cpu.cfs_quota_us", &quota_us.to_string());
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = CpuStat::read(&cg.dir).unwrap();
    let s2 = sched_of(&t, cg.id);
    std::thread::sleep(window);
    let s3 = sched_of(&t, cg.id);
    let cpu1 = CpuStat::read(&cg.dir).unwrap();
    drop(child); // killed with the cgroup

    let free = s1.since(&s0);
    let throttled = s3.since(&s2);
    let fmt = |d: Option<Duration>| {
        d.map_or("-".to_owned(), |d| {
            format!("{:.3} ms", d.as_secs_f64() * 1e3)
        })
    };
    println!(
        "unthrottled: {} samples, p50 {}, p95 {}, {} switches ({} involuntary)",
        free.runq_latency.count,
        fmt(free.runq_latency.p50()),
        fmt(free.runq_latency.p95()),
        free.switches,
        free.involuntary_switches
    );
    println!(
        "quota {quota_us}/{period_us} us: {} samples, p50 {}, p95 {}, {} switches ({} involuntary)",
        throttled.runq_latency.count,
        fmt(throttled.runq_latency.p50()),
        fmt(throttled.runq_latency.p95()),
        throttled.switches,
        throttled.involuntary_switches
    );
    let nr_throttled = cpu1.nr_throttled - cpu0.nr_throttled;
    println!(
        "cpu.stat: {nr_throttled} periods throttled, {:?} throttled",
        cpu1.throttled - cpu0.throttled
    );

    // The cgroup really was throttled, in most periods of the window.
    let periods = window.as_micros() as u64 / period_us;
    assert!(
        nr_throttled >= periods / 2,
        "only {nr_throttled} of {periods} periods throttled"
    );
    // Each throttled period is one wait of up to (period - quota): at least that many samples,
    // and the 95th percentile of the order of that wait.
    assert!(
        throttled.runq_latency.count >= nr_throttled / 2,
        "{throttled:?}"
    );
    assert!(
        throttled.involuntary_switches >= nr_throttled / 2,
        "{throttled:?}"
    );
    let p95 = throttled.runq_latency.p95().unwrap();
    let wait = Duration::from_micros(period_us - quota_us);
    assert!(
        p95 >= wait / 2,
        "throttled p95 {p95:?} below half the throttled wait {wait:?}"
    );
    let free_p95 = free.runq_latency.p95().unwrap_or_default();
    assert!(
        p95 > free_p95 * 2,
        "throttled p95 {p95:?} not clearly above unthrottled {free_p95:?}"
    );
}
