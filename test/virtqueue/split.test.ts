// Direct unit tests of the split queue (virtio 1.2 section 2.7) on hand-written rings: what pop returns for exact
// descriptor bytes, what pushUsed writes, index wrap, notification suppression with and without EVENT_IDX,
// indirect tables, every error kind the split layout can report, and stop/resume through QueueState.

import t from 'tap';
import { VirtqueueError, type VirtqueueErrorKind } from '../../vmm-device/virtqueue/index.ts';
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT as IND,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
} from '../../vmm-device/abi/virtqueue.ts';
import { BUF_GPA, DEVICE_GPA, HIGH_GPA, HOLE_GPA, REGION0_SIZE, REGION1_GPA, SplitRing, popChain, writeDesc } from './rings.ts';

t.test('pop returns the chain as the descriptors describe it; pushUsed writes the used element and index', (t) => {
  const r = new SplitRing(8);
  r.desc(5, { addr: BUF_GPA, len: 16, flags: NEXT, next: 2 });
  r.desc(2, { addr: BUF_GPA + 0x100, len: 64, flags: NEXT, next: 7 });
  r.desc(7, { addr: BUF_GPA + 0x400, len: 100, flags: WRITE });
  r.publish(5);
  const q = r.queue();
  t.equal(q.hasAvailable(), true, 'hasAvailable before pop');
  const c = popChain(q);
  t.equal(c.id, 5, 'id is the head index');
  t.equal(c.ringSlots, 1);
  t.same(c.segments, [BUF_GPA, 16, BUF_GPA + 0x100, 64, BUF_GPA + 0x400, 100]);
  t.equal(c.readableCount, 2);
  t.equal(c.readableBytes, 80);
  t.equal(c.writableBytes, 100);
  t.equal(q.inFlight, 1);
  t.equal(q.pop(), null, 'nothing more available');
  t.equal(q.hasAvailable(), false);
  t.equal(r.usedIdx, 0, 'nothing used yet');
  q.pushUsed(c, 42);
  t.same(r.used(0), { id: 5, len: 42 }, 'used element');
  t.equal(r.usedIdx, 1, 'used.idx moved');
  t.equal(q.inFlight, 0);
  t.same(q.getState(), { nextAvail: 1, nextUsed: 1 });
  t.end();
});

t.test('a descriptor rewritten by the driver after pop does not change the popped chain', (t) => {
  const r = new SplitRing(4);
  r.desc(0, { addr: BUF_GPA, len: 8, flags: WRITE });
  r.publish(0);
  const q = r.queue();
  const c = popChain(q);
  r.desc(0, { addr: BUF_GPA + 0x1000, len: 4000, flags: WRITE });
  t.same(c.segments, [BUF_GPA, 8]);
  t.equal(c.writableBytes, 8);
  t.end();
});

t.test('pushUsed refuses a length outside the writable part and writes nothing then', (t) => {
  const r = new SplitRing(4);
  r.desc(0, { addr: BUF_GPA, len: 16, flags: 0, next: 0 });
  r.desc(1, { addr: BUF_GPA + 0x100, len: 32, flags: WRITE });
  r.desc(0, { addr: BUF_GPA, len: 16, flags: NEXT, next: 1 });
  r.publish(0);
  const q = r.queue();
  const c = popChain(q);
  t.throws(() => q.pushUsed(c, 33), RangeError, 'longer than the writable part');
  t.throws(() => q.pushUsed(c, -1), RangeError, 'negative');
  t.throws(() => q.pushUsed(c, 1.5), RangeError, 'not an integer');
  t.equal(r.usedIdx, 0, 'nothing published');
  t.equal(q.inFlight, 1, 'still in flight');
  q.pushUsed(c, 32);
  t.same(r.used(0), { id: 0, len: 32 });
  t.end();
});

t.test('zero-length descriptors count but give no segment; a buffer in a second region', (t) => {
  const r = new SplitRing(8, { second: { adjacent: false } });
  r.desc(0, { addr: BUF_GPA, len: 0, flags: NEXT, next: 1 });
  r.desc(1, { addr: REGION1_GPA + 0x10, len: 20, flags: NEXT, next: 2 });
  r.desc(2, { addr: BUF_GPA + 0x40, len: 0, flags: WRITE | NEXT, next: 3 });
  r.desc(3, { addr: BUF_GPA + 0x80, len: 12, flags: WRITE });
  r.publish(0);
  const q = r.queue();
  const c = popChain(q);
  t.same(c.segments, [REGION1_GPA + 0x10, 20, BUF_GPA + 0x80, 12]);
  t.equal(c.readableCount, 1);
  t.equal(c.readableBytes, 20);
  t.equal(c.writableBytes, 12);
  t.end();
});

t.test('a buffer above 4 GiB (the general walk) and one below in the same chain', (t) => {
  const r = new SplitRing(4, { second: { adjacent: false, high: true } });
  r.desc(0, { addr: HIGH_GPA + 0x40, len: 16, flags: NEXT, next: 1 });
  r.desc(1, { addr: BUF_GPA, len: 8, flags: WRITE });
  r.m.r1.setUint32(0x40, 0xcafef00d, true);
  r.publish(0);
  const c = popChain(r.queue());
  t.same(c.segments, [HIGH_GPA + 0x40, 16, BUF_GPA, 8]);
  t.equal(c.reader().readView(4).getUint32(0, true), 0xcafef00d, 'read from the high region');
  t.end();
});

t.test('a buffer crossing two adjacent regions is one segment; reading it spans both', (t) => {
  const r = new SplitRing(4, { second: { adjacent: true } });
  r.desc(0, { addr: REGION0_SIZE - 4, len: 8, flags: 0 });
  r.m.r0.setUint32(REGION0_SIZE - 4, 0x11223344, true);
  r.m.r1.setUint32(0, 0x55667788, true);
  r.publish(0);
  const c = popChain(r.queue());
  t.same(c.segments, [REGION0_SIZE - 4, 8]);
  t.same([...c.reader().read(8)], [0x44, 0x33, 0x22, 0x11, 0x88, 0x77, 0x66, 0x55]);
  t.end();
});

t.test('the available and used indexes wrap at 2^16 and the ring positions at the queue size', (t) => {
  const r = new SplitRing(4, { startIdx: 65534 });
  for (let i = 0; i < 4; i++) r.desc(i, { addr: BUF_GPA + 0x100 * i, len: 8, flags: WRITE });
  const q = r.queue({ state: { nextAvail: 65534, nextUsed: 65534 } });
  const ids: number[] = [];
  for (let round = 0; round < 3; round++) {
    r.publish(3, 1);
    const a = popChain(q);
    const b = popChain(q);
    ids.push(a.id, b.id);
    q.pushUsed(b, 1);
    q.pushUsed(a, 2);
  }
  t.same(ids, [3, 1, 3, 1, 3, 1]);
  t.equal(r.usedIdx, (65534 + 6) & 0xffff, 'used.idx wrapped');
  t.same(q.getState(), { nextAvail: 4, nextUsed: 4 });
  // Elements written at ring index (65534 + k) mod 4: the last round's two are at indexes 2 and 3.
  t.same(r.used(2), { id: 1, len: 1 });
  t.same(r.used(3), { id: 3, len: 2 });
  t.end();
});

t.test('a resumed queue starts from the saved state; without one it starts at used.idx', (t) => {
  const r = new SplitRing(8);
  for (let i = 0; i < 8; i++) r.desc(i, { addr: BUF_GPA + 0x100 * i, len: 8, flags: WRITE });
  r.publish(0, 1, 2);
  const q1 = r.queue();
  const a = popChain(q1);
  q1.pushUsed(a, 3);
  const held = popChain(q1);
  const saved = q1.getState();
  t.same(saved, { nextAvail: 2, nextUsed: 1 });
  const q2 = r.queue({ state: saved });
  const c = popChain(q2);
  t.equal(c.id, 2, 'the resumed queue pops the next entry, not one it popped before');
  q2.pushUsed(c, 4);
  t.same(r.used(1), { id: 2, len: 4 });
  t.equal(r.usedIdx, 2);
  // vhost-user gives only the available index: the used index is then read from the ring.
  const q3 = r.queue({ state: { nextAvail: 3, nextUsed: undefined as unknown as number } });
  t.equal(q3.getState().nextUsed, 2, 'nextUsed from used.idx');
  t.equal(held.id, 1);
  t.end();
});

t.test('EVENT_IDX: avail_event follows pops, disable writes nothing, enable re-arms and re-checks', (t) => {
  const r = new SplitRing(8);
  for (let i = 0; i < 8; i++) r.desc(i, { addr: BUF_GPA + 0x100 * i, len: 8, flags: WRITE });
  const q = r.queue({ eventIdx: true });
  r.m.r0.setUint16(DEVICE_GPA + 4 + 8 * 8, 0x1234, true); // avail_event as the memory held it
  t.equal(q.pop(), null);
  t.equal(r.availEvent, 0x1234, 'an empty pop before any chain writes no avail_event');
  r.publish(0, 1);
  popChain(q);
  t.equal(r.availEvent, 1, 'kick me once entry 1 is made available');
  popChain(q);
  t.equal(r.availEvent, 2);
  t.equal(q.pop(), null, 'empty: the barrier re-check finds nothing');
  t.equal(r.availEvent, 2, 'and leaves avail_event as the last pop wrote it');
  q.disableNotifications();
  r.publish(2);
  popChain(q);
  t.equal(r.availEvent, 2, 'with notifications off pops leave avail_event alone');
  t.equal(r.usedFlags & VIRTQ_USED_F_NO_NOTIFY, 0, 'EVENT_IDX does not use the NO_NOTIFY flag');
  t.equal(q.enableNotifications(), false, 'nothing new');
  t.equal(r.availEvent, 3, 'enable writes the next index');
  q.disableNotifications();
  r.publish(3);
  t.equal(q.enableNotifications(), true, 'a buffer made available while off is reported');
  t.end();
});

t.test('EVENT_IDX: needsNotification follows used_event (vring_need_event)', (t) => {
  const r = new SplitRing(8);
  for (let i = 0; i < 8; i++) r.desc(i, { addr: BUF_GPA + 0x100 * i, len: 8, flags: WRITE });
  const q = r.queue({ eventIdx: true });
  t.equal(q.needsNotification(), false, 'nothing pushed');
  r.publish(0, 1, 2, 3, 4);
  const cs = [0, 1, 2, 3, 4].map(() => popChain(q));
  r.setUsedEvent(0);
  q.pushUsed(cs[0]!, 0);
  t.equal(q.needsNotification(), true, 'the first decision always interrupts');
  r.setUsedEvent(2); // interrupt when used.idx passes 2 -> 3
  q.pushUsed(cs[1]!, 0); // used.idx 2
  t.equal(q.needsNotification(), false, 'used.idx 1 -> 2 does not pass used_event 2');
  q.pushUsed(cs[2]!, 0); // used.idx 3
  t.equal(q.needsNotification(), true, 'used.idx 2 -> 3 passes used_event 2');
  t.equal(q.needsNotification(), false, 'nothing pushed since');
  r.setUsedEvent(10);
  q.pushUsed(cs[3]!, 0);
  q.pushUsed(cs[4]!, 0);
  t.equal(q.needsNotification(), false, 'used_event ahead of used.idx');
  t.end();
});

t.test('without EVENT_IDX: NO_NOTIFY flag and NO_INTERRUPT flag', (t) => {
  const r = new SplitRing(4);
  for (let i = 0; i < 4; i++) r.desc(i, { addr: BUF_GPA + 0x100 * i, len: 8, flags: WRITE });
  const q = r.queue();
  q.disableNotifications();
  t.equal(r.usedFlags & VIRTQ_USED_F_NO_NOTIFY, VIRTQ_USED_F_NO_NOTIFY, 'disable sets NO_NOTIFY');
  t.equal(q.enableNotifications(), false);
  t.equal(r.usedFlags & VIRTQ_USED_F_NO_NOTIFY, 0, 'enable clears it');
  r.publish(0, 1);
  const a = popChain(q);
  const b = popChain(q);
  t.equal(r.availEvent, 0, 'no avail_event without EVENT_IDX');
  q.pushUsed(a, 1);
  t.equal(q.needsNotification(), true, 'interrupt by default');
  r.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
  q.pushUsed(b, 1);
  t.equal(q.needsNotification(), false, 'NO_INTERRUPT honoured');
  t.end();
});

t.test('indirect: a table in place, one crossing regions (copied) and one misplaced by 2 bytes', (t) => {
  const r = new SplitRing(4, { second: { adjacent: true } });
  const table = (gpa: number) => {
    writeDesc(r.m, gpa, { addr: BUF_GPA + 0x800, len: 24, flags: NEXT, next: 2 }, 'split');
    writeDesc(r.m, gpa + 16, { addr: 0xdead, len: 1, flags: 0 }, 'split'); // not part of the chain
    writeDesc(r.m, gpa + 32, { addr: BUF_GPA + 0x900, len: 40, flags: WRITE }, 'split');
  };
  const places = [BUF_GPA + 0x2000, REGION0_SIZE - 16, BUF_GPA + 0x3002];
  places.forEach((gpa, i) => {
    table(gpa);
    r.desc(i, { addr: gpa, len: 48, flags: IND });
  });
  r.publish(0, 1, 2);
  const q = r.queue({ indirect: true });
  for (const [i, what] of ['in place', 'crossing regions', 'unaligned'].entries()) {
    const c = popChain(q);
    t.equal(c.id, i, `${what}: id is the ring head`);
    t.same(c.segments, [BUF_GPA + 0x800, 24, BUF_GPA + 0x900, 40], `${what}: segments from the table`);
    t.equal(c.readableBytes, 24);
    t.equal(c.writableBytes, 40);
  }
  t.end();
});

/** One case per error kind the split layout reports: the ring set-up, then the expected kind. */
const ERROR_CASES: [VirtqueueErrorKind, (r: SplitRing) => void, { indirect?: boolean }?][] = [
  ['AvailIndexJump', (r) => r.setAvailIdx(5)], // size 4: 5 ahead of 0
  ['DescriptorIndexOutOfRange', (r) => r.publish(4)], // head 4 of a 4-entry queue
  [
    'DescriptorIndexOutOfRange',
    (r) => {
      r.desc(0, { addr: BUF_GPA, len: 8, flags: NEXT, next: 9 });
      r.publish(0);
    },
  ],
  [
    'DescriptorIndexOutOfRange',
    (r) => {
      writeDesc(r.m, BUF_GPA + 0x1000, { addr: BUF_GPA, len: 8, flags: NEXT, next: 1 }, 'split'); // a 1-entry table
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 16, flags: IND });
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'ChainTooLong',
    (r) => {
      r.desc(0, { addr: BUF_GPA, len: 8, flags: NEXT, next: 1 });
      r.desc(1, { addr: BUF_GPA, len: 8, flags: NEXT, next: 0 });
      r.publish(0);
    },
  ],
  [
    'NestedIndirect',
    (r) => {
      writeDesc(r.m, BUF_GPA + 0x1000, { addr: BUF_GPA + 0x1100, len: 16, flags: IND }, 'split');
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 16, flags: IND });
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'IndirectWithNext',
    (r) => {
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 16, flags: IND | NEXT, next: 1 });
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'IndirectTableEmpty',
    (r) => {
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 0, flags: IND });
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'IndirectTableMisaligned',
    (r) => {
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 24, flags: IND });
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'IndirectTableTooLarge',
    (r) => {
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 16 * 5, flags: IND }); // limit: the queue size, 4
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'IndirectNotNegotiated',
    (r) => {
      r.desc(0, { addr: BUF_GPA + 0x1000, len: 16, flags: IND });
      r.publish(0);
    },
  ],
  [
    'WritableBeforeReadable',
    (r) => {
      r.desc(0, { addr: BUF_GPA, len: 8, flags: WRITE | NEXT, next: 1 });
      r.desc(1, { addr: BUF_GPA + 0x100, len: 8, flags: 0 });
      r.publish(0);
    },
  ],
  [
    'BufferOutsideGuestMemory',
    (r) => {
      r.desc(0, { addr: HOLE_GPA, len: 8, flags: 0 });
      r.publish(0);
    },
  ],
  [
    'BufferOutsideGuestMemory',
    (r) => {
      r.desc(0, { addr: REGION0_SIZE - 4, len: 8, flags: 0 }); // runs off the end of the only region
      r.publish(0);
    },
  ],
  [
    'BufferOutsideGuestMemory',
    (r) => {
      r.desc(0, { addr: HOLE_GPA, len: 16, flags: IND }); // the indirect table itself
      r.publish(0);
    },
    { indirect: true },
  ],
  [
    'AddressOverflow',
    (r) => {
      r.desc(0, { addr: 0xffff_ffff_ffff_fff0n, len: 0x20, flags: 0 });
      r.publish(0);
    },
  ],
  [
    'ChainLengthOverflow',
    (r) => {
      r.desc(0, { addr: BUF_GPA, len: 16, flags: NEXT, next: 1 });
      r.desc(1, { addr: BUF_GPA, len: 0xffff_fff8, flags: 0 });
      r.publish(0);
    },
  ],
];

t.test('every split error kind: pop returns it, the queue stays broken with it', (t) => {
  const seen = new Set<string>();
  ERROR_CASES.forEach(([kind, setup, opts], n) => {
    const r = new SplitRing(4);
    // A good chain first: the error must come from the bad one, not from the set-up.
    r.desc(3, { addr: BUF_GPA + 0x3000, len: 8, flags: WRITE });
    r.publish(3);
    setup(r);
    const q = r.queue({ indirect: opts?.indirect ?? false });
    const first = q.pop();
    if (kind === 'AvailIndexJump') {
      t.ok(first instanceof VirtqueueError && first.kind === kind, `case ${n}: ${kind} before any chain`);
    } else {
      t.ok(first !== null && !(first instanceof VirtqueueError) && first.id === 3, `case ${n}: the good chain first`);
      const e = q.pop();
      t.ok(e instanceof VirtqueueError, `case ${n}: an error`);
      t.equal((e as VirtqueueError).kind, kind, `case ${n}: kind ${kind} (${(e as VirtqueueError).detail})`);
    }
    t.equal(q.broken?.kind, kind, `case ${n}: broken`);
    t.equal(q.pop(), q.broken, `case ${n}: pop keeps returning the same error`);
    t.equal(q.hasAvailable(), true, `case ${n}: hasAvailable says so`);
    seen.add(kind);
  });
  t.equal(seen.size, 13, 'all 13 kinds of the split layout');
  t.end();
});

t.test('pooled chains: a pushed chain object is reused, a held one never changes, a double push is harmless', (t) => {
  const r = new SplitRing(8);
  for (let i = 0; i < 8; i++) r.desc(i, { addr: BUF_GPA + 0x100 * i, len: 8 + i, flags: WRITE });
  const q = r.queue();
  r.publish(0, 1);
  const a = popChain(q);
  const held = popChain(q);
  q.pushUsed(a, 1);
  r.publish(2);
  const c = popChain(q);
  t.equal(c, a, 'the pushed object is refilled (no allocation per chain)');
  t.same(c.segments, [BUF_GPA + 0x200, 10]);
  t.equal(held.id, 1, 'the held chain kept its id');
  t.same(held.segments, [BUF_GPA + 0x100, 9], 'and its segments');
  q.pushUsed(c, 0);
  q.pushUsed(c, 0); // a device bug: the driver sees the id twice, as before pooling
  t.same([r.used(1).id, r.used(2).id], [2, 2]);
  r.publish(3, 4);
  const d = popChain(q);
  const e = popChain(q);
  t.not(d, e, 'the twice-pushed object was pooled once');
  t.same([d.id, e.id], [3, 4]);
  t.end();
});
