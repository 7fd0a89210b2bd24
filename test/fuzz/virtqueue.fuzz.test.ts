// Fuzzing the device-side virtqueues with random and mutated ring contents: recorded fixtures with bytes of their
// rings and indirect tables mutated, and kit-built rings with random descriptors over them. For every case the
// device drains the queue (pop, read the request, write a response, push used, notification calls) and we check:
//   - no exception escapes any queue or chain operation;
//   - every segment of every chain lies inside guest memory and the chain's sums are consistent and bounded;
//   - errors are of the closed set, and a broken queue says so;
//   - no byte outside what the device may write (used ring / used descriptors, device event area, the writable
//     segments of chains it popped) changed, the guard bytes around every region are intact, and the device never
//     asked guest memory to read or write outside it.
// FUZZ_CASES and FUZZ_SEED override the case count and the seed (a failure prints the seed of its case).

import t from 'tap';
import { createQueue, VirtqueueError, VIRTQUEUE_ERROR_KINDS } from '../../vmm-device/virtqueue/index.ts';
import type { DescriptorChain } from '../../vmm-device/virtqueue/chain.ts';
import type { DeviceQueue, QueueOptions } from '../../vmm-device/virtqueue/queue.ts';
import { GuestMemory, type MemoryRegionSpec } from '../../vmm-device/memory/guest-memory.ts';
import {
  DESC_SIZE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  splitUsedSize,
} from '../../vmm-device/abi/virtqueue.ts';
import { PackedDriver, SeededRandom, SplitDriver, TestGuestMemory, randomLayout, type VirtqDriver } from '../../guest-driver-spec/testkit/index.ts';
import { fixtureQueueOptions, type QueueFactory } from '../../guest-driver-spec/testkit/fixture-replay.ts';
import { DescriptorChain as Chain } from '../../vmm-device/virtqueue/chain.ts';
import { fromHex, loadFixtureMemory, type Fixture } from '../../guest-driver-spec/testkit/fixture-format.ts';
import { fixtureFiles, loadFixture } from '../../guest-driver-spec/testkit/fixture-files.ts';

/** Cases per run (issue 2 asks for at least 100,000 in CI). */
const MIN_CASES = 100_000;
const CASES = Number(process.env.FUZZ_CASES ?? MIN_CASES);
const SEED = Number(process.env.FUZZ_SEED ?? 0x5eed_2026);
/** Fixtures whose memory is larger than this are mutated only in a few cases each (copying them costs time). */
const LARGE_FIXTURE_BYTES = 1 << 20;
const CASES_PER_LARGE_FIXTURE = 10;
/** Most failures reported in detail. */
const MAX_REPORTED = 10;
const U32_MAX = 0xffff_ffff;
/** Most request bytes a case copies out of a chain. */
const MAX_READ = 64 * 1024;
const KNOWN_KINDS = new Set<string>(VIRTQUEUE_ERROR_KINDS);

/** Guest memory that records every read or write the device attempts outside it (before failing it as usual). */
class AuditedMemory extends GuestMemory {
  outside: string[] = [];

  override read(gpa: number, dest: Uint8Array): void {
    if (!this.isValidRange(gpa, dest.length)) this.outside.push(`read [0x${gpa.toString(16)}, +${dest.length})`);
    super.read(gpa, dest);
  }

  override write(gpa: number, src: Uint8Array): void {
    if (!this.isValidRange(gpa, src.length)) this.outside.push(`write [0x${gpa.toString(16)}, +${src.length})`);
    super.write(gpa, src);
  }
}

function auditedCopy(mem: TestGuestMemory): AuditedMemory {
  const specs: MemoryRegionSpec[] = mem.memory.regionList.map((r) => ({
    guestPhysAddr: r.guestPhysAddr,
    size: r.size,
    userAddr: r.userAddr,
    buffer: r.buffer,
    bufferOffset: r.bufferOffset,
  }));
  return new AuditedMemory(specs);
}

/** A guest memory with a queue layout over it, ready to be mutated and drained. */
interface Target {
  layout: 'split' | 'packed';
  mem: TestGuestMemory;
  audited: AuditedMemory;
  options: QueueOptions;
  /** Ring areas as [gpa, length]. */
  desc: [number, number];
  driver: [number, number];
  device: [number, number];
}

function targetOf(layout: 'split' | 'packed', mem: TestGuestMemory, options: QueueOptions, areas: { desc: number; driver: number; device: number }): Target {
  const audited = auditedCopy(mem);
  const split = layout === 'split';
  return {
    layout,
    mem,
    audited,
    options: { ...options, memory: audited },
    desc: [areas.desc, DESC_SIZE * options.size],
    driver: [areas.driver, split ? 6 + 2 * options.size : 4],
    device: [areas.device, split ? splitUsedSize(options.size) : 4],
  };
}

// ---------------------------------------------------------------- mutations

/** An address a mutated descriptor may name: inside a region, at an edge, in a hole, or anywhere in the u64 space. */
function randomAddr(rng: SeededRandom, mem: TestGuestMemory): bigint {
  const plan = rng.pick(mem.plans);
  switch (rng.int(0, 7)) {
    case 0:
    case 1:
    case 2:
      return BigInt(plan.gpa + rng.int(0, plan.size - 1));
    case 3:
      return BigInt(plan.gpa + plan.size - rng.int(0, 64)); // straddling the end
    case 4:
      return BigInt(mem.hole(16) + rng.int(0, 255));
    case 5:
      return (1n << 64n) - BigInt(rng.int(1, 0x2000)); // overflow territory
    case 6:
      return (BigInt(rng.nextU32()) << 32n) | BigInt(rng.nextU32());
    default:
      return BigInt(plan.gpa + rng.int(0, Math.min(plan.size, 4096) - 1) * 16);
  }
}

function randomLen(rng: SeededRandom, size: number): number {
  switch (rng.int(0, 6)) {
    case 0:
      return 0;
    case 1:
      return rng.int(1, 64);
    case 2:
      return 16 * rng.int(0, size + 2); // indirect-table-like
    case 3:
      return U32_MAX - rng.int(0, 16);
    case 4:
      return rng.int(1, 4096);
    case 5:
      return 24;
    default:
      return rng.nextU32();
  }
}

function randomFlags(rng: SeededRandom, layout: 'split' | 'packed'): number {
  let f = 0;
  if (rng.bool(0.4)) f |= VIRTQ_DESC_F_NEXT;
  if (rng.bool(0.4)) f |= VIRTQ_DESC_F_WRITE;
  if (rng.bool(0.15)) f |= VIRTQ_DESC_F_INDIRECT;
  if (layout === 'packed') {
    if (rng.bool()) f |= VIRTQ_DESC_F_AVAIL;
    if (rng.bool()) f |= VIRTQ_DESC_F_USED;
  }
  if (rng.bool(0.05)) f |= rng.nextU32() & 0xffff;
  return f;
}

function randomIndex(rng: SeededRandom, size: number): number {
  switch (rng.int(0, 3)) {
    case 0:
      return size;
    case 1:
      return rng.int(0, 0xffff);
    default:
      return rng.int(0, size - 1);
  }
}

/** Writes a random descriptor (split or packed layout) at `gpa` through the backing bytes (no driver log). */
function writeRandomDescriptor(rng: SeededRandom, t: Target, gpa: number): void {
  const view = t.mem.memory.contiguous(gpa, DESC_SIZE);
  if (view === undefined) return;
  const v = new DataView(view.buffer, view.byteOffset, DESC_SIZE);
  const field = rng.int(0, 4);
  if (field === 0 || field === 4) v.setBigUint64(0, randomAddr(rng, t.mem), true);
  if (field === 1 || field === 4) v.setUint32(8, randomLen(rng, t.options.size), true);
  if (field === 2 || field === 4) v.setUint16(t.layout === 'split' ? 12 : 14, randomFlags(rng, t.layout), true);
  if (field === 3 || field === 4) v.setUint16(t.layout === 'split' ? 14 : 12, randomIndex(rng, t.options.size), true);
}

function flipByte(rng: SeededRandom, t: Target, area: [number, number]): void {
  const view = t.mem.memory.contiguous(area[0], area[1]);
  if (view === undefined || view.length === 0) return;
  const i = rng.int(0, view.length - 1);
  view[i] = rng.bool() ? view[i]! ^ (1 << rng.int(0, 7)) : rng.nextU32() & 0xff;
}

/** Descriptors scanned for INDIRECT ones per mutation (bounded for 32768-entry rings). */
const INDIRECT_SCAN = 256;

/** Indirect tables named by the descriptor ring (so their entries can be mutated too). */
function indirectTables(t: Target): [number, number][] {
  const view = t.mem.memory.contiguous(t.desc[0], t.desc[1])!;
  const dv = new DataView(view.buffer, view.byteOffset, view.byteLength);
  const out: [number, number][] = [];
  for (let i = 0; i < Math.min(t.options.size, INDIRECT_SCAN) && out.length < 8; i++) {
    const flags = dv.getUint16(16 * i + (t.layout === 'split' ? 12 : 14), true);
    if (flags & VIRTQ_DESC_F_INDIRECT) {
      const addr = Number(dv.getBigUint64(16 * i, true));
      const len = dv.getUint32(16 * i + 8, true);
      if (len >= 16 && t.mem.memory.contiguous(addr, len) !== undefined) out.push([addr, len]);
    }
  }
  return out;
}

function mutate(rng: SeededRandom, t: Target, count: number): void {
  const tables = indirectTables(t);
  for (let m = 0; m < count; m++) {
    const what = rng.int(0, 9);
    if (what <= 3) writeRandomDescriptor(rng, t, t.desc[0] + DESC_SIZE * rng.int(0, t.options.size - 1));
    else if (what === 4 && tables.length > 0) {
      const [addr, len] = rng.pick(tables);
      writeRandomDescriptor(rng, t, addr + DESC_SIZE * rng.int(0, Math.floor(len / DESC_SIZE) - 1));
    } else if (what === 5 && t.layout === 'split') {
      // avail.idx: a small step, a jump, or anything.
      const view = t.mem.memory.contiguous(t.driver[0], 4)!;
      const idx = view[2]! | (view[3]! << 8);
      // Mostly a small step (deeper paths), sometimes anything (AvailIndexJump).
      const next = rng.bool(0.85) ? idx + rng.int(0, 3) : rng.int(0, 0xffff);
      view[2] = next & 0xff;
      view[3] = (next >> 8) & 0xff;
    } else if (what === 6) flipByte(rng, t, t.driver);
    else if (what === 7) flipByte(rng, t, t.desc);
    else if (what === 8 && t.layout === 'split') {
      const view = t.mem.memory.contiguous(t.driver[0] + 4 + 2 * rng.int(0, t.options.size - 1), 2)!;
      const head = randomIndex(rng, t.options.size);
      view[0] = head & 0xff;
      view[1] = head >> 8;
    } else flipByte(rng, t, t.device);
  }
}

// ---------------------------------------------------------------- checks

interface Stats {
  cases: number;
  fixtureCases: number;
  randomCases: number;
  chains: number;
  errors: Map<string, number>;
  failures: string[];
}

function checkChain(c: DescriptorChain, t: Target, size: number): string | undefined {
  if (c.segments.length % 2 !== 0) return 'odd segment array';
  if (c.readableCount < 0 || c.readableCount > c.segmentCount) return `readableCount ${c.readableCount} of ${c.segmentCount}`;
  if (!(c.id >= 0 && c.id < size)) return `id ${c.id} outside the queue`;
  if (!(c.ringSlots >= 1 && c.ringSlots <= size)) return `ringSlots ${c.ringSlots}`;
  let readable = 0;
  let writable = 0;
  for (let i = 0; i < c.segmentCount; i++) {
    const addr = c.segments[2 * i]!;
    const len = c.segments[2 * i + 1]!;
    if (!Number.isSafeInteger(addr) || !Number.isSafeInteger(len) || len < 0) return `segment ${i}: ${addr} +${len}`;
    if (!t.audited.isValidRange(addr, len)) return `segment ${i} [0x${addr.toString(16)}, +${len}) outside guest memory`;
    if (i < c.readableCount) readable += len;
    else writable += len;
  }
  if (readable !== c.readableBytes || writable !== c.writableBytes) return 'byte totals disagree with the segments';
  if (readable > U32_MAX || writable > U32_MAX) return 'a part of the chain exceeds 2^32 - 1 bytes';
  return undefined;
}

/** The writable segments of a chain as [start, end) ranges (taken before the chain is pushed: see chain.ts). */
function writableRanges(c: DescriptorChain): [number, number][] {
  const out: [number, number][] = [];
  for (let i = c.readableCount; i < c.segmentCount; i++) out.push([c.segments[2 * i]!, c.segments[2 * i]! + c.segments[2 * i + 1]!]);
  return out;
}

function chainSnapshot(c: DescriptorChain): string {
  return JSON.stringify({ id: c.id, slots: c.ringSlots, r: c.readableBytes, w: c.writableBytes, segments: c.describe() });
}

/** Ranges [start, end) the device may write: its ring areas and the writable segments of chains it popped. */
function allowedWrites(t: Target, chainRanges: [number, number][]): [number, number][] {
  const out: [number, number][] = [[t.device[0], t.device[0] + t.device[1]], ...chainRanges];
  if (t.layout === 'packed') out.push([t.desc[0], t.desc[0] + t.desc[1]]); // used descriptors
  return out.sort((a, b) => a[0] - b[0]);
}

/** The first byte outside the allowed ranges that differs from `before`, or undefined. */
function strayWrite(t: Target, before: Uint8Array[], allowed: [number, number][]): string | undefined {
  for (let r = 0; r < t.mem.plans.length; r++) {
    const plan = t.mem.plans[r]!;
    const now = t.mem.regionBytes(r);
    const was = before[r]!;
    let cursor = plan.gpa;
    const end = plan.gpa + plan.size;
    const compare = (from: number, to: number): string | undefined => {
      if (to <= from) return undefined;
      const a = Buffer.from(now.buffer, now.byteOffset + (from - plan.gpa), to - from);
      const b = Buffer.from(was.buffer, was.byteOffset + (from - plan.gpa), to - from);
      return a.equals(b) ? undefined : `bytes changed in [0x${from.toString(16)}, 0x${to.toString(16)}) where the device may not write`;
    };
    for (const [s, e] of allowed) {
      if (e <= cursor || s >= end) continue;
      const bad = compare(cursor, Math.min(s, end));
      if (bad) return bad;
      cursor = Math.max(cursor, e);
      if (cursor >= end) break;
    }
    const bad = compare(cursor, end);
    if (bad) return bad;
  }
  return undefined;
}

/** Drains the queue like a device does, with random responses; returns a failure description or undefined. */
function drive(rng: SeededRandom, t: Target, stats: Stats, before: Uint8Array[], factory: QueueFactory = createQueue, scribble = true): string | undefined {
  t.audited.outside = [];
  let queue: DeviceQueue;
  try {
    queue = factory(t.layout, t.options);
  } catch (e) {
    return `constructor threw ${String(e)}`;
  }
  // A pushed chain object is the queue's again (a later pop refills it): its writable ranges are noted before.
  const popped: [number, number][] = [];
  // Chains the device keeps (never pushes) must stay as popped whatever the queue pops later (pooled objects).
  const held: { chain: DescriptorChain; was: string }[] = [];
  let scribbled = false;
  const limit = Math.min(2 * t.options.size + 4, 256);
  try {
    for (let round = rng.int(1, 3); round > 0; round--) {
      if (rng.bool()) queue.disableNotifications();
      const fresh: DescriptorChain[] = [];
      for (let k = 0; k < limit; k++) {
        queue.hasAvailable();
        const r = queue.pop();
        if (r === null) break;
        if (r instanceof VirtqueueError) {
          if (!KNOWN_KINDS.has(r.kind)) return `unknown error kind ${r.kind}`;
          if (queue.broken?.kind !== r.kind) return `pop returned ${r.kind} but broken is ${queue.broken?.kind}`;
          stats.errors.set(r.kind, (stats.errors.get(r.kind) ?? 0) + 1);
          break;
        }
        const bad = checkChain(r, t, t.options.size);
        if (bad) return `chain ${r.id}: ${bad}`;
        stats.chains++;
        fresh.push(r);
      }
      rng.shuffle(fresh);
      for (const c of fresh) {
        // Read a bounded prefix (a chain may legally total almost 4 GiB over one shared buffer), skip the rest.
        const reader = c.reader();
        const head = Math.min(c.readableBytes, MAX_READ);
        reader.read(head);
        reader.skip(c.readableBytes - head);
        const len = Math.min(c.writableBytes, rng.int(0, 512));
        if (len > 0) c.writer().write(rng.fill(new Uint8Array(len)));
        popped.push(...writableRanges(c));
        if (rng.bool(0.9)) queue.pushUsed(c, len);
        else held.push({ chain: c, was: chainSnapshot(c) });
      }
      queue.needsNotification();
      queue.enableNotifications();
      queue.getState();
      if (scribble && rng.bool(0.3)) {
        mutate(rng, t, rng.int(1, 3)); // the driver scribbles while the device works
        scribbled = true;
      }
    }
  } catch (e) {
    return `exception escaped: ${e instanceof Error ? (e.stack ?? e.message).split('\n').slice(0, 3).join(' | ') : String(e)}`;
  }
  for (const h of held) {
    if (chainSnapshot(h.chain) !== h.was) return `a held chain changed under the device: was ${h.was}, now ${chainSnapshot(h.chain)}`;
  }
  if (t.audited.outside.length > 0) return `guest memory accessed outside: ${t.audited.outside.slice(0, 3).join(', ')}`;
  const guards = t.mem.checkGuards();
  if (guards.length > 0) return guards.join('; ');
  // Mutations between rounds are the driver's writes, not the device's: compare only when none happened.
  return before.length > 0 && !scribbled ? strayWrite(t, before, allowedWrites(t, popped)) : undefined;
}

// ---------------------------------------------------------------- case sources

interface FixturePool {
  name: string;
  mem: TestGuestMemory;
  target: Target;
  /** The memory as recorded, and with every driver write of the script applied (many more chains, some stale). */
  baselines: [Uint8Array[], Uint8Array[]];
  before: Uint8Array[];
  large: boolean;
}

function poolOf(f: Fixture): FixturePool {
  const mem = loadFixtureMemory(f);
  const initial = mem.snapshot();
  for (const s of f.steps) if (s.op === 'write') mem.memory.write(s.gpa, fromHex(s.hex));
  const target = targetOf(f.queue.layout, mem, fixtureQueueOptions(f, mem), f.queue);
  const scripted = mem.snapshot();
  const bytes = initial.reduce((n, b) => n + b.length, 0);
  return { name: f.name, mem, target, baselines: [initial, scripted], before: initial.map((b) => new Uint8Array(b.length)), large: bytes > LARGE_FIXTURE_BYTES };
}

/** Kit-built rings of random configurations, reused (restored from their baseline) by many cases. */
const RANDOM_POOL_SIZE = 400;

function randomPool(rng: SeededRandom, i: number): FixturePool {
  const target = randomTarget(rng);
  const baseline = target.mem.snapshot();
  return { name: `random ring ${i} (${target.layout} ${target.options.size})`, mem: target.mem, target, baselines: [baseline, baseline], before: baseline.map((b) => new Uint8Array(b.length)), large: false };
}

function randomTarget(rng: SeededRandom): Target {
  const layout = rng.bool() ? 'split' : 'packed';
  const size = layout === 'split' ? 1 << rng.int(0, 6) : rng.int(1, 48);
  const plans = randomLayout(rng, { regions: rng.int(1, 4), minRegionSize: 24 * size + 0x1000, adjacent: rng.pick([true, false, 'some'] as const), high: rng.bool(0.2) });
  const mem = new TestGuestMemory({ regions: plans, rng: rng.fork(), maxGap: 32 });
  const eventIdx = rng.bool();
  const indirect = rng.bool();
  let driver: VirtqDriver;
  if (layout === 'split') {
    driver = new SplitDriver({ mem, size, eventIdx, indirect, startIndex: rng.bool(0.3) ? 0xffff - rng.int(0, 4) : rng.int(0, 0xffff) });
  } else {
    driver = new PackedDriver({ mem, size, eventIdx, indirect, start: { pos: rng.int(0, size - 1), wrap: rng.bool() } });
  }
  // A few valid chains the mutations can break.
  for (let k = rng.int(0, 4); k > 0; k--) {
    const free = driver instanceof SplitDriver ? driver.freeDescriptorCount : driver.freeSlots;
    const n = Math.min(rng.int(1, 4), free);
    if (n < 1) break;
    const readable = rng.int(0, n);
    driver.add({ buffers: Array.from({ length: n }, (_, i) => ({ len: rng.int(1, 200), write: i >= readable })), indirect: indirect && rng.bool() });
  }
  const areas =
    driver instanceof SplitDriver
      ? { desc: driver.descAddr, driver: driver.availAddr, device: driver.usedAddr }
      : { desc: driver.descAddr, driver: driver.driverEventAddr, device: driver.deviceEventAddr };
  return targetOf(layout, mem, driver.queueOptions(), areas);
}

t.test('the checks catch a misbehaving device (so the fuzz can fail)', async (t) => {
  const stats: Stats = { cases: 0, fixtureCases: 0, randomCases: 0, chains: 0, errors: new Map(), failures: [] };
  const fresh = (): { target: Target; before: Uint8Array[] } => {
    const rng = new SeededRandom(7);
    const mem = new TestGuestMemory({ regions: [{ gpa: 0x10000, size: 0x10000 }], rng });
    const d = new SplitDriver({ mem, size: 8 });
    d.add({ buffers: [{ len: 16 }, { len: 16, write: true }] });
    const target = targetOf('split', mem, d.queueOptions(), { desc: d.descAddr, driver: d.availAddr, device: d.usedAddr });
    return { target, before: mem.snapshot() };
  };
  const wrap = (target: Target, change: (q: DeviceQueue, t: Target) => Partial<DeviceQueue>): QueueFactory => (layout, options) => {
    const q = createQueue(layout, options);
    return Object.assign(Object.create(q) as DeviceQueue, change(q, target));
  };
  const cases: [string, (q: DeviceQueue, t: Target) => Partial<DeviceQueue>, RegExp][] = [
    ['an exception out of pop', () => ({ pop: () => { throw new Error('boom'); } }), /exception escaped: Error: boom/],
    ['a segment outside guest memory', (q) => ({ pop: () => { const c = q.pop(); return c instanceof Chain ? new Chain(c.memory, c.id, 1, [0x9990000, 16], 1, 16, 0) : c; } }), /outside guest memory/],
    ['a write into the available ring', (q, t) => ({ pop: () => { const c = q.pop(); if (c instanceof Chain) c.memory.write(t.driver[0], new Uint8Array([0x5a])); return c; } }), /where the device may not write|bytes changed/],
    ['a read outside guest memory', (q) => ({ pop: () => { const c = q.pop(); try { c?.constructor && (c as Chain).memory?.read(0x5000000, new Uint8Array(4)); } catch { /* swallowed, as a careless device would */ } return c; } }), /accessed outside/],
    ['a wrong error kind', (q) => ({ pop: () => (q.pop(), new VirtqueueError('ChainTooLong', 'invented')) }), /broken is/],
  ];
  for (const [what, change, expected] of cases) {
    const { target, before } = fresh();
    const why = drive(new SeededRandom(1), target, stats, before, wrap(target, change), false);
    t.match(why ?? 'no failure reported', expected, what);
  }
  const { target, before } = fresh();
  t.equal(drive(new SeededRandom(1), target, stats, before, createQueue, false), undefined, 'the real queue passes the same checks');
});

t.test(`virtqueue fuzz: ${CASES} cases, seed ${SEED}`, { timeout: 600_000 }, async (t) => {
  const started = Date.now();
  const cpuStart = process.cpuUsage();
  const stats: Stats = { cases: 0, fixtureCases: 0, randomCases: 0, chains: 0, errors: new Map(), failures: [] };
  const pools = fixtureFiles().map((f) => poolOf(loadFixture(f)));
  const small = pools.filter((p) => !p.large);
  const large = pools.filter((p) => p.large);
  const poolRng = new SeededRandom(SEED ^ 0x7a11);
  const randoms = Array.from({ length: RANDOM_POOL_SIZE }, (_, i) => randomPool(poolRng, i));
  const cpu = (): string => {
    const u = process.cpuUsage();
    return `cpu user ${(u.user / 1e6).toFixed(1)} s sys ${(u.system / 1e6).toFixed(1)} s`;
  };
  if (process.env.FUZZ_PROFILE) console.log(`pools built: ${cpu()}`);
  const fail = (caseSeed: number, source: string, why: string): void => {
    stats.failures.push(`case seed ${caseSeed} (${source}): ${why}`);
  };
  // A few cases over each large fixture, then alternate mutated fixtures and random rings.
  let caseSeed = SEED;
  for (const p of large) {
    for (let i = 0; i < CASES_PER_LARGE_FIXTURE && stats.cases < CASES; i++, caseSeed++) {
      const rng = new SeededRandom(caseSeed);
      runCase(rng, p, stats, 'fixture', (why) => fail(caseSeed, p.name, why));
    }
  }
  if (process.env.FUZZ_PROFILE) console.log(`large fixtures done: ${cpu()}`);
  while (stats.cases < CASES) {
    const rng = new SeededRandom(caseSeed);
    const fromFixture = rng.bool(0.6) && small.length > 0;
    const p = fromFixture ? rng.pick(small) : rng.pick(randoms);
    runCase(rng, p, stats, fromFixture ? 'fixture' : 'random', (why) => fail(caseSeed, p.name, why));
    caseSeed++;
  }
  const seconds = (Date.now() - started) / 1000;
  const cpuUsed = process.cpuUsage(cpuStart);
  const cpuSeconds = (cpuUsed.user + cpuUsed.system) / 1e6;
  const kinds = [...stats.errors.entries()].sort().map(([k, n]) => `${k} ${n}`).join(', ');
  if (process.env.FUZZ_PROFILE) console.log(`end: ${cpu()}`);
  const summary = `fuzz: ${stats.cases} cases (${stats.fixtureCases} mutated fixtures, ${stats.randomCases} random rings) in ${seconds.toFixed(1)} s (${cpuSeconds.toFixed(1)} s of CPU); ${stats.chains} chains popped; errors: ${kinds}`;
  console.log(summary);
  t.comment(summary);
  for (const f of stats.failures.slice(0, MAX_REPORTED)) t.fail(f);
  t.equal(stats.failures.length, 0, 'no failing case');
  t.ok(stats.cases >= Math.min(CASES, MIN_CASES), `${stats.cases} cases run`);
  t.ok(stats.chains > stats.cases / 10, 'the cases are not all rejected at the first descriptor (chains were popped)');
  t.ok(stats.errors.size >= 10, `the mutations reach most error kinds (${stats.errors.size})`);
});

function runCase(rng: SeededRandom, p: FixturePool, stats: Stats, source: 'fixture' | 'random', fail: (why: string) => void): void {
  p.baselines[rng.bool() ? 1 : 0].forEach((b, i) => p.mem.regionBytes(i).set(b));
  mutate(rng, p.target, source === 'fixture' ? rng.int(1, 8) : rng.int(0, 16));
  // Compare against the mutated state in half the cases (the copy costs time for big fixtures).
  const check = rng.bool(0.5);
  if (check) p.before.forEach((b, i) => b.set(p.mem.regionBytes(i)));
  stats.cases++;
  if (source === 'fixture') stats.fixtureCases++;
  else stats.randomCases++;
  const why = drive(rng, p.target, stats, check ? p.before : []);
  if (why) fail(why);
}
