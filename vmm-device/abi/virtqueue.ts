// Layout constants of virtio 1.2/1.3 virtqueues (sections 2.7 split, 2.8 packed). All fields little-endian.

/** Largest queue size a split queue may have (a power of two). */
export const MAX_SPLIT_QUEUE_SIZE = 32768;
/** Largest queue size a packed queue may have (any value 1..32768). */
export const MAX_PACKED_QUEUE_SIZE = 32768;

// Descriptor flags (split and packed).
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
// Packed-only descriptor flags.
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
export const VIRTQ_DESC_F_USED = 1 << 15;

/** Size of one descriptor (split: addr u64, len u32, flags u16, next u16; packed: addr u64, len u32, id u16, flags u16). */
export const DESC_SIZE = 16;

// Split ring: available ring flags and used ring flags.
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const VIRTQ_USED_F_NO_NOTIFY = 1;

// Packed ring event suppression flags (struct pvirtq_event_suppress: desc u16 = off|wrap<<15, flags u16).
export const RING_EVENT_FLAGS_ENABLE = 0;
export const RING_EVENT_FLAGS_DISABLE = 1;
export const RING_EVENT_FLAGS_DESC = 2;

/** Alignment the driver must give each ring area (split: desc 16, avail 2, used 4; packed: desc 16, events 4). */
export const SPLIT_ALIGN = { desc: 16, avail: 2, used: 4 } as const;
export const PACKED_ALIGN = { desc: 16, driver: 4, device: 4 } as const;

/** Bytes of the split available ring for a queue of `size` (flags, idx, ring[size], used_event). */
export function splitAvailSize(size: number): number {
  return 6 + 2 * size;
}
/** Bytes of the split used ring (flags, idx, ring[size] of {id u32, len u32}, avail_event). */
export function splitUsedSize(size: number): number {
  return 6 + 8 * size;
}
/** Bytes of a descriptor table. */
export function descTableSize(size: number): number {
  return DESC_SIZE * size;
}
/** Bytes of a packed event suppression area. */
export const PACKED_EVENT_SIZE = 4;

// Feature bits that change the queue's behaviour (device-independent, virtio 1.2 section 6).
export const VIRTIO_F_INDIRECT_DESC = 28;
export const VIRTIO_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_ACCESS_PLATFORM = 33;
export const VIRTIO_F_RING_PACKED = 34;
export const VIRTIO_F_IN_ORDER = 35;

/** virtio's vring_need_event(): true when new_idx has passed event_idx since old_idx (all mod 2^16). */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
