//! A small Prometheus registry: counters, gauges and histograms with labels, rendered in the
//! Prometheus text format (0.0.4), and read by the OTLP metrics export ([`crate::init_tracing`]).
//! Every registry also holds the exporter's own families ([`SELF_DEFS`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;

/// What a metric family is.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    /// Upper bounds of the buckets, ascending (`+Inf` is added).
    Histogram(&'static [f64]),
}

/// One metric family: name, kind, help text and label names.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    Histogram {
        buckets: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

type Series = BTreeMap<(&'static str, Vec<String>), Value>;

/// Counts of the OTLP exporters themselves, in every registry: the SDK's batch queue drops
/// silently when full, and a dead collector fails exports, so these tell what was lost.
pub static SELF_DEFS: &[Def] = &[
    Def {
        name: "faultline_otel_spans_ended_total",
        kind: Kind::Counter,
        help: "Spans handed to the OTLP batch queue (ended - exported - dropped = still queued, or dropped by a full queue).",
        labels: &[],
    },
    Def {
        name: "faultline_otel_spans_exported_total",
        kind: Kind::Counter,
        help: "Spans the OTLP collector accepted.",
        labels: &[],
    },
    Def {
        name: "faultline_otel_spans_dropped_total",
        kind: Kind::Counter,
        help: "Spans lost because their export failed (collector down, slow past the timeout, or refusing).",
        labels: &[],
    },
    Def {
        name: "faultline_otel_metric_exports_total",
        kind: Kind::Counter,
        help: "OTLP metric exports, by outcome (ok, failed).",
        labels: &["outcome"],
    },
];

/// The process's metrics.
#[derive(Debug)]
pub struct Registry {
    defs: &'static [Def],
    values: Mutex<Series>,
    /// The OTLP histograms, once metric export is on: histograms have no asynchronous
    /// instrument in OpenTelemetry, so observations are recorded into both.
    otel_histograms: OnceLock<Vec<(&'static str, Histogram<f64>)>>,
}

impl Registry {
    pub const fn new(defs: &'static [Def]) -> Self {
        Registry {
            defs,
            values: Mutex::new(BTreeMap::new()),
            otel_histograms: OnceLock::new(),
        }
    }

    /// Every family: the process's own, then the exporter's.
    pub fn defs(&self) -> impl Iterator<Item = &'static Def> {
        self.defs.iter().chain(SELF_DEFS)
    }

    fn def(&self, name: &str) -> Option<&'static Def> {
        self.defs().find(|d| d.name == name)
    }

    /// Called once by the OTLP metrics set-up.
    pub(crate) fn attach_otel_histograms(&self, histograms: Vec<(&'static str, Histogram<f64>)>) {
        let _ = self.otel_histograms.set(histograms);
    }

    /// The current value of every series of the counter or gauge `name`, with its label
    /// values; an unlabelled family without updates reads 0 (as in [`Registry::render`]).
    pub fn numbers(&self, name: &str) -> Vec<(Vec<String>, f64)> {
        let Some(def) = self.def(name) else {
            return Vec::new();
        };
        let values = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(Vec<String>, f64)> = values
            .iter()
            .filter(|((family, _), _)| *family == name)
            .filter_map(|((_, labels), value)| match value {
                Value::Number(n) => Some((labels.clone(), *n)),
                Value::Histogram { .. } => None,
            })
            .collect();
        if out.is_empty() && def.labels.is_empty() && !matches!(def.kind, Kind::Histogram(_)) {
            out.push((Vec::new(), 0.0));
        }
        out
    }

    /// `labels` as OpenTelemetry attributes of family `def`.
    pub(crate) fn attributes(def: &Def, labels: &[String]) -> Vec<KeyValue> {
        def.labels
            .iter()
            .zip(labels)
            .map(|(k, v)| KeyValue::new(*k, v.clone()))
            .collect()
    }

    fn with(&self, name: &'static str, labels: &[&str], f: impl FnOnce(&Def, &mut Value)) {
        let Some(def) = self.def(name) else {
            return;
        };
        let mut values = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (name, labels.iter().map(|l| l.to_string()).collect());
        let value = values.entry(key).or_insert_with(|| match def.kind {
            Kind::Histogram(bounds) => Value::Histogram {
                buckets: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            },
            Kind::Counter | Kind::Gauge => Value::Number(0.0),
        });
        f(def, value);
    }

    /// Adds `delta` to a counter or gauge (negative only for gauges).
    pub fn add(&self, name: &'static str, labels: &[&str], delta: f64) {
        self.with(name, labels, |_, value| {
            if let Value::Number(n) = value {
                *n += delta;
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, labels: &[&str], to: f64) {
        self.with(name, labels, |_, value| {
            if let Value::Number(n) = value {
                *n = to;
            }
        });
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &'static str, labels: &[&str], sample: f64) {
        if let Some((_, histogram)) = self
            .otel_histograms
            .get()
            .and_then(|all| all.iter().find(|(family, _)| *family == name))
            && let Some(def) = self.def(name)
        {
            let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            histogram.record(sample, &Self::attributes(def, &labels));
        }
        self.with(name, labels, |def, value| {
            if let (
                Kind::Histogram(bounds),
                Value::Histogram {
                    buckets,
                    sum,
                    count,
                },
            ) = (def.kind, value)
            {
                for (bound, bucket) in bounds.iter().zip(buckets.iter_mut()) {
                    if sample <= *bound {
                        *bucket += 1;
                    }
                }
                *sum += sample;
                *count += 1;
            }
        });
    }

    /// The Prometheus text exposition of every family; unlabelled families appear as 0 before
    /// their first update.
    pub fn render(&self) -> String {
        let values = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut out = String::new();
        for def in self.defs() {
            let kind = match def.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", def.name, def.help);
            let _ = writeln!(out, "# TYPE {} {kind}", def.name);
            let mut series: Vec<(&Vec<String>, &Value)> = values
                .iter()
                .filter(|((name, _), _)| *name == def.name)
                .map(|((_, labels), value)| (labels, value))
                .collect();
            let empty = Vec::new();
            let zero = match def.kind {
                Kind::Histogram(bounds) => Value::Histogram {
                    buckets: vec![0; bounds.len()],
                    sum: 0.0,
                    count: 0,
                },
                _ => Value::Number(0.0),
            };
            if series.is_empty() && def.labels.is_empty() {
                series.push((&empty, &zero));
            }
            for (labels, value) in series {
                let pairs: Vec<String> = def
                    .labels
                    .iter()
                    .zip(labels)
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                match (value, def.kind) {
                    (Value::Number(n), _) => {
                        let _ = writeln!(out, "{}{} {n}", def.name, braces(&pairs));
                    }
                    (
                        Value::Histogram {
                            buckets,
                            sum,
                            count,
                        },
                        Kind::Histogram(bounds),
                    ) => {
                        for (bound, bucket) in bounds.iter().zip(buckets) {
                            let mut with_le = pairs.clone();
                            with_le.push(format!("le=\"{bound}\""));
                            let _ =
                                writeln!(out, "{}_bucket{} {bucket}", def.name, braces(&with_le));
                        }
                        let mut with_le = pairs.clone();
                        with_le.push("le=\"+Inf\"".into());
                        let _ = writeln!(out, "{}_bucket{} {count}", def.name, braces(&with_le));
                        let _ = writeln!(out, "{}_sum{} {sum}", def.name, braces(&pairs));
                        let _ = writeln!(out, "{}_count{} {count}", def.name, braces(&pairs));
                    }
                    (Value::Histogram { .. }, _) => {}
                }
            }
        }
        out
    }
}

fn braces(pairs: &[String]) -> String {
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    static DEFS: &[Def] = &[
        Def {
            name: "t_total",
            kind: Kind::Counter,
            help: "a counter",
            labels: &["reason"],
        },
        Def {
            name: "t_up",
            kind: Kind::Gauge,
            help: "a gauge",
            labels: &[],
        },
        Def {
            name: "t_seconds",
            kind: Kind::Histogram(&[0.1, 1.0]),
            help: "a histogram",
            labels: &[],
        },
    ];

    #[test]
    fn renders_the_text_format() {
        let registry = Registry::new(DEFS);
        registry.add("t_total", &["a\"b"], 2.0);
        registry.observe("t_seconds", &[], 0.5);
        registry.observe("t_seconds", &[], 5.0);
        let text = registry.render();
        assert!(text.contains("# TYPE t_total counter\nt_total{reason=\"a\\\"b\"} 2\n"));
        assert!(text.contains("t_up 0\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"0.1\"} 0\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("t_seconds_count 2\n"), "{text}");
        assert!(
            text.contains("# TYPE faultline_otel_spans_dropped_total counter\nfaultline_otel_spans_dropped_total 0\n"),
            "{text}"
        );
        assert_eq!(registry.numbers("t_up"), vec![(Vec::new(), 0.0)]);
        assert_eq!(
            registry.numbers("t_total"),
            vec![(vec!["a\"b".to_string()], 2.0)]
        );
        assert!(registry.numbers("t_seconds").is_empty());
        assert!(registry.numbers("unknown").is_empty());
    }
}
