// SPDX-License-Identifier: GPL-2.0
/*
 * Protection domains (spec 8.6), memory regions (8.14, 8.15) and address handles (8.16).
 */
#include <linux/slab.h>
#include <linux/mm.h>
#include "virtio_rdma.h"

int vrdma_alloc_pd(struct ib_pd *ibpd, struct ib_udata *udata)
{
	struct vrdma_pd *pd = to_vpd(ibpd);
	struct vrdma_handle r;
	int ret = vrdma_cmd(to_vdev(ibpd->device), VRDMA_CMD_CREATE_PD, NULL, 0, NULL, 0, &r, sizeof(r));

	if (ret)
		return ret;
	pd->handle = le32_to_cpu(r.handle);
	return 0;
}

static int vrdma_destroy_handle(struct vrdma_dev *dev, u16 command, u32 handle)
{
	struct vrdma_handle req = { .handle = cpu_to_le32(handle) };

	return vrdma_cmd(dev, command, &req, sizeof(req), NULL, 0, NULL, 0);
}

int vrdma_dealloc_pd(struct ib_pd *ibpd, struct ib_udata *udata)
{
	return vrdma_destroy_handle(to_vdev(ibpd->device), VRDMA_CMD_DESTROY_PD, to_vpd(ibpd)->handle);
}

/*
 * No MR of all guest memory exists in this device (spec 15.6: it would pin the whole guest), so kernel consumers
 * that need one (ib_alloc_pd without a local DMA lkey) cannot use this device yet.
 */
struct ib_mr *vrdma_get_dma_mr(struct ib_pd *pd, int access)
{
	return ERR_PTR(-EOPNOTSUPP);
}

/*
 * Registers user memory: the pages are pinned (ib_umem), then described by 4 KiB guest-physical page lists,
 * REG_MR with the first chunk and REG_MR_CONTINUE with each next one (spec 8.14), in order. The device registers
 * the region at `virt`, the address the process uses, so the page offset of `virt` and `start` must agree.
 */
struct ib_mr *vrdma_reg_user_mr(struct ib_pd *ibpd, u64 start, u64 length, u64 virt, int access,
				struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibpd->device);
	u32 chunk_max = min_t(u32, VRDMA_MAX_CMD_PAGES, le32_to_cpu(dev->cfg.max_pages_per_command));
	struct vrdma_reg_mr_resp r = {};
	struct sg_page_iter piter;
	struct vrdma_mr *mr;
	u32 total, sent = 0, n = 0;
	__le64 *pages;
	int ret;

	if (!length || (virt & ~PAGE_MASK) != (start & ~PAGE_MASK) || !chunk_max)
		return ERR_PTR(-EINVAL);
	/*
	 * Optional flags (IB_ACCESS_OPTIONAL: relaxed ordering) are hints a driver ignores when it cannot honour them,
	 * as the RDMA core documents: perftest's ib_send_lat asks for relaxed ordering and failed here before.
	 */
	access &= ~IB_ACCESS_OPTIONAL;
	if (access & ~(IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE | IB_ACCESS_REMOTE_READ |
		       IB_ACCESS_REMOTE_ATOMIC))
		return ERR_PTR(-EOPNOTSUPP); /* no other access flag exists in the spec (8.14) */
	mr = kzalloc(sizeof(*mr), GFP_KERNEL);
	pages = kmalloc_array(chunk_max, sizeof(*pages), GFP_KERNEL);
	if (!mr || !pages) {
		ret = -ENOMEM;
		goto err_free;
	}
	mr->umem = ib_umem_get(ibpd->device, start, length, access);
	if (IS_ERR(mr->umem)) {
		ret = PTR_ERR(mr->umem);
		goto err_free;
	}
	total = ib_umem_num_pages(mr->umem);

	for_each_sgtable_page(&mr->umem->sgt_append.sgt, &piter, 0) {
		pages[n++] = cpu_to_le64(page_to_phys(sg_page_iter_page(&piter)));
		if (n < chunk_max && sent + n < total)
			continue;
		if (sent == 0) {
			struct vrdma_reg_mr_req req = {
				.pd_handle = cpu_to_le32(to_vpd(ibpd)->handle),
				.access_flags = cpu_to_le32(vrdma_access(access)),
				.iova = cpu_to_le64(virt),
				.length = cpu_to_le64(length),
				.page_shift = VRDMA_PAGE_SHIFT,
				.total_pages = cpu_to_le32(total),
				.num_pages = cpu_to_le32(n),
			};

			ret = vrdma_cmd(dev, VRDMA_CMD_REG_MR, &req, sizeof(req), pages, n, &r, sizeof(r));
			if (ret)
				goto err_umem;
			mr->handle = le32_to_cpu(r.mr_handle);
		} else {
			struct vrdma_reg_mr_continue_req req = {
				.mr_handle = cpu_to_le32(mr->handle),
				.start_index = cpu_to_le32(sent),
				.num_pages = cpu_to_le32(n),
			};

			ret = vrdma_cmd(dev, VRDMA_CMD_REG_MR_CONTINUE, &req, sizeof(req), pages, n, &r, sizeof(r));
			if (ret)
				goto err_dereg;
		}
		sent += n;
		n = 0;
		if (le32_to_cpu(r.pages_received) != sent) {
			ret = -EPROTO;
			goto err_dereg;
		}
		if (sent == total)
			break;
	}
	if (sent != total) { /* the pinned pages were fewer than the count: never hand out keys then */
		ret = -EFAULT;
		goto err_dereg;
	}
	kfree(pages);
	mr->ib.lkey = le32_to_cpu(r.lkey);
	mr->ib.rkey = le32_to_cpu(r.rkey);
	return &mr->ib;

err_dereg:
	vrdma_destroy_handle(dev, VRDMA_CMD_DEREG_MR, mr->handle);
err_umem:
	ib_umem_release(mr->umem);
err_free:
	kfree(pages);
	kfree(mr);
	return ERR_PTR(ret);
}

int vrdma_dereg_mr(struct ib_mr *ibmr, struct ib_udata *udata)
{
	struct vrdma_mr *mr = to_vmr(ibmr);
	int ret = vrdma_destroy_handle(to_vdev(ibmr->device), VRDMA_CMD_DEREG_MR, mr->handle);

	if (ret)
		return ret;
	/* The device's host registration is gone: the pages may be unpinned now (spec 8.15). */
	ib_umem_release(mr->umem);
	kfree(mr);
	return 0;
}

int vrdma_create_ah(struct ib_ah *ibah, struct rdma_ah_init_attr *init, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibah->device);
	struct rdma_ah_attr *attr = init->ah_attr;
	const struct ib_global_route *grh;
	struct vrdma_create_ah_req req = {};
	struct vrdma_handle r;
	int ret;

	/* A control command sleeps; callers in atomic context get no AH from this device. */
	if (!(init->flags & RDMA_CREATE_AH_SLEEPABLE))
		return -EOPNOTSUPP;
	if (!(rdma_ah_get_ah_flags(attr) & IB_AH_GRH))
		return -EINVAL; /* RoCE always routes by GID */
	grh = rdma_ah_read_grh(attr);
	if (!grh->sgid_attr || !vrdma_is_virtual_gid(dev, &grh->sgid_attr->gid))
		return -EINVAL; /* the device sends only from the guest's virtual GID (spec 8.16: sgid_index 0) */
	req.pd_handle = cpu_to_le32(to_vpd(ibah->pd)->handle);
	req.flow_label = cpu_to_le32(grh->flow_label);
	req.port_num = 1;
	req.sgid_index = 0;
	req.hop_limit = grh->hop_limit;
	req.traffic_class = grh->traffic_class;
	req.sl = rdma_ah_get_sl(attr);
	memcpy(req.dgid, grh->dgid.raw, 16);
	ret = vrdma_cmd(dev, VRDMA_CMD_CREATE_AH, &req, sizeof(req), NULL, 0, &r, sizeof(r));
	if (ret)
		return ret;
	to_vah(ibah)->handle = le32_to_cpu(r.handle);
	if (udata && udata->outlen) { /* the provider puts the device's handle in UD send WQEs (spec 10.3) */
		struct virtio_rdma_create_ah_resp resp = { .ah_handle = to_vah(ibah)->handle };

		ret = ib_copy_to_udata(udata, &resp, min_t(size_t, sizeof(resp), udata->outlen));
		if (ret)
			vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_AH, to_vah(ibah)->handle);
	}
	return ret;
}

int vrdma_destroy_ah(struct ib_ah *ibah, u32 flags)
{
	if (!(flags & RDMA_DESTROY_AH_SLEEPABLE))
		return -EOPNOTSUPP;
	return vrdma_destroy_handle(to_vdev(ibah->device), VRDMA_CMD_DESTROY_AH, to_vah(ibah)->handle);
}
