/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Header parsers shared by the marker (TC) and the guard (XDP or TC), in the style
 * of xdp-tutorial's parsing_helpers.h: a cursor, and one tiny parser per
 * header that bounds-checks before it reads and advances the cursor.
 * Every parser returns < 0 when the packet is too short or malformed.
 */
#ifndef NETOKEN_PARSING_H
#define NETOKEN_PARSING_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define NT_MAX_VLAN 2

struct hdr_cursor {
	void *pos;
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* Stop clang from folding a bound check away before the verifier sees it
 * (or from checking a copy of the value instead of the one used). */
#define NT_BARRIER_VAR(x) asm volatile("" : "+r"(x))

#define NT_PARSE_SHORT  -1   /* ran past the end of the (linear) data */
#define NT_PARSE_BAD    -2   /* header fields are inconsistent */

static __always_inline int proto_is_vlan(__u16 h_proto)
{
	return h_proto == bpf_htons(ETH_P_8021Q) || h_proto == bpf_htons(ETH_P_8021AD);
}

/* Returns the network-order ethertype after up to NT_MAX_VLAN tags. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end,
					struct ethhdr **ethhdr)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__u16 h_proto;

	if ((void *)(eth + 1) > data_end)
		return NT_PARSE_SHORT;
	nh->pos = eth + 1;
	*ethhdr = eth;
	h_proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < NT_MAX_VLAN; i++) {
		if (!proto_is_vlan(h_proto))
			break;
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return NT_PARSE_SHORT;
		h_proto = vlh->encap_proto;
		nh->pos = vlh + 1;
	}
	return h_proto;
}

/*
 * The link layer: returns the network-order ethertype of what follows, with
 * the cursor on it.  Ethernet (and up to NT_MAX_VLAN tags) by default; with
 * NT_L3, for devices without a link-layer header (ARPHRD_NONE: TUN,
 * WireGuard; ipip, sit, gre), the packet starts at the IP header and the
 * version nibble says which.  Which one is fixed when the object is
 * compiled and chosen by the device type at attach: no per-packet guess.
 */
static __always_inline int parse_l2(struct hdr_cursor *nh, void *data_end)
{
#ifdef NT_L3
	__u8 *first = nh->pos;

	if ((void *)(first + 1) > data_end)
		return NT_PARSE_SHORT;
	switch (*first >> 4) {
	case 4:
		return bpf_htons(ETH_P_IP);
	case 6:
		return bpf_htons(ETH_P_IPV6);
	}
	return 0;   /* not IP: passes as not_ipv4_or_6 */
#else
	struct ethhdr *eth;

	return parse_ethhdr(nh, data_end, &eth);
#endif
}

/* Any IHL; returns the L4 protocol. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
				       struct iphdr **iphdr)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;

	if ((void *)(iph + 1) > data_end)
		return NT_PARSE_SHORT;
	if (iph->version != 4 || iph->ihl < 5)
		return NT_PARSE_BAD;
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return NT_PARSE_SHORT;
	if (bpf_ntohs(iph->tot_len) < hdrsize)
		return NT_PARSE_BAD;
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/* Fixed header only; returns nexthdr (extension headers are the caller's call). */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end,
					struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;

	if ((void *)(ip6h + 1) > data_end)
		return NT_PARSE_SHORT;
	if (ip6h->version != 6)
		return NT_PARSE_BAD;
	nh->pos = ip6h + 1;
	*ip6hdr = ip6h;
	return ip6h->nexthdr;
}

/* Returns the TCP header length in bytes (20..60). The options are not
 * required to be in the linear data: callers that need them check again.
 * *tcphdr is set as soon as the fixed header is there, even when doff is
 * bogus: the guard must still see that such a segment is a SYN. */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end,
					struct tcphdr **tcphdr)
{
	struct tcphdr *h = nh->pos;
	int len;

	if ((void *)(h + 1) > data_end)
		return NT_PARSE_SHORT;
	*tcphdr = h;
	len = h->doff * 4;
	if (len < (int)sizeof(*h))
		return NT_PARSE_BAD;
	return len;
}

/*
 * IPv6 extension headers walked to reach the upper layer.  Anything deeper
 * is not walked: the marker leaves such a SYN unmarked and the guard, for a
 * protected destination, drops it (design.md §2 "Fail closed").  Legitimate
 * traffic carries one to three.  Each header walked costs ~3 ns (measured
 * with BPF_PROG_TEST_RUN, see docs/architecture.md); the bound costs nothing
 * for packets with fewer headers.
 */
#define NT_MAX_IP6_EXT 16
/* Bytes of extension headers walked at most: far past any real chain (and
 * past the frames XDP hands a program without xdp.frags), it keeps the
 * walk's offset, and so every packet pointer after it, bounded for the
 * verifier.  A longer chain counts as cut short. */
#define NT_MAX_IP6_EXT_LEN 8192

/* Whether the walk steps over AH.  The guard does, to reach the TCP header
 * the kernel reaches once IPsec has verified the packet; the marker does
 * not, since AH's integrity check covers the TCP header it would edit. */
#define NT_IP6_STOP_AT_AH 0
#define NT_IP6_WALK_AH    1

/* Every walkable header starts with (next header, length), the length in
 * 8-byte units not counting the first 8, except AH's: 4-byte units, not
 * counting the first 8 (RFC 4302). */
struct nt_ip6_ext {
	__u8 nexthdr;
	__u8 hdrlen;
};

/* Skips up to NT_MAX_IP6_EXT Hop-by-Hop, Routing and Destination Options
 * headers (and AH when WALK_AH) and returns the protocol after them: the
 * upper layer, or a header this does not walk (Fragment, ESP, unknown ones,
 * or any walkable one past the bound).  NT_PARSE_SHORT when the chain runs
 * past the data.  A loop, not unrolled: the verifier walks it once per
 * iteration, but the program stays small whatever the bound. */
static __always_inline int skip_ip6hdrext(struct hdr_cursor *nh, void *data_end,
					  __u8 next, int walk_ah)
{
	void *base = nh->pos;
	__u64 off = 0;   /* 64-bit: no zero extension between check and use */

#pragma clang loop unroll(disable)
	for (int i = 0; i < NT_MAX_IP6_EXT; i++) {
		struct nt_ip6_ext *h;
		__u64 len;

		if (off > NT_MAX_IP6_EXT_LEN)
			return NT_PARSE_SHORT;
		NT_BARRIER_VAR(off);
		h = base + off;
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING ||
		    next == IPPROTO_DSTOPTS) {
			if ((void *)(h + 1) > data_end)
				return NT_PARSE_SHORT;
			len = (h->hdrlen + 1) * 8;
		} else if (walk_ah && next == IPPROTO_AH) {
			if ((void *)(h + 1) > data_end)
				return NT_PARSE_SHORT;
			len = (h->hdrlen + 2) * 4;
		} else {
			break;
		}
		next = h->nexthdr;
		off += len;
	}
	if (off > NT_MAX_IP6_EXT_LEN)
		return NT_PARSE_SHORT;
	NT_BARRIER_VAR(off);
	nh->pos = base + off;
	return next;
}

/* Next-header values that are extension headers, not an upper layer. */
static __always_inline int ip6_is_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_ESP:
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
	case 253: /* experimentation */
	case 254:
		return 1;
	}
	return 0;
}

/* The IPv6 header and the extension headers skip_ip6hdrext() walks: returns
 * what follows them (TCP, Fragment, another extension header, ...) or < 0;
 * *ip6hdr is set once the fixed header is there, even if the chain is not.
 * The marker and the guard both reach TCP through this, so every SYN the
 * marker marks is one the guard reaches and verifies. */
static __always_inline int parse_ip6_upper(struct hdr_cursor *nh, void *data_end,
					   struct ipv6hdr **ip6hdr, int walk_ah)
{
	int proto = parse_ip6hdr(nh, data_end, ip6hdr);

	if (proto < 0)
		return proto;
	return skip_ip6hdrext(nh, data_end, proto, walk_ah);
}

static __always_inline int ipv4_is_fragment(const struct iphdr *iph)
{
	return (iph->frag_off & bpf_htons(0x3fff)) != 0;   /* MF or offset */
}

/*
 * Whether the packet is, plainly, TCP but no SYN: IPv4 without options or
 * fragmentation, or IPv6 without extension headers, right behind the link
 * layer, with a sound fixed TCP header.  Nearly every packet a host sends
 * or receives, told apart in a few loads, where marker and guard would
 * parse the same way to the same verdict; what the full parse would count
 * differently (VLANs, fragments, anything malformed) is left to it.  The
 * TCP options need not be in [DATA, DATA_END): a data segment whose options
 * end past the linear part of an skb is still not a SYN, and costs no pull.
 */
static __always_inline int nt_plainly_not_syn(void *data, void *data_end)
{
	struct tcphdr *tcph;
	__u8 *l3 = data;

#ifndef NT_L3
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return 0;
	l3 = (__u8 *)(eth + 1);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
#else
	if ((void *)(l3 + 1) > data_end)
		return 0;
	if (*l3 >> 4 == 4) {
#endif
		struct iphdr *iph = (struct iphdr *)l3;

		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl != 5 ||
		    bpf_ntohs(iph->tot_len) < sizeof(*iph) || ipv4_is_fragment(iph) ||
		    iph->protocol != IPPROTO_TCP)
			return 0;
		tcph = (struct tcphdr *)(iph + 1);
#ifndef NT_L3
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
#else
	} else if (*l3 >> 4 == 6) {
#endif
		struct ipv6hdr *ip6h = (struct ipv6hdr *)l3;

		if ((void *)(ip6h + 1) > data_end || ip6h->version != 6 || !ip6h->payload_len ||
		    ip6h->nexthdr != IPPROTO_TCP)
			return 0;
		tcph = (struct tcphdr *)(ip6h + 1);
	} else {
		return 0;
	}
	if ((void *)(tcph + 1) > data_end || tcph->doff < 5)
		return 0;
	return !tcph->syn || tcph->ack;
}

#endif /* NETOKEN_PARSING_H */
