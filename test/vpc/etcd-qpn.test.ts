// Issue 12 item 1 across hosts: the wire QPN registry in etcd (etcd-qp-registry.ts) on a real etcd member. Two
// backends on two hosts, each with its own engine, host directory and etcd registry (as `vrdma-backend --vpc-etcd`
// builds them): a2 on host-2 naming, behind a1's address on host-1, the QPN of globex's g1 on host-1 is refused;
// a1's own QPN connects. Records carry the connection, leave at DESTROY_QP, and all of a backend's leave at once
// when its lease is revoked; with etcd unreachable a remote QPN is refused, never allowed unchecked.

import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Command, QpAttr, QpAttrMask as S, QpState, Status } from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { gidFromIpv4, gidKey, type StaticAddressResolver } from '../../vmm-device/rdma/address-resolver.ts';
import { ChainedQpRegistry } from '../../vmm-device/rdma/qp-ownership.ts';
import { DirQpRegistry } from '../../vmm-device/rdma/qp-registry-dir.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { EtcdQpRegistry } from '../../vmm-device/vpc/etcd-qp-registry.ts';
import { VpcEngine } from '../../vmm-device/vpc/engine.ts';
import { VpcAddressResolver } from '../../vmm-device/vpc/resolver.ts';
import { TestGuest, type Answer, type GuestQp } from '../rdma/guest.ts';
import { EtcdCluster } from './etcd-harness.ts';
import { fixtureJson, valid } from './policy.ts';

const DEST_QPN_DETAIL = 8 + QpAttr.offsetOf('dest_qp_num');
const INIT = S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS;
const RTR = S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER;
const HOST1 = gidKey(gidFromIpv4('10.0.0.1'));

function status(a: Answer): [string, number] {
  return [Object.entries(Status).find(([, v]) => v === a.status)?.[0] ?? String(a.status), a.detail];
}

const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-etcd-qpn-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/** One backend: its own engine, host directory, etcd registry (a lease), device over its own host verbs. */
async function backend(t: Test, endpoints: string[], vmId: string, hostId: string, hostIp: string, verbs: FakeVerbs) {
  const log = new RecordingLogger(vmId);
  const engine = new VpcEngine({ log });
  engine.apply(valid(fixtureJson()), { source: 'test' });
  const hostDir = path.join(dir, hostId);
  const local = new DirQpRegistry(hostDir);
  local.announceHost(gidKey(gidFromIpv4(hostIp)));
  const remote = new EtcdQpRegistry({ client: new EtcdClient({ endpoints, log, requestTimeoutMs: 2000 }), log, graceMs: 300 });
  await remote.start();
  t.teardown(() => remote.stop());
  const resolver = new VpcAddressResolver(engine, hostId, log);
  resolver.useQpRegistry(new ChainedQpRegistry([local, remote]));
  const g = await TestGuest.open({ verbs, vmId, resolver: resolver as unknown as StaticAddressResolver });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = async (): Promise<GuestQp> => {
    const q = await g.createQp(pd, cq, cq);
    t.same(status(await g.modifyQp(q.handle, INIT, { qp_state: QpState.INIT, port_num: 1, qp_access_flags: 7 })), ['OK', 0]);
    return q;
  };
  return { g, qp, remote, resolver };
}

function rtr(g: TestGuest, q: GuestQp, peerIp: string, destQpn: number): Promise<Answer> {
  return g.modifyQp(q.handle, RTR, { qp_state: QpState.RTR, path_mtu: 1, dest_qp_num: destQpn, rq_psn: 0, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, dgid: gidFromIpv4(peerIp) });
}

t.test('across hosts through etcd: another tenant\'s QPN refused, the genuine pair connects, records follow the QPs', async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  // a1 and g1 share host-1: one host device, one QPN space.
  const host1 = new FakeVerbs();
  const a1 = await backend(t, cluster.endpoints, 'a1', 'host-1', '10.0.0.1', host1);
  const g1 = await backend(t, cluster.endpoints, 'g1', 'host-1', '10.0.0.1', host1);
  const a2 = await backend(t, cluster.endpoints, 'a2', 'host-2', '10.0.0.2', new FakeVerbs());
  const q1 = await a1.qp();
  const qg = await g1.qp();
  t.not(qg.qpn, q1.qpn);
  const q2 = await a2.qp();
  await a1.remote.settled();
  await g1.remote.settled();

  t.same(status(await rtr(a2.g, q2, '172.16.0.1', qg.qpn)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], "a2 -> a1's address with globex's QPN");
  t.same(status(await rtr(a2.g, q2, '172.16.0.1', q1.qpn)), ['OK', 0], "a2 -> a1's own QPN, read from etcd");
  await a2.remote.settled();
  t.same(status(await rtr(a1.g, q1, '172.16.0.2', q2.qpn)), ['OK', 0], 'a1 -> a2: connected back');
  await a1.remote.settled();
  t.same(await a2.remote.lookup(HOST1, q1.qpn), { vm: 'a1', peer: { vm: 'a2', qpn: q2.qpn } }, 'the record holds the connection');
  t.match(a2.resolver.ownership!.counters, { checked: 2, notOwner: 1, unverifiable: 0 });

  t.same(status(await a1.g.destroy(Command.DESTROY_QP, q1.handle)), ['OK', 0]);
  await a1.remote.settled();
  t.equal(await a2.remote.lookup(HOST1, q1.qpn), undefined, 'DESTROY_QP withdrew it');
  await g1.remote.stop();
  t.equal(await a2.remote.lookup(HOST1, qg.qpn), undefined, "g1's backend stopped: its lease and every record of it are gone");

  await cluster.stop();
  const q3 = await a2.qp();
  t.same(status(await rtr(a2.g, q3, '172.16.0.1', 0x101)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], 'etcd unreachable: refused, never unchecked');
  t.match(a2.resolver.ownership!.counters, { unverifiable: 1 });
});
