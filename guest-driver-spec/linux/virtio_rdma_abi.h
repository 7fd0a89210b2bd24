/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The user-space ABI of virtio_rdma: the driver data (udata) ib_uverbs carries between this module and its
 * rdma-core provider (guest-driver-spec/linux-provider/). Shared by both; only <linux/types.h> types.
 *
 * A user CQ or QP uses the relayed data path of version 1 (spec 10) exactly as a kernel one: the module allocates
 * its rings and index blocks in guest memory, gives them to the device in CREATE_CQ / CREATE_QP, and exposes each
 * to the process with an rdma_user_mmap entry; the responses below carry the mmap offsets (on the uverbs file).
 * The provider writes WQEs and producer_index, reads CQEs and writes consumer_index, in that memory.
 *
 * Doorbells: a record goes on doorbell queue 0 (a virtqueue), which only the kernel can post to. The provider
 * rings one with the uverbs POST_SEND / POST_RECV command carrying NO work request (the module's post_send /
 * post_recv of a user QP ring the SQ / RQ doorbell), and arms a CQ with REQ_NOTIFY_CQ.
 *
 * ABI version (ib_device uverbs_abi_ver): the provider refuses a device of another version.
 */
#ifndef VIRTIO_RDMA_ABI_H
#define VIRTIO_RDMA_ABI_H

#include <linux/types.h>

#define VIRTIO_RDMA_ABI_VERSION 1

/*
 * The index page of a user queue: one page, zeroed before the device is told of it. A CQ's index block is at
 * offset 0; a QP's SQ index block at VIRTIO_RDMA_SQ_INDEX_OFFSET and its RQ index block at _RQ_INDEX_OFFSET
 * (their own cache lines: the device writes one consumer_index while the provider writes the other producer).
 */
#define VIRTIO_RDMA_CQ_INDEX_OFFSET 0
#define VIRTIO_RDMA_SQ_INDEX_OFFSET 0
#define VIRTIO_RDMA_RQ_INDEX_OFFSET 64

/* ALLOC_UCONTEXT: the entry sizes of spec 10.1, so that a provider can tell a device it does not understand. */
struct virtio_rdma_alloc_ucontext_resp {
	__u32 sq_wqe_size;   /* 128 */
	__u32 rq_wqe_size;   /* 64 */
	__u32 cqe_size;      /* 32 */
	__u32 max_inline_data; /* negotiated: 0 without VIRTIO_RDMA_F_INLINE */
};

/* CREATE_CQ: no request data. */
struct virtio_rdma_create_cq_resp {
	__aligned_u64 ring_offset;  /* mmap offset of the CQE ring: cqe_count * cqe_size bytes, page-rounded */
	__aligned_u64 index_offset; /* mmap offset of the index page (one page) */
	__u32 ring_bytes;           /* the length to map */
	__u32 cqe_count;            /* a power of two */
	__u32 cq_handle;            /* the device's handle */
	__u32 reserved;
};

/* CREATE_QP: no request data. The SQ ring holds sq_depth send WQEs, the RQ ring rq_depth receive WQEs. */
struct virtio_rdma_create_qp_resp {
	__aligned_u64 sq_offset;
	__aligned_u64 rq_offset;
	__aligned_u64 index_offset;
	__u32 sq_bytes;
	__u32 rq_bytes;
	__u32 sq_depth;   /* powers of two */
	__u32 rq_depth;
	__u32 qp_handle;  /* the handle CQEs carry (spec 10.5): the provider finds its QP by it */
	__u32 max_inline_data;
};

/* CREATE_AH: no request data. */
struct virtio_rdma_create_ah_resp {
	__u32 ah_handle; /* the device's handle, for the ah_handle of UD send WQEs */
	__u32 reserved;
};

#endif
