// Test-guest helpers for INLINE (feature bit 4): the feature set with INLINE, CREATE_QP with a max_inline_data
// (TestGuest.createQp asks for none), and an inline send WQE written into the SQ ring (spec 10.3).

import {
  Command,
  CreateQpRequest,
  CreateQpResponse,
  FeatureBit,
  Limits,
  SendFlag,
  ringPages,
} from '../../vmm-device/abi/rdma/index.ts';
import { ALL_FEATURES, GuestQp, pageList, type GuestCq, type TestGuest } from './guest.ts';

export const INLINE_FEATURES = ALL_FEATURES | (1n << BigInt(FeatureBit.INLINE));

/** CREATE_QP as TestGuest.createQp does, with `maxInlineData`; returns the QP and the response's max_inline_data. */
export async function createInlineQp(
  g: TestGuest,
  pd: number,
  cq: GuestCq,
  maxInlineData: number,
  o: { qpType?: number; depth?: number } = {},
): Promise<{ qp: GuestQp; maxInlineData: number }> {
  const depth = o.depth ?? 16;
  const sqPages = ringPages(depth, Limits.SQ_WQE_SIZE, 12);
  const rqPages = ringPages(depth, Limits.RQ_WQE_SIZE, 12);
  const sq = g.allocPages(sqPages);
  const rq = g.allocPages(rqPages);
  const idx = g.allocPages(1);
  const body = CreateQpRequest.encode({
    pd_handle: pd,
    send_cq_handle: cq.handle,
    recv_cq_handle: cq.handle,
    qp_type: o.qpType ?? 2,
    sq_sig_all: 0,
    sq_page_shift: 12,
    rq_page_shift: 12,
    max_send_wr: depth,
    max_recv_wr: depth,
    max_send_sge: 1,
    max_recv_sge: 1,
    max_inline_data: maxInlineData,
    sq_num_pages: sqPages,
    rq_num_pages: rqPages,
    sq_index_gpa: BigInt(idx),
    rq_index_gpa: BigInt(idx + 64),
  });
  const r = CreateQpResponse.decode(await g.ok(Command.CREATE_QP, body, [...pageList(sq, sqPages), ...pageList(rq, rqPages)]));
  return { qp: new GuestQp(g, r.qp_handle, r.qp_num, depth, sq, rq, idx, idx + 64), maxInlineData: r.max_inline_data };
}

/** Writes an inline send WQE: payload = `data` (zero-padded to 64 bytes), inline_length = data.length unless given. */
export function writeInline(
  qp: GuestQp,
  w: {
    wrId: bigint;
    opcode: number;
    data: Uint8Array;
    inlineLength?: number;
    remoteAddr?: bigint;
    rkey?: number;
    imm?: number;
    numSge?: number;
    /** UD: the AH handle and the destination QPN. */
    ah?: number;
    remoteQpn?: number;
  },
): void {
  const payload = new Uint8Array(Limits.SQ_WQE_MAX_INLINE);
  payload.set(w.data.subarray(0, Limits.SQ_WQE_MAX_INLINE));
  qp.writeSend({
    wr_id: w.wrId,
    opcode: w.opcode,
    flags: SendFlag.SIGNALED | SendFlag.INLINE,
    num_sge: w.numSge ?? 0,
    inline_length: w.inlineLength ?? w.data.length,
    remote_addr: w.remoteAddr ?? 0n,
    rkey: w.rkey ?? 0,
    imm_data: w.imm ?? 0,
    ah_handle: w.ah ?? 0,
    remote_qpn: w.remoteQpn ?? 0,
    remote_qkey: 0x1111,
    payload,
  });
}

/** The guest address of SQ slot `index` (the ring's entry for producer value `index`). */
export function sqSlot(qp: GuestQp, index: number): number {
  return qp.sq + (index % qp.depth) * Limits.SQ_WQE_SIZE;
}
