// The back-end restart scenario that the split and the packed inflight tests share: a real back-end process holds
// two of five requests, is killed with SIGKILL, a new process takes the socket over, and the reference front-end
// reconnects with the same inflight area. What differs per ring layout is passed in: the driver, the bases the
// front-end gives at each start, and where GET_VRING_BASE must find the ring at the end.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'tap';
import { GuestAllocator, type SplitRingAddrs } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { VhostUserFrontend, type KeptInflightArea } from '../../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { BackendProcess, completions } from '../../../guest-driver-spec/frontend/conformance/backend-process-control.ts';
import { HOLD_PREFIX } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { host } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

export const RESTART_QUEUE_SIZE = 16;
/** Generous: a loaded 2-core machine delays a freshly started process's first answers by seconds. */
const CALL_WAIT_MS = 15_000;
const GUEST_RAM_BYTES = 0x40000;
const RESPONSE_BYTES = 16;

/** What the scenario needs of a ring driver (SplitRingDriver, PackedRingDriver). */
export interface RestartRing {
  readonly addrs: SplitRingAddrs;
  /** The ring's base at the first start, where the layout has one to give (else the front-end's default). */
  readonly base?: number;
  /** Posts a request; answers the id the device's used element will name. */
  postRequest(alloc: GuestAllocator, request: Uint8Array, responseLen: number): number;
  readUsed(): { id: number; len: number }[];
}

export interface RestartLayout {
  tmpPrefix: string;
  features: bigint;
  ring(ram: GuestRam, alloc: GuestAllocator): RestartRing;
  /** The base the reconnecting front-end gives, knowing `completedBefore` completions (QEMU's restore). */
  restartBase: (completedBefore: number) => number;
  /** GET_VRING_BASE after all six requests. */
  finalBase: number;
}

const words = (list: string[]): Uint8Array[] => list.map((w) => new TextEncoder().encode(w));

export async function backendRestartScenario(t: Test, layout: RestartLayout): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), layout.tmpPrefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'vu.sock');
  const ram = new GuestRam(host, [{ gpa: 0, size: GUEST_RAM_BYTES }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram);
  const ring = layout.ring(ram, alloc);
  const queue = { index: 0, size: RESTART_QUEUE_SIZE, ...ring.addrs };
  const firstQueue = ring.base === undefined ? queue : { ...queue, base: ring.base };

  // First back-end: completes plain requests, holds the "hold:" ones.
  const first = await BackendProcess.start(socketPath, 1, 'hold');
  const fe1 = await VhostUserFrontend.connect(host, socketPath);
  await fe1.init({ queues: 1 });
  const kept: KeptInflightArea | undefined = await fe1.start({
    ram,
    features: layout.features,
    queues: [firstQueue],
    inflight: { numQueues: 1, queueSize: RESTART_QUEUE_SIZE },
  });
  t.ok(kept !== undefined, 'the front-end got an inflight area (GET_INFLIGHT_FD) and handed it back (SET_INFLIGHT_FD)');
  t.teardown(() => kept?.release());
  const requests = ['a', `${HOLD_PREFIX}b`, 'c', `${HOLD_PREFIX}d`, 'e'];
  const ids = new Map<number, string>();
  for (const [i, w] of words(requests).entries()) ids.set(ring.postRequest(alloc, w, RESPONSE_BYTES), requests[i]!);
  fe1.kick(0);
  await first.until((e) => e.filter((x) => x.event === 'served' || x.event === 'held').length === requests.length, 'every request to reach the device');
  t.same(first.texts('served'), ['a', 'c', 'e'], 'the first back-end completed the plain requests');
  t.same(first.texts('held'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'and holds two');
  const completedBefore = ring.readUsed();
  t.same(completedBefore.map((u) => ids.get(u.id)), ['a', 'c', 'e'], 'the guest sees three completions');

  t.same(await first.kill('SIGKILL'), { code: null, signal: 'SIGKILL' }, 'the first back-end died by SIGKILL');
  t.ok(await fe1.waitClosed(), 'the front-end saw the connection drop');
  fe1.close();

  const second = await BackendProcess.start(socketPath, 1, 'echo');
  t.teardown(() => second.kill('SIGTERM'));
  const fe2 = await VhostUserFrontend.connect(host, socketPath);
  t.teardown(() => fe2.close());
  await fe2.init({ queues: 1 });
  await fe2.start({
    ram,
    features: layout.features,
    queues: [{ ...queue, base: layout.restartBase(completedBefore.length) }],
    inflight: { numQueues: 1, queueSize: RESTART_QUEUE_SIZE, kept },
  });
  await second.until((e) => e.filter((x) => x.event === 'served').length === 2, 'the resubmitted requests');
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'the held requests were resubmitted oldest first, without a kick');
  t.ok((await fe2.waitCall(0, CALL_WAIT_MS)) > 0n, 'and the guest was interrupted');
  const resubmitted = ring.readUsed();
  t.same(resubmitted.map((u) => ids.get(u.id)), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`]);
  t.same(resubmitted.map((u) => u.len), [6, 6], 'answered in full');

  // The ring goes on after the resubmitted ones.
  ids.set(ring.postRequest(alloc, new TextEncoder().encode('f'), RESPONSE_BYTES), 'f');
  fe2.kick(0);
  t.ok((await fe2.waitCall(0, CALL_WAIT_MS)) > 0n);
  const after = ring.readUsed();
  t.same(after.map((u) => ids.get(u.id)), ['f'], 'a new request after the restart, found where the driver put it');
  await second.untilServed(3); // it reports after answering: wait for the line, not the used ring
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`, 'f'], 'nothing completed before the restart was served again');

  const all = [...completedBefore, ...resubmitted, ...after].map((u) => u.id);
  t.same(completions(all), { distinct: true, count: requests.length + 1 }, 'no request completed twice, none lost');
  t.same(await fe2.stop([0]), [layout.finalBase], 'GET_VRING_BASE: the ring resumes after all six');
}
