// Aliasing: one contiguous range of this process's address space made of pieces of other mappings (the same
// pages, no copy). The device model needs it for an MR whose guest pages are scattered over the backend's mapping
// of guest RAM: the host registers one contiguous range, so the pieces are mapped back to back first.
// This is the interface only; vmm-device/host/alias.ts implements it over the addon and the verbs test double
// has its own (vmm-device/verbs/fake-verbs.ts), so the device model imports nothing from the addon.

/** `length` bytes at `offset` of `buffer` (a mapping of guest RAM). */
export interface AliasPiece {
  buffer: ArrayBuffer;
  offset: number;
  length: number;
}

export interface AliasMapper {
  /**
   * Maps `pieces` back to back into one new range and returns it. Offsets and lengths must be multiples of the
   * host page size. Throws when it cannot (guest RAM that is not a shared mapping, too many pieces, no address
   * space): the caller refuses the registration as the host's.
   */
  map(pieces: readonly AliasPiece[]): ArrayBuffer;
  /** Releases a range `map` returned (the pieces' own mappings stay). */
  unmap(alias: ArrayBuffer): void;
}
