// Appendix A of the spec shows exact bytes; each block is rebuilt here from the values its prose gives, so an
// implementer who copies the appendix copies what the module produces.

import t from 'tap';
import * as L from '../../vmm-device/abi/rdma/index.ts';
import { readSpec } from './markdown-tables.ts';

const spec = readSpec();

function examples(markdown: string): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  for (const m of markdown.matchAll(/<!-- example: ([\w-]+) -->\n```text\n([\s\S]*?)\n```/g)) {
    const hex = m[2]!.trim().split(/\s+/);
    for (const h of hex) if (!/^[0-9a-f]{2}$/.test(h)) throw new Error(`example ${m[1]}: "${h}" is not a byte`);
    out.set(m[1]!, Uint8Array.from(hex.map((h) => parseInt(h, 16))));
  }
  return out;
}

const built: Record<string, () => Uint8Array> = {
  'create-pd-request': () => L.encodeRequest(L.Command.CREATE_PD, 1n, new Uint8Array(0)),
  'create-pd-response': () => L.encodeResponse(L.Status.OK, 0, 1n, L.HandleResponse.encode({ handle: 1 })),
  'reg-mr-request': () =>
    L.encodeRequest(
      L.Command.REG_MR,
      2n,
      L.RegMrRequest.encode({
        pd_handle: 1,
        access_flags: L.AccessFlag.LOCAL_WRITE | L.AccessFlag.REMOTE_WRITE | L.AccessFlag.REMOTE_READ,
        iova: 0x7f00_0000_1800n,
        length: 0x1000n,
        page_shift: 12,
        total_pages: Number(L.mrPageCount(0x7f00_0000_1800n, 0x1000n, 12)),
        num_pages: 2,
      }),
      [0x1234_5000n, 0x0abc_d000n],
    ),
  'modify-qp-refused-response': () =>
    L.encodeResponse(L.Status.DESTINATION_UNREACHABLE, L.ModifyQpRequest.offsetOf('attr') + L.QpAttr.offsetOf('dgid'), 3n),
  'send-wqe-rdma-write': () =>
    L.SendWqe.encode({
      wr_id: 0x1000n,
      opcode: L.SendOpcode.RDMA_WRITE,
      flags: L.SendFlag.SIGNALED,
      num_sge: 1,
      imm_data: 0,
      remote_addr: 0x7f00_0020_0000n,
      rkey: 0x1234,
      inline_length: 0,
      compare_add: 0n,
      swap: 0n,
      ah_handle: 0,
      remote_qpn: 0,
      remote_qkey: 0,
      payload: L.encodeSges([{ addr: 0x7f00_0000_1800n, length: 64, lkey: 0x5678 }], L.Limits.SQ_WQE_MAX_SGE),
    }),
  'cqe-rdma-write': () =>
    L.Cqe.encode({
      wr_id: 0x1000n,
      qp_handle: 1,
      byte_len: 0,
      imm_data: 0,
      src_qp: 0,
      status: L.WcStatus.SUCCESS,
      opcode: L.WcOpcode.RDMA_WRITE,
      wc_flags: 0,
      vendor_err: 0,
    }),
  'doorbell-sq': () => L.DoorbellRecord.encode({ handle: 1, type: L.DoorbellType.SQ }),
};

t.test('every example of appendix A equals what the module builds', async (t) => {
  const found = examples(spec);
  t.same([...found.keys()].sort(), Object.keys(built).sort(), 'the appendix has exactly the examples this test builds');
  for (const [name, build] of Object.entries(built)) {
    const bytes = found.get(name);
    if (bytes === undefined) continue;
    t.same([...bytes], [...build()], name);
  }
});

t.test('the REG_MR example passes the framing checks and announces its two pages', async (t) => {
  const req = examples(spec).get('reg-mr-request')!;
  const r = L.checkRequestFraming(req, 16 + L.RegMrResponse.size, 512);
  t.equal(r.kind, 'ok');
  if (r.kind === 'ok') t.same(L.decodePageList(r.body, L.RegMrRequest.size, r.pages), [0x1234_5000n, 0x0abc_d000n]);
});
