// Guest RAM as the reference driver sees it: a GuestMemory (the same bytes the device reads, shared through a
// memfd or a file) and an allocator of guest physical ranges for rings, index blocks, control requests, event
// buffers, doorbell buffers and data buffers. Ranges are freed when the object that holds them is destroyed, so a
// long test does not run out of guest RAM.
//
// RAM added while the driver runs (a DIMM hot-added to the VM) joins with addRegion; an allocation may be confined
// to one range (`within`), which is how a test places a ring or an MR in exactly that memory.
//
// Index blocks are read and written with Atomics on 32-bit views: the spec's store-release / load-acquire of
// producer_index and consumer_index (section 10.2). On x86-64 an aligned 32-bit store is one instruction and
// Atomics keeps the JIT from reordering or splitting it.

import { GuestMemory, type MemoryRegionSpec } from '../../vmm-device/memory/guest-memory.ts';

export class DriverMemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DriverMemoryError';
  }
}

/** A range of guest physical addresses the driver may allocate from (inside one RAM region). */
export interface AllocatableRange {
  gpa: number;
  size: number;
}

interface FreeBlock {
  gpa: number;
  size: number;
}

/** Smallest alignment of every allocation: index blocks and u64 fields need 8. */
export const MIN_ALLOC_ALIGN = 8;

/** First-fit allocator of guest physical ranges with coalescing free. */
export class GpaAllocator {
  private readonly free: FreeBlock[];
  private readonly live = new Map<number, number>();
  private totalBytes: number;

  constructor(ranges: readonly AllocatableRange[]) {
    this.free = ranges.filter((r) => r.size > 0).map((r) => ({ gpa: r.gpa, size: r.size })).sort((a, b) => a.gpa - b.gpa);
    this.totalBytes = this.free.reduce((n, b) => n + b.size, 0);
  }

  /** Bytes of every allocatable range. */
  get total(): number {
    return this.totalBytes;
  }

  /** Bytes not allocated. */
  get available(): number {
    return this.free.reduce((n, b) => n + b.size, 0);
  }

  /** Live allocations (gpa -> size), for leak checks in tests. */
  get liveCount(): number {
    return this.live.size;
  }

  /** Makes [gpa, gpa + size) allocatable too (RAM that arrived later); it must not overlap a known range. */
  addRange(range: AllocatableRange): void {
    if (!Number.isSafeInteger(range.gpa) || range.gpa < 0 || !Number.isSafeInteger(range.size) || range.size < 1) {
      throw new DriverMemoryError(`range at ${range.gpa} of ${range.size} bytes`);
    }
    const end = range.gpa + range.size;
    const overlaps = (gpa: number, size: number): boolean => gpa < end && range.gpa < gpa + size;
    if (this.free.some((b) => overlaps(b.gpa, b.size)) || [...this.live].some(([gpa, size]) => overlaps(gpa, size))) {
      throw new DriverMemoryError(`range [0x${range.gpa.toString(16)}, 0x${end.toString(16)}) overlaps memory the allocator already has`);
    }
    const i = this.free.findIndex((b) => b.gpa > range.gpa);
    this.free.splice(i < 0 ? this.free.length : i, 0, { gpa: range.gpa, size: range.size });
    this.totalBytes += range.size;
  }

  /**
   * Reserves `length` bytes aligned to `align`; with `within`, only inside that range (a block of a larger free
   * range may be taken from its middle).
   */
  alloc(length: number, align = MIN_ALLOC_ALIGN, within?: AllocatableRange): number {
    if (!Number.isSafeInteger(length) || length < 1) throw new DriverMemoryError(`allocation of ${length} bytes`);
    const a = Math.max(align, MIN_ALLOC_ALIGN);
    if ((a & (a - 1)) !== 0) throw new DriverMemoryError(`alignment ${align} is not a power of two`);
    const size = Math.ceil(length / MIN_ALLOC_ALIGN) * MIN_ALLOC_ALIGN;
    for (let i = 0; i < this.free.length; i++) {
      const b = this.free[i]!;
      const lo = within === undefined ? b.gpa : Math.max(b.gpa, within.gpa);
      const hi = within === undefined ? b.gpa + b.size : Math.min(b.gpa + b.size, within.gpa + within.size);
      const at = Math.ceil(lo / a) * a;
      if (at + size > hi) continue;
      const before = { gpa: b.gpa, size: at - b.gpa };
      const after = { gpa: at + size, size: b.gpa + b.size - (at + size) };
      this.free.splice(i, 1, ...[before, after].filter((x) => x.size > 0));
      this.live.set(at, size);
      return at;
    }
    const where = within === undefined ? '' : ` in [0x${within.gpa.toString(16)}, +0x${within.size.toString(16)})`;
    throw new DriverMemoryError(`guest RAM exhausted${where}: ${length} bytes (align ${a}) wanted, ${this.available} free in pieces`);
  }

  release(gpa: number): void {
    const size = this.live.get(gpa);
    if (size === undefined) throw new DriverMemoryError(`0x${gpa.toString(16)} is not an allocation`);
    this.live.delete(gpa);
    let i = this.free.findIndex((b) => b.gpa > gpa);
    if (i < 0) i = this.free.length;
    this.free.splice(i, 0, { gpa, size });
    // Coalesce with the next block, then with the previous one.
    const cur = this.free[i]!;
    const next = this.free[i + 1];
    if (next !== undefined && cur.gpa + cur.size === next.gpa) {
      cur.size += next.size;
      this.free.splice(i + 1, 1);
    }
    const prev = this.free[i - 1];
    if (prev !== undefined && prev.gpa + prev.size === cur.gpa) {
      prev.size += cur.size;
      this.free.splice(i, 1);
    }
  }
}

/** Guest RAM access plus allocation: what every part of the driver uses to touch guest memory. */
export class DriverMemory {
  readonly allocator: GpaAllocator;
  private current: GuestMemory;

  constructor(memory: GuestMemory, ranges: readonly AllocatableRange[]) {
    for (const r of ranges) {
      if (!memory.isValidRange(r.gpa, r.size)) throw new DriverMemoryError(`range [0x${r.gpa.toString(16)}, +0x${r.size.toString(16)}) is not guest RAM`);
    }
    this.current = memory;
    this.allocator = new GpaAllocator(ranges);
  }

  /** Guest RAM as the driver maps it now (a new map once addRegion added RAM). */
  get memory(): GuestMemory {
    return this.current;
  }

  /**
   * RAM that arrived while the driver runs (a hot-added DIMM, mapped by the transport): joins the map and, whole,
   * the allocatable ranges. Existing allocations and views stay valid (the old regions keep their buffers).
   */
  addRegion(spec: MemoryRegionSpec): AllocatableRange {
    const kept: MemoryRegionSpec[] = this.current.regionList.map((r) => ({
      guestPhysAddr: r.guestPhysAddr,
      size: r.size,
      userAddr: r.userAddr,
      buffer: r.buffer,
      bufferOffset: r.bufferOffset,
    }));
    const next = new GuestMemory([...kept, spec]); // validates: no overlap with RAM the driver has
    const range = { gpa: spec.guestPhysAddr, size: spec.size };
    this.allocator.addRange(range);
    this.current = next;
    return range;
  }

  /** See GpaAllocator.alloc; `within` must be guest RAM. */
  alloc(length: number, align = MIN_ALLOC_ALIGN, within?: AllocatableRange): number {
    if (within !== undefined && !this.current.isValidRange(within.gpa, within.size)) {
      throw new DriverMemoryError(`range [0x${within.gpa.toString(16)}, +0x${within.size.toString(16)}) is not guest RAM`);
    }
    return this.allocator.alloc(length, align, within);
  }

  /** Allocates zeroed bytes. */
  allocZeroed(length: number, align = MIN_ALLOC_ALIGN, within?: AllocatableRange): number {
    const gpa = this.alloc(length, align, within);
    this.fill(gpa, length, 0);
    return gpa;
  }

  release(gpa: number): void {
    this.allocator.release(gpa);
  }

  read(gpa: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    this.memory.read(gpa, out);
    return out;
  }

  write(gpa: number, bytes: Uint8Array): void {
    this.memory.write(gpa, bytes);
  }

  fill(gpa: number, length: number, value: number): void {
    const v = this.memory.contiguous(gpa, length);
    if (v !== undefined) v.fill(value);
    else this.memory.write(gpa, new Uint8Array(length).fill(value));
  }

  private u32View(gpa: number): Uint32Array {
    if (gpa % 4 !== 0) throw new DriverMemoryError(`u32 at 0x${gpa.toString(16)} is not aligned`);
    const v = this.memory.contiguous(gpa, 4);
    if (v === undefined) throw new DriverMemoryError(`u32 at 0x${gpa.toString(16)} is not guest RAM`);
    if (v.byteOffset % 4 !== 0) throw new DriverMemoryError(`u32 at 0x${gpa.toString(16)}: mapping not 4-byte aligned`);
    return new Uint32Array(v.buffer, v.byteOffset, 1);
  }

  private u16View(gpa: number): Uint16Array {
    if (gpa % 2 !== 0) throw new DriverMemoryError(`u16 at 0x${gpa.toString(16)} is not aligned`);
    const v = this.memory.contiguous(gpa, 2);
    if (v === undefined) throw new DriverMemoryError(`u16 at 0x${gpa.toString(16)} is not guest RAM`);
    if (v.byteOffset % 2 !== 0) throw new DriverMemoryError(`u16 at 0x${gpa.toString(16)}: mapping not 2-byte aligned`);
    return new Uint16Array(v.buffer, v.byteOffset, 1);
  }

  /** Load of a 16-bit ring field (a virtqueue index) with Atomics: sequentially consistent with storeU16. */
  loadU16(gpa: number): number {
    return Atomics.load(this.u16View(gpa), 0);
  }

  /**
   * Store of a 16-bit ring field with Atomics: sequentially consistent, so a later load of another field is not
   * done before it (the full barrier virtio asks between publishing an index and reading the other side's event).
   */
  storeU16(gpa: number, value: number): void {
    Atomics.store(this.u16View(gpa), 0, value & 0xffff);
  }

  /** Load-acquire of a 32-bit index (little-endian hosts only, as every virtio-rdma host is x86-64 or arm64 LE). */
  loadU32(gpa: number): number {
    return Atomics.load(this.u32View(gpa), 0) >>> 0;
  }

  /** Store-release of a 32-bit index. */
  storeU32(gpa: number, value: number): void {
    Atomics.store(this.u32View(gpa), 0, value >>> 0);
  }
}
