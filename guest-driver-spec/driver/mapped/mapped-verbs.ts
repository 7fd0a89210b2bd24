// CREATE_CQ and CREATE_QP with MAP (spec section 13.3): the requests carry no ring, the responses say where the host
// queues are; the driver checks every mapping and the header behind it before it uses a byte, and destroys an
// object whose mapping it cannot use. Also the response layouts of relayed CQs and QPs once the feature is on.

import {
  Command,
  CreateCqMappedResponse,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpMappedResponse,
  CreateQpRequest,
  CreateQpResponse,
  DestroyQpResponse,
  Empty,
  FeatureBit,
  HandleRequest,
  Limits,
  MapFlag,
  MappingLimits,
  QpType,
  QueueMapping,
} from '../../../vmm-device/abi/rdma/index.ts';
import type { ResponseLayout, VirtioRdmaDriver } from '../driver.ts';
import { ProtocolError, UsageError } from '../errors.ts';
import type { QpCaps } from '../qp-base.ts';
import { MappedCq } from './mapped-cq.ts';
import { MappedQp } from './mapped-qp.ts';
import { RXE_SGE_SIZE, RxeRecvWqe, RxeSendWqe } from './rxe-abi.ts';
import { RxeQueue, sharedWindow } from './rxe-queue.ts';

type CqResponse = ReturnType<typeof CreateCqResponse.decode>;
type QpResponse = ReturnType<typeof CreateQpResponse.decode>;

/** CREATE_CQ's response layout for this driver: the mapped body (13.3) whenever HOST_QUEUE_MAPPING is on. */
export function cqResponseLayout(driver: VirtioRdmaDriver): ResponseLayout<CqResponse> {
  if (!driver.has(FeatureBit.HOST_QUEUE_MAPPING)) return CreateCqResponse;
  return { size: CreateCqMappedResponse.size, decode: (b, o) => CreateCqResponse.decode(CreateCqMappedResponse.decode(b, o).cq) };
}

/** CREATE_QP's response layout for this driver (as cqResponseLayout). */
export function qpResponseLayout(driver: VirtioRdmaDriver): ResponseLayout<QpResponse> {
  if (!driver.has(FeatureBit.HOST_QUEUE_MAPPING)) return CreateQpResponse;
  return { size: CreateQpMappedResponse.size, decode: (b, o) => CreateQpResponse.decode(CreateQpMappedResponse.decode(b, o).qp) };
}

function requireMapping(driver: VirtioRdmaDriver): void {
  if (!driver.has(FeatureBit.HOST_QUEUE_MAPPING) || driver.mapping === undefined) {
    throw new UsageError('HOST_QUEUE_MAPPING is not negotiated: mapped CQs and QPs are not available (section 13.2)');
  }
}

/** Undoes a created object whose mapping the driver refuses; the refusal is what the caller sees. */
async function undo(driver: VirtioRdmaDriver, command: number, handle: number, e: unknown): Promise<never> {
  await driver.command(command, HandleRequest.encode({ handle }), [], command === Command.DESTROY_QP ? DestroyQpResponse : Empty).catch(() => undefined);
  throw e;
}

/** CREATE_CQ with MAP: a CQ of `cqeCount` entries (a power of two) that the host fills and the guest polls. */
export async function createMappedCq(driver: VirtioRdmaDriver, cqeCount: number): Promise<MappedCq> {
  requireMapping(driver);
  const body = CreateCqRequest.encode({ cqe_count: cqeCount, page_shift: Limits.MIN_PAGE_SHIFT, num_pages: 0, map_flags: MapFlag.MAP, index_gpa: 0n });
  const r = await driver.command(Command.CREATE_CQ, body, [], CreateCqMappedResponse);
  const cq = CreateCqResponse.decode(r.cq);
  try {
    if (r.mapped !== 1) throw new ProtocolError(`CREATE_CQ with MAP: CQ ${cq.cq_handle} answered with mapped ${r.mapped}`);
    if (cq.cqe_count !== cqeCount) throw new ProtocolError(`CREATE_CQ: depth ${cq.cqe_count} in effect, ${cqeCount} asked`);
    const q = await RxeQueue.open(driver.transport, QueueMapping.decode(r.queue), cqeCount + 1, MappingLimits.RXE_CQE_SLOT_SIZE, `CQ ${cq.cq_handle}`);
    return new MappedCq(driver, cq.cq_handle, cqeCount, q, await q.loadProducer());
  } catch (e) {
    return undo(driver, Command.DESTROY_CQ, cq.cq_handle, e);
  }
}

export interface MappedQpOptions {
  pd: { readonly handle: number };
  sendCq: MappedCq;
  recvCq: MappedCq;
  caps: QpCaps;
  sqSigAll?: boolean;
}

/** CREATE_QP with MAP: an RC QP whose host SQ and RQ the guest writes (13.3); its CQs are mapped CQs. */
export async function createMappedQp(driver: VirtioRdmaDriver, o: MappedQpOptions): Promise<MappedQp> {
  requireMapping(driver);
  const caps = o.caps;
  const body = CreateQpRequest.encode({
    pd_handle: o.pd.handle,
    send_cq_handle: o.sendCq.handle,
    recv_cq_handle: o.recvCq.handle,
    qp_type: QpType.RC,
    sq_sig_all: o.sqSigAll ? 1 : 0,
    sq_page_shift: Limits.MIN_PAGE_SHIFT,
    rq_page_shift: Limits.MIN_PAGE_SHIFT,
    max_send_wr: caps.maxSendWr,
    max_recv_wr: caps.maxRecvWr,
    max_send_sge: caps.maxSendSge,
    max_recv_sge: caps.maxRecvSge,
    max_inline_data: caps.maxInlineData,
    sq_num_pages: 0,
    rq_num_pages: 0,
    map_flags: MapFlag.MAP,
    sq_index_gpa: 0n,
    rq_index_gpa: 0n,
  });
  const r = await driver.command(Command.CREATE_QP, body, [], CreateQpMappedResponse);
  const qp = CreateQpResponse.decode(r.qp);
  try {
    if (r.mapped !== 1) throw new ProtocolError(`CREATE_QP with MAP: QP ${qp.qp_handle} answered with mapped ${r.mapped}`);
    const got: QpCaps = { maxSendWr: qp.max_send_wr, maxRecvWr: qp.max_recv_wr, maxSendSge: qp.max_send_sge, maxRecvSge: qp.max_recv_sge, maxInlineData: qp.max_inline_data };
    // The host may round depths up (13.3); it never gives less than asked.
    for (const k of Object.keys(caps) as (keyof QpCaps)[]) {
      if (got[k] < caps[k]) throw new ProtocolError(`CREATE_QP: ${k} ${got[k]} in effect, ${caps[k]} asked`);
    }
    // A slot must hold a WQE with every SGE the QP allows; inline data is bounded by the slot when posted (rxe's
    // own slots also hold max_inline_data bytes, a host that gives less only caps what the guest may inline).
    const sendBytes = RxeSendWqe.DMA_DATA + caps.maxSendSge * RXE_SGE_SIZE;
    const recvBytes = RxeRecvWqe.DMA_SGE + caps.maxRecvSge * RXE_SGE_SIZE;
    const sq = await RxeQueue.open(driver.transport, QueueMapping.decode(r.sq), caps.maxSendWr + 1, sendBytes, `QP ${qp.qp_handle} SQ`);
    const rq = await RxeQueue.open(driver.transport, QueueMapping.decode(r.rq), caps.maxRecvWr + 1, recvBytes, `QP ${qp.qp_handle} RQ`);
    if (r.doorbell_offset % BigInt(MappingLimits.DOORBELL_SLOT_SIZE) !== 0n) throw new ProtocolError(`CREATE_QP: doorbell_offset ${r.doorbell_offset} not a multiple of 8`);
    const dbWindow = await sharedWindow(driver.transport, r.doorbell_shmid);
    if (r.doorbell_offset + BigInt(MappingLimits.DOORBELL_SLOT_SIZE) > dbWindow.size) throw new ProtocolError(`CREATE_QP: doorbell slot ${r.doorbell_offset} outside region ${r.doorbell_shmid}`);
    const mapping = driver.mapping!;
    const m = new MappedQp(
      driver,
      qp.qp_handle,
      qp.qp_num,
      got,
      o.pd,
      o.sendCq,
      o.recvCq,
      sq,
      rq,
      { window: dbWindow, offset: r.doorbell_offset, mode: mapping.doorbellMode, notifyQueue: mapping.notifyQueue },
      { sq: await sq.loadProducer(), rq: await rq.loadProducer() },
    );
    o.sendCq.qpHandles.set(m.qpNum, m.handle);
    o.recvCq.qpHandles.set(m.qpNum, m.handle);
    return m;
  } catch (e) {
    return undo(driver, Command.DESTROY_QP, qp.qp_handle, e);
  }
}
