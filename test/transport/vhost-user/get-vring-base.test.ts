// GET_VRING_BASE (11): stops the ring and answers where the front-end resumes. After it, kicks are not served.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectClose, prepare, rig, startRing, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('stops a running ring; its position is returned; later kicks are dropped', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  const d = await startRing(r, ram, alloc, 0, 64);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  d.post(alloc, Uint8Array.of(1, 2, 3), 8);
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n);
  t.equal(d.readUsed().length, 1);
  t.equal(await r.fe.getVringBase(0), 1);
  t.notOk(r.session().describe().rings[0]!.started, 'stopped');
  t.notOk(r.session().describe().rings[0]!.kick, 'kick fd released');
  // The front-end's kick eventfd is its own: it stays usable, and the back-end no longer listens to it.
  d.post(alloc, Uint8Array.of(4), 8);
  r.fe.kick(0);
  t.equal(await r.fe.waitCall(0, 200), 0n, 'no answer from a stopped ring');
  t.same(d.readUsed(), []);
  t.equal(await r.fe.getVringBase(0), 1, 'a stopped ring answers its saved position');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('queue index out of range: close (the reply has no error form)', async (t) => {
  const r = await rig();
  await prepare(r);
  r.fe.send(R.GET_VRING_BASE, encodeVringState({ index: 5, num: 0 }), [], 0x9);
  await expectClose(t, r, 'GET_VRING_BASE (11)', 'BadState', /queue index 5 is not below the queue count 2/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('wrong size: close', async (t) => {
  const r = await rig();
  await prepare(r, { protocol: WITHOUT_REPLY_ACK });
  r.fe.send(R.GET_VRING_BASE, new Uint8Array(4));
  await expectClose(t, r, 'GET_VRING_BASE (11)', 'BadSize', /payload is 4 bytes, expected 8/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
