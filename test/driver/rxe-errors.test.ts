// Errors between two VMs on real soft-RoCE (same set-up as rxe-two-vms.test.ts): a remote access error reported by
// the peer's host RNIC comes back as the spec's completion status, the QP goes to ERR and later work is flushed;
// a peer that is gone makes the sender's QP fail; the device stays usable and nothing is left on the host.
//
// MUST run inside the soft-RoCE test host: bash scripts/rxe/run.sh -- npx tap test/driver/rxe-errors.test.ts
import t from 'tap';
import { AccessFlag, WcStatus } from '../../guest-driver-spec/layout/index.ts';
import { RdmaContext, type Cq, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { rdmaResourcesOf, requireTestHost, RXE_DEVICE, RXE_HOST_IP } from './rxe-helpers.ts';
import { driverRig, type DriverRig } from './harness.ts';

requireTestHost('test/driver/rxe-errors.test.ts');
/** Under TCG on a loaded 2-core machine, opening two devices and connecting them takes tens of seconds. */
const SUBTEST_TIMEOUT_MS = 600_000;
t.setTimeout(3 * SUBTEST_TIMEOUT_MS);

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

t.test('a WRITE with a wrong rkey: REM_ACCESS_ERR, QP in ERR, later WQEs flushed, device still usable', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    const [qa] = await rcPair(a, b);
    await qa.postSend([{ wrId: 1n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(0, 64)], remoteAddr: b.mr.iova, rkey: (b.mr.rkey ^ 0x5a5a00) >>> 0 }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 1n, status: WcStatus.REM_ACCESS_ERR, statusName: 'REM_ACCESS_ERR' }]);
    t.equal((await qa.query()).attr.qp_state, 6, 'the QP is in ERR');
    await qa.postSend([{ wrId: 2n, opcode: 'SEND', signaled: false, sgList: [a.mr.sge(0, 8)] }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 2n, status: WcStatus.WR_FLUSH_ERR }], 'flushed, signaled or not (section 11.1)');
    // The device goes on serving this VM.
    const pd2 = await a.ctx.allocPd();
    await pd2.dealloc();
    // A WRITE past the end of the peer's MR is refused the same way on a fresh pair.
    const [qa2] = await rcPair(a, b);
    await qa2.postSend([{ wrId: 3n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(0, 64)], remoteAddr: b.mr.iova + BigInt(b.buf.length - 32), rkey: b.mr.rkey }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 3n, status: WcStatus.REM_ACCESS_ERR }], 'out of the peer MR bounds');
  });
});

t.test('local checks before the host sees a WQE: an unknown lkey and an SGE beyond its MR complete with LOC_PROT_ERR', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  await withTwoVms(t, async (a, b) => {
    const [qa] = await rcPair(a, b);
    await qa.postSend([{ wrId: 10n, opcode: 'SEND', signaled: true, sgList: [{ addr: a.mr.iova, length: 8, lkey: (a.mr.lkey + 0x100) >>> 0 }] }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 10n, status: WcStatus.LOC_PROT_ERR }], 'unknown lkey');
    const [qa2] = await rcPair(a, b);
    await qa2.postSend([{ wrId: 11n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(0, a.buf.length + 4096)] }]);
    t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 11n, status: WcStatus.LOC_PROT_ERR }], 'SGE beyond the MR');
  });
});
