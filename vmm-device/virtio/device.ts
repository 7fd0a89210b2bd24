// The interface a device model implements (the RDMA device, the test devices). It knows nothing of transports:
// no sockets, no eventfds, no PCI. The virtio device core (core.ts) drives it.

import type { GuestMemory } from '../memory/guest-memory.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import type { Logger } from '../util/log.ts';

export interface ActivationContext {
  /** The features the driver accepted (a subset of what was offered, always with VERSION_1). */
  features: bigint;
  memory: GuestMemory;
  /**
   * One entry per queue index; undefined for a queue the driver did not enable. Live: the transport replaces an
   * entry when it rebuilds a started queue over a new memory map (before memoryChanged), and clears it when the
   * queue's ring is no longer inside guest memory. Read it each time; keep no queue object across calls.
   */
  queues: readonly (DeviceQueue | undefined)[];
  /** Tells the transport to send a used-buffer notification (interrupt) for queue `index`. */
  interrupt(index: number): void;
  /**
   * Reports a broken queue (a driver bug found in the ring): the core sets NEEDS_RESET, stops the queue,
   * counts and logs it, and notifies the driver of the configuration change.
   */
  queueBroken(index: number, error: Error): void;
  log: Logger;
  /**
   * Reports a failure inside the device model that no driver action caused (a bug, or a host error the model
   * could not map to a status): the core sets NEEDS_RESET, logs and counts it. Every entry into the model from the
   * event loop (host completion and async events, timers, policy callbacks) catches what it throws and reports it
   * here rather than letting it escape and end the process.
   */
  deviceFailed(error: Error): void;
  /** Maps host pages into the guest; undefined when the transport can map nothing. */
  hostPages?: HostPageMapper;
  /** Hands a queue's kick and call eventfds to a native thread; undefined when the transport has no such fds. */
  queueOffload?: QueueOffload;
}

/**
 * A transport's service for mapping host pages (an fd range) into the guest's address space: the RNIC's doorbell
 * and queue pages of the mapped data path. Each transport implements what it can and says plainly what it cannot:
 * vhost-user maps a queue's notify area (host notifier) and, with SHMEM_MAP, ranges of a shared memory region;
 * vfio-user maps sparse-mmap areas of a BAR, fixed before the guest starts.
 */
export interface HostPageMapper {
  /** What this transport can map now (after negotiation); `missing` says why a capability is absent. */
  capabilities(): HostPageCapabilities;
  /** Maps `size` bytes of `fd` at `offset` as queue `index`'s notify area (guest stores to it reach the page). */
  mapQueueNotifier(index: number, fd: number, offset: bigint, size: number): Promise<void>;
  /** Removes queue `index`'s notify-area mapping (the guest's stores go back to the kick path). */
  unmapQueueNotifier(index: number): Promise<void>;
  /** Maps `length` bytes of `fd` at `fdOffset` into shared memory region `shmid` at `shmOffset`. */
  mapShared(map: SharedMapping): Promise<void>;
  /** Unmaps `length` bytes of shared memory region `shmid` at `shmOffset`. */
  unmapShared(shmid: number, shmOffset: bigint, length: bigint): Promise<void>;
}

/** What the model may need to know of its transport when it judges the features (before activation). */
export interface TransportFacts {
  /** The host-page mapping service's capabilities as negotiated now; undefined when the transport has none. */
  hostPages: HostPageCapabilities | undefined;
}

export interface HostPageCapabilities {
  queueNotifier: boolean;
  /** Shared memory regions the transport can map into, by id, with their sizes in bytes. */
  sharedMemory: ReadonlyMap<number, bigint>;
  /** One line per missing capability: what is missing and why (e.g. "SHMEM_MAP: protocol feature not negotiated"). */
  missing: readonly string[];
}

export interface SharedMapping {
  shmid: number;
  shmOffset: bigint;
  fd: number;
  fdOffset: bigint;
  length: bigint;
  writable: boolean;
}

/**
 * Lends a queue's kick and call eventfds to a native thread (the mapped data path's doorbell thread): while a
 * queue is taken, the transport stops watching its kick fd and the model is not called for its kicks. The fds
 * handed out are duplicates the taker owns and closes; the transport keeps its own.
 *
 * The transport ends a lend by itself ("revokes" it) when the fds it handed out stop being the queue's (vhost-user:
 * a new SET_VRING_KICK or SET_VRING_CALL), when the queue stops (GET_VRING_BASE), on a device reset and when the
 * connection goes away. It then serves the queue itself again (no kick is lost) and calls `onRevoked` with the
 * reason: the taker stops using and closes its duplicates, and may take the queue again for the new fds.
 */
export interface QueueOffload {
  /** Takes queue `index`; undefined (with the reason logged) when the transport cannot lend it now. */
  take(index: number, onRevoked?: (reason: string) => void): { kickFd: number; callFd: number | undefined } | undefined;
  /**
   * Gives queue `index` back: the transport watches its kick again and serves a kick that came meanwhile. After a
   * revocation it does nothing.
   */
  giveBack(index: number): void;
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
  acceptFeatures?(features: bigint, transport: TransportFacts): boolean;
  /**
   * Optional: the shared memory regions (id -> bytes) the model asks the transport to expose, fixed for the model's
   * life (vhost-user: the answer to GET_SHMEM_CONFIG). A transport that cannot expose them maps nothing into them.
   */
  readonly sharedMemoryRegions?: ReadonlyMap<number, bigint>;
  /** DRIVER_OK: start serving. */
  activate(ctx: ActivationContext): void;
  /**
   * Optional: the guest memory map changed while active (regions added or removed, the table replaced). Called
   * before the transport unmaps any dropped region: the model re-checks every ring and buffer it holds against
   * `memory`, stops using whatever is gone (and tells the driver as its spec says), and keeps no view into the old
   * map. A model without it holds no guest memory across calls.
   */
  memoryChanged?(memory: GuestMemory): void;
  /** The driver notified (kicked) queue `index`. Only called while active. */
  queueNotify(index: number): void;
  /** Stop serving and release everything the activation created (host resources included). */
  reset(): void;
}
