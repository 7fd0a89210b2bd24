/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio_rdma: the Linux guest driver of the virtio-rdma device (virtio ID 42), version 1 of
 * guest-driver-spec/virtio-rdma.md. Shared state and the prototypes of the files of this module.
 */
#ifndef VIRTIO_RDMA_H
#define VIRTIO_RDMA_H

#include <linux/virtio.h>
#include <linux/xarray.h>
#include <linux/netdevice.h>
#include <rdma/ib_verbs.h>
#include <rdma/ib_umem.h>
#include <rdma/uverbs_ioctl.h>
#include "spec.h"
#include "virtio_rdma_abi.h"

/*
 * Limits of this driver (named, so a reader sees every bound in one place).
 *   VRDMA_MAX_CMD_PAGES: page-list entries one control request carries; a request is one kmalloc'd buffer, so
 *     this keeps it at 32 KiB. Larger MRs go out as REG_MR + REG_MR_CONTINUE (spec 8.14).
 *   VRDMA_KERNEL_MAX_WR / _MAX_CQE: depth of rings this driver allocates for kernel QPs and CQs, so a ring always
 *     fits in one command (spec 5.2 guarantees it for the device's maxima; this driver's buffer is smaller).
 *   VRDMA_EVENT_BUFFERS: event buffers kept posted (spec 9.4: armed CQs + 4; more are posted as the queue allows).
 *   VRDMA_CTRL_WARN_S: a control request has no time bound (spec 7.3); the driver warns while it waits.
 */
#define VRDMA_MAX_CMD_PAGES 4096
#define VRDMA_KERNEL_MAX_WR 4096
#define VRDMA_KERNEL_MAX_CQE 8192
#define VRDMA_EVENT_BUFFERS 64
#define VRDMA_CTRL_WARN_S 30
#define VRDMA_GUEST_GID_TBL_LEN 16 /* the core's RoCE table for the netdev's addresses (see verbs_device.c) */

struct vrdma_dev {
	struct ib_device ib;
	struct virtio_device *vdev;
	struct virtqueue *ctrl_vq, *event_vq, *db_vq;

	/* Control queue: one request in flight (the device runs them one at a time anyway, spec 7.3). */
	struct mutex ctrl_lock;
	struct completion ctrl_done;
	spinlock_t ctrl_vq_lock;
	u64 ctrl_tag;

	/* Event queue. */
	struct vrdma_event *events; /* VRDMA_EVENT_BUFFERS buffers of 32 bytes */
	spinlock_t event_lock;
	struct work_struct event_work;
	bool removing;

	/* Doorbell queue 0: one 8-byte record per buffer; a slot is busy until the device returns it. */
	spinlock_t db_lock;
	struct vrdma_doorbell *db_records;
	unsigned long *db_busy;
	unsigned int db_slots;

	/* Objects the device names by handle in events and CQEs. */
	struct xarray cqs, qps;

	/* Configuration (spec 5) and what was negotiated. */
	struct vrdma_config cfg;
	bool f_rc, f_ud, f_atomic, f_imm, f_inline;
	struct ib_device_attr attr_cache;

	struct notifier_block nb;
	struct net_device *netdev; /* the guest netdev that holds the virtual MAC, or NULL */
};

struct vrdma_pd { struct ib_pd ib; u32 handle; };
struct vrdma_ah { struct ib_ah ib; u32 handle; };
struct vrdma_ucontext { struct ib_ucontext ib; };

/*
 * Memory of a user queue (ring or index page) exposed with an rdma_user_mmap entry. The entry owns it: the memory
 * is freed in mmap_free, once the object was destroyed (entry removed) and no mmap() is in progress; pages a
 * process still maps stay alive by their page references (vm_insert_page) until munmap.
 */
struct vrdma_umap {
	struct rdma_user_mmap_entry rdma;
	void *buf;
	size_t bytes;
};

/* A ring in kernel memory: physically contiguous, described to the device as 4 KiB pages. */
struct vrdma_ring {
	void *buf;
	size_t bytes;
	u32 depth;
};

struct vrdma_cq {
	struct ib_cq ib;
	u32 handle;
	struct vrdma_ring ring;
	struct vrdma_queue_index *index;
	spinlock_t lock;
	bool user; /* ring and index page mapped by a process (the index is then a page of its own) */
	struct vrdma_umap *umap_ring, *umap_index; /* user CQs only */
};

struct vrdma_qp {
	struct ib_qp ib;
	u32 handle, qp_num;
	u8 type, sig_all;
	u32 max_send_sge, max_recv_sge, max_inline;
	struct vrdma_ring sq, rq;
	struct vrdma_queue_index *sq_index, *rq_index;
	spinlock_t sq_lock, rq_lock;
	enum ib_qp_state state;
	u8 sgid_index; /* the core GID table's index the consumer gave with AV (the device's is always 0) */
	bool user; /* rings in user space: post_send / post_recv with no WR are the provider's doorbells */
	void *index_page; /* user QPs: the page holding both index blocks */
	struct vrdma_umap *umap_sq, *umap_rq, *umap_index;
};

struct vrdma_mr { struct ib_mr ib; u32 handle; struct ib_umem *umem; };

static inline struct vrdma_dev *to_vdev(struct ib_device *ib) { return container_of(ib, struct vrdma_dev, ib); }
static inline struct vrdma_pd *to_vpd(struct ib_pd *pd) { return container_of(pd, struct vrdma_pd, ib); }
static inline struct vrdma_cq *to_vcq(struct ib_cq *cq) { return container_of(cq, struct vrdma_cq, ib); }
static inline struct vrdma_qp *to_vqp(struct ib_qp *qp) { return container_of(qp, struct vrdma_qp, ib); }
static inline struct vrdma_mr *to_vmr(struct ib_mr *mr) { return container_of(mr, struct vrdma_mr, ib); }
static inline struct vrdma_ah *to_vah(struct ib_ah *ah) { return container_of(ah, struct vrdma_ah, ib); }

/* ctrlq.c */
int vrdma_cmd(struct vrdma_dev *dev, u16 command, const void *req, u32 req_len, const __le64 *pages,
	      u32 num_pages, void *resp, u32 resp_len);
int vrdma_status_to_errno(u16 status);
void vrdma_ctrl_done(struct virtqueue *vq);

/* eventq.c */
int vrdma_event_init(struct vrdma_dev *dev);
void vrdma_event_fini(struct vrdma_dev *dev);
void vrdma_event_ready(struct virtqueue *vq);

/* doorbell.c */
int vrdma_doorbell_init(struct vrdma_dev *dev);
void vrdma_doorbell_fini(struct vrdma_dev *dev);
int vrdma_ring_doorbell(struct vrdma_dev *dev, u32 handle, u8 type);

/* ring.c */
int vrdma_ring_alloc(struct vrdma_ring *ring, u32 depth, u32 entry_size);
void vrdma_ring_free(struct vrdma_ring *ring);
__le64 *vrdma_ring_pages(const struct vrdma_ring *ring, u32 *count);

/* umap.c: user mappings of rings and index pages */
struct vrdma_umap *vrdma_umap_insert(struct ib_ucontext *uctx, void *buf, size_t bytes, u64 *offset);
void vrdma_umap_remove(struct vrdma_umap *umap);
int vrdma_mmap(struct ib_ucontext *uctx, struct vm_area_struct *vma);
void vrdma_mmap_free(struct rdma_user_mmap_entry *entry);
int vrdma_alloc_ucontext(struct ib_ucontext *uctx, struct ib_udata *udata);
void vrdma_dealloc_ucontext(struct ib_ucontext *uctx);

/* verbs_device.c */
extern const struct ib_device_ops vrdma_dev_ops;
void vrdma_read_config(struct vrdma_dev *dev);
bool vrdma_is_virtual_gid(struct vrdma_dev *dev, const union ib_gid *gid);
int vrdma_load_device_attr(struct vrdma_dev *dev);
int vrdma_query_device_gid(struct vrdma_dev *dev, u8 gid[16]);

/* verbs_pd_mr.c, verbs_cq.c, verbs_qp.c, datapath.c */
int vrdma_alloc_pd(struct ib_pd *pd, struct ib_udata *udata);
int vrdma_dealloc_pd(struct ib_pd *pd, struct ib_udata *udata);
struct ib_mr *vrdma_get_dma_mr(struct ib_pd *pd, int access);
struct ib_mr *vrdma_reg_user_mr(struct ib_pd *pd, u64 start, u64 length, u64 virt, int access,
				struct ib_udata *udata);
int vrdma_dereg_mr(struct ib_mr *mr, struct ib_udata *udata);
int vrdma_create_ah(struct ib_ah *ah, struct rdma_ah_init_attr *attr, struct ib_udata *udata);
int vrdma_destroy_ah(struct ib_ah *ah, u32 flags);
int vrdma_create_cq(struct ib_cq *cq, const struct ib_cq_init_attr *attr, struct ib_udata *udata);
int vrdma_destroy_cq(struct ib_cq *cq, struct ib_udata *udata);
int vrdma_poll_cq(struct ib_cq *cq, int num_entries, struct ib_wc *wc);
int vrdma_req_notify_cq(struct ib_cq *cq, enum ib_cq_notify_flags flags);
int vrdma_create_qp(struct ib_qp *qp, struct ib_qp_init_attr *init, struct ib_udata *udata);
int vrdma_modify_qp(struct ib_qp *qp, struct ib_qp_attr *attr, int mask, struct ib_udata *udata);
int vrdma_query_qp(struct ib_qp *qp, struct ib_qp_attr *attr, int mask, struct ib_qp_init_attr *init);
int vrdma_destroy_qp(struct ib_qp *qp, struct ib_udata *udata);
int vrdma_post_send(struct ib_qp *qp, const struct ib_send_wr *wr, const struct ib_send_wr **bad_wr);
int vrdma_post_recv(struct ib_qp *qp, const struct ib_recv_wr *wr, const struct ib_recv_wr **bad_wr);

/* main.c: the access flags of the verbs API and of the spec agree bit for bit (checked there). */
static inline u32 vrdma_access(int ib_access)
{
	return ib_access & (VRDMA_ACCESS_LOCAL_WRITE | VRDMA_ACCESS_REMOTE_WRITE | VRDMA_ACCESS_REMOTE_READ |
			    VRDMA_ACCESS_REMOTE_ATOMIC);
}

#endif
