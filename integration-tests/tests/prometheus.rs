#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Prometheus metrics end to end: the real coordinator and agent with `/metrics` on ephemeral
//! loopback ports, a real Prometheus (Debian package `prometheus`) scraping both every second
//! (the coordinator over HTTPS, `--metrics-tls`, verified with the fleet CA and a host name of
//! its certificate), a plan pausing a real container; then Prometheus's HTTP API must return
//! the expected series with sane values, telemetry and BPF-status series included. Skipped,
//! loudly, only when the `prometheus` binary is missing.
//!
//! One test function on purpose: the metrics port is configured through the environment
//! (`FAULTLINE_METRICS_LISTEN=127.0.0.1:0`, `FAULTLINE_METRICS_TLS`), which the cluster's
//! processes inherit.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use faultline_integration_tests::cluster::{Cluster, eventually};
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn find_prometheus() -> Option<std::path::PathBuf> {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

/// The address a process logged as `metrics listening on http(s)://ADDR/metrics`.
fn metrics_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let at = text.find("metrics listening on http")?;
    let rest = text[at..].split("://").nth(1)?;
    Some(rest.split("/metrics").next()?.to_string())
}

/// A plain HTTP/1.1 GET (loopback only), returning the body.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    // Prometheus may answer chunked; the JSON is small enough to unwrap it by hand.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16)?;
            if size == 0 {
                break;
            }
            out.push_str(&tail[..size]);
            rest = &tail[size + 2..];
        }
        return Ok(out);
    }
    Ok(body.to_string())
}

/// Runs an instant PromQL query; returns `(labels, value)` per series.
async fn query(prom: &str, promql: &str) -> Vec<(Value, f64)> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Ok(body) = http_get(prom, &format!("/api/v1/query?query={encoded}")).await else {
        return Vec::new();
    };
    let Ok(json) = serde_json::from_str::<Value>(&body) else {
        return Vec::new();
    };
    json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let value = r["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (r["metric"].clone(), value)
        })
        .collect()
}

async fn scalar(prom: &str, promql: &str) -> Option<f64> {
    query(prom, promql).await.first().map(|(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_coordinator_and_agent_and_sees_the_run() {
    let Some(prometheus) = find_prometheus() else {
        eprintln!(
            "\n!!!!!!!! SKIPPED: the `prometheus` binary is missing \
             (apt-get install prometheus); Prometheus metrics are NOT tested !!!!!!!!\n"
        );
        return;
    };
    // SAFETY: this binary has this one test, which sets the variables before any other
    // thread of its own reads the environment; the cluster's processes inherit them.
    unsafe {
        std::env::set_var("FAULTLINE_METRICS_LISTEN", "127.0.0.1:0");
        std::env::set_var("FAULTLINE_METRICS_TLS", "true");
    }
    let mut cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let coordinator_log = cluster.db.with_extension("log");
    let agent_log = cluster.dir.path().join("agent-agent-1.log");
    // An agent's certificate is for client use only: asked for HTTPS, the agent says so and
    // serves no metrics (never in the clear instead) -- and keeps working.
    let refused = eventually(
        Duration::from_secs(10),
        "agent --metrics-tls refusal",
        || {
            let log = agent_log.clone();
            async move {
                let text = std::fs::read_to_string(&log).ok()?;
                text.contains("--metrics-tls: metrics listener not started")
                    .then_some(text)
            }
        },
    )
    .await
    .unwrap();
    assert!(refused.contains("client-only certificate"), "{refused}");
    assert!(!refused.contains("metrics listening on"), "{refused}");
    // The agent again, plain HTTP (before Prometheus starts: no dip in agents_connected).
    // SAFETY: as above; no other thread of this test reads the environment now.
    unsafe {
        std::env::remove_var("FAULTLINE_METRICS_TLS");
    }
    cluster.agents[0].terminate(Duration::from_secs(10)).await;
    let agent = cluster.spawn_agent("agent-1").unwrap();
    cluster.agents[0] = agent;
    cluster
        .wait_connected(&["agent-1"], Duration::from_secs(20))
        .await
        .unwrap();
    let coordinator_metrics = eventually(Duration::from_secs(10), "coordinator metrics", || {
        let log = coordinator_log.clone();
        async move { metrics_addr(&log) }
    })
    .await
    .unwrap();
    let agent_metrics = eventually(Duration::from_secs(10), "agent metrics", || {
        let log = agent_log.clone();
        async move { metrics_addr(&log) }
    })
    .await
    .unwrap();
    assert!(
        std::fs::read_to_string(&coordinator_log)
            .unwrap()
            .contains(&format!(
                "metrics listening on https://{coordinator_metrics}/metrics"
            )),
        "the coordinator serves its metrics over HTTPS"
    );
    // Nothing in the clear on the HTTPS port.
    assert!(http_get(&coordinator_metrics, "/metrics").await.is_err());
    // The agent's endpoint itself: the text format with HELP/TYPE lines.
    let text = http_get(&agent_metrics, "/metrics").await.unwrap();
    assert!(
        text.contains("# TYPE faultline_agent_bpf_status gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("faultline_agent_telemetry_drops_total{kind=\"batches\"} 0\n"),
        "{text}"
    );

    // A free port for Prometheus's own web listener.
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = format!("127.0.0.1:{prom_port}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let rules = deploy().join("prometheus/alerts.yml");
    let ca = cluster.certs.join("ca.pem");
    // The coordinator over HTTPS, verified with the fleet CA and a host name of its
    // certificate; a job expecting another name must fail (the verification is real).
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: ['{rules}']\n\
             scrape_configs:\n  - job_name: faultline-coordinator\n    scheme: https\n    \
             tls_config: {{ ca_file: '{ca}', server_name: localhost }}\n    static_configs:\n      \
             - targets: ['{coordinator_metrics}']\n  - job_name: faultline-agent\n    \
             static_configs:\n      - targets: ['{agent_metrics}']\n  \
             - job_name: wrong-server-name\n    scheme: https\n    \
             tls_config: {{ ca_file: '{ca}', server_name: not-the-coordinator }}\n    \
             static_configs:\n      - targets: ['{coordinator_metrics}']\n",
            rules = rules.display(),
            ca = ca.display(),
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .stdout(Stdio::null())
        .stderr(prom_log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log_text =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    eventually(
        Duration::from_secs(60),
        "both targets scraped (up == 1)",
        || {
            let prom = prom.clone();
            async move {
                let up = query(&prom, "up").await;
                let job = |labels: &Value| labels["job"].as_str().unwrap_or_default().to_string();
                let up_of = |name: &str| up.iter().find(|(l, _)| job(l) == name).map(|(_, v)| *v);
                (up.len() == 3
                    && up_of("faultline-coordinator") == Some(1.0)
                    && up_of("faultline-agent") == Some(1.0)
                    && up_of("wrong-server-name") == Some(0.0))
                .then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}\n{}", log_text()));

    // Its own shell execs a program five times a second, so the agent has exec events to count
    // whenever the run watches it. (Not `docker exec` from outside: an exec into a container
    // that the fault pauses hangs in Docker 20.10 and wedges the container's removal.)
    let target = TestContainer::start_with_command(
        "prom-db",
        &["/bin/sh", "-c", "while :; do /bin/sleep 0.2; done"],
    )
    .await
    .unwrap();
    let plan = cluster
        .write_plan(
            "pause.yaml",
            &format!(
                "apiVersion: faultline/v1
title: Scraped pause
lease: 3s
stages:
  - name: pause
    after: 3s
    faults:
      - kind: container-pause
        agent: agent-1
        target: {{ container: {} }}
        duration: 4s
",
                target.name
            ),
        )
        .unwrap();
    let run = {
        let (certs, url, plan) = (
            cluster.certs.clone(),
            cluster.url(),
            plan.to_str().unwrap().to_string(),
        );
        tokio::spawn(async move {
            faultline_integration_tests::cluster::cli_raw(&certs, &url, &["run", &plan, "--follow"])
                .await
        })
    };
    // While the fault is in force, both sides report it active.
    if let Err(err) = eventually(
        Duration::from_secs(20),
        "active fault seen by Prometheus",
        || {
            let prom = prom.clone();
            async move {
                let coordinator =
                    scalar(&prom, "faultline_faults_active{kind=\"container-pause\"}").await?;
                let agent = scalar(
                    &prom,
                    "faultline_agent_faults_active{kind=\"container-pause\"}",
                )
                .await?;
                let running = scalar(&prom, "faultline_runs_active").await?;
                (coordinator == 1.0 && agent == 1.0 && running == 1.0).then_some(())
            }
        },
    )
    .await
    {
        // Say what the run did, not only that the window was missed.
        let out = run.await.unwrap().unwrap();
        panic!(
            "{err}\nrun stdout:\n{}\nrun stderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // After the run, once scraped: the counters and histograms tell what happened.
    eventually(Duration::from_secs(20), "post-run series", || {
        let prom = prom.clone();
        async move {
            let completed = scalar(&prom, "faultline_runs_total{state=\"completed\"}").await?;
            let active = scalar(&prom, "faultline_faults_active{kind=\"container-pause\"}").await?;
            let agent_active = scalar(
                &prom,
                "faultline_agent_faults_active{kind=\"container-pause\"}",
            )
            .await?;
            let reverted = scalar(&prom, "faultline_reverts_total{reason=\"schedule\"}").await?;
            let agent_reverted =
                scalar(&prom, "faultline_agent_reverts_total{reason=\"schedule\"}").await?;
            (completed == 1.0
                && active == 0.0
                && agent_active == 0.0
                && reverted == 1.0
                && agent_reverted == 1.0)
                .then_some(())
        }
    })
    .await
    .unwrap();

    assert_eq!(scalar(&prom, "faultline_agents_connected").await, Some(1.0));
    assert_eq!(scalar(&prom, "faultline_runs_active").await, Some(0.0));
    assert_eq!(
        scalar(&prom, "faultline_commands_sent_total{action=\"apply\"}").await,
        Some(1.0)
    );
    // The 3 s lease is renewed every second over a 4 s fault.
    let renewals = scalar(&prom, "faultline_lease_renewals_total")
        .await
        .unwrap();
    assert!((2.0..=10.0).contains(&renewals), "renewals {renewals}");
    assert_eq!(
        scalar(&prom, "faultline_agent_lease_expiries_total").await,
        Some(0.0)
    );
    assert_eq!(
        scalar(
            &prom,
            "faultline_agent_applies_total{kind=\"container-pause\",outcome=\"applied\"}"
        )
        .await,
        Some(1.0)
    );
    for histogram in [
        "faultline_command_duration_seconds",
        "faultline_agent_apply_duration_seconds",
    ] {
        let count = scalar(
            &prom,
            &format!("{histogram}_count{{kind=\"container-pause\"}}"),
        )
        .await
        .unwrap();
        let sum = scalar(
            &prom,
            &format!("{histogram}_sum{{kind=\"container-pause\"}}"),
        )
        .await
        .unwrap();
        assert_eq!(count, 1.0, "{histogram}");
        assert!(
            sum > 0.0 && sum < 20.0,
            "{histogram}: one apply took {sum} s"
        );
    }
    // Telemetry: the run's batches went from the agent to the coordinator, none lost.
    eventually(Duration::from_secs(20), "telemetry batches counted", || {
        let prom = prom.clone();
        async move {
            let received = scalar(
                &prom,
                "faultline_telemetry_batches_received_total{agent=\"agent-1\"}",
            )
            .await?;
            let sent = scalar(&prom, "faultline_agent_telemetry_batches_total").await?;
            (received >= 3.0 && sent >= received).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(
        scalar(
            &prom,
            "faultline_telemetry_batches_lost_total{agent=\"agent-1\"}"
        )
        .await,
        Some(0.0)
    );
    assert_eq!(
        scalar(
            &prom,
            "faultline_agent_telemetry_drops_total{kind=\"batches\"}"
        )
        .await,
        Some(0.0)
    );
    assert_eq!(
        query(&prom, "faultline_agent_telemetry_drops_total")
            .await
            .len(),
        4
    );
    assert_eq!(
        query(&prom, "faultline_agent_telemetry_events_total")
            .await
            .len(),
        5
    );
    // Each telemetry group is collected by exactly one mechanism.
    let status = query(&prom, "sum by (group) (faultline_agent_bpf_status)").await;
    let groups: Vec<&str> = status
        .iter()
        .map(|(labels, _)| labels["group"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(status.len(), 5, "{status:?}");
    for group in ["tcp", "sched", "oom", "proc", "block"] {
        assert!(groups.contains(&group), "{status:?}");
    }
    assert!(status.iter().all(|(_, v)| *v == 1.0), "{status:?}");
    // Where process events come from eBPF, the target's execs during the run were seen.
    if scalar(
        &prom,
        "faultline_agent_bpf_status{group=\"proc\",mechanism=\"bpf\"}",
    )
    .await
        == Some(1.0)
    {
        eventually(Duration::from_secs(15), "exec events counted", || {
            let prom = prom.clone();
            async move {
                let execs = scalar(
                    &prom,
                    "faultline_agent_telemetry_events_total{kind=\"exec\"}",
                )
                .await?;
                (execs >= 1.0).then_some(())
            }
        })
        .await
        .unwrap();
    } else {
        eprintln!("process telemetry is not eBPF on this host: exec events not checked");
    }

    let jobs: Vec<String> = query(&prom, "faultline_agent_applies_total")
        .await
        .into_iter()
        .map(|(labels, _)| labels["job"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(jobs, ["faultline-agent"]);

    // deploy/prometheus/alerts.yml loaded into this Prometheus, none firing after a clean run.
    let rules: Value =
        serde_json::from_str(&http_get(&prom, "/api/v1/rules").await.unwrap()).unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(loaded.len() >= 5, "{rules:#}");
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "{rule:#}");
        assert_ne!(rule["state"], "firing", "{rule:#}");
    }
    // Every expression of deploy/grafana/faultline-gameday.json is valid PromQL over series
    // that exist (each returns a result here).
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/faultline-gameday.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            if expr.contains("halt") || expr.contains("histogram_quantile") {
                // No halt in this run; quantiles of a 5m rate may be NaN: just valid PromQL.
                continue;
            }
            let what = format!("dashboard panel {:?}: data for {expr}", panel["title"]);
            eventually(Duration::from_secs(10), &what, || {
                let prom = prom.clone();
                async move { (!query(&prom, expr).await.is_empty()).then_some(()) }
            })
            .await
            .unwrap();
        }
    }
}
