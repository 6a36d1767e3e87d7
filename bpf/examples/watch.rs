//! Loads the telemetry programs, prints each group's status, then for a few seconds prints the
//! events and a per-second summary: a quick look at what the agent will stream.
//!
//! ```text
//! cargo run -p faultline-bpf --example watch -- [SECONDS] [CGROUP-PATH...]
//! ```
//!
//! With cgroup paths (relative to the hierarchy roots, as in `/proc/<pid>/cgroup`), only those
//! cgroups are counted.

use std::time::{Duration, Instant};

use faultline_bpf::{Options, Telemetry, TelemetryEvent, errno_name};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let scope: Vec<String> = args.collect();

    let mut t = Telemetry::load(&Options::default())?;
    for s in t.status() {
        println!("{s}");
    }
    if !scope.is_empty() {
        t.set_scope(&scope)?;
        println!("scope: {scope:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut before = t.snapshot()?;
    while Instant::now() < deadline {
        let tick = Instant::now() + Duration::from_secs(1);
        while Instant::now() < tick {
            for e in t.poll_events(Duration::from_millis(200))? {
                match e {
                    TelemetryEvent::ConnectFailed(c) => println!(
                        "connect failed: pid {} ({}) cgroup {} -> {:?}: {} after {:?}",
                        c.pid,
                        c.comm,
                        c.cgroup_id,
                        c.remote,
                        errno_name(c.errno),
                        c.elapsed
                    ),
                    other => println!("{other:?}"),
                }
            }
        }
        let now = t.snapshot()?;
        let retransmits: u64 = now.tcp.iter().map(|r| r.retransmits).sum::<u64>()
            - before.tcp.iter().map(|r| r.retransmits).sum::<u64>();
        let busiest = now
            .sched
            .iter()
            .map(|s| {
                let prev = before.sched_for(s.cgroup_id).cloned().unwrap_or_default();
                s.since(&prev)
            })
            .max_by_key(|d| d.runq_latency.count);
        print!("1s: {retransmits} TCP retransmits");
        if let Some(s) = busiest {
            print!(
                "; busiest cgroup {}: {} runq samples, p95 {:?}",
                s.cgroup_id,
                s.runq_latency.count,
                s.runq_latency.p95()
            );
        }
        if let Some(f) = &now.fallback {
            print!("; {}: {:?}", f.label, f.tcp);
        }
        println!();
        before = now;
    }
    Ok(())
}
