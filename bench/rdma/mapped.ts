// bench:rdma's mapped-mode rows (spec section 13, issue 11 item 7): two VMs through the reference vhost-user
// front-end with HOST_QUEUE_MAPPING in POLLED or NOTIFY doorbell mode (one testbed per mode measured), one mapped RC
// QP each, measured two ways against the same perftest run:
//   - native: the guest's loop in C (bench/rdma/native/mapped_loop.c, built by bench/rdma/run.sh), over the byte
//     views the front-end gives of the mapped SQ, RQ, CQ and doorbell slot and of guest RAM: what a guest's
//     user-space provider does, at native speed; in NOTIFY mode it also writes the front-end's kick eventfd of
//     mapdoorbellq after each doorbell store (what QEMU's ioeventfd does for the guest's notify write);
//   - js: the reference driver's MappedQp / MappedCq (JavaScript, under TCG ~400x slower than C), beside them.
// Connection setup of a mapped QP through the device (CREATE_QP with MAP, then INIT/RTR/RTS in one batch) is
// measured against native verbs by bench.ts's setup rounds.
//
// Where the time goes, in mapped mode: no JavaScript runs per work request. A one-way WRITE is the C loop's WQE
// write and two stores (~0.1 us; NOTIFY: plus the eventfd write), the backend's doorbell thread seeing the slot
// change (POLLED: one pass of its scan, or the rest of its back-off sleep; NOTIFY: its wake-up from ppoll) and
// calling POST_SEND on the uverbs file, rxe's own work, and the peer's spin on its buffer. The first and the third
// are what perftest does too; the doorbell thread's wake-up, pass and system call are the overhead.

import { createRequire } from 'node:module';
import path from 'node:path';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { AccessFlag, DoorbellMode, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, UsageError, type GuestBuffer, type MappedCq, type MappedQp, type Mr, type Pd, type WorkCompletion } from '../../guest-driver-spec/driver/index.ts';
import { attachDevice, Cleanups } from '../../guest-driver-spec/driver/attach.ts';
import type { RxeQueue } from '../../guest-driver-spec/driver/mapped/rxe-queue.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import type { HostVerbs } from '../../vmm-device/verbs/host-verbs.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import type { MappingMode } from '../../vmm-device/rdma/mapped/plan.ts';
import { VhostUserTransport } from '../../guest-driver-spec/driver/vhost-user-transport.ts';
import { snapshot, splitSince, type SchedSplit } from '../doorbell/schedstat.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The C loop's addon, built by bench/rdma/run.sh (node-gyp in bench/rdma/native). */
const ADDON = path.join(here, 'native', 'build', 'Release', 'mapped_loop.node');

export const MAPPED_TX_DEPTH = 128;
const MAPPED_RECV_DEPTH = 64;
const MAPPED_INLINE = 64;
const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;
/** Each VM's buffer: the 64 KiB WRITE source/target, latency slots at 0 (receive) and 4096 (send), READ at 8192. */
const BUFFER_BYTES = 128 * 1024;
const FRONTEND_RAM_BYTES = 16 << 20;
/** Signal one WRITE in this many in the bandwidth loop (as perftest's cq_mod). */
const BW_SIGNAL_EVERY = 16;
const WAIT_MS = 30_000;

interface LoopAddon {
  run(kind: 'write_lat' | 'send_lat' | 'read_lat' | 'write_bw', cfg: object): Float64Array;
}

interface MappedVm {
  name: string;
  device: RdmaDevice;
  ctx: RdmaContext;
  pd: Pd;
  buf: GuestBuffer;
  bytes: Uint8Array;
  mr: Mr;
  cq: MappedCq;
  qp: MappedQp;
}

export interface MappedTestbed {
  /** The doorbell mode both VMs' devices use. */
  mode: Exclude<MappingMode, 'off'>;
  a: MappedVm;
  b: MappedVm;
  close(): Promise<string[]>;
}

function view(q: RxeQueue): Uint8Array {
  const v = q.window.view?.(q.base, Number(q.mapping.size));
  if (v === undefined) throw new Error(`${q.what}: the transport gives no direct view of its shared memory (the C loop needs the front-end)`);
  return v;
}

/** Two VMs over the front-end with mapping on, each with a mapped CQ and a mapped RC QP, connected. */
export async function openMappedTestbed(o: { verbs: HostVerbs; host: SysHost; dir: string; table: GidTableEntry[]; rxeDevice: string; mode: Exclude<MappingMode, 'off'> }): Promise<MappedTestbed> {
  const cleanups = new Cleanups();
  const resolver = new StaticAddressResolver(o.table);
  const openVm = async (name: string): Promise<MappedVm> => {
    const device = await RdmaDevice.open({ verbs: o.verbs, hostDevice: o.rxeDevice, vmId: name, resolver, log: new RecordingLogger(name), aliases: nativeAliasMapper, hostQueueMapping: o.mode, closeFd: (fd) => o.host.close(fd) });
    cleanups.add(`${name} device`, () => device.close());
    const transport = await attachDevice({ kind: 'frontend', model: device, host: o.host, dir: o.dir, name: `${name}-mapped-${o.mode}`, cleanups, frontendRamBytes: FRONTEND_RAM_BYTES });
    const ctx = await RdmaContext.open(transport);
    cleanups.add(`${name} driver (device reset)`, () => ctx.close());
    if (ctx.driver.mapping === undefined) throw new Error(`${name}: HOST_QUEUE_MAPPING was not negotiated`);
    const pd = await ctx.allocPd();
    const buf = ctx.allocBuffer(BUFFER_BYTES, { placement: 'contiguous' });
    const bytes = ctx.driver.memory.memory.contiguous(buf.gpaOf(0), BUFFER_BYTES);
    if (bytes === undefined) throw new Error(`${name}: the buffer is not contiguous guest RAM`);
    const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
    const cq = await ctx.createCq(2 * MAPPED_TX_DEPTH + MAPPED_RECV_DEPTH, { map: true });
    const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: MAPPED_TX_DEPTH, maxRecvWr: MAPPED_RECV_DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: MAPPED_INLINE });
    return { name, device, ctx, pd, buf, bytes, mr, cq, qp };
  };
  try {
    const a = await openVm('vm-a');
    const b = await openVm('vm-b');
    await a.qp.connect({ gid: b.ctx.gid, qpn: b.qp.qpNum }, { accessFlags: ALL_ACCESS });
    await b.qp.connect({ gid: a.ctx.gid, qpn: a.qp.qpNum }, { accessFlags: ALL_ACCESS });
    for (const vm of [a, b]) {
      const want = o.mode === 'notify' ? DoorbellMode.NOTIFY : DoorbellMode.POLLED;
      if (vm.qp.doorbell.mode !== want) throw new Error(`${vm.name}: the device reports doorbell mode ${vm.qp.doorbell.mode}, not ${o.mode}`);
    }
    return { mode: o.mode, a, b, close: () => cleanups.runAll() };
  } catch (e) {
    await cleanups.runAll();
    throw e;
  }
}

/** NOTIFY mode: the front-end's kick eventfd of the QP's mapdoorbellq (the guest's notify write, as an ioeventfd). */
function kickFd(vm: MappedVm): number | undefined {
  if (vm.qp.doorbell.mode !== DoorbellMode.NOTIFY) return undefined;
  const transport = vm.ctx.driver.transport;
  if (!(transport instanceof VhostUserTransport)) throw new Error(`${vm.name}: the C loop needs the front-end's kick eventfds`);
  const fd = transport.fe.kickFds.get(vm.qp.doorbell.notifyQueue);
  if (fd === undefined) throw new Error(`${vm.name}: queue ${vm.qp.doorbell.notifyQueue} (mapdoorbellq) has no kick eventfd`);
  return fd;
}

function loopSide(vm: MappedVm, peer: MappedVm): object {
  const kick = kickFd(vm);
  return {
    ...(kick === undefined ? {} : { kick }),
    sq: view(vm.qp.sq),
    rq: view(vm.qp.rq),
    cq: view(vm.cq.queue),
    doorbell: vm.qp.doorbell.window.view?.(vm.qp.doorbell.offset, 8),
    buf: vm.bytes,
    iova: vm.mr.iova,
    lkey: vm.mr.lkey,
    peerIova: peer.mr.iova,
    rkey: peer.mr.rkey,
  };
}

let addon: LoopAddon | undefined;
function loop(): LoopAddon {
  addon ??= createRequire(import.meta.url)(ADDON) as LoopAddon;
  return addon;
}

export interface MappedFigures {
  /** One-way latencies (us): WRITE and SEND ping-pong halves; READ whole operations. */
  writeLat: number[];
  sendLat: number[];
  readLat: number[];
  /** MiB/s. */
  bw: number;
  /** The C loop only: scheduler statistics per doorbell of each latency loop (bench/doorbell/schedstat.ts). */
  sched?: Record<string, SchedSplit>;
}

/** The C loop's figures for one round. */
export function nativeLoopRound(t: MappedTestbed, size: number, latIters: number, bwSize: number, bwIters: number, warmup: number): MappedFigures {
  const cfg = (extra: object) => ({ a: loopSide(t.a, t.b), b: loopSide(t.b, t.a), ...extra });
  const us = (xs: Float64Array): number[] => Array.from(xs.subarray(Math.min(warmup, xs.length - 1)), (ns) => ns / 1000);
  // Where the time goes: the scheduler's view of the doorbell threads and of this (the guest loop's) thread, per
  // doorbell (2 per WRITE or SEND iteration, 1 per READ), as means. The engine figures sum every engine thread of
  // the process, the other mode's testbed's idle ones included (a polled engine's back-off wake-ups wait for a CPU
  // too), so they show where CPU time went, not one doorbell's path.
  let at = snapshot();
  const writeLat = us(loop().run('write_lat', cfg({ size, iters: latIters })));
  const sched: Record<string, SchedSplit> = { write: splitSince(at, 2 * latIters) };
  at = snapshot();
  const sendLat = us(loop().run('send_lat', cfg({ size, iters: latIters })));
  sched['send'] = splitSince(at, 2 * latIters);
  at = snapshot();
  const readLat = us(loop().run('read_lat', cfg({ size, iters: latIters })));
  sched['read'] = splitSince(at, latIters);
  const [elapsedNs] = loop().run('write_bw', cfg({ size: bwSize, iters: bwIters, every: BW_SIGNAL_EVERY }));
  const bw = (bwSize * bwIters) / (1 << 20) / (elapsedNs! / 1e9);
  return { writeLat, sendLat, readLat, bw, sched };
}

// ---- the reference driver (JavaScript) on the same QPs --------------------------------------------------------

async function waitByte(bytes: Uint8Array, at: number, value: number, what: string): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (bytes[at] !== value) {
    if (Date.now() > deadline) throw new Error(`${what}: the byte did not change within ${WAIT_MS} ms`);
    await yieldToLoop();
  }
}

function check(wcs: readonly WorkCompletion[], what: string): void {
  for (const wc of wcs) if (wc.status !== WcStatus.SUCCESS) throw new Error(`${what}: ${wc.opcodeName} ${wc.statusName}`);
}

async function waitCq(cq: MappedCq, count: number, what: string): Promise<WorkCompletion[]> {
  const got = await cq.spinPoll(count, WAIT_MS);
  check(got, what);
  if (got.length < count) throw new Error(`${what}: ${got.length} of ${count} completions within ${WAIT_MS} ms`);
  return got;
}

/**
 * Completions taken from a CQ while waiting for another opcode. A VM's one CQ carries its sends and its receives:
 * waiting for a RECV can take the VM's own SEND completion first, which a later wait for SEND must still find.
 */
const pending = new WeakMap<MappedCq, WorkCompletion[]>();

/** Takes completions until `count` of `opcode` came; completions of other opcodes are kept for later waits. */
async function waitOpcode(cq: MappedCq, opcode: number, count: number, what: string): Promise<void> {
  const kept = pending.get(cq) ?? [];
  pending.set(cq, kept);
  for (let seen = 0; seen < count; ) {
    const at = kept.findIndex((wc) => wc.opcode === opcode);
    if (at >= 0) {
      kept.splice(at, 1);
      seen++;
      continue;
    }
    kept.push(...(await waitCq(cq, 1, what)));
  }
}

/**
 * The reference driver's figures for one round (the JavaScript guest: MappedQp.postSend, MappedCq polling).
 * Runs BEFORE the C loop of the round: the C loop resumes from the queue headers, the driver from its own copies.
 */
export async function jsDriverRound(t: MappedTestbed, size: number, iters: number): Promise<MappedFigures> {
  const { a, b } = t;
  const RX = 0;
  const TX = 4096;
  const writeLat: number[] = [];
  for (const vm of [a, b]) vm.bytes.fill(0, RX, RX + size);
  for (let i = 0; i < iters; i++) {
    const t0 = process.hrtime.bigint();
    for (const [from, to, k] of [[a, b, 0], [b, a, 1]] as const) {
      const mark = (i * 2 + k + 1) & 0xff;
      from.bytes[TX + size - 1] = mark;
      await from.qp.postSend([{ wrId: BigInt(i), opcode: 'RDMA_WRITE', signaled: true, inline: from.bytes.slice(TX, TX + size), remoteAddr: to.mr.iova + BigInt(RX), rkey: to.mr.rkey }]);
      await waitByte(to.bytes, RX + size - 1, mark, 'js WRITE latency');
      await waitOpcode(from.cq, WcOpcode.RDMA_WRITE, 1, 'js WRITE latency');
    }
    writeLat.push(Number(process.hrtime.bigint() - t0) / 2000);
  }
  const sendLat: number[] = [];
  for (const vm of [a, b]) await vm.qp.postRecv([{ wrId: 1n, sgList: [vm.mr.sge(RX, 4096)] }]);
  for (let i = 0; i < iters; i++) {
    const t0 = process.hrtime.bigint();
    for (const [from, to] of [[a, b], [b, a]] as const) {
      await from.qp.postSend([{ wrId: 2n, opcode: 'SEND', signaled: true, inline: from.bytes.slice(TX, TX + size) }]);
      await waitOpcode(to.cq, WcOpcode.RECV, 1, 'js SEND latency');
      await to.qp.postRecv([{ wrId: 1n, sgList: [to.mr.sge(RX, 4096)] }]);
    }
    sendLat.push(Number(process.hrtime.bigint() - t0) / 2000);
    for (const vm of [a, b]) await waitOpcode(vm.cq, WcOpcode.SEND, 1, 'js SEND latency (send completion)');
  }
  const readLat: number[] = [];
  for (let i = 0; i < iters; i++) {
    const t0 = process.hrtime.bigint();
    await a.qp.postSend([{ wrId: 3n, opcode: 'RDMA_READ', signaled: true, sgList: [a.mr.sge(8192, size)], remoteAddr: b.mr.iova, rkey: b.mr.rkey }]);
    await waitOpcode(a.cq, WcOpcode.RDMA_READ, 1, 'js READ latency');
    readLat.push(Number(process.hrtime.bigint() - t0) / 1000);
  }
  // Bandwidth: as many 64 KiB WRITEs in flight as the SQ holds, one signaled per BW_SIGNAL_EVERY.
  const bwIters = iters;
  const bwSize = 64 * 1024;
  const t0 = process.hrtime.bigint();
  let signaled = 0;
  let done = 0;
  for (let i = 0; i < bwIters; i++) {
    const sig = (i + 1) % BW_SIGNAL_EVERY === 0 || i + 1 === bwIters;
    if (sig) signaled++;
    for (;;) {
      try {
        await a.qp.postSend([{ wrId: BigInt(i), opcode: 'RDMA_WRITE', signaled: sig, sgList: [a.mr.sge(0, bwSize)], remoteAddr: b.mr.iova, rkey: b.mr.rkey }]);
        break;
      } catch (e) {
        if (!(e instanceof UsageError) || !e.message.includes('do not fit')) throw e;
        const wcs = await a.cq.poll(); // the SQ is full: take completions and try again
        check(wcs, 'js WRITE bandwidth');
        done += wcs.filter((w) => w.opcode === WcOpcode.RDMA_WRITE).length;
        await yieldToLoop();
      }
    }
  }
  if (done < signaled) await waitOpcode(a.cq, WcOpcode.RDMA_WRITE, signaled - done, 'js WRITE bandwidth');
  const bw = (bwSize * bwIters) / (1 << 20) / (Number(process.hrtime.bigint() - t0) / 1e9);
  return { writeLat, sendLat, readLat, bw };
}

/** The backend's per-QP counters of both VMs: relayed work requests must be 0 for a mapped QP. */
export function relayedWorkRequests(t: MappedTestbed): number {
  let n = 0;
  for (const vm of [t.a, t.b]) for (const c of vm.device.qpCounters()) if (c.mapped) n += c.relayedWorkRequests;
  return n;
}
