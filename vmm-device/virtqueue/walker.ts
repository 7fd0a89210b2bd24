// Shared descriptor checks of the split and packed layouts: turning one descriptor into a chain segment, and
// opening an indirect table. Both layouts keep addr at bytes 0-7 and len at 8-11 of a 16-byte descriptor;
// they differ in where flags and the next index live, which the callers handle.

import { u64Address, type GuestMemory, type MemoryRegion } from '../memory/guest-memory.ts';
import { DESC_SIZE, MAX_SPLIT_QUEUE_SIZE } from '../abi/virtqueue.ts';
import { trimSegments, type ChainFill } from './chain.ts';
import { VirtqueueError } from './errors.ts';

/** The largest indirect table we accept, whatever the queue size (a chain never exceeds the queue size anyway). */
export const MAX_INDIRECT_TABLE_ENTRIES = MAX_SPLIT_QUEUE_SIZE;
const U32_MAX = 0xffff_ffff;

/**
 * A table of 16-byte descriptors readable as u32 and u16 words (little-endian host: checked in index.ts).
 * Descriptor i is u32 words base + 4i .. base + 4i + 3, u16 words 2 * base + 8i .. 2 * base + 8i + 7: an indirect
 * table is read in place through views of its whole memory region, so opening one allocates nothing.
 */
export interface DescTable {
  u32: Uint32Array;
  u16: Uint16Array;
  /** u32 word index of descriptor 0. */
  base: number;
  entries: number;
}

export function descTableOf(bytes: Uint8Array, entries: number): DescTable {
  return {
    u32: new Uint32Array(bytes.buffer, bytes.byteOffset, entries * 4),
    u16: new Uint16Array(bytes.buffer, bytes.byteOffset, entries * 8),
    base: 0,
    entries,
  };
}

/**
 * Accumulates the segments of one chain into a (pooled) chain object. Zero-length descriptors carry no bytes and
 * are left out of the segment list (they still count towards the chain length limit).
 */
export class ChainBuilder {
  private target: ChainFill | undefined = undefined;
  private segments: number[] = [];
  private n = 0;
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** A device-writable descriptor was seen (even one of length 0): no readable one may follow. */
  private seenWritable = false;

  /** Starts a new chain written into `target` (its segment array is reused). */
  begin(target: ChainFill): void {
    this.target = target;
    this.segments = target.segments;
    this.n = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.seenWritable = false;
  }

  /** Fills the target's fields from what was added. */
  finish(id: number, ringSlots: number): void {
    const c = this.target!;
    trimSegments(this.segments, this.n);
    c.id = id;
    c.ringSlots = ringSlots;
    c.readableCount = this.readableCount;
    c.readableBytes = this.readableBytes;
    c.writableBytes = this.writableBytes;
    this.target = undefined;
  }

  /** Adds descriptor `i` of `table` as a segment; returns an error for a bad buffer, else undefined. */
  add(memory: GuestMemory, table: DescTable, i: number, writable: boolean): VirtqueueError | undefined {
    const w = table.base + i * 4;
    const lo = table.u32[w]!;
    const hi = table.u32[w + 1]!;
    const len = table.u32[w + 2]!;
    const addr = u64Address(hi, lo, len);
    if (addr < 0) return new VirtqueueError('AddressOverflow', `descriptor ${i}: addr 0x${hex64(hi, lo)} + len ${len} wraps past 2^64`);
    if (writable) {
      this.seenWritable = true;
      if (this.writableBytes + len > U32_MAX) return lengthOverflow('writable');
      this.writableBytes += len;
    } else {
      if (this.seenWritable) {
        return new VirtqueueError('WritableBeforeReadable', `descriptor ${i} is device-readable after a device-writable one`);
      }
      if (this.readableBytes + len > U32_MAX) return lengthOverflow('readable');
      this.readableBytes += len;
    }
    if (len === 0) return undefined;
    if (!memory.isValidRange(addr, len)) {
      return new VirtqueueError('BufferOutsideGuestMemory', `descriptor ${i}: [0x${addr.toString(16)}, +${len}) is not guest memory`);
    }
    // Appends in order (n <= length), so the array never gets holes.
    this.segments[this.n] = addr;
    this.segments[this.n + 1] = len;
    this.n += 2;
    if (!writable) this.readableCount++;
    return undefined;
  }
}

function lengthOverflow(part: string): VirtqueueError {
  return new VirtqueueError('ChainLengthOverflow', `the ${part} part of the chain exceeds 2^32 - 1 bytes`);
}

export function hex64(hi: number, lo: number): string {
  return hi === 0 ? lo.toString(16) : hi.toString(16) + lo.toString(16).padStart(8, '0');
}

/**
 * Opens indirect tables for one queue. A table inside one region at a 4-byte aligned place is read in place through
 * u32/u16 views of that region (made once per region, kept for the last region used), in a DescTable object this
 * opener reuses: the table is valid until the next open(). A table crossing regions or oddly aligned is copied, so
 * a driver cannot make us read outside guest memory either way (that rare case allocates).
 */
export class IndirectTables {
  private region: MemoryRegion | undefined = undefined;
  private readonly table: DescTable = { u32: new Uint32Array(0), u16: new Uint16Array(0), base: 0, entries: 0 };

  constructor(private readonly memory: GuestMemory) {}

  /** Opens the table that descriptor `i` of `table` points at; `limit` is the most entries allowed. */
  open(table: DescTable, i: number, limit: number): DescTable | VirtqueueError {
    const w = table.base + i * 4;
    const lo = table.u32[w]!;
    const hi = table.u32[w + 1]!;
    const len = table.u32[w + 2]!;
    if (len === 0) return new VirtqueueError('IndirectTableEmpty', `descriptor ${i}: indirect table length 0`);
    if (len % DESC_SIZE !== 0) {
      return new VirtqueueError('IndirectTableMisaligned', `descriptor ${i}: indirect table length ${len} is not a multiple of 16`);
    }
    const entries = len / DESC_SIZE;
    if (entries > limit) {
      return new VirtqueueError('IndirectTableTooLarge', `descriptor ${i}: indirect table of ${entries} entries, limit ${limit}`);
    }
    const addr = u64Address(hi, lo, len);
    if (addr < 0) return new VirtqueueError('AddressOverflow', `descriptor ${i}: indirect table 0x${hex64(hi, lo)} + ${len} wraps past 2^64`);
    const memory = this.memory;
    const r = memory.findRegion(addr);
    if (r !== undefined) {
      const offset = addr - r.guestPhysAddr;
      // Region buffers start 8-byte aligned (REGION_ALIGNMENT), so offset alignment is buffer alignment.
      if (len <= r.size - offset && (offset & 3) === 0) {
        const t = this.table;
        if (this.region !== r || t.u32.length === 0) {
          t.u32 = new Uint32Array(r.buffer, r.bufferOffset, r.size >>> 2);
          t.u16 = new Uint16Array(r.buffer, r.bufferOffset, (r.size >>> 2) * 2);
          this.region = r;
        }
        t.base = offset >>> 2;
        t.entries = entries;
        return t;
      }
    }
    if (!memory.isValidRange(addr, len)) {
      return new VirtqueueError('BufferOutsideGuestMemory', `descriptor ${i}: indirect table [0x${addr.toString(16)}, +${len}) is not guest memory`);
    }
    const copy = new Uint8Array(len);
    memory.read(addr, copy);
    return descTableOf(copy, entries);
  }
}
