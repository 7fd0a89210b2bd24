// A small deterministic PRNG for the tests' random operations (xorshift32): the same sequence every run, so a
// failure reproduces.

/** Returns a function giving the next number of the sequence below n (n >= 1). */
export function prng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}
