// Raw descriptor encoding (virtio 1.2 sections 2.7.5 and 2.8.13), shared by both drivers, the fixture recorder and
// the fixture decoder. Addresses are bigint here: a malformed case may put any u64 in a descriptor (2^64 - 1, an
// address that overflows with its length), which a JS number cannot hold exactly.

import {
  DESC_SIZE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
} from '../../vmm-device/abi/virtqueue.ts';
import type { TestGuestMemory } from './test-memory.ts';

export type Layout = 'split' | 'packed';

/** A descriptor as it is in memory. Split uses `next`; packed uses `id` (the other one is written as 0). */
export interface RawDescriptor {
  addr: bigint | number;
  len: number;
  flags: number;
  next?: number;
  id?: number;
}

export interface DecodedDescriptor {
  addr: bigint;
  len: number;
  flags: number;
  /** Split: next index. Packed: buffer id. */
  nextOrId: number;
}

const U64_MASK = (1n << 64n) - 1n;

export function encodeDescriptor(layout: Layout, d: RawDescriptor): Uint8Array {
  const out = new Uint8Array(DESC_SIZE);
  const v = new DataView(out.buffer);
  v.setBigUint64(0, BigInt(d.addr) & U64_MASK, true);
  v.setUint32(8, d.len >>> 0, true);
  if (layout === 'split') {
    v.setUint16(12, d.flags & 0xffff, true);
    v.setUint16(14, (d.next ?? 0) & 0xffff, true);
  } else {
    v.setUint16(12, (d.id ?? 0) & 0xffff, true);
    v.setUint16(14, d.flags & 0xffff, true);
  }
  return out;
}

export function decodeDescriptor(layout: Layout, bytes: Uint8Array, offset = 0): DecodedDescriptor {
  const v = new DataView(bytes.buffer, bytes.byteOffset + offset, DESC_SIZE);
  const addr = v.getBigUint64(0, true);
  const len = v.getUint32(8, true);
  if (layout === 'split') return { addr, len, flags: v.getUint16(12, true), nextOrId: v.getUint16(14, true) };
  return { addr, len, flags: v.getUint16(14, true), nextOrId: v.getUint16(12, true) };
}

/** Flag names, e.g. "NEXT|WRITE|AVAIL". */
export function describeFlags(flags: number): string {
  const names: string[] = [];
  const known: [number, string][] = [
    [VIRTQ_DESC_F_NEXT, 'NEXT'],
    [VIRTQ_DESC_F_WRITE, 'WRITE'],
    [VIRTQ_DESC_F_INDIRECT, 'INDIRECT'],
    [VIRTQ_DESC_F_AVAIL, 'AVAIL'],
    [VIRTQ_DESC_F_USED, 'USED'],
  ];
  let rest = flags;
  for (const [bit, name] of known) {
    if (flags & bit) {
      names.push(name);
      rest &= ~bit;
    }
  }
  if (rest !== 0) names.push('0x' + rest.toString(16));
  return names.length > 0 ? names.join('|') : '-';
}

/** What the device must see for one descriptor of a chain. */
export interface ExpectedSegment {
  addr: number;
  len: number;
  write: boolean;
}

/** A buffer the driver wants in a chain. */
export interface BufferSpec {
  len: number;
  /** Device-writable. */
  write?: boolean;
  /** Explicit guest physical address (any u64, e.g. outside guest memory); allocated by the kit when absent. */
  addr?: bigint | number;
  /** Place the buffer across a boundary between two adjacent regions. */
  cross?: boolean;
}

export interface ChainSpec {
  buffers: readonly BufferSpec[];
  /** Put the buffers in an indirect table (one INDIRECT descriptor in the ring). */
  indirect?: boolean;
  /** Packed: the buffer id to use (any u16, even out of range); the kit picks a free one when absent. */
  id?: number;
}

/** What the kit built: everything a test (or a fixture) expects the device to report. */
export interface BuiltChain {
  /** Split: head descriptor index. Packed: buffer id. The id the used element must carry. */
  id: number;
  /** Ring slots the chain occupies (split: 1 head; packed: descriptors in the ring). */
  ringSlots: number;
  segments: ExpectedSegment[];
  /** Payload written into each device-readable segment (in segment order), for checking what the device read. */
  payload: Uint8Array[];
  /** Split: descriptor indices used in the table. Packed: ring slots used. */
  descriptors: number[];
  /** Guest physical address of the indirect table, if any. */
  indirectTable?: number;
}

/** A chain's buffers in guest memory: where each one is, what the device must report, what was written. */
export interface PlacedBuffers {
  /** Address of each buffer, in spec order. */
  addrs: (bigint | number)[];
  segments: ExpectedSegment[];
  /** Payload written into each device-readable buffer (in segment order). */
  payload: Uint8Array[];
}

/**
 * Places a chain's buffers (both layouts do it alike): a buffer with an explicit address is used as given; any
 * other is allocated (across a region boundary when asked) and, when device-readable, filled with random payload.
 */
export function placeBuffers(mem: TestGuestMemory, buffers: readonly BufferSpec[]): PlacedBuffers {
  const out: PlacedBuffers = { addrs: [], segments: [], payload: [] };
  for (const b of buffers) {
    let addr: bigint | number;
    if (b.addr !== undefined) {
      addr = b.addr;
    } else {
      addr = b.cross ? mem.allocCrossing(b.len) : mem.alloc(b.len, { align: 1 });
      if (!b.write) out.payload.push(mem.fillRandom(addr, b.len));
    }
    out.addrs.push(addr);
    out.segments.push({ addr: Number(addr), len: b.len, write: b.write ?? false });
  }
  return out;
}

/** Allocates an indirect table in `mem` and writes `entries` into it in `layout`'s descriptor format. */
export function writeIndirectTable(mem: TestGuestMemory, layout: Layout, entries: readonly RawDescriptor[], region?: number): number {
  const addr = mem.alloc(DESC_SIZE * Math.max(1, entries.length), { align: 16, ...(region !== undefined ? { region } : {}) });
  entries.forEach((d, i) => mem.write(addr + DESC_SIZE * i, encodeDescriptor(layout, d)));
  return addr;
}

/** Writable segments of a built chain total this many bytes. */
export function writableBytes(chain: BuiltChain): number {
  return chain.segments.filter((s) => s.write).reduce((n, s) => n + s.len, 0);
}
