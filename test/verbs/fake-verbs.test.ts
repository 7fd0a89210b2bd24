// FakeVerbs, the HostVerbs test double: injected failures surface exactly as native ones do (VerbsError with the
// verb and errno), and its lifecycle rules are NativeVerbs' (EBADF after destroy, EBUSY for parents).
import t from 'tap';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { VerbsError } from '../../vmm-device/verbs/host-verbs.ts';
import { RecvWrList, SendWrList, WcBuffer } from '../../vmm-device/verbs/layout.ts';
import { Access, QpState, QpType, SendFlags, WcOpcode, WcStatus, WrOpcode } from '../../vmm-device/verbs/constants.ts';

async function setup(fake = new FakeVerbs()) {
  const device = await fake.openDevice('fake0');
  const pd = await fake.allocPd(device);
  const cq = await fake.createCq(device, 16);
  const init = { qpType: QpType.RC, sendCq: cq, recvCq: cq, maxSendWr: 8, maxRecvWr: 8, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 };
  return { fake, device, pd, cq, init };
}

t.test('an injected ENOMEM on ibv_create_qp, then success', async (t) => {
  const { fake, pd, init } = await setup();
  fake.failNext('ibv_create_qp', 'ENOMEM');
  const err = await fake.createQp(pd, init).catch((e: unknown) => e);
  t.type(err, VerbsError);
  t.equal((err as VerbsError).message, 'ibv_create_qp: ENOMEM (injected failure)');
  t.equal((err as VerbsError).verb, 'ibv_create_qp');
  t.equal((err as VerbsError).errno, 'ENOMEM');
  t.equal(fake.liveObjects().qp, 0, 'nothing created');
  const qp = await fake.createQp(pd, init);
  t.equal(qp.kind, 'qp');
  t.equal(fake.liveObjects().qp, 1);
});

t.test('a failing reg_mr (with and without iova) and the QP limit', async (t) => {
  const { fake, pd, init } = await setup(new FakeVerbs({ maxQp: 1 }));
  fake.failNext('ibv_reg_mr', 'EFAULT', 2);
  await t.rejects(fake.regMr(pd, new ArrayBuffer(64), { access: Access.LOCAL_WRITE }), { name: 'VerbsError', verb: 'ibv_reg_mr', errno: 'EFAULT' });
  await t.rejects(fake.regMr(pd, new ArrayBuffer(64), { access: Access.LOCAL_WRITE }), { name: 'VerbsError', errno: 'EFAULT' });
  fake.failNext('ibv_reg_mr_iova', 'ENOMEM');
  await t.rejects(fake.regMr(pd, new ArrayBuffer(64), { access: Access.LOCAL_WRITE, iova: 0x1000 }), { name: 'VerbsError', verb: 'ibv_reg_mr_iova', errno: 'ENOMEM' });
  const mr = await fake.regMr(pd, new ArrayBuffer(64), { access: Access.LOCAL_WRITE, iova: 0x1000 });
  t.equal(mr.addr, 0x1000n);
  await fake.createQp(pd, init);
  await t.rejects(fake.createQp(pd, init), { name: 'VerbsError', verb: 'ibv_create_qp', errno: 'ENOMEM' });
  await fake.deregMr(mr);
});

t.test('handles: EBADF after destroy or for the wrong kind, EBUSY for parents, an injected destroy failure keeps the object', async (t) => {
  const { fake, device, pd, cq, init } = await setup();
  const qp = await fake.createQp(pd, init);
  await t.rejects(fake.deallocPd(pd), { name: 'VerbsError', errno: 'EBUSY' });
  await t.rejects(fake.destroyCq(cq), { name: 'VerbsError', errno: 'EBUSY' });
  await t.rejects(fake.closeDevice(device), { name: 'VerbsError', errno: 'EBUSY' });
  t.throws(() => fake.pollCq({ kind: 'cq', id: qp.id, cqe: 1 }, new WcBuffer(1)), { message: `ibv_poll_cq: EBADF (cq handle ${qp.id} is a qp handle)` });
  fake.failNext('ibv_destroy_qp', 'EIO');
  await t.rejects(fake.destroyQp(qp), { name: 'VerbsError', errno: 'EIO' });
  t.equal((await fake.queryQp(qp)).qpState, QpState.RESET, 'still there and usable');
  const destroying = fake.destroyQp(qp);
  await t.rejects(fake.queryQp(qp), { name: 'VerbsError', errno: 'EBADF', message: /being destroyed/ });
  await destroying;
  await t.rejects(fake.destroyQp(qp), { name: 'VerbsError', errno: 'EBADF', message: /already destroyed/ });
  await fake.destroyCq(cq);
  await fake.deallocPd(pd);
  await fake.closeDevice(device);
  t.same(fake.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 });
});

t.test('injected completion statuses, posting in the wrong state, flush on ERR and destroy', async (t) => {
  const { fake, pd, cq, init } = await setup();
  const qp = await fake.createQp(pd, init);
  const send = new SendWrList().push({ wrId: 1, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED });
  t.throws(() => fake.postSend(qp, send), { name: 'VerbsError', errno: 'EINVAL', badWrIndex: 0 });
  t.throws(() => fake.postRecv(qp, new RecvWrList().push({ wrId: 1 })), { name: 'VerbsError', errno: 'EINVAL' });
  await t.rejects(fake.modifyQp(qp, { qpState: QpState.RTS }), { name: 'VerbsError', errno: 'EINVAL' });
  for (const s of [QpState.INIT, QpState.RTR, QpState.RTS]) await fake.modifyQp(qp, { qpState: s });
  fake.postRecv(qp, new RecvWrList().push({ wrId: 7 }).push({ wrId: 8 }));
  fake.injectCompletionStatus(WcStatus.RETRY_EXC_ERR);
  fake.postSend(qp, send);
  const wcs = new WcBuffer(8);
  t.equal(fake.pollCq(cq, wcs), 3);
  t.same(wcs.toArray().map((w) => [Number(w.wrId), w.status]), [
    [1, WcStatus.RETRY_EXC_ERR],
    [7, WcStatus.WR_FLUSH_ERR],
    [8, WcStatus.WR_FLUSH_ERR],
  ]);
  t.equal((await fake.queryQp(qp)).qpState, QpState.ERR);
  // Destroy flushes outstanding receives too, and an armed CQ raises its event.
  let events = 0;
  const device2 = await fake.openDevice('fake0');
  const armedCq = await fake.createCq(device2, 4, { onCompletionEvent: () => events++ });
  const qp2 = await fake.createQp(pd, { ...init, sendCq: armedCq, recvCq: armedCq });
  await fake.modifyQp(qp2, { qpState: QpState.INIT });
  fake.reqNotifyCq(armedCq, false);
  fake.postRecv(qp2, new RecvWrList().push({ wrId: 9 }));
  await fake.destroyQp(qp2);
  await new Promise((r) => setImmediate(r));
  t.equal(events, 1, 'one completion event');
  t.equal(fake.pollCq(armedCq, wcs), 1);
  t.same([wcs.wrId(0), wcs.status(0)], [9, WcStatus.WR_FLUSH_ERR]);
});

t.test('a device that does not exist, and an injected failure of the device list', async (t) => {
  const fake = new FakeVerbs();
  await t.rejects(fake.openDevice('rxe0'), { name: 'VerbsError', verb: 'ibv_open_device', errno: 'ENODEV', message: /devices: fake0/ });
  fake.failNext('ibv_get_device_list', 'ENOSYS');
  t.throws(() => fake.listDevices(), { name: 'VerbsError', errno: 'ENOSYS' });
  t.same(fake.listDevices().map((d) => d.name), ['fake0']);
  t.same(fake.calls, ['ibv_open_device', 'ibv_get_device_list', 'ibv_get_device_list']);
});

t.test('qpConnection reads a QP state and destination; deliverSend completes a receive only on an RTR or RTS QP', async (t) => {
  const { fake, pd, cq, init } = await setup();
  const qp = await fake.createQp(pd, init);
  t.same(fake.qpConnection(qp), { state: QpState.RESET, destQpNum: undefined });
  t.equal(fake.qpConnection({ ...qp, id: cq.id }), undefined, 'a handle naming a CQ is no QP');
  await fake.modifyQp(qp, { qpState: QpState.INIT });
  fake.postRecv(qp, new RecvWrList().push({ wrId: 5 }));
  t.notOk(fake.deliverSend(qp.qpNum, 0x999, 64, false), 'INIT takes no SEND');
  await fake.modifyQp(qp, { qpState: QpState.RTR, destQpNum: 0x777 });
  t.same(fake.qpConnection(qp), { state: QpState.RTR, destQpNum: 0x777 });
  t.notOk(fake.deliverSend(qp.qpNum + 1, 0x999, 64, false), 'no QP of that number');
  t.ok(fake.deliverSend(qp.qpNum, 0x999, 64, false));
  t.notOk(fake.deliverSend(qp.qpNum, 0x999, 64, false), 'no receive left');
  const wcs = new WcBuffer(4);
  t.equal(fake.pollCq(cq, wcs), 1);
  const [wc] = wcs.toArray();
  t.same([wc!.wrId, wc!.status, wc!.opcode, wc!.byteLen, wc!.qpNum, wc!.srcQp], [5n, WcStatus.SUCCESS, WcOpcode.RECV, 64, qp.qpNum, 0x999]);
});
