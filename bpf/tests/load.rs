//! Every group loads and verifies on this kernel, and the API around loading behaves: an
//! unresolvable scope changes nothing, and the kernel's program list has every program each
//! group says it attached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use faultline_bpf::{BpfError, Group, GroupState, Options, Telemetry};

#[test]
fn every_group_loads_and_reports_its_programs() {
    if !common::bpf_available() {
        return;
    }
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
