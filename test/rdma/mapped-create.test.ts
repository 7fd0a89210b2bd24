// Host queue mapping (spec 13), creation: what the device offers and declares (13.2, section 5), FEATURES_OK with
// and without a transport that can map (13.16), the response bodies for every CQ and QP once negotiated (13.3), and
// every error of CREATE_CQ and CREATE_QP with MAP in the order 13.3 lists, each leaving nothing behind. Over the
// verbs test double (its queue buffers are memfds with an rxe-shaped header, which the recording mapper really maps).

import t, { type Test } from 'tap';
import {
  Command,
  CreateCqMappedResponse,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpMappedResponse,
  CreateQpResponse,
  DeviceConfig,
  DoorbellMode,
  FeatureBit,
  HostQueueFormat,
  RxeQueueHeader,
  ResourceKind,
  Status,
} from '../../vmm-device/abi/rdma/index.ts';
import { RdmaDevice, StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { ALL_FEATURES, TABLE, TestGuest } from './guest.ts';
import { F_VERSION_1 } from '../../vmm-device/abi/virtio.ts';
import { MAPPING, cqCmd, mappedCqRequest, createMappedCq, createMappedQp, decodeQpAnswer, mappedRig, qpCmd, type QpReq } from './mapped-rig.ts';

const INVALID_ARGUMENT = Status.INVALID_ARGUMENT;

async function open(t: Test, opts: { mode?: 'off' | 'polled' | 'notify'; format?: number } = {}): Promise<RdmaDevice> {
  const d = await RdmaDevice.open({
    verbs: new FakeVerbs({ hostQueueFormat: opts.format ?? HostQueueFormat.RXE }),
    hostDevice: 'fake0',
    vmId: 'vm-a',
    resolver: new StaticAddressResolver(TABLE),
    log: new RecordingLogger('device'),
    aliases: new FakeAliasMapper(),
    ...(opts.mode !== undefined ? { hostQueueMapping: opts.mode } : {}),
  });
  t.teardown(() => d.close());
  return d;
}

t.test('offer, configuration and region (spec 13.2, 13.13, section 5 offsets 118-120)', async (t) => {
  const off = await open(t);
  t.equal(off.deviceFeatures & MAPPING, 0n, 'the model default is off: not offered');
  t.equal(off.sharedMemoryRegions, undefined, 'no region declared');
  const cfgOff = DeviceConfig.decode(readAll(off));
  t.same([cfgOff.host_queue_format, cfgOff.doorbell_mode, cfgOff.max_mapped_queues], [0, 0, 0], 'the three fields are zero when not offered');
  const none = await open(t, { mode: 'polled', format: HostQueueFormat.NONE });
  t.equal(none.deviceFeatures & MAPPING, 0n, 'a host without a HostQueueFormat: not offered');
  const on = await open(t, { mode: 'polled' });
  t.equal(on.deviceFeatures & MAPPING, MAPPING, 'offered');
  t.equal(on.queueCount, 3, 'POLLED: no mapdoorbellq');
  const bytes = readAll(on);
  const cfg = DeviceConfig.decode(bytes);
  t.equal(bytes[118], HostQueueFormat.RXE, 'host_queue_format at 118');
  t.equal(bytes[119], DoorbellMode.POLLED, 'doorbell_mode at 119');
  t.equal(new DataView(bytes.buffer).getUint32(120, true), cfg.max_mapped_queues, 'max_mapped_queues at 120');
  t.equal(cfg.max_mapped_queues, 3072, 'the default bound');
  const region = on.sharedMemoryRegions!.get(0)!;
  t.equal(region % 4096n, 0n, 'a page multiple');
  const plan = on.mapping!.plan;
  t.equal(region, plan.doorbellBytes + BigInt(plan.maxMappedQueues) * plan.largestQueue, 'doorbell pages + max_mapped_queues queues of the largest depth');
  t.equal(plan.doorbellPages, Math.ceil(Math.min(cfg.max_qp, 1536) / 512), 'one doorbell page per 512 mapped QPs');
  const notify = await open(t, { mode: 'notify' });
  t.equal(notify.queueCount, 4, 'NOTIFY: mapdoorbellq is queue 2 + N');
  t.equal(readAll(notify)[119], DoorbellMode.NOTIFY);
});

function readAll(d: RdmaDevice): Uint8Array {
  const b = new Uint8Array(DeviceConfig.size);
  d.readConfig(0, b);
  return b;
}

t.test('FEATURES_OK with HOST_QUEUE_MAPPING only when the transport exposes the region (spec 13.16)', async (t) => {
  const d = await open(t, { mode: 'polled' });
  const size = d.sharedMemoryRegions!.get(0)!;
  const f = ALL_FEATURES | (1n << F_VERSION_1);
  t.ok(d.acceptFeatures(f, { hostPages: undefined }), 'without the bit the transport does not matter');
  t.notOk(d.acceptFeatures(f | MAPPING, { hostPages: undefined }), 'no host page mapper: refused');
  const caps = (m: Map<number, bigint>) => ({ hostPages: { queueNotifier: false, sharedMemory: m, missing: ['SHMEM_MAP: protocol feature not negotiated'] } });
  t.notOk(d.acceptFeatures(f | MAPPING, caps(new Map())), 'the region is not exposed: refused');
  t.notOk(d.acceptFeatures(f | MAPPING, caps(new Map([[0, size - 4096n]]))), 'a smaller region: refused');
  t.ok(d.acceptFeatures(f | MAPPING, caps(new Map([[0, size]]))), 'the region exposed: accepted');
  t.notOk(d.acceptFeatures((1n << F_VERSION_1) | MAPPING, caps(new Map([[0, size]]))), 'still neither RC nor UD: refused');
});

t.test('with HOST_QUEUE_MAPPING negotiated every CREATE_CQ and CREATE_QP answers the mapped bodies (spec 13.3)', async (t) => {
  const { g, mapper, verbs } = await mappedRig();
  t.teardown(() => mapper.dropAll());
  const pd = await g.createPd();
  const cq = await g.createCq(16); // relayed: the kit asks with the mapped size (guest.ts)
  const relayedQp = await g.createQp(pd, cq, cq);
  t.ok(relayedQp.handle > 0, 'a relayed QP next to the mapped mode');
  // Framing check 5 with the mapped size: a buffer for the version 1 body only is INVALID_LENGTH detail 1.
  const short = await g.cmd(Command.CREATE_CQ, mappedCqRequest(), [], CreateCqResponse.size);
  t.same([short.status, short.detail], [Status.INVALID_LENGTH, 1], 'a response buffer for the version 1 body is too short');
  t.equal(mapper.live.size, 0, 'and nothing was created');
  const mcq = await createMappedCq(g, { cqe_count: 32 });
  t.equal(mcq.mapped, 1);
  t.equal(mcq.cqe, 32, 'the depth in effect');
  t.equal(mcq.queue.offset % 4096n, 0n, 'offset: a page multiple');
  t.equal(mcq.queue.size % 4096n, 0n, 'size: a page multiple');
  t.ok(mcq.queue.num_slots >= 33 && (mcq.queue.num_slots & (mcq.queue.num_slots - 1)) === 0, 'num_slots: a power of two above the depth');
  t.equal(mcq.queue.slot_size, 128, 'CQ slot: 128 bytes (spec 13.4)');
  t.equal(mcq.queue.shmid, 0);
  t.equal(mcq.queue.format, HostQueueFormat.RXE);
  const header = RxeQueueHeader.decode(mapper.read(mcq.queue.offset, RxeQueueHeader.size));
  t.equal(header.index_mask, mcq.queue.num_slots - 1, 'the mapped header agrees: index_mask');
  t.equal(2 ** header.log2_elem_size, mcq.queue.slot_size, 'the mapped header agrees: element size');
  const qp = await createMappedQp(g, { pd_handle: pd, send_cq_handle: mcq.handle, recv_cq_handle: mcq.handle, max_send_wr: 64, max_recv_wr: 8 });
  t.equal(qp.mapped, 1);
  t.ok(qp.qpn > 0, 'qp_num is the host wire QPN');
  t.equal(qp.sq.slot_size, 256, 'SQ slot with one SGE: 256 bytes');
  t.equal(qp.rq.slot_size, 64, 'RQ slot with one SGE: 64 bytes');
  t.ok(qp.sq.num_slots >= 65 && qp.rq.num_slots >= 9);
  t.equal(qp.doorbellOffset % 8n, 0n, 'doorbell_offset: a multiple of 8');
  t.ok(qp.doorbellOffset < g.device.mapping!.plan.doorbellBytes, 'inside the doorbell pages');
  const ranges = [mcq.queue, qp.sq, qp.rq].map((q) => [q.offset, q.offset + q.size] as const).sort((x, y) => (x[0] < y[0] ? -1 : 1));
  for (let i = 1; i < ranges.length; i++) t.ok(ranges[i]![0] >= ranges[i - 1]![1], 'ranges never overlap');
  t.ok(ranges[0]![0] >= g.device.mapping!.plan.doorbellBytes, 'queues lie after the doorbell pages');
  for (const q of [qp.sq, qp.rq]) {
    const h = RxeQueueHeader.decode(mapper.read(q.offset, RxeQueueHeader.size));
    t.equal(h.index_mask, q.num_slots - 1);
  }
  t.equal(mapper.live.size, 4, 'the CQ, the SQ, the RQ and the doorbell pages are mapped');
  t.same(verbs.calls.filter((c) => c === 'create_mapped_qp' || c === 'doorbell_engine'), ['create_mapped_qp', 'doorbell_engine'], 'the engine starts with the first mapped QP');
  // A relayed CQ's body: mapped 0 and every mapping field 0.
  const ring = g.allocPages(1);
  const index = g.allocPages(1);
  const body = CreateCqRequest.encode({ cqe_count: 16, page_shift: 12, num_pages: 1, index_gpa: BigInt(index), map_flags: 0 });
  const rcq = await g.cmd(Command.CREATE_CQ, body, [BigInt(ring)]);
  t.equal(rcq.status, Status.OK);
  t.equal(rcq.body.length, CreateCqMappedResponse.size, 'CreateCqMappedResponse for a relayed CQ');
  t.ok(rcq.body.subarray(CreateCqResponse.size).every((b) => b === 0), 'relayed: the mapping part is zero');
});

t.test('CREATE_CQ with MAP: every error in the order of spec 13.3, nothing left after each', async (t) => {
  const { g, mapper, verbs } = await mappedRig({ maxMappedQueues: 2, quotas: { maxCq: 3 } });
  t.teardown(() => mapper.dropAll());
  const expect = async (v: Parameters<typeof cqCmd>[1], status: number, detail: number, what: string) => {
    const a = await cqCmd(g, v);
    t.same([a.status, a.detail], [status, detail], what);
  };
  // All wrong at once, then each fixed in turn: each answer names the next check.
  const bad = { cqe_count: 3, map_flags: 0x3, num_pages: 1, index_gpa: 8n };
  await expect(bad, INVALID_ARGUMENT, 0, 'cqe_count first');
  await expect({ ...bad, cqe_count: 16 }, INVALID_ARGUMENT, 12, 'then map_flags with bits other than MAP');
  await expect({ ...bad, cqe_count: 16, map_flags: 1 }, INVALID_ARGUMENT, 8, 'then num_pages not 0');
  await expect({ ...bad, cqe_count: 16, map_flags: 1, num_pages: 0 }, INVALID_ARGUMENT, 16, 'then index_gpa not 0');
  await expect({ cqe_count: g.config.max_cqe * 2 }, INVALID_ARGUMENT, 0, 'cqe_count above max_cqe');
  verbs.failNext('create_mapped_cq', 'ENOMEM');
  await expect({}, Status.NO_RESOURCES, ResourceKind.HOST, 'the host refuses: NO_RESOURCES HOST');
  mapper.refuseMapAfter = [0];
  await expect({}, Status.DEVICE_ERROR, 0, 'the transport refuses the mapping: DEVICE_ERROR 0');
  t.equal(verbs.liveObjects().cq, 0, 'no host CQ left');
  t.equal(mapper.live.size, 0, 'no mapping left');
  t.same(g.device.mapping!.usage, { queues: 0, ranges: 0, slots: 0 }, 'no range held');
  t.equal(g.device.counters.mapFailures, 1, 'counted');
  await createMappedCq(g);
  await createMappedCq(g);
  await expect({}, Status.NO_RESOURCES, ResourceKind.MAPPING, 'max_mapped_queues reached: NO_RESOURCES MAPPING');
  await g.createCq(16); // a relayed CQ still fits: the device stays usable
  await expect({}, Status.NO_RESOURCES, ResourceKind.CQ, 'the CQ limit comes before the mapping bound');
});

t.test('CREATE_QP with MAP: every error in the order of spec 13.3, nothing left after each', async (t) => {
  const { g, mapper, verbs } = await mappedRig({ maxMappedQueues: 4 });
  t.teardown(() => mapper.dropAll());
  const pd = await g.createPd();
  const mcq = await createMappedCq(g);
  const errCq = await createMappedCq(g);
  const rcq = await g.createCq(16);
  // The host's CQ error puts errCq in error (spec 13.7).
  verbs.raiseAsyncEvent(g.device.hostDevice, { type: 'CQ_ERR', typeNumber: 0, cq: g.device.cqs.get(errCq.handle)!.host });
  const expect = async (v: Partial<QpReq>, status: number, detail: number, what: string) => {
    const a = await qpCmd(g, v);
    t.same([a.status, a.detail], [status, detail], what);
  };
  const ok: Partial<QpReq> = { pd_handle: pd, send_cq_handle: mcq.handle, recv_cq_handle: mcq.handle };
  const steps: [Partial<QpReq>, number, number, string][] = [
    [{ qp_type: 3, map_flags: 0x3 }, INVALID_ARGUMENT, 12, 'qp_type'],
    [{ map_flags: 0x3 }, INVALID_ARGUMENT, 44, 'map_flags with bits other than MAP'],
    [{ qp_type: 4 }, INVALID_ARGUMENT, 44, 'MAP with a UD QP (spec 13.8)'],
    [{ pd_handle: 999 }, Status.INVALID_HANDLE, 0, 'no such PD'],
    [{ send_cq_handle: 999 }, Status.INVALID_HANDLE, 4, 'no such send CQ'],
    [{ recv_cq_handle: 999 }, Status.INVALID_HANDLE, 8, 'no such receive CQ'],
    [{ send_cq_handle: errCq.handle }, Status.WRONG_STATE, 4, 'send CQ in error'],
    [{ recv_cq_handle: errCq.handle }, Status.WRONG_STATE, 8, 'receive CQ in error'],
    [{ send_cq_handle: rcq.handle }, INVALID_ARGUMENT, 4, 'a send CQ that is not mapped'],
    [{ recv_cq_handle: rcq.handle }, INVALID_ARGUMENT, 8, 'a receive CQ that is not mapped'],
    [{ sq_sig_all: 2 }, INVALID_ARGUMENT, 13, 'sq_sig_all'],
    [{ max_send_wr: 3 }, INVALID_ARGUMENT, 16, 'max_send_wr'],
    [{ max_recv_wr: 0 }, INVALID_ARGUMENT, 20, 'max_recv_wr'],
    [{ max_send_sge: 99 }, INVALID_ARGUMENT, 24, 'max_send_sge'],
    [{ max_recv_sge: 99 }, INVALID_ARGUMENT, 28, 'max_recv_sge'],
    [{ max_inline_data: 99 }, INVALID_ARGUMENT, 32, 'max_inline_data'],
    [{ sq_num_pages: 1 }, INVALID_ARGUMENT, 36, 'sq_num_pages not 0'],
    [{ rq_num_pages: 1 }, INVALID_ARGUMENT, 40, 'rq_num_pages not 0'],
    [{ sq_index_gpa: 0x10_0000n }, INVALID_ARGUMENT, 48, 'sq_index_gpa not 0'],
    [{ rq_index_gpa: 0x10_0000n }, INVALID_ARGUMENT, 56, 'rq_index_gpa not 0'],
  ];
  // Every wrong field at once (qp_type 3 covers the UD case later), then each one fixed in turn.
  const wrong: Partial<QpReq> = Object.assign({}, ...steps.slice(1).map(([v]) => v), { qp_type: 3, map_flags: 0x3 });
  for (let i = 0; i < steps.length; i++) {
    const [, status, detail, what] = steps[i]!;
    const later = Object.assign({}, ok, ...steps.slice(i + 1).map(([v]) => v));
    // The request carries this step's fault and every later one; earlier ones are fixed.
    const req = { ...later, ...steps[i]![0] };
    if (i === 0) Object.assign(req, wrong);
    await expect(req, status, detail, what);
  }
  verbs.failNext('create_mapped_qp', 'ENOMEM');
  await expect(ok, Status.NO_RESOURCES, ResourceKind.HOST, 'the host refuses the QP: NO_RESOURCES HOST');
  verbs.failNext('doorbell_engine', 'ENOMEM');
  await expect(ok, Status.NO_RESOURCES, ResourceKind.HOST, 'the host refuses the doorbell engine: NO_RESOURCES HOST');
  mapper.refuseMapAfter = [0];
  await expect(ok, Status.DEVICE_ERROR, 0, 'the transport refuses the doorbell pages: DEVICE_ERROR');
  mapper.refuseMapAfter = [1];
  await expect(ok, Status.DEVICE_ERROR, 0, 'the transport refuses the SQ: DEVICE_ERROR');
  mapper.refuseMapAfter = [1];
  await expect(ok, Status.DEVICE_ERROR, 0, 'the transport refuses the RQ (the SQ was mapped): DEVICE_ERROR');
  t.equal(verbs.liveObjects().qp, 0, 'no host QP left');
  t.equal(mapper.live.size, 3, 'only the two CQs and the doorbell pages stay mapped: the SQ of the last refusal was unmapped');
  t.same(g.device.mapping!.usage, { queues: 2, ranges: 2, slots: 0 }, 'nothing of the refused QPs held');
  const q = await createMappedQp(g, ok);
  t.equal(q.mapped, 1, 'then a QP is created');
  await expect(ok, Status.NO_RESOURCES, ResourceKind.MAPPING, 'fewer than 2 mapped queues left: NO_RESOURCES MAPPING');
  // A relayed QP whose CQ is mapped (spec 13.3, last paragraph).
  const relayed = await g.cmd(Command.CREATE_QP, ...(await relayedQpRequest(g, pd, mcq.handle, rcq.handle)));
  t.same([relayed.status, relayed.detail], [INVALID_ARGUMENT, 4], 'relayed QP with a mapped send CQ');
  const relayed2 = await g.cmd(Command.CREATE_QP, ...(await relayedQpRequest(g, pd, rcq.handle, mcq.handle)));
  t.same([relayed2.status, relayed2.detail], [INVALID_ARGUMENT, 8], 'relayed QP with a mapped receive CQ');
  const bodyOk = await g.cmd(Command.CREATE_QP, ...(await relayedQpRequest(g, pd, rcq.handle, rcq.handle)));
  t.equal(bodyOk.status, Status.OK, 'a relayed QP beside the mapped one');
  const d = decodeQpAnswer(bodyOk);
  t.equal(d.mapped, 0);
  t.ok(bodyOk.body.subarray(CreateQpResponse.size).every((b) => b === 0), 'relayed: every mapping field is 0');
  t.equal(bodyOk.body.length, CreateQpMappedResponse.size);
});

/** A relayed CREATE_QP (rings in guest pages) with the given CQs; the kit's helper cannot name them freely. */
async function relayedQpRequest(g: TestGuest, pd: number, send: number, recv: number): Promise<[Uint8Array, bigint[]]> {
  const { CreateQpRequest, Limits, ringPages } = await import('../../vmm-device/abi/rdma/index.ts');
  const sqPages = ringPages(16, Limits.SQ_WQE_SIZE, 12);
  const rqPages = ringPages(16, Limits.RQ_WQE_SIZE, 12);
  const sq = g.allocPages(sqPages);
  const rq = g.allocPages(rqPages);
  const idx = g.allocPages(1);
  const body = CreateQpRequest.encode({
    pd_handle: pd,
    send_cq_handle: send,
    recv_cq_handle: recv,
    qp_type: 2,
    sq_sig_all: 0,
    sq_page_shift: 12,
    rq_page_shift: 12,
    max_send_wr: 16,
    max_recv_wr: 16,
    max_send_sge: 1,
    max_recv_sge: 1,
    max_inline_data: 0,
    sq_num_pages: sqPages,
    rq_num_pages: rqPages,
    sq_index_gpa: BigInt(idx),
    rq_index_gpa: BigInt(idx + 64),
  });
  const pages = [...Array.from({ length: sqPages }, (_, i) => BigInt(sq + i * 4096)), ...Array.from({ length: rqPages }, (_, i) => BigInt(rq + i * 4096))];
  return [body, pages];
}

t.test('without HOST_QUEUE_MAPPING negotiated map_flags is reserved and ignored, bodies are version 1', async (t) => {
  const { g, mapper } = await mappedRig({ features: ALL_FEATURES });
  t.teardown(() => mapper.dropAll());
  t.equal(g.device.hasFeature(FeatureBit.HOST_QUEUE_MAPPING), false);
  const a = await cqCmd(g, { map_flags: 0xff });
  t.same([a.status, a.detail], [INVALID_ARGUMENT, 4], 'MAP ignored: the relayed checks apply (page_shift 0 is refused)');
  const cq = await g.createCq(16);
  t.ok(cq.handle > 0);
  t.equal(mapper.live.size, 0, 'nothing mapped');
});


t.test('through the virtio core: FEATURES_OK with HOST_QUEUE_MAPPING kept only over a transport that maps the region', async (t) => {
  const { VirtioDeviceCore } = await import('../../vmm-device/virtio/core.ts');
  const { STATUS_ACKNOWLEDGE: ACK, STATUS_DRIVER: DRV, STATUS_FEATURES_OK: FOK } = await import('../../vmm-device/abi/virtio.ts');
  const { RecordingMapper } = await import('./mapped-rig.ts');
  const d = await open(t, { mode: 'polled' });
  const negotiate = (core: InstanceType<typeof VirtioDeviceCore>, features: bigint): number => {
    core.setStatus(0);
    core.setStatus(ACK);
    core.setStatus(ACK | DRV);
    core.setDriverFeatures(features);
    core.setStatus(ACK | DRV | FOK);
    return core.deviceStatus & FOK;
  };
  const f = ALL_FEATURES | MAPPING;
  const bare = new VirtioDeviceCore(d, { interrupt: () => undefined, configInterrupt: () => undefined }, new RecordingLogger('core'));
  t.equal(negotiate(bare, f), 0, 'a transport without a mapper: refused');
  t.equal(negotiate(bare, ALL_FEATURES), FOK, 'without the bit: accepted');
  const mapper = new RecordingMapper([], d.sharedMemoryRegions!.get(0)!);
  const mapping = new VirtioDeviceCore(d, { interrupt: () => undefined, configInterrupt: () => undefined, hostPages: mapper }, new RecordingLogger('core'));
  t.equal(negotiate(mapping, f), FOK, 'a transport exposing the region: accepted');
});
