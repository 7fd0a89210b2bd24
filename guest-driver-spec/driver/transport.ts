// What the virtio-rdma driver needs from a virtio transport, and nothing more: the status register, feature
// words, the configuration space with its generation counter, queue set-up with ring addresses in guest memory,
// notifications, and used-buffer interrupts. Two implementations: over the reference vhost-user front-end
// (vhost-user-transport.ts) and over real QEMU through qtest (qtest-transport.ts).

import type { DriverMemory } from './memory.ts';
import type { DriverVirtqueue, DriverVirtqueueOptions } from './virtqueue.ts';

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
  setupQueue(index: number, size: number, options?: DriverVirtqueueOptions): Promise<DriverVirtqueue>;
  /** Notifies the device that queue `index` has new buffers (a kick). */
  notify(index: number): Promise<void>;
  /**
   * Waits until the device signals a used buffer on queue `index`, or the time runs out. Resolves true when an
   * interrupt came; false on timeout. Callers re-check the used ring either way (interrupts may be coalesced).
   */
  waitInterrupt(index: number, timeoutMs: number): Promise<boolean>;
  /**
   * The device's shared memory region `shmid` (virtio shared memory regions; spec section 13, host queue mapping),
   * or undefined when the transport exposes no such region. Optional: a transport without it maps nothing.
   */
  sharedMemory?(shmid: number): Promise<SharedMemoryWindow | undefined>;
  /** Releases the transport's own resources (not the device's). */
  close(): Promise<void>;
}

/**
 * The driver's access to one shared memory region: what a guest's loads and stores in the region's range reach
 * (the host queues and doorbell pages the device mapped there). Little-endian, like every field of the spec.
 */
export interface SharedMemoryWindow {
  readonly shmid: number;
  /** Bytes of the region. */
  readonly size: bigint;
  read(offset: bigint, length: number): Promise<Uint8Array>;
  write(offset: bigint, bytes: Uint8Array): Promise<void>;
  /** One aligned 4-byte load (a load-acquire where the transport orders accesses, as section 13.4 asks). */
  readU32(offset: bigint): Promise<number>;
  /** One aligned 4-byte store (a store-release where the transport orders accesses). */
  writeU32(offset: bigint, value: number): Promise<void>;
  /**
   * A direct view of `length` bytes at `offset` when the region is mapped into this process (the reference
   * front-end maps what the device maps); undefined where every access is a message (qtest).
   */
  view?(offset: bigint, length: number): Uint8Array | undefined;
}

export class TransportError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TransportError';
  }
}
