// What `vrdma-backend` checks at start before it serves a VM (issues 12 item 4 and 16 item 2): its QP and CQ quotas
// fit what the process can map (vm.max_map_count), and the VM's object limits are reserved in the host-wide ledger
// (vmm-device/rdma/admission-ledger.ts), so VMs sharing a host device cannot starve each other. Every message
// names the flag or the policy setting it is about.

import { hostAttrOf, type DeviceAttr } from '../verbs/host-verbs.ts';

export { hostAttrOf };
import { MAP_HEADROOM, MAPPINGS_PER_CQ, MAPPINGS_PER_MR, MAPPINGS_PER_QP, MappingBudget, mappingCeiling, readMaxMapCount } from '../rdma/mapping-budget.ts';
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

/** The host device's attributes (its capacity for all VMs together). */

/** What the VM's device will allow of each ledger kind: min(quota, host). */
function effectiveLimits(attr: DeviceAttr, quotas: Partial<DeviceQuotas>): { capacity: LedgerAmounts; limits: LedgerAmounts } {
  const q = { ...DEFAULT_QUOTAS, ...quotas };
  const capacity: LedgerAmounts = { pds: attr.maxPd, cqs: attr.maxCq, qps: attr.maxQp, mrs: attr.maxMr, ahs: attr.maxAh };
  const limits = Object.fromEntries(
    (Object.keys(QUOTA_OF) as LedgerKind[]).map((k) => [k, Math.min(capacity[k], Number(q[QUOTA_OF[k]]))]),
  ) as LedgerAmounts;
  return { capacity, limits };
}

/**
 * Issue 16 item 2: a QP or CQ quota this process cannot map (vm.max_map_count; mapping-budget.ts) is refused at
 * start, naming the setting, the ceiling and why, rather than served and then aborting at the mapping limit.
 */
export function checkMappingCeiling(opts: { attr: DeviceAttr; quotas: Partial<DeviceQuotas>; policy: boolean; vmId: string; budget?: MappingBudget }): void {
  const { limits } = effectiveLimits(opts.attr, opts.quotas);
  const budget = opts.budget ?? MappingBudget.fromProc();
  const ceiling = mappingCeiling(budget.available, limits.mrs);
  for (const kind of ['qps', 'cqs'] as const) {
    if (limits[kind] <= ceiling) continue;
    throw new Error(
      `${describeQuota(kind, limits[kind], opts.quotas, opts.policy, opts.vmId)}: this backend can map at most ${ceiling} QPs each with its ` +
        `own CQ (vm.max_map_count ${readMaxMapCount()}, less the mappings it holds and ${MAP_HEADROOM} kept for itself, ` +
        `${MAPPINGS_PER_QP} per QP, ${MAPPINGS_PER_CQ} per CQ, ${MAPPINGS_PER_MR} per MR of ${limits.mrs}): lower it, or raise vm.max_map_count`,
    );
  }
}

/** Reserves VM `vmId`'s limits (min(quota, host)) on `device` in the ledger of `hostDir`. */
export async function admitVm(opts: {
  attr: DeviceAttr;
  device: string;
  vmId: string;
  hostDir: string;
  quotas: Partial<DeviceQuotas>;
  policy: boolean;
}): Promise<HostReservation> {
  const { capacity, limits } = effectiveLimits(opts.attr, opts.quotas);
  return admitOnHost({
    dir: opts.hostDir,
    device: opts.device,
    vm: opts.vmId,
    limits,
    capacity,
    describe: (kind, value) => describeQuota(kind, value, opts.quotas, opts.policy, opts.vmId),
  });
}
