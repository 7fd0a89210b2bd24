// The mapped half of the verbs test double (spec section 13): host queue buffers another process maps, and a
// DoorbellEngine. FakeVerbs (fake-verbs.ts) uses it for createMappedCq/createMappedQp/createDoorbellEngine.
//
// A queue buffer is a memfd of its own (fdOffset 0) holding an rxe-shaped header (log2_elem_size at 0, index_mask at
// 4, producer_index at 128, consumer_index at 256) and its slots, so a test can map it as a VMM would and read what
// the "host" wrote. The engine's doorbell pages are a memfd the double maps itself: `scan()` plays the native
// thread's pass over the attached slots (executed when a slot's value differs from the one it acted on last), and
// failures are injectable. Nothing here moves data: tests of the real data path run on rxe0.

import * as sys from '../native/sys.ts';
import type * as hv from './host-verbs.ts';
import { VerbsError } from './host-verbs.ts';

export const FAKE_PAGE = 4096;
/** rxe: struct rxe_queue_buf is 384 bytes (spec 13.4). */
export const FAKE_RXE_HEADER = 384;
/** Slots in one 4096-byte doorbell page (spec 13.6). */
export const SLOTS_PER_DOORBELL_PAGE = 512;

function pow2AtLeast(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** rxe's queue geometry: slots a power of two above the depth, elements a power of two of at least 64 bytes. */
export function rxeGeometry(depth: number, elemBytes: number): { numSlots: number; slotSize: number; size: bigint } {
  const numSlots = pow2AtLeast(depth + 1);
  const slotSize = pow2AtLeast(Math.max(64, elemBytes));
  const bytes = FAKE_RXE_HEADER + numSlots * slotSize;
  return { numSlots, slotSize, size: BigInt(Math.ceil(bytes / FAKE_PAGE) * FAKE_PAGE) };
}

/** A memfd-backed queue buffer with its rxe header written; close() frees it. */
export class FakeQueueBuffer implements hv.HostQueueBuffer {
  readonly fd: number;
  readonly fdOffset = 0n;
  readonly size: bigint;
  readonly numSlots: number;
  readonly slotSize: number;
  private closed = false;

  constructor(name: string, depth: number, elemBytes: number) {
    const g = rxeGeometry(depth, elemBytes);
    this.size = g.size;
    this.numSlots = g.numSlots;
    this.slotSize = g.slotSize;
    this.fd = sys.memfdCreate(name, Number(g.size));
    const view = sys.mmap(this.fd, 0, FAKE_PAGE, true);
    const dv = new DataView(view);
    dv.setUint32(0, Math.log2(this.slotSize), true);
    dv.setUint32(4, this.numSlots - 1, true);
    sys.munmap(view);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.close(this.fd);
  }
}

/** What a test may do to the double's engines. */
export interface FakeEngineControl {
  /** The next `n` doorbells the engine executes are refused by the "host" (counted as refused). */
  refuseNext(n: number): void;
}

/** The test double of the native doorbell thread. */
export class FakeDoorbellEngine implements hv.DoorbellEngine, FakeEngineControl {
  readonly fd: number;
  readonly size: bigint;
  readonly wake: hv.DoorbellWake;
  /** What the device asked of it, in order: a test asserts ordering (attach, ring, detach, close). */
  readonly calls: string[] = [];
  wakeFd: number | undefined;
  closed = false;
  private readonly view: DataView;
  private readonly buffer: ArrayBuffer;
  private readonly slots = new Map<number, { qp: hv.MappedQpHandle; last: number; executed: bigint; refused: bigint }>();
  private refuse = 0;
  private readonly slotCount: number;

  constructor(options: hv.DoorbellEngineOptions) {
    this.slotCount = options.pages * SLOTS_PER_DOORBELL_PAGE;
    this.size = BigInt(options.pages * FAKE_PAGE);
    this.wake = options.wake;
    this.fd = sys.memfdCreate('fake-doorbells', options.pages * FAKE_PAGE);
    this.buffer = sys.mmap(this.fd, 0, options.pages * FAKE_PAGE, true);
    this.view = new DataView(this.buffer);
  }

  private check(verb: string, slot: number): void {
    if (this.closed) throw new VerbsError(verb, 'EBADF', 'the doorbell engine is closed');
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.slotCount) throw new VerbsError(verb, 'EINVAL', `slot ${slot} is outside 0..${this.slotCount - 1}`);
  }

  private slotValue(slot: number): number {
    return this.view.getUint32(slot * 8, true);
  }

  attach(slot: number, qp: hv.MappedQpHandle): void {
    this.check('doorbell_attach', slot);
    if (this.slots.has(slot)) throw new VerbsError('doorbell_attach', 'EBUSY', `slot ${slot} is attached`);
    this.calls.push(`attach ${slot} qp ${qp.id}`);
    this.slots.set(slot, { qp, last: this.slotValue(slot), executed: 0n, refused: 0n });
  }

  detach(slot: number): void {
    this.check('doorbell_detach', slot);
    this.calls.push(`detach ${slot}`);
    this.slots.delete(slot);
  }

  ring(slot: number): void {
    this.check('doorbell_ring', slot);
    this.calls.push(`ring ${slot}`);
    const s = this.slots.get(slot);
    if (s !== undefined) this.execute(s);
  }

  setWakeFd(fd: number | undefined): void {
    if (this.closed) throw new VerbsError('doorbell_wake', 'EBADF', 'the doorbell engine is closed');
    this.calls.push(fd === undefined ? 'wake none' : 'wake fd');
    if (this.wakeFd !== undefined) sys.close(this.wakeFd);
    this.wakeFd = fd;
  }

  counters(slot: number): { executed: bigint; refused: bigint } {
    const s = this.slots.get(slot);
    return { executed: s?.executed ?? 0n, refused: s?.refused ?? 0n };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.calls.push('close');
    this.closed = true;
    this.slots.clear();
    if (this.wakeFd !== undefined) sys.close(this.wakeFd);
    this.wakeFd = undefined;
    sys.munmap(this.buffer);
    sys.close(this.fd);
  }

  // ---- the test's side

  refuseNext(n: number): void {
    this.refuse += n;
  }

  /** One pass of the "thread": executes each attached slot whose value changed; returns how many it executed. */
  scan(): number {
    if (this.closed) return 0;
    let n = 0;
    for (const [slot, s] of this.slots) {
      const v = this.slotValue(slot);
      if (v === s.last) continue;
      s.last = v;
      this.execute(s);
      n++;
    }
    return n;
  }

  /** Writes slot `slot` as the guest would (a test without a VMM mapping). */
  store(slot: number, value: number): void {
    this.view.setUint32(slot * 8, value >>> 0, true);
  }

  get attached(): number {
    return this.slots.size;
  }

  private execute(s: { executed: bigint; refused: bigint }): void {
    if (this.refuse > 0) {
      this.refuse--;
      s.refused++;
    } else s.executed++;
  }
}
