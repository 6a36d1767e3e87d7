//! Every group loads and verifies on this kernel, and the API around loading behaves: an
//! unresolvable scope changes nothing, and the kernel's program list has every program each
//! group says it attached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use faultline_bpf::{BpfError, Group, GroupState, Options, Telemetry};

/// The tests of this file run one at a time: the link check counts this process's links.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn every_group_loads_and_reports_its_programs() {
    if !common::bpf_available() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut t = Telemetry::load(&Options::default()).unwrap();
    for s in t.status() {
        println!("{s}");
    }
    for g in Group::ALL {
        assert!(t.is_loaded(g), "{g} did not load: {:?}", t.status());
        assert!(t.hierarchy(g).is_some(), "{g} has no cgroup hierarchy");
    }

    // Each program a group lists is attached: the kernel's program list has as many of that
    // group's programs (named `fl_*`, within the kernel's 15 characters).
    let stats = t.program_stats().unwrap();
    for s in t.status() {
        let GroupState::Loaded { programs, .. } = &s.state else {
            continue;
        };
        let in_kernel: Vec<_> = stats.iter().filter(|p| p.group == s.group).collect();
        assert_eq!(in_kernel.len(), programs.len(), "{s}: {in_kernel:#?}");
        assert!(
            in_kernel.iter().all(|p| p.name.starts_with("fl_")),
            "{in_kernel:#?}"
        );
    }

    // A scope that cannot be resolved is refused as a whole.
    let err = t.set_scope(&["/faultline-bpf-no-such-cgroup"]).unwrap_err();
    assert!(matches!(err, BpfError::Io { .. }), "{err}");
    assert!(t.scope().is_empty());
    let snap = t.snapshot().unwrap();
    assert_eq!(snap.counters.len(), Group::ALL.len());
    assert!(snap.fallback.is_none());
}

/// Context switches counted so far, all cgroups together.
fn switches_counted(t: &Telemetry) -> u64 {
    t.snapshot().unwrap().sched.iter().map(|s| s.switches).sum()
}

/// A few hundred context switches: a byte bounced between two threads.
fn make_switches() {
    use std::io::{Read as _, Write as _};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        for _ in 0..200 {
            b.read_exact(&mut byte).unwrap();
            b.write_all(&byte).unwrap();
        }
    });
    let mut byte = [7u8; 1];
    for _ in 0..200 {
        a.write_all(&byte).unwrap();
        a.read_exact(&mut byte).unwrap();
    }
    echo.join().unwrap();
}

#[test]
fn detached_programs_count_nothing_and_attach_again_with_their_maps() {
    if !common::bpf_available() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut t = Telemetry::load(&Options {
        groups: vec![Group::Sched],
        ..Options::default()
    })
    .unwrap();
    assert!(t.is_loaded(Group::Sched), "{:?}", t.status());
    assert!(t.is_attached());
    make_switches();
    let attached = switches_counted(&t);
    assert!(
        attached >= 200,
        "{attached} switches counted while attached"
    );

    t.detach();
    assert!(!t.is_attached());
    make_switches();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let detached = switches_counted(&t);
    println!("attached: {attached}; after detaching and 400 more switches: {detached}");
    // Nothing ran: not one switch of this host was counted, and the maps kept what they had.
    assert_eq!(detached, attached);

    assert_eq!(bpf_links_open(), 0, "detached, yet links are open");

    t.attach().unwrap();
    let links = bpf_links_open();
    assert!(links >= 1, "attached, yet no link is open");
    t.attach().unwrap(); // already attached: no second link per program
    assert_eq!(bpf_links_open(), links);
    assert!(t.is_attached());
    make_switches();
    let again = switches_counted(&t);
    println!("attached again ({links} link(s)): {again}");
    assert!(again >= detached + 200, "{detached} -> {again}");
}

/// BPF links this process holds open (its file descriptors to `anon_inode:bpf_link`).
fn bpf_links_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf_link")
        })
        .count()
}
