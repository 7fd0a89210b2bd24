// SET_VRING_CALL (13): the eventfd the back-end signals after using buffers (NOFD: none). QEMU sends it for every
// queue right after SET_OWNER, before any ring is configured.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, encodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, host, negotiate, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('accepted before ring set-up; NOFD clears it', async (t) => {
  const r = await rig();
  await negotiate(r);
  const c = host.eventfd();
  t.equal(await ack(r, R.SET_VRING_CALL, encodeU64(1n), [c]), 0n);
  t.ok(r.session().describe().rings[1]!.call);
  t.equal(await ack(r, R.SET_VRING_CALL, encodeU64(0x101n)), 0n);
  t.notOk(r.session().describe().rings[1]!.call);
  host.close(c);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('the call fd in use is the last one set', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  const d = await startRing(r, ram, alloc, 0, 64);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const c2 = host.eventfd();
  await r.fe.setVringFile(R.SET_VRING_CALL, 0, c2);
  d.post(alloc, Uint8Array.of(1), 4);
  r.fe.kick(0);
  t.ok((await r.fe.waitEventfd(c2)) > 0n, 'the new call fd fired');
  t.equal(host.eventfdRead(r.fe.callFds.get(0)!), undefined, 'the old one did not');
  host.close(c2);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('refused: queue index out of range; fd count mismatch', async (t) => {
  const r = await rig();
  await negotiate(r);
  const c = host.eventfd();
  await expectAckFailure(t, r, R.SET_VRING_CALL, encodeU64(2n), [c], { request: 'SET_VRING_CALL (13)', kind: 'BadState', reason: /queue index 2/ });
  await expectAckFailure(t, r, R.SET_VRING_CALL, encodeU64(0n), [], { request: 'SET_VRING_CALL (13)', kind: 'BadFdCount', reason: /0 fds, expected 1/ });
  host.close(c);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
