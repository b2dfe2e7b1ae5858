/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * SipHash-2-4 (Aumasson & Bernstein) for BPF, over a zero-padded message of at
 * most NT_SIP_MAX_WORDS * 8 - 1 bytes.  Fully unrolled with constant offsets,
 * so the verifier sees straight-line code and no variable stack access.
 * netoken/token.py is the reference it must agree with byte for byte.
 */
#ifndef NETOKEN_SIPHASH_H
#define NETOKEN_SIPHASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

/* ExID 2 + key id 1 + epoch 4 + nonce 6 + daddr 16 + dport 2 + saddr 16 + sport 2 */
#define NT_SIP_MAX_MSG   49
#define NT_SIP_MAX_WORDS 7

#define NT_ROTL(x, b) (__u64)(((x) << (b)) | ((x) >> (64 - (b))))

#define NT_SIPROUND                                                      \
	do {                                                             \
		v0 += v1; v1 = NT_ROTL(v1, 13); v1 ^= v0; v0 = NT_ROTL(v0, 32); \
		v2 += v3; v3 = NT_ROTL(v3, 16); v3 ^= v2;                \
		v0 += v3; v3 = NT_ROTL(v3, 21); v3 ^= v0;                \
		v2 += v1; v1 = NT_ROTL(v1, 17); v1 ^= v2; v2 = NT_ROTL(v2, 32); \
	} while (0)

/* msg holds the message as little-endian 64-bit words, zero past len.
 * BPF is little-endian on every host netoken targets (bpfel); a big-endian
 * build would have to byte-swap each word here. */
static __always_inline __u64 nt_siphash24(__u64 k0, __u64 k1,
					  const __u64 *msg, __u32 len)
{
	__u64 v0 = k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = k1 ^ 0x7465646279746573ULL;
	__u32 last = len / 8;   /* index of the word carrying the length byte */
	__u64 m;

#pragma unroll
	for (int i = 0; i < NT_SIP_MAX_WORDS; i++) {
		m = msg[i];
		if (i == last)
			m |= (__u64)len << 56;
		v3 ^= m;
		NT_SIPROUND;
		NT_SIPROUND;
		v0 ^= m;
		if (i == last)
			break;
	}
	v2 ^= 0xff;
	NT_SIPROUND;
	NT_SIPROUND;
	NT_SIPROUND;
	NT_SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

#endif /* NETOKEN_SIPHASH_H */
