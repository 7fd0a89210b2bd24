// Guest memory as a guest process owns it: a virtual address range (the iova that MRs and work requests use) backed
// by guest physical pages that need not be contiguous. This is what a page list describes (spec section 8.2): the
// driver registers the pages in order, and the device finds byte k of the range at page[j] + (o mod page size)
// with o = (iova mod page size) + k and j = o >> page_shift.
//
// Rings (CQ, SQ, RQ) are GuestBuffers too: the page list of CREATE_CQ and CREATE_QP is the ring's pages.

import { Limits } from '../../vmm-device/abi/rdma/index.ts';
import type { AllocatableRange, DriverMemory } from './memory.ts';

/** Where the driver's made-up guest virtual addresses start (a user-space address, like an mmap of a process). */
export const GUEST_VA_BASE = 0x7f00_0000_0000n;

/** Hands out guest virtual ranges, page aligned, never reused (a fresh address for each buffer). */
export class VirtualAddressSpace {
  private next: bigint;
  constructor(base = GUEST_VA_BASE) {
    this.next = base;
  }
  reserve(bytes: number, pageShift: number): bigint {
    const page = 1n << BigInt(pageShift);
    const at = ((this.next + page - 1n) / page) * page;
    // One unmapped page between ranges, so an access past the end of one never lands in the next.
    this.next = at + ((BigInt(bytes) + page - 1n) / page) * page + page;
    return at;
  }
}

export interface GuestBufferOptions {
  /** Offset of the first byte inside its first page (an MR that does not start on a page boundary). */
  pageOffset?: number;
  /** log2 of the page size (default 12: 4 KiB). */
  pageShift?: number;
  /**
   * 'contiguous' (default): one block of guest physical pages, iova = its guest physical address (what the
   * vrdma-backend device can register: it answers NOT_SUPPORTED for pages that are not contiguous in its mapping).
   * 'scattered': each page allocated on its own and the list handed out in an order that is not the address order,
   * as a guest process's pages are; section 8.2 allows it and the driver's rings use it.
   */
  placement?: 'scattered' | 'contiguous';
  /** Every page inside this guest-physical range (a hot-added DIMM, say); default: anywhere in guest RAM. */
  within?: AllocatableRange;
}

export class GuestBuffer {
  private released = false;

  private constructor(
    private readonly mem: DriverMemory,
    /** Address of byte 0 in the guest's virtual address space (the iova of an MR over the whole buffer). */
    readonly iova: bigint,
    readonly length: number,
    readonly pageShift: number,
    /** Guest physical address of each page, in the order of the bytes they hold. */
    readonly pages: readonly bigint[],
    private readonly allocations: readonly number[],
  ) {}

  static allocate(mem: DriverMemory, vas: VirtualAddressSpace, length: number, options: GuestBufferOptions = {}): GuestBuffer {
    const pageShift = options.pageShift ?? Limits.MIN_PAGE_SHIFT;
    const pageSize = 2 ** pageShift;
    const pageOffset = options.pageOffset ?? 0;
    if (!Number.isSafeInteger(length) || length < 1) throw new RangeError(`buffer of ${length} bytes`);
    if (!Number.isInteger(pageOffset) || pageOffset < 0 || pageOffset >= pageSize) throw new RangeError(`page offset ${pageOffset}`);
    const count = Math.ceil((pageOffset + length) / pageSize);
    if ((options.placement ?? 'contiguous') === 'contiguous') {
      const gpa = mem.allocZeroed(count * pageSize, pageSize, options.within);
      const pages = Array.from({ length: count }, (_, i) => BigInt(gpa + i * pageSize));
      return new GuestBuffer(mem, BigInt(gpa + pageOffset), length, pageShift, pages, [gpa]);
    }
    const allocations: number[] = [];
    try {
      for (let i = 0; i < count; i++) allocations.push(mem.allocZeroed(pageSize, pageSize, options.within));
    } catch (e) {
      for (const a of allocations) mem.release(a);
      throw e;
    }
    // Pages in an order other than their addresses: pairs swapped (page 0 at the second address, and so on).
    const order = allocations.map((_, i) => (i % 2 === 0 ? Math.min(i + 1, count - 1) : i - 1));
    const pages = order.map((k) => BigInt(allocations[k]!));
    const iova = vas.reserve(pageOffset + length, pageShift) + BigInt(pageOffset);
    return new GuestBuffer(mem, iova, length, pageShift, pages, allocations);
  }

  get pageSize(): number {
    return 2 ** this.pageShift;
  }

  /** Offset of byte 0 inside its first page. */
  get pageOffset(): number {
    return Number(this.iova & BigInt(this.pageSize - 1));
  }

  /** Guest physical address of byte `offset`. */
  gpaOf(offset: number): number {
    if (offset < 0 || offset >= this.length) throw new RangeError(`offset ${offset} outside the ${this.length}-byte buffer`);
    const o = this.pageOffset + offset;
    return Number(this.pages[Math.floor(o / this.pageSize)]!) + (o % this.pageSize);
  }

  /** Address (iova) of byte `offset`, for SGEs and remote addresses. */
  addr(offset = 0): bigint {
    return this.iova + BigInt(offset);
  }

  private walk(offset: number, length: number, fn: (gpa: number, at: number, n: number) => void): void {
    if (this.released) throw new RangeError('buffer released');
    if (offset < 0 || length < 0 || offset + length > this.length) {
      throw new RangeError(`[${offset}, +${length}) outside the ${this.length}-byte buffer`);
    }
    let done = 0;
    while (done < length) {
      const gpa = this.gpaOf(offset + done);
      const o = this.pageOffset + offset + done;
      const n = Math.min(length - done, this.pageSize - (o % this.pageSize));
      fn(gpa, done, n);
      done += n;
    }
  }

  write(offset: number, bytes: Uint8Array): void {
    this.walk(offset, bytes.byteLength, (gpa, at, n) => this.mem.write(gpa, bytes.subarray(at, at + n)));
  }

  read(offset = 0, length = this.length - offset): Uint8Array {
    const out = new Uint8Array(length);
    this.walk(offset, length, (gpa, at, n) => out.set(this.mem.read(gpa, n), at));
    return out;
  }

  fill(value: number, offset = 0, length = this.length - offset): void {
    this.walk(offset, length, (gpa, _at, n) => this.mem.fill(gpa, n, value));
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    for (const a of this.allocations) this.mem.release(a);
  }
}
