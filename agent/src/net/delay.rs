//! Latency without netem: the firewall hands the traffic in scope to an NFQUEUE
//! (`-j NFQUEUE --queue-num Q --queue-bypass`, see [`super::firewall`]) and a [`DelayDaemon`]
//! bound to that queue *inside the target's namespace* holds each packet for `delay ± jitter`
//! (uniform) before re-injecting it with verdict ACCEPT.
//!
//! - The daemon runs on a dedicated OS thread that enters the namespace
//!   ([`Netns::enter_current_thread`]) before opening its netlink socket; never a tokio worker.
//! - It speaks the NFQUEUE netlink protocol itself (about 200 lines, no C library): it needs
//!   its socket in a `poll` together with a stop `eventfd` and a precise timer, which the
//!   `nfq` crate does not expose. Only the first 128 bytes of each packet are copied up (enough
//!   to tell flows apart); verdicts never carry payload.
//! - Order is kept per flow (addresses, protocol, ports): with jitter a packet never leaves
//!   before an earlier one of its flow.
//! - Safety nets: `--queue-bypass` lets traffic through unqueued when no daemon is bound (agent
//!   dead); the queue is set to fail-open (a full queue accepts rather than drops); on stop every
//!   held packet is released at once with ACCEPT before the socket closes (closing would drop
//!   them).
//!
//! Undo only has the journaled record, so daemons live in a process-wide [`registry`] keyed by
//! the fault's tag; the firewall undo stops the daemon of its tag.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::firewall::{NetError, describe_netns};
use crate::sys::netns::Netns;

/// Lowest NFQUEUE number Faultline uses.
pub const QUEUE_MIN: u16 = 1000;
/// Highest NFQUEUE number Faultline uses.
pub const QUEUE_MAX: u16 = 65000;

/// How many packets the kernel may hold for us before it fails open (accepts unqueued).
const QUEUE_MAXLEN: u32 = 65_536;
/// Bytes of each packet copied to us: enough for IPv4/IPv6 and the ports.
const COPY_RANGE: u32 = 128;
/// How long [`DelayDaemon::start`] waits for the queue to be bound.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The NFQUEUE number for a tag: deterministic (undo and sweep find it again), in
/// `QUEUE_MIN..=QUEUE_MAX`.
pub fn queue_for(tag: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in tag.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let span = u32::from(QUEUE_MAX - QUEUE_MIN) + 1;
    // The remainder is < span <= 64001, so it fits.
    QUEUE_MIN + u16::try_from(hash % span).unwrap_or(0)
}

/// What a daemon has done so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayStats {
    /// Packets received from the queue.
    pub packets: u64,
    /// Packets held right now.
    pub held: u64,
    /// False once the thread has ended (stopped or failed).
    pub running: bool,
    /// Why the thread ended, if it failed.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    packets: AtomicU64,
    held: AtomicU64,
    running: AtomicBool,
    error: Mutex<Option<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A thread holding the packets of one NFQUEUE in one namespace. Stops on [`stop`] or drop.
///
/// [`stop`]: DelayDaemon::stop
#[derive(Debug)]
pub struct DelayDaemon {
    netns: Netns,
    queue: u16,
    delay: Duration,
    jitter: Duration,
    stop_fd: Arc<OwnedFd>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DelayDaemon {
    /// Binds NFQUEUE `queue` inside `netns` on a new thread and starts delaying. Blocks until
    /// the queue is bound (a few milliseconds) and fails if it cannot be (e.g. already bound).
    pub fn start(
        netns: &Netns,
        queue: u16,
        delay: Duration,
        jitter: Duration,
    ) -> Result<DelayDaemon, NetError> {
        let fail = |message: String| NetError::Delay {
            queue,
            netns: describe_netns(netns),
            message,
        };
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(fail(format!("eventfd: {}", io::Error::last_os_error())));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let stop_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let shared = Arc::new(Shared::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = {
            let netns = netns.clone();
            let stop_fd = Arc::clone(&stop_fd);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("flt-delay-{queue}"))
                .spawn(move || {
                    if let Err(err) = netns.enter_current_thread() {
                        let _ = ready_tx.send(Err(err.to_string()));
                        return;
                    }
                    let mut nfq = match NfQueue::open(queue) {
                        Ok(nfq) => nfq,
                        Err(err) => {
                            let _ = ready_tx.send(Err(format!("binding NFQUEUE {queue}: {err}")));
                            return;
                        }
                    };
                    shared.running.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(()));
                    let result = run(&mut nfq, stop_fd.as_raw_fd(), delay, jitter, &shared);
                    if let Err(err) = result {
                        tracing::error!(queue, %err, "delay daemon failed; traffic now bypasses the queue");
                        *lock(&shared.error) = Some(err.to_string());
                    }
                    shared.running.store(false, Ordering::SeqCst);
                })
                .map_err(|err| fail(format!("spawning thread: {err}")))?
        };
        let mut daemon = DelayDaemon {
            netns: netns.clone(),
            queue,
            delay,
            jitter,
            stop_fd,
            shared,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(daemon),
            Ok(Err(message)) => {
                daemon.shutdown();
                Err(fail(message))
            }
            Err(_) => {
                daemon.shutdown();
                Err(fail(format!("queue not bound within {START_TIMEOUT:?}")))
            }
        }
    }

    /// Releases every held packet and ends the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    pub fn queue(&self) -> u16 {
        self.queue
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    pub fn stats(&self) -> DelayStats {
        DelayStats {
            packets: self.shared.packets.load(Ordering::Relaxed),
            held: self.shared.held.load(Ordering::Relaxed),
            running: self.shared.running.load(Ordering::SeqCst),
            error: lock(&self.shared.error).clone(),
        }
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let _ = unsafe {
            libc::write(
                self.stop_fd.as_raw_fd(),
                (&raw const one).cast::<libc::c_void>(),
                8,
            )
        };
        if thread.join().is_err() {
            tracing::error!(queue = self.queue, "delay daemon thread panicked");
        }
    }
}

impl Drop for DelayDaemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Running daemons by fault tag, so undo (which only has the journal) can stop them.
#[derive(Debug, Default)]
pub struct DelayRegistry {
    daemons: Mutex<HashMap<String, DelayDaemon>>,
}

impl DelayRegistry {
    /// Registers `daemon` under `tag`, stopping any daemon registered there before.
    pub fn insert(&self, tag: impl Into<String>, daemon: DelayDaemon) {
        let old = lock(&self.daemons).insert(tag.into(), daemon);
        if let Some(old) = old {
            old.stop();
        }
    }

    /// Stops and forgets the daemon of `tag`; false when there was none.
    pub fn remove(&self, tag: &str) -> bool {
        let daemon = lock(&self.daemons).remove(tag);
        match daemon {
            Some(daemon) => {
                daemon.stop();
                true
            }
            None => false,
        }
    }

    pub fn contains(&self, tag: &str) -> bool {
        lock(&self.daemons).contains_key(tag)
    }

    pub fn tags(&self) -> Vec<String> {
        lock(&self.daemons).keys().cloned().collect()
    }

    pub fn stats(&self, tag: &str) -> Option<DelayStats> {
        lock(&self.daemons).get(tag).map(DelayDaemon::stats)
    }

    pub fn netns_of(&self, tag: &str) -> Option<Netns> {
        lock(&self.daemons).get(tag).map(|d| d.netns.clone())
    }
}

/// The process-wide registry.
pub fn registry() -> &'static DelayRegistry {
    static REGISTRY: OnceLock<DelayRegistry> = OnceLock::new();
    REGISTRY.get_or_init(DelayRegistry::default)
}

// ------------------------------------------------------------------------------------------
// Scheduling (pure, unit-tested)
// ------------------------------------------------------------------------------------------

/// Decides when each packet leaves: `arrival + delay ± jitter`, never before an earlier
/// packet of the same flow.
#[derive(Debug)]
struct Scheduler {
    delay: Duration,
    jitter: Duration,
    rng: u64,
    /// Latest release per flow.
    flows: HashMap<u64, Instant>,
    /// (release, arrival order, packet id), earliest first.
    heap: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    order: u64,
}

impl Scheduler {
    fn new(delay: Duration, jitter: Duration, seed: u64) -> Self {
        Self {
            delay,
            jitter,
            rng: seed | 1,
            flows: HashMap::new(),
            heap: BinaryHeap::new(),
            order: 0,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `delay ± jitter`, uniform, not below zero.
    fn sample(&mut self) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let span = self
            .jitter
            .as_nanos()
            .saturating_mul(2)
            .min(u128::from(u64::MAX)) as u64;
        let offset = Duration::from_nanos(self.next_random() % span.saturating_add(1));
        (self.delay + offset).saturating_sub(self.jitter)
    }

    fn push(&mut self, id: u32, flow: u64, arrival: Instant) -> Instant {
        let mut release = arrival + self.sample();
        if let Some(last) = self.flows.get(&flow)
            && *last > release
        {
            release = *last;
        }
        self.flows.insert(flow, release);
        if self.flows.len() > 4096 {
            self.flows.retain(|_, last| *last > arrival);
        }
        self.order += 1;
        self.heap.push(Reverse((release, self.order, id)));
        release
    }

    fn next_release(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Ids due at `now`, in release order.
    fn due(&mut self, now: Instant, out: &mut Vec<u32>) {
        while let Some(Reverse((at, _, id))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            out.push(id);
        }
    }

    fn drain(&mut self, out: &mut Vec<u32>) {
        while let Some(Reverse((_, _, id))) = self.heap.pop() {
            out.push(id);
        }
    }

    fn len(&self) -> usize {
        self.heap.len()
    }
}

/// A flow key from the start of an IP packet: protocol, addresses and (when present) ports.
fn flow_key(packet: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let proto = packet[9];
            feed(&[4, proto]);
            feed(&packet[12..20]);
            let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            if (proto == 6 || proto == 17) && fragment_offset == 0 && packet.len() >= ihl + 4 {
                feed(&packet[ihl..ihl + 4]);
            }
        }
        Some(6) if packet.len() >= 40 => {
            let next = packet[6];
            feed(&[6, next]);
            feed(&packet[8..40]);
            if (next == 6 || next == 17) && packet.len() >= 44 {
                feed(&packet[40..44]);
            }
        }
        _ => {}
    }
    hash
}

// ------------------------------------------------------------------------------------------
// NFQUEUE over raw netlink
// ------------------------------------------------------------------------------------------

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NF_ACCEPT: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
/// Verdict messages per `send` (each is 32 bytes).
const VERDICT_BATCH: usize = 512;

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends one nfnetlink message for our queue to `buf`.
fn put_message(
    buf: &mut Vec<u8>,
    msg: u16,
    flags: u16,
    seq: u32,
    queue: u16,
    attrs: &[(u16, &[u8])],
) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]); // length, patched below
    buf.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel
    buf.push(libc::AF_UNSPEC as u8); // nfgen_family
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&queue.to_be_bytes()); // res_id
    for (kind, payload) in attrs {
        let len = 4 + payload.len();
        buf.extend_from_slice(&(len as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(payload);
        buf.resize(start + align4(buf.len() - start), 0);
    }
    let total = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&total.to_ne_bytes());
}

/// One message of a received datagram.
#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    Packet {
        id: u32,
        flow: u64,
    },
    /// NLMSG_ERROR: errno (0 = ack) for sequence number `seq`.
    Ack {
        seq: u32,
        errno: i32,
    },
    Other,
}

fn parse_messages(mut data: &[u8], out: &mut Vec<Incoming>) {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        let body = &data[NLMSG_HDRLEN..len];
        if kind == NLMSG_ERROR && body.len() >= 4 {
            let errno = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            // The error carries the header of the request it answers: its seq is ours.
            let seq = if body.len() >= 4 + NLMSG_HDRLEN {
                u32::from_ne_bytes([body[12], body[13], body[14], body[15]])
            } else {
                seq
            };
            out.push(Incoming::Ack { seq, errno: -errno });
        } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && body.len() >= 4 {
            let mut attrs = &body[4..];
            let mut id = None;
            let mut flow = 0;
            while attrs.len() >= 4 {
                let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                let akind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                let payload = &attrs[4..alen];
                match akind {
                    NFQA_PACKET_HDR if payload.len() >= 4 => {
                        id = Some(u32::from_be_bytes([
                            payload[0], payload[1], payload[2], payload[3],
                        ]));
                    }
                    NFQA_PAYLOAD => flow = flow_key(payload),
                    _ => {}
                }
                attrs = &attrs[align4(alen).min(attrs.len())..];
            }
            match id {
                Some(id) => out.push(Incoming::Packet { id, flow }),
                None => out.push(Incoming::Other),
            }
        } else {
            out.push(Incoming::Other);
        }
        data = &data[align4(len).min(data.len())..];
    }
}

/// A netlink socket bound to one NFQUEUE.
#[derive(Debug)]
struct NfQueue {
    fd: OwnedFd,
    queue: u16,
    seq: u32,
    buf: Vec<u8>,
    /// Packets that arrived while waiting for an ack.
    early: Vec<(u32, u64)>,
}

impl NfQueue {
    fn open(queue: u16) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        set_int_opt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_NO_ENOBUFS,
            1,
        )?;
        // A deep receive buffer so bursts are queued rather than lost; best effort.
        if set_int_opt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            8 << 20,
        )
        .is_err()
        {
            let _ = set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20);
        }
        let mut nfq = Self {
            fd,
            queue,
            seq: 0,
            buf: vec![0; 1 << 16],
            early: Vec::new(),
        };
        nfq.config(&[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])])?;
        let mut params = COPY_RANGE.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_PACKET);
        nfq.config(&[(NFQA_CFG_PARAMS, &params)])?;
        nfq.config(&[(NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAXLEN.to_be_bytes())])?;
        nfq.config(&[
            (NFQA_CFG_FLAGS, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes()),
            (NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes()),
        ])?;
        Ok(nfq)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero (pid 0) addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `bytes` and `kernel` are valid for the lengths passed.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast::<libc::c_void>(),
                    bytes.len(),
                    0,
                    (&raw const kernel).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Sends one config message and waits for its ack.
    fn config(&mut self, attrs: &[(u16, &[u8])]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Vec::with_capacity(64);
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        put_message(&mut msg, NFQNL_MSG_CONFIG, flags, seq, self.queue, attrs);
        self.send(&msg)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut incoming = Vec::new();
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no ack from nfnetlink_queue",
                ));
            }
            if !self.recv(&mut incoming, Duration::from_millis(100))? {
                continue;
            }
            for message in incoming.drain(..) {
                match message {
                    Incoming::Ack { seq: s, errno } if s == seq => {
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(errno))
                        };
                    }
                    Incoming::Packet { id, flow } => self.early.push((id, flow)),
                    _ => {}
                }
            }
        }
    }

    /// Receives one datagram (waiting up to `wait`); false when none came.
    fn recv(&mut self, out: &mut Vec<Incoming>, wait: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = timespec(wait);
        // SAFETY: one valid pollfd and a valid timespec.
        let rc = unsafe { libc::ppoll(&raw mut pfd, 1, &raw const ts, std::ptr::null()) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            };
        }
        if rc == 0 {
            return Ok(false);
        }
        self.recv_now(out)
    }

    /// Receives one datagram if one is waiting.
    fn recv_now(&mut self, out: &mut Vec<Incoming>) -> io::Result<bool> {
        // SAFETY: `buf` is valid for writes of its length.
        let rc = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast::<libc::c_void>(),
                self.buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ if err.raw_os_error() == Some(libc::ENOBUFS) => Ok(false),
                _ => Err(err),
            };
        }
        let len = usize::try_from(rc).unwrap_or(0).min(self.buf.len());
        parse_messages(&self.buf[..len], out);
        Ok(true)
    }

    /// Sends ACCEPT for `ids`, batched.
    fn accept(&mut self, ids: &[u32]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(VERDICT_BATCH * 32);
        for chunk in ids.chunks(VERDICT_BATCH) {
            msg.clear();
            for id in chunk {
                let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
                verdict.extend_from_slice(&id.to_be_bytes());
                put_message(
                    &mut msg,
                    NFQNL_MSG_VERDICT,
                    libc::NLM_F_REQUEST as u16,
                    0,
                    self.queue,
                    &[(NFQA_VERDICT_HDR, &verdict)],
                );
            }
            self.send(&msg)?;
        }
        Ok(())
    }

    fn unbind(&mut self) -> io::Result<()> {
        self.config(&[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0])])
    }
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn timespec(wait: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: wait.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
    }
}

/// The daemon loop: receive, hold, release; on stop release everything and unbind.
fn run(
    nfq: &mut NfQueue,
    stop_fd: RawFd,
    delay: Duration,
    jitter: Duration,
    shared: &Shared,
) -> io::Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(nfq.queue);
    let mut scheduler = Scheduler::new(delay, jitter, seed);
    let mut incoming = Vec::new();
    let mut due = Vec::new();
    let start = Instant::now();
    for (id, flow) in std::mem::take(&mut nfq.early) {
        scheduler.push(id, flow, start);
        shared.packets.fetch_add(1, Ordering::Relaxed);
    }
    let outcome = loop {
        let now = Instant::now();
        due.clear();
        scheduler.due(now, &mut due);
        if !due.is_empty()
            && let Err(err) = nfq.accept(&due)
        {
            break Err(err);
        }
        shared.held.store(scheduler.len() as u64, Ordering::Relaxed);
        let wait = scheduler
            .next_release()
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let mut fds = [
            libc::pollfd {
                fd: nfq.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = timespec(wait);
        // SAFETY: two valid pollfds and a valid timespec.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &raw const ts, std::ptr::null()) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(err);
        }
        if fds[1].revents != 0 {
            break Ok(());
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0
            && fds[0].revents & libc::POLLIN == 0
        {
            break Err(io::Error::other("netlink socket error"));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Drain what is waiting, stamping arrivals with one clock reading per batch.
            let arrival = Instant::now();
            let mut failed = None;
            for _ in 0..256 {
                match nfq.recv_now(&mut incoming) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(err) => {
                        failed = Some(err);
                        break;
                    }
                }
            }
            for message in incoming.drain(..) {
                if let Incoming::Packet { id, flow } = message {
                    scheduler.push(id, flow, arrival);
                    shared.packets.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(err) = failed {
                break Err(err);
            }
        }
    };
    // Release everything still held: closing the socket would make the kernel drop them.
    due.clear();
    scheduler.drain(&mut due);
    let released = nfq.accept(&due);
    shared.held.store(0, Ordering::Relaxed);
    let _ = nfq.unbind();
    outcome.and(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_numbers_are_deterministic_and_in_range() {
        let a = queue_for("flt0123456789");
        assert_eq!(a, queue_for("flt0123456789"));
        assert_ne!(a, queue_for("flt0123456788"));
        for i in 0..2000 {
            let q = queue_for(&format!("flt{i:010x}"));
            assert!((QUEUE_MIN..=QUEUE_MAX).contains(&q), "{q}");
        }
    }

    #[test]
    fn scheduler_without_jitter_delays_exactly_in_order() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_millis(100), Duration::ZERO, 7);
        assert_eq!(s.push(1, 10, t0), t0 + Duration::from_millis(100));
        assert_eq!(
            s.push(2, 11, t0 + Duration::from_millis(5)),
            t0 + Duration::from_millis(105)
        );
        let mut out = Vec::new();
        s.due(t0 + Duration::from_millis(99), &mut out);
        assert!(out.is_empty());
        assert_eq!(s.next_release(), Some(t0 + Duration::from_millis(100)));
        s.due(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out, [1, 2]);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn scheduler_jitter_is_bounded_uniformish_and_keeps_flow_order() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(50);
        let jitter = Duration::from_millis(20);
        let mut s = Scheduler::new(delay, jitter, 42);
        let mut samples = Vec::new();
        for _ in 0..10_000 {
            let d = s.sample();
            assert!(d >= delay - jitter && d <= delay + jitter, "{d:?}");
            samples.push(d.as_secs_f64() * 1000.0);
        }
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((mean - 50.0).abs() < 1.0, "mean {mean}");
        let below = samples.iter().filter(|ms| **ms < 40.0).count();
        assert!(
            (2000..3000).contains(&below),
            "{below} of 10000 below 40 ms"
        );

        // One flow: releases never go backwards, even though samples do.
        let mut last = t0;
        for i in 0..1000u32 {
            let at = s.push(i, 99, t0 + Duration::from_micros(u64::from(i) * 100));
            assert!(at >= last);
            last = at;
        }
        let mut out = Vec::new();
        s.drain(&mut out);
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn flow_keys_tell_flows_apart() {
        let mut v4 = vec![0u8; 28];
        v4[0] = 0x45;
        v4[9] = 17;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        v4[20..24].copy_from_slice(&[0x30, 0x39, 0, 53]);
        let a = flow_key(&v4);
        v4[21] = 0x3a; // other source port
        assert_ne!(a, flow_key(&v4));
        v4[21] = 0x39;
        assert_eq!(a, flow_key(&v4));
        v4[24] = 0xff; // payload bytes do not matter
        assert_eq!(a, flow_key(&v4));
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 6;
        assert_ne!(flow_key(&v6), a);
        assert_eq!(flow_key(&[]), flow_key(&[0x10]));
    }

    #[test]
    fn netlink_messages_are_built_and_parsed() {
        let mut buf = Vec::new();
        put_message(
            &mut buf,
            NFQNL_MSG_CONFIG,
            5,
            9,
            1234,
            &[
                (NFQA_CFG_CMD, &[1, 0, 0, 0]),
                (NFQA_CFG_PARAMS, &[0, 0, 0, 128, 2]),
            ],
        );
        // header 16 + nfgenmsg 4 + attr 8 + attr 12 (9 padded)
        assert_eq!(buf.len(), 40);
        assert_eq!(u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]), 40);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), (3 << 8) | 2);
        assert_eq!(&buf[18..20], &1234u16.to_be_bytes());
        assert_eq!(u16::from_ne_bytes([buf[28], buf[29]]), 9);

        // A packet message as the kernel sends it, followed by an ack.
        let mut msg = Vec::new();
        let mut hdr = 77u32.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 3]);
        let payload = [0x45u8; 20];
        put_message(
            &mut msg,
            NFQNL_MSG_PACKET,
            0,
            0,
            1234,
            &[(NFQA_PACKET_HDR, &hdr), (NFQA_PAYLOAD, &payload)],
        );
        let mut ack = vec![0u8; 16];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        let mut echoed = vec![0u8; 16];
        echoed[8..12].copy_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&echoed);
        msg.extend_from_slice(&ack);
        let mut out = Vec::new();
        parse_messages(&msg, &mut out);
        assert_eq!(
            out,
            [
                Incoming::Packet {
                    id: 77,
                    flow: flow_key(&payload)
                },
                Incoming::Ack { seq: 5, errno: 16 },
            ]
        );
    }

    #[test]
    fn the_registry_reports_unknown_tags_as_absent() {
        assert!(!registry().remove("flt-no-such-tag"));
        assert!(!registry().contains("flt-no-such-tag"));
        assert!(registry().stats("flt-no-such-tag").is_none());
    }
}
