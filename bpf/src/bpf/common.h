/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Shared definitions of Faultline's telemetry programs: event and map layouts (mirrored in
 * src/raw.rs, checked there against the skeletons' generated types), cgroup attribution and
 * the scope filter. Every object includes this once; each gets its own copies of the maps.
 */
#ifndef FAULTLINE_COMMON_H
#define FAULTLINE_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define TASK_COMM_LEN 16
#define HIST_SLOTS 32
#define SCOPE_MAX_DEPTH 8
/* Returned by scoped_cgroup_id() when the scope filter is active and nothing matches. */
#define OUT_OF_SCOPE ((u64)-1)

/* Which cgroup hierarchy attributes a task (set by the loader in .rodata). */
#define CG_UNIFIED 0
#define CG_V1_CPU 1
#define CG_V1_MEMORY 2
#define CG_V1_IO 3
#define CG_V1_PIDS 4

/* Event kinds (struct fl_event_header.kind). */
#define EV_CONNECT_FAILED 1
#define EV_CONNECTION_ERROR 2
#define EV_OOM_KILL 3
#define EV_EXEC 4
#define EV_EXIT 5

/* Counters (per-CPU array `counters`). */
#define CNT_EVENTS 0
#define CNT_RINGBUF_DROPS 1
#define CNT_MAP_FULL 2
#define CNT_UNSOLICITED_RESETS 3
#define CNT_MAX 4

struct fl_event_header {
	u64 ts_ns; /* bpf_ktime_get_boot_ns() */
	u64 cgroup_id;
	u32 pid; /* thread id */
	u32 tgid; /* process id */
	char comm[TASK_COMM_LEN];
	u16 kind;
	u16 _pad[3];
};

struct fl_config {
	u32 scope_active;
	u32 _pad;
};

const volatile u32 cg_source = CG_UNIFIED;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct fl_config);
} fl_config SEC(".maps");

/* cgroup ids (kernfs ids == directory inode numbers) whose tasks are counted, with their
 * descendants, when config.scope_active is set. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, u64);
	__type(value, u8);
} fl_scope SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, u32);
	__type(value, u64);
} fl_counters SEC(".maps");

static __always_inline void count(u32 idx)
{
	u64 *v = bpf_map_lookup_elem(&fl_counters, &idx);

	if (v)
		*v += 1;
}

/*
 * Field reads: the programs are tp_btf, so their pointer arguments are BTF-typed and plain
 * loads through them (and through the pointers they lead to) are allowed; the JIT turns them
 * into single loads with a fault handler (a bad pointer reads as 0). They cost far less than
 * bpf_probe_read_kernel() calls (BPF_CORE_READ), which matters in sched_switch. CO-RE still
 * relocates every field offset.
 */

/* The cgroup of `t` in the hierarchy chosen by cg_source. v1 controllers are found by their
 * subsystem index, resolved against the running kernel (CO-RE enum relocation); cg_source is
 * a load-time constant, so the verifier sees a fixed offset. */
static __always_inline struct cgroup *task_cgroup(struct task_struct *t)
{
	struct css_set *cset = t->cgroups;

	switch (cg_source) {
	case CG_V1_CPU:
		if (bpf_core_enum_value_exists(enum cgroup_subsys_id, cpu_cgrp_id))
			return cset->subsys[bpf_core_enum_value(enum cgroup_subsys_id, cpu_cgrp_id)]->cgroup;
		break;
	case CG_V1_MEMORY:
		if (bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id))
			return cset->subsys[bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id)]->cgroup;
		break;
	case CG_V1_IO:
		if (bpf_core_enum_value_exists(enum cgroup_subsys_id, io_cgrp_id))
			return cset->subsys[bpf_core_enum_value(enum cgroup_subsys_id, io_cgrp_id)]->cgroup;
		break;
	case CG_V1_PIDS:
		if (bpf_core_enum_value_exists(enum cgroup_subsys_id, pids_cgrp_id))
			return cset->subsys[bpf_core_enum_value(enum cgroup_subsys_id, pids_cgrp_id)]->cgroup;
		break;
	default:
		break;
	}
	return cset->dfl_cgrp;
}

static __always_inline bool scope_active(void)
{
	u32 zero = 0;
	struct fl_config *cfg = bpf_map_lookup_elem(&fl_config, &zero);

	return cfg && cfg->scope_active;
}

/* With the scope filter off: the id of `cg` (0 for none). With it on: the id of the nearest
 * ancestor of `cg` (itself included) that is in `scope`, or OUT_OF_SCOPE.
 *
 * The first id is a plain load; the ancestors' ids (scoped mode only) are probe reads: with
 * plain loads in both places clang merges them into one instruction fed by different pointer
 * types, which the verifier refuses ("same insn cannot be used with different pointers"). */
static __always_inline u64 scoped_id(struct cgroup *cg, bool scoped)
{
	struct cgroup_subsys_state *parent;
	u64 id;

	if (!cg)
		return scoped ? OUT_OF_SCOPE : 0;
	id = cg->kn->id;
	if (!scoped)
		return id;
	for (int i = 0; i < SCOPE_MAX_DEPTH; i++) {
		if (bpf_map_lookup_elem(&fl_scope, &id))
			return id;
		parent = cg->self.parent;
		if (!parent)
			break;
		cg = parent->cgroup;
		if (!cg)
			break;
		id = BPF_CORE_READ(cg, kn, id);
	}
	return OUT_OF_SCOPE;
}

static __always_inline u64 scoped_cgroup_id(struct cgroup *cg)
{
	return scoped_id(cg, scope_active());
}

/* Fills the header from `t` (and its cgroup id `cgid`). */
static __always_inline void fill_header(struct fl_event_header *h, struct task_struct *t, u64 cgid,
					u16 kind)
{
	h->ts_ns = bpf_ktime_get_boot_ns();
	h->cgroup_id = cgid;
	h->pid = t->pid;
	h->tgid = t->tgid;
	__builtin_memcpy(h->comm, t->comm, sizeof(h->comm));
	h->kind = kind;
	h->_pad[0] = 0;
	h->_pad[1] = 0;
	h->_pad[2] = 0;
}

/* log2 bucket of a value: 0 for 0 and 1, k for [2^k, 2^(k+1)). Capped at HIST_SLOTS - 1. */
static __always_inline u32 log2_slot(u64 v)
{
	u32 r = 0;

	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r < HIST_SLOTS ? r : HIST_SLOTS - 1;
}

/* Ring buffer wake-ups: waking the reader costs an IPI (expensive in VMs) per event. With
 * wakeup_bytes set, the reader is only woken once that much is pending; it also drains the
 * buffers at the end of every poll timeout, so events wait at most that long. */
const volatile u64 wakeup_bytes = 0;

static __always_inline void submit(void *map, void *event)
{
	u64 flags = 0;

	if (wakeup_bytes)
		flags = bpf_ringbuf_query(map, BPF_RB_AVAIL_DATA) >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP
										   : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(event, flags);
	count(CNT_EVENTS);
}

/* Looks `key` up in a hash map, inserting `zero` first when absent. Counts a full map. */
static __always_inline void *lookup_or_init(void *map, const void *key, const void *zero)
{
	void *v = bpf_map_lookup_elem(map, key);

	if (v)
		return v;
	/* EEXIST (another CPU inserted it first) is fine; a full map shows as a failed lookup. */
	bpf_map_update_elem(map, key, zero, BPF_NOEXIST);
	v = bpf_map_lookup_elem(map, key);
	if (!v)
		count(CNT_MAP_FULL);
	return v;
}

#endif /* FAULTLINE_COMMON_H */
