// SPDX-License-Identifier: GPL-2.0
/*
 * Rings and index blocks of kernel QPs and CQs (spec 10.2): physically contiguous zeroed memory, given to the
 * device as a list of 4 KiB guest-physical pages (page_shift 12 is always allowed, spec 5.1). Without
 * VIRTIO_F_ACCESS_PLATFORM the device reads guest physical addresses (spec 4), hence virt_to_phys.
 */
#include <linux/slab.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include "virtio_rdma.h"

int vrdma_ring_alloc(struct vrdma_ring *ring, u32 depth, u32 entry_size)
{
	ring->depth = depth;
	ring->bytes = PAGE_ALIGN((size_t)depth * entry_size);
	ring->buf = alloc_pages_exact(ring->bytes, GFP_KERNEL | __GFP_ZERO);
	return ring->buf ? 0 : -ENOMEM;
}

void vrdma_ring_free(struct vrdma_ring *ring)
{
	if (ring->buf)
		free_pages_exact(ring->buf, ring->bytes);
	ring->buf = NULL;
}

/* The ring's page list (kmalloc'd, caller frees); *count gets its entries: ceil(depth * size / 4096). */
__le64 *vrdma_ring_pages(const struct vrdma_ring *ring, u32 *count)
{
	u32 n = ring->bytes >> VRDMA_PAGE_SHIFT, i;
	__le64 *pages = kmalloc_array(n, sizeof(*pages), GFP_KERNEL);

	if (!pages)
		return NULL;
	for (i = 0; i < n; i++)
		pages[i] = cpu_to_le64(virt_to_phys(ring->buf) + ((u64)i << VRDMA_PAGE_SHIFT));
	*count = n;
	return pages;
}
