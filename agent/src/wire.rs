//! Wire -> domain conversion of the faults (and probe requests) the coordinator sends.
//!
//! The inverse of the coordinator's `fault_to_wire`, and a gate: what comes out passes
//! [`check_spec`], the same rules a plan is held to, so a buggy or forged-but-signed
//! coordinator cannot make this agent run what no valid plan could hold (a 0-worker hog, a
//! 200% loss, a cgroup partition, pid 1...). Anything missing or out of range is refused with
//! a reason for the refusal report; nothing is defaulted.

use std::time::Duration;

use faultline_domain::fault::{
    Direction, FaultKind, FaultSpec, FillAmount, IoLimits, NetScope, PartitionMode, Protocol,
    Signal, TargetSelector,
};
use faultline_domain::plan::check_spec;
use faultline_proto::v1 as pb;

/// Converts a wire fault lasting `duration` into a checked [`FaultSpec`].
///
/// Errors read `no target`, `no fault kind` or name the offending field, e.g.
/// `loss: basis_points 10001 outside 1..=10000`.
pub fn fault_from_wire(fault: &pb::Fault, duration: Duration) -> Result<FaultSpec, String> {
    let target = fault
        .target
        .as_ref()
        .and_then(|target| target.selector.as_ref())
        .ok_or_else(|| "no target".to_string())
        .and_then(target_from_wire)?;
    let kind = fault
        .kind
        .as_ref()
        .ok_or_else(|| "no fault kind".to_string())
        .and_then(kind_from_wire)?;
    let spec = FaultSpec {
        kind,
        target,
        duration,
    };
    check_spec(&spec)?;
    Ok(spec)
}

/// The wire form of a probe request, as is: [`crate::probe::prepare`] checks it before anything
/// runs, and its refusals travel back in the probe's result.
pub fn probe_from_wire(probe: &pb::ProbeRequest) -> crate::probe::ProbeRequest {
    crate::probe::ProbeRequest {
        argv: probe.argv.clone(),
        timeout: Duration::from_millis(probe.timeout_ms),
    }
}

/// A non-empty string, or a refusal naming `what`.
fn text(value: &str, what: &str) -> Result<String, String> {
    if value.is_empty() {
        Err(format!("empty {what}"))
    } else {
        Ok(value.to_string())
    }
}

/// An optional string: unset is `None`, set-but-empty is refused.
fn optional_text(value: Option<&String>, what: &str) -> Result<Option<String>, String> {
    value.map(|value| text(value, what)).transpose()
}

/// A wire target selector as a domain one (also used for telemetry subscriptions).
pub fn target_from_wire(selector: &pb::target::Selector) -> Result<TargetSelector, String> {
    use pb::target::Selector;

    Ok(match selector {
        Selector::ContainerName(name) => TargetSelector::Container(text(name, "container name")?),
        Selector::ContainerLabel(label) => TargetSelector::Label(text(label, "container label")?),
        Selector::ContainerId(id) => TargetSelector::ContainerId(text(id, "container id")?),
        Selector::ContainerRegex(pattern) => {
            TargetSelector::ContainerRegex(text(pattern, "container regex")?)
        }
        Selector::CgroupPath(path) => TargetSelector::Cgroup(text(path, "cgroup path")?),
        Selector::Pid(pid) => TargetSelector::Pid(*pid),
        Selector::ProcessName(name) => TargetSelector::ProcessName(text(name, "process name")?),
    })
}

fn signal(name: &str) -> Result<Signal, String> {
    Signal::parse(&text(name, "signal")?)
}

fn kind_from_wire(kind: &pb::fault::Kind) -> Result<FaultKind, String> {
    use pb::fault::Kind;

    Ok(match kind {
        Kind::ContainerPause(_) => FaultKind::ContainerPause,
        Kind::ContainerStop(stop) => FaultKind::ContainerStop {
            grace_seconds: stop.grace_seconds,
        },
        Kind::ContainerKill(kill) => FaultKind::ContainerKill {
            signal: signal(&kill.signal)?,
            restart_on_revert: kill.restart_on_revert,
        },
        Kind::ContainerRestart(restart) => FaultKind::ContainerRestart {
            grace_seconds: restart.grace_seconds,
        },
        Kind::ContainerLimit(limit) => FaultKind::ContainerLimit {
            millicpus: limit.millicpus,
            memory_bytes: limit.memory_bytes,
        },
        Kind::NetworkDisconnect(disconnect) => FaultKind::NetworkDisconnect {
            network: text(&disconnect.network, "network")?,
        },
        Kind::Partition(partition) => FaultKind::Partition {
            scope: scope(partition.scope.as_ref())?,
            mode: mode(partition.mode)?,
        },
        Kind::Loss(loss) => FaultKind::Loss {
            scope: scope(loss.scope.as_ref())?,
            basis_points: loss.basis_points,
        },
        Kind::Latency(latency) => FaultKind::Latency {
            scope: scope(latency.scope.as_ref())?,
            delay_ms: latency.delay_ms,
            jitter_ms: latency.jitter_ms,
        },
        Kind::Duplicate(duplicate) => FaultKind::Duplicate {
            scope: scope(duplicate.scope.as_ref())?,
            basis_points: duplicate.basis_points,
        },
        Kind::Corrupt(corrupt) => FaultKind::Corrupt {
            scope: scope(corrupt.scope.as_ref())?,
            basis_points: corrupt.basis_points,
        },
        Kind::Reorder(reorder) => FaultKind::Reorder {
            scope: scope(reorder.scope.as_ref())?,
            basis_points: reorder.basis_points,
            delay_ms: reorder.delay_ms,
        },
        Kind::Bandwidth(bandwidth) => FaultKind::Bandwidth {
            rate_bps: bandwidth.rate_bps,
        },
        Kind::Dns(dns) => FaultKind::Dns {
            mode: mode(dns.mode)?,
        },
        Kind::CpuThrottle(throttle) => FaultKind::CpuThrottle {
            millicpus: throttle.millicpus,
        },
        Kind::MemoryLimit(limit) => FaultKind::MemoryLimit { bytes: limit.bytes },
        Kind::IoThrottle(throttle) => {
            let limits = throttle
                .limits
                .as_ref()
                .ok_or_else(|| "io-throttle: no limits".to_string())?;
            FaultKind::IoThrottle {
                limits: IoLimits {
                    device: optional_text(limits.device.as_ref(), "io-throttle device")?,
                    read_bps: limits.read_bps,
                    write_bps: limits.write_bps,
                    read_iops: limits.read_iops,
                    write_iops: limits.write_iops,
                },
            }
        }
        Kind::PidsLimit(limit) => FaultKind::PidsLimit { max: limit.max },
        Kind::Freeze(_) => FaultKind::Freeze,
        Kind::CpuHog(hog) => FaultKind::CpuHog {
            workers: hog.workers,
            load_percent: u8::try_from(hog.load_percent).map_err(|_| {
                format!("cpu-hog: load_percent {} outside 1..=100", hog.load_percent)
            })?,
        },
        Kind::MemoryHog(hog) => FaultKind::MemoryHog { bytes: hog.bytes },
        Kind::IoHog(hog) => FaultKind::IoHog {
            workers: hog.workers,
        },
        Kind::DiskFill(fill) => FaultKind::DiskFill {
            path: optional_text(fill.path.as_ref(), "disk-fill path")?,
            amount: match fill.amount {
                None => return Err("disk-fill: no amount".into()),
                Some(pb::disk_fill::Amount::Percent(percent)) => FillAmount::Percent(
                    u8::try_from(percent)
                        .map_err(|_| format!("disk-fill: percent {percent} outside 1..=100"))?,
                ),
                Some(pb::disk_fill::Amount::Bytes(bytes)) => FillAmount::Bytes(bytes),
            },
        },
        Kind::ProcessKill(kill) => FaultKind::ProcessKill {
            signal: signal(&kill.signal)?,
            name: optional_text(kill.name.as_ref(), "process name")?,
            count: kill.count,
            interval_ms: kill.interval_ms,
        },
        Kind::ProcessStop(stop) => FaultKind::ProcessStop {
            name: optional_text(stop.name.as_ref(), "process name")?,
        },
    })
}

fn scope(scope: Option<&pb::NetScope>) -> Result<NetScope, String> {
    let scope = scope.ok_or_else(|| "no network scope".to_string())?;
    let ports = scope
        .ports
        .iter()
        .map(|port| match u16::try_from(*port) {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("port {port} outside 1..=65535")),
        })
        .collect::<Result<Vec<u16>, String>>()?;
    let protocol = match pb::Protocol::try_from(scope.protocol) {
        Ok(pb::Protocol::Any) => Protocol::Any,
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        Ok(pb::Protocol::Icmp) => Protocol::Icmp,
        Ok(pb::Protocol::Unspecified) | Err(_) => {
            return Err(format!(
                "unspecified or unknown protocol {}",
                scope.protocol
            ));
        }
    };
    let direction = match pb::Direction::try_from(scope.direction) {
        Ok(pb::Direction::Both) => Direction::Both,
        Ok(pb::Direction::Ingress) => Direction::Ingress,
        Ok(pb::Direction::Egress) => Direction::Egress,
        Ok(pb::Direction::Unspecified) | Err(_) => {
            return Err(format!(
                "unspecified or unknown direction {}",
                scope.direction
            ));
        }
    };
    Ok(NetScope {
        peers: scope.peers.clone(),
        ports,
        protocol,
        direction,
    })
}

fn mode(mode: i32) -> Result<PartitionMode, String> {
    match pb::PartitionMode::try_from(mode) {
        Ok(pb::PartitionMode::Drop) => Ok(PartitionMode::Drop),
        Ok(pb::PartitionMode::Reject) => Ok(PartitionMode::Reject),
        Ok(pb::PartitionMode::Unspecified) | Err(_) => {
            Err(format!("unspecified or unknown partition mode {mode}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn fault(target: pb::target::Selector, kind: pb::fault::Kind) -> pb::Fault {
        pb::Fault {
            target: Some(pb::Target {
                selector: Some(target),
            }),
            kind: Some(kind),
        }
    }

    fn db() -> pb::target::Selector {
        pb::target::Selector::ContainerName("db".into())
    }

    fn all() -> Option<pb::NetScope> {
        Some(pb::NetScope {
            peers: vec![],
            ports: vec![],
            protocol: pb::Protocol::Any.into(),
            direction: pb::Direction::Both.into(),
        })
    }

    #[test]
    fn good_faults_convert() {
        let spec = fault_from_wire(
            &fault(
                pb::target::Selector::CgroupPath("system.slice/x.service".into()),
                pb::fault::Kind::CpuHog(pb::CpuHog {
                    workers: 2,
                    load_percent: 50,
                }),
            ),
            SECOND,
        )
        .unwrap();
        assert_eq!(
            spec,
            FaultSpec {
                kind: FaultKind::CpuHog {
                    workers: 2,
                    load_percent: 50
                },
                target: TargetSelector::Cgroup("system.slice/x.service".into()),
                duration: SECOND,
            }
        );
        let spec = fault_from_wire(
            &fault(
                pb::target::Selector::Pid(42),
                pb::fault::Kind::Loss(pb::Loss {
                    scope: Some(pb::NetScope {
                        peers: vec!["10.0.0.0/8".into()],
                        ports: vec![53],
                        protocol: pb::Protocol::Udp.into(),
                        direction: pb::Direction::Ingress.into(),
                    }),
                    basis_points: 10_000,
                }),
            ),
            SECOND,
        )
        .unwrap();
        assert_eq!(
            spec.kind,
            FaultKind::Loss {
                scope: NetScope {
                    peers: vec!["10.0.0.0/8".into()],
                    ports: vec![53],
                    protocol: Protocol::Udp,
                    direction: Direction::Ingress,
                },
                basis_points: 10_000,
            }
        );
    }

    /// Each malformed or out-of-range wire fault, and a word of why it is refused.
    #[test]
    fn incomplete_or_out_of_range_faults_are_refused() {
        use pb::fault::Kind;
        use pb::target::Selector;

        let loss = |basis_points| {
            Kind::Loss(pb::Loss {
                scope: all(),
                basis_points,
            })
        };
        let with_scope = |scope: pb::NetScope| {
            Kind::Partition(pb::Partition {
                scope: Some(scope),
                mode: pb::PartitionMode::Drop.into(),
            })
        };
        let base_scope = || all().unwrap_or_default();
        let cases: Vec<(pb::Fault, &str)> = vec![
            (
                pb::Fault {
                    target: None,
                    kind: Some(Kind::Freeze(pb::Freeze {})),
                },
                "no target",
            ),
            (
                pb::Fault {
                    target: Some(pb::Target { selector: None }),
                    kind: Some(Kind::Freeze(pb::Freeze {})),
                },
                "no target",
            ),
            (
                pb::Fault {
                    target: Some(pb::Target {
                        selector: Some(db()),
                    }),
                    kind: None,
                },
                "no fault kind",
            ),
            (
                fault(
                    Selector::ContainerName(String::new()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "empty container name",
            ),
            (
                fault(
                    Selector::ContainerRegex(String::new()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "empty container regex",
            ),
            (
                fault(
                    Selector::ContainerRegex("(".into()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "invalid regular expression",
            ),
            (
                fault(
                    Selector::CgroupPath("/".into()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "invalid cgroup path",
            ),
            (
                fault(
                    Selector::CgroupPath("a/../../b".into()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "`..`",
            ),
            (
                fault(Selector::Pid(0), Kind::Freeze(pb::Freeze {})),
                "pid 0",
            ),
            (fault(Selector::Pid(1), Kind::Freeze(pb::Freeze {})), "init"),
            (
                fault(
                    Selector::ProcessName(String::new()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "empty process name",
            ),
            (
                fault(
                    Selector::ContainerId("ABC".into()),
                    Kind::Freeze(pb::Freeze {}),
                ),
                "invalid container id",
            ),
            (
                fault(
                    Selector::Pid(5),
                    Kind::ContainerPause(pb::ContainerPause {}),
                ),
                "needs a container target",
            ),
            (
                fault(
                    Selector::CgroupPath("a".into()),
                    Kind::Dns(pb::Dns {
                        mode: pb::PartitionMode::Drop.into(),
                    }),
                ),
                "no network namespace",
            ),
            (
                fault(
                    db(),
                    Kind::ContainerKill(pb::ContainerKill {
                        signal: "SIGNOPE".into(),
                        restart_on_revert: true,
                    }),
                ),
                "unknown signal",
            ),
            (
                fault(
                    db(),
                    Kind::ContainerKill(pb::ContainerKill {
                        signal: String::new(),
                        restart_on_revert: true,
                    }),
                ),
                "empty signal",
            ),
            (
                fault(
                    db(),
                    Kind::ContainerStop(pb::ContainerStop { grace_seconds: 301 }),
                ),
                "grace_seconds 301",
            ),
            (
                fault(
                    db(),
                    Kind::ContainerLimit(pb::ContainerLimit {
                        millicpus: None,
                        memory_bytes: None,
                    }),
                ),
                "needs millicpus, memory_bytes or both",
            ),
            (
                fault(
                    db(),
                    Kind::NetworkDisconnect(pb::NetworkDisconnect {
                        network: String::new(),
                    }),
                ),
                "empty network",
            ),
            (fault(db(), loss(0)), "basis_points 0 outside 1..=10000"),
            (fault(db(), loss(10_001)), "basis_points 10001"),
            (
                fault(
                    db(),
                    Kind::Loss(pb::Loss {
                        scope: None,
                        basis_points: 5,
                    }),
                ),
                "no network scope",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        ports: vec![0],
                        ..base_scope()
                    }),
                ),
                "port 0 outside 1..=65535",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        ports: vec![65_536],
                        ..base_scope()
                    }),
                ),
                "port 65536 outside 1..=65535",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        ports: vec![80],
                        protocol: pb::Protocol::Icmp.into(),
                        ..base_scope()
                    }),
                ),
                "icmp has no ports",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        protocol: pb::Protocol::Unspecified.into(),
                        ..base_scope()
                    }),
                ),
                "unspecified or unknown protocol 0",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        protocol: 99,
                        ..base_scope()
                    }),
                ),
                "unknown protocol 99",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        direction: 0,
                        ..base_scope()
                    }),
                ),
                "unspecified or unknown direction 0",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        peers: vec!["not-a-net".into()],
                        ..base_scope()
                    }),
                ),
                "invalid peer",
            ),
            (
                fault(
                    db(),
                    with_scope(pb::NetScope {
                        peers: vec!["10.0.0.1/8".into()],
                        ..base_scope()
                    }),
                ),
                "bits are set",
            ),
            (
                fault(
                    db(),
                    Kind::Partition(pb::Partition {
                        scope: all(),
                        mode: 0,
                    }),
                ),
                "unspecified or unknown partition mode 0",
            ),
            (
                fault(
                    db(),
                    Kind::Latency(pb::Latency {
                        scope: all(),
                        delay_ms: 0,
                        jitter_ms: 0,
                    }),
                ),
                "delay_ms 0",
            ),
            (
                fault(
                    db(),
                    Kind::Latency(pb::Latency {
                        scope: all(),
                        delay_ms: 10,
                        jitter_ms: 20,
                    }),
                ),
                "jitter_ms 20",
            ),
            (
                fault(
                    db(),
                    Kind::Reorder(pb::Reorder {
                        scope: all(),
                        basis_points: 50,
                        delay_ms: 60_001,
                    }),
                ),
                "delay_ms 60001",
            ),
            (
                fault(db(), Kind::Bandwidth(pb::Bandwidth { rate_bps: 0 })),
                "rate_bps 0",
            ),
            (
                fault(db(), Kind::CpuThrottle(pb::CpuThrottle { millicpus: 0 })),
                "millicpus 0",
            ),
            (
                fault(db(), Kind::MemoryLimit(pb::MemoryLimit { bytes: 1 })),
                "bytes 1 outside",
            ),
            (
                fault(db(), Kind::IoThrottle(pb::IoThrottle { limits: None })),
                "no limits",
            ),
            (
                fault(
                    db(),
                    Kind::IoThrottle(pb::IoThrottle {
                        limits: Some(pb::IoLimits::default()),
                    }),
                ),
                "at least one of",
            ),
            (
                fault(
                    db(),
                    Kind::IoThrottle(pb::IoThrottle {
                        limits: Some(pb::IoLimits {
                            device: Some(String::new()),
                            read_bps: Some(1),
                            ..pb::IoLimits::default()
                        }),
                    }),
                ),
                "empty io-throttle device",
            ),
            (
                fault(
                    db(),
                    Kind::IoThrottle(pb::IoThrottle {
                        limits: Some(pb::IoLimits {
                            write_iops: Some(0),
                            ..pb::IoLimits::default()
                        }),
                    }),
                ),
                "write_iops 0",
            ),
            (
                fault(db(), Kind::PidsLimit(pb::PidsLimit { max: 0 })),
                "max 0",
            ),
            (
                fault(
                    db(),
                    Kind::CpuHog(pb::CpuHog {
                        workers: 0,
                        load_percent: 50,
                    }),
                ),
                "workers 0",
            ),
            (
                fault(
                    db(),
                    Kind::CpuHog(pb::CpuHog {
                        workers: 1,
                        load_percent: 0,
                    }),
                ),
                "load_percent 0",
            ),
            (
                fault(
                    db(),
                    Kind::CpuHog(pb::CpuHog {
                        workers: 1,
                        load_percent: 300,
                    }),
                ),
                "load_percent 300",
            ),
            (
                fault(db(), Kind::IoHog(pb::IoHog { workers: 257 })),
                "workers 257",
            ),
            (
                fault(db(), Kind::MemoryHog(pb::MemoryHog { bytes: 0 })),
                "bytes 0",
            ),
            (
                fault(
                    db(),
                    Kind::DiskFill(pb::DiskFill {
                        path: None,
                        amount: None,
                    }),
                ),
                "no amount",
            ),
            (
                fault(
                    db(),
                    Kind::DiskFill(pb::DiskFill {
                        path: None,
                        amount: Some(pb::disk_fill::Amount::Percent(101)),
                    }),
                ),
                "percent 101",
            ),
            (
                fault(
                    db(),
                    Kind::DiskFill(pb::DiskFill {
                        path: None,
                        amount: Some(pb::disk_fill::Amount::Percent(256)),
                    }),
                ),
                "percent 256",
            ),
            (
                fault(
                    db(),
                    Kind::DiskFill(pb::DiskFill {
                        path: Some("etc".into()),
                        amount: Some(pb::disk_fill::Amount::Bytes(1)),
                    }),
                ),
                "absolute",
            ),
            (
                fault(
                    db(),
                    Kind::ProcessKill(pb::ProcessKill {
                        signal: "SIGKILL".into(),
                        name: None,
                        count: 0,
                        interval_ms: 1000,
                    }),
                ),
                "count 0",
            ),
            (
                fault(
                    db(),
                    Kind::ProcessKill(pb::ProcessKill {
                        signal: "SIGKILL".into(),
                        name: None,
                        count: 1,
                        interval_ms: 0,
                    }),
                ),
                "interval_ms 0",
            ),
            (
                fault(
                    Selector::Pid(7),
                    Kind::ProcessStop(pb::ProcessStop {
                        name: Some("x".into()),
                    }),
                ),
                "already names the process",
            ),
            (
                fault(
                    db(),
                    Kind::ProcessStop(pb::ProcessStop {
                        name: Some(String::new()),
                    }),
                ),
                "empty process name",
            ),
        ];
        for (wire, fragment) in cases {
            let err = fault_from_wire(&wire, SECOND).unwrap_err();
            assert!(
                err.contains(fragment),
                "{wire:?}: {err:?} lacks {fragment:?}"
            );
        }
        let freeze = fault(db(), Kind::Freeze(pb::Freeze {}));
        assert!(
            fault_from_wire(&freeze, Duration::ZERO)
                .unwrap_err()
                .contains("duration")
        );
        assert!(
            fault_from_wire(&freeze, Duration::from_secs(24 * 3600 + 1))
                .unwrap_err()
                .contains("duration")
        );
    }
}
