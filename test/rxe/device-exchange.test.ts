// The virtio-rdma device over NativeVerbs on the soft-RoCE test host's rxe0: two device instances (two "VMs", one
// rxe0 as one host RNIC would be shared) created and connected entirely through control commands, then RC
// SEND_WITH_IMM/RECV, RDMA WRITE, RDMA READ, both atomics and a UD SEND between them through the guests' rings and
// doorbells, every byte verified; after each test `rdma resource show` lists nothing of this process.
//
//   bash scripts/rxe/run.sh -- npx tap test/rxe/device-exchange.test.ts

import t from 'tap';
import type { Test } from 'tap';
import {
  AccessFlag,
  Command,
  CreateAhRequest,
  DoorbellType,
  HandleResponse,
  QpAttrMask,
  RegMrRequest,
  RegMrResponse,
  QpType,
  SendFlag,
  SendOpcode,
  Status,
  WcFlag,
  WcOpcode,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { StaticAddressResolver, gidFromIpv4, ipv4FromGid, pickHostGidIndex } from '../../vmm-device/rdma/index.ts';
import { TestGuest, PAGE, type GuestCq, type GuestMr, type GuestQp } from '../rdma/guest.ts';
import { RXE_DEVICE, pattern, requireTestHost } from './fixture/harness.ts';
import { hostObjectsOf, NO_HOST_OBJECTS } from '../driver/rxe-helpers.ts';

requireTestHost();
const S = QpAttrMask;
const MR_BYTES = 64 * 1024;
const ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ | AccessFlag.REMOTE_ATOMIC;
const IP_A = '192.168.7.1';
const IP_B = '192.168.7.2';

interface Vm {
  g: TestGuest;
  pd: number;
  cq: GuestCq;
  qp: GuestQp;
  mr: GuestMr;
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

/** Two VMs on rxe0 sharing one address table (one VPC), each a device instance with its own guest memory. */
async function twoVms(t: Test, qpType: number): Promise<[Vm, Vm]> {
  const verbs = new NativeVerbs();
  const host = await hostIp(verbs);
  const resolver = new StaticAddressResolver([
    { vmId: 'vm-a', vpc: 'blue', virtualIp: IP_A, hostIp: host },
    { vmId: 'vm-b', vpc: 'blue', virtualIp: IP_B, hostIp: host },
  ]);
  const vms: Vm[] = [];
  for (const [vmId, seed, iova] of [
    ['vm-a', 1, 0x7f00_0000_0000n],
    ['vm-b', 2, 0x5500_1234_0000n],
  ] as const) {
    const g = await TestGuest.open({ verbs, hostDevice: RXE_DEVICE, vmId, resolver, seed, memfdRam: true });
    t.teardown(() => closeOnce(g));
    const pd = await g.createPd();
    const cq = await g.createCq(64);
    const qp = await g.createQp(pd, cq, cq, qpType, 32);
    const mr = await g.regMr(pd, MR_BYTES, ACCESS, iova);
    vms.push({ g, pd, cq, qp, mr });
  }
  return vms as [Vm, Vm];
}

const closed = new WeakSet<TestGuest>();
async function closeOnce(g: TestGuest): Promise<void> {
  if (closed.has(g)) return;
  closed.add(g);
  await g.device.close();
}

/**
 * Closes both devices (host device included) and checks the kernel lists nothing of this process. The kernel names
 * an object's owner by the thread that created it (hostObjectsOf counts every thread of this process).
 */
async function closeAndCheck(t: Test, vms: Vm[]): Promise<void> {
  for (const vm of vms) await closeOnce(vm.g);
  t.same(hostObjectsOf(process.pid), NO_HOST_OBJECTS, 'rdma resource show: nothing of the VMs left');
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
      qp_state: 2,
      path_mtu: 3,
      dest_qp_num: peer.qp.qpn,
      rq_psn: 0,
      max_dest_rd_atomic: 4,
      min_rnr_timer: 12,
      hop_limit: 64,
      dgid: gidFromIpv4(peerIp),
    }),
    'RTR',
  );
  await ok(
    g.modifyQp(self.qp.handle, S.STATE | S.SQ_PSN | S.TIMEOUT | S.RETRY_CNT | S.RNR_RETRY | S.MAX_QP_RD_ATOMIC, {
      qp_state: 3,
      sq_psn: 0,
      timeout: 14,
      retry_cnt: 7,
      rnr_retry: 7,
      max_rd_atomic: 4,
    }),
    'RTS',
  );
}

function bytesOf(vm: Vm, offset: number, len: number): Uint8Array {
  return vm.g.mem.read(vm.mr.gpa + offset, len);
}

async function destroyAll(vm: Vm): Promise<void> {
  await ok(vm.g.destroy(Command.DESTROY_QP, vm.qp.handle), 'DESTROY_QP');
  await ok(vm.g.destroy(Command.DEREG_MR, vm.mr.handle), 'DEREG_MR');
  await ok(vm.g.destroy(Command.DESTROY_CQ, vm.cq.handle), 'DESTROY_CQ');
}

t.test('RC between two VMs: SEND_WITH_IMM, RDMA WRITE, RDMA READ, atomics, byte for byte', async (t) => {
  const [a, b] = await twoVms(t, QpType.RC);
  await connectRc(a, b, IP_B);
  await connectRc(b, a, IP_A);

  // SEND_WITH_IMM 4 KiB: B receives into its MR at offset 0.
  const sent = pattern(4096, 1);
  a.g.mem.write(a.mr.gpa, sent);
  b.qp.writeRecv(0xb0n, [{ addr: b.mr.iova, length: 4096, lkey: b.mr.lkey }]);
  await b.g.ring([{ handle: b.qp.handle, type: DoorbellType.RQ }]);
  a.qp.writeSend({ wr_id: 0xa0n, opcode: SendOpcode.SEND_WITH_IMM, flags: SendFlag.SIGNALED, imm_data: 0xdead_beef, sges: [{ addr: a.mr.iova, length: 4096, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [sendCqe] = await a.cq.waitFor(1);
  t.same([sendCqe!.wr_id, sendCqe!.status, sendCqe!.opcode, sendCqe!.qp_handle], [0xa0n, WcStatus.SUCCESS, WcOpcode.SEND, a.qp.handle], 'send completion');
  const [recvCqe] = await b.cq.waitFor(1);
  t.same(
    [recvCqe!.wr_id, recvCqe!.status, recvCqe!.opcode, recvCqe!.byte_len, recvCqe!.imm_data, recvCqe!.wc_flags & WcFlag.WITH_IMM],
    [0xb0n, WcStatus.SUCCESS, WcOpcode.RECV, 4096, 0xdead_beef, WcFlag.WITH_IMM],
    'receive completion with the immediate',
  );
  t.same(Buffer.from(bytesOf(b, 0, 4096)), Buffer.from(sent), 'SEND: 4096 bytes verified');

  // RDMA WRITE 8 KiB from A's MR offset 8192 to B's MR offset 8192.
  const written = pattern(8192, 2);
  a.g.mem.write(a.mr.gpa + 8192, written);
  a.qp.writeSend({ wr_id: 0xa1n, opcode: SendOpcode.RDMA_WRITE, flags: SendFlag.SIGNALED, remote_addr: b.mr.iova + 8192n, rkey: b.mr.rkey, sges: [{ addr: a.mr.iova + 8192n, length: 8192, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [w] = await a.cq.waitFor(1);
  t.same([w!.wr_id, w!.status, w!.opcode], [0xa1n, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE]);
  t.same(Buffer.from(bytesOf(b, 8192, 8192)), Buffer.from(written), 'WRITE: 8192 bytes verified');

  // RDMA READ 12 KiB of B's MR offset 20480 into A's MR offset 20480, in two SGEs.
  const remote = pattern(12288, 3);
  b.g.mem.write(b.mr.gpa + 20480, remote);
  a.qp.writeSend({
    wr_id: 0xa2n,
    opcode: SendOpcode.RDMA_READ,
    flags: SendFlag.SIGNALED,
    remote_addr: b.mr.iova + 20480n,
    rkey: b.mr.rkey,
    sges: [
      { addr: a.mr.iova + 20480n, length: 5000, lkey: a.mr.lkey },
      { addr: a.mr.iova + 25480n, length: 7288, lkey: a.mr.lkey },
    ],
  });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [r] = await a.cq.waitFor(1);
  t.same([r!.wr_id, r!.status, r!.opcode], [0xa2n, WcStatus.SUCCESS, WcOpcode.RDMA_READ]);
  t.same(Buffer.from(bytesOf(a, 20480, 12288)), Buffer.from(remote), 'READ: 12288 bytes verified');

  // Atomics on an 8-byte word of B's MR at offset 40960.
  const word = (vm: Vm, off: number) => new DataView(bytesOf(vm, off, 8).buffer).getBigUint64(0, true);
  const put = (vm: Vm, off: number, v: bigint) => {
    const x = new Uint8Array(8);
    new DataView(x.buffer).setBigUint64(0, v, true);
    vm.g.mem.write(vm.mr.gpa + off, x);
  };
  put(b, 40960, 1000n);
  a.qp.writeSend({ wr_id: 0xa3n, opcode: SendOpcode.ATOMIC_FETCH_AND_ADD, flags: SendFlag.SIGNALED, remote_addr: b.mr.iova + 40960n, rkey: b.mr.rkey, compare_add: 23n, sges: [{ addr: a.mr.iova + 49152n, length: 8, lkey: a.mr.lkey }] });
  a.qp.writeSend({ wr_id: 0xa4n, opcode: SendOpcode.ATOMIC_CMP_AND_SWP, flags: SendFlag.SIGNALED, remote_addr: b.mr.iova + 40960n, rkey: b.mr.rkey, compare_add: 1023n, swap: 77n, sges: [{ addr: a.mr.iova + 49160n, length: 8, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const at = await a.cq.waitFor(2);
  t.same(at.map((c) => [c.wr_id, c.status, c.opcode]), [
    [0xa3n, WcStatus.SUCCESS, WcOpcode.FETCH_ADD],
    [0xa4n, WcStatus.SUCCESS, WcOpcode.COMP_SWAP],
  ]);
  t.equal(word(a, 49152), 1000n, 'FAA returned the old value');
  t.equal(word(a, 49160), 1023n, 'CAS returned the old value');
  t.equal(word(b, 40960), 77n, 'remote word: 1000 + 23, then swapped to 77');

  await destroyAll(a);
  await destroyAll(b);
  await closeAndCheck(t, [a, b]);
});

// A remote access error puts A's QP in ERR through an error completion, whose move to ERR on the host is still
// running when the guest destroys the QP right after: the destroy waits for it (it used to fail with EBUSY,
// leaving the QP and its CQ, and ibv_close_device then failed and the process hung).
t.test('RC remote access error between two VMs, then everything released', async (t) => {
  const [a, b] = await twoVms(t, QpType.RC);
  await connectRc(a, b, IP_B);
  await connectRc(b, a, IP_A);
  // WRITE with a wrong rkey completes with REM_ACCESS_ERR and the QP goes to ERR.
  a.qp.writeSend({ wr_id: 0xa5n, opcode: SendOpcode.RDMA_WRITE, flags: SendFlag.SIGNALED, remote_addr: b.mr.iova, rkey: b.mr.rkey ^ 0x5a00, sges: [{ addr: a.mr.iova, length: 64, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [bad] = await a.cq.waitFor(1);
  t.same([bad!.wr_id, bad!.status], [0xa5n, WcStatus.REM_ACCESS_ERR], 'remote access error from the peer');

  await destroyAll(a);
  await destroyAll(b);
  await closeAndCheck(t, [a, b]);
});

t.test("RDMA WRITE into, and READ from, an MR whose guest pages are scattered and shuffled (one aliased view on the host)", async (t) => {
  const [a, b] = await twoVms(t, QpType.RC);
  await connectRc(a, b, IP_B);
  await connectRc(b, a, IP_A);
  const PAGES = 4;
  const pages: number[] = [];
  for (let i = 0; i < PAGES; i++) {
    pages.push(b.g.allocPages(1));
    b.g.allocPages(1); // a gap: no page follows its list neighbour
  }
  const order = [2, 0, 3, 1].map((i) => pages[i]!);
  const iova = 0x6600_0000_0000n;
  const body = RegMrRequest.encode({ pd_handle: b.pd, access_flags: ACCESS, iova, length: BigInt(PAGES * PAGE), page_shift: 12, total_pages: PAGES, num_pages: PAGES });
  const mr = RegMrResponse.decode(await b.g.ok(Command.REG_MR, body, order.map(BigInt)));
  t.ok(b.g.device.mrs.get(mr.mr_handle)?.alias !== undefined, 'the device registered an aliased view');
  const data = pattern(PAGES * PAGE, 7);
  a.g.mem.write(a.mr.gpa, data);
  a.qp.writeSend({ wr_id: 0xc1n, opcode: SendOpcode.RDMA_WRITE, flags: SendFlag.SIGNALED, remote_addr: iova, rkey: mr.rkey, sges: [{ addr: a.mr.iova, length: PAGES * PAGE, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [w] = await a.cq.waitFor(1);
  t.same([w!.wr_id, w!.status], [0xc1n, WcStatus.SUCCESS], 'WRITE completed');
  for (let i = 0; i < PAGES; i++) {
    t.same(Buffer.from(b.g.mem.read(order[i]!, PAGE)), Buffer.from(data.subarray(i * PAGE, (i + 1) * PAGE)), `guest page ${i} of the list holds bytes ${i * PAGE}..`);
  }
  // READ it back into A at offset 32 KiB.
  a.qp.writeSend({ wr_id: 0xc2n, opcode: SendOpcode.RDMA_READ, flags: SendFlag.SIGNALED, remote_addr: iova + 100n, rkey: mr.rkey, sges: [{ addr: a.mr.iova + 32768n, length: PAGES * PAGE - 100, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [r] = await a.cq.waitFor(1);
  t.same([r!.wr_id, r!.status], [0xc2n, WcStatus.SUCCESS], 'READ completed');
  t.same(Buffer.from(bytesOf(a, 32768, PAGES * PAGE - 100)), Buffer.from(data.subarray(100)), 'READ across the scattered pages, byte for byte');
  await ok(b.g.destroy(Command.DEREG_MR, mr.mr_handle), 'DEREG_MR of the scattered MR');
  await destroyAll(a);
  await destroyAll(b);
  await closeAndCheck(t, [a, b]);
});

t.test('UD between two VMs: AH to the virtual GID, routing header shows virtual addresses only', async (t) => {
  const [a, b] = await twoVms(t, QpType.UD);
  for (const vm of [a, b]) {
    await ok(vm.g.modifyQp(vm.qp.handle, S.STATE | S.PKEY_INDEX | S.PORT | S.QKEY, { qp_state: 1, port_num: 1, qkey: 0x1234 }), 'UD INIT');
    await ok(vm.g.modifyQp(vm.qp.handle, S.STATE, { qp_state: 2 }), 'UD RTR');
    await ok(vm.g.modifyQp(vm.qp.handle, S.STATE | S.SQ_PSN, { qp_state: 3 }), 'UD RTS');
  }
  const ah = HandleResponse.decode(
    await a.g.ok(Command.CREATE_AH, CreateAhRequest.encode({ pd_handle: a.pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid: gidFromIpv4(IP_B) })),
  ).handle;
  const payload = pattern(512, 9);
  a.g.mem.write(a.mr.gpa, payload);
  b.qp.writeRecv(0xbbn, [{ addr: b.mr.iova, length: 40 + 1024, lkey: b.mr.lkey }]);
  await b.g.ring([{ handle: b.qp.handle, type: DoorbellType.RQ }]);
  a.qp.writeSend({ wr_id: 0xaan, opcode: SendOpcode.SEND, flags: SendFlag.SIGNALED, ah_handle: ah, remote_qpn: b.qp.qpn, remote_qkey: 0x1234, sges: [{ addr: a.mr.iova, length: 512, lkey: a.mr.lkey }] });
  await a.g.ring([{ handle: a.qp.handle, type: DoorbellType.SQ }]);
  const [s] = await a.cq.waitFor(1);
  t.same([s!.wr_id, s!.status], [0xaan, WcStatus.SUCCESS]);
  const [r] = await b.cq.waitFor(1);
  t.same([r!.wr_id, r!.status, r!.byte_len, r!.src_qp, r!.wc_flags & WcFlag.GRH], [0xbbn, WcStatus.SUCCESS, 40 + 512, a.qp.qpn, WcFlag.GRH]);
  const grh = bytesOf(b, 0, 40);
  t.same([...grh.subarray(32, 36)], [192, 168, 7, 1], 'source: the sender’s virtual IP');
  t.same([...grh.subarray(36, 40)], [192, 168, 7, 2], 'destination: this VM’s virtual IP');
  t.same(Buffer.from(bytesOf(b, 40, 512)), Buffer.from(payload), 'UD payload verified');
  await ok(a.g.destroy(Command.DESTROY_AH, ah), 'DESTROY_AH');
  await destroyAll(a);
  await destroyAll(b);
  await closeAndCheck(t, [a, b]);
});

t.test('device reset with live objects releases everything on the host', async (t) => {
  const [a, b] = await twoVms(t, QpType.RC);
  await connectRc(a, b, IP_B);
  b.qp.writeRecv(1n, [{ addr: b.mr.iova, length: 64, lkey: b.mr.lkey }]);
  await b.g.ring([{ handle: b.qp.handle, type: DoorbellType.RQ }]);
  t.match(hostObjectsOf(process.pid), { qp: 2, cq: 2, mr: 2, pd: 2 }, "both VMs' objects are on the host, attributed to this process");
  for (const vm of [a, b]) {
    vm.g.device.reset();
    await vm.g.device.settled();
  }
  t.same(hostObjectsOf(process.pid), NO_HOST_OBJECTS, 'reset: nothing left before close');
  await closeAndCheck(t, [a, b]);
  void PAGE;
});
