// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Run-queue latency per cgroup (cpu controller's hierarchy): the time from a task becoming
 * runnable (woken, or preempted while runnable) to running, as a log2 histogram of
 * microseconds, plus context switches. A task throttled by CFS bandwidth control stays
 * runnable while it waits, so throttling shows here as latency.
 *
 * Two ways to know when a task became runnable; the loader attaches one:
 * - fl_switch_si (preferred): the kernel's own timestamp, task->sched_info.last_queued
 *   (CONFIG_SCHED_INFO, maintained unconditionally since 5.14), against the run-queue clock
 *   it is taken from. One program on sched_switch and no per-task state: the cheapest.
 * - fl_wakeup, fl_wakeup_new, fl_switch (fallback): the programs record the time themselves
 *   in task storage at wake-up and at preemption, three programs and two task-storage
 *   accesses per switch.
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

/* Counts a switch-out of `prev` in its cgroup's row, which it returns (NULL when out of
 * scope) with the row's id in *prev_id. */
static __always_inline struct fl_sched_stats *count_switch_out(struct task_struct *prev,
								bool runnable, bool scoped,
								u64 *prev_id)
{
	struct fl_sched_stats *s;

	*prev_id = scoped_id(task_cgroup(prev), scoped);
	if (*prev_id == OUT_OF_SCOPE)
		return NULL;
	s = lookup_or_init(&sched_stats, prev_id, &zero_stats);
	if (s) {
		s->switches += 1;
		if (runnable)
			s->involuntary += 1;
	}
	return s;
}

/* Records that `next` waited `delta` ns runnable; `prev_row`/`prev_id` is the switched-out
 * task's row, reused when both are in the same cgroup (most switches stay within one). */
static __always_inline void record_wait(struct task_struct *next, u64 delta, bool scoped,
					struct fl_sched_stats *prev_row, u64 prev_id)
{
	struct fl_sched_stats *s = prev_row;
	u64 next_id = scoped_id(task_cgroup(next), scoped);

	if (next_id == OUT_OF_SCOPE)
		return;
	if (!s || next_id != prev_id)
		s = lookup_or_init(&sched_stats, &next_id, &zero_stats);
	if (!s)
		return;
	s->slots[log2_slot(delta / 1000) & (HIST_SLOTS - 1)] += 1;
	s->count += 1;
	s->total_ns += delta;
	if (delta > s->max_ns)
		s->max_ns = delta;
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
	u64 now = bpf_ktime_get_ns(), prev_id = OUT_OF_SCOPE, delta, *ts;
	struct fl_sched_stats *s = NULL;
	bool scoped = scope_active();
	bool runnable;

	if (prev->pid) {
		runnable = task_state(prev) == TASK_RUNNING;
		if (runnable)
			mark_runnable(prev, now);
		s = count_switch_out(prev, runnable, scoped, &prev_id);
	}

	if (!next->pid)
		return 0;
	ts = bpf_task_storage_get(&enqueued_at, next, 0, 0);
	if (!ts || !*ts || now < *ts)
		return 0;
	delta = now - *ts;
	*ts = 0;
	record_wait(next, delta, scoped, s, prev_id);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(fl_switch_si, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	u64 prev_id = OUT_OF_SCOPE, queued, now;
	struct fl_sched_stats *s = NULL;
	bool scoped = scope_active();
	struct rq *rq;

	if (prev->pid)
		s = count_switch_out(prev, task_state(prev) == TASK_RUNNING, scoped, &prev_id);
	if (!next->pid)
		return 0;
	/* Set when `next` was enqueued (woken, or switched out while runnable) and cleared by
	 * the kernel right after this tracepoint, when the switch completes. A task moved to
	 * another CPU while waiting is re-stamped there: its wait counts from the move. */
	queued = next->sched_info.last_queued;
	if (!queued)
		return 0;
	/* The run queue `next` was picked from, this CPU's, reached through the task (the
	 * per-CPU `runqueues` symbol needs CONFIG_KALLSYMS_ALL): its entity's cfs_rq is set for
	 * tasks of every class (CONFIG_FAIR_GROUP_SCHED; the loader checks). Its clock was
	 * updated at the start of this __schedule(). */
	rq = next->se.cfs_rq->rq;
	if (!rq)
		return 0;
	now = rq->clock;
	if (now <= queued)
		return 0;
	record_wait(next, now - queued, scoped, s, prev_id);
	return 0;
}
