// Guest memory: the map from guest physical addresses (GPA) to the backend's view of guest RAM.
//
// A region is a range of guest physical addresses backed by an ArrayBuffer (in production an mmap of the
// memfd the frontend passed; in tests a plain ArrayBuffer). Each region also records the frontend's own
// virtual address of the region (vhost-user SET_VRING_ADDR speaks frontend virtual addresses, descriptors
// speak guest physical addresses: two translations over the same regions).
//
// Addresses are JS numbers. Guest addresses come from the guest as u64 and are read as (hi, lo) u32 pairs;
// any address at or above MAX_GUEST_ADDRESS cannot be inside a region (regions are validated to end below it),
// so such an address fails translation instead of losing precision.

/** Regions must end at or below 2^53: every address inside one is an exact JS number. */
export const MAX_GUEST_ADDRESS = Number.MAX_SAFE_INTEGER + 1; // 2^53
/** Region bases and buffer offsets are 8-byte aligned so that typed-array views of rings inside them are legal. */
export const REGION_ALIGNMENT = 8;
/** vhost-user's largest memory table (VHOST_USER_MAX_RAM_SLOTS in QEMU); also ours. */
export const MAX_MEMORY_REGIONS = 509;

const TWO_POW_32 = 0x1_0000_0000;

export interface MemoryRegionSpec {
  /** Guest physical address of the first byte. */
  guestPhysAddr: number;
  /** Size in bytes (> 0). */
  size: number;
  /** The frontend's virtual address of the first byte (for ring addresses); defaults to guestPhysAddr. */
  userAddr?: number;
  /** Backing memory. */
  buffer: ArrayBuffer;
  /** Offset of the region's first byte inside `buffer` (the mmap offset); defaults to 0. */
  bufferOffset?: number;
}

export class MemoryRegion {
  readonly guestPhysAddr: number;
  readonly size: number;
  readonly userAddr: number;
  readonly buffer: ArrayBuffer;
  readonly bufferOffset: number;
  /** Byte view of exactly this region. */
  readonly bytes: Uint8Array;
  readonly end: number;
  readonly userEnd: number;

  constructor(spec: MemoryRegionSpec) {
    this.guestPhysAddr = spec.guestPhysAddr;
    this.size = spec.size;
    this.userAddr = spec.userAddr ?? spec.guestPhysAddr;
    this.buffer = spec.buffer;
    this.bufferOffset = spec.bufferOffset ?? 0;
    this.end = this.guestPhysAddr + this.size;
    this.userEnd = this.userAddr + this.size;
    this.bytes = new Uint8Array(this.buffer, this.bufferOffset, this.size);
  }
}

export type GuestMemoryErrorKind =
  | 'InvalidRegion' // a region spec that cannot be mapped (size, alignment, buffer bounds, address range)
  | 'OverlappingRegions' // two regions share guest physical (or frontend virtual) addresses
  | 'TooManyRegions'
  | 'AddressOverflow' // addr + len wraps past 2^64
  | 'OutOfBounds'; // some byte of [addr, addr+len) is in no region

export class GuestMemoryError extends Error {
  constructor(
    readonly kind: GuestMemoryErrorKind,
    message: string,
  ) {
    super(`${kind}: ${message}`);
    this.name = 'GuestMemoryError';
  }
}

function hex(n: number): string {
  return '0x' + n.toString(16);
}

/**
 * Returns the address (hi * 2^32 + lo) of a u64 read as two u32 halves, or -1 when addr + len wraps past
 * 2^64 (a guest bug the virtqueue reports as AddressOverflow). Addresses >= 2^53 come back rounded but are
 * >= MAX_GUEST_ADDRESS, so they can never be found inside a region.
 */
export function u64Address(hi: number, lo: number, len: number): number {
  if (hi === 0xffff_ffff && lo + len > TWO_POW_32) return -1;
  return hi * TWO_POW_32 + lo;
}

/** A contiguous piece of guest memory: `length` bytes at `offset` of `region.bytes`. */
export interface Slice {
  region: MemoryRegion;
  offset: number;
  length: number;
}

export class GuestMemory {
  private readonly regions: readonly MemoryRegion[];
  /** Most recently hit region: consecutive accesses usually land in the same one. */
  private lastHit: MemoryRegion | undefined;

  /** Validates the map: every region in range, aligned, inside its buffer, and no two overlapping. */
  constructor(specs: readonly MemoryRegionSpec[]) {
    if (specs.length > MAX_MEMORY_REGIONS) {
      throw new GuestMemoryError('TooManyRegions', `${specs.length} regions, at most ${MAX_MEMORY_REGIONS}`);
    }
    const regions = specs.map((spec, i) => {
      GuestMemory.validateSpec(spec, i);
      return new MemoryRegion(spec);
    });
    GuestMemory.checkOverlap(regions, (r) => r.guestPhysAddr, (r) => r.end, 'guest physical');
    GuestMemory.checkOverlap(regions, (r) => r.userAddr, (r) => r.userEnd, 'frontend virtual');
    this.regions = regions.sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    this.lastHit = this.regions[0];
  }

  static empty(): GuestMemory {
    return new GuestMemory([]);
  }

  private static validateSpec(spec: MemoryRegionSpec, i: number): void {
    const bad = (why: string): never => {
      throw new GuestMemoryError('InvalidRegion', `region ${i}: ${why}`);
    };
    const user = spec.userAddr ?? spec.guestPhysAddr;
    const off = spec.bufferOffset ?? 0;
    for (const [name, v] of [
      ['guestPhysAddr', spec.guestPhysAddr],
      ['userAddr', user],
      ['size', spec.size],
      ['bufferOffset', off],
    ] as const) {
      if (!Number.isSafeInteger(v) || v < 0) bad(`${name} ${v} is not a non-negative safe integer`);
    }
    if (spec.size === 0) bad('size is 0');
    if (spec.guestPhysAddr + spec.size > MAX_GUEST_ADDRESS) bad(`guest range ends above 2^53`);
    if (user + spec.size > MAX_GUEST_ADDRESS) bad(`frontend virtual range ends above 2^53`);
    if (spec.guestPhysAddr % REGION_ALIGNMENT !== 0 || user % REGION_ALIGNMENT !== 0 || off % REGION_ALIGNMENT !== 0) {
      bad(`guestPhysAddr, userAddr and bufferOffset must be ${REGION_ALIGNMENT}-byte aligned`);
    }
    if (off + spec.size > spec.buffer.byteLength) {
      bad(`bufferOffset ${off} + size ${spec.size} exceeds the buffer (${spec.buffer.byteLength} bytes)`);
    }
  }

  private static checkOverlap(
    regions: MemoryRegion[],
    start: (r: MemoryRegion) => number,
    end: (r: MemoryRegion) => number,
    space: string,
  ): void {
    const sorted = [...regions].sort((a, b) => start(a) - start(b));
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1]!;
      const cur = sorted[i]!;
      if (start(cur) < end(prev)) {
        throw new GuestMemoryError(
          'OverlappingRegions',
          `${space} ranges [${hex(start(prev))}, ${hex(end(prev))}) and [${hex(start(cur))}, ${hex(end(cur))}) overlap`,
        );
      }
    }
  }

  get regionList(): readonly MemoryRegion[] {
    return this.regions;
  }

  /** The region holding guest physical address `gpa`, or undefined. */
  findRegion(gpa: number): MemoryRegion | undefined {
    const hit = this.lastHit;
    if (hit !== undefined && gpa >= hit.guestPhysAddr && gpa < hit.end) return hit;
    // Binary search over regions sorted by base.
    let lo = 0;
    let hi = this.regions.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.regions[mid]!;
      if (gpa < r.guestPhysAddr) hi = mid - 1;
      else if (gpa >= r.end) lo = mid + 1;
      else {
        this.lastHit = r;
        return r;
      }
    }
    return undefined;
  }

  /**
   * Translates [gpa, gpa+len) up to the end of the region holding gpa (the length is clamped, as
   * libvhost-user's vu_gpa_to_va does): the caller walks piecewise across regions. Undefined if gpa is in no region.
   */
  translate(gpa: number, len: number): Slice | undefined {
    const r = this.findRegion(gpa);
    if (r === undefined) return undefined;
    const offset = gpa - r.guestPhysAddr;
    return { region: r, offset, length: Math.min(len, r.size - offset) };
  }

  /** True when every byte of [gpa, gpa+len) is inside some region (possibly several). */
  isValidRange(gpa: number, len: number): boolean {
    if (gpa < 0 || gpa + len > MAX_GUEST_ADDRESS) return false;
    let addr = gpa;
    let left = len;
    if (left === 0) return this.findRegion(gpa) !== undefined;
    while (left > 0) {
      const r = this.findRegion(addr);
      if (r === undefined) return false;
      const n = Math.min(left, r.end - addr);
      addr += n;
      left -= n;
    }
    return true;
  }

  /**
   * A byte view of [gpa, gpa+len) when the whole range is inside ONE region, else undefined.
   * Rings must be contiguous in the backend's address space; ordinary buffers need not be (use read/write).
   */
  contiguous(gpa: number, len: number): Uint8Array | undefined {
    const r = this.findRegion(gpa);
    if (r === undefined) return undefined;
    const offset = gpa - r.guestPhysAddr;
    if (len > r.size - offset) return undefined;
    return r.bytes.subarray(offset, offset + len);
  }

  /** Like `contiguous`, for a range given in the frontend's virtual addresses (vhost-user ring addresses). */
  contiguousUser(uva: number, len: number): Uint8Array | undefined {
    for (const r of this.regions) {
      if (uva >= r.userAddr && uva < r.userEnd) {
        const offset = uva - r.userAddr;
        if (len > r.size - offset) return undefined;
        return r.bytes.subarray(offset, offset + len);
      }
    }
    return undefined;
  }

  /** Translates a frontend virtual address to a guest physical one, or undefined. */
  userToGuestPhys(uva: number): number | undefined {
    for (const r of this.regions) {
      if (uva >= r.userAddr && uva < r.userEnd) return r.guestPhysAddr + (uva - r.userAddr);
    }
    return undefined;
  }

  /** Copies guest memory [gpa, gpa+dest.length) into dest, piecewise across regions. */
  read(gpa: number, dest: Uint8Array): void {
    let addr = gpa;
    let done = 0;
    while (done < dest.length) {
      const r = this.findRegion(addr);
      if (r === undefined) throw this.outOfBounds(gpa, dest.length, addr);
      const offset = addr - r.guestPhysAddr;
      const n = Math.min(dest.length - done, r.size - offset);
      dest.set(r.bytes.subarray(offset, offset + n), done);
      done += n;
      addr += n;
    }
  }

  /** Copies src into guest memory at gpa, piecewise across regions. Checks the whole range before writing any byte. */
  write(gpa: number, src: Uint8Array): void {
    if (!this.isValidRange(gpa, src.length)) throw this.outOfBounds(gpa, src.length, gpa);
    let addr = gpa;
    let done = 0;
    while (done < src.length) {
      const r = this.findRegion(addr)!;
      const offset = addr - r.guestPhysAddr;
      const n = Math.min(src.length - done, r.size - offset);
      r.bytes.set(src.subarray(done, done + n), offset);
      done += n;
      addr += n;
    }
  }

  private outOfBounds(gpa: number, len: number, at: number): GuestMemoryError {
    return new GuestMemoryError(
      'OutOfBounds',
      `[${hex(gpa)}, +${len}) is not guest memory (no region holds ${hex(at)})`,
    );
  }
}
