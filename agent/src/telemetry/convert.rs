//! `faultline_bpf` figures into their wire form.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use faultline_bpf::{
    BlockStats, Direction, GroupState, GroupStatus, Log2Histogram, SchedStats, TcpStats,
    TelemetryEvent,
};
use faultline_proto::v1 as pb;

/// Unix milliseconds (0 before the epoch).
pub(crate) fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A histogram without its trailing empty buckets.
pub(crate) fn histogram(h: &Log2Histogram) -> pb::Log2Histogram {
    let used = h
        .buckets
        .iter()
        .rposition(|n| *n > 0)
        .map_or(0, |last| last + 1);
    pb::Log2Histogram {
        buckets: h.buckets[..used].to_vec(),
        count: h.count,
        sum_ns: nanos(h.sum),
        max_ns: nanos(h.max),
    }
}

fn errnos(map: &BTreeMap<i32, u64>) -> Vec<pb::ErrnoCount> {
    map.iter()
        .filter(|(_, n)| **n > 0)
        .map(|(errno, count)| pb::ErrnoCount {
            errno: *errno,
            count: *count,
        })
        .collect()
}

pub(crate) fn tcp(row: &TcpStats) -> pb::TcpTelemetry {
    pb::TcpTelemetry {
        inbound: row.direction == Direction::Inbound,
        peer: row.peer.map(|ip| ip.to_string()).unwrap_or_default(),
        port: u32::from(row.port),
        active_established: row.active_established,
        passive_established: row.passive_established,
        retransmits: row.retransmits,
        syn_retransmits: row.syn_retransmits,
        resets_sent: row.resets_sent,
        resets_received: row.resets_received,
        connect_failed: errnos(&row.connect_failed),
        connection_errors: errnos(&row.connection_errors),
    }
}

pub(crate) fn sched(s: &SchedStats) -> pb::SchedTelemetry {
    pb::SchedTelemetry {
        runq_latency: Some(histogram(&s.runq_latency)),
        switches: s.switches,
        involuntary_switches: s.involuntary_switches,
    }
}

pub(crate) fn block(b: &BlockStats) -> pb::BlockTelemetry {
    pb::BlockTelemetry {
        device: format!("{}:{}", b.device.0, b.device.1),
        latency: Some(histogram(&b.latency)),
        read_bytes: b.read_bytes,
        write_bytes: b.write_bytes,
        read_ops: b.read_ops,
        write_ops: b.write_ops,
        errors: b.errors,
    }
}

/// An event, attributed to the target named `target`.
pub(crate) fn event(e: &TelemetryEvent, target: &str) -> pb::TelemetryEvent {
    let addr = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    let mut wire = pb::TelemetryEvent {
        at_unix_ms: unix_ms(e.time()),
        target: target.to_string(),
        pid: e.pid(),
        ..Default::default()
    };
    match e {
        TelemetryEvent::ConnectFailed(c) => {
            wire.kind = "connect-failed".into();
            wire.comm = c.comm.clone();
            wire.errno = c.errno;
            wire.local = addr(c.local);
            wire.remote = addr(c.remote);
            wire.duration_us = micros(c.elapsed);
        }
        TelemetryEvent::ConnectionError(c) => {
            wire.kind = "connection-error".into();
            wire.comm = c.comm.clone();
            wire.errno = c.errno;
            wire.local = addr(c.local);
            wire.remote = addr(c.remote);
            wire.duration_us = micros(c.lifetime);
        }
        TelemetryEvent::OomKill(o) => {
            wire.kind = "oom-kill".into();
            wire.comm = o.comm.clone();
            wire.other_pid = o.trigger_pid;
            wire.detail = format!(
                "triggered by {} (pid {}); victim address space {} MiB",
                o.trigger_comm,
                o.trigger_pid,
                o.total_vm / (1024 * 1024)
            );
        }
        TelemetryEvent::Exec(x) => {
            wire.kind = "exec".into();
            wire.comm = x.comm.clone();
            wire.other_pid = x.ppid;
            wire.detail = x.filename.clone();
        }
        TelemetryEvent::Exit(x) => {
            wire.kind = "exit".into();
            wire.comm = x.comm.clone();
            wire.other_pid = x.ppid;
            wire.exit_code = x.code;
            wire.signal = x.signal;
            wire.core_dumped = x.core_dumped;
            wire.duration_us = micros(x.runtime);
        }
    }
    wire
}

/// How a group is collected: `bpf`, `fallback` or `none`, with the detail.
pub(crate) fn source(status: &GroupStatus) -> pb::TelemetrySource {
    let (mechanism, detail) = match &status.state {
        GroupState::Loaded { programs, notes } => {
            let mut detail = programs.join(", ");
            if let Some(h) = &status.hierarchy {
                detail.push_str(&format!("; cgroups: {}", h.kind));
            }
            for note in notes {
                detail.push_str(&format!("; {note}"));
            }
            ("bpf", detail)
        }
        GroupState::Fallback { reason, fallback } => (
            "fallback",
            format!("{fallback} (programs not loaded: {reason})"),
        ),
        GroupState::Failed { reason } => ("none", reason.clone()),
        GroupState::Disabled => ("none", "disabled".to_string()),
    };
    pb::TelemetrySource {
        group: status.group.name().to_string(),
        mechanism: mechanism.to_string(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_bpf::{ConnectFailed, Exit, Group, libc_errno};

    #[test]
    fn rows_and_histograms_keep_what_reports_need() {
        let mut h = Log2Histogram::default();
        h.buckets[3] = 5;
        h.buckets[7] = 1;
        h.count = 6;
        h.sum = Duration::from_micros(400);
        h.max = Duration::from_micros(150);
        let wire = histogram(&h);
        assert_eq!(wire.buckets, vec![0, 0, 0, 5, 0, 0, 0, 1]);
        assert_eq!(
            (wire.count, wire.sum_ns, wire.max_ns),
            (6, 400_000, 150_000)
        );
        assert!(histogram(&Log2Histogram::default()).buckets.is_empty());

        let row = TcpStats {
            cgroup_id: 9,
            peer: Some("10.0.0.5".parse().unwrap()),
            port: 5432,
            retransmits: 4,
            syn_retransmits: 3,
            connect_failed: [(libc_errno::ETIMEDOUT, 2), (libc_errno::ECONNREFUSED, 0)]
                .into_iter()
                .collect(),
            ..TcpStats::default()
        };
        let wire = tcp(&row);
        assert_eq!((wire.peer.as_str(), wire.port), ("10.0.0.5", 5432));
        assert!(!wire.inbound);
        assert_eq!(
            wire.connect_failed,
            vec![pb::ErrnoCount {
                errno: 110,
                count: 2
            }]
        );
    }

    #[test]
    fn events_carry_kind_target_and_outcome() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let failed = TelemetryEvent::ConnectFailed(ConnectFailed {
            time: at,
            pid: 42,
            tid: 43,
            comm: "curl".into(),
            cgroup_id: 7,
            local: None,
            remote: Some("10.0.0.5:5432".parse().unwrap()),
            errno: libc_errno::ECONNREFUSED,
            elapsed: Duration::from_micros(250),
        });
        let wire = event(&failed, "api");
        assert_eq!(
            (
                wire.kind.as_str(),
                wire.target.as_str(),
                wire.pid,
                wire.errno,
                wire.remote.as_str(),
                wire.at_unix_ms,
                wire.duration_us
            ),
            (
                "connect-failed",
                "api",
                42,
                111,
                "10.0.0.5:5432",
                1_700_000_000_123,
                250
            )
        );
        let killed = TelemetryEvent::Exit(Exit {
            time: at,
            pid: 50,
            tid: 50,
            comm: "sleep".into(),
            cgroup_id: 7,
            ppid: 1,
            code: None,
            signal: Some(9),
            core_dumped: false,
            runtime: Duration::from_millis(3),
        });
        let wire = event(&killed, "api");
        assert_eq!(
            (
                wire.kind.as_str(),
                wire.signal,
                wire.exit_code,
                wire.other_pid
            ),
            ("exit", Some(9), None, 1)
        );
        let status = GroupStatus {
            group: Group::Tcp,
            state: GroupState::Fallback {
                reason: "no BTF".into(),
                fallback: "/proc/net/snmp".into(),
            },
            hierarchy: None,
        };
        let source = source(&status);
        assert_eq!(
            (source.group.as_str(), source.mechanism.as_str()),
            ("tcp", "fallback")
        );
        assert!(source.detail.contains("no BTF"), "{}", source.detail);
    }
}
