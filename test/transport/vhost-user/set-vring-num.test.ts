// SET_VRING_NUM (8): ring size: queue index below the count, 1..max, a power of two for split rings, ring stopped.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, bit, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, prepare, rig, startRing, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

const num = (index: number, n: number) => encodeVringState({ index, num: n });

t.test('accepted', async (t) => {
  const r = await rig();
  await prepare(r);
  t.equal(await ack(r, R.SET_VRING_NUM, num(1, 256)), 0n);
  t.equal(r.session().describe().rings[1]!.num, 256);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

for (const [name, index, n, reason] of [
  ['queue index out of range', 2, 64, /queue index 2 is not below the queue count 2/],
  ['size 0', 0, 0, /size 0 is not in 1\.\.256/],
  ['size above the maximum', 0, 512, /size 512 is not in 1\.\.256/],
  ['split size not a power of two', 0, 48, /split ring 0 size 48 is not a power of two/],
] as const) {
  t.test(`refused: ${name}`, async (t) => {
    const r = await rig();
    await prepare(r);
    await expectAckFailure(t, r, R.SET_VRING_NUM, num(index, n), [], { request: 'SET_VRING_NUM (8)', kind: 'BadState', reason });
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
}

t.test('packed rings may have any size', async (t) => {
  const r = await rig();
  await prepare(r, { features: bit(32) | bit(30) | bit(34) });
  t.equal(await ack(r, R.SET_VRING_NUM, num(0, 48)), 0n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('refused while the ring is started', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  await startRing(r, ram, new GuestAllocator(ram), 0, 64);
  await expectAckFailure(t, r, R.SET_VRING_NUM, num(0, 32), [], { request: 'SET_VRING_NUM (8)', kind: 'BadState', reason: /ring 0 is started/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without REPLY_ACK: close', async (t) => {
  const r = await rig();
  await prepare(r, { protocol: WITHOUT_REPLY_ACK });
  r.fe.send(R.SET_VRING_NUM, num(7, 64));
  await expectClose(t, r, 'SET_VRING_NUM (8)', 'BadState', /queue index 7/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
