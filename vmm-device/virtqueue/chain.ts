// A descriptor chain as the device sees it: a device-readable part followed by a device-writable part, each a
// list of guest-physical segments. The queue validated every segment against guest memory when it popped the
// chain and copied the descriptor values, so a driver rewriting the descriptor table afterwards changes nothing.
// ChainReader and ChainWriter are cursors over the two parts: a device reads a request and writes a response
// without knowing how the driver cut them into descriptors.

import type { GuestMemory } from '../memory/guest-memory.ts';
import { ChainBoundsError } from './errors.ts';

export class DescriptorChain {
  /**
   * Split ring: index of the head descriptor. Packed ring: the buffer id. Either way the value the used
   * element carries back to the driver.
   */
  readonly id: number;
  /** Ring slots the chain occupied (packed: descriptors in the ring, an indirect one counting 1; split: 1). */
  readonly ringSlots: number;
  /** Segments as flat [addr0, len0, addr1, len1, ...]: the first `readableCount` are device-readable. */
  readonly segments: readonly number[];
  readonly readableCount: number;
  readonly readableBytes: number;
  readonly writableBytes: number;
  readonly memory: GuestMemory;

  constructor(
    memory: GuestMemory,
    id: number,
    ringSlots: number,
    segments: number[],
    readableCount: number,
    readableBytes: number,
    writableBytes: number,
  ) {
    this.memory = memory;
    this.id = id;
    this.ringSlots = ringSlots;
    this.segments = segments;
    this.readableCount = readableCount;
    this.readableBytes = readableBytes;
    this.writableBytes = writableBytes;
  }

  get segmentCount(): number {
    return this.segments.length >> 1;
  }

  /** The segments as objects (for tests, fixtures and debugging; the hot path uses `segments`). */
  describe(): { addr: number; len: number; write: boolean }[] {
    const out = [];
    for (let i = 0; i < this.segmentCount; i++) {
      out.push({ addr: this.segments[2 * i]!, len: this.segments[2 * i + 1]!, write: i >= this.readableCount });
    }
    return out;
  }

  reader(): ChainReader {
    return new ChainReader(this);
  }

  writer(): ChainWriter {
    return new ChainWriter(this);
  }
}

/** A cursor over the segments of a chain from `first` on, `total` bytes long. */
abstract class ChainCursor {
  protected seg: number;
  protected segOffset = 0;
  protected done = 0;

  constructor(
    protected readonly chain: DescriptorChain,
    first: number,
    readonly total: number,
  ) {
    this.seg = first;
  }

  /** Bytes not yet consumed. */
  get remaining(): number {
    return this.total - this.done;
  }

  /** Bytes consumed so far. */
  get position(): number {
    return this.done;
  }

  /** Moves over n bytes, calling `fn(gpa, start, count)` for each contiguous guest-physical piece. */
  protected walk(n: number, what: string, fn: (gpa: number, start: number, count: number) => void): void {
    if (n > this.remaining) {
      throw new ChainBoundsError(`${what} of ${n} bytes at offset ${this.done}, only ${this.remaining} left`);
    }
    const segs = this.chain.segments;
    let moved = 0;
    while (moved < n) {
      const addr = segs[2 * this.seg]!;
      const len = segs[2 * this.seg + 1]!;
      const count = Math.min(n - moved, len - this.segOffset);
      if (count > 0) fn(addr + this.segOffset, moved, count);
      moved += count;
      this.segOffset += count;
      if (this.segOffset === len) {
        this.seg++;
        this.segOffset = 0;
      }
    }
    this.done += n;
  }

  /** Skips n bytes. */
  skip(n: number): void {
    this.walk(n, 'skip', () => {});
  }
}

/** Reads the device-readable part of a chain, front to back. */
export class ChainReader extends ChainCursor {
  constructor(chain: DescriptorChain) {
    super(chain, 0, chain.readableBytes);
  }

  /** Copies the next dest.length bytes into dest. */
  readInto(dest: Uint8Array): void {
    const mem = this.chain.memory;
    this.walk(dest.length, 'read', (gpa, start, count) => mem.read(gpa, dest.subarray(start, start + count)));
  }

  /** Returns a copy of the next n bytes. */
  read(n: number): Uint8Array {
    const out = new Uint8Array(n);
    this.readInto(out);
    return out;
  }

  /** Reads the next n bytes as a DataView (a copy), for decoding a fixed-layout structure. */
  readView(n: number): DataView {
    const b = this.read(n);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }
}

/** Writes the device-writable part of a chain, front to back. `position` is the used length to report. */
export class ChainWriter extends ChainCursor {
  constructor(chain: DescriptorChain) {
    super(chain, chain.readableCount, chain.writableBytes);
  }

  write(src: Uint8Array): void {
    const mem = this.chain.memory;
    this.walk(src.length, 'write', (gpa, start, count) => mem.write(gpa, src.subarray(start, start + count)));
  }
}
