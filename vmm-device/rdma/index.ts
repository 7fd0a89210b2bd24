// The virtio-rdma device model: see rdma-device.ts.
export { RdmaDevice, CONTROLQ, EVENTQ, DOORBELLQ, QUEUE_COUNT, MAX_QUEUE_SIZE, pickHostGidIndex, type RdmaDeviceOptions, type RdmaCounters } from './rdma-device.ts';
export {
  StaticAddressResolver,
  gidFromIpv4,
  ipv4FromGid,
  gidKey,
  vpcQkey,
  GidTableFileSchema,
  type AddressResolver,
  type ConnectionAnswer,
  type ConnectionTeardown,
  type Resolution,
  type VirtualAddress,
  type GidTableEntry,
} from './address-resolver.ts';
export { DEFAULT_QUOTAS, OFFERED_FEATURES, PAGE_SIZE_MASK, type DeviceQuotas } from './limits.ts';
export type { DataPath, DataPathHost, FlushCounts } from './data-path.ts';
export { RelayDataPath } from './relay.ts';
