// The echo device (echo-device.ts) with VIRTIO shared memory regions declared (spec 13.14), for the tests of
// SHMEM_MAP/UNMAP: it records what the transport told it at FEATURES_OK (TransportFacts) and accepts the features.

import type { TransportFacts } from '../../../vmm-device/virtio/device.ts';
import { EchoDevice } from './echo-device.ts';

/** Region 0 of 64 pages and region 3 of 16 pages (4 KiB pages: ids may be sparse). */
export const REGIONS: ReadonlyMap<number, bigint> = new Map([
  [0, 64n * 4096n],
  [3, 16n * 4096n],
]);

export class RegionDevice extends EchoDevice {
  /** What acceptFeatures was told, one entry per FEATURES_OK. */
  readonly facts: TransportFacts[] = [];

  constructor(
    readonly sharedMemoryRegions: ReadonlyMap<number, bigint> = REGIONS,
    queueCount = 2,
  ) {
    super(queueCount);
  }

  acceptFeatures(_features: bigint, transport: TransportFacts): boolean {
    this.facts.push(transport);
    return true;
  }
}
