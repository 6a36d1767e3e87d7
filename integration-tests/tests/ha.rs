#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! High availability against a real PostgreSQL (Debian `postgresql-15`, started per test by
//! [`RealPostgres`]): the PostgreSQL store keeps the SQLite store's semantics; replicas elect
//! one active coordinator through an advisory lock; killing the active one mid-run lets the
//! standby take over, the agent (configured with both addresses) reconnect to it, the lease
//! revert the fault, and the run end as *aborted* with the failover reason. Killing a standby
//! changes nothing; an active replica that loses its lock session stops (fail-stop).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use faultline_coordinator::store::{Store, conformance};
use faultline_coordinator::{REASON_FAILOVER, leader};
use faultline_integration_tests::cluster::{Proc, bin, cli_raw, eventually};
use faultline_integration_tests::docker::TestContainer;
use faultline_integration_tests::postgres::RealPostgres;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

const RUST_LOG: &str = "info,h2=warn,tower=warn,hyper=warn";

/// Upper bound for a standby to become active after the active replica died: the lock is
/// released when PostgreSQL sees the dead session, the standby polls every 500 ms.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

async fn start_postgres() -> RealPostgres {
    tokio::task::spawn_blocking(RealPostgres::start)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_sqlite_semantics() {
    let pg = start_postgres().await;
    // Two replicas opening at once: the migration runs once (advisory transaction lock).
    let url = pg.url();
    let (first, second) = tokio::join!(Store::open_postgres(&url), Store::open_postgres(&url));
    let store = first.unwrap();
    let other = second.unwrap();
    assert!(store.is_postgres());
    assert_eq!(
        pg.psql("SELECT count(*) FROM faultline_schema").unwrap(),
        "1"
    );

    // Everything the SQLite store promises, on this backend, across two connections.
    conformance::check_semantics(&store, &other).await;

    // Reopening migrates nothing and sees everything.
    drop((store, other));
    let reopened = Store::open_postgres(&pg.url()).await.unwrap();
    assert_eq!(reopened.list_runs(10).await.unwrap().len(), 2);
    assert_eq!(
        pg.psql("SELECT count(*) FROM faultline_schema").unwrap(),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_the_leader_lock_and_loses_it_with_its_session() {
    let pg = start_postgres().await;
    let url = pg.url();
    let first = leader::acquire(&url, |_| panic!("the first replica is never standby"))
        .await
        .unwrap();

    // A second replica waits as standby while the first holds the lock.
    let (standby_tx, mut standby_rx) = watch::channel(false);
    let second_url = url.clone();
    let second = tokio::spawn(async move {
        leader::acquire(&second_url, move |_| {
            let _ = standby_tx.send(true);
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), standby_rx.wait_for(|s| *s))
        .await
        .expect("second replica reports standby")
        .unwrap();
    assert!(!second.is_finished(), "two replicas hold the lock");

    // Dropping the holder's session releases the lock: the standby takes over.
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("standby takes over within 10 s")
        .unwrap()
        .unwrap();

    // The holder notices at once when its session is killed under it.
    let terminated = pg
        .psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted \
             AND ((classid::bigint << 32) | objid::bigint) = {}",
            leader::LOCK_KEY
        ))
        .unwrap();
    assert_eq!(terminated, "1");
    let reason = tokio::time::timeout(Duration::from_secs(10), second.lost())
        .await
        .expect("lost leadership noticed within 10 s");
    assert!(reason.contains("leader"), "{reason}");
}

/// A coordinator replica process; `active` holds the moment it printed its listening line
/// (only the active replica listens).
struct Replica {
    proc: Proc,
    port: u16,
    log: PathBuf,
    active: watch::Receiver<Option<Instant>>,
}

impl Replica {
    async fn start(dir: &Path, certs: &Path, db: &str, name: &str, port: u16) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let coordinator = bin("faultline-coordinator");
        assert!(coordinator.exists(), "build the binaries first");
        let mut child = Command::new(coordinator)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--db", db])
            .args(["--metrics-listen", "off"])
            .arg("--certs")
            .arg(certs)
            .env("RUST_LOG", RUST_LOG)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (active_tx, active) = watch::channel(None);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("listening on") {
                    let _ = active_tx.send(Some(Instant::now()));
                }
            }
        });
        Replica {
            proc: Proc::from_child(name, child),
            port,
            log,
            active,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_active(&self) -> bool {
        self.active.borrow().is_some()
    }

    /// Waits until the replica listens; returns when it started to.
    async fn wait_active(&mut self, timeout: Duration) -> Instant {
        let waited = tokio::time::timeout(timeout, self.active.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|seen| seen.ok().and_then(|at| *at));
        match waited {
            Some(at) => at,
            None => panic!(
                "{} not active after {timeout:?}; log:\n{}",
                self.proc.name,
                self.log()
            ),
        }
    }

    async fn wait_standby(&self) {
        eventually(Duration::from_secs(20), "replica standby", || async {
            self.log().contains("standby").then_some(())
        })
        .await
        .unwrap_or_else(|err| panic!("{err}; log:\n{}", self.log()));
        assert!(!self.is_active(), "a standby must not listen");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "standby {} accepts connections",
            self.proc.name
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn cli_json(certs: &Path, url: &str, args: &[&str]) -> anyhow::Result<Value> {
    let out = cli_raw(certs, url, args).await?;
    anyhow::ensure!(
        out.status.success(),
        "faultline {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The agent's row in `agents list` through `url`, once it is connected there.
async fn connected_agent(certs: &Path, url: &str, name: &str) -> Option<Value> {
    let agents = cli_json(certs, url, &["agents", "list", "--output", "json"])
        .await
        .ok()?;
    agents
        .as_array()?
        .iter()
        .find(|a| a["name"] == name && a["connected"] == true)
        .cloned()
}

fn pause_plan(agent: &str, container: &str, duration: &str) -> String {
    format!(
        "apiVersion: faultline/v1
title: Pause {container} on {agent}
lease: 3s
stages:
  - name: pause
    faults:
      - kind: container-pause
        agent: {agent}
        target: {{ container: {container} }}
        duration: {duration}
"
    )
}

async fn start_run(dir: &Path, certs: &Path, url: &str, yaml: &str) -> String {
    let plan = dir.join(format!("plan-{}.yaml", free_port()));
    std::fs::write(&plan, yaml).unwrap();
    let out = cli_raw(certs, url, &["run", plan.to_str().unwrap()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "run <ID> started: <title>"
    stdout.split_whitespace().nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_coordinator_mid_run_fails_over_and_aborts_the_run() {
    let pg = start_postgres().await;
    let db = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = cli_raw(
        &certs,
        "https://127.0.0.1:1",
        &[
            "certs",
            "init",
            "--dir",
            certs.to_str().unwrap(),
            "--agents",
            "agent-1",
        ],
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Two replicas, same certificates and database, different ports: exactly one active.
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Replica::start(dir.path(), &certs, &db, "coordinator-a", port_a).await;
    a.wait_active(Duration::from_secs(30)).await;
    let mut b = Replica::start(dir.path(), &certs, &db, "coordinator-b", port_b).await;
    b.wait_standby().await;

    // The agent knows both addresses, the standby's first: it skips the one not listening.
    let agent_log = dir.path().join("agent-1.log");
    let agent = Command::new(bin("faultline-agent"))
        .args(["--coordinator", &format!("{},{}", b.url(), a.url())])
        .args(["--name", "agent-1", "--metrics-listen", "off"])
        .arg("--certs")
        .arg(&certs)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", RUST_LOG)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut agent = Proc::from_child("agent-1", agent);
    let read_agent_log = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    let a_url = a.url();
    eventually(Duration::from_secs(30), "agent connected to A", || {
        connected_agent(&certs, &a_url, "agent-1")
    })
    .await
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", read_agent_log()));
    assert!(
        read_agent_log().contains(&format!("connected to coordinator {}", a.url())),
        "{}",
        read_agent_log()
    );

    // Killing the standby changes nothing: A serves on, the agent stays connected.
    b.proc.kill9().await;
    assert!(a.proc.try_exit_status().is_none(), "A stopped with B");
    let row = connected_agent(&certs, &a.url(), "agent-1").await;
    assert!(row.is_some(), "agent dropped when the standby died");
    let mut b = Replica::start(dir.path(), &certs, &db, "coordinator-b2", port_b).await;
    b.wait_standby().await;

    // A long pause with a 3 s lease, applied through A.
    let target = TestContainer::start("fl-ha").await.unwrap();
    let run_id = start_run(
        dir.path(),
        &certs,
        &a.url(),
        &pause_plan("agent-1", &target.name, "60s"),
    )
    .await;
    target
        .wait_for_state("paused", Duration::from_secs(20))
        .await
        .unwrap();

    // SIGKILL the active coordinator mid-run.
    a.proc.kill9().await;
    let killed = Instant::now();

    // The lease reverts the fault long before its scheduled end (60 s).
    eventually(
        Duration::from_secs(10),
        "container unpaused by the lease",
        || async { (target.state().await.ok()? == "running").then_some(()) },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", read_agent_log()));
    let unpaused = killed.elapsed();

    // The standby takes over within the bound, and the agent reconnects to it.
    let active_at = b
        .wait_active(TAKEOVER_BOUND.saturating_sub(killed.elapsed()))
        .await;
    let took_over = active_at.saturating_duration_since(killed);
    assert!(took_over <= TAKEOVER_BOUND, "{took_over:?}");
    let b_url = b.url();
    let row = eventually(Duration::from_secs(20), "agent connected to B", || async {
        let row = connected_agent(&certs, &b_url, "agent-1").await?;
        (row["active_faults"] == 0).then_some(row)
    })
    .await
    .unwrap_or_else(|err| {
        panic!(
            "{err}; agent log:\n{}\nB log:\n{}",
            read_agent_log(),
            b.log()
        )
    });
    assert_eq!(row["active_faults"], 0, "{row}");
    assert!(
        read_agent_log().contains(&format!("connected to coordinator {}", b.url())),
        "{}",
        read_agent_log()
    );
    assert!(b.log().contains("became active"), "{}", b.log());

    // The run of the dead active coordinator is recorded as aborted, with the reason. Asked
    // with both replicas' URLs, the dead one first, the CLI finds the active one.
    let run = cli_json(
        &certs,
        &format!("{a_url},{b_url}"),
        &["runs", "show", &run_id, "--output", "json"],
    )
    .await
    .unwrap();
    assert_eq!(run["state"], "aborted", "{run:#}");
    assert_eq!(run["reason"], REASON_FAILOVER, "{run:#}");
    let events = run["events"].as_array().cloned().unwrap_or_default();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "run-aborted" && e["message"] == REASON_FAILOVER),
        "{run:#}"
    );
    // The agent's report of the lease revert, kept while it was disconnected, reaches the
    // new active replica and lands in the aborted run's timeline.
    eventually(
        Duration::from_secs(10),
        "late revert in the timeline",
        || async {
            let run = cli_json(
                &certs,
                &b_url,
                &["runs", "show", &run_id, "--output", "json"],
            )
            .await
            .ok()?;
            run["events"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["kind"] == "fault-reverted"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("lease-expired"))
                })
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(target.state().await.unwrap(), "running");
    eprintln!("failover: unpaused after {unpaused:?}, standby active after {took_over:?}");

    // The new active coordinator runs plans through the reconnected agent.
    let second = start_run(
        dir.path(),
        &certs,
        &b.url(),
        &pause_plan("agent-1", &target.name, "1s"),
    )
    .await;
    let done = eventually(Duration::from_secs(30), "second run finished", || async {
        let run = cli_json(
            &certs,
            &b_url,
            &["runs", "show", &second, "--output", "json"],
        )
        .await
        .ok()?;
        (run["state"] != "running").then_some(run)
    })
    .await
    .unwrap();
    assert_eq!(done["state"], "completed", "{done:#}");

    // Fail-stop: the active replica whose lock session dies stops serving, non-zero.
    pg.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
         AND ((classid::bigint << 32) | objid::bigint) = {}",
        leader::LOCK_KEY
    ))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = b.proc.try_exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "B still serving; log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status:?}");
    assert!(b.log().contains("leader lock lost"), "{}", b.log());

    agent.terminate(Duration::from_secs(10)).await;
}
