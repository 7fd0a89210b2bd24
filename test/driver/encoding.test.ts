// The driver's bytes against the spec: every example of appendix A that a driver produces or parses, the framing of
// control requests (readable part exactly 16 + length, response buffers sized for the command), MODIFY_QP masks per
// transition, page lists and MR continuation, doorbell records, CQ polling and event buffers. The device is the
// scripted device behind the real vhost-user server (see scripted-device.ts), so everything crosses real rings in
// memfd guest RAM.
import t from 'tap';
import {
  Command,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpRequest,
  CreateQpResponse,
  CtrlRequestHeader,
  DoorbellRecord,
  DoorbellType,
  Event,
  EventType,
  HandleResponse,
  Limits,
  ModifyQpRequest,
  QpAttr,
  QpState,
  QpType,
  REQUIRED_QP_ATTRS,
  RegMrContinueRequest,
  RegMrRequest,
  RegMrResponse,
  SendWqe,
  Status,
  encodeResponse,
  transitionKey,
  decodePageList,
  Cqe,
  WcOpcode,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { CommandError, ProtocolError, RdmaContext, encodeModifyQp, encodeSendWqe, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { F_EVENT_IDX, F_VERSION_1 } from '../../vmm-device/abi/virtio.ts';
import { readSpec } from '../spec/markdown-tables.ts';
import { driverRig } from './harness.ts';
import { SCRIPTED_FEATURES, ScriptedDevice } from './scripted-device.ts';

function examples(): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  for (const m of readSpec().matchAll(/<!-- example: ([\w-]+) -->\n```text\n([\s\S]*?)\n```/g)) {
    out.set(m[1]!, Uint8Array.from(m[2]!.trim().split(/\s+/).map((h) => parseInt(h, 16))));
  }
  return out;
}
const EX = examples();
const ex = (name: string): Uint8Array => {
  const v = EX.get(name);
  if (v === undefined) throw new Error(`appendix A has no example ${name}`);
  return v;
};

const ok = (tag: bigint, body: Uint8Array = new Uint8Array(0)): Uint8Array => encodeResponse(Status.OK, 0, tag, body);
const tagOf = (readable: Uint8Array): bigint => CtrlRequestHeader.decode(readable).tag;

async function opened(device = new ScriptedDevice()) {
  const rig = await driverRig(device);
  const ctx = await RdmaContext.open(rig.transport);
  return { rig, ctx, device };
}

/** Scripts the answers of CREATE_CQ (handle `cq`) and CREATE_QP (handle `qp`, wire QPN `qpn`) and creates both. */
async function cqAndQp(ctx: RdmaContext, device: ScriptedDevice, firstTag: bigint, cq = 1, qp = 1, qpn = 0x11) {
  device.answers.push(ok(firstTag, HandleResponse.encode({ handle: 1 })));
  const pd = await ctx.allocPd();
  device.answers.push(ok(firstTag + 1n, CreateCqResponse.encode({ cq_handle: cq, cqe_count: 16 })));
  const c = await ctx.createCq(16);
  device.answers.push(
    ok(
      firstTag + 2n,
      CreateQpResponse.encode({ qp_handle: qp, qp_num: qpn, max_send_wr: 8, max_recv_wr: 8, max_send_sge: 4, max_recv_sge: 3, max_inline_data: 64 }),
    ),
  );
  const q = await ctx.createQp(pd, { type: 'RC', sendCq: c, recvCq: c, maxSendWr: 8, maxRecvWr: 8 });
  return { pd, cq: c, qp: q };
}

t.test('initialization: features, configuration, queues, event buffers (section 6)', async (t) => {
  const { rig, ctx, device } = await opened();
  t.equal(ctx.driver.features, SCRIPTED_FEATURES | (1n << F_VERSION_1) | (1n << F_EVENT_IDX), 'accepts VERSION_1, EVENT_IDX and every v1 feature offered');
  t.ok(ctx.driver.controlq.eventIdx && ctx.driver.eventq.eventIdx && ctx.driver.doorbellq.eventIdx, 'every queue is driven with EVENT_IDX');
  t.same(ctx.config.gid, device.config.subarray(96, 112), 'gid from the configuration');
  t.equal(ctx.config.max_pages_per_command, 16);
  t.equal(device.activations, 1, 'DRIVER_OK reached the device');
  t.equal(await rig.transport.getStatus(), 0xf, 'ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK');
  await new Promise((r) => setTimeout(r, 50));
  t.equal(device.eventBuffers, ctx.driver.eventq.size, 'every event queue entry holds a posted 32-byte buffer');
  await ctx.close();
  t.equal(device.resets, 1, 'close() resets the device');
  t.equal(ctx.driver.memory.allocator.liveCount, 0, 'every guest allocation of the driver was given back');
  t.same(await rig.finish(), { watchers: 0, mappings: 0 });
});

t.test('a device without RC and UD is failed (section 4.1)', async (t) => {
  const device = new ScriptedDevice();
  device.deviceFeatures = 1n << 2n;
  const rig = await driverRig(device);
  await t.rejects(RdmaContext.open(rig.transport), /neither RC nor UD/);
  t.equal(device.activations, 0, 'never activated');
  await rig.finish();
});

t.test('CREATE_PD: request and response are the bytes of appendix A', async (t) => {
  const { rig, ctx, device } = await opened();
  device.answers.push(ex('create-pd-response'));
  const pd = await ctx.allocPd();
  t.equal(pd.handle, 1);
  const req = device.requests[0]!;
  t.same(req.readable, ex('create-pd-request'), 'readable part = appendix A create-pd-request');
  t.equal(req.writableBytes, 16 + 8, 'writable part: response header + HandleResponse');
  t.same(
    req.segments.map((s) => [s.len, s.write]),
    [
      [16, false],
      [16, true],
      [8, true],
    ],
  );
  await ctx.close();
  await rig.finish();
});

t.test('REG_MR: request bytes of appendix A, page list as its own descriptor', async (t) => {
  const { rig, ctx, device } = await opened();
  device.answers.push(ex('create-pd-response'));
  const pd = await ctx.allocPd();
  device.answers.push(ok(2n, RegMrResponse.encode({ mr_handle: 1, lkey: 0x5678, rkey: 0x1234, pages_received: 2 })));
  const mr = await ctx.regMr(pd, { iova: 0x7f0000001800n, length: 0x1000n, pageShift: 12, pages: [0x12345000n, 0x0abcd000n] }, 7);
  t.same(device.requests[1]!.readable, ex('reg-mr-request'), 'readable part = appendix A reg-mr-request');
  t.same(
    device.requests[1]!.segments.filter((s) => !s.write).map((s) => s.len),
    [16 + RegMrRequest.size, 16],
    'header and fixed body, then the two page entries',
  );
  t.match(mr, { handle: 1, lkey: 0x5678, rkey: 0x1234 });
  t.same(mr.sge(0x10, 64), { addr: 0x7f0000001810n, length: 64, lkey: 0x5678 });
  await ctx.close();
  await rig.finish();
});

t.test('MODIFY_QP refused: DESTINATION_UNREACHABLE with the dgid offset (appendix A)', async (t) => {
  const { rig, ctx, device } = await opened();
  device.answers.push(ok(1n), ok(2n));
  await ctx.driver.command(Command.CREATE_PD, new Uint8Array(0), [], HandleResponse).catch(() => undefined);
  await ctx.driver.command(Command.QUERY_DEVICE, new Uint8Array(0), [], HandleResponse).catch(() => undefined);
  device.answers.push(ex('modify-qp-refused-response'));
  const body = encodeModifyQp(1, { state: 'RTR', av: { dgid: new Uint8Array(16).fill(9) }, pathMtu: 3, destQpn: 0x22, rqPsn: 0, maxDestRdAtomic: 1, minRnrTimer: 12 });
  const err = await ctx.driver.command(Command.MODIFY_QP, body, [], HandleResponse).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(err instanceof CommandError, 'a CommandError');
  t.match(err, { statusName: 'DESTINATION_UNREACHABLE', detail: 56, commandName: 'MODIFY_QP' });
  t.equal(ModifyQpRequest.offsetOf('attr') + QpAttr.offsetOf('dgid'), 56, 'detail 56 is the dgid of the request body');
  await ctx.close();
  await rig.finish();
});

t.test('responses that break section 7.1 are protocol errors, never taken as answers', async (t) => {
  const { rig, ctx, device } = await opened();
  // Error status with a body: used length must be 16.
  const withBody = new Uint8Array(24);
  withBody.set(encodeResponse(Status.NO_RESOURCES, 1, 1n));
  device.answers.push(withBody);
  await t.rejects(ctx.allocPd(), ProtocolError, 'error status with used length 24');
  device.answers.push(ok(99n, HandleResponse.encode({ handle: 1 })));
  await t.rejects(ctx.allocPd(), /tag 99/, 'a foreign tag');
  device.answers.push(ok(3n));
  await t.rejects(ctx.allocPd(), /used length 16, expected 24/, 'OK without the body');
  device.answers.push(encodeResponse(Status.NO_RESOURCES, 1, 4n));
  await t.rejects(ctx.allocPd(), { name: 'CommandError', statusName: 'NO_RESOURCES', detail: 1 }, 'a proper error status');
  t.equal(ctx.driver.counters.protocolErrors, 3);
  t.equal(ctx.driver.counters.commandErrors, 1);
  await ctx.close();
  await rig.finish();
});

t.test('CREATE_CQ and CREATE_QP: fixed bodies, page lists of the rings, zeroed index blocks', async (t) => {
  const { rig, ctx, device } = await opened();
  const { cq, qp } = await cqAndQp(ctx, device, 1n);
  const cqReq = device.requests[1]!.readable;
  const cqBody = CreateCqRequest.decode(cqReq, 16);
  t.match(cqBody, { cqe_count: 16, page_shift: 12, num_pages: 1 });
  t.equal(CtrlRequestHeader.decode(cqReq).length, CreateCqRequest.size + 8);
  t.same(decodePageList(cqReq, 16 + CreateCqRequest.size, 1), cq.ring.pages);
  t.equal(cqBody.index_gpa % 8n, 0n, 'index block 8-byte aligned');
  t.same(ctx.driver.memory.read(Number(cqBody.index_gpa), 8), new Uint8Array(8), 'index block zeroed before CREATE_CQ');

  const qpReq = device.requests[2]!.readable;
  const q = CreateQpRequest.decode(qpReq, 16);
  t.match(q, { pd_handle: 1, send_cq_handle: 1, recv_cq_handle: 1, qp_type: QpType.RC, max_send_wr: 8, max_recv_wr: 8, sq_num_pages: 1, rq_num_pages: 1 });
  t.same(decodePageList(qpReq, 16 + CreateQpRequest.size, 2), [...qp.sq.ring.pages, ...qp.rq.ring.pages], 'SQ pages then RQ pages');
  t.equal(qp.qpNum, 0x11);
  await ctx.close();
  await rig.finish();
});

t.test('connect(): each MODIFY_QP carries exactly the required attributes of its RC transition', async (t) => {
  const { rig, ctx, device } = await opened();
  const { qp } = await cqAndQp(ctx, device, 1n);
  device.answers.push(ok(4n), ok(5n), ok(6n));
  const peerGid = new Uint8Array(16);
  peerGid.set([0xff, 0xff, 10, 0, 0, 2], 10);
  await qp.connect({ gid: peerGid, qpn: 0x22 });
  const mods = device.requests.slice(3).map((r) => ModifyQpRequest.decode(r.readable, 16));
  const steps = [
    [QpState.RESET, QpState.INIT],
    [QpState.INIT, QpState.RTR],
    [QpState.RTR, QpState.RTS],
  ] as const;
  steps.forEach(([from, to], i) => {
    const required = REQUIRED_QP_ATTRS[transitionKey(QpType.RC, from, to)]!;
    t.equal(mods[i]!.attr_mask, required, `${from}->${to}: the required attributes, no other`);
    t.equal(QpAttr.decode(mods[i]!.attr).qp_state, to);
  });
  const rtr = QpAttr.decode(mods[1]!.attr);
  t.same(rtr.dgid, peerGid, 'RTR names the peer by its virtual GID');
  t.equal(rtr.dest_qp_num, 0x22);
  t.equal(rtr.sgid_index, 0, 'sgid_index 0 (section 8.17)');
  t.equal(qp.state, 'RTS');
  await ctx.close();
  await rig.finish();
});

t.test('post send: the WQE of appendix A in the SQ ring, producer_index, the SQ doorbell record', async (t) => {
  const { rig, ctx, device } = await opened();
  const { qp } = await cqAndQp(ctx, device, 1n);
  const wr = { wrId: 0x1000n, opcode: 'RDMA_WRITE' as const, signaled: true, sgList: [{ addr: 0x7f0000001800n, length: 64, lkey: 0x5678 }], remoteAddr: 0x7f0000200000n, rkey: 0x1234 };
  t.same(encodeSendWqe(wr), ex('send-wqe-rdma-write'), 'encodeSendWqe = appendix A send-wqe-rdma-write');
  await qp.postSend([wr]);
  t.same(qp.sq.ring.buffer.read(0, Limits.SQ_WQE_SIZE), ex('send-wqe-rdma-write'), 'entry 0 of the SQ ring');
  t.equal(qp.sq.ring.load(0), 1, 'producer_index 1');
  await new Promise((r) => setTimeout(r, 50));
  t.same(device.doorbells.map((d) => d.readable), [ex('doorbell-sq')], 'one doorbell buffer: appendix A doorbell-sq');
  t.ok(device.doorbells.every((d) => d.writableBytes === 0), 'doorbell buffers are device-readable only');

  // Inline, immediate and atomics encode into the fields the spec names.
  const inline = SendWqe.decode(encodeSendWqe({ wrId: 1n, opcode: 'SEND_WITH_IMM', inline: new Uint8Array([1, 2, 3]), imm: 0xdeadbeef, solicited: true }));
  t.match(inline, { opcode: 3, flags: 0x2 | 0x4, num_sge: 0, inline_length: 3, imm_data: 0xdeadbeef });
  t.same(inline.payload.subarray(0, 4), new Uint8Array([1, 2, 3, 0]));
  const cas = SendWqe.decode(encodeSendWqe({ wrId: 2n, opcode: 'ATOMIC_CMP_AND_SWP', sgList: [{ addr: 8n, length: 8, lkey: 1 }], compareAdd: 5n, swap: 7n, remoteAddr: 0x1000n, rkey: 9 }));
  t.match(cas, { opcode: 6, compare_add: 5n, swap: 7n, num_sge: 1 });

  // Ring full: the driver refuses before writing (section 10.10: never more than the depth ahead).
  const many = Array.from({ length: 8 }, (_, i) => ({ ...wr, wrId: BigInt(i) }));
  await t.rejects(qp.postSend(many), /do not fit/);
  t.equal(qp.sq.ring.load(0), 1, 'producer_index untouched by the refused batch');
  await ctx.close();
  await rig.finish();
});

t.test('poll: the CQE of appendix A is read, consumer_index written; arm records', async (t) => {
  const { rig, ctx, device } = await opened();
  const { cq } = await cqAndQp(ctx, device, 1n);
  t.same(cq.poll(), [], 'empty CQ');
  // The test plays the device: CQE into entry 0, then producer_index (section 10.2, device completing).
  cq.ring.buffer.write(0, ex('cqe-rdma-write'));
  cq.ring.store(0, 1);
  const wcs = cq.poll();
  t.match(wcs, [{ wrId: 0x1000n, qpHandle: 1, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE, opcodeName: 'RDMA_WRITE', statusName: 'SUCCESS' }]);
  t.equal(cq.ring.load(4), 1, 'consumer_index 1');
  t.same(Cqe.decode(ex('cqe-rdma-write')).wr_id, 0x1000n);
  // A device that runs the producer more than the depth ahead is caught.
  cq.ring.store(0, 1 + 17);
  t.throws(() => cq.poll(), ProtocolError);
  cq.ring.store(0, 1);

  await cq.reqNotify(false);
  await cq.reqNotify(true);
  await new Promise((r) => setTimeout(r, 50));
  t.same(
    device.doorbells.map((d) => DoorbellRecord.decode(d.readable)),
    [
      { handle: 1, type: DoorbellType.CQ_ARM_NEXT },
      { handle: 1, type: DoorbellType.CQ_ARM_SOLICITED },
    ],
  );
  await ctx.close();
  await rig.finish();
});

t.test('event queue: events parsed, buffers posted again, a short event counted and dropped', async (t) => {
  const { rig, ctx, device } = await opened();
  await new Promise((r) => setTimeout(r, 50));
  const posted = device.eventBuffers;
  device.emitEvent(Event.encode({ type: EventType.COMPLETION, count: 1, handle: 7, detail: 0, sequence: 0n }));
  const e = await ctx.driver.waitCompletionEvent(7, 2000);
  t.match(e, { type: EventType.COMPLETION, typeName: 'COMPLETION', handle: 7, count: 1, sequence: 0n });
  device.emitEvent(Event.encode({ type: EventType.QP_FATAL, count: 3, handle: 2, detail: 2, sequence: 1n }));
  const f = await ctx.driver.waitEvent((x) => x.type === EventType.QP_FATAL, 2000);
  t.match(f, { typeName: 'QP_FATAL', count: 3, handle: 2, detail: 2 });
  device.emitEvent(Event.encode({ type: EventType.PORT_ERR, count: 1, handle: 0, detail: 1, sequence: 2n }), 16);
  t.equal(await ctx.driver.waitEvent((x) => x.type === EventType.PORT_ERR, 300), undefined, 'used length 16: not an event');
  t.equal(ctx.driver.counters.protocolErrors, 1, 'counted');
  await new Promise((r) => setTimeout(r, 50));
  t.equal(device.eventBuffers, posted, 'every buffer the device returned was posted again');
  await ctx.close();
  await rig.finish();
});

t.test('MR page lists: scattered pages in byte order, REG_MR then REG_MR_CONTINUE in order', async (t) => {
  const { rig, ctx, device } = await opened();
  device.answers.push(ok(1n, HandleResponse.encode({ handle: 1 })));
  const pd = await ctx.allocPd();
  const buf = ctx.allocBuffer(40 * 4096 - 100, { pageOffset: 100, placement: 'scattered' });
  t.equal(buf.pages.length, 40);
  // Byte k is at page[j] + (o mod 4096), o = (iova mod 4096) + k (section 8.14).
  for (const k of [0, 3995, 3996, 100_000, buf.length - 1]) {
    const o = 100 + k;
    t.equal(buf.gpaOf(k), Number(buf.pages[Math.floor(o / 4096)]!) + (o % 4096), `byte ${k}`);
  }
  t.notSame([...buf.pages].sort((a, b) => Number(a - b)), buf.pages, 'pages are not in address order');
  buf.write(3990, Uint8Array.from({ length: 20 }, (_, i) => i + 1));
  t.same(ctx.driver.memory.read(Number(buf.pages[1]!), 10), Uint8Array.from({ length: 10 }, (_, i) => i + 7), 'writes cross pages per the list: bytes 6.. of the write start page 1');
  device.answers.push(
    ok(2n, RegMrResponse.encode({ mr_handle: 5, lkey: 0, rkey: 0, pages_received: 16 })),
    ok(3n, RegMrResponse.encode({ mr_handle: 5, lkey: 0, rkey: 0, pages_received: 32 })),
    ok(4n, RegMrResponse.encode({ mr_handle: 5, lkey: 0xaa, rkey: 0xbb, pages_received: 40 })),
  );
  const mr = await ctx.regMr(pd, buf, 1);
  t.match(mr, { handle: 5, lkey: 0xaa, rkey: 0xbb, iova: buf.iova });
  const [reg, c1, c2] = device.requests.slice(1).map((r) => r.readable);
  t.match(RegMrRequest.decode(reg!, 16), { total_pages: 40, num_pages: 16, page_shift: 12, iova: buf.iova, length: BigInt(buf.length) });
  t.match(RegMrContinueRequest.decode(c1!, 16), { mr_handle: 5, start_index: 16, num_pages: 16 });
  t.match(RegMrContinueRequest.decode(c2!, 16), { mr_handle: 5, start_index: 32, num_pages: 8 });
  const sent = [
    ...decodePageList(reg!, 16 + RegMrRequest.size, 16),
    ...decodePageList(c1!, 16 + RegMrContinueRequest.size, 16),
    ...decodePageList(c2!, 16 + RegMrContinueRequest.size, 8),
  ];
  t.same(sent, buf.pages, 'every page once, in order');
  buf.release();
  await ctx.close();
  await rig.finish();
});

t.test('destroy gives rings back only after the response; close leaves nothing allocated', async (t) => {
  const { rig, ctx, device } = await opened();
  const before = ctx.driver.memory.allocator.liveCount;
  const { pd, cq, qp } = await cqAndQp(ctx, device, 1n);
  device.answers.push(ok(4n, new Uint8Array(16)), ok(5n), ok(6n));
  await (qp as Qp).destroy();
  await cq.destroy();
  await pd.dealloc();
  t.equal(ctx.driver.memory.allocator.liveCount, before, 'rings and index blocks released');
  t.same(
    device.requests.slice(3).map((r) => CtrlRequestHeader.decode(r.readable).command),
    [Command.DESTROY_QP, Command.DESTROY_CQ, Command.DESTROY_PD],
  );
  t.same(device.requests.map((r) => tagOf(r.readable)), [1n, 2n, 3n, 4n, 5n, 6n], 'tags count up');
  await ctx.close();
  t.same(await rig.finish(), { watchers: 0, mappings: 0 }, 'no mapping or watcher left');
});
