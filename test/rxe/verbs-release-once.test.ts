// Every native object is released exactly once: on real rxe0, each kind (device context, PD, CQ, QP, MR, AH) is
// destroyed, then destroyed again and used again; both give a precise EBADF VerbsError naming the verb and the
// handle, never a crash or a second release, and `rdma resource show` counts nothing left afterwards (withRxe).
// A work request naming a deregistered MR's keys is refused by the kernel at completion time, not by a crash.
import t from 'tap';
import { RXE_GID_INDEX, RXE_PORT, requireTestHost, withRxe } from './fixture/harness.ts';
import { RecvWrList, SendWrList, WcBuffer } from '../../vmm-device/verbs/layout.ts';
import { Access, QpState, QpType, SendFlags, WrOpcode, wcStatusName } from '../../vmm-device/verbs/constants.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';

requireTestHost();

const gone = (kind: string, id: number) => new RegExp(`^[a-z_]+: EBADF \\(${kind} handle ${id} does not exist or was already destroyed\\)$`);

t.test('PD, CQ, QP, MR and AH: a second destroy and any later use are EBADF', async (t) => {
  await withRxe(t, async (f) => {
    const v = f.verbs;
    // Made outside the fixture's release list: this test releases them itself.
    const pd = await v.allocPd(f.device);
    const cq = await v.createCq(f.device, 16);
    const qp = await v.createQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, maxSendWr: 4, maxRecvWr: 4, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
    const mr = await v.regMr(pd, new ArrayBuffer(4096), { access: Access.LOCAL_WRITE });
    const ah = await v.createAh(pd, { portNum: RXE_PORT, grh: { dgid: f.gid.gid, sgidIndex: RXE_GID_INDEX } });

    await v.destroyQp(qp);
    await t.rejects(v.destroyQp(qp), { name: 'VerbsError', verb: 'ibv_destroy_qp', errno: 'EBADF', message: gone('qp', qp.id) }, 'QP destroyed twice');
    await t.rejects(v.queryQp(qp), { verb: 'ibv_query_qp', errno: 'EBADF', message: gone('qp', qp.id) }, 'QP queried after destroy');
    await t.rejects(v.modifyQp(qp, { qpState: QpState.INIT }), { name: 'VerbsError', verb: 'ibv_modify_qp', errno: 'EBADF' }, 'QP modified after destroy');
    t.throws(() => v.postSend(qp, new SendWrList().push({ wrId: 1, opcode: WrOpcode.SEND })), { verb: 'ibv_post_send', errno: 'EBADF', message: gone('qp', qp.id) });
    t.throws(() => v.postRecv(qp, new RecvWrList().push({ wrId: 1 })), { verb: 'ibv_post_recv', errno: 'EBADF', message: gone('qp', qp.id) });

    await v.destroyAh(ah);
    await t.rejects(v.destroyAh(ah), { verb: 'ibv_destroy_ah', errno: 'EBADF', message: gone('ah', ah.id) }, 'AH destroyed twice');

    await v.deregMr(mr);
    await t.rejects(v.deregMr(mr), { verb: 'ibv_dereg_mr', errno: 'EBADF', message: gone('mr', mr.id) }, 'MR deregistered twice');

    await v.destroyCq(cq);
    await t.rejects(v.destroyCq(cq), { verb: 'ibv_destroy_cq', errno: 'EBADF', message: gone('cq', cq.id) }, 'CQ destroyed twice');
    t.throws(() => v.pollCq(cq, new WcBuffer(4)), { verb: 'ibv_poll_cq', errno: 'EBADF', message: gone('cq', cq.id) }, 'CQ polled after destroy');
    t.throws(() => v.reqNotifyCq(cq, false), { name: 'VerbsError', verb: 'ibv_req_notify_cq', errno: 'EBADF' }, 'CQ armed after destroy');

    await v.deallocPd(pd);
    await t.rejects(v.deallocPd(pd), { verb: 'ibv_dealloc_pd', errno: 'EBADF', message: gone('pd', pd.id) }, 'PD deallocated twice');
    await t.rejects(v.regMr(pd, new ArrayBuffer(64), { access: Access.LOCAL_WRITE }), { verb: 'ibv_reg_mr', errno: 'EBADF', message: gone('pd', pd.id) }, 'MR registered on a freed PD');
    await t.rejects(v.createAh(pd, { portNum: RXE_PORT, grh: { dgid: f.gid.gid, sgidIndex: RXE_GID_INDEX } }), { name: 'VerbsError', verb: 'ibv_create_ah', errno: 'EBADF' });
  });
});

t.test('a device context: closed once, then EBADF for close and every verb', async (t) => {
  // Its own NativeVerbs and context, so that the fixture's (which the leak check needs) stays open.
  await withRxe(t, async () => {
    const v = new NativeVerbs();
    const device = await v.openDevice('rxe0');
    await v.closeDevice(device);
    await t.rejects(v.closeDevice(device), { verb: 'ibv_close_device', errno: 'EBADF', message: gone('context', device.id) }, 'closed twice');
    await t.rejects(v.queryPort(device, RXE_PORT), { verb: 'ibv_query_port', errno: 'EBADF', message: gone('context', device.id) });
    await t.rejects(v.allocPd(device), { name: 'VerbsError', verb: 'ibv_alloc_pd', errno: 'EBADF' });
    await t.rejects(v.createCq(device, 4), { name: 'VerbsError', verb: 'ibv_create_cq', errno: 'EBADF' });
  });
});

t.test("a WRITE naming a deregistered MR's keys fails in a work completion, not in the process", async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const local = await f.mr(new ArrayBuffer(4096));
    const target = await f.verbs.regMr(f.pd, new ArrayBuffer(4096), { access: Access.LOCAL_WRITE | Access.REMOTE_WRITE });
    await f.verbs.deregMr(target);
    f.verbs.postSend(
      a.qp,
      new SendWrList().push({ wrId: 7, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlags.SIGNALED, remoteAddr: target.addr, rkey: target.rkey, sgList: [{ addr: local.addr, length: 64, lkey: local.lkey }] }),
    );
    const [wc] = await a.sendCq.waitFor(1);
    t.equal(wcStatusName(wc!.status), 'REM_ACCESS_ERR', 'the stale rkey is refused by the responder');
    void b;
  });
});
