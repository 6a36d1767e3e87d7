//! A small Prometheus registry and `/metrics` endpoint, shared by the coordinator and the agent
//! (the agent includes this file with `#[path]`): counters, gauges and histograms with labels,
//! rendered in the Prometheus text format (0.0.4), served on a plain-HTTP listener of its own.
//! std + tokio only, no HTTP framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// The process's metrics.
#[derive(Debug)]
pub struct Registry {
    defs: &'static [Def],
    values: Mutex<Series>,
}

impl Registry {
    pub const fn new(defs: &'static [Def]) -> Self {
        Registry {
            defs,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    fn def(&self, name: &str) -> Option<&'static Def> {
        self.defs.iter().find(|d| d.name == name)
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
        for def in self.defs {
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

/// Starts the `/metrics` listener on `listen` (`off` disables it; port 0 picks a free port)
/// and logs `metrics listening on http://ADDR/metrics`. A bind failure is logged, not fatal:
/// metrics never stop a coordinator or an agent.
pub async fn start(registry: &'static Registry, listen: &str) -> Option<SocketAddr> {
    if listen.trim().eq_ignore_ascii_case("off") {
        return None;
    }
    let listener = match TcpListener::bind(listen.trim()).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(%err, listen, "metrics listener not started");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    tracing::info!("metrics listening on http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(registry, stream));
                }
                Err(err) => {
                    tracing::warn!(%err, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Some(addr)
}

async fn answer(registry: &'static Registry, mut stream: TcpStream) {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        ("200 OK", registry.render())
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
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
    }
}
