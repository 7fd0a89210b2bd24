// Every recorded fixture replayed through our device-side queues: the chains, errors, used elements and
// notification decisions must be exactly the recorded ones, and nothing may be written outside guest memory.

import t from 'tap';
import { basename } from 'node:path';
import { createQueue } from '../../vmm-device/virtqueue/index.ts';
import { replayFixture } from '../../guest-driver-spec/testkit/fixture-replay.ts';
import { fixtureFiles, loadFixture, MIN_FIXTURES } from '../../guest-driver-spec/testkit/fixture-files.ts';

const files = fixtureFiles();

t.test('the fixture set is complete enough', async (t) => {
  t.ok(files.length >= MIN_FIXTURES, `${files.length} fixtures (at least ${MIN_FIXTURES})`);
});

for (const file of files) {
  t.test(basename(file), async (t) => {
    const fixture = loadFixture(file);
    const result = replayFixture(fixture, createQueue);
    t.same(result.mismatches, [], `${result.steps} steps replay as recorded`);
    t.same(result.guardErrors, [], 'guard bytes around every region unchanged');
  });
}

t.test('the replayer reports differences (so these tests can fail)', async (t) => {
  const file = files.find((f) => basename(f) === 'split-features-evidx-indirect.json');
  t.ok(file, 'fixture present');
  const base = loadFixture(file!);
  t.same(replayFixture(base, createQueue).mismatches, [], 'unchanged: replays clean');

  const wrongId = structuredClone(base);
  const popIndex = wrongId.steps.findIndex((s) => s.op === 'pop' && 'chain' in s.expect);
  const pop = wrongId.steps[popIndex]!;
  if (pop.op === 'pop' && 'chain' in pop.expect) pop.expect.chain.id ^= 1;
  const r1 = replayFixture(wrongId, createQueue);
  t.equal(r1.mismatches[0]?.step, popIndex, 'a wrong chain id is reported at its pop step');

  const wrongLen = structuredClone(base);
  const usedIndex = wrongLen.steps.findIndex((s) => s.op === 'checkUsed' && s.expect.length > 0);
  const used = wrongLen.steps[usedIndex]!;
  if (used.op === 'checkUsed') used.expect[0]!.len += 1;
  t.equal(replayFixture(wrongLen, createQueue).mismatches[0]?.step, usedIndex, 'a wrong used length is reported');

  // A device that reports one byte less than it was told: checkUsed sees it.
  const shortDevice = replayFixture(base, (layout, options) => {
    const q = createQueue(layout, options);
    const pushUsed = q.pushUsed.bind(q);
    q.pushUsed = (chain, len) => pushUsed(chain, Math.max(0, len - 1));
    return q;
  });
  t.ok(shortDevice.mismatches.some((m) => m.op === 'checkUsed'), 'a device pushing wrong lengths fails the fixture');

  const error = files.find((f) => basename(f) === 'packed-error-nested-indirect.json');
  const wrongKind = loadFixture(error!);
  for (const s of wrongKind.steps) if (s.op === 'pop' && 'error' in s.expect) s.expect.error = 'IndirectWithNext';
  t.ok(replayFixture(wrongKind, createQueue).mismatches.some((m) => m.op === 'pop'), 'a wrong error kind is reported');
});
