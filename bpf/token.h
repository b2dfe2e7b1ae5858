/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The MAC of design.md §2, shared by the marker (which computes tags) and the
 * guard (which recomputes them).  The message is
 *   ExID(2) ‖ key id(1) ‖ epoch(4) ‖ nonce(6) ‖ daddr(4|16) ‖ dport(2)
 *   [‖ saddr(4|16)] [‖ sport(2)]
 * in network byte order, as little-endian 64-bit words for nt_siphash24().
 */
#ifndef NETOKEN_TOKEN_H
#define NETOKEN_TOKEN_H

#include <bpf/bpf_endian.h>

#include "netoken.h"
#include "siphash.h"

#define NT_NSEC         1000000000ULL
#define NT_NONCE_MASK   ((1ULL << (NT_NONCE_LEN * 8)) - 1)

/* Aligned so that the addresses read as whole words (nt_mac()). */
struct nt_flow {
	__u8  family;            /* 4 or 6 */
	__u8  pad;
	__be16 sport;
	__be16 dport;
	__u8  pad2[2];
	__u8  saddr[16];
	__u8  daddr[16];
} __attribute__((aligned(8)));

/* The epoch of a key with WINDOW seconds per epoch, now: Unix time as
 * CLOCK_REALTIME gives it (design.md §2), from CLOCK_TAI and the offset user
 * space keeps (struct nt_config).  One division: floor(floor(t / a) / b) ==
 * floor(t / (a * b)). */
static __always_inline __u32 nt_epoch_now(__s64 realtime_minus_tai_ns, __u32 window)
{
	return (bpf_ktime_get_tai_ns() + realtime_minus_tai_ns) / (window * NT_NSEC);
}

/* The 64-bit word of a u32 or two u64 in FLOW's address bytes (as on the
 * wire, loaded little-endian like every message word). */
#define NT_W32(a)     ((__u64)*(const __u32 *)(a))
#define NT_W64(a, i)  (((const __u64 *)(a))[i])

/*
 * First 8 bytes of SipHash-2-4 as a little-endian u64; the tag is its first
 * NT_TAG_LEN bytes in memory order (i.e. the little-endian serialization).
 * NONCE: the option's nonce bytes loaded little-endian (the low 48 bits).
 *
 * The message words are put together in registers rather than written a
 * byte at a time into a buffer and read back as words: the bytes after the
 * 13-byte head (daddr, dport, saddr, sport) are first laid out as words t[]
 * of their own, and every message word after the first is then the same
 * shift of two neighbours: m[k + 1] = t[k - 1] >> 24 | t[k] << 40.
 */
static __always_inline __u64 nt_mac(const struct nt_key *key, __u16 exid, __u8 key_id,
				    __u32 epoch, __u64 nonce, const struct nt_flow *f)
{
	__u64 t[5] = {}, m[NT_SIP_MAX_WORDS];
	__u64 sport = f->sport, dport = f->dport;
	__u32 len;

	if (f->family == 4) {
		__u64 s = NT_W32(f->saddr);

		t[0] = NT_W32(f->daddr) | dport << 32;
		len = 6;
		if (key->bind & NT_BIND_SADDR) {
			t[0] |= s << 48;
			t[1] = s >> 16;
			len = 10;
		}
		if (key->bind & NT_BIND_SPORT) {
			if (len == 10)
				t[1] |= sport << 16;
			else
				t[0] |= sport << 48;
			len += 2;
		}
	} else {
		__u64 s0 = NT_W64(f->saddr, 0), s1 = NT_W64(f->saddr, 1);

		t[0] = NT_W64(f->daddr, 0);
		t[1] = NT_W64(f->daddr, 1);
		t[2] = dport;
		len = 18;
		if (key->bind & NT_BIND_SADDR) {
			t[2] |= s0 << 16;
			t[3] = s0 >> 48 | s1 << 16;
			t[4] = s1 >> 48;
			len = 34;
		}
		if (key->bind & NT_BIND_SPORT) {
			if (len == 34)
				t[4] |= sport << 16;
			else
				t[2] |= sport << 16;
			len += 2;
		}
	}
	m[0] = (__u64)bpf_htons(exid) | (__u64)key_id << 16 | (__u64)bpf_htonl(epoch) << 24 |
	       nonce << 56;
	m[1] = (nonce & NT_NONCE_MASK) >> 8 | t[0] << 40;
#pragma unroll
	for (int k = 1; k < 5; k++)
		m[k + 1] = t[k - 1] >> 24 | t[k] << 40;
	m[6] = t[4] >> 24;
	return nt_siphash24(key->k0, key->k1, m, 7 + NT_NONCE_LEN + len);
}

#endif /* NETOKEN_TOKEN_H */
