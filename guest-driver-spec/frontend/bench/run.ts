// `npm run bench:vhost-user`: the round trip of a tiny request through a virtqueue over vhost-user. The reference
// front-end (this process) writes a 16-byte request and a 16-byte answer buffer into a split ring in memfd guest
// RAM, kicks, and waits for the call eventfd; the back-end (another process) pops, answers, pushes, signals.
// Measured against two back-ends in the same run, with the same front-end: this project's TypeScript back-end and
// QEMU's libvhost-user (C) serving the same echo device. Rounds alternate between the two so that load from
// elsewhere hits both alike; the median round of each counts. Writes bench-results/vhost-user.json.

import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { VhostUserFrontend } from '../frontend.ts';
import { GuestAllocator, SplitRingDriver } from '../guest-driver.ts';
import { GuestRam } from '../guest-ram.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../../..');
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const ROUND_SECONDS = Number(process.env.BENCH_ROUND_SECONDS ?? 1.5);
const WARMUP = 2000;
const QUEUE_SIZE = 256;
const REQUEST_BYTES = 16;
/** Interrupts without a used element tolerated in one round trip before the run is declared broken. */
const MAX_SPURIOUS_CALLS = 3;

const host = new SysHost();

/** Compiles the libvhost-user echo back-end from the project's QEMU source (cached, rebuilt when the C changes). */
function buildNativeBackend(): string {
  const cache = process.env.VRDMA_CACHE ?? '/var/cache/vrdma';
  // An unpacked source tree already in the cache is used as is (scripts/qemu/source.sh waits for the QEMU build
  // lock, which a running QEMU build holds for minutes); otherwise source.sh fetches one.
  const cached = existsSync(path.join(cache, 'qemu'))
    ? readdirSync(path.join(cache, 'qemu'))
        .map((v) => path.join(cache, 'qemu', v, 'source'))
        .find((s) => existsSync(path.join(s, 'subprojects/libvhost-user/libvhost-user.c')))
    : undefined;
  const source =
    cached ??
    execFileSync('bash', [path.join(root, 'scripts/qemu/source.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
      .trim()
      .split('\n')
      .pop()!;
  const lib = path.join(source, 'subprojects/libvhost-user');
  const c = path.join(here, 'native-echo-backend.c');
  const cacheDir = path.join(cache, 'bench');
  mkdirSync(cacheDir, { recursive: true });
  const bin = path.join(cacheDir, 'vhost-user-native-echo-backend');
  if (!existsSync(bin) || statSync(bin).mtimeMs < statSync(c).mtimeMs) {
    execFileSync('gcc', ['-O2', '-D_GNU_SOURCE', `-I${lib}`, `-I${lib}/include`, '-o', bin, c, path.join(lib, 'libvhost-user.c'), '-lpthread'], { stdio: 'inherit' });
  }
  return bin;
}

async function startBackend(cmd: string, args: string[]): Promise<ChildProcess> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`${cmd} exited with ${code} before it was ready`)));
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) resolve();
    });
  });
  return child;
}

interface RoundResult {
  samplesNs: number[];
  seconds: number;
}

/** One round: connect, QEMU's init and start, then timed round trips for ROUND_SECONDS. */
async function round(socketPath: string): Promise<RoundResult> {
  const fe = await VhostUserFrontend.connect(host, socketPath);
  const ram = new GuestRam(host, [{ gpa: 0, size: 1 << 20 }]);
  try {
    await fe.init({ queues: 1 });
    const alloc = new GuestAllocator(ram);
    const ring = new SplitRingDriver(ram, alloc, QUEUE_SIZE);
    await fe.start({ ram, features: 1n << 32n, queues: [{ index: 0, size: QUEUE_SIZE, ...ring.addrs }] });
    await fe.sync();
    const request = new Uint8Array(REQUEST_BYTES).fill(0x5a);
    const reqAddr = alloc.alloc(REQUEST_BYTES);
    const respAddr = alloc.alloc(REQUEST_BYTES);
    ram.memory.write(reqAddr, request);
    const callFd = fe.callFds.get(0)!;
    // libvhost-user signals every call eventfd it is given (SET_VRING_CALL: "in case of I/O hang after
    // reconnecting"); that signal answers no request, so it is drained before timing starts.
    host.eventfdRead(callFd);
    // One persistent watcher on the call eventfd; each round trip waits for its next firing.
    let wake: (() => void) | undefined;
    const watch = host.watchReadable(callFd, () => {
      if (host.eventfdRead(callFd) !== undefined) wake?.();
    });
    const once = async (): Promise<void> => {
      ring.writeDescriptor(1, respAddr, REQUEST_BYTES, 2 /* WRITE */, 0);
      ring.writeDescriptor(0, reqAddr, REQUEST_BYTES, 1 /* NEXT */, 1);
      let done = new Promise<void>((res) => (wake = res));
      ring.publish(0);
      fe.kick(0);
      await done;
      let used = ring.readUsed();
      for (let spurious = 0; used.length === 0; spurious++) {
        // An interrupt with nothing used (a signal left from the set-up): wait for the real one.
        if (spurious === MAX_SPURIOUS_CALLS) throw new Error(`${MAX_SPURIOUS_CALLS} interrupts without a used element`);
        done = new Promise<void>((res) => (wake = res));
        await done;
        used = ring.readUsed();
      }
      if (used.length !== 1 || used[0]!.len !== REQUEST_BYTES) throw new Error(`unexpected used elements ${JSON.stringify(used)}`);
    };
    for (let i = 0; i < WARMUP; i++) await once();
    const samplesNs: number[] = [];
    const start = process.hrtime.bigint();
    const end = start + BigInt(Math.round(ROUND_SECONDS * 1e9));
    for (;;) {
      const t0 = process.hrtime.bigint();
      if (t0 >= end) break;
      await once();
      samplesNs.push(Number(process.hrtime.bigint() - t0));
    }
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    watch.stop();
    return { samplesNs, seconds };
  } finally {
    fe.close();
    ram.release();
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

interface Summary {
  p50: number;
  p99: number;
  rps: number;
}
function summarize(r: RoundResult): Summary {
  const s = [...r.samplesNs].sort((a, b) => a - b);
  return { p50: percentile(s, 50) / 1000, p99: percentile(s, 99) / 1000, rps: r.samplesNs.length / r.seconds };
}

const nativeBin = buildNativeBackend();
// The machine's 1-minute load when the run started: on a shared machine the figures move with it (reported).
const loadAtStart = os.loadavg()[0]!;
const dir = mkdtempSync(path.join(os.tmpdir(), 'bench-vhost-user-'));
const ours: Summary[] = [];
const native: Summary[] = [];
try {
  for (let i = 0; i < ROUNDS; i++) {
    for (const which of ['ours', 'native'] as const) {
      const sock = path.join(dir, `${which}${i}.sock`);
      const child =
        which === 'ours'
          ? await startBackend(process.execPath, ['--import', 'tsx', path.join(here, 'ts-echo-backend.ts'), sock])
          : await startBackend(nativeBin, [sock]);
      try {
        const s = summarize(await round(sock));
        (which === 'ours' ? ours : native).push(s);
        process.stderr.write(`round ${i + 1}/${ROUNDS} ${which}: p50 ${s.p50.toFixed(1)} us, p99 ${s.p99.toFixed(1)} us, ${s.rps.toFixed(0)} req/s\n`);
      } finally {
        child.kill('SIGTERM');
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

const pick = (xs: Summary[], k: keyof Summary): number => median(xs.map((x) => x[k]));
const baselineName = "QEMU's libvhost-user (C, -O2) serving the same echo device, same front-end, same run";
const results = [
  { metric: 'vhost_user_round_trip_p50', ours: pick(ours, 'p50'), baseline: pick(native, 'p50'), unit: 'us', better: 'lower' },
  { metric: 'vhost_user_round_trip_p99', ours: pick(ours, 'p99'), baseline: pick(native, 'p99'), unit: 'us', better: 'lower' },
  { metric: 'vhost_user_round_trips_per_sec', ours: pick(ours, 'rps'), baseline: pick(native, 'rps'), unit: 'req/s', better: 'higher' },
].map((m) => ({
  metric: m.metric,
  ours: Number(m.ours.toFixed(2)),
  baseline: Number(m.baseline.toFixed(2)),
  baseline_name: baselineName,
  ratio: Number((m.ours / m.baseline).toFixed(3)),
  unit: m.unit,
  better: m.better,
  note:
    m.better === 'lower'
      ? `ratio = ours / baseline; lower is better (1.5 = 50% slower than the native peer). Front-end: the TypeScript reference front-end in this process, the back-end in its own process. Load average at the start: ${loadAtStart.toFixed(1)} (${os.cpus().length} CPUs).`
      : `ratio = ours / baseline; higher is better. One request in flight at a time. Load average at the start: ${loadAtStart.toFixed(1)} (${os.cpus().length} CPUs).`,
}));
mkdirSync(path.join(root, 'bench-results'), { recursive: true });
writeFileSync(path.join(root, 'bench-results/vhost-user.json'), JSON.stringify(results, null, 2) + '\n');
process.stdout.write(JSON.stringify(results, null, 2) + '\n');
