// Incremental validation (issue 12 item 9): a new document is diffed against the last one accepted and only new or
// changed entries are validated; unchanged rules keep their validated and compiled forms (counted). Refused
// documents get exactly the full validation's errors, field paths included. A differential run over random edits
// checks that incremental and full validation agree on every document, valid or not. Then the same through the
// real sources: a policy file edited on disk, and a real etcd member.

import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { once } from 'node:events';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { compile, compileCounts } from '../../vmm-device/vpc/compiled-policy.ts';
import { VpcEngine } from '../../vmm-device/vpc/engine.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { EtcdPolicySource, publishPolicy } from '../../vmm-device/vpc/etcd-source.ts';
import { FilePolicySource, type LoadOutcome } from '../../vmm-device/vpc/file-source.ts';
import { PolicyValidator, jsonEqual } from '../../vmm-device/vpc/incremental.ts';
import { validatePolicy } from '../../vmm-device/vpc/schema.ts';
import { EtcdCluster, until } from './etcd-harness.ts';
import { fixtureJson } from './policy.ts';

const RULES = 1000;

/** The fixture with RULES rules in acme-prod: RULES - 1 deny rules that never match, then the allowing one. */
function bigPolicy(): ReturnType<typeof fixtureJson> {
  const j = fixtureJson();
  const filler = Array.from({ length: RULES - 1 }, (_, i) => ({
    id: 1000 + i,
    action: 'deny',
    src: `10.${(i >> 8) & 255}.${i & 255}.0/24`,
    dst: '10.255.0.0/16',
    qpTypes: ['RC', 'UD'],
  }));
  j.vpcs[0].rules = [...filler, ...j.vpcs[0].rules];
  return j;
}

const clone = <T>(x: T): T => JSON.parse(JSON.stringify(x)) as T;

t.test('one changed rule of 1,000: one rule validated and compiled, 999 kept; the result equals full validation', async (t) => {
  const v = new PolicyValidator();
  const first = v.validate(bigPolicy());
  t.ok(first.ok, 'the first document is valid');
  t.same(
    { full: v.last.fullValidations, validated: v.last.rulesValidated, reused: v.last.rulesReused },
    { full: 1, validated: RULES + 1, reused: 0 },
    'the first document is validated in full (1,000 + 1 rules)',
  );
  const firstCompiled = compile((first as { policy: any }).policy);

  const j = bigPolicy();
  j.vpcs[0].rules[500].action = 'allow';
  const r = v.validate(clone(j));
  t.ok(r.ok, 'the edited document is valid');
  t.same(
    { full: v.last.fullValidations, validated: v.last.rulesValidated, reused: v.last.rulesReused, entriesValidated: v.last.entriesValidated },
    { full: 0, validated: 1, reused: RULES, entriesValidated: 0 },
    'only the changed rule went through RuleSchema; every other rule and entry kept its validated form',
  );
  const full = validatePolicy(clone(j));
  t.ok(full.ok && r.ok && jsonEqual(JSON.parse(JSON.stringify(r.policy)), JSON.parse(JSON.stringify(full.policy))), 'the same document as full validation gives');

  const before = compileCounts.rulesCompiled;
  const compiled = compile((r as { policy: any }).policy);
  t.equal(compileCounts.rulesCompiled - before, 1, 'compile() compiled only the changed rule');
  const unchangedRule = compiled.vpcs.get('acme-prod')!.rules.find((x) => x.id === 1000)!;
  t.equal(unchangedRule, firstCompiled.vpcs.get('acme-prod')!.rules.find((x) => x.id === 1000), 'an unchanged rule keeps its compiled object');
  t.equal(compiled.vpcs.get('acme-prod')!.rules.find((x) => x.id === 1500)!.allow, true, 'the changed rule is compiled anew');

  // The bench's change: the allowing rule removed; then put back. Nothing to validate either time.
  const removed = bigPolicy();
  removed.vpcs[0].rules.pop();
  const r2 = v.validate(removed);
  t.ok(r2.ok);
  t.same({ validated: v.last.rulesValidated, reused: v.last.rulesReused }, { validated: 1, reused: RULES - 1 }, 'a removed rule: rule 1500 (changed back) validated, the others kept');
  const r3 = v.validate(bigPolicy());
  t.ok(r3.ok);
  t.same({ validated: v.last.rulesValidated, reused: v.last.rulesReused }, { validated: 1, reused: RULES }, 'a rule added back: only it is validated');
  const reordered = bigPolicy();
  reordered.vpcs[0].rules.reverse();
  t.ok(v.validate(reordered).ok);
  t.same({ validated: v.last.rulesValidated, reused: v.last.rulesReused }, { validated: 0, reused: RULES + 1 }, 'rules reordered: matched by id, none validated');
  t.same(v.counts.rulesValidated, RULES + 1 + 1 + 1 + 1, 'cumulative count of rules validated');

  const fullMode = new PolicyValidator('full');
  fullMode.validate(bigPolicy());
  fullMode.validate(j);
  t.same({ full: fullMode.last.fullValidations, validated: fullMode.last.rulesValidated }, { full: 1, validated: RULES + 1 }, "'full' mode validates every rule of every document");
});

t.test('a changed entry with a bad field gets the precise error naming the field, identical to full validation', async (t) => {
  type Doc = ReturnType<typeof bigPolicy>;
  const cases: [string, (j: Doc) => void, string][] = [
    ['rule src', (j) => (j.vpcs[0].rules[700].src = '10.0.0/24'), 'vpcs[0].rules[700].src: "10.0.0/24" is not a CIDR prefix'],
    ['rule host bits', (j) => (j.vpcs[0].rules[3].dst = '172.16.0.1/24'), 'vpcs[0].rules[3].dst: "172.16.0.1/24" has host bits set'],
    ['rule action', (j) => (j.vpcs[0].rules[999].action = 'permit'), 'vpcs[0].rules[999].action:'],
    ['rule qp type', (j) => (j.vpcs[0].rules[10].qpTypes = ['RC', 'UC']), 'vpcs[0].rules[10].qpTypes[1]:'],
    ['rule unknown field', (j) => (j.vpcs[0].rules[20].port = 4791), 'vpcs[0].rules[20]:'],
    ['rule id twice', (j) => j.vpcs[0].rules.push({ id: 1000, action: 'deny' }), `vpcs[0].rules[${RULES}].id: rule id 1000 is used twice in VPC "acme-prod"`],
    // An exact copy of a kept rule is itself "kept": the VPC's rules must still be checked as a whole.
    ['rule copied', (j) => j.vpcs[0].rules.push(clone(j.vpcs[0].rules[7])), `vpcs[0].rules[${RULES}].id: rule id 1007 is used twice in VPC "acme-prod"`],
    ['vpc copied', (j) => j.vpcs.push(clone(j.vpcs[1])), 'vpcs[2].id: "globex-net" is used twice in vpcs'],
    ['vm copied', (j) => j.vms.push(clone(j.vms[0])), 'vms[4].id: "a1" is used twice in vms'],
    ['new rule bad', (j) => j.vpcs[1].rules.push({ id: 8, action: 'deny', src: 'nowhere' }), 'vpcs[1].rules[1].src:'],
    ['qp type twice', (j) => (j.vpcs[0].rules[30].qpTypes = ['RC', 'RC']), 'vpcs[0].rules[30].qpTypes: lists a QP type twice'],
    ['too many rules', (j) => j.vpcs[0].rules.push(...Array.from({ length: 4096 }, (_, i) => ({ id: 100_000 + i, action: 'deny' }))), 'vpcs[0].rules:'],
    ['rules not a list', (j) => (j.vpcs[1].rules = { id: 7 } as any), 'vpcs[1].rules:'],
    ['vpc cidr', (j) => (j.vpcs[0].cidr = '172.16.0.0'), 'vpcs[0].cidr: "172.16.0.0" is not a CIDR prefix (a.b.c.d/n)'],
    ['vm address', (j) => (j.vms[2].ip = '172.16.0.300'), 'vms[2].ip: "172.16.0.300" is not an IPv4 address a.b.c.d'],
    ['vm outside', (j) => (j.vms[1].ip = '172.17.0.2'), `vms[1].ip: 172.17.0.2 is outside VPC "acme-prod"'s 172.16.0.0/24`],
    ['unknown host', (j) => (j.vms[3].host = 'host-9'), 'vms[3].host: "host-9" is not the id of a host'],
    ['provider dscp', (j) => (j.tenants[1].qos.dscp = 48), "tenants[1].qos.dscp: 48 is the provider's DSCP"],
    ['settings', (j) => ((j.defaultQuotas as any).mrs = -1), 'defaultQuotas.mrs:'],
    ['top-level field', (j) => ((j as any).extra = 1), '(document):'],
    ['list not a list', (j) => ((j as any).vms = 'a1'), 'vms:'],
    ['host oversubscribed', (j) => (j.vms[0].quotas = { qps: 25 }), 'hosts[0].capacity.qps: the qps quotas of the 2 VMs on host "host-1" add up to 33'],
  ];
  for (const [name, edit, expected] of cases) {
    const v = new PolicyValidator();
    t.ok(v.validate(bigPolicy()).ok, `${name}: the previous document is accepted`);
    const j = bigPolicy();
    edit(j);
    const r = v.validate(clone(j));
    const full = validatePolicy(clone(j));
    t.notOk(r.ok, `${name}: refused`);
    if (r.ok || full.ok) continue;
    t.ok(r.errors.some((e) => e.startsWith(expected)), `${name}: ${JSON.stringify(r.errors.slice(0, 3))} has "${expected}"`);
    t.same(r.errors, full.errors, `${name}: exactly the full validation's errors`);
    // The refused document did not replace the accepted one: the next valid edit is still diffed against it.
    const ok = bigPolicy();
    ok.vpcs[0].rules[1].priority = 5;
    t.ok(v.validate(ok).ok, `${name}: a valid edit after the refusal is accepted`);
    t.same([v.last.rulesValidated, v.last.fullValidations], [1, 0], `${name}: ... diffed against the last accepted document`);
  }
});

t.test('an unchanged document is known unchanged from the diff; an unchanged VPC is the accepted object, its compiled rules reused', async (t) => {
  const v = new PolicyValidator();
  const first = v.validate(bigPolicy(), { compare: true });
  t.ok(first.ok && !first.unchanged, 'the first document is a change');
  const firstCompiled = compile((first as { policy: any }).policy);

  const same = v.validate(bigPolicy(), { compare: true });
  t.ok(same.ok && same.unchanged, 'the same document (parsed anew) is unchanged');
  t.same([v.last.rulesValidated, v.last.entriesValidated, v.last.fullValidations], [0, 0, 0], '... nothing validated');
  const sameCompiled = compile((same as { policy: any }).policy);
  t.equal((same as { policy: any }).policy.vpcs[0], (first as { policy: any }).policy.vpcs[0], 'the VPC is the very object accepted before');
  t.equal(sameCompiled.vpcs.get('acme-prod')!.rules, firstCompiled.vpcs.get('acme-prod')!.rules, 'its compiled rule list is reused, not sorted again');

  const quota = bigPolicy();
  quota.vms[1].quotas = { qps: 2 };
  const q = v.validate(quota, { compare: true });
  t.ok(q.ok && !q.unchanged, 'a VM quota changed: a change');
  t.same([v.last.rulesValidated, v.last.entriesValidated], [0, 1], '... one VM validated');
  t.equal(compile((q as { policy: any }).policy).vpcs.get('acme-prod')!.rules, firstCompiled.vpcs.get('acme-prod')!.rules, '... the VPC untouched keeps its compiled rules');

  const moved = clone(quota);
  moved.vms.reverse();
  const m = v.validate(moved, { compare: true });
  t.ok(m.ok && !m.unchanged, 'VMs reordered: a change (the list order is part of the document)');
  t.same([v.last.entriesValidated, v.last.entriesReused], [0, 10], '... nothing validated (2 hosts, 2 tenants, 4 VMs, 2 VPCs kept)');

  const prio = clone(moved);
  prio.vpcs[0].rules[3].priority = 1;
  const p = v.validate(prio, { compare: true });
  t.ok(p.ok && !p.unchanged);
  const rules = compile((p as { policy: any }).policy).vpcs.get('acme-prod')!.rules;
  t.same(rules.slice(0, 2).map((r) => r.id), [1003, 1000], 'a raised priority still reorders the compiled rules');

  const settings = clone(prio);
  (settings.provider as { dscp: number }).dscp = 47;
  const sv = v.validate(settings, { compare: true });
  t.ok(sv.ok && !sv.unchanged, 'a setting changed: a change');
  t.ok(v.validate(clone(settings), { compare: true }).unchanged, 'and the same again: unchanged');
  t.notOk(v.validate(clone(settings)).unchanged, 'unchanged is reported only when asked (compare)');
});

/** Deterministic PRNG (mulberry32): the run is reproducible from its seed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

t.test('differential: incremental and full validation agree on 400 random edits, valid or not, and on whether anything changed', async (t) => {
  const rand = rng(0x1a2b3c);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const values = ['allow', 'deny', 'any', '10.0.0.0/8', '10.0.0/8', '172.16.0.9', 1, 0, -1, 70000, true, null, ['RC'], ['UD', 'RC'], ['XX'], 'x'.repeat(300), undefined];
  const ruleFields = ['id', 'action', 'src', 'dst', 'qpTypes', 'priority', 'bidirectional', 'description', 'bogus'];
  const v = new PolicyValidator();
  let doc = bigPolicy();
  t.ok(v.validate(clone(doc)).ok);
  let accepted = 0;
  let refused = 0;
  let disagreements = 0;
  let unchanged = 0;
  for (let i = 0; i < 400; i++) {
    const next = clone(doc);
    const vpc = pick(next.vpcs);
    const op = rand();
    if (op < 0.5 && vpc.rules.length > 0) {
      const rule = pick(vpc.rules as Record<string, unknown>[]);
      const f = pick(ruleFields);
      const val = pick(values);
      if (val === undefined) delete rule[f];
      else rule[f] = val;
    } else if (op < 0.6) {
      // A new rule (its id may be another's), or an exact copy of a kept one (its id twice).
      if (rand() < 0.25 && vpc.rules.length > 0) vpc.rules.splice(Math.floor(rand() * vpc.rules.length), 0, clone(pick(vpc.rules)));
      else vpc.rules.push({ id: Math.floor(rand() * 3000) + 1, action: pick(['allow', 'deny']), src: pick(['any', '10.1.0.0/16']) });
    }
    else if (op < 0.7) vpc.rules.splice(Math.floor(rand() * vpc.rules.length), 1);
    else if (op < 0.75) vpc.rules.reverse();
    else if (op < 0.85) pick(next.vms)[pick(['ip', 'host', 'vpc', 'mac'])] = pick(['172.16.0.4', '172.16.0.1', 'host-2', 'acme-prod', 'globex-net', '02:42:ac:10:00:02', 7]);
    else if (op < 0.9) (vpc as Record<string, unknown>)[pick(['defaultAction', 'qkey', 'cidr'])] = pick(['allow', 'deny', 12345, '172.16.0.0/24', 0x8000_0000]);
    else if (op < 0.95) (next.defaultQuotas as Record<string, unknown>)['qps'] = pick([8, 4, 100, -1]);
    else pick(next.tenants).qos.dscp = pick([10, 26, 48, 64]);
    if (rand() < 0.1) Object.assign(next, clone(doc)); // no edit at all: unchanged
    const inc = v.validate(clone(next), { compare: true });
    const full = validatePolicy(clone(next));
    const same =
      inc.ok === full.ok &&
      (inc.ok && full.ok ? jsonEqual(JSON.parse(JSON.stringify(inc.policy)), JSON.parse(JSON.stringify(full.policy))) : !inc.ok && !full.ok && jsonEqual(inc.errors, full.errors)) &&
      inc.unchanged === (full.ok && jsonEqual(doc, next));
    if (inc.unchanged) unchanged++;
    if (!same) {
      disagreements++;
      t.fail(`edit ${i}: incremental ${JSON.stringify(inc.ok ? (inc.unchanged ? 'unchanged' : 'ok') : inc.errors.slice(0, 2))} vs full ${JSON.stringify(full.ok ? 'ok' : full.errors.slice(0, 2))}`);
    }
    if (full.ok) {
      accepted++;
      doc = next; // the next edit starts from the document in force
    } else refused++;
  }
  t.equal(disagreements, 0, `no disagreement (${accepted} accepted, ${refused} refused)`);
  t.ok(accepted > 50 && refused > 50 && unchanged > 10, `every outcome exercised: ${accepted} accepted (${unchanged} unchanged), ${refused} refused`);
  t.ok(v.counts.rulesReused > 100 * RULES, `rules kept rather than revalidated: ${v.counts.rulesReused} kept, ${v.counts.rulesValidated} validated`);
});

t.test('through a policy file on disk: a rule change validates one rule', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vpc-incremental-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'policy.json');
  writeFileSync(path, JSON.stringify(bigPolicy()));
  const log = new RecordingLogger();
  const engine = new VpcEngine({ log });
  const source = new FilePolicySource({ path, engine, log, debounceMs: 20 });
  t.teardown(() => source.stop());
  source.start();
  t.equal(source.validator.last.rulesValidated, RULES + 1, 'first load: every rule');
  const j = bigPolicy();
  j.vpcs[0].rules.pop(); // the allowing rule goes
  const applied = once(source, 'applied');
  writeFileSync(path, JSON.stringify(j));
  const [outcome] = (await applied) as [LoadOutcome];
  t.ok(outcome.ok, 'applied');
  t.same({ validated: source.validator.last.rulesValidated, reused: source.validator.last.rulesReused }, { validated: 0, reused: RULES }, 'the reload validated no rule and kept 1,000');
  t.notOk(engine.resolve('a1', new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 172, 16, 0, 2]), 'RC').ok, 'the rule change is in force');
  const bad = bigPolicy();
  bad.vpcs[0].rules[42].dst = '10.255.0.0/33';
  const rejected = once(source, 'rejected');
  writeFileSync(path, JSON.stringify(bad));
  const [r] = (await rejected) as [LoadOutcome];
  t.ok(!r.ok && r.errors[0]!.startsWith('vpcs[0].rules[42].dst:'), `refused naming the field: ${!r.ok ? r.errors[0] : ''}`);
});

t.test('through a real etcd member: an unchanged VPC key is not even compared, a changed one validates one rule', async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  const prefix = '/vrdma/vpc/';
  const log = new RecordingLogger('etcd');
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log });
  await publishPolicy(writer, prefix, bigPolicy());
  const engine = new VpcEngine({ log });
  const source = new EtcdPolicySource({ client: new EtcdClient({ endpoints: cluster.endpoints, log }), prefix, engine, log });
  source.start();
  t.teardown(() => source.stop());
  await source.ready;
  t.equal(source.validator.last.rulesValidated, RULES + 1, 'first state: every rule');
  const j = bigPolicy();
  j.vpcs[0].rules[10].priority = 3;
  j.vms[1].quotas = { qps: 2 };
  const applied = source.metrics.applied;
  await publishPolicy(writer, prefix, j);
  await until(() => source.metrics.applied > applied, 20_000, 'the change applied');
  t.same(
    { validated: source.validator.last.rulesValidated, reused: source.validator.last.rulesReused, entries: source.validator.last.entriesValidated },
    { validated: 1, reused: RULES, entries: 1 },
    'one rule and one VM validated; the rest kept (globex-net unchanged: the same parsed object)',
  );
  const bad = bigPolicy();
  bad.vpcs[0].rules[5].qpTypes = ['RD'];
  const rejected = source.metrics.rejected;
  await publishPolicy(writer, prefix, bad);
  await until(() => source.metrics.rejected > rejected, 20_000, 'the bad state refused');
  t.match(source.metrics.lastError, /^key \/vrdma\/vpc\/vpcs\/acme-prod: vpcs\[0\]\.rules\[5\]\.qpTypes\[0\]:/, 'refused naming the key and the field');
});
