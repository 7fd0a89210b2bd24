// Issue 15 parts 1 and 2 on a real backend process (over the verbs test double): the reference driver does real
// control requests and RDMA work through the reference vhost-user front-end; /metrics is scraped over HTTP and
// parsed with a Prometheus text-format parser (the values must be what was done); every stderr line is JSON with
// the expected fields, and the burst of work requests logs nothing at info. A non-loopback --metrics is refused
// naming the flag; --log-format human keeps the old lines.

import t from 'tap';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import parse, { type PromFamily } from 'parse-prometheus-text-format';
import { AccessFlag, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { run } from '../../vmm-device/cli/main.ts';
import { queryStatus } from '../../vmm-device/cli/status.ts';
import type { BackendStatus } from '../../vmm-device/vpc/backend.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { publishPolicy } from '../../vmm-device/vpc/etcd-source.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { EtcdCluster } from '../vpc/etcd-harness.ts';
import { openGuest, root, scrape, startBackend, scratchWithTable } from './rig.ts';

const { dir, table } = scratchWithTable(t, 'vrdma-observe-');

function value(fams: PromFamily[], name: string, labels: Record<string, string>): number | undefined {
  const f = fams.find((x) => x.name === name);
  const m = f?.metrics.find((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v));
  return m?.value === undefined ? undefined : Number(m.value);
}

/**
 * One series of a labelled histogram, parsed. parse-prometheus-text-format flattens a histogram family into one
 * series (it knows no labels besides `le`), so the family's lines for `labels` are picked, those labels dropped,
 * and the parser reads them as an unlabelled histogram.
 */
function histogramSeries(text: string, name: string, labels: Record<string, string>): { count: number; sum: number; buckets: Record<string, string> } | undefined {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  const picked: string[] = [];
  for (const l of text.split('\n')) {
    if (l.startsWith(`# HELP ${name} `) || l.startsWith(`# TYPE ${name} `)) picked.push(l);
    else if (l.startsWith(`${name}_`) && want.every((w) => l.includes(w))) {
      let x = l;
      for (const w of want) x = x.replace(w, '');
      picked.push(x.replace(/,+/g, ',').replace('{,', '{').replace(',}', '}').replace('{}', ''));
    }
  }
  const f = parse(picked.join('\n') + '\n').find((x) => x.name === name);
  const m = f?.metrics[0];
  if (m === undefined || m.count === undefined) return undefined;
  return { count: Number(m.count), sum: Number(m.sum), buckets: m.buckets ?? {} };
}

t.test('/metrics of a real backend process after real work; JSON log lines', async (t) => {
  const sock = path.join(dir, 'vm-a.sock');
  const b = startBackend(['--socket', sock, '--device', 'fake0', '--gid-table', table, '--vm-id', 'vm-a', '--metrics', '127.0.0.1:0', '--flight-events', '256']);
  t.teardown(() => b.stop());
  const serving = JSON.parse(await b.line((l) => l.includes('"msg":"serving"'), 'serving line')) as Record<string, unknown>;
  t.match(serving, { level: 'info', component: 'vrdma-backend', msg: 'serving', socket: sock, device: 'fake0', vm: 'vm-a', policy: 'static table' });
  t.type(serving['time'], 'string');
  t.equal(serving['pid'], b.child.pid, 'pid of the backend process');
  const port = Number(String(serving['metrics']).split(':').pop());
  t.ok(port > 0, `metrics on port ${port}`);

  const g = await openGuest(sock);
  const { ctx } = g;
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(64);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 64, maxRecvWr: 16 });
  const buf = ctx.allocBuffer(4096, { placement: 'contiguous' });
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE);
  await t.rejects(ctx.queryGid(1), { name: 'CommandError', statusName: 'INVALID_ARGUMENT' }, 'a refused request');
  await t.rejects(qp.connect({ gid: gidFromIpv4('192.168.7.3'), qpn: 5 }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE' }, 'a GID of another VPC');
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x1234 });

  // A burst of work requests: nothing is logged per work request at info.
  const before = b.lines.length;
  const SENDS = 40;
  for (let i = 0; i < SENDS; i++) await qp.postSend([{ wrId: BigInt(i), opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 64)] }]);
  const wcs = await cq.waitPoll(SENDS, 20_000);
  t.equal(wcs.length, SENDS);
  t.ok(wcs.every((w) => w.status === WcStatus.SUCCESS));
  t.same(b.lines.slice(before), [], `no log line for ${SENDS} work requests`);

  const r = await scrape(port);
  t.equal(r.status, 200);
  t.match(r.type, /^text\/plain; version=0\.0\.4/);
  const fams = parse(r.body);
  const vm = { vm: 'vm-a' };
  t.equal(value(fams, 'vrdma_control_requests_total', { ...vm, command: 'CREATE_PD' }), 1, 'one CREATE_PD');
  t.equal(value(fams, 'vrdma_control_requests_total', { ...vm, command: 'CREATE_QP' }), 1, 'one CREATE_QP');
  t.equal(value(fams, 'vrdma_control_requests_total', { ...vm, command: 'REG_MR' }), 1, 'one REG_MR');
  t.equal(value(fams, 'vrdma_control_errors_total', { ...vm, command: 'QUERY_GID', status: 'INVALID_ARGUMENT' }), 1, 'the refused QUERY_GID');
  t.equal(value(fams, 'vrdma_control_errors_total', { ...vm, command: 'MODIFY_QP', status: 'DESTINATION_UNREACHABLE' }), 1, 'the refused connection');
  t.equal(value(fams, 'vrdma_resources', { ...vm, kind: 'qp' }), 1);
  t.equal(value(fams, 'vrdma_resources', { ...vm, kind: 'mr' }), 1);
  t.equal(value(fams, 'vrdma_registered_bytes', vm), 4096);
  t.ok(value(fams, 'vrdma_completions_written_total', vm)! >= SENDS, 'completions written by the relay data path');
  t.ok(value(fams, 'vrdma_kicks_total', vm)! > 0, 'kicks (the driver suppresses some: fewer than requests)');
  t.ok(value(fams, 'vrdma_vhost_user_messages_total', vm)! >= 10, 'vhost-user messages');
  t.equal(value(fams, 'vrdma_vhost_user_connections_total', vm), 1);
  t.equal(value(fams, 'vrdma_queue_broken', { ...vm, queue: 'control' }), 0);
  t.type(value(fams, 'vrdma_queue_in_flight', { ...vm, queue: 'event' }), 'number', 'event queue depth');
  t.type(value(fams, 'vrdma_queue_in_flight', { ...vm, queue: 'doorbell' }), 'number', 'doorbell queue depth');
  t.equal(fams.find((f) => f.name === 'vrdma_control_request_duration_seconds')?.type, 'HISTOGRAM');
  const createQp = histogramSeries(r.body, 'vrdma_control_request_duration_seconds', { ...vm, command: 'CREATE_QP', status: 'OK' });
  t.equal(createQp?.count, 1, 'CREATE_QP latency observed once');
  t.ok(createQp!.sum > 0, 'with a duration');
  t.equal(createQp!.buckets['+Inf'], '1', 'in the +Inf bucket');
  const refused = histogramSeries(r.body, 'vrdma_control_request_duration_seconds', { ...vm, command: 'QUERY_GID', status: 'INVALID_ARGUMENT' });
  t.equal(refused?.count, 1, 'latency by status');
  const modify = histogramSeries(r.body, 'vrdma_control_request_duration_seconds', { ...vm, command: 'MODIFY_QP', status: 'OK' });
  t.ok(modify!.count >= 3, 'the MODIFY_QPs of the connection (INIT, RTR, RTS)');
  t.ok(fams.some((f) => f.name === 'vrdma_process_resident_memory_bytes'), 'process metrics');
  // The data path per QP: the relay handled the SENDs; the QP is relayed, so no doorbell went through the engine.
  const perQp = { ...vm, qp: String(qp.handle) };
  t.equal(value(fams, 'vrdma_qp_relayed_work_requests_total', perQp), SENDS, 'the relayed SENDs of the QP');
  t.equal(value(fams, 'vrdma_qp_doorbells_total', { ...perQp, result: 'executed' }), 0);
  t.equal(value(fams, 'vrdma_qp_doorbells_total', { ...perQp, result: 'refused' }), 0);
  t.equal(value(fams, 'vrdma_qp_series_omitted', vm), 0);
  for (const name of ['vrdma_queue_map_failures_total', 'vrdma_queue_unmap_failures_total', 'vrdma_queues_mapped_total']) t.equal(value(fams, name, vm), 0, `${name} (no mapping offered)`);

  const notFound = await fetch(`http://127.0.0.1:${port}/other`);
  t.equal(notFound.status, 404);
  const post = await fetch(`http://127.0.0.1:${port}/metrics`, { method: 'POST' });
  t.equal(post.status, 405);

  await qp.destroy();
  const afterDestroy = parse((await scrape(port)).body);
  t.equal(value(afterDestroy, 'vrdma_qp_relayed_work_requests_total', perQp), undefined, 'the destroyed QP\'s series is gone');
  t.equal(value(afterDestroy, 'vrdma_qp_doorbells_total', { ...perQp, result: 'executed' }), undefined);
  await mr.dereg();
  await cq.destroy();
  await pd.dealloc();
  buf.release();
  await g.close();
  t.equal(await b.stop(), 0, 'exit 0 on SIGTERM');

  // Every line the process wrote is one JSON object with the common fields.
  t.ok(b.lines.length >= 3, `${b.lines.length} log lines`);
  for (const l of b.lines) {
    const o = JSON.parse(l) as Record<string, unknown>;
    t.match(o, { level: /^(debug|info|warn|error)$/, time: String, pid: b.child.pid, component: /^vrdma-backend/, msg: String }, l);
  }
  const comps = new Set(b.lines.map((l) => (JSON.parse(l) as { component: string }).component));
  t.ok(comps.has('vrdma-backend/vhost-user'), 'the transport as its own component');
  t.ok([...comps].some((c) => c.startsWith('vrdma-backend/vhost-user/conn0')), 'a child per connection');
  t.ok(b.lines.map((l) => JSON.parse(l) as Record<string, unknown>).some((o) => o['msg'] === 'shutting down' && o['signal'] === 'SIGTERM'), 'fields as keys');
});

t.test('--metrics: loopback unless allowed, HOST:PORT checked, naming the flag', async (t) => {
  const sock = path.join(dir, 'x.sock');
  const base = ['--socket', sock, '--device', 'fake0', '--gid-table', table, '--vm-id', 'vm-a'];
  const cases: [string[], RegExp][] = [
    [[...base, '--metrics', '0.0.0.0:9464'], /--metrics 0\.0\.0\.0: not a loopback address.*--metrics-allow-remote/],
    [[...base, '--metrics', '10.1.2.3:9464'], /--metrics 10\.1\.2\.3: not a loopback address/],
    [[...base, '--metrics', '9464'], /--metrics must be HOST:PORT/],
    [[...base, '--metrics', '[::1]:x'], /--metrics must be HOST:PORT/],
    [[...base, '--metrics', '127.0.0.1:70000'], /--metrics: the port must be 0 to 65535/],
    [[...base, '--metrics-allow-remote'], /--metrics-allow-remote needs --metrics/],
    [[...base, '--log-format', 'xml'], /--log-format must be json or human/],
    [[...base, '--flight-events', 'many'], /--flight-events must be a whole number/],
    [[...base, '--record', '/nonexistent-dir/s.json'], /--record: its folder does not exist/],
    [[...base, '--dump-dir', '/nonexistent-dir'], /--dump-dir: no such folder/],
  ];
  for (const [args, re] of cases) {
    const err: string[] = [];
    const code = await run(args, { out: () => undefined, err: (s) => err.push(s), verbs: async () => new FakeVerbs() });
    t.equal(code, 2, args.slice(6).join(' '));
    t.match(err.join(''), re, args.slice(6).join(' '));
  }
  // Allowed explicitly: served on the address given (0.0.0.0 is the one every host has).
  const b = startBackend([...base, '--metrics', '0.0.0.0:0', '--metrics-allow-remote', '--log-format', 'human']);
  t.teardown(() => b.stop());
  const line = await b.line((l) => /^info vrdma-backend: serving /.test(l), 'the human serving line');
  t.match(line, /socket="[^"]+x\.sock" transport="vhost-user" device="fake0" vm="vm-a" .*metrics="0\.0\.0\.0:\d+"/, 'the human format: key=value');
  const port = Number(/metrics="0\.0\.0\.0:(\d+)"/.exec(line)![1]);
  const r = await scrape(port);
  t.equal(r.status, 200);
  t.equal(await b.stop(), 0);
  t.ok(b.lines.every((l) => /^(debug|info|warn|error) vrdma-backend(\/\S+)?: /.test(l)), 'every line in the human format');
});

t.test('under a VPC policy: the status view counters per VM and per VPC, quota hits, policy reloads', async (t) => {
  const policyFile = path.join(dir, 'policy.json');
  const fixture = JSON.parse(readFileSync(path.join(root, 'fixtures/vpc/two-tenants.json'), 'utf8')) as { tenants: { qos: { dscp: number } }[] };
  writeFileSync(policyFile, JSON.stringify(fixture));
  const sock = path.join(dir, 'a1.sock');
  const statusSock = path.join(dir, 'a1-status.sock');
  const b = startBackend(['--socket', sock, '--device', 'fake0', '--vpc-policy', policyFile, '--vm-id', 'a1', '--host-id', 'host-1', '--metrics', '127.0.0.1:0', '--status-socket', statusSock]);
  t.teardown(() => b.stop());
  const serving = JSON.parse(await b.line((l) => l.includes('"msg":"serving"'), 'serving line')) as { metrics: string };
  const port = Number(serving.metrics.split(':').pop());
  const g = await openGuest(sock);
  const { ctx } = g;
  const pds = [];
  for (let i = 0; i < 4; i++) pds.push(await ctx.allocPd());
  await t.rejects(ctx.allocPd(), { name: 'CommandError', statusName: 'NO_RESOURCES' }, 'the fifth PD: over the pds quota of 4');
  const cq = await ctx.createCq(16);
  const qp = await ctx.createQp(pds[0]!, { type: 'RC', sendCq: cq, recvCq: cq });
  await t.rejects(qp.connect({ gid: gidFromIpv4('172.16.0.9'), qpn: 3 }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE' }, 'no such address in the VPC');
  await qp.connect({ gid: gidFromIpv4('172.16.0.2'), qpn: 0x99 });

  let fams = parse((await scrape(port)).body);
  const a1 = { vm: 'a1', vpc: 'acme-prod' };
  // The metrics are the status view's counters: compare each with the view the status socket serves.
  const view = (await queryStatus(statusSock)) as BackendStatus;
  const vmView = view.vms.find((v) => v.vm === 'a1')!;
  t.ok(vmView.counters.allowed >= 1 && vmView.counters.unreachable >= 1, 'the activity is in the view');
  for (const outcome of ['allowed', 'unreachable', 'unknownDestination', 'otherVpc', 'refusedByRule', 'tornDown'] as const) {
    t.equal(value(fams, 'vrdma_vm_connections_total', { ...a1, outcome }), vmView.counters[outcome], `per VM: ${outcome} as in the view`);
    t.equal(value(fams, 'vrdma_vpc_connections_total', { vpc: 'acme-prod', outcome }), view.vpcs['acme-prod']![outcome], `per VPC: ${outcome} as in the view`);
  }
  t.equal(value(fams, 'vrdma_vm_quota_hits_total', { ...a1, quota: 'pds' }), 1, 'the quota hit');
  t.equal(vmView.counters.quotaHits.pds, 1, '(the view agrees)');
  t.equal(value(fams, 'vrdma_vpc_quota_hits_total', { vpc: 'acme-prod', quota: 'pds' }), view.vpcs['acme-prod']!.quotaHits.pds);
  t.equal(value(fams, 'vrdma_vm_quota', { vm: 'a1', quota: 'pds', of: 'limit' }), 4);
  t.equal(value(fams, 'vrdma_vm_quota', { vm: 'a1', quota: 'pds', of: 'used' }), vmView.quotas.pds.used);
  t.equal(value(fams, 'vrdma_vm_quota', { vm: 'a1', quota: 'qps', of: 'used' }), vmView.quotas.qps.used);
  t.equal(value(fams, 'vrdma_vm_connections', a1), 1, 'one live connection');
  t.equal(value(fams, 'vrdma_policy_version', {}), 1);
  t.equal(value(fams, 'vrdma_policy_reloads_total', {}), 1);
  t.equal(fams.find((f) => f.name === 'vrdma_etcd_connected'), undefined, 'no etcd metrics with a file control plane');

  // A reload: the policy's version and the reload counter move.
  fixture.tenants[0]!.qos.dscp = 34;
  writeFileSync(policyFile + '.tmp', JSON.stringify(fixture));
  renameSync(policyFile + '.tmp', policyFile);
  const deadline = Date.now() + 30_000;
  do {
    await new Promise((r) => setTimeout(r, 100));
    fams = parse((await scrape(port)).body);
  } while (value(fams, 'vrdma_policy_version', {}) !== 2 && Date.now() < deadline);
  t.equal(value(fams, 'vrdma_policy_version', {}), 2, 'the edited policy in force');
  t.equal(value(fams, 'vrdma_policy_reloads_total', {}), 2);
  await qp.destroy();
  await cq.destroy();
  for (const pd of pds) await pd.dealloc();
  await g.close();
  t.equal(await b.stop(), 0);
});

t.test('etcd control plane: connected, revisions, disconnects and catch-ups as gauges and counters', async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log: new RecordingLogger('writer') });
  const prefix = '/test/observe/';
  await publishPolicy(writer, prefix, JSON.parse(readFileSync(path.join(root, 'fixtures/vpc/two-tenants.json'), 'utf8')));
  const sock = path.join(dir, 'g1.sock');
  const b = startBackend(['--socket', sock, '--device', 'fake0', '--vpc-etcd', cluster.endpoints.join(','), '--vpc-prefix', prefix, '--vm-id', 'g1', '--host-id', 'host-1', '--metrics', '127.0.0.1:0']);
  t.teardown(() => b.stop());
  const serving = JSON.parse(await b.line((l) => l.includes('"msg":"serving"'), 'serving line')) as { metrics: string };
  const port = Number(serving.metrics.split(':').pop());
  let fams = parse((await scrape(port)).body);
  t.equal(value(fams, 'vrdma_etcd_connected', {}), 1);
  t.ok(value(fams, 'vrdma_etcd_revision', { of: 'applied' })! > 0, 'the revision in force');
  t.equal(value(fams, 'vrdma_etcd_disconnects_total', {}), 0);
  await cluster.members[0]!.kill();
  const deadline = Date.now() + 30_000;
  do {
    await new Promise((r) => setTimeout(r, 200));
    fams = parse((await scrape(port)).body);
  } while (value(fams, 'vrdma_etcd_connected', {}) !== 0 && Date.now() < deadline);
  t.equal(value(fams, 'vrdma_etcd_connected', {}), 0, 'etcd unreachable');
  t.equal(value(fams, 'vrdma_etcd_disconnects_total', {}), 1);
  t.equal(value(fams, 'vrdma_policy_version', {}), 1, 'the last known policy stays in force');
  t.equal(await b.stop(), 0);
});

t.test('per-QP series are capped per VM (MAX_QP_SERIES_PER_VM), the rest counted as omitted', async (t) => {
  // Reaching the cap through a guest means hundreds of CREATE_QPs; the cap is the metrics' own logic, so a device
  // source listing more live QPs than the cap stands in for the device here.
  const { BackendMetrics, MAX_QP_SERIES_PER_VM } = await import('../../vmm-device/observe/metrics.ts');
  const n = MAX_QP_SERIES_PER_VM + 7;
  const qps = Array.from({ length: n }, (_, i) => ({ handle: n - i, qpNum: 100 + i, mapped: true, relayedWorkRequests: i, doorbellsExecuted: BigInt(2 * i), doorbellsRefused: 1n }));
  const device = { vmId: 'vm-x', counters: { commands: {}, errors: {}, mapFailures: 2, unmapFailures: 1, queuesMapped: 5 }, pds: new Map(), cqs: new Map(), qps: new Map(), mrs: new Map(), ahs: new Map(), mrBytes: 0n, qpCounters: () => qps };
  const m = new BackendMetrics({ devices: () => [{ device: device as never, vpc: 'blue', queues: () => [], server: { counters: { messages: 0, kicks: 0, droppedKicks: 0, interrupts: 0, badMessages: {} } as never, connectionsServed: 0 } }] });
  const fams = parse(await m.text());
  const series = fams.find((f) => f.name === 'vrdma_qp_relayed_work_requests_total')!.metrics;
  t.equal(series.length, MAX_QP_SERIES_PER_VM, 'capped');
  t.equal(value(fams, 'vrdma_qp_series_omitted', { vm: 'vm-x' }), 7);
  t.equal(value(fams, 'vrdma_qp_relayed_work_requests_total', { vm: 'vm-x', qp: '1' }), n - 1, 'lowest handles kept');
  t.equal(value(fams, 'vrdma_qp_relayed_work_requests_total', { vm: 'vm-x', qp: String(n) }), undefined, 'highest handle left out');
  t.equal(value(fams, 'vrdma_qp_doorbells_total', { vm: 'vm-x', qp: '1', result: 'executed' }), 2 * (n - 1));
  t.equal(value(fams, 'vrdma_qp_doorbells_total', { vm: 'vm-x', qp: '1', result: 'refused' }), 1);
  t.equal(fams.find((f) => f.name === 'vrdma_qp_doorbells_total')!.metrics.length, 2 * MAX_QP_SERIES_PER_VM);
  t.equal(value(fams, 'vrdma_queue_map_failures_total', { vm: 'vm-x' }), 2);
  t.equal(value(fams, 'vrdma_queue_unmap_failures_total', { vm: 'vm-x' }), 1);
  t.equal(value(fams, 'vrdma_queues_mapped_total', { vm: 'vm-x' }), 5);
});
