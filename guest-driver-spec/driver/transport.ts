// What the virtio-rdma driver needs from a virtio transport, and nothing more: the status register, feature
// words, the configuration space with its generation counter, queue set-up with ring addresses in guest memory,
// notifications, and used-buffer interrupts. Two implementations: over the reference vhost-user front-end
// (vhost-user-transport.ts) and over real QEMU through qtest (qtest-transport.ts).

import type { DriverMemory } from './memory.ts';
import type { DriverVirtqueue } from './virtqueue.ts';

export interface DriverTransport {
  /** For messages: "vhost-user front-end", "qtest virtio-pci". */
  readonly kind: string;
  /** Guest RAM the driver places rings and buffers in. */
  readonly memory: DriverMemory;

  /** Writes 0 to the status (device reset) and waits until the device reads back 0. */
  reset(): Promise<void>;
  getStatus(): Promise<number>;
  /** Sets the status register (the driver's bits so far plus the new one). */
  setStatus(status: number): Promise<void>;
  deviceFeatures(): Promise<bigint>;
  writeDriverFeatures(features: bigint): Promise<void>;
  /** Reads `size` bytes of device configuration at `offset`. */
  readConfig(offset: number, size: number): Promise<Uint8Array>;
  /** The configuration generation counter (virtio 1.x); a transport without one returns a constant. */
  configGeneration(): Promise<number>;
  /** Number of queues the device offers (undefined when the transport does not say). */
  numQueues(): Promise<number | undefined>;
  /** Largest size of queue `index`. */
  maxQueueSize(index: number): Promise<number>;
  /** Lays out queue `index` in guest memory and tells the device where it is. */
  setupQueue(index: number, size: number): Promise<DriverVirtqueue>;
  /** Notifies the device that queue `index` has new buffers (a kick). */
  notify(index: number): Promise<void>;
  /**
   * Waits until the device signals a used buffer on queue `index`, or the time runs out. Resolves true when an
   * interrupt came; false on timeout. Callers re-check the used ring either way (interrupts may be coalesced).
   */
  waitInterrupt(index: number, timeoutMs: number): Promise<boolean>;
  /** Releases the transport's own resources (not the device's). */
  close(): Promise<void>;
}

export class TransportError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TransportError';
  }
}
