// The device's host queue mappings (spec section 13): the budget of mapped queues (max_mapped_queues), the ranges
// of the shared memory region and the doorbell slots (region.ts), the DoorbellEngine and its pages, and the
// transport's HostPageMapper through which every queue is mapped into the VMM and unmapped again.
//
// Every wait on the transport is bounded (UNMAP_TIMEOUT_MS): a VMM that went away or stopped answering never holds a
// destroy or a reset. A range whose unmap was not confirmed stays out of use until the next reset (quarantined), so
// no later queue is mapped where the VMM may still map an old one.

import { MappingLimits } from '../../abi/rdma/index.ts';
import type { Logger } from '../../util/log.ts';
import type { DeviceHandle, DoorbellEngine, HostQueueBuffer, HostVerbs, MappedQpHandle } from '../../verbs/host-verbs.ts';
import type { HostPageMapper, QueueOffload } from '../../virtio/device.ts';
import type { MappedQueue } from '../objects.ts';
import { REGION_SHMID, UNMAP_TIMEOUT_MS, type MappingPlan } from './plan.ts';
import { RangeAllocator, SlotAllocator, type RegionRange } from './region.ts';

/** What the manager needs of the device. */
export interface MappingHost {
  readonly verbs: HostVerbs;
  readonly hostDevice: DeviceHandle;
  readonly log: Logger;
  readonly counters: MappingCounters;
  /** Closes an fd the device owns (a lent queue's call fd); undefined: NOTIFY mode cannot take the queue. */
  readonly closeFd?: ((fd: number) => void) | undefined;
}

export interface MappingCounters {
  /** SHMEM_MAP (or the transport's equivalent) refused or failed: the creation answered DEVICE_ERROR. */
  mapFailures: number;
  /** Unmaps refused or not confirmed in time: the range stayed out of use until the next reset. */
  unmapFailures: number;
  /** Mapped queues created (CQs 1, QPs 2) since the device opened. */
  queuesMapped: number;
}

/** Queues and a doorbell slot held for a creation in progress. */
export interface Reservation {
  readonly epoch: number;
  readonly queues: number;
  ranges: RegionRange[];
  slot: number | undefined;
}

/** Thrown by ensureDoorbells when the host refused the engine (NO_RESOURCES HOST) or the transport the pages. */
export class DoorbellSetupError extends Error {
  constructor(
    readonly by: 'host' | 'transport',
    message: string,
  ) {
    super(message);
  }
}

export class MappingManager {
  private ranges: RangeAllocator;
  private slots: SlotAllocator;
  /** Mapped queues held (reserved or live): at most max_mapped_queues. */
  private held = 0;
  /** Bumped by every reset: a reservation of an earlier epoch is never given back to the new allocators. */
  private epoch = 0;
  private pages: HostPageMapper | undefined;
  private offload: QueueOffload | undefined;
  private notifyQueue: number | undefined;
  private engine: DoorbellEngine | undefined;
  private engineStarting: Promise<DoorbellEngine> | undefined;
  private doorbellPagesMapped = false;
  private readonly timeoutMs: number;

  constructor(
    private readonly host: MappingHost,
    readonly plan: MappingPlan,
    options: { unmapTimeoutMs?: number } = {},
  ) {
    this.timeoutMs = options.unmapTimeoutMs ?? UNMAP_TIMEOUT_MS;
    this.ranges = new RangeAllocator(plan.doorbellBytes, plan.regionSize - plan.doorbellBytes);
    this.slots = new SlotAllocator(plan.maxMappedQps);
  }

  /** Activation with HOST_QUEUE_MAPPING negotiated: the transport's mapper and offload (NOTIFY's kick fd). */
  activate(pages: HostPageMapper | undefined, offload: QueueOffload | undefined, notifyQueue: number | undefined): void {
    this.pages = pages;
    this.offload = offload;
    this.notifyQueue = notifyQueue;
  }

  /** Mapped queues held now (CQs 1, QPs 2), and the region's live ranges. */
  get usage(): { queues: number; ranges: number; slots: number } {
    return { queues: this.held, ranges: this.ranges.live.ranges, slots: this.slots.live };
  }

  /** The engine, when one runs (per-QP doorbell counters). */
  get doorbellEngine(): DoorbellEngine | undefined {
    return this.engine;
  }

  /**
   * Holds `sizes.length` queues under max_mapped_queues, a range of each size, and (for a QP) a doorbell slot; or
   * undefined (nothing held) when a bound is reached: NO_RESOURCES MAPPING.
   */
  reserve(sizes: readonly bigint[], slot: boolean): Reservation | undefined {
    if (this.held + sizes.length > this.plan.maxMappedQueues) return undefined;
    const r: Reservation = { epoch: this.epoch, queues: sizes.length, ranges: [], slot: undefined };
    for (const s of sizes) {
      const range = this.ranges.alloc(s);
      if (range === undefined) {
        for (const got of r.ranges) this.ranges.release(got);
        return undefined;
      }
      r.ranges.push(range);
    }
    if (slot) {
      r.slot = this.slots.alloc();
      if (r.slot === undefined) {
        for (const got of r.ranges) this.ranges.release(got);
        return undefined;
      }
    }
    this.held += sizes.length;
    return r;
  }

  /**
   * The host's buffer may be larger than the estimate the range was reserved for (a provider rounding otherwise):
   * exchanges range `i` for one that holds `size` bytes. False (the old range kept) when none is free.
   */
  fit(r: Reservation, i: number, size: bigint): boolean {
    const old = r.ranges[i]!;
    if (size <= old.length) return true;
    if (r.epoch !== this.epoch) return false;
    const bigger = this.ranges.alloc(size);
    if (bigger === undefined) return false;
    this.ranges.release(old);
    r.ranges[i] = bigger;
    return true;
  }

  /** Gives back what a reservation holds (after a failed creation, or a destroy). */
  unreserve(r: Reservation): void {
    if (r.epoch !== this.epoch) return; // a reset since: the allocators were renewed
    for (const range of r.ranges) this.ranges.release(range);
    r.ranges = [];
    if (r.slot !== undefined) this.slots.release(r.slot);
    r.slot = undefined;
    this.held -= r.queues;
  }

  /** Gives back one destroyed queue's range (or keeps it out of use when its unmap was not confirmed). */
  releaseQueue(q: MappedQueue, epoch: number, unmapped: boolean): void {
    if (epoch !== this.epoch) return;
    this.held--;
    if (unmapped) this.ranges.release({ offset: q.offset, length: q.length });
  }

  releaseSlot(slot: number, epoch: number): void {
    if (epoch === this.epoch) this.slots.release(slot);
  }

  get currentEpoch(): number {
    return this.epoch;
  }

  /** Maps a host queue buffer at a reserved range; throws when the transport refuses (DEVICE_ERROR). */
  async map(range: RegionRange, buf: HostQueueBuffer): Promise<MappedQueue> {
    const pages = this.pages;
    if (pages === undefined) throw new Error('the transport maps no host pages');
    try {
      await pages.mapShared({ shmid: REGION_SHMID, shmOffset: range.offset, fd: buf.fd, fdOffset: buf.fdOffset, length: buf.size, writable: true });
    } catch (e) {
      this.host.counters.mapFailures++;
      this.host.log.log('warn', 'the transport refused to map a host queue', { offset: range.offset.toString(), length: buf.size.toString(), error: (e as Error).message });
      throw e;
    }
    this.host.counters.queuesMapped++;
    return { offset: range.offset, length: range.length, size: buf.size, live: true, mapper: pages };
  }

  /** Unmaps one queue and waits, at most the timeout, for the confirmation. True when the transport confirmed. */
  async unmap(q: MappedQueue): Promise<boolean> {
    if (!q.live) return true;
    q.live = false;
    return this.unmapRange(q.mapper, q.offset, q.size, 'queue');
  }

  private async unmapRange(pages: HostPageMapper | undefined, offset: bigint, length: bigint, what: string): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    try {
      if (pages === undefined) throw new Error('the transport maps no host pages');
      await Promise.race([
        pages.unmapShared(REGION_SHMID, offset, length),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no confirmation in ${this.timeoutMs} ms`)), this.timeoutMs);
        }),
      ]);
      return true;
    } catch (e) {
      this.host.counters.unmapFailures++;
      this.host.log.log('warn', 'an unmap was not confirmed; the range stays out of use until the next reset', { what, offset: offset.toString(), error: (e as Error).message });
      return false;
    } finally {
      if (timer !== undefined) clearTimeout(timer);
    }
  }

  /**
   * The engine and its doorbell pages mapped at the start of the region, made at the first mapped QP of an
   * activation. DoorbellSetupError says who refused.
   */
  async ensureDoorbells(): Promise<DoorbellEngine> {
    if (this.engine !== undefined && this.doorbellPagesMapped) return this.engine;
    const epoch = this.epoch;
    if (this.engine === undefined) {
      this.engineStarting ??= this.host.verbs.createDoorbellEngine(this.host.hostDevice, {
        pages: this.plan.doorbellPages,
        wake: this.notifyQueue !== undefined ? 'notify' : 'polled',
      });
      let engine: DoorbellEngine;
      try {
        engine = await this.engineStarting;
      } catch (e) {
        throw new DoorbellSetupError('host', (e as Error).message);
      } finally {
        this.engineStarting = undefined;
      }
      if (epoch !== this.epoch) {
        // A reset came meanwhile: this engine belongs to no activation.
        await engine.close().catch(() => undefined);
        throw new DoorbellSetupError('host', 'reset while the doorbell engine started');
      }
      this.engine = engine;
      this.takeNotifyQueue();
    }
    const engine = this.engine!;
    if (!this.doorbellPagesMapped) {
      const pages = this.pages;
      if (pages === undefined) throw new DoorbellSetupError('transport', 'the transport maps no host pages');
      try {
        await pages.mapShared({ shmid: REGION_SHMID, shmOffset: 0n, fd: engine.fd, fdOffset: 0n, length: engine.size, writable: true });
      } catch (e) {
        this.host.counters.mapFailures++;
        throw new DoorbellSetupError('transport', (e as Error).message);
      }
      if (epoch !== this.epoch) {
        // The reset did not know of this mapping: undo it here (its engine was closed by the reset).
        await this.unmapRange(pages, 0n, engine.size, 'doorbell pages');
        throw new DoorbellSetupError('transport', 'reset while the doorbell pages were mapped');
      }
      this.doorbellPagesMapped = true;
    }
    return engine;
  }

  /** NOTIFY mode: the mapdoorbellq's kick fd wakes the engine's thread (spec 13.6); without it the device rings. */
  private takeNotifyQueue(): void {
    const index = this.notifyQueue;
    const engine = this.engine;
    if (index === undefined || engine === undefined || this.offload === undefined || this.host.closeFd === undefined) return;
    const taken = this.offload.take(index, (reason) => {
      // The transport serves the queue's kicks again (queueNotify rings every slot) until it is taken anew.
      this.host.log.log('info', 'mapdoorbellq taken back by the transport', { reason });
      if (this.engine === engine) engine.setWakeFd(undefined);
    });
    if (taken === undefined) return;
    if (taken.callFd !== undefined) this.host.closeFd(taken.callFd); // the queue carries no buffers: no interrupt
    engine.setWakeFd(taken.kickFd);
  }

  /** Attaches a mapped QP to its slot. */
  attach(slot: number, qp: MappedQpHandle): void {
    this.engine!.attach(slot, qp);
  }

  detach(slot: number): void {
    try {
      this.engine?.detach(slot);
    } catch (e) {
      this.host.log.log('error', 'detaching a doorbell slot failed', { slot, error: (e as Error).message });
    }
  }

  ring(slot: number): void {
    try {
      this.engine?.ring(slot);
    } catch (e) {
      this.host.log.log('error', 'executing a doorbell failed', { slot, error: (e as Error).message });
    }
  }

  counters(slot: number | undefined): { executed: bigint; refused: bigint } {
    if (slot === undefined || this.engine === undefined) return { executed: 0n, refused: 0n };
    return this.engine.counters(slot);
  }

  /**
   * Device reset (spec 13.10), called after the device detached every slot: forgets every reservation at once (new
   * allocators, a new epoch) and returns the release to run once the host QPs are in ERR: it unmaps every live queue
   * of `queues` and the doorbell pages (bounded: once one unmap goes unconfirmed the transport is taken as gone and
   * the rest are not waited for) and closes the engine.
   */
  reset(queues: readonly MappedQueue[]): () => Promise<void> {
    const pages = this.pages;
    const engine = this.engine;
    const doorbells = this.doorbellPagesMapped;
    this.epoch++;
    this.held = 0;
    this.ranges = new RangeAllocator(this.plan.doorbellBytes, this.plan.regionSize - this.plan.doorbellBytes);
    this.slots = new SlotAllocator(this.plan.maxMappedQps);
    this.pages = undefined;
    this.offload = undefined;
    this.notifyQueue = undefined;
    this.engine = undefined;
    this.doorbellPagesMapped = false;
    return async () => {
      let answering = true;
      for (const q of queues) {
        if (!q.live) continue;
        if (!answering) q.live = false;
        else answering = await this.unmap(q);
      }
      if (doorbells && engine !== undefined && answering) await this.unmapRange(pages, 0n, engine.size, 'doorbell pages');
      if (engine !== undefined) {
        try {
          await engine.close();
        } catch (e) {
          this.host.log.log('error', 'closing the doorbell engine failed', { error: (e as Error).message });
        }
      }
    };
  }
}

/** Bytes of one doorbell page (spec 13.6). */
export const DOORBELL_PAGE_BYTES = MappingLimits.DOORBELL_PAGE_SIZE;
