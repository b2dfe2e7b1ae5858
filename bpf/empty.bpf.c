// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/* Programs that do nothing: the floor every benchmark is measured against
 * (BPF_PROG_TEST_RUN overhead, skb/xdp_buff setup included). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int netoken_empty_tc(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

SEC("xdp")
int netoken_empty_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
