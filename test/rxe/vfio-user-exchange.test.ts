// Data exchange on rxe0 over vfio-user, through an UNMODIFIED QEMU (Debian's 11.1.3, scripts/vfio-user/stock-qemu.sh:
// vfio-user-pci, the device as a whole PCI function), inside the soft-RoCE test host. Three VMs, each a real QEMU
// under qtest in front of its own server and virtio-rdma device instance over NativeVerbs on the one shared rxe0:
// A and B over vfio-user (stock QEMU), C over vhost-user (the project's patched QEMU, vhost-user-device-pci).
// The reference driver reaches each device through QEMU's PCI, virtio-pci registers, notifications and INTx.
//
// Exchanges (RC SEND/RECV, RDMA WRITE, RDMA READ, every byte verified; afterwards the devices hold nothing and
// `rdma resource show` lists nothing of this process): vfio-user <-> vfio-user, and vfio-user <-> vhost-user. Then,
// each with live objects on the host first: a guest reset of A (its objects released, A works again); A's QEMU
// killed (the server sees the client go, the objects are released, a NEW QEMU attaches to the same server and
// exchanges); B's server restarted (server and device instance closed under an attached QEMU, a new server and
// device on the same socket path, a new QEMU attaches and exchanges). The restart is in this process (the same
// objects the backend process holds); `vrdma-backend --transport vfio-user` as a process is in
// test/transport/vfio-user/rdma-cli.test.ts. Both QEMU versions are printed.
//
// MUST run inside the soft-RoCE test host (305 s of test at load 16 on the 2-core machine, 160 s of it starting five
// QEMUs; tsx and node start-up add ~4 min there under such load):
//   bash scripts/rxe/run.sh --timeout 900 -- npx tap --jobs=1 test/rxe/vfio-user-exchange.test.ts
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type Cq, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { QEMU_RDMA_DEVICE, findStockQemu, qemuVersion, vfioUserDeviceArgs } from '../../guest-driver-spec/driver/attach.ts';
import { QemuQtest, findQemu } from '../../guest-driver-spec/qtest/index.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { VfioUserServer } from '../../vmm-device/transport/vfio-user/server.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { hostObjectsOf, NO_HOST_OBJECTS, pattern, requireTestHost, RXE_DEVICE, RXE_HOST_IP } from '../driver/rxe-helpers.ts';
import { ALL_ACCESS, waitNoHostObjects } from '../driver/two-vms-suite.ts';

requireTestHost();
const host = new SysHost();
const TABLE: GidTableEntry[] = ['a', 'b', 'c'].map((n, i) => ({ vmId: `vm-${n}`, vpc: 'blue', virtualIp: `192.168.7.${i + 1}`, hostIp: RXE_HOST_IP }));
/** TCG is slow; a completion still comes within this. */
const WAIT_MS = 30_000;
/** Whole file: five QEMU starts and five exchanges under TCG on a loaded machine. */
const FILE_TIMEOUT_MS = 1_500_000;
/** QEMU under TCG inside the test host, on a loaded machine, takes long to start. */
const QEMU_START_TIMEOUT_MS = 300_000;
/** Guest RAM of each QEMU: rings, buffers and MRs of a test fit with room to spare. */
const QEMU_RAM_MIB = 64;
/** How long the server may take to see a killed QEMU's socket close. */
const DETACH_WAIT_MS = 20_000;
const SEND_BYTES = 64;
const RDMA_BYTES = 16 * 1024;
const BUFFER_BYTES = 64 * 1024;

type Kind = 'vfio-user' | 'vhost-user';

/** One VM: a device instance and its server (the backend's part), a QEMU, and the driver through it. */
interface Vm {
  name: string;
  kind: Kind;
  socketPath: string;
  device: RdmaDevice;
  server: VfioUserServer | VhostUserServer;
  /** The backend's end of this VM: the server closed, then the device instance (once). */
  stopBackend(): Promise<void>;
  qemu: QemuQtest;
  transport: QtestTransport;
  ctx: RdmaContext;
}

const verbs = new NativeVerbs();
const resolver = new StaticAddressResolver(TABLE);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vfu-rxe-'));
/** Released at the end of the file in reverse, also after a failure. */
const releases: (() => Promise<unknown>)[] = [];
t.teardown(async () => {
  for (const r of releases.splice(0).reverse()) await r().catch(() => undefined);
  fs.rmSync(dir, { recursive: true, force: true });
});
t.setTimeout(FILE_TIMEOUT_MS);

const stockQemu = findStockQemu();
const patchedQemu = await findQemu();
t.comment(`stock QEMU (vfio-user): ${qemuVersion(stockQemu)} (${stockQemu})`);
t.comment(`patched QEMU (vhost-user): ${qemuVersion(patchedQemu)} (${patchedQemu})`);

/** Progress on stderr as it happens (tap prints a subtest's lines when it ends): where the test host's time goes. */
const began = Date.now();
const progress = (what: string): void => void process.stderr.write(`[vfio-user-exchange +${((Date.now() - began) / 1000).toFixed(0)} s] ${what}\n`);

type Backend = Omit<Vm, 'name' | 'qemu' | 'transport' | 'ctx'>;

async function openDevice(vmId: string): Promise<Backend> {
  const kind: Kind = vmId === 'vm-c' ? 'vhost-user' : 'vfio-user';
  const device = await RdmaDevice.open({ verbs, hostDevice: RXE_DEVICE, vmId, resolver, log: new RecordingLogger(vmId), aliases: nativeAliasMapper });
  const socketPath = path.join(dir, `${vmId}.sock`);
  const log = new RecordingLogger(`${vmId}-${kind}`);
  const server = kind === 'vfio-user' ? new VfioUserServer({ path: socketPath, host, model: device, log }) : new VhostUserServer({ path: socketPath, host, model: device, log });
  server.listen();
  let stopped: Promise<void> | undefined;
  const stopBackend = (): Promise<void> =>
    (stopped ??= (async () => {
      server.close();
      await device.close();
    })());
  releases.push(stopBackend);
  return { device, server, stopBackend, kind, socketPath };
}

let qemuStarts = 0;
async function attachQemu(vm: Omit<Vm, 'qemu' | 'transport' | 'ctx'>): Promise<Vm> {
  progress(`starting QEMU for ${vm.name} (${vm.kind})`);
  const workDir = path.join(dir, `${vm.name}-qemu-${++qemuStarts}`); // one folder per QEMU: qtest sockets never collide
  fs.mkdirSync(workDir);
  const qemu = await QemuQtest.start({
    workDir,
    ramMiB: QEMU_RAM_MIB,
    startTimeoutMs: QEMU_START_TIMEOUT_MS,
    ...(vm.kind === 'vfio-user'
      ? { binary: stockQemu, args: vfioUserDeviceArgs(vm.socketPath) }
      : { binary: patchedQemu, args: ['-chardev', `socket,id=vu,path=${vm.socketPath}`, '-device', QEMU_RDMA_DEVICE] }),
  });
  releases.push(() => qemu.stop());
  const transport = await QtestTransport.open({ qemu, host });
  releases.push(() => transport.close());
  const ctx = await RdmaContext.open(transport);
  progress(`${vm.name}: QEMU ${qemu.pid} attached, the driver is up`);
  return { ...vm, qemu, transport, ctx };
}

async function openVm(vmId: string): Promise<Vm> {
  return attachQemu({ name: vmId, ...(await openDevice(vmId)) });
}

/** A PD, a CQ, an RC QP, a buffer and an MR over it on one VM. */
interface Objects {
  vm: Vm;
  pd: Pd;
  cq: Cq;
  qp: Qp;
  buf: GuestBuffer;
  mr: Mr;
}

async function makeObjects(vm: Vm): Promise<Objects> {
  const ctx = vm.ctx;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(32);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
  const buf = ctx.allocBuffer(BUFFER_BYTES);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { vm, pd, cq, qp, buf, mr };
}

async function destroyObjects(o: Objects): Promise<void> {
  await o.qp.destroy();
  await o.mr.dereg();
  await o.cq.destroy();
  await o.pd.dealloc();
  o.buf.release();
}

async function completions(t: Test, o: Objects, opcodes: number[], what: string): Promise<void> {
  const wcs = await o.cq.waitPoll(opcodes.length, WAIT_MS);
  t.same(wcs.map((wc) => [wc.opcode, wc.status]), opcodes.map((op) => [op, WcStatus.SUCCESS]), `${what}: ${opcodes.length} successful completion(s) on ${o.vm.name}`);
}

const bytes = (b: Uint8Array): Buffer => Buffer.from(b.buffer, b.byteOffset, b.length);

/**
 * RC between `x` and `y`: SEND x -> y, RDMA WRITE y -> x, RDMA READ by x of y's memory, every byte compared; then the
 * guests destroy everything and the host and both devices are checked empty.
 */
async function exchange(t: Test, x: Vm, y: Vm): Promise<void> {
  progress(`exchange ${x.name} (${x.kind}) <-> ${y.name} (${y.kind})`);
  const a = await makeObjects(x);
  const b = await makeObjects(y);
  const access = { accessFlags: ALL_ACCESS };
  await a.qp.connect({ gid: y.ctx.gid, qpn: b.qp.qpNum }, access);
  await b.qp.connect({ gid: x.ctx.gid, qpn: a.qp.qpNum }, access);
  t.ok(hostObjectsOf(process.pid).qp >= 2, 'the host lists the live QPs for this process (the empty check below means something)');

  const send = pattern(SEND_BYTES, 1);
  a.buf.write(0, send);
  await b.qp.postRecv([{ wrId: 1n, sgList: [b.mr.sge(0, SEND_BYTES)] }]);
  await a.qp.postSend([{ wrId: 2n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(0, SEND_BYTES)] }]);
  await completions(t, b, [WcOpcode.RECV], `SEND ${x.name} (${x.kind}) -> ${y.name} (${y.kind})`);
  await completions(t, a, [WcOpcode.SEND], 'SEND');
  t.ok(bytes(b.buf.read(0, SEND_BYTES)).equals(bytes(send)), 'the SEND\'s bytes arrived');

  const written = pattern(RDMA_BYTES, 2);
  b.buf.write(4096, written);
  await b.qp.postSend([{ wrId: 3n, opcode: 'RDMA_WRITE', signaled: true, sgList: [b.mr.sge(4096, RDMA_BYTES)], remoteAddr: a.mr.iova + 8192n, rkey: a.mr.rkey }]);
  await completions(t, b, [WcOpcode.RDMA_WRITE], `RDMA WRITE ${y.name} -> ${x.name}`);
  t.ok(bytes(a.buf.read(8192, RDMA_BYTES)).equals(bytes(written)), 'the RDMA WRITE\'s bytes are in the peer\'s memory');

  const remote = pattern(RDMA_BYTES, 3);
  b.buf.write(32768, remote);
  await a.qp.postSend([{ wrId: 4n, opcode: 'RDMA_READ', signaled: true, sgList: [a.mr.sge(32768, RDMA_BYTES)], remoteAddr: b.mr.iova + 32768n, rkey: b.mr.rkey }]);
  await completions(t, a, [WcOpcode.RDMA_READ], `RDMA READ by ${x.name} of ${y.name}`);
  t.ok(bytes(a.buf.read(32768, RDMA_BYTES)).equals(bytes(remote)), 'the RDMA READ brought the peer\'s bytes');

  await destroyObjects(a);
  await destroyObjects(b);
  await checkEmpty(t, [x, y]);
  progress('exchange done, host checked empty');
}

async function checkEmpty(t: Test, vms: Vm[]): Promise<void> {
  for (const vm of vms) {
    const d = vm.device;
    await d.settled();
    t.same([d.pds.size, d.cqs.size, d.qps.size, d.mrs.size], [0, 0, 0, 0], `${vm.name}: the device holds no object`);
  }
  t.same(await waitNoHostObjects(), NO_HOST_OBJECTS, 'rdma resource show: nothing of the VMs left on the host');
}

/** Leaves a PD, CQ, QP and MR alive on `vm` (what the reset, the kill and the restart must release). */
async function liveObjects(t: Test, vm: Vm): Promise<void> {
  await makeObjects(vm);
  t.ok(vm.device.qps.size === 1 && hostObjectsOf(process.pid).qp >= 1, `${vm.name} holds a live PD, CQ, QP and MR on the host`);
}

const vms: Record<'a' | 'b' | 'c', Vm> = {} as Record<'a' | 'b' | 'c', Vm>;

t.test('three QEMUs attach: two stock QEMUs over vfio-user, the patched one over vhost-user', async (t) => {
  vms.a = await openVm('vm-a');
  vms.b = await openVm('vm-b');
  vms.c = await openVm('vm-c');
  for (const vm of Object.values(vms)) t.same(vm.ctx.gid, gidFromIpv4(TABLE.find((e) => e.vmId === vm.name)!.virtualIp), `${vm.name} (${vm.kind}) sees its own virtual GID`);
  t.ok(vms.a.server instanceof VfioUserServer && vms.a.server.isAttached, 'A is a vfio-user function of the stock QEMU');
  t.equal(vms.a.ctx.driver.mapping, undefined, 'no host queue mapping over vfio-user: the relayed data path');
});

t.test('two vfio-user VMs exchange on rxe0 (SEND, WRITE, READ)', async (t) => {
  await exchange(t, vms.a, vms.b);
});

t.test('a vfio-user VM and a vhost-user VM exchange on rxe0, both directions', async (t) => {
  await exchange(t, vms.a, vms.c);
});

t.test('a guest reset of a vfio-user VM releases its host objects; the driver starts it again and it exchanges', async (t) => {
  await liveObjects(t, vms.a);
  await vms.a.ctx.driver.close(); // the guest writes 0 to the status: section 11.5, every object destroyed
  t.equal(await vms.a.transport.getStatus(), 0, 'the status reads back 0');
  await checkEmpty(t, [vms.a]);
  vms.a = { ...vms.a, ctx: await RdmaContext.open(vms.a.transport) };
  await exchange(t, vms.c, vms.a);
});

t.test('a vfio-user VM\'s QEMU killed: its host objects released, a new QEMU attaches to the same server and exchanges', async (t) => {
  const a = vms.a;
  await liveObjects(t, a);
  await a.transport.close();
  process.kill(a.qemu.pid, 'SIGKILL');
  const deadline = Date.now() + DETACH_WAIT_MS;
  while ((a.server as VfioUserServer).isAttached && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  t.notOk((a.server as VfioUserServer).isAttached, 'the server saw its client go');
  await checkEmpty(t, [a]);
  vms.a = await attachQemu({ name: a.name, kind: a.kind, socketPath: a.socketPath, device: a.device, server: a.server, stopBackend: a.stopBackend });
  t.equal((vms.a.server as VfioUserServer).counters.connections, 2, 'the same server serves its second client');
  await exchange(t, vms.a, vms.b);
});

t.test('the server restarted under an attached stock QEMU: its objects released, a new server on the same path serves a new QEMU', async (t) => {
  const b = vms.b;
  await liveObjects(t, b);
  await b.stopBackend(); // the backend's end: its socket goes, and the device instance with it
  t.notOk(fs.existsSync(b.socketPath), 'the socket file went with the server');
  t.same(await waitNoHostObjects(), NO_HOST_OBJECTS, 'the closed device released B\'s host objects');
  await b.transport.close();
  await b.qemu.stop(); // QEMU 11.1 keeps running without its server: stopped here, as a VMM's manager would
  vms.b = await openVm('vm-b');
  t.equal((vms.b.server as VfioUserServer).counters.connections, 1, 'a new server, its first client');
  await exchange(t, vms.b, vms.c);
});
