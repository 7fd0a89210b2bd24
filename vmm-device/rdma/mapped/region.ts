// The device's shared memory region for host queue mapping (spec sections 13.3, 13.13): which page ranges hold a
// live mapped queue, and which doorbell slots hold a live mapped QP. Both are small exact allocators over numbers
// only; what is mapped where is the manager's business (manager.ts).
//
// Layout of region REGION_SHMID: the doorbell pages first (offset 0, `doorbellPages` pages of 512 slots), then the
// queue area, page granular. Ranges are allocated first fit from a list of free extents kept sorted and merged, so
// its length never exceeds the live ranges + 1: every operation is bounded by max_mapped_queues. A release finds its
// place by binary search; an allocation takes the first extent large enough (while the region fills from its start,
// as a set-up does, that is the first extent: O(1)).

import { MappingLimits } from '../../abi/rdma/index.ts';

/** Slots of one doorbell page (spec 13.6). */
export const SLOTS_PER_PAGE = MappingLimits.DOORBELL_PAGE_SIZE / MappingLimits.DOORBELL_SLOT_SIZE;
const PAGE = BigInt(MappingLimits.MAPPING_ALIGN);

/** A range of the region: offset and length in bytes, both page multiples. */
export interface RegionRange {
  readonly offset: bigint;
  readonly length: bigint;
}

/** First-fit allocator of page ranges in [base, base + size). */
export class RangeAllocator {
  /** Free extents, sorted by offset, never adjacent (merged). */
  private free: { offset: bigint; length: bigint }[];
  private liveCount = 0;
  private liveBytes = 0n;

  constructor(
    readonly base: bigint,
    readonly size: bigint,
  ) {
    if (base % PAGE !== 0n || size % PAGE !== 0n || size < 0n) throw new RangeError(`a region range is page aligned: base ${base}, size ${size}`);
    this.free = size > 0n ? [{ offset: base, length: size }] : [];
  }

  /** A range of `length` bytes (rounded up to pages), or undefined when no free extent is large enough. */
  alloc(length: bigint): RegionRange | undefined {
    if (length <= 0n) return undefined;
    const need = ((length + PAGE - 1n) / PAGE) * PAGE;
    for (let i = 0; i < this.free.length; i++) {
      const f = this.free[i]!;
      if (f.length < need) continue;
      const range = { offset: f.offset, length: need };
      if (f.length === need) this.free.splice(i, 1);
      else this.free[i] = { offset: f.offset + need, length: f.length - need };
      this.liveCount++;
      this.liveBytes += need;
      return range;
    }
    return undefined;
  }

  /** Gives a range back (exactly as alloc returned it). */
  release(r: RegionRange): void {
    const end = r.offset + r.length;
    if (r.offset < this.base || end > this.base + this.size) throw new RangeError(`range ${r.offset}+${r.length} is outside the region`);
    // The first free extent at or after r (binary search: a guest destroying in any order fragments the list up to
    // its live ranges + 1, ~34,000 at 16,384 mapped QPs, and a scan per destroy would cost O(n)).
    let i = 0;
    let hi = this.free.length;
    while (i < hi) {
      const mid = (i + hi) >>> 1;
      if (this.free[mid]!.offset < r.offset) i = mid + 1;
      else hi = mid;
    }
    const prev = this.free[i - 1];
    const next = this.free[i];
    if ((prev !== undefined && prev.offset + prev.length > r.offset) || (next !== undefined && end > next.offset)) {
      throw new RangeError(`range ${r.offset}+${r.length} is (partly) free already`);
    }
    this.liveCount--;
    this.liveBytes -= r.length;
    if (prev !== undefined && prev.offset + prev.length === r.offset) {
      prev.length += r.length;
      if (next !== undefined && end === next.offset) {
        prev.length += next.length;
        this.free.splice(i, 1);
      }
    } else if (next !== undefined && end === next.offset) {
      this.free[i] = { offset: r.offset, length: r.length + next.length };
    } else {
      this.free.splice(i, 0, { offset: r.offset, length: r.length });
    }
  }

  /** Live ranges and their bytes. */
  get live(): { ranges: number; bytes: bigint } {
    return { ranges: this.liveCount, bytes: this.liveBytes };
  }

  /** Free extents (for tests: the list stays merged). */
  get freeExtents(): readonly RegionRange[] {
    return this.free;
  }
}

/** Doorbell slots 0 .. count - 1; the lowest free one first (so one page serves the first 512 QPs). */
export class SlotAllocator {
  private readonly used: Uint8Array;
  private next = 0;
  private liveCount = 0;

  constructor(readonly count: number) {
    this.used = new Uint8Array(count);
  }

  alloc(): number | undefined {
    for (let i = this.next; i < this.count; i++) {
      if (this.used[i] === 0) {
        this.used[i] = 1;
        this.next = i + 1;
        this.liveCount++;
        return i;
      }
    }
    return undefined;
  }

  release(slot: number): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.count || this.used[slot] === 0) throw new RangeError(`doorbell slot ${slot} is not in use`);
    this.used[slot] = 0;
    this.liveCount--;
    if (slot < this.next) this.next = slot;
  }

  get live(): number {
    return this.liveCount;
  }
}
