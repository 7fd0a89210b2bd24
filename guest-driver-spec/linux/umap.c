// SPDX-License-Identifier: GPL-2.0
/*
 * User space's view of the relayed data path (virtio_rdma_abi.h): the user context, and the rings and index pages
 * of user CQs and QPs exposed through rdma_user_mmap entries on the uverbs file.
 */
#include <linux/mm.h>
#include <linux/slab.h>
#include "virtio_rdma.h"

int vrdma_alloc_ucontext(struct ib_ucontext *uctx, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(uctx->device);
	struct virtio_rdma_alloc_ucontext_resp resp = {
		.sq_wqe_size = VRDMA_SQ_WQE_SIZE,
		.rq_wqe_size = VRDMA_RQ_WQE_SIZE,
		.cqe_size = VRDMA_CQE_SIZE,
		.max_inline_data = dev->f_inline ? le32_to_cpu(dev->cfg.max_inline_data) : 0,
	};

	/* A consumer without the provider (no response buffer) still gets a context: query, PD and MR work. */
	if (!udata->outlen)
		return 0;
	return ib_copy_to_udata(udata, &resp, min_t(size_t, sizeof(resp), udata->outlen));
}

void vrdma_dealloc_ucontext(struct ib_ucontext *uctx)
{
}

/* buf: from alloc_pages_exact (order-0 pages, each with its own reference, as vm_insert_page needs). */
struct vrdma_umap *vrdma_umap_insert(struct ib_ucontext *uctx, void *buf, size_t bytes, u64 *offset)
{
	struct vrdma_umap *umap = kzalloc(sizeof(*umap), GFP_KERNEL);

	if (!umap)
		return NULL;
	umap->buf = buf;
	umap->bytes = PAGE_ALIGN(bytes);
	if (rdma_user_mmap_entry_insert(uctx, &umap->rdma, umap->bytes)) {
		kfree(umap);
		return NULL;
	}
	*offset = rdma_user_mmap_get_offset(&umap->rdma);
	return umap;
}

/* The object is gone: no new mmap finds the entry; the memory goes in mmap_free when the last reference drops. */
void vrdma_umap_remove(struct vrdma_umap *umap)
{
	if (umap)
		rdma_user_mmap_entry_remove(&umap->rdma);
}

int vrdma_mmap(struct ib_ucontext *uctx, struct vm_area_struct *vma)
{
	/* The core finds the entry by vm_pgoff and checks that the length is the entry's exactly. */
	struct rdma_user_mmap_entry *entry = rdma_user_mmap_entry_get(uctx, vma);
	struct vrdma_umap *umap;
	unsigned long i;
	int ret = 0;

	if (!entry)
		return -EINVAL;
	umap = container_of(entry, struct vrdma_umap, rdma);
	if (vma->vm_flags & VM_EXEC) {
		ret = -EPERM;
		goto out;
	}
	vma->vm_flags &= ~VM_MAYEXEC;
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
	for (i = 0; i < umap->bytes >> PAGE_SHIFT && !ret; i++)
		ret = vm_insert_page(vma, vma->vm_start + (i << PAGE_SHIFT),
				     virt_to_page(umap->buf + (i << PAGE_SHIFT)));
out:
	rdma_user_mmap_entry_put(entry);
	return ret;
}

void vrdma_mmap_free(struct rdma_user_mmap_entry *entry)
{
	struct vrdma_umap *umap = container_of(entry, struct vrdma_umap, rdma);

	free_pages_exact(umap->buf, umap->bytes);
	kfree(umap);
}
