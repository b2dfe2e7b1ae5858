/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Every struct and enum that crosses the kernel/user boundary lives here and
 * nowhere else.  netoken/layout.py mirrors it with ctypes, and
 * tests/unit/test_layout.py compares that mirror against the BTF of the compiled
 * objects, so a field added on one side only fails the test suite.
 *
 * Fixed-width types only, explicit padding, no bitfields: the layout must be
 * identical for clang -target bpf and for the host ABI Python uses.
 */
#ifndef NETOKEN_H
#define NETOKEN_H

#ifndef __u8
#include <linux/types.h>
#endif

/* Wire format (design.md §2). */
#define NT_MAC_OPT_LEN     16
#define NT_STATIC_OPT_LEN  12
#define NT_TAG_LEN         4
#define NT_NONCE_LEN       6
#define NT_OPT_NONCE       6     /* offsets in a mac-mode option */
#define NT_OPT_TAG         12
#define NT_TCPOPT_TS       8     /* Timestamps (RFC 7323), the option make-room removes */
#define NT_TCPOLEN_TS      10
#define NT_MAX_TCP_OPTS    40
#define NT_TCPOPT_EOL      0
#define NT_TCPOPT_NOP      1

#define NT_MODE_MAC        1
#define NT_MODE_STATIC     2

/* Extra MAC inputs a key may bind (bitmask, same values as netoken/token.py). */
#define NT_BIND_SADDR      1
#define NT_BIND_SPORT      2

#define NT_MAX_KEYS        256
/* Port rules per destination prefix, after the control plane has folded the
 * rules of every covering (less specific) prefix into it. */
#define NT_MAX_PORT_RULES  32
#define NT_MAX_POLICIES    4096

/* Marker counters: every packet the marker sees bumps exactly one reason. */
enum nt_mark_reason {
	NT_MARK_MARKED = 0,       /* option inserted, SYN without payload */
	NT_MARK_MARKED_PAYLOAD,   /* option inserted before SYN payload (TFO) */
	NT_MARK_NO_POLICY,        /* SYN to a destination/port without policy */
	NT_MARK_NO_ROOM,          /* TCP header would exceed 60 bytes */
	NT_MARK_PAYLOAD,          /* SYN payload too large to move: passed unmarked */
	NT_MARK_NOT_IPV4_OR_6,
	NT_MARK_NOT_TCP,
	NT_MARK_NOT_SYN,          /* TCP but not SYN && !ACK */
	NT_MARK_FRAGMENT,
	NT_MARK_IPV6_EXT,         /* IPv6 extension headers it does not skip (AH, ESP, >4) */
	NT_MARK_MALFORMED,        /* truncated header, bogus doff/ihl/lengths */
	NT_MARK_NO_KEY,           /* policy names a key that is not loaded */
	NT_MARK_ERROR,            /* a helper failed: packet passed unchanged */
	NT_MARK_EVENTS_LOST,      /* not a packet reason: ring buffer was full */
	NT_MARK_ROOM_FROM_TS,     /* not a packet reason: a marked SYN (counted as
				   * marked or marked_payload) whose Timestamps
				   * option was removed to make room (design.md §3) */
	NT_MARK_REASON_MAX,
};

/* Global settings, one entry in an array map so `netoken apply` can change
 * them without reattaching. */
struct nt_config {
	__u8  kind;
	__u8  make_room;         /* 1: remove Timestamps when the option does not fit */
	__u16 exid;              /* host byte order */
	__u32 generation;        /* bumped by every configure (netoken/marker.py,
				  * netoken/entries.py):
				  * its low bit is the half of the policy array
				  * that is live, and the destination cache
				  * (bpf/dest.h) keeps what it looked up under
				  * one generation only */
	/* CLOCK_REALTIME - CLOCK_TAI in ns, maintained by user space.  BPF has
	 * no realtime clock, but CLOCK_TAI (bpf_ktime_get_tai_ns) follows every
	 * step of the realtime clock, so only the TAI-UTC offset (whole seconds,
	 * changed at most at a leap second or when NTP first sets it) has to
	 * come from user space. */
	__s64 realtime_minus_tai_ns;
};

struct nt_key {
	__u64 k0;                /* key bytes 0..7 as little-endian u64 */
	__u64 k1;                /* key bytes 8..15 as little-endian u64 */
	__u32 window;            /* seconds per epoch; 0 = slot unused */
	__u8  bind;              /* NT_BIND_* */
	__u8  pad[3];
};

struct nt_policy {
	__u32 id;                /* index into the control plane's policy list */
	__u8  mode;              /* NT_MODE_* */
	__u8  key_id;
	__u8  pad[2];
	__u8  token[8];          /* static mode, network byte order */
};

struct nt_port_rule {
	__u16 lo;                /* host byte order, inclusive */
	__u16 hi;
	__u32 policy;            /* index into the policies map */
};

/* LPM trie values: the port rules of one destination prefix, in match order. */
struct nt_port_rules {
	__u32 count;
	struct nt_port_rule rules[NT_MAX_PORT_RULES];
};

struct nt_lpm_v4 {
	__u32 prefixlen;
	__u8  addr[4];
};

struct nt_lpm_v6 {
	__u32 prefixlen;
	__u8  addr[16];
};

/* One ring-buffer record per marked SYN. */
struct nt_mark_event {
	__u64 ts_ns;             /* bpf_ktime_get_ns() */
	__u32 ifindex;
	__u32 policy;
	__u32 epoch;             /* full 32-bit epoch covered by the MAC */
	__u8  family;            /* 4 or 6 */
	__u8  mode;
	__u8  key_id;
	__u8  reason;            /* NT_MARK_MARKED or NT_MARK_MARKED_PAYLOAD */
	__u8  saddr[16];         /* IPv4 in the first 4 bytes */
	__u8  daddr[16];
	__u16 sport;             /* host byte order */
	__u16 dport;
	__u8  nonce[NT_NONCE_LEN];   /* as on the wire */
	__u8  room_from_ts;      /* 1: the Timestamps option was removed to make room */
	__u8  pad0;
	__u8  tag[8];            /* mac: NT_TAG_LEN bytes; static: the token */
	__u8  pad1[4];
};

/* ------------------------------------------------------------------ guard */

#define NT_MAX_PROTECT     4096  /* protect entries, both halves (see netoken/entries.py) */
#define NT_MAX_STATIC      4096  /* accepted static tokens, all entries together */
#define NT_MAX_EVENT_RATE  1000000   /* events per second per CPU */
#define NT_KEY_STAT_OK     0     /* nt_key_stats index: key id * 2 + NT_KEY_STAT_* */
#define NT_KEY_STAT_BAD    1

/* Guard counters.  Every packet the guard sees bumps exactly one of the
 * verdicts (a SYN to a protected destination, or a packet to a protected
 * address it cannot check: design.md §2 "Fragments", "Fail closed") or one of
 * the pass reasons (anything else, passed without a look at its options).
 * The outcomes after them are counted on top of a verdict. */
enum nt_guard_reason {
	NT_GUARD_OK = 0,
	NT_GUARD_MISSING,         /* no option with our kind and ExID */
	NT_GUARD_MALFORMED,       /* broken option list, two of ours, wrong length,
				   * bogus doff, options past the IP packet */
	NT_GUARD_UNKNOWN_KEY,     /* key id not accepted at this destination */
	NT_GUARD_STALE,           /* epoch more than skew away from ours */
	NT_GUARD_BAD_TAG,         /* MAC or static token does not match */
	NT_GUARD_REPLAY,          /* (key id, epoch, nonce, tag) seen before */
	NT_GUARD_FRAGMENT,        /* TCP fragment to a protected address */
	NT_GUARD_IPV6_EXT,        /* to a protected address: IPv6 extension chain
				   * longer than the walk, or a header it cannot walk */
	NT_GUARD_BAD_HEADER,      /* to a protected address: extension chain or TCP
				   * header cut short */
	NT_GUARD_NOT_SYN,         /* TCP but not SYN && !ACK */
	NT_GUARD_UNPROTECTED,     /* SYN to a destination/port no entry protects */
	NT_GUARD_NOT_TCP,         /* includes ESP (see docs/operations.md) */
	NT_GUARD_NOT_IPV4_OR_6,
	NT_GUARD_FRAGMENT_PASSED, /* fragment: not TCP, address not protected, or
				   * [guard] fragments = "pass" */
	NT_GUARD_IPV6_EXT_PASSED, /* as ipv6_ext, address not protected */
	NT_GUARD_BAD_HEADER_PASSED, /* as bad_header, address not protected, or no
				   * readable IP header (the kernel drops those) */
	NT_GUARD_DROPPED,         /* outcome: a rejected SYN was dropped */
	NT_GUARD_MONITORED,       /* outcome: a rejected SYN was passed (monitor) */
	NT_GUARD_EVENTS,          /* outcome: event written to the ring buffer */
	NT_GUARD_EVENTS_SUPPRESSED, /* outcome: event withheld: by the rate limit, or
				   * because no reader listens */
	NT_GUARD_EVENTS_LOST,     /* outcome: ring buffer full */
	NT_GUARD_ERROR,           /* a map the guard needs was missing: SYN passed */
	NT_GUARD_REASON_MAX,
};

/* What happens to a rejected SYN. */
enum nt_guard_action {
	NT_ACTION_ENTRY = 0,      /* nt_guard_config only: each entry's own action */
	NT_ACTION_DROP,
	NT_ACTION_MONITOR,        /* count, event, XDP_PASS */
};

/* [guard] fragments: what happens to TCP fragments to protected addresses.
 * Zero (a config never written) drops. */
enum nt_guard_fragments {
	NT_FRAGMENTS_DROP = 0,
	NT_FRAGMENTS_PASS,
};

struct nt_guard_config {
	__u8  kind;
	__u8  skew;              /* epochs of tolerance either side */
	__u16 exid;              /* host byte order */
	__u32 generation;        /* as in struct nt_config; the low bit is the
				  * live half of nt_protect */
	__s64 realtime_minus_tai_ns;   /* as in struct nt_config */
	__u32 event_rate;        /* events per second, per CPU */
	__u32 event_burst;       /* bucket depth, per CPU */
	__u8  action;            /* NT_ACTION_*: override for every entry, or ENTRY */
	__u8  fragments;         /* enum nt_guard_fragments */
	__u8  pad[6];
};

/* One [[guard.protect]] entry; the LPM rules point here. */
struct nt_protect {
	__u32 id;                /* index in the config's protect list */
	__u8  action;            /* NT_ACTION_DROP or NT_ACTION_MONITOR */
	__u8  pad[3];
	__u64 keys[NT_MAX_KEYS / 64];  /* accepted key ids: bit (id % 64) of keys[id / 64] */
};

/* Hash key of the static tokens an entry accepts (value: __u32, unused). */
struct nt_static_key {
	__u32 protect;           /* index into nt_protect */
	__u8  token[8];          /* network byte order, as on the wire */
};

/* Replay cache (BPF_MAP_TYPE_ARRAY of __u64 slots, a power of two of them):
 * what a slot holds for an accepted mac token, and where it goes.  NONCE and
 * TAG are the option's bytes loaded little-endian into zeroed integers.
 * netoken/layout.py computes the same to move entries between sizes. */
#define NT_REPLAY_ENTRY(nonce, tag) (((__u64)(nonce) << 16) | ((__u64)(tag) & 0xffff))
#define NT_REPLAY_HASH_MUL 0x9E3779B97F4A7C15ULL
#define NT_REPLAY_INDEX(v) ((__u32)(((__u64)(v) * NT_REPLAY_HASH_MUL) >> 32))

/* One ring-buffer record per rejected SYN (dropped or monitored). */
struct nt_guard_event {
	__u64 ts_ns;             /* bpf_ktime_get_ns() */
	__u32 ifindex;           /* ingress */
	__u32 protect;           /* struct nt_protect.id */
	__u32 epoch;             /* reconstructed full epoch; 0 if none was */
	__u8  family;            /* 4 or 6 */
	__u8  verdict;           /* enum nt_guard_reason, a verdict */
	__u8  action;            /* NT_ACTION_DROP or NT_ACTION_MONITOR */
	__u8  mode;              /* NT_MODE_* of the option; 0 if none was parsed */
	__u8  key_id;
	__u8  pad0[3];
	__u8  saddr[16];         /* IPv4 in the first 4 bytes */
	__u8  daddr[16];
	__u16 sport;             /* host byte order */
	__u16 dport;
	__u8  nonce[NT_NONCE_LEN];   /* as on the wire */
	__u8  pad1[2];
	__u8  tag[8];            /* mac: NT_TAG_LEN bytes; static: the token */
};

#endif /* NETOKEN_H */
