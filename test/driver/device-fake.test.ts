// End to end without RDMA hardware: the reference driver <-> reference vhost-user front-end <-> vhost-user server
// <-> the virtio-rdma device (vmm-device/rdma) <-> FakeVerbs. FakeVerbs moves no data (the rxe-*.test.ts files
// verify bytes on real soft-RoCE); here the control path, completions written by the device into the driver's CQ
// ring, arming and completion events, flushes, error statuses and the release of every host object on reset.
import t from 'tap';
import {
  AccessFlag,
  Command,
  Empty,
  EventType,
  HandleRequest,
  RegMrContinueRequest,
  RegMrRequest,
  RegMrResponse,
  Status,
  WcOpcode,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { CommandError, RdmaContext } from '../../guest-driver-spec/driver/index.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { driverRig } from './harness.ts';

const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
  { vmId: 'vm-c', vpc: 'red', virtualIp: '192.168.7.3', hostIp: '10.0.0.1' },
];
const WAIT_MS = 5000;

type T = Pick<typeof t, 'teardown' | 'same'>;

/** Device, server, driver; torn down at the end of the test whatever happened in it. */
async function setUp(t: T) {
  const verbs = new FakeVerbs();
  const device = await RdmaDevice.open({ verbs, hostDevice: 'fake0', vmId: 'vm-a', resolver: new StaticAddressResolver(TABLE), log: new RecordingLogger('device'), aliases: new FakeAliasMapper() });
  const rig = await driverRig(device, device.queueCount);
  const ctx = await RdmaContext.open(rig.transport);
  let closed = false;
  const close = async (): Promise<{ watchers: number; mappings: number }> => {
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

async function tearDown(t: T, s: Awaited<ReturnType<typeof setUp>>): Promise<void> {
  t.same(await s.close(), { watchers: 0, mappings: 0 }, 'no mapping or watcher left in this process');
}

t.test('open: the configuration names this VM by its virtual address; queries agree with it', async (t) => {
  const s = await setUp(t);
  const { ctx } = s;
  t.same(ctx.gid, gidFromIpv4('192.168.7.1'), 'configuration gid = the VM virtual GID');
  const dev = await ctx.queryDevice();
  t.equal(dev.max_qp, ctx.config.max_qp);
  t.equal(dev.max_mr_size, ctx.config.max_mr_size);
  t.equal(dev.phys_port_cnt, 1);
  const port = await ctx.queryPort();
  t.equal(port.gid_tbl_len, 1);
  t.equal(port.link_layer, 2, 'Ethernet');
  const gid = await ctx.queryGid();
  t.same(gid.gid, ctx.gid, 'QUERY_GID = configuration gid');
  await t.rejects(ctx.queryGid(1), { name: 'CommandError', statusName: 'INVALID_ARGUMENT', detail: 4 });
  await t.rejects(ctx.queryPort(2), { name: 'CommandError', statusName: 'INVALID_ARGUMENT', detail: 0 });
  await tearDown(t, s);
});

t.test('RC: create, connect by virtual GID, send completes into the guest CQ, recv flushed on destroy', async (t) => {
  const s = await setUp(t);
  const { ctx, verbs } = s;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(32);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
  t.ok(qp.handle >= 1 && qp.handle <= 0xffffff, 'a handle');
  t.ok(qp.qpNum >= 1 && qp.qpNum <= 0xffffff, 'a 24-bit wire QPN');
  const buf = ctx.allocBuffer(3 * 4096, { pageOffset: 512, placement: 'contiguous' });
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ);
  t.ok(mr.lkey !== 0 || mr.rkey !== 0, 'keys');

  await t.rejects(qp.connect({ gid: gidFromIpv4('192.168.7.3'), qpn: 5 }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE', detail: 56 }, 'a GID of another VPC');
  t.equal((await qp.query()).attr.qp_state, 1, 'the refused RTR left the QP in INIT');
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x1234 });
  const q = await qp.query();
  t.equal(q.attr.qp_state, 3, 'RTS');
  t.same(q.attr.dgid, gidFromIpv4('192.168.7.2'), 'QUERY_QP returns the virtual dgid, not the host one');
  t.equal(q.attr.dest_qp_num, 0x1234);

  await qp.postRecv([{ wrId: 77n, sgList: [mr.sge(0, 4096)] }]);
  await qp.postSend([{ wrId: 5n, opcode: 'SEND', signaled: true, sgList: [mr.sge(100, 200)] }]);
  const wcs = await cq.waitPoll(1, WAIT_MS);
  t.match(wcs, [{ wrId: 5n, qpHandle: qp.handle, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }]);
  t.ok(verbs.calls.includes('ibv_post_send'), 'the device posted to the host QP');

  // An unsignaled send produces no completion; a signaled one after it does (section 10.5).
  await qp.postSend([
    { wrId: 6n, opcode: 'RDMA_WRITE', sgList: [mr.sge(0, 64)], remoteAddr: 0x1000n, rkey: 1 },
    { wrId: 7n, opcode: 'RDMA_WRITE', signaled: true, sgList: [mr.sge(0, 64)], remoteAddr: 0x1000n, rkey: 1 },
  ]);
  t.match(await cq.waitPoll(1, WAIT_MS), [{ wrId: 7n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }]);

  const flushed = await qp.destroy();
  t.equal(flushed.rqFlushed, 1, 'the posted receive was flushed');
  t.match(cq.poll(), [{ wrId: 77n, status: WcStatus.WR_FLUSH_ERR }], 'its flush completion is in the CQ');
  await mr.dereg();
  await cq.destroy();
  await pd.dealloc();
  buf.release();
  await tearDown(t, s);
  t.same(verbs.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'no host object left');
});

t.test('EVENT_IDX: a batch of INIT, RTR, RTS is answered with one interrupt, a single request with one', async (t) => {
  const s = await setUp(t);
  const { ctx, rig } = s;
  t.ok(ctx.driver.controlq.eventIdx, 'the driver negotiated EVENT_IDX with the device');
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(32);
  let before = rig.server.counters.interrupts;
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
  t.equal(rig.server.counters.interrupts - before, 1, 'CREATE_QP: one interrupt');
  before = rig.server.counters.interrupts;
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x1234 });
  t.equal(rig.server.counters.interrupts - before, 1, 'three MODIFY_QPs in one batch: one interrupt, after the last answer');
  t.equal((await qp.query()).attr.qp_state, 3, 'and all three ran: RTS');
  // A refused batch still ends with one interrupt, and the driver sees every answer (the later steps WRONG_STATE).
  const qp2 = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
  before = rig.server.counters.interrupts;
  await t.rejects(qp2.connect({ gid: gidFromIpv4('192.168.7.3'), qpn: 5 }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE' }, 'RTR refused');
  t.equal(rig.server.counters.interrupts - before, 2, 'the refused batch: one interrupt; the QUERY_QP the driver then sends: one');
  await qp2.destroy();
  await qp.destroy();
  await cq.destroy();
  await pd.dealloc();
  await tearDown(t, s);
});

t.test('arming: a completion on an armed CQ raises exactly one COMPLETION event', async (t) => {
  const s = await setUp(t);
  const { ctx } = s;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(16);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq });
  const buf = ctx.allocBuffer(4096, { placement: 'contiguous' });
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE);
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x42 });
  await cq.reqNotify(false, true);
  await qp.postSend([{ wrId: 1n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 8)] }]);
  const e = await cq.waitEvent(WAIT_MS);
  t.match(e, { type: EventType.COMPLETION, handle: cq.handle, count: 1 });
  t.match(cq.poll(), [{ wrId: 1n }]);
  // Disarmed after the notification: the next completion raises none.
  await qp.postSend([{ wrId: 2n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 8)] }]);
  const more = await cq.waitPoll(1, WAIT_MS);
  t.match(more, [{ wrId: 2n }]);
  t.equal(await cq.waitEvent(200), undefined, 'one-shot arm');
  // Arming over unconsumed completions notifies at once (section 10.7).
  await qp.postSend([{ wrId: 3n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 8)] }]);
  await new Promise((r) => setTimeout(r, 200));
  await cq.reqNotify(false);
  t.match(await cq.waitEvent(WAIT_MS), { handle: cq.handle }, 'arm with a completion waiting');
  t.match(cq.poll(), [{ wrId: 3n }]);
  await tearDown(t, s);
});

t.test('errors come back as statuses and the device stays usable', async (t) => {
  const s = await setUp(t);
  const { ctx } = s;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(16);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq });
  await t.rejects(ctx.deallocPd(pd), { name: 'CommandError', statusName: 'BUSY' }, 'PD with a QP');
  await t.rejects(ctx.destroyCq(cq), { name: 'CommandError', statusName: 'BUSY', detail: 3 }, 'CQ used by a QP');
  await t.rejects(qp.modify({ state: 'RTS', sqPsn: 0 }), { name: 'CommandError', statusName: 'WRONG_STATE', detail: 8 }, 'RESET -> RTS');
  await t.rejects(qp.modify({ state: 'INIT', pkeyIndex: 0, port: 1 }), { name: 'CommandError', statusName: 'INVALID_ARGUMENT', detail: 4 }, 'INIT without ACCESS_FLAGS');
  const buf = ctx.allocBuffer(4096, { placement: 'contiguous' });
  await t.rejects(ctx.regMr(pd, buf, AccessFlag.REMOTE_WRITE), { name: 'CommandError', statusName: 'INVALID_ARGUMENT', detail: 4 }, 'REMOTE_WRITE without LOCAL_WRITE');
  const bogus = Object.create(pd) as typeof pd;
  Object.defineProperty(bogus, 'handle', { value: 999 });
  await t.rejects(ctx.createQp(bogus, { type: 'RC', sendCq: cq, recvCq: cq }), { name: 'CommandError', statusName: 'INVALID_HANDLE', detail: 0 }, 'unknown PD');
  const e = await ctx.deallocPd(bogus).catch((x: unknown) => x);
  t.ok(e instanceof CommandError && e.status === Status.INVALID_HANDLE, 'DESTROY_PD of an unknown handle');
  // Still usable.
  const pd2 = await ctx.allocPd();
  t.not(pd2.handle, pd.handle);
  buf.release();
  await tearDown(t, s);
});

t.test('a large MR goes in REG_MR then REG_MR_CONTINUE; pending until the last page', async (t) => {
  const s = await setUp(t);
  const { ctx } = s;
  const pd = await ctx.allocPd();
  const buf = ctx.allocBuffer(37 * 4096 - 300, { pageOffset: 300, placement: 'contiguous' });
  const before = ctx.driver.counters.commands;
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE, { pagesPerCommand: 8 });
  t.equal(mr.length, BigInt(buf.length));
  t.equal(ctx.driver.counters.commands - before, 5, '37 pages, 8 a command: REG_MR + 4 REG_MR_CONTINUE');
  // By hand: after REG_MR alone the MR is pending (pages_received < total_pages) and only CONTINUE or DEREG take it.
  const first = await ctx.driver.command(
    Command.REG_MR,
    RegMrRequest.encode({ pd_handle: pd.handle, access_flags: AccessFlag.LOCAL_WRITE, iova: buf.iova, length: BigInt(buf.length), page_shift: 12, total_pages: 37, num_pages: 8 }),
    buf.pages.slice(0, 8),
    RegMrResponse,
  );
  t.equal(first.pages_received, 8, 'pending with 8 of 37 pages');
  await t.rejects(
    ctx.driver.command(Command.REG_MR_CONTINUE, RegMrContinueRequest.encode({ mr_handle: first.mr_handle, start_index: 9, num_pages: 1 }), [buf.pages[9]!], RegMrResponse),
    { name: 'CommandError', statusName: 'INVALID_ARGUMENT', detail: 4 },
    'CONTINUE must start at the pages received so far',
  );
  await ctx.driver.command(Command.DEREG_MR, HandleRequest.encode({ handle: first.mr_handle }), [], Empty);
  await mr.dereg();
  buf.release();
  await tearDown(t, s);
});

t.test('UD: Q_Key set, AH by virtual GID, a datagram send completes; AH of another VPC refused', async (t) => {
  const s = await setUp(t);
  const { ctx } = s;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(16);
  const qp = await ctx.createQp(pd, { type: 'UD', sendCq: cq, recvCq: cq });
  await qp.readyUd(0x1234);
  const q = await qp.query();
  t.equal(q.attr.qp_state, 3, 'RTS');
  t.equal(q.attr.qkey, 0x1234, 'QUERY_QP returns the guest Q_Key (the host uses the VPC one, section 12.4)');
  await t.rejects(qp.modify({ state: 'RTS', qkey: 0x8000_0001 }), { name: 'CommandError', statusName: 'INVALID_ARGUMENT', detail: 16 }, 'controlled Q_Key');
  await t.rejects(ctx.createAh(pd, { dgid: gidFromIpv4('192.168.7.3') }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE', detail: 16 });
  const ah = await ctx.createAh(pd, { dgid: gidFromIpv4('192.168.7.2') });
  const buf = ctx.allocBuffer(4096);
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE);
  await qp.postSend([{ wrId: 40n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 256)], ah, remoteQpn: 0x99, remoteQkey: 0x1234 }]);
  t.match(await cq.waitPoll(1, WAIT_MS), [{ wrId: 40n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }]);
  // A WQE naming a destroyed AH completes with LOC_QP_OP_ERR (sections 8.16, 10.8).
  await ah.destroy();
  await qp.postSend([{ wrId: 41n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 16)], ah, remoteQpn: 0x99, remoteQkey: 0x1234 }]);
  t.match(await cq.waitPoll(1, WAIT_MS), [{ wrId: 41n, status: WcStatus.LOC_QP_OP_ERR }]);
  await tearDown(t, s);
});
