//! A real, throwaway Redis server (the Debian `redis-server` package) for tests.
//!
//! [`RealRedis::start`] runs `redis-server` on a free loopback port with persistence off
//! (`--save '' --appendonly no`) and its working directory in a temporary directory, and
//! returns once it answers `PING`. Dropping the value kills the server.
//!
//! Synchronous (`std::process`), like [`crate::postgres`], so it works from any test and from
//! `Drop`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the Debian package installs the server.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// How long the server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Redis server, killed on drop.
#[derive(Debug)]
pub struct RealRedis {
    /// Loopback TCP port the server listens on.
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    // Last field: removed after the server has been killed.
    dir: tempfile::TempDir,
}

impl RealRedis {
    /// Whether the server binary is installed (tests skip loudly without it).
    pub fn available() -> bool {
        Path::new(REDIS_SERVER).exists()
    }

    /// Starts a server on a free loopback port; returns once it answers `PING`.
    pub fn start() -> anyhow::Result<RealRedis> {
        if !Self::available() {
            bail!("{REDIS_SERVER} not found: install the Debian package redis-server");
        }
        let dir = tempfile::Builder::new()
            .prefix("faultline-redis-")
            .tempdir()
            .context("temp dir for Redis")?;
        let log = dir.path().join("redis.log");
        let mut redis = RealRedis {
            port: 0,
            child: None,
            log,
            dir,
        };
        // A free port can be taken between probing and binding: retry with another one.
        let mut last_error = None;
        for _ in 0..3 {
            redis.port = free_port()?;
            match redis.spawn().and_then(|()| redis.wait_ready()) {
                Ok(()) => return Ok(redis),
                Err(e) => {
                    last_error = Some(e);
                    redis.kill();
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("Redis did not start")))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's process id, while it runs (to pause it with SIGSTOP, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the server (SIGKILL: an abrupt loss, as a crash would be) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`RealRedis::kill`]), empty.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("Redis log file")?;
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("Redis log file")?)
            .stderr(log_file)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls `PING` until `+PONG`.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!("redis-server exited with {status}: {}", self.log());
            }
            match ping(self.addr()) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "Redis not ready after {READY_TIMEOUT:?}: {e:#}; log: {}",
                        self.log()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for RealRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One inline `PING`, bounded by a short timeout.
fn ping(addr: SocketAddr) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connecting")?;
    stream.set_read_timeout(Some(timeout)).context("timeout")?;
    stream.set_write_timeout(Some(timeout)).context("timeout")?;
    stream.write_all(b"PING\r\n").context("sending PING")?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).context("reading the reply")?;
    let reply = String::from_utf8_lossy(&reply[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        bail!("unexpected reply to PING: {reply:?}")
    }
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
    fn starts_answers_restarts_and_is_killed_on_drop() -> anyhow::Result<()> {
        if !RealRedis::available() {
            eprintln!("SKIPPED: {REDIS_SERVER} not installed");
            return Ok(());
        }
        let mut redis = RealRedis::start()?;
        ping(redis.addr())?;
        redis.kill();
        assert!(ping(redis.addr()).is_err(), "still answering after kill");
        redis.restart()?;
        ping(redis.addr())?;
        let (addr, dir) = (redis.addr(), redis.dir.path().to_path_buf());
        drop(redis);
        assert!(ping(addr).is_err(), "still answering after drop");
        assert!(!dir.exists(), "temp dir {} left behind", dir.display());
        Ok(())
    }
}
