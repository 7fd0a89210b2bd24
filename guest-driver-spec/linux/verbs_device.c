// SPDX-License-Identifier: GPL-2.0
/*
 * Device and port verbs (spec 8.3 to 8.5), the port's RoCE identity, and the ops table.
 *
 * GIDs. A RoCE port's GID table is kept by the RDMA core from the addresses of the port's netdev (main.c binds
 * the guest netdev that holds the device's virtual MAC). The device has one GID, the guest's virtual address
 * (spec 5, gid_tbl_len 1), which is one of those addresses when the guest configured its VPC address on that
 * netdev: rdma_cm then resolves it like any RoCE address. The core's table has more entries (the link-local
 * default GID at index 0, one per address); a QP or AH may use only the entry equal to the device's virtual GID,
 * which is GID index 0 on the wire to the device (spec 8.11: sgid_index 0 is the only source).
 */
#include <linux/etherdevice.h>
#include <linux/virtio_config.h>
#include <rdma/ib_mad.h>
#include "virtio_rdma.h"

void vrdma_read_config(struct vrdma_dev *dev)
{
	struct vrdma_config cfg;

	/* virtio_cread_bytes retries inside the generation check: gid and mac are never torn (spec 5.3). */
	virtio_cread_bytes(dev->vdev, 0, &cfg, sizeof(cfg));
	dev->cfg = cfg;
}

bool vrdma_is_virtual_gid(struct vrdma_dev *dev, const union ib_gid *gid)
{
	return memcmp(gid->raw, dev->cfg.gid, sizeof(gid->raw)) == 0;
}

static int vrdma_query_device(struct ib_device *ib, struct ib_device_attr *attr, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ib);

	if (udata && (udata->inlen || udata->outlen))
		return -EINVAL;
	*attr = dev->attr_cache;
	return 0;
}

/* QUERY_DEVICE once at probe: the answer is fixed from reset to reset (spec 5.2). */
int vrdma_load_device_attr(struct vrdma_dev *dev)
{
	struct vrdma_query_device_resp r;
	struct ib_device_attr *a = &dev->attr_cache;
	int ret = vrdma_cmd(dev, VRDMA_CMD_QUERY_DEVICE, NULL, 0, NULL, 0, &r, sizeof(r));

	if (ret)
		return ret;
	memset(a, 0, sizeof(*a));
	a->sys_image_guid = r.node_guid; /* the wire GUID's bytes, as the verbs API keeps it (big-endian) */
	a->max_mr_size = le64_to_cpu(r.max_mr_size);
	a->page_size_cap = PAGE_SIZE; /* this driver's page lists use 4 KiB pages only */
	a->vendor_id = le32_to_cpu(r.vendor_id);
	a->vendor_part_id = le32_to_cpu(r.vendor_part_id);
	a->hw_ver = le32_to_cpu(r.hw_ver);
	a->max_qp = le32_to_cpu(r.max_qp);
	a->max_qp_wr = le32_to_cpu(r.max_qp_wr);
	a->max_send_sge = le32_to_cpu(r.max_send_sge);
	a->max_recv_sge = le32_to_cpu(r.max_recv_sge);
	a->max_sge_rd = a->max_send_sge;
	a->max_cq = le32_to_cpu(r.max_cq);
	a->max_cqe = le32_to_cpu(r.max_cqe);
	a->max_mr = le32_to_cpu(r.max_mr);
	a->max_pd = le32_to_cpu(r.max_pd);
	a->max_ah = le32_to_cpu(r.max_ah);
	a->max_qp_rd_atom = le32_to_cpu(r.max_qp_rd_atom);
	a->max_qp_init_rd_atom = le32_to_cpu(r.max_qp_init_rd_atom);
	a->max_res_rd_atom = a->max_qp_rd_atom * a->max_qp;
	a->atomic_cap = r.atomic_cap == 1 && dev->f_atomic ? IB_ATOMIC_HCA : IB_ATOMIC_NONE;
	a->max_pkeys = 1;
	a->max_fast_reg_page_list_len = 0;
	return 0;
}

static int vrdma_query_port(struct ib_device *ib, u32 port, struct ib_port_attr *attr)
{
	struct vrdma_dev *dev = to_vdev(ib);
	struct vrdma_query_port_req req = { .port_num = port };
	struct vrdma_query_port_resp r;
	int ret = vrdma_cmd(dev, VRDMA_CMD_QUERY_PORT, &req, sizeof(req), NULL, 0, &r, sizeof(r));

	if (ret)
		return ret;
	/* PortState and Mtu have the verbs API's values (spec 8.4). */
	attr->state = r.state;
	attr->max_mtu = r.max_mtu;
	attr->active_mtu = r.active_mtu;
	attr->phys_state = r.phys_state;
	attr->port_cap_flags = le32_to_cpu(r.port_cap_flags);
	attr->max_msg_sz = le32_to_cpu(r.max_msg_size);
	attr->gid_tbl_len = VRDMA_GUEST_GID_TBL_LEN;
	attr->pkey_tbl_len = le16_to_cpu(r.pkey_tbl_len);
	attr->active_width = r.active_width;
	attr->active_speed = r.active_speed;
	return 0;
}

/* QUERY_GID, the device's own view of GID index 0: checked against the configuration at probe (main.c). */
int vrdma_query_device_gid(struct vrdma_dev *dev, u8 gid[16])
{
	struct vrdma_query_gid_req req = { .port_num = 1, .index = 0 };
	struct vrdma_query_gid_resp r;
	int ret = vrdma_cmd(dev, VRDMA_CMD_QUERY_GID, &req, sizeof(req), NULL, 0, &r, sizeof(r));

	if (!ret)
		memcpy(gid, r.gid, 16);
	return ret;
}

static int vrdma_get_port_immutable(struct ib_device *ib, u32 port, struct ib_port_immutable *im)
{
	im->pkey_tbl_len = 1;
	im->gid_tbl_len = VRDMA_GUEST_GID_TBL_LEN;
	im->core_cap_flags = RDMA_CORE_PORT_IBA_ROCE_UDP_ENCAP; /* RoCE v2 only (spec 8.5: GidType ROCE_V2) */
	im->max_mad_size = IB_MGMT_MAD_SIZE;
	return 0;
}

static enum rdma_link_layer vrdma_get_link_layer(struct ib_device *ib, u32 port)
{
	return IB_LINK_LAYER_ETHERNET;
}

static int vrdma_query_pkey(struct ib_device *ib, u32 port, u16 index, u16 *pkey)
{
	if (index > 0)
		return -EINVAL;
	*pkey = 0xffff; /* the default P_Key, the only entry (spec 8.4) */
	return 0;
}

/* The core keeps the RoCE GID table; the device needs no per-GID state (its GID comes from the backend). */
static int vrdma_add_gid(const struct ib_gid_attr *attr, void **context)
{
	return 0;
}

static int vrdma_del_gid(const struct ib_gid_attr *attr, void **context)
{
	return 0;
}

static void vrdma_get_dev_fw_str(struct ib_device *ib, char *str)
{
	snprintf(str, IB_FW_VERSION_NAME_MAX, "virtio-rdma v1");
}

const struct ib_device_ops vrdma_dev_ops = {
	.owner = THIS_MODULE,
	.driver_id = RDMA_DRIVER_UNKNOWN,
	.uverbs_abi_ver = VIRTIO_RDMA_ABI_VERSION,

	.query_device = vrdma_query_device,
	.query_port = vrdma_query_port,
	.get_port_immutable = vrdma_get_port_immutable,
	.get_link_layer = vrdma_get_link_layer,
	.query_pkey = vrdma_query_pkey,
	.add_gid = vrdma_add_gid,
	.del_gid = vrdma_del_gid,
	.get_dev_fw_str = vrdma_get_dev_fw_str,
	.alloc_ucontext = vrdma_alloc_ucontext,
	.dealloc_ucontext = vrdma_dealloc_ucontext,
	.mmap = vrdma_mmap,
	.mmap_free = vrdma_mmap_free,

	.alloc_pd = vrdma_alloc_pd,
	.dealloc_pd = vrdma_dealloc_pd,
	.get_dma_mr = vrdma_get_dma_mr,
	.reg_user_mr = vrdma_reg_user_mr,
	.dereg_mr = vrdma_dereg_mr,
	.create_ah = vrdma_create_ah,
	.create_user_ah = vrdma_create_ah, /* ib_uverbs' CREATE_AH needs it; udata carries the handle back */
	.destroy_ah = vrdma_destroy_ah,
	.create_cq = vrdma_create_cq,
	.destroy_cq = vrdma_destroy_cq,
	.poll_cq = vrdma_poll_cq,
	.req_notify_cq = vrdma_req_notify_cq,
	.create_qp = vrdma_create_qp,
	.modify_qp = vrdma_modify_qp,
	.query_qp = vrdma_query_qp,
	.destroy_qp = vrdma_destroy_qp,
	.post_send = vrdma_post_send,
	.post_recv = vrdma_post_recv,

	INIT_RDMA_OBJ_SIZE(ib_pd, vrdma_pd, ib),
	INIT_RDMA_OBJ_SIZE(ib_ah, vrdma_ah, ib),
	INIT_RDMA_OBJ_SIZE(ib_cq, vrdma_cq, ib),
	INIT_RDMA_OBJ_SIZE(ib_qp, vrdma_qp, ib),
	INIT_RDMA_OBJ_SIZE(ib_ucontext, vrdma_ucontext, ib),
};
