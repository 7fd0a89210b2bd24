// `npm run bench:scale` (bench/scale/run.sh starts the soft-RoCE test host and runs this inside it): mapped-mode
// QPs per VM at scale (issue 11 item 8), against native verbs in the same run.
//
// Two VMs (A and B) are two RdmaDevice instances on ONE rxe0, each served over vhost-user to the reference
// front-end with HOST_QUEUE_MAPPING in POLLED mode (as bench/rdma/mapped.ts opens them). For each step of N QPs per
// VM: N mapped RC QPs on each VM (CREATE_QP with MAP), connected pairwise A[i] <-> B[i] (INIT/RTR/RTS in one batch
// each side), one RDMA WRITE with a byte check on a sample of the pairs, then every QP and CQ destroyed (the
// device unmaps each queue before it destroys it, spec 13.9). Then the same set-up and teardown straight on
// NativeVerbs (what the device itself calls, no guest in between) for the same number of pairs, so the set-up rate
// has a same-run baseline. Measured per phase (CQ create, QP create, connect, destroy), the process's memory (RSS,
// V8 heap, external; after a GC) before and after, its mappings (/proc/self/maps lines), and the shared-memory
// region the device declares (its sharedMemoryRegions, the plan of vmm-device/rdma/mapped/plan.ts).
//
// CQs are shared: rxe as the README and spec 12.6 describe it offers 16,384 CQs and 65,536 QPs for the whole host
// (the test host's kernel reports more: the record holds what rxe0 said). Two VMs of 16,384 QPs each with its own
// CQ would need 32,768 CQs, twice that, so QPS_PER_CQ (default 16; 1 gives each QP its own) mapped QPs share one
// mapped CQ: 1,024 CQs per VM at 16,384 QPs. The native baseline runs after the device's objects are destroyed and
// shares its CQs alike. A CQ's depth bounds its outstanding completions, not its QPs: only the sampled WRITEs
// complete here, one at a time.
//
// Under TCG JavaScript runs ~400x slower than native and the host machine is shared: only the ratios of one run
// mean anything.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AccessFlag, HostQueueFormat, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type GuestBuffer, type MappedCq, type MappedQp, type Mr, type Pd } from '../../guest-driver-spec/driver/index.ts';
import { attachDevice, Cleanups } from '../../guest-driver-spec/driver/attach.ts';
import { DEFAULT_QUOTAS, RdmaDevice, StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { DEFAULT_MAX_MAPPED_QUEUES, planMapping, type MappingPlan } from '../../vmm-device/rdma/mapped/plan.ts';
import { countMappings, MappingBudget, readMaxMapCount } from '../../vmm-device/rdma/mapping-budget.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { Access, GidType, Mtu, QpState, QpType } from '../../vmm-device/verbs/constants.ts';
import type { CqHandle, QpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { ADDRESS_TABLE, GID_INDEX, PORT, RXE_DEVICE, positiveInt } from '../common/test-host.ts';
import { record, round, type BenchRecord } from '../common/results.ts';

// ------------------------------------------------------------------------------------------------ parameters

const here = path.dirname(fileURLToPath(import.meta.url));
const RESULTS = path.resolve(here, '../../bench-results/scale.json');

/** rxe's host-wide QP limit is 65,536; two VMs of this many stay inside it with room for the native baseline. */
const MAX_QPS_PER_VM = 16_384;
const QPS = positiveInt('VRDMA_BENCH_SCALE_QPS', MAX_QPS_PER_VM, MAX_QPS_PER_VM);
const STEPS = [
  ...new Set([
    ...(process.env['VRDMA_BENCH_SCALE_STEPS'] ?? '')
      .split(',')
      .map((s) => s.trim())
      .filter((s) => s !== '')
      .map((s) => {
        const n = Number(s);
        if (!Number.isInteger(n) || n < 1 || n > QPS) throw new Error(`VRDMA_BENCH_SCALE_STEPS: '${s}' is not a whole number from 1 to ${QPS}`);
        return n;
      }),
    QPS,
  ]),
].sort((a, b) => a - b);
const QPS_PER_CQ = positiveInt('VRDMA_BENCH_SCALE_QPS_PER_CQ', 16, 1024);
const SAMPLE_EVERY = positiveInt('VRDMA_BENCH_SCALE_SAMPLE', 512, MAX_QPS_PER_VM);
/** Seconds after a step's start past which it creates no more pairs (0: no limit). */
const BUDGET_S = process.env['VRDMA_BENCH_SCALE_BUDGET_S'] === undefined ? 0 : positiveInt('VRDMA_BENCH_SCALE_BUDGET_S', 1, 86_400);
/**
 * A wall-clock deadline (Unix seconds) for the whole run: a step creates no more pairs once its set-up time so far,
 * times TEARDOWN_SHARE (destroy + the native baseline, as the 256-QP run measured: ~0.45 + ~0.1 of set-up), would
 * not fit before it. The test host is shared: the wait for it does not count in its --timeout, this does.
 */
const DEADLINE = process.env['VRDMA_BENCH_SCALE_DEADLINE'] === undefined ? 0 : positiveInt('VRDMA_BENCH_SCALE_DEADLINE', 1, 2 ** 40);
const TEARDOWN_SHARE = 0.75;
/** Progress lines every this many pairs (a run stopped by the VM's time limit still says how far it got). */
const PROGRESS_EVERY = 256;

/** Small queues: a set-up measurement needs no depth, and the depth sizes the shared-memory region (plan.ts). */
const QP_DEPTH = 16;
const CQ_DEPTH = 64;
/** Per-VM quotas of the devices: max_qp_wr and max_cqe bound the largest mapped queue, hence the region. */
const QUOTA_QP_WR = 64;
const QUOTA_CQE = 256;
const WRITE_BYTES = 64;
const BUFFER_BYTES = 64 * 1024;
const FRONTEND_RAM_BYTES = 64 << 20;
const WAIT_MS = 60_000;
const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;
const host = new SysHost();

// ------------------------------------------------------------------------------------------------ measurement

const now = (): bigint => process.hrtime.bigint();
const secondsSince = (t0: bigint): number => Number(now() - t0) / 1e9;

/** Seconds spent in each phase, summed over the step. */
interface Phases {
  cqCreate: number;
  qpCreate: number;
  connect: number;
  sample: number;
  qpDestroy: number;
  cqDestroy: number;
}
const emptyPhases = (): Phases => ({ cqCreate: 0, qpCreate: 0, connect: 0, sample: 0, qpDestroy: 0, cqDestroy: 0 });

async function timed<T>(phases: Phases, phase: keyof Phases, f: () => Promise<T>): Promise<T> {
  const t0 = now();
  try {
    return await f();
  } finally {
    phases[phase] += secondsSince(t0);
  }
}

interface Memory {
  rss: number;
  heapUsed: number;
  external: number;
  arrayBuffers: number;
  mappings: number;
}

function memory(): Memory {
  (globalThis as { gc?: () => void }).gc?.();
  const m = process.memoryUsage();
  return { rss: m.rss, heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers, mappings: countMappings() };
}

/**
 * CPU seconds (user + system) of this process's threads named `comm` (/proc/self/task/<tid>/stat fields 14 and 15,
 * in clock ticks of 100 Hz): the doorbell engines' threads ('vrdma-doorbell'), whose polled passes scan every
 * attached slot, so their share of the test host's 2 vCPUs is measured beside the set-up rate.
 */
function threadCpuSeconds(comm: string): number {
  let ticks = 0;
  try {
    for (const tid of fs.readdirSync('/proc/self/task')) {
      try {
        if (fs.readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim() !== comm) continue;
        const stat = fs.readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
        const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        ticks += Number(f[11]) + Number(f[12]);
      } catch {
        /* the thread ended meanwhile */
      }
    }
  } catch {
    return 0;
  }
  return ticks / 100;
}

/** One progress point of a step's set-up (every PROGRESS_EVERY pairs): the rate curve of the record. */
interface Progress {
  pairs: number;
  setup_s: number;
  /** Seconds the last PROGRESS_EVERY pairs took, and what they cost in CPU: the whole process, the doorbell threads. */
  window_s: number;
  window_qps_per_s: number;
  window_process_cpu_s: number;
  window_doorbell_threads_cpu_s: number;
  rss_mib: number;
  mappings: number;
}

function perQp(before: Memory, after: Memory, qps: number): Record<string, number> {
  const d = (k: keyof Memory) => round((after[k] - before[k]) / Math.max(1, qps));
  return { rss_bytes: d('rss'), heap_used_bytes: d('heapUsed'), external_bytes: d('external'), mappings: d('mappings') };
}

// ------------------------------------------------------------------------------------------------ the device side

interface Vm {
  name: string;
  device: RdmaDevice;
  ctx: RdmaContext;
  pd: Pd;
  buf: GuestBuffer;
  bytes: Uint8Array;
  mr: Mr;
}

async function openVm(name: string, verbs: NativeVerbs, dir: string, cleanups: Cleanups, maxMappedQueues: number, qps: number, cqs: number): Promise<Vm> {
  const device = await RdmaDevice.open({
    verbs,
    hostDevice: RXE_DEVICE,
    vmId: name,
    resolver: new StaticAddressResolver(ADDRESS_TABLE),
    log: new RecordingLogger(name),
    aliases: nativeAliasMapper,
    hostQueueMapping: 'polled',
    maxMappedQueues,
    // Both VMs live in this one process: the budget read from /proc at open would let the first VM take what the
    // second needs. run.sh raised vm.max_map_count; each VM gets an even share of it.
    mappings: new MappingBudget(Math.floor((readMaxMapCount() - countMappings()) / 4)),
    quotas: { maxQp: qps, maxCq: cqs, maxPd: 4, maxMr: 16, maxQpWr: QUOTA_QP_WR, maxCqe: QUOTA_CQE },
  });
  cleanups.add(`${name} device`, () => device.close());
  const transport = await attachDevice({ kind: 'frontend', model: device, host, dir, name: `${name}-scale`, cleanups, frontendRamBytes: FRONTEND_RAM_BYTES });
  const ctx = await RdmaContext.open(transport);
  cleanups.add(`${name} driver (device reset)`, () => ctx.close());
  if (ctx.driver.mapping === undefined) throw new Error(`${name}: HOST_QUEUE_MAPPING was not negotiated`);
  if (ctx.config.max_qp < qps) throw new Error(`${name}: the device offers max_qp ${ctx.config.max_qp}, below ${qps}`);
  const pd = await ctx.allocPd();
  const buf = ctx.allocBuffer(BUFFER_BYTES, { placement: 'contiguous' });
  const bytes = ctx.driver.memory.memory.contiguous(buf.gpaOf(0), BUFFER_BYTES);
  if (bytes === undefined) throw new Error(`${name}: the buffer is not contiguous guest RAM`);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { name, device, ctx, pd, buf, bytes, mr };
}

interface Pair {
  a: MappedQp;
  b: MappedQp;
  aCq: MappedCq;
}

interface DeviceStep {
  pairs: number;
  stoppedByBudget: boolean;
  phases: Phases;
  setupSeconds: number;
  samples: { checked: number; ok: number };
  memory: { before: Memory; afterSetup: Memory; afterDestroy: Memory };
  plan: MappingPlan;
  progress: Progress[];
  sharedMemoryRegions: Record<string, string>;
  config: { max_qp: number; max_cq: number; max_qp_wr: number; max_cqe: number; max_mapped_queues: number };
  relayedWorkRequests: number;
  queuesMappedPeak: number;
}

/** Bytes the sampled WRITE of pair i carries (never all zero, differs between neighbours). */
function pattern(i: number): Uint8Array {
  const p = new Uint8Array(WRITE_BYTES);
  for (let k = 0; k < WRITE_BYTES; k++) p[k] = ((i * 31 + k * 7) & 0xff) | 1;
  return p;
}

async function sampleWrite(a: Vm, b: Vm, pair: Pair, i: number): Promise<boolean> {
  const at = (i * WRITE_BYTES) % (BUFFER_BYTES / 2);
  const src = BUFFER_BYTES / 2 + at;
  const p = pattern(i);
  a.bytes.set(p, src);
  b.bytes.fill(0, at, at + WRITE_BYTES);
  await pair.a.postSend([{ wrId: BigInt(i), opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(src, WRITE_BYTES)], remoteAddr: b.mr.iova + BigInt(at), rkey: b.mr.rkey }]);
  const wcs = await pair.aCq.spinPoll(1, WAIT_MS);
  if (wcs.length !== 1) throw new Error(`pair ${i}: no completion for the sampled WRITE within ${WAIT_MS} ms`);
  if (wcs[0]!.status !== WcStatus.SUCCESS) throw new Error(`pair ${i}: sampled WRITE completed ${wcs[0]!.statusName}`);
  for (let k = 0; k < WRITE_BYTES; k++) if (b.bytes[at + k] !== p[k]) return false;
  return true;
}

async function deviceStep(verbs: NativeVerbs, n: number): Promise<DeviceStep> {
  const cqsPerVm = Math.ceil(n / QPS_PER_CQ);
  // Spec 13.13: each mapped QP maps 2 queues (SQ, RQ), each mapped CQ 1.
  const maxMappedQueues = Math.max(DEFAULT_MAX_MAPPED_QUEUES, 2 * n + cqsPerVm);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-bench-scale-'));
  const cleanups = new Cleanups();
  const phases = emptyPhases();
  try {
    const a = await openVm('vm-a', verbs, dir, cleanups, maxMappedQueues, n, cqsPerVm);
    const b = await openVm('vm-b', verbs, dir, cleanups, maxMappedQueues, n, cqsPerVm);
    const plan = planMapping(HostQueueFormat.RXE, 'polled', a.device.config, maxMappedQueues);
    if (plan === undefined) throw new Error('no mapping plan for rxe0');
    // The device's own declaration must be what the plan says (the figure recorded is the device's).
    if (a.device.sharedMemoryRegions?.get(0) !== plan.regionSize) throw new Error(`the device declares ${String(a.device.sharedMemoryRegions?.get(0))} bytes, the plan ${plan.regionSize}`);
    const regions = a.device.sharedMemoryRegions;
    const c = a.ctx.config;
    const before = memory();
    const pairs: Pair[] = [];
    const cqs: MappedCq[] = [];
    const t0 = now();
    const progress: Progress[] = [];
    let window = { t: t0, cpu: process.cpuUsage(), doorbell: threadCpuSeconds('vrdma-doorbell') };
    let stoppedByBudget = false;
    let aCq: MappedCq | undefined;
    let bCq: MappedCq | undefined;
    for (let i = 0; i < n; i++) {
      const spent = secondsSince(t0);
      if ((BUDGET_S > 0 && spent > BUDGET_S) || (DEADLINE > 0 && Date.now() / 1000 + TEARDOWN_SHARE * spent > DEADLINE)) {
        stoppedByBudget = true;
        console.log(`[bench:scale] N=${n}: time budget spent after ${i} pairs (${spent.toFixed(0)} s); sampling and destroying those`);
        break;
      }
      if (i % QPS_PER_CQ === 0) {
        aCq = await timed(phases, 'cqCreate', () => a.ctx.createCq(CQ_DEPTH, { map: true }));
        cqs.push(aCq);
        bCq = await timed(phases, 'cqCreate', () => b.ctx.createCq(CQ_DEPTH, { map: true }));
        cqs.push(bCq);
      }
      const caps = { type: 'RC', maxSendWr: QP_DEPTH, maxRecvWr: QP_DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } as const;
      const qa = await timed(phases, 'qpCreate', () => a.ctx.createQp(a.pd, { ...caps, sendCq: aCq!, recvCq: aCq! }));
      const qb = await timed(phases, 'qpCreate', () => b.ctx.createQp(b.pd, { ...caps, sendCq: bCq!, recvCq: bCq! }));
      pairs.push({ a: qa, b: qb, aCq: aCq! });
      await timed(phases, 'connect', async () => {
        await qa.connect({ gid: b.ctx.gid, qpn: qb.qpNum }, { accessFlags: ALL_ACCESS, pathMtu: Mtu.MTU_1024 });
        await qb.connect({ gid: a.ctx.gid, qpn: qa.qpNum }, { accessFlags: ALL_ACCESS, pathMtu: Mtu.MTU_1024 });
      });
      if ((i + 1) % PROGRESS_EVERY === 0) {
        const s = secondsSince(t0);
        const cpu = process.cpuUsage(window.cpu);
        const doorbell = threadCpuSeconds('vrdma-doorbell');
        const w = secondsSince(window.t);
        const point: Progress = {
          pairs: i + 1,
          setup_s: round(s),
          window_s: round(w),
          window_qps_per_s: round((2 * PROGRESS_EVERY) / w),
          window_process_cpu_s: round((cpu.user + cpu.system) / 1e6),
          window_doorbell_threads_cpu_s: round(doorbell - window.doorbell),
          rss_mib: Math.round(process.memoryUsage().rss / 2 ** 20),
          mappings: countMappings(),
        };
        progress.push(point);
        window = { t: now(), cpu: process.cpuUsage(), doorbell };
        console.log(
          `[bench:scale] N=${n}: ${i + 1} pairs set up in ${s.toFixed(1)} s (${((2 * (i + 1)) / s).toFixed(2)} QPs/s; last ${PROGRESS_EVERY}: ${point.window_qps_per_s} QPs/s, ` +
            `CPU ${point.window_process_cpu_s} s of which doorbell threads ${point.window_doorbell_threads_cpu_s} s), rss ${point.rss_mib} MiB, mappings ${point.mappings}`,
        );
      }
    }
    const setupSeconds = secondsSince(t0);
    const queuesMappedPeak = a.device.counters.queuesMapped + b.device.counters.queuesMapped;
    const afterSetup = memory();
    const samples = { checked: 0, ok: 0 };
    for (let i = 0; i < pairs.length; i++) {
      if (i % SAMPLE_EVERY !== 0 && i !== pairs.length - 1) continue;
      samples.checked++;
      if (await timed(phases, 'sample', () => sampleWrite(a, b, pairs[i]!, i))) samples.ok++;
    }
    let relayed = 0;
    for (const vm of [a, b]) for (const q of vm.device.qpCounters()) if (q.mapped) relayed += q.relayedWorkRequests;
    console.log(`[bench:scale] N=${n}: ${pairs.length} pairs in ${setupSeconds.toFixed(1)} s; sampled WRITEs ${samples.ok}/${samples.checked} byte-exact; destroying`);
    const td = now();
    for (const p of pairs) {
      await timed(phases, 'qpDestroy', () => p.a.destroy());
      await timed(phases, 'qpDestroy', () => p.b.destroy());
    }
    for (const cq of cqs) await timed(phases, 'cqDestroy', () => cq.destroy());
    console.log(`[bench:scale] N=${n}: destroyed in ${secondsSince(td).toFixed(1)} s`);
    const afterDestroy = memory();
    return {
      pairs: pairs.length,
      stoppedByBudget,
      phases,
      setupSeconds,
      samples,
      memory: { before, afterSetup, afterDestroy },
      plan,
      progress,
      sharedMemoryRegions: Object.fromEntries([...(regions ?? new Map<number, bigint>())].map(([id, bytes]) => [String(id), bytes.toString()])),
      config: { max_qp: c.max_qp, max_cq: c.max_cq, max_qp_wr: c.max_qp_wr, max_cqe: c.max_cqe, max_mapped_queues: c.max_mapped_queues ?? 0 },
      relayedWorkRequests: relayed,
      queuesMappedPeak,
    };
  } finally {
    const errors = await cleanups.runAll();
    for (const e of errors) console.log(`[bench:scale] cleanup: ${e}`);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------------------------------------ the native side

interface NativeStep {
  pairs: number;
  phases: Phases;
  setupSeconds: number;
}

/** The same pairs straight on NativeVerbs: CQs shared alike, create, INIT/RTR/RTS both sides, destroy. */
async function nativeStep(verbs: NativeVerbs, pairsWanted: number): Promise<NativeStep> {
  const device = await verbs.openDevice(RXE_DEVICE);
  const gid = (await verbs.queryGidTable(device)).find((g) => g.index === GID_INDEX && g.type === GidType.ROCE_V2);
  if (gid === undefined) throw new Error(`${RXE_DEVICE} has no RoCE v2 GID at index ${GID_INDEX}`);
  const pd = await verbs.allocPd(device);
  const phases = emptyPhases();
  const cqs: CqHandle[] = [];
  const qps: QpHandle[] = [];
  const init = (cq: CqHandle) => ({ qpType: QpType.RC, sendCq: cq, recvCq: cq, maxSendWr: QP_DEPTH, maxRecvWr: QP_DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
  const connect = async (qp: QpHandle, peer: number) => {
    await verbs.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: PORT, qpAccessFlags: Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ });
    await verbs.modifyQp(qp, { qpState: QpState.RTR, pathMtu: Mtu.MTU_1024, destQpNum: peer, rqPsn: 0, maxDestRdAtomic: 1, minRnrTimer: 12, ahAttr: { portNum: PORT, grh: { dgid: gid.gid, sgidIndex: GID_INDEX, hopLimit: 64 } } });
    await verbs.modifyQp(qp, { qpState: QpState.RTS, sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 1 });
  };
  const t0 = now();
  try {
    let aCq: CqHandle | undefined;
    let bCq: CqHandle | undefined;
    for (let i = 0; i < pairsWanted; i++) {
      if (i % QPS_PER_CQ === 0) {
        aCq = await timed(phases, 'cqCreate', () => verbs.createCq(device, CQ_DEPTH));
        cqs.push(aCq);
        bCq = await timed(phases, 'cqCreate', () => verbs.createCq(device, CQ_DEPTH));
        cqs.push(bCq);
      }
      const qa = await timed(phases, 'qpCreate', () => verbs.createQp(pd, init(aCq!)));
      qps.push(qa);
      const qb = await timed(phases, 'qpCreate', () => verbs.createQp(pd, init(bCq!)));
      qps.push(qb);
      await timed(phases, 'connect', async () => {
        await connect(qa, qb.qpNum);
        await connect(qb, qa.qpNum);
      });
    }
    const setupSeconds = secondsSince(t0);
    console.log(`[bench:scale] native: ${pairsWanted} pairs in ${setupSeconds.toFixed(1)} s`);
    return { pairs: pairsWanted, phases, setupSeconds };
  } finally {
    for (const qp of qps) await timed(phases, 'qpDestroy', () => verbs.destroyQp(qp));
    for (const cq of cqs) await timed(phases, 'cqDestroy', () => verbs.destroyCq(cq));
    await verbs.deallocPd(pd);
    await verbs.closeDevice(device);
  }
}

// ------------------------------------------------------------------------------------------------ the record

function phaseRecord(p: Phases, qps: number): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, s] of Object.entries(p)) out[`${k}_s`] = round(s);
  out['per_qp_setup_ms'] = round(((p.cqCreate + p.qpCreate + p.connect) / Math.max(1, qps)) * 1000);
  out['per_qp_destroy_ms'] = round(((p.qpDestroy + p.cqDestroy) / Math.max(1, qps)) * 1000);
  return out;
}

function whereTheTimeGoes(d: DeviceStep, n: NativeStep): string {
  const share = (p: Phases) => {
    const setup = p.cqCreate + p.qpCreate + p.connect;
    return `CQ create ${((100 * p.cqCreate) / setup).toFixed(0)}%, QP create ${((100 * p.qpCreate) / setup).toFixed(0)}%, connect ${((100 * p.connect) / setup).toFixed(0)}%`;
  };
  const ratio = (k: keyof Phases) => (n.phases[k] > 0 ? (d.phases[k] / d.pairs / (n.phases[k] / n.pairs)).toFixed(1) : 'n/a');
  return (
    `device set-up: ${share(d.phases)}; native: ${share(n.phases)}. Per pair, device/native: QP create ${ratio('qpCreate')}x, ` +
    `connect ${ratio('connect')}x, QP destroy ${ratio('qpDestroy')}x. A mapped CREATE_QP is one control round trip (driver -> front-end ` +
    `kick -> the device's JavaScript -> raw uverbs create -> two SHMEM_MAPs the front-end answers by mmap) on top of the host verb; ` +
    `a connect is one batch (INIT/RTR/RTS, one round trip, VPC translation at RTR) per side on top of three modify verbs; a destroy ` +
    `unmaps both queues (two SHMEM_UNMAPs confirmed) before DESTROY_QP. Everything but the host verbs is JavaScript, ~400x slower under TCG.`
  );
}

function machine(): Record<string, unknown> {
  return {
    where: 'soft-RoCE test host (QEMU TCG, 2 vCPUs, no KVM) on rxe0; both VMs = two RdmaDevice instances and two reference front-ends in one Node process',
    node: process.version,
    kernel: os.release(),
    test_host_cpus: os.cpus().length,
    test_host_memory_bytes: os.totalmem(),
    test_host_loadavg_at_end: os.loadavg().map((x) => round(x)),
    host_machine_loadavg_at_start: process.env['VRDMA_BENCH_HOST_LOAD'] ?? 'unknown',
    host_machine_cpus: process.env['VRDMA_BENCH_HOST_CPUS'] ?? 'unknown',
    vm_max_map_count: readMaxMapCount(),
  };
}

async function main(): Promise<number> {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1') {
    console.error('bench/scale/bench.ts runs inside the soft-RoCE test host: npm run bench:scale');
    return 2;
  }
  const verbs = new NativeVerbs();
  const probe = await verbs.openDevice(RXE_DEVICE);
  const attr = await verbs.queryDevice(probe);
  const rxe = { max_qp: attr.maxQp, max_cq: attr.maxCq, max_qp_wr: attr.maxQpWr, max_cqe: attr.maxCqe };
  await verbs.closeDevice(probe);
  console.log(`[bench:scale] ${new Date().toISOString()} (deadline ${DEADLINE > 0 ? new Date(DEADLINE * 1000).toISOString() : "none"})`);
  console.log(`[bench:scale] rxe0: max_qp ${rxe.max_qp}, max_cq ${rxe.max_cq}; steps ${STEPS.join(', ')} QPs per VM, ${QPS_PER_CQ} QPs per CQ, a WRITE on every ${SAMPLE_EVERY}th pair`);
  const steps: Record<string, unknown>[] = [];
  const records: BenchRecord[] = [];
  const started = new Date().toISOString();
  const write = (extra: Record<string, unknown> = {}) => {
    const out = {
      what: 'mapped-mode scale (issue 11 item 8): N mapped RC QPs per VM on two VMs, connected pairwise, one WRITE with a byte check on a sample, destroyed; the same set-up on NativeVerbs in the same run; npm run bench:scale',
      started,
      written: new Date().toISOString(),
      machine: machine(),
      rxe0_limits: rxe,
      decisions: {
        qps_per_cq: QPS_PER_CQ,
        why_shared_cqs: `rxe0 offers ${rxe.max_cq} CQs and ${rxe.max_qp} QPs for the whole host; 2 VMs x ${MAX_QPS_PER_VM} QPs with one CQ each would need ${2 * MAX_QPS_PER_VM} CQs. ${QPS_PER_CQ} mapped QPs share a mapped CQ (only the sampled WRITEs complete, one at a time)`,
        queue_depths: { qp_send_recv_wr: QP_DEPTH, cq_cqe: CQ_DEPTH, quota_max_qp_wr: QUOTA_QP_WR, quota_max_cqe: QUOTA_CQE },
        max_mapped_queues: '2 per QP + 1 per CQ (spec 13.13), at least the default 3,072',
        sample_every: SAMPLE_EVERY,
        budget_s: BUDGET_S,
        deadline_unix_s: DEADLINE,
        only_ratios_mean_anything: 'JavaScript under TCG runs ~400x slower than native; C (rxe, libibverbs) a few times',
      },
      region_sizing: regionSizing(),
      steps,
      records,
      ...extra,
    };
    fs.mkdirSync(path.dirname(RESULTS), { recursive: true });
    fs.writeFileSync(RESULTS, JSON.stringify(out, null, 2) + '\n');
  };
  for (const n of STEPS) {
    console.log(`[bench:scale] step N=${n} QPs per VM: through the device (mapped)...`);
    const d = await deviceStep(verbs, n);
    console.log(`[bench:scale] step N=${n}: native verbs, ${d.pairs} pairs...`);
    const nat = await nativeStep(verbs, d.pairs);
    const qps = 2 * d.pairs;
    const devRate = qps / (d.phases.cqCreate + d.phases.qpCreate + d.phases.connect);
    const natRate = qps / (nat.phases.cqCreate + nat.phases.qpCreate + nat.phases.connect);
    const mem = perQp(d.memory.before, d.memory.afterSetup, qps);
    const step = {
      qps_per_vm_asked: n,
      qps_per_vm_done: d.pairs,
      completed: !d.stoppedByBudget,
      qps_total: qps,
      cqs_total: 2 * Math.ceil(d.pairs / QPS_PER_CQ),
      device: {
        setup_qps_per_s: round(devRate),
        setup_wall_s: round(d.setupSeconds),
        phases: phaseRecord(d.phases, qps),
        sampled_writes: d.samples,
        relayed_work_requests_of_mapped_qps: d.relayedWorkRequests,
        queues_mapped_peak: d.queuesMappedPeak,
        config: d.config,
      },
      native: { setup_qps_per_s: round(natRate), setup_wall_s: round(nat.setupSeconds), phases: phaseRecord(nat.phases, qps) },
      setup_rate_ratio_device_over_native: round(devRate / natRate),
      memory: {
        note: 'the bench process holds both devices, both front-ends and both guest drivers: per-QP figures are an upper bound on the backend alone; the mapped queues themselves are rxe kernel memory, counted in RSS only for pages the front-end touched',
        before: d.memory.before,
        after_setup: d.memory.afterSetup,
        after_destroy: d.memory.afterDestroy,
        per_qp: mem,
        mappings_per_qp: mem['mappings'] ?? 0,
        left_after_destroy_bytes_rss: d.memory.afterDestroy.rss - d.memory.before.rss,
        left_after_destroy_mappings: d.memory.afterDestroy.mappings - d.memory.before.mappings,
      },
      region: {
        shared_memory_regions: d.sharedMemoryRegions,
        plan: Object.fromEntries(Object.entries(d.plan).map(([k, v]) => [k, typeof v === 'bigint' ? v.toString() : v])),
      },
      where_the_time_goes: whereTheTimeGoes(d, nat),
      progress: d.progress,
    };
    steps.push(step);
    records.push(
      record(
        `mapped_qp_setup_rate_${d.pairs}_per_vm`,
        devRate,
        natRate,
        `create QP + INIT/RTR/RTS straight on NativeVerbs (libibverbs) on rxe0, ${qps} QPs (${d.pairs} pairs, ${QPS_PER_CQ} per CQ), same run after the device's; ours: mapped RC QPs through the reference front-end (CREATE_QP with MAP, INIT/RTR/RTS in one batch per side)`,
        'QPs/s',
        'higher',
      ),
    );
    console.log(
      `[bench:scale] N=${d.pairs}: device ${devRate.toFixed(2)} QPs/s vs native ${natRate.toFixed(2)} QPs/s (${(devRate / natRate).toFixed(3)}x); ` +
        `per QP: rss ${mem['rss_bytes']} B, heap ${mem['heap_used_bytes']} B, mappings ${mem['mappings']}; region ${JSON.stringify(step.region.shared_memory_regions)}`,
    );
    write();
    if (d.stoppedByBudget) break;
  }
  write(extrapolation(steps));
  return 0;
}

/** When the largest step did not reach MAX_QPS_PER_VM: its per-pair figures carried linearly to it, labelled so. */
function extrapolation(steps: Record<string, unknown>[]): Record<string, unknown> {
  const last = steps.at(-1) as undefined | { qps_per_vm_done: number; device: { setup_qps_per_s: number; phases: Record<string, number> }; native: { setup_qps_per_s: number }; memory: { per_qp: Record<string, number> } };
  if (last === undefined || last.qps_per_vm_done >= MAX_QPS_PER_VM) return {};
  const qps = 2 * MAX_QPS_PER_VM;
  const perQpDestroyS = (last.device.phases['per_qp_destroy_ms'] ?? 0) / 1000;
  return {
    extrapolation: {
      label: `EXTRAPOLATED, not measured: ${MAX_QPS_PER_VM} QPs per VM from the largest step run (${last.qps_per_vm_done} per VM), linear in N at that step's per-QP figures`,
      device_setup_s: round(qps / last.device.setup_qps_per_s),
      device_destroy_s: round(qps * perQpDestroyS),
      native_setup_s: round(qps / last.native.setup_qps_per_s),
      rss_bytes: round(qps * (last.memory.per_qp['rss_bytes'] ?? 0)),
      mappings: round(qps * (last.memory.per_qp['mappings'] ?? 0)),
    },
  };
}

/** The region the device would declare for 16,384 QPs per VM, with this bench's depths and with the default quotas. */
function regionSizing(): Record<string, unknown> {
  const cfg = (qpWr: number, cqe: number) => ({ max_qp: MAX_QPS_PER_VM, max_qp_wr: qpWr, max_cqe: cqe, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 });
  const queues = 2 * MAX_QPS_PER_VM + Math.ceil(MAX_QPS_PER_VM / QPS_PER_CQ);
  const plan = (qpWr: number, cqe: number, q: number) => {
    try {
      const p = planMapping(HostQueueFormat.RXE, 'polled', cfg(qpWr, cqe), q);
      return p === undefined ? 'no plan' : Object.fromEntries(Object.entries(p).map(([k, v]) => [k, typeof v === 'bigint' ? v.toString() : v]));
    } catch (e) {
      return `refused: ${(e as Error).message}`;
    }
  };
  return {
    rule: 'plan.ts: region = doorbell pages (one 8-byte slot per mapped QP) + max_mapped_queues x the largest queue the configuration allows (SQ of max_qp_wr, RQ likewise, CQ of max_cqe, in rxe geometry); guest-physical address space only (a BAR), capped at 64 GiB',
    note: 'sge counts taken as 1 here: the step records hold the plan the device itself declared',
    for_16384_qps_bench_depths: plan(QUOTA_QP_WR, QUOTA_CQE, queues),
    for_16384_qps_default_quotas: plan(DEFAULT_QUOTAS.maxQpWr, DEFAULT_QUOTAS.maxCqe, queues),
    for_16384_qps_own_cq_default_quotas: plan(DEFAULT_QUOTAS.maxQpWr, DEFAULT_QUOTAS.maxCqe, 3 * MAX_QPS_PER_VM),
  };
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error('[bench:scale] failed:', e);
    process.exit(1);
  },
);
