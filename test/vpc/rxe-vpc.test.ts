// The VPC layer on real soft-RoCE, through the real device: four VMs of two tenants on one rxe0, each an
// RdmaDevice over NativeVerbs wired as `vrdma-backend --vpc-policy/--vpc-etcd` wires it (VpcBackend), driven by the
// reference guest driver over the reference vhost-user front-end. Same-VPC RC and UD carry verified bytes;
// another VPC's address and a guessed one are refused alike (and counted apart); the host QP carries the
// tenant's traffic class whatever the guest asks, and the VPC's Q_Key; a rule change (file edited, or etcd put)
// moves both ends' QPs to ERR with QP_POLICY_TEARDOWN on both guests' event queues, and new attempts are refused;
// every quota is reached and counted; the operator view says what QoS is enforced (no rate limit on rxe). After
// each test `rdma resource show` lists nothing of the VMs.
//
//   bash scripts/rxe/run.sh --timeout 2400 -- npx tap --jobs=1 test/vpc/rxe-vpc.test.ts

import t, { type Test } from 'tap';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { EventType, Limits, PolicyReason, QpState, ResourceKind, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { CommandError, type DeviceEvent, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { gidFromIpv4, vpcQkey } from '../../vmm-device/rdma/address-resolver.ts';
import { RecordingLogger, StderrLogger } from '../../vmm-device/util/log.ts';
import { VpcBackend } from '../../vmm-device/vpc/backend.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { publishPolicy } from '../../vmm-device/vpc/etcd-source.ts';
import { pattern, rdmaResourcesOf, requireTestHost } from '../driver/rxe-helpers.ts';
import { EtcdCluster, until } from './etcd-harness.ts';
import { ALL_ACCESS, ACME_DSCP, GLOBEX_DSCP, GLOBEX_QKEY, TEST_QUOTAS, hostQp, openVpcVm, rxePolicy, type Cleanups, type VpcVm } from './vm-rig.ts';

requireTestHost('test/vpc/rxe-vpc.test.ts');
/** Under TCG on a loaded 2-core machine, opening four devices and connecting them takes tens of seconds. */
const SUBTEST_TIMEOUT_MS = 900_000;
t.setTimeout(3 * SUBTEST_TIMEOUT_MS);
const WAIT_MS = 20_000;
// The time from a change to both QPs in ERR is a benchmark figure (npm run bench:vpc, bench-results/vpc.json, target
// 100 ms), never a pass/fail condition here: the tests only print it.

const verbs = new NativeVerbs();
const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-rxe-vpc-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

async function refusal(p: Promise<unknown>): Promise<[string, number]> {
  try {
    await p;
  } catch (e) {
    if (e instanceof CommandError) return [e.statusName, e.detail];
    throw e;
  }
  return ['OK', 0];
}

/** RC: INIT, RTR (the guest asks for traffic class 0xb8, which the device must override), RTS. */
async function connectRc(qp: Qp, peerGid: Uint8Array, peerQpn: number): Promise<void> {
  await qp.modify({ state: 'INIT', pkeyIndex: 0, port: Limits.PORT_NUM, accessFlags: ALL_ACCESS });
  await qp.modify({ state: 'RTR', av: { dgid: peerGid, hopLimit: 64, trafficClass: 0xb8 }, pathMtu: 3, destQpn: peerQpn, rqPsn: 0, maxDestRdAtomic: 4, minRnrTimer: 12 });
  await qp.modify({ state: 'RTS', sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 4 });
}

/** A new RC QP of `vm`, at INIT. */
async function rcAtInit(vm: VpcVm): Promise<Qp> {
  const q = await vm.ctx.createQp(vm.pd, { type: 'RC', sendCq: vm.cq, recvCq: vm.cq });
  await q.modify({ state: 'INIT', pkeyIndex: 0, port: Limits.PORT_NUM, accessFlags: ALL_ACCESS });
  return q;
}

/** RTR towards `peerGid`: the device's answer (the policy is asked here). */
function rtrTo(q: Qp, peerGid: Uint8Array, destQpn: number): Promise<[string, number]> {
  return refusal(q.modify({ state: 'RTR', av: { dgid: peerGid, hopLimit: 64 }, pathMtu: 3, destQpn, rqPsn: 0, maxDestRdAtomic: 4, minRnrTimer: 12 }));
}

async function rcPair(t: Test, a: VpcVm, b: VpcVm): Promise<[Qp, Qp]> {
  const qa = await a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: 16, maxRecvWr: 16 });
  const qb = await b.ctx.createQp(b.pd, { type: 'RC', sendCq: b.cq, recvCq: b.cq, maxSendWr: 16, maxRecvWr: 16 });
  await connectRc(qa, b.ctx.gid, qb.qpNum);
  await connectRc(qb, a.ctx.gid, qa.qpNum);
  t.pass(`${a.id} <-> ${b.id}: RC connected through the policy`);
  return [qa, qb];
}

/** SEND a -> b and RDMA WRITE a -> b, every byte checked. */
async function exchange(t: Test, a: VpcVm, qa: Qp, b: VpcVm, qb: Qp, seed: number): Promise<void> {
  const msg = pattern(3000, seed);
  a.buf.write(0, msg);
  await qb.postRecv([{ wrId: 1n, sgList: [b.mr.sge(0, 4096)] }]);
  await qa.postSend([{ wrId: 2n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(0, 3000)] }]);
  t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 2n, status: WcStatus.SUCCESS }], `${a.id} SEND completes`);
  t.match(await b.cq.waitPoll(1, WAIT_MS), [{ wrId: 1n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 3000 }]);
  t.same(b.buf.read(0, 3000), msg, `${a.id} -> ${b.id}: 3000 bytes SENT byte for byte`);
  const data = pattern(8192, seed + 1);
  a.buf.write(8192, data);
  await qa.postSend([{ wrId: 3n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(8192, 8192)], remoteAddr: b.mr.iova + 16384n, rkey: b.mr.rkey }]);
  t.match(await a.cq.waitPoll(1, WAIT_MS), [{ wrId: 3n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }]);
  t.same(b.buf.read(16384, 8192), data, `${a.id} -> ${b.id}: 8 KiB RDMA WRITE byte for byte`);
}

/**
 * Arms a watch for the next policy change on `backend`; `done()` then polls both guests' event rings (as a polling
 * guest driver would: no interrupt wake-up in the figure) until each holds QP_POLICY_TEARDOWN for its QP. Times:
 * the change reaching the backend (file event / watch response), the new document in force, both events written.
 */
function watchTeardown(backend: VpcBackend, ends: [VpcVm, Qp][]) {
  const applied = new Promise<{ observedAt: number; inForceAt: number }>((resolve) => {
    const off = backend.engine.onApplied(({ observedAt }) => {
      off();
      resolve({ observedAt, inForceAt: performance.now() });
    });
  });
  return async () => {
    const found: (DeviceEvent | undefined)[] = ends.map(() => undefined);
    const deadline = performance.now() + WAIT_MS;
    while (found.some((e) => e === undefined)) {
      if (performance.now() > deadline) throw new Error('QP_POLICY_TEARDOWN did not reach both guests');
      ends.forEach(([vm, qp], i) => {
        vm.ctx.driver.pumpEvents();
        found[i] ??= vm.ctx.driver.takeEvents((e) => e.type === EventType.QP_POLICY_TEARDOWN && e.handle === qp.handle)[0];
      });
      await new Promise((r) => setImmediate(r));
    }
    const writtenAt = performance.now();
    return { events: found as DeviceEvent[], writtenAt, ...(await applied) };
  };
}

async function closeAll(t: Test, cleanups: Cleanups, backend: VpcBackend | undefined): Promise<void> {
  for (const c of cleanups.reverse()) await c().catch((e: Error) => t.fail(`cleanup: ${e.message}`));
  await backend?.stop();
  t.same(rdmaResourcesOf(process.pid), { qp: 0, cq: 0, mr: 0, pd: 0 }, 'rdma resource show: nothing of the VMs left');
}

t.test('file control plane: four VMs of two tenants on rxe0', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  const policyPath = path.join(dir, 'policy.json');
  writeFileSync(policyPath, JSON.stringify(rxePolicy(), null, 2));
  const cleanups: Cleanups = [];
  let backend: VpcBackend | undefined;
  try {
    backend = await VpcBackend.start({ controlPlane: { kind: 'file', path: policyPath }, hostId: 'host-1', log: new StderrLogger('vpc', 'warn'), debounceMs: 20 });
    const vms: Record<string, VpcVm> = {};
    for (const id of ['a1', 'a2', 'g1', 'g2']) vms[id] = await openVpcVm(backend, verbs, id, cleanups);
    const { a1, a2, g1, g2 } = vms as Record<'a1' | 'a2' | 'g1' | 'g2', VpcVm>;
    t.same([...a1.ctx.gid], [...gidFromIpv4('172.16.0.1')], "a1's GID is its virtual address");
    t.same([...g1.ctx.gid], [...gidFromIpv4('172.16.0.1')], 'g1 has the same virtual address in its own VPC');

    // Same VPC, RC, both tenants: data verified, the tenant's class on the host QPs.
    const [qa1, qa2] = await rcPair(t, a1, a2);
    await exchange(t, a1, qa1, a2, qa2, 1);
    t.match(
      backend.status('a1').vms[0]!.connections,
      [{ kind: 'RC', peerVm: 'a2', peerIp: '172.16.0.2', peerHost: 'host-1', peerQpn: qa2.qpNum, rule: 10 }],
      "the operator's view lists a1's connection and the rule that allowed it",
    );
    const [qg1, qg2] = await rcPair(t, g1, g2);
    await exchange(t, g2, qg2, g1, qg1, 3);
    for (const [vm, qp, dscp] of [[a1, qa1, ACME_DSCP], [a2, qa2, ACME_DSCP], [g1, qg1, GLOBEX_DSCP], [g2, qg2, GLOBEX_DSCP]] as const) {
      const h = await hostQp(vm, qp.handle);
      t.equal(h.ahAttr.grh?.trafficClass, dscp << 2, `${vm.id}: host QP traffic class ${dscp << 2} (tenant dscp ${dscp}), not the guest's 0xb8`);
      t.same([...(h.ahAttr.grh?.dgid ?? [])], [...gidFromIpv4('10.233.0.1')], `${vm.id}: the host GID is programmed, never a virtual one`);
    }

    // Same VPC, UD: the VPC's Q_Key on the host, data verified, the sender named by its virtual address.
    const ua1 = await a1.ctx.createQp(a1.pd, { type: 'UD', sendCq: a1.cq, recvCq: a1.cq });
    const ua2 = await a2.ctx.createQp(a2.pd, { type: 'UD', sendCq: a2.cq, recvCq: a2.cq });
    await ua1.readyUd(0x1111);
    await ua2.readyUd(0x2222);
    t.equal((await hostQp(a1, ua1.handle)).qkey, vpcQkey('acme-prod'), "acme-prod's Q_Key on the host, whatever the guest wrote");
    const ah = await a1.ctx.createAh(a1.pd, { dgid: a2.ctx.gid, trafficClass: 0xfc });
    const dgram = pattern(700, 5);
    a1.buf.write(32768, dgram);
    await ua2.postRecv([{ wrId: 9n, sgList: [a2.mr.sge(32768, Limits.GRH_SIZE + 1024)] }]);
    await ua1.postSend([{ wrId: 8n, opcode: 'SEND', signaled: true, sgList: [a1.mr.sge(32768, 700)], ah, remoteQpn: ua2.qpNum, remoteQkey: 0x3333 }]);
    t.match(await a1.cq.waitPoll(1, WAIT_MS), [{ wrId: 8n, status: WcStatus.SUCCESS }]);
    t.match(await a2.cq.waitPoll(1, WAIT_MS), [{ wrId: 9n, status: WcStatus.SUCCESS, byteLen: Limits.GRH_SIZE + 700 }]);
    t.same(a2.buf.read(32768 + Limits.GRH_SIZE, 700), dgram, 'UD a1 -> a2: 700 bytes byte for byte');
    t.same([...a2.buf.read(32768 + 32, 4)], [172, 16, 0, 1], "the sender's VIRTUAL address in the header area");
    await a1.ctx.destroyAh(ah);

    // Another VPC's address and a guessed one: the same answer, counted apart.
    const qx = await rcAtInit(a1);
    const otherVpc = await rtrTo(qx, gidFromIpv4('172.16.0.3'), qg2.qpNum);
    const guessed = await rtrTo(qx, gidFromIpv4('172.16.0.99'), 0x77);
    t.equal(otherVpc[0], 'DESTINATION_UNREACHABLE', "a1 -> g2's address (globex): refused");
    t.same(guessed, otherVpc, 'a guessed address gets the very same answer');
    t.equal((await refusal(a1.ctx.createAh(a1.pd, { dgid: gidFromIpv4('172.16.0.3') })))[0], 'DESTINATION_UNREACHABLE', 'UD AH to another VPC: the same status');
    t.match(backend.engine.countersOfVm('a1'), { unreachable: 3, otherVpc: 2, unknownDestination: 1 }, 'counted apart for the operator');
    const refusedGlobex = await rtrTo(await rcAtInit(g1), gidFromIpv4('172.16.0.2'), qa2.qpNum);
    t.equal(refusedGlobex[0], 'DESTINATION_UNREACHABLE', "g1 -> a2's address (acme): refused");

    // A rule change tears the live a1 <-> a2 connection down; g1 <-> g2 stays.
    const edited = rxePolicy(undefined, [{ id: 55, action: 'deny', src: '172.16.0.1', dst: '172.16.0.2', qpTypes: ['RC'], priority: 1 }]);
    const teardown = watchTeardown(backend, [[a1, qa1], [a2, qa2]]);
    const fileWrittenAt = performance.now();
    writeFileSync(policyPath + '.tmp', JSON.stringify(edited, null, 2));
    renameSync(policyPath + '.tmp', policyPath);
    const { events: [e1, e2], writtenAt, observedAt, inForceAt } = await teardown();
    const latency = writtenAt - observedAt;
    t.match(e1, { type: EventType.QP_POLICY_TEARDOWN, handle: qa1.handle, detail: PolicyReason.RULE_CHANGED }, 'a1 gets QP_POLICY_TEARDOWN (RULE_CHANGED)');
    t.match(e2, { type: EventType.QP_POLICY_TEARDOWN, handle: qa2.handle, detail: PolicyReason.RULE_CHANGED }, 'a2 gets QP_POLICY_TEARDOWN (RULE_CHANGED)');
    t.equal((await hostQp(a1, qa1.handle)).qpState, QpState.ERR, "a1's host QP is in ERR");
    t.equal((await hostQp(a2, qa2.handle)).qpState, QpState.ERR, "a2's host QP is in ERR");
    t.equal((await hostQp(g1, qg1.handle)).qpState, QpState.RTS, "g1's host QP (other tenant) is untouched");
    t.comment(
      `file: change event -> both QPs in ERR with QP_POLICY_TEARDOWN in both guests' rings ${latency.toFixed(1)} ms ` +
        `(debounce, read, validation: ${(inForceAt - observedAt).toFixed(1)} ms; policy in force -> both events: ${(writtenAt - inForceAt).toFixed(1)} ms; ` +
        `file written -> both events: ${(writtenAt - fileWrittenAt).toFixed(1)} ms)`,
    );
    t.same(await rtrTo(await rcAtInit(a1), a2.ctx.gid, qa2.qpNum), ['REFUSED_BY_POLICY', 55], 'a new attempt is refused, naming rule 55');
    await exchange(t, g1, qg1, g2, qg2, 7);

    // Every quota, on g1 (it holds 1 PD, 1 CQ, 1 MR of 64 KiB, 2 QPs: the RC one and the refused one).
    const hit = async (what: string, kind: number, p: () => Promise<unknown>) => {
      t.same(await refusal(p()), ['NO_RESOURCES', kind], `${what}: NO_RESOURCES at the quota`);
    };
    await g1.ctx.allocPd();
    await hit('PD', ResourceKind.PD, () => g1.ctx.allocPd());
    await g1.ctx.createCq(16);
    await g1.ctx.createCq(16);
    await hit('CQ', ResourceKind.CQ, () => g1.ctx.createCq(16));
    await hit('MR bytes', ResourceKind.MR_BYTES, () => g1.ctx.regMr(g1.pd, g1.ctx.allocBuffer(TEST_QUOTAS.mrBytes), 0x1));
    await g1.ctx.regMr(g1.pd, g1.ctx.allocBuffer(4096), 0x1);
    await hit('MR', ResourceKind.MR, () => g1.ctx.regMr(g1.pd, g1.ctx.allocBuffer(4096), 0x1));
    const ug1 = await g1.ctx.createQp(g1.pd, { type: 'UD', sendCq: g1.cq, recvCq: g1.cq });
    await ug1.readyUd(0x1111);
    t.equal((await hostQp(g1, ug1.handle)).qkey, GLOBEX_QKEY, "globex-net's own Q_Key from the policy on the host");
    await g1.ctx.createQp(g1.pd, { type: 'UD', sendCq: g1.cq, recvCq: g1.cq });
    await hit('QP', ResourceKind.QP, () => g1.ctx.createQp(g1.pd, { type: 'UD', sendCq: g1.cq, recvCq: g1.cq }));
    await g1.ctx.createAh(g1.pd, { dgid: g2.ctx.gid });
    await g1.ctx.createAh(g1.pd, { dgid: g2.ctx.gid });
    await hit('AH', ResourceKind.AH, () => g1.ctx.createAh(g1.pd, { dgid: g2.ctx.gid }));
    t.same(backend.engine.countersOfVm('g1').quotaHits, { pds: 1, cqs: 1, qps: 1, mrs: 1, ahs: 1, mrBytes: 1, controlRequests: 0 }, 'each quota hit counted once');

    // The operator's view says all of it, and that no rate limit is enforced on rxe.
    const status = backend.status();
    const a1View = status.vms.find((v) => v.vm === 'a1')!;
    const g1View = status.vms.find((v) => v.vm === 'g1')!;
    t.match(a1View.counters, { allowed: 2, unreachable: 3, refusedByRule: 1, tornDown: 1 }, "a1's counters");
    t.match(status.vpcs['acme-prod'], { tornDown: 2 }, "acme-prod's counters: both ends torn down");
    t.match(a1View.qos, { dscp: ACME_DSCP, trafficClass: ACME_DSCP << 2, rateLimitMbps: 1000, rateLimitEnforced: false });
    t.match(status.qosEnforcement, /traffic class .* NOT enforced/);
    t.match(a1View.device!.qps.find((q) => q.handle === qa1.handle), { state: 'ERR', peer: '172.16.0.2', type: 'RC' }, "a1's torn-down QP in the view");
    t.match(g1View.device!.resources, { pds: 2, cqs: 3, qps: 4, mrs: 2, ahs: 2 });
    t.match(g1View.counters.quotaHits, { pds: 1, ahs: 1 });
    t.equal(g1View.qos.rateLimitMbps, null);
  } finally {
    await closeAll(t, cleanups, backend);
  }
});

t.test('etcd control plane (a real etcd inside the test host): a put tears a live RC connection down', { timeout: SUBTEST_TIMEOUT_MS }, async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  const prefix = '/vrdma/vpc/';
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log: new RecordingLogger('writer') });
  await publishPolicy(writer, prefix, rxePolicy());
  const cleanups: Cleanups = [];
  let backend: VpcBackend | undefined;
  try {
    backend = await VpcBackend.start({
      controlPlane: { kind: 'etcd', endpoints: cluster.endpoints, prefix },
      hostId: 'host-1',
      log: new StderrLogger('vpc', 'warn'),
      healthIntervalMs: 200,
    });
    const a1 = await openVpcVm(backend, verbs, 'a1', cleanups);
    const a2 = await openVpcVm(backend, verbs, 'a2', cleanups);
    const [qa1, qa2] = await rcPair(t, a1, a2);
    await exchange(t, a1, qa1, a2, qa2, 11);
    t.equal((await hostQp(a1, qa1.handle)).ahAttr.grh?.trafficClass, ACME_DSCP << 2);

    const teardown = watchTeardown(backend, [[a1, qa1], [a2, qa2]]);
    const putAt = performance.now();
    await publishPolicy(writer, prefix, rxePolicy(undefined, [{ id: 77, action: 'deny', src: '172.16.0.2', dst: '172.16.0.1', priority: 1 }]));
    const { events: [e1, e2], writtenAt, observedAt, inForceAt } = await teardown();
    t.match(e1, { detail: PolicyReason.RULE_CHANGED }, 'a1 gets QP_POLICY_TEARDOWN');
    t.match(e2, { detail: PolicyReason.RULE_CHANGED }, 'a2 gets QP_POLICY_TEARDOWN');
    t.equal((await hostQp(a1, qa1.handle)).qpState, QpState.ERR);
    t.equal((await hostQp(a2, qa2.handle)).qpState, QpState.ERR);
    const latency = writtenAt - observedAt;
    t.comment(
      `etcd: put -> watch response ${(observedAt - putAt).toFixed(1)} ms; watch response -> both QPs in ERR with the event in both guests' rings ${latency.toFixed(1)} ms ` +
        `(assembly and validation: ${(inForceAt - observedAt).toFixed(1)} ms; policy in force -> both events: ${(writtenAt - inForceAt).toFixed(1)} ms)`,
    );

    // etcd gone: the last known policy stays enforced, and the view says so; it catches up on return.
    await cluster.members[0]!.kill();
    await until(() => backend!.etcd!.metrics.connected === false, WAIT_MS, 'etcd seen unreachable');
    t.same(await rtrTo(await rcAtInit(a2), a1.ctx.gid, qa1.qpNum), ['REFUSED_BY_POLICY', 77], 'etcd unreachable: the last known policy still refuses');
    t.match(backend.status().controlPlane.metrics, { connected: false, disconnects: 1 });
    cluster.members[0]!.start();
    await cluster.members[0]!.waitHealthy();
    await until(() => backend!.etcd!.metrics.connected, WAIT_MS, 'etcd reachable again');
    t.match(backend.status().controlPlane.metrics, { connected: true, catchUps: 1 });
  } finally {
    await closeAll(t, cleanups, backend);
  }
});
