// Shared descriptor checks of the split and packed layouts: turning one descriptor into a chain segment, and
// opening an indirect table. Both layouts keep addr at bytes 0-7 and len at 8-11 of a 16-byte descriptor;
// they differ in where flags and the next index live, which the callers handle.

import { u64Address, type GuestMemory } from '../memory/guest-memory.ts';
import { DESC_SIZE, MAX_SPLIT_QUEUE_SIZE } from '../abi/virtqueue.ts';
import { VirtqueueError } from './errors.ts';

/** The largest indirect table we accept, whatever the queue size (a chain never exceeds the queue size anyway). */
export const MAX_INDIRECT_TABLE_ENTRIES = MAX_SPLIT_QUEUE_SIZE;
const U32_MAX = 0xffff_ffff;

/** A table of 16-byte descriptors readable as u32 and u16 words (little-endian host: checked in index.ts). */
export interface DescTable {
  u32: Uint32Array;
  u16: Uint16Array;
  entries: number;
}

export function descTableOf(bytes: Uint8Array, entries: number): DescTable {
  return {
    u32: new Uint32Array(bytes.buffer, bytes.byteOffset, entries * 4),
    u16: new Uint16Array(bytes.buffer, bytes.byteOffset, entries * 8),
    entries,
  };
}

/**
 * Accumulates the segments of one chain. Zero-length descriptors carry no bytes and are left out of the segment
 * list (they still count towards the chain length limit).
 */
export class ChainBuilder {
  segments: number[] = [];
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** A device-writable descriptor was seen (even one of length 0): no readable one may follow. */
  private seenWritable = false;

  /** Starts a new chain. */
  begin(): void {
    this.segments = [];
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.seenWritable = false;
  }

  /** Adds descriptor `i` of `table` as a segment; returns an error for a bad buffer, else undefined. */
  add(memory: GuestMemory, table: DescTable, i: number, writable: boolean): VirtqueueError | undefined {
    const lo = table.u32[i * 4]!;
    const hi = table.u32[i * 4 + 1]!;
    const len = table.u32[i * 4 + 2]!;
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
    this.segments.push(addr, len);
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
 * Opens the indirect table that descriptor `i` of `table` points at. `limit` is the most entries allowed.
 * A table inside one region is viewed in place when 4-byte aligned; otherwise (crossing regions, or odd
 * alignment) it is copied, so a driver cannot make us read outside guest memory either way.
 */
export function openIndirectTable(
  memory: GuestMemory,
  table: DescTable,
  i: number,
  limit: number,
): DescTable | VirtqueueError {
  const lo = table.u32[i * 4]!;
  const hi = table.u32[i * 4 + 1]!;
  const len = table.u32[i * 4 + 2]!;
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
  const view = memory.contiguous(addr, len);
  if (view !== undefined && (view.byteOffset & 3) === 0) return descTableOf(view, entries);
  if (!memory.isValidRange(addr, len)) {
    return new VirtqueueError('BufferOutsideGuestMemory', `descriptor ${i}: indirect table [0x${addr.toString(16)}, +${len}) is not guest memory`);
  }
  const copy = new Uint8Array(len);
  memory.read(addr, copy);
  return descTableOf(copy, entries);
}
