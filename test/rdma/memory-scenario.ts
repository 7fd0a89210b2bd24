// Memory map changes through the real vhost-user session (issue 10's crash as a hostile VMM does it): the
// reference front-end hot-adds a region after DRIVER_OK (ADD_MEM_REG), the guest puts a CQ ring and an MR there,
// then the front-end removes it (REM_MEM_REG: the session calls memoryChanged, then unmaps the memfd mapping) and
// finally replaces the whole table (SET_MEM_TABLE: every region mapped anew). One scenario, run over the verbs test
// double (test/rdma/vhost-user-memory.test.ts) and over NativeVerbs on rxe0 (test/rxe/device-memory-map.test.ts,
// issue 10's Done-when, with `rdma resource show` as the host's count).

import type { Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  AccessFlag,
  Command,
  CqErrorReason,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpRequest,
  CreateQpResponse,
  CtrlResponseHeader,
  Event,
  EventType,
  FeatureBit,
  HandleResponse,
  Limits,
  ModifyQpRequest,
  QpAttr,
  QpAttrMask,
  QpFatalReason,
  RegMrRequest,
  RegMrResponse,
  RecvWqe,
  DoorbellRecord,
  DoorbellType,
  Status,
  encodeRequest,
  encodeSges,
  ringPages,
} from '../../vmm-device/abi/rdma/index.ts';
import { VhostUserFrontend } from '../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { GuestAllocator, SplitRingDriver } from '../../guest-driver-spec/frontend/guest-driver.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { F_VERSION_1, bit } from '../../vmm-device/abi/virtio.ts';
import type { AliasMapper } from '../../vmm-device/memory/alias.ts';
import type { HostVerbs } from '../../vmm-device/verbs/host-verbs.ts';
import { RdmaDevice, type AddressResolver } from '../../vmm-device/rdma/index.ts';
import { qpAttr, waitFor } from './guest.ts';

const host = new SysHost();
const PAGE = 4096;
const VIRTQ_DESC_F_WRITE = 2;

export interface ScenarioHost {
  verbs: HostVerbs;
  hostDevice: string;
  resolver: AddressResolver;
  aliases: AliasMapper;
  /** The host's count of this VM's objects (FakeVerbs' live objects, or `rdma resource show` on rxe0). */
  objects(): { mr: number; qp: number; cq: number; pd: number };
}

export async function memoryMapScenario(t: Test, h: ScenarioHost): Promise<void> {
  const verbs = h;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vu-mem-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'vm.sock');
  const log = new RecordingLogger('test');
  const device = await RdmaDevice.open({ verbs: h.verbs, hostDevice: h.hostDevice, vmId: 'vm-a', resolver: h.resolver, log, aliases: h.aliases });
  const server = new VhostUserServer({ path: sock, host, model: device, log });
  server.listen();
  t.teardown(async () => {
    server.close();
    await device.close();
  });
  const fe = await VhostUserFrontend.connect(host, sock);
  await fe.init({ queues: 3 });
  const ram = new GuestRam(host, [{ gpa: 0, size: 0x80000 }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram, 0);
  const [ctrl, evq, dbq] = [0, 1, 2].map(() => new SplitRingDriver(ram, alloc, 64)) as [SplitRingDriver, SplitRingDriver, SplitRingDriver];
  await fe.start({
    ram,
    features: bit(F_VERSION_1) | (1n << BigInt(FeatureBit.RC)) | (1n << BigInt(FeatureBit.UD)),
    queues: [ctrl, evq, dbq].map((q, index) => ({ index, size: 64, ...q.addrs })),
  });
  await fe.sync();

  let tag = 1n;
  const cmd = async (command: number, body: Uint8Array, pages: bigint[], responseSize: number): Promise<{ status: number; detail: number; body: Uint8Array }> => {
    const { responseAddr } = ctrl.post(alloc, encodeRequest(command, tag++, body, pages), 16 + responseSize);
    fe.kick(0);
    await waitFor(() => (ctrl.readUsed().length > 0 ? true : undefined), `answer to command ${command}`);
    const bytes = new Uint8Array(16 + responseSize);
    ram.memory.read(responseAddr, bytes);
    const h = CtrlResponseHeader.decode(bytes);
    return { status: h.status, detail: h.detail, body: bytes.subarray(16) };
  };
  const ok = async (command: number, body: Uint8Array, pages: bigint[], responseSize: number): Promise<Uint8Array> => {
    const a = await cmd(command, body, pages, responseSize);
    if (a.status !== Status.OK) throw new Error(`command ${command}: status ${a.status} detail ${a.detail}`);
    return a.body;
  };
  const pagesAt = (a: GuestAllocator, n: number): number => a.alloc(n * PAGE, PAGE);
  const events: ReturnType<typeof Event.decode>[] = [];
  const eventBufs = new Map<number, number>();
  let evDesc = 0;
  const postEventBuffers = (n: number): void => {
    for (let i = 0; i < n; i++) {
      const at = alloc.alloc(Limits.EVENT_SIZE, 8);
      const d = evDesc++ % 64;
      eventBufs.set(d, at);
      evq.writeDescriptor(d, at, Limits.EVENT_SIZE, VIRTQ_DESC_F_WRITE, 0);
      evq.publish(d);
    }
    fe.kick(1);
  };
  const readEvents = async (n: number): Promise<void> => {
    await waitFor(() => {
      for (const u of evq.readUsed()) events.push(Event.decode(readEv(eventBufs.get(u.id)!)));
      return events.length >= n ? true : undefined;
    }, `${n} events`);
  };
  const readEv = (gpa: number): Uint8Array => {
    const b = new Uint8Array(Limits.EVENT_SIZE);
    ram.memory.read(gpa, b);
    return b;
  };

  // Hot-add a region after DRIVER_OK and place a CQ ring and an MR in it.
  const extraRegion = ram.add({ gpa: 0x100000, size: 0x40000 });
  await fe.addMemReg(extraRegion);
  const extra = new GuestAllocator(ram, 1);
  const pd = HandleResponse.decode(await ok(Command.CREATE_PD, new Uint8Array(0), [], HandleResponse.size)).handle;
  const cqPages = ringPages(16, Limits.CQE_SIZE, 12);
  const cqRing = pagesAt(extra, cqPages);
  const cqIndex = pagesAt(extra, 1);
  const cqBody = CreateCqRequest.encode({ cqe_count: 16, page_shift: 12, num_pages: cqPages, index_gpa: BigInt(cqIndex) });
  const cq = CreateCqResponse.decode(await ok(Command.CREATE_CQ, cqBody, Array.from({ length: cqPages }, (_, i) => BigInt(cqRing + i * PAGE)), CreateCqResponse.size)).cq_handle;
  const mrGpa = pagesAt(extra, 1);
  const mrBody = RegMrRequest.encode({ pd_handle: pd, access_flags: AccessFlag.LOCAL_WRITE, iova: 0x7000_0000n, length: BigInt(PAGE), page_shift: 12, total_pages: 1, num_pages: 1 });
  const mr = RegMrResponse.decode(await ok(Command.REG_MR, mrBody, [BigInt(mrGpa)], RegMrResponse.size));
  // A QP (rings in the first region) on that CQ, in INIT with one receive the host holds.
  const qpRings = { sq: pagesAt(alloc, ringPages(16, Limits.SQ_WQE_SIZE, 12)), rq: pagesAt(alloc, ringPages(16, Limits.RQ_WQE_SIZE, 12)), idx: pagesAt(alloc, 1) };
  const qpBody = CreateQpRequest.encode({
    pd_handle: pd, send_cq_handle: cq, recv_cq_handle: cq, qp_type: 2, sq_sig_all: 0, sq_page_shift: 12, rq_page_shift: 12,
    max_send_wr: 16, max_recv_wr: 16, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0,
    sq_num_pages: ringPages(16, Limits.SQ_WQE_SIZE, 12), rq_num_pages: ringPages(16, Limits.RQ_WQE_SIZE, 12),
    sq_index_gpa: BigInt(qpRings.idx), rq_index_gpa: BigInt(qpRings.idx + 64),
  });
  const qpPages = [
    ...Array.from({ length: ringPages(16, Limits.SQ_WQE_SIZE, 12) }, (_, i) => BigInt(qpRings.sq + i * PAGE)),
    ...Array.from({ length: ringPages(16, Limits.RQ_WQE_SIZE, 12) }, (_, i) => BigInt(qpRings.rq + i * PAGE)),
  ];
  const qp = CreateQpResponse.decode(await ok(Command.CREATE_QP, qpBody, qpPages, CreateQpResponse.size)).qp_handle;
  const S = QpAttrMask;
  await ok(Command.MODIFY_QP, ModifyQpRequest.encode({ qp_handle: qp, attr_mask: S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, attr: QpAttr.encode(qpAttr({ qp_state: 1, port_num: 1, qp_access_flags: 1 })) }), [], 0);
  ram.memory.write(qpRings.rq, RecvWqe.encode({ wr_id: 77n, num_sge: 1, sges: encodeSges([{ addr: 0x7000_0000n, length: 64, lkey: mr.lkey }], Limits.RQ_WQE_MAX_SGE) }));
  ram.memory.write(qpRings.idx + 64, new Uint8Array([1, 0, 0, 0]));
  const rec = DoorbellRecord.encode({ handle: qp, type: DoorbellType.RQ });
  const recAt = alloc.alloc(8, 8);
  ram.memory.write(recAt, rec);
  dbq.writeDescriptor(0, recAt, 8, 0, 0);
  dbq.publish(0);
  fe.kick(2);
  await waitFor(() => (dbq.readUsed().length > 0 ? true : undefined), 'doorbell returned');
  t.equal(verbs.objects().mr, 1);

  // REM_MEM_REG of the region holding the CQ ring and the MR.
  await fe.remMemReg(extraRegion);
  await device.settled();
  postEventBuffers(8);
  await readEvents(2);
  t.same(
    events.map((e) => [e.type, e.handle, e.detail]),
    [
      [EventType.CQ_ERROR, cq, CqErrorReason.RING_UNREADABLE],
      [EventType.QP_FATAL, qp, QpFatalReason.RING_UNREADABLE],
    ],
    'CQ_ERROR and QP_FATAL RING_UNREADABLE',
  );
  t.equal(verbs.objects().mr, 0, 'the MR over the removed region is deregistered on the host');
  t.equal(device.counters.deviceFailures, 0, 'no failure on the event loop (the host flush completion came after the unmap)');
  t.equal(device.isActive, true, 'the device keeps serving');

  // The VM's other objects keep working: a new PD, an MR in the first region, a QP in INIT.
  const pd2 = HandleResponse.decode(await ok(Command.CREATE_PD, new Uint8Array(0), [], HandleResponse.size)).handle;
  const mr2Gpa = pagesAt(alloc, 1);
  const mr2 = RegMrResponse.decode(await ok(Command.REG_MR, RegMrRequest.encode({ pd_handle: pd2, access_flags: 1, iova: 0x8000_0000n, length: BigInt(PAGE), page_shift: 12, total_pages: 1, num_pages: 1 }), [BigInt(mr2Gpa)], RegMrResponse.size));
  t.not(mr2.lkey, 0);
  t.equal(verbs.objects().mr, 1);

  // SET_MEM_TABLE with the first region alone: every mapping is new, so the MR there is deregistered too; rings in
  // it (the virtqueues, the QP's) continue.
  await fe.setMemTable([ram.regions[0]!]);
  await device.settled();
  t.equal(verbs.objects().mr, 0, 'the MR over the replaced mapping is deregistered');
  t.equal((await cmd(Command.DEREG_MR, HandleResponse.encode({ handle: mr2.mr_handle }), [], 0)).status, Status.OK, 'control queue still served, DEREG_MR of the lost MR');
  t.equal((await cmd(Command.DESTROY_QP, HandleResponse.encode({ handle: qp }), [], 16)).status, Status.OK);
  t.equal((await cmd(Command.DESTROY_CQ, HandleResponse.encode({ handle: cq }), [], 0)).status, Status.OK);
  t.equal(device.counters.deviceFailures, 0);
  fe.close();
  await waitFor(() => (verbs.objects().pd === 0 ? true : undefined), 'VM released after the front-end left');
  await device.settled();
  t.same(verbs.objects(), { qp: 0, cq: 0, mr: 0, pd: 0 }, 'nothing left on the host');
}
