// Queue offload over vhost-user (virtio/device.ts QueueOffload, transport/vhost-user/offload.ts): the model lends a
// ring's kick and call eventfds to a native thread. take() gives duplicates of the real eventfds and the back-end
// stops serving the ring's kicks; giveBack() resumes and serves what came meanwhile. A new SET_VRING_KICK or
// SET_VRING_CALL (or GET_VRING_BASE, a reset) revokes the lend: the taker is told, the back-end serves the ring.
// Real eventfds and sockets through the reference front-end.
import t from 'tap';
import { GuestAllocator, type SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { host, prepare, rig, type Rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import type { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import type { QueueOffload } from '../../../vmm-device/virtio/device.ts';
import { FrontendRequest as R } from '../../../vmm-device/transport/vhost-user/messages.ts';

async function running(): Promise<{ r: Rig; ram: GuestRam; alloc: GuestAllocator; d: SplitRingDriver; off: QueueOffload }> {
  const r = await rig({ queues: 2 });
  const ram = await prepare(r);
  const alloc = new GuestAllocator(ram);
  const d = await startRing(r, ram, alloc, 0, 16);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const off = r.device.ctx?.queueOffload;
  if (off === undefined) throw new Error('the activation context carries no queue offload');
  return { r, ram, alloc, d, off };
}

/** Lets the back-end's loop run (a kick it should not serve would be served by now). */
const settle = (): Promise<void> => new Promise((res) => setTimeout(res, 100));

t.test('take lends duplicates of the real eventfds; the back-end ignores the kicks; giveBack serves what came', async (t) => {
  const { r, alloc, d, off } = await running();
  const lent = off.take(0);
  t.ok(lent !== undefined, 'taken');
  t.ok(lent!.callFd !== undefined, 'with the call fd');
  t.not(lent!.kickFd, r.fe.kickFds.get(0), 'the kick fd is a duplicate (the taker owns and closes it)');
  t.equal(r.session().describe().rings[0]!.taken, true);

  // A kick from the guest reaches the taker's fd; the back-end does not serve it.
  const first = d.post(alloc, Uint8Array.of(1, 2, 3), 8);
  r.fe.kick(0);
  await settle();
  t.equal(r.device.served, 0, 'the model was not called for the lent queue');
  t.equal(host.eventfdRead(lent!.kickFd), 1n, 'the kick is on the taker\'s duplicate (same eventfd)');
  // The taker signals the driver through its duplicate of the call fd.
  host.eventfdWrite(lent!.callFd!, 1n);
  t.equal(await r.fe.waitCall(0), 1n, 'the taker\'s interrupt reaches the front-end\'s call eventfd');

  // Another request arrives and the taker never looks at it: giveBack serves it.
  r.fe.kick(0);
  await settle();
  t.equal(r.device.served, 0);
  off.giveBack(0);
  t.equal(r.session().describe().rings[0]!.taken, false);
  t.ok((await r.fe.waitCall(0)) > 0n, 'served on giveBack');
  t.same(d.readUsed(), [{ id: first.head, len: 3 }], 'the request made while lent is answered');

  // Watching resumed: a plain kick is served again.
  const second = d.post(alloc, Uint8Array.of(9), 8);
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n);
  t.same(d.readUsed(), [{ id: second.head, len: 1 }]);
  host.close(lent!.kickFd);
  host.close(lent!.callFd!);
  t.same(r.session().queueOffload.counters, { taken: 1, givenBack: 1, revoked: 0, refused: 0 });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('take is refused (undefined, logged) for a ring not started and for a ring already taken', async (t) => {
  const { r, off } = await running();
  t.equal(off.take(1), undefined, 'ring 1 was never started');
  t.match(r.log.lines.at(-1), { message: 'queue offload refused', fields: { queue: 1, why: /not started/ } });
  const lent = off.take(0)!;
  t.equal(off.take(0), undefined, 'already taken');
  t.match(r.log.lines.at(-1), { fields: { queue: 0, why: /already taken/ } });
  t.equal(off.take(7), undefined, 'no such queue');
  off.giveBack(0);
  host.close(lent.kickFd);
  host.close(lent.callFd!);
  t.equal(r.session().queueOffload.counters.refused, 3);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('SET_VRING_KICK while taken revokes the lend: the taker is told, the back-end serves the new kick fd', async (t) => {
  const { r, alloc, d, off } = await running();
  const reasons: string[] = [];
  const lent = off.take(0, (why) => reasons.push(why))!;
  const kick = host.eventfd();
  host.close(r.fe.kickFds.get(0)!);
  r.fe.kickFds.set(0, kick);
  await r.fe.setVringFile(R.SET_VRING_KICK, 0, kick);
  await r.fe.sync();
  t.equal(reasons.length, 1, 'onRevoked called once');
  t.match(reasons[0], /SET_VRING_KICK/);
  t.equal(r.session().describe().rings[0]!.taken, false);
  const p = d.post(alloc, Uint8Array.of(5, 6), 8);
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n, 'the new kick fd is served by the back-end');
  t.same(d.readUsed(), [{ id: p.head, len: 2 }]);
  // The taker's late giveBack does nothing (the ring is no longer lent).
  off.giveBack(0);
  t.same(r.session().queueOffload.counters, { taken: 1, givenBack: 0, revoked: 1, refused: 0 });
  host.close(lent.kickFd);
  host.close(lent.callFd!);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('SET_VRING_CALL while taken revokes; a request left by the taker is served at once', async (t) => {
  const { r, alloc, d, off } = await running();
  const reasons: string[] = [];
  const lent = off.take(0, (why) => reasons.push(why))!;
  const p = d.post(alloc, Uint8Array.of(7), 8);
  r.fe.kick(0);
  await settle();
  t.equal(r.device.served, 0);
  const call = host.eventfd();
  host.close(r.fe.callFds.get(0)!);
  r.fe.callFds.set(0, call);
  await r.fe.setVringFile(R.SET_VRING_CALL, 0, call);
  await r.fe.sync();
  t.match(reasons, [/SET_VRING_CALL/]);
  t.ok((await r.fe.waitCall(0)) > 0n, 'served, and the interrupt goes to the new call eventfd');
  t.same(d.readUsed(), [{ id: p.head, len: 1 }]);
  host.close(lent.kickFd);
  host.close(lent.callFd!);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a device reset and GET_VRING_BASE revoke', async (t) => {
  const { r, off } = await running();
  const reasons: string[] = [];
  const lent = off.take(0, (why) => reasons.push(why))!;
  await r.fe.setStatus(0);
  await r.fe.sync();
  t.match(reasons, [/device reset/], 'SET_STATUS 0');
  host.close(lent.kickFd);
  host.close(lent.callFd!);
  // The ring is still started (vhost-user keeps rings across SET_STATUS 0): lend it again, then stop the ring.
  const again = off.take(0, (why) => reasons.push(why))!;
  t.ok(again !== undefined);
  await r.fe.getVringBase(0);
  t.match(reasons[1], /GET_VRING_BASE/);
  host.close(again.kickFd);
  host.close(again.callFd!);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a taker whose onRevoked throws: logged, the back-end goes on', async (t) => {
  const { r, off } = await running();
  const lent = off.take(0, () => {
    throw new Error('taker bug');
  })!;
  const kick = host.eventfd();
  host.close(r.fe.kickFds.get(0)!);
  r.fe.kickFds.set(0, kick);
  await r.fe.setVringFile(R.SET_VRING_KICK, 0, kick);
  await r.fe.sync();
  t.match(r.log.lines.find((l) => l.message.includes('failed handling a revocation')), { level: 'error', fields: { error: 'taker bug' } });
  t.equal(await r.fe.getStatus(), 0xf, 'still running');
  host.close(lent.kickFd);
  host.close(lent.callFd!);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
