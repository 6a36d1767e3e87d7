//! TCP outcomes, provoked for real in scratch network namespaces: a connect to a closed port
//! (the peer answers RST: ECONNREFUSED) and a connect whose SYNs are dropped by iptables
//! (retransmitted, then ETIMEDOUT). The connecting process is `bash` (`/dev/tcp`), placed in a
//! scratch cgroup first; each test checks the event and the aggregates name that process, that
//! cgroup, the port, and the errno bash itself reported, and that the counts equal the
//! namespace's own `/proc/net/snmp` counters (nothing else runs in a scratch namespace).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Netns, ScratchCgroup};
use faultline_bpf::{ConnectFailed, Group, TelemetryEvent, libc_errno};

/// A port derived from the pid, so the assertions on it are not about a constant.
fn port(offset: u16) -> u16 {
    20000 + (std::process::id() % 20000) as u16 + offset
}

fn connect_failure(events: &[TelemetryEvent], pid: u32) -> Option<ConnectFailed> {
    events.iter().find_map(|e| match e {
        TelemetryEvent::ConnectFailed(c) if c.pid == pid => Some(c.clone()),
        _ => None,
    })
}

#[test]
fn connect_to_a_closed_port_is_refused_with_attribution() {
    if !common::bpf_available() {
        return;
    }
    let mut t = common::load(&[Group::Tcp]);
    let cg = ScratchCgroup::new(t.hierarchy(Group::Tcp).unwrap(), "refused");
    let ns = Netns::new("refused");
    let port = port(0);
    let remote: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let child = cg.spawn(&format!(
        "exec ip netns exec {} bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}'",
        ns.name
    ));
    let pid = child.id();
    let (status, stderr) = common::wait(child, Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("Connection refused"), "bash said: {stderr}");

    let events = common::collect_until(&mut t, Duration::from_secs(5), |ev| {
        connect_failure(ev, pid).is_some()
    });
    let failed = connect_failure(&events, pid)
        .unwrap_or_else(|| panic!("no ConnectFailed for pid {pid} in {events:#?}"));
    println!("event: {failed:?}");
    assert_eq!(failed.errno, libc_errno::ECONNREFUSED);
    assert_eq!(failed.comm, "bash");
    assert_eq!(failed.cgroup_id, cg.id);
    assert_eq!(failed.remote, Some(remote));
    assert_eq!(failed.local.map(|l| l.ip()), Some(remote.ip()));
    assert_ne!(
        failed.local.map(|l| l.port()),
        Some(0),
        "local port not recorded"
    );

    let snap = t.snapshot().unwrap();
    let kernel = ns.snmp();
    let row = snap
        .tcp_to(cg.id, remote)
        .unwrap_or_else(|| panic!("no TCP row for ({}, {remote}) in {:#?}", cg.id, snap.tcp));
    println!(
        "aggregate: {row:?}; unsolicited resets: {}",
        snap.tcp_unsolicited_resets
    );
    println!("namespace snmp: {kernel:?}");
    assert_eq!(row.connect_failed_with(libc_errno::ECONNREFUSED), 1);
    assert_eq!(row.connect_failures(), kernel.attempt_fails);
    assert_eq!(row.active_established, 0);
    assert_eq!(row.resets_received, 1, "the RST was not counted: {row:?}");
    // The other side of a closed port: the kernel answered the SYN without a socket.
    assert!(kernel.out_rsts >= 1);
    assert!(snap.tcp_unsolicited_resets >= kernel.out_rsts);
    assert_eq!(snap.counters[&Group::Tcp].ringbuf_drops, 0);
}

#[test]
fn dropped_syns_are_retransmitted_then_time_out() {
    if !common::bpf_available() {
        return;
    }
    // One SYN retransmission, then ETIMEDOUT: about 3 s (RTO 1 s, doubled).
    const SYN_RETRIES: u64 = 1;
    let mut t = common::load(&[Group::Tcp]);
    let cg = ScratchCgroup::new(t.hierarchy(Group::Tcp).unwrap(), "timeout");
    // Only this cgroup is counted from here on.
    t.set_scope(&[&cg.path]).unwrap();
    let ns = Netns::new("timeout");
    let port = port(1);
    let remote: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    ns.exec(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.tcp_syn_retries={SYN_RETRIES}"),
    ]);
    // Drop on the receiving side (INPUT), so the sender's SYNs leave normally.
    ns.exec(&[
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "-j",
        "DROP",
    ]);

    let before = t.snapshot().unwrap();
    let child = cg.spawn(&format!(
        "exec ip netns exec {} bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}'",
        ns.name
    ));
    let pid = child.id();
    let (status, stderr) = common::wait(child, Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        stderr.contains("Connection timed out"),
        "bash said: {stderr}"
    );

    let events = common::collect_until(&mut t, Duration::from_secs(5), |ev| {
        connect_failure(ev, pid).is_some()
    });
    let failed = connect_failure(&events, pid)
        .unwrap_or_else(|| panic!("no ConnectFailed for pid {pid} in {events:#?}"));
    println!("event: {failed:?}");
    assert_eq!(failed.errno, libc_errno::ETIMEDOUT);
    assert_eq!(failed.comm, "bash");
    assert_eq!(failed.cgroup_id, cg.id);
    assert_eq!(failed.remote, Some(remote));
    // At least the initial RTO passed before the retransmission, and the timeout after it.
    assert!(failed.elapsed >= Duration::from_secs(1), "{failed:?}");

    let after = t.snapshot().unwrap();
    let row = after
        .tcp_to(cg.id, remote)
        .unwrap_or_else(|| panic!("no TCP row for ({}, {remote}) in {:#?}", cg.id, after.tcp));
    println!("aggregate: {row:?}");
    let kernel = ns.snmp();
    println!("namespace snmp: {kernel:?}");
    // The kernel's own count of retransmitted segments in this namespace (the only traffic
    // there) must match; at least tcp_syn_retries of them (6.x may retry once more while the
    // timeout, computed in time, has not quite expired).
    assert_eq!(row.syn_retransmits, kernel.retrans_segs);
    assert_eq!(row.retransmits, kernel.retrans_segs);
    assert!(row.syn_retransmits >= SYN_RETRIES);
    assert_eq!(row.connect_failed_with(libc_errno::ETIMEDOUT), 1);
    assert_eq!(row.connect_failures(), kernel.attempt_fails);
    assert_eq!(row.active_established, 0);

    // The scope filter: whatever changed during the test belongs to the scoped cgroup.
    for now in &after.tcp {
        let then = before.tcp.iter().find(|b| b.same_key(now));
        let changed = then.is_none_or(|then| !now.since(then).is_zero());
        assert!(
            !changed || now.cgroup_id == cg.id,
            "out-of-scope row changed: {now:?}"
        );
    }
    assert!(
        events.iter().all(|e| e.cgroup_id() == cg.id),
        "out-of-scope events: {events:#?}"
    );
}

#[test]
fn reset_of_an_established_connection_is_an_econnreset_for_both_owners() {
    if !common::bpf_available() {
        return;
    }
    use std::io::{Read as _, Write as _};
    let mut t = common::load(&[Group::Tcp]);
    let hierarchy = t.hierarchy(Group::Tcp).unwrap().clone();
    // Both ends belong to this test process: the client by connect(), the accepted socket by
    // inheritance from the listener.
    let own = hierarchy
        .id_of(hierarchy.path_of_pid(std::process::id()).unwrap())
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = listener.local_addr().unwrap();
    let mut client = std::net::TcpStream::connect(server_addr).unwrap();
    let client_addr = client.local_addr().unwrap();
    let (server, _) = listener.accept().unwrap();
    client.write_all(b"unread").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // Closing with unread data makes the kernel reset the connection.
    drop(server);
    let err = client.read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_errno::ECONNRESET));
    drop(client);

    let pid = std::process::id();
    let events = common::collect_until(&mut t, Duration::from_secs(5), |ev| {
        ev.iter().any(
            |e| matches!(e, TelemetryEvent::ConnectionError(c) if c.remote == Some(server_addr)),
        )
    });
    let reset = events
        .iter()
        .find_map(|e| match e {
            TelemetryEvent::ConnectionError(c) if c.remote == Some(server_addr) => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ConnectionError towards {server_addr}: {events:#?}"));
    println!("event: {reset:?}");
    assert_eq!(reset.errno, libc_errno::ECONNRESET);
    assert_eq!((reset.pid, reset.cgroup_id), (pid, own));
    assert_eq!(reset.local, Some(client_addr));
    assert_eq!(reset.state, 1, "reset while ESTABLISHED");

    let snap = t.snapshot().unwrap();
    let client_row = snap
        .tcp_to(own, server_addr)
        .unwrap_or_else(|| panic!("no client row: {:#?}", snap.tcp));
    let server_row = snap
        .tcp_inbound(own, server_addr.port())
        .find(|r| r.peer == Some(client_addr.ip()))
        .unwrap_or_else(|| panic!("no server row: {:#?}", snap.tcp));
    println!("client side: {client_row:?}\nserver side: {server_row:?}");
    assert_eq!(client_row.active_established, 1);
    assert_eq!(client_row.resets_received, 1);
    assert_eq!(
        client_row.connection_errors.get(&libc_errno::ECONNRESET),
        Some(&1)
    );
    assert_eq!(server_row.passive_established, 1);
    assert_eq!(server_row.resets_sent, 1);
}
