// GET_STATUS (40): the status last set, plus NEEDS_RESET when the device raised it.
import t from 'tap';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectClose, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('reports what was set', async (t) => {
  const r = await rig();
  await negotiate(r);
  t.equal(await r.fe.getStatus(), 0);
  await r.fe.setStatus(0x3);
  await r.fe.sync();
  t.equal(await r.fe.getStatus(), 0x3);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without STATUS: close (its reply has no error form)', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.STATUS));
  r.fe.send(R.GET_STATUS, new Uint8Array(0), [], 0x9);
  await expectClose(t, r, 'GET_STATUS (40)', 'BadState', /STATUS was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
