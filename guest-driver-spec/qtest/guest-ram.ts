// Guest RAM as the qtest driver uses it: a bump allocator of guest physical addresses inside the RAM QEMU was
// started with. Nothing runs in the guest (no firmware, no CPU), so any RAM address is the driver's to use;
// the first MiB is left alone anyway, as a real guest would.

/** Where allocation starts: above the legacy first MiB (BIOS data, VGA hole). */
export const GUEST_RAM_ALLOC_START = 0x10_0000;

export class GuestRam {
  private next: number;

  /** `size`: bytes of guest RAM (the memory backend's size); allocation stays below it (and at or above `start`). */
  constructor(
    readonly size: number,
    start = GUEST_RAM_ALLOC_START,
  ) {
    if (!Number.isSafeInteger(size) || size <= start) throw new RangeError(`guest RAM of ${size} bytes is too small`);
    this.next = start;
  }

  /**
   * An allocator over [gpa, gpa + size) only: a hot-added DIMM's range, say, so that a test can place rings and
   * buffers in exactly that memory.
   */
  static range(gpa: number, size: number): GuestRam {
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(size) || size < 1) throw new RangeError(`range at ${gpa} of ${size} bytes`);
    return new GuestRam(gpa + size, gpa);
  }

  /** Bytes still free. */
  get free(): number {
    return this.size - this.next;
  }

  /** Reserves `length` bytes aligned to `align` (a power of two) and returns their guest physical address. */
  alloc(length: number, align = 16): number {
    if (!Number.isSafeInteger(length) || length < 1) throw new RangeError(`allocation of ${length} bytes`);
    if (align < 1 || (align & (align - 1)) !== 0) throw new RangeError(`alignment ${align} is not a power of two`);
    const address = Math.ceil(this.next / align) * align;
    if (address + length > this.size) {
      throw new RangeError(`guest RAM exhausted: ${length} bytes wanted, ${this.size - address} left`);
    }
    this.next = address + length;
    return address;
  }
}
