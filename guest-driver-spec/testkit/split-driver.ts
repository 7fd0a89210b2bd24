// The driver side of a split virtqueue (virtio 1.2 section 2.7) in test guest memory: what a guest driver does,
// written plainly so a device implementation can be tested against it. It lays the three rings out in guest
// memory, builds direct and indirect chains with buffers at random places, makes them available, sets the
// driver's interrupt suppression, reads back used elements and the device's notification suppression.
// Raw writers (writeDescriptor, writeAvailEntry, setAvailIdx) let a test build any malformed ring on purpose.

import type { QueueOptions, QueueState } from '../../vmm-device/virtqueue/queue.ts';
import {
  DESC_SIZE,
  MAX_SPLIT_QUEUE_SIZE,
  SPLIT_ALIGN,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
  vringNeedEvent,
} from '../../vmm-device/abi/virtqueue.ts';
import {
  encodeDescriptor,
  decodeDescriptor,
  type BuiltChain,
  type ChainSpec,
  type DecodedDescriptor,
  type RawDescriptor,
  placeBuffers,
  writeIndirectTable,
} from './descriptors.ts';
import type { TestGuestMemory } from './test-memory.ts';

export interface RingPlacement {
  /** Plan index of the region for each ring (random when absent). */
  desc?: number;
  driver?: number;
  device?: number;
}

export interface SplitDriverOptions {
  mem: TestGuestMemory;
  /** Queue size: a power of two, 1..32768. */
  size: number;
  eventIdx?: boolean;
  indirect?: boolean;
  /** Avail and used index to start from (the device's QueueState), to test 16-bit wrap; default 0. */
  startIndex?: number;
  rings?: RingPlacement;
  /** Hand out descriptor indices in seeded random order (default true), so heads are not simply 0, 1, 2. */
  shuffleDescriptors?: boolean;
}

export interface UsedElement {
  id: number;
  len: number;
}

export class SplitDriver {
  readonly layout = 'split' as const;
  readonly mem: TestGuestMemory;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly startIndex: number;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  /** The driver's avail index (next value of avail.idx to publish), mod 2^16. */
  availIdx: number;
  /** Used elements consumed so far by readUsed(), mod 2^16. */
  lastUsedIdx: number;
  private readonly freeDescs: number[];
  /** Head index -> descriptor indices of the chain, to free them when the device returns it. */
  private readonly chainDescs = new Map<number, number[]>();

  constructor(options: SplitDriverOptions) {
    const size = options.size;
    if (!Number.isInteger(size) || size < 1 || size > MAX_SPLIT_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RangeError(`split queue size ${size} must be a power of two in 1..${MAX_SPLIT_QUEUE_SIZE}`);
    }
    this.mem = options.mem;
    this.size = size;
    this.eventIdx = options.eventIdx ?? false;
    this.indirect = options.indirect ?? false;
    this.startIndex = (options.startIndex ?? 0) & 0xffff;
    const place = options.rings ?? {};
    this.descAddr = this.mem.alloc(descTableSize(size), { align: SPLIT_ALIGN.desc, ...(place.desc !== undefined ? { region: place.desc } : {}) });
    this.availAddr = this.mem.alloc(splitAvailSize(size), { align: SPLIT_ALIGN.avail, ...(place.driver !== undefined ? { region: place.driver } : {}) });
    this.usedAddr = this.mem.alloc(splitUsedSize(size), { align: SPLIT_ALIGN.used, ...(place.device !== undefined ? { region: place.device } : {}) });
    this.availIdx = this.startIndex;
    this.lastUsedIdx = this.startIndex;
    const ids = Array.from({ length: size }, (_, i) => i);
    this.freeDescs = options.shuffleDescriptors === false ? ids.reverse() : this.mem.rng.shuffle(ids);
    // A queue resumed at startIndex: both indexes were left there by a previous device (used.idx) and driver.
    this.mem.writeU16(this.availAddr + 2, this.startIndex);
    this.mem.writeU16(this.usedAddr + 2, this.startIndex);
    if (this.eventIdx) {
      this.setUsedEvent(this.startIndex);
      this.mem.writeU16(this.usedAddr + 4 + 8 * size, this.startIndex); // avail_event as a device would have left it
    }
  }

  /** The device's starting QueueState matching this driver. */
  get state(): QueueState {
    return { nextAvail: this.startIndex, nextUsed: this.startIndex };
  }

  /** Options for a device-side queue over this driver's rings. */
  queueOptions(): QueueOptions {
    return {
      size: this.size,
      rings: {
        desc: this.mem.view(this.descAddr, descTableSize(this.size)),
        driver: this.mem.view(this.availAddr, splitAvailSize(this.size)),
        device: this.mem.view(this.usedAddr, splitUsedSize(this.size)),
      },
      memory: this.mem.memory,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      state: this.state,
    };
  }

  get freeDescriptorCount(): number {
    return this.freeDescs.length;
  }

  // ---- raw access (any value, for malformed rings) ----

  writeDescriptor(index: number, d: RawDescriptor): void {
    this.mem.write(this.descAddr + DESC_SIZE * index, encodeDescriptor('split', d));
  }

  readDescriptor(index: number): DecodedDescriptor {
    return decodeDescriptor('split', this.mem.view(this.descAddr + DESC_SIZE * index, DESC_SIZE));
  }

  /** Writes avail.ring[pos % size] = head (head may be out of range on purpose). */
  writeAvailEntry(pos: number, head: number): void {
    this.mem.writeU16(this.availAddr + 4 + 2 * (pos % this.size), head);
  }

  /** Writes avail.idx (any value, e.g. a jump of more than the queue size) and makes it the driver's index. */
  setAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.mem.writeU16(this.availAddr + 2, this.availIdx);
  }

  /** Takes a free descriptor index off the free list. */
  takeDescriptor(): number {
    const i = this.freeDescs.pop();
    if (i === undefined) throw new RangeError('split driver: descriptor table is full');
    return i;
  }

  // ---- chains ----

  /** Allocates and writes an indirect table of `entries` (which the caller wrote as split descriptors). */
  writeIndirectTable(entries: readonly RawDescriptor[], region?: number): number {
    return writeIndirectTable(this.mem, 'split', entries, region);
  }

  /** Writes a chain's descriptors (not yet available) and returns what the device must see. */
  writeChain(spec: ChainSpec): BuiltChain {
    const n = spec.buffers.length;
    if (n === 0) throw new RangeError('a chain needs at least one buffer');
    const { addrs, segments, payload } = placeBuffers(this.mem, spec.buffers);
    const raws: RawDescriptor[] = spec.buffers.map((b, i) => {
      const last = i === n - 1;
      return { addr: addrs[i]!, len: b.len, flags: (b.write ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT), next: last ? 0 : i + 1 };
    });
    if (spec.indirect) {
      const table = this.writeIndirectTable(raws);
      const head = this.takeDescriptor();
      this.writeDescriptor(head, { addr: table, len: DESC_SIZE * n, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
      this.chainDescs.set(head, [head]);
      return { id: head, ringSlots: 1, segments, payload, descriptors: [head], indirectTable: table };
    }
    const indices = raws.map(() => this.takeDescriptor());
    // Written tail first, as a driver does, so no descriptor ever points at one not yet written.
    for (let i = n - 1; i >= 0; i--) {
      const d = raws[i]!;
      this.writeDescriptor(indices[i]!, { ...d, next: i === n - 1 ? 0 : indices[i + 1]! });
    }
    this.chainDescs.set(indices[0]!, indices);
    return { id: indices[0]!, ringSlots: 1, segments, payload, descriptors: indices };
  }

  /** Makes head available: avail.ring[idx % size] = head, then avail.idx + 1 (the release store of a real driver). */
  publish(...heads: number[]): void {
    for (const head of heads) {
      this.writeAvailEntry(this.availIdx, head);
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
    this.mem.writeU16(this.availAddr + 2, this.availIdx);
  }

  /** writeChain + publish. */
  add(spec: ChainSpec): BuiltChain {
    const chain = this.writeChain(spec);
    this.publish(chain.id);
    return chain;
  }

  // ---- suppression ----

  /** Driver interrupt suppression without EVENT_IDX: avail.flags NO_INTERRUPT. */
  setNoInterrupt(on: boolean): void {
    this.mem.writeU16(this.availAddr, on ? VIRTQ_AVAIL_F_NO_INTERRUPT : 0);
  }

  /** used_event (EVENT_IDX): interrupt me when the used index passes this value. */
  setUsedEvent(idx: number): void {
    this.mem.writeU16(this.availAddr + 4 + 2 * this.size, idx & 0xffff);
  }

  get availFlags(): number {
    return this.mem.readU16(this.availAddr);
  }

  get usedEvent(): number {
    return this.mem.readU16(this.availAddr + 4 + 2 * this.size);
  }

  /** used.flags as the device left it. */
  get usedFlags(): number {
    return this.mem.readU16(this.usedAddr);
  }

  /** used.idx as the device left it. */
  get usedIdx(): number {
    return this.mem.readU16(this.usedAddr + 2);
  }

  /** avail_event (EVENT_IDX) as the device left it. */
  get availEvent(): number {
    return this.mem.readU16(this.usedAddr + 4 + 8 * this.size);
  }

  /**
   * Whether this driver must notify (kick) the device after moving avail.idx from oldIdx to newIdx, given the
   * device's suppression in the used ring (virtio 1.2 section 2.7.10).
   */
  kickNeeded(oldIdx: number, newIdx: number): boolean {
    if (this.eventIdx) return vringNeedEvent(this.availEvent, newIdx & 0xffff, oldIdx & 0xffff);
    return (this.usedFlags & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** Whether the driver wants an interrupt for the device moving used.idx from oldIdx to newIdx (section 2.7.7). */
  interruptWanted(oldIdx: number, newIdx: number): boolean {
    if (this.eventIdx) return vringNeedEvent(this.usedEvent, newIdx & 0xffff, oldIdx & 0xffff);
    return (this.availFlags & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  // ---- used ring ----

  /** Reads the used elements the device added since the last call, and frees their descriptors. */
  readUsed(): UsedElement[] {
    const out: UsedElement[] = [];
    const end = this.usedIdx;
    while (this.lastUsedIdx !== end) {
      const at = this.usedAddr + 4 + 8 * (this.lastUsedIdx % this.size);
      const e = { id: this.mem.readU32(at), len: this.mem.readU32(at + 4) };
      out.push(e);
      this.reclaim(e.id);
      this.lastUsedIdx = (this.lastUsedIdx + 1) & 0xffff;
    }
    return out;
  }

  /** Frees the descriptors of the chain with this head as if the device had returned it. */
  reclaim(head: number): void {
    const descs = this.chainDescs.get(head);
    if (descs === undefined) return;
    this.chainDescs.delete(head);
    this.freeDescs.push(...descs);
  }
}
