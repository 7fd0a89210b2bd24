// The closed set of ways a driver can break a virtqueue. The engine never throws these out of pop(): it returns
// them, marks the queue broken, and the device core then sets NEEDS_RESET (virtio 1.2 section 2.1.2).

export const VIRTQUEUE_ERROR_KINDS = [
  /** Split: avail.idx moved ahead of the device's next index by more than the queue size. */
  'AvailIndexJump',
  /** A descriptor index (head, next, or packed buffer id) is >= the queue size or the indirect table size. */
  'DescriptorIndexOutOfRange',
  /** The chain has more descriptors than the queue size (or than its indirect table): a loop or a runaway chain. */
  'ChainTooLong',
  /** An indirect descriptor inside an indirect table. */
  'NestedIndirect',
  /** A descriptor has both INDIRECT and NEXT set. */
  'IndirectWithNext',
  /** An indirect descriptor whose table length is 0. */
  'IndirectTableEmpty',
  /** An indirect table length that is not a multiple of 16. */
  'IndirectTableMisaligned',
  /** An indirect table with more entries than the limit (the queue size, MAX_INDIRECT_TABLE_ENTRIES at most). */
  'IndirectTableTooLarge',
  /** INDIRECT used although VIRTIO_F_INDIRECT_DESC was not negotiated. */
  'IndirectNotNegotiated',
  /** A device-readable descriptor after a device-writable one. */
  'WritableBeforeReadable',
  /** A buffer (or an indirect table) that is not entirely inside guest memory. */
  'BufferOutsideGuestMemory',
  /** addr + len wraps past 2^64. */
  'AddressOverflow',
  /** The readable or writable part of a chain totals more than 2^32 - 1 bytes (a used length is a u32). */
  'ChainLengthOverflow',
] as const;

export type VirtqueueErrorKind = (typeof VIRTQUEUE_ERROR_KINDS)[number];

export class VirtqueueError extends Error {
  constructor(
    readonly kind: VirtqueueErrorKind,
    readonly detail: string,
  ) {
    super(`${kind}: ${detail}`);
    this.name = 'VirtqueueError';
  }
}

/** Thrown by ChainReader/ChainWriter when a device reads or writes past the part of the chain it has. */
export class ChainBoundsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ChainBoundsError';
  }
}
