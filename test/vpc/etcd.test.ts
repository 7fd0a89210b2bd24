// The etcd control plane against real etcd (Debian's etcd-server) on loopback: watch-driven updates with teardown,
// an invalid state refused, etcd killed (last state enforced, metric and log) and restarted (catch-up), a backend
// cut off while writers go on (catch-up by re-reading with the revision), and a three-member cluster with one
// member killed (updates continue).

import t, { type Test } from 'tap';
import { performance } from 'node:perf_hooks';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { VpcEngine, type TeardownNotice } from '../../vmm-device/vpc/engine.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { EtcdPolicySource, publishPolicy } from '../../vmm-device/vpc/etcd-source.ts';
import { CuttableProxy, EtcdCluster, until } from './etcd-harness.ts';
import { fixtureJson, gid } from './policy.ts';

const PREFIX = '/vrdma/vpc/';
/** Longest wait for a pushed change or a reconnection (etcd elections on a loaded 2-core machine). */
const WAIT_MS = 20_000;
const HEALTH_MS = 200;

function backend(t: Test, endpoints: string[], hostId: string) {
  const log = new RecordingLogger(hostId);
  const engine = new VpcEngine({ log });
  const client = new EtcdClient({ endpoints, log, requestTimeoutMs: 2000 });
  const source = new EtcdPolicySource({ client, prefix: PREFIX, engine, log, healthIntervalMs: HEALTH_MS });
  const seen: (TeardownNotice & { vm: string })[] = [];
  for (const vm of ['a1', 'a2', 'g1', 'g2']) engine.attach(vm, (n) => seen.push({ ...n, vm }));
  source.start();
  t.teardown(() => source.stop());
  return { log, engine, client, source, seen };
}

const connectA1A2 = (engine: VpcEngine): boolean =>
  engine.track('a1', { kind: 'RC', local: 100, guestHandle: 1, peerGid: gid('172.16.0.2'), peerQpn: 200 }).ok &&
  engine.track('a2', { kind: 'RC', local: 200, guestHandle: 1, peerGid: gid('172.16.0.1'), peerQpn: 100 }).ok;

t.test('one member: watch-driven updates, an invalid state refused, killed and restarted', async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log: new RecordingLogger('writer') });
  await publishPolicy(writer, PREFIX, fixtureJson());
  const host1 = backend(t, cluster.endpoints, 'host-1');
  const host2 = backend(t, cluster.endpoints, 'host-2');
  await Promise.all([host1.source.ready, host2.source.ready]);
  t.ok(host1.engine.resolve('a1', gid('172.16.0.2'), 'RC').ok, 'the policy from etcd is in force');
  t.ok(host1.source.metrics.connected);

  // a1 on host-1 and a2 on host-2, each backend tracks its own end.
  t.ok(host1.engine.track('a1', { kind: 'RC', local: 100, guestHandle: 1, peerGid: gid('172.16.0.2'), peerQpn: 200 }).ok);
  t.ok(host2.engine.track('a2', { kind: 'RC', local: 200, guestHandle: 1, peerGid: gid('172.16.0.1'), peerQpn: 100 }).ok);
  const j = fixtureJson();
  j.vpcs[0].rules = [];
  const put = performance.now();
  await writer.put(`${PREFIX}vpcs/acme-prod`, JSON.stringify(j.vpcs[0]));
  await until(() => host1.seen.length === 1 && host2.seen.length === 1, WAIT_MS, 'both hosts to tear their end down');
  const elapsed = performance.now() - put;
  t.same([host1.seen[0]!.vm, host1.seen[0]!.reason, host2.seen[0]!.vm, host2.seen[0]!.reason], ['a1', 'RULE_CHANGED', 'a2', 'RULE_CHANGED'], 'both ends, on both hosts');
  t.comment(`put -> both teardowns (etcd commit, watch push, apply): ${elapsed.toFixed(1)} ms`);
  t.ok(host1.seen[0]!.latencyMs < 100 && host2.seen[0]!.latencyMs < 100, `change reaching each backend -> teardown: ${host1.seen[0]!.latencyMs.toFixed(3)} / ${host2.seen[0]!.latencyMs.toFixed(3)} ms (target 100 ms)`);
  t.match(host1.engine.resolve('a1', gid('172.16.0.2'), 'RC'), { ok: false, refusal: 'refused' }, 'new attempts refused');

  // An invalid part: refused, named by key and field; the state in force stays.
  const bad = structuredClone(j.vpcs[0]);
  bad.rules = [{ id: 1, action: 'allow', src: '172.16.0/24' }];
  const applied = host1.source.metrics.appliedRevision;
  await writer.put(`${PREFIX}vpcs/acme-prod`, JSON.stringify(bad));
  await until(() => host1.source.metrics.rejected === 1, WAIT_MS, 'the invalid state to be refused');
  const line = host1.log.lines.find((l) => l.level === 'error' && l.message.startsWith('etcd policy refused'));
  t.match(line?.message, `key ${PREFIX}vpcs/acme-prod: vpcs[0].rules[0].src: "172.16.0/24" is not a CIDR prefix`);
  t.equal(host1.source.metrics.appliedRevision, applied, 'the last good revision stays in force');
  t.match(host1.engine.resolve('a1', gid('172.16.0.2'), 'RC'), { ok: false, refusal: 'refused' });
  await writer.put(`${PREFIX}vpcs/acme-prod`, JSON.stringify(fixtureJson().vpcs[0]));
  await until(() => host1.engine.resolve('a1', gid('172.16.0.2'), 'RC').ok, WAIT_MS, 'rule 10 back');

  // etcd killed: the backends keep enforcing and say so.
  t.ok(connectA1A2(host1.engine));
  await cluster.members[0]!.kill();
  await until(() => !host1.source.metrics.connected && !host2.source.metrics.connected, WAIT_MS, 'the backends to notice');
  t.ok(host1.source.metrics.disconnects >= 1, `counted: ${host1.source.metrics.disconnects}`);
  t.ok(host1.log.lines.some((l) => l.level === 'warn' && l.message === 'etcd unreachable: enforcing the last known policy'), 'logged');
  t.ok(host1.engine.resolve('a1', gid('172.16.0.2'), 'RC').ok, 'the last known state is enforced: allowed stays allowed');
  t.match(host1.engine.resolve('a1', gid('172.16.0.3'), 'RC'), { ok: false, refusal: 'unreachable' }, 'and refused stays refused');
  t.equal(host1.engine.connectionsOf('a1').length, 1, 'nothing torn down for the outage');

  // etcd back: reconnection, catch-up, and the next change arrives.
  cluster.members[0]!.start();
  await cluster.members[0]!.waitHealthy();
  await until(() => host1.source.metrics.connected && host2.source.metrics.connected, WAIT_MS, 'reconnection');
  t.ok(host1.source.metrics.catchUps >= 1);
  t.ok(host1.log.lines.some((l) => l.message === 'etcd reachable again: catching up'));
  const removed = fixtureJson();
  removed.vms = removed.vms.filter((v: { id: string }) => v.id !== 'a2');
  await publishPolicy(writer, PREFIX, removed);
  await until(() => host1.seen.length === 3, WAIT_MS, 'the teardown after reconnection');
  t.same(host1.seen.slice(1).map((s) => [s.vm, s.reason]).sort(), [['a1', 'PEER_REMOVED'], ['a2', 'PEER_REMOVED']]);
});

t.test('a backend cut off from etcd while writers go on catches up by re-reading with the revision', async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  const proxy = await CuttableProxy.create(cluster.members[0]!.clientPort);
  t.teardown(() => proxy.cut());
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log: new RecordingLogger('writer') });
  await publishPolicy(writer, PREFIX, fixtureJson());
  const host = backend(t, [proxy.url], 'host-1');
  await host.source.ready;
  t.ok(connectA1A2(host.engine));
  await proxy.cut();
  await until(() => !host.source.metrics.connected, WAIT_MS, 'the backend to notice');
  const before = host.source.metrics.revision;
  const j = fixtureJson();
  j.vpcs[0].rules = [];
  j.tenants[1].qos.dscp = 40;
  const revision = await publishPolicy(writer, PREFIX, j);
  t.ok(revision > before);
  await new Promise((r) => setTimeout(r, HEALTH_MS * 3));
  t.equal(host.seen.length, 0, 'a change the backend cannot see changes nothing');
  t.ok(host.engine.resolve('a1', gid('172.16.0.2'), 'RC').ok, 'the last known state is enforced');
  await proxy.restore();
  await until(() => host.source.metrics.connected && host.source.metrics.appliedRevision === revision, WAIT_MS, 'catch-up');
  t.ok(host.source.metrics.catchUps >= 1);
  t.same(host.seen.map((s) => s.reason), ['RULE_CHANGED', 'RULE_CHANGED'], 'the missed change tears down on catch-up');
  t.match(host.engine.resolve('g1', gid('172.16.0.3'), 'RC'), { ok: true, trafficClass: 160 });
});

t.test('three members, one killed: updates continue', async (t) => {
  const cluster = await EtcdCluster.start(3);
  t.teardown(() => cluster.stop());
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log: new RecordingLogger('writer') });
  await publishPolicy(writer, PREFIX, fixtureJson());
  const host1 = backend(t, cluster.endpoints, 'host-1');
  const host2 = backend(t, [...cluster.endpoints].reverse(), 'host-2');
  await Promise.all([host1.source.ready, host2.source.ready]);
  const watched = cluster.members.find((m) => m.url === host1.source.metrics.endpoint)!;
  t.ok(watched, `host-1 watches ${host1.source.metrics.endpoint}`);
  await watched.kill();
  // The writer goes on through the two live members (its client moves past the dead one).
  t.ok(connectA1A2(host1.engine));
  const j = fixtureJson();
  j.vpcs[0].rules = [];
  const put = performance.now();
  await publishPolicy(writer, PREFIX, j);
  await until(() => host1.seen.length === 2, WAIT_MS, 'host-1 to see the change through another member');
  t.comment(`put -> teardown with a member dead: ${(performance.now() - put).toFixed(1)} ms`);
  t.not(host1.source.metrics.endpoint, watched.url, 'host-1 moved to a live member');
  await until(() => host2.engine.resolve('a2', gid('172.16.0.1'), 'RC').ok === false, WAIT_MS, 'host-2 to see it too');
  const k = fixtureJson();
  k.tenants[0].qos.dscp = 30;
  await publishPolicy(writer, PREFIX, k);
  await until(() => {
    const d = host1.engine.resolve('a1', gid('172.16.0.2'), 'RC');
    return d.ok && d.trafficClass === 120;
  }, WAIT_MS, 'a second update');
  t.ok(host1.engine.resolve('a1', gid('172.16.0.3'), 'RC').ok === false, 'enforcement continues');
});
