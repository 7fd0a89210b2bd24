// Guest RAM handed over as fds (vhost-user SET_MEM_TABLE / ADD_MEM_REG, vfio-user DMA_MAP): each region is a
// range of an fd mapped into this process, and the set of them becomes a GuestMemory. Transport-neutral: the
// transport decodes its own message, checks its own state, and turns a FdRegionError into its own protocol error.

import { GuestMemory, type MemoryRegionSpec } from '../memory/guest-memory.ts';
import type { Logger } from '../util/log.ts';
import type { HostOps } from './host.ts';

/** Where a region of guest RAM is: guest physical address, size, the front-end's virtual address, the fd offset. */
export interface FdRegionSpec {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  /** Offset of the region's first byte in its fd (need not be page aligned). */
  mmapOffset: number;
}

export interface MappedFdRegion<S extends FdRegionSpec = FdRegionSpec> {
  spec: S;
  /** The fd the region came in; owned by the mapping and closed with it. */
  fd: number;
  /** The whole mapping: [0, mmapOffset + size) of the fd. */
  buffer: ArrayBuffer;
}

export type FdRegionErrorKind =
  /** The region ends past the end of its fd: touching it would SIGBUS. */
  | 'PastEndOfFd'
  /** mmap itself failed (address space, limits, an fd that cannot be mapped). */
  | 'MapFailed';

export class FdRegionError extends Error {
  constructor(
    readonly kind: FdRegionErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'FdRegionError';
  }
}

/**
 * Maps `spec`'s fd from offset 0 to mmapOffset + size (mmap offsets must be page aligned, region offsets need not
 * be). The fd's size is checked first. On failure the fd is left to the caller (it may still have to answer).
 */
export function mapFdRegion<S extends FdRegionSpec>(host: HostOps, spec: S, fd: number): MappedFdRegion<S> {
  const size = host.fileSize(fd);
  const length = spec.mmapOffset + spec.size;
  if (length > size) {
    throw new FdRegionError('PastEndOfFd', `region [mmap offset ${spec.mmapOffset}, +${spec.size}) ends past the end of its fd (${size} bytes)`);
  }
  let buffer: ArrayBuffer;
  try {
    buffer = host.mmapShared(fd, length, 0);
  } catch (e) {
    throw new FdRegionError('MapFailed', `mmap of ${length} bytes failed: ${(e as Error).message}`);
  }
  return { spec, fd, buffer };
}

/** Unmaps a region (stale views of it become empty) and closes its fd; failures are logged, never thrown. */
export function unmapFdRegion(host: HostOps, r: MappedFdRegion, log: Logger): void {
  try {
    host.munmap(r.buffer);
  } catch (e) {
    log.log('error', 'munmap failed', { error: (e as Error).message });
  }
  try {
    host.close(r.fd);
  } catch (e) {
    log.log('error', 'close failed', { fd: r.fd, error: (e as Error).message });
  }
}

/** The guest memory the regions make (throws GuestMemoryError for overlaps, bad sizes, too many regions). */
export function guestMemoryOf(regions: readonly MappedFdRegion[]): GuestMemory {
  const specs: MemoryRegionSpec[] = regions.map((r) => ({
    guestPhysAddr: r.spec.guestPhysAddr,
    size: r.spec.size,
    userAddr: r.spec.userAddr,
    buffer: r.buffer,
    bufferOffset: r.spec.mmapOffset,
  }));
  return new GuestMemory(specs);
}
