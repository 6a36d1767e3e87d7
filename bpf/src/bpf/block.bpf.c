// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Block IO per (cgroup, device): latency from issue to completion (log2 histogram of
 * microseconds), bytes and requests by direction, errors. The cgroup is the one the IO is
 * charged to (the bio's blkcg: the io/blkio controller's hierarchy, so writeback counts
 * against the cgroup that dirtied the pages), not whoever runs when the request is issued.
 */
#include "common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define REQ_OP_MASK 0xff
#define REQ_OP_READ 0
#define REQ_OP_WRITE 1

struct fl_issued {
	u64 ts_ns;
	u64 cgroup_id;
	u32 dev;
	u32 op;
};

struct fl_block_key {
	u64 cgroup_id;
	u32 dev;
	u32 _pad;
};

struct fl_block_stats {
	u64 slots[HIST_SLOTS];
	u64 count;
	u64 total_ns;
	u64 max_ns;
	u64 read_bytes;
	u64 write_bytes;
	u64 read_ops;
	u64 write_ops;
	u64 other_ops;
	u64 errors;
};

static const struct fl_block_stats zero_stats;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, struct fl_issued);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 8192);
	__type(key, struct fl_block_key);
	__type(value, struct fl_block_stats);
} block_stats SEC(".maps");

SEC("tp_btf/block_rq_issue")
int BPF_PROG(fl_rq_issue, struct request *rq)
{
	struct cgroup *cg = NULL;
	struct fl_issued i = {};
	u64 key = (u64)rq;

	if (bpf_core_field_exists(struct bio, bi_blkg))
		cg = rq->bio ? rq->bio->bi_blkg->blkcg->css.cgroup : NULL;
	i.cgroup_id = scoped_cgroup_id(cg);
	if (i.cgroup_id == OUT_OF_SCOPE)
		return 0;
	i.ts_ns = bpf_ktime_get_ns();
	if (bpf_core_field_exists(rq->part))
		i.dev = rq->part ? rq->part->bd_dev : 0;
	i.op = rq->cmd_flags & REQ_OP_MASK;
	if (bpf_map_update_elem(&inflight, &key, &i, BPF_ANY))
		count(CNT_MAP_FULL);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(fl_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	u64 rqp = (u64)rq, delta, now = bpf_ktime_get_ns();
	struct fl_block_stats *s;
	struct fl_block_key key;
	struct fl_issued *i;

	i = bpf_map_lookup_elem(&inflight, &rqp);
	if (!i)
		return 0;
	__builtin_memset(&key, 0, sizeof(key));
	key.cgroup_id = i->cgroup_id;
	key.dev = i->dev;
	delta = now > i->ts_ns ? now - i->ts_ns : 0;
	s = lookup_or_init(&block_stats, &key, &zero_stats);
	if (s) {
		s->slots[log2_slot(delta / 1000) & (HIST_SLOTS - 1)] += 1;
		s->count += 1;
		s->total_ns += delta;
		if (delta > s->max_ns)
			s->max_ns = delta;
		if (i->op == REQ_OP_READ) {
			s->read_ops += 1;
			s->read_bytes += nr_bytes;
		} else if (i->op == REQ_OP_WRITE) {
			s->write_ops += 1;
			s->write_bytes += nr_bytes;
		} else {
			s->other_ops += 1;
		}
		if (error)
			s->errors += 1;
	}
	bpf_map_delete_elem(&inflight, &rqp);
	return 0;
}
