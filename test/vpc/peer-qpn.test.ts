// Issue 12 item 1, the cross-tenant write: a VM of VPC blue names, at MODIFY_QP to RTR, the wire QPN of a VM of VPC
// red on the same host (the dgid is an address blue may reach). Before the connect-time QPN check the device moved
// the host QP to RTR and the RDMA WRITE landed in red's MR (the host QP accepts packets from any QP of the host its
// address vector names). Now the device checks, in the QPN registry the backends of a host share, that the QPN
// belongs to the VM the dgid resolved to and (RC) is unconnected or connected back to this QP; else
// DESTINATION_UNREACHABLE at dest_qp_num (spec 12.3). Three VMs on one host (one FakeVerbs: one QPN space), with
// the static table and with the VPC policy; the registry across processes is the host directory (a second process
// publishes into it, then dies: its records go with it).

import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Command, QpAttr, QpAttrMask as S, QpState, Status } from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { StaticAddressResolver, gidFromIpv4, gidKey } from '../../vmm-device/rdma/address-resolver.ts';
import { MemoryQpRegistry, judgePeerQp, type QpRegistry } from '../../vmm-device/rdma/qp-ownership.ts';
import { DirQpRegistry } from '../../vmm-device/rdma/qp-registry-dir.ts';
import { VpcEngine } from '../../vmm-device/vpc/engine.ts';
import { VpcAddressResolver } from '../../vmm-device/vpc/resolver.ts';
import { TABLE, TestGuest, type Answer, type GuestQp } from '../rdma/guest.ts';
import { fixtureJson, valid } from './policy.ts';

const DEST_QPN_DETAIL = 8 + QpAttr.offsetOf('dest_qp_num');
const INIT = S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS;
const RTR = S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER;
const HOST = gidKey(gidFromIpv4('10.0.0.1'));

function status(a: Answer): [string, number] {
  return [Object.entries(Status).find(([, v]) => v === a.status)?.[0] ?? String(a.status), a.detail];
}

async function vm(t: Test, verbs: FakeVerbs, resolver: unknown, vmId: string) {
  const g = await TestGuest.open({ verbs, vmId, resolver: resolver as StaticAddressResolver });
  t.teardown(() => g.device.close());
  const pd = await g.createPd();
  const cq = await g.createCq();
  const qp = async (): Promise<GuestQp> => {
    const q = await g.createQp(pd, cq, cq);
    t.same(status(await g.modifyQp(q.handle, INIT, { qp_state: QpState.INIT, port_num: 1, qp_access_flags: 7 })), ['OK', 0]);
    return q;
  };
  return { g, qp };
}

function rtr(g: TestGuest, q: GuestQp, peerIp: string, destQpn: number): Promise<Answer> {
  return g.modifyQp(q.handle, RTR, { qp_state: QpState.RTR, path_mtu: 1, dest_qp_num: destQpn, rq_psn: 0, max_dest_rd_atomic: 1, min_rnr_timer: 12, hop_limit: 64, dgid: gidFromIpv4(peerIp) });
}

function staticResolver(registry: QpRegistry): StaticAddressResolver {
  const r = new StaticAddressResolver(TABLE);
  r.useQpRegistry(registry);
  return r;
}

t.test('static table: blue names red\'s QPN through a blue address and is refused; the genuine pair connects', async (t) => {
  const verbs = new FakeVerbs();
  const registry = new MemoryQpRegistry();
  // One resolver per backend, as in production (each process builds its own from the same table).
  const a = await vm(t, verbs, staticResolver(registry), 'vm-a'); // blue 192.168.7.1
  const b = await vm(t, verbs, staticResolver(registry), 'vm-b'); // blue 192.168.7.2
  const c = await vm(t, verbs, staticResolver(registry), 'vm-c'); // red  192.168.7.3
  const qa = await a.qp();
  const qb = await b.qp();
  const qc = await c.qp();
  t.not(qc.qpn, qb.qpn);

  // The attack of issue 12: vm-b's address (reachable), vm-c's QPN.
  t.same(status(await rtr(a.g, qa, '192.168.7.2', qc.qpn)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], "red's QPN behind a blue address");
  t.equal(a.g.device.qps.get(qa.handle)!.state, QpState.INIT, 'the QP stays in INIT');
  t.equal((await verbs.queryQp(a.g.device.qps.get(qa.handle)!.host)).qpState, QpState.INIT, 'the host QP was never moved to RTR');
  t.same(status(await rtr(a.g, qa, '192.168.7.2', 0xabcde)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], 'a QPN nobody owns: the same answer');
  t.same(status(await rtr(a.g, qa, '192.168.7.2', qa.qpn)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], "its own QPN is not vm-b's");

  // The genuine pair: a -> b while b is unconnected, then b -> a (connected back).
  t.same(status(await rtr(a.g, qa, '192.168.7.2', qb.qpn)), ['OK', 0], 'vm-a -> vm-b: the QPN is vm-b\'s and unconnected');
  t.same(status(await rtr(b.g, qb, '192.168.7.1', qa.qpn)), ['OK', 0], 'vm-b -> vm-a: connected back');
  t.same(await registry.lookup(HOST, qb.qpn), { vm: 'vm-b', peer: { vm: 'vm-a', qpn: qa.qpn } }, 'the registry holds the connection');

  // A second QP of vm-a cannot join vm-b's QP, which is connected to another one.
  const qa2 = await a.qp();
  t.same(status(await rtr(a.g, qa2, '192.168.7.2', qb.qpn)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], 'connected elsewhere');
  t.match((a.g.device.resolver as StaticAddressResolver).ownership!.counters, { checked: 5, notOwner: 3, connectedElsewhere: 1, unverifiable: 0 });

  // Destroyed QPs leave the registry (and red's QPN is no longer anybody's).
  t.same(status(await c.g.destroy(Command.DESTROY_QP, qc.handle)), ['OK', 0]);
  t.equal(await registry.lookup(HOST, qc.qpn), undefined, 'DESTROY_QP withdrew it');
  await c.g.device.close();
  t.equal(registry.size, 3, 'vm-a and vm-b keep theirs; nothing of vm-c is left');
});

t.test('VPC policy: the same check through the engine (a1 -> a2 allowed, g1 in another VPC on the same host)', async (t) => {
  const json = fixtureJson();
  for (const v of json.vms) v.host = 'host-1'; // every VM on one host: the case of the issue
  const engine = new VpcEngine({ log: new RecordingLogger('vpc') });
  engine.apply(valid(json), { source: 'test' });
  const registry = new MemoryQpRegistry();
  const resolver = () => {
    const r = new VpcAddressResolver(engine, 'host-1', new RecordingLogger('vpc'));
    r.useQpRegistry(registry);
    return r;
  };
  const verbs = new FakeVerbs();
  // One engine for the three devices would refuse a second attach per VM only; each device gets its resolver.
  const a1 = await vm(t, verbs, resolver(), 'a1');
  const a2 = await vm(t, verbs, resolver(), 'a2');
  const g1 = await vm(t, verbs, resolver(), 'g1');
  const q1 = await a1.qp();
  const q2 = await a2.qp();
  const qg = await g1.qp();
  t.same(status(await rtr(a1.g, q1, '172.16.0.2', qg.qpn)), ['DESTINATION_UNREACHABLE', DEST_QPN_DETAIL], "globex's QPN behind acme's a2");
  t.same(status(await rtr(a1.g, q1, '172.16.0.2', q2.qpn)), ['OK', 0]);
  t.same(status(await rtr(a2.g, q2, '172.16.0.1', q1.qpn)), ['OK', 0]);
});

t.test('the host directory: records of another backend process are seen, and vanish when it dies', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-qpn-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const registry = new DirQpRegistry(dir);
  registry.announceHost(HOST);
  // Another backend (red's vm-c) publishes its QP 0x5001, connected to nothing, and stays alive until told.
  const script = `
    const { DirQpRegistry } = await import(${JSON.stringify(path.resolve('vmm-device/rdma/qp-registry-dir.ts'))});
    const r = new DirQpRegistry(${JSON.stringify(dir)});
    r.created(${JSON.stringify(HOST)}, 0x5001, 'vm-c');
    r.created(${JSON.stringify(HOST)}, 0x5002, 'vm-b');
    process.stdout.write('published\\n');
    process.stdin.resume();
    process.stdin.on('end', () => process.exit(0));`;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.teardown(() => child.kill('SIGKILL'));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => d.toString().includes('published') && resolve());
    child.on('exit', (code) => reject(new Error(`publisher exited ${code}`)));
  });
  t.same(await registry.lookup(HOST, 0x5001), { vm: 'vm-c' }, "the other process's record");
  t.same(judgePeerQp(await registry.lookup(HOST, 0x5001), { vm: 'vm-a', qpn: 0x101 }, 'vm-b'), { ok: false, why: 'not-owner' });
  t.same(judgePeerQp(await registry.lookup(HOST, 0x5002), { vm: 'vm-a', qpn: 0x101 }, 'vm-b'), { ok: true });
  t.equal(await registry.lookup(gidKey(gidFromIpv4('10.9.9.9')), 1), 'unverifiable', 'a host that does not publish here');
  const exited = new Promise((r) => child.on('exit', r));
  child.kill('SIGKILL');
  await exited;
  t.equal(await registry.lookup(HOST, 0x5001), undefined, 'its backend died: the record is stale and reads as absent');
});
