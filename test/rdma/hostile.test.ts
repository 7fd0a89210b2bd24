// What a hostile guest tried (issue 12 items 2, 3, 5), over the verbs test double: a producer_index that changes
// between two reads, 20,000 made-up doorbell handles with the event queue starved, an oversized rq_num_pages.

import t from 'tap';
import type { Test } from 'tap';
import {
  AccessFlag,
  Command,
  CreateQpRequest,
  DoorbellErrorReason,
  DoorbellType,
  EventType,
  Limits,
  QpAttrMask,
  QpState,
  SendFlag,
  SendOpcode,
  Status,
} from '../../vmm-device/abi/rdma/index.ts';
import { EventType as ET } from '../../vmm-device/abi/rdma/index.ts';
import type { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { TestGuest, type GuestQp } from './guest.ts';

const S = QpAttrMask;

async function open(t: Test): Promise<{ g: TestGuest; verbs: FakeVerbs }> {
  const verbs = new FakeVerbs();
  const g = await TestGuest.open({ verbs });
  t.teardown(() => g.device.close());
  return { g, verbs };
}

async function toRts(g: TestGuest, qp: GuestQp): Promise<void> {
  for (const [mask, attr] of [
    [S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, { qp_state: 1, port_num: 1, qp_access_flags: 7 }],
    [
      S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER,
      { qp_state: 2, path_mtu: 1, dest_qp_num: 0x42, max_dest_rd_atomic: 1, min_rnr_timer: 1, hop_limit: 64, dgid: gidFromIpv4('192.168.7.2') },
    ],
    [S.STATE | S.SQ_PSN | S.TIMEOUT | S.RETRY_CNT | S.RNR_RETRY | S.MAX_QP_RD_ATOMIC, { qp_state: 3, timeout: 14, retry_cnt: 7, rnr_retry: 7, max_rd_atomic: 1 }],
  ] as const) {
    const a = await g.modifyQp(qp.handle, mask, attr);
    if (a.status !== Status.OK) throw new Error(`modify failed ${a.status} ${a.detail}`);
  }
}

/**
 * Plays a guest vCPU that rewrites an index block's producer_index between any two device reads: every read of
 * `gpa` by the device sees the next value of `values` (cycling). Returns the count of those reads.
 */
function toggle(memory: GuestMemory, gpa: number, values: number[]): { reads: number } {
  const seen = { reads: 0 };
  const read = memory.read.bind(memory);
  memory.read = (at: number, dest: Uint8Array): void => {
    read(at, dest);
    if (at === gpa && dest.length === 4) {
      new DataView(dest.buffer, dest.byteOffset, 4).setUint32(0, values[seen.reads % values.length]! >>> 0, true);
      seen.reads++;
    }
  };
  return seen;
}

t.test('a producer_index that toggles between reads: read once per record, the loop bounded, the backend answers', async (t) => {
  for (const state of ['RTS', 'ERR'] as const) {
    const { g } = await open(t);
    const pd = await g.createPd();
    const cq = await g.createCq(64);
    const qp = await g.createQp(pd, cq, cq, 2, 16);
    const mr = await g.regMr(pd, 4096, AccessFlag.LOCAL_WRITE);
    await toRts(g, qp);
    if (state === 'ERR') t.equal((await g.modifyQp(qp.handle, S.STATE, { qp_state: QpState.ERR })).status, Status.OK);
    for (let i = 0; i < 2; i++) qp.writeSend({ wr_id: BigInt(i), opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, sges: [{ addr: mr.iova, length: 8, lkey: mr.lkey }] });
    // A first read that passes the check (2 ahead), a second that would run the device 2^31 entries ahead.
    const seen = toggle(g.mem.memory, qp.sqIndex, [2, 0x8000_0000]);
    await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
    t.equal(seen.reads, 1, `${state}: producer_index read once for one SQ record`);
    t.equal(qp.sqConsumer, 2, `${state}: exactly the WQEs of that one read were taken`);
    await g.ring(Array.from({ length: 100 }, () => ({ handle: qp.handle, type: DoorbellType.SQ })));
    t.ok(g.device.qps.get(qp.handle)!.sq.outstanding.length <= qp.depth, `${state}: outstanding work stays within the depth`);
    t.same(g.failures.map((e) => e.message), [], `${state}: no device failure`);
    t.same(g.broken.map((b) => b.error.message), [], `${state}: no NEEDS_RESET`);
    t.equal((await g.cmd(Command.QUERY_DEVICE)).status, Status.OK, `${state}: the control queue still answers`);
    await g.device.close();
  }
});

t.test('20,000 unknown doorbell handles with the event queue starved: waiting events stay within section 9.3\'s bound', async (t) => {
  const { g } = await open(t);
  const pd = await g.createPd();
  const cq = await g.createCq();
  await g.createQp(pd, cq, cq);
  const N = 20_000;
  for (let first = 0; first < N; first += Limits.DOORBELL_MAX_RECORDS) {
    const n = Math.min(Limits.DOORBELL_MAX_RECORDS, N - first);
    await g.ring(Array.from({ length: n }, (_, i) => ({ handle: 0x10_0000 + first + i, type: DoorbellType.SQ })));
  }
  const types = Object.keys(ET).length;
  const objects = g.device.qps.size + g.device.cqs.size;
  t.ok(g.device.waitingEvents <= types * (objects + 1) + 1, `${g.device.waitingEvents} waiting events, bound ${types * (objects + 1) + 1}`);
  t.equal(g.device.waitingEvents, 1, 'one shared waiting event');
  t.equal(g.device.counters.doorbellErrors, N, 'every record counted');
  g.postEventBuffers(4);
  const [e] = await g.waitEvents(1);
  t.same([e!.type, e!.handle, e!.detail, e!.count], [EventType.DOORBELL_ERROR, 0x10_0000, DoorbellErrorReason.UNKNOWN_HANDLE, N], 'the first handle, every occurrence counted');
  t.same(g.broken, []);
});

t.test('CREATE_QP with an oversized rq_num_pages: INVALID_ARGUMENT detail 40 (rq_num_pages), not 36', async (t) => {
  const { g } = await open(t);
  const max = g.config.max_pages_per_command;
  const body = CreateQpRequest.encode({
    pd_handle: 1, send_cq_handle: 1, recv_cq_handle: 1, qp_type: 2, sq_sig_all: 0, sq_page_shift: 12, rq_page_shift: 12,
    max_send_wr: 1, max_recv_wr: 1, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0,
    sq_num_pages: 1, rq_num_pages: max, sq_index_gpa: 0x10_0000n, rq_index_gpa: 0x10_0008n,
  });
  const a = await g.cmd(Command.CREATE_QP, body, []);
  t.same([a.status, a.detail], [Status.INVALID_ARGUMENT, CreateQpRequest.offsetOf('rq_num_pages')]);
  const sq = CreateQpRequest.encode({ ...CreateQpRequest.decode(body), sq_num_pages: max + 1, rq_num_pages: 0xffff_ffff });
  const b = await g.cmd(Command.CREATE_QP, sq, []);
  t.same([b.status, b.detail], [Status.INVALID_ARGUMENT, CreateQpRequest.offsetOf('sq_num_pages')], 'sq_num_pages alone too many: 36');
});
