// SPDX-License-Identifier: GPL-2.0
/*
 * Completion queues (spec 8.7 to 8.9, 10.5, 10.7): the CQE ring and its index block live in guest kernel memory;
 * for a kernel consumer poll_cq reads CQEs the device wrote, for a user one the provider does (umap.c maps them);
 * req_notify_cq arms both with a doorbell record.
 */
#include <linux/slab.h>
#include <linux/log2.h>
#include "virtio_rdma.h"

/* Before CREATE_CQ succeeded, or after DESTROY_CQ: the device no longer touches ring or index (spec 8.8). */
static void vrdma_cq_free_mem(struct vrdma_cq *cq)
{
	if (cq->umap_ring)
		vrdma_umap_remove(cq->umap_ring); /* the entry frees the ring */
	else
		vrdma_ring_free(&cq->ring);
	if (cq->umap_index)
		vrdma_umap_remove(cq->umap_index);
	else if (cq->user)
		free_pages_exact(cq->index, PAGE_SIZE);
	else
		kfree(cq->index);
	cq->umap_ring = cq->umap_index = NULL;
	cq->index = NULL;
}

/* A user CQ: ring and index page mapped for the provider, offsets in the response (virtio_rdma_abi.h). */
static int vrdma_cq_expose(struct vrdma_cq *cq, struct ib_udata *udata)
{
	struct ib_ucontext *uctx = &rdma_udata_to_drv_context(udata, struct vrdma_ucontext, ib)->ib;
	struct virtio_rdma_create_cq_resp resp = {};
	u64 off;

	cq->umap_ring = vrdma_umap_insert(uctx, cq->ring.buf, cq->ring.bytes, &off);
	if (!cq->umap_ring)
		return -ENOMEM;
	resp.ring_offset = off;
	cq->umap_index = vrdma_umap_insert(uctx, cq->index, PAGE_SIZE, &off);
	if (!cq->umap_index)
		return -ENOMEM;
	resp.index_offset = off;
	resp.ring_bytes = cq->ring.bytes;
	resp.cqe_count = cq->ring.depth;
	resp.cq_handle = cq->handle;
	return ib_copy_to_udata(udata, &resp, sizeof(resp));
}

int vrdma_create_cq(struct ib_cq *ibcq, const struct ib_cq_init_attr *attr, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	u32 limit = min_t(u32, dev->attr_cache.max_cqe, VRDMA_KERNEL_MAX_CQE), depth, num_pages;
	struct vrdma_create_cq_req req = {};
	struct vrdma_create_cq_resp r;
	struct vrdma_handle d;
	__le64 *pages;
	int ret;

	if (udata && udata->outlen < sizeof(struct virtio_rdma_create_cq_resp))
		return -EINVAL; /* a provider of another ABI: it could not find the rings */
	if (attr->flags || attr->cqe < 1)
		return -EINVAL;
	depth = roundup_pow_of_two(attr->cqe);
	if (depth > limit)
		return -EINVAL;
	spin_lock_init(&cq->lock);
	cq->user = udata;
	/* Zeroed before CREATE_CQ names it (spec 8.17); a page of its own when user space maps it. */
	cq->index = udata ? alloc_pages_exact(PAGE_SIZE, GFP_KERNEL | __GFP_ZERO) :
			    kzalloc(sizeof(*cq->index), GFP_KERNEL);
	if (!cq->index)
		return -ENOMEM;
	ret = vrdma_ring_alloc(&cq->ring, depth, VRDMA_CQE_SIZE);
	if (ret)
		goto err_mem;
	pages = vrdma_ring_pages(&cq->ring, &num_pages);
	if (!pages) {
		ret = -ENOMEM;
		goto err_mem;
	}
	req.cqe_count = cpu_to_le32(depth);
	req.page_shift = VRDMA_PAGE_SHIFT;
	req.num_pages = cpu_to_le32(num_pages);
	req.index_gpa = cpu_to_le64(virt_to_phys(cq->index));
	ret = vrdma_cmd(dev, VRDMA_CMD_CREATE_CQ, &req, sizeof(req), pages, num_pages, &r, sizeof(r));
	kfree(pages);
	if (ret)
		goto err_mem;
	cq->handle = le32_to_cpu(r.cq_handle);
	cq->ib.cqe = depth;
	d.handle = r.cq_handle;
	ret = xa_insert(&dev->cqs, cq->handle, cq, GFP_KERNEL);
	if (ret) /* the device gave a handle still in use here: it broke spec 7.6 */
		goto err_destroy;
	if (udata) {
		ret = vrdma_cq_expose(cq, udata);
		if (ret) {
			xa_erase(&dev->cqs, cq->handle);
			goto err_destroy;
		}
	}
	return 0;

err_destroy:
	vrdma_cmd(dev, VRDMA_CMD_DESTROY_CQ, &d, sizeof(d), NULL, 0, NULL, 0);
err_mem:
	vrdma_cq_free_mem(cq);
	return ret;
}

int vrdma_destroy_cq(struct ib_cq *ibcq, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	struct vrdma_handle req = { .handle = cpu_to_le32(cq->handle) };
	int ret = vrdma_cmd(dev, VRDMA_CMD_DESTROY_CQ, &req, sizeof(req), NULL, 0, NULL, 0);

	if (ret)
		return ret;
	xa_erase(&dev->cqs, cq->handle);
	flush_work(&dev->event_work); /* a handler that already looked the CQ up has finished */
	/* After the response the device never touches the ring or index again (spec 8.8). */
	vrdma_cq_free_mem(cq);
	return 0;
}

static enum ib_wc_opcode vrdma_wc_opcode(u8 op)
{
	switch (op) {
	case VRDMA_WC_SEND: return IB_WC_SEND;
	case VRDMA_WC_RDMA_WRITE: return IB_WC_RDMA_WRITE;
	case VRDMA_WC_RDMA_READ: return IB_WC_RDMA_READ;
	case VRDMA_WC_COMP_SWAP: return IB_WC_COMP_SWAP;
	case VRDMA_WC_FETCH_ADD: return IB_WC_FETCH_ADD;
	case VRDMA_WC_RECV_RDMA_WITH_IMM: return IB_WC_RECV_RDMA_WITH_IMM;
	default: return IB_WC_RECV;
	}
}

/* WcStatus (spec 10.5) has the verbs API's values; anything else is a general error. */
static enum ib_wc_status vrdma_wc_status(u8 status)
{
	return status <= IB_WC_GENERAL_ERR ? status : IB_WC_GENERAL_ERR;
}

int vrdma_poll_cq(struct ib_cq *ibcq, int num_entries, struct ib_wc *wc)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	u32 prod, cons, mask = cq->ring.depth - 1;
	unsigned long flags;
	int n = 0;

	spin_lock_irqsave(&cq->lock, flags);
	prod = le32_to_cpu(READ_ONCE(cq->index->producer_index));
	dma_rmb(); /* the CQEs after producer_index (spec 10.2, driver polling) */
	cons = le32_to_cpu(cq->index->consumer_index);
	if (prod - cons > cq->ring.depth) { /* the device broke the occupancy bound; read nothing */
		spin_unlock_irqrestore(&cq->lock, flags);
		dev_err_ratelimited(&dev->vdev->dev, "CQ %u: producer_index %u is %u ahead\n", cq->handle, prod,
				    prod - cons);
		return -EIO;
	}
	while (cons != prod && n < num_entries) {
		struct vrdma_cqe cqe = ((struct vrdma_cqe *)cq->ring.buf)[cons & mask];
		struct vrdma_qp *qp = xa_load(&dev->qps, le32_to_cpu(cqe.qp_handle));
		struct ib_wc *w = &wc[n];

		cons++;
		if (!qp) /* flush completions of a QP destroyed meanwhile: no consumer can take them */
			continue;
		memset(w, 0, sizeof(*w));
		w->wr_id = le64_to_cpu(cqe.wr_id);
		w->status = vrdma_wc_status(cqe.status);
		w->opcode = vrdma_wc_opcode(cqe.opcode);
		w->vendor_err = le32_to_cpu(cqe.vendor_err);
		w->byte_len = le32_to_cpu(cqe.byte_len);
		w->qp = &qp->ib;
		w->src_qp = le32_to_cpu(cqe.src_qp);
		w->port_num = 1;
		if (cqe.wc_flags & VRDMA_WC_F_WITH_IMM) {
			w->wc_flags |= IB_WC_WITH_IMM;
			w->ex.imm_data = cpu_to_be32(le32_to_cpu(cqe.imm_data));
		}
		if (cqe.wc_flags & VRDMA_WC_F_GRH)
			w->wc_flags |= IB_WC_GRH;
		n++;
	}
	WRITE_ONCE(cq->index->consumer_index, cpu_to_le32(cons));
	spin_unlock_irqrestore(&cq->lock, flags);
	return n;
}

int vrdma_req_notify_cq(struct ib_cq *ibcq, enum ib_cq_notify_flags flags)
{
	struct vrdma_cq *cq = to_vcq(ibcq);
	u8 type = (flags & IB_CQ_SOLICITED_MASK) == IB_CQ_SOLICITED ? VRDMA_DB_CQ_ARM_SOLICITED :
								       VRDMA_DB_CQ_ARM_NEXT;
	int ret;

	/* consumer_index was stored by the last poll; the device notifies at once if CQEs wait (spec 10.7). */
	wmb();
	ret = vrdma_ring_doorbell(to_vdev(ibcq->device), cq->handle, type);
	if (ret)
		return ret;
	if (flags & IB_CQ_REPORT_MISSED_EVENTS)
		return READ_ONCE(cq->index->producer_index) != READ_ONCE(cq->index->consumer_index);
	return 0;
}
