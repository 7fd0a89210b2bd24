// Error paths against real rxe0: work-completion statuses for bad keys, QPs in the wrong state, flushes, and the
// handle rules (destroyed, wrong kind, parents with children).
import t from 'tap';
import { ALL_ACCESS, RXE_PORT, requireTestHost, withRxe } from './fixture/harness.ts';
import { RecvWrList, SendWrList } from '../../vmm-device/verbs/layout.ts';
import { Access, QpState, QpType, SendFlags, WcStatus, WrOpcode, wcStatusName } from '../../vmm-device/verbs/constants.ts';
import type { AsyncEvent } from '../../vmm-device/verbs/host-verbs.ts';

requireTestHost();

t.test('a bad lkey completes with a local error status and flushes what follows', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const mem = new ArrayBuffer(4096);
    const mr = await f.mr(mem);
    f.verbs.postRecv(b.qp, new RecvWrList().push({ wrId: 1, sgList: [{ addr: mr.addr, length: 4096, lkey: mr.lkey }] }));
    f.verbs.postSend(
      a.qp,
      new SendWrList()
        .push({ wrId: 10, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED, sgList: [{ addr: mr.addr, length: 64, lkey: mr.lkey ^ 0x5a5a00 }] })
        .push({ wrId: 11, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED, sgList: [{ addr: mr.addr, length: 64, lkey: mr.lkey }] }),
    );
    const wcs = await a.sendCq.waitFor(2);
    t.same(wcs.map((w) => Number(w.wrId)), [10, 11]);
    // The IB spec's status for an invalid L_Key is LOC_PROT_ERR; rxe in Linux 6.1 (the test host's kernel)
    // reports the generic LOC_QP_OP_ERR for a send whose gather fails. Either is an error that names the
    // local side; nothing else is acceptable.
    t.match(wcStatusName(wcs[0]!.status), /^(LOC_PROT_ERR|LOC_QP_OP_ERR)$/, `bad lkey: ${wcStatusName(wcs[0]!.status)}`);
    t.equal(wcStatusName(wcs[1]!.status), 'WR_FLUSH_ERR', 'the next WR is flushed');
    t.equal((await f.verbs.queryQp(a.qp)).qpState, QpState.ERR, 'the QP is in ERR after an error completion');
  });
});

t.test('a bad rkey completes with REM_ACCESS_ERR, and an rkey without the right access too', async (t) => {
  await withRxe(t, async (f) => {
    const events: AsyncEvent[] = [];
    const { a, b } = await f.rcPair();
    const mem = new ArrayBuffer(8192);
    const mr = await f.mr(mem);
    const readOnly = await f.mr(new ArrayBuffer(4096), Access.LOCAL_WRITE | Access.REMOTE_READ);
    f.verbs.postSend(
      a.qp,
      new SendWrList().push({ wrId: 20, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlags.SIGNALED, remoteAddr: mr.addr + 4096n, rkey: mr.rkey ^ 0x77700, sgList: [{ addr: mr.addr, length: 64, lkey: mr.lkey }] }),
    );
    let [wc] = await a.sendCq.waitFor(1);
    t.equal(wcStatusName(wc!.status), 'REM_ACCESS_ERR');
    t.ok(new Uint8Array(mem, 4096, 64).every((x) => x === 0), 'nothing written');

    // A fresh pair: writing to an MR registered without REMOTE_WRITE is refused the same way.
    const pair = await f.rcPair();
    f.verbs.postSend(
      pair.a.qp,
      new SendWrList().push({ wrId: 21, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlags.SIGNALED, remoteAddr: readOnly.addr, rkey: readOnly.rkey, sgList: [{ addr: mr.addr, length: 64, lkey: mr.lkey }] }),
    );
    [wc] = await pair.a.sendCq.waitFor(1);
    t.equal(wcStatusName(wc!.status), 'REM_ACCESS_ERR');
    // An RDMA READ past the end of the remote MR.
    const pair2 = await f.rcPair();
    f.verbs.postSend(
      pair2.a.qp,
      new SendWrList().push({ wrId: 22, opcode: WrOpcode.RDMA_READ, sendFlags: SendFlags.SIGNALED, remoteAddr: mr.addr + 8000n, rkey: mr.rkey, sgList: [{ addr: mr.addr, length: 1000, lkey: mr.lkey }] }),
    );
    [wc] = await pair2.a.sendCq.waitFor(1);
    t.equal(wcStatusName(wc!.status), 'REM_ACCESS_ERR');
    void b;
    void events;
  });
});

t.test('a QP in the wrong state: posts and transitions are refused with EINVAL', async (t) => {
  await withRxe(t, async (f) => {
    const cq = await f.cq();
    const qp = await f.qp(QpType.RC, cq, cq);
    const send = new SendWrList().push({ wrId: 1, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED });
    const recv = new RecvWrList().push({ wrId: 2 });
    t.throws(() => f.verbs.postSend(qp, send), { name: 'VerbsError', verb: 'ibv_post_send', errno: 'EINVAL', badWrIndex: 0 }, 'post_send in RESET');
    t.throws(() => f.verbs.postRecv(qp, recv), { name: 'VerbsError', verb: 'ibv_post_recv', errno: 'EINVAL', badWrIndex: 0 }, 'post_recv in RESET');
    await t.rejects(f.verbs.modifyQp(qp, { qpState: QpState.RTS }), { name: 'VerbsError', verb: 'ibv_modify_qp', errno: 'EINVAL' }, 'RESET -> RTS');
    await t.rejects(f.verbs.modifyQp(qp, { qpState: QpState.INIT }), { name: 'VerbsError', errno: 'EINVAL' }, 'RESET -> INIT without port, pkey, access');
    await f.verbs.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: RXE_PORT, qpAccessFlags: ALL_ACCESS });
    t.throws(() => f.verbs.postSend(qp, send), { name: 'VerbsError', verb: 'ibv_post_send', errno: 'EINVAL' }, 'post_send in INIT');
    f.verbs.postRecv(qp, recv); // receives may be posted from INIT on
    await t.rejects(f.verbs.modifyQp(qp, { qpState: QpState.RTR }), { name: 'VerbsError', errno: 'EINVAL' }, 'INIT -> RTR without a path');
    await t.rejects(f.verbs.modifyQp(qp, {}), { name: 'VerbsError', errno: 'EINVAL', message: /no attribute given/ });
    await t.rejects(f.verbs.modifyQp(qp, { timeout: 32 }), { name: 'VerbsError', errno: 'EINVAL', message: /timeout must be an integer in 0..31/ });
    t.equal((await f.verbs.queryQp(qp)).qpState, QpState.INIT, 'refused transitions left it in INIT');
    // ERR flushes the posted receive.
    await f.verbs.modifyQp(qp, { qpState: QpState.ERR });
    const [wc] = await cq.waitFor(1);
    t.same([Number(wc!.wrId), wcStatusName(wc!.status)], [2, 'WR_FLUSH_ERR']);
  });
});

t.test('destroying a QP with work outstanding flushes it (WR_FLUSH_ERR)', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const mem = new ArrayBuffer(4096);
    const mr = await f.mr(mem);
    const recvs = new RecvWrList();
    for (let i = 0; i < 5; i++) recvs.push({ wrId: 100 + i, sgList: [{ addr: mr.addr, length: 64, lkey: mr.lkey }] });
    f.verbs.postRecv(a.qp, recvs);
    await f.release(a.qp); // destroyQp, now

    const flushed = await a.recvCq.waitFor(5);
    t.same(flushed.map((w) => [Number(w.wrId), wcStatusName(w.status), w.qpNum]), [100, 101, 102, 103, 104].map((id) => [id, 'WR_FLUSH_ERR', a.qp.qpNum]));
    t.throws(() => f.verbs.postRecv(a.qp, recvs), { name: 'VerbsError', errno: 'EBADF', message: /qp handle \d+ does not exist or was already destroyed/ });
    await t.rejects(f.verbs.destroyQp(a.qp), { name: 'VerbsError', verb: 'ibv_destroy_qp', errno: 'EBADF' }, 'destroyed exactly once');
    await t.rejects(f.verbs.modifyQp(a.qp, { qpState: QpState.RESET }), { name: 'VerbsError', verb: 'ibv_modify_qp', errno: 'EBADF' });
    void b;
  });
});

t.test('destroying a QP with sends in flight flushes them: every signaled send completes, in order', async (t) => {
  await withRxe(t, async (f) => {
    const sendCq = await f.cq();
    const recvCq = await f.cq();
    const lonely = await f.qp(QpType.RC, sendCq, recvCq);
    const peer = await f.qp(QpType.RC, recvCq, recvCq);
    // Connected to a QP number nobody has: rxe drops the packets, so the sends wait for ACKs that never come
    // (the retry budget, 7 retries of ~67 ms, outlasts the test's destroy).
    await f.connectRc(lonely, { ...peer, qpNum: 0xfffff0 });
    const mem = new ArrayBuffer(4096);
    const mr = await f.mr(mem);
    const sends = new SendWrList();
    for (let i = 0; i < 6; i++)
      sends.push({ wrId: 500 + i, opcode: WrOpcode.SEND, sendFlags: i % 2 === 1 ? SendFlags.SIGNALED : 0, sgList: [{ addr: mr.addr, length: 32, lkey: mr.lkey }] });
    f.verbs.postSend(lonely, sends);
    await f.release(lonely);
    // The flush (or, for the one on the wire, the retry limit) completes every WR still queued, unsignaled
    // ones included (an error completion is always reported).
    const done = await sendCq.waitFor(6);
    t.same(done.map((w) => Number(w.wrId)), [500, 501, 502, 503, 504, 505], 'all six, in posting order');
    t.match(wcStatusName(done[0]!.status), /^(WR_FLUSH_ERR|RETRY_EXC_ERR)$/, `the first: ${wcStatusName(done[0]!.status)}`);
    t.same(done.slice(1).map((w) => wcStatusName(w.status)), Array(5).fill('WR_FLUSH_ERR'), 'the rest flushed');
    t.same(sendCq.pollNow(), [], 'nothing more');
  });
});

t.test('handle rules: wrong kind, children before parents, busy objects', async (t) => {
  await withRxe(t, async (f) => {
    const cq = await f.cq();
    // Not through the fixture: this test destroys the QP itself.
    const qp = await f.verbs.createQp(f.pd, { qpType: QpType.RC, sendCq: cq.cq, recvCq: cq.cq, maxSendWr: 4, maxRecvWr: 4, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
    // A CQ handle where a QP is expected.
    const asQp = { ...qp, id: cq.cq.id };
    t.throws(() => f.verbs.postSend(asQp, new SendWrList().push({ wrId: 1, opcode: WrOpcode.SEND })), {
      message: `ibv_post_send: EBADF (qp handle ${cq.cq.id} is a cq handle)`,
    });
    await t.rejects(f.verbs.deallocPd(f.pd), { name: 'VerbsError', verb: 'ibv_dealloc_pd', errno: 'EBUSY', message: /still has 1 dependent/ });
    await t.rejects(f.verbs.destroyCq(cq.cq), { name: 'VerbsError', verb: 'ibv_destroy_cq', errno: 'EBUSY' }, 'a CQ used by a QP');
    await t.rejects(f.verbs.closeDevice(f.device), { name: 'VerbsError', verb: 'ibv_close_device', errno: 'EBUSY' });
    // A destroy while another verb on the same object is in flight is refused, not raced.
    const modify = f.verbs.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: RXE_PORT, qpAccessFlags: 0 });
    await t.rejects(f.verbs.destroyQp(qp), { name: 'VerbsError', verb: 'ibv_destroy_qp', errno: 'EBUSY', message: /operation\(s\) in progress/ });
    await modify;
    // The handle is invalid as soon as the destroy starts.
    const destroying = f.verbs.destroyQp(qp);
    await t.rejects(f.verbs.queryQp(qp), { name: 'VerbsError', errno: 'EBADF', message: /being destroyed/ });
    await destroying;
    await t.rejects(f.verbs.destroyQp(qp), { name: 'VerbsError', errno: 'EBADF', message: /does not exist or was already destroyed/ });
    await f.verbs.deallocPd(await f.verbs.allocPd(f.device));
  });
});

t.test('memory registration errors', async (t) => {
  await withRxe(t, async (f) => {
    const buf = new ArrayBuffer(4096);
    await t.rejects(f.verbs.regMr(f.pd, buf, { offset: 4000, length: 200, access: Access.LOCAL_WRITE }), { name: 'VerbsError', verb: 'ibv_reg_mr', errno: 'EINVAL', message: /outside the 4096-byte buffer/ });
    await t.rejects(f.verbs.regMr(f.pd, buf, { length: 0, access: Access.LOCAL_WRITE }), { name: 'VerbsError', errno: 'EINVAL' });
    // REMOTE_WRITE without LOCAL_WRITE is invalid for libibverbs.
    await t.rejects(f.verbs.regMr(f.pd, buf, { access: Access.REMOTE_WRITE }), { name: 'VerbsError', verb: 'ibv_reg_mr', errno: 'EINVAL' });
    const moved = new ArrayBuffer(64);
    structuredClone(moved, { transfer: [moved] });
    await t.rejects(f.verbs.regMr(f.pd, moved, { access: Access.LOCAL_WRITE }), { name: 'VerbsError', errno: 'EINVAL', message: /detached/ });
    t.throws(() => f.verbs.postSend({ kind: 'qp', id: 0, qpNum: 0, qpType: 2, cap: { maxSendWr: 0, maxRecvWr: 0, maxSendSge: 0, maxRecvSge: 0, maxInlineData: 0 } }, new SendWrList().push({ wrId: 1, opcode: 0 })), { name: 'VerbsError', errno: 'EBADF' });
  });
});

t.test('an unknown device name is ENODEV and lists the devices there are', async (t) => {
  await withRxe(t, async (f) => {
    await t.rejects(f.verbs.openDevice('vrdma-no-such-device'), { name: 'VerbsError', verb: 'ibv_open_device', errno: 'ENODEV', message: /no RDMA device named vrdma-no-such-device \(devices: .*rxe0/ });
  });
});
