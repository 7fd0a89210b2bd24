// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_rdma: Linux driver of the virtio-rdma device (virtio ID 42), version 1 of
 * guest-driver-spec/virtio-rdma.md. Copyright the vrdma-backend authors. This kernel module is licensed under the
 * GNU General Public License version 2 (GPL-2.0), as the kernel it links with requires; the rest of the
 * vrdma-backend project keeps its own licence.
 *
 * This file: virtio binding, feature negotiation (spec 4), initialization (spec 6), the ib_device, and the
 * binding of the RoCE port to the guest netdev that carries the device's virtual MAC.
 */
#include <linux/module.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/etherdevice.h>
#include <linux/rtnetlink.h>
#include <rdma/ib_user_verbs.h>
#include "virtio_rdma.h"

/* The spec's tables, pinned: a wrong field width would silently shift every later field. */
static void __maybe_unused vrdma_layout_checks(void)
{
	BUILD_BUG_ON(sizeof(struct vrdma_config) != 128);
	BUILD_BUG_ON(offsetof(struct vrdma_config, gid) != 96);
	BUILD_BUG_ON(offsetof(struct vrdma_config, max_mapped_queues) != 120);
	BUILD_BUG_ON(sizeof(struct vrdma_req_hdr) != 16 || sizeof(struct vrdma_resp_hdr) != 16);
	BUILD_BUG_ON(sizeof(struct vrdma_query_device_resp) != 96);
	BUILD_BUG_ON(sizeof(struct vrdma_query_port_resp) != 24);
	BUILD_BUG_ON(sizeof(struct vrdma_query_gid_resp) != 24);
	BUILD_BUG_ON(sizeof(struct vrdma_create_cq_req) != 24);
	BUILD_BUG_ON(sizeof(struct vrdma_create_qp_req) != 64);
	BUILD_BUG_ON(sizeof(struct vrdma_qp_attr) != 64);
	BUILD_BUG_ON(offsetof(struct vrdma_qp_attr, dgid) != 48);
	BUILD_BUG_ON(sizeof(struct vrdma_modify_qp_req) != 72);
	BUILD_BUG_ON(sizeof(struct vrdma_query_qp_resp) != 96);
	BUILD_BUG_ON(sizeof(struct vrdma_destroy_qp_resp) != 16);
	BUILD_BUG_ON(sizeof(struct vrdma_reg_mr_req) != 40);
	BUILD_BUG_ON(sizeof(struct vrdma_reg_mr_continue_req) != 16);
	BUILD_BUG_ON(sizeof(struct vrdma_create_ah_req) != 32);
	BUILD_BUG_ON(sizeof(struct vrdma_event) != VRDMA_EVENT_SIZE);
	BUILD_BUG_ON(sizeof(struct vrdma_send_wqe) != VRDMA_SQ_WQE_SIZE);
	BUILD_BUG_ON(offsetof(struct vrdma_send_wqe, payload) != 64);
	BUILD_BUG_ON(sizeof(struct vrdma_recv_wqe) != VRDMA_RQ_WQE_SIZE);
	BUILD_BUG_ON(sizeof(struct vrdma_cqe) != VRDMA_CQE_SIZE);
	BUILD_BUG_ON(sizeof(struct vrdma_doorbell) != 8);
	/* Values the driver passes through unchanged: the spec chose the verbs API's numbers. */
	BUILD_BUG_ON(IB_ACCESS_LOCAL_WRITE != VRDMA_ACCESS_LOCAL_WRITE ||
		     IB_ACCESS_REMOTE_WRITE != VRDMA_ACCESS_REMOTE_WRITE ||
		     IB_ACCESS_REMOTE_READ != VRDMA_ACCESS_REMOTE_READ ||
		     IB_ACCESS_REMOTE_ATOMIC != VRDMA_ACCESS_REMOTE_ATOMIC);
	BUILD_BUG_ON(IB_QP_STATE != VRDMA_QP_STATE || IB_QP_AV != VRDMA_QP_AV ||
		     IB_QP_DEST_QPN != VRDMA_QP_DEST_QPN || IB_QP_SQ_PSN != VRDMA_QP_SQ_PSN ||
		     IB_QP_MAX_DEST_RD_ATOMIC != VRDMA_QP_MAX_DEST_RD_ATOMIC ||
		     IB_QP_MIN_RNR_TIMER != VRDMA_QP_MIN_RNR_TIMER || IB_QP_QKEY != VRDMA_QP_QKEY);
	BUILD_BUG_ON(IB_QPS_ERR != 6 || IB_QPS_RTS != 3 || IB_MTU_4096 != 5 || IB_PORT_ACTIVE != 4);
	BUILD_BUG_ON(IB_WC_GENERAL_ERR != 21 || IB_WC_WR_FLUSH_ERR != 5 || IB_WC_RESP_TIMEOUT_ERR != 20);
}

/*
 * Features this driver implements (spec 4). Not offered to the device: MULTI_DOORBELL (one doorbell queue is
 * enough for a first driver), HOST_QUEUE_MAPPING (section 13, out of scope: declined), MIGRATION and SRQ
 * (reserved). VIRTIO_F_VERSION_1 is accepted by the virtio core.
 */
static unsigned int vrdma_features[] = {
	VIRTIO_RDMA_F_RC, VIRTIO_RDMA_F_UD, VIRTIO_RDMA_F_ATOMIC, VIRTIO_RDMA_F_IMMEDIATE, VIRTIO_RDMA_F_INLINE,
};

/*
 * VIRTIO_F_RING_PACKED "may be negotiated and changes nothing" (spec 4), and the virtio core accepts it when the
 * device offers it. A device whose vhost-user back-end cannot restore a packed ring's state is still usable with
 * split rings: packed_ring=0 declines the feature.
 */
static bool packed_ring = true;
module_param(packed_ring, bool, 0444);
MODULE_PARM_DESC(packed_ring, "accept VIRTIO_F_RING_PACKED when the device offers it (default: yes)");

static int vrdma_validate(struct virtio_device *vdev)
{
	if (!packed_ring)
		__virtio_clear_bit(vdev, VIRTIO_F_RING_PACKED);
	return 0;
}

static const struct virtio_device_id vrdma_id_table[] = {
	{ VIRTIO_ID_RDMA_DEVICE, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

/* Binds port 1 to `ndev` when it holds the virtual MAC, unbinds it when the bound netdev goes or changes. */
static void vrdma_match_netdev(struct vrdma_dev *dev, struct net_device *ndev, bool going)
{
	bool match = !going && ndev->addr_len == ETH_ALEN && ether_addr_equal(ndev->dev_addr, dev->cfg.mac);

	if (match && dev->netdev != ndev) {
		if (!ib_device_set_netdev(&dev->ib, ndev, 1)) {
			dev->netdev = ndev;
			dev_info(&dev->vdev->dev, "port 1 bound to %s (virtual MAC %pM)\n", ndev->name, dev->cfg.mac);
		}
	} else if (!match && dev->netdev == ndev) {
		ib_device_set_netdev(&dev->ib, NULL, 1);
		dev->netdev = NULL;
	}
}

static int vrdma_netdev_event(struct notifier_block *nb, unsigned long event, void *ptr)
{
	struct vrdma_dev *dev = container_of(nb, struct vrdma_dev, nb);
	struct net_device *ndev = netdev_notifier_info_to_dev(ptr);

	if (dev_net(ndev) != &init_net)
		return NOTIFY_DONE;
	switch (event) {
	case NETDEV_REGISTER:
	case NETDEV_UP:
	case NETDEV_CHANGEADDR:
		vrdma_match_netdev(dev, ndev, false);
		break;
	case NETDEV_UNREGISTER:
		vrdma_match_netdev(dev, ndev, true);
		break;
	}
	return NOTIFY_DONE;
}

static int vrdma_find_vqs(struct vrdma_dev *dev)
{
	struct virtqueue *vqs[3];
	vq_callback_t *callbacks[3] = { vrdma_ctrl_done, vrdma_event_ready, NULL };
	static const char * const names[3] = { "controlq", "eventq", "doorbellq0" };
	int ret = virtio_find_vqs(dev->vdev, 3, vqs, callbacks, names, NULL);

	if (ret)
		return ret;
	dev->ctrl_vq = vqs[VRDMA_VQ_CTRL];
	dev->event_vq = vqs[VRDMA_VQ_EVENT];
	dev->db_vq = vqs[VRDMA_VQ_DOORBELL0];
	return 0;
}

static int vrdma_probe(struct virtio_device *vdev)
{
	struct vrdma_dev *dev;
	struct net_device *ndev;
	u8 gid[16];
	int ret;

	/* Spec 4.1: at least one of RC and UD, or fail the device. */
	if (!virtio_has_feature(vdev, VIRTIO_RDMA_F_RC) && !virtio_has_feature(vdev, VIRTIO_RDMA_F_UD)) {
		dev_err(&vdev->dev, "the device offers neither RC nor UD\n");
		return -ENODEV;
	}
	dev = ib_alloc_device(vrdma_dev, ib);
	if (!dev)
		return -ENOMEM;
	dev->vdev = vdev;
	vdev->priv = dev;
	mutex_init(&dev->ctrl_lock);
	init_completion(&dev->ctrl_done);
	spin_lock_init(&dev->ctrl_vq_lock);
	xa_init(&dev->cqs);
	xa_init(&dev->qps);
	dev->f_rc = virtio_has_feature(vdev, VIRTIO_RDMA_F_RC);
	dev->f_ud = virtio_has_feature(vdev, VIRTIO_RDMA_F_UD);
	dev->f_atomic = virtio_has_feature(vdev, VIRTIO_RDMA_F_ATOMIC);
	dev->f_imm = virtio_has_feature(vdev, VIRTIO_RDMA_F_IMMEDIATE);
	dev->f_inline = virtio_has_feature(vdev, VIRTIO_RDMA_F_INLINE);
	dev_dbg(&vdev->dev, "features negotiated; reading the configuration\n");
	vrdma_read_config(dev);
	dev_dbg(&vdev->dev, "configuration read; setting up the queues\n");

	ret = vrdma_find_vqs(dev);
	if (ret)
		goto err_dealloc;
	ret = vrdma_doorbell_init(dev);
	if (ret)
		goto err_vqs;
	virtio_device_ready(vdev); /* DRIVER_OK: queues 0, 1 and 2 are set up (spec 3.1, 6) */
	ret = vrdma_event_init(dev); /* event buffers right after DRIVER_OK (spec 6, step 3) */
	if (ret)
		goto err_reset;
	dev_dbg(&vdev->dev, "DRIVER_OK; event buffers posted; QUERY_DEVICE\n");
	ret = vrdma_load_device_attr(dev);
	if (ret)
		goto err_reset;
	ret = vrdma_query_device_gid(dev, gid);
	if (ret)
		goto err_reset;
	if (memcmp(gid, dev->cfg.gid, 16))
		dev_warn(&vdev->dev, "QUERY_GID %pI6 differs from the configuration's %pI6\n", gid, dev->cfg.gid);

	ib_set_device_ops(&dev->ib, &vrdma_dev_ops);
	dev->ib.node_type = RDMA_NODE_IB_CA;
	dev->ib.phys_port_cnt = 1;
	dev->ib.num_comp_vectors = 1;
	dev->ib.node_guid = dev->cfg.node_guid; /* kept as the wire bytes, like sys_image_guid */
	strscpy(dev->ib.node_desc, "virtio-rdma", sizeof(dev->ib.node_desc));
	dev->ib.dev.parent = &vdev->dev;
	/*
	 * The uverbs data-path commands the core gates by this mask: POST_SEND / POST_RECV without a WR are a user
	 * QP's doorbells and REQ_NOTIFY_CQ arms a user CQ (virtio_rdma_abi.h); without them ib_uverbs answers
	 * EOPNOTSUPP. POLL_CQ stays off: the provider polls the mapped CQE ring itself.
	 */
	dev->ib.uverbs_cmd_mask |= BIT_ULL(IB_USER_VERBS_CMD_POST_SEND) | BIT_ULL(IB_USER_VERBS_CMD_POST_RECV) |
				   BIT_ULL(IB_USER_VERBS_CMD_REQ_NOTIFY_CQ);

	rtnl_lock();
	for_each_netdev(&init_net, ndev)
		vrdma_match_netdev(dev, ndev, false);
	rtnl_unlock();
	/*
	 * No DMA device: the device reads guest physical addresses (no VIRTIO_F_ACCESS_PLATFORM, spec 4), so the
	 * core's virtual DMA mapping is used and page lists are built from the pinned pages themselves.
	 */
	ret = ib_register_device(&dev->ib, "virtio_rdma%d", NULL);
	if (ret)
		goto err_netdev;
	dev->nb.notifier_call = vrdma_netdev_event;
	ret = register_netdevice_notifier(&dev->nb);
	if (ret)
		goto err_unregister;
	dev_info(&vdev->dev, "%s: virtual GID %pI6, MAC %pM, features%s%s%s%s%s\n", dev_name(&dev->ib.dev),
		 dev->cfg.gid, dev->cfg.mac, dev->f_rc ? " RC" : "", dev->f_ud ? " UD" : "",
		 dev->f_atomic ? " ATOMIC" : "", dev->f_imm ? " IMMEDIATE" : "", dev->f_inline ? " INLINE" : "");
	return 0;

err_unregister:
	ib_unregister_device(&dev->ib);
err_netdev:
	if (dev->netdev)
		ib_device_set_netdev(&dev->ib, NULL, 1);
err_reset:
	WRITE_ONCE(dev->removing, true);
	virtio_reset_device(vdev);
	vrdma_event_fini(dev);
	vrdma_doorbell_fini(dev);
err_vqs:
	vdev->config->del_vqs(vdev);
err_dealloc:
	ib_dealloc_device(&dev->ib);
	return ret;
}

static void vrdma_remove(struct virtio_device *vdev)
{
	struct vrdma_dev *dev = vdev->priv;

	unregister_netdevice_notifier(&dev->nb);
	/* Destroys every object through the verbs, each with its control command: the device is still running. */
	ib_unregister_device(&dev->ib);
	WRITE_ONCE(dev->removing, true);
	virtio_reset_device(vdev); /* and then it holds nothing of this driver (spec 11.5) */
	vrdma_event_fini(dev);
	vrdma_doorbell_fini(dev);
	vdev->config->del_vqs(vdev);
	xa_destroy(&dev->cqs);
	xa_destroy(&dev->qps);
	ib_dealloc_device(&dev->ib);
}

static void vrdma_config_changed(struct virtio_device *vdev)
{
	/* The matching PORT_ACTIVE / PORT_ERR / GID_CHANGE event follows on the event queue (spec 5.1). */
}

static struct virtio_driver vrdma_driver = {
	.feature_table = vrdma_features,
	.feature_table_size = ARRAY_SIZE(vrdma_features),
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = vrdma_id_table,
	.validate = vrdma_validate,
	.probe = vrdma_probe,
	.remove = vrdma_remove,
	.config_changed = vrdma_config_changed,
};

module_virtio_driver(vrdma_driver);
MODULE_DEVICE_TABLE(virtio, vrdma_id_table);
MODULE_DESCRIPTION("virtio-rdma guest driver (virtio device ID 42)");
MODULE_LICENSE("GPL");
