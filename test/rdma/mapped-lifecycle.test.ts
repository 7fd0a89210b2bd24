// Host queue mapping (spec 13), the life of mapped objects: doorbells (13.6: the move to RTS and ERR ring the engine,
// records naming a mapped QP are DOORBELL_ERROR WRONG_STATE), arming and host events (13.7), DESTROY_QP and
// DESTROY_CQ in the order of 13.9 (unmap confirmed before the host destroy; a refused or unanswered unmap), reset
// (13.10, bounded when the VMM stopped answering), policy teardown (13.11: the mapping stays until DESTROY_QP), the
// per-QP counters, NOTIFY mode's mapdoorbellq, and the region's allocators.

import t from 'tap';
import {
  Command,
  CqErrorReason,
  CreateQpMappedResponse,
  encodeRequest,
  DestroyQpResponse,
  DoorbellErrorReason,
  DoorbellType,
  EventType,
  QpAttrMask,
  QpFatalReason,
  QpState,
  ResourceKind,
  Status,
} from '../../vmm-device/abi/rdma/index.ts';
import { RangeAllocator, SlotAllocator } from '../../vmm-device/rdma/mapped/region.ts';
import type { QueueOffload } from '../../vmm-device/virtio/device.ts';
import * as sys from '../../vmm-device/native/sys.ts';
import { PAGE, connectRc, waitFor } from './guest.ts';
import { MAPPED_FEATURES, createMappedCq, createMappedQp, mappedQpRequest, mappedRig, qpCmd, type MappedRig } from './mapped-rig.ts';

async function objects(rig: MappedRig, opts: { connect?: boolean } = {}) {
  const { g } = rig;
  const pd = await g.createPd();
  const cq = await createMappedCq(g);
  const qp = await createMappedQp(g, { pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle });
  if (opts.connect === true) await connectRc(g, qp);
  return { pd, cq, qp, slot: Number(qp.doorbellOffset / 8n) };
}

/** The index of the first call matching `re` in the verbs double's log (which the mapper writes into too). */
function at(calls: string[], re: RegExp, from = 0): number {
  for (let i = from; i < calls.length; i++) if (re.test(calls[i]!)) return i;
  return -1;
}

t.test('doorbells (spec 13.6): RTS and ERR ring the engine; SQ and RQ records naming a mapped QP are ignored', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const { qp, slot } = await objects(rig);
  const engine = verbs.engines.at(-1)!;
  t.ok(engine.calls.includes(`attach ${slot} qp ${g.device.qps.get(qp.handle)!.host.id}`), 'the slot is attached at creation');
  t.equal(engine.calls.filter((c) => c.startsWith('ring')).length, 0, 'nothing rung before RTS');
  await connectRc(g, qp);
  t.same(engine.calls.filter((c) => c.startsWith('ring')), [`ring ${slot}`], 'the move to RTS executes the remembered doorbell once');
  // The guest stores into its slot through the VMM's mapping of the doorbell pages.
  const v = new Uint8Array(4);
  new DataView(v.buffer).setUint32(0, 5, true);
  mapper.write(qp.doorbellOffset, v);
  t.equal(engine.scan(), 1, 'the engine sees the changed slot');
  t.equal(engine.scan(), 0, 'and executes it once');
  t.equal(engine.counters(slot).executed, 2n);
  g.postEventBuffers(8);
  await g.ring([
    { handle: qp.handle, type: DoorbellType.SQ },
    { handle: qp.handle, type: DoorbellType.RQ },
  ]);
  const events = await g.waitEvents(2);
  t.same(
    events.map((e) => [e.type, e.handle, e.detail]),
    [
      [EventType.DOORBELL_ERROR, qp.handle, DoorbellErrorReason.WRONG_STATE],
      [EventType.DOORBELL_ERROR, qp.handle, DoorbellErrorReason.WRONG_STATE],
    ],
    'DOORBELL_ERROR WRONG_STATE for the SQ and the RQ record',
  );
  t.equal(g.device.qpCounters().find((c) => c.handle === qp.handle)!.relayedWorkRequests, 0, 'the relay took no work request of the mapped QP');
  const m = await g.modifyQp(qp.handle, QpAttrMask.STATE, { qp_state: QpState.ERR });
  t.equal(m.status, Status.OK);
  t.same(engine.calls.filter((c) => c.startsWith('ring')), [`ring ${slot}`, `ring ${slot}`], 'ERR executes the doorbell (the host flushes)');
});

t.test('arming and host events of mapped objects (spec 13.7)', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const { cq, qp } = await objects(rig);
  const hostCq = g.device.cqs.get(cq.handle)!.host;
  const hostQp = g.device.qps.get(qp.handle)!.host;
  g.postEventBuffers(16);
  t.notOk(verbs.raiseCompletionEvent(hostCq), 'the host CQ is not armed before the guest arms it');
  t.equal((await g.cmd(Command.ARM_CQ, new Uint8Array([cq.handle, 0, 0, 0, 1, 0, 0, 0]))).status, Status.OK, 'ARM_CQ solicited');
  await g.ring([{ handle: cq.handle, type: DoorbellType.CQ_ARM_NEXT }]);
  t.ok(verbs.calls.filter((c) => c === 'ibv_req_notify_cq').length >= 2, 'each arm arms the host CQ');
  t.ok(verbs.raiseCompletionEvent(hostCq), 'armed on the host');
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.handle], [EventType.COMPLETION, cq.handle], 'COMPLETION for the mapped CQ');
  t.notOk(verbs.raiseCompletionEvent(hostCq), 'one-shot: disarmed');
  verbs.raiseAsyncEvent(g.device.hostDevice, { type: 'QP_FATAL', typeNumber: 1, qp: hostQp });
  const [f] = await g.waitEvents(1);
  t.same([f!.type, f!.handle, f!.detail], [EventType.QP_FATAL, qp.handle, QpFatalReason.HOST_ERROR], 'a host QP fatal error is QP_FATAL HOST_ERROR');
  verbs.raiseAsyncEvent(g.device.hostDevice, { type: 'CQ_ERR', typeNumber: 2, cq: hostCq });
  const [c] = await g.waitEvents(1);
  t.same([c!.type, c!.handle, c!.detail], [EventType.CQ_ERROR, cq.handle, CqErrorReason.HOST_ERROR], 'a host CQ error is CQ_ERROR HOST_ERROR');
  const arm = await g.cmd(Command.ARM_CQ, new Uint8Array([cq.handle, 0, 0, 0, 0, 0, 0, 0]));
  t.same([arm.status, arm.detail], [Status.WRONG_STATE, 0], 'a mapped CQ in error cannot be armed');
});

t.test('DESTROY_QP and DESTROY_CQ (spec 13.9): ERR, detach, unmap confirmed, host destroy, ranges released', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const { cq, qp, slot, pd } = await objects(rig, { connect: true });
  const engine = verbs.engines.at(-1)!;
  const busy = await g.destroy(Command.DESTROY_CQ, cq.handle);
  t.same([busy.status, busy.detail], [Status.BUSY, ResourceKind.QP], 'a mapped CQ with its QP: BUSY');
  const start = verbs.calls.length;
  const a = await g.destroy(Command.DESTROY_QP, qp.handle);
  t.equal(a.status, Status.OK);
  t.same(DestroyQpResponse.decode(a.body), { sq_flushed: 0, rq_flushed: 0, flush_dropped: 0 }, 'the host flushes into the mapped CQ: the device counts none');
  const calls = verbs.calls;
  const err = at(calls, /^ibv_modify_qp$/, start);
  const unmapSq = at(calls, new RegExp(`^shmem_unmap ${qp.sq.offset}$`), start);
  const unmapRq = at(calls, new RegExp(`^shmem_unmap ${qp.rq.offset}$`), start);
  const destroy = at(calls, /^ibv_destroy_qp$/, start);
  t.ok(err >= 0 && err < unmapSq && unmapSq < unmapRq && unmapRq < destroy, `ERR, unmap SQ, unmap RQ, then the host destroy (${calls.slice(start).join(', ')})`);
  t.ok(engine.calls.indexOf(`detach ${slot}`) > 0, 'the doorbell was detached');
  t.same(g.device.mapping!.usage, { queues: 1, ranges: 1, slots: 0 }, 'the ranges and the slot are released');
  t.equal(mapper.live.size, 2, 'the CQ and the doorbell pages stay');
  const c0 = verbs.calls.length;
  t.equal((await g.destroy(Command.DESTROY_CQ, cq.handle)).status, Status.OK);
  t.ok(at(verbs.calls, /^shmem_unmap /, c0) < at(verbs.calls, /^ibv_destroy_cq$/, c0), 'the CQ is unmapped before its host destroy');
  t.equal(verbs.liveObjects().qp + verbs.liveObjects().cq, 0, 'nothing of them left on the host');
  t.same(g.device.mapping!.usage, { queues: 0, ranges: 0, slots: 0 });
  // The range and the slot serve a later QP of the same device (spec 13.9).
  const cq2 = await createMappedCq(g);
  const qp2 = await createMappedQp(g, { pd_handle: pd, send_cq_handle: cq2.handle, recv_cq_handle: cq2.handle });
  t.equal(qp2.doorbellOffset, qp.doorbellOffset, 'the freed slot is given again');
});

t.test('DESTROY_QP when the transport refuses or does not confirm the unmap: answered, host object gone, range kept out of use', async (t) => {
  // Depths chosen so that the CQ is a queue of the largest size: the region holds exactly 3 of them.
  const rig = await mappedRig({ maxMappedQueues: 3, unmapTimeoutMs: 50, quotas: { maxQpWr: 16, maxCqe: 64 } });
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const pd = await g.createPd();
  const cq = await createMappedCq(g, { cqe_count: 64 });
  t.equal(cq.queue.size, g.device.mapping!.plan.largestQueue, 'the CQ is a queue of the largest size');
  const qp = await createMappedQp(g, { pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle });
  mapper.refuseUnmaps = 2;
  const a = await g.destroy(Command.DESTROY_QP, qp.handle);
  t.equal(a.status, Status.OK, 'DESTROY_QP cannot fail otherwise (spec 8.13)');
  t.equal(verbs.liveObjects().qp, 0, 'the host QP is destroyed: rxe keeps a still mapped buffer until its last unmapping');
  t.equal(g.device.counters.unmapFailures, 2, 'counted');
  t.same(g.device.mapping!.usage, { queues: 1, ranges: 3, slots: 0 }, 'the SQ and RQ ranges are kept out of use; one queue held');
  // Region full: the kept ranges and the CQ leave no room for the largest QP, though max_mapped_queues would allow it.
  const big = { pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle, max_send_sge: g.config.max_send_sge, max_recv_sge: g.config.max_recv_sge };
  const full = await qpCmd(g, big);
  t.same([full.status, full.detail], [Status.NO_RESOURCES, ResourceKind.MAPPING], 'no free range: NO_RESOURCES MAPPING');
  t.equal(verbs.liveObjects().qp, 0, 'and nothing left of it');
  t.same(g.device.mapping!.usage, { queues: 1, ranges: 3, slots: 0 }, 'nothing held by the refused request');
  mapper.hangUnmaps = true;
  const t0 = Date.now();
  t.equal((await g.destroy(Command.DESTROY_CQ, cq.handle)).status, Status.OK, 'an unanswered unmap: answered after the bound');
  t.ok(Date.now() - t0 < 5000, 'bounded');
  t.equal(verbs.liveObjects().cq, 0);
  g.device.reset();
  await g.device.settled();
  t.same(g.device.mapping!.usage, { queues: 0, ranges: 0, slots: 0 }, 'a reset renews the region');
});

t.test('reset (spec 13.10): doorbells stop, QPs to ERR, every mapping unmapped, then the host objects destroyed', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  await objects(rig, { connect: true });
  const engine = verbs.engines.at(-1)!;
  const start = verbs.calls.length;
  g.device.reset();
  t.equal(engine.attached, 0, 'every slot detached at once');
  await g.device.settled();
  const calls = verbs.calls.slice(start);
  const lastUnmap = calls.map((c) => c.startsWith('shmem_unmap')).lastIndexOf(true);
  t.equal(calls.filter((c) => c.startsWith('shmem_unmap')).length, 4, 'the CQ, the SQ, the RQ and the doorbell pages');
  t.ok(calls.indexOf('ibv_modify_qp') < calls.findIndex((c) => c.startsWith('shmem_unmap')), 'ERR before the unmaps');
  t.ok(lastUnmap < calls.indexOf('ibv_destroy_qp') && lastUnmap < calls.indexOf('ibv_destroy_cq'), 'every unmap before the destroys');
  t.ok(engine.closed, 'the engine is closed');
  t.equal(mapper.live.size, 0, 'nothing mapped in the VMM');
  t.same(verbs.liveObjects(), { device: 1, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'nothing of the guest on the host');
  // The next activation maps anew.
  g.activate(MAPPED_FEATURES);
  const again = await objects(rig);
  t.equal(again.qp.mapped, 1);
  t.equal(verbs.engines.length, 2, 'a new engine for the new activation');
});

t.test('reset while the VMM no longer answers: bounded, nothing left on the host', async (t) => {
  const rig = await mappedRig({ unmapTimeoutMs: 50 });
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  await objects(rig, { connect: true });
  mapper.hangUnmaps = true;
  const t0 = Date.now();
  g.device.reset();
  await g.device.settled();
  t.ok(Date.now() - t0 < 2000, `settled in ${Date.now() - t0} ms: one unanswered unmap, the rest not waited for`);
  t.equal(mapper.calls.filter((c) => c.startsWith('shmem_unmap')).length, 1, 'after the first unanswered unmap no more are sent');
  t.same(verbs.liveObjects(), { device: 1, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'nothing of the guest on the host');
  t.equal(verbs.engines.at(-1)!.closed, true);
});

t.test('a reset during CREATE_QP with MAP leaves nothing behind', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const pd = await g.createPd();
  const cq = await createMappedCq(g);
  const real = mapper.mapShared.bind(mapper);
  let resetDone = false;
  mapper.mapShared = async (m) => {
    await real(m);
    if (!resetDone && m.shmOffset !== 0n) {
      resetDone = true;
      g.device.reset(); // the SQ is mapped; the reset overtakes the request
    }
  };
  // Made available without waiting for its answer: a request a reset overtakes is answered to nobody.
  const req = encodeRequest(Command.CREATE_QP, 99n, mappedQpRequest({ pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle }));
  const at = g.mem.alloc(req.length, { align: 8 });
  g.mem.write(at, req);
  g.ctrl.add({ buffers: [{ addr: at, len: req.length }, { len: 16 + CreateQpMappedResponse.size, write: true }] });
  g.device.queueNotify(0);
  await waitFor(() => (resetDone ? true : undefined), 'the reset');
  await g.device.settled();
  await new Promise((r) => setTimeout(r, 50));
  await g.device.settled();
  // The PD and the CQ made before the request are the reset-versus-host-call race engineer "hardening" fixes
  // (commands.test.ts has it as a TODO): here what the overtaken request made is checked.
  t.equal(verbs.liveObjects().qp, 0, 'the host QP of the overtaken request is destroyed');
  t.equal(mapper.live.size, 0, 'no mapping left: its SQ was unmapped by the undo, the rest by the reset');
  t.ok(verbs.calls.lastIndexOf('ibv_destroy_qp') > verbs.calls.map((c) => c.startsWith('shmem_unmap')).lastIndexOf(true) || verbs.calls.filter((c) => c.startsWith('shmem_unmap')).length >= 2, 'unmapped before destroyed');
});

t.test('policy teardown (spec 13.11): ERR and QP_POLICY_TEARDOWN, the mapping stays until DESTROY_QP', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const { qp } = await objects(rig, { connect: true });
  g.postEventBuffers(4);
  const torn = await g.device.teardownConnections(() => 1);
  t.same(torn, [qp.handle]);
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.handle, e!.detail], [EventType.QP_POLICY_TEARDOWN, qp.handle, 1]);
  t.equal((await verbs.queryQp(g.device.qps.get(qp.handle)!.host)).qpState, QpState.ERR, 'the backend moved the host QP to ERR');
  t.equal(mapper.live.size, 4, 'the mapping stays: the driver reads the flush completions');
  t.equal((await g.destroy(Command.DESTROY_QP, qp.handle)).status, Status.OK);
  t.equal(mapper.live.size, 2, 'unmapped by DESTROY_QP');
});

t.test('per-QP counters: the relay counts the work requests it handled; a mapped QP shows the engine doorbells', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const { qp, slot, pd } = await objects(rig, { connect: true });
  const rcq = await g.createCq(16);
  const rqp = await g.createQp(pd, rcq, rcq);
  await connectRc(g, rqp);
  rqp.writeSend({ wr_id: 1n, opcode: 2, flags: 1 });
  await g.ring([{ handle: rqp.handle, type: DoorbellType.SQ }]);
  verbs.engines.at(-1)!.store(slot, 1);
  verbs.engines.at(-1)!.scan();
  const counters = g.device.qpCounters();
  const m = counters.find((c) => c.handle === qp.handle)!;
  const r = counters.find((c) => c.handle === rqp.handle)!;
  t.same([m.mapped, m.relayedWorkRequests, m.doorbellsExecuted], [true, 0, 2n], 'mapped: no work request in JavaScript; RTS and one store executed');
  t.same([r.mapped, r.relayedWorkRequests, r.doorbellsExecuted], [false, 1, 0n], 'relayed: one work request taken by the relay');
  t.equal(g.device.counters.queuesMapped, 3);
});

t.test('NOTIFY mode: mapdoorbellq is lent to the engine; without the lend a kick rings the QPs in RTS', async (t) => {
  const kick = sys.eventfdCreate(0);
  const call = sys.eventfdCreate(0);
  t.teardown(() => {
    sys.close(kick);
    sys.close(call);
  });
  const taken: number[] = [];
  const offload: QueueOffload = {
    take: (index) => {
      taken.push(index);
      return { kickFd: sys.dup(kick), callFd: sys.dup(call) };
    },
    giveBack: () => undefined,
  };
  const rig = await mappedRig({ mode: 'notify' });
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  t.equal(g.device.queueCount, 4);
  g.queueOffload = offload;
  g.device.reset();
  await g.device.settled();
  g.activate(MAPPED_FEATURES);
  const { slot, qp } = await objects(rig, { connect: true });
  const engine = verbs.engines.at(-1)!;
  t.same(taken, [3], 'queue 2 + N taken when the engine starts');
  t.equal(engine.wake, 'notify');
  t.ok(engine.wakeFd !== undefined, 'the kick fd wakes the engine');
  const before = engine.counters(slot).executed;
  g.device.queueNotify(3); // a kick the transport served itself (e.g. after a revocation)
  t.equal(engine.counters(slot).executed, before + 1n, 'the device executes the slots of QPs in RTS');
  t.equal(qp.mapped, 1);
  void PAGE;
});

t.test('the region allocators: first fit, merged free extents, bounded slots', async (t) => {
  const r = new RangeAllocator(4096n, 10n * 4096n);
  const a = r.alloc(4096n)!;
  const b = r.alloc(5000n)!;
  const c = r.alloc(4096n)!;
  t.same([a.offset, b.offset, b.length, c.offset], [4096n, 8192n, 8192n, 16384n], 'page granular, first fit');
  t.equal(r.alloc(7n * 4096n), undefined, 'no extent large enough');
  r.release(b);
  t.same(r.alloc(4096n)!.offset, 8192n, 'a hole is reused first');
  r.release(a);
  r.release(c);
  t.ok(r.freeExtents.length <= 3, 'free extents merge');
  t.throws(() => r.release(a), RangeError, 'a double release is refused');
  t.same(r.live, { ranges: 1, bytes: 4096n });
  const s = new SlotAllocator(2);
  t.same([s.alloc(), s.alloc(), s.alloc()], [0, 1, undefined], 'bounded');
  s.release(0);
  t.equal(s.alloc(), 0, 'the lowest free slot');
  t.throws(() => s.release(5), RangeError);
});

t.test('a hostile guest after DESTROY_QP: stale doorbell stores, records for the destroyed QP, its old range', async (t) => {
  const rig = await mappedRig();
  const { g, verbs, mapper } = rig;
  t.teardown(() => mapper.dropAll());
  const { qp, slot, cq, pd } = await objects(rig, { connect: true });
  const engine = verbs.engines.at(-1)!;
  t.equal((await g.destroy(Command.DESTROY_QP, qp.handle)).status, Status.OK);
  t.throws(() => mapper.read(qp.sq.offset, 4), /nothing mapped/, 'the destroyed SQ range reaches no host memory any more');
  const store = new Uint8Array([9, 0, 0, 0]);
  mapper.write(qp.doorbellOffset, store); // the doorbell pages stay mapped: a store into a freed slot
  t.equal(engine.scan(), 0, 'a store into a freed slot executes nothing');
  g.postEventBuffers(4);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.detail], [EventType.DOORBELL_ERROR, DoorbellErrorReason.UNKNOWN_HANDLE], 'a record for the destroyed QP: UNKNOWN_HANDLE');
  // The slot is given to the next QP: the stale value is taken as acted on, so no spurious doorbell.
  const qp2 = await createMappedQp(g, { pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle });
  t.equal(Number(qp2.doorbellOffset / 8n), slot, 'the same slot');
  t.equal(engine.scan(), 0, 'the old store does not ring the new QP');
  t.equal(g.broken.length + g.failures.length, 0, 'the device never needed a reset');
});
