// The mapped data path's guest side without RDMA hardware: the reference driver <-> reference vhost-user front-end
// (which mmaps what the back-end SHMEM_MAPs) <-> vhost-user server <-> virtio-rdma device with host queue mapping
// <-> FakeVerbs (its memfd rxe-shaped queues and doorbell engine double). FakeVerbs moves no data, so this file
// checks what the guest does and sees: negotiation, the mapped CREATE_CQ/CREATE_QP answers and their headers, WQEs
// landing in the host's own queue memory, the doorbell slot reaching the device's engine, relayed and mapped
// objects side by side, the driver's refusals, and that a destroyed queue's range no longer reaches host memory.
// Bytes on the wire: test/driver/rxe-mapped.test.ts on rxe0.
import t from 'tap';
import { DoorbellMode, FeatureBit, HostQueueFormat } from '../../vmm-device/abi/rdma/index.ts';
import { MappedCq, RdmaContext, UsageError } from '../../guest-driver-spec/driver/index.ts';
import { RxeHeader, encodeRxeRecvWqe, encodeRxeSendWqe } from '../../guest-driver-spec/driver/mapped/rxe-abi.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { driverRig } from './harness.ts';

const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
];

async function setUp(t: { teardown(fn: () => Promise<void>): void }, mode: 'off' | 'polled' | 'notify' = 'polled') {
  const verbs = new FakeVerbs();
  const device = await RdmaDevice.open({
    verbs,
    hostDevice: 'fake0',
    vmId: 'vm-a',
    resolver: new StaticAddressResolver(TABLE),
    log: new RecordingLogger('device'),
    aliases: new FakeAliasMapper(),
    hostQueueMapping: mode,
  });
  const rig = await driverRig(device, device.queueCount);
  const ctx = await RdmaContext.open(rig.transport);
  let closed = false;
  const close = async () => {
    closed = true;
    await ctx.close();
    const left = await rig.finish();
    await device.close();
    return left;
  };
  t.teardown(async () => {
    if (!closed) await close();
  });
  return { verbs, device, rig, ctx, close };
}

/** The device's per-QP counters of QP `handle`: doorbells its engine executed, work requests its relay handled. */
function executed(s: { device: RdmaDevice }, handle: number): { doorbells: bigint; relayed: number } {
  const c = s.device.qpCounters().find((x) => x.handle === handle);
  return { doorbells: c?.doorbellsExecuted ?? -1n, relayed: c?.relayedWorkRequests ?? -1 };
}

t.test('negotiation: RXE format and POLLED doorbells; off: the feature is not accepted and the driver relays', async (t) => {
  const s = await setUp(t);
  t.equal(s.ctx.driver.mapping?.format, HostQueueFormat.RXE);
  t.equal(s.ctx.driver.mapping?.doorbellMode, DoorbellMode.POLLED);
  t.ok(s.ctx.driver.has(FeatureBit.HOST_QUEUE_MAPPING));
  t.same(await s.close(), { watchers: 0, mappings: 0 });
  const off = await setUp(t, 'off');
  t.equal(off.ctx.driver.mapping, undefined);
  await t.rejects(off.ctx.createCq(8, { map: true }), UsageError, 'no mapped CQ without the feature');
  t.same(await off.close(), { watchers: 0, mappings: 0 });
});

t.test('mapped and relayed objects side by side; WQEs land in the host queue and the doorbell reaches the engine', async (t) => {
  const s = await setUp(t);
  const { ctx, verbs } = s;
  const pd = await ctx.allocPd();
  const mcq = await ctx.createCq(16, { map: true });
  const rcq = await ctx.createCq(16);
  t.ok(mcq instanceof MappedCq, 'a mapped CQ');
  t.equal(rcq.mode, 'relay', 'a relayed CQ in the same device (its response in the mapped layout, decoded)');
  t.equal(mcq.queue.numSlots >= 17, true, 'at least depth + 1 slots');
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: mcq, recvCq: mcq, maxSendWr: 8, maxRecvWr: 8, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
  const ud = await ctx.createQp(pd, { type: 'UD', sendCq: rcq, recvCq: rcq });
  t.equal(qp.mode, 'mapped');
  t.equal(ud.mode, 'relay');
  await t.rejects(ctx.createQp(pd, { type: 'UD', sendCq: mcq, recvCq: mcq }), UsageError, 'a UD QP on mapped CQs is refused by the driver');

  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x100 }); // doorbells are executed from RTS on (13.6)
  const before = executed(s, qp.handle); // reaching RTS executes the doorbell once (a store may have come before)
  // The window's bytes are the host queue's memory: the fake's memfd, mapped by the front-end.
  const wr = { wrId: 7n, opcode: 'SEND', signaled: true, sgList: [{ addr: 0x7f00_0000_0000n, length: 64, lkey: 0x100 }] } as const;
  await qp.postSend([wr]);
  const sq = qp.sq;
  const slot = await sq.window.read(sq.slotOffset(0), 224);
  t.same(slot, encodeRxeSendWqe(wr, 0, { slotSize: sq.slotSize, maxSge: 1, maxInline: 0 }), 'slot 0 of the host SQ holds the rxe WQE');
  t.equal(await sq.window.readU32(sq.base + BigInt(RxeHeader.PRODUCER_INDEX)), 1, 'producer_index 1 in the host header');
  t.equal(await qp.doorbell.window.readU32(qp.doorbell.offset), 1, 'the doorbell slot holds it');
  const engine = verbs.engines.at(-1)!;
  t.ok(engine.scan() >= 1, "the engine's pass executes the changed slot");
  t.same(executed(s, qp.handle), { doorbells: before.doorbells + 1n, relayed: 0 }, 'one more doorbell executed, no work request relayed');

  const rwr = { wrId: 8n, sgList: [{ addr: 0x7f00_0000_1000n, length: 32, lkey: 0x100 }] };
  await qp.postRecv([rwr]);
  t.same(await qp.rq.window.read(qp.rq.slotOffset(0), 56), encodeRxeRecvWqe(rwr, { slotSize: qp.rq.slotSize, maxSge: 1 }), 'RQ slot 0');
  t.same(await mcq.poll(), [], 'the host wrote no completion (FakeVerbs moves no data)');
  await mcq.reqNotify(); // ARM_CQ on a mapped CQ

  const sqRange = { window: sq.window, base: sq.base };
  await qp.destroy();
  await ud.destroy();
  t.same(await sqRange.window.read(sqRange.base, 16), new Uint8Array(16), "after DESTROY_QP the range reads as zero: the host's pages are unmapped");
  await t.rejects(qp.postSend([wr]), UsageError, 'the driver refuses to touch a destroyed QP');
  await mcq.destroy();
  await rcq.destroy();
  await pd.dealloc();
  t.same(await s.close(), { watchers: 0, mappings: 0 }, 'no mapping or watcher left in this process');
});

t.test('a reset while mapped: the device unmaps everything, the front-end holds no mapping', async (t) => {
  const s = await setUp(t);
  const pd = await s.ctx.allocPd();
  const mcq = await s.ctx.createCq(8, { map: true });
  await s.ctx.createQp(pd, { type: 'RC', sendCq: mcq, recvCq: mcq, maxSendWr: 4, maxRecvWr: 4, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
  const window = mcq.queue.window;
  await s.ctx.driver.close(); // device reset
  await s.device.settled();
  t.same(await window.read(mcq.queue.base, 8), new Uint8Array(8), 'the CQ range reads as zero after the reset');
  t.same([s.device.qps.size, s.device.cqs.size], [0, 0], 'the device forgot every object');
  t.same(await s.close(), { watchers: 0, mappings: 0 });
});

t.test('NOTIFY mode: mapdoorbellq is set up before DRIVER_OK and notified after the doorbell store', async (t) => {
  const s = await setUp(t, 'notify');
  t.equal(s.ctx.driver.mapping?.doorbellMode, DoorbellMode.NOTIFY);
  t.equal(s.ctx.driver.mapping?.notifyQueue, 3, 'virtqueue 2 + N, N = 1');
  const pd = await s.ctx.allocPd();
  const mcq = await s.ctx.createCq(8, { map: true });
  const qp = await s.ctx.createQp(pd, { type: 'RC', sendCq: mcq, recvCq: mcq, maxSendWr: 4, maxRecvWr: 4, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x100 });
  const before = executed(s, qp.handle);
  await qp.postSend([{ wrId: 1n, opcode: 'SEND', sgList: [{ addr: 0x1000n, length: 8, lkey: 1 }] }]);
  t.equal(qp.doorbells, 1, 'one doorbell: the slot store and the notification');
  t.equal(await qp.doorbell.window.readU32(qp.doorbell.offset), 1);
  s.verbs.engines.at(-1)!.scan();
  t.same(executed(s, qp.handle), { doorbells: before.doorbells + 1n, relayed: 0 }, 'the engine executed the changed slot once');
  await qp.destroy();
  await mcq.destroy();
  await pd.dealloc();
  t.same(await s.close(), { watchers: 0, mappings: 0 });
});
