//! Aggregates read from the kernel maps: what [`crate::Telemetry::snapshot`] returns.
//!
//! Counters are cumulative since the programs were loaded; `since(&earlier)` gives the change
//! between two snapshots (e.g. before / during / after a fault).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use crate::Group;
use crate::fallback::FallbackSnapshot;
use crate::raw;

/// A log2 histogram of durations in microseconds, as the programs keep them: bucket `k`
/// counts values in `[2^k, 2^(k+1))` µs, except bucket 0 which holds everything below 2 µs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Log2Histogram {
    /// Counts per bucket.
    pub buckets: [u64; raw::HIST_SLOTS],
    /// Number of samples.
    pub count: u64,
    /// Sum of the samples.
    pub sum: Duration,
    /// Largest sample (cumulative since load: `since` keeps the later value).
    pub max: Duration,
}

impl Log2Histogram {
    pub(crate) fn from_raw(
        slots: &[u64; raw::HIST_SLOTS],
        count: u64,
        total_ns: u64,
        max_ns: u64,
    ) -> Self {
        Log2Histogram {
            buckets: *slots,
            count,
            sum: Duration::from_nanos(total_ns),
            max: Duration::from_nanos(max_ns),
        }
    }

    /// The range of values bucket `k` holds.
    pub fn bucket_range(k: usize) -> (Duration, Duration) {
        let lo = if k == 0 { 0 } else { 1u64 << k };
        let hi = 1u64 << (k + 1);
        (Duration::from_micros(lo), Duration::from_micros(hi))
    }

    /// Samples counted in the buckets (may differ from `count` by a few updates racing a read).
    pub fn total(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q`-quantile (0.0..=1.0), interpolated linearly inside its bucket: accurate to the
    /// bucket, i.e. within a factor of two. `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let target = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (k, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= target {
                let (lo, hi) = Self::bucket_range(k);
                let frac = ((target - below as f64) / n as f64).clamp(0.0, 1.0);
                let est = lo.as_secs_f64() + (hi - lo).as_secs_f64() * frac;
                let est = Duration::from_secs_f64(est);
                // Never report more than the largest sample seen (when known).
                return Some(if self.max > Duration::ZERO {
                    est.min(self.max)
                } else {
                    est
                });
            }
            below += n;
        }
        Some(self.max)
    }

    /// Median.
    pub fn p50(&self) -> Option<Duration> {
        self.quantile(0.50)
    }

    /// 95th percentile.
    pub fn p95(&self) -> Option<Duration> {
        self.quantile(0.95)
    }

    /// 99th percentile.
    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }

    /// Mean of the samples.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| self.sum / u32::try_from(self.count).unwrap_or(u32::MAX))
    }

    /// The samples added since `earlier` (an older snapshot of the same histogram).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut buckets = self.buckets;
        for (b, e) in buckets.iter_mut().zip(earlier.buckets.iter()) {
            *b = b.saturating_sub(*e);
        }
        Log2Histogram {
            buckets,
            count: self.count.saturating_sub(earlier.count),
            sum: self.sum.saturating_sub(earlier.sum),
            max: self.max,
        }
    }

    fn add(&mut self, other: &Self) {
        for (b, o) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *b += *o;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }
}

/// The errno recorded for connections closed by the application before completing (or, for
/// [`TcpStats::connection_errors`], never used).
pub const ERRNO_NONE: i32 = 0;
/// Any errno other than the ones counted individually (see the events for the value).
pub const ERRNO_OTHER: i32 = -1;

/// The errnos the programs count individually, in their slot order.
pub(crate) const ERRNO_SLOTS: [i32; raw::ERRNO_SLOTS] = [
    libc_errno::ECONNREFUSED,
    libc_errno::ETIMEDOUT,
    libc_errno::EHOSTUNREACH,
    libc_errno::ENETUNREACH,
    libc_errno::ECONNRESET,
    libc_errno::EPIPE,
    ERRNO_NONE,
    ERRNO_OTHER,
];

/// Linux errno values used here.
pub mod libc_errno {
    /// Broken pipe.
    pub const EPIPE: i32 = 32;
    /// Network is unreachable.
    pub const ENETUNREACH: i32 = 101;
    /// Connection reset by peer.
    pub const ECONNRESET: i32 = 104;
    /// Connection timed out.
    pub const ETIMEDOUT: i32 = 110;
    /// Connection refused.
    pub const ECONNREFUSED: i32 = 111;
    /// No route to host.
    pub const EHOSTUNREACH: i32 = 113;
}

/// The symbolic name of an errno (for reports), `"E<n>"` for others.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        ERRNO_NONE => "closed-by-application",
        ERRNO_OTHER => "other",
        libc_errno::EPIPE => "EPIPE",
        libc_errno::ENETUNREACH => "ENETUNREACH",
        libc_errno::ECONNRESET => "ECONNRESET",
        libc_errno::ETIMEDOUT => "ETIMEDOUT",
        libc_errno::ECONNREFUSED => "ECONNREFUSED",
        libc_errno::EHOSTUNREACH => "EHOSTUNREACH",
        other => return format!("E{other}"),
    };
    name.to_owned()
}

/// Which side opened the connections of a [`TcpStats`] row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// This cgroup connected out (or the socket's origin is unknown).
    #[default]
    Outbound,
    /// This cgroup accepted them (the socket came from one of its listeners).
    Inbound,
}

/// TCP outcomes of one cgroup with one peer: outbound to the peer's port, or inbound on one of
/// the cgroup's own ports (the service, not the client's ephemeral port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// The cgroup (0: unknown — a socket opened before the programs were loaded).
    pub cgroup_id: u64,
    /// Who opened the connections.
    pub direction: Direction,
    /// The other end's address (IPv4-mapped IPv6 addresses are shown as IPv4).
    pub peer: Option<IpAddr>,
    /// Outbound: the port connected to. Inbound: the local port connections came in on.
    pub port: u16,
    /// connect() completed.
    pub active_established: u64,
    /// Incoming connections established.
    pub passive_established: u64,
    /// Retransmissions (all kinds, SYNs included).
    pub retransmits: u64,
    /// Retransmitted SYNs (connect() not answered).
    pub syn_retransmits: u64,
    /// Retransmissions that failed locally (kernels whose tracepoint reports it).
    pub retransmit_errors: u64,
    /// Resets sent on these connections.
    pub resets_sent: u64,
    /// Resets received.
    pub resets_received: u64,
    /// connect() failures by the errno the application saw: ECONNREFUSED, ETIMEDOUT,
    /// EHOSTUNREACH, ... ([`ERRNO_NONE`]: closed by the application before completing;
    /// [`ERRNO_OTHER`]: another errno). Only non-zero entries.
    pub connect_failed: BTreeMap<i32, u64>,
    /// Established connections that ended in an error (ECONNRESET, EPIPE, ETIMEDOUT...).
    pub connection_errors: BTreeMap<i32, u64>,
}

impl TcpStats {
    pub(crate) fn from_raw(key: &raw::TcpKey, v: &raw::TcpStats) -> Self {
        let by_errno = |slots: &[u64; raw::ERRNO_SLOTS]| {
            ERRNO_SLOTS
                .iter()
                .zip(slots.iter())
                .filter(|(_, n)| **n > 0)
                .map(|(e, n)| (*e, *n))
                .collect()
        };
        TcpStats {
            cgroup_id: key.cgroup_id,
            direction: if key.inbound != 0 {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            peer: ip_addr(key.family, &key.daddr),
            port: key.port,
            active_established: v.active_established,
            passive_established: v.passive_established,
            retransmits: v.retransmits,
            syn_retransmits: v.syn_retransmits,
            retransmit_errors: v.retransmit_errors,
            resets_sent: v.resets_sent,
            resets_received: v.resets_received,
            connect_failed: by_errno(&v.connect_failed),
            connection_errors: by_errno(&v.connection_errors),
        }
    }

    /// All connect() failures.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failed.values().sum()
    }

    /// connect() failures with this errno.
    pub fn connect_failed_with(&self, errno: i32) -> u64 {
        self.connect_failed.get(&errno).copied().unwrap_or(0)
    }

    /// The remote end of outbound rows.
    pub fn remote(&self) -> Option<SocketAddr> {
        match self.direction {
            Direction::Outbound => self.peer.map(|ip| SocketAddr::new(ip, self.port)),
            Direction::Inbound => None,
        }
    }

    /// Whether every counter is zero (e.g. the change between two equal snapshots).
    pub fn is_zero(&self) -> bool {
        let counters = [
            self.active_established,
            self.passive_established,
            self.retransmits,
            self.syn_retransmits,
            self.retransmit_errors,
            self.resets_sent,
            self.resets_received,
        ];
        counters.iter().all(|c| *c == 0)
            && self.connect_failed.values().all(|c| *c == 0)
            && self.connection_errors.values().all(|c| *c == 0)
    }

    /// Whether this row and `other` are about the same (cgroup, direction, peer, port).
    pub fn same_key(&self, other: &Self) -> bool {
        (self.cgroup_id, self.direction, self.peer, self.port)
            == (other.cgroup_id, other.direction, other.peer, other.port)
    }

    /// The change since an older snapshot of the same row.
    pub fn since(&self, earlier: &Self) -> Self {
        let sub_map = |now: &BTreeMap<i32, u64>, then: &BTreeMap<i32, u64>| {
            now.iter()
                .map(|(e, n)| (*e, n.saturating_sub(then.get(e).copied().unwrap_or(0))))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        TcpStats {
            cgroup_id: self.cgroup_id,
            direction: self.direction,
            peer: self.peer,
            port: self.port,
            active_established: self
                .active_established
                .saturating_sub(earlier.active_established),
            passive_established: self
                .passive_established
                .saturating_sub(earlier.passive_established),
            retransmits: self.retransmits.saturating_sub(earlier.retransmits),
            syn_retransmits: self.syn_retransmits.saturating_sub(earlier.syn_retransmits),
            retransmit_errors: self
                .retransmit_errors
                .saturating_sub(earlier.retransmit_errors),
            resets_sent: self.resets_sent.saturating_sub(earlier.resets_sent),
            resets_received: self.resets_received.saturating_sub(earlier.resets_received),
            connect_failed: sub_map(&self.connect_failed, &earlier.connect_failed),
            connection_errors: sub_map(&self.connection_errors, &earlier.connection_errors),
        }
    }
}

/// Scheduler figures of one cgroup (the cpu controller's hierarchy).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// The cgroup.
    pub cgroup_id: u64,
    /// Time from runnable to running (wake-up or preemption to being switched in). CFS
    /// throttling shows here: a throttled task waits runnable.
    pub runq_latency: Log2Histogram,
    /// Context switches away from this cgroup's tasks.
    pub switches: u64,
    /// Of those, switches while the task was still runnable (preempted or throttled).
    pub involuntary_switches: u64,
}

impl SchedStats {
    pub(crate) fn from_raw(cgroup_id: u64, per_cpu: &[raw::SchedStats]) -> Self {
        let mut s = SchedStats {
            cgroup_id,
            ..SchedStats::default()
        };
        for v in per_cpu {
            s.runq_latency.add(&Log2Histogram::from_raw(
                &v.slots, v.count, v.total_ns, v.max_ns,
            ));
            s.switches += v.switches;
            s.involuntary_switches += v.involuntary;
        }
        s
    }

    /// The change since an older snapshot of the same cgroup.
    pub fn since(&self, earlier: &Self) -> Self {
        SchedStats {
            cgroup_id: self.cgroup_id,
            runq_latency: self.runq_latency.since(&earlier.runq_latency),
            switches: self.switches.saturating_sub(earlier.switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(earlier.involuntary_switches),
        }
    }
}

/// Block IO of one cgroup (the io/blkio controller's hierarchy) on one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// The cgroup the IO was charged to (0: none, e.g. flushes).
    pub cgroup_id: u64,
    /// The device (major, minor); (0, 0) when the kernel does not say.
    pub device: (u32, u32),
    /// Issue-to-completion latency.
    pub latency: Log2Histogram,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Other requests (flush, discard...).
    pub other_ops: u64,
    /// Requests completed with an error.
    pub errors: u64,
}

impl BlockStats {
    pub(crate) fn from_raw(key: &raw::BlockKey, per_cpu: &[raw::BlockStats]) -> Self {
        let mut s = BlockStats {
            cgroup_id: key.cgroup_id,
            device: (key.dev >> 20, key.dev & 0xfffff),
            ..BlockStats::default()
        };
        for v in per_cpu {
            s.latency.add(&Log2Histogram::from_raw(
                &v.slots, v.count, v.total_ns, v.max_ns,
            ));
            s.read_bytes += v.read_bytes;
            s.write_bytes += v.write_bytes;
            s.read_ops += v.read_ops;
            s.write_ops += v.write_ops;
            s.other_ops += v.other_ops;
            s.errors += v.errors;
        }
        s
    }

    /// The change since an older snapshot of the same (cgroup, device).
    pub fn since(&self, earlier: &Self) -> Self {
        BlockStats {
            cgroup_id: self.cgroup_id,
            device: self.device,
            latency: self.latency.since(&earlier.latency),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(earlier.write_bytes),
            read_ops: self.read_ops.saturating_sub(earlier.read_ops),
            write_ops: self.write_ops.saturating_sub(earlier.write_ops),
            other_ops: self.other_ops.saturating_sub(earlier.other_ops),
            errors: self.errors.saturating_sub(earlier.errors),
        }
    }
}

/// The programs' own bookkeeping, per group: nothing is lost silently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounters {
    /// Events written to the ring buffer.
    pub events: u64,
    /// Events lost because the ring buffer was full (userspace not polling fast enough).
    pub ringbuf_drops: u64,
    /// Updates lost because an aggregation map was full.
    pub map_full: u64,
}

/// Everything the loaded programs have aggregated, read at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// When it was read.
    pub taken_at: SystemTime,
    /// Per (cgroup, remote).
    pub tcp: Vec<TcpStats>,
    /// Resets the host sent for segments no socket wanted (e.g. SYNs to closed ports).
    pub tcp_unsolicited_resets: u64,
    /// Per cgroup.
    pub sched: Vec<SchedStats>,
    /// Per (cgroup, device).
    pub block: Vec<BlockStats>,
    /// Per loaded group.
    pub counters: BTreeMap<Group, GroupCounters>,
    /// `/proc` and cgroup statistics, present when some group runs in fallback mode.
    pub fallback: Option<FallbackSnapshot>,
}

impl Snapshot {
    /// The scheduler figures of a cgroup.
    pub fn sched_for(&self, cgroup_id: u64) -> Option<&SchedStats> {
        self.sched.iter().find(|s| s.cgroup_id == cgroup_id)
    }

    /// The TCP rows of a cgroup.
    pub fn tcp_for(&self, cgroup_id: u64) -> impl Iterator<Item = &TcpStats> {
        self.tcp.iter().filter(move |s| s.cgroup_id == cgroup_id)
    }

    /// The outbound TCP row of a cgroup towards one remote end.
    pub fn tcp_to(&self, cgroup_id: u64, remote: SocketAddr) -> Option<&TcpStats> {
        self.tcp
            .iter()
            .find(|s| s.cgroup_id == cgroup_id && s.remote() == Some(remote))
    }

    /// The inbound TCP rows of a cgroup on one of its local ports (one row per peer address).
    pub fn tcp_inbound(&self, cgroup_id: u64, port: u16) -> impl Iterator<Item = &TcpStats> {
        self.tcp.iter().filter(move |s| {
            s.cgroup_id == cgroup_id && s.direction == Direction::Inbound && s.port == port
        })
    }

    /// The block rows of a cgroup.
    pub fn block_for(&self, cgroup_id: u64) -> impl Iterator<Item = &BlockStats> {
        self.block.iter().filter(move |s| s.cgroup_id == cgroup_id)
    }
}

/// A socket address from the programs' (family, 16 address bytes, port).
pub(crate) fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> Option<SocketAddr> {
    ip_addr(family, addr).map(|ip| SocketAddr::new(ip, port))
}

pub(crate) fn ip_addr(family: u16, addr: &[u8; 16]) -> Option<IpAddr> {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    match family {
        AF_INET => Some(IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        AF_INET6 => Some(IpAddr::from(*addr).to_canonical()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(usize, u64)]) -> Log2Histogram {
        let mut h = Log2Histogram::default();
        for &(k, n) in pairs {
            h.buckets[k] = n;
            h.count += n;
        }
        h
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        // 90 samples in [2, 4) us, 10 in [65.536, 131.072) ms.
        let h = hist(&[(1, 90), (16, 10)]);
        let p50 = h.p50().unwrap_or_default();
        assert!(
            p50 >= Duration::from_micros(2) && p50 < Duration::from_micros(4),
            "{p50:?}"
        );
        let p95 = h.p95().unwrap_or_default();
        let (lo, hi) = Log2Histogram::bucket_range(16);
        assert!(p95 >= lo && p95 < hi, "{p95:?} not in {lo:?}..{hi:?}");
        assert_eq!(Log2Histogram::default().p95(), None);
    }

    #[test]
    fn max_caps_the_estimate_and_since_subtracts() {
        let mut h = hist(&[(10, 4)]);
        h.max = Duration::from_micros(1100);
        assert!(h.quantile(1.0).unwrap_or_default() <= Duration::from_micros(1100));
        let later = hist(&[(10, 6), (12, 3)]);
        let d = later.since(&h);
        assert_eq!(d.buckets[10], 2);
        assert_eq!(d.buckets[12], 3);
        assert_eq!(d.count, 5);
    }

    #[test]
    fn tcp_rows_decode_addresses_and_errnos() {
        let key = raw::TcpKey {
            cgroup_id: 7,
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 5432,
            family: 2,
            inbound: 0,
            _pad: [0; 3],
        };
        let mut v = <raw::TcpStats as bytemuck::Zeroable>::zeroed();
        v.connect_failed[0] = 3; // ECONNREFUSED
        v.connect_failed[1] = 1; // ETIMEDOUT
        v.connection_errors[4] = 2; // ECONNRESET
        let s = TcpStats::from_raw(&key, &v);
        assert_eq!(s.direction, Direction::Outbound);
        assert_eq!(s.remote(), Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(s.connect_failed_with(libc_errno::ECONNREFUSED), 3);
        assert_eq!(s.connect_failed_with(libc_errno::ETIMEDOUT), 1);
        assert_eq!(s.connect_failures(), 4);
        assert_eq!(s.connection_errors.get(&libc_errno::ECONNRESET), Some(&2));
        let mapped: [u8; 16] = std::net::Ipv4Addr::new(10, 0, 0, 1)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(ip_addr(10, &mapped), Some(IpAddr::from([10, 0, 0, 1])));
        let inbound = TcpStats::from_raw(&raw::TcpKey { inbound: 1, ..key }, &v);
        assert_eq!(
            (inbound.direction, inbound.port, inbound.remote()),
            (Direction::Inbound, 5432, None)
        );
    }
}
