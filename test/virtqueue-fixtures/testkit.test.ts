// The driver-side test kit's own pieces: what other people rely on when they test their devices with it.

import t from 'tap';
import {
  GUARD_BYTE,
  MALFORMED_CASES,
  PackedDriver,
  SeededRandom,
  SplitDriver,
  TestGuestMemory,
  decodeDescriptor,
  describeFlags,
  encodeDescriptor,
  eventTriggered,
  randomLayout,
} from '../../guest-driver-spec/testkit/index.ts';
import { chunksOf, fromHex } from '../../guest-driver-spec/testkit/fixture-format.ts';
import { VIRTQUEUE_ERROR_KINDS } from '../../vmm-device/virtqueue/errors.ts';
import {
  RING_EVENT_FLAGS_DESC,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
} from '../../vmm-device/virtqueue/constants.ts';

t.test('the PRNG is reproducible from its seed', async (t) => {
  const a = new SeededRandom(42);
  const b = new SeededRandom(42);
  const xs = Array.from({ length: 100 }, () => a.nextU32());
  t.same(Array.from({ length: 100 }, () => b.nextU32()), xs, 'same seed, same sequence');
  t.not(new SeededRandom(43).nextU32(), xs[0], 'another seed, another sequence');
  const r = new SeededRandom(1);
  for (let i = 0; i < 1000; i++) {
    const v = r.int(-3, 3);
    if (v < -3 || v > 3 || !Number.isInteger(v)) t.fail(`int out of range: ${v}`);
  }
});

t.test('test memory: regions, holes, gaps, crossing buffers, guards', async (t) => {
  const mem = new TestGuestMemory({
    regions: [
      { gpa: 0x1000, size: 0x4000 },
      { gpa: 0x5000, size: 0x4000 }, // adjacent to the first
      { gpa: 0x20000, size: 0x4000 }, // after a hole
    ],
    rng: 9,
  });
  const a = mem.alloc(100);
  const b = mem.alloc(100);
  t.ok(b >= a + 100 || b + 100 <= a, 'allocations do not overlap');
  t.ok(mem.memory.isValidRange(a, 100) && mem.memory.isValidRange(b, 100), 'inside guest memory');
  const x = mem.allocCrossing(64);
  t.ok(x < 0x5000 && x + 64 > 0x5000, 'a crossing buffer straddles the boundary at 0x5000');
  t.notOk(mem.canCross, 'the only boundary is taken');
  t.throws(() => mem.allocCrossing(64), /no free boundary/, 'a second one cannot be placed');
  const hole = mem.hole(0x100);
  t.notOk(mem.memory.isValidRange(hole, 1), 'hole() is outside every region');
  const mark = mem.mark();
  const c = mem.alloc(32);
  mem.release(mark);
  t.equal(mem.alloc(32, { gap: false }) <= c, true, 'release() frees what was allocated after the mark');
  t.same(mem.checkGuards(), [], 'guards intact');
  new Uint8Array(mem.backing[1]!)[mem.guardBytes + 0x4000] = GUARD_BYTE ^ 1; // one byte past region 1
  t.match(mem.checkGuards().join(), /region 1 .*trailing guard/, 'a write past a region end is caught');
  const log: number[] = [];
  mem.onWrite((gpa) => log.push(gpa));
  mem.write(a, new Uint8Array([1, 2]));
  t.same(log, [a], 'driver writes are reported');
});

t.test('random layouts are valid memory maps', async (t) => {
  const rng = new SeededRandom(3);
  for (let i = 0; i < 50; i++) {
    const plans = randomLayout(rng, { regions: rng.int(1, 8), minRegionSize: 0x1000, adjacent: rng.pick([true, false, 'some'] as const), high: rng.bool() });
    t.doesNotThrow(() => new TestGuestMemory({ regions: plans, rng }), `layout ${i}`);
  }
});

t.test('descriptor encoding round-trips, u64 addresses included', async (t) => {
  for (const layout of ['split', 'packed'] as const) {
    const d = { addr: (1n << 64n) - 1n, len: 0xffffffff, flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, next: 7, id: 9 };
    const back = decodeDescriptor(layout, encodeDescriptor(layout, d));
    t.same(back, { addr: d.addr, len: d.len, flags: d.flags, nextOrId: layout === 'split' ? 7 : 9 }, layout);
  }
  t.equal(describeFlags(VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_AVAIL | 0x40), 'INDIRECT|AVAIL|0x40');
  t.equal(describeFlags(0), '-');
});

t.test('split driver: chains, indexes and used elements', async (t) => {
  const mem = new TestGuestMemory({ regions: [{ gpa: 0x10000, size: 0x10000 }], rng: 5 });
  const d = new SplitDriver({ mem, size: 4, startIndex: 0xfffe, indirect: true });
  const c1 = d.add({ buffers: [{ len: 10 }, { len: 20, write: true }] });
  const c2 = d.add({ buffers: [{ len: 30 }, { len: 40 }], indirect: true });
  t.equal(d.availIdx, 0, 'avail idx wrapped from 0xfffe to 0');
  t.equal(mem.readU16(d.availAddr + 2), 0, 'and is in memory');
  t.same([mem.readU16(d.availAddr + 4 + 2 * 2), mem.readU16(d.availAddr + 4 + 2 * 3)], [c1.id, c2.id], 'ring entries at 0xfffe % 4 and 0xffff % 4');
  const head = d.readDescriptor(c1.id);
  t.equal(head.flags, VIRTQ_DESC_F_NEXT, 'head: NEXT');
  t.equal(d.readDescriptor(head.nextOrId).flags, VIRTQ_DESC_F_WRITE, 'then the writable one');
  t.equal(d.readDescriptor(c2.id).flags, VIRTQ_DESC_F_INDIRECT, 'indirect head');
  t.equal(c2.payload.length, 2, 'readable payload recorded');
  const inMemory = Buffer.concat([mem.read(c2.segments[0]!.addr, 30), mem.read(c2.segments[1]!.addr, 40)]);
  t.ok(Buffer.concat(c2.payload).equals(inMemory), 'payload is in memory');
  // A device returns c2 then c1 (as the used ring would show).
  mem.writeU32(d.usedAddr + 4 + 8 * 2, c2.id);
  mem.writeU32(d.usedAddr + 8 + 8 * 2, 5);
  mem.writeU32(d.usedAddr + 4 + 8 * 3, c1.id);
  mem.writeU32(d.usedAddr + 8 + 8 * 3, 6);
  mem.writeU16(d.usedAddr + 2, 0);
  const before = d.freeDescriptorCount;
  t.same(d.readUsed(), [{ id: c2.id, len: 5 }, { id: c1.id, len: 6 }], 'used elements across the wrap');
  t.equal(d.freeDescriptorCount, before + 3, 'their descriptors are free again');
});

t.test('packed driver: wrap counters, ids, used descriptors', async (t) => {
  const mem = new TestGuestMemory({ regions: [{ gpa: 0x10000, size: 0x10000 }], rng: 6 });
  const d = new PackedDriver({ mem, size: 4, start: { pos: 3, wrap: true } });
  const c = d.add({ buffers: [{ len: 8 }, { len: 8, write: true }] });
  t.same(c.descriptors, [3, 0], 'a chain wraps around the ring end');
  t.equal(d.readDescriptor(3).flags, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_AVAIL, 'slot 3: available in lap 1');
  t.equal(d.readDescriptor(0).flags, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_USED, 'slot 0: available in lap 0 (AVAIL=0, USED=1)');
  t.same(d.next, { pos: 1, wrap: false }, 'driver position after the chain');
  // The device writes one used descriptor at slot 3 in lap 1.
  d.writeDescriptor(3, { addr: 0, len: 8, id: c.id, flags: VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED });
  t.same(d.readUsed(), [{ id: c.id, len: 8 }], 'read back');
  t.same(d.used, { pos: 1, wrap: false }, 'used position skips both slots of the chain');
  t.equal(d.freeSlots, 4, 'slots free again');
});

t.test('packed event rule (DESC) across a lap', async (t) => {
  const e = { flags: RING_EVENT_FLAGS_DESC, off: 0, wrap: false };
  t.equal(eventTriggered(e, 4, { pos: 2, wrap: true }, { pos: 3, wrap: true }), false, '2 -> 3 does not reach next lap slot 0');
  t.equal(eventTriggered(e, 4, { pos: 3, wrap: true }, { pos: 1, wrap: false }), true, '3 -> 1 (next lap) passes it');
  t.equal(eventTriggered({ ...e, wrap: true }, 4, { pos: 3, wrap: true }, { pos: 1, wrap: false }), false, 'slot 0 of the old lap was before');
});

t.test('every error kind has a malformed case', async (t) => {
  t.same([...new Set(MALFORMED_CASES.map((c) => c.kind))].sort(), [...VIRTQUEUE_ERROR_KINDS].sort());
});

t.test('fixture chunks: sparse and exact', async (t) => {
  const rng = new SeededRandom(11);
  for (let i = 0; i < 200; i++) {
    const bytes = new Uint8Array(rng.int(0, 300));
    for (let k = rng.int(0, 20); k > 0 && bytes.length > 0; k--) bytes[rng.int(0, bytes.length - 1)] = rng.int(1, 255);
    const back = new Uint8Array(bytes.length);
    for (const c of chunksOf(bytes)) back.set(fromHex(c.hex), c.offset);
    if (!Buffer.from(back).equals(Buffer.from(bytes))) t.fail(`case ${i}: chunks do not rebuild the bytes`);
  }
  t.same(chunksOf(new Uint8Array(64)), [], 'all zero: no chunk');
  t.pass('200 random byte strings rebuilt from their chunks');
});
