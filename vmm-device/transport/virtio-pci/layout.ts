// The PCI face of a virtio 1.x device (virtio 1.2 section 4.1, "Virtio Over PCI Bus"), as constants and the bytes
// of its capabilities: where the common configuration, ISR, device configuration and notification structures sit
// in the BARs, and the MSI-X table and PBA. Transport-neutral: a vfio-user server, or any other way of presenting
// a PCI function, places these in config space and routes the BAR accesses to VirtioPciFunction (function.ts).

export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
/** Modern (virtio 1.x) device IDs: 0x1040 + the virtio device ID (section 4.1.2.1). */
export const VIRTIO_PCI_DEVICE_ID_BASE = 0x1040;
/** Subsystem device ID of a modern-only device: at least 0x40 (section 4.1.2.1); 0x1100 as QEMU uses. */
export const VIRTIO_PCI_SUBSYSTEM_ID = 0x1100;
/** PCI revision 1: a modern-only device (section 4.1.2.1). */
export const VIRTIO_PCI_REVISION = 1;
/** Class 02h (network controller), subclass 80h (other): an RDMA function. */
export const PCI_CLASS_NETWORK = 0x02;
export const PCI_SUBCLASS_OTHER = 0x80;

// virtio_pci_cap.cfg_type (section 4.1.4)
export const CAP_COMMON_CFG = 1;
export const CAP_NOTIFY_CFG = 2;
export const CAP_ISR_CFG = 3;
export const CAP_DEVICE_CFG = 4;

export const PCI_CAP_ID_VNDR = 0x09;
export const PCI_CAP_ID_MSIX = 0x11;
/** Bytes of struct virtio_pci_cap, and of virtio_pci_notify_cap (the cap plus notify_off_multiplier). */
export const VIRTIO_CAP_LEN = 16;
export const VIRTIO_NOTIFY_CAP_LEN = 20;
/** Bytes of the MSI-X capability (id, next, message control, table and PBA offset/BIR). */
export const MSIX_CAP_LEN = 12;

// struct virtio_pci_common_cfg field offsets (section 4.1.4.3)
export const COMMON = {
  deviceFeatureSelect: 0x00,
  deviceFeature: 0x04,
  driverFeatureSelect: 0x08,
  driverFeature: 0x0c,
  msixConfig: 0x10,
  numQueues: 0x12,
  deviceStatus: 0x14,
  configGeneration: 0x15,
  queueSelect: 0x16,
  queueSize: 0x18,
  queueMsixVector: 0x1a,
  queueEnable: 0x1c,
  queueNotifyOff: 0x1e,
  queueDesc: 0x20,
  queueDriver: 0x28,
  queueDevice: 0x30,
} as const;
/** The common configuration structure offered: every field up to queue_device (no notify data, no queue reset). */
export const COMMON_CFG_LEN = 0x38;

/** "No vector" in msix_config and queue_msix_vector (section 4.1.5.1.2). */
export const NO_VECTOR = 0xffff;
export const ISR_QUEUE = 1;
export const ISR_CONFIG = 2;

/** The BAR holding the virtio structures, and its layout (each structure in its own 4 KiB page). */
export const VIRTIO_BAR = 0;
export const VIRTIO_BAR_SIZE = 0x4000;
export const COMMON_OFFSET = 0x0000;
export const ISR_OFFSET = 0x1000;
export const ISR_LEN = 4;
export const DEVICE_CFG_OFFSET = 0x2000;
/** Largest device configuration the layout leaves room for. */
export const DEVICE_CFG_MAX = 0x1000;
export const NOTIFY_OFFSET = 0x3000;
/** queue_notify_off is the queue index; each queue's doorbell is 4 bytes apart. */
export const NOTIFY_OFF_MULTIPLIER = 4;
/** Queues the notify page has room for. */
export const MAX_QUEUES = 0x1000 / NOTIFY_OFF_MULTIPLIER;

/** The BAR holding the MSI-X table (at 0) and PBA; the VMM usually emulates the table itself over it. */
export const MSIX_BAR = 2;
export const MSIX_TABLE_OFFSET = 0;
export const MSIX_PBA_OFFSET = 0x800;
export const MSIX_BAR_SIZE = 0x1000;
/** Vectors the table has room for before the PBA (16 bytes each). */
export const MAX_MSIX_VECTORS = MSIX_PBA_OFFSET / 16;
/** Bit 15 of MSI-X message control: MSI-X enabled. Bit 14: function mask. */
export const MSIX_ENABLE = 0x8000;
export const MSIX_FUNCTION_MASK = 0x4000;

export interface BarSpec {
  index: number;
  size: number;
}

/** What the presenter of the PCI function places in config space and how it sizes the BARs. */
export interface PciLayout {
  vendorId: number;
  deviceId: number;
  subsystemVendorId: number;
  subsystemId: number;
  revision: number;
  classBase: number;
  classSub: number;
  classProg: number;
  /** Interrupt pin (1 = INTA). */
  interruptPin: number;
  bars: BarSpec[];
  /** Vendor capabilities (virtio structures), each starting with its id and a next byte the presenter fills. */
  capabilities: Uint8Array[];
  /** The MSI-X capability's bytes, same convention. */
  msixCapability: Uint8Array;
  msixVectors: number;
}

/** struct virtio_pci_cap (+ notify_off_multiplier for the notify capability). */
export function virtioCap(cfgType: number, bar: number, offset: number, length: number, notifyMultiplier?: number): Uint8Array {
  const len = notifyMultiplier === undefined ? VIRTIO_CAP_LEN : VIRTIO_NOTIFY_CAP_LEN;
  const bytes = new Uint8Array(len);
  const v = new DataView(bytes.buffer);
  bytes[0] = PCI_CAP_ID_VNDR;
  bytes[2] = len;
  bytes[3] = cfgType;
  bytes[4] = bar;
  v.setUint32(8, offset, true);
  v.setUint32(12, length, true);
  if (notifyMultiplier !== undefined) v.setUint32(16, notifyMultiplier, true);
  return bytes;
}

/** The MSI-X capability: table size N-1, table and PBA as offset | BIR. */
export function msixCap(vectors: number): Uint8Array {
  const bytes = new Uint8Array(MSIX_CAP_LEN);
  const v = new DataView(bytes.buffer);
  bytes[0] = PCI_CAP_ID_MSIX;
  v.setUint16(2, vectors - 1, true);
  v.setUint32(4, MSIX_TABLE_OFFSET | MSIX_BAR, true);
  v.setUint32(8, MSIX_PBA_OFFSET | MSIX_BAR, true);
  return bytes;
}

/** The layout of a modern virtio-pci function for a device with this ID, queue count and config size. */
export function virtioPciLayout(deviceId: number, queueCount: number, configSize: number): PciLayout {
  if (queueCount < 1 || queueCount > MAX_QUEUES) throw new RangeError(`${queueCount} queues; the notify page holds 1..${MAX_QUEUES}`);
  if (configSize > DEVICE_CFG_MAX) throw new RangeError(`device configuration of ${configSize} bytes; the layout holds ${DEVICE_CFG_MAX}`);
  const msixVectors = Math.min(queueCount + 1, MAX_MSIX_VECTORS);
  const capabilities = [
    virtioCap(CAP_COMMON_CFG, VIRTIO_BAR, COMMON_OFFSET, COMMON_CFG_LEN),
    virtioCap(CAP_ISR_CFG, VIRTIO_BAR, ISR_OFFSET, ISR_LEN),
    virtioCap(CAP_NOTIFY_CFG, VIRTIO_BAR, NOTIFY_OFFSET, queueCount * NOTIFY_OFF_MULTIPLIER, NOTIFY_OFF_MULTIPLIER),
  ];
  if (configSize > 0) capabilities.push(virtioCap(CAP_DEVICE_CFG, VIRTIO_BAR, DEVICE_CFG_OFFSET, configSize));
  return {
    vendorId: VIRTIO_PCI_VENDOR_ID,
    deviceId: VIRTIO_PCI_DEVICE_ID_BASE + deviceId,
    subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
    subsystemId: VIRTIO_PCI_SUBSYSTEM_ID,
    revision: VIRTIO_PCI_REVISION,
    classBase: PCI_CLASS_NETWORK,
    classSub: PCI_SUBCLASS_OTHER,
    classProg: 0,
    interruptPin: 1,
    bars: [
      { index: VIRTIO_BAR, size: VIRTIO_BAR_SIZE },
      { index: MSIX_BAR, size: MSIX_BAR_SIZE },
    ],
    capabilities,
    msixCapability: msixCap(msixVectors),
    msixVectors,
  };
}
