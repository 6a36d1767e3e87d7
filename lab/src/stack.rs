//! The demo stack on the lab fleet: the trading system the plans in `examples/game-day/` break,
//! as containers on the lab network, under the names those plans use as they are.
//!
//! | container          | plan host | what                                                     |
//! |--------------------|-----------|----------------------------------------------------------|
//! | `postgres`         | agent-2   | PostgreSQL 15, database and user `orders`, port 5432     |
//! | `redis`            | agent-3   | Redis, port 6379, no persistence                         |
//! | `trading-api`      | agent-1   | `faultline-order-api serve` on 8080: `/health`, `/orders`, |
//! |                    |           | `/api/orders`, `/metrics`                                |
//! | `nginx`            | agent-3   | nginx on 80, proxying to `trading-api:8080`              |
//! | `market-simulator` | agent-2   | `faultline-order-api load`: 10 orders/s through nginx    |
//!
//! Every agent host of the lab shares this machine's Docker Engine, so any of them could act on
//! any container; the plan host is recorded as the label `faultline.lab.host` (and shown by
//! `lab status`) so that the fleet reads like the staging fleet the plans were written for.
//! With fewer agents than three, services are dealt out over the agents there are.
//!
//! **Images.** Nothing can be pulled, so each image is assembled `FROM scratch` out of this
//! machine's own files ([`crate::image::ImageSpec`]): the server binaries from the Debian
//! packages (`postgresql-15`, `redis-server`, `nginx`) and the order API built next to the
//! other Faultline binaries, each with the shared libraries `ldd` lists, plus what the server
//! needs at run time and nothing else — for PostgreSQL `initdb`, `pg_isready`, its share
//! directory and loadable modules (not the JIT, which would drag in LLVM), the UTC zone file,
//! `/bin/sh` for its entrypoint script and `/etc/passwd`/`/etc/group` entries so that it runs
//! as the non-root `postgres` user; for nginx a generated configuration. An image's tag is a
//! fingerprint of that content, so an upgraded package or a rebuilt order API gets a new image
//! and an unchanged one is reused. Images and containers carry the lab's label
//! ([`fleet::LABEL`]), so `lab down` removes them with the fleet.
//!
//! [`up`] starts what is not running, in dependency order, each service checked healthy before
//! the next starts, and fails naming the service that did not come up with its last log lines.
//! Same-named containers that are not the lab's are never touched: [`fleet::up`] refuses to
//! start at all when one exists.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fleet::{self, LabContainer};
use crate::image::ImageSpec;
use crate::{LabError, docker};

/// The order API binary, looked for next to the other Faultline binaries.
pub const ORDER_API_BIN: &str = "faultline-order-api";
/// The label naming the plan host a stack container stands on.
pub const HOST_LABEL: &str = "faultline.lab.host";
/// The trading API as the other containers (and the plans) reach it.
pub const API_URL: &str = "http://trading-api:8080";
/// How long [`up`] waits for the whole stack to be healthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound of one health check's network round trip.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Log lines quoted when a service does not come up.
const LOG_LINES: &str = "15";

/// PostgreSQL's files, from the Debian package.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_LIB: &str = "/usr/lib/postgresql/15/lib";
const PG_SHARE: &str = "/usr/share/postgresql/15";
/// The ids of the non-root users inside the images (any free id will do in an image of our own).
const SERVICE_UID: u32 = 999;
/// Where the order API lives in its image.
const ORDER_API_PATH: &str = "/usr/local/bin/faultline-order-api";

/// One service of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// Its container name, which is also its name on the lab network.
    pub name: &'static str,
    /// Its plan host: index into the fleet's agents (0 is `agent-1`).
    host_index: usize,
}

/// The services in the order they start: each one's dependencies before it.
pub const SERVICES: [Service; 5] = [
    Service {
        name: "postgres",
        host_index: 1,
    },
    Service {
        name: "redis",
        host_index: 2,
    },
    Service {
        name: "trading-api",
        host_index: 0,
    },
    Service {
        name: "nginx",
        host_index: 2,
    },
    Service {
        name: "market-simulator",
        host_index: 1,
    },
];

/// Whether `name` is a container of the stack.
pub fn is_stack_container(name: &str) -> bool {
    SERVICES.iter().any(|service| service.name == name)
}

/// The agent `service` stands on in a fleet of `agents`: its plan host (`agent-2` for
/// postgres) when the fleet has the default three, else dealt out over the agents there are.
pub fn host_of(service: &Service, agents: &[String]) -> String {
    if agents.is_empty() {
        return String::new();
    }
    agents[service.host_index % agents.len()].clone()
}

/// The order API binary in `bin_dir`, or an error saying how to build it.
pub fn order_api_binary(bin_dir: &Path) -> Result<PathBuf, LabError> {
    let path = bin_dir.join(ORDER_API_BIN);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::MissingBinary {
            path,
            hint: "the lab's demo stack runs it: build it with `cargo build --workspace --bins` \
                   (or `make demo`), or pass --no-stack for a fleet without the stack"
                .into(),
        })
    }
}

/// The Debian server binaries the stack needs, or an error naming the missing packages.
pub fn check_host_packages() -> Result<(), LabError> {
    let needed = [
        (format!("{PG_BIN}/postgres"), "postgresql-15"),
        (format!("{PG_BIN}/initdb"), "postgresql-15"),
        (format!("{PG_BIN}/pg_isready"), "postgresql-client-15"),
        ("/usr/bin/redis-server".to_string(), "redis-server"),
        ("/usr/sbin/nginx".to_string(), "nginx"),
        ("/bin/sh".to_string(), "dash"),
    ];
    for (path, package) in needed {
        if !Path::new(&path).is_file() {
            return Err(LabError::MissingBinary {
                path: PathBuf::from(path),
                hint: format!(
                    "the lab's demo stack is built from this machine's Debian packages: \
                     apt-get install {package} (or pass --no-stack)"
                ),
            });
        }
    }
    Ok(())
}

/// Starts the stack's containers that are not running (in dependency order, each healthy
/// before the next starts) and returns them as they are now.
///
/// The caller has checked that no same-named container other than the lab's exists
/// ([`fleet::up`] does), and that the network exists.
pub async fn up(bin_dir: &Path, agents: &[String]) -> Result<Vec<LabContainer>, LabError> {
    check_host_packages()?;
    let order_api = order_api_binary(bin_dir)?;
    let postgres_image = postgres_image()?.ensure("faultline-lab-postgres").await?;
    let redis_image = redis_image().ensure("faultline-lab-redis").await?;
    let nginx_image = nginx_image().ensure("faultline-lab-nginx").await?;
    let api_image = order_api_image(&order_api)
        .ensure("faultline-lab-order-api")
        .await?;

    let deadline = Instant::now() + HEALTH_TIMEOUT;
    let mut containers = Vec::new();
    for service in &SERVICES {
        let host = host_of(service, agents);
        let host_label = format!("{HOST_LABEL}={host}");
        let (image, mut args): (&str, Vec<&str>) = match service.name {
            "postgres" => (&postgres_image, vec![]),
            "redis" => (&redis_image, vec![]),
            "nginx" => (&nginx_image, vec![]),
            "trading-api" => (
                &api_image,
                vec![
                    "--env",
                    "DATABASE_URL=postgres://orders@postgres:5432/orders",
                    "--env",
                    "REDIS_URL=redis://redis:6379",
                    "--env",
                    "ORDER_API_LISTEN=0.0.0.0:8080",
                ],
            ),
            _ => (
                &api_image,
                vec![
                    "--env",
                    "LOAD_TARGET=http://nginx/api/orders",
                    "--env",
                    "LOAD_RATE=10",
                    "--env",
                    "LOAD_METRICS_LISTEN=0.0.0.0:9100",
                ],
            ),
        };
        args.extend(["--hostname", service.name, image]);
        if service.name == "market-simulator" {
            args.extend([ORDER_API_PATH, "load"]);
        }
        fleet::ensure_container(service.name, service.name, image, &args, &[&host_label]).await?;
        wait_healthy(service, deadline).await?;
        let mut container = fleet::inspect(service.name, service.name).await?;
        container.host = host;
        containers.push(container);
    }
    Ok(containers)
}

/// Waits until `service` passes its check, failing early when its container has stopped.
async fn wait_healthy(service: &Service, deadline: Instant) -> Result<(), LabError> {
    let started = Instant::now();
    loop {
        let state = docker::state(service.name).await?;
        let detail = if state == "running" {
            match check(service).await {
                Ok(()) => return Ok(()),
                Err(detail) => detail,
            }
        } else {
            format!("its container is {state}")
        };
        // A container that is not running will not get better by waiting (no restart policy:
        // faults must not be undone behind the agents' backs).
        if state != "running" || Instant::now() >= deadline {
            return Err(LabError::Unhealthy {
                service: service.name.to_string(),
                detail,
                // Whole seconds: the message is for a person.
                after: Duration::from_secs(started.elapsed().as_secs()),
                logs: last_logs(service.name).await,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A container's last log lines, both streams: `docker logs` prints the container's stderr on
/// its own stderr, which [`docker::run`] drops on success, and most servers log there.
pub async fn last_logs(name: &str) -> String {
    let output = tokio::process::Command::new("docker")
        .args(["logs", "--tail", LOG_LINES, name])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(docker::CALL_TIMEOUT, output).await {
        Ok(Ok(output)) => format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .trim_end()
        .to_string(),
        Ok(Err(err)) => format!("(no logs: {err})"),
        Err(_) => "(no logs: docker logs timed out)".to_string(),
    }
}

/// One health check of `service`, from this machine (which reaches the lab network's
/// addresses directly); `Err` says what it saw.
async fn check(service: &Service) -> Result<(), String> {
    let address = fleet::inspect(service.name, service.name)
        .await
        .map_err(|err| err.to_string())?
        .address;
    if address.is_empty() {
        return Err("no address on the lab network yet".into());
    }
    match service.name {
        // The same check the plans' `db-ready` command probe makes.
        "postgres" => docker::run(&["exec", "postgres", "pg_isready", "-q"])
            .await
            .map(drop)
            .map_err(|err| format!("pg_isready: {err}")),
        "redis" => redis_ping(&address).await,
        "trading-api" => http_status(&address, 8080, "/health").await,
        // Through the proxy: nginx up *and* routing to the API.
        "nginx" => http_status(&address, 80, "/health").await,
        _ => tcp_connect(&address, 9100).await.map(drop),
    }
}

async fn tcp_connect(address: &str, port: u16) -> Result<TcpStream, String> {
    match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect((address, port))).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(err)) => Err(format!("connecting to {address}:{port}: {err}")),
        Err(_) => Err(format!("connecting to {address}:{port}: timed out")),
    }
}

/// Sends `request` and reads the answer until the peer closes or `CHECK_TIMEOUT` passes.
async fn exchange(address: &str, port: u16, request: &[u8]) -> Result<String, String> {
    let mut stream = tcp_connect(address, port).await?;
    let talk = async {
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            let read = stream.read(&mut buffer).await?;
            if read == 0 || answer.len() > 4096 {
                break;
            }
            answer.extend_from_slice(&buffer[..read]);
            // Enough to judge: a status line, or a Redis reply line.
            if answer.windows(2).any(|pair| pair == b"\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    match tokio::time::timeout(CHECK_TIMEOUT, talk).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(err)) => Err(format!("talking to {address}:{port}: {err}")),
        Err(_) => Err(format!(
            "no answer from {address}:{port} in {CHECK_TIMEOUT:?}"
        )),
    }
}

async fn redis_ping(address: &str) -> Result<(), String> {
    let answer = exchange(address, 6379, b"PING\r\n").await?;
    if answer.starts_with("+PONG") {
        Ok(())
    } else {
        Err(format!("PING answered {:?}", answer.trim()))
    }
}

/// A GET of `path` must answer 200.
async fn http_status(address: &str, port: u16, path: &str) -> Result<(), String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let answer = exchange(address, port, request.as_bytes()).await?;
    let status_line = answer.lines().next().unwrap_or_default().to_string();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!(
            "GET http://{address}:{port}{path} answered {status_line:?}"
        )),
    }
}

/// `/etc/passwd` and `/etc/group` of an image whose server runs as `user` (and root, whose
/// entry some tools look up).
fn users(user: &str, group: &str, uid: u32) -> Vec<(String, String, u32)> {
    vec![
        (
            "/etc/passwd".into(),
            format!(
                "root:x:0:0:root:/root:/bin/sh\n\
                 {user}:x:{uid}:{uid}:{user}:/nonexistent:/bin/false\n"
            ),
            0o644,
        ),
        (
            "/etc/group".into(),
            format!("root:x:0:\n{group}:x:{uid}:\n"),
            0o644,
        ),
    ]
}

/// The entrypoint of the PostgreSQL image: creates the cluster on first start (the data lives
/// in the container, so it survives the restarts and stops faults cause, and goes with it).
const POSTGRES_ENTRYPOINT: &str = r#"#!/bin/sh
# Initialises the database cluster on first start, then runs the server in the foreground.
set -e
PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # The superuser is `orders`: the order API's user.
  initdb --pgdata="$PGDATA" --username=orders --auth=trust --encoding=UTF8 --no-locale \
         --no-sync >/dev/null
  {
    echo "listen_addresses = '*'"
    # The JIT needs LLVM, which the image leaves out.
    echo "jit = off"
  } >> "$PGDATA/postgresql.conf"
  # Trust, no password, from anywhere: this is a throwaway lab on a private Docker network,
  # never a place for data that matters.
  echo "host all all all trust" >> "$PGDATA/pg_hba.conf"
  echo "CREATE DATABASE orders OWNER orders;" |
    postgres --single -D "$PGDATA" -j template1 >/dev/null
  echo "postgres-entrypoint: created the cluster with database and user orders"
fi
exec postgres -D "$PGDATA"
"#;

fn postgres_image() -> Result<ImageSpec, LabError> {
    let mut binaries: Vec<(PathBuf, String)> = ["postgres", "initdb", "pg_isready"]
        .iter()
        .map(|name| {
            let path = format!("{PG_BIN}/{name}");
            (PathBuf::from(&path), path)
        })
        .collect();
    binaries.push((PathBuf::from("/bin/sh"), "/bin/sh".into()));
    // The loadable modules (plpgsql, text search dictionaries, encoding conversions...) are
    // shared objects with libraries of their own.
    let entries = std::fs::read_dir(PG_LIB).map_err(|e| LabError::io("listing", PG_LIB, e))?;
    let mut modules = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LabError::io("listing", PG_LIB, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".so") && !name.starts_with("llvmjit") {
            modules.push(entry.path());
        }
    }
    modules.sort();
    binaries.extend(modules.into_iter().map(|path| {
        let text = path.to_string_lossy().into_owned();
        (path, text)
    }));
    let mut generated = users("postgres", "postgres", SERVICE_UID);
    generated.push((
        "/usr/local/bin/postgres-entrypoint".into(),
        POSTGRES_ENTRYPOINT.into(),
        0o755,
    ));
    Ok(ImageSpec {
        binaries,
        files: vec![PathBuf::from("/usr/share/zoneinfo/UTC")],
        trees: vec![(PathBuf::from(PG_SHARE), vec!["man".into()])],
        generated,
        dirs: vec![("/tmp".into(), 0o1777)],
        owned_dirs: vec![
            ("/var/lib/postgresql".into(), SERVICE_UID, SERVICE_UID),
            // The Unix socket pg_isready talks to.
            ("/var/run/postgresql".into(), SERVICE_UID, SERVICE_UID),
        ],
        instructions: vec![
            format!("ENV PATH={PG_BIN}:/usr/local/bin:/usr/bin:/bin TZ=UTC"),
            "USER postgres".into(),
        ],
        cmd: vec![
            "/bin/sh".into(),
            "/usr/local/bin/postgres-entrypoint".into(),
        ],
        labels: vec![fleet::LABEL.into()],
    })
}

fn redis_image() -> ImageSpec {
    ImageSpec {
        // `redis-server` is a symlink to `redis-check-rdb`, which picks its mode by its name:
        // copied as `redis-server`, it is the server.
        binaries: vec![(
            PathBuf::from("/usr/bin/redis-server"),
            "/usr/bin/redis-server".into(),
        )],
        generated: users("redis", "redis", SERVICE_UID),
        instructions: vec!["USER redis".into()],
        cmd: [
            "/usr/bin/redis-server",
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            // Reached from the other containers without a password: protected mode off.
            "--protected-mode",
            "no",
            // A cache: no snapshots, no append-only file, nothing written.
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from)
        .to_vec(),
        labels: vec![fleet::LABEL.into()],
        ..ImageSpec::default()
    }
}

/// nginx's configuration: port 80 proxied to the trading API. The upstream is a variable
/// resolved by Docker's DNS (127.0.0.11) per request, so nginx starts while `trading-api` does
/// not exist yet and finds it again after a restart gives it a new address.
const NGINX_CONF: &str = r#"# Generated by `faultline lab up`: the demo stack's proxy.
user nobody nogroup;
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
  access_log /dev/stdout;
  client_body_temp_path /tmp/client_body;
  proxy_temp_path /tmp/proxy;
  fastcgi_temp_path /tmp/fastcgi;
  uwsgi_temp_path /tmp/uwsgi;
  scgi_temp_path /tmp/scgi;
  resolver 127.0.0.11 valid=5s ipv6=off;
  server {
    listen 80;
    location / {
      set $upstream http://trading-api:8080;
      proxy_pass $upstream;
      proxy_connect_timeout 2s;
      proxy_read_timeout 30s;
    }
  }
}
"#;

fn nginx_image() -> ImageSpec {
    let mut generated = users("nobody", "nogroup", 65534);
    generated.push(("/etc/nginx/nginx.conf".into(), NGINX_CONF.into(), 0o644));
    ImageSpec {
        binaries: vec![(PathBuf::from("/usr/sbin/nginx"), "/usr/sbin/nginx".into())],
        generated,
        dirs: vec![("/tmp".into(), 0o1777)],
        // `-e stderr`: the compiled-in error log (/var/log/nginx) is opened before the
        // configuration is read.
        cmd: [
            "/usr/sbin/nginx",
            "-e",
            "stderr",
            "-c",
            "/etc/nginx/nginx.conf",
        ]
        .map(String::from)
        .to_vec(),
        labels: vec![fleet::LABEL.into()],
        ..ImageSpec::default()
    }
}

/// The order API speaks plain HTTP, PostgreSQL and Redis only: the binary and its libraries
/// are all it needs (no CA store, no shell).
fn order_api_image(binary: &Path) -> ImageSpec {
    ImageSpec {
        binaries: vec![(binary.to_path_buf(), ORDER_API_PATH.into())],
        // Plain log lines: `docker logs` is not a terminal.
        instructions: vec!["ENV RUST_LOG=info NO_COLOR=1".into()],
        cmd: vec![ORDER_API_PATH.into(), "serve".into()],
        labels: vec![fleet::LABEL.into()],
        ..ImageSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_stand_on_the_plan_hosts_of_the_game_day_plans() {
        let agents: Vec<String> = ["agent-1", "agent-2", "agent-3"].map(String::from).to_vec();
        let placed: Vec<(&str, String)> = SERVICES
            .iter()
            .map(|service| (service.name, host_of(service, &agents)))
            .collect();
        assert_eq!(
            placed,
            [
                ("postgres", "agent-2".to_string()),
                ("redis", "agent-3".to_string()),
                ("trading-api", "agent-1".to_string()),
                ("nginx", "agent-3".to_string()),
                ("market-simulator", "agent-2".to_string()),
            ]
        );
        let one = vec!["solo".to_string()];
        assert!(SERVICES.iter().all(|s| host_of(s, &one) == "solo"));
        assert_eq!(host_of(&SERVICES[0], &[]), "");
    }

    #[test]
    fn the_stack_names_are_recognised() {
        assert!(is_stack_container("postgres"));
        assert!(is_stack_container("market-simulator"));
        assert!(!is_stack_container("faultline-lab-coordinator"));
    }

    #[test]
    fn a_generated_file_changes_the_fingerprint() {
        let spec = || ImageSpec {
            generated: users("redis", "redis", SERVICE_UID),
            cmd: vec!["/x".into()],
            ..ImageSpec::default()
        };
        let mut changed = spec();
        changed.generated[0]
            .1
            .push_str("extra:x:1:1::/:/bin/false\n");
        let base = spec().fingerprint().expect("no host files to read");
        assert_ne!(base, changed.fingerprint().expect("no host files to read"));
        assert_eq!(base, spec().fingerprint().expect("no host files to read"));
    }

    #[test]
    fn nginx_resolves_the_api_per_request() {
        assert!(NGINX_CONF.contains("resolver 127.0.0.11"));
        assert!(NGINX_CONF.contains("set $upstream http://trading-api:8080;"));
        assert!(NGINX_CONF.contains("proxy_pass $upstream;"));
    }
}
