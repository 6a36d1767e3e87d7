// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Process lifecycle: exec (new image) and exit (of the whole process: the last thread) with
 * the raw exit code (status << 8, or the terminating signal | 0x80 for a core dump), as events.
 */
#include "common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define FILENAME_LEN 128

struct fl_exec_event {
	struct fl_event_header hdr;
	u32 ppid;
	u32 old_pid;
	char filename[FILENAME_LEN];
};

struct fl_exit_event {
	struct fl_event_header hdr;
	u32 ppid;
	u32 exit_code;
	u64 runtime_ns;
};

struct fl_exec_event _exec_event_layout = {};
struct fl_exit_event _exit_event_layout = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

SEC("tp_btf/sched_process_exec")
int BPF_PROG(fl_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	u64 id = scoped_cgroup_id(task_cgroup(p));
	struct fl_exec_event *e;

	if (id == OUT_OF_SCOPE)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RINGBUF_DROPS);
		return 0;
	}
	fill_header(&e->hdr, p, id, EV_EXEC);
	e->ppid = p->real_parent->tgid;
	e->old_pid = old_pid;
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), bprm->filename);
	submit(&events, e);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(fl_exit, struct task_struct *p)
{
	struct fl_exit_event *e;
	u64 id, start;

	/* signal->live reaches 0 when the last thread exits (before this tracepoint). */
	if (p->signal->live.counter != 0)
		return 0;
	id = scoped_cgroup_id(task_cgroup(p));
	if (id == OUT_OF_SCOPE)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RINGBUF_DROPS);
		return 0;
	}
	fill_header(&e->hdr, p, id, EV_EXIT);
	e->ppid = p->real_parent->tgid;
	e->exit_code = p->exit_code;
	start = p->start_time;
	e->runtime_ns = bpf_ktime_get_ns() - start;
	submit(&events, e);
	return 0;
}
