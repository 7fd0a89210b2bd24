// Device status bits (virtio 1.2 section 2.1) and the device-independent feature bits the core handles.

export const STATUS_ACKNOWLEDGE = 1;
export const STATUS_DRIVER = 2;
export const STATUS_DRIVER_OK = 4;
export const STATUS_FEATURES_OK = 8;
export const STATUS_DEVICE_NEEDS_RESET = 0x40;
export const STATUS_FAILED = 0x80;

export const VIRTIO_ID_RDMA = 42;

export const F_INDIRECT_DESC = 28n;
export const F_EVENT_IDX = 29n;
export const F_VERSION_1 = 32n;
export const F_RING_PACKED = 34n;

export function bit(n: bigint): bigint {
  return 1n << n;
}

/** Names of status bits, for log lines. */
export function statusNames(status: number): string {
  const names: [number, string][] = [
    [STATUS_ACKNOWLEDGE, 'ACKNOWLEDGE'],
    [STATUS_DRIVER, 'DRIVER'],
    [STATUS_FEATURES_OK, 'FEATURES_OK'],
    [STATUS_DRIVER_OK, 'DRIVER_OK'],
    [STATUS_DEVICE_NEEDS_RESET, 'NEEDS_RESET'],
    [STATUS_FAILED, 'FAILED'],
  ];
  const set = names.filter(([b]) => (status & b) !== 0).map(([, n]) => n);
  return set.length === 0 ? 'RESET' : set.join('|');
}
