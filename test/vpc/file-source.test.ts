// The local-file control plane: a real file in a temporary directory, edited in place and replaced by rename as
// editors do; valid edits take effect (and tear down what they forbid), invalid ones are refused with a log line
// naming the field while the last good policy stays in force.

import t, { type Test } from 'tap';
import { once } from 'node:events';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { VpcEngine, type TeardownNotice } from '../../vmm-device/vpc/engine.ts';
import { FilePolicySource, type LoadOutcome } from '../../vmm-device/vpc/file-source.ts';
import { fixtureJson, gid } from './policy.ts';

/** Longest a test waits for a reload (fs.watch and the debounce take milliseconds; a loaded CI machine more). */
const RELOAD_TIMEOUT_MS = 10_000;
const DEBOUNCE_MS = 50;

async function next(source: FilePolicySource, event: 'applied' | 'rejected'): Promise<LoadOutcome> {
  const other = event === 'applied' ? 'rejected' : 'applied';
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), RELOAD_TIMEOUT_MS);
  try {
    const [outcome] = (await Promise.race([once(source, event, { signal: ac.signal }), once(source, other, { signal: ac.signal }).then(([o]) => {
      throw new Error(`expected ${event}, got ${other}: ${JSON.stringify(o)}`);
    })])) as [LoadOutcome];
    return outcome;
  } finally {
    clearTimeout(timer);
    ac.abort();
  }
}

function setup(t: Test) {
  const dir = mkdtempSync(join(tmpdir(), 'vpc-file-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'policy.json');
  writeFileSync(path, JSON.stringify(fixtureJson(), null, 2));
  const log = new RecordingLogger();
  const engine = new VpcEngine({ log });
  const source = new FilePolicySource({ path, engine, log, debounceMs: DEBOUNCE_MS });
  t.teardown(() => source.stop());
  return { dir, path, log, engine, source };
}

t.test('valid edits take effect: in place and by rename; a rule change tears the live connection down', async (t) => {
  const { dir, path, engine, source } = setup(t);
  source.start();
  t.equal(engine.metrics.policySource, path);
  const seen: TeardownNotice[] = [];
  engine.attach('a1', (n) => seen.push(n));
  engine.attach('a2', (n) => seen.push(n));
  t.ok(engine.track('a1', { kind: 'RC', local: 100, guestHandle: 1, peerGid: gid('172.16.0.2'), peerQpn: 200 }).ok);
  t.ok(engine.track('a2', { kind: 'RC', local: 200, guestHandle: 1, peerGid: gid('172.16.0.1'), peerQpn: 100 }).ok);

  const j = fixtureJson();
  j.vpcs[0].rules = [];
  const written = performance.now();
  writeFileSync(path, JSON.stringify(j));
  const outcome = await next(source, 'applied');
  const elapsed = performance.now() - written;
  t.match(outcome, { ok: true, tornDown: 2 });
  t.same(seen.map((s) => s.reason), ['RULE_CHANGED', 'RULE_CHANGED'], 'both ends');
  t.ok(outcome.ok && outcome.latencyMs < DEBOUNCE_MS + 200, `from the file event to the last teardown: ${outcome.ok ? outcome.latencyMs.toFixed(1) : '?'} ms (debounce ${DEBOUNCE_MS} ms)`);
  t.comment(`write -> both teardowns: ${elapsed.toFixed(1)} ms`);
  t.match(engine.resolve('a1', gid('172.16.0.2'), 'RC'), { ok: false, refusal: 'refused' }, 'new attempts are refused');

  const k = fixtureJson();
  k.tenants[1].qos.dscp = 12;
  writeFileSync(join(dir, 'policy.json.tmp'), JSON.stringify(k));
  renameSync(join(dir, 'policy.json.tmp'), path);
  t.match(await next(source, 'applied'), { ok: true });
  t.match(engine.resolve('g1', gid('172.16.0.3'), 'RC'), { ok: true, trafficClass: 48 }, 'the renamed-in file is in force');
  t.equal(source.metrics.loaded, 3);
});

t.test('an invalid new file is refused with a precise log line; the last good state stays in force', async (t) => {
  const { path, log, engine, source } = setup(t);
  source.start();
  const before = engine.metrics.policyVersion;
  const bad = fixtureJson();
  bad.vpcs[1].rules[0].src = '10.0.0/24';
  bad.vpcs[0].rules = [];
  writeFileSync(path, JSON.stringify(bad));
  const r = await next(source, 'rejected');
  t.match(r, { ok: false, errors: [/^vpcs\[1\]\.rules\[0\]\.src: "10\.0\.0\/24" is not a CIDR prefix/] });
  const line = log.lines.find((l) => l.level === 'error' && l.message.startsWith('policy file refused'));
  t.ok(line, 'logged as an error');
  t.match(line?.message, 'vpcs[1].rules[0].src: "10.0.0/24" is not a CIDR prefix');
  t.match(line?.fields, { path, inForce: `version ${before} from ${path}` }, 'the log line says what stays in force');
  t.equal(engine.metrics.policyVersion, before, 'nothing applied');
  t.ok(engine.resolve('a1', gid('172.16.0.2'), 'RC').ok, 'rule 10 of the last good file still allows a1 -> a2');
  t.equal(source.metrics.rejected, 1);

  writeFileSync(path, '{"version": 1, "vpcs": [');
  t.match(await next(source, 'rejected'), { ok: false, errors: [/^\(document\): not JSON/] }, 'a half-written file');
  t.ok(engine.resolve('a1', gid('172.16.0.2'), 'RC').ok);

  rmSync(path);
  t.match(await next(source, 'rejected'), { ok: false, errors: [/^\(file\): cannot read it/] }, 'a deleted file');
  t.ok(engine.resolve('a1', gid('172.16.0.2'), 'RC').ok, 'enforcement goes on');

  const fixed = fixtureJson();
  fixed.vpcs[0].defaultAction = 'deny';
  fixed.vpcs[0].rules = [];
  writeFileSync(path, JSON.stringify(fixed));
  t.match(await next(source, 'applied'), { ok: true });
  t.equal(source.metrics.lastError, undefined);
  t.match(engine.resolve('a1', gid('172.16.0.2'), 'RC'), { ok: false, refusal: 'refused' }, 'a valid file after invalid ones takes effect');
});

t.test('a backend does not start on an invalid file; stop() ends the watch', async (t) => {
  const { path, engine, log, source } = setup(t);
  const bad = fixtureJson();
  bad.vms[0].ip = '172.17.0.1';
  writeFileSync(path, JSON.stringify(bad));
  t.throws(() => new FilePolicySource({ path, engine, log }).start(), { message: /policy file .*policy\.json: vms\[0\]\.ip: 172\.17\.0\.1 is outside VPC "acme-prod"'s 172\.16\.0\.0\/24/ });
  t.notOk(engine.hasPolicy);
  writeFileSync(path, JSON.stringify(fixtureJson()));
  source.start();
  source.stop();
  let events = 0;
  source.on('applied', () => events++).on('rejected', () => events++);
  writeFileSync(path, '{}');
  await new Promise((r) => setTimeout(r, DEBOUNCE_MS * 4));
  t.equal(events, 0, 'no reload after stop');
});

t.test('a valid file is applied on its change event, without waiting for the quiet time; an invalid one waits for it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vpc-file-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'policy.json');
  writeFileSync(path, JSON.stringify(fixtureJson()));
  const log = new RecordingLogger();
  const engine = new VpcEngine({ log });
  // A quiet time far longer than the test waits: only the immediate read can apply the change.
  const quietMs = 600_000;
  const source = new FilePolicySource({ path, engine, log, debounceMs: quietMs });
  t.teardown(() => source.stop());
  source.start();
  const j = fixtureJson();
  j.vpcs[0].rules = [];
  writeFileSync(path, JSON.stringify(j));
  const outcome = await next(source, 'applied');
  t.ok(outcome.ok && outcome.latencyMs < quietMs, 'applied from the change event, long before the quiet time');
  t.match(engine.resolve('a1', gid('172.16.0.2'), 'RC'), { ok: false, refusal: 'refused' }, 'in force');

  // A save in two steps (half, then whole): the half read is no refusal, the whole one is applied.
  const k = fixtureJson();
  k.tenants[1].qos.dscp = 12;
  const text = JSON.stringify(k);
  writeFileSync(path, text.slice(0, text.length >> 1));
  await new Promise((r) => setTimeout(r, 50));
  writeFileSync(path, text);
  t.match(await next(source, 'applied'), { ok: true });
  t.equal(source.metrics.rejected, 0, 'the half-written read was not refused');
  t.notOk(log.lines.some((l) => l.message.startsWith('policy file refused')), 'nor logged as a refusal');
  t.match(engine.resolve('g1', gid('172.16.0.3'), 'RC'), { ok: true, trafficClass: 48 });
  source.stop();

  // With a short quiet time, a bad document is refused after it, not before, with the field named.
  const quick = new FilePolicySource({ path, engine, log, debounceMs: 300 });
  t.teardown(() => quick.stop());
  quick.start();
  const bad = fixtureJson();
  bad.vpcs[1].rules[0].src = '10.0.0/24';
  const written = performance.now();
  writeFileSync(path, JSON.stringify(bad));
  const r = await next(quick, 'rejected');
  const elapsed = performance.now() - written;
  t.match(r, { ok: false, errors: [/^vpcs\[1\]\.rules\[0\]\.src: "10\.0\.0\/24" is not a CIDR prefix/] });
  t.ok(elapsed >= 290, `refused once the file was quiet for the debounce time (${elapsed.toFixed(0)} ms after the write)`);
  t.equal(quick.validator.counts.fullValidations, 2, 'the bad text was validated once (plus the first load), its errors kept for the refusal');
  t.equal(quick.metrics.rejected, 1);
});
