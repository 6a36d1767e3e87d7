//! [`ContainerRuntime`] backed by the local Docker Engine API (via bollard).
//!
//! Every operation is idempotent in the direction a revert needs: reverts are retried and
//! replayed from the journal after a crash, so "already in the wanted state" must be success,
//! never an error. The engine reports those cases inconsistently (Docker 20.10: start/stop
//! answer 304, pause answers 409, unpause answers 500), so instead of trusting status codes
//! or parsing messages, a refused pause/unpause is double-checked against the actual state.

use std::collections::HashMap;
use std::error::Error as _;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary, ContainerUpdateBody,
    EndpointIpamConfig, EndpointSettings, NetworkConnectRequest, NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptions, ListContainersOptions, RestartContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use faultline_domain::fault::{Signal, TargetSelector};
use regex::Regex;

use super::{
    ContainerLimits, ContainerRef, ContainerRuntime, ContainerState, DEFAULT_CPU_PERIOD,
    EndpointSnapshot, MEMORY_UNLIMITED, RuntimeError, compile_name_regex, normalize_id_prefix,
};

/// HTTP status the engine uses for "no such container".
const NOT_FOUND: u16 = 404;

/// Slack on top of a stop's grace period before the client gives up on the request: the engine
/// only answers once the container is down, which can take the whole grace period plus the
/// SIGKILL that follows it.
const STOP_TIMEOUT_SLACK: Duration = Duration::from_secs(60);

/// A Docker Engine reached over its local Unix socket.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects to the engine at the default socket (`DOCKER_HOST` is not consulted) and
    /// negotiates the API version down to what the engine speaks, since bollard's default is
    /// newer than older engines (e.g. 20.10 = API 1.41) accept.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_socket_defaults()
            .map_err(|err| RuntimeError::Unreachable(error_chain(&err)))?;
        Self::from_client(docker).await
    }

    /// Wraps an already configured client (another socket, a custom timeout), negotiating its
    /// API version. Fails with [`RuntimeError::Unreachable`] if the engine does not answer.
    pub async fn from_client(docker: Docker) -> Result<Self, RuntimeError> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|err| RuntimeError::Unreachable(error_chain(&err)))?;
        Ok(Self { docker })
    }

    /// The underlying client, for callers that need an API this trait does not cover.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Lists all containers (running or not) matching one engine-side filter.
    async fn list_filtered(
        &self,
        selector: &TargetSelector,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let filters = HashMap::from([(key.to_string(), vec![value.to_string()])]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|err| map_error("list", &selector.to_string(), err))
    }

    /// Lists every container, running or not.
    async fn list_all(
        &self,
        selector: &TargetSelector,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let options = ListContainersOptions {
            all: true,
            ..Default::default()
        };
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|err| map_error("list", &selector.to_string(), err))
    }

    /// Inspects a container.
    async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, RuntimeError> {
        self.docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|err| map_error("inspect", id, err))
    }

    /// A client whose request timeout covers an operation lasting `grace_seconds` (stop,
    /// restart); a clone shares the connection pool and negotiated version.
    fn client_for_grace(&self, grace_seconds: u32) -> Docker {
        let needed = Duration::from_secs(u64::from(grace_seconds)) + STOP_TIMEOUT_SLACK;
        if needed > self.docker.timeout() {
            self.docker.clone().with_timeout(needed)
        } else {
            self.docker.clone()
        }
    }

    /// One `POST /containers/{id}/update`; zero fields are left unchanged by the engine.
    async fn update_limits(&self, id: &str, request: &ContainerLimits) -> Result<(), RuntimeError> {
        let nonzero = |value: i64| (value != 0).then_some(value);
        let body = ContainerUpdateBody {
            nano_cpus: nonzero(request.nano_cpus),
            cpu_quota: nonzero(request.cpu_quota),
            cpu_period: nonzero(request.cpu_period),
            memory: nonzero(request.memory),
            memory_swap: nonzero(request.memory_swap),
            ..Default::default()
        };
        self.docker
            .update_container(id, body)
            .await
            .map_err(|err| map_error("update", id, err))
    }

    /// Maps a failed network operation: the engine answers 404 both for a missing container
    /// and a missing network, so the container is looked up to tell which.
    async fn network_error(
        &self,
        operation: &'static str,
        id: &str,
        network: &str,
        err: BollardError,
    ) -> RuntimeError {
        let target = format!("{id} on network {network}");
        match map_error(operation, &target, err) {
            RuntimeError::Gone { .. } => match self.inspect(id).await {
                Ok(_) => RuntimeError::NoSuchNetwork {
                    network: network.to_string(),
                },
                Err(other) => other,
            },
            other => other,
        }
    }

    /// Inspects a container and reduces its state to what reverts care about.
    async fn inspect_state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let inspect = self.inspect(id).await?;
        let Some(state) = inspect.state else {
            // The engine always reports a state; without one we cannot claim anything.
            return Ok(ContainerState::Other);
        };
        let running = state.running.unwrap_or(false);
        let paused = state.paused.unwrap_or(false);
        Ok(match state.status {
            Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
            Some(ContainerStateStatusEnum::RUNNING) if paused => ContainerState::Paused,
            Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
            Some(
                ContainerStateStatusEnum::CREATED
                | ContainerStateStatusEnum::EXITED
                | ContainerStateStatusEnum::DEAD,
            ) => ContainerState::Stopped,
            // Older engines may omit `Status`; fall back on the flags.
            None if running && paused => ContainerState::Paused,
            None if running => ContainerState::Running,
            _ => ContainerState::Other,
        })
    }

    /// After the engine refused an operation, decides whether the container is nevertheless in
    /// the state the operation wanted (then the refusal means "already done": success), or
    /// returns the original refusal.
    async fn accept_if_already(
        &self,
        id: &str,
        refusal: RuntimeError,
        already: impl Fn(ContainerState) -> bool,
    ) -> Result<(), RuntimeError> {
        if matches!(refusal, RuntimeError::Engine { .. }) && already(self.inspect_state(id).await?)
        {
            return Ok(());
        }
        Err(refusal)
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn resolve(&self, selector: &TargetSelector) -> Result<ContainerRef, RuntimeError> {
        let matches: Vec<ContainerRef> = match selector {
            TargetSelector::Container(name) => {
                let name = name.trim_start_matches('/');
                if !is_valid_container_name(name) {
                    // Docker's name filter is a regular expression: passing arbitrary text
                    // would at best fail with a 500. A name Docker could never have given a
                    // container matches nothing.
                    return Err(RuntimeError::NotFound {
                        selector: selector.to_string(),
                    });
                }
                self.list_filtered(selector, "name", name)
                    .await?
                    .into_iter()
                    // The engine's name filter matches substrings (`db` finds `db-backup`);
                    // a fault must only ever hit the exact container asked for.
                    .filter(|summary| has_exact_name(summary, name))
                    .filter_map(|summary| container_ref(&summary, Some(name)))
                    .collect()
            }
            TargetSelector::Label(label) => {
                if label.trim().is_empty() {
                    return Err(RuntimeError::NotFound {
                        selector: selector.to_string(),
                    });
                }
                self.list_filtered(selector, "label", label.trim())
                    .await?
                    .into_iter()
                    .filter_map(|summary| container_ref(&summary, None))
                    .collect()
            }
            TargetSelector::ContainerId(prefix) => {
                let prefix = normalize_id_prefix(selector, prefix)?;
                self.list_filtered(selector, "id", &prefix)
                    .await?
                    .into_iter()
                    // The engine's id filter is not anchored; a selector is a prefix.
                    .filter(|summary| {
                        summary
                            .id
                            .as_deref()
                            .is_some_and(|id| id.starts_with(&prefix))
                    })
                    .filter_map(|summary| container_ref(&summary, None))
                    .collect()
            }
            TargetSelector::ContainerRegex(pattern) => {
                let regex = compile_name_regex(selector, pattern)?;
                self.list_all(selector)
                    .await?
                    .into_iter()
                    .filter_map(|summary| {
                        let name = matching_name(&summary, &regex)?;
                        container_ref(&summary, Some(&name))
                    })
                    .collect()
            }
            TargetSelector::Cgroup(_) | TargetSelector::Pid(_) | TargetSelector::ProcessName(_) => {
                return Err(RuntimeError::NotAContainer {
                    selector: selector.to_string(),
                });
            }
        };
        exactly_one(selector, matches)
    }

    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        self.inspect_state(id).await
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        match self.docker.pause_container(id).await {
            Ok(()) => Ok(()),
            // 409 "is already paused": the fault is in place, which is what was asked.
            Err(err) => {
                let refusal = map_error("pause", id, err);
                self.accept_if_already(id, refusal, |state| state == ContainerState::Paused)
                    .await
            }
        }
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        match self.docker.unpause_container(id).await {
            Ok(()) => Ok(()),
            // Docker 20.10 answers 500 "is not paused" for running and stopped containers
            // alike: either way nothing is frozen any more, so the revert is complete.
            Err(err) => {
                let refusal = map_error("unpause", id, err);
                self.accept_if_already(id, refusal, |state| state != ContainerState::Paused)
                    .await
            }
        }
    }

    async fn stop(&self, id: &str, grace_seconds: u32) -> Result<(), RuntimeError> {
        let options = StopContainerOptions {
            // The API takes an i32; a grace period beyond that is meaningless anyway.
            t: Some(i32::try_from(grace_seconds).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        // The request lasts as long as the grace period, which may exceed the client's default
        // timeout.
        let docker = self.client_for_grace(grace_seconds);
        // Stopping a stopped container answers 304, which bollard reports as success.
        docker
            .stop_container(id, Some(options))
            .await
            .map_err(|err| map_error("stop", id, err))
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        // Starting a running container answers 304, which bollard reports as success. A paused
        // container is refused (409 "try unpause instead"): starting is not how it is resumed.
        self.docker
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(|err| map_error("start", id, err))
    }

    async fn kill(&self, id: &str, signal: Signal) -> Result<(), RuntimeError> {
        // No idempotency here on purpose: killing applies a fault, it never reverts one, so
        // "not running" (409) must reach the caller rather than pretend the fault happened.
        let options = KillContainerOptions {
            signal: signal.name().to_string(),
        };
        self.docker
            .kill_container(id, Some(options))
            .await
            .map_err(|err| map_error("kill", id, err))
    }

    async fn describe(&self) -> Result<String, RuntimeError> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|err| map_error("version", "engine", err))?;
        let engine = version.version.unwrap_or_else(|| "unknown".to_string());
        let api = version.api_version.unwrap_or_else(|| "unknown".to_string());
        Ok(format!("docker engine {engine} (API {api})"))
    }

    async fn main_pid(&self, id: &str) -> Result<u32, RuntimeError> {
        let state = self.inspect(id).await?.state.unwrap_or_default();
        let pid = state.pid.unwrap_or(0);
        match u32::try_from(pid) {
            Ok(pid) if pid > 0 && state.running.unwrap_or(false) => Ok(pid),
            _ => Err(RuntimeError::NotRunning {
                id: id.to_string(),
                state: state
                    .status
                    .map(|status| status.to_string())
                    .unwrap_or_else(|| "unknown state".to_string()),
            }),
        }
    }

    async fn restart(&self, id: &str, grace_seconds: u32) -> Result<(), RuntimeError> {
        let options = RestartContainerOptions {
            t: Some(i32::try_from(grace_seconds).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        self.client_for_grace(grace_seconds)
            .restart_container(id, Some(options))
            .await
            .map_err(|err| map_error("restart", id, err))
    }

    async fn limits(&self, id: &str) -> Result<ContainerLimits, RuntimeError> {
        let host = self.inspect(id).await?.host_config.unwrap_or_default();
        Ok(ContainerLimits {
            nano_cpus: host.nano_cpus.unwrap_or(0),
            cpu_quota: host.cpu_quota.unwrap_or(0),
            cpu_period: host.cpu_period.unwrap_or(0),
            memory: host.memory.unwrap_or(0),
            memory_swap: host.memory_swap.unwrap_or(0),
        })
    }

    async fn set_limits(&self, id: &str, limits: &ContainerLimits) -> Result<(), RuntimeError> {
        let current = self.limits(id).await?;
        for request in plan_limit_updates(&current, limits) {
            self.update_limits(id, &request).await?;
        }
        let actual = self.limits(id).await?;
        if actual.equivalent(limits) {
            Ok(())
        } else {
            Err(RuntimeError::LimitsNotApplied {
                id: id.to_string(),
                wanted: limits.to_string(),
                actual: actual.to_string(),
            })
        }
    }

    async fn network_endpoint(
        &self,
        id: &str,
        network: &str,
    ) -> Result<Option<EndpointSnapshot>, RuntimeError> {
        let networks = self
            .inspect(id)
            .await?
            .network_settings
            .and_then(|settings| settings.networks)
            .unwrap_or_default();
        Ok(find_endpoint(networks, network))
    }

    async fn disconnect(&self, id: &str, network: &str, force: bool) -> Result<(), RuntimeError> {
        if self.network_endpoint(id, network).await?.is_none() {
            return Ok(());
        }
        let request = NetworkDisconnectRequest {
            container: id.to_string(),
            force: Some(force),
        };
        let Err(err) = self.docker.disconnect_network(network, request).await else {
            return Ok(());
        };
        match self
            .network_error("network disconnect", id, network, err)
            .await
        {
            // Removed meanwhile, with every endpoint on it: nothing left to detach from.
            RuntimeError::NoSuchNetwork { .. } => Ok(()),
            // A concurrent disconnect did the job.
            refusal @ RuntimeError::Engine { .. } => {
                if self.network_endpoint(id, network).await?.is_none() {
                    Ok(())
                } else {
                    Err(refusal)
                }
            }
            other => Err(other),
        }
    }

    async fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &EndpointSnapshot,
    ) -> Result<(), RuntimeError> {
        if self.network_endpoint(id, network).await?.is_some() {
            return Ok(());
        }
        let pinned = endpoint.wanted_ipv4().is_some() || endpoint.wanted_ipv6().is_some();
        let first = self
            .docker
            .connect_network(network, connect_request(id, endpoint, true))
            .await;
        let Err(err) = first else {
            return Ok(());
        };
        let refusal = self
            .network_error("network connect", id, network, err)
            .await;
        if !matches!(refusal, RuntimeError::Engine { .. }) {
            return Err(refusal);
        }
        // Attached by someone else meanwhile: done.
        if self.network_endpoint(id, network).await?.is_some() {
            return Ok(());
        }
        if !pinned {
            return Err(refusal);
        }
        // The address cannot be had (Docker's default networks and networks without a
        // user-configured subnet take no `--ip`; the address may be taken): attached with
        // another address beats left detached.
        tracing::warn!(
            container = id,
            network,
            %refusal,
            "reconnecting without the previous address"
        );
        let Err(err) = self
            .docker
            .connect_network(network, connect_request(id, endpoint, false))
            .await
        else {
            return Ok(());
        };
        let refusal = self
            .network_error("network connect", id, network, err)
            .await;
        if self.network_endpoint(id, network).await?.is_some() {
            Ok(())
        } else {
            Err(refusal)
        }
    }
}

/// The `docker update` requests (0 = leave unchanged) taking a container from `current` to
/// limits equivalent to `target`, in order. Engine rules this follows (Docker 20.10, cgroup v1,
/// all checked against a real engine):
///
/// * A 0 field in a request means "unchanged", so nothing can be set back to 0: no memory
///   limit is spelled [`MEMORY_UNLIMITED`] (the engine refuses -1: "Minimum memory limit
///   allowed is 6MB"), no CPU quota `-1`, the default period 100 ms.
/// * `nano_cpus` can never be cleared (0 is "unchanged", negative values are refused); a
///   `cpu_quota` of -1 overrides it, for the live cgroup and on restart alike. While it is set,
///   positive quotas and periods are refused.
/// * A memory change without a swap value is refused unless below the stored swap limit
///   (which is 0 for a container created without limits), so memory and swap always travel
///   together; the runtime orders the two cgroup writes.
/// * `memory_swap = -1` is stored but not applied to a running container's cgroup, so
///   unlimited swap is applied as [`MEMORY_UNLIMITED`] first, then stored as -1.
/// * When `nano_cpus` and `cpu_quota` change in one request the live cgroup follows
///   `nano_cpus`, so a -1 quota is sent on its own afterwards.
pub(crate) fn plan_limit_updates(
    current: &ContainerLimits,
    target: &ContainerLimits,
) -> Vec<ContainerLimits> {
    let mut main = ContainerLimits::default();
    let mut then = ContainerLimits::default();

    if target.nano_cpus > 0 && target.nano_cpus != current.nano_cpus {
        main.nano_cpus = target.nano_cpus;
    }
    let wanted_quota = if target.cpu_quota != 0 {
        target.cpu_quota
    } else if current.cpu_quota != 0 || (target.nano_cpus == 0 && current.nano_cpus > 0) {
        -1
    } else {
        0
    };
    if wanted_quota < 0 && main.nano_cpus != 0 {
        then.cpu_quota = wanted_quota;
    } else if wanted_quota != 0 && wanted_quota != current.cpu_quota {
        main.cpu_quota = wanted_quota;
    }
    if target.cpu_period > 0 && target.cpu_period != current.cpu_period {
        main.cpu_period = target.cpu_period;
    } else if target.cpu_period == 0 && !matches!(current.cpu_period, 0 | DEFAULT_CPU_PERIOD) {
        main.cpu_period = DEFAULT_CPU_PERIOD;
    }

    let wanted_memory = if target.memory != 0 {
        target.memory
    } else if current.memory != 0 && current.effective_memory().is_some() {
        MEMORY_UNLIMITED
    } else {
        current.memory
    };
    let memory_changes = wanted_memory != current.memory;
    // Unlimited swap spelled differently (0, the kernel maximum) is no change, but -1 is
    // restored as -1 exactly.
    let swap_changes = target.memory_swap != current.memory_swap
        && (target.memory_swap == -1
            || target.effective_memory_swap() != current.effective_memory_swap());
    if memory_changes || swap_changes {
        main.memory = wanted_memory;
        main.memory_swap = match target.memory_swap {
            swap if swap > 0 => swap,
            0 => MEMORY_UNLIMITED,
            _ => {
                then.memory_swap = -1;
                MEMORY_UNLIMITED
            }
        };
    }

    [main, then]
        .into_iter()
        .filter(|request| *request != ContainerLimits::default())
        .collect()
}

/// The endpoint on `network`, found by network name, id, or id prefix of 12+ characters.
fn find_endpoint(
    networks: HashMap<String, EndpointSettings>,
    network: &str,
) -> Option<EndpointSnapshot> {
    let by_id = |settings: &EndpointSettings| {
        settings
            .network_id
            .as_deref()
            .is_some_and(|id| id == network || (network.len() >= 12 && id.starts_with(network)))
    };
    let (name, settings) = match networks.get_key_value(network) {
        Some((name, settings)) => (name.clone(), settings.clone()),
        None => networks.into_iter().find(|(_, settings)| by_id(settings))?,
    };
    Some(snapshot(name, settings))
}

/// An [`EndpointSnapshot`] from the engine's endpoint settings; empty strings are absent.
fn snapshot(network: String, settings: EndpointSettings) -> EndpointSnapshot {
    let present = |value: Option<String>| value.filter(|text| !text.is_empty());
    let ipam = settings.ipam_config.unwrap_or_default();
    EndpointSnapshot {
        network,
        network_id: settings.network_id.unwrap_or_default(),
        aliases: settings.aliases.unwrap_or_default(),
        ipv4_address: present(settings.ip_address),
        ipv6_address: present(settings.global_ipv6_address),
        static_ipv4: present(ipam.ipv4_address),
        static_ipv6: present(ipam.ipv6_address),
        links: settings.links.unwrap_or_default(),
    }
}

/// The connect request reattaching `id` as `endpoint` describes, with or without its address.
fn connect_request(
    id: &str,
    endpoint: &EndpointSnapshot,
    with_address: bool,
) -> NetworkConnectRequest {
    let nonempty = |list: &Vec<String>| (!list.is_empty()).then(|| list.clone());
    let ipam_config = with_address
        .then(|| EndpointIpamConfig {
            ipv4_address: endpoint.wanted_ipv4().map(str::to_string),
            ipv6_address: endpoint.wanted_ipv6().map(str::to_string),
            ..Default::default()
        })
        .filter(|config| config.ipv4_address.is_some() || config.ipv6_address.is_some());
    NetworkConnectRequest {
        container: id.to_string(),
        endpoint_config: Some(EndpointSettings {
            ipam_config,
            // Docker refuses aliases on its default networks, where there are none to restore.
            aliases: nonempty(&endpoint.aliases),
            links: nonempty(&endpoint.links),
            ..Default::default()
        }),
    }
}

/// The container's real name (not a legacy `/other/alias` link name) if `regex` matches it.
fn matching_name(summary: &ContainerSummary, regex: &Regex) -> Option<String> {
    summary
        .names
        .iter()
        .flatten()
        .map(|candidate| candidate.trim_start_matches('/'))
        .filter(|candidate| !candidate.contains('/'))
        .find(|candidate| regex.is_match(candidate))
        .map(str::to_string)
}

/// Whether Docker could have given a container this name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
fn is_valid_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether one of the container's names is exactly `name` (names come with a leading slash).
fn has_exact_name(summary: &ContainerSummary, name: &str) -> bool {
    summary
        .names
        .iter()
        .flatten()
        .any(|candidate| candidate.trim_start_matches('/') == name)
}

/// Builds a [`ContainerRef`]; `name` overrides the displayed name (the one that matched).
fn container_ref(summary: &ContainerSummary, name: Option<&str>) -> Option<ContainerRef> {
    let id = summary.id.clone()?;
    let name = match name {
        Some(name) => name.to_string(),
        // Legacy link aliases look like `/other/alias`; the real name has a single slash.
        None => summary
            .names
            .iter()
            .flatten()
            .map(|candidate| candidate.trim_start_matches('/'))
            .find(|candidate| !candidate.contains('/'))
            .unwrap_or_default()
            .to_string(),
    };
    Some(ContainerRef { id, name })
}

/// Exactly one match or a precise error.
fn exactly_one(
    selector: &TargetSelector,
    mut matches: Vec<ContainerRef>,
) -> Result<ContainerRef, RuntimeError> {
    match matches.len() {
        0 => Err(RuntimeError::NotFound {
            selector: selector.to_string(),
        }),
        1 => Ok(matches.remove(0)),
        count => {
            let mut names: Vec<&str> = matches.iter().map(|found| found.name.as_str()).collect();
            names.sort_unstable();
            Err(RuntimeError::Ambiguous {
                selector: selector.to_string(),
                count,
                names: names.join(", "),
            })
        }
    }
}

/// Maps a bollard error to the runtime's vocabulary: 404 is [`RuntimeError::Gone`], other engine
/// answers are [`RuntimeError::Engine`], failures to talk to the engine are
/// [`RuntimeError::Unreachable`].
fn map_error(operation: &'static str, target: &str, err: BollardError) -> RuntimeError {
    match err {
        BollardError::DockerResponseServerError {
            status_code: NOT_FOUND,
            ..
        } => RuntimeError::Gone {
            id: target.to_string(),
        },
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Engine {
            operation,
            target: target.to_string(),
            message: format!("engine answered {status_code}: {message}"),
        },
        BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HyperLegacyError { .. }
        | BollardError::SocketNotFoundError(_)
        | BollardError::RequestTimeoutError => {
            RuntimeError::Unreachable(format!("{operation} on {target}: {}", error_chain(&err)))
        }
        other => RuntimeError::Engine {
            operation,
            target: target.to_string(),
            message: error_chain(&other),
        },
    }
}

/// An error with its sources, since hyper's top-level messages ("client error (Connect)") hide
/// the useful part (e.g. "No such file or directory").
fn error_chain(err: &BollardError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str, names: &[&str]) -> ContainerSummary {
        ContainerSummary {
            id: Some(id.to_string()),
            names: Some(names.iter().map(|name| name.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn exact_name_matching_ignores_substring_matches() {
        assert!(has_exact_name(&summary("a", &["/db"]), "db"));
        assert!(!has_exact_name(&summary("b", &["/db-backup"]), "db"));
        assert!(!has_exact_name(&summary("c", &["/olddb"]), "db"));
        assert!(!has_exact_name(&summary("d", &["/web/db"]), "db"));
    }

    #[test]
    fn names_docker_cannot_produce_are_rejected_before_reaching_its_regex_filter() {
        assert!(is_valid_container_name("x-db_1.2"));
        assert!(!is_valid_container_name(""));
        assert!(!is_valid_container_name("-db"));
        assert!(!is_valid_container_name("db.*"));
        assert!(!is_valid_container_name("a/b"));
    }

    #[test]
    fn label_matches_are_named_by_their_real_name_not_a_link_alias() {
        let found = container_ref(&summary("abc", &["/web/db", "/db"]), None).unwrap();
        assert_eq!(
            found,
            ContainerRef {
                id: "abc".into(),
                name: "db".into()
            }
        );
    }

    #[test]
    fn zero_one_or_many_matches() {
        let selector = TargetSelector::Label("app=db".into());
        let one = |id: &str, name: &str| ContainerRef {
            id: id.into(),
            name: name.into(),
        };
        assert!(matches!(
            exactly_one(&selector, vec![]),
            Err(RuntimeError::NotFound { .. })
        ));
        assert_eq!(
            exactly_one(&selector, vec![one("1", "a")]).unwrap(),
            one("1", "a")
        );
        let err = exactly_one(&selector, vec![one("1", "b"), one("2", "a")]).unwrap_err();
        match err {
            RuntimeError::Ambiguous { count, names, .. } => {
                assert_eq!(count, 2);
                assert_eq!(names, "a, b");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

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
    fn limit_plans_restore_unset_fields_through_their_equivalents() {
        let none = ContainerLimits::default();
        let faulted = none.with_cpu_millis(250).with_memory_bytes(64 * MIB as u64);
        // Applying: one request, memory and swap together.
        assert_eq!(
            plan_limit_updates(&none, &faulted),
            [limits(0, 25_000, 100_000, 64 * MIB, 64 * MIB)]
        );
        // Reverting: nothing can go back to 0; -1 quota, the kernel's maximum memory.
        assert_eq!(
            plan_limit_updates(&faulted, &none),
            [limits(0, -1, 0, MEMORY_UNLIMITED, MEMORY_UNLIMITED)]
        );
        // Reverting again (the engine now stores the equivalents) is a no-op.
        let reverted = limits(0, -1, 100_000, MEMORY_UNLIMITED, MEMORY_UNLIMITED);
        assert!(reverted.equivalent(&none));
        assert!(plan_limit_updates(&reverted, &none).is_empty());
        assert!(plan_limit_updates(&faulted, &faulted).is_empty());
    }

    #[test]
    fn limit_plans_restore_nano_cpus_and_unlimited_swap_exactly() {
        let original = limits(500_000_000, 0, 0, 32 * MIB, -1);
        let faulted = original
            .with_cpu_millis(100)
            .with_memory_bytes(16 * MIB as u64);
        assert_eq!(faulted, limits(100_000_000, 0, 0, 16 * MIB, 16 * MIB));
        assert_eq!(
            plan_limit_updates(&original, &faulted),
            [limits(100_000_000, 0, 0, 16 * MIB, 16 * MIB)]
        );
        // -1 swap is not applied live: the kernel maximum first, then -1 to store.
        assert_eq!(
            plan_limit_updates(&faulted, &original),
            [
                limits(500_000_000, 0, 0, 32 * MIB, MEMORY_UNLIMITED),
                limits(0, 0, 0, 0, -1)
            ]
        );
    }

    #[test]
    fn limit_plans_clear_nano_cpus_with_a_negative_quota_sent_last() {
        // nano_cpus cannot be cleared: a -1 quota overrides it.
        let nano = limits(500_000_000, 0, 0, 0, 0);
        assert_eq!(
            plan_limit_updates(&nano, &ContainerLimits::default()),
            [limits(0, -1, 0, 0, 0)]
        );
        // After such a revert, a later CPU fault changes nano_cpus; its revert must send the
        // -1 quota again, after nano_cpus, or the live cgroup would follow nano_cpus.
        let after = limits(500_000_000, -1, 0, 0, 0);
        let faulted = after.with_cpu_millis(200);
        assert_eq!(faulted, limits(200_000_000, -1, 0, 0, 0));
        assert_eq!(
            plan_limit_updates(&faulted, &after),
            [limits(500_000_000, 0, 0, 0, 0), limits(0, -1, 0, 0, 0)]
        );
    }

    #[test]
    fn limit_plans_raise_memory_above_the_old_swap_in_one_request() {
        let original = limits(0, 0, 0, 32 * MIB, 64 * MIB);
        let raised = original.with_memory_bytes(128 * MIB as u64);
        assert_eq!(
            plan_limit_updates(&original, &raised),
            [limits(0, 0, 0, 128 * MIB, 128 * MIB)]
        );
        assert_eq!(
            plan_limit_updates(&raised, &original),
            [limits(0, 0, 0, 32 * MIB, 64 * MIB)]
        );
        // A non-default period goes back to the kernel default when the target has none.
        assert_eq!(
            plan_limit_updates(&limits(0, 1000, 50_000, 0, 0), &ContainerLimits::default()),
            [limits(0, -1, 100_000, 0, 0)]
        );
    }

    #[test]
    fn endpoints_are_found_by_name_or_id_and_reconnect_with_their_address() {
        let settings = EndpointSettings {
            network_id: Some("f00dfeedbeef0123456789".into()),
            aliases: Some(vec!["web".into(), "0123456789ab".into()]),
            ip_address: Some("10.254.1.5".into()),
            global_ipv6_address: Some(String::new()),
            ipam_config: Some(EndpointIpamConfig {
                ipv4_address: Some("10.254.1.5".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let networks = HashMap::from([("appnet".to_string(), settings)]);
        let by_name = find_endpoint(networks.clone(), "appnet").unwrap();
        assert_eq!(by_name.network, "appnet");
        assert_eq!(by_name.ipv4_address.as_deref(), Some("10.254.1.5"));
        assert_eq!(by_name.static_ipv4.as_deref(), Some("10.254.1.5"));
        assert_eq!(by_name.ipv6_address, None, "empty strings are absent");
        assert_eq!(
            find_endpoint(networks.clone(), "f00dfeedbeef").unwrap(),
            by_name
        );
        assert!(find_endpoint(networks.clone(), "f00d").is_none());
        assert!(find_endpoint(networks, "other").is_none());

        let request = connect_request("abc", &by_name, true);
        let config = request.endpoint_config.unwrap();
        assert_eq!(
            config.ipam_config.unwrap().ipv4_address.as_deref(),
            Some("10.254.1.5")
        );
        assert_eq!(config.aliases.unwrap(), ["web", "0123456789ab"]);
        assert_eq!(config.links, None);
        let request = connect_request("abc", &by_name, false);
        assert_eq!(request.endpoint_config.unwrap().ipam_config, None);
        // Default networks: no aliases to send (Docker would refuse them).
        let bridge = EndpointSnapshot {
            network: "bridge".into(),
            ipv4_address: Some("172.17.0.3".into()),
            ..Default::default()
        };
        assert_eq!(
            connect_request("abc", &bridge, true)
                .endpoint_config
                .unwrap()
                .aliases,
            None
        );
    }

    #[test]
    fn regexes_match_real_names_not_link_aliases() {
        let regex = Regex::new("^db").unwrap();
        assert_eq!(
            matching_name(&summary("a", &["/web/dbalias", "/db-1"]), &regex).as_deref(),
            Some("db-1")
        );
        assert_eq!(matching_name(&summary("b", &["/web/db"]), &regex), None);
    }

    #[test]
    fn engine_status_codes_map_to_runtime_errors() {
        let server = |status_code, message: &str| BollardError::DockerResponseServerError {
            status_code,
            message: message.to_string(),
        };
        assert!(matches!(
            map_error("pause", "abc", server(404, "No such container: abc")),
            RuntimeError::Gone { id } if id == "abc"
        ));
        let err = map_error("kill", "abc", server(409, "Container abc is not running"));
        assert!(
            err.to_string().contains("docker kill on abc failed"),
            "{err}"
        );
        assert!(err.to_string().contains("409"), "{err}");
        assert!(matches!(
            map_error("stop", "abc", BollardError::RequestTimeoutError),
            RuntimeError::Unreachable(_)
        ));
    }
}
