// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * netoken marker: TC egress.  Appends a keyed token option (design.md §2) to
 * outgoing SYNs that a policy selects, after the existing options and before
 * any payload.  It never drops: every path returns TC_ACT_UNSPEC, and any
 * failure before the first write leaves the packet untouched.
 *
 * Packet edit (see docs/architecture.md for the checksum reasoning), with as
 * few helper calls as it takes, since each costs more than the arithmetic
 * it saves:
 *   1. one bpf_skb_load_bytes() of the header bytes the edit rewrites: from
 *      the IP length field to the end of the TCP options, into per-CPU
 *      scratch (and the SYN payload, if any, in a second one)
 *   2. check the option framing, an option per step; only if an EOL ends
 *      the list early, NOPs from there on; only if the option does not fit,
 *      make room by removing the Timestamps option (design.md §3)
 *   3. in scratch: the option after the others, the new doff, the IP length
 *      and the IPv4 header checksum
 *   4. bpf_skb_change_tail() grows the packet by the net growth of the TCP
 *      header, so the TCP header does not move (csum_start stays valid under
 *      offload)
 *   5. one bpf_skb_store_bytes() of the rewritten headers (and one of the
 *      payload, moved behind the option)
 *   6. the TCP checksum with two bpf_l4_csum_replace(): the difference of
 *      the header bytes, summed here, and the length in the pseudo header
 *      with BPF_F_PSEUDO_HDR, so a CHECKSUM_PARTIAL skb only gets its
 *      pseudo-header seed adjusted.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Each SYN runs the marker cold: rolled SipHash loops (siphash.h). */
#define NT_SIP_ROLLED
#include "netoken.h"
#include "parsing.h"
#include "token.h"
#include "clock.h"
#include "dest.h"

/* Largest SYN payload (TCP Fast Open data) moved to make room; larger ones
 * pass unmarked and count NT_MARK_PAYLOAD.  Covers a 1500-byte MTU. */
#define NT_MAX_PAYLOAD_MOVE 2048
/* Ethernet + 2 VLAN tags + IPv4 with options + TCP without options. */
#define NT_MAX_PARSE_LEN (14 + 8 + 60 + 20)
#define NT_MARK_RING_SIZE (256 * 1024)

/* The rewritten headers are put together in nt_scratch.hdr with TCP header
 * byte 12 (doff) at NT_HDR_T12 and the options at NT_HDR_OPTS; the bytes
 * from the IP length field up to TCP byte 12 (struct nt_pkt.pre of them:
 * 30..70 for IPv4, 48 for IPv6 without extension headers, at most
 * NT_HDR_PRE_MAX) end at NT_HDR_T12.  An IPv6 header whose extension
 * headers leave no room for that has its length stored on its own
 * (pre = 0). */
#define NT_HDR_PRE_MAX 80
#define NT_HDR_T12    (NT_HDR_PRE_MAX + 8)    /* 8 bytes of slack before: see nt_copy() */
#define NT_HDR_OPTS   (NT_HDR_T12 + 8)
#define NT_HDR_SIZE   256     /* what the verifier needs to see each bound on its own */
/* Past any header layout nt_parse() accepts: a bound for the verifier. */
#define NT_MAX_HDR_OFF 16384

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

/* Sizes are powers of two so NT_BOUNDED() can prove lengths to the verifier.
 * What every marked SYN touches comes first, in as few cache lines as it
 * takes. */
struct nt_scratch {
	struct nt_epoch_memo memo;
	__u64 rng;               /* nonce generator state (nt_nonce()) */
	__u8  opt[NT_MAC_OPT_LEN];   /* the option added */
	__u8  hdr[NT_HDR_SIZE];  /* the headers being rewritten (see NT_HDR_T12) */
	__u8  opts_old[64];      /* the options as they were, when rewritten */
	__u8  opts_new[64];      /* nt_make_room's result */
	struct nt_room room;     /* nt_make_room's walk (see there) */
	__u8  payload[NT_MAX_PAYLOAD_MOVE];
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
	__u32 pre;               /* bytes in scratch.hdr before TCP byte 12 */
	__u32 area;              /* option bytes before the new option */
	__u32 opt_len;           /* the new option's length */
	__u32 rewrite;           /* the options changed: opts_old holds them as they were */
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
 * Inlined, like everything on the way of a marked SYN: a call between BPF
 * functions costs more than the verifier's work it would save.
 */
static __always_inline int nt_parse(struct __sk_buff *skb, struct nt_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	struct tcphdr *tcph;
	int proto, tcp_len;

	if (!p)
		return NT_MARK_ERROR;
	proto = parse_l2(&nh, data_end);
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


/*
 * Checks the framing of the OPTLEN option bytes in s->hdr, an option per
 * step (a Linux SYN has five): EOL ends the list, NOP is one byte, anything
 * else is kind/len with 2 <= len and the whole option inside the header.
 * Returns the offset of an EOL that ends the list before OPTLEN (an option
 * appended after it would be invisible to every receiver), OPTLEN when none
 * does, or -1 for a broken list.
 */
static __always_inline int nt_scan_options(struct nt_scratch *s, __u32 optlen)
{
	__u64 off = 0, len;
	__u8 *opts, *o;

	if (!s || optlen > NT_MAX_TCP_OPTS)
		return -1;
	opts = s->hdr + NT_HDR_OPTS;
	/* Every step moves on by at least a byte: optlen steps at most. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < NT_MAX_TCP_OPTS; i++) {
		if (off >= optlen)
			break;
		o = opts + (off & 63);   /* off < optlen <= 40 */
		if (o[0] == NT_TCPOPT_EOL)
			return off;
		len = 1;
		if (o[0] != NT_TCPOPT_NOP) {
			if (off + 1 >= optlen)
				return -1;
			len = o[1];
			if (len < 2 || off + len > optlen)
				return -1;
		}
		/* The next offset as the distance of two pointers: the
		 * verifier knows nothing of its value, so the ways through
		 * the list up to here are one state, not one per offset. */
		o += len;
		NT_BARRIER_VAR(o);
		off = o - opts;
	}
	return optlen;
}

/* NOPs in place of option bytes FROM..TO-1 (an EOL and what follows it).
 * Rare, and global so the main path is not verified through it. */
__noinline int nt_nops(struct nt_scratch *s, __u32 from, __u32 to)
{
	if (!s)
		return 0;
#pragma unroll
	for (int j = 0; j < NT_MAX_TCP_OPTS; j++)
		if (j >= from && j < to)
			s->hdr[NT_HDR_OPTS + j] = NT_TCPOPT_NOP;
	return 0;
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

/* 48 random bits for the nonce: SplitMix64 over a per-CPU state seeded
 * from bpf_get_prandom_u32() on first use.  The nonce only has to be
 * unique (the MAC makes it unforgeable), and this costs a few multiplies
 * where two helper calls cost more than the MAC. */
static __always_inline __u64 nt_nonce(struct nt_scratch *s)
{
	__u64 z;

	if (!s->rng)
		s->rng = (__u64)bpf_get_prandom_u32() << 32 | bpf_get_prandom_u32();
	z = s->rng += 0x9E3779B97F4A7C15ULL;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return (z ^ (z >> 31)) & NT_NONCE_MASK;
}

/* IPv4 header checksum CHECK after a 16-bit field changed from OLD to NEW
 * (RFC 1624, eqn. 3), all as loaded from the packet. */
static __always_inline __u16 nt_csum_replace16(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check + (__u16)~old + new;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
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
	/* Only while a reader listens (mark()).  Waking it costs ~6 us per event (8x a marked SYN).  netoken
	 * monitor also polls every 100 ms, so wake it only once the ring holds
	 * an eighth of its size: a burst still gets read before it fills. */
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&nt_mark_events, BPF_RB_AVAIL_DATA) >
			      NT_MARK_RING_SIZE / 8 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* X folded to 16 bits with end-around carries: the ones'-complement sum
 * (0xffff, not 0, for a nonzero multiple of 0xffff). */
static __always_inline __u16 nt_fold16(__u64 x)
{
	x = (x & 0xffffffff) + (x >> 32);
	x = (x & 0xffff) + (x >> 16);
	x = (x & 0xffff) + (x >> 16);
	return (x & 0xffff) + (x >> 16);
}

#define NT_CSUM_UNKNOWN 0
#define NT_CSUM_FULL    1    /* the field holds the checksum (CHECKSUM_NONE, _UNNECESSARY) */
#define NT_CSUM_SEED    2    /* CHECKSUM_PARTIAL: the pseudo-header sum the device completes */

/*
 * What the TCP checksum field of the SYN in s->hdr holds, which a TC
 * program cannot ask the skb: told apart by the field itself, over the
 * header as it was (no payload, options not rewritten).  A seed equals the
 * folded sum of the pseudo header (*PSEUDO, for a segment of LEN bytes); a
 * full checksum makes pseudo header and segment sum to 0xffff.  Both at
 * once (one SYN in 65536 of either kind) or neither (a checksum that was
 * already wrong) is NT_CSUM_UNKNOWN, and the caller leaves the field to
 * bpf_l4_csum_replace(), which asks the skb.
 */
static __always_inline int nt_csum_mode(const struct nt_scratch *s, const struct nt_pkt *p,
					__u32 len, __u64 *pseudo)
{
	const __u32 *tcp = (const __u32 *)(s->hdr + NT_HDR_T12 - 12);
	__u16 check = *(const __u16 *)(s->hdr + NT_HDR_T12 + 4);
	__u64 ph = 0x0600 + bpf_htons(len), seg = 0;   /* protocol 6, length: as loaded */
	int seed, full;

	if (p->flow.family == 4) {
		ph += NT_W32(p->flow.saddr) + NT_W32(p->flow.daddr);
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++)
			ph += (__u64)((const __u32 *)p->flow.saddr)[i] +
			      ((const __u32 *)p->flow.daddr)[i];
	}
#pragma clang loop unroll(disable)
	for (int i = 0; i < 15; i++) {
		if (i * 4 >= p->tcp_len)
			break;
		seg += tcp[i];
	}
	*pseudo = ph;
	seed = nt_fold16(ph) == check;
	full = nt_fold16(ph + seg) == 0xffff;
	if (seed == full)
		return NT_CSUM_UNKNOWN;
	return seed ? NT_CSUM_SEED : NT_CSUM_FULL;
}

/*
 * The packet edit: everything after the first write.  Puts s->opt after the
 * first p->area option bytes in s->hdr, fixes the lengths there and stores
 * the headers, and the payload behind them.  Returns 0, or NT_MARK_ERROR
 * with the packet trimmed back to its length if a helper failed.
 */
static __always_inline int nt_edit(struct __sk_buff *skb, struct nt_scratch *s,
				   const struct nt_pkt *p)
{
	__u32 optlen, area, opt_len, pre, delta, pay_off, payload_len, old_tcp_seg;
	__be16 new_doff_flags, old_l3, new_l3;
	__u64 sum, pseudo = 0, dlen;
	__u32 *t, *w;
	__s64 diff;
	int mode = NT_CSUM_UNKNOWN;

	if (!s || !p || p->tcp_len < sizeof(struct tcphdr))
		return NT_MARK_ERROR;
	optlen = p->tcp_len - sizeof(struct tcphdr);
	area = p->area;
	opt_len = p->opt_len == NT_MAC_OPT_LEN ? NT_MAC_OPT_LEN : NT_STATIC_OPT_LEN;
	pre = p->pre;
	pay_off = p->l4_off + p->tcp_len;
	payload_len = p->ip_end - pay_off;
	if (optlen > NT_MAX_TCP_OPTS || area > NT_MAX_TCP_OPTS || area + opt_len < optlen ||
	    area + opt_len > NT_MAX_TCP_OPTS || pre > NT_HDR_PRE_MAX || (pre && pre < 12) ||
	    payload_len > NT_MAX_PAYLOAD_MOVE)
		return NT_MARK_ERROR;
	/* Net growth of the TCP header: opt_len, or 0..8 after make-room. */
	delta = area + opt_len - optlen;
	old_tcp_seg = p->ip_end - p->l4_off;
	new_doff_flags = bpf_htons((bpf_ntohs(p->doff_flags) & 0x0fff) |
				   (((p->tcp_len + delta) / 4) << 12));
	old_l3 = bpf_htons(p->l3_len);
	new_l3 = bpf_htons(p->l3_len + delta);
	/* The TCP length in the pseudo header, old to new, as a sum. */
	dlen = (__u16)~bpf_htons(old_tcp_seg) + bpf_htons(old_tcp_seg + delta);
	if (!p->rewrite && !payload_len && pre)
		mode = nt_csum_mode(s, p, old_tcp_seg, &pseudo);

	/* The option after AREA bytes (a multiple of 4) of options. */
	t = (__u32 *)(s->hdr + NT_HDR_OPTS + NT_MASKED(area, 64));
	w = (__u32 *)s->opt;
	t[0] = w[0];
	t[1] = w[1];
	t[2] = w[2];
	if (opt_len == NT_MAC_OPT_LEN)
		t[3] = w[3];
	*(__be16 *)(s->hdr + NT_HDR_T12) = new_doff_flags;
	if (pre) {
		/* IPv4 tot_len (and the header checksum 8 bytes on) or IPv6
		 * payload_len: the first bytes copied. */
		__u8 *ip = s->hdr + NT_MASKED(NT_HDR_T12 - pre, 128);

		*(__be16 *)ip = new_l3;
		if (p->flow.family == 4)
			*(__u16 *)(ip + 8) = nt_csum_replace16(*(__u16 *)(ip + 8), old_l3, new_l3);
	}

	/* TCP checksum, what is not the pseudo header: doff, the option and
	 * (rewritten) the options before it, as a ones'-complement sum of
	 * what was added and what was taken away.  Words at even offsets
	 * from the TCP header, so their sums add up in any grouping. */
	sum = (__u64)(__u16)~p->doff_flags + new_doff_flags + w[0] + w[1] + w[2];
	if (opt_len == NT_MAC_OPT_LEN)
		sum += w[3];
	if (p->rewrite) {
		diff = bpf_csum_diff((__be32 *)s->opts_old, NT_MASKED(optlen, 64),
				     (__be32 *)(s->hdr + NT_HDR_OPTS), NT_MASKED(area, 64), 0);
		if (diff < 0)
			return NT_MARK_ERROR;
		sum += (__u32)diff;
	}
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	/* The checksum field goes out with the headers, as the helpers would
	 * have left it: a full checksum updated for every change, a seed for
	 * the length only. */
	if (mode == NT_CSUM_FULL)
		*(__u16 *)(s->hdr + NT_HDR_T12 + 4) =
			~nt_fold16((__u16)~*(__u16 *)(s->hdr + NT_HDR_T12 + 4) + sum + dlen);
	else if (mode == NT_CSUM_SEED)
		*(__u16 *)(s->hdr + NT_HDR_T12 + 4) = nt_fold16(pseudo + dlen);

	if (delta && bpf_skb_change_tail(skb, p->ip_end + delta, 0))
		return NT_MARK_ERROR;
	if (bpf_skb_store_bytes(skb, p->l4_off + 12 - pre, s->hdr + NT_MASKED(NT_HDR_T12 - pre, 128),
				NT_BOUNDED(pre + 8 + area + opt_len, 128), 0))
		goto undo;
	if (!pre && bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct ipv6hdr, payload_len),
					&new_l3, 2, 0))
		goto undo;
	if (payload_len && delta &&
	    bpf_skb_store_bytes(skb, pay_off + delta, s->payload,
				NT_BOUNDED(payload_len, NT_MAX_PAYLOAD_MOVE), 0))
		goto undo;
	if (mode != NT_CSUM_UNKNOWN)
		return 0;
	/* The payload moved by a multiple of 4, so its sum is unchanged.
	 * Under CHECKSUM_PARTIAL l4_csum_replace only applies the
	 * BPF_F_PSEUDO_HDR part, which is exactly right: the device sums the
	 * bytes, the seed must cover the new length. */
	if (bpf_l4_csum_replace(skb, p->l4_off + offsetof(struct tcphdr, check), 0, sum, 0) ||
	    (delta && bpf_l4_csum_replace(skb, p->l4_off + offsetof(struct tcphdr, check),
					  bpf_htons(old_tcp_seg), bpf_htons(old_tcp_seg + delta),
					  BPF_F_PSEUDO_HDR | 2)))
		goto undo;
	return 0;

undo:
	/* Only reachable if a helper failed after the resize (ENOMEM while
	 * unsharing): drop the added bytes so the length fields stay true.
	 * Partial writes cannot be rolled back further; counted as error. */
	bpf_skb_change_tail(skb, p->ip_end, 0);
	return NT_MARK_ERROR;
}

/*
 * N bytes (<= 128) of the packet at OFF into s->hdr at AT.  Direct reads, a
 * word at a time, where the bytes are in the linear data (a SYN the local
 * stack sent always is), else bpf_skb_load_bytes().  The words end where
 * the N bytes do, since the packet may end there too; the up to 7 bytes the
 * first word reads before OFF land before AT, where nothing is stored from.
 */
static __always_inline int nt_copy(struct __sk_buff *skb, struct nt_scratch *s, __u64 off,
				   __u32 at, __u32 n)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 words = (n + 7) / 8, lead = words * 8 - n;
	__u64 start = off - lead;
	__u8 *src, *dst;

	if (n > 128 || at < 8 || at > NT_HDR_T12 || off > NT_MAX_HDR_OFF)
		return -1;
	/* Not linear, or no room before OFF (the IPv4 header of an L3
	 * device starts the packet). */
	if (off < lead || start + words * 8 > data_end - data)
		return bpf_skb_load_bytes(skb, off, s->hdr + NT_MASKED(at, 128), NT_BOUNDED(n, 128));
	NT_BARRIER_VAR(start);
	if (start > NT_MAX_HDR_OFF)
		return -1;
	src = data + start;
	dst = s->hdr + NT_MASKED(at - lead, 128);
	/* A loop, not unrolled: this runs cold, once per connection. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < 16; i++) {
		if (i >= words)
			break;
		if ((void *)(src + i * 8 + 8) > data_end)
			return -1;
		*(__u64 *)(dst + i * 8) = *(__u64 *)(src + i * 8);
	}
	return 0;
}

static __always_inline int mark(struct __sk_buff *skb)
{
	struct nt_pkt p = {};
	struct nt_policy *pol;
	struct nt_config *cfg;
	struct nt_scratch *s;
	__u32 zero = 0, policy_idx, optlen, opt_len, payload_len, pay_off, epoch = 0, pre;
	__u32 room, *w;
	int reason, eol;

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

	cfg = bpf_map_lookup_elem(&nt_config, &zero);
	if (!cfg)
		return NT_MARK_ERROR;
	if (!nt_lookup_dest_cached(&p.flow, cfg->generation, &policy_idx))
		return NT_MARK_NO_POLICY;
	pol = bpf_map_lookup_elem(&nt_policies, &policy_idx);
	s = bpf_map_lookup_elem(&nt_mark_scratch, &zero);
	if (!pol || !s)
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

	/* Read everything the edit needs before the first write: the headers
	 * from the IP length field on (IPv4 tot_len, IPv6 payload_len) to the
	 * end of the options, one copy. */
	pre = p.l4_off + 12 - p.l3_off - (p.flow.family == 4 ? offsetof(struct iphdr, tot_len)
							 : offsetof(struct ipv6hdr, payload_len));
	if (pre > NT_HDR_PRE_MAX)
		pre = 0;
	p.pre = pre;
	if (nt_copy(skb, s, p.l4_off + 12 - pre, NT_HDR_T12 - pre, pre + 8 + optlen))
		return NT_MARK_ERROR;
	eol = nt_scan_options(s, optlen);
	if (eol < 0)
		return NT_MARK_MALFORMED;
	/* Almost every SYN: the options stay as they are. */
	p.area = optlen;
	p.rewrite = eol < optlen || !room;
	if (p.rewrite)
		__builtin_memcpy(s->opts_old, s->hdr + NT_HDR_OPTS, NT_MAX_TCP_OPTS);
	if (!room) {
		int made = nt_make_room(s, optlen, opt_len);

		if (made < 0)
			return NT_MARK_NO_ROOM;
		p.area = made;
		__builtin_memcpy(s->hdr + NT_HDR_OPTS, s->opts_new, NT_MAX_TCP_OPTS);
	} else if (eol < optlen) {
		nt_nops(s, eol, optlen);
	}
	if (payload_len && bpf_skb_load_bytes(skb, pay_off, s->payload,
						  NT_BOUNDED(payload_len, NT_MAX_PAYLOAD_MOVE)))
		return NT_MARK_ERROR;

	/* The option, as little-endian words of its bytes on the wire. */
	w = (__u32 *)s->opt;
	w[0] = cfg->kind | opt_len << 8 | (__u32)bpf_htons(cfg->exid) << 16;
	if (pol->mode == NT_MODE_MAC) {
		__u32 kid = pol->key_id;
		struct nt_key *key = bpf_map_lookup_elem(&nt_keys, &kid);
		__u64 nonce, tag;

		if (!key || !key->window)
			return NT_MARK_NO_KEY;
		epoch = nt_epoch(&s->memo, cfg->realtime_minus_tai_ns, key->window);
		nonce = nt_nonce(s);
		tag = nt_mac(key, cfg->exid, kid, epoch, nonce, &p.flow);
		w[1] = kid | (epoch & 0xff) << 8 | (__u32)(nonce & 0xffff) << 16;
		w[2] = nonce >> 16;
		w[3] = tag;
	} else {
		w[1] = *(__u32 *)pol->token;
		w[2] = *(__u32 *)(pol->token + 4);
	}

	p.opt_len = opt_len;
	if (nt_edit(skb, s, &p))
		return NT_MARK_ERROR;

	reason = payload_len ? NT_MARK_MARKED_PAYLOAD : NT_MARK_MARKED;
	if (!room)
		count(NT_MARK_ROOM_FROM_TS);
	if (nt_listening())
		emit_event(skb, &p, pol, epoch, s->opt, reason, !room);
	return reason;
}

/* TC_ACT_UNSPEC: netoken edits but never decides.  Filters after ours on the
 * same hook still run, and with none left the packet simply goes out. */
SEC("tc")
int netoken_mark(struct __sk_buff *skb)
{
	count(nt_plainly_not_syn((void *)(long)skb->data, (void *)(long)skb->data_end)
		      ? NT_MARK_NOT_SYN
		      : mark(skb));
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
