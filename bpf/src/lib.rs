//! Faultline's eBPF telemetry: kernel evidence of what a fault does to its targets.
//!
//! The agent loads these programs while a run is going and streams what they see to the
//! coordinator: TCP outcomes (connections established, connect failures by the errno the
//! application sees, retransmits, resets) per cgroup and remote end; run-queue latency and
//! context switches per cgroup; OOM kills with their victim; process exec and exit (crash
//! loops); block IO latency and bytes per cgroup. Aggregates stay in kernel maps and are read
//! by [`Telemetry::snapshot`]; discrete events come through ring buffers via
//! [`Telemetry::poll_events`].
//!
//! # Programs and attach types
//!
//! | group | attached to | output |
//! |---|---|---|
//! | [`Group::Tcp`] | `tp_btf/inet_sock_set_state`, `tp_btf/tcp_retransmit_skb`, `tp_btf/tcp_send_reset`, `tp_btf/tcp_receive_reset`, `tp_btf/tcp_destroy_sock` | [`TcpStats`], [`ConnectFailed`], [`ConnectionError`] |
//! | [`Group::Sched`] | `tp_btf/sched_switch` (with the kernel's sched_info), else `tp_btf/sched_wakeup`, `tp_btf/sched_wakeup_new`, `tp_btf/sched_switch` | [`SchedStats`] |
//! | [`Group::Oom`] | `tp_btf/mark_victim` | [`OomKill`] |
//! | [`Group::Proc`] | `tp_btf/sched_process_exec`, `tp_btf/sched_process_exit` | [`Exec`], [`Exit`] |
//! | [`Group::Block`] | `tp_btf/block_rq_issue`, `tp_btf/block_rq_complete` | [`BlockStats`] |
//!
//! Only BTF-typed tracepoints (`tp_btf`, Linux 5.5+) are used. They need no tracefs, take
//! typed kernel pointers (so the programs read `sk->sk_err` or `task->exit_code` with plain
//! loads, CO-RE-relocated) and cost about a function call. On this project's CI kernel (6.18,
//! Firecracker) `fentry`/`fexit` fail with EPERM (no ftrace trampolines) and kprobes are not
//! built in, so neither is used; typical hosts have both, but nothing here would gain from
//! them — every signal has a stable tracepoint. Where a tracepoint's prototype differs between
//! kernels (`mark_victim` passes only a pid on older kernels and the task on newer ones;
//! `tcp_retransmit_skb` gained an `err` argument), the object carries one program per
//! prototype and the loader enables the one matching the running kernel's BTF; a missing
//! optional tracepoint is left out and noted in [`GroupStatus`]. Ring buffers need 5.8, task
//! storage in tracing programs 5.11.
//!
//! Run-queue latency needs the time each task became runnable. Where the kernel keeps it
//! itself (`task_struct.sched_info.last_queued`: CONFIG_SCHED_INFO, which distributions
//! enable, maintained for every task since 5.14) one program on `sched_switch` reads it
//! against its run queue's clock; elsewhere three programs stamp tasks in task storage on
//! wake-up and preemption, at about twice the cost per context switch. The loader picks the
//! first where the kernel's BTF and version allow, falls back to the second if it is refused,
//! and says which in the group's notes ([`RunqTimestamps`]).
//!
//! Each group is its own BPF object: one failing to load or verify leaves the others running,
//! and [`Telemetry::status`] says which loaded, which failed (with the reason) and which fall
//! back to `/proc` and cgroup files ([`fallback`]).
//!
//! # Attribution
//!
//! Every event carries pid, thread id, command name and a cgroup id. A cgroup id is the
//! directory inode of the cgroup in one hierarchy (see [`cgroup`]): the cpu controller's for
//! [`Group::Sched`], the memory controller's for [`Group::Oom`], the io (blkio) controller's
//! for [`Group::Block`] (the cgroup the IO is charged to), and for TCP and process events the
//! hierarchy chosen by [`Options::attribution`] (v1 `memory` on v1/v2 hybrids like this
//! project's machines, the unified hierarchy on pure cgroup v2 hosts).
//! [`Telemetry::hierarchy`] tells which; [`Hierarchy::id_of`] and [`Hierarchy::path_of`]
//! convert. TCP state changes after `connect()` run in softirq context, so each socket's owner
//! is recorded when it is created (connect, listen, accept) and reused later.
//!
//! TCP rows are per (cgroup, direction, peer address, port): outbound connections by the port
//! connected to, inbound ones by the local port they were accepted on (so a server under load
//! makes one row per client address, not one per connection). Sockets opened before the
//! programs were loaded have no recorded owner: pid 0 and, unless attribution uses the
//! unified hierarchy (where the socket's own cgroup is known), cgroup 0.
//!
//! With [`Telemetry::set_scope`], only the given cgroups and their descendants are counted
//! (everything else is skipped in the kernel), and counts are keyed by the scoped cgroup.
//!
//! # Cost
//!
//! Run `cargo bench -p faultline-bpf --bench overhead` (root) for figures on the machine at
//! hand. Two choices keep the per-event cost low: fields are read with plain loads through the
//! tracepoints' BTF pointers instead of `bpf_probe_read_kernel` calls, and ring buffer
//! readers are woken only when [`Options::ringbuf_wakeup_bytes`] are pending (a wake-up per
//! event costs an inter-processor interrupt: ~15 µs per event in this project's VMs).
//! Aggregates are per-CPU where the rate is highest (scheduler, block IO). Every loss is
//! counted: [`GroupCounters`] in each [`Snapshot`].
//!
//! # Building
//!
//! `build.rs` compiles `src/bpf/*.bpf.c` with clang and generates the skeletons with
//! libbpf-cargo; libbpf itself is vendored (libbpf-sys). The kernel types header,
//! `vmlinux.h`, is **generated at build time** from the build machine's
//! `/sys/kernel/btf/vmlinux` with `bpftool` rather than committed (it is ~3 MB and would need
//! regenerating for new kernel features anyway). So the build needs `clang`, `bpftool`,
//! `libelf-dev`, `zlib1g-dev` and `pkg-config` (`.ci/run` installs them) and a kernel with BTF —
//! true of every machine of this project and of most distribution kernels since 2020. The
//! resulting objects are not tied to the build kernel: libbpf relocates every field access
//! against the running kernel's BTF. `FAULTLINE_BPF_VMLINUX_H=/path/vmlinux.h` builds on a
//! machine without BTF.
//!
//! # Privileges and threads
//!
//! Loading needs root (or CAP_BPF + CAP_PERFMON). [`Telemetry`] is `Send`, not `Sync`: own it
//! from one thread (e.g. a blocking task polling events and taking snapshots at an interval).

pub mod cgroup;
mod error;
mod events;
pub mod fallback;
mod raw;
mod skel;
mod stats;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use libbpf_rs::btf::BtfKind;
use libbpf_rs::btf::types::FuncProto;
use libbpf_rs::{Btf, ErrorKind, MapCore, MapFlags, RingBuffer, RingBufferBuilder};

pub use cgroup::{Attribution, CgroupMounts, Hierarchy, HierarchyKind, V1Controller};
pub use error::BpfError;
pub use events::{ConnectFailed, ConnectionError, Exec, Exit, OomKill, TelemetryEvent};
pub use fallback::FallbackSnapshot;
pub use stats::{
    BlockStats, Direction, ERRNO_NONE, ERRNO_OTHER, GroupCounters, Log2Histogram, SchedStats,
    Snapshot, TcpStats, errno_name, libc_errno,
};

use crate::events::Clock;
use crate::skel::Pinned;

/// A set of programs loaded (or failing) together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// TCP connection outcomes, retransmits, resets.
    Tcp,
    /// Run-queue latency and context switches.
    Sched,
    /// OOM kills.
    Oom,
    /// Process exec and exit.
    Proc,
    /// Block IO latency and bytes.
    Block,
}

impl Group {
    /// Every group.
    pub const ALL: [Group; 5] = [
        Group::Tcp,
        Group::Sched,
        Group::Oom,
        Group::Proc,
        Group::Block,
    ];

    /// Its name in status lines and reports.
    pub fn name(self) -> &'static str {
        match self {
            Group::Tcp => "tcp",
            Group::Sched => "sched",
            Group::Oom => "oom",
            Group::Proc => "proc",
            Group::Block => "block",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What became of a group at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupState {
    /// Loaded and attached.
    Loaded {
        /// The programs attached.
        programs: Vec<&'static str>,
        /// What this kernel lacks, and what is therefore not counted; which mechanism was
        /// used where there is a choice.
        notes: Vec<String>,
    },
    /// Not loaded; coarser `/proc` or cgroup statistics stand in (see [`Snapshot::fallback`]).
    Fallback {
        /// Why the programs did not load.
        reason: String,
        /// What stands in.
        fallback: String,
    },
    /// Not loaded, and nothing stands in.
    Failed {
        /// Why.
        reason: String,
    },
    /// Not requested in [`Options::groups`].
    Disabled,
}

/// A group's state and the cgroup hierarchy its cgroup ids belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: Group,
    /// Its state.
    pub state: GroupState,
    /// The hierarchy of the cgroup ids it reports (`None`: no cgroup file system mounted).
    pub hierarchy: Option<Hierarchy>,
}

impl GroupStatus {
    /// Whether the programs are running.
    pub fn is_loaded(&self) -> bool {
        matches!(self.state, GroupState::Loaded { .. })
    }
}

impl fmt::Display for GroupStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            GroupState::Loaded { programs, notes } => {
                write!(f, "{}: loaded ({})", self.group, programs.join(", "))?;
                if let Some(h) = &self.hierarchy {
                    write!(f, "; cgroups: {}", h.kind)?;
                }
                for n in notes {
                    write!(f, "; {n}")?;
                }
                Ok(())
            }
            GroupState::Fallback { reason, fallback } => {
                write!(f, "{}: fallback to {fallback} ({reason})", self.group)
            }
            GroupState::Failed { reason } => write!(f, "{}: failed ({reason})", self.group),
            GroupState::Disabled => write!(f, "{}: disabled", self.group),
        }
    }
}

/// What to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The groups to load (default: all).
    pub groups: Vec<Group>,
    /// Which cgroup hierarchy attributes TCP and process events.
    pub attribution: Attribution,
    /// Ring buffer size per event group, bytes: a power of two, at least a page (default
    /// 256 KiB, about 2,500 events between two polls).
    pub ringbuf_bytes: u32,
    /// Wake the reader only once this many bytes of events are pending (default: an eighth of
    /// the ring buffer). Waking it for every event costs an inter-processor interrupt each,
    /// which dominates the cost of an event in VMs; pending events are collected anyway at the
    /// end of every [`Telemetry::poll_events`] timeout, so they wait at most that long. 0 wakes
    /// the reader for every event. OOM kills always wake it.
    pub ringbuf_wakeup_bytes: u32,
    /// Where the scheduler group gets the time a task became runnable from.
    pub runq_timestamps: RunqTimestamps,
}

/// How the scheduler programs learn when a task became runnable, to time its run-queue wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunqTimestamps {
    /// The kernel's own `sched_info.last_queued` where the kernel keeps it (CONFIG_SCHED_INFO,
    /// 5.14 or later): one program on `sched_switch`, no per-task state. Otherwise, or if
    /// that program is refused, [`RunqTimestamps::Programs`] (said in the group's notes).
    #[default]
    Auto,
    /// The programs stamp tasks themselves, in task storage, on `sched_wakeup`,
    /// `sched_wakeup_new` and `sched_switch`: works wherever task storage does, costs more.
    Programs,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            groups: Group::ALL.to_vec(),
            attribution: Attribution::Auto,
            ringbuf_bytes: 256 * 1024,
            ringbuf_wakeup_bytes: 32 * 1024,
            runq_timestamps: RunqTimestamps::Auto,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<TelemetryEvent>,
    undecodable: u64,
}

/// The loaded programs. Dropping it detaches and unloads everything.
pub struct Telemetry {
    // Declared first, so it is dropped before the skeletons owning the maps it reads.
    ring: Option<RingBuffer<'static>>,
    queue: Arc<Mutex<Queue>>,
    tcp: Option<Pinned<skel::tcp::TcpSkel<'static>>>,
    sched: Option<Pinned<skel::sched::SchedSkel<'static>>>,
    oom: Option<Pinned<skel::oom::OomSkel<'static>>>,
    proc: Option<Pinned<skel::proc::ProcSkel<'static>>>,
    block: Option<Pinned<skel::block::BlockSkel<'static>>>,
    status: Vec<GroupStatus>,
    mounts: CgroupMounts,
    scope: Vec<PathBuf>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("status", &self.status)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

// The agent moves telemetry into a blocking task or thread of its own.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Telemetry>();
};

/// A group's loaded skeleton, the programs it attached and notes on what is missing.
type Loaded<S> = (Pinned<S>, Vec<&'static str>, Vec<String>);

impl Telemetry {
    /// Loads and attaches the requested groups. A group that cannot load is reported in
    /// [`Telemetry::status`] (failed, or falling back to `/proc` and cgroup files) and does not
    /// affect the others; this fails only when the host's cgroup mounts cannot be read or the
    /// ring buffers cannot be set up.
    pub fn load(options: &Options) -> Result<Telemetry, BpfError> {
        let mounts = CgroupMounts::discover()?;
        let btf = KernelBtf::load();
        let mut t = Telemetry {
            ring: None,
            queue: Arc::new(Mutex::new(Queue::default())),
            tcp: None,
            sched: None,
            oom: None,
            proc: None,
            block: None,
            status: Vec::new(),
            mounts,
            scope: Vec::new(),
        };
        for group in Group::ALL {
            let hierarchy = match group {
                Group::Tcp | Group::Proc => t.mounts.primary(options.attribution),
                Group::Sched => t.mounts.for_controller(V1Controller::Cpu),
                Group::Oom => t.mounts.for_controller(V1Controller::Memory),
                Group::Block => t.mounts.for_controller(V1Controller::Blkio),
            };
            let state = if !options.groups.contains(&group) {
                GroupState::Disabled
            } else {
                let cg_source = hierarchy.as_ref().map_or(0, Hierarchy::cg_source);
                let loaded = match &btf {
                    Err(reason) => Err(reason.clone()),
                    Ok(btf) => t.load_group(group, btf, cg_source, options),
                };
                match loaded {
                    Ok((programs, notes)) => GroupState::Loaded { programs, notes },
                    Err(reason) => match fallback::source_for(group, &t.mounts) {
                        Some(fallback) => GroupState::Fallback { reason, fallback },
                        None => GroupState::Failed { reason },
                    },
                }
            };
            t.status.push(GroupStatus {
                group,
                state,
                hierarchy,
            });
        }
        t.build_ring_buffer()?;
        Ok(t)
    }

    fn load_group(
        &mut self,
        group: Group,
        btf: &KernelBtf,
        cg_source: u32,
        options: &Options,
    ) -> Result<(Vec<&'static str>, Vec<String>), String> {
        let ring = RingConfig {
            bytes: options.ringbuf_bytes,
            wakeup_bytes: options.ringbuf_wakeup_bytes,
        };
        macro_rules! keep {
            ($slot:ident, $result:expr) => {{
                let (pinned, programs, notes) = $result?;
                self.$slot = Some(pinned);
                Ok((programs, notes))
            }};
        }
        match group {
            Group::Tcp => keep!(tcp, load_tcp(btf, cg_source, ring)),
            Group::Sched => keep!(sched, load_sched(btf, cg_source, options.runq_timestamps)),
            Group::Oom => keep!(oom, load_oom(btf, cg_source, ring)),
            Group::Proc => keep!(proc, load_proc(btf, cg_source, ring)),
            Group::Block => keep!(block, load_block(btf, cg_source)),
        }
    }

    fn build_ring_buffer(&mut self) -> Result<(), BpfError> {
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096);
        let clock = Clock::now();
        let mut builder = RingBufferBuilder::new();
        let mut any = false;
        let maps: [Option<&dyn MapCore>; 3] = [
            self.tcp
                .as_ref()
                .map(|s| &s.get().maps.events as &dyn MapCore),
            self.oom
                .as_ref()
                .map(|s| &s.get().maps.events as &dyn MapCore),
            self.proc
                .as_ref()
                .map(|s| &s.get().maps.events as &dyn MapCore),
        ];
        for map in maps.into_iter().flatten() {
            let queue = Arc::clone(&self.queue);
            builder
                .add(map, move |data: &[u8]| {
                    let mut q = queue.lock().unwrap_or_else(PoisonError::into_inner);
                    match events::decode(data, &clock, page_size) {
                        Some(event) => q.events.push_back(event),
                        None => q.undecodable += 1,
                    }
                    0
                })
                .map_err(BpfError::libbpf("adding a ring buffer"))?;
            any = true;
        }
        if any {
            self.ring = Some(
                builder
                    .build()
                    .map_err(BpfError::libbpf("setting up ring buffers"))?,
            );
        }
        Ok(())
    }

    /// Per group: loaded, failed (with the reason) or falling back.
    pub fn status(&self) -> &[GroupStatus] {
        &self.status
    }

    /// Whether a group's programs are running.
    pub fn is_loaded(&self, group: Group) -> bool {
        self.status
            .iter()
            .any(|s| s.group == group && s.is_loaded())
    }

    /// Detaches every program, keeping them loaded and the maps with their contents: until
    /// [`Telemetry::attach`], nothing runs and nothing is counted. Used to measure what the
    /// programs cost (the overhead benchmark toggles them many times a second), and cheap
    /// enough for that: no reload, no verifier.
    pub fn detach(&mut self) {
        macro_rules! detach {
            ($($slot:ident),*) => {
                $(if let Some(s) = self.$slot.as_mut() {
                    s.detach();
                })*
            };
        }
        detach!(tcp, sched, oom, proc, block);
    }

    /// Attaches the loaded programs again after [`Telemetry::detach`] (nothing for groups
    /// already attached). On failure the groups attached so far stay attached.
    pub fn attach(&mut self) -> Result<(), BpfError> {
        macro_rules! attach {
            ($($slot:ident),*) => {
                $(if let Some(s) = self.$slot.as_mut() {
                    s.attach().map_err(BpfError::libbpf(concat!(
                        "attaching the ",
                        stringify!($slot),
                        " programs again"
                    )))?;
                })*
            };
        }
        attach!(tcp, sched, oom, proc, block);
        Ok(())
    }

    /// Whether every loaded group's programs are attached (see [`Telemetry::detach`]).
    pub fn is_attached(&self) -> bool {
        [
            self.tcp.as_ref().map(|s| s.is_attached()),
            self.sched.as_ref().map(|s| s.is_attached()),
            self.oom.as_ref().map(|s| s.is_attached()),
            self.proc.as_ref().map(|s| s.is_attached()),
            self.block.as_ref().map(|s| s.is_attached()),
        ]
        .into_iter()
        .flatten()
        .all(|attached| attached)
    }

    /// The hierarchy the cgroup ids of a group belong to.
    pub fn hierarchy(&self, group: Group) -> Option<&Hierarchy> {
        self.status
            .iter()
            .find(|s| s.group == group)
            .and_then(|s| s.hierarchy.as_ref())
    }

    /// The host's cgroup mounts, as found at load time.
    pub fn mounts(&self) -> &CgroupMounts {
        &self.mounts
    }

    /// Waits up to `timeout` for events, then returns everything the ring buffers hold.
    /// Without event groups loaded, just sleeps for `timeout`.
    pub fn poll_events(&mut self, timeout: Duration) -> Result<Vec<TelemetryEvent>, BpfError> {
        match &self.ring {
            Some(ring) => {
                match ring.poll(timeout) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(BpfError::libbpf("polling ring buffers")(e)),
                }
                // Events below the wake-up threshold did not wake the poll: collect them too.
                ring.consume()
                    .map_err(BpfError::libbpf("consuming ring buffers"))?;
            }
            None => std::thread::sleep(timeout),
        }
        Ok(self.take_queued())
    }

    /// Returns the events the ring buffers hold now, without waiting.
    pub fn drain_events(&mut self) -> Result<Vec<TelemetryEvent>, BpfError> {
        if let Some(ring) = &self.ring {
            ring.consume()
                .map_err(BpfError::libbpf("consuming ring buffers"))?;
        }
        Ok(self.take_queued())
    }

    fn take_queued(&self) -> Vec<TelemetryEvent> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.events.drain(..).collect()
    }

    /// Ring buffer records that could not be decoded (a program/loader mismatch: should stay 0).
    pub fn undecodable_events(&self) -> u64 {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .undecodable
    }

    /// Reads every aggregate the loaded programs keep (cumulative since load), plus the
    /// fallback statistics when some group runs in fallback mode.
    pub fn snapshot(&self) -> Result<Snapshot, BpfError> {
        let mut snap = Snapshot {
            taken_at: SystemTime::now(),
            tcp: Vec::new(),
            tcp_unsolicited_resets: 0,
            sched: Vec::new(),
            block: Vec::new(),
            counters: BTreeMap::new(),
            fallback: None,
        };
        if let Some(s) = &self.tcp {
            let map = &s.get().maps.tcp_stats;
            for key in map.keys() {
                let Some(k) = raw::read::<raw::TcpKey>(&key) else {
                    continue;
                };
                let value = map
                    .lookup(&key, MapFlags::ANY)
                    .map_err(BpfError::libbpf("reading tcp_stats"))?;
                if let Some(v) = value.as_deref().and_then(raw::read::<raw::TcpStats>) {
                    snap.tcp.push(stats::TcpStats::from_raw(&k, &v));
                }
            }
            snap.tcp_unsolicited_resets =
                read_counter(&s.get().maps.fl_counters, raw::CNT_UNSOLICITED_RESETS)?;
        }
        if let Some(s) = &self.sched {
            let map = &s.get().maps.sched_stats;
            for key in map.keys() {
                let Some(id) = raw::read::<u64>(&key) else {
                    continue;
                };
                let values = map
                    .lookup_percpu(&key, MapFlags::ANY)
                    .map_err(BpfError::libbpf("reading sched_stats"))?;
                if let Some(values) = values {
                    let per_cpu: Vec<raw::SchedStats> =
                        values.iter().filter_map(|v| raw::read(v)).collect();
                    snap.sched.push(stats::SchedStats::from_raw(id, &per_cpu));
                }
            }
        }
        if let Some(s) = &self.block {
            let map = &s.get().maps.block_stats;
            for key in map.keys() {
                let Some(k) = raw::read::<raw::BlockKey>(&key) else {
                    continue;
                };
                let values = map
                    .lookup_percpu(&key, MapFlags::ANY)
                    .map_err(BpfError::libbpf("reading block_stats"))?;
                if let Some(values) = values {
                    let per_cpu: Vec<raw::BlockStats> =
                        values.iter().filter_map(|v| raw::read(v)).collect();
                    snap.block.push(stats::BlockStats::from_raw(&k, &per_cpu));
                }
            }
        }
        for group in Group::ALL {
            if let Some(maps) = self.common_maps(group) {
                snap.counters.insert(
                    group,
                    GroupCounters {
                        events: read_counter(maps.counters, raw::CNT_EVENTS)?,
                        ringbuf_drops: read_counter(maps.counters, raw::CNT_RINGBUF_DROPS)?,
                        map_full: read_counter(maps.counters, raw::CNT_MAP_FULL)?,
                    },
                );
            }
        }
        if self
            .status
            .iter()
            .any(|s| matches!(s.state, GroupState::Fallback { .. }))
        {
            snap.fallback = Some(self.fallback_snapshot());
        }
        Ok(snap)
    }

    /// The `/proc` and cgroup statistics for the current scope, whatever the groups' state.
    pub fn fallback_snapshot(&self) -> FallbackSnapshot {
        FallbackSnapshot::collect(&self.mounts, &self.scope)
    }

    /// Counts only tasks in these cgroups and their descendants, in every loaded group. Paths
    /// are relative to each hierarchy's root (as in `/proc/<pid>/cgroup`), and must exist in
    /// the hierarchy of every loaded group (container runtimes create them in each). Nothing
    /// changes if one cannot be resolved.
    pub fn set_scope<P: AsRef<Path>>(&mut self, cgroups: &[P]) -> Result<(), BpfError> {
        let mut plan = Vec::new();
        for status in self.status.iter().filter(|s| s.is_loaded()) {
            let hierarchy = status.hierarchy.as_ref().ok_or(BpfError::Malformed {
                what: "cgroup mounts",
                detail: format!("no cgroup hierarchy for the {} programs", status.group),
            })?;
            let ids = cgroups
                .iter()
                .map(|p| hierarchy.id_of(p))
                .collect::<Result<Vec<_>, _>>()?;
            plan.push((status.group, ids));
        }
        for (group, ids) in plan {
            self.apply_scope(group, Some(&ids))?;
        }
        self.scope = cgroups.iter().map(|p| p.as_ref().to_owned()).collect();
        Ok(())
    }

    /// Counts only these cgroup ids (and descendants) in one group: for callers that resolved
    /// ids themselves (see [`Telemetry::hierarchy`]).
    pub fn set_scope_ids(&mut self, group: Group, ids: &[u64]) -> Result<(), BpfError> {
        self.apply_scope(group, Some(ids))
    }

    /// Counts everything again.
    pub fn clear_scope(&mut self) -> Result<(), BpfError> {
        for group in Group::ALL {
            if self.common_maps(group).is_some() {
                self.apply_scope(group, None)?;
            }
        }
        self.scope.clear();
        Ok(())
    }

    /// The cgroup paths of the current scope (empty: everything is counted).
    pub fn scope(&self) -> &[PathBuf] {
        &self.scope
    }

    fn apply_scope(&self, group: Group, ids: Option<&[u64]>) -> Result<(), BpfError> {
        let maps = self
            .common_maps(group)
            .ok_or(BpfError::NotLoaded { group })?;
        let wanted: BTreeSet<u64> = ids.unwrap_or_default().iter().copied().collect();
        let current: BTreeSet<u64> = maps
            .scope
            .keys()
            .filter_map(|k| raw::read::<u64>(&k))
            .collect();
        let config = |active: u32| {
            let value = raw::Config {
                scope_active: active,
                _pad: 0,
            };
            maps.config
                .update(
                    &0u32.to_ne_bytes(),
                    bytemuck::bytes_of(&value),
                    MapFlags::ANY,
                )
                .map_err(BpfError::libbpf(format!(
                    "switching the {group} scope filter"
                )))
        };
        if ids.is_none() {
            config(0)?;
        }
        for id in wanted.difference(&current) {
            maps.scope
                .update(&id.to_ne_bytes(), &[1], MapFlags::ANY)
                .map_err(|e| {
                    if e.kind() == ErrorKind::OutOfMemory || e.kind() == ErrorKind::TooBig {
                        BpfError::ScopeFull {
                            group,
                            max: maps.scope.max_entries(),
                        }
                    } else {
                        BpfError::libbpf(format!("adding cgroup {id} to the {group} scope"))(e)
                    }
                })?;
        }
        for id in current.difference(&wanted) {
            maps.scope
                .delete(&id.to_ne_bytes())
                .map_err(BpfError::libbpf(format!(
                    "removing cgroup {id} from the {group} scope"
                )))?;
        }
        if ids.is_some() {
            config(1)?;
        }
        Ok(())
    }

    fn common_maps(&self, group: Group) -> Option<CommonMaps<'_>> {
        macro_rules! maps {
            ($slot:ident) => {
                self.$slot.as_ref().map(|s| {
                    let m = &s.get().maps;
                    CommonMaps {
                        config: &m.fl_config,
                        scope: &m.fl_scope,
                        counters: &m.fl_counters,
                    }
                })
            };
        }
        match group {
            Group::Tcp => maps!(tcp),
            Group::Sched => maps!(sched),
            Group::Oom => maps!(oom),
            Group::Proc => maps!(proc),
            Group::Block => maps!(block),
        }
    }
}

/// Severity of a libbpf message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LibbpfLevel {
    /// Warnings, including verifier logs of programs that failed to load.
    Warn,
    /// Progress information.
    Info,
    /// Everything.
    Debug,
}

/// A receiver of libbpf messages.
pub type LibbpfLogger = fn(LibbpfLevel, &str);

static LIBBPF_LOGGER: Mutex<Option<LibbpfLogger>> = Mutex::new(None);

fn libbpf_trampoline(level: libbpf_rs::PrintLevel, msg: String) {
    let logger = *LIBBPF_LOGGER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(log) = logger {
        let level = match level {
            libbpf_rs::PrintLevel::Warn => LibbpfLevel::Warn,
            libbpf_rs::PrintLevel::Info => LibbpfLevel::Info,
            libbpf_rs::PrintLevel::Debug => LibbpfLevel::Debug,
        };
        log(level, msg.trim_end());
    }
}

/// Sends libbpf's messages of at least `min` severity to `logger` (by default libbpf prints
/// info and warnings to stderr), e.g. into the agent's `tracing` output. Process-wide.
pub fn set_libbpf_logger(min: LibbpfLevel, logger: LibbpfLogger) {
    *LIBBPF_LOGGER.lock().unwrap_or_else(PoisonError::into_inner) = Some(logger);
    let min = match min {
        LibbpfLevel::Warn => libbpf_rs::PrintLevel::Warn,
        LibbpfLevel::Info => libbpf_rs::PrintLevel::Info,
        LibbpfLevel::Debug => libbpf_rs::PrintLevel::Debug,
    };
    libbpf_rs::set_print(Some((min, libbpf_trampoline)));
}

/// Programs that do nothing, attached to the tracepoints the telemetry groups use: what
/// merely running a BPF program at those points costs, the floor under any design that
/// observes every such event. For the overhead benchmark; not part of the agent.
#[doc(hidden)]
#[derive(Debug)]
pub struct EmptyPrograms {
    skel: skel::Pinned<skel::floor::FloorSkel<'static>>,
}

impl EmptyPrograms {
    /// Loads and attaches them.
    pub fn load() -> Result<EmptyPrograms, BpfError> {
        let skel = skel::open_load(skel::floor::FloorSkelBuilder::default(), |_| Ok(())).map_err(
            |(step, source)| BpfError::Libbpf {
                context: format!("empty programs: {step}"),
                source,
            },
        )?;
        Ok(EmptyPrograms { skel })
    }

    /// Detaches them (they stay loaded).
    pub fn detach(&mut self) {
        self.skel.detach();
    }

    /// Attaches them again.
    pub fn attach(&mut self) -> Result<(), BpfError> {
        self.skel
            .attach()
            .map_err(BpfError::libbpf("attaching the empty programs again"))
    }
}

/// How often one attached program ran and for how long: the programs' own CPU cost, which the
/// kernel charges to whatever task or interrupt hit the tracepoint (not to the agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// Its group.
    pub group: Group,
    /// The program (function) name, as the kernel knows it (at most 15 characters).
    pub name: String,
    /// Runs counted by the kernel.
    pub run_count: u64,
    /// Time spent running.
    pub run_time: Duration,
}

impl Telemetry {
    /// Run counts and times of the attached programs, from the kernel's program info. The
    /// kernel counts them only while `kernel.bpf_stats_enabled` is 1 (off by default, since
    /// it costs two clock reads per run).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, BpfError> {
        use libbpf_rs::skel::Skel as _;
        use std::os::fd::AsFd as _;
        let mut ids = BTreeMap::new();
        macro_rules! ids_of {
            ($slot:ident, $group:expr) => {
                if let Some(s) = &self.$slot {
                    for prog in s.get().object().progs().filter(|p| p.autoload()) {
                        let id = libbpf_rs::Program::id_from_fd(prog.as_fd())
                            .map_err(BpfError::libbpf("reading a program's id"))?;
                        ids.insert(id, $group);
                    }
                }
            };
        }
        ids_of!(tcp, Group::Tcp);
        ids_of!(sched, Group::Sched);
        ids_of!(oom, Group::Oom);
        ids_of!(proc, Group::Proc);
        ids_of!(block, Group::Block);
        Ok(libbpf_rs::query::ProgInfoIter::default()
            .filter_map(|info| {
                ids.get(&info.id).map(|group| ProgramStats {
                    group: *group,
                    name: info.name.to_string_lossy().into_owned(),
                    run_count: info.run_cnt,
                    run_time: Duration::from_nanos(info.run_time_ns),
                })
            })
            .collect())
    }
}

/// The maps every object has (from `common.h`).
struct CommonMaps<'a> {
    config: &'a dyn MapCore,
    scope: &'a dyn MapCore,
    counters: &'a dyn MapCore,
}

fn read_counter(map: &dyn MapCore, idx: u32) -> Result<u64, BpfError> {
    let values = map
        .lookup_percpu(&idx.to_ne_bytes(), MapFlags::ANY)
        .map_err(BpfError::libbpf("reading counters"))?;
    Ok(values
        .unwrap_or_default()
        .iter()
        .filter_map(|v| raw::read::<u64>(v))
        .sum())
}

/// The running kernel's BTF, to pick programs by tracepoint prototype.
struct KernelBtf(Btf<'static>);

impl KernelBtf {
    fn load() -> Result<Self, String> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            return Err(format!(
                "this kernel has no BTF ({} is missing): CO-RE programs cannot be relocated",
                path.display()
            ));
        }
        Btf::from_vmlinux()
            .map(KernelBtf)
            .map_err(|e| format!("reading kernel BTF: {e}"))
    }

    /// The kinds of a BTF-typed tracepoint's arguments (after the context pointer), or `None`
    /// when the kernel does not have it.
    fn tracepoint_args(&self, name: &str) -> Option<Vec<BtfKind>> {
        let btf = &self.0;
        let typedef =
            btf.type_by_name::<libbpf_rs::btf::types::Typedef<'_>>(&format!("btf_trace_{name}"))?;
        let ptr = typedef.next_type()?.skip_mods_and_typedefs();
        let proto = FuncProto::try_from(ptr.next_type()?.skip_mods_and_typedefs()).ok()?;
        let kinds = proto
            .iter()
            .skip(1)
            .map(|p| {
                btf.type_by_id::<libbpf_rs::btf::BtfType<'_>>(p.ty)
                    .map_or(BtfKind::Void, |t| t.skip_mods_and_typedefs().kind())
            })
            .collect();
        Some(kinds)
    }

    fn has(&self, tracepoint: &str) -> bool {
        self.tracepoint_args(tracepoint).is_some()
    }

    /// Whether this kernel keeps `task_struct.sched_info.last_queued` for every task, and a
    /// program can reach the run-queue clock that stamps it; `Err` says why not.
    fn sched_info_support(&self) -> Result<(), String> {
        use libbpf_rs::btf::types::Struct;
        let has_member = |name: &str, member: &str| {
            self.0.type_by_name::<Struct<'_>>(name).is_some_and(|s| {
                s.iter()
                    .any(|m| m.name.is_some_and(|n| n == std::ffi::OsStr::new(member)))
            })
        };
        if !has_member("sched_info", "last_queued") || !has_member("task_struct", "sched_info") {
            return Err("this kernel is built without CONFIG_SCHED_INFO".to_owned());
        }
        // The program reaches the run queue's clock as task->se.cfs_rq->rq->clock.
        if !has_member("sched_entity", "cfs_rq") || !has_member("cfs_rq", "rq") {
            return Err(
                "this kernel is built without CONFIG_FAIR_GROUP_SCHED: no way from a task to its run queue's clock"
                    .to_owned(),
            );
        }
        if !has_member("rq", "clock") {
            return Err("the kernel's struct rq has no clock".to_owned());
        }
        // Before 5.14 the timestamps were kept only with schedstats or delay accounting on.
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        match kernel_version(&release) {
            Some(version) if version >= (5, 14) => Ok(()),
            _ => Err(format!(
                "kernel {release}: before 5.14 sched_info is kept only with schedstats or delay accounting on"
            )),
        }
    }

    fn require(&self, tracepoints: &[&str]) -> Result<(), String> {
        match tracepoints.iter().find(|tp| !self.has(tp)) {
            Some(tp) => Err(format!("this kernel has no BTF tracepoint {tp}")),
            None => Ok(()),
        }
    }
}

/// `(major, minor)` of a kernel release string such as `6.18.0-1-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Why a load failed, with a hint when the cause is likely privileges.
fn load_error(stage: &str, e: &libbpf_rs::Error) -> String {
    let mut reason = format!("{stage}: {e}");
    if !nix::unistd::geteuid().is_root() {
        reason.push_str(" (not running as root: loading BPF needs root or CAP_BPF + CAP_PERFMON)");
    }
    reason
}

#[derive(Clone, Copy)]
struct RingConfig {
    bytes: u32,
    wakeup_bytes: u32,
}

fn load_tcp(
    btf: &KernelBtf,
    cg_source: u32,
    ring: RingConfig,
) -> Result<Loaded<skel::tcp::TcpSkel<'static>>, String> {
    btf.require(&["inet_sock_set_state"])?;
    let mut programs = vec!["tp_btf/inet_sock_set_state"];
    let mut notes = Vec::new();
    let retransmit = btf.tracepoint_args("tcp_retransmit_skb");
    // (sk, skb, err) since ~6.15; (sk, skb) before.
    let with_err = retransmit.as_ref().is_some_and(|a| a.len() >= 3);
    match &retransmit {
        Some(_) => programs.push("tp_btf/tcp_retransmit_skb"),
        None => notes.push("no tcp_retransmit_skb tracepoint: retransmits not counted".to_owned()),
    }
    let destroy = btf.has("tcp_destroy_sock");
    if destroy {
        programs.push("tp_btf/tcp_destroy_sock");
    }
    let send_reset = btf.has("tcp_send_reset");
    let receive_reset = btf.has("tcp_receive_reset");
    if send_reset {
        programs.push("tp_btf/tcp_send_reset");
    } else {
        notes.push("no tcp_send_reset tracepoint: resets sent not counted".to_owned());
    }
    if receive_reset {
        programs.push("tp_btf/tcp_receive_reset");
    } else {
        notes.push("no tcp_receive_reset tracepoint: resets received not counted".to_owned());
    }
    let pinned = skel::open_load(skel::tcp::TcpSkelBuilder::default(), |open| {
        if let Some(r) = open.maps.rodata_data.as_deref_mut() {
            r.cg_source = cg_source;
            r.forget_on_destroy = u32::from(destroy);
            r.wakeup_bytes = u64::from(ring.wakeup_bytes);
        }
        open.maps.events.set_max_entries(ring.bytes)?;
        open.progs.fl_tcp_destroy.set_autoload(destroy);
        open.progs
            .fl_tcp_rtx
            .set_autoload(retransmit.is_some() && !with_err);
        open.progs.fl_tcp_rtx_err.set_autoload(with_err);
        open.progs.fl_tcp_rst_out.set_autoload(send_reset);
        open.progs.fl_tcp_rst_in.set_autoload(receive_reset);
        Ok(())
    })
    .map_err(|(stage, e)| load_error(stage, &e))?;
    Ok((pinned, programs, notes))
}

fn load_sched(
    btf: &KernelBtf,
    cg_source: u32,
    timestamps: RunqTimestamps,
) -> Result<Loaded<skel::sched::SchedSkel<'static>>, String> {
    const SWITCH: &str = "tp_btf/sched_switch";
    btf.require(&["sched_switch"])?;
    let open = |kernel_timestamps: bool| {
        skel::open_load(skel::sched::SchedSkelBuilder::default(), |open| {
            if let Some(r) = open.maps.rodata_data.as_deref_mut() {
                r.cg_source = cg_source;
            }
            open.progs.fl_switch_si.set_autoload(kernel_timestamps);
            open.progs.fl_switch.set_autoload(!kernel_timestamps);
            open.progs.fl_wakeup.set_autoload(!kernel_timestamps);
            open.progs.fl_wakeup_new.set_autoload(!kernel_timestamps);
            Ok(())
        })
        .map_err(|(stage, e)| load_error(stage, &e))
    };
    let why_not = match timestamps {
        RunqTimestamps::Programs => "asked for".to_owned(),
        RunqTimestamps::Auto => match btf.sched_info_support() {
            Err(why) => why,
            Ok(()) => match open(true) {
                Ok(pinned) => {
                    return Ok((
                        pinned,
                        vec![SWITCH],
                        vec![
                            "run-queue wait timed by the kernel's sched_info timestamps".to_owned(),
                        ],
                    ));
                }
                Err(reason) => format!("the sched_info program was refused: {reason}"),
            },
        },
    };
    btf.require(&["sched_wakeup", "sched_wakeup_new"])?;
    let pinned = open(false)?;
    Ok((
        pinned,
        vec!["tp_btf/sched_wakeup", "tp_btf/sched_wakeup_new", SWITCH],
        vec![format!(
            "run-queue wait timed by the programs in task storage (not the kernel's sched_info: {why_not})"
        )],
    ))
}

fn load_oom(
    btf: &KernelBtf,
    cg_source: u32,
    ring: RingConfig,
) -> Result<Loaded<skel::oom::OomSkel<'static>>, String> {
    let args = btf
        .tracepoint_args("mark_victim")
        .ok_or_else(|| "this kernel has no BTF tracepoint mark_victim".to_owned())?;
    // mark_victim(struct task_struct *task, uid_t uid) since ~6.8; mark_victim(int pid) before.
    let takes_task = args.first() == Some(&BtfKind::Ptr);
    let mut notes = Vec::new();
    if !takes_task {
        notes.push("mark_victim gives only a pid on this kernel: victims other than the allocating task have no comm or cgroup".to_owned());
    }
    let pinned = skel::open_load(skel::oom::OomSkelBuilder::default(), |open| {
        if let Some(r) = open.maps.rodata_data.as_deref_mut() {
            r.cg_source = cg_source;
        }
        // OOM kills are rare: a smaller buffer, and the program always wakes the reader.
        open.maps
            .events
            .set_max_entries((ring.bytes / 4).max(4096))?;
        open.progs.fl_oom_victim.set_autoload(takes_task);
        open.progs.fl_oom_pid.set_autoload(!takes_task);
        Ok(())
    })
    .map_err(|(stage, e)| load_error(stage, &e))?;
    Ok((pinned, vec!["tp_btf/mark_victim"], notes))
}

fn load_proc(
    btf: &KernelBtf,
    cg_source: u32,
    ring: RingConfig,
) -> Result<Loaded<skel::proc::ProcSkel<'static>>, String> {
    btf.require(&["sched_process_exec", "sched_process_exit"])?;
    let pinned = skel::open_load(skel::proc::ProcSkelBuilder::default(), |open| {
        if let Some(r) = open.maps.rodata_data.as_deref_mut() {
            r.cg_source = cg_source;
            r.wakeup_bytes = u64::from(ring.wakeup_bytes);
        }
        open.maps.events.set_max_entries(ring.bytes)
    })
    .map_err(|(stage, e)| load_error(stage, &e))?;
    Ok((
        pinned,
        vec!["tp_btf/sched_process_exec", "tp_btf/sched_process_exit"],
        Vec::new(),
    ))
}

fn load_block(
    btf: &KernelBtf,
    cg_source: u32,
) -> Result<Loaded<skel::block::BlockSkel<'static>>, String> {
    btf.require(&["block_rq_issue", "block_rq_complete"])?;
    let pinned = skel::open_load(skel::block::BlockSkelBuilder::default(), |open| {
        if let Some(r) = open.maps.rodata_data.as_deref_mut() {
            r.cg_source = cg_source;
        }
        Ok(())
    })
    .map_err(|(stage, e)| load_error(stage, &e))?;
    Ok((
        pinned,
        vec!["tp_btf/block_rq_issue", "tp_btf/block_rq_complete"],
        Vec::new(),
    ))
}

#[cfg(test)]
mod tests {
    use super::kernel_version;

    #[test]
    fn kernel_versions_are_read_from_release_strings() {
        for (release, expected) in [
            ("6.18.0-1-amd64", Some((6, 18))),
            ("5.14.0", Some((5, 14))),
            ("5.4.0-150-generic", Some((5, 4))),
            ("4.19.282+", Some((4, 19))),
            ("6", None),
            ("", None),
            ("linux", None),
        ] {
            assert_eq!(kernel_version(release), expected, "{release}");
        }
    }
}
