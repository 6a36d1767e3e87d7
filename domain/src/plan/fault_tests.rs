//! Table tests for every fault kind, target selector and cross-field rule of the plan format.

use std::collections::BTreeSet;
use std::time::Duration;

use super::tests::{AGENT, DURATION, TARGET, doc, fault_field, one_fault, problems};
use super::*;
use crate::fault::FaultFamily;

/// A plan with one fault of `kind`, the given target line and `extra` fields from line 10.
fn plan_with(kind: &str, target: &str, extra: &[&str]) -> String {
    let kind = format!("kind: {kind}");
    let mut fields = vec![kind.as_str(), AGENT, target, DURATION];
    fields.extend_from_slice(extra);
    one_fault(&fields)
}

fn parsed_kind(yaml: &str) -> FaultKind {
    match parse_plan(yaml) {
        Ok(plan) => plan.stages[0].faults[0].spec.kind.clone(),
        Err(errors) => panic!("{}\n{yaml}", render_errors("case", &errors)),
    }
}

fn scope(peers: &[&str], ports: &[u16], protocol: Protocol, direction: Direction) -> NetScope {
    NetScope {
        peers: peers.iter().map(|peer| (*peer).to_string()).collect(),
        ports: ports.to_vec(),
        protocol,
        direction,
    }
}

/// Every kind: its minimal form (defaults applied) and a form with every field set.
#[test]
fn every_kind_parses_with_its_defaults_and_with_every_field() {
    let all = NetScope::default();
    let term = Signal::parse("SIGTERM").unwrap();
    let cases: Vec<(&str, Vec<&str>, FaultKind)> = vec![
        ("container-pause", vec![], FaultKind::ContainerPause),
        (
            "container-stop",
            vec![],
            FaultKind::ContainerStop { grace_seconds: 10 },
        ),
        (
            "container-stop",
            vec!["grace: 0s"],
            FaultKind::ContainerStop { grace_seconds: 0 },
        ),
        (
            "container-kill",
            vec![],
            FaultKind::ContainerKill {
                signal: Signal::KILL,
                restart_on_revert: true,
            },
        ),
        (
            "container-kill",
            vec!["signal: hup", "restart: false"],
            FaultKind::ContainerKill {
                signal: Signal::parse("SIGHUP").unwrap(),
                restart_on_revert: false,
            },
        ),
        (
            "container-restart",
            vec![],
            FaultKind::ContainerRestart { grace_seconds: 10 },
        ),
        (
            "container-restart",
            vec!["grace: 1m"],
            FaultKind::ContainerRestart { grace_seconds: 60 },
        ),
        (
            "container-limit",
            vec!["cpus: 0.1"],
            FaultKind::ContainerLimit {
                millicpus: Some(100),
                memory_bytes: None,
            },
        ),
        (
            "container-limit",
            vec!["memory: 256Mi"],
            FaultKind::ContainerLimit {
                millicpus: None,
                memory_bytes: Some(256 << 20),
            },
        ),
        (
            "container-limit",
            vec!["cpus: 1.5", "memory: 1G"],
            FaultKind::ContainerLimit {
                millicpus: Some(1500),
                memory_bytes: Some(1_000_000_000),
            },
        ),
        (
            "container-limit",
            vec!["memory: 6291456"],
            FaultKind::ContainerLimit {
                millicpus: None,
                memory_bytes: Some(MIN_MEMORY_LIMIT),
            },
        ),
        (
            "network-disconnect",
            vec!["network: backend_net.1"],
            FaultKind::NetworkDisconnect {
                network: "backend_net.1".into(),
            },
        ),
        (
            "partition",
            vec![],
            FaultKind::Partition {
                scope: all.clone(),
                mode: PartitionMode::Drop,
            },
        ),
        (
            "partition",
            vec![
                "mode: reject",
                "scope: { peers: [10.0.0.0/8, 10.1.2.3, 'fd00::/8'], ports: [5432, \"80\"], \
                 protocol: tcp, direction: egress }",
            ],
            FaultKind::Partition {
                scope: scope(
                    &["10.0.0.0/8", "10.1.2.3/32", "fd00::/8"],
                    &[5432, 80],
                    Protocol::Tcp,
                    Direction::Egress,
                ),
                mode: PartitionMode::Reject,
            },
        ),
        (
            "partition",
            vec!["scope: {}"],
            FaultKind::Partition {
                scope: all.clone(),
                mode: PartitionMode::Drop,
            },
        ),
        (
            "loss",
            vec!["percent: 30"],
            FaultKind::Loss {
                scope: all.clone(),
                basis_points: 3000,
            },
        ),
        (
            "loss",
            vec![
                "percent: 0.01%",
                "scope: { direction: ingress, protocol: udp }",
            ],
            FaultKind::Loss {
                scope: scope(&[], &[], Protocol::Udp, Direction::Ingress),
                basis_points: 1,
            },
        ),
        (
            "latency",
            vec!["delay: 100ms"],
            FaultKind::Latency {
                scope: all.clone(),
                delay_ms: 100,
                jitter_ms: 0,
            },
        ),
        (
            "latency",
            vec!["delay: 1m", "jitter: 1m", "scope: { protocol: icmp }"],
            FaultKind::Latency {
                scope: scope(&[], &[], Protocol::Icmp, Direction::Both),
                delay_ms: 60_000,
                jitter_ms: 60_000,
            },
        ),
        (
            "duplicate",
            vec!["percent: 1"],
            FaultKind::Duplicate {
                scope: all.clone(),
                basis_points: 100,
            },
        ),
        (
            "corrupt",
            vec!["percent: 100%"],
            FaultKind::Corrupt {
                scope: all.clone(),
                basis_points: 10_000,
            },
        ),
        (
            "reorder",
            vec!["percent: 25"],
            FaultKind::Reorder {
                scope: all.clone(),
                basis_points: 2500,
                delay_ms: 10,
            },
        ),
        (
            "reorder",
            vec!["percent: 25", "delay: 50ms", "scope: { ports: [53] }"],
            FaultKind::Reorder {
                scope: scope(&[], &[53], Protocol::Any, Direction::Both),
                basis_points: 2500,
                delay_ms: 50,
            },
        ),
        (
            "bandwidth",
            vec!["rate: 1mbit"],
            FaultKind::Bandwidth {
                rate_bps: 1_000_000,
            },
        ),
        (
            "bandwidth",
            vec!["rate: 10mbps"],
            FaultKind::Bandwidth {
                rate_bps: 80_000_000,
            },
        ),
        (
            "bandwidth",
            vec!["rate: 500kbit"],
            FaultKind::Bandwidth { rate_bps: 500_000 },
        ),
        (
            "dns",
            vec![],
            FaultKind::Dns {
                mode: PartitionMode::Drop,
            },
        ),
        (
            "dns",
            vec!["mode: reject"],
            FaultKind::Dns {
                mode: PartitionMode::Reject,
            },
        ),
        (
            "cpu-throttle",
            vec!["cpus: 0.25"],
            FaultKind::CpuThrottle { millicpus: 250 },
        ),
        (
            "memory-limit",
            vec!["limit: 128Mi"],
            FaultKind::MemoryLimit { bytes: 128 << 20 },
        ),
        (
            "io-throttle",
            vec!["write_iops: 10"],
            FaultKind::IoThrottle {
                limits: IoLimits {
                    write_iops: Some(10),
                    ..IoLimits::default()
                },
            },
        ),
        (
            "io-throttle",
            vec![
                "device: \"8:16\"",
                "read_bps: 1Mi",
                "write_bps: 512Ki/s",
                "read_iops: 100",
                "write_iops: 50",
            ],
            FaultKind::IoThrottle {
                limits: IoLimits {
                    device: Some("8:16".into()),
                    read_bps: Some(1 << 20),
                    write_bps: Some(512 << 10),
                    read_iops: Some(100),
                    write_iops: Some(50),
                },
            },
        ),
        (
            "pids-limit",
            vec!["max: 64"],
            FaultKind::PidsLimit { max: 64 },
        ),
        ("freeze", vec![], FaultKind::Freeze),
        (
            "cpu-hog",
            vec![],
            FaultKind::CpuHog {
                workers: 1,
                load_percent: 100,
            },
        ),
        (
            "cpu-hog",
            vec!["workers: 256", "load: 80%"],
            FaultKind::CpuHog {
                workers: 256,
                load_percent: 80,
            },
        ),
        (
            "memory-hog",
            vec!["size: 1Gi"],
            FaultKind::MemoryHog { bytes: 1 << 30 },
        ),
        ("io-hog", vec![], FaultKind::IoHog { workers: 1 }),
        (
            "io-hog",
            vec!["workers: 2"],
            FaultKind::IoHog { workers: 2 },
        ),
        (
            "disk-fill",
            vec!["fill: 90%"],
            FaultKind::DiskFill {
                path: None,
                amount: FillAmount::Percent(90),
            },
        ),
        (
            "disk-fill",
            vec!["path: /var/lib/data", "fill: 5Gi"],
            FaultKind::DiskFill {
                path: Some("/var/lib/data".into()),
                amount: FillAmount::Bytes(5 << 30),
            },
        ),
        (
            "process-kill",
            vec![],
            FaultKind::ProcessKill {
                signal: Signal::KILL,
                name: None,
                count: 1,
                interval_ms: 1000,
            },
        ),
        (
            "process-kill",
            vec![
                "signal: term",
                "name: worker",
                "count: 1000",
                "interval: 200ms",
            ],
            FaultKind::ProcessKill {
                signal: term,
                name: Some("worker".into()),
                count: 1000,
                interval_ms: 200,
            },
        ),
        (
            "process-stop",
            vec![],
            FaultKind::ProcessStop { name: None },
        ),
        (
            "process-stop",
            vec!["name: postgres"],
            FaultKind::ProcessStop {
                name: Some("postgres".into()),
            },
        ),
    ];
    let mut covered = BTreeSet::new();
    for (kind, extra, expected) in cases {
        let yaml = plan_with(kind, TARGET, &extra);
        let parsed = parsed_kind(&yaml);
        assert_eq!(parsed, expected, "{kind} {extra:?}");
        let spec = FaultSpec {
            kind: parsed,
            target: TargetSelector::Container("db".into()),
            duration: Duration::from_secs(3),
        };
        assert_eq!(
            check_spec(&spec),
            Ok(()),
            "agents accept what plans produce"
        );
        covered.insert(kind);
    }
    let names: BTreeSet<&str> = FaultKind::NAMES.iter().copied().collect();
    assert_eq!(covered, names, "every kind is in this table");
}

/// Every target key, with the selector it stands for.
#[test]
fn every_target_key_parses_into_its_selector() {
    let cases: &[(&str, TargetSelector)] = &[
        ("{ container: db }", TargetSelector::Container("db".into())),
        (
            "{ container: \"re:^api-[0-9]+$\" }",
            TargetSelector::ContainerRegex("^api-[0-9]+$".into()),
        ),
        (
            "{ id: 3f2a9c0d1e4b }",
            TargetSelector::ContainerId("3f2a9c0d1e4b".into()),
        ),
        (
            "{ id: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef }",
            TargetSelector::ContainerId("0123456789abcdef".repeat(4)),
        ),
        (
            "{ label: \"app=db\" }",
            TargetSelector::Label("app=db".into()),
        ),
        (
            "{ cgroup: /system.slice/nginx.service }",
            TargetSelector::Cgroup("system.slice/nginx.service".into()),
        ),
        (
            "{ cgroup: system.slice/nginx.service }",
            TargetSelector::Cgroup("system.slice/nginx.service".into()),
        ),
        ("{ pid: 4242 }", TargetSelector::Pid(4242)),
        ("{ pid: 2 }", TargetSelector::Pid(2)),
        ("{ pid: 4194304 }", TargetSelector::Pid(4_194_304)),
        (
            "{ process: postgres }",
            TargetSelector::ProcessName("postgres".into()),
        ),
        (
            "{ process: 123456789012345 }",
            TargetSelector::ProcessName("123456789012345".into()),
        ),
    ];
    let mut variants = BTreeSet::new();
    for (target, expected) in cases {
        let yaml = plan_with("freeze", &format!("target: {target}"), &[]);
        let plan = parse_plan(&yaml)
            .unwrap_or_else(|errors| panic!("{}\n{yaml}", render_errors("case", &errors)));
        assert_eq!(plan.stages[0].faults[0].spec.target, *expected, "{target}");
        variants.insert(format!("{:?}", std::mem::discriminant(expected)));
    }
    assert_eq!(variants.len(), 7, "every selector is in this table");
}

/// Which targets each kind accepts; a wrong one is reported at `target`.
#[test]
fn every_kind_accepts_exactly_the_targets_it_can_act_on() {
    let targets: &[(&str, &str)] = &[
        ("{ container: db }", "container"),
        ("{ id: 3f2a9c0d1e4b }", "container"),
        ("{ label: app=db }", "container"),
        ("{ container: \"re:^db$\" }", "container"),
        ("{ cgroup: system.slice/x.service }", "cgroup"),
        ("{ pid: 42 }", "process"),
        ("{ process: postgres }", "process"),
    ];
    // Minimal valid fields of every kind.
    let minimal: &[(&str, &[&str])] = &[
        ("container-pause", &[]),
        ("container-stop", &[]),
        ("container-kill", &[]),
        ("container-restart", &[]),
        ("container-limit", &["cpus: 1"]),
        ("network-disconnect", &["network: n"]),
        ("partition", &[]),
        ("loss", &["percent: 1"]),
        ("latency", &["delay: 1ms"]),
        ("duplicate", &["percent: 1"]),
        ("corrupt", &["percent: 1"]),
        ("reorder", &["percent: 1"]),
        ("bandwidth", &["rate: 1bit"]),
        ("dns", &[]),
        ("cpu-throttle", &["cpus: 1"]),
        ("memory-limit", &["limit: 6Mi"]),
        ("io-throttle", &["read_iops: 1"]),
        ("pids-limit", &["max: 1"]),
        ("freeze", &[]),
        ("cpu-hog", &[]),
        ("memory-hog", &["size: 1"]),
        ("io-hog", &[]),
        ("disk-fill", &["fill: 1"]),
        ("process-kill", &[]),
        ("process-stop", &[]),
    ];
    assert_eq!(
        minimal.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(),
        FaultKind::NAMES
    );
    for (kind, extra) in minimal {
        let family = parsed_kind(&plan_with(kind, TARGET, extra)).family();
        for (target, what) in targets {
            let accepted = match family {
                FaultFamily::Container => *what == "container",
                FaultFamily::Resource => true,
                FaultFamily::Stressor => *kind != "disk-fill" || *what != "cgroup",
                FaultFamily::Network | FaultFamily::Process => *what != "cgroup",
            };
            let yaml = plan_with(kind, &format!("target: {target}"), extra);
            match parse_plan(&yaml) {
                Ok(_) => assert!(accepted, "{kind} on {target} should be refused"),
                Err(errors) => {
                    assert!(!accepted, "{kind} on {target}: {errors:?}");
                    let found: Vec<(u32, &str)> =
                        errors.iter().map(|e| (e.line, e.field.as_str())).collect();
                    assert_eq!(
                        found,
                        [(8, "stages[0].faults[0].target")],
                        "{kind} {target}"
                    );
                    assert!(
                        errors[0].message.contains("needs a container"),
                        "{}",
                        errors[0].message
                    );
                }
            }
        }
    }
}

/// Every rule of every kind: the YAML, every `(line, field)` it must produce, and a word of the
/// first message. Fields of the fault start on line 6: kind 6, agent 7, target 8, duration 9,
/// then the extra fields from line 10.
#[test]
fn every_invalid_value_is_reported_at_its_field_and_line() {
    type Case = (&'static str, String, Vec<(u32, String)>, &'static str);
    let f = |name: &str| fault_field(0, name);
    let case = |kind: &str, extra: &[&str]| plan_with(kind, TARGET, extra);
    let on = |kind: &str, target: &str, extra: &[&str]| {
        plan_with(kind, &format!("target: {target}"), extra)
    };
    let cases: Vec<Case> = vec![
        // --- containers ----------------------------------------------------------------------
        (
            "restart grace in milliseconds",
            case("container-restart", &["grace: 1500ms"]),
            vec![(10, f("grace"))],
            "grace must be whole seconds, got 1s 500ms",
        ),
        (
            "restart grace too long",
            case("container-restart", &["grace: 6m"]),
            vec![(10, f("grace"))],
            "grace must be at most 5m",
        ),
        (
            "limit without limits",
            case("container-limit", &[]),
            vec![(6, f("cpus"))],
            "container-limit needs `cpus`, `memory` or both",
        ),
        (
            "limit of no cpus",
            case("container-limit", &["cpus: 0"]),
            vec![(10, f("cpus"))],
            "cpus must be greater than 0 and at most 1024 cpus, got 0",
        ),
        (
            "limit finer than a millicpu",
            case("container-limit", &["cpus: 0.0001"]),
            vec![(10, f("cpus"))],
            "cpus must have at most three decimals",
        ),
        (
            "limit of too many cpus",
            case("container-limit", &["cpus: 1025"]),
            vec![(10, f("cpus"))],
            "at most 1024 cpus",
        ),
        (
            "limit of too little memory",
            case("container-limit", &["memory: 1Mi"]),
            vec![(10, f("memory"))],
            "memory must be at least 6Mi",
        ),
        (
            "limit in docker's units",
            case("container-limit", &["memory: 512m"]),
            vec![(10, f("memory"))],
            "memory must not use the ambiguous size unit \"m\": write Mi",
        ),
        (
            "limit with two bad values",
            case("container-limit", &["cpus: half", "memory: lots"]),
            vec![(10, f("cpus")), (11, f("memory"))],
            "cpus must be a number of cpus",
        ),
        (
            "disconnect without network",
            case("network-disconnect", &[]),
            vec![(6, f("network"))],
            "missing required field `network`",
        ),
        (
            "disconnect from a bad network name",
            case("network-disconnect", &["network: /bridge"]),
            vec![(10, f("network"))],
            "invalid network name \"/bridge\"",
        ),
        (
            "restart on a restart",
            case("container-restart", &["restart: true"]),
            vec![(10, f("restart"))],
            "`restart` does not apply to container-restart; only container-kill takes it",
        ),
        // --- network -------------------------------------------------------------------------
        (
            "partition mode",
            case("partition", &["mode: block"]),
            vec![(10, f("mode"))],
            "mode must be drop (peers time out) or reject",
        ),
        (
            "peer that is no network",
            case("partition", &["scope: { peers: [10.0.0.0/33] }"]),
            vec![(10, f("scope.peers[0]"))],
            "invalid peer \"10.0.0.0/33\": expected a network in CIDR form",
        ),
        (
            "peer with host bits",
            case("partition", &["scope: { peers: [10.0.0.0/8, 10.1.2.3/8] }"]),
            vec![(10, f("scope.peers[1]"))],
            "did you mean 10.0.0.0/8 or 10.1.2.3/32?",
        ),
        (
            "peer by name",
            case("partition", &["scope: { peers: [db] }"]),
            vec![(10, f("scope.peers[0]"))],
            "expected an IP address",
        ),
        (
            "port 0",
            case("partition", &["scope: { ports: [0] }"]),
            vec![(10, f("scope.ports[0]"))],
            "port must be between 1 and 65535, got 0",
        ),
        (
            "port too high",
            case("partition", &["scope: { ports: [80, 65536] }"]),
            vec![(10, f("scope.ports[1]"))],
            "port must be between 1 and 65535, got 65536",
        ),
        (
            "port by name",
            case("partition", &["scope: { ports: [http] }"]),
            vec![(10, f("scope.ports[0]"))],
            "port must be a whole number",
        ),
        (
            "icmp with ports",
            case(
                "loss",
                &["percent: 5", "scope: { ports: [80], protocol: icmp }"],
            ),
            vec![(11, f("scope.ports"))],
            "icmp has no ports",
        ),
        (
            "unknown protocol",
            case("partition", &["scope: { protocol: sctp }"]),
            vec![(10, f("scope.protocol"))],
            "protocol must be tcp, udp, icmp or any, got \"sctp\"",
        ),
        (
            "unknown direction",
            case("partition", &["scope: { direction: up }"]),
            vec![(10, f("scope.direction"))],
            "direction must be both, ingress",
        ),
        (
            "too many ports",
            case(
                "partition",
                &[&format!(
                    "scope: {{ ports: [{}] }}",
                    (1..=65)
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )],
            ),
            vec![(10, f("scope.ports"))],
            "at most 64 entries, got 65",
        ),
        (
            "scope in block style, every item located",
            case(
                "partition",
                &[
                    "scope:",
                    "  peers:",
                    "    - 10.0.0.0/8",
                    "    - 300.0.0.1",
                    "  ports:",
                    "    - 80",
                    "    - 0",
                    "  protocol: tcp",
                    "  direction: sideways",
                ],
            ),
            vec![
                (13, f("scope.peers[1]")),
                (16, f("scope.ports[1]")),
                (18, f("scope.direction")),
            ],
            "invalid peer \"300.0.0.1\"",
        ),
        (
            "misspelt scope key",
            case("partition", &["scope: { peer: [10.0.0.0/8] }"]),
            vec![(10, f("scope.peer"))],
            "unknown field `peer`",
        ),
        (
            "loss without percent",
            case("loss", &[]),
            vec![(6, f("percent"))],
            "missing required field `percent`",
        ),
        (
            "loss of nothing",
            case("loss", &["percent: 0"]),
            vec![(10, f("percent"))],
            "percent must be greater than 0% and at most 100%, got 0",
        ),
        (
            "loss over 100%",
            case("loss", &["percent: 100.01"]),
            vec![(10, f("percent"))],
            "at most 100%",
        ),
        (
            "loss finer than a basis point",
            case("loss", &["percent: 0.001"]),
            vec![(10, f("percent"))],
            "percent must have at most two decimals",
        ),
        (
            "loss in words",
            case("loss", &["percent: lots"]),
            vec![(10, f("percent"))],
            "percent must be a percentage",
        ),
        (
            "negative duplicate",
            case("duplicate", &["percent: -1"]),
            vec![(10, f("percent"))],
            "percent must be a percentage",
        ),
        (
            "corrupt over 100%",
            case("corrupt", &["percent: 150%"]),
            vec![(10, f("percent"))],
            "at most 100%",
        ),
        (
            "latency without delay",
            case("latency", &[]),
            vec![(6, f("delay"))],
            "missing required field `delay`",
        ),
        (
            "latency of nothing",
            case("latency", &["delay: 0s"]),
            vec![(10, f("delay"))],
            "delay must be between 1ms and 1m, got 0s",
        ),
        (
            "latency over a minute",
            case("latency", &["delay: 61s"]),
            vec![(10, f("delay"))],
            "delay must be between 1ms and 1m",
        ),
        (
            "jitter above the delay",
            case("latency", &["delay: 100ms", "jitter: 200ms"]),
            vec![(11, f("jitter"))],
            "jitter must be at most delay (100ms), got 200ms",
        ),
        (
            "jitter below a millisecond",
            case("latency", &["delay: 100ms", "jitter: 10us"]),
            vec![(11, f("jitter"))],
            "finer than a millisecond",
        ),
        (
            "jitter on a reorder",
            case("reorder", &["percent: 5", "jitter: 1ms"]),
            vec![(11, f("jitter"))],
            "`jitter` does not apply to reorder; only latency takes it",
        ),
        (
            "reorder without percent",
            case("reorder", &["delay: 5ms"]),
            vec![(6, f("percent"))],
            "missing required field `percent`",
        ),
        (
            "reorder without delay",
            case("reorder", &["percent: 5", "delay: 0ms"]),
            vec![(11, f("delay"))],
            "delay must be between 1ms and 1m",
        ),
        (
            "bandwidth without rate",
            case("bandwidth", &[]),
            vec![(6, f("rate"))],
            "missing required field `rate`",
        ),
        (
            "bandwidth without unit",
            case("bandwidth", &["rate: 1000"]),
            vec![(10, f("rate"))],
            "rate must have a unit",
        ),
        (
            "bandwidth of nothing",
            case("bandwidth", &["rate: 0kbit"]),
            vec![(10, f("rate"))],
            "rate must be greater than 0",
        ),
        (
            "bandwidth in furlongs",
            case("bandwidth", &["rate: 5furlong"]),
            vec![(10, f("rate"))],
            "rate must use a known rate unit, not \"furlong\"",
        ),
        (
            "scope on bandwidth",
            case("bandwidth", &["rate: 1mbit", "scope: { ports: [80] }"]),
            vec![(11, f("scope"))],
            "`scope` does not apply to bandwidth; only partition, loss, latency, duplicate, \
             corrupt and reorder take it",
        ),
        (
            "dns mode",
            case("dns", &["mode: nxdomain"]),
            vec![(10, f("mode"))],
            "mode must be drop",
        ),
        (
            "percent on a partition",
            case("partition", &["percent: 50"]),
            vec![(10, f("percent"))],
            "`percent` does not apply to partition; only loss, duplicate, corrupt and reorder \
             take it",
        ),
        // --- resources -----------------------------------------------------------------------
        (
            "throttle without cpus",
            case("cpu-throttle", &[]),
            vec![(6, f("cpus"))],
            "missing required field `cpus`",
        ),
        (
            "throttle to nothing",
            case("cpu-throttle", &["cpus: 0.000"]),
            vec![(10, f("cpus"))],
            "cpus must be greater than 0",
        ),
        (
            "memory limit without limit, but memory",
            case("memory-limit", &["memory: 1Gi"]),
            vec![(6, f("limit")), (10, f("memory"))],
            "missing required field `limit`",
        ),
        (
            "memory limit too small",
            case("memory-limit", &["limit: 1Ki"]),
            vec![(10, f("limit"))],
            "limit must be at least 6Mi",
        ),
        (
            "memory limit unit",
            case("memory-limit", &["limit: 1 parsec"]),
            vec![(10, f("limit"))],
            "limit must use a known size unit",
        ),
        (
            "io throttle without limits",
            case("io-throttle", &["device: \"8:0\""]),
            vec![(6, f("read_bps"))],
            "io-throttle needs at least one of read_bps, write_bps, read_iops, write_iops",
        ),
        (
            "io throttle on a device by name",
            case("io-throttle", &["device: sda", "read_iops: 5"]),
            vec![(10, f("device"))],
            "invalid device \"sda\": write the block device as MAJOR:MINOR",
        ),
        (
            "io throttle of nothing",
            case("io-throttle", &["read_bps: 0", "write_iops: 1.5"]),
            vec![(10, f("read_bps")), (11, f("write_iops"))],
            "read_bps must be greater than 0 bytes",
        ),
        (
            "pids limit of nothing",
            case("pids-limit", &["max: 0"]),
            vec![(10, f("max"))],
            "max must be between 1 and 4194304, got 0",
        ),
        (
            "pids limit without max",
            case("pids-limit", &[]),
            vec![(6, f("max"))],
            "missing required field `max`",
        ),
        (
            "cpus on a freeze",
            case("freeze", &["cpus: 1"]),
            vec![(10, f("cpus"))],
            "`cpus` does not apply to freeze; only container-limit and cpu-throttle take it",
        ),
        // --- stressors -----------------------------------------------------------------------
        (
            "no cpu hog workers",
            case("cpu-hog", &["workers: 0"]),
            vec![(10, f("workers"))],
            "workers must be between 1 and 256, got 0",
        ),
        (
            "too many cpu hog workers",
            case("cpu-hog", &["workers: 257"]),
            vec![(10, f("workers"))],
            "workers must be between 1 and 256, got 257",
        ),
        (
            "no load",
            case("cpu-hog", &["load: 0%"]),
            vec![(10, f("load"))],
            "load must be between 1% and 100%, got 0%",
        ),
        (
            "fractional load",
            case("cpu-hog", &["load: 50.5"]),
            vec![(10, f("load"))],
            "load must be a whole percentage",
        ),
        (
            "memory hog without size",
            case("memory-hog", &[]),
            vec![(6, f("size"))],
            "missing required field `size`",
        ),
        (
            "memory hog of nothing",
            case("memory-hog", &["size: 0Mi"]),
            vec![(10, f("size"))],
            "size must be greater than 0 bytes",
        ),
        (
            "io hog workers",
            case("io-hog", &["workers: many"]),
            vec![(10, f("workers"))],
            "workers must be a whole number",
        ),
        (
            "load on an io hog",
            case("io-hog", &["load: 50"]),
            vec![(10, f("load"))],
            "`load` does not apply to io-hog; only cpu-hog takes it",
        ),
        (
            "disk fill without fill",
            case("disk-fill", &["path: /data"]),
            vec![(6, f("fill"))],
            "missing required field `fill`",
        ),
        (
            "disk fill over 100%",
            case("disk-fill", &["fill: 101%"]),
            vec![(10, f("fill"))],
            "fill must be between 1% and 100%, got 101%",
        ),
        (
            "disk fill in words",
            case("disk-fill", &["fill: lots"]),
            vec![(10, f("fill"))],
            "fill must be a percentage such as 90% or a size",
        ),
        (
            "disk fill at a relative path",
            case("disk-fill", &["path: data", "fill: 1Gi"]),
            vec![(10, f("path"))],
            "invalid path \"data\": it must be absolute",
        ),
        (
            "disk fill escaping",
            case("disk-fill", &["path: /data/../../etc", "fill: 1Gi"]),
            vec![(10, f("path"))],
            "must not contain `..`",
        ),
        // --- processes -----------------------------------------------------------------------
        (
            "kill with an unknown signal",
            case("process-kill", &["signal: SIGSTOP"]),
            vec![(10, f("signal"))],
            "unknown signal \"SIGSTOP\"",
        ),
        (
            "no kills",
            case("process-kill", &["count: 0"]),
            vec![(10, f("count"))],
            "count must be between 1 and 1000, got 0",
        ),
        (
            "too many kills",
            case("process-kill", &["count: 1001"]),
            vec![(10, f("count"))],
            "count must be between 1 and 1000, got 1001",
        ),
        (
            "kills without interval",
            case("process-kill", &["interval: 0s"]),
            vec![(10, f("interval"))],
            "interval must be greater than 0s and at most 1h, got 0s",
        ),
        (
            "kills an hour apart and then some",
            case("process-kill", &["interval: 1h 1s"]),
            vec![(10, f("interval"))],
            "at most 1h",
        ),
        (
            "kill a process by a long name",
            case("process-kill", &["name: postgres-checkpointer"]),
            vec![(10, f("name"))],
            "at most 15 bytes",
        ),
        (
            "kill by name in a pid",
            on("process-kill", "{ pid: 42 }", &["name: worker"]),
            vec![(10, f("name"))],
            "`name` picks processes inside a container target; process 42 already names",
        ),
        (
            "stop by name in a process",
            on("process-stop", "{ process: postgres }", &["name: worker"]),
            vec![(10, f("name"))],
            "process named postgres already names the process",
        ),
        (
            "count on a stop",
            case("process-stop", &["count: 2"]),
            vec![(10, f("count"))],
            "`count` does not apply to process-stop; only process-kill takes it",
        ),
        (
            "restart on a process kill",
            case("process-kill", &["restart: true"]),
            vec![(10, f("restart"))],
            "`restart` does not apply to process-kill; only container-kill takes it",
        ),
        // --- targets -------------------------------------------------------------------------
        (
            "upper-case id",
            on("freeze", "{ id: 3F2A9C0D1E4B }", &[]),
            vec![(8, f("target.id"))],
            "invalid container id \"3F2A9C0D1E4B\": use 12 to 64 lowercase hex digits",
        ),
        (
            "short id",
            on("freeze", "{ id: 3f2a }", &[]),
            vec![(8, f("target.id"))],
            "invalid container id",
        ),
        (
            "bad regular expression",
            on("freeze", "{ container: \"re:(db\" }", &[]),
            vec![(8, f("target.container"))],
            "invalid regular expression \"(db\"",
        ),
        (
            "empty regular expression",
            on("freeze", "{ container: \"re:\" }", &[]),
            vec![(8, f("target.container"))],
            "the pattern after `re:` is empty",
        ),
        (
            "root cgroup",
            on("freeze", "{ cgroup: / }", &[]),
            vec![(8, f("target.cgroup"))],
            "the root cgroup cannot be a target",
        ),
        (
            "cgroup escaping",
            on("freeze", "{ cgroup: a/../b }", &[]),
            vec![(8, f("target.cgroup"))],
            "must not contain empty, `.` or `..` components",
        ),
        (
            "pid 1",
            on("freeze", "{ pid: 1 }", &[]),
            vec![(8, f("target.pid"))],
            "pid 1 is the host's init process",
        ),
        (
            "pid 0",
            on("freeze", "{ pid: 0 }", &[]),
            vec![(8, f("target.pid"))],
            "pid 0 is not a process",
        ),
        (
            "pid in words",
            on("freeze", "{ pid: nginx }", &[]),
            vec![(8, f("target.pid"))],
            "pid must be a whole number",
        ),
        (
            "pid above the kernel's limit",
            on("freeze", "{ pid: 4194305 }", &[]),
            vec![(8, f("target.pid"))],
            "pid must be at most 4194304",
        ),
        (
            "empty process name",
            on("freeze", "{ process: \"\" }", &[]),
            vec![(8, f("target.process"))],
            "must not be empty",
        ),
        (
            "long process name",
            on("freeze", "{ process: 1234567890123456 }", &[]),
            vec![(8, f("target.process"))],
            "at most 15 bytes",
        ),
        (
            "three target keys",
            on("freeze", "{ container: db, pid: 4, process: x }", &[]),
            vec![(8, f("target.pid")), (8, f("target.process"))],
            "a target names one thing: give `container` or `pid`, not both",
        ),
        (
            "container fault on a process",
            on("container-pause", "{ process: postgres }", &[]),
            vec![(8, f("target"))],
            "container-pause acts through Docker and needs a container target (container, id \
             or label), not process named postgres",
        ),
        (
            "network fault on a cgroup",
            on("partition", "{ cgroup: a/b }", &[]),
            vec![(8, f("target"))],
            "a cgroup has no network namespace",
        ),
        (
            "disk fill on a cgroup",
            on("disk-fill", "{ cgroup: a/b }", &["fill: 50%"]),
            vec![(8, f("target"))],
            "a cgroup has no filesystem",
        ),
        (
            "process fault on a cgroup",
            on("process-stop", "{ cgroup: a/b }", &[]),
            vec![(8, f("target"))],
            "a cgroup names no single process",
        ),
        (
            "disconnect a pid",
            on("network-disconnect", "{ pid: 42 }", &["network: n"]),
            vec![(8, f("target"))],
            "needs a container target",
        ),
    ];
    for (name, yaml, expected, fragment) in cases {
        let errors = match parse_plan(&yaml) {
            Ok(plan) => panic!("{name}: expected errors, got {plan:#?}\n{yaml}"),
            Err(errors) => errors,
        };
        let found: Vec<(u32, String)> = errors.iter().map(|e| (e.line, e.field.clone())).collect();
        assert_eq!(
            found,
            expected,
            "{name}:\n{}\n{yaml}",
            render_errors("case", &errors)
        );
        assert!(
            errors[0].message.contains(fragment),
            "{name}: {:?} lacks {fragment:?}",
            errors[0].message
        );
        assert!(errors.iter().all(|e| e.column > 0), "{name}: {errors:?}");
    }
}

#[test]
fn every_problem_of_one_fault_is_reported_together() {
    let yaml = one_fault(&[
        "kind: latency",
        AGENT,
        "target: { cgroup: a/b }",
        "duration: 0s",
        "delay: 2m",
        "jitter: soon",
        "percent: 5",
        "scope: { peers: [10.0.0.1/24], ports: [0], protocol: gre }",
    ]);
    assert_eq!(
        problems(&yaml),
        vec![
            (9, fault_field(0, "duration")),
            (10, fault_field(0, "delay")),
            (11, fault_field(0, "jitter")),
            (12, fault_field(0, "percent")),
            (13, fault_field(0, "scope.peers[0]")),
            (13, fault_field(0, "scope.ports[0]")),
            (13, fault_field(0, "scope.protocol")),
        ]
    );
    // The target is only checked against the kind once both are valid.
    let yaml = one_fault(&[
        "kind: latency",
        AGENT,
        "target: { cgroup: a/b }",
        DURATION,
        "delay: 5ms",
    ]);
    assert_eq!(problems(&yaml), vec![(8, fault_field(0, "target"))]);
}

/// Faults on one target in one stage still clash, whatever the selector.
#[test]
fn new_selectors_clash_within_a_stage_too() {
    let yaml = doc(&[
        "apiVersion: faultline/v1",
        "title: t",
        "stages:",
        "  - name: s",
        "    faults:",
        "      - { kind: cpu-hog, agent: a, target: { pid: 42 }, duration: 1s }",
        "      - { kind: freeze, agent: a, target: { pid: 42 }, duration: 1s }",
        "      - { kind: freeze, agent: b, target: { pid: 42 }, duration: 1s }",
    ]);
    assert_eq!(problems(&yaml), vec![(7, fault_field(1, "target"))]);
}

/// The shipped examples (but `demo-cascade.yaml`, which `faultline demo` tests) parse, and
/// together use every fault kind and every target key.
#[test]
fn the_shipped_examples_parse_and_cover_every_kind() {
    let examples: &[(&str, &str)] = &[
        (
            "pause-database.yaml",
            include_str!("../../../examples/pause-database.yaml"),
        ),
        (
            "network-chaos.yaml",
            include_str!("../../../examples/network-chaos.yaml"),
        ),
        (
            "resource-pressure.yaml",
            include_str!("../../../examples/resource-pressure.yaml"),
        ),
        (
            "process-chaos.yaml",
            include_str!("../../../examples/process-chaos.yaml"),
        ),
        (
            "every-fault.yaml",
            include_str!("../../../examples/every-fault.yaml"),
        ),
    ];
    let mut kinds = BTreeSet::new();
    let mut selectors = BTreeSet::new();
    for (name, text) in examples {
        let plan =
            parse_plan(text).unwrap_or_else(|errors| panic!("{}", render_errors(name, &errors)));
        for fault in plan.stages.iter().flat_map(|stage| &stage.faults) {
            assert_eq!(check_spec(&fault.spec), Ok(()), "{name}");
            kinds.insert(fault.spec.kind.name());
            selectors.insert(format!("{:?}", std::mem::discriminant(&fault.spec.target)));
        }
    }
    let names: BTreeSet<&str> = FaultKind::NAMES.iter().copied().collect();
    assert_eq!(kinds, names);
    assert_eq!(selectors.len(), 7);
}
