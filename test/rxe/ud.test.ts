// UD SEND between two UD QPs on rxe0 through an address handle with a GRH (RoCE v2, GID index 1).
import t from 'tap';
import { RXE_GID_INDEX, RXE_PORT, pattern, requireTestHost, withRxe } from './fixture/harness.ts';
import { RecvWrList, SendWrList } from '../../vmm-device/verbs/layout.ts';
import { GRH_BYTES, QpState, QpType, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode } from '../../vmm-device/verbs/constants.ts';

requireTestHost();

const QKEY = 0x1111_2222;

t.test('UD SEND and SEND with immediate through an AH', async (t) => {
  await withRxe(t, async (f) => {
    const cqA = await f.cq();
    const cqB = await f.cq();
    const a = await f.qp(QpType.UD, cqA, cqA);
    const b = await f.qp(QpType.UD, cqB, cqB);
    for (const qp of [a, b]) {
      await f.verbs.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: RXE_PORT, qkey: QKEY });
      await f.verbs.modifyQp(qp, { qpState: QpState.RTR });
      await f.verbs.modifyQp(qp, { qpState: QpState.RTS, sqPsn: 0 });
    }
    t.equal((await f.verbs.queryQp(b)).qkey, QKEY);
    const ah = await f.verbs.createAh(f.pd, {
      portNum: RXE_PORT,
      grh: { dgid: f.gid.gid, sgidIndex: RXE_GID_INDEX, hopLimit: 64 },
    });
    f.defer(() => f.verbs.destroyAh(ah));
    const mem = new ArrayBuffer(16 * 1024);
    const mr = await f.mr(mem);
    new Uint8Array(mem, 0, 1000).set(pattern(1000, 5));
    // A UD receive buffer starts with room for the 40-byte GRH.
    f.verbs.postRecv(
      b,
      new RecvWrList()
        .push({ wrId: 1, sgList: [{ addr: mr.addr + 4096n, length: GRH_BYTES + 1024, lkey: mr.lkey }] })
        .push({ wrId: 2, sgList: [{ addr: mr.addr + 8192n, length: GRH_BYTES + 1024, lkey: mr.lkey }] }),
    );
    f.verbs.postSend(
      a,
      new SendWrList()
        .push({ wrId: 3, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED, ah, remoteQpn: b.qpNum, remoteQkey: QKEY, sgList: [{ addr: mr.addr, length: 1000, lkey: mr.lkey }] })
        .push({ wrId: 4, opcode: WrOpcode.SEND_WITH_IMM, immData: 77, sendFlags: SendFlags.SIGNALED, ah, remoteQpn: b.qpNum, remoteQkey: QKEY, sgList: [{ addr: mr.addr + 500n, length: 300, lkey: mr.lkey }] }),
    );
    const sent = await cqA.waitFor(2);
    t.same(sent.map((w) => [Number(w.wrId), w.status, w.opcode]), [
      [3, WcStatus.SUCCESS, WcOpcode.SEND],
      [4, WcStatus.SUCCESS, WcOpcode.SEND],
    ]);
    const got = await cqB.waitFor(2);
    t.same(got.map((w) => [Number(w.wrId), w.status, w.opcode, w.byteLen, w.srcQp]), [
      [1, WcStatus.SUCCESS, WcOpcode.RECV, GRH_BYTES + 1000, a.qpNum],
      [2, WcStatus.SUCCESS, WcOpcode.RECV, GRH_BYTES + 300, a.qpNum],
    ]);
    t.ok(got[0]!.wcFlags & WcFlags.GRH, 'GRH present');
    t.ok(got[1]!.wcFlags & WcFlags.WITH_IMM);
    t.equal(got[1]!.immData, 77);
    t.same(new Uint8Array(mem, 4096 + GRH_BYTES, 1000), new Uint8Array(mem, 0, 1000));
    t.same(new Uint8Array(mem, 8192 + GRH_BYTES, 300), new Uint8Array(mem, 500, 300));

    // A wrong Q_Key is dropped by the receiver: the send completes, no receive is consumed.
    f.verbs.postSend(a, new SendWrList().push({ wrId: 5, opcode: WrOpcode.SEND, sendFlags: SendFlags.SIGNALED, ah, remoteQpn: b.qpNum, remoteQkey: QKEY + 1, sgList: [{ addr: mr.addr, length: 10, lkey: mr.lkey }] }));
    t.equal((await cqA.waitFor(1))[0]!.status, WcStatus.SUCCESS);
    await new Promise((r) => setTimeout(r, 300));
    t.same(cqB.pollNow(), [], 'nothing received with a wrong Q_Key');
  });
});

t.test('a UD send naming a destroyed AH is refused before it reaches the device', async (t) => {
  await withRxe(t, async (f) => {
    const cq = await f.cq();
    const a = await f.qp(QpType.UD, cq, cq);
    await f.verbs.modifyQp(a, { qpState: QpState.INIT, pkeyIndex: 0, portNum: RXE_PORT, qkey: QKEY });
    await f.verbs.modifyQp(a, { qpState: QpState.RTR });
    await f.verbs.modifyQp(a, { qpState: QpState.RTS, sqPsn: 0 });
    const ah = await f.verbs.createAh(f.pd, { portNum: RXE_PORT, grh: { dgid: f.gid.gid, sgidIndex: RXE_GID_INDEX } });
    await f.verbs.destroyAh(ah);
    t.throws(() => f.verbs.postSend(a, new SendWrList().push({ wrId: 1, opcode: WrOpcode.SEND, ah, remoteQpn: 1, remoteQkey: QKEY })), {
      verb: 'ibv_post_send',
      errno: 'EBADF',
      message: /ah handle \d+ does not exist or was already destroyed/,
    });
    await t.rejects(f.verbs.createAh(f.pd, { portNum: RXE_PORT, grh: { dgid: new Uint8Array(15), sgidIndex: 1 } }), { name: 'VerbsError', verb: 'ibv_create_ah', errno: 'EINVAL', message: /16 bytes/ });
  });
});
