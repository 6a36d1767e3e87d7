//! Firewall faults against the real kernel, as root: every test makes its own pair of network
//! namespaces joined by a veth pair (A = 10.251.0.1, the peer; B = 10.251.0.2, the target),
//! applies the fault inside B and measures from A. Traffic never leaves these namespaces.
//! Measurements use in-process probes (TCP connects, UDP echo), so no `ping`/`nc` is needed;
//! sockets are created on a thread that entered the namespace, and stay in it.
//!
//! Skipped (with a note) when not root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultline_agent::net::delay::{self, DelayDaemon};
use faultline_agent::net::firewall::{
    self, FirewallBackend, FirewallCaps, FirewallFault, FirewallUndo,
};
use faultline_agent::net::tag_for;
use faultline_agent::sys::command::HostRunner;
use faultline_agent::sys::netns::Netns;
use faultline_domain::fault::{Direction, NetScope, PartitionMode, Protocol};

const A_IP: &str = "10.251.0.1";
const B_IP: &str = "10.251.0.2";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (network namespaces and firewall rules)");
            return;
        }
    };
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn netns_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Two namespaces joined by a veth pair; deleted on drop, even when the test panics.
struct Pair {
    names: Vec<String>,
    a: Netns,
    b: Netns,
}

impl Pair {
    fn new() -> Pair {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let a_name = format!("flt-fw-a-{pid}-{n}");
        let b_name = format!("flt-fw-b-{pid}-{n}");
        let mut guard = Guard { names: Vec::new() };
        for name in [&a_name, &b_name] {
            ip(&["netns", "add", name]);
            guard.names.push(name.clone());
        }
        ip(&[
            "-n", &a_name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
            "netns", &b_name,
        ]);
        ip(&[
            "-n",
            &a_name,
            "addr",
            "add",
            &format!("{A_IP}/30"),
            "dev",
            "veth0",
        ]);
        ip(&[
            "-n",
            &b_name,
            "addr",
            "add",
            &format!("{B_IP}/30"),
            "dev",
            "veth1",
        ]);
        for (ns, dev) in [(&a_name, "veth0"), (&b_name, "veth1")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let a = Netns::named(&a_name).unwrap();
        let b = Netns::named(&b_name).unwrap();
        let names = std::mem::take(&mut guard.names);
        Pair { names, a, b }
    }

    /// Deletes the namespaces now and checks they are gone.
    fn close(mut self) {
        delete_netns(&self.names);
        let left = netns_names();
        for name in std::mem::take(&mut self.names) {
            assert!(!left.contains(&name), "netns {name} left behind");
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        delete_netns(&self.names);
    }
}

struct Guard {
    names: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        delete_netns(&self.names);
    }
}

fn delete_netns(names: &[String]) {
    for name in names {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}

/// Runs `f` on a thread inside `netns` (sockets it makes live there).
fn in_ns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_current_thread().unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn caps(backend: FirewallBackend) -> FirewallCaps {
    FirewallCaps {
        backend: Some(backend),
        statistic: true,
        nfqueue: true,
        reject_tcp_reset: true,
        detail: "test".into(),
    }
}

fn new_tag(what: &str) -> String {
    tag_for(&format!(
        "net-firewall-test/{}/{what}/{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ))
}

async fn apply(
    fault: FirewallFault<'_>,
    netns: &Netns,
    tag: &str,
    backend: FirewallBackend,
) -> FirewallUndo {
    let plan = firewall::plan(&fault, netns, tag, &caps(backend), &[]).unwrap();
    eprintln!("{tag}: {}", plan.mechanism);
    firewall::apply(&HostRunner, &plan).await.unwrap();
    plan.undo
}

/// Outcome of one TCP connect attempt.
#[derive(Debug, PartialEq, Eq)]
enum Connect {
    Ok,
    TimedOut,
    Refused,
    Other(ErrorKind),
}

fn connect(from: &Netns, to: SocketAddr, timeout: Duration) -> (Connect, Duration) {
    in_ns(from, || {
        let started = Instant::now();
        let result = match TcpStream::connect_timeout(&to, timeout) {
            Ok(_) => Connect::Ok,
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
                Connect::TimedOut
            }
            Err(e)
                if e.kind() == ErrorKind::ConnectionRefused
                    || e.kind() == ErrorKind::ConnectionReset =>
            {
                Connect::Refused
            }
            Err(e) => Connect::Other(e.kind()),
        };
        (result, started.elapsed())
    })
}

fn listen(netns: &Netns, ip: &str) -> TcpListener {
    in_ns(netns, || TcpListener::bind((ip, 0)).unwrap())
}

/// A UDP echo server on a socket inside some namespace; stops on drop.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(netns: &Netns, addr: &str) -> Echo {
        let socket = in_ns(netns, || UdpSocket::bind(addr).unwrap());
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Result of a probe run: like `ping -c N -i I`, over UDP echo.
#[derive(Debug)]
struct Probe {
    sent: u32,
    received: u32,
    avg_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

impl Probe {
    fn loss_percent(&self) -> f64 {
        100.0 * f64::from(self.sent - self.received) / f64::from(self.sent)
    }
}

/// Sends `count` numbered datagrams `interval` apart from `from` to `to` and times the echoes.
fn probe(from: &Netns, to: SocketAddr, count: u32, interval: Duration) -> Probe {
    let socket = in_ns(from, || UdpSocket::bind((A_IP, 0)).unwrap());
    socket.connect(to).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let receiver = socket.try_clone().unwrap();
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let done_flag = Arc::clone(&done);
    let collector = std::thread::spawn(move || {
        let mut rtts: Vec<(u32, f64)> = Vec::new();
        let mut buf = [0u8; 64];
        let mut quiet_since: Option<Instant> = None;
        loop {
            match receiver.recv(&mut buf) {
                Ok(n) if n >= 12 => {
                    let seq = u32::from_be_bytes(buf[0..4].try_into().unwrap());
                    let sent_us = u64::from_be_bytes(buf[4..12].try_into().unwrap());
                    let now_us = started.elapsed().as_micros() as u64;
                    rtts.push((seq, (now_us - sent_us) as f64 / 1000.0));
                    quiet_since = None;
                }
                _ => {
                    if done_flag.load(Ordering::Relaxed) {
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(600) {
                            break;
                        }
                    }
                }
            }
        }
        rtts
    });
    for seq in 0..count {
        let mut msg = seq.to_be_bytes().to_vec();
        msg.extend_from_slice(&(started.elapsed().as_micros() as u64).to_be_bytes());
        let _ = socket.send(&msg);
        std::thread::sleep(interval);
    }
    done.store(true, Ordering::Relaxed);
    let rtts = collector.join().unwrap();
    let unique: HashSet<u32> = rtts.iter().map(|(s, _)| *s).collect();
    let values: Vec<f64> = rtts.iter().map(|(_, r)| *r).collect();
    let avg = if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    };
    Probe {
        sent: count,
        received: unique.len() as u32,
        avg_ms: avg,
        min_ms: values.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms: values.iter().copied().fold(0.0, f64::max),
    }
}

/// One request over UDP from `from` to `to`: Ok(true) echoed, Ok(false) nothing within
/// `wait`, Err(kind) when the socket reports an error (ICMP unreachable → ConnectionRefused).
fn udp_once(
    from: &Netns,
    local_ip: &str,
    to: SocketAddr,
    wait: Duration,
) -> Result<bool, ErrorKind> {
    in_ns(from, || {
        let socket = UdpSocket::bind((local_ip, 0)).unwrap();
        socket.connect(to).unwrap();
        socket.set_read_timeout(Some(wait)).unwrap();
        socket.send(b"query").map_err(|e| e.kind())?;
        let mut buf = [0u8; 64];
        match socket.recv(&mut buf) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                Ok(false)
            }
            Err(e) => Err(e.kind()),
        }
    })
}

fn nft_tables(netns: &Netns) -> String {
    in_ns_command(netns, "nft", &["list", "tables"])
}

fn in_ns_command(netns: &Netns, program: &str, args: &[&str]) -> String {
    let path = netns.path.to_string_lossy().to_string();
    let name = path.rsplit('/').next().unwrap().to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &name, program])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// No table or chain of ours left in `netns`.
fn assert_clean(netns: &Netns) {
    let tables = nft_tables(netns);
    assert!(!tables.contains("flt"), "nft tables left: {tables}");
    for program in [
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        for table in ["filter", "mangle"] {
            let rules = in_ns_command(netns, program, &["-w", "5", "-t", table, "-S"]);
            assert!(
                !rules.contains("flt"),
                "{program} {table} still has: {rules}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// 1. partition: drop times out, reject refuses at once; undo restores
// ------------------------------------------------------------------------------------------

async fn partition_drop_and_reject(backend: FirewallBackend) {
    let pair = Pair::new();
    let listener = listen(&pair.b, B_IP);
    let target = listener.local_addr().unwrap();
    assert_eq!(
        connect(&pair.a, target, Duration::from_secs(1)).0,
        Connect::Ok
    );

    let all = NetScope::default();
    let tag = new_tag("partition-drop");
    let undo = apply(
        FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    let (result, took) = connect(&pair.a, target, Duration::from_millis(800));
    assert_eq!(
        result,
        Connect::TimedOut,
        "{backend}: drop should time out (took {took:?})"
    );
    let verification = firewall::verify(&HostRunner, &undo).await.unwrap();
    assert!(verification.effective, "{}", verification.detail);
    assert!(
        !verification.detail.contains("total: 0 packets"),
        "{}",
        verification.detail
    );
    eprintln!("{backend} drop verify: {}", verification.detail);
    let text = firewall::undo(&HostRunner, &undo).await.unwrap();
    assert!(text.contains("deleted"), "{text}");
    assert_eq!(
        connect(&pair.a, target, Duration::from_secs(1)).0,
        Connect::Ok,
        "{backend}: after undo"
    );

    let tag = new_tag("partition-reject");
    let undo = apply(
        FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Reject,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    let (result, took) = connect(&pair.a, target, Duration::from_secs(3));
    assert_eq!(result, Connect::Refused, "{backend}: reject should refuse");
    assert!(
        took < Duration::from_secs(1),
        "{backend}: reject took {took:?}"
    );
    firewall::undo(&HostRunner, &undo).await.unwrap();
    assert_eq!(
        connect(&pair.a, target, Duration::from_secs(1)).0,
        Connect::Ok
    );
    eprintln!("{backend}: drop timed out, reject refused in {took:?}");
    assert_clean(&pair.b);
    pair.close();
}

#[tokio::test]
async fn partition_nft() {
    require_root!();
    partition_drop_and_reject(FirewallBackend::Nft).await;
}

#[tokio::test]
async fn partition_iptables_nft() {
    require_root!();
    partition_drop_and_reject(FirewallBackend::IptablesNft).await;
}

#[tokio::test]
async fn partition_iptables_legacy() {
    require_root!();
    partition_drop_and_reject(FirewallBackend::IptablesLegacy).await;
}

// ------------------------------------------------------------------------------------------
// 2. port-scoped partition: P blocked, Q open
// ------------------------------------------------------------------------------------------

async fn port_scoped(backend: FirewallBackend) {
    let pair = Pair::new();
    let blocked = listen(&pair.b, B_IP);
    let open = listen(&pair.b, B_IP);
    let p = blocked.local_addr().unwrap();
    let q = open.local_addr().unwrap();
    let scope = NetScope {
        ports: vec![p.port()],
        ..NetScope::default()
    };
    let tag = new_tag("port-scoped");
    let undo = apply(
        FirewallFault::Partition {
            scope: &scope,
            mode: PartitionMode::Drop,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    assert_eq!(
        connect(&pair.a, p, Duration::from_millis(700)).0,
        Connect::TimedOut,
        "{backend}: port {p}"
    );
    assert_eq!(
        connect(&pair.a, q, Duration::from_secs(1)).0,
        Connect::Ok,
        "{backend}: port {q}"
    );
    firewall::undo(&HostRunner, &undo).await.unwrap();
    assert_eq!(connect(&pair.a, p, Duration::from_secs(1)).0, Connect::Ok);
    assert_clean(&pair.b);
    pair.close();
}

#[tokio::test]
async fn port_scoped_partition_nft() {
    require_root!();
    port_scoped(FirewallBackend::Nft).await;
}

#[tokio::test]
async fn port_scoped_partition_iptables_legacy() {
    require_root!();
    port_scoped(FirewallBackend::IptablesLegacy).await;
}

// ------------------------------------------------------------------------------------------
// 3. loss 30% on ingress
// ------------------------------------------------------------------------------------------

async fn loss_30(backend: FirewallBackend) {
    let pair = Pair::new();
    let echo = Echo::start(&pair.b, &format!("{B_IP}:0"));
    let scope = NetScope::default();
    let tag = new_tag("loss");
    let undo = apply(
        FirewallFault::Loss {
            scope: &scope,
            basis_points: 3000,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    let during = probe(&pair.a, echo.addr, 200, Duration::from_millis(10));
    let verification = firewall::verify(&HostRunner, &undo).await.unwrap();
    assert!(verification.effective, "{}", verification.detail);
    firewall::undo(&HostRunner, &undo).await.unwrap();
    let after = probe(&pair.a, echo.addr, 200, Duration::from_millis(10));
    eprintln!(
        "{backend} loss 30%: measured {:.1}% ({}/{}), after undo {:.1}%; {}",
        during.loss_percent(),
        during.received,
        during.sent,
        after.loss_percent(),
        verification.detail
    );
    assert!(
        (20.0..=40.0).contains(&during.loss_percent()),
        "{backend}: {during:?}"
    );
    assert!(
        after.loss_percent() <= 2.0,
        "{backend}: after undo {after:?}"
    );
    drop(echo);
    assert_clean(&pair.b);
    pair.close();
}

#[tokio::test]
async fn loss_nft() {
    require_root!();
    loss_30(FirewallBackend::Nft).await;
}

#[tokio::test]
async fn loss_iptables_legacy() {
    require_root!();
    loss_30(FirewallBackend::IptablesLegacy).await;
}

// ------------------------------------------------------------------------------------------
// 4. DNS: the target's UDP (and TCP) to port 53 dropped / rejected, other ports unaffected
// ------------------------------------------------------------------------------------------

async fn dns(backend: FirewallBackend) {
    let pair = Pair::new();
    // A plays the resolver: UDP echo on 53, TCP listener on 53; plus an echo on another port.
    let resolver = Echo::start(&pair.a, &format!("{A_IP}:53"));
    let other = Echo::start(&pair.a, &format!("{A_IP}:0"));
    let tcp53 = in_ns(&pair.a, || TcpListener::bind((A_IP, 53)).unwrap());
    let wait = Duration::from_millis(400);
    assert_eq!(udp_once(&pair.b, B_IP, resolver.addr, wait), Ok(true));

    let tag = new_tag("dns-drop");
    let undo = apply(
        FirewallFault::Dns {
            mode: PartitionMode::Drop,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    // Dropped on the target's output: the local sender sees EPERM or simply no answer.
    let dropped = udp_once(&pair.b, B_IP, resolver.addr, wait);
    assert!(
        matches!(dropped, Ok(false) | Err(ErrorKind::PermissionDenied)),
        "{backend}: udp 53 should be dropped: {dropped:?}"
    );
    assert_eq!(
        udp_once(&pair.b, B_IP, other.addr, wait),
        Ok(true),
        "{backend}: other ports unaffected"
    );
    assert_eq!(
        connect(
            &pair.b,
            tcp53.local_addr().unwrap(),
            Duration::from_millis(500)
        )
        .0,
        Connect::TimedOut
    );
    let verification = firewall::verify(&HostRunner, &undo).await.unwrap();
    assert!(
        verification.effective && !verification.detail.contains("total: 0 packets"),
        "{}",
        verification.detail
    );
    eprintln!("{backend} dns drop: {}", verification.detail);
    firewall::undo(&HostRunner, &undo).await.unwrap();
    assert_eq!(
        udp_once(&pair.b, B_IP, resolver.addr, wait),
        Ok(true),
        "{backend}: after undo"
    );

    let tag = new_tag("dns-reject");
    let undo = apply(
        FirewallFault::Dns {
            mode: PartitionMode::Reject,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    // Rejected: an error at once (EPERM from the send, or the ICMP unreachable as ECONNREFUSED).
    let started = Instant::now();
    let rejected = udp_once(&pair.b, B_IP, resolver.addr, wait);
    assert!(
        matches!(
            rejected,
            Err(ErrorKind::PermissionDenied | ErrorKind::ConnectionRefused)
        ),
        "{backend}: udp 53 should be rejected: {rejected:?}"
    );
    assert!(
        started.elapsed() < wait,
        "{backend}: reject took {:?}",
        started.elapsed()
    );
    let (result, took) = connect(&pair.b, tcp53.local_addr().unwrap(), Duration::from_secs(2));
    assert_eq!(result, Connect::Refused);
    assert!(took < Duration::from_secs(1));
    firewall::undo(&HostRunner, &undo).await.unwrap();
    assert_eq!(udp_once(&pair.b, B_IP, resolver.addr, wait), Ok(true));
    drop((resolver, other, tcp53));
    assert_clean(&pair.b);
    pair.close();
}

#[tokio::test]
async fn dns_nft() {
    require_root!();
    dns(FirewallBackend::Nft).await;
}

#[tokio::test]
async fn dns_iptables_nft() {
    require_root!();
    dns(FirewallBackend::IptablesNft).await;
}

// ------------------------------------------------------------------------------------------
// 5. delay fallback via NFQUEUE: +100 ms, back to baseline; daemon gone → bypass
// ------------------------------------------------------------------------------------------

async fn delay_fallback(backend: FirewallBackend) {
    let pair = Pair::new();
    let echo = Echo::start(&pair.b, &format!("{B_IP}:0"));
    let count = 20;
    let interval = Duration::from_millis(50);
    let baseline = probe(&pair.a, echo.addr, count, interval);
    assert_eq!(baseline.received, count, "{baseline:?}");

    let tag = new_tag("delay");
    let queue = delay::queue_for(&tag);
    let daemon =
        DelayDaemon::start(&pair.b, queue, Duration::from_millis(100), Duration::ZERO).unwrap();
    delay::registry().insert(tag.clone(), daemon);
    let scope = NetScope::default();
    let undo = apply(
        FirewallFault::Delay {
            scope: &scope,
            queue,
        },
        &pair.b,
        &tag,
        backend,
    )
    .await;
    assert_eq!(undo.queue, Some(queue));
    let delayed = probe(&pair.a, echo.addr, count, interval);
    let verification = firewall::verify(&HostRunner, &undo).await.unwrap();
    assert!(verification.effective, "{}", verification.detail);
    let added = delayed.avg_ms - baseline.avg_ms;
    eprintln!(
        "{backend} delay 100 ms: baseline {:.3} ms, delayed avg {:.2} ms (min {:.2}, max {:.2}), added {added:.2} ms; {}",
        baseline.avg_ms, delayed.avg_ms, delayed.min_ms, delayed.max_ms, verification.detail
    );
    assert_eq!(delayed.received, count, "{delayed:?}");
    assert!(
        (90.0..=110.0).contains(&added),
        "{backend}: added {added} ms"
    );

    // Jitter: 50 ± 20 ms, uniform; order kept within the flow.
    let jittery = DelayDaemon::start(
        &pair.b,
        queue,
        Duration::from_millis(50),
        Duration::from_millis(20),
    );
    assert!(
        jittery.is_err(),
        "the queue is still bound to the first daemon"
    );
    assert!(delay::registry().remove(&tag));
    let daemon = DelayDaemon::start(
        &pair.b,
        queue,
        Duration::from_millis(50),
        Duration::from_millis(20),
    )
    .unwrap();
    delay::registry().insert(tag.clone(), daemon);
    let jittered = probe(&pair.a, echo.addr, count, interval);
    eprintln!(
        "{backend} delay 50±20 ms: avg {:.2} ms (min {:.2}, max {:.2})",
        jittered.avg_ms, jittered.min_ms, jittered.max_ms
    );
    assert_eq!(jittered.received, count);
    assert!(
        (38.0..=62.0).contains(&(jittered.avg_ms - baseline.avg_ms)),
        "{jittered:?}"
    );
    assert!(
        jittered.max_ms - jittered.min_ms > 5.0,
        "no spread: {jittered:?}"
    );

    // Kill the daemon while the rules stay: --queue-bypass keeps traffic flowing.
    assert!(delay::registry().remove(&tag));
    let bypassed = probe(&pair.a, echo.addr, count, interval);
    let verification = firewall::verify(&HostRunner, &undo).await.unwrap();
    assert!(
        !verification.effective && verification.detail.contains("bypassed"),
        "{}",
        verification.detail
    );
    eprintln!(
        "{backend} daemon gone, rules kept: {} of {} echoed, avg {:.3} ms",
        bypassed.received, count, bypassed.avg_ms
    );
    assert_eq!(bypassed.received, count, "{bypassed:?}");
    assert!(bypassed.avg_ms < 10.0, "{bypassed:?}");

    firewall::undo(&HostRunner, &undo).await.unwrap();
    let after = probe(&pair.a, echo.addr, count, interval);
    eprintln!("{backend} after undo: avg {:.3} ms", after.avg_ms);
    assert_eq!(after.received, count);
    assert!(after.avg_ms < 10.0, "{after:?}");
    drop(echo);
    assert_clean(&pair.b);
    pair.close();
}

#[tokio::test]
async fn delay_nfqueue_on_nft_host() {
    require_root!();
    delay_fallback(FirewallBackend::Nft).await;
}

#[tokio::test]
async fn delay_nfqueue_iptables_legacy() {
    require_root!();
    delay_fallback(FirewallBackend::IptablesLegacy).await;
}

// ------------------------------------------------------------------------------------------
// 6. undo is idempotent, survives a deleted namespace; sweep removes only dead tags
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn undo_is_idempotent_and_tolerates_a_deleted_namespace() {
    require_root!();
    let pair = Pair::new();
    let all = NetScope::default();
    for backend in [
        FirewallBackend::Nft,
        FirewallBackend::IptablesNft,
        FirewallBackend::IptablesLegacy,
    ] {
        let tag = new_tag("idempotent");
        let undo = apply(
            FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            &pair.b,
            &tag,
            backend,
        )
        .await;
        let first = firewall::undo(&HostRunner, &undo).await.unwrap();
        let second = firewall::undo(&HostRunner, &undo).await.unwrap();
        assert!(first.contains("deleted"), "{first}");
        assert!(
            second.contains("already gone") && !second.contains("deleted"),
            "{second}"
        );
        let verification = firewall::verify(&HostRunner, &undo).await.unwrap();
        assert!(!verification.effective, "{}", verification.detail);
    }
    assert_clean(&pair.b);

    // Namespace deleted under a fault in force.
    let tag = new_tag("gone");
    let undo = apply(
        FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        },
        &pair.b,
        &tag,
        FirewallBackend::Nft,
    )
    .await;
    let b_name = pair.names[1].clone();
    ip(&["netns", "del", &b_name]);
    assert_eq!(
        firewall::undo(&HostRunner, &undo).await.unwrap(),
        "namespace gone"
    );
    assert_eq!(
        firewall::undo(&HostRunner, &undo).await.unwrap(),
        "namespace gone"
    );
    assert!(
        firewall::sweep(&HostRunner, &undo.netns, &HashSet::new())
            .await
            .unwrap()
            .is_empty()
    );
    pair.close();
}

#[tokio::test]
async fn sweep_removes_dead_tags_and_keeps_live_ones() {
    require_root!();
    let pair = Pair::new();
    let all = NetScope::default();
    let live = new_tag("live");
    let dead_nft = new_tag("dead-nft");
    let dead_ipt = new_tag("dead-iptables");
    let dead_legacy = new_tag("dead-legacy");
    let live_undo = apply(
        FirewallFault::Loss {
            scope: &all,
            basis_points: 100,
        },
        &pair.b,
        &live,
        FirewallBackend::Nft,
    )
    .await;
    apply(
        FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        },
        &pair.b,
        &dead_nft,
        FirewallBackend::Nft,
    )
    .await;
    apply(
        FirewallFault::Dns {
            mode: PartitionMode::Drop,
        },
        &pair.b,
        &dead_ipt,
        FirewallBackend::IptablesNft,
    )
    .await;
    let scope = NetScope {
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        ..NetScope::default()
    };
    apply(
        FirewallFault::Partition {
            scope: &scope,
            mode: PartitionMode::Reject,
        },
        &pair.b,
        &dead_legacy,
        FirewallBackend::IptablesLegacy,
    )
    .await;

    let live_tags: HashSet<String> = [live.clone()].into();
    let removed = firewall::sweep(&HostRunner, &pair.b, &live_tags)
        .await
        .unwrap();
    eprintln!("sweep removed: {removed:?}");
    assert!(removed.iter().any(|r| r.contains(&dead_nft)), "{removed:?}");
    assert!(
        removed
            .iter()
            .any(|r| r.contains("iptables-nft") && r.contains(&dead_ipt)),
        "{removed:?}"
    );
    assert!(
        removed
            .iter()
            .any(|r| r.contains("ip6tables-nft") && r.contains(&dead_ipt)),
        "{removed:?}"
    );
    assert!(
        removed
            .iter()
            .any(|r| r.contains("iptables-legacy") && r.contains(&dead_legacy)),
        "{removed:?}"
    );
    assert!(!removed.iter().any(|r| r.contains(&live)), "{removed:?}");
    let tables = nft_tables(&pair.b);
    assert!(
        tables.contains(&live) && !tables.contains(&dead_nft),
        "{tables}"
    );
    assert!(
        firewall::verify(&HostRunner, &live_undo)
            .await
            .unwrap()
            .effective
    );
    // Nothing more to sweep.
    assert!(
        firewall::sweep(&HostRunner, &pair.b, &live_tags)
            .await
            .unwrap()
            .is_empty()
    );

    firewall::undo(&HostRunner, &live_undo).await.unwrap();
    assert_clean(&pair.b);
    pair.close();
}

// ------------------------------------------------------------------------------------------
// 7. the agent's own namespace: protected endpoints are exempted first (plan only)
// ------------------------------------------------------------------------------------------

#[test]
fn partition_in_the_agents_own_namespace_exempts_protected_endpoints_first() {
    let own = Netns::current().unwrap();
    let all = NetScope::default();
    let protect: Vec<SocketAddr> = vec!["127.0.0.1:7443".parse().unwrap()];
    let plan = firewall::plan(
        &FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        },
        &own,
        "flt00000000aa",
        &caps(FirewallBackend::Nft),
        &protect,
    )
    .unwrap();
    let script = plan.apply[0].stdin.clone().unwrap();
    let input: Vec<&str> = script
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("chain input"))
        .collect();
    assert_eq!(
        input[2], "ip saddr 127.0.0.1 tcp sport 7443 accept",
        "{script}"
    );
    assert_eq!(input[3], "iifname \"lo\" accept", "{script}");
    assert_eq!(input[4], "counter drop", "{script}");
    assert!(
        script.contains(
            "ip daddr 127.0.0.1 tcp dport 7443 accept\n\t\toifname \"lo\" accept\n\t\tcounter drop"
        ),
        "{script}"
    );

    let plan = firewall::plan(
        &FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        },
        &own,
        "flt00000000aa",
        &caps(FirewallBackend::IptablesNft),
        &protect,
    )
    .unwrap();
    let lines: Vec<String> = plan.apply.iter().map(|c| c.args.join(" ")).collect();
    assert_eq!(
        lines[1],
        "-w 5 -t filter -A flt00000000aa-IN -s 127.0.0.1/32 -p tcp --sport 7443 -j RETURN"
    );
    assert_eq!(
        lines[2],
        "-w 5 -t filter -A flt00000000aa-IN -i lo -j RETURN"
    );
    assert_eq!(lines[3], "-w 5 -t filter -A flt00000000aa-IN -j DROP");

    // Another namespace: no exemption for the agent's endpoints.
    let other = Netns {
        path: "/run/netns/elsewhere".into(),
        inode: own.inode + 1,
    };
    let plan = firewall::plan(
        &FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        },
        &other,
        "flt00000000aa",
        &caps(FirewallBackend::Nft),
        &protect,
    )
    .unwrap();
    assert!(!plan.apply[0].stdin.as_ref().unwrap().contains("7443"));
}

#[tokio::test]
async fn probe_finds_a_backend_here() {
    require_root!();
    let caps = firewall::probe(&HostRunner).await;
    eprintln!("probe: {caps:?}");
    assert!(caps.backend.is_some(), "{}", caps.detail);
    assert!(
        caps.statistic && caps.reject_tcp_reset && caps.nfqueue,
        "{}",
        caps.detail
    );
}
