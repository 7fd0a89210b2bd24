// The key of every GID table of the model (the address resolver, QP ownership): a GID as lowercase hex.
import { Limits } from '../abi/rdma/index.ts';

/** A 16-byte GID as lowercase hex (32 characters): the key of every table here. */
export type GidKey = string;

export function gidKey(gid: Uint8Array): GidKey {
  if (gid.byteLength !== Limits.GID_SIZE) throw new RangeError(`a GID has ${Limits.GID_SIZE} bytes, got ${gid.byteLength}`);
  return Buffer.from(gid.buffer, gid.byteOffset, gid.byteLength).toString('hex'); // a view: no copy
}
