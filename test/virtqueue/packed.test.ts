// Direct unit tests of the packed queue (virtio 1.2 section 2.8) on hand-written rings: what pop returns for exact
// descriptor bytes, the used descriptors pushUsed writes, wrap counters over several laps of an odd-sized ring,
// event suppression in both directions, indirect tables, every error kind the packed layout can report, and
// stop/resume through QueueState.

import t from 'tap';
import { VirtqueueError, type VirtqueueErrorKind } from '../../vmm-device/virtqueue/index.ts';
import {
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL as AVAIL,
  VIRTQ_DESC_F_INDIRECT as IND,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_USED as USED,
  VIRTQ_DESC_F_WRITE as WRITE,
} from '../../vmm-device/abi/virtqueue.ts';
import { BUF_GPA, HIGH_GPA, HOLE_GPA, PackedRing, REGION0_SIZE, popChain, writeDesc } from './rings.ts';

t.test('pop returns the chain of consecutive descriptors with the id of the last; pushUsed writes a used descriptor', (t) => {
  const r = new PackedRing(8);
  r.add(
    [
      { addr: BUF_GPA, len: 16, flags: 0 },
      { addr: BUF_GPA + 0x100, len: 64, flags: 0 },
      { addr: BUF_GPA + 0x400, len: 100, flags: WRITE },
    ],
    6,
  );
  const q = r.queue();
  t.equal(q.hasAvailable(), true);
  const c = popChain(q);
  t.equal(c.id, 6, 'the buffer id');
  t.equal(c.ringSlots, 3, 'three ring slots');
  t.same(c.segments, [BUF_GPA, 16, BUF_GPA + 0x100, 64, BUF_GPA + 0x400, 100]);
  t.equal(c.readableCount, 2);
  t.equal(c.readableBytes, 80);
  t.equal(c.writableBytes, 100);
  t.equal(q.inFlight, 1);
  t.equal(q.pop(), null, 'slot 3 was never made available');
  t.equal(q.hasAvailable(), false);
  q.pushUsed(c, 42);
  const used = r.slot(0);
  t.equal(used.id, 6, 'used id');
  t.equal(used.len, 42, 'used len');
  t.equal(used.flags, AVAIL | USED | WRITE, 'AVAIL = USED = the used wrap counter, WRITE for a non-zero length');
  t.equal(q.inFlight, 0);
  t.same(q.getState(), { nextAvail: 3, availWrap: true, nextUsed: 3, usedWrap: true });
  t.end();
});

t.test('a used descriptor with length 0 has no WRITE flag; pushUsed refuses a bad length', (t) => {
  const r = new PackedRing(4);
  r.add([{ addr: BUF_GPA, len: 8, flags: 0 }], 1);
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }], 2);
  const q = r.queue();
  const a = popChain(q);
  const b = popChain(q);
  t.throws(() => q.pushUsed(a, 1), RangeError, 'a readable-only chain takes length 0 only');
  t.throws(() => q.pushUsed(b, 9), RangeError);
  t.throws(() => q.pushUsed(b, 0.5), RangeError);
  t.equal(r.slot(0).flags & USED, 0, 'nothing written');
  q.pushUsed(a, 0);
  t.same(r.slot(0), { addr: BUF_GPA, len: 0, id: 1, flags: AVAIL | USED });
  q.pushUsed(b, 8);
  t.same(r.slot(1), { addr: BUF_GPA, len: 8, id: 2, flags: AVAIL | USED | WRITE });
  t.end();
});

t.test('a descriptor with the bits of the wrong lap is not available', (t) => {
  const r = new PackedRing(4);
  r.raw(0, { addr: BUF_GPA, len: 8, flags: USED, next: 0 }); // the bits of the second lap
  t.equal(r.queue().pop(), null);
  r.raw(0, { addr: BUF_GPA, len: 8, flags: AVAIL | USED, next: 0 }); // a used descriptor of the first lap
  t.equal(r.queue().pop(), null);
  r.raw(0, { addr: BUF_GPA, len: 8, flags: AVAIL, next: 0 });
  t.equal(popChain(r.queue()).id, 0);
  t.end();
});

t.test('wrap counters over several laps of a 5-slot ring, chains straddling the end', (t) => {
  const r = new PackedRing(5);
  const q = r.queue();
  const ids: number[] = [];
  const usedFlags: number[] = [];
  for (let k = 0; k < 7; k++) {
    // Two-slot chains: positions 0-1, 2-3, 4-0 (straddles), 1-2, ...
    r.add(
      [
        { addr: BUF_GPA + 0x100 * k, len: 8, flags: 0 },
        { addr: BUF_GPA + 0x100 * k + 0x80, len: 8, flags: WRITE },
      ],
      k % 5,
    );
    const c = popChain(q);
    ids.push(c.id);
    t.equal(c.ringSlots, 2);
    const at = q.getState().nextUsed;
    q.pushUsed(c, 8);
    usedFlags.push(r.slot(at).flags & (AVAIL | USED));
  }
  t.same(ids, [0, 1, 2, 3, 4, 0, 1]);
  // Used positions 0, 2, 4 (lap 1), 1, 3 (lap 2), 0, 2 (lap 3): both bits set in laps 1 and 3, clear in lap 2.
  t.same(usedFlags, [AVAIL | USED, AVAIL | USED, AVAIL | USED, 0, 0, AVAIL | USED, AVAIL | USED]);
  t.same(q.getState(), { nextAvail: 4, availWrap: true, nextUsed: 4, usedWrap: true });
  t.equal(q.pop(), null);
  t.end();
});

t.test('stop and resume through QueueState, wrap counters included', (t) => {
  const r = new PackedRing(3);
  const q1 = r.queue();
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }, { addr: BUF_GPA + 8, len: 8, flags: WRITE }], 0); // slots 0-1
  const a = popChain(q1);
  q1.pushUsed(a, 4);
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }, { addr: BUF_GPA + 8, len: 8, flags: WRITE }], 1); // slots 2-0
  const held = popChain(q1); // straddles the end: the avail counter flips
  const saved = q1.getState();
  t.same(saved, { nextAvail: 1, availWrap: false, nextUsed: 2, usedWrap: true });
  r.add([{ addr: BUF_GPA + 16, len: 8, flags: WRITE }], 2); // slot 1 of lap 2
  const q2 = r.queue({ state: saved });
  const c = popChain(q2);
  t.equal(c.id, 2, 'the resumed queue pops the chain after the ones it popped before');
  q2.pushUsed(held, 16);
  t.same(r.slot(2), { addr: BUF_GPA, len: 16, id: 1, flags: AVAIL | USED | WRITE }, 'used at the saved position');
  q2.pushUsed(c, 8);
  t.same(r.slot(1), { addr: BUF_GPA + 16, len: 8, id: 2, flags: WRITE }, 'second lap: AVAIL and USED clear');
  t.same(q2.getState(), { nextAvail: 2, availWrap: false, nextUsed: 2, usedWrap: false });
  t.end();
});

t.test('device event suppression: disable, enable with and without EVENT_IDX, enable re-checks', (t) => {
  const r = new PackedRing(4);
  const plain = r.queue();
  plain.disableNotifications();
  t.equal(r.deviceEvent.flags, RING_EVENT_FLAGS_DISABLE);
  t.equal(plain.enableNotifications(), false);
  t.equal(r.deviceEvent.flags, RING_EVENT_FLAGS_ENABLE);
  const q = r.queue({ eventIdx: true });
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }, { addr: BUF_GPA + 8, len: 8, flags: WRITE }, { addr: BUF_GPA + 16, len: 8, flags: WRITE }], 0);
  popChain(q);
  q.disableNotifications();
  t.equal(r.deviceEvent.flags, RING_EVENT_FLAGS_DISABLE);
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }, { addr: BUF_GPA + 8, len: 8, flags: WRITE }], 1); // slots 3-0
  t.equal(q.enableNotifications(), true, 'a chain made available while off is reported');
  t.same(r.deviceEvent, { offWrap: 3 | 0x8000, flags: RING_EVENT_FLAGS_DESC }, 'kick me at slot 3 of the first lap');
  popChain(q);
  t.equal(q.enableNotifications(), false);
  t.same(r.deviceEvent, { offWrap: 1, flags: RING_EVENT_FLAGS_DESC }, 'slot 1 of the second lap (wrap bit clear)');
  t.end();
});

t.test('driver event suppression: needsNotification for ENABLE, DISABLE and DESC (EVENT_IDX)', (t) => {
  const r = new PackedRing(4);
  const q = r.queue({ eventIdx: true });
  for (let k = 0; k < 4; k++) r.add([{ addr: BUF_GPA + 0x100 * k, len: 8, flags: WRITE }], k);
  const cs = [0, 1, 2, 3].map(() => popChain(q));
  t.equal(q.needsNotification(), false, 'nothing pushed');
  r.setDriverEvent(RING_EVENT_FLAGS_ENABLE);
  q.pushUsed(cs[0]!, 1);
  t.equal(q.needsNotification(), true, 'ENABLE: always');
  r.setDriverEvent(RING_EVENT_FLAGS_DISABLE);
  q.pushUsed(cs[1]!, 1);
  t.equal(q.needsNotification(), false, 'DISABLE: never');
  r.setDriverEvent(RING_EVENT_FLAGS_DESC, 3 | 0x8000); // when the device uses slot 3 of the first lap
  q.pushUsed(cs[2]!, 1); // slot 2
  t.equal(q.needsNotification(), false, 'slot 2 written: not yet');
  q.pushUsed(cs[3]!, 1); // slot 3
  t.equal(q.needsNotification(), true, 'slot 3 written: interrupt');
  // Next lap (used wrap counter now false): an event naming slot 0 of the first lap is in the past.
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }], 0);
  const c = popChain(q);
  r.setDriverEvent(RING_EVENT_FLAGS_DESC, 1 | 0x8000);
  q.pushUsed(c, 1);
  t.equal(q.needsNotification(), false, 'an event of the previous lap does not fire');
  t.end();
});

t.test('without EVENT_IDX a DESC driver event is treated as ENABLE', (t) => {
  const r = new PackedRing(4);
  const q = r.queue();
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }], 0);
  const c = popChain(q);
  r.setDriverEvent(RING_EVENT_FLAGS_DESC, 3 | 0x8000);
  q.pushUsed(c, 1);
  t.equal(q.needsNotification(), true);
  t.end();
});

t.test('indirect: the table is read in order, in place, across regions (copied) and misaligned (copied)', (t) => {
  const r = new PackedRing(4, { second: { adjacent: true } });
  const table = (gpa: number) => {
    writeDesc(r.m, gpa, { addr: BUF_GPA + 0x800, len: 24, flags: 0 }, 'packed');
    writeDesc(r.m, gpa + 16, { addr: BUF_GPA + 0x900, len: 40, flags: WRITE }, 'packed');
  };
  const places = [BUF_GPA + 0x2000, REGION0_SIZE - 16, BUF_GPA + 0x3002];
  places.forEach((gpa, i) => {
    table(gpa);
    r.add([{ addr: gpa, len: 32, flags: IND }], i + 1);
  });
  const q = r.queue({ indirect: true });
  for (const [i, what] of ['in place', 'crossing regions', 'unaligned'].entries()) {
    const c = popChain(q);
    t.equal(c.id, i + 1, `${what}: id from the ring descriptor`);
    t.equal(c.ringSlots, 1, `${what}: an indirect chain takes one slot`);
    t.same(c.segments, [BUF_GPA + 0x800, 24, BUF_GPA + 0x900, 40], `${what}: segments`);
  }
  t.end();
});

t.test('buffers above 4 GiB go through the general walk with the same result', (t) => {
  const r = new PackedRing(4, { second: { adjacent: false, high: true } });
  r.add([{ addr: HIGH_GPA + 0x10, len: 32, flags: 0 }, { addr: BUF_GPA, len: 8, flags: WRITE }], 3);
  const c = popChain(r.queue());
  t.same(c.segments, [HIGH_GPA + 0x10, 32, BUF_GPA, 8]);
  t.equal(c.id, 3);
  t.equal(c.ringSlots, 2);
  t.end();
});

const ERROR_CASES: [VirtqueueErrorKind, (r: PackedRing) => void, { indirect?: boolean }?][] = [
  ['DescriptorIndexOutOfRange', (r) => void r.add([{ addr: BUF_GPA, len: 8, flags: 0 }], 4)], // id 4 of a 4-slot ring
  [
    'ChainTooLong',
    (r) => {
      // Every slot chains to the next, around the ring: no end (slot 0, popped already, rewritten by the driver).
      // Slot 1 (head) written last.
      for (const s of [2, 3, 0]) r.raw(s, { addr: BUF_GPA, len: 8, flags: NEXT | (s === 0 ? USED : AVAIL), next: 0 });
      r.raw(1, { addr: BUF_GPA, len: 8, flags: NEXT | AVAIL, next: 0 });
    },
  ],
  [
    'NestedIndirect',
    (r) => {
      writeDesc(r.m, BUF_GPA + 0x1000, { addr: BUF_GPA, len: 16, flags: IND }, 'packed');
      r.add([{ addr: BUF_GPA + 0x1000, len: 16, flags: IND }], 0);
    },
    { indirect: true },
  ],
  ['IndirectWithNext', (r) => r.raw(1, { addr: BUF_GPA + 0x1000, len: 16, flags: IND | NEXT | AVAIL, next: 0 }), { indirect: true }],
  [
    'IndirectWithNext',
    (r) => void r.add([{ addr: BUF_GPA, len: 8, flags: 0 }, { addr: BUF_GPA + 0x1000, len: 16, flags: IND }], 0),
    { indirect: true },
  ],
  ['IndirectTableEmpty', (r) => void r.add([{ addr: BUF_GPA + 0x1000, len: 0, flags: IND }], 0), { indirect: true }],
  ['IndirectTableMisaligned', (r) => void r.add([{ addr: BUF_GPA + 0x1000, len: 40, flags: IND }], 0), { indirect: true }],
  ['IndirectTableTooLarge', (r) => void r.add([{ addr: BUF_GPA + 0x1000, len: 16 * 5, flags: IND }], 0), { indirect: true }],
  ['IndirectNotNegotiated', (r) => void r.add([{ addr: BUF_GPA + 0x1000, len: 16, flags: IND }], 0)],
  [
    'WritableBeforeReadable',
    (r) => void r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }, { addr: BUF_GPA + 0x100, len: 8, flags: 0 }], 0),
  ],
  [
    'WritableBeforeReadable',
    (r) => {
      writeDesc(r.m, BUF_GPA + 0x1000, { addr: BUF_GPA, len: 8, flags: WRITE }, 'packed');
      writeDesc(r.m, BUF_GPA + 0x1010, { addr: BUF_GPA, len: 8, flags: 0 }, 'packed');
      r.add([{ addr: BUF_GPA + 0x1000, len: 32, flags: IND }], 0);
    },
    { indirect: true },
  ],
  ['BufferOutsideGuestMemory', (r) => void r.add([{ addr: HOLE_GPA, len: 8, flags: 0 }], 0)],
  ['BufferOutsideGuestMemory', (r) => void r.add([{ addr: REGION0_SIZE - 4, len: 8, flags: 0 }], 0)],
  ['BufferOutsideGuestMemory', (r) => void r.add([{ addr: HOLE_GPA, len: 16, flags: IND }], 0), { indirect: true }],
  ['AddressOverflow', (r) => void r.add([{ addr: 0xffff_ffff_ffff_fff0n, len: 0x20, flags: 0 }], 0)],
  [
    'ChainLengthOverflow',
    (r) => void r.add([{ addr: BUF_GPA, len: 16, flags: WRITE }, { addr: BUF_GPA, len: 0xffff_fff8, flags: WRITE }], 0),
  ],
];

t.test('every packed error kind: pop returns it, the queue stays broken with it', (t) => {
  const seen = new Set<string>();
  ERROR_CASES.forEach(([kind, setup, opts], n) => {
    const r = new PackedRing(4);
    // A good chain first (slot 0): the error must come from the bad one.
    r.add([{ addr: BUF_GPA + 0x3000, len: 8, flags: WRITE }], 3);
    const q = r.queue({ indirect: opts?.indirect ?? false });
    const first = q.pop();
    t.ok(first !== null && !(first instanceof VirtqueueError) && first.id === 3, `case ${n}: the good chain first`);
    setup(r);
    const e = q.pop();
    t.ok(e instanceof VirtqueueError, `case ${n}: an error`);
    t.equal((e as VirtqueueError).kind, kind, `case ${n}: kind ${kind} (${(e as VirtqueueError).detail})`);
    t.equal(q.broken?.kind, kind, `case ${n}: broken`);
    t.equal(q.pop(), q.broken, `case ${n}: pop keeps returning the same error`);
    t.equal(q.hasAvailable(), true, `case ${n}: hasAvailable says so`);
    t.same(q.getState(), { nextAvail: 1, availWrap: true, nextUsed: 0, usedWrap: true }, `case ${n}: the bad chain was not consumed`);
    seen.add(kind);
  });
  t.equal(seen.size, 12, 'all 12 kinds of the packed layout (AvailIndexJump is split only)');
  t.end();
});

t.test('pooled chains: a pushed chain object is reused, a held one never changes', (t) => {
  const r = new PackedRing(8);
  const q = r.queue();
  r.add([{ addr: BUF_GPA, len: 8, flags: WRITE }], 5);
  r.add([{ addr: BUF_GPA + 0x100, len: 16, flags: 0 }, { addr: BUF_GPA + 0x200, len: 24, flags: WRITE }], 6);
  const a = popChain(q);
  const held = popChain(q);
  q.pushUsed(a, 8);
  r.add([{ addr: BUF_GPA + 0x300, len: 32, flags: WRITE }], 7);
  const c = popChain(q);
  t.equal(c, a, 'the pushed object is refilled');
  t.same([c.id, c.ringSlots, ...c.segments], [7, 1, BUF_GPA + 0x300, 32]);
  t.same([held.id, held.ringSlots, ...held.segments], [6, 2, BUF_GPA + 0x100, 16, BUF_GPA + 0x200, 24], 'the held chain is intact');
  t.end();
});
