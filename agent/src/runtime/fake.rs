//! An in-memory [`ContainerRuntime`] for unit tests of the agent's logic.
//!
//! It models the same idempotency rules as [`DockerRuntime`](super::docker::DockerRuntime)
//! (pause of a paused, unpause of an unpaused, start of a running and stop of a stopped
//! container all succeed; kill of a non-running container fails), records every call, and can
//! be told to fail the next call of an operation.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use faultline_domain::fault::{Signal, TargetSelector};

use super::{
    ContainerLimits, ContainerRef, ContainerRuntime, ContainerState, EndpointSnapshot,
    RuntimeError, compile_name_regex, normalize_id_prefix,
};

/// Operation names accepted by [`FakeRuntime::fail_next`], as they appear in the call log.
pub const OPERATIONS: &[&str] = &[
    "resolve",
    "state",
    "pause",
    "unpause",
    "stop",
    "start",
    "kill",
    "describe",
    "main_pid",
    "restart",
    "limits",
    "set_limits",
    "network_endpoint",
    "disconnect",
    "connect",
];

/// First fake main pid; each container gets its own, and a new one whenever it (re)starts.
const FIRST_FAKE_PID: u32 = 40_000;

/// One simulated container.
#[derive(Debug, Clone)]
struct FakeContainer {
    name: String,
    id: String,
    labels: BTreeMap<String, String>,
    state: ContainerState,
    /// Host pid of the main process while running or paused.
    main_pid: u32,
    limits: ContainerLimits,
    /// Endpoints by network name.
    endpoints: BTreeMap<String, EndpointSnapshot>,
}

#[derive(Debug, Default)]
struct Inner {
    containers: Vec<FakeContainer>,
    /// Networks that exist (declared, or named by an endpoint).
    networks: BTreeSet<String>,
    /// Next main pid to hand out.
    next_pid: u32,
    calls: Vec<String>,
    /// Queued failures per operation, consumed one per call.
    failures: HashMap<&'static str, VecDeque<RuntimeError>>,
}

impl Inner {
    fn new_pid(&mut self) -> u32 {
        let pid = FIRST_FAKE_PID.max(self.next_pid);
        self.next_pid = pid + 1;
        pid
    }

    /// Logs `op`, pops an injected failure, then finds the container by id.
    fn container(
        &mut self,
        op: &'static str,
        id: &str,
        call: String,
    ) -> Result<&mut FakeContainer, RuntimeError> {
        FakeRuntime::begin(self, op, call)?;
        self.containers
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| RuntimeError::Gone { id: id.to_string() })
    }
}

/// A recording, scriptable stand-in for the Docker Engine.
///
/// Call log entries (see [`FakeRuntime::calls`]):
/// `resolve <selector>`, `state <id>`, `pause <id>`, `unpause <id>`, `stop <id> <grace>`,
/// `start <id>`, `kill <id> <SIGNAL>`, `describe`, `main_pid <id>`, `restart <id> <grace>`,
/// `limits <id>`, `set_limits <id> <limits>`, `network_endpoint <id> <network>`,
/// `disconnect <id> <network>` (`... force` when forced), `connect <id> <network>`.
/// Calls are logged even when they fail.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    // A std Mutex is enough: no method holds it across an await point (none awaits at all).
    inner: Mutex<Inner>,
}

impl FakeRuntime {
    /// An engine without containers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a container. Its id is 64 hex digits derived from the name (see
    /// [`FakeRuntime::id_of`]); `labels` are `(key, value)` pairs.
    pub fn with_container(
        self,
        name: &str,
        labels: &[(&str, &str)],
        state: ContainerState,
    ) -> Self {
        let id = fake_id(name);
        self.with_container_id(name, &id, labels, state)
    }

    /// Adds a container with a chosen id, e.g. a short one for readable call-log assertions.
    pub fn with_container_id(
        self,
        name: &str,
        id: &str,
        labels: &[(&str, &str)],
        state: ContainerState,
    ) -> Self {
        let labels = labels
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let mut inner = self.lock();
        let main_pid = inner.new_pid();
        inner.containers.push(FakeContainer {
            name: name.to_string(),
            id: id.to_string(),
            labels,
            state,
            main_pid,
            limits: ContainerLimits::default(),
            endpoints: BTreeMap::new(),
        });
        drop(inner);
        self
    }

    /// Gives the container named `name` these limits.
    ///
    /// # Panics
    /// If there is no such container.
    pub fn with_limits(self, name: &str, limits: ContainerLimits) -> Self {
        self.edit(name, |container| container.limits = limits);
        self
    }

    /// Attaches the container named `name` to `endpoint.network` (creating the network).
    ///
    /// # Panics
    /// If there is no such container.
    pub fn with_endpoint(self, name: &str, endpoint: EndpointSnapshot) -> Self {
        self.lock().networks.insert(endpoint.network.clone());
        self.edit(name, |container| {
            container
                .endpoints
                .insert(endpoint.network.clone(), endpoint);
        });
        self
    }

    /// Declares a network that exists without any container on it.
    pub fn with_network(self, network: &str) -> Self {
        self.lock().networks.insert(network.to_string());
        self
    }

    /// Sets the main pid of the container named `name`.
    ///
    /// # Panics
    /// If there is no such container.
    pub fn with_main_pid(self, name: &str, pid: u32) -> Self {
        self.edit(name, |container| container.main_pid = pid);
        self
    }

    /// Current limits of the container named `name`.
    pub fn limits_of(&self, name: &str) -> Option<ContainerLimits> {
        self.find(name, |c| c.limits)
    }

    /// The endpoint of the container named `name` on `network`, if attached.
    pub fn endpoint_of(&self, name: &str, network: &str) -> Option<EndpointSnapshot> {
        self.find(name, |c| c.endpoints.get(network).cloned())
            .flatten()
    }

    /// Main pid of the container named `name` (meaningful while it runs).
    pub fn main_pid_of(&self, name: &str) -> Option<u32> {
        self.find(name, |c| c.main_pid)
    }

    fn find<T>(&self, name: &str, read: impl FnOnce(&FakeContainer) -> T) -> Option<T> {
        self.lock()
            .containers
            .iter()
            .find(|c| c.name == name)
            .map(read)
    }

    fn edit(&self, name: &str, change: impl FnOnce(&mut FakeContainer)) {
        let mut inner = self.lock();
        let container = inner.containers.iter_mut().find(|c| c.name == name);
        match container {
            Some(container) => change(container),
            None => panic!("fake runtime has no container {name:?}"),
        }
    }

    /// Makes the next call of `op` (one of [`OPERATIONS`]) fail with an engine error; queued
    /// failures are consumed in order, one per call.
    ///
    /// # Panics
    /// If `op` is not a known operation: a typo would otherwise silently never fire.
    pub fn fail_next(&self, op: &'static str) {
        let error = RuntimeError::Engine {
            operation: op,
            target: "fake".to_string(),
            message: "injected failure".to_string(),
        };
        self.fail_next_with(op, error);
    }

    /// Makes the next call of `op` fail with `error` (e.g. [`RuntimeError::Unreachable`]).
    ///
    /// # Panics
    /// If `op` is not a known operation.
    pub fn fail_next_with(&self, op: &'static str, error: RuntimeError) {
        assert!(
            OPERATIONS.contains(&op),
            "unknown fake runtime operation {op:?}"
        );
        self.lock().failures.entry(op).or_default().push_back(error);
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Current state of the container named `name`, `None` if there is none.
    pub fn state_of(&self, name: &str) -> Option<ContainerState> {
        self.lock()
            .containers
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.state)
    }

    /// Id of the container named `name`.
    pub fn id_of(&self, name: &str) -> Option<String> {
        self.lock()
            .containers
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id.clone())
    }

    /// Changes a container's state behind the agent's back (someone else ran `docker ...`).
    /// Returns whether the container exists.
    pub fn set_state(&self, name: &str, state: ContainerState) -> bool {
        let mut inner = self.lock();
        match inner.containers.iter_mut().find(|c| c.name == name) {
            Some(container) => {
                container.state = state;
                true
            }
            None => false,
        }
    }

    /// Removes a container, so later operations on its id report [`RuntimeError::Gone`].
    /// Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let before = inner.containers.len();
        inner.containers.retain(|c| c.name != name);
        inner.containers.len() != before
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread may poison the lock; the data is still usable for others.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs a call and pops an injected failure for it, if any.
    fn begin(inner: &mut Inner, op: &'static str, call: String) -> Result<(), RuntimeError> {
        inner.calls.push(call);
        match inner.failures.get_mut(op).and_then(VecDeque::pop_front) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Logs `op` on `id`, then applies `change` to the container's state.
    fn transition(
        &self,
        op: &'static str,
        id: &str,
        call: String,
        change: impl FnOnce(ContainerState) -> Result<ContainerState, String>,
    ) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let fresh_pid = FIRST_FAKE_PID.max(inner.next_pid);
        let container = inner.container(op, id, call)?;
        let before = container.state;
        container.state = change(before).map_err(|message| RuntimeError::Engine {
            operation: op,
            target: id.to_string(),
            message,
        })?;
        // A (re)started container has a new main process.
        let started = !has_process(before) && has_process(container.state);
        if started {
            container.main_pid = fresh_pid;
            inner.next_pid = fresh_pid + 1;
        }
        Ok(())
    }
}

/// Whether a container in this state has a main process.
fn has_process(state: ContainerState) -> bool {
    matches!(state, ContainerState::Running | ContainerState::Paused)
}

impl ContainerRuntime for FakeRuntime {
    async fn resolve(&self, selector: &TargetSelector) -> Result<ContainerRef, RuntimeError> {
        let mut inner = self.lock();
        Self::begin(&mut inner, "resolve", format!("resolve {selector}"))?;
        let matcher = Matcher::new(selector)?;
        let mut found: Vec<ContainerRef> = inner
            .containers
            .iter()
            .filter(|c| matcher.matches(c))
            .map(|c| ContainerRef {
                id: c.id.clone(),
                name: c.name.clone(),
            })
            .collect();
        match found.len() {
            0 => Err(RuntimeError::NotFound {
                selector: selector.to_string(),
            }),
            1 => Ok(found.remove(0)),
            count => {
                let mut names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
                names.sort_unstable();
                Err(RuntimeError::Ambiguous {
                    selector: selector.to_string(),
                    count,
                    names: names.join(", "),
                })
            }
        }
    }

    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let mut inner = self.lock();
        Self::begin(&mut inner, "state", format!("state {id}"))?;
        inner
            .containers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.state)
            .ok_or_else(|| RuntimeError::Gone { id: id.to_string() })
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.transition("pause", id, format!("pause {id}"), |state| match state {
            ContainerState::Running | ContainerState::Paused => Ok(ContainerState::Paused),
            other => Err(format!("container is not running ({other:?})")),
        })
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        // Anything not paused is already "unpaused": the revert is done.
        self.transition(
            "unpause",
            id,
            format!("unpause {id}"),
            |state| match state {
                ContainerState::Paused => Ok(ContainerState::Running),
                other => Ok(other),
            },
        )
    }

    async fn stop(&self, id: &str, grace_seconds: u32) -> Result<(), RuntimeError> {
        self.transition("stop", id, format!("stop {id} {grace_seconds}"), |_| {
            Ok(ContainerState::Stopped)
        })
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.transition("start", id, format!("start {id}"), |state| match state {
            // Like Docker: resuming a frozen container is unpause's job.
            ContainerState::Paused => {
                Err("cannot start a paused container, try unpause instead".to_string())
            }
            _ => Ok(ContainerState::Running),
        })
    }

    async fn kill(&self, id: &str, signal: Signal) -> Result<(), RuntimeError> {
        // The fake has no process to react to the signal; any signal is taken as fatal.
        self.transition(
            "kill",
            id,
            format!("kill {id} {signal}"),
            |state| match state {
                ContainerState::Running | ContainerState::Paused => Ok(ContainerState::Stopped),
                other => Err(format!("container is not running ({other:?})")),
            },
        )
    }

    async fn describe(&self) -> Result<String, RuntimeError> {
        let mut inner = self.lock();
        Self::begin(&mut inner, "describe", "describe".to_string())?;
        Ok("fake runtime".to_string())
    }

    async fn main_pid(&self, id: &str) -> Result<u32, RuntimeError> {
        let mut inner = self.lock();
        let container = inner.container("main_pid", id, format!("main_pid {id}"))?;
        if has_process(container.state) {
            Ok(container.main_pid)
        } else {
            Err(RuntimeError::NotRunning {
                id: id.to_string(),
                state: format!("{:?}", container.state).to_lowercase(),
            })
        }
    }

    async fn restart(&self, id: &str, grace_seconds: u32) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let fresh_pid = inner.new_pid();
        let container = inner.container("restart", id, format!("restart {id} {grace_seconds}"))?;
        // Like Docker: whatever the state (paused included), it ends up running anew.
        container.state = ContainerState::Running;
        container.main_pid = fresh_pid;
        Ok(())
    }

    async fn limits(&self, id: &str) -> Result<ContainerLimits, RuntimeError> {
        let mut inner = self.lock();
        Ok(inner
            .container("limits", id, format!("limits {id}"))?
            .limits)
    }

    async fn set_limits(&self, id: &str, limits: &ContainerLimits) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let call = format!("set_limits {id} {limits}");
        inner.container("set_limits", id, call)?.limits = *limits;
        Ok(())
    }

    async fn network_endpoint(
        &self,
        id: &str,
        network: &str,
    ) -> Result<Option<EndpointSnapshot>, RuntimeError> {
        let mut inner = self.lock();
        let call = format!("network_endpoint {id} {network}");
        let container = inner.container("network_endpoint", id, call)?;
        Ok(container.endpoints.get(network).cloned())
    }

    async fn disconnect(&self, id: &str, network: &str, force: bool) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let call = if force {
            format!("disconnect {id} {network} force")
        } else {
            format!("disconnect {id} {network}")
        };
        // Not attached (or no such network): already disconnected.
        inner
            .container("disconnect", id, call)?
            .endpoints
            .remove(network);
        Ok(())
    }

    async fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &EndpointSnapshot,
    ) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let known = inner.networks.contains(network);
        let container = inner.container("connect", id, format!("connect {id} {network}"))?;
        if container.endpoints.contains_key(network) {
            return Ok(());
        }
        if !known {
            return Err(RuntimeError::NoSuchNetwork {
                network: network.to_string(),
            });
        }
        let restored = EndpointSnapshot {
            network: network.to_string(),
            ..endpoint.clone()
        };
        container.endpoints.insert(network.to_string(), restored);
        Ok(())
    }
}

/// A container selector, validated like [`DockerRuntime`](super::docker::DockerRuntime) does.
enum Matcher<'a> {
    /// Exact name.
    Name(&'a str),
    /// Label `key=value` or `key` (present, any value).
    Label(&'a str),
    /// Id prefix (lower-case hex, 12+ digits).
    IdPrefix(String),
    /// Unanchored regular expression over names.
    Regex(regex::Regex),
}

impl<'a> Matcher<'a> {
    fn new(selector: &'a TargetSelector) -> Result<Self, RuntimeError> {
        Ok(match selector {
            TargetSelector::Container(name) => Matcher::Name(name.trim_start_matches('/')),
            TargetSelector::Label(label) => Matcher::Label(label.trim()),
            TargetSelector::ContainerId(prefix) => {
                Matcher::IdPrefix(normalize_id_prefix(selector, prefix)?)
            }
            TargetSelector::ContainerRegex(pattern) => {
                Matcher::Regex(compile_name_regex(selector, pattern)?)
            }
            TargetSelector::Cgroup(_) | TargetSelector::Pid(_) | TargetSelector::ProcessName(_) => {
                return Err(RuntimeError::NotAContainer {
                    selector: selector.to_string(),
                });
            }
        })
    }

    fn matches(&self, container: &FakeContainer) -> bool {
        match self {
            Matcher::Name(name) => container.name == *name,
            Matcher::Label(label) => match label.split_once('=') {
                Some((key, value)) => container.labels.get(key).is_some_and(|v| v == value),
                None => !label.is_empty() && container.labels.contains_key(*label),
            },
            Matcher::IdPrefix(prefix) => container.id.starts_with(prefix.as_str()),
            Matcher::Regex(regex) => regex.is_match(&container.name),
        }
    }
}

/// A deterministic, realistic-looking (64 hex digits) id for a name (FNV-1a, repeated).
fn fake_id(name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut id = String::with_capacity(64);
    for round in 0u8..4 {
        for byte in name.bytes().chain([round]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        id.push_str(&format!("{hash:016x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    use ContainerState::{Paused, Running, Stopped};

    fn runtime() -> FakeRuntime {
        FakeRuntime::new()
            .with_container_id("db", "abc123", &[("app", "db"), ("tier", "data")], Running)
            .with_container_id(
                "db-backup",
                "def456",
                &[("app", "backup"), ("tier", "data")],
                Running,
            )
            .with_container_id("old", "0ld000", &[], Stopped)
    }

    #[tokio::test]
    async fn resolves_exact_names_and_labels_only() {
        let rt = runtime();
        let db = rt
            .resolve(&TargetSelector::Container("db".into()))
            .await
            .unwrap();
        assert_eq!(
            db,
            ContainerRef {
                id: "abc123".into(),
                name: "db".into()
            }
        );
        let by_label = rt
            .resolve(&TargetSelector::Label("app=backup".into()))
            .await
            .unwrap();
        assert_eq!(by_label.name, "db-backup");
        let missing = rt
            .resolve(&TargetSelector::Container("d".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(missing, RuntimeError::NotFound { .. }),
            "{missing}"
        );
        let ambiguous = rt
            .resolve(&TargetSelector::Label("tier".into()))
            .await
            .unwrap_err();
        match ambiguous {
            RuntimeError::Ambiguous {
                count: 2, names, ..
            } => assert_eq!(names, "db, db-backup"),
            other => panic!("unexpected {other:?}"),
        }
        let wrong_value = rt
            .resolve(&TargetSelector::Label("app=web".into()))
            .await
            .unwrap_err();
        assert!(matches!(wrong_value, RuntimeError::NotFound { .. }));
    }

    #[tokio::test]
    async fn reverts_are_idempotent() {
        let rt = runtime();
        rt.pause("abc123").await.unwrap();
        rt.pause("abc123").await.unwrap();
        assert_eq!(rt.state_of("db"), Some(Paused));
        assert_eq!(rt.state("abc123").await.unwrap(), Paused);
        rt.unpause("abc123").await.unwrap();
        rt.unpause("abc123").await.unwrap();
        assert_eq!(rt.state_of("db"), Some(Running));
        rt.stop("abc123", 5).await.unwrap();
        rt.stop("abc123", 5).await.unwrap();
        assert_eq!(rt.state_of("db"), Some(Stopped));
        rt.start("abc123").await.unwrap();
        rt.start("abc123").await.unwrap();
        assert_eq!(rt.state_of("db"), Some(Running));
        assert_eq!(
            rt.calls(),
            [
                "pause abc123",
                "pause abc123",
                "state abc123",
                "unpause abc123",
                "unpause abc123",
                "stop abc123 5",
                "stop abc123 5",
                "start abc123",
                "start abc123",
            ]
        );
    }

    #[tokio::test]
    async fn kill_needs_a_running_container_and_paused_ones_cannot_be_started() {
        let rt = runtime();
        rt.kill("abc123", Signal::KILL).await.unwrap();
        assert_eq!(rt.state_of("db"), Some(Stopped));
        let err = rt.kill("abc123", Signal::KILL).await.unwrap_err();
        assert!(err.to_string().contains("not running"), "{err}");
        let err = rt.pause("0ld000").await.unwrap_err();
        assert!(
            matches!(
                err,
                RuntimeError::Engine {
                    operation: "pause",
                    ..
                }
            ),
            "{err}"
        );
        rt.pause("def456").await.unwrap();
        let err = rt.start("def456").await.unwrap_err();
        assert!(err.to_string().contains("paused"), "{err}");
        assert_eq!(
            rt.calls().first().map(String::as_str),
            Some("kill abc123 SIGKILL")
        );
    }

    #[tokio::test]
    async fn removed_containers_are_gone() {
        let rt = runtime();
        assert!(rt.remove("db"));
        assert!(!rt.remove("db"));
        assert!(matches!(
            rt.state("abc123").await,
            Err(RuntimeError::Gone { .. })
        ));
        assert!(matches!(
            rt.unpause("abc123").await,
            Err(RuntimeError::Gone { .. })
        ));
        assert!(matches!(
            rt.start("abc123").await,
            Err(RuntimeError::Gone { .. })
        ));
        assert_eq!(rt.state_of("db"), None);
    }

    #[tokio::test]
    async fn injected_failures_fire_once_each_and_leave_state_alone() {
        let rt = runtime();
        rt.fail_next("unpause");
        rt.fail_next_with("unpause", RuntimeError::Unreachable("socket closed".into()));
        rt.pause("abc123").await.unwrap();
        let first = rt.unpause("abc123").await.unwrap_err();
        assert!(first.to_string().contains("injected failure"), "{first}");
        let second = rt.unpause("abc123").await.unwrap_err();
        assert!(matches!(second, RuntimeError::Unreachable(_)));
        assert_eq!(rt.state_of("db"), Some(Paused));
        rt.unpause("abc123").await.unwrap();
        assert_eq!(rt.state_of("db"), Some(Running));
        assert_eq!(
            rt.calls().len(),
            4,
            "failed calls are logged too: {:?}",
            rt.calls()
        );
    }

    #[tokio::test]
    async fn external_changes_and_generated_ids() {
        let rt = FakeRuntime::new().with_container("web", &[], Running);
        let id = rt.id_of("web").unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, fake_id("web2"));
        assert!(rt.set_state("web", Stopped));
        assert_eq!(rt.state(&id).await.unwrap(), Stopped);
        assert!(!rt.set_state("nope", Stopped));
        assert_eq!(rt.describe().await.unwrap(), "fake runtime");
    }

    #[tokio::test]
    async fn resolves_ids_regexes_and_refuses_process_selectors() {
        let rt = FakeRuntime::new()
            .with_container_id("web-1", "aaaabbbbcccc1111", &[], Running)
            .with_container_id("web-2", "aaaabbbbcccc2222", &[], Running)
            .with_container_id("db", "ddddeeeeffff0000", &[], Running);
        let by_id = rt
            .resolve(&TargetSelector::ContainerId("DDDDEEEEFFFF".into()))
            .await
            .unwrap();
        assert_eq!(by_id.name, "db");
        let err = rt
            .resolve(&TargetSelector::ContainerId("aaaabbbbcccc".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RuntimeError::Ambiguous { count: 2, .. }),
            "{err}"
        );
        let err = rt
            .resolve(&TargetSelector::ContainerId("dddd".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidSelector { .. }), "{err}");
        let by_regex = rt
            .resolve(&TargetSelector::ContainerRegex("^web-2$".into()))
            .await
            .unwrap();
        assert_eq!(by_regex.id, "aaaabbbbcccc2222");
        let err = rt
            .resolve(&TargetSelector::ContainerRegex("web".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RuntimeError::Ambiguous { count: 2, .. }),
            "{err}"
        );
        let err = rt
            .resolve(&TargetSelector::ContainerRegex("web[".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidSelector { .. }), "{err}");
        for selector in [
            TargetSelector::Pid(1),
            TargetSelector::ProcessName("sleep".into()),
            TargetSelector::Cgroup("system.slice".into()),
        ] {
            let err = rt.resolve(&selector).await.unwrap_err();
            assert!(matches!(err, RuntimeError::NotAContainer { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn main_pids_change_when_containers_restart() {
        let rt = runtime();
        let first = rt.main_pid("abc123").await.unwrap();
        assert_eq!(rt.main_pid_of("db"), Some(first));
        rt.restart("abc123", 3).await.unwrap();
        let second = rt.main_pid("abc123").await.unwrap();
        assert_ne!(first, second);
        let err = rt.main_pid("0ld000").await.unwrap_err();
        assert!(matches!(err, RuntimeError::NotRunning { .. }), "{err}");
        rt.restart("0ld000", 1).await.unwrap();
        assert_eq!(rt.state_of("old"), Some(Running));
        rt.stop("abc123", 1).await.unwrap();
        rt.start("abc123").await.unwrap();
        assert_ne!(rt.main_pid("abc123").await.unwrap(), second);
        assert!(rt.calls().contains(&"restart abc123 3".to_string()));
    }

    #[tokio::test]
    async fn limits_are_stored_and_restored() {
        let original = ContainerLimits {
            memory: 64 << 20,
            memory_swap: -1,
            ..Default::default()
        };
        let rt = runtime().with_limits("db", original);
        assert_eq!(rt.limits("abc123").await.unwrap(), original);
        let faulted = original.with_cpu_millis(100).with_memory_bytes(16 << 20);
        rt.set_limits("abc123", &faulted).await.unwrap();
        assert_eq!(rt.limits_of("db"), Some(faulted));
        rt.set_limits("abc123", &original).await.unwrap();
        rt.set_limits("abc123", &original).await.unwrap();
        assert_eq!(rt.limits_of("db"), Some(original));
        rt.fail_next("set_limits");
        assert!(rt.set_limits("abc123", &faulted).await.is_err());
        assert_eq!(rt.limits_of("db"), Some(original));
    }

    #[tokio::test]
    async fn networks_disconnect_and_reconnect_idempotently() {
        let endpoint = EndpointSnapshot {
            network: "appnet".into(),
            network_id: "n1".into(),
            aliases: vec!["db".into()],
            ipv4_address: Some("10.254.0.5".into()),
            ..Default::default()
        };
        let rt = runtime()
            .with_endpoint("db", endpoint.clone())
            .with_network("empty");
        let snapshot = rt
            .network_endpoint("abc123", "appnet")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(snapshot, endpoint);
        rt.disconnect("abc123", "appnet", false).await.unwrap();
        rt.disconnect("abc123", "appnet", true).await.unwrap();
        assert_eq!(rt.endpoint_of("db", "appnet"), None);
        rt.connect("abc123", "appnet", &snapshot).await.unwrap();
        rt.connect("abc123", "appnet", &snapshot).await.unwrap();
        assert_eq!(rt.endpoint_of("db", "appnet"), Some(endpoint));
        let err = rt
            .connect("abc123", "nowhere", &snapshot)
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::NoSuchNetwork { .. }), "{err}");
        rt.connect("abc123", "empty", &snapshot).await.unwrap();
        assert_eq!(
            rt.endpoint_of("db", "empty").map(|e| e.network),
            Some("empty".to_string())
        );
        assert!(
            rt.calls()
                .contains(&"disconnect abc123 appnet force".to_string())
        );
        assert!(matches!(
            rt.network_endpoint("gone", "appnet").await,
            Err(RuntimeError::Gone { .. })
        ));
    }

    #[test]
    #[should_panic(expected = "unknown fake runtime operation")]
    fn unknown_operations_are_refused() {
        FakeRuntime::new().fail_next("paws");
    }
}
