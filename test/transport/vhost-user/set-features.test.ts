// SET_FEATURES (2): a subset of what GET_FEATURES offered.
import t from 'tap';
import { FrontendRequest as R, VHOST_USER_F_PROTOCOL_FEATURES, bit, encodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, negotiate, rig, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

const OK = bit(32) | bit(VHOST_USER_F_PROTOCOL_FEATURES);

t.test('accepted and recorded', async (t) => {
  const r = await rig();
  await negotiate(r);
  t.equal(await ack(r, R.SET_FEATURES, encodeU64(OK)), 0n);
  t.equal(r.session().describe().ackedFeatures, OK);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a bit never offered: REPLY_ACK failure', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, R.SET_FEATURES, encodeU64(OK | bit(50)), [], { request: 'SET_FEATURES (2)', kind: 'BadState', reason: /feature bits 0x4000000000000 were not offered/ });
  t.equal(r.session().describe().ackedFeatures, 0n, 'nothing changed');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a bit never offered, without REPLY_ACK: close', async (t) => {
  const r = await rig();
  await negotiate(r, WITHOUT_REPLY_ACK);
  r.fe.send(R.SET_FEATURES, encodeU64(bit(26)));
  await expectClose(t, r, 'SET_FEATURES (2)', 'BadState', /feature bits 0x4000000 were not offered/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('short payload: REPLY_ACK failure', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, R.SET_FEATURES, new Uint8Array(4), [], { request: 'SET_FEATURES (2)', kind: 'BadSize', reason: /payload is 4 bytes, expected 8/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
