// INLINE on real verbs: two device instances (two "VMs") over NativeVerbs on the test host's rxe0, with INLINE
// negotiated and RC QPs created with max_inline_data 64 through CREATE_QP. Inline SEND_WITH_IMM, inline SEND and
// inline RDMA WRITE (and WRITE_WITH_IMM) go from A's SQ ring to B through the host's IBV_SEND_INLINE; every byte is
// checked at B, with the bytes around untouched, and A registers no MR at all (inline data lives in the WQE). After
// the test `rdma resource show` lists nothing of this process.
//
//   bash scripts/rxe/run.sh --timeout 1200 -- npx tap --jobs=1 test/rxe/device-inline.test.ts

import t from 'tap';
import type { Test } from 'tap';
import {
  AccessFlag,
  Command,
  DoorbellType,
  FeatureBit,
  QpAttrMask,
  SendOpcode,
  Status,
  WcFlag,
  WcOpcode,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { StaticAddressResolver, gidFromIpv4, ipv4FromGid, pickHostGidIndex } from '../../vmm-device/rdma/index.ts';
import { TestGuest, type GuestCq, type GuestMr, type GuestQp } from '../rdma/guest.ts';
import { INLINE_FEATURES, createInlineQp, writeInline } from '../rdma/inline-guest.ts';
import { RXE_DEVICE, pattern, requireTestHost } from './fixture/harness.ts';
import { hostObjectsOf, NO_HOST_OBJECTS } from '../driver/rxe-helpers.ts';

requireTestHost();
const S = QpAttrMask;
const MR_BYTES = 16 * 1024;
const ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE;
const IP_A = '192.168.7.1';
const IP_B = '192.168.7.2';

interface Vm {
  g: TestGuest;
  cq: GuestCq;
  qp: GuestQp;
  mr?: GuestMr;
}

async function hostIp(verbs: NativeVerbs): Promise<string> {
  const dev = await verbs.openDevice(RXE_DEVICE);
  try {
    const table = await verbs.queryGidTable(dev);
    return ipv4FromGid(table.find((g) => g.index === pickHostGidIndex(table, RXE_DEVICE))!.gid)!;
  } finally {
    await verbs.closeDevice(dev);
  }
}

async function ok(p: Promise<{ status: number; detail: number }>, what: string): Promise<void> {
  const a = await p;
  if (a.status !== Status.OK) throw new Error(`${what}: status ${a.status} detail ${a.detail}`);
}

async function connectRc(self: Vm, peer: Vm, peerIp: string): Promise<void> {
  const g = self.g;
  await ok(g.modifyQp(self.qp.handle, S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, { qp_state: 1, port_num: 1, qp_access_flags: ACCESS }), 'INIT');
  await ok(
    g.modifyQp(self.qp.handle, S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER, {
      qp_state: 2, path_mtu: 3, dest_qp_num: peer.qp.qpn, rq_psn: 0, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, dgid: gidFromIpv4(peerIp),
    }),
    'RTR',
  );
  await ok(
    g.modifyQp(self.qp.handle, S.STATE | S.SQ_PSN | S.TIMEOUT | S.RETRY_CNT | S.RNR_RETRY | S.MAX_QP_RD_ATOMIC, {
      qp_state: 3, sq_psn: 0, timeout: 14, retry_cnt: 7, rnr_retry: 7, max_rd_atomic: 1,
    }),
    'RTS',
  );
}

const closed = new WeakSet<TestGuest>();
async function closeOnce(g: TestGuest): Promise<void> {
  if (closed.has(g)) return;
  closed.add(g);
  await g.device.close();
}

async function twoVms(t: Test): Promise<[Vm, Vm]> {
  const verbs = new NativeVerbs();
  const host = await hostIp(verbs);
  const resolver = new StaticAddressResolver([
    { vmId: 'vm-a', vpc: 'blue', virtualIp: IP_A, hostIp: host },
    { vmId: 'vm-b', vpc: 'blue', virtualIp: IP_B, hostIp: host },
  ]);
  const vms: Vm[] = [];
  for (const [vmId, seed] of [
    ['vm-a', 1],
    ['vm-b', 2],
  ] as const) {
    const g = await TestGuest.open({ verbs, hostDevice: RXE_DEVICE, vmId, resolver, seed, memfdRam: true, features: INLINE_FEATURES });
    t.teardown(() => closeOnce(g));
    t.equal(g.device.config.max_inline_data, 64, `${vmId}: rxe takes 64 inline bytes, the configuration offers them`);
    t.ok(g.device.hasFeature(FeatureBit.INLINE), `${vmId}: INLINE negotiated`);
    const pd = await g.createPd();
    const cq = await g.createCq(32);
    const { qp, maxInlineData } = await createInlineQp(g, pd, cq, 64);
    t.equal(maxInlineData, 64, `${vmId}: QP with max_inline_data 64`);
    // Only B registers memory: A's inline data lives in its WQEs.
    const mr = vmId === 'vm-b' ? await g.regMr(pd, MR_BYTES, ACCESS, 0x5500_1234_0000n) : undefined;
    vms.push({ g, cq, qp, ...(mr !== undefined ? { mr } : {}) });
  }
  return vms as [Vm, Vm];
}

t.test('inline SEND and RDMA WRITE between two VMs through the device on rxe0, byte for byte', async (t) => {
  const [a, b] = await twoVms(t);
  const mr = b.mr!;
  await connectRc(a, b, IP_B);
  await connectRc(b, a, IP_A);
  const sentinel = new Uint8Array(MR_BYTES).fill(0x5a);
  b.g.mem.write(mr.gpa, sentinel);
  const region = (off: number, len: number) => Buffer.from(b.g.mem.read(mr.gpa + off, len));

  // SEND_WITH_IMM of 64 bytes, then SEND of 5 bytes, into two receives at B's offsets 0 and 1024.
  const s1 = pattern(64, 11);
  const s2 = pattern(5, 12);
  b.qp.writeRecv(0xb0n, [{ addr: mr.iova, length: 256, lkey: mr.lkey }]);
  b.qp.writeRecv(0xb1n, [{ addr: mr.iova + 1024n, length: 256, lkey: mr.lkey }]);
  await b.g.ring([{ handle: b.qp.handle, type: DoorbellType.RQ }]);
  writeInline(a.qp, { wrId: 0xa0n, opcode: SendOpcode.SEND_WITH_IMM, data: s1, imm: 0xfeed_f00d });
  writeInline(a.qp, { wrId: 0xa1n, opcode: SendOpcode.SEND, data: s2 });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const sends = await a.cq.waitFor(2);
  t.same(sends.map((c) => [c.wr_id, c.status, c.opcode]), [
    [0xa0n, WcStatus.SUCCESS, WcOpcode.SEND],
    [0xa1n, WcStatus.SUCCESS, WcOpcode.SEND],
  ], 'send completions');
  const recvs = await b.cq.waitFor(2);
  t.same(recvs.map((c) => [c.wr_id, c.status, c.opcode, c.byte_len]), [
    [0xb0n, WcStatus.SUCCESS, WcOpcode.RECV, 64],
    [0xb1n, WcStatus.SUCCESS, WcOpcode.RECV, 5],
  ], 'receive completions with the inline lengths');
  t.same([recvs[0]!.imm_data, recvs[0]!.wc_flags & WcFlag.WITH_IMM], [0xfeed_f00d, WcFlag.WITH_IMM], 'the immediate');
  t.same(region(0, 64), Buffer.from(s1), 'SEND_WITH_IMM: 64 bytes verified');
  t.same(region(64, 960), Buffer.from(sentinel.subarray(64, 1024)), 'nothing written past them');
  t.same(region(1024, 5), Buffer.from(s2), 'SEND: 5 bytes verified');
  t.same(region(1029, 3), Buffer.from([0x5a, 0x5a, 0x5a]), 'nothing written past them');

  // RDMA WRITE of 48 bytes to B's offset 8192, and RDMA WRITE_WITH_IMM of 64 bytes to 8448 (consumes a receive).
  const w1 = pattern(48, 13);
  const w2 = pattern(64, 14);
  b.qp.writeRecv(0xb2n, []);
  await b.g.ring([{ handle: b.qp.handle, type: DoorbellType.RQ }]);
  writeInline(a.qp, { wrId: 0xa2n, opcode: SendOpcode.RDMA_WRITE, data: w1, remoteAddr: mr.iova + 8192n, rkey: mr.rkey });
  writeInline(a.qp, { wrId: 0xa3n, opcode: SendOpcode.RDMA_WRITE_WITH_IMM, data: w2, remoteAddr: mr.iova + 8448n, rkey: mr.rkey, imm: 77 });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const writes = await a.cq.waitFor(2);
  t.same(writes.map((c) => [c.wr_id, c.status, c.opcode]), [
    [0xa2n, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
    [0xa3n, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
  ], 'write completions');
  const [wi] = await b.cq.waitFor(1);
  t.same([wi!.wr_id, wi!.status, wi!.opcode, wi!.imm_data], [0xb2n, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, 77], 'WRITE_WITH_IMM consumed the receive');
  t.same(region(8192, 48), Buffer.from(w1), 'WRITE: 48 bytes verified');
  t.same(region(8240, 208), Buffer.from(sentinel.subarray(8240, 8448)), 'nothing written between');
  t.same(region(8448, 64), Buffer.from(w2), 'WRITE_WITH_IMM: 64 bytes verified');
  t.same(region(8512, 64), Buffer.from(sentinel.subarray(8512, 8576)), 'nothing written past');

  for (const vm of [a, b]) {
    await ok(vm.g.destroy(Command.DESTROY_QP, vm.qp.handle), 'DESTROY_QP');
    if (vm.mr !== undefined) await ok(vm.g.destroy(Command.DEREG_MR, vm.mr.handle), 'DEREG_MR');
    await ok(vm.g.destroy(Command.DESTROY_CQ, vm.cq.handle), 'DESTROY_CQ');
  }
  for (const vm of [a, b]) await closeOnce(vm.g);
  t.same(hostObjectsOf(process.pid), NO_HOST_OBJECTS, 'rdma resource show: nothing of the VMs left');
});
