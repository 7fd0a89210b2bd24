// SPDX-License-Identifier: GPL-2.0
/*
 * Queue pairs (spec 8.10 to 8.13): SQ and RQ rings and their index blocks in guest kernel memory, mapped into the
 * process for a user QP (umap.c, virtio_rdma_abi.h).
 * QP states, attribute mask bits, access flags and MTUs have the verbs API's values (checked in main.c).
 */
#include <linux/slab.h>
#include <linux/log2.h>
#include "virtio_rdma.h"

/* Before CREATE_QP succeeded, or after DESTROY_QP: the device no longer touches rings or indexes (spec 8.13). */
static void vrdma_qp_free_rings(struct vrdma_qp *qp)
{
	if (qp->umap_sq)
		vrdma_umap_remove(qp->umap_sq); /* the entries free what they map */
	else
		vrdma_ring_free(&qp->sq);
	if (qp->umap_rq)
		vrdma_umap_remove(qp->umap_rq);
	else
		vrdma_ring_free(&qp->rq);
	if (qp->user) {
		if (qp->umap_index)
			vrdma_umap_remove(qp->umap_index);
		else if (qp->index_page)
			free_pages_exact(qp->index_page, PAGE_SIZE);
	} else {
		kfree(qp->sq_index);
		kfree(qp->rq_index);
	}
	qp->umap_sq = qp->umap_rq = qp->umap_index = NULL;
	qp->index_page = NULL;
	qp->sq_index = qp->rq_index = NULL;
}

/* Index blocks are zeroed before CREATE_QP names them (spec 8.17): one page for both when user space maps them. */
static int vrdma_qp_alloc_index(struct vrdma_qp *qp)
{
	if (!qp->user) {
		qp->sq_index = kzalloc(sizeof(*qp->sq_index), GFP_KERNEL);
		qp->rq_index = kzalloc(sizeof(*qp->rq_index), GFP_KERNEL);
		return qp->sq_index && qp->rq_index ? 0 : -ENOMEM;
	}
	qp->index_page = alloc_pages_exact(PAGE_SIZE, GFP_KERNEL | __GFP_ZERO);
	if (!qp->index_page)
		return -ENOMEM;
	qp->sq_index = qp->index_page + VIRTIO_RDMA_SQ_INDEX_OFFSET;
	qp->rq_index = qp->index_page + VIRTIO_RDMA_RQ_INDEX_OFFSET;
	return 0;
}

/* A user QP: both rings and the index page mapped for the provider, offsets in the response (virtio_rdma_abi.h). */
static int vrdma_qp_expose(struct vrdma_qp *qp, struct ib_udata *udata)
{
	struct ib_ucontext *uctx = &rdma_udata_to_drv_context(udata, struct vrdma_ucontext, ib)->ib;
	struct virtio_rdma_create_qp_resp resp = {};
	u64 off;

	qp->umap_sq = vrdma_umap_insert(uctx, qp->sq.buf, qp->sq.bytes, &off);
	if (!qp->umap_sq)
		return -ENOMEM;
	resp.sq_offset = off;
	qp->umap_rq = vrdma_umap_insert(uctx, qp->rq.buf, qp->rq.bytes, &off);
	if (!qp->umap_rq)
		return -ENOMEM;
	resp.rq_offset = off;
	qp->umap_index = vrdma_umap_insert(uctx, qp->index_page, PAGE_SIZE, &off);
	if (!qp->umap_index)
		return -ENOMEM;
	resp.index_offset = off;
	resp.sq_bytes = qp->sq.bytes;
	resp.rq_bytes = qp->rq.bytes;
	resp.sq_depth = qp->sq.depth;
	resp.rq_depth = qp->rq.depth;
	resp.qp_handle = qp->handle;
	resp.max_inline_data = qp->max_inline;
	return ib_copy_to_udata(udata, &resp, sizeof(resp));
}

static int vrdma_qp_depth(u32 wanted, u32 limit, u32 *depth)
{
	*depth = roundup_pow_of_two(max_t(u32, wanted, 1));
	return *depth > limit ? -EINVAL : 0;
}

int vrdma_create_qp(struct ib_qp *ibqp, struct ib_qp_init_attr *init, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	u32 wr_limit = min_t(u32, dev->attr_cache.max_qp_wr, VRDMA_KERNEL_MAX_WR);
	struct vrdma_create_qp_req req = {};
	struct vrdma_create_qp_resp r;
	u32 sq_depth, rq_depth, sq_n, rq_n;
	__le64 *sq_pages = NULL, *rq_pages = NULL, *pages = NULL;
	int ret;

	if (udata && udata->outlen < sizeof(struct virtio_rdma_create_qp_resp))
		return -EINVAL; /* a provider of another ABI: it could not find the rings */
	switch (init->qp_type) {
	case IB_QPT_RC: qp->type = VRDMA_QPT_RC; break;
	case IB_QPT_UD: qp->type = VRDMA_QPT_UD; break;
	default: return -EOPNOTSUPP; /* no GSI/SMI QP exists in the device (spec 8.10) */
	}
	if (init->srq || init->create_flags)
		return -EOPNOTSUPP;
	if (init->cap.max_send_sge > dev->attr_cache.max_send_sge ||
	    init->cap.max_recv_sge > dev->attr_cache.max_recv_sge ||
	    init->cap.max_inline_data > (dev->f_inline ? le32_to_cpu(dev->cfg.max_inline_data) : 0))
		return -EINVAL;
	if (vrdma_qp_depth(init->cap.max_send_wr, wr_limit, &sq_depth) ||
	    vrdma_qp_depth(init->cap.max_recv_wr, wr_limit, &rq_depth))
		return -EINVAL;

	spin_lock_init(&qp->sq_lock);
	spin_lock_init(&qp->rq_lock);
	qp->sig_all = init->sq_sig_type == IB_SIGNAL_ALL_WR;
	qp->max_send_sge = init->cap.max_send_sge;
	qp->max_recv_sge = init->cap.max_recv_sge;
	qp->max_inline = init->cap.max_inline_data;
	qp->user = udata;
	ret = vrdma_qp_alloc_index(qp);
	if (ret)
		goto err;
	ret = vrdma_ring_alloc(&qp->sq, sq_depth, VRDMA_SQ_WQE_SIZE);
	if (!ret)
		ret = vrdma_ring_alloc(&qp->rq, rq_depth, VRDMA_RQ_WQE_SIZE);
	if (ret)
		goto err;
	sq_pages = vrdma_ring_pages(&qp->sq, &sq_n);
	rq_pages = vrdma_ring_pages(&qp->rq, &rq_n);
	pages = sq_pages && rq_pages ? kmalloc_array(sq_n + rq_n, sizeof(*pages), GFP_KERNEL) : NULL;
	ret = -ENOMEM;
	if (!pages)
		goto err;
	/* The SQ's page list, then the RQ's (spec 8.10). */
	memcpy(pages, sq_pages, sq_n * sizeof(*pages));
	memcpy(pages + sq_n, rq_pages, rq_n * sizeof(*pages));

	req.pd_handle = cpu_to_le32(to_vpd(ibqp->pd)->handle);
	req.send_cq_handle = cpu_to_le32(to_vcq(init->send_cq)->handle);
	req.recv_cq_handle = cpu_to_le32(to_vcq(init->recv_cq)->handle);
	req.qp_type = qp->type;
	req.sq_sig_all = qp->sig_all;
	req.sq_page_shift = VRDMA_PAGE_SHIFT;
	req.rq_page_shift = VRDMA_PAGE_SHIFT;
	req.max_send_wr = cpu_to_le32(sq_depth);
	req.max_recv_wr = cpu_to_le32(rq_depth);
	req.max_send_sge = cpu_to_le32(qp->max_send_sge);
	req.max_recv_sge = cpu_to_le32(qp->max_recv_sge);
	req.max_inline_data = cpu_to_le32(qp->max_inline);
	req.sq_num_pages = cpu_to_le32(sq_n);
	req.rq_num_pages = cpu_to_le32(rq_n);
	req.sq_index_gpa = cpu_to_le64(virt_to_phys(qp->sq_index));
	req.rq_index_gpa = cpu_to_le64(virt_to_phys(qp->rq_index));
	ret = vrdma_cmd(dev, VRDMA_CMD_CREATE_QP, &req, sizeof(req), pages, sq_n + rq_n, &r, sizeof(r));
	if (ret)
		goto err;
	qp->handle = le32_to_cpu(r.qp_handle);
	qp->qp_num = le32_to_cpu(r.qp_num);
	qp->ib.qp_num = qp->qp_num;
	qp->state = IB_QPS_RESET;
	init->cap.max_send_wr = sq_depth;
	init->cap.max_recv_wr = rq_depth;
	ret = xa_insert(&dev->qps, qp->handle, qp, GFP_KERNEL);
	if (!ret && udata) {
		ret = vrdma_qp_expose(qp, udata);
		if (ret)
			xa_erase(&dev->qps, qp->handle);
	}
	if (ret) { /* xa_insert: the device gave a handle still in use here, it broke spec 7.6 */
		struct vrdma_handle d = { .handle = r.qp_handle };
		struct vrdma_destroy_qp_resp dr;

		vrdma_cmd(dev, VRDMA_CMD_DESTROY_QP, &d, sizeof(d), NULL, 0, &dr, sizeof(dr));
		goto err;
	}
	kfree(pages);
	kfree(sq_pages);
	kfree(rq_pages);
	return 0;
err:
	kfree(pages);
	kfree(sq_pages);
	kfree(rq_pages);
	vrdma_qp_free_rings(qp);
	return ret;
}

/* Bits of ib_qp_attr_mask version 1 does not know: refused before the device sees them (spec 8.11). */
#define VRDMA_QP_UNSUPPORTED_MASK (IB_QP_CUR_STATE | IB_QP_EN_SQD_ASYNC_NOTIFY | IB_QP_ALT_PATH | \
				   IB_QP_PATH_MIG_STATE | IB_QP_CAP)

int vrdma_modify_qp(struct ib_qp *ibqp, struct ib_qp_attr *attr, int mask, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_modify_qp_req req = {};
	struct vrdma_qp_attr *a = &req.attr;
	int ret;

	if (udata && udata->inlen)
		return -EINVAL;
	if (mask & ~VRDMA_QP_KNOWN_MASK) {
		if (mask & VRDMA_QP_UNSUPPORTED_MASK & ~IB_QP_CUR_STATE)
			return -EOPNOTSUPP;
		/* IB_QP_CUR_STATE only restates what the driver knows: drop it rather than fail the caller. */
		if (mask & IB_QP_CUR_STATE && attr->cur_qp_state != qp->state)
			return -EINVAL;
		mask &= ~IB_QP_CUR_STATE;
		if (mask & ~VRDMA_QP_KNOWN_MASK)
			return -EOPNOTSUPP;
	}
	req.qp_handle = cpu_to_le32(qp->handle);
	req.attr_mask = cpu_to_le32(mask);
	if (mask & IB_QP_STATE)
		a->qp_state = cpu_to_le32(attr->qp_state);
	if (mask & IB_QP_ACCESS_FLAGS)
		a->qp_access_flags = cpu_to_le32(vrdma_access(attr->qp_access_flags));
	if (mask & IB_QP_QKEY)
		a->qkey = cpu_to_le32(attr->qkey);
	if (mask & IB_QP_RQ_PSN)
		a->rq_psn = cpu_to_le32(attr->rq_psn);
	if (mask & IB_QP_SQ_PSN)
		a->sq_psn = cpu_to_le32(attr->sq_psn);
	if (mask & IB_QP_DEST_QPN)
		a->dest_qp_num = cpu_to_le32(attr->dest_qp_num);
	if (mask & IB_QP_PATH_MTU)
		a->path_mtu = attr->path_mtu;
	if (mask & IB_QP_TIMEOUT)
		a->timeout = attr->timeout;
	if (mask & IB_QP_RETRY_CNT)
		a->retry_cnt = attr->retry_cnt;
	if (mask & IB_QP_RNR_RETRY)
		a->rnr_retry = attr->rnr_retry;
	if (mask & IB_QP_MIN_RNR_TIMER)
		a->min_rnr_timer = attr->min_rnr_timer;
	if (mask & IB_QP_MAX_QP_RD_ATOMIC)
		a->max_rd_atomic = attr->max_rd_atomic;
	if (mask & IB_QP_MAX_DEST_RD_ATOMIC)
		a->max_dest_rd_atomic = attr->max_dest_rd_atomic;
	if (mask & IB_QP_PORT)
		a->port_num = attr->port_num;
	if (mask & IB_QP_PKEY_INDEX)
		a->pkey_index = cpu_to_le16(attr->pkey_index);
	if (mask & IB_QP_AV) {
		const struct ib_global_route *grh = rdma_ah_read_grh(&attr->ah_attr);

		if (!(rdma_ah_get_ah_flags(&attr->ah_attr) & IB_AH_GRH) || !grh->sgid_attr ||
		    !vrdma_is_virtual_gid(dev, &grh->sgid_attr->gid))
			return -EINVAL; /* only the guest's virtual GID is a source (spec 8.11, sgid_index 0) */
		a->sgid_index = 0;
		a->hop_limit = grh->hop_limit;
		a->flow_label = cpu_to_le32(grh->flow_label);
		a->traffic_class = grh->traffic_class;
		a->sl = rdma_ah_get_sl(&attr->ah_attr);
		memcpy(a->dgid, grh->dgid.raw, 16);
	}
	ret = vrdma_cmd(dev, VRDMA_CMD_MODIFY_QP, &req, sizeof(req), NULL, 0, NULL, 0);
	if (ret)
		return ret;
	if (mask & IB_QP_STATE) {
		qp->state = attr->qp_state;
		if (attr->qp_state == IB_QPS_RESET) { /* the device emptied the rings (spec 8.11): so does the driver */
			qp->sq_index->producer_index = qp->sq_index->consumer_index;
			qp->rq_index->producer_index = qp->rq_index->consumer_index;
		}
	}
	if (mask & IB_QP_AV)
		qp->sgid_index = attr->ah_attr.grh.sgid_index;
	return 0;
}

int vrdma_query_qp(struct ib_qp *ibqp, struct ib_qp_attr *attr, int mask, struct ib_qp_init_attr *init)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_handle req = { .handle = cpu_to_le32(qp->handle) };
	struct vrdma_query_qp_resp r;
	const struct vrdma_qp_attr *a = &r.attr;
	union ib_gid dgid;
	int ret = vrdma_cmd(dev, VRDMA_CMD_QUERY_QP, &req, sizeof(req), NULL, 0, &r, sizeof(r));

	if (ret)
		return ret;
	memset(attr, 0, sizeof(*attr));
	memset(init, 0, sizeof(*init));
	attr->qp_state = le32_to_cpu(a->qp_state);
	attr->cur_qp_state = attr->qp_state;
	qp->state = attr->qp_state; /* the device may have moved it to ERR */
	attr->qp_access_flags = le32_to_cpu(a->qp_access_flags);
	attr->qkey = le32_to_cpu(a->qkey);
	attr->rq_psn = le32_to_cpu(a->rq_psn);
	attr->sq_psn = le32_to_cpu(a->sq_psn);
	attr->dest_qp_num = le32_to_cpu(a->dest_qp_num);
	attr->path_mtu = a->path_mtu;
	attr->timeout = a->timeout;
	attr->retry_cnt = a->retry_cnt;
	attr->rnr_retry = a->rnr_retry;
	attr->min_rnr_timer = a->min_rnr_timer;
	attr->max_rd_atomic = a->max_rd_atomic;
	attr->max_dest_rd_atomic = a->max_dest_rd_atomic;
	attr->port_num = a->port_num;
	attr->pkey_index = le16_to_cpu(a->pkey_index);
	attr->cap.max_send_wr = le32_to_cpu(r.max_send_wr);
	attr->cap.max_recv_wr = le32_to_cpu(r.max_recv_wr);
	attr->cap.max_send_sge = le32_to_cpu(r.max_send_sge);
	attr->cap.max_recv_sge = le32_to_cpu(r.max_recv_sge);
	attr->cap.max_inline_data = le32_to_cpu(r.max_inline_data);
	attr->ah_attr.type = RDMA_AH_ATTR_TYPE_ROCE;
	memcpy(dgid.raw, a->dgid, 16);
	/* The device's sgid_index 0 is the core table's entry the driver was given (qp->sgid_index). */
	rdma_ah_set_grh(&attr->ah_attr, &dgid, le32_to_cpu(a->flow_label), qp->sgid_index, a->hop_limit,
			a->traffic_class);
	rdma_ah_set_sl(&attr->ah_attr, a->sl);
	rdma_ah_set_port_num(&attr->ah_attr, 1);
	init->qp_type = r.qp_type == VRDMA_QPT_UD ? IB_QPT_UD : IB_QPT_RC;
	init->send_cq = ibqp->send_cq;
	init->recv_cq = ibqp->recv_cq;
	init->cap = attr->cap;
	init->sq_sig_type = r.sq_sig_all ? IB_SIGNAL_ALL_WR : IB_SIGNAL_REQ_WR;
	return 0;
}

int vrdma_destroy_qp(struct ib_qp *ibqp, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_handle req = { .handle = cpu_to_le32(qp->handle) };
	struct vrdma_destroy_qp_resp r;
	int ret = vrdma_cmd(dev, VRDMA_CMD_DESTROY_QP, &req, sizeof(req), NULL, 0, &r, sizeof(r));

	if (ret)
		return ret;
	if (r.flush_dropped)
		dev_info_ratelimited(&dev->vdev->dev, "QP %u destroyed: %u flush completions did not fit\n",
				     qp->handle, le32_to_cpu(r.flush_dropped));
	/* Its flush completions are in the CQ rings now; poll_cq skips them once the handle is gone. */
	xa_erase(&dev->qps, qp->handle);
	flush_work(&dev->event_work);
	vrdma_qp_free_rings(qp);
	return 0;
}
