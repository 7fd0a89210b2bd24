// Inflight tracking of a packed ring (vhost-user.rst "Inflight I/O tracking", QueueRegionPacked). The region (QueueRegionPacked) keeps a copy of every descriptor the back-end took from the ring,
// in entries linked into a free list; a chain in flight is a run of entries off the free list whose head says how
// many (num), where the run ends (last) and when it was taken (counter). Every update is first made to the working
// fields (free_head, used_idx, used_wrap_counter) and then committed to the old_* copies, so a restart can tell a
// half-done pop or push from a finished one.

import type { GuestMemory } from '../../memory/guest-memory.ts';
import { DescriptorChain, PACKED_EVENT_SIZE, PackedQueue, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VirtqueueError, descTableSize } from '../../virtqueue/index.ts';
import type { DeviceQueue } from '../../virtqueue/queue.ts';
import { DESC_STATE, INFLIGHT_VERSION, OFF_DESC_NUM, OFF_VERSION, REGION_HEADER, TWO_POW_32 } from './inflight-layout.ts';
import { InflightQueue } from './inflight-queue.ts';

/** Header offsets of QueueRegionPacked (version and desc_num as in the split layout). */
const PK_FREE_HEAD = 12;
const PK_OLD_FREE_HEAD = 14;
const PK_USED_IDX = 16;
const PK_OLD_USED_IDX = 18;
const PK_USED_WRAP = 20;
const PK_OLD_USED_WRAP = 21;
/** DescStatePacked i at REGION_HEADER + DESC_STATE * i. */
const PD_INFLIGHT = 0;
const PD_NEXT = 2;
const PD_LAST = 4;
const PD_NUM = 6;
const PD_COUNTER = 8;
const PD_ID = 16;
const PD_FLAGS = 18;
const PD_LEN = 20;
const PD_ADDR = 24;
/** A ring descriptor's words (u16) and its flags word (packed layout). */
const RING_DESC_WORDS = 8;
const RING_DESC_FLAGS_WORD = 7;
const RING_DESC_ID_WORD = 6;

/** One chain the area says was in flight. */
export interface PackedInflightChain {
  /** Entry index of the chain's head in the area. */
  entry: number;
  /** Ring slots (descriptors in the ring) the chain took. */
  num: number;
  counter: number;
}

/** What a restarted packed ring must do first. */
export interface PackedResubmission {
  /** Chains still in flight, oldest first. */
  chains: PackedInflightChain[];
  nextCounter: number;
  /** Entries marked in flight that do not form a valid chain for this ring (ignored and freed). */
  invalid: number;
  /** The device's used position the ring resumes from, and where the driver's next available one is. */
  state: { nextAvail: number; availWrap: boolean; nextUsed: number; usedWrap: boolean };
  /** The region held no tracking (fresh or unreadable): the ring resumes from the front-end's base. */
  fresh: boolean;
}

export class PackedInflightRegion {
  constructor(
    private readonly view: DataView,
    private readonly descNum: number,
  ) {}

  private at(entry: number): number {
    return REGION_HEADER + DESC_STATE * entry;
  }

  private u16(off: number): number {
    return this.view.getUint16(off, true);
  }

  private set16(off: number, v: number): void {
    this.view.setUint16(off, v, true);
  }

  /** An empty region: every entry free (linked in index order), the used side at `usedIdx` in lap `usedWrap`. */
  initialise(usedIdx: number, usedWrap: boolean): void {
    const v = this.view;
    v.setUint16(OFF_VERSION, INFLIGHT_VERSION, true);
    v.setUint16(OFF_DESC_NUM, this.descNum, true);
    for (let i = 0; i < this.descNum; i++) {
      v.setUint8(this.at(i) + PD_INFLIGHT, 0);
      this.set16(this.at(i) + PD_NEXT, i + 1);
    }
    this.set16(PK_FREE_HEAD, 0);
    this.set16(PK_OLD_FREE_HEAD, 0);
    this.set16(PK_USED_IDX, usedIdx);
    this.set16(PK_OLD_USED_IDX, usedIdx);
    v.setUint8(PK_USED_WRAP, usedWrap ? 1 : 0);
    v.setUint8(PK_OLD_USED_WRAP, usedWrap ? 1 : 0);
  }

  /**
   * Records a popped chain: its `slots` ring descriptors starting at ring position `pos` of `ring` (the raw
   * descriptor ring), each copied into a free entry. Returns the head entry. The pop is committed only by the
   * last store (old_free_head), so a back-end killed before it leaves the entries on the free list.
   */
  markPopped(ring: Uint16Array, ringSize: number, pos: number, slots: number, counter: number): number | undefined {
    const v = this.view;
    const head = this.u16(PK_OLD_FREE_HEAD);
    // Enough free entries? Only a driver that made more descriptors available than the ring holds (or a front-end
    // writing into the area) can exhaust them; nothing is written then.
    for (let e = this.u16(PK_FREE_HEAD), k = 0; k < slots; k++, e = this.u16(this.at(e) + PD_NEXT)) {
      if (e >= this.descNum) return undefined;
    }
    if (head >= this.descNum) return undefined;
    const h = this.at(head);
    this.set16(h + PD_NUM, 0);
    v.setUint32(h + PD_COUNTER, counter % TWO_POW_32, true);
    v.setUint32(h + PD_COUNTER + 4, Math.floor(counter / TWO_POW_32), true);
    v.setUint8(h + PD_INFLIGHT, 1);
    let free = this.u16(PK_FREE_HEAD);
    const ring32 = new Uint32Array(ring.buffer, ring.byteOffset, ring.length >> 1);
    for (let k = 0; k < slots; k++) {
      const w = ((pos + k) % ringSize) * RING_DESC_WORDS;
      if (k === slots - 1) this.set16(h + PD_LAST, free);
      this.set16(h + PD_NUM, k + 1);
      const e = this.at(free);
      v.setUint32(e + PD_ADDR, ring32[w / 2]!, true);
      v.setUint32(e + PD_ADDR + 4, ring32[w / 2 + 1]!, true);
      v.setUint32(e + PD_LEN, ring32[w / 2 + 2]!, true);
      this.set16(e + PD_ID, ring[w + RING_DESC_ID_WORD]!);
      this.set16(e + PD_FLAGS, ring[w + RING_DESC_FLAGS_WORD]!);
      free = this.u16(e + PD_NEXT);
      this.set16(PK_FREE_HEAD, free);
    }
    this.set16(PK_OLD_FREE_HEAD, free);
    return head;
  }

  /** First half of a push (before the used descriptor is written): the chain's entries go back to the free list. */
  beforePush(entry: number, slots: number, ringSize: number): boolean {
    const last = this.u16(this.at(entry) + PD_LAST);
    // `last` was written by markPopped; out of range only if the front-end rewrote the area under us.
    if (last >= this.descNum) return false;
    this.set16(this.at(last) + PD_NEXT, this.u16(PK_FREE_HEAD));
    this.set16(PK_FREE_HEAD, entry);
    let used = this.u16(PK_USED_IDX) + slots;
    let wrap = this.view.getUint8(PK_USED_WRAP) !== 0;
    if (used >= ringSize) {
      used -= ringSize;
      wrap = !wrap;
    }
    this.set16(PK_USED_IDX, used);
    this.view.setUint8(PK_USED_WRAP, wrap ? 1 : 0);
    return true;
  }

  /** Second half (after the used descriptor's flags are written): clear the head, commit. */
  afterPush(entry: number): void {
    this.view.setUint8(this.at(entry) + PD_INFLIGHT, 0);
    this.set16(PK_OLD_FREE_HEAD, this.u16(PK_FREE_HEAD));
    this.set16(PK_OLD_USED_IDX, this.u16(PK_USED_IDX));
    this.view.setUint8(PK_OLD_USED_WRAP, this.view.getUint8(PK_USED_WRAP));
  }

  /**
   * The descriptor copies of a recorded chain of `num` entries, as a ring of `ringSize` with the chain at slot 0,
   * lap 1; undefined if the links no longer stay inside the area (rewritten since recover() checked them).
   */
  chainRing(entry: number, num: number, ringSize: number): Uint8Array | undefined {
    if (num > ringSize) return undefined;
    const out = new Uint8Array(descTableSize(ringSize));
    const dv = new DataView(out.buffer);
    const v = this.view;
    let e = entry;
    for (let k = 0; k < num; k++) {
      if (e >= this.descNum) return undefined;
      const a = this.at(e);
      const d = k * 16;
      dv.setUint32(d, v.getUint32(a + PD_ADDR, true), true);
      dv.setUint32(d + 4, v.getUint32(a + PD_ADDR + 4, true), true);
      dv.setUint32(d + 8, v.getUint32(a + PD_LEN, true), true);
      dv.setUint16(d + 12, this.u16(a + PD_ID), true);
      const flags = (this.u16(a + PD_FLAGS) & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | VIRTQ_DESC_F_AVAIL;
      dv.setUint16(d + 14, flags, true);
      e = this.u16(a + PD_NEXT);
    }
    return out;
  }

  /**
   * Reads the region for a ring (re)starting; `ring` is the live descriptor ring and `base` the front-end's
   * SET_VRING_BASE position. Settles a push cut short (committed if the used descriptor reached the ring, rolled
   * back if not), rolls back a pop cut short, frees what is not a valid chain, and lists the chains in flight.
   */
  recover(ring: Uint16Array, ringSize: number, base: { index: number; wrap: boolean }): PackedResubmission {
    const v = this.view;
    const n = this.descNum;
    const freshFrom = (invalid: number): PackedResubmission => {
      this.initialise(base.index, base.wrap);
      return { chains: [], nextCounter: 0, invalid, state: { nextAvail: base.index, availWrap: base.wrap, nextUsed: base.index, usedWrap: base.wrap }, fresh: true };
    };
    const markedInFlight = (): number => {
      let c = 0;
      for (let i = 0; i < n; i++) if (v.getUint8(this.at(i) + PD_INFLIGHT) !== 0) c++;
      return c;
    };
    if (v.getUint16(OFF_VERSION, true) === 0) return freshFrom(0);
    const oldUsed = this.u16(PK_OLD_USED_IDX);
    if (oldUsed >= ringSize || this.u16(PK_USED_IDX) >= ringSize) return freshFrom(markedInFlight());
    const oldWrap = v.getUint8(PK_OLD_USED_WRAP) !== 0;
    if (this.u16(PK_USED_IDX) !== oldUsed || (v.getUint8(PK_USED_WRAP) !== 0) !== oldWrap) {
      // A push was cut short: did its used descriptor reach the ring? Still "available in lap oldWrap" = no.
      const flags = Atomics.load(ring, oldUsed * RING_DESC_WORDS + RING_DESC_FLAGS_WORD) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
      const stillAvailable = oldWrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
      if (flags !== stillAvailable) {
        this.set16(PK_OLD_FREE_HEAD, this.u16(PK_FREE_HEAD));
        this.set16(PK_OLD_USED_IDX, this.u16(PK_USED_IDX));
        v.setUint8(PK_OLD_USED_WRAP, v.getUint8(PK_USED_WRAP));
      }
    }
    this.set16(PK_FREE_HEAD, this.u16(PK_OLD_FREE_HEAD));
    this.set16(PK_USED_IDX, this.u16(PK_OLD_USED_IDX));
    v.setUint8(PK_USED_WRAP, v.getUint8(PK_OLD_USED_WRAP));
    const usedIdx = this.u16(PK_USED_IDX);
    const usedWrap = v.getUint8(PK_USED_WRAP) !== 0;

    // The free list: every entry on it is not in flight. A cycle or an index out of range: the region is unusable.
    const owner = new Int32Array(n).fill(-1); // -2: free; else the head entry of the chain that holds it
    let walked = 0;
    for (let e = this.u16(PK_FREE_HEAD); e < n; e = this.u16(this.at(e) + PD_NEXT)) {
      if (owner[e] === -2 || ++walked > n) return freshFrom(markedInFlight());
      owner[e] = -2;
      v.setUint8(this.at(e) + PD_INFLIGHT, 0);
    }
    // Heads in flight: each must be a run of `num` entries off the free list, ending at `last`, of descriptors
    // a ring of this size can hold (ids below the ring size, NEXT on all but the last).
    const heads: PackedInflightChain[] = [];
    let invalid = 0;
    for (let i = 0; i < n; i++) {
      const a = this.at(i);
      if (owner[i] === -2 || v.getUint8(a + PD_INFLIGHT) === 0) continue;
      const num = this.u16(a + PD_NUM);
      let ok = num >= 1 && num <= ringSize;
      const members: number[] = [];
      let e = i;
      for (let k = 0; ok && k < num; k++) {
        if (e >= n || owner[e] !== -1) {
          ok = false;
          break;
        }
        members.push(e);
        const hasNext = (this.u16(this.at(e) + PD_FLAGS) & 1) !== 0; // VIRTQ_DESC_F_NEXT
        if (hasNext !== (k < num - 1)) ok = false;
        if (k === num - 1 && (e !== this.u16(a + PD_LAST) || this.u16(this.at(e) + PD_ID) >= ringSize)) ok = false;
        e = this.u16(this.at(e) + PD_NEXT);
      }
      if (!ok) {
        invalid++;
        v.setUint8(a + PD_INFLIGHT, 0);
        continue;
      }
      for (const m of members) owner[m] = i;
      heads.push({ entry: i, num, counter: v.getUint32(a + PD_COUNTER, true) + v.getUint32(a + PD_COUNTER + 4, true) * TWO_POW_32 });
    }
    heads.sort((x, y) => x.counter - y.counter);
    // More ring slots in flight than the ring has: the newest ones cannot be real.
    let slots = 0;
    const chains: PackedInflightChain[] = [];
    for (const h of heads) {
      if (slots + h.num > ringSize) {
        invalid++;
        v.setUint8(this.at(h.entry) + PD_INFLIGHT, 0);
        for (let e = h.entry, k = 0; k < h.num; k++, e = this.u16(this.at(e) + PD_NEXT)) owner[e] = -1;
        continue;
      }
      slots += h.num;
      chains.push(h);
    }
    // Entries neither free nor part of a kept chain go back on the free list (inflight cleared first).
    for (let i = 0; i < n; i++) {
      if (owner[i] !== -1) continue;
      v.setUint8(this.at(i) + PD_INFLIGHT, 0);
      this.set16(this.at(i) + PD_NEXT, this.u16(PK_FREE_HEAD));
      this.set16(PK_FREE_HEAD, i);
      this.set16(PK_OLD_FREE_HEAD, i);
    }
    let nextAvail = usedIdx + slots;
    let availWrap = usedWrap;
    if (nextAvail >= ringSize) {
      nextAvail -= ringSize;
      availWrap = !availWrap;
    }
    const last = chains.reduce((m, c) => Math.max(m, c.counter), -1);
    return { chains, nextCounter: last + 1, invalid, state: { nextAvail, availWrap, nextUsed: usedIdx, usedWrap }, fresh: false };
  }
}

/** Walks a chain recorded in the area (a resubmission) with the queue layer's own packed walker and checks. */
export function walkPackedEntry(region: PackedInflightRegion, chain: PackedInflightChain, size: number, memory: GuestMemory, indirect: boolean): DescriptorChain | VirtqueueError {
  const desc = region.chainRing(chain.entry, chain.num, size);
  if (desc === undefined) return new VirtqueueError('DescriptorIndexOutOfRange', `inflight entry ${chain.entry}: its ${chain.num} linked entries leave the area`);
  const probe = new PackedQueue({
    size,
    rings: { desc, driver: new Uint8Array(PACKED_EVENT_SIZE), device: new Uint8Array(PACKED_EVENT_SIZE) },
    memory,
    eventIdx: false,
    indirect,
    state: { nextAvail: 0, availWrap: true, nextUsed: 0, usedWrap: true },
  });
  return probe.pop() ?? new VirtqueueError('DescriptorIndexOutOfRange', `resubmitted inflight entry ${chain.entry} gave no chain`);
}

/**
 * A packed queue whose chains are tracked in the inflight area: each popped chain's descriptors copied into the
 * area, released when the chain is used. A ring restarted with chains in flight hands those to the device first,
 * oldest first. The wrapped queue can be replaced (new memory map, new kick fd) without losing the tracking.
 */
export class InflightPackedQueue extends InflightQueue<PackedInflightChain> {
  readonly layout = 'packed';
  /** The area entry of each chain the device holds. */
  private readonly entries = new WeakMap<DescriptorChain, number>();

  constructor(
    inner: DeviceQueue,
    private ring: Uint16Array,
    private readonly region: PackedInflightRegion,
    recovered: PackedResubmission,
    private memory: GuestMemory,
    private readonly indirect: boolean,
  ) {
    super(inner, recovered.chains, recovered.nextCounter);
  }

  /** Puts a rebuilt queue (same ring, new views) under the tracking. */
  rebind(inner: DeviceQueue, ring: Uint16Array, memory: GuestMemory): void {
    this.inner = inner;
    this.ring = ring;
    this.memory = memory;
  }

  protected walkResubmission(next: PackedInflightChain): DescriptorChain | VirtqueueError {
    const chain = walkPackedEntry(this.region, next, this.size, this.memory, this.indirect);
    if (chain instanceof DescriptorChain) this.entries.set(chain, next.entry);
    return chain;
  }

  protected popTracked(): DescriptorChain | VirtqueueError | null {
    const pos = this.inner.getState().nextAvail;
    const chain = this.inner.pop();
    if (chain instanceof DescriptorChain) {
      const entry = this.region.markPopped(this.ring, this.size, pos, chain.ringSlots, this.counter++);
      if (entry === undefined) {
        this.brokenBy = new VirtqueueError('AvailIndexJump', `chain at ring position ${pos}: more descriptors in flight than the ring holds (the inflight area has no free entry)`);
        return this.brokenBy;
      }
      this.entries.set(chain, entry);
    }
    return chain;
  }

  pushUsed(chain: DescriptorChain, len: number): void {
    const entry = this.entries.get(chain);
    if (entry === undefined || len > chain.writableBytes || len < 0 || !Number.isInteger(len)) {
      // Not a chain of this queue, or a length the queue refuses (it throws): the area is not touched.
      this.inner.pushUsed(chain, len);
      return;
    }
    const tracked = this.region.beforePush(entry, chain.ringSlots, this.size);
    this.inner.pushUsed(chain, len);
    if (tracked) this.region.afterPush(entry);
    this.entries.delete(chain);
  }
}
