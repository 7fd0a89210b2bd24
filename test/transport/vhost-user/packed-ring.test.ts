// Packed rings over vhost-user (VIRTIO_F_RING_PACKED negotiated): the reference front-end drives a packed
// virtqueue as QEMU would (the same start sequence; the three areas in SET_VRING_ADDR's desc/avail/used places),
// SET_VRING_BASE carries the next available position with the wrap counter in bit 15, and GET_VRING_BASE answers
// the same form.
import t from 'tap';
import { GuestAllocator, PACKED_BASE_WRAP, PackedRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { ECHO_F_TEST } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { rig, type Rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import type { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { FrontendRequest as R, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { F_RING_PACKED, F_VERSION_1, bit } from '../../../vmm-device/abi/virtio.ts';

const PACKED_FEATURES = bit(F_VERSION_1) | bit(F_RING_PACKED) | ECHO_F_TEST;
const RING_SIZE = 8;

/** A rig with one queue, QEMU's init sequence done, guest RAM and a packed ring driver in it. */
async function packedRig(start?: { index: number; wrap: boolean }): Promise<{ r: Rig; ram: GuestRam; alloc: GuestAllocator; d: PackedRingDriver }> {
  const r = await rig({ queues: 1 });
  await r.fe.init({ queues: 1 });
  const ram = r.ram();
  const alloc = new GuestAllocator(ram);
  return { r, ram, alloc, d: new PackedRingDriver(ram, alloc, RING_SIZE, start) };
}

async function startPacked(r: Rig, ram: GuestRam, d: PackedRingDriver): Promise<void> {
  await r.fe.start({ ram, features: PACKED_FEATURES, queues: [{ index: 0, size: d.size, ...d.addrs, base: d.base }] });
  await r.fe.sync();
}

/** Posts `words`, kicks, waits for the interrupt; returns the used buffers (id, len) and the answers read back. */
async function exchange(t: Pick<typeof import('tap').default, 'ok'>, r: Rig, ram: GuestRam, alloc: GuestAllocator, d: PackedRingDriver, words: string[]): Promise<{ ids: number[]; used: { id: number; len: number }[]; answers: string[] }> {
  const posted = words.map((w) => d.post(alloc, new TextEncoder().encode(w), 16));
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n, 'call eventfd fired');
  const used = d.readUsed();
  const answers = posted.map((p, i) => {
    const b = new Uint8Array(words[i]!.length);
    ram.memory.read(p.responseAddr, b);
    return new TextDecoder().decode(b);
  });
  return { ids: posted.map((p) => p.id), used, answers };
}

t.test('a packed ring: round trips, GET_VRING_BASE with the wrap counter, resumed across the wrap', async (t) => {
  const { r, ram, alloc, d } = await packedRig();
  await startPacked(r, ram, d);
  t.ok(r.session().describe().ackedFeatures & bit(F_RING_PACKED), 'RING_PACKED acked by SET_FEATURES');
  t.ok(r.session().core.isActive, 'device started (SET_STATUS DRIVER_OK)');

  const first = await exchange(t, r, ram, alloc, d, ['one', 'two', 'three']);
  t.same(first.used, first.ids.map((id, i) => ({ id, len: ['one', 'two', 'three'][i]!.length })), 'three used descriptors, in order');
  t.same(first.answers, ['one', 'two', 'three'], 'answers in guest RAM');
  // Three chains of two descriptors: the next available position is 6, still in the first lap (wrap counter 1).
  t.equal(await r.fe.getVringBase(0), 6 | PACKED_BASE_WRAP, 'GET_VRING_BASE: position 6, wrap bit set');
  t.notOk(r.session().describe().rings[0]!.started, 'ring stopped');

  // Resume from that base (SET_VRING_BASE carries the wrap bit) and go across the end of the ring.
  await r.fe.request(R.SET_VRING_BASE, encodeVringState({ index: 0, num: d.base }), [], false);
  await r.fe.setVringFile(R.SET_VRING_KICK, 0, r.fe.kickFds.get(0));
  t.equal(r.session().describe().rings[0]!.base, 6 | PACKED_BASE_WRAP, 'SET_VRING_BASE kept the wrap bit');
  const second = await exchange(t, r, ram, alloc, d, ['four', 'five']);
  t.same(second.used.map((u) => u.id), second.ids, 'both answered across the wrap');
  t.same(second.answers, ['four', 'five']);
  t.equal(d.base, 2, 'the driver wrapped: position 2, wrap counter 0');
  t.equal(await r.fe.getVringBase(0), 2, 'GET_VRING_BASE: position 2, wrap bit clear');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('SET_VRING_BASE with the wrap counter clear: the device resumes in the second lap', async (t) => {
  // A ring that has been round once: descriptors marked used in lap 1, the driver at position 4 of lap 2.
  const { r, ram, alloc, d } = await packedRig({ index: 4, wrap: false });
  t.equal(d.base, 4);
  await startPacked(r, ram, d);
  const x = await exchange(t, r, ram, alloc, d, ['six', 'seven', 'eight']);
  t.same(x.used.map((u) => u.id), x.ids, 'the device found the buffers at position 4 with the wrap counter clear');
  t.same(x.answers, ['six', 'seven', 'eight']);
  t.equal(await r.fe.getVringBase(0), 2 | PACKED_BASE_WRAP, 'three chains later: position 2 of the next lap (wrap bit set again)');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a packed base with the wrap bit wrong for the ring: nothing is served, nothing is corrupted', async (t) => {
  const { r, ram, alloc, d } = await packedRig();
  // The driver is in lap 1 (wrap 1); the front-end claims lap 2 (wrap 0): the descriptors do not look available.
  await r.fe.start({ ram, features: PACKED_FEATURES, queues: [{ index: 0, size: RING_SIZE, ...d.addrs, base: 0 }] });
  await r.fe.sync();
  d.post(alloc, new TextEncoder().encode('lost'), 16);
  r.fe.kick(0);
  t.equal(await r.fe.waitCall(0, 200), 0n, 'no interrupt');
  t.same(d.readUsed(), [], 'no used descriptor');
  t.equal(r.device.served, 0);
  t.equal(await r.fe.getVringBase(0), 0, 'the device did not move');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('packed ring negative cases: base bits above 15, index beyond the ring', async (t) => {
  const r = await rig({ queues: 1 });
  await r.fe.init({ queues: 1 });
  await r.fe.setFeatures(PACKED_FEATURES | bit(30n));
  await r.fe.request(R.SET_VRING_NUM, encodeVringState({ index: 0, num: RING_SIZE }));
  await t.rejects(r.fe.request(R.SET_VRING_BASE, encodeVringState({ index: 0, num: 0x1_0000 })), /back-end answered failure/, 'bit 16 set: REPLY_ACK failure');
  await t.rejects(r.fe.request(R.SET_VRING_BASE, encodeVringState({ index: 0, num: PACKED_BASE_WRAP | RING_SIZE })), /back-end answered failure/, 'index = ring size: REPLY_ACK failure');
  await r.fe.request(R.SET_VRING_BASE, encodeVringState({ index: 0, num: PACKED_BASE_WRAP | (RING_SIZE - 1) }));
  t.equal(r.session().describe().rings[0]!.base, PACKED_BASE_WRAP | (RING_SIZE - 1), 'the last slot with the wrap bit is accepted');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
