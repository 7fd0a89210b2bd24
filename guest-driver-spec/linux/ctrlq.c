// SPDX-License-Identifier: GPL-2.0
/*
 * The control queue (spec 7): one request at a time. A request is one device-readable buffer (header, fixed
 * body, page list) and one device-writable buffer (response header, body); the driver sleeps until the device
 * returns the chain, then turns the status into an errno.
 */
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include "virtio_rdma.h"

/* Spec 7.4 status to errno. The verbs API's callers expect EINVAL for bad arguments and ENOMEM for limits. */
int vrdma_status_to_errno(u16 status)
{
	switch (status) {
	case VRDMA_S_OK: return 0;
	case VRDMA_S_INVALID_COMMAND: return -EOPNOTSUPP;
	case VRDMA_S_INVALID_LENGTH: return -EPROTO;	/* driver and device disagree on a layout */
	case VRDMA_S_INVALID_HANDLE: return -EINVAL;
	case VRDMA_S_INVALID_ARGUMENT: return -EINVAL;
	case VRDMA_S_NO_RESOURCES: return -ENOMEM;
	case VRDMA_S_OUT_OF_RANGE: return -EFAULT;
	case VRDMA_S_NOT_SUPPORTED: return -EOPNOTSUPP;
	case VRDMA_S_REFUSED_BY_POLICY: return -EACCES;
	case VRDMA_S_DESTINATION_UNREACHABLE: return -EHOSTUNREACH;
	case VRDMA_S_WRONG_STATE: return -EINVAL;
	case VRDMA_S_BUSY: return -EBUSY;
	case VRDMA_S_DEVICE_ERROR: return -EIO;
	default: return -EPROTO;	/* a status version 1 does not define */
	}
}

void vrdma_ctrl_done(struct virtqueue *vq)
{
	struct vrdma_dev *dev = vq->vdev->priv;

	complete(&dev->ctrl_done);
}

/*
 * Sends one command and waits for its response. `pages` (num_pages entries, already little-endian) follow the
 * fixed body `req`. On OK, `resp_len` bytes of response body are copied to `resp`.
 */
int vrdma_cmd(struct vrdma_dev *dev, u16 command, const void *req, u32 req_len, const __le64 *pages,
	      u32 num_pages, void *resp, u32 resp_len)
{
	struct scatterlist out_sg, in_sg, *sgs[2] = { &out_sg, &in_sg };
	size_t out_len = sizeof(struct vrdma_req_hdr) + req_len + (size_t)num_pages * 8;
	size_t in_len = sizeof(struct vrdma_resp_hdr) + resp_len;
	struct vrdma_req_hdr *hdr;
	struct vrdma_resp_hdr *rh;
	unsigned int used = 0;
	unsigned long flags;
	void *token;
	u8 *out, *in;
	u16 status;
	u64 tag;
	int ret;

	if (num_pages > VRDMA_MAX_CMD_PAGES)
		return -EINVAL;
	out = kzalloc(out_len, GFP_KERNEL);
	in = kzalloc(in_len, GFP_KERNEL);
	if (!out || !in) {
		ret = -ENOMEM;
		goto free;
	}
	mutex_lock(&dev->ctrl_lock);
	tag = ++dev->ctrl_tag;
	hdr = (struct vrdma_req_hdr *)out;
	hdr->command = cpu_to_le16(command);
	hdr->length = cpu_to_le32(req_len + num_pages * 8);
	hdr->tag = cpu_to_le64(tag);
	if (req_len)
		memcpy(out + sizeof(*hdr), req, req_len);
	if (num_pages)
		memcpy(out + sizeof(*hdr) + req_len, pages, (size_t)num_pages * 8);
	sg_init_one(&out_sg, out, out_len);
	sg_init_one(&in_sg, in, in_len);

	reinit_completion(&dev->ctrl_done);
	spin_lock_irqsave(&dev->ctrl_vq_lock, flags);
	ret = virtqueue_add_sgs(dev->ctrl_vq, sgs, 1, 1, out, GFP_ATOMIC);
	if (!ret)
		virtqueue_kick(dev->ctrl_vq);
	spin_unlock_irqrestore(&dev->ctrl_vq_lock, flags);
	if (ret) {
		mutex_unlock(&dev->ctrl_lock);
		goto free;
	}
	/*
	 * No timeout gives the buffers back: until the device returns the chain it owns them (spec 7.3 bounds no
	 * request's time). Say so in the log while waiting.
	 */
	for (;;) {
		spin_lock_irqsave(&dev->ctrl_vq_lock, flags);
		token = virtqueue_get_buf(dev->ctrl_vq, &used);
		spin_unlock_irqrestore(&dev->ctrl_vq_lock, flags);
		if (token)
			break;
		if (!wait_for_completion_timeout(&dev->ctrl_done, VRDMA_CTRL_WARN_S * HZ))
			dev_warn(&dev->vdev->dev, "control command 0x%x: no response for %d s, still waiting\n",
				 command, VRDMA_CTRL_WARN_S);
	}
	mutex_unlock(&dev->ctrl_lock);

	rh = (struct vrdma_resp_hdr *)in;
	if (token != out || used < sizeof(*rh) || le64_to_cpu(rh->tag) != tag) {
		dev_err(&dev->vdev->dev, "control command 0x%x: malformed response (used %u)\n", command, used);
		ret = -EPROTO;
		goto free;
	}
	status = le16_to_cpu(rh->status);
	ret = vrdma_status_to_errno(status);
	if (ret) {
		dev_dbg(&dev->vdev->dev, "control command 0x%x: status %u detail %u\n", command, status,
			le32_to_cpu(rh->detail));
		goto free;
	}
	if (used < in_len) {
		dev_err(&dev->vdev->dev, "control command 0x%x: response body %u bytes, %u expected\n", command,
			used - (unsigned int)sizeof(*rh), resp_len);
		ret = -EPROTO;
		goto free;
	}
	if (resp_len)
		memcpy(resp, in + sizeof(*rh), resp_len);
free:
	kfree(out);
	kfree(in);
	return ret;
}
