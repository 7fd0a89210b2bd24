// `npm run fixture -- decode` must work on every recorded fixture, and show what a developer looks for.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeFixture } from '../../scripts/fixture.ts';
import { fixtureFiles, loadFixture } from '../../guest-driver-spec/testkit/fixture-files.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

t.test('every fixture decodes', async (t) => {
  for (const file of fixtureFiles()) {
    const f = loadFixture(file);
    const text = decodeFixture(f);
    t.match(text, `fixture ${f.name}`, `${basename(file)}: header`);
    t.match(text, f.queue.layout === 'split' ? /avail ring: flags/ : /driver event suppression: flags/, `${basename(file)}: ring areas`);
    const pops = f.steps.filter((s) => s.op === 'pop').length;
    t.equal(text.split('\n').filter((l) => / pop -> /.test(l)).length, pops, `${basename(file)}: every pop step listed`);
    for (const s of f.steps) {
      if (s.op === 'pop' && 'error' in s.expect) t.match(text, `pop -> error ${s.expect.error}`, `${basename(file)}: the expected error`);
    }
  }
});

t.test('the command line decodes a fixture and rejects bad input', async (t) => {
  const file = fixtureFiles().find((f) => basename(f) === 'split-error-nested-indirect.json');
  t.ok(file, 'the nested-indirect fixture exists');
  const tsx = join(root, 'node_modules', '.bin', 'tsx');
  const ok = spawnSync(tsx, ['scripts/fixture.ts', 'decode', file!], { cwd: root, encoding: 'utf8' });
  t.equal(ok.status, 0, ok.stderr);
  t.match(ok.stdout, /indirect table of descriptor \d+: 32 bytes at 0x/, 'decodes the indirect tables');
  t.match(ok.stdout, /flags INDIRECT/, 'decodes descriptor flags');
  t.match(ok.stdout, /pop -> error NestedIndirect/, 'states the expected error');
  const replay = spawnSync(tsx, ['scripts/fixture.ts', 'replay', file!], { cwd: root, encoding: 'utf8' });
  t.equal(replay.status, 0, replay.stderr);
  t.match(replay.stdout, /split-error-nested-indirect: ok \(\d+ steps\)/, 'replay through our engine: ok');
  const usage = spawnSync(tsx, ['scripts/fixture.ts', 'frobnicate'], { cwd: root, encoding: 'utf8' });
  t.equal(usage.status, 2, 'unknown command: usage error');
  const missing = spawnSync(tsx, ['scripts/fixture.ts', 'decode', join(root, 'no-such-fixture.json')], { cwd: root, encoding: 'utf8' });
  t.equal(missing.status, 1, 'missing file: failure');
  t.match(missing.stderr, /no-such-fixture\.json/, 'names the file');
});
