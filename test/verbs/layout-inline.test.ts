// Inline send work requests in the layout of vmm-device/verbs/layout.ts against the native parser
// (native/src/verbs/wr.cc): the bytes TypeScript puts in the list are the bytes the host SGE points at (what
// ibv_post_send copies with IBV_SEND_INLINE), mixed with SGE work requests in one list; malformed inline records are
// refused by both sides alike. Runs without an RDMA device.
import t from 'tap';
import { loadRawVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { SendWrList, WrLayoutError, decodeSendWrs } from '../../vmm-device/verbs/layout.ts';
import { MAX_INLINE_PER_WR, SEND_WR_HEADER_BYTES, SGE_BYTES, SendFlags, WrOpcode } from '../../vmm-device/verbs/constants.ts';

const raw = loadRawVerbs();

function bytes(n: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);
}

interface NativeWr {
  wrId: bigint;
  opcode: number;
  sendFlags: number;
  sgList: unknown[];
  inline?: Uint8Array;
  remoteAddr?: bigint;
  rkey?: number;
  immData?: number;
}

t.test('inline WRs between SGE WRs: native sees the same bytes, flags and fields as the TypeScript decoder', async (t) => {
  const list = new SendWrList(1);
  const a = bytes(64, 1);
  const b = bytes(3, 2);
  list.push({ wrId: 1, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED, inline: a });
  list.push({ wrId: 2, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlags.SIGNALED, sgList: [{ addr: 0x1000, length: 16, lkey: 5 }], remoteAddr: 0x9000, rkey: 7 });
  list.push({ wrId: 3, opcode: WrOpcode.RDMA_WRITE_WITH_IMM, inline: b, immData: 0xabcd, remoteAddr: 0x8000, rkey: 9 });
  list.push({ wrId: 4, opcode: WrOpcode.SEND_WITH_IMM, inline: new Uint8Array(0), immData: 1 });
  list.push({ wrId: 5, opcode: WrOpcode.SEND, inline: bytes(MAX_INLINE_PER_WR, 3) });
  const native = raw.parseSendWrsForTest(list.bytes, list.count, false) as NativeWr[];
  const ts = decodeSendWrs(list.bytes, list.count);
  t.equal(native.length, 5);
  for (let i = 0; i < 5; i++) {
    const n = native[i]!;
    const d = ts[i]!;
    t.equal(n.wrId, d.wrId, `wr ${i}: wr_id`);
    t.equal(n.opcode, d.opcode, `wr ${i}: opcode`);
    t.equal(n.sendFlags, d.sendFlags, `wr ${i}: send_flags`);
    t.equal((n.sendFlags & SendFlags.INLINE) !== 0, d.inline !== undefined, `wr ${i}: INLINE set exactly on inline WRs`);
    if (d.inline !== undefined) {
      t.same(Buffer.from(n.inline!), Buffer.from(d.inline), `wr ${i}: the host SGE points at the inline bytes`);
      t.same(n.sgList, [], `wr ${i}: no SGE reported`);
    } else {
      t.equal(n.inline, undefined);
      t.equal(n.sgList.length, 1);
    }
  }
  t.same(Buffer.from(ts[0]!.inline!), Buffer.from(a), '64 bytes');
  t.same(Buffer.from(ts[2]!.inline!), Buffer.from(b), '3 bytes');
  t.equal(ts[3]!.inline!.length, 0, 'an empty inline payload');
  t.same([native[2]!.remoteAddr, native[2]!.rkey, native[2]!.immData], [0x8000n, 9, 0xabcd], 'WRITE_WITH_IMM fields');
  t.equal(native[1]!.remoteAddr, 0x9000n);
});

t.test('the encoder refuses inline data with SGEs, INLINE without data, and too many bytes; the list is unchanged', async (t) => {
  const list = new SendWrList(1);
  list.push({ wrId: 1, opcode: WrOpcode.SEND, inline: bytes(8, 1) });
  const before = list.bytes.slice();
  t.throws(() => list.push({ wrId: 2, opcode: WrOpcode.SEND, inline: bytes(8, 1), sgList: [{ addr: 1, length: 1, lkey: 1 }] }), WrLayoutError);
  t.throws(() => list.push({ wrId: 3, opcode: WrOpcode.SEND, sendFlags: SendFlags.INLINE, sgList: [{ addr: 1, length: 1, lkey: 1 }] }), WrLayoutError);
  t.throws(() => list.push({ wrId: 4, opcode: WrOpcode.SEND, inline: bytes(MAX_INLINE_PER_WR + 1, 1) }), WrLayoutError);
  t.equal(list.count, 1);
  t.same(Buffer.from(list.bytes), Buffer.from(before));
});

t.test('malformed inline records: native and the TypeScript decoder both refuse them', async (t) => {
  const make = (edit: (v: DataView) => void, cut = 0): Uint8Array => {
    const list = new SendWrList(1);
    list.push({ wrId: 1, opcode: WrOpcode.SEND, inline: bytes(16, 1) });
    const b = list.bytes.slice(0, list.bytes.length - cut);
    edit(new DataView(b.buffer));
    return b;
  };
  const rec = SEND_WR_HEADER_BYTES;
  const cases: [string, Uint8Array, RegExp][] = [
    ['num_sge 2', make((v) => v.setUint32(16, 2, true)), /num_sge 2, not 1/],
    ['an address', make((v) => v.setBigUint64(rec, 0x1000n, true)), /names memory/],
    ['an lkey', make((v) => v.setUint32(rec + 12, 5, true)), /names memory/],
    ['too many bytes', make((v) => v.setUint32(rec + 8, MAX_INLINE_PER_WR + 1, true)), /more than/],
    ['bytes past the end', make(() => undefined, 1), /past the end/],
    ['no record', make(() => undefined, SGE_BYTES + 16), /past the end/],
  ];
  for (const [what, b, message] of cases) {
    t.throws(() => raw.parseSendWrsForTest(b, 1, false), { errno: 'EINVAL', message }, `native: ${what}`);
    t.throws(() => decodeSendWrs(b, 1), WrLayoutError, `TypeScript: ${what}`);
  }
});
