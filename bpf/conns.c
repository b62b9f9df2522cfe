//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * meshlane connections view: a BPF iterator over the socket storage map
 * meshlane_sks of meshlane.c. Every socket the datapath redirected carries
 * its original destination there (the client from connect() on, the
 * accepted socket from the handshake on), so walking the map lists exactly
 * the live redirected connections, with no sampling and no guessing from
 * /proc. The agent reads it on demand for `meshlanectl conns`; nothing of
 * it runs on the data path.
 *
 * One fixed-size struct ml_conn is written per socket with bpf_seq_write.
 * Addresses are 16 bytes in network order, IPv4 as IPv4-mapped IPv6, ports
 * host order: the same forms as the datapath's maps.
 *
 * The kernel structures are declared here, minimal and relocatable
 * (preserve_access_index): the loader fixes the field offsets from the
 * running kernel's BTF, so no vmlinux.h is generated or shipped.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Kept identical to meshlane.c: the map below is the datapath's own, handed
 * over at load, and these are its value's bytes. A Go test compares the
 * generated layouts of both objects. */
struct ml_addr {
	__u32 w[4];
};

struct ml_origdst {
	struct ml_addr addr;
	__u16 port;
	__u16 kind;
	__u32 _pad;
	__u64 listener_netns;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ml_origdst);
} meshlane_sks SEC(".maps");

/* One redirected socket as the iterator reports it. */
struct ml_conn {
	struct ml_addr local;
	struct ml_addr remote;
	struct ml_origdst orig;
	__u16 family;
	__u16 local_port;
	__u16 remote_port;
	__u8 state; /* TCP state, as in include/net/tcp_states.h */
	__u8 _pad;
};

/* Kernel types, only the fields read, matched by name at load. */
struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport; /* network order */
	__u16 skc_num;   /* host order */
	unsigned short skc_family;
	unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__bpf_sk_storage_map {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
	struct sock *sk;
	void *value;
} __attribute__((preserve_access_index));

/* Ties struct ml_conn to the object's BTF for bpf2go -type. */
const volatile struct ml_conn ml_btf_conn;

static __always_inline void addr_v4(struct ml_addr *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = ip4;
}

static __always_inline void addr_v6(struct ml_addr *a,
				    const struct in6_addr *in6)
{
	a->w[0] = in6->in6_u.u6_addr32[0];
	a->w[1] = in6->in6_u.u6_addr32[1];
	a->w[2] = in6->in6_u.u6_addr32[2];
	a->w[3] = in6->in6_u.u6_addr32[3];
}

SEC("iter/bpf_sk_storage_map")
int meshlane_conns(struct bpf_iter__bpf_sk_storage_map *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock *sk = ctx->sk;
	struct ml_origdst *o = ctx->value;
	struct ml_conn c = {};

	/* The last call of a walk has neither: nothing to write. */
	if (!sk || !o)
		return 0;

	c.orig = *o;
	c.family = sk->__sk_common.skc_family;
	c.state = sk->__sk_common.skc_state;
	c.local_port = sk->__sk_common.skc_num;
	c.remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
	if (c.family == AF_INET) {
		addr_v4(&c.local, sk->__sk_common.skc_rcv_saddr);
		addr_v4(&c.remote, sk->__sk_common.skc_daddr);
	} else {
		addr_v6(&c.local, &sk->__sk_common.skc_v6_rcv_saddr);
		addr_v6(&c.remote, &sk->__sk_common.skc_v6_daddr);
	}
	bpf_seq_write(seq, &c, sizeof(c));
	return 0;
}
