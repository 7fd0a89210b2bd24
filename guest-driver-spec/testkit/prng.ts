// A small seeded PRNG (mulberry32) so every kit-built case is reproducible from its seed: the same seed gives the
// same ring layout, buffer gaps, descriptor order and payload bytes on every machine and every run.

export class SeededRandom {
  private state: number;

  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }

  /** A uniform u32. */
  nextU32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** A uniform float in [0, 1). */
  next(): number {
    return this.nextU32() / 0x1_0000_0000;
  }

  /** A uniform integer in [lo, hi] (both inclusive; hi - lo < 2^32). */
  int(lo: number, hi: number): number {
    if (hi < lo) throw new RangeError(`int(${lo}, ${hi}): empty range`);
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }

  bool(pTrue = 0.5): boolean {
    return this.next() < pTrue;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('pick from an empty list');
    return items[this.int(0, items.length - 1)]!;
  }

  /** Fisher-Yates, in place; returns the array. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(0, i);
      const tmp = items[i]!;
      items[i] = items[j]!;
      items[j] = tmp;
    }
    return items;
  }

  fill(dest: Uint8Array): Uint8Array {
    for (let i = 0; i < dest.length; i++) dest[i] = this.nextU32() & 0xff;
    return dest;
  }

  /** An independent generator derived from this one (so adding draws in one place does not shift another). */
  fork(): SeededRandom {
    return new SeededRandom(this.nextU32());
  }
}
