// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TCP outcomes per (cgroup, peer address, port; see struct fl_tcp_key): connections
 * established, connect failures and connection errors by the errno the application sees
 * (sk->sk_err when the socket closes), retransmits (SYN retransmits apart), resets sent and
 * received. Connect failures and connections ending in an error are also sent as events.
 *
 * State changes after connect() happen in softirq context, where `current` is whoever was
 * running: the owner (pid, comm, cgroup) is recorded per socket when it enters SYN_SENT (in
 * connect(), process context) or LISTEN, passed from a listener to its children, and
 * forgotten when the socket is destroyed.
 */
#include "common.h"

#define AF_INET 2
#define AF_INET6 10

#define ERRNO_SLOTS 8
#define EPIPE 32
#define ENETUNREACH 101
#define ECONNRESET 104
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define EHOSTUNREACH 113

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader when tp_btf/tcp_destroy_sock is attached: owners are then forgotten when
 * the socket is destroyed, not when it enters CLOSE (a reset is sent after that, e.g. on
 * close() with unread data). */
const volatile u32 forget_on_destroy = 0;

/* Outbound connections are keyed by the remote address and port; inbound ones (accepted
 * from a listener) by the remote address and the *local* port: the service, not the
 * client's ephemeral port, which would make a row per connection. */
struct fl_tcp_key {
	u64 cgroup_id;
	u8 daddr[16];
	u16 port;
	u16 family;
	u8 inbound;
	u8 _pad[3];
};

struct fl_tcp_stats {
	u64 active_established;
	u64 passive_established;
	u64 retransmits;
	u64 syn_retransmits;
	u64 retransmit_errors;
	u64 resets_sent;
	u64 resets_received;
	u64 _reserved;
	/* slots: ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, ECONNRESET, EPIPE,
	 * no error (closed by the application), any other errno */
	u64 connect_failed[ERRNO_SLOTS];
	u64 connection_errors[ERRNO_SLOTS];
};

struct fl_owner {
	u64 cgroup_id;
	u64 start_ns;
	u32 pid;
	u32 tgid;
	char comm[TASK_COMM_LEN];
	/* The local port, remembered while the socket has one: by the time it enters CLOSE,
	 * tcp_set_state() has released the port (inet_num is 0). */
	u16 sport;
	u8 inbound;
	u8 _pad[5];
};

struct fl_listener_key {
	u32 netns;
	u16 port;
	u16 family;
};

struct fl_tcp_event {
	struct fl_event_header hdr;
	u8 saddr[16];
	u8 daddr[16];
	u16 sport;
	u16 dport;
	u16 family;
	u16 oldstate;
	s32 err;
	u32 _pad;
	u64 duration_ns;
};

/* Zero values for lookup_or_init (in .rodata, so they need no stack). */
static const struct fl_tcp_stats zero_stats;
/* Keeps the event layout in the object's BTF, for the generated Rust types. */
struct fl_tcp_event _tcp_event_layout = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct fl_tcp_key);
	__type(value, struct fl_tcp_stats);
} tcp_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, struct fl_owner);
} owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct fl_listener_key);
	__type(value, struct fl_owner);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline u32 errno_slot(int err)
{
	switch (err) {
	case ECONNREFUSED: return 0;
	case ETIMEDOUT: return 1;
	case EHOSTUNREACH: return 2;
	case ENETUNREACH: return 3;
	case ECONNRESET: return 4;
	case EPIPE: return 5;
	case 0: return 6;
	default: return 7;
	}
}

/* Fills `o` with the current task as owner; false when it is out of scope. */
static __always_inline bool current_owner(struct fl_owner *o)
{
	struct task_struct *t = bpf_get_current_task_btf();
	u64 id = scoped_cgroup_id(task_cgroup(t));

	if (id == OUT_OF_SCOPE)
		return false;
	__builtin_memset(o, 0, sizeof(*o));
	o->cgroup_id = id;
	o->start_ns = bpf_ktime_get_boot_ns();
	o->pid = t->pid;
	o->tgid = t->tgid;
	/* Plain loads through the BTF pointer: cheaper than bpf_get_current_comm(). */
	__builtin_memcpy(o->comm, t->comm, sizeof(o->comm));
	return true;
}

/* An owner for a socket nobody was seen creating (it predates the programs, or its listener
 * does): with cgroup v2 attribution the socket's own cgroup, otherwise unknown (0). */
static __always_inline bool anonymous_owner(struct sock *sk, struct fl_owner *o)
{
	u8 state = sk->__sk_common.skc_state;
	struct cgroup *cg = NULL;
	u64 id;

	__builtin_memset(o, 0, sizeof(*o));
	/* Time-wait and request sockets are not full sockets: no sk_cgrp_data there. */
	if (cg_source == CG_UNIFIED && state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV)
		cg = sk->sk_cgrp_data.cgroup;
	if (cg) {
		id = scoped_cgroup_id(cg);
	} else {
		id = scope_active() ? OUT_OF_SCOPE : 0;
	}
	if (id == OUT_OF_SCOPE)
		return false;
	o->cgroup_id = id;
	return true;
}

static __always_inline bool owner_of(struct sock *sk, struct fl_owner *o)
{
	u64 skp = (u64)sk;
	struct fl_owner *found = bpf_map_lookup_elem(&owners, &skp);

	if (found) {
		u16 sport = sk->__sk_common.skc_num;

		if (sport)
			found->sport = sport;
		__builtin_memcpy(o, found, sizeof(*o));
		return true;
	}
	return anonymous_owner(sk, o);
}

static __always_inline void read_addrs(struct sock *sk, u16 family, u8 *saddr, u8 *daddr)
{
	if (family == AF_INET) {
		__builtin_memcpy(saddr, &sk->__sk_common.skc_rcv_saddr, 4);
		__builtin_memcpy(daddr, &sk->__sk_common.skc_daddr, 4);
	} else {
		__builtin_memcpy(saddr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
		__builtin_memcpy(daddr, &sk->__sk_common.skc_v6_daddr, 16);
	}
}

static __always_inline struct fl_tcp_stats *stats_for(struct sock *sk, u16 family,
						     const struct fl_owner *o)
{
	struct fl_tcp_key key;
	u8 saddr[16];

	__builtin_memset(&key, 0, sizeof(key));
	key.cgroup_id = o->cgroup_id;
	key.family = family;
	key.inbound = o->inbound;
	/* By CLOSE the local port is released (0): use the one remembered in the owner. */
	key.port = o->inbound ? (sk->__sk_common.skc_num ?: o->sport)
			      : bpf_ntohs(sk->__sk_common.skc_dport);
	read_addrs(sk, family, saddr, key.daddr);
	return lookup_or_init(&tcp_stats, &key, &zero_stats);
}

static __always_inline void emit(u16 kind, const struct fl_owner *o, struct sock *sk, u16 family,
				 int oldstate, int err)
{
	struct fl_tcp_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	u64 now = bpf_ktime_get_boot_ns();

	if (!e) {
		count(CNT_RINGBUF_DROPS);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.ts_ns = now;
	e->hdr.cgroup_id = o->cgroup_id;
	e->hdr.pid = o->pid;
	e->hdr.tgid = o->tgid;
	__builtin_memcpy(e->hdr.comm, o->comm, sizeof(e->hdr.comm));
	e->hdr.kind = kind;
	read_addrs(sk, family, e->saddr, e->daddr);
	e->sport = sk->__sk_common.skc_num;
	if (!e->sport)
		e->sport = o->sport;
	e->dport = bpf_ntohs(sk->__sk_common.skc_dport);
	e->family = family;
	e->oldstate = oldstate;
	e->err = err;
	e->duration_ns = o->start_ns && now > o->start_ns ? now - o->start_ns : 0;
	submit(&events, e);
}

static __always_inline struct fl_listener_key listener_key_of(struct sock *sk, u16 family)
{
	struct fl_listener_key k;

	__builtin_memset(&k, 0, sizeof(k));
	k.netns = sk->__sk_common.skc_net.net->ns.inum;
	k.port = sk->__sk_common.skc_num;
	k.family = family;
	return k;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(fl_tcp_state, const struct sock *csk, const int oldstate, const int newstate)
{
	struct sock *sk = (struct sock *)csk;
	u64 skp = (u64)sk;
	struct fl_listener_key lk;
	struct fl_tcp_stats *s;
	struct fl_owner o, *lo;
	u16 family;
	int err;

	/* Most changes of a connection's life (FIN_WAIT*, CLOSE_WAIT, LAST_ACK, ...) count for
	 * nothing here: leave before touching the socket. */
	if (newstate != TCP_SYN_SENT && newstate != TCP_LISTEN && oldstate != TCP_LISTEN &&
	    newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE)
		return 0;
	if (BPF_CORE_READ_BITFIELD(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;

	if (newstate == TCP_SYN_SENT) {
		/* connect(): process context, current is the owner. */
		if (current_owner(&o))
			bpf_map_update_elem(&owners, &skp, &o, BPF_ANY);
		return 0;
	}
	if (newstate == TCP_LISTEN) {
		if (current_owner(&o)) {
			lk = listener_key_of(sk, family);
			bpf_map_update_elem(&listeners, &lk, &o, BPF_ANY);
		}
		return 0;
	}
	if (oldstate == TCP_LISTEN) {
		lk = listener_key_of(sk, family);
		if (newstate == TCP_SYN_RECV) {
			/* A child cloned from its listener: it inherits the listener's owner. */
			lo = bpf_map_lookup_elem(&listeners, &lk);
			if (lo) {
				__builtin_memcpy(&o, lo, sizeof(o));
				o.start_ns = bpf_ktime_get_boot_ns();
				o.inbound = 1;
				o.sport = sk->__sk_common.skc_num;
				bpf_map_update_elem(&owners, &skp, &o, BPF_ANY);
			}
		} else if (newstate == TCP_CLOSE) {
			bpf_map_delete_elem(&listeners, &lk);
		}
		return 0;
	}

	/* A clean close (no error, not a failed connect) counts for nothing: leave before the
	 * owner and row look-ups. sk_err is set before tcp_done() moves the socket to CLOSE
	 * (refused: RST in SYN_SENT; timed out: retries exhausted, or the soft error such as
	 * EHOSTUNREACH from ICMP; reset: RST in a synchronized state). */
	err = newstate == TCP_CLOSE ? sk->sk_err : 0;
	if (newstate == TCP_CLOSE && oldstate != TCP_SYN_SENT && !err)
		goto out;
	if (!owner_of(sk, &o))
		goto out;
	s = stats_for(sk, family, &o);
	if (newstate == TCP_ESTABLISHED) {
		if (s && oldstate == TCP_SYN_SENT)
			__sync_fetch_and_add(&s->active_established, 1);
		else if (s && oldstate == TCP_SYN_RECV)
			__sync_fetch_and_add(&s->passive_established, 1);
		return 0;
	}
	/* TCP_CLOSE, failed connect or connection error. */
	if (oldstate == TCP_SYN_SENT) {
		if (s)
			__sync_fetch_and_add(&s->connect_failed[errno_slot(err) & (ERRNO_SLOTS - 1)], 1);
		emit(EV_CONNECT_FAILED, &o, sk, family, oldstate, err);
	} else if (err) {
		if (s)
			__sync_fetch_and_add(&s->connection_errors[errno_slot(err) & (ERRNO_SLOTS - 1)], 1);
		emit(EV_CONNECTION_ERROR, &o, sk, family, oldstate, err);
	}
out:
	if (newstate == TCP_CLOSE && !forget_on_destroy)
		bpf_map_delete_elem(&owners, &skp);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(fl_tcp_destroy, struct sock *sk)
{
	u64 skp = (u64)sk;

	bpf_map_delete_elem(&owners, &skp);
	return 0;
}

static __always_inline int on_retransmit(struct sock *sk, int err)
{
	struct fl_tcp_stats *s;
	struct fl_owner o;
	u16 family = sk->__sk_common.skc_family;

	if ((family != AF_INET && family != AF_INET6) || !owner_of(sk, &o))
		return 0;
	s = stats_for(sk, family, &o);
	if (!s)
		return 0;
	__sync_fetch_and_add(&s->retransmits, 1);
	if (err)
		__sync_fetch_and_add(&s->retransmit_errors, 1);
	if (sk->__sk_common.skc_state == TCP_SYN_SENT)
		__sync_fetch_and_add(&s->syn_retransmits, 1);
	return 0;
}

/* Kernels before 6.15 (or so): (sk, skb). The loader picks one of these two by the
 * tracepoint's BTF prototype. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(fl_tcp_rtx, const struct sock *sk, const struct sk_buff *skb)
{
	return on_retransmit((struct sock *)sk, 0);
}

/* Newer kernels: (sk, skb, err), err != 0 when the retransmission failed locally. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(fl_tcp_rtx_err, const struct sock *sk, const struct sk_buff *skb, int err)
{
	return on_retransmit((struct sock *)sk, err);
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(fl_tcp_rst_out, const struct sock *csk, const struct sk_buff *skb)
{
	struct sock *sk = (struct sock *)csk;
	struct fl_tcp_stats *s;
	struct fl_owner o;
	u16 family;

	if (!sk) {
		/* A reset answering a segment no socket wants (e.g. a SYN to a closed port). */
		count(CNT_UNSOLICITED_RESETS);
		return 0;
	}
	family = sk->__sk_common.skc_family;
	if ((family != AF_INET && family != AF_INET6) || !owner_of(sk, &o))
		return 0;
	s = stats_for(sk, family, &o);
	if (s)
		__sync_fetch_and_add(&s->resets_sent, 1);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(fl_tcp_rst_in, struct sock *sk)
{
	struct fl_tcp_stats *s;
	struct fl_owner o;
	u16 family = sk->__sk_common.skc_family;

	if ((family != AF_INET && family != AF_INET6) || !owner_of(sk, &o))
		return 0;
	s = stats_for(sk, family, &o);
	if (s)
		__sync_fetch_and_add(&s->resets_received, 1);
	return 0;
}
