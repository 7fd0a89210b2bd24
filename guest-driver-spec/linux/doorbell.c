// SPDX-License-Identifier: GPL-2.0
/*
 * Doorbell queue 0 (spec 10.6): each doorbell is one 8-byte record in its own device-readable buffer. Records
 * carry no index (the device reads producer_index from the index block), so they are idempotent; the driver
 * only needs a free slot. Slots are the records array; a slot is busy from its post until the device returns its buffer.
 * The queue raises no interrupt the driver needs: used buffers are reclaimed when the next record is posted.
 */
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/bitmap.h>
#include "virtio_rdma.h"

/* Spins before the driver gives up on a full doorbell queue (the device stopped taking records). */
#define VRDMA_DB_SPIN_LIMIT 100000

int vrdma_doorbell_init(struct vrdma_dev *dev)
{
	spin_lock_init(&dev->db_lock);
	dev->db_slots = virtqueue_get_vring_size(dev->db_vq);
	dev->db_records = kcalloc(dev->db_slots, sizeof(*dev->db_records), GFP_KERNEL);
	dev->db_busy = bitmap_zalloc(dev->db_slots, GFP_KERNEL);
	virtqueue_disable_cb(dev->db_vq);
	return dev->db_records && dev->db_busy ? 0 : -ENOMEM;
}

void vrdma_doorbell_fini(struct vrdma_dev *dev)
{
	kfree(dev->db_records);
	bitmap_free(dev->db_busy);
	dev->db_records = NULL;
	dev->db_busy = NULL;
}

static void vrdma_db_reclaim(struct vrdma_dev *dev)
{
	struct vrdma_doorbell *rec;
	unsigned int len;

	while ((rec = virtqueue_get_buf(dev->db_vq, &len)))
		clear_bit(rec - dev->db_records, dev->db_busy);
}

int vrdma_ring_doorbell(struct vrdma_dev *dev, u32 handle, u8 type)
{
	struct scatterlist sg;
	struct vrdma_doorbell *rec;
	unsigned long flags;
	unsigned int spins = 0;
	unsigned long slot;
	int ret;

	spin_lock_irqsave(&dev->db_lock, flags);
	for (;;) {
		vrdma_db_reclaim(dev);
		if (dev->db_vq->num_free > 0)
			break;
		if (++spins > VRDMA_DB_SPIN_LIMIT) {
			spin_unlock_irqrestore(&dev->db_lock, flags);
			dev_warn_ratelimited(&dev->vdev->dev, "doorbell queue full: the device takes no records\n");
			return -EBUSY;
		}
		cpu_relax();
	}
	/* A free descriptor means fewer than `slots` buffers are out: a free slot exists. */
	slot = find_first_zero_bit(dev->db_busy, dev->db_slots);
	if (WARN_ON_ONCE(slot >= dev->db_slots)) {
		spin_unlock_irqrestore(&dev->db_lock, flags);
		return -EBUSY;
	}
	set_bit(slot, dev->db_busy);
	rec = &dev->db_records[slot];
	rec->handle = cpu_to_le32(handle);
	rec->type = type;
	memset(rec->reserved, 0, sizeof(rec->reserved));
	sg_init_one(&sg, rec, sizeof(*rec));
	ret = virtqueue_add_outbuf(dev->db_vq, &sg, 1, rec, GFP_ATOMIC);
	if (!ret)
		virtqueue_kick(dev->db_vq);
	else
		clear_bit(slot, dev->db_busy);
	spin_unlock_irqrestore(&dev->db_lock, flags);
	return ret;
}
