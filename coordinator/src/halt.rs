//! Halt-all: stop every run, revert every fault on every agent now, and block new runs until
//! the halt is released. The latency from request to the last agent's revert ack is measured.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use faultline_proto::v1 as pb;

use crate::clock::now_ms;
use crate::hub::HubHandle;
use crate::runner::RunEvents;
use crate::store::{HaltRecord, RunEventRecord, Store, StoreError};

/// How long a halt waits for agents to confirm their reverts.
const HALT_ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// What a halt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaltOutcome {
    pub faults_reverted: u32,
    pub runs_aborted: Vec<String>,
    pub latency: Duration,
    /// Faults whose revert was not confirmed, with why (their leases still revert them).
    pub unconfirmed: Vec<String>,
}

/// Engages the halt switch and reverts everything.
pub async fn halt_all(
    hub: &HubHandle,
    store: &Store,
    events: &RunEvents,
    reason: &str,
) -> Result<HaltOutcome, StoreError> {
    let started = Instant::now();
    // The switch goes first, so no run can start while we revert.
    store
        .set_halt(HaltRecord {
            halted: true,
            reason: reason.into(),
            since_ms: now_ms(),
        })
        .await?;
    let runs_aborted = hub.cancel_runs(&format!("halted: {reason}")).await;
    let RunRevert {
        faults_reverted,
        unconfirmed,
    } = revert_tracked(hub, None, "halt").await;
    let latency = started.elapsed();
    crate::metrics::REGISTRY.observe(
        "faultline_halt_duration_seconds",
        &[],
        latency.as_secs_f64(),
    );
    for run_id in &runs_aborted {
        let message = format!(
            "halt-all ({reason}): {faults_reverted} fault(s) reverted in {} ms{}",
            latency.as_millis(),
            if unconfirmed.is_empty() {
                String::new()
            } else {
                format!("; unconfirmed: {}", unconfirmed.join("; "))
            }
        );
        let record = RunEventRecord {
            at_ms: now_ms(),
            kind: "halt".into(),
            message,
            ..Default::default()
        };
        events.emit(run_id, record, None).await?;
    }
    Ok(HaltOutcome {
        faults_reverted,
        runs_aborted,
        latency,
        unconfirmed,
    })
}

/// What [`revert_run`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRevert {
    pub faults_reverted: u32,
    /// Faults whose revert was not confirmed, with why (their leases still revert them).
    pub unconfirmed: Vec<String>,
}

/// Reverts every fault the hub tracks for `run_id` (as a halt does for all runs, without the
/// halt switch) and waits for the agents' acks.
pub async fn revert_run(hub: &HubHandle, run_id: &str, reason: &str) -> RunRevert {
    revert_tracked(hub, Some(run_id), reason).await
}

/// Sends a revert for every tracked fault (of `run_id`, or of every run) and waits, bounded,
/// for the agents' acks. The one mechanism behind halt-all and a run's stop condition.
async fn revert_tracked(hub: &HubHandle, run_id: Option<&str>, reason: &str) -> RunRevert {
    // Subscribed before sending, so no ack can be missed.
    let mut reports = hub.subscribe_reports();
    let mut waiting: BTreeSet<(String, String)> = BTreeSet::new();
    let mut outcome = RunRevert::default();
    for fault in hub.tracked_faults().await {
        if run_id.is_some_and(|run| run != fault.run_id) {
            continue;
        }
        let revert = pb::RevertFault {
            fault_id: fault.fault_id.clone(),
            reason: reason.into(),
        };
        match hub
            .send(
                &fault.agent,
                &fault.run_id,
                pb::command::Action::Revert(revert),
            )
            .await
        {
            Ok(_) => {
                waiting.insert((fault.agent, fault.fault_id));
            }
            Err(err) => outcome.unconfirmed.push(format!(
                "{} on {}: {err}; its lease ({} ms) reverts it",
                fault.fault_id, fault.agent, fault.lease_ms
            )),
        }
    }
    let deadline = tokio::time::Instant::now() + HALT_ACK_TIMEOUT;
    while !waiting.is_empty() {
        tokio::select! {
            received = reports.recv() => match received {
                Ok(report) => {
                    let kind = pb::ReportKind::try_from(report.report.kind).unwrap_or_default();
                    let key = (report.agent.clone(), report.report.fault_id.clone());
                    if matches!(kind, pb::ReportKind::Reverted | pb::ReportKind::RevertFailed)
                        && waiting.remove(&key)
                    {
                        if kind == pb::ReportKind::Reverted {
                            outcome.faults_reverted += 1;
                        } else {
                            outcome.unconfirmed.push(format!("{} on {}: revert failed: {}",
                                key.1, key.0, report.report.detail));
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    for (agent, fault_id) in waiting {
        outcome.unconfirmed.push(format!(
            "{fault_id} on {agent}: no revert ack; its lease reverts it"
        ));
    }
    outcome
}

/// Lifts the halt switch.
pub async fn release(store: &Store) -> Result<(), StoreError> {
    store
        .set_halt(HaltRecord {
            halted: false,
            reason: String::new(),
            since_ms: now_ms(),
        })
        .await
}
