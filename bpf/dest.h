/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Destination rules shared by the marker (target: a policy) and the guard
 * (target: a protect entry): one LPM lookup on the destination address,
 * then the first matching port range.  netoken/rules.py appends the rules
 * of every covering prefix to each prefix's list, so the first match is
 * "the most specific prefix that has a matching port".
 */
#ifndef NETOKEN_DEST_H
#define NETOKEN_DEST_H

#include "netoken.h"
#include "token.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct nt_lpm_v4);
	__type(value, struct nt_port_rules);
} nt_dst_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct nt_lpm_v6);
	__type(value, struct nt_port_rules);
} nt_dst_v6 SEC(".maps");

/* The port rules of the most specific prefix covering F's destination
 * address (its own and every covering prefix's, see above), or NULL when no
 * prefix covers it: "some rule covers this address, on some port". */
static __always_inline struct nt_port_rules *nt_lookup_addr(const struct nt_flow *f)
{
	if (f->family == 4) {
		struct nt_lpm_v4 k = { .prefixlen = 32 };

		__builtin_memcpy(k.addr, f->daddr, 4);
		return bpf_map_lookup_elem(&nt_dst_v4, &k);
	} else {
		struct nt_lpm_v6 k6 = { .prefixlen = 128 };

		__builtin_memcpy(k6.addr, f->daddr, 16);
		return bpf_map_lookup_elem(&nt_dst_v6, &k6);
	}
}

/* 1 and *target set when F's destination and port match a rule, else 0. */
static __always_inline int nt_lookup_dest(const struct nt_flow *f, __u32 *target)
{
	struct nt_port_rules *r = nt_lookup_addr(f);
	__u16 dport = bpf_ntohs(f->dport);

	if (!r)
		return 0;
	for (int i = 0; i < NT_MAX_PORT_RULES; i++) {
		if (i >= r->count)
			break;
		if (dport >= r->rules[i].lo && dport <= r->rules[i].hi) {
			*target = r->rules[i].policy;
			return 1;
		}
	}
	return 0;
}

#endif /* NETOKEN_DEST_H */
