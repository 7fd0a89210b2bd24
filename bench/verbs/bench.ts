// RDMA WRITE latency (2-byte messages, ping-pong) and bandwidth (64 KiB messages) through the HostVerbs
// TypeScript interface, against perftest's ib_write_lat / ib_write_bw on the same rxe0 in the same run.
// Runs inside the soft-RoCE test host (bench/verbs/run.sh starts it); writes bench-results/verbs.json.
//
// Both sides measure the same thing the same way: ping-pong latency is half the round trip of one WRITE each
// way, each side spinning on the last byte of its receive buffer (what ib_write_lat does), reported as the
// median ("typical") and the mean; bandwidth is bytes written / elapsed time with 128 WRITEs in flight and one
// signaled completion per batch, in MiB/s (perftest's "MB/sec" is 2^20 bytes per second).
// TCG makes absolute numbers meaningless: only the ratio, taken in the same VM run, says anything. Rounds
// alternate ours and perftest; each side's median round is reported.

import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { Access, GidType, Mtu, QpState, QpType, SendFlags, WcStatus, WrOpcode, wcStatusName } from '../../vmm-device/verbs/constants.ts';
import type { CqHandle, DeviceHandle, GidEntry, MrHandle, PdHandle, QpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { SendWrList, WcBuffer } from '../../vmm-device/verbs/layout.ts';

const DEVICE = 'rxe0';
const PORT = 1;
const GID_INDEX = 1;
const LAT_SIZE = 2;
const LAT_ITERS = Number(process.env['VRDMA_BENCH_LAT_ITERS'] ?? 1000);
const BW_SIZE = 64 * 1024;
const BW_ITERS = Number(process.env['VRDMA_BENCH_BW_ITERS'] ?? 2000);
const ROUNDS = Number(process.env['VRDMA_BENCH_ROUNDS'] ?? 3);
/** WRITEs in flight in the bandwidth test (perftest's default tx depth). */
const TX_DEPTH = 128;
/** One signaled WRITE per this many (the rest unsignaled), in both tests. */
const SIGNAL_EVERY = 32;
/** WRITEs per post call in the bandwidth test (perftest posts one at a time by default). */
const POST_LIST = Number(process.env['VRDMA_BENCH_POST_LIST'] ?? 1);
/** Inline data for the 2-byte latency messages (perftest inlines small messages too). */
const MAX_INLINE = 64;
const PERFTEST_PORT_BASE = 18515;
/** A spinning wait gives up after this long (a lost message would otherwise hang the run). */
const SPIN_LIMIT_MS = 10_000;
/**
 * Spinning loops read the clock only this often: under TCG a clock read may be an emulated device access that
 * competes with the very kernel work being measured.
 */
const CLOCK_CHECK_EVERY = 100_000;

const here = path.dirname(fileURLToPath(import.meta.url));
const RESULTS = path.resolve(here, '../../bench-results/verbs.json');

const verbs = new NativeVerbs();

interface Side {
  qp: QpHandle;
  cq: CqHandle;
  mem: ArrayBuffer;
  mr: MrHandle;
}

async function connect(qp: QpHandle, remote: QpHandle, gid: GidEntry): Promise<void> {
  const all = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ;
  await verbs.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: PORT, qpAccessFlags: all });
  await verbs.modifyQp(qp, {
    qpState: QpState.RTR,
    pathMtu: Mtu.MTU_1024,
    destQpNum: remote.qpNum,
    rqPsn: 0,
    maxDestRdAtomic: 1,
    minRnrTimer: 12,
    ahAttr: { portNum: PORT, grh: { dgid: gid.gid, sgidIndex: GID_INDEX, hopLimit: 64 } },
  });
  await verbs.modifyQp(qp, { qpState: QpState.RTS, sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 1 });
}

async function setup(memBytes: number): Promise<{ device: DeviceHandle; pd: PdHandle; a: Side; b: Side; close: () => Promise<void> }> {
  const device = await verbs.openDevice(DEVICE);
  const gid = (await verbs.queryGidTable(device)).find((g) => g.index === GID_INDEX && g.type === GidType.ROCE_V2);
  if (gid === undefined) throw new Error(`${DEVICE} has no RoCE v2 GID at index ${GID_INDEX}`);
  const pd = await verbs.allocPd(device);
  const sides: Side[] = [];
  for (let i = 0; i < 2; i++) {
    const cq = await verbs.createCq(device, 2 * TX_DEPTH);
    const qp = await verbs.createQp(pd, {
      qpType: QpType.RC,
      sendCq: cq,
      recvCq: cq,
      maxSendWr: TX_DEPTH,
      maxRecvWr: 1,
      maxSendSge: 1,
      maxRecvSge: 1,
      maxInlineData: MAX_INLINE,
    });
    const mem = new ArrayBuffer(memBytes);
    const mr = await verbs.regMr(pd, mem, { access: Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ });
    sides.push({ qp, cq, mem, mr });
  }
  const [a, b] = sides as [Side, Side];
  await connect(a.qp, b.qp, gid);
  await connect(b.qp, a.qp, gid);
  const close = async () => {
    for (const s of sides) {
      await verbs.destroyQp(s.qp);
      await verbs.deregMr(s.mr);
      await verbs.destroyCq(s.cq);
    }
    await verbs.deallocPd(pd);
    await verbs.closeDevice(device);
  };
  return { device, pd, a, b, close };
}

function checkCompletions(wcs: WcBuffer, n: number): void {
  for (let i = 0; i < n; i++)
    if (wcs.status(i) !== WcStatus.SUCCESS) throw new Error(`RDMA WRITE failed: ${wcStatusName(wcs.status(i))}`);
}

function median(xs: number[]): number {
  const s = [...xs].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Ping-pong: A writes to B, B sees it and writes back, A sees that. Returns one-way latencies in microseconds. */
async function ourLatency(): Promise<{ typical: number; avg: number }> {
  // Each side's memory: [0, LAT_SIZE) is what it sends, [4096, 4096 + LAT_SIZE) is where the peer writes.
  const RECV_AT = 4096;
  const { a, b, close } = await setup(8192);
  try {
    const lists = (from: Side, to: Side, signaled: boolean) =>
      new SendWrList(1).push({
        wrId: 1,
        opcode: WrOpcode.RDMA_WRITE,
        sendFlags: SendFlags.INLINE | (signaled ? SendFlags.SIGNALED : 0),
        remoteAddr: to.mr.addr + BigInt(RECV_AT),
        rkey: to.mr.rkey,
        sgList: [{ addr: from.mr.addr, length: LAT_SIZE, lkey: from.mr.lkey }],
      });
    const aPlain = lists(a, b, false);
    const aSignaled = lists(a, b, true);
    const bPlain = lists(b, a, false);
    const bSignaled = lists(b, a, true);
    const aSend = new Uint8Array(a.mem, 0, LAT_SIZE);
    const bSend = new Uint8Array(b.mem, 0, LAT_SIZE);
    const aRecv = new Uint8Array(a.mem, RECV_AT, LAT_SIZE);
    const bRecv = new Uint8Array(b.mem, RECV_AT, LAT_SIZE);
    const last = LAT_SIZE - 1;
    const wcs = new WcBuffer(16);
    const spin = (view: Uint8Array, want: number) => {
      const start = Date.now();
      let n = 0;
      // Atomics.load: the load is never hoisted out of the loop; the kernel writes this memory.
      while (Atomics.load(view, last) !== want) {
        if (++n % CLOCK_CHECK_EVERY === 0 && Date.now() - start > SPIN_LIMIT_MS) throw new Error('a WRITE never arrived');
      }
    };
    const reap = (side: Side) => {
      const n = verbs.pollCq(side.cq, wcs);
      checkCompletions(wcs, n);
    };
    const samples: number[] = [];
    const warmup = Math.min(100, LAT_ITERS >> 2);
    for (let i = 0; i < LAT_ITERS + warmup; i++) {
      const value = (i % 255) + 1; // never 0, and different from the previous iteration's
      const signaled = i % SIGNAL_EVERY === SIGNAL_EVERY - 1;
      const t0 = process.hrtime.bigint();
      aSend[last] = value;
      verbs.postSend(a.qp, signaled ? aSignaled : aPlain);
      spin(bRecv, value);
      bSend[last] = value;
      verbs.postSend(b.qp, signaled ? bSignaled : bPlain);
      spin(aRecv, value);
      const t1 = process.hrtime.bigint();
      if (i >= warmup) samples.push(Number(t1 - t0) / 2000); // half the round trip, in us
      if (signaled) {
        reap(a);
        reap(b);
      }
    }
    // Every signaled WRITE has completed by the time its echo arrived; collect what is left.
    reap(a);
    reap(b);
    return { typical: median(samples), avg: samples.reduce((s, x) => s + x, 0) / samples.length };
  } finally {
    await close();
  }
}

/** A streams BW_ITERS WRITEs of BW_SIZE to B, TX_DEPTH in flight. Returns MiB/s. */
async function ourBandwidth(): Promise<number> {
  const { a, b, close } = await setup(BW_SIZE);
  try {
    // POST_LIST WRITEs per post call; every SIGNAL_EVERY-th WRITE is signaled (one completion per group).
    const list = (signalLast: boolean) => {
      const l = new SendWrList(POST_LIST);
      for (let i = 0; i < POST_LIST; i++)
        l.push({
          wrId: i,
          opcode: WrOpcode.RDMA_WRITE,
          sendFlags: signalLast && i === POST_LIST - 1 ? SendFlags.SIGNALED : 0,
          remoteAddr: b.mr.addr,
          rkey: b.mr.rkey,
          sgList: [{ addr: a.mr.addr, length: BW_SIZE, lkey: a.mr.lkey }],
        });
      return l;
    };
    const plain = list(false);
    const signaled = list(true);
    const total = Math.ceil(BW_ITERS / SIGNAL_EVERY) * SIGNAL_EVERY;
    const wcs = new WcBuffer(16);
    let posted = 0;
    let completed = 0;
    const start = process.hrtime.bigint();
    let lastProgress = Date.now();
    let idlePolls = 0;
    while (completed < total) {
      while (posted < total && posted + POST_LIST - completed <= TX_DEPTH) {
        posted += POST_LIST;
        verbs.postSend(a.qp, posted % SIGNAL_EVERY === 0 ? signaled : plain);
      }
      const n = verbs.pollCq(a.cq, wcs);
      if (n > 0) {
        checkCompletions(wcs, n);
        completed += n * SIGNAL_EVERY;
        idlePolls = 0;
        lastProgress = Date.now();
      } else if (++idlePolls % CLOCK_CHECK_EVERY === 0 && Date.now() - lastProgress > SPIN_LIMIT_MS) {
        throw new Error(`bandwidth run stalled at ${completed}/${total} WRITEs`);
      }
    }
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    return (total * BW_SIZE) / seconds / 2 ** 20;
  } finally {
    await close();
  }
}

function run(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? 1, out }));
  });
}

let perftestPort = PERFTEST_PORT_BASE;

/** Runs a perftest server and its client on rxe0 (GID index 1); returns the client's output. */
async function perftest(tool: string, args: string[]): Promise<string> {
  const port = String(perftestPort++);
  const common = ['-d', DEVICE, '-x', String(GID_INDEX), '-F', '-p', port, ...args];
  const server = run(tool, common);
  // The server needs a moment to listen; the client retries its connection until it does.
  let client: { code: number; out: string } | undefined;
  for (let attempt = 0; attempt < 60; attempt++) {
    await new Promise((r) => setTimeout(r, 500));
    client = await run(tool, [...common, '127.0.0.1']);
    if (client.code === 0 || !/Couldn't connect|Unable to open file descriptor|Connection refused/i.test(client.out)) break;
  }
  const s = await server;
  if (client === undefined || client.code !== 0 || s.code !== 0)
    throw new Error(`${tool} failed:\n--- client\n${client?.out}\n--- server\n${s.out}`);
  return client.out;
}

async function perftestLatency(): Promise<{ typical: number; avg: number }> {
  const out = await perftest('ib_write_lat', ['-s', String(LAT_SIZE), '-n', String(LAT_ITERS)]);
  // #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
  const m = new RegExp(`^\\s*${LAT_SIZE}\\s+${LAT_ITERS}\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)`, 'm').exec(out);
  if (m === null) throw new Error(`cannot read ib_write_lat's result:\n${out}`);
  return { typical: Number(m[3]), avg: Number(m[4]) };
}

async function perftestBandwidth(): Promise<number> {
  const out = await perftest('ib_write_bw', ['-s', String(BW_SIZE), '-n', String(BW_ITERS)]);
  // #bytes #iterations BW_peak BW_average MsgRate
  const m = new RegExp(`^\\s*${BW_SIZE}\\s+${BW_ITERS}\\s+([\\d.]+)\\s+([\\d.]+)`, 'm').exec(out);
  if (m === null) throw new Error(`cannot read ib_write_bw's result:\n${out}`);
  return Number(m[2]);
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

async function main(): Promise<void> {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1')
    throw new Error('bench/verbs/bench.ts runs inside the soft-RoCE test host: use `npm run bench:verbs`');
  if (!(Number.isInteger(POST_LIST) && POST_LIST >= 1 && SIGNAL_EVERY % POST_LIST === 0))
    throw new Error(`VRDMA_BENCH_POST_LIST must divide ${SIGNAL_EVERY}`);
  const lat = { ours: [] as { typical: number; avg: number }[], base: [] as { typical: number; avg: number }[] };
  const bw = { ours: [] as number[], base: [] as number[] };
  for (let r = 0; r < ROUNDS; r++) {
    lat.ours.push(await ourLatency());
    lat.base.push(await perftestLatency());
    bw.ours.push(await ourBandwidth());
    bw.base.push(await perftestBandwidth());
    console.log(
      `round ${r + 1}/${ROUNDS}: latency typical ours ${lat.ours[r]!.typical.toFixed(2)} us, ib_write_lat ${lat.base[r]!.typical.toFixed(2)} us; ` +
        `avg ours ${lat.ours[r]!.avg.toFixed(2)} us, ib_write_lat ${lat.base[r]!.avg.toFixed(2)} us; ` +
        `bandwidth ours ${bw.ours[r]!.toFixed(2)} MiB/s, ib_write_bw ${bw.base[r]!.toFixed(2)} MiB/s`,
    );
  }
  const latOursTyp = median(lat.ours.map((x) => x.typical));
  const latBaseTyp = median(lat.base.map((x) => x.typical));
  const latOursAvg = median(lat.ours.map((x) => x.avg));
  const latBaseAvg = median(lat.base.map((x) => x.avg));
  const bwOurs = median(bw.ours);
  const bwBase = median(bw.base);
  const results = [
    {
      metric: `rdma_write_latency_${LAT_SIZE}B_typical`,
      ours: round3(latOursTyp),
      baseline: round3(latBaseTyp),
      baseline_name: `perftest ib_write_lat -d rxe0 -x 1 -s ${LAT_SIZE} -n ${LAT_ITERS} (t_typical), same VM run`,
      ratio: round3(latOursTyp / latBaseTyp),
      unit: 'us',
      better: 'lower',
    },
    {
      metric: `rdma_write_latency_${LAT_SIZE}B_avg`,
      ours: round3(latOursAvg),
      baseline: round3(latBaseAvg),
      baseline_name: `perftest ib_write_lat -d rxe0 -x 1 -s ${LAT_SIZE} -n ${LAT_ITERS} (t_avg), same VM run`,
      ratio: round3(latOursAvg / latBaseAvg),
      unit: 'us',
      better: 'lower',
    },
    {
      metric: 'rdma_write_bandwidth_64KiB',
      ours: round3(bwOurs),
      baseline: round3(bwBase),
      baseline_name: `perftest ib_write_bw -d rxe0 -x 1 -s ${BW_SIZE} -n ${BW_ITERS} (BW average), same VM run`,
      ratio: round3(bwOurs / bwBase),
      unit: 'MiB/s',
      better: 'higher',
    },
  ];
  mkdirSync(path.dirname(RESULTS), { recursive: true });
  writeFileSync(RESULTS, JSON.stringify(results, null, 2) + '\n');
  console.log(JSON.stringify(results, null, 2));
  console.log(`wrote ${RESULTS}`);
}

await main();
