// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * netoken guard: XDP, or TC ingress (bpf/hook.h: one source, an object per
 * hook).  Every SYN to a protected destination must carry
 * exactly one valid token option (design.md §2); the others are dropped, or in
 * monitor mode counted and passed, before the kernel allocates anything for
 * them.  All other traffic passes untouched after a look at its headers.
 *
 * Verification order, one verdict per SYN (enum nt_guard_reason):
 *   option list well formed, exactly one option with our kind and ExID
 *     (missing / malformed)
 *   static token: accepted by this protect entry (ok / bad_tag)
 *   mac: key id accepted here (unknown_key), epoch within ±skew (stale),
 *     tag (bad_tag), then first sight of the token in the replay cache
 *     (replay)
 * Only SYNs whose tag verified reach the replay cache, so a flood of forged
 * tokens cannot evict the entries of real clients.
 */
#include <linux/bpf.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "hook.h"
#include "netoken.h"
#include "parsing.h"
#include "token.h"
#include "clock.h"
#include "dest.h"

#define NT_TCP_FLAG_SYN    0x02
#define NT_TCP_FLAG_ACK    0x10
#define NT_TAG_MASK        ((1ULL << (NT_TAG_LEN * 8)) - 1)
/* Past any header layout parse() accepts (2 VLANs, IPv6 and 4 extension
 * headers of 2 KiB): a bound for the verifier, never reached. */
#define NT_MAX_HDR_OFF     16384
/* Caps that keep the token bucket's fixed-point products inside 64 bits. */
#define NT_MAX_REFILL_NS   (100 * NT_NSEC)
#define NT_NOT_FOUND       0xff   /* nt_find_option(): no option of ours yet */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_guard_config);
} nt_guard_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NT_MAX_KEYS);
	__type(key, __u32);
	__type(value, struct nt_key);
} nt_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NT_MAX_PROTECT);
	__type(key, __u32);
	__type(value, struct nt_protect);
} nt_protect SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NT_MAX_STATIC);
	__type(key, struct nt_static_key);
	__type(value, __u32);
} nt_static SEC(".maps");

/* The replay cache: direct-mapped slots, one accepted token each (see
 * nt_replay_slot()).  Sized from the config's replay_cache, rounded up to a
 * power of two, before load (netoken/guard/program.py). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << 20);
	__type(key, __u32);
	__type(value, __u64);
} nt_replay SEC(".maps");

/* The kernel's struct bpf_map, as far as the guard reads it (CO-RE: libbpf
 * relocates the offset against the running kernel's BTF), so the slot mask
 * follows whatever size user space gave the map. */
struct bpf_map___nt {
	__u32 max_entries;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NT_GUARD_REASON_MAX);
	__type(key, __u32);      /* enum nt_guard_reason */
	__type(value, __u64);
} nt_guard_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NT_MAX_KEYS * 2);
	__type(key, __u32);      /* key id * 2 + NT_KEY_STAT_* */
	__type(value, __u64);
} nt_key_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} nt_guard_events SEC(".maps");

/* Event rate limit.  Per CPU, so a flood spread over every queue costs no
 * shared cache line; credit is in event-nanoseconds (one event = NT_NSEC). */
struct nt_bucket {
	__u64 credit;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_bucket);
} nt_ev_bucket SEC(".maps");

/* Per-CPU state of the program (not shared, not pinned). */
struct nt_guard_scratch {
	struct nt_epoch_memo memo;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_guard_scratch);
} nt_guard_scratch SEC(".maps");

/* A SYN to look at: offsets only, the packet stays where it is. */
struct nt_gpkt {
	struct nt_flow flow;
	__u32 l4_off;
	__u32 tcp_len;           /* doff * 4 as on the wire, possibly < 20 */
	__u32 ip_end;            /* offset one past the IP packet */
};

/* Inputs and outputs of nt_check(), for counters and the event.  The
 * option's fields are loaded little-endian, so their bytes in memory are
 * those on the wire. */
struct nt_check {
	__u32 protect;           /* in: index into nt_protect */
	__u32 epoch;             /* reconstructed, once the key is known */
	__u8  mode;              /* NT_MODE_* once the option's length is known */
	__u8  key_id;
	__u8  pad[6];
	__u64 nonce;             /* mac: the 6 nonce bytes */
	__u64 tag;               /* mac: the NT_TAG_LEN tag bytes; static: the token */
};

static __always_inline void count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&nt_guard_stats, &reason);

	if (c)
		*c += 1;
}

static __always_inline void count_key(__u8 key_id, __u32 bad)
{
	__u32 idx = key_id * 2 + bad;
	__u64 *c = bpf_map_lookup_elem(&nt_key_stats, &idx);

	if (c)
		*c += 1;
}

#define NT_CANDIDATE -1

/* Fills in the addresses of a packet parse() could not take to a SYN, for the
 * address look-up and the event; the ports stay 0. */
static __always_inline int unparsed(struct nt_gpkt *p, struct iphdr *iph,
				    struct ipv6hdr *ip6h, int verdict)
{
	__builtin_memset(p, 0, sizeof(*p));
	if (iph) {
		p->flow.family = 4;
		__builtin_memcpy(p->flow.saddr, &iph->saddr, 4);
		__builtin_memcpy(p->flow.daddr, &iph->daddr, 4);
	} else if (ip6h) {
		p->flow.family = 6;
		__builtin_memcpy(p->flow.saddr, &ip6h->saddr, 16);
		__builtin_memcpy(p->flow.daddr, &ip6h->daddr, 16);
	}
	return verdict;
}

/* Whether an IPv6 fragment whose Fragment header names NEXTHDR may, once
 * reassembled, be a TCP segment: TCP itself, or an extension header TCP
 * could follow.  (The kernel takes the next header from the first fragment;
 * every fragment that names TCP is dropped, so no reassembly that needs the
 * first one can complete.)  ESP is IPsec's to check, as unfragmented. */
static __always_inline int ip6_frag_may_be_tcp(__u8 nexthdr)
{
	return nexthdr == IPPROTO_TCP || (ip6_is_ext(nexthdr) && nexthdr != IPPROTO_ESP);
}

/*
 * Returns NT_CANDIDATE with *p filled for a SYN && !ACK, or a reason.
 * NT_GUARD_FRAGMENT, NT_GUARD_IPV6_EXT and NT_GUARD_BAD_HEADER come with
 * p->flow's family and addresses set when the IP header was readable: they
 * become verdicts if a protect entry covers the destination address (the
 * caller decides).  Non-SYN traffic leaves after the flags byte, with
 * nothing copied.
 */
static __always_inline int parse(NT_CTX *ctx, struct nt_gpkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct iphdr *iph = NULL;
	struct ipv6hdr *ip6h = NULL;
	struct tcphdr *tcph = NULL;
	__u32 l3_off;
	int proto;

	proto = parse_l2(&nh, data_end);
	if (proto < 0)
		return NT_GUARD_BAD_HEADER_PASSED;
	l3_off = nh.pos - data;
	if (proto == bpf_htons(ETH_P_IP)) {
		/* Without a valid IPv4 header the kernel drops the packet itself. */
		proto = parse_iphdr(&nh, data_end, &iph);
		if (proto < 0)
			return NT_GUARD_BAD_HEADER_PASSED;
		/* Every fragment carries the protocol: drop them all and no
		 * TCP segment reassembles. */
		if (ipv4_is_fragment(iph))
			return proto == IPPROTO_TCP ? unparsed(p, iph, NULL, NT_GUARD_FRAGMENT)
						    : NT_GUARD_FRAGMENT_PASSED;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		/* Extension headers are walked, not passed: otherwise a
		 * Hop-by-Hop header in front of a SYN would walk it past the
		 * guard.  What the walk cannot get through fails closed for
		 * protected addresses. */
		proto = parse_ip6_upper(&nh, data_end, &ip6h, NT_IP6_WALK_AH);
		if (!ip6h)
			return NT_GUARD_BAD_HEADER_PASSED;
		if (proto < 0)
			return unparsed(p, NULL, ip6h, NT_GUARD_BAD_HEADER);
		if (proto == IPPROTO_FRAGMENT) {
			__u8 *frag = nh.pos;

			if ((void *)(frag + 8) > data_end)
				return unparsed(p, NULL, ip6h, NT_GUARD_BAD_HEADER);
			return ip6_frag_may_be_tcp(frag[0])
				? unparsed(p, NULL, ip6h, NT_GUARD_FRAGMENT)
				: NT_GUARD_FRAGMENT_PASSED;
		}
		/* ESP: only the kernel's IPsec can look inside, and it delivers
		 * nothing it did not authenticate. */
		if (proto == IPPROTO_ESP)
			return NT_GUARD_NOT_TCP;
		if (ip6_is_ext(proto))
			return unparsed(p, NULL, ip6h, NT_GUARD_IPV6_EXT);
	} else {
		return NT_GUARD_NOT_IPV4_OR_6;
	}
	if (proto != IPPROTO_TCP)
		return NT_GUARD_NOT_TCP;
	if (parse_tcphdr(&nh, data_end, &tcph) == NT_PARSE_SHORT || !tcph)
		return unparsed(p, iph, ip6h, NT_GUARD_BAD_HEADER);
	if ((((__u8 *)tcph)[13] & (NT_TCP_FLAG_SYN | NT_TCP_FLAG_ACK)) != NT_TCP_FLAG_SYN)
		return NT_GUARD_NOT_SYN;

	__builtin_memset(p, 0, sizeof(*p));
	p->l4_off = (void *)tcph - data;
	p->tcp_len = tcph->doff * 4;
	p->flow.sport = tcph->source;
	p->flow.dport = tcph->dest;
	if (iph) {
		p->flow.family = 4;
		__builtin_memcpy(p->flow.saddr, &iph->saddr, 4);
		__builtin_memcpy(p->flow.daddr, &iph->daddr, 4);
		p->ip_end = l3_off + bpf_ntohs(iph->tot_len);
	} else if (ip6h) {
		p->flow.family = 6;
		__builtin_memcpy(p->flow.saddr, &ip6h->saddr, 16);
		__builtin_memcpy(p->flow.daddr, &ip6h->daddr, 16);
		p->ip_end = l3_off + sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
	}
	return NT_CANDIDATE;
}

#ifdef NT_HOOK_TC
/* Bytes pulled at most: past every header layout parse() reads. */
#define NT_TC_PULL_MAX 16384

/*
 * At TC the skb may be non-linear and direct access reaches only its linear
 * part.  Whether parse() (or nt_check(), reading the options) ran out of it
 * before the headers ended: then they are pulled in and parsed again, so a
 * SYN is never judged (or dropped as bad_header) on where the driver split
 * it.  Only then: data packets, whose headers are linear, never pay for a
 * pull.
 */
static __always_inline int nt_cut_short(struct __sk_buff *skb, int verdict,
					const struct nt_gpkt *p)
{
	__u32 linear = skb->data_end - skb->data;

	if (linear >= skb->len)
		return 0;
	return verdict == NT_GUARD_BAD_HEADER || verdict == NT_GUARD_BAD_HEADER_PASSED ||
	       (verdict == NT_CANDIDATE && p->l4_off + p->tcp_len > linear);
}

static __always_inline void nt_pull(struct __sk_buff *skb)
{
	/* On failure (ENOMEM) the second parse fails closed as the first. */
	bpf_skb_pull_data(skb, skb->len < NT_TC_PULL_MAX ? skb->len : NT_TC_PULL_MAX);
}
#endif

/*
 * Linux's own SYN (timestamps, SACK and window scaling on, its defaults):
 * MSS, SACK permitted, timestamps, NOP, window scale, in NT_LINUX_SYN_OPTS
 * bytes, with ours appended after them (where the marker puts it) or
 * without any (the usual template of a flood).  Three masked loads prove
 * those five options well formed and none of them anybody's experimental
 * option, so such a SYN is decided without the walk below.  Returns what
 * nt_find_option() would, or NT_UNDECIDED for any other layout, which the
 * walk then takes.  Saves ~20 ns per SYN (bench/README.md); an attacker who
 * picks another layout pays the walk, as every SYN did before.  (The marker
 * walks them: there the saving did not show and the verifier's work grew
 * by half.)
 */
#define NT_LINUX_SYN_OPTS 20
#define NT_UNDECIDED      1

static __always_inline int nt_linux_syn(const __u8 *o, const void *data_end, __u32 optlen,
					__u32 want)
{
	__u32 rest = optlen - NT_LINUX_SYN_OPTS;

	if (optlen < NT_LINUX_SYN_OPTS || (void *)(o + NT_LINUX_SYN_OPTS) > data_end)
		return NT_UNDECIDED;
	/* Little-endian loads: 02 04 . . | 04 02 08 0a | . x 8 | 01 03 03 . */
	if ((*(const __u32 *)o & 0xffff) != 0x0402 || *(const __u32 *)(o + 4) != 0x0a080204 ||
	    (*(const __u32 *)(o + 16) & 0xffffff) != 0x030301)
		return NT_UNDECIDED;
	if (rest == 0)
		return -NT_GUARD_MISSING;
	/* One option of ours that ends where the list ends. */
	o += NT_LINUX_SYN_OPTS;
	if (rest >= 4 && (void *)(o + 4) <= data_end && o[1] == rest &&
	    (*(const __u32 *)o & 0xffff00ff) == want)
		return NT_LINUX_SYN_OPTS;
	return NT_UNDECIDED;
}

/*
 * Walks the option list the way a receiver must (netoken.token.find_options
 * is the reference), in the packet and an option per step: EOL ends it, NOP
 * is one byte, anything else is kind/len with 2 <= len and the whole option
 * inside the header.  Returns the offset (in the options) of the one option
 * with our kind, a length of at least 4 and our ExID; -NT_GUARD_MISSING
 * when none has; -NT_GUARD_MALFORMED for a broken list or two of ours.  A
 * Linux SYN has five options before ours: six steps, where a walk byte by
 * byte takes forty.  The caller has checked that the OPTLEN (<= 40) bytes at
 * OPT_OFF are in the packet; the pointer checks restate it for the verifier.
 * Global, so the verifier walks the loop once and the caller goes on with
 * one unknown offset, not with one state per way through the list.
 */
static __always_inline int nt_find_option(NT_CTX *ctx, __u64 opt_off, __u32 optlen, __u32 kind,
					  __u32 exid)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* Kind, any length, ExID: our option's first 4 bytes as loaded. */
	__u32 want = kind | (__u32)bpf_htons(exid) << 16;
	__u64 off, len, at = NT_NOT_FOUND;
	__u8 *opts, *o;
	int fast;

	if (opt_off > NT_MAX_HDR_OFF || optlen > NT_MAX_TCP_OPTS)
		return -NT_GUARD_MALFORMED;
	opts = o = data + opt_off;
	fast = nt_linux_syn(opts, data_end, optlen, want);
	if (fast == NT_LINUX_SYN_OPTS) {
		/* The offset as the walk returns it, a distance the verifier
		 * does not know: what follows is verified once for both. */
		o += NT_LINUX_SYN_OPTS;
		NT_BARRIER_VAR(o);
		at = o - opts;
		return (int)(at & 63);
	}
	if (fast != NT_UNDECIDED)
		return fast;
	/* Offsets as distances of two packet pointers, from the first: the
	 * verifier knows only their bounds, so every step through the list is
	 * one state, whatever came before it, where exact offsets would make
	 * one per way to get there. */
	NT_BARRIER_VAR(o);
	off = o - opts;
	/* Every step moves on by at least a byte: optlen steps at most. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < NT_MAX_TCP_OPTS; i++) {
		if (off >= optlen)
			break;
		o = opts + (off & 63);   /* off < optlen <= 40 */
		if ((void *)(o + 1) > data_end)
			return -NT_GUARD_MALFORMED;
		len = 1;
		if (o[0] == NT_TCPOPT_EOL)
			break;
		if (o[0] != NT_TCPOPT_NOP) {
			if (off + 1 >= optlen || (void *)(o + 2) > data_end)
				return -NT_GUARD_MALFORMED;
			len = o[1];
			if (len < 2 || off + len > optlen)
				return -NT_GUARD_MALFORMED;
			/* Shorter than 4 bytes there is no ExID: under RFC
			 * 6994 such an option is nobody's. */
			if (len >= 4 && (void *)(o + 4) <= data_end &&
			    (*(__u32 *)o & 0xffff00ff) == want) {
				if (at != NT_NOT_FOUND)
					return -NT_GUARD_MALFORMED;
				at = off;
			}
		}
		o += len;
		NT_BARRIER_VAR(o);
		off = o - opts;
		NT_BARRIER_VAR(off);
	}
	return at == NT_NOT_FOUND ? -NT_GUARD_MISSING : (int)(at & 63);
}

/*
 * First sight of a verified token, or NT_GUARD_REPLAY.
 *
 * One 8-byte slot per token: nonce (48 bits) and the tag's low 16 bits,
 * NT_REPLAY_ENTRY() below.  Two different tokens share that value only if
 * their nonces collide, which is the rate wire format 2 was sized for
 * (docs/design.md §2), and a tag that differs in 16 more bits.  The slot
 * index is a hash of the same value, so user space can move entries into a
 * cache of another size.  Direct-mapped: a new token evicts whatever held its
 * slot, so under N fresh tokens per acceptance window over S slots an
 * accepted token stays known with probability about e^(-N/S); one captured
 * and replayed at once passes once, and again only after a real client's
 * token has taken its slot (docs/operations.md has the numbers).
 * A compare-and-swap makes the insert atomic: two CPUs receiving the same
 * SYN cannot both accept it.
 */
static __always_inline int nt_replay_check(__u64 nonce, __u64 tag)
{
	__u64 v = NT_REPLAY_ENTRY(nonce, tag), old, *slot;
	__u32 idx;

	idx = NT_REPLAY_INDEX(v) & (((struct bpf_map___nt *)&nt_replay)->max_entries - 1);
	slot = bpf_map_lookup_elem(&nt_replay, &idx);
	if (!slot || !v)
		return NT_GUARD_OK;   /* cannot be stored: verified, so let it in */
	old = *slot;
	if (old == v)
		return NT_GUARD_REPLAY;
	/* Lost to another CPU: a replay if that CPU stored this very token. */
	if (__sync_val_compare_and_swap(slot, old, v) != old && *slot == v)
		return NT_GUARD_REPLAY;
	return NT_GUARD_OK;
}

/*
 * The verdict on one SYN to protect entry c->protect.
 * Global: verified once for all the header layouts that lead here (inlined,
 * it costs the verifier a state per layout, beyond its limit once a 6.1
 * verifier's needs are met, for a few ns at run time).
 */
__noinline int nt_check(NT_CTX *ctx, const struct nt_gpkt *p,
			const struct nt_guard_config *cfg, const struct nt_protect *prot,
			struct nt_check *c)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct nt_guard_scratch *s;
	struct nt_key *key;
	__u32 optlen, kid, cur, epoch, zero = 0;
	__u64 mac, opt_off;   /* 64-bit: no zero extension between check and use */
	__s32 delta;
	__u8 *o;
	int at;

	if (!p || !cfg || !prot || !c)
		return NT_GUARD_MALFORMED;
	if (p->tcp_len < sizeof(struct tcphdr) || p->l4_off + p->tcp_len > p->ip_end)
		return NT_GUARD_MALFORMED;
	optlen = p->tcp_len - sizeof(struct tcphdr);
	if (optlen == 0)
		return NT_GUARD_MISSING;
	if (optlen > NT_MAX_TCP_OPTS)
		return NT_GUARD_MALFORMED;
	opt_off = p->l4_off + sizeof(struct tcphdr);
	NT_BARRIER_VAR(opt_off);
	if (opt_off > NT_MAX_HDR_OFF)
		return NT_GUARD_MALFORMED;
	/* What flows on is the value checked, not a copy taken before the
	 * check (older verifiers, 6.1, do not carry a bound over to one). */
	NT_BARRIER_VAR(opt_off);
	/* The XDP program is not xdp.frags, so the whole frame is linear; at
	 * TC the entry point has pulled the headers in (nt_cut_short()). */
	if (opt_off + optlen > data_end - data)
		return NT_GUARD_MALFORMED;
	at = nt_find_option(ctx, opt_off, optlen, cfg->kind, cfg->exid);
	if (at < 0)
		return -at;
	o = data + opt_off;
	o += (__u64)at & 63;
	if ((void *)(o + NT_STATIC_OPT_LEN) > data_end)
		return NT_GUARD_MALFORMED;
	if (o[1] == NT_STATIC_OPT_LEN) {
		struct nt_static_key sk = { .protect = c->protect };

		c->mode = NT_MODE_STATIC;
		c->tag = *(__u64 *)(o + 4);
		__builtin_memcpy(sk.token, &c->tag, 8);
		/* Every SYN of a static client carries the same token, so
		 * there is nothing for a replay cache to tell apart. */
		return bpf_map_lookup_elem(&nt_static, &sk) ? NT_GUARD_OK : NT_GUARD_BAD_TAG;
	}
	if (o[1] != NT_MAC_OPT_LEN || (void *)(o + NT_MAC_OPT_LEN) > data_end)
		return NT_GUARD_MALFORMED;
	c->mode = NT_MODE_MAC;
	/* Bytes 6..13 and 12..15: inside the option. */
	c->nonce = *(__u64 *)(o + NT_OPT_NONCE) & NT_NONCE_MASK;
	c->tag = *(__u32 *)(o + NT_OPT_TAG);

	kid = o[4];
	c->key_id = kid;
	if (!((prot->keys[(kid >> 6) & 3] >> (kid & 63)) & 1))
		return NT_GUARD_UNKNOWN_KEY;
	key = bpf_map_lookup_elem(&nt_keys, &kid);
	if (!key || !key->window)
		return NT_GUARD_UNKNOWN_KEY;
	s = bpf_map_lookup_elem(&nt_guard_scratch, &zero);
	if (!s)
		return NT_GUARD_UNKNOWN_KEY;   /* cannot happen: a per-CPU array has slot 0 */

	/* The full epoch closest to ours with the option's low 8 bits: the
	 * signed 8-bit difference, as netoken.token.expand_epoch defines it. */
	cur = nt_epoch(&s->memo, cfg->realtime_minus_tai_ns, key->window);
	delta = (__s8)(__u8)(o[5] - (__u8)cur);
	epoch = cur + delta;
	c->epoch = epoch;
	if (delta > (__s32)cfg->skew || -delta > (__s32)cfg->skew)
		return NT_GUARD_STALE;

	mac = nt_mac(key, cfg->exid, kid, epoch, c->nonce, &p->flow);
	if ((mac & NT_TAG_MASK) != c->tag)
		return NT_GUARD_BAD_TAG;

	return nt_replay_check(c->nonce, c->tag);
}

static __always_inline int event_allowed(const struct nt_guard_config *cfg)
{
	__u32 zero = 0;
	struct nt_bucket *b = bpf_map_lookup_elem(&nt_ev_bucket, &zero);
	/* The coarse clock (one tick per jiffy) costs a fraction of
	 * bpf_ktime_get_ns(); refilling in jiffy steps keeps the average rate
	 * exact, which is all a rate limit needs. */
	__u64 now = bpf_ktime_get_coarse_ns(), elapsed, credit, cap;
	__u64 rate = cfg->event_rate;

	if (!b)
		return 0;
	if (rate > NT_MAX_EVENT_RATE)
		rate = NT_MAX_EVENT_RATE;
	elapsed = now - b->last_ns;
	if (elapsed > NT_MAX_REFILL_NS)
		elapsed = NT_MAX_REFILL_NS;
	b->last_ns = now;
	credit = b->credit + elapsed * rate;
	cap = (__u64)cfg->event_burst * NT_NSEC;
	if (credit > cap)
		credit = cap;
	if (credit < NT_NSEC) {
		b->credit = credit;
		return 0;
	}
	b->credit = credit - NT_NSEC;
	return 1;
}

static __always_inline void emit_event(NT_CTX *ctx, const struct nt_gpkt *p,
				       const struct nt_protect *prot,
				       const struct nt_check *c, __u32 verdict, __u8 action)
{
	struct nt_guard_event *e;

	e = bpf_ringbuf_reserve(&nt_guard_events, sizeof(*e), 0);
	if (!e) {
		count(NT_GUARD_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->ifindex = ctx->ingress_ifindex;
	e->protect = prot->id;
	e->epoch = c->epoch;
	e->family = p->flow.family;
	e->verdict = verdict;
	e->action = action;
	e->mode = c->mode;
	e->key_id = c->key_id;
	__builtin_memcpy(e->saddr, p->flow.saddr, 16);
	__builtin_memcpy(e->daddr, p->flow.daddr, 16);
	e->sport = bpf_ntohs(p->flow.sport);
	e->dport = bpf_ntohs(p->flow.dport);
	if (c->mode == NT_MODE_MAC)
		__builtin_memcpy(e->nonce, &c->nonce, NT_NONCE_LEN);
	__builtin_memcpy(e->tag, &c->tag, 8);
	bpf_ringbuf_submit(e, 0);
	count(NT_GUARD_EVENTS);
}

/* The action for a rejected packet under entry PROT: the --mode override,
 * else the entry's own.  Anything but an explicit monitor drops: a zeroed
 * entry must not open the door. */
static __always_inline __u8 action_of(const struct nt_guard_config *cfg,
				      const struct nt_protect *prot)
{
	__u8 action = cfg->action != NT_ACTION_ENTRY ? cfg->action : prot->action;

	return action == NT_ACTION_MONITOR ? NT_ACTION_MONITOR : NT_ACTION_DROP;
}

/* Outcome of a verdict other than ok: dropped or monitored, and an event if
 * a reader listens and the rate limit lets it through.  Withheld ones are
 * counted, so that events + suppressed + lost == dropped + monitored. */
static __always_inline int reject(NT_CTX *ctx, const struct nt_gpkt *p,
				  struct nt_guard_config *cfg,
				  const struct nt_protect *prot, const struct nt_check *c,
				  __u32 verdict)
{
	__u8 action = action_of(cfg, prot);

	count(action == NT_ACTION_DROP ? NT_GUARD_DROPPED : NT_GUARD_MONITORED);
	if (nt_listening() && event_allowed(cfg))
		emit_event(ctx, p, prot, c, verdict, action);
	else
		count(NT_GUARD_EVENTS_SUPPRESSED);
	return action == NT_ACTION_DROP ? NT_DROP : NT_PASS;
}

/* The pass reason of a verdict that needs a protected address. */
static __always_inline __u32 passed(__u32 verdict)
{
	if (verdict == NT_GUARD_FRAGMENT)
		return NT_GUARD_FRAGMENT_PASSED;
	if (verdict == NT_GUARD_IPV6_EXT)
		return NT_GUARD_IPV6_EXT_PASSED;
	return NT_GUARD_BAD_HEADER_PASSED;
}

/*
 * A fragment, or a packet to an address whose TCP header the guard cannot
 * reach (VERDICT, from parse()).  Without a port, the address decides: if
 * any protect entry covers it, the packet gets VERDICT under the entry that
 * drops (the first in LPM order, so the most specific), or under the first
 * one if they all monitor; the --mode override applies as for SYNs.
 * Otherwise it passes as before.  Rare, so it may cost a loop.
 */
static __noinline int check_unparsed(NT_CTX *ctx, struct nt_gpkt *p, __u32 verdict)
{
	struct nt_guard_config *cfg;
	struct nt_protect *prot = NULL, *e;
	struct nt_port_rules *r;
	struct nt_check c;
	__u32 zero = 0, idx, prot_idx = 0;

	cfg = bpf_map_lookup_elem(&nt_guard_config, &zero);
	if (!cfg) {
		count(NT_GUARD_ERROR);
		return NT_PASS;
	}
	if (verdict == NT_GUARD_FRAGMENT && cfg->fragments == NT_FRAGMENTS_PASS)
		goto pass;
	r = p->flow.family ? nt_lookup_addr(&p->flow) : NULL;
	if (!r)
		goto pass;
	for (int i = 0; i < NT_MAX_PORT_RULES; i++) {
		if (i >= r->count)
			break;
		idx = r->rules[i].policy;
		e = bpf_map_lookup_elem(&nt_protect, &idx);
		if (!e)
			continue;
		if (!prot || action_of(cfg, e) == NT_ACTION_DROP) {
			prot = e;
			prot_idx = idx;
		}
		if (action_of(cfg, prot) == NT_ACTION_DROP)
			break;
	}
	if (!prot)
		goto pass;
	count(verdict);
	__builtin_memset(&c, 0, sizeof(c));
	c.protect = prot_idx;
	return reject(ctx, p, cfg, prot, &c, verdict);
pass:
	count(passed(verdict));
	return NT_PASS;
}

SEC(NT_SEC)
int netoken_guard(NT_CTX *ctx)
{
	struct nt_guard_config *cfg;
	struct nt_protect *prot;
	struct nt_gpkt p;
	struct nt_check c;
	__u32 zero = 0, idx;
	int verdict;

	/* Most of what arrives: counted in a few loads, nothing copied. */
	if (nt_plainly_not_syn((void *)(long)ctx->data, (void *)(long)ctx->data_end)) {
		count(NT_GUARD_NOT_SYN);
		return NT_PASS;
	}
	verdict = parse(ctx, &p);
#ifdef NT_HOOK_TC
	if (nt_cut_short(ctx, verdict, &p)) {
		nt_pull(ctx);
		verdict = parse(ctx, &p);
	}
#endif
	if (verdict == NT_GUARD_FRAGMENT || verdict == NT_GUARD_IPV6_EXT ||
	    verdict == NT_GUARD_BAD_HEADER)
		return check_unparsed(ctx, &p, verdict);
	if (verdict != NT_CANDIDATE) {
		count(verdict);
		return NT_PASS;
	}
	cfg = bpf_map_lookup_elem(&nt_guard_config, &zero);
	if (!cfg) {
		count(NT_GUARD_ERROR);
		return NT_PASS;
	}
	if (!nt_lookup_dest_cached(&p.flow, cfg->generation, &idx)) {
		count(NT_GUARD_UNPROTECTED);
		return NT_PASS;
	}
	prot = bpf_map_lookup_elem(&nt_protect, &idx);
	if (!prot) {
		count(NT_GUARD_ERROR);
		return NT_PASS;
	}

	__builtin_memset(&c, 0, sizeof(c));
	c.protect = idx;
	verdict = nt_check(ctx, &p, cfg, prot, &c);
	count(verdict);
	if (c.mode == NT_MODE_MAC)
		count_key(c.key_id, verdict == NT_GUARD_OK ? NT_KEY_STAT_OK : NT_KEY_STAT_BAD);
	if (verdict == NT_GUARD_OK)
		return NT_PASS;
	return reject(ctx, &p, cfg, prot, &c, verdict);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
