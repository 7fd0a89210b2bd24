// The guest driver's side of a split virtqueue over the front-end's memfd guest RAM: just enough of a driver to
// post a request and read the answer through a real vhost-user back-end (the full driver kit with malformed rings
// lives in guest-driver-spec/testkit, over in-process memory).

import {
  PACKED_EVENT_SIZE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
} from '../../vmm-device/abi/virtqueue.ts';
import type { GuestRam } from './guest-ram.ts';

/** A bump allocator over guest RAM (guest physical addresses). */
export class GuestAllocator {
  private next: number;
  private readonly end: number;

  constructor(
    readonly ram: GuestRam,
    region = 0,
  ) {
    const r = ram.regions[region];
    if (r === undefined) throw new RangeError(`no RAM region ${region}`);
    this.next = r.gpa;
    this.end = r.gpa + r.size;
  }

  alloc(len: number, align = 16): number {
    const at = Math.ceil(this.next / align) * align;
    if (at + len > this.end) throw new RangeError(`guest RAM region full (${len} bytes wanted)`);
    this.next = at + len;
    return at;
  }
}

export interface SplitRingAddrs {
  desc: number;
  avail: number;
  used: number;
}

export class SplitRingDriver {
  readonly addrs: SplitRingAddrs;
  private availIdx: number;
  private lastUsed: number;
  private nextDesc = 0;

  constructor(
    private readonly ram: GuestRam,
    alloc: GuestAllocator,
    readonly size: number,
    startIndex = 0,
  ) {
    this.addrs = {
      desc: alloc.alloc(descTableSize(size), 16),
      avail: alloc.alloc(splitAvailSize(size), 2),
      used: alloc.alloc(splitUsedSize(size), 4),
    };
    this.availIdx = startIndex & 0xffff;
    this.lastUsed = startIndex & 0xffff;
    this.u16(this.addrs.avail + 2, this.availIdx);
    this.u16(this.addrs.used + 2, this.availIdx);
  }

  private view(gpa: number, len: number): DataView {
    const v = this.ram.memory.contiguous(gpa, len);
    if (v === undefined) throw new RangeError(`[0x${gpa.toString(16)}, +${len}) is not guest RAM`);
    return new DataView(v.buffer, v.byteOffset, len);
  }
  private u16(gpa: number, value: number): void {
    this.view(gpa, 2).setUint16(0, value, true);
  }

  /** Writes a descriptor (any values: tests build broken rings with it). */
  writeDescriptor(index: number, addr: number | bigint, len: number, flags: number, next: number): void {
    const dv = this.view(this.addrs.desc + 16 * index, 16);
    dv.setBigUint64(0, BigInt(addr), true);
    dv.setUint32(8, len >>> 0, true);
    dv.setUint16(12, flags, true);
    dv.setUint16(14, next, true);
  }

  /** Posts one chain: a readable buffer with `request`, then a writable buffer of `responseLen`. Returns the head. */
  post(alloc: GuestAllocator, request: Uint8Array, responseLen: number): { head: number; responseAddr: number } {
    const reqAddr = alloc.alloc(request.length, 8);
    this.ram.memory.write(reqAddr, request);
    const respAddr = alloc.alloc(responseLen, 8);
    const head = this.nextDesc % this.size;
    const second = (this.nextDesc + 1) % this.size;
    this.nextDesc = (this.nextDesc + 2) % this.size;
    this.writeDescriptor(second, respAddr, responseLen, VIRTQ_DESC_F_WRITE, 0);
    this.writeDescriptor(head, reqAddr, request.length, VIRTQ_DESC_F_NEXT, second);
    this.publish(head);
    return { head, responseAddr: respAddr };
  }

  /** avail.ring[idx] = head, then avail.idx + 1 (an Atomics store: the release of a real driver). */
  publish(head: number): void {
    this.u16(this.addrs.avail + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    const v = this.ram.memory.contiguous(this.addrs.avail, 4)!;
    Atomics.store(new Uint16Array(v.buffer, v.byteOffset, 2), 1, this.availIdx);
  }

  /** Used elements added since the last call. */
  readUsed(): { id: number; len: number }[] {
    const v = this.ram.memory.contiguous(this.addrs.used, splitUsedSize(this.size))!;
    const idx = Atomics.load(new Uint16Array(v.buffer, v.byteOffset, 2), 1);
    const out: { id: number; len: number }[] = [];
    const dv = new DataView(v.buffer, v.byteOffset, v.byteLength);
    while (this.lastUsed !== idx) {
      const at = 4 + 8 * (this.lastUsed % this.size);
      out.push({ id: dv.getUint32(at, true), len: dv.getUint32(at + 4, true) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }
}

/** Bit 15 of a packed ring's vhost-user base (SET/GET_VRING_BASE): the wrap counter of the position in bits 0..14. */
export const PACKED_BASE_WRAP = 1 << 15;
/** Bytes of one packed descriptor: addr u64, len u32, id u16, flags u16. */
const PACKED_DESC_SIZE = 16;

/**
 * The guest driver's side of a packed virtqueue (virtio 1.2 section 2.8) over the front-end's guest RAM: posts
 * request/response chains of two descriptors, reads used descriptors. Its three areas go on the wire in the
 * places of the split ring's (descriptor ring, driver event area, device event area).
 */
export class PackedRingDriver {
  readonly addrs: SplitRingAddrs;
  private nextAvail: number;
  private availWrap: boolean;
  private nextUsed: number;
  private usedWrap: boolean;
  private nextId = 0;
  /** Ring slots of each buffer id in flight (the device skips as many when it marks the buffer used). */
  private readonly slotsOf = new Map<number, number>();

  /**
   * A ring whose driver starts at `start.index` with wrap counter `start.wrap` (default 0, true: a new ring), as if
   * every descriptor before had been made available and used.
   */
  constructor(
    private readonly ram: GuestRam,
    alloc: GuestAllocator,
    readonly size: number,
    start: { index: number; wrap: boolean } = { index: 0, wrap: true },
  ) {
    this.addrs = {
      desc: alloc.alloc(descTableSize(size), 16),
      avail: alloc.alloc(PACKED_EVENT_SIZE, 4),
      used: alloc.alloc(PACKED_EVENT_SIZE, 4),
    };
    this.nextAvail = this.nextUsed = start.index;
    this.availWrap = this.usedWrap = start.wrap;
    // Descriptors before the start were used in this lap, the others in the previous one (lap 0: never written).
    const usedIn = (wrap: boolean): number => (wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0);
    for (let i = 0; i < size; i++) this.flagsWord(i).setUint16(0, usedIn(i < start.index ? start.wrap : !start.wrap), true);
  }

  /** The vhost-user base of the driver's next available position (what SET_VRING_BASE resumes from). */
  get base(): number {
    return this.nextAvail | (this.availWrap ? PACKED_BASE_WRAP : 0);
  }

  private flagsWord(index: number): DataView {
    const v = this.ram.memory.contiguous(this.addrs.desc + PACKED_DESC_SIZE * index + 14, 2);
    if (v === undefined) throw new RangeError('descriptor ring is not guest RAM');
    return new DataView(v.buffer, v.byteOffset, 2);
  }

  private availFlags(wrap: boolean): number {
    return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
  }

  private writeDescriptor(index: number, addr: number, len: number, id: number): void {
    const v = this.ram.memory.contiguous(this.addrs.desc + PACKED_DESC_SIZE * index, PACKED_DESC_SIZE)!;
    const dv = new DataView(v.buffer, v.byteOffset, PACKED_DESC_SIZE);
    dv.setBigUint64(0, BigInt(addr), true);
    dv.setUint32(8, len >>> 0, true);
    dv.setUint16(12, id, true);
  }

  /** Posts a readable buffer with `request` and a writable one of `responseLen`; returns the buffer id. */
  post(alloc: GuestAllocator, request: Uint8Array, responseLen: number): { id: number; responseAddr: number } {
    const reqAddr = alloc.alloc(request.length, 8);
    this.ram.memory.write(reqAddr, request);
    const respAddr = alloc.alloc(responseLen, 8);
    const id = this.nextId;
    this.nextId = (this.nextId + 1) % this.size;
    const first = this.nextAvail;
    const firstWrap = this.availWrap;
    let second = first + 1;
    let secondWrap = firstWrap;
    if (second === this.size) {
      second = 0;
      secondWrap = !secondWrap;
    }
    this.writeDescriptor(first, reqAddr, request.length, id);
    this.writeDescriptor(second, respAddr, responseLen, id);
    this.flagsWord(second).setUint16(0, VIRTQ_DESC_F_WRITE | this.availFlags(secondWrap), true);
    // The head's flags last, with a sequentially consistent store: the release that publishes the chain.
    const head = this.ram.memory.contiguous(this.addrs.desc + PACKED_DESC_SIZE * first, PACKED_DESC_SIZE)!;
    Atomics.store(new Uint16Array(head.buffer, head.byteOffset, 8), 7, VIRTQ_DESC_F_NEXT | this.availFlags(firstWrap));
    this.nextAvail = second + 1;
    this.availWrap = secondWrap;
    if (this.nextAvail === this.size) {
      this.nextAvail = 0;
      this.availWrap = !this.availWrap;
    }
    this.slotsOf.set(id, 2);
    return { id, responseAddr: respAddr };
  }

  /** Buffers the device marked used since the last call. */
  readUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    for (;;) {
      const v = this.ram.memory.contiguous(this.addrs.desc + PACKED_DESC_SIZE * this.nextUsed, PACKED_DESC_SIZE)!;
      const flags = Atomics.load(new Uint16Array(v.buffer, v.byteOffset, 8), 7); // acquire: id and len after
      const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
      const used = (flags & VIRTQ_DESC_F_USED) !== 0;
      if (avail !== this.usedWrap || used !== this.usedWrap) break;
      const dv = new DataView(v.buffer, v.byteOffset, PACKED_DESC_SIZE);
      const id = dv.getUint16(12, true);
      const slots = this.slotsOf.get(id);
      if (slots === undefined) throw new RangeError(`the device used buffer id ${id}, which is not in flight`);
      this.slotsOf.delete(id);
      out.push({ id, len: dv.getUint32(8, true) });
      this.nextUsed += slots;
      if (this.nextUsed >= this.size) {
        this.nextUsed -= this.size;
        this.usedWrap = !this.usedWrap;
      }
    }
    return out;
  }
}
