// The shared memory region's range allocator (vmm-device/rdma/mapped/region.ts) under destroys in any order: checked
// page by page against a bitmap of the region, so the binary search that places a released range keeps the free
// extents exact, sorted and merged while the list fragments (a guest may destroy its mapped queues in any order).
import t from 'tap';
import { RangeAllocator, type RegionRange } from '../../vmm-device/rdma/mapped/region.ts';
import { prng } from '../util/xorshift.ts';

const PAGE = 4096n;

t.test('random allocations and releases agree with a page bitmap; the free list stays merged', async (t) => {
  const rnd = prng(0x1234567);
  const PAGES = 4096;
  const base = 16n * PAGE;
  const r = new RangeAllocator(base, BigInt(PAGES) * PAGE);
  const used = new Uint8Array(PAGES);
  let live: RegionRange[] = [];
  const problems: string[] = [];
  let allocs = 0;
  let releases = 0;
  let longest = 0;
  for (let step = 0; step < 20_000 && problems.length === 0; step++) {
    if (rnd(3) !== 0 || live.length === 0) {
      const pages = 1 + rnd(4);
      const got = r.alloc(BigInt(pages) * PAGE - BigInt(rnd(4096)));
      // First fit: the lowest run of `pages` free pages, or none.
      let want = -1;
      for (let p = 0, run = 0; p < PAGES; p++) {
        run = used[p] === 0 ? run + 1 : 0;
        if (run === pages) {
          want = p - pages + 1;
          break;
        }
      }
      const at = got === undefined ? -1 : Number((got.offset - base) / PAGE);
      if (at !== want) problems.push(`step ${step}: alloc of ${pages} pages at page ${at}, first fit is ${want}`);
      if (got !== undefined) {
        if (got.length !== BigInt(pages) * PAGE) problems.push(`step ${step}: length ${got.length}`);
        used.fill(1, at, at + pages);
        live.push(got);
        allocs++;
      }
    } else {
      const victim = live[rnd(live.length)]!;
      r.release(victim);
      const at = Number((victim.offset - base) / PAGE);
      used.fill(0, at, at + Number(victim.length / PAGE));
      live = live.filter((l) => l !== victim);
      releases++;
    }
    const free = r.freeExtents;
    longest = Math.max(longest, free.length);
    let freePages = 0;
    for (let i = 0; i < free.length; i++) {
      const f = free[i]!;
      const next = free[i + 1];
      if (next !== undefined && f.offset + f.length >= next.offset) problems.push(`step ${step}: extents ${i} and ${i + 1} touch or overlap`);
      const p0 = Number((f.offset - base) / PAGE);
      for (let p = p0; p < p0 + Number(f.length / PAGE); p++) if (used[p] !== 0) problems.push(`step ${step}: page ${p} free and used`);
      freePages += Number(f.length / PAGE);
    }
    if (freePages + used.reduce((a, b) => a + b, 0) !== PAGES) problems.push(`step ${step}: ${freePages} free pages do not complete the used ones`);
  }
  t.same(problems.slice(0, 5), [], 'no disagreement');
  t.ok(allocs > 5000 && releases > 3000, `exercised: ${allocs} allocations, ${releases} releases`);
  t.ok(longest > 50, `the free list fragmented (up to ${longest} extents)`);
  t.same(r.live, { ranges: live.length, bytes: live.reduce((a, l) => a + l.length, 0n) });
});
