// The device's optional connection-tracking calls (AddressResolver.qpConnected / ahCreated / ahDestroyed /
// attachDevice, spec 12.3) against the real VPC engine behind its resolver (vmm-device/vpc), over FakeVerbs: the
// device reports each connection it makes, a policy change reaches it through its sink and moves the host QP to
// ERR with QP_POLICY_TEARDOWN (or revokes the AH), a `teardown` answer ends a connection at once, and destroyed
// objects are forgotten.

import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import {
  AccessFlag,
  Command,
  CreateAhRequest,
  DoorbellType,
  EventType,
  HandleResponse,
  PolicyReason,
  QpAttrMask as S,
  QpState,
  QpType,
  SendOpcode,
  Status,
  WcStatus,
} from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { gidFromIpv4, type StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { VpcEngine } from '../../vmm-device/vpc/engine.ts';
import { VpcAddressResolver } from '../../vmm-device/vpc/resolver.ts';
import { parsePolicyText, type PolicyDocument } from '../../vmm-device/vpc/schema.ts';
import { ALL_FEATURES, TestGuest, type Answer, type GuestQp } from './guest.ts';

const POLICY_PATH = new URL('../../fixtures/vpc/two-tenants.json', import.meta.url);
const INIT = S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS;
const RTR = S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER;
const A1 = '172.16.0.1';
const A2 = '172.16.0.2';

type PolicyJson = { vpcs: any[] };

function policyJson(): PolicyJson {
  return JSON.parse(readFileSync(POLICY_PATH, 'utf8')) as PolicyJson;
}

function policy(json: PolicyJson): PolicyDocument {
  const r = parsePolicyText(JSON.stringify(json));
  if (!r.ok) throw new Error(`invalid test policy: ${r.errors.join('; ')}`);
  return r.policy;
}

/** acme-prod without its only allow rule: every a1 <-> a2 connection becomes illegal (RULE_CHANGED). */
function withoutRules(): PolicyDocument {
  const j = policyJson();
  j.vpcs[0].rules = [];
  return policy(j);
}

function statusOf(a: Answer): [string, number] {
  return [Object.entries(Status).find(([, v]) => v === a.status)?.[0] ?? String(a.status), a.detail];
}

async function openDevice(t: Test, engine: VpcEngine, vmId: string, hostId: string, resolver?: VpcAddressResolver) {
  const verbs = new FakeVerbs();
  const r = resolver ?? new VpcAddressResolver(engine, hostId, new RecordingLogger('vpc'));
  // TestGuest types its resolver as the static table; the device only uses the AddressResolver interface.
  const g = await TestGuest.open({ verbs, vmId, resolver: r as unknown as StaticAddressResolver });
  t.teardown(() => g.device.close());
  g.postEventBuffers(8);
  return { g, verbs };
}

function newEngine(): VpcEngine {
  const engine = new VpcEngine({ log: new RecordingLogger('vpc') });
  engine.apply(policy(policyJson()), { source: 'test' });
  return engine;
}

async function toRtr(t: Test, g: TestGuest, qp: GuestQp, peer: string, destQpn: number): Promise<Answer> {
  t.same(statusOf(await g.modifyQp(qp.handle, INIT, { qp_state: QpState.INIT, port_num: 1, qp_access_flags: 7 })), ['OK', 0]);
  return g.modifyQp(qp.handle, RTR, {
    qp_state: QpState.RTR,
    path_mtu: 1,
    dest_qp_num: destQpn,
    rq_psn: 5,
    max_dest_rd_atomic: 1,
    min_rnr_timer: 12,
    hop_limit: 64,
    dgid: gidFromIpv4(peer),
  });
}

async function hostState(verbs: FakeVerbs, g: TestGuest, handle: number): Promise<number> {
  return (await verbs.queryQp(g.device.qps.get(handle)!.host)).qpState;
}

t.test('RC: the device reports each connection; a rule change reaches its sink and tears both ends down', async (t) => {
  const engine = newEngine();
  const { g: g1, verbs: v1 } = await openDevice(t, engine, 'a1', 'host-1');
  const { g: g2, verbs: v2 } = await openDevice(t, engine, 'a2', 'host-2');
  const make = async (g: TestGuest) => {
    const pd = await g.createPd();
    const cq = await g.createCq();
    return { qp: await g.createQp(pd, cq, cq), cq };
  };
  const e1 = await make(g1);
  const e2 = await make(g2);
  t.same(statusOf(await toRtr(t, g1, e1.qp, A2, e2.qp.qpn)), ['OK', 0]);
  t.same(statusOf(await toRtr(t, g2, e2.qp, A1, e1.qp.qpn)), ['OK', 0]);
  const c1 = engine.connectionsOf('a1');
  t.equal(c1.length, 1, "a1's connection is tracked by the engine");
  t.match(c1[0], { kind: 'RC', local: e1.qp.qpn, guestHandle: e1.qp.handle, peer: { vmId: 'a2', qpn: e2.qp.qpn } }, 'host QPN, guest handle, peer');
  t.equal(c1[0]!.pairedWith, engine.connectionsOf('a2')[0]!.id, 'both ends on this engine are paired');

  // Outstanding receive work to see the flush before the event (spec 11.4).
  const mr = await g1.regMr(await g1.createPd(), 4096, AccessFlag.LOCAL_WRITE);
  t.ok(mr.lkey !== 0);
  engine.apply(withoutRules(), { source: 'rule 10 removed' });
  const [ev1] = await g1.waitEvents(1);
  const [ev2] = await g2.waitEvents(1);
  t.same([ev1!.type, ev1!.handle, ev1!.detail], [EventType.QP_POLICY_TEARDOWN, e1.qp.handle, PolicyReason.RULE_CHANGED], 'a1: QP_POLICY_TEARDOWN, RULE_CHANGED');
  t.same([ev2!.type, ev2!.handle, ev2!.detail], [EventType.QP_POLICY_TEARDOWN, e2.qp.handle, PolicyReason.RULE_CHANGED], 'a2: the same');
  t.equal(await hostState(v1, g1, e1.qp.handle), QpState.ERR, "a1's host QP is in ERR");
  t.equal(await hostState(v2, g2, e2.qp.handle), QpState.ERR, "a2's host QP is in ERR");
  t.equal(g1.device.counters.policyTeardowns, 1, 'counted by the device');
  t.equal(engine.metrics.sinkErrors, 0, 'the sink never threw');

  // The same change applied again finds nothing left to tear down: no second event.
  engine.apply(withoutRules(), { source: 'again' });
  await new Promise((r) => setTimeout(r, 50));
  t.same(g1.readEvents(), [], 'no duplicate event');
  t.same(statusOf(await g1.destroy(Command.DESTROY_QP, e1.qp.handle)), ['OK', 0]);
  t.equal(engine.connectionsOf('a1').length, 0, 'DESTROY_QP forgets the connection');
});

t.test('a policy change between the resolution and RTR: the `teardown` answer ends the connection at once', async (t) => {
  const engine = newEngine();
  // The change lands after the device resolved the destination and before it reports the connection.
  class ChangingResolver extends VpcAddressResolver {
    override resolve(vmId: string, virtualGid: Uint8Array, qpType: number) {
      const r = super.resolve(vmId, virtualGid, qpType);
      engine.apply(withoutRules(), { source: 'concurrent change' });
      return r;
    }
  }
  const { g, verbs } = await openDevice(t, engine, 'a1', 'host-1', new ChangingResolver(engine, 'host-1', new RecordingLogger('vpc')));
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  qp.writeRecv(7n, []);
  t.same(statusOf(await toRtr(t, g, qp, A2, 0x99)), ['OK', 0], 'the transition itself succeeded');
  const events = await g.waitEvents(1);
  t.same(
    events.map((e) => [e.type, e.handle, e.detail]),
    [[EventType.QP_POLICY_TEARDOWN, qp.handle, PolicyReason.RULE_CHANGED]],
    'QP_POLICY_TEARDOWN right away',
  );
  t.equal(await hostState(verbs, g, qp.handle), QpState.ERR, 'host QP in ERR');
  t.equal(engine.connectionsOf('a1').length, 0, 'nothing tracked');
  t.equal(g.device.counters.policyTeardowns, 1);
});

t.test('UD: AHs are reported and forgotten; a revoked AH makes later sends fail with LOC_QP_OP_ERR', async (t) => {
  const engine = newEngine();
  const { g } = await openDevice(t, engine, 'a1', 'host-1');
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq, QpType.UD);
  const ahBody = (peer: string) =>
    CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid: gidFromIpv4(peer) });
  const ah = HandleResponse.decode(await g.ok(Command.CREATE_AH, ahBody(A2))).handle;
  t.match(engine.connectionsOf('a1'), [{ kind: 'UD', local: ah, guestHandle: ah, peer: { vmId: 'a2' } }], 'the AH is tracked');

  const udSteps: [number, Parameters<TestGuest['modifyQp']>[2]][] = [
    [S.STATE | S.PKEY_INDEX | S.PORT | S.QKEY, { qp_state: QpState.INIT, port_num: 1, qkey: 0x11 }],
    [S.STATE, { qp_state: QpState.RTR }],
    [S.STATE | S.SQ_PSN, { qp_state: QpState.RTS }],
  ];
  for (const [mask, attr] of udSteps) t.same(statusOf(await g.modifyQp(qp.handle, mask, attr)), ['OK', 0], `UD to state ${attr.qp_state}`);
  const mr = await g.regMr(pd, 4096, AccessFlag.LOCAL_WRITE);
  const send = (wrId: bigint) =>
    qp.writeSend({ wr_id: wrId, opcode: SendOpcode.SEND, ah_handle: ah, remote_qpn: 0x55, sges: [{ addr: mr.iova, length: 64, lkey: mr.lkey }] });
  send(1n);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [ok] = await cq.waitFor(1);
  t.equal(ok!.status, WcStatus.SUCCESS, 'a send to an allowed AH succeeds');

  engine.apply(withoutRules(), { source: 'rule 10 removed' });
  t.equal(g.device.counters.policyTeardowns, 1, 'the AH is revoked inside the change');
  send(2n);
  await g.ring([{ handle: qp.handle, type: DoorbellType.SQ }]);
  const [bad] = await cq.waitFor(1);
  t.same([bad!.wr_id, bad!.status], [2n, WcStatus.LOC_QP_OP_ERR], 'a send to the revoked AH: LOC_QP_OP_ERR (spec 12.3)');

  engine.apply(policy(policyJson()), { source: 'rule 10 back' });
  const ah2 = HandleResponse.decode(await g.ok(Command.CREATE_AH, ahBody(A2))).handle;
  t.equal(engine.connectionsOf('a1').length, 1, 'only the new AH is tracked (the revoked one was forgotten by the engine)');
  t.same(statusOf(await g.destroy(Command.DESTROY_AH, ah2)), ['OK', 0]);
  t.same(statusOf(await g.destroy(Command.DESTROY_AH, ah)), ['OK', 0]);
  t.equal(engine.connectionsOf('a1').length, 0, 'DESTROY_AH forgets the AH');
});

t.test('reset forgets every connection; close detaches the sink; a stale notice changes nothing', async (t) => {
  const engine = newEngine();
  const { g, verbs } = await openDevice(t, engine, 'a1', 'host-1');
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  t.same(statusOf(await toRtr(t, g, qp, A2, 0x77)), ['OK', 0]);
  const ud = await g.createQp(pd, cq, cq, QpType.UD);
  t.ok(ud.handle > 0);
  await g.ok(
    Command.CREATE_AH,
    CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid: gidFromIpv4(A2) }),
  );
  t.equal(engine.connectionsOf('a1').length, 2, 'an RC connection and an AH');
  g.device.reset();
  await g.device.settled();
  t.equal(engine.connectionsOf('a1').length, 0, 'reset forgets both');
  t.same({ ...verbs.liveObjects(), device: 0 }, { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'no host object left');

  // A notice for a connection the device no longer has is ignored (here: after the reset, re-activated).
  g.activate(ALL_FEATURES);
  const pd2 = await g.createPd();
  const cq2 = await g.createCq();
  const qp2 = await g.createQp(pd2, cq2, cq2);
  t.same(statusOf(await toRtr(t, g, qp2, A2, 0x78)), ['OK', 0]);
  g.postEventBuffers(4);
  engine.apply(withoutRules(), { source: 'rule removed' });
  const [ev] = await g.waitEvents(1);
  t.same([ev!.type, ev!.handle], [EventType.QP_POLICY_TEARDOWN, qp2.handle], 'only the live QP is torn down');

  await g.device.close();
  t.doesNotThrow(() => engine.attach('a1', () => undefined)(), 'after close the VM can be attached again: the device detached');
});
