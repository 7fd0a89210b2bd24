// Records fixtures/virtqueue/*.json (`npm run fixtures:record`). Deterministic: every case has a fixed seed, so
// re-running writes byte-identical files (test/virtqueue/fixtures/recording.test.ts checks it). The expectations
// come from what the driver-side test kit built (guest-driver-spec/testkit), never from our device engine.

import { mkdirSync, readdirSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import {
  DESC_SIZE,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
} from '../vmm-device/abi/virtqueue.ts';
import {
  MALFORMED_CASES,
  PackedDriver,
  SeededRandom,
  SplitDriver,
  TestGuestMemory,
  randomLayout,
  writableBytes,
  type BufferSpec,
  type BuiltChain,
  type ChainSpec,
  type Layout,
  type MalformedCase,
  type RingPosition,
} from '../guest-driver-spec/testkit/index.ts';
import { FixtureRecorder } from '../guest-driver-spec/testkit/fixture-recorder.ts';
import type { Fixture } from '../guest-driver-spec/testkit/fixture-format.ts';

export const FIXTURE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'virtqueue');

type Driver = SplitDriver | PackedDriver;

interface SetupOptions {
  layout: Layout;
  size: number;
  eventIdx: boolean;
  indirect: boolean;
  seed: number;
  regions?: number;
  adjacent?: boolean | 'some';
  high?: boolean;
  /** Split: start index; packed: start position. */
  start?: number | RingPosition;
  /** Extra bytes every region must hold beyond the rings. */
  extra?: number;
}

function setup(o: SetupOptions): { rng: SeededRandom; mem: TestGuestMemory; driver: Driver } {
  const rng = new SeededRandom(o.seed);
  const rings = o.layout === 'split' ? descTableSize(o.size) + splitAvailSize(o.size) + splitUsedSize(o.size) : DESC_SIZE * o.size + 8;
  const plans = randomLayout(rng, {
    regions: o.regions ?? 3,
    minRegionSize: rings + 256 + (o.extra ?? 0x4000),
    adjacent: o.adjacent ?? 'some',
    high: o.high ?? false,
  });
  const mem = new TestGuestMemory({ regions: plans, rng: rng.fork() });
  const driver: Driver =
    o.layout === 'split'
      ? new SplitDriver({ mem, size: o.size, eventIdx: o.eventIdx, indirect: o.indirect, startIndex: typeof o.start === 'number' ? o.start : 0 })
      : new PackedDriver({ mem, size: o.size, eventIdx: o.eventIdx, indirect: o.indirect, ...(typeof o.start === 'object' ? { start: o.start } : {}) });
  return { rng, mem, driver };
}

/** A random well-formed chain: readable buffers then writable ones, maybe indirect, maybe crossing a region boundary. */
function randomChain(rng: SeededRandom, d: Driver, o: { indirect: boolean; cross: boolean; maxBuffers?: number }): ChainSpec {
  const free = d instanceof SplitDriver ? d.freeDescriptorCount : d.freeSlots;
  const indirect = o.indirect && rng.bool(0.4);
  const maxBuffers = Math.max(1, Math.min(o.maxBuffers ?? 4, indirect ? d.size : free));
  const n = rng.int(1, maxBuffers);
  const readable = rng.int(0, n);
  const buffers: BufferSpec[] = [];
  for (let i = 0; i < n; i++) buffers.push({ len: rng.int(1, 300), write: i >= readable });
  if (o.cross && d.mem.canCross && rng.bool(0.5)) {
    const b = rng.pick(buffers);
    b.len = Math.max(b.len, 2);
    b.cross = true;
  }
  return { buffers, indirect };
}

function slotsOf(d: Driver, spec: ChainSpec): number {
  return d instanceof SplitDriver ? (spec.indirect ? 1 : spec.buffers.length) : spec.indirect ? 1 : spec.buffers.length;
}

function freeOf(d: Driver): number {
  return d instanceof SplitDriver ? d.freeDescriptorCount : d.freeSlots;
}

/** Adds up to `count` random chains while they fit. */
function addChains(rng: SeededRandom, d: Driver, count: number, o: { indirect: boolean; cross: boolean; maxBuffers?: number }): BuiltChain[] {
  const out: BuiltChain[] = [];
  for (let i = 0; i < count; i++) {
    const spec = randomChain(rng, d, o);
    if (slotsOf(d, spec) > freeOf(d)) break;
    out.push(d.add(spec));
  }
  return out;
}

/**
 * Sets the driver's interrupt suppression so that pushing `slots` more ring slots from the device position `from`
 * does (want) or does not raise an interrupt, using every mechanism the configuration has.
 */
function setSuppression(rng: SeededRandom, d: Driver, from: RingPosition, slots: number, want: boolean): void {
  if (d instanceof SplitDriver) {
    if (d.eventIdx) {
      const at = want ? from.pos + rng.int(0, slots - 1) : from.pos + slots + rng.int(0, 2);
      d.setUsedEvent(at & 0xffff);
      if (rng.bool()) d.setNoInterrupt(rng.bool()); // ignored with EVENT_IDX: a device must not look at it
    } else {
      d.setNoInterrupt(!want);
    }
    return;
  }
  if (d.eventIdx && rng.bool(0.7)) {
    const at = want ? d.advance(from, rng.int(0, slots - 1)) : d.advance(from, slots + rng.int(0, 2));
    d.setDriverEvent(RING_EVENT_FLAGS_DESC, at.pos, at.wrap);
  } else {
    d.setDriverEvent(want ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE);
  }
}

interface RoundsOptions {
  rounds: number;
  cross: boolean;
  maxChains?: number;
  maxBuffers?: number;
  outOfOrder?: boolean;
}

/**
 * The common valid scenario: rounds of (driver makes chains available, device disables notifications, pops them
 * all, re-enables (sometimes the driver adds more meanwhile, so enable reports them), pushes them back in some order
 * with some lengths, asks whether to interrupt, and the driver reads the used elements).
 */
function rounds(name: string, description: string, o: SetupOptions, r: RoundsOptions): Fixture {
  const { rng, mem, driver } = setup(o);
  const rec = new FixtureRecorder(name, description, o.seed, mem, driver);
  const chainOpts = { indirect: o.indirect, cross: r.cross, ...(r.maxBuffers !== undefined ? { maxBuffers: r.maxBuffers } : {}) };
  rec.available(...addChains(rng, driver, rng.int(1, r.maxChains ?? 4), chainOpts));
  rec.begin();
  let popped = 0;
  for (let round = 0; round < r.rounds; round++) {
    // Buffers of a round are free again once the driver has read its used elements (the next round reuses them,
    // and its crossing buffers can take the region boundaries again).
    const mark = mem.mark();
    if (round > 0) rec.available(...addChains(rng, driver, rng.int(1, r.maxChains ?? 4), chainOpts));
    rec.hasAvailable().disableNotifications();
    const first = rec.popAll();
    let all = first;
    if (rng.bool(0.4) && freeOf(driver) > 0) {
      // The driver adds chains while notifications are off: enable must report them.
      const more = addChains(rng, driver, rng.int(1, 2), chainOpts);
      rec.available(...more);
      if (more.length > 0) {
        rec.enableNotifications();
        all = all.concat(rec.popAll());
      }
    }
    rec.popEmpty().enableNotifications().hasAvailable().inFlight();
    if (all.length === 0) continue;
    const slots = all.reduce((n, c) => n + (driver instanceof SplitDriver ? 1 : c.ringSlots), 0);
    const notifyFrom = rec.deviceUsedPosition;
    const order = all.map((_, i) => popped + i);
    if (r.outOfOrder ?? rng.bool(0.5)) rng.shuffle(order);
    for (const k of order) rec.pushUsed(k, rng.int(0, writableBytes(all[k - popped]!)));
    popped += all.length;
    // The suppression is set for the window since the last needsNotification() call; if the window since the last
    // call that returned true would decide otherwise (devices differ there), ask for the interrupt instead.
    setSuppression(rng, driver, notifyFrom, slots, rng.bool());
    if (rec.notificationAmbiguous) setSuppression(rng, driver, notifyFrom, slots, true);
    // A packed window longer than the ring (several laps since the last interrupt) has no linear reading: ENABLE.
    if (rec.notificationAmbiguous && driver instanceof PackedDriver) driver.setDriverEvent(RING_EVENT_FLAGS_ENABLE);
    rec.needsNotification().inFlight().checkUsed();
    if (round > 0) mem.release(mark);
  }
  rec.notBroken();
  return rec.finish();
}

/** A valid prefix (chains popped, pushed, read back), then one malformed chain: pop must name its error. */
function errorCase(layout: Layout, c: MalformedCase, seed: number): Fixture {
  const rng0 = new SeededRandom(seed);
  const size = c.exactSize ?? (layout === 'split' ? rng0.pick([4, 8, 16, 32].filter((s) => s <= (c.maxSize ?? 32768))) : rng0.pick([5, 8, 12, 16].filter((s) => s <= (c.maxSize ?? 32768))));
  const indirect = c.indirect ?? rng0.bool();
  const eventIdx = rng0.bool();
  const wrapStart = rng0.bool(0.3);
  const start: number | RingPosition = layout === 'split' ? (wrapStart ? 0xffff - rng0.int(0, 2) : 0) : wrapStart ? { pos: size - 1, wrap: false } : { pos: 0, wrap: true };
  const o: SetupOptions = { layout, size, eventIdx, indirect, seed, start, extra: Math.max(0x4000, c.minRegionSize ?? 0), regions: c.minRegionSize ? 2 : 3 };
  const { rng, mem, driver } = setup(o);
  const rec = new FixtureRecorder(
    `${layout}-error-${c.name}`,
    `${c.kind}: ${c.description} (after a valid prefix; ${eventIdx ? 'EVENT_IDX' : 'no EVENT_IDX'}, ${indirect ? 'INDIRECT_DESC' : 'no INDIRECT_DESC'})`,
    seed,
    mem,
    driver,
  );
  const prefix = addChains(rng, driver, rng.int(1, 2), { indirect, cross: true, maxBuffers: 3 });
  rec.available(...prefix).begin();
  rec.popAll().forEach((chain, k) => rec.pushUsed(k, rng.int(0, writableBytes(chain))));
  rec.checkUsed().popEmpty();
  c.build(driver);
  rec.hasAvailable(true).popError(c.kind);
  return rec.finish();
}

export function recordAll(): Fixture[] {
  const out: Fixture[] = [];
  let seed = 1000;
  for (const layout of ['split', 'packed'] as const) {
    for (const eventIdx of [false, true]) {
      for (const indirect of [false, true]) {
        const tag = `${eventIdx ? 'evidx' : 'noevidx'}-${indirect ? 'indirect' : 'direct'}`;
        out.push(
          rounds(
            `${layout}-features-${tag}`,
            `${layout} queue of 16, ${eventIdx ? 'EVENT_IDX' : 'no EVENT_IDX'}, ${indirect ? 'INDIRECT_DESC' : 'no INDIRECT_DESC'}: 5 rounds of make-available / pop / enable / push / notify / read used`,
            { layout, size: 16, eventIdx, indirect, seed: seed++ },
            { rounds: 5, cross: true },
          ),
        );
      }
    }
  }
  out.push(
    rounds('split-wrap-16bit-evidx', 'split queue of 8 starting at index 65530: avail and used indexes and used_event wrap past 65535', { layout: 'split', size: 8, eventIdx: true, indirect: true, seed: seed++, start: 65530 }, { rounds: 8, cross: true }),
    rounds('split-wrap-16bit-noevidx', 'split queue of 4 starting at index 65533, flag-based suppression, indexes wrap past 65535', { layout: 'split', size: 4, eventIdx: false, indirect: false, seed: seed++, start: 65533 }, { rounds: 8, cross: false }),
    rounds('packed-wrap-evidx', 'packed queue of 8 starting at slot 5 with wrap counter 0: chains wrap around the ring end (the counter flips inside a chain), DESC event suppression across laps', { layout: 'packed', size: 8, eventIdx: true, indirect: true, seed: seed++, start: { pos: 5, wrap: false } }, { rounds: 10, cross: false, maxBuffers: 5 }),
    rounds('packed-wrap-noevidx', 'packed queue of 6 (not a power of two) starting at slot 3: several laps with ENABLE/DISABLE suppression', { layout: 'packed', size: 6, eventIdx: false, indirect: false, seed: seed++, start: { pos: 3, wrap: true } }, { rounds: 10, cross: false }),
    rounds('packed-odd-size-7', 'packed queue of 7, many laps, out-of-order completion', { layout: 'packed', size: 7, eventIdx: true, indirect: false, seed: seed++ }, { rounds: 12, cross: false, outOfOrder: true, maxBuffers: 3 }),
    rounds('split-max-size-32768', 'split queue of 32768 (the largest) starting at index 65534', { layout: 'split', size: 32768, eventIdx: true, indirect: true, seed: seed++, start: 65534 }, { rounds: 3, cross: true, maxChains: 6 }),
    rounds('packed-max-size-32768', 'packed queue of 32768 (the largest) starting two slots before the ring end with wrap counter 0', { layout: 'packed', size: 32768, eventIdx: true, indirect: true, seed: seed++, start: { pos: 32766, wrap: false } }, { rounds: 3, cross: true, maxChains: 6 }),
    rounds('split-max-size-32768-noevidx', 'split queue of 32768, no EVENT_IDX, no INDIRECT_DESC', { layout: 'split', size: 32768, eventIdx: false, indirect: false, seed: seed++ }, { rounds: 2, cross: false }),
    rounds('split-region-crossing', 'split queue over 8 adjacent regions: buffers (direct and in indirect tables) that cross region boundaries', { layout: 'split', size: 16, eventIdx: true, indirect: true, seed: seed++, regions: 8, adjacent: true }, { rounds: 6, cross: true, maxBuffers: 3 }),
    rounds('packed-region-crossing', 'packed queue over 8 adjacent regions: buffers that cross region boundaries', { layout: 'packed', size: 16, eventIdx: false, indirect: true, seed: seed++, regions: 8, adjacent: true }, { rounds: 6, cross: true, maxBuffers: 3 }),
    rounds('split-high-gpa', 'split queue whose rings and buffers are above 4 GiB (descriptor addresses with a non-zero high word)', { layout: 'split', size: 32, eventIdx: true, indirect: true, seed: seed++, high: true }, { rounds: 4, cross: true }),
    rounds('packed-high-gpa', 'packed queue whose rings and buffers are above 4 GiB', { layout: 'packed', size: 32, eventIdx: true, indirect: true, seed: seed++, high: true }, { rounds: 4, cross: true }),
    rounds('split-size-1', 'split queue of 1: every chain is one descriptor, the index wraps every round', { layout: 'split', size: 1, eventIdx: true, indirect: false, seed: seed++, start: 65534 }, { rounds: 5, cross: false, maxChains: 1 }),
    rounds('packed-size-1', 'packed queue of 1: the wrap counter flips on every chain', { layout: 'packed', size: 1, eventIdx: true, indirect: true, seed: seed++ }, { rounds: 5, cross: false, maxChains: 1 }),
    rounds('split-out-of-order', 'split queue of 32, many chains returned in shuffled order', { layout: 'split', size: 32, eventIdx: false, indirect: true, seed: seed++, regions: 4 }, { rounds: 4, cross: true, maxChains: 8, outOfOrder: true }),
    rounds('packed-out-of-order', 'packed queue of 32, many chains returned in shuffled order (buffer ids, not slots, identify them)', { layout: 'packed', size: 32, eventIdx: true, indirect: true, seed: seed++, regions: 4 }, { rounds: 4, cross: true, maxChains: 8, outOfOrder: true }),
  );
  out.push(fullRingChain('split', seed++), fullRingChain('packed', seed++));
  for (const layout of ['split', 'packed'] as const) {
    for (const c of MALFORMED_CASES) {
      if (c.layouts.includes(layout)) out.push(errorCase(layout, c, seed++));
    }
  }
  return out;
}

/** Boundaries that are valid: a direct chain of exactly the queue size and an indirect table of exactly that many entries. */
function fullRingChain(layout: Layout, seed: number): Fixture {
  const { rng, mem, driver } = setup({ layout, size: 8, eventIdx: false, indirect: true, seed, start: layout === 'split' ? 0 : { pos: 3, wrap: true } });
  const rec = new FixtureRecorder(
    `${layout}-full-ring-chain`,
    'the longest valid chains: a direct chain of exactly the queue size (8) descriptors, then an indirect table of exactly 8 entries',
    seed,
    mem,
    driver,
  );
  const specOf = (n: number, indirect: boolean): ChainSpec => ({
    buffers: Array.from({ length: n }, (_, i) => ({ len: rng.int(1, 64), write: i >= 5 })),
    indirect,
  });
  rec.available(driver.add(specOf(8, false))).begin();
  rec.pop();
  rec.popEmpty().pushUsed(0, 7).checkUsed();
  rec.available(driver.add(specOf(8, true)));
  rec.pop();
  rec.pushUsed(1, 0).checkUsed().notBroken();
  return rec.finish();
}

export function fixtureFileName(f: Fixture): string {
  return `${f.name}.json`;
}

/** Lines no longer than this hold a whole object or array (segments, used elements, steps stay on one line). */
const INLINE_WIDTH = 120;

/** JSON, one line per value that fits in INLINE_WIDTH, indented otherwise: readable diffs, small files. */
export function serialize(f: Fixture): string {
  const write = (v: unknown, indent: string): string => {
    const flat = JSON.stringify(v);
    if (v === null || typeof v !== 'object' || flat.length + indent.length <= INLINE_WIDTH) return flat;
    const inner = indent + ' ';
    if (Array.isArray(v)) return `[\n${v.map((x) => inner + write(x, inner)).join(',\n')}\n${indent}]`;
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
    return `{\n${entries.map(([k, x]) => `${inner}${JSON.stringify(k)}: ${write(x, inner)}`).join(',\n')}\n${indent}}`;
  };
  return write(f, '') + '\n';
}

function main(): void {
  const fixtures = recordAll();
  mkdirSync(FIXTURE_DIR, { recursive: true });
  const names = new Set(fixtures.map(fixtureFileName));
  if (names.size !== fixtures.length) throw new Error('two fixtures share a name');
  for (const old of readdirSync(FIXTURE_DIR)) {
    if (old.endsWith('.json') && !names.has(old)) unlinkSync(join(FIXTURE_DIR, old));
  }
  for (const f of fixtures) writeFileSync(join(FIXTURE_DIR, fixtureFileName(f)), serialize(f));
  console.log(`wrote ${fixtures.length} fixtures to ${FIXTURE_DIR}`);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) main();
