// Fault matrix on rxe0 (issue 12 item 8), the transport's faults: VM A is a virtio-rdma device on rxe0 behind a
// real vhost-user server, driven by the reference driver over the reference front-end (this process plays QEMU and
// the guest); VM B is another device instance on the same rxe0 (TestGuest), A's traffic peer. Each case strikes
// while A's SENDs to B are in flight and counts: every work request a surviving guest posted completes exactly once;
// no host object is left once the guests are done (rdma resource show); B keeps being served.
//   - an mmap failure: ADD_MEM_REG whose fd cannot be mapped (an eventfd: mmap answers ENODEV), a real kernel
//     refusal, not a double;
//   - EMFILE at recvmsg: the process's open-file limit lowered (prlimit, a real rlimit) while the front-end sends
//     ADD_MEM_REG with a memfd: the kernel cannot install the fd and truncates the control data;
//   - EMFILE at accept: the VMM reconnects while the limit leaves no fd for accept(); once the limit is back the
//     connection is served, and the listening socket did not spin meanwhile (accept failures counted, bounded).
//
//   bash scripts/rxe/run.sh --timeout 900 -- npx tap --jobs=1 test/rxe/fault-vhost-user.test.ts

import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Command, QpType, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, VhostUserTransport, type Cq, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { RdmaDevice, gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { FrontendRequest, encodeSingleRegion } from '../../vmm-device/transport/vhost-user/messages.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { RIG_RAM } from '../driver/harness.ts';
import { RXE_DEVICE, requireTestHost } from './fixture/harness.ts';
import { hostObjectsOf } from '../driver/rxe-helpers.ts';
import {
  ACCESS,
  BURST,
  MSG,
  QP_DEPTH,
  S,
  completionsOf,
  connect,
  exactlyOnce,
  fourVmResolver,
  hostObjectsSettle,
  ips,
  ok,
  openVm,
  postRecvs,
  statusName,
  verbs,
  type Cqe,
} from './fixture/fault-rig.ts';

requireTestHost();
t.setTimeout(600_000);

const host = new SysHost();
/** How long the accept case keeps the limit low: the listening socket must not spin meanwhile. */
const LOW_LIMIT_MS = 1000;
/** At most this many accept failures may be logged in LOW_LIMIT_MS: a retry pause, not a busy loop. */
const MAX_ACCEPT_FAILURES = 50;
/** B's objects between cases: one PD, CQ and MR. */
const B_ONLY = { qp: 0, cq: 1, mr: 1, pd: 1 };

const resolver = await fourVmResolver();
const b = await openVm('b', resolver, 2);
t.teardown(() => b.g.device.close());

interface VuVm {
  device: RdmaDevice;
  server: VhostUserServer;
  log: RecordingLogger;
  socketPath: string;
  dir: string;
  ram: GuestRam;
  transport: VhostUserTransport;
  ctx: RdmaContext;
  pd: Pd;
  cq: Cq;
  buf: GuestBuffer;
  mr: Mr;
  close(): Promise<void>;
}

/** VM A: device on rxe0, vhost-user server, memfd RAM, the reference front-end and driver; a PD, CQ and MR. */
async function openA(): Promise<VuVm> {
  const device = await RdmaDevice.open({ verbs, hostDevice: RXE_DEVICE, vmId: 'vm-a', resolver, log: new RecordingLogger('vm-a'), aliases: nativeAliasMapper });
  const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-fault-'));
  const socketPath = path.join(dir, 'a.sock');
  const log = new RecordingLogger('vm-a-vhost-user');
  const server = new VhostUserServer({ path: socketPath, host, model: device, log });
  server.listen();
  const ram = new GuestRam(host, RIG_RAM.map((r) => ({ ...r })));
  const transport = await VhostUserTransport.open({ host, socketPath, ram, queues: device.queueCount });
  const ctx = await RdmaContext.open(transport);
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(128);
  const buf = ctx.allocBuffer(64 * 1024);
  const mr = await ctx.regMr(pd, buf, ACCESS);
  const vm: VuVm = {
    device, server, log, socketPath, dir, ram, transport, ctx, pd, cq, buf, mr,
    close: async () => {
      await vm.transport.close().catch(() => undefined);
      server.close();
      await device.close();
      vm.ram.release(); // the RAM of the last connection (the accept case reconnects with new RAM)
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return vm;
}

/** A's RC QP to a new QP of B, both connected; B posted BURST receives. */
async function pairAB(a: VuVm): Promise<{ qa: Qp; qb: Awaited<ReturnType<typeof b.g.createQp>>; recvs: bigint[] }> {
  const qa = await a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: QP_DEPTH, maxRecvWr: QP_DEPTH });
  const qb = await b.g.createQp(b.pd, b.cq, b.cq, QpType.RC, QP_DEPTH);
  await qa.connect({ gid: gidFromIpv4(ips['b']!), qpn: qb.qpn }, { accessFlags: ACCESS });
  await connect(b, qb, ips['a']!, qa.qpNum);
  const recvs = await postRecvs(b, qb, BURST);
  return { qa, qb, recvs };
}

let nextId = 1_000_000n;
/** BURST signaled SENDs from A; returns their wr_ids. */
async function sendsFromA(a: VuVm, qa: Qp): Promise<bigint[]> {
  const ids = Array.from({ length: BURST }, () => nextId++);
  await qa.postSend(ids.map((wrId, i) => ({ wrId, opcode: 'SEND' as const, signaled: true, sgList: [a.mr.sge((i % 64) * MSG, MSG)] })));
  return ids;
}

/** A's completions for `ids` (A's connection alive), bounded wait; exactly once each. */
async function aCompletions(a: VuVm, ids: bigint[]): Promise<{ wrId: bigint; status: number }[]> {
  const got: { wrId: bigint; status: number }[] = [];
  const want = new Set(ids);
  const deadline = Date.now() + 60_000;
  while (new Set(got.filter((c) => want.has(c.wrId)).map((c) => c.wrId)).size < want.size && Date.now() < deadline) {
    got.push(...a.cq.poll());
    await new Promise((r) => setTimeout(r, 20));
  }
  return got;
}

/** B's receives of the pair: moved to ERR by B's guest (flushing what got nothing), each completed once. */
async function finishB(tt: Test, qb: { handle: number }, recvs: bigint[], allowed: number[]): Promise<void> {
  await ok(b.g.modifyQp(qb.handle, S.STATE, { qp_state: 6 }), 'B to ERR');
  const got: Cqe[] = [];
  exactlyOnce(tt, "B's receives", recvs, await completionsOf(b, qb as never, recvs, got), allowed);
  await ok(b.g.destroy(Command.DESTROY_QP, qb.handle), 'DESTROY_QP B');
}

/** B is still served: a PD made and destroyed, no device failure, and only B's own objects on the host. */
async function bUnaffected(tt: Test): Promise<void> {
  const pd = await b.g.createPd();
  await ok(b.g.destroy(Command.DESTROY_PD, pd), 'B: DESTROY_PD');
  tt.equal(b.g.failures.length + b.g.broken.length, 0, 'B: no device failure, no NEEDS_RESET');
  tt.same(await hostObjectsSettle(B_ONLY), B_ONLY, "rdma resource show: only B's PD, CQ and MR left");
}



/** RLIMIT_NOFILE of this process, as /proc/self/limits states it. */
function nofile(): { soft: number; hard: number } {
  const line = readFileSync('/proc/self/limits', 'utf8').split('\n').find((l) => l.startsWith('Max open files'))!;
  const [soft, hard] = line.trim().split(/\s+/).slice(3, 5).map(Number);
  return { soft: soft!, hard: hard! };
}

/**
 * Runs `body` with this process's open-file limit just above the fds it holds (holes filled with /dev/null), so
 * that the next new fd fails with EMFILE; `freeOne()` leaves room for exactly one. The limit is set and restored by
 * a prlimit helper started before (its pipes exist already: no fd is needed to restore).
 */
async function withNoFreeFd<T>(body: (freeOne: () => void) => Promise<T>): Promise<T> {
  const { soft, hard } = nofile();
  const top = Math.max(...readdirSync('/proc/self/fd').map(Number));
  const fillers: number[] = [];
  for (let fd = openSync('/dev/null', 'r'); ; fd = openSync('/dev/null', 'r')) {
    fillers.push(fd);
    if (fd >= top) break;
  }
  const limit = Math.max(top, fillers.at(-1)!) + 1;
  const helper = spawn('sh', ['-c', 'prlimit --pid "$1" --nofile="$2:$3" && echo lowered && read x && prlimit --pid "$1" --nofile="$4:$3" && echo restored', 'sh', String(process.pid), String(limit), String(hard), String(soft)], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  const said = (word: string) =>
    new Promise<void>((resolve, reject) => {
      const check = () => (out.includes(word) ? resolve() : undefined);
      helper.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        check();
      });
      helper.on('exit', (code) => (out.includes(word) ? resolve() : reject(new Error(`prlimit helper exited ${code} before "${word}": ${out}`))));
      check();
    });
  await said('lowered');
  try {
    return await body(() => closeSync(fillers.pop()!));
  } finally {
    helper.stdin.write('\n');
    await said('restored');
    for (const fd of fillers) closeSync(fd);
  }
}

t.test('an mmap failure: ADD_MEM_REG with an fd that cannot be mapped, mid-traffic', async (t) => {
  const a = await openA();
  try {
    const { qa, qb, recvs } = await pairAB(a);
    const sends = await sendsFromA(a, qa);
    const closedBefore = a.server.closeReasons.length;
    // A file as large as the region, opened read-only: every size check passes, the shared writable mmap fails.
    const file = path.join(a.dir, 'read-only-ram');
    writeFileSync(file, new Uint8Array(2 << 20));
    const fd = openSync(file, 'r');
    const region = { guestPhysAddr: 0x4000_0000n, size: 2n << 20n, userAddr: 0x7f40_0000_0000n, mmapOffset: 0n };
    const answer = await a.transport.fe.request(FrontendRequest.ADD_MEM_REG, encodeSingleRegion(region), [fd]).then(
      () => 'accepted',
      (e: Error) => `refused: ${e.message}`,
    );
    closeSync(fd);
    t.match(answer, /^refused/, `the back-end refused the region: ${answer}`);
    const closed = a.server.closeReasons.length > closedBefore;
    t.comment(closed ? `connection closed: ${a.server.closeReasons.at(-1)}` : 'connection kept');
    const logged = a.log.lines.find((l) => /mmap: EACCES/.test(JSON.stringify(l.fields ?? {})));
    t.ok(logged !== undefined, `the mmap failure is logged with its cause: ${JSON.stringify(logged?.fields)}`);
    t.equal(a.server.counters.badMessages.HostError, 1, 'counted once as a HostError');
    if (!closed) {
      const got = await aCompletions(a, sends);
      const mine = got.filter((c) => sends.includes(c.wrId));
      t.same({ completions: mine.length, distinct: new Set(mine.map((c) => c.wrId)).size }, { completions: BURST, distinct: BURST }, `A's ${BURST} sends completed exactly once (${[...new Set(mine.map((c) => statusName(c.status)))].join(', ')})`);
      t.ok(mine.every((c) => c.status === WcStatus.SUCCESS), "A's sends succeeded: the refused region did not disturb the data path");
      await finishB(t, qb, recvs, [WcStatus.SUCCESS]);
      await qa.destroy();
      await a.mr.dereg();
      await a.cq.destroy();
      await a.pd.dealloc();
    } else {
      await finishB(t, qb, recvs, [WcStatus.SUCCESS, WcStatus.WR_FLUSH_ERR]);
    }
    t.equal(a.device.counters.deviceFailures, 0, "A's device: no failure");
  } finally {
    await a.close();
  }
  await bUnaffected(t);
});

t.test('EMFILE at recvmsg: ADD_MEM_REG with a memfd while no fd can be installed, mid-traffic', async (t) => {
  const a = await openA();
  try {
    const { qa, qb, recvs } = await pairAB(a);
    await sendsFromA(a, qa);
    const hot = a.ram.add({ gpa: 0x4000_0000, size: 2 << 20 }); // memfd and mapping made before the limit
    const closedBefore = a.server.closeReasons.length;
    const answer = await withNoFreeFd(() =>
      a.transport.fe.addMemReg(hot).then(
        () => 'accepted',
        (e: Error) => `failed: ${e.message}`,
      ),
    );
    t.match(answer, /^failed/, `ADD_MEM_REG not accepted: ${answer}`);
    t.equal(a.server.closeReasons.length, closedBefore + 1, 'the back-end closed the connection');
    // The kernel truncates the control data when it cannot install the fd (MSG_CTRUNC): the connection reports it.
    t.match(a.server.closeReasons.at(-1), /truncated/, `close reason: ${a.server.closeReasons.at(-1)}`);
    // The connection's end is the VMM's end for the device: reset, every host object of A released.
    await a.device.settled();
    t.same([a.device.pds.size, a.device.cqs.size, a.device.qps.size, a.device.mrs.size], [0, 0, 0, 0], "A's device forgot every object");
    t.same(await hostObjectsSettle({ ...B_ONLY, qp: 1 }), { ...B_ONLY, qp: 1 }, "rdma resource show: A's objects released, B's QP of the pair still there");
    await finishB(t, qb, recvs, [WcStatus.SUCCESS, WcStatus.WR_FLUSH_ERR]);
    t.equal(a.device.counters.deviceFailures, 0, "A's device: no failure");
  } finally {
    await a.close();
  }
  await bUnaffected(t);
});

t.test('EMFILE at accept: the VMM reconnects while no fd is left, then is served; no busy loop', async (t) => {
  const a = await openA();
  try {
    const { qa, qb, recvs } = await pairAB(a);
    await sendsFromA(a, qa);
    // The VMM goes away mid-traffic (its end of the socket closed): A is reset.
    await a.transport.close().catch(() => undefined);
    await new Promise((r) => setTimeout(r, 200));
    await a.device.settled();
    t.same(await hostObjectsSettle({ ...B_ONLY, qp: 1 }), { ...B_ONLY, qp: 1 }, "rdma resource show: A's objects released after the disconnect");
    await finishB(t, qb, recvs, [WcStatus.SUCCESS, WcStatus.WR_FLUSH_ERR]);
    const failuresBefore = a.log.lines.filter((l) => l.message === 'accept failed' || l.message.startsWith('accept')).length;
    const ram = new GuestRam(host, RIG_RAM.map((r) => ({ ...r })));
    const pending = await withNoFreeFd(async (freeOne) => {
      freeOne(); // room for the VMM's own socket, none for the back-end's accept
      const opening = VhostUserTransport.open({ host, socketPath: a.socketPath, ram, queues: a.device.queueCount }).then(
        (tr) => tr,
        (e: Error) => e,
      );
      await new Promise((r) => setTimeout(r, LOW_LIMIT_MS));
      const failures = a.log.lines.filter((l) => l.message.startsWith('accept')).length - failuresBefore;
      t.ok(failures >= 1, `accept failed with EMFILE while the limit held (${failures} logged)`);
      t.ok(failures <= MAX_ACCEPT_FAILURES, `... at most ${MAX_ACCEPT_FAILURES} in ${LOW_LIMIT_MS} ms: the listening socket does not spin (${failures})`);
      return { opening }; // not the promise itself: an async body would wait for it with the limit still low
    });
    const reopened = await pending.opening;
    if (reopened instanceof Error) throw reopened;
    a.transport = reopened;
    const oldRam = a.ram;
    a.ram = ram;
    oldRam.release();
    t.pass('the reconnecting VMM is served once fds are available again');
    // A's new driver session works: objects and traffic with B, exactly once.
    a.ctx = await RdmaContext.open(reopened);
    a.pd = await a.ctx.allocPd();
    a.cq = await a.ctx.createCq(128);
    a.buf = a.ctx.allocBuffer(64 * 1024);
    a.mr = await a.ctx.regMr(a.pd, a.buf, ACCESS);
    const pair = await pairAB(a);
    const sends = await sendsFromA(a, pair.qa);
    const got = await aCompletions(a, sends);
    const mine = got.filter((c) => sends.includes(c.wrId));
    t.same({ completions: mine.length, distinct: new Set(mine.map((c) => c.wrId)).size, ok: mine.filter((c) => c.status === WcStatus.SUCCESS).length }, { completions: BURST, distinct: BURST, ok: BURST }, `after the reconnect: A's ${BURST} sends completed once each, SUCCESS`);
    const bGot: Cqe[] = [];
    exactlyOnce(t, "B's receives after the reconnect", pair.recvs, await completionsOf(b, pair.qb, pair.recvs, bGot), [WcStatus.SUCCESS]);
    await ok(b.g.destroy(Command.DESTROY_QP, pair.qb.handle), 'DESTROY_QP B');
    await pair.qa.destroy();
    await a.mr.dereg();
    await a.cq.destroy();
    await a.pd.dealloc();
    t.equal(a.device.counters.deviceFailures, 0, "A's device: no failure");
  } finally {
    await a.close();
  }
  t.same(hostObjectsOf(process.pid), B_ONLY, 'nothing of A left');
  await bUnaffected(t);
});
