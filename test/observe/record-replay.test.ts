// Issue 15 parts 3 and 4 on a real backend process (over the verbs test double): the flight recorder dumped on
// SIGUSR1, on `vrdma-backend status --dump` and by itself on NEEDS_RESET (a malformed control request), in the
// session format (its `exchange` is a vhost-user exchange fixture); `--record FILE` writes the whole session at
// shutdown, and `npm run fixture -- replay FILE` replays it offline with identical answers. A recording whose
// answer was altered is reported at that answer, and only there.

import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { AccessFlag, Command, CtrlResponseHeader, FeatureBit, Status, encodeRequest } from '../../vmm-device/abi/rdma/index.ts';
import { gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { F_VERSION_1, bit } from '../../vmm-device/abi/virtio.ts';
import { queryStatus } from '../../vmm-device/cli/status.ts';
import { readSessionFixture, type SessionFixture } from '../../vmm-device/observe/recorder.ts';
import { replaySession } from '../../vmm-device/observe/replay.ts';
import { VhostUserFrontend } from '../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { GuestAllocator, SplitRingDriver } from '../../guest-driver-spec/frontend/guest-driver.ts';
import { host, openGuest, root, startBackend, WAIT_MS, scratchWithTable } from './rig.ts';

const { dir, table } = scratchWithTable(t, 'vrdma-record-');

function fileOf(line: string): string {
  return (JSON.parse(line) as { file: string }).file;
}

function tsx(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', ...args], { cwd: root, timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : -1, stdout, stderr });
    });
  });
}

t.test('a session recorded, dumped on demand, replayed offline with identical answers', async (t) => {
  const sock = path.join(dir, 'vm-a.sock');
  const statusSock = path.join(dir, 'status.sock');
  const recording = path.join(dir, 'session.json');
  const b = startBackend(['--socket', sock, '--device', 'fake0', '--gid-table', table, '--vm-id', 'vm-a', '--status-socket', statusSock, '--record', recording, '--flight-events', '4096']);
  t.teardown(() => b.stop());
  await b.line((l) => l.includes('"msg":"serving"'), 'serving line');

  const g = await openGuest(sock);
  const { ctx } = g;
  await ctx.queryDevice();
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(16);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq });
  const buf = ctx.allocBuffer(2 * 4096, { placement: 'contiguous' });
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_READ);
  await t.rejects(ctx.queryGid(1), { name: 'CommandError', statusName: 'INVALID_ARGUMENT' });
  await t.rejects(qp.connect({ gid: gidFromIpv4('192.168.7.3'), qpn: 9 }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE' });
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x77 });
  await qp.query();
  await cq.reqNotify(false, true);

  // SIGUSR1: the window as a fixture, in the dump folder (the socket's).
  b.child.kill('SIGUSR1');
  const usr1 = fileOf(await b.line((l) => l.includes('"msg":"flight recorder dumped"') && l.includes('"trigger":"SIGUSR1"'), 'the SIGUSR1 dump'));
  t.equal(path.dirname(usr1), dir, 'dumped next to the socket');
  const d1 = readSessionFixture(usr1);
  t.equal(d1.trigger, 'SIGUSR1');
  t.match(d1.device, { vm: 'vm-a', hostDevice: 'fake0', queues: 3 });
  const kinds = new Set(d1.events.map((e) => e.kind));
  for (const k of ['message', 'activate', 'kick', 'chain', 'used', 'interrupt']) t.ok(kinds.has(k as never), `the window has ${k} events`);
  t.equal(d1.exchange.format, 'vrdma-vhost-user-exchange/1');
  const steps = d1.exchange.steps as { dir: string; request?: string; fds?: { kind: string; size?: number }[] }[];
  t.match(steps[0], { dir: 'frontend->backend', request: 'GET_FEATURES (1)' }, 'the exchange starts at the front-end\'s first message');
  const ramFds = steps.filter((s) => s.request === 'SET_MEM_TABLE (5)' || s.request === 'ADD_MEM_REG (37)').flatMap((s) => s.fds ?? []);
  t.same(ramFds, [{ kind: 'memfd', size: 4 << 20 }, { kind: 'memfd', size: (8 << 20) }], 'guest RAM fds described as the exchange format says');
  t.ok(steps.some((s) => s.dir === 'backend->frontend'), 'replies too');
  const createPd = d1.events.find((e) => e.kind === 'chain' && e.queue === 0 && Buffer.from(e.readable, 'hex').readUInt32LE(0) === Command.CREATE_PD);
  t.ok(createPd, 'the CREATE_PD request with its bytes');

  // `vrdma-backend status --dump` through the package's bin (no VPC policy: the socket serves the device's view).
  const view = (await queryStatus(statusSock)) as { vm: string; counters: { commands: Record<string, number> } };
  t.match(view, { vm: 'vm-a', counters: { commands: { CREATE_PD: 1 } } });
  const printed = await new Promise<{ code: number; stdout: string }>((resolve) =>
    execFile(process.execPath, [path.join(root, 'bin/vrdma-backend.js'), 'status', '--status-socket', statusSock, '--dump'], { cwd: root, timeout: 120_000 }, (err, stdout) =>
      resolve({ code: err === null ? 0 : Number(err.code), stdout }),
    ),
  );
  t.equal(printed.code, 0);
  const dumped = (JSON.parse(printed.stdout) as { dumped: string }).dumped;
  t.equal(readSessionFixture(dumped).trigger, 'status --dump');

  await pd.dealloc().catch(() => undefined); // BUSY: the QP still uses it (an answer like any other)
  await qp.destroy();
  await mr.dereg();
  await cq.destroy();
  await pd.dealloc();
  buf.release();
  await g.close();
  t.equal(await b.stop(), 0);
  t.ok(existsSync(recording), '--record wrote the session at shutdown');

  const f = readSessionFixture(recording);
  t.equal(f.trigger, 'record');
  t.equal(f.dropped, 0);
  const controlAnswers = f.events.filter((e) => e.kind === 'used' && e.queue === 0).length;
  t.ok(controlAnswers >= 15, `${controlAnswers} control answers recorded`);

  // Offline, in this process: every answer identical.
  const r = await replaySession(f);
  t.same(r.differences, [], 'no answer differs');
  t.equal(r.answersCompared, f.events.filter((e) => e.kind === 'used').length, 'every recorded answer compared');
  t.same(r.skipped, [], 'nothing skipped');

  // The developer's command: npm run fixture -- replay FILE.
  const cli = await tsx(['scripts/fixture.ts', 'replay', recording]);
  t.equal(cli.code, 0, cli.stderr);
  t.match(cli.stdout, new RegExp(`session: \\d+ chains replayed, ${r.answersCompared} answers compared, all identical`));

  // An altered answer is reported there and only there.
  const altered = JSON.parse(readFileSync(recording, 'utf8')) as SessionFixture;
  const used = altered.events.filter((e) => e.kind === 'used' && e.queue === 0);
  const victim = used[3]! as { written: string };
  const bytes = Buffer.from(victim.written, 'hex');
  bytes[CtrlResponseHeader.size] = bytes[CtrlResponseHeader.size]! ^ 0xff;
  victim.written = bytes.toString('hex');
  const alteredFile = path.join(dir, 'altered.json');
  writeFileSync(alteredFile, JSON.stringify(altered));
  const bad = await tsx(['scripts/fixture.ts', 'replay', alteredFile]);
  t.equal(bad.code, 1, 'exit 1 when an answer differs');
  t.match(bad.stdout, /1 differ\n {2}queue 0 answer #3: len \d+ vs \d+, first difference at byte 16/);
});

t.test('NEEDS_RESET dumps the flight recorder by itself, and the dump replays to the same NEEDS_RESET', async (t) => {
  const sock = path.join(dir, 'vm-b.sock');
  const dumps = mkdtempSync(path.join(dir, 'dumps-'));
  const b = startBackend(['--socket', sock, '--device', 'fake0', '--gid-table', table, '--vm-id', 'vm-b', '--dump-dir', dumps]);
  t.teardown(() => b.stop());
  await b.line((l) => l.includes('"msg":"serving"'), 'serving line');
  const fe = await VhostUserFrontend.connect(host, sock);
  await fe.init({ queues: 3 });
  const ram = new GuestRam(host, [{ gpa: 0, size: 0x40000 }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram, 0);
  const queues = [new SplitRingDriver(ram, alloc, 16), new SplitRingDriver(ram, alloc, 16), new SplitRingDriver(ram, alloc, 16)];
  await fe.start({ ram, features: bit(F_VERSION_1) | (1n << BigInt(FeatureBit.RC)), queues: queues.map((q, index) => ({ index, size: 16, ...q.addrs })) });
  await fe.sync();
  // One good request, then a request shorter than the control header: fatal framing (spec 7.5), NEEDS_RESET.
  queues[0]!.post(alloc, encodeRequest(Command.CREATE_PD, 1n, new Uint8Array(0)), 32);
  fe.kick(0);
  await fe.waitCall(0, WAIT_MS);
  queues[0]!.post(alloc, new Uint8Array(4), 32);
  fe.kick(0);
  const line = await b.line((l) => l.includes('"msg":"flight recorder dumped"'), 'the automatic dump');
  const f = readSessionFixture(fileOf(line));
  t.match(f.trigger, /^NEEDS_RESET: queue 0 broken: control request with 4 readable/);
  t.equal(path.dirname(fileOf(line)), dumps, 'in --dump-dir');
  t.match(f.events.at(-1), { kind: 'broken', queue: 0 }, 'the last event is the broken queue');
  const r = await replaySession(f);
  t.same(r.differences, [], 'the replay breaks the same way and answers the same');
  t.equal(r.answersCompared, 1);
  fe.close();
  t.equal(await b.stop(), 0);
});
