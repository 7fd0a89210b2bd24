// The RXE host queue format (spec section 13.4): the bytes a guest writes into a mapped soft-RoCE SQ or RQ slot and
// reads from a mapped CQ slot. The layouts are Linux 6.1's include/uapi/rdma/rdma_user_rxe.h (struct rxe_send_wqe,
// struct rxe_recv_wqe, struct rxe_queue_buf) and include/uapi/rdma/ib_user_verbs.h (struct ib_uverbs_wc, the opcode
// and flag enums); the fields filled per work request are those rdma-core's rxe provider fills (providers/rxe/rxe.c,
// convert_send_wr / init_send_wqe / post_one_recv), so the host kernel sees what a host process would write.
// test/driver/mapped-rxe-abi.test.ts checks every offset against the installed uapi header with a C compiler.

import { MappingLimits, SendOpcode, WcFlag, WcOpcode, WcStatus } from '../../../vmm-device/abi/rdma/index.ts';
import { UsageError, wcStatusName } from '../errors.ts';
import type { RecvWr, SendWr, WorkCompletion } from '../work-request.ts';

/** struct rxe_queue_buf: the 384-byte header of every rxe queue. */
export const RxeHeader = {
  LOG2_ELEM_SIZE: 0,
  INDEX_MASK: 4,
  PRODUCER_INDEX: 128,
  CONSUMER_INDEX: 256,
  SIZE: MappingLimits.RXE_QUEUE_HEADER_SIZE,
} as const;

/** struct rxe_send_wqe (its struct rxe_send_wr `wr` first, struct rxe_dma_info `dma` last). */
export const RxeSendWqe = {
  WR_ID: 0,
  OPCODE: 12,
  SEND_FLAGS: 16,
  /** ex.imm_data, big-endian (__be32). */
  IMM_DATA: 20,
  /** wr.rdma.remote_addr and wr.atomic.remote_addr. */
  REMOTE_ADDR: 24,
  RDMA_RKEY: 32,
  ATOMIC_COMPARE_ADD: 32,
  ATOMIC_SWAP: 40,
  ATOMIC_RKEY: 48,
  STATUS: 144,
  STATE: 148,
  IOVA: 152,
  SSN: 176,
  DMA_LENGTH: 184,
  DMA_RESID: 188,
  DMA_CUR_SGE: 192,
  DMA_NUM_SGE: 196,
  DMA_SGE_OFFSET: 200,
  /** dma.sge[] or dma.inline_data[]. */
  DMA_DATA: 208,
  SIZE: MappingLimits.RXE_SEND_WQE_BASE,
} as const;

/** struct rxe_recv_wqe. */
export const RxeRecvWqe = {
  WR_ID: 0,
  DMA_LENGTH: 16,
  DMA_RESID: 20,
  DMA_CUR_SGE: 24,
  DMA_NUM_SGE: 28,
  DMA_SGE_OFFSET: 32,
  DMA_SGE: 40,
  SIZE: MappingLimits.RXE_RECV_WQE_BASE,
} as const;

/** struct rxe_sge (the same bytes as struct ibv_sge). */
export const RXE_SGE_SIZE = 16;

/** struct ib_uverbs_wc, at the start of each 128-byte CQ slot. */
export const UverbsWc = {
  WR_ID: 0,
  STATUS: 8,
  OPCODE: 12,
  VENDOR_ERR: 16,
  BYTE_LEN: 20,
  /** ex.imm_data, big-endian (__be32). */
  IMM_DATA: 24,
  QP_NUM: 28,
  SRC_QP: 32,
  WC_FLAGS: 36,
  SIZE: 48,
} as const;

/** enum ib_uverbs_wr_opcode: the numbers a rxe send WQE carries (they differ from the spec's SendOpcode for atomics). */
export const IbWrOpcode = {
  RDMA_WRITE: 0,
  RDMA_WRITE_WITH_IMM: 1,
  SEND: 2,
  SEND_WITH_IMM: 3,
  RDMA_READ: 4,
  ATOMIC_CMP_AND_SWP: 5,
  ATOMIC_FETCH_AND_ADD: 6,
} as const satisfies Record<keyof typeof SendOpcode, number>;

/** enum ib_uverbs_send_flags. */
export const IbSendFlag = {
  FENCE: 1 << 0,
  SIGNALED: 1 << 1,
  SOLICITED: 1 << 2,
  INLINE: 1 << 3,
} as const;

/** The kernel's enum ib_wc_flags bits that rxe sets in a user CQ's ib_uverbs_wc. */
export const IbWcFlag = {
  GRH: 1 << 0,
  WITH_IMM: 1 << 1,
} as const;

/** Bytes of an atomic operand (an SGE of an atomic WR names exactly this much). */
const ATOMIC_OPERAND_BYTES = 8;

/** What a send WQE may carry in one slot of `slotSize` bytes under the QP's caps. */
export interface SendSlotLimits {
  slotSize: number;
  maxSge: number;
  maxInline: number;
}

function isRdma(op: SendWr['opcode']): boolean {
  return op === 'RDMA_WRITE' || op === 'RDMA_WRITE_WITH_IMM' || op === 'RDMA_READ';
}
function isAtomic(op: SendWr['opcode']): boolean {
  return op === 'ATOMIC_CMP_AND_SWP' || op === 'ATOMIC_FETCH_AND_ADD';
}
function hasImm(op: SendWr['opcode']): boolean {
  return op === 'SEND_WITH_IMM' || op === 'RDMA_WRITE_WITH_IMM';
}

/**
 * Encodes one rxe send WQE: the bytes from the start of the slot to the end of its SGEs or inline data (the rest
 * of the slot is not read by the host for this WQE). `ssn` is the send sequence number the provider counts per QP.
 */
export function encodeRxeSendWqe(wr: SendWr, ssn: number, limits: SendSlotLimits): Uint8Array {
  if (!(wr.opcode in IbWrOpcode)) throw new UsageError(`opcode ${String(wr.opcode)} has no rxe encoding`);
  if (wr.ah !== undefined || wr.remoteQpn !== undefined) throw new UsageError('a mapped QP is RC: its WQEs name no destination (section 13.8)');
  const sges = wr.sgList ?? [];
  const room = limits.slotSize - RxeSendWqe.DMA_DATA;
  let flags = (wr.signaled ? IbSendFlag.SIGNALED : 0) | (wr.solicited ? IbSendFlag.SOLICITED : 0) | (wr.fence ? IbSendFlag.FENCE : 0);
  let length = 0;
  let dataBytes: number;
  if (wr.inline !== undefined) {
    if (sges.length > 0) throw new UsageError('a WQE carries inline data or SGEs, not both');
    if (wr.opcode === 'RDMA_READ' || isAtomic(wr.opcode)) throw new UsageError(`${wr.opcode} cannot carry inline data`);
    const max = Math.min(room, limits.maxInline);
    if (wr.inline.byteLength > max) throw new UsageError(`inline data of ${wr.inline.byteLength} bytes (at most ${max} in this QP)`);
    flags |= IbSendFlag.INLINE;
    length = wr.inline.byteLength;
    dataBytes = length;
  } else {
    const max = Math.min(Math.floor(room / RXE_SGE_SIZE), limits.maxSge);
    if (sges.length > max) throw new UsageError(`${sges.length} SGEs (a send WQE of this QP holds ${max})`);
    for (const s of sges) length += s.length;
    if (isAtomic(wr.opcode) && (sges.length !== 1 || length !== ATOMIC_OPERAND_BYTES)) {
      throw new UsageError(`${wr.opcode} takes one SGE of ${ATOMIC_OPERAND_BYTES} bytes`);
    }
    dataBytes = sges.length * RXE_SGE_SIZE;
  }
  if (length > 0xffff_ffff) throw new UsageError(`WQE length ${length}`);
  const out = new Uint8Array(RxeSendWqe.DMA_DATA + dataBytes);
  const v = new DataView(out.buffer);
  v.setBigUint64(RxeSendWqe.WR_ID, wr.wrId, true);
  v.setUint32(RxeSendWqe.OPCODE, IbWrOpcode[wr.opcode], true);
  v.setUint32(RxeSendWqe.SEND_FLAGS, flags, true);
  // The provider copies imm_data for every opcode; the host reads it only for the _WITH_IMM ones.
  if (hasImm(wr.opcode)) v.setUint32(RxeSendWqe.IMM_DATA, (wr.imm ?? 0) >>> 0, false);
  let iova = 0n;
  if (isRdma(wr.opcode)) {
    iova = wr.remoteAddr ?? 0n;
    v.setBigUint64(RxeSendWqe.REMOTE_ADDR, iova, true);
    v.setUint32(RxeSendWqe.RDMA_RKEY, (wr.rkey ?? 0) >>> 0, true);
  } else if (isAtomic(wr.opcode)) {
    iova = wr.remoteAddr ?? 0n;
    v.setBigUint64(RxeSendWqe.REMOTE_ADDR, iova, true);
    v.setBigUint64(RxeSendWqe.ATOMIC_COMPARE_ADD, wr.compareAdd ?? 0n, true);
    v.setBigUint64(RxeSendWqe.ATOMIC_SWAP, wr.swap ?? 0n, true);
    v.setUint32(RxeSendWqe.ATOMIC_RKEY, (wr.rkey ?? 0) >>> 0, true);
  }
  v.setBigUint64(RxeSendWqe.IOVA, iova, true);
  v.setUint32(RxeSendWqe.SSN, ssn >>> 0, true);
  v.setUint32(RxeSendWqe.DMA_LENGTH, length, true);
  v.setUint32(RxeSendWqe.DMA_RESID, length, true);
  // The provider records the caller's num_sge even for inline data (it copied from those SGEs); 0 here, none given.
  v.setUint32(RxeSendWqe.DMA_NUM_SGE, wr.inline !== undefined ? 0 : sges.length, true);
  if (wr.inline !== undefined) out.set(wr.inline, RxeSendWqe.DMA_DATA);
  else sges.forEach((s, i) => writeSge(v, RxeSendWqe.DMA_DATA + i * RXE_SGE_SIZE, s));
  return out;
}

/** Encodes one rxe receive WQE (header and SGEs). */
export function encodeRxeRecvWqe(wr: RecvWr, limits: { slotSize: number; maxSge: number }): Uint8Array {
  const max = Math.min(Math.floor((limits.slotSize - RxeRecvWqe.DMA_SGE) / RXE_SGE_SIZE), limits.maxSge);
  if (wr.sgList.length > max) throw new UsageError(`${wr.sgList.length} SGEs (a receive WQE of this QP holds ${max})`);
  let length = 0;
  for (const s of wr.sgList) length += s.length;
  if (length > 0xffff_ffff) throw new UsageError(`WQE length ${length}`);
  const out = new Uint8Array(RxeRecvWqe.DMA_SGE + wr.sgList.length * RXE_SGE_SIZE);
  const v = new DataView(out.buffer);
  v.setBigUint64(RxeRecvWqe.WR_ID, wr.wrId, true);
  v.setUint32(RxeRecvWqe.DMA_LENGTH, length, true);
  v.setUint32(RxeRecvWqe.DMA_RESID, length, true);
  v.setUint32(RxeRecvWqe.DMA_NUM_SGE, wr.sgList.length, true);
  wr.sgList.forEach((s, i) => writeSge(v, RxeRecvWqe.DMA_SGE + i * RXE_SGE_SIZE, s));
  return out;
}

function writeSge(v: DataView, at: number, s: { addr: bigint; length: number; lkey: number }): void {
  v.setBigUint64(at, s.addr, true);
  v.setUint32(at + 8, s.length >>> 0, true);
  v.setUint32(at + 12, s.lkey >>> 0, true);
}

/** The raw fields of one struct ib_uverbs_wc, in the host's numbering. */
export interface UverbsWcValue {
  wrId: bigint;
  status: number;
  opcode: number;
  vendorErr: number;
  byteLen: number;
  immData: number;
  qpNum: number;
  srcQp: number;
  wcFlags: number;
}

export function decodeUverbsWc(bytes: Uint8Array, offset = 0): UverbsWcValue {
  const v = new DataView(bytes.buffer, bytes.byteOffset + offset, UverbsWc.SIZE);
  return {
    wrId: v.getBigUint64(UverbsWc.WR_ID, true),
    status: v.getUint32(UverbsWc.STATUS, true),
    opcode: v.getUint32(UverbsWc.OPCODE, true),
    vendorErr: v.getUint32(UverbsWc.VENDOR_ERR, true),
    byteLen: v.getUint32(UverbsWc.BYTE_LEN, true),
    immData: v.getUint32(UverbsWc.IMM_DATA, false),
    qpNum: v.getUint32(UverbsWc.QP_NUM, true),
    srcQp: v.getUint32(UverbsWc.SRC_QP, true),
    wcFlags: v.getUint32(UverbsWc.WC_FLAGS, true),
  };
}

const SPEC_STATUSES = new Set<number>(Object.values(WcStatus));
const SPEC_OPCODES = new Set<number>(Object.values(WcOpcode));

/**
 * The spec's completion for a host one. The kernel's enum ib_wc_status and enum ib_wc_opcode share the spec's
 * numbers for every value the spec defines; a host status the spec lacks (LOC_EEC_OP_ERR, MW_BIND_ERR, ...) becomes
 * GENERAL_ERR with the host's status kept in vendorErr's place when the host gave none, and an error completion's
 * other fields read zero, as the relay writes them (section 10.4). `qpHandle` is the handle of the QP whose wire
 * QPN the host reported (0 when the guest has no such mapped QP on this CQ).
 */
export function toWorkCompletion(wc: UverbsWcValue, qpHandle: number): WorkCompletion {
  const known = SPEC_STATUSES.has(wc.status);
  const status = known ? wc.status : WcStatus.GENERAL_ERR;
  const ok = status === WcStatus.SUCCESS;
  const opcode = ok && SPEC_OPCODES.has(wc.opcode) ? wc.opcode : 0;
  let flags = 0;
  if (ok && (wc.wcFlags & IbWcFlag.GRH) !== 0) flags |= WcFlag.GRH;
  if (ok && (wc.wcFlags & IbWcFlag.WITH_IMM) !== 0) flags |= WcFlag.WITH_IMM;
  return {
    wrId: wc.wrId,
    qpHandle,
    status,
    statusName: wcStatusName(status),
    opcode,
    opcodeName: ok ? (Object.entries(WcOpcode).find(([, n]) => n === opcode)?.[0] ?? `unknown(${wc.opcode})`) : 'SEND',
    byteLen: ok ? wc.byteLen : 0,
    immData: ok && (flags & WcFlag.WITH_IMM) !== 0 ? wc.immData : 0,
    srcQp: ok ? wc.srcQp : 0,
    wcFlags: flags,
    vendorErr: known || wc.vendorErr !== 0 ? wc.vendorErr : wc.status,
  };
}
