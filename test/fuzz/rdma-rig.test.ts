// The RDMA fuzz targets outside the engine: one device per process, reset between inputs (test/fuzz/targets/
// rdma-rig.ts). Checks that every committed seed and a few hundred random inputs pass every target in one process,
// that an input answers the same after other inputs as on a fresh device (the reset leaves nothing behind that
// changes behaviour), the pages target's old finding as a regression, and that the rig's reset checks do fail when
// a device touches guest memory after reset or leaves a host object behind.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { SeededRandom } from '../../guest-driver-spec/testkit/prng.ts';
import { FuzzInvariantError } from './targets/harness.ts';
import { Rig } from './targets/rdma-rig.ts';
import * as control from './targets/control.ts';
import * as pages from './targets/pages.ts';
import * as doorbell from './targets/doorbell.ts';
import * as wqe from './targets/wqe.ts';
import * as eventq from './targets/eventq.ts';

const TARGETS = { control, pages, doorbell, wqe, eventq } as const;
const root = path.resolve(import.meta.dirname, '../..');
/** Random inputs per target (besides its seeds), and their largest length. */
const RANDOM_INPUTS = 60;
const RANDOM_MAX_LEN = 300;

function seeds(target: string): Buffer[] {
  const dir = path.join(root, 'fuzz/corpus', target);
  return fs.readdirSync(dir).sort().map((f) => fs.readFileSync(path.join(dir, f)));
}

function randomInputs(seed: number): Buffer[] {
  const rng = new SeededRandom(seed);
  return Array.from({ length: RANDOM_INPUTS }, () => Buffer.from(rng.fill(new Uint8Array(rng.int(0, RANDOM_MAX_LEN)))));
}

t.test('every seed and random input passes every RDMA target, one device per process', async (t) => {
  for (const [name, target] of Object.entries(TARGETS)) {
    const inputs = [...seeds(name), ...randomInputs(name.length)];
    t.ok(inputs.length > RANDOM_INPUTS, `${name}: has committed seeds`);
    for (const input of inputs) await target.fuzz(input);
    t.pass(`${name}: ${inputs.length} inputs`);
  }
});

t.test('an input answers alike after other inputs (the reset leaves nothing that changes behaviour)', async (t) => {
  const rig = await Rig.open();
  await rig.finish('probe');
  for (const [name, target] of Object.entries(TARGETS)) {
    const probe = seeds(name).at(-1)!;
    await target.fuzz(probe);
    const first = [...rig.answers];
    for (const input of randomInputs(7)) await target.fuzz(input);
    await target.fuzz(probe);
    t.ok(first.length > 0, `${name}: the probe got control answers`);
    t.same(rig.answers, first, `${name}: same answers after ${RANDOM_INPUTS} other inputs`);
  }
});

t.test('pages: total_pages of count + slack past 2^32 (the first campaign finding, the target\'s own encoder)', async (t) => {
  // REG_MR with one page, num_pages claimed 0xffffffff, total_pages = claimed + 2: the target encoded 2^32 + 1 and
  // RegMrRequest.encode threw LayoutError (fixed in 52bbfe8 by wrapping at 2^32). The device answers with a status.
  const input = Buffer.from([2, 1, 0x80, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
  const rig = await Rig.open();
  await rig.finish('probe');
  await pages.fuzz(input);
  t.equal(rig.answers.length, 4, 'CREATE_PD and REG_MR answered');
  t.not(rig.answers[2], 0, 'REG_MR refused with a status');
});

t.test('the reset checks fail when the device touches guest memory after reset', async (t) => {
  for (const how of ['GuestMemory.write', 'a view kept from before'] as const) {
    const rig = await Rig.open();
    const { cq } = await rig.connectedQp();
    const view = rig.g.mem.view(cq.ring, 64);
    setImmediate(() => {
      if (how === 'GuestMemory.write') rig.g.mem.memory.write(cq.ring, new Uint8Array([1]));
      else view[0] = 1;
    });
    await t.rejects(rig.finish('self-test'), { name: FuzzInvariantError.name, message: /touched guest memory after reset/ }, how);
  }
  // The next input starts clean.
  await control.fuzz(seeds('control')[0]!);
});

t.test('the reset checks fail when a host object outlives the reset', async (t) => {
  const rig = await Rig.open();
  const device = await rig.verbs.openDevice('fake0');
  const pd = await rig.verbs.allocPd(device);
  await t.rejects(rig.finish('self-test'), { name: FuzzInvariantError.name, message: /host objects left after reset/ });
  await rig.verbs.deallocPd(pd);
  await rig.verbs.closeDevice(device);
  await control.fuzz(seeds('control')[0]!);
});
