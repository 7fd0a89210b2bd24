// SET_VRING_ADDR (9): ring areas as front-end virtual addresses; each must be aligned and lie inside one region
// (translated through the regions' user addresses, not their guest addresses).
import t from 'tap';
import { GuestAllocator, SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { FrontendRequest as R, encodeVringAddr, encodeVringState } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, prepare, rig, ringAddr, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

async function setup(protocol?: bigint) {
  const r = await rig();
  const ram = await prepare(r, protocol === undefined ? {} : { protocol });
  const d = new SplitRingDriver(ram, new GuestAllocator(ram), 64);
  await r.fe.request(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 64 }));
  return { r, ram, d };
}

t.test('accepted (front-end virtual addresses)', async (t) => {
  const { r, ram, d } = await setup();
  t.equal(await ack(r, R.SET_VRING_ADDR, ringAddr(ram, 0, d)), 0n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('guest physical addresses instead of front-end ones: not inside any region', async (t) => {
  const { r, d } = await setup();
  const p = encodeVringAddr({ index: 0, flags: 0, desc: BigInt(d.addrs.desc), used: BigInt(d.addrs.used), avail: BigInt(d.addrs.avail), log: 0n });
  await expectAckFailure(t, r, R.SET_VRING_ADDR, p, [], { request: 'SET_VRING_ADDR (9)', kind: 'BadState', reason: /ring 0 descriptor area \[0x[0-9a-f]+, \+1024\) is not inside one memory region/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('used ring running past the end of its region', async (t) => {
  const { r, ram, d } = await setup();
  const p = ringAddr(ram, 0, { addrs: { ...d.addrs, used: 0x40000 - 8 } });
  await expectAckFailure(t, r, R.SET_VRING_ADDR, p, [], { request: 'SET_VRING_ADDR (9)', kind: 'BadState', reason: /used ring .* is not inside one memory region/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

for (const [what, change, reason] of [
  ['descriptor table', { desc: 8 }, /descriptor table 0x[0-9a-f]+ is not 16-byte aligned/],
  ['available ring', { avail: 1 }, /available ring 0x[0-9a-f]+ is not 2-byte aligned/],
  ['used ring', { used: 2 }, /used ring 0x[0-9a-f]+ is not 4-byte aligned/],
] as const) {
  t.test(`misaligned ${what}`, async (t) => {
    const { r, ram, d } = await setup();
    const a = { ...d.addrs };
    for (const [k, v] of Object.entries(change)) a[k as keyof typeof a] += v;
    await expectAckFailure(t, r, R.SET_VRING_ADDR, ringAddr(ram, 0, { addrs: a }), [], { request: 'SET_VRING_ADDR (9)', kind: 'BadPayload', reason });
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
}

t.test('unknown flag bits', async (t) => {
  const { r, ram, d } = await setup();
  await expectAckFailure(t, r, R.SET_VRING_ADDR, ringAddr(ram, 0, d, 0x2), [], { request: 'SET_VRING_ADDR (9)', kind: 'BadPayload', reason: /unknown ring flags 0x2/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('before SET_VRING_NUM', async (t) => {
  const { r, ram, d } = await setup();
  await expectAckFailure(t, r, R.SET_VRING_ADDR, ringAddr(ram, 1, d), [], { request: 'SET_VRING_ADDR (9)', kind: 'BadState', reason: /ring 1 has no size yet/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('before any memory table: close without REPLY_ACK', async (t) => {
  const r = await rig();
  const { negotiate } = await import('../../../guest-driver-spec/frontend/conformance/harness.ts');
  await negotiate(r, WITHOUT_REPLY_ACK);
  const ram = r.ram();
  const d = new SplitRingDriver(ram, new GuestAllocator(ram), 64);
  await r.fe.request(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 64 }));
  r.fe.send(R.SET_VRING_ADDR, ringAddr(ram, 0, d));
  await expectClose(t, r, 'SET_VRING_ADDR (9)', 'BadState', /no memory table yet/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
