// SPDX-License-Identifier: GPL-2.0
/*
 * The relayed data path of version 1 (spec 10) for kernel consumers: post_send and post_recv write WQEs into the
 * rings, store-release producer_index, then ring one doorbell record for the whole batch. For a user QP the
 * provider does the writing and these only ring the doorbell.
 */
#include <linux/string.h>
#include "virtio_rdma.h"

static int vrdma_send_opcode(enum ib_wr_opcode op, u8 *out)
{
	switch (op) {
	case IB_WR_RDMA_WRITE: *out = VRDMA_WR_RDMA_WRITE; return 0;
	case IB_WR_RDMA_WRITE_WITH_IMM: *out = VRDMA_WR_RDMA_WRITE_WITH_IMM; return 0;
	case IB_WR_SEND: *out = VRDMA_WR_SEND; return 0;
	case IB_WR_SEND_WITH_IMM: *out = VRDMA_WR_SEND_WITH_IMM; return 0;
	case IB_WR_RDMA_READ: *out = VRDMA_WR_RDMA_READ; return 0;
	case IB_WR_ATOMIC_CMP_AND_SWP: *out = VRDMA_WR_ATOMIC_CMP_AND_SWP; return 0;
	case IB_WR_ATOMIC_FETCH_AND_ADD: *out = VRDMA_WR_ATOMIC_FETCH_AND_ADD; return 0;
	default: return -EOPNOTSUPP; /* no other opcode exists in version 1 (spec 10.3) */
	}
}

static int vrdma_build_send(struct vrdma_qp *qp, const struct ib_send_wr *wr, struct vrdma_send_wqe *w)
{
	int i, ret = vrdma_send_opcode(wr->opcode, &w->opcode);

	if (ret)
		return ret;
	w->wr_id = cpu_to_le64(wr->wr_id);
	if (wr->send_flags & IB_SEND_SIGNALED)
		w->flags |= VRDMA_SEND_SIGNALED;
	if (wr->send_flags & IB_SEND_SOLICITED)
		w->flags |= VRDMA_SEND_SOLICITED;
	if (wr->send_flags & IB_SEND_FENCE)
		w->flags |= VRDMA_SEND_FENCE;
	if (wr->opcode == IB_WR_SEND_WITH_IMM || wr->opcode == IB_WR_RDMA_WRITE_WITH_IMM)
		w->imm_data = cpu_to_le32(be32_to_cpu(wr->ex.imm_data)); /* LE in the WQE (spec 1.3) */

	switch (wr->opcode) {
	case IB_WR_RDMA_WRITE:
	case IB_WR_RDMA_WRITE_WITH_IMM:
	case IB_WR_RDMA_READ:
		w->remote_addr = cpu_to_le64(rdma_wr(wr)->remote_addr);
		w->rkey = cpu_to_le32(rdma_wr(wr)->rkey);
		break;
	case IB_WR_ATOMIC_CMP_AND_SWP:
	case IB_WR_ATOMIC_FETCH_AND_ADD:
		w->remote_addr = cpu_to_le64(atomic_wr(wr)->remote_addr);
		w->rkey = cpu_to_le32(atomic_wr(wr)->rkey);
		w->compare_add = cpu_to_le64(atomic_wr(wr)->compare_add); /* CAS: compare; FAA: the addend */
		w->swap = cpu_to_le64(atomic_wr(wr)->swap);
		break;
	default:
		break;
	}
	if (qp->type == VRDMA_QPT_UD) {
		w->ah_handle = cpu_to_le32(to_vah(ud_wr(wr)->ah)->handle);
		w->remote_qpn = cpu_to_le32(ud_wr(wr)->remote_qpn);
		w->remote_qkey = cpu_to_le32(ud_wr(wr)->remote_qkey);
	}

	if (wr->send_flags & IB_SEND_INLINE) {
		u32 len = 0;

		/* Inline data only for SEND and WRITE (spec 10.3); the device would fail the WQE (LOC_QP_OP_ERR). */
		if (wr->opcode != IB_WR_SEND && wr->opcode != IB_WR_SEND_WITH_IMM &&
		    wr->opcode != IB_WR_RDMA_WRITE && wr->opcode != IB_WR_RDMA_WRITE_WITH_IMM)
			return -EINVAL;

		/* Kernel SGE addresses are kernel virtual addresses here (virtual DMA device, main.c). */
		for (i = 0; i < wr->num_sge; i++) {
			if (wr->sg_list[i].length > qp->max_inline - len)
				return -EINVAL;
			memcpy(w->payload.inline_data + len, (void *)(uintptr_t)wr->sg_list[i].addr,
			       wr->sg_list[i].length);
			len += wr->sg_list[i].length;
		}
		w->flags |= VRDMA_SEND_INLINE;
		w->inline_length = cpu_to_le32(len);
		return 0;
	}
	if (wr->num_sge > qp->max_send_sge)
		return -EINVAL;
	w->num_sge = wr->num_sge;
	for (i = 0; i < wr->num_sge; i++) {
		w->payload.sge[i].addr = cpu_to_le64(wr->sg_list[i].addr);
		w->payload.sge[i].length = cpu_to_le32(wr->sg_list[i].length);
		w->payload.sge[i].lkey = cpu_to_le32(wr->sg_list[i].lkey);
	}
	return 0;
}

int vrdma_post_send(struct ib_qp *ibqp, const struct ib_send_wr *wr, const struct ib_send_wr **bad_wr)
{
	struct vrdma_qp *qp = to_vqp(ibqp);
	u32 mask = qp->sq.depth - 1, prod, cons;
	unsigned long flags;
	int ret = 0, posted = 0;

	if (qp->state == IB_QPS_RESET) { /* the device would ignore the record (spec 10.6) */
		*bad_wr = wr;
		return -EINVAL;
	}
	if (qp->user) { /* the provider wrote the WQEs and producer_index: only the doorbell (virtio_rdma_abi.h) */
		if (wr) { /* ib_uverbs would have translated it with user addresses: the rings are the provider's */
			*bad_wr = wr;
			return -EINVAL;
		}
		return vrdma_ring_doorbell(to_vdev(ibqp->device), qp->handle, VRDMA_DB_SQ);
	}
	spin_lock_irqsave(&qp->sq_lock, flags);
	prod = le32_to_cpu(qp->sq_index->producer_index);
	for (; wr; wr = wr->next) {
		struct vrdma_send_wqe *w;

		cons = le32_to_cpu(READ_ONCE(qp->sq_index->consumer_index));
		if (prod - cons >= qp->sq.depth) { /* full: never more than the depth ahead (spec 10.10) */
			ret = -ENOMEM;
			break;
		}
		w = (struct vrdma_send_wqe *)qp->sq.buf + (prod & mask);
		memset(w, 0, sizeof(*w));
		ret = vrdma_build_send(qp, wr, w);
		if (ret)
			break;
		prod++;
		posted++;
	}
	if (posted) {
		dma_wmb(); /* WQEs before producer_index (spec 10.2, driver posting) */
		WRITE_ONCE(qp->sq_index->producer_index, cpu_to_le32(prod));
	}
	spin_unlock_irqrestore(&qp->sq_lock, flags);
	if (ret)
		*bad_wr = wr;
	if (posted) {
		/*
		 * A lost record loses no work: the WQEs are in the ring and the next record of this queue makes the
		 * device read producer_index again (records carry no index, spec 10.6).
		 */
		vrdma_ring_doorbell(to_vdev(ibqp->device), qp->handle, VRDMA_DB_SQ);
	}
	return ret;
}

int vrdma_post_recv(struct ib_qp *ibqp, const struct ib_recv_wr *wr, const struct ib_recv_wr **bad_wr)
{
	struct vrdma_qp *qp = to_vqp(ibqp);
	u32 mask = qp->rq.depth - 1, prod, cons;
	unsigned long flags;
	int i, ret = 0, posted = 0;

	if (qp->state == IB_QPS_RESET) {
		*bad_wr = wr;
		return -EINVAL;
	}
	if (qp->user) { /* as in post_send */
		if (wr) {
			*bad_wr = wr;
			return -EINVAL;
		}
		return vrdma_ring_doorbell(to_vdev(ibqp->device), qp->handle, VRDMA_DB_RQ);
	}
	spin_lock_irqsave(&qp->rq_lock, flags);
	prod = le32_to_cpu(qp->rq_index->producer_index);
	for (; wr; wr = wr->next) {
		struct vrdma_recv_wqe *w;

		cons = le32_to_cpu(READ_ONCE(qp->rq_index->consumer_index));
		if (prod - cons >= qp->rq.depth) {
			ret = -ENOMEM;
			break;
		}
		if (wr->num_sge > qp->max_recv_sge) {
			ret = -EINVAL;
			break;
		}
		w = (struct vrdma_recv_wqe *)qp->rq.buf + (prod & mask);
		memset(w, 0, sizeof(*w));
		w->wr_id = cpu_to_le64(wr->wr_id);
		w->num_sge = cpu_to_le32(wr->num_sge);
		for (i = 0; i < wr->num_sge; i++) {
			w->sge[i].addr = cpu_to_le64(wr->sg_list[i].addr);
			w->sge[i].length = cpu_to_le32(wr->sg_list[i].length);
			w->sge[i].lkey = cpu_to_le32(wr->sg_list[i].lkey);
		}
		prod++;
		posted++;
	}
	if (posted) {
		dma_wmb();
		WRITE_ONCE(qp->rq_index->producer_index, cpu_to_le32(prod));
	}
	spin_unlock_irqrestore(&qp->rq_lock, flags);
	if (ret)
		*bad_wr = wr;
	if (posted) {
		vrdma_ring_doorbell(to_vdev(ibqp->device), qp->handle, VRDMA_DB_RQ); /* as in post_send */
	}
	return ret;
}
