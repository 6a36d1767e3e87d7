//! The demo stack's order API (`faultline-order-api`) against a real PostgreSQL and a real
//! Redis: orders placed and listed, the read-through cache hit, bad input refused with nothing
//! written, Redis killed (still serving, degraded) and back, PostgreSQL stopped (prompt 503s)
//! and started again (recovered), Redis then PostgreSQL frozen with SIGSTOP (a partition: no
//! hang, prompt answers) and thawed, then the built-in load generator run against it.
//!
//! Runs the built binary (`target/<profile>/faultline-order-api`, built by `make test` or
//! `cargo build -p faultline-order-api`). Skips loudly only when the PostgreSQL or Redis
//! server binaries are not installed.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use faultline_integration_tests::cluster::bin;
use faultline_integration_tests::postgres::{PG_BIN_DIR, RealPostgres};
use faultline_integration_tests::redis::{REDIS_SERVER, RealRedis};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const BINARY: &str = "faultline-order-api";
/// Bound of one HTTP exchange of this test (the API's own bounds are far shorter).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_api_survives_its_backends() -> anyhow::Result<()> {
    for server in [format!("{PG_BIN_DIR}/initdb"), REDIS_SERVER.to_string()] {
        if !Path::new(&server).exists() {
            eprintln!(
                "\n!!!!!!!! SKIPPED: {server} is missing (apt-get install postgresql-15 \
                 redis-server); the order API is NOT tested !!!!!!!!\n"
            );
            return Ok(());
        }
    }
    let binary = bin(BINARY);
    ensure!(
        binary.exists(),
        "{} not found: build it first (`cargo build -p faultline-order-api`; `make test` does)",
        binary.display()
    );

    let pg = RealPostgres::start()?;
    let mut redis = RealRedis::start()?;
    let logs = tempfile::tempdir()?;
    let api_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let mut api = Service::spawn(
        &binary,
        &[
            "serve",
            "--listen",
            &api_addr.to_string(),
            "--database-url",
            &pg.url(),
            "--redis-url",
            &redis.url(),
        ],
        &logs.path().join("api.log"),
    )?;

    // Up, with both backends.
    let health = poll(Duration::from_secs(30), "API healthy", || async {
        let reply = http(api_addr, "GET", "/health", None).await?;
        ensure!(reply.status == 200, "{reply:?}");
        reply.json()
    })
    .await
    .with_context(|| api.log())?;
    assert_eq!(health["database"], "ok", "{health}");
    assert_eq!(health["cache"], "ok", "{health}");

    // Orders placed, on both route spellings.
    let mut placed = Vec::new();
    for (path, symbol, qty) in [
        ("/orders", "ACME", 1),
        ("/api/orders", "GLOBEX", 250),
        ("/api/orders", "X9", 1_000_000),
    ] {
        let reply = http(
            api_addr,
            "POST",
            path,
            Some(&format!(r#"{{"symbol":"{symbol}","qty":{qty}}}"#)),
        )
        .await?;
        assert_eq!(reply.status, 201, "{reply:?}");
        let order = reply.json()?;
        assert_eq!(order["symbol"], symbol, "{order}");
        assert_eq!(order["qty"], qty, "{order}");
        assert!(order["id"].as_i64().is_some_and(|id| id > 0), "{order}");
        assert!(
            order["created_at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        placed.push(order);
    }

    // Listed twice: the first reads the database, the second is served from Redis.
    let first = http(api_addr, "GET", "/api/orders", None).await?;
    let second = http(api_addr, "GET", "/orders", None).await?;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(first.header("x-cache"), Some("miss"), "{first:?}");
    assert_eq!(second.header("x-cache"), Some("hit"), "{second:?}");
    assert_eq!(first.json()?, second.json()?);
    let listed = first.json()?;
    let newest_first: Vec<Value> = placed.iter().rev().cloned().collect();
    assert_eq!(listed, Value::Array(newest_first), "newest first");
    let metrics = http(api_addr, "GET", "/metrics", None).await?.body;
    assert!(
        metric(&metrics, "order_api_cache_hits_total") >= Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "order_api_cache_misses_total") >= Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            r#"order_api_http_requests_total{route="/api/orders",method="POST",status="201"}"#
        ) == Some(2.0),
        "{metrics}"
    );

    // One order by id; unknown ones are 404.
    let id = placed[0]["id"].as_i64().context("id")?;
    let one = http(api_addr, "GET", &format!("/api/orders/{id}"), None).await?;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.json()?, placed[0]);
    for path in ["/orders/999999999", "/orders/abc", "/api/orders/0"] {
        let reply = http(api_addr, "GET", path, None).await?;
        assert_eq!(reply.status, 404, "{path}: {reply:?}");
    }

    // Bad input: 400 with a JSON error, and nothing written.
    for body in [
        r#"{"symbol":"acme","qty":1}"#,
        r#"{"symbol":"TOOLONGSYMBOL1","qty":1}"#,
        r#"{"symbol":"ACME","qty":0}"#,
        r#"{"symbol":"ACME","qty":1000001}"#,
        r#"{"symbol":"ACME"}"#,
        r#"{"symbol":"ACME","qty":"1"}"#,
        "not json",
        "",
    ] {
        let reply = http(api_addr, "POST", "/api/orders", Some(body)).await?;
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        let error = reply.json()?;
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
    }
    assert_eq!(pg.psql("SELECT count(*) FROM orders")?, "3");

    // Redis killed: orders still placed and listed (from the database), health degraded.
    redis.kill();
    let start = Instant::now();
    let reply = http(
        api_addr,
        "POST",
        "/orders",
        Some(r#"{"symbol":"NOCACHE","qty":7}"#),
    )
    .await?;
    assert_eq!(reply.status, 201, "{reply:?}");
    let list = http(api_addr, "GET", "/api/orders", None).await?;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.header("x-cache"), Some("bypass"), "{list:?}");
    assert_eq!(list.json()?[0]["symbol"], "NOCACHE");
    let health = http(api_addr, "GET", "/health", None).await?;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json()?["cache"], "down");
    assert_eq!(health.json()?["database"], "ok");
    // Three requests, each bounded by the cache's 300 ms on top of the database work.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "degraded requests took {:?}",
        start.elapsed()
    );
    let metrics = http(api_addr, "GET", "/metrics", None).await?.body;
    assert!(
        metric(&metrics, "order_api_cache_errors_total") >= Some(2.0),
        "{metrics}"
    );

    // Redis back (empty): the API reconnects on its own.
    redis.restart()?;
    poll(Duration::from_secs(15), "cache used again", || async {
        let list = http(api_addr, "GET", "/api/orders", None).await?;
        ensure!(list.status == 200, "{list:?}");
        ensure!(list.header("x-cache") != Some("bypass"), "{list:?}");
        let health = http(api_addr, "GET", "/health", None).await?.json()?;
        ensure!(health["cache"] == "ok", "{health}");
        Ok(())
    })
    .await
    .with_context(|| api.log())?;

    // PostgreSQL stopped: health 503, orders refused promptly with 503.
    stop_postgres(&pg)?;
    poll(
        Duration::from_secs(10),
        "health reports the database down",
        || async {
            let reply = http(api_addr, "GET", "/health", None).await?;
            ensure!(reply.status == 503, "{reply:?}");
            ensure!(reply.json()?["database"] == "down", "{reply:?}");
            Ok(())
        },
    )
    .await
    .with_context(|| api.log())?;
    let start = Instant::now();
    let reply = http(
        api_addr,
        "POST",
        "/api/orders",
        Some(r#"{"symbol":"DOWN","qty":1}"#),
    )
    .await?;
    let took = start.elapsed();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.json()?["error"], "database unavailable");
    assert!(took < Duration::from_secs(3), "503 took {took:?}");
    let start = Instant::now();
    let reply = http(api_addr, "GET", &format!("/orders/{id}"), None).await?;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    let metrics = http(api_addr, "GET", "/metrics", None).await?.body;
    assert!(
        metric(&metrics, "order_api_db_errors_total") >= Some(2.0),
        "{metrics}"
    );

    // PostgreSQL started again (same data, same port): the API recovers by itself.
    let restarted = start_postgres(&pg)?;
    poll(Duration::from_secs(30), "API healthy again", || async {
        let reply = http(api_addr, "GET", "/health", None).await?;
        ensure!(reply.status == 200, "{reply:?}");
        Ok(())
    })
    .await
    .with_context(|| format!("{}\n{}", api.log(), pg.log()))?;
    let reply = http(
        api_addr,
        "POST",
        "/orders",
        Some(r#"{"symbol":"BACK","qty":3}"#),
    )
    .await?;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(pg.psql("SELECT count(*) FROM orders")?, "5");

    // Redis frozen (SIGSTOP: the process holds its connections but never answers, as behind
    // a network partition): requests still answer promptly, the cache bypassed.
    let redis_pid = Pid::from_raw(redis.pid().context("redis not running")? as i32);
    let frozen = Frozen::stop(vec![redis_pid])?;
    let start = Instant::now();
    let list = http(api_addr, "GET", "/api/orders", None).await?;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.header("x-cache"), Some("bypass"), "{list:?}");
    let reply = http(
        api_addr,
        "POST",
        "/orders",
        Some(r#"{"symbol":"FROZEN","qty":2}"#),
    )
    .await?;
    assert_eq!(reply.status, 201, "{reply:?}");
    let health = http(api_addr, "GET", "/health", None).await?;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json()?["cache"], "down", "{health:?}");
    // Each of the three is bounded by 300 ms of Redis plus quick database work.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "requests with Redis frozen took {:?}",
        start.elapsed()
    );
    drop(frozen);
    poll(
        Duration::from_secs(15),
        "cache used again after the freeze",
        || async {
            let health = http(api_addr, "GET", "/health", None).await?.json()?;
            ensure!(health["cache"] == "ok", "{health}");
            Ok(())
        },
    )
    .await
    .with_context(|| api.log())?;

    // PostgreSQL frozen (every server process SIGSTOPped): prompt 503s from the 1 s health
    // check and the 2 s operation bound, never a hang; and recovery once it thaws.
    let frozen = Frozen::stop(process_tree(Pid::from_raw(restarted.child.id() as i32)))?;
    let start = Instant::now();
    let health = http(api_addr, "GET", "/health", None).await?;
    assert_eq!(health.status, 503, "{health:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "health took {:?}",
        start.elapsed()
    );
    let start = Instant::now();
    let reply = http(
        api_addr,
        "POST",
        "/orders",
        Some(r#"{"symbol":"HUNG","qty":1}"#),
    )
    .await?;
    let took = start.elapsed();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(took < Duration::from_secs(3), "503 took {took:?}");
    drop(frozen);
    poll(
        Duration::from_secs(30),
        "API healthy after the freeze",
        || async {
            let reply = http(api_addr, "GET", "/health", None).await?;
            ensure!(reply.status == 200, "{reply:?}");
            let reply = http(
                api_addr,
                "POST",
                "/orders",
                Some(r#"{"symbol":"THAWED","qty":1}"#),
            )
            .await?;
            ensure!(reply.status == 201, "{reply:?}");
            Ok(())
        },
    )
    .await
    .with_context(|| api.log())?;
    let placed_so_far: i64 = pg.psql("SELECT count(*) FROM orders")?.parse()?;

    // The load generator against it: answered requests show up in its metrics.
    let load_metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let mut load = Service::spawn(
        &binary,
        &[
            "load",
            "--target",
            &format!("http://{api_addr}/api/orders"),
            "--rate",
            "20",
            "--metrics-listen",
            &load_metrics.to_string(),
        ],
        &logs.path().join("load.log"),
    )?;
    let text = poll(
        Duration::from_secs(20),
        "load generator succeeding",
        || async {
            let text = http(load_metrics, "GET", "/metrics", None).await?.body;
            for kind in ["post", "get"] {
                let ok = metric(
                    &text,
                    &format!(r#"order_load_requests_total{{kind="{kind}",outcome="ok"}}"#),
                );
                ensure!(ok > Some(0.0), "no ok {kind} yet:\n{text}");
            }
            Ok(text)
        },
    )
    .await
    .with_context(|| load.log())?;
    assert!(
        metric(
            &text,
            r#"order_load_request_duration_seconds_count{kind="get"}"#
        ) > Some(0.0),
        "{text}"
    );
    load.terminate(Duration::from_secs(5)).await?;
    let placed_total: i64 = pg.psql("SELECT count(*) FROM orders")?.parse()?;
    assert!(
        placed_total > placed_so_far,
        "the load generator placed no order"
    );

    // SIGTERM: a clean exit.
    api.terminate(Duration::from_secs(10)).await?;
    drop(restarted);
    Ok(())
}

/// A child process of this test, killed on drop, with its output in a log file.
struct Service {
    child: Child,
    log: std::path::PathBuf,
}

impl Service {
    fn spawn(binary: &Path, args: &[&str], log: &Path) -> anyhow::Result<Service> {
        let file = std::fs::File::create(log).context("service log")?;
        let child = Command::new(binary)
            .args(args)
            .env("RUST_LOG", "info,faultline_order_api=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Service {
            child,
            log: log.to_path_buf(),
        })
    }

    fn log(&self) -> String {
        format!(
            "--- {} ---\n{}",
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// SIGTERM, then expects a successful exit within `within`.
    async fn terminate(&mut self, within: Duration) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("no exit {within:?} after SIGTERM\n{}", self.log()))??;
        ensure!(status.success(), "exited with {status}\n{}", self.log());
        Ok(())
    }
}

/// A postgres server process started by this test, stopped (fast shutdown) on drop, before
/// the [`RealPostgres`] that owns its directory.
struct Postmaster {
    child: std::process::Child,
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops `pg`'s server (SIGINT: fast shutdown, clients disconnected) and waits until it is
/// gone. [`RealPostgres`] has no stop of its own that keeps the data; it reaps its child
/// itself when dropped.
fn stop_postgres(pg: &RealPostgres) -> anyhow::Result<()> {
    let pid_file = pg.data_dir.join("postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .lines()
        .next()
        .context("empty postmaster.pid")?
        .trim()
        .parse()
        .context("postmaster.pid")?;
    kill(Pid::from_raw(pid), Signal::SIGINT)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    // The postmaster removes its pid file last, once every backend has exited.
    while pid_file.exists() {
        if Instant::now() > deadline {
            bail!("PostgreSQL still running 15 s after SIGINT: {}", pg.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts a server again on `pg`'s data directory and port, as the `postgres` user, and
/// waits until it accepts queries.
fn start_postgres(pg: &RealPostgres) -> anyhow::Result<Postmaster> {
    let user = User::from_name("postgres")?.context("no postgres user")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pg.dir().join("postgres-restarted.log"))
        .context("restart log")?;
    let child = std::process::Command::new(Path::new(PG_BIN_DIR).join("postgres"))
        .arg("-D")
        .arg(&pg.data_dir)
        .arg("-k")
        .arg(pg.dir())
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-p",
            &pg.port.to_string(),
        ])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("restarting postgres")?;
    let mut postmaster = Postmaster { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pg.psql("SELECT 1") {
            Ok(_) => return Ok(postmaster),
            Err(e) if Instant::now() > deadline => {
                bail!("PostgreSQL did not come back: {e:#}")
            }
            Err(_) => {
                if let Ok(Some(status)) = postmaster.child.try_wait() {
                    bail!("restarted postgres exited with {status}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Processes held with SIGSTOP, resumed (SIGCONT) on drop, so that a failing assertion never
/// leaves a frozen server behind (SIGINT does not reach a stopped process).
struct Frozen(Vec<Pid>);

impl Frozen {
    fn stop(pids: Vec<Pid>) -> anyhow::Result<Frozen> {
        let frozen = Frozen(pids);
        for pid in &frozen.0 {
            kill(*pid, Signal::SIGSTOP).with_context(|| format!("SIGSTOP {pid}"))?;
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(*pid, Signal::SIGCONT);
        }
    }
}

/// `root` and its children (a postmaster's backends and auxiliary processes), from /proc.
fn process_tree(root: Pid) -> Vec<Pid> {
    let mut pids = vec![root];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // The parent is the second field after the parenthesised command name.
        let parent = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<i32>().ok()
            });
        if parent == Some(root.as_raw()) {
            pids.push(Pid::from_raw(pid));
        }
    }
    pids
}

/// Retries `check` until it succeeds or `within` has passed (then fails with its last error).
async fn poll<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not within {within:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One HTTP/1.1 answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {:?}", self.body))
    }
}

/// A minimal HTTP/1.1 client (one request per connection): the test crate has no HTTP client
/// dependency, and this keeps every exchange under [`HTTP_TIMEOUT`].
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<Reply> {
    tokio::time::timeout(HTTP_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_reply(&raw)
    })
    .await
    .with_context(|| format!("{method} {path}: no answer within {HTTP_TIMEOUT:?}"))?
    .with_context(|| format!("{method} {path}"))
}

fn parse_reply(raw: &[u8]) -> anyhow::Result<Reply> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .context("no status line")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(body)?,
    })
}

fn dechunk(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size")?;
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..end])?.trim(), 16)?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).context("short chunk")?);
        rest = rest.get(size + 2..).context("chunk end")?;
    }
}

/// The value of the series `name` (with its labels exactly as rendered, if any).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
