// GET_QUEUE_NUM (17): the device's queue count; only with MQ negotiated.
import t from 'tap';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, decodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectClose, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('reply: the queue count', async (t) => {
  const r = await rig({ queues: 3 });
  await negotiate(r);
  r.fe.send(R.GET_QUEUE_NUM);
  t.equal(decodeU64((await r.fe.reply(R.GET_QUEUE_NUM, 8)).payload), 3n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without MQ: close', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.MQ));
  r.fe.send(R.GET_QUEUE_NUM, new Uint8Array(0), [], 0x9);
  await expectClose(t, r, 'GET_QUEUE_NUM (17)', 'BadState', /protocol feature MQ was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
