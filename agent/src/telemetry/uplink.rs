//! The uplink: sends the collector's batches on `AgentTelemetry.Stream` and reads the
//! coordinator's acknowledgements.
//!
//! The stream is opened when there is something to send and closed again once nothing has been
//! sent for [`IDLE`] and everything sent was acknowledged: no stream lingers without
//! subscriptions. Batches not yet acknowledged when the stream breaks are sent again on the
//! next one (the coordinator ignores a sequence number it already stored); while the
//! coordinator is unreachable, at most [`BACKLOG`] batches wait, and older ones are dropped and
//! counted in the run's next batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::collector::Control;
use super::{BACKLOG, BATCH_QUEUE, lock};

/// A stream idle (nothing sent, nothing unacknowledged) this long is closed.
const IDLE: Duration = Duration::from_secs(15);
/// How long opening the stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Batches older than this are dropped (counted) rather than kept for a coordinator that may
/// never come back: nothing is retried forever.
const MAX_AGE: Duration = Duration::from_secs(300);

/// When each run's batches were last acknowledged: the subscriptions' lease.
#[derive(Debug, Clone, Default)]
pub(crate) struct AckTimes(Arc<Mutex<HashMap<String, Instant>>>);

impl AckTimes {
    pub(crate) fn acked(&self, run_id: &str) {
        lock(&self.0).insert(run_id.to_string(), Instant::now());
    }

    pub(crate) fn snapshot(&self) -> HashMap<String, Instant> {
        lock(&self.0).clone()
    }

    pub(crate) fn forget(&self, run_id: &str) {
        lock(&self.0).remove(run_id);
    }
}

enum StreamEnd {
    /// Nothing to send for a while: closed on purpose.
    Idle,
    /// The collector is gone: the agent is shutting down.
    Closed,
    Lost(String),
}

/// Batches waiting to be sent, oldest first, bounded.
struct Backlog {
    batches: VecDeque<pb::TelemetryBatch>,
    control: std::sync::mpsc::Sender<Control>,
}

impl Backlog {
    fn push_back(&mut self, batch: pb::TelemetryBatch) {
        self.batches.push_back(batch);
        self.trim();
    }

    /// Puts batches sent but not acknowledged back in front, in their order.
    fn requeue(&mut self, unacked: VecDeque<pb::TelemetryBatch>) {
        for batch in unacked.into_iter().rev() {
            self.batches.push_front(batch);
        }
        self.trim();
    }

    fn trim(&mut self) {
        let oldest_kept = crate::clock::now_ms()
            .saturating_sub(i64::try_from(MAX_AGE.as_millis()).unwrap_or(i64::MAX));
        while let Some(front) = self.batches.front() {
            let full = self.batches.len() > BACKLOG;
            if !full && front.to_unix_ms >= oldest_kept {
                break;
            }
            if let Some(dropped) = self.batches.pop_front() {
                crate::metrics::count("faultline_agent_telemetry_drops_total", &["batches"], 1);
                tracing::warn!(run = %dropped.run_id, seq = dropped.seq,
                    "telemetry batch dropped: {}",
                    if full { "backlog full" } else { "not delivered in time" });
                let _ = self.control.send(Control::BatchesLost {
                    run_id: dropped.run_id,
                    count: 1,
                });
            }
        }
    }
}

/// Runs until the collector is gone. `channel` follows the link's coordinator address in use
/// (several replicas: only the active one listens); each stream opens on the latest.
pub(crate) async fn run(
    channel: tokio::sync::watch::Receiver<Channel>,
    mut batches: mpsc::Receiver<pb::TelemetryBatch>,
    acks: AckTimes,
    control: std::sync::mpsc::Sender<Control>,
) {
    let mut backlog = Backlog {
        batches: VecDeque::new(),
        control,
    };
    let mut backoff = BACKOFF_START;
    loop {
        if backlog.batches.is_empty() {
            match batches.recv().await {
                Some(batch) => backlog.push_back(batch),
                None => return,
            }
        }
        let opened = Instant::now();
        let current = channel.borrow().clone();
        match stream(&current, &mut batches, &mut backlog, &acks).await {
            StreamEnd::Idle => {
                backoff = BACKOFF_START;
                continue;
            }
            StreamEnd::Closed => return,
            StreamEnd::Lost(why) => {
                if opened.elapsed() > BACKOFF_MAX * 2 {
                    backoff = BACKOFF_START;
                }
                tracing::warn!(retry_in = ?backoff, waiting = backlog.batches.len(),
                    "telemetry stream lost: {why}");
            }
        }
        backlog.trim();
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                batch = batches.recv() => match batch {
                    Some(batch) => backlog.push_back(batch),
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream: sends the backlog, then every new batch, until idle, lost or closed.
async fn stream(
    channel: &Channel,
    batches: &mut mpsc::Receiver<pb::TelemetryBatch>,
    backlog: &mut Backlog,
    acks: &AckTimes,
) -> StreamEnd {
    let (tx, rx) = mpsc::channel::<pb::TelemetryBatch>(BATCH_QUEUE);
    let mut client = pb::agent_telemetry_client::AgentTelemetryClient::new(channel.clone());
    let call = client.stream(ReceiverStream::new(rx));
    let mut inbound = match tokio::time::timeout(OPEN_TIMEOUT, call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return StreamEnd::Lost(format!("{}: {}", status.code(), status.message()));
        }
        Err(_) => return StreamEnd::Lost(format!("not opened within {OPEN_TIMEOUT:?}")),
    };
    let mut unacked: VecDeque<pb::TelemetryBatch> = VecDeque::new();
    let lost = |unacked: VecDeque<pb::TelemetryBatch>, backlog: &mut Backlog, why: String| {
        backlog.requeue(unacked);
        StreamEnd::Lost(why)
    };
    while let Some(batch) = backlog.batches.pop_front() {
        unacked.push_back(batch.clone());
        if tx.send(batch).await.is_err() {
            return lost(unacked, backlog, "stream closed while sending".into());
        }
    }
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            batch = batches.recv() => match batch {
                Some(batch) => {
                    unacked.push_back(batch.clone());
                    if tx.send(batch).await.is_err() {
                        return lost(unacked, backlog, "stream closed while sending".into());
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
                }
                None => return StreamEnd::Closed,
            },
            message = inbound.message() => match message {
                Ok(Some(ack)) => {
                    acks.acked(&ack.run_id);
                    // Acknowledgements come in the order batches were sent.
                    while let Some(front) = unacked.pop_front() {
                        if front.run_id == ack.run_id && front.seq == ack.seq {
                            break;
                        }
                    }
                    if ack.stop {
                        let _ = backlog.control.send(Control::Stop {
                            run_id: ack.run_id,
                            reason: format!("the coordinator asked to stop: {}", ack.reason),
                        });
                    }
                }
                Ok(None) => {
                    return lost(unacked, backlog, "the coordinator closed the stream".into());
                }
                Err(status) => return lost(unacked, backlog, status.to_string()),
            },
            () = &mut idle => {
                if unacked.is_empty() {
                    return StreamEnd::Idle;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(run_id: &str, seq: u64, to_unix_ms: i64) -> pb::TelemetryBatch {
        pb::TelemetryBatch {
            run_id: run_id.into(),
            seq,
            to_unix_ms,
            ..Default::default()
        }
    }

    #[test]
    fn the_backlog_is_bounded_in_size_and_age_and_counts_what_it_drops() {
        let (control, lost) = std::sync::mpsc::channel();
        let mut backlog = Backlog {
            batches: VecDeque::new(),
            control,
        };
        let now = crate::clock::now_ms();
        // Too old to be worth sending: dropped at once.
        backlog.push_back(batch("old", 1, now - 301_000));
        for seq in 1..=(BACKLOG as u64 + 1) {
            backlog.push_back(batch("run", seq, now));
        }
        assert_eq!(backlog.batches.len(), BACKLOG);
        assert_eq!(backlog.batches.front().map(|b| b.seq), Some(2));
        let dropped: Vec<(String, u64)> = lost
            .try_iter()
            .map(|c| match c {
                Control::BatchesLost { run_id, count } => (run_id, count),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            dropped,
            vec![("old".to_string(), 1), ("run".to_string(), 1)]
        );
        // Unacknowledged batches go back in front, in order (they are the oldest, so the first
        // to go when the backlog is full).
        backlog.batches.truncate(10);
        let unacked: VecDeque<_> = [batch("run", 500, now), batch("run", 501, now)].into();
        backlog.requeue(unacked);
        let order: Vec<u64> = backlog.batches.iter().take(3).map(|b| b.seq).collect();
        assert_eq!(order, vec![500, 501, 2]);
    }
}
