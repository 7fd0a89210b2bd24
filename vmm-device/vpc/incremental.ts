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

import { crossCheck, hasDuplicate, LIST_LIMITS, MAX_RULES_PER_VPC, RuleSchema, SettingsSchema, HostSchema, TenantSchema, VmSchema, VpcShellSchema, validatePolicy } from './schema.ts';
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

/**
 * A list as last accepted: its raw entries and their validated forms, position by position. A new list is matched
 * against it by position first (an edit rarely moves entries), by id only where the ids differ (index built then).
 */
class KeptList<T extends { id: string | number }> {
  private index: Map<string | number, number> | undefined;
  constructor(
    readonly raws: readonly unknown[],
    readonly parsed: readonly T[],
  ) {}

  /** Position of the entry with `id` in the accepted list, trying `at` first (when given). */
  find(id: unknown, at = -1): number | undefined {
    if (typeof id !== 'string' && typeof id !== 'number') return undefined;
    if (at >= 0 && at < this.parsed.length && this.parsed[at]!.id === id) return at;
    if (this.index === undefined) {
      // An accepted list has unique ids (crossCheck); first wins all the same.
      this.index = new Map();
      this.parsed.forEach((e, i) => {
        if (!this.index!.has(e.id)) this.index!.set(e.id, i);
      });
    }
    return this.index.get(id);
  }
}

interface Accepted {
  raw: Json;
  doc: PolicyDocument;
  hosts: KeptList<Host>;
  tenants: KeptList<Tenant>;
  vms: KeptList<Vm>;
  vpcs: KeptList<Vpc>;
  /** Each accepted VPC's raw rules, by the VPC's validated object. */
  rawRules: Map<Vpc, readonly unknown[]>;
}

const zero = (): ValidationCounts => ({ documents: 0, fullValidations: 0, rulesValidated: 0, rulesReused: 0, entriesValidated: 0, entriesReused: 0 });

/** One per control-plane source: it remembers the last document it accepted. */
export class PolicyValidator {
  readonly counts: ValidationCounts = zero();
  last: ValidationCounts = zero();
  private accepted: Accepted | undefined;
  /** Set by incremental() when anything differs from the accepted document (content, count or order). */
  private changed = false;

  /** Mutable so that bench:vpc can alternate the two modes on one backend (its same-run baseline). */
  constructor(public mode: ValidationMode = 'incremental') {}

  /**
   * Validates `value` against the last document accepted. `unchanged` is computed only when asked (`compare`): a
   * source that knows its input did not change (the file's text) does not pay for it. Incremental validation knows
   * it from its diff; 'full' mode compares the whole document as JSON.
   */
  validate(value: unknown, opts: { compare?: boolean } = {}): ValidatorResult {
    this.last = zero();
    this.last.documents = 1;
    const previous = this.accepted;
    let r: PolicyParse | undefined;
    let unchanged = false;
    if (this.mode === 'incremental' && previous !== undefined && isObject(value)) {
      this.changed = false;
      r = this.incremental(value, previous);
      unchanged = r !== undefined && !this.changed;
    }
    if (r === undefined) {
      unchanged = opts.compare === true && previous !== undefined && jsonEqual(previous.raw, value);
      r = this.full(value);
    }
    for (const k of Object.keys(this.counts) as (keyof ValidationCounts)[]) this.counts[k] += this.last[k];
    return { ...r, unchanged: opts.compare === true && r.ok && unchanged };
  }

  private full(value: unknown): PolicyParse {
    this.last.fullValidations++;
    const r = validatePolicy(value);
    if (r.ok) {
      const raw = value as Json;
      for (const v of r.policy.vpcs) {
        this.last.rulesValidated += v.rules.length;
        Object.freeze(v.rules); // compile() remembers a frozen list's evaluation order (compiled-policy.ts)
      }
      this.last.entriesValidated += r.policy.hosts.length + r.policy.tenants.length + r.policy.vpcs.length + r.policy.vms.length;
      const rawVpcs = raw['vpcs'] as Json[];
      this.accepted = {
        raw,
        doc: r.policy,
        hosts: new KeptList(raw['hosts'] as unknown[], r.policy.hosts),
        tenants: new KeptList(raw['tenants'] as unknown[], r.policy.tenants),
        vms: new KeptList(raw['vms'] as unknown[], r.policy.vms),
        vpcs: new KeptList(rawVpcs, r.policy.vpcs),
        rawRules: new Map(r.policy.vpcs.map((v, i) => [v, (rawVpcs[i]!['rules'] ?? []) as unknown[]])),
      };
    }
    return r;
  }

  /** The document from unchanged entries and newly validated ones; undefined when anything is wrong (then: full). */
  private incremental(raw: Json, prev: Accepted): PolicyParse | undefined {
    const { hosts: rawHosts, tenants: rawTenants, vpcs: rawVpcs, vms: rawVms, ...rawSettings } = raw;
    const settings = SettingsSchema.safeParse(rawSettings);
    if (!settings.success) return undefined;
    const { hosts: _h, tenants: _t, vpcs: _v, vms: _m, ...prevSettings } = prev.doc;
    if (!jsonEqual(prevSettings, settings.data)) this.changed = true;
    const lists = { hosts: rawHosts, tenants: rawTenants, vpcs: rawVpcs, vms: rawVms };
    for (const [name, list] of Object.entries(lists)) {
      if (!Array.isArray(list) || list.length > LIST_LIMITS[name as keyof typeof LIST_LIMITS]) return undefined;
    }
    const hosts = this.entries(rawHosts as unknown[], prev.hosts, (v) => HostSchema.safeParse(v));
    const tenants = this.entries(rawTenants as unknown[], prev.tenants, (v) => TenantSchema.safeParse(v));
    const vms = this.entries(rawVms as unknown[], prev.vms, (v) => VmSchema.safeParse(v));
    if (hosts === undefined || tenants === undefined || vms === undefined) return undefined;
    const vpcs: Vpc[] = [];
    const rawRules = new Map<Vpc, readonly unknown[]>();
    const vpcList = rawVpcs as unknown[];
    if (vpcList.length !== prev.vpcs.parsed.length) this.changed = true;
    for (let i = 0; i < vpcList.length; i++) {
      const vpc = this.vpc(vpcList[i], i, prev, rawRules);
      if (vpc === undefined) return undefined;
      vpcs.push(vpc);
    }
    const doc: PolicyDocument = { ...settings.data, hosts, tenants, vpcs, vms };
    let issues = 0;
    // Every VPC's rules were checked by vpc() from the diff (ids unique, no QP type twice).
    crossCheck(doc, () => issues++, { rulesChecked: () => true });
    if (issues > 0) return undefined;
    this.accepted = {
      raw,
      doc,
      hosts: new KeptList(rawHosts as unknown[], hosts),
      tenants: new KeptList(rawTenants as unknown[], tenants),
      vms: new KeptList(rawVms as unknown[], vms),
      vpcs: new KeptList(vpcList, vpcs),
      rawRules,
    };
    return { ok: true, policy: doc };
  }

  /** A list's entries: kept when equal to the previous entry of the same id, else validated. */
  private entries<T extends { id: string }>(
    list: readonly unknown[],
    prev: KeptList<T>,
    parse: (v: unknown) => { success: true; data: T } | { success: false },
  ): T[] | undefined {
    if (list.length !== prev.parsed.length) this.changed = true;
    const out: T[] = [];
    for (let i = 0; i < list.length; i++) {
      const raw = list[i];
      const at = isObject(raw) ? prev.find(raw['id'], i) : undefined;
      if (at !== undefined && jsonEqual(prev.raws[at], raw)) {
        if (at !== i) this.changed = true;
        out.push(prev.parsed[at]!);
        this.last.entriesReused++;
        continue;
      }
      const r = parse(raw);
      this.changed = true;
      this.last.entriesValidated++;
      if (!r.success) return undefined;
      out.push(r.data);
    }
    return out;
  }

  /**
   * One VPC: the very VPC accepted before when neither its fields nor its rules changed (so compile() keeps its
   * compiled rule list); else its shell and its changed rules validated.
   */
  private vpc(raw: unknown, at: number, prev: Accepted, rawRules: Map<Vpc, readonly unknown[]>): Vpc | undefined {
    if (!isObject(raw)) return undefined;
    const found = prev.vpcs.find(raw['id'], at);
    if (found !== at) this.changed = true;
    const before = found === undefined ? undefined : prev.vpcs.parsed[found]!;
    const beforeRaw = found === undefined ? undefined : (prev.vpcs.raws[found] as Json);
    if (before !== undefined && beforeRaw === raw) {
      // The very same object (etcd keeps the parsed value of an unchanged key): nothing in it changed.
      this.last.entriesReused++;
      this.last.rulesReused += before.rules.length;
      rawRules.set(before, prev.rawRules.get(before)!);
      return before;
    }
    const { rules: rawList, ...rawShell } = raw;
    let shell: Omit<Vpc, 'rules'>;
    let shellKept = false;
    if (before !== undefined && jsonEqualExcept(beforeRaw!, raw, 'rules')) {
      const { rules: _r, ...kept } = before;
      shell = kept;
      shellKept = true;
      this.last.entriesReused++;
    } else {
      const r = VpcShellSchema.safeParse(rawShell);
      this.changed = true;
      this.last.entriesValidated++;
      if (!r.success) return undefined;
      shell = r.data;
    }
    const list = rawList === undefined ? [] : rawList;
    if (!Array.isArray(list) || list.length > MAX_RULES_PER_VPC) return undefined;
    const prevRules = before === undefined ? undefined : new KeptList(prev.rawRules.get(before)!, before.rules);
    let rulesKept = prevRules !== undefined && list.length === prevRules.parsed.length;
    const rules: Rule[] = [];
    // The rule checks crossCheck would do, from the diff: the accepted rules had unique ids and no QP type twice,
    // so only a kept rule used twice, or a validated rule whose id is another's, can break them.
    const used = new Uint8Array(prevRules?.parsed.length ?? 0);
    const validatedIds: number[] = [];
    for (let j = 0; j < list.length; j++) {
      const rawRule = list[j];
      const old = prevRules !== undefined && isObject(rawRule) ? prevRules.find(rawRule['id'], j) : undefined;
      if (old !== undefined && jsonEqual(prevRules!.raws[old], rawRule)) {
        if (old !== j) rulesKept = false;
        if (used[old] === 1) return undefined; // the same rule twice: its id is used twice
        used[old] = 1;
        rules.push(prevRules!.parsed[old]!);
        this.last.rulesReused++;
        continue;
      }
      rulesKept = false;
      const r = RuleSchema.safeParse(rawRule);
      this.last.rulesValidated++;
      if (!r.success || hasDuplicate(r.data.qpTypes)) return undefined;
      validatedIds.push(r.data.id);
      rules.push(Object.freeze({ ...r.data, qpTypes: Object.freeze([...r.data.qpTypes]) as Rule['qpTypes'] }));
    }
    if (validatedIds.length > 0) {
      const ids = new Set<number>();
      for (const id of validatedIds) {
        if (ids.has(id)) return undefined;
        ids.add(id);
        const at = prevRules?.find(id);
        if (at !== undefined && used[at] === 1) return undefined; // a kept rule has this id
      }
    }
    if (!rulesKept) this.changed = true;
    // Nothing changed but the object: the accepted VPC itself, whose rules crossCheck need not look at again.
    // The list frozen: compile() remembers its evaluation order by it (compiled-policy.ts).
    const vpc: Vpc = shellKept && rulesKept ? before! : { ...shell, rules: Object.freeze(rules) as Rule[] };
    rawRules.set(vpc, list);
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
  // for...in rather than Object.keys: no key arrays allocated per object (a reload compares a thousand rules).
  let count = 0;
  for (const k in a) {
    if (!Object.hasOwn(a, k)) continue;
    count++;
    if (!Object.hasOwn(b, k)) return false;
    if (k !== skip && !jsonEqual(a[k], b[k])) return false;
  }
  for (const k in b) if (Object.hasOwn(b, k)) count--;
  return count === 0;
}
