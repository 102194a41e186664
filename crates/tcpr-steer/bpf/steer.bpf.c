// The BPF steering datapath (see ../src/bpf.rs): a tc ingress program on
// the front's interface that forwards a handed-off flow's packets to its
// backend at L2, and a sweep program the balancer runs (BPF_PROG_TEST_RUN)
// to remove the entries of flows that ended or idled out.
//
// Built by build.rs with `clang -target bpf`; loaded by aya.
//
// A packet this datapath does not steer goes on with TC_ACT_UNSPEC (tcx:
// TCX_NEXT): the interface's other tc programs and filters still see it.
//
// A flow ends here only by packets in its sequence (a FIN or RST near the
// client's sequence number, a SYN once it closed): anyone who knows a
// flow's tuple could forge the others (see ARCHITECTURE.md, "The BPF
// datapath").

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

// Must match `Value` in bpf.rs: 48 bytes (32 before the sequence
// numbers; bpf.rs converts an entry of that layout at a takeover).
struct flow_value {
	__u64 last_seen_ns; // bpf_ktime_get_ns; 0: inserted, not yet swept
	__u32 backend[4];   // the next hop; IPv4 in backend[0]
	__u32 ifindex;      // the interface it leaves by
	__u8 family;        // the backend's: 4 or 6
	__u8 closing;       // the client sent its FIN or RST (in sequence)
	__u8 handed_over;   // written by userspace only (bpf.rs)
	__u8 flags;         // SEQ_KNOWN, NEW_FLOW, ACK_KNOWN
	__u32 next_seq;     // the client's: the end of the furthest segment
	__u32 new_isn;      // NEW_FLOW: the SYN's sequence number
	__u32 last_ack;     // the client's furthest acknowledgement
	__u32 new_ms;       // NEW_FLOW: when the SYN came (ms, wrapping)
};

#define SEQ_KNOWN 1 // next_seq holds the client's sequence
#define NEW_FLOW 2  // a SYN on the tuple: new_isn is its sequence
#define ACK_KNOWN 4 // last_ack holds the client's acknowledgement

// A packet of the flow's client is one whose acknowledgement is near the
// furthest one seen: at most ACK_BEHIND before it (reordering), at most
// ACK_AHEAD past it (what the server sent since the client's last
// packet). Only such packets move the sequence on or end the flow: a
// forger must guess both numbers.
#define ACK_BEHIND (1u << 20)
#define ACK_AHEAD (1u << 24)
// How far past the furthest segment seen a segment may start and still
// move it on: a client sends no further ahead than its receiver's window
// past a hole this host did not see (beyond it, the sequence waits for
// the retransmissions, and a FIN out of range leaves the entry to the
// idle timeout). A forged segment moves it once in 1,024 guesses of the
// sequence, 1 in 256 of those of the acknowledgement too.
#define ADVANCE_WINDOW (1u << 22)
// How near the furthest segment seen a FIN or RST must start to end the
// flow (the kernel itself takes a RST only at exactly the next sequence
// number): room for segments lost before they reached this host. Once in
// 32,768 guesses (and 1 in 256 of the acknowledgement, when it has one).
#define END_SLACK (1u << 16)
// The sequence numbers after a new SYN on the tuple that are the new
// flow's: its handshake and what it sends until the front's accept (a
// client sends no more than the front's receive window before it is
// acknowledged, and the balancer removes the old entry at the accept).
#define NEW_FLOW_WINDOW (1u << 18)
// How long a new flow's window holds at most: the balancer removes the
// old entry at the accept, well within it.
#define NEW_FLOW_MS 10000
// A SYN whose window would hold the live flow's next sequence number, or
// a number it reaches within this many bytes, opens no window: it would
// take the live flow's packets.
#define NEW_FLOW_CLEARANCE ADVANCE_WINDOW

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
	// The bytes after the TCP header's start (IP's length minus its
	// header), 0 when IP says none (an IPv4 BIG TCP aggregate).
	__u32 l4_len;
	// Where the TCP header starts in the packet.
	__u32 l4_off;

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
		l4_len = bpf_ntohs(ip->tot_len);
		l4_len = l4_len > ihl ? l4_len - ihl : 0;
		l4_off = sizeof(*eth) + ihl;
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
		l4_len = bpf_ntohs(ip6->payload_len);
		l4_off = sizeof(*eth) + sizeof(*ip6);
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
	__u32 seq = bpf_ntohl(tcp->seq);
	__u64 now = bpf_ktime_get_ns();
	__u32 now_ms = (__u32)(now / 1000000);
	// After a SYN on the tuple, the front's stack takes the new flow's
	// packets (those in its sequence space) for a while.
	if (v->flags & NEW_FLOW) {
		if (now_ms - v->new_ms > NEW_FLOW_MS)
			v->flags &= ~NEW_FLOW;
		else if (seq - (v->new_isn + 1) < NEW_FLOW_WINDOW)
			return TC_ACT_UNSPEC;
	}
	if (tcp->syn && !tcp->ack) {
		// A new connection reusing the tuple of a flow that ended (its
		// FIN or RST seen, in sequence; its entry still lingering): the
		// entry goes, the front's stack takes the SYN.
		if (v->closing) {
			bpf_map_delete_elem(&flows, &key);
			return TC_ACT_UNSPEC;
		}
		// A live flow's tuple: its client lost it (a reboot, its peer's
		// RST), or someone who knows the tuple forged the SYN. Which, only
		// the front's handshake can tell (the SYN-ACK goes to the client):
		// the SYN and its sequence space go to the front's stack, and the
		// live flow's packets, outside it, still go to the backend. A
		// client that completes the handshake is accepted there, and the
		// balancer removes this entry at the accept; a forger's SYN-ACK
		// meets the live flow's client, whose answer is the live flow's
		// (in sequence: it closes the window). Before, the SYN removed the entry: one forged
		// SYN reset a live flow (its next packets met the front's stack).
		if (v->flags & SEQ_KNOWN) {
			__u32 start = seq + 1;
			// The live flow inside the window, or about to enter it.
			if (v->next_seq - start < NEW_FLOW_WINDOW ||
			    start - v->next_seq < NEW_FLOW_CLEARANCE)
				return TC_ACT_UNSPEC;
		}
		v->new_isn = seq;
		v->new_ms = now_ms;
		v->flags |= NEW_FLOW;
		return TC_ACT_UNSPEC;
	}
	if (l4_len == 0) {
		// IPv4 BIG TCP: the length is the packet's (from the TCP header
		// on). IPv6 BIG TCP carries a hop-by-hop jumbo header, which the
		// parse above does not follow: keep the front's gro_max_size at
		// its default, 64 KiB, where no such aggregate is built.
		l4_len = skb->len > l4_off ? skb->len - l4_off : 0;
	}
	__u32 doff = tcp->doff * 4;
	__u32 len = l4_len > doff ? l4_len - doff : 0;
	__u32 seg_end = seq + len + tcp->fin;
	__u32 ack = bpf_ntohl(tcp->ack_seq);
	if (!(v->flags & SEQ_KNOWN)) {
		// Only this packet to go by: an entry steered without the
		// client's sequence learns it here.
		v->next_seq = seg_end;
		v->flags |= SEQ_KNOWN;
		if (tcp->ack) {
			v->last_ack = ack;
			v->flags |= ACK_KNOWN;
		}
		if (tcp->fin || tcp->rst)
			v->closing = 1;
	} else {
		// Serial arithmetic: the distance from the furthest segment
		// seen, either way.
		__u32 ahead = seq - v->next_seq;
		__u32 behind = v->next_seq - seq;
		int in_sequence = ahead <= END_SLACK || behind <= END_SLACK;
		// The client's own, as far as its acknowledgement shows: near
		// the furthest one seen (unknown yet: any).
		int acked = tcp->ack &&
			    (!(v->flags & ACK_KNOWN) || v->last_ack - ack <= ACK_BEHIND ||
			     ack - v->last_ack <= ACK_AHEAD);
		// The acknowledgement moves on only with a packet in sequence:
		// a forger who got one guess right cannot drag it, step by
		// step, to a number it then knows. A packet at exactly the
		// sequence (a guess right once in 2^32) re-anchors it: a client
		// whose acknowledgements jumped further than ACK_AHEAD (a long
		// loss of its ACKs) is followed again.
		if (tcp->ack && ((in_sequence && acked) || seq == v->next_seq)) {
			if (!acked || !(v->flags & ACK_KNOWN) || (__s32)(ack - v->last_ack) > 0)
				v->last_ack = ack;
			v->flags |= ACK_KNOWN;
		}
		// A FIN or RST ends the flow only at its sequence (a forged one
		// must guess it): the backend's stack checks it the same way, so
		// one out of sequence ends nothing there either. A RST without
		// ACK (the answer to a segment of a flow the client no longer
		// has) shows no acknowledgement; it moves nothing on.
		if ((tcp->fin || tcp->rst) && in_sequence && (acked || (tcp->rst && !tcp->ack)))
			v->closing = 1;
		// Only a packet whose acknowledgement is the client's moves the
		// sequence on.
		if (acked && ahead <= ADVANCE_WINDOW && (__s32)(seg_end - v->next_seq) > 0)
			v->next_seq = seg_end;
		// The live flow's client is there: a new flow's window (a SYN
		// forged, most likely: the client's answer to the front's
		// SYN-ACK is this packet) closes.
		if (in_sequence && acked)
			v->flags &= ~NEW_FLOW;
	}
	v->last_seen_ns = now;

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
