// Issue 12 item 1 on real soft-RoCE: the cross-tenant write. On one rxe0, globex's g1 and g2 are connected (RC) and
// g1's MR is open to remote writes; acme's a1 connects towards a2's address (which acme may reach) but names g1's
// wire QPN. The host QP would accept it: same host address, the QPN is g1's. The device now refuses the RTR
// (DESTINATION_UNREACHABLE at dest_qp_num, spec 12.3), a1's QP stays in INIT on the host, and a WRITE a1 posts
// anyway never reaches g1's memory; a1 <-> a2, the genuine pair, still carries verified bytes.
//
//   bash scripts/rxe/run.sh --timeout 1800 -- npx tap --jobs=1 test/vpc/rxe-peer-qpn.test.ts

import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Limits, QpAttr, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { CommandError, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { StderrLogger } from '../../vmm-device/util/log.ts';
import { VpcBackend } from '../../vmm-device/vpc/backend.ts';
import { pattern, requireTestHost } from '../driver/rxe-helpers.ts';
import { ALL_ACCESS, hostQp, openVpcVm, rxePolicy, type Cleanups, type VpcVm } from './vm-rig.ts';

requireTestHost('test/vpc/rxe-peer-qpn.test.ts');
t.setTimeout(1_700_000);
const WAIT_MS = 20_000;
const DEST_QPN_DETAIL = 8 + QpAttr.offsetOf('dest_qp_num');

const verbs = new NativeVerbs();
const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-rxe-peer-qpn-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

async function answer(p: Promise<unknown>): Promise<[string, number]> {
  try {
    await p;
  } catch (e) {
    if (e instanceof CommandError) return [e.statusName, e.detail];
    throw e;
  }
  return ['OK', 0];
}

async function rc(vm: VpcVm): Promise<Qp> {
  const q = await vm.ctx.createQp(vm.pd, { type: 'RC', sendCq: vm.cq, recvCq: vm.cq, maxSendWr: 16, maxRecvWr: 16 });
  await q.modify({ state: 'INIT', pkeyIndex: 0, port: Limits.PORT_NUM, accessFlags: ALL_ACCESS });
  return q;
}

function rtr(q: Qp, peerGid: Uint8Array, destQpn: number): Promise<[string, number]> {
  return answer(q.modify({ state: 'RTR', av: { dgid: peerGid, hopLimit: 64 }, pathMtu: 3, destQpn, rqPsn: 0, maxDestRdAtomic: 4, minRnrTimer: 12 }));
}

function rts(q: Qp): Promise<[string, number]> {
  return answer(q.modify({ state: 'RTS', sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 4 }));
}

t.test('acme names globex\'s QPN behind an acme address on rxe0: refused, nothing lands', async (t) => {
  const policyPath = path.join(dir, 'policy.json');
  writeFileSync(policyPath, JSON.stringify(rxePolicy(), null, 2));
  const cleanups: Cleanups = [];
  const backend = await VpcBackend.start({ controlPlane: { kind: 'file', path: policyPath }, hostId: 'host-1', log: new StderrLogger('vpc', 'warn'), hostDir: path.join(dir, 'host') });
  try {
    const vms: Record<string, VpcVm> = {};
    for (const id of ['a1', 'a2', 'g1', 'g2']) {
      backend.prepareVm(id);
      vms[id] = await openVpcVm(backend, verbs, id, cleanups);
    }
    const { a1, a2, g1, g2 } = vms as Record<'a1' | 'a2' | 'g1' | 'g2', VpcVm>;
    // The victim: g1 <-> g2 connected, g1's MR writable remotely.
    const qg1 = await rc(g1);
    const qg2 = await rc(g2);
    t.same(await rtr(qg1, g2.ctx.gid, qg2.qpNum), ['OK', 0]);
    t.same(await rtr(qg2, g1.ctx.gid, qg1.qpNum), ['OK', 0]);
    t.same(await rts(qg1), ['OK', 0]);
    t.same(await rts(qg2), ['OK', 0]);
    g1.buf.write(0, new Uint8Array(4096));

    // The attack: a2's address (acme may reach it), g1's QPN.
    const qa1 = await rc(a1);
    t.same(await rtr(qa1, a2.ctx.gid, qg1.qpNum), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], "g1's QPN behind a2's address: refused");
    t.equal((await hostQp(a1, qa1.handle)).qpState, 1, "a1's host QP is still in INIT");
    t.same(await rts(qa1), ['WRONG_STATE', 8], 'and cannot be moved to RTS');
    const evil = pattern(4096, 66);
    a1.buf.write(0, evil);
    await answer(qa1.postSend([{ wrId: 9n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a1.mr.sge(0, 4096)], remoteAddr: g1.mr.iova, rkey: g1.mr.rkey }])).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 2000));
    t.same(g1.buf.read(0, 4096), new Uint8Array(4096), "g1's memory is untouched");

    // The genuine pair still works.
    const qa2 = await rc(a2);
    const qa1b = await rc(a1);
    t.same(await rtr(qa1b, a2.ctx.gid, qa2.qpNum), ['OK', 0], "a1 -> a2's own QPN");
    t.same(await rtr(qa2, a1.ctx.gid, qa1b.qpNum), ['OK', 0], 'a2 -> a1: connected back');
    t.same(await rts(qa1b), ['OK', 0]);
    t.same(await rts(qa2), ['OK', 0]);
    const data = pattern(4096, 7);
    a1.buf.write(8192, data);
    await qa1b.postSend([{ wrId: 3n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a1.mr.sge(8192, 4096)], remoteAddr: a2.mr.iova + 4096n, rkey: a2.mr.rkey }]);
    t.match(await a1.cq.waitPoll(1, WAIT_MS), [{ wrId: 3n, status: WcStatus.SUCCESS }]);
    t.same(a2.buf.read(4096, 4096), data, 'a1 -> a2: 4 KiB RDMA WRITE byte for byte');
  } finally {
    for (const c of cleanups.reverse()) await c().catch((e: Error) => t.fail(`cleanup: ${e.message}`));
    await backend.stop();
  }
});
