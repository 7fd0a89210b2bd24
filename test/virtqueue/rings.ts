// Hand-written rings for the direct unit tests of the split and packed queues: guest memory of one or two regions
// and raw word writers, so that each test states the exact bytes a driver put in the ring and the exact bytes the
// device must write back, without the driver test kit in between.

import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import { PackedQueue, SplitQueue, VirtqueueError, type DescriptorChain, type QueueState } from '../../vmm-device/virtqueue/index.ts';

/** Region 0 covers [0, REGION0_SIZE); region 1 (when asked for) starts at REGION1_GPA, leaving a hole between. */
export const REGION0_SIZE = 0x10000;
export const REGION1_GPA = 0x20000;
export const REGION1_SIZE = 0x10000;
/** Where region 1 goes with `high`: above 4 GiB, so descriptor addresses need their upper 32 bits. */
export const HIGH_GPA = 0x1_0000_0000;
/** A guest address in no region. */
export const HOLE_GPA = 0x18000;

// Ring placement inside region 0.
export const DESC_GPA = 0x0;
export const DRIVER_GPA = 0x2000;
export const DEVICE_GPA = 0x3000;
/** Buffers and indirect tables go from here on. */
export const BUF_GPA = 0x4000;

export interface Mem {
  memory: GuestMemory;
  /** Region 0 and region 1 bytes (region 1 empty when not asked for). */
  r0: DataView;
  r1: DataView;
  /** A view of guest address `gpa` (either region). */
  at(gpa: number): { view: DataView; off: number };
}

/** Two regions when `second` is given: region 1 right after region 0, after a hole, or (high) at HIGH_GPA. */
export function makeMemory(second?: { adjacent: boolean; high?: boolean }): Mem {
  const b0 = new ArrayBuffer(REGION0_SIZE);
  const b1 = new ArrayBuffer(REGION1_SIZE);
  const r1Gpa = second?.high ? HIGH_GPA : second?.adjacent ? REGION0_SIZE : REGION1_GPA;
  const specs = [{ guestPhysAddr: 0, size: REGION0_SIZE, buffer: b0 }];
  if (second !== undefined) specs.push({ guestPhysAddr: r1Gpa, size: REGION1_SIZE, buffer: b1 });
  const r0 = new DataView(b0);
  const r1 = new DataView(b1);
  return {
    memory: new GuestMemory(specs),
    r0,
    r1,
    at(gpa) {
      if (gpa < REGION0_SIZE) return { view: r0, off: gpa };
      return { view: r1, off: gpa - r1Gpa };
    },
  };
}

export function u16(m: Mem, gpa: number): number {
  const { view, off } = m.at(gpa);
  return view.getUint16(off, true);
}
export function u32(m: Mem, gpa: number): number {
  const { view, off } = m.at(gpa);
  return view.getUint32(off, true);
}
export function setU16(m: Mem, gpa: number, v: number): void {
  const { view, off } = m.at(gpa);
  view.setUint16(off, v, true);
}

export interface Desc {
  addr: number | bigint;
  len: number;
  flags: number;
  /** Split: next. Packed: buffer id. */
  next?: number;
}

/** Writes a 16-byte descriptor at `gpa`: addr u64, len u32, then split flags/next or packed id/flags. */
export function writeDesc(m: Mem, gpa: number, d: Desc, layout: 'split' | 'packed'): void {
  const { view, off } = m.at(gpa);
  view.setBigUint64(off, BigInt(d.addr), true);
  view.setUint32(off + 8, d.len, true);
  if (layout === 'split') {
    view.setUint16(off + 12, d.flags, true);
    view.setUint16(off + 14, d.next ?? 0, true);
  } else {
    view.setUint16(off + 12, d.next ?? 0, true);
    view.setUint16(off + 14, d.flags, true);
  }
}

// ------------------------------------------------------------------------------------------------- split

export class SplitRing {
  readonly m: Mem;
  availIdx: number;

  constructor(
    readonly size: number,
    opts: { second?: { adjacent: boolean; high?: boolean }; startIdx?: number } = {},
  ) {
    this.m = opts.second === undefined ? makeMemory() : makeMemory(opts.second);
    this.availIdx = opts.startIdx ?? 0;
    setU16(this.m, DRIVER_GPA + 2, this.availIdx);
    setU16(this.m, DEVICE_GPA + 2, this.availIdx);
  }

  queue(opts: { eventIdx?: boolean; indirect?: boolean; state?: QueueState } = {}): SplitQueue {
    const bytes = (gpa: number, n: number) => new Uint8Array((this.m.at(gpa).view.buffer as ArrayBuffer), gpa, n);
    return new SplitQueue({
      size: this.size,
      rings: { desc: bytes(DESC_GPA, 16 * this.size), driver: bytes(DRIVER_GPA, 6 + 2 * this.size), device: bytes(DEVICE_GPA, 6 + 8 * this.size) },
      memory: this.m.memory,
      eventIdx: opts.eventIdx ?? false,
      indirect: opts.indirect ?? false,
      ...(opts.state ? { state: opts.state } : {}),
    });
  }

  desc(i: number, d: Desc): void {
    writeDesc(this.m, DESC_GPA + 16 * i, d, 'split');
  }

  /** Puts `head` in the next available ring entry and moves avail.idx past it. */
  publish(...heads: number[]): void {
    for (const h of heads) {
      setU16(this.m, DRIVER_GPA + 4 + 2 * (this.availIdx % this.size), h);
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
    setU16(this.m, DRIVER_GPA + 2, this.availIdx);
  }

  setAvailIdx(idx: number): void {
    setU16(this.m, DRIVER_GPA + 2, idx);
  }

  setAvailFlags(f: number): void {
    setU16(this.m, DRIVER_GPA, f);
  }

  setUsedEvent(idx: number): void {
    setU16(this.m, DRIVER_GPA + 4 + 2 * this.size, idx);
  }

  get usedIdx(): number {
    return u16(this.m, DEVICE_GPA + 2);
  }

  get usedFlags(): number {
    return u16(this.m, DEVICE_GPA);
  }

  get availEvent(): number {
    return u16(this.m, DEVICE_GPA + 4 + 8 * this.size);
  }

  /** Used ring element at ring index `idx` (mod size). */
  used(idx: number): { id: number; len: number } {
    const at = DEVICE_GPA + 4 + 8 * (idx % this.size);
    return { id: u32(this.m, at), len: u32(this.m, at + 4) };
  }
}

// ------------------------------------------------------------------------------------------------ packed

export class PackedRing {
  readonly m: Mem;
  /** Driver's next slot and wrap counter. */
  pos = 0;
  wrap = true;

  constructor(
    readonly size: number,
    opts: { second?: { adjacent: boolean; high?: boolean } } = {},
  ) {
    this.m = opts.second === undefined ? makeMemory() : makeMemory(opts.second);
  }

  queue(opts: { eventIdx?: boolean; indirect?: boolean; state?: QueueState } = {}): PackedQueue {
    const bytes = (gpa: number, n: number) => new Uint8Array((this.m.at(gpa).view.buffer as ArrayBuffer), gpa, n);
    return new PackedQueue({
      size: this.size,
      rings: { desc: bytes(DESC_GPA, 16 * this.size), driver: bytes(DRIVER_GPA, 4), device: bytes(DEVICE_GPA, 4) },
      memory: this.m.memory,
      eventIdx: opts.eventIdx ?? false,
      indirect: opts.indirect ?? false,
      ...(opts.state ? { state: opts.state } : {}),
    });
  }

  /** AVAIL/USED bits that make a descriptor available in the lap of wrap counter `wrap`. */
  static availBits(wrap: boolean): number {
    return wrap ? 1 << 7 : 1 << 15;
  }

  /**
   * Writes a chain at the driver's position (flags get NEXT on all but the last and the AVAIL/USED bits of their
   * slot's lap), the head's flags last; returns the head slot. `id` goes into the last descriptor.
   */
  add(descs: Omit<Desc, 'next'>[], id: number): number {
    const head = this.pos;
    let headFlags = 0;
    descs.forEach((d, j) => {
      const flags = d.flags | (j < descs.length - 1 ? 1 : 0) | PackedRing.availBits(this.wrap);
      const gpa = DESC_GPA + 16 * this.pos;
      writeDesc(this.m, gpa, { addr: d.addr, len: d.len, flags: j === 0 ? 0 : flags, next: id }, 'packed');
      if (j === 0) headFlags = flags;
      if (++this.pos === this.size) {
        this.pos = 0;
        this.wrap = !this.wrap;
      }
    });
    setU16(this.m, DESC_GPA + 16 * head + 14, headFlags);
    return head;
  }

  /** Writes one raw descriptor in slot `slot` (flags exactly as given). */
  raw(slot: number, d: Desc): void {
    writeDesc(this.m, DESC_GPA + 16 * slot, d, 'packed');
  }

  /** The descriptor in `slot` as the device left it. */
  slot(slot: number): { addr: number; len: number; id: number; flags: number } {
    const at = DESC_GPA + 16 * slot;
    return { addr: u32(this.m, at), len: u32(this.m, at + 8), id: u16(this.m, at + 12), flags: u16(this.m, at + 14) };
  }

  setDriverEvent(flags: number, offWrap = 0): void {
    setU16(this.m, DRIVER_GPA, offWrap);
    setU16(this.m, DRIVER_GPA + 2, flags);
  }

  get deviceEvent(): { offWrap: number; flags: number } {
    return { offWrap: u16(this.m, DEVICE_GPA), flags: u16(this.m, DEVICE_GPA + 2) };
  }
}

/** pop() that must return a chain. */
export function popChain(q: { pop(): DescriptorChain | VirtqueueError | null }): DescriptorChain {
  const r = q.pop();
  if (r === null) throw new Error('expected a chain, the queue is empty');
  if (r instanceof VirtqueueError) throw new Error(`expected a chain, got ${r.message}`);
  return r;
}
