// A descriptor chain as the device sees it: a device-readable part followed by a device-writable part, each a
// list of guest-physical segments. The queue validated every segment against guest memory when it popped the
// chain and copied the descriptor values, so a driver rewriting the descriptor table afterwards changes nothing.
// ChainReader and ChainWriter are cursors over the two parts: a device reads a request and writes a response
// without knowing how the driver cut them into descriptors.
//
// Lifetime. A queue reuses its chain objects so that pop and pushUsed allocate nothing: pushUsed(chain) hands the
// object back to the queue that popped it, and a later pop() of that queue refills it. A device may hold a chain
// as long as it likes (across awaits, until it answers), but must not touch it (or its `segments`) once it has
// pushed it. A chain that is never pushed (a reset while it was held) is simply dropped to the garbage collector.

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
  /** The pool this object returns to when pushed (undefined: a chain made outside a queue, never reused). */
  pool: ChainPool | undefined = undefined;
  /** Popped and not yet pushed: pushUsed returns the object to its pool only once, whatever the caller does. */
  live = false;
  /** The next free chain while the object sits in its pool. */
  nextFree: DescriptorChain | undefined = undefined;

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

/** The fields a queue fills in when it walks a chain into a pooled object (the public type keeps them readonly). */
export interface ChainFill {
  id: number;
  ringSlots: number;
  segments: number[];
  readableCount: number;
  readableBytes: number;
  writableBytes: number;
}

/**
 * A queue's free chain objects, a singly linked list. The queue walks each new chain into `spare()` (the head of
 * the list, made when the list is empty) and unlinks it with `take()` only once the chain proved valid, so a
 * failed walk costs nothing either. At most `limit` objects are kept: a queue never has more chains in flight than
 * its size, and chains of another queue (an inflight resubmission walked by a probe queue) are never kept.
 */
export class ChainPool {
  private free: DescriptorChain | undefined = undefined;
  private count = 0;

  constructor(
    private readonly memory: GuestMemory,
    private readonly limit: number,
  ) {}

  /** The object the next chain is walked into; stays in the pool until take(). */
  spare(): ChainFill {
    let c = this.free;
    if (c === undefined) {
      c = new DescriptorChain(this.memory, 0, 1, [], 0, 0, 0);
      c.pool = this;
      this.free = c;
      this.count = 1;
    }
    return c as unknown as ChainFill;
  }

  /** Unlinks the spare object, now holding a valid chain, and marks it held by the device. */
  take(): DescriptorChain {
    const c = this.free!;
    this.free = c.nextFree;
    c.nextFree = undefined;
    c.live = true;
    this.count--;
    return c;
  }

  /** Returns a pushed chain. Not ours, pushed twice, or the pool full: left alone. */
  give(c: DescriptorChain): void {
    if (c.pool !== this || !c.live) return;
    c.live = false;
    if (this.count >= this.limit) return;
    c.nextFree = this.free;
    this.free = c;
    this.count++;
  }
}

/** Sets the length of a reused segment array (only when it changes: most chains of a queue have one shape). */
export function trimSegments(segments: number[], n: number): void {
  if (segments.length !== n) segments.length = n;
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
