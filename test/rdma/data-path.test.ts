// The data path over FakeVerbs (which moves no data but completes work like a host): WQEs taken from the guest's
// rings, CQEs written in WQE order, signaled/unsignaled, bad WQEs completed with the spec's statuses, flush on ERR
// and on destroy, arm and completion events, CQ overrun, WQ overflow, doorbell errors and event coalescing.
// Byte movement between two VMs is tested against real rxe in test/rxe/device-*.test.ts.

import t from 'tap';
import type { Test } from 'tap';
import {
  AccessFlag,
  ArmCqRequest,
  Command,
  DestroyQpResponse,
  DoorbellErrorReason,
  DoorbellType,
  EventType,
  QpAttr,
  QpAttrMask,
  QpFatalReason,
  QpState,
  QueryQpResponse,
  SendFlag,
  SendOpcode,
  Status,
  WcOpcode,
  WcStatus,
  CqErrorReason,
} from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { PAGE, TestGuest, connectRc, waitFor, type GuestCq, type GuestMr, type GuestQp } from './guest.ts';

const S = QpAttrMask;


interface Setup {
  g: TestGuest;
  verbs: FakeVerbs;
  pd: number;
  cq: GuestCq;
  qp: GuestQp;
  mr: GuestMr;
}

async function setup(t: Test, opts: { cqDepth?: number; sqSigAll?: number; connect?: boolean } = {}): Promise<Setup> {
  const verbs = new FakeVerbs();
  const g = await TestGuest.open({ verbs });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const cq = await g.createCq(opts.cqDepth ?? 16);
  const qp = await g.createQp(pd, cq, cq, 2, 16, opts.sqSigAll ?? 0);
  const mr = await g.regMr(pd, 2 * PAGE, AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ);
  if (opts.connect !== false) await connectRc(g, qp);
  return { g, verbs, pd, cq, qp, mr };
}

async function qpState(g: TestGuest, qp: GuestQp): Promise<number> {
  const a = await g.cmd(Command.QUERY_QP, new Uint8Array([qp.handle, 0, 0, 0, 0, 0, 0, 0]));
  return QpAttr.decode(QueryQpResponse.decode(a.body).attr).qp_state;
}

t.test('signaled sends complete into the guest CQ in order; unsignaled ones do not', async (t) => {
  const { g, cq, qp, mr } = await setup(t);
  const sge = { addr: mr.iova, length: 100, lkey: mr.lkey };
  qp.writeSend({ wr_id: 1n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [sge] });
  qp.writeSend({ wr_id: 2n, opcode: SendOpcode.RDMA_WRITE, flags: 0, sges: [sge], remote_addr: 0x1000n, rkey: 5 });
  qp.writeSend({ wr_id: 3n, opcode: SendOpcode.RDMA_WRITE_WITH_IMM, flags: SendFlag.SIGNALED, sges: [sge], imm_data: 0x1234 });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const cqes = await cq.waitFor(2);
  t.same(cqes.map((c) => [c.wr_id, c.status, c.opcode, c.qp_handle]), [
    [1n, WcStatus.SUCCESS, WcOpcode.SEND, qp.handle],
    [3n, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE, qp.handle],
  ]);
  t.equal(qp.sqConsumer, 3, 'consumer_index past every taken WQE');
  await new Promise((r) => setTimeout(r, 20));
  t.same(cq.poll(), [], 'nothing for the unsignaled WQE');
});

t.test('sq_sig_all: every send completes', async (t) => {
  const { g, cq, qp, mr } = await setup(t, { sqSigAll: 1 });
  qp.writeSend({ wr_id: 9n, opcode: SendOpcode.SEND, flags: 0, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  t.same((await cq.waitFor(1)).map((c) => c.wr_id), [9n]);
});

t.test('send WQEs posted before RTS are taken at the transition', async (t) => {
  const { g, cq, qp, mr } = await setup(t, { connect: false });
  await g.modifyQp(qp.handle, S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, { qp_state: 1, port_num: 1 });
  qp.writeSend({ wr_id: 5n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  t.equal(qp.sqConsumer, 0, 'not taken in INIT');
  await connectRc(g, qp);
  t.same((await cq.waitFor(1)).map((c) => c.wr_id), [5n]);
});

t.test('bad WQEs: LOC_PROT_ERR / LOC_QP_OP_ERR, the QP moves to ERR, later WQEs are flushed', async (t) => {
  const cases: [string, Parameters<GuestQp['writeSend']>[0] | ((mr: GuestMr) => Parameters<GuestQp['writeSend']>[0]), number][] = [
    ['unknown lkey', (mr) => ({ sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey + 1000 }] }), WcStatus.LOC_PROT_ERR],
    ['SGE past the MR', (mr) => ({ sges: [{ addr: mr.iova + BigInt(mr.length) - 4n, length: 8, lkey: mr.lkey }] }), WcStatus.LOC_PROT_ERR],
    ['SGE before the MR', (mr) => ({ sges: [{ addr: mr.iova - 1n, length: 8, lkey: mr.lkey }] }), WcStatus.LOC_PROT_ERR],
    ['bad opcode', (mr) => ({ opcode: 5, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] }), WcStatus.LOC_QP_OP_ERR],
    ['num_sge above the QP', (mr) => ({ num_sge: 5, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] }), WcStatus.LOC_QP_OP_ERR],
    ['INLINE not offered', (mr) => ({ flags: SendFlag.SIGNALED | SendFlag.INLINE, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] }), WcStatus.LOC_QP_OP_ERR],
    ['atomic with 4 bytes', (mr) => ({ opcode: SendOpcode.ATOMIC_FETCH_AND_ADD, sges: [{ addr: mr.iova, length: 4, lkey: mr.lkey }] }), WcStatus.LOC_QP_OP_ERR],
    ['atomic at a misaligned remote address', (mr) => ({ opcode: SendOpcode.ATOMIC_CMP_AND_SWP, remote_addr: 4n, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] }), WcStatus.LOC_QP_OP_ERR],
  ];
  for (const [what, make, status] of cases) {
    await t.test(what, async (t) => {
      const { g, cq, qp, mr } = await setup(t);
      qp.writeRecv(100n, [{ addr: mr.iova, length: 64, lkey: mr.lkey }]);
      await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
      const wqe = typeof make === 'function' ? make(mr) : make;
      qp.writeSend({ wr_id: 1n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, ...wqe });
      qp.writeSend({ wr_id: 2n, opcode: SendOpcode.SEND, flags: 0, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
      await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
      const cqes = await cq.waitFor(3);
      const byId = new Map(cqes.map((c) => [c.wr_id, c.status]));
      t.equal(byId.get(1n), status, 'the bad WQE');
      t.equal(byId.get(2n), WcStatus.WR_FLUSH_ERR, 'the next one, even unsignaled, is flushed');
      t.equal(byId.get(100n), WcStatus.WR_FLUSH_ERR, 'the posted receive is flushed');
      t.equal(await qpState(g, qp), QpState.ERR);
    });
  }
});

t.test('an error completion from the host comes through with its status', async (t) => {
  const { g, cq, qp, mr, verbs } = await setup(t);
  verbs.injectCompletionStatus(WcStatus.REM_ACCESS_ERR);
  qp.writeSend({ wr_id: 7n, opcode: SendOpcode.RDMA_WRITE, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }], rkey: 1 });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [c] = await cq.waitFor(1);
  t.equal(c!.status, WcStatus.REM_ACCESS_ERR);
  await waitFor(() => ((g.device.qps.get(qp.handle)?.state ?? 0) === QpState.ERR ? true : undefined), 'QP in ERR');
});

t.test('DESTROY_QP flushes outstanding receives and counts them', async (t) => {
  const { g, cq, qp, mr, verbs } = await setup(t);
  for (let i = 0; i < 3; i++) qp.writeRecv(BigInt(i), [{ addr: mr.iova, length: 64, lkey: mr.lkey }]);
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
  t.ok(verbs.calls.includes('ibv_post_recv'), 'receives handed to the host');
  qp.writeRecv(3n, [{ addr: mr.iova, length: 64, lkey: mr.lkey }]); // in the ring, never rung
  const d = await g.destroy(Command.DESTROY_QP, qp.handle);
  t.equal(d.status, Status.OK);
  t.same(DestroyQpResponse.decode(d.body), { sq_flushed: 0, rq_flushed: 4, flush_dropped: 0 });
  t.same(cq.poll().map((c) => [c.wr_id, c.status]), [0n, 1n, 2n, 3n].map((i) => [i, WcStatus.WR_FLUSH_ERR]), 'in WQE order');
  t.equal(verbs.liveObjects().qp, 0);
});

t.test('flush completions that do not fit are counted as dropped and do not put the CQ in error', async (t) => {
  const { g, cq, qp, mr } = await setup(t, { cqDepth: 2 });
  for (let i = 0; i < 4; i++) qp.writeRecv(BigInt(i), [{ addr: mr.iova, length: 64, lkey: mr.lkey }]);
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
  const d = DestroyQpResponse.decode((await g.destroy(Command.DESTROY_QP, qp.handle)).body);
  t.same(d, { sq_flushed: 0, rq_flushed: 2, flush_dropped: 2 });
  t.equal(g.device.cqs.get(cq.handle)!.error, false);
});

t.test('arming: NEXT notifies on the next completion, once; arming with unconsumed CQEs notifies at once', async (t) => {
  const { g, cq, qp, mr } = await setup(t);
  g.postEventBuffers(8);
  t.equal((await g.cmd(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: cq.handle, solicited_only: 0 }))).status, Status.OK);
  const send = (id: bigint) => qp.writeSend({ wr_id: id, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
  send(1n);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const events = await g.waitEvents(1);
  t.same(events.map((e) => [e.type, e.handle, e.count, e.sequence]), [[EventType.COMPLETION, cq.handle, 1, 0n]]);
  send(2n);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  await waitFor(() => (cq.producer === 2 ? true : undefined), 'second CQE');
  await new Promise((r) => setTimeout(r, 20));
  t.same(g.readEvents(), [], 'one-shot: no second event without a new arm');
  // Two CQEs unconsumed: an arm record notifies at once.
  await g.ring([{ handle: cq.handle, type: DoorbellType.CQ_ARM_NEXT }]);
  const again = await g.waitEvents(1);
  t.same(again.map((e) => [e.type, e.handle, e.sequence]), [[EventType.COMPLETION, cq.handle, 1n]]);
  t.equal(cq.poll().length, 2);
  t.ok(g.interrupts[1]! >= 2, 'event queue interrupts');
});

t.test('CQ overrun: CQ_ERROR OVERRUN, the QPs using it QP_FATAL CQ_OVERRUN, ARM_CQ then WRONG_STATE', async (t) => {
  const { g, cq, qp, mr } = await setup(t, { cqDepth: 1 });
  g.postEventBuffers(8);
  for (let i = 0; i < 3; i++) qp.writeSend({ wr_id: BigInt(i), opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const events = await g.waitEvents(2);
  t.same(events.slice(0, 2).map((e) => [e.type, e.handle, e.detail]), [
    [EventType.CQ_ERROR, cq.handle, CqErrorReason.OVERRUN],
    [EventType.QP_FATAL, qp.handle, QpFatalReason.CQ_OVERRUN],
  ]);
  t.equal(cq.poll().length, 1, 'only the CQE that fitted');
  const arm = await g.cmd(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: cq.handle, solicited_only: 0 }));
  t.same([arm.status, arm.detail], [Status.WRONG_STATE, 0]);
});

t.test('a CQ consumer_index ahead of the producer: CQ_ERROR INDEX_INVALID', async (t) => {
  const { g, cq, qp, mr } = await setup(t);
  g.postEventBuffers(4);
  g.mem.writeU32(cq.index + 4, 1000);
  qp.writeSend({ wr_id: 1n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.detail], [EventType.CQ_ERROR, CqErrorReason.INDEX_INVALID]);
});

t.test('a producer_index more than the depth ahead: QP_FATAL WQ_OVERFLOW, no completions for the bogus entries', async (t) => {
  const { g, cq, qp } = await setup(t);
  g.postEventBuffers(4);
  g.mem.writeU32(qp.rqIndex, qp.depth + 5);
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.handle, e!.detail], [EventType.QP_FATAL, qp.handle, QpFatalReason.WQ_OVERFLOW]);
  t.equal(qp.rqConsumer, qp.depth + 5, 'the bogus entries are skipped');
  t.same(cq.poll(), []);
  await waitFor(() => (g.device.qps.get(qp.handle)!.state === QpState.ERR ? true : undefined), 'ERR');
});

t.test('doorbell errors are events, never NEEDS_RESET; waiting events coalesce per type and handle', async (t) => {
  const { g, qp } = await setup(t, { connect: false });
  await g.ring([{ handle: 999, type: DoorbellType.SQ }]);
  await g.ring([{ handle: 999, type: DoorbellType.SQ }, { handle: 999, type: DoorbellType.RQ }]);
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]); // QP in RESET
  await g.ring([{ handle: qp.handle, type: 9 }]);
  await g.ring([{ handle: 4242, type: DoorbellType.CQ_ARM_NEXT }]);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }], 3); // partial record
  await g.ring(Array.from({ length: 257 }, () => ({ handle: qp.handle, type: DoorbellType.SQ })));
  t.equal(g.device.waitingEvents > 0, true, 'events wait for buffers');
  g.postEventBuffers(16);
  const events = g.readEvents();
  t.same(
    events.map((e) => [e.type, e.handle, e.detail, e.count]),
    [
      // Handles naming no object share one waiting event (section 9.3's bound): 999 three times, then 4242.
      [EventType.DOORBELL_ERROR, 999, DoorbellErrorReason.UNKNOWN_HANDLE, 4],
      // RESET RQ record, unknown type (coalesced: same type and handle), partial buffer's record, 256 of 257.
      [EventType.DOORBELL_ERROR, qp.handle, DoorbellErrorReason.WRONG_STATE, 259],
      [EventType.DOORBELL_ERROR, 0, DoorbellErrorReason.PARTIAL_RECORD, 2],
    ],
    'first detail kept, counts added, order of first occurrence',
  );
  t.same(events.map((e) => e.sequence), [0n, 1n, 2n]);
  t.equal(g.broken.length, 0);
});

t.test('DESTROY_QP discards the waiting events of the QP', async (t) => {
  const { g, qp } = await setup(t, { connect: false });
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
  t.equal(g.device.waitingEvents, 1);
  await g.destroy(Command.DESTROY_QP, qp.handle);
  g.postEventBuffers(2);
  t.same(g.readEvents(), []);
});

t.test('host async events: QP_FATAL moves the QP to ERR and reaches the event queue', async (t) => {
  const { g, qp, verbs } = await setup(t);
  g.postEventBuffers(2);
  const host = g.device.qps.get(qp.handle)!.host;
  verbs.raiseAsyncEvent((g.device as unknown as { hostDevice: Parameters<FakeVerbs['raiseAsyncEvent']>[0] }).hostDevice, { type: 'QP_FATAL', typeNumber: 1, qp: host });
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.handle, e!.detail], [EventType.QP_FATAL, qp.handle, QpFatalReason.HOST_ERROR]);
  t.equal(await qpState(g, qp), QpState.ERR);
});

t.test('MODIFY_QP to RESET discards work without completions and empties the rings', async (t) => {
  const { g, cq, qp, mr } = await setup(t);
  for (let i = 0; i < 2; i++) qp.writeRecv(BigInt(i), [{ addr: mr.iova, length: 64, lkey: mr.lkey }]);
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
  t.equal((await g.modifyQp(qp.handle, S.STATE, { qp_state: QpState.RESET })).status, Status.OK);
  qp.writeRecv(9n, [{ addr: mr.iova, length: 64, lkey: mr.lkey }]); // written during RESET: discarded on leaving it
  await g.modifyQp(qp.handle, S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, { qp_state: 1, port_num: 1 });
  t.equal(qp.rqConsumer, qp.rqProducer);
  await new Promise((r) => setTimeout(r, 20));
  t.same(cq.poll(), []);
});

t.test('policy teardown (the hook for the VPC work): ERR, flush, then QP_POLICY_TEARDOWN', async (t) => {
  const { g, cq, qp, mr } = await setup(t);
  g.postEventBuffers(4);
  qp.writeRecv(1n, [{ addr: mr.iova, length: 64, lkey: mr.lkey }]);
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);
  const torn = await g.device.teardownConnections((c) => (c.dgid[15] === 2 ? 1 : undefined));
  t.same(torn, [qp.handle]);
  const cqes = await cq.waitFor(1);
  t.same([cqes[0]!.wr_id, cqes[0]!.status], [1n, WcStatus.WR_FLUSH_ERR]);
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.handle, e!.detail], [EventType.QP_POLICY_TEARDOWN, qp.handle, 1]);
  t.equal(await qpState(g, qp), QpState.ERR);
  t.same(await g.device.teardownConnections(() => 1), [], 'a QP in ERR is not torn down twice');
});
