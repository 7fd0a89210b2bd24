// The driver side of a split virtqueue (virtio 1.2 section 2.7) in the guest RAM of a real QEMU, written and
// read through qtest: descriptor table, available ring and used ring laid out in guest RAM, buffers placed in
// guest RAM, chains made available in order, used elements read back with the bytes the device wrote.
// Every guest RAM access is a qtest command, processed in order by QEMU, so program order is memory order here.

import type { QtestClient } from './qtest-client.ts';
import type { GuestRam } from './guest-ram.ts';

export const DESC_BYTES = 16;
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
/** Split queue sizes are powers of two up to this (section 2.7). */
export const MAX_QUEUE_SIZE = 32768;
/** Largest single buffer this driver places (one qtest transfer). */
export const MAX_BUFFER_BYTES = 1 << 20;

export interface UsedBuffer {
  /** Head descriptor index of the chain. */
  id: number;
  /** Bytes the device says it wrote. */
  len: number;
  /** The device-writable buffers' bytes, concatenated, the first `len` of them (clamped to their total size). */
  written: Uint8Array;
}

interface InFlight {
  descs: number[];
  writable: { addr: number; length: number }[];
}

export class QtestSplitQueue {
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  /** Set by the device driver when the queue is set up. */
  notifyAddress: number | undefined;
  private availIdx = 0;
  private lastUsedIdx = 0;
  private readonly freeDescs: number[];
  private readonly inFlight = new Map<number, InFlight>();

  constructor(
    readonly qtest: QtestClient,
    readonly index: number,
    readonly size: number,
    readonly ram: GuestRam,
  ) {
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RangeError(`split queue size ${size} must be a power of two in 1..${MAX_QUEUE_SIZE}`);
    }
    // Alignments of section 2.7: descriptor table 16, available ring 2, used ring 4.
    this.descAddr = ram.alloc(DESC_BYTES * size, 16);
    this.availAddr = ram.alloc(6 + 2 * size, 2);
    this.usedAddr = ram.alloc(6 + 8 * size, 4);
    this.freeDescs = Array.from({ length: size }, (_, i) => i);
  }

  get freeCount(): number {
    return this.freeDescs.length;
  }

  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** Zeroes the three rings (the state a freshly reset device expects). */
  async clear(): Promise<void> {
    await this.qtest.memset(this.descAddr, DESC_BYTES * this.size, 0);
    await this.qtest.memset(this.availAddr, 6 + 2 * this.size, 0);
    await this.qtest.memset(this.usedAddr, 6 + 8 * this.size, 0);
    this.availIdx = 0;
    this.lastUsedIdx = 0;
  }

  /**
   * Places `readable` buffers (device reads them) then writable buffers of `writableLengths` bytes (device writes
   * them) in guest RAM, chains them, and publishes the chain in the available ring. Returns the head index.
   * Does not notify: call the device's notify() (a test may batch several chains per kick). The buffers come from
   * `ram` (default: the queue's own allocator; another one places them elsewhere, in a hot-added DIMM say).
   */
  async add(readable: readonly Uint8Array[], writableLengths: readonly number[] = [], ram: GuestRam = this.ram): Promise<number> {
    const count = readable.length + writableLengths.length;
    if (count === 0) throw new RangeError('a chain needs at least one buffer');
    if (count > this.freeDescs.length) throw new RangeError(`${count} descriptors wanted, ${this.freeDescs.length} free`);
    const descs = this.freeDescs.splice(0, count);
    const writable: InFlight['writable'] = [];
    const segments: { addr: number; length: number; write: boolean }[] = [];
    for (const bytes of readable) {
      if (bytes.length < 1 || bytes.length > MAX_BUFFER_BYTES) throw new RangeError(`buffer of ${bytes.length} bytes`);
      const addr = ram.alloc(bytes.length, 8);
      await this.qtest.write(addr, bytes);
      segments.push({ addr, length: bytes.length, write: false });
    }
    for (const length of writableLengths) {
      if (!Number.isInteger(length) || length < 1 || length > MAX_BUFFER_BYTES) throw new RangeError(`buffer of ${length} bytes`);
      const addr = ram.alloc(length, 8);
      await this.qtest.memset(addr, length, 0);
      segments.push({ addr, length, write: true });
      writable.push({ addr, length });
    }
    const table = new Uint8Array(DESC_BYTES);
    const view = new DataView(table.buffer);
    for (let i = 0; i < count; i++) {
      const segment = segments[i]!;
      const last = i === count - 1;
      view.setBigUint64(0, BigInt(segment.addr), true);
      view.setUint32(8, segment.length, true);
      view.setUint16(12, (last ? 0 : VIRTQ_DESC_F_NEXT) | (segment.write ? VIRTQ_DESC_F_WRITE : 0), true);
      view.setUint16(14, last ? 0 : descs[i + 1]!, true);
      await this.qtest.write(this.descAddr + DESC_BYTES * descs[i]!, table);
    }
    const head = descs[0]!;
    this.inFlight.set(head, { descs, writable });
    // The ring entry first, then the index that publishes it (section 2.7.13).
    await this.qtest.writew(this.availAddr + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    await this.qtest.writew(this.availAddr + 2, this.availIdx);
    return head;
  }

  async usedIdx(): Promise<number> {
    return this.qtest.readw(this.usedAddr + 2);
  }

  async availFlags(): Promise<number> {
    return this.qtest.readw(this.availAddr);
  }

  /** Sets VIRTQ_AVAIL_F_NO_INTERRUPT (1) or clears it. */
  async setNoInterrupt(on: boolean): Promise<void> {
    await this.qtest.writew(this.availAddr, on ? 1 : 0);
  }

  /** Used elements the device returned since the last call, with the bytes it wrote; frees their descriptors. */
  async takeUsed(): Promise<UsedBuffer[]> {
    const usedIdx = await this.usedIdx();
    const pending = (usedIdx - this.lastUsedIdx) & 0xffff;
    if (pending > this.size) throw new Error(`queue ${this.index}: used.idx ${usedIdx} is ${pending} ahead of ${this.lastUsedIdx}`);
    const out: UsedBuffer[] = [];
    for (let n = 0; n < pending; n++) {
      const slot = this.usedAddr + 4 + 8 * (this.lastUsedIdx % this.size);
      const id = await this.qtest.readl(slot);
      const len = await this.qtest.readl(slot + 4);
      const chain = this.inFlight.get(id);
      if (chain === undefined) throw new Error(`queue ${this.index}: the device returned id ${id}, which is not in flight`);
      this.inFlight.delete(id);
      this.freeDescs.push(...chain.descs);
      const total = chain.writable.reduce((sum, w) => sum + w.length, 0);
      const written = new Uint8Array(Math.min(len, total));
      let filled = 0;
      for (const w of chain.writable) {
        if (filled >= written.length) break;
        const take = Math.min(w.length, written.length - filled);
        written.set(await this.qtest.read(w.addr, take), filled);
        filled += take;
      }
      out.push({ id, len, written });
      this.lastUsedIdx = (this.lastUsedIdx + 1) & 0xffff;
    }
    return out;
  }

  /** Polls the used ring until at least `count` elements came back; rejects after `timeoutMs`. */
  async waitUsed(count = 1, timeoutMs = 5000): Promise<UsedBuffer[]> {
    const deadline = Date.now() + timeoutMs;
    const got: UsedBuffer[] = [];
    for (;;) {
      got.push(...(await this.takeUsed()));
      if (got.length >= count) return got;
      if (Date.now() > deadline) {
        throw new Error(`queue ${this.index}: ${got.length} of ${count} used elements within ${timeoutMs} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  }
}
