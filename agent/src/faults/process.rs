//! Process faults: SIGSTOP/SIGCONT of exact process identities, and kill storms that follow a
//! restarted process to its new pid. Identities are pid + start time: a recycled pid is never
//! signalled.

use std::sync::Arc;
use std::time::Duration;

use faultline_domain::fault::{FaultKind, TargetSelector};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::process::{self as procs, ProcessId, ProcessUndo, StormEvent, StormSpec};
use crate::runtime::{ContainerRef, ContainerRuntime};

/// How long a kill storm may take to report its first round before the fault counts as not
/// taking effect.
const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the target processes are found, each time they are looked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessScope {
    /// Processes of a container (its main process, or those with `name`).
    Container {
        container: ContainerRef,
        name: Option<String>,
    },
    /// A host process by selector (a restarted process is found again by name).
    Host { selector: TargetSelector },
}

/// Resolves the scope to process identities now.
pub async fn find<R: ContainerRuntime>(
    runtime: &R,
    scope: &ProcessScope,
) -> Result<Vec<ProcessId>, String> {
    match scope {
        ProcessScope::Container { container, name } => {
            let pid = runtime
                .main_pid(&container.id)
                .await
                .map_err(|e| e.to_string())?;
            procs::in_container(pid, name.as_deref()).map_err(|e| e.to_string())
        }
        ProcessScope::Host { selector } => procs::resolve_host(selector)
            .map(|p| vec![p])
            .map_err(|e| e.to_string()),
    }
}

/// SIGSTOPs the targets (their identities are already journaled in the undo).
pub fn stop(undo: &ProcessUndo) -> Result<String, String> {
    procs::stop(&undo.stopped).map_err(|e| e.to_string())?;
    let verification = procs::verify_stopped(&undo.stopped);
    if verification.effective {
        Ok(format!("verified: {}", verification.detail))
    } else {
        Err(verification.detail)
    }
}

/// Starts a kill storm and waits for its first round: that round is the verification.
pub async fn start_storm<R: ContainerRuntime>(
    runtime: Arc<R>,
    kind: &FaultKind,
    scope: ProcessScope,
    tag: &str,
) -> Result<String, String> {
    let FaultKind::ProcessKill {
        signal,
        count,
        interval_ms,
        ..
    } = kind
    else {
        return Err(format!("{} is not a kill storm", kind.name()));
    };
    let spec = StormSpec {
        tag: tag.to_string(),
        signal: *signal,
        count: *count,
        interval: Duration::from_millis(*interval_ms),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let storm_tag = tag.to_string();
    let resolve_again = move || {
        let runtime = Arc::clone(&runtime);
        let scope = scope.clone();
        async move {
            find(&*runtime, &scope)
                .await
                .map_err(procs::ProcessError::Target)
        }
    };
    let on_event = move |event: StormEvent| {
        match &event {
            StormEvent::Killed { round, target } => {
                tracing::info!(tag = %storm_tag, round, %target, "kill storm hit a process")
            }
            StormEvent::Missed { round, reason } => {
                tracing::warn!(tag = %storm_tag, round, "kill storm round missed: {reason}")
            }
            StormEvent::Finished(summary) => {
                tracing::info!(tag = %storm_tag, ?summary, "kill storm finished")
            }
        }
        let _ = events_tx.send(event);
    };
    let storm =
        procs::spawn_kill_storm(spec, resolve_again, on_event).map_err(|e| e.to_string())?;
    procs::storms().insert(storm);
    let mut hits = Vec::new();
    let deadline = tokio::time::Instant::now() + FIRST_ROUND_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(StormEvent::Killed { round: 1, target })) => hits.push(target.to_string()),
            Ok(Some(StormEvent::Missed { round: 1, reason })) => {
                procs::storms().remove(tag);
                return Err(format!("first round hit nothing: {reason}"));
            }
            Ok(Some(_)) | Ok(None) => break,
            Err(_) if !hits.is_empty() => break,
            Err(_) => {
                procs::storms().remove(tag);
                return Err("the first round did not report in time".into());
            }
        }
        // All targets of round 1 are reported before round 2 starts; a short pause collects
        // them without waiting for the next interval.
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(50), events.recv()).await
        {
            match event {
                StormEvent::Killed { round: 1, target } => hits.push(target.to_string()),
                _ => break,
            }
        } else {
            break;
        }
    }
    // The storm can end (cancelled, or finished) before its first round reported a hit:
    // nothing was delivered then, and saying "verified" would be a lie.
    if hits.is_empty() {
        procs::storms().remove(tag);
        return Err("the kill storm ended before its first round hit any process".into());
    }
    Ok(format!(
        "verified: {signal} delivered to {} (round 1 of {count})",
        hits.join(", ")
    ))
}

/// Cancels a storm and SIGCONTs stopped identities that are still alive. Idempotent.
pub fn undo(undo: &ProcessUndo) -> Result<String, String> {
    procs::undo(undo).map_err(|e| e.to_string())
}
