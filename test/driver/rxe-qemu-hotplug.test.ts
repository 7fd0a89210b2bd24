// RAM hot-added to a REAL QEMU after DRIVER_OK carries a CQ ring and an MR that work (issue 10, "Done when"). One
// VM inside the soft-RoCE test host: the project's patched QEMU under qtest (vhost-user-device-pci, virtio ID 42,
// `-m 64M,slots=2,maxmem=128M`, a QMP channel) in front of a vhost-user server and a virtio-rdma device over
// NativeVerbs on rxe0. The reference driver brings the device up and makes objects in boot RAM; then 64 MiB are
// hot-added through QMP (object_add memory-backend-memfd share=on, device_add pc-dimm), QEMU tells the back-end
// with ADD_MEM_REG, the driver maps the DIMM (QEMU's memfd, like the boot RAM) and places in it:
//   - a CQ ring and its index block: completions of RDMA WRITEs between two RC QPs of this VM (a loopback pair,
//     the cheapest real exchange) land in it, read back both by the driver and through QEMU (qtest);
//   - an MR: an RDMA WRITE into it and an RDMA READ out of it verify every byte.
// Afterwards the guest destroys everything and `rdma resource show` lists nothing of this process.
//
// MUST run inside the soft-RoCE test host. Straight through node it takes about 70 s there (40 s of it starting
// QEMU under TCG), VRDMA_TRACE=1 showing each step:
//   bash scripts/rxe/run.sh --timeout 900 -- env VRDMA_TRACE=1 node --import tsx/esm test/driver/rxe-qemu-hotplug.test.ts
// Through tap give it more (one run under tap printed nothing within 900 s on a loaded machine):
//   bash scripts/rxe/run.sh --timeout 1800 -- npx tap --jobs=1 test/driver/rxe-qemu-hotplug.test.ts
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Cqe, Limits, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type AllocatableRange, type Cq, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { QemuQtest, hotAddMemory, type DimmInfo } from '../../guest-driver-spec/qtest/index.ts';
import { RdmaDevice, StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { HEADER_SIZE, decodeHeader, frontendRequestFromCode } from '../../vmm-device/transport/vhost-user/messages.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { host } from './harness.ts';
import { hostObjectsOf, pattern, requireTestHost, NO_HOST_OBJECTS, RXE_DEVICE, RXE_HOST_IP } from './rxe-helpers.ts';
import { ALL_ACCESS, SUBTEST_TIMEOUT_MS, WAIT_MS, waitNoHostObjects } from './two-vms-suite.ts';

requireTestHost();
t.setTimeout(4 * SUBTEST_TIMEOUT_MS);

/** VRDMA_TRACE=1: each step with its time on stderr (under TCG a slow step is otherwise invisible until a time-out). */
const started = Date.now();
const step = (what: string): void => {
  if (process.env['VRDMA_TRACE'] === '1') process.stderr.write(`[hotplug +${((Date.now() - started) / 1000).toFixed(1)} s] ${what}\n`);
};

const MIB = 1024 * 1024;
const RAM_MIB = 64;
const DIMM_MIB = 64;
/** pc places device memory at the first GiB boundary at or above 4 GiB (no RAM above 4 GiB here). */
const DEVICE_MEMORY_BASE = 0x1_0000_0000;
const QEMU_START_TIMEOUT_MS = 120_000;
const VM_IP = '192.168.7.1';
const BUFFER_BYTES = 64 * 1024;

interface Vm {
  device: RdmaDevice;
  server: VhostUserServer;
  qemu: QemuQtest;
  transport: QtestTransport;
  ctx: RdmaContext;
  /** Front-end requests the back-end received, by name, oldest first. */
  requests: { name: string; payload: Uint8Array; fdCount: number }[];
  close(): Promise<void>;
}

async function openVm(): Promise<Vm> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-hotplug-'));
  const cleanups: (() => Promise<unknown>)[] = [async () => fs.rmSync(dir, { recursive: true, force: true })];
  const close = async (): Promise<void> => {
    const errors: unknown[] = [];
    for (const c of cleanups.splice(0).reverse()) await c().catch((e: unknown) => errors.push(e));
    if (errors.length > 0) throw new AggregateError(errors, `closing the VM: ${errors.map(String).join('; ')}`);
  };
  try {
    step('opening the device on rxe0');
    const device = await RdmaDevice.open({
      aliases: nativeAliasMapper,
      verbs: new NativeVerbs(),
      hostDevice: RXE_DEVICE,
      vmId: 'vm-a',
      resolver: new StaticAddressResolver([{ vmId: 'vm-a', vpc: 'blue', virtualIp: VM_IP, hostIp: RXE_HOST_IP }]),
      log: new RecordingLogger('vm-a'),
    });
    cleanups.push(() => device.close());
    const socketPath = path.join(dir, 'vm-a.sock');
    const server = new VhostUserServer({ path: socketPath, host, model: device, log: new RecordingLogger('vm-a-vhost-user') });
    const requests: Vm['requests'] = [];
    server.onWire = (e) => {
      if (e.direction !== 'in') return;
      const h = decodeHeader(e.bytes.subarray(0, HEADER_SIZE));
      requests.push({ name: frontendRequestFromCode(h.request) ?? `unknown ${h.request}`, payload: e.bytes.slice(HEADER_SIZE), fdCount: e.fdCount });
    };
    server.listen();
    cleanups.push(async () => server.close());
    step('starting QEMU');
    const qemu = await QemuQtest.start({
      workDir: dir,
      ramMiB: RAM_MIB,
      startTimeoutMs: QEMU_START_TIMEOUT_MS,
      qmp: true,
      hotplug: { slots: 2, maxMiB: RAM_MIB + DIMM_MIB },
      args: [
        '-chardev', `socket,id=vu,path=${socketPath}`,
        '-device', 'vhost-user-device-pci,chardev=vu,virtio-id=42,num_vqs=3,vq_size=256,config_size=128,page-per-vq=on',
      ],
    });
    cleanups.push(() => qemu.stop());
    step('QEMU started; probing the device');
    const transport = await QtestTransport.open({ qemu, host });
    cleanups.push(() => transport.close());
    step('initializing the driver');
    const ctx = await RdmaContext.open(transport);
    step('DRIVER_OK');
    return { device, server, qemu, transport, ctx, requests, close };
  } catch (e) {
    await close().catch(() => undefined);
    throw e;
  }
}

let vmPromise: Promise<Vm> | undefined;
const vmOf = (): Promise<Vm> => (vmPromise ??= openVm());
t.teardown(async () => {
  if (vmPromise !== undefined) await (await vmPromise.catch(() => undefined))?.close();
});

/** Objects made in boot RAM right after DRIVER_OK, before the hot-add; used (and checked working) afterwards. */
interface Before {
  pd: Pd;
  cq: Cq;
  buf: GuestBuffer;
  mr: Mr;
}
let before: Before | undefined;
let dimm: DimmInfo | undefined;
let hotRange: AllocatableRange | undefined;

const inRange = (gpa: number | bigint, length: number, r: AllocatableRange): boolean => Number(gpa) >= r.gpa && Number(gpa) + length <= r.gpa + r.size;

/** An RC QP pair of this one VM connected to each other (loopback through rxe0), both on `cq`. */
async function loopbackPair(ctx: RdmaContext, pd: Pd, cq: Cq, made: Qp[]): Promise<[Qp, Qp]> {
  const qa = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
  made.push(qa);
  const qb = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
  made.push(qb);
  await qa.connect({ gid: ctx.gid, qpn: qb.qpNum }, { accessFlags: ALL_ACCESS });
  await qb.connect({ gid: ctx.gid, qpn: qa.qpNum }, { accessFlags: ALL_ACCESS });
  return [qa, qb];
}

const opts = { timeout: SUBTEST_TIMEOUT_MS };

t.test('objects made after DRIVER_OK, then RAM hot-added: QEMU sends ADD_MEM_REG of the DIMM, the driver maps it', opts, async (t) => {
  const vm = await vmOf();
  const { ctx, qemu } = vm;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(32);
  const buf = ctx.allocBuffer(BUFFER_BYTES);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  before = { pd, cq, buf, mr };
  t.ok(hostObjectsOf(process.pid).mr >= 1, 'the boot-RAM objects exist on the host');

  step('boot-RAM objects made; hot-adding');
  const seen = vm.requests.length;
  dimm = await hotAddMemory(qemu.qmp!, { id: 'dimm0', sizeMiB: DIMM_MIB });
  t.equal(dimm.gpa, DEVICE_MEMORY_BASE, `QMP query-memory-devices: the DIMM is at 0x${dimm.gpa.toString(16)}`);
  t.equal(dimm.size, DIMM_MIB * MIB);
  const session = vm.server.session!;
  const deadline = Date.now() + WAIT_MS;
  while (session.guestMemory.findRegion(dimm.gpa) === undefined && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  t.ok(session.guestMemory.isValidRange(dimm.gpa, dimm.size), "the back-end session's map covers the DIMM");
  // Only the memory-table messages: QEMU may send others meanwhile (a SET_VRING_CALL when it re-routes a queue's
  // interrupt), which say nothing about how the DIMM was announced.
  const MEMORY_TABLE = new Set(['ADD_MEM_REG', 'REM_MEM_REG', 'SET_MEM_TABLE']);
  const sent = vm.requests.slice(seen).filter((m) => MEMORY_TABLE.has(m.name));
  t.same(sent.map((m) => m.name), ['ADD_MEM_REG'], 'one ADD_MEM_REG, no SET_MEM_TABLE');
  const v = new DataView(sent[0]!.payload.buffer);
  t.same([Number(v.getBigUint64(8, true)), Number(v.getBigUint64(16, true))], [dimm.gpa, dimm.size], 'its region is the DIMM');

  step('DIMM added; mapping it');
  hotRange = vm.transport.addRam(dimm.gpa, dimm.size);
  t.same(hotRange, { gpa: dimm.gpa, size: dimm.size }, 'the driver allocates from the DIMM');
  const probe = pattern(4096, 9);
  ctx.driver.memory.write(dimm.gpa + 8 * MIB, probe);
  t.same(await qemu.qtest.read(dimm.gpa + 8 * MIB, probe.length), probe, "the driver's mapping of the DIMM is QEMU's guest RAM");
});

t.test('a CQ ring in the hot-added RAM: completions of loopback RDMA WRITEs land in it', opts, async (t) => {
  const vm = await vmOf();
  const range = hotRange;
  if (range === undefined || before === undefined) throw new Error('the hot-add test did not complete');
  const { ctx, qemu } = vm;
  const made: Qp[] = [];
  let cq: Cq | undefined;
  try {
    step('CREATE_CQ in the DIMM');
    cq = await ctx.createCq(32, { within: range });
    t.ok(cq.ring.pages.every((p) => inRange(p, cq!.ring.buffer.pageSize, range)), 'every ring page is in the DIMM');
    t.ok(inRange(cq.ring.indexGpa, Limits.QUEUE_INDEX_SIZE, range), 'and the index block');
    const [qa] = await loopbackPair(ctx, before.pd, cq, made);
    const data = pattern(4096, 1);
    before.buf.write(0, data);
    await qa.postSend([{ wrId: 0xd1n, opcode: 'RDMA_WRITE', signaled: true, sgList: [before.mr.sge(0, 4096)], remoteAddr: before.mr.iova + 32768n, rkey: before.mr.rkey }]);
    await qa.postSend([{ wrId: 0xd2n, opcode: 'RDMA_WRITE', signaled: true, sgList: [before.mr.sge(0, 64)], remoteAddr: before.mr.iova + 40960n, rkey: before.mr.rkey }]);
    // Seen through QEMU (qtest reads QEMU's guest RAM) before the driver consumes it: the CQE is in the DIMM.
    const first = Cqe.decode(await waitCqeThroughQemu(qemu, cq.ring.buffer.gpaOf(0)));
    t.match(first, { wr_id: 0xd1n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }, 'the first CQE, read from the DIMM through QEMU');
    const wcs = await cq.waitPoll(2, WAIT_MS);
    t.match(wcs, [
      { wrId: 0xd1n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE },
      { wrId: 0xd2n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE },
    ]);
    t.same(before.buf.read(32768, 4096), data, 'the WRITE arrived');
    t.same(before.cq.poll(), [], 'the boot-RAM CQ saw nothing of it');
  } finally {
    for (const q of made) await q.destroy();
    if (cq !== undefined) await cq.destroy();
  }
  t.equal(vm.device.qps.size, 0, 'the device holds no QP');
});

t.test('an MR in the hot-added RAM: an RDMA WRITE into it and a READ out of it verify every byte', opts, async (t) => {
  const vm = await vmOf();
  const range = hotRange;
  if (range === undefined || before === undefined) throw new Error('the hot-add test did not complete');
  const { ctx, qemu } = vm;
  const made: Qp[] = [];
  const hot = ctx.allocBuffer(BUFFER_BYTES, { within: range });
  let mr: Mr | undefined;
  try {
    t.ok(hot.pages.every((p) => inRange(p, hot.pageSize, range)), 'every page of the buffer is in the DIMM');
    step('REG_MR in the DIMM');
    mr = await ctx.regMr(before.pd, hot, ALL_ACCESS);
    // The boot-RAM CQ made before the hot-add carries the completions: it still works after the map changed.
    const [qa] = await loopbackPair(ctx, before.pd, before.cq, made);
    const data = pattern(20_000, 3);
    before.buf.write(0, data);
    await qa.postSend([{ wrId: 0xe1n, opcode: 'RDMA_WRITE', signaled: true, sgList: [before.mr.sge(0, data.length)], remoteAddr: mr.iova + 1024n, rkey: mr.rkey }]);
    t.match(await before.cq.waitPoll(1, WAIT_MS), [{ wrId: 0xe1n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }]);
    t.same(hot.read(1024, data.length), data, 'the MR in the DIMM holds the written bytes');
    t.same(await qemu.qtest.read(hot.gpaOf(1024), data.length), data, 'QEMU reads the same bytes at the DIMM address');

    const remote = pattern(9000, 5);
    hot.write(30_000, remote);
    before.buf.fill(0);
    await qa.postSend([{ wrId: 0xe2n, opcode: 'RDMA_READ', signaled: true, sgList: [before.mr.sge(100, remote.length)], remoteAddr: mr.iova + 30_000n, rkey: mr.rkey }]);
    t.match(await before.cq.waitPoll(1, WAIT_MS), [{ wrId: 0xe2n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_READ }]);
    t.same(before.buf.read(100, remote.length), remote, 'READ brought the bytes out of the DIMM');
  } finally {
    for (const q of made) await q.destroy();
    if (mr !== undefined) await mr.dereg();
    hot.release();
  }
});

t.test('the guest destroys everything: nothing left in the device or on the host', opts, async (t) => {
  const vm = await vmOf();
  if (before !== undefined) {
    await before.mr.dereg();
    await before.cq.destroy();
    await before.pd.dealloc();
    before.buf.release();
    before = undefined;
  }
  step('everything destroyed');
  const d = vm.device;
  t.same([d.pds.size, d.cqs.size, d.qps.size, d.mrs.size, d.ahs.size], [0, 0, 0, 0, 0], 'the device holds no object');
  await d.settled();
  t.same(await waitNoHostObjects(), NO_HOST_OBJECTS, 'rdma resource show: nothing of this process');
  t.equal(vm.server.closeReasons.length, 0, 'the vhost-user connection stayed up');
});

/** Polls a CQE slot through qtest until its wr_id is non-zero (the device zeroes nothing: the ring was zeroed). */
async function waitCqeThroughQemu(qemu: QemuQtest, gpa: number): Promise<Uint8Array> {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const raw = await qemu.qtest.read(gpa, Limits.CQE_SIZE);
    if (raw.some((b) => b !== 0)) return raw;
    if (Date.now() > deadline) throw new Error(`no CQE at 0x${gpa.toString(16)} within ${WAIT_MS} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
