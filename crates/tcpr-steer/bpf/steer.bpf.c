// The BPF steering datapath (see ../src/bpf.rs): a tc ingress program on
// the front's interface that forwards a handed-off flow's packets to its
// backend at L2, and a sweep program the balancer runs (BPF_PROG_TEST_RUN)
// to remove the entries of flows that ended or idled out.
//
// Built by build.rs with `clang -target bpf`; loaded by aya.
//
// A packet this datapath does not steer goes on with TC_ACT_UNSPEC (tcx:
// TCX_NEXT): the interface's other tc programs and filters still see it.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10

// Must match `FlowKey` in bpf.rs: 40 bytes, an IPv4 address in the first
// 4 bytes of its 16 (the rest zero).
struct flow_key {
	__u8 family; // 4 or 6
	__u8 pad[3];
	__u8 client[16];
	__u8 vip[16];
	__be16 client_port;
	__be16 vip_port;
};

// Must match `FlowValue` in bpf.rs: 32 bytes.
struct flow_value {
	__u64 last_seen_ns; // bpf_ktime_get_ns; 0: inserted, not yet swept
	__u32 backend[4];   // the next hop; IPv4 in backend[0]
	__u32 ifindex;      // the interface it leaves by
	__u8 family;        // the backend's: 4 or 6
	__u8 closing;       // the client sent its FIN or RST
	__u16 pad;
};

// Preallocated (the default for a hash map): every entry exists from the
// load on, so an insert never allocates and the table never resizes.
// max_entries is set by the loader (the steering capacity).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
} flows SEC(".maps");

struct settings {
	__u64 idle_ns;
	__u64 linger_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} config SEC(".maps");

// Ethernet, the longest IPv4 header, and the part of TCP read here: what
// must be in the packet's linear data.
#define HEADERS (sizeof(struct ethhdr) + 60 + sizeof(struct tcphdr))

// Tells the kernel which kernel the programs were built for; tc programs
// do not use it, and with it aya does not parse the running kernel's
// release string (a parse failure there panics).
__u32 _version SEC("version") = 0x060600;

SEC("classifier/steer")
int steer(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct flow_key key = {};
	struct tcphdr *tcp;

	// Headers split across pages (not from veth or common NICs): pulled
	// into the linear part, or the flow's packet would reach the stack.
	if (data + HEADERS > end && skb->len > (__u32)(end - data)) {
		bpf_skb_pull_data(skb, skb->len < HEADERS ? skb->len : HEADERS);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 ihl;

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
			return TC_ACT_UNSPEC;
		// A later fragment carries no TCP header.
		if (ip->frag_off & bpf_htons(0x1fff))
			return TC_ACT_UNSPEC;
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return TC_ACT_UNSPEC;
		tcp = (void *)ip + ihl;
		if ((void *)(tcp + 1) > end)
			return TC_ACT_UNSPEC;
		key.family = 4;
		__builtin_memcpy(key.client, &ip->saddr, 4);
		__builtin_memcpy(key.vip, &ip->daddr, 4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		// TCP right after the fixed header, as the clients send it.
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return TC_ACT_UNSPEC;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end)
			return TC_ACT_UNSPEC;
		key.family = 6;
		__builtin_memcpy(key.client, &ip6->saddr, 16);
		__builtin_memcpy(key.vip, &ip6->daddr, 16);
	} else {
		return TC_ACT_UNSPEC;
	}
	key.client_port = tcp->source;
	key.vip_port = tcp->dest;

	struct flow_value *v = bpf_map_lookup_elem(&flows, &key);
	if (!v)
		return TC_ACT_UNSPEC;
	// A new connection reusing the tuple of a flow that ended (its entry
	// still lingering): the entry goes, the front's stack takes the SYN.
	if (tcp->syn && !tcp->ack) {
		bpf_map_delete_elem(&flows, &key);
		return TC_ACT_UNSPEC;
	}
	if (tcp->fin || tcp->rst)
		v->closing = 1;
	v->last_seen_ns = bpf_ktime_get_ns();

	struct bpf_redir_neigh nh = {};
	if (v->family == 4) {
		nh.nh_family = AF_INET;
		nh.ipv4_nh = v->backend[0];
	} else {
		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, v->backend, 16);
	}
	return bpf_redirect_neigh(v->ifindex, &nh, sizeof(nh), 0);
}

struct sweep_state {
	__u64 now;
	__u64 idle_ns;
	__u64 linger_ns;
	__u32 live;
};

static long sweep_one(void *map, struct flow_key *key, struct flow_value *v,
		      struct sweep_state *s)
{
	// A new entry's time starts at its first sweep: the kernel's clock,
	// the one packets stamp with (userspace's CLOCK_MONOTONIC differs in
	// a time namespace).
	if (v->last_seen_ns == 0) {
		v->last_seen_ns = s->now;
		s->live++;
		return 0;
	}
	__u64 age = s->now > v->last_seen_ns ? s->now - v->last_seen_ns : 0;
	__u64 limit = v->closing ? s->linger_ns : s->idle_ns;

	if (age > limit)
		bpf_map_delete_elem(map, key);
	else
		s->live++;
	return 0;
}

// Run by the balancer with BPF_PROG_TEST_RUN (the packet is ignored):
// removes the entries past their expiry and returns how many are left.
SEC("classifier/sweep")
int sweep(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct settings *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg)
		return 0;
	struct sweep_state s = {
		.now = bpf_ktime_get_ns(),
		.idle_ns = cfg->idle_ns,
		.linger_ns = cfg->linger_ns,
		.live = 0,
	};
	bpf_for_each_map_elem(&flows, sweep_one, &s, 0);
	return s.live;
}

char LICENSE[] SEC("license") = "GPL";
