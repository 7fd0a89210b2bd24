// A tiny description language for the fixed-layout structures of the virtio-rdma spec (virtio-rdma.md).
//
// Every structure is declared once, with explicit offsets, exactly as the spec's tables show it; the tests in
// test/spec/ parse those tables and compare them with these declarations, so spec and code cannot drift apart.
// Everything is little-endian. u64 fields are bigints (guest addresses and lengths use all 64 bits).
// Reserved fields are written as zero and not returned by decode: the device ignores their contents
// (spec section 1.3), so a later feature bit can give them a meaning.

export type FieldType = 'u8' | 'u16' | 'u32' | 'u64' | 'bytes' | 'reserved';

export interface FieldDef<N extends string = string, T extends FieldType = FieldType> {
  readonly name: N;
  readonly type: T;
  /** Byte offset from the start of the structure. */
  readonly offset: number;
  /** Size in bytes. */
  readonly size: number;
  /** For a `bytes` field that holds another structure: that structure's name (spec type column `struct X`). */
  readonly ref?: string;
  /**
   * A field that a later feature gave to bytes version 1 declared reserved (spec section 1.3): encoders written
   * before the feature may leave it out and it is written as zero, which is what the reserved bytes held.
   */
  readonly gated?: true;
}

type ValueOfType<T extends FieldType> = T extends 'u64' ? bigint : T extends 'bytes' ? Uint8Array : number;

/** The decoded value of a structure: one property per non-reserved field (feature-gated ones optional on encode). */
export type ValueOf<F extends readonly FieldDef[]> = {
  [E in F[number] as E['type'] extends 'reserved' ? never : E extends { readonly gated: true } ? never : E['name']]: ValueOfType<E['type']>;
} & {
  [E in F[number] as E extends { readonly gated: true } ? E['name'] : never]?: ValueOfType<E['type']>;
};

const NUMERIC_SIZE = { u8: 1, u16: 2, u32: 4, u64: 8 } as const;

export function u8<N extends string>(name: N, offset: number): FieldDef<N, 'u8'> {
  return { name, type: 'u8', offset, size: 1 };
}
export function u16<N extends string>(name: N, offset: number): FieldDef<N, 'u16'> {
  return { name, type: 'u16', offset, size: 2 };
}
export function u32<N extends string>(name: N, offset: number): FieldDef<N, 'u32'> {
  return { name, type: 'u32', offset, size: 4 };
}
export function u64<N extends string>(name: N, offset: number): FieldDef<N, 'u64'> {
  return { name, type: 'u64', offset, size: 8 };
}
/** A byte array (a GID, a MAC, inline data, or a nested structure when `ref` names it). */
export function bytes<N extends string>(name: N, offset: number, size: number, ref?: Layout<unknown>): FieldDef<N, 'bytes'> {
  return ref === undefined ? { name, type: 'bytes', offset, size } : { name, type: 'bytes', offset, size, ref: ref.name };
}
/** Reserved bytes: written as zero by encode, never decoded. */
/**
 * Marks a field as given by a later feature to formerly reserved bytes: an encoder that omits it writes zero there
 * (so version 1 code, which never names it, keeps producing the bytes it always did).
 */
export function gated<N extends string, T extends FieldType>(f: FieldDef<N, T>): FieldDef<N, T> & { readonly gated: true } {
  return { ...f, gated: true };
}

export function reserved(offset: number, size: number): FieldDef<'reserved', 'reserved'> {
  return { name: 'reserved', type: 'reserved', offset, size };
}

/** Natural alignment of a field: its size for numbers, 1 for byte arrays (nested structures: see Layout.alignment). */
export function fieldAlignment(field: FieldDef): number {
  return field.type === 'bytes' || field.type === 'reserved' ? 1 : field.size;
}

/** The value an omitted feature-gated field is written as: zero, the reserved bytes' old content. */
function zeroOf(f: FieldDef): unknown {
  return f.type === 'u64' ? 0n : f.type === 'bytes' ? new Uint8Array(f.size) : 0;
}

export class LayoutError extends RangeError {
  constructor(message: string) {
    super(message);
    this.name = 'LayoutError';
  }
}

function asBytes(target: Uint8Array | DataView | ArrayBuffer): Uint8Array {
  if (target instanceof Uint8Array) return target;
  if (target instanceof DataView) return new Uint8Array(target.buffer, target.byteOffset, target.byteLength);
  return new Uint8Array(target);
}

export class Layout<V> {
  readonly name: string;
  readonly size: number;
  readonly fields: readonly FieldDef[];
  /** Largest natural alignment of any field: the alignment this structure needs where it is embedded. */
  readonly alignment: number;
  private readonly byName: ReadonlyMap<string, FieldDef>;

  constructor(name: string, size: number, fields: readonly FieldDef[]) {
    this.name = name;
    this.size = size;
    this.fields = fields;
    let alignment = 1;
    const byName = new Map<string, FieldDef>();
    for (const f of fields) {
      alignment = Math.max(alignment, fieldAlignment(f));
      if (f.type !== 'reserved') {
        if (byName.has(f.name)) throw new LayoutError(`${name}: field ${f.name} declared twice`);
        byName.set(f.name, f);
      }
      if (f.type in NUMERIC_SIZE && f.size !== NUMERIC_SIZE[f.type as keyof typeof NUMERIC_SIZE]) {
        throw new LayoutError(`${name}.${f.name}: size ${f.size} does not match type ${f.type}`);
      }
      if (f.offset < 0 || f.size <= 0 || f.offset + f.size > size) {
        throw new LayoutError(`${name}.${f.name}: [${f.offset}, ${f.offset + f.size}) outside the ${size}-byte structure`);
      }
    }
    this.alignment = alignment;
    this.byName = byName;
  }

  /** The declaration of a field (reserved fields are not looked up by name). */
  field(name: string): FieldDef {
    const f = this.byName.get(name);
    if (f === undefined) throw new LayoutError(`${this.name} has no field ${name}`);
    return f;
  }

  /** Byte offset of a field. */
  offsetOf(name: string): number {
    return this.field(name).offset;
  }

  /**
   * Writes `value` at `offset` of `target` (a new buffer of exactly `size` bytes when absent) and returns the bytes
   * written. Reserved bytes are zeroed. Every number is checked: an integer that fits its field, else LayoutError.
   */
  encode(value: V, target?: Uint8Array | DataView | ArrayBuffer, offset = 0): Uint8Array {
    const out = target === undefined ? new Uint8Array(this.size) : asBytes(target);
    if (!Number.isInteger(offset) || offset < 0 || offset + this.size > out.byteLength) {
      throw new LayoutError(`${this.name}: ${this.size} bytes do not fit at offset ${offset} of ${out.byteLength}`);
    }
    const view = new DataView(out.buffer, out.byteOffset + offset, this.size);
    const record = value as Record<string, unknown>;
    for (const f of this.fields) {
      if (f.type === 'reserved') {
        new Uint8Array(out.buffer, out.byteOffset + offset + f.offset, f.size).fill(0);
        continue;
      }
      const v = f.gated === true && record[f.name] === undefined ? zeroOf(f) : record[f.name];
      const where = `${this.name}.${f.name}`;
      switch (f.type) {
        case 'u8':
        case 'u16':
        case 'u32': {
          const max = 2 ** (8 * f.size) - 1;
          if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
            throw new LayoutError(`${where}: ${String(v)} is not an integer in [0, ${max}]`);
          }
          if (f.type === 'u8') view.setUint8(f.offset, v);
          else if (f.type === 'u16') view.setUint16(f.offset, v, true);
          else view.setUint32(f.offset, v, true);
          break;
        }
        case 'u64':
          if (typeof v !== 'bigint' || v < 0n || v > 0xffff_ffff_ffff_ffffn) {
            throw new LayoutError(`${where}: ${String(v)} is not a bigint in [0, 2^64)`);
          }
          view.setBigUint64(f.offset, v, true);
          break;
        case 'bytes':
          if (!(v instanceof Uint8Array) || v.byteLength !== f.size) {
            throw new LayoutError(`${where}: expected a Uint8Array of exactly ${f.size} bytes`);
          }
          out.set(v, offset + f.offset);
          break;
      }
    }
    return out.subarray(offset, offset + this.size);
  }

  /** Reads the structure at `offset` of `source`; LayoutError when fewer than `size` bytes are there. */
  decode(source: Uint8Array | DataView | ArrayBuffer, offset = 0): V {
    const src = asBytes(source);
    if (!Number.isInteger(offset) || offset < 0 || offset + this.size > src.byteLength) {
      throw new LayoutError(`${this.name}: need ${this.size} bytes at offset ${offset}, have ${src.byteLength}`);
    }
    const view = new DataView(src.buffer, src.byteOffset + offset, this.size);
    const out: Record<string, unknown> = {};
    for (const f of this.fields) {
      switch (f.type) {
        case 'reserved':
          break;
        case 'u8':
          out[f.name] = view.getUint8(f.offset);
          break;
        case 'u16':
          out[f.name] = view.getUint16(f.offset, true);
          break;
        case 'u32':
          out[f.name] = view.getUint32(f.offset, true);
          break;
        case 'u64':
          out[f.name] = view.getBigUint64(f.offset, true);
          break;
        case 'bytes':
          // A copy: decoded values must not alias guest memory that the guest can change under the device.
          out[f.name] = src.slice(offset + f.offset, offset + f.offset + f.size);
          break;
      }
    }
    return out as V;
  }

  /** True when every reserved byte of the structure at `offset` is zero (for checkers and fixtures). */
  reservedAreZero(source: Uint8Array, offset = 0): boolean {
    if (offset < 0 || offset + this.size > source.byteLength) return false;
    return this.fields
      .filter((f) => f.type === 'reserved')
      .every((f) => source.subarray(offset + f.offset, offset + f.offset + f.size).every((b) => b === 0));
  }
}

export function layout<const F extends readonly FieldDef[]>(name: string, size: number, fields: F): Layout<ValueOf<F>> {
  return new Layout<ValueOf<F>>(name, size, fields);
}
