//! Discrete events from the ring buffers, decoded into Rust types.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::raw;
use crate::stats::socket_addr;

/// A discrete event. Every event names the task (`pid` is the process id, `tid` the thread),
/// its command name and its cgroup id (in the group's hierarchy; with the scope filter on, the
/// scoped cgroup it belongs to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TelemetryEvent {
    /// connect() failed.
    ConnectFailed(ConnectFailed),
    /// An established connection ended in an error (reset, timeout...).
    ConnectionError(ConnectionError),
    /// The OOM killer chose a victim.
    OomKill(OomKill),
    /// A process executed a new program.
    Exec(Exec),
    /// A process exited (its last thread).
    Exit(Exit),
}

impl TelemetryEvent {
    /// When it happened.
    pub fn time(&self) -> SystemTime {
        match self {
            TelemetryEvent::ConnectFailed(e) => e.time,
            TelemetryEvent::ConnectionError(e) => e.time,
            TelemetryEvent::OomKill(e) => e.time,
            TelemetryEvent::Exec(e) => e.time,
            TelemetryEvent::Exit(e) => e.time,
        }
    }

    /// The process it is about.
    pub fn pid(&self) -> u32 {
        match self {
            TelemetryEvent::ConnectFailed(e) => e.pid,
            TelemetryEvent::ConnectionError(e) => e.pid,
            TelemetryEvent::OomKill(e) => e.pid,
            TelemetryEvent::Exec(e) => e.pid,
            TelemetryEvent::Exit(e) => e.pid,
        }
    }

    /// Its cgroup id.
    pub fn cgroup_id(&self) -> u64 {
        match self {
            TelemetryEvent::ConnectFailed(e) => e.cgroup_id,
            TelemetryEvent::ConnectionError(e) => e.cgroup_id,
            TelemetryEvent::OomKill(e) => e.cgroup_id,
            TelemetryEvent::Exec(e) => e.cgroup_id,
            TelemetryEvent::Exit(e) => e.cgroup_id,
        }
    }
}

/// connect() failed, with the errno the application saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailed {
    /// When the socket closed.
    pub time: SystemTime,
    /// The process that called connect() (0 if the socket predates the programs).
    pub pid: u32,
    /// Its thread.
    pub tid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup (0: unknown).
    pub cgroup_id: u64,
    /// Local address and port.
    pub local: Option<SocketAddr>,
    /// The address connected to.
    pub remote: Option<SocketAddr>,
    /// ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ... or 0: closed by the application before the
    /// handshake completed (e.g. its own connect timeout).
    pub errno: i32,
    /// From connect() to the failure.
    pub elapsed: Duration,
}

/// An established (or closing) connection ended with an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionError {
    /// When the socket closed.
    pub time: SystemTime,
    /// The owning process (0 if unknown).
    pub pid: u32,
    /// Its thread (the one that created the socket).
    pub tid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup (0: unknown).
    pub cgroup_id: u64,
    /// Local address and port.
    pub local: Option<SocketAddr>,
    /// Remote address and port.
    pub remote: Option<SocketAddr>,
    /// ECONNRESET, EPIPE, ETIMEDOUT, ...
    pub errno: i32,
    /// The TCP state the connection was in (Linux numbering: 1 ESTABLISHED ... 11 CLOSING).
    pub state: u16,
    /// How long the connection lived (0 if unknown).
    pub lifetime: Duration,
}

/// An OOM kill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomKill {
    /// When the victim was chosen.
    pub time: SystemTime,
    /// The victim process.
    pub pid: u32,
    /// The victim thread.
    pub tid: u32,
    /// Its command name (empty on old kernels when the victim is not the allocating task).
    pub comm: String,
    /// Its memory cgroup.
    pub cgroup_id: u64,
    /// Its address-space size, bytes.
    pub total_vm: u64,
    /// Its user id.
    pub uid: u32,
    /// The process whose allocation triggered the kill.
    pub trigger_pid: u32,
    /// Its command name.
    pub trigger_comm: String,
}

/// A successful exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    /// When.
    pub time: SystemTime,
    /// The process.
    pub pid: u32,
    /// The thread that called exec (before the exec; after it, `pid`).
    pub old_tid: u32,
    /// The new command name.
    pub comm: String,
    /// Its cgroup.
    pub cgroup_id: u64,
    /// Its parent process.
    pub ppid: u32,
    /// The file executed, as passed to exec (truncated at 127 bytes).
    pub filename: String,
}

/// A process exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// When.
    pub time: SystemTime,
    /// The process.
    pub pid: u32,
    /// The last thread to exit.
    pub tid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup.
    pub cgroup_id: u64,
    /// Its parent process.
    pub ppid: u32,
    /// The exit status, when it exited normally.
    pub code: Option<i32>,
    /// The terminating signal, when a signal killed it.
    pub signal: Option<i32>,
    /// Whether it dumped core.
    pub core_dumped: bool,
    /// How long the process ran.
    pub runtime: Duration,
}

impl Exit {
    /// True for a crash or kill (a signal) or a non-zero exit status.
    pub fn failed(&self) -> bool {
        self.signal.is_some() || self.code.is_some_and(|c| c != 0)
    }
}

/// Converts the programs' `bpf_ktime_get_boot_ns()` timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    wall: SystemTime,
    boot_ns: u64,
}

impl Clock {
    pub(crate) fn now() -> Self {
        let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|ts| Duration::from(ts).as_nanos() as u64)
            .unwrap_or(0);
        Clock {
            wall: SystemTime::now(),
            boot_ns: boot,
        }
    }

    pub(crate) fn wall(&self, boot_ns: u64) -> SystemTime {
        if boot_ns >= self.boot_ns {
            self.wall + Duration::from_nanos(boot_ns - self.boot_ns)
        } else {
            self.wall - Duration::from_nanos(self.boot_ns - boot_ns)
        }
    }
}

/// Decodes one ring buffer record; `None` for a record too short or of an unknown kind.
pub(crate) fn decode(data: &[u8], clock: &Clock, page_size: u64) -> Option<TelemetryEvent> {
    let hdr: raw::EventHeader = raw::read(data)?;
    let time = clock.wall(hdr.ts_ns);
    let comm = raw::c_str(&hdr.comm);
    Some(match hdr.kind {
        raw::EV_CONNECT_FAILED | raw::EV_CONNECTION_ERROR => {
            let e: raw::TcpEvent = raw::read(data)?;
            let local = socket_addr(e.family, &e.saddr, e.sport);
            let remote = socket_addr(e.family, &e.daddr, e.dport);
            let elapsed = Duration::from_nanos(e.duration_ns);
            if hdr.kind == raw::EV_CONNECT_FAILED {
                TelemetryEvent::ConnectFailed(ConnectFailed {
                    time,
                    pid: hdr.tgid,
                    tid: hdr.pid,
                    comm,
                    cgroup_id: hdr.cgroup_id,
                    local,
                    remote,
                    errno: e.err,
                    elapsed,
                })
            } else {
                TelemetryEvent::ConnectionError(ConnectionError {
                    time,
                    pid: hdr.tgid,
                    tid: hdr.pid,
                    comm,
                    cgroup_id: hdr.cgroup_id,
                    local,
                    remote,
                    errno: e.err,
                    state: e.oldstate,
                    lifetime: elapsed,
                })
            }
        }
        raw::EV_OOM_KILL => {
            let e: raw::OomEvent = raw::read(data)?;
            TelemetryEvent::OomKill(OomKill {
                time,
                pid: hdr.tgid,
                tid: hdr.pid,
                comm,
                cgroup_id: hdr.cgroup_id,
                total_vm: e.total_vm_pages.saturating_mul(page_size),
                uid: e.uid,
                trigger_pid: e.trigger_tgid,
                trigger_comm: raw::c_str(&e.trigger_comm),
            })
        }
        raw::EV_EXEC => {
            let e: raw::ExecEvent = raw::read(data)?;
            TelemetryEvent::Exec(Exec {
                time,
                pid: hdr.tgid,
                old_tid: e.old_pid,
                comm,
                cgroup_id: hdr.cgroup_id,
                ppid: e.ppid,
                filename: raw::c_str(&e.filename),
            })
        }
        raw::EV_EXIT => {
            let e: raw::ExitEvent = raw::read(data)?;
            let (code, signal, core_dumped) = decode_wait_status(e.exit_code);
            TelemetryEvent::Exit(Exit {
                time,
                pid: hdr.tgid,
                tid: hdr.pid,
                comm,
                cgroup_id: hdr.cgroup_id,
                ppid: e.ppid,
                code,
                signal,
                core_dumped,
                runtime: Duration::from_nanos(e.runtime_ns),
            })
        }
        _ => return None,
    })
}

/// A task's `exit_code`, encoded like a wait status: `(status << 8)` for an exit, or the signal
/// number (`| 0x80` with a core dump).
fn decode_wait_status(raw: u32) -> (Option<i32>, Option<i32>, bool) {
    let signal = (raw & 0x7f) as i32;
    if signal == 0 {
        (Some(((raw >> 8) & 0xff) as i32), None, false)
    } else {
        (None, Some(signal), raw & 0x80 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16) -> raw::EventHeader {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        raw::EventHeader {
            ts_ns: 2_000_000_000,
            cgroup_id: 42,
            pid: 101,
            tgid: 100,
            comm,
            kind,
            _pad: [0; 3],
        }
    }

    #[test]
    fn wait_status_decoding() {
        assert_eq!(decode_wait_status(7 << 8), (Some(7), None, false));
        assert_eq!(decode_wait_status(0), (Some(0), None, false));
        assert_eq!(decode_wait_status(11), (None, Some(11), false));
        assert_eq!(decode_wait_status(11 | 0x80), (None, Some(11), true));
    }

    #[test]
    fn records_decode_into_typed_events() {
        let clock = Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1000),
            boot_ns: 1_000_000_000,
        };
        let mut e = <raw::TcpEvent as bytemuck::Zeroable>::zeroed();
        e.hdr = header(raw::EV_CONNECT_FAILED);
        e.family = 2;
        e.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.dport = 5432;
        e.err = 111;
        e.duration_ns = 5_000;
        let mut bytes = bytemuck::bytes_of(&e).to_vec();
        bytes.extend_from_slice(&[0; 8]); // trailing padding is ignored
        let Some(TelemetryEvent::ConnectFailed(cf)) = decode(&bytes, &clock, 4096) else {
            panic!("not decoded as ConnectFailed");
        };
        assert_eq!(
            (cf.pid, cf.tid, cf.comm.as_str(), cf.cgroup_id, cf.errno),
            (100, 101, "bash", 42, 111)
        );
        assert_eq!(cf.remote, Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(cf.time, SystemTime::UNIX_EPOCH + Duration::from_secs(1001));
        assert_eq!(decode(&bytes[..10], &clock, 4096), None);

        let mut x = <raw::ExitEvent as bytemuck::Zeroable>::zeroed();
        x.hdr = header(raw::EV_EXIT);
        x.exit_code = 9;
        let Some(TelemetryEvent::Exit(exit)) = decode(bytemuck::bytes_of(&x), &clock, 4096) else {
            panic!("not decoded as Exit");
        };
        assert_eq!((exit.code, exit.signal), (None, Some(9)));
        assert!(exit.failed());
    }
}
