// Every way a driver can break a virtqueue, built on purpose. Each case makes exactly ONE defect available (the
// rest of the chain is well formed) and names the error kind a conforming device must report for it, so that
// the expectation never depends on which of two defects a device happens to check first.

import type { VirtqueueErrorKind } from '../../vmm-device/virtqueue/errors.ts';
import { DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../vmm-device/abi/virtqueue.ts';
import type { Layout, RawDescriptor } from './descriptors.ts';
import { PackedDriver } from './packed-driver.ts';
import { SplitDriver } from './split-driver.ts';

export type VirtqDriver = SplitDriver | PackedDriver;

/** Queue size of the ChainLengthOverflow case: a chain of (nearly) this many descriptors over one shared buffer. */
export const OVERFLOW_CHAIN_QUEUE_SIZE = 1024;
/** Length of each descriptor of a chain of n descriptors so that the chain totals more than 2^32 - 1 bytes. */
export function overflowBufferLen(n: number): number {
  return Math.floor(0x1_0000_0000 / n) + 1;
}
/** Region size that holds the shared buffer of a ChainLengthOverflow chain of at least 1000 descriptors. */
export const OVERFLOW_CHAIN_REGION_SIZE = 0x48_0000;
/** An address that overflows 2^64 with OVERFLOW_LEN: 2^64 - 0x800. */
export const OVERFLOWING_ADDR = (1n << 64n) - 0x800n;
export const OVERFLOW_LEN = 0x1000;

export interface MalformedCase {
  name: string;
  kind: VirtqueueErrorKind;
  layouts: readonly Layout[];
  /** Which VIRTIO_F_INDIRECT_DESC setting the case needs; either works when absent. */
  indirect?: boolean;
  /** Largest queue size the case works with (or the exact size it needs, with exactSize). */
  maxSize?: number;
  exactSize?: number;
  /** Smallest region size (bytes) the case's buffers need. */
  minRegionSize?: number;
  description: string;
  /** Writes the defective chain and makes it available. */
  build(d: VirtqDriver): void;
}

/** A readable or writable buffer of `len` bytes at a fresh address. */
function buf(d: VirtqDriver, len: number, write = false): RawDescriptor {
  const addr = d.mem.alloc(len, { align: 1 });
  if (!write) d.mem.fillRandom(addr, len);
  return { addr, len, flags: write ? VIRTQ_DESC_F_WRITE : 0 };
}

/**
 * Split: writes `descs` at fresh indices linked in order (NEXT set on all but the last unless a descriptor's flags
 * already decide), and publishes the head. `links` overrides next pointers: links[i] = index into the chain or
 * a raw descriptor index (as {raw: n}).
 */
function splitChain(d: SplitDriver, descs: RawDescriptor[], links: Record<number, number | { raw: number }> = {}): number[] {
  const idx = descs.map(() => d.takeDescriptor());
  descs.forEach((desc, i) => {
    const link = links[i];
    const next = link === undefined ? (i + 1 < descs.length ? idx[i + 1]! : 0) : typeof link === 'number' ? idx[link]! : link.raw;
    const flags = link !== undefined || i + 1 < descs.length ? desc.flags | VIRTQ_DESC_F_NEXT : desc.flags;
    d.writeDescriptor(idx[i]!, { ...desc, flags, next });
  });
  d.publish(idx[0]!);
  return idx;
}

/** Split indirect table entries linked 0 -> 1 -> ... (NEXT on all but the last). */
function linkedTable(descs: RawDescriptor[]): RawDescriptor[] {
  return descs.map((desc, i) => ({ ...desc, flags: desc.flags | (i + 1 < descs.length ? VIRTQ_DESC_F_NEXT : 0), next: i + 1 < descs.length ? i + 1 : 0 }));
}

function writeTable(d: VirtqDriver, entries: RawDescriptor[]): number {
  return d instanceof SplitDriver ? d.writeIndirectTable(linkedTable(entries)) : d.writeIndirectTable(entries);
}

/** Makes a one-descriptor chain available whose descriptor is `desc` (INDIRECT etc. as given). */
function single(d: VirtqDriver, desc: RawDescriptor): void {
  if (d instanceof SplitDriver) splitChain(d, [desc]);
  else d.writeRawChain([{ ...desc, id: desc.id ?? d.takeId() }]);
}

/** Makes a direct chain of `descs` available (split: linked; packed: consecutive slots with NEXT). */
function direct(d: VirtqDriver, descs: RawDescriptor[]): void {
  if (d instanceof SplitDriver) splitChain(d, descs);
  else {
    const id = d.takeId();
    d.writeRawChain(descs.map((x, i) => ({ ...x, id, flags: x.flags | (i + 1 < descs.length ? VIRTQ_DESC_F_NEXT : 0) })));
  }
}

function indirectDesc(table: number, entries: number): RawDescriptor {
  return { addr: table, len: DESC_SIZE * entries, flags: VIRTQ_DESC_F_INDIRECT };
}

export const MALFORMED_CASES: readonly MalformedCase[] = [
  {
    name: 'looped-chain',
    kind: 'ChainTooLong',
    layouts: ['split', 'packed'],
    maxSize: 256,
    description: 'split: descriptor A NEXT B, B NEXT A (a loop); packed: every slot of the ring available with NEXT set',
    build(d) {
      if (d instanceof SplitDriver) {
        splitChain(d, [buf(d, 32), buf(d, 48)], { 1: 0 });
      } else {
        const id = d.takeId();
        const descs = Array.from({ length: d.freeSlots }, () => ({ ...buf(d, 16), id, flags: VIRTQ_DESC_F_NEXT }));
        d.writeRawChain(descs);
      }
    },
  },
  {
    name: 'indirect-looped-chain',
    kind: 'ChainTooLong',
    layouts: ['split'],
    indirect: true,
    description: 'an indirect table of 2 entries where entry 1 links back to entry 0',
    build(d) {
      const entries = linkedTable([buf(d, 40), buf(d, 40)]);
      entries[1] = { ...entries[1]!, flags: entries[1]!.flags | VIRTQ_DESC_F_NEXT, next: 0 };
      const table = (d as SplitDriver).writeIndirectTable(entries);
      single(d, indirectDesc(table, 2));
    },
  },
  {
    name: 'head-index-out-of-range',
    kind: 'DescriptorIndexOutOfRange',
    layouts: ['split'],
    description: 'the available ring names head index = queue size',
    build(d) {
      const s = d as SplitDriver;
      s.writeAvailEntry(s.availIdx, s.size);
      s.setAvailIdx(s.availIdx + 1);
    },
  },
  {
    name: 'next-index-out-of-range',
    kind: 'DescriptorIndexOutOfRange',
    layouts: ['split'],
    description: 'a descriptor with NEXT whose next index is queue size + 3',
    build(d) {
      const s = d as SplitDriver;
      splitChain(s, [buf(d, 64), buf(d, 64)], { 1: { raw: s.size + 3 } });
    },
  },
  {
    name: 'indirect-next-out-of-range',
    kind: 'DescriptorIndexOutOfRange',
    layouts: ['split'],
    indirect: true,
    description: 'an indirect table of 2 entries whose entry 0 links to entry 5',
    build(d) {
      const entries = linkedTable([buf(d, 24), buf(d, 24)]);
      entries[0] = { ...entries[0]!, next: 5 };
      single(d, indirectDesc((d as SplitDriver).writeIndirectTable(entries), 2));
    },
  },
  {
    name: 'buffer-id-out-of-range',
    kind: 'DescriptorIndexOutOfRange',
    layouts: ['packed'],
    description: 'a one-descriptor chain whose buffer id is the queue size',
    build(d) {
      const p = d as PackedDriver;
      p.writeRawChain([{ ...buf(d, 64), id: p.size }]);
    },
  },
  {
    name: 'nested-indirect',
    kind: 'NestedIndirect',
    layouts: ['split', 'packed'],
    indirect: true,
    description: 'an indirect table whose second entry is itself INDIRECT (pointing at a valid table)',
    build(d) {
      const inner = writeTable(d, [buf(d, 32)]);
      const outer = writeTable(d, [buf(d, 32), indirectDesc(inner, 1)]);
      single(d, indirectDesc(outer, 2));
    },
  },
  {
    name: 'indirect-with-next',
    kind: 'IndirectWithNext',
    layouts: ['split', 'packed'],
    indirect: true,
    description: 'an INDIRECT descriptor that also has NEXT set (followed by a valid descriptor)',
    build(d) {
      const table = writeTable(d, [buf(d, 32), buf(d, 32, true)]);
      direct(d, [indirectDesc(table, 2), buf(d, 16, true)]);
    },
  },
  {
    name: 'indirect-table-empty',
    kind: 'IndirectTableEmpty',
    layouts: ['split', 'packed'],
    indirect: true,
    description: 'an INDIRECT descriptor of length 0 (its address is valid memory)',
    build(d) {
      const table = writeTable(d, [buf(d, 32)]);
      single(d, { addr: table, len: 0, flags: VIRTQ_DESC_F_INDIRECT });
    },
  },
  {
    name: 'indirect-table-misaligned',
    kind: 'IndirectTableMisaligned',
    layouts: ['split', 'packed'],
    indirect: true,
    description: 'an INDIRECT descriptor of length 24 (not a multiple of 16) over a valid 2-entry table',
    build(d) {
      const table = writeTable(d, [buf(d, 32), buf(d, 32)]);
      single(d, { addr: table, len: 24, flags: VIRTQ_DESC_F_INDIRECT });
    },
  },
  {
    name: 'indirect-table-too-large',
    kind: 'IndirectTableTooLarge',
    layouts: ['split', 'packed'],
    indirect: true,
    maxSize: 64,
    description: 'a well-formed indirect table of queue size + 1 entries',
    build(d) {
      const entries = Array.from({ length: d.size + 1 }, () => buf(d, 8));
      single(d, indirectDesc(writeTable(d, entries), d.size + 1));
    },
  },
  {
    name: 'indirect-not-negotiated',
    kind: 'IndirectNotNegotiated',
    layouts: ['split', 'packed'],
    indirect: false,
    description: 'a well-formed indirect chain although VIRTIO_F_INDIRECT_DESC was not negotiated',
    build(d) {
      const table = writeTable(d, [buf(d, 32), buf(d, 64, true)]);
      single(d, indirectDesc(table, 2));
    },
  },
  {
    name: 'writable-before-readable',
    kind: 'WritableBeforeReadable',
    layouts: ['split', 'packed'],
    description: 'a direct chain: device-readable, device-writable, then device-readable again',
    build(d) {
      direct(d, [buf(d, 32), buf(d, 32, true), buf(d, 32)]);
    },
  },
  {
    name: 'indirect-writable-before-readable',
    kind: 'WritableBeforeReadable',
    layouts: ['split', 'packed'],
    indirect: true,
    description: 'an indirect table: device-writable entry followed by a device-readable one',
    build(d) {
      single(d, indirectDesc(writeTable(d, [buf(d, 32, true), buf(d, 32)]), 2));
    },
  },
  {
    name: 'buffer-in-hole',
    kind: 'BufferOutsideGuestMemory',
    layouts: ['split', 'packed'],
    description: 'the second buffer of a chain lies in a hole between regions (or above all of them)',
    build(d) {
      direct(d, [buf(d, 32), { addr: d.mem.hole(256), len: 256, flags: VIRTQ_DESC_F_WRITE }]);
    },
  },
  {
    name: 'buffer-runs-past-region',
    kind: 'BufferOutsideGuestMemory',
    layouts: ['split', 'packed'],
    description: 'a buffer that starts 16 bytes before the end of the highest region and runs 48 bytes past it',
    build(d) {
      const top = [...d.mem.plans].sort((a, b) => b.gpa + b.size - (a.gpa + a.size))[0]!;
      direct(d, [{ addr: top.gpa + top.size - 16, len: 64, flags: 0 }]);
    },
  },
  {
    name: 'indirect-table-outside-memory',
    kind: 'BufferOutsideGuestMemory',
    layouts: ['split', 'packed'],
    indirect: true,
    description: 'an INDIRECT descriptor whose 2-entry table lies in a hole',
    build(d) {
      single(d, indirectDesc(d.mem.hole(64), 2));
    },
  },
  {
    name: 'address-overflow',
    kind: 'AddressOverflow',
    layouts: ['split', 'packed'],
    description: 'a buffer at 2^64 - 0x800 of length 0x1000 (addr + len wraps past 2^64)',
    build(d) {
      direct(d, [buf(d, 16), { addr: OVERFLOWING_ADDR, len: OVERFLOW_LEN, flags: VIRTQ_DESC_F_WRITE }]);
    },
  },
  {
    name: 'avail-index-jump',
    kind: 'AvailIndexJump',
    layouts: ['split'],
    description: 'avail.idx set to the device position + queue size + 1 (more entries than the ring holds)',
    build(d) {
      const s = d as SplitDriver;
      s.setAvailIdx(s.availIdx + s.size + 1);
    },
  },
  {
    name: 'chain-length-overflow',
    kind: 'ChainLengthOverflow',
    layouts: ['split', 'packed'],
    exactSize: OVERFLOW_CHAIN_QUEUE_SIZE,
    minRegionSize: OVERFLOW_CHAIN_REGION_SIZE,
    description: `every free descriptor of a ${OVERFLOW_CHAIN_QUEUE_SIZE}-entry queue in one readable chain, all naming one shared buffer, totalling just over 2^32 - 1 bytes`,
    build(d) {
      const n = d instanceof SplitDriver ? d.freeDescriptorCount : d.freeSlots;
      const len = overflowBufferLen(n);
      const addr = d.mem.alloc(len, { align: 8 });
      direct(d, Array.from({ length: n }, () => ({ addr, len, flags: 0 })));
    },
  },
];

/** The cases that apply to a layout and a setting of VIRTIO_F_INDIRECT_DESC. */
export function malformedCasesFor(layout: Layout, indirect: boolean): MalformedCase[] {
  return MALFORMED_CASES.filter((c) => c.layouts.includes(layout) && (c.indirect === undefined || c.indirect === indirect));
}
