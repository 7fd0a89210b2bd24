// GET_PROTOCOL_FEATURES (15): the protocol features this back-end implements; legal before SET_FEATURES.
import t from 'tap';
import { FrontendRequest as R, ProtocolFeature as P, SUPPORTED_PROTOCOL_FEATURES, bit, decodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectClose, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('reply lists the issue-3 protocol features', async (t) => {
  const r = await rig();
  r.fe.send(R.GET_PROTOCOL_FEATURES);
  const m = await r.fe.reply(R.GET_PROTOCOL_FEATURES, 8);
  const want = [P.MQ, P.REPLY_ACK, P.BACKEND_REQ, P.BACKEND_SEND_FD, P.HOST_NOTIFIER, P.CONFIG, P.CONFIGURE_MEM_SLOTS, P.RESET_DEVICE, P.STATUS, P.INFLIGHT_SHMFD].reduce((a, b) => a | bit(b), 0n);
  t.equal(decodeU64(m.payload), want);
  t.equal(SUPPORTED_PROTOCOL_FEATURES, want);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a payload: close', async (t) => {
  const r = await rig();
  r.fe.send(R.GET_PROTOCOL_FEATURES, new Uint8Array(8));
  await expectClose(t, r, 'GET_PROTOCOL_FEATURES (15)', 'BadSize', /expected 0/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
