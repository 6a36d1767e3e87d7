//! Domain -> wire conversion for what the coordinator sends to agents.
//!
//! Total: every fault kind and every target selector has a wire form. Agents convert back with
//! `faultline_agent::wire::fault_from_wire`, which refuses anything a plan could not hold; the
//! integration test `wire_roundtrip` checks that the two are inverse for every kind.

use faultline_domain::fault::{
    Direction, FaultKind, FaultSpec, FillAmount, IoLimits, NetScope, PartitionMode, Protocol,
    TargetSelector,
};
use faultline_proto::v1 as pb;

/// The wire form of a planned fault (the duration travels in `ApplyFault.duration_ms`).
pub fn fault_to_wire(spec: &FaultSpec) -> pb::Fault {
    pb::Fault {
        target: Some(target_to_wire(&spec.target)),
        kind: Some(kind_to_wire(&spec.kind)),
    }
}

/// The wire form of a target selector.
pub fn target_to_wire(target: &TargetSelector) -> pb::Target {
    use pb::target::Selector;

    let selector = match target {
        TargetSelector::Container(name) => Selector::ContainerName(name.clone()),
        TargetSelector::ContainerId(id) => Selector::ContainerId(id.clone()),
        TargetSelector::Label(label) => Selector::ContainerLabel(label.clone()),
        TargetSelector::ContainerRegex(pattern) => Selector::ContainerRegex(pattern.clone()),
        TargetSelector::Cgroup(path) => Selector::CgroupPath(path.clone()),
        TargetSelector::Pid(pid) => Selector::Pid(*pid),
        TargetSelector::ProcessName(name) => Selector::ProcessName(name.clone()),
    };
    pb::Target {
        selector: Some(selector),
    }
}

fn kind_to_wire(kind: &FaultKind) -> pb::fault::Kind {
    use pb::fault::Kind;

    match kind {
        FaultKind::ContainerPause => Kind::ContainerPause(pb::ContainerPause {}),
        FaultKind::ContainerStop { grace_seconds } => Kind::ContainerStop(pb::ContainerStop {
            grace_seconds: *grace_seconds,
        }),
        FaultKind::ContainerKill {
            signal,
            restart_on_revert,
        } => Kind::ContainerKill(pb::ContainerKill {
            signal: signal.name().to_string(),
            restart_on_revert: *restart_on_revert,
        }),
        FaultKind::ContainerRestart { grace_seconds } => {
            Kind::ContainerRestart(pb::ContainerRestart {
                grace_seconds: *grace_seconds,
            })
        }
        FaultKind::ContainerLimit {
            millicpus,
            memory_bytes,
        } => Kind::ContainerLimit(pb::ContainerLimit {
            millicpus: *millicpus,
            memory_bytes: *memory_bytes,
        }),
        FaultKind::NetworkDisconnect { network } => {
            Kind::NetworkDisconnect(pb::NetworkDisconnect {
                network: network.clone(),
            })
        }
        FaultKind::Partition { scope, mode } => Kind::Partition(pb::Partition {
            scope: Some(scope_to_wire(scope)),
            mode: mode_to_wire(*mode).into(),
        }),
        FaultKind::Loss {
            scope,
            basis_points,
        } => Kind::Loss(pb::Loss {
            scope: Some(scope_to_wire(scope)),
            basis_points: *basis_points,
        }),
        FaultKind::Latency {
            scope,
            delay_ms,
            jitter_ms,
        } => Kind::Latency(pb::Latency {
            scope: Some(scope_to_wire(scope)),
            delay_ms: *delay_ms,
            jitter_ms: *jitter_ms,
        }),
        FaultKind::Duplicate {
            scope,
            basis_points,
        } => Kind::Duplicate(pb::Duplicate {
            scope: Some(scope_to_wire(scope)),
            basis_points: *basis_points,
        }),
        FaultKind::Corrupt {
            scope,
            basis_points,
        } => Kind::Corrupt(pb::Corrupt {
            scope: Some(scope_to_wire(scope)),
            basis_points: *basis_points,
        }),
        FaultKind::Reorder {
            scope,
            basis_points,
            delay_ms,
        } => Kind::Reorder(pb::Reorder {
            scope: Some(scope_to_wire(scope)),
            basis_points: *basis_points,
            delay_ms: *delay_ms,
        }),
        FaultKind::Bandwidth { rate_bps } => Kind::Bandwidth(pb::Bandwidth {
            rate_bps: *rate_bps,
        }),
        FaultKind::Dns { mode } => Kind::Dns(pb::Dns {
            mode: mode_to_wire(*mode).into(),
        }),
        FaultKind::CpuThrottle { millicpus } => Kind::CpuThrottle(pb::CpuThrottle {
            millicpus: *millicpus,
        }),
        FaultKind::MemoryLimit { bytes } => Kind::MemoryLimit(pb::MemoryLimit { bytes: *bytes }),
        FaultKind::IoThrottle { limits } => Kind::IoThrottle(pb::IoThrottle {
            limits: Some(io_limits_to_wire(limits)),
        }),
        FaultKind::PidsLimit { max } => Kind::PidsLimit(pb::PidsLimit { max: *max }),
        FaultKind::Freeze => Kind::Freeze(pb::Freeze {}),
        FaultKind::CpuHog {
            workers,
            load_percent,
        } => Kind::CpuHog(pb::CpuHog {
            workers: *workers,
            load_percent: u32::from(*load_percent),
        }),
        FaultKind::MemoryHog { bytes } => Kind::MemoryHog(pb::MemoryHog { bytes: *bytes }),
        FaultKind::IoHog { workers } => Kind::IoHog(pb::IoHog { workers: *workers }),
        FaultKind::DiskFill { path, amount } => Kind::DiskFill(pb::DiskFill {
            path: path.clone(),
            amount: Some(match amount {
                FillAmount::Percent(percent) => pb::disk_fill::Amount::Percent(u32::from(*percent)),
                FillAmount::Bytes(bytes) => pb::disk_fill::Amount::Bytes(*bytes),
            }),
        }),
        FaultKind::ProcessKill {
            signal,
            name,
            count,
            interval_ms,
        } => Kind::ProcessKill(pb::ProcessKill {
            signal: signal.name().to_string(),
            name: name.clone(),
            count: *count,
            interval_ms: *interval_ms,
        }),
        FaultKind::ProcessStop { name } => {
            Kind::ProcessStop(pb::ProcessStop { name: name.clone() })
        }
    }
}

fn scope_to_wire(scope: &NetScope) -> pb::NetScope {
    pb::NetScope {
        peers: scope.peers.clone(),
        ports: scope.ports.iter().copied().map(u32::from).collect(),
        protocol: match scope.protocol {
            Protocol::Any => pb::Protocol::Any,
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
            Protocol::Icmp => pb::Protocol::Icmp,
        }
        .into(),
        direction: match scope.direction {
            Direction::Both => pb::Direction::Both,
            Direction::Ingress => pb::Direction::Ingress,
            Direction::Egress => pb::Direction::Egress,
        }
        .into(),
    }
}

fn mode_to_wire(mode: PartitionMode) -> pb::PartitionMode {
    match mode {
        PartitionMode::Drop => pb::PartitionMode::Drop,
        PartitionMode::Reject => pb::PartitionMode::Reject,
    }
}

fn io_limits_to_wire(limits: &IoLimits) -> pb::IoLimits {
    pb::IoLimits {
        device: limits.device.clone(),
        read_bps: limits.read_bps,
        write_bps: limits.write_bps,
        read_iops: limits.read_iops,
        write_iops: limits.write_iops,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use faultline_domain::fault::Signal;
    use faultline_domain::plan::{example_kinds, example_selectors};

    use super::*;

    fn spec(kind: FaultKind, target: TargetSelector) -> FaultSpec {
        FaultSpec {
            kind,
            target,
            duration: Duration::from_secs(1),
        }
    }

    #[test]
    fn every_selector_maps_to_its_own_wire_field() {
        use pb::target::Selector;

        let expected = [
            Selector::ContainerName("db".into()),
            Selector::ContainerId("3f2a9c0d1e4b".into()),
            Selector::ContainerLabel("app=db".into()),
            Selector::ContainerRegex("^api-[0-9]+$".into()),
            Selector::CgroupPath("system.slice/nginx.service".into()),
            Selector::Pid(4242),
            Selector::ProcessName("postgres".into()),
        ];
        let selectors = example_selectors();
        assert_eq!(selectors.len(), expected.len());
        for (selector, expected) in selectors.iter().zip(expected) {
            assert_eq!(target_to_wire(selector).selector, Some(expected));
        }
    }

    #[test]
    fn every_fault_kind_maps_to_its_own_wire_kind() {
        // Each kind lands in a distinct oneof case, with every field carried.
        let mut cases = BTreeSet::new();
        for kind in example_kinds() {
            let wire = fault_to_wire(&spec(kind.clone(), TargetSelector::Pid(7)));
            assert_eq!(
                wire.target.and_then(|t| t.selector),
                Some(pb::target::Selector::Pid(7))
            );
            let Some(wire_kind) = wire.kind else {
                panic!("{kind:?} has no wire kind");
            };
            let case = format!("{wire_kind:?}");
            let case = case.split('(').next().unwrap_or_default().to_string();
            cases.insert((kind.name(), case));
        }
        let names: BTreeSet<&str> = cases.iter().map(|(name, _)| *name).collect();
        let wire_cases: BTreeSet<&String> = cases.iter().map(|(_, case)| case).collect();
        assert_eq!(names.len(), FaultKind::NAMES.len());
        assert_eq!(wire_cases.len(), FaultKind::NAMES.len(), "{cases:?}");
    }

    #[test]
    fn fields_keep_their_units() {
        let kill = spec(
            FaultKind::ContainerKill {
                signal: Signal::KILL,
                restart_on_revert: true,
            },
            TargetSelector::Label("app=db".into()),
        );
        assert_eq!(
            fault_to_wire(&kill).kind,
            Some(pb::fault::Kind::ContainerKill(pb::ContainerKill {
                signal: "SIGKILL".into(),
                restart_on_revert: true
            }))
        );
        let latency = spec(
            FaultKind::Latency {
                scope: NetScope {
                    peers: vec!["10.0.0.0/8".into()],
                    ports: vec![5432],
                    protocol: Protocol::Tcp,
                    direction: Direction::Egress,
                },
                delay_ms: 150,
                jitter_ms: 50,
            },
            TargetSelector::Container("api".into()),
        );
        assert_eq!(
            fault_to_wire(&latency).kind,
            Some(pb::fault::Kind::Latency(pb::Latency {
                scope: Some(pb::NetScope {
                    peers: vec!["10.0.0.0/8".into()],
                    ports: vec![5432],
                    protocol: pb::Protocol::Tcp.into(),
                    direction: pb::Direction::Egress.into(),
                }),
                delay_ms: 150,
                jitter_ms: 50,
            }))
        );
        // Defaults are sent explicitly, never as UNSPECIFIED.
        let partition = spec(
            FaultKind::Partition {
                scope: NetScope::default(),
                mode: PartitionMode::Drop,
            },
            TargetSelector::Pid(9),
        );
        assert_eq!(
            fault_to_wire(&partition).kind,
            Some(pb::fault::Kind::Partition(pb::Partition {
                scope: Some(pb::NetScope {
                    peers: vec![],
                    ports: vec![],
                    protocol: pb::Protocol::Any.into(),
                    direction: pb::Direction::Both.into(),
                }),
                mode: pb::PartitionMode::Drop.into(),
            }))
        );
        let fill = spec(
            FaultKind::DiskFill {
                path: None,
                amount: FillAmount::Percent(90),
            },
            TargetSelector::Container("db".into()),
        );
        assert_eq!(
            fault_to_wire(&fill).kind,
            Some(pb::fault::Kind::DiskFill(pb::DiskFill {
                path: None,
                amount: Some(pb::disk_fill::Amount::Percent(90)),
            }))
        );
        let limit = spec(
            FaultKind::ContainerLimit {
                millicpus: Some(100),
                memory_bytes: None,
            },
            TargetSelector::Container("db".into()),
        );
        assert_eq!(
            fault_to_wire(&limit).kind,
            Some(pb::fault::Kind::ContainerLimit(pb::ContainerLimit {
                millicpus: Some(100),
                memory_bytes: None,
            }))
        );
    }
}
