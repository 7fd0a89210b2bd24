// The driver's guest-physical allocator: alignment, exhaustion with a precise error, and coalescing on release
// (a long test creates and destroys thousands of rings and must not fragment guest RAM away).
import t from 'tap';
import { DriverMemoryError, GpaAllocator } from '../../guest-driver-spec/driver/index.ts';

t.test('allocations are aligned, inside the ranges, and never overlap', async (t) => {
  const a = new GpaAllocator([
    { gpa: 0x1000, size: 0x10000 },
    { gpa: 0x100000, size: 0x4000 },
  ]);
  const got: [number, number][] = [];
  for (const [len, align] of [
    [1, 8],
    [4096, 4096],
    [100, 64],
    [0x8000, 4096],
    [24, 8],
  ] as const) {
    const at = a.alloc(len, align);
    t.equal(at % align, 0, `${len} bytes aligned to ${align}`);
    got.push([at, at + len]);
  }
  got.sort((x, y) => x[0] - y[0]);
  for (let i = 1; i < got.length; i++) t.ok(got[i - 1]![1] <= got[i]![0], 'no overlap');
  t.ok(got.every(([s, e]) => (s >= 0x1000 && e <= 0x11000) || (s >= 0x100000 && e <= 0x104000)), 'inside the ranges');
});

t.test('exhaustion is a precise error; release coalesces so the whole range is usable again', async (t) => {
  const a = new GpaAllocator([{ gpa: 0, size: 0x4000 }]);
  const pages = [a.alloc(0x1000, 0x1000), a.alloc(0x1000, 0x1000), a.alloc(0x1000, 0x1000), a.alloc(0x1000, 0x1000)];
  t.throws(() => a.alloc(8), DriverMemoryError);
  t.throws(() => a.alloc(0), /allocation of 0 bytes/);
  t.throws(() => a.alloc(8, 12), /not a power of two/);
  // Release in an order that needs merging on both sides.
  for (const i of [1, 3, 2, 0]) a.release(pages[i]!);
  t.equal(a.available, 0x4000);
  t.equal(a.liveCount, 0);
  t.equal(a.alloc(0x4000, 0x1000), 0, 'one block of everything again');
  t.throws(() => a.release(0x2000), /not an allocation/);
});
