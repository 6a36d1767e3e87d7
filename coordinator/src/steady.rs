//! A run's steady-state probes: a [`ProbeScheduler`] for the plan's probes and every sample
//! it took, by probe, for the run task to judge with the pure rules of
//! [`faultline_domain::plan`] ([`baseline_verdict`], [`stop_condition_fired`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use faultline_domain::plan::{SteadyState, baseline_verdict, format_rate};
use faultline_domain::probe::{ProbeSample, ProbeStats, Window, format_latency};
use tokio::task::JoinHandle;

use crate::probe::{ProbeRunner, ProbeRunnerError, ProbeScheduler};

/// Samples buffered between the probes and the collector.
const CHANNEL_CAPACITY: usize = 1024;

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
    /// Starts every probe of `steady` (first attempts at once).
    pub fn start(steady: &SteadyState) -> Result<Self, ProbeRunnerError> {
        let runner = ProbeRunner::new()?;
        let (scheduler, mut rx) =
            ProbeScheduler::start(runner, steady.probes.clone(), CHANNEL_CAPACITY);
        let samples: Samples = Arc::default();
        let sink = samples.clone();
        let collector = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(event.probe)
                    .or_default()
                    .push(event.sample);
            }
        });
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

    /// Judges every probe of `steady` over `window`.
    pub fn check(&self, steady: &SteadyState, window: Window) -> SteadyCheck {
        let mut parts = Vec::new();
        let mut reasons = Vec::new();
        for probe in &steady.probes {
            let samples = self.samples(&probe.name);
            let (stats, verdict) = baseline_verdict(&samples, window, steady.max_error_rate);
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

    /// Stops the probes and the collector.
    pub async fn stop(self) {
        let counts = self.scheduler.stop().await;
        self.collector.abort();
        let _ = self.collector.await;
        if counts.dropped > 0 {
            tracing::warn!(dropped = counts.dropped, "probe samples were dropped");
        }
    }
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
