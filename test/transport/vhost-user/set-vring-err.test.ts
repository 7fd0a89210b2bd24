// SET_VRING_ERR (14): the eventfd the back-end signals when a ring breaks (a guest bug: NEEDS_RESET).
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, encodeU64 } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { VIRTQ_DESC_F_NEXT } from '../../../vmm-device/abi/virtqueue.ts';
import { ack, expectAckFailure, host, negotiate, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('accepted; NOFD clears it; bad index refused', async (t) => {
  const r = await rig();
  await negotiate(r);
  const e = host.eventfd();
  t.equal(await ack(r, R.SET_VRING_ERR, encodeU64(0n), [e]), 0n);
  t.ok(r.session().describe().rings[0]!.err);
  t.equal(await ack(r, R.SET_VRING_ERR, encodeU64(0x100n)), 0n);
  t.notOk(r.session().describe().rings[0]!.err);
  await expectAckFailure(t, r, R.SET_VRING_ERR, encodeU64(0xffn), [e], { request: 'SET_VRING_ERR (14)', kind: 'BadState', reason: /queue index 255/ });
  host.close(e);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a looping descriptor chain: the err eventfd fires, the device needs reset, the back-end goes on', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  const d = await startRing(r, ram, alloc, 0, 8);
  const e = host.eventfd();
  r.fe.errFds.set(0, e);
  await r.fe.setVringFile(R.SET_VRING_ERR, 0, e);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const buf = alloc.alloc(16);
  d.writeDescriptor(0, buf, 16, VIRTQ_DESC_F_NEXT, 1);
  d.writeDescriptor(1, buf, 16, VIRTQ_DESC_F_NEXT, 0); // 0 -> 1 -> 0 -> ...
  d.publish(0);
  r.fe.kick(0);
  t.ok((await r.fe.waitEventfd(e)) > 0n, 'err eventfd fired');
  t.equal((await r.fe.getStatus()) & 0x40, 0x40, 'GET_STATUS shows NEEDS_RESET');
  t.equal(r.session().core.counters.queueErrors, 1);
  t.same(d.readUsed(), [], 'nothing completed');
  // The connection and the process are fine: a reset and a restart work.
  await r.fe.setStatus(0);
  await r.fe.sync();
  t.equal(await r.fe.getStatus(), 0);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a device model that throws: NEEDS_RESET (a device failure, not a ring error), never a crash', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  const d = await startRing(r, ram, alloc, 0, 8);
  const e = host.eventfd();
  r.fe.errFds.set(0, e);
  await r.fe.setVringFile(R.SET_VRING_ERR, 0, e);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  r.device.throwOnNotify = true;
  d.post(alloc, Uint8Array.of(1), 4);
  r.fe.kick(0);
  // The core catches what the model throws (virtio/core.ts): the device needs a reset; the ring itself is not
  // broken by the driver, so its err eventfd stays quiet.
  t.equal(await r.fe.waitEventfd(e, 300), 0n, 'err eventfd not fired');
  t.equal((await r.fe.getStatus()) & 0x40, 0x40, 'NEEDS_RESET');
  t.equal(r.session().core.counters.deviceFailures, 1, 'counted as a device failure');
  t.match(r.log.lines.find((l) => l.message.includes('device model failed')), { fields: { where: 'kick of queue 0', error: /injected model failure/ } });
  // The connection and the process are fine: a reset works.
  r.device.throwOnNotify = false;
  await r.fe.setStatus(0);
  t.equal(await r.fe.getStatus(), 0);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
