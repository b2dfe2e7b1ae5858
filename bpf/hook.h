/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The guard's hook, chosen when an object is compiled (Makefile): one C
 * source, one object per hook, so no packet pays for a branch on where it
 * runs.
 *
 *   default        XDP: struct xdp_md, XDP_PASS / XDP_DROP
 *   -DNT_HOOK_TC   TC (clsact ingress, direct-action): struct __sk_buff,
 *                  TC_ACT_UNSPEC (the next filter, if any, still runs) /
 *                  TC_ACT_SHOT
 *
 * Both contexts have data, data_end and ingress_ifindex, which is all the
 * shared code reads.  The link layer (Ethernet or none) is the other
 * compile-time choice: NT_L3, see parse_l2() in parsing.h.
 */
#ifndef NETOKEN_HOOK_H
#define NETOKEN_HOOK_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#ifdef NT_HOOK_TC
#define NT_CTX  struct __sk_buff
#define NT_SEC  "tc"
#define NT_PASS TC_ACT_UNSPEC
#define NT_DROP TC_ACT_SHOT
#else
#define NT_CTX  struct xdp_md
#define NT_SEC  "xdp"
#define NT_PASS XDP_PASS
#define NT_DROP XDP_DROP
#endif

#endif /* NETOKEN_HOOK_H */
