// RangeIndex (vmm-device/util/range-index.ts): the sorted index of a shared memory region's mappings. Checked
// against a plain list on random operations, and for what it is for: a lookup among n ranges reads O(log n) of them
// (the lists it replaced read all n per request, which made a set-up of N mapped QPs cost O(N^2)).
import t from 'tap';
import { RangeIndex, type IndexedRange } from '../../vmm-device/util/range-index.ts';
import { prng } from './xorshift.ts';

interface R extends IndexedRange {
  readonly id: number;
}

t.test('agrees with a plain list on random inserts, removals and lookups', async (t) => {
  const rnd = prng(0x5eed);
  const index = new RangeIndex<R>();
  let model: R[] = [];
  const PAGES = 512;
  const overlapsIn = (o: bigint, l: bigint) => model.filter((r) => r.offset < o + l && o < r.offset + r.length);
  /** Disagreements by operation, each with its first example (one assertion each at the end, not 100,000). */
  const bad = new Map<string, string>();
  const count = { insert: 0, refused: 0, remove: 0, lookups: 0 };
  const check = (ok: boolean, what: string, example: () => string) => {
    if (!ok && !bad.has(what)) bad.set(what, example());
  };
  for (let step = 0; step < 20_000; step++) {
    const op = rnd(10);
    const offset = BigInt(rnd(PAGES)) * 4096n;
    const length = BigInt(1 + rnd(8)) * 4096n;
    if (op < 4) {
      const r: R = { id: step, offset, length };
      if (overlapsIn(offset, length).length === 0) {
        index.insert(r);
        model.push(r);
        count.insert++;
      } else {
        let threw = false;
        try {
          index.insert(r);
        } catch (e) {
          threw = e instanceof RangeError;
        }
        check(threw, 'an overlapping insert throws a RangeError', () => `step ${step}`);
        count.refused++;
      }
    } else if (op < 6 && model.length > 0) {
      const victim = model[rnd(model.length)]!;
      check(index.remove({ ...victim }) === false, 'a copy is not the range held', () => `id ${victim.id}`);
      check(index.remove(victim), 'remove finds the range', () => `id ${victim.id}`);
      check(!index.remove(victim), 'a range is removed once only', () => `id ${victim.id}`);
      model = model.filter((r) => r !== victim);
      count.remove++;
    } else {
      count.lookups++;
      const at = offset + BigInt(rnd(4096));
      const holder = model.find((r) => at >= r.offset && at < r.offset + r.length);
      check(index.containing(at) === holder, 'containing', () => `0x${at.toString(16)}: ${index.containing(at)?.id} vs ${holder?.id}`);
      const o = index.overlapping(offset, length);
      const all = overlapsIn(offset, length);
      check(o === undefined ? all.length === 0 : all.includes(o), 'overlapping', () => `0x${offset.toString(16)}+0x${length.toString(16)}: ${o?.id} vs ${all.map((r) => r.id)}`);
      const next = [...model].sort((a, b) => (a.offset < b.offset ? -1 : 1)).find((r) => r.offset > at);
      check(index.after(at) === next, 'after', () => `0x${at.toString(16)}: ${index.after(at)?.id} vs ${next?.id}`);
      const e = model.find((r) => r.offset === offset);
      check(index.exact(offset, e?.length ?? length) === e, 'exact', () => `0x${offset.toString(16)}`);
      if (e !== undefined) check(index.exact(offset, e.length + 4096n) === undefined, 'exact wants the length too', () => `id ${e.id}`);
    }
    check(index.size === model.length, 'size', () => `step ${step}: ${index.size} vs ${model.length}`);
  }
  t.same(Object.fromEntries(bad), {}, 'no disagreement with the list');
  t.same(
    index.toArray().map((r) => r.id),
    [...model].sort((a, b) => (a.offset < b.offset ? -1 : 1)).map((r) => r.id),
    'toArray is the ranges in offset order',
  );
  t.ok(count.insert > 1000 && count.refused > 1000 && count.remove > 1000 && count.lookups > 5000, `every operation exercised: ${JSON.stringify(count)}`);
  t.throws(() => index.insert({ id: -1, offset: 0n, length: 0n }), RangeError, 'an empty range is refused');
  t.equal(index.clear().length, model.length);
  t.equal(index.size, 0);
});

t.test('a lookup among 32,768 ranges reads O(log n) of them, not all', async (t) => {
  const N = 32_768;
  let reads = 0;
  /** A range whose offset counts its reads: what a lookup costs, without a clock. */
  const counted = (id: number, offset: bigint, length: bigint): R => ({
    id,
    length,
    get offset() {
      reads++;
      return offset;
    },
  });
  const index = new RangeIndex<R>();
  const PAGE = 4096n;
  // Filled from the start, as a region is: 2 pages each with a 1-page hole after (so holes exist to look into).
  const ranges: R[] = [];
  for (let i = 0; i < N; i++) {
    const r = counted(i, BigInt(i) * 3n * PAGE, 2n * PAGE);
    ranges.push(r);
    index.insert(r);
  }
  const budget = 2 * Math.ceil(Math.log2(N)) + 4; // two binary searches and a few checks
  const cost = (what: string, f: () => unknown, expect: unknown) => {
    reads = 0;
    t.equal(f(), expect, what);
    t.ok(reads <= budget, `${what}: ${reads} reads of ${N} ranges (at most ${budget})`);
  };
  for (const i of [0, 1, N / 2, N - 2, N - 1]) {
    const r = ranges[i]!;
    const start = BigInt(i) * 3n * PAGE;
    cost(`containing in range ${i}`, () => index.containing(start + PAGE + 7n), r);
    cost(`containing in the hole after range ${i}`, () => index.containing(start + 2n * PAGE), undefined);
    cost(`overlapping range ${i}`, () => index.overlapping(start + PAGE, 2n * PAGE), r);
    cost(`overlapping the hole after range ${i} only`, () => index.overlapping(start + 2n * PAGE, PAGE), undefined);
    cost(`exact range ${i}`, () => index.exact(start, 2n * PAGE), r);
    cost(`after range ${i}`, () => index.after(start), ranges[i + 1]);
  }
  reads = 0;
  const last = counted(N, BigInt(N) * 3n * PAGE, PAGE);
  index.insert(last);
  t.ok(reads <= budget, `insert past the end: ${reads} reads`);
  reads = 0;
  t.equal(index.remove(ranges[N / 2]!), true);
  t.ok(reads <= budget, `remove from the middle: ${reads} reads`);
  reads = 0;
  index.insert(ranges[N / 2]!);
  t.ok(reads <= budget, `insert into the middle: ${reads} reads`);
  t.equal(index.size, N + 1);
});
