//! Plain-old-data mirrors of the structs in `src/bpf/*.h|c`, read from ring buffer records and
//! map values with `bytemuck` (no `unsafe`). Their sizes and field offsets are checked at
//! compile time against the types libbpf-cargo generated from the objects' BTF, so a change on
//! the C side that is not made here fails the build.

use std::mem::{offset_of, size_of};

use bytemuck::{Pod, Zeroable};

use crate::skel::{block, oom, proc, sched, tcp};

pub(crate) const COMM_LEN: usize = 16;
pub(crate) const HIST_SLOTS: usize = 32;
pub(crate) const ERRNO_SLOTS: usize = 8;

pub(crate) const EV_CONNECT_FAILED: u16 = 1;
pub(crate) const EV_CONNECTION_ERROR: u16 = 2;
pub(crate) const EV_OOM_KILL: u16 = 3;
pub(crate) const EV_EXEC: u16 = 4;
pub(crate) const EV_EXIT: u16 = 5;

pub(crate) const CNT_EVENTS: u32 = 0;
pub(crate) const CNT_RINGBUF_DROPS: u32 = 1;
pub(crate) const CNT_MAP_FULL: u32 = 2;
pub(crate) const CNT_UNSOLICITED_RESETS: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct EventHeader {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; COMM_LEN],
    pub kind: u16,
    pub _pad: [u16; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct Config {
    pub scope_active: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct TcpEvent {
    pub hdr: EventHeader,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub oldstate: u16,
    pub err: i32,
    pub _pad: u32,
    pub duration_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct TcpKey {
    pub cgroup_id: u64,
    pub daddr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub inbound: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct TcpStats {
    pub active_established: u64,
    pub passive_established: u64,
    pub retransmits: u64,
    pub syn_retransmits: u64,
    pub retransmit_errors: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub _reserved: u64,
    pub connect_failed: [u64; ERRNO_SLOTS],
    pub connection_errors: [u64; ERRNO_SLOTS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SchedStats {
    pub slots: [u64; HIST_SLOTS],
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub switches: u64,
    pub involuntary: u64,
    pub _reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct OomEvent {
    pub hdr: EventHeader,
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub trigger_comm: [u8; COMM_LEN],
    pub total_vm_pages: u64,
    pub uid: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ExecEvent {
    pub hdr: EventHeader,
    pub ppid: u32,
    pub old_pid: u32,
    pub filename: [u8; 128],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ExitEvent {
    pub hdr: EventHeader,
    pub ppid: u32,
    pub exit_code: u32,
    pub runtime_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockKey {
    pub cgroup_id: u64,
    pub dev: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockStats {
    pub slots: [u64; HIST_SLOTS],
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub other_ops: u64,
    pub errors: u64,
}

/// Reads a `T` from the front of `data` (ring buffer records may carry trailing padding).
pub(crate) fn read<T: Pod>(data: &[u8]) -> Option<T> {
    data.get(..size_of::<T>())
        .and_then(|bytes| bytemuck::try_pod_read_unaligned(bytes).ok())
}

/// A NUL-terminated C string from a fixed-size buffer.
pub(crate) fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

macro_rules! same_layout {
    ($ours:ty, $theirs:ty, [$($field:ident),*]) => {
        const _: () = assert!(size_of::<$ours>() == size_of::<$theirs>());
        $(const _: () = assert!(offset_of!($ours, $field) == offset_of!($theirs, $field));)*
    };
}

same_layout!(
    EventHeader,
    tcp::types::fl_event_header,
    [ts_ns, cgroup_id, pid, tgid, comm, kind]
);
same_layout!(Config, tcp::types::fl_config, [scope_active]);
same_layout!(
    TcpEvent,
    tcp::types::fl_tcp_event,
    [
        hdr,
        saddr,
        daddr,
        sport,
        dport,
        family,
        oldstate,
        err,
        duration_ns
    ]
);
same_layout!(
    TcpKey,
    tcp::types::fl_tcp_key,
    [cgroup_id, daddr, port, family, inbound]
);
same_layout!(
    TcpStats,
    tcp::types::fl_tcp_stats,
    [
        active_established,
        passive_established,
        retransmits,
        syn_retransmits,
        retransmit_errors,
        resets_sent,
        resets_received,
        connect_failed,
        connection_errors
    ]
);
same_layout!(
    SchedStats,
    sched::types::fl_sched_stats,
    [slots, count, total_ns, max_ns, switches, involuntary]
);
same_layout!(
    OomEvent,
    oom::types::fl_oom_event,
    [
        hdr,
        trigger_pid,
        trigger_tgid,
        trigger_comm,
        total_vm_pages,
        uid
    ]
);
same_layout!(
    ExecEvent,
    proc::types::fl_exec_event,
    [hdr, ppid, old_pid, filename]
);
same_layout!(
    ExitEvent,
    proc::types::fl_exit_event,
    [hdr, ppid, exit_code, runtime_ns]
);
same_layout!(BlockKey, block::types::fl_block_key, [cgroup_id, dev]);
same_layout!(
    BlockStats,
    block::types::fl_block_stats,
    [
        slots,
        count,
        total_ns,
        max_ns,
        read_bytes,
        write_bytes,
        read_ops,
        write_ops,
        other_ops,
        errors
    ]
);
