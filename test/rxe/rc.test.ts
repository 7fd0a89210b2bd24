// RC operations between two QPs on rxe0, through the HostVerbs interface, data checked byte for byte.
import t from 'tap';
import {
  ALL_ACCESS,
  RXE_GID_INDEX,
  pattern,
  requireTestHost,
  withRxe,
} from './fixture/harness.ts';
import { RecvWrList, SendWrList } from '../../vmm-device/verbs/layout.ts';
import {
  GidType,
  Mtu,
  PortState,
  QpState,
  QpType,
  SendFlags,
  WcFlags,
  WcOpcode,
  WcStatus,
  WrOpcode,
} from '../../vmm-device/verbs/constants.ts';

requireTestHost();

const KiB = 1024;

t.test('rxe0: device, port and GID table', async (t) => {
  await withRxe(t, async (f) => {
    const devices = f.verbs.listDevices();
    t.ok(devices.some((d) => d.name === 'rxe0'), 'rxe0 is listed');
    const dev = await f.verbs.queryDevice(f.device);
    t.equal(dev.physPortCnt, 1);
    t.ok(dev.maxQp > 1000 && dev.maxCq > 1000 && dev.maxMr > 1000, 'limits reported');
    t.ok(dev.maxQpRdAtom >= 1);
    const port = await f.verbs.queryPort(f.device, 1);
    t.equal(port.state, PortState.ACTIVE);
    t.equal(port.linkLayer, 2, 'Ethernet link layer (RoCE)');
    const gids = await f.verbs.queryGidTable(f.device);
    const v2 = gids.find((g) => g.index === RXE_GID_INDEX)!;
    t.equal(v2.type, GidType.ROCE_V2);
    t.same([...v2.gid.subarray(0, 12)], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff], 'IPv4-mapped');
    await t.rejects(f.verbs.queryPort(f.device, 2), { name: 'VerbsError', verb: 'ibv_query_port', errno: 'EINVAL' });
  });
});

t.test('RC SEND/RECV: a list of sends, scattered over several SGEs, arrives byte for byte', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const src = new ArrayBuffer(16 * KiB);
    const dst = new ArrayBuffer(16 * KiB);
    const mrA = await f.mr(src);
    const mrB = await f.mr(dst);
    new Uint8Array(src).set(pattern(16 * KiB, 1));
    // Receive i gets two SGEs (1000 + 3000 bytes at scattered places); send i gathers 4000 bytes from three SGEs.
    const recvs = new RecvWrList();
    const sends = new SendWrList();
    for (let i = 0; i < 3; i++) {
      const base = BigInt(i * 5000);
      recvs.push({
        wrId: 100 + i,
        sgList: [
          { addr: mrB.addr + base + 3000n, length: 1000, lkey: mrB.lkey },
          { addr: mrB.addr + base, length: 3000, lkey: mrB.lkey },
        ],
      });
      sends.push({
        wrId: 200 + i,
        opcode: WrOpcode.SEND,
        sendFlags: SendFlags.SIGNALED,
        sgList: [
          { addr: mrA.addr + base, length: 1500, lkey: mrA.lkey },
          { addr: mrA.addr + base + 1500n, length: 1500, lkey: mrA.lkey },
          { addr: mrA.addr + base + 3000n, length: 1000, lkey: mrA.lkey },
        ],
      });
    }
    f.verbs.postRecv(b.qp, recvs);
    f.verbs.postSend(a.qp, sends);
    const sent = await a.sendCq.waitFor(3);
    t.same(sent.map((w) => [Number(w.wrId), w.status, w.opcode, w.qpNum]), [
      [200, WcStatus.SUCCESS, WcOpcode.SEND, a.qp.qpNum],
      [201, WcStatus.SUCCESS, WcOpcode.SEND, a.qp.qpNum],
      [202, WcStatus.SUCCESS, WcOpcode.SEND, a.qp.qpNum],
    ]);
    const got = await b.recvCq.waitFor(3);
    t.same(got.map((w) => [Number(w.wrId), w.status, w.opcode, w.byteLen, w.qpNum]), [
      [100, WcStatus.SUCCESS, WcOpcode.RECV, 4000, b.qp.qpNum],
      [101, WcStatus.SUCCESS, WcOpcode.RECV, 4000, b.qp.qpNum],
      [102, WcStatus.SUCCESS, WcOpcode.RECV, 4000, b.qp.qpNum],
    ]);
    const s = new Uint8Array(src);
    const d = new Uint8Array(dst);
    for (let i = 0; i < 3; i++) {
      const o = i * 5000;
      // The first 1000 bytes of the message went to the first receive SGE (+3000), the rest to the second.
      t.same(d.subarray(o + 3000, o + 4000), s.subarray(o, o + 1000), `message ${i}: first SGE`);
      t.same(d.subarray(o, o + 3000), s.subarray(o + 1000, o + 4000), `message ${i}: second SGE`);
    }
  });
});

t.test('RC SEND with immediate: the receiver gets the immediate in host order', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const mem = new ArrayBuffer(4 * KiB);
    const mr = await f.mr(mem);
    new Uint8Array(mem, 0, 512).set(pattern(512, 2));
    f.verbs.postRecv(b.qp, new RecvWrList().push({ wrId: 1, sgList: [{ addr: mr.addr + 2048n, length: 2048, lkey: mr.lkey }] }));
    f.verbs.postSend(
      a.qp,
      new SendWrList().push({
        wrId: 2,
        opcode: WrOpcode.SEND_WITH_IMM,
        immData: 0xa1b2c3d4,
        sendFlags: SendFlags.SIGNALED,
        sgList: [{ addr: mr.addr, length: 512, lkey: mr.lkey }],
      }),
    );
    t.equal((await a.sendCq.waitFor(1))[0]!.status, WcStatus.SUCCESS);
    const [wc] = await b.recvCq.waitFor(1);
    t.equal(wc!.status, WcStatus.SUCCESS);
    t.equal(wc!.opcode, WcOpcode.RECV);
    t.ok(wc!.wcFlags & WcFlags.WITH_IMM, 'WITH_IMM flag');
    t.equal(wc!.immData, 0xa1b2c3d4);
    t.equal(wc!.byteLen, 512);
    t.same(new Uint8Array(mem, 2048, 512), new Uint8Array(mem, 0, 512));
  });
});

t.test('RDMA WRITE into memory registered at a guest address (ibv_reg_mr_iova), with and without immediate', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const src = new ArrayBuffer(64 * KiB);
    const dst = new ArrayBuffer(64 * KiB);
    // The guest's own address of its buffer, not the backend's: at the same offset within a page (as guest RAM is).
    const GUEST_ADDR = 0x7_4000_0000n + (f.verbs.bufferAddress(dst) % 4096n);
    const mrA = await f.mr(src);
    const mrB = await f.mr(dst, ALL_ACCESS, GUEST_ADDR);
    t.equal(mrB.addr, GUEST_ADDR, 'the MR is addressed by the iova');
    await t.rejects(f.verbs.regMr(f.pd, dst, { access: ALL_ACCESS, iova: GUEST_ADDR + 1n }), {
      name: 'VerbsError',
      verb: 'ibv_reg_mr_iova',
      errno: 'EINVAL',
      message: /iova offset within a page/,
    });
    new Uint8Array(src).set(pattern(64 * KiB, 3));
    f.verbs.postSend(
      a.qp,
      new SendWrList().push({
        wrId: 1,
        opcode: WrOpcode.RDMA_WRITE,
        sendFlags: SendFlags.SIGNALED,
        remoteAddr: GUEST_ADDR + 4096n,
        rkey: mrB.rkey,
        sgList: [{ addr: mrA.addr, length: 40000, lkey: mrA.lkey }],
      }),
    );
    const [w1] = await a.sendCq.waitFor(1);
    t.equal(w1!.status, WcStatus.SUCCESS);
    t.equal(w1!.opcode, WcOpcode.RDMA_WRITE);
    t.same(new Uint8Array(dst, 4096, 40000), new Uint8Array(src, 0, 40000), 'written at iova + 4096');
    t.ok(new Uint8Array(dst, 0, 4096).every((x) => x === 0), 'nothing before it');
    t.ok(new Uint8Array(dst, 44096).every((x) => x === 0), 'nothing after it');
    t.same(b.recvCq.pollNow(), [], 'a plain WRITE consumes no receive');

    // With immediate: the data lands and a receive WR is consumed with RECV_RDMA_WITH_IMM.
    f.verbs.postRecv(b.qp, new RecvWrList().push({ wrId: 9 }));
    f.verbs.postSend(
      a.qp,
      new SendWrList().push({
        wrId: 2,
        opcode: WrOpcode.RDMA_WRITE_WITH_IMM,
        immData: 0x01020304,
        sendFlags: SendFlags.SIGNALED,
        remoteAddr: GUEST_ADDR,
        rkey: mrB.rkey,
        sgList: [{ addr: mrA.addr + 50000n, length: 1234, lkey: mrA.lkey }],
      }),
    );
    t.equal((await a.sendCq.waitFor(1))[0]!.status, WcStatus.SUCCESS);
    const [r] = await b.recvCq.waitFor(1);
    t.equal(r!.status, WcStatus.SUCCESS);
    t.equal(r!.wrId, 9n);
    t.equal(r!.opcode, WcOpcode.RECV_RDMA_WITH_IMM);
    t.equal(r!.immData, 0x01020304);
    t.equal(r!.byteLen, 1234);
    t.same(new Uint8Array(dst, 0, 1234), new Uint8Array(src, 50000, 1234));
  });
});

t.test('RDMA READ', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const local = new ArrayBuffer(32 * KiB);
    const remote = new ArrayBuffer(32 * KiB);
    const mrA = await f.mr(local);
    const mrB = await f.mr(remote);
    new Uint8Array(remote).set(pattern(32 * KiB, 4));
    f.verbs.postSend(
      a.qp,
      new SendWrList().push({
        wrId: 5,
        opcode: WrOpcode.RDMA_READ,
        sendFlags: SendFlags.SIGNALED,
        remoteAddr: mrB.addr + 100n,
        rkey: mrB.rkey,
        sgList: [
          { addr: mrA.addr + 16384n, length: 10000, lkey: mrA.lkey },
          { addr: mrA.addr, length: 5000, lkey: mrA.lkey },
        ],
      }),
    );
    const [wc] = await a.sendCq.waitFor(1);
    t.equal(wc!.status, WcStatus.SUCCESS);
    t.equal(wc!.opcode, WcOpcode.RDMA_READ);
    t.equal(wc!.byteLen, 15000);
    t.same(new Uint8Array(local, 16384, 10000), new Uint8Array(remote, 100, 10000));
    t.same(new Uint8Array(local, 0, 5000), new Uint8Array(remote, 10100, 5000));
    t.same(b.recvCq.pollNow(), []);
  });
});

t.test('atomic compare-and-swap and fetch-and-add', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const local = new ArrayBuffer(4096);
    const remote = new ArrayBuffer(4096);
    const mrA = await f.mr(local);
    const mrB = await f.mr(remote);
    const r = new DataView(remote);
    const l = new DataView(local);
    r.setBigUint64(64, 0x1111_2222_3333_4444n, true);
    r.setBigUint64(128, 1000n, true);
    const atomic = (wrId: number, opcode: number, offset: bigint, compareAdd: bigint, swap: bigint, resultAt: bigint) =>
      new SendWrList().push({
        wrId,
        opcode,
        sendFlags: SendFlags.SIGNALED,
        remoteAddr: mrB.addr + offset,
        rkey: mrB.rkey,
        compareAdd,
        swap,
        sgList: [{ addr: mrA.addr + resultAt, length: 8, lkey: mrA.lkey }],
      });

    // CAS that matches: swapped, old value returned.
    f.verbs.postSend(a.qp, atomic(1, WrOpcode.ATOMIC_CMP_AND_SWP, 64n, 0x1111_2222_3333_4444n, 0xaaaa_bbbb_cccc_ddddn, 0n));
    let [wc] = await a.sendCq.waitFor(1);
    t.equal(wc!.status, WcStatus.SUCCESS);
    t.equal(wc!.opcode, WcOpcode.COMP_SWAP);
    t.equal(l.getBigUint64(0, true), 0x1111_2222_3333_4444n, 'CAS returns the old value');
    t.equal(r.getBigUint64(64, true), 0xaaaa_bbbb_cccc_ddddn, 'CAS swapped');

    // CAS that does not match: unchanged, current value returned.
    f.verbs.postSend(a.qp, atomic(2, WrOpcode.ATOMIC_CMP_AND_SWP, 64n, 5n, 6n, 8n));
    [wc] = await a.sendCq.waitFor(1);
    t.equal(wc!.status, WcStatus.SUCCESS);
    t.equal(l.getBigUint64(8, true), 0xaaaa_bbbb_cccc_ddddn);
    t.equal(r.getBigUint64(64, true), 0xaaaa_bbbb_cccc_ddddn, 'no swap on mismatch');

    // Fetch-and-add, twice, with a wrap-around.
    f.verbs.postSend(a.qp, atomic(3, WrOpcode.ATOMIC_FETCH_AND_ADD, 128n, 234n, 0n, 16n));
    [wc] = await a.sendCq.waitFor(1);
    t.equal(wc!.status, WcStatus.SUCCESS);
    t.equal(wc!.opcode, WcOpcode.FETCH_ADD);
    t.equal(l.getBigUint64(16, true), 1000n);
    t.equal(r.getBigUint64(128, true), 1234n);
    f.verbs.postSend(a.qp, atomic(4, WrOpcode.ATOMIC_FETCH_AND_ADD, 128n, (1n << 64n) - 1234n, 0n, 24n));
    [wc] = await a.sendCq.waitFor(1);
    t.equal(l.getBigUint64(24, true), 1234n);
    t.equal(r.getBigUint64(128, true), 0n, 'the add wraps modulo 2^64');
    t.same(b.recvCq.pollNow(), []);
  });
});

t.test('completion events: armed CQs raise one event, solicited-only ones only for solicited messages', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const mem = new ArrayBuffer(4096);
    const mr = await f.mr(mem);
    const recv = new RecvWrList();
    for (let i = 0; i < 3; i++) recv.push({ wrId: i, sgList: [{ addr: mr.addr + BigInt(i * 1024), length: 1024, lkey: mr.lkey }] });
    f.verbs.postRecv(b.qp, recv);
    const send = (wrId: number, flags: number) =>
      f.verbs.postSend(a.qp, new SendWrList().push({ wrId, opcode: WrOpcode.SEND, sendFlags: flags, sgList: [{ addr: mr.addr + 3072n, length: 8, lkey: mr.lkey }] }));

    // Any completion: arm, send, the event comes.
    const firstEvent = new Promise<void>((resolve) => {
      const before = b.recvCq.events;
      const timer = setInterval(() => {
        if (b.recvCq.events > before) {
          clearInterval(timer);
          resolve();
        }
      }, 5);
    });
    f.verbs.reqNotifyCq(b.recvCq.cq, false);
    send(10, SendFlags.SIGNALED);
    await firstEvent;
    t.equal(b.recvCq.pollNow().length, 1);
    t.equal(b.recvCq.events, 1, 'one event');

    // Solicited only: an unsolicited message raises no event, a solicited one does.
    f.verbs.reqNotifyCq(b.recvCq.cq, true);
    send(11, SendFlags.SIGNALED);
    await a.sendCq.waitFor(2);
    await new Promise((r) => setTimeout(r, 300));
    t.equal(b.recvCq.events, 1, 'no event for an unsolicited message');
    t.equal(b.recvCq.pollNow().length, 1, 'but the completion is there');
    send(12, SendFlags.SIGNALED | SendFlags.SOLICITED);
    await a.sendCq.waitFor(1);
    const deadline = Date.now() + 5000;
    while (b.recvCq.events < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    t.equal(b.recvCq.events, 2, 'an event for the solicited message');
    t.equal(b.recvCq.pollNow().length, 1);
  });
});

t.test('queryQp reports the attributes the connection was made with', async (t) => {
  await withRxe(t, async (f) => {
    const { a, b } = await f.rcPair();
    const q = await f.verbs.queryQp(a.qp);
    t.equal(q.qpNum, a.qp.qpNum);
    t.equal(q.qpType, QpType.RC);
    t.equal(q.qpState, QpState.RTS);
    t.equal(q.destQpNum, b.qp.qpNum);
    t.equal(q.pathMtu, Mtu.MTU_1024);
    t.equal(q.portNum, 1);
    t.equal(q.qpAccessFlags, ALL_ACCESS);
    t.equal(q.timeout, 14);
    t.equal(q.retryCnt, 7);
    t.equal(q.rnrRetry, 7);
    t.equal(q.maxRdAtomic, 4);
    t.equal(q.maxDestRdAtomic, 4);
    t.equal(q.minRnrTimer, 12);
    t.equal(q.ahAttr.grh?.sgidIndex, RXE_GID_INDEX);
    t.equal(q.ahAttr.grh?.hopLimit, 64);
    t.same(q.ahAttr.grh?.dgid, f.gid.gid);
    t.ok(q.cap.maxSendWr >= 32 && q.cap.maxRecvWr >= 32);
    t.same(a.qp.cap, q.cap, 'the handle carries the actual capabilities');
  });
});
