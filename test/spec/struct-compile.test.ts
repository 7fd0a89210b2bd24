// The compiled codec (vmm-device/abi/rdma/struct-compile.ts) against the generic walk it replaces, on every layout
// of the spec: the same bytes for the same value (at offset 0 and inside a larger buffer, reserved bytes zeroed,
// the bytes around untouched), the same decoded value with the same keys in the same order, and the same
// LayoutError, message included, for every kind of bad value, bad buffer and bad offset.

import t from 'tap';
import * as L from '../../vmm-device/abi/rdma/index.ts';
import type { Layout } from '../../vmm-device/abi/rdma/index.ts';
import { prng } from '../util/xorshift.ts';

const layouts = [...L.ALL_LAYOUTS.values()] as Layout<Record<string, unknown>>[];
const next = prng(0xc0de);
const u32 = (): number => next(2 ** 32);

function randomValue(layout: Layout<unknown>): Record<string, unknown> {
  const v: Record<string, unknown> = {};
  for (const f of layout.fields) {
    if (f.type === 'u8' || f.type === 'u16' || f.type === 'u32') v[f.name] = u32() % 2 ** (8 * f.size);
    else if (f.type === 'u64') v[f.name] = (BigInt(u32()) << 32n) | BigInt(u32());
    else if (f.type === 'bytes') v[f.name] = Uint8Array.from({ length: f.size }, () => next(256));
  }
  return v;
}

/** The outcome of a call: its result, or the error's class and message. */
function outcome(f: () => unknown): { ok: unknown } | { error: string } {
  try {
    return { ok: f() };
  } catch (e) {
    return { error: `${(e as Error).name}: ${(e as Error).message}` };
  }
}

t.test('every layout is compiled', async (t) => {
  for (const layout of layouts) t.ok(layout.isCompiled, `${layout.name}: compiled`);
});

t.test('valid values: the same bytes, the same decoded values with keys in the same order', async (t) => {
  for (const layout of layouts) {
    for (let i = 0; i < 8; i++) {
      const value = randomValue(layout);
      const a = layout.encode(value);
      const b = layout.encodeGeneric(value);
      t.same(a, b, `${layout.name}: encode = encodeGeneric`);
      const bigA = new Uint8Array(layout.size + 24).fill(0xa5);
      const bigB = new Uint8Array(layout.size + 24).fill(0xa5);
      layout.encode(value, bigA, 8);
      layout.encodeGeneric(value, bigB, 8);
      t.same(bigA, bigB, `${layout.name}: at offset 8 of a larger buffer, the same bytes written and left`);
      // Garbage everywhere, reserved bytes included: decode ignores them in both versions.
      const garbage = Uint8Array.from({ length: layout.size + 16 }, () => next(256));
      const dA = layout.decode(garbage, 16);
      const dB = layout.decodeGeneric(garbage, 16);
      t.same(dA, dB, `${layout.name}: decode = decodeGeneric`);
      t.same(Object.keys(dA), Object.keys(dB), `${layout.name}: the same keys in the same order`);
      const bytes = Object.values(dA).filter((x) => x instanceof Uint8Array) as Uint8Array[];
      for (const x of bytes) t.not(x.buffer, garbage.buffer, `${layout.name}: byte fields are copies, not views of the source`);
      const view = new DataView(garbage.buffer, 4, layout.size + 4);
      t.same(layout.decode(view, 4), layout.decodeGeneric(view, 4), `${layout.name}: from a DataView`);
      t.same(layout.decode(garbage.buffer.slice(0, layout.size)), layout.decodeGeneric(garbage.buffer.slice(0, layout.size)), `${layout.name}: from an ArrayBuffer`);
    }
  }
});

t.test('bad values, buffers and offsets: the same LayoutError', async (t) => {
  for (const layout of layouts) {
    const named = layout.fields.filter((f) => f.type !== 'reserved');
    for (const f of named) {
      const bads: unknown[] = f.type === 'bytes' ? [undefined, new Uint8Array(f.size + 1), [1, 2], 'x'] : f.type === 'u64' ? [undefined, -1n, 2n ** 64n, 1, '1'] : [undefined, -1, 2 ** (8 * f.size), 1.5, NaN, 1n, '1'];
      for (const bad of bads) {
        const value = { ...randomValue(layout), [f.name]: bad };
        if (bad === undefined && f.gated === true) {
          t.same(layout.encode(value), layout.encodeGeneric(value), `${layout.name}.${f.name}: a gated field left out is zero in both`);
          continue;
        }
        const a = outcome(() => layout.encode(value));
        const b = outcome(() => layout.encodeGeneric(value));
        t.ok('error' in a, `${layout.name}.${f.name} = ${String(bad)}: refused`);
        t.same(a, b, `${layout.name}.${f.name} = ${String(bad)}: the same error`);
      }
    }
    const value = randomValue(layout);
    for (const [buf, off] of [[new Uint8Array(layout.size - 1), 0], [new Uint8Array(layout.size), 1], [new Uint8Array(layout.size + 8), -1], [new Uint8Array(layout.size + 8), 0.5]] as const) {
      t.same(outcome(() => layout.encode(value, buf, off)), outcome(() => layout.encodeGeneric(value, buf, off)), `${layout.name}: encode into ${buf.length} bytes at ${off}`);
      t.same(outcome(() => layout.decode(buf, off)), outcome(() => layout.decodeGeneric(buf, off)), `${layout.name}: decode of ${buf.length} bytes at ${off}`);
    }
  }
});
