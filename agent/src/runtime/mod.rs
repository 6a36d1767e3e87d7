//! The container runtime seam: everything the agent does to containers goes through
//! [`ContainerRuntime`], with a real Docker Engine backend and a recording fake for unit tests.

pub mod docker;
pub mod fake;

use std::fmt;

use faultline_domain::fault::{Signal, TargetSelector};
use serde::{Deserialize, Serialize};

/// A container resolved to its stable identity at apply time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerRef {
    /// Full container id: the identity the journal records and reverts act on.
    pub id: String,
    /// Name without the leading slash, for humans.
    pub name: String,
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = self.id.get(..12).unwrap_or(&self.id);
        write!(f, "container {short} ({})", self.name)
    }
}

/// Coarse container state, as far as fault reverts care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Running,
    Paused,
    /// Created, exited or dead: not running.
    Stopped,
    /// Restarting, removing or anything else transient.
    Other,
}

/// The CPU and memory limits `docker update` changes, as the engine stores them
/// (`HostConfig`); 0 means "not set" everywhere, as in the Engine API.
///
/// Docker's update API cannot return a field to 0 ("0" in a request means "leave unchanged")
/// and refuses some transitions, so [`ContainerRuntime::set_limits`] reaches a target with 0
/// fields through equivalent values instead: no memory limit becomes
/// [`MEMORY_UNLIMITED`], no CPU quota becomes `cpu_quota = -1`. Compare limits with
/// [`ContainerLimits::equivalent`], which knows these equivalences, not with `==`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerLimits {
    /// CPU limit in billionths of a core (`--cpus`); excludes `cpu_quota`/`cpu_period`.
    pub nano_cpus: i64,
    /// CFS quota in microseconds per `cpu_period`; -1 is "no quota" (and overrides `nano_cpus`).
    pub cpu_quota: i64,
    /// CFS period in microseconds; 0 is the kernel default (100 ms).
    pub cpu_period: i64,
    /// Memory limit in bytes.
    pub memory: i64,
    /// Memory plus swap limit in bytes; -1 is unlimited swap.
    pub memory_swap: i64,
}

/// The largest memory limit the kernel stores (cgroup v1 reads back `unlimited` as this):
/// `i64::MAX` rounded down to a 4 KiB page. Docker cannot clear a memory limit, so "no limit"
/// is restored as this value.
pub const MEMORY_UNLIMITED: i64 = i64::MAX / 4096 * 4096;

/// The kernel's default CFS period, used when a container has none of its own.
pub const DEFAULT_CPU_PERIOD: i64 = 100_000;

impl ContainerLimits {
    /// The CPU limit in force as `(quota, period)` microseconds, `None` when unlimited.
    /// Mirrors how Docker builds the container's cgroup: a non-zero `cpu_quota` overrides the
    /// quota derived from `nano_cpus`.
    pub fn effective_cpu(&self) -> Option<(i64, i64)> {
        let period = if self.cpu_period > 0 {
            self.cpu_period
        } else {
            DEFAULT_CPU_PERIOD
        };
        match self.cpu_quota {
            quota if quota > 0 => Some((quota, period)),
            quota if quota < 0 => None,
            _ if self.nano_cpus > 0 => Some((
                self.nano_cpus * DEFAULT_CPU_PERIOD / 1_000_000_000,
                DEFAULT_CPU_PERIOD,
            )),
            _ => None,
        }
    }

    /// The memory limit in force, `None` when unlimited.
    pub fn effective_memory(&self) -> Option<i64> {
        (self.memory > 0 && self.memory < MEMORY_UNLIMITED).then_some(self.memory)
    }

    /// The memory+swap limit in force, `None` when unlimited (0, -1 or the kernel maximum).
    pub fn effective_memory_swap(&self) -> Option<i64> {
        (self.memory_swap > 0 && self.memory_swap < MEMORY_UNLIMITED).then_some(self.memory_swap)
    }

    /// Whether both impose the same limits on the container, whatever the spelling (`0` and
    /// `-1` quota, `0` and [`MEMORY_UNLIMITED`] memory...).
    pub fn equivalent(&self, other: &ContainerLimits) -> bool {
        self.effective_cpu() == other.effective_cpu()
            && self.effective_memory() == other.effective_memory()
            && self.effective_memory_swap() == other.effective_memory_swap()
    }

    /// These limits with the CPU limited to `millicpus` thousandths of a core, spelled so that
    /// restoring `self` afterwards is possible: through `nano_cpus` if the container already
    /// uses it (Docker then refuses quota changes), else through `cpu_quota`/`cpu_period`
    /// (Docker can never clear `nano_cpus` once set).
    pub fn with_cpu_millis(&self, millicpus: u64) -> ContainerLimits {
        let millicpus = i64::try_from(millicpus).unwrap_or(i64::MAX);
        let mut limited = *self;
        if self.nano_cpus > 0 {
            limited.nano_cpus = millicpus.saturating_mul(1_000_000);
        } else {
            let period = if self.cpu_period > 0 {
                self.cpu_period
            } else {
                DEFAULT_CPU_PERIOD
            };
            limited.cpu_period = period;
            // The kernel's smallest quota is 1 ms.
            limited.cpu_quota = (millicpus.saturating_mul(period) / 1000).max(1000);
        }
        limited
    }

    /// These limits with memory limited to `bytes` and no swap on top (`memory_swap` equal to
    /// `memory`), so the limit bites; Docker needs both set together anyway.
    pub fn with_memory_bytes(&self, bytes: u64) -> ContainerLimits {
        let bytes = i64::try_from(bytes).unwrap_or(MEMORY_UNLIMITED);
        ContainerLimits {
            memory: bytes,
            memory_swap: bytes,
            ..*self
        }
    }
}

impl fmt::Display for ContainerLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nano_cpus={} cpu_quota={} cpu_period={} memory={} memory_swap={}",
            self.nano_cpus, self.cpu_quota, self.cpu_period, self.memory, self.memory_swap
        )
    }
}

/// A container's attachment to one Docker network, as much as is needed to reattach it the
/// same way (`docker network connect --alias ... --ip ... --link ...`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSnapshot {
    /// Network name.
    pub network: String,
    /// Network id, for humans and to notice a network recreated under the same name.
    pub network_id: String,
    /// Network-scoped DNS aliases (Docker adds the short container id on user networks).
    pub aliases: Vec<String>,
    /// Address in use (`IPAddress`); empty while the container is not running.
    pub ipv4_address: Option<String>,
    /// Global IPv6 address in use.
    pub ipv6_address: Option<String>,
    /// Statically configured IPv4 address (`--ip`, `IPAMConfig`), kept across restarts.
    pub static_ipv4: Option<String>,
    /// Statically configured IPv6 address (`--ip6`).
    pub static_ipv6: Option<String>,
    /// Legacy links on this network, `container:alias`.
    pub links: Vec<String>,
}

impl EndpointSnapshot {
    /// The IPv4 address to ask for when reconnecting: the static one, else the one in use.
    pub fn wanted_ipv4(&self) -> Option<&str> {
        self.static_ipv4.as_deref().or(self.ipv4_address.as_deref())
    }

    /// The IPv6 address to ask for when reconnecting.
    pub fn wanted_ipv6(&self) -> Option<&str> {
        self.static_ipv6.as_deref().or(self.ipv6_address.as_deref())
    }
}

/// Errors from a container runtime, with the operation and container they concern.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no container matches {selector}")]
    NotFound { selector: String },
    /// The selector names a host process or cgroup, not a container.
    #[error("{selector} does not name a container")]
    NotAContainer { selector: String },
    /// The selector itself is malformed (a short id prefix, a regular expression that does
    /// not compile...).
    #[error("invalid selector {selector}: {reason}")]
    InvalidSelector { selector: String, reason: String },
    /// The operation needs a running container (one with a main process).
    #[error("container {id} is not running ({state})")]
    NotRunning { id: String, state: String },
    /// A network the operation names does not exist.
    #[error("docker network {network} does not exist")]
    NoSuchNetwork { network: String },
    /// `docker update` was accepted but the limits read back are not (equivalent to) the
    /// ones asked for: some transitions cannot be expressed through the engine's API.
    #[error("container {id}: limits could not be set to {wanted}; they are {actual}")]
    LimitsNotApplied {
        id: String,
        wanted: String,
        actual: String,
    },
    #[error("{selector} matches {count} containers ({names}); a fault needs exactly one")]
    Ambiguous {
        selector: String,
        count: usize,
        names: String,
    },
    #[error("container {id} no longer exists")]
    Gone { id: String },
    #[error("docker {operation} on {target} failed: {message}")]
    Engine {
        operation: &'static str,
        target: String,
        message: String,
    },
    #[error("docker engine unreachable: {0}")]
    Unreachable(String),
}

/// Operations on containers of this host. Implementations must make every operation
/// safe to repeat: reverting twice is not an error.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Resolves a selector to exactly one container.
    fn resolve(
        &self,
        selector: &TargetSelector,
    ) -> impl Future<Output = Result<ContainerRef, RuntimeError>> + Send;
    /// Current state of a container by id.
    fn state(&self, id: &str) -> impl Future<Output = Result<ContainerState, RuntimeError>> + Send;
    fn pause(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn unpause(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn stop(
        &self,
        id: &str,
        grace_seconds: u32,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn kill(
        &self,
        id: &str,
        signal: Signal,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// One line describing the engine (version, API), or why it is unreachable.
    fn describe(&self) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Host pid of the container's main process; [`RuntimeError::NotRunning`] when it has none.
    fn main_pid(&self, id: &str) -> impl Future<Output = Result<u32, RuntimeError>> + Send;
    /// `docker restart`: stop (SIGKILL after `grace_seconds`) then start; starts a stopped
    /// container.
    fn restart(
        &self,
        id: &str,
        grace_seconds: u32,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// CPU and memory limits as the engine stores them.
    fn limits(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ContainerLimits, RuntimeError>> + Send;
    /// Sets limits like `docker update`, reaching fields Docker cannot set back to 0 through
    /// their equivalents, and fails with [`RuntimeError::LimitsNotApplied`] unless the limits
    /// read back are [equivalent](ContainerLimits::equivalent) to `limits`. Setting the
    /// limits a container already has is a no-op.
    fn set_limits(
        &self,
        id: &str,
        limits: &ContainerLimits,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// The container's endpoint on `network` (name, id or id prefix), `None` if not attached.
    fn network_endpoint(
        &self,
        id: &str,
        network: &str,
    ) -> impl Future<Output = Result<Option<EndpointSnapshot>, RuntimeError>> + Send;
    /// Detaches the container from `network`; not being attached is success.
    fn disconnect(
        &self,
        id: &str,
        network: &str,
        force: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Attaches the container to `network` with the snapshot's aliases, links and address;
    /// being attached already is success. If the engine refuses the address (a network
    /// without a user-configured subnet, an address taken meanwhile), the container is
    /// attached with a fresh one rather than left detached.
    fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &EndpointSnapshot,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

/// Validates a container id prefix: hex, at least 12 digits (Docker's short id), at most 64.
pub(crate) fn normalize_id_prefix(
    selector: &TargetSelector,
    prefix: &str,
) -> Result<String, RuntimeError> {
    let prefix = prefix.trim().to_ascii_lowercase();
    let invalid = |reason: &str| RuntimeError::InvalidSelector {
        selector: selector.to_string(),
        reason: reason.to_string(),
    };
    if !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid("a container id is hexadecimal"));
    }
    if prefix.len() < 12 {
        return Err(invalid(
            "an id prefix needs at least 12 digits (the short id)",
        ));
    }
    if prefix.len() > 64 {
        return Err(invalid("a container id has 64 digits"));
    }
    Ok(prefix)
}

/// Compiles a container-name regular expression (unanchored, like `grep`; use `^...$`).
pub(crate) fn compile_name_regex(
    selector: &TargetSelector,
    pattern: &str,
) -> Result<regex::Regex, RuntimeError> {
    regex::Regex::new(pattern).map_err(|err| RuntimeError::InvalidSelector {
        selector: selector.to_string(),
        reason: format!("not a valid regular expression: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: i64 = 1024 * 1024;

    fn limits(
        nano_cpus: i64,
        cpu_quota: i64,
        cpu_period: i64,
        memory: i64,
        memory_swap: i64,
    ) -> ContainerLimits {
        ContainerLimits {
            nano_cpus,
            cpu_quota,
            cpu_period,
            memory,
            memory_swap,
        }
    }

    #[test]
    fn equivalent_limits_ignore_the_spelling_of_unlimited() {
        let none = ContainerLimits::default();
        assert!(none.equivalent(&limits(0, -1, 100_000, MEMORY_UNLIMITED, -1)));
        assert!(none.equivalent(&limits(0, -1, 0, MEMORY_UNLIMITED, MEMORY_UNLIMITED)));
        // A -1 quota overrides nano_cpus, as in Docker's cgroup set-up.
        assert!(none.equivalent(&limits(500_000_000, -1, 0, 0, 0)));
        assert!(!none.equivalent(&limits(500_000_000, 0, 0, 0, 0)));
        // Half a core either way.
        assert!(limits(500_000_000, 0, 0, 0, 0).equivalent(&limits(0, 50_000, 100_000, 0, 0)));
        assert!(limits(0, 50_000, 0, 0, 0).equivalent(&limits(0, 50_000, 100_000, 0, 0)));
        assert!(!limits(0, 50_000, 0, 0, 0).equivalent(&limits(0, 50_000, 200_000, 0, 0)));
        assert!(!none.equivalent(&limits(0, 0, 0, 64 * MIB, 64 * MIB)));
        assert!(!limits(0, 0, 0, 64 * MIB, -1).equivalent(&limits(0, 0, 0, 64 * MIB, 64 * MIB)));
        assert_eq!(MEMORY_UNLIMITED, 9_223_372_036_854_771_712);
    }

    #[test]
    fn cpu_faults_use_quota_unless_the_container_already_uses_nano_cpus() {
        let none = ContainerLimits::default();
        let limited = none.with_cpu_millis(250);
        assert_eq!(limited, limits(0, 25_000, 100_000, 0, 0));
        assert_eq!(limited.effective_cpu(), Some((25_000, 100_000)));
        // The container's own period is kept.
        assert_eq!(
            limits(0, 0, 50_000, 0, 0).with_cpu_millis(500).cpu_quota,
            25_000
        );
        // Never below the kernel's 1 ms.
        assert_eq!(none.with_cpu_millis(1).cpu_quota, 1000);
        let nano = limits(2_000_000_000, 0, 0, 0, 0).with_cpu_millis(100);
        assert_eq!(nano, limits(100_000_000, 0, 0, 0, 0));
    }

    #[test]
    fn memory_faults_set_swap_to_the_same_value() {
        let limited = limits(1, 2, 3, 0, -1).with_memory_bytes(64 * 1024 * 1024);
        assert_eq!(limited, limits(1, 2, 3, 64 * MIB, 64 * MIB));
        assert_eq!(
            ContainerLimits::default()
                .with_memory_bytes(u64::MAX)
                .memory,
            MEMORY_UNLIMITED
        );
    }

    #[test]
    fn id_prefixes_and_name_regexes_are_validated() {
        let selector = TargetSelector::ContainerId("x".into());
        assert_eq!(
            normalize_id_prefix(&selector, " ABCDEF012345 ").unwrap(),
            "abcdef012345"
        );
        for bad in ["abc", "abcdef01234g", &"a".repeat(65), ""] {
            let err = normalize_id_prefix(&selector, bad).unwrap_err();
            assert!(
                matches!(err, RuntimeError::InvalidSelector { .. }),
                "{bad}: {err}"
            );
        }
        let selector = TargetSelector::ContainerRegex("(".into());
        let err = compile_name_regex(&selector, "(").unwrap_err();
        assert!(
            err.to_string().contains("not a valid regular expression"),
            "{err}"
        );
        assert!(
            compile_name_regex(&selector, "^db-[0-9]+$")
                .unwrap()
                .is_match("db-12")
        );
    }

    #[test]
    fn snapshots_prefer_the_static_address_and_survive_json() {
        let snapshot = EndpointSnapshot {
            network: "net".into(),
            ipv4_address: Some("10.0.0.2".into()),
            static_ipv4: Some("10.0.0.9".into()),
            ..Default::default()
        };
        assert_eq!(snapshot.wanted_ipv4(), Some("10.0.0.9"));
        assert_eq!(snapshot.wanted_ipv6(), None);
        let json = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(
            serde_json::from_str::<EndpointSnapshot>(&json).unwrap(),
            snapshot
        );
        let limits = limits(1, 2, 3, 4, 5);
        let json = serde_json::to_string(&limits).unwrap();
        assert_eq!(
            serde_json::from_str::<ContainerLimits>(&json).unwrap(),
            limits
        );
    }
}
