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
import { DescriptorChain, SplitQueue, VirtqueueError, splitAvailSize, splitUsedSize } from '../../virtqueue/index.ts';
import type { DeviceQueue, QueueState } from '../../virtqueue/queue.ts';
import type { HostOps } from './host.ts';
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

  /** Forgets everything in flight on every queue (a device reset: the driver gave every buffer up). */
  clearAll(): void {
    for (let q = 0; q < this.numQueues; q++) new SplitInflightRegion(this.regionView(q), this.queueSize).clear();
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
