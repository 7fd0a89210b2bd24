// Replays a recorded fixture through any device-side queue implementing DeviceQueue and lists every difference
// from the expectation. This is the reference replayer for fixtures/README.md: a replayer in another language
// does the same steps.

import { isDeepStrictEqual } from 'node:util';
import type { DeviceQueue, QueueOptions } from '../../vmm-device/virtqueue/queue.ts';
import type { DescriptorChain } from '../../vmm-device/virtqueue/chain.ts';
import { VirtqueueError } from '../../vmm-device/virtqueue/errors.ts';
import {
  DESC_SIZE,
  PACKED_EVENT_SIZE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_USED,
  VIRTQ_USED_F_NO_NOTIFY,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
  vringNeedEvent,
} from '../../vmm-device/abi/virtqueue.ts';
import { decodeDescriptor } from './descriptors.ts';
import { eventTriggered, readEvent } from './packed-driver.ts';
import { fromHex, loadFixtureMemory, type Fixture, type FixturePosition } from './fixture-format.ts';
import type { TestGuestMemory } from './test-memory.ts';

export type QueueFactory = (layout: 'split' | 'packed', options: QueueOptions) => DeviceQueue;

export interface ReplayMismatch {
  step: number;
  op: string;
  expected: unknown;
  actual: unknown;
}

export interface ReplayResult {
  mismatches: ReplayMismatch[];
  /** Guard bytes around regions that changed (the device wrote outside guest memory). */
  guardErrors: string[];
  steps: number;
}

export function fixtureQueueOptions(f: Fixture, mem: TestGuestMemory): QueueOptions {
  const q = f.queue;
  const split = q.layout === 'split';
  return {
    size: q.size,
    rings: {
      desc: mem.view(q.desc, descTableSize(q.size)),
      driver: mem.view(q.driver, split ? splitAvailSize(q.size) : PACKED_EVENT_SIZE),
      device: mem.view(q.device, split ? splitUsedSize(q.size) : PACKED_EVENT_SIZE),
    },
    memory: mem.memory,
    eventIdx: q.eventIdx,
    indirect: q.indirect,
    state: { ...q.state },
  };
}

/** What pop() returned, in the fixture's terms. */
export function describePop(r: DescriptorChain | VirtqueueError | null): unknown {
  if (r === null) return { empty: true };
  if (r instanceof VirtqueueError) return { error: r.kind };
  return { chain: { id: r.id, ringSlots: r.ringSlots, segments: r.describe() } };
}

/** Used elements from `from` as the driver reads them (split: used ring entries; packed: used descriptors). */
export function readUsedElements(
  f: Fixture,
  mem: TestGuestMemory,
  from: FixturePosition,
  expected: readonly { slots?: number | undefined }[],
): { elements: { id: number; len: number; slots?: number }[]; usedIdx?: number } {
  const q = f.queue;
  const out: { id: number; len: number; slots?: number }[] = [];
  if ('idx' in from) {
    const usedIdx = mem.readU16(q.device + 2);
    const count = (usedIdx - from.idx) & 0xffff;
    for (let k = 0; k < Math.min(count, q.size); k++) {
      const at = q.device + 4 + 8 * ((from.idx + k) % q.size);
      out.push({ id: mem.readU32(at), len: mem.readU32(at + 4) });
    }
    return { elements: out, usedIdx };
  }
  let pos = from.pos;
  let wrap = from.wrap;
  for (const e of expected) {
    const d = decodeDescriptor('packed', mem.view(q.desc + DESC_SIZE * pos, DESC_SIZE));
    const isUsed = ((d.flags & VIRTQ_DESC_F_AVAIL) !== 0) === wrap && ((d.flags & VIRTQ_DESC_F_USED) !== 0) === wrap;
    if (!isUsed) break;
    const slots = e.slots ?? 1;
    out.push({ id: d.nextOrId, len: d.len, slots });
    pos += slots;
    while (pos >= q.size) {
      pos -= q.size;
      wrap = !wrap;
    }
  }
  return { elements: out };
}

/** Whether a driver adding one buffer at `at` must notify the device, given what the device wrote. */
export function driverMustKick(f: Fixture, mem: TestGuestMemory, at: FixturePosition): boolean {
  const q = f.queue;
  if ('idx' in at) {
    if (q.eventIdx) return vringNeedEvent(mem.readU16(q.device + 4 + 8 * q.size), (at.idx + 1) & 0xffff, at.idx);
    return (mem.readU16(q.device) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }
  const next = at.pos + 1 >= q.size ? { pos: 0, wrap: !at.wrap } : { pos: at.pos + 1, wrap: at.wrap };
  return eventTriggered(readEvent(mem.view(q.device, PACKED_EVENT_SIZE)), q.size, at, next);
}

export function replayFixture(f: Fixture, factory: QueueFactory): ReplayResult {
  const mem = loadFixtureMemory(f);
  const mismatches: ReplayMismatch[] = [];
  const queue = factory(f.queue.layout, fixtureQueueOptions(f, mem));
  const popped: DescriptorChain[] = [];
  f.steps.forEach((step, i) => {
    const check = (expected: unknown, actual: unknown): void => {
      if (!isDeepStrictEqual(expected, actual)) mismatches.push({ step: i, op: step.op, expected, actual });
    };
    const guarded = (fn: () => void): void => {
      try {
        fn();
      } catch (e) {
        mismatches.push({ step: i, op: step.op, expected: 'no exception', actual: `threw ${String(e)}` });
      }
    };
    guarded(() => {
      switch (step.op) {
        case 'pop': {
          const r = queue.pop();
          if (r !== null && !(r instanceof VirtqueueError)) popped.push(r);
          check(step.expect, describePop(r));
          break;
        }
        case 'broken':
          check(step.expect, queue.broken?.kind ?? null);
          break;
        case 'hasAvailable':
          check(step.expect, queue.hasAvailable());
          break;
        case 'inFlight':
          check(step.expect, queue.inFlight);
          break;
        case 'pushUsed': {
          const chain = popped[step.chain];
          if (chain === undefined) {
            mismatches.push({ step: i, op: step.op, expected: `popped chain #${step.chain}`, actual: `${popped.length} popped` });
            return;
          }
          queue.pushUsed(chain, step.len);
          break;
        }
        case 'needsNotification':
          check(step.expect, queue.needsNotification());
          break;
        case 'disableNotifications':
          queue.disableNotifications();
          if (step.driverKick) check({ driverKick: step.driverKick.expect }, { driverKick: driverMustKick(f, mem, step.driverKick.at) });
          break;
        case 'enableNotifications':
          check(step.expect, queue.enableNotifications());
          if (step.driverKick) check({ driverKick: step.driverKick.expect }, { driverKick: driverMustKick(f, mem, step.driverKick.at) });
          break;
        case 'checkUsed': {
          const { elements, usedIdx } = readUsedElements(f, mem, step.from, step.expect);
          check(step.expect, elements);
          if (usedIdx !== undefined && 'idx' in step.from) {
            check({ usedIdx: (step.from.idx + step.expect.length) & 0xffff }, { usedIdx });
          }
          break;
        }
        case 'write':
          mem.memory.write(step.gpa, fromHex(step.hex));
          break;
      }
    });
  });
  return { mismatches, guardErrors: mem.checkGuards(), steps: f.steps.length };
}
