// Every control command of the spec (section 8) over FakeVerbs: success, and each error status with its detail,
// in the order the spec lists them. The device must stay usable after each error (the next command succeeds).

import t from 'tap';
import type { Test } from 'tap';
import {
  AccessFlag,
  ArmCqRequest,
  Command,
  CreateAhRequest,
  CreateCqRequest,
  CreateQpRequest,
  DestroyQpResponse,
  HandleResponse,
  QpAttrMask,
  QpState,
  QpType,
  QueryGidRequest,
  QueryGidResponse,
  QueryPortRequest,
  QueryPortResponse,
  QueryQpResponse,
  QpAttr,
  RegMrContinueRequest,
  RegMrRequest,
  RegMrResponse,
  ResourceKind,
  Status,
  Limits,
  ringPages,
  encodeRequest,
} from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { PAGE, TestGuest, pageList, type Answer } from './guest.ts';
import { nativeStats } from '../../vmm-device/native/sys.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';

function expectStatus(t: Test, a: Answer, status: keyof typeof Status, detail: number, what: string): void {
  t.same({ status: a.status, detail: a.detail, used: a.used }, { status: Status[status], detail, used: status === 'OK' ? a.used : 16 }, what);
}


const VM_B_GID = gidFromIpv4('192.168.7.2');
const RED_GID = gidFromIpv4('192.168.7.3');
const NOWHERE_GID = gidFromIpv4('192.168.9.9');

async function open(t: Test, verbs = new FakeVerbs(), quotas?: object): Promise<TestGuest> {
  const g = await TestGuest.open({ verbs, ...(quotas ? { quotas } : {}) });
  t.teardown(() => g.device.close());
  return g;
}

t.test('QUERY_DEVICE, QUERY_PORT, QUERY_GID', async (t) => {
  const g = await open(t);
  const port = await g.cmd(Command.QUERY_PORT, QueryPortRequest.encode({ port_num: 1 }));
  expectStatus(t, port, 'OK', 0, 'port 1');
  const p = QueryPortResponse.decode(port.body);
  t.equal(p.gid_tbl_len, 1);
  t.equal(p.pkey_tbl_len, 1);
  t.equal(p.link_layer, 2);
  expectStatus(t, await g.cmd(Command.QUERY_PORT, QueryPortRequest.encode({ port_num: 2 })), 'INVALID_ARGUMENT', 0, 'port 2');
  const gid = await g.cmd(Command.QUERY_GID, QueryGidRequest.encode({ port_num: 1, index: 0 }));
  expectStatus(t, gid, 'OK', 0, 'gid 0');
  t.same([...QueryGidResponse.decode(gid.body).gid], [...gidFromIpv4('192.168.7.1')], 'the virtual GID, never the host one');
  t.same([...g.config.gid], [...gidFromIpv4('192.168.7.1')], 'config gid');
  expectStatus(t, await g.cmd(Command.QUERY_GID, QueryGidRequest.encode({ port_num: 0, index: 0 })), 'INVALID_ARGUMENT', 0, 'port 0');
  expectStatus(t, await g.cmd(Command.QUERY_GID, QueryGidRequest.encode({ port_num: 1, index: 1 })), 'INVALID_ARGUMENT', 4, 'index 1');
});

t.test('CREATE_PD and DESTROY_PD: limit, host refusal, unknown handle, busy', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs, { maxPd: 2 });
  const a = await g.createPd();
  const b = await g.createPd();
  t.ok(a >= 1 && a <= Limits.HANDLE_MAX && b !== a, 'small distinct handles');
  expectStatus(t, await g.cmd(Command.CREATE_PD), 'NO_RESOURCES', ResourceKind.PD, 'limit');
  expectStatus(t, await g.destroy(Command.DESTROY_PD, b), 'OK', 0, 'destroy');
  expectStatus(t, await g.destroy(Command.DESTROY_PD, b), 'INVALID_HANDLE', 0, 'destroyed handle');
  expectStatus(t, await g.destroy(Command.DESTROY_PD, 0), 'INVALID_HANDLE', 0, 'handle 0');
  verbs.failNext('ibv_alloc_pd', 'ENOMEM');
  expectStatus(t, await g.cmd(Command.CREATE_PD), 'NO_RESOURCES', ResourceKind.HOST, 'host refuses');
  await g.regMr(a, PAGE, AccessFlag.LOCAL_WRITE);
  expectStatus(t, await g.destroy(Command.DESTROY_PD, a), 'BUSY', ResourceKind.MR, 'PD with an MR');
  t.equal(g.device.counters.errors['CREATE_PD:NO_RESOURCES'], 2, 'errors counted by command and status');
});

t.test('CREATE_CQ: every error in order, DESTROY_CQ, ARM_CQ', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs, { maxCq: 2 });
  const ring = g.allocPages(1);
  const index = g.allocPages(1);
  const req = (v: Partial<ReturnType<typeof CreateCqRequest.decode>>) =>
    CreateCqRequest.encode({ cqe_count: 16, page_shift: 12, num_pages: 1, index_gpa: BigInt(index), ...v });
  const pages = [BigInt(ring)];
  const cases: [string, Uint8Array, bigint[], keyof typeof Status, number][] = [
    ['cqe_count not a power of two', req({ cqe_count: 12 }), pages, 'INVALID_ARGUMENT', 0],
    ['cqe_count above max_cqe', req({ cqe_count: g.config.max_cqe * 2, num_pages: ringPages(g.config.max_cqe * 2, 32, 12) > 512 ? 1 : 1 }), pages, 'INVALID_ARGUMENT', 0],
    ['cqe_count 0', req({ cqe_count: 0 }), pages, 'INVALID_ARGUMENT', 0],
    ['page_shift not offered', req({ page_shift: 13 }), pages, 'INVALID_ARGUMENT', 4],
    ['num_pages not the computed count', req({ cqe_count: 256, num_pages: 1 }), pages, 'INVALID_ARGUMENT', 8],
    ['index block misaligned', req({ index_gpa: BigInt(index + 4) }), pages, 'INVALID_ARGUMENT', 16],
    ['index block outside RAM', req({ index_gpa: BigInt(g.mem.hole(8)) }), pages, 'OUT_OF_RANGE', 16],
    ['index block above 2^64', req({ index_gpa: 0xffff_ffff_ffff_fff8n }), pages, 'OUT_OF_RANGE', 16],
    ['page misaligned', req({}), [BigInt(ring + 8)], 'INVALID_ARGUMENT', 24],
    ['page outside RAM', req({}), [BigInt(g.mem.hole(PAGE * 2) + PAGE) & ~0xfffn], 'OUT_OF_RANGE', 24],
  ];
  for (const [what, body, list, status, detail] of cases) expectStatus(t, await g.cmd(Command.CREATE_CQ, body, list), status, detail, what);
  t.equal(verbs.liveObjects().cq, 0, 'no host CQ for any refused request');
  const c1 = await g.createCq();
  await g.createCq();
  expectStatus(t, await g.cmd(Command.CREATE_CQ, req({}), pages), 'NO_RESOURCES', ResourceKind.CQ, 'limit');
  await g.destroy(Command.DESTROY_CQ, c1.handle);
  verbs.failNext('ibv_create_cq', 'ENOMEM');
  expectStatus(t, await g.cmd(Command.CREATE_CQ, req({}), pages), 'NO_RESOURCES', ResourceKind.HOST, 'host refuses');
  const c3 = await g.createCq();
  expectStatus(t, await g.cmd(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: c3.handle, solicited_only: 0 })), 'OK', 0, 'arm');
  expectStatus(t, await g.cmd(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: 999, solicited_only: 0 })), 'INVALID_HANDLE', 0, 'arm unknown');
  expectStatus(t, await g.cmd(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: c3.handle, solicited_only: 2 })), 'INVALID_ARGUMENT', 4, 'arm bad mode');
  const pd = await g.createPd();
  await g.createQp(pd, c3, c3);
  expectStatus(t, await g.destroy(Command.DESTROY_CQ, c3.handle), 'BUSY', ResourceKind.QP, 'CQ used by a QP');
  expectStatus(t, await g.destroy(Command.DESTROY_CQ, c1.handle), 'INVALID_HANDLE', 0, 'destroyed CQ');
});

t.test('CREATE_QP: every error in order', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs, { maxQp: 1 });
  const pd = await g.createPd();
  const cq = await g.createCq();
  const sq = g.allocPages(1);
  const rq = g.allocPages(1);
  const idx = g.allocPages(1);
  const req = (v: Partial<ReturnType<typeof CreateQpRequest.decode>>) =>
    CreateQpRequest.encode({
      pd_handle: pd,
      send_cq_handle: cq.handle,
      recv_cq_handle: cq.handle,
      qp_type: QpType.RC,
      sq_sig_all: 0,
      sq_page_shift: 12,
      rq_page_shift: 12,
      max_send_wr: 16,
      max_recv_wr: 16,
      max_send_sge: 1,
      max_recv_sge: 1,
      max_inline_data: 0,
      sq_num_pages: 1,
      rq_num_pages: 1,
      sq_index_gpa: BigInt(idx),
      rq_index_gpa: BigInt(idx + 8),
      ...v,
    });
  const pages = [BigInt(sq), BigInt(rq)];
  const cases: [string, Uint8Array, bigint[], keyof typeof Status, number][] = [
    ['qp_type unknown', req({ qp_type: 3 }), pages, 'INVALID_ARGUMENT', 12],
    ['no such PD', req({ pd_handle: 77 }), pages, 'INVALID_HANDLE', 0],
    ['no such send CQ', req({ send_cq_handle: 77 }), pages, 'INVALID_HANDLE', 4],
    ['no such recv CQ', req({ recv_cq_handle: 77 }), pages, 'INVALID_HANDLE', 8],
    ['sq_sig_all 2', req({ sq_sig_all: 2 }), pages, 'INVALID_ARGUMENT', 13],
    ['max_send_wr not a power of two', req({ max_send_wr: 3 }), pages, 'INVALID_ARGUMENT', 16],
    ['max_send_wr above max_qp_wr', req({ max_send_wr: g.config.max_qp_wr * 2 }), pages, 'INVALID_ARGUMENT', 16],
    ['max_recv_wr 0', req({ max_recv_wr: 0 }), pages, 'INVALID_ARGUMENT', 20],
    ['max_send_sge too large', req({ max_send_sge: 5 }), pages, 'INVALID_ARGUMENT', 24],
    ['max_recv_sge too large', req({ max_recv_sge: 4 }), pages, 'INVALID_ARGUMENT', 28],
    ['max_inline_data without INLINE', req({ max_inline_data: 1 }), pages, 'INVALID_ARGUMENT', 32],
    ['sq_page_shift', req({ sq_page_shift: 16 }), pages, 'INVALID_ARGUMENT', 14],
    ['rq_page_shift', req({ rq_page_shift: 11 }), pages, 'INVALID_ARGUMENT', 15],
    ['sq_num_pages wrong', req({ max_send_wr: 64, sq_num_pages: 1 }), pages, 'INVALID_ARGUMENT', 36],
    ['rq_num_pages wrong', req({ max_recv_wr: 128, rq_num_pages: 1 }), pages, 'INVALID_ARGUMENT', 40],
    ['sq index misaligned', req({ sq_index_gpa: BigInt(idx + 2) }), pages, 'INVALID_ARGUMENT', 48],
    ['rq index outside RAM', req({ rq_index_gpa: BigInt(g.mem.hole(8)) }), pages, 'OUT_OF_RANGE', 56],
    ['SQ page misaligned', req({}), [BigInt(sq + 1), BigInt(rq)], 'INVALID_ARGUMENT', 64],
    ['RQ page outside RAM', req({}), [BigInt(sq), 0x7fff_0000_0000n], 'OUT_OF_RANGE', 72],
  ];
  for (const [what, body, list, status, detail] of cases) expectStatus(t, await g.cmd(Command.CREATE_QP, body, list), status, detail, what);
  verbs.failNext('ibv_create_qp', 'ENOMEM');
  expectStatus(t, await g.cmd(Command.CREATE_QP, req({}), pages), 'NO_RESOURCES', ResourceKind.HOST, 'host refuses');
  t.equal(verbs.liveObjects().qp, 0, 'nothing created on the host for refused requests');
  await g.createQp(pd, cq, cq);
  expectStatus(t, await g.cmd(Command.CREATE_QP, req({}), pages), 'NO_RESOURCES', ResourceKind.QP, 'QP limit');
});

t.test('CREATE_QP of a type whose feature was not negotiated is NOT_SUPPORTED', async (t) => {
  const g = await open(t);
  g.device.reset();
  g.activate((1n << 32n) | 1n); // RC only
  const pd = await g.createPd();
  const cq = await g.createCq();
  const body = CreateQpRequest.encode({
    pd_handle: pd, send_cq_handle: cq.handle, recv_cq_handle: cq.handle, qp_type: QpType.UD, sq_sig_all: 0, sq_page_shift: 12,
    rq_page_shift: 12, max_send_wr: 1, max_recv_wr: 1, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0, sq_num_pages: 1,
    rq_num_pages: 1, sq_index_gpa: BigInt(g.allocPages(1)), rq_index_gpa: BigInt(g.allocPages(1)),
  });
  expectStatus(t, await g.cmd(Command.CREATE_QP, body, pageList(g.allocPages(1), 1).concat(pageList(g.allocPages(1), 1))), 'NOT_SUPPORTED', 12, 'UD without UD');
  const ah = CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid: VM_B_GID });
  expectStatus(t, await g.cmd(Command.CREATE_AH, ah), 'NOT_SUPPORTED', 0, 'AH without UD');
});

t.test('MODIFY_QP: RC transitions, every mask and value error, translation, QUERY_QP, DESTROY_QP', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs);
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  const S = QpAttrMask;
  const A = 8; // body offset of attr
  const at = (f: string) => A + QpAttr.offsetOf(f);
  expectStatus(t, await g.modifyQp(999, S.STATE, { qp_state: 1 }), 'INVALID_HANDLE', 0, 'no such QP');
  expectStatus(t, await g.modifyQp(qp.handle, 1 << 21, { qp_state: 1 }), 'INVALID_ARGUMENT', 4, 'undefined mask bit');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE | S.ALT_PATH, { qp_state: 1 }), 'NOT_SUPPORTED', 4, 'ALT_PATH');
  expectStatus(t, await g.modifyQp(qp.handle, S.PORT, { qp_state: 1 }), 'INVALID_ARGUMENT', 4, 'no STATE');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE, { qp_state: 7 }), 'INVALID_ARGUMENT', at('qp_state'), 'state 7');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE, { qp_state: QpState.SQD }), 'NOT_SUPPORTED', at('qp_state'), 'SQD');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE, { qp_state: QpState.RTS }), 'WRONG_STATE', at('qp_state'), 'RESET to RTS');
  const init = S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS;
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE | S.PORT, { qp_state: 1, port_num: 1 }), 'INVALID_ARGUMENT', 4, 'required bit missing');
  expectStatus(t, await g.modifyQp(qp.handle, init | S.QKEY, { qp_state: 1, port_num: 1 }), 'INVALID_ARGUMENT', 4, 'bit not allowed for RC INIT');
  expectStatus(t, await g.modifyQp(qp.handle, init, { qp_state: 1, port_num: 2 }), 'INVALID_ARGUMENT', at('port_num'), 'port 2');
  expectStatus(t, await g.modifyQp(qp.handle, init, { qp_state: 1, port_num: 1, pkey_index: 1 }), 'INVALID_ARGUMENT', at('pkey_index'), 'pkey 1');
  expectStatus(t, await g.modifyQp(qp.handle, init, { qp_state: 1, port_num: 1, qp_access_flags: 0x10 }), 'INVALID_ARGUMENT', at('qp_access_flags'), 'access bits');
  expectStatus(t, await g.modifyQp(qp.handle, init, { qp_state: 1, port_num: 1, qp_access_flags: 7 }), 'OK', 0, 'RESET to INIT');
  const rtr = S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER;
  const good = { qp_state: 2, path_mtu: 1, dest_qp_num: 0x123, rq_psn: 5, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, dgid: VM_B_GID };
  const bad: [string, object, string][] = [
    ['path_mtu above active', { path_mtu: 6 }, 'path_mtu'],
    ['dest_qp_num above 24 bits', { dest_qp_num: 1 << 24 }, 'dest_qp_num'],
    ['rq_psn above 24 bits', { rq_psn: 1 << 24 }, 'rq_psn'],
    ['max_dest_rd_atomic', { max_dest_rd_atomic: 200 }, 'max_dest_rd_atomic'],
    ['min_rnr_timer', { min_rnr_timer: 32 }, 'min_rnr_timer'],
    ['sgid_index other than 0', { sgid_index: 1 }, 'sgid_index'],
    ['flow_label above 20 bits', { flow_label: 1 << 20 }, 'flow_label'],
    ['sl above 15', { sl: 16 }, 'sl'],
  ];
  for (const [what, v, field] of bad) expectStatus(t, await g.modifyQp(qp.handle, rtr, { ...good, ...v }), 'INVALID_ARGUMENT', at(field), what);
  expectStatus(t, await g.modifyQp(qp.handle, rtr, { ...good, dgid: RED_GID }), 'DESTINATION_UNREACHABLE', at('dgid'), 'other VPC');
  expectStatus(t, await g.modifyQp(qp.handle, rtr, { ...good, dgid: NOWHERE_GID }), 'DESTINATION_UNREACHABLE', at('dgid'), 'nowhere');
  verbs.failNext('ibv_modify_qp', 'EINVAL');
  expectStatus(t, await g.modifyQp(qp.handle, rtr, good), 'DEVICE_ERROR', 0, 'host refuses');
  expectStatus(t, await g.modifyQp(qp.handle, rtr, good), 'OK', 0, 'INIT to RTR');
  const rts = S.STATE | S.SQ_PSN | S.TIMEOUT | S.RETRY_CNT | S.RNR_RETRY | S.MAX_QP_RD_ATOMIC;
  expectStatus(t, await g.modifyQp(qp.handle, rts, { qp_state: 3, timeout: 32, retry_cnt: 7, rnr_retry: 7 }), 'INVALID_ARGUMENT', at('timeout'), 'timeout 32');
  expectStatus(t, await g.modifyQp(qp.handle, rts, { qp_state: 3, timeout: 14, retry_cnt: 8, rnr_retry: 7 }), 'INVALID_ARGUMENT', at('retry_cnt'), 'retry 8');
  expectStatus(t, await g.modifyQp(qp.handle, rts, { qp_state: 3, timeout: 14, retry_cnt: 7, rnr_retry: 7, sq_psn: 9 }), 'OK', 0, 'RTR to RTS');
  // What the host got: the host GID from the table and the host's own GID index, never the guest's values.
  const hostQp = await verbs.queryQp(g.device.qps.get(qp.handle)!.host);
  t.same([...hostQp.ahAttr.grh!.dgid], [...gidFromIpv4('10.0.0.1')], 'host dgid is the translated host GID');
  t.equal(hostQp.ahAttr.grh!.sgidIndex, 1, 'host GID index chosen by the device');
  const q = QueryQpResponse.decode((await g.cmd(Command.QUERY_QP, new Uint8Array([qp.handle, 0, 0, 0, 0, 0, 0, 0]))).body);
  const qa = QpAttr.decode(q.attr);
  t.equal(qa.qp_state, QpState.RTS);
  t.same([...qa.dgid], [...VM_B_GID], 'QUERY_QP shows the virtual dgid');
  t.equal(qa.sgid_index, 0);
  t.equal(q.qp_num, qp.qpn);
  t.equal(q.max_send_wr, 16);
  expectStatus(t, await g.cmd(Command.QUERY_QP, new Uint8Array([77, 0, 0, 0, 0, 0, 0, 0])), 'INVALID_HANDLE', 0, 'query unknown');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE, { qp_state: QpState.ERR }), 'OK', 0, 'to ERR');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE, { qp_state: QpState.RESET }), 'OK', 0, 'ERR to RESET');
  const d = await g.destroy(Command.DESTROY_QP, qp.handle);
  expectStatus(t, d, 'OK', 0, 'destroy');
  t.same(DestroyQpResponse.decode(d.body), { sq_flushed: 0, rq_flushed: 0, flush_dropped: 0 });
  expectStatus(t, await g.destroy(Command.DESTROY_QP, qp.handle), 'INVALID_HANDLE', 0, 'destroy twice');
  t.equal(verbs.liveObjects().qp, 0, 'host QP gone');
});

t.test('UD QP: Q_Key checked and replaced by the VPC key', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs);
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq, QpType.UD);
  const S = QpAttrMask;
  const init = S.STATE | S.PKEY_INDEX | S.PORT | S.QKEY;
  expectStatus(t, await g.modifyQp(qp.handle, init, { qp_state: 1, port_num: 1, qkey: 0x8000_0001 }), 'INVALID_ARGUMENT', 8 + QpAttr.offsetOf('qkey'), 'controlled Q_Key');
  expectStatus(t, await g.modifyQp(qp.handle, init, { qp_state: 1, port_num: 1, qkey: 0x1111 }), 'OK', 0, 'INIT');
  const host = await verbs.queryQp(g.device.qps.get(qp.handle)!.host);
  t.equal(host.qkey, g.device.address.qkey, 'host Q_Key is the VPC one');
  t.not(host.qkey, 0x1111);
  const q = QpAttr.decode(QueryQpResponse.decode((await g.cmd(Command.QUERY_QP, new Uint8Array([qp.handle, 0, 0, 0, 0, 0, 0, 0]))).body).attr);
  t.equal(q.qkey, 0x1111, 'the guest sees its own Q_Key');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE, { qp_state: 2 }), 'OK', 0, 'UD RTR');
  expectStatus(t, await g.modifyQp(qp.handle, S.STATE | S.SQ_PSN, { qp_state: 3 }), 'OK', 0, 'UD RTS');
});

t.test('REG_MR, REG_MR_CONTINUE, DEREG_MR: errors, page-list abuse, continuation', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs, { maxMr: 3, maxMrBytes: 64n << 20n });
  const pd = await g.createPd();
  const buf = g.allocPages(4);
  const iova = 0x7f12_3456_7000n;
  const req = (v: Partial<ReturnType<typeof RegMrRequest.decode>>) =>
    RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova, length: 4n * BigInt(PAGE), page_shift: 12, total_pages: 4, num_pages: 4, ...v });
  const pages = pageList(buf, 4);
  const cases: [string, Uint8Array, bigint[], keyof typeof Status, number][] = [
    ['no such PD', req({ pd_handle: 9 }), pages, 'INVALID_HANDLE', 0],
    ['access bits', req({ access_flags: 0x10 }), pages, 'INVALID_ARGUMENT', 4],
    ['REMOTE_WRITE without LOCAL_WRITE', req({ access_flags: AccessFlag.REMOTE_WRITE }), pages, 'INVALID_ARGUMENT', 4],
    ['length 0', req({ length: 0n }), pages, 'INVALID_ARGUMENT', 16],
    ['length above max_mr_size', req({ length: g.config.max_mr_size + 1n }), pages, 'INVALID_ARGUMENT', 16],
    ['iova + length wraps', req({ iova: 0xffff_ffff_ffff_f000n, length: 2n * BigInt(PAGE) }), pages, 'OUT_OF_RANGE', 8],
    ['page_shift', req({ page_shift: 20 }), pages, 'INVALID_ARGUMENT', 24],
    ['total_pages not the count', req({ total_pages: 3 }), pages, 'INVALID_ARGUMENT', 28],
    // max_mr_size <= max_mr_pages * 4 KiB, so a region with too many pages is already too long (offset 16).
    ['more pages than max_mr_pages', req({ length: BigInt(g.config.max_mr_pages + 1) * 4096n, total_pages: g.config.max_mr_pages + 1 }), pages, 'INVALID_ARGUMENT', 16],
    ['num_pages 0', req({ num_pages: 0 }), [], 'INVALID_ARGUMENT', 32],
    ['num_pages above total', req({ length: 4096n, total_pages: 1, num_pages: 4 }), pages, 'INVALID_ARGUMENT', 32],
    ['page misaligned', req({}), [pages[0]!, pages[1]! + 1n, pages[2]!, pages[3]!], 'INVALID_ARGUMENT', 48],
    ['page outside guest RAM', req({}), [pages[0]!, pages[1]!, BigInt(g.mem.hole(2 * PAGE) + PAGE) & ~0xfffn, pages[3]!], 'OUT_OF_RANGE', 56],
    ['page at the top of the address space', req({}), [pages[0]!, pages[1]!, pages[2]!, 0xffff_ffff_ffff_f000n], 'OUT_OF_RANGE', 64],
  ];
  for (const [what, body, list, status, detail] of cases) expectStatus(t, await g.cmd(Command.REG_MR, body, list), status, detail, what);
  // Page count above max_pages_per_command: refused at framing before a single entry is read (CVE-2023-1544 class).
  const huge = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova: 0n, length: 1n << 30n, page_shift: 12, total_pages: 262144, num_pages: 0xffff_ffff });
  expectStatus(t, await g.cmd(Command.REG_MR, huge, pages), 'INVALID_ARGUMENT', 32, 'num_pages 2^32-1 with 4 entries');
  const over = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova: 0n, length: 1n << 30n, page_shift: 12, total_pages: 262144, num_pages: g.config.max_pages_per_command + 1 });
  expectStatus(t, await g.cmd(Command.REG_MR, over, pageList(buf, 4)), 'INVALID_ARGUMENT', 32, 'num_pages max+1');
  const lying = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova, length: 4n * 4096n, page_shift: 12, total_pages: 4, num_pages: 3 });
  expectStatus(t, await g.cmd(Command.REG_MR, lying, pages), 'INVALID_LENGTH', 0, 'num_pages says 3, list has 4');
  t.equal(verbs.liveObjects().mr, 0, 'nothing registered so far');
  t.equal(g.device.mrs.size, 0, 'no pending MR left by refused requests');

  // Continuation: 4 pages in 1 + 2 + 1.
  const first = RegMrResponse.decode(await g.ok(Command.REG_MR, req({ num_pages: 1 }), pages.slice(0, 1)));
  t.equal(first.pages_received, 1);
  t.equal(first.lkey, 0, 'no key while pending');
  const cont = (v: Partial<ReturnType<typeof RegMrContinueRequest.decode>>) =>
    RegMrContinueRequest.encode({ mr_handle: first.mr_handle, start_index: 1, num_pages: 2, ...v });
  expectStatus(t, await g.cmd(Command.REG_MR_CONTINUE, cont({ mr_handle: 55 }), pages.slice(1, 3)), 'INVALID_HANDLE', 0, 'continue unknown');
  expectStatus(t, await g.cmd(Command.REG_MR_CONTINUE, cont({ start_index: 2 }), pages.slice(1, 3)), 'INVALID_ARGUMENT', 4, 'wrong start');
  expectStatus(t, await g.cmd(Command.REG_MR_CONTINUE, cont({ num_pages: 4 }), pages.slice(0, 4)), 'INVALID_ARGUMENT', 8, 'past total');
  expectStatus(t, await g.cmd(Command.REG_MR_CONTINUE, cont({}), [pages[1]!, 0x10n]), 'INVALID_ARGUMENT', 24, 'continue misaligned page');
  const second = RegMrResponse.decode(await g.ok(Command.REG_MR_CONTINUE, cont({}), pages.slice(1, 3)));
  t.equal(second.pages_received, 3);
  verbs.failNext('ibv_reg_mr_iova', 'ENOMEM');
  expectStatus(t, await g.cmd(Command.REG_MR_CONTINUE, cont({ start_index: 3, num_pages: 1 }), pages.slice(3)), 'NO_RESOURCES', ResourceKind.HOST, 'host refuses at the last page');
  const last = RegMrResponse.decode(await g.ok(Command.REG_MR_CONTINUE, cont({ start_index: 3, num_pages: 1 }), pages.slice(3)));
  t.equal(last.pages_received, 4);
  t.not(last.lkey, 0, 'keys with the last page');
  expectStatus(t, await g.cmd(Command.REG_MR_CONTINUE, cont({ start_index: 4, num_pages: 1 }), pages.slice(3)), 'WRONG_STATE', 0, 'not pending');
  t.equal(verbs.liveObjects().mr, 1);
  // Limits: MR count (pending ones count) and MR_BYTES.
  await g.ok(Command.REG_MR, req({ num_pages: 1 }), pages.slice(0, 1));
  const big = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova: 0n, length: 64n << 20n, page_shift: 12, total_pages: 16384, num_pages: 1 });
  expectStatus(t, await g.cmd(Command.REG_MR, big, pages.slice(0, 1)), 'NO_RESOURCES', ResourceKind.MR_BYTES, 'MR_BYTES');
  await g.ok(Command.REG_MR, req({ num_pages: 1 }), pages.slice(0, 1));
  expectStatus(t, await g.cmd(Command.REG_MR, req({}), pages), 'NO_RESOURCES', ResourceKind.MR, 'MR limit');
  expectStatus(t, await g.destroy(Command.DEREG_MR, first.mr_handle), 'OK', 0, 'dereg');
  expectStatus(t, await g.destroy(Command.DEREG_MR, first.mr_handle), 'INVALID_HANDLE', 0, 'dereg twice');
  t.equal(verbs.liveObjects().mr, 0, 'host MR released');
});

t.test('REG_MR of scattered pages over guest RAM that is not a shared mapping: NO_RESOURCES HOST, nothing kept', async (t) => {
  // The native mapper, as in production: a plain ArrayBuffer is no shared mapping.
  const g = await TestGuest.open({ verbs: new FakeVerbs(), aliases: nativeAliasMapper });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const a = g.allocPages(1);
  g.allocPages(1);
  const b = g.allocPages(1);
  const body = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova: 0x1000n, length: 8192n, page_shift: 12, total_pages: 2, num_pages: 2 });
  expectStatus(t, await g.cmd(Command.REG_MR, body, [BigInt(b), BigInt(a)]), 'NO_RESOURCES', ResourceKind.HOST, 'a plain ArrayBuffer cannot be aliased');
  t.equal(g.device.mrs.size, 0, 'no MR kept');
  t.equal(g.device.mrBytes, 0n, 'no bytes charged');
});

t.test('REG_MR of shuffled pages over memfd guest RAM: one contiguous view in page-list order, unmapped at DEREG_MR', async (t) => {
  const g = await TestGuest.open({ verbs: new FakeVerbs(), memfdRam: true });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const PAGES = 6;
  // Every other page, then shuffled, and one page from the second region: no two list neighbours are neighbours.
  const pages: number[] = [];
  for (let i = 0; i < PAGES - 1; i++) {
    pages.push(g.allocPages(1));
    g.allocPages(1);
  }
  pages.push(g.allocPages(1, 1));
  const order = [3, 0, 5, 2, 4, 1].map((i) => pages[i]!);
  order.forEach((gpa, i) => g.mem.write(gpa, new Uint8Array(PAGE).fill(0x10 + i)));
  const before = nativeStats().mappings;
  const iova = 0x7000_0000_0800n; // the MR starts 2 KiB into its first page
  const length = BigInt(PAGES * PAGE - 2048 - 1000);
  const total = PAGES;
  // REG_MR with 4 pages, REG_MR_CONTINUE with the last 2: the view is made when the last page arrives.
  const first = RegMrRequest.encode({ pd_handle: pd, access_flags: AccessFlag.LOCAL_WRITE, iova, length, page_shift: 12, total_pages: total, num_pages: 4 });
  const r = RegMrResponse.decode(await g.ok(Command.REG_MR, first, order.slice(0, 4).map(BigInt)));
  t.equal(r.pages_received, 4);
  t.equal(nativeStats().mappings, before, 'nothing mapped while pending');
  const cont = RegMrContinueRequest.encode({ mr_handle: r.mr_handle, start_index: 4, num_pages: 2 });
  const done = RegMrResponse.decode(await g.ok(Command.REG_MR_CONTINUE, cont, order.slice(4).map(BigInt)));
  t.equal(done.pages_received, total);
  t.not(done.lkey, 0, 'registered');
  const mr = g.device.mrs.get(r.mr_handle)!;
  t.ok(mr.alias !== undefined, 'an alias view was made');
  t.equal(nativeStats().mappings, before + 1, 'one mapping for it');
  const view = new Uint8Array(mr.backing!.buffer, mr.backing!.offset - 2048, PAGES * PAGE);
  for (let i = 0; i < PAGES; i++) t.equal(view[i * PAGE + 7], 0x10 + i, `view page ${i} is guest page ${i} of the list`);
  view[3 * PAGE + 100] = 0xee;
  t.equal(g.mem.read(order[3]! + 100, 1)[0], 0xee, 'the same memory, not a copy');
  expectStatus(t, await g.destroy(Command.DEREG_MR, r.mr_handle), 'OK', 0, 'DEREG_MR');
  await g.device.settled();
  t.equal(nativeStats().mappings, before, 'the view is unmapped after deregistration');
});

t.test('CREATE_AH and DESTROY_AH', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs, { maxAh: 1 });
  const pd = await g.createPd();
  const req = (v: Partial<ReturnType<typeof CreateAhRequest.decode>>) =>
    CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid: VM_B_GID, ...v });
  const cases: [string, Uint8Array, keyof typeof Status, number][] = [
    ['no such PD', req({ pd_handle: 4 }), 'INVALID_HANDLE', 0],
    ['flow label', req({ flow_label: 0x100000 }), 'INVALID_ARGUMENT', 4],
    ['port', req({ port_num: 2 }), 'INVALID_ARGUMENT', 8],
    ['sgid_index', req({ sgid_index: 1 }), 'INVALID_ARGUMENT', 9],
    ['sl above 15', req({ sl: 16 }), 'INVALID_ARGUMENT', 12],
    ['other VPC', req({ dgid: RED_GID }), 'DESTINATION_UNREACHABLE', 16],
    ['unknown address', req({ dgid: NOWHERE_GID }), 'DESTINATION_UNREACHABLE', 16],
  ];
  for (const [what, body, status, detail] of cases) expectStatus(t, await g.cmd(Command.CREATE_AH, body), status, detail, what);
  verbs.failNext('ibv_create_ah', 'ENOMEM');
  expectStatus(t, await g.cmd(Command.CREATE_AH, req({})), 'NO_RESOURCES', ResourceKind.HOST, 'host refuses');
  const ah = HandleResponse.decode(await g.ok(Command.CREATE_AH, req({}))).handle;
  expectStatus(t, await g.cmd(Command.CREATE_AH, req({})), 'NO_RESOURCES', ResourceKind.AH, 'AH limit');
  expectStatus(t, await g.destroy(Command.DESTROY_PD, pd), 'BUSY', ResourceKind.AH, 'PD with an AH');
  expectStatus(t, await g.destroy(Command.DESTROY_AH, ah), 'OK', 0, 'destroy');
  expectStatus(t, await g.destroy(Command.DESTROY_AH, ah), 'INVALID_HANDLE', 0, 'destroy twice');
  expectStatus(t, await g.destroy(Command.DESTROY_PD, pd), 'OK', 0, 'then the PD');
});

t.test('handles of another VM name nothing here', async (t) => {
  const verbs = new FakeVerbs();
  const a = await open(t, verbs);
  const b = await TestGuest.open({ verbs, vmId: 'vm-b', seed: 7 });
  t.teardown(() => b.device.close());
  await b.createPd();
  const bpd2 = await b.createPd();
  const bcq = await b.createCq();
  t.equal(a.device.pds.size, 0);
  expectStatus(t, await a.destroy(Command.DESTROY_PD, bpd2), 'INVALID_HANDLE', 0, "B's PD handle in A");
  expectStatus(t, await a.destroy(Command.DESTROY_CQ, bcq.handle), 'INVALID_HANDLE', 0, "B's CQ handle in A");
  t.equal(b.device.pds.size, 2, "B's objects untouched");
});

t.test('reset and close release every host object of the VM', async (t) => {
  const verbs = new FakeVerbs();
  const g = await TestGuest.open({ verbs });
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  await g.modifyQp(qp.handle, QpAttrMask.STATE | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.ACCESS_FLAGS, { qp_state: 1, port_num: 1 });
  await g.regMr(pd, 2 * PAGE, AccessFlag.LOCAL_WRITE);
  const pending = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova: 0n, length: 3n * 4096n, page_shift: 12, total_pages: 3, num_pages: 1 });
  await g.ok(Command.REG_MR, pending, [BigInt(g.allocPages(1))]);
  await g.ok(Command.CREATE_AH, CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 1, traffic_class: 0, sl: 0, dgid: VM_B_GID }));
  t.same(verbs.liveObjects(), { device: 1, pd: 1, cq: 1, qp: 1, mr: 1, ah: 1 });
  g.device.reset();
  await g.device.settled();
  t.same(verbs.liveObjects(), { device: 1, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'reset: nothing of the VM on the host');
  g.activate((1n << 32n) | 3n);
  t.equal(await g.createPd(), 1, 'handles start again at 1 after reset');
  await g.device.close();
  t.same(verbs.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'close: host device closed too');
});

t.test('a reset during a host call releases the object the call created', async (t) => {
  const verbs = new FakeVerbs();
  const g = await TestGuest.open({ verbs });
  const pd = await g.createPd();
  const ring = g.allocPages(1);
  const index = g.allocPages(1);
  const body = CreateCqRequest.encode({ cqe_count: 16, page_shift: 12, num_pages: 1, index_gpa: BigInt(index) });
  const reqAddr = g.mem.alloc(64 + 8, { align: 8 });
  g.mem.write(reqAddr, encodeRequest(Command.CREATE_CQ, 1n, body, [BigInt(ring)]));
  g.ctrl.add({ buffers: [{ addr: reqAddr, len: 16 + 24 + 8 }, { len: 16 + 8, write: true }] });
  g.device.queueNotify(0); // the device starts the request and awaits the host
  g.device.reset(); // overtakes it while the host call is in flight
  await new Promise((r) => setTimeout(r, 20));
  await g.device.settled();
  t.equal(verbs.liveObjects().cq, 0, 'the CQ created for an overtaken request was released');
  t.equal(verbs.liveObjects().pd, 0);
  t.same(g.ctrl.readUsed(), [], 'nothing answered into guest memory after the reset');
  void pd;
  await g.device.close();
});

t.test('DEREG_MR of a pending MR; DESTROY_PD busy with a QP', async (t) => {
  const verbs = new FakeVerbs();
  const g = await open(t, verbs);
  const pd = await g.createPd();
  const pending = RegMrRequest.encode({ pd_handle: pd, access_flags: 1, iova: 0n, length: 3n * 4096n, page_shift: 12, total_pages: 3, num_pages: 1 });
  const mr = RegMrResponse.decode(await g.ok(Command.REG_MR, pending, [BigInt(g.allocPages(1))]));
  t.equal(g.device.mrBytes, 3n * 4096n, 'a pending MR counts against MR_BYTES');
  expectStatus(t, await g.destroy(Command.DEREG_MR, mr.mr_handle), 'OK', 0, 'dereg pending');
  t.equal(g.device.mrBytes, 0n);
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  expectStatus(t, await g.destroy(Command.DESTROY_PD, pd), 'BUSY', ResourceKind.QP, 'PD with a QP');
  expectStatus(t, await g.destroy(Command.DESTROY_QP, qp.handle), 'OK', 0, 'QP');
  expectStatus(t, await g.destroy(Command.DESTROY_CQ, cq.handle), 'OK', 0, 'CQ');
  expectStatus(t, await g.destroy(Command.DESTROY_PD, pd), 'OK', 0, 'PD');
  t.same(verbs.liveObjects(), { device: 1, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 });
});

t.test('activation without RC and UD is refused (spec 4.2)', async (t) => {
  const g = await open(t);
  g.device.reset();
  t.notOk(g.device.acceptFeatures(1n << 32n));
  t.throws(() => g.activate(1n << 32n), /neither RC nor UD/);
});
