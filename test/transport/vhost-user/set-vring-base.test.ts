// SET_VRING_BASE (10): where the device resumes in the available ring; only while the ring is stopped.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, bit, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('accepted and used when the ring starts', async (t) => {
  const r = await rig();
  await prepare(r);
  t.equal(await ack(r, R.SET_VRING_BASE, encodeVringState({ index: 0, num: 65535 })), 0n);
  t.equal(r.session().describe().rings[0]!.base, 65535);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('split base above 16 bits', async (t) => {
  const r = await rig();
  await prepare(r);
  await expectAckFailure(t, r, R.SET_VRING_BASE, encodeVringState({ index: 0, num: 0x10000 }), [], { request: 'SET_VRING_BASE (10)', kind: 'BadState', reason: /split ring base 65536 does not fit 16 bits/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('packed base index beyond the ring size', async (t) => {
  const r = await rig();
  await prepare(r, { features: bit(32) | bit(30) | bit(34) });
  await r.fe.request(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 48 }));
  t.equal(await ack(r, R.SET_VRING_BASE, encodeVringState({ index: 0, num: 0x8000 | 47 })), 0n, 'wrap bit + last slot is fine');
  await expectAckFailure(t, r, R.SET_VRING_BASE, encodeVringState({ index: 0, num: 48 }), [], { request: 'SET_VRING_BASE (10)', kind: 'BadState', reason: /packed ring base index 48 is not below the size 48/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('refused while started; queue index out of range', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  await startRing(r, ram, new GuestAllocator(ram), 0, 64);
  await expectAckFailure(t, r, R.SET_VRING_BASE, encodeVringState({ index: 0, num: 3 }), [], { request: 'SET_VRING_BASE (10)', kind: 'BadState', reason: /ring 0 is started/ });
  await expectAckFailure(t, r, R.SET_VRING_BASE, encodeVringState({ index: 9, num: 3 }), [], { request: 'SET_VRING_BASE (10)', kind: 'BadState', reason: /queue index 9/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
