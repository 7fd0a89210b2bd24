// The AliasMapper of vmm-device/memory/alias.ts over the addon: sys.mapAlias maps pieces of shared mappings back to
// back into a new range (the same pages, no copy), sys.munmap detaches and releases it. Wired by whoever opens an
// RdmaDevice over NativeVerbs (the CLI, the rxe tests, the demo and the benchmarks).

import type { AliasMapper, AliasPiece } from '../memory/alias.ts';
import { mapAlias, munmap } from '../native/sys.ts';

export const nativeAliasMapper: AliasMapper = {
  map(pieces: readonly AliasPiece[]): ArrayBuffer {
    return mapAlias(pieces);
  },
  unmap(alias: ArrayBuffer): void {
    munmap(alias);
  },
};
