// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * OOM kills: the victim (pid, comm, memory cgroup, size) and the task whose allocation
 * triggered the kill, as events.
 */
#include "common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct fl_oom_event {
	struct fl_event_header hdr; /* the victim */
	u32 trigger_pid;
	u32 trigger_tgid;
	char trigger_comm[TASK_COMM_LEN];
	u64 total_vm_pages;
	u32 uid;
	u32 _pad;
};

struct fl_oom_event _oom_event_layout = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

static __always_inline void emit(struct task_struct *victim, bool victim_known, u32 pid)
{
	struct task_struct *cur = bpf_get_current_task_btf();
	struct fl_oom_event *e;
	u64 id = 0;

	if (victim_known)
		id = scoped_cgroup_id(task_cgroup(victim));
	else if (scope_active())
		id = OUT_OF_SCOPE;
	if (id == OUT_OF_SCOPE)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RINGBUF_DROPS);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	if (victim_known) {
		fill_header(&e->hdr, victim, id, EV_OOM_KILL);
		e->total_vm_pages = victim->mm ? victim->mm->total_vm : 0;
		e->uid = victim->cred->uid.val;
	} else {
		e->hdr.ts_ns = bpf_ktime_get_boot_ns();
		e->hdr.pid = pid;
		e->hdr.tgid = pid;
		e->hdr.kind = EV_OOM_KILL;
	}
	e->trigger_pid = cur->pid;
	e->trigger_tgid = cur->tgid;
	bpf_get_current_comm(e->trigger_comm, sizeof(e->trigger_comm));
	/* OOM kills are rare and urgent: always wake the reader. */
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	count(CNT_EVENTS);
}

/* Kernels since 6.8 (or so): mark_victim(struct task_struct *task, uid_t uid). */
SEC("tp_btf/mark_victim")
int BPF_PROG(fl_oom_victim, struct task_struct *task)
{
	emit(task, true, 0);
	return 0;
}

/* Older kernels: mark_victim(int pid). The victim is known when it is the allocating task
 * (the usual case in a memory cgroup with one big process); otherwise only its pid. */
SEC("tp_btf/mark_victim")
int BPF_PROG(fl_oom_pid, int pid)
{
	struct task_struct *cur = bpf_get_current_task_btf();

	if (cur->pid == pid)
		emit(cur, true, pid);
	else
		emit(cur, false, pid);
	return 0;
}
