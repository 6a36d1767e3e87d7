//! Kill storms: a signal sent `count` times, `interval` apart, to targets re-resolved before
//! every round (a supervisor restarts its child under a new pid; the storm follows it).
//!
//! A storm runs as a tokio task and registers itself in the process-wide [`storms`] registry
//! under its tag, so a revert replayed from the journal (which only knows the tag) can cancel
//! it with `storms().remove(tag)`. It removes itself when it finishes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use faultline_domain::fault::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ProcessError, ProcessId, parse_signal, signal_identity};

/// Pause between attempts to find targets within one round (a restarting process is briefly
/// absent).
const RESOLVE_RETRY: Duration = Duration::from_millis(50);
/// Bounds of how long one round keeps looking for targets.
const RESOLVE_WINDOW_MIN: Duration = Duration::from_millis(200);
const RESOLVE_WINDOW_MAX: Duration = Duration::from_secs(5);

/// What a storm does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StormSpec {
    /// Registry tag; unique per fault.
    pub tag: String,
    pub signal: Signal,
    /// Rounds; each signals every target resolved for it.
    pub count: u32,
    /// Time between the starts of two rounds (the first round starts at once).
    pub interval: Duration,
}

/// Progress reports, in order; `Finished` is always last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StormEvent {
    /// Round `round` (1-based) delivered the signal to `target`.
    Killed {
        round: u32,
        target: ProcessId,
    },
    /// Round `round` hit nothing.
    Missed {
        round: u32,
        reason: String,
    },
    Finished(StormSummary),
}

/// How a storm ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StormSummary {
    /// Rounds run (cancelled storms run fewer than asked).
    pub rounds: u32,
    /// Every process hit, in order.
    pub hits: Vec<ProcessId>,
    pub cancelled: bool,
}

/// Handle on a running storm; clones share it.
#[derive(Debug, Clone)]
pub struct KillStorm {
    tag: String,
    serial: u64,
    cancel: Arc<watch::Sender<bool>>,
    done: watch::Receiver<Option<StormSummary>>,
}

impl KillStorm {
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Stops the storm before its next signal; does not wait (see [`KillStorm::wait`]).
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    pub fn is_finished(&self) -> bool {
        self.done.borrow().is_some()
    }

    /// Waits until the storm ends and returns its summary.
    pub async fn wait(&self) -> StormSummary {
        let mut done = self.done.clone();
        match done.wait_for(Option::is_some).await {
            Ok(summary) => summary
                .clone()
                .unwrap_or_else(|| cancelled_summary(0, Vec::new())),
            // The task is gone without a summary (it panicked or the runtime shut down).
            Err(_) => cancelled_summary(0, Vec::new()),
        }
    }
}

fn cancelled_summary(rounds: u32, hits: Vec<ProcessId>) -> StormSummary {
    StormSummary {
        rounds,
        hits,
        cancelled: true,
    }
}

/// Storms in progress, by tag.
#[derive(Debug, Default)]
pub struct StormRegistry {
    storms: Mutex<HashMap<String, KillStorm>>,
}

impl StormRegistry {
    /// Registers `storm`, cancelling any other storm registered under its tag.
    pub fn insert(&self, storm: KillStorm) {
        if let Some(old) = self.lock().insert(storm.tag.clone(), storm)
            && !old.is_finished()
        {
            old.cancel();
        }
    }

    /// Cancels and forgets the storm under `tag`; true if one was running.
    pub fn remove(&self, tag: &str) -> bool {
        match self.lock().remove(tag) {
            Some(storm) => {
                let running = !storm.is_finished();
                storm.cancel();
                running
            }
            None => false,
        }
    }

    /// Cancels and unregisters the storm under `tag` and hands it over, so an async caller
    /// can [`wait`](KillStorm::wait) for its last round to end. (A round already signalling
    /// when cancelled finishes its few `kill`s; no round starts afterwards.)
    pub fn take(&self, tag: &str) -> Option<KillStorm> {
        let storm = self.lock().remove(tag)?;
        storm.cancel();
        Some(storm)
    }

    /// The storm under `tag`, if registered.
    pub fn get(&self, tag: &str) -> Option<KillStorm> {
        self.lock().get(tag).cloned()
    }

    pub fn tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = self.lock().keys().cloned().collect();
        tags.sort();
        tags
    }

    /// Forgets `tag` if it still refers to the storm `serial` (a finished storm must not
    /// unregister its successor).
    fn forget(&self, tag: &str, serial: u64) {
        let mut storms = self.lock();
        if storms.get(tag).is_some_and(|storm| storm.serial == serial) {
            storms.remove(tag);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, KillStorm>> {
        self.storms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The process-wide storm registry.
pub fn storms() -> &'static StormRegistry {
    static REGISTRY: OnceLock<StormRegistry> = OnceLock::new();
    REGISTRY.get_or_init(StormRegistry::default)
}

/// Starts a kill storm on the current tokio runtime and registers it under `spec.tag`.
///
/// Before each round `resolve_again` names the targets afresh (for a container: its current
/// main pid, then [`in_container`](super::in_container)); a round that finds none keeps
/// trying for about one interval (at least 200 ms, at most 5 s) before reporting a miss.
/// Every delivered signal is reported through `on_event` with the identity it hit; signals go
/// through [`signal_identity`], so a target that exited meanwhile is skipped, never its pid's
/// next owner. `on_event` runs on the storm's task and must not block.
///
/// # Errors
/// An unknown signal name; nothing is started then.
pub fn spawn_kill_storm<R, F, E>(
    spec: StormSpec,
    mut resolve_again: R,
    mut on_event: E,
) -> Result<KillStorm, ProcessError>
where
    R: FnMut() -> F + Send + 'static,
    F: Future<Output = Result<Vec<ProcessId>, ProcessError>> + Send + 'static,
    E: FnMut(StormEvent) + Send + 'static,
{
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let signal = parse_signal(spec.signal.name())?;
    let (cancel_tx, mut cancel_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(None);
    let storm = KillStorm {
        tag: spec.tag.clone(),
        serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        cancel: Arc::new(cancel_tx),
        done: done_rx,
    };
    storms().insert(storm.clone());
    let (tag, serial) = (storm.tag.clone(), storm.serial);
    let window = spec.interval.clamp(RESOLVE_WINDOW_MIN, RESOLVE_WINDOW_MAX);

    tokio::spawn(async move {
        let start = Instant::now();
        let mut hits = Vec::new();
        let mut rounds = 0;
        let mut cancelled = false;
        for round in 1..=spec.count {
            let at = start + spec.interval.saturating_mul(round - 1);
            if !sleep_until_or_cancel(at, &mut cancel_rx).await {
                cancelled = true;
                break;
            }
            rounds = round;
            let targets = tokio::select! {
                targets = resolve_within(&mut resolve_again, window) => targets,
                _ = cancel_rx.wait_for(|cancel| *cancel) => {
                    cancelled = true;
                    break;
                }
            };
            let mut missed = Vec::new();
            let mut hit_any = false;
            match targets {
                Ok(targets) => {
                    for target in targets {
                        match signal_identity(&target, signal) {
                            Ok(true) => {
                                hit_any = true;
                                hits.push(target.clone());
                                on_event(StormEvent::Killed { round, target });
                            }
                            Ok(false) => missed.push(format!("{target} exited meanwhile")),
                            Err(err) => missed.push(err.to_string()),
                        }
                    }
                }
                Err(err) => missed.push(err.to_string()),
            }
            if !hit_any {
                on_event(StormEvent::Missed {
                    round,
                    reason: missed.join("; "),
                });
            }
        }
        let summary = StormSummary {
            rounds,
            hits,
            cancelled,
        };
        on_event(StormEvent::Finished(summary.clone()));
        storms().forget(&tag, serial);
        done_tx.send_replace(Some(summary));
    });
    Ok(storm)
}

/// Sleeps until `at`; false if cancelled first (or already).
async fn sleep_until_or_cancel(at: Instant, cancel: &mut watch::Receiver<bool>) -> bool {
    if *cancel.borrow() {
        return false;
    }
    let woke = tokio::select! {
        () = tokio::time::sleep_until(at) => true,
        _ = cancel.wait_for(|cancel| *cancel) => false,
    };
    woke && !*cancel.borrow()
}

/// Calls `resolve` until it names at least one target or `window` has passed.
async fn resolve_within<R, F>(
    resolve: &mut R,
    window: Duration,
) -> Result<Vec<ProcessId>, ProcessError>
where
    R: FnMut() -> F,
    F: Future<Output = Result<Vec<ProcessId>, ProcessError>>,
{
    let deadline = Instant::now() + window;
    loop {
        let outcome = match resolve().await {
            Ok(targets) if targets.is_empty() => {
                Err(ProcessError::Target("no target processes".to_string()))
            }
            other => other,
        };
        if outcome.is_ok() || Instant::now() + RESOLVE_RETRY > deadline {
            return outcome;
        }
        tokio::time::sleep(RESOLVE_RETRY).await;
    }
}
