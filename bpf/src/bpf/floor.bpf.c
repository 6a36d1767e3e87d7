// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs that do nothing, on the tracepoints the telemetry groups attach to (as they do on
 * a recent kernel). The overhead benchmark measures them like the real programs: what merely
 * running a BPF program at these points costs, the floor under any design that observes
 * every event there.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/sched_switch")
int fl_floor_switch(void *ctx) { return 0; }

SEC("tp_btf/inet_sock_set_state")
int fl_floor_state(void *ctx) { return 0; }

SEC("tp_btf/tcp_destroy_sock")
int fl_floor_destroy(void *ctx) { return 0; }

SEC("tp_btf/tcp_retransmit_skb")
int fl_floor_rtx(void *ctx) { return 0; }

SEC("tp_btf/tcp_send_reset")
int fl_floor_rst_out(void *ctx) { return 0; }

SEC("tp_btf/tcp_receive_reset")
int fl_floor_rst_in(void *ctx) { return 0; }

SEC("tp_btf/sched_process_exec")
int fl_floor_exec(void *ctx) { return 0; }

SEC("tp_btf/sched_process_exit")
int fl_floor_exit(void *ctx) { return 0; }

SEC("tp_btf/mark_victim")
int fl_floor_oom(void *ctx) { return 0; }

SEC("tp_btf/block_rq_issue")
int fl_floor_rq_issue(void *ctx) { return 0; }

SEC("tp_btf/block_rq_complete")
int fl_floor_rq_done(void *ctx) { return 0; }
