//! Telemetry: kernel evidence of what a run's faults do to its targets, streamed to the
//! coordinator while the run lasts.
//!
//! The coordinator asks with a signed `TelemetrySubscribe` command naming the run's targets on
//! this host. From then on:
//!
//! - [`resolve`] turns each target into a process (a container's main process, or the process
//!   itself) or a cgroup path, and re-resolves them every few seconds (a restarted container
//!   has a new main process and fresh cgroup directories);
//! - the collector ([`collector`]), a thread of its own that owns [`faultline_bpf::Telemetry`]
//!   (it is `Send`, not `Sync`), scopes the programs to the targets' cgroups, polls the ring
//!   buffers and, every interval (1 s by default), turns the change of the kernel aggregates
//!   into one `TelemetryBatch` per run: TCP outcomes per peer, run-queue latency histograms and
//!   context switches, block IO, process exits by code or signal, OOM kills, and the
//!   discrete events, each attributed to its target by cgroup id;
//! - the uplink ([`uplink`]) sends the batches on the `AgentTelemetry.Stream` RPC, on the
//!   agent's own mTLS channel, and reads one acknowledgement per batch.
//!
//! Where a program group cannot load (no BTF, no privileges, verifier refusal), or when
//! `FAULTLINE_TELEMETRY=fallback`, its figures come from `/proc/<pid>/net/snmp` of the
//! target's network namespace and the target's cgroup files (`cpu.stat`, OOM-kill counts),
//! and every batch says so in its sources. `FAULTLINE_TELEMETRY=off` disables telemetry.
//!
//! Nothing is unbounded and nothing is lost silently: the collector hands batches to the
//! uplink through a bounded queue (a full queue drops the batch), the uplink keeps a bounded
//! backlog while the coordinator is unreachable (dropping the oldest), a batch carries at most
//! [`MAX_EVENTS_PER_BATCH`] events, and every drop — kernel ring buffer, kernel map, events,
//! whole batches — is counted in every batch, cumulatively per subscription.
//!
//! A subscription ends on `TelemetryUnsubscribe` (after a last batch), when an
//! acknowledgement says `stop` (the run is over or unknown), when no acknowledgement arrived
//! for [`LEASE`] (the coordinator is gone), or after its `max_duration`. The programs are
//! loaded once at start-up to learn what this host supports (pre-flight), then unloaded, and
//! loaded again only while subscriptions exist: an idle agent costs nothing in the kernel.

mod collector;
mod convert;
pub mod resolve;
mod uplink;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use faultline_domain::fault::TargetSelector;
use faultline_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::runtime::ContainerRuntime;

pub use collector::{LoadReport, Mode};
pub use resolve::ResolvedTarget;

/// Aggregation interval when the subscription does not say.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval accepted.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// How long a subscription lasts when it does not say.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3600);
/// The longest subscription accepted.
pub const MAX_MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Most targets in one subscription.
pub const MAX_TARGETS: usize = 64;
/// A subscription without an acknowledgement for this long ends (the coordinator is gone).
pub const LEASE: Duration = Duration::from_secs(30);
/// Most events in one batch; more are counted as dropped.
pub const MAX_EVENTS_PER_BATCH: usize = 256;
/// Batches waiting for the uplink; a full queue drops the new batch (counted).
pub const BATCH_QUEUE: usize = 64;
/// Batches kept while the coordinator is unreachable; older ones are dropped (counted).
pub const BACKLOG: usize = 120;
/// How often targets are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The environment variable choosing the [`Mode`]: `auto` (default), `fallback` or `off`.
pub const MODE_ENV: &str = "FAULTLINE_TELEMETRY";

/// A verified subscription request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The run's targets on this host.
    pub targets: Vec<TargetSelector>,
    /// Aggregation interval.
    pub interval: Duration,
    /// The subscription ends by itself after this long.
    pub max_duration: Duration,
}

/// Checks a wire subscription; the error is the reason for the refusal report.
pub fn subscription_from_wire(sub: &pb::TelemetrySubscribe) -> Result<Subscription, String> {
    if sub.targets.is_empty() {
        return Err("telemetry subscription without targets".into());
    }
    if sub.targets.len() > MAX_TARGETS {
        return Err(format!(
            "telemetry subscription with {} targets; at most {MAX_TARGETS}",
            sub.targets.len()
        ));
    }
    let targets = sub
        .targets
        .iter()
        .map(|target| {
            target
                .selector
                .as_ref()
                .ok_or_else(|| "telemetry target without a selector".to_string())
                .and_then(crate::wire::target_from_wire)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let interval = match sub.interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(u64::from(ms)),
    };
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        return Err(format!(
            "telemetry interval {} ms outside {}..={} ms",
            interval.as_millis(),
            MIN_INTERVAL.as_millis(),
            MAX_INTERVAL.as_millis()
        ));
    }
    let max_duration = match sub.max_duration_ms {
        0 => DEFAULT_MAX_DURATION,
        ms => Duration::from_millis(ms),
    };
    if max_duration > MAX_MAX_DURATION {
        return Err(format!(
            "telemetry max duration {} ms over {} ms",
            max_duration.as_millis(),
            MAX_MAX_DURATION.as_millis()
        ));
    }
    Ok(Subscription {
        targets,
        interval,
        max_duration,
    })
}

/// Why the telemetry service could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("starting the telemetry collector thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the telemetry collector thread ended before reporting what this host supports")]
    NoLoadReport,
}

/// Runs of this agent with a live subscription, shared by the collector (which ends them) and
/// the resolvers (which stop once their run is gone).
type ActiveRuns = Arc<Mutex<HashSet<String>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Access to the telemetry service; cheap to clone.
#[derive(Clone)]
pub struct TelemetryHandle {
    control: std::sync::mpsc::Sender<collector::Control>,
    active: ActiveRuns,
    resolver: Arc<dyn resolve::Resolve>,
    load: Arc<LoadReport>,
}

impl std::fmt::Debug for TelemetryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryHandle")
            .field("load", &self.load)
            .finish_non_exhaustive()
    }
}

impl TelemetryHandle {
    /// Starts the collector thread (which loads the programs once, to report what this host
    /// supports, and unloads them) and the uplink on `channel` (the coordinator address the
    /// link uses). Blocks for the load (well under a second).
    pub async fn start<R: ContainerRuntime>(
        runtime: Arc<R>,
        channel: tokio::sync::watch::Receiver<Channel>,
        mode: Mode,
    ) -> Result<Self, TelemetryError> {
        faultline_bpf::set_libbpf_logger(faultline_bpf::LibbpfLevel::Warn, libbpf_log);
        let (control, control_rx) = std::sync::mpsc::channel();
        let (batches, batches_rx) = mpsc::channel(BATCH_QUEUE);
        let active: ActiveRuns = Arc::default();
        let acks = uplink::AckTimes::default();
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
        let collector =
            collector::Collector::new(mode, control_rx, batches, Arc::clone(&active), acks.clone());
        std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || collector.run(loaded_tx))
            .map_err(TelemetryError::Thread)?;
        let load = loaded_rx.await.map_err(|_| TelemetryError::NoLoadReport)?;
        for source in &load.sources {
            tracing::info!(group = %source.group, mechanism = %source.mechanism,
                "telemetry: {}", source.detail);
        }
        tokio::spawn(uplink::run(channel, batches_rx, acks, control.clone()));
        Ok(Self {
            control,
            active,
            resolver: Arc::new(resolve::RuntimeResolver(runtime)),
            load: Arc::new(load),
        })
    }

    /// What loading the programs at start-up found, per group.
    pub fn load_report(&self) -> &LoadReport {
        &self.load
    }

    /// Starts (or replaces) `run_id`'s subscription: resolves its targets, then hands them
    /// to the collector and keeps re-resolving them while the subscription lasts.
    pub fn subscribe(&self, run_id: String, subscription: Subscription) {
        // Marked active at once, so that an unsubscribe arriving while the targets are still
        // being resolved is not overtaken by the subscription it ends.
        lock(&self.active).insert(run_id.clone());
        let handle = self.clone();
        tokio::spawn(async move { handle.drive(run_id, subscription).await });
    }

    /// Ends `run_id`'s subscription after a last batch (nothing happens for an unknown run).
    pub fn unsubscribe(&self, run_id: &str) {
        lock(&self.active).remove(run_id);
        let _ = self.control.send(collector::Control::Unsubscribe {
            run_id: run_id.to_string(),
            reason: "unsubscribed".into(),
        });
    }

    async fn drive(self, run_id: String, subscription: Subscription) {
        let resolved = self.resolve_all(&subscription.targets).await;
        if !lock(&self.active).contains(&run_id) {
            tracing::info!(run = %run_id, "telemetry unsubscribed before it started");
            return;
        }
        let subscribe = collector::Control::Subscribe {
            run_id: run_id.clone(),
            interval: subscription.interval,
            max_duration: subscription.max_duration,
            selectors: subscription
                .targets
                .iter()
                .map(ToString::to_string)
                .collect(),
            targets: resolved.clone(),
        };
        if self.control.send(subscribe).is_err() {
            tracing::error!(run = %run_id, "telemetry collector gone; subscription dropped");
            lock(&self.active).remove(&run_id);
            return;
        }
        tracing::info!(run = %run_id, targets = subscription.targets.len(),
            interval = ?subscription.interval, "telemetry subscription started");
        let mut last = resolved;
        let deadline = tokio::time::Instant::now() + subscription.max_duration;
        loop {
            tokio::time::sleep(RESOLVE_EVERY).await;
            if !lock(&self.active).contains(&run_id) || tokio::time::Instant::now() > deadline {
                return;
            }
            let now = self.resolve_all(&subscription.targets).await;
            if now != last {
                let retarget = collector::Control::Retarget {
                    run_id: run_id.clone(),
                    targets: now.clone(),
                };
                if self.control.send(retarget).is_err() {
                    return;
                }
                last = now;
            }
        }
    }

    async fn resolve_all(&self, targets: &[TargetSelector]) -> Vec<Result<ResolvedTarget, String>> {
        let mut resolved = Vec::with_capacity(targets.len());
        for target in targets {
            resolved.push(self.resolver.resolve(target.clone()).await);
        }
        resolved
    }
}

/// libbpf's messages (verifier logs of programs that failed to load...) into the agent's log.
fn libbpf_log(level: faultline_bpf::LibbpfLevel, message: &str) {
    match level {
        faultline_bpf::LibbpfLevel::Warn => tracing::warn!(target: "libbpf", "{message}"),
        _ => tracing::debug!(target: "libbpf", "{message}"),
    }
}

/// Starts the telemetry service in the [`Mode`] [`MODE_ENV`] asks for; `None` (logged) when it
/// cannot start: the agent then works without telemetry.
pub async fn start_for_agent<R: ContainerRuntime>(
    runtime: Arc<R>,
    channel: tokio::sync::watch::Receiver<Channel>,
) -> Option<TelemetryHandle> {
    let mode = Mode::from_env().unwrap_or_else(|why| {
        tracing::error!("{why}; using auto");
        Mode::Auto
    });
    match TelemetryHandle::start(runtime, channel, mode).await {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::error!(%err, "telemetry unavailable");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Action, action_from_wire};

    fn target(name: &str) -> pb::Target {
        pb::Target {
            selector: Some(pb::target::Selector::ContainerName(name.into())),
        }
    }

    fn command(run_id: &str, subscribe: pb::TelemetrySubscribe) -> pb::Command {
        pb::Command {
            command_id: "c-1".into(),
            run_id: run_id.into(),
            target_agent: "agent-1".into(),
            action: Some(pb::command::Action::TelemetrySubscribe(subscribe)),
            ..Default::default()
        }
    }

    #[test]
    fn subscriptions_are_checked_and_defaulted() {
        let sub = subscription_from_wire(&pb::TelemetrySubscribe {
            targets: vec![target("db"), target("api")],
            interval_ms: 0,
            max_duration_ms: 0,
        })
        .unwrap();
        assert_eq!(
            sub,
            Subscription {
                targets: vec![
                    TargetSelector::Container("db".into()),
                    TargetSelector::Container("api".into())
                ],
                interval: DEFAULT_INTERVAL,
                max_duration: DEFAULT_MAX_DURATION,
            }
        );
        let refused = |sub: pb::TelemetrySubscribe| subscription_from_wire(&sub).unwrap_err();
        assert!(refused(pb::TelemetrySubscribe::default()).contains("without targets"));
        let too_fast = pb::TelemetrySubscribe {
            targets: vec![target("db")],
            interval_ms: 10,
            max_duration_ms: 0,
        };
        assert!(refused(too_fast).contains("interval 10 ms"));
        let too_long = pb::TelemetrySubscribe {
            targets: vec![target("db")],
            interval_ms: 1000,
            max_duration_ms: 48 * 3600 * 1000,
        };
        assert!(refused(too_long).contains("max duration"));
        let empty_name = pb::TelemetrySubscribe {
            targets: vec![target("")],
            ..Default::default()
        };
        assert!(refused(empty_name).contains("empty container name"));
        let many = pb::TelemetrySubscribe {
            targets: (0..=MAX_TARGETS)
                .map(|i| target(&format!("c{i}")))
                .collect(),
            ..Default::default()
        };
        assert!(refused(many).contains("at most 64"));
    }

    #[test]
    fn the_verifier_turns_subscriptions_into_actions_and_needs_a_run() {
        let subscribe = pb::TelemetrySubscribe {
            targets: vec![target("db")],
            interval_ms: 500,
            max_duration_ms: 60_000,
        };
        match action_from_wire(&command("run-1", subscribe.clone())).unwrap() {
            Action::TelemetrySubscribe(sub) => {
                assert_eq!(sub.interval, Duration::from_millis(500));
                assert_eq!(sub.max_duration, Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
        let refusal = action_from_wire(&command("", subscribe)).unwrap_err();
        assert!(
            refusal.to_string().contains("without a run id"),
            "{refusal}"
        );
        let unsubscribe = pb::Command {
            run_id: "run-1".into(),
            action: Some(pb::command::Action::TelemetryUnsubscribe(
                pb::TelemetryUnsubscribe {},
            )),
            ..Default::default()
        };
        assert_eq!(
            action_from_wire(&unsubscribe).unwrap(),
            Action::TelemetryUnsubscribe
        );
    }
}
