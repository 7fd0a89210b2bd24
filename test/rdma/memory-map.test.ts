// Memory map changes while the device runs (issue 10's crash, spec 10.8 "Memory map changes"), over the verbs test
// double: the guest's RAM gets a third region after DRIVER_OK (hot-add), objects are placed in it, then it is
// removed (REM_MEM_REG) or replaced (SET_MEM_TABLE) and its buffer detached, as the vhost-user session's munmap
// does right after memoryChanged returns. Before the fix, the next completion for a CQ in that region threw
// `TypeError: Cannot perform Construct on a detached ArrayBuffer` on the host CQ event path and ended the process.

import t from 'tap';
import type { Test } from 'tap';
import {
  AccessFlag,
  Command,
  CqErrorReason,
  EventType,
  QpFatalReason,
  QpState,
  RegMrRequest,
  RegMrResponse,
  ResourceKind,
  SendFlag,
  SendOpcode,
  Status,
  DoorbellType,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { GuestMemory, type MemoryRegionSpec } from '../../vmm-device/memory/guest-memory.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { PAGE, TestGuest, connectRc, waitFor, type GuestQp } from './guest.ts';

const EXTRA_GPA = 0x2000_0000;
const EXTRA_SIZE = 1 << 20;

function specsOf(memory: GuestMemory): MemoryRegionSpec[] {
  return memory.regionList.map((r) => ({ guestPhysAddr: r.guestPhysAddr, size: r.size, userAddr: r.userAddr, buffer: r.buffer, bufferOffset: r.bufferOffset }));
}

/** Installs a new map on both sides (the test's guest and the device), as a transport does. */
function setMemory(g: TestGuest, specs: MemoryRegionSpec[]): GuestMemory {
  const m = new GuestMemory(specs);
  (g.mem as unknown as { memory: GuestMemory }).memory = m;
  g.device.memoryChanged(m);
  return m;
}

/** What the vhost-user session's munmap does to a dropped region's buffer. */
function detach(buffer: ArrayBuffer): void {
  structuredClone(buffer, { transfer: [buffer] });
}

/** Hot-adds a region after DRIVER_OK; returns its buffer and a page allocator inside it. */
function hotAdd(g: TestGuest, gpa = EXTRA_GPA, size = EXTRA_SIZE): { buffer: ArrayBuffer; alloc: (n: number) => number } {
  const buffer = new ArrayBuffer(size);
  setMemory(g, [...specsOf(g.mem.memory), { guestPhysAddr: gpa, size, buffer }]);
  let next = gpa;
  return {
    buffer,
    alloc: (n) => {
      const at = next;
      next += n * PAGE;
      return at;
    },
  };
}

function removeRegion(g: TestGuest, gpa: number): void {
  setMemory(g, specsOf(g.mem.memory).filter((s) => s.guestPhysAddr !== gpa));
}

async function open(t: Test, aliases = new FakeAliasMapper()): Promise<{ g: TestGuest; verbs: FakeVerbs; aliases: FakeAliasMapper }> {
  const verbs = new FakeVerbs();
  const g = await TestGuest.open({ verbs, aliases });
  t.teardown(() => g.device.close());
  return { g, verbs, aliases };
}


function eventsOf(events: { type: number; handle: number; detail: number }[]): [number, number, number][] {
  return events.map((e) => [e.type, e.handle, e.detail]);
}

t.test('REM_MEM_REG of the region holding a live CQ ring: CQ_ERROR and QP_FATAL RING_UNREADABLE, no exception, the rest keeps working', async (t) => {
  const { g, verbs } = await open(t);
  const pd = await g.createPd();
  const other = await g.createCq();
  const extra = hotAdd(g);
  g.pageSource = extra.alloc;
  const cq = await g.createCq(); // in memory added after DRIVER_OK: usable, not OUT_OF_RANGE
  g.pageSource = undefined;
  const qp = await g.createQp(pd, cq, cq);
  const qp2 = await g.createQp(pd, other, other);
  const mr = await g.regMr(pd, PAGE, AccessFlag.LOCAL_WRITE);
  await connectRc(g, qp);
  await connectRc(g, qp2);
  const sge = { addr: mr.iova, length: 64, lkey: mr.lkey };
  qp.writeSend({ wr_id: 1n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [sge] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  t.same((await cq.waitFor(1)).map((c) => [c.wr_id, c.status]), [[1n, WcStatus.SUCCESS]], 'the CQ in hot-added memory works');
  qp.writeRecv(7n, [sge]); // held by the host until the QP leaves: its flush completion comes after the removal
  await g.ring([{ handle: qp.handle, type: DoorbellType.RQ }]);

  removeRegion(g, EXTRA_GPA);
  detach(extra.buffer);
  // A send after the removal, and the host's flush completion of the receive: neither may touch the old ring.
  qp.writeSend({ wr_id: 2n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [sge] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  await waitFor(() => (g.device.qps.get(qp.handle)!.state === QpState.ERR ? true : undefined), 'QP in ERR');
  g.postEventBuffers(8);
  const events = await g.waitEvents(2);
  t.same(
    eventsOf(events),
    [
      [EventType.CQ_ERROR, cq.handle, CqErrorReason.RING_UNREADABLE],
      [EventType.QP_FATAL, qp.handle, QpFatalReason.RING_UNREADABLE],
    ],
    'the spec events, CQ first',
  );
  t.same(g.failures, [], 'no device failure');
  t.same(g.broken, [], 'no NEEDS_RESET');
  t.equal(g.device.counters.ringsLost, 1);

  // The VM's other objects keep working.
  qp2.writeSend({ wr_id: 3n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [sge] });
  await g.ring([{ handle: qp2.handle, type: DoorbellType.SQ }]);
  t.same((await other.waitFor(1)).map((c) => [c.wr_id, c.status]), [[3n, WcStatus.SUCCESS]], 'another CQ still gets completions');
  t.equal((await g.destroy(Command.DESTROY_QP, qp.handle)).status, Status.OK, 'DESTROY_QP of the QP');
  t.equal((await g.destroy(Command.DESTROY_CQ, cq.handle)).status, Status.OK, 'DESTROY_CQ of the CQ in error');
  await g.device.close();
  t.same(verbs.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'nothing left on the host');
});

t.test('a QP whose SQ ring leaves guest RAM: QP_FATAL RING_UNREADABLE; its rings are never touched again', async (t) => {
  const { g } = await open(t);
  const pd = await g.createPd();
  const cq = await g.createCq();
  const extra = hotAdd(g);
  g.pageSource = extra.alloc;
  const qp = await g.createQp(pd, cq, cq);
  g.pageSource = undefined;
  await connectRc(g, qp);
  removeRegion(g, EXTRA_GPA);
  detach(extra.buffer);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }, { handle: qp.handle, type: DoorbellType.RQ }]);
  g.postEventBuffers(4);
  t.same(eventsOf(await g.waitEvents(1)), [[EventType.QP_FATAL, qp.handle, QpFatalReason.RING_UNREADABLE]]);
  t.same(g.failures, []);
  t.equal((await g.destroy(Command.DESTROY_QP, qp.handle)).status, Status.OK);
});

t.test('without memoryChanged a detached ring reaches the guard: NEEDS_RESET through deviceFailed, never an escaping exception', async (t) => {
  const { g } = await open(t);
  const pd = await g.createPd();
  const extra = hotAdd(g);
  g.pageSource = extra.alloc;
  const cq = await g.createCq();
  g.pageSource = undefined;
  const qp = await g.createQp(pd, cq, cq);
  const mr = await g.regMr(pd, PAGE, AccessFlag.LOCAL_WRITE);
  await connectRc(g, qp);
  // A transport that unmaps without telling the model (the bug the guard is the last line against).
  detach(extra.buffer);
  qp.writeSend({ wr_id: 1n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  await waitFor(() => (g.failures.length > 0 ? true : undefined), 'deviceFailed');
  t.match(g.failures[0]!.message, /host CQ event: .*detached/, 'the TypeError, reported');
  t.equal(g.device.counters.deviceFailures, 1);
  t.equal(g.device.isActive, false, 'the device stops serving until reset');
});

t.test('an MR whose pages leave guest RAM is deregistered on the host; its PD\'s QPs get QP_FATAL MR_LOST', async (t) => {
  const { g, verbs, aliases } = await open(t);
  const pd = await g.createPd();
  const pd2 = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  const qpOther = await g.createQp(pd2, cq, cq);
  await connectRc(g, qp);
  await connectRc(g, qpOther);
  const extra = hotAdd(g);
  // Two scattered pages in the new region: an aliased registration.
  const a = extra.alloc(1);
  extra.alloc(1);
  const b = extra.alloc(1);
  const body = RegMrRequest.encode({ pd_handle: pd, access_flags: AccessFlag.LOCAL_WRITE, iova: 0x5000_0000n, length: BigInt(2 * PAGE), page_shift: 12, total_pages: 2, num_pages: 2 });
  const mr = RegMrResponse.decode(await g.ok(Command.REG_MR, body, [BigInt(b), BigInt(a)]));
  t.equal(aliases.live, 1, 'an alias for the scattered pages');
  t.equal(verbs.liveObjects().mr, 1);
  removeRegion(g, EXTRA_GPA);
  detach(extra.buffer);
  await g.device.settled();
  t.equal(verbs.liveObjects().mr, 0, 'host MR deregistered');
  t.equal(aliases.live, 0, 'alias unmapped');
  g.postEventBuffers(4);
  t.same(eventsOf(await g.waitEvents(1)), [[EventType.QP_FATAL, qp.handle, QpFatalReason.MR_LOST]], 'only the QP of the MR\'s PD');
  t.equal(g.device.qps.get(qpOther.handle)!.state, QpState.RTS, 'a QP of another PD is untouched');
  // A WQE naming the lost MR's lkey: LOC_PROT_ERR on a QP of its PD.
  const qp3 = await g.createQp(pd, cq, cq);
  await connectRc(g, qp3);
  qp3.writeSend({ wr_id: 9n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: 0x5000_0000n, length: 8, lkey: mr.lkey }] });
  await g.ring([{ handle: qp3.handle, type: DoorbellType.SQ }]);
  const cqes = await cq.waitFor(1);
  t.same([cqes.at(-1)!.wr_id, cqes.at(-1)!.status], [9n, WcStatus.LOC_PROT_ERR]);
  t.equal((await g.destroy(Command.DEREG_MR, mr.mr_handle)).status, Status.OK, 'DEREG_MR still accepts the handle');
  t.same(g.failures, []);
});

t.test('SET_MEM_TABLE replacing a region at the same addresses: rings continue over the new map, MRs there are lost', async (t) => {
  const { g, verbs } = await open(t);
  const pd = await g.createPd();
  const pd2 = await g.createPd();
  const extra = hotAdd(g);
  g.pageSource = extra.alloc;
  const cq = await g.createCq();
  const mrThere = await g.regMr(pd, PAGE, AccessFlag.LOCAL_WRITE);
  g.pageSource = undefined;
  const mrHere = await g.regMr(pd2, PAGE, AccessFlag.LOCAL_WRITE);
  const qp = await g.createQp(pd, cq, cq);
  const qp2 = await g.createQp(pd2, cq, cq);
  await connectRc(g, qp);
  await connectRc(g, qp2);
  // The same region again, in new memory with the same contents (what a new SET_MEM_TABLE maps).
  const copy = extra.buffer.slice(0);
  setMemory(g, specsOf(g.mem.memory).map((s) => (s.guestPhysAddr === EXTRA_GPA ? { ...s, buffer: copy } : s)));
  detach(extra.buffer);
  await g.device.settled();
  t.equal(verbs.liveObjects().mr, 1, 'the MR in the replaced region is deregistered, the other kept');
  qp2.writeSend({ wr_id: 5n, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mrHere.iova, length: 8, lkey: mrHere.lkey }] });
  await g.ring([{ handle: qp2.handle, type: DoorbellType.SQ }]);
  const cqes = await cq.waitFor(1);
  t.same(cqes.map((c) => [c.wr_id, c.status]), [[5n, WcStatus.SUCCESS]], 'the CQ ring, now in the new memory, gets the completion');
  g.postEventBuffers(4);
  t.same(eventsOf(await g.waitEvents(1)), [[EventType.QP_FATAL, qp.handle, QpFatalReason.MR_LOST]]);
  t.equal(g.device.mrs.get(mrThere.handle)!.lost, true);
  t.same(g.failures, []);
});

t.test('REG_MR of a page across two adjacent RAM regions: stitched when the mapper can, else NO_RESOURCES HOST (never NOT_SUPPORTED)', async (t) => {
  // Region A ends 2 KiB into a 4 KiB page; region B continues there.
  const split = async (aliases: FakeAliasMapper) => {
    const { g } = await open(t, aliases);
    const pd = await g.createPd();
    const half = PAGE / 2;
    const bufA = new ArrayBuffer(2 * PAGE + half);
    const bufB = new ArrayBuffer(2 * PAGE);
    setMemory(g, [...specsOf(g.mem.memory), { guestPhysAddr: EXTRA_GPA, size: bufA.byteLength, buffer: bufA }, { guestPhysAddr: EXTRA_GPA + bufA.byteLength, size: bufB.byteLength, buffer: bufB }]);
    const body = RegMrRequest.encode({ pd_handle: pd, access_flags: AccessFlag.LOCAL_WRITE, iova: 0x6000_0000n, length: BigInt(PAGE), page_shift: 12, total_pages: 1, num_pages: 1 });
    return g.cmd(Command.REG_MR, body, [BigInt(EXTRA_GPA + 2 * PAGE)]);
  };
  const pageMapper = new FakeAliasMapper(4096);
  const refused = await split(pageMapper);
  t.same([refused.status, refused.detail], [Status.NO_RESOURCES, ResourceKind.HOST], 'boundary inside a host page: the host\'s refusal, listed in REG_MR\'s errors');
  const fineMapper = new FakeAliasMapper(1024); // a host whose pages are 1 KiB: the halves can be mapped back to back
  const ok = await split(fineMapper);
  t.equal(ok.status, Status.OK, 'stitched into one range');
  t.equal(fineMapper.mapped, 1, 'by one alias');
  t.not(RegMrResponse.decode(ok.body).lkey, 0);
});
