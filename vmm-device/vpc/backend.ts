// The VPC layer as one backend uses it: a control plane (the local file or etcd) feeding a VpcEngine, the
// VpcAddressResolver the device asks, the link that tears down a device's QPs after a change, quota hits the device
// enforced counted for the operator, and the operator's view of it all (`status()`). The `vrdma-backend` command
// (vmm-device/cli/main.ts), the in-VM tests and bench:vpc all go through this, so what they test is what runs.

import { ResourceKind } from '../abi/rdma/index.ts';
import type { Logger, LogLevel } from '../util/log.ts';
import type { RdmaDevice } from '../rdma/rdma-device.ts';
import type { DeviceQuotas } from '../rdma/limits.ts';
import { ipv4FromGid } from '../rdma/address-resolver.ts';
import { VpcEngine, type Counters, type VmView } from './engine.ts';
import { VpcAddressResolver } from './resolver.ts';
import { FilePolicySource, type FileSourceMetrics } from './file-source.ts';
import type { ValidationMode } from './incremental.ts';
import { EtcdClient } from './etcd-client.ts';
import { EtcdPolicySource, type EtcdSourceMetrics } from './etcd-source.ts';
import { linkDevice, type DeviceLink } from './device-link.ts';
import { DirQpRegistry } from '../rdma/qp-registry-dir.ts';
import { ChainedQpRegistry, type QpRegistry } from '../rdma/qp-ownership.ts';
import { EtcdQpRegistry } from './etcd-qp-registry.ts';
import { gidKey } from '../rdma/address-resolver.ts';
import type { QuotaKind } from './schema.ts';

/** The key prefix of the policy in etcd when none is given (etcd-source.ts describes the layout under it). */
export const DEFAULT_ETCD_PREFIX = '/vrdma/vpc/';

export type ControlPlaneSpec = { kind: 'file'; path: string } | { kind: 'etcd'; endpoints: string[]; prefix: string };

export interface VpcBackendOptions {
  controlPlane: ControlPlaneSpec;
  /** This host's id in the policy's `hosts`: VMs placed elsewhere get no address here. */
  hostId: string;
  log: Logger;
  /** Ends the wait for etcd's first valid state (shutdown while etcd is unreachable). */
  signal?: AbortSignal;
  /** File control plane: quiet time before a file that does not validate is refused (default 20 ms; a valid one is applied at once). */
  debounceMs?: number;
  /** etcd: health-check period (default 500 ms). */
  healthIntervalMs?: number;
  /** How each new document is validated (incremental.ts): 'incremental' (default) or 'full' (the bench's baseline). */
  validation?: ValidationMode;
  /**
   * The host directory the backends of this host share (qp-registry-dir.ts): wire QPN ownership is published there
   * (and, with etcd, under DEFAULT_QPN_PREFIX for other hosts) and every RC connection is checked against it.
   * Absent: no QPN check (tests of the policy alone).
   */
  hostDir?: string;
}

/** The device's NO_RESOURCES details that are quotas (HOST is the host refusing, not a quota). */
const QUOTA_OF_RESOURCE = new Map<number, QuotaKind>([
  [ResourceKind.PD, 'pds'],
  [ResourceKind.CQ, 'cqs'],
  [ResourceKind.QP, 'qps'],
  [ResourceKind.MR, 'mrs'],
  [ResourceKind.AH, 'ahs'],
  [ResourceKind.MR_BYTES, 'mrBytes'],
]);

/** The message RdmaDevice logs (fields command, status, detail) for every refused control request. */
const DEVICE_REFUSAL_MESSAGE = 'control request refused';

/**
 * A logger for a device that also sees its refusals: NO_RESOURCES with a quota kind is a quota hit. The device
 * enforces the quotas itself (its tables are sized from the policy) and logs each refusal; this is how the engine's
 * counters learn of them without a change in the device.
 */
class QuotaHitTap implements Logger {
  constructor(
    private readonly inner: Logger,
    private readonly onRefusal: (status: string, detail: number) => void,
  ) {}

  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void {
    if (message === DEVICE_REFUSAL_MESSAGE && fields !== undefined && typeof fields['detail'] === 'number') {
      this.onRefusal(String(fields['status']), fields['detail']);
    }
    this.inner.log(level, message, fields);
  }

  child(component: string): Logger {
    return new QuotaHitTap(this.inner.child(component), this.onRefusal);
  }
}

interface AttachedDevice {
  device: RdmaDevice;
  link: DeviceLink | undefined;
  hostRefusals: number;
}

export interface ControlPlaneStatus {
  kind: 'file' | 'etcd';
  /** The file path, or the etcd endpoints and prefix. */
  where: string;
  /** File: loaded and refused versions. etcd: connected, revisions, disconnects, catch-ups. */
  metrics: FileSourceMetrics | (Omit<EtcdSourceMetrics, 'unreachableSince'> & { unreachableSince: string | null });
}

export interface DeviceView {
  resources: { pds: number; cqs: number; qps: number; mrs: number; ahs: number; mrBytes: number };
  /** Every QP of the VM with its state and, once connected, its peer's VIRTUAL address (what the guest named). */
  qps: { handle: number; hostQpn: number; type: string; state: string; peer: string | null; peerQpn: number | null }[];
  /** Control requests refused, by `COMMAND:STATUS` (the device's own counters). */
  refusals: Record<string, number>;
  /** NO_RESOURCES because the HOST refused (not a quota). */
  hostRefusals: number;
}

export interface VmStatus extends VmView {
  device: DeviceView | null;
}

export interface BackendStatus {
  host: string;
  pid: number;
  policy: { version: number; source: string; applied: number; inForce: boolean };
  controlPlane: ControlPlaneStatus;
  teardown: { lastMs: number; maxMs: number; count: number };
  /** What the backend enforces of QoS on this host's verbs (rxe has no per-QP rate limit). */
  qosEnforcement: string;
  /** The connect-time wire QPN checks (spec 12.3): checked, and refused by cause; null without a QPN registry. */
  qpnChecks: { checked: number; notOwner: number; connectedElsewhere: number; unverifiable: number } | null;
  vms: VmStatus[];
  vpcs: Record<string, Counters>;
}

const QP_STATE_NAMES = ['RESET', 'INIT', 'RTR', 'RTS', 'SQD', 'SQE', 'ERR'];
const QP_TYPE_NAMES: Record<number, string> = { 2: 'RC', 4: 'UD' };

export const QOS_ENFORCEMENT =
  'traffic class (tenant dscp << 2) on every host QP and AH, whatever the guest asks; quotas per VM and per host. ' +
  'rateLimitMbps is NOT enforced: the host verbs (rxe) offer no per-QP rate limit';

export class VpcBackend {
  readonly engine: VpcEngine;
  readonly resolver: VpcAddressResolver;
  readonly file: FilePolicySource | undefined;
  readonly etcd: EtcdPolicySource | undefined;
  private readonly devices = new Map<string, AttachedDevice>();
  private readonly log: Logger;

  private constructor(
    readonly hostId: string,
    private readonly spec: ControlPlaneSpec,
    log: Logger,
    engine: VpcEngine,
    file: FilePolicySource | undefined,
    etcd: EtcdPolicySource | undefined,
  ) {
    this.log = log;
    this.engine = engine;
    this.resolver = new VpcAddressResolver(engine, hostId, log.child('resolver'));
    this.file = file;
    this.etcd = etcd;
  }

  /**
   * Starts the control plane and waits for the first valid policy: the file's (an invalid file is an error), or
   * etcd's (while no member answers, the source logs `etcd unreachable: no policy yet` and keeps trying).
   */
  static async start(opts: VpcBackendOptions): Promise<VpcBackend> {
    const log = opts.log;
    const engine = new VpcEngine({ log: log.child('engine') });
    if (opts.controlPlane.kind === 'file') {
      const file = new FilePolicySource({ path: opts.controlPlane.path, engine, log: log.child('file'), ...(opts.debounceMs === undefined ? {} : { debounceMs: opts.debounceMs }), ...(opts.validation === undefined ? {} : { validation: opts.validation }) });
      file.start();
      const backend = new VpcBackend(opts.hostId, opts.controlPlane, log, engine, file, undefined);
      if (opts.hostDir !== undefined) backend.useQpRegistry(new DirQpRegistry(opts.hostDir), opts.hostDir);
      return backend;
    }
    const client = new EtcdClient({ endpoints: opts.controlPlane.endpoints, log: log.child('etcd') });
    const etcd = new EtcdPolicySource({
      client,
      prefix: opts.controlPlane.prefix,
      engine,
      log: log.child('etcd'),
      ...(opts.healthIntervalMs === undefined ? {} : { healthIntervalMs: opts.healthIntervalMs }),
      ...(opts.validation === undefined ? {} : { validation: opts.validation }),
    });
    etcd.start();
    const backend = new VpcBackend(opts.hostId, opts.controlPlane, log, engine, undefined, etcd);
    if (opts.hostDir !== undefined) {
      const remote = new EtcdQpRegistry({ client, log: log.child('qpn') });
      await remote.start();
      backend.qpnRegistries.push(remote);
      backend.useQpRegistry(new ChainedQpRegistry([new DirQpRegistry(opts.hostDir), remote]), opts.hostDir);
    }
    if (opts.signal !== undefined) {
      const signal = opts.signal;
      const aborted = new Promise<'aborted'>((resolve) => {
        if (signal.aborted) resolve('aborted');
        signal.addEventListener('abort', () => resolve('aborted'), { once: true });
      });
      if ((await Promise.race([etcd.ready.then(() => 'ready' as const), aborted])) === 'aborted') {
        await etcd.stop();
        throw new Error('stopped while waiting for the first valid policy from etcd');
      }
    } else {
      await etcd.ready;
    }
    return backend;
  }

  /** Registries to stop with the backend (etcd: revoking the lease withdraws this backend's QPNs at once). */
  readonly qpnRegistries: EtcdQpRegistry[] = [];
  private hostDir: string | undefined;

  private useQpRegistry(registry: QpRegistry, hostDir: string): void {
    this.hostDir = hostDir;
    this.resolver.useQpRegistry(registry);
  }

  /**
   * Before VM `vmId`'s device opens: its host publishes in the host directory, and what an earlier backend of the
   * same VM left there is removed (its QPs died with it).
   */
  prepareVm(vmId: string): void {
    const placed = this.engine.placementOf(vmId);
    if (this.hostDir === undefined || placed === undefined) return;
    const dir = new DirQpRegistry(this.hostDir);
    dir.announceHost(gidKey(placed.hostGid));
    dir.clearVm(gidKey(placed.hostGid), vmId);
  }

  /** The device quotas of VM `vmId`, or an error naming what is missing (the VM, or its placement on this host). */
  deviceQuotasOf(vmId: string): Partial<DeviceQuotas> {
    const own = this.engine.ownAddress(vmId);
    if (own === undefined) throw new Error(`--vm-id ${vmId}: no such VM in the VPC policy (${this.where()})`);
    if (own.hostId !== this.hostId) throw new Error(`--host-id ${this.hostId}: the VPC policy places VM ${vmId} on host ${own.hostId}`);
    return this.resolver.deviceQuotasOf(vmId)!;
  }

  /** A logger for the device of VM `vmId` that counts its quota refusals (pass it as RdmaDeviceOptions.log). */
  deviceLogger(vmId: string, inner: Logger): Logger {
    return new QuotaHitTap(inner, (status, detail) => {
      if (status !== 'NO_RESOURCES') return;
      const kind = QUOTA_OF_RESOURCE.get(detail);
      if (kind !== undefined) this.engine.countQuotaHit(vmId, kind);
      else {
        const attached = this.devices.get(vmId);
        if (attached !== undefined) attached.hostRefusals++;
      }
    });
  }

  /**
   * Puts a device under the policy: after each change its illegal QPs go to ERR with QP_POLICY_TEARDOWN. A device
   * that reports its connections itself (it called the resolver's attachDevice) is torn down by the engine's own
   * tracking instead, never twice. Returns the detach function.
   */
  attach(device: RdmaDevice): () => void {
    if (this.devices.has(device.vmId)) throw new Error(`VM ${device.vmId} already has a device attached`);
    const link = this.resolver.attachedVms.has(device.vmId) ? undefined : linkDevice(this.engine, device, this.log.child('link'));
    this.devices.set(device.vmId, { device, link, hostRefusals: 0 });
    return () => {
      link?.detach();
      this.devices.delete(device.vmId);
    };
  }

  /** Resolves once the teardowns of every change so far are done. */
  async settled(): Promise<void> {
    await Promise.all([...this.devices.values()].map((d) => d.link?.settled()));
  }

  private where(): string {
    return this.spec.kind === 'file' ? `file ${this.spec.path}` : `etcd ${this.spec.endpoints.join(',')} prefix ${this.spec.prefix}`;
  }

  /** The operator's view: every attached VM (or only `vmId`), the VPCs they are in, the control plane. */
  status(vmId?: string): BackendStatus {
    const m = this.engine.metrics;
    const vmIds = vmId !== undefined ? [vmId] : [...this.devices.keys()];
    const vms: VmStatus[] = [];
    const vpcs: Record<string, Counters> = {};
    for (const id of vmIds) {
      const view = this.engine.describeVm(id);
      if (view === undefined) continue;
      const attached = this.devices.get(id);
      vms.push({ ...view, device: attached === undefined ? null : deviceView(attached) });
      vpcs[view.vpc] = this.engine.countersOfVpc(view.vpc);
    }
    let controlPlane: ControlPlaneStatus;
    if (this.etcd !== undefined && this.spec.kind === 'etcd') {
      const e = this.etcd.metrics;
      controlPlane = {
        kind: 'etcd',
        where: `${this.spec.endpoints.join(',')} prefix ${this.spec.prefix}`,
        metrics: { ...e, unreachableSince: e.unreachableSince === undefined ? null : new Date(e.unreachableSince).toISOString() },
      };
    } else {
      controlPlane = { kind: 'file', where: this.spec.kind === 'file' ? this.spec.path : '', metrics: { ...this.file!.metrics } };
    }
    return {
      host: this.hostId,
      pid: process.pid,
      policy: { version: m.policyVersion, source: m.policySource, applied: m.applied, inForce: this.engine.hasPolicy },
      controlPlane,
      teardown: { lastMs: m.lastTeardownLatencyMs, maxMs: m.maxTeardownLatencyMs, count: m.teardownLatenciesMs.length },
      qosEnforcement: QOS_ENFORCEMENT,
      qpnChecks: this.resolver.ownership === undefined ? null : { ...this.resolver.ownership.counters },
      vms,
      vpcs,
    };
  }

  async stop(): Promise<void> {
    for (const d of this.devices.values()) d.link?.detach();
    this.devices.clear();
    this.file?.stop();
    for (const r of this.qpnRegistries) await r.stop();
    await this.etcd?.stop();
  }
}

function deviceView(a: AttachedDevice): DeviceView {
  const d = a.device;
  return {
    resources: { pds: d.pds.size, cqs: d.cqs.size, qps: d.qps.size, mrs: d.mrs.size, ahs: d.ahs.size, mrBytes: Number(d.mrBytes) },
    qps: [...d.qps.values()].map((qp) => {
      const dgid = qp.attr['dgid'];
      const destQpn = qp.attr['dest_qp_num'];
      return {
        handle: qp.handle,
        hostQpn: qp.host.qpNum,
        type: QP_TYPE_NAMES[qp.qpType] ?? String(qp.qpType),
        state: QP_STATE_NAMES[qp.state] ?? String(qp.state),
        peer: dgid instanceof Uint8Array ? (ipv4FromGid(dgid) ?? Buffer.from(dgid).toString('hex')) : null,
        peerQpn: typeof destQpn === 'number' && dgid instanceof Uint8Array ? destQpn : null,
      };
    }),
    refusals: { ...d.counters.errors },
    hostRefusals: a.hostRefusals,
  };
}
