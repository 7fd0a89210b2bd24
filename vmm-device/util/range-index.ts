// An index of non-overlapping ranges [offset, offset + length), kept sorted by offset: the bookkeeping of the
// mappings of a shared memory region (the device's SHMEM_MAP account in transport/vhost-user/shmem.ts, the reference
// front-end's mappings in guest-driver-spec/frontend/shmem.ts).
//
// Why not a list scanned per request: with host queue mapping a VM holds 2 mappings per mapped QP and 1 per mapped
// CQ (spec 13.13), ~34,000 at 16,384 QPs, and every SHMEM_MAP, SHMEM_UNMAP and (in the front-end) every access of the
// driver's window looked its range up. A scan per request made setting up N QPs cost O(N^2) (bench:scale's set-up
// rate fell as QPs accumulated). Here a lookup is a binary search (O(log n) reads of elements); an insert or a
// removal is one Array.prototype.splice (V8 moves the slots with memmove, no JavaScript per element), and appending
// past the last range, the common case of a region filled from its start, is a push.

/** What the index holds: anything with a start and a length (bytes, bigint). */
export interface IndexedRange {
  readonly offset: bigint;
  readonly length: bigint;
}

export class RangeIndex<T extends IndexedRange> {
  /** Sorted by offset; no two overlap. */
  private readonly items: T[] = [];

  get size(): number {
    return this.items.length;
  }

  /** Index of the first range starting at or after `offset` (items.length when none). */
  private lowerBound(offset: bigint): number {
    let lo = 0;
    let hi = this.items.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.items[mid]!.offset < offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Index of the first range starting after `offset`. */
  private upperBound(offset: bigint): number {
    let lo = 0;
    let hi = this.items.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.items[mid]!.offset <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** The range holding byte `offset`, or undefined. */
  containing(offset: bigint): T | undefined {
    const i = this.upperBound(offset) - 1;
    if (i < 0) return undefined;
    const r = this.items[i]!;
    return offset < r.offset + r.length ? r : undefined;
  }

  /**
   * A range sharing a byte with [offset, offset + length), or undefined. Ranges do not overlap, so their ends rise
   * with their starts: the last range starting before the end is the only candidate.
   */
  overlapping(offset: bigint, length: bigint): T | undefined {
    const i = this.lowerBound(offset + length) - 1;
    if (i < 0 || length <= 0n) return undefined;
    const r = this.items[i]!;
    return r.offset + r.length > offset ? r : undefined;
  }

  /** The range starting exactly at `offset` with exactly `length` bytes, or undefined. */
  exact(offset: bigint, length: bigint): T | undefined {
    const r = this.items[this.lowerBound(offset)];
    return r !== undefined && r.offset === offset && r.length === length ? r : undefined;
  }

  /** The first range starting after `offset`, or undefined. */
  after(offset: bigint): T | undefined {
    return this.items[this.upperBound(offset)];
  }

  /** Adds `r`; throws a RangeError (nothing added) when it is empty or overlaps a range already held. */
  insert(r: T): void {
    if (r.length <= 0n) throw new RangeError(`range 0x${r.offset.toString(16)}+0x${r.length.toString(16)} is empty`);
    const clash = this.overlapping(r.offset, r.length);
    if (clash !== undefined) throw new RangeError(`range 0x${r.offset.toString(16)}+0x${r.length.toString(16)} overlaps 0x${clash.offset.toString(16)}+0x${clash.length.toString(16)}`);
    const i = this.lowerBound(r.offset);
    if (i === this.items.length) this.items.push(r);
    else this.items.splice(i, 0, r);
  }

  /** Removes `r` itself (the same object); false when the index does not hold it. */
  remove(r: T): boolean {
    const i = this.lowerBound(r.offset);
    if (this.items[i] !== r) return false;
    if (i === this.items.length - 1) this.items.pop();
    else this.items.splice(i, 1);
    return true;
  }

  /** The ranges in offset order (a copy). */
  toArray(): T[] {
    return this.items.slice();
  }

  /** Empties the index; returns what it held, in offset order. */
  clear(): T[] {
    return this.items.splice(0);
  }
}
