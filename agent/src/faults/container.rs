//! Container faults through the container runtime: pause, stop, kill, restart. Each has an
//! undo recorded before it acts and a verification that reads the container's state back.

use std::time::Duration;

use faultline_domain::fault::FaultKind;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::runtime::{
    ContainerLimits, ContainerRef, ContainerRuntime, ContainerState, EndpointSnapshot, RuntimeError,
};

/// How long `container-kill` waits for the container to stop before saying it did not.
const KILL_SETTLE: Duration = Duration::from_secs(3);

/// How to undo a container fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ContainerUndo {
    Unpause {
        id: String,
    },
    /// Start the container (idempotent: starting a running container is fine).
    Start {
        id: String,
    },
    /// Put the CPU/memory limits back as they were (compared by effect, see
    /// [`ContainerLimits::equivalent`]).
    RestoreLimits {
        id: String,
        previous: ContainerLimits,
    },
    /// Reattach to the network with the same address and aliases.
    Reconnect {
        id: String,
        endpoint: EndpointSnapshot,
    },
    /// Nothing to do, and why.
    Nothing {
        why: String,
    },
}

/// What a container fault will do and how it is undone. Reads only.
pub async fn prepare<R: ContainerRuntime>(
    runtime: &R,
    kind: &FaultKind,
    container: &ContainerRef,
) -> Result<(ContainerUndo, String), String> {
    let id = container.id.clone();
    let (undo, mechanism) = match kind {
        FaultKind::ContainerPause => (ContainerUndo::Unpause { id }, "docker pause".to_string()),
        FaultKind::ContainerStop { .. } => (ContainerUndo::Start { id }, "docker stop".into()),
        FaultKind::ContainerKill {
            restart_on_revert: true,
            ..
        } => (ContainerUndo::Start { id }, "docker kill".into()),
        FaultKind::ContainerKill {
            restart_on_revert: false,
            ..
        } => (
            ContainerUndo::Nothing {
                why: "plan asked not to restart".into(),
            },
            "docker kill".into(),
        ),
        FaultKind::ContainerRestart { .. } => {
            (ContainerUndo::Start { id }, "docker restart".into())
        }
        FaultKind::ContainerLimit { .. } => {
            let previous = runtime.limits(&id).await.map_err(|e| e.to_string())?;
            let wanted = limits_for(kind, &previous);
            let mechanism = format!("docker update: {previous} -> {wanted}");
            (ContainerUndo::RestoreLimits { id, previous }, mechanism)
        }
        FaultKind::NetworkDisconnect { network } => {
            let endpoint = runtime
                .network_endpoint(&id, network)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{container} is not attached to network {network}"))?;
            (
                ContainerUndo::Reconnect { id, endpoint },
                format!("docker network disconnect {network}"),
            )
        }
        other => return Err(format!("{} is not a container fault", other.name())),
    };
    Ok((undo, mechanism))
}

/// The limits a `container-limit` fault sets, starting from the current ones.
fn limits_for(kind: &FaultKind, current: &ContainerLimits) -> ContainerLimits {
    let mut wanted = *current;
    if let FaultKind::ContainerLimit {
        millicpus,
        memory_bytes,
    } = kind
    {
        if let Some(millicpus) = millicpus {
            wanted = wanted.with_cpu_millis(*millicpus);
        }
        if let Some(bytes) = memory_bytes {
            wanted = wanted.with_memory_bytes(*bytes);
        }
    }
    wanted
}

/// Checks the container can take the fault: every container fault needs it running.
pub async fn precheck<R: ContainerRuntime>(
    runtime: &R,
    container: &ContainerRef,
) -> Result<(), String> {
    let state = runtime
        .state(&container.id)
        .await
        .map_err(|e| e.to_string())?;
    if state != ContainerState::Running {
        return Err(format!("{container} is {state:?}, not running"));
    }
    Ok(())
}

pub async fn apply<R: ContainerRuntime>(
    runtime: &R,
    kind: &FaultKind,
    container: &ContainerRef,
) -> Result<(), String> {
    let id = container.id.as_str();
    let result = match kind {
        FaultKind::ContainerPause => runtime.pause(id).await,
        FaultKind::ContainerStop { grace_seconds } => runtime.stop(id, *grace_seconds).await,
        FaultKind::ContainerKill { signal, .. } => runtime.kill(id, *signal).await,
        FaultKind::ContainerRestart { grace_seconds } => runtime.restart(id, *grace_seconds).await,
        FaultKind::ContainerLimit { .. } => {
            let current = runtime.limits(id).await.map_err(|e| e.to_string())?;
            runtime.set_limits(id, &limits_for(kind, &current)).await
        }
        FaultKind::NetworkDisconnect { network } => runtime.disconnect(id, network, true).await,
        other => return Err(format!("{} is not a container fault", other.name())),
    };
    result.map_err(|e| format!("{} failed: {e}", kind.name()))
}

/// Reads the container's state back to see whether the fault took effect.
pub async fn verify<R: ContainerRuntime>(
    runtime: &R,
    kind: &FaultKind,
    container: &ContainerRef,
) -> Result<String, String> {
    let id = container.id.as_str();
    let state = |s: Result<ContainerState, RuntimeError>| s.map_err(|e| e.to_string());
    match kind {
        FaultKind::ContainerPause => match state(runtime.state(id).await)? {
            ContainerState::Paused => Ok("verified: container is paused".into()),
            other => Err(format!("container is {other:?} after pause")),
        },
        FaultKind::ContainerStop { .. } => match state(runtime.state(id).await)? {
            ContainerState::Stopped => Ok("verified: container is stopped".into()),
            other => Err(format!("container is {other:?} after stop")),
        },
        FaultKind::ContainerLimit { .. } => {
            let limits = runtime.limits(id).await.map_err(|e| e.to_string())?;
            Ok(format!("verified: limits now {limits}"))
        }
        FaultKind::NetworkDisconnect { network } => {
            match runtime
                .network_endpoint(id, network)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(format!("verified: no longer attached to {network}")),
                Some(_) => Err(format!("still attached to {network}")),
            }
        }
        FaultKind::ContainerRestart { .. } => match state(runtime.state(id).await)? {
            ContainerState::Running => Ok("verified: container was stopped and is running".into()),
            other => Err(format!("container is {other:?} after restart")),
        },
        FaultKind::ContainerKill { signal, .. } => {
            let deadline = Instant::now() + KILL_SETTLE;
            loop {
                let now = state(runtime.state(id).await)?;
                if now == ContainerState::Stopped {
                    return Ok(format!("verified: {signal} delivered, container exited"));
                }
                if Instant::now() >= deadline {
                    // The signal was delivered: the fault happened, it just did not kill.
                    return Ok(format!(
                        "{signal} delivered but the container is still {now:?} after {}s \
                         (its process handles or ignores the signal)",
                        KILL_SETTLE.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        other => Err(format!("{} is not a container fault", other.name())),
    }
}

/// Undoes a container fault. Safe to repeat; a container that no longer exists has nothing
/// left to undo.
pub async fn undo<R: ContainerRuntime>(
    runtime: &R,
    undo: &ContainerUndo,
) -> Result<String, String> {
    let result = match undo {
        ContainerUndo::Unpause { id } => runtime.unpause(id).await.map(|()| "container unpaused"),
        ContainerUndo::Start { id } => runtime.start(id).await.map(|()| "container running"),
        ContainerUndo::RestoreLimits { id, previous } => runtime
            .set_limits(id, previous)
            .await
            .map(|()| "limits restored"),
        ContainerUndo::Reconnect { id, endpoint } => runtime
            .connect(id, &endpoint.network, endpoint)
            .await
            .map(|()| "reattached to its network"),
        ContainerUndo::Nothing { why } => return Ok(format!("nothing to undo ({why})")),
    };
    match result {
        Ok(done) => Ok(done.to_string()),
        Err(RuntimeError::Gone { .. }) => Ok("container no longer exists; nothing to undo".into()),
        Err(err) => Err(err.to_string()),
    }
}
