// Back-end restart with the inflight area on a PACKED ring (vhost-user.rst "Inflight I/O tracking", the packed
// layout): a real back-end process holding requests is killed with SIGKILL, a new one takes the socket over, and
// the reference front-end reconnects with the same inflight area and a stale base (QEMU does not restore a packed
// ring's base after losing its back-end). Every request completes exactly once. Then the crash-safe push order:
// a push cut short at each of its steps is settled correctly at the next start (in-process, on a real memfd area).
import t from 'tap';
import { GuestAllocator, PACKED_BASE_WRAP, PackedRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { KeptInflightArea } from '../../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { encodeU64, host, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { InflightArea, inflightAreaSize } from '../../../vmm-device/transport/vhost-user/inflight.ts';
import { InflightPackedQueue } from '../../../vmm-device/transport/vhost-user/inflight-packed.ts';
import { PackedQueue, DescriptorChain } from '../../../vmm-device/virtqueue/index.ts';
import { FrontendRequest as R } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { F_RING_PACKED, F_VERSION_1, bit } from '../../../vmm-device/abi/virtio.ts';
import { RESTART_QUEUE_SIZE, backendRestartScenario } from './restart-scenario.ts';

const QUEUE_SIZE = RESTART_QUEUE_SIZE;
const FEATURES = bit(F_VERSION_1) | bit(F_RING_PACKED);

t.test('packed ring: a back-end killed with SIGKILL mid-request, the next one resubmits what was in flight, each request completes once', (t) =>
  backendRestartScenario(t, {
    tmpPrefix: 'vhost-user-packed-restart-',
    features: FEATURES,
    ring: (ram, alloc) => {
      const ring = new PackedRingDriver(ram, alloc, QUEUE_SIZE);
      return { addrs: ring.addrs, base: ring.base, postRequest: (a, w, n) => ring.post(a, w, n).id, readUsed: () => ring.readUsed() };
    },
    // QEMU keeps the base it last knew for a packed ring (slot 0, lap 1 here): stale. The area knows better.
    restartBase: () => 0 | PACKED_BASE_WRAP,
    // Six chains of two descriptors: slot 12 of lap 1.
    finalBase: 12 | PACKED_BASE_WRAP,
  }));

/** A packed ring in guest RAM tracked in a real memfd inflight area, as a back-end process would hold it. */
function trackedRing(t: { teardown: (fn: () => void) => void }) {
  const ram = new GuestRam(host, [{ gpa: 0, size: 0x40000 }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram);
  const driver = new PackedRingDriver(ram, alloc, QUEUE_SIZE);
  const size = inflightAreaSize(1, QUEUE_SIZE);
  const area = InflightArea.create(host, host.memfd('packed-inflight-test', size), size, 1, QUEUE_SIZE);
  t.teardown(() => area.release());
  const desc = ram.memory.contiguous(driver.addrs.desc, QUEUE_SIZE * 16)!;
  const rings = { desc, driver: ram.memory.contiguous(driver.addrs.avail, 4)!, device: ram.memory.contiguous(driver.addrs.used, 4)! };
  const words16 = new Uint16Array(desc.buffer, desc.byteOffset, desc.byteLength >> 1);
  /** A back-end (re)starting the ring: recovers the region, builds the queue where the area says. */
  const start = () => {
    const region = area.packedRegion(0, QUEUE_SIZE);
    if (typeof region === 'string') throw new Error(region);
    const recovered = region.recover(words16, QUEUE_SIZE, { index: 0, wrap: true });
    const inner = new PackedQueue({ size: QUEUE_SIZE, rings, memory: ram.memory, eventIdx: false, indirect: false, state: recovered.state });
    return { region, recovered, inner, queue: new InflightPackedQueue(inner, words16, region, recovered, ram.memory, false) };
  };
  return { ram, alloc, driver, area, start };
}

t.test('packed ring: a push cut short before its used descriptor reached the ring is rolled back (the chain is resubmitted)', async (t) => {
  const { alloc, driver, start } = trackedRing(t);
  const a = driver.post(alloc, new TextEncoder().encode('a'), 16);
  const b = driver.post(alloc, new TextEncoder().encode('b'), 16);
  const s1 = start();
  t.equal(s1.recovered.fresh, true, 'a new area: nothing tracked yet');
  const ca = s1.queue.pop() as DescriptorChain;
  const cb = s1.queue.pop() as DescriptorChain;
  t.same([ca.id, cb.id], [a.id, b.id]);
  // Killed after the area's first push step (free list, used_idx), before the used descriptor was written.
  s1.region.beforePush(0, ca.ringSlots, QUEUE_SIZE);
  const s2 = start();
  t.same(s2.recovered.chains.map((c) => c.entry), [0, 2], 'both chains still in flight, oldest first');
  t.same(s2.recovered.state, { nextAvail: 4, availWrap: true, nextUsed: 0, usedWrap: true }, 'used side back at slot 0, driver at slot 4');
  t.equal(s2.recovered.invalid, 0);
  const ra = s2.queue.pop() as DescriptorChain;
  const rb = s2.queue.pop() as DescriptorChain;
  t.same([ra.id, rb.id, ra.readableBytes, rb.readableBytes], [a.id, b.id, 1, 1], 'resubmitted from the copies in the area');
  t.equal(s2.queue.pop(), null, 'nothing else');
  s2.queue.pushUsed(ra, 1);
  s2.queue.pushUsed(rb, 1);
  t.same(driver.readUsed().map((u) => u.id), [a.id, b.id], 'each completed once');
  const s3 = start();
  t.same(s3.recovered.chains, [], 'nothing in flight after both pushes');
  t.same(s3.recovered.state, { nextAvail: 4, availWrap: true, nextUsed: 4, usedWrap: true });
});

t.test('packed ring: a push cut short after its used descriptor reached the ring is committed (not served again)', async (t) => {
  const { alloc, driver, start } = trackedRing(t);
  const a = driver.post(alloc, new TextEncoder().encode('a'), 16);
  const b = driver.post(alloc, new TextEncoder().encode('b'), 16);
  const s1 = start();
  const ca = s1.queue.pop() as DescriptorChain;
  s1.queue.pop();
  // Killed after the used descriptor's flags were stored, before the head was cleared and the update committed.
  s1.region.beforePush(0, ca.ringSlots, QUEUE_SIZE);
  s1.inner.pushUsed(ca, 1);
  t.same(driver.readUsed().map((u) => u.id), [a.id], 'the guest saw a completed');
  const s2 = start();
  t.same(s2.recovered.chains.map((c) => c.entry), [2], 'only b is in flight');
  t.same(s2.recovered.state, { nextAvail: 4, availWrap: true, nextUsed: 2, usedWrap: true }, 'used side after a');
  const rb = s2.queue.pop() as DescriptorChain;
  t.equal(rb.id, b.id);
  t.equal(s2.queue.pop(), null, 'a is not served again');
  s2.queue.pushUsed(rb, 1);
  t.same(driver.readUsed().map((u) => u.id), [b.id]);
  // The ring goes on across the wrap with the area kept in step.
  const more = Array.from({ length: 7 }, (_, i) => driver.post(alloc, new TextEncoder().encode(`m${i}`), 16));
  for (;;) {
    const c = s2.queue.pop();
    if (c === null) break;
    s2.queue.pushUsed(c as DescriptorChain, 2);
  }
  t.same(driver.readUsed().map((u) => u.id), more.map((m) => m.id), 'seven more, across the end of the ring');
  const s3 = start();
  t.same(s3.recovered.chains, [], 'nothing in flight');
  t.same(s3.recovered.state, { nextAvail: 2, availWrap: false, nextUsed: 2, usedWrap: false }, 'slot 2 of lap 2');
});

t.test('packed ring: malformed inflight entries are ignored and counted, a device reset clears the area', async (t) => {
  const { alloc, driver, area, start } = trackedRing(t);
  driver.post(alloc, new TextEncoder().encode('a'), 16);
  const s1 = start();
  s1.queue.pop();
  // A head claiming a chain longer than the ring.
  const view = area.regionView(0);
  view.setUint16(32 + 6, QUEUE_SIZE + 1, true); // desc[0].num
  const s2 = start();
  t.same(s2.recovered.chains, [], 'the malformed chain is not resubmitted');
  t.equal(s2.recovered.invalid, 1, 'and counted');
  t.same(s2.recovered.state, { nextAvail: 0, availWrap: true, nextUsed: 0, usedWrap: true });
  // Every entry is back on the free list: a full ring of chains can be tracked again.
  const s3 = start();
  t.same([s3.recovered.chains.length, s3.recovered.invalid], [0, 0], 'the region was repaired');

  s3.queue.pop();
  t.equal(start().recovered.chains.length, 1, 'tracked again');
  area.clearAll('packed');
  const s4 = start();
  t.same([s4.recovered.chains.length, s4.recovered.fresh], [0, false], 'a device reset forgot it');
});

// QueueRegionPacked / DescStatePacked offsets as vhost-user.rst lays them out (written here by hand, independently
// of inflight.ts, to play a back-end that died with the area in a given state).
const PK = { freeHead: 12, oldFreeHead: 14, usedIdx: 16, oldUsedIdx: 18, usedWrap: 20, oldUsedWrap: 21 };
const pdesc = (i: number): number => 32 + 32 * i;

t.test('through the session: a packed area with one chain in flight and one malformed head, SET_STATUS 0 clears it', async (t) => {
  const r = await rig();
  await r.fe.init({ queues: 2 });
  const got = await r.fe.getInflightFd(2, QUEUE_SIZE);
  const kept = new KeptInflightArea(host, got.fd!, got.desc);
  const ram = r.ram();
  const alloc = new GuestAllocator(ram);
  const ring = new PackedRingDriver(ram, alloc, QUEUE_SIZE);
  const a = ring.post(alloc, new TextEncoder().encode('A'), 8);
  const b = ring.post(alloc, new TextEncoder().encode('B'), 8);

  // A back-end took A (two descriptors, entries 0 and 1) and entries 2-3 for a chain whose head now claims three
  // entries, one of them (4) still on the free list: malformed. Then it died.
  const mapping = host.mmapShared(kept.fd, Number(got.desc.mmapSize), 0);
  const area = new DataView(mapping);
  const ringBytes = ram.memory.contiguous(ring.addrs.desc, QUEUE_SIZE * 16)!;
  for (let i = 0; i < QUEUE_SIZE; i++) area.setUint16(pdesc(i) + 2, i + 1, true); // next: the free list in order
  for (const k of [0, 1]) new Uint8Array(mapping, pdesc(k) + 16, 16).set([...ringBytes.subarray(k * 16 + 12, k * 16 + 16), ...ringBytes.subarray(k * 16 + 8, k * 16 + 12), ...ringBytes.subarray(k * 16, k * 16 + 8)]);
  area.setUint8(pdesc(0), 1);
  area.setUint16(pdesc(0) + 4, 1, true); // last
  area.setUint16(pdesc(0) + 6, 2, true); // num
  area.setUint8(pdesc(2), 1);
  area.setUint16(pdesc(2) + 4, 4, true);
  area.setUint16(pdesc(2) + 6, 3, true);
  area.setBigUint64(pdesc(2) + 8, 1n, true);
  area.setUint16(PK.freeHead, 4, true);
  area.setUint16(PK.oldFreeHead, 4, true);
  area.setUint8(PK.usedWrap, 1);
  area.setUint8(PK.oldUsedWrap, 1);

  await r.fe.start({ ram, features: FEATURES, queues: [{ index: 0, size: QUEUE_SIZE, ...ring.addrs, base: 0 | PACKED_BASE_WRAP }], inflight: { numQueues: 2, queueSize: QUEUE_SIZE, kept } });
  await r.fe.sync();
  t.ok((await r.fe.waitCall(0)) > 0n, 'the resubmission interrupted the guest, without a kick');
  t.same(ring.readUsed().map((u) => u.id), [a.id, b.id], 'A resubmitted from the area, then B found in the ring where the driver put it');
  t.equal(r.device.served, 2, 'each served once');
  t.equal(r.server.counters.badInflightEntries, 1, 'the malformed head was ignored and counted');
  t.equal(area.getUint8(pdesc(0)), 0, 'A cleared once completed');
  t.equal(area.getUint16(PK.oldUsedIdx, true), 4, 'used position after A and B (two slots each)');

  await r.fe.request(R.SET_STATUS, encodeU64(0n));
  let inFlight = 0;
  for (let i = 0; i < QUEUE_SIZE; i++) inFlight += area.getUint8(pdesc(i));
  t.equal(inFlight, 0, 'SET_STATUS 0: nothing in flight');
  t.same([area.getUint16(PK.oldFreeHead, true), area.getUint16(PK.oldUsedIdx, true), area.getUint8(PK.oldUsedWrap)], [0, 0, 1], 'the region is back to slot 0, lap 1');
  host.munmap(mapping);
  kept.release();
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('packed ring: a driver making more descriptors available than the ring holds breaks the queue, the area untouched', async (t) => {
  const { alloc, driver, area, ram, start } = trackedRing(t);
  for (let i = 0; i < QUEUE_SIZE / 2; i++) driver.post(alloc, new TextEncoder().encode(`r${i}`), 16);
  const s1 = start();
  let popped = 0;
  while (s1.queue.pop() instanceof DescriptorChain) popped++;
  t.equal(popped, QUEUE_SIZE / 2, 'a full ring in flight (two slots each)');
  const snapshot = (): Uint8Array => new Uint8Array(area.regionView(0).buffer, area.base, inflightAreaSize(1, QUEUE_SIZE)).slice();
  const before = snapshot();
  // Slot 0 again, made available for lap 2 (AVAIL 0, USED 1) while the device still holds it: a driver bug.
  const flags = ram.memory.contiguous(driver.addrs.desc + 14, 2)!;
  new DataView(flags.buffer, flags.byteOffset, 2).setUint16(0, 1 << 15, true);
  const err = s1.queue.pop();
  t.ok(!(err instanceof DescriptorChain) && err !== null && err.kind === 'AvailIndexJump', 'the queue reports the driver error');
  t.equal(s1.queue.broken, err, 'and stays broken until a reset');
  const after = snapshot();
  t.same(after, before, 'nothing written into the area');
  t.equal(start().recovered.chains.length, QUEUE_SIZE / 2, 'the eight chains are still tracked');
});
