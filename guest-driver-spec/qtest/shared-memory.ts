// VIRTIO shared memory regions of a virtio-pci function, found as a driver finds them (virtio 1.2 section 4.1.4.7):
// vendor capabilities of cfg_type VIRTIO_PCI_CAP_SHARED_MEMORY_CFG, each a struct virtio_pci_cap64 naming a BAR,
// a 64-bit offset and length inside it, and the region's id in the capability's `id` byte.

import type { VirtioPciDevice } from './virtio-pci.ts';
import { MAX_TRANSFER_BYTES, type QtestClient } from './qtest-client.ts';
import type { SharedMemoryWindow } from '../driver/transport.ts';

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

/**
 * A driver's window on one shared memory region through qtest (DriverTransport.sharedMemory): every access is a
 * qtest read or write at the region's guest physical address, so it reaches what the VMM mapped there, reads 0
 * where nothing is mapped and drops stores there, exactly as a guest CPU's would. qtest commands run one at a time
 * in order, so a readU32/writeU32 is ordered against every access before and after it (what 13.4's acquire and
 * release ask for). There is no direct view: nothing of the region is in this process.
 */
export function qtestSharedMemoryWindow(qtest: QtestClient, region: SharedMemoryRegion): SharedMemoryWindow {
  const check = (what: string, offset: bigint, length: number, align = 1): bigint => {
    if (!Number.isInteger(length) || length < 0 || offset < 0n || offset + BigInt(length) > region.length) {
      throw new RangeError(`shared memory region ${region.id}: ${what} [0x${offset.toString(16)}, +${length}) is outside its 0x${region.length.toString(16)} bytes`);
    }
    if (offset % BigInt(align) !== 0n) throw new RangeError(`shared memory region ${region.id}: ${what} at 0x${offset.toString(16)} is not ${align}-byte aligned`);
    return region.address + offset;
  };
  return {
    shmid: region.id,
    size: region.length,
    async read(offset, length) {
      const at = check('read', offset, length);
      const out = new Uint8Array(length);
      for (let done = 0; done < length; done += MAX_TRANSFER_BYTES) {
        const n = Math.min(MAX_TRANSFER_BYTES, length - done);
        out.set(await qtest.read(at + BigInt(done), n), done);
      }
      return out;
    },
    async write(offset, bytes) {
      const at = check('write', offset, bytes.length);
      for (let done = 0; done < bytes.length; done += MAX_TRANSFER_BYTES) {
        await qtest.write(at + BigInt(done), bytes.subarray(done, Math.min(bytes.length, done + MAX_TRANSFER_BYTES)));
      }
    },
    async readU32(offset) {
      return qtest.readl(check('readU32', offset, 4, 4));
    },
    async writeU32(offset, value) {
      await qtest.writel(check('writeU32', offset, 4, 4), value >>> 0);
    },
  };
}
