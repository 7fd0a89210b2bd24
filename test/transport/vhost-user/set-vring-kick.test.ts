// SET_VRING_KICK (12): the kick eventfd; receiving it starts a configured ring. Bits 0-7 index, bit 8 "no fd".
import t from 'tap';
import { GuestAllocator, SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, encodeU64, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, host, prepare, rig, ringAddr, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('starts the configured ring; a second kick fd replaces the first', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  const d = new SplitRingDriver(ram, new GuestAllocator(ram), 64);
  await r.fe.request(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 64 }));
  await r.fe.request(R.SET_VRING_ADDR, ringAddr(ram, 0, d));
  const k1 = host.eventfd();
  t.equal(await ack(r, R.SET_VRING_KICK, encodeU64(0n), [k1]), 0n);
  t.ok(r.session().describe().rings[0]!.started);
  const k2 = host.eventfd();
  t.equal(await ack(r, R.SET_VRING_KICK, encodeU64(0n), [k2]), 0n);
  t.ok(r.session().describe().rings[0]!.started);
  host.close(k1);
  host.close(k2);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('ring not configured: refused, fd closed', async (t) => {
  const r = await rig();
  await prepare(r);
  const k = host.eventfd();
  await expectAckFailure(t, r, R.SET_VRING_KICK, encodeU64(1n), [k], { request: 'SET_VRING_KICK (12)', kind: 'BadState', reason: /ring 1 is not configured/ });
  host.close(k);
  t.notOk(r.session().describe().rings[1]!.kick);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

for (const [name, value, nfds, kind, reason] of [
  ['NOFD (polling) is not supported', 0x100n, 0, 'BadState', /polling mode/],
  ['NOFD set but an fd sent', 0x100n, 1, 'BadFdCount', /1 fds, expected 0/],
  ['no fd and no NOFD', 0n, 0, 'BadFdCount', /0 fds, expected 1/],
  ['reserved bits', 0x200n, 1, 'BadPayload', /reserved bits set in 0x200/],
  ['queue index out of range', 3n, 1, 'BadState', /queue index 3/],
] as const) {
  t.test(`refused: ${name}`, async (t) => {
    const r = await rig();
    await prepare(r);
    const fds = nfds ? [host.eventfd()] : [];
    await expectAckFailure(t, r, R.SET_VRING_KICK, encodeU64(value), fds, { request: 'SET_VRING_KICK (12)', kind, reason });
    for (const f of fds) host.close(f);
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
}

t.test('without REPLY_ACK: close', async (t) => {
  const r = await rig();
  await prepare(r, { protocol: WITHOUT_REPLY_ACK });
  r.fe.send(R.SET_VRING_KICK, encodeU64(0x100n));
  await expectClose(t, r, 'SET_VRING_KICK (12)', 'BadState', /polling mode/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
