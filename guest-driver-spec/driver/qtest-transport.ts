// The driver's transport over real QEMU with no guest OS: PCI, the virtio-pci modern registers, notifications and
// INTx interrupts go through qtest (guest-driver-spec/qtest/), exactly as a guest kernel's virtio-pci driver would
// touch them. Rings and buffers do NOT go through qtest: QEMU's guest RAM is a shared memfd
// (memory-backend-memfd,share=on, as QemuQtest starts it), and this transport maps that same memfd into this
// process (opened through /proc/<qemu pid>/fd), so the driver reads and writes guest RAM directly, with the same
// memory ordering as a guest CPU, and the back-end sees the very same pages. (qtest read/write would make every
// index access a socket round trip, and the driver's memory access is synchronous by design.)
//
// Shared memory regions (spec 13.14) are different: they are in a BAR, not in RAM, and what the back-end maps there
// is only in QEMU's address space, so sharedMemory(shmid) goes through qtest reads and writes at the region's guest
// physical address (found in the function's VIRTIO_PCI_CAP_SHARED_MEMORY_CFG capabilities).
//
// Interrupts: QEMU's vhost-user-device-pci is driven without MSI-X here, so all queues share one INTx line. A
// waiter for queue q waits a short while for the line, then acknowledges it by reading the ISR and returns;
// callers re-check their used ring whatever woke them, so an interrupt meant for another queue costs one extra
// look, never a lost wake-up.

import fs from 'node:fs';
import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';
import {
  COMMON_QUEUE_DESC,
  COMMON_QUEUE_DEVICE,
  COMMON_QUEUE_DRIVER,
  COMMON_QUEUE_ENABLE,
  COMMON_QUEUE_MSIX_VECTOR,
  COMMON_QUEUE_SELECT,
  COMMON_QUEUE_SIZE,
  GUEST_RAM_ALLOC_START,
  VIRTIO_MSI_NO_VECTOR,
  VirtioPciDevice,
  qtestSharedMemoryWindow,
  sharedMemoryRegions,
  type QemuQtest,
  type SharedMemoryRegion,
} from '../qtest/index.ts';
import { DriverMemory, type AllocatableRange } from './memory.ts';
import { TransportError, type DriverTransport, type SharedMemoryWindow } from './transport.ts';
import { DriverVirtqueue, type DriverVirtqueueOptions } from './virtqueue.ts';

/** Longest single wait on the shared INTx line before the caller looks at its ring again. */
export const INTX_POLL_MS = 20;

/** How /proc/<pid>/fd shows a memfd: QEMU names the one of memory-backend-memfd after the backend type. */
export const MEMFD_LINK_PREFIX = '/memfd:';

/**
 * Finds QEMU's guest-RAM memfd (a memfd of exactly the RAM size) and opens it read-write through /proc (same user,
 * so nothing beyond ordinary /proc access is needed).
 */
export function openQemuRamFd(pid: number, ramBytes: number, exclude: ReadonlySet<number> = new Set()): number {
  const dir = `/proc/${pid}/fd`;
  const seen: string[] = [];
  for (const entry of fs.readdirSync(dir)) {
    let target: string;
    try {
      target = fs.readlinkSync(`${dir}/${entry}`);
    } catch {
      continue;
    }
    if (!target.startsWith(MEMFD_LINK_PREFIX)) continue;
    const fd = fs.openSync(`${dir}/${entry}`, 'r+');
    const stat = fs.fstatSync(fd);
    // `exclude`: inodes of memfds already mapped (the boot RAM when looking for a DIMM of the same size).
    if (stat.size === ramBytes && !exclude.has(stat.ino)) return fd;
    const size = stat.size;
    seen.push(`${target} (${size} bytes)`);
    fs.closeSync(fd);
  }
  throw new TransportError(
    `QEMU (pid ${pid}) has no ${exclude.size > 0 ? 'other ' : ''}memfd of ${ramBytes} bytes (memfds: ${seen.join(', ') || 'none'}): start it with -object memory-backend-memfd,share=on`,
  );
}

export interface QtestTransportOptions {
  qemu: QemuQtest;
  host: SysHost;
  /** Virtio device ID to probe for (42). */
  virtioId?: number;
}

export class QtestTransport implements DriverTransport {
  readonly kind = 'qtest virtio-pci';
  readonly memory: DriverMemory;
  private readonly notifyAddresses = new Map<number, number>();
  private readonly queues = new Map<number, DriverVirtqueue>();
  /** RAM added after start (hot-added DIMMs): fd, mapping and memfd inode of each. */
  private readonly addedRam: { fd: number; mapping: ArrayBuffer; ino: number }[] = [];
  private closed = false;
  /** The function's shared memory regions, read from its capabilities on first use. */
  private shmRegions: SharedMemoryRegion[] | undefined;

  private constructor(
    readonly qemu: QemuQtest,
    readonly dev: VirtioPciDevice,
    private readonly host: SysHost,
    private readonly ramFd: number,
    private readonly mapping: ArrayBuffer,
    ramBytes: number,
  ) {
    const memory = new GuestMemory([{ guestPhysAddr: 0, size: ramBytes, buffer: mapping, bufferOffset: 0 }]);
    // The first MiB is left alone, as a real guest leaves it to firmware.
    this.memory = new DriverMemory(memory, [{ gpa: GUEST_RAM_ALLOC_START, size: ramBytes - GUEST_RAM_ALLOC_START }]);
  }

  static async open(o: QtestTransportOptions): Promise<QtestTransport> {
    const dev = await VirtioPciDevice.probe(o.qemu.qtest, { virtioId: o.virtioId ?? 42 });
    const fd = openQemuRamFd(o.qemu.pid, o.qemu.ram.size);
    try {
      const size = o.host.fileSize(fd);
      if (size !== o.qemu.ram.size) throw new TransportError(`QEMU's RAM memfd has ${size} bytes, ${o.qemu.ram.size} expected`);
      const mapping = o.host.mmapShared(fd, size, 0);
      return new QtestTransport(o.qemu, dev, o.host, fd, mapping, size);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /**
   * Maps RAM hot-added to the VM (a DIMM that query-memory-devices places at `gpa`, `size` bytes, backed by a shared
   * memfd) into the driver's guest memory, so that rings and buffers can be placed in it. QEMU's new memfd is found
   * as the boot RAM's is: by size, skipping memfds already mapped.
   */
  addRam(gpa: number, size: number): AllocatableRange {
    if (this.closed) throw new TransportError('transport closed');
    const mapped = new Set([fs.fstatSync(this.ramFd).ino, ...this.addedRam.map((r) => r.ino)]);
    const fd = openQemuRamFd(this.qemu.pid, size, mapped);
    let mapping: ArrayBuffer | undefined;
    try {
      const ino = fs.fstatSync(fd).ino;
      mapping = this.host.mmapShared(fd, size, 0);
      const range = this.memory.addRegion({ guestPhysAddr: gpa, size, buffer: mapping, bufferOffset: 0 });
      this.addedRam.push({ fd, mapping, ino });
      return range;
    } catch (e) {
      if (mapping !== undefined) this.host.munmap(mapping);
      fs.closeSync(fd);
      throw e;
    }
  }

  private commonAddr(field: number): number {
    const bar = this.dev.pci.bar(this.dev.common.bar);
    if (bar?.address === undefined) throw new TransportError(`BAR${this.dev.common.bar} is not placed`);
    return bar.address + this.dev.common.offset + field;
  }

  async reset(): Promise<void> {
    await this.dev.reset();
    for (const q of this.queues.values()) q.release();
    this.queues.clear();
    this.notifyAddresses.clear();
  }
  getStatus(): Promise<number> {
    return this.dev.status();
  }
  setStatus(status: number): Promise<void> {
    return status === 0 ? this.reset() : this.dev.setStatus(status);
  }
  deviceFeatures(): Promise<bigint> {
    return this.dev.deviceFeatures();
  }
  writeDriverFeatures(features: bigint): Promise<void> {
    return this.dev.writeDriverFeatures(features);
  }
  readConfig(offset: number, size: number): Promise<Uint8Array> {
    return this.dev.configRead(offset, size);
  }
  configGeneration(): Promise<number> {
    return this.dev.configGeneration();
  }
  numQueues(): Promise<number | undefined> {
    return this.dev.numQueues();
  }
  maxQueueSize(index: number): Promise<number> {
    return this.dev.queueMaxSize(index);
  }

  async setupQueue(index: number, size: number, options: DriverVirtqueueOptions = {}): Promise<DriverVirtqueue> {
    const max = await this.dev.queueMaxSize(index);
    if (max === 0) throw new TransportError(`queue ${index} does not exist`);
    if (size > max) throw new TransportError(`queue ${index}: size ${size} above the device's ${max}`);
    this.queues.get(index)?.release();
    const q = new DriverVirtqueue(index, size, this.memory, options);
    this.queues.set(index, q);
    const qt = this.qemu.qtest;
    const write64 = async (field: number, value: number): Promise<void> => {
      await qt.writel(this.commonAddr(field), value % 2 ** 32);
      await qt.writel(this.commonAddr(field + 4), Math.floor(value / 2 ** 32));
    };
    await qt.writew(this.commonAddr(COMMON_QUEUE_SELECT), index);
    await qt.writew(this.commonAddr(COMMON_QUEUE_SIZE), size);
    await qt.writew(this.commonAddr(COMMON_QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
    await write64(COMMON_QUEUE_DESC, q.descAddr);
    await write64(COMMON_QUEUE_DRIVER, q.availAddr);
    await write64(COMMON_QUEUE_DEVICE, q.usedAddr);
    this.notifyAddresses.set(index, await this.dev.notifyAddress(index));
    await qt.writew(this.commonAddr(COMMON_QUEUE_SELECT), index);
    await qt.writew(this.commonAddr(COMMON_QUEUE_ENABLE), 1);
    return q;
  }

  async notify(index: number): Promise<void> {
    const addr = this.notifyAddresses.get(index);
    if (addr === undefined) throw new TransportError(`queue ${index} was not set up`);
    await this.qemu.qtest.writew(addr, index);
  }

  async waitInterrupt(_index: number, timeoutMs: number): Promise<boolean> {
    if (!this.dev.interruptRaised()) {
      try {
        await this.dev.waitInterrupt(Math.max(1, Math.min(timeoutMs, INTX_POLL_MS)));
      } catch {
        return false; // no interrupt in this slice: the caller looks at its ring and decides
      }
    }
    await this.dev.readIsr(); // acknowledges: INTx goes low
    return true;
  }

  async sharedMemory(shmid: number): Promise<SharedMemoryWindow | undefined> {
    this.shmRegions ??= await sharedMemoryRegions(this.dev);
    const region = this.shmRegions.find((r) => r.id === shmid);
    return region === undefined ? undefined : qtestSharedMemoryWindow(this.qemu.qtest, region);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const q of this.queues.values()) q.release();
    this.queues.clear();
    this.host.munmap(this.mapping);
    this.host.close(this.ramFd);
    for (const r of this.addedRam.splice(0)) {
      this.host.munmap(r.mapping);
      this.host.close(r.fd);
    }
  }
}
