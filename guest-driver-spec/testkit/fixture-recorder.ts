// Records a fixture from what the test kit BUILT, never from a device's output: the chains the device must see
// are the chains the driver made available, the used elements are the ones the script pushes, and the
// notification decisions follow the virtio rules from the driver's suppression state. A device implementation
// is then checked against the recording (fixture-replay.ts), with no circularity.

import {
  DESC_SIZE,
  PACKED_EVENT_SIZE,
  RING_EVENT_FLAGS_DESC,
  descTableSize,
  splitAvailSize,
  splitUsedSize,
} from '../../vmm-device/abi/virtqueue.ts';
import type { VirtqueueErrorKind } from '../../vmm-device/virtqueue/errors.ts';
import type { BuiltChain } from './descriptors.ts';
import { chunksOf, FIXTURE_FORMAT, toHex, type Fixture, type FixturePosition, type FixtureStep } from './fixture-format.ts';
import { PackedDriver, type RingPosition } from './packed-driver.ts';
import { SplitDriver } from './split-driver.ts';
import type { TestGuestMemory } from './test-memory.ts';

export type AnyDriver = SplitDriver | PackedDriver;

export class FixtureRecorder {
  private readonly steps: FixtureStep[] = [];
  private initial: Fixture['memory'] | undefined;
  private writes: { gpa: number; bytes: Uint8Array }[] = [];
  /** Chains made available and not yet popped (in ring order). */
  private readonly pending: BuiltChain[] = [];
  /** Chains popped, in pop order (the index a pushUsed step names). */
  private readonly popped: BuiltChain[] = [];
  private readonly pushed = new Set<number>();
  /** Used elements pushed and not yet checked. */
  private unchecked: { id: number; len: number; slots: number }[] = [];
  /** The simulated device used position (split: used idx; packed: slot + wrap). */
  private deviceUsed: RingPosition;
  /** Where the driver reads used elements from next. */
  private driverUsed: RingPosition;
  /** Device used position at the last needsNotification() call, and at the last one that returned true. */
  private lastNotifyCall: RingPosition;
  private lastNotifyTrue: RingPosition;

  constructor(
    readonly name: string,
    readonly description: string,
    readonly seed: number,
    readonly mem: TestGuestMemory,
    readonly driver: AnyDriver,
  ) {
    const start = driver instanceof SplitDriver ? { pos: driver.startIndex, wrap: false } : { ...driver.start };
    this.deviceUsed = { ...start };
    this.driverUsed = { ...start };
    this.lastNotifyCall = { ...start };
    this.lastNotifyTrue = { ...start };
  }

  /** The simulated device's used position (split: pos is the used index). */
  get deviceUsedPosition(): RingPosition {
    return { ...this.deviceUsed };
  }

  /** Freezes the initial memory image; driver writes from here on become `write` steps. */
  begin(): this {
    this.initial = this.mem.plans.map((p, i) => ({ gpa: p.gpa, size: p.size, chunks: chunksOf(this.mem.regionBytes(i)) }));
    this.mem.onWrite((gpa, bytes) => this.writes.push({ gpa, bytes }));
    return this;
  }

  /** Notes chains the driver made available (before or after begin()), in the order they were made available. */
  available(...chains: BuiltChain[]): this {
    this.pending.push(...chains);
    return this;
  }

  /** Turns the driver writes collected since the last step into write steps (consecutive contiguous ones merged). */
  private flushWrites(): void {
    let cur: { gpa: number; parts: Uint8Array[]; len: number } | undefined;
    const emit = (): void => {
      if (cur === undefined) return;
      this.steps.push({ op: 'write', gpa: cur.gpa, hex: toHex(Buffer.concat(cur.parts)) });
      cur = undefined;
    };
    for (const w of this.writes) {
      if (cur !== undefined && cur.gpa + cur.len === w.gpa) {
        cur.parts.push(w.bytes);
        cur.len += w.bytes.length;
      } else {
        emit();
        cur = { gpa: w.gpa, parts: [w.bytes], len: w.bytes.length };
      }
    }
    emit();
    this.writes = [];
  }

  private step(s: FixtureStep): this {
    if (this.initial === undefined) throw new Error('FixtureRecorder: call begin() first');
    this.flushWrites();
    this.steps.push(s);
    return this;
  }

  /** The device pops the next available chain. */
  pop(): BuiltChain {
    const c = this.pending.shift();
    if (c === undefined) throw new Error(`${this.name}: pop() with nothing available`);
    this.popped.push(c);
    this.step({ op: 'pop', expect: { chain: { id: c.id, ringSlots: c.ringSlots, segments: c.segments.map((s) => ({ ...s })) } } });
    return c;
  }

  popAll(): BuiltChain[] {
    const out: BuiltChain[] = [];
    while (this.pending.length > 0) out.push(this.pop());
    return out;
  }

  popEmpty(): this {
    if (this.pending.length > 0) throw new Error(`${this.name}: popEmpty() with chains available`);
    return this.step({ op: 'pop', expect: { empty: true } });
  }

  /** The device pops and must get this error; the queue is then broken. */
  popError(kind: VirtqueueErrorKind): this {
    this.step({ op: 'pop', expect: { error: kind } });
    return this.step({ op: 'broken', expect: kind });
  }

  notBroken(): this {
    return this.step({ op: 'broken', expect: null });
  }

  /** Expects hasAvailable(): true when chains are pending or the driver made a malformed one available. */
  hasAvailable(malformedPending = false): this {
    return this.step({ op: 'hasAvailable', expect: malformedPending || this.pending.length > 0 });
  }

  inFlight(): this {
    return this.step({ op: 'inFlight', expect: this.popped.length - this.pushed.size });
  }

  private advance(p: RingPosition, n: number): RingPosition {
    if (this.driver instanceof SplitDriver) return { pos: (p.pos + n) & 0xffff, wrap: false };
    return this.driver.advance(p, n);
  }

  /** The device returns popped chain #k (pop order) with `len` bytes written. */
  pushUsed(k: number, len: number): this {
    const c = this.popped[k];
    if (c === undefined || this.pushed.has(k)) throw new Error(`${this.name}: pushUsed(${k}) of a chain not in flight`);
    this.pushed.add(k);
    this.unchecked.push({ id: c.id, len, slots: c.ringSlots });
    this.deviceUsed = this.advance(this.deviceUsed, this.driver instanceof SplitDriver ? 1 : c.ringSlots);
    return this.step({ op: 'pushUsed', chain: k, len });
  }

  private interruptWanted(from: RingPosition, to: RingPosition): boolean {
    const d = this.driver;
    return d instanceof SplitDriver ? d.interruptWanted(from.pos, to.pos) : d.interruptWanted(from, to);
  }

  /**
   * Expects the notification decision the driver's suppression state asks for over the used elements pushed since
   * the last call. Devices differ on whether "since the last call" means the last call or the last call that
   * returned true; a scenario where the two disagree is refused, so the fixture holds for both.
   */
  /** needsNotification() has not been called yet. */
  private firstNotify = true;

  /**
   * True when the driver's current suppression leaves the decision to the device: the two readings of "since the
   * last call" disagree (see needsNotification), or this is the queue's first decision under an event index and
   * the index was not passed (QEMU notifies anyway, as it does not know what was signalled before a resume;
   * a strict device does not; both are allowed).
   */
  get notificationAmbiguous(): boolean {
    const sinceCall = this.interruptWanted(this.lastNotifyCall, this.deviceUsed);
    if (sinceCall !== this.interruptWanted(this.lastNotifyTrue, this.deviceUsed)) return true;
    return this.firstNotify && !sinceCall && this.eventIndexDecides();
  }

  /** The decision comes from used_event (split) or a DESC driver event (packed), not from a flag. */
  private eventIndexDecides(): boolean {
    const d = this.driver;
    if (!d.eventIdx) return false;
    return d instanceof SplitDriver || d.driverEvent.flags === RING_EVENT_FLAGS_DESC;
  }

  needsNotification(): this {
    const sinceCall = this.interruptWanted(this.lastNotifyCall, this.deviceUsed);
    const sinceTrue = this.interruptWanted(this.lastNotifyTrue, this.deviceUsed);
    if (this.notificationAmbiguous) throw new Error(`${this.name}: needsNotification left to the device (last call ${sinceCall}, last true ${sinceTrue}, first ${this.firstNotify})`);
    this.firstNotify = false;
    if (this.lastNotifyCall.pos === this.deviceUsed.pos && this.lastNotifyCall.wrap === this.deviceUsed.wrap) {
      throw new Error(`${this.name}: needsNotification with nothing pushed since the last call (implementation-defined)`);
    }
    this.lastNotifyCall = { ...this.deviceUsed };
    if (sinceCall) this.lastNotifyTrue = { ...this.deviceUsed };
    return this.step({ op: 'needsNotification', expect: sinceCall });
  }

  private position(p: RingPosition): FixturePosition {
    return this.driver instanceof SplitDriver ? { idx: p.pos } : { pos: p.pos, wrap: p.wrap };
  }

  private driverNext(): RingPosition {
    const d = this.driver;
    return d instanceof SplitDriver ? { pos: d.availIdx, wrap: false } : { ...d.next };
  }

  /** The driver reads the used elements pushed since the last check (and reclaims their descriptors). */
  checkUsed(): this {
    const from = this.position(this.driverUsed);
    const isSplit = this.driver instanceof SplitDriver;
    const expect = this.unchecked.map((e) => (isSplit ? { id: e.id, len: e.len } : { ...e }));
    for (const e of this.unchecked) {
      this.driver.reclaim(e.id);
      this.driverUsed = this.advance(this.driverUsed, isSplit ? 1 : e.slots);
    }
    if (this.driver instanceof SplitDriver) this.driver.lastUsedIdx = this.driverUsed.pos;
    else this.driver.used = { ...this.driverUsed };
    this.unchecked = [];
    return this.step({ op: 'checkUsed', from, expect });
  }

  /** Notifications off: without EVENT_IDX a driver must then not kick (with it, devices may leave avail_event). */
  disableNotifications(): this {
    if (this.driver.eventIdx) return this.step({ op: 'disableNotifications' });
    return this.step({ op: 'disableNotifications', driverKick: { at: this.position(this.driverNext()), expect: false } });
  }

  /** Notifications on: returns whether chains are pending; when none is, the driver's next buffer must be kicked. */
  enableNotifications(): this {
    const more = this.pending.length > 0;
    if (more) return this.step({ op: 'enableNotifications', expect: true });
    return this.step({ op: 'enableNotifications', expect: false, driverKick: { at: this.position(this.driverNext()), expect: true } });
  }

  /** The fixture, with the queue configuration of the driver. */
  finish(): Fixture {
    if (this.initial === undefined) throw new Error('FixtureRecorder: call begin() first');
    this.flushWrites();
    this.mem.onWrite(undefined);
    const d = this.driver;
    const queue: Fixture['queue'] =
      d instanceof SplitDriver
        ? { layout: 'split', size: d.size, desc: d.descAddr, driver: d.availAddr, device: d.usedAddr, eventIdx: d.eventIdx, indirect: d.indirect, state: d.state }
        : { layout: 'packed', size: d.size, desc: d.descAddr, driver: d.driverEventAddr, device: d.deviceEventAddr, eventIdx: d.eventIdx, indirect: d.indirect, state: d.state };
    return { format: FIXTURE_FORMAT, name: this.name, description: this.description, seed: this.seed, queue, memory: this.initial, steps: this.steps };
  }
}

/** Bytes each ring area of a fixture's queue occupies (for decoders and guards). */
export function ringAreaSizes(layout: 'split' | 'packed', size: number): { desc: number; driver: number; device: number } {
  return layout === 'split'
    ? { desc: descTableSize(size), driver: splitAvailSize(size), device: splitUsedSize(size) }
    : { desc: DESC_SIZE * size, driver: PACKED_EVENT_SIZE, device: PACKED_EVENT_SIZE };
}
