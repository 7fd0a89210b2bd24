// The VPC policy document: tenants, their VPCs with security rules, hosts, VMs with quotas, QoS classes. One schema
// for both control planes (the local file holds the document; etcd holds its parts under keys). Validated with zod;
// every error names the field path in the document, e.g. `vpcs[1].rules[3].src: "10.0.0/24" is not a CIDR prefix`.

import { z } from 'zod';
import { vpcQkey } from '../rdma/address-resolver.ts';
import { parseIpv4, parsePrefix, prefixContains, type Prefix } from './net.ts';

// Bounds on what one document can make the backend allocate (a control plane is trusted, but a typo is not).
export const MAX_HOSTS = 4096;
export const MAX_TENANTS = 4096;
export const MAX_VPCS = 4096;
export const MAX_VMS = 65536;
export const MAX_RULES_PER_VPC = 4096;
/** Largest object quota (per VM or per host) a document may set. */
export const MAX_OBJECT_QUOTA = 1 << 24;
/** Largest registered-memory quota: 1 TiB. */
export const MAX_MR_BYTES_QUOTA = 2 ** 40;
/** Largest outstanding-control-request quota (a control queue has at most 32768 entries). */
export const MAX_CONTROL_REQUESTS_QUOTA = 32768;
/** DSCP is 6 bits; the traffic class is DSCP << 2 with the two ECN bits left to the host. */
export const MAX_DSCP = 63;
/** Q_Keys with bit 31 set are controlled Q_Keys (spec 12.4): never a VPC's. */
export const MAX_VPC_QKEY = 0x7fff_ffff;
export const MAX_RULE_ID = 0xffff_ffff;
export const MAX_RATE_LIMIT_MBPS = 400_000;

export const QUOTA_KINDS = ['pds', 'cqs', 'qps', 'mrs', 'ahs', 'mrBytes', 'controlRequests'] as const;
export type QuotaKind = (typeof QUOTA_KINDS)[number];
export type Quotas = Record<QuotaKind, number>;

export const QP_TYPES = ['RC', 'UD'] as const;
export type QpTypeName = (typeof QP_TYPES)[number];

const identifier = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, 'must be 1-128 characters of letters, digits, ".", "_" or "-", starting with a letter or digit');

const ipv4 = z.string().superRefine((s, ctx) => {
  if (parseIpv4(s) === undefined) ctx.addIssue({ code: 'custom', message: `${JSON.stringify(s)} is not an IPv4 address a.b.c.d` });
});

const prefix = z.string().superRefine((s, ctx) => {
  const p = parsePrefix(s);
  if (!p.ok) ctx.addIssue({ code: 'custom', message: p.why });
});

const cidr = z.string().superRefine((s, ctx) => {
  const p = parsePrefix(s);
  if (!p.ok) ctx.addIssue({ code: 'custom', message: p.why });
  else if (!s.includes('/')) ctx.addIssue({ code: 'custom', message: `${JSON.stringify(s)} is not a CIDR prefix (a.b.c.d/n)` });
});

const objectQuota = z.number().int().min(0).max(MAX_OBJECT_QUOTA);
const QuotasShape = {
  pds: objectQuota,
  cqs: objectQuota,
  qps: objectQuota,
  mrs: objectQuota,
  ahs: objectQuota,
  mrBytes: z.number().int().min(0).max(MAX_MR_BYTES_QUOTA),
  controlRequests: z.number().int().min(1).max(MAX_CONTROL_REQUESTS_QUOTA),
};
export const QuotasSchema = z.object(QuotasShape).strict();
export const PartialQuotasSchema = z.object(QuotasShape).partial().strict();

export const RuleSchema = z
  .object({
    /** Non-zero: the `detail` of REFUSED_BY_POLICY when this rule denies (0 means the VPC's default). */
    id: z.number().int().min(1).max(MAX_RULE_ID),
    action: z.enum(['allow', 'deny']),
    /** The connecting VM's address (the side whose device asks): a prefix, an address or "any". */
    src: prefix.default('any'),
    dst: prefix.default('any'),
    qpTypes: z.array(z.enum(QP_TYPES)).min(1).max(QP_TYPES.length).default(['RC', 'UD']),
    /** Lower first; equal priorities keep the order of the list. */
    priority: z.number().int().min(0).max(0xffff).default(1000),
    /** Also matches the reverse direction (dst connecting to src): both ends of an RC pair ask. */
    bidirectional: z.boolean().default(true),
    description: z.string().max(256).optional(),
  })
  .strict();

/** Rules validated before, by their JSON text (bounded: cleared when it reaches this many). */
export const MAX_CACHED_RULES = 1 << 16;
const validatedRules = new Map<string, z.output<typeof RuleSchema>>();

/**
 * RuleSchema, remembered: a document that changes one rule of a VPC with a thousand re-validates one rule, not a
 * thousand (zod spends microseconds per rule; a backend re-validates every document it is given, and the teardown
 * a change causes waits for it). Only valid rules are kept, frozen, so documents may share them. Errors keep their
 * path inside the rule.
 */
const CachedRuleSchema = z.unknown().transform((value, ctx): z.output<typeof RuleSchema> => {
  const key = JSON.stringify(value);
  const known = key === undefined ? undefined : validatedRules.get(key);
  if (known !== undefined) return known;
  const r = RuleSchema.safeParse(value);
  if (!r.success) {
    for (const issue of r.error.issues) ctx.addIssue({ code: 'custom', message: issue.message, path: issue.path as (string | number)[] });
    return z.NEVER;
  }
  if (validatedRules.size >= MAX_CACHED_RULES) validatedRules.clear();
  const rule = Object.freeze({ ...r.data, qpTypes: Object.freeze([...r.data.qpTypes]) as typeof r.data.qpTypes });
  if (key !== undefined) validatedRules.set(key, rule);
  return rule;
});

const VpcShape = {
  id: identifier,
  tenant: identifier,
  /** Every VM address of the VPC lies inside it. */
  cidr,
  /** The Q_Key of every UD QP and send of the VPC (spec 12.4); derived from the id when absent. */
  qkey: z.number().int().min(1).max(MAX_VPC_QKEY).optional(),
  defaultAction: z.enum(['allow', 'deny']).default('deny'),
};
export const VpcSchema = z
  .object({
    ...VpcShape,
    rules: z.array(CachedRuleSchema).max(MAX_RULES_PER_VPC).default([]),
  })
  .strict();
/** A VPC without its rules (incremental validation checks the rules one by one: incremental.ts). */
export const VpcShellSchema = z.object(VpcShape).strict();

export const TenantSchema = z
  .object({
    id: identifier,
    qos: z
      .object({
        /** DSCP of the tenant's RDMA traffic; the host QP's traffic class is dscp << 2 (the guest cannot override it). */
        dscp: z.number().int().min(0).max(MAX_DSCP),
        /** Per-QP rate limit where the host verbs support one (rxe does not: recorded, reported as not enforced). */
        rateLimitMbps: z.number().int().min(1).max(MAX_RATE_LIMIT_MBPS).optional(),
      })
      .strict(),
  })
  .strict();

export const HostSchema = z
  .object({
    id: identifier,
    /** IPv4 address of the host's RoCE v2 netdev: its host GID is ::ffff:address. */
    address: ipv4,
    /** What the host RNIC offers all VMs together: the quotas of the host's VMs may not add up to more. */
    capacity: PartialQuotasSchema.optional(),
  })
  .strict();

export const VmSchema = z
  .object({
    id: identifier,
    vpc: identifier,
    /** The VM's virtual IP, shown to the guest as its GID. */
    ip: ipv4,
    host: identifier,
    mac: z
      .string()
      .regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, 'must be a lowercase MAC address xx:xx:xx:xx:xx:xx')
      .optional(),
    quotas: PartialQuotasSchema.optional(),
  })
  .strict();

const SettingsShape = {
  version: z.literal(1),
  /** Marking of the provider's own traffic (never a tenant's DSCP). */
  provider: z.object({ dscp: z.number().int().min(0).max(MAX_DSCP) }).strict(),
  defaultQuotas: QuotasSchema,
};
/** Largest entry count of each list of the document. */
export const LIST_LIMITS = { hosts: MAX_HOSTS, tenants: MAX_TENANTS, vpcs: MAX_VPCS, vms: MAX_VMS } as const;
/** The document without its lists (incremental validation checks list entries one by one). */
export const SettingsSchema = z.object(SettingsShape).strict();

const PolicyBaseSchema = z
  .object({
    ...SettingsShape,
    hosts: z.array(HostSchema).max(MAX_HOSTS),
    tenants: z.array(TenantSchema).max(MAX_TENANTS),
    vpcs: z.array(VpcSchema).max(MAX_VPCS),
    vms: z.array(VmSchema).max(MAX_VMS),
  })
  .strict();

export const PolicyDocumentSchema = PolicyBaseSchema.superRefine((doc, ctx) =>
  crossCheck(doc, (path, message) => ctx.addIssue({ code: 'custom', path, message })),
);

export type PolicyDocument = z.output<typeof PolicyDocumentSchema>;
export type PolicyInput = z.input<typeof PolicyDocumentSchema>;
export type Rule = z.output<typeof RuleSchema>;
export type Vpc = z.output<typeof VpcSchema>;
export type Vm = z.output<typeof VmSchema>;
export type Host = z.output<typeof HostSchema>;
export type Tenant = z.output<typeof TenantSchema>;

/** The Q_Key a VPC's UD traffic uses on the host. */
export function effectiveQkey(vpc: { id: string; qkey?: number | undefined }): number {
  return vpc.qkey ?? vpcQkey(vpc.id);
}

export type IssueSink = (path: (string | number)[], message: string) => void;

export interface CrossCheckOptions {
  /**
   * VPCs whose rules need no check here (ids unique, no QP type twice): incremental validation (incremental.ts)
   * checks them from its diff, against the rules of the document it accepted last, which were checked then.
   */
  rulesChecked?: (vpc: Vpc) => boolean;
}

/** References, uniqueness, addresses inside their VPC, quotas within the host, QoS marking apart from the provider's. */
export function crossCheck(d: z.output<typeof PolicyBaseSchema>, issue: IssueSink, opts: CrossCheckOptions = {}): void {
  const unique = <T extends { id: string }>(list: T[], name: string): Map<string, T> => {
    const seen = new Map<string, T>();
    list.forEach((item, i) => {
      if (seen.has(item.id)) issue([name, i, 'id'], `${JSON.stringify(item.id)} is used twice in ${name}`);
      else seen.set(item.id, item);
    });
    return seen;
  };
  const hosts = unique(d.hosts, 'hosts');
  const tenants = unique(d.tenants, 'tenants');
  const vpcs = unique(d.vpcs, 'vpcs');
  unique(d.vms, 'vms');

  const hostAddresses = new Map<string, string>();
  d.hosts.forEach((h, i) => {
    const other = hostAddresses.get(h.address);
    if (other !== undefined && other !== h.id) issue(['hosts', i, 'address'], `${h.address} is also the address of host ${JSON.stringify(other)}`);
    hostAddresses.set(h.address, h.id);
  });
  d.tenants.forEach((t, i) => {
    if (t.qos.dscp === d.provider.dscp) {
      issue(['tenants', i, 'qos', 'dscp'], `${t.qos.dscp} is the provider's DSCP (provider.dscp): tenant traffic must be marked differently`);
    }
  });
  const qkeys = new Map<number, string>();
  d.vpcs.forEach((v, i) => {
    if (!tenants.has(v.tenant)) issue(['vpcs', i, 'tenant'], `${JSON.stringify(v.tenant)} is not the id of a tenant`);
    const qkey = effectiveQkey(v);
    const other = qkeys.get(qkey);
    if (other !== undefined) {
      issue(['vpcs', i, 'qkey'], `Q_Key 0x${qkey.toString(16)} is also VPC ${JSON.stringify(other)}'s: UD fencing needs one per VPC`);
    }
    qkeys.set(qkey, v.id);
    if (opts.rulesChecked?.(v) === true) return;
    const ruleIds = new Set<number>();
    v.rules.forEach((r, j) => {
      if (ruleIds.has(r.id)) issue(['vpcs', i, 'rules', j, 'id'], `rule id ${r.id} is used twice in VPC ${JSON.stringify(v.id)}`);
      ruleIds.add(r.id);
      if (hasDuplicate(r.qpTypes)) issue(['vpcs', i, 'rules', j, 'qpTypes'], 'lists a QP type twice');
    });
  });
  const addressesByVpc = new Map<string, Map<string, string>>();
  d.vms.forEach((vm, i) => {
    const vpc = vpcs.get(vm.vpc);
    if (vpc === undefined) issue(['vms', i, 'vpc'], `${JSON.stringify(vm.vpc)} is not the id of a VPC`);
    const host = hosts.get(vm.host);
    if (host === undefined) issue(['vms', i, 'host'], `${JSON.stringify(vm.host)} is not the id of a host`);
    const ip = parseIpv4(vm.ip);
    if (vpc !== undefined && ip !== undefined) {
      const net = parsePrefix(vpc.cidr);
      if (net.ok && !prefixContains(net.prefix as Prefix, ip)) issue(['vms', i, 'ip'], `${vm.ip} is outside VPC ${JSON.stringify(vpc.id)}'s ${vpc.cidr}`);
      let taken = addressesByVpc.get(vpc.id);
      if (taken === undefined) addressesByVpc.set(vpc.id, (taken = new Map()));
      const other = taken.get(vm.ip);
      if (other !== undefined) issue(['vms', i, 'ip'], `${vm.ip} is also VM ${JSON.stringify(other)}'s address in VPC ${JSON.stringify(vpc.id)}`);
      taken.set(vm.ip, vm.id);
    }
    if (host?.capacity !== undefined) {
      for (const kind of QUOTA_KINDS) {
        const cap = host.capacity[kind];
        const want = vm.quotas?.[kind] ?? d.defaultQuotas[kind];
        if (cap !== undefined && want > cap) {
          issue(['vms', i, 'quotas', kind], `${want} exceeds host ${JSON.stringify(host.id)}'s capacity of ${cap}: one VM could exhaust the host`);
        }
      }
    }
  });
  checkHostSums(d, issue);
}

/** Whether a short list (a rule's QP types: at most two) holds a value twice; no Set per rule on the reload path. */
export function hasDuplicate(list: readonly unknown[]): boolean {
  for (let i = 1; i < list.length; i++) for (let j = 0; j < i; j++) if (list[i] === list[j]) return true;
  return false;
}

/**
 * Issue 12 item 4: the quotas of the VMs a host carries must fit its capacity together, not only one by one; else
 * the VMs that came first could take what the others' quotas promise. Refused at load, naming the VMs.
 */
function checkHostSums(d: z.output<typeof PolicyBaseSchema>, issue: IssueSink): void {
  d.hosts.forEach((host, i) => {
    if (host.capacity === undefined) return;
    const vms = d.vms.filter((vm) => vm.host === host.id);
    for (const kind of QUOTA_KINDS) {
      const cap = host.capacity[kind];
      if (cap === undefined) continue;
      const each = vms.map((vm) => ({ id: vm.id, q: vm.quotas?.[kind] ?? d.defaultQuotas[kind] }));
      const sum = each.reduce((s, v) => s + v.q, 0);
      if (sum <= cap) continue;
      const shown = each.slice(0, 8).map((v) => `${v.id} ${v.q}`).join(', ') + (each.length > 8 ? `, ... ${each.length - 8} more` : '');
      issue(
        ['hosts', i, 'capacity', kind],
        `the ${kind} quotas of the ${vms.length} VMs on host ${JSON.stringify(host.id)} add up to ${sum} (${shown}), above its capacity of ${cap}: VMs sharing the host could starve each other`,
      );
    }
  });
}

/** `vpcs[1].rules[3].src` from zod's path. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += out === '' ? String(p) : `.${String(p)}`;
  }
  return out === '' ? '(document)' : out;
}

export type PolicyParse = { ok: true; policy: PolicyDocument } | { ok: false; errors: string[] };

/** Validates a parsed document; errors are `path: message`, in document order. */
export function validatePolicy(value: unknown): PolicyParse {
  const parsed = PolicyDocumentSchema.safeParse(value);
  if (parsed.success) return { ok: true, policy: parsed.data };
  return { ok: false, errors: parsed.error.issues.map((i) => `${formatPath(i.path)}: ${i.message}`) };
}

/** Parses and validates the text of a JSON policy document. */
export function parsePolicyText(text: string): PolicyParse {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return { ok: false, errors: [`(document): not JSON: ${(e as Error).message}`] };
  }
  return validatePolicy(json);
}
