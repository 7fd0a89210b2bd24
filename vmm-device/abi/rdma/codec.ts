// Framing of control requests and responses, page lists, SGE arrays and the ring arithmetic of the data path,
// as spec sections 7, 8 and 10 define them. The device and the reference driver both use these functions, so a
// disagreement about framing shows up as a failing test here rather than as two implementations that differ.

import { Limits, Status, type StatusName } from './constants.ts';
import { LayoutError } from './struct.ts';
import {
  COMMANDS,
  CreateCqRequest,
  CreateQpRequest,
  CtrlRequestHeader,
  CtrlResponseHeader,
  RegMrContinueRequest,
  RegMrRequest,
  Sge,
  type CommandSpec,
} from './structs.ts';

export type RequestHeader = ReturnType<typeof CtrlRequestHeader.decode>;
export type ResponseHeader = ReturnType<typeof CtrlResponseHeader.decode>;
export type SgeValue = ReturnType<typeof Sge.decode>;

/** Builds the device-readable part of a control request: header, fixed body, then the page list if any. */
export function encodeRequest(command: number, tag: bigint, body: Uint8Array, pageList: readonly bigint[] = []): Uint8Array {
  const length = body.byteLength + pageList.length * Limits.PAGE_ADDR_SIZE;
  const out = new Uint8Array(CtrlRequestHeader.size + length);
  CtrlRequestHeader.encode({ command, length, tag }, out, 0);
  out.set(body, CtrlRequestHeader.size);
  encodePageList(pageList, out, CtrlRequestHeader.size + body.byteLength);
  return out;
}

/** Builds the device-writable part's contents: header then (on OK) the response body. */
export function encodeResponse(status: number, detail: number, tag: bigint, body: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(CtrlResponseHeader.size + body.byteLength);
  CtrlResponseHeader.encode({ status, detail, tag }, out, 0);
  out.set(body, CtrlResponseHeader.size);
  return out;
}

/** Writes little-endian u64 page addresses at `offset` of `target` (a new array when absent). */
export function encodePageList(pages: readonly bigint[], target?: Uint8Array, offset = 0): Uint8Array {
  const out = target ?? new Uint8Array(pages.length * Limits.PAGE_ADDR_SIZE);
  if (offset + pages.length * Limits.PAGE_ADDR_SIZE > out.byteLength) {
    throw new LayoutError(`page list of ${pages.length} entries does not fit at offset ${offset} of ${out.byteLength}`);
  }
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  pages.forEach((p, i) => {
    if (p < 0n || p > 0xffff_ffff_ffff_ffffn) throw new LayoutError(`page ${i}: ${p} is not a u64`);
    view.setBigUint64(offset + i * Limits.PAGE_ADDR_SIZE, p, true);
  });
  return out;
}

/** Reads `count` page addresses at `offset`; LayoutError if they are not all inside `source` (never reads past it). */
export function decodePageList(source: Uint8Array, offset: number, count: number): bigint[] {
  if (!Number.isInteger(count) || count < 0 || offset < 0 || offset + count * Limits.PAGE_ADDR_SIZE > source.byteLength) {
    throw new LayoutError(`page list of ${count} entries at offset ${offset} exceeds the ${source.byteLength}-byte request`);
  }
  const view = new DataView(source.buffer, source.byteOffset, source.byteLength);
  const pages: bigint[] = [];
  for (let i = 0; i < count; i++) pages.push(view.getBigUint64(offset + i * Limits.PAGE_ADDR_SIZE, true));
  return pages;
}

/** Number of page-list entries a command's fixed body announces (0 for commands without a page list). */
export function announcedPages(spec: CommandSpec, body: Uint8Array): number {
  if (!spec.pageList) return 0;
  if (spec.request === CreateCqRequest) return CreateCqRequest.decode(body).num_pages;
  if (spec.request === CreateQpRequest) {
    const r = CreateQpRequest.decode(body);
    return r.sq_num_pages + r.rq_num_pages;
  }
  if (spec.request === RegMrRequest) return RegMrRequest.decode(body).num_pages;
  if (spec.request === RegMrContinueRequest) return RegMrContinueRequest.decode(body).num_pages;
  throw new LayoutError(`${spec.name}: page-list command without a page count`);
}

/** Outcome of checking a request's framing (spec section 7.2, in that order). */
export type RequestFraming =
  | { kind: 'ok'; header: RequestHeader; spec: CommandSpec; body: Uint8Array; pages: number }
  /** A status the device answers with (the queue stays usable). */
  | { kind: 'status'; header: RequestHeader; status: number; statusName: StatusName; detail: number }
  /** Fewer than 16 readable or writable bytes: no way to answer; the device sets DEVICE_NEEDS_RESET (section 7.5). */
  | { kind: 'fatal'; reason: string };

/**
 * Checks the framing of a control request's readable part against the command table: header present, command
 * known, `length` inside the readable part and equal to what the command carries, the writable part large
 * enough for the response. Reads nothing outside `readable`. `writableBytes` is the size of the chain's writable
 * part; `maxPagesPerCommand` is the device's config value.
 */
export function checkRequestFraming(readable: Uint8Array, writableBytes: number, maxPagesPerCommand: number): RequestFraming {
  if (readable.byteLength < CtrlRequestHeader.size) {
    return { kind: 'fatal', reason: `readable part of ${readable.byteLength} bytes has no room for the 16-byte header` };
  }
  if (writableBytes < CtrlResponseHeader.size) {
    return { kind: 'fatal', reason: `writable part of ${writableBytes} bytes has no room for the 16-byte response header` };
  }
  const header = CtrlRequestHeader.decode(readable);
  const fail = (statusName: StatusName, detail = 0): RequestFraming => ({
    kind: 'status',
    header,
    status: Status[statusName],
    statusName,
    detail,
  });
  const spec = COMMANDS.get(header.command);
  if (spec === undefined) return fail('INVALID_COMMAND');
  const available = readable.byteLength - CtrlRequestHeader.size;
  if (header.length > available) return fail('INVALID_LENGTH');
  if (header.length < spec.request.size) return fail('INVALID_LENGTH');
  const body = readable.subarray(CtrlRequestHeader.size, CtrlRequestHeader.size + header.length);
  const pages = announcedPages(spec, body);
  if (spec.pageList && pages > maxPagesPerCommand) {
    return fail('INVALID_ARGUMENT', pageCountFieldOffset(spec, body, maxPagesPerCommand));
  }
  if (header.length !== spec.request.size + pages * Limits.PAGE_ADDR_SIZE) return fail('INVALID_LENGTH');
  if (writableBytes < CtrlResponseHeader.size + spec.response.size) return fail('INVALID_LENGTH', 1);
  return { kind: 'ok', header, spec, body, pages };
}

/**
 * Offset (inside the body) of the page-count field that made the announced pages exceed `maxPagesPerCommand`: the
 * `detail` of check 4. CREATE_QP has two: sq_num_pages when it alone is too many, else rq_num_pages (the one whose
 * pages went over the limit).
 */
export function pageCountFieldOffset(spec: CommandSpec, body: Uint8Array, maxPagesPerCommand: number): number {
  if (spec.request === CreateQpRequest) {
    const r = CreateQpRequest.decode(body);
    return CreateQpRequest.offsetOf(r.sq_num_pages > maxPagesPerCommand ? 'sq_num_pages' : 'rq_num_pages');
  }
  return spec.request.offsetOf('num_pages');
}

/** Splits the writable part's contents into header and body (`used` = the used length the device reported). */
export function decodeResponse(written: Uint8Array, used: number): { header: ResponseHeader; body: Uint8Array } {
  if (used < CtrlResponseHeader.size || used > written.byteLength) {
    throw new LayoutError(`used length ${used} cannot hold a response header in ${written.byteLength} bytes`);
  }
  return { header: CtrlResponseHeader.decode(written), body: written.subarray(CtrlResponseHeader.size, used) };
}

/** Encodes up to `slots` SGEs into a payload area of slots * 16 bytes (unused slots zero). */
export function encodeSges(sges: readonly SgeValue[], slots: number): Uint8Array {
  if (sges.length > slots) throw new LayoutError(`${sges.length} SGEs do not fit in ${slots} slots`);
  const out = new Uint8Array(slots * Sge.size);
  sges.forEach((s, i) => Sge.encode(s, out, i * Sge.size));
  return out;
}

/** Decodes the first `count` SGEs of a payload area; LayoutError if they are not all inside it. */
export function decodeSges(payload: Uint8Array, count: number): SgeValue[] {
  if (!Number.isInteger(count) || count < 0 || count * Sge.size > payload.byteLength) {
    throw new LayoutError(`${count} SGEs do not fit in a ${payload.byteLength}-byte payload`);
  }
  const out: SgeValue[] = [];
  for (let i = 0; i < count; i++) out.push(Sge.decode(payload, i * Sge.size));
  return out;
}

/** Pages of 2^pageShift bytes a ring of `depth` entries of `entrySize` bytes occupies (spec section 10.2). */
export function ringPages(depth: number, entrySize: number, pageShift: number): number {
  const bytes = depth * entrySize;
  return Math.ceil(bytes / 2 ** pageShift);
}

/**
 * Pages a memory region needs (spec section 8.13): the region starts at offset (iova mod page size) of its first
 * page. Returns a bigint: a guest can ask for any length, and the device compares before it allocates anything.
 */
export function mrPageCount(iova: bigint, length: bigint, pageShift: number): bigint {
  const pageSize = 1n << BigInt(pageShift);
  const first = iova & (pageSize - 1n);
  return (first + length + pageSize - 1n) >> BigInt(pageShift);
}

/** Entries between a consumer and a producer index (free-running u32 counters, spec section 10.2). */
export function ringOccupancy(producer: number, consumer: number): number {
  return (producer - consumer) >>> 0;
}

/** True for a power of two in [1, 2^31]. */
export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && n <= 0x8000_0000 && (n & (n - 1)) === 0;
}

/**
 * The smallest `max_pages_per_command` a device may advertise for its `max_qp_wr` and `max_cqe` (spec section 5.2):
 * the largest QP's SQ and RQ, and the largest CQ, must each fit in one command with 4 KiB pages.
 */
export function minPagesPerCommand(maxQpWr: number, maxCqe: number): number {
  const qp =
    ringPages(maxQpWr, Limits.SQ_WQE_SIZE, Limits.MIN_PAGE_SHIFT) + ringPages(maxQpWr, Limits.RQ_WQE_SIZE, Limits.MIN_PAGE_SHIFT);
  return Math.max(qp, ringPages(maxCqe, Limits.CQE_SIZE, Limits.MIN_PAGE_SHIFT));
}
