// VIRTIO shared memory regions over vhost-user (protocol feature SHMEM, bit 22), as QEMU 11.1 and the project's
// QEMU (scripts/qemu/patches/vhost-user-shmem.patch) speak them: the front-end request GET_SHMEM_CONFIG (44) and
// its reply, and the payload of the back-end requests SHMEM_MAP (9) and SHMEM_UNMAP (10). Kept out of
// decodeRequest/FrontendMessage so that sessions that do not serve regions are unchanged: a session that does
// checks GET_SHMEM_CONFIG with checkGetShmemConfig and answers with encodeShmemConfig; SHMEM_MAP/UNMAP go out on
// the back-end channel (BackendChannel.shmemMap/shmemUnmap).

import { FrontendRequest, VhostUserProtocolError, type MessageHeader } from './messages.ts';

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Shared memory region ids are 8 bits: at most 256 regions. */
export const MAX_SHMEM_REGIONS = 256;
/** GET_SHMEM_CONFIG reply: u32 nregions, u32 padding, u64 memory_sizes[256]. */
export const SHMEM_CONFIG_SIZE = 8 + 8 * MAX_SHMEM_REGIONS;
/** SHMEM_MAP / SHMEM_UNMAP payload: u8 shmid, u8 padding[7], u64 fd_offset, u64 shm_offset, u64 len, u64 flags. */
export const SHMEM_MAP_SIZE = 40;
/** SHMEM_MAP flags bit 0: the mapping is writable (else the front-end maps it read-only). */
export const SHMEM_MAP_F_WRITABLE = 1n;

/** GET_SHMEM_CONFIG has no payload and no fds; throws VhostUserProtocolError otherwise. */
export function checkGetShmemConfig(h: MessageHeader, payload: Uint8Array, fdCount: number): void {
  const code = FrontendRequest.GET_SHMEM_CONFIG;
  if (h.request !== code) throw new VhostUserProtocolError('UnknownRequest', h.request, 'not GET_SHMEM_CONFIG');
  if (payload.length !== 0 || h.size !== 0) throw new VhostUserProtocolError('BadSize', code, `payload is ${payload.length} bytes, expected 0`);
  if (fdCount !== 0) throw new VhostUserProtocolError('BadFdCount', code, `${fdCount} fds, expected 0`);
}

/**
 * The GET_SHMEM_CONFIG reply for `sizes` (region id -> bytes). nregions counts the regions, and the array is indexed
 * by id, so ids may be sparse. Throws RangeError for an id outside 0..255 or a size of 0 (a region that exists has
 * bytes; an absent one is simply not listed).
 */
export function encodeShmemConfig(sizes: ReadonlyMap<number, bigint>): Uint8Array {
  const b = new Uint8Array(SHMEM_CONFIG_SIZE);
  const dv = view(b);
  for (const [id, size] of sizes) {
    if (!Number.isInteger(id) || id < 0 || id >= MAX_SHMEM_REGIONS) throw new RangeError(`shared memory region id ${id} is outside 0..${MAX_SHMEM_REGIONS - 1}`);
    if (size <= 0n || size >= 2n ** 64n) throw new RangeError(`shared memory region ${id}: size ${size} is not in 1..2^64-1`);
    dv.setBigUint64(8 + 8 * id, size, true);
  }
  dv.setUint32(0, sizes.size, true);
  return b;
}

/** Decodes a GET_SHMEM_CONFIG reply; undefined when its size is wrong or nregions disagrees with the sizes. */
export function decodeShmemConfig(payload: Uint8Array): Map<number, bigint> | undefined {
  if (payload.length !== SHMEM_CONFIG_SIZE) return undefined;
  const dv = view(payload);
  const sizes = new Map<number, bigint>();
  for (let id = 0; id < MAX_SHMEM_REGIONS; id++) {
    const size = dv.getBigUint64(8 + 8 * id, true);
    if (size !== 0n) sizes.set(id, size);
  }
  return dv.getUint32(0, true) === sizes.size ? sizes : undefined;
}

export interface ShmemMapRequest {
  shmid: number;
  fdOffset: bigint;
  shmOffset: bigint;
  len: bigint;
  writable: boolean;
}

/** The 40-byte payload of SHMEM_MAP (and, with the same fields, SHMEM_UNMAP). Throws RangeError on a bad field. */
export function encodeShmemMap(m: ShmemMapRequest): Uint8Array {
  if (!Number.isInteger(m.shmid) || m.shmid < 0 || m.shmid >= MAX_SHMEM_REGIONS) throw new RangeError(`shmid ${m.shmid} is outside 0..255`);
  const max = 2n ** 64n;
  for (const [what, v] of [['fd offset', m.fdOffset], ['shm offset', m.shmOffset], ['length', m.len]] as const) {
    if (v < 0n || v >= max) throw new RangeError(`${what} ${v} does not fit 64 bits`);
  }
  if (m.len === 0n) throw new RangeError('length is 0');
  if (m.shmOffset + m.len > max || m.fdOffset + m.len > max) throw new RangeError('offset + length wraps past 2^64');
  const b = new Uint8Array(SHMEM_MAP_SIZE);
  const dv = view(b);
  dv.setUint8(0, m.shmid);
  dv.setBigUint64(8, m.fdOffset, true);
  dv.setBigUint64(16, m.shmOffset, true);
  dv.setBigUint64(24, m.len, true);
  dv.setBigUint64(32, m.writable ? SHMEM_MAP_F_WRITABLE : 0n, true);
  return b;
}

/** Decodes a SHMEM_MAP/UNMAP payload; undefined for a wrong size, non-zero padding or unknown flags. */
export function decodeShmemMap(payload: Uint8Array): ShmemMapRequest | undefined {
  if (payload.length !== SHMEM_MAP_SIZE) return undefined;
  if (payload.subarray(1, 8).some((x) => x !== 0)) return undefined;
  const dv = view(payload);
  const flags = dv.getBigUint64(32, true);
  if ((flags & ~SHMEM_MAP_F_WRITABLE) !== 0n) return undefined;
  return {
    shmid: dv.getUint8(0),
    fdOffset: dv.getBigUint64(8, true),
    shmOffset: dv.getBigUint64(16, true),
    len: dv.getBigUint64(24, true),
    writable: flags === SHMEM_MAP_F_WRITABLE,
  };
}
