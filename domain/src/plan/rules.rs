//! Rules on single values and on whole fault specs, shared by the plan parser (which reports
//! them located at the YAML value) and by agents (which check every spec they receive with
//! [`check_spec`], so that a buggy or forged-but-signed coordinator cannot send what no valid
//! plan could hold).

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::{
    DEFAULT_KILL_INTERVAL, DEFAULT_REORDER_DELAY, MAX_CONTAINER_ID_LEN, MAX_FAULT_DURATION,
    MAX_KILL_COUNT, MAX_KILL_INTERVAL, MAX_MILLICPUS, MAX_NET_DELAY, MAX_PATH_LEN, MAX_PID,
    MAX_REGEX_LEN, MAX_SCOPE_ENTRIES, MAX_STOP_GRACE, MAX_WORKERS, MIN_CONTAINER_ID_LEN,
    MIN_MEMORY_LIMIT,
};
use crate::fault::{
    Direction, FaultFamily, FaultKind, FaultSpec, FillAmount, IoLimits, NetScope, PartitionMode,
    Protocol, Signal, TargetSelector,
};

/// Longest command name (`comm`): the kernel keeps 15 bytes.
pub(crate) const MAX_COMM_LEN: usize = 15;
/// Longest Docker network name accepted.
const MAX_NETWORK_NAME_LEN: usize = 255;

/// Docker's container name charset, `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn is_docker_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub(crate) fn container_name(name: &str) -> Result<(), String> {
    if is_docker_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid container name {name:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*, without a leading \
             slash (or `re:PATTERN` for a regular expression)"
        ))
    }
}

/// 12 to 64 lowercase hex digits: at least the short id `docker ps` shows, so that a prefix
/// cannot quietly come to mean another container.
pub(crate) fn container_id(id: &str) -> Result<(), String> {
    let hex = id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex && (MIN_CONTAINER_ID_LEN..=MAX_CONTAINER_ID_LEN).contains(&id.len()) {
        Ok(())
    } else {
        Err(format!(
            "invalid container id {id:?}: use {MIN_CONTAINER_ID_LEN} to {MAX_CONTAINER_ID_LEN} \
             lowercase hex digits (a full id or a prefix as long as `docker ps` shows)"
        ))
    }
}

/// A regular expression over container names (the text after `re:`).
pub(crate) fn container_regex(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("the pattern after `re:` is empty".into());
    }
    if pattern.len() > MAX_REGEX_LEN {
        return Err(format!(
            "the pattern after `re:` is longer than {MAX_REGEX_LEN} bytes"
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        .map_err(|err| {
            // regex's messages span several lines; keep the last, which says what is wrong.
            let text = err.to_string();
            let last = text.lines().last().unwrap_or_default().trim();
            let reason = last.strip_prefix("error: ").unwrap_or(last).to_string();
            format!("invalid regular expression {pattern:?}: {reason}")
        })
}

/// `key=value` or `key`: the key must be non-empty and free of whitespace.
pub(crate) fn label(label: &str) -> Result<(), String> {
    let (key, value) = label.split_once('=').unwrap_or((label, ""));
    let problem = if key.is_empty() {
        "the key before `=` is empty"
    } else if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "the key must not contain whitespace"
    } else if value.chars().any(char::is_control) {
        "the value must not contain control characters"
    } else {
        return Ok(());
    };
    Err(format!("invalid label selector {label:?}: {problem}"))
}

/// A cgroup below the root, as `a/b/c` (plans may write a leading `/`; it is dropped first).
pub(crate) fn cgroup_path(path: &str) -> Result<(), String> {
    let problem = if path.is_empty() {
        "the root cgroup cannot be a target; name one below it, such as system.slice/nginx.service"
    } else if path.len() > MAX_PATH_LEN {
        "the path is too long"
    } else if path.starts_with('/') || path.ends_with('/') {
        "write the path below the cgroup root without leading or trailing `/`"
    } else if path.chars().any(char::is_control) {
        "the path must not contain control characters"
    } else if path.split('/').any(|part| matches!(part, "" | "." | "..")) {
        "the path must not contain empty, `.` or `..` components"
    } else {
        return Ok(());
    };
    Err(format!("invalid cgroup path {path:?}: {problem}"))
}

pub(crate) fn pid(pid: u32) -> Result<(), String> {
    match pid {
        0 => Err("pid 0 is not a process".into()),
        1 => Err("pid 1 is the host's init process and cannot be a target".into()),
        pid if u64::from(pid) > MAX_PID => Err(format!(
            "pid must be at most {MAX_PID} (the kernel's limit), got {pid}"
        )),
        _ => Ok(()),
    }
}

/// A command name as the kernel keeps it (`comm`): 1 to 15 bytes, no control characters.
pub(crate) fn process_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.trim() != name {
        Err(format!(
            "invalid process name {name:?}: it must not be empty or start or end with a blank"
        ))
    } else if name.len() > MAX_COMM_LEN {
        Err(format!(
            "invalid process name {name:?}: the kernel keeps at most {MAX_COMM_LEN} bytes of a \
             command name (see /proc/PID/comm)"
        ))
    } else if name.chars().any(char::is_control) {
        Err(format!(
            "invalid process name {name:?}: it must not contain control characters"
        ))
    } else {
        Ok(())
    }
}

pub(crate) fn network_name(name: &str) -> Result<(), String> {
    if is_docker_name(name) && name.len() <= MAX_NETWORK_NAME_LEN {
        Ok(())
    } else {
        Err(format!(
            "invalid network name {name:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*"
        ))
    }
}

/// A peer network: CIDR (`10.0.0.0/8`) or a single address (`10.1.2.3`, made `/32`).
/// Returns the canonical CIDR; host bits set below the prefix are refused as a likely typo.
pub(crate) fn peer(text: &str) -> Result<String, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| {
            format!("invalid peer {text:?}: expected a network in CIDR form such as 10.0.0.0/8")
        })?
    } else {
        let addr: IpAddr = text.parse().map_err(|_| {
            format!("invalid peer {text:?}: expected an IP address or a CIDR such as 10.0.0.0/8")
        })?;
        IpNet::from(addr)
    };
    if net.trunc() != net {
        return Err(format!(
            "invalid peer {text:?}: bits are set after the /{} prefix; did you mean {} or {}/{}?",
            net.prefix_len(),
            net.trunc(),
            net.addr(),
            net.max_prefix_len()
        ));
    }
    Ok(net.to_string())
}

/// A block device as `MAJOR:MINOR`, as in `/sys/dev/block`.
pub(crate) fn device(text: &str) -> Result<(), String> {
    let valid = text.split_once(':').is_some_and(|(major, minor)| {
        let number = |part: &str, max: u32| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_digit())
                && part.parse::<u32>().is_ok_and(|n| n <= max)
        };
        // Linux device numbers: 12-bit major, 20-bit minor.
        number(major, 4095) && number(minor, 1_048_575)
    });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid device {text:?}: write the block device as MAJOR:MINOR, such as 8:0 \
             (see lsblk or /sys/dev/block)"
        ))
    }
}

/// An absolute path inside the target's filesystem.
pub(crate) fn disk_path(path: &str) -> Result<(), String> {
    let problem = if !path.starts_with('/') {
        "it must be absolute (start with `/`)"
    } else if path.len() > MAX_PATH_LEN {
        "it is too long"
    } else if path.chars().any(char::is_control) {
        "it must not contain control characters"
    } else if path.split('/').any(|part| part == "..") {
        "it must not contain `..`"
    } else {
        return Ok(());
    };
    Err(format!("invalid path {path:?}: {problem}"))
}

/// Which targets a kind can act on.
pub(crate) fn target_fits(kind: &FaultKind, target: &TargetSelector) -> Result<(), String> {
    let name = kind.name();
    if kind.needs_container_target() {
        if target.is_container() {
            return Ok(());
        }
        return Err(format!(
            "{name} acts through Docker and needs a container target (container, id or label), \
             not {target}"
        ));
    }
    // Throttles, limits, freeze and the cpu, memory and io hogs act on a cgroup; everything
    // else needs a process: its network namespace, its filesystem or the process itself.
    let any_target = kind.family() == FaultFamily::Resource
        || matches!(
            kind,
            FaultKind::CpuHog { .. } | FaultKind::MemoryHog { .. } | FaultKind::IoHog { .. }
        );
    if any_target || !matches!(target, TargetSelector::Cgroup(_)) {
        return Ok(());
    }
    let reason = match kind.family() {
        FaultFamily::Network => "a cgroup has no network namespace",
        FaultFamily::Process => "a cgroup names no single process",
        _ => "a cgroup has no filesystem",
    };
    Err(format!(
        "{name} needs a container, pid or process target, not {target}: {reason}"
    ))
}

/// `name` of a process fault picks processes inside a container; a pid or process target
/// already is the process.
pub(crate) fn process_name_fits(target: &TargetSelector) -> Result<(), String> {
    if target.is_container() {
        Ok(())
    } else {
        Err(format!(
            "`name` picks processes inside a container target; {target} already names the \
             process"
        ))
    }
}

/// Checks a whole spec against every rule a plan enforces: what an agent runs after decoding.
///
/// The plan parser produces only specs that pass; agents call this on each one they receive.
pub fn check_spec(spec: &FaultSpec) -> Result<(), String> {
    let duration = spec.duration;
    if duration < Duration::from_millis(1)
        || duration > MAX_FAULT_DURATION
        || !duration.subsec_nanos().is_multiple_of(1_000_000)
    {
        return Err(format!(
            "duration {duration:?} must be whole milliseconds, greater than 0 and at most {}s",
            MAX_FAULT_DURATION.as_secs()
        ));
    }
    check_selector(&spec.target)?;
    target_fits(&spec.kind, &spec.target)?;
    let name = spec.kind.name();
    check_kind(&spec.kind, &spec.target).map_err(|problem| format!("{name}: {problem}"))
}

/// The stored form of a selector: what [`super::parse_plan`] produces.
pub(crate) fn check_selector(selector: &TargetSelector) -> Result<(), String> {
    match selector {
        TargetSelector::Container(name) => container_name(name),
        TargetSelector::ContainerId(id) => container_id(id),
        TargetSelector::Label(text) => label(text),
        TargetSelector::ContainerRegex(pattern) => container_regex(pattern),
        TargetSelector::Cgroup(path) => cgroup_path(path),
        TargetSelector::Pid(number) => pid(*number),
        TargetSelector::ProcessName(name) => process_name(name),
    }
}

fn within<T: PartialOrd + std::fmt::Display>(
    what: &str,
    value: T,
    (min, max): (T, T),
) -> Result<(), String> {
    if value < min || value > max {
        Err(format!("{what} {value} outside {min}..={max}"))
    } else {
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn check_scope(scope: &NetScope) -> Result<(), String> {
    if scope.peers.len() > MAX_SCOPE_ENTRIES || scope.ports.len() > MAX_SCOPE_ENTRIES {
        return Err(format!(
            "a scope holds at most {MAX_SCOPE_ENTRIES} peers and {MAX_SCOPE_ENTRIES} ports"
        ));
    }
    for written in &scope.peers {
        let canonical = peer(written)?;
        if canonical != *written {
            return Err(format!(
                "peer {written:?} is not in canonical CIDR form ({canonical})"
            ));
        }
    }
    if scope.ports.contains(&0) {
        return Err("port 0 outside 1..=65535".into());
    }
    if scope.protocol == Protocol::Icmp && !scope.ports.is_empty() {
        return Err("icmp has no ports".into());
    }
    // Exhaustive on purpose: a new direction must be thought about here.
    match scope.direction {
        Direction::Both | Direction::Ingress | Direction::Egress => Ok(()),
    }
}

fn check_kind(kind: &FaultKind, target: &TargetSelector) -> Result<(), String> {
    let grace_max = u32::try_from(MAX_STOP_GRACE.as_secs()).unwrap_or(u32::MAX);
    let delay_max = u32::try_from(MAX_NET_DELAY.as_millis()).unwrap_or(u32::MAX);
    let memory = |what: &str, bytes: u64| within(what, bytes, (MIN_MEMORY_LIMIT, u64::MAX));
    let percent = |bp: u32| within("basis_points", bp, (1, 10_000));
    let process = |name: &Option<String>| match name {
        None => Ok(()),
        Some(name) => process_name(name).and_then(|()| process_name_fits(target)),
    };
    match kind {
        FaultKind::ContainerPause | FaultKind::Freeze => Ok(()),
        FaultKind::ContainerStop { grace_seconds }
        | FaultKind::ContainerRestart { grace_seconds } => {
            within("grace_seconds", *grace_seconds, (0, grace_max))
        }
        FaultKind::ContainerKill { signal, .. } => check_signal(*signal),
        FaultKind::ContainerLimit {
            millicpus,
            memory_bytes,
        } => {
            if millicpus.is_none() && memory_bytes.is_none() {
                return Err("needs millicpus, memory_bytes or both".into());
            }
            if let Some(milli) = millicpus {
                within("millicpus", *milli, (1, MAX_MILLICPUS))?;
            }
            memory_bytes.map_or(Ok(()), |bytes| memory("memory_bytes", bytes))
        }
        FaultKind::NetworkDisconnect { network } => network_name(network),
        FaultKind::Partition { scope, mode } => {
            check_mode(*mode)?;
            check_scope(scope)
        }
        FaultKind::Loss {
            scope,
            basis_points,
        }
        | FaultKind::Duplicate {
            scope,
            basis_points,
        }
        | FaultKind::Corrupt {
            scope,
            basis_points,
        } => {
            percent(*basis_points)?;
            check_scope(scope)
        }
        FaultKind::Latency {
            scope,
            delay_ms,
            jitter_ms,
        } => {
            within("delay_ms", *delay_ms, (1, delay_max))?;
            within("jitter_ms", *jitter_ms, (0, *delay_ms))?;
            check_scope(scope)
        }
        FaultKind::Reorder {
            scope,
            basis_points,
            delay_ms,
        } => {
            percent(*basis_points)?;
            within("delay_ms", *delay_ms, (1, delay_max))?;
            check_scope(scope)
        }
        FaultKind::Bandwidth { rate_bps } => within("rate_bps", *rate_bps, (1, u64::MAX)),
        FaultKind::Dns { mode } => check_mode(*mode),
        FaultKind::CpuThrottle { millicpus } => within("millicpus", *millicpus, (1, MAX_MILLICPUS)),
        FaultKind::MemoryLimit { bytes } => memory("bytes", *bytes),
        FaultKind::IoThrottle { limits } => check_io(limits),
        FaultKind::PidsLimit { max } => within("max", *max, (1, MAX_PID)),
        FaultKind::CpuHog {
            workers,
            load_percent,
        } => {
            within("workers", *workers, (1, MAX_WORKERS))?;
            within("load_percent", *load_percent, (1, 100))
        }
        FaultKind::MemoryHog { bytes } => within("bytes", *bytes, (1, u64::MAX)),
        FaultKind::IoHog { workers } => within("workers", *workers, (1, MAX_WORKERS)),
        FaultKind::DiskFill { path, amount } => {
            if let Some(path) = path {
                disk_path(path)?;
            }
            match amount {
                FillAmount::Percent(percent) => within("percent", *percent, (1, 100)),
                FillAmount::Bytes(bytes) => within("bytes", *bytes, (1, u64::MAX)),
            }
        }
        FaultKind::ProcessKill {
            signal,
            name,
            count,
            interval_ms,
        } => {
            check_signal(*signal)?;
            process(name)?;
            within("count", *count, (1, MAX_KILL_COUNT))?;
            within("interval_ms", *interval_ms, (1, millis(MAX_KILL_INTERVAL)))
        }
        FaultKind::ProcessStop { name } => process(name),
    }
}

/// Signals can only be built by [`Signal::parse`]; this re-checks the name all the same.
fn check_signal(signal: Signal) -> Result<(), String> {
    Signal::parse(signal.name()).map(|_| ())
}

fn check_mode(mode: PartitionMode) -> Result<(), String> {
    match mode {
        PartitionMode::Drop | PartitionMode::Reject => Ok(()),
    }
}

fn check_io(limits: &IoLimits) -> Result<(), String> {
    if let Some(dev) = &limits.device {
        device(dev)?;
    }
    let values = [
        ("read_bps", limits.read_bps),
        ("write_bps", limits.write_bps),
        ("read_iops", limits.read_iops),
        ("write_iops", limits.write_iops),
    ];
    if values.iter().all(|(_, value)| value.is_none()) {
        return Err("needs at least one of read_bps, write_bps, read_iops, write_iops".into());
    }
    for (what, value) in values {
        if let Some(value) = value {
            within(what, value, (1, u64::MAX))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Examples, for tests that must cover every kind and selector.
// ---------------------------------------------------------------------------------------------

/// At least one value of every [`FaultKind`] (several for kinds with optional parts), each
/// valid by [`check_spec`] with a container target. Tests iterate over it; a test checks that
/// it covers [`FaultKind::NAMES`] entirely.
#[doc(hidden)]
pub fn example_kinds() -> Vec<FaultKind> {
    let scope = NetScope {
        peers: vec![
            "10.0.0.0/8".into(),
            "fd00::/8".into(),
            "192.168.1.5/32".into(),
        ],
        ports: vec![80, 5432],
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
    };
    let icmp = NetScope {
        peers: vec![],
        ports: vec![],
        protocol: Protocol::Icmp,
        direction: Direction::Ingress,
    };
    let term = Signal::parse("SIGTERM").unwrap_or(Signal::KILL);
    vec![
        FaultKind::ContainerPause,
        FaultKind::ContainerStop { grace_seconds: 7 },
        FaultKind::ContainerKill {
            signal: term,
            restart_on_revert: false,
        },
        FaultKind::ContainerRestart { grace_seconds: 0 },
        FaultKind::ContainerLimit {
            millicpus: Some(100),
            memory_bytes: Some(256 << 20),
        },
        FaultKind::ContainerLimit {
            millicpus: None,
            memory_bytes: Some(64 << 20),
        },
        FaultKind::ContainerLimit {
            millicpus: Some(1500),
            memory_bytes: None,
        },
        FaultKind::NetworkDisconnect {
            network: "backend".into(),
        },
        FaultKind::Partition {
            scope: scope.clone(),
            mode: PartitionMode::Reject,
        },
        FaultKind::Partition {
            scope: NetScope::default(),
            mode: PartitionMode::Drop,
        },
        FaultKind::Loss {
            scope: scope.clone(),
            basis_points: 3000,
        },
        FaultKind::Latency {
            scope: icmp.clone(),
            delay_ms: 250,
            jitter_ms: 50,
        },
        FaultKind::Duplicate {
            scope: NetScope {
                protocol: Protocol::Udp,
                ..NetScope::default()
            },
            basis_points: 1,
        },
        FaultKind::Corrupt {
            scope: icmp,
            basis_points: 10_000,
        },
        FaultKind::Reorder {
            scope,
            basis_points: 2500,
            delay_ms: DEFAULT_REORDER_DELAY.as_millis().try_into().unwrap_or(10),
        },
        FaultKind::Bandwidth {
            rate_bps: 1_000_000,
        },
        FaultKind::Dns {
            mode: PartitionMode::Reject,
        },
        FaultKind::CpuThrottle { millicpus: 250 },
        FaultKind::MemoryLimit { bytes: 128 << 20 },
        FaultKind::IoThrottle {
            limits: IoLimits {
                device: Some("8:0".into()),
                read_bps: Some(1 << 20),
                write_bps: Some(512 << 10),
                read_iops: Some(100),
                write_iops: Some(50),
            },
        },
        FaultKind::IoThrottle {
            limits: IoLimits {
                write_iops: Some(10),
                ..IoLimits::default()
            },
        },
        FaultKind::PidsLimit { max: 64 },
        FaultKind::Freeze,
        FaultKind::CpuHog {
            workers: 4,
            load_percent: 80,
        },
        FaultKind::MemoryHog { bytes: 1 << 30 },
        FaultKind::IoHog { workers: 2 },
        FaultKind::DiskFill {
            path: Some("/var/lib/data".into()),
            amount: FillAmount::Percent(90),
        },
        FaultKind::DiskFill {
            path: None,
            amount: FillAmount::Bytes(5 << 30),
        },
        FaultKind::ProcessKill {
            signal: Signal::KILL,
            name: Some("worker".into()),
            count: 5,
            interval_ms: millis(DEFAULT_KILL_INTERVAL),
        },
        FaultKind::ProcessKill {
            signal: term,
            name: None,
            count: 1,
            interval_ms: 1,
        },
        FaultKind::ProcessStop {
            name: Some("postgres".into()),
        },
        FaultKind::ProcessStop { name: None },
    ]
}

/// One value of every [`TargetSelector`] variant, each valid.
#[doc(hidden)]
pub fn example_selectors() -> Vec<TargetSelector> {
    vec![
        TargetSelector::Container("db".into()),
        TargetSelector::ContainerId("3f2a9c0d1e4b".into()),
        TargetSelector::Label("app=db".into()),
        TargetSelector::ContainerRegex("^api-[0-9]+$".into()),
        TargetSelector::Cgroup("system.slice/nginx.service".into()),
        TargetSelector::Pid(4242),
        TargetSelector::ProcessName("postgres".into()),
    ]
}

/// Every example kind with every selector it accepts, as specs that pass [`check_spec`].
#[doc(hidden)]
pub fn example_specs() -> Vec<FaultSpec> {
    let mut specs = Vec::new();
    for kind in example_kinds() {
        for target in example_selectors() {
            let spec = FaultSpec {
                kind: kind.clone(),
                target,
                duration: Duration::from_millis(2500),
            };
            if check_spec(&spec).is_ok() {
                specs.push(spec);
            }
        }
    }
    specs
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn examples_cover_every_kind_and_selector() {
        let kinds: BTreeSet<&str> = example_kinds().iter().map(FaultKind::name).collect();
        let names: BTreeSet<&str> = FaultKind::NAMES.iter().copied().collect();
        assert_eq!(kinds, names);
        assert_eq!(FaultKind::NAMES.len(), 25);

        let specs = example_specs();
        let kinds: BTreeSet<&str> = specs.iter().map(|s| s.kind.name()).collect();
        assert_eq!(kinds, names, "every kind has a valid example spec");
        let selectors: BTreeSet<String> = specs
            .iter()
            .map(|s| format!("{:?}", std::mem::discriminant(&s.target)))
            .collect();
        assert_eq!(
            selectors.len(),
            7,
            "every selector has a valid example spec"
        );
        for kind in example_kinds() {
            let spec = FaultSpec {
                kind: kind.clone(),
                target: TargetSelector::Container("db".into()),
                duration: Duration::from_secs(1),
            };
            assert_eq!(check_spec(&spec), Ok(()), "{kind:?}");
        }
    }

    #[test]
    fn targets_fit_their_kinds() {
        let cgroup = TargetSelector::Cgroup("a/b".into());
        let pid = TargetSelector::Pid(42);
        for kind in example_kinds() {
            let container = kind.needs_container_target();
            let on_cgroup = target_fits(&kind, &cgroup).is_ok();
            let on_pid = target_fits(&kind, &pid).is_ok();
            assert_eq!(on_pid, !container, "{kind:?}");
            let expected = matches!(kind.family(), FaultFamily::Resource)
                || matches!(
                    kind,
                    FaultKind::CpuHog { .. }
                        | FaultKind::MemoryHog { .. }
                        | FaultKind::IoHog { .. }
                );
            assert_eq!(on_cgroup, expected, "{kind:?}");
        }
        let err = target_fits(&FaultKind::Freeze, &cgroup);
        assert_eq!(err, Ok(()));
        let err = target_fits(&FaultKind::Bandwidth { rate_bps: 1 }, &cgroup).unwrap_err();
        assert!(err.contains("no network namespace"), "{err}");
        let err = target_fits(&FaultKind::ContainerPause, &pid).unwrap_err();
        assert!(err.contains("needs a container target"), "{err}");
    }

    #[test]
    fn check_spec_refuses_out_of_range_values() {
        let spec = |kind: FaultKind, target: TargetSelector| FaultSpec {
            kind,
            target,
            duration: Duration::from_secs(1),
        };
        let db = || TargetSelector::Container("db".into());
        let bad: Vec<(FaultSpec, &str)> = vec![
            (
                spec(FaultKind::ContainerStop { grace_seconds: 301 }, db()),
                "grace_seconds 301",
            ),
            (
                spec(
                    FaultKind::ContainerLimit {
                        millicpus: None,
                        memory_bytes: None,
                    },
                    db(),
                ),
                "needs millicpus",
            ),
            (
                spec(
                    FaultKind::ContainerLimit {
                        millicpus: Some(0),
                        memory_bytes: None,
                    },
                    db(),
                ),
                "millicpus 0",
            ),
            (
                spec(FaultKind::MemoryLimit { bytes: 1024 }, db()),
                "bytes 1024",
            ),
            (
                spec(
                    FaultKind::Loss {
                        scope: NetScope::default(),
                        basis_points: 10_001,
                    },
                    db(),
                ),
                "basis_points 10001",
            ),
            (
                spec(
                    FaultKind::Latency {
                        scope: NetScope::default(),
                        delay_ms: 10,
                        jitter_ms: 11,
                    },
                    db(),
                ),
                "jitter_ms 11",
            ),
            (
                spec(
                    FaultKind::Partition {
                        scope: NetScope {
                            ports: vec![0],
                            ..NetScope::default()
                        },
                        mode: PartitionMode::Drop,
                    },
                    db(),
                ),
                "port 0",
            ),
            (
                spec(
                    FaultKind::Partition {
                        scope: NetScope {
                            ports: vec![7],
                            protocol: Protocol::Icmp,
                            ..NetScope::default()
                        },
                        mode: PartitionMode::Drop,
                    },
                    db(),
                ),
                "icmp has no ports",
            ),
            (
                spec(
                    FaultKind::Partition {
                        scope: NetScope {
                            peers: vec!["10.1.2.3/8".into()],
                            ..NetScope::default()
                        },
                        mode: PartitionMode::Drop,
                    },
                    db(),
                ),
                "bits are set",
            ),
            (
                spec(
                    FaultKind::Partition {
                        scope: NetScope {
                            peers: vec!["10.1.2.3".into()],
                            ..NetScope::default()
                        },
                        mode: PartitionMode::Drop,
                    },
                    db(),
                ),
                "canonical",
            ),
            (
                spec(
                    FaultKind::CpuHog {
                        workers: 0,
                        load_percent: 10,
                    },
                    db(),
                ),
                "workers 0",
            ),
            (
                spec(
                    FaultKind::CpuHog {
                        workers: 1,
                        load_percent: 101,
                    },
                    db(),
                ),
                "load_percent 101",
            ),
            (
                spec(
                    FaultKind::DiskFill {
                        path: Some("relative".into()),
                        amount: FillAmount::Percent(5),
                    },
                    db(),
                ),
                "absolute",
            ),
            (
                spec(
                    FaultKind::DiskFill {
                        path: None,
                        amount: FillAmount::Percent(0),
                    },
                    db(),
                ),
                "percent 0",
            ),
            (
                spec(
                    FaultKind::ProcessKill {
                        signal: Signal::KILL,
                        name: Some("x".into()),
                        count: 1,
                        interval_ms: 1,
                    },
                    TargetSelector::Pid(7),
                ),
                "already names the process",
            ),
            (
                spec(
                    FaultKind::ProcessKill {
                        signal: Signal::KILL,
                        name: None,
                        count: 1001,
                        interval_ms: 1,
                    },
                    db(),
                ),
                "count 1001",
            ),
            (
                spec(
                    FaultKind::IoThrottle {
                        limits: IoLimits::default(),
                    },
                    db(),
                ),
                "at least one",
            ),
            (
                spec(
                    FaultKind::IoThrottle {
                        limits: IoLimits {
                            device: Some("8".into()),
                            read_iops: Some(1),
                            ..IoLimits::default()
                        },
                    },
                    db(),
                ),
                "MAJOR:MINOR",
            ),
            (spec(FaultKind::Freeze, TargetSelector::Pid(1)), "init"),
            (
                spec(FaultKind::Freeze, TargetSelector::Cgroup(String::new())),
                "root cgroup",
            ),
            (
                spec(FaultKind::Freeze, TargetSelector::Cgroup("/a".into())),
                "leading",
            ),
            (
                spec(FaultKind::Freeze, TargetSelector::Cgroup("a/../b".into())),
                "`..`",
            ),
            (
                spec(
                    FaultKind::Freeze,
                    TargetSelector::ContainerRegex("(".into()),
                ),
                "invalid regular expression \"(\": unclosed group",
            ),
            (
                spec(FaultKind::Freeze, TargetSelector::ContainerId("abc".into())),
                "invalid container id",
            ),
            (
                spec(
                    FaultKind::Freeze,
                    TargetSelector::ProcessName("a-very-long-command".into()),
                ),
                "15 bytes",
            ),
            (
                spec(
                    FaultKind::NetworkDisconnect {
                        network: String::new(),
                    },
                    db(),
                ),
                "invalid network name",
            ),
        ];
        for (spec, fragment) in bad {
            let err = check_spec(&spec).unwrap_err();
            assert!(err.contains(fragment), "{spec:?}: {err}");
        }
        let long = FaultSpec {
            duration: MAX_FAULT_DURATION + Duration::from_millis(1),
            ..spec(FaultKind::Freeze, db())
        };
        assert!(check_spec(&long).unwrap_err().contains("duration"));
        let fine = FaultSpec {
            duration: Duration::from_micros(1500),
            ..spec(FaultKind::Freeze, db())
        };
        assert!(
            check_spec(&fine)
                .unwrap_err()
                .contains("whole milliseconds")
        );
    }

    #[test]
    fn peers_are_canonical_cidrs() {
        assert_eq!(peer("10.0.0.0/8"), Ok("10.0.0.0/8".into()));
        assert_eq!(peer("10.1.2.3"), Ok("10.1.2.3/32".into()));
        assert_eq!(peer("fd00::1"), Ok("fd00::1/128".into()));
        assert_eq!(peer("FD00::/8"), Ok("fd00::/8".into()));
        let err = peer("10.1.2.3/8").unwrap_err();
        assert!(
            err.contains("did you mean 10.0.0.0/8 or 10.1.2.3/32?"),
            "{err}"
        );
        assert!(peer("10.0.0.0/33").unwrap_err().contains("CIDR"));
        assert!(peer("db").unwrap_err().contains("IP address"));
    }
}
