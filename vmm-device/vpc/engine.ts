// The VPC policy engine: beside the device model, never inside the data path. The device asks it at the two points
// where an RDMA conversation begins (a QP's move to RTR, an AH's creation) and tells it what it established; the
// engine answers from the last good policy document, charges quotas, counts everything, and when a new document
// makes an established connection illegal it calls the owning device's teardown sink for each affected QP or AH
// (the device moves the QP to ERR and queues QP_POLICY_TEARDOWN, spec 11.4 and 12.3).
//
// The engine is synchronous: a control plane (file, etcd) hands it whole validated documents through apply().

import { performance } from 'node:perf_hooks';
import { PolicyReason } from '../abi/rdma/index.ts';
import type { Logger } from '../util/log.ts';
import {
  effectiveQkey,
  QUOTA_KINDS,
  type PolicyDocument,
  type QpTypeName,
  type QuotaKind,
  type Quotas,
  type Host,
  type Tenant,
  type Vm,
  type Vpc,
} from './schema.ts';
import { formatIpv4, gidOfIpv4Number, ipv4NumberFromGid, parseIpv4 } from './net.ts';
import { compile, DEFAULT_RULE_ID, evaluate, type CompiledPolicy, type CompiledVm, type CompiledVpc } from './compiled-policy.ts';

export { DEFAULT_RULE_ID };

/** Names of PolicyReason (the `detail` of QP_POLICY_TEARDOWN). */
export type TeardownReason = keyof typeof PolicyReason;

/** How many teardown latencies the engine keeps for the operator (the newest). */
export const TEARDOWN_LATENCY_HISTORY = 256;

// ----------------------------------------------------------------------------------------------------- results

export type Decision =
  | {
      ok: true;
      hostGid: Uint8Array;
      hostId: string;
      peerVmId: string;
      /** dscp << 2 of the SOURCE VM's tenant: it marks what this host's QP sends. */
      trafficClass: number;
      /** The rule that allowed it (0: the VPC's default). */
      ruleId: number;
    }
  /**
   * `unreachable`: not an address of the guest's VPC. The guest gets the same answer whatever `why` is (spec 12.7);
   * `why` is for the counters and the operator.
   */
  | { ok: false; refusal: 'unreachable'; why: 'unknown-source' | 'unknown-destination' | 'other-vpc' | 'not-a-virtual-gid' }
  | { ok: false; refusal: 'refused'; why: 'rule' | 'default'; ruleId: number };

export interface Counters {
  allowed: number;
  /** Refusals as the guest saw them (DESTINATION_UNREACHABLE), whatever the cause. */
  unreachable: number;
  /** ...of which the address exists nowhere in the policy. */
  unknownDestination: number;
  /** ...of which the address exists, but in another VPC. */
  otherVpc: number;
  /** REFUSED_BY_POLICY by a deny rule or the VPC's default. */
  refusedByRule: number;
  tornDown: number;
  quotaHits: Record<QuotaKind, number>;
}

function newCounters(): Counters {
  return {
    allowed: 0,
    unreachable: 0,
    unknownDestination: 0,
    otherVpc: 0,
    refusedByRule: 0,
    tornDown: 0,
    quotaHits: Object.fromEntries(QUOTA_KINDS.map((k) => [k, 0])) as Record<QuotaKind, number>,
  };
}

export interface ConnectionPeer {
  vmId: string;
  virtualIp: string;
  hostId: string;
  hostIp: string;
  /** The remote QPN the guest connected to (RC), if the device said. */
  qpn?: number;
}

/** One end of a conversation this host's device established: an RC QP connected to a peer, or a UD AH. */
export interface Connection {
  id: number;
  kind: 'RC' | 'UD';
  vmId: string;
  /** RC: the host QPN of the local QP. UD: the device's AH handle. */
  local: number;
  /** The guest's handle of the QP or AH (what the device's event names). */
  guestHandle: number;
  peer: ConnectionPeer;
  /** The rule that allowed it (0: default). */
  ruleId: number;
  establishedAt: number;
  /** The other end's Connection when it is on this host too (both ends torn down together). */
  pairedWith?: number;
}

export interface TeardownNotice {
  connection: Connection;
  reason: TeardownReason;
  /** PolicyReason value: the `detail` of QP_POLICY_TEARDOWN. */
  detail: number;
  /** Milliseconds from the change reaching the engine to this call. */
  latencyMs: number;
}

/** What a device gives the engine: called once per connection that became illegal, synchronously inside apply(). */
export type TeardownSink = (notice: TeardownNotice) => void;

export type ChargeResult =
  | { ok: true; charge: QuotaCharge }
  | { ok: false; kind: QuotaKind; scope: 'vm' | 'host' | 'unknown-vm'; limit: number; used: number };

/** A quota charge; release() gives it back once, however often it is called. */
export interface QuotaCharge {
  readonly vmId: string;
  readonly kind: QuotaKind;
  readonly amount: number;
  release(): void;
}

export interface ApplyOptions {
  /** Where the document came from, for logs (a file path, `etcd revision 42`). */
  source: string;
  /** When the change was first observed (performance.now()): teardown latency counts from here. */
  observedAt?: number;
}

export interface ApplyResult {
  version: number;
  tornDown: number;
  /** Milliseconds from `observedAt` to the last teardown call (0 when none). */
  teardownLatencyMs: number;
}

export interface EngineMetrics {
  policyVersion: number;
  policySource: string;
  applied: number;
  /** Teardown calls whose sink threw (the device misbehaved; the connection is forgotten anyway). */
  sinkErrors: number;
  lastTeardownLatencyMs: number;
  maxTeardownLatencyMs: number;
  teardownLatenciesMs: number[];
}

interface UsageRow {
  used: Quotas;
}

function zeroQuotas(): Quotas {
  return Object.fromEntries(QUOTA_KINDS.map((k) => [k, 0])) as Quotas;
}

export interface VpcEngineOptions {
  log: Logger;
}

export class VpcEngine {
  private policy: CompiledPolicy | undefined;
  private readonly log: Logger;
  private readonly vmCounters = new Map<string, Counters>();
  private readonly vpcCounters = new Map<string, Counters>();
  private readonly connections = new Map<number, Connection>();
  /** `${vmId}/${kind}/${local}` -> connection id. */
  private readonly connectionKeys = new Map<string, number>();
  private nextConnectionId = 1;
  private readonly sinks = new Map<string, TeardownSink>();
  private readonly vmUsage = new Map<string, UsageRow>();
  private readonly hostUsage = new Map<string, UsageRow>();
  /** `${hostIp}:${qpn}` -> vmId: who owns each wire QPN this backend knows of (UD source reverse lookup). */
  private readonly qpOwners = new Map<string, string>();
  readonly metrics: EngineMetrics = {
    policyVersion: 0,
    policySource: '',
    applied: 0,
    sinkErrors: 0,
    lastTeardownLatencyMs: 0,
    maxTeardownLatencyMs: 0,
    teardownLatenciesMs: [],
  };

  constructor(opts: VpcEngineOptions) {
    this.log = opts.log;
  }

  get hasPolicy(): boolean {
    return this.policy !== undefined;
  }

  /** The document in force. */
  get document(): PolicyDocument | undefined {
    return this.policy?.doc;
  }

  // ------------------------------------------------------------------------------------------------- policy

  /**
   * Puts a validated document in force and tears down every tracked connection it makes illegal, calling the
   * owning devices' sinks before it returns.
   */
  apply(doc: PolicyDocument, opts: ApplyOptions): ApplyResult {
    const observedAt = opts.observedAt ?? performance.now();
    const next = compile(doc);
    this.previous = this.policy;
    this.policy = next;
    this.metrics.policyVersion++;
    this.metrics.applied++;
    this.metrics.policySource = opts.source;
    let tornDown = 0;
    let lastLatency = 0;
    // Many connections join the same two VMs (one per QP pair): the rules are evaluated once per pair and type.
    const verdicts = new Map<string, boolean>();
    for (const c of [...this.connections.values()]) {
      if (!this.connections.has(c.id)) continue; // torn down with its pair already
      const reason = this.illegalBecause(c, next, verdicts);
      if (reason === undefined) continue;
      for (const victim of this.withPair(c)) {
        lastLatency = this.tearDown(victim, reason, observedAt);
        tornDown++;
      }
    }
    for (const listener of this.appliedListeners) {
      try {
        listener({ observedAt, version: this.metrics.policyVersion });
      } catch (e) {
        this.metrics.sinkErrors++;
        this.log.log('error', 'a policy listener failed', { error: (e as Error).message });
      }
    }
    this.log.log('info', 'VPC policy in force', {
      source: opts.source,
      version: this.metrics.policyVersion,
      vpcs: doc.vpcs.length,
      vms: doc.vms.length,
      tornDown,
    });
    return { version: this.metrics.policyVersion, tornDown, teardownLatencyMs: lastLatency };
  }

  /** Why connection `c` is not allowed under `p`, or undefined when it still is. */
  private illegalBecause(c: Connection, p: CompiledPolicy, verdicts: Map<string, boolean>): TeardownReason | undefined {
    const self = p.vms.get(c.vmId);
    const old = this.connectionSelf.get(c.id);
    if (self === undefined || old === undefined || self.ip !== old.ip || self.vpc.spec.id !== old.vpc || self.host.id !== old.host) {
      return 'MAPPING_CHANGED';
    }
    const peerIp = parseIpv4(c.peer.virtualIp)!;
    const peer = self.vpc.members.get(peerIp);
    if (peer === undefined || peer.spec.id !== c.peer.vmId) return 'PEER_REMOVED';
    if (peer.host.id !== c.peer.hostId || peer.host.address !== c.peer.hostIp) return 'MAPPING_CHANGED';
    const key = `${self.vpc.spec.id}/${self.ip}/${peer.ip}/${c.kind}`;
    let allowed = verdicts.get(key);
    if (allowed === undefined) verdicts.set(key, (allowed = evaluate(self.vpc, self.ip, peer.ip, c.kind).allow));
    return allowed ? undefined : 'RULE_CHANGED';
  }

  private previous: CompiledPolicy | undefined;
  private readonly appliedListeners = new Set<(info: { observedAt: number; version: number }) => void>();

  /** Called after every apply (the device link re-judges the device's own connected QPs). */
  onApplied(listener: (info: { observedAt: number; version: number }) => void): () => void {
    this.appliedListeners.add(listener);
    return () => this.appliedListeners.delete(listener);
  }

  /**
   * Whether a connection of VM `vmId` to `peerGid` that the PREVIOUS policy allowed is still allowed by the one in
   * force: undefined when it is, else the PolicyReason value (for a device that keeps its own connection table).
   */
  judge(vmId: string, peerGid: Uint8Array, qpType: QpTypeName): number | undefined {
    const now = this.policy;
    const before = this.previous;
    const self = now?.vms.get(vmId);
    const old = before?.vms.get(vmId);
    if (self === undefined) return PolicyReason.MAPPING_CHANGED;
    if (old !== undefined && (old.ip !== self.ip || old.vpc.spec.id !== self.vpc.spec.id || old.host.id !== self.host.id)) return PolicyReason.MAPPING_CHANGED;
    const dst = ipv4NumberFromGid(peerGid);
    const peer = dst === undefined ? undefined : self.vpc.members.get(dst);
    if (peer === undefined) return PolicyReason.PEER_REMOVED;
    const oldPeer = dst === undefined ? undefined : old?.vpc.members.get(dst);
    if (oldPeer !== undefined && oldPeer.spec.id !== peer.spec.id) return PolicyReason.PEER_REMOVED;
    if (oldPeer !== undefined && oldPeer.hostIp !== peer.hostIp) return PolicyReason.MAPPING_CHANGED;
    return evaluate(self.vpc, self.ip, peer.ip, qpType).allow ? undefined : PolicyReason.RULE_CHANGED;
  }

  /** Counts teardowns a device did itself (the device link). */
  countTeardowns(vmId: string, n: number, latencyMs: number): void {
    for (let i = 0; i < n; i++) this.count(vmId, (k) => k.tornDown++);
    if (n === 0) return;
    this.metrics.lastTeardownLatencyMs = latencyMs;
    this.metrics.maxTeardownLatencyMs = Math.max(this.metrics.maxTeardownLatencyMs, latencyMs);
    this.metrics.teardownLatenciesMs.push(latencyMs);
    if (this.metrics.teardownLatenciesMs.length > TEARDOWN_LATENCY_HISTORY) this.metrics.teardownLatenciesMs.shift();
  }

  /** What each connection's own VM looked like when it was established. */
  private readonly connectionSelf = new Map<number, { ip: number; vpc: string; host: string }>();

  private withPair(c: Connection): Connection[] {
    const pair = c.pairedWith === undefined ? undefined : this.connections.get(c.pairedWith);
    return pair === undefined ? [c] : [c, pair];
  }

  private tearDown(c: Connection, reason: TeardownReason, observedAt: number): number {
    this.forget(c);
    const latencyMs = performance.now() - observedAt;
    this.count(c.vmId, (k) => k.tornDown++);
    const sink = this.sinks.get(c.vmId);
    const notice: TeardownNotice = { connection: c, reason, detail: PolicyReason[reason], latencyMs };
    if (sink !== undefined) {
      try {
        sink(notice);
      } catch (e) {
        this.metrics.sinkErrors++;
        this.log.log('error', 'a device failed to tear a connection down', { vm: c.vmId, connection: c.id, error: (e as Error).message });
      }
    } else {
      this.log.log('warn', 'no device attached for a connection to tear down', { vm: c.vmId, connection: c.id });
    }
    const done = performance.now() - observedAt;
    this.metrics.lastTeardownLatencyMs = done;
    this.metrics.maxTeardownLatencyMs = Math.max(this.metrics.maxTeardownLatencyMs, done);
    this.metrics.teardownLatenciesMs.push(done);
    if (this.metrics.teardownLatenciesMs.length > TEARDOWN_LATENCY_HISTORY) this.metrics.teardownLatenciesMs.shift();
    this.log.log('debug', 'connection torn down by policy', {
      vm: c.vmId,
      kind: c.kind,
      local: c.local,
      peer: c.peer.virtualIp,
      reason,
      latencyMs: done.toFixed(3),
    });
    return done;
  }

  // --------------------------------------------------------------------------------------- addresses, resolution

  /** The VM's own virtual address and what the device derives from it, or undefined when the policy has no such VM. */
  ownAddress(vmId: string): { vpc: string; ip: string; gid: Uint8Array; mac: Uint8Array; qkey: number; trafficClass: number; hostId: string } | undefined {
    const vm = this.policy?.vms.get(vmId);
    if (vm === undefined) return undefined;
    const gid = gidOfIpv4Number(vm.ip);
    const mac =
      vm.spec.mac !== undefined
        ? Uint8Array.from(vm.spec.mac.split(':').map((h) => parseInt(h, 16)))
        : Uint8Array.from([0x02, 0x00, gid[12]!, gid[13]!, gid[14]!, gid[15]!]); // locally administered, from the IP
    return { vpc: vm.vpc.spec.id, ip: vm.spec.ip, gid, mac, qkey: vm.vpc.qkey, trafficClass: vm.vpc.tenant.qos.dscp << 2, hostId: vm.host.id };
  }

  /**
   * Resolves a destination named by its virtual GID, from VM `vmId`, for a QP type. The source is always the VM's
   * own address (the guest cannot name it). Counts the outcome.
   */
  resolve(vmId: string, destination: Uint8Array, qpType: QpTypeName): Decision {
    const d = this.decide(vmId, destination, qpType);
    this.count(vmId, (k) => {
      if (d.ok) k.allowed++;
      else if (d.refusal === 'refused') k.refusedByRule++;
      else {
        k.unreachable++;
        if (d.why === 'other-vpc') k.otherVpc++;
        else k.unknownDestination++;
      }
    });
    if (!d.ok) this.log.log('debug', 'connection refused', { vm: vmId, why: d.why, type: qpType });
    return d;
  }

  private decide(vmId: string, destination: Uint8Array, qpType: QpTypeName): Decision {
    const self = this.policy?.vms.get(vmId);
    if (self === undefined) return { ok: false, refusal: 'unreachable', why: 'unknown-source' };
    const dst = ipv4NumberFromGid(destination);
    if (dst === undefined) return { ok: false, refusal: 'unreachable', why: 'not-a-virtual-gid' };
    const peer = self.vpc.members.get(dst);
    if (peer === undefined) {
      const elsewhere = [...this.policy!.vpcs.values()].some((v) => v !== self.vpc && v.members.has(dst));
      return { ok: false, refusal: 'unreachable', why: elsewhere ? 'other-vpc' : 'unknown-destination' };
    }
    const verdict = evaluate(self.vpc, self.ip, peer.ip, qpType);
    if (!verdict.allow) return { ok: false, refusal: 'refused', why: verdict.ruleId === DEFAULT_RULE_ID ? 'default' : 'rule', ruleId: verdict.ruleId };
    return {
      ok: true,
      hostGid: gidOfIpv4Number(peer.hostIp),
      hostId: peer.host.id,
      peerVmId: peer.spec.id,
      trafficClass: self.vpc.tenant.qos.dscp << 2,
      ruleId: verdict.ruleId,
    };
  }

  /** The traffic class of the provider's own traffic (never equal to a tenant's). */
  get providerTrafficClass(): number | undefined {
    return this.policy === undefined ? undefined : this.policy.doc.provider.dscp << 2;
  }

  // ------------------------------------------------------------------------------------ connection tracking

  /** The device's teardown sink for VM `vmId` (one per VM). Returns the detach function. */
  attach(vmId: string, sink: TeardownSink): () => void {
    if (this.sinks.has(vmId)) throw new Error(`VM ${vmId} already has a device attached to the VPC engine`);
    this.sinks.set(vmId, sink);
    return () => {
      if (this.sinks.get(vmId) === sink) this.sinks.delete(vmId);
    };
  }

  /**
   * Records a connection the device established after resolve() allowed it (RC: the host QP reached RTR; UD: the
   * host AH exists). Re-checks it against the policy in force, since a change may have come in between: a
   * connection no longer allowed is not recorded and the answer says why (the device then tears it down itself).
   */
  track(
    vmId: string,
    c: { kind: 'RC' | 'UD'; local: number; guestHandle: number; peerGid: Uint8Array; peerQpn?: number },
  ): { ok: true; connection: Connection } | { ok: false; reason: TeardownReason } {
    const self = this.policy?.vms.get(vmId);
    const dst = ipv4NumberFromGid(c.peerGid);
    const peer = dst === undefined ? undefined : self?.vpc.members.get(dst);
    if (self === undefined) return { ok: false, reason: 'MAPPING_CHANGED' };
    if (peer === undefined) return { ok: false, reason: 'PEER_REMOVED' };
    const verdict = evaluate(self.vpc, self.ip, peer.ip, c.kind);
    if (!verdict.allow) return { ok: false, reason: 'RULE_CHANGED' };
    const key = `${vmId}/${c.kind}/${c.local}`;
    const previous = this.connectionKeys.get(key);
    if (previous !== undefined) this.forget(this.connections.get(previous)!); // re-connected: the new one replaces it
    const connection: Connection = {
      id: this.nextConnectionId++,
      kind: c.kind,
      vmId,
      local: c.local,
      guestHandle: c.guestHandle,
      peer: { vmId: peer.spec.id, virtualIp: peer.spec.ip, hostId: peer.host.id, hostIp: peer.host.address },
      ruleId: verdict.ruleId,
      establishedAt: Date.now(),
    };
    if (c.peerQpn !== undefined) connection.peer.qpn = c.peerQpn;
    // The other end on this host: the peer VM's RC QP `peerQpn` connected back to this QP.
    if (c.kind === 'RC' && c.peerQpn !== undefined) {
      const otherId = this.connectionKeys.get(`${peer.spec.id}/RC/${c.peerQpn}`);
      const other = otherId === undefined ? undefined : this.connections.get(otherId);
      if (other !== undefined && other.peer.vmId === vmId && other.peer.qpn === c.local) {
        other.pairedWith = connection.id;
        connection.pairedWith = other.id;
      }
    }
    this.connections.set(connection.id, connection);
    this.connectionKeys.set(key, connection.id);
    this.connectionSelf.set(connection.id, { ip: self.ip, vpc: self.vpc.spec.id, host: self.host.id });
    return { ok: true, connection };
  }

  /** The device destroyed the QP (RC) or AH (UD): forget its connection. */
  untrack(vmId: string, kind: 'RC' | 'UD', local: number): void {
    const id = this.connectionKeys.get(`${vmId}/${kind}/${local}`);
    if (id !== undefined) this.forget(this.connections.get(id)!);
  }

  private forget(c: Connection): void {
    this.connections.delete(c.id);
    this.connectionSelf.delete(c.id);
    const key = `${c.vmId}/${c.kind}/${c.local}`;
    if (this.connectionKeys.get(key) === c.id) this.connectionKeys.delete(key);
    if (c.pairedWith !== undefined) {
      const other = this.connections.get(c.pairedWith);
      if (other !== undefined && other.pairedWith === c.id) delete other.pairedWith;
    }
  }

  /** Every tracked connection of VM `vmId` (the operator's view), oldest first. */
  connectionsOf(vmId: string): Connection[] {
    return [...this.connections.values()].filter((c) => c.vmId === vmId);
  }

  /** An operator tears down a VM's connections (reason OPERATOR). */
  tearDownVm(vmId: string): number {
    const at = performance.now();
    let n = 0;
    for (const c of this.connectionsOf(vmId)) {
      if (!this.connections.has(c.id)) continue;
      for (const victim of this.withPair(c)) {
        this.tearDown(victim, 'OPERATOR', at);
        n++;
      }
    }
    return n;
  }

  // ----------------------------------------------------------------------------------- UD source reverse lookup

  registerQp(vmId: string, qpn: number): void {
    const vm = this.policy?.vms.get(vmId);
    if (vm !== undefined) this.qpOwners.set(`${vm.hostIp}:${qpn}`, vmId);
  }

  unregisterQp(vmId: string, qpn: number): void {
    for (const [key, owner] of this.qpOwners) if (owner === vmId && key.endsWith(`:${qpn}`)) this.qpOwners.delete(key);
    this.untrack(vmId, 'RC', qpn);
  }

  /**
   * The virtual GID of a UD sender seen by VM `vmId`: the owner of (host, QPN) when this backend knows it, else
   * the only VM of `vmId`'s VPC on that host; undefined when the sender has no address in the VPC.
   */
  reverse(vmId: string, hostGid: Uint8Array, srcQpn: number): Uint8Array | undefined {
    const self = this.policy?.vms.get(vmId);
    const hostIp = ipv4NumberFromGid(hostGid);
    if (self === undefined || hostIp === undefined) return undefined;
    const owner = this.qpOwners.get(`${hostIp}:${srcQpn}`);
    if (owner !== undefined) {
      const vm = this.policy!.vms.get(owner);
      return vm !== undefined && vm.vpc === self.vpc ? gidOfIpv4Number(vm.ip) : undefined;
    }
    const onHost = [...self.vpc.members.values()].filter((m) => m.hostIp === hostIp);
    return onHost.length === 1 ? gidOfIpv4Number(onHost[0]!.ip) : undefined;
  }

  // --------------------------------------------------------------------------------------------------- quotas

  /** The quota of VM `vmId` for each kind, or undefined for an unknown VM. */
  quotasOf(vmId: string): Quotas | undefined {
    const vm = this.policy?.vms.get(vmId);
    return vm === undefined ? undefined : { ...vm.quotas };
  }

  usageOf(vmId: string): Quotas {
    return { ...(this.vmUsage.get(vmId)?.used ?? zeroQuotas()) };
  }

  /**
   * Charges `amount` of `kind` to VM `vmId` and its host, or refuses (counted as a quota hit) and charges nothing.
   * A lowered quota refuses new charges; what is already charged stays until released.
   */
  charge(vmId: string, kind: QuotaKind, amount = 1): ChargeResult {
    if (!Number.isSafeInteger(amount) || amount < 0) throw new RangeError(`a quota charge is a non-negative integer, got ${amount}`);
    const vm = this.policy?.vms.get(vmId);
    if (vm === undefined) return { ok: false, kind, scope: 'unknown-vm', limit: 0, used: 0 };
    const vmRow = this.row(this.vmUsage, vmId);
    const hostRow = this.row(this.hostUsage, vm.host.id);
    const limit = vm.quotas[kind];
    if (vmRow.used[kind] + amount > limit) return this.quotaHit(vm, kind, 'vm', limit, vmRow.used[kind]);
    const cap = vm.host.capacity?.[kind];
    if (cap !== undefined && hostRow.used[kind] + amount > cap) return this.quotaHit(vm, kind, 'host', cap, hostRow.used[kind]);
    vmRow.used[kind] += amount;
    hostRow.used[kind] += amount;
    let released = false;
    return {
      ok: true,
      charge: {
        vmId,
        kind,
        amount,
        release: () => {
          if (released) return;
          released = true;
          vmRow.used[kind] -= amount;
          hostRow.used[kind] -= amount;
        },
      },
    };
  }

  /** Runs `work` under a charge: released when `work` throws, kept (and returned) when it succeeds. */
  async withCharge<T>(vmId: string, kind: QuotaKind, amount: number, work: () => Promise<T>): Promise<{ ok: true; value: T; charge: QuotaCharge } | Extract<ChargeResult, { ok: false }>> {
    const r = this.charge(vmId, kind, amount);
    if (!r.ok) return r;
    try {
      return { ok: true, value: await work(), charge: r.charge };
    } catch (e) {
      r.charge.release();
      throw e;
    }
  }

  private row(map: Map<string, UsageRow>, key: string): UsageRow {
    let row = map.get(key);
    if (row === undefined) map.set(key, (row = { used: zeroQuotas() }));
    return row;
  }

  private quotaHit(vm: CompiledVm, kind: QuotaKind, scope: 'vm' | 'host', limit: number, used: number): ChargeResult {
    this.count(vm.spec.id, (k) => k.quotaHits[kind]++);
    this.log.log('info', 'quota reached', { vm: vm.spec.id, kind, scope, limit, used });
    return { ok: false, kind, scope, limit, used };
  }

  /**
   * Counts a quota the device itself enforced (its handle tables and MR bytes are sized from quotasOf): the device
   * refused with NO_RESOURCES and the kind; the engine only keeps the count for the operator.
   */
  countQuotaHit(vmId: string, kind: QuotaKind): void {
    this.count(vmId, (k) => k.quotaHits[kind]++);
  }

  // ----------------------------------------------------------------------------------------- observability

  private count(vmId: string, bump: (c: Counters) => void): void {
    let c = this.vmCounters.get(vmId);
    if (c === undefined) this.vmCounters.set(vmId, (c = newCounters()));
    bump(c);
    const vpc = this.policy?.vms.get(vmId)?.vpc.spec.id;
    if (vpc === undefined) return;
    let v = this.vpcCounters.get(vpc);
    if (v === undefined) this.vpcCounters.set(vpc, (v = newCounters()));
    bump(v);
  }

  countersOfVm(vmId: string): Counters {
    return structuredClone(this.vmCounters.get(vmId) ?? newCounters());
  }

  countersOfVpc(vpcId: string): Counters {
    return structuredClone(this.vpcCounters.get(vpcId) ?? newCounters());
  }

  /** The operator's view of one VM: address, placement, QoS, quotas and usage, connections, counters. */
  describeVm(vmId: string): VmView | undefined {
    const vm = this.policy?.vms.get(vmId);
    if (vm === undefined) return undefined;
    const qos = vm.vpc.tenant.qos;
    return {
      vm: vmId,
      tenant: vm.vpc.tenant.id,
      vpc: vm.vpc.spec.id,
      virtualIp: vm.spec.ip,
      gid: `::ffff:${vm.spec.ip}`,
      host: vm.host.id,
      hostGid: `::ffff:${vm.host.address}`,
      qkey: vm.vpc.qkey,
      qos: {
        dscp: qos.dscp,
        trafficClass: qos.dscp << 2,
        rateLimitMbps: qos.rateLimitMbps ?? null,
        // rxe (and libibverbs' RC/UD QPs generally) offer no per-QP rate limit: IBV_QP_RATE_LIMIT is for raw packet
        // QPs of some RNICs. What is enforced instead: the DSCP marking (the network's policers act on it) and the
        // quotas. Said here, so an operator never assumes a limit that is not there.
        rateLimitEnforced: false,
        enforced: qos.rateLimitMbps === undefined ? 'traffic class' : 'traffic class only: the host verbs offer no per-QP rate limit (rxe)',
      },
      quotas: Object.fromEntries(QUOTA_KINDS.map((k) => [k, { limit: vm.quotas[k], used: this.vmUsage.get(vmId)?.used[k] ?? 0 }])) as VmView['quotas'],
      connections: this.connectionsOf(vmId).map((c) => ({
        kind: c.kind,
        local: c.local,
        guestHandle: c.guestHandle,
        peerVm: c.peer.vmId,
        peerIp: c.peer.virtualIp,
        peerHost: c.peer.hostId,
        peerQpn: c.peer.qpn ?? null,
        rule: c.ruleId,
        establishedAt: new Date(c.establishedAt).toISOString(),
      })),
      counters: this.countersOfVm(vmId),
    };
  }

  /** Every VM of the policy placed on host `hostId`. */
  vmsOnHost(hostId: string): string[] {
    return [...(this.policy?.vms.values() ?? [])].filter((v) => v.host.id === hostId).map((v) => v.spec.id);
  }

  /** Where a VM sits, and the VM a virtual GID names in its VPC, uncounted (the wire QPN ownership check). */
  placementOf(vmId: string, peerGid?: Uint8Array): { vm: string; hostGid: Uint8Array } | undefined {
    const self = this.policy?.vms.get(vmId);
    const ip = peerGid === undefined ? undefined : ipv4NumberFromGid(peerGid);
    const vm = peerGid === undefined ? self : ip === undefined ? undefined : self?.vpc.members.get(ip);
    return vm === undefined ? undefined : { vm: vm.spec.id, hostGid: gidOfIpv4Number(vm.hostIp) };
  }

  /** Virtual IP of `vmId` as a number, for tests and tools. */
  addressOf(vmId: string): string | undefined {
    const vm = this.policy?.vms.get(vmId);
    return vm === undefined ? undefined : formatIpv4(vm.ip);
  }
}

export interface VmView {
  vm: string;
  tenant: string;
  vpc: string;
  virtualIp: string;
  gid: string;
  host: string;
  hostGid: string;
  qkey: number;
  qos: { dscp: number; trafficClass: number; rateLimitMbps: number | null; rateLimitEnforced: boolean; enforced: string };
  quotas: Record<QuotaKind, { limit: number; used: number }>;
  connections: {
    kind: 'RC' | 'UD';
    local: number;
    guestHandle: number;
    peerVm: string;
    peerIp: string;
    peerHost: string;
    peerQpn: number | null;
    rule: number;
    establishedAt: string;
  }[];
  counters: Counters;
}
