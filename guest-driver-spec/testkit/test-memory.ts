// Guest memory as a test driver sees it: a GuestMemory made of one or several regions (with holes between them
// in guest physical address space, or adjacent so that a buffer can cross from one region into the next), an
// allocator that leaves random gaps between buffers (no device code may assume buffers are contiguous), guard
// bytes around every region (a device writing past a region end is caught), and a log of every byte the driver
// writes (so a recorder can replay the driver's actions as memory patches).

import { GuestMemory, REGION_ALIGNMENT, type MemoryRegionSpec } from '../../vmm-device/memory/guest-memory.ts';
import { SeededRandom } from './prng.ts';

/** Bytes of canary before and after each region in its backing buffer (a multiple of REGION_ALIGNMENT). */
export const DEFAULT_GUARD_BYTES = 64;
/** The canary value the guard bytes hold. */
export const GUARD_BYTE = 0xa5;
/** Largest random gap the allocator leaves before a buffer, by default. */
export const DEFAULT_MAX_GAP = 96;
/** Bytes kept free on each side of a boundary between two adjacent regions, for a buffer that crosses it. */
export const CROSSING_RESERVE = 4096;

export interface RegionPlan {
  /** Guest physical address of the region (REGION_ALIGNMENT-aligned). */
  gpa: number;
  /** Size in bytes (REGION_ALIGNMENT multiple). */
  size: number;
  /** The frontend's virtual address of the region; defaults to gpa. */
  userAddr?: number;
}

export interface TestMemoryOptions {
  regions: readonly RegionPlan[];
  /** Seed or generator for the gaps between buffers. */
  rng: SeededRandom | number;
  /** Largest random gap before each allocated buffer (0 disables gaps). */
  maxGap?: number;
  /** Canary bytes around each region; 0 for none. */
  guardBytes?: number;
}

export interface AllocOptions {
  /** Alignment of the returned address (a power of two). */
  align?: number;
  /** Index (in plan order) of the region to allocate in; any region with room when absent. */
  region?: number;
  /** Leave a random gap before the buffer (default true). */
  gap?: boolean;
}

/** Allocator state saved by TestGuestMemory.mark(). */
export interface AllocMark {
  readonly nextFree: readonly number[];
  readonly crossingUsed: readonly boolean[];
}

/** A boundary where region `left` ends exactly where region `right` begins in guest physical address space. */
interface Boundary {
  gpa: number;
  left: number;
  right: number;
  used: boolean;
}

export type WriteListener = (gpa: number, bytes: Uint8Array) => void;

export class TestGuestMemory {
  readonly memory: GuestMemory;
  readonly plans: readonly RegionPlan[];
  readonly guardBytes: number;
  readonly rng: SeededRandom;
  readonly maxGap: number;
  /** The backing buffer of each region (plan order): guard, region, guard. */
  readonly backing: readonly ArrayBuffer[];
  private readonly nextFree: number[];
  private readonly limit: number[];
  private readonly boundaries: Boundary[];
  private listener: WriteListener | undefined;

  constructor(options: TestMemoryOptions) {
    this.plans = options.regions.map((r) => ({ ...r }));
    this.rng = typeof options.rng === 'number' ? new SeededRandom(options.rng) : options.rng;
    this.maxGap = options.maxGap ?? DEFAULT_MAX_GAP;
    this.guardBytes = options.guardBytes ?? DEFAULT_GUARD_BYTES;
    if (this.guardBytes % REGION_ALIGNMENT !== 0) throw new RangeError(`guardBytes must be a multiple of ${REGION_ALIGNMENT}`);
    const specs: MemoryRegionSpec[] = [];
    const backing: ArrayBuffer[] = [];
    for (const plan of this.plans) {
      const buffer = new ArrayBuffer(plan.size + 2 * this.guardBytes);
      if (this.guardBytes > 0) {
        new Uint8Array(buffer, 0, this.guardBytes).fill(GUARD_BYTE);
        new Uint8Array(buffer, this.guardBytes + plan.size, this.guardBytes).fill(GUARD_BYTE);
      }
      backing.push(buffer);
      const spec: MemoryRegionSpec = { guestPhysAddr: plan.gpa, size: plan.size, buffer, bufferOffset: this.guardBytes };
      if (plan.userAddr !== undefined) spec.userAddr = plan.userAddr;
      specs.push(spec);
    }
    this.backing = backing;
    this.memory = new GuestMemory(specs);
    this.nextFree = this.plans.map((p) => p.gpa);
    this.limit = this.plans.map((p) => p.gpa + p.size);
    this.boundaries = [];
    for (let i = 0; i < this.plans.length; i++) {
      for (let j = 0; j < this.plans.length; j++) {
        const a = this.plans[i]!;
        const b = this.plans[j]!;
        if (i !== j && a.gpa + a.size === b.gpa) {
          const reserve = Math.min(CROSSING_RESERVE, Math.floor(a.size / 4), Math.floor(b.size / 4));
          this.limit[i] = Math.min(this.limit[i]!, b.gpa - reserve);
          this.nextFree[j] = Math.max(this.nextFree[j]!, b.gpa + reserve);
          this.boundaries.push({ gpa: b.gpa, left: i, right: j, used: false });
        }
      }
    }
  }

  /** Reports every driver write (gpa, bytes) to `fn`, or stops reporting when undefined. */
  onWrite(fn: WriteListener | undefined): void {
    this.listener = fn;
  }

  /** Allocates `len` bytes inside one region, after a random gap. Throws when no region has room (a kit misuse). */
  alloc(len: number, options: AllocOptions = {}): number {
    const align = options.align ?? 8;
    const candidates = options.region !== undefined ? [options.region] : this.plans.map((_, i) => i);
    const order = options.region !== undefined ? candidates : this.rng.shuffle([...candidates]);
    for (const i of order) {
      const gap = options.gap === false || this.maxGap === 0 ? 0 : this.rng.int(0, this.maxGap);
      const start = alignUp(this.nextFree[i]! + gap, align);
      if (start + len <= this.limit[i]!) {
        this.nextFree[i] = start + len;
        return start;
      }
    }
    throw new RangeError(`test memory: no region has ${len} free bytes (align ${align})`);
  }

  /** The allocator's state now: release(mark) later frees everything allocated after it (a round of buffers). */
  mark(): AllocMark {
    return { nextFree: [...this.nextFree], crossingUsed: this.boundaries.map((b) => b.used) };
  }

  /** Frees every allocation made since `mark` (the caller knows none of those buffers is still in use). */
  release(mark: AllocMark): void {
    mark.nextFree.forEach((v, i) => (this.nextFree[i] = v));
    mark.crossingUsed.forEach((used, i) => (this.boundaries[i]!.used = used));
  }

  /** True when some boundary between adjacent regions is still free for a crossing buffer. */
  get canCross(): boolean {
    return this.boundaries.some((b) => !b.used);
  }

  /**
   * Allocates `len` (>= 2) bytes that start in one region and end in the next (adjacent) one, at a random split.
   * Each boundary holds one crossing buffer.
   */
  allocCrossing(len: number): number {
    const free = this.boundaries.filter((b) => !b.used);
    if (free.length === 0) throw new RangeError('test memory: no free boundary between adjacent regions');
    if (len < 2) throw new RangeError('a crossing buffer needs at least 2 bytes');
    const b = this.rng.pick(free);
    const reserve = b.gpa - this.limit[b.left]!;
    const before = this.rng.int(Math.max(1, len - reserve), Math.min(len - 1, reserve));
    if (before < 1 || len - before > reserve) throw new RangeError(`crossing buffer of ${len} bytes exceeds the reserve`);
    b.used = true;
    return b.gpa - before;
  }

  /** A guest physical address range of `len` bytes that lies in no region (between regions or above them all). */
  hole(len: number): number {
    const sorted = [...this.plans].sort((a, b) => a.gpa - b.gpa);
    for (let i = 0; i + 1 < sorted.length; i++) {
      const end = sorted[i]!.gpa + sorted[i]!.size;
      if (sorted[i + 1]!.gpa - end >= len) return end;
    }
    const last = sorted[sorted.length - 1]!;
    return last.gpa + last.size + 0x1000;
  }

  /** A byte view of [gpa, gpa+len) that must lie in one region (rings, indirect tables). */
  view(gpa: number, len: number): Uint8Array {
    const v = this.memory.contiguous(gpa, len);
    if (v === undefined) throw new RangeError(`[0x${gpa.toString(16)}, +${len}) is not inside one region`);
    return v;
  }

  dataView(gpa: number, len: number): DataView {
    const v = this.view(gpa, len);
    return new DataView(v.buffer, v.byteOffset, v.byteLength);
  }

  /** Driver write: copies bytes into guest memory (piecewise across regions) and reports it to the listener. */
  write(gpa: number, bytes: Uint8Array): void {
    this.memory.write(gpa, bytes);
    this.listener?.(gpa, bytes.slice());
  }

  // The ring fields (indexes, flags, ids) are read and written one at a time, many per chain: where the field lies in
  // one region and nobody listens to writes, straight into the region's bytes (no buffer, no copy); else as above.

  writeU16(gpa: number, value: number): void {
    const v = this.listener === undefined ? this.memory.contiguous(gpa, 2) : undefined;
    if (v !== undefined) {
      v[0] = value & 0xff;
      v[1] = (value >>> 8) & 0xff;
      return;
    }
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, value, true);
    this.write(gpa, b);
  }

  writeU32(gpa: number, value: number): void {
    const v = this.listener === undefined ? this.memory.contiguous(gpa, 4) : undefined;
    if (v !== undefined) {
      v[0] = value & 0xff;
      v[1] = (value >>> 8) & 0xff;
      v[2] = (value >>> 16) & 0xff;
      v[3] = (value >>> 24) & 0xff;
      return;
    }
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value >>> 0, true);
    this.write(gpa, b);
  }

  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    this.memory.read(gpa, out);
    return out;
  }

  readU16(gpa: number): number {
    const v = this.memory.contiguous(gpa, 2);
    if (v !== undefined) return v[0]! | (v[1]! << 8);
    return new DataView(this.read(gpa, 2).buffer).getUint16(0, true);
  }

  readU32(gpa: number): number {
    const v = this.memory.contiguous(gpa, 4);
    if (v !== undefined) return (v[0]! | (v[1]! << 8) | (v[2]! << 16) | (v[3]! << 24)) >>> 0;
    return new DataView(this.read(gpa, 4).buffer).getUint32(0, true);
  }

  /** Writes seeded random bytes into [gpa, gpa+len) and returns them (payload a device must read back). */
  fillRandom(gpa: number, len: number): Uint8Array {
    const bytes = this.rng.fill(new Uint8Array(len));
    this.write(gpa, bytes);
    return bytes;
  }

  /** Descriptions of guard areas whose canary changed (empty when nothing wrote outside the regions). */
  checkGuards(): string[] {
    const bad: string[] = [];
    this.plans.forEach((plan, i) => {
      const all = new Uint8Array(this.backing[i]!);
      const check = (from: number, what: string): void => {
        for (let k = 0; k < this.guardBytes; k++) {
          if (all[from + k] !== GUARD_BYTE) {
            bad.push(`region ${i} (gpa 0x${plan.gpa.toString(16)}): ${what} guard byte ${k} changed`);
            return;
          }
        }
      };
      check(0, 'leading');
      check(this.guardBytes + plan.size, 'trailing');
    });
    return bad;
  }

  /** A copy of every region's bytes (plan order), to compare before and after device activity. */
  snapshot(): Uint8Array[] {
    return this.plans.map((plan, i) => new Uint8Array(this.backing[i]!, this.guardBytes, plan.size).slice());
  }

  /** The live bytes of region i (plan order). */
  regionBytes(i: number): Uint8Array {
    return new Uint8Array(this.backing[i]!, this.guardBytes, this.plans[i]!.size);
  }
}

export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

export interface RandomLayoutOptions {
  /** Number of regions (>= 1). */
  regions: number;
  /** Bytes every region must at least hold. */
  minRegionSize: number;
  /** Pairs of consecutive regions that are adjacent in GPA space (crossing buffers possible); the rest have holes. */
  adjacent?: boolean | 'some';
  /** Put regions above 4 GiB (addresses whose high u32 is non-zero). */
  high?: boolean;
}

/** A seeded memory map: regions at random aligned bases, holes between them unless they are to be adjacent. */
export function randomLayout(rng: SeededRandom, options: RandomLayoutOptions): RegionPlan[] {
  const plans: RegionPlan[] = [];
  let gpa = options.high ? 0x1_0000_0000 + rng.int(0, 255) * 0x1000 : rng.int(0, 15) * 0x1000;
  for (let i = 0; i < options.regions; i++) {
    const size = alignUp(options.minRegionSize + rng.int(0, 64) * 64, 0x1000);
    plans.push({ gpa, size });
    const adjacentNext = options.adjacent === true || (options.adjacent === 'some' && i % 2 === 0);
    gpa += size + (adjacentNext ? 0 : rng.int(1, 16) * 0x1000);
  }
  return plans;
}
