// The driver side of a packed virtqueue (virtio 1.2 section 2.8) in test guest memory. One descriptor ring that
// both sides write: the driver makes descriptors available with AVAIL = its wrap counter and USED = the inverse;
// the device writes used descriptors with AVAIL = USED = its wrap counter. Chains occupy consecutive slots (and
// may wrap around the ring end, the wrap counter flipping in the middle of the chain); each chain carries a
// buffer id the used descriptor returns. The head's flags are written last, as a driver must.
// Raw writers (writeDescriptor, availBits) let a test build any malformed ring on purpose.

import type { QueueOptions, QueueState } from '../../vmm-device/virtqueue/queue.ts';
import {
  DESC_SIZE,
  MAX_PACKED_QUEUE_SIZE,
  PACKED_ALIGN,
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
} from '../../vmm-device/abi/virtqueue.ts';
import {
  decodeDescriptor,
  encodeDescriptor,
  type BuiltChain,
  type ChainSpec,
  type DecodedDescriptor,
  type RawDescriptor,
  placeBuffers,
  writeIndirectTable,
} from './descriptors.ts';
import type { RingPlacement, UsedElement } from './split-driver.ts';
import type { TestGuestMemory } from './test-memory.ts';

/** A position in the packed ring: slot index and the wrap counter that goes with it. */
export interface RingPosition {
  pos: number;
  wrap: boolean;
}

export interface PackedDriverOptions {
  mem: TestGuestMemory;
  /** Queue size: 1..32768 (any value, not only powers of two). */
  size: number;
  eventIdx?: boolean;
  indirect?: boolean;
  /** Where the driver (and the device) start: default slot 0, wrap counter 1 (a new ring). */
  start?: RingPosition;
  rings?: RingPlacement;
  /** Hand out buffer ids in seeded random order (default true). */
  shuffleIds?: boolean;
}

export interface EventSuppression {
  flags: number;
  off: number;
  wrap: boolean;
}

export class PackedDriver {
  readonly layout = 'packed' as const;
  readonly mem: TestGuestMemory;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly start: RingPosition;
  readonly descAddr: number;
  /** Driver event suppression area (the driver writes it: interrupt suppression). */
  readonly driverEventAddr: number;
  /** Device event suppression area (the device writes it: notification suppression). */
  readonly deviceEventAddr: number;
  /** Next slot the driver makes available, and its wrap counter. */
  next: RingPosition;
  /** Next slot where the driver expects a used descriptor, and its wrap counter. */
  used: RingPosition;
  /** Slots currently holding available (not yet returned) descriptors. */
  slotsInUse = 0;
  private readonly freeIds: number[];
  /** Buffer id -> ring slots of its chain (how far a used descriptor with that id moves the used position). */
  private readonly idSlots = new Map<number, number>();

  constructor(options: PackedDriverOptions) {
    const size = options.size;
    if (!Number.isInteger(size) || size < 1 || size > MAX_PACKED_QUEUE_SIZE) {
      throw new RangeError(`packed queue size ${size} must be in 1..${MAX_PACKED_QUEUE_SIZE}`);
    }
    this.mem = options.mem;
    this.size = size;
    this.eventIdx = options.eventIdx ?? false;
    this.indirect = options.indirect ?? false;
    this.start = options.start ?? { pos: 0, wrap: true };
    if (this.start.pos < 0 || this.start.pos >= size) throw new RangeError(`start slot ${this.start.pos} outside the ring`);
    const place = options.rings ?? {};
    this.descAddr = this.mem.alloc(descTableSize(size), { align: PACKED_ALIGN.desc, ...(place.desc !== undefined ? { region: place.desc } : {}) });
    this.driverEventAddr = this.mem.alloc(PACKED_EVENT_SIZE, { align: PACKED_ALIGN.driver, ...(place.driver !== undefined ? { region: place.driver } : {}) });
    this.deviceEventAddr = this.mem.alloc(PACKED_EVENT_SIZE, { align: PACKED_ALIGN.device, ...(place.device !== undefined ? { region: place.device } : {}) });
    this.next = { ...this.start };
    this.used = { ...this.start };
    const ids = Array.from({ length: size }, (_, i) => i);
    this.freeIds = options.shuffleIds === false ? ids.reverse() : this.mem.rng.shuffle(ids);
    this.primeRing();
  }

  /**
   * A resumed ring holds the previous laps' used descriptors: slots before the start used in this lap
   * (AVAIL = USED = wrap), slots from the start on used in the previous lap (AVAIL = USED = !wrap). A new ring
   * (slot 0, wrap 1) is all zeros, which is the same thing.
   */
  private primeRing(): void {
    const { pos, wrap } = this.start;
    if (pos === 0 && wrap) return;
    for (let i = 0; i < this.size; i++) {
      const w = i < pos ? wrap : !wrap;
      const usedBits = w ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0;
      this.writeDescriptor(i, { addr: 0, len: 0, id: 0, flags: usedBits });
    }
  }

  get state(): QueueState {
    return { nextAvail: this.start.pos, nextUsed: this.start.pos, availWrap: this.start.wrap, usedWrap: this.start.wrap };
  }

  queueOptions(): QueueOptions {
    return {
      size: this.size,
      rings: {
        desc: this.mem.view(this.descAddr, descTableSize(this.size)),
        driver: this.mem.view(this.driverEventAddr, PACKED_EVENT_SIZE),
        device: this.mem.view(this.deviceEventAddr, PACKED_EVENT_SIZE),
      },
      memory: this.mem.memory,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      state: this.state,
    };
  }

  get freeSlots(): number {
    return this.size - this.slotsInUse;
  }

  // ---- raw access ----

  /** AVAIL/USED bits that make a descriptor available under wrap counter `wrap`. */
  static availBits(wrap: boolean): number {
    return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
  }

  writeDescriptor(slot: number, d: RawDescriptor): void {
    this.mem.write(this.descAddr + DESC_SIZE * slot, encodeDescriptor('packed', d));
  }

  readDescriptor(slot: number): DecodedDescriptor {
    return decodeDescriptor('packed', this.mem.view(this.descAddr + DESC_SIZE * slot, DESC_SIZE));
  }

  /** Writes only the flags of a slot (the last store that makes a chain available). */
  writeFlags(slot: number, flags: number): void {
    this.mem.writeU16(this.descAddr + DESC_SIZE * slot + 14, flags);
  }

  takeId(): number {
    const id = this.freeIds.pop();
    if (id === undefined) throw new RangeError('packed driver: no free buffer id');
    return id;
  }

  /** Advances a position by n slots, flipping the wrap counter at the ring end. */
  advance(p: RingPosition, n: number): RingPosition {
    let pos = p.pos + n;
    let wrap = p.wrap;
    while (pos >= this.size) {
      pos -= this.size;
      wrap = !wrap;
    }
    return { pos, wrap };
  }

  /**
   * Writes raw descriptors into consecutive slots from the driver's next position, each with the AVAIL/USED bits of
   * its own lap ORed into `flags`, the first one's flags last; advances the driver position. For malformed rings.
   */
  writeRawChain(descs: readonly RawDescriptor[], options: { makeAvailable?: boolean } = {}): RingPosition {
    const first = this.next;
    const slots: { slot: number; flags: number }[] = [];
    let p = first;
    for (const d of descs) {
      const flags = d.flags | PackedDriver.availBits(p.wrap);
      slots.push({ slot: p.pos, flags });
      // The head keeps its old (not available) flags until everything else is written.
      this.writeDescriptor(p.pos, { ...d, flags: slots.length === 1 ? this.readDescriptor(p.pos).flags : flags });
      p = this.advance(p, 1);
    }
    if (options.makeAvailable !== false && slots.length > 0) this.writeFlags(slots[0]!.slot, slots[0]!.flags);
    this.next = p;
    this.slotsInUse += descs.length;
    return first;
  }

  // ---- chains ----

  /** Allocates and writes an indirect table (entries as packed descriptors). */
  writeIndirectTable(entries: readonly RawDescriptor[], region?: number): number {
    return writeIndirectTable(this.mem, 'packed', entries, region);
  }

  /** Builds a chain and makes it available. */
  add(spec: ChainSpec): BuiltChain {
    const n = spec.buffers.length;
    if (n === 0) throw new RangeError('a chain needs at least one buffer');
    const ringSlots = spec.indirect ? 1 : n;
    if (ringSlots > this.freeSlots) throw new RangeError(`packed driver: ${ringSlots} slots needed, ${this.freeSlots} free`);
    const id = spec.id ?? this.takeId();
    const { addrs, segments, payload } = placeBuffers(this.mem, spec.buffers);
    const raws: RawDescriptor[] = spec.buffers.map((b, i) => ({ addr: addrs[i]!, len: b.len, id, flags: b.write ? VIRTQ_DESC_F_WRITE : 0 }));
    let first: RingPosition;
    let table: number | undefined;
    if (spec.indirect) {
      // Entries of a packed indirect table are used in order: no NEXT, no AVAIL/USED bits.
      table = this.writeIndirectTable(raws);
      first = this.writeRawChain([{ addr: table, len: DESC_SIZE * n, id, flags: VIRTQ_DESC_F_INDIRECT }]);
    } else {
      // Every descriptor carries the id (Linux does this; the device reads the last one's).
      first = this.writeRawChain(raws.map((d, i) => ({ ...d, flags: d.flags | (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0) })));
    }
    this.idSlots.set(id, ringSlots);
    const descriptors = Array.from({ length: ringSlots }, (_, i) => (first.pos + i) % this.size);
    const chain: BuiltChain = { id, ringSlots, segments, payload, descriptors };
    if (table !== undefined) chain.indirectTable = table;
    return chain;
  }

  // ---- suppression ----

  /** Driver event suppression: ENABLE, DISABLE, or DESC with (off, wrap) (DESC needs EVENT_IDX). */
  setDriverEvent(flags: number, off = 0, wrap = false): void {
    this.mem.writeU16(this.driverEventAddr, (off & 0x7fff) | (wrap ? 0x8000 : 0));
    this.mem.writeU16(this.driverEventAddr + 2, flags);
  }

  get driverEvent(): EventSuppression {
    return readEvent(this.mem.view(this.driverEventAddr, PACKED_EVENT_SIZE));
  }

  get deviceEvent(): EventSuppression {
    return readEvent(this.mem.view(this.deviceEventAddr, PACKED_EVENT_SIZE));
  }

  /** Whether the driver must notify the device after making slots available from `from` up to `to`. */
  kickNeeded(from: RingPosition, to: RingPosition): boolean {
    return eventTriggered(this.deviceEvent, this.size, from, to);
  }

  /** Whether the driver wants an interrupt for the device moving its used position from `from` to `to`. */
  interruptWanted(from: RingPosition, to: RingPosition): boolean {
    return eventTriggered(this.driverEvent, this.size, from, to);
  }

  // ---- used descriptors ----

  /** True when the slot at `p` holds a used descriptor of lap `p.wrap`. */
  isUsed(p: RingPosition): boolean {
    const flags = this.readDescriptor(p.pos).flags;
    const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
    const used = (flags & VIRTQ_DESC_F_USED) !== 0;
    return avail === p.wrap && used === p.wrap;
  }

  /** Reads the used descriptors the device wrote since the last call, and frees their ids and slots. */
  readUsed(): UsedElement[] {
    const out: UsedElement[] = [];
    while (this.slotsInUse > 0 && this.isUsed(this.used)) {
      const d = this.readDescriptor(this.used.pos);
      out.push({ id: d.nextOrId, len: d.len });
      const slots = this.idSlots.get(d.nextOrId) ?? 1;
      this.used = this.advance(this.used, slots);
      this.reclaim(d.nextOrId);
    }
    return out;
  }

  /** Frees a buffer id (and its slots) as if the device had returned it. */
  reclaim(id: number): void {
    const slots = this.idSlots.get(id);
    if (slots === undefined) return;
    this.idSlots.delete(id);
    this.freeIds.push(id);
    this.slotsInUse -= slots;
  }
}

export function readEvent(area: Uint8Array): EventSuppression {
  const v = new DataView(area.buffer, area.byteOffset, 4);
  const offWrap = v.getUint16(0, true);
  return { off: offWrap & 0x7fff, wrap: (offWrap & 0x8000) !== 0, flags: v.getUint16(2, true) };
}

/**
 * The packed-ring notification rule (virtio 1.2 section 2.8.10, as Linux computes it): ENABLE always, DISABLE
 * never, DESC when the event position was passed while moving from `from` to `to`. Positions are made linear:
 * the current lap is [0, size), the previous one [-size, 0).
 */
export function eventTriggered(e: EventSuppression, size: number, from: RingPosition, to: RingPosition): boolean {
  if (e.flags === RING_EVENT_FLAGS_DISABLE) return false;
  if (e.flags === RING_EVENT_FLAGS_ENABLE) return true;
  if (e.flags !== RING_EVENT_FLAGS_DESC) return true; // reserved value: be conservative
  const newIdx = to.pos;
  const oldIdx = from.pos - (from.wrap !== to.wrap ? size : 0);
  const event = e.off - (e.wrap !== to.wrap ? size : 0);
  return vringNeedEvent(event & 0xffff, newIdx & 0xffff, oldIdx & 0xffff);
}
