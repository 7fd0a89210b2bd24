// Issue 16 item 2: one VM drove its backend to vm.max_map_count (each QP with its CQ costs 3 rxe queue mappings in
// the backend) and V8 aborted. The device now charges each host QP (2) and CQ (1) to a mapping budget, what the
// process held at open plus MAP_HEADROOM kept out of reach, and its configuration's max_qp and max_cq never exceed
// the ceiling that follows. Sized for CI: the vm.max_map_count the backend sees is lowered (the test-only
// VRDMA_TEST_MAX_MAP_COUNT) so the ceiling is ~100 QPs, reached here with one CQ per QP, then refused with
// NO_RESOURCES while the budget still holds. Before the fix the configuration said 1,024 and the 101st pair was
// created. `vrdma-backend` refuses at start a quota it cannot map, naming the flag (the issue's --max-qp 65536).

import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ResourceKind, Status } from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import {
  MAP_HEADROOM,
  MAPPINGS_PER_CQ,
  MAPPINGS_PER_QP,
  MAX_MAP_COUNT_ENV,
  MappingBudget,
  countMappings,
  mappingCeiling,
  withMappingBudget,
} from '../../vmm-device/rdma/mapping-budget.ts';
import { run } from '../../vmm-device/cli/main.ts';
import { TestGuest, type GuestCq } from './guest.ts';

/** The ceiling the test aims at: hundreds of objects, not 20,000. */
const TARGET_QPS = 100;

t.test('one VM driven to its QP ceiling: refused with NO_RESOURCES, the budget never overdrawn', async (t) => {
  const verbs = new FakeVerbs({ maxQp: 65536, maxCq: 65536 });
  const maxMr = 64;
  // What the device will see at open: the mappings held now, the head-room, the MR reserve and ~100 QPs with CQs.
  process.env[MAX_MAP_COUNT_ENV] = String(countMappings() + MAP_HEADROOM + maxMr + 3 * TARGET_QPS);
  t.teardown(() => delete process.env[MAX_MAP_COUNT_ENV]);
  const g = await TestGuest.open({ verbs, regionSize: 16 << 20, quotas: { maxQp: 1024, maxCq: 1024, maxMr } });
  t.teardown(() => g.device.close());
  const ceiling = g.device.config.max_qp;
  t.ok(ceiling >= TARGET_QPS - 20 && ceiling <= TARGET_QPS, `the configuration states the ceiling: ${ceiling} QPs (quota 1,024)`);
  t.equal(g.device.config.max_cq, ceiling, 'and as many CQs');
  t.equal(ceiling, mappingCeiling(g.device.mappings.total, maxMr), 'floor((budget - max_mr) / 3)');

  const pd = await g.createPd();
  const cqs: GuestCq[] = [];
  let made = 0;
  let refusal = '';
  for (let i = 0; i < TARGET_QPS + 50; i++) {
    try {
      const cq = await g.createCq(1);
      cqs.push(cq);
      await g.createQp(pd, cq, cq, 2, 1);
      made++;
    } catch (e) {
      refusal = (e as Error).message;
      break;
    }
  }
  t.equal(made, ceiling, `exactly ${ceiling} QPs, each with its CQ`);
  t.match(refusal, `status ${Status.NO_RESOURCES} detail ${ResourceKind.CQ}`, 'the next CQ: NO_RESOURCES CQ');
  await t.rejects(g.createQp(pd, cqs[0]!, cqs[0]!, 2, 1), new RegExp(`status ${Status.NO_RESOURCES} detail ${ResourceKind.QP}`), 'a further QP on an existing CQ: NO_RESOURCES QP');
  const m = g.device.mappings;
  t.equal(m.charged, ceiling * (MAPPINGS_PER_QP + MAPPINGS_PER_CQ), 'every host QP and CQ is charged');
  t.ok(m.charged <= m.total, `within the budget: ${m.charged} of ${m.total}, head-room of ${MAP_HEADROOM} untouched`);
  t.equal(g.device.counters.hostErrors, 0, 'the host was never asked beyond the budget');

  // Destroying gives the mappings back (after the host destroy).
  t.equal((await g.destroy(0x33, g.device.qps.values().next().value!.handle)).status, Status.OK);
  await g.device.settled();
  t.equal(m.charged, ceiling * 3 - MAPPINGS_PER_QP, 'a destroyed QP returns its 2');
});

t.test('the budget as the host sees it: a create beyond it fails as ENOMEM before the host maps anything', async (t) => {
  const fake = new FakeVerbs();
  const budget = new MappingBudget(5);
  const verbs = withMappingBudget(fake, budget);
  const dev = await verbs.openDevice('fake0');
  const pd = await verbs.allocPd(dev);
  const cq = await verbs.createCq(dev, 4);
  const init = { qpType: 2, sendCq: cq, recvCq: cq, sqSigAll: false, maxSendWr: 1, maxRecvWr: 1, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 };
  const qp1 = await verbs.createQp(pd, init);
  await verbs.createQp(pd, init);
  t.equal(budget.available, 0);
  const before = fake.calls.filter((c) => c === 'ibv_create_qp').length;
  const refused = (await verbs.createQp(pd, init).catch((e: unknown) => e)) as { errno?: string };
  t.equal(refused.errno, 'ENOMEM', 'refused by the budget, as the host refuses');
  t.equal(fake.calls.filter((c) => c === 'ibv_create_qp').length, before, 'the host was not asked');
  await verbs.destroyQp(qp1);
  t.equal(budget.available, 2, 'given back after the destroy');
  fake.failNext('ibv_create_qp', 'ENOMEM');
  await t.rejects(verbs.createQp(pd, init));
  t.equal(budget.available, 2, 'a host refusal charges nothing');
});

t.test('vrdma-backend refuses at start a QP quota it cannot map, naming the flag', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-mapcap-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  process.env[MAX_MAP_COUNT_ENV] = '65530'; // the kernel's default, whatever this machine says
  t.teardown(() => delete process.env[MAX_MAP_COUNT_ENV]);
  const err: string[] = [];
  const code = await run(
    ['--socket', path.join(dir, 'vm.sock'), '--device', 'fake0', '--virtual-ip', '192.168.7.1', '--max-qp', '65536', '--max-cq', '65536'],
    { out: () => undefined, err: (s) => err.push(s), verbs: async () => new FakeVerbs({ maxQp: 1 << 20, maxCq: 1 << 20 }) },
  );
  t.equal(code, 1, 'exit 1');
  t.match(err.join(''), /--max-qp 65536: this backend can map at most \d+ QPs each with its own CQ \(vm\.max_map_count 65530/, err.join(''));
  const ok: string[] = [];
  const stop = setTimeout(() => process.emit('SIGTERM', 'SIGTERM'), 3000);
  const served = await run(
    ['--socket', path.join(dir, 'vm2.sock'), '--device', 'fake0', '--virtual-ip', '192.168.7.1', '--max-qp', '10000', '--max-cq', '10000'],
    { out: () => undefined, err: (s) => ok.push(s), verbs: async () => new FakeVerbs({ maxQp: 1 << 20, maxCq: 1 << 20 }), onServing: () => undefined },
  );
  clearTimeout(stop);
  t.equal(served, 0, `10,000 QPs with their CQs fit: served, then stopped (${ok.join('').slice(0, 200)})`);
});
