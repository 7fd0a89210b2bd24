// The vrdma-backend command with a VPC policy: every bad flag named (exit 2); a VM the policy does not have, or
// places on another host, refused naming the flag; the file control plane wired (address and quotas from the
// policy, an edit of the file taken live) and the etcd one (real etcd on loopback: unreachable said in the log and
// the view, caught up when it returns); the operator's view served on a real Unix socket and printed by the
// `status` subcommand, through plain node and the package's bin.

import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync, renameSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { run } from '../../vmm-device/cli/main.ts';
import { queryStatus } from '../../vmm-device/cli/status.ts';
import type { RdmaDevice } from '../../vmm-device/rdma/rdma-device.ts';
import type { BackendStatus, VpcBackend } from '../../vmm-device/vpc/backend.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { publishPolicy } from '../../vmm-device/vpc/etcd-source.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { EtcdCluster, freePort, until } from '../vpc/etcd-harness.ts';
import { fixtureJson } from '../vpc/policy.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = path.join(root, 'bin/vrdma-backend.js');
const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-cli-vpc-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
/** Longest wait for a reload, an etcd watch, a reconnection on a loaded 2-core machine. */
const WAIT_MS = 30_000;

const sock = path.join(dir, 'vm.sock');
const statusSock = path.join(dir, 'status.sock');
const policyFile = path.join(dir, 'policy.json');
writeFileSync(policyFile, JSON.stringify(fixtureJson(), null, 2));

function binRun(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { cwd: root, timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : -1, stdout, stderr });
    });
  });
}

async function inProcess(args: string[]): Promise<{ code: number; err: string; out: string }> {
  const err: string[] = [];
  const out: string[] = [];
  const code = await run(args, { out: (s) => out.push(s), err: (s) => err.push(s), verbs: async () => new FakeVerbs() });
  return { code, err: err.join(''), out: out.join('') };
}

/** Starts the backend in this process over FakeVerbs; resolves once it serves. */
async function serve(t: Test, args: string[]) {
  const verbs = new FakeVerbs();
  let served: { device: RdmaDevice; vpc: VpcBackend | undefined } | undefined;
  const errors: string[] = [];
  const done = run(['--socket', sock, '--device', 'fake0', ...args], {
    out: () => undefined,
    err: (s) => errors.push(s),
    verbs: async () => verbs,
    onServing: (s) => (served = s),
  });
  let finished = false;
  void done.then(() => (finished = true));
  await until(() => served !== undefined || finished, WAIT_MS, 'backend serving');
  if (served === undefined) throw new Error(`backend exited: ${errors.join('')}`);
  const stop = async () => {
    if (finished) return done;
    process.emit('SIGTERM');
    return done;
  };
  t.teardown(stop);
  return { verbs, device: served.device, vpc: served.vpc!, stop, errors };
}

/** Captures what the backend's StderrLogger writes while `work` runs (the log goes to the process's stderr). */
function captureStderr(): { lines: string[]; restore: () => void } {
  const lines: string[] = [];
  const original = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    lines.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
    return (original as (...a: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stderr.write;
  return { lines, restore: () => (process.stderr.write = original) };
}

t.test('bad VPC flags exit 2 and name the flag', async (t) => {
  const base = ['--socket', sock, '--device', 'rxe0'];
  const vpc = [...base, '--vpc-policy', policyFile, '--vm-id', 'a1', '--host-id', 'host-1'];
  const cases: [string[], RegExp][] = [
    [[...base, '--vpc-policy', path.join(dir, 'none.json'), '--vm-id', 'a1', '--host-id', 'host-1'], /--vpc-policy: no such file/],
    [[...vpc, '--vpc-etcd', 'http://127.0.0.1:2379'], /--vpc-policy and --vpc-etcd exclude each other/],
    [[...vpc, '--virtual-ip', '10.0.0.1'], /--virtual-ip and --vpc-policy exclude each other/],
    [[...vpc, '--gid-table', policyFile], /--gid-table and --vpc-policy exclude each other/],
    [[...vpc, '--max-qp', '4'], /--max-qp and --vpc-policy exclude each other/],
    [[...vpc, '--vpc', 'blue'], /--vpc and --vpc-policy exclude each other/],
    [[...base, '--vpc-policy', policyFile, '--vm-id', 'a1'], /--host-id is required with --vpc-policy/],
    [[...base, '--vpc-policy', policyFile, '--host-id', 'host-1'], /--vm-id is required with --vpc-policy/],
    [[...vpc, '--vpc-prefix', '/p/'], /--vpc-prefix needs --vpc-etcd/],
    [[...base, '--vpc-etcd', 'http://127.0.0.1:2379', '--vm-id', 'a1', '--host-id', 'h', '--vpc-prefix', 'noslash'], /--vpc-prefix must start and end with \//],
    [[...base, '--vpc-etcd', 'etcd:2379', '--vm-id', 'a1', '--host-id', 'h'], /--vpc-etcd: each endpoint must be http:\/\/host:port/],
    [[...base, '--vpc-etcd', 'http://a:1,ftp://b:2', '--vm-id', 'a1', '--host-id', 'h'], /--vpc-etcd: each endpoint must be http:\/\/host:port/],
    [[...base, '--virtual-ip', '10.0.0.1', '--host-id', 'host-1'], /--host-id needs --vpc-policy or --vpc-etcd/],
    [[...vpc, '--status-socket', '/nonexistent-dir/s.sock'], /--status-socket: its folder does not exist/],
    [[...vpc, '--host-id', 'bad id'], /--host-id must be/],
    [[...base, '--vpc-policy'], /--vpc-policy/],
  ];
  for (const [args, re] of cases) {
    const r = await inProcess(args);
    t.equal(r.code, 2, `exit 2: ${args.slice(4).join(' ')}`);
    t.match(r.err, re, args.slice(4).join(' '));
  }
  const help = await inProcess(['--help']);
  t.match(help.out, /--vpc-policy FILE[\s\S]*--vpc-etcd URLS[\s\S]*--host-id ID[\s\S]*--status-socket PATH[\s\S]*vrdma-backend status/);
  const statusUsage = await inProcess(['status']);
  t.equal(statusUsage.code, 2);
  t.match(statusUsage.err, /--status-socket is required/);
});

t.test('the policy must have the VM, on this host; an invalid file names the field', async (t) => {
  const notThere = await inProcess(['--socket', sock, '--device', 'fake0', '--vpc-policy', policyFile, '--vm-id', 'zz', '--host-id', 'host-1']);
  t.equal(notThere.code, 1);
  t.match(notThere.err, /--vm-id zz: no such VM in the VPC policy/);
  const elsewhere = await inProcess(['--socket', sock, '--device', 'fake0', '--vpc-policy', policyFile, '--vm-id', 'a2', '--host-id', 'host-1']);
  t.equal(elsewhere.code, 1);
  t.match(elsewhere.err, /--host-id host-1: the VPC policy places VM a2 on host host-2/);
  const bad = path.join(dir, 'bad.json');
  const j = fixtureJson();
  j.vpcs[1].rules[0].src = '10.0.0/24';
  writeFileSync(bad, JSON.stringify(j));
  const invalid = await inProcess(['--socket', sock, '--device', 'fake0', '--vpc-policy', bad, '--vm-id', 'a1', '--host-id', 'host-1']);
  t.equal(invalid.code, 1);
  t.match(invalid.err, /vpcs\[1\]\.rules\[0\]\.src/);
});

t.test('file control plane: address and quotas from the policy, an edit taken live, the view on the socket', async (t) => {
  const b = await serve(t, ['--vpc-policy', policyFile, '--vm-id', 'a1', '--host-id', 'host-1', '--status-socket', statusSock, '--log-level', 'warn']);
  t.same([...b.device.config.gid.subarray(12)], [172, 16, 0, 1], "the guest's GID is a1's virtual IP from the policy");
  t.equal(b.device.config.max_qp, 8, 'max_qp from defaultQuotas.qps');
  t.equal(b.device.config.max_pd, 4, 'max_pd from defaultQuotas.pds');
  t.equal(b.device.config.max_mr_size, 1048576n, 'registered bytes from defaultQuotas.mrBytes');

  const s = (await queryStatus(statusSock)) as BackendStatus;
  t.equal(s.host, 'host-1');
  t.equal(s.controlPlane.kind, 'file');
  t.equal(s.policy.version, 1);
  t.equal(s.vms.length, 1);
  t.match(s.vms[0], { vm: 'a1', tenant: 'acme', vpc: 'acme-prod', virtualIp: '172.16.0.1', qos: { dscp: 26, trafficClass: 104, rateLimitMbps: 10000, rateLimitEnforced: false } });
  t.match(s.vms[0]!.quotas, { qps: { limit: 8 }, pds: { limit: 4 } });
  t.same(s.vms[0]!.device!.resources, { pds: 0, cqs: 0, qps: 0, mrs: 0, ahs: 0, mrBytes: 0 });
  t.match(s.qosEnforcement, /NOT enforced/);
  t.ok(s.vpcs['acme-prod'], 'per-VPC counters');

  // The `status` subcommand, a real process over the real socket.
  const printed = await binRun(['status', '--status-socket', statusSock, '--vm', 'a1']);
  t.equal(printed.code, 0, printed.stderr);
  t.match(JSON.parse(printed.stdout), { host: 'host-1', vms: [{ vm: 'a1', qos: { rateLimitEnforced: false } }] });
  const unknownVm = await binRun(['status', '--status-socket', statusSock, '--vm', 'zz']);
  t.equal(unknownVm.code, 1);
  t.match(unknownVm.stderr, /--vm zz: not in this backend's policy/);

  // Bad requests on the socket: answered with an error, counted, the backend keeps serving.
  const raw = await new Promise<string>((resolve, reject) => {
    const c = net.createConnection(statusSock);
    let buf = '';
    c.on('connect', () => c.write('not json\n'));
    c.on('data', (d) => (buf += d.toString()));
    c.on('end', () => resolve(buf));
    c.on('error', reject);
  });
  t.match(JSON.parse(raw), { error: /not JSON/ });

  // An edit of the file (replaced by rename, as editors do) is in force without a restart.
  const j = fixtureJson();
  j.tenants[0].qos.dscp = 34;
  writeFileSync(policyFile + '.tmp', JSON.stringify(j));
  renameSync(policyFile + '.tmp', policyFile);
  await until(() => b.vpc.engine.metrics.policyVersion === 2, WAIT_MS, 'the edited file in force');
  const after = (await queryStatus(statusSock, 'a1')) as BackendStatus;
  t.match(after.vms[0]!.qos, { dscp: 34, trafficClass: 136 }, "the tenant's new class");
  t.equal(after.policy.version, 2);

  t.equal(await b.stop(), 0, 'exit 0 on SIGTERM');
  t.notOk(existsSync(statusSock), 'the status socket is removed');
  t.same(b.verbs.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'nothing left on the host');
  writeFileSync(policyFile, JSON.stringify(fixtureJson(), null, 2));
});

t.test('etcd control plane: policy from etcd, unreachable said in the log and the view, caught up on return', async (t) => {
  const cluster = await EtcdCluster.start(1);
  t.teardown(() => cluster.stop());
  const writer = new EtcdClient({ endpoints: cluster.endpoints, log: new RecordingLogger('writer') });
  const prefix = '/test/cli/';
  await publishPolicy(writer, prefix, fixtureJson());
  const cap = captureStderr();
  t.teardown(cap.restore);
  const b = await serve(t, ['--vpc-etcd', cluster.endpoints.join(','), '--vpc-prefix', prefix, '--vm-id', 'g1', '--host-id', 'host-1', '--status-socket', statusSock]);
  t.same([...b.device.config.mac], [0x02, 0x42, 0xac, 0x10, 0x00, 0x01], "g1's MAC from the policy in etcd");
  let s = (await queryStatus(statusSock)) as BackendStatus;
  t.match(s.controlPlane, { kind: 'etcd', metrics: { connected: true, disconnects: 0 } });
  t.match(s.vms[0], { vm: 'g1', vpc: 'globex-net', qos: { dscp: 10 } });

  await cluster.members[0]!.kill();
  await until(() => b.vpc.etcd!.metrics.connected === false, WAIT_MS, 'etcd seen unreachable');
  s = (await queryStatus(statusSock)) as BackendStatus;
  t.match(s.controlPlane.metrics, { connected: false, disconnects: 1 }, 'the view says etcd is unreachable');
  t.ok((s.controlPlane.metrics as { unreachableSince: string | null }).unreachableSince !== null, 'since when');
  t.equal(s.policy.version, 1, 'the last known policy stays in force');
  t.match(cap.lines.join(''), /etcd unreachable: enforcing the last known policy/, 'the log says so');

  cluster.members[0]!.start();
  await cluster.members[0]!.waitHealthy();
  const j = fixtureJson();
  j.tenants[1].qos.dscp = 12;
  await until(() => b.vpc.etcd!.metrics.connected, WAIT_MS, 'etcd reachable again');
  await publishPolicy(writer, prefix, j);
  await until(() => b.vpc.engine.describeVm('g1')?.qos.dscp === 12, WAIT_MS, 'the change after the return applied');
  s = (await queryStatus(statusSock)) as BackendStatus;
  t.match(s.controlPlane.metrics, { connected: true, catchUps: 1 });
  t.match(cap.lines.join(''), /etcd reachable again: catching up/);
  cap.restore();
  t.equal(await b.stop(), 0);
  t.same(b.verbs.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 });
});

t.test('etcd unreachable at start: the log says so, the backend waits, SIGTERM ends it cleanly', async (t) => {
  const cap = captureStderr();
  t.teardown(cap.restore);
  const port = await freePort(); // nothing listens there
  const errors: string[] = [];
  const waitingSock = path.join(dir, 'waiting.sock');
  const done = run(['--socket', waitingSock, '--device', 'fake0', '--vpc-etcd', `http://127.0.0.1:${port}`, '--vm-id', 'a1', '--host-id', 'host-1'], {
    out: () => undefined,
    err: (s) => errors.push(s),
    verbs: async () => new FakeVerbs(),
  });
  await until(() => /etcd unreachable: no policy yet/.test(cap.lines.join('')), WAIT_MS, 'the unreachable log line');
  t.notOk(existsSync(waitingSock), 'nothing served without a policy');
  process.emit('SIGTERM');
  t.equal(await done, 0, 'a requested shutdown while waiting exits 0');
  t.same(errors, [], 'no error printed for it');
  cap.restore();
});
