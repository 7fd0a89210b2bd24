// SET_STATUS (39): the device status as the front-end sets it (STATUS negotiated). DRIVER_OK starts the device with
// the negotiated features, memory and started rings; 0 resets it.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, encodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectAckFailure, expectClose, negotiate, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('QEMU order: FEATURES_OK alone, then ACK|DRIVER|DRIVER_OK added; 0 resets', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  await r.fe.addStatus(0x8);
  await r.fe.sync();
  t.notOk(r.session().core.isActive);
  await startRing(r, ram, new GuestAllocator(ram), 0, 64);
  await r.fe.addStatus(0x7);
  await r.fe.sync();
  t.ok(r.session().core.isActive, 'active after DRIVER_OK');
  t.equal(r.device.activations, 1);
  t.ok(r.device.ctx!.queues[0] !== undefined && r.device.ctx!.queues[1] === undefined, 'the started ring was handed to the device');
  t.equal(r.device.ctx!.features, bit(32), 'virtio features only (PROTOCOL_FEATURES removed)');
  await r.fe.setStatus(0);
  await r.fe.sync();
  t.notOk(r.session().core.isActive);
  t.equal(r.device.resets, 1);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('DRIVER_OK without VERSION_1 acked: the device refuses, NEEDS_RESET is not set but the device stays inactive', async (t) => {
  const r = await rig();
  await prepare(r, { features: bit(30) });
  await r.fe.setStatus(0xf);
  await r.fe.sync();
  t.notOk(r.session().core.isActive);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('status above 8 bits: refused', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, R.SET_STATUS, encodeU64(0x100n), [], { request: 'SET_STATUS (39)', kind: 'BadPayload', reason: /does not fit the 8-bit device status/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without STATUS negotiated: close', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.STATUS) & ~bit(P.REPLY_ACK));
  r.fe.send(R.SET_STATUS, encodeU64(1n));
  await expectClose(t, r, 'SET_STATUS (39)', 'BadState', /STATUS was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
