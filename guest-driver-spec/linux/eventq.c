// SPDX-License-Identifier: GPL-2.0
/*
 * The event queue (spec 9): the driver keeps 32-byte device-writable buffers posted; each used buffer is one
 * event. Completion events call the CQ's completion handler; the others become the verbs API's async events.
 * Events are handled in a work item (process context), never in the interrupt, so handlers may sleep and a
 * destroy can wait for a running handler with flush_work().
 */
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include "virtio_rdma.h"

static int vrdma_post_event(struct vrdma_dev *dev, struct vrdma_event *ev)
{
	struct scatterlist sg;

	memset(ev, 0, sizeof(*ev));
	sg_init_one(&sg, ev, sizeof(*ev));
	return virtqueue_add_inbuf(dev->event_vq, &sg, 1, ev, GFP_ATOMIC);
}

void vrdma_event_ready(struct virtqueue *vq)
{
	struct vrdma_dev *dev = vq->vdev->priv;

	if (!READ_ONCE(dev->removing))
		schedule_work(&dev->event_work);
}

static void vrdma_dispatch_qp(struct vrdma_dev *dev, u32 handle, enum ib_event_type type)
{
	struct ib_event ev = { .device = &dev->ib, .event = type };
	struct vrdma_qp *qp = xa_load(&dev->qps, handle);

	if (!qp) /* destroyed meanwhile: spec 9.3 lets no event name it after the response; tolerate a late one */
		return;
	if (type == IB_EVENT_QP_FATAL || type == IB_EVENT_QP_REQ_ERR || type == IB_EVENT_QP_ACCESS_ERR)
		qp->state = IB_QPS_ERR;
	if (qp->ib.event_handler) {
		ev.element.qp = &qp->ib;
		qp->ib.event_handler(&ev, qp->ib.qp_context);
	}
}

static void vrdma_dispatch_cq_error(struct vrdma_dev *dev, u32 handle)
{
	struct ib_event ev = { .device = &dev->ib, .event = IB_EVENT_CQ_ERR };
	struct vrdma_cq *cq = xa_load(&dev->cqs, handle);

	if (cq && cq->ib.event_handler) {
		ev.element.cq = &cq->ib;
		cq->ib.event_handler(&ev, cq->ib.cq_context);
	}
}

static void vrdma_dispatch_port(struct vrdma_dev *dev, enum ib_event_type type)
{
	struct ib_event ev = { .device = &dev->ib, .event = type, .element.port_num = 1 };

	vrdma_read_config(dev); /* port_state, gid and mac "may change" (spec 5.1) */
	ib_dispatch_event(&ev);
}

static void vrdma_handle_event(struct vrdma_dev *dev, const struct vrdma_event *ev)
{
	u16 type = le16_to_cpu(ev->type);
	u32 handle = le32_to_cpu(ev->handle), detail = le32_to_cpu(ev->detail);
	struct vrdma_cq *cq;

	switch (type) {
	case VRDMA_EV_COMPLETION:
		cq = xa_load(&dev->cqs, handle);
		if (cq && cq->ib.comp_handler)
			cq->ib.comp_handler(&cq->ib, cq->ib.cq_context);
		break;
	case VRDMA_EV_CQ_ERROR:
		dev_warn_ratelimited(&dev->vdev->dev, "CQ %u in error (reason %u)\n", handle, detail);
		vrdma_dispatch_cq_error(dev, handle);
		break;
	case VRDMA_EV_QP_FATAL:
		vrdma_dispatch_qp(dev, handle, IB_EVENT_QP_FATAL);
		break;
	case VRDMA_EV_QP_POLICY_TEARDOWN:
		/* The VPC no longer allows the connection: to the consumer it is a fatal QP error (issue 14). */
		dev_info_ratelimited(&dev->vdev->dev, "QP %u torn down by policy (reason %u)\n", handle, detail);
		vrdma_dispatch_qp(dev, handle, IB_EVENT_QP_FATAL);
		break;
	case VRDMA_EV_QP_REQ_ERR:
		vrdma_dispatch_qp(dev, handle, IB_EVENT_QP_REQ_ERR);
		break;
	case VRDMA_EV_QP_ACCESS_ERR:
		vrdma_dispatch_qp(dev, handle, IB_EVENT_QP_ACCESS_ERR);
		break;
	case VRDMA_EV_COMM_EST:
		vrdma_dispatch_qp(dev, handle, IB_EVENT_COMM_EST);
		break;
	case VRDMA_EV_PORT_ACTIVE:
		vrdma_dispatch_port(dev, IB_EVENT_PORT_ACTIVE);
		break;
	case VRDMA_EV_PORT_ERR:
		vrdma_dispatch_port(dev, IB_EVENT_PORT_ERR);
		break;
	case VRDMA_EV_GID_CHANGE:
		vrdma_dispatch_port(dev, IB_EVENT_GID_CHANGE);
		break;
	case VRDMA_EV_DEVICE_FATAL: {
		struct ib_event e = { .device = &dev->ib, .event = IB_EVENT_DEVICE_FATAL, .element.port_num = 1 };

		dev_err(&dev->vdev->dev, "the host device failed (DEVICE_FATAL)\n");
		ib_dispatch_event(&e);
		break;
	}
	case VRDMA_EV_DOORBELL_ERROR:
		dev_warn_ratelimited(&dev->vdev->dev, "doorbell record ignored: handle %u reason %u (x%u)\n",
				     handle, detail, le32_to_cpu(ev->count));
		break;
	default:
		dev_warn_ratelimited(&dev->vdev->dev, "unknown event type %u\n", type);
	}
}

static void vrdma_event_work(struct work_struct *work)
{
	struct vrdma_dev *dev = container_of(work, struct vrdma_dev, event_work);
	struct vrdma_event *buf, ev;
	unsigned int len;
	int budget = VRDMA_EVENT_BUFFERS * 4; /* bounded: a flood yields to the rest of the system */
	unsigned long flags;
	bool kick = false;

	for (; budget > 0; budget--) {
		spin_lock_irqsave(&dev->event_lock, flags);
		buf = virtqueue_get_buf(dev->event_vq, &len);
		if (buf) {
			ev = *buf; /* read the device-written event once, then use the copy */
			kick |= vrdma_post_event(dev, buf) == 0;
		}
		spin_unlock_irqrestore(&dev->event_lock, flags);
		if (!buf)
			break;
		if (len < sizeof(ev)) {
			dev_warn_ratelimited(&dev->vdev->dev, "event of %u bytes ignored (spec: 32)\n", len);
			continue;
		}
		vrdma_handle_event(dev, &ev);
	}
	if (kick)
		virtqueue_kick(dev->event_vq);
	if (budget == 0 && !READ_ONCE(dev->removing)) /* budget ran out: come back later */
		schedule_work(&dev->event_work);
}

int vrdma_event_init(struct vrdma_dev *dev)
{
	unsigned int n = min_t(unsigned int, VRDMA_EVENT_BUFFERS, virtqueue_get_vring_size(dev->event_vq)), i;

	INIT_WORK(&dev->event_work, vrdma_event_work);
	spin_lock_init(&dev->event_lock);
	dev->events = kcalloc(VRDMA_EVENT_BUFFERS, sizeof(*dev->events), GFP_KERNEL);
	if (!dev->events)
		return -ENOMEM;
	for (i = 0; i < n; i++)
		if (vrdma_post_event(dev, &dev->events[i]))
			break;
	virtqueue_kick(dev->event_vq);
	return 0;
}

/* After the device was reset: nothing is in flight any more. */
void vrdma_event_fini(struct vrdma_dev *dev)
{
	cancel_work_sync(&dev->event_work);
	kfree(dev->events);
	dev->events = NULL;
}
