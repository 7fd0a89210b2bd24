// SPDX-License-Identifier: GPL-2.0
/*
 * libibverbs provider for virtio-rdma (guest-driver-spec/virtio-rdma.md, version 1) over the virtio_rdma kernel
 * module (guest-driver-spec/linux/). Control verbs are the module's, through ib_uverbs; CQs and QPs map the rings
 * the module allocated (virtio_rdma_abi.h) and the data path runs here (datapath.c).
 * Built inside rdma-core's tree (providers/virtio_rdma) by scripts/linux-guest/provider.sh.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include "virtio_rdma.h"

static void vr_free_context(struct ibv_context *ibctx);

/* ---- device and port ---- */

static int vr_query_device(struct ibv_context *ctx, const struct ibv_query_device_ex_input *input,
			   struct ibv_device_attr_ex *attr, size_t attr_size)
{
	struct ib_uverbs_ex_query_device_resp resp;
	size_t resp_size = sizeof(resp);
	char path[256];
	FILE *f;
	int ret = ibv_cmd_query_device_any(ctx, input, attr, attr_size, &resp, &resp_size);

	if (ret)
		return ret;
	/* The module's firmware string ("virtio-rdma v1"), as sysfs shows it. */
	snprintf(path, sizeof(path), "/sys/class/infiniband/%s/fw_ver", ibv_get_device_name(ctx->device));
	f = fopen(path, "r");
	if (f) {
		if (fgets(attr->orig_attr.fw_ver, sizeof(attr->orig_attr.fw_ver), f))
			attr->orig_attr.fw_ver[strcspn(attr->orig_attr.fw_ver, "\n")] = 0;
		fclose(f);
	}
	return 0;
}

static int vr_query_port(struct ibv_context *ctx, uint8_t port, struct ibv_port_attr *attr)
{
	struct ibv_query_port cmd;

	return ibv_cmd_query_port(ctx, port, attr, &cmd, sizeof(cmd));
}

/* ---- PD, MR, AH ---- */

static struct ibv_pd *vr_alloc_pd(struct ibv_context *ctx)
{
	struct ibv_alloc_pd cmd;
	struct ib_uverbs_alloc_pd_resp resp;
	struct ibv_pd *pd = calloc(1, sizeof(*pd));

	if (!pd)
		return NULL;
	if (ibv_cmd_alloc_pd(ctx, pd, &cmd, sizeof(cmd), &resp, sizeof(resp))) {
		free(pd);
		return NULL;
	}
	return pd;
}

static int vr_dealloc_pd(struct ibv_pd *pd)
{
	int ret = ibv_cmd_dealloc_pd(pd);

	if (!ret)
		free(pd);
	return ret;
}

static struct ibv_mr *vr_reg_mr(struct ibv_pd *pd, void *addr, size_t length, uint64_t hca_va, int access)
{
	struct ibv_reg_mr cmd;
	struct ib_uverbs_reg_mr_resp resp;
	struct verbs_mr *vmr = calloc(1, sizeof(*vmr));

	if (!vmr)
		return NULL;
	if (ibv_cmd_reg_mr(pd, addr, length, hca_va, access, vmr, &cmd, sizeof(cmd), &resp, sizeof(resp))) {
		free(vmr);
		return NULL;
	}
	return &vmr->ibv_mr;
}

static int vr_dereg_mr(struct verbs_mr *vmr)
{
	int ret = ibv_cmd_dereg_mr(vmr);

	if (!ret)
		free(vmr);
	return ret;
}

struct vr_create_ah_resp {
	struct ib_uverbs_create_ah_resp ibv_resp;
	struct virtio_rdma_create_ah_resp drv;
};

static struct ibv_ah *vr_create_ah(struct ibv_pd *pd, struct ibv_ah_attr *attr)
{
	struct vr_create_ah_resp resp = {};
	struct vr_ah *ah = calloc(1, sizeof(*ah));

	if (!ah)
		return NULL;
	if (ibv_cmd_create_ah(pd, &ah->ibv_ah, attr, &resp.ibv_resp, sizeof(resp))) {
		free(ah);
		return NULL;
	}
	ah->handle = resp.drv.ah_handle;
	return &ah->ibv_ah;
}

static int vr_destroy_ah(struct ibv_ah *ah)
{
	int ret = ibv_cmd_destroy_ah(ah);

	if (!ret)
		free(to_vah(ah));
	return ret;
}

/* ---- mappings of the module's rings ---- */

static void *vr_map(struct ibv_context *ctx, uint64_t offset, size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ctx->cmd_fd, offset);

	return p == MAP_FAILED ? NULL : p;
}

static void vr_unmap(void *p, size_t bytes)
{
	if (p)
		munmap(p, bytes);
}

/* ---- CQ ---- */

struct vr_create_cq_resp {
	struct ib_uverbs_create_cq_resp ibv_resp;
	struct virtio_rdma_create_cq_resp drv;
};

static struct ibv_cq *vr_create_cq(struct ibv_context *ctx, int cqe, struct ibv_comp_channel *channel,
				   int comp_vector)
{
	struct ibv_create_cq cmd;
	struct vr_create_cq_resp resp = {};
	struct vr_cq *cq = calloc(1, sizeof(*cq));

	if (!cq)
		return NULL;
	if (ibv_cmd_create_cq(ctx, cqe, channel, comp_vector, &cq->ibv_cq, &cmd, sizeof(cmd), &resp.ibv_resp,
			      sizeof(resp)))
		goto err_free;
	cq->handle = resp.drv.cq_handle;
	cq->depth = resp.drv.cqe_count;
	cq->ring_bytes = resp.drv.ring_bytes;
	/* The module's answer is checked before it is used: a ring too small for its depth is refused. */
	if (!cq->depth || (cq->depth & (cq->depth - 1)) ||
	    (uint64_t)cq->depth * sizeof(struct vrdma_cqe) > cq->ring_bytes) {
		errno = EPROTO;
		goto err_destroy;
	}
	cq->ring = vr_map(ctx, resp.drv.ring_offset, cq->ring_bytes);
	cq->index_page = vr_map(ctx, resp.drv.index_offset, sysconf(_SC_PAGESIZE));
	if (!cq->ring || !cq->index_page)
		goto err_destroy;
	cq->index = (struct vrdma_queue_index *)((char *)cq->index_page + VIRTIO_RDMA_CQ_INDEX_OFFSET);
	pthread_spin_init(&cq->lock, PTHREAD_PROCESS_PRIVATE);
	return &cq->ibv_cq;

err_destroy:
	vr_unmap(cq->ring, cq->ring_bytes);
	vr_unmap(cq->index_page, sysconf(_SC_PAGESIZE));
	ibv_cmd_destroy_cq(&cq->ibv_cq);
err_free:
	free(cq);
	return NULL;
}

static int vr_destroy_cq(struct ibv_cq *ibcq)
{
	struct vr_cq *cq = to_vcq(ibcq);
	int ret = ibv_cmd_destroy_cq(ibcq);

	if (ret)
		return ret;
	vr_unmap(cq->ring, cq->ring_bytes);
	vr_unmap(cq->index_page, sysconf(_SC_PAGESIZE));
	pthread_spin_destroy(&cq->lock);
	free(cq);
	return 0;
}

static int vr_req_notify_cq(struct ibv_cq *cq, int solicited_only)
{
	/* consumer_index was stored by the last poll; the device notifies at once if CQEs wait (spec 10.7). */
	return ibv_cmd_req_notify_cq(cq, solicited_only);
}

/* ---- QP ---- */

struct vr_create_qp_resp {
	struct ib_uverbs_create_qp_resp ibv_resp;
	struct virtio_rdma_create_qp_resp drv;
};

struct vr_qp *vr_find_qp(struct vr_context *ctx, uint32_t handle)
{
	struct vr_qp *qp;

	pthread_mutex_lock(&ctx->qp_lock);
	for (qp = ctx->qp_table[handle % VR_QP_BUCKETS]; qp && qp->handle != handle; qp = qp->next)
		;
	pthread_mutex_unlock(&ctx->qp_lock);
	return qp;
}

static void vr_qp_unlink(struct vr_context *ctx, struct vr_qp *qp)
{
	struct vr_qp **p;

	pthread_mutex_lock(&ctx->qp_lock);
	for (p = &ctx->qp_table[qp->handle % VR_QP_BUCKETS]; *p; p = &(*p)->next)
		if (*p == qp) {
			*p = qp->next;
			break;
		}
	pthread_mutex_unlock(&ctx->qp_lock);
}

static bool vr_ring_ok(uint32_t depth, size_t entry, size_t bytes)
{
	return depth && !(depth & (depth - 1)) && (uint64_t)depth * entry <= bytes;
}

static void vr_qp_unmap(struct vr_qp *qp)
{
	vr_unmap(qp->sq, qp->sq_bytes);
	vr_unmap(qp->rq, qp->rq_bytes);
	vr_unmap(qp->index_page, sysconf(_SC_PAGESIZE));
}

static struct ibv_qp *vr_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr)
{
	struct vr_context *ctx = to_vctx(pd->context);
	struct ibv_create_qp cmd;
	struct vr_create_qp_resp resp = {};
	struct vr_qp *qp;

	if (attr->srq || (attr->qp_type != IBV_QPT_RC && attr->qp_type != IBV_QPT_UD)) {
		errno = EOPNOTSUPP; /* version 1 has RC and UD QPs and no SRQ (spec 8.10) */
		return NULL;
	}
	qp = calloc(1, sizeof(*qp));
	if (!qp)
		return NULL;
	if (ibv_cmd_create_qp(pd, &qp->ibv_qp, attr, &cmd, sizeof(cmd), &resp.ibv_resp, sizeof(resp)))
		goto err_free;
	qp->handle = resp.drv.qp_handle;
	qp->type = attr->qp_type == IBV_QPT_UD ? VRDMA_QPT_UD : VRDMA_QPT_RC;
	qp->sq_depth = resp.drv.sq_depth;
	qp->rq_depth = resp.drv.rq_depth;
	qp->sq_bytes = resp.drv.sq_bytes;
	qp->rq_bytes = resp.drv.rq_bytes;
	qp->max_send_sge = attr->cap.max_send_sge;
	qp->max_recv_sge = attr->cap.max_recv_sge;
	qp->max_inline = resp.drv.max_inline_data;
	if (!vr_ring_ok(qp->sq_depth, sizeof(struct vrdma_send_wqe), qp->sq_bytes) ||
	    !vr_ring_ok(qp->rq_depth, sizeof(struct vrdma_recv_wqe), qp->rq_bytes) ||
	    qp->max_inline > sizeof(((struct vrdma_send_wqe *)0)->payload.inline_data)) {
		errno = EPROTO;
		goto err_destroy;
	}
	qp->sq = vr_map(pd->context, resp.drv.sq_offset, qp->sq_bytes);
	qp->rq = vr_map(pd->context, resp.drv.rq_offset, qp->rq_bytes);
	qp->index_page = vr_map(pd->context, resp.drv.index_offset, sysconf(_SC_PAGESIZE));
	if (!qp->sq || !qp->rq || !qp->index_page)
		goto err_destroy;
	qp->sq_index = (struct vrdma_queue_index *)((char *)qp->index_page + VIRTIO_RDMA_SQ_INDEX_OFFSET);
	qp->rq_index = (struct vrdma_queue_index *)((char *)qp->index_page + VIRTIO_RDMA_RQ_INDEX_OFFSET);
	pthread_spin_init(&qp->sq_lock, PTHREAD_PROCESS_PRIVATE);
	pthread_spin_init(&qp->rq_lock, PTHREAD_PROCESS_PRIVATE);
	attr->cap.max_inline_data = qp->max_inline;
	pthread_mutex_lock(&ctx->qp_lock);
	qp->next = ctx->qp_table[qp->handle % VR_QP_BUCKETS];
	ctx->qp_table[qp->handle % VR_QP_BUCKETS] = qp;
	pthread_mutex_unlock(&ctx->qp_lock);
	return &qp->ibv_qp;

err_destroy:
	vr_qp_unmap(qp);
	ibv_cmd_destroy_qp(&qp->ibv_qp);
err_free:
	free(qp);
	return NULL;
}

static int vr_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask)
{
	struct ibv_modify_qp cmd = {};

	return ibv_cmd_modify_qp(qp, attr, attr_mask, &cmd, sizeof(cmd));
}

static int vr_query_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask,
		       struct ibv_qp_init_attr *init_attr)
{
	struct ibv_query_qp cmd;

	return ibv_cmd_query_qp(qp, attr, attr_mask, init_attr, &cmd, sizeof(cmd));
}

static int vr_destroy_qp(struct ibv_qp *ibqp)
{
	struct vr_qp *qp = to_vqp(ibqp);
	int ret = ibv_cmd_destroy_qp(ibqp);

	if (ret)
		return ret;
	/* Its flush completions may still sit in the CQ rings: poll_cq skips them once the QP is unlinked. */
	vr_qp_unlink(to_vctx(ibqp->context), qp);
	vr_qp_unmap(qp);
	pthread_spin_destroy(&qp->sq_lock);
	pthread_spin_destroy(&qp->rq_lock);
	free(qp);
	return 0;
}

/* ---- context and device ---- */

static const struct verbs_context_ops vr_ctx_ops = {
	.query_device_ex = vr_query_device,
	.query_port = vr_query_port,
	.alloc_pd = vr_alloc_pd,
	.dealloc_pd = vr_dealloc_pd,
	.reg_mr = vr_reg_mr,
	.dereg_mr = vr_dereg_mr,
	.create_ah = vr_create_ah,
	.destroy_ah = vr_destroy_ah,
	.create_cq = vr_create_cq,
	.destroy_cq = vr_destroy_cq,
	.poll_cq = vr_poll_cq,
	.req_notify_cq = vr_req_notify_cq,
	.create_qp = vr_create_qp,
	.modify_qp = vr_modify_qp,
	.query_qp = vr_query_qp,
	.destroy_qp = vr_destroy_qp,
	.post_send = vr_post_send,
	.post_recv = vr_post_recv,
	.free_context = vr_free_context,
};

struct vr_get_context_resp {
	struct ib_uverbs_get_context_resp ibv_resp;
	struct virtio_rdma_alloc_ucontext_resp drv;
};

static struct verbs_context *vr_alloc_context(struct ibv_device *ibdev, int cmd_fd, void *private_data)
{
	struct ibv_get_context cmd;
	struct vr_get_context_resp resp = {};
	struct vr_context *ctx = verbs_init_and_alloc_context(ibdev, cmd_fd, ctx, ibv_ctx, RDMA_DRIVER_UNKNOWN);

	if (!ctx)
		return NULL;
	if (ibv_cmd_get_context(&ctx->ibv_ctx, &cmd, sizeof(cmd), &resp.ibv_resp, sizeof(resp)))
		goto err;
	/* The entry sizes of spec 10.1: a module speaking another layout is not this provider's. */
	if (resp.drv.sq_wqe_size != sizeof(struct vrdma_send_wqe) ||
	    resp.drv.rq_wqe_size != sizeof(struct vrdma_recv_wqe) || resp.drv.cqe_size != sizeof(struct vrdma_cqe)) {
		fprintf(stderr, "virtio_rdma: the module's WQE/CQE sizes %u/%u/%u are not this provider's\n",
			resp.drv.sq_wqe_size, resp.drv.rq_wqe_size, resp.drv.cqe_size);
		errno = EPROTO;
		goto err;
	}
	ctx->max_inline_data = resp.drv.max_inline_data;
	pthread_mutex_init(&ctx->qp_lock, NULL);
	verbs_set_ops(&ctx->ibv_ctx, &vr_ctx_ops);
	return &ctx->ibv_ctx;
err:
	verbs_uninit_context(&ctx->ibv_ctx);
	free(ctx);
	return NULL;
}

static void vr_free_context(struct ibv_context *ibctx)
{
	struct vr_context *ctx = to_vctx(ibctx);

	pthread_mutex_destroy(&ctx->qp_lock);
	verbs_uninit_context(&ctx->ibv_ctx);
	free(ctx);
}

static struct verbs_device *vr_device_alloc(struct verbs_sysfs_dev *sysfs_dev)
{
	struct verbs_device *dev = calloc(1, sizeof(*dev));

	return dev;
}

static void vr_device_free(struct verbs_device *dev)
{
	free(dev);
}

/* The module registers no driver id of its own: the device is matched by the virtio modalias (ID 42). */
static const struct verbs_match_ent vr_match_table[] = {
	VERBS_MODALIAS_MATCH("virtio:d0000002Av*", NULL),
	VERBS_NAME_MATCH("virtio_rdma", NULL),
	{},
};

static const struct verbs_device_ops vr_dev_ops = {
	.name = "virtio_rdma",
	.match_min_abi_version = VIRTIO_RDMA_ABI_VERSION,
	.match_max_abi_version = VIRTIO_RDMA_ABI_VERSION,
	.match_table = vr_match_table,
	.alloc_device = vr_device_alloc,
	.uninit_device = vr_device_free,
	.alloc_context = vr_alloc_context,
};

PROVIDER_DRIVER(virtio_rdma, vr_dev_ops);
