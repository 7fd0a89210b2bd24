// A policy document compiled for the engine's questions: rules as numeric prefix masks in evaluation order, VMs by
// id, hosts' capacities. Built once per validated document (engine.ts applies it); evaluate() is the per-connection
// check at RTR and AH creation.

import { parseIpv4, parsePrefix, type Prefix } from './net.ts';
import { effectiveQkey, type Host, type PolicyDocument, type QpTypeName, type Quotas, type Rule, type Tenant, type Vm, type Vpc } from './schema.ts';

/** What the backend tells a guest at REFUSED_BY_POLICY when the VPC's default action refused (no rule matched). */
export const DEFAULT_RULE_ID = 0;

export interface CompiledRule {
  id: number;
  allow: boolean;
  srcBase: number;
  srcMask: number;
  dstBase: number;
  dstMask: number;
  rc: boolean;
  ud: boolean;
  bidirectional: boolean;
}

export interface CompiledVpc {
  spec: Vpc;
  tenant: Tenant;
  qkey: number;
  /** Rules in evaluation order: priority, then list order. */
  rules: CompiledRule[];
  defaultAllow: boolean;
  /** Virtual address -> VM. */
  members: Map<number, CompiledVm>;
}

export interface CompiledVm {
  spec: Vm;
  ip: number;
  vpc: CompiledVpc;
  host: Host;
  hostIp: number;
  quotas: Quotas;
}

export interface CompiledPolicy {
  doc: PolicyDocument;
  vms: Map<string, CompiledVm>;
  vpcs: Map<string, CompiledVpc>;
  hosts: Map<string, Host>;
}

export function compile(doc: PolicyDocument): CompiledPolicy {
  const hosts = new Map(doc.hosts.map((h) => [h.id, h]));
  const tenants = new Map(doc.tenants.map((t) => [t.id, t]));
  const vpcs = new Map<string, CompiledVpc>();
  for (const v of doc.vpcs) {
    vpcs.set(v.id, {
      spec: v,
      tenant: tenants.get(v.tenant)!,
      qkey: effectiveQkey(v),
      defaultAllow: v.defaultAction === 'allow',
      members: new Map(),
      rules: compileRules(v.rules, v.id),
    });
  }
  const vms = new Map<string, CompiledVm>();
  for (const spec of doc.vms) {
    const vpc = vpcs.get(spec.vpc)!;
    const host = hosts.get(spec.host)!;
    const quotas = { ...doc.defaultQuotas, ...spec.quotas } as Quotas;
    const vm: CompiledVm = { spec, ip: parseIpv4(spec.ip)!, vpc, host, hostIp: parseIpv4(host.address)!, quotas };
    vpc.members.set(vm.ip, vm);
    vms.set(spec.id, vm);
  }
  return { doc, vms, vpcs, hosts };
}

/**
 * Compiled rules by their validated rule: incremental validation (incremental.ts) hands a later document the same
 * frozen rule object for every unchanged rule, so its compiled form is reused too. Weak: rules no document holds go.
 */
const compiledRules = new WeakMap<Rule, CompiledRule>();
/** Rules compiled (not found in compiledRules) since the process started: tests count them. */
export const compileCounts = { rulesCompiled: 0 };

/**
 * A VPC's rule list in evaluation order, by its validated rule list: a VPC incremental validation kept unchanged is
 * the same object with the same list, whose order is not worked out again. Only frozen lists are remembered.
 */
const compiledLists = new WeakMap<readonly Rule[], CompiledRule[]>();

function compileRules(rules: readonly Rule[], vpcId: string): CompiledRule[] {
  const known = compiledLists.get(rules);
  if (known !== undefined) return known;
  let inOrder = true;
  for (let i = 1; i < rules.length && inOrder; i++) inOrder = rules[i - 1]!.priority <= rules[i]!.priority;
  // Stable sort by priority (ties keep the list's order); a list already in order (all default priorities) is not.
  const order = inOrder ? rules : rules.map((r, i) => ({ r, i })).sort((a, b) => a.r.priority - b.r.priority || a.i - b.i).map(({ r }) => r);
  const out = order.map((r) => compileRule(r, vpcId));
  if (Object.isFrozen(rules)) compiledLists.set(rules, out);
  return out;
}

function compileRule(r: Rule, vpcId: string): CompiledRule {
  const known = compiledRules.get(r);
  if (known !== undefined) return known;
  const src = parsePrefix(r.src);
  const dst = parsePrefix(r.dst);
  if (!src.ok || !dst.ok) throw new Error(`rule ${r.id} of VPC ${vpcId} was not validated`);
  const c: CompiledRule = Object.freeze({
    id: r.id,
    allow: r.action === 'allow',
    srcBase: src.prefix.base,
    srcMask: prefixMask(src.prefix),
    dstBase: dst.prefix.base,
    dstMask: prefixMask(dst.prefix),
    rc: r.qpTypes.includes('RC'),
    ud: r.qpTypes.includes('UD'),
    bidirectional: r.bidirectional,
  });
  compileCounts.rulesCompiled++;
  if (Object.isFrozen(r)) compiledRules.set(r, c); // only a rule nobody can change keeps its compiled form
  return c;
}

function prefixMask(p: Prefix): number {
  return p.length === 0 ? 0 : (0xffff_ffff << (32 - p.length)) >>> 0;
}

/** First matching rule in order, else the VPC's default. A linear scan: 1,000 rules cost microseconds. */
export function evaluate(vpc: CompiledVpc, src: number, dst: number, qpType: QpTypeName): { allow: boolean; ruleId: number } {
  const rc = qpType === 'RC';
  const rules = vpc.rules;
  for (let i = 0; i < rules.length; i++) {
    const r = rules[i]!;
    if (rc ? !r.rc : !r.ud) continue;
    if (((src & r.srcMask) >>> 0 === r.srcBase && (dst & r.dstMask) >>> 0 === r.dstBase) ||
      (r.bidirectional && (dst & r.srcMask) >>> 0 === r.srcBase && (src & r.dstMask) >>> 0 === r.dstBase)) {
      return { allow: r.allow, ruleId: r.id };
    }
  }
  return { allow: vpc.defaultAllow, ruleId: DEFAULT_RULE_ID };
}

