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
	struct nt_port_rules *r;

	/* Two calls the compiler must not merge into one on a map chosen at
	 * run time: the verifier turns a call on a known map into a direct
	 * call of that map's lookup, the merged one stays an indirect call
	 * through the map's ops. */
	if (f->family == 4) {
		struct nt_lpm_v4 k = { .prefixlen = 32 };

		__builtin_memcpy(k.addr, f->daddr, 4);
		r = bpf_map_lookup_elem(&nt_dst_v4, &k);
		NT_BARRIER_VAR(r);
	} else {
		struct nt_lpm_v6 k6 = { .prefixlen = 128 };

		__builtin_memcpy(k6.addr, f->daddr, 16);
		r = bpf_map_lookup_elem(&nt_dst_v6, &k6);
	}
	return r;
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

/*
 * Destinations looked up lately on this CPU, with what the trie and the
 * port rules said, under one configuration generation (nt_config and
 * nt_guard_config, which every configure() moves on).  A SYN flood aims at
 * a few destinations and a client's connections go to a few servers: one
 * array slot and a compare where the trie costs a helper call and a walk
 * of its nodes.  Direct-mapped on a hash of address and port; a miss looks
 * up and takes the slot.
 */
#define NT_DEST_SLOTS_LOG 8

struct nt_dest_slot {
	__u64 daddr[2];          /* as in struct nt_flow */
	__be16 dport;
	__u8  family;            /* 0: never filled */
	__u8  found;
	__u32 target;
	__u32 generation;        /* read before the lookup that filled it */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1 << NT_DEST_SLOTS_LOG);
	__type(key, __u32);
	__type(value, struct nt_dest_slot);
} nt_dest_cache SEC(".maps");

/* nt_lookup_dest() under configuration GENERATION, through the cache. */
static __always_inline int nt_lookup_dest_cached(const struct nt_flow *f, __u32 generation,
						 __u32 *target)
{
	__u64 d0 = NT_W64(f->daddr, 0), d1 = NT_W64(f->daddr, 1);
	__u32 idx = ((d0 ^ d1 ^ f->dport) * 0x9E3779B97F4A7C15ULL) >> (64 - NT_DEST_SLOTS_LOG);
	struct nt_dest_slot *s = bpf_map_lookup_elem(&nt_dest_cache, &idx);
	int found;

	if (!s)
		return nt_lookup_dest(f, target);
	if (s->generation == generation && s->family == f->family && s->dport == f->dport &&
	    s->daddr[0] == d0 && s->daddr[1] == d1) {
		*target = s->target;
		return s->found;
	}
	found = nt_lookup_dest(f, target);
	s->daddr[0] = d0;
	s->daddr[1] = d1;
	s->dport = f->dport;
	s->family = f->family;
	s->found = found;
	s->target = found ? *target : 0;
	s->generation = generation;
	return found;
}

#endif /* NETOKEN_DEST_H */
