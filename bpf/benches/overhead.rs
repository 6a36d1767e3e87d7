//! What the telemetry programs cost: a workload with a known event mix runs with the programs
//! detached, attached, and attached with the kernel's per-program run-time accounting on; the
//! figures are printed, nothing is asserted.
//!
//! ```text
//! cargo bench -p faultline-bpf --bench overhead                      # ~20 s, as root
//! cargo bench -p faultline-bpf --bench overhead -- --seconds 10 --rate 50000 --workloads switch
//! ```
//!
//! Flags: `--seconds S` per phase (default 2), `--workloads tcp,switch,exec` (default all),
//! `--rate N` operations per second (default: as fast as possible, a closed loop).
//!
//! Workloads, each in a child process (this process plays the agent: it loads the programs,
//! polls the ring buffers every 100 ms and reads the maps every second):
//! - `tcp`: connect to a listener on 127.0.0.1, the server closes, the client reads EOF and
//!   closes — about ten TCP state changes and two socket destructions per operation;
//! - `switch`: two threads bounce a byte over a Unix socket pair — two wake-ups and two to
//!   four context switches per operation;
//! - `exec`: fork and exec `/bin/true` — exec and exit events through a ring buffer.
//!
//! Printed: operations/s and the worker's CPU per operation in each phase (the slowdown is
//! their change), the loader's CPU% and RSS, program runs/s ("events handled"), their
//! average cost and share of one core, ring-buffer events/s and every drop counter. The
//! programs run unscoped (every event on the host is processed: the worst case), so other
//! activity on the machine adds noise; use longer `--seconds` for steadier figures.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultline_bpf::{Options, ProgramStats, Snapshot, Telemetry};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Tcp,
    Switch,
    Exec,
}

impl Workload {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Workload::Tcp),
            "switch" => Some(Workload::Switch),
            "exec" => Some(Workload::Exec),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Tcp => "tcp",
            Workload::Switch => "switch",
            Workload::Exec => "exec",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Workload::Tcp => "TCP connect + accept + close on 127.0.0.1",
            Workload::Switch => "context switches: a byte bounced between two threads",
            Workload::Exec => "fork + exec /bin/true",
        }
    }
}

struct Args {
    seconds: f64,
    workloads: Vec<Workload>,
    rate: Option<u64>,
    worker: Option<Workload>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 2.0,
        workloads: vec![Workload::Tcp, Workload::Switch, Workload::Exec],
        rate: None,
        worker: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--seconds" => {
                args.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--rate" => {
                args.rate = Some(
                    value("--rate")?
                        .parse()
                        .map_err(|e| format!("--rate: {e}"))?,
                )
            }
            "--workloads" => {
                args.workloads = value("--workloads")?
                    .split(',')
                    .map(|w| Workload::parse(w).ok_or_else(|| format!("unknown workload {w}")))
                    .collect::<Result<_, _>>()?
            }
            "--worker" => {
                let w = value("--worker")?;
                args.worker =
                    Some(Workload::parse(&w).ok_or_else(|| format!("unknown workload {w}"))?);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("overhead: {e}");
            std::process::exit(2);
        }
    };
    if let Some(w) = args.worker {
        worker(w, Duration::from_secs_f64(args.seconds), args.rate);
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: the overhead benchmark loads BPF programs and needs root");
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "faultline-bpf overhead: kernel {}, {} CPUs, {} s per phase, rate {}",
        release.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.seconds,
        args.rate
            .map_or("unpaced (closed loop)".to_owned(), |r| format!("{r} ops/s"))
    );
    for w in &args.workloads {
        if let Err(e) = bench(*w, &args) {
            println!("{}: failed: {e}", w.name());
        }
    }
}

/// What one phase measured.
struct Phase {
    ops: u64,
    wall: Duration,
    worker_cpu: Duration,
    loader_cpu: Option<Duration>,
    loader_rss_kib: Option<u64>,
    ring_events: u64,
    programs: Vec<ProgramStats>,
    before: Option<Snapshot>,
    after: Option<Snapshot>,
}

impl Phase {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }

    fn cpu_per_op(&self) -> Duration {
        self.worker_cpu / u32::try_from(self.ops.max(1)).unwrap_or(u32::MAX)
    }
}

fn bench(w: Workload, args: &Args) -> Result<(), String> {
    let secs = Duration::from_secs_f64(args.seconds);
    println!("\n== {} ({})", w.name(), w.describe());
    let detached = run_phase(w, secs, args.rate, None)?;

    let started = Instant::now();
    let mut t = Telemetry::load(&Options::default()).map_err(|e| e.to_string())?;
    let load_time = started.elapsed();
    let loaded: Vec<_> = t
        .status()
        .iter()
        .filter(|s| s.is_loaded())
        .map(|s| s.group.name())
        .collect();
    println!(
        "loaded {} in {:.0} ms",
        loaded.join(","),
        load_time.as_secs_f64() * 1e3
    );
    let attached = run_phase(w, secs, args.rate, Some(&mut t))?;
    let stats = {
        let _on = BpfStats::enable()?;
        let before = t.program_stats().map_err(|e| e.to_string())?;
        let mut p = run_phase(w, secs, args.rate, Some(&mut t))?;
        let after = t.program_stats().map_err(|e| e.to_string())?;
        p.programs = after
            .iter()
            .map(|a| {
                let b = before
                    .iter()
                    .find(|b| b.name == a.name && b.group == a.group);
                ProgramStats {
                    group: a.group,
                    name: a.name.clone(),
                    run_count: a.run_count - b.map_or(0, |b| b.run_count),
                    run_time: a.run_time - b.map_or(Duration::ZERO, |b| b.run_time),
                }
            })
            .collect();
        p
    };
    drop(t);

    println!(
        "  {:<16} {:>12} {:>14} {:>12} {:>12}",
        "phase", "ops/s", "worker CPU/op", "loader CPU", "loader RSS"
    );
    for (name, p) in [
        ("detached", &detached),
        ("attached", &attached),
        ("attached+stats", &stats),
    ] {
        println!(
            "  {:<16} {:>12.0} {:>11.2} us {:>12} {:>12}",
            name,
            p.ops_per_s(),
            p.cpu_per_op().as_secs_f64() * 1e6,
            p.loader_cpu.map_or("-".to_owned(), |c| format!(
                "{:.2}%",
                100.0 * c.as_secs_f64() / p.wall.as_secs_f64()
            )),
            p.loader_rss_kib
                .map_or("-".to_owned(), |r| format!("{:.1} MiB", r as f64 / 1024.0)),
        );
    }
    let slowdown = 100.0 * (1.0 - attached.ops_per_s() / detached.ops_per_s());
    let cpu_cost =
        100.0 * (attached.cpu_per_op().as_secs_f64() / detached.cpu_per_op().as_secs_f64() - 1.0);
    println!(
        "  workload slowdown (attached vs detached): throughput {slowdown:+.1}%, CPU per operation {cpu_cost:+.1}%"
    );

    let wall = stats.wall.as_secs_f64();
    let runs: u64 = stats.programs.iter().map(|p| p.run_count).sum();
    let run_time: Duration = stats.programs.iter().map(|p| p.run_time).sum();
    println!(
        "  programs: {:.0} events handled/s ({:.1} per operation), {:.0} ns each, {:.2}% of one CPU",
        runs as f64 / wall,
        runs as f64 / stats.ops.max(1) as f64,
        run_time.as_nanos() as f64 / runs.max(1) as f64,
        100.0 * run_time.as_secs_f64() / wall
    );
    let mut busiest: Vec<_> = stats.programs.iter().filter(|p| p.run_count > 0).collect();
    busiest.sort_by_key(|p| std::cmp::Reverse(p.run_time));
    for p in busiest.iter().take(4) {
        println!(
            "    {:<6} {:<16} {:>10.0}/s {:>6.0} ns",
            p.group.name(),
            p.name,
            p.run_count as f64 / wall,
            p.run_time.as_nanos() as f64 / p.run_count.max(1) as f64
        );
    }
    for (name, p) in [("attached", &attached), ("attached+stats", &stats)] {
        let (Some(before), Some(after)) = (&p.before, &p.after) else {
            continue;
        };
        let drops: Vec<String> = after
            .counters
            .iter()
            .map(|(g, c)| {
                let b = before.counters.get(g).copied().unwrap_or_default();
                format!(
                    "{g} {}/{}",
                    c.ringbuf_drops - b.ringbuf_drops,
                    c.map_full - b.map_full
                )
            })
            .collect();
        println!(
            "  {name}: ring-buffer events {:.0}/s; drops ring-buffer/map-full per group: {}; \
             map rows tcp/sched/block {}/{}/{}",
            p.ring_events as f64 / p.wall.as_secs_f64(),
            drops.join(", "),
            after.tcp.len(),
            after.sched.len(),
            after.block.len()
        );
    }
    Ok(())
}

/// Runs the workload in a child for `secs`; with `t`, polls and snapshots like the agent.
fn run_phase(
    w: Workload,
    secs: Duration,
    rate: Option<u64>,
    mut t: Option<&mut Telemetry>,
) -> Result<Phase, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--worker",
        w.name(),
        "--seconds",
        &secs.as_secs_f64().to_string(),
    ]);
    if let Some(r) = rate {
        cmd.args(["--rate", &r.to_string()]);
    }
    let before = t
        .as_ref()
        .map(|t| t.snapshot())
        .transpose()
        .map_err(|e| e.to_string())?;
    let cpu0 = self_cpu();
    let child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut ring_events = 0u64;
    if let Some(t) = t.as_deref_mut() {
        let deadline = Instant::now() + secs + Duration::from_millis(200);
        let mut next_snapshot = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            ring_events += t
                .poll_events(Duration::from_millis(100))
                .map_err(|e| e.to_string())?
                .len() as u64;
            if Instant::now() >= next_snapshot {
                t.snapshot().map_err(|e| e.to_string())?;
                next_snapshot += Duration::from_secs(1);
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let cpu1 = self_cpu();
    if let Some(t) = t.as_deref_mut() {
        ring_events += t.drain_events().map_err(|e| e.to_string())?.len() as u64;
    }
    let after = t
        .as_ref()
        .map(|t| t.snapshot())
        .transpose()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Result<u64, String> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("worker output lacks {name}: {text:?}"))
    };
    Ok(Phase {
        ops: field("ops")?,
        wall: Duration::from_nanos(field("wall_ns")?),
        worker_cpu: Duration::from_nanos(field("cpu_ns")?),
        loader_cpu: t.is_some().then(|| cpu1.saturating_sub(cpu0)),
        loader_rss_kib: t.is_some().then(rss_kib).flatten(),
        ring_events,
        programs: Vec::new(),
        before,
        after,
    })
}

/// User + system CPU time of this process (children excluded).
fn self_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(Duration::ZERO, |u| {
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
        };
        tv(u.user_time()) + tv(u.system_time())
    })
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Turns `kernel.bpf_stats_enabled` on, restoring the previous value on drop.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self, String> {
        let previous =
            std::fs::read_to_string(BPF_STATS).map_err(|e| format!("{BPF_STATS}: {e}"))?;
        std::fs::write(BPF_STATS, "1").map_err(|e| format!("{BPF_STATS}: {e}"))?;
        Ok(BpfStats {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.previous) {
            eprintln!(
                "warning: could not restore {BPF_STATS} to {}: {e}",
                self.previous
            );
        }
    }
}

/// The child side: runs the workload for `secs` and prints `ops= cpu_ns= wall_ns=`.
fn worker(w: Workload, secs: Duration, rate: Option<u64>) {
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r.max(1) as f64));
    let start = Instant::now();
    let deadline = start + secs;
    let mut next = start;
    let mut ops = 0u64;
    let mut pace = || {
        if let Some(i) = interval {
            next += i;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    };
    let result: std::io::Result<()> = (|| {
        match w {
            Workload::Tcp => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let addr = listener.local_addr()?;
                // The server closes first, so TIME_WAIT stays on its side and the client's
                // ephemeral ports are free again at once.
                std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        drop(conn);
                    }
                });
                let mut buf = [0u8; 1];
                while Instant::now() < deadline {
                    let mut c = TcpStream::connect(addr)?;
                    let _ = c.read(&mut buf);
                    ops += 1;
                    pace();
                }
            }
            Workload::Switch => {
                let (mut a, mut b) = UnixStream::pair()?;
                std::thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    while b.read_exact(&mut byte).is_ok() && b.write_all(&byte).is_ok() {}
                });
                let mut byte = [0u8; 1];
                while Instant::now() < deadline {
                    a.write_all(&byte)?;
                    a.read_exact(&mut byte)?;
                    ops += 1;
                    pace();
                }
            }
            Workload::Exec => {
                while Instant::now() < deadline {
                    Command::new("/bin/true").status()?;
                    ops += 1;
                    pace();
                }
            }
        }
        Ok(())
    })();
    let wall = start.elapsed();
    if let Err(e) = result {
        eprintln!("worker {}: {e}", w.name());
        std::process::exit(1);
    }
    println!(
        "ops={ops} cpu_ns={} wall_ns={}",
        self_cpu().as_nanos(),
        wall.as_nanos()
    );
    // The server/echo threads are still blocked: leave without joining them.
    std::process::exit(0);
}
