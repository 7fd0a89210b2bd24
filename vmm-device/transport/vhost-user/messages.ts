// vhost-user wire format (QEMU docs/interop/vhost-user.rst): request codes, header, payload layouts, named
// limits, and the syntactic validation of every front-end request. Nothing here touches an fd or any state:
// `decodeRequest` turns (header, payload bytes, fd count) into a typed request or a VhostUserProtocolError, and
// the session (session.ts) checks what depends on state (negotiated features, queue count, memory) before acting.
//
// All numbers are in the machine's byte order; vhost-user only exists between processes on one host, and this
// project runs on little-endian x86-64/arm64, so the codec reads and writes little-endian and refuses to load on a
// big-endian host rather than speak a different protocol silently.

import os from 'node:os';

if (os.endianness() !== 'LE') {
  throw new Error('vhost-user codec: this host is big-endian; the codec only speaks the little-endian layout');
}

// ---------------------------------------------------------------------------------------------------------------
// Header

/** request u32, flags u32, size u32. */
export const HEADER_SIZE = 12;
/** The protocol version carried in flags bits 0..1. */
export const VHOST_USER_VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
/** Set on every reply from the back-end. */
export const FLAG_REPLY = 0x4;
/** The front-end asks for an ack (REPLY_ACK protocol feature). */
export const FLAG_NEED_REPLY = 0x8;
/** Bits that must be zero in any header. */
export const FLAG_RESERVED_MASK = ~0xf >>> 0;

/**
 * Largest payload accepted. QEMU's own reader accepts up to sizeof(VhostUserPayload) (about 1.6 KiB, the crypto
 * session); rust-vmm caps messages at 0x1000. No request this back-end handles is larger than 8 + 8 * 32 bytes
 * (SET_MEM_TABLE) or 12 + 256 (config), so 4096 leaves room and bounds what a peer can make us buffer.
 */
export const MAX_PAYLOAD_SIZE = 0x1000;
/**
 * Most fds one message may carry: SET_MEM_TABLE carries one per region and QEMU sends at most
 * VHOST_MEMORY_BASELINE_NREGIONS (8); the back-end channel carries at most VHOST_USER_BACKEND_MAX_FDS (8).
 * A message arriving with more (or truncated ancillary data) is refused.
 */
export const MAX_FDS_PER_MESSAGE = 8;
/** Regions one SET_MEM_TABLE may carry (QEMU's VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_TABLE_REGIONS = 8;
/**
 * Memory slots offered with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS): libvhost-user's VHOST_USER_MAX_RAM_SLOTS
 * (KVM's 509 user slots on x86); QEMU caps it at its own 512. Equal to guest-memory's MAX_MEMORY_REGIONS.
 */
export const MAX_RAM_SLOTS = 509;
/** Largest config space access (QEMU's VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;
/** Queues a back-end may offer; SET_VRING_KICK/CALL/ERR carry the index in 8 bits. */
export const MAX_QUEUES = 256;

// ---------------------------------------------------------------------------------------------------------------
// Request codes

export const FrontendRequest = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
  GET_SHARED_OBJECT: 41,
  SET_DEVICE_STATE_FD: 42,
  CHECK_DEVICE_STATE: 43,
  GET_SHMEM_CONFIG: 44,
} as const;
export type FrontendRequestName = keyof typeof FrontendRequest;

export const BackendRequest = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
  SHARED_OBJECT_ADD: 6,
  SHARED_OBJECT_REMOVE: 7,
  SHARED_OBJECT_LOOKUP: 8,
  /** Protocol feature SHMEM; payload codec in shmem-messages.ts, sent by shmem.ts through the back-end channel. */
  SHMEM_MAP: 9,
  SHMEM_UNMAP: 10,
} as const;
export type BackendRequestName = keyof typeof BackendRequest;

const frontendNames = new Map<number, FrontendRequestName>(
  Object.entries(FrontendRequest).map(([k, v]) => [v, k as FrontendRequestName]),
);
const backendNames = new Map<number, BackendRequestName>(
  Object.entries(BackendRequest).map(([k, v]) => [v, k as BackendRequestName]),
);

/** "SET_MEM_TABLE (5)", or "unknown request 99": the name used in every log line and error. */
export function requestName(code: number): string {
  const n = frontendNames.get(code);
  return n === undefined ? `unknown request ${code}` : `${n} (${code})`;
}
export function backendRequestName(code: number): string {
  const n = backendNames.get(code);
  return n === undefined ? `unknown backend request ${code}` : `BACKEND_${n} (${code})`;
}
export function frontendRequestFromCode(code: number): FrontendRequestName | undefined {
  return frontendNames.get(code);
}

// ---------------------------------------------------------------------------------------------------------------
// Feature bits

/** Virtio feature bit 30, reused by vhost-user: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** Dirty-page logging (live migration); this back-end does not offer it. */
export const VHOST_F_LOG_ALL = 26;

export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
  // QEMU 11.1's number (vhost-user.rst); bits 20 and 21 belong to other features, and older rust-vmm code that used
  // 21 for SHMEM does not interoperate with QEMU.
  SHMEM: 22,
} as const;
export type ProtocolFeatureName = keyof typeof ProtocolFeature;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}
export function hasBit(mask: bigint, n: number): boolean {
  return (mask & bit(n)) !== 0n;
}

/** The protocol features this back-end implements (the list). */
export const SUPPORTED_PROTOCOL_FEATURES: bigint = (
  [
    'MQ',
    'REPLY_ACK',
    'BACKEND_REQ',
    'CONFIG',
    'BACKEND_SEND_FD',
    'HOST_NOTIFIER',
    'INFLIGHT_SHMFD',
    'RESET_DEVICE',
    'CONFIGURE_MEM_SLOTS',
    'STATUS',
  ] as const
).reduce((m, n) => m | bit(ProtocolFeature[n]), 0n);

// ---------------------------------------------------------------------------------------------------------------
// Payload layouts and sizes

export const U64_SIZE = 8;
/** struct vhost_vring_state: index u32, num u32. */
export const VRING_STATE_SIZE = 8;
/** struct vhost_vring_addr: index u32, flags u32, desc u64, used u64, avail u64, log u64. */
export const VRING_ADDR_SIZE = 40;
/** VhostUserMemoryRegion: guest_phys_addr, memory_size, userspace_addr, mmap_offset (u64 each). */
export const MEMORY_REGION_SIZE = 32;
/** VhostUserMemory before the regions: nregions u32, padding u32. */
export const MEM_TABLE_HEADER_SIZE = 8;
/** VhostUserMemRegMsg: padding u64 + one region. */
export const SINGLE_REGION_SIZE = 8 + MEMORY_REGION_SIZE;
/** VhostUserConfig before the bytes: offset u32, size u32, flags u32. */
export const CONFIG_HEADER_SIZE = 12;
/** VhostUserVringArea: u64 (index | NOFD), size u64, offset u64. */
export const VRING_AREA_SIZE = 24;
/** VhostUserInflight: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16, 4 bytes of C tail padding. */
export const INFLIGHT_SIZE = 24;
/** VhostUserLog: mmap_size u64, mmap_offset u64. */
export const LOG_SIZE = 16;

/** SET_VRING_KICK/CALL/ERR and VRING_HOST_NOTIFIER: bits 0..7 the queue index, bit 8 "no fd". */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;
/** struct vhost_vring_addr flags: bit 0 is VHOST_VRING_F_LOG. */
export const VHOST_VRING_F_LOG = 0x1;
/** Config access flags (vhost-user.rst): 0 = front-end access to writable fields, 1 = live migration. */
export const CONFIG_FLAG_FRONTEND = 0;
export const CONFIG_FLAG_MIGRATION = 1;

/** The value a REPLY_ACK reply carries on failure (QEMU only tests for non-zero). */
export const REPLY_ACK_FAILURE = 1n;
export const REPLY_ACK_SUCCESS = 0n;

const TWO_POW_53 = 2n ** 53n;

// ---------------------------------------------------------------------------------------------------------------
// Errors

export type ProtocolErrorKind =
  /** Version, reserved flag bits, REPLY set on a request, or size above MAX_PAYLOAD_SIZE: framing cannot be trusted. */
  | 'BadHeader'
  /** A request code this protocol does not define. */
  | 'UnknownRequest'
  /** A defined request this back-end does not implement (or whose protocol feature was not negotiated). */
  | 'UnsupportedRequest'
  /** Payload size does not match the request's layout. */
  | 'BadSize'
  /** Wrong number of fds for the request, too many fds, or truncated ancillary data. */
  | 'BadFdCount'
  /** A field out of range (region count, index bits, alignment, reserved bits, overflow). */
  | 'BadPayload'
  /** Valid by itself but not now: unknown queue, memory not set, ring not stopped, feature not offered... */
  | 'BadState'
  /** The host could not do what was asked (mmap failed, memfd failed). */
  | 'HostError';

export class VhostUserProtocolError extends Error {
  constructor(
    readonly kind: ProtocolErrorKind,
    /** The request code the error is about (0 when the header itself was unreadable). */
    readonly request: number,
    readonly reason: string,
  ) {
    super(`${requestName(request)}: ${kind}: ${reason}`);
    this.name = 'VhostUserProtocolError';
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Header codec

export interface MessageHeader {
  request: number;
  flags: number;
  size: number;
}

export function decodeHeader(bytes: Uint8Array): MessageHeader {
  if (bytes.length < HEADER_SIZE) throw new RangeError(`header needs ${HEADER_SIZE} bytes, got ${bytes.length}`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
}

export function encodeHeader(h: MessageHeader, out?: Uint8Array): Uint8Array {
  const bytes = out ?? new Uint8Array(HEADER_SIZE);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  dv.setUint32(0, h.request >>> 0, true);
  dv.setUint32(4, h.flags >>> 0, true);
  dv.setUint32(8, h.size >>> 0, true);
  return bytes;
}

/** A whole message: header followed by the payload. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader({ request, flags, size: payload.length }, bytes);
  bytes.set(payload, HEADER_SIZE);
  return bytes;
}

/**
 * Checks a request header from the front-end. A failure here means the byte stream cannot be trusted (or a
 * payload larger than we buffer), so the connection is closed whatever REPLY_ACK says.
 */
export function checkRequestHeader(h: MessageHeader): void {
  const fail = (why: string): never => {
    throw new VhostUserProtocolError('BadHeader', h.request, why);
  };
  if ((h.flags & FLAG_VERSION_MASK) !== VHOST_USER_VERSION) {
    fail(`version ${h.flags & FLAG_VERSION_MASK}, expected ${VHOST_USER_VERSION}`);
  }
  if ((h.flags & FLAG_RESERVED_MASK) !== 0) fail(`reserved flag bits set (flags 0x${h.flags.toString(16)})`);
  if ((h.flags & FLAG_REPLY) !== 0) fail('REPLY flag set on a request');
  if (h.size > MAX_PAYLOAD_SIZE) fail(`payload size ${h.size} exceeds the maximum ${MAX_PAYLOAD_SIZE}`);
}

/**
 * Checks a reply read by a front-end (QEMU's rule: flags exactly REPLY | version, the same request code, and
 * the size the request's reply layout has). Returns a reason string, or undefined when the reply is well formed.
 */
export function checkReplyHeader(h: MessageHeader, expectedRequest: number): string | undefined {
  if (h.flags !== (FLAG_REPLY | VHOST_USER_VERSION)) return `reply flags 0x${h.flags.toString(16)}, expected 0x5`;
  if (h.request !== expectedRequest) return `reply to ${requestName(h.request)}, expected ${requestName(expectedRequest)}`;
  if (h.size > MAX_PAYLOAD_SIZE) return `reply size ${h.size} exceeds ${MAX_PAYLOAD_SIZE}`;
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------
// Payload encoders (used by the back-end for replies and by the reference front-end for requests)

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

export function encodeU64(value: bigint): Uint8Array {
  const b = new Uint8Array(U64_SIZE);
  view(b).setBigUint64(0, BigInt.asUintN(64, value), true);
  return b;
}

export interface VringState {
  index: number;
  num: number;
}
export function encodeVringState(s: VringState): Uint8Array {
  const b = new Uint8Array(VRING_STATE_SIZE);
  const dv = view(b);
  dv.setUint32(0, s.index >>> 0, true);
  dv.setUint32(4, s.num >>> 0, true);
  return b;
}

export interface VringAddr {
  index: number;
  flags: number;
  /** Ring addresses are front-end virtual addresses (u64 on the wire). */
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}
export function encodeVringAddr(a: VringAddr): Uint8Array {
  const b = new Uint8Array(VRING_ADDR_SIZE);
  const dv = view(b);
  dv.setUint32(0, a.index >>> 0, true);
  dv.setUint32(4, a.flags >>> 0, true);
  dv.setBigUint64(8, a.desc, true);
  dv.setBigUint64(16, a.used, true);
  dv.setBigUint64(24, a.avail, true);
  dv.setBigUint64(32, a.log, true);
  return b;
}

export interface MemoryRegionDesc {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}
function writeRegion(dv: DataView, at: number, r: MemoryRegionDesc): void {
  dv.setBigUint64(at, r.guestPhysAddr, true);
  dv.setBigUint64(at + 8, r.size, true);
  dv.setBigUint64(at + 16, r.userAddr, true);
  dv.setBigUint64(at + 24, r.mmapOffset, true);
}
function readRegion(dv: DataView, at: number): MemoryRegionDesc {
  return {
    guestPhysAddr: dv.getBigUint64(at, true),
    size: dv.getBigUint64(at + 8, true),
    userAddr: dv.getBigUint64(at + 16, true),
    mmapOffset: dv.getBigUint64(at + 24, true),
  };
}
/** SET_MEM_TABLE payload; QEMU sends exactly 8 + 32 * nregions bytes. */
export function encodeMemTable(regions: readonly MemoryRegionDesc[]): Uint8Array {
  const b = new Uint8Array(MEM_TABLE_HEADER_SIZE + MEMORY_REGION_SIZE * regions.length);
  const dv = view(b);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => writeRegion(dv, MEM_TABLE_HEADER_SIZE + i * MEMORY_REGION_SIZE, r));
  return b;
}
/** ADD_MEM_REG / REM_MEM_REG payload. */
export function encodeSingleRegion(r: MemoryRegionDesc): Uint8Array {
  const b = new Uint8Array(SINGLE_REGION_SIZE);
  writeRegion(view(b), 8, r);
  return b;
}

export interface ConfigAccess {
  offset: number;
  flags: number;
  /** GET_CONFIG: the bytes (the request's are ignored, their length is the access size). SET_CONFIG: the values. */
  data: Uint8Array;
}
export function encodeConfig(c: ConfigAccess): Uint8Array {
  const b = new Uint8Array(CONFIG_HEADER_SIZE + c.data.length);
  const dv = view(b);
  dv.setUint32(0, c.offset >>> 0, true);
  dv.setUint32(4, c.data.length, true);
  dv.setUint32(8, c.flags >>> 0, true);
  b.set(c.data, CONFIG_HEADER_SIZE);
  return b;
}

export interface VringArea {
  /** Queue index in bits 0..7, VRING_NOFD_MASK in bit 8. */
  u64: bigint;
  size: bigint;
  offset: bigint;
}
export function encodeVringArea(a: VringArea): Uint8Array {
  const b = new Uint8Array(VRING_AREA_SIZE);
  const dv = view(b);
  dv.setBigUint64(0, a.u64, true);
  dv.setBigUint64(8, a.size, true);
  dv.setBigUint64(16, a.offset, true);
  return b;
}
export function decodeVringArea(payload: Uint8Array): VringArea | undefined {
  if (payload.length !== VRING_AREA_SIZE) return undefined;
  const dv = view(payload);
  return { u64: dv.getBigUint64(0, true), size: dv.getBigUint64(8, true), offset: dv.getBigUint64(16, true) };
}

// SHMEM_MAP / SHMEM_UNMAP (backend requests 9 and 10) and GET_SHMEM_CONFIG (front-end request 44), protocol feature
// SHMEM: their codec is shmem-messages.ts, their use shmem.ts.

export interface InflightDesc {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}
export function encodeInflight(d: InflightDesc): Uint8Array {
  const b = new Uint8Array(INFLIGHT_SIZE);
  const dv = view(b);
  dv.setBigUint64(0, d.mmapSize, true);
  dv.setBigUint64(8, d.mmapOffset, true);
  dv.setUint16(16, d.numQueues, true);
  dv.setUint16(18, d.queueSize, true);
  return b;
}

export function decodeU64(payload: Uint8Array): bigint | undefined {
  return payload.length === U64_SIZE ? view(payload).getBigUint64(0, true) : undefined;
}
export function decodeVringState(payload: Uint8Array): VringState | undefined {
  if (payload.length !== VRING_STATE_SIZE) return undefined;
  const dv = view(payload);
  return { index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
}
export function decodeInflight(payload: Uint8Array): InflightDesc | undefined {
  if (payload.length !== INFLIGHT_SIZE) return undefined;
  const dv = view(payload);
  return {
    mmapSize: dv.getBigUint64(0, true),
    mmapOffset: dv.getBigUint64(8, true),
    numQueues: dv.getUint16(16, true),
    queueSize: dv.getUint16(18, true),
  };
}
export function decodeConfig(payload: Uint8Array): ConfigAccess | undefined {
  if (payload.length < CONFIG_HEADER_SIZE) return undefined;
  const dv = view(payload);
  const size = dv.getUint32(4, true);
  if (payload.length !== CONFIG_HEADER_SIZE + size) return undefined;
  return { offset: dv.getUint32(0, true), flags: dv.getUint32(8, true), data: payload.subarray(CONFIG_HEADER_SIZE) };
}

// ---------------------------------------------------------------------------------------------------------------
// Request decoding and syntactic validation

/** A memory region with addresses already checked to be exact JS numbers (all below 2^53). */
export interface RegionSpec {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

export type FrontendMessage =
  | { type: 'GET_FEATURES' }
  | { type: 'SET_FEATURES'; features: bigint }
  | { type: 'SET_OWNER' }
  | { type: 'RESET_OWNER' }
  | { type: 'SET_MEM_TABLE'; regions: RegionSpec[] }
  | { type: 'SET_VRING_NUM'; index: number; num: number }
  | { type: 'SET_VRING_ADDR'; index: number; flags: number; desc: number; used: number; avail: number; log: bigint }
  | { type: 'SET_VRING_BASE'; index: number; num: number }
  | { type: 'GET_VRING_BASE'; index: number }
  | { type: 'SET_VRING_KICK' | 'SET_VRING_CALL' | 'SET_VRING_ERR'; index: number; hasFd: boolean }
  | { type: 'GET_PROTOCOL_FEATURES' }
  | { type: 'SET_PROTOCOL_FEATURES'; features: bigint }
  | { type: 'GET_QUEUE_NUM' }
  | { type: 'SET_VRING_ENABLE'; index: number; enable: boolean }
  | { type: 'SET_BACKEND_REQ_FD' }
  | { type: 'GET_CONFIG'; offset: number; size: number; flags: number }
  | { type: 'SET_CONFIG'; offset: number; flags: number; data: Uint8Array }
  | { type: 'GET_INFLIGHT_FD'; numQueues: number; queueSize: number }
  | { type: 'SET_INFLIGHT_FD'; mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number }
  | { type: 'RESET_DEVICE' }
  | { type: 'GET_MAX_MEM_SLOTS' }
  | { type: 'ADD_MEM_REG'; region: RegionSpec }
  | { type: 'REM_MEM_REG'; region: RegionSpec }
  | { type: 'SET_STATUS'; status: number }
  | { type: 'GET_STATUS' };

export type FrontendMessageType = FrontendMessage['type'];

/** Requests whose reply is part of the protocol (sent whatever NEED_REPLY says). */
export const REQUESTS_WITH_REPLY: ReadonlySet<number> = new Set([
  FrontendRequest.GET_FEATURES,
  FrontendRequest.GET_PROTOCOL_FEATURES,
  FrontendRequest.GET_VRING_BASE,
  FrontendRequest.GET_QUEUE_NUM,
  FrontendRequest.GET_CONFIG,
  FrontendRequest.GET_INFLIGHT_FD,
  FrontendRequest.GET_MAX_MEM_SLOTS,
  FrontendRequest.GET_STATUS,
]);

/**
 * Decodes and syntactically validates one front-end request: payload size against the request's layout, the
 * number of fds, and every field that can be checked without state (region counts and sizes, u64 overflow,
 * index bits, ring alignment, reserved bits). Throws VhostUserProtocolError. The header must already have
 * passed checkRequestHeader.
 */
export function decodeRequest(h: MessageHeader, payload: Uint8Array, fdCount: number): FrontendMessage {
  const code = h.request;
  const name = frontendRequestFromCode(code);
  const err = (kind: ProtocolErrorKind, why: string): VhostUserProtocolError =>
    new VhostUserProtocolError(kind, code, why);
  if (name === undefined) throw err('UnknownRequest', 'not a vhost-user request code');
  if (payload.length !== h.size) throw err('BadSize', `header says ${h.size} bytes, ${payload.length} arrived`);
  if (fdCount > MAX_FDS_PER_MESSAGE) throw err('BadFdCount', `${fdCount} fds, at most ${MAX_FDS_PER_MESSAGE}`);

  const size = (expected: number): void => {
    if (payload.length !== expected) throw err('BadSize', `payload is ${payload.length} bytes, expected ${expected}`);
  };
  const fds = (expected: number): void => {
    if (fdCount !== expected) throw err('BadFdCount', `${fdCount} fds, expected ${expected}`);
  };
  const dv = view(payload);
  const safe = (v: bigint, what: string): number => {
    if (v >= TWO_POW_53) throw err('BadPayload', `${what} 0x${v.toString(16)} is above 2^53`);
    return Number(v);
  };
  const region = (r: MemoryRegionDesc, what: string): RegionSpec => {
    if (r.size === 0n) throw err('BadPayload', `${what}: size is 0`);
    const max = 2n ** 64n;
    if (r.guestPhysAddr + r.size > max) throw err('BadPayload', `${what}: guest address + size wraps past 2^64`);
    if (r.userAddr + r.size > max) throw err('BadPayload', `${what}: user address + size wraps past 2^64`);
    if (r.mmapOffset + r.size > max) throw err('BadPayload', `${what}: mmap offset + size wraps past 2^64`);
    const spec = {
      guestPhysAddr: safe(r.guestPhysAddr, `${what}: guest address`),
      size: safe(r.size, `${what}: size`),
      userAddr: safe(r.userAddr, `${what}: user address`),
      mmapOffset: safe(r.mmapOffset, `${what}: mmap offset`),
    };
    if (spec.guestPhysAddr + spec.size > Number.MAX_SAFE_INTEGER + 1) throw err('BadPayload', `${what}: guest range ends above 2^53`);
    if (spec.userAddr + spec.size > Number.MAX_SAFE_INTEGER + 1) throw err('BadPayload', `${what}: user range ends above 2^53`);
    return spec;
  };
  const noPayload = (): void => {
    size(0);
    fds(0);
  };
  const vringFile = (): { index: number; hasFd: boolean } => {
    size(U64_SIZE);
    const v = dv.getBigUint64(0, true);
    if ((v & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK)) !== 0n) {
      throw err('BadPayload', `reserved bits set in 0x${v.toString(16)} (only index bits 0-7 and NOFD bit 8 are defined)`);
    }
    const hasFd = (v & BigInt(VRING_NOFD_MASK)) === 0n;
    fds(hasFd ? 1 : 0);
    return { index: Number(v & BigInt(VRING_IDX_MASK)), hasFd };
  };
  const state = (): VringState => {
    size(VRING_STATE_SIZE);
    fds(0);
    return decodeVringState(payload)!;
  };

  switch (name) {
    case 'GET_FEATURES':
    case 'SET_OWNER':
    case 'RESET_OWNER':
    case 'GET_PROTOCOL_FEATURES':
    case 'GET_QUEUE_NUM':
    case 'RESET_DEVICE':
    case 'GET_MAX_MEM_SLOTS':
    case 'GET_STATUS':
      noPayload();
      return { type: name };
    case 'SET_FEATURES':
    case 'SET_PROTOCOL_FEATURES':
      size(U64_SIZE);
      fds(0);
      return { type: name, features: dv.getBigUint64(0, true) };
    case 'SET_STATUS': {
      size(U64_SIZE);
      fds(0);
      const v = dv.getBigUint64(0, true);
      if (v > 0xffn) throw err('BadPayload', `status 0x${v.toString(16)} does not fit the 8-bit device status`);
      return { type: name, status: Number(v) };
    }
    case 'SET_MEM_TABLE': {
      if (payload.length < MEM_TABLE_HEADER_SIZE) throw err('BadSize', `payload is ${payload.length} bytes, shorter than the table header`);
      const n = dv.getUint32(0, true);
      if (dv.getUint32(4, true) !== 0) throw err('BadPayload', 'padding is not zero');
      if (n === 0 || n > MAX_MEM_TABLE_REGIONS) throw err('BadPayload', `${n} regions, expected 1..${MAX_MEM_TABLE_REGIONS}`);
      size(MEM_TABLE_HEADER_SIZE + n * MEMORY_REGION_SIZE);
      fds(n);
      const regions: RegionSpec[] = [];
      for (let i = 0; i < n; i++) {
        regions.push(region(readRegion(dv, MEM_TABLE_HEADER_SIZE + i * MEMORY_REGION_SIZE), `region ${i}`));
      }
      return { type: name, regions };
    }
    case 'ADD_MEM_REG':
    case 'REM_MEM_REG': {
      size(SINGLE_REGION_SIZE);
      // REM_MEM_REG: "no fd SHOULD be passed"; one is tolerated (and closed unused), as vhost-user.rst allows.
      if (name === 'ADD_MEM_REG') fds(1);
      else if (fdCount > 1) throw err('BadFdCount', `${fdCount} fds, expected 0 (or 1, tolerated)`);
      return { type: name, region: region(readRegion(dv, 8), 'region') };
    }
    case 'SET_VRING_NUM':
    case 'SET_VRING_BASE': {
      const s = state();
      return { type: name, index: s.index, num: s.num };
    }
    case 'GET_VRING_BASE':
      return { type: name, index: state().index };
    case 'SET_VRING_ENABLE': {
      const s = state();
      if (s.num > 1) throw err('BadPayload', `enable value ${s.num}, expected 0 or 1`);
      return { type: name, index: s.index, enable: s.num === 1 };
    }
    case 'SET_VRING_ADDR': {
      size(VRING_ADDR_SIZE);
      fds(0);
      const index = dv.getUint32(0, true);
      const flags = dv.getUint32(4, true);
      if ((flags & ~VHOST_VRING_F_LOG) !== 0) throw err('BadPayload', `unknown ring flags 0x${flags.toString(16)}`);
      const desc = dv.getBigUint64(8, true);
      const used = dv.getBigUint64(16, true);
      const avail = dv.getBigUint64(24, true);
      // Alignment the virtio spec requires of each area (split: 16/2/4; packed: 16/4/4, checked in the session).
      if (desc % 16n !== 0n) throw err('BadPayload', `descriptor table 0x${desc.toString(16)} is not 16-byte aligned`);
      if (avail % 2n !== 0n) throw err('BadPayload', `available ring 0x${avail.toString(16)} is not 2-byte aligned`);
      if (used % 4n !== 0n) throw err('BadPayload', `used ring 0x${used.toString(16)} is not 4-byte aligned`);
      return {
        type: name,
        index,
        flags,
        desc: safe(desc, 'descriptor table address'),
        used: safe(used, 'used ring address'),
        avail: safe(avail, 'available ring address'),
        log: dv.getBigUint64(32, true),
      };
    }
    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR':
      return { type: name, ...vringFile() };
    case 'SET_BACKEND_REQ_FD':
      size(0);
      fds(1);
      return { type: name };
    case 'GET_CONFIG':
    case 'SET_CONFIG': {
      fds(0);
      if (payload.length < CONFIG_HEADER_SIZE) throw err('BadSize', `payload is ${payload.length} bytes, shorter than the config header`);
      const offset = dv.getUint32(0, true);
      const len = dv.getUint32(4, true);
      const flags = dv.getUint32(8, true);
      if (len === 0 || len > MAX_CONFIG_SIZE) throw err('BadPayload', `config access size ${len}, expected 1..${MAX_CONFIG_SIZE}`);
      size(CONFIG_HEADER_SIZE + len);
      if (flags !== CONFIG_FLAG_FRONTEND && flags !== CONFIG_FLAG_MIGRATION) throw err('BadPayload', `config flags ${flags}, expected 0 or 1`);
      if (offset + len > MAX_CONFIG_SIZE) throw err('BadPayload', `config access [${offset}, ${offset + len}) ends past ${MAX_CONFIG_SIZE}`);
      if (name === 'GET_CONFIG') return { type: name, offset, size: len, flags };
      return { type: name, offset, flags, data: payload.slice(CONFIG_HEADER_SIZE) };
    }
    case 'GET_INFLIGHT_FD':
    case 'SET_INFLIGHT_FD': {
      size(INFLIGHT_SIZE);
      fds(name === 'SET_INFLIGHT_FD' ? 1 : 0);
      const d = decodeInflight(payload)!;
      if (d.numQueues === 0 || d.queueSize === 0) throw err('BadPayload', `num_queues ${d.numQueues}, queue_size ${d.queueSize}: both must be > 0`);
      if (name === 'GET_INFLIGHT_FD') return { type: name, numQueues: d.numQueues, queueSize: d.queueSize };
      if (d.mmapSize === 0n) throw err('BadPayload', 'mmap_size is 0');
      if (d.mmapOffset + d.mmapSize > 2n ** 64n) throw err('BadPayload', 'mmap offset + size wraps past 2^64');
      return {
        type: name,
        mmapSize: safe(d.mmapSize, 'mmap size'),
        mmapOffset: safe(d.mmapOffset, 'mmap offset'),
        numQueues: d.numQueues,
        queueSize: d.queueSize,
      };
    }
    default:
      throw err('UnsupportedRequest', 'this back-end does not implement it (its protocol feature is never offered)');
  }
}
