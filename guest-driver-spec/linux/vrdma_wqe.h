/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Ring slots and work queue entries of the relayed data path (spec 10.2 to 10.4), written the same way by the
 * module for kernel QPs (datapath.c) and by the libibverbs provider for user QPs (../linux-provider/datapath.c,
 * which scripts/linux-guest/provider.sh builds with a copy of this header). Included after the includer's
 * virtio_rdma.h, which brings spec.h and its verbs API: the kernel's (ib_*, IB_*) or libibverbs' (ibv_*, IBV_*).
 * Errors are the includer's convention: -errno in the kernel, errno in the provider.
 */
#ifndef VRDMA_WQE_H
#define VRDMA_WQE_H

#ifdef __KERNEL__
#include <linux/string.h>
#define VRDMA_API(name) IB_##name
typedef struct ib_sge vrdma_api_sge;
#define vrdma_err(e) (-(e))
#define vrdma_le32(x) cpu_to_le32(x)
#define vrdma_le64(x) cpu_to_le64(x)
#define vrdma_be32_to_cpu(x) be32_to_cpu(x)
#else
#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <endian.h>
#define VRDMA_API(name) IBV_##name
typedef struct ibv_sge vrdma_api_sge;
#define vrdma_err(e) (e)
#define vrdma_le32(x) htole32(x)
#define vrdma_le64(x) htole64(x)
#define vrdma_be32_to_cpu(x) be32toh(x)
#endif

/* Whether a ring of `depth` entries is full: never more than the depth ahead of the consumer (spec 10.10). */
static inline bool vrdma_ring_full(u32 prod, u32 cons, u32 depth)
{
	return prod - cons >= depth;
}

/* Entry `index` (free-running) of a ring of `depth` entries, a power of two, of `size` bytes each. */
static inline void *vrdma_ring_entry(void *ring, u32 index, u32 depth, size_t size)
{
	return (u8 *)ring + (size_t)(index & (depth - 1)) * size;
}

/* The WQE opcode of a verbs send opcode; an error for one that version 1 does not have (spec 10.3). */
static inline int vrdma_wqe_opcode(int op, u8 *out)
{
	switch (op) {
	case VRDMA_API(WR_RDMA_WRITE): *out = VRDMA_WR_RDMA_WRITE; return 0;
	case VRDMA_API(WR_RDMA_WRITE_WITH_IMM): *out = VRDMA_WR_RDMA_WRITE_WITH_IMM; return 0;
	case VRDMA_API(WR_SEND): *out = VRDMA_WR_SEND; return 0;
	case VRDMA_API(WR_SEND_WITH_IMM): *out = VRDMA_WR_SEND_WITH_IMM; return 0;
	case VRDMA_API(WR_RDMA_READ): *out = VRDMA_WR_RDMA_READ; return 0;
	case VRDMA_API(WR_ATOMIC_CMP_AND_SWP): *out = VRDMA_WR_ATOMIC_CMP_AND_SWP; return 0;
	case VRDMA_API(WR_ATOMIC_FETCH_AND_ADD): *out = VRDMA_WR_ATOMIC_FETCH_AND_ADD; return 0;
	default: return vrdma_err(EOPNOTSUPP);
	}
}

/*
 * The fields every send WQE has, into a zeroed `w`: opcode, wr_id, the flags, and the immediate (big-endian in
 * both verbs APIs, little-endian in the WQE, spec 1.3).
 */
static inline int vrdma_wqe_send_header(struct vrdma_send_wqe *w, int op, u64 wr_id, unsigned int send_flags,
					__be32 imm_data)
{
	int ret = vrdma_wqe_opcode(op, &w->opcode);

	if (ret)
		return ret;
	w->wr_id = vrdma_le64(wr_id);
	if (send_flags & VRDMA_API(SEND_SIGNALED))
		w->flags |= VRDMA_SEND_SIGNALED;
	if (send_flags & VRDMA_API(SEND_SOLICITED))
		w->flags |= VRDMA_SEND_SOLICITED;
	if (send_flags & VRDMA_API(SEND_FENCE))
		w->flags |= VRDMA_SEND_FENCE;
	if (op == VRDMA_API(WR_SEND_WITH_IMM) || op == VRDMA_API(WR_RDMA_WRITE_WITH_IMM))
		w->imm_data = vrdma_le32(vrdma_be32_to_cpu(imm_data));
	return 0;
}

/*
 * A send WQE's payload: with SEND_INLINE the SGEs' bytes copied into the WQE (addresses this CPU reads: user
 * addresses in the provider, kernel virtual ones in the module, main.c), at most `max_inline` bytes and only for
 * SEND and WRITE (spec 10.3: the device would fail the WQE, LOC_QP_OP_ERR); otherwise the gather list, at most
 * `max_sge` entries.
 */
static inline int vrdma_wqe_send_payload(struct vrdma_send_wqe *w, int op, unsigned int send_flags,
					 const vrdma_api_sge *sg, int num_sge, u32 max_inline, u32 max_sge)
{
	u32 len = 0;
	int i;

	if (send_flags & VRDMA_API(SEND_INLINE)) {
		if (op != VRDMA_API(WR_SEND) && op != VRDMA_API(WR_SEND_WITH_IMM) &&
		    op != VRDMA_API(WR_RDMA_WRITE) && op != VRDMA_API(WR_RDMA_WRITE_WITH_IMM))
			return vrdma_err(EINVAL);
		for (i = 0; i < num_sge; i++) {
			if (sg[i].length > max_inline - len)
				return vrdma_err(EINVAL);
			memcpy(w->payload.inline_data + len, (void *)(uintptr_t)sg[i].addr, sg[i].length);
			len += sg[i].length;
		}
		w->flags |= VRDMA_SEND_INLINE;
		w->inline_length = vrdma_le32(len);
		return 0;
	}
	if (num_sge < 0 || (u32)num_sge > max_sge)
		return vrdma_err(EINVAL);
	w->num_sge = num_sge;
	for (i = 0; i < num_sge; i++) {
		w->payload.sge[i].addr = vrdma_le64(sg[i].addr);
		w->payload.sge[i].length = vrdma_le32(sg[i].length);
		w->payload.sge[i].lkey = vrdma_le32(sg[i].lkey);
	}
	return 0;
}

/* A receive WQE (spec 10.4): wr_id and the scatter list, at most `max_sge` entries; `w` is zeroed first. */
static inline int vrdma_wqe_recv(struct vrdma_recv_wqe *w, u64 wr_id, const vrdma_api_sge *sg, int num_sge,
				 u32 max_sge)
{
	int i;

	if (num_sge < 0 || (u32)num_sge > max_sge)
		return vrdma_err(EINVAL);
	memset(w, 0, sizeof(*w));
	w->wr_id = vrdma_le64(wr_id);
	w->num_sge = vrdma_le32(num_sge);
	for (i = 0; i < num_sge; i++) {
		w->sge[i].addr = vrdma_le64(sg[i].addr);
		w->sge[i].length = vrdma_le32(sg[i].length);
		w->sge[i].lkey = vrdma_le32(sg[i].lkey);
	}
	return 0;
}

#endif
