// Shared by the VPC tests that run inside the soft-RoCE test host (rxe-*.test.ts) and bench:vpc: the two-tenant
// policy placed on rxe0's host address, and a VM as the backend command builds it (vmm-device/vpc/backend.ts:
// address, quotas and QoS from the policy, quota refusals counted, the device linked for teardown), driven by the
// reference guest driver over the reference vhost-user front-end and a real vhost-user server.

import { AccessFlag, QpState } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type Cq, type GuestBuffer, type Mr, type Pd } from '../../guest-driver-spec/driver/index.ts';
import { RdmaDevice } from '../../vmm-device/rdma/rdma-device.ts';
import type { HostVerbs } from '../../vmm-device/verbs/host-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import type { VpcBackend } from '../../vmm-device/vpc/backend.ts';
import { driverRig, type DriverRig } from '../driver/harness.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';

export const RXE_DEVICE = 'rxe0';
/** rxe0's netdev address inside the test host (scripts/rxe/guest.sh): the host GID of every VM here. */
export const RXE_HOST_IP = '10.233.0.1';
export const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ | AccessFlag.REMOTE_ATOMIC;
/** Small quotas, so that each one is reached with a handful of requests. */
export const TEST_QUOTAS = { pds: 2, cqs: 3, qps: 4, mrs: 2, ahs: 2, mrBytes: 256 * 1024, controlRequests: 4 };
export const ACME_DSCP = 26;
export const GLOBEX_DSCP = 10;
export const GLOBEX_QKEY = 0x1234_5678;

/**
 * Two tenants on one host (rxe0): acme-prod (default deny, rule 10 lets the VPC talk to itself) with a1 .1 and a2
 * .2; globex-net (default allow, same range) with g1 .1 and g2 .3. `extraRules` go in front of acme's rule 10.
 */
export function rxePolicy(hostIp = RXE_HOST_IP, extraRules: object[] = []) {
  return {
    version: 1,
    provider: { dscp: 48 },
    defaultQuotas: TEST_QUOTAS,
    hosts: [{ id: 'host-1', address: hostIp }],
    tenants: [
      { id: 'acme', qos: { dscp: ACME_DSCP, rateLimitMbps: 1000 } },
      { id: 'globex', qos: { dscp: GLOBEX_DSCP } },
    ],
    vpcs: [
      {
        id: 'acme-prod',
        tenant: 'acme',
        cidr: '172.16.0.0/24',
        defaultAction: 'deny',
        rules: [...extraRules, { id: 10, action: 'allow', src: '172.16.0.0/24', dst: '172.16.0.0/24', qpTypes: ['RC', 'UD'] }],
      },
      { id: 'globex-net', tenant: 'globex', cidr: '172.16.0.0/24', qkey: GLOBEX_QKEY, defaultAction: 'allow', rules: [] },
    ],
    vms: [
      { id: 'a1', vpc: 'acme-prod', ip: '172.16.0.1', host: 'host-1' },
      { id: 'a2', vpc: 'acme-prod', ip: '172.16.0.2', host: 'host-1' },
      { id: 'g1', vpc: 'globex-net', ip: '172.16.0.1', host: 'host-1' },
      { id: 'g2', vpc: 'globex-net', ip: '172.16.0.3', host: 'host-1' },
    ],
  };
}

export interface VpcVm {
  id: string;
  device: RdmaDevice;
  rig: DriverRig;
  ctx: RdmaContext;
  pd: Pd;
  cq: Cq;
  buf: GuestBuffer;
  mr: Mr;
  log: RecordingLogger;
}

export type Cleanups = (() => Promise<unknown>)[];

/** One VM under the backend's policy, with a PD, a CQ and one registered buffer. */
export async function openVpcVm(backend: VpcBackend, verbs: HostVerbs, vmId: string, cleanups: Cleanups, bufBytes = 64 * 1024): Promise<VpcVm> {
  const log = new RecordingLogger(vmId);
  const device = await RdmaDevice.open({
    verbs,
    hostDevice: RXE_DEVICE,
    vmId,
    resolver: backend.resolver,
    quotas: backend.deviceQuotasOf(vmId),
    log: backend.deviceLogger(vmId, log),
    aliases: nativeAliasMapper,
  });
  const detach = backend.attach(device);
  let rig: DriverRig | undefined;
  let ctx: RdmaContext | undefined;
  cleanups.push(async () => {
    // The driver's close resets the device, which releases every host object of the VM (spec 11.5).
    await ctx?.close().catch(() => undefined);
    await rig?.finish();
    detach();
    await device.close();
  });
  rig = await driverRig(device, device.queueCount);
  ctx = await RdmaContext.open(rig.transport);
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(64);
  const buf = ctx.allocBuffer(bufBytes);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { id: vmId, device, rig, ctx, pd, cq, buf, mr, log };
}

/** The host QP behind a guest QP handle, as the host's verbs report it. */
export async function hostQp(vm: VpcVm, handle: number) {
  const qp = vm.device.qps.get(handle);
  if (qp === undefined) throw new Error(`${vm.id}: no QP ${handle}`);
  return vm.device.verbs.queryQp(qp.host);
}

export const HOST_ERR = QpState.ERR;
