// IPv4 addresses and prefixes of the VPC model, and their GIDs. Virtual and host addresses are IPv4; the guest sees
// its virtual address as an IPv4-mapped IPv6 GID (::ffff:a.b.c.d), as RoCE v2 uses (spec section 5.1, 12.1).

import { gidFromIpv4, ipv4FromGid } from '../rdma/address-resolver.ts';

export { gidFromIpv4, ipv4FromGid };

const IPV4_TEXT = /^(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})$/;
export const IPV4_BITS = 32;

/** The address as an unsigned 32-bit number, or undefined when `text` is not a dotted quad without leading zeros. */
export function parseIpv4(text: string): number | undefined {
  const m = IPV4_TEXT.exec(text);
  if (m === null) return undefined;
  let value = 0;
  for (let i = 1; i <= 4; i++) {
    const part = Number(m[i]);
    if (part > 255) return undefined;
    value = value * 256 + part;
  }
  return value;
}

export function formatIpv4(value: number): string {
  return [value >>> 24, (value >>> 16) & 0xff, (value >>> 8) & 0xff, value & 0xff].join('.');
}

export interface Prefix {
  /** Network address (host bits zero). */
  base: number;
  length: number;
}

/** Network mask of a prefix length, as an unsigned number (length 0 matches everything). */
function mask(length: number): number {
  return length === 0 ? 0 : (0xffff_ffff << (IPV4_BITS - length)) >>> 0;
}

export type PrefixParse = { ok: true; prefix: Prefix } | { ok: false; why: string };

/**
 * A prefix `a.b.c.d/n`, a single address `a.b.c.d` (a /32) or `any` (0.0.0.0/0). Host bits must be zero, so a typo
 * such as 10.0.0.1/24 for 10.0.0.0/24 is caught instead of silently widening or narrowing a rule.
 */
export function parsePrefix(text: string): PrefixParse {
  if (text === 'any') return { ok: true, prefix: { base: 0, length: 0 } };
  const slash = text.indexOf('/');
  const addrText = slash < 0 ? text : text.slice(0, slash);
  const addr = parseIpv4(addrText);
  if (addr === undefined) return { ok: false, why: `${JSON.stringify(text)} is not a CIDR prefix (a.b.c.d/n), an address or "any"` };
  if (slash < 0) return { ok: true, prefix: { base: addr, length: IPV4_BITS } };
  const lenText = text.slice(slash + 1);
  const length = /^(0|[1-9]\d?)$/.test(lenText) ? Number(lenText) : NaN;
  if (!(length >= 0 && length <= IPV4_BITS)) return { ok: false, why: `${JSON.stringify(text)} is not a CIDR prefix: the length must be 0..32` };
  if ((addr & ~mask(length)) >>> 0 !== 0) {
    return { ok: false, why: `${JSON.stringify(text)} has host bits set: did you mean ${formatIpv4((addr & mask(length)) >>> 0)}/${length}?` };
  }
  return { ok: true, prefix: { base: addr, length } };
}

export function prefixContains(prefix: Prefix, addr: number): boolean {
  return ((addr & mask(prefix.length)) >>> 0) === prefix.base;
}

export function formatPrefix(prefix: Prefix): string {
  return prefix.length === 0 ? 'any' : `${formatIpv4(prefix.base)}/${prefix.length}`;
}

/** GID bytes of an address number. */
export function gidOfIpv4Number(value: number): Uint8Array {
  const gid = new Uint8Array(16);
  gid[10] = 0xff;
  gid[11] = 0xff;
  gid[12] = value >>> 24;
  gid[13] = (value >>> 16) & 0xff;
  gid[14] = (value >>> 8) & 0xff;
  gid[15] = value & 0xff;
  return gid;
}

/** The address number inside an IPv4-mapped GID, or undefined for any other GID (wrong length included). */
export function ipv4NumberFromGid(gid: Uint8Array): number | undefined {
  if (gid.byteLength !== 16) return undefined;
  for (let i = 0; i < 10; i++) if (gid[i] !== 0) return undefined;
  if (gid[10] !== 0xff || gid[11] !== 0xff) return undefined;
  return ((gid[12]! << 24) | (gid[13]! << 16) | (gid[14]! << 8) | gid[15]!) >>> 0;
}

/** ::ffff:a.b.c.d, for logs and the operator view. */
export function gidText(gid: Uint8Array): string {
  const v4 = ipv4FromGid(gid);
  return v4 !== undefined ? `::ffff:${v4}` : Buffer.from(gid).toString('hex');
}
