//! A real, throwaway PostgreSQL server (the Debian `postgresql-15` package) for tests.
//!
//! [`RealPostgres::start`] runs `initdb` into a fresh temporary directory owned by the
//! `postgres` system user and starts `postgres` as that user (the server refuses to run as
//! root) on a free loopback port, with its Unix socket inside the temporary directory so it
//! never collides with a system cluster. Authentication is `trust`; a database is created.
//! Dropping the value stops the server (SIGINT = fast shutdown, then SIGKILL) and removes the
//! directory.
//!
//! Everything here is synchronous (`std::process`) so it can be used from any test, async or
//! not, and from `Drop`.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};

/// Where the Debian package installs the server binaries.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The database created in every server.
pub const DATABASE: &str = "faultline";

/// The superuser `initdb` creates (trust authentication, no password).
pub const SUPERUSER: &str = "postgres";

/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the server gets to stop on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running PostgreSQL server, stopped and deleted on drop.
#[derive(Debug)]
pub struct RealPostgres {
    /// Loopback TCP port the server listens on.
    pub port: u16,
    /// Data directory (inside [`RealPostgres::dir`]).
    pub data_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    // Last field: removed after the server has been stopped.
    dir: tempfile::TempDir,
}

impl RealPostgres {
    /// Initialises a cluster in a temporary directory and starts the server on a free port;
    /// returns once it accepts connections and the database [`DATABASE`] exists.
    pub fn start() -> anyhow::Result<RealPostgres> {
        let initdb = Path::new(PG_BIN_DIR).join("initdb");
        if !initdb.exists() {
            bail!(
                "{} not found: install the Debian package postgresql-15",
                initdb.display()
            );
        }
        let user = User::from_name(SUPERUSER)
            .context("looking up the postgres system user")?
            .context("no `postgres` system user: install the Debian package postgresql-15")?;

        let mut dir = tempfile::Builder::new()
            .prefix("faultline-pg-")
            .tempdir()
            .context("temp dir for PostgreSQL")?;
        chown(dir.path(), Some(user.uid), Some(user.gid))
            .with_context(|| format!("chown {} to postgres", dir.path().display()))?;
        // The server runs as `postgres`: it must be able to enter the directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .context("chmod PostgreSQL temp dir")?;
        let data_dir = dir.path().join("data");
        let log = dir.path().join("postgres.log");

        let out = as_postgres(&user, Command::new(&initdb))
            .arg("-D")
            .arg(&data_dir)
            .args([
                "--auth=trust",
                "--username",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // A free port can be taken between probing and binding: retry with another one.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .context("PostgreSQL log file")?;
            chown(&log, Some(user.uid), Some(user.gid)).context("chown PostgreSQL log")?;
            let child = as_postgres(&user, Command::new(Path::new(PG_BIN_DIR).join("postgres")))
                .arg("-D")
                .arg(&data_dir)
                .arg("-k")
                .arg(dir.path())
                .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string()])
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=100"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .context("starting postgres")?;
            let mut pg = RealPostgres {
                port,
                data_dir: data_dir.clone(),
                child: Some(child),
                log: log.clone(),
                dir,
            };
            match pg.wait_ready() {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    last_error = Some(e);
                    pg.stop();
                    // Take the directory back for the next attempt.
                    dir = std::mem::replace(
                        &mut pg.dir,
                        tempfile::tempdir().context("placeholder temp dir")?,
                    );
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    /// `postgres://postgres@127.0.0.1:<port>/faultline` (trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The temporary directory holding data, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs SQL through `psql` against [`DATABASE`]; returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(Path::new(PG_BIN_DIR).join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", DATABASE, "-X", "-A", "-t", "-v"])
            .arg("ON_ERROR_STOP=1")
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Polls until the server accepts connections, then creates the database.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("postgres exited with {status}: {}", self.log());
            }
            // `createdb` doubles as the readiness probe: it fails until the server accepts
            // connections, and succeeds exactly once the database exists.
            let out = Command::new(Path::new(PG_BIN_DIR).join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, DATABASE])
                .stdin(Stdio::null())
                .output()
                .context("running createdb")?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL not ready after {READY_TIMEOUT:?}: {}; log: {}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server: SIGINT, then SIGKILL after [`STOP_GRACE`].
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients (coordinators still
        // connected in a test) where SIGTERM ("smart") would wait for them to leave.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for RealPostgres {
    fn drop(&mut self) {
        self.stop();
        // `dir` (a TempDir) is removed when the fields drop, after the server is gone.
    }
}

/// Runs `command` as the `postgres` user (the server refuses to run as root). `uid` drops the
/// supplementary groups too when called as root.
fn as_postgres(user: &User, mut command: Command) -> Command {
    command
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .env("HOME", &user.dir)
        .env("LC_ALL", "C");
    command
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("probing a free port")?;
    Ok(listener.local_addr().context("probed port")?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_accepts_sql_and_cleans_up() -> anyhow::Result<()> {
        let pg = RealPostgres::start()?;
        assert_eq!(pg.psql("select 40 + 2")?, "42");
        let dir = pg.dir().to_path_buf();
        let port = pg.port;
        drop(pg);
        assert!(!dir.exists(), "temp dir {} left behind", dir.display());
        assert!(
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
            "server still listening on {port}"
        );
        Ok(())
    }
}
