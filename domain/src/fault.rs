//! Faults and their targets, as the coordinator plans them and the agent executes them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a fault acts on, on one agent's host. The agent resolves it at apply time to stable
/// kernel identities (container id -> pid -> network namespace inode / cgroup) and journals those.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum TargetSelector {
    /// A container by its exact name (no leading slash).
    Container(String),
    /// A container by (full or unique prefix of) its id.
    ContainerId(String),
    /// A container by Docker label, `key=value` or `key`; must match exactly one container.
    Label(String),
    /// Containers whose name matches this regular expression (`re:` in plans); exactly one.
    ContainerRegex(String),
    /// A cgroup, by path below the cgroup root (e.g. `system.slice/nginx.service`).
    Cgroup(String),
    /// A process by pid.
    Pid(u32),
    /// A process by exact command name (`comm`); must match exactly one process.
    ProcessName(String),
}

impl TargetSelector {
    /// True for selectors that name a container.
    pub fn is_container(&self) -> bool {
        matches!(
            self,
            Self::Container(_) | Self::ContainerId(_) | Self::Label(_) | Self::ContainerRegex(_)
        )
    }
}

impl fmt::Display for TargetSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Container(name) => write!(f, "container {name}"),
            Self::ContainerId(id) => write!(f, "container id {id}"),
            Self::Label(label) => write!(f, "container labelled {label}"),
            Self::ContainerRegex(re) => write!(f, "container matching re:{re}"),
            Self::Cgroup(path) => write!(f, "cgroup {path}"),
            Self::Pid(pid) => write!(f, "process {pid}"),
            Self::ProcessName(name) => write!(f, "process named {name}"),
        }
    }
}

/// Transport protocol a network fault is limited to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// Which traffic of the target a network fault affects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Both directions.
    #[default]
    Both,
    /// Traffic arriving at the target.
    Ingress,
    /// Traffic leaving the target.
    Egress,
}

/// Limits a network fault to some peers, ports and protocol. Empty lists mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetScope {
    /// Peer networks in CIDR form (`10.0.0.0/8`, `192.168.1.5/32`, `fd00::/8`).
    pub peers: Vec<String>,
    /// Remote or local ports (either side of the connection), 1..=65535.
    pub ports: Vec<u16>,
    pub protocol: Protocol,
    pub direction: Direction,
}

/// How a partition treats packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionMode {
    /// Silently drop: peers see timeouts.
    #[default]
    Drop,
    /// Reject: TCP gets a reset, others an ICMP unreachable; peers see errors at once.
    Reject,
}

/// IO limits for one block device; `None` leaves that limit unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IoLimits {
    /// Block device as `MAJOR:MINOR`; `None` means the device backing the target's root fs.
    pub device: Option<String>,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

/// How much of a filesystem a disk-fill fault takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FillAmount {
    /// Fill until the filesystem is this many percent used (1..=100).
    Percent(u8),
    /// Write this many bytes.
    Bytes(u64),
}

/// The action a fault performs. Each kind has a well-defined, idempotent revert.
///
/// Fractions and percentages are stored as integers (milli-cores, basis points) so faults can
/// be compared and hashed exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FaultKind {
    // --- containers -------------------------------------------------------------------------
    /// `docker pause`; revert: unpause.
    ContainerPause,
    /// `docker stop`; revert: start.
    ContainerStop {
        /// Grace period before Docker escalates to SIGKILL.
        grace_seconds: u32,
    },
    /// `docker kill --signal`; revert: start again if `restart_on_revert`.
    ContainerKill {
        /// Signal name such as `SIGKILL` or `SIGTERM`.
        signal: Signal,
        /// Start the container when the fault is reverted.
        restart_on_revert: bool,
    },
    /// `docker restart` (a one-shot fault; revert makes sure it is running).
    ContainerRestart { grace_seconds: u32 },
    /// `docker update --cpus/--memory`; revert restores the previous limits exactly.
    ContainerLimit {
        /// CPU limit in thousandths of a core (`--cpus=0.1` is 100).
        millicpus: Option<u64>,
        memory_bytes: Option<u64>,
    },
    /// Disconnect from a Docker network; revert reconnects with the same aliases and address.
    NetworkDisconnect { network: String },

    // --- network (inside the target's network namespace) ------------------------------------
    /// Drop or reject traffic matching the scope.
    Partition {
        scope: NetScope,
        mode: PartitionMode,
    },
    /// Drop a random share of packets (basis points: 3000 = 30%).
    Loss { scope: NetScope, basis_points: u32 },
    /// Delay packets by `delay_ms` ± `jitter_ms`.
    Latency {
        scope: NetScope,
        delay_ms: u32,
        jitter_ms: u32,
    },
    /// Duplicate a share of packets (needs netem).
    Duplicate { scope: NetScope, basis_points: u32 },
    /// Corrupt a share of packets (needs netem).
    Corrupt { scope: NetScope, basis_points: u32 },
    /// Reorder a share of packets (needs netem).
    Reorder {
        scope: NetScope,
        basis_points: u32,
        delay_ms: u32,
    },
    /// Limit egress bandwidth to `rate_bps` bits per second.
    Bandwidth { rate_bps: u64 },
    /// Make name resolution fail (port 53 dropped or rejected).
    Dns { mode: PartitionMode },

    // --- resources (the target's cgroup) ------------------------------------------------------
    /// CPU quota as thousandths of a core, like `docker update --cpus`.
    CpuThrottle { millicpus: u64 },
    /// Memory limit in bytes (may drive the target into OOM).
    MemoryLimit { bytes: u64 },
    /// Block IO throttling.
    IoThrottle { limits: IoLimits },
    /// Maximum number of tasks.
    PidsLimit { max: u64 },
    /// Freeze every task of the cgroup.
    Freeze,
    /// Busy-loop `workers` threads at `load_percent` inside the target's cgroup.
    CpuHog { workers: u32, load_percent: u8 },
    /// Allocate and touch `bytes` of memory inside the target's cgroup.
    MemoryHog { bytes: u64 },
    /// Write and sync continuously with `workers` inside the target's cgroup.
    IoHog { workers: u32 },
    /// Fill the target's filesystem (at `path`, default its root) with a file.
    DiskFill {
        path: Option<String>,
        amount: FillAmount,
    },

    // --- processes (inside the target) --------------------------------------------------------
    /// Send `signal` to the target process(es) `count` times, `interval_ms` apart (a restart
    /// storm when the target restarts them). In a container target, `name` picks the processes
    /// with that exact command name; `None` means the container's main process.
    ProcessKill {
        signal: Signal,
        name: Option<String>,
        count: u32,
        interval_ms: u64,
    },
    /// SIGSTOP the target process(es) (`name` as for `ProcessKill`); revert: SIGCONT.
    ProcessStop { name: Option<String> },
}

/// Which family of mechanisms a fault needs; used by pre-flight and for grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultFamily {
    Container,
    Network,
    Resource,
    Stressor,
    Process,
}

impl FaultKind {
    /// Every fault name, as plans spell them.
    pub const NAMES: &'static [&'static str] = &[
        "container-pause",
        "container-stop",
        "container-kill",
        "container-restart",
        "container-limit",
        "network-disconnect",
        "partition",
        "loss",
        "latency",
        "duplicate",
        "corrupt",
        "reorder",
        "bandwidth",
        "dns",
        "cpu-throttle",
        "memory-limit",
        "io-throttle",
        "pids-limit",
        "freeze",
        "cpu-hog",
        "memory-hog",
        "io-hog",
        "disk-fill",
        "process-kill",
        "process-stop",
    ];

    /// Stable name used in plans, reports and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ContainerPause => "container-pause",
            Self::ContainerStop { .. } => "container-stop",
            Self::ContainerKill { .. } => "container-kill",
            Self::ContainerRestart { .. } => "container-restart",
            Self::ContainerLimit { .. } => "container-limit",
            Self::NetworkDisconnect { .. } => "network-disconnect",
            Self::Partition { .. } => "partition",
            Self::Loss { .. } => "loss",
            Self::Latency { .. } => "latency",
            Self::Duplicate { .. } => "duplicate",
            Self::Corrupt { .. } => "corrupt",
            Self::Reorder { .. } => "reorder",
            Self::Bandwidth { .. } => "bandwidth",
            Self::Dns { .. } => "dns",
            Self::CpuThrottle { .. } => "cpu-throttle",
            Self::MemoryLimit { .. } => "memory-limit",
            Self::IoThrottle { .. } => "io-throttle",
            Self::PidsLimit { .. } => "pids-limit",
            Self::Freeze => "freeze",
            Self::CpuHog { .. } => "cpu-hog",
            Self::MemoryHog { .. } => "memory-hog",
            Self::IoHog { .. } => "io-hog",
            Self::DiskFill { .. } => "disk-fill",
            Self::ProcessKill { .. } => "process-kill",
            Self::ProcessStop { .. } => "process-stop",
        }
    }

    /// The mechanism family this fault belongs to.
    pub fn family(&self) -> FaultFamily {
        match self {
            Self::ContainerPause
            | Self::ContainerStop { .. }
            | Self::ContainerKill { .. }
            | Self::ContainerRestart { .. }
            | Self::ContainerLimit { .. }
            | Self::NetworkDisconnect { .. } => FaultFamily::Container,
            Self::Partition { .. }
            | Self::Loss { .. }
            | Self::Latency { .. }
            | Self::Duplicate { .. }
            | Self::Corrupt { .. }
            | Self::Reorder { .. }
            | Self::Bandwidth { .. }
            | Self::Dns { .. } => FaultFamily::Network,
            Self::CpuThrottle { .. }
            | Self::MemoryLimit { .. }
            | Self::IoThrottle { .. }
            | Self::PidsLimit { .. }
            | Self::Freeze => FaultFamily::Resource,
            Self::CpuHog { .. }
            | Self::MemoryHog { .. }
            | Self::IoHog { .. }
            | Self::DiskFill { .. } => FaultFamily::Stressor,
            Self::ProcessKill { .. } | Self::ProcessStop { .. } => FaultFamily::Process,
        }
    }

    /// Faults that act through Docker need a container target.
    pub fn needs_container_target(&self) -> bool {
        self.family() == FaultFamily::Container
    }
}

/// One representative of every fault kind, in [`FaultKind::NAMES`] order: for capability
/// reports (each kind's availability) and for tests that must cover every kind.
pub fn examples() -> Vec<FaultKind> {
    let scope = NetScope::default();
    vec![
        FaultKind::ContainerPause,
        FaultKind::ContainerStop { grace_seconds: 10 },
        FaultKind::ContainerKill {
            signal: Signal::KILL,
            restart_on_revert: true,
        },
        FaultKind::ContainerRestart { grace_seconds: 10 },
        FaultKind::ContainerLimit {
            millicpus: Some(100),
            memory_bytes: None,
        },
        FaultKind::NetworkDisconnect {
            network: "bridge".into(),
        },
        FaultKind::Partition {
            scope: scope.clone(),
            mode: PartitionMode::Drop,
        },
        FaultKind::Loss {
            scope: scope.clone(),
            basis_points: 3000,
        },
        FaultKind::Latency {
            scope: scope.clone(),
            delay_ms: 100,
            jitter_ms: 0,
        },
        FaultKind::Duplicate {
            scope: scope.clone(),
            basis_points: 100,
        },
        FaultKind::Corrupt {
            scope: scope.clone(),
            basis_points: 100,
        },
        FaultKind::Reorder {
            scope: scope.clone(),
            basis_points: 100,
            delay_ms: 10,
        },
        FaultKind::Bandwidth {
            rate_bps: 1_000_000,
        },
        FaultKind::Dns {
            mode: PartitionMode::Drop,
        },
        FaultKind::CpuThrottle { millicpus: 100 },
        FaultKind::MemoryLimit { bytes: 64 << 20 },
        FaultKind::IoThrottle {
            limits: IoLimits {
                read_bps: Some(1 << 20),
                ..Default::default()
            },
        },
        FaultKind::PidsLimit { max: 10 },
        FaultKind::Freeze,
        FaultKind::CpuHog {
            workers: 1,
            load_percent: 100,
        },
        FaultKind::MemoryHog { bytes: 64 << 20 },
        FaultKind::IoHog { workers: 1 },
        FaultKind::DiskFill {
            path: None,
            amount: FillAmount::Percent(90),
        },
        FaultKind::ProcessKill {
            signal: Signal::KILL,
            name: None,
            count: 1,
            interval_ms: 1000,
        },
        FaultKind::ProcessStop { name: None },
    ]
}

/// A fault fully specified for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// What to do.
    pub kind: FaultKind,
    /// What to do it to.
    pub target: TargetSelector,
    /// How long the fault lasts before the agent reverts it on schedule.
    pub duration: Duration,
}

/// A POSIX signal that may be sent to a container, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(&'static str);

impl Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Signal::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Signals a fault may send. Anything else is refused at parse time.
const SIGNALS: &[&str] = &[
    "SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGABRT",
];

impl Signal {
    /// SIGKILL, the default for `container-kill`.
    pub const KILL: Signal = Signal("SIGKILL");

    /// Parses `SIGKILL`, `KILL` or `kill` (any case).
    pub fn parse(text: &str) -> Result<Self, String> {
        let upper = text.trim().to_ascii_uppercase();
        let wanted = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        SIGNALS
            .iter()
            .find(|known| **known == wanted)
            .map(|known| Signal(known))
            .ok_or_else(|| {
                format!(
                    "unknown signal {text:?}; expected one of {}",
                    SIGNALS.join(", ")
                )
            })
    }

    /// The canonical name, e.g. `SIGKILL`.
    pub fn name(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_in_any_spelling_and_unknown_ones_are_refused() {
        assert_eq!(Signal::parse("SIGTERM").unwrap().name(), "SIGTERM");
        assert_eq!(Signal::parse("term").unwrap().name(), "SIGTERM");
        assert_eq!(Signal::parse(" Kill ").unwrap(), Signal::KILL);
        let err = Signal::parse("SIGFOO").unwrap_err();
        assert!(err.contains("unknown signal"), "{err}");
        assert!(Signal::parse("").is_err());
    }

    #[test]
    fn fault_kinds_have_stable_names() {
        assert_eq!(FaultKind::ContainerPause.name(), "container-pause");
        assert_eq!(
            FaultKind::ContainerStop { grace_seconds: 1 }.name(),
            "container-stop"
        );
        let kill = FaultKind::ContainerKill {
            signal: Signal::KILL,
            restart_on_revert: true,
        };
        assert_eq!(kill.name(), "container-kill");
    }
}
