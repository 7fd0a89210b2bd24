// A vhost-user ring's state (what SET_VRING_* said) and how its queue is built over guest memory: the ring areas
// resolved through the front-end's virtual addresses, the position to resume from, the inflight tracking when the
// front-end gave an inflight area (a ring restarted after a back-end crash resubmits what was in flight first),
// and the rebuild of a started ring over a new memory map or new addresses, keeping its position.

import type { GuestMemory } from '../../memory/guest-memory.ts';
import type { Logger } from '../../util/log.ts';
import { PACKED_EVENT_SIZE, descTableSize, splitAvailSize, splitUsedSize } from '../../abi/virtqueue.ts';
import { createQueue } from '../../virtqueue/index.ts';
import type { DeviceQueue, QueueOptions } from '../../virtqueue/queue.ts';
import type { Watch } from '../../host/host.ts';
import type { InflightArea } from './inflight.ts';
import { InflightPackedQueue } from './inflight-packed.ts';
import { InflightSplitQueue, walkSplitHead, type SplitResubmission } from './inflight-split.ts';
import { FrontendRequest, VhostUserProtocolError } from './messages.ts';

/** A queue lent to a native thread (QueueOffload.take): the transport does not watch its kick meanwhile. */
export interface RingTake {
  /** Told when the lend ends without a giveBack (new kick/call fd, ring stopped, reset, connection gone). */
  onRevoked: ((reason: string) => void) | undefined;
}

export interface Ring {
  num: number | undefined;
  addr: { desc: number; avail: number; used: number; flags: number } | undefined;
  /** SET_VRING_BASE value (split: next avail index; packed: index | wrap << 15). */
  base: number;
  kickFd: number | undefined;
  callFd: number | undefined;
  errFd: number | undefined;
  kickWatch: Watch | undefined;
  /** SET_VRING_ENABLE state. */
  enabled: boolean;
  queue: DeviceQueue | undefined;
  /** Set while the queue is lent to a native thread. */
  taken: RingTake | undefined;
}

export function newRing(): Ring {
  return {
    num: undefined,
    addr: undefined,
    base: 0,
    kickFd: undefined,
    callFd: undefined,
    errFd: undefined,
    kickWatch: undefined,
    enabled: false,
    queue: undefined,
    taken: undefined,
  };
}

export const PACKED_WRAP_BIT = 1 << 15;

/** What building a queue depends on: the session's negotiated features, memory and inflight area. */
export interface RingEnv {
  readonly memory: GuestMemory;
  /** False until the first memory table. */
  readonly hasMemory: boolean;
  readonly packed: boolean;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly inflight: InflightArea | undefined;
  readonly log: Logger;
  /** Inflight-area entries that named a descriptor beyond the ring (counted by the session). */
  badInflightEntries(n: number): void;
}

/** The descriptor area as u16 words (the packed inflight tracking reads the raw descriptors it copies). */
function ringWords(opts: QueueOptions): Uint16Array {
  const d = opts.rings.desc;
  return new Uint16Array(d.buffer, d.byteOffset, d.byteLength >> 1);
}

export function hasResubmissions(q: DeviceQueue | undefined): boolean {
  return (q instanceof InflightSplitQueue || q instanceof InflightPackedQueue) && q.pendingResubmissions > 0;
}

/** The position GET_VRING_BASE reports (and a rebuilt queue resumes from). */
export function ringBase(q: DeviceQueue, packed: boolean): number {
  const st = q.getState();
  return packed ? st.nextAvail | (st.availWrap ? PACKED_WRAP_BIT : 0) : st.nextAvail;
}

/** Views of the three ring areas through the front-end's virtual addresses, each inside one region. */
export function resolveRings(env: RingEnv, index: number, num: number, addr: { desc: number; avail: number; used: number }): QueueOptions['rings'] {
  const code = FrontendRequest.SET_VRING_ADDR;
  if (!env.hasMemory) throw new VhostUserProtocolError('BadState', code, 'no memory table yet (SET_MEM_TABLE first)');
  const sizes = env.packed
    ? { desc: descTableSize(num), driver: PACKED_EVENT_SIZE, device: PACKED_EVENT_SIZE }
    : { desc: descTableSize(num), driver: splitAvailSize(num), device: splitUsedSize(num) };
  const area = (what: string, uva: number, len: number): Uint8Array => {
    const v = env.memory.contiguousUser(uva, len);
    if (v === undefined) {
      throw new VhostUserProtocolError('BadState', code, `ring ${index} ${what} [0x${uva.toString(16)}, +${len}) is not inside one memory region`);
    }
    return v;
  };
  return {
    desc: area('descriptor area', addr.desc, sizes.desc),
    driver: area(env.packed ? 'driver area' : 'available ring', addr.avail, sizes.driver),
    device: area(env.packed ? 'device area' : 'used ring', addr.used, sizes.device),
  };
}

/** Queue options for a configured ring, resuming from its SET_VRING_BASE. */
export function queueOptions(env: RingEnv, index: number, r: Ring): QueueOptions {
  const rings = resolveRings(env, index, r.num!, r.addr!);
  const opts: QueueOptions = { size: r.num!, rings, memory: env.memory, eventIdx: env.eventIdx, indirect: env.indirect };
  if (env.packed) {
    // QEMU's packed base: the next available slot with its wrap counter in bit 15; the used side resumes there
    // too (everything before it was completed when the ring stopped).
    const wrap = (r.base & PACKED_WRAP_BIT) !== 0;
    opts.state = { nextAvail: r.base & 0x7fff, availWrap: wrap, nextUsed: r.base & 0x7fff, usedWrap: wrap };
  } else {
    // Split: SET_VRING_BASE carries only the available index; the used side resumes from the used index the
    // driver sees (the queue reads it when nextUsed is absent).
    opts.state = { nextAvail: r.base & 0xffff, nextUsed: Atomics.load(new Uint16Array(rings.device.buffer, rings.device.byteOffset, 2), 1) };
  }
  return opts;
}

/**
 * The queue for a ring whose kick fd just arrived. A ring that was already started keeps its queue object and
 * position (only its views are rebuilt); a new one is tracked in the inflight area when there is one.
 */
export function startQueue(env: RingEnv, index: number, opts: QueueOptions, previous: DeviceQueue | undefined): DeviceQueue {
  const state = previous?.getState();
  if (state !== undefined) opts.state = state;
  if (previous !== undefined) return rebind(env, previous, opts);
  if (env.inflight !== undefined) return env.packed ? trackedPackedQueue(env, index, opts) : trackedSplitQueue(env, index, opts);
  return createQueue(env.packed ? 'packed' : 'split', opts);
}

/**
 * Rebuilds a started ring's queue over the current memory and addresses (a new memory map, new addresses),
 * keeping its position. Throws when the ring is no longer inside guest memory.
 */
export function rebuildQueue(env: RingEnv, index: number, r: Ring): DeviceQueue {
  const old = r.queue!;
  const st = old.getState();
  r.base = ringBase(old, env.packed);
  const opts = queueOptions(env, index, r);
  opts.state = env.packed ? st : { nextAvail: st.nextAvail, nextUsed: st.nextUsed };
  return rebind(env, old, opts);
}

/** An inflight-tracked queue keeps its object (and tracking) with a new inner queue; a plain one is replaced. */
function rebind(env: RingEnv, old: DeviceQueue, opts: QueueOptions): DeviceQueue {
  if (old instanceof InflightSplitQueue) {
    old.rebind(createQueue('split', opts), headWalker(opts));
    return old;
  }
  if (old instanceof InflightPackedQueue) {
    old.rebind(createQueue('packed', opts), ringWords(opts), opts.memory);
    return old;
  }
  return createQueue(env.packed ? 'packed' : 'split', opts);
}

function headWalker(opts: QueueOptions): (head: number) => ReturnType<typeof walkSplitHead> {
  return (head) => walkSplitHead(opts.rings.desc, opts.size, opts.memory, opts.indirect, head);
}

/**
 * A packed ring starting with an inflight area. The area, not SET_VRING_BASE, says where the ring is once it
 * has tracked it: a packed ring has no used index in guest memory, and QEMU does not restore its base after
 * losing the back-end. The chains in flight are resubmitted first; the driver's next available slot is past them.
 */
function trackedPackedQueue(env: RingEnv, index: number, opts: QueueOptions): DeviceQueue {
  const region = env.inflight!.packedRegion(index, opts.size);
  if (typeof region === 'string') {
    env.log.log('warn', 'ring not tracked in the inflight area', { queue: index, reason: region });
    return createQueue('packed', opts);
  }
  const ring = ringWords(opts);
  const recovered = region.recover(ring, opts.size, { index: opts.state!.nextAvail, wrap: opts.state!.availWrap ?? true });
  if (recovered.invalid > 0) {
    env.badInflightEntries(recovered.invalid);
    env.log.log('warn', 'malformed inflight entries ignored', { queue: index, entries: recovered.invalid });
  }
  if (!recovered.fresh) {
    const s = recovered.state;
    if (s.nextAvail !== opts.state!.nextAvail || s.availWrap !== opts.state!.availWrap) {
      env.log.log('info', 'packed ring resumes where the inflight area says', {
        queue: index,
        base: opts.state!.nextAvail | (opts.state!.availWrap === true ? PACKED_WRAP_BIT : 0),
        avail: s.nextAvail | (s.availWrap ? PACKED_WRAP_BIT : 0),
      });
    }
    opts.state = s;
  }
  if (recovered.chains.length > 0) env.log.log('info', 'resubmitting requests in flight', { queue: index, count: recovered.chains.length });
  return new InflightPackedQueue(createQueue('packed', opts), ring, region, recovered, opts.memory, opts.indirect);
}

/**
 * A split ring starting with an inflight area: what the area says was in flight is resubmitted first, and the
 * ring resumes after it (used->idx + chains in flight, as the front-end's SET_VRING_BASE after a back-end crash
 * is used->idx: QEMU's restore of last_avail_idx).
 */
function trackedSplitQueue(env: RingEnv, index: number, opts: QueueOptions): DeviceQueue {
  const region = env.inflight!.splitRegion(index, opts.size);
  if (typeof region === 'string') {
    env.log.log('warn', 'ring not tracked in the inflight area', { queue: index, reason: region });
    return createQueue('split', opts);
  }
  const recovered: SplitResubmission = region.recover(opts.size, opts.state!.nextUsed);
  if (recovered.invalid.length > 0) {
    env.badInflightEntries(recovered.invalid.length);
    env.log.log('warn', 'inflight entries beyond the ring size ignored', { queue: index, heads: recovered.invalid.join(',') });
  }
  if (recovered.heads.length > 0) {
    opts.state = { nextAvail: (recovered.usedIdx + recovered.heads.length) & 0xffff, nextUsed: recovered.usedIdx };
    env.log.log('info', 'resubmitting requests in flight', { queue: index, count: recovered.heads.length });
  }
  return new InflightSplitQueue(createQueue('split', opts), region, recovered, headWalker(opts));
}
