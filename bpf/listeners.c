//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * meshlane listener registry: a BPF iterator over the TCP sockets of one
 * network namespace that puts a meshed pod's inbound listeners into
 * meshlane_listeners of meshlane.c, for its sk_lookup program. sockops
 * registers a listener when the sidecar calls listen(); this covers the
 * listeners that were open before: a pod meshed once its sidecar listens,
 * an agent that switched to --inbound-hooks sk_lookup, an upgrade to a new
 * map layout. The agent runs it on demand inside the pod's namespace (a
 * TCP iterator walks the namespace of the task that opens it), after
 * setting the pod and port to look for.
 *
 * The kernel structures are declared here, minimal and relocatable
 * (preserve_access_index), as in conns.c.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define TCP_LISTEN 10 /* include/net/tcp_states.h */

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Kept identical to meshlane.c: the map below is the datapath's own,
 * handed over at load. A Go test compares the generated layouts. */
struct ml_listener_key {
	__u64 netns;
	__u16 port;
	__u16 family;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 32768);
	__type(key, struct ml_listener_key);
	__type(value, __u64);
} meshlane_listeners SEC(".maps");

/* The walk's pod (netns cookie) and its inbound port, set before each run;
 * the agent runs one walk at a time. */
volatile __u64 want_netns;
volatile __u16 want_port;
/* Listeners of the last walk the kernel refused (MPTCP), read back after
 * it. */
volatile __u32 failed;

struct sock_common {
	__u16 skc_num; /* host order */
	unsigned short skc_family;
	unsigned char skc_state;
} __attribute__((preserve_access_index));

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

/* Ties struct ml_listener_key to the object's BTF for bpf2go -type. */
const volatile struct ml_listener_key ml_btf_listener_key;

SEC("iter/tcp")
int meshlane_register_listeners(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct ml_listener_key k = {};

	if (!skc || skc->skc_state != TCP_LISTEN || skc->skc_num != want_port)
		return 0;
	k.netns = want_netns;
	k.port = want_port;
	k.family = skc->skc_family;
	if (bpf_map_update_elem(&meshlane_listeners, &k, skc, BPF_ANY))
		failed++;
	return 0;
}
