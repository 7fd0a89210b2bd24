// The vfio-user transport: the virtio device presented as a whole PCI function to a vfio-user client (QEMU >= 10.1's
// vfio-user-pci, unmodified: it never looks at a virtio ID). libvfio-user (bound by the addon,
// vmm-device/native/vfio-user.ts) speaks the protocol and keeps config space; this file sets the function up
// (virtio-pci/layout.ts), routes BAR accesses to the virtio-pci function (virtio-pci/function.ts), turns DMA_MAP /
// DMA_UNMAP into guest memory through the host layer's fd regions, and delivers interrupts through the eventfds the
// client gave (MSI-X when the driver enabled it, else INTx).
//
// One client at a time, as QEMU expects: when it goes away the device is reset, its memory released, and the
// server waits for the next one on the same socket.
//
// Every BAR area traps (REGION_READ/WRITE messages): a doorbell is a round trip over the socket. The notify area
// could be a sparse-mmap area of a memfd instead, but then nothing would tell the backend that a doorbell was
// written (QEMU's vfio-user client has no ioeventfd support for regions), so it stays trapped. Host queue mapping
// is not offered: QEMU maps a BAR's sparse areas once, when the BAR is set up, and accepts no mapping later.

import fs from 'node:fs';
import type { GuestMemory } from '../../memory/guest-memory.ts';
import type { Logger } from '../../util/log.ts';
import type { HostOps, Watch } from '../../host/host.ts';
import { guestMemoryOf, mapFdRegion, unmapFdRegion, type MappedFdRegion } from '../../host/fd-region.ts';
import type { HostPageCapabilities, HostPageMapper, VirtioDeviceModel } from '../../virtio/device.ts';
import {
  CAP_READONLY,
  IrqType,
  REGION_MEM,
  REGION_READ,
  REGION_WRITE,
  ResetType,
  createVfioUserContext,
  type VfioUserCallbacks,
  type VfioUserContext,
} from '../../native/vfio-user.ts';
import { VirtioPciFunction } from '../virtio-pci/function.ts';
import { MSIX_ENABLE, MSIX_FUNCTION_MASK, VIRTIO_BAR } from '../virtio-pci/layout.ts';

/** Messages handled per readiness callback before yielding to the rest of the loop. */
export const MAX_MESSAGES_PER_TURN = 64;
/** PCI config space offset of the interrupt pin. */
const PCI_INTERRUPT_PIN = 0x3d;
const EIO = 5;
/** syslog levels libvfio-user logs with. */
const LOG_ERR = 3;
const LOG_WARNING = 4;

/** Why this transport cannot map host pages into the guest (HostPageMapper.capabilities().missing). */
export const VFIO_USER_MAPPING_MISSING = [
  'queue notifier: vfio-user maps BAR areas (sparse mmap) only when the client sets the BAR up; no mapping can be added while the guest runs',
  'shared memory regions: not exposed over vfio-user (the same reason: no mapping can be added at run time)',
];

export class VfioUserHostPages implements HostPageMapper {
  capabilities(): HostPageCapabilities {
    return { queueNotifier: false, sharedMemory: new Map(), missing: VFIO_USER_MAPPING_MISSING };
  }
  mapQueueNotifier(): Promise<void> {
    return Promise.reject(new Error(VFIO_USER_MAPPING_MISSING[0]));
  }
  unmapQueueNotifier(): Promise<void> {
    return Promise.reject(new Error(VFIO_USER_MAPPING_MISSING[0]));
  }
  mapShared(): Promise<void> {
    return Promise.reject(new Error(VFIO_USER_MAPPING_MISSING[1]));
  }
  unmapShared(): Promise<void> {
    return Promise.reject(new Error(VFIO_USER_MAPPING_MISSING[1]));
  }
}

export interface VfioUserCounters {
  connections: number;
  dmaMaps: number;
  dmaUnmaps: number;
  /** DMA regions that came without a usable fd or failed to map (the device cannot reach them). */
  unmappableDma: number;
  /** Interrupts the client gave no eventfd for. */
  droppedInterrupts: number;
  resets: number;
  /** Callbacks that failed inside the backend (answered EIO). */
  callbackErrors: number;
}

export interface VfioUserServerOptions {
  path: string;
  host: HostOps;
  model: VirtioDeviceModel;
  log: Logger;
  /** The context factory (tests may wrap it); default: the addon's libvfio-user. */
  createContext?: (path: string, callbacks: VfioUserCallbacks) => VfioUserContext;
}

export class VfioUserServer {
  readonly fn: VirtioPciFunction;
  readonly counters: VfioUserCounters = { connections: 0, dmaMaps: 0, dmaUnmaps: 0, unmappableDma: 0, droppedInterrupts: 0, resets: 0, callbackErrors: 0 };
  private ctx: VfioUserContext | undefined;
  private watch: Watch | undefined;
  private attached = false;
  private msixCapOffset = 0;
  private readonly regions = new Map<number, MappedFdRegion>();
  private readonly log: Logger;
  /** Called when a client attaches and when it goes away (tests). */
  onClient: ((attached: boolean) => void) | undefined;

  constructor(private readonly opts: VfioUserServerOptions) {
    this.log = opts.log;
    this.fn = new VirtioPciFunction({
      model: opts.model,
      log: opts.log,
      hostPages: new VfioUserHostPages(),
      interrupts: {
        msixEnabled: () => this.msixEnabled(),
        msix: (v) => this.trigger(v),
        intx: () => this.trigger(0),
      },
    });
  }

  get isAttached(): boolean {
    return this.attached;
  }

  /** Creates the PCI function on the socket and starts waiting for a client (on Node's loop). */
  listen(): void {
    if (this.ctx !== undefined) throw new Error('already listening');
    removeStaleSocket(this.opts.path);
    const ctx = (this.opts.createContext ?? createVfioUserContext)(this.opts.path, this.callbacks());
    try {
      const l = this.fn.layout;
      ctx.pciInit(l.vendorId, l.deviceId, l.subsystemVendorId, l.subsystemId, l.classBase, l.classSub, l.classProg, l.revision);
      ctx.writeConfig(PCI_INTERRUPT_PIN, Uint8Array.of(l.interruptPin));
      for (const cap of l.capabilities) ctx.addCapability(0, CAP_READONLY, cap);
      this.msixCapOffset = ctx.addCapability(0, 0, l.msixCapability);
      for (const bar of l.bars) ctx.setupRegion(bar.index, bar.size, REGION_READ | REGION_WRITE | REGION_MEM, -1, 0, []);
      ctx.setupIrqs(IrqType.INTX, 1);
      ctx.setupIrqs(IrqType.MSIX, l.msixVectors);
      ctx.realize();
    } catch (e) {
      ctx.destroy();
      throw e;
    }
    this.ctx = ctx;
    this.watchPollFd();
    this.log.log('info', 'listening (vfio-user)', { path: this.opts.path });
  }

  private watchPollFd(): void {
    this.watch?.stop();
    this.watch = this.opts.host.watchReadable(this.ctx!.pollFd(), () => this.onReadable());
  }

  private onReadable(): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    try {
      if (!this.attached) {
        if (!ctx.attach()) return;
        this.attached = true;
        this.counters.connections++;
        this.log.log('info', 'vfio-user client attached');
        this.watchPollFd(); // the connection's fd from now on
        this.onClient?.(true);
        return;
      }
      for (let i = 0; i < MAX_MESSAGES_PER_TURN; i++) {
        const n = ctx.run();
        if (n === 0) return;
        if (n < 0) {
          this.clientGone('the client closed the connection');
          return;
        }
      }
    } catch (e) {
      // A protocol failure libvfio-user cannot recover from on this connection: drop the client, keep serving.
      this.log.log('error', 'vfio-user connection failed', { error: (e as Error).message });
      this.clientGone((e as Error).message);
    }
  }

  private clientGone(reason: string): void {
    if (!this.attached) return;
    this.attached = false;
    this.log.log('info', 'vfio-user client gone', { reason });
    // libvfio-user removed the DMA regions and reset the device (callbacks) before reporting it; anything left is
    // released here.
    this.fn.reset();
    this.releaseRegions();
    this.watchPollFd(); // the listening socket again
    this.onClient?.(false);
  }

  // -------------------------------------------------------------------------------------------------------------
  // libvfio-user callbacks (all synchronous, from inside run()/attach(); none may throw)

  private callbacks(): VfioUserCallbacks {
    const guard = <A extends unknown[]>(what: string, f: (...a: A) => number | void, onError: number | void): ((...a: A) => number | void) => {
      return (...a: A) => {
        try {
          return f(...a);
        } catch (e) {
          this.counters.callbackErrors++;
          this.log.log('error', `vfio-user ${what} failed`, { error: (e as Error).message, stack: (e as Error).stack });
          return onError;
        }
      };
    };
    return {
      regionAccess: guard('region access', (region: number, offset: number, bytes: Uint8Array, isWrite: boolean) => this.regionAccess(region, offset, bytes, isWrite), -EIO) as VfioUserCallbacks['regionAccess'],
      dmaMap: guard('DMA map', (iova: number, length: number, fd: number, fdOffset: number) => this.dmaMap(iova, length, fd, fdOffset), undefined),
      dmaUnmap: guard('DMA unmap', (iova: number, length: number) => this.dmaUnmap(iova, length), undefined),
      reset: guard('reset', (type: number) => this.deviceReset(type), -EIO) as (type: number) => number,
      quiesce: () => 0, // everything the device does happens in these callbacks or on this thread: always quiet here
      irqState: guard('irq state', (type: number, _start: number, _count: number, masked: boolean) => {
        if (type === IrqType.INTX && !masked) this.fn.intxUnmasked();
      }, undefined),
      log: (level, message) => this.log.log(level <= LOG_ERR ? 'error' : level === LOG_WARNING ? 'warn' : 'debug', `libvfio-user: ${message}`),
    };
  }

  private regionAccess(region: number, offset: number, bytes: Uint8Array, isWrite: boolean): number {
    if (region === VIRTIO_BAR) {
      if (isWrite) this.fn.barWrite(region, offset, bytes);
      else this.fn.barRead(region, offset, bytes);
    } else if (!isWrite) {
      bytes.fill(0); // the MSI-X table and PBA: the client emulates them; reads that reach here see zeros
    }
    // Accesses to registers that do not exist read as zeros and drop writes, as on PCI (counted by the function).
    return bytes.length;
  }

  private dmaMap(iova: number, length: number, fd: number, fdOffset: number): void {
    this.counters.dmaMaps++;
    if (fd < 0) {
      this.counters.unmappableDma++;
      this.log.log('warn', 'DMA region without a mappable fd; the device cannot reach it', { iova: '0x' + iova.toString(16), length, errno: -fd });
      return;
    }
    let region: MappedFdRegion;
    try {
      region = mapFdRegion(this.opts.host, { guestPhysAddr: iova, size: length, userAddr: iova, mmapOffset: fdOffset }, fd);
    } catch (e) {
      this.opts.host.close(fd);
      this.counters.unmappableDma++;
      this.log.log('error', 'DMA region not mapped', { iova: '0x' + iova.toString(16), length, error: (e as Error).message });
      return;
    }
    const previous = this.regions.get(iova);
    this.regions.set(iova, region);
    try {
      this.installMemory();
    } catch (e) {
      // Overlapping or malformed map: the new region is dropped, the old map stays.
      if (previous === undefined) this.regions.delete(iova);
      else this.regions.set(iova, previous);
      unmapFdRegion(this.opts.host, region, this.log);
      this.counters.unmappableDma++;
      this.log.log('error', 'DMA region refused', { iova: '0x' + iova.toString(16), length, error: (e as Error).message });
      return;
    }
    if (previous !== undefined) unmapFdRegion(this.opts.host, previous, this.log);
  }

  private dmaUnmap(iova: number, _length: number): void {
    this.counters.dmaUnmaps++;
    const region = this.regions.get(iova);
    if (region === undefined) return; // one we could not map
    this.regions.delete(iova);
    // The device is told first (queues rebuilt, the model re-checks what it holds), then the pages go.
    this.installMemory();
    unmapFdRegion(this.opts.host, region, this.log);
  }

  private installMemory(): void {
    const memory: GuestMemory = guestMemoryOf([...this.regions.values()]);
    this.fn.setMemory(memory);
  }

  private deviceReset(type: number): number {
    this.counters.resets++;
    this.log.log('info', 'device reset', { type: type === ResetType.LOST_CONNECTION ? 'lost connection' : type === ResetType.PCI_FLR ? 'FLR' : 'device' });
    this.fn.reset();
    return 0;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Interrupts

  private msixEnabled(): boolean {
    if (this.ctx === undefined || this.msixCapOffset === 0) return false;
    const control = this.ctx.readConfig(this.msixCapOffset + 2, 2);
    const value = control[0]! | (control[1]! << 8);
    return (value & MSIX_ENABLE) !== 0 && (value & MSIX_FUNCTION_MASK) === 0;
  }

  private trigger(vector: number): void {
    if (this.ctx === undefined || !this.attached) return;
    const err = this.ctx.trigger(vector);
    if (err !== 0) this.counters.droppedInterrupts++;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Teardown

  private releaseRegions(): void {
    const all = [...this.regions.values()];
    this.regions.clear();
    if (all.length > 0) this.fn.setMemory(guestMemoryOf([]));
    for (const r of all) unmapFdRegion(this.opts.host, r, this.log);
  }

  /** Drops the client (if any), resets the device, releases its memory, closes the socket. */
  close(): void {
    this.watch?.stop();
    this.watch = undefined;
    this.fn.reset();
    this.releaseRegions();
    this.attached = false;
    this.ctx?.destroy();
    this.ctx = undefined;
    removeStaleSocket(this.opts.path);
  }
}

/** libvfio-user binds the path itself and refuses an existing file: a socket left by a previous run is removed. */
function removeStaleSocket(path: string): void {
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    /* absent */
  }
}
