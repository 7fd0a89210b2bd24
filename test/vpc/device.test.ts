// The VPC engine behind the real device model (RdmaDevice over FakeVerbs, the guest played by test/rdma's driver
// kit): what the device does today through the AddressResolver interface. Translation to the host GID, the
// tenant's traffic class on the host QP whatever the guest asks, the VPC's Q_Key on the host, identical refusals
// for another VPC's address and a guessed one, and REFUSED_BY_POLICY carrying the rule id.

import t, { type Test } from 'tap';
import { Command, CreateAhRequest, EventType, PolicyReason, QpState, QpAttr, QpAttrMask as S, Status } from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import type { StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { VpcEngine } from '../../vmm-device/vpc/engine.ts';
import { VpcAddressResolver } from '../../vmm-device/vpc/resolver.ts';
import { linkDevice } from '../../vmm-device/vpc/device-link.ts';
import { vpcQkey } from '../../vmm-device/rdma/address-resolver.ts';
import { TestGuest, type Answer } from '../rdma/guest.ts';
import { fixtureJson, gid, valid } from './policy.ts';

const at = (f: string): number => 8 + QpAttr.offsetOf(f); // body offset of the attr field
const RTR = S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER;
const INIT = S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS;

function status(a: Answer): [string, number] {
  return [Object.entries(Status).find(([, v]) => v === a.status)?.[0] ?? String(a.status), a.detail];
}

async function open(t: Test, json = fixtureJson(), engine?: VpcEngine, vmId = 'a1', hostId = 'host-1') {
  const log = new RecordingLogger('vpc');
  if (engine === undefined) {
    engine = new VpcEngine({ log });
    engine.apply(valid(json), { source: 'test' });
  }
  const resolver = new VpcAddressResolver(engine, hostId, log);
  const verbs = new FakeVerbs();
  // TestGuest types its resolver as the static table; the device itself only uses the AddressResolver interface.
  const g = await TestGuest.open({ verbs, vmId, resolver: resolver as unknown as StaticAddressResolver });
  t.teardown(() => g.device.close());
  return { engine, verbs, g, log };
}

t.test('RC through the device: host GID, tenant traffic class, refusals as the spec says', async (t) => {
  const { engine, verbs, g } = await open(t);
  t.same([...g.device.config.gid], [...gid('172.16.0.1')], "the guest's GID is its virtual IP from the policy");
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq);
  t.same(status(await g.modifyQp(qp.handle, INIT, { qp_state: 1, port_num: 1, qp_access_flags: 7 })), ['OK', 0]);
  const good = { qp_state: 2, path_mtu: 1, dest_qp_num: 0x123, rq_psn: 5, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, traffic_class: 0xfc };
  const otherVpc = status(await g.modifyQp(qp.handle, RTR, { ...good, dgid: gid('172.16.0.3') }));
  const guessed = status(await g.modifyQp(qp.handle, RTR, { ...good, dgid: gid('172.16.0.99') }));
  t.same(otherVpc, ['DESTINATION_UNREACHABLE', at('dgid')], "g2's address (globex) from a1 (acme)");
  t.same(guessed, otherVpc, 'a guessed address gets the very same answer');
  t.match(engine.countersOfVm('a1'), { unreachable: 2, otherVpc: 1, unknownDestination: 1 }, 'counted apart for the operator');
  t.same(status(await g.modifyQp(qp.handle, RTR, { ...good, dgid: gid('172.16.0.2') })), ['OK', 0], 'a1 -> a2, same VPC');
  const host = await verbs.queryQp(g.device.qps.get(qp.handle)!.host);
  t.same([...host.ahAttr.grh!.dgid], [...gid('10.0.0.2')], "a2's host GID is programmed, never the virtual one");
  t.equal(host.ahAttr.grh!.trafficClass, 26 << 2, "acme's class, not the guest's 0xfc");

  const j = fixtureJson();
  j.vpcs[0].rules.unshift({ id: 55, action: 'deny', src: '172.16.0.1', dst: '172.16.0.2', qpTypes: ['RC'], priority: 1 });
  engine.apply(valid(j), { source: 'deny rule 55' });
  const qp2 = await g.createQp(pd, cq, cq);
  await g.modifyQp(qp2.handle, INIT, { qp_state: 1, port_num: 1, qp_access_flags: 7 });
  t.same(status(await g.modifyQp(qp2.handle, RTR, { ...good, dgid: gid('172.16.0.2') })), ['REFUSED_BY_POLICY', 55], 'the rule id is the detail');
  t.equal(engine.countersOfVm('a1').refusedByRule, 1);
});

t.test("UD through the device: the VPC's Q_Key on the host, AH to a same-VPC address only", async (t) => {
  const { g, verbs } = await open(t);
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = await g.createQp(pd, cq, cq, 4);
  t.same(status(await g.modifyQp(qp.handle, S.STATE | S.PKEY_INDEX | S.PORT | S.QKEY, { qp_state: 1, port_num: 1, qkey: 0x1111 })), ['OK', 0]);
  const host = await verbs.queryQp(g.device.qps.get(qp.handle)!.host);
  t.equal(host.qkey, vpcQkey('acme-prod'), "acme-prod's Q_Key, whatever the guest wrote");
  const ah = (dgid: Uint8Array) => CreateAhRequest.encode({ pd_handle: pd, flow_label: 0, port_num: 1, sgid_index: 0, hop_limit: 64, traffic_class: 0, sl: 0, dgid });
  t.same(status(await g.cmd(Command.CREATE_AH, ah(gid('172.16.0.2')))), ['OK', 0]);
  const refused = status(await g.cmd(Command.CREATE_AH, ah(gid('172.16.0.3'))));
  t.same(refused[0], 'DESTINATION_UNREACHABLE');
  t.same(status(await g.cmd(Command.CREATE_AH, ah(gid('172.16.0.77')))), refused, 'same answer for a guessed address');
});

t.test('a rule change moves both ends\' QPs to ERR with QP_POLICY_TEARDOWN (the device\'s own connection table)', async (t) => {
  const { engine, g: g1, verbs: v1, log } = await open(t);
  const { g: g2, verbs: v2 } = await open(t, undefined, engine, 'a2', 'host-2');
  const link1 = linkDevice(engine, g1.device, log);
  const link2 = linkDevice(engine, g2.device, log);
  const connect = async (g: TestGuest, peer: string, destQpn: number) => {
    const pd = await g.createPd();
    const cq = await g.createCq();
    const qp = await g.createQp(pd, cq, cq);
    await g.modifyQp(qp.handle, INIT, { qp_state: 1, port_num: 1, qp_access_flags: 7 });
    const good = { qp_state: 2, path_mtu: 1, dest_qp_num: destQpn, rq_psn: 5, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, dgid: gid(peer) };
    t.same(status(await g.modifyQp(qp.handle, RTR, good)), ['OK', 0], `${g.device.vmId} RTR to ${peer}`);
    g.postEventBuffers(4);
    return qp;
  };
  const q1 = await connect(g1, '172.16.0.2', 0x200);
  const q2 = await connect(g2, '172.16.0.1', q1.qpn);
  const j = fixtureJson();
  j.tenants[1].qos.dscp = 11;
  engine.apply(valid(j), { source: 'globex change' });
  await Promise.all([link1.settled(), link2.settled()]);
  t.same([g1.readEvents().length, g2.readEvents().length], [0, 0], 'a change that keeps the connection legal tears nothing down');
  j.vpcs[0].rules = [];
  engine.apply(valid(j), { source: 'rule 10 removed' });
  await Promise.all([link1.settled(), link2.settled()]);
  const [e1] = await g1.waitEvents(1);
  const [e2] = await g2.waitEvents(1);
  t.same([e1!.type, e1!.handle, e1!.detail], [EventType.QP_POLICY_TEARDOWN, q1.handle, PolicyReason.RULE_CHANGED], 'a1 sees the event');
  t.same([e2!.type, e2!.handle, e2!.detail], [EventType.QP_POLICY_TEARDOWN, q2.handle, PolicyReason.RULE_CHANGED], 'a2 sees the event');
  t.equal((await v1.queryQp(g1.device.qps.get(q1.handle)!.host)).qpState, QpState.ERR, "a1's host QP is in ERR");
  t.equal((await v2.queryQp(g2.device.qps.get(q2.handle)!.host)).qpState, QpState.ERR, "a2's host QP is in ERR");
  t.comment(`change -> QP in ERR and event queued: a1 ${link1.lastLatencyMs.toFixed(2)} ms, a2 ${link2.lastLatencyMs.toFixed(2)} ms`);
  t.ok(link1.lastLatencyMs < 100 && link2.lastLatencyMs < 100, 'within 100 ms of the change');
  t.equal(engine.countersOfVpc('acme-prod').tornDown, 2);
  const q3 = await g1.createQp(await g1.createPd(), await g1.createCq(), await g1.createCq());
  await g1.modifyQp(q3.handle, INIT, { qp_state: 1, port_num: 1, qp_access_flags: 7 });
  const again = { qp_state: 2, path_mtu: 1, dest_qp_num: q2.qpn, rq_psn: 5, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, dgid: gid('172.16.0.2') };
  t.same(status(await g1.modifyQp(q3.handle, RTR, again)), ['REFUSED_BY_POLICY', 0], 'a new attempt is refused (the default, rule 0)');
  link1.detach();
  link2.detach();
});
