import t from 'tap';
import { GuestMemory, GuestMemoryError, u64Address, MAX_MEMORY_REGIONS } from '../../vmm-device/memory/guest-memory.ts';

/** The kind of the GuestMemoryError `fn` throws, or 'no error'. */
function errorKind(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    return e instanceof GuestMemoryError ? e.kind : `not a GuestMemoryError: ${String(e)}`;
  }
  return 'no error';
}

function twoRegions(): GuestMemory {
  // [0x1000, 0x2000) and [0x2000, 0x3000) adjacent, plus [0x10000, 0x11000) after a hole.
  return new GuestMemory([
    { guestPhysAddr: 0x1000, size: 0x1000, buffer: new ArrayBuffer(0x1000), userAddr: 0x7f0000001000 },
    { guestPhysAddr: 0x2000, size: 0x1000, buffer: new ArrayBuffer(0x2000), bufferOffset: 0x1000, userAddr: 0x7f0000100000 },
    { guestPhysAddr: 0x10000, size: 0x1000, buffer: new ArrayBuffer(0x1000) },
  ]);
}

t.test('translate clamps the length to the end of the region', async (t) => {
  const m = twoRegions();
  const s = m.translate(0x1ff0, 0x100)!;
  t.equal(s.offset, 0xff0);
  t.equal(s.length, 0x10);
  t.equal(m.translate(0x3000, 1), undefined, 'a hole is not memory');
});

t.test('a buffer crossing regions is read and written piecewise', async (t) => {
  const m = twoRegions();
  const src = Uint8Array.from({ length: 32 }, (_, i) => i + 1);
  m.write(0x1ff0, src);
  const back = new Uint8Array(32);
  m.read(0x1ff0, back);
  t.same(back, src);
  t.equal(m.regionList[0]!.bytes[0xfff], 16, 'first half in region 0');
  t.equal(m.regionList[1]!.bytes[0], 17, 'second half in region 1 (at its buffer offset)');
  t.equal(m.contiguous(0x1ff0, 32), undefined, 'not contiguous across regions');
});

t.test('out-of-bounds access throws a named error and writes nothing', async (t) => {
  const m = twoRegions();
  const before = Uint8Array.from(m.regionList[1]!.bytes);
  t.equal(errorKind(() => m.write(0x2ff0, new Uint8Array(0x20))), 'OutOfBounds');
  t.same(m.regionList[1]!.bytes, before, 'partial write did not happen');
  t.equal(errorKind(() => m.read(0x3000, new Uint8Array(1))), 'OutOfBounds');
  t.equal(m.isValidRange(0x1000, 0x2000), true);
  t.equal(m.isValidRange(0x1000, 0x2001), false);
});

t.test('addr + len past 2^64 is detected', async (t) => {
  t.equal(u64Address(0xffffffff, 0xfffffff0, 0x10), 0xffffffff * 2 ** 32 + 0xfffffff0, 'ends exactly at 2^64');
  t.equal(u64Address(0xffffffff, 0xfffffff0, 0x11), -1);
  t.equal(u64Address(0, 0x1000, 0xffffffff), 0x1000);
});

t.test('frontend virtual addresses translate through userAddr', async (t) => {
  const m = twoRegions();
  t.equal(m.userToGuestPhys(0x7f0000100010), 0x2010);
  const v = m.contiguousUser(0x7f0000001000, 16)!;
  t.equal(v.byteOffset, 0);
  t.equal(m.contiguousUser(0x7f0000001ff8, 16), undefined, 'ring crossing the region end');
});

t.test('bad region maps are refused', async (t) => {
  const buf = new ArrayBuffer(0x2000);
  t.equal(errorKind(() => new GuestMemory([{ guestPhysAddr: 0, size: 0x1000, buffer: buf }, { guestPhysAddr: 0x800, size: 0x1000, buffer: buf }])), 'OverlappingRegions');
  t.equal(errorKind(() => new GuestMemory([{ guestPhysAddr: 4, size: 0x10, buffer: buf }])), 'InvalidRegion');
  t.equal(errorKind(() => new GuestMemory([{ guestPhysAddr: 0, size: 0x3000, buffer: buf }])), 'InvalidRegion');
  t.equal(errorKind(() => new GuestMemory([{ guestPhysAddr: 2 ** 53 - 8, size: 0x10, buffer: buf }])), 'InvalidRegion');
  t.equal(errorKind(() => new GuestMemory([{ guestPhysAddr: 0, size: 0, buffer: buf }])), 'InvalidRegion');
  const many = Array.from({ length: MAX_MEMORY_REGIONS + 1 }, (_, i) => ({ guestPhysAddr: i * 16, size: 16, buffer: buf }));
  t.equal(errorKind(() => new GuestMemory(many)), 'TooManyRegions');
});
