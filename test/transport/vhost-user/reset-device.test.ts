// RESET_DEVICE (34): stops and forgets every ring (fds released), resets the device and the features; the memory
// table and the session stay.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectClose, negotiate, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('a running device is reset and can be started again', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  await startRing(r, ram, alloc, 0, 64);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  t.equal(await ack(r, R.RESET_DEVICE), 0n);
  const s = r.session().describe();
  t.same(s.rings.map((x) => [x.started, x.kick, x.call]), [[false, false, false], [false, false, false]]);
  t.equal(s.status, 0);
  t.equal(s.ackedFeatures, 0n);
  t.equal(s.regions.length, 1, 'memory table kept');
  t.notOk(r.session().core.isActive);
  // Start again.
  await r.fe.setFeatures(bit(32) | bit(30));
  const d = await startRing(r, ram, alloc, 0, 64);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const p = d.post(alloc, Uint8Array.of(1, 2), 4);
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n);
  t.same(d.readUsed(), [{ id: p.head, len: 2 }]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without RESET_DEVICE negotiated: close', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.RESET_DEVICE) & ~bit(P.REPLY_ACK));
  r.fe.send(R.RESET_DEVICE);
  await expectClose(t, r, 'RESET_DEVICE (34)', 'BadState', /RESET_DEVICE was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
