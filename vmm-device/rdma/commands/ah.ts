// CREATE_AH and DESTROY_AH (spec 8.16): the virtual destination GID is resolved inside the VM's VPC.

import { Command, CreateAhRequest, FeatureBit, HandleRequest, HandleResponse, Limits, QpType, ResourceKind } from '../../abi/rdma/index.ts';
import type { AhAttr } from '../../verbs/host-verbs.ts';
import type { ConnectionAnswer } from '../address-resolver.ts';
import type { Ah } from '../objects.ts';
import { HOST_PORT, type CommandContext, type CommandGroup } from './context.ts';
import { fail } from './errors.ts';

async function createAh(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const r = CreateAhRequest.decode(body);
  const o = (f: string): number => CreateAhRequest.offsetOf(f);
  if (!ctx.hasFeature(FeatureBit.UD)) fail('NOT_SUPPORTED', 0);
  const pd = ctx.pds.get(r.pd_handle);
  if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
  if (r.flow_label > 0xfffff) fail('INVALID_ARGUMENT', o('flow_label'));
  if (r.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', o('port_num'));
  if (r.sgid_index !== 0) fail('INVALID_ARGUMENT', o('sgid_index'));
  if (r.sl > Limits.SL_MAX) fail('INVALID_ARGUMENT', o('sl'));
  const res = ctx.resolver.resolve(ctx.vmId, r.dgid, QpType.UD);
  if (res.kind === 'unreachable') fail('DESTINATION_UNREACHABLE', o('dgid'));
  if (res.kind === 'refused') fail('REFUSED_BY_POLICY', res.rule);
  if (ctx.ahs.full) fail('NO_RESOURCES', ResourceKind.AH);
  const attr: AhAttr = {
    portNum: HOST_PORT,
    sl: r.sl,
    grh: {
      dgid: res.hostGid,
      sgidIndex: ctx.sourceGidIndex,
      hopLimit: r.hop_limit,
      flowLabel: r.flow_label,
      trafficClass: res.trafficClass ?? ctx.address.trafficClass ?? r.traffic_class,
    },
  };
  const gen = ctx.generation;
  const host = await ctx.hostCall(() => ctx.verbs.createAh(pd.host, attr));
  ctx.checkGeneration(gen, () => ctx.verbs.destroyAh(host));
  const ah: Ah = { handle: 0, pd, host, dgid: r.dgid };
  ah.handle = ctx.ahs.add(ah);
  pd.ahs++;
  const answer: ConnectionAnswer | undefined = ctx.resolver.ahCreated?.(ctx.vmId, { guestHandle: ah.handle, peerGid: r.dgid.slice() });
  if (answer !== undefined && !answer.ok) ctx.revokeAh(ah, answer.teardown.detail);
  return HandleResponse.encode({ handle: ah.handle });
}

async function destroyAh(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const { handle } = HandleRequest.decode(body);
  const ah = ctx.ahs.get(handle);
  if (ah === undefined) fail('INVALID_HANDLE', 0);
  ctx.ahs.delete(handle);
  ah.pd.ahs--;
  ctx.resolver.ahDestroyed?.(ctx.vmId, handle);
  // Sends already handed to the host keep their AH until they complete: release it after the QPs' queues drain.
  await ctx.destroyHost(() => ctx.verbs.destroyAh(ah.host));
  return new Uint8Array(0);
}

export const ahCommands: CommandGroup = {
  [Command.CREATE_AH]: createAh,
  [Command.DESTROY_AH]: destroyAh,
};
