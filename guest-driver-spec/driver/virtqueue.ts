// The driver side of one split virtqueue, built with the driver-side test kit (guest-driver-spec/testkit): the
// kit's SplitDriver lays the descriptor table, available ring and used ring out in guest memory and builds chains,
// exactly as it does for the device conformance tests. Here its memory is the real guest RAM the device sees (the
// front-end's memfd, or QEMU's memfd mapped into this process), so the rings the kit writes are the rings the
// device reads.
//
// The kit's TestGuestMemory allocates its own backing buffers; SharedRingMemory gives it a plan that covers one
// arena of real guest RAM (allocated from the driver's allocator for this queue) and swaps its GuestMemory for the
// shared one, so the kit's allocations stay inside the arena and its writes land in guest RAM.
//
// With VIRTIO_F_EVENT_IDX (virtio 1.2 section 2.7.10) the driver asks for the interrupt it needs and no other: a
// batch of control requests is answered with one interrupt instead of one per request (armInterrupt), and the kick
// follows the device's avail_event.

import { descTableSize, splitAvailSize, splitUsedSize, SPLIT_ALIGN } from '../../vmm-device/abi/virtqueue.ts';
import type { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import { SplitDriver, TestGuestMemory } from '../testkit/index.ts';
import type { DriverMemory } from './memory.ts';

/** One buffer of a chain: guest physical address, length, and whether the device writes it. */
export interface ChainBuffer {
  gpa: number;
  len: number;
  write: boolean;
}

export interface UsedChain {
  id: number;
  len: number;
}

/** Seed of the kit's generator: the driver hands out descriptors in a fixed order per queue. */
const RING_SEED = 0x5eed;
/** Offsets in the split rings (virtio 1.2 section 2.7): idx after flags, the event fields after the ring arrays. */
const RING_IDX_OFFSET = 2;
const RING_ARRAY_OFFSET = 4;
const AVAIL_ENTRY_SIZE = 2;

export interface DriverVirtqueueOptions {
  /** VIRTIO_F_EVENT_IDX negotiated: used_event and avail_event suppress notifications. */
  eventIdx?: boolean;
}

class SharedRingMemory extends TestGuestMemory {
  constructor(shared: GuestMemory, arenaGpa: number, arenaSize: number, seed: number) {
    super({ regions: [{ gpa: arenaGpa, size: arenaSize }], rng: seed, maxGap: 0, guardBytes: 0 });
    // The kit reads and writes through `memory`; point it at the guest RAM the device shares.
    Object.defineProperty(this, 'memory', { value: shared, writable: false });
  }

  override snapshot(): Uint8Array[] {
    return this.plans.map((p) => this.read(p.gpa, p.size));
  }

  override regionBytes(i: number): Uint8Array {
    const p = this.plans[i]!;
    return this.view(p.gpa, p.size);
  }
}

/** Bytes of an arena that holds the three split rings of a queue of `size` entries with their alignments. */
export function splitArenaBytes(size: number): number {
  return descTableSize(size) + SPLIT_ALIGN.desc + splitAvailSize(size) + SPLIT_ALIGN.avail + splitUsedSize(size) + SPLIT_ALIGN.used;
}

export class DriverVirtqueue {
  readonly ring: SplitDriver;
  readonly arena: number;

  constructor(
    readonly index: number,
    readonly size: number,
    private readonly mem: DriverMemory,
    options: DriverVirtqueueOptions = {},
  ) {
    const bytes = splitArenaBytes(size);
    this.arena = mem.allocZeroed(bytes, 4096);
    const kitMemory = new SharedRingMemory(mem.memory, this.arena, Math.ceil(bytes / 8) * 8, RING_SEED + index);
    this.ring = new SplitDriver({ mem: kitMemory, size, shuffleDescriptors: false, eventIdx: options.eventIdx ?? false });
  }

  get eventIdx(): boolean {
    return this.ring.eventIdx;
  }

  get descAddr(): number {
    return this.ring.descAddr;
  }
  get availAddr(): number {
    return this.ring.availAddr;
  }
  get usedAddr(): number {
    return this.ring.usedAddr;
  }

  get freeDescriptors(): number {
    return this.ring.freeDescriptorCount;
  }

  /**
   * Makes one chain of the driver's own buffers available (device-readable ones first, as virtio requires) and
   * returns its head id and whether the device asked to be notified.
   */
  add(buffers: readonly ChainBuffer[]): { id: number; kick: boolean } {
    if (buffers.length === 0) throw new RangeError('a chain needs at least one buffer');
    if (buffers.length > this.ring.freeDescriptorCount) {
      throw new RangeError(`queue ${this.index}: ${buffers.length} descriptors wanted, ${this.ring.freeDescriptorCount} free`);
    }
    const old = this.ring.availIdx;
    const built = this.ring.add({ buffers: buffers.map((b) => ({ addr: b.gpa, len: b.len, write: b.write })) });
    // avail.idx again as a sequentially consistent store: the device's avail_event (or used.flags) is read after
    // the new index is visible to it, or a device going idle meanwhile could miss the chain and the kick both.
    this.mem.storeU16(this.ring.availAddr + RING_IDX_OFFSET, this.ring.availIdx);
    return { id: built.id, kick: this.ring.kickNeeded(old, this.ring.availIdx) };
  }

  /**
   * Before the driver sleeps on this queue's interrupt: with EVENT_IDX, asks for one interrupt when `pending` more
   * chains have been used (used_event), none before. Returns true when the device has used chains the driver has
   * not taken yet (then the driver must look again instead of sleeping: the device may have passed used_event
   * before it was written). Without EVENT_IDX every used chain interrupts; returns false.
   */
  armInterrupt(pending: number): boolean {
    if (!this.ring.eventIdx) return false;
    const last = this.ring.lastUsedIdx;
    this.mem.storeU16(this.ring.availAddr + RING_ARRAY_OFFSET + AVAIL_ENTRY_SIZE * this.size, (last + Math.max(1, pending) - 1) & 0xffff);
    return this.mem.loadU16(this.ring.usedAddr + RING_IDX_OFFSET) !== last;
  }

  /** Used chains returned since the last call (their descriptors are free again). */
  takeUsed(): UsedChain[] {
    return this.ring.readUsed();
  }

  /** Gives the arena back (after the device was reset). */
  release(): void {
    this.mem.release(this.arena);
  }
}
