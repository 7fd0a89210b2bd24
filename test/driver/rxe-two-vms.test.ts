// Two VMs talking RDMA on real soft-RoCE, through everything but QEMU: for each VM the reference driver <->
// reference vhost-user front-end <-> vhost-user server <-> virtio-rdma device <-> NativeVerbs on rxe0 (one rxe0
// shared by both devices, as one host RNIC would be). RC SEND/RECV, SEND with immediate, RDMA WRITE (with
// immediate), RDMA READ, atomics and UD SEND, every byte checked; after each test `rdma resource show` shows
// nothing of this process left on the host.
//
// MUST run inside the soft-RoCE test host: bash scripts/rxe/run.sh -- npx tap test/driver/rxe-two-vms.test.ts
import t from 'tap';
import { AccessFlag, Limits, WcFlag, WcOpcode, WcStatus } from '../../guest-driver-spec/layout/index.ts';
import { RdmaContext, type Cq, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { pattern, rdmaResourcesOf, requireTestHost, RXE_DEVICE, RXE_HOST_IP } from './rxe-helpers.ts';
import { driverRig, type DriverRig } from './harness.ts';

requireTestHost('test/driver/rxe-two-vms.test.ts');
/** Under TCG on a loaded 2-core machine, opening two devices and connecting them takes tens of seconds. */
const SUBTEST_TIMEOUT_MS = 600_000;
t.setTimeout(6 * SUBTEST_TIMEOUT_MS);

const HOST_IP = RXE_HOST_IP;
const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: HOST_IP },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: HOST_IP },
];
/** TCG is slow; a completion still comes within this. */
const WAIT_MS = 20_000;
const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ | AccessFlag.REMOTE_ATOMIC;

interface Vm {
  name: string;
  ctx: RdmaContext;
  device: RdmaDevice;
  rig: DriverRig;
  pd: Pd;
  cq: Cq;
  buf: GuestBuffer;
  mr: Mr;
}

type T = Pick<typeof t, 'same'>;
type Cleanup = (() => Promise<unknown>)[];

async function openVm(cleanups: Cleanup, verbs: NativeVerbs, resolver: StaticAddressResolver, vmId: string, bufBytes: number): Promise<Vm> {
  const device = await RdmaDevice.open({ verbs, hostDevice: RXE_DEVICE, vmId, resolver, log: new RecordingLogger(vmId) });
  let rig: DriverRig | undefined;
  let ctx: RdmaContext | undefined;
  cleanups.push(async () => {
    // Device reset releases every host object of the VM (section 11.5); then the server and the device.
    await ctx?.close();
    await rig?.finish();
    await device.close();
  });
  rig = await driverRig(device, device.queueCount);
  ctx = await RdmaContext.open(rig.transport);
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(64);
  const buf = ctx.allocBuffer(bufBytes);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { name: vmId, ctx, device, rig, pd, cq, buf, mr };
}

/**
 * Runs `body` with two VMs, then closes them (also when it fails) and checks with `rdma resource show` that
 * nothing of them is left on the host.
 */
async function withTwoVms(t: T, body: (a: Vm, b: Vm) => Promise<void>, bufBytes = 64 * 1024): Promise<void> {
  const verbs = new NativeVerbs();
  const resolver = new StaticAddressResolver(TABLE);
  const cleanups: Cleanup = [];
  try {
    const a = await openVm(cleanups, verbs, resolver, 'vm-a', bufBytes);
    const b = await openVm(cleanups, verbs, resolver, 'vm-b', bufBytes);
    await body(a, b);
  } finally {
    for (const c of cleanups.reverse()) await c();
  }
  t.same(rdmaResourcesOf(process.pid), { qp: 0, cq: 0, mr: 0, pd: 0 }, 'nothing of the VMs left on the host (rdma resource show)');
}

/** An RC QP on each side, connected to each other by virtual GID and wire QPN. */
async function rcPair(a: Vm, b: Vm): Promise<[Qp, Qp]> {
  const qa = await a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: 32, maxRecvWr: 32 });
  const qb = await b.ctx.createQp(b.pd, { type: 'RC', sendCq: b.cq, recvCq: b.cq, maxSendWr: 32, maxRecvWr: 32 });
  const access = { accessFlags: ALL_ACCESS };
  await qa.connect({ gid: b.ctx.gid, qpn: qb.qpNum }, access);
  await qb.connect({ gid: a.ctx.gid, qpn: qa.qpNum }, access);
  return [qa, qb];
}

t.test('each VM sees its own virtual GID, not the host one', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    t.same(a.ctx.gid, gidFromIpv4('192.168.7.1'));
    t.same(b.ctx.gid, gidFromIpv4('192.168.7.2'));
    t.same((await a.ctx.queryGid()).gid, a.ctx.gid);
  });
});

t.test('RC SEND/RECV and SEND with immediate: bytes arrive intact across two SGEs', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    const [qa, qb] = await rcPair(a, b);
    const msg = pattern(3000, 1);
    a.buf.write(0, msg.subarray(0, 1000));
    a.buf.write(8192, msg.subarray(1000));
    await qb.postRecv([
      { wrId: 100n, sgList: [b.mr.sge(0, 4096)] },
      { wrId: 101n, sgList: [b.mr.sge(4096, 2048), b.mr.sge(16384, 2048)] },
    ]);
    await qa.postSend([{ wrId: 1n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(0, 1000), a.mr.sge(8192, 2000)] }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 1n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }]);
    const [recv] = await b.cq.waitPoll(1, WAIT_MS);
    t.match(recv, { wrId: 100n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 3000, qpHandle: qb.handle });
    t.same(b.buf.read(0, 3000), msg, '3000 bytes byte for byte');

    const imm = 0x8badf00d;
    const small = pattern(3000, 2);
    a.buf.write(0, small);
    await qa.postSend([{ wrId: 2n, opcode: 'SEND_WITH_IMM', signaled: true, imm, sgList: [a.mr.sge(0, 3000)] }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 2n, status: WcStatus.SUCCESS }]);
    const [withImm] = await b.cq.waitPoll(1, WAIT_MS);
    t.match(withImm, { wrId: 101n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 3000, immData: imm });
    t.ok((withImm!.wcFlags & WcFlag.WITH_IMM) !== 0, 'WITH_IMM flag');
    t.same(b.buf.read(4096, 2048), small.subarray(0, 2048), 'first receive SGE');
    t.same(b.buf.read(16384, 952), small.subarray(2048), 'second receive SGE');
  });
});

t.test('RDMA WRITE, WRITE with immediate and READ: remote memory changes and comes back byte for byte', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    const [qa, qb] = await rcPair(a, b);
    const data = pattern(20_000, 3);
    a.buf.write(0, data);
    await qa.postSend([{ wrId: 10n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(0, data.length)], remoteAddr: b.mr.iova + 1024n, rkey: b.mr.rkey }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 10n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }]);
    t.same(b.buf.read(1024, data.length), data, 'the peer memory holds the written bytes');
    t.same(b.cq.poll(), [], 'a plain WRITE consumes no receive at the peer');

    await qb.postRecv([{ wrId: 200n, sgList: [b.mr.sge(60_000, 16)] }]);
    const tail = pattern(512, 4);
    a.buf.write(0, tail);
    await qa.postSend([{ wrId: 11n, opcode: 'RDMA_WRITE_WITH_IMM', signaled: true, imm: 7, sgList: [a.mr.sge(0, 512)], remoteAddr: b.mr.iova, rkey: b.mr.rkey }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 11n, status: WcStatus.SUCCESS }]);
    t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 200n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, immData: 7 }]);
    t.same(b.buf.read(0, 512), tail);

    const remote = pattern(9000, 5);
    b.buf.write(30_000, remote);
    a.buf.fill(0);
    await qa.postSend([{ wrId: 12n, opcode: 'RDMA_READ', signaled: true, sgList: [a.mr.sge(100, 9000)], remoteAddr: b.mr.iova + 30_000n, rkey: b.mr.rkey }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 12n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_READ }]);
    t.same(a.buf.read(100, 9000), remote, 'READ brought the peer bytes');
  });
});

t.test('atomics: compare-and-swap and fetch-and-add on the peer, old values returned', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    const [qa] = await rcPair(a, b);
    const u64 = (v: bigint): Uint8Array => {
      const x = new Uint8Array(8);
      new DataView(x.buffer).setBigUint64(0, v, true);
      return x;
    };
    const read64 = (buf: GuestBuffer, off: number): bigint => new DataView(buf.read(off, 8).buffer).getBigUint64(0, true);
    b.buf.write(4096, u64(0x1122334455667788n));
    await qa.postSend([
      { wrId: 20n, opcode: 'ATOMIC_CMP_AND_SWP', signaled: true, sgList: [a.mr.sge(0, 8)], remoteAddr: b.mr.iova + 4096n, rkey: b.mr.rkey, compareAdd: 0x1122334455667788n, swap: 42n },
    ]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 20n, status: WcStatus.SUCCESS, opcode: WcOpcode.COMP_SWAP }]);
    t.equal(read64(a.buf, 0), 0x1122334455667788n, 'CAS returned the old value');
    t.equal(read64(b.buf, 4096), 42n, 'CAS swapped');
    await qa.postSend([{ wrId: 21n, opcode: 'ATOMIC_FETCH_AND_ADD', signaled: true, sgList: [a.mr.sge(8, 8)], remoteAddr: b.mr.iova + 4096n, rkey: b.mr.rkey, compareAdd: 1000n }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 21n, status: WcStatus.SUCCESS, opcode: WcOpcode.FETCH_ADD }]);
    t.equal(read64(a.buf, 8), 42n, 'FAA returned the old value');
    t.equal(read64(b.buf, 4096), 1042n, 'FAA added');
    // A CAS that does not match leaves the value.
    await qa.postSend([{ wrId: 22n, opcode: 'ATOMIC_CMP_AND_SWP', signaled: true, sgList: [a.mr.sge(16, 8)], remoteAddr: b.mr.iova + 4096n, rkey: b.mr.rkey, compareAdd: 1n, swap: 2n }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 22n, status: WcStatus.SUCCESS }]);
    t.equal(read64(a.buf, 16), 1042n);
    t.equal(read64(b.buf, 4096), 1042n, 'unchanged');
  });
});

t.test('UD SEND: datagram with the routing header area naming virtual addresses', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    const ua = await a.ctx.createQp(a.pd, { type: 'UD', sendCq: a.cq, recvCq: a.cq });
    const ub = await b.ctx.createQp(b.pd, { type: 'UD', sendCq: b.cq, recvCq: b.cq });
    await ua.readyUd();
    await ub.readyUd();
    const ah = await a.ctx.createAh(a.pd, { dgid: b.ctx.gid });
    const msg = pattern(700, 6);
    a.buf.write(0, msg);
    await ub.postRecv([{ wrId: 300n, sgList: [b.mr.sge(0, Limits.GRH_SIZE + 1024)] }]);
    await ua.postSend([{ wrId: 30n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(0, 700)], ah, remoteQpn: ub.qpNum, remoteQkey: 0x1111_1111 }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 30n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }]);
    const [r] = await b.cq.waitPoll(1, WAIT_MS);
    t.match(r, { wrId: 300n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: Limits.GRH_SIZE + 700, srcQp: ua.qpNum });
    t.ok((r!.wcFlags & WcFlag.GRH) !== 0, 'GRH flag');
    t.same(b.buf.read(Limits.GRH_SIZE, 700), msg, 'payload after the 40-byte header area');
    t.same([...b.buf.read(32, 4)], [192, 168, 7, 1], 'source: the sender VIRTUAL address');
    t.same([...b.buf.read(36, 4)], [192, 168, 7, 2], 'destination: this VM virtual address');
    await ah.destroy();
  });
});
