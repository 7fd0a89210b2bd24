// SPDX-License-Identifier: GPL-2.0
/*
 * vrdma_selftest: drives virtio_rdma's verbs from inside the guest kernel, for scripts/linux-guest/boot.sh. Kernel
 * consumers cannot use the device through ib_alloc_pd (no DMA MR, spec 15.6), so this module allocates the verbs
 * objects itself and calls the driver's ops, as the RDMA core would: PD, CQ, two RC QPs connected to each other,
 * two MRs of user memory (the insmod process's), an AH, one signaled RDMA WRITE through the relayed data path, and
 * the statuses BUSY and WRONG_STATE as errnos. Each step logs "VRDMA-SELFTEST: <step> ok|fail <detail>".
 * Loading it runs the test; the module is removed right after.
 */
#include <linux/module.h>
#include <linux/mman.h>
#include <linux/delay.h>
#include <rdma/ib_verbs.h>
#include <rdma/ib_cache.h>
#include <net/ipv6.h>

static int failures;
static atomic_t completions_seen = ATOMIC_INIT(0);

#define CHECK(step, cond, fmt, ...) do {						\
	bool ok_ = (cond);								\
	if (!ok_)									\
		failures++;								\
	pr_info("VRDMA-SELFTEST: %s %s " fmt "\n", step, ok_ ? "ok" : "fail", ##__VA_ARGS__);	\
} while (0)

static void comp_handler(struct ib_cq *cq, void *ctx)
{
	atomic_inc(&completions_seen);
}

static struct ib_qp *make_qp(struct ib_device *dev, struct ib_pd *pd, struct ib_cq *cq)
{
	struct ib_qp_init_attr init = {
		.send_cq = cq, .recv_cq = cq, .qp_type = IB_QPT_RC, .sq_sig_type = IB_SIGNAL_REQ_WR,
		.cap = { .max_send_wr = 8, .max_recv_wr = 8, .max_send_sge = 1, .max_recv_sge = 1 },
	};
	struct ib_qp *qp = rdma_zalloc_drv_obj(dev, ib_qp);
	int ret;

	if (!qp)
		return ERR_PTR(-ENOMEM);
	qp->device = dev;
	qp->pd = pd;
	qp->send_cq = cq;
	qp->recv_cq = cq;
	qp->qp_type = IB_QPT_RC;
	ret = dev->ops.create_qp(qp, &init, NULL);
	if (ret) {
		kfree(qp);
		return ERR_PTR(ret);
	}
	return qp;
}

static int connect_qp(struct ib_device *dev, struct ib_qp *qp, u32 dest, const struct ib_gid_attr *gattr)
{
	struct ib_qp_attr a = {};
	union ib_gid dgid = gattr->gid; /* the peer QP is in this VM: its address is ours */
	int ret;

	a.qp_state = IB_QPS_INIT;
	a.port_num = 1;
	a.qp_access_flags = IB_ACCESS_REMOTE_WRITE | IB_ACCESS_REMOTE_READ;
	ret = dev->ops.modify_qp(qp, &a, IB_QP_STATE | IB_QP_PKEY_INDEX | IB_QP_PORT | IB_QP_ACCESS_FLAGS, NULL);
	if (ret)
		return ret;
	memset(&a, 0, sizeof(a));
	a.qp_state = IB_QPS_RTR;
	a.path_mtu = IB_MTU_1024;
	a.dest_qp_num = dest;
	a.rq_psn = 0;
	a.max_dest_rd_atomic = 1;
	a.min_rnr_timer = 12;
	a.ah_attr.type = RDMA_AH_ATTR_TYPE_ROCE;
	rdma_ah_set_grh(&a.ah_attr, &dgid, 0, gattr->index, 64, 0);
	a.ah_attr.grh.sgid_attr = gattr;
	rdma_ah_set_port_num(&a.ah_attr, 1);
	ret = dev->ops.modify_qp(qp, &a, IB_QP_STATE | IB_QP_AV | IB_QP_PATH_MTU | IB_QP_DEST_QPN | IB_QP_RQ_PSN |
				 IB_QP_MAX_DEST_RD_ATOMIC | IB_QP_MIN_RNR_TIMER, NULL);
	if (ret)
		return ret;
	memset(&a, 0, sizeof(a));
	a.qp_state = IB_QPS_RTS;
	a.timeout = 14;
	a.retry_cnt = 7;
	a.rnr_retry = 7;
	a.max_rd_atomic = 1;
	return dev->ops.modify_qp(qp, &a, IB_QP_STATE | IB_QP_SQ_PSN | IB_QP_TIMEOUT | IB_QP_RETRY_CNT |
				  IB_QP_RNR_RETRY | IB_QP_MAX_QP_RD_ATOMIC, NULL);
}

static struct ib_mr *make_mr(struct ib_device *dev, struct ib_pd *pd, unsigned long *addr)
{
	struct ib_mr *mr;

	*addr = vm_mmap(NULL, 0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, 0);
	if (IS_ERR_VALUE(*addr))
		return ERR_PTR((long)*addr);
	mr = dev->ops.reg_user_mr(pd, *addr + 100, 2 * PAGE_SIZE - 200, *addr + 100,
				  IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE | IB_ACCESS_REMOTE_READ, NULL);
	if (!IS_ERR(mr)) {
		mr->device = dev;
		mr->pd = pd;
	}
	return mr;
}

static void run(struct ib_device *dev)
{
	const struct ib_gid_attr *gattr = NULL;
	struct ib_cq_init_attr cq_attr = { .cqe = 16 };
	struct ib_pd *pd = rdma_zalloc_drv_obj(dev, ib_pd);
	struct ib_cq *cq = rdma_zalloc_drv_obj(dev, ib_cq);
	struct ib_ah *ah = rdma_zalloc_drv_obj(dev, ib_ah);
	struct ib_qp *qp1 = NULL, *qp2 = NULL;
	struct ib_mr *mr1 = NULL, *mr2 = NULL;
	unsigned long a1 = 0, a2 = 0;
	int ret, i, n = 0;

	if (!pd || !cq || !ah) {
		CHECK("alloc", false, "no memory");
		goto out_free;
	}
	pd->device = dev;
	ret = dev->ops.alloc_pd(pd, NULL);
	CHECK("create-pd", !ret, "errno %d", ret);
	if (ret)
		goto out_free;

	cq->device = dev;
	cq->comp_handler = comp_handler;
	ret = dev->ops.create_cq(cq, &cq_attr, NULL);
	CHECK("create-cq", !ret, "errno %d depth %d", ret, cq->cqe);
	if (ret)
		goto out_pd;

	qp1 = make_qp(dev, pd, cq);
	qp2 = IS_ERR(qp1) ? NULL : make_qp(dev, pd, cq);
	CHECK("create-qp", !IS_ERR(qp1) && !IS_ERR_OR_NULL(qp2), "qpn %u %u",
	      IS_ERR(qp1) ? 0 : qp1->qp_num, IS_ERR_OR_NULL(qp2) ? 0 : qp2->qp_num);
	if (IS_ERR(qp1) || IS_ERR_OR_NULL(qp2)) {
		if (!IS_ERR(qp1))
			dev->ops.destroy_qp(qp1, NULL), kfree(qp1);
		goto out_cq;
	}

	ret = dev->ops.dealloc_pd(pd, NULL);
	CHECK("busy-pd-is-EBUSY", ret == -EBUSY, "errno %d", ret);
	{
		struct ib_qp_attr a = { .qp_state = IB_QPS_RTS };

		ret = dev->ops.modify_qp(qp1, &a, IB_QP_STATE, NULL);
		CHECK("reset-to-rts-is-EINVAL", ret == -EINVAL, "errno %d", ret);
	}

	/* The device's one GID, the guest's virtual address: the core's RoCE table has it from the netdev. */
	for (i = 0; i < 16 && !gattr; i++) {
		const struct ib_gid_attr *g = rdma_get_gid_attr(dev, 1, i);

		if (IS_ERR(g))
			continue;
		if (ipv6_addr_v4mapped((struct in6_addr *)g->gid.raw))
			gattr = g;
		else
			rdma_put_gid_attr(g);
	}
	CHECK("virtual-gid", gattr != NULL, "index %d", gattr ? gattr->index : -1);
	if (!gattr)
		goto out_qps;

	ret = connect_qp(dev, qp1, qp2->qp_num, gattr);
	if (!ret)
		ret = connect_qp(dev, qp2, qp1->qp_num, gattr);
	CHECK("connect-rc", !ret, "errno %d", ret);
	{
		struct ib_qp_attr qa;
		struct ib_qp_init_attr qi;

		ret = dev->ops.query_qp(qp1, &qa, IB_QP_STATE, &qi);
		CHECK("query-qp", !ret && qa.qp_state == IB_QPS_RTS && qa.dest_qp_num == qp2->qp_num,
		      "errno %d state %d dest %u", ret, qa.qp_state, qa.dest_qp_num);
	}

	mr1 = make_mr(dev, pd, &a1);
	mr2 = IS_ERR(mr1) ? ERR_PTR(-EINVAL) : make_mr(dev, pd, &a2);
	CHECK("reg-user-mr", !IS_ERR(mr1) && !IS_ERR(mr2), "lkey %#x rkey %#x",
	      IS_ERR(mr1) ? 0 : mr1->lkey, IS_ERR(mr2) ? 0 : mr2->rkey);

	{
		struct rdma_ah_init_attr ai = { .flags = RDMA_CREATE_AH_SLEEPABLE };
		struct rdma_ah_attr attr = {};
		union ib_gid dgid = gattr->gid;

		attr.type = RDMA_AH_ATTR_TYPE_ROCE;
		rdma_ah_set_grh(&attr, &dgid, 0, gattr->index, 64, 0);
		attr.grh.sgid_attr = gattr;
		rdma_ah_set_port_num(&attr, 1);
		ai.ah_attr = &attr;
		ah->device = dev;
		ah->pd = pd;
		ret = dev->ops.create_ah(ah, &ai, NULL);
		CHECK("create-ah", !ret, "errno %d", ret);
		if (!ret) {
			ret = dev->ops.destroy_ah(ah, RDMA_DESTROY_AH_SLEEPABLE);
			CHECK("destroy-ah", !ret, "errno %d", ret);
		}
	}

	if (!IS_ERR(mr1) && !IS_ERR(mr2) && qp1->device) {
		struct ib_sge sge = { .addr = a1 + 100, .length = 64, .lkey = mr1->lkey };
		struct ib_rdma_wr wr = {
			.wr = { .wr_id = 0x5eed, .opcode = IB_WR_RDMA_WRITE, .send_flags = IB_SEND_SIGNALED,
				.sg_list = &sge, .num_sge = 1 },
			.remote_addr = a2 + 100, .rkey = mr2->rkey,
		};
		const struct ib_send_wr *bad = NULL;
		struct ib_wc wc = {};

		ret = dev->ops.req_notify_cq(cq, IB_CQ_NEXT_COMP);
		CHECK("arm-cq", ret >= 0, "ret %d", ret);
		ret = dev->ops.post_send(qp1, &wr.wr, &bad);
		CHECK("post-send", !ret, "errno %d", ret);
		for (i = 0; i < 500 && n == 0; i++) { /* 10 s: the backend runs JavaScript, the guest is emulated */
			n = dev->ops.poll_cq(cq, 1, &wc);
			if (!n)
				msleep(20);
		}
		CHECK("poll-cq", n == 1 && wc.status == IB_WC_SUCCESS && wc.opcode == IB_WC_RDMA_WRITE &&
		      wc.wr_id == 0x5eed && wc.qp == qp1, "n %d status %d opcode %d wr_id %#llx after %d ms",
		      n, wc.status, wc.opcode, wc.wr_id, i * 20);
		for (i = 0; i < 250 && !atomic_read(&completions_seen); i++)
			msleep(20);
		CHECK("completion-event", atomic_read(&completions_seen) >= 1, "events %d",
		      atomic_read(&completions_seen));
	}
	if (!IS_ERR_OR_NULL(mr1)) {
		ret = dev->ops.dereg_mr(mr1, NULL);
		CHECK("dereg-mr", !ret, "errno %d", ret);
	}
	if (!IS_ERR_OR_NULL(mr2))
		dev->ops.dereg_mr(mr2, NULL);
	rdma_put_gid_attr(gattr);
out_qps:
	ret = dev->ops.destroy_qp(qp1, NULL);
	CHECK("destroy-qp", !ret, "errno %d", ret);
	dev->ops.destroy_qp(qp2, NULL);
	kfree(qp1);
	kfree(qp2);
out_cq:
	ret = dev->ops.destroy_cq(cq, NULL);
	CHECK("destroy-cq", !ret, "errno %d", ret);
out_pd:
	ret = dev->ops.dealloc_pd(pd, NULL);
	CHECK("destroy-pd", !ret, "errno %d", ret);
out_free:
	kfree(ah);
	kfree(cq);
	kfree(pd);
	if (a1)
		vm_munmap(a1, 2 * PAGE_SIZE);
	if (a2)
		vm_munmap(a2, 2 * PAGE_SIZE);
}

static int __init vrdma_selftest_init(void)
{
	struct ib_device *dev = ib_device_get_by_name("virtio_rdma0", RDMA_DRIVER_UNKNOWN);

	if (!dev) {
		pr_info("VRDMA-SELFTEST: device fail no virtio_rdma0\n");
		return 0;
	}
	run(dev);
	ib_device_put(dev);
	pr_info("VRDMA-SELFTEST: done %s %d failures\n", failures ? "fail" : "ok", failures);
	return 0;
}

static void __exit vrdma_selftest_exit(void)
{
}

module_init(vrdma_selftest_init);
module_exit(vrdma_selftest_exit);
MODULE_DESCRIPTION("virtio_rdma self-test (scripts/linux-guest/boot.sh)");
MODULE_LICENSE("GPL");
