// SET_OWNER (3): marks the session start; a second one in the same session is refused.
import t from 'tap';
import { FrontendRequest as R } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, negotiate, rig, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('first SET_OWNER accepted, second refused (REPLY_ACK)', async (t) => {
  const r = await rig();
  await negotiate(r);
  t.equal(await ack(r, R.SET_OWNER), 0n);
  t.ok(r.session().describe().owner);
  await expectAckFailure(t, r, R.SET_OWNER, new Uint8Array(0), [], { request: 'SET_OWNER (3)', kind: 'BadState', reason: /already has an owner/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('second SET_OWNER without REPLY_ACK: close', async (t) => {
  const r = await rig();
  await negotiate(r, WITHOUT_REPLY_ACK);
  await r.fe.setOwner();
  await r.fe.setOwner();
  await expectClose(t, r, 'SET_OWNER (3)', 'BadState', /already has an owner/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a payload: close', async (t) => {
  const r = await rig();
  r.fe.send(R.SET_OWNER, new Uint8Array(8));
  await expectClose(t, r, 'SET_OWNER (3)', 'BadSize', /expected 0/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
