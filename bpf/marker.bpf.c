// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * netoken marker: TC egress.  Appends a keyed token option (design.md §2) to
 * outgoing SYNs that a policy selects, after the existing options and before
 * any payload.  It never drops: every path returns TC_ACT_UNSPEC, and any
 * failure before the first write leaves the packet untouched.
 *
 * Packet edit (see docs/architecture.md for the checksum reasoning):
 *   1. copy the options (and SYN payload, if any) into a per-CPU scratch area
 *   2. only if the option does not fit: make room by removing the Timestamps
 *      option (design.md §3), which shrinks the option area to be rewritten
 *   3. bpf_skb_change_tail() grows the packet by the net growth of the TCP
 *      header, so the TCP header does not move (csum_start stays valid under
 *      offload)
 *   4. write options ‖ new option ‖ payload back
 *   5. fix doff, IP length, IPv4 header checksum and the TCP checksum with
 *      l3/l4_csum_replace; the length goes in with BPF_F_PSEUDO_HDR so a
 *      CHECKSUM_PARTIAL skb only gets its pseudo-header seed adjusted.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "netoken.h"
#include "parsing.h"
#include "token.h"
#include "dest.h"

/* Largest SYN payload (TCP Fast Open data) moved to make room; larger ones
 * pass unmarked and count NT_MARK_PAYLOAD.  Covers a 1500-byte MTU. */
#define NT_MAX_PAYLOAD_MOVE 2048
/* Ethernet + 2 VLAN tags + IPv4 with options + TCP without options. */
#define NT_MAX_PARSE_LEN (14 + 8 + 60 + 20)
#define NT_MARK_RING_SIZE (256 * 1024)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_config);
} nt_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NT_MAX_KEYS);
	__type(key, __u32);
	__type(value, struct nt_key);
} nt_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NT_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct nt_policy);
} nt_policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NT_MARK_REASON_MAX);
	__type(key, __u32);      /* enum nt_mark_reason */
	__type(value, __u64);
} nt_mark_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, NT_MARK_RING_SIZE);
} nt_mark_events SEC(".maps");

/* State of nt_make_room's walk.  It lives in the scratch map, not in
 * registers: the verifier does not track map contents, so the paths through
 * the unrolled walk merge at every byte instead of multiplying.  (With only
 * the write position here the walk costs 23k more instructions to verify;
 * with that in a register too, where as an index it must be exact, the
 * program exceeds the verifier's 1M-instruction limit.) */
struct nt_room {
	__u32 w;                 /* bytes written to opts_new */
	__u32 skip;              /* bytes left in the current option */
	__u32 keep;              /* the current option is copied */
	__u32 ts;                /* a Timestamps option was dropped */
	__u32 stop;              /* past EOL */
};

/* Sizes are powers of two so NT_BOUNDED() can prove lengths to the verifier. */
struct nt_scratch {
	__u64 msg[NT_SIP_MAX_WORDS];
	__u8  opts_old[64];
	__u8  opts_new[64];      /* the options after the EOL rewrite or make-room */
	__u8  opt[NT_MAC_OPT_LEN];   /* the option being added */
	__u8  payload[NT_MAX_PAYLOAD_MOVE];
	struct nt_room room;     /* nt_make_room's walk (see there) */
};

/* Stop clang from folding a bound check away before the verifier sees it. */
#define NT_BARRIER_VAR(x) asm volatile("" : "+r"(x))

/* x in [1, n] (or [0, n - 1] for NT_MASKED) for a power-of-two n, restated
 * so the verifier sees the bound.  The values are checked beforehand: these
 * never change a value, they only make the proof visible. */
static __always_inline __u32 NT_BOUNDED(__u32 x, __u32 n)
{
	NT_BARRIER_VAR(x);
	return ((x - 1) & (n - 1)) + 1;
}

static __always_inline __u32 NT_MASKED(__u32 x, __u32 n)
{
	NT_BARRIER_VAR(x);
	return x & (n - 1);
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_scratch);
} nt_mark_scratch SEC(".maps");

/* What the parse step hands to the edit step: offsets only, because every
 * helper that writes the packet invalidates packet pointers. */
struct nt_pkt {
	struct nt_flow flow;
	__u32 l3_off;
	__u32 l4_off;
	__u32 ip_end;            /* offset one past the IP packet (tot_len) */
	__u32 tcp_len;           /* doff * 4 */
	__u16 l3_len;            /* tot_len (v4) or payload_len (v6), host order */
	__be16 doff_flags;       /* TCP header bytes 12..13 */
	/* The edit, as mark() decided it: */
	__u32 area;              /* option bytes before the new option */
	__u32 opt_len;           /* the new option's length */
	__u32 rewrite;           /* the first AREA bytes come from opts_new */
};

static __always_inline void count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&nt_mark_stats, &reason);

	if (c)
		*c += 1;
}

#define NT_CANDIDATE  -1     /* a SYN to consider: fields are in *p */
#define NT_NEED_PULL  100    /* headers end past the linear data */

/*
 * Returns NT_CANDIDATE, NT_NEED_PULL, or the counter reason to record.
 * Global so the verifier checks it once, not once per caller path.
 */
__noinline int nt_parse(struct __sk_buff *skb, struct nt_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct ethhdr *eth;
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	struct tcphdr *tcph;
	int proto, tcp_len;

	if (!p)
		return NT_MARK_ERROR;
	proto = parse_ethhdr(&nh, data_end, &eth);
	if (proto < 0)
		goto short_or_bad;
	p->l3_off = nh.pos - data;

	if (proto == bpf_htons(ETH_P_IP)) {
		proto = parse_iphdr(&nh, data_end, &iph);
		if (proto < 0)
			goto short_or_bad;
		if (ipv4_is_fragment(iph))
			return NT_MARK_FRAGMENT;
		if (proto != IPPROTO_TCP)
			return NT_MARK_NOT_TCP;
		p->flow.family = 4;
		__builtin_memcpy(p->flow.saddr, &iph->saddr, 4);
		__builtin_memcpy(p->flow.daddr, &iph->daddr, 4);
		p->l3_len = bpf_ntohs(iph->tot_len);
		p->ip_end = p->l3_off + p->l3_len;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ip6_upper(&nh, data_end, &ip6h, NT_IP6_STOP_AT_AH);
		if (proto < 0)
			goto short_or_bad;
		if (proto == IPPROTO_FRAGMENT)
			return NT_MARK_FRAGMENT;
		if (ip6_is_ext(proto))
			return NT_MARK_IPV6_EXT;
		if (proto != IPPROTO_TCP)
			return NT_MARK_NOT_TCP;
		p->flow.family = 6;
		__builtin_memcpy(p->flow.saddr, &ip6h->saddr, 16);
		__builtin_memcpy(p->flow.daddr, &ip6h->daddr, 16);
		p->l3_len = bpf_ntohs(ip6h->payload_len);
		if (p->l3_len == 0)     /* jumbogram: not ours to edit */
			return NT_MARK_MALFORMED;
		p->ip_end = p->l3_off + sizeof(*ip6h) + p->l3_len;
	} else {
		return NT_MARK_NOT_IPV4_OR_6;
	}

	tcp_len = parse_tcphdr(&nh, data_end, &tcph);
	if (tcp_len < 0) {
		proto = tcp_len;
		goto short_or_bad;
	}
	if (!tcph->syn || tcph->ack)
		return NT_MARK_NOT_SYN;

	p->l4_off = nh.pos - data;
	p->tcp_len = tcp_len;
	if (p->l4_off + p->tcp_len > p->ip_end || p->ip_end > skb->len)
		return NT_MARK_MALFORMED;
	p->flow.sport = tcph->source;
	p->flow.dport = tcph->dest;
	__builtin_memcpy(&p->doff_flags, (__u8 *)tcph + 12, 2);
	return NT_CANDIDATE;

short_or_bad:
	if (proto == NT_PARSE_SHORT && skb->len > data_end - data)
		return NT_NEED_PULL;
	return NT_MARK_MALFORMED;
}

#define NT_OPTS_KEPT       0    /* opts_new == opts_old: nothing to rewrite */
#define NT_OPTS_REWRITTEN  1

/* Copy the existing options to opts_new and check their framing.  EOL ends
 * the list for every receiver, so an option appended after it would be
 * invisible: EOL and whatever follows it become NOPs.  Returns
 * NT_OPTS_KEPT, NT_OPTS_REWRITTEN, or NT_MARK_MALFORMED.
 * A global (not inlined) function: the verifier checks it once on its own
 * instead of once for every path that reaches it. */
__noinline int nt_copy_options(struct nt_scratch *s, __u32 optlen)
{
	__u32 skip = 0, eol = 0, bad = 0;

	if (!s || optlen > NT_MAX_TCP_OPTS)
		return NT_MARK_MALFORMED;
	__builtin_memcpy(s->opts_new, s->opts_old, sizeof(s->opts_old));

	/* Unrolled with constant offsets; `skip` counts the bytes left in the
	 * current option, so the verifier never sees a data-dependent index. */
#pragma clang loop unroll(full)
	for (int j = 0; j < NT_MAX_TCP_OPTS; j++) {
		/* no early exit: a constant trip count keeps the unroll full */
		if (j >= optlen) {
			;
		} else if (eol) {
			s->opts_new[j] = NT_TCPOPT_NOP;
		} else if (skip) {
			skip--;
		} else {
			__u8 kind = s->opts_old[j];

			if (kind == NT_TCPOPT_EOL) {
				eol = 1;
				s->opts_new[j] = NT_TCPOPT_NOP;
			} else if (kind != NT_TCPOPT_NOP) {
				__u8 olen = s->opts_old[j + 1];   /* j + 1 < 64: in the buffer */

				if (j + 1 >= optlen || olen < 2)
					bad = 1;
				else
					skip = olen - 1;
			}
		}
	}
	/* bytes of the last option still owed: it ran past the header */
	if (bad || skip)
		return NT_MARK_MALFORMED;
	return eol ? NT_OPTS_REWRITTEN : NT_OPTS_KEPT;
}

/* Make room for an option of OPT_LEN bytes in options that have none
 * (design.md §3): drop the Timestamps option wherever it sits (after NOP,NOP or
 * SACK-permitted alike), drop the NOP/EOL padding, keep every other option
 * byte for byte and in order, and re-pad with NOPs to a multiple of 4.  The
 * result goes to opts_new; the new option follows it.  It is never shorter
 * than OPTLEN - OPT_LEN, so the header grows by 0..8 bytes and never has to
 * shrink.  Returns the length of the rewritten area, or -1 if there is no
 * Timestamps option or the new option still does not fit.  Only SYNs
 * without room get here, so the others pay nothing for it. */
__noinline int nt_make_room(struct nt_scratch *s, __u32 optlen, __u32 opt_len)
{
	volatile struct nt_room *r;
	__u32 w, area;

	if (!s || optlen > NT_MAX_TCP_OPTS)
		return -1;
	/* NOPs first: whatever the walk does not overwrite is padding. */
	__builtin_memset(s->opts_new, NT_TCPOPT_NOP, NT_MAX_TCP_OPTS);
	r = &s->room;
	r->w = r->skip = r->keep = r->ts = r->stop = 0;
#pragma clang loop unroll(full)
	for (int j = 0; j < NT_MAX_TCP_OPTS; j++) {
		__u8 b = s->opts_old[j], olen;

		if (j >= optlen || r->stop)
			continue;
		if (r->skip) {
			r->skip--;
			if (!r->keep)
				continue;
		} else if (b == NT_TCPOPT_EOL) {
			r->stop = 1;
			continue;
		} else if (b == NT_TCPOPT_NOP) {
			continue;
		} else {
			olen = s->opts_old[j + 1];   /* j + 1 < 64: in the buffer */
			if (olen < 2)
				return -1;
			r->skip = olen - 1;
			r->keep = b != NT_TCPOPT_TS || olen != NT_TCPOLEN_TS;
			if (!r->keep) {
				r->ts = 1;
				continue;
			}
		}
		w = r->w;
		s->opts_new[NT_MASKED(w, 64)] = b;
		r->w = w + 1;
	}
	w = r->w;
	area = (w + 3) & ~3U;
	if (area + opt_len < optlen)
		area = optlen - opt_len;
	if (!r->ts || area + opt_len > NT_MAX_TCP_OPTS)
		return -1;
	return area;
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct nt_pkt *p,
				       const struct nt_policy *pol, __u32 epoch,
				       const __u8 *opt, __u32 reason, __u8 room_from_ts)
{
	struct nt_mark_event *e;

	e = bpf_ringbuf_reserve(&nt_mark_events, sizeof(*e), 0);
	if (!e) {
		count(NT_MARK_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->ifindex = skb->ifindex;
	e->policy = pol->id;
	e->epoch = epoch;
	e->family = p->flow.family;
	e->mode = pol->mode;
	e->key_id = pol->key_id;
	e->reason = reason;
	e->room_from_ts = room_from_ts;
	__builtin_memcpy(e->saddr, p->flow.saddr, 16);
	__builtin_memcpy(e->daddr, p->flow.daddr, 16);
	e->sport = bpf_ntohs(p->flow.sport);
	e->dport = bpf_ntohs(p->flow.dport);
	if (pol->mode == NT_MODE_MAC) {
		__builtin_memcpy(e->nonce, opt + NT_OPT_NONCE, NT_NONCE_LEN);
		__builtin_memcpy(e->tag, opt + NT_OPT_TAG, NT_TAG_LEN);
	} else {
		__builtin_memcpy(e->tag, opt + 4, 8);
	}
	/* Waking the reader costs ~6 us per event (8x a marked SYN).  netoken
	 * monitor also polls every 100 ms, so wake it only once the ring holds
	 * an eighth of its size: a burst still gets read before it fills. */
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&nt_mark_events, BPF_RB_AVAIL_DATA) >
			      NT_MARK_RING_SIZE / 8 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/*
 * The packet edit: everything after the first write.  Inserts s->opt after
 * the first p->area option bytes (from opts_new if p->rewrite, else the
 * packet's own) and moves the payload behind it.  Returns 0, or
 * NT_MARK_ERROR with the packet trimmed back to its length if a helper
 * failed.  Global: verified once, whichever way mark() decided the edit
 * (with or without make-room).
 */
__noinline int nt_edit(struct __sk_buff *skb, struct nt_scratch *s, const struct nt_pkt *p)
{
	__u32 optlen, area, opt_len, delta, pay_off, payload_len, old_tcp_seg, opt_off, check_off;
	__be16 new_doff_flags, old_l3, new_l3;
	__s64 diff;

	if (!s || !p || p->tcp_len < sizeof(struct tcphdr))
		return NT_MARK_ERROR;
	optlen = p->tcp_len - sizeof(struct tcphdr);
	area = p->area;
	opt_len = p->opt_len == NT_MAC_OPT_LEN ? NT_MAC_OPT_LEN : NT_STATIC_OPT_LEN;
	pay_off = p->l4_off + p->tcp_len;
	payload_len = p->ip_end - pay_off;
	if (optlen > NT_MAX_TCP_OPTS || area > NT_MAX_TCP_OPTS || area + opt_len < optlen ||
	    (p->rewrite && !area) || payload_len > NT_MAX_PAYLOAD_MOVE)
		return NT_MARK_ERROR;
	/* Net growth of the TCP header: opt_len, or 0..8 after make-room. */
	delta = area + opt_len - optlen;
	old_tcp_seg = p->ip_end - p->l4_off;
	opt_off = p->l4_off + sizeof(struct tcphdr) + area;
	check_off = p->l4_off + offsetof(struct tcphdr, check);
	new_doff_flags = bpf_htons((bpf_ntohs(p->doff_flags) & 0x0fff) |
				   (((p->tcp_len + delta) / 4) << 12));

	if (delta && bpf_skb_change_tail(skb, p->ip_end + delta, 0))
		return NT_MARK_ERROR;
	if (p->rewrite && bpf_skb_store_bytes(skb, p->l4_off + sizeof(struct tcphdr),
					      s->opts_new, NT_BOUNDED(area, 64), 0))
		goto undo;
	if (bpf_skb_store_bytes(skb, opt_off, s->opt, opt_len, 0))
		goto undo;
	if (payload_len && delta &&
	    bpf_skb_store_bytes(skb, pay_off + delta, s->payload,
				NT_BOUNDED(payload_len, NT_MAX_PAYLOAD_MOVE), 0))
		goto undo;

	/* TCP checksum: options (old → new ‖ token) as a diff, doff, and the
	 * length in the pseudo header.  The payload moved by a multiple of 4,
	 * so its sum is unchanged.  Under CHECKSUM_PARTIAL l4_csum_replace only
	 * applies the BPF_F_PSEUDO_HDR part, which is exactly right: the device
	 * sums the bytes, the seed must cover the new length. */
	diff = p->rewrite ? bpf_csum_diff((__be32 *)s->opts_old, NT_MASKED(optlen, 64),
					  (__be32 *)s->opts_new, NT_MASKED(area, 64), 0) : 0;
	if (diff >= 0)
		diff = bpf_csum_diff(NULL, 0, (__be32 *)s->opt, opt_len, diff);
	if (diff < 0 ||
	    bpf_l4_csum_replace(skb, check_off, 0, diff, 0) ||
	    bpf_l4_csum_replace(skb, check_off, p->doff_flags, new_doff_flags, 2) ||
	    bpf_l4_csum_replace(skb, check_off, bpf_htons(old_tcp_seg),
				bpf_htons(old_tcp_seg + delta), BPF_F_PSEUDO_HDR | 2) ||
	    bpf_skb_store_bytes(skb, p->l4_off + 12, &new_doff_flags, 2, 0))
		goto undo;

	old_l3 = bpf_htons(p->l3_len);
	new_l3 = bpf_htons(p->l3_len + delta);
	if (p->flow.family == 4) {
		if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check),
					old_l3, new_l3, 2) ||
		    bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct iphdr, tot_len),
					&new_l3, 2, 0))
			goto undo;
	} else {
		if (bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct ipv6hdr, payload_len),
					&new_l3, 2, 0))
			goto undo;
	}
	return 0;

undo:
	/* Only reachable if a helper failed after the resize (ENOMEM while
	 * unsharing): drop the added bytes so the length fields stay true.
	 * Partial writes cannot be rolled back further; counted as error. */
	bpf_skb_change_tail(skb, p->ip_end, 0);
	return NT_MARK_ERROR;
}

static __always_inline int mark(struct __sk_buff *skb)
{
	struct nt_pkt p = {};
	struct nt_policy *pol;
	struct nt_config *cfg;
	struct nt_scratch *s;
	__u32 zero = 0, policy_idx, optlen, opt_len, payload_len, pay_off, epoch = 0;
	__u32 area, room;
	int reason, rewrite;

	reason = nt_parse(skb, &p);
	if (reason == NT_NEED_PULL) {
		/* Headers not in the linear area (rare on egress): pull once. */
		if (bpf_skb_pull_data(skb, skb->len < NT_MAX_PARSE_LEN ? skb->len : NT_MAX_PARSE_LEN))
			return NT_MARK_ERROR;
		reason = nt_parse(skb, &p);
		if (reason == NT_NEED_PULL)
			return NT_MARK_MALFORMED;
	}
	if (reason != NT_CANDIDATE)
		return reason;

	if (!nt_lookup_dest(&p.flow, &policy_idx))
		return NT_MARK_NO_POLICY;
	pol = bpf_map_lookup_elem(&nt_policies, &policy_idx);
	cfg = bpf_map_lookup_elem(&nt_config, &zero);
	s = bpf_map_lookup_elem(&nt_mark_scratch, &zero);
	if (!pol || !cfg || !s)
		return NT_MARK_ERROR;

	opt_len = pol->mode == NT_MODE_MAC ? NT_MAC_OPT_LEN : NT_STATIC_OPT_LEN;
	optlen = p.tcp_len - sizeof(struct tcphdr);
	NT_BARRIER_VAR(optlen);
	if (optlen > NT_MAX_TCP_OPTS)
		return NT_MARK_MALFORMED;
	room = optlen + opt_len <= NT_MAX_TCP_OPTS;
	if (!room && !cfg->make_room)
		return NT_MARK_NO_ROOM;
	pay_off = p.l4_off + p.tcp_len;
	payload_len = p.ip_end - pay_off;
	if (payload_len > NT_MAX_PAYLOAD_MOVE)
		return NT_MARK_PAYLOAD;

	/* Read everything the edit needs before the first write. */
	if (optlen && bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct tcphdr),
					 s->opts_old, NT_BOUNDED(optlen, 64)))
		return NT_MARK_ERROR;
	reason = nt_copy_options(s, optlen);
	if (reason == NT_MARK_MALFORMED)
		return reason;
	/* Almost every SYN: the options stay as they are, so neither a store
	 * nor a checksum diff of them (~65 ns). */
	rewrite = reason == NT_OPTS_REWRITTEN;
	area = optlen;
	if (!room) {
		int made = nt_make_room(s, optlen, opt_len);

		if (made < 0)
			return NT_MARK_NO_ROOM;
		area = made;
		rewrite = 1;
	}
	if (payload_len && bpf_skb_load_bytes(skb, pay_off, s->payload,
						  NT_BOUNDED(payload_len, NT_MAX_PAYLOAD_MOVE)))
		return NT_MARK_ERROR;

	__u8 *opt = s->opt;

	opt[0] = cfg->kind;
	opt[1] = opt_len;
	opt[2] = cfg->exid >> 8;
	opt[3] = cfg->exid & 0xff;
	if (pol->mode == NT_MODE_MAC) {
		__u32 kid = pol->key_id;
		struct nt_key *key = bpf_map_lookup_elem(&nt_keys, &kid);
		/* 48 random bits: the low 6 bytes in memory order. */
		__u64 nonce = bpf_get_prandom_u32() | (__u64)bpf_get_prandom_u32() << 32;
		__u64 now, tag;

		if (!key || !key->window)
			return NT_MARK_NO_KEY;
		/* Wall clock as design.md §2 defines it: CLOCK_REALTIME, derived from
		 * CLOCK_TAI plus the offset user space keeps in nt_config. */
		now = bpf_ktime_get_tai_ns() + cfg->realtime_minus_tai_ns;
		epoch = now / 1000000000ULL / key->window;
		opt[4] = pol->key_id;
		opt[5] = epoch & 0xff;
		__builtin_memcpy(opt + NT_OPT_NONCE, &nonce, NT_NONCE_LEN);
		tag = nt_mac(key, cfg->exid, pol->key_id, epoch, opt + NT_OPT_NONCE, &p.flow, s->msg);
		__builtin_memcpy(opt + NT_OPT_TAG, &tag, NT_TAG_LEN);
	} else {
		__builtin_memcpy(opt + 4, pol->token, 8);
	}

	p.area = area;
	p.opt_len = opt_len;
	p.rewrite = rewrite;
	if (nt_edit(skb, s, &p))
		return NT_MARK_ERROR;

	reason = payload_len ? NT_MARK_MARKED_PAYLOAD : NT_MARK_MARKED;
	if (!room)
		count(NT_MARK_ROOM_FROM_TS);
	emit_event(skb, &p, pol, epoch, s->opt, reason, !room);
	return reason;
}

/* TC_ACT_UNSPEC: netoken edits but never decides.  Filters after ours on the
 * same hook still run, and with none left the packet simply goes out. */
SEC("tc")
int netoken_mark(struct __sk_buff *skb)
{
	count(mark(skb));
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
