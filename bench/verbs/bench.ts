// RDMA WRITE latency (2-byte messages, ping-pong) and bandwidth (64 KiB messages) through the HostVerbs
// TypeScript interface, against perftest's ib_write_lat / ib_write_bw on the same rxe0 in the same run.
// Runs inside the soft-RoCE test host (bench/verbs/run.sh starts it); writes bench-results/verbs.json.
//
// Ours is run the way perftest runs, so that the ratio compares like with like:
// - two processes, a server and a client (this file started again with `--peer`), each with its own device
//   context, PD, CQ, QP and MR on rxe0; they exchange QP number, address and rkey over the child's stdio (perftest
//   uses a TCP socket for the same exchange), then connect RC with the RoCE v2 GID;
// - latency (ib_write_lat's run_iter_lat_write): every WRITE is signaled, not inlined (ib_write_lat on rxe0 reports
//   "Max inline data: 0"); each side waits for the
//   peer's WRITE by spinning on the last byte of its receive buffer, posts its own WRITE and busy-polls the send
//   CQ for its completion. The sample is the gap between consecutive posts on the client, halved; reported as the
//   median ("typical") and the mean, in microseconds;
// - bandwidth (ib_write_bw's run_iter_bw): the client keeps TX_DEPTH WRITEs in flight, one signaled per CQ_MOD,
//   busy-polls the CQ in batches of POLL_BATCH; the server only holds the target MR. MiB/s of bytes written over
//   the time from the first post to the last completion (perftest's "MB/sec" is 2^20 bytes per second).
// TCG makes absolute numbers meaningless: only the ratio, taken in the same VM run, says anything. Rounds alternate
// which side goes first, so that load changes during the run hit both; each side's median round is reported.

import { spawn } from 'node:child_process';
import type { ChildProcessByStdio } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { Access, GidType, Mtu, QpState, QpType, SendFlags, WcStatus, WrOpcode, wcStatusName } from '../../vmm-device/verbs/constants.ts';
import type { CqHandle, DeviceHandle, GidEntry, MrHandle, PdHandle, QpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { SendWrList, WcBuffer } from '../../vmm-device/verbs/layout.ts';

const DEVICE = 'rxe0';
const PORT = 1;
/** rxe0's RoCE v2 GID (IPv4-mapped); perftest gets the same with `-x 1`. */
const GID_INDEX = 1;
const LAT_SIZE = 2;
/** ib_write_lat's default iteration count. */
const LAT_ITERS = envInt('VRDMA_BENCH_LAT_ITERS', 1000);
/**
 * Ping-pongs before the measured ones in our latency run, so that V8 has compiled the loop (perftest is native
 * code from the first iteration). Not counted in any figure.
 */
const LAT_WARMUP = 200;
const BW_SIZE = 64 * 1024;
const BW_ITERS = envInt('VRDMA_BENCH_BW_ITERS', 2000);
const ROUNDS = envInt('VRDMA_BENCH_ROUNDS', 3);
/** WRITEs in flight in the bandwidth test: perftest's default tx depth, passed to it explicitly (-t). */
const TX_DEPTH = 128;
/** One signaled WRITE per this many in the bandwidth test: perftest's default CQ moderation, passed as -Q. */
const CQ_MOD = 100;
/** Completions read per poll in the bandwidth test (perftest's CTX_POLL_BATCH). */
const POLL_BATCH = 16;
/** The receive buffer sits this far into each side's memory (the send buffer is at 0). */
const LAT_RECV_OFFSET = 4096;
const PERFTEST_PORT_BASE = 18515;
/** Calls of pollCq that found nothing, per test: where a side spins (printed with each round). */
const emptyPolls = { latency: 0, bandwidth: 0 };

/** A spinning wait gives up after this long (a lost message would otherwise hang the run). */
const SPIN_LIMIT_MS = 20_000;
/**
 * Spinning loops read the clock only this often: under TCG a clock read may be an emulated device access that
 * competes with the very kernel work being measured.
 */
const CLOCK_CHECK_EVERY = 100_000;
/** How long the peer process may take to start, open rxe0 and report its QP. */
const PEER_START_LIMIT_MS = 120_000;
/** How long a perftest client retries connecting while its server starts. */
const PERFTEST_CONNECT_ATTEMPTS = 60;
const PERFTEST_CONNECT_RETRY_MS = 500;
/**
 * Runs of a perftest tool before giving up on a readable result: under TCG its CPU-frequency estimate sometimes
 * fails ("Correlation coefficient r^2 < 0.9") and it then prints inf for every latency.
 */
const PERFTEST_ATTEMPTS = 3;

const here = path.dirname(fileURLToPath(import.meta.url));
const RESULTS = path.resolve(here, '../../bench-results/verbs.json');
const ACCESS_ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ;

function envInt(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, not '${raw}'`);
  return n;
}

const verbs = new NativeVerbs();

/** What one side tells the other to connect and to write into its memory. */
interface Endpoint {
  qpNum: number;
  addr: string;
  rkey: number;
}

type Mode = 'latency' | 'bandwidth';

interface Side {
  device: DeviceHandle;
  pd: PdHandle;
  cq: CqHandle;
  qp: QpHandle;
  mem: ArrayBuffer;
  mr: MrHandle;
  gid: GidEntry;
}

async function openSide(memBytes: number): Promise<Side> {
  const device = await verbs.openDevice(DEVICE);
  const gid = (await verbs.queryGidTable(device)).find((g) => g.index === GID_INDEX && g.type === GidType.ROCE_V2);
  if (gid === undefined) throw new Error(`${DEVICE} has no RoCE v2 GID at index ${GID_INDEX}`);
  const pd = await verbs.allocPd(device);
  const cq = await verbs.createCq(device, 2 * TX_DEPTH);
  const qp = await verbs.createQp(pd, {
    qpType: QpType.RC,
    sendCq: cq,
    recvCq: cq,
    maxSendWr: TX_DEPTH,
    maxRecvWr: 1,
    maxSendSge: 1,
    maxRecvSge: 1,
    maxInlineData: 0,
  });
  const mem = new ArrayBuffer(memBytes);
  const mr = await verbs.regMr(pd, mem, { access: ACCESS_ALL });
  return { device, pd, cq, qp, mem, mr, gid };
}

async function closeSide(s: Side): Promise<void> {
  await verbs.destroyQp(s.qp);
  await verbs.deregMr(s.mr);
  await verbs.destroyCq(s.cq);
  await verbs.deallocPd(s.pd);
  await verbs.closeDevice(s.device);
}

function endpointOf(s: Side): Endpoint {
  return { qpNum: s.qp.qpNum, addr: s.mr.addr.toString(), rkey: s.mr.rkey };
}

async function connect(s: Side, remote: Endpoint): Promise<void> {
  await verbs.modifyQp(s.qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: PORT, qpAccessFlags: ACCESS_ALL });
  await verbs.modifyQp(s.qp, {
    qpState: QpState.RTR,
    pathMtu: Mtu.MTU_1024,
    destQpNum: remote.qpNum,
    rqPsn: 0,
    maxDestRdAtomic: 1,
    minRnrTimer: 12,
    ahAttr: { portNum: PORT, grh: { dgid: s.gid.gid, sgidIndex: GID_INDEX, hopLimit: 64 } },
  });
  await verbs.modifyQp(s.qp, { qpState: QpState.RTS, sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 1 });
}

function memoryBytes(mode: Mode): number {
  return mode === 'latency' ? 2 * LAT_RECV_OFFSET : BW_SIZE;
}

function checkCompletions(wcs: WcBuffer, n: number): void {
  for (let i = 0; i < n; i++)
    if (wcs.status(i) !== WcStatus.SUCCESS) throw new Error(`RDMA WRITE failed: ${wcStatusName(wcs.status(i))}`);
}

/**
 * ib_write_lat's loop, for either side: wait for the peer's WRITE (the server skips the wait before its first
 * send), post one signaled inline WRITE, busy-poll its completion. Returns each post's time (ns).
 */
function pingPong(s: Side, remote: Endpoint, iters: number, isServer: boolean): Float64Array {
  const wr = new SendWrList(1).push({
    wrId: 1,
    opcode: WrOpcode.RDMA_WRITE,
    sendFlags: SendFlags.SIGNALED,
    remoteAddr: BigInt(remote.addr) + BigInt(LAT_RECV_OFFSET),
    rkey: remote.rkey,
    sgList: [{ addr: s.mr.addr, length: LAT_SIZE, lkey: s.mr.lkey }],
  });
  const last = LAT_SIZE - 1;
  const post = new Uint8Array(s.mem, 0, LAT_SIZE);
  const poll = new Uint8Array(s.mem, LAT_RECV_OFFSET, LAT_SIZE);
  const wcs = new WcBuffer(1);
  const posted = new Float64Array(iters);
  const origin = process.hrtime.bigint();
  let scnt = 0;
  let rcnt = 0;
  while (scnt < iters || rcnt < iters) {
    if (rcnt < iters && !(scnt < 1 && isServer)) {
      rcnt++;
      const want = rcnt & 0xff;
      let spins = 0;
      let since = 0;
      // Atomics.load: the load is never hoisted out of the loop; the kernel writes this memory.
      while (Atomics.load(poll, last) !== want) {
        if (++spins % CLOCK_CHECK_EVERY === 0) {
          if (since === 0) since = Date.now();
          else if (Date.now() - since > SPIN_LIMIT_MS) throw new Error(`WRITE ${rcnt} never arrived`);
        }
      }
    }
    if (scnt < iters) {
      posted[scnt] = Number(process.hrtime.bigint() - origin);
      post[last] = ++scnt & 0xff;
      verbs.postSend(s.qp, wr);
      let n = 0;
      let spins = 0;
      let since = 0;
      while ((n = verbs.pollCq(s.cq, wcs)) === 0) {
        emptyPolls.latency++;
        if (++spins % CLOCK_CHECK_EVERY === 0) {
          if (since === 0) since = Date.now();
          else if (Date.now() - since > SPIN_LIMIT_MS) throw new Error(`WRITE ${scnt} never completed`);
        }
      }
      checkCompletions(wcs, n);
    }
  }
  return posted;
}

/** ib_write_bw's loop on the client: TX_DEPTH WRITEs in flight, one signaled per CQ_MOD. Returns MiB/s. */
function stream(s: Side, remote: Endpoint, iters: number): number {
  const make = (signaled: boolean) =>
    new SendWrList(1).push({
      wrId: 1,
      opcode: WrOpcode.RDMA_WRITE,
      sendFlags: signaled ? SendFlags.SIGNALED : 0,
      remoteAddr: BigInt(remote.addr),
      rkey: remote.rkey,
      sgList: [{ addr: s.mr.addr, length: BW_SIZE, lkey: s.mr.lkey }],
    });
  const plain = make(false);
  const signaled = make(true);
  const wcs = new WcBuffer(POLL_BATCH);
  let scnt = 0;
  let ccnt = 0;
  let idle = 0;
  let since = 0;
  const start = process.hrtime.bigint();
  while (ccnt < iters) {
    while (scnt < iters && scnt - ccnt < TX_DEPTH) {
      verbs.postSend(s.qp, scnt % CQ_MOD === CQ_MOD - 1 ? signaled : plain);
      scnt++;
    }
    const n = verbs.pollCq(s.cq, wcs);
    if (n > 0) {
      checkCompletions(wcs, n);
      ccnt += n * CQ_MOD;
      idle = 0;
      since = 0;
    } else if ((emptyPolls.bandwidth++, ++idle % CLOCK_CHECK_EVERY === 0)) {
      if (since === 0) since = Date.now();
      else if (Date.now() - since > SPIN_LIMIT_MS) throw new Error(`bandwidth run stalled at ${ccnt}/${iters} WRITEs`);
    }
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  return (iters * BW_SIZE) / seconds / 2 ** 20;
}

// ------------------------------------------------------------------------------------------- the two processes

/** Lines from a stream, one at a time. */
function lineReader(input: Readable): () => Promise<string> {
  const lines: string[] = [];
  const waiters: { resolve: (line: string) => void; reject: (e: Error) => void }[] = [];
  let ended = false;
  const rl = createInterface({ input });
  rl.on('line', (line) => {
    const w = waiters.shift();
    if (w !== undefined) w.resolve(line);
    else lines.push(line);
  });
  rl.on('close', () => {
    ended = true;
    for (const w of waiters.splice(0)) w.reject(new Error('the peer closed its side of the exchange'));
  });
  return () => {
    const line = lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (ended) return Promise.reject(new Error('the peer closed its side of the exchange'));
    return new Promise((resolve, reject) => waiters.push({ resolve, reject }));
  };
}

/** The server side (`bench.ts --peer <mode> <iters>`): runs in its own process, talks over stdin/stdout. */
async function peerMain(mode: Mode, iters: number): Promise<void> {
  const next = lineReader(process.stdin);
  const say = (o: object) => process.stdout.write(JSON.stringify(o) + '\n');
  const side = await openSide(memoryBytes(mode));
  try {
    say({ endpoint: endpointOf(side) });
    const remote = (JSON.parse(await next()) as { endpoint: Endpoint }).endpoint;
    await connect(side, remote);
    say({ ready: true });
    if (mode === 'latency') pingPong(side, remote, iters, true);
    // Bandwidth: the server only holds the target memory until the client is done.
    await next();
  } finally {
    await closeSide(side);
  }
  say({ closed: true });
  process.stdin.destroy();
}

interface Peer {
  next: () => Promise<string>;
  child: ChildProcessByStdio<Writable, Readable, null>;
  exited: Promise<number>;
}

function startPeer(mode: Mode, iters: number): Peer {
  const child = spawn(process.execPath, [...process.execArgv, fileURLToPath(import.meta.url), '--peer', mode, String(iters)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const exited = new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? 1)));
  return { child, next: lineReader(child.stdout), exited };
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Runs `body` on the client side against a freshly started server process. */
async function againstPeer<T>(mode: Mode, iters: number, body: (s: Side, remote: Endpoint) => T): Promise<T> {
  const peer = startPeer(mode, iters);
  const side = await openSide(memoryBytes(mode));
  try {
    const remote = (JSON.parse(await withTimeout(peer.next(), PEER_START_LIMIT_MS, 'starting the peer')) as { endpoint: Endpoint }).endpoint;
    await connect(side, remote);
    peer.child.stdin.write(JSON.stringify({ endpoint: endpointOf(side) }) + '\n');
    await withTimeout(peer.next(), PEER_START_LIMIT_MS, 'connecting the peer');
    const result = body(side, remote);
    peer.child.stdin.write(JSON.stringify({ done: true }) + '\n');
    await withTimeout(peer.next(), PEER_START_LIMIT_MS, 'closing the peer');
    const code = await peer.exited;
    if (code !== 0) throw new Error(`the peer process exited with ${code}`);
    return result;
  } catch (e) {
    peer.child.kill();
    throw e;
  } finally {
    await closeSide(side);
  }
}

function median(xs: ArrayLike<number>): number {
  const s = Array.from(xs).sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

interface Latency {
  typical: number;
  avg: number;
}

async function ourLatency(): Promise<Latency> {
  const total = LAT_WARMUP + LAT_ITERS;
  const posted = await againstPeer('latency', total, (s, remote) => pingPong(s, remote, total, false));
  // As ib_write_lat reports: the gaps between consecutive posts, halved (one WRITE each way per gap).
  const samples: number[] = [];
  for (let i = LAT_WARMUP + 1; i < total; i++) samples.push((posted[i]! - posted[i - 1]!) / 2000);
  return { typical: median(samples), avg: samples.reduce((a, x) => a + x, 0) / samples.length };
}

async function ourBandwidth(): Promise<number> {
  return againstPeer('bandwidth', BW_ITERS, (s, remote) => stream(s, remote, BW_ITERS));
}

// ------------------------------------------------------------------------------------------- perftest

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

/** Runs a perftest server and its client on rxe0 (RoCE v2 GID); returns the client's output. */
async function perftest(tool: string, args: string[]): Promise<string> {
  const port = String(perftestPort++);
  const common = ['-d', DEVICE, '-x', String(GID_INDEX), '-F', '-p', port, ...args];
  const server = run(tool, common);
  // The server needs a moment to listen; the client retries its connection until it does.
  let client: { code: number; out: string } | undefined;
  for (let attempt = 0; attempt < PERFTEST_CONNECT_ATTEMPTS; attempt++) {
    await new Promise((r) => setTimeout(r, PERFTEST_CONNECT_RETRY_MS));
    client = await run(tool, [...common, '127.0.0.1']);
    if (client.code === 0 || !/Couldn't connect|Unable to open file descriptor|Connection refused/i.test(client.out)) break;
  }
  const s = await server;
  if (client === undefined || client.code !== 0 || s.code !== 0)
    throw new Error(`${tool} failed:\n--- client\n${client?.out}\n--- server\n${s.out}`);
  return client.out;
}

const LAT_ARGS = ['-s', String(LAT_SIZE), '-n', String(LAT_ITERS)];
const BW_ARGS = ['-s', String(BW_SIZE), '-n', String(BW_ITERS), '-t', String(TX_DEPTH), '-Q', String(CQ_MOD)];

/** Runs `tool` until `read` finds a result in its output (at most PERFTEST_ATTEMPTS runs). */
async function perftestResult<T>(tool: string, args: string[], read: (out: string) => T | undefined): Promise<T> {
  let out = '';
  for (let attempt = 1; attempt <= PERFTEST_ATTEMPTS; attempt++) {
    out = await perftest(tool, args);
    const result = read(out);
    if (result !== undefined) return result;
    console.log(`${tool}: no readable result in run ${attempt}/${PERFTEST_ATTEMPTS} (its clock estimate failed?), again`);
  }
  throw new Error(`cannot read ${tool}'s result in ${PERFTEST_ATTEMPTS} runs; the last:\n${out}`);
}

function perftestLatency(): Promise<Latency> {
  // #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
  const row = new RegExp(`^\\s*${LAT_SIZE}\\s+${LAT_ITERS}\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)`, 'm');
  return perftestResult('ib_write_lat', LAT_ARGS, (out) => {
    const m = row.exec(out);
    return m === null ? undefined : { typical: Number(m[3]), avg: Number(m[4]) };
  });
}

function perftestBandwidth(): Promise<number> {
  // #bytes #iterations BW_peak BW_average MsgRate
  const row = new RegExp(`^\\s*${BW_SIZE}\\s+${BW_ITERS}\\s+([\\d.]+)\\s+([\\d.]+)`, 'm');
  return perftestResult('ib_write_bw', BW_ARGS, (out) => {
    const m = row.exec(out);
    return m === null ? undefined : Number(m[2]);
  });
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

function writeResults(lat: { ours: Latency[]; base: Latency[] }, bw: { ours: number[]; base: number[] }): void {
  const latOursTyp = median(lat.ours.map((x) => x.typical));
  const latBaseTyp = median(lat.base.map((x) => x.typical));
  const latOursAvg = median(lat.ours.map((x) => x.avg));
  const latBaseAvg = median(lat.base.map((x) => x.avg));
  const bwOurs = median(bw.ours);
  const bwBase = median(bw.base);
  const how = `two processes on rxe0, ${lat.ours.length} of ${ROUNDS} alternating rounds (median round), same VM run`;
  const results = [
    {
      metric: `rdma_write_latency_${LAT_SIZE}B_typical`,
      ours: round3(latOursTyp),
      baseline: round3(latBaseTyp),
      baseline_name: `perftest ib_write_lat -d rxe0 -x ${GID_INDEX} ${LAT_ARGS.join(' ')} (t_typical), ${how}`,
      ratio: round3(latOursTyp / latBaseTyp),
      unit: 'us',
      better: 'lower',
    },
    {
      metric: `rdma_write_latency_${LAT_SIZE}B_avg`,
      ours: round3(latOursAvg),
      baseline: round3(latBaseAvg),
      baseline_name: `perftest ib_write_lat -d rxe0 -x ${GID_INDEX} ${LAT_ARGS.join(' ')} (t_avg), ${how}`,
      ratio: round3(latOursAvg / latBaseAvg),
      unit: 'us',
      better: 'lower',
    },
    {
      metric: 'rdma_write_bandwidth_64KiB',
      ours: round3(bwOurs),
      baseline: round3(bwBase),
      baseline_name: `perftest ib_write_bw -d rxe0 -x ${GID_INDEX} ${BW_ARGS.join(' ')} (BW average), ${how}`,
      ratio: round3(bwOurs / bwBase),
      unit: 'MiB/s',
      better: 'higher',
    },
  ];
  mkdirSync(path.dirname(RESULTS), { recursive: true });
  writeFileSync(RESULTS, JSON.stringify(results, null, 2) + '\n');
}

async function main(): Promise<void> {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1')
    throw new Error('bench/verbs/bench.ts runs inside the soft-RoCE test host: use `npm run bench:verbs`');
  if (BW_ITERS % CQ_MOD !== 0) throw new Error(`VRDMA_BENCH_BW_ITERS must be a multiple of ${CQ_MOD}`);
  const lat = { ours: [] as Latency[], base: [] as Latency[] };
  const bw = { ours: [] as number[], base: [] as number[] };
  for (let r = 0; r < ROUNDS; r++) {
    // Odd rounds run ours first, even rounds perftest first.
    const oursFirst = r % 2 === 0;
    const steps: (() => Promise<void>)[] = oursFirst
      ? [async () => void lat.ours.push(await ourLatency()), async () => void lat.base.push(await perftestLatency())]
      : [async () => void lat.base.push(await perftestLatency()), async () => void lat.ours.push(await ourLatency())];
    steps.push(
      ...(oursFirst
        ? [async () => void bw.ours.push(await ourBandwidth()), async () => void bw.base.push(await perftestBandwidth())]
        : [async () => void bw.base.push(await perftestBandwidth()), async () => void bw.ours.push(await ourBandwidth())]),
    );
    for (const step of steps) await step();
    console.log(
      `round ${r + 1}/${ROUNDS} (${oursFirst ? 'ours' : 'perftest'} first): ` +
        `latency typical ours ${lat.ours[r]!.typical.toFixed(2)} us, ib_write_lat ${lat.base[r]!.typical.toFixed(2)} us; ` +
        `avg ours ${lat.ours[r]!.avg.toFixed(2)} us, ib_write_lat ${lat.base[r]!.avg.toFixed(2)} us; ` +
        `bandwidth ours ${bw.ours[r]!.toFixed(2)} MiB/s, ib_write_bw ${bw.base[r]!.toFixed(2)} MiB/s; ` +
        `empty polls per WRITE (client): latency ${(emptyPolls.latency / (LAT_WARMUP + LAT_ITERS)).toFixed(1)}, ` +
        `bandwidth ${(emptyPolls.bandwidth / BW_ITERS).toFixed(1)}`,
    );
    emptyPolls.latency = 0;
    emptyPolls.bandwidth = 0;
    // Written after every round, so that a run stopped by its time limit still leaves what it measured.
    writeResults(lat, bw);
  }
  console.log(readFileSync(RESULTS, 'utf8'));
  console.log(`wrote ${RESULTS}`);
}


if (process.argv[2] === '--peer') {
  const mode = process.argv[3];
  if (mode !== 'latency' && mode !== 'bandwidth') throw new Error(`--peer needs latency or bandwidth, not ${mode}`);
  await peerMain(mode, Number(process.argv[4]));
} else {
  await main();
}
