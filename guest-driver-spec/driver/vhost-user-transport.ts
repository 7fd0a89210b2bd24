// The driver's transport over the reference vhost-user front-end (guest-driver-spec/frontend/): this process plays
// both the guest and QEMU. Guest RAM is the front-end's memfd; the driver's rings are built in it with the test
// kit; a notification is a write to the queue's kick eventfd (what QEMU's ioeventfd does for a guest's notify
// write); an interrupt is the queue's call eventfd firing.
//
// The virtio status and feature registers live in QEMU, not in the back-end: QEMU accepts FEATURES_OK when the
// guest's features are a subset of what the back-end offered, and talks to the back-end only when the guest sets
// DRIVER_OK (vhost_dev_start: SET_FEATURES, memory table, rings, SET_STATUS). This transport does the same, with
// the front-end's start() sequence, and afterwards reads the back-end's status with GET_STATUS, so a back-end that
// refuses FEATURES_OK (VHOST_USER_PROTOCOL_F_STATUS) is seen.
//
// Shared memory regions (spec 13.14): the front-end asks GET_SHMEM_CONFIG when it creates the device and serves the
// back-end's SHMEM_MAP/UNMAP by mapping the fds into this process (frontend/shmem.ts), so sharedMemory(shmid) is a
// window whose loads and stores reach the back-end's pages directly, with a direct view where a mapping is writable.
//
// vhost-user has no configuration generation counter: one GET_CONFIG message is answered from one snapshot of the
// configuration, so the driver reads the fields that must be consistent (gid and mac) in one readConfig call.

import { VhostUserFrontend } from '../frontend/frontend.ts';
import type { GuestRam } from '../frontend/guest-ram.ts';
import { ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, hasBit } from '../../vmm-device/transport/vhost-user/messages.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';
import { STATUS_DRIVER_OK, STATUS_FEATURES_OK } from '../../vmm-device/abi/virtio.ts';
import { CallWaiters } from './call-waiter.ts';
import { DriverMemory, type AllocatableRange } from './memory.ts';
import { TransportError, type DriverTransport, type SharedMemoryWindow } from './transport.ts';
import { DriverVirtqueue, type DriverVirtqueueOptions } from './virtqueue.ts';

/** Queue size QEMU's generic vhost-user device gives every queue by default (its `vq_size` property). */
export const DEFAULT_VHOST_USER_QUEUE_SIZE = 256;

export interface VhostUserTransportOptions {
  host: SysHost;
  /** The back-end's socket. */
  socketPath: string;
  /** Guest RAM (the front-end's memfds); the caller releases it after close(). */
  ram: GuestRam;
  /** Queues the device has: 2 + doorbell queues (QEMU's `num_vqs`). */
  queues: number;
  /** Guest physical ranges the driver may allocate from; default every RAM region whole. */
  allocatable?: readonly AllocatableRange[];
  /** Largest queue size (QEMU's `vq_size`). */
  maxQueueSize?: number;
}

export class VhostUserTransport implements DriverTransport {
  readonly kind = 'vhost-user front-end';
  readonly memory: DriverMemory;
  private status = 0;
  private driverFeatures = 0n;
  private started = false;
  private readonly queues = new Map<number, DriverVirtqueue>();
  private readonly calls: CallWaiters;

  private constructor(
    readonly fe: VhostUserFrontend,
    readonly ram: GuestRam,
    private readonly offered: bigint,
    private readonly queueCount: number,
    private readonly queueSizeLimit: number,
    allocatable: readonly AllocatableRange[],
  ) {
    this.memory = new DriverMemory(ram.memory, allocatable);
    this.calls = new CallWaiters(fe.host);
  }

  /** Connects to the back-end and runs QEMU's device-creation sequence (features, protocol features, eventfds). */
  static async open(o: VhostUserTransportOptions): Promise<VhostUserTransport> {
    const fe = await VhostUserFrontend.connect(o.host, o.socketPath);
    try {
      const init = await fe.init({ queues: o.queues });
      const offered = init.features & ~(1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES));
      const ranges = o.allocatable ?? o.ram.regions.map((r) => ({ gpa: r.gpa, size: r.size }));
      return new VhostUserTransport(fe, o.ram, offered, init.queueNum, o.maxQueueSize ?? DEFAULT_VHOST_USER_QUEUE_SIZE, ranges);
    } catch (e) {
      fe.close();
      throw e;
    }
  }

  private get backendStatus(): boolean {
    return hasBit(this.fe.protocolFeatures, ProtocolFeature.STATUS);
  }

  async reset(): Promise<void> {
    if (this.started) {
      await this.fe.stop([...this.queues.keys()]);
      // SET_STATUS 0 has no reply: wait until the back-end has processed it, as a driver waits for status 0.
      await this.fe.sync();
      this.started = false;
    }
    for (const q of this.queues.values()) q.release();
    this.queues.clear();
    this.status = 0;
    this.driverFeatures = 0n;
  }

  async getStatus(): Promise<number> {
    if (this.started && this.backendStatus) return this.fe.getStatus();
    return this.status;
  }

  async setStatus(status: number): Promise<void> {
    if (status === 0) return this.reset();
    let next = status;
    if ((status & STATUS_FEATURES_OK) !== 0 && (this.status & STATUS_FEATURES_OK) === 0) {
      // QEMU's check: the guest may not accept a feature the device did not offer.
      if ((this.driverFeatures & ~this.offered) !== 0n) next &= ~STATUS_FEATURES_OK;
    }
    this.status = next;
    if ((next & STATUS_DRIVER_OK) !== 0 && !this.started) {
      const queues = [...this.queues.values()].map((q) => ({ index: q.index, size: q.size, desc: q.descAddr, avail: q.availAddr, used: q.usedAddr }));
      await this.fe.start({ ram: this.ram, features: this.driverFeatures, queues });
      this.started = true;
    }
  }

  async deviceFeatures(): Promise<bigint> {
    return this.offered;
  }

  async writeDriverFeatures(features: bigint): Promise<void> {
    if (this.started) throw new TransportError('features written after DRIVER_OK');
    this.driverFeatures = features;
  }

  async readConfig(offset: number, size: number): Promise<Uint8Array> {
    return this.fe.getConfig(offset, size);
  }

  async configGeneration(): Promise<number> {
    return 0;
  }

  async numQueues(): Promise<number | undefined> {
    return this.queueCount;
  }

  async maxQueueSize(): Promise<number> {
    return this.queueSizeLimit;
  }

  async setupQueue(index: number, size: number, options: DriverVirtqueueOptions = {}): Promise<DriverVirtqueue> {
    if (this.started) throw new TransportError(`queue ${index} set up after DRIVER_OK`);
    if (index >= this.queueCount) throw new TransportError(`queue ${index}: the back-end has ${this.queueCount} queues`);
    if (size > this.queueSizeLimit) throw new TransportError(`queue ${index}: size ${size} above ${this.queueSizeLimit}`);
    this.queues.get(index)?.release();
    const q = new DriverVirtqueue(index, size, this.memory, options);
    this.queues.set(index, q);
    return q;
  }

  async notify(index: number): Promise<void> {
    this.fe.kick(index);
  }

  async waitInterrupt(index: number, timeoutMs: number): Promise<boolean> {
    const fd = this.fe.callFds.get(index);
    if (fd === undefined) throw new TransportError(`queue ${index} has no call eventfd`);
    return (await this.calls.wait(fd, timeoutMs)) > 0n;
  }

  async sharedMemory(shmid: number): Promise<SharedMemoryWindow | undefined> {
    return this.fe.shmem?.window(shmid);
  }

  async close(): Promise<void> {
    for (const q of this.queues.values()) q.release();
    this.queues.clear();
    this.calls.close();
    this.fe.close();
  }
}
