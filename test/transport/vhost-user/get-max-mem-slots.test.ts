// GET_MAX_MEM_SLOTS (36): 509 memory slots, with CONFIGURE_MEM_SLOTS negotiated.
import t from 'tap';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, decodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectClose, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('reply: 509', async (t) => {
  const r = await rig();
  await negotiate(r);
  r.fe.send(R.GET_MAX_MEM_SLOTS);
  t.equal(decodeU64((await r.fe.reply(R.GET_MAX_MEM_SLOTS, 8)).payload), 509n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without CONFIGURE_MEM_SLOTS: close', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.CONFIGURE_MEM_SLOTS));
  r.fe.send(R.GET_MAX_MEM_SLOTS);
  await expectClose(t, r, 'GET_MAX_MEM_SLOTS (36)', 'BadState', /CONFIGURE_MEM_SLOTS was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
