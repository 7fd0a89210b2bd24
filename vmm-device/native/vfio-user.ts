// The typed face of the addon's `vfioUser` part (native/src/vfio-user/): one libvfio-user server context, a PCI
// function on a Unix socket. libvfio-user answers the protocol; what it leaves to the device comes back through
// VfioUserCallbacks, synchronously, from inside run() (or attach()): the caller watches pollFd() on Node's loop and
// calls attach() until a client is there, then run() whenever the fd is readable. Nothing here knows virtio.

import { loadAddon } from './addon.ts';

/** vfio-user interrupt types (VFIO_PCI_*_IRQ_INDEX). */
export const IrqType = { INTX: 0, MSI: 1, MSIX: 2, ERR: 3, REQ: 4 } as const;
/** Why libvfio-user asks for a reset (vfu_reset_type_t). */
export const ResetType = { DEVICE: 0, LOST_CONNECTION: 1, PCI_FLR: 2 } as const;
/** Region flags (VFU_REGION_FLAG_*). */
export const REGION_READ = 1;
export const REGION_WRITE = 2;
export const REGION_MEM = 4;
/** Capability flags (VFU_CAP_FLAG_*). */
export const CAP_READONLY = 4;
/** PROT_READ / PROT_WRITE of a DMA region. */
export const PROT_READ = 1;
export const PROT_WRITE = 2;

export interface VfioUserCallbacks {
  /**
   * A trapped access to BAR `region`: fill `bytes` (a read) or apply them (a write). Returns bytes.length, or a
   * negative errno that libvfio-user sends back to the client as the reply's error.
   */
  regionAccess(region: number, offset: number, bytes: Uint8Array, isWrite: boolean): number;
  /**
   * DMA_MAP: guest memory [iova, iova + length) is byte `fdOffset` onwards of `fd`, which the callee owns and
   * closes. `fd` is negative (-errno) when the region cannot be mapped here (no fd, or beyond 2^53).
   */
  dmaMap?(iova: number, length: number, fd: number, fdOffset: number, prot: number): void;
  /** DMA_UNMAP (or the client gone): stop using [iova, iova + length) before returning. */
  dmaUnmap?(iova: number, length: number): void;
  /** A device reset (ResetType); 0 or a negative errno. */
  reset?(type: number): number;
  /** libvfio-user needs the device quiet (before DMA changes and resets); 0 or a negative errno. */
  quiesce?(): number;
  /** The client masked or unmasked vectors [start, start + count) of an IrqType (INTx and MSI-X only). */
  irqState?(type: number, start: number, count: number, masked: boolean): void;
  /** libvfio-user's own log lines (syslog levels). */
  log?(level: number, message: string): void;
}

export interface VfioUserContext {
  pciInit(vendor: number, device: number, subVendor: number, subDevice: number, classBase: number, classSub: number, classProg: number, revision: number): void;
  writeConfig(offset: number, bytes: Uint8Array): void;
  readConfig(offset: number, length: number): Uint8Array;
  /** Adds a capability (bytes start with its id and next byte); returns its offset in config space. */
  addCapability(pos: number, flags: number, bytes: Uint8Array): number;
  /** A BAR trapped to regionAccess; `areas` ([offset, length]) of `fd` are mapped by the client instead. */
  setupRegion(index: number, size: number, flags: number, fd: number, fdOffset: number, areas: [number, number][]): void;
  setupIrqs(type: number, count: number): void;
  realize(): void;
  /** true: a client is attached; false: none waiting yet. */
  attach(): boolean;
  /** The fd to watch: the listening socket before attach, the connection after. */
  pollFd(): number;
  /** Messages handled; -1 when the client went away (attach again). */
  run(): number;
  /** 0, or the errno (ENOENT: no eventfd for the vector; EINVAL: no such vector). */
  trigger(vector: number): number;
  /** Closes the socket and frees everything; no callback runs during it. */
  destroy(): void;
}

interface RawVfioUser {
  Context: new (socketPath: string, callbacks: VfioUserCallbacks) => VfioUserContext;
  CONFIG_SPACE_SIZE: number;
  STALL_TIMEOUT_MS: number;
}

/**
 * Longest a client may stall attach() or run(): libvfio-user reads VERSION and message bodies and sends replies
 * blocking, on the JS thread; a client silent mid-message (or not reading) is interrupted after this and dropped.
 */
export const STALL_TIMEOUT_MS = 1000;

/** The size of a conventional PCI function's config space as libvfio-user keeps it. */
export const CONFIG_SPACE_SIZE = 256;

/** A new context listening on `socketPath` (a stale socket file is an error: remove it first). */
export function createVfioUserContext(socketPath: string, callbacks: VfioUserCallbacks): VfioUserContext {
  const raw = loadAddon().vfioUser as unknown as RawVfioUser | undefined;
  if (raw?.Context === undefined) throw new Error('the native addon has no vfioUser part: rebuild it (npm install)');
  if (raw.CONFIG_SPACE_SIZE !== CONFIG_SPACE_SIZE || raw.STALL_TIMEOUT_MS !== STALL_TIMEOUT_MS) throw new Error('native addon constants differ from vmm-device/native/vfio-user.ts: rebuild the addon');
  return new raw.Context(socketPath, callbacks);
}
