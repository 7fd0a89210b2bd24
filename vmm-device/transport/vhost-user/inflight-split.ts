// Inflight tracking of a split ring (vhost-user.rst "Inflight I/O tracking", QueueRegionSplit): a descriptor head is
// marked when popped and cleared when used; a restarted ring resubmits the heads still marked.

import type { GuestMemory } from '../../memory/guest-memory.ts';
import { DescriptorChain, SplitQueue, VirtqueueError, splitAvailSize, splitUsedSize } from '../../virtqueue/index.ts';
import type { DeviceQueue } from '../../virtqueue/queue.ts';
import { INFLIGHT_VERSION, OFF_DESC_NUM, OFF_VERSION, TWO_POW_32 } from './inflight-layout.ts';
import { InflightQueue } from './inflight-queue.ts';

const OFF_LAST_BATCH_HEAD = 12;
const OFF_USED_IDX = 14;
/** DescStateSplit i at SPLIT_DESC_BASE + SPLIT_DESC_STATE * i: inflight u8 @0, next u16 @6, counter u64 @8. */
const SPLIT_DESC_BASE = 16;
const SPLIT_DESC_STATE = 16;
const DESC_OFF_INFLIGHT = 0;
const DESC_OFF_COUNTER = 8;

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
export class InflightSplitQueue extends InflightQueue<number> {
  readonly layout = 'split';
  private usedIdx: number;

  constructor(
    inner: DeviceQueue,
    private readonly region: SplitInflightRegion,
    recovered: SplitResubmission,
    private walkHead: (head: number) => DescriptorChain | VirtqueueError,
  ) {
    super(inner, recovered.heads, recovered.nextCounter);
    this.usedIdx = recovered.usedIdx;
  }

  /** Puts a rebuilt queue (same ring, new views) under the tracking. */
  rebind(inner: DeviceQueue, walkHead: (head: number) => DescriptorChain | VirtqueueError): void {
    this.inner = inner;
    this.walkHead = walkHead;
  }

  protected walkResubmission(head: number): DescriptorChain | VirtqueueError {
    return this.walkHead(head);
  }

  protected popTracked(): DescriptorChain | VirtqueueError | null {
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
}
