// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Run-queue latency per cgroup (cpu controller's hierarchy): the time from a task becoming
 * runnable (woken, or preempted while runnable) to running, as a log2 histogram of
 * microseconds, plus context switches. A task throttled by CFS bandwidth control stays
 * runnable while it waits, so throttling shows here as latency.
 */
#include "common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TASK_RUNNING 0

struct fl_sched_stats {
	u64 slots[HIST_SLOTS]; /* runq latency: slot k counts [2^k, 2^(k+1)) us (slot 0: < 2 us) */
	u64 count;
	u64 total_ns;
	u64 max_ns;
	u64 switches; /* switched out */
	u64 involuntary; /* switched out while still runnable (preempted, throttled) */
	u64 _reserved;
};

static const struct fl_sched_stats zero_stats;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 8192);
	__type(key, u64);
	__type(value, struct fl_sched_stats);
} sched_stats SEC(".maps");

/* When the task became runnable (0: not waiting). */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, u64);
} enqueued_at SEC(".maps");

/* Before 5.14 the field was `long state`. */
struct task_struct___pre514 {
	volatile long state;
} __attribute__((preserve_access_index));

static __always_inline long task_state(struct task_struct *t)
{
	struct task_struct___pre514 *old = (void *)t;

	if (bpf_core_field_exists(t->__state))
		return t->__state;
	return old->state;
}

static __always_inline void mark_runnable(struct task_struct *p, u64 now)
{
	u64 *ts;

	if (!p->pid)
		return;
	ts = bpf_task_storage_get(&enqueued_at, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (ts)
		*ts = now;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(fl_wakeup, struct task_struct *p)
{
	mark_runnable(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(fl_wakeup_new, struct task_struct *p)
{
	mark_runnable(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(fl_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	u64 now = bpf_ktime_get_ns(), prev_id = OUT_OF_SCOPE, next_id, delta, *ts;
	struct fl_sched_stats *s = NULL;
	bool scoped = scope_active();
	bool runnable;

	if (prev->pid) {
		runnable = task_state(prev) == TASK_RUNNING;
		if (runnable)
			mark_runnable(prev, now);
		prev_id = scoped_id(task_cgroup(prev), scoped);
		if (prev_id != OUT_OF_SCOPE) {
			s = lookup_or_init(&sched_stats, &prev_id, &zero_stats);
			if (s) {
				s->switches += 1;
				if (runnable)
					s->involuntary += 1;
			}
		}
	}

	if (!next->pid)
		return 0;
	ts = bpf_task_storage_get(&enqueued_at, next, 0, 0);
	if (!ts || !*ts || now < *ts)
		return 0;
	delta = now - *ts;
	*ts = 0;
	next_id = scoped_id(task_cgroup(next), scoped);
	if (next_id == OUT_OF_SCOPE)
		return 0;
	/* Most switches stay within one cgroup: reuse the row then. */
	if (!s || next_id != prev_id)
		s = lookup_or_init(&sched_stats, &next_id, &zero_stats);
	if (!s)
		return 0;
	s->slots[log2_slot(delta / 1000) & (HIST_SLOTS - 1)] += 1;
	s->count += 1;
	s->total_ns += delta;
	if (delta > s->max_ns)
		s->max_ns = delta;
	return 0;
}
