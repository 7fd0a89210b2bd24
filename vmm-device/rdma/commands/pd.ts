// CREATE_PD and DESTROY_PD (spec 8.6).

import { Command, HandleRequest, HandleResponse, ResourceKind } from '../../abi/rdma/index.ts';
import type { CommandContext, CommandGroup } from './context.ts';
import { fail } from './errors.ts';

async function createPd(ctx: CommandContext): Promise<Uint8Array> {
  if (ctx.pds.full) fail('NO_RESOURCES', ResourceKind.PD);
  const gen = ctx.generation;
  const host = await ctx.hostCall(() => ctx.verbs.allocPd(ctx.hostDevice));
  ctx.checkGeneration(gen, () => ctx.verbs.deallocPd(host));
  const handle = ctx.pds.add({ handle: 0, host, qps: 0, mrs: 0, ahs: 0 });
  ctx.pds.get(handle)!.handle = handle;
  return HandleResponse.encode({ handle });
}

async function destroyPd(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const { handle } = HandleRequest.decode(body);
  const pd = ctx.pds.get(handle);
  if (pd === undefined) fail('INVALID_HANDLE', 0);
  if (pd.qps > 0) fail('BUSY', ResourceKind.QP);
  if (pd.mrs > 0) fail('BUSY', ResourceKind.MR);
  if (pd.ahs > 0) fail('BUSY', ResourceKind.AH);
  ctx.pds.delete(handle);
  await ctx.destroyHost(() => ctx.verbs.deallocPd(pd.host));
  return new Uint8Array(0);
}

export const pdCommands: CommandGroup = {
  [Command.CREATE_PD]: createPd,
  [Command.DESTROY_PD]: destroyPd,
};
