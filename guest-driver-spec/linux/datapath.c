// SPDX-License-Identifier: GPL-2.0
/*
 * The relayed data path of version 1 (spec 10) for kernel consumers: post_send and post_recv write WQEs into the
 * rings, store-release producer_index, then ring one doorbell record for the whole batch. For a user QP the
 * provider does the writing and these only ring the doorbell.
 */
#include <linux/string.h>
#include "virtio_rdma.h"
#include "vrdma_wqe.h"

static int vrdma_build_send(struct vrdma_qp *qp, const struct ib_send_wr *wr, struct vrdma_send_wqe *w)
{
	int ret = vrdma_wqe_send_header(w, wr->opcode, wr->wr_id, wr->send_flags, wr->ex.imm_data);

	if (ret)
		return ret;
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
	return vrdma_wqe_send_payload(w, wr->opcode, wr->send_flags, wr->sg_list, wr->num_sge, qp->max_inline,
				      qp->max_send_sge);
}

int vrdma_post_send(struct ib_qp *ibqp, const struct ib_send_wr *wr, const struct ib_send_wr **bad_wr)
{
	struct vrdma_qp *qp = to_vqp(ibqp);
	u32 prod, cons;
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
		if (vrdma_ring_full(prod, cons, qp->sq.depth)) {
			ret = -ENOMEM;
			break;
		}
		w = vrdma_ring_entry(qp->sq.buf, prod, qp->sq.depth, sizeof(*w));
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
	u32 prod, cons;
	unsigned long flags;
	int ret = 0, posted = 0;

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
		if (vrdma_ring_full(prod, cons, qp->rq.depth)) {
			ret = -ENOMEM;
			break;
		}
		w = vrdma_ring_entry(qp->rq.buf, prod, qp->rq.depth, sizeof(*w));
		ret = vrdma_wqe_recv(w, wr->wr_id, wr->sg_list, wr->num_sge, qp->max_recv_sge);
		if (ret)
			break;
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
