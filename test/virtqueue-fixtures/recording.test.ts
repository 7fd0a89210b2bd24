// The fixtures are reproducible: recording again gives byte-identical files, and the set covers every error kind
// and every feature combination the issue asks for.

import t from 'tap';
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { VIRTQUEUE_ERROR_KINDS } from '../../vmm-device/virtqueue/errors.ts';
import { fixtureFileName, recordAll, serialize } from '../../scripts/record-virtqueue-fixtures.ts';
import { fixtureFiles, loadFixture, MIN_FIXTURES } from '../../guest-driver-spec/testkit/fixture-files.ts';

t.test('recording again gives the committed files, byte for byte', async (t) => {
  const recorded = recordAll();
  const files = fixtureFiles();
  t.same(files.map((f) => basename(f)).sort(), recorded.map(fixtureFileName).sort(), 'same set of files');
  for (const f of recorded) {
    const path = files.find((p) => basename(p) === fixtureFileName(f));
    if (path === undefined) continue;
    t.equal(readFileSync(path, 'utf8'), serialize(f), `${fixtureFileName(f)} identical`);
  }
});

t.test('coverage of the fixture set', async (t) => {
  const fixtures = fixtureFiles().map(loadFixture);
  t.ok(fixtures.length >= MIN_FIXTURES, `${fixtures.length} fixtures`);
  const kinds = new Set<string>();
  const combos = new Set<string>();
  const notify = new Set<string>();
  for (const f of fixtures) {
    combos.add(`${f.queue.layout}/${f.queue.eventIdx}/${f.queue.indirect}`);
    for (const s of f.steps) {
      if (s.op === 'pop' && 'error' in s.expect) kinds.add(s.expect.error);
      if (s.op === 'needsNotification') notify.add(`${f.queue.layout}/${f.queue.eventIdx}/${s.expect}`);
      if (s.op === 'enableNotifications') notify.add(`enable/${s.expect}`);
    }
  }
  t.same([...kinds].sort(), [...VIRTQUEUE_ERROR_KINDS].sort(), 'every error kind has a fixture');
  for (const layout of ['split', 'packed']) {
    for (const e of [false, true]) {
      for (const i of [false, true]) t.ok(combos.has(`${layout}/${e}/${i}`), `${layout} EVENT_IDX=${e} INDIRECT=${i}`);
      for (const v of [false, true]) t.ok(notify.has(`${layout}/${e}/${v}`), `${layout} EVENT_IDX=${e}: needsNotification ${v}`);
    }
  }
  t.ok(notify.has('enable/true') && notify.has('enable/false'), 'enableNotifications both ways');
  t.ok(fixtures.some((f) => f.queue.size === 32768 && f.queue.layout === 'split'), 'split queue of 32768');
  t.ok(fixtures.some((f) => f.queue.size === 32768 && f.queue.layout === 'packed'), 'packed queue of 32768');
  t.ok(fixtures.some((f) => f.queue.layout === 'split' && f.queue.state.nextAvail > 65500), 'split 16-bit wrap');
  t.ok(fixtures.some((f) => f.queue.layout === 'packed' && f.queue.state.availWrap === false), 'packed wrap counter 0');
  const crossing = fixtures.some((f) =>
    f.steps.some(
      (s) =>
        s.op === 'pop' &&
        'chain' in s.expect &&
        s.expect.chain.segments.some((g) => f.memory.some((r) => g.addr < r.gpa + r.size && g.addr + g.len > r.gpa + r.size)),
    ),
  );
  t.ok(crossing, 'a segment crosses a region boundary');
});
