// Every recorded fixture replayed through our device-side queues: the chains, errors, used elements and
// notification decisions must be exactly the recorded ones, and nothing may be written outside guest memory.

import t from 'tap';
import { basename } from 'node:path';
import { createQueue } from '../../vmm-device/virtqueue/index.ts';
import { replayFixture } from '../../guest-driver-spec/testkit/fixture-replay.ts';
import { fixtureFiles, loadFixture, MIN_FIXTURES } from './fixture-files.ts';

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
