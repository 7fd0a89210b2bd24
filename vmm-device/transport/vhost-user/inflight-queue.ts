// What the split and packed inflight-tracked queues share: a DeviceQueue wrapping the ring's own queue, which
// hands the device the chains a restarted ring still had in flight (oldest first) before anything new, and which
// can be rebound to a rebuilt inner queue (new memory map, new kick fd) without losing its tracking. The layouts
// differ only in how a resubmission is walked, how a fresh pop and a push are recorded in the area.

import { DescriptorChain, VirtqueueError } from '../../virtqueue/index.ts';
import type { DeviceQueue, QueueState } from '../../virtqueue/queue.ts';

export abstract class InflightQueue<Resubmission> implements DeviceQueue {
  abstract readonly layout: 'split' | 'packed';
  private readonly resubmit: Resubmission[];
  /** The counter the next popped chain gets (the area orders chains in flight by it). */
  protected counter: number;
  protected brokenBy: VirtqueueError | undefined;
  private resubmittedInFlight = 0;
  /** Chains handed to the device again after a restart (diagnostics, tests). */
  resubmitted = 0;

  constructor(
    protected inner: DeviceQueue,
    resubmit: readonly Resubmission[],
    nextCounter: number,
  ) {
    this.resubmit = [...resubmit];
    this.counter = nextCounter;
  }

  get size(): number {
    return this.inner.size;
  }

  /** Chains still waiting to be resubmitted. */
  get pendingResubmissions(): number {
    return this.resubmit.length;
  }

  get broken(): VirtqueueError | undefined {
    return this.brokenBy ?? this.inner.broken;
  }

  get inFlight(): number {
    return this.inner.inFlight + this.resubmittedInFlight;
  }

  /** Resubmissions first (a chain the area no longer describes breaks the queue), then the ring, recorded. */
  pop(): DescriptorChain | VirtqueueError | null {
    if (this.brokenBy !== undefined) return this.brokenBy;
    const next = this.resubmit.shift();
    if (next === undefined) return this.popTracked();
    const chain = this.walkResubmission(next);
    if (chain instanceof VirtqueueError) {
      this.brokenBy = chain;
      return chain;
    }
    this.resubmitted++;
    this.resubmittedInFlight++;
    return chain;
  }

  /** Walks one recorded chain with the queue layer's own walker (and notes what the push will need). */
  protected abstract walkResubmission(r: Resubmission): DescriptorChain | VirtqueueError;
  /** Pops the next chain of the ring and records it in the area. */
  protected abstract popTracked(): DescriptorChain | VirtqueueError | null;
  abstract pushUsed(chain: DescriptorChain, len: number): void;

  needsNotification(): boolean {
    return this.inner.needsNotification();
  }

  disableNotifications(): void {
    this.inner.disableNotifications();
  }

  enableNotifications(): boolean {
    return this.inner.enableNotifications() || this.resubmit.length > 0;
  }

  hasAvailable(): boolean {
    return this.brokenBy !== undefined || this.resubmit.length > 0 || this.inner.hasAvailable();
  }

  getState(): QueueState {
    return this.inner.getState();
  }
}
