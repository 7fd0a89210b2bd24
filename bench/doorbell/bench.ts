// The doorbell engine's wake modes (spec 13.6, issue 11 item 3), measured on rxe0 inside the soft-RoCE test host:
// how long from the guest's doorbell store to the RC WRITE's completion in the mapped CQ, when the doorbell is
//   direct        executed by this thread itself (engine.ring(): one system call, no hand-off): the baseline;
//   polled-hot    stored into a slot the engine's polled thread is spinning on (the previous doorbell was recent);
//   polled-idle   stored after IDLE_GAP_MS of quiet (the polled thread has backed off to sleeping);
//   notify        stored, then the kick eventfd written (what the VMM's ioeventfd does): the thread sleeps in ppoll;
// and what an idle engine costs: CPU time of this process over IDLE_MS with one attached QP and no doorbell, per
// mode, against the same process without an engine. The guest side (WQE writes, CQ polling) is this script's
// JavaScript, the same in every mode, so the differences to `direct` are the engine's hand-off. TCG: only ratios
// and differences taken in one run mean anything. Writes bench-results/doorbell.json (records: each mode's median
// against `direct` in the same run) and prints it; asserts nothing.
//
//   npm run bench:doorbell                (bench/doorbell/run.sh starts the test host)
//   VRDMA_BENCH_DOORBELL_ITERS=N          samples per case (default 300)

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { record, type BenchRecord } from '../common/results.ts';
import { snapshot, splitSince, type SchedSplit } from './schedstat.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { Access, Mtu, QpState, QpType, SendFlags, WrOpcode } from '../../vmm-device/verbs/constants.ts';
import type { DoorbellEngine, MappedQpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { eventfdCreate, eventfdWrite } from '../../vmm-device/native/sys.ts';
import { DoorbellPage, MappedQueue } from '../../test/verbs/fixture/mapped-queues.ts';

const RESULTS = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'bench-results', 'doorbell.json');
const ITERS = positiveInt('VRDMA_BENCH_DOORBELL_ITERS', 300, 100_000);
const WARMUP = 30;
const IDLE_GAP_MS = 20;
const IDLE_MS = 2000;
const SPIN_LIMIT_MS = 5000;
const GID_INDEX = 1;

function positiveInt(name: string, fallback: number, max: number): number {
  const raw = process.env[name];
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > max) throw new Error(`${name} must be an integer from 1 to ${max}, not ${raw}`);
  return n;
}

if (process.env['VRDMA_IN_TEST_HOST'] !== '1') throw new Error('bench/doorbell/bench.ts runs inside the soft-RoCE test host: npm run bench:doorbell');
const started = new Date().toISOString();

const v = new NativeVerbs();
const dev = await v.openDevice('rxe0');
const gid = (await v.queryGidTable(dev)).find((g) => g.index === GID_INDEX)!;
const pd = await v.allocPd(dev);

async function end() {
  const cq = await v.createMappedCq(dev, 64);
  const qp = await v.createMappedQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, maxSendWr: 32, maxRecvWr: 32, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
  return { cq, qp, cqQ: new MappedQueue(cq.queue), sqQ: new MappedQueue(qp.sq), rqQ: new MappedQueue(qp.rq) };
}

async function connect(qp: MappedQpHandle, remote: MappedQpHandle): Promise<void> {
  const all = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ;
  await v.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: all });
  await v.modifyQp(qp, { qpState: QpState.RTR, pathMtu: Mtu.MTU_1024, destQpNum: remote.qpNum, rqPsn: 0, maxDestRdAtomic: 1, minRnrTimer: 12, ahAttr: { portNum: 1, grh: { dgid: gid.gid, sgidIndex: GID_INDEX, hopLimit: 64 } } });
  await v.modifyQp(qp, { qpState: QpState.RTS, sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 1 });
}

const a = await end();
const b = await end();
await connect(a.qp, b.qp);
await connect(b.qp, a.qp);
const src = new ArrayBuffer(4096);
const dst = new ArrayBuffer(4096);
const mrA = await v.regMr(pd, src, { access: Access.LOCAL_WRITE });
const mrB = await v.regMr(pd, dst, { access: Access.LOCAL_WRITE | Access.REMOTE_WRITE });

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One 2-byte WRITE: ns from the doorbell to its completion seen in the mapped CQ. */
function once(ring: (value: number) => void, wrId: bigint): number {
  const c = a.cqQ.consumer;
  const value = a.sqQ.postSend({ wrId, opcode: WrOpcode.RDMA_WRITE, flags: SendFlags.SIGNALED, sge: { addr: mrA.addr, length: 2, lkey: mrA.lkey }, remoteAddr: mrB.addr, rkey: mrB.rkey });
  const t0 = process.hrtime.bigint();
  ring(value);
  const limit = t0 + BigInt(SPIN_LIMIT_MS) * 1_000_000n;
  let n = 0;
  while (a.cqQ.producer === c) if (++n % 100_000 === 0 && process.hrtime.bigint() > limit) throw new Error('no completion');
  const t1 = process.hrtime.bigint();
  const [wc] = a.cqQ.poll();
  if (wc === undefined || wc.status !== 0 || wc.wrId !== wrId) throw new Error(`bad completion ${JSON.stringify(wc, (_k, x) => (typeof x === 'bigint' ? String(x) : x))}`);
  return Number(t1 - t0);
}

/** Per case: the scheduler's view of the engine thread and the main thread, per doorbell (schedstat.ts). */
const sched: Record<string, SchedSplit> = {};

async function measure(ring: (value: number) => void, gapMs: number, name: string): Promise<{ medianUs: number; p90Us: number }> {
  const samples: number[] = [];
  const before = snapshot();
  for (let i = 0; i < WARMUP + ITERS; i++) {
    const ns = once(ring, BigInt(i + 1));
    if (i >= WARMUP) samples.push(ns);
    if (gapMs > 0) await sleep(gapMs);
    else if (i % 32 === 31) await sleep(0); // let timers run now and then
  }
  sched[name] = splitSince(before, WARMUP + ITERS);
  samples.sort((x, y) => x - y);
  const at = (q: number) => Math.round(samples[Math.floor(q * (samples.length - 1))]! / 10) / 100;
  return { medianUs: at(0.5), p90Us: at(0.9) };
}

async function idleCpuPercent(): Promise<number> {
  const before = process.cpuUsage();
  await sleep(IDLE_MS);
  const d = process.cpuUsage(before);
  return Math.round(((d.user + d.system) / 1000 / IDLE_MS) * 1000) / 10;
}

async function withEngine<T>(wake: 'polled' | 'notify', body: (e: DoorbellEngine, page: DoorbellPage) => Promise<T>): Promise<T> {
  const e = await v.createDoorbellEngine(dev, { pages: 1, wake });
  const page = new DoorbellPage(e.fd, e.size);
  e.attach(0, a.qp);
  try {
    return await body(e, page);
  } finally {
    e.detach(0);
    page.unmap();
    await e.close();
  }
}

const results: Record<string, unknown> = { iterations: ITERS, idleGapMs: IDLE_GAP_MS };
const lat: Record<string, { medianUs: number; p90Us: number }> = {};
await withEngine('polled', async (e, page) => {
  lat['direct'] = await measure(() => e.ring(0), 0, 'direct');
  lat['polled-hot'] = await measure((value) => page.ring(0, value), 0, 'polled-hot');
  lat['polled-idle'] = await measure((value) => page.ring(0, value), IDLE_GAP_MS, 'polled-idle');
  results['idleCpuPercentPolled'] = await idleCpuPercent();
});
const kick = eventfdCreate(0, { nonblock: true });
await withEngine('notify', async (e, page) => {
  e.setWakeFd(kick);
  lat['notify'] = await measure((value) => {
    page.ring(0, value);
    eventfdWrite(kick, 1n);
  }, 0, 'notify');
  lat['notify-idle'] = await measure((value) => {
    page.ring(0, value);
    eventfdWrite(kick, 1n);
  }, IDLE_GAP_MS, 'notify-idle');
  results['idleCpuPercentNotify'] = await idleCpuPercent();
});
// Measured last: at the start the process is still compiling (tsx, V8), which an idle engine would be charged for.
results['idleCpuPercentNoEngine'] = await idleCpuPercent();
results['latency'] = lat;
// Per doorbell (us; idle cases include the gap): time the engine thread and the guest's (main) thread spent on a CPU
// and runnable but waiting for one. Waiting is where a hand-off loses its time when the CPUs are shared.
results['schedPerDoorbell'] = sched;
const base = lat['direct']!.medianUs;
results['medianHandOffUs'] = Object.fromEntries(Object.entries(lat).map(([k, x]) => [k, Math.round((x.medianUs - base) * 100) / 100]));
const baselineName = `the same 2-byte RC WRITE (JavaScript guest side, mapped rxe queues on rxe0) with its doorbell executed by the measuring thread itself (engine.ring(): POST_SEND, no hand-off), p50 of ${ITERS}, same run`;
const records: BenchRecord[] = Object.entries(lat)
  .filter(([k]) => k !== 'direct')
  .map(([k, x]) => record(`doorbell_to_completion_${k.replace('-', '_')}`, x.medianUs, base, baselineName, 'us', 'lower'));
const out = {
  what: 'the doorbell engine\'s wake modes (spec 13.6, issue 11 item 3): guest doorbell store to the RC WRITE\'s completion in the mapped CQ, per mode, against executing the doorbell directly; idle CPU per mode; npm run bench:doorbell',
  started,
  written: new Date().toISOString(),
  machine: {
    where: 'soft-RoCE test host (QEMU TCG, 2 vCPUs, no KVM) on rxe0, one Node process',
    node: process.version,
    kernel: os.release(),
    test_host_cpus: os.cpus().length,
    // The machine the test host runs on (set by run.sh before the VM started): TCG figures move with its load.
    host_loadavg: process.env['VRDMA_BENCH_HOST_LOAD'] ?? 'unknown',
  },
  records,
  ...results,
};
fs.mkdirSync(path.dirname(RESULTS), { recursive: true });
fs.writeFileSync(RESULTS, JSON.stringify(out, null, 2) + '\n');
console.log(JSON.stringify(out, null, 2));
console.log(`[bench:doorbell] wrote ${RESULTS}`);

for (const x of [a, b]) {
  x.cqQ.unmap();
  x.sqQ.unmap();
  x.rqQ.unmap();
  await v.destroyQp(x.qp);
}
for (const x of [a, b]) await v.destroyCq(x.cq);
await v.deregMr(mrA);
await v.deregMr(mrB);
await v.deallocPd(pd);
await v.closeDevice(dev);
