// The work-request and completion layouts of vmm-device/verbs/layout.ts against the native parser and writer
// (native/src/verbs/wr.cc): what TypeScript encodes is what libibverbs would be given, and what poll_cq writes is what
// TypeScript reads. Runs without an RDMA device.
import t from 'tap';
import { loadRawVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import {
  RecvWrList,
  SendWrList,
  WcBuffer,
  WrLayoutError,
  decodeRecvWrs,
  decodeSendWrs,
} from '../../vmm-device/verbs/layout.ts';
import { MAX_SGE_PER_WR, MAX_WRS_PER_POST, SendFlags, WcFlags, WrOpcode } from '../../vmm-device/verbs/constants.ts';

const raw = loadRawVerbs();

t.test('send WRs: every field reaches ibv_send_wr', async (t) => {
  const list = new SendWrList(1);
  list.push({
    wrId: 0x1234_5678_9abcn,
    opcode: WrOpcode.RDMA_WRITE_WITH_IMM,
    sendFlags: SendFlags.SIGNALED | SendFlags.SOLICITED,
    immData: 0xdeadbeef,
    remoteAddr: 0xffff_ffff_0000_1000n,
    rkey: 0x7777,
    sgList: [
      { addr: 0x1000, length: 16, lkey: 5 },
      { addr: 2 ** 52 + 8, length: 0xffff_ffff, lkey: 0xffff_ffff },
    ],
  });
  list.push({
    wrId: 7,
    opcode: WrOpcode.ATOMIC_CMP_AND_SWP,
    remoteAddr: 0x2000,
    rkey: 9,
    compareAdd: 0xffff_ffff_ffff_ffffn,
    swap: 42n,
    sgList: [{ addr: 0x3000, length: 8, lkey: 3 }],
  });
  list.push({ wrId: 8, opcode: WrOpcode.SEND });
  t.equal(list.count, 3);
  const native = raw.parseSendWrsForTest(list.bytes, list.count, false);
  t.same(native, [
    {
      wrId: 0x1234_5678_9abcn,
      opcode: WrOpcode.RDMA_WRITE_WITH_IMM,
      sendFlags: SendFlags.SIGNALED | SendFlags.SOLICITED,
      immData: 0xdeadbeef,
      remoteAddr: 0xffff_ffff_0000_1000n,
      rkey: 0x7777,
      sgList: [
        { addr: 0x1000n, length: 16, lkey: 5 },
        { addr: BigInt(2 ** 52 + 8), length: 0xffff_ffff, lkey: 0xffff_ffff },
      ],
    },
    {
      wrId: 7n,
      opcode: WrOpcode.ATOMIC_CMP_AND_SWP,
      sendFlags: 0,
      immData: 0,
      remoteAddr: 0x2000n,
      rkey: 9,
      compareAdd: 0xffff_ffff_ffff_ffffn,
      swap: 42n,
      sgList: [{ addr: 0x3000n, length: 8, lkey: 3 }],
    },
    { wrId: 8n, opcode: WrOpcode.SEND, sendFlags: 0, immData: 0, remoteAddr: 0n, rkey: 0, sgList: [] },
  ]);
  // The TypeScript decoder (used by the test double) reads the same.
  const ts = decodeSendWrs(list.bytes, list.count);
  t.equal(ts[0]!.immData, 0xdeadbeef);
  t.equal(ts[1]!.compareAdd, 0xffff_ffff_ffff_ffffn);
  t.equal(ts[1]!.sgList[0]!.lkey, 3);
});

t.test('send WRs on a UD QP carry the AH, remote QPN and Q_Key', async (t) => {
  const list = new SendWrList();
  list.push({ wrId: 1, opcode: WrOpcode.SEND_WITH_IMM, immData: 5, ah: { id: 77 }, remoteQpn: 0xabcdef, remoteQkey: 0x11111111, sgList: [{ addr: 1, length: 2, lkey: 3 }] });
  t.same(raw.parseSendWrsForTest(list.bytes, 1, true), [
    { wrId: 1n, opcode: WrOpcode.SEND_WITH_IMM, sendFlags: 0, immData: 5, ah: 77, remoteQpn: 0xabcdef, remoteQkey: 0x11111111, sgList: [{ addr: 1n, length: 2, lkey: 3 }] },
  ]);
});

t.test('recv WRs', async (t) => {
  const list = new RecvWrList(1);
  for (let i = 0; i < 5; i++) list.push({ wrId: i, sgList: Array.from({ length: i }, (_, j) => ({ addr: j * 100, length: j, lkey: i })) });
  const native = raw.parseRecvWrsForTest(list.bytes, list.count) as { wrId: bigint; sgList: unknown[] }[];
  t.equal(native.length, 5);
  t.same(native[3], { wrId: 3n, sgList: [ { addr: 0n, length: 0, lkey: 3 }, { addr: 100n, length: 1, lkey: 3 }, { addr: 200n, length: 2, lkey: 3 } ] });
  t.same(decodeRecvWrs(list.bytes, list.count), native);
});

t.test('the native parser refuses lists that do not fit their buffer or limits', async (t) => {
  const list = new SendWrList();
  list.push({ wrId: 1, opcode: WrOpcode.SEND, sgList: [{ addr: 1, length: 1, lkey: 1 }] });
  t.throws(() => raw.parseSendWrsForTest(list.bytes, 2, false), { errno: 'EINVAL', message: /work request 1 runs past the end/ });
  t.throws(() => raw.parseSendWrsForTest(list.bytes.subarray(0, 70), 1, false), { errno: 'EINVAL', message: /SGEs of work request 0/ });
  t.throws(() => raw.parseSendWrsForTest(list.bytes, 0, false), { code: 'EINVAL' });
  const bad = list.bytes.slice();
  new DataView(bad.buffer).setUint32(16, MAX_SGE_PER_WR + 1, true);
  t.throws(() => raw.parseSendWrsForTest(bad, 1, false), { errno: 'EINVAL', message: /33 SGEs/ });
  const recv = new RecvWrList().push({ wrId: 1 });
  t.throws(() => raw.parseRecvWrsForTest(recv.bytes.subarray(0, 15), 1), { code: 'EINVAL' });
});

t.test('the encoders refuse values that do not fit, leaving the list unchanged', async (t) => {
  const list = new SendWrList();
  list.push({ wrId: 1, opcode: WrOpcode.SEND });
  const before = list.bytes.slice();
  t.throws(() => list.push({ wrId: -1, opcode: WrOpcode.SEND }), WrLayoutError);
  t.throws(() => list.push({ wrId: 2 ** 53, opcode: WrOpcode.SEND }), WrLayoutError);
  t.throws(() => list.push({ wrId: 1n << 64n, opcode: WrOpcode.SEND }), WrLayoutError);
  t.throws(() => list.push({ wrId: 1, opcode: WrOpcode.SEND, rkey: 2 ** 32 }), WrLayoutError);
  t.throws(() => list.push({ wrId: 1, opcode: WrOpcode.SEND, sgList: [{ addr: 0, length: 1.5, lkey: 0 }] }), WrLayoutError);
  t.throws(
    () => list.push({ wrId: 1, opcode: WrOpcode.SEND, sgList: Array.from({ length: MAX_SGE_PER_WR + 1 }, () => ({ addr: 0, length: 0, lkey: 0 })) }),
    { message: /33 SGEs/ },
  );
  t.equal(list.count, 1);
  t.same(list.bytes, before);
  const big = new RecvWrList();
  for (let i = 0; i < MAX_WRS_PER_POST; i++) big.push({ wrId: i });
  t.throws(() => big.push({ wrId: 0 }), { message: `more than ${MAX_WRS_PER_POST} work requests in one list` });
  t.equal(raw.parseRecvWrsForTest(big.bytes, big.count).length, MAX_WRS_PER_POST);
});

t.test('completions written by native code read back field by field', async (t) => {
  const wcs = new WcBuffer(3);
  const wc = {
    wrId: 0xfedc_ba98_7654_3210n,
    status: 5,
    opcode: 129,
    vendorErr: 0x1234,
    byteLen: 65536,
    immData: 0xcafef00d,
    qpNum: 0xffffff,
    srcQp: 17,
    wcFlags: WcFlags.WITH_IMM | WcFlags.GRH,
    pkeyIndex: 0xffff,
    slid: 0xabcd,
    sl: 15,
    dlidPathBits: 127,
  };
  raw.writeWcForTest(wcs.bytes, 2, wc);
  raw.writeWcForTest(wcs.bytes, 0, { ...wc, wrId: 12, wcFlags: 0, immData: 0x01020304 });
  wcs.count = 3;
  t.same(wcs.get(2), wc);
  t.equal(wcs.wrIdBig(2), 0xfedc_ba98_7654_3210n);
  t.equal(wcs.immData(2), 0xcafef00d, 'immediate data in host order');
  t.equal(wcs.status(2), 5);
  t.equal(wcs.opcode(2), 129);
  t.equal(wcs.byteLen(2), 65536);
  t.equal(wcs.qpNum(2), 0xffffff);
  t.equal(wcs.srcQp(2), 17);
  t.equal(wcs.wrId(0), 12);
  t.equal(wcs.immData(0), 0x01020304);
  t.throws(() => raw.writeWcForTest(wcs.bytes, 3, wc), { code: 'EINVAL' });
  const copy = new WcBuffer(3);
  copy.write(2, wc);
  t.same(copy.bytes.subarray(96), wcs.bytes.subarray(96), 'the TypeScript writer produces the same bytes');
  t.throws(() => wcs.get(3), RangeError);
  t.throws(() => new WcBuffer(0), WrLayoutError);
});
