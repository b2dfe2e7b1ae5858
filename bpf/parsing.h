/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Header parsers shared by the marker (TC) and the guard (XDP), in the style
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
 * required to be in the linear data: callers that need them check again. */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end,
					struct tcphdr **tcphdr)
{
	struct tcphdr *h = nh->pos;
	int len;

	if ((void *)(h + 1) > data_end)
		return NT_PARSE_SHORT;
	len = h->doff * 4;
	if (len < (int)sizeof(*h))
		return NT_PARSE_BAD;
	*tcphdr = h;
	return len;
}

static __always_inline int ipv4_is_fragment(const struct iphdr *iph)
{
	return (iph->frag_off & bpf_htons(0x3fff)) != 0;   /* MF or offset */
}

#endif /* NETOKEN_PARSING_H */
