// The inflight area (vhost-user.rst "Inflight I/O tracking", protocol feature INFLIGHT_SHMFD): shared memory the
// back-end allocates (GET_INFLIGHT_FD), the front-end keeps across back-end restarts and hands back
// (SET_INFLIGHT_FD), so that a restarted back-end can resubmit what was in flight.
//
// Layout: one region per queue, back to back. Each region is large enough for either ring layout:
//   split : QueueRegionSplit  = features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16 (16 B)
//           + desc_num * DescStateSplit (inflight u8, padding[5], next u16, counter u64: 16 B)
//   packed: QueueRegionPacked = 32 B header + desc_num * DescStatePacked (32 B)
// so a region is 32 + 32 * queue_size bytes, rounded up to INFLIGHT_REGION_ALIGNMENT.

import type { GuestMemory } from '../../memory/guest-memory.ts';
import {
  DescriptorChain,
  PACKED_EVENT_SIZE,
  PackedQueue,
  SplitQueue,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_USED,
  VirtqueueError,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
} from '../../virtqueue/index.ts';
import type { DeviceQueue, QueueState } from '../../virtqueue/queue.ts';
import type { HostOps } from '../../host/host.ts';
import { FrontendRequest, VhostUserProtocolError } from './messages.ts';

export const INFLIGHT_VERSION = 1;
export const INFLIGHT_REGION_ALIGNMENT = 64;
const REGION_HEADER = 32;
const DESC_STATE = 32;
/** Offsets inside a queue region (the split layout's header; version and desc_num are common to both). */
const OFF_VERSION = 8;
const OFF_DESC_NUM = 10;
const OFF_LAST_BATCH_HEAD = 12;
const OFF_USED_IDX = 14;
/** Split: DescStateSplit i at SPLIT_DESC_BASE + SPLIT_DESC_STATE * i: inflight u8 @0, next u16 @6, counter u64 @8. */
const SPLIT_DESC_BASE = 16;
const SPLIT_DESC_STATE = 16;
const DESC_OFF_INFLIGHT = 0;
const DESC_OFF_COUNTER = 8;
const TWO_POW_32 = 0x1_0000_0000;

export function inflightRegionSize(queueSize: number): number {
  const raw = REGION_HEADER + DESC_STATE * queueSize;
  return Math.ceil(raw / INFLIGHT_REGION_ALIGNMENT) * INFLIGHT_REGION_ALIGNMENT;
}

export function inflightAreaSize(numQueues: number, queueSize: number): number {
  return numQueues * inflightRegionSize(queueSize);
}

export class InflightArea {
  private released = false;

  private constructor(
    private readonly host: HostOps,
    readonly fd: number,
    private readonly mapping: ArrayBuffer,
    /** Offset of queue 0's region inside the mapping. */
    readonly base: number,
    readonly numQueues: number,
    readonly queueSize: number,
  ) {}

  /** A fresh area over a new memfd of `size` bytes: every queue region gets version 1 and its desc_num. */
  static create(host: HostOps, fd: number, size: number, numQueues: number, queueSize: number): InflightArea {
    const mapping = host.mmapShared(fd, size, 0);
    const area = new InflightArea(host, fd, mapping, 0, numQueues, queueSize);
    for (let q = 0; q < numQueues; q++) {
      const dv = area.regionView(q);
      dv.setUint16(OFF_VERSION, INFLIGHT_VERSION, true);
      dv.setUint16(OFF_DESC_NUM, queueSize, true);
    }
    return area;
  }

  /** The area the front-end handed back (SET_INFLIGHT_FD), checked to hold every queue region. */
  static attach(host: HostOps, fd: number, mmapSize: number, mmapOffset: number, numQueues: number, queueSize: number): InflightArea {
    const need = inflightAreaSize(numQueues, queueSize);
    const bad = (why: string): never => {
      throw new VhostUserProtocolError('BadPayload', FrontendRequest.SET_INFLIGHT_FD, why);
    };
    if (mmapSize < need) bad(`inflight area of ${mmapSize} bytes is smaller than the ${need} bytes ${numQueues} queues of ${queueSize} need`);
    const fileSize = host.fileSize(fd);
    if (mmapOffset + mmapSize > fileSize) bad(`inflight area [${mmapOffset}, +${mmapSize}) ends past the end of its fd (${fileSize} bytes)`);
    const mapping = host.mmapShared(fd, mmapOffset + mmapSize, 0);
    return new InflightArea(host, fd, mapping, mmapOffset, numQueues, queueSize);
  }

  regionView(queue: number): DataView {
    if (queue < 0 || queue >= this.numQueues) throw new RangeError(`inflight queue ${queue} is not below ${this.numQueues}`);
    return new DataView(this.mapping, this.base + queue * inflightRegionSize(this.queueSize), inflightRegionSize(this.queueSize));
  }

  /** Version field of a queue region (0 = the front-end zeroed it: uninitialised). */
  version(queue: number): number {
    return this.regionView(queue).getUint16(OFF_VERSION, true);
  }

  /**
   * The split-ring tracking of queue `queue` for a ring of `ringSize` entries, or a reason it cannot be tracked
   * (the area has fewer queues, or smaller ones, than the ring).
   */
  splitRegion(queue: number, ringSize: number): SplitInflightRegion | string {
    if (queue >= this.numQueues) return `the inflight area covers ${this.numQueues} queues, not queue ${queue}`;
    if (ringSize > this.queueSize) return `ring ${queue} has ${ringSize} entries, the inflight area only ${this.queueSize}`;
    return new SplitInflightRegion(this.regionView(queue), this.queueSize);
  }

  /** The packed-ring tracking of queue `queue` for a ring of `ringSize` entries, or why it cannot be tracked. */
  packedRegion(queue: number, ringSize: number): PackedInflightRegion | string {
    if (queue >= this.numQueues) return `the inflight area covers ${this.numQueues} queues, not queue ${queue}`;
    if (ringSize > this.queueSize) return `ring ${queue} has ${ringSize} entries, the inflight area only ${this.queueSize}`;
    return new PackedInflightRegion(this.regionView(queue), this.queueSize);
  }

  /**
   * Forgets everything in flight on every queue (a device reset: the driver gave every buffer up). The two
   * layouts differ, so the caller says which one the rings use (packed: every ring restarts at slot 0, lap 1).
   */
  clearAll(layout: 'split' | 'packed'): void {
    for (let q = 0; q < this.numQueues; q++) {
      if (layout === 'packed') new PackedInflightRegion(this.regionView(q), this.queueSize).initialise(0, true);
      else new SplitInflightRegion(this.regionView(q), this.queueSize).clear();
    }
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    try {
      this.host.munmap(this.mapping);
    } finally {
      this.host.close(this.fd);
    }
  }
}

/** What a restarted split ring must do first: the heads to hand to the device again, oldest first. */
export interface SplitResubmission {
  /** Head descriptors still in flight, in the order they were popped (ascending counter). */
  heads: number[];
  /** The counter the next popped chain gets. */
  nextCounter: number;
  /** Heads marked in flight that a ring of this size cannot have (ignored). */
  invalid: number[];
  /** The used index the ring resumes from (the driver-visible used->idx). */
  usedIdx: number;
}

/**
 * One queue's region in the split layout (vhost-user.rst "Inflight I/O tracking"): a descriptor is marked when
 * popped (counter, then inflight = 1), and on completion last_batch_head is set before used->idx moves and the
 * descriptor is cleared and used_idx copied after, so a back-end killed between the two is caught on restart
 * (used_idx differs from used->idx: the last_batch_head descriptor was in fact completed).
 */
export class SplitInflightRegion {
  constructor(
    private readonly view: DataView,
    private readonly descNum: number,
  ) {}

  private descOffset(head: number): number {
    return SPLIT_DESC_BASE + SPLIT_DESC_STATE * head;
  }

  markPopped(head: number, counter: number): void {
    const at = this.descOffset(head);
    this.view.setUint32(at + DESC_OFF_COUNTER, counter % TWO_POW_32, true);
    this.view.setUint32(at + DESC_OFF_COUNTER + 4, Math.floor(counter / TWO_POW_32), true);
    this.view.setUint8(at + DESC_OFF_INFLIGHT, 1);
  }

  beforePush(head: number): void {
    this.view.setUint16(OFF_LAST_BATCH_HEAD, head, true);
  }

  afterPush(head: number, usedIdx: number): void {
    this.view.setUint8(this.descOffset(head) + DESC_OFF_INFLIGHT, 0);
    this.view.setUint16(OFF_USED_IDX, usedIdx, true);
  }

  clear(): void {
    for (let i = 0; i < this.descNum; i++) this.view.setUint8(this.descOffset(i) + DESC_OFF_INFLIGHT, 0);
    this.view.setUint16(OFF_LAST_BATCH_HEAD, 0, true);
  }

  /**
   * Reads the region for a ring (re)starting with `ringUsedIdx` in its used ring: initialises a region the
   * front-end left zeroed (version 0), settles a completion that was cut short, and lists what is in flight.
   */
  recover(ringSize: number, ringUsedIdx: number): SplitResubmission {
    const v = this.view;
    if (v.getUint16(OFF_VERSION, true) === 0) {
      v.setUint16(OFF_VERSION, INFLIGHT_VERSION, true);
      v.setUint16(OFF_DESC_NUM, this.descNum, true);
      this.clear();
      v.setUint16(OFF_USED_IDX, ringUsedIdx, true);
      return { heads: [], nextCounter: 0, invalid: [], usedIdx: ringUsedIdx };
    }
    if (v.getUint16(OFF_USED_IDX, true) !== ringUsedIdx) {
      // used->idx moved but the back-end died before clearing the descriptor: that one was completed.
      const last = v.getUint16(OFF_LAST_BATCH_HEAD, true);
      if (last < this.descNum) v.setUint8(this.descOffset(last) + DESC_OFF_INFLIGHT, 0);
      v.setUint16(OFF_USED_IDX, ringUsedIdx, true);
    }
    const found: { head: number; counter: number }[] = [];
    const invalid: number[] = [];
    for (let i = 0; i < this.descNum; i++) {
      const at = this.descOffset(i);
      if (v.getUint8(at + DESC_OFF_INFLIGHT) === 0) continue;
      if (i >= ringSize) {
        invalid.push(i);
        v.setUint8(at + DESC_OFF_INFLIGHT, 0);
        continue;
      }
      found.push({ head: i, counter: v.getUint32(at + DESC_OFF_COUNTER, true) + v.getUint32(at + DESC_OFF_COUNTER + 4, true) * TWO_POW_32 });
    }
    found.sort((a, b) => a.counter - b.counter);
    const last = found[found.length - 1];
    return { heads: found.map((f) => f.head), nextCounter: last === undefined ? 0 : last.counter + 1, invalid, usedIdx: ringUsedIdx };
  }
}

/**
 * Walks the chain that starts at descriptor `head` of a split ring, out of ring order (a resubmission): a
 * one-entry private available ring naming `head` in front of the real descriptor table, so the queue layer's own
 * walker checks the chain exactly as it checks any popped one.
 */
export function walkSplitHead(desc: Uint8Array, size: number, memory: GuestMemory, indirect: boolean, head: number): DescriptorChain | VirtqueueError {
  const avail = new Uint16Array(splitAvailSize(size) / 2);
  avail[1] = 1; // idx
  avail[2] = head; // ring[0]
  const used = new Uint8Array(splitUsedSize(size));
  const probe = new SplitQueue({
    size,
    rings: { desc, driver: new Uint8Array(avail.buffer), device: used },
    memory,
    eventIdx: false,
    indirect,
    state: { nextAvail: 0, nextUsed: 0 },
  });
  return probe.pop() ?? new VirtqueueError('DescriptorIndexOutOfRange', `resubmitted head ${head} gave no chain`);
}

/**
 * A split queue whose chains are tracked in the inflight area: marked when popped, cleared when used. A ring
 * restarted with chains still in flight hands those to the device first (oldest first), then goes on with the
 * ring. The wrapped queue can be replaced (new memory map, new kick fd) without losing the tracking.
 */
export class InflightSplitQueue implements DeviceQueue {
  readonly layout = 'split';
  private resubmit: number[];
  private counter: number;
  private usedIdx: number;
  private brokenBy: VirtqueueError | undefined;
  private resubmittedInFlight = 0;
  /** Chains handed to the device again after a restart (diagnostics, tests). */
  resubmitted = 0;

  constructor(
    private inner: DeviceQueue,
    private readonly region: SplitInflightRegion,
    recovered: SplitResubmission,
    private walkHead: (head: number) => DescriptorChain | VirtqueueError,
  ) {
    this.resubmit = [...recovered.heads];
    this.counter = recovered.nextCounter;
    this.usedIdx = recovered.usedIdx;
  }

  get size(): number {
    return this.inner.size;
  }

  /** Puts a rebuilt queue (same ring, new views) under the tracking. */
  rebind(inner: DeviceQueue, walkHead: (head: number) => DescriptorChain | VirtqueueError): void {
    this.inner = inner;
    this.walkHead = walkHead;
  }

  /** Heads still waiting to be resubmitted. */
  get pendingResubmissions(): number {
    return this.resubmit.length;
  }

  get broken(): VirtqueueError | undefined {
    return this.brokenBy ?? this.inner.broken;
  }

  get inFlight(): number {
    return this.inner.inFlight + this.resubmittedInFlight;
  }

  pop(): DescriptorChain | VirtqueueError | null {
    if (this.brokenBy !== undefined) return this.brokenBy;
    const head = this.resubmit.shift();
    if (head !== undefined) {
      const chain = this.walkHead(head);
      if (chain instanceof VirtqueueError) {
        this.brokenBy = chain;
        return chain;
      }
      this.resubmitted++;
      this.resubmittedInFlight++;
      return chain;
    }
    const chain = this.inner.pop();
    if (chain instanceof DescriptorChain) this.region.markPopped(chain.id, this.counter++);
    return chain;
  }

  pushUsed(chain: DescriptorChain, len: number): void {
    this.region.beforePush(chain.id);
    this.inner.pushUsed(chain, len);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.region.afterPush(chain.id, this.usedIdx);
  }

  needsNotification(): boolean {
    return this.inner.needsNotification();
  }

  disableNotifications(): void {
    this.inner.disableNotifications();
  }

  enableNotifications(): boolean {
    return this.inner.enableNotifications() || this.resubmit.length > 0;
  }

  hasAvailable(): boolean {
    return this.brokenBy !== undefined || this.resubmit.length > 0 || this.inner.hasAvailable();
  }

  getState(): QueueState {
    return this.inner.getState();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Packed rings. The region (QueueRegionPacked) keeps a copy of every descriptor the back-end took from the ring,
// in entries linked into a free list; a chain in flight is a run of entries off the free list whose head says how
// many (num), where the run ends (last) and when it was taken (counter). Every update is first made to the working
// fields (free_head, used_idx, used_wrap_counter) and then committed to the old_* copies, so a restart can tell a
// half-done pop or push from a finished one.

/** Header offsets of QueueRegionPacked (version and desc_num as in the split layout). */
const PK_FREE_HEAD = 12;
const PK_OLD_FREE_HEAD = 14;
const PK_USED_IDX = 16;
const PK_OLD_USED_IDX = 18;
const PK_USED_WRAP = 20;
const PK_OLD_USED_WRAP = 21;
/** DescStatePacked i at REGION_HEADER + DESC_STATE * i. */
const PD_INFLIGHT = 0;
const PD_NEXT = 2;
const PD_LAST = 4;
const PD_NUM = 6;
const PD_COUNTER = 8;
const PD_ID = 16;
const PD_FLAGS = 18;
const PD_LEN = 20;
const PD_ADDR = 24;
/** A ring descriptor's words (u16) and its flags word (packed layout). */
const RING_DESC_WORDS = 8;
const RING_DESC_FLAGS_WORD = 7;
const RING_DESC_ID_WORD = 6;

/** One chain the area says was in flight. */
export interface PackedInflightChain {
  /** Entry index of the chain's head in the area. */
  entry: number;
  /** Ring slots (descriptors in the ring) the chain took. */
  num: number;
  counter: number;
}

/** What a restarted packed ring must do first. */
export interface PackedResubmission {
  /** Chains still in flight, oldest first. */
  chains: PackedInflightChain[];
  nextCounter: number;
  /** Entries marked in flight that do not form a valid chain for this ring (ignored and freed). */
  invalid: number;
  /** The device's used position the ring resumes from, and where the driver's next available one is. */
  state: { nextAvail: number; availWrap: boolean; nextUsed: number; usedWrap: boolean };
  /** The region held no tracking (fresh or unreadable): the ring resumes from the front-end's base. */
  fresh: boolean;
}

export class PackedInflightRegion {
  constructor(
    private readonly view: DataView,
    private readonly descNum: number,
  ) {}

  private at(entry: number): number {
    return REGION_HEADER + DESC_STATE * entry;
  }

  private u16(off: number): number {
    return this.view.getUint16(off, true);
  }

  private set16(off: number, v: number): void {
    this.view.setUint16(off, v, true);
  }

  /** An empty region: every entry free (linked in index order), the used side at `usedIdx` in lap `usedWrap`. */
  initialise(usedIdx: number, usedWrap: boolean): void {
    const v = this.view;
    v.setUint16(OFF_VERSION, INFLIGHT_VERSION, true);
    v.setUint16(OFF_DESC_NUM, this.descNum, true);
    for (let i = 0; i < this.descNum; i++) {
      v.setUint8(this.at(i) + PD_INFLIGHT, 0);
      this.set16(this.at(i) + PD_NEXT, i + 1);
    }
    this.set16(PK_FREE_HEAD, 0);
    this.set16(PK_OLD_FREE_HEAD, 0);
    this.set16(PK_USED_IDX, usedIdx);
    this.set16(PK_OLD_USED_IDX, usedIdx);
    v.setUint8(PK_USED_WRAP, usedWrap ? 1 : 0);
    v.setUint8(PK_OLD_USED_WRAP, usedWrap ? 1 : 0);
  }

  /**
   * Records a popped chain: its `slots` ring descriptors starting at ring position `pos` of `ring` (the raw
   * descriptor ring), each copied into a free entry. Returns the head entry. The pop is committed only by the
   * last store (old_free_head), so a back-end killed before it leaves the entries on the free list.
   */
  markPopped(ring: Uint16Array, ringSize: number, pos: number, slots: number, counter: number): number | undefined {
    const v = this.view;
    const head = this.u16(PK_OLD_FREE_HEAD);
    // Enough free entries? Only a driver that made more descriptors available than the ring holds (or a front-end
    // writing into the area) can exhaust them; nothing is written then.
    for (let e = this.u16(PK_FREE_HEAD), k = 0; k < slots; k++, e = this.u16(this.at(e) + PD_NEXT)) {
      if (e >= this.descNum) return undefined;
    }
    if (head >= this.descNum) return undefined;
    const h = this.at(head);
    this.set16(h + PD_NUM, 0);
    v.setUint32(h + PD_COUNTER, counter % TWO_POW_32, true);
    v.setUint32(h + PD_COUNTER + 4, Math.floor(counter / TWO_POW_32), true);
    v.setUint8(h + PD_INFLIGHT, 1);
    let free = this.u16(PK_FREE_HEAD);
    const ring32 = new Uint32Array(ring.buffer, ring.byteOffset, ring.length >> 1);
    for (let k = 0; k < slots; k++) {
      const w = ((pos + k) % ringSize) * RING_DESC_WORDS;
      if (k === slots - 1) this.set16(h + PD_LAST, free);
      this.set16(h + PD_NUM, k + 1);
      const e = this.at(free);
      v.setUint32(e + PD_ADDR, ring32[w / 2]!, true);
      v.setUint32(e + PD_ADDR + 4, ring32[w / 2 + 1]!, true);
      v.setUint32(e + PD_LEN, ring32[w / 2 + 2]!, true);
      this.set16(e + PD_ID, ring[w + RING_DESC_ID_WORD]!);
      this.set16(e + PD_FLAGS, ring[w + RING_DESC_FLAGS_WORD]!);
      free = this.u16(e + PD_NEXT);
      this.set16(PK_FREE_HEAD, free);
    }
    this.set16(PK_OLD_FREE_HEAD, free);
    return head;
  }

  /** First half of a push (before the used descriptor is written): the chain's entries go back to the free list. */
  beforePush(entry: number, slots: number, ringSize: number): boolean {
    const last = this.u16(this.at(entry) + PD_LAST);
    // `last` was written by markPopped; out of range only if the front-end rewrote the area under us.
    if (last >= this.descNum) return false;
    this.set16(this.at(last) + PD_NEXT, this.u16(PK_FREE_HEAD));
    this.set16(PK_FREE_HEAD, entry);
    let used = this.u16(PK_USED_IDX) + slots;
    let wrap = this.view.getUint8(PK_USED_WRAP) !== 0;
    if (used >= ringSize) {
      used -= ringSize;
      wrap = !wrap;
    }
    this.set16(PK_USED_IDX, used);
    this.view.setUint8(PK_USED_WRAP, wrap ? 1 : 0);
    return true;
  }

  /** Second half (after the used descriptor's flags are written): clear the head, commit. */
  afterPush(entry: number): void {
    this.view.setUint8(this.at(entry) + PD_INFLIGHT, 0);
    this.set16(PK_OLD_FREE_HEAD, this.u16(PK_FREE_HEAD));
    this.set16(PK_OLD_USED_IDX, this.u16(PK_USED_IDX));
    this.view.setUint8(PK_OLD_USED_WRAP, this.view.getUint8(PK_USED_WRAP));
  }

  /**
   * The descriptor copies of a recorded chain of `num` entries, as a ring of `ringSize` with the chain at slot 0,
   * lap 1; undefined if the links no longer stay inside the area (rewritten since recover() checked them).
   */
  chainRing(entry: number, num: number, ringSize: number): Uint8Array | undefined {
    if (num > ringSize) return undefined;
    const out = new Uint8Array(descTableSize(ringSize));
    const dv = new DataView(out.buffer);
    const v = this.view;
    let e = entry;
    for (let k = 0; k < num; k++) {
      if (e >= this.descNum) return undefined;
      const a = this.at(e);
      const d = k * 16;
      dv.setUint32(d, v.getUint32(a + PD_ADDR, true), true);
      dv.setUint32(d + 4, v.getUint32(a + PD_ADDR + 4, true), true);
      dv.setUint32(d + 8, v.getUint32(a + PD_LEN, true), true);
      dv.setUint16(d + 12, this.u16(a + PD_ID), true);
      const flags = (this.u16(a + PD_FLAGS) & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | VIRTQ_DESC_F_AVAIL;
      dv.setUint16(d + 14, flags, true);
      e = this.u16(a + PD_NEXT);
    }
    return out;
  }

  /**
   * Reads the region for a ring (re)starting; `ring` is the live descriptor ring and `base` the front-end's
   * SET_VRING_BASE position. Settles a push cut short (committed if the used descriptor reached the ring, rolled
   * back if not), rolls back a pop cut short, frees what is not a valid chain, and lists the chains in flight.
   */
  recover(ring: Uint16Array, ringSize: number, base: { index: number; wrap: boolean }): PackedResubmission {
    const v = this.view;
    const n = this.descNum;
    const freshFrom = (invalid: number): PackedResubmission => {
      this.initialise(base.index, base.wrap);
      return { chains: [], nextCounter: 0, invalid, state: { nextAvail: base.index, availWrap: base.wrap, nextUsed: base.index, usedWrap: base.wrap }, fresh: true };
    };
    const markedInFlight = (): number => {
      let c = 0;
      for (let i = 0; i < n; i++) if (v.getUint8(this.at(i) + PD_INFLIGHT) !== 0) c++;
      return c;
    };
    if (v.getUint16(OFF_VERSION, true) === 0) return freshFrom(0);
    const oldUsed = this.u16(PK_OLD_USED_IDX);
    if (oldUsed >= ringSize || this.u16(PK_USED_IDX) >= ringSize) return freshFrom(markedInFlight());
    const oldWrap = v.getUint8(PK_OLD_USED_WRAP) !== 0;
    if (this.u16(PK_USED_IDX) !== oldUsed || (v.getUint8(PK_USED_WRAP) !== 0) !== oldWrap) {
      // A push was cut short: did its used descriptor reach the ring? Still "available in lap oldWrap" = no.
      const flags = Atomics.load(ring, oldUsed * RING_DESC_WORDS + RING_DESC_FLAGS_WORD) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
      const stillAvailable = oldWrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
      if (flags !== stillAvailable) {
        this.set16(PK_OLD_FREE_HEAD, this.u16(PK_FREE_HEAD));
        this.set16(PK_OLD_USED_IDX, this.u16(PK_USED_IDX));
        v.setUint8(PK_OLD_USED_WRAP, v.getUint8(PK_USED_WRAP));
      }
    }
    this.set16(PK_FREE_HEAD, this.u16(PK_OLD_FREE_HEAD));
    this.set16(PK_USED_IDX, this.u16(PK_OLD_USED_IDX));
    v.setUint8(PK_USED_WRAP, v.getUint8(PK_OLD_USED_WRAP));
    const usedIdx = this.u16(PK_USED_IDX);
    const usedWrap = v.getUint8(PK_USED_WRAP) !== 0;

    // The free list: every entry on it is not in flight. A cycle or an index out of range: the region is unusable.
    const owner = new Int32Array(n).fill(-1); // -2: free; else the head entry of the chain that holds it
    let walked = 0;
    for (let e = this.u16(PK_FREE_HEAD); e < n; e = this.u16(this.at(e) + PD_NEXT)) {
      if (owner[e] === -2 || ++walked > n) return freshFrom(markedInFlight());
      owner[e] = -2;
      v.setUint8(this.at(e) + PD_INFLIGHT, 0);
    }
    // Heads in flight: each must be a run of `num` entries off the free list, ending at `last`, of descriptors
    // a ring of this size can hold (ids below the ring size, NEXT on all but the last).
    const heads: PackedInflightChain[] = [];
    let invalid = 0;
    for (let i = 0; i < n; i++) {
      const a = this.at(i);
      if (owner[i] === -2 || v.getUint8(a + PD_INFLIGHT) === 0) continue;
      const num = this.u16(a + PD_NUM);
      let ok = num >= 1 && num <= ringSize;
      const members: number[] = [];
      let e = i;
      for (let k = 0; ok && k < num; k++) {
        if (e >= n || owner[e] !== -1) {
          ok = false;
          break;
        }
        members.push(e);
        const hasNext = (this.u16(this.at(e) + PD_FLAGS) & 1) !== 0; // VIRTQ_DESC_F_NEXT
        if (hasNext !== (k < num - 1)) ok = false;
        if (k === num - 1 && (e !== this.u16(a + PD_LAST) || this.u16(this.at(e) + PD_ID) >= ringSize)) ok = false;
        e = this.u16(this.at(e) + PD_NEXT);
      }
      if (!ok) {
        invalid++;
        v.setUint8(a + PD_INFLIGHT, 0);
        continue;
      }
      for (const m of members) owner[m] = i;
      heads.push({ entry: i, num, counter: v.getUint32(a + PD_COUNTER, true) + v.getUint32(a + PD_COUNTER + 4, true) * TWO_POW_32 });
    }
    heads.sort((x, y) => x.counter - y.counter);
    // More ring slots in flight than the ring has: the newest ones cannot be real.
    let slots = 0;
    const chains: PackedInflightChain[] = [];
    for (const h of heads) {
      if (slots + h.num > ringSize) {
        invalid++;
        v.setUint8(this.at(h.entry) + PD_INFLIGHT, 0);
        for (let e = h.entry, k = 0; k < h.num; k++, e = this.u16(this.at(e) + PD_NEXT)) owner[e] = -1;
        continue;
      }
      slots += h.num;
      chains.push(h);
    }
    // Entries neither free nor part of a kept chain go back on the free list (inflight cleared first).
    for (let i = 0; i < n; i++) {
      if (owner[i] !== -1) continue;
      v.setUint8(this.at(i) + PD_INFLIGHT, 0);
      this.set16(this.at(i) + PD_NEXT, this.u16(PK_FREE_HEAD));
      this.set16(PK_FREE_HEAD, i);
      this.set16(PK_OLD_FREE_HEAD, i);
    }
    let nextAvail = usedIdx + slots;
    let availWrap = usedWrap;
    if (nextAvail >= ringSize) {
      nextAvail -= ringSize;
      availWrap = !availWrap;
    }
    const last = chains.reduce((m, c) => Math.max(m, c.counter), -1);
    return { chains, nextCounter: last + 1, invalid, state: { nextAvail, availWrap, nextUsed: usedIdx, usedWrap }, fresh: false };
  }
}

/** Walks a chain recorded in the area (a resubmission) with the queue layer's own packed walker and checks. */
export function walkPackedEntry(region: PackedInflightRegion, chain: PackedInflightChain, size: number, memory: GuestMemory, indirect: boolean): DescriptorChain | VirtqueueError {
  const desc = region.chainRing(chain.entry, chain.num, size);
  if (desc === undefined) return new VirtqueueError('DescriptorIndexOutOfRange', `inflight entry ${chain.entry}: its ${chain.num} linked entries leave the area`);
  const probe = new PackedQueue({
    size,
    rings: { desc, driver: new Uint8Array(PACKED_EVENT_SIZE), device: new Uint8Array(PACKED_EVENT_SIZE) },
    memory,
    eventIdx: false,
    indirect,
    state: { nextAvail: 0, availWrap: true, nextUsed: 0, usedWrap: true },
  });
  return probe.pop() ?? new VirtqueueError('DescriptorIndexOutOfRange', `resubmitted inflight entry ${chain.entry} gave no chain`);
}

/**
 * A packed queue whose chains are tracked in the inflight area: each popped chain's descriptors copied into the
 * area, released when the chain is used. A ring restarted with chains in flight hands those to the device first,
 * oldest first. The wrapped queue can be replaced (new memory map, new kick fd) without losing the tracking.
 */
export class InflightPackedQueue implements DeviceQueue {
  readonly layout = 'packed';
  private resubmit: PackedInflightChain[];
  private counter: number;
  private brokenBy: VirtqueueError | undefined;
  private resubmittedInFlight = 0;
  /** The area entry of each chain the device holds. */
  private readonly entries = new WeakMap<DescriptorChain, number>();
  /** Chains handed to the device again after a restart (diagnostics, tests). */
  resubmitted = 0;

  constructor(
    private inner: DeviceQueue,
    private ring: Uint16Array,
    private readonly region: PackedInflightRegion,
    recovered: PackedResubmission,
    private memory: GuestMemory,
    private readonly indirect: boolean,
  ) {
    this.resubmit = [...recovered.chains];
    this.counter = recovered.nextCounter;
  }

  get size(): number {
    return this.inner.size;
  }

  rebind(inner: DeviceQueue, ring: Uint16Array, memory: GuestMemory): void {
    this.inner = inner;
    this.ring = ring;
    this.memory = memory;
  }

  get pendingResubmissions(): number {
    return this.resubmit.length;
  }

  get broken(): VirtqueueError | undefined {
    return this.brokenBy ?? this.inner.broken;
  }

  get inFlight(): number {
    return this.inner.inFlight + this.resubmittedInFlight;
  }

  pop(): DescriptorChain | VirtqueueError | null {
    if (this.brokenBy !== undefined) return this.brokenBy;
    const next = this.resubmit.shift();
    if (next !== undefined) {
      const chain = walkPackedEntry(this.region, next, this.size, this.memory, this.indirect);
      if (chain instanceof VirtqueueError) {
        this.brokenBy = chain;
        return chain;
      }
      this.entries.set(chain, next.entry);
      this.resubmitted++;
      this.resubmittedInFlight++;
      return chain;
    }
    const pos = this.inner.getState().nextAvail;
    const chain = this.inner.pop();
    if (chain instanceof DescriptorChain) {
      const entry = this.region.markPopped(this.ring, this.size, pos, chain.ringSlots, this.counter++);
      if (entry === undefined) {
        this.brokenBy = new VirtqueueError('AvailIndexJump', `chain at ring position ${pos}: more descriptors in flight than the ring holds (the inflight area has no free entry)`);
        return this.brokenBy;
      }
      this.entries.set(chain, entry);
    }
    return chain;
  }

  pushUsed(chain: DescriptorChain, len: number): void {
    const entry = this.entries.get(chain);
    if (entry === undefined || len > chain.writableBytes || len < 0 || !Number.isInteger(len)) {
      // Not a chain of this queue, or a length the queue refuses (it throws): the area is not touched.
      this.inner.pushUsed(chain, len);
      return;
    }
    const tracked = this.region.beforePush(entry, chain.ringSlots, this.size);
    this.inner.pushUsed(chain, len);
    if (tracked) this.region.afterPush(entry);
    this.entries.delete(chain);
  }

  needsNotification(): boolean {
    return this.inner.needsNotification();
  }

  disableNotifications(): void {
    this.inner.disableNotifications();
  }

  enableNotifications(): boolean {
    return this.inner.enableNotifications() || this.resubmit.length > 0;
  }

  hasAvailable(): boolean {
    return this.brokenBy !== undefined || this.resubmit.length > 0 || this.inner.hasAvailable();
  }

  getState(): QueueState {
    return this.inner.getState();
  }
}
