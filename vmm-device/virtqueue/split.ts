// The device side of a split virtqueue (virtio 1.2 section 2.7).
//
// Memory ordering. The driver and the device share the rings without locks; x86 keeps stores in order and loads in
// order, so what remains is to stop the JIT from reordering accesses. Every access to an index or a flag word that
// the other side uses for synchronisation is an Atomics operation (sequentially consistent), and the comments at
// each one say which ordering the virtio spec asks for there. Ring entries and descriptors are read with plain
// loads after the acquire load of avail.idx that published them; used elements are written with plain stores
// before the release store of used.idx that publishes them. One exception: the avail_event that every pop() writes
// (EVENT_IDX) is a plain store, and the full barrier it needs is paid once, when the ring looks empty
// (recheckAfterAvailEvent), instead of once per chain.

import type { GuestMemory } from '../memory/guest-memory.ts';
import { ChainPool, trimSegments, type ChainFill, type DescriptorChain } from './chain.ts';
import {
  MAX_SPLIT_QUEUE_SIZE,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
  vringNeedEvent,
} from '../abi/virtqueue.ts';
import { VirtqueueError } from './errors.ts';
import type { DeviceQueue, QueueOptions, QueueState } from './queue.ts';
import { ChainBuilder, IndirectTables, MAX_INDIRECT_TABLE_ENTRIES, descTableOf, type DescTable } from './walker.ts';

// Word offsets inside the rings (u16 words unless noted).
const AVAIL_FLAGS = 0;
const AVAIL_IDX = 1;
const AVAIL_RING = 2; // ring[i] at 2 + i; used_event at 2 + size
const USED_FLAGS = 0;
const USED_IDX = 1;
// used ring element i: u32 words 1 + 2i (id) and 2 + 2i (len); avail_event: u16 word 2 + 4 * size

/** Why a queue configuration cannot be used, or undefined when it can. */
export function checkSplitOptions(opts: QueueOptions): string | undefined {
  const { size, rings } = opts;
  if (!Number.isInteger(size) || size < 1 || size > MAX_SPLIT_QUEUE_SIZE || (size & (size - 1)) !== 0) {
    return `queue size ${size} is not a power of two in 1..${MAX_SPLIT_QUEUE_SIZE}`;
  }
  if (rings.desc.byteLength < descTableSize(size)) return `descriptor table smaller than ${descTableSize(size)} bytes`;
  if (rings.driver.byteLength < splitAvailSize(size)) return `available ring smaller than ${splitAvailSize(size)} bytes`;
  if (rings.device.byteLength < splitUsedSize(size)) return `used ring smaller than ${splitUsedSize(size)} bytes`;
  // The ring addresses' alignment is the transport's check (it knows the guest addresses); these are the
  // alignments our typed views need, which the region alignment rule guarantees for well-aligned rings.
  if (rings.desc.byteOffset % 4 !== 0 || rings.driver.byteOffset % 2 !== 0 || rings.device.byteOffset % 4 !== 0) {
    return 'ring areas are misaligned (descriptor table 16, available ring 2, used ring 4 bytes)';
  }
  return undefined;
}

export class SplitQueue implements DeviceQueue {
  readonly layout = 'split';
  readonly size: number;
  private readonly mask: number;
  private readonly memory: GuestMemory;
  private readonly eventIdx: boolean;
  private readonly indirect: boolean;
  private readonly desc: DescTable;
  private readonly descU32: Uint32Array;
  private readonly descU16: Uint16Array;
  private readonly avail: Uint16Array;
  private readonly usedU16: Uint16Array;
  private readonly usedU32: Uint32Array;
  private readonly usedEventWord: number;
  private readonly availEventWord: number;

  /** Next available ring index to read (mod 2^16). */
  private nextAvail: number;
  /** Last avail.idx read from the driver; chains up to it can be popped without another acquire load. */
  private availIdxSeen: number;
  /** Next used ring index to write (mod 2^16). */
  private nextUsed: number;
  /** used idx at the last interrupt we decided to send (EVENT_IDX), and whether it is meaningful yet. */
  private signalledUsed = 0;
  private signalledValid = false;
  /** Used elements pushed since the last needsNotification(). */
  private pushedSinceSignal = 0;
  private notificationsEnabled = true;
  /** pop() wrote avail_event with a plain store and no full barrier has followed yet. */
  private availEventUnfenced = false;
  private inFlightCount = 0;
  private brokenBy: VirtqueueError | undefined;
  private readonly builder = new ChainBuilder();
  private readonly pool: ChainPool;
  private readonly indirectTables: IndirectTables;
  /** Guest-physical bounds of the region the last fast-path buffer was in: most buffers of a queue share one. */
  private hitBase = 0;
  private hitEnd = 0;

  /** Throws RangeError for a configuration checkSplitOptions rejects (a transport checks first). */
  constructor(opts: QueueOptions) {
    const why = checkSplitOptions(opts);
    if (why !== undefined) throw new RangeError(why);
    const { size, rings } = opts;
    this.size = size;
    this.mask = size - 1;
    this.memory = opts.memory;
    this.eventIdx = opts.eventIdx;
    this.indirect = opts.indirect;
    this.desc = descTableOf(rings.desc, size);
    this.descU32 = this.desc.u32;
    this.descU16 = this.desc.u16;
    this.pool = new ChainPool(opts.memory, size);
    this.indirectTables = new IndirectTables(opts.memory);
    this.avail = new Uint16Array(rings.driver.buffer, rings.driver.byteOffset, (splitAvailSize(size)) / 2);
    this.usedU16 = new Uint16Array(rings.device.buffer, rings.device.byteOffset, splitUsedSize(size) / 2);
    this.usedU32 = new Uint32Array(rings.device.buffer, rings.device.byteOffset, (4 + 8 * size) / 4);
    this.usedEventWord = AVAIL_RING + size;
    this.availEventWord = 2 + 4 * size;
    this.nextAvail = (opts.state?.nextAvail ?? 0) & 0xffff;
    this.availIdxSeen = this.nextAvail;
    // A resumed queue continues from the used index the driver already sees (vhost-user passes only the
    // available index in SET_VRING_BASE).
    // Acquire: nothing below depends on it, but it is the driver-visible index we continue from.
    this.nextUsed = (opts.state?.nextUsed ?? Atomics.load(this.usedU16, USED_IDX)) & 0xffff;
  }

  get broken(): VirtqueueError | undefined {
    return this.brokenBy;
  }

  get inFlight(): number {
    return this.inFlightCount;
  }

  getState(): QueueState {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }

  private fail(e: VirtqueueError): VirtqueueError {
    this.brokenBy = e;
    return e;
  }

  /** Reads avail.idx (acquire: ring entries and descriptors are read only after it) and checks its distance. */
  private refreshAvailIdx(): VirtqueueError | undefined {
    const idx = Atomics.load(this.avail, AVAIL_IDX);
    const pending = (idx - this.nextAvail) & 0xffff;
    if (pending > this.size) {
      return this.fail(
        new VirtqueueError('AvailIndexJump', `avail.idx ${idx} is ${pending} ahead of the device's ${this.nextAvail}, queue size ${this.size}`),
      );
    }
    this.availIdxSeen = idx;
    return undefined;
  }

  hasAvailable(): boolean {
    if (this.brokenBy !== undefined) return true;
    if (this.availIdxSeen !== this.nextAvail) return true;
    if (this.refreshAvailIdx() !== undefined) return true;
    if (this.availIdxSeen !== this.nextAvail) return true;
    return this.recheckAfterAvailEvent();
  }

  /**
   * The ring looked empty. If pop() wrote avail_event since the last full barrier, that plain store may still sit
   * behind our load of avail.idx (x86 lets a load pass an earlier store): the driver could have added a buffer,
   * read the old avail_event and not kicked, while we read the old avail.idx. Before the device concludes the
   * ring is empty (and waits for a kick) the store is repeated as a seq-cst store, a full barrier, and avail.idx
   * read again. True when buffers (or an error) turned up. Costs one barrier per drain, not one per chain.
   */
  private recheckAfterAvailEvent(): boolean {
    if (!this.availEventUnfenced) return false;
    this.availEventUnfenced = false;
    Atomics.store(this.usedU16, this.availEventWord, this.nextAvail);
    if (this.refreshAvailIdx() !== undefined) return true;
    return this.availIdxSeen !== this.nextAvail;
  }

  pop(): DescriptorChain | VirtqueueError | null {
    if (this.brokenBy !== undefined) return this.brokenBy;
    if (this.availIdxSeen === this.nextAvail) {
      const err = this.refreshAvailIdx();
      if (err !== undefined) return err;
      if (this.availIdxSeen === this.nextAvail && !this.recheckAfterAvailEvent()) return null;
      if (this.brokenBy !== undefined) return this.brokenBy;
    }
    // Plain load: ordered after the acquire load of avail.idx above (or an earlier one that covered this entry).
    const head = this.avail[AVAIL_RING + (this.nextAvail & this.mask)]!;
    const target = this.pool.spare();
    const err = this.walk(head, target);
    if (err !== undefined) return this.fail(err);
    const chain = this.pool.take();
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    if (this.eventIdx && this.notificationsEnabled) {
      // Ask to be kicked again only once the driver makes the entry after this one available. A plain store: the
      // full barrier it needs before we may conclude the ring is empty comes in recheckAfterAvailEvent().
      this.usedU16[this.availEventWord] = this.nextAvail;
      this.availEventUnfenced = true;
    }
    this.inFlightCount++;
    return chain;
  }

  /**
   * Walks the chain at `head` into `c`. The common case (no indirection, each buffer inside the region the previous
   * one was in, addresses below 2^32, no zero length) in straight-line code; anything else (including every error)
   * is left to walkGeneral, which starts over and reports precisely.
   */
  private walk(head: number, c: ChainFill): VirtqueueError | undefined {
    const size = this.size;
    if (head >= size) return this.walkGeneral(head, c);
    const u32 = this.descU32;
    const u16 = this.descU16;
    const segs = c.segments;
    let base = this.hitBase;
    let end = this.hitEnd;
    let n = 0;
    let readableCount = 0;
    let readableBytes = 0;
    let writableBytes = 0;
    let i = head;
    for (let count = 1; ; count++) {
      const w = i << 2;
      const flags = u16[(w << 1) + 6]!;
      const addr = u32[w]!;
      const len = u32[w + 2]!;
      if (count > size || (flags & VIRTQ_DESC_F_INDIRECT) !== 0 || u32[w + 1] !== 0 || len === 0) {
        return this.walkGeneral(head, c);
      }
      if (addr < base || addr + len > end) {
        const region = this.memory.findRegion(addr);
        if (region === undefined || addr + len > region.end) return this.walkGeneral(head, c);
        base = this.hitBase = region.guestPhysAddr;
        end = this.hitEnd = region.end;
      }
      segs[n] = addr;
      segs[n + 1] = len;
      n += 2;
      if ((flags & VIRTQ_DESC_F_WRITE) !== 0) {
        writableBytes += len;
      } else {
        if (writableBytes > 0) return this.walkGeneral(head, c);
        readableCount++;
        readableBytes += len;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      i = u16[(w << 1) + 7]!;
      if (i >= size) return this.walkGeneral(head, c);
    }
    if (readableBytes > 0xffff_ffff || writableBytes > 0xffff_ffff) return this.walkGeneral(head, c);
    trimSegments(segs, n);
    c.id = head;
    c.ringSlots = 1;
    c.readableCount = readableCount;
    c.readableBytes = readableBytes;
    c.writableBytes = writableBytes;
    return undefined;
  }

  /** Walks any chain into `c`, indirect tables included, and names the first thing wrong with it. */
  private walkGeneral(head: number, c: ChainFill): VirtqueueError | undefined {
    if (head >= this.size) {
      return new VirtqueueError('DescriptorIndexOutOfRange', `head descriptor ${head} >= queue size ${this.size}`);
    }
    const b = this.builder;
    b.begin(c);
    let table = this.desc;
    let i = head;
    let count = 0;
    let limit = this.size;
    let inIndirect = false;
    for (;;) {
      if (++count > limit) {
        return new VirtqueueError('ChainTooLong', `chain from head ${head} has more than ${limit} descriptors (a loop?)`);
      }
      const flags = table.u16[2 * table.base + i * 8 + 6]!;
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) return new VirtqueueError('IndirectNotNegotiated', `descriptor ${i} is indirect but VIRTIO_F_INDIRECT_DESC was not negotiated`);
        if (inIndirect) return new VirtqueueError('NestedIndirect', `descriptor ${i} of an indirect table is itself indirect`);
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0) return new VirtqueueError('IndirectWithNext', `descriptor ${i} has both INDIRECT and NEXT`);
        const opened = this.indirectTables.open(table, i, Math.min(this.size, MAX_INDIRECT_TABLE_ENTRIES));
        if (opened instanceof VirtqueueError) return opened;
        table = opened;
        inIndirect = true;
        i = 0;
        count = 0;
        limit = opened.entries;
        continue;
      }
      const err = b.add(this.memory, table, i, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if (err !== undefined) return err;
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      const next = table.u16[2 * table.base + i * 8 + 7]!;
      if (next >= table.entries) {
        return new VirtqueueError(
          'DescriptorIndexOutOfRange',
          `descriptor ${i} chains to ${next}, beyond ${inIndirect ? 'the indirect table' : 'the queue'} (${table.entries} entries)`,
        );
      }
      i = next;
    }
    b.finish(head, 1);
    return undefined;
  }

  pushUsed(chain: DescriptorChain, len: number): void {
    if (len > chain.writableBytes || len < 0 || !Number.isInteger(len)) {
      throw new RangeError(`used length ${len} is not within the chain's ${chain.writableBytes} writable bytes`);
    }
    const slot = this.nextUsed & this.mask;
    // Plain stores of the element: published by the release store of used.idx below.
    this.usedU32[1 + 2 * slot] = chain.id;
    this.usedU32[2 + 2 * slot] = len;
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    // Release: the driver must see the element before it sees the index move.
    Atomics.store(this.usedU16, USED_IDX, this.nextUsed);
    this.pushedSinceSignal++;
    this.inFlightCount--;
    // The chain is the queue's again (chain.ts: a device does not touch a chain it pushed).
    this.pool.give(chain);
  }

  needsNotification(): boolean {
    const pushed = this.pushedSinceSignal;
    if (pushed === 0) return false;
    this.pushedSinceSignal = 0;
    if (this.eventIdx) {
      // used_event is read after our release store of used.idx; Atomics are sequentially consistent, which is the
      // full barrier virtio asks for between publishing used.idx and reading used_event.
      const usedEvent = Atomics.load(this.avail, this.usedEventWord);
      const old = this.signalledUsed;
      // After 2^15 or more used elements without a decision, the 16-bit window of vring_need_event no longer
      // tells old from new: interrupt unconditionally (libvhost-user does the same).
      const valid = this.signalledValid && pushed < 0x8000;
      this.signalledUsed = this.nextUsed;
      this.signalledValid = true;
      return !valid || vringNeedEvent(usedEvent, this.nextUsed, old);
    }
    // Same barrier as above between used.idx and the driver's flags.
    return (Atomics.load(this.avail, AVAIL_FLAGS) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  disableNotifications(): void {
    this.notificationsEnabled = false;
    // No kick is awaited until enableNotifications(), which stores avail_event seq-cst and re-reads avail.idx.
    this.availEventUnfenced = false;
    // With EVENT_IDX there is nothing to write: the driver kicks at most once more, when it passes avail_event.
    if (!this.eventIdx) {
      Atomics.store(this.usedU16, USED_FLAGS, Atomics.load(this.usedU16, USED_FLAGS) | VIRTQ_USED_F_NO_NOTIFY);
    }
  }

  enableNotifications(): boolean {
    this.notificationsEnabled = true;
    if (this.eventIdx) {
      Atomics.store(this.usedU16, this.availEventWord, this.nextAvail);
      this.availEventUnfenced = false;
    } else {
      Atomics.store(this.usedU16, USED_FLAGS, Atomics.load(this.usedU16, USED_FLAGS) & ~VIRTQ_USED_F_NO_NOTIFY);
    }
    // Full barrier (the seq-cst store above) between publishing our wish and re-reading avail.idx: a buffer the
    // driver added before it could see the wish is caught here instead of waiting for a kick that never comes.
    return this.hasAvailable();
  }
}
