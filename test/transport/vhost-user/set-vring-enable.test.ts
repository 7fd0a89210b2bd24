// SET_VRING_ENABLE (18): with PROTOCOL_FEATURES acked, rings start disabled; a disabled ring's kicks are not served
// and its buffers wait; enabling serves them.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('disabled ring holds buffers; enabling serves them', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  const d = await startRing(r, ram, alloc, 0, 64);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  t.equal(await ack(r, R.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 0 })), 0n);
  const p = d.post(alloc, Uint8Array.of(5, 6), 4);
  r.fe.kick(0);
  t.equal(await r.fe.waitCall(0, 200), 0n, 'no answer while disabled');
  t.ok(r.session().counters.droppedKicks >= 1, 'dropped kick counted');
  t.equal(await ack(r, R.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 })), 0n);
  t.ok((await r.fe.waitCall(0)) > 0n, 'served on enable');
  t.same(d.readUsed(), [{ id: p.head, len: 2 }]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('refused: value other than 0/1; queue index out of range', async (t) => {
  const r = await rig();
  await prepare(r);
  await expectAckFailure(t, r, R.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 2 }), [], { request: 'SET_VRING_ENABLE (18)', kind: 'BadPayload', reason: /enable value 2/ });
  await expectAckFailure(t, r, R.SET_VRING_ENABLE, encodeVringState({ index: 2, num: 1 }), [], { request: 'SET_VRING_ENABLE (18)', kind: 'BadState', reason: /queue index 2/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
