/* SPDX-License-Identifier: GPL-2.0 */
/*
 * libibverbs provider of the virtio-rdma Linux driver (guest-driver-spec/linux/): the relayed data path of version 1
 * (spec 10) from user space. Objects and helpers shared by the provider's files.
 */
#ifndef VIRTIO_RDMA_PROVIDER_H
#define VIRTIO_RDMA_PROVIDER_H

#include <stdint.h>
#include <pthread.h>
#include <infiniband/driver.h>

/* spec.h is the module's wire-format header; it names its integer types as the kernel does. */
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#include "spec.h"
#include "virtio_rdma_abi.h"

/* Buckets of the QP table that poll_cq searches by the CQE's qp_handle (handles are up to 24 bits, spec 7.6). */
#define VR_QP_BUCKETS 256

struct vr_qp;

struct vr_context {
	struct verbs_context ibv_ctx;
	uint32_t max_inline_data;
	pthread_mutex_t qp_lock;
	struct vr_qp *qp_table[VR_QP_BUCKETS];
};

struct vr_cq {
	struct ibv_cq ibv_cq;
	pthread_spinlock_t lock;
	void *ring;
	size_t ring_bytes;
	void *index_page;
	struct vrdma_queue_index *index;
	uint32_t depth;
	uint32_t handle;
};

struct vr_qp {
	struct ibv_qp ibv_qp;
	struct vr_qp *next; /* in its qp_table bucket */
	uint32_t handle;
	uint8_t type; /* VRDMA_QPT_RC or VRDMA_QPT_UD */
	void *sq, *rq, *index_page;
	size_t sq_bytes, rq_bytes;
	struct vrdma_queue_index *sq_index, *rq_index;
	uint32_t sq_depth, rq_depth;
	uint32_t max_send_sge, max_recv_sge, max_inline;
	pthread_spinlock_t sq_lock, rq_lock;
};

struct vr_ah {
	struct ibv_ah ibv_ah;
	uint32_t handle; /* the device's */
};

static inline struct vr_context *to_vctx(struct ibv_context *c)
{
	return container_of(c, struct vr_context, ibv_ctx.context);
}
static inline struct vr_cq *to_vcq(struct ibv_cq *c) { return container_of(c, struct vr_cq, ibv_cq); }
static inline struct vr_qp *to_vqp(struct ibv_qp *q) { return container_of(q, struct vr_qp, ibv_qp); }
static inline struct vr_ah *to_vah(struct ibv_ah *a) { return container_of(a, struct vr_ah, ibv_ah); }

/* datapath.c */
int vr_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
int vr_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr);
int vr_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
struct vr_qp *vr_find_qp(struct vr_context *ctx, uint32_t handle);

#endif
