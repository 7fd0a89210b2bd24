// GET_CONFIG (24): reads device config space (CONFIG negotiated). The protocol's error form is an empty payload.
import t from 'tap';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, encodeConfig } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ECHO_CONFIG_MAGIC } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { expectClose, lastRefusal, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('reads the config bytes; reply carries offset, size, flags', async (t) => {
  const r = await rig();
  await negotiate(r);
  const cfg = await r.fe.getConfig(0, 8);
  t.equal(new DataView(cfg.buffer).getUint32(0, true), ECHO_CONFIG_MAGIC);
  t.same([...(await r.fe.getConfig(2, 2))], [ECHO_CONFIG_MAGIC >>> 16 & 0xff, ECHO_CONFIG_MAGIC >>> 24]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('beyond the config space: empty reply, connection kept', async (t) => {
  const r = await rig();
  await negotiate(r);
  r.fe.send(R.GET_CONFIG, encodeConfig({ offset: 4, flags: 0, data: new Uint8Array(8) }));
  const m = await r.fe.reply(R.GET_CONFIG);
  t.equal(m.header.size, 0, 'zero-length payload = error');
  t.match(lastRefusal(r), { request: 'GET_CONFIG (24)', kind: 'BadState', reason: /\[4, 12\) is outside the 8-byte config space/ });
  t.same([...(await r.fe.getConfig(0, 1))], [ECHO_CONFIG_MAGIC & 0xff], 'next request served');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('bad access size (0 bytes): empty reply', async (t) => {
  const r = await rig();
  await negotiate(r);
  r.fe.send(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(0) }));
  t.equal((await r.fe.reply(R.GET_CONFIG)).header.size, 0);
  t.match(lastRefusal(r), { request: 'GET_CONFIG (24)', kind: 'BadPayload', reason: /config access size 0/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without CONFIG negotiated: empty reply', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.CONFIG));
  r.fe.send(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(4) }));
  t.equal((await r.fe.reply(R.GET_CONFIG)).header.size, 0);
  t.match(lastRefusal(r), { request: 'GET_CONFIG (24)', kind: 'BadState', reason: /CONFIG was not negotiated/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('payload shorter than its header says: close (the framing of the payload is wrong)', async (t) => {
  const r = await rig();
  await negotiate(r);
  r.fe.send(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(8) }).subarray(0, 16));
  await expectClose(t, r, 'GET_CONFIG (24)', 'BadSize', /payload is 16 bytes, expected 20/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
