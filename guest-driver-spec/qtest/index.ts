// A guest driver for real QEMU with no guest OS: the qtest protocol client, PCI configuration and BAR placement,
// the virtio-pci modern transport, split virtqueues in guest RAM, a QEMU launcher, a QMP client and RAM hot-add.
export { QtestClient, QtestError, MAX_TRANSFER_BYTES, DEFAULT_IRQ_TIMEOUT_MS } from './qtest-client.ts';
export { GuestRam, GUEST_RAM_ALLOC_START } from './guest-ram.ts';
export {
  PciConfig,
  PciFunction,
  AddressWindow,
  enumerateBus0,
  formatPciAddress,
  type PciAddress,
  type PciBar,
  type PciCapability,
} from './pci.ts';
export * from './virtio-pci.ts';
export { QtestSplitQueue, type UsedBuffer, MAX_QUEUE_SIZE, MAX_BUFFER_BYTES } from './split-queue.ts';
export { QemuQtest, findQemu, type QemuQtestOptions, type QemuExit, DEFAULT_RAM_MIB, MAX_MEMORY_SLOTS } from './qemu.ts';
export { QmpClient, QmpError, type QmpEvent, type QmpGreeting, QMP_COMMAND_TIMEOUT_MS } from './qmp.ts';
export { hotAddMemory, queryDimms, type DimmInfo, type HotAddOptions, MAX_DIMM_MIB } from './memory-hotplug.ts';
export { sharedMemoryRegions, qtestSharedMemoryWindow, VIRTIO_PCI_CAP_SHARED_MEMORY_CFG, type SharedMemoryRegion } from './shared-memory.ts';
