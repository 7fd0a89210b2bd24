// GET_FEATURES (1): the virtio features the device offers plus VHOST_USER_F_PROTOCOL_FEATURES; always a reply.
import t from 'tap';
import { FrontendRequest as R, VHOST_USER_F_PROTOCOL_FEATURES, bit, decodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { CORE_FEATURES } from '../../../vmm-device/virtio/core.ts';
import { ECHO_F_TEST } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { expectClose, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('reply: device features | core features | PROTOCOL_FEATURES, flags 0x5, 8 bytes', async (t) => {
  const r = await rig();
  r.fe.send(R.GET_FEATURES);
  const m = await r.fe.reply(R.GET_FEATURES, 8);
  t.equal(m.header.flags, 0x5);
  t.equal(decodeU64(m.payload), ECHO_F_TEST | CORE_FEATURES | bit(VHOST_USER_F_PROTOCOL_FEATURES));
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a payload on GET_FEATURES: close (its reply has no error form)', async (t) => {
  const r = await rig();
  r.fe.send(R.GET_FEATURES, new Uint8Array(8), [], 0x9);
  await expectClose(t, r, 'GET_FEATURES (1)', 'BadSize', /payload is 8 bytes, expected 0/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('an fd with GET_FEATURES: close, fd not leaked', async (t) => {
  const r = await rig();
  const { host } = await import('../../../guest-driver-spec/frontend/conformance/harness.ts');
  const fd = host.eventfd();
  r.fe.send(R.GET_FEATURES, new Uint8Array(0), [fd]);
  host.close(fd);
  await expectClose(t, r, 'GET_FEATURES (1)', 'BadFdCount', /1 fds, expected 0/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
