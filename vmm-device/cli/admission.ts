// What `vrdma-backend` checks at start before it serves a VM (issues 12 item 4 and 16 item 2): the VM's object
// limits are reserved in the host-wide ledger (vmm-device/rdma/admission-ledger.ts), so VMs sharing a host device
// cannot starve each other; every message names the flag or the policy setting it is about.

import type { HostVerbs } from '../verbs/host-verbs.ts';
import { DEFAULT_QUOTAS, type DeviceQuotas } from '../rdma/limits.ts';
import { admitOnHost, type HostReservation, type LedgerAmounts, type LedgerKind } from '../rdma/admission-ledger.ts';

/** The flag that sets each ledger kind without a policy (PDs and AHs have none: their default applies). */
const FLAG_OF: Partial<Record<LedgerKind, string>> = { qps: '--max-qp', cqs: '--max-cq', mrs: '--max-mr' };
const QUOTA_OF: Record<LedgerKind, keyof DeviceQuotas> = { pds: 'maxPd', cqs: 'maxCq', qps: 'maxQp', mrs: 'maxMr', ahs: 'maxAh' };

/** How an error names where VM `vmId`'s value of `kind` came from. */
export function describeQuota(kind: LedgerKind, value: number, given: Partial<DeviceQuotas>, policy: boolean, vmId: string): string {
  if (policy) return `VM ${vmId}'s quota ${kind} ${value} (VPC policy)`;
  const flag = FLAG_OF[kind];
  if (flag !== undefined && given[QUOTA_OF[kind]] !== undefined) return `${flag} ${value}`;
  return `the default per-VM quota of ${value} ${kind}${flag === undefined ? '' : ` (set it with ${flag})`}`;
}

/** Reserves VM `vmId`'s limits (min(quota, host)) on `device` in the ledger of `hostDir`. */
export async function admitVm(opts: {
  verbs: HostVerbs;
  device: string;
  vmId: string;
  hostDir: string;
  quotas: Partial<DeviceQuotas>;
  policy: boolean;
}): Promise<HostReservation> {
  const dev = await opts.verbs.openDevice(opts.device);
  let attr;
  try {
    attr = await opts.verbs.queryDevice(dev);
  } finally {
    await opts.verbs.closeDevice(dev);
  }
  const q = { ...DEFAULT_QUOTAS, ...opts.quotas };
  const capacity: LedgerAmounts = { pds: attr.maxPd, cqs: attr.maxCq, qps: attr.maxQp, mrs: attr.maxMr, ahs: attr.maxAh };
  const limits = Object.fromEntries(
    (Object.keys(QUOTA_OF) as LedgerKind[]).map((k) => [k, Math.min(capacity[k], Number(q[QUOTA_OF[k]]))]),
  ) as LedgerAmounts;
  return admitOnHost({
    dir: opts.hostDir,
    device: opts.device,
    vm: opts.vmId,
    limits,
    capacity,
    describe: (kind, value) => describeQuota(kind, value, opts.quotas, opts.policy, opts.vmId),
  });
}
