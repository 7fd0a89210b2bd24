// The two-VM tests on real soft-RoCE, written once and run over two transports: the reference vhost-user FRONTEND
// (test/driver/rxe-two-vms.test.ts, rxe-errors.test.ts) and two REAL QEMU processes (the patched QEMU under qtest,
// vhost-user-device-pci with virtio ID 42: test/driver/rxe-qemu-two-vms.test.ts). Per VM: the reference driver
// <-> transport <-> vhost-user server <-> virtio-rdma device <-> NativeVerbs on rxe0 (one rxe0 shared by both
// devices, as one host RNIC would be).
//
// One pair of VMs serves a whole file (a QEMU pair takes long to start under TCG). Each test makes its own objects,
// the guest destroys every one of them at the end (as a driver unloading would), and then the host is checked:
// `rdma resource show` lists nothing of this process and the devices' tables are empty.
//
// This file registers no test by itself (tap lists it as "no tests found").
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'tap';
import { AccessFlag, Command, HandleRequest, HandleResponse, Limits, RegMrRequest, RegMrResponse, ResourceKind, WcFlag, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { CommandError, RdmaContext, VhostUserTransport, type Ah, type Cq, type DriverTransport, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { QemuQtest } from '../../guest-driver-spec/qtest/index.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type DeviceQuotas, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { host, RIG_RAM } from './harness.ts';
import { hostObjectsOf, pattern, RXE_DEVICE, RXE_HOST_IP, NO_HOST_OBJECTS } from './rxe-helpers.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';

export type TransportKind = 'frontend' | 'qemu';

export const IP_A = '192.168.7.1';
export const IP_B = '192.168.7.2';
const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: IP_A, hostIp: RXE_HOST_IP },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: IP_B, hostIp: RXE_HOST_IP },
];
/** TCG is slow; a completion still comes within this. */
export const WAIT_MS = 30_000;
/** Under TCG on a loaded 2-core machine, one test with its set-up and checks takes tens of seconds. */
export const SUBTEST_TIMEOUT_MS = 600_000;
export const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ | AccessFlag.REMOTE_ATOMIC;
/** Bytes of each VM's data buffer in a test. */
export const BUFFER_BYTES = 64 * 1024;
/** How long the host may take to release a VM's objects after its connection closed (TCG, flush grace). */
const RELEASE_WAIT_MS = 20_000;
/** QEMU's guest RAM for these tests (rings, buffers and the MRs of a test fit with room to spare). */
const QEMU_RAM_MIB = 64;
/** QEMU under TCG inside the test host, on a loaded machine, takes long to start. */
const QEMU_START_TIMEOUT_MS = 120_000;

/** One VM: its device instance (in this process) and its driver context over the transport. */
export interface VmEnd {
  name: string;
  device: RdmaDevice;
  ctx: RdmaContext;
  /** Present for QEMU VMs. */
  qemu?: QemuQtest;
  /** Closes this VM's transport and VMM side (QEMU stopped; the front-end disconnected). */
  close(): Promise<void>;
}

export interface VmPair {
  kind: TransportKind;
  a: VmEnd;
  b: VmEnd;
  /** Closes everything (in reverse order of opening), also after a failure. */
  close(): Promise<void>;
}

export interface PairOptions {
  /** Per-VM quotas of both devices (the negative tests use a small QP limit). */
  quotas?: Partial<DeviceQuotas>;
  /** Host queue mapping of both devices (spec 13; default off). */
  hostQueueMapping?: 'off' | 'polled' | 'notify';
}

/** Opens two VMs over `kind`, each with its own device instance on the shared rxe0. */
export async function openPair(kind: TransportKind, options: PairOptions = {}): Promise<VmPair> {
  const verbs = new NativeVerbs();
  const resolver = new StaticAddressResolver(TABLE);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vrdma-two-vms-${kind}-`));
  const cleanups: (() => Promise<unknown>)[] = [async () => fs.rmSync(dir, { recursive: true, force: true })];
  const closeAll = async (): Promise<void> => {
    const errors: unknown[] = [];
    for (const c of cleanups.splice(0).reverse()) await c().catch((e: unknown) => errors.push(e));
    if (errors.length > 0) throw new AggregateError(errors, `closing the ${kind} pair: ${errors.map(String).join('; ')}`);
  };
  const openEnd = async (vmId: string): Promise<VmEnd> => {
    const device = await RdmaDevice.open({
      verbs,
      hostDevice: RXE_DEVICE,
      vmId,
      resolver,
      log: new RecordingLogger(vmId),
      aliases: nativeAliasMapper,
      ...(options.quotas !== undefined ? { quotas: options.quotas } : {}),
      ...(options.hostQueueMapping !== undefined ? { hostQueueMapping: options.hostQueueMapping } : {}),
    });
    cleanups.push(() => device.close());
    const socketPath = path.join(dir, `${vmId}.sock`);
    const server = new VhostUserServer({ path: socketPath, host, model: device, log: new RecordingLogger(`${vmId}-vhost-user`) });
    server.listen();
    cleanups.push(async () => server.close());
    const own: (() => Promise<unknown>)[] = [];
    let transport: DriverTransport;
    let qemu: QemuQtest | undefined;
    if (kind === 'qemu') {
      const workDir = path.join(dir, vmId); // one folder per QEMU: their qtest sockets never collide
      fs.mkdirSync(workDir);
      qemu = await QemuQtest.start({
        workDir,
        ramMiB: QEMU_RAM_MIB,
        startTimeoutMs: QEMU_START_TIMEOUT_MS,
        args: [
          '-chardev', `socket,id=vu,path=${socketPath}`,
          '-device', 'vhost-user-device-pci,chardev=vu,virtio-id=42,num_vqs=3,vq_size=256,config_size=128,page-per-vq=on',
        ],
      });
      const started = qemu;
      own.push(() => started.stop());
      const qt = await QtestTransport.open({ qemu, host });
      own.push(() => qt.close());
      transport = qt;
    } else {
      const ram = new GuestRam(host, RIG_RAM.map((r) => ({ ...r })));
      own.push(async () => ram.release());
      const vt = await VhostUserTransport.open({ host, socketPath, ram, queues: device.queueCount });
      own.push(() => vt.close());
      transport = vt;
    }
    let closed = false;
    const closeEnd = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      for (const c of own.splice(0).reverse()) await c();
    };
    cleanups.push(closeEnd);
    const ctx = await RdmaContext.open(transport);
    return { name: vmId, device, ctx, ...(qemu !== undefined ? { qemu } : {}), close: closeEnd };
  };
  try {
    const a = await openEnd('vm-a');
    const b = await openEnd('vm-b');
    return { kind, a, b, close: closeAll };
  } catch (e) {
    await closeAll().catch(() => undefined);
    throw e;
  }
}

/** What a test works with on one VM: a PD, a CQ, a buffer and an MR over it, made for the test. */
export interface Vm {
  name: string;
  end: VmEnd;
  ctx: RdmaContext;
  pd: Pd;
  cq: Cq;
  buf: GuestBuffer;
  mr: Mr;
}

/** Objects a test made beyond its Vm's own; destroyed by the test scope at the end, children first. */
export class Scope {
  private readonly qps: Qp[] = [];
  private readonly ahs: Ah[] = [];
  private readonly mrs: Mr[] = [];
  private readonly pds: Pd[] = [];

  qp(q: Qp): Qp {
    this.qps.push(q);
    return q;
  }
  ah(a: Ah): Ah {
    this.ahs.push(a);
    return a;
  }
  mr(m: Mr): Mr {
    this.mrs.push(m);
    return m;
  }
  pd(p: Pd): Pd {
    this.pds.push(p);
    return p;
  }
  /** Forgets an object the test destroyed itself. */
  forget(o: Qp | Ah | Mr | Pd): void {
    for (const list of [this.qps, this.ahs, this.mrs, this.pds] as unknown[][]) {
      const i = list.indexOf(o);
      if (i >= 0) list.splice(i, 1);
    }
  }

  async destroyAll(): Promise<void> {
    for (const a of this.ahs.splice(0)) await a.destroy();
    for (const q of this.qps.splice(0)) await q.destroy();
    for (const m of this.mrs.splice(0)) await m.dereg();
    for (const p of this.pds.splice(0)) await p.dealloc();
  }

  /** An RC QP on each side, connected to each other by virtual GID and wire QPN. */
  async rcPair(a: Vm, b: Vm): Promise<[Qp, Qp]> {
    const qa = this.qp(await a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: 32, maxRecvWr: 32 }));
    const qb = this.qp(await b.ctx.createQp(b.pd, { type: 'RC', sendCq: b.cq, recvCq: b.cq, maxSendWr: 32, maxRecvWr: 32 }));
    const access = { accessFlags: ALL_ACCESS };
    await qa.connect({ gid: b.ctx.gid, qpn: qb.qpNum }, access);
    await qb.connect({ gid: a.ctx.gid, qpn: qa.qpNum }, access);
    return [qa, qb];
  }
}

async function makeVm(end: VmEnd, bufBytes: number): Promise<Vm> {
  const ctx = end.ctx;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(64);
  const buf = ctx.allocBuffer(bufBytes);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { name: end.name, end, ctx, pd, cq, buf, mr };
}

async function releaseVm(vm: Vm): Promise<void> {
  await vm.mr.dereg();
  await vm.cq.destroy();
  await vm.pd.dealloc();
  vm.buf.release();
}

/** Waits until the host lists nothing of this process (the release after a destroy or a reset is asynchronous). */
export async function waitNoHostObjects(): Promise<ReturnType<typeof hostObjectsOf>> {
  const deadline = Date.now() + RELEASE_WAIT_MS;
  let now = hostObjectsOf(process.pid);
  while (JSON.stringify(now) !== JSON.stringify(NO_HOST_OBJECTS) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 200));
    now = hostObjectsOf(process.pid);
  }
  return now;
}

/**
 * Runs `body` with a fresh PD, CQ, buffer and MR on each VM of `pair`; then the guest destroys everything the test
 * made (also when it failed) and the host and both devices are checked empty.
 */
export async function withObjects(t: Test, pair: VmPair, body: (a: Vm, b: Vm, s: Scope) => Promise<void>, bufBytes = BUFFER_BYTES): Promise<void> {
  const scope = new Scope();
  const made: Vm[] = [];
  let failure: unknown;
  try {
    made.push(await makeVm(pair.a, bufBytes));
    made.push(await makeVm(pair.b, bufBytes));
    await body(made[0]!, made[1]!, scope);
  } catch (e) {
    failure = e;
  }
  try {
    await scope.destroyAll();
    for (const vm of made) await releaseVm(vm);
  } catch (e) {
    failure ??= e;
  }
  for (const end of [pair.a, pair.b]) {
    const d = end.device;
    t.same([d.pds.size, d.cqs.size, d.qps.size, d.mrs.size, d.ahs.size], [0, 0, 0, 0, 0], `${end.name}: the device holds no object`);
    await d.settled();
  }
  t.same(await waitNoHostObjects(), NO_HOST_OBJECTS, 'rdma resource show: nothing of the VMs left on the host');
  if (failure !== undefined) throw failure;
}

/** A pair for the whole file, opened by the first test that needs it and closed at the end of the file. */
export function filePair(t: Test, kind: TransportKind, options: PairOptions = {}): () => Promise<VmPair> {
  let pair: Promise<VmPair> | undefined;
  t.teardown(async () => {
    if (pair !== undefined) await (await pair.catch(() => undefined))?.close();
  });
  return () => (pair ??= openPair(kind, options));
}

const u64 = (v: bigint): Uint8Array => {
  const x = new Uint8Array(8);
  new DataView(x.buffer).setBigUint64(0, v, true);
  return x;
};
const read64 = (buf: GuestBuffer, off: number): bigint => new DataView(buf.read(off, 8).buffer).getBigUint64(0, true);

/** The data-path tests between VM A and VM B, every byte verified. */
export function registerExchangeTests(t: Test, pairOf: () => Promise<VmPair>): void {
  const opts = { timeout: SUBTEST_TIMEOUT_MS };

  t.test('each VM sees its own virtual GID, not the host one', opts, async (t) => {
    const pair = await pairOf();
    await withObjects(t, pair, async (a, b) => {
      t.same(a.ctx.gid, gidFromIpv4(IP_A));
      t.same(b.ctx.gid, gidFromIpv4(IP_B));
      t.same((await a.ctx.queryGid()).gid, a.ctx.gid);
    });
  });

  t.test('RC SEND/RECV and SEND with immediate: bytes arrive intact across two SGEs', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      const [qa, qb] = await s.rcPair(a, b);
      // While the QPs exist the host lists them for this process: the leak check below is not vacuous.
      t.ok(hostObjectsOf(process.pid).qp >= 2, 'the host attributes the live QPs to this process');
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

  t.test('RDMA WRITE, WRITE with immediate and READ: remote memory changes and comes back byte for byte', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      const [qa, qb] = await s.rcPair(a, b);
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

  t.test('atomics: compare-and-swap and fetch-and-add on the peer, old values returned', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      const [qa] = await s.rcPair(a, b);
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

  t.test('UD SEND: datagram with the routing header area naming virtual addresses', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      const ua = s.qp(await a.ctx.createQp(a.pd, { type: 'UD', sendCq: a.cq, recvCq: a.cq }));
      const ub = s.qp(await b.ctx.createQp(b.pd, { type: 'UD', sendCq: b.cq, recvCq: b.cq }));
      await ua.readyUd();
      await ub.readyUd();
      const ah = s.ah(await a.ctx.createAh(a.pd, { dgid: b.ctx.gid }));
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
    });
  });
}

/** Errors on the data path between the two VMs (peer RNIC's refusals, the device's own checks). */
export function registerDataErrorTests(t: Test, pairOf: () => Promise<VmPair>): void {
  const opts = { timeout: SUBTEST_TIMEOUT_MS };

  t.test('a WRITE with a wrong rkey: REM_ACCESS_ERR, QP in ERR, later WQEs flushed, device still usable', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      const [qa] = await s.rcPair(a, b);
      await qa.postSend([{ wrId: 1n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(0, 64)], remoteAddr: b.mr.iova, rkey: (b.mr.rkey ^ 0x5a5a00) >>> 0 }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 1n, status: WcStatus.REM_ACCESS_ERR, statusName: 'REM_ACCESS_ERR' }]);
      t.equal((await qa.query()).attr.qp_state, 6, 'the QP is in ERR');
      await qa.postSend([{ wrId: 2n, opcode: 'SEND', signaled: false, sgList: [a.mr.sge(0, 8)] }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 2n, status: WcStatus.WR_FLUSH_ERR }], 'flushed, signaled or not (section 11.1)');
      // The device goes on serving this VM.
      const pd2 = await a.ctx.allocPd();
      await pd2.dealloc();
      // A WRITE past the end of the peer's MR is refused the same way on a fresh pair.
      const [qa2] = await s.rcPair(a, b);
      await qa2.postSend([{ wrId: 3n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(0, 64)], remoteAddr: b.mr.iova + BigInt(b.buf.length - 32), rkey: b.mr.rkey }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 3n, status: WcStatus.REM_ACCESS_ERR }], 'out of the peer MR bounds');
    });
  });

  t.test('local checks before the host sees a WQE: an unknown lkey and an SGE beyond its MR complete with LOC_PROT_ERR', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      const [qa] = await s.rcPair(a, b);
      await qa.postSend([{ wrId: 10n, opcode: 'SEND', signaled: true, sgList: [{ addr: a.mr.iova, length: 8, lkey: (a.mr.lkey + 0x100) >>> 0 }] }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 10n, status: WcStatus.LOC_PROT_ERR }], 'unknown lkey');
      const [qa2] = await s.rcPair(a, b);
      await qa2.postSend([{ wrId: 11n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(0, a.buf.length + 4096)] }]);
      t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 11n, status: WcStatus.LOC_PROT_ERR }], 'SGE beyond the MR');
    });
  });
}

/** The QP quota of the devices in files that test the limit (small, so reaching it takes a few commands). */
export const TEST_QP_QUOTA = 4;
/** A guest-physical page that is RAM of no VM here: QEMU's 64 MiB at 0, the front-end's regions below 264 MiB. */
const GPA_OUTSIDE_RAM = 0x2000_0000n;
const PAGE = 4096;

/** Runs a control request expected to fail; returns its status name and detail. */
async function refused(p: Promise<unknown>): Promise<[string, number]> {
  try {
    await p;
  } catch (e) {
    if (e instanceof CommandError) return [e.statusName, e.detail];
    throw e;
  }
  return ['OK', 0];
}

/**
 * Control-path refusals through the transport (spec 7.4, 8.14): each gets its status and detail, is counted, and
 * the device goes on serving the VM. The pair's devices must have the QP quota TEST_QP_QUOTA.
 */
export function registerControlErrorTests(t: Test, pairOf: () => Promise<VmPair>): void {
  const opts = { timeout: SUBTEST_TIMEOUT_MS };

  t.test('REG_MR refusals: a page outside guest RAM, a page count over the limit', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a) => {
      const drv = a.ctx.driver;
      const cfg = a.ctx.config;
      const reg = (fields: Partial<ReturnType<typeof RegMrRequest.decode>>, pages: bigint[]) =>
        drv.command(
          Command.REG_MR,
          RegMrRequest.encode({ pd_handle: a.pd.handle, access_flags: AccessFlag.LOCAL_WRITE, iova: 0x10_0000_0000n, length: BigInt(PAGE), page_shift: 12, total_pages: 1, num_pages: 1, ...fields }),
          pages,
          RegMrResponse,
        );
      t.same(await refused(reg({}, [GPA_OUTSIDE_RAM])), ['OUT_OF_RANGE', RegMrRequest.size], 'a page outside guest RAM: OUT_OF_RANGE at its page-list entry');
      const inRam = BigInt(a.buf.gpaOf(0));
      t.same(
        await refused(reg({ num_pages: 2, total_pages: 2, length: BigInt(2 * PAGE) }, [inRam & ~0xfffn, GPA_OUTSIDE_RAM])),
        ['OUT_OF_RANGE', RegMrRequest.size + Limits.PAGE_ADDR_SIZE],
        'the second entry outside guest RAM: its own offset',
      );
      const over = cfg.max_mr_pages + 1;
      const overLength = BigInt(over) * BigInt(PAGE);
      const field = overLength > cfg.max_mr_size ? 'length' : 'total_pages';
      t.same(
        await refused(reg({ total_pages: over, length: overLength }, [inRam & ~0xfffn])),
        ['INVALID_ARGUMENT', RegMrRequest.offsetOf(field)],
        `${over} pages (over max_mr_pages ${cfg.max_mr_pages}): INVALID_ARGUMENT at ${field}, before any page is read`,
      );
      const c = a.end.device.counters.errors;
      t.ok((c['REG_MR:OUT_OF_RANGE'] ?? 0) >= 2 && (c['REG_MR:INVALID_ARGUMENT'] ?? 0) >= 1, 'counted by command and status');
      t.equal(a.end.device.mrs.size, 1, 'nothing kept of the refused requests (only the test MR)');
      t.ok((await a.ctx.queryDevice()).max_qp > 0, 'the device still answers');
    });
  });

  t.test('handles: one of the other VM and a destroyed one name nothing here', opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, b, s) => {
      s.pd(await b.ctx.allocPd());
      const bOnly = s.pd(await b.ctx.allocPd());
      t.equal(a.end.device.pds.get(bOnly.handle), undefined, `precondition: VM A has no PD ${bOnly.handle}`);
      const drv = a.ctx.driver;
      const regWith = (pd: number) =>
        drv.command(
          Command.REG_MR,
          RegMrRequest.encode({ pd_handle: pd, access_flags: AccessFlag.LOCAL_WRITE, iova: 0x10_0000_0000n, length: BigInt(PAGE), page_shift: 12, total_pages: 1, num_pages: 1 }),
          [BigInt(a.buf.gpaOf(0)) & ~0xfffn],
          RegMrResponse,
        );
      t.same(await refused(regWith(bOnly.handle)), ['INVALID_HANDLE', RegMrRequest.offsetOf('pd_handle')], "B's PD handle in A's REG_MR");
      t.same(await refused(drv.command(Command.DESTROY_PD, HandleRequest.encode({ handle: bOnly.handle }), [], HandleResponse)), ['INVALID_HANDLE', 0], "DESTROY_PD of B's handle from A");
      const gone = await a.ctx.allocPd();
      await gone.dealloc();
      t.same(await refused(gone.dealloc()), ['INVALID_HANDLE', 0], 'a destroyed PD');
      t.same(await refused(regWith(gone.handle)), ['INVALID_HANDLE', RegMrRequest.offsetOf('pd_handle')], 'REG_MR on a destroyed PD');
      t.equal(b.end.device.pds.size, 3, "B's PDs are untouched");
    });
  });

  t.test(`QP limit: the ${TEST_QP_QUOTA + 1}th QP is NO_RESOURCES QP; after a destroy one more fits`, opts, async (t) => {
    await withObjects(t, await pairOf(), async (a, _b, s) => {
      t.equal(a.ctx.config.max_qp, TEST_QP_QUOTA, 'the configuration states the quota');
      const made: Qp[] = [];
      for (let i = 0; i < TEST_QP_QUOTA; i++) made.push(s.qp(await a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: 4, maxRecvWr: 4 })));
      t.same(await refused(a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: 4, maxRecvWr: 4 })), ['NO_RESOURCES', ResourceKind.QP]);
      const first = made[0]!;
      s.forget(first);
      await first.destroy();
      s.qp(await a.ctx.createQp(a.pd, { type: 'UD', sendCq: a.cq, recvCq: a.cq, maxSendWr: 4, maxRecvWr: 4 }));
      t.equal(a.end.device.qps.size, TEST_QP_QUOTA, 'full again, and usable');
    });
  });
}

/**
 * The VMM of VM A dies (SIGKILL) with live objects, one of its QPs connected to VM B: the back-end sees the
 * connection close and releases every host object of A; B's objects stay and B goes on working. Ends the pair's A.
 */
export function registerVmmKilledTest(t: Test, pairOf: () => Promise<VmPair>): void {
  t.test("QEMU killed with SIGKILL: every host object of that VM released, the other VM's untouched", { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
    const pair = await pairOf();
    const qemu = pair.a.qemu;
    if (qemu === undefined) throw new Error('registerVmmKilledTest needs a QEMU pair');
    const b = await makeVm(pair.b, BUFFER_BYTES);
    const a = await makeVm(pair.a, BUFFER_BYTES);
    const s = new Scope();
    const [qa, qb] = await s.rcPair(a, b);
    const ua = await a.ctx.createQp(a.pd, { type: 'UD', sendCq: a.cq, recvCq: a.cq });
    await ua.readyUd();
    await a.ctx.createAh(a.pd, { dgid: b.ctx.gid });
    await qa.postRecv([{ wrId: 1n, sgList: [a.mr.sge(0, 64)] }]);
    const bOnly = { qp: 1, cq: 1, mr: 1, pd: 1 };
    const before = hostObjectsOf(process.pid);
    t.same(before, { qp: bOnly.qp + 2, cq: bOnly.cq + 1, mr: bOnly.mr + 1, pd: bOnly.pd + 1 }, "both VMs' objects on the host before");

    qemu.child.kill('SIGKILL');
    const exit = await qemu.exited;
    t.equal(exit.signal, 'SIGKILL', 'QEMU died of SIGKILL');
    const deadline = Date.now() + RELEASE_WAIT_MS;
    const dev = pair.a.device;
    while ((dev.qps.size > 0 || dev.pds.size > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    await dev.settled();
    t.same([dev.pds.size, dev.cqs.size, dev.qps.size, dev.mrs.size, dev.ahs.size], [0, 0, 0, 0, 0], "A's device forgot every object");
    let now = hostObjectsOf(process.pid);
    while (JSON.stringify(now) !== JSON.stringify(bOnly) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200));
      now = hostObjectsOf(process.pid);
    }
    t.same(now, bOnly, "rdma resource show: only B's QP, CQ, MR and PD are left");

    // B's QP saw its peer vanish; B itself is served as before and releases all it has.
    t.ok((await b.ctx.queryDevice()).max_qp > 0, 'VM B still served');
    await qb.destroy();
    await releaseVm(b);
    t.same(await waitNoHostObjects(), NO_HOST_OBJECTS, 'nothing left once B destroyed its objects');
  });
}
