// The mapped-mode tests on real soft-RoCE (spec section 13, issue 11 items 5 and 6), written once for the two
// transports like two-vms-suite.ts: RC QPs whose host SQ, RQ and CQ the guest writes and polls in place, the
// backend's JavaScript handling no work request of theirs; a UD QP on the relay in the same VM; and a hostile
// guest's moves on its own mapped queues, after each of which the other VM works, the backend answers and, once
// the guest destroyed its objects, nothing is left on the host.
//
// This file registers no test by itself (tap lists it as "no tests found").
import type { Test } from 'tap';
import { HostQueueFormat, Limits, WcFlag, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { MappedCq, type MappedQp } from '../../guest-driver-spec/driver/index.ts';
import { RxeHeader } from '../../guest-driver-spec/driver/mapped/rxe-abi.ts';
import { hostObjectsOf, NO_HOST_OBJECTS, pattern } from './rxe-helpers.ts';
import { ALL_ACCESS, SUBTEST_TIMEOUT_MS, WAIT_MS, waitNoHostObjects, withObjects, type Scope, type Vm, type VmPair } from './two-vms-suite.ts';

/** A test's mapped objects on one VM, destroyed (QPs, then the CQ) before withObjects checks the host. */
interface Mapped {
  vm: Vm;
  cq: MappedCq;
  qps: MappedQp[];
}

async function mappedSide(vm: Vm): Promise<Mapped> {
  return { vm, cq: await vm.ctx.createCq(64, { map: true }), qps: [] };
}

async function releaseMapped(m: Mapped): Promise<void> {
  for (const qp of m.qps.splice(0)) if (!qp.destroyed) await qp.destroy();
  if (!m.cq.destroyed) await m.cq.destroy();
}

/** withObjects, plus a mapped CQ on each VM that `body` builds mapped QPs on. */
async function withMapped(t: Test, pair: VmPair, body: (a: Mapped, b: Mapped, s: Scope) => Promise<void>): Promise<void> {
  await withObjects(t, pair, async (a, b, s) => {
    const ma = await mappedSide(a);
    const mb = await mappedSide(b);
    try {
      await body(ma, mb, s);
    } finally {
      await releaseMapped(ma);
      await releaseMapped(mb);
    }
  });
}

async function mappedRc(m: Mapped): Promise<MappedQp> {
  const qp = await m.vm.ctx.createQp(m.vm.pd, { type: 'RC', sendCq: m.cq, recvCq: m.cq, maxSendWr: 32, maxRecvWr: 32 });
  m.qps.push(qp);
  return qp;
}

async function mappedPair(a: Mapped, b: Mapped): Promise<[MappedQp, MappedQp]> {
  const qa = await mappedRc(a);
  const qb = await mappedRc(b);
  await qa.connect({ gid: b.vm.ctx.gid, qpn: qb.qpNum }, { accessFlags: ALL_ACCESS });
  await qb.connect({ gid: a.vm.ctx.gid, qpn: qa.qpNum }, { accessFlags: ALL_ACCESS });
  return [qa, qb];
}

/** Work requests the backend's JavaScript relayed for the mapped QPs of both VMs (must stay 0). */
function relayedForMapped(pair: VmPair): number {
  let n = 0;
  for (const end of [pair.a, pair.b]) for (const c of end.device.qpCounters()) if (c.mapped) n += c.relayedWorkRequests;
  return n;
}

const u64 = (v: bigint): Uint8Array => {
  const x = new Uint8Array(8);
  new DataView(x.buffer).setBigUint64(0, v, true);
  return x;
};
const read64 = (vm: Vm, off: number): bigint => new DataView(vm.buf.read(off, 8).buffer).getBigUint64(0, true);

/** The mapped data path between VM A and VM B, every byte verified. */
export function registerMappedExchangeTests(t: Test, pairOf: () => Promise<VmPair>): void {
  const opts = { timeout: SUBTEST_TIMEOUT_MS };

  t.test('HOST_QUEUE_MAPPING negotiated with the RXE format; both kinds of QP in one VM', opts, async (t) => {
    const pair = await pairOf();
    for (const end of [pair.a, pair.b]) {
      t.equal(end.ctx.driver.mapping?.format, HostQueueFormat.RXE, `${end.name}: mapping on, format RXE`);
    }
  });

  t.test('mapped RC: SEND/RECV over two SGEs, SEND_WITH_IMM, inline SEND; no work request through the backend', opts, async (t) => {
    const pair = await pairOf();
    await withMapped(t, pair, async (a, b) => {
      const [qa, qb] = await mappedPair(a, b);
      t.equal(qa.mode, 'mapped');
      const msg = pattern(3000, 1);
      a.vm.buf.write(0, msg.subarray(0, 1000));
      a.vm.buf.write(8192, msg.subarray(1000));
      await qb.postRecv([
        { wrId: 100n, sgList: [b.vm.mr.sge(0, 4096)] },
        { wrId: 101n, sgList: [b.vm.mr.sge(4096, 2048), b.vm.mr.sge(16384, 2048)] },
        { wrId: 102n, sgList: [b.vm.mr.sge(20_000, 64)] },
      ]);
      await qa.postSend([{ wrId: 1n, opcode: 'SEND', signaled: true, sgList: [a.vm.mr.sge(0, 1000), a.vm.mr.sge(8192, 2000)] }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 1n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, qpHandle: qa.handle }]);
      t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 100n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 3000, qpHandle: qb.handle }]);
      t.same(b.vm.buf.read(0, 3000), msg, '3000 bytes byte for byte');

      const imm = 0x8badf00d;
      const small = pattern(3000, 2);
      a.vm.buf.write(0, small);
      await qa.postSend([{ wrId: 2n, opcode: 'SEND_WITH_IMM', signaled: true, imm, sgList: [a.vm.mr.sge(0, 3000)] }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 2n, status: WcStatus.SUCCESS }]);
      const [withImm] = await b.cq.waitPoll(1, WAIT_MS);
      t.match(withImm, { wrId: 101n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 3000, immData: imm });
      t.ok((withImm!.wcFlags & WcFlag.WITH_IMM) !== 0, 'WITH_IMM flag');
      t.same(b.vm.buf.read(4096, 2048), small.subarray(0, 2048), 'first receive SGE');
      t.same(b.vm.buf.read(16384, 952), small.subarray(2048), 'second receive SGE');

      const inline = pattern(48, 3);
      if (qa.caps.maxInlineData >= inline.length) {
        await qa.postSend([{ wrId: 3n, opcode: 'SEND', signaled: true, inline }]);
        t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 3n, status: WcStatus.SUCCESS }]);
        t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 102n, byteLen: 48 }]);
        t.same(b.vm.buf.read(20_000, 48), inline, 'inline bytes');
      } else {
        // The device did not offer INLINE (max_inline_data 0 in its configuration): the driver refuses inline data
        // before anything reaches the queue, and the QP goes on working.
        await t.rejects(qa.postSend([{ wrId: 3n, opcode: 'SEND', signaled: true, inline }]), { name: 'UsageError' }, `inline data refused: max_inline_data ${qa.caps.maxInlineData}`);
        a.vm.buf.write(0, inline);
        await qa.postSend([{ wrId: 3n, opcode: 'SEND', signaled: true, sgList: [a.vm.mr.sge(0, 48)] }]);
        t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 3n, status: WcStatus.SUCCESS }]);
        t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 102n, byteLen: 48 }]);
        t.same(b.vm.buf.read(20_000, 48), inline, 'the same bytes by an SGE after the refusal');
      }
      t.equal(relayedForMapped(pair), 0, "the backend's JavaScript relayed no work request of a mapped QP");
      t.ok(pair.a.device.qpCounters().some((c) => c.mapped && c.doorbellsExecuted > 0n), 'the doorbell thread executed the SQ doorbells');
    });
  });

  t.test('mapped RC: WRITE, WRITE_WITH_IMM, READ, CAS and FAA, byte for byte', opts, async (t) => {
    const pair = await pairOf();
    await withMapped(t, pair, async (a, b) => {
      const [qa, qb] = await mappedPair(a, b);
      const data = pattern(20_000, 4);
      a.vm.buf.write(0, data);
      await qa.postSend([{ wrId: 10n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.vm.mr.sge(0, data.length)], remoteAddr: b.vm.mr.iova + 1024n, rkey: b.vm.mr.rkey }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 10n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }]);
      t.same(b.vm.buf.read(1024, data.length), data, 'the peer memory holds the written bytes');
      t.same(await b.cq.poll(), [], 'a plain WRITE consumes no receive');

      await qb.postRecv([{ wrId: 200n, sgList: [b.vm.mr.sge(60_000, 16)] }]);
      const tail = pattern(512, 5);
      a.vm.buf.write(0, tail);
      await qa.postSend([{ wrId: 11n, opcode: 'RDMA_WRITE_WITH_IMM', signaled: true, imm: 7, sgList: [a.vm.mr.sge(0, 512)], remoteAddr: b.vm.mr.iova, rkey: b.vm.mr.rkey }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 11n, status: WcStatus.SUCCESS }]);
      t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 200n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, immData: 7 }]);
      t.same(b.vm.buf.read(0, 512), tail);

      const remote = pattern(9000, 6);
      b.vm.buf.write(30_000, remote);
      a.vm.buf.fill(0);
      await qa.postSend([{ wrId: 12n, opcode: 'RDMA_READ', signaled: true, sgList: [a.vm.mr.sge(100, 9000)], remoteAddr: b.vm.mr.iova + 30_000n, rkey: b.vm.mr.rkey }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 12n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_READ }]);
      t.same(a.vm.buf.read(100, 9000), remote, 'READ brought the peer bytes');

      b.vm.buf.write(40_960, u64(0x1122334455667788n));
      await qa.postSend([{ wrId: 20n, opcode: 'ATOMIC_CMP_AND_SWP', signaled: true, sgList: [a.vm.mr.sge(0, 8)], remoteAddr: b.vm.mr.iova + 40_960n, rkey: b.vm.mr.rkey, compareAdd: 0x1122334455667788n, swap: 42n }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 20n, status: WcStatus.SUCCESS, opcode: WcOpcode.COMP_SWAP }]);
      t.equal(read64(a.vm, 0), 0x1122334455667788n, 'CAS returned the old value');
      t.equal(read64(b.vm, 40_960), 42n, 'CAS swapped');
      await qa.postSend([{ wrId: 21n, opcode: 'ATOMIC_FETCH_AND_ADD', signaled: true, sgList: [a.vm.mr.sge(8, 8)], remoteAddr: b.vm.mr.iova + 40_960n, rkey: b.vm.mr.rkey, compareAdd: 1000n }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 21n, status: WcStatus.SUCCESS, opcode: WcOpcode.FETCH_ADD }]);
      t.equal(read64(a.vm, 8), 42n, 'FAA returned the old value');
      t.equal(read64(b.vm, 40_960), 1042n, 'FAA added');
      t.equal(relayedForMapped(pair), 0, "the backend's JavaScript relayed no work request of a mapped QP");
    });
  });

  t.test('a UD QP on the relay next to a mapped RC QP in the same VM', opts, async (t) => {
    const pair = await pairOf();
    await withMapped(t, pair, async (a, b, s) => {
      const [qa, qb] = await mappedPair(a, b);
      const ua = s.qp(await a.vm.ctx.createQp(a.vm.pd, { type: 'UD', sendCq: a.vm.cq, recvCq: a.vm.cq }));
      const ub = s.qp(await b.vm.ctx.createQp(b.vm.pd, { type: 'UD', sendCq: b.vm.cq, recvCq: b.vm.cq }));
      t.equal(ua.mode, 'relay', 'UD stays on the relay (13.8)');
      await ua.readyUd();
      await ub.readyUd();
      const ah = s.ah(await a.vm.ctx.createAh(a.vm.pd, { dgid: b.vm.ctx.gid }));
      const msg = pattern(700, 7);
      a.vm.buf.write(0, msg);
      await ub.postRecv([{ wrId: 300n, sgList: [b.vm.mr.sge(0, Limits.GRH_SIZE + 1024)] }]);
      await qb.postRecv([{ wrId: 301n, sgList: [b.vm.mr.sge(8192, 64)] }]);
      await ua.postSend([{ wrId: 30n, opcode: 'SEND', signaled: true, sgList: [a.vm.mr.sge(0, 700)], ah, remoteQpn: ub.qpNum, remoteQkey: 0x1111_1111 }]);
      await qa.postSend([{ wrId: 31n, opcode: 'SEND', signaled: true, sgList: [a.vm.mr.sge(0, 64)] }]);
      t.match(await a.vm.cq.waitPoll(1, WAIT_MS), [{ wrId: 30n, status: WcStatus.SUCCESS }], 'UD send completion on the relayed CQ');
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 31n, status: WcStatus.SUCCESS }], 'RC send completion on the mapped CQ');
      t.match(await b.vm.cq.waitPoll(1, WAIT_MS), [{ wrId: 300n, byteLen: Limits.GRH_SIZE + 700 }]);
      t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 301n, byteLen: 64 }]);
      t.same(b.vm.buf.read(Limits.GRH_SIZE, 700), msg, 'UD payload');
      t.same(b.vm.buf.read(8192, 64), msg.subarray(0, 64), 'RC payload');
      const counters = pair.a.device.qpCounters();
      t.ok(counters.some((c) => !c.mapped && c.relayedWorkRequests > 0), 'the relay counted the UD work request');
      t.equal(relayedForMapped(pair), 0, 'and none of the mapped QP');
    });
  });
}

/** A hostile guest on its own mapped queues (issue 11 item 6, the guest-side cases). */
export function registerMappedHostileTests(t: Test, pairOf: () => Promise<VmPair>): void {
  const opts = { timeout: SUBTEST_TIMEOUT_MS };

  /** B still works end to end with A (a fresh mapped pair), and the backend answers. */
  const stillFine = async (t: Test, a: Mapped, b: Mapped, what: string): Promise<void> => {
    const [qa, qb] = await mappedPair(a, b);
    const msg = pattern(256, 9);
    a.vm.buf.write(32_768, msg);
    await qb.postRecv([{ wrId: 900n, sgList: [b.vm.mr.sge(32_768, 256)] }]);
    await qa.postSend([{ wrId: 901n, opcode: 'SEND', signaled: true, sgList: [a.vm.mr.sge(32_768, 256)] }]);
    t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 900n, status: WcStatus.SUCCESS }], `${what}: the other VM still receives`);
    t.same(b.vm.buf.read(32_768, 256), msg, `${what}: byte for byte`);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 901n, status: WcStatus.SUCCESS }]);
    t.ok((await b.vm.ctx.queryDevice()).max_qp > 0, `${what}: the backend answers`);
  };

  t.test("another VM's keys, a key of another PD, an SGE outside the MR: the host's error on the guest's own QP", opts, async (t) => {
    await withMapped(t, await pairOf(), async (a, b, s) => {
      const guard = pattern(4096, 10);
      b.vm.buf.write(0, guard);
      const cases: [string, Parameters<MappedQp['postSend']>[0][number]][] = [
        ["B's lkey as A's local key", { wrId: 1n, opcode: 'SEND', signaled: true, sgList: [{ addr: b.vm.mr.iova, length: 64, lkey: b.vm.mr.lkey }] }],
        ['an SGE past the end of its MR', { wrId: 2n, opcode: 'SEND', signaled: true, sgList: [a.vm.mr.sge(a.vm.buf.length - 16, 64)] }],
      ];
      const pd2 = s.pd(await a.vm.ctx.allocPd());
      const other = a.vm.ctx.allocBuffer(4096);
      try {
        const mr2 = s.mr(await a.vm.ctx.regMr(pd2, other, ALL_ACCESS));
        cases.push(['a key of its own MR in another PD', { wrId: 3n, opcode: 'SEND', signaled: true, sgList: [mr2.sge(0, 64)] }]);
        for (const [what, wr] of cases) {
          const [qa, qb] = await mappedPair(a, b);
          await qb.postRecv([{ wrId: 50n, sgList: [b.vm.mr.sge(8192, 4096)] }]);
          await qa.postSend([wr]);
          const [wc] = await a.cq.waitPoll(1, WAIT_MS);
          t.ok(wc !== undefined && wc.status !== WcStatus.SUCCESS, `${what}: completes with ${wc?.statusName}`);
          t.same(b.vm.buf.read(0, 4096), guard, `${what}: nothing of B changed`);
          await qa.destroy();
          await qb.destroy();
          await b.cq.poll(); // B's receive flushed by its destroy
        }
        // A WRITE with B's rkey from a third party's view: an rkey of B that B did not grant for this address range.
        const [qa] = await mappedPair(a, b);
        await qa.postSend([{ wrId: 4n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.vm.mr.sge(0, 64)], remoteAddr: b.vm.mr.iova, rkey: (b.vm.mr.rkey ^ 0x5a5a00) >>> 0 }]);
        t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 4n, status: WcStatus.REM_ACCESS_ERR }], 'a forged rkey: REM_ACCESS_ERR');
        t.same(b.vm.buf.read(0, 4096), guard, 'B untouched');
      } finally {
        other.release();
      }
      await stillFine(t, a, b, 'after the bad keys');
    });
  });

  t.test('a corrupted producer index and garbage in its own CQ harm only the guest', opts, async (t) => {
    await withMapped(t, await pairOf(), async (a, b) => {
      const [qa] = await mappedPair(a, b);
      // Slots never written, named by a producer index far ahead: the host masks it and runs what it finds.
      await qa.postRaw('SQ', [], 0xdead_beef);
      await qa.ringDoorbell(0xdead_beef);
      await new Promise((r) => setTimeout(r, 500));
      // Garbage in the CQ's consumer index (the guest's own): the host sees its CQ overrun at worst.
      const cqq = a.cq.queue;
      await cqq.window.writeU32(cqq.base + BigInt(RxeHeader.CONSUMER_INDEX), 0x7777_7777);
      await cqq.window.write(cqq.base + BigInt(RxeHeader.SIZE), new Uint8Array(256).fill(0xee));
      await new Promise((r) => setTimeout(r, 500));
      await qa.destroy();
      const fresh = await mappedSide(a.vm);
      try {
        await stillFine(t, fresh, b, 'after the corrupted indexes');
      } finally {
        await releaseMapped(fresh);
      }
    });
  });

  t.test("doorbells and loads/stores in a destroyed QP's pages are ignored", opts, async (t) => {
    await withMapped(t, await pairOf(), async (a, b) => {
      const [qa] = await mappedPair(a, b);
      const { window, offset } = qa.doorbell;
      const sq = qa.sq;
      await qa.destroy();
      await window.writeU32(offset, 12345);
      const stale = await sq.window.read(sq.base, 512);
      await sq.window.write(sq.base + BigInt(RxeHeader.SIZE), new Uint8Array(256).fill(0x55));
      t.ok(stale.byteLength === 512, "a load in the destroyed queue's range returns (the transport's value)");
      await new Promise((r) => setTimeout(r, 300));
      await stillFine(t, a, b, 'after touching destroyed pages');
    });
  });
}

/**
 * A device reset while queues are mapped (13.10): every host object of that VM goes, the other VM's stay and it is
 * still served. Ends the pair's A (register last).
 */
export function registerMappedResetTest(t: Test, pairOf: () => Promise<VmPair>): void {
  t.test('a reset while mapped: the host objects of that VM released, the other VM served', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
    const pair = await pairOf();
    const a = pair.a;
    const cq = await a.ctx.createCq(16, { map: true });
    const pd = await a.ctx.allocPd();
    const qp = await a.ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 8, maxRecvWr: 8 });
    await qp.postRecv([{ wrId: 1n, sgList: [] }]);
    t.ok(hostObjectsOf(process.pid).qp >= 1, 'the mapped QP is on the host');
    await a.ctx.driver.close(); // status 0: a device reset, the transport stays
    const dev = a.device;
    await dev.settled();
    t.same([dev.pds.size, dev.cqs.size, dev.qps.size], [0, 0, 0], "A's device forgot every object");
    t.same(await waitNoHostObjects(), NO_HOST_OBJECTS, 'rdma resource show: nothing of A left on the host');
    t.ok((await pair.b.ctx.queryDevice()).max_qp > 0, 'VM B still served');
  });
}
