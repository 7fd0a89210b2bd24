// The VPC engine seen through the device's own AddressResolver interface (vmm-device/rdma/address-resolver.ts):
// what RdmaDevice calls today. Connection tracking needs three more calls from the device (after a host QP reached
// RTR, after a host AH exists, and a sink to move a QP to ERR with QP_POLICY_TEARDOWN); `PolicyHooks` below names
// them, and this class implements them too, so a device that makes those calls gets tracking with no other change.

import { PolicyReason, QpType } from '../abi/rdma/index.ts';
import { gidKey, type AddressResolver, type Resolution, type VirtualAddress } from '../rdma/address-resolver.ts';
import { QpOwnership, type PeerQpAnswer, type QpRegistry } from '../rdma/qp-ownership.ts';
import type { DeviceQuotas } from '../rdma/limits.ts';
import type { Logger } from '../util/log.ts';
import type { Connection, TeardownSink, VpcEngine } from './engine.ts';
import type { QpTypeName } from './schema.ts';

/** What the device needs beyond AddressResolver for connection tracking and teardown (spec 12.3). */
export interface PolicyHooks {
  /** The host QP `qpn` (guest handle `guestHandle`) of VM `vmId` reached RTR connected to `peerGid`/`peerQpn`. */
  qpConnected(vmId: string, c: { qpn: number; guestHandle: number; qpType: number; peerGid: Uint8Array; peerQpn: number }): HookAnswer;
  /** A host AH (device handle `guestHandle`) of VM `vmId` to `peerGid` exists. */
  ahCreated(vmId: string, c: { guestHandle: number; peerGid: Uint8Array }): HookAnswer;
  ahDestroyed(vmId: string, guestHandle: number): void;
  /** The device's sink: called once per connection of `vmId` that the policy no longer allows. */
  attachDevice(vmId: string, sink: TeardownSink): () => void;
}

/** `teardown`: a policy change came in between the resolution and the connection: the device tears it down now. */
export type HookAnswer = { ok: true; connection: Connection } | { ok: false; teardown: { reason: string; detail: number } };

export function qpTypeName(qpType: number): QpTypeName | undefined {
  return qpType === QpType.RC ? 'RC' : qpType === QpType.UD ? 'UD' : undefined;
}

export class VpcAddressResolver implements AddressResolver, PolicyHooks {
  constructor(
    readonly engine: VpcEngine,
    /** The host this backend runs on: a VM placed elsewhere gets no address here. */
    readonly hostId: string,
    private readonly log: Logger,
  ) {}

  ownHostGid(vmId: string): Uint8Array | undefined {
    return this.engine.placementOf(vmId)?.hostGid;
  }

  ownAddress(vmId: string): VirtualAddress | undefined {
    const a = this.engine.ownAddress(vmId);
    if (a === undefined) return undefined;
    if (a.hostId !== this.hostId) {
      this.log.log('warn', 'VM is placed on another host by the VPC policy', { vm: vmId, policyHost: a.hostId, thisHost: this.hostId });
      return undefined;
    }
    return { vpc: a.vpc, gid: a.gid, mac: a.mac, qkey: a.qkey, trafficClass: a.trafficClass };
  }

  /** The VM's object quotas as RdmaDeviceOptions.quotas takes them (fixed when the device opens). */
  deviceQuotasOf(vmId: string): Partial<DeviceQuotas> | undefined {
    const q = this.engine.quotasOf(vmId);
    if (q === undefined) return undefined;
    return { maxPd: q.pds, maxCq: q.cqs, maxQp: q.qps, maxMr: q.mrs, maxAh: q.ahs, maxMrBytes: BigInt(q.mrBytes) };
  }

  resolve(vmId: string, virtualGid: Uint8Array, qpType: number): Resolution {
    const type = qpTypeName(qpType);
    if (type === undefined) return { kind: 'unreachable' };
    const d = this.engine.resolve(vmId, virtualGid, type);
    if (d.ok) return { kind: 'ok', hostGid: d.hostGid, trafficClass: d.trafficClass };
    if (d.refusal === 'refused') return { kind: 'refused', rule: d.ruleId };
    return { kind: 'unreachable' };
  }

  reverse(vmId: string, hostGid: Uint8Array, srcQpn: number): Uint8Array | undefined {
    return this.engine.reverse(vmId, hostGid, srcQpn);
  }

  registerQp(vmId: string, qpn: number): void {
    this.engine.registerQp(vmId, qpn);
    this.ownership?.created(vmId, qpn);
  }

  /** Also forgets the QP's connection (DESTROY_QP, reset). */
  unregisterQp(vmId: string, qpn: number): void {
    this.ownership?.destroyed(vmId, qpn);
    this.engine.unregisterQp(vmId, qpn);
  }

  /** Wire QPN ownership across the backends (useQpRegistry); none: no connect-time QPN check. */
  ownership: QpOwnership | undefined;

  /** Publishes wire QPN ownership to `registry` and checks each RC connection against it from now on. */
  useQpRegistry(registry: QpRegistry): void {
    const key = (p: { hostGid: Uint8Array } | undefined) => (p === undefined ? undefined : gidKey(p.hostGid));
    this.ownership = new QpOwnership(
      registry,
      (vmId) => key(this.engine.placementOf(vmId)),
      (vmId, gid) => {
        const p = this.engine.placementOf(vmId, gid);
        return p === undefined ? undefined : { vm: p.vm, host: gidKey(p.hostGid) };
      },
    );
  }

  async checkPeerQp(vmId: string, c: { qpn: number; peerGid: Uint8Array; peerQpn: number }): Promise<PeerQpAnswer> {
    return this.ownership === undefined ? { ok: true } : this.ownership.check(vmId, c);
  }

  qpConnected(vmId: string, c: { qpn: number; guestHandle: number; qpType: number; peerGid: Uint8Array; peerQpn: number }): HookAnswer {
    if (qpTypeName(c.qpType) !== 'RC') return { ok: false, teardown: { reason: 'MAPPING_CHANGED', detail: PolicyReason.MAPPING_CHANGED } };
    this.ownership?.connected(vmId, c.qpn, c.peerGid, c.peerQpn);
    return this.answer(this.engine.track(vmId, { kind: 'RC', local: c.qpn, guestHandle: c.guestHandle, peerGid: c.peerGid, peerQpn: c.peerQpn }));
  }

  ahCreated(vmId: string, c: { guestHandle: number; peerGid: Uint8Array }): HookAnswer {
    return this.answer(this.engine.track(vmId, { kind: 'UD', local: c.guestHandle, guestHandle: c.guestHandle, peerGid: c.peerGid }));
  }

  ahDestroyed(vmId: string, guestHandle: number): void {
    this.engine.untrack(vmId, 'UD', guestHandle);
  }

  attachDevice(vmId: string, sink: TeardownSink): () => void {
    const detach = this.engine.attach(vmId, sink);
    this.attachedVms.add(vmId);
    return () => {
      this.attachedVms.delete(vmId);
      detach();
    };
  }

  /** VMs whose device reports its connections (called attachDevice): the engine tracks and tears them down. */
  readonly attachedVms = new Set<string>();

  private answer(r: ReturnType<VpcEngine['track']>): HookAnswer {
    if (r.ok) return r;
    return { ok: false, teardown: { reason: r.reason, detail: PolicyReason[r.reason] } };
  }
}
