//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * meshlane datapath: sends a meshed pod's TCP connections to its sidecar
 * without iptables.
 *
 *   cgroup/connect4, connect6  decide per connect() and rewrite the
 *                              destination; remember the original one in
 *                              the socket's local storage.
 *   cgroup/sendmsg4/6,         DNS capture for UDP: queries to port 53 go to
 *   recvmsg4/6                 the sidecar's DNS proxy, replies come back
 *                              from the resolver the app asked.
 *   sockops                    publishes that original destination under the
 *                              connection's 4-tuple once the source port is
 *                              known (TCP_CONNECT); the listener's accepted
 *                              socket takes it into its own storage
 *                              (PASSIVE_ESTABLISHED); the client's close
 *                              removes what was never taken. If enabled, it
 *                              also puts both ends of pod-local connections
 *                              in the sockhash.
 *   cgroup/getsockopt          answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST
 *                              from the accepted socket's storage.
 *   sk_msg                     hands bytes straight to the peer socket.
 *   tc ingress                 on a meshed pod's interface, inside its
 *                              netns: a connection from outside the pod (no
 *                              connect hook saw it) to a redirected port is
 *                              handed to the inbound listener
 *                              (bpf_sk_assign); the accepted socket keeps
 *                              the dialed address, which sockops records as
 *                              the original destination.
 *   sk_lookup                  the same hand-over, attached to the pod's
 *                              network namespace instead of its interface
 *                              (--inbound-hooks sk_lookup): the kernel asks
 *                              it for a listener, and it answers from
 *                              meshlane_listeners, where sockops registers
 *                              the sidecar's inbound listener at listen()
 *                              (and the agent's iterator, listeners.c, the
 *                              ones already open); a pod whose listener
 *                              cannot be registered (MPTCP) gets the tc
 *                              program too.
 *
 * Pod identity is the socket's network namespace cookie, which the agent
 * maps to the pod from the netns the CNI plugin reported: exact from the
 * first packet, no learning, no negative caching.
 *
 * Byte orders in map keys and values: addresses are 16 bytes in network
 * order, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d); ports are host order.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SOCK_DGRAM 2
#define DNS_PORT 53
#define SOL_IP 0
#define SOL_IPV6 41
/* SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST share
 * the number 80. */
#define SO_ORIGINAL_DST 80

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before load. */
volatile const __u32 page_size = 4096;
volatile const __u8 enable_sockmap = 0;
/* Set with --inbound-hooks sk_lookup: sockops registers inbound listeners
 * in meshlane_listeners; other modes leave listeners alone. */
volatile const __u8 register_listeners = 0;

/* One address, 16 bytes in network order. */
struct ml_addr {
	__u32 w[4];
};

enum ml_pod_flags {
	/* Redirect every inbound port not excluded (Istio "*"). */
	ML_POD_INBOUND_ALL = 1,
	/* Redirect every outbound address not excluded (Istio "*"). */
	ML_POD_OUTBOUND_ALL_CIDRS = 2,
	/* Send the apps' DNS (UDP and TCP port 53) to the sidecar's DNS proxy
	 * (Istio ISTIO_META_DNS_CAPTURE). */
	ML_POD_DNS_CAPTURE = 4,
	/* The proxy's connections to a loopback address other than
	 * 127.0.0.1/::1 go to the inbound listener on loopback, as
	 * istio-iptables does: Istio's validation init container relies on it
	 * (it dials 127.0.0.6:15002 and expects its 15006 listener). */
	ML_POD_PROXY_LOOPBACK_INBOUND = 8,
	/* The pod has entries of this kind in meshlane_ports or
	 * meshlane_cidrs: without the flag the lookup is skipped, which is
	 * most of connect()'s cost for a pod without such rules. */
	ML_POD_OUT_PORT_RULES = 16,
	ML_POD_IN_PORT_RULES = 32,
	ML_POD_OUT_CIDR_EXCLUDES = 64,
	ML_POD_OUT_CIDR_INCLUDES = 128,
};

/* Settings of one meshed pod, keyed by netns cookie. */
struct ml_pod {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port;
	__u16 inbound_port;
	__u32 flags; /* enum ml_pod_flags */
	__u16 dns_port; /* the DNS proxy, on loopback */
	__u16 _pad;
};

enum ml_port_dir {
	ML_DIR_INBOUND = 1,
	ML_DIR_OUTBOUND = 2,
};

enum ml_port_flags {
	ML_PORT_EXCLUDE = 1,
	ML_PORT_INCLUDE = 2,
};

/* Per-pod port rule key. */
struct ml_port_key {
	__u64 netns;
	__u16 port;
	__u16 dir; /* enum ml_port_dir */
	__u32 _pad;
};

enum ml_cidr_kind {
	ML_CIDR_EXCLUDE = 1,
	ML_CIDR_INCLUDE = 2,
};

/* LPM key of a per-pod outbound CIDR rule. The matched prefix covers kind
 * and netns in full (96 bits) and then the address prefix, so one trie holds
 * every pod's lists with no per-pod cap. */
struct ml_cidr_key {
	__u32 prefixlen;
	__u32 kind; /* enum ml_cidr_kind */
	__u64 netns;
	struct ml_addr addr;
};

enum ml_redirect_kind {
	ML_REDIRECT_OUTBOUND = 1,
	ML_REDIRECT_INBOUND = 2,
	ML_REDIRECT_DNS = 3,
	/* Inbound from outside the pod, steered by tc to the listener. */
	ML_REDIRECT_INBOUND_REMOTE = 4,
};

/* The original destination of a redirected connection. */
struct ml_origdst {
	struct ml_addr addr;
	__u16 port;
	__u16 kind; /* enum ml_redirect_kind */
	__u32 _pad;
	/* netns cookie of the listener the connection was sent to */
	__u64 listener_netns;
};

/* A TCP connection. In meshlane_origdst: src is the client, dst the
 * listener, netns the listener's. In meshlane_sockhash: src is the socket's
 * own end, dst its peer, netns the pod's cookie for connections inside one
 * pod and 0 otherwise (pod IPs are unique on the node, loopback is not). */
struct ml_tuple {
	__u64 netns;
	struct ml_addr src;
	struct ml_addr dst;
	__u16 src_port;
	__u16 dst_port;
	__u32 _pad;
};

/* Key of meshlane_listeners: a meshed pod's inbound listener, by the
 * pod's netns cookie, the port and the socket's family (an AF_INET6
 * listener that is not v6only takes IPv4 connections too). */
struct ml_listener_key {
	__u64 netns;
	__u16 port;
	__u16 family;
	__u32 _pad;
};

/* Decision counters, one slot each in meshlane_counters. */
enum ml_counter {
	ML_CNT_REDIRECT_OUTBOUND = 0,
	ML_CNT_REDIRECT_INBOUND,
	ML_CNT_REDIRECT_DNS,
	ML_CNT_DNS_REPLY_RESTORED,
	ML_CNT_PASS_NOT_TCP,
	ML_CNT_PASS_NOT_MESHED,
	ML_CNT_PASS_LOOPBACK,
	ML_CNT_PASS_OWN_POD,
	ML_CNT_PASS_PROXY_OWN_POD,
	ML_CNT_PASS_PROXY_UPSTREAM,
	ML_CNT_PASS_OUT_PORT_EXCLUDED,
	ML_CNT_PASS_OUT_CIDR_EXCLUDED,
	ML_CNT_PASS_OUT_CIDR_NOT_INCLUDED,
	ML_CNT_PASS_IN_PORT_EXCLUDED,
	ML_CNT_PASS_IN_PORT_NOT_INCLUDED,
	ML_CNT_STORAGE_FAILED,
	ML_CNT_ORIGDST_RECORDED,
	ML_CNT_ORIGDST_RECORD_FAILED,
	ML_CNT_ORIGDST_ADOPTED,
	ML_CNT_ORIGDST_ANSWERED,
	ML_CNT_ORIGDST_MISSED,
	ML_CNT_ORIGDST_SHORT_BUFFER,
	ML_CNT_SOCKHASH_INSERTED,
	ML_CNT_SOCKHASH_INSERT_FAILED,
	ML_CNT_MSG_REDIRECTED,
	ML_CNT_MSG_REDIRECTED_BYTES,
	ML_CNT_MSG_PEER_MISSING,
	ML_CNT_REDIRECT_INBOUND_REMOTE,
	ML_CNT_REMOTE_NO_LISTENER,
	ML_CNT_REMOTE_ASSIGN_FAILED,
	ML_CNT_REMOTE_COOKIE_ACK_STEERED,
	ML_CNT_LISTENER_REGISTERED,
	ML_CNT_LISTENER_REGISTER_FAILED,
	ML_CNT_MAX,
};

/* Map sizes here are defaults; the loader sets them from its options. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct ml_pod);
} meshlane_pods SEC(".maps");

/* The IPs of meshed pods on this node, to their netns cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, struct ml_addr);
	__type(value, __u64);
} meshlane_podips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ml_port_key);
	__type(value, __u32);
} meshlane_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct ml_cidr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} meshlane_cidrs SEC(".maps");

/* Original destination by connection, from the client's TCP_CONNECT until
 * the listener accepts it (or the client socket closes). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ml_tuple);
	__type(value, struct ml_origdst);
} meshlane_origdst SEC(".maps");

/* The same record on the sockets themselves: on the client from connect()
 * on, on the accepted socket from the handshake on. The kernel frees it with
 * the socket, so nothing per connection outlives its connection. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ml_origdst);
} meshlane_sks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 131072);
	__type(key, struct ml_tuple);
	__type(value, __u64);
} meshlane_sockh SEC(".maps");

/* Inbound listeners sockops could not register (MPTCP sockets cannot go
 * in a sockhash), as their meshlane_listeners key: the agent gives their
 * pods the tc program, which steers to any listener. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} meshlane_unregistered SEC(".maps");

/* The inbound listeners sk_lookup hands connections to. A closed socket
 * leaves the map on its own. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 32768);
	__type(key, struct ml_listener_key);
	__type(value, __u64);
} meshlane_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ML_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} meshlane_cnt SEC(".maps");

/* The enums are shared with Go but used by no map, so this read-only
 * variable carries them into BTF for bpf2go -type. Nothing reads it. */
const volatile struct {
	enum ml_counter counter;
	enum ml_pod_flags pod_flags;
	enum ml_port_dir port_dir;
	enum ml_port_flags port_flags;
	enum ml_cidr_kind cidr_kind;
	enum ml_redirect_kind redirect_kind;
} ml_btf_enums;

static __always_inline void count_n(__u32 what, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&meshlane_cnt, &what);

	if (v)
		*v += n;
}

static __always_inline void count(__u32 what)
{
	count_n(what, 1);
}

static __always_inline void addr_v4(struct ml_addr *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = ip4;
}

static __always_inline int addr_is_v4(const struct ml_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_is_loopback(const struct ml_addr *a)
{
	if (addr_is_v4(a))
		return (bpf_ntohl(a->w[3]) >> 24) == 127;
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 &&
	       a->w[3] == bpf_htonl(1);
}

/* Addresses that only exist inside one network namespace: loopback, and
 * ::6, which Istio puts on lo as the IPv6 source of its inbound passthrough
 * (127.0.0.6 is loopback already). A connection using one never leaves its
 * pod, so its sockhash key is scoped to the pod's netns. */
static __always_inline int addr_is_pod_local(const struct ml_addr *a)
{
	return addr_is_loopback(a) ||
	       (a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 &&
		a->w[3] == bpf_htonl(6));
}

/* 127.0.0.1 or ::1, where local listeners usually are. */
static __always_inline int addr_is_default_loopback(const struct ml_addr *a)
{
	if (addr_is_v4(a))
		return a->w[3] == bpf_htonl(0x7f000001);
	return addr_is_loopback(a);
}

/* Ports in the remote_port/dst_port fields of sock_ops and sk_msg are in
 * network order; depending on the kernel and the field they sit in the low or
 * the high 16 bits of the u32. A real port is never 0, so the half that holds
 * it can be told apart. */
static __always_inline __u16 port_from_net32(__u32 p)
{
	if (p > 0xffff)
		p >>= 16;
	return bpf_ntohs((__u16)p);
}

static __always_inline __u32 port_flags(__u64 netns, __u16 port, __u16 dir)
{
	struct ml_port_key k = { .netns = netns, .port = port, .dir = dir };
	__u32 *f = bpf_map_lookup_elem(&meshlane_ports, &k);

	return f ? *f : 0;
}

static __always_inline int cidr_match(__u64 netns, __u32 kind,
				      const struct ml_addr *a)
{
	struct ml_cidr_key k = {
		.prefixlen = 32 + 64 + 128,
		.kind = kind,
		.netns = netns,
		.addr = *a,
	};

	return bpf_map_lookup_elem(&meshlane_cidrs, &k) != NULL;
}

enum verdict {
	V_PASS = 0,
	V_OUTBOUND,
	V_INBOUND,
	V_DNS,
	V_LOOPBACK_INBOUND, /* to the pod's own inbound listener on loopback */
};

struct decision {
	struct ml_origdst orig;
	__u16 new_port;
};

/* Rule 2: a connection to podIP:port of a meshed pod on this node goes to
 * that pod's inbound listener, unless the port is excluded. Sockops asks
 * again of connections tc decided on, uncounted. */
static __always_inline int decide_inbound_n(struct decision *d, __u64 dst_netns,
					    const struct ml_pod *dst, int counted)
{
	__u32 pf = 0;

	if (dst->flags & ML_POD_IN_PORT_RULES)
		pf = port_flags(dst_netns, d->orig.port, ML_DIR_INBOUND);

	if ((pf & ML_PORT_EXCLUDE) || d->orig.port == dst->inbound_port) {
		if (counted)
			count(ML_CNT_PASS_IN_PORT_EXCLUDED);
		return V_PASS;
	}
	if (!(dst->flags & ML_POD_INBOUND_ALL) && !(pf & ML_PORT_INCLUDE)) {
		if (counted)
			count(ML_CNT_PASS_IN_PORT_NOT_INCLUDED);
		return V_PASS;
	}
	d->orig.kind = ML_REDIRECT_INBOUND;
	d->orig.listener_netns = dst_netns;
	d->new_port = dst->inbound_port;
	return V_INBOUND;
}

static __always_inline int decide_inbound(struct decision *d, __u64 dst_netns,
					  const struct ml_pod *dst)
{
	return decide_inbound_n(d, dst_netns, dst, 1);
}

/* Rule 1: an app connection goes to its own sidecar's outbound listener
 * unless its port or address is excluded. */
static __always_inline int decide_outbound(struct decision *d, __u64 netns,
					   const struct ml_pod *src)
{
	__u32 pf = 0;

	if (src->flags & ML_POD_OUT_PORT_RULES)
		pf = port_flags(netns, d->orig.port, ML_DIR_OUTBOUND);
	if (pf & ML_PORT_EXCLUDE) {
		count(ML_CNT_PASS_OUT_PORT_EXCLUDED);
		return V_PASS;
	}
	if (!(pf & ML_PORT_INCLUDE)) {
		if ((src->flags & ML_POD_OUT_CIDR_EXCLUDES) &&
		    cidr_match(netns, ML_CIDR_EXCLUDE, &d->orig.addr)) {
			count(ML_CNT_PASS_OUT_CIDR_EXCLUDED);
			return V_PASS;
		}
		if (!(src->flags & ML_POD_OUTBOUND_ALL_CIDRS) &&
		    !((src->flags & ML_POD_OUT_CIDR_INCLUDES) &&
		      cidr_match(netns, ML_CIDR_INCLUDE, &d->orig.addr))) {
			count(ML_CNT_PASS_OUT_CIDR_NOT_INCLUDED);
			return V_PASS;
		}
	}
	d->orig.kind = ML_REDIRECT_OUTBOUND;
	d->orig.listener_netns = netns;
	d->new_port = src->outbound_port;
	return V_OUTBOUND;
}

/* DNS capture: an app's query to port 53 of any non-loopback address goes
 * to the sidecar's DNS proxy on loopback; the proxy's own queries do not. */
static __always_inline int decide_dns(struct decision *d, __u64 netns,
				      const struct ml_pod *src)
{
	d->orig.kind = ML_REDIRECT_DNS;
	d->orig.listener_netns = netns;
	d->new_port = src->dns_port;
	return V_DNS;
}

static __always_inline int is_dns(const struct decision *d,
				  const struct ml_pod *src)
{
	return d->orig.port == DNS_PORT && (src->flags & ML_POD_DNS_CAPTURE) &&
	       src->dns_port && !addr_is_loopback(&d->orig.addr);
}

/* UDP: only DNS capture; everything else keeps its path. */
static __always_inline int decide_udp(struct bpf_sock_addr *ctx,
				      struct decision *d)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct ml_pod *src = bpf_map_lookup_elem(&meshlane_pods, &netns);

	if (!src || !is_dns(d, src)) {
		count(ML_CNT_PASS_NOT_TCP);
		return V_PASS;
	}
	__u64 ugid = bpf_get_current_uid_gid();
	if ((__u32)ugid == src->proxy_uid || (__u32)(ugid >> 32) == src->proxy_gid) {
		count(ML_CNT_PASS_PROXY_UPSTREAM);
		return V_PASS;
	}
	return decide_dns(d, netns, src);
}

static __always_inline int decide(struct bpf_sock_addr *ctx, struct decision *d)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct ml_pod *src = bpf_map_lookup_elem(&meshlane_pods, &netns);
	__u64 *dst_netns_p = bpf_map_lookup_elem(&meshlane_podips, &d->orig.addr);
	__u64 dst_netns = dst_netns_p ? *dst_netns_p : 0;
	struct ml_pod *dst = NULL;

	if (dst_netns)
		dst = bpf_map_lookup_elem(&meshlane_pods, &dst_netns);

	if (!src) {
		/* Host processes and pods that are not meshed: only rule 2. */
		if (dst)
			return decide_inbound(d, dst_netns, dst);
		count(ML_CNT_PASS_NOT_MESHED);
		return V_PASS;
	}

	__u64 ugid = bpf_get_current_uid_gid();
	__u32 uid = (__u32)ugid, gid = (__u32)(ugid >> 32);

	if (uid == src->proxy_uid || gid == src->proxy_gid) {
		/* The sidecar itself: never back to its own pod (inbound
		 * passthrough from 127.0.0.6 included), never to its own
		 * outbound listener; to another meshed pod, rule 2. */
		if (dst_netns == netns) {
			count(ML_CNT_PASS_PROXY_OWN_POD);
			return V_PASS;
		}
		if ((src->flags & ML_POD_PROXY_LOOPBACK_INBOUND) &&
		    addr_is_pod_local(&d->orig.addr) &&
		    !addr_is_default_loopback(&d->orig.addr)) {
			d->orig.kind = ML_REDIRECT_INBOUND;
			d->orig.listener_netns = netns;
			d->new_port = src->inbound_port;
			return V_LOOPBACK_INBOUND;
		}
		if (dst)
			return decide_inbound(d, dst_netns, dst);
		count(ML_CNT_PASS_PROXY_UPSTREAM);
		return V_PASS;
	}
	if (addr_is_loopback(&d->orig.addr)) {
		count(ML_CNT_PASS_LOOPBACK);
		return V_PASS;
	}
	if (dst_netns == netns) {
		count(ML_CNT_PASS_OWN_POD);
		return V_PASS;
	}
	if (is_dns(d, src))
		return decide_dns(d, netns, src);
	return decide_outbound(d, netns, src);
}

/* Keeps the original destination on the socket for sockops to publish once
 * the source port is chosen. Without it the sidecar could not learn where the
 * connection was going, so the connection is left alone (and counted). */
static __always_inline int remember(struct bpf_sock_addr *ctx,
				    const struct decision *d)
{
	struct bpf_sock *sk = ctx->sk;
	struct ml_origdst *o;

	if (!sk)
		return -1;
	o = bpf_sk_storage_get(&meshlane_sks, sk, 0,
			       BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		count(ML_CNT_STORAGE_FAILED);
		return -1;
	}
	*o = d->orig;
	return 0;
}

/* Rewrites the destination of an IPv4 connect() or sendmsg() for verdict v. */
static __always_inline void rewrite4(struct bpf_sock_addr *ctx,
				     const struct decision *d, int v)
{
	if (v == V_INBOUND) {
		count(ML_CNT_REDIRECT_INBOUND);
	} else {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		count(v == V_DNS		  ? ML_CNT_REDIRECT_DNS :
		      v == V_LOOPBACK_INBOUND ? ML_CNT_REDIRECT_INBOUND :
						ML_CNT_REDIRECT_OUTBOUND);
	}
	ctx->user_port = bpf_htons(d->new_port);
}

/* The same for IPv6; an IPv4-mapped destination goes to ::ffff:127.0.0.1. */
static __always_inline void rewrite6(struct bpf_sock_addr *ctx,
				     const struct decision *d, int v)
{
	if (v == V_INBOUND) {
		count(ML_CNT_REDIRECT_INBOUND);
	} else {
		int v4 = addr_is_v4(&d->orig.addr);

		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = v4 ? bpf_htonl(0x0000ffff) : 0;
		ctx->user_ip6[3] = v4 ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		count(v == V_DNS		  ? ML_CNT_REDIRECT_DNS :
		      v == V_LOOPBACK_INBOUND ? ML_CNT_REDIRECT_INBOUND :
						ML_CNT_REDIRECT_OUTBOUND);
	}
	ctx->user_port = bpf_htons(d->new_port);
}

/* TCP or UDP, or neither (0). */
static __always_inline int l4(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		return IPPROTO_TCP;
	if (ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

static __always_inline void load6(struct bpf_sock_addr *ctx, struct decision *d)
{
	/* IPv4-mapped destinations of dual-stack sockets arrive here too and
	 * are already in the map-key form. */
	d->orig.addr.w[0] = ctx->user_ip6[0];
	d->orig.addr.w[1] = ctx->user_ip6[1];
	d->orig.addr.w[2] = ctx->user_ip6[2];
	d->orig.addr.w[3] = ctx->user_ip6[3];
}

static __always_inline int connect_or_send(struct bpf_sock_addr *ctx,
					   struct decision *d)
{
	switch (l4(ctx)) {
	case IPPROTO_TCP:
		return decide(ctx, d);
	case IPPROTO_UDP:
		return decide_udp(ctx, d);
	}
	count(ML_CNT_PASS_NOT_TCP);
	return V_PASS;
}

SEC("cgroup/connect4")
int meshlane_connect4(struct bpf_sock_addr *ctx)
{
	struct decision d = {};
	int v;

	addr_v4(&d.orig.addr, ctx->user_ip4);
	d.orig.port = bpf_ntohs((__u16)ctx->user_port);
	v = connect_or_send(ctx, &d);
	if (v != V_PASS && !remember(ctx, &d))
		rewrite4(ctx, &d, v);
	return 1;
}

SEC("cgroup/connect6")
int meshlane_connect6(struct bpf_sock_addr *ctx)
{
	struct decision d = {};
	int v;

	load6(ctx, &d);
	d.orig.port = bpf_ntohs((__u16)ctx->user_port);
	v = connect_or_send(ctx, &d);
	if (v != V_PASS && !remember(ctx, &d))
		rewrite6(ctx, &d, v);
	return 1;
}

/* sendto() on an unconnected UDP socket: DNS capture only. The socket keeps
 * the last original resolver, for recvmsg to restore. */
SEC("cgroup/sendmsg4")
int meshlane_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct decision d = {};

	addr_v4(&d.orig.addr, ctx->user_ip4);
	d.orig.port = bpf_ntohs((__u16)ctx->user_port);
	if (l4(ctx) == IPPROTO_UDP && decide_udp(ctx, &d) == V_DNS &&
	    !remember(ctx, &d))
		rewrite4(ctx, &d, V_DNS);
	return 1;
}

SEC("cgroup/sendmsg6")
int meshlane_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct decision d = {};

	load6(ctx, &d);
	d.orig.port = bpf_ntohs((__u16)ctx->user_port);
	if (l4(ctx) == IPPROTO_UDP && decide_udp(ctx, &d) == V_DNS &&
	    !remember(ctx, &d))
		rewrite6(ctx, &d, V_DNS);
	return 1;
}

/* A reply from the DNS proxy to a captured socket: the app sees it come
 * from the resolver it asked, as iptables' conntrack would show it. */
static __always_inline struct ml_origdst *dns_reply(struct bpf_sock_addr *ctx,
						   const struct ml_addr *from)
{
	struct bpf_sock *sk = ctx->sk;
	struct ml_origdst *o;
	struct ml_pod *pod;
	__u64 netns;

	if (!sk || !addr_is_loopback(from))
		return NULL;
	o = bpf_sk_storage_get(&meshlane_sks, sk, 0, 0);
	if (!o || o->kind != ML_REDIRECT_DNS)
		return NULL;
	netns = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&meshlane_pods, &netns);
	if (!pod || bpf_ntohs((__u16)ctx->user_port) != pod->dns_port)
		return NULL;
	count(ML_CNT_DNS_REPLY_RESTORED);
	return o;
}

SEC("cgroup/recvmsg4")
int meshlane_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct ml_addr from;
	struct ml_origdst *o;

	addr_v4(&from, ctx->user_ip4);
	o = dns_reply(ctx, &from);
	if (o && addr_is_v4(&o->addr)) {
		ctx->user_ip4 = o->addr.w[3];
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

SEC("cgroup/recvmsg6")
int meshlane_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct ml_addr from;
	struct ml_origdst *o;

	from.w[0] = ctx->user_ip6[0];
	from.w[1] = ctx->user_ip6[1];
	from.w[2] = ctx->user_ip6[2];
	from.w[3] = ctx->user_ip6[3];
	o = dns_reply(ctx, &from);
	if (o) {
		ctx->user_ip6[0] = o->addr.w[0];
		ctx->user_ip6[1] = o->addr.w[1];
		ctx->user_ip6[2] = o->addr.w[2];
		ctx->user_ip6[3] = o->addr.w[3];
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

/* Loads an address from a context's ip4 and ip6 fields into map form.
 * Both are read, as volatile loads, whatever the family, and the value is
 * chosen afterwards: otherwise clang chooses between the fields' addresses
 * and emits pointer arithmetic on the context, which the verifier refuses. */
#define CTX_LOAD(p) (*(volatile __u32 *)&(p))
#define CTX_ADDR(a, is_v4, ctx, f4, f6)                                      \
	do {                                                                 \
		__u32 _v4 = CTX_LOAD((ctx)->f4);                             \
		__u32 _w0 = CTX_LOAD((ctx)->f6[0]);                          \
		__u32 _w1 = CTX_LOAD((ctx)->f6[1]);                          \
		__u32 _w2 = CTX_LOAD((ctx)->f6[2]);                          \
		__u32 _w3 = CTX_LOAD((ctx)->f6[3]);                          \
		if (is_v4) {                                                 \
			addr_v4((a), _v4);                                   \
		} else {                                                     \
			(a)->w[0] = _w0;                                     \
			(a)->w[1] = _w1;                                     \
			(a)->w[2] = _w2;                                     \
			(a)->w[3] = _w3;                                     \
		}                                                            \
	} while (0)

static __always_inline void skops_local(struct bpf_sock_ops *skops,
					struct ml_addr *a)
{
	CTX_ADDR(a, skops->family == AF_INET, skops, local_ip4, local_ip6);
}

static __always_inline void skops_remote(struct bpf_sock_ops *skops,
					 struct ml_addr *a)
{
	CTX_ADDR(a, skops->family == AF_INET, skops, remote_ip4, remote_ip6);
}

/* The meshlane_origdst key of a redirected connection, from its client
 * socket. */
static __always_inline void client_tuple(struct bpf_sock_ops *skops,
					 const struct ml_origdst *o,
					 struct ml_tuple *t)
{
	t->netns = o->listener_netns;
	skops_local(skops, &t->src);
	skops_remote(skops, &t->dst);
	t->src_port = (__u16)skops->local_port;
	t->dst_port = port_from_net32(skops->remote_port);
}

/* Client side of a redirected connection, source port now chosen: publish
 * the original destination under the connection's tuple for the listener's
 * getsockopt, and ask for state callbacks so it is removed on close. */
static __always_inline void publish_origdst(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct ml_origdst *o;
	struct ml_tuple t = {};

	if (!sk)
		return;
	o = bpf_sk_storage_get(&meshlane_sks, sk, 0, 0);
	if (!o)
		return;
	client_tuple(skops, o, &t);
	if (bpf_map_update_elem(&meshlane_origdst, &t, o, BPF_ANY)) {
		count(ML_CNT_ORIGDST_RECORD_FAILED);
		return;
	}
	count(ML_CNT_ORIGDST_RECORDED);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* A client socket that asked for state callbacks has closed: remove what
 * was recorded for its connection and never taken. */
static __always_inline void closed(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct ml_origdst *o;

	if (!sk)
		return;
	o = bpf_sk_storage_get(&meshlane_sks, sk, 0, 0);
	if (!o)
		return;

	struct ml_tuple t = {};

	client_tuple(skops, o, &t);
	bpf_map_delete_elem(&meshlane_origdst, &t);
}

/* Whether a connection to a meshed pod's local:port from remote is one tc
 * steers to the inbound listener: from outside the pod (not loopback, ::6
 * or the pod's own address) to a port the inbound rules redirect. */
static __always_inline int steered(struct decision *d, __u64 netns,
				   const struct ml_pod *pod,
				   const struct ml_addr *remote, int counted)
{
	__u64 *remote_netns;

	if (addr_is_pod_local(remote))
		return 0;
	remote_netns = bpf_map_lookup_elem(&meshlane_podips, remote);
	if (remote_netns && *remote_netns == netns)
		return 0;
	return decide_inbound_n(d, netns, pod, counted) == V_INBOUND;
}

/* Listener side of a connection tc steered from outside the pod: the
 * accepted socket's own address is the one dialed, so it is the original
 * destination. */
static __always_inline void adopt_steered(struct bpf_sock *sk,
					  const struct ml_tuple *t)
{
	struct ml_origdst *mine;
	struct decision d = {};
	struct ml_pod *pod;

	pod = bpf_map_lookup_elem(&meshlane_pods, &t->netns);
	if (!pod)
		return;
	d.orig.addr = t->dst;
	d.orig.port = t->dst_port;
	if (!steered(&d, t->netns, pod, &t->src, 0))
		return;
	mine = bpf_sk_storage_get(&meshlane_sks, sk, 0,
				  BPF_SK_STORAGE_GET_F_CREATE);
	if (!mine) {
		count(ML_CNT_STORAGE_FAILED);
		return;
	}
	mine->addr = t->dst;
	mine->port = t->dst_port;
	mine->kind = ML_REDIRECT_INBOUND_REMOTE;
	mine->listener_netns = t->netns;
	count(ML_CNT_ORIGDST_ADOPTED);
}

/* Listener side of a redirected connection, just accepted: move the
 * original destination from the tuple-keyed map onto the accepted socket,
 * where getsockopt finds it without a lookup by address and where it dies
 * with the socket. */
static __always_inline void adopt_origdst(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct ml_origdst *o, *mine;
	struct ml_tuple t = {};

	if (!sk)
		return;
	t.netns = bpf_get_netns_cookie(skops);
	/* Redirected connections only ever go to sidecars, which live in
	 * meshed pods: one small lookup spares every other accepted socket of
	 * the node the two tuple-keyed ones below. */
	if (!bpf_map_lookup_elem(&meshlane_pods, &t.netns))
		return;
	skops_remote(skops, &t.src);
	skops_local(skops, &t.dst);
	t.src_port = port_from_net32(skops->remote_port);
	t.dst_port = (__u16)skops->local_port;

	o = bpf_map_lookup_elem(&meshlane_origdst, &t);
	if (!o) {
		adopt_steered(sk, &t);
		return;
	}
	mine = bpf_sk_storage_get(&meshlane_sks, sk, 0,
				  BPF_SK_STORAGE_GET_F_CREATE);
	if (!mine) {
		count(ML_CNT_STORAGE_FAILED);
		return;
	}
	*mine = *o;
	bpf_map_delete_elem(&meshlane_origdst, &t);
	count(ML_CNT_ORIGDST_ADOPTED);
}

/* Both ends of a connection between meshed pods of this node (app <->
 * sidecar over loopback, sidecar <-> sidecar across pods) go into the
 * sockhash so sk_msg can hand bytes across. */
static __always_inline void accelerate(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct ml_tuple t = {};

	if (!bpf_map_lookup_elem(&meshlane_pods, &netns))
		return;
	skops_local(skops, &t.src);
	skops_remote(skops, &t.dst);
	if (addr_is_pod_local(&t.src) || addr_is_pod_local(&t.dst))
		t.netns = netns;
	else if (!bpf_map_lookup_elem(&meshlane_podips, &t.dst))
		return;
	t.src_port = (__u16)skops->local_port;
	t.dst_port = port_from_net32(skops->remote_port);

	if (bpf_sock_hash_update(skops, &meshlane_sockh, &t, BPF_ANY))
		count(ML_CNT_SOCKHASH_INSERT_FAILED);
	else
		count(ML_CNT_SOCKHASH_INSERTED);
}

/* A meshed pod's sidecar opens its inbound listener: register it for
 * sk_lookup. A socket the kernel cannot put in a sockhash (MPTCP) is
 * counted and reported to the agent, which puts the tc program on the pod;
 * until then sk_lookup finds no listener and drops connections from
 * outside the pod rather than let them reach the app. */
static __always_inline void register_listener(struct bpf_sock_ops *skops)
{
	struct ml_listener_key k = {};
	struct ml_pod *pod;

	k.netns = bpf_get_netns_cookie(skops);
	pod = bpf_map_lookup_elem(&meshlane_pods, &k.netns);
	if (!pod || skops->local_port != pod->inbound_port)
		return;
	k.port = pod->inbound_port;
	k.family = (__u16)skops->family;
	if (bpf_sock_hash_update(skops, &meshlane_listeners, &k, BPF_ANY)) {
		count(ML_CNT_LISTENER_REGISTER_FAILED);
		bpf_ringbuf_output(&meshlane_unregistered, &k, sizeof(k), 0);
	} else {
		count(ML_CNT_LISTENER_REGISTERED);
	}
}

SEC("sockops")
int meshlane_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		publish_origdst(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			closed(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		adopt_origdst(skops);
		if (enable_sockmap)
			accelerate(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (enable_sockmap)
			accelerate(skops);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		if (register_listeners)
			register_listener(skops);
		break;
	}
	return 1;
}

SEC("sk_msg")
int meshlane_sk_msg(struct sk_msg_md *msg)
{
	struct ml_tuple peer = {};
	__u32 size = msg->size;

	/* The peer's own end is our remote end. */
	CTX_ADDR(&peer.src, msg->family == AF_INET, msg, remote_ip4, remote_ip6);
	CTX_ADDR(&peer.dst, msg->family == AF_INET, msg, local_ip4, local_ip6);
	peer.src_port = port_from_net32(msg->remote_port);
	peer.dst_port = (__u16)msg->local_port;
	if (addr_is_pod_local(&peer.src) || addr_is_pod_local(&peer.dst))
		peer.netns = bpf_get_netns_cookie(msg);

	/* The helper returns SK_DROP when the peer is not in the map; the
	 * program's own SK_PASS then sends the bytes the normal way. */
	if (bpf_msg_redirect_hash(msg, &meshlane_sockh, &peer, BPF_F_INGRESS) ==
	    SK_PASS) {
		count(ML_CNT_MSG_REDIRECTED);
		count_n(ML_CNT_MSG_REDIRECTED_BYTES, size);
	} else {
		count(ML_CNT_MSG_PEER_MISSING);
	}
	return SK_PASS;
}

/* Answers the sidecar's SO_ORIGINAL_DST for connections meshlane redirected
 * and leaves every other getsockopt exactly as the kernel answered it. */
SEC("cgroup/getsockopt")
int meshlane_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk;
	struct ml_origdst *o;

	if (ctx->optname != SO_ORIGINAL_DST ||
	    (ctx->level != SOL_IP && ctx->level != SOL_IPV6)) {
		/* The program sees at most one page of a larger optval:
		 * optlen 0 tells the kernel to keep its own answer. (Kernels
		 * since 6.5 keep it anyway; older ones fail with EFAULT.) */
		if (ctx->optlen > (__s32)page_size)
			ctx->optlen = 0;
		return 1;
	}
	sk = ctx->sk;
	if (!sk)
		return 1;
	o = bpf_sk_storage_get(&meshlane_sks, sk, 0, 0);
	if (!o) {
		count(ML_CNT_ORIGDST_MISSED);
		return 1;
	}

	if (ctx->level == SOL_IP) {
		struct {
			__u16 family;
			__u16 port;
			__u32 addr;
			__u8 zero[8];
		} *sin = ctx->optval;

		if (!addr_is_v4(&o->addr)) {
			count(ML_CNT_ORIGDST_MISSED);
			return 1;
		}
		if ((void *)(sin + 1) > ctx->optval_end) {
			count(ML_CNT_ORIGDST_SHORT_BUFFER);
			return 1;
		}
		sin->family = AF_INET;
		sin->port = bpf_htons(o->port);
		sin->addr = o->addr.w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct {
			__u16 family;
			__u16 port;
			__u32 flowinfo;
			__u32 addr[4];
			__u32 scope_id;
		} *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end) {
			count(ML_CNT_ORIGDST_SHORT_BUFFER);
			return 1;
		}
		sin6->family = AF_INET6;
		sin6->port = bpf_htons(o->port);
		sin6->flowinfo = 0;
		sin6->addr[0] = o->addr.w[0];
		sin6->addr[1] = o->addr.w[1];
		sin6->addr[2] = o->addr.w[2];
		sin6->addr[3] = o->addr.w[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	count(ML_CNT_ORIGDST_ANSWERED);
	return 1;
}

/* tc: connections from outside the pod.
 *
 * No connect hook on this node sees a connection that comes from another
 * node (or from a process whose cgroup runs no meshlane program), so it
 * would reach the app's port directly. This program sits on the pod's
 * interface, inside its netns, and does what istio-iptables' PREROUTING
 * REDIRECT does, without rewriting a byte: a SYN to a redirected port is
 * handed to the sidecar's inbound listener (bpf_sk_assign, as TPROXY
 * does). The connection it makes keeps the dialed address and port as its
 * own, so its later segments and its replies need nothing from tc, it
 * outlives the program, and the sidecar's SO_ORIGINAL_DST is the accepted
 * socket's own address (sockops, adopt_steered).
 *
 * A connection the connect hooks already redirected arrives with the
 * inbound listener's port, which is never steered: one path per
 * connection. The program returns TC_ACT_UNSPEC, which is also tcx's
 * "next", so programs attached after it still run, except for a SYN it
 * steered (TC_ACT_OK: its fate is decided) or dropped. */

#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

struct pkt {
	struct ml_addr src, dst;
	__u16 sport, dport;
	__u8 flags;
	__u8 v4;
};

/* 0 when skb is a TCP segment over IPv4 or IPv6 on Ethernet. IPv4
 * fragments and IPv6 extension headers are left alone: TCP stacks set DF
 * and send no extension headers, and a later fragment has no ports. The
 * loads copy, so headers outside the linear part need no pull. */
static __always_inline int parse_tcp(struct __sk_buff *skb, struct pkt *p)
{
	__u32 l4;
	__u8 tcp[14];

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return -1;
		if (ip.protocol != IPPROTO_TCP || ip.ihl < 5 ||
		    (ip.frag_off & bpf_htons(0x3fff)))
			return -1;
		addr_v4(&p->src, ip.saddr);
		addr_v4(&p->dst, ip.daddr);
		l4 = ETH_HLEN + ip.ihl * 4;
		p->v4 = 1;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return -1;
		if (ip6.nexthdr != IPPROTO_TCP)
			return -1;
		__builtin_memcpy(&p->src, &ip6.saddr, sizeof(p->src));
		__builtin_memcpy(&p->dst, &ip6.daddr, sizeof(p->dst));
		l4 = ETH_HLEN + sizeof(ip6);
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, l4, tcp, sizeof(tcp)))
		return -1;
	p->sport = (__u16)tcp[0] << 8 | tcp[1];
	p->dport = (__u16)tcp[2] << 8 | tcp[3];
	p->flags = tcp[13];
	return 0;
}

/* Looks up the TCP socket this node would give a segment from p's source
 * to p's destination address and port dport, in the pod's netns. */
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb,
					       const struct pkt *p, __u16 dport,
					       int listener_only)
{
	struct bpf_sock_tuple t = {};
	__u32 size;

	if (p->v4) {
		t.ipv4.saddr = p->src.w[3];
		t.ipv4.daddr = p->dst.w[3];
		t.ipv4.sport = bpf_htons(p->sport);
		t.ipv4.dport = bpf_htons(dport);
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, &p->src, sizeof(t.ipv6.saddr));
		__builtin_memcpy(t.ipv6.daddr, &p->dst, sizeof(t.ipv6.daddr));
		t.ipv6.sport = bpf_htons(p->sport);
		t.ipv6.dport = bpf_htons(dport);
		size = sizeof(t.ipv6);
	}
	if (listener_only)
		return bpf_sk_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	return bpf_skc_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
}

/* Hands skb to the inbound listener (port) of the pod, or drops it when
 * there is none (the sidecar is not up): never let through to the app
 * around the sidecar; the peer's retransmission finds the listener once it
 * is there. counter names what a success counts. */
static __always_inline int to_listener(struct __sk_buff *skb,
				       const struct pkt *p, __u16 port,
				       __u32 counter)
{
	struct bpf_sock *sk = lookup(skb, p, port, 1);
	long err;

	if (sk && sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		sk = NULL;
	}
	if (!sk) {
		count(ML_CNT_REMOTE_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count(ML_CNT_REMOTE_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	count(counter);
	return TC_ACT_OK;
}

/* Whether the stack holds a connection for p (a request socket,
 * established or TIME_WAIT), rather than only a listener or nothing. */
static __always_inline int held(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock *sk = lookup(skb, p, p->dport, 0);
	int h;

	if (!sk)
		return 0;
	h = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return h;
}

/* A segment into the pod from outside it. A SYN to a redirected port goes
 * to the inbound listener (the inbound rules decide, as for one from a
 * host process: decide_inbound); so does a segment that finds no
 * connection held for it: the last ACK of a handshake the listener
 * answered with a SYN cookie (its queue was full), which would otherwise
 * complete on the app's own listener, around the sidecar. Every other
 * segment belongs to a connection the stack holds and is left to it. */
static __always_inline int steer(struct __sk_buff *skb, const struct pkt *p,
				 int syn)
{
	struct decision d = {};
	struct ml_pod *pod = NULL;
	__u64 *netns;

	netns = bpf_map_lookup_elem(&meshlane_podips, &p->dst);
	if (netns)
		pod = bpf_map_lookup_elem(&meshlane_pods, netns);
	if (!pod) {
		if (syn)
			count(ML_CNT_PASS_NOT_MESHED);
		return TC_ACT_UNSPEC;
	}
	/* The inbound port already: a connect hook redirected it (or the
	 * peer dialed it), and it was counted there. */
	if (p->dport == pod->inbound_port)
		return TC_ACT_UNSPEC;
	d.orig.addr = p->dst;
	d.orig.port = p->dport;
	if (!steered(&d, *netns, pod, &p->src, syn))
		return TC_ACT_UNSPEC;
	/* A segment of a connection the stack holds (a retransmitted SYN
	 * included) is the stack's to match. */
	if (held(skb, p))
		return TC_ACT_UNSPEC;
	return to_listener(skb, p, d.new_port,
			   syn ? ML_CNT_REDIRECT_INBOUND_REMOTE :
				 ML_CNT_REMOTE_COOKIE_ACK_STEERED);
}

SEC("tc")
int meshlane_tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};

	if (parse_tcp(skb, &p) || (p.flags & TH_RST))
		return TC_ACT_UNSPEC;
	if ((p.flags & (TH_SYN | TH_ACK)) == TH_SYN)
		return steer(skb, &p, 1);
	if ((p.flags & (TH_SYN | TH_ACK)) == TH_ACK)
		return steer(skb, &p, 0);
	return TC_ACT_UNSPEC;
}

/* sk_lookup: the kernel asks, for a segment that matched no connection in
 * the pod's network namespace (a SYN, or the last ACK of a SYN-cookie
 * handshake), which listener takes it. Same rules as tc's steer(), with no
 * packet to parse and no held() check: the kernel only asks once it found
 * no connection. The listener comes from meshlane_listeners (sk_lookup
 * programs cannot look sockets up by address). */
static __always_inline struct bpf_sock *
inbound_listener(__u64 netns, __u16 port, __u32 family)
{
	struct ml_listener_key k = {.netns = netns, .port = port};
	struct bpf_sock *sk;

	k.family = (__u16)family;
	sk = bpf_map_lookup_elem(&meshlane_listeners, &k);
	if (!sk && family == AF_INET) {
		/* A dual-stack [::] listener takes IPv4 too. */
		k.family = AF_INET6;
		sk = bpf_map_lookup_elem(&meshlane_listeners, &k);
	}
	return sk;
}

SEC("sk_lookup")
int meshlane_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct ml_addr local = {}, remote = {};
	struct decision d = {};
	struct ml_pod *pod = NULL;
	struct bpf_sock *sk;
	__u64 *netns;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == AF_INET) {
		addr_v4(&local, ctx->local_ip4);
		addr_v4(&remote, ctx->remote_ip4);
	} else {
		__builtin_memcpy(&local, ctx->local_ip6, sizeof(local));
		__builtin_memcpy(&remote, ctx->remote_ip6, sizeof(remote));
	}
	netns = bpf_map_lookup_elem(&meshlane_podips, &local);
	if (netns)
		pod = bpf_map_lookup_elem(&meshlane_pods, netns);
	if (!pod)
		return SK_PASS;
	if (ctx->local_port == pod->inbound_port)
		return SK_PASS;
	d.orig.addr = local;
	d.orig.port = (__u16)ctx->local_port;
	if (!steered(&d, *netns, pod, &remote, 1))
		return SK_PASS;
	sk = inbound_listener(*netns, d.new_port, ctx->family);
	if (!sk) {
		count(ML_CNT_REMOTE_NO_LISTENER);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count(ML_CNT_REMOTE_ASSIGN_FAILED);
		return SK_DROP;
	}
	count(ML_CNT_REDIRECT_INBOUND_REMOTE);
	return SK_PASS;
}
