// The inflight area's layout (vhost-user.rst "Inflight I/O tracking", protocol feature INFLIGHT_SHMFD): one
// region per queue, back to back. Each region is large enough for either ring layout:
//   split : QueueRegionSplit  = features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16 (16 B)
//           + desc_num * DescStateSplit (inflight u8, padding[5], next u16, counter u64: 16 B)
//   packed: QueueRegionPacked = 32 B header + desc_num * DescStatePacked (32 B)
// so a region is 32 + 32 * queue_size bytes, rounded up to INFLIGHT_REGION_ALIGNMENT.

export const INFLIGHT_VERSION = 1;
export const INFLIGHT_REGION_ALIGNMENT = 64;
export const REGION_HEADER = 32;
export const DESC_STATE = 32;
/** Offsets inside a queue region (the split layout's header; version and desc_num are common to both). */
export const OFF_VERSION = 8;
export const OFF_DESC_NUM = 10;
/** Descriptor counters are u64 in the area, kept as two u32 halves (counters stay below 2^53). */
export const TWO_POW_32 = 0x1_0000_0000;

export function inflightRegionSize(queueSize: number): number {
  const raw = REGION_HEADER + DESC_STATE * queueSize;
  return Math.ceil(raw / INFLIGHT_REGION_ALIGNMENT) * INFLIGHT_REGION_ALIGNMENT;
}

export function inflightAreaSize(numQueues: number, queueSize: number): number {
  return numQueues * inflightRegionSize(queueSize);
}
