/*
 * User-space verbs check of the Linux guest (boot.sh builds it against this machine's libibverbs and runs it in the
 * guest): through libibverbs and the virtio_rdma provider, an RC QP connected to itself over the device's virtual
 * GID posts one signaled RDMA WRITE and one receive; the WRITE's completion comes back through the mapped CQE ring
 * and a completion event. One "VRDMA-USER: step ok|fail detail" line per step.
 * Usage: user-verbs DEVICE GID_INDEX
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <infiniband/verbs.h>

static int failures;

static void step(const char *name, int ok, const char *detail)
{
	printf("VRDMA-USER: %s %s %s\n", name, ok ? "ok" : "fail", detail);
	if (!ok)
		failures++;
}

/* cond is evaluated once, before the detail; a failure also shows errno as the call left it. */
#define CHECK(name, cond, ...) do { int ok_ = !!(cond), e_ = errno; char d_[160], m_[200]; \
	snprintf(d_, sizeof(d_), __VA_ARGS__); snprintf(m_, sizeof(m_), "%s%s%s", d_, ok_ ? "" : " errno: ", \
	ok_ ? "" : strerror(e_)); step(name, ok_, m_); if (!ok_) goto out; } while (0)

int main(int argc, char **argv)
{
	struct ibv_device **list = NULL;
	struct ibv_context *ctx = NULL;
	struct ibv_comp_channel *ch = NULL;
	struct ibv_pd *pd = NULL;
	struct ibv_mr *mr = NULL;
	struct ibv_cq *cq = NULL, *ev_cq;
	struct ibv_qp *qp = NULL;
	struct ibv_qp_init_attr init = {};
	struct ibv_qp_attr a = {};
	union ibv_gid gid;
	struct ibv_wc wc;
	void *ev_ctx;
	static char buf[8192];
	int n, i, gid_index = argc > 2 ? atoi(argv[2]) : 1, polls;
	const char *name = argc > 1 ? argv[1] : "virtio_rdma0";

	list = ibv_get_device_list(&n);
	for (i = 0; list && i < n && strcmp(ibv_get_device_name(list[i]), name); i++)
		;
	CHECK("open", list && i < n && (ctx = ibv_open_device(list[i])), "%s", name);
	CHECK("query-gid", !ibv_query_gid(ctx, 1, gid_index, &gid), "index %d", gid_index);
	ch = ibv_create_comp_channel(ctx);
	pd = ibv_alloc_pd(ctx);
	CHECK("alloc-pd", pd && ch, "with a completion channel");
	mr = ibv_reg_mr(pd, buf, sizeof(buf), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	CHECK("reg-mr", mr, "lkey 0x%x", mr ? mr->lkey : 0);
	cq = ibv_create_cq(ctx, 16, NULL, ch, 0);
	CHECK("create-cq", cq, "cqe %d", cq ? cq->cqe : 0);
	init.send_cq = init.recv_cq = cq;
	init.qp_type = IBV_QPT_RC;
	init.cap.max_send_wr = init.cap.max_recv_wr = 8;
	init.cap.max_send_sge = init.cap.max_recv_sge = 1;
	qp = ibv_create_qp(pd, &init);
	CHECK("create-qp", qp, "qpn %u", qp ? qp->qp_num : 0);
	a.qp_state = IBV_QPS_INIT;
	a.port_num = 1;
	a.qp_access_flags = IBV_ACCESS_REMOTE_WRITE;
	CHECK("modify-init", !ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS),
	      "%s", "");
	{
		struct ibv_sge sge = { .addr = (uintptr_t)buf + 4096, .length = 4096, .lkey = mr->lkey };
		struct ibv_recv_wr rwr = { .wr_id = 7, .sg_list = &sge, .num_sge = 1 }, *bad;

		int ret = ibv_post_recv(qp, &rwr, &bad);

		step("post-recv", !ret, ret ? strerror(ret) : ""); /* post calls return the errno; the WRITE needs no receive */
	}
	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTR;
	a.path_mtu = IBV_MTU_1024;
	a.dest_qp_num = qp->qp_num; /* loopback: the QP is its own peer */
	a.max_dest_rd_atomic = 1;
	a.min_rnr_timer = 12;
	a.ah_attr.is_global = 1;
	a.ah_attr.grh.dgid = gid;
	a.ah_attr.grh.sgid_index = gid_index;
	a.ah_attr.grh.hop_limit = 1;
	a.ah_attr.port_num = 1;
	CHECK("modify-rtr", !ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
					   IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER),
	      "%s", "");
	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTS;
	a.timeout = 14;
	a.retry_cnt = 7;
	a.rnr_retry = 7;
	a.max_rd_atomic = 1;
	CHECK("modify-rts", !ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
					   IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC), "%s", "");
	{
		/* An AH through ib_uverbs' CREATE_AH (the module's create_user_ah), then gone again. */
		struct ibv_ah_attr ah_attr = { .is_global = 1, .port_num = 1 };
		struct ibv_ah *ah;

		ah_attr.grh.dgid = gid;
		ah_attr.grh.sgid_index = gid_index;
		ah_attr.grh.hop_limit = 1;
		ah = ibv_create_ah(pd, &ah_attr);
		CHECK("create-ah", ah, "to the virtual GID");
		CHECK("destroy-ah", !ibv_destroy_ah(ah), "%s", "");
	}
	CHECK("arm-cq", !ibv_req_notify_cq(cq, 0), "%s", "");
	{
		struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = 64, .lkey = mr->lkey };
		struct ibv_send_wr wr = { .wr_id = 42, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE,
					  .send_flags = IBV_SEND_SIGNALED }, *bad;
		int ret;

		memset(buf, 0x5a, 64);
		wr.wr.rdma.remote_addr = (uintptr_t)buf + 128;
		wr.wr.rdma.rkey = mr->rkey;
		ret = ibv_post_send(qp, &wr, &bad);
		CHECK("post-send", !ret, "%s", ret ? strerror(ret) : "");
	}
	{
		struct pollfd pfd = { .fd = ch->fd, .events = POLLIN };

		CHECK("completion-event", poll(&pfd, 1, 20000) == 1 && !ibv_get_cq_event(ch, &ev_cq, &ev_ctx) &&
			  ev_cq == cq, "on the comp channel");
		ibv_ack_cq_events(cq, 1);
	}
	for (polls = 0, n = 0; polls < 100000 && n == 0; polls++)
		n = ibv_poll_cq(cq, 1, &wc);
	CHECK("poll-cq", n == 1 && wc.wr_id == 42 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RDMA_WRITE &&
		  wc.qp_num == qp->qp_num, "n %d wr_id %llu status %s opcode %d", n, (unsigned long long)wc.wr_id,
	      ibv_wc_status_str(wc.status), wc.opcode);
out:
	if (qp)
		step("destroy-qp", !ibv_destroy_qp(qp), "");
	if (cq)
		step("destroy-cq", !ibv_destroy_cq(cq), "");
	if (mr)
		step("dereg-mr", !ibv_dereg_mr(mr), "");
	if (pd)
		step("dealloc-pd", !ibv_dealloc_pd(pd), "");
	if (ch)
		ibv_destroy_comp_channel(ch);
	if (ctx)
		ibv_close_device(ctx);
	if (list)
		ibv_free_device_list(list);
	printf("VRDMA-USER: done %s %d failures\n", failures ? "fail" : "ok", failures);
	return failures ? 1 : 0;
}
