// Incremental validation of policy documents (issue 12 item 9). A control plane hands the backend whole documents,
// but a rule change changes one entry of a 1,000-rule VPC: re-running zod over every rule put ~140 ms (file) and
// ~290 ms (etcd) of validation between the change and the teardown it causes on rxe0. Here the new document is
// diffed against the last one accepted: an entry equal (deeply, as JSON) to the previous entry with the same id keeps
// its validated form (the same frozen object, so compile() keeps its compiled form too); only new and changed
// entries go through their zod schema. The document-wide checks (crossCheck: ids, references, addresses, quotas)
// always run over the whole assembled document: they are plain loops, not zod.
//
// Errors: when anything is wrong, the whole document is validated again by PolicyDocumentSchema and its errors are
// returned. A refused document is rare and off the teardown path, and its errors are then exactly the full
// validation's (field paths, messages, order) by construction.

import { crossCheck, LIST_LIMITS, MAX_RULES_PER_VPC, RuleSchema, SettingsSchema, HostSchema, TenantSchema, VmSchema, VpcShellSchema, validatePolicy } from './schema.ts';
import type { Host, PolicyDocument, PolicyParse, Rule, Tenant, Vm, Vpc } from './schema.ts';

/** What validations did (since the validator was made; `last` for the latest document). */
export interface ValidationCounts {
  documents: number;
  /** Documents validated in full (the first, every refused one, and all of them in 'full' mode). */
  fullValidations: number;
  /** Rules given to RuleSchema, and rules that kept their validated form (equal to the previous one). */
  rulesValidated: number;
  rulesReused: number;
  /** Hosts, tenants, VPCs (without their rules) and VMs validated, and kept. */
  entriesValidated: number;
  entriesReused: number;
}

export type ValidationMode = 'incremental' | 'full';

export type ValidatorResult = PolicyParse & {
  /** True when asked to compare and the document is equal (as JSON) to the one accepted last: nothing to apply. */
  unchanged: boolean;
};

type Json = Record<string, unknown>;
interface Kept<T> {
  raw: unknown;
  parsed: T;
}
interface KeptVpc extends Kept<Vpc> {
  rules: Map<number, Kept<Rule>>;
}
interface Accepted {
  raw: Json;
  hosts: Map<string, Kept<Host>>;
  tenants: Map<string, Kept<Tenant>>;
  vpcs: Map<string, KeptVpc>;
  vms: Map<string, Kept<Vm>>;
}

const zero = (): ValidationCounts => ({ documents: 0, fullValidations: 0, rulesValidated: 0, rulesReused: 0, entriesValidated: 0, entriesReused: 0 });

/** One per control-plane source: it remembers the last document it accepted. */
export class PolicyValidator {
  readonly counts: ValidationCounts = zero();
  last: ValidationCounts = zero();
  private accepted: Accepted | undefined;

  /** Mutable so that bench:vpc can alternate the two modes on one backend (its same-run baseline). */
  constructor(public mode: ValidationMode = 'incremental') {}

  /**
   * Validates `value` against the last document accepted. `unchanged` is computed only when asked (`compare`): a
   * source that knows its input did not change (the file's text) does not pay for the comparison.
   */
  validate(value: unknown, opts: { compare?: boolean } = {}): ValidatorResult {
    this.last = zero();
    this.last.documents = 1;
    const previous = this.accepted;
    const unchanged = opts.compare === true && previous !== undefined && jsonEqual(previous.raw, value);
    let r: PolicyParse | undefined;
    if (this.mode === 'incremental' && previous !== undefined && isObject(value)) r = this.incremental(value, previous);
    if (r === undefined) r = this.full(value);
    for (const k of Object.keys(this.counts) as (keyof ValidationCounts)[]) this.counts[k] += this.last[k];
    return { ...r, unchanged: r.ok && unchanged };
  }

  private full(value: unknown): PolicyParse {
    this.last.fullValidations++;
    const r = validatePolicy(value);
    if (r.ok) {
      const raw = value as Json;
      for (const v of r.policy.vpcs) this.last.rulesValidated += v.rules.length;
      this.last.entriesValidated += r.policy.hosts.length + r.policy.tenants.length + r.policy.vpcs.length + r.policy.vms.length;
      const kept = <T extends { id: string }>(list: readonly T[], rawList: unknown): Map<string, Kept<T>> =>
        new Map(list.map((parsed, i) => [parsed.id, { raw: (rawList as unknown[])[i], parsed }]));
      this.accepted = {
        raw,
        hosts: kept(r.policy.hosts, raw['hosts']),
        tenants: kept(r.policy.tenants, raw['tenants']),
        vms: kept(r.policy.vms, raw['vms']),
        vpcs: new Map(
          r.policy.vpcs.map((parsed, i) => {
            const rawVpc = (raw['vpcs'] as unknown[])[i] as Json;
            const rawRules = (rawVpc['rules'] ?? []) as unknown[];
            return [parsed.id, { raw: rawVpc, parsed, rules: new Map(parsed.rules.map((rule, j) => [rule.id, { raw: rawRules[j], parsed: rule }])) }];
          }),
        ),
      };
    }
    return r;
  }

  /** The document from unchanged entries and newly validated ones; undefined when anything is wrong (then: full). */
  private incremental(raw: Json, prev: Accepted): PolicyParse | undefined {
    const { hosts: rawHosts, tenants: rawTenants, vpcs: rawVpcs, vms: rawVms, ...rawSettings } = raw;
    const settings = SettingsSchema.safeParse(rawSettings);
    if (!settings.success) return undefined;
    const lists = { hosts: rawHosts, tenants: rawTenants, vpcs: rawVpcs, vms: rawVms };
    for (const [name, list] of Object.entries(lists)) {
      if (!Array.isArray(list) || list.length > LIST_LIMITS[name as keyof typeof LIST_LIMITS]) return undefined;
    }
    const next: Accepted = { raw, hosts: new Map(), tenants: new Map(), vpcs: new Map(), vms: new Map() };
    const hosts = this.entries(rawHosts as unknown[], prev.hosts, next.hosts, (v) => HostSchema.safeParse(v));
    const tenants = this.entries(rawTenants as unknown[], prev.tenants, next.tenants, (v) => TenantSchema.safeParse(v));
    const vms = this.entries(rawVms as unknown[], prev.vms, next.vms, (v) => VmSchema.safeParse(v));
    if (hosts === undefined || tenants === undefined || vms === undefined) return undefined;
    const vpcs: Vpc[] = [];
    for (const v of rawVpcs as unknown[]) {
      const vpc = this.vpc(v, prev.vpcs, next.vpcs);
      if (vpc === undefined) return undefined;
      vpcs.push(vpc);
    }
    const doc: PolicyDocument = { ...settings.data, hosts, tenants, vpcs, vms };
    let issues = 0;
    crossCheck(doc, () => issues++);
    if (issues > 0) return undefined;
    this.accepted = next;
    return { ok: true, policy: doc };
  }

  /** A list's entries: kept when equal to the previous entry of the same id, else validated. */
  private entries<T extends { id: string }>(
    list: readonly unknown[],
    prev: Map<string, Kept<T>>,
    next: Map<string, Kept<T>>,
    parse: (v: unknown) => { success: true; data: T } | { success: false },
  ): T[] | undefined {
    const out: T[] = [];
    for (const raw of list) {
      const id = isObject(raw) ? raw['id'] : undefined;
      const before = typeof id === 'string' ? prev.get(id) : undefined;
      let parsed: T;
      if (before !== undefined && jsonEqual(before.raw, raw)) {
        parsed = before.parsed;
        this.last.entriesReused++;
      } else {
        const r = parse(raw);
        this.last.entriesValidated++;
        if (!r.success) return undefined;
        parsed = r.data;
      }
      // A duplicate id is crossCheck's error (the full validation then names it); keep the first.
      if (!next.has(parsed.id)) next.set(parsed.id, { raw, parsed });
      out.push(parsed);
    }
    return out;
  }

  private vpc(raw: unknown, prevVpcs: Map<string, KeptVpc>, nextVpcs: Map<string, KeptVpc>): Vpc | undefined {
    if (!isObject(raw)) return undefined;
    const id = raw['id'];
    const before = typeof id === 'string' ? prevVpcs.get(id) : undefined;
    if (before !== undefined && before.raw === raw) {
      // The very same object (etcd keeps the parsed value of an unchanged key): nothing in it changed.
      this.last.entriesReused++;
      this.last.rulesReused += before.parsed.rules.length;
      if (!nextVpcs.has(before.parsed.id)) nextVpcs.set(before.parsed.id, before);
      return before.parsed;
    }
    const { rules: rawRules, ...rawShell } = raw;
    let shell: Omit<Vpc, 'rules'>;
    if (before !== undefined && jsonEqualExcept(before.raw as Json, raw, 'rules')) {
      const { rules: _r, ...kept } = before.parsed;
      shell = kept;
      this.last.entriesReused++;
    } else {
      const r = VpcShellSchema.safeParse(rawShell);
      this.last.entriesValidated++;
      if (!r.success) return undefined;
      shell = r.data;
    }
    const list = rawRules === undefined ? [] : rawRules;
    if (!Array.isArray(list) || list.length > MAX_RULES_PER_VPC) return undefined;
    const rules: Rule[] = [];
    const keptRules = new Map<number, Kept<Rule>>();
    for (const rawRule of list as unknown[]) {
      const ruleId = isObject(rawRule) ? rawRule['id'] : undefined;
      const old = typeof ruleId === 'number' ? before?.rules.get(ruleId) : undefined;
      let rule: Rule;
      if (old !== undefined && jsonEqual(old.raw, rawRule)) {
        rule = old.parsed;
        this.last.rulesReused++;
      } else {
        const r = RuleSchema.safeParse(rawRule);
        this.last.rulesValidated++;
        if (!r.success) return undefined;
        rule = Object.freeze({ ...r.data, qpTypes: Object.freeze([...r.data.qpTypes]) as Rule['qpTypes'] });
      }
      if (!keptRules.has(rule.id)) keptRules.set(rule.id, { raw: rawRule, parsed: rule });
      rules.push(rule);
    }
    const vpc: Vpc = { ...shell, rules };
    if (!nextVpcs.has(vpc.id)) nextVpcs.set(vpc.id, { raw, parsed: vpc, rules: keptRules });
    return vpc;
  }
}

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Deep equality of JSON values (object key order ignored, an own key holding undefined counts as present). */
export function jsonEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!jsonEqual(a[i], b[i])) return false;
    return true;
  }
  if (Array.isArray(b)) return false;
  return jsonEqualExcept(a as Json, b as Json, undefined);
}

function jsonEqualExcept(a: Json, b: Json, skip: string | undefined): boolean {
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  for (const k of ka) {
    if (k === skip) {
      if (!Object.hasOwn(b, k)) return false;
      continue;
    }
    if (!Object.hasOwn(b, k) || !jsonEqual(a[k], b[k])) return false;
  }
  return true;
}
