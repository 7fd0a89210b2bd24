// INLINE (feature bit 4) over FakeVerbs: the configuration and the feature follow the host's inline capacity; the
// relay posts inline SEND, SEND_WITH_IMM, RDMA_WRITE and RDMA_WRITE_WITH_IMM to the host with exactly the guest's
// bytes (watched at the host's post through FakeVerbs.onPostSend, as native code would parse the list); inline data
// too long for the QP, on RDMA_READ or an atomic, or without the feature negotiated completes with LOC_QP_OP_ERR and
// reaches no host; and a guest that rewrites the WQE after the doorbell cannot change what is posted (the device
// reads it once). Delivery between two QPs on real verbs: test/rxe/device-inline.test.ts.

import t from 'tap';
import type { Test } from 'tap';
import {
  Command,
  CreateAhRequest,
  CreateQpRequest,
  DoorbellType,
  FeatureBit,
  HandleResponse,
  Limits,
  QpAttrMask,
  QpState,
  QpType,
  SendOpcode,
  SendWqe,
  Status,
  WcOpcode,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { SendFlags, WrOpcode } from '../../vmm-device/verbs/constants.ts';
import type { DecodedSendWr } from '../../vmm-device/verbs/layout.ts';
import { gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { ALL_FEATURES, TestGuest, connectRc, type GuestCq, type GuestQp } from './guest.ts';
import { INLINE_FEATURES, createInlineQp, sqSlot, writeInline } from './inline-guest.ts';

const S = QpAttrMask;
const INLINE_BIT = 1n << BigInt(FeatureBit.INLINE);

function pattern(n: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed * 13 + 1) & 0xff);
}


interface Setup {
  g: TestGuest;
  verbs: FakeVerbs;
  cq: GuestCq;
  qp: GuestQp;
  /** Every work request the host took, in order. */
  posted: DecodedSendWr[];
}

async function setup(t: Test, o: { host?: number; qpInline?: number; features?: bigint } = {}): Promise<Setup> {
  const verbs = new FakeVerbs({ maxInlineData: o.host ?? 64 });
  const posted: DecodedSendWr[] = [];
  verbs.onPostSend = (_qp, wrs) => posted.push(...wrs);
  const g = await TestGuest.open({ verbs, features: o.features ?? INLINE_FEATURES });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const cq = await g.createCq(16);
  const { qp } = await createInlineQp(g, pd, cq, o.qpInline ?? 64);
  await connectRc(g, qp);
  return { g, verbs, cq, qp, posted };
}

t.test('the configuration offers the host inline capacity up to 64 bytes, and INLINE exactly when it is above 0', async (t) => {
  for (const [host, want] of [
    [undefined, 0],
    [8, 8],
    [32, 32],
    [64, 64],
    [400, 64],
  ] as const) {
    const verbs = new FakeVerbs(host === undefined ? {} : { maxInlineData: host });
    const g = await TestGuest.open({ verbs, features: INLINE_FEATURES });
    t.equal(g.device.config.max_inline_data, want, `host ${host ?? 'without inline'}: max_inline_data ${want}`);
    t.equal((g.device.deviceFeatures & INLINE_BIT) !== 0n, want > 0, `host ${host ?? 'without inline'}: INLINE ${want > 0 ? '' : 'not '}offered`);
    await g.device.close();
  }
});

t.test('CREATE_QP: max_inline_data up to the configuration reaches the host QP; above it INVALID_ARGUMENT', async (t) => {
  const verbs = new FakeVerbs({ maxInlineData: 64 });
  const g = await TestGuest.open({ verbs, features: INLINE_FEATURES });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const cq = await g.createCq(16);
  const { qp, maxInlineData } = await createInlineQp(g, pd, cq, 64);
  t.equal(maxInlineData, 64, 'in effect: the request');
  t.equal(g.device.qps.get(qp.handle)!.host.cap.maxInlineData, 64, 'the host QP was created with it');
  const idx = g.allocPages(1);
  const body = CreateQpRequest.encode({
    pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle, qp_type: 2, sq_sig_all: 0, sq_page_shift: 12, rq_page_shift: 12,
    max_send_wr: 1, max_recv_wr: 1, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 65, sq_num_pages: 1, rq_num_pages: 1,
    sq_index_gpa: BigInt(idx), rq_index_gpa: BigInt(idx + 64),
  });
  const a = await g.cmd(Command.CREATE_QP, body, [BigInt(g.allocPages(1)), BigInt(g.allocPages(1))]);
  t.same([a.status, a.detail], [Status.INVALID_ARGUMENT, CreateQpRequest.offsetOf('max_inline_data')], '65 bytes: INVALID_ARGUMENT at max_inline_data');
});

t.test('inline SEND, SEND_WITH_IMM, RDMA_WRITE and RDMA_WRITE_WITH_IMM reach the host byte for byte', async (t) => {
  const { g, cq, qp, posted } = await setup(t);
  const data = [pattern(64, 1), pattern(1, 2), pattern(17, 3), new Uint8Array(0)];
  writeInline(qp, { wrId: 1n, opcode: SendOpcode.SEND, data: data[0]!, numSge: 200 }); // num_sge is ignored with INLINE
  writeInline(qp, { wrId: 2n, opcode: SendOpcode.SEND_WITH_IMM, data: data[1]!, imm: 0x1234_5678 });
  writeInline(qp, { wrId: 3n, opcode: SendOpcode.RDMA_WRITE, data: data[2]!, remoteAddr: 0x7f00_0000_1000n, rkey: 0x55 });
  writeInline(qp, { wrId: 4n, opcode: SendOpcode.RDMA_WRITE_WITH_IMM, data: data[3]!, remoteAddr: 0x7f00_0000_2000n, rkey: 0x66, imm: 9 });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const cqes = await cq.waitFor(4);
  t.same(cqes.map((c) => [c.wr_id, c.status, c.opcode]), [
    [1n, WcStatus.SUCCESS, WcOpcode.SEND],
    [2n, WcStatus.SUCCESS, WcOpcode.SEND],
    [3n, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
    [4n, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
  ]);
  t.equal(posted.length, 4, 'four work requests posted');
  t.same(posted.map((w) => w.opcode), [WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM]);
  for (const [i, w] of posted.entries()) {
    t.ok((w.sendFlags & SendFlags.INLINE) !== 0, `wr ${i}: posted with IBV_SEND_INLINE`);
    t.same(w.sgList, [], `wr ${i}: no SGE, no MR`);
    t.same(Buffer.from(w.inline!), Buffer.from(data[i]!), `wr ${i}: ${data[i]!.length} inline bytes, every byte`);
  }
  t.equal(posted[1]!.immData, 0x1234_5678, 'immediate data');
  t.same([posted[2]!.remoteAddr, posted[2]!.rkey], [0x7f00_0000_1000n, 0x55], 'WRITE target');
  t.same([posted[3]!.remoteAddr, posted[3]!.rkey, posted[3]!.immData], [0x7f00_0000_2000n, 0x66, 9], 'WRITE_WITH_IMM target and immediate');
});

t.test('refused with LOC_QP_OP_ERR, never posted: too long for the QP, RDMA_READ, atomics, INLINE not negotiated', async (t) => {
  const cases: [string, { qpInline?: number; features?: bigint }, Parameters<typeof writeInline>[1]][] = [
    ['33 bytes on a QP of 32', { qpInline: 32 }, { wrId: 1n, opcode: SendOpcode.SEND, data: pattern(33, 1) }],
    ['inline_length 65 on a QP of 64', { qpInline: 64 }, { wrId: 1n, opcode: SendOpcode.SEND, data: pattern(64, 1), inlineLength: 65 }],
    ['inline_length 2^32-1', { qpInline: 64 }, { wrId: 1n, opcode: SendOpcode.RDMA_WRITE, data: pattern(64, 1), inlineLength: 0xffff_ffff }],
    ['inline RDMA_READ', {}, { wrId: 1n, opcode: SendOpcode.RDMA_READ, data: pattern(8, 1), remoteAddr: 0x1000n, rkey: 1 }],
    ['inline ATOMIC_FETCH_AND_ADD', {}, { wrId: 1n, opcode: SendOpcode.ATOMIC_FETCH_AND_ADD, data: pattern(8, 1), remoteAddr: 0x1000n, rkey: 1 }],
    ['inline ATOMIC_CMP_AND_SWP', {}, { wrId: 1n, opcode: SendOpcode.ATOMIC_CMP_AND_SWP, data: pattern(8, 1), remoteAddr: 0x1000n, rkey: 1 }],
    ['INLINE not negotiated', { features: ALL_FEATURES }, { wrId: 1n, opcode: SendOpcode.SEND, data: pattern(8, 1) }],
  ];
  for (const [what, o, wqe] of cases) {
    await t.test(what, async (t) => {
      const { g, cq, qp, posted } = await setup(t, o);
      writeInline(qp, wqe);
      writeInline(qp, { wrId: 2n, opcode: SendOpcode.SEND, data: pattern(4, 2) });
      await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
      const cqes = await cq.waitFor(2);
      t.same(cqes.map((c) => [c.wr_id, c.status]), [
        [1n, WcStatus.LOC_QP_OP_ERR],
        [2n, WcStatus.WR_FLUSH_ERR],
      ], 'the bad WQE, then the next one flushed');
      t.same(posted, [], 'nothing reached the host');
      t.equal(g.device.qps.get(qp.handle)!.state, QpState.ERR, 'the QP is in ERR');
    });
  }
});

t.test('read once: a guest rewriting the WQE right after the device read it cannot change what is checked or posted', async (t) => {
  const { g, cq, qp, posted, verbs } = await setup(t, { qpInline: 16 });
  const original = pattern(16, 5);
  const slot = sqSlot(qp, 0);
  writeInline(qp, { wrId: 1n, opcode: SendOpcode.SEND, data: original });
  // A second vCPU rewrites the WQE the instant the device has read it: another opcode (READ, which may not carry
  // inline data), an inline_length above the QP's 16 and other bytes. A device that read any of it again (to check
  // or to post) would refuse the WQE or post other bytes.
  const memory = g.mem.memory;
  const read = memory.read.bind(memory);
  let rewrites = 0;
  memory.read = (gpa: number, dest: Uint8Array) => {
    read(gpa, dest);
    if (gpa === slot && dest.length === Limits.SQ_WQE_SIZE && rewrites === 0) {
      const w = SendWqe.decode(dest);
      memory.write(slot, SendWqe.encode({ ...w, opcode: SendOpcode.RDMA_READ, inline_length: 64, payload: new Uint8Array(64).fill(0xee) }));
      rewrites++;
    }
  };
  // And once more at the host's post, before the host would take the list.
  const post = verbs.postSend.bind(verbs);
  verbs.postSend = (h, wrs) => {
    memory.write(slot + 64, new Uint8Array(64).fill(0xdd));
    rewrites++;
    post(h, wrs);
  };
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [c] = await cq.waitFor(1);
  t.same([c!.wr_id, c!.status, c!.opcode], [1n, WcStatus.SUCCESS, WcOpcode.SEND], 'checked as written: a valid inline SEND');
  t.equal(rewrites, 2, 'the guest rewrote the WQE after the read and during the post');
  t.equal(posted.length, 1);
  t.equal(posted[0]!.opcode, WrOpcode.SEND, 'the opcode the device checked');
  t.same(Buffer.from(posted[0]!.inline!), Buffer.from(original), 'the 16 bytes the device read, not the rewritten ones');
  // Ringing again without a new producer_index takes nothing: the rewritten WQE is never read.
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  await new Promise((r) => setTimeout(r, 20));
  t.equal(posted.length, 1, 'nothing posted again');
  t.same(cq.poll(), []);
});

t.test('an inline send of the whole 64 bytes leaves the MRs alone: no lkey is looked at', async (t) => {
  const { g, cq, qp, posted } = await setup(t);
  // No MR registered at all: an SGE-based send would be LOC_PROT_ERR.
  t.equal(g.device.mrs.size, 0, 'no MR');
  writeInline(qp, { wrId: 7n, opcode: SendOpcode.SEND, data: pattern(64, 9) });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [c] = await cq.waitFor(1);
  t.equal(c!.status, WcStatus.SUCCESS);
  t.equal(posted.length, 1);
});

t.test('UD: an inline SEND_WITH_IMM reaches the host with its AH and destination; above the QP max refused', async (t) => {
  const verbs = new FakeVerbs({ maxInlineData: 64 });
  const posted: DecodedSendWr[] = [];
  verbs.onPostSend = (_qp, wrs) => posted.push(...wrs);
  const g = await TestGuest.open({ verbs, features: INLINE_FEATURES });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const cq = await g.createCq(16);
  const { qp } = await createInlineQp(g, pd, cq, 24, { qpType: QpType.UD });
  t.equal(g.device.qps.get(qp.handle)!.host.cap.maxInlineData, 24, 'the host UD QP was created with 24');
  for (const [mask, attr] of [
    [S.STATE | S.PKEY_INDEX | S.PORT | S.QKEY, { qp_state: 1, port_num: 1, qkey: 0x1111 }],
    [S.STATE, { qp_state: 2 }],
    [S.STATE | S.SQ_PSN, { qp_state: 3 }],
  ] as const) {
    const a = await g.modifyQp(qp.handle, mask, attr);
    t.equal(a.status, Status.OK);
  }
  const ahBody = CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid: gidFromIpv4('192.168.7.2') });
  const ah = HandleResponse.decode(await g.ok(Command.CREATE_AH, ahBody)).handle;
  const data = pattern(24, 8);
  writeInline(qp, { wrId: 1n, opcode: SendOpcode.SEND_WITH_IMM, data, imm: 5, ah, remoteQpn: 0x77 });
  writeInline(qp, { wrId: 2n, opcode: SendOpcode.SEND, data: pattern(25, 9), ah, remoteQpn: 0x77 });
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const cqes = await cq.waitFor(2);
  t.same(cqes.map((c) => [c.wr_id, c.status]), [
    [1n, WcStatus.SUCCESS],
    [2n, WcStatus.LOC_QP_OP_ERR],
  ], '24 bytes sent, 25 refused');
  t.equal(posted.length, 1, 'only the first reached the host');
  const w = posted[0]!;
  t.same([w.opcode, w.ahId, w.remoteQpn, w.remoteQkey, w.immData], [WrOpcode.SEND_WITH_IMM, g.device.ahs.get(ah)!.host.id, 0x77, g.device.address.qkey, 5], 'UD fields: host AH, QPN, the VPC Q_Key');
  t.same(Buffer.from(w.inline!), Buffer.from(data), '24 inline bytes, every byte');
});
