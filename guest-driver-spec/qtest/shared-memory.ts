// VIRTIO shared memory regions of a virtio-pci function, found as a driver finds them (virtio 1.2 section 4.1.4.7):
// vendor capabilities of cfg_type VIRTIO_PCI_CAP_SHARED_MEMORY_CFG, each a struct virtio_pci_cap64 naming a BAR,
// a 64-bit offset and length inside it, and the region's id in the capability's `id` byte.

import type { VirtioPciDevice } from './virtio-pci.ts';

export const VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8;
/** struct virtio_pci_cap64: the 16-byte virtio_pci_cap, then offset_hi and length_hi. */
export const VIRTIO_PCI_CAP64_LENGTH = 24;

export interface SharedMemoryRegion {
  /** The region's shmid (the capability's `id`). */
  id: number;
  bar: number;
  /** Offset of the region inside the BAR. */
  offset: bigint;
  length: bigint;
  /** Guest physical address of the region's first byte (the BAR as placed, plus offset). */
  address: bigint;
}

/** Every shared memory region the function announces, checked against the BAR it names. */
export async function sharedMemoryRegions(dev: VirtioPciDevice): Promise<SharedMemoryRegion[]> {
  const pci = dev.pci;
  const regions: SharedMemoryRegion[] = [];
  for (const cap of dev.caps) {
    if (cap.cfgType !== VIRTIO_PCI_CAP_SHARED_MEMORY_CFG) continue;
    const at = cap.capOffset;
    const capLength = await pci.read8(at + 2);
    if (capLength < VIRTIO_PCI_CAP64_LENGTH) throw new Error(`${pci.name}: shared memory capability of ${capLength} bytes, needs ${VIRTIO_PCI_CAP64_LENGTH}`);
    const id = await pci.read8(at + 5);
    const offset = BigInt(await pci.read32(at + 8)) | (BigInt(await pci.read32(at + 16)) << 32n);
    const length = BigInt(await pci.read32(at + 12)) | (BigInt(await pci.read32(at + 20)) << 32n);
    const bar = pci.bar(cap.bar);
    if (bar === undefined || bar.kind === 'io' || bar.address === undefined) throw new Error(`${pci.name}: shared memory region ${id} names BAR${cap.bar}, which is not a placed memory BAR`);
    if (offset + length > BigInt(bar.size)) throw new Error(`${pci.name}: shared memory region ${id} [${offset}, +${length}) overruns BAR${cap.bar}`);
    if (regions.some((r) => r.id === id)) throw new Error(`${pci.name}: shared memory region ${id} announced twice`);
    regions.push({ id, bar: cap.bar, offset, length, address: BigInt(bar.address) + offset });
  }
  return regions;
}
