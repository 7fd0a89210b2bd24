// Issue 15: a session recorded on rxe0 and replayed offline with identical answers. The real backend (the
// package's bin, plain node, --device rxe0, --record FILE) serves one VM; the reference driver over the reference
// vhost-user front-end (this process plays QEMU and the guest) queries the device, port and GID, makes a PD, a CQ,
// two RC QPs connected to each other, an MR, queries a QP, relays a SEND/RECV pair and waits for both completions,
// has one command refused, and destroys everything. The recording (with its tape of rxe0's answers: QPNs, keys,
// attributes) is then replayed in this process over the verbs test double: every recorded answer compared, none
// differing, nothing skipped; and an altered host answer on the tape shows up as a difference.
//
// What the comparison covers: the answers written into virtqueues (control answers, doorbell acknowledgements,
// events). The completions the relay writes into the guest's CQ ring are guest memory, not virtqueue answers: a
// recording does not hold them, and the replay does not compare them (the test checks them live instead).
//
//   bash scripts/rxe/run.sh --timeout 900 -- npx tap test/rxe/record-replay-rxe.test.ts

import t from 'tap';
import path from 'node:path';
import { writeFileSync } from 'node:fs';
import { AccessFlag } from '../../vmm-device/abi/rdma/index.ts';
import { gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { readSessionFixture } from '../../vmm-device/observe/recorder.ts';
import { replaySession } from '../../vmm-device/observe/replay.ts';
import { openGuest, root, startBackend } from '../observe/rig.ts';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { RXE_DEVICE, requireTestHost } from './fixture/harness.ts';
import { RXE_HOST_IP } from '../driver/rxe-helpers.ts';

requireTestHost();
t.setTimeout(880_000);

/** A cold start of the backend under TCG (tsx transpiling every source) measured 205 s alone. */
const SERVE_WAIT_MS = 600_000;
/** A relayed completion under TCG. */
const COMPLETION_WAIT_MS = 60_000;
const IP = '192.168.7.1';
const ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;

t.test('a session on rxe0, recorded and replayed offline with identical answers', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-record-rxe-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const table = path.join(dir, 'table.json');
  writeFileSync(table, JSON.stringify({ vms: [{ vmId: 'vm-a', vpc: 'blue', virtualIp: IP, hostIp: RXE_HOST_IP }] }));
  const sock = path.join(dir, 'vm-a.sock');
  const recording = path.join(dir, 'session.json');
  const b = startBackend(['--socket', sock, '--device', RXE_DEVICE, '--gid-table', table, '--vm-id', 'vm-a', '--record', recording], {
    bin: path.join(root, 'bin/vrdma-backend.js'),
    waitMs: SERVE_WAIT_MS,
  });
  t.teardown(() => b.stop());
  await b.line((l) => l.includes('"msg":"serving"'), 'serving line');

  const g = await openGuest(sock);
  const { ctx } = g;
  await ctx.queryDevice();
  await ctx.queryPort();
  await ctx.queryGid(0);
  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(16);
  const q1 = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 8, maxRecvWr: 8 });
  const q2 = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 8, maxRecvWr: 8 });
  const buf = ctx.allocBuffer(2 * 4096);
  const mr = await ctx.regMr(pd, buf, ACCESS);
  // Refused: a destination outside the address table.
  await t.rejects(q1.connect({ gid: gidFromIpv4('192.168.7.9'), qpn: q2.qpNum }, { accessFlags: ACCESS }), { name: 'CommandError', statusName: 'DESTINATION_UNREACHABLE' });
  await q1.connect({ gid: gidFromIpv4(IP), qpn: q2.qpNum }, { accessFlags: ACCESS });
  await q2.connect({ gid: gidFromIpv4(IP), qpn: q1.qpNum }, { accessFlags: ACCESS });
  await q1.query();

  // A relayed SEND/RECV between the two QPs, both completions read from the guest's CQ ring (polled: no event).
  const payload = Buffer.from('recorded on rxe0, replayed offline');
  buf.write(0, payload);
  await q2.postRecv([{ wrId: 0xb0n, sgList: [mr.sge(4096, 4096)] }]);
  await q1.postSend([{ wrId: 0xa0n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, payload.length)] }]);
  const wcs = [];
  const deadline = Date.now() + COMPLETION_WAIT_MS;
  while (wcs.length < 2 && Date.now() < deadline) {
    wcs.push(...cq.poll());
    if (wcs.length < 2) await new Promise((r) => setTimeout(r, 20));
  }
  t.same(
    wcs.map((w) => [w.wrId, w.statusName]).sort((x, y) => Number(x[0]) - Number(y[0])),
    [
      [0xa0n, 'SUCCESS'],
      [0xb0n, 'SUCCESS'],
    ],
    'both completions',
  );
  t.same(Buffer.from(buf.read(4096, payload.length)), payload, 'the SEND arrived');

  await q1.destroy();
  await q2.destroy();
  await mr.dereg();
  await cq.destroy();
  await pd.dealloc();
  buf.release();
  await g.close();
  t.equal(await b.stop(), 0, 'the backend exits 0');

  const f = readSessionFixture(recording);
  t.equal(f.dropped, 0);
  t.ok(f.hostVerbs !== undefined && f.hostVerbs.entries.length > 0, 'the recording carries the tape of rxe0 answers');
  const used = f.events.filter((e) => e.kind === 'used');
  t.ok(used.filter((e) => e.queue === 0).length >= 15, `${used.filter((e) => e.queue === 0).length} control answers recorded`);
  t.ok(used.some((e) => e.queue !== 0), 'doorbell answers recorded');

  const r = await replaySession(f);
  t.same(r.differences, [], 'no answer differs');
  t.same(r.skipped, [], 'nothing skipped');
  t.equal(r.answersCompared, used.length, `every recorded answer compared (${r.answersCompared})`);

  // An altered host answer (the first QP's number on the tape) shows up as a difference.
  const altered = structuredClone(f);
  const entry = altered.hostVerbs!.entries.find((e) => e.call === 'createQp')!;
  (entry.ok as { qpNum: number }).qpNum ^= 0x1;
  const bad = await replaySession(altered);
  t.ok(bad.differences.length > 0, `the altered QPN differs (${bad.differences.length} differences)`);
  t.ok(bad.differences.some((d) => d.queue === 0), 'on the control queue');
});
