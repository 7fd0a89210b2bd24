// The virtio device core: feature negotiation, the device status state machine, bounds-checked configuration
// space, and what happens when a queue breaks. Transports (vhost-user, vfio-user, the in-process test transport)
// call it; it calls the device model. It owns no sockets and no eventfds: interrupts go out through TransportHooks.

import type { GuestMemory } from '../memory/guest-memory.ts';
import type { Logger } from '../util/log.ts';
import { VirtqueueError } from '../virtqueue/errors.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import {
  F_EVENT_IDX,
  F_INDIRECT_DESC,
  F_RING_PACKED,
  F_VERSION_1,
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  bit,
  statusNames,
} from '../abi/virtio.ts';
import type { HostPageMapper, QueueOffload, VirtioDeviceModel } from './device.ts';

/** What the core needs from the transport. */
export interface TransportHooks {
  /** Send a used-buffer notification for queue `index`. */
  interrupt(index: number): void;
  /** Send a configuration change notification (config generation moved, or NEEDS_RESET was set). */
  configInterrupt(): void;
  /** The transport's host-page mapping service, if it has one (passed to the model at activation). */
  hostPages?: HostPageMapper;
  /** The transport's queue offload, if it has one (passed to the model at activation). */
  queueOffload?: QueueOffload;
}

/** The transport-independent feature bits the core implements (the queue engine supports them all). */
export const CORE_FEATURES = bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX) | bit(F_RING_PACKED);

export interface CoreCounters {
  /** Feature bits the driver acked that were never offered (masked off). */
  unofferedFeatureBits: number;
  /** Feature writes refused because FEATURES_OK was already set. */
  lateFeatureWrites: number;
  /** Status writes that broke the initialisation order (ignored). */
  invalidStatusWrites: number;
  /** FEATURES_OK refused (VERSION_1 missing or the model rejected the set). */
  featuresRejected: number;
  /** Config accesses outside the config space, and writes to read-only config. */
  configAccessErrors: number;
  /** Queues broken by a driver bug (NEEDS_RESET raised). */
  queueErrors: number;
  /** Kicks for queues that are not running. */
  ignoredKicks: number;
  /** Failures inside the device model (deviceFailed, or a model call that threw): NEEDS_RESET raised. */
  deviceFailures: number;
  /** Memory map changes delivered to the active model. */
  memoryChanges: number;
}

export class VirtioDeviceCore {
  readonly offeredFeatures: bigint;
  private status = 0;
  private acked = 0n;
  private generation = 0;
  private active = false;
  /** The model failed (deviceFailed): no more kicks reach it until the reset the driver must do. */
  private failed = false;
  private memory: GuestMemory | undefined;
  private readonly queues: (DeviceQueue | undefined)[];
  private readonly stopped: boolean[];
  readonly counters: CoreCounters = {
    unofferedFeatureBits: 0,
    lateFeatureWrites: 0,
    invalidStatusWrites: 0,
    featuresRejected: 0,
    configAccessErrors: 0,
    queueErrors: 0,
    ignoredKicks: 0,
    deviceFailures: 0,
    memoryChanges: 0,
  };

  constructor(
    readonly model: VirtioDeviceModel,
    private readonly hooks: TransportHooks,
    private readonly log: Logger,
    /** Core features the transport cannot carry (e.g. RING_PACKED over a frontend without it). */
    withheldFeatures = 0n,
  ) {
    this.offeredFeatures = (model.deviceFeatures | CORE_FEATURES) & ~withheldFeatures;
    this.queues = new Array<DeviceQueue | undefined>(model.queueCount).fill(undefined);
    this.stopped = new Array<boolean>(model.queueCount).fill(false);
  }

  get deviceStatus(): number {
    return this.status;
  }

  get features(): bigint {
    return this.acked;
  }

  get configGeneration(): number {
    return this.generation;
  }

  get isActive(): boolean {
    return this.active;
  }

  queue(index: number): DeviceQueue | undefined {
    return this.queues[index];
  }

  /** The driver's feature write. Bits never offered are masked off (counted and logged). */
  setDriverFeatures(value: bigint): void {
    if ((this.status & STATUS_FEATURES_OK) !== 0) {
      this.counters.lateFeatureWrites++;
      this.log.log('warn', 'feature write after FEATURES_OK ignored', { value: '0x' + value.toString(16) });
      return;
    }
    const unoffered = value & ~this.offeredFeatures;
    if (unoffered !== 0n) {
      this.counters.unofferedFeatureBits++;
      this.log.log('warn', 'driver acked feature bits that were not offered; masked', { bits: '0x' + unoffered.toString(16) });
    }
    this.acked = value & this.offeredFeatures;
  }

  hasFeature(n: bigint): boolean {
    return (this.acked & bit(n)) !== 0n;
  }

  /**
   * The transport hands over guest memory (before DRIVER_OK, or again when the memory map changes). While active the
   * model is told at once, before the transport unmaps any dropped region, so that it never touches one again.
   */
  setMemory(memory: GuestMemory): void {
    this.memory = memory;
    if (!this.active || this.model.memoryChanged === undefined) return;
    this.counters.memoryChanges++;
    try {
      this.model.memoryChanged(memory);
    } catch (e) {
      this.deviceFailed(e as Error, 'memory map change');
    }
  }

  /**
   * The transport hands over a configured queue (or removes it): before DRIVER_OK, or while active when the
   * transport rebuilt a started queue over a new memory map (the model reads `ActivationContext.queues` afresh
   * each time, so it sees the new one). A queue stopped by a driver bug stays stopped until the reset.
   */
  setQueue(index: number, queue: DeviceQueue | undefined): void {
    this.checkIndex(index);
    this.queues[index] = queue;
    if (!this.active) this.stopped[index] = false;
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.queues.length) {
      throw new RangeError(`queue index ${index} is not below the queue count ${this.queues.length}`);
    }
  }

  /**
   * A status write from the driver. Writing 0 resets the device. Otherwise bits are only added, in the order of
   * virtio 1.2 section 3.1.1; a write that breaks the order is counted, logged and ignored. NEEDS_RESET belongs
   * to the device and is kept as the device has it.
   */
  setStatus(value: number): void {
    if (value === 0) {
      this.reset();
      return;
    }
    const driverBits = value & ~STATUS_DEVICE_NEEDS_RESET & 0xff;
    const old = this.status & ~STATUS_DEVICE_NEEDS_RESET;
    const why = this.checkTransition(old, driverBits);
    if (why !== undefined) {
      this.counters.invalidStatusWrites++;
      this.log.log('warn', `status write ignored: ${why}`, { from: statusNames(this.status), to: statusNames(value) });
      return;
    }
    let next = driverBits | (this.status & STATUS_DEVICE_NEEDS_RESET);
    const added = driverBits & ~old;
    if ((added & STATUS_FEATURES_OK) !== 0 && !this.acceptFeatures()) {
      next &= ~STATUS_FEATURES_OK; // the driver re-reads status and sees the refusal
    }
    this.status = next;
    if ((added & STATUS_FAILED) !== 0) this.log.log('warn', 'driver set FAILED');
    if ((added & STATUS_DRIVER_OK) !== 0 && (next & STATUS_FEATURES_OK) !== 0) this.activate();
  }

  private checkTransition(old: number, next: number): string | undefined {
    if ((old & ~next) !== 0) return `bits ${statusNames(old & ~next)} cleared without a reset`;
    if ((next & STATUS_DRIVER) !== 0 && (next & STATUS_ACKNOWLEDGE) === 0) return 'DRIVER without ACKNOWLEDGE';
    if ((next & STATUS_FEATURES_OK) !== 0 && (next & STATUS_DRIVER) === 0) return 'FEATURES_OK without DRIVER';
    if ((next & STATUS_DRIVER_OK) !== 0 && (next & STATUS_FEATURES_OK) === 0) return 'DRIVER_OK without FEATURES_OK';
    if ((next & STATUS_DRIVER_OK) !== 0 && (old & STATUS_FEATURES_OK) === 0 && (next & STATUS_FEATURES_OK) !== 0) {
      return 'FEATURES_OK and DRIVER_OK in one write (the driver must check FEATURES_OK first)';
    }
    return undefined;
  }

  private acceptFeatures(): boolean {
    if (!this.hasFeature(F_VERSION_1)) {
      this.counters.featuresRejected++;
      this.log.log('warn', 'FEATURES_OK refused: VERSION_1 not accepted (legacy drivers are not supported)');
      return false;
    }
    if (this.model.acceptFeatures === undefined) return true;
    let accepted: boolean;
    try {
      accepted = this.model.acceptFeatures(this.acked, { hostPages: this.hooks.hostPages?.capabilities() });
    } catch (e) {
      // A model that throws here is a bug in the model: refuse (the driver sees it), keep the process.
      this.log.log('error', 'the device model failed to judge the features; FEATURES_OK refused', { error: (e as Error).message });
      accepted = false;
    }
    if (!accepted) {
      this.counters.featuresRejected++;
      this.log.log('warn', 'FEATURES_OK refused by the device model', { features: '0x' + this.acked.toString(16) });
    }
    return accepted;
  }

  private activate(): void {
    const memory = this.memory;
    if (memory === undefined) {
      this.raiseNeedsReset('DRIVER_OK without guest memory');
      return;
    }
    try {
      this.model.activate({
        features: this.acked,
        memory,
        queues: this.queues,
        interrupt: (i) => this.hooks.interrupt(i),
        queueBroken: (i, e) => this.queueBroken(i, e),
        deviceFailed: (e) => this.deviceFailed(e, 'device model'),
        hostPages: this.hooks.hostPages,
        queueOffload: this.hooks.queueOffload,
        log: this.log,
      });
      this.active = true;
    } catch (e) {
      // The model refused or failed to start: NEEDS_RESET. What it created before failing is released by the
      // driver's reset (reset() calls the model whenever the status is not 0).
      this.deviceFailed(e as Error, 'activation');
    }
  }

  /** A kick from the driver for queue `index`. */
  notify(index: number): void {
    if (!this.active || this.failed || index < 0 || index >= this.queues.length || this.queues[index] === undefined || this.stopped[index]) {
      this.counters.ignoredKicks++;
      return;
    }
    try {
      this.model.queueNotify(index);
    } catch (e) {
      // A model that throws is a bug in the model, not a ring the driver broke: NEEDS_RESET as a device failure
      // (the ring's err eventfd stays quiet), the process goes on.
      this.deviceFailed(e as Error, `kick of queue ${index}`);
    }
  }

  /**
   * A failure inside the model that no driver action caused: NEEDS_RESET, logged with where it came from. The model
   * gets no more kicks until the reset (it would most likely fail again); memory map changes still reach it.
   */
  deviceFailed(error: Error, where: string): void {
    this.counters.deviceFailures++;
    this.failed = true;
    this.log.log('error', 'device model failed; device needs reset', { where, error: error?.message ?? String(error), stack: error?.stack });
    this.raiseNeedsReset(`${where}: ${error?.message ?? String(error)}`);
  }

  /** A driver bug found in queue `index`: stop it, set NEEDS_RESET, tell the driver. */
  queueBroken(index: number, error: Error): void {
    this.counters.queueErrors++;
    if (index >= 0 && index < this.stopped.length) this.stopped[index] = true;
    const kind = error instanceof VirtqueueError ? error.kind : error.name;
    this.log.log('error', 'queue broken by the driver; device needs reset', { queue: index, kind, detail: error.message });
    this.raiseNeedsReset(`queue ${index}: ${kind}`);
  }

  private raiseNeedsReset(why: string): void {
    if ((this.status & STATUS_DEVICE_NEEDS_RESET) === 0) {
      this.log.log('error', 'DEVICE_NEEDS_RESET', { why });
      this.status |= STATUS_DEVICE_NEEDS_RESET;
    }
    this.hooks.configInterrupt();
  }

  isQueueStopped(index: number): boolean {
    return this.stopped[index] ?? true;
  }

  /**
   * Device reset (status 0, or the transport's own reset): the model releases everything. A model that throws
   * here is a bug in it: logged and counted, and the device is reset all the same (a reset cannot be refused).
   */
  reset(): void {
    if (this.active || this.status !== 0) {
      try {
        this.model.reset();
      } catch (e) {
        this.counters.deviceFailures++;
        this.log.log('error', 'the device model failed to reset; reset anyway', { error: (e as Error)?.message ?? String(e), stack: (e as Error)?.stack });
      }
    }
    this.active = false;
    this.failed = false;
    this.status = 0;
    this.acked = 0n;
    this.queues.fill(undefined);
    this.stopped.fill(false);
  }

  /** The largest size the driver may give queue `index`; 0 (no size accepted) when the model fails to say. */
  maxQueueSize(index: number): number {
    try {
      return this.model.maxQueueSize(index);
    } catch (e) {
      this.deviceFailed(e as Error, `size limit of queue ${index}`);
      return 0;
    }
  }

  /** Reads `len` bytes of device configuration at `offset`; undefined (counted) when out of bounds. */
  readConfig(offset: number, len: number): Uint8Array | undefined {
    if (!this.configRangeOk(offset, len)) return undefined;
    const out = new Uint8Array(len);
    try {
      this.model.readConfig(offset, out);
    } catch (e) {
      this.deviceFailed(e as Error, 'configuration read');
      return undefined;
    }
    return out;
  }

  /** Writes device configuration; false (counted) when out of bounds or read-only. */
  writeConfig(offset: number, data: Uint8Array): boolean {
    if (!this.configRangeOk(offset, data.length)) return false;
    let written: boolean;
    try {
      written = this.model.writeConfig(offset, data);
    } catch (e) {
      this.deviceFailed(e as Error, 'configuration write');
      return false;
    }
    if (!written) {
      this.counters.configAccessErrors++;
      this.log.log('warn', 'write to read-only device configuration dropped', { offset, len: data.length });
      return false;
    }
    return true;
  }

  private configRangeOk(offset: number, len: number): boolean {
    const ok = Number.isInteger(offset) && Number.isInteger(len) && offset >= 0 && len >= 0 && offset + len <= this.model.configSize;
    if (!ok) {
      this.counters.configAccessErrors++;
      this.log.log('warn', 'device configuration access out of bounds', { offset, len, configSize: this.model.configSize });
    }
    return ok;
  }

  /** The model changed its configuration: bump the generation and notify the driver. */
  configChanged(): void {
    this.generation = (this.generation + 1) >>> 0;
    this.hooks.configInterrupt();
  }
}

/**
 * Serves every available chain of `queue` with `handle`, in the loop virtio prescribes: notifications off, drain,
 * notifications on, and drain again if buffers arrived meanwhile. Returns the error that broke the queue, if any
 * (the caller passes it to ActivationContext.queueBroken).
 */
export function drainQueue(queue: DeviceQueue, handle: (chain: DescriptorChain) => void): VirtqueueError | undefined {
  do {
    queue.disableNotifications();
    for (;;) {
      const chain = queue.pop();
      if (chain === null) break;
      if (chain instanceof VirtqueueError) return chain;
      handle(chain);
    }
  } while (queue.enableNotifications());
  return undefined;
}
