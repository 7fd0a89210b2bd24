// Mapped CQs and QPs on rxe0 (spec 13; native/src/verbs/mapped.h): the test process plays the VMM and the guest. It
// maps each HostQueueBuffer itself (the one mmap of its offset), checks the header agrees with numSlots/slotSize,
// writes rxe WQEs, rings through the DoorbellEngine and polls the mapped CQs in memory; every byte is checked, and
// `rdma resource show` counts nothing left (withRxe). Runs inside the soft-RoCE test host only.
import t from 'tap';
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { pattern, rdmaResourcesOf, requireTestHost, withRxe } from '../rxe/fixture/harness.ts';
import type { RxeFixture } from '../rxe/fixture/harness.ts';
import { DoorbellPage, MappedQueue } from './fixture/mapped-queues.ts';
import { HostQueueFormat } from '../../vmm-device/abi/rdma/constants.ts';
import { QpState, QpType, SendFlags, WrOpcode } from '../../vmm-device/verbs/constants.ts';
import type { MappedCqHandle, MappedQpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { RecvWrList, SendWrList, WcBuffer } from '../../vmm-device/verbs/layout.ts';
import { eventfdCreate, eventfdWrite, close } from '../../vmm-device/native/sys.ts';

requireTestHost();

const IB_UVERBS_WC_RDMA_WRITE = 1;
const IB_UVERBS_WC_SEND = 0;
const IB_UVERBS_WC_RECV = 128;
/** How long a test waits to see that nothing happens (no execution after detach, no kick in notify mode). */
const QUIET_MS = 300;

async function until(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

interface MappedEnd {
  cq: MappedCqHandle;
  qp: MappedQpHandle;
  cqQ: MappedQueue;
  sqQ: MappedQueue;
  rqQ: MappedQueue;
}

/** A mapped RC QP with one mapped CQ for both queues, its three queues mapped here; released in the right order. */
async function mappedEnd(f: RxeFixture, depth = 16): Promise<MappedEnd> {
  const v = f.verbs;
  const cq = await v.createMappedCq(f.device, 2 * depth);
  f.defer(() => v.destroyCq(cq), cq);
  const qp = await v.createMappedQp(f.pd, {
    qpType: QpType.RC,
    sendCq: cq,
    recvCq: cq,
    maxSendWr: depth,
    maxRecvWr: depth,
    maxSendSge: 1,
    maxRecvSge: 1,
    maxInlineData: 0,
  });
  f.defer(() => v.destroyQp(qp), qp);
  const end: MappedEnd = { cq, qp, cqQ: new MappedQueue(cq.queue), sqQ: new MappedQueue(qp.sq), rqQ: new MappedQueue(qp.rq) };
  // Unmapped before the destroys above run (the fixture releases in reverse order): spec 13.9.
  f.defer(async () => {
    end.cqQ.unmap();
    end.sqQ.unmap();
    end.rqQ.unmap();
  });
  return end;
}

t.test('mapped CQ and QP: geometry, refusals, RC WRITE and SEND/RECV through the doorbell engine', async (t) => {
  await withRxe(t, async (f) => {
    const v = f.verbs;
    t.equal(v.hostQueueFormat(f.device), HostQueueFormat.RXE, 'rxe0 queues are in RXE format');
    const a = await mappedEnd(f);
    const b = await mappedEnd(f);

    // The header the kernel wrote agrees with the geometry derived from the create response.
    for (const [name, q] of [['CQ', a.cqQ], ['SQ', a.sqQ], ['RQ', a.rqQ]] as const) {
      t.equal(1 << q.log2ElemSize, q.queue.slotSize, `${name} slot size ${q.queue.slotSize} matches the header`);
      t.equal(q.indexMask + 1, q.queue.numSlots, `${name} slot count ${q.queue.numSlots} matches the header`);
      t.ok(q.queue.size >= BigInt(384 + q.queue.numSlots * q.queue.slotSize), `${name} size covers every slot`);
    }
    t.same([a.qp.sq.slotSize, a.qp.rq.slotSize, a.cq.queue.slotSize], [256, 64, 128], 'rxe slots: SQ 256, RQ 64, CQ 128');
    t.equal(a.qp.sq.numSlots, 32, 'depth 16 -> 32 slots');
    t.equal(a.qp.cap.maxSendWr, 31, 'the depth in effect is reported');
    t.equal(a.cq.cqe, a.cq.queue.numSlots - 1);

    // The one mmap of an offset is taken: a second is refused by the kernel.
    t.throws(() => new MappedQueue(a.qp.sq), { name: 'SysError', errno: 'EINVAL' }, 'a second mmap of the SQ offset is EINVAL');

    // What this process must never do with mapped objects.
    t.throws(() => v.pollCq(a.cq, new WcBuffer(4)), { name: 'VerbsError', verb: 'ibv_poll_cq', errno: 'EINVAL' });
    t.throws(() => v.postSend(a.qp, new SendWrList().push({ wrId: 1, opcode: WrOpcode.SEND })), { name: 'VerbsError', verb: 'ibv_post_send', errno: 'EINVAL' });
    t.throws(() => v.postRecv(a.qp, new RecvWrList().push({ wrId: 1 })), { name: 'VerbsError', verb: 'ibv_post_recv', errno: 'EINVAL' });
    const init = { sendCq: a.cq, recvCq: a.cq, maxSendWr: 4, maxRecvWr: 4, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 };
    await t.rejects(v.createQp(f.pd, { ...init, qpType: QpType.RC }), { name: 'VerbsError', verb: 'ibv_create_qp', errno: 'EINVAL' }, 'a relayed QP on a mapped CQ');
    await t.rejects(v.createMappedQp(f.pd, { ...init, qpType: QpType.UD }), { name: 'VerbsError', verb: 'create_mapped_qp', errno: 'EINVAL' }, 'a mapped UD QP');
    const relayed = await f.cq(4);
    await t.rejects(v.createMappedQp(f.pd, { ...init, qpType: QpType.RC, sendCq: relayed.cq }), { name: 'VerbsError', errno: 'EINVAL' }, 'a mapped QP on a relayed CQ');
    await t.rejects(v.destroyCq(a.cq), { name: 'VerbsError', verb: 'ibv_destroy_cq', errno: 'EBUSY' }, 'a mapped CQ with its QP');

    await f.connectRc(a.qp, b.qp);
    await f.connectRc(b.qp, a.qp);
    t.equal((await v.queryQp(a.qp)).qpState, QpState.RTS, 'modifyQp and queryQp work on a mapped QP');

    const engine = await v.createDoorbellEngine(f.device, { pages: 1, wake: 'polled' });
    f.defer(() => engine.close());
    t.equal(engine.size, 4096n);
    const page = new DoorbellPage(engine.fd, engine.size);
    f.defer(async () => page.unmap());
    engine.attach(0, a.qp);
    engine.attach(1, b.qp);
    t.throws(() => engine.attach(2, a.qp), { name: 'VerbsError', errno: 'EBUSY' }, 'a QP has one slot');
    t.throws(() => engine.attach(1, a.qp), { name: 'VerbsError', errno: 'EBUSY' });
    t.throws(() => engine.attach(512, a.qp), { name: 'VerbsError', errno: 'EINVAL' }, 'a slot past the pages');

    const src = new ArrayBuffer(8192);
    const dst = new ArrayBuffer(8192);
    new Uint8Array(src).set(pattern(8192, 7));
    const mrA = await f.mr(src);
    const mrB = await f.mr(dst);

    // RC WRITE of 4000 bytes, rung by a store into the doorbell slot: the polled thread executes it.
    page.ring(0, a.sqQ.postSend({ wrId: 11n, opcode: WrOpcode.RDMA_WRITE, flags: SendFlags.SIGNALED, sge: { addr: mrA.addr, length: 4000, lkey: mrA.lkey }, remoteAddr: mrB.addr + 100n, rkey: mrB.rkey }));
    const [w] = await a.cqQ.waitFor(1);
    t.match(w, { wrId: 11n, status: 0, opcode: IB_UVERBS_WC_RDMA_WRITE, qpNum: a.qp.qpNum }, 'WRITE completed in the mapped CQ');
    t.same(new Uint8Array(dst, 100, 4000), new Uint8Array(src, 0, 4000), 'every written byte arrived');
    t.same(new Uint8Array(dst, 0, 100), new Uint8Array(100), 'nothing before the target range');

    // SEND/RECV of 1500 bytes: the receive WQE goes into b's mapped RQ (no doorbell), the send rings slot 0.
    b.rqQ.postRecv(21n, { addr: mrB.addr + 5000n, length: 2000, lkey: mrB.lkey });
    page.ring(0, a.sqQ.postSend({ wrId: 12n, opcode: WrOpcode.SEND, flags: SendFlags.SIGNALED, sge: { addr: mrA.addr + 4000n, length: 1500, lkey: mrA.lkey } }));
    const [s] = await a.cqQ.waitFor(1);
    const [r] = await b.cqQ.waitFor(1);
    t.match(s, { wrId: 12n, status: 0, opcode: IB_UVERBS_WC_SEND });
    t.match(r, { wrId: 21n, status: 0, opcode: IB_UVERBS_WC_RECV, byteLen: 1500, qpNum: b.qp.qpNum });
    t.same(new Uint8Array(dst, 5000, 1500), new Uint8Array(src, 4000, 1500), 'every sent byte arrived');
    t.same(engine.counters(0), { executed: 2n, refused: 0n }, 'two doorbells, two executions');
    t.same(engine.counters(1), { executed: 0n, refused: 0n });

    // A garbage slot value: one idempotent system call, no work request, the QP unharmed.
    page.ring(0, 0xdeadbeef);
    await until(() => engine.counters(0).executed === 3n, 'the garbage doorbell');
    await new Promise((r) => setTimeout(r, 50));
    t.same(a.cqQ.poll(), [], 'a garbage doorbell completes nothing');
    t.equal((await v.queryQp(a.qp)).qpState, QpState.RTS, 'and leaves the QP in RTS');

    // Detached: stores are not executed; attached again, the value then is the one acted on; ring() executes.
    engine.detach(0);
    const p = a.sqQ.postSend({ wrId: 13n, opcode: WrOpcode.RDMA_WRITE, flags: SendFlags.SIGNALED, sge: { addr: mrA.addr, length: 64, lkey: mrA.lkey }, remoteAddr: mrB.addr, rkey: mrB.rkey });
    page.ring(0, p);
    await new Promise((r) => setTimeout(r, QUIET_MS));
    t.same(a.cqQ.poll(), [], 'no execution after detach');
    t.same(engine.counters(0), { executed: 3n, refused: 0n }, 'counters of the last attachment stay');
    t.throws(() => engine.ring(0), { name: 'VerbsError', errno: 'EINVAL' }, 'ring of a free slot');
    engine.attach(0, a.qp);
    await new Promise((r) => setTimeout(r, 50));
    t.same(engine.counters(0), { executed: 0n, refused: 0n }, 'the value at attach is not a doorbell');
    engine.ring(0);
    t.match(await a.cqQ.waitFor(1), [{ wrId: 13n, status: 0 }], 'ring() executed the pending WQE');
    t.same(engine.counters(0), { executed: 1n, refused: 0n });

    // Destroying an attached QP detaches it first (the fixture's release does; then the engine closes).
  });
});

t.test('notify mode: a store alone is not seen; the wake eventfd makes the thread scan; a QP in RESET refuses', async (t) => {
  await withRxe(t, async (f) => {
    const v = f.verbs;
    const a = await mappedEnd(f, 4);
    const engine = await v.createDoorbellEngine(f.device, { pages: 2, wake: 'notify' });
    f.defer(() => engine.close());
    t.equal(engine.size, 8192n);
    const page = new DoorbellPage(engine.fd, engine.size);
    f.defer(async () => page.unmap());
    const kick = eventfdCreate(0, { nonblock: true });
    f.defer(async () => close(kick));
    engine.setWakeFd(kick);
    engine.attach(1000, a.qp);
    page.ring(1000, 1);
    await new Promise((r) => setTimeout(r, QUIET_MS));
    t.same(engine.counters(1000), { executed: 0n, refused: 0n }, 'no kick, no scan');
    eventfdWrite(kick, 1n);
    // The QP is in RESET: the host refuses the doorbell (spec 13.6: the device rings again at RTS).
    await until(() => engine.counters(1000).refused === 1n, 'the refused doorbell');
    t.same(engine.counters(1000), { executed: 0n, refused: 1n });
    engine.setWakeFd(undefined);
    page.ring(1000, 2);
    eventfdWrite(kick, 1n);
    await new Promise((r) => setTimeout(r, QUIET_MS));
    t.same(engine.counters(1000), { executed: 0n, refused: 1n }, 'an engine without a wake fd sleeps');
    await engine.close();
    t.throws(() => engine.counters(1000), { name: 'VerbsError', errno: 'EBADF' }, 'a closed engine');
  });
});

t.test('an environment that ends with mapped objects and an engine left releases them all', async (t) => {
  const addon = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../native/build/Release/vrdma_native.node');
  // A worker with its own addon environment creates and keeps them; its end runs the addon's cleanup hook.
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const verbs = require(workerData.addon).verbs;
    (async () => {
      const dev = await verbs.openDevice('rxe0', () => {}, () => {});
      const pd = await verbs.allocPd(dev.context);
      const cq = await verbs.createMappedCq(dev.context, 8);
      const qp = await verbs.createMappedQp(pd, { qpType: 2, sendCq: cq.cq, recvCq: cq.cq, maxSendWr: 4, maxRecvWr: 4, maxSendSge: 1, maxRecvSge: 1 });
      const engine = verbs.createDoorbellEngine(dev.context, 1, false);
      verbs.doorbellAttach(engine.engine, 0, qp.qp);
      parentPort.postMessage('made');
    })().catch((e) => parentPort.postMessage(String(e)));`;
  const worker = new Worker(code, { eval: true, workerData: { addon } });
  const said = await new Promise<string>((resolve) => {
    worker.once('message', resolve);
    worker.once('error', (e) => resolve(`worker failed: ${String(e)}`));
    worker.once('exit', (code) => resolve(`worker exited with ${code}`));
  });
  t.equal(said, 'made', 'the worker made a mapped CQ, QP and an attached engine');
  t.match(rdmaResourcesOf(process.pid), { qp: 1, cq: 1, pd: 1 }, 'they exist');
  // Bounded: a cleanup hook that hangs must fail the test, not the run.
  const ended = await Promise.race([worker.terminate().then(() => 'ended'), new Promise((r) => setTimeout(() => r('hung'), 20_000))]);
  t.equal(ended, 'ended', 'the worker environment ended');
  t.same(rdmaResourcesOf(process.pid), { qp: 0, cq: 0, mr: 0, pd: 0 }, 'nothing left after the environment ended');
});
