// RESET_OWNER (4): deprecated; this back-end disables every ring (vhost-user.rst's recommendation).
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('disables the rings', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  await startRing(r, ram, new GuestAllocator(ram), 0, 64);
  t.ok(r.session().describe().rings[0]!.enabled);
  t.equal(await ack(r, R.RESET_OWNER), 0n);
  t.notOk(r.session().describe().rings[0]!.enabled);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a payload: refused', async (t) => {
  const r = await rig();
  await prepare(r);
  await expectAckFailure(t, r, R.RESET_OWNER, new Uint8Array(8), [], { request: 'RESET_OWNER (4)', kind: 'BadSize', reason: /expected 0/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
