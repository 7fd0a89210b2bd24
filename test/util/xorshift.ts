// A small deterministic PRNG for the tests' random operations (xorshift32): the same sequence every run, so a
// failure reproduces.

/** Returns a function giving the next 32-bit number of the sequence (0 < x < 2^32). */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Returns a function giving the next number of the sequence below n (n >= 1). */
export function prng(seed: number): (n: number) => number {
  const next = xorshift32(seed);
  return (n) => next() % n;
}
