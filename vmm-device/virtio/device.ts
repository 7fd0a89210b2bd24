// The interface a device model implements (the RDMA device, the test devices). It knows nothing of transports:
// no sockets, no eventfds, no PCI. The virtio device core (core.ts) drives it.

import type { GuestMemory } from '../memory/guest-memory.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import type { Logger } from '../util/log.ts';

export interface ActivationContext {
  /** The features the driver accepted (a subset of what was offered, always with VERSION_1). */
  features: bigint;
  memory: GuestMemory;
  /** One entry per queue index; undefined for a queue the driver did not enable. */
  queues: readonly (DeviceQueue | undefined)[];
  /** Tells the transport to send a used-buffer notification (interrupt) for queue `index`. */
  interrupt(index: number): void;
  /**
   * Reports a broken queue (a driver bug found in the ring): the core sets NEEDS_RESET, stops the queue,
   * counts and logs it, and notifies the driver of the configuration change.
   */
  queueBroken(index: number, error: Error): void;
  log: Logger;
}

export interface VirtioDeviceModel {
  /** Virtio device ID (42 for RDMA). */
  readonly deviceId: number;
  readonly queueCount: number;
  /** Largest size the driver may give queue `index`. */
  maxQueueSize(index: number): number;
  /** Device-specific feature bits offered (bits 0-23 and any device-specific higher bits). */
  readonly deviceFeatures: bigint;
  /** Bytes of device configuration space. */
  readonly configSize: number;
  /** Fills `dest` from config offset `offset` (the core has checked the bounds). */
  readConfig(offset: number, dest: Uint8Array): void;
  /** Applies a driver write (bounds checked). Returns false if the range is read-only (the write is dropped). */
  writeConfig(offset: number, src: Uint8Array): boolean;
  /**
   * Optional: the driver set FEATURES_OK with `features` (already checked by the core: offered bits only, VERSION_1
   * present). Returning false refuses the set: FEATURES_OK stays clear and the driver sees the refusal when it
   * re-reads the status (virtio 1.2 section 3.1.1 step 6). A model whose activate() would refuse a feature set
   * says so here, before DRIVER_OK.
   */
  acceptFeatures?(features: bigint): boolean;
  /** DRIVER_OK: start serving. */
  activate(ctx: ActivationContext): void;
  /** The driver notified (kicked) queue `index`. Only called while active. */
  queueNotify(index: number): void;
  /** Stop serving and release everything the activation created (host resources included). */
  reset(): void;
}
