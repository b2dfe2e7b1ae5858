// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Reference programs for `netoken bench`: the least a marker and a verifier
 * could do, so the benchmark can say how far the real programs are from it.
 * Never attached anywhere; only run under BPF_PROG_TEST_RUN.
 *
 * netoken_ref_append (TC): the prototype's static-token appender as
 *   docs/design.md §1 describes it: Ethernet/IPv4/TCP, SYN && !ACK, grow the
 *   tail with bpf_skb_change_tail, one store of a 12-byte option at the old
 *   end, new tot_len (IP checksum updated), new doff, one counter.  No TCP
 *   checksum, no payload handling, no option walk, no event: the defects
 *   netoken fixes are exactly what this leaves out.
 * netoken_ref_verify (XDP): a bare SipHash-2-4 verifier: Ethernet/IPv4/TCP,
 *   SYN, the option taken from the last 16 bytes of the TCP header (where
 *   the marker puts it), kind/ExID compared, the full epoch rebuilt as the
 *   guard does, one MAC over the same message (bpf/token.h), the tag
 *   compared.  No option walk, no key-id table, no LPM, no replay cache, no
 *   events.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "netoken.h"
#include "parsing.h"
#include "token.h"

#define NT_REF_KIND 253
#define NT_REF_EXID 0x6E74
/* Field offsets inside the mac option, from the wire format's lengths. */
#define NT_REF_TAG_OFF   (NT_MAC_OPT_LEN - NT_TAG_LEN)
#define NT_REF_NONCE_OFF 6

/* Slot 0: the key; its window and the clock offset come from user space. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_key);
} nt_ref_key SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} nt_ref_clock SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);  /* 0: edited / accepted, 1: passed / rejected */
	__type(key, __u32);
	__type(value, __u64);
} nt_ref_stats SEC(".maps");

static __always_inline void ref_count(__u32 i)
{
	__u64 *c = bpf_map_lookup_elem(&nt_ref_stats, &i);

	if (c)
		*c += 1;
}

SEC("tc")
int netoken_ref_append(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = { .pos = data };
	const __u8 opt[NT_STATIC_OPT_LEN] = { NT_REF_KIND, NT_STATIC_OPT_LEN,
		NT_REF_EXID >> 8, NT_REF_EXID & 0xff, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88 };
	struct ethhdr *eth;
	struct iphdr *iph;
	struct tcphdr *tcph;
	__u32 l3_off, l4_off, ip_end;
	__u16 tot_len;
	__be16 old_len, new_len, old_doff, new_doff;
	int tcp_len;

	if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP))
		goto pass;
	l3_off = nh.pos - data;
	if (parse_iphdr(&nh, data_end, &iph) != IPPROTO_TCP)
		goto pass;
	tcp_len = parse_tcphdr(&nh, data_end, &tcph);
	if (tcp_len < 0 || !tcph->syn || tcph->ack || tcp_len + NT_STATIC_OPT_LEN > 60)
		goto pass;
	l4_off = (void *)tcph - data;
	tot_len = bpf_ntohs(iph->tot_len);
	ip_end = l3_off + tot_len;
	__builtin_memcpy(&old_doff, (__u8 *)tcph + 12, 2);
	new_doff = bpf_htons((bpf_ntohs(old_doff) & 0x0fff) |
			     (((tcp_len + NT_STATIC_OPT_LEN) / 4) << 12));
	old_len = iph->tot_len;
	new_len = bpf_htons(tot_len + NT_STATIC_OPT_LEN);

	if (bpf_skb_change_tail(skb, ip_end + NT_STATIC_OPT_LEN, 0) ||
	    bpf_skb_store_bytes(skb, ip_end, opt, sizeof(opt), 0) ||
	    bpf_l3_csum_replace(skb, l3_off + offsetof(struct iphdr, check), old_len, new_len, 2) ||
	    bpf_skb_store_bytes(skb, l3_off + offsetof(struct iphdr, tot_len), &new_len, 2, 0) ||
	    bpf_skb_store_bytes(skb, l4_off + 12, &new_doff, 2, 0))
		goto pass;
	ref_count(0);
	return TC_ACT_UNSPEC;
pass:
	ref_count(1);
	return TC_ACT_UNSPEC;
}

SEC("xdp")
int netoken_ref_verify(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	__u64 msg[NT_SIP_MAX_WORDS];
	struct nt_flow flow = { .family = 4 };
	struct ethhdr *eth;
	struct iphdr *iph;
	struct tcphdr *tcph;
	struct nt_key *key;
	__s64 *offset;
	__u32 zero = 0, cur, epoch;
	__u64 tag = 0;
	__u8 *o;
	int tcp_len;

	if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	if (parse_iphdr(&nh, data_end, &iph) != IPPROTO_TCP)
		return XDP_PASS;
	tcp_len = parse_tcphdr(&nh, data_end, &tcph);
	if (tcp_len < 20 + NT_MAC_OPT_LEN || tcp_len > 60 || !tcph->syn || tcph->ack)
		return XDP_PASS;
	o = (__u8 *)tcph + ((tcp_len - NT_MAC_OPT_LEN) & 63);
	if ((void *)(o + NT_MAC_OPT_LEN) > data_end)
		return XDP_PASS;
	key = bpf_map_lookup_elem(&nt_ref_key, &zero);
	offset = bpf_map_lookup_elem(&nt_ref_clock, &zero);
	if (!key || !offset || !key->window)
		return XDP_PASS;
	if (o[0] != NT_REF_KIND || o[1] != NT_MAC_OPT_LEN || o[2] != (NT_REF_EXID >> 8) ||
	    o[3] != (NT_REF_EXID & 0xff))
		goto reject;
	cur = (bpf_ktime_get_tai_ns() + *offset) / 1000000000ULL / key->window;
	epoch = cur + (__s8)(__u8)(o[5] - (__u8)cur);
	__builtin_memcpy(flow.daddr, &iph->daddr, 4);
	flow.dport = tcph->dest;
	__builtin_memcpy(&tag, o + NT_REF_TAG_OFF, NT_TAG_LEN);
	if ((nt_mac(key, NT_REF_EXID, o[4], epoch, o + NT_REF_NONCE_OFF, &flow, msg) &
	     ((1ULL << (NT_TAG_LEN * 8)) - 1)) != tag)
		goto reject;
	ref_count(0);
	return XDP_PASS;
reject:
	ref_count(1);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
