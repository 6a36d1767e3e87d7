//! A run's steady-state probes: a [`ProbeScheduler`] for the plan's probes and every sample
//! it took, by probe, for the run task to judge with the pure rules of
//! [`faultline_domain::plan`] ([`baseline_verdict`], [`stop_condition_fired`]).
//!
//! The collector also stores every sample as the run's probe samples (for reports), in
//! batches written every [`FLUSH_EVERY`] and once more when the session stops: a coordinator
//! that crashes mid-run loses at most the last batch. At most
//! [`MAX_PROBE_SAMPLES_PER_RUN`] samples are stored per run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use faultline_domain::plan::{SteadyState, baseline_verdict, format_rate};
use faultline_domain::probe::{ProbeSample, ProbeStats, Window, format_latency};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::hub::HubHandle;
use crate::probe::{ProbeEvent, ProbeRunner, ProbeRunnerError, ProbeScheduler};
use crate::store::{
    MAX_PROBE_DETAIL_LEN, MAX_PROBE_SAMPLES_PER_RUN, ProbeSampleRecord, Store, cap_detail,
};

/// Samples buffered between the probes and the collector.
const CHANNEL_CAPACITY: usize = 1024;
/// How often the collector writes the samples received since its last write.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Samples kept for the next write while the store fails; older ones beyond are dropped.
const MAX_PENDING: usize = 10_000;
/// How long [`ProbeSession::stop`] waits for the last samples to be written.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

type Samples = Arc<Mutex<HashMap<String, Vec<ProbeSample>>>>;

/// The probes of one run, sampling until [`ProbeSession::stop`].
#[derive(Debug)]
pub struct ProbeSession {
    scheduler: ProbeScheduler,
    collector: JoinHandle<()>,
    samples: Samples,
}

/// What [`ProbeSession::check`] found over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct SteadyCheck {
    pub steady: bool,
    /// Per probe: its verdict and statistics, for a person.
    pub summary: String,
    /// Why not steady (the failing probes); empty when steady.
    pub reasons: Vec<String>,
}

impl ProbeSession {
    /// Starts every probe of `steady` (first attempts at once); `command` probes reach their
    /// agents through `hub`. Every sample is stored in `store` as a probe sample of `run_id`.
    pub fn start(
        steady: &SteadyState,
        hub: HubHandle,
        store: Store,
        run_id: &str,
    ) -> Result<Self, ProbeRunnerError> {
        let runner = ProbeRunner::new()?.with_hub(hub);
        let (scheduler, rx) =
            ProbeScheduler::start(runner, steady.probes.clone(), CHANNEL_CAPACITY);
        let samples: Samples = Arc::default();
        let writer = SampleWriter::new(store, run_id);
        let collector = tokio::spawn(collect(rx, samples.clone(), writer));
        Ok(ProbeSession {
            scheduler,
            collector,
            samples,
        })
    }

    /// Every sample of `probe` so far, in the order taken.
    pub fn samples(&self, probe: &str) -> Vec<ProbeSample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(probe)
            .cloned()
            .unwrap_or_default()
    }

    /// Judges every probe of `steady` over `window`. Each probe's verdict is also a
    /// `faultline.probe.check` span, a child of the current span (the run's
    /// `faultline.steady_state.check`), carrying the statistics it was judged on.
    pub fn check(&self, steady: &SteadyState, window: Window) -> SteadyCheck {
        let mut parts = Vec::new();
        let mut reasons = Vec::new();
        for probe in &steady.probes {
            let samples = self.samples(&probe.name);
            let (stats, verdict) = baseline_verdict(&samples, window, steady.max_error_rate);
            probe_span(&probe.name, probe.kind.name(), &stats, &verdict);
            match verdict {
                Ok(()) => parts.push(format!("{}: steady, {}", probe.name, describe(&stats))),
                Err(why) => {
                    parts.push(format!("{}: not steady, {}", probe.name, describe(&stats)));
                    reasons.push(format!("{}: {why}", probe.name));
                }
            }
        }
        SteadyCheck {
            steady: reasons.is_empty(),
            summary: parts.join("; "),
            reasons,
        }
    }

    /// Stops the probes, then waits for the collector to store the last samples.
    pub async fn stop(self) {
        let counts = self.scheduler.stop().await;
        // Every sender went with the probes: the collector drains the channel, writes what is
        // left and ends.
        let mut collector = self.collector;
        if tokio::time::timeout(FINAL_FLUSH_TIMEOUT, &mut collector)
            .await
            .is_err()
        {
            tracing::warn!(
                "the last probe samples were not stored within {FINAL_FLUSH_TIMEOUT:?}; giving up"
            );
            collector.abort();
        }
        if counts.dropped > 0 {
            tracing::warn!(dropped = counts.dropped, "probe samples were dropped");
        }
    }
}

/// Receives the probes' samples until every probe is gone: keeps them for the checks and has
/// them written to the store every [`FLUSH_EVERY`], and once more at the end.
async fn collect(mut rx: mpsc::Receiver<ProbeEvent>, samples: Samples, mut writer: SampleWriter) {
    let mut ticker = tokio::time::interval(FLUSH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                writer.push(&event.probe, &event.sample);
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(event.probe)
                    .or_default()
                    .push(event.sample);
            }
            _ = ticker.tick() => writer.flush().await,
        }
    }
    writer.flush().await;
    if writer.lost > 0 {
        tracing::warn!(run = %writer.run_id, lost = writer.lost, stored = writer.stored,
            "some probe samples of the run were not stored");
    }
}

/// Batches a run's samples for the store, within [`MAX_PROBE_SAMPLES_PER_RUN`].
#[derive(Debug)]
struct SampleWriter {
    store: Store,
    run_id: String,
    pending: Vec<ProbeSampleRecord>,
    /// Samples stored so far.
    stored: usize,
    /// Samples not stored: over the per-run limit, or dropped while the store failed.
    lost: usize,
    /// The run reached [`MAX_PROBE_SAMPLES_PER_RUN`].
    capped: bool,
    /// The last write failed (logged once until a write succeeds again).
    failing: bool,
}

impl SampleWriter {
    fn new(store: Store, run_id: &str) -> Self {
        SampleWriter {
            store,
            run_id: run_id.to_string(),
            pending: Vec::new(),
            stored: 0,
            lost: 0,
            capped: false,
            failing: false,
        }
    }

    fn push(&mut self, probe: &str, sample: &ProbeSample) {
        if self.stored + self.pending.len() >= MAX_PROBE_SAMPLES_PER_RUN {
            if !self.capped {
                tracing::warn!(run = %self.run_id, limit = MAX_PROBE_SAMPLES_PER_RUN,
                    "the run reached its probe sample limit; later samples are not stored");
                self.capped = true;
            }
            self.lost += 1;
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            // The store has been failing for a while: keep the newest.
            self.pending.drain(..1);
            self.lost += 1;
        }
        self.pending.push(record(probe, sample));
    }

    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        match self
            .store
            .append_probe_samples(&self.run_id, batch.clone())
            .await
        {
            Ok(stored) => {
                self.stored += stored;
                if self.failing {
                    tracing::info!(run = %self.run_id, "storing probe samples again");
                    self.failing = false;
                }
            }
            Err(err) => {
                if !self.failing {
                    tracing::warn!(run = %self.run_id, %err,
                        "could not store probe samples; keeping them for the next attempt");
                    self.failing = true;
                }
                // Nothing was pushed meanwhile (this task does both): put the batch back.
                self.pending = batch;
            }
        }
    }
}

/// The stored form of a sample.
fn record(probe: &str, sample: &ProbeSample) -> ProbeSampleRecord {
    ProbeSampleRecord {
        probe: probe.to_string(),
        at_ms: sample.at_ms,
        ok: sample.ok,
        latency_ms: sample.latency.map(|l| l.as_nanos() as f64 / 1e6),
        value: sample.value.filter(|v| v.is_finite()),
        detail: cap_detail(&sample.detail, MAX_PROBE_DETAIL_LEN),
    }
}

/// Records one probe's verdict as a (momentary) `faultline.probe.check` span: the check is a
/// computation over samples already taken, so the span's worth is its attributes, which
/// let a trace show which probe made a phase steady or not, and on what evidence.
fn probe_span(name: &str, kind: &str, stats: &ProbeStats, verdict: &Result<(), String>) {
    let p95_ms = stats.latency_p95.map(|d| d.as_secs_f64() * 1000.0);
    // As i64: the OpenTelemetry layer exports unsigned integers as strings.
    let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let span = tracing::info_span!(
        target: crate::observability::OTEL_TARGET,
        "faultline.probe.check",
        faultline.probe.name = name,
        faultline.probe.kind = kind,
        faultline.probe.samples = int(stats.count),
        faultline.probe.errors = int(stats.errors),
        faultline.probe.error_rate = stats.error_rate,
        faultline.probe.latency_p95_ms = p95_ms,
        faultline.steady = verdict.is_ok(),
        faultline.probe.reason = verdict.as_ref().err().map(String::as_str),
    );
    drop(span);
}

/// `10 samples, 0 errors (0%), p50 1ms, p99 2ms`.
fn describe(stats: &ProbeStats) -> String {
    let mut text = format!(
        "{} samples, {} errors ({})",
        stats.count,
        stats.errors,
        stats.error_rate.map_or("n/a".into(), format_rate)
    );
    if let (Some(p50), Some(p99)) = (stats.latency_p50, stats.latency_p99) {
        text.push_str(&format!(
            ", p50 {}, p99 {}",
            format_latency(p50),
            format_latency(p99)
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use faultline_domain::probe::{ProbeKind, ProbeSpec};

    use super::*;
    use crate::store::RunRecord;

    fn probe(name: &str, address: &str) -> ProbeSpec {
        ProbeSpec {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            ..ProbeSpec::new(name, ProbeKind::tcp(address))
        }
    }

    fn run_record(id: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            title: "t".into(),
            state: "running".into(),
            plan_yaml: String::new(),
            operator: "operator/op".into(),
            created_ms: 1,
            finished_ms: None,
            reason: String::new(),
        }
    }

    fn sample(at_ms: i64) -> ProbeSample {
        ProbeSample {
            at_ms,
            ok: at_ms % 2 == 0,
            latency: Some(Duration::from_micros(1_250)),
            value: Some(f64::NAN),
            detail: "x".repeat(MAX_PROBE_DETAIL_LEN + 10),
        }
    }

    #[tokio::test]
    async fn the_writer_keeps_samples_while_the_store_fails_and_stops_at_the_run_limit() {
        let store = Store::open_in_memory().unwrap();
        let mut writer = SampleWriter::new(store.clone(), "r1");
        // The run does not exist yet: the write fails and the samples are kept.
        writer.push("api", &sample(1));
        writer.push("api", &sample(2));
        writer.flush().await;
        assert!(writer.failing);
        assert_eq!((writer.pending.len(), writer.stored), (2, 0));
        store.create_run(run_record("r1")).await.unwrap();
        writer.push("api", &sample(3));
        writer.flush().await;
        assert!(!writer.failing);
        assert_eq!((writer.pending.len(), writer.stored), (0, 3));
        let stored = store.probe_samples("r1", 10).await.unwrap();
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[0].latency_ms, Some(1.25));
        assert_eq!(stored[0].value, None, "NaN is not stored");
        assert!(!stored[0].ok && stored[1].ok);
        assert!(stored[0].detail.len() <= MAX_PROBE_DETAIL_LEN);

        // At most MAX_PROBE_SAMPLES_PER_RUN per run.
        for at in 0..MAX_PROBE_SAMPLES_PER_RUN as i64 {
            writer.push("api", &sample(10 + at));
            if writer.pending.len() >= 5_000 {
                writer.flush().await;
            }
        }
        writer.flush().await;
        assert!(writer.capped);
        assert_eq!(writer.stored, MAX_PROBE_SAMPLES_PER_RUN);
        assert_eq!(writer.lost, 3);
        let all = store
            .probe_samples("r1", MAX_PROBE_SAMPLES_PER_RUN + 10)
            .await
            .unwrap();
        assert_eq!(all.len(), MAX_PROBE_SAMPLES_PER_RUN);
    }

    #[tokio::test]
    async fn samples_are_stored_while_the_probes_run_and_the_rest_at_stop() {
        let store = Store::open_in_memory().unwrap();
        store.create_run(run_record("r1")).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap().to_string();
        let service = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let down = {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            closed.local_addr().unwrap().to_string()
        };
        let steady = SteadyState {
            probes: vec![probe("up", &up), probe("down", &down)],
            baseline: Duration::from_secs(1),
            max_error_rate: 0.0,
        };
        let hub = HubHandle::spawn(
            ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
            store.clone(),
        );
        let session = ProbeSession::start(&steady, hub, store.clone(), "r1").unwrap();

        // Stored while the probes run: a crash loses at most the last batch.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stored = store.probe_samples("r1", 10_000).await.unwrap();
            let of = |name: &str| stored.iter().filter(|s| s.probe == name).count();
            if of("up") >= 3 && of("down") >= 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not stored while running: {stored:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let memory = session.samples.clone();
        session.stop().await;
        service.abort();
        let stored = store.probe_samples("r1", 10_000).await.unwrap();
        let taken: usize = memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum();
        assert_eq!(stored.len(), taken, "every sample taken is stored");
        assert!(stored.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        for sample in &stored {
            match sample.probe.as_str() {
                "up" => assert!(sample.ok, "{sample:?}"),
                "down" => {
                    assert!(!sample.ok, "{sample:?}");
                    assert!(!sample.detail.is_empty());
                }
                other => panic!("unknown probe {other}"),
            }
            assert!(sample.latency_ms.is_some_and(|l| l >= 0.0), "{sample:?}");
        }
    }
}
