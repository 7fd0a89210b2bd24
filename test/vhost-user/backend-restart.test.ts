// Back-end restart with the inflight area (vhost-user.rst "Inflight I/O tracking"): a real back-end process is
// killed with SIGKILL while it holds requests, a new process takes the socket over, and the reference front-end
// reconnects as the project's patched QEMU does (the same inflight area handed back with SET_INFLIGHT_FD, each
// ring's base set to the used index, QEMU's restore after a lost back-end). Every request must complete exactly
// once: what was in flight is resubmitted (oldest first), what was completed is not served again.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { GuestAllocator, SplitRingDriver } from '../../guest-driver-spec/frontend/guest-driver.ts';
import { VhostUserFrontend, type KeptInflightArea } from '../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { BackendProcess, completions } from '../../guest-driver-spec/frontend/conformance/backend-process-control.ts';
import { HOLD_PREFIX } from '../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { host } from '../../guest-driver-spec/frontend/conformance/harness.ts';
import { F_VERSION_1, bit } from '../../vmm-device/virtio/constants.ts';

const QUEUE_SIZE = 16;
/** Generous: a loaded 2-core machine delays a freshly started process's first answers by seconds. */
const CALL_WAIT_MS = 15_000;

const words = (list: string[]): Uint8Array[] => list.map((w) => new TextEncoder().encode(w));

t.test('a back-end killed with SIGKILL mid-request: the next one resubmits what was in flight, each request completes once', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhost-user-restart-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'vu.sock');
  const ram = new GuestRam(host, [{ gpa: 0, size: 0x40000 }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram);
  const ring = new SplitRingDriver(ram, alloc, QUEUE_SIZE);
  const features = bit(F_VERSION_1);
  const queue = { index: 0, size: QUEUE_SIZE, ...ring.addrs };

  // First back-end: completes plain requests, holds the "hold:" ones.
  const first = await BackendProcess.start(socketPath, 1, 'hold');
  const fe1 = await VhostUserFrontend.connect(host, socketPath);
  await fe1.init({ queues: 1 });
  const kept: KeptInflightArea | undefined = await fe1.start({ ram, features, queues: [queue], inflight: { numQueues: 1, queueSize: QUEUE_SIZE } });
  t.ok(kept !== undefined, 'the front-end got an inflight area (GET_INFLIGHT_FD) and handed it back (SET_INFLIGHT_FD)');
  t.teardown(() => kept?.release());
  const requests = ['a', `${HOLD_PREFIX}b`, 'c', `${HOLD_PREFIX}d`, 'e'];
  const heads = new Map<number, string>();
  for (const [i, w] of words(requests).entries()) heads.set(ring.post(alloc, w, 16).head, requests[i]!);
  fe1.kick(0);
  await first.until((e) => e.filter((x) => x.event === 'served' || x.event === 'held').length === requests.length, 'every request to reach the device');
  t.same(first.texts('served'), ['a', 'c', 'e'], 'the first back-end completed the plain requests');
  t.same(first.texts('held'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'and holds two');
  const completedBefore = ring.readUsed();
  t.same(completedBefore.map((u) => heads.get(u.id)), ['a', 'c', 'e'], 'the guest sees three completions');

  t.same(await first.kill('SIGKILL'), { code: null, signal: 'SIGKILL' }, 'the first back-end died by SIGKILL');
  t.ok(await fe1.waitClosed(), 'the front-end saw the connection drop');
  fe1.close();

  // QEMU's view after losing the back-end: last_avail_idx restored to used->idx (3), the same inflight area.
  const second = await BackendProcess.start(socketPath, 1, 'echo');
  t.teardown(() => second.kill('SIGTERM'));
  const fe2 = await VhostUserFrontend.connect(host, socketPath);
  t.teardown(() => fe2.close());
  await fe2.init({ queues: 1 });
  await fe2.start({ ram, features, queues: [{ ...queue, base: completedBefore.length }], inflight: { numQueues: 1, queueSize: QUEUE_SIZE, kept } });
  await second.until((e) => e.filter((x) => x.event === 'served').length === 2, 'the resubmitted requests');
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'the held requests were resubmitted oldest first, without a kick');
  t.ok((await fe2.waitCall(0, CALL_WAIT_MS)) > 0n, 'and the guest was interrupted');
  const resubmitted = ring.readUsed();
  t.same(resubmitted.map((u) => heads.get(u.id)), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`]);
  t.same(resubmitted.map((u) => u.len), [6, 6], 'answered in full');

  // The ring goes on after the resubmitted ones.
  const f = ring.post(alloc, new TextEncoder().encode('f'), 16);
  heads.set(f.head, 'f');
  fe2.kick(0);
  t.ok((await fe2.waitCall(0, CALL_WAIT_MS)) > 0n);
  const after = ring.readUsed();
  t.same(after.map((u) => heads.get(u.id)), ['f'], 'a new request after the restart');
  await second.untilServed(3); // it reports after answering: wait for the line, not the used ring
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`, 'f'], 'nothing completed before the restart was served again');

  const all = [...completedBefore, ...resubmitted, ...after].map((u) => u.id);
  t.same(completions(all), { distinct: true, count: requests.length + 1 }, 'no request completed twice, none lost');
  t.same(await fe2.stop([0]), [requests.length + 1], 'GET_VRING_BASE: the ring resumes after all six');
});
