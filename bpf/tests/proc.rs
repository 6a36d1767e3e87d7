//! Exec and exit of crashing processes: in a scratch cgroup, a shell execs `/bin/sh`, which
//! kills itself with SIGSEGV; another exits with status 7. The events must name each process,
//! its parent (this test), its cgroup and what `waitpid` reported for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::ScratchCgroup;
use faultline_bpf::{Exec, Exit, Group, TelemetryEvent};

fn events_of(events: &[TelemetryEvent], pid: u32) -> (Vec<&Exec>, Vec<&Exit>) {
    let execs = events
        .iter()
        .filter_map(|e| match e {
            TelemetryEvent::Exec(x) if x.pid == pid => Some(x),
            _ => None,
        })
        .collect();
    let exits = events
        .iter()
        .filter_map(|e| match e {
            TelemetryEvent::Exit(x) if x.pid == pid => Some(x),
            _ => None,
        })
        .collect();
    (execs, exits)
}

#[test]
fn exec_and_exit_of_crashing_processes_carry_code_signal_and_cgroup() {
    if !common::bpf_available() {
        return;
    }
    let mut t = common::load(&[Group::Proc]);
    let cg = ScratchCgroup::new(t.hierarchy(Group::Proc).unwrap(), "proc");
    t.set_scope(&[&cg.path]).unwrap();

    let crash = cg.spawn("exec /bin/sh -c 'kill -SEGV $$'");
    let crash_pid = crash.id();
    let (crash_status, _) = common::wait(crash, Duration::from_secs(20));
    let fail = cg.spawn("exec /bin/sh -c 'exit 7'");
    let fail_pid = fail.id();
    let (fail_status, _) = common::wait(fail, Duration::from_secs(20));
    assert_eq!(crash_status.signal(), Some(11));
    assert_eq!(fail_status.code(), Some(7));

    let events = common::collect_until(&mut t, Duration::from_secs(5), |ev| {
        !events_of(ev, crash_pid).1.is_empty() && !events_of(ev, fail_pid).1.is_empty()
    });
    for (pid, status) in [(crash_pid, crash_status), (fail_pid, fail_status)] {
        let (execs, exits) = events_of(&events, pid);
        println!("pid {pid}: {execs:?} {exits:?}");
        // Only the exec after the shell joined the scoped cgroup is seen, and one exit.
        assert_eq!(execs.len(), 1, "{events:#?}");
        assert_eq!(exits.len(), 1, "{events:#?}");
        let (exec, exit) = (execs[0], exits[0]);
        assert_eq!(exec.filename, "/bin/sh");
        assert_eq!(exec.comm, "sh");
        assert_eq!(exec.cgroup_id, cg.id);
        assert_eq!(exec.ppid, std::process::id());
        assert_eq!(exit.comm, "sh");
        assert_eq!(exit.cgroup_id, cg.id);
        assert_eq!(exit.ppid, std::process::id());
        assert_eq!(exit.code, status.code());
        assert_eq!(exit.signal, status.signal());
        assert_eq!(exit.core_dumped, status.core_dumped());
        assert!(exit.failed());
        assert!(exec.time <= exit.time);
    }
    // The scope filter kept everything else out.
    assert!(events.iter().all(|e| e.cgroup_id() == cg.id), "{events:#?}");
}
