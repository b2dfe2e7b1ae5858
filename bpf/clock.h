/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * What the marker and the guard need of time, at the least cost per SYN.
 * A clock helper is dearer than it looks: bpf_ktime_get_tai_ns() and
 * bpf_ktime_get_coarse_ns() each cost more than the SipHash of a token on
 * the machines netoken was measured on (bench/README.md), while
 * bpf_jiffies64() is inlined to one load.
 */
#ifndef NETOKEN_CLOCK_H
#define NETOKEN_CLOCK_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "token.h"

/* The epoch last read from the clock on this CPU, and until when it holds. */
struct nt_epoch_memo {
	__u64 until;             /* jiffies64: valid while below */
	__s64 offset;            /* the realtime_minus_tai_ns it was read with */
	__u32 window;            /* ... and the key's window */
	__u32 epoch;
};

/* The longest a jiffy lasts (HZ >= 100): counted in these, the time left in
 * an epoch is never overstated, whatever HZ the kernel has. */
#define NT_JIFFY_NS_MAX  10000000ULL
/* Read the clock again after at most this many jiffies (a second at most), so
 * that a stepped clock is followed within a second. */
#define NT_MEMO_JIFFIES  100

/*
 * nt_epoch_now() for WINDOW and OFFSET, read from the clock at most every
 * NT_MEMO_JIFFIES jiffies per CPU and never past the end of the epoch: the
 * memo is kept valid one jiffy less than the time left in it, as jiffies
 * can lag the clock by a tick.  So the result is the clock's, except for at
 * most a second after the clock was stepped.
 */
static __always_inline __u32 nt_epoch(struct nt_epoch_memo *m, __s64 offset, __u32 window)
{
	__u64 j = bpf_jiffies64(), now, period, left;

	if (j < m->until && m->window == window && m->offset == offset)
		return m->epoch;
	now = bpf_ktime_get_tai_ns() + offset;
	period = window * NT_NSEC;
	m->epoch = now / period;
	m->window = window;
	m->offset = offset;
	left = (m->epoch + 1ULL) * period - now;
	left /= NT_JIFFY_NS_MAX;
	m->until = j + (left > NT_MEMO_JIFFIES ? NT_MEMO_JIFFIES : left) - 1;
	return m->epoch;
}

/* The readers' heartbeat: a CLOCK_MONOTONIC deadline that each reader of
 * the events pushes forward while it runs (netoken/program.py), 0 when
 * nobody does.  A map of its own, so that a reader writes nothing else. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} nt_listen SEC(".maps");

/*
 * Whether a reader follows the events.  Nobody listening costs a load; an
 * expired deadline is set back to 0 here, so a reader that died costs the
 * clock read only once.
 */
static __always_inline int nt_listening(void)
{
	__u32 zero = 0;
	__u64 *until = bpf_map_lookup_elem(&nt_listen, &zero), u;

	if (!until)
		return 0;
	u = *(volatile __u64 *)until;
	if (!u)
		return 0;
	if (bpf_ktime_get_coarse_ns() < u)
		return 1;
	__sync_val_compare_and_swap(until, u, 0);
	return 0;
}

#endif /* NETOKEN_CLOCK_H */
