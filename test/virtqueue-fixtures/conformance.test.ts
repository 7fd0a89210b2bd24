// Conformance of our device-side queues against the driver-side test kit, feature by feature: the kit builds
// rings the way a guest driver does (random buffer placement, region-crossing buffers, indirect tables, index
// wrap), the device pops, reads the request bytes, writes a response and returns the chain; the kit checks what
// the device saw, what it wrote, the used elements and the notification suppression.

import t, { type Test } from 'tap';
import { SplitQueue, PackedQueue, VirtqueueError, createQueue } from '../../vmm-device/virtqueue/index.ts';
import type { DescriptorChain } from '../../vmm-device/virtqueue/chain.ts';
import type { DeviceQueue } from '../../vmm-device/virtqueue/queue.ts';
import {
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
} from '../../vmm-device/virtqueue/constants.ts';
import {
  MALFORMED_CASES,
  PackedDriver,
  SeededRandom,
  SplitDriver,
  TestGuestMemory,
  randomLayout,
  writableBytes,
  type BuiltChain,
  type ChainSpec,
  type Layout,
  type RingPosition,
  type VirtqDriver,
} from '../../guest-driver-spec/testkit/index.ts';

interface Config {
  layout: Layout;
  size: number;
  eventIdx: boolean;
  indirect: boolean;
  seed: number;
  start?: number | RingPosition;
  regions?: number;
  adjacent?: boolean | 'some';
  high?: boolean;
  extra?: number;
}

function build(c: Config): { rng: SeededRandom; mem: TestGuestMemory; driver: VirtqDriver; queue: DeviceQueue } {
  const rng = new SeededRandom(c.seed);
  const ringBytes = c.layout === 'split' ? 24 * c.size + 12 : 16 * c.size + 8;
  const plans = randomLayout(rng, { regions: c.regions ?? 3, minRegionSize: ringBytes + (c.extra ?? 0x8000), adjacent: c.adjacent ?? 'some', high: c.high ?? false });
  const mem = new TestGuestMemory({ regions: plans, rng: rng.fork() });
  const driver: VirtqDriver =
    c.layout === 'split'
      ? new SplitDriver({ mem, size: c.size, eventIdx: c.eventIdx, indirect: c.indirect, startIndex: typeof c.start === 'number' ? c.start : 0 })
      : new PackedDriver({ mem, size: c.size, eventIdx: c.eventIdx, indirect: c.indirect, ...(typeof c.start === 'object' ? { start: c.start } : {}) });
  const queue = c.layout === 'split' ? new SplitQueue(driver.queueOptions()) : new PackedQueue(driver.queueOptions());
  return { rng, mem, driver, queue };
}

function free(d: VirtqDriver): number {
  return d instanceof SplitDriver ? d.freeDescriptorCount : d.freeSlots;
}

function randomSpec(rng: SeededRandom, d: VirtqDriver, indirect: boolean): ChainSpec | undefined {
  const useIndirect = indirect && rng.bool(0.4);
  const room = useIndirect ? Math.min(d.size, 6) : Math.min(free(d), 5);
  if (room < 1 || free(d) < 1) return undefined;
  const n = rng.int(1, room);
  const readable = rng.int(0, n);
  const buffers = Array.from({ length: n }, (_, i) => ({ len: rng.int(1, 400), write: i >= readable, cross: false }));
  if (d.mem.canCross && rng.bool(0.3)) buffers[rng.int(0, n - 1)]!.cross = true;
  for (const b of buffers) if (b.cross) b.len = Math.max(b.len, 2);
  return { buffers, indirect: useIndirect };
}

/** Pops one chain and checks it against what the kit built: id, segments, the request bytes. */
function popAndCheck(t: Test, queue: DeviceQueue, expected: BuiltChain, what: string): DescriptorChain | undefined {
  const got = queue.pop();
  if (got === null || got instanceof VirtqueueError) {
    t.fail(`${what}: pop returned ${got === null ? 'null' : got.message}`);
    return undefined;
  }
  t.equal(got.id, expected.id, `${what}: id`);
  t.equal(got.ringSlots, expected.ringSlots, `${what}: ring slots`);
  t.same(got.describe(), expected.segments, `${what}: segments`);
  const request = got.reader().read(got.readableBytes);
  const payload = Buffer.concat(expected.payload);
  t.ok(Buffer.from(request).equals(payload), `${what}: the device reads the request bytes the driver wrote (${payload.length} B)`);
  return got;
}

/** Rounds of make-available, pop, respond, push, read used; checks everything the device did. */
function soak(t: Test, c: Config, rounds: number): void {
  const { rng, mem, driver, queue } = build(c);
  let chains = 0;
  for (let r = 0; r < rounds; r++) {
    const mark = mem.mark();
    const built: BuiltChain[] = [];
    for (let k = rng.int(1, 6); k > 0; k--) {
      const spec = randomSpec(rng, driver, c.indirect);
      if (spec === undefined) break;
      built.push(driver.add(spec));
    }
    t.equal(queue.hasAvailable(), built.length > 0, `round ${r}: hasAvailable`);
    const popped: { chain: DescriptorChain; built: BuiltChain }[] = [];
    for (const b of built) {
      const chain = popAndCheck(t, queue, b, `round ${r} chain ${b.id}`);
      if (chain === undefined) return;
      popped.push({ chain, built: b });
    }
    t.equal(queue.pop(), null, `round ${r}: nothing more`);
    t.equal(queue.inFlight, popped.length, `round ${r}: in flight`);
    if (rng.bool()) rng.shuffle(popped);
    const expectedUsed: { id: number; len: number }[] = [];
    for (const { chain, built: b } of popped) {
      const len = rng.int(0, writableBytes(b));
      const response = rng.fill(new Uint8Array(len));
      chain.writer().write(response);
      // The response landed in the writable segments, in order, across regions if need be.
      const landed = Buffer.concat(b.segments.filter((s) => s.write).map((s) => Buffer.from(mem.read(s.addr, s.len)))).subarray(0, len);
      t.ok(landed.equals(response), `round ${r}: response bytes of chain ${b.id} in guest memory`);
      queue.pushUsed(chain, len);
      expectedUsed.push({ id: b.id, len });
    }
    t.same(driver.readUsed(), expectedUsed, `round ${r}: used elements`);
    t.equal(queue.inFlight, 0, `round ${r}: nothing in flight`);
    chains += popped.length;
    mem.release(mark); // every buffer of the round is back with the driver
  }
  t.same(mem.checkGuards(), [], 'nothing written outside guest memory');
  t.equal(queue.broken, undefined, `queue healthy after ${chains} chains`);
}

/** Byte equality of two memory snapshots (Buffer.equals: tap's deep compare is too slow for megabytes). */
function sameRegions(a: Uint8Array[], b: Uint8Array[]): boolean {
  return a.length === b.length && a.every((x, i) => Buffer.from(x.buffer, x.byteOffset, x.byteLength).equals(b[i]!));
}

const layouts: Layout[] = ['split', 'packed'];
let seed = 500;

for (const layout of layouts) {
  for (const eventIdx of [false, true]) {
    for (const indirect of [false, true]) {
      const name = `${layout} EVENT_IDX=${eventIdx} INDIRECT=${indirect}`;
      t.test(`${name}: chains, request and response bytes, used elements`, async (t) => {
        soak(t, { layout, size: layout === 'split' ? 16 : 13, eventIdx, indirect, seed: seed++, regions: 4, adjacent: 'some' }, 40);
      });
    }
  }
  t.test(`${layout}: index wrap`, async (t) => {
    const start = layout === 'split' ? 65531 : { pos: 6, wrap: false };
    soak(t, { layout, size: 8, eventIdx: true, indirect: true, seed: seed++, start }, 60);
  });
  t.test(`${layout}: buffers crossing region boundaries`, async (t) => {
    soak(t, { layout, size: 16, eventIdx: false, indirect: true, seed: seed++, regions: 12, adjacent: true }, 20);
  });
  t.test(`${layout}: rings and buffers above 4 GiB`, async (t) => {
    soak(t, { layout, size: 32, eventIdx: true, indirect: true, seed: seed++, high: true }, 10);
  });
  t.test(`${layout}: queue of 32768, every descriptor in use at once`, async (t) => {
    const { driver, queue, mem } = build({ layout, size: 32768, eventIdx: true, indirect: false, seed: seed++, regions: 2, adjacent: false, extra: 0x600000, start: layout === 'split' ? 65000 : { pos: 32000, wrap: true } });
    const built: BuiltChain[] = [];
    for (let i = 0; i < 32768; i++) built.push(driver.add({ buffers: [{ len: 1, write: true }] }));
    let same = 0;
    const popped: DescriptorChain[] = [];
    for (const b of built) {
      const c = queue.pop();
      if (c !== null && !(c instanceof VirtqueueError) && c.id === b.id && c.segments[0] === b.segments[0]!.addr) same++;
      if (c !== null && !(c instanceof VirtqueueError)) popped.push(c);
    }
    t.equal(same, 32768, 'all 32768 chains popped as built');
    t.equal(queue.pop(), null, 'then nothing');
    for (const c of popped) queue.pushUsed(c, 1);
    const used = driver.readUsed();
    t.equal(used.length, 32768, 'all returned');
    t.same(used.slice(0, 3), built.slice(0, 3).map((b) => ({ id: b.id, len: 1 })), 'in order');
    t.same(mem.checkGuards(), [], 'guards intact');
  });
}

t.test('every malformed case gives its named error, breaks the queue, and touches nothing outside memory', async (t) => {
  for (const layout of layouts) {
    for (const c of MALFORMED_CASES.filter((m) => m.layouts.includes(layout))) {
      for (const eventIdx of [false, true]) {
        const indirect = c.indirect ?? eventIdx;
        const size = c.exactSize ?? Math.min(c.maxSize ?? 16, 16);
        const { driver, queue, mem } = build({ layout, size, eventIdx, indirect, seed: seed++, extra: Math.max(0x8000, c.minRegionSize ?? 0), regions: c.minRegionSize ? 2 : 3 });
        const ok = driver.add({ buffers: [{ len: 32 }, { len: 16, write: true }] });
        const first = popAndCheck(t, queue, ok, `${layout}/${c.name}: valid chain before`);
        if (first !== undefined) queue.pushUsed(first, 3);
        t.same(driver.readUsed(), [{ id: ok.id, len: 3 }], `${layout}/${c.name}: valid chain returned`);
        c.build(driver);
        const before = mem.snapshot();
        const r = queue.pop();
        t.ok(r instanceof VirtqueueError && r.kind === c.kind, `${layout}/${c.name} (EVENT_IDX=${eventIdx}): ${c.kind}, got ${r instanceof VirtqueueError ? r.kind : String(r)}`);
        t.equal(queue.broken?.kind, c.kind, `${layout}/${c.name}: queue broken with that kind`);
        const again = queue.pop();
        t.ok(again === null || (again instanceof VirtqueueError && again.kind === c.kind), `${layout}/${c.name}: a broken queue pops no chain`);
        t.ok(sameRegions(mem.snapshot(), before), `${layout}/${c.name}: a failed pop writes nothing`);
        t.same(mem.checkGuards(), [], `${layout}/${c.name}: guards intact`);
      }
    }
  }
});

t.test('split notification suppression', async (t) => {
  await t.test('without EVENT_IDX: used.flags NO_NOTIFY and avail.flags NO_INTERRUPT', async (t) => {
    const { driver, queue } = build({ layout: 'split', size: 8, eventIdx: false, indirect: false, seed: seed++ });
    const d = driver as SplitDriver;
    queue.disableNotifications();
    t.equal(d.kickNeeded(d.availIdx, d.availIdx + 1), false, 'disabled: the driver must not kick');
    t.equal(queue.enableNotifications(), false, 'enable: nothing arrived meanwhile');
    t.equal(d.kickNeeded(d.availIdx, d.availIdx + 1), true, 'enabled: the driver must kick');
    queue.disableNotifications();
    d.add({ buffers: [{ len: 8 }] });
    t.equal(queue.enableNotifications(), true, 'enable: a chain arrived while disabled');
    const c = queue.pop() as DescriptorChain;
    queue.pushUsed(c, 0);
    d.setNoInterrupt(true);
    t.equal(queue.needsNotification(), false, 'NO_INTERRUPT: no interrupt');
    d.add({ buffers: [{ len: 8 }] });
    queue.pushUsed(queue.pop() as DescriptorChain, 0);
    d.setNoInterrupt(false);
    t.equal(queue.needsNotification(), true, 'flag clear: interrupt');
  });
  await t.test('with EVENT_IDX: avail_event and used_event, across the 16-bit wrap', async (t) => {
    const { driver, queue } = build({ layout: 'split', size: 8, eventIdx: true, indirect: false, seed: seed++, start: 65533 });
    const d = driver as SplitDriver;
    t.equal(queue.enableNotifications(), false, 'enable: nothing available');
    t.equal(d.availEvent, 65533, 'avail_event = the next index the device will read');
    t.equal(d.kickNeeded(d.availIdx, d.availIdx + 1), true, 'so the driver kicks for its next buffer');
    const chains = [0, 1, 2, 3, 4].map(() => d.add({ buffers: [{ len: 8, write: true }] }));
    const popped = chains.map(() => queue.pop() as DescriptorChain);
    d.setUsedEvent(65533); // interrupt when used idx passes 65533
    d.setNoInterrupt(true); // ignored with EVENT_IDX
    queue.pushUsed(popped[0]!, 1);
    t.equal(queue.needsNotification(), true, 'used idx 65533 -> 65534 passes used_event 65533');
    d.setUsedEvent(1); // after the wrap: used idx must pass 1
    queue.pushUsed(popped[1]!, 1);
    queue.pushUsed(popped[2]!, 1); // 65534 -> 0 (wrapped)
    t.equal(queue.needsNotification(), false, 'used idx 65534 -> 0 does not pass 1');
    queue.pushUsed(popped[3]!, 1);
    queue.pushUsed(popped[4]!, 1); // 0 -> 2
    t.equal(queue.needsNotification(), true, 'used idx 0 -> 2 passes 1');
    t.same(d.readUsed().map((u) => u.id), chains.map((c) => c.id), 'used elements across the wrap');
    queue.disableNotifications();
    d.add({ buffers: [{ len: 4 }] });
    t.equal(queue.enableNotifications(), true, 'enable reports the chain added meanwhile');
  });
});

t.test('packed notification suppression', async (t) => {
  await t.test('without EVENT_IDX: ENABLE / DISABLE both ways', async (t) => {
    const { driver, queue } = build({ layout: 'packed', size: 8, eventIdx: false, indirect: false, seed: seed++ });
    const d = driver as PackedDriver;
    queue.disableNotifications();
    t.equal(d.deviceEvent.flags, RING_EVENT_FLAGS_DISABLE, 'device event area DISABLE');
    t.equal(d.kickNeeded(d.next, d.advance(d.next, 1)), false, 'the driver must not kick');
    t.equal(queue.enableNotifications(), false, 'nothing arrived');
    t.equal(d.kickNeeded(d.next, d.advance(d.next, 1)), true, 'the driver must kick');
    d.add({ buffers: [{ len: 8, write: true }] });
    const c = queue.pop() as DescriptorChain;
    queue.pushUsed(c, 2);
    d.setDriverEvent(RING_EVENT_FLAGS_DISABLE);
    t.equal(queue.needsNotification(), false, 'driver DISABLE: no interrupt');
    d.add({ buffers: [{ len: 8, write: true }] });
    queue.pushUsed(queue.pop() as DescriptorChain, 2);
    d.setDriverEvent(RING_EVENT_FLAGS_ENABLE);
    t.equal(queue.needsNotification(), true, 'driver ENABLE: interrupt');
  });
  await t.test('with EVENT_IDX: DESC off/wrap across a lap', async (t) => {
    const { driver, queue } = build({ layout: 'packed', size: 4, eventIdx: true, indirect: false, seed: seed++, start: { pos: 2, wrap: true } });
    const d = driver as PackedDriver;
    t.equal(queue.enableNotifications(), false, 'nothing available');
    t.equal(d.kickNeeded(d.next, d.advance(d.next, 1)), true, 'the driver must kick its next buffer');
    const a = d.add({ buffers: [{ len: 8, write: true }] }); // slot 2
    const b = d.add({ buffers: [{ len: 8, write: true }, { len: 8, write: true }] }); // slots 3, 0 (wraps)
    const pa = queue.pop() as DescriptorChain;
    const pb = queue.pop() as DescriptorChain;
    t.equal(pb.ringSlots, 2, 'a chain across the ring end takes 2 slots');
    d.setDriverEvent(RING_EVENT_FLAGS_DESC, 0, false); // interrupt at slot 0 of the next lap (wrap 0)
    queue.pushUsed(pa, 1); // used position 2 -> 3
    t.equal(queue.needsNotification(), false, 'position 2 -> 3 does not reach slot 0 of the next lap');
    queue.pushUsed(pb, 1); // 3 -> 1 of the next lap
    t.equal(queue.needsNotification(), true, 'position 3 -> 1 (next lap) passes slot 0 of that lap');
    t.same(d.readUsed(), [{ id: a.id, len: 1 }, { id: b.id, len: 1 }], 'used descriptors read back across the wrap');
  });
});

t.test('stop and resume: getState() gives a new queue the position to continue from', async (t) => {
  for (const layout of layouts) {
    const start = layout === 'split' ? 65534 : { pos: 5, wrap: true };
    const { driver, queue } = build({ layout, size: 8, eventIdx: true, indirect: true, seed: seed++, start });
    const first = [0, 1, 2].map(() => driver.add({ buffers: [{ len: 16 }, { len: 16, write: true }] }));
    for (const b of first) {
      const c = popAndCheck(t, queue, b, `${layout}: before the stop`);
      if (c) queue.pushUsed(c, 4);
    }
    t.same(driver.readUsed().map((u) => u.id), first.map((b) => b.id), `${layout}: returned before the stop`);
    const state = queue.getState();
    if (driver instanceof SplitDriver) {
      t.same(state, { nextAvail: 1, nextUsed: 1 }, 'split: 65534 + 3 wraps to 1');
    } else {
      t.same(state, { nextAvail: 3, nextUsed: 3, availWrap: false, usedWrap: false }, 'packed: slot 5 + 6 slots = slot 3 of the next lap');
    }
    const resumed = createQueue(layout, { ...driver.queueOptions(), state });
    const later = [0, 1].map(() => driver.add({ buffers: [{ len: 8 }, { len: 8, write: true }], indirect: true }));
    for (const b of later) {
      const c = popAndCheck(t, resumed, b, `${layout}: after the resume`);
      if (c) resumed.pushUsed(c, 2);
    }
    t.equal(resumed.pop(), null, `${layout}: nothing more after the resume`);
    t.same(driver.readUsed(), later.map((b) => ({ id: b.id, len: 2 })), `${layout}: the resumed queue returns chains where the driver looks`);
  }
});

t.test('createQueue builds both layouts from kit options', async (t) => {
  for (const layout of layouts) {
    const { driver } = build({ layout, size: 4, eventIdx: false, indirect: false, seed: seed++ });
    const q = createQueue(layout, driver.queueOptions());
    t.equal(q.layout, layout);
    t.equal(q.size, 4);
  }
});
