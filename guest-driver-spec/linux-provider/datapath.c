// SPDX-License-Identifier: GPL-2.0
/*
 * The relayed data path of version 1 (spec 10) from user space: WQEs into the mapped SQ / RQ rings, producer_index
 * stored after them, then the doorbell (the uverbs POST_SEND / POST_RECV command with no work request, which the
 * module turns into a record on doorbell queue 0: virtio_rdma_abi.h). poll_cq reads the mapped CQE ring.
 * Every index is little-endian in memory (spec 1.3).
 */
#include <errno.h>
#include <string.h>
#include <endian.h>
#include <util/udma_barrier.h>
#include "virtio_rdma.h"
#include "vrdma_wqe.h"

static inline uint32_t vr_load_index(const __le32 *p)
{
	return le32toh(atomic_load_explicit((_Atomic(uint32_t) *)p, memory_order_acquire));
}

static inline void vr_store_index(__le32 *p, uint32_t v)
{
	atomic_store_explicit((_Atomic(uint32_t) *)p, htole32(v), memory_order_release);
}

static int vr_build_send(struct vr_qp *qp, const struct ibv_send_wr *wr, struct vrdma_send_wqe *w)
{
	int ret = vrdma_wqe_send_header(w, wr->opcode, wr->wr_id, wr->send_flags, wr->imm_data);

	if (ret)
		return ret;
	switch (wr->opcode) {
	case IBV_WR_RDMA_WRITE:
	case IBV_WR_RDMA_WRITE_WITH_IMM:
	case IBV_WR_RDMA_READ:
		w->remote_addr = htole64(wr->wr.rdma.remote_addr);
		w->rkey = htole32(wr->wr.rdma.rkey);
		break;
	case IBV_WR_ATOMIC_CMP_AND_SWP:
	case IBV_WR_ATOMIC_FETCH_AND_ADD:
		w->remote_addr = htole64(wr->wr.atomic.remote_addr);
		w->rkey = htole32(wr->wr.atomic.rkey);
		w->compare_add = htole64(wr->wr.atomic.compare_add);
		w->swap = htole64(wr->wr.atomic.swap);
		break;
	default:
		break;
	}
	if (qp->type == VRDMA_QPT_UD) {
		if (!wr->wr.ud.ah)
			return EINVAL;
		w->ah_handle = htole32(to_vah(wr->wr.ud.ah)->handle);
		w->remote_qpn = htole32(wr->wr.ud.remote_qpn);
		w->remote_qkey = htole32(wr->wr.ud.remote_qkey);
	}
	return vrdma_wqe_send_payload(w, wr->opcode, wr->send_flags, wr->sg_list, wr->num_sge, qp->max_inline,
				      qp->max_send_sge);
}

int vr_post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr)
{
	struct vr_qp *qp = to_vqp(ibqp);
	uint32_t prod;
	struct ibv_send_wr *bad_db;
	int ret = 0, posted = 0, db;

	pthread_spin_lock(&qp->sq_lock);
	prod = le32toh(qp->sq_index->producer_index); /* only this process writes it (the module on RESET) */
	for (; wr; wr = wr->next) {
		struct vrdma_send_wqe *w;

		if (vrdma_ring_full(prod, vr_load_index(&qp->sq_index->consumer_index), qp->sq_depth)) {
			ret = ENOMEM;
			break;
		}
		w = vrdma_ring_entry(qp->sq, prod, qp->sq_depth, sizeof(*w));
		memset(w, 0, sizeof(*w));
		ret = vr_build_send(qp, wr, w);
		if (ret)
			break;
		prod++;
		posted++;
	}
	if (posted)
		vr_store_index(&qp->sq_index->producer_index, prod); /* release: the WQEs before the index */
	pthread_spin_unlock(&qp->sq_lock);
	if (ret)
		*bad_wr = wr;
	if (posted) {
		/* Records carry no index (spec 10.6): one for the batch; the module refuses it in RESET. */
		db = ibv_cmd_post_send(ibqp, NULL, &bad_db);
		if (db)
			verbs_debug(verbs_get_ctx(ibqp->context), "virtio_rdma: SQ doorbell of QP %u: %s\n", qp->handle,
				    strerror(db));
		if (db && !ret) {
			*bad_wr = wr;
			ret = db;
		}
	}
	return ret;
}

int vr_post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr)
{
	struct vr_qp *qp = to_vqp(ibqp);
	uint32_t prod;
	struct ibv_recv_wr *bad_db;
	int ret = 0, posted = 0, db;

	pthread_spin_lock(&qp->rq_lock);
	prod = le32toh(qp->rq_index->producer_index);
	for (; wr; wr = wr->next) {
		struct vrdma_recv_wqe *w;

		if (vrdma_ring_full(prod, vr_load_index(&qp->rq_index->consumer_index), qp->rq_depth)) {
			ret = ENOMEM;
			break;
		}
		w = vrdma_ring_entry(qp->rq, prod, qp->rq_depth, sizeof(*w));
		ret = vrdma_wqe_recv(w, wr->wr_id, wr->sg_list, wr->num_sge, qp->max_recv_sge);
		if (ret)
			break;
		prod++;
		posted++;
	}
	if (posted)
		vr_store_index(&qp->rq_index->producer_index, prod);
	pthread_spin_unlock(&qp->rq_lock);
	if (ret)
		*bad_wr = wr;
	if (posted) {
		db = ibv_cmd_post_recv(ibqp, NULL, &bad_db);
		if (db)
			verbs_debug(verbs_get_ctx(ibqp->context), "virtio_rdma: RQ doorbell of QP %u: %s\n", qp->handle,
				    strerror(db));
		if (db && !ret) {
			*bad_wr = wr;
			ret = db;
		}
	}
	return ret;
}

static enum ibv_wc_opcode vr_wc_opcode(uint8_t op)
{
	switch (op) {
	case VRDMA_WC_SEND: return IBV_WC_SEND;
	case VRDMA_WC_RDMA_WRITE: return IBV_WC_RDMA_WRITE;
	case VRDMA_WC_RDMA_READ: return IBV_WC_RDMA_READ;
	case VRDMA_WC_COMP_SWAP: return IBV_WC_COMP_SWAP;
	case VRDMA_WC_FETCH_ADD: return IBV_WC_FETCH_ADD;
	case VRDMA_WC_RECV_RDMA_WITH_IMM: return IBV_WC_RECV_RDMA_WITH_IMM;
	default: return IBV_WC_RECV;
	}
}

int vr_poll_cq(struct ibv_cq *ibcq, int num_entries, struct ibv_wc *wc)
{
	struct vr_cq *cq = to_vcq(ibcq);
	struct vr_context *ctx = to_vctx(ibcq->context);
	uint32_t prod, cons, mask = cq->depth - 1;
	int n = 0;

	pthread_spin_lock(&cq->lock);
	prod = vr_load_index(&cq->index->producer_index); /* acquire: the CQEs after producer_index */
	cons = le32toh(cq->index->consumer_index);
	if (prod - cons > cq->depth) { /* the device broke the occupancy bound: read nothing (spec 10.2) */
		pthread_spin_unlock(&cq->lock);
		return -1;
	}
	while (cons != prod && n < num_entries) {
		struct vrdma_cqe cqe = ((struct vrdma_cqe *)cq->ring)[cons & mask];
		struct vr_qp *qp = vr_find_qp(ctx, le32toh(cqe.qp_handle));
		struct ibv_wc *w = &wc[n];

		cons++;
		if (!qp) /* a flush completion of a QP destroyed meanwhile: nobody can take it */
			continue;
		memset(w, 0, sizeof(*w));
		w->wr_id = le64toh(cqe.wr_id);
		/* WcStatus has the verbs API's values (spec 10.5); anything else is a general error. */
		w->status = cqe.status <= IBV_WC_GENERAL_ERR ? cqe.status : IBV_WC_GENERAL_ERR;
		w->opcode = vr_wc_opcode(cqe.opcode);
		w->vendor_err = le32toh(cqe.vendor_err);
		w->byte_len = le32toh(cqe.byte_len);
		w->qp_num = qp->ibv_qp.qp_num;
		w->src_qp = le32toh(cqe.src_qp);
		if (cqe.wc_flags & VRDMA_WC_F_WITH_IMM) {
			w->wc_flags |= IBV_WC_WITH_IMM;
			w->imm_data = htobe32(le32toh(cqe.imm_data));
		}
		if (cqe.wc_flags & VRDMA_WC_F_GRH)
			w->wc_flags |= IBV_WC_GRH;
		n++;
	}
	vr_store_index(&cq->index->consumer_index, cons);
	pthread_spin_unlock(&cq->lock);
	return n;
}
