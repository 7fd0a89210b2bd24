// The mapped data path's bytes (spec section 13.4) against the uapi headers, not against the encoder: a C program
// (fixtures/rxe-layout.c) fills struct rxe_send_wqe / rxe_recv_wqe / ib_uverbs_wc by field name from the installed
// <rdma/rdma_user_rxe.h> and <rdma/ib_user_verbs.h>, the way rdma-core's rxe provider fills them, and prints the
// bytes; each case here must equal the driver's encoding byte for byte, and every offset the driver uses must equal
// the header's offsetof. Then the guest side of a mapped queue over a region: slots, indexes, the doorbell slot, and
// the driver's refusal of a mapping whose header disagrees with the response.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { DoorbellMode, HostQueueFormat, WcFlag, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { ProtocolError, UsageError, type SendWr, type SharedMemoryWindow } from '../../guest-driver-spec/driver/index.ts';
import {
  RxeHeader,
  RxeRecvWqe,
  RxeSendWqe,
  RXE_SGE_SIZE,
  UverbsWc,
  decodeUverbsWc,
  encodeRxeRecvWqe,
  encodeRxeSendWqe,
  toWorkCompletion,
} from '../../guest-driver-spec/driver/mapped/rxe-abi.ts';
import { RxeQueue } from '../../guest-driver-spec/driver/mapped/rxe-queue.ts';
import { MappedCq } from '../../guest-driver-spec/driver/mapped/mapped-cq.ts';
import { MappedQp } from '../../guest-driver-spec/driver/mapped/mapped-qp.ts';
import type { VirtioRdmaDriver } from '../../guest-driver-spec/driver/driver.ts';
import type { DriverTransport } from '../../guest-driver-spec/driver/transport.ts';

// ---- the header's side: compile and run the C program once --------------------------------------------------
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rxe-layout-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const exe = path.join(dir, 'rxe-layout');
execFileSync('cc', ['-Wall', '-Werror', '-o', exe, path.join(import.meta.dirname, 'fixtures', 'rxe-layout.c')]);
const header = new Map<string, Uint8Array>();
const offsets = new Map<string, number>();
for (const line of execFileSync(exe, { encoding: 'utf8' }).trim().split('\n')) {
  const [a, b, c] = line.split(' ');
  if (a === 'offset') offsets.set(b!, Number(c));
  else {
    header.set(a!, Buffer.from(c!, 'hex'));
    if (Buffer.from(c!, 'hex').byteLength !== Number(b)) throw new Error(`bad dump of ${a}`);
  }
}

const SLOT = { slotSize: 512, maxSge: 4, maxInline: 256 };
const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

t.test('every offset the driver uses is the uapi header\'s', async (t) => {
  t.equal(RxeSendWqe.SIZE, offsets.get('send_wqe_size'), 'sizeof(struct rxe_send_wqe)');
  t.equal(RxeSendWqe.DMA_DATA, offsets.get('send_dma_data'), 'offsetof(rxe_send_wqe, dma.sge)');
  t.equal(RxeRecvWqe.SIZE, offsets.get('recv_wqe_size'), 'sizeof(struct rxe_recv_wqe)');
  t.equal(RxeRecvWqe.DMA_SGE, offsets.get('recv_dma_sge'), 'offsetof(rxe_recv_wqe, dma.sge)');
  t.equal(RXE_SGE_SIZE, offsets.get('sge_size'), 'sizeof(struct rxe_sge)');
  t.equal(UverbsWc.SIZE, offsets.get('wc_size'), 'sizeof(struct ib_uverbs_wc)');
  t.equal(UverbsWc.QP_NUM, offsets.get('wc_qp_num'));
  t.equal(UverbsWc.IMM_DATA, offsets.get('wc_imm_data'));
  t.equal(UverbsWc.WC_FLAGS, offsets.get('wc_flags'));
  t.equal(RxeHeader.SIZE, offsets.get('queue_header'), 'offsetof(rxe_queue_buf, data)');
  t.equal(RxeHeader.PRODUCER_INDEX, offsets.get('producer_index'));
  t.equal(RxeHeader.CONSUMER_INDEX, offsets.get('consumer_index'));
  t.equal(RxeHeader.INDEX_MASK, offsets.get('index_mask'));
  t.equal(RxeHeader.LOG2_ELEM_SIZE, offsets.get('log2_elem_size'));
});

const cases: [string, SendWr, number][] = [
  [
    'send',
    { wrId: 0x1122334455667788n, opcode: 'SEND', signaled: true, sgList: [{ addr: 0x7f0000001000n, length: 100, lkey: 0x1234 }, { addr: 0x7f0000002000n, length: 28, lkey: 0x1234 }] },
    0,
  ],
  ['send_imm', { wrId: 2n, opcode: 'SEND_WITH_IMM', signaled: true, solicited: true, imm: 0xdeadbeef, sgList: [{ addr: 0x10000n, length: 2, lkey: 0x55 }] }, 1],
  ['write_inline', { wrId: 3n, opcode: 'RDMA_WRITE', signaled: true, inline: new TextEncoder().encode('hello'), remoteAddr: 0x7f0000200000n, rkey: 0xabcd }, 2],
  ['write_imm', { wrId: 4n, opcode: 'RDMA_WRITE_WITH_IMM', signaled: true, fence: true, imm: 7, remoteAddr: 0x9000n, rkey: 0x77, sgList: [{ addr: 0x8000n, length: 64, lkey: 0x66 }] }, 3],
  ['read', { wrId: 5n, opcode: 'RDMA_READ', remoteAddr: 0xa000n, rkey: 0x88, sgList: [{ addr: 0xb000n, length: 4096, lkey: 0x99 }] }, 4],
  [
    'cas',
    { wrId: 6n, opcode: 'ATOMIC_CMP_AND_SWP', signaled: true, remoteAddr: 0xc000n, rkey: 0xaa, compareAdd: 0x0102030405060708n, swap: 0x1112131415161718n, sgList: [{ addr: 0xd000n, length: 8, lkey: 0xbb }] },
    5,
  ],
  ['faa', { wrId: 7n, opcode: 'ATOMIC_FETCH_AND_ADD', signaled: true, remoteAddr: 0xc008n, rkey: 0xaa, compareAdd: 5n, sgList: [{ addr: 0xd008n, length: 8, lkey: 0xbb }] }, 6],
];

t.test('send WQEs: byte-exact against the provider\'s fill of the header\'s struct', async (t) => {
  for (const [name, wr, ssn] of cases) {
    const mine = encodeRxeSendWqe(wr, ssn, SLOT);
    t.equal(hex(mine), hex(header.get(name)!), `${name}: ${mine.byteLength} bytes`);
  }
});

t.test('receive WQE: byte-exact', async (t) => {
  const mine = encodeRxeRecvWqe({ wrId: 0xfeedn, sgList: [{ addr: 0x20000n, length: 1000, lkey: 0x42 }, { addr: 0x30000n, length: 24, lkey: 0x43 }] }, { slotSize: 128, maxSge: 4 });
  t.equal(hex(mine), hex(header.get('recv')!));
});

t.test('send WQEs the driver refuses before writing a byte', async (t) => {
  const sge = { addr: 0x1000n, length: 8, lkey: 1 };
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'SEND', sgList: [sge, sge, sge, sge] }, 0, { slotSize: 256, maxSge: 4, maxInline: 48 }), UsageError, 'four SGEs in a 256-byte slot (room for 3)');
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'SEND', sgList: [sge, sge] }, 0, { slotSize: 256, maxSge: 1, maxInline: 48 }), UsageError, 'two SGEs past the QP\'s max_send_sge');
  t.doesNotThrow(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'SEND', sgList: [sge, sge, sge] }, 0, { slotSize: 256, maxSge: 3, maxInline: 48 }), 'exactly three fit');
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'SEND', inline: new Uint8Array(49) }, 0, { slotSize: 256, maxSge: 3, maxInline: 64 }), UsageError, 'inline past the slot');
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'SEND', inline: new Uint8Array(33) }, 0, { slotSize: 512, maxSge: 3, maxInline: 32 }), UsageError, 'inline past max_inline_data');
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'RDMA_READ', inline: new Uint8Array(4) }, 0, SLOT), UsageError, 'READ inline');
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'ATOMIC_FETCH_AND_ADD', sgList: [{ ...sge, length: 4 }] }, 0, SLOT), UsageError, 'atomic of 4 bytes');
  t.throws(() => encodeRxeSendWqe({ wrId: 1n, opcode: 'SEND', remoteQpn: 5 }, 0, SLOT), UsageError, 'a destination in an RC WQE');
  t.throws(() => encodeRxeRecvWqe({ wrId: 1n, sgList: [sge, sge] }, { slotSize: 64, maxSge: 4 }), UsageError, 'two receive SGEs in a 64-byte slot');
});

t.test('completions: the header\'s ib_uverbs_wc decoded and mapped to the spec\'s numbering', async (t) => {
  const wc = decodeUverbsWc(header.get('wc_recv_imm')!);
  t.same(wc, { wrId: 0xabcdef0123n, status: 0, opcode: 129, vendorErr: 0, byteLen: 4096, immData: 0xcafe0001, qpNum: 0x11, srcQp: 0x22, wcFlags: 3 });
  const c = toWorkCompletion(wc, 9);
  t.match(c, { wrId: 0xabcdef0123n, qpHandle: 9, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, opcodeName: 'RECV_RDMA_WITH_IMM', byteLen: 4096, immData: 0xcafe0001 });
  t.equal(c.wcFlags, WcFlag.GRH | WcFlag.WITH_IMM, 'kernel GRH=1, WITH_IMM=2 become the spec\'s GRH=2, WITH_IMM=1');
  const e = toWorkCompletion(decodeUverbsWc(header.get('wc_prot_err')!), 9);
  t.match(e, { wrId: 9n, status: WcStatus.LOC_PROT_ERR, statusName: 'LOC_PROT_ERR', byteLen: 0, opcode: 0 }, 'an error completion reads as the relay writes one');
  const odd = toWorkCompletion({ ...wc, status: 6 }, 9);
  t.match(odd, { status: WcStatus.GENERAL_ERR, vendorErr: 6 }, 'MW_BIND_ERR, unknown to the spec: GENERAL_ERR with the host status kept');
});

// ---- the guest side of a mapped queue ------------------------------------------------------------------------

/** A region backed by an ArrayBuffer: stands where the transport's window would, so the test reads the bytes back. */
function memoryWindow(shmid: number, size: number): SharedMemoryWindow & { bytes: Uint8Array } {
  const bytes = new Uint8Array(new SharedArrayBuffer(size));
  const u32 = (o: bigint): Int32Array => new Int32Array(bytes.buffer, Number(o), 1);
  return {
    shmid,
    size: BigInt(size),
    bytes,
    read: async (o, n) => bytes.slice(Number(o), Number(o) + n),
    write: async (o, b) => void bytes.set(b, Number(o)),
    readU32: async (o) => Atomics.load(u32(o), 0) >>> 0,
    writeU32: async (o, v) => void Atomics.store(u32(o), 0, v | 0),
  };
}

function writeHeader(w: { bytes: Uint8Array }, at: number, log2: number, mask: number): void {
  const v = new DataView(w.bytes.buffer, at);
  v.setUint32(RxeHeader.LOG2_ELEM_SIZE, log2, true);
  v.setUint32(RxeHeader.INDEX_MASK, mask, true);
}

const mapping = (offset: bigint, numSlots: number, slotSize: number) => ({ offset, size: 0x10000n, num_slots: numSlots, slot_size: slotSize, shmid: 0, format: HostQueueFormat.RXE });

t.test('a queue whose header or mapping disagrees with the response is refused', async (t) => {
  const win = memoryWindow(0, 0x40000);
  const transport = { kind: 'test window', sharedMemory: async (id: number) => (id === 0 ? win : undefined) } as unknown as DriverTransport;
  writeHeader(win, 0, 8, 15);
  const q = await RxeQueue.open(transport, mapping(0n, 16, 256), 9, 240, 'SQ');
  t.equal(q.slotOffset(17), BigInt(384 + 256), 'slot n at offset + 384 + (n mod num_slots) * slot_size');
  await t.rejects(RxeQueue.open(transport, mapping(0n, 32, 256), 9, 240, 'SQ'), ProtocolError, 'index_mask 15 but 32 slots');
  await t.rejects(RxeQueue.open(transport, mapping(0n, 16, 512), 9, 240, 'SQ'), ProtocolError, 'log2 8 but 512-byte slots');
  await t.rejects(RxeQueue.open(transport, mapping(0n, 16, 256), 17, 240, 'SQ'), ProtocolError, 'fewer slots than depth + 1');
  await t.rejects(RxeQueue.open(transport, mapping(0x100n, 16, 256), 9, 240, 'SQ'), ProtocolError, 'offset not a page multiple');
  await t.rejects(RxeQueue.open(transport, { ...mapping(0n, 16, 256), format: 2 }, 9, 240, 'SQ'), ProtocolError, 'a hardware format');
  await t.rejects(RxeQueue.open(transport, mapping(0x40000n, 16, 256), 9, 240, 'SQ'), ProtocolError, 'outside the region');
  await t.rejects(RxeQueue.open(transport, { ...mapping(0n, 16, 256), shmid: 3 }, 9, 240, 'SQ'), ProtocolError, 'a region the transport lacks');
});

t.test('post send / post recv / poll over a region: slots, indexes, doorbell, wrap-around', async (t) => {
  const win = memoryWindow(0, 0x40000);
  const notified: number[] = [];
  const transport = { kind: 'test window', sharedMemory: async () => win, notify: async (q: number) => void notified.push(q) } as unknown as DriverTransport;
  const driver = { transport, command: async () => ({}) } as unknown as VirtioRdmaDriver;
  const SQ = 0n;
  const RQ = 0x10000n;
  const CQ = 0x20000n;
  writeHeader(win, 0, 8, 3);
  writeHeader(win, 0x10000, 6, 3);
  writeHeader(win, 0x20000, 7, 7);
  const sq = await RxeQueue.open(transport, mapping(SQ, 4, 256), 3, 224, 'SQ');
  const rq = await RxeQueue.open(transport, mapping(RQ, 4, 64), 3, 56, 'RQ');
  const cqq = await RxeQueue.open(transport, mapping(CQ, 8, 128), 5, 128, 'CQ');
  const cq = new MappedCq(driver, 1, 4, cqq, 0);
  const caps = { maxSendWr: 2, maxRecvWr: 2, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 32 };
  const qp = new MappedQp(driver, 2, 0x42, caps, { handle: 1 }, cq, cq, sq, rq, { window: win, offset: 0x30008n, mode: DoorbellMode.NOTIFY, notifyQueue: 3 }, { sq: 0, rq: 0 });
  cq.qpHandles.set(0x42, 2);
  const u32 = (at: number): number => new DataView(win.bytes.buffer).getUint32(at, true);

  const [, sendWr] = cases[1]!;
  await qp.postSend([{ ...sendWr, sgList: sendWr.sgList!.slice(0, 1) }]);
  t.equal(hex(win.bytes.slice(384, 384 + 224)), hex(encodeRxeSendWqe({ ...sendWr, sgList: sendWr.sgList!.slice(0, 1) }, 0, { slotSize: 256, maxSge: 1, maxInline: 32 })), 'slot 0 holds the WQE');
  t.equal(u32(RxeHeader.PRODUCER_INDEX), 1, 'SQ producer_index 1');
  t.equal(u32(0x30008), 1, 'doorbell slot holds the new producer index');
  t.same(notified, [3], 'NOTIFY mode: mapdoorbellq notified after the store');
  await qp.postSend([{ wrId: 8n, opcode: 'SEND', inline: new Uint8Array([1, 2]) }, { wrId: 9n, opcode: 'SEND', inline: new Uint8Array([3]) }]);
  t.equal(u32(RxeHeader.PRODUCER_INDEX), 3);
  await t.rejects(qp.postSend([{ wrId: 10n, opcode: 'SEND', inline: new Uint8Array([4]) }]), UsageError, 'the fourth WQE does not fit in 4 slots (one stays empty)');
  t.equal(u32(RxeHeader.PRODUCER_INDEX), 3, 'a refused list writes nothing');
  new DataView(win.bytes.buffer).setUint32(RxeHeader.CONSUMER_INDEX, 2, true); // the host consumed two
  await qp.postSend([{ wrId: 11n, opcode: 'SEND', inline: new Uint8Array([5]) }, { wrId: 12n, opcode: 'SEND', inline: new Uint8Array([6]) }]);
  t.equal(u32(RxeHeader.PRODUCER_INDEX), 1, 'the index wraps with index_mask');
  t.equal(new DataView(win.bytes.buffer).getBigUint64(384 + 0 * 256, true), 12n, 'WQE 12 in slot 0 after the wrap');

  await qp.postRecv([{ wrId: 0x77n, sgList: [{ addr: 0x5000n, length: 64, lkey: 3 }] }]);
  t.equal(u32(0x10000 + RxeHeader.PRODUCER_INDEX), 1, 'RQ producer_index 1');
  t.equal(hex(win.bytes.slice(0x10000 + 384, 0x10000 + 384 + 56)), hex(encodeRxeRecvWqe({ wrId: 0x77n, sgList: [{ addr: 0x5000n, length: 64, lkey: 3 }] }, { slotSize: 64, maxSge: 1 })));
  t.equal(notified.length, 3, 'the RQ rings no doorbell');

  t.same(await cq.poll(), [], 'empty CQ');
  const wcBytes = header.get('wc_recv_imm')!;
  for (let i = 0; i < 3; i++) win.bytes.set(wcBytes, 0x20000 + 384 + i * 128);
  new DataView(win.bytes.buffer).setUint32(0x20000 + 128, 3, true);
  cq.qpHandles.set(0x11, 5);
  const wcs = await cq.poll(2);
  t.equal(wcs.length, 2, 'poll takes at most max');
  t.match(wcs[0], { qpHandle: 5, opcode: WcOpcode.RECV_RDMA_WITH_IMM, immData: 0xcafe0001 });
  t.equal(u32(0x20000 + RxeHeader.CONSUMER_INDEX), 2, 'consumer_index stored after the read');
  t.equal((await cq.poll()).length, 1);
  new DataView(win.bytes.buffer).setUint32(0x20000 + 128, 0xffff_fff3, true); // a corrupt index: masked to 3
  t.same(await cq.poll(), [], 'a producer index is masked before use, so garbage high bits read as slot 3: nothing new');

  qp.destroyed = true;
  await t.rejects(qp.postSend([{ wrId: 1n, opcode: 'SEND' }]), UsageError, 'no access after destroy');
});
