// The event queue (spec section 9): events wait in the device, coalesced per (type, handle), until the driver
// posts buffers; each buffer gets one 32-byte event. Waiting events are bounded (section 9.3): one per type and
// live object plus handle 0, and one shared slot for the DOORBELL_ERROR events whose handle names no object (a
// guest ringing 20,000 made-up handles leaves one waiting event with count 20,000, not 20,000 events).

import { Event, EventType, Limits } from '../abi/rdma/index.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';

/** What the event queue needs of the device: its virtqueue, and the fatal path for a malformed buffer. */
export interface EventQueueHost {
  readonly isActive: boolean;
  queue(index: number): DeviceQueue | undefined;
  popChain(index: number): DescriptorChain | null;
  pushUsed(index: number, chain: DescriptorChain, len: number): void;
  fatal(queue: number, why: string): void;
  readonly counters: { eventsWritten: number };
}

/** The coalescing key of DOORBELL_ERROR events for handles that name no object (they share one waiting slot). */
export const UNKNOWN_HANDLE_KEY = `${EventType.DOORBELL_ERROR}:unknown`;

interface Waiting {
  type: number;
  handle: number;
  detail: number;
  count: number;
}

export class EventQueue {
  /** Waiting events by coalescing key, in the order they first occurred (a Map keeps insertion order). */
  private readonly pending = new Map<string, Waiting>();
  private sequence = 0n;
  /**
   * Set while the device handles a memory map change: events wait (the transport rebuilds its rings after the
   * change, so nothing is written through the old ones); the device flushes once the change is over.
   */
  held = false;

  constructor(
    private readonly host: EventQueueHost,
    private readonly index: number,
  ) {}

  /** Queues an event (coalesced, section 9.3) and writes what the driver has buffers for. */
  push(type: number, handle: number, detail: number, key: string = `${type}:${handle}`): void {
    const waiting = this.pending.get(key);
    if (waiting !== undefined) waiting.count = Math.min(waiting.count + 1, 0xffff_ffff);
    else this.pending.set(key, { type, handle, detail, count: 1 });
    this.flush();
  }

  /** Drops the waiting events of a destroyed object (section 9.3). */
  discard(handle: number, types: readonly number[]): void {
    for (const t of types) this.pending.delete(`${t}:${handle}`);
    const shared = this.pending.get(UNKNOWN_HANDLE_KEY);
    if (shared !== undefined && shared.handle === handle && types.includes(EventType.DOORBELL_ERROR)) this.pending.delete(UNKNOWN_HANDLE_KEY);
  }

  /** Device reset: nothing waits, sequence numbers start again. */
  clear(): void {
    this.pending.clear();
    this.sequence = 0n;
    this.held = false;
  }

  get waiting(): number {
    return this.pending.size;
  }

  flush(): void {
    const q = this.host.queue(this.index);
    if (q === undefined || !this.host.isActive || this.held) return;
    while (this.pending.size > 0) {
      const chain = this.host.popChain(this.index);
      if (chain === null) {
        if (!this.host.isActive || !q.enableNotifications()) return;
        continue;
      }
      if (chain.readableBytes !== 0 || chain.writableBytes < Limits.EVENT_SIZE) {
        this.host.fatal(this.index, `event buffer with ${chain.readableBytes} readable and ${chain.writableBytes} writable bytes (spec 7.5 case 3)`);
        return;
      }
      const [key, e] = this.pending.entries().next().value!;
      this.pending.delete(key);
      chain.writer().write(Event.encode({ type: e.type, count: e.count, handle: e.handle, detail: e.detail, sequence: this.sequence }));
      this.sequence++;
      this.host.counters.eventsWritten++;
      this.host.pushUsed(this.index, chain, Limits.EVENT_SIZE);
    }
  }
}
