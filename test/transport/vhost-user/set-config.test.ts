// SET_CONFIG (25): writes device config space; read-only bytes are refused unless flagged as migration.
import t from 'tap';
import { FrontendRequest as R, encodeConfig } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, negotiate, rig, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('writable bytes written', async (t) => {
  const r = await rig();
  await negotiate(r);
  await r.fe.setConfig(4, Uint8Array.of(1, 2, 3, 4));
  t.same([...r.device.config.subarray(4)], [1, 2, 3, 4]);
  t.same([...(await r.fe.getConfig(4, 4))], [1, 2, 3, 4]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('read-only bytes: refused; with the migration flag: accepted (and dropped by the device)', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, R.SET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: Uint8Array.of(9) }), [], { request: 'SET_CONFIG (25)', kind: 'BadState', reason: /\[0, 1\) are read-only/ });
  t.equal(await ack(r, R.SET_CONFIG, encodeConfig({ offset: 0, flags: 1, data: Uint8Array.of(9) })), 0n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('out of the config space / bad flags', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, R.SET_CONFIG, encodeConfig({ offset: 6, flags: 0, data: new Uint8Array(4) }), [], { request: 'SET_CONFIG (25)', kind: 'BadState', reason: /\[6, 10\) is outside the 8-byte config space/ });
  await expectAckFailure(t, r, R.SET_CONFIG, encodeConfig({ offset: 4, flags: 7, data: new Uint8Array(4) }), [], { request: 'SET_CONFIG (25)', kind: 'BadPayload', reason: /config flags 7/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without REPLY_ACK: close', async (t) => {
  const r = await rig();
  await negotiate(r, WITHOUT_REPLY_ACK);
  r.fe.send(R.SET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(4) }));
  await expectClose(t, r, 'SET_CONFIG (25)', 'BadState', /read-only/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
