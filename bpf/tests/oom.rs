//! An OOM kill, for real: `tail /dev/zero` (which buffers its whole input looking for lines)
//! runs in a scratch memory cgroup with a small limit until the OOM killer takes it. The OOM
//! event must name that process and cgroup, the exit event must show SIGKILL, and the cgroup's
//! own `oom_kill` counter must agree with the number of kill events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::ScratchCgroup;
use faultline_bpf::fallback::MemoryOom;
use faultline_bpf::{Group, HierarchyKind, TelemetryEvent};

#[test]
fn oom_kill_in_a_memory_limited_cgroup_names_the_victim() {
    if !common::bpf_available() {
        return;
    }
    let mut t = common::load(&[Group::Oom, Group::Proc]);
    let memory = t.hierarchy(Group::Oom).unwrap().clone();
    if !matches!(memory.kind, HierarchyKind::V1(_)) {
        eprintln!(
            "SKIPPED: the memory controller is not mounted as cgroup v1 here ({})",
            memory.kind
        );
        return;
    }
    let limit: u64 = 32 << 20;
    let cg = ScratchCgroup::new(&memory, "oom");
    cg.write("memory.limit_in_bytes", &limit.to_string());
    // Exit events are attributed in the proc group's hierarchy: the same cgroup if that is the
    // memory hierarchy, otherwise the test's own cgroup there.
    let proc_h = t.hierarchy(Group::Proc).unwrap().clone();
    let exit_cgroup = if proc_h == memory {
        cg.id
    } else {
        proc_h
            .id_of(proc_h.path_of_pid(std::process::id()).unwrap())
            .unwrap()
    };

    let child = cg.spawn("exec tail /dev/zero");
    let pid = child.id();
    let (status, _) = common::wait(child, Duration::from_secs(60));
    assert_eq!(status.signal(), Some(9), "tail was not killed: {status}");

    let events = common::collect_until(&mut t, Duration::from_secs(5), |ev| {
        ev.iter()
            .any(|e| matches!(e, TelemetryEvent::OomKill(k) if k.pid == pid))
            && ev
                .iter()
                .any(|e| matches!(e, TelemetryEvent::Exit(x) if x.pid == pid))
    });
    let kills: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TelemetryEvent::OomKill(k) if k.cgroup_id == cg.id => Some(k),
            _ => None,
        })
        .collect();
    let kill = kills
        .iter()
        .find(|k| k.pid == pid)
        .unwrap_or_else(|| panic!("no OomKill for pid {pid}: {events:#?}"));
    println!("event: {kill:?}");
    assert_eq!(kill.comm, "tail");
    assert_eq!(kill.cgroup_id, cg.id);
    assert_eq!(
        kill.trigger_pid, pid,
        "tail's own allocation triggered the kill"
    );
    // It was killed for holding about the limit.
    assert!(
        kill.total_vm >= limit / 2,
        "victim only had {} bytes",
        kill.total_vm
    );

    let exit = events
        .iter()
        .find_map(|e| match e {
            TelemetryEvent::Exit(x) if x.pid == pid => Some(x),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Exit for pid {pid}: {events:#?}"));
    println!("event: {exit:?}");
    assert_eq!((exit.signal, exit.code), (Some(9), None));
    assert_eq!(exit.cgroup_id, exit_cgroup);

    let counters = MemoryOom::read(&cg.dir).unwrap();
    println!("memory.oom_control: {counters:?}");
    assert_eq!(counters.oom_kills, kills.len() as u64);
}
