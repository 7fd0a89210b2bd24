// Who owns each wire QPN, as the connect-time check of spec 12.3 needs it (issue 12 item 1).
//
// MODIFY_QP to RTR names the peer by a virtual GID (resolved inside the guest's VPC) and a wire QPN (taken from the
// guest). The host QP accepts packets from any QP of the host its address vector names, so a QPN that belongs to a
// VM of another VPC on that host would let the guest write into that VM's memory. The device therefore asks,
// before the host QP moves to RTR: does QPN `q` on the peer's host belong to the VM the virtual GID resolved to,
// and (RC) is that QP unconnected or connected to this very QP? (MasQ's connection tracking, one level.)
//
// The backends of different VMs are different processes, so the answer comes from a registry every backend of a
// host publishes to: `QpRegistry`. Implementations: `MemoryQpRegistry` (one process: tests, several devices in
// one backend), `DirQpRegistry` (qp-registry-dir.ts: a directory shared by the backends of one host), and the etcd
// registry (vmm-device/vpc/etcd-qp-registry.ts: across hosts). `QpOwnership` joins a registry to a resolver's
// tables; both resolvers (the static table and the VPC's) use it.

import type { GidKey } from './gid-key.ts';

/** What the registry knows of one wire QPN on one host. */
export interface QpRecord {
  /** The VM whose device created the QP. */
  vm: string;
  /** Set once the QP went to RTR (RC): the VM and wire QPN it is connected to. */
  peer?: { vm: string; qpn: number };
}

/** `unverifiable`: no registry this backend reaches holds that host's QPNs (the check then refuses). */
export type QpLookup = QpRecord | undefined | 'unverifiable';

export interface QpRegistry {
  /** QP `qpn` of VM `vm` exists on host `host` (its host GID, hex). */
  created(host: GidKey, qpn: number, vm: string): void;
  /** That QP went to RTR connected to `peer`. */
  connected(host: GidKey, qpn: number, vm: string, peer: { vm: string; qpn: number }): void;
  /** That QP is destroyed (DESTROY_QP, reset, backend shutdown). */
  destroyed(host: GidKey, qpn: number, vm: string): void;
  lookup(host: GidKey, qpn: number): Promise<QpLookup>;
}

/** Why the check refused; the guest sees DESTINATION_UNREACHABLE at `dest_qp_num` for each (spec 12.3). */
export type PeerQpRefusal = 'not-owner' | 'connected-elsewhere' | 'unverifiable';
export type PeerQpAnswer = { ok: true } | { ok: false; why: PeerQpRefusal };

/** The judgement itself, apart from where the record came from. */
export function judgePeerQp(rec: QpLookup, self: { vm: string; qpn: number }, peerVm: string): PeerQpAnswer {
  if (rec === 'unverifiable') return { ok: false, why: 'unverifiable' };
  // A QPN nobody owns and one owned by another VM (of this VPC or another) get the same answer: nothing leaks.
  if (rec === undefined || rec.vm !== peerVm) return { ok: false, why: 'not-owner' };
  if (rec.peer !== undefined && (rec.peer.vm !== self.vm || rec.peer.qpn !== self.qpn)) return { ok: false, why: 'connected-elsewhere' };
  return { ok: true };
}

/** One process's registry: every device of the process publishes here (and a test's several "hosts"). */
export class MemoryQpRegistry implements QpRegistry {
  private readonly records = new Map<string, QpRecord>();

  created(host: GidKey, qpn: number, vm: string): void {
    this.records.set(`${host}:${qpn}`, { vm });
  }

  connected(host: GidKey, qpn: number, vm: string, peer: { vm: string; qpn: number }): void {
    this.records.set(`${host}:${qpn}`, { vm, peer: { ...peer } });
  }

  destroyed(host: GidKey, qpn: number, vm: string): void {
    const key = `${host}:${qpn}`;
    if (this.records.get(key)?.vm === vm) this.records.delete(key);
  }

  async lookup(host: GidKey, qpn: number): Promise<QpLookup> {
    const r = this.records.get(`${host}:${qpn}`);
    return r === undefined ? undefined : { ...r };
  }

  get size(): number {
    return this.records.size;
  }
}

/** Several registries: publish to each; a lookup takes the first answer that is not `unverifiable`. */
export class ChainedQpRegistry implements QpRegistry {
  constructor(private readonly registries: readonly QpRegistry[]) {}

  created(host: GidKey, qpn: number, vm: string): void {
    for (const r of this.registries) r.created(host, qpn, vm);
  }

  connected(host: GidKey, qpn: number, vm: string, peer: { vm: string; qpn: number }): void {
    for (const r of this.registries) r.connected(host, qpn, vm, peer);
  }

  destroyed(host: GidKey, qpn: number, vm: string): void {
    for (const r of this.registries) r.destroyed(host, qpn, vm);
  }

  async lookup(host: GidKey, qpn: number): Promise<QpLookup> {
    for (const r of this.registries) {
      const found = await r.lookup(host, qpn);
      if (found !== 'unverifiable') return found;
    }
    return 'unverifiable';
  }
}

export interface OwnershipCounters {
  checked: number;
  notOwner: number;
  connectedElsewhere: number;
  unverifiable: number;
}

/**
 * A registry seen through a resolver's tables: which host GID a VM sits on, and which VM a virtual GID names in a
 * VM's VPC. The resolvers forward registerQp/unregisterQp/qpConnected here and answer checkPeerQp with it.
 */
export class QpOwnership {
  readonly counters: OwnershipCounters = { checked: 0, notOwner: 0, connectedElsewhere: 0, unverifiable: 0 };

  constructor(
    readonly registry: QpRegistry,
    /** The host GID (hex) VM `vmId` sits on, if known. */
    private readonly hostOf: (vmId: string) => GidKey | undefined,
    /** The VM a virtual GID names inside `vmId`'s VPC, and its host GID (hex). */
    private readonly peerOf: (vmId: string, virtualGid: Uint8Array) => { vm: string; host: GidKey } | undefined,
  ) {}

  created(vmId: string, qpn: number): void {
    const host = this.hostOf(vmId);
    if (host !== undefined) this.registry.created(host, qpn, vmId);
  }

  destroyed(vmId: string, qpn: number): void {
    const host = this.hostOf(vmId);
    if (host !== undefined) this.registry.destroyed(host, qpn, vmId);
  }

  connected(vmId: string, qpn: number, peerGid: Uint8Array, peerQpn: number): void {
    const host = this.hostOf(vmId);
    const peer = this.peerOf(vmId, peerGid);
    if (host !== undefined && peer !== undefined) this.registry.connected(host, qpn, vmId, { vm: peer.vm, qpn: peerQpn });
  }

  /** Before an RC QP `qpn` of `vmId` moves to RTR towards `peerGid`/`peerQpn`. */
  async check(vmId: string, c: { qpn: number; peerGid: Uint8Array; peerQpn: number }): Promise<PeerQpAnswer> {
    this.counters.checked++;
    const peer = this.peerOf(vmId, c.peerGid);
    const answer: PeerQpAnswer = peer === undefined ? { ok: false, why: 'not-owner' } : judgePeerQp(await this.registry.lookup(peer.host, c.peerQpn), { vm: vmId, qpn: c.qpn }, peer.vm);
    if (!answer.ok) {
      if (answer.why === 'not-owner') this.counters.notOwner++;
      else if (answer.why === 'connected-elsewhere') this.counters.connectedElsewhere++;
      else this.counters.unverifiable++;
    }
    return answer;
  }
}
