/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The MAC of design.md §2, shared by the marker (which computes tags) and the
 * guard (which recomputes them).  The message is
 *   ExID(2) ‖ key id(1) ‖ epoch(4) ‖ nonce(6) ‖ daddr(4|16) ‖ dport(2)
 *   [‖ saddr(4|16)] [‖ sport(2)]
 * in network byte order, built in a zeroed buffer of little-endian words
 * for nt_siphash24().
 */
#ifndef NETOKEN_TOKEN_H
#define NETOKEN_TOKEN_H

#include "netoken.h"
#include "siphash.h"

struct nt_flow {
	__u8  family;            /* 4 or 6 */
	__u8  pad;
	__be16 sport;
	__be16 dport;
	__u8  pad2[2];
	__u8  saddr[16];
	__u8  daddr[16];
};

static __always_inline __u32 nt_put_addr(__u8 *b, __u32 off,
					 const __u8 *addr, __u8 family)
{
	if (family == 4) {
		__builtin_memcpy(b + off, addr, 4);
		return off + 4;
	}
	__builtin_memcpy(b + off, addr, 16);
	return off + 16;
}

static __always_inline void nt_put_be16(__u8 *b, __u32 off, __be16 v)
{
	__builtin_memcpy(b + off, &v, 2);
}

/* First 8 bytes of SipHash-2-4 as a little-endian u64; the tag is its first
 * NT_TAG_LEN bytes in memory order (i.e. the little-endian serialization). */
static __always_inline __u64 nt_mac(const struct nt_key *key, __u16 exid,
				    __u8 key_id, __u32 epoch, const __u8 nonce[NT_NONCE_LEN],
				    const struct nt_flow *f, __u64 msg[NT_SIP_MAX_WORDS])
{
	__u8 *b = (__u8 *)msg;
	__be32 be_epoch = bpf_htonl(epoch);
	__u32 off;

#pragma unroll
	for (int i = 0; i < NT_SIP_MAX_WORDS; i++)
		msg[i] = 0;

	nt_put_be16(b, 0, bpf_htons(exid));
	b[2] = key_id;
	__builtin_memcpy(b + 3, &be_epoch, 4);
	__builtin_memcpy(b + 7, nonce, NT_NONCE_LEN);
	off = nt_put_addr(b, 7 + NT_NONCE_LEN, f->daddr, f->family);
	nt_put_be16(b, off, f->dport);
	off += 2;
	if (key->bind & NT_BIND_SADDR)
		off = nt_put_addr(b, off, f->saddr, f->family);
	if (key->bind & NT_BIND_SPORT) {
		nt_put_be16(b, off, f->sport);
		off += 2;
	}
	return nt_siphash24(key->k0, key->k1, msg, off);
}

#endif /* NETOKEN_TOKEN_H */
