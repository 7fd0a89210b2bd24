// Straight-line encoders and decoders for the layouts of struct.ts, made once per layout when it is declared.
//
// The generic codec walks the field list for every call and reads and writes each property by a name held in a
// variable; V8 cannot specialise that (one shared, megamorphic access site for every name of every structure), and
// control commands go through it several times each on both sides: ~7% of the CPU time of a connection set-up
// through the device (bench/setup/fake.ts under --cpu-prof), and worse where JavaScript runs slowly (the soft-RoCE
// test host). The compiled functions do exactly what the generic ones do, field by field in declaration order,
// with the same checks and the same LayoutError messages (test/spec/struct-compile.test.ts compares them on every
// layout), but each property access names its field literally.
//
// The source is built only from the layout's own declarations: offsets and sizes are checked integers, and a field
// name is used only when it is a plain lower-case identifier (every name in the spec's tables is); a layout with
// any other name keeps the generic codec (compileLayout returns undefined).

import type { FieldDef } from './struct.ts';

export interface CompiledCodec {
  encode(value: unknown, target: Uint8Array | DataView | ArrayBuffer | undefined, offset: number): Uint8Array;
  decode(source: Uint8Array | DataView | ArrayBuffer, offset: number): unknown;
}

/** What the compiled functions call: the same helpers and error class the generic codec uses. */
export interface CodecRuntime {
  asBytes(target: Uint8Array | DataView | ArrayBuffer): Uint8Array;
  LayoutError: new (message: string) => Error;
}

const PLAIN_NAME = /^[a-z][a-z0-9_]*$/;

export function compileLayout(name: string, size: number, fields: readonly FieldDef[], rt: CodecRuntime): CompiledCodec | undefined {
  const int = (n: number): string => {
    if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${name}: ${n} is not an offset or size`);
    return String(n);
  };
  for (const f of fields) if (f.type !== 'reserved' && !PLAIN_NAME.test(f.name)) return undefined;
  const S = int(size);
  const enc: string[] = [];
  const dec: string[] = [];
  // `where` strings and the numeric bounds are constants of the generated code, passed in as an array.
  const consts: unknown[] = [];
  const k = (v: unknown): string => {
    consts.push(v);
    return `K[${consts.length - 1}]`;
  };
  for (const f of fields) {
    const off = int(f.offset);
    const sz = int(f.size);
    if (f.type === 'reserved') {
      enc.push(`out.fill(0, offset + ${off}, offset + ${off} + ${sz});`);
      continue;
    }
    const prop = `value.${f.name}`;
    const where = k(`${name}.${f.name}`);
    enc.push(f.gated === true ? `v = ${prop}; if (v === undefined) v = ${f.type === 'u64' ? '0n' : f.type === 'bytes' ? `new Uint8Array(${sz})` : '0'};` : `v = ${prop};`);
    switch (f.type) {
      case 'u8':
      case 'u16':
      case 'u32': {
        const max = 2 ** (8 * f.size) - 1;
        enc.push(`if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > ${max}) throw new LE(${where} + ': ' + String(v) + ' is not an integer in [0, ${max}]');`);
        enc.push(f.type === 'u8' ? `view.setUint8(${off}, v);` : f.type === 'u16' ? `view.setUint16(${off}, v, true);` : `view.setUint32(${off}, v, true);`);
        dec.push(`${f.name}: view.${f.type === 'u8' ? 'getUint8' : f.type === 'u16' ? 'getUint16' : 'getUint32'}(${off}${f.type === 'u8' ? '' : ', true'})`);
        break;
      }
      case 'u64':
        enc.push(`if (typeof v !== 'bigint' || v < 0n || v > 0xffffffffffffffffn) throw new LE(${where} + ': ' + String(v) + ' is not a bigint in [0, 2^64)');`);
        enc.push(`view.setBigUint64(${off}, v, true);`);
        dec.push(`${f.name}: view.getBigUint64(${off}, true)`);
        break;
      case 'bytes':
        enc.push(`if (!(v instanceof Uint8Array) || v.byteLength !== ${sz}) throw new LE(${where} + ': expected a Uint8Array of exactly ${sz} bytes');`);
        enc.push(`out.set(v, offset + ${off});`);
        // A copy: decoded values must not alias guest memory that the guest can change under the device.
        dec.push(`${f.name}: src.slice(offset + ${off}, offset + ${int(f.offset + f.size)})`);
        break;
    }
  }
  const nameConst = k(name);
  const encodeSource = `
    return function encode(value, target, offset) {
      const out = target === undefined ? new Uint8Array(${S}) : rt.asBytes(target);
      if (!Number.isInteger(offset) || offset < 0 || offset + ${S} > out.byteLength) {
        throw new LE(${nameConst} + ': ${S} bytes do not fit at offset ' + offset + ' of ' + out.byteLength);
      }
      const view = new DataView(out.buffer, out.byteOffset + offset, ${S});
      let v;
      ${enc.join('\n      ')}
      return out.subarray(offset, offset + ${S});
    };`;
  const decodeSource = `
    return function decode(source, offset) {
      const src = rt.asBytes(source);
      if (!Number.isInteger(offset) || offset < 0 || offset + ${S} > src.byteLength) {
        throw new LE(${nameConst} + ': need ${S} bytes at offset ' + offset + ', have ' + src.byteLength);
      }
      const view = new DataView(src.buffer, src.byteOffset + offset, ${S});
      return { ${dec.join(', ')} };
    };`;
  const make = (source: string) => new Function('rt', 'LE', 'K', source)(rt, rt.LayoutError, consts) as (...a: never[]) => unknown;
  return { encode: make(encodeSource) as CompiledCodec['encode'], decode: make(decodeSource) as CompiledCodec['decode'] };
}
