// CREATE_CQ and CREATE_QP with MAP (spec 13.3), and the mapped response bodies every CREATE_CQ and CREATE_QP gets
// once HOST_QUEUE_MAPPING is negotiated. The checks run in the order section 13.3 lists; after any refusal the
// device holds nothing of the request (no host object, no mapping, no reserved range or slot).
//
// Creation: reserve (max_mapped_queues, ranges, doorbell slot) -> host object -> (QP) the doorbell engine and its
// pages -> map the queues (all at once) and wait for the transport -> attach the doorbell -> answer. Each failure undoes what the
// steps before it did, in reverse order, unmapping before destroying.

import {
  CreateCqMappedResponse,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpMappedResponse,
  CreateQpRequest,
  CreateQpResponse,
  Limits,
  MappingLimits,
  QueueMapping,
  QpState,
  ResourceKind,
  isPowerOfTwo,
} from '../../abi/rdma/index.ts';
import type { HostQueueBuffer, MappedCqHandle, MappedQpHandle } from '../../verbs/host-verbs.ts';
import { fail, ResetDuringRequest } from '../commands/errors.ts';
import type { CommandContext } from '../commands/context.ts';
import { ArmState, GuestRing, type Cq, type MappedQueue, type Pd, type Qp } from '../objects.ts';
import { DoorbellSetupError, type MappingManager, type Reservation } from './manager.ts';
import { REGION_SHMID, RXE_CQ_ELEM, rxeQueueBytes, rxeRecvElem, rxeSendElem } from './plan.ts';

type CqRequest = ReturnType<typeof CreateCqRequest.decode>;
type QpRequest = ReturnType<typeof CreateQpRequest.decode>;

/** A placeholder ring for a mapped object: no pages, never read (the relay and the memory-map re-check skip it). */
function noRing(depth: number, entrySize: number): GuestRing {
  return new GuestRing(depth, entrySize, 12, [], 0);
}

function queueMapping(ctx: CommandContext, q: MappedQueue | undefined, buf: HostQueueBuffer | undefined): Uint8Array {
  if (q === undefined || buf === undefined) return new Uint8Array(QueueMapping.size);
  return QueueMapping.encode({ offset: q.offset, size: buf.size, num_slots: buf.numSlots, slot_size: buf.slotSize, shmid: REGION_SHMID, format: ctx.config.host_queue_format ?? 0 });
}

/** CREATE_CQ's body with HOST_QUEUE_MAPPING negotiated (mapped or relayed CQ). */
export function cqMappedBody(ctx: CommandContext, cq: Cq, cqeCount: number): Uint8Array {
  const host = cq.mapped !== undefined ? (cq.host as MappedCqHandle).queue : undefined;
  return CreateCqMappedResponse.encode({
    cq: CreateCqResponse.encode({ cq_handle: cq.handle, cqe_count: cqeCount }),
    queue: queueMapping(ctx, cq.mapped, host),
    mapped: cq.mapped !== undefined ? 1 : 0,
  });
}

/** CREATE_QP's body with HOST_QUEUE_MAPPING negotiated (mapped or relayed QP). */
export function qpMappedBody(ctx: CommandContext, qp: Qp, v1: Uint8Array): Uint8Array {
  const m = qp.mapped;
  const host = m !== undefined ? (qp.host as MappedQpHandle) : undefined;
  return CreateQpMappedResponse.encode({
    qp: v1,
    sq: queueMapping(ctx, m?.sq, host?.sq),
    rq: queueMapping(ctx, m?.rq, host?.rq),
    doorbell_offset: m?.slot !== undefined ? BigInt(m.slot * MappingLimits.DOORBELL_SLOT_SIZE) : 0n,
    doorbell_shmid: REGION_SHMID,
    mapped: m !== undefined ? 1 : 0,
  });
}

function manager(ctx: CommandContext): MappingManager {
  const m = ctx.mapping;
  if (m === undefined) fail('DEVICE_ERROR'); // negotiated without a plan cannot happen: acceptFeatures refuses it
  return m;
}

/** CREATE_CQ with MAP, after `cqe_count` and `map_flags` were checked (spec 13.3). */
export async function createMappedCq(ctx: CommandContext, r: CqRequest): Promise<Uint8Array> {
  const o = (f: string): number => CreateCqRequest.offsetOf(f);
  if (r.num_pages !== 0) fail('INVALID_ARGUMENT', o('num_pages'));
  if (r.index_gpa !== 0n) fail('INVALID_ARGUMENT', o('index_gpa'));
  if (ctx.cqs.full) fail('NO_RESOURCES', ResourceKind.CQ);
  const m = manager(ctx);
  const res = m.reserve([rxeQueueBytes(r.cqe_count, RXE_CQ_ELEM)], false);
  if (res === undefined) fail('NO_RESOURCES', ResourceKind.MAPPING);
  const gen = ctx.generation;
  let cq: Cq | undefined;
  const onCompletionEvent = ctx.cqEventHandler(() => cq);
  let host: MappedCqHandle;
  try {
    host = await ctx.hostCall(() => ctx.verbs.createMappedCq(ctx.hostDevice, r.cqe_count, { onCompletionEvent }));
  } catch (e) {
    m.unreserve(res);
    throw e;
  }
  const destroy = () => ctx.verbs.destroyCq(host);
  ctx.checkGeneration(gen, destroy);
  const [q] = await mapAll(ctx, m, res, [host.queue], gen, destroy);
  cq = { handle: 0, host, ring: noRing(r.cqe_count, Limits.CQE_SIZE), producer: 0, arm: ArmState.DISARMED, error: false, qps: new Set(), destroyed: false, mapped: q! };
  cq.handle = ctx.cqs.add(cq);
  ctx.data.addCq(cq);
  return cqMappedBody(ctx, cq, r.cqe_count);
}

/**
 * Maps each buffer at its reserved range, all at once, and waits for every confirmation. On a refusal of any
 * (DEVICE_ERROR) or a reset meanwhile, unmaps what was mapped, then destroys the host object, then gives the
 * reservation back.
 */
async function mapAll(
  ctx: CommandContext,
  m: MappingManager,
  res: Reservation,
  bufs: readonly HostQueueBuffer[],
  gen: number,
  destroy: () => Promise<void>,
  setup?: () => Promise<void>,
): Promise<MappedQueue[]> {
  const done: MappedQueue[] = [];
  const undo = async (): Promise<void> => {
    for (const q of done) await m.unmap(q);
    await destroy();
  };
  const refuse = async (status: 'NO_RESOURCES' | 'DEVICE_ERROR', detail: number): Promise<never> => {
    if (gen !== ctx.generation) {
      ctx.release(undo());
      throw new ResetDuringRequest();
    }
    await ctx.destroyHost(undo);
    m.unreserve(res);
    fail(status, detail);
  };
  for (let i = 0; i < bufs.length; i++) {
    if (!m.fit(res, i, bufs[i]!.size)) await refuse('NO_RESOURCES', ResourceKind.MAPPING);
  }
  if (setup !== undefined) {
    try {
      await setup();
    } catch (e) {
      if (!(e instanceof DoorbellSetupError)) throw e;
      if (e.by === 'host') ctx.counters.hostErrors++;
      await (e.by === 'host' ? refuse('NO_RESOURCES', ResourceKind.HOST) : refuse('DEVICE_ERROR', 0));
    }
  }
  // Every queue's map at once: the transport sends them as one batch (SHMEM_MAP: one wake-up of the VMM for all).
  const maps = await Promise.allSettled(bufs.map((buf, i) => m.map(res.ranges[i]!, buf)));
  for (const r of maps) if (r.status === 'fulfilled') done.push(r.value);
  if (done.length < bufs.length) await refuse('DEVICE_ERROR', 0);
  if (gen !== ctx.generation) await refuse('DEVICE_ERROR', 0); // answers nobody: ResetDuringRequest
  return done;
}

/** CREATE_QP with MAP, after `qp_type` and `map_flags` were checked and UD refused (spec 13.3). */
export async function createMappedQp(ctx: CommandContext, r: QpRequest): Promise<Uint8Array> {
  const o = (f: string): number => CreateQpRequest.offsetOf(f);
  const c = ctx.config;
  const pd: Pd | undefined = ctx.pds.get(r.pd_handle);
  if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
  const sendCq = ctx.cqs.get(r.send_cq_handle);
  if (sendCq === undefined) fail('INVALID_HANDLE', o('send_cq_handle'));
  const recvCq = ctx.cqs.get(r.recv_cq_handle);
  if (recvCq === undefined) fail('INVALID_HANDLE', o('recv_cq_handle'));
  if (sendCq.error) fail('WRONG_STATE', o('send_cq_handle'));
  if (recvCq.error) fail('WRONG_STATE', o('recv_cq_handle'));
  if (sendCq.mapped === undefined) fail('INVALID_ARGUMENT', o('send_cq_handle'));
  if (recvCq.mapped === undefined) fail('INVALID_ARGUMENT', o('recv_cq_handle'));
  if (r.sq_sig_all > 1) fail('INVALID_ARGUMENT', o('sq_sig_all'));
  if (!isPowerOfTwo(r.max_send_wr) || r.max_send_wr > c.max_qp_wr) fail('INVALID_ARGUMENT', o('max_send_wr'));
  if (!isPowerOfTwo(r.max_recv_wr) || r.max_recv_wr > c.max_qp_wr) fail('INVALID_ARGUMENT', o('max_recv_wr'));
  if (r.max_send_sge > c.max_send_sge) fail('INVALID_ARGUMENT', o('max_send_sge'));
  if (r.max_recv_sge > c.max_recv_sge) fail('INVALID_ARGUMENT', o('max_recv_sge'));
  if (r.max_inline_data > c.max_inline_data) fail('INVALID_ARGUMENT', o('max_inline_data'));
  if (r.sq_num_pages !== 0) fail('INVALID_ARGUMENT', o('sq_num_pages'));
  if (r.rq_num_pages !== 0) fail('INVALID_ARGUMENT', o('rq_num_pages'));
  if (r.sq_index_gpa !== 0n) fail('INVALID_ARGUMENT', o('sq_index_gpa'));
  if (r.rq_index_gpa !== 0n) fail('INVALID_ARGUMENT', o('rq_index_gpa'));
  if (ctx.qps.full) fail('NO_RESOURCES', ResourceKind.QP);
  const m = manager(ctx);
  const sendSge = Math.max(1, r.max_send_sge);
  const recvSge = Math.max(1, r.max_recv_sge);
  const res = m.reserve([rxeQueueBytes(r.max_send_wr, rxeSendElem(sendSge, r.max_inline_data)), rxeQueueBytes(r.max_recv_wr, rxeRecvElem(recvSge))], true);
  if (res === undefined) fail('NO_RESOURCES', ResourceKind.MAPPING);
  const gen = ctx.generation;
  let host: MappedQpHandle;
  try {
    host = await ctx.hostCall(() =>
      ctx.verbs.createMappedQp(pd.host, {
        qpType: r.qp_type,
        sendCq: sendCq.host,
        recvCq: recvCq.host,
        // The host writes the completions: the guest's sq_sig_all is the host QP's (no device bookkeeping here).
        sqSigAll: r.sq_sig_all === 1,
        maxSendWr: r.max_send_wr,
        maxRecvWr: r.max_recv_wr,
        maxSendSge: sendSge,
        maxRecvSge: recvSge,
        maxInlineData: r.max_inline_data,
      }),
    );
  } catch (e) {
    m.unreserve(res);
    throw e;
  }
  const destroy = () => ctx.verbs.destroyQp(host);
  ctx.checkGeneration(gen, destroy);
  const [sq, rq] = await mapAll(ctx, m, res, [host.sq, host.rq], gen, destroy, async () => {
    await m.ensureDoorbells();
  });
  if (sendCq.destroyed || recvCq.destroyed || ctx.pds.get(pd.handle) !== pd) {
    // Cannot happen (requests run one at a time), but a QP must never outlive its CQs.
    ctx.release((async () => {
      await m.unmap(sq!);
      await m.unmap(rq!);
      await destroy();
    })());
    fail('DEVICE_ERROR');
  }
  const slot = res.slot!;
  m.attach(slot, host);
  const qp: Qp = {
    handle: 0,
    host,
    pd,
    sendCq,
    recvCq,
    qpType: r.qp_type,
    sqSigAll: r.sq_sig_all === 1,
    maxSendSge: r.max_send_sge,
    maxRecvSge: r.max_recv_sge,
    maxInlineData: r.max_inline_data,
    sq: { ring: noRing(r.max_send_wr, Limits.SQ_WQE_SIZE), consumer: 0, outstanding: [], inHost: 0, nextSeq: 0 },
    rq: { ring: noRing(r.max_recv_wr, Limits.RQ_WQE_SIZE), consumer: 0, outstanding: [], inHost: 0, nextSeq: 0 },
    state: QpState.RESET,
    attr: {},
    destroyed: false,
    mapped: { sq: sq!, rq: rq!, slot },
    relayed: 0,
  };
  qp.handle = ctx.qps.add(qp);
  pd.qps++;
  sendCq.qps.add(qp);
  recvCq.qps.add(qp);
  ctx.data.addQp(qp);
  ctx.resolver.registerQp(ctx.vmId, host.qpNum);
  const v1 = CreateQpResponse.encode({
    qp_handle: qp.handle,
    qp_num: host.qpNum,
    max_send_wr: r.max_send_wr,
    max_recv_wr: r.max_recv_wr,
    max_send_sge: r.max_send_sge,
    max_recv_sge: r.max_recv_sge,
    max_inline_data: r.max_inline_data,
  });
  return qpMappedBody(ctx, qp, v1);
}
