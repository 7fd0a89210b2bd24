// CREATE_CQ, DESTROY_CQ, ARM_CQ (spec 8.7 to 8.9).

import {
  ArmCqRequest,
  Command,
  CreateCqRequest,
  CreateCqResponse,
  DEFINED_MAP_FLAGS,
  EventType,
  FeatureBit,
  HandleRequest,
  MapFlag,
  Limits,
  ResourceKind,
  isPowerOfTwo,
  ringPages,
} from '../../abi/rdma/index.ts';
import { ArmState, GuestRing, type Cq } from '../objects.ts';
import type { CommandContext, CommandGroup } from './context.ts';
import { fail } from './errors.ts';
import { checkIndexBlock, pageShiftOk, readPages } from './pages.ts';
import { cqMappedBody, createMappedCq } from '../mapped/commands.ts';

async function createCq(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const r = CreateCqRequest.decode(body);
  const o = (f: string): number => CreateCqRequest.offsetOf(f);
  if (!isPowerOfTwo(r.cqe_count) || r.cqe_count > ctx.config.max_cqe) fail('INVALID_ARGUMENT', o('cqe_count'));
  // With HOST_QUEUE_MAPPING, map_flags chooses the mode (spec 13.3); without it the field is reserved, ignored.
  const mapping = ctx.hasFeature(FeatureBit.HOST_QUEUE_MAPPING);
  if (mapping && ((r.map_flags ?? 0) & ~DEFINED_MAP_FLAGS) !== 0) fail('INVALID_ARGUMENT', o('map_flags'));
  if (mapping && ((r.map_flags ?? 0) & MapFlag.MAP) !== 0) return createMappedCq(ctx, r);
  if (!pageShiftOk(ctx, r.page_shift)) fail('INVALID_ARGUMENT', o('page_shift'));
  if (r.num_pages !== ringPages(r.cqe_count, Limits.CQE_SIZE, r.page_shift)) fail('INVALID_ARGUMENT', o('num_pages'));
  const indexGpa = checkIndexBlock(ctx, r.index_gpa, o('index_gpa'));
  const pages = readPages(ctx, body, CreateCqRequest.size, 0, r.num_pages, r.page_shift, CreateCqRequest.size);
  if (ctx.cqs.full) fail('NO_RESOURCES', ResourceKind.CQ);
  const gen = ctx.generation;
  let cq: Cq | undefined;
  // Every host completion is a work request of a QP of this CQ, which the device drains at each event; twice the
  // guest depth leaves room for successful unsignaled sends, which take a host entry but no guest one.
  const hostCqe = r.cqe_count * 2;
  const onCompletionEvent = ctx.cqEventHandler(() => cq);
  const host = await ctx.hostCall(() => ctx.verbs.createCq(ctx.hostDevice, hostCqe, { onCompletionEvent }));
  ctx.checkGeneration(gen, () => ctx.verbs.destroyCq(host));
  const ring = new GuestRing(r.cqe_count, Limits.CQE_SIZE, r.page_shift, pages, indexGpa);
  cq = { handle: 0, host, ring, producer: 0, arm: ArmState.DISARMED, error: false, qps: new Set(), destroyed: false };
  cq.handle = ctx.cqs.add(cq);
  ctx.data.addCq(cq);
  ring.writeProducer(ctx.memory, 0);
  try {
    ctx.verbs.reqNotifyCq(host, false);
  } catch (e) {
    ctx.log.log('error', 'arming a new host CQ failed', { error: (e as Error).message });
  }
  if (mapping) return cqMappedBody(ctx, cq, r.cqe_count);
  return CreateCqResponse.encode({ cq_handle: cq.handle, cqe_count: r.cqe_count });
}

async function destroyCq(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const { handle } = HandleRequest.decode(body);
  const cq = ctx.cqs.get(handle);
  if (cq === undefined) fail('INVALID_HANDLE', 0);
  if (cq.qps.size > 0) fail('BUSY', ResourceKind.QP);
  cq.destroyed = true;
  ctx.cqs.delete(handle);
  ctx.data.removeCq(cq);
  ctx.discardEvents(handle, [EventType.COMPLETION, EventType.CQ_ERROR]);
  const mapped = cq.mapped;
  if (mapped !== undefined && ctx.mapping !== undefined) {
    // Spec 13.9: unmapped (the transport's confirmation awaited, bounded) before the host CQ is destroyed.
    const m = ctx.mapping;
    const epoch = m.currentEpoch;
    const unmapped = await m.unmap(mapped);
    await ctx.destroyHost(() => ctx.verbs.destroyCq(cq.host));
    m.releaseQueue(mapped, epoch, unmapped);
    return new Uint8Array(0);
  }
  await ctx.destroyHost(() => ctx.verbs.destroyCq(cq.host));
  return new Uint8Array(0);
}

function armCq(ctx: CommandContext, body: Uint8Array): Uint8Array {
  const r = ArmCqRequest.decode(body);
  const cq = ctx.cqs.get(r.cq_handle);
  if (cq === undefined) fail('INVALID_HANDLE', 0);
  if (r.solicited_only > 1) fail('INVALID_ARGUMENT', ArmCqRequest.offsetOf('solicited_only'));
  if (cq.error) fail('WRONG_STATE', 0);
  ctx.data.arm(cq, r.solicited_only === 1);
  return new Uint8Array(0);
}

export const cqCommands: CommandGroup = {
  [Command.CREATE_CQ]: createCq,
  [Command.DESTROY_CQ]: destroyCq,
  [Command.ARM_CQ]: armCq,
};
