// The fixed binary layouts in which work requests and completions cross into native code: one buffer per list,
// one native call per list (native/src/verbs/wr.cc reads and writes the same offsets; keep the two in step).
//
//   send WR: 64-byte header, then num_sge SGEs of 16 bytes
//     0 wr_id u64 | 8 opcode u32 | 12 send_flags u32 | 16 num_sge u32 | 20 imm_data u32 (host order; the rkey to
//     invalidate for SEND_WITH_INV) | 24 remote_addr u64 | 32 rkey u32 | 36 ah handle u32 (UD) |
//     40 compare_add u64 | 48 swap u64 | 56 remote_qpn u32 | 60 remote_qkey u32
//   inline send WR (SendFlags.INLINE in send_flags): the header with num_sge = 1, then one SGE {addr 0, length =
//     the inline byte count (at most MAX_INLINE_PER_WR), lkey 0}, then those bytes, unpadded. The bytes travel in
//     the list itself: native code points the host SGE at them for ibv_post_send, which copies inline data before
//     it returns, so no caller ever hands native code an address for inline data.
//   recv WR: 16-byte header (0 wr_id u64 | 8 num_sge u32 | 12 reserved), then num_sge SGEs
//   SGE: 0 addr u64 | 8 length u32 | 12 lkey u32
//   work completion, 48 bytes: 0 wr_id u64 | 8 status u32 | 12 opcode u32 | 16 vendor_err u32 | 20 byte_len u32 |
//     24 imm_data u32 (host order) | 28 qp_num u32 | 32 src_qp u32 | 36 wc_flags u32 | 40 pkey_index u16 |
//     42 slid u16 | 44 sl u8 | 45 dlid_path_bits u8 | 46 reserved u16
// All little-endian (the host's order: x86-64 and arm64 Linux).

import {
  MAX_INLINE_PER_WR,
  MAX_SGE_PER_WR,
  MAX_WC_PER_POLL,
  MAX_WRS_PER_POST,
  RECV_WR_HEADER_BYTES,
  SEND_WR_HEADER_BYTES,
  SGE_BYTES,
  WC_BYTES,
  SendFlags,
} from './constants.ts';

const TWO_POW_32 = 0x1_0000_0000;
const U64_MAX = (1n << 64n) - 1n;

/** A 64-bit value: a number when it is a safe integer, or a bigint. */
export type U64 = number | bigint;

export interface Sge {
  /** Address in the MR's address space: its iova if registered with one, else the process address. */
  addr: U64;
  length: number;
  lkey: number;
}

export interface SendWr {
  wrId: U64;
  /** WrOpcode. */
  opcode: number;
  /** SendFlags bits. */
  sendFlags?: number;
  sgList?: readonly Sge[];
  /**
   * Inline data, instead of sgList: encoding copies these bytes into the list and sets SendFlags.INLINE (which
   * must not be set without them); ibv_post_send copies them into the host's WQE, so no MR is involved.
   */
  inline?: Uint8Array;
  /** Immediate data (host order) for *_WITH_IMM; the rkey to invalidate for SEND_WITH_INV. */
  immData?: number;
  /** RDMA and atomic target. */
  remoteAddr?: U64;
  rkey?: number;
  /** Atomic compare (CMP_AND_SWP) or addend (FETCH_AND_ADD). */
  compareAdd?: U64;
  /** Atomic swap value. */
  swap?: U64;
  /** UD: the address handle's id (`AhHandle.id`), the destination QP number and Q_Key. */
  ah?: { readonly id: number };
  remoteQpn?: number;
  remoteQkey?: number;
}

export interface RecvWr {
  wrId: U64;
  sgList?: readonly Sge[];
}

/** A send WR as read back from the layout (what native code sees). */
export interface DecodedSendWr {
  wrId: bigint;
  opcode: number;
  sendFlags: number;
  immData: number;
  remoteAddr: bigint;
  rkey: number;
  ahId: number;
  compareAdd: bigint;
  swap: bigint;
  remoteQpn: number;
  remoteQkey: number;
  /** Empty for an inline work request. */
  sgList: { addr: bigint; length: number; lkey: number }[];
  /** The inline bytes (a copy), when sendFlags has INLINE. */
  inline?: Uint8Array;
}

export interface DecodedRecvWr {
  wrId: bigint;
  sgList: { addr: bigint; length: number; lkey: number }[];
}

/** Thrown by the encoders for a value that does not fit its field: a caller bug or unchecked guest input. */
export class WrLayoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WrLayoutError';
  }
}

function checkU32(field: string, v: number | undefined): number {
  const x = v ?? 0;
  if (!Number.isInteger(x) || x < 0 || x > 0xffff_ffff) throw new WrLayoutError(`${field} ${x} is not a u32`);
  return x;
}

function writeU64(view: DataView, off: number, field: string, v: U64 | undefined): void {
  const x = v ?? 0;
  if (typeof x === 'bigint') {
    if (x < 0n || x > U64_MAX) throw new WrLayoutError(`${field} ${x} is not a u64`);
    view.setBigUint64(off, x, true);
    return;
  }
  if (!Number.isSafeInteger(x) || x < 0) throw new WrLayoutError(`${field} ${x} is not a non-negative safe integer`);
  view.setUint32(off, x % TWO_POW_32, true);
  view.setUint32(off + 4, Math.floor(x / TWO_POW_32), true);
}

/** Growable encoding buffer, at most `maxBytes`. */
class LayoutBuffer {
  protected bytesArr: Uint8Array;
  protected view: DataView;
  protected used = 0;
  protected n = 0;

  constructor(
    initialBytes: number,
    private readonly maxBytes: number,
  ) {
    this.bytesArr = new Uint8Array(initialBytes);
    this.view = new DataView(this.bytesArr.buffer);
  }

  /** Number of work requests encoded. */
  get count(): number {
    return this.n;
  }

  /** The encoded list (a view of the used part of the buffer, valid until the next push after clear). */
  get bytes(): Uint8Array {
    return this.bytesArr.subarray(0, this.used);
  }

  clear(): void {
    this.used = 0;
    this.n = 0;
  }

  protected reserve(extra: number): number {
    if (this.n >= MAX_WRS_PER_POST) throw new WrLayoutError(`more than ${MAX_WRS_PER_POST} work requests in one list`);
    const need = this.used + extra;
    if (need > this.bytesArr.length) {
      const grown = new Uint8Array(Math.min(this.maxBytes, Math.max(need, this.bytesArr.length * 2)));
      grown.set(this.bytesArr.subarray(0, this.used));
      this.bytesArr = grown;
      this.view = new DataView(grown.buffer);
    }
    const off = this.used;
    this.used = need;
    return off;
  }

  protected writeSges(off: number, sgList: readonly Sge[]): void {
    for (let i = 0; i < sgList.length; i++) {
      const s = sgList[i]!;
      const o = off + i * SGE_BYTES;
      writeU64(this.view, o, `sge ${i} addr`, s.addr);
      this.view.setUint32(o + 8, checkU32(`sge ${i} length`, s.length), true);
      this.view.setUint32(o + 12, checkU32(`sge ${i} lkey`, s.lkey), true);
    }
  }
}

function checkSgeCount(sgList: readonly Sge[]): void {
  if (sgList.length > MAX_SGE_PER_WR)
    throw new WrLayoutError(`${sgList.length} SGEs in one work request, more than ${MAX_SGE_PER_WR}`);
}

const NO_SGES: readonly Sge[] = [];

/** A list of send work requests in the native layout. Reusable: clear() and push() again, or post it again. */
export class SendWrList extends LayoutBuffer {
  constructor(initialCapacity = 16) {
    const largestWr = SEND_WR_HEADER_BYTES + Math.max(MAX_SGE_PER_WR * SGE_BYTES, SGE_BYTES + MAX_INLINE_PER_WR);
    super(initialCapacity * (SEND_WR_HEADER_BYTES + 2 * SGE_BYTES), MAX_WRS_PER_POST * largestWr);
  }

  push(wr: SendWr): this {
    const sgList = wr.sgList ?? NO_SGES;
    checkSgeCount(sgList);
    const inline = wr.inline;
    const flags = checkU32('sendFlags', wr.sendFlags);
    if (inline !== undefined) {
      if (sgList.length > 0) throw new WrLayoutError('a work request carries inline data or SGEs, not both');
      if (inline.length > MAX_INLINE_PER_WR) throw new WrLayoutError(`${inline.length} inline bytes, more than ${MAX_INLINE_PER_WR}`);
    } else if ((flags & SendFlags.INLINE) !== 0) {
      throw new WrLayoutError('SendFlags.INLINE without inline data');
    }
    const mark = this.used;
    const off = this.reserve(SEND_WR_HEADER_BYTES + (inline !== undefined ? SGE_BYTES + inline.length : sgList.length * SGE_BYTES));
    const v = this.view;
    try {
      writeU64(v, off, 'wrId', wr.wrId);
      v.setUint32(off + 8, checkU32('opcode', wr.opcode), true);
      v.setUint32(off + 12, inline !== undefined ? (flags | SendFlags.INLINE) >>> 0 : flags, true);
      v.setUint32(off + 16, inline !== undefined ? 1 : sgList.length, true);
      v.setUint32(off + 20, checkU32('immData', wr.immData), true);
      writeU64(v, off + 24, 'remoteAddr', wr.remoteAddr);
      v.setUint32(off + 32, checkU32('rkey', wr.rkey), true);
      v.setUint32(off + 36, checkU32('ah', wr.ah?.id), true);
      writeU64(v, off + 40, 'compareAdd', wr.compareAdd);
      writeU64(v, off + 48, 'swap', wr.swap);
      v.setUint32(off + 56, checkU32('remoteQpn', wr.remoteQpn), true);
      v.setUint32(off + 60, checkU32('remoteQkey', wr.remoteQkey), true);
      if (inline !== undefined) {
        const rec = off + SEND_WR_HEADER_BYTES;
        v.setBigUint64(rec, 0n, true);
        v.setUint32(rec + 8, inline.length, true);
        v.setUint32(rec + 12, 0, true);
        this.bytesArr.set(inline, rec + SGE_BYTES);
      } else {
        this.writeSges(off + SEND_WR_HEADER_BYTES, sgList);
      }
    } catch (e) {
      this.used = mark; // a rejected WR leaves the list as it was
      throw e;
    }
    this.n++;
    return this;
  }
}

/** A list of receive work requests in the native layout. */
export class RecvWrList extends LayoutBuffer {
  constructor(initialCapacity = 16) {
    super(initialCapacity * (RECV_WR_HEADER_BYTES + 2 * SGE_BYTES), MAX_WRS_PER_POST * (RECV_WR_HEADER_BYTES + MAX_SGE_PER_WR * SGE_BYTES));
  }

  push(wr: RecvWr): this {
    const sgList = wr.sgList ?? NO_SGES;
    checkSgeCount(sgList);
    const mark = this.used;
    const off = this.reserve(RECV_WR_HEADER_BYTES + sgList.length * SGE_BYTES);
    try {
      writeU64(this.view, off, 'wrId', wr.wrId);
      this.view.setUint32(off + 8, sgList.length, true);
      this.view.setUint32(off + 12, 0, true);
      this.writeSges(off + RECV_WR_HEADER_BYTES, sgList);
    } catch (e) {
      this.used = mark;
      throw e;
    }
    this.n++;
    return this;
  }
}

function readSges(view: DataView, off: number, n: number): DecodedSendWr['sgList'] {
  const out: DecodedSendWr['sgList'] = [];
  for (let i = 0; i < n; i++) {
    const o = off + i * SGE_BYTES;
    out.push({ addr: view.getBigUint64(o, true), length: view.getUint32(o + 8, true), lkey: view.getUint32(o + 12, true) });
  }
  return out;
}

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The header fields of the send WR at `off`. */
function sendHeader(v: DataView, off: number): Omit<DecodedSendWr, 'sgList' | 'inline'> {
  return {
    wrId: v.getBigUint64(off, true),
    opcode: v.getUint32(off + 8, true),
    sendFlags: v.getUint32(off + 12, true),
    immData: v.getUint32(off + 20, true),
    remoteAddr: v.getBigUint64(off + 24, true),
    rkey: v.getUint32(off + 32, true),
    ahId: v.getUint32(off + 36, true),
    compareAdd: v.getBigUint64(off + 40, true),
    swap: v.getBigUint64(off + 48, true),
    remoteQpn: v.getUint32(off + 56, true),
    remoteQkey: v.getUint32(off + 60, true),
  };
}

/** An inline send WR at `off` with the checks native code makes; returns it and the offset after it. */
function decodeInlineSendWr(v: DataView, bytes: Uint8Array, off: number, i: number, numSge: number): [DecodedSendWr, number] {
  const rec = off + SEND_WR_HEADER_BYTES;
  if (numSge !== 1) throw new WrLayoutError(`inline work request ${i} has num_sge ${numSge}, not 1`);
  if (rec + SGE_BYTES > bytes.length) throw new WrLayoutError(`inline work request ${i} runs past the end`);
  if (v.getBigUint64(rec, true) !== 0n || v.getUint32(rec + 12, true) !== 0)
    throw new WrLayoutError(`inline work request ${i} names memory (its addr and lkey must be 0)`);
  const length = v.getUint32(rec + 8, true);
  if (length > MAX_INLINE_PER_WR) throw new WrLayoutError(`inline work request ${i} has ${length} bytes`);
  const data = rec + SGE_BYTES;
  if (data + length > bytes.length) throw new WrLayoutError(`inline work request ${i} has bytes past the end`);
  return [{ ...sendHeader(v, off), sgList: [], inline: bytes.slice(data, data + length) }, data + length];
}

/** Reads a send list back (the test double's and the layout tests' view of what native code parses). */
export function decodeSendWrs(bytes: Uint8Array, count: number): DecodedSendWr[] {
  const v = viewOf(bytes);
  const out: DecodedSendWr[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + SEND_WR_HEADER_BYTES > bytes.length) throw new WrLayoutError(`work request ${i} runs past the end`);
    const numSge = v.getUint32(off + 16, true);
    const sendFlags = v.getUint32(off + 12, true);
    if ((sendFlags & SendFlags.INLINE) !== 0) {
      const [wr, next] = decodeInlineSendWr(v, bytes, off, i, numSge);
      out.push(wr);
      off = next;
      continue;
    }
    if (numSge > MAX_SGE_PER_WR) throw new WrLayoutError(`work request ${i} has ${numSge} SGEs`);
    if (off + SEND_WR_HEADER_BYTES + numSge * SGE_BYTES > bytes.length)
      throw new WrLayoutError(`the SGEs of work request ${i} run past the end`);
    out.push({ ...sendHeader(v, off), sgList: readSges(v, off + SEND_WR_HEADER_BYTES, numSge) });
    off += SEND_WR_HEADER_BYTES + numSge * SGE_BYTES;
  }
  return out;
}

export function decodeRecvWrs(bytes: Uint8Array, count: number): DecodedRecvWr[] {
  const v = viewOf(bytes);
  const out: DecodedRecvWr[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + RECV_WR_HEADER_BYTES > bytes.length) throw new WrLayoutError(`work request ${i} runs past the end`);
    const numSge = v.getUint32(off + 8, true);
    if (numSge > MAX_SGE_PER_WR) throw new WrLayoutError(`work request ${i} has ${numSge} SGEs`);
    if (off + RECV_WR_HEADER_BYTES + numSge * SGE_BYTES > bytes.length)
      throw new WrLayoutError(`the SGEs of work request ${i} run past the end`);
    out.push({ wrId: v.getBigUint64(off, true), sgList: readSges(v, off + RECV_WR_HEADER_BYTES, numSge) });
    off += RECV_WR_HEADER_BYTES + numSge * SGE_BYTES;
  }
  return out;
}

/** One work completion as an object. */
export interface WorkCompletion {
  wrId: bigint;
  status: number;
  opcode: number;
  vendorErr: number;
  byteLen: number;
  /** Host order; meaningful when wcFlags has WITH_IMM. */
  immData: number;
  qpNum: number;
  srcQp: number;
  wcFlags: number;
  pkeyIndex: number;
  slid: number;
  sl: number;
  dlidPathBits: number;
}

/**
 * Completions in the native layout: pollCq writes up to `capacity` of them and sets `count`. The accessors
 * read one field of completion i without allocating (the data path); get(i) builds an object.
 */
export class WcBuffer {
  readonly bytes: Uint8Array;
  readonly capacity: number;
  count = 0;
  private readonly view: DataView;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > MAX_WC_PER_POLL)
      throw new WrLayoutError(`completion buffer capacity ${capacity} is not in 1..${MAX_WC_PER_POLL}`);
    this.capacity = capacity;
    this.bytes = new Uint8Array(capacity * WC_BYTES);
    this.view = new DataView(this.bytes.buffer);
  }

  private at(i: number): number {
    if (!(i >= 0 && i < this.count)) throw new RangeError(`completion ${i} is not in 0..${this.count - 1}`);
    return i * WC_BYTES;
  }

  /** wr_id as a number: exact below 2^53 (use wrIdBig for the full u64). */
  wrId(i: number): number {
    const o = this.at(i);
    return this.view.getUint32(o + 4, true) * TWO_POW_32 + this.view.getUint32(o, true);
  }
  wrIdBig(i: number): bigint {
    return this.view.getBigUint64(this.at(i), true);
  }
  status(i: number): number {
    return this.view.getUint32(this.at(i) + 8, true);
  }
  opcode(i: number): number {
    return this.view.getUint32(this.at(i) + 12, true);
  }
  vendorErr(i: number): number {
    return this.view.getUint32(this.at(i) + 16, true);
  }
  byteLen(i: number): number {
    return this.view.getUint32(this.at(i) + 20, true);
  }
  immData(i: number): number {
    return this.view.getUint32(this.at(i) + 24, true);
  }
  qpNum(i: number): number {
    return this.view.getUint32(this.at(i) + 28, true);
  }
  srcQp(i: number): number {
    return this.view.getUint32(this.at(i) + 32, true);
  }
  wcFlags(i: number): number {
    return this.view.getUint32(this.at(i) + 36, true);
  }

  get(i: number): WorkCompletion {
    const o = this.at(i);
    const v = this.view;
    return {
      wrId: v.getBigUint64(o, true),
      status: v.getUint32(o + 8, true),
      opcode: v.getUint32(o + 12, true),
      vendorErr: v.getUint32(o + 16, true),
      byteLen: v.getUint32(o + 20, true),
      immData: v.getUint32(o + 24, true),
      qpNum: v.getUint32(o + 28, true),
      srcQp: v.getUint32(o + 32, true),
      wcFlags: v.getUint32(o + 36, true),
      pkeyIndex: v.getUint16(o + 40, true),
      slid: v.getUint16(o + 42, true),
      sl: v.getUint8(o + 44),
      dlidPathBits: v.getUint8(o + 45),
    };
  }

  toArray(): WorkCompletion[] {
    const out: WorkCompletion[] = [];
    for (let i = 0; i < this.count; i++) out.push(this.get(i));
    return out;
  }

  /** Writes completion i (the test double's poll). Does not change `count`. */
  write(i: number, wc: WorkCompletion): void {
    if (!(i >= 0 && i < this.capacity)) throw new RangeError(`completion slot ${i} is not in 0..${this.capacity - 1}`);
    const o = i * WC_BYTES;
    const v = this.view;
    v.setBigUint64(o, wc.wrId, true);
    v.setUint32(o + 8, wc.status, true);
    v.setUint32(o + 12, wc.opcode, true);
    v.setUint32(o + 16, wc.vendorErr, true);
    v.setUint32(o + 20, wc.byteLen, true);
    v.setUint32(o + 24, wc.immData, true);
    v.setUint32(o + 28, wc.qpNum, true);
    v.setUint32(o + 32, wc.srcQp, true);
    v.setUint32(o + 36, wc.wcFlags, true);
    v.setUint16(o + 40, wc.pkeyIndex, true);
    v.setUint16(o + 42, wc.slid, true);
    v.setUint8(o + 44, wc.sl);
    v.setUint8(o + 45, wc.dlidPathBits);
    v.setUint16(o + 46, 0, true);
  }
}
