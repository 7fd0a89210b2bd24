// Golden-byte fixtures (fixtures/vhost-user/*.json): the back-end answers every recorded exchange byte for byte.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { host, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { readFixture, replayFixture } from '../../../guest-driver-spec/frontend/exchange-fixture.ts';
import { FIXTURE_DIR, SCENARIOS } from '../../../guest-driver-spec/frontend/record-fixtures.ts';

const files = fs.readdirSync(FIXTURE_DIR).filter((f) => f.endsWith('.json')).sort();

t.test('every scenario has its fixture', async (t) => {
  t.same(files, SCENARIOS.map((s) => `${s.name}.json`).sort());
});

for (const file of files) {
  t.test(`replay ${file}`, async (t) => {
    const f = readFixture(path.join(FIXTURE_DIR, file));
    t.ok(f.steps.length > 0);
    const r = await rig({ queues: 2 });
    const mismatches = await replayFixture(r.fe, host, f);
    t.same(mismatches, [], 'the back-end answered exactly the recorded bytes');
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
}
