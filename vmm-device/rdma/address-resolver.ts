// How the device learns the guest's own virtual address and resolves the guest's destinations (spec section 12).
// The guest names peers by VIRTUAL GIDs of its VPC; the device asks an AddressResolver for the host GID that
// carries each one. This file holds the interface and the simple per-host table the VPC work (issue 6) will replace
// with its file/etcd control plane: the device only ever talks to the interface.

import { z } from 'zod';
import { readFileSync } from 'node:fs';
import { Limits } from '../abi/rdma/index.ts';
import { QpOwnership, type PeerQpAnswer, type QpRegistry } from './qp-ownership.ts';

export { gidKey, type GidKey } from './gid-key.ts';
import { gidKey, type GidKey } from './gid-key.ts';

/** The RoCE v2 GID of an IPv4 address: ::ffff:a.b.c.d (spec section 5.1). */
export function gidFromIpv4(ip: string): Uint8Array {
  const parts = ip.split('.').map((p) => Number(p));
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new RangeError(`${JSON.stringify(ip)} is not an IPv4 address a.b.c.d`);
  }
  const gid = new Uint8Array(Limits.GID_SIZE);
  gid[10] = 0xff;
  gid[11] = 0xff;
  gid.set(parts, 12);
  return gid;
}

/** The IPv4 address inside an IPv4-mapped GID, or undefined for any other GID. */
export function ipv4FromGid(gid: Uint8Array): string | undefined {
  for (let i = 0; i < 10; i++) if (gid[i] !== 0) return undefined;
  if (gid[10] !== 0xff || gid[11] !== 0xff) return undefined;
  return `${gid[12]}.${gid[13]}.${gid[14]}.${gid[15]}`;
}

/** The guest's own address, as the backend assigns it (configuration `gid` and `mac`). */
export interface VirtualAddress {
  vpc: string;
  gid: Uint8Array;
  mac: Uint8Array;
  /** The Q_Key the host uses for every UD QP and send of this VPC (spec section 12.4); bit 31 clear. */
  qkey: number;
  /** Traffic class the tenant's QoS class imposes on host QPs and AHs, if any (spec section 12.5). */
  trafficClass?: number;
}

export type Resolution =
  | { kind: 'ok'; hostGid: Uint8Array; trafficClass?: number }
  /** Not an address of the guest's VPC (whether it exists elsewhere or nowhere: the answer must not say). */
  | { kind: 'unreachable' }
  /** The VPC's rules refuse the connection; `rule` is the `detail` the guest gets (0 when anonymous). */
  | { kind: 'refused'; rule: number };

export interface AddressResolver {
  /** The address of VM `vmId`, or undefined when the backend has none for it (the device then refuses to start). */
  ownAddress(vmId: string): VirtualAddress | undefined;
  /** Resolves a destination named by its virtual GID inside VM `vmId`'s own VPC. */
  resolve(vmId: string, virtualGid: Uint8Array, qpType: number): Resolution;
  /**
   * The host GID of VM `vmId` itself, for tools (the flight recorder's address table): a look-up that, unlike
   * resolve(), is no connection attempt and counts nothing.
   */
  ownHostGid?(vmId: string): Uint8Array | undefined;
  /**
   * The virtual GID of the sender of a UD datagram that arrived for VM `vmId` from host GID `hostGid` and wire QPN
   * `srcQpn`, or undefined when that sender has no address in `vmId`'s VPC (spec section 10.9).
   */
  reverse(vmId: string, hostGid: Uint8Array, srcQpn: number): Uint8Array | undefined;
  /** A device tells the resolver which wire QPNs belong to which VM (for `reverse` on a host shared by VMs). */
  registerQp(vmId: string, qpn: number): void;
  /** Also forgets the QP's tracked connection, if the resolver tracks connections. */
  unregisterQp(vmId: string, qpn: number): void;

  // Connection tracking (spec 12.3), optional: a resolver with a control plane that can change under a running
  // guest (vmm-device/vpc's PolicyHooks) implements these; the device calls each one that is present.

  /**
   * The host RC QP `qpn` (guest handle `guestHandle`) of VM `vmId` reached RTR connected to the VIRTUAL GID
   * `peerGid` and wire QPN `peerQpn`. A `teardown` answer (the policy changed between the resolution and now)
   * makes the device tear the connection down at once.
   */
  qpConnected?(vmId: string, c: { qpn: number; guestHandle: number; qpType: number; peerGid: Uint8Array; peerQpn: number }): ConnectionAnswer;
  /** The device's AH `guestHandle` of VM `vmId` to the VIRTUAL GID `peerGid` exists on the host. */
  ahCreated?(vmId: string, c: { guestHandle: number; peerGid: Uint8Array }): ConnectionAnswer;
  ahDestroyed?(vmId: string, guestHandle: number): void;
  /**
   * The device gives its sink once, when it opens; the sink is called (synchronously, inside a policy change) once
   * per connection of `vmId` that became illegal. Returns the detach function the device calls when it closes.
   */
  attachDevice?(vmId: string, sink: (notice: ConnectionTeardown) => void): () => void;

  /**
   * Before an RC QP `qpn` of VM `vmId` moves to RTR towards the VIRTUAL GID `peerGid` and wire QPN `peerQpn`: does
   * that QPN belong to the VM the GID resolves to, and is it unconnected or connected to this QP (spec 12.3)? A
   * refusal is DESTINATION_UNREACHABLE at `dest_qp_num`. A resolver without a QPN registry answers ok.
   */
  checkPeerQp?(vmId: string, c: { qpn: number; peerGid: Uint8Array; peerQpn: number }): Promise<PeerQpAnswer>;
}

/** The resolver's answer to a connection the device reports; `detail` is a PolicyReason (spec 9.1). */
export type ConnectionAnswer = { ok: true } | { ok: false; teardown: { reason: string; detail: number } };

/** What the device needs of a teardown notice (vmm-device/vpc's TeardownNotice has these fields and more). */
export interface ConnectionTeardown {
  connection: {
    kind: 'RC' | 'UD';
    /** RC: the host QPN of the device's QP. UD: the device's AH handle. */
    local: number;
    /** The guest's handle of the QP (RC) or AH (UD). */
    guestHandle: number;
  };
  /** PolicyReason value: the `detail` of QP_POLICY_TEARDOWN. */
  detail: number;
}

// ---------------------------------------------------------------------------------------------------------------
// The per-host table

/** Largest number of VMs in one table file (a bound on what a file can make the backend allocate). */
export const MAX_TABLE_ENTRIES = 65536;
const VPC_QKEY_BASE = 0x1000_0000;

const ipv4 = z
  .string()
  .regex(/^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/, 'must be an IPv4 address a.b.c.d')
  .refine((s) => s.split('.').every((p) => Number(p) <= 255), 'every part of the address must be at most 255');
const mac = z.string().regex(/^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$/, 'must be a MAC address xx:xx:xx:xx:xx:xx');

export const GidTableEntrySchema = z
  .object({
    vmId: z.string().min(1).max(128),
    vpc: z.string().min(1).max(128),
    virtualIp: ipv4,
    /** The host's RoCE v2 address that carries this VM (the IPv4 address of the host's RDMA netdev). */
    hostIp: ipv4,
    mac: mac.optional(),
    trafficClass: z.number().int().min(0).max(255).optional(),
  })
  .strict();

export const GidTableFileSchema = z
  .object({ vms: z.array(GidTableEntrySchema).max(MAX_TABLE_ENTRIES) })
  .strict();

export type GidTableEntry = z.infer<typeof GidTableEntrySchema>;

function macBytes(text: string | undefined, ip: Uint8Array): Uint8Array {
  if (text === undefined) {
    // A locally administered unicast MAC derived from the virtual IP: 02:00:a:b:c:d.
    return Uint8Array.from([0x02, 0x00, ip[12]!, ip[13]!, ip[14]!, ip[15]!]);
  }
  return Uint8Array.from(text.split(':').map((h) => parseInt(h, 16)));
}

/** A stable Q_Key per VPC name, bit 31 clear (never a controlled Q_Key). */
export function vpcQkey(vpc: string): number {
  let h = 0x811c9dc5;
  for (const c of Buffer.from(vpc, 'utf8')) h = Math.imul(h ^ c, 0x01000193) >>> 0;
  return (VPC_QKEY_BASE | (h & 0x0fff_ffff)) >>> 0;
}

interface TableVm {
  entry: GidTableEntry;
  virtualGid: Uint8Array;
  hostGid: Uint8Array;
  /** gidKey(hostGid), made once: every QP created and destroyed names it. */
  hostKey: GidKey;
}

/** The per-host table: every VM of every VPC this host knows, from a file or from code. */
export class StaticAddressResolver implements AddressResolver {
  private readonly byVm = new Map<string, TableVm>();
  /** vpc -> virtual GID key -> VM. */
  private readonly byVpc = new Map<string, Map<GidKey, TableVm>>();
  /** host GID key + ':' + qpn -> vmId. */
  private readonly qpOwners = new Map<string, string>();
  /** Resolutions answered, by outcome (the operator's view). */
  readonly counters = { resolved: 0, unreachable: 0 };
  /** Wire QPN ownership across the backends of the host(s) (useQpRegistry); none: no connect-time QPN check. */
  ownership: QpOwnership | undefined;

  constructor(entries: readonly GidTableEntry[]) {
    for (const [i, raw] of entries.entries()) {
      const entry = GidTableEntrySchema.parse(raw);
      if (this.byVm.has(entry.vmId)) throw new Error(`vms[${i}].vmId: ${entry.vmId} appears twice`);
      const hostGid = gidFromIpv4(entry.hostIp);
      const vm: TableVm = { entry, virtualGid: gidFromIpv4(entry.virtualIp), hostGid, hostKey: gidKey(hostGid) };
      let vpc = this.byVpc.get(entry.vpc);
      if (vpc === undefined) this.byVpc.set(entry.vpc, (vpc = new Map()));
      const key = gidKey(vm.virtualGid);
      if (vpc.has(key)) throw new Error(`vms[${i}].virtualIp: ${entry.virtualIp} is used twice in VPC ${entry.vpc}`);
      vpc.set(key, vm);
      this.byVm.set(entry.vmId, vm);
    }
  }

  /** Reads a JSON table file; every error names the file and the field. */
  static fromFile(path: string): StaticAddressResolver {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      throw new Error(`--gid-table ${path}: cannot read it (${(e as Error).message})`);
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      throw new Error(`--gid-table ${path}: not JSON (${(e as Error).message})`);
    }
    const parsed = GidTableFileSchema.safeParse(json);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      throw new Error(`--gid-table ${path}: ${issue.path.join('.') || '(top level)'}: ${issue.message}`);
    }
    try {
      return new StaticAddressResolver(parsed.data.vms);
    } catch (e) {
      throw new Error(`--gid-table ${path}: ${(e as Error).message}`);
    }
  }

  ownHostGid(vmId: string): Uint8Array | undefined {
    return this.byVm.get(vmId)?.hostGid.slice();
  }

  ownAddress(vmId: string): VirtualAddress | undefined {
    const vm = this.byVm.get(vmId);
    if (vm === undefined) return undefined;
    const out: VirtualAddress = {
      vpc: vm.entry.vpc,
      gid: vm.virtualGid.slice(),
      mac: macBytes(vm.entry.mac, vm.virtualGid),
      qkey: vpcQkey(vm.entry.vpc),
    };
    if (vm.entry.trafficClass !== undefined) out.trafficClass = vm.entry.trafficClass;
    return out;
  }

  resolve(vmId: string, virtualGid: Uint8Array, _qpType: number): Resolution {
    const self = this.byVm.get(vmId);
    const peer = self === undefined ? undefined : this.byVpc.get(self.entry.vpc)?.get(gidKey(virtualGid));
    if (self === undefined || peer === undefined) {
      this.counters.unreachable++;
      return { kind: 'unreachable' };
    }
    this.counters.resolved++;
    const out: Resolution = { kind: 'ok', hostGid: peer.hostGid.slice() };
    if (self.entry.trafficClass !== undefined) out.trafficClass = self.entry.trafficClass;
    return out;
  }

  reverse(vmId: string, hostGid: Uint8Array, srcQpn: number): Uint8Array | undefined {
    const self = this.byVm.get(vmId);
    const owner = this.qpOwners.get(`${gidKey(hostGid)}:${srcQpn}`);
    if (self === undefined || owner === undefined) return undefined;
    const peer = this.byVm.get(owner);
    if (peer === undefined || peer.entry.vpc !== self.entry.vpc) return undefined;
    return peer.virtualGid.slice();
  }

  registerQp(vmId: string, qpn: number): void {
    const vm = this.byVm.get(vmId);
    if (vm !== undefined) this.qpOwners.set(`${vm.hostKey}:${qpn}`, vmId);
    this.ownership?.created(vmId, qpn);
  }

  unregisterQp(vmId: string, qpn: number): void {
    this.ownership?.destroyed(vmId, qpn);
    const vm = this.byVm.get(vmId);
    if (vm === undefined) return;
    const key = `${vm.hostKey}:${qpn}`;
    if (this.qpOwners.get(key) === vmId) this.qpOwners.delete(key);
  }

  /** The host GID (hex) VM `vmId` sits on. */
  hostKeyOf(vmId: string): GidKey | undefined {
    const vm = this.byVm.get(vmId);
    return vm?.hostKey;
  }

  /** Publishes wire QPN ownership to `registry` and checks each RC connection against it from now on. */
  useQpRegistry(registry: QpRegistry): void {
    this.ownership = new QpOwnership(
      registry,
      (vmId) => {
        return this.byVm.get(vmId)?.hostKey;
      },
      (vmId, gid) => {
        const self = this.byVm.get(vmId);
        const peer = self === undefined ? undefined : this.byVpc.get(self.entry.vpc)?.get(gidKey(gid));
        return peer === undefined ? undefined : { vm: peer.entry.vmId, host: peer.hostKey };
      },
    );
  }

  /** Records the connection in the QPN registry (the peer's check reads it). */
  qpConnected(vmId: string, c: { qpn: number; peerGid: Uint8Array; peerQpn: number }): ConnectionAnswer {
    this.ownership?.connected(vmId, c.qpn, c.peerGid, c.peerQpn);
    return { ok: true };
  }

  async checkPeerQp(vmId: string, c: { qpn: number; peerGid: Uint8Array; peerQpn: number }): Promise<PeerQpAnswer> {
    return this.ownership === undefined ? { ok: true } : this.ownership.check(vmId, c);
  }
}
