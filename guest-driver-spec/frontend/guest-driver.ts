// The guest driver's side of a split virtqueue over the front-end's memfd guest RAM: just enough of a driver to
// post a request and read the answer through a real vhost-user back-end (the full driver kit with malformed rings
// lives in guest-driver-spec/testkit, over in-process memory).

import { descTableSize, splitAvailSize, splitUsedSize, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../vmm-device/virtqueue/constants.ts';
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
