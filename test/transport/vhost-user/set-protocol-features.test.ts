// SET_PROTOCOL_FEATURES (16): a subset of what was offered. QEMU sends it without NEED_REPLY, and REPLY_ACK is not
// negotiated yet when it arrives, so a refusal closes the connection.
import t from 'tap';
import { FrontendRequest as R, ProtocolFeature as P, SUPPORTED_PROTOCOL_FEATURES, bit, encodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectClose, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('accepted; REPLY_ACK works from the next message on', async (t) => {
  const r = await rig();
  await r.fe.setProtocolFeatures(SUPPORTED_PROTOCOL_FEATURES);
  await r.fe.sync();
  t.equal(r.session().negotiatedProtocolFeatures, SUPPORTED_PROTOCOL_FEATURES);
  t.equal(await ack(r, R.SET_OWNER), 0n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a subset is fine', async (t) => {
  const r = await rig();
  await r.fe.setProtocolFeatures(bit(P.MQ));
  await r.fe.sync();
  r.fe.send(R.GET_QUEUE_NUM);
  t.ok(await r.fe.reply(R.GET_QUEUE_NUM, 8));
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a feature not offered (LOG_SHMFD): close', async (t) => {
  const r = await rig();
  r.fe.send(R.SET_PROTOCOL_FEATURES, encodeU64(bit(P.LOG_SHMFD)));
  await expectClose(t, r, 'SET_PROTOCOL_FEATURES (16)', 'BadState', /protocol feature bits 0x2 were not offered/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('wrong size: close', async (t) => {
  const r = await rig();
  r.fe.send(R.SET_PROTOCOL_FEATURES, new Uint8Array(16));
  await expectClose(t, r, 'SET_PROTOCOL_FEATURES (16)', 'BadSize', /payload is 16 bytes, expected 8/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
