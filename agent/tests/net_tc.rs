//! tc faults against the real kernel: needs root and iproute2. Each test makes its own pair of
//! network namespaces joined by a veth (10.99.0.1/30 in A, 10.99.0.2/30 in B; the addresses
//! are private to the pair) and deletes them on drop, panic included. Traffic flows only
//! between the two namespaces, with python3 sockets, bounded in size and time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use faultline_agent::net::tc::{self, TcFault};
use faultline_agent::sys::command::{CommandOutput, CommandRunner, CommandSpec, HostRunner};
use faultline_agent::sys::netns::Netns;
use faultline_domain::fault::{NetScope, Protocol};

const A_ADDR: &str = "10.99.0.1";
const MBIT: f64 = 1_000_000.0;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "flttc-{}-{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn run(program: &str, args: &[&str]) -> CommandOutput {
    HostRunner
        .run_checked(&CommandSpec::new(program, args.iter().copied()))
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

async fn try_run(program: &str, args: &[&str]) -> CommandOutput {
    HostRunner
        .run(&CommandSpec::new(program, args.iter().copied()))
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            println!("SKIPPED: needs root to create network namespaces");
            return;
        }
    };
}

/// Network namespaces deleted on drop (from a helper thread: Drop cannot await).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                for name in names {
                    let _ = HostRunner
                        .run(&CommandSpec::new("ip", ["netns", "del", name.as_str()]))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A (`va`, 10.99.0.1/30) <-> B (`vb`, 10.99.0.2/30).
struct Pair {
    a: String,
    b: String,
    na: Netns,
    nb: Netns,
    _guard: Namespaces,
}

impl Pair {
    async fn new() -> Pair {
        let a = unique("a");
        let b = unique("b");
        let guard = Namespaces(vec![a.clone(), b.clone()]);
        run("ip", &["netns", "add", &a]).await;
        run("ip", &["netns", "add", &b]).await;
        run(
            "ip",
            &[
                "-n", &a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b,
            ],
        )
        .await;
        run(
            "ip",
            &["-n", &a, "addr", "add", "10.99.0.1/30", "dev", "va"],
        )
        .await;
        run(
            "ip",
            &["-n", &b, "addr", "add", "10.99.0.2/30", "dev", "vb"],
        )
        .await;
        for (ns, dev) in [(&a, "va"), (&b, "vb"), (&a, "lo"), (&b, "lo")] {
            run("ip", &["-n", ns, "link", "set", dev, "up"]).await;
        }
        Pair {
            na: Netns::named(&a).unwrap_or_else(|err| panic!("{err}")),
            nb: Netns::named(&b).unwrap_or_else(|err| panic!("{err}")),
            a,
            b,
            _guard: guard,
        }
    }

    /// The device's qdiscs as configured: `tc qdisc show` without the one counter it prints
    /// even without `-s` (htb's `direct_packets_stat`, which the kernel's own packets on a
    /// fresh veth — IPv6 router solicitations, MLD reports — can move between two looks).
    async fn qdiscs(&self, ns: &str, dev: &str) -> String {
        let shown = run("tc", &["-n", ns, "qdisc", "show", "dev", dev])
            .await
            .stdout;
        without_counters(&shown)
    }
}

/// `tc qdisc show` output with every `direct_packets_stat N` pair dropped.
fn without_counters(shown: &str) -> String {
    shown
        .lines()
        .map(|line| {
            let mut words = line.split(' ');
            let mut kept = Vec::new();
            while let Some(word) = words.next() {
                if word == "direct_packets_stat" {
                    words.next();
                } else {
                    kept.push(word);
                }
            }
            kept.join(" ") + "\n"
        })
        .collect()
}

#[test]
fn counters_are_dropped_from_qdisc_listings() {
    assert_eq!(
        without_counters(
            "qdisc htb 1: root refcnt 3 r2q 10 default 0x10 direct_packets_stat 1 direct_qlen 1000\n\
             qdisc noqueue 0: root refcnt 2\n"
        ),
        "qdisc htb 1: root refcnt 3 r2q 10 default 0x10 direct_qlen 1000\n\
         qdisc noqueue 0: root refcnt 2\n"
    );
}

const SERVER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(20)
c, _ = s.accept()
c.settimeout(20)
n = 0
first = last = None
first_len = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    now = time.monotonic()
    if first is None:
        first, first_len = now, len(d)
    n += len(d)
    last = now
print(n, n - first_len, (last - first) if first else 0.0)
"#;

const CLIENT: &str = r#"
import socket, sys, time
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 5
while True:
    try:
        s = socket.create_connection((host, port), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.settimeout(25)
buf = b"x" * 65536
sent = 0
while sent < total:
    sent += s.send(buf[: min(len(buf), total - sent)])
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"#;

/// Sends `bytes` from B to A's `port`; returns the receiver's measured rate in bit/s (after the
/// first segment, so a bucket's initial burst does not count).
async fn throughput(pair: &Pair, port: u16, bytes: u64) -> f64 {
    let port_s = port.to_string();
    let bytes_s = bytes.to_string();
    let server = CommandSpec::new("python3", ["-c", SERVER, A_ADDR, &port_s]).in_netns(&pair.na);
    let client =
        CommandSpec::new("python3", ["-c", CLIENT, A_ADDR, &port_s, &bytes_s]).in_netns(&pair.nb);
    let (server, client) = tokio::join!(HostRunner.run_checked(&server), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        HostRunner.run_checked(&client).await
    });
    client.unwrap_or_else(|err| panic!("client: {err}"));
    let out = server.unwrap_or_else(|err| panic!("server: {err}")).stdout;
    let fields: Vec<f64> = out
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fields.len(), 3, "server printed {out:?}");
    assert_eq!(fields[0] as u64, bytes, "everything arrived");
    fields[1] * 8.0 / fields[2].max(1e-6)
}

const RTT_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
s.settimeout(20)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    c.close()
"#;

const RTT_CLIENT: &str = r#"
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
deadline = time.monotonic() + 5
while len(times) < count:
    t = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
        continue
    times.append(time.monotonic() - t)
    s.close()
times.sort()
print(times[len(times) // 2] * 1000)
"#;

/// Median TCP connect time from B to A's `port`, in ms (one round trip).
async fn connect_rtt_ms(pair: &Pair, port: u16) -> f64 {
    let port_s = port.to_string();
    let server =
        CommandSpec::new("python3", ["-c", RTT_SERVER, A_ADDR, &port_s, "5"]).in_netns(&pair.na);
    let client =
        CommandSpec::new("python3", ["-c", RTT_CLIENT, A_ADDR, &port_s, "5"]).in_netns(&pair.nb);
    let (server, client) = tokio::join!(HostRunner.run_checked(&server), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        HostRunner.run_checked(&client).await
    });
    server.unwrap_or_else(|err| panic!("server: {err}"));
    let out = client.unwrap_or_else(|err| panic!("client: {err}")).stdout;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("client printed {out:?}"))
}

#[tokio::test]
async fn bandwidth_limits_for_real_and_undo_lifts_it() {
    require_root!();
    let pair = Pair::new().await;
    let caps = tc::probe(&HostRunner).await;
    assert!(caps.tbf, "{}", caps.detail);
    let before = pair.qdiscs(&pair.b, "vb").await;
    let tag = faultline_agent::net::tag_for(&unique("bw"));
    let plan = tc::plan(
        &HostRunner,
        &TcFault::Bandwidth {
            rate_bps: 1_000_000,
        },
        &pair.nb,
        &tag,
        &caps,
    )
    .await
    .unwrap();
    println!("mechanism: {}", plan.mechanism);
    tc::apply(&HostRunner, &plan).await.unwrap();

    let limited = throughput(&pair, 5201, 256 * 1024).await;
    let verification = tc::verify(&HostRunner, &plan.undo).await.unwrap();
    println!(
        "limited to 1 Mbit/s: measured {:.3} Mbit/s; {}",
        limited / MBIT,
        verification.detail
    );
    assert!(verification.effective, "{}", verification.detail);
    assert!(
        verification.detail.contains("sent "),
        "{}",
        verification.detail
    );
    assert!(
        (0.75 * MBIT..=1.25 * MBIT).contains(&limited),
        "{limited} bit/s is not 1 Mbit/s ± 25%"
    );

    let note = tc::undo(&HostRunner, &plan.undo).await.unwrap();
    println!("undo: {note}");
    assert_eq!(pair.qdiscs(&pair.b, "vb").await, before);
    let free = throughput(&pair, 5202, 16 * 1024 * 1024).await;
    println!(
        "after undo: {:.1} Mbit/s ({:.0}x)",
        free / MBIT,
        free / limited
    );
    assert!(
        free >= 10.0 * limited,
        "{free} bit/s after undo vs {limited} limited"
    );
}

#[tokio::test]
async fn scoped_bandwidth_limits_only_the_scoped_port() {
    require_root!();
    let pair = Pair::new().await;
    let caps = tc::probe(&HostRunner).await;
    assert!(caps.htb && caps.u32_filter, "{}", caps.detail);
    let scope = NetScope {
        peers: vec![format!("{A_ADDR}/32")],
        ports: vec![5301],
        protocol: Protocol::Tcp,
        ..NetScope::default()
    };
    let tag = faultline_agent::net::tag_for(&unique("scoped"));
    let fault = TcFault::ScopedBandwidth {
        scope: &scope,
        rate_bps: 1_000_000,
    };
    let plan = tc::plan(&HostRunner, &fault, &pair.nb, &tag, &caps)
        .await
        .unwrap();
    println!("mechanism: {}", plan.mechanism);
    tc::apply(&HostRunner, &plan).await.unwrap();
    let scoped = throughput(&pair, 5301, 256 * 1024).await;
    let other = throughput(&pair, 5302, 16 * 1024 * 1024).await;
    let verification = tc::verify(&HostRunner, &plan.undo).await.unwrap();
    println!(
        "scoped port: {:.3} Mbit/s; other port: {:.1} Mbit/s; {}",
        scoped / MBIT,
        other / MBIT,
        verification.detail
    );
    assert!(verification.effective, "{}", verification.detail);
    assert!(
        (0.75 * MBIT..=1.25 * MBIT).contains(&scoped),
        "{scoped} bit/s is not 1 Mbit/s ± 25%"
    );
    assert!(other >= 10.0 * scoped, "unscoped port ran at {other} bit/s");
    tc::undo(&HostRunner, &plan.undo).await.unwrap();
    assert!(!pair.qdiscs(&pair.b, "vb").await.contains("htb"));
}

#[tokio::test]
async fn a_users_root_qdisc_is_restored_exactly() {
    require_root!();
    let pair = Pair::new().await;
    let caps = tc::probe(&HostRunner).await;
    let scope = NetScope {
        ports: vec![9],
        ..NetScope::default()
    };
    let users: &[&[&str]] = &[
        &["tbf", "rate", "50mbit", "burst", "64kb", "latency", "50ms"],
        &[
            "tbf",
            "rate",
            "7654321bit",
            "burst",
            "5000",
            "peakrate",
            "20mbit",
            "minburst",
            "1600",
            "latency",
            "50ms",
        ],
        &["pfifo", "limit", "33"],
        &["bfifo", "limit", "20000"],
        &["pfifo_fast"],
        &["mq"],
        &["noqueue"],
    ];
    for user in users {
        let mut add = vec![
            "-n",
            pair.b.as_str(),
            "qdisc",
            "add",
            "dev",
            "vb",
            "root",
            "handle",
            "1:",
        ];
        add.extend_from_slice(user);
        run("tc", &add).await;
        let before = pair.qdiscs(&pair.b, "vb").await;
        for fault in [
            TcFault::Bandwidth {
                rate_bps: 2_000_000,
            },
            TcFault::ScopedBandwidth {
                scope: &scope,
                rate_bps: 2_000_000,
            },
        ] {
            let tag = faultline_agent::net::tag_for(&unique("user"));
            let plan = tc::plan(&HostRunner, &fault, &pair.nb, &tag, &caps)
                .await
                .unwrap();
            tc::apply(&HostRunner, &plan).await.unwrap();
            let during = pair.qdiscs(&pair.b, "vb").await;
            assert_ne!(during, before);
            let note = tc::undo(&HostRunner, &plan.undo).await.unwrap();
            let after = pair.qdiscs(&pair.b, "vb").await;
            println!("user root `{}`: {note}", user.join(" "));
            assert_eq!(after, before, "{}", user.join(" "));
        }
        run("tc", &["-n", &pair.b, "qdisc", "del", "dev", "vb", "root"]).await;
    }
    // A classful tree is refused before anything is touched.
    run(
        "tc",
        &[
            "-n", &pair.b, "qdisc", "add", "dev", "vb", "root", "handle", "1:", "htb", "default",
            "10",
        ],
    )
    .await;
    let before = pair.qdiscs(&pair.b, "vb").await;
    let err = tc::plan(
        &HostRunner,
        &TcFault::Bandwidth {
            rate_bps: 2_000_000,
        },
        &pair.nb,
        "fltrefused",
        &caps,
    )
    .await
    .unwrap_err();
    println!("refused: {err}");
    assert!(matches!(err, tc::TcError::Unrestorable { .. }), "{err}");
    assert_eq!(pair.qdiscs(&pair.b, "vb").await, before);
}

#[tokio::test]
async fn undo_is_idempotent_survives_a_deleted_namespace_and_sweep_spares_the_living() {
    require_root!();
    let caps = tc::probe(&HostRunner).await;
    let fault = TcFault::Bandwidth {
        rate_bps: 5_000_000,
    };

    // Idempotent undo.
    let pair = Pair::new().await;
    let tag = faultline_agent::net::tag_for(&unique("idem"));
    let plan = tc::plan(&HostRunner, &fault, &pair.nb, &tag, &caps)
        .await
        .unwrap();
    tc::apply(&HostRunner, &plan).await.unwrap();
    assert!(tc::verify(&HostRunner, &plan.undo).await.unwrap().effective);
    let first = tc::undo(&HostRunner, &plan.undo).await.unwrap();
    let second = tc::undo(&HostRunner, &plan.undo).await.unwrap();
    println!("undo: {first}\nundo again: {second}");
    assert!(second.contains("already absent"), "{second}");
    assert!(!tc::verify(&HostRunner, &plan.undo).await.unwrap().effective);

    // Undo after the namespace is gone.
    let plan = tc::plan(&HostRunner, &fault, &pair.nb, &tag, &caps)
        .await
        .unwrap();
    tc::apply(&HostRunner, &plan).await.unwrap();
    run("ip", &["netns", "del", &pair.b]).await;
    let note = tc::undo(&HostRunner, &plan.undo).await.unwrap();
    println!("undo after deletion: {note}");
    assert!(note.starts_with("namespace gone"), "{note}");

    // Sweep, in A: x0 gets a leftover (dead tag), x1 a live fault, y0 and y1 the user's.
    let a = pair.a.as_str();
    run("ip", &["-n", a, "link", "set", "va", "down"]).await;
    run(
        "ip",
        &[
            "-n", a, "link", "add", "x0", "type", "veth", "peer", "name", "x1",
        ],
    )
    .await;
    run(
        "ip",
        &[
            "-n", a, "link", "add", "y0", "type", "veth", "peer", "name", "y1",
        ],
    )
    .await;
    let dead = faultline_agent::net::tag_for(&unique("dead"));
    let live = faultline_agent::net::tag_for(&unique("live"));
    run("ip", &["-n", a, "link", "set", "x0", "up"]).await;
    let dead_plan = tc::plan(&HostRunner, &fault, &pair.na, &dead, &caps)
        .await
        .unwrap();
    tc::apply(&HostRunner, &dead_plan).await.unwrap();
    run("ip", &["-n", a, "link", "set", "x0", "down"]).await;
    run("ip", &["-n", a, "link", "set", "x1", "up"]).await;
    let live_plan = tc::plan(&HostRunner, &fault, &pair.na, &live, &caps)
        .await
        .unwrap();
    assert_eq!(live_plan.undo.devices.len(), 1);
    tc::apply(&HostRunner, &live_plan).await.unwrap();
    run(
        "tc",
        &[
            "-n", a, "qdisc", "add", "dev", "y0", "root", "handle", "1:", "tbf", "rate", "50mbit",
            "burst", "64kb", "latency", "50ms",
        ],
    )
    .await;
    // A user's qdisc that happens to use a handle in our range.
    run(
        "tc",
        &[
            "-n", a, "qdisc", "add", "dev", "y1", "root", "handle", "4001:", "tbf", "rate",
            "50mbit", "burst", "64kb", "latency", "50ms",
        ],
    )
    .await;
    let users_before = (pair.qdiscs(a, "y0").await, pair.qdiscs(a, "y1").await);

    let removed = tc::sweep(&HostRunner, &pair.na, &HashSet::from([live.clone()]))
        .await
        .unwrap();
    println!("sweep: {removed:?}");
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].starts_with("x0: "), "{removed:?}");
    // x0 is down: the kernel's default there is noop, which tc does not list.
    assert!(!pair.qdiscs(a, "x0").await.contains("tbf"));
    assert!(
        tc::verify(&HostRunner, &live_plan.undo)
            .await
            .unwrap()
            .effective
    );
    assert_eq!(
        (pair.qdiscs(a, "y0").await, pair.qdiscs(a, "y1").await),
        users_before
    );
    assert!(
        tc::sweep(&HostRunner, &pair.na, &HashSet::from([live]))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        tc::undo(&HostRunner, &dead_plan.undo)
            .await
            .unwrap()
            .contains("already absent")
    );
    tc::undo(&HostRunner, &live_plan.undo).await.unwrap();
    assert!(
        tc::sweep(&HostRunner, &pair.na, &HashSet::new())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        (pair.qdiscs(a, "y0").await, pair.qdiscs(a, "y1").await),
        users_before
    );
}

#[tokio::test]
async fn probe_matches_what_the_kernel_really_does_and_leaves_nothing() {
    require_root!();
    // Reality, found independently: on a veth in a namespace of our own.
    let ns = unique("reality");
    let _guard = Namespaces(vec![ns.clone()]);
    run("ip", &["netns", "add", &ns]).await;
    run(
        "ip",
        &[
            "-n", &ns, "link", "add", "r0", "type", "veth", "peer", "name", "r1",
        ],
    )
    .await;
    let tc_ok = |args: Vec<&'static str>| {
        let ns = ns.clone();
        async move {
            let mut all = vec!["-n", ns.as_str()];
            all.extend(args);
            try_run("tc", &all).await.success()
        }
    };
    let netem = tc_ok(vec![
        "qdisc", "replace", "dev", "r0", "root", "netem", "delay", "5ms",
    ])
    .await;
    let tbf = tc_ok(vec![
        "qdisc", "replace", "dev", "r0", "root", "tbf", "rate", "8mbit", "burst", "10kb", "limit",
        "20kb",
    ])
    .await;
    let htb = tc_ok(vec![
        "qdisc", "replace", "dev", "r0", "root", "handle", "2:", "htb",
    ])
    .await;
    let u32_filter = htb
        && tc_ok(vec![
            "class", "add", "dev", "r0", "parent", "2:", "classid", "2:5", "htb", "rate", "2mbit",
        ])
        .await
        && tc_ok(vec![
            "filter", "add", "dev", "r0", "parent", "2:", "protocol", "ip", "prio", "3", "u32",
            "match", "ip", "sport", "80", "0xffff", "flowid", "2:5",
        ])
        .await;
    let clsact = tc_ok(vec!["qdisc", "add", "dev", "r1", "clsact"]).await;

    let recorder = Recorder::default();
    let started = Instant::now();
    let caps = tc::probe(&recorder).await;
    let took = started.elapsed();
    println!("probe took {took:?}: {caps:?}");
    assert_eq!(
        (caps.netem, caps.tbf, caps.htb, caps.clsact, caps.u32_filter),
        (netem, tbf, htb, clsact, u32_filter),
        "{}",
        caps.detail
    );
    assert!(took < Duration::from_secs(1), "probe took {took:?}");
    let lines = recorder.0.lock().unwrap().clone();
    let scratch = lines[0].strip_prefix("ip netns add ").unwrap().to_string();
    assert_eq!(lines.last().unwrap(), &format!("ip netns del {scratch}"));
    assert!(
        !std::path::Path::new("/run/netns").join(&scratch).exists(),
        "{scratch} left behind"
    );
    assert!(
        !run("ip", &["netns", "list"])
            .await
            .stdout
            .contains(&scratch)
    );
}

/// Runs for real and remembers the command lines.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl CommandRunner for Recorder {
    async fn run(
        &self,
        spec: &CommandSpec,
    ) -> Result<CommandOutput, faultline_agent::sys::command::CommandError> {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(spec.display());
        }
        HostRunner.run(spec).await
    }
}

#[tokio::test]
async fn netem_delays_for_real_when_the_kernel_has_it() {
    require_root!();
    let caps = tc::probe(&HostRunner).await;
    if !caps.netem {
        println!(
            "SKIPPED: this kernel has no netem qdisc ({}); the netem commands are covered by the exact-command unit tests",
            caps.detail
        );
        return;
    }
    let pair = Pair::new().await;
    let base = connect_rtt_ms(&pair, 5401).await;
    let unscoped = NetScope::default();
    let delay = TcFault::Netem {
        scope: &unscoped,
        delay_ms: 100,
        jitter_ms: 0,
        loss_bp: 0,
        duplicate_bp: 0,
        corrupt_bp: 0,
        reorder_bp: 0,
    };
    let tag = faultline_agent::net::tag_for(&unique("netem"));
    let plan = tc::plan(&HostRunner, &delay, &pair.nb, &tag, &caps)
        .await
        .unwrap();
    tc::apply(&HostRunner, &plan).await.unwrap();
    let delayed = connect_rtt_ms(&pair, 5402).await;
    let verification = tc::verify(&HostRunner, &plan.undo).await.unwrap();
    tc::undo(&HostRunner, &plan.undo).await.unwrap();
    let after = connect_rtt_ms(&pair, 5403).await;
    println!(
        "connect RTT: {base:.2} ms, with netem 100ms {delayed:.2} ms, after undo {after:.2} ms; {}",
        verification.detail
    );
    assert!(verification.effective);
    assert!((100.0..150.0).contains(&delayed), "{delayed} ms");
    assert!(after < 50.0, "{after} ms");

    // Scoped: only the scoped port is delayed.
    let scope = NetScope {
        ports: vec![5404],
        protocol: Protocol::Tcp,
        ..NetScope::default()
    };
    let scoped = TcFault::Netem {
        scope: &scope,
        delay_ms: 100,
        jitter_ms: 0,
        loss_bp: 0,
        duplicate_bp: 0,
        corrupt_bp: 0,
        reorder_bp: 0,
    };
    let plan = tc::plan(&HostRunner, &scoped, &pair.nb, &tag, &caps)
        .await
        .unwrap();
    tc::apply(&HostRunner, &plan).await.unwrap();
    let in_scope = connect_rtt_ms(&pair, 5404).await;
    let out_of_scope = connect_rtt_ms(&pair, 5405).await;
    tc::undo(&HostRunner, &plan.undo).await.unwrap();
    println!("scoped netem: port in scope {in_scope:.2} ms, other port {out_of_scope:.2} ms");
    assert!((100.0..150.0).contains(&in_scope), "{in_scope} ms");
    assert!(out_of_scope < 50.0, "{out_of_scope} ms");
}
