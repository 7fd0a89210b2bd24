// The `vrdma-backend` command itself on rxe0 with a VPC policy file: two backend processes (a1 and a2, as an
// operator starts them, one per VM), each VM's reference driver over the reference vhost-user front-end on the
// process's socket. RC SEND with bytes verified; the operator's view over --status-socket (and the `status`
// subcommand) lists the connection and the counters; an edit of the policy file tears the connection down in both
// processes (both guests get QP_POLICY_TEARDOWN); after the guests close, `rdma resource show` lists nothing of
// either process, and both exit 0 on SIGTERM.
//
//   bash scripts/rxe/run.sh --timeout 2400 -- npx tap --jobs=1 test/vpc/rxe-backend-cli.test.ts

import t from 'tap';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { EventType, PolicyReason, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, VhostUserTransport } from '../../guest-driver-spec/driver/index.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { queryStatus } from '../../vmm-device/cli/status.ts';
import type { BackendStatus } from '../../vmm-device/vpc/backend.ts';
import { pattern, rdmaResourcesOf, requireTestHost } from '../driver/rxe-helpers.ts';
import { RIG_RAM } from '../driver/harness.ts';
import { until } from './etcd-harness.ts';
import { ALL_ACCESS, rxePolicy } from './vm-rig.ts';

requireTestHost('test/vpc/rxe-backend-cli.test.ts');
const TEST_TIMEOUT_MS = 1_200_000;
t.setTimeout(TEST_TIMEOUT_MS);
/** A backend process compiles the sources with tsx at start: under TCG that takes a while. */
const START_TIMEOUT_MS = 300_000;
const WAIT_MS = 30_000;

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = path.join(root, 'bin/vrdma-backend.js');
const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-rxe-cli-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const host = new SysHost();

interface Backend {
  vm: string;
  child: ChildProcess;
  socket: string;
  status: string;
  stderr: string[];
  exited: Promise<number | null>;
}

function startBackend(vm: string, policy: string): Backend {
  const socket = path.join(dir, `${vm}.sock`);
  const status = path.join(dir, `${vm}.status`);
  const child = spawn(
    process.execPath,
    [bin, '--socket', socket, '--device', 'rxe0', '--vm-id', vm, '--host-id', 'host-1', '--vpc-policy', policy, '--status-socket', status],
    { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const stderr: string[] = [];
  child.stderr!.on('data', (d: Buffer) => stderr.push(d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { vm, child, socket, status, stderr, exited };
}

async function openGuest(b: Backend) {
  const ram = new GuestRam(host, RIG_RAM.map((r) => ({ ...r })));
  const transport = await VhostUserTransport.open({ host, socketPath: b.socket, ram, queues: 3 });
  const ctx = await RdmaContext.open(transport);
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(64);
  const buf = ctx.allocBuffer(64 * 1024);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  const close = async () => {
    await ctx.close().catch(() => undefined);
    await transport.close().catch(() => undefined);
    ram.release();
  };
  return { ctx, pd, cq, buf, mr, close };
}

function statusCommand(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, 'status', ...args], { cwd: root, timeout: START_TIMEOUT_MS }, (err, stdout, stderr) =>
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : -1, stdout, stderr }),
    );
  });
}

t.test('two vrdma-backend processes under one policy file on rxe0', async (t) => {
  const policy = path.join(dir, 'policy.json');
  writeFileSync(policy, JSON.stringify(rxePolicy(), null, 2));
  const backends = [startBackend('a1', policy), startBackend('a2', policy)];
  const guests: Awaited<ReturnType<typeof openGuest>>[] = [];
  try {
    for (const b of backends) {
      await until(() => existsSync(b.socket) && existsSync(b.status), START_TIMEOUT_MS, `${b.vm}'s backend serving (${b.stderr.join('')})`);
    }
    for (const b of backends) guests.push(await openGuest(b));
    const [g1, g2] = guests as [(typeof guests)[0], (typeof guests)[0]];
    const q1 = await g1.ctx.createQp(g1.pd, { type: 'RC', sendCq: g1.cq, recvCq: g1.cq });
    const q2 = await g2.ctx.createQp(g2.pd, { type: 'RC', sendCq: g2.cq, recvCq: g2.cq });
    await q1.connect({ gid: g2.ctx.gid, qpn: q2.qpNum }, { accessFlags: ALL_ACCESS });
    await q2.connect({ gid: g1.ctx.gid, qpn: q1.qpNum }, { accessFlags: ALL_ACCESS });
    const msg = pattern(2048, 21);
    g1.buf.write(0, msg);
    await q2.postRecv([{ wrId: 1n, sgList: [g2.mr.sge(0, 4096)] }]);
    await q1.postSend([{ wrId: 2n, opcode: 'SEND', signaled: true, sgList: [g1.mr.sge(0, 2048)] }]);
    t.match(await g1.cq.waitPoll(1, WAIT_MS), [{ wrId: 2n, status: WcStatus.SUCCESS }]);
    t.match(await g2.cq.waitPoll(1, WAIT_MS), [{ wrId: 1n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 2048 }]);
    t.same(g2.buf.read(0, 2048), msg, 'a1 -> a2 through two backend processes: 2048 bytes byte for byte');

    const s1 = (await queryStatus(backends[0]!.status)) as BackendStatus;
    t.match(s1.vms[0], { vm: 'a1', virtualIp: '172.16.0.1', counters: { allowed: 1 }, connections: [{ kind: 'RC', peerVm: 'a2', rule: 10 }] }, "a1's view: the connection and rule 10");
    t.match(s1.vms[0]!.device!.qps, [{ handle: q1.handle, state: 'RTS', peer: '172.16.0.2' }]);
    t.match(s1.vms[0]!.qos, { rateLimitEnforced: false });

    // The edit reaches both processes; each tears down its own end.
    const edited = rxePolicy(undefined, [{ id: 66, action: 'deny', src: '172.16.0.1', dst: '172.16.0.2', priority: 1 }]);
    writeFileSync(policy + '.tmp', JSON.stringify(edited, null, 2));
    renameSync(policy + '.tmp', policy);
    const [e1, e2] = await Promise.all([
      g1.ctx.driver.waitEvent((e) => e.type === EventType.QP_POLICY_TEARDOWN && e.handle === q1.handle, WAIT_MS),
      g2.ctx.driver.waitEvent((e) => e.type === EventType.QP_POLICY_TEARDOWN && e.handle === q2.handle, WAIT_MS),
    ]);
    t.match(e1, { detail: PolicyReason.RULE_CHANGED }, 'a1 (backend 1) gets QP_POLICY_TEARDOWN');
    t.match(e2, { detail: PolicyReason.RULE_CHANGED }, 'a2 (backend 2) gets QP_POLICY_TEARDOWN');
    const printed = await statusCommand(['--status-socket', backends[1]!.status, '--vm', 'a2']);
    t.equal(printed.code, 0, printed.stderr);
    const s2 = JSON.parse(printed.stdout) as BackendStatus;
    t.match(s2, { policy: { version: 2 }, vms: [{ vm: 'a2', counters: { tornDown: 1 } }] }, "`vrdma-backend status`: a2's teardown counted");
    t.match(s2.vms[0]!.device!.qps, [{ handle: q2.handle, state: 'ERR' }]);
  } finally {
    for (const g of guests) await g.close();
    for (const b of backends) {
      if (b.child.exitCode === null) {
        // The device releases the guest's host objects in the background after the reset the guest's close caused.
        const none = () => Object.values(rdmaResourcesOf(b.child.pid!)).every((n) => n === 0);
        await until(none, WAIT_MS, `${b.vm}'s host objects released`).catch(() => undefined);
        t.same(rdmaResourcesOf(b.child.pid!), { qp: 0, cq: 0, mr: 0, pd: 0 }, `rdma resource show: nothing of ${b.vm}'s backend left after its guest closed`);
        b.child.kill('SIGTERM');
      }
      t.equal(await b.exited, 0, `${b.vm}'s backend exits 0 on SIGTERM`);
    }
  }
});
