// Fuzz target: page lists (guest input, spec 8: CREATE_CQ, CREATE_QP, REG_MR, REG_MR_CONTINUE). The request's
// fixed part is built with the spec's encoders from input values (counts, shifts, index addresses), and each page
// address is chosen by the input among: a fresh zeroed guest page (valid), a page plus an offset (unaligned), the
// last bytes of a region (straddling its end), a hole between regions, a raw u64 (anything up to 2^64-1).
// Checked as in every RDMA target (rdma-rig.ts): answers well-formed, host objects released by reset, no access
// outside guest memory.
import {
  Command,
  CreateCqRequest,
  CreateQpRequest,
  Limits,
  RegMrContinueRequest,
  RegMrRequest,
  HandleResponse,
  Status,
} from '../../../vmm-device/abi/rdma/index.ts';
import { ByteReader, HEAP_CHECK_EVERY_SLOW, countInput } from './harness.ts';
import { PAGE, REGION_SIZE, Rig } from './rdma-rig.ts';

const NAME = 'pages';
export const MAX_OPS = 8;
/** Most page list entries one request carries (the device's own limits are checked against larger counts). */
export const MAX_ENTRIES = 16;

function pageAddress(rig: Rig, r: ByteReader): bigint {
  const sel = r.u8();
  const region = rig.g.mem.memory.regionList[sel & 1]!;
  switch ((sel >> 1) % 6) {
    case 0:
    case 1:
      return BigInt(rig.g.allocPages(1));
    case 2:
      return BigInt(rig.g.allocPages(1) + 1 + (r.u16() % (PAGE - 1)));
    case 3:
      return BigInt(region.guestPhysAddr + REGION_SIZE - (PAGE >> (r.u8() % 12)));
    case 4:
      return BigInt(region.guestPhysAddr + REGION_SIZE + PAGE * (r.u8() % 4));
    default:
      return r.u64();
  }
}

export async function fuzz(data: Buffer): Promise<void> {
  countInput(NAME, HEAP_CHECK_EVERY_SLOW);
  const rig = await Rig.open();
  try {
    const r = new ByteReader(data);
    const pdAnswer = await rig.cmd(Command.CREATE_PD, new Uint8Array(0), [], HandleResponse.size);
    const pd = pdAnswer?.status === Status.OK ? HandleResponse.decode(pdAnswer.body).handle : 0;
    let cq = 0;
    for (let i = 0; i < MAX_OPS && r.remaining > 0; i++) {
      const op = r.u8() % 4;
      const entries = r.u8() % (MAX_ENTRIES + 1);
      const claimed = (r.u8() & 0x80) !== 0 ? r.u32() : entries;
      const shift = 12 + (r.u8() % 10);
      const pages = Array.from({ length: entries }, () => pageAddress(rig, r));
      let a;
      if (op === 0) {
        const body = CreateCqRequest.encode({ cqe_count: r.u16(), page_shift: shift, num_pages: claimed, index_gpa: pageAddress(rig, r) });
        a = await rig.cmd(Command.CREATE_CQ, body, pages);
        if (a?.status === Status.OK && cq === 0) cq = new DataView(a.body.buffer, a.body.byteOffset).getUint32(0, true);
      } else if (op === 1) {
        const split = claimed === entries ? r.u8() % (entries + 1) : r.u32();
        const body = CreateQpRequest.encode({
          pd_handle: pd,
          send_cq_handle: cq,
          recv_cq_handle: cq,
          qp_type: (r.u8() & 1) === 0 ? 2 : 4,
          sq_sig_all: 0,
          sq_page_shift: shift,
          rq_page_shift: 12 + (r.u8() % 10),
          max_send_wr: r.u16(),
          max_recv_wr: r.u16(),
          max_send_sge: r.u8() % (Limits.SQ_WQE_MAX_SGE + 2),
          max_recv_sge: r.u8() % (Limits.RQ_WQE_MAX_SGE + 2),
          max_inline_data: 0,
          sq_num_pages: split,
          rq_num_pages: claimed === entries ? entries - Math.min(entries, split) : r.u32(),
          sq_index_gpa: pageAddress(rig, r),
          rq_index_gpa: pageAddress(rig, r),
        });
        a = await rig.cmd(Command.CREATE_QP, body, pages);
      } else if (op === 2) {
        const length = (r.u8() & 0x80) !== 0 ? r.u64() : BigInt(entries) << BigInt(shift);
        const body = RegMrRequest.encode({
          pd_handle: pd,
          access_flags: r.u8(),
          iova: r.u64(),
          length,
          page_shift: shift,
          total_pages: (r.u8() & 0x80) !== 0 ? r.u32() : (claimed + (r.u8() % 3)) >>> 0,
          num_pages: claimed,
        });
        a = await rig.cmd(Command.REG_MR, body, pages);
      } else {
        const body = RegMrContinueRequest.encode({ mr_handle: r.u8() % 4, start_index: r.u32(), num_pages: claimed });
        a = await rig.cmd(Command.REG_MR_CONTINUE, body, pages);
      }
      if (a === undefined) break;
    }
    rig.assertNoReset(NAME, 'every request here is framed (spec 7.5: bad page addresses are answered with a status)');
  } finally {
    await rig.finish(NAME);
  }
}
