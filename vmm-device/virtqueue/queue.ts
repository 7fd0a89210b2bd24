// The device side of one virtqueue, whatever its layout. The queue owns no eventfd and no timer: the transport
// owns notifications and calls the device, which drains with this loop (virtio 1.2 section 2.7.10):
//
//   do {
//     queue.disableNotifications();
//     for (let c; (c = queue.pop()) !== null; ) { if (c instanceof VirtqueueError) {...} else handle(c); }
//   } while (queue.enableNotifications());   // true: more arrived while notifications were off
//
// and, after pushing used elements, interrupts the driver only if queue.needsNotification().

import type { GuestMemory } from '../memory/guest-memory.ts';
import type { DescriptorChain } from './chain.ts';
import type { VirtqueueError } from './errors.ts';

/** Where a queue's three areas are, already resolved by the transport to views of guest memory. */
export interface RingAreas {
  /** Descriptor table (split) or descriptor ring (packed): 16 * size bytes. */
  desc: Uint8Array;
  /** Split: the available ring. Packed: the driver event suppression area. */
  driver: Uint8Array;
  /** Split: the used ring. Packed: the device event suppression area. */
  device: Uint8Array;
}

export interface QueueOptions {
  size: number;
  rings: RingAreas;
  /** Memory that descriptor addresses (guest physical) are translated through. */
  memory: GuestMemory;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  indirect: boolean;
  /** Where to resume (vhost-user SET_VRING_BASE); a new queue starts at zero. */
  state?: QueueState;
}

/**
 * The position of the device in the ring, enough to stop and resume a queue (vhost-user GET/SET_VRING_BASE).
 * Split: the next available index to read and the next used index to write (both mod 2^16).
 * Packed: the same as ring positions (0..size-1) with their wrap counters.
 */
export interface QueueState {
  nextAvail: number;
  nextUsed: number;
  availWrap?: boolean;
  usedWrap?: boolean;
}

export interface DeviceQueue {
  readonly size: number;
  readonly layout: 'split' | 'packed';
  /** The error that broke the queue, if any: a broken queue pops nothing more until it is reset. */
  readonly broken: VirtqueueError | undefined;
  /**
   * The next available chain, null when there is none, or the error that broke the queue. Never throws. The chain
   * stays as popped, whatever the queue pops later, until the device pushes it.
   */
  pop(): DescriptorChain | VirtqueueError | null;
  /**
   * Returns a chain to the driver with `len` bytes written into its writable part. The chain object then belongs
   * to the queue again (a later pop() refills it, chain.ts): the device must not use it afterwards.
   */
  pushUsed(chain: DescriptorChain, len: number): void;
  /** Whether the driver wants an interrupt for the used elements pushed since the last call that returned true. */
  needsNotification(): boolean;
  /** Asks the driver not to notify (kick) the device. */
  disableNotifications(): void;
  /** Asks the driver to notify again; true if buffers became available meanwhile (drain again). */
  enableNotifications(): boolean;
  /** True when pop() would return a chain (or an error). */
  hasAvailable(): boolean;
  /** Chains popped and not yet pushed back. */
  readonly inFlight: number;
  getState(): QueueState;
}
