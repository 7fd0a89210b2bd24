// The device side of a packed virtqueue (virtio 1.2 section 2.8).
//
// One ring of 16-byte descriptors {addr u64, len u32, id u16, flags u16} serves both directions. A descriptor is
// available when its AVAIL bit equals the device's avail wrap counter and its USED bit does not; the device
// marks a used descriptor by setting both bits to its used wrap counter. The flags word is the synchronisation
// point: it is read with an acquire load before the rest of the descriptor, and written with a release store after
// the id and len of a used descriptor (Atomics operations; see split.ts for why that is enough on x86).

import type { GuestMemory } from '../memory/guest-memory.ts';
import { ChainPool, trimSegments, type ChainFill, type DescriptorChain } from './chain.ts';
import {
  MAX_PACKED_QUEUE_SIZE,
  PACKED_EVENT_SIZE,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  descTableSize,
  vringNeedEvent,
} from '../abi/virtqueue.ts';
import { VirtqueueError } from './errors.ts';
import type { DeviceQueue, QueueOptions, QueueState } from './queue.ts';
import { ChainBuilder, IndirectTables, MAX_INDIRECT_TABLE_ENTRIES, descTableOf, type DescTable } from './walker.ts';

// u16 word offsets inside a descriptor (8 words each) and inside an event suppression area.
const DESC_ID = 6;
const DESC_FLAGS = 7;
const EVENT_OFF_WRAP = 0;
const EVENT_FLAGS = 1;

export function checkPackedOptions(opts: QueueOptions): string | undefined {
  const { size, rings } = opts;
  if (!Number.isInteger(size) || size < 1 || size > MAX_PACKED_QUEUE_SIZE) {
    return `queue size ${size} is not in 1..${MAX_PACKED_QUEUE_SIZE}`;
  }
  if (rings.desc.byteLength < descTableSize(size)) return `descriptor ring smaller than ${descTableSize(size)} bytes`;
  if (rings.driver.byteLength < PACKED_EVENT_SIZE) return 'driver event suppression area smaller than 4 bytes';
  if (rings.device.byteLength < PACKED_EVENT_SIZE) return 'device event suppression area smaller than 4 bytes';
  if (rings.desc.byteOffset % 4 !== 0 || rings.driver.byteOffset % 2 !== 0 || rings.device.byteOffset % 2 !== 0) {
    return 'ring areas are misaligned (descriptor ring 16, event suppression areas 4 bytes)';
  }
  return undefined;
}

export class PackedQueue implements DeviceQueue {
  readonly layout = 'packed';
  readonly size: number;
  private readonly memory: GuestMemory;
  private readonly eventIdx: boolean;
  private readonly indirect: boolean;
  private readonly ring: DescTable;
  private readonly ringU32: Uint32Array;
  private readonly ringU16: Uint16Array;
  /** Driver event suppression: the driver's wishes about used-buffer notifications (interrupts). */
  private readonly driverEvent: Uint16Array;
  /** Device event suppression: our wishes about available-buffer notifications (kicks). */
  private readonly deviceEvent: Uint16Array;

  private nextAvail: number;
  private availWrap: boolean;
  private nextUsed: number;
  private usedWrap: boolean;
  /** Ring slots marked used since the last needsNotification(). */
  private usedSlotsSinceSignal = 0;
  private inFlightCount = 0;
  private brokenBy: VirtqueueError | undefined;
  private readonly builder = new ChainBuilder();
  private readonly pool: ChainPool;
  private readonly indirectTables: IndirectTables;
  /** Guest-physical bounds of the region the last fast-path buffer was in: most buffers of a queue share one. */
  private hitBase = 0;
  private hitEnd = 0;

  constructor(opts: QueueOptions) {
    const why = checkPackedOptions(opts);
    if (why !== undefined) throw new RangeError(why);
    this.size = opts.size;
    this.memory = opts.memory;
    this.eventIdx = opts.eventIdx;
    this.indirect = opts.indirect;
    this.ring = descTableOf(opts.rings.desc, opts.size);
    this.ringU32 = this.ring.u32;
    this.ringU16 = this.ring.u16;
    this.pool = new ChainPool(opts.memory, opts.size);
    this.indirectTables = new IndirectTables(opts.memory);
    this.driverEvent = new Uint16Array(opts.rings.driver.buffer, opts.rings.driver.byteOffset, 2);
    this.deviceEvent = new Uint16Array(opts.rings.device.buffer, opts.rings.device.byteOffset, 2);
    const s = opts.state;
    this.nextAvail = (s?.nextAvail ?? 0) % this.size;
    this.availWrap = s?.availWrap ?? true;
    this.nextUsed = (s?.nextUsed ?? 0) % this.size;
    this.usedWrap = s?.usedWrap ?? true;
  }

  get broken(): VirtqueueError | undefined {
    return this.brokenBy;
  }

  get inFlight(): number {
    return this.inFlightCount;
  }

  getState(): QueueState {
    return { nextAvail: this.nextAvail, availWrap: this.availWrap, nextUsed: this.nextUsed, usedWrap: this.usedWrap };
  }

  /** Whether the descriptor at the device's next available position has been made available. */
  private headAvailable(): boolean {
    // Acquire: the rest of the descriptor (and of its chain) is read only after its flags showed it available.
    const flags = Atomics.load(this.ringU16, this.nextAvail * 8 + DESC_FLAGS);
    const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
    const used = (flags & VIRTQ_DESC_F_USED) !== 0;
    return avail === this.availWrap && used !== this.availWrap;
  }

  hasAvailable(): boolean {
    return this.brokenBy !== undefined || this.headAvailable();
  }

  pop(): DescriptorChain | VirtqueueError | null {
    if (this.brokenBy !== undefined) return this.brokenBy;
    if (!this.headAvailable()) return null;
    const target = this.pool.spare();
    const err = this.walk(target);
    if (err !== undefined) {
      this.brokenBy = err;
      return err;
    }
    const chain = this.pool.take();
    this.nextAvail += chain.ringSlots;
    if (this.nextAvail >= this.size) {
      this.nextAvail -= this.size;
      this.availWrap = !this.availWrap;
    }
    this.inFlightCount++;
    return chain;
  }

  /**
   * Walks the chain at the next available position into `c`. The common case (no indirection, each buffer inside
   * the region the previous one was in, addresses below 2^32, no zero length) in straight-line code; anything else
   * (including every error) is left to walkGeneral, which starts over and reports precisely.
   */
  private walk(c: ChainFill): VirtqueueError | undefined {
    const size = this.size;
    const u32 = this.ringU32;
    const u16 = this.ringU16;
    const segs = c.segments;
    let base = this.hitBase;
    let end = this.hitEnd;
    let pos = this.nextAvail;
    let slots = 1;
    let n = 0;
    let readableCount = 0;
    let readableBytes = 0;
    let writableBytes = 0;
    for (;; slots++) {
      const w = pos << 2;
      const flags = u16[(w << 1) + DESC_FLAGS]!;
      const addr = u32[w]!;
      const len = u32[w + 2]!;
      if (slots > size || (flags & VIRTQ_DESC_F_INDIRECT) !== 0 || u32[w + 1] !== 0 || len === 0) return this.walkGeneral(c);
      if (addr < base || addr + len > end) {
        const region = this.memory.findRegion(addr);
        if (region === undefined || addr + len > region.end) return this.walkGeneral(c);
        base = this.hitBase = region.guestPhysAddr;
        end = this.hitEnd = region.end;
      }
      segs[n] = addr;
      segs[n + 1] = len;
      n += 2;
      if ((flags & VIRTQ_DESC_F_WRITE) !== 0) {
        writableBytes += len;
      } else {
        if (writableBytes > 0) return this.walkGeneral(c);
        readableCount++;
        readableBytes += len;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      pos = pos + 1 === size ? 0 : pos + 1;
    }
    // The buffer id is carried by the last descriptor of the chain in the ring.
    const id = u16[(pos << 3) + DESC_ID]!;
    if (id >= size || readableBytes > 0xffff_ffff || writableBytes > 0xffff_ffff) return this.walkGeneral(c);
    trimSegments(segs, n);
    c.id = id;
    c.ringSlots = slots;
    c.readableCount = readableCount;
    c.readableBytes = readableBytes;
    c.writableBytes = writableBytes;
    return undefined;
  }

  /** Walks any chain into `c`, indirect tables included, and names the first thing wrong with it. */
  private walkGeneral(c: ChainFill): VirtqueueError | undefined {
    const b = this.builder;
    b.begin(c);
    const ring = this.ring;
    let pos = this.nextAvail;
    let slots = 0;
    for (;;) {
      if (++slots > this.size) {
        return new VirtqueueError('ChainTooLong', `chain at ring position ${this.nextAvail} has more than ${this.size} descriptors`);
      }
      const flags = ring.u16[pos * 8 + DESC_FLAGS]!;
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) return new VirtqueueError('IndirectNotNegotiated', `descriptor ${pos} is indirect but VIRTIO_F_INDIRECT_DESC was not negotiated`);
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0) return new VirtqueueError('IndirectWithNext', `descriptor ${pos} has both INDIRECT and NEXT`);
        if (slots > 1) {
          // An indirect descriptor must be the only one of its chain in the ring (spec 2.8.7.1 requires the
          // driver not to chain it); a NEXT from the previous descriptor that leads here is that same error.
          return new VirtqueueError('IndirectWithNext', `descriptor ${pos} is indirect but is reached through NEXT`);
        }
        const table = this.indirectTables.open(ring, pos, Math.min(this.size, MAX_INDIRECT_TABLE_ENTRIES));
        if (table instanceof VirtqueueError) return table;
        // In a packed indirect table descriptors are used in order; NEXT is not used, INDIRECT is forbidden.
        const u16Base = 2 * table.base;
        for (let j = 0; j < table.entries; j++) {
          const f = table.u16[u16Base + j * 8 + DESC_FLAGS]!;
          if ((f & VIRTQ_DESC_F_INDIRECT) !== 0) return new VirtqueueError('NestedIndirect', `entry ${j} of an indirect table is itself indirect`);
          const err = b.add(this.memory, table, j, (f & VIRTQ_DESC_F_WRITE) !== 0);
          if (err !== undefined) return err;
        }
        break;
      }
      const err = b.add(this.memory, ring, pos, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if (err !== undefined) return err;
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      pos = pos + 1 === this.size ? 0 : pos + 1;
    }
    // The buffer id is carried by the last descriptor of the chain in the ring.
    const id = ring.u16[pos * 8 + DESC_ID]!;
    if (id >= this.size) {
      return new VirtqueueError('DescriptorIndexOutOfRange', `buffer id ${id} >= queue size ${this.size}`);
    }
    b.finish(id, slots);
    return undefined;
  }

  pushUsed(chain: DescriptorChain, len: number): void {
    if (len > chain.writableBytes || len < 0 || !Number.isInteger(len)) {
      throw new RangeError(`used length ${len} is not within the chain's ${chain.writableBytes} writable bytes`);
    }
    const pos = this.nextUsed;
    const slots = chain.ringSlots;
    this.ringU32[pos * 4 + 2] = len;
    this.ringU16[pos * 8 + DESC_ID] = chain.id;
    const flags = (this.usedWrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0) | (len > 0 ? VIRTQ_DESC_F_WRITE : 0);
    // Release: id and len are visible before the flags that hand the descriptor back.
    Atomics.store(this.ringU16, pos * 8 + DESC_FLAGS, flags);
    this.nextUsed += slots;
    if (this.nextUsed >= this.size) {
      this.nextUsed -= this.size;
      this.usedWrap = !this.usedWrap;
    }
    this.usedSlotsSinceSignal += slots;
    this.inFlightCount--;
    // The chain is the queue's again (chain.ts: a device does not touch a chain it pushed).
    this.pool.give(chain);
  }

  needsNotification(): boolean {
    const pushed = this.usedSlotsSinceSignal;
    if (pushed === 0) return false;
    this.usedSlotsSinceSignal = 0;
    // Seq-cst load after the release stores of the used flags: the barrier between publishing and reading the
    // driver's wish.
    const flags = Atomics.load(this.driverEvent, EVENT_FLAGS) & 3;
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    if (flags !== RING_EVENT_FLAGS_DESC || !this.eventIdx) return true;
    const offWrap = Atomics.load(this.driverEvent, EVENT_OFF_WRAP);
    // The driver asks for an interrupt when the device writes the used descriptor at `off` in the lap `wrap`.
    // Compare in a 16-bit window as vring_need_event does, shifting `off` back one lap when it names the
    // previous lap of the ring.
    let event = offWrap & 0x7fff;
    const wrap = (offWrap & 0x8000) !== 0;
    if (wrap !== this.usedWrap) event -= this.size;
    const now = this.nextUsed;
    return vringNeedEvent(event & 0xffff, now, (now - pushed) & 0xffff);
  }

  disableNotifications(): void {
    Atomics.store(this.deviceEvent, EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE);
  }

  enableNotifications(): boolean {
    if (this.eventIdx) {
      // Ask for a kick when the driver makes the descriptor at our next position available.
      Atomics.store(this.deviceEvent, EVENT_OFF_WRAP, this.nextAvail | (this.availWrap ? 0x8000 : 0));
      Atomics.store(this.deviceEvent, EVENT_FLAGS, RING_EVENT_FLAGS_DESC);
    } else {
      Atomics.store(this.deviceEvent, EVENT_FLAGS, RING_EVENT_FLAGS_ENABLE);
    }
    // Full barrier (seq-cst store) before re-checking the ring, as in the split queue.
    return this.hasAvailable();
  }
}
