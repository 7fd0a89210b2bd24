// A front-end that goes away and comes back (QEMU restarted, or its reconnecting chardev after a disconnect): the
// back-end released everything of the first connection and serves the second from a fresh session.
import t from 'tap';
import { GuestAllocator, SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { VhostUserFrontend } from '../../../guest-driver-spec/frontend/frontend.ts';
import { host, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';

async function serveOnce(t: Pick<typeof import('tap').default, 'ok' | 'same'>, fe: VhostUserFrontend, ram: GuestRam, word: string): Promise<void> {
  await fe.init({ queues: 2 });
  const alloc = new GuestAllocator(ram);
  const q = new SplitRingDriver(ram, alloc, 32);
  await fe.start({ ram, features: 1n << 32n, queues: [{ index: 0, size: 32, ...q.addrs }] });
  await fe.sync();
  const p = q.post(alloc, new TextEncoder().encode(word), 16);
  fe.kick(0);
  t.ok((await fe.waitCall(0)) > 0n, `${word}: answered`);
  t.same(q.readUsed(), [{ id: p.head, len: word.length }]);
}

t.test('front-end hangs up with a running device, reconnects, and is served again', async (t) => {
  const r = await rig();
  const ram1 = r.ram();
  await serveOnce(t, r.fe, ram1, 'first');
  t.ok(r.session().core.isActive);
  const first = r.session();
  r.fe.close(); // no GET_VRING_BASE, no SET_STATUS 0: an abrupt disconnect
  await new Promise((res) => setTimeout(res, 50));
  t.equal(r.server.closeReasons.at(-1), 'front-end closed the connection');
  t.notOk(first.core.isActive, 'the device was reset on disconnect');
  t.equal(r.device.resets, 1);
  t.same(first.describe().regions, [], 'its memory unmapped');
  const fe2 = await VhostUserFrontend.connect(host, r.path);
  const ram2 = r.ram([{ gpa: 0, size: 0x40000 }]);
  await serveOnce(t, fe2, ram2, 'second');
  t.not(r.session(), first, 'a fresh session');
  t.equal(r.server.connectionsServed, 2);
  fe2.close();
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
