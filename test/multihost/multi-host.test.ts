// Issue 6, multi-host: two soft-RoCE test hosts joined only to each other (scripts/rxe/multi-host.sh), each with its
// own rxe0 and its own `vrdma-backend`, sharing the VPC control plane through a three-member etcd cluster that spans
// both. VM a1 on host 1 talks RDMA (RC: SEND both ways, WRITE, READ back, bytes checked) to VM a2 on host 2 by
// virtual addresses; only the host addresses cross the link (every RoCE packet on it is tallied). A rule change put
// into etcd tears the connection down on both hosts (both guests get QP_POLICY_TEARDOWN, both host QPs go to ERR)
// and new attempts are refused; with the etcd member both backends watched killed, further changes still reach
// both hosts and are enforced.
//
// This file is host 1's program; host 2 runs agent.ts. Run both with `npm run test:multihost`. Run anywhere else
// (e.g. by `npm test`'s host suite), it starts that multi-host run itself and reports its result as a subtest.

import t, { type Test } from 'tap';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { PolicyReason } from '../../vmm-device/abi/rdma/index.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { EtcdClient } from '../../vmm-device/vpc/etcd-client.ts';
import { publishPolicy } from '../../vmm-device/vpc/etcd-source.ts';
import { RemoteHost, type HostApi } from './agent-protocol.ts';
import { HostSide, waitEtcdHealthy, type BackendInfo, type Capture } from './host-side.ts';
import {
  ACME_DSCP, AGENT_PORT, ALLOW_RULE_ID, ETCD_ENDPOINTS, ETCD_MEMBERS, ETCD_PREFIX, HOST_ADDRESS, OTHER_TENANT_IP, VM_OF_HOST,
  clientUrl, gidHex, multiHostPolicy,
} from './topology.ts';

/** Host 2 boots, starts node and its etcd member meanwhile: the agent may take this long to answer. */
const AGENT_CONNECT_MS = 300_000;
/** A three-member cluster spread over two emulated hosts forms (or re-elects) within this. */
const ETCD_READY_MS = 120_000;
/** From a put into etcd to both guests' QP_POLICY_TEARDOWN (watch push across the link, apply, ERR, event). */
const TEARDOWN_WAIT_MS = 60_000;
/** From a put to both backends applying it, with one member dead (re-connection to another member included). */
const PROPAGATION_MS = 90_000;
const POLL_MS = 200;
const SEND_BYTES = 4096;
const WRITE_BYTES = 256 * 1024;
/** Areas of each VM's registered buffer. */
const SEND_OFFSET = 0;
const RECV_OFFSET = 64 * 1024;
const WRITE_OFFSET = 128 * 1024;
const READ_BACK_OFFSET = 512 * 1024;
const REMOTE_WRITE_OFFSET = 1024 * 1024;
/** The whole multi-host run, boot of both hosts and slot wait excluded (scripts/multihost/test.sh bounds those). */
const SELF_RUN_TIMEOUT_S = 2400;

const inMultiHostRun = process.env['VRDMA_MULTIHOST_HOST'] !== undefined;

function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 131 + seed * 17 + (i >> 8)) & 0xff;
  return b;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(probe: () => Promise<T | undefined>, timeoutMs: number, what: string): Promise<{ value: T; ms: number }> {
  const start = performance.now();
  for (;;) {
    const v = await probe();
    if (v !== undefined) return { value: v, ms: performance.now() - start };
    if (performance.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(POLL_MS);
  }
}

interface Peer {
  name: 'host-1' | 'host-2';
  api: HostApi;
  info: BackendInfo;
}

/** Connects a fresh QP on each side to the other; both answers. */
async function connectPair(a: Peer, b: Peer) {
  const qa = await a.api.createQp();
  const qb = await b.api.createQp();
  const [ra, rb] = await Promise.all([
    a.api.connect({ qp: qa.handle, peerGid: b.info.gid, peerQpn: qb.qpn }),
    b.api.connect({ qp: qb.handle, peerGid: a.info.gid, peerQpn: qa.qpn }),
  ]);
  return { qa, qb, ra, rb };
}

/** SEND of `SEND_BYTES` from `from` to `to` on a connected pair; the received bytes compared. */
async function sendAndCheck(t: Test, from: Peer, fromQp: number, to: Peer, toQp: number, seed: number): Promise<void> {
  const data = pattern(SEND_BYTES, seed);
  await from.api.write({ offset: SEND_OFFSET, data: data.toString('base64') });
  await to.api.write({ offset: RECV_OFFSET, data: Buffer.alloc(SEND_BYTES).toString('base64') });
  await to.api.postRecv({ qp: toQp, wrId: seed, offset: RECV_OFFSET, length: SEND_BYTES });
  await from.api.postSend({ qp: fromQp, wrId: seed, opcode: 'SEND', offset: SEND_OFFSET, length: SEND_BYTES });
  t.same(await from.api.waitCompletions({ count: 1 }), [`SEND:SUCCESS ${seed}`], `${from.name}: SEND completed`);
  t.same(await to.api.waitCompletions({ count: 1 }), [`RECV:SUCCESS ${seed}`], `${to.name}: RECV completed`);
  const got = Buffer.from(await to.api.read({ offset: RECV_OFFSET, length: SEND_BYTES }), 'base64');
  t.ok(got.equals(data), `${from.name} -> ${to.name}: ${SEND_BYTES} bytes arrived intact`);
}

/** Both host QPs of a pair as the host kernels list them. */
async function kernelStates(a: Peer, qpnA: number, b: Peer, qpnB: number) {
  const [ka, kb] = await Promise.all([a.api.kernelQps(), b.api.kernelQps()]);
  return { a: ka.find((q) => q.lqpn === qpnA), b: kb.find((q) => q.lqpn === qpnB) };
}

function checkWire(t: Test, name: string, c: Capture, before: Capture): void {
  const packets = c.packets - before.packets;
  t.ok(packets > 0, `${name}: ${packets} RoCE v2 packets crossed the link (tallied; ${c.dropped - before.dropped} frames dropped before the tally)`);
  t.same(Object.keys(c.addresses).sort(), [HOST_ADDRESS['host-1'], HOST_ADDRESS['host-2']], `${name}: only the two host addresses on the wire`);
  t.same(Object.keys(c.tos), [String(ACME_DSCP << 2)], `${name}: every packet carries acme's DSCP ${ACME_DSCP} (TOS ${ACME_DSCP << 2})`);
}

if (!inMultiHostRun) {
  // Outside a multi-host run: run one, host 1's tap output parsed as this subtest.
  t.spawn('bash', [fileURLToPath(new URL('../../scripts/multihost/test.sh', import.meta.url)), '--raw-tap'], { timeout: SELF_RUN_TIMEOUT_S * 1000 }, 'multi-host run (scripts/multihost/test.sh)');
} else if (process.env['VRDMA_MULTIHOST_HOST'] !== 'host-1') {
  t.fail(`test/multihost/multi-host.test.ts is host 1's program, not ${process.env['VRDMA_MULTIHOST_HOST']}'s (host 2 runs agent.ts)`);
} else {
  const local = new HostSide('host-1');
  let remote: RemoteHost | undefined;
  t.teardown(async () => {
    await remote?.shutdown();
    await local.stop();
  });
  const writer = new EtcdClient({ endpoints: ETCD_ENDPOINTS, log: new RecordingLogger('writer'), requestTimeoutMs: 5000 });
  let h1: Peer;
  let h2: Peer;

  t.test('two hosts, a three-member etcd cluster across them, a backend and a VM on each', async (t) => {
    t.equal(await local.linkAddress(), HOST_ADDRESS['host-1'], "host 1's rxe0 netdev has its host address");
    await local.startEtcd();
    await local.startCapture();
    const started = performance.now();
    remote = await RemoteHost.connect(HOST_ADDRESS['host-2'], AGENT_PORT, AGENT_CONNECT_MS);
    t.comment(`host 2's agent answered after ${((performance.now() - started) / 1000).toFixed(1)} s`);
    t.equal(await remote.linkAddress(), HOST_ADDRESS['host-2'], "host 2's rxe0 netdev has its host address");
    await Promise.all(ETCD_MEMBERS.map((m) => waitEtcdHealthy(clientUrl(m), ETCD_READY_MS)));
    t.pass(`all three etcd members healthy (${ETCD_ENDPOINTS.join(', ')})`);
    await publishPolicy(writer, ETCD_PREFIX, multiHostPolicy(true));
    const [i1, i2] = await Promise.all([local.startBackend(), remote.startBackend()]);
    h1 = { name: 'host-1', api: local, info: i1 };
    h2 = { name: 'host-2', api: remote, info: i2 };
    t.equal(i1.gid, gidHex(VM_OF_HOST['host-1'].ip), "a1's GID is its virtual address from etcd");
    t.equal(i2.gid, gidHex(VM_OF_HOST['host-2'].ip), "a2's GID is its virtual address from etcd");
    const [s1, s2] = await Promise.all([local.status(), remote.status()]);
    t.match(s1, { host: 'host-1', controlPlane: { kind: 'etcd', metrics: { connected: true } }, policy: { inForce: true } }, "host 1's backend: policy from etcd in force (operator view)");
    t.match(s2, { host: 'host-2', controlPlane: { kind: 'etcd', metrics: { connected: true } }, policy: { inForce: true } }, "host 2's backend: policy from etcd in force (operator view)");
  });

  t.test('a1 (host 1) and a2 (host 2) over RC by virtual addresses; only host addresses on the wire', async (t) => {
    const before1 = await local.captureReport();
    const before2 = await remote!.captureReport();
    const { qa, qb, ra, rb } = await connectPair(h1, h2);
    t.same([ra, rb], [{ ok: true }, { ok: true }], 'both ends connect (RTR to the peer VIRTUAL GID, RTS)');

    // The host kernels' view: each host QP is connected to the other's wire QPN.
    const k = await kernelStates(h1, qa.qpn, h2, qb.qpn);
    t.match(k.a, { rqpn: qb.qpn, state: 'RTS' }, `host 1's QP ${qa.qpn} -> host 2's QP ${qb.qpn}, RTS`);
    t.match(k.b, { rqpn: qa.qpn, state: 'RTS' }, `host 2's QP ${qb.qpn} -> host 1's QP ${qa.qpn}, RTS`);
    // The operator's view: the guest named its peer by the virtual address.
    const [s1, s2] = await Promise.all([local.status(), remote!.status()]);
    t.match(s1.vms[0].device.qps.find((q: { hostQpn: number }) => q.hostQpn === qa.qpn), { peer: VM_OF_HOST['host-2'].ip, state: 'RTS' }, "host 1's operator view: a1's QP connected to a2's virtual address");
    t.match(s2.vms[0].device.qps.find((q: { hostQpn: number }) => q.hostQpn === qb.qpn), { peer: VM_OF_HOST['host-1'].ip, state: 'RTS' }, "host 2's operator view: a2's QP connected to a1's virtual address");

    await sendAndCheck(t, h1, qa.handle, h2, qb.handle, 1);
    await sendAndCheck(t, h2, qb.handle, h1, qa.handle, 2);

    // RDMA WRITE into a2's memory, then READ it back into a zeroed area of a1's.
    const data = pattern(WRITE_BYTES, 3);
    await local.write({ offset: WRITE_OFFSET, data: data.toString('base64') });
    const remoteAddr = (BigInt(h2.info.mrIova) + BigInt(REMOTE_WRITE_OFFSET)).toString();
    await local.postSend({ qp: qa.handle, wrId: 3, opcode: 'RDMA_WRITE', offset: WRITE_OFFSET, length: WRITE_BYTES, remoteAddr, rkey: h2.info.mrRkey });
    t.same(await local.waitCompletions({ count: 1 }), ['RDMA_WRITE:SUCCESS 3'], 'RDMA WRITE completed');
    const written = Buffer.from(await remote!.read({ offset: REMOTE_WRITE_OFFSET, length: WRITE_BYTES }), 'base64');
    t.ok(written.equals(data), `a2's memory holds the ${WRITE_BYTES} bytes a1 wrote`);
    await local.write({ offset: READ_BACK_OFFSET, data: Buffer.alloc(WRITE_BYTES).toString('base64') });
    await local.postSend({ qp: qa.handle, wrId: 4, opcode: 'RDMA_READ', offset: READ_BACK_OFFSET, length: WRITE_BYTES, remoteAddr, rkey: h2.info.mrRkey });
    t.same(await local.waitCompletions({ count: 1 }), ['RDMA_READ:SUCCESS 4'], 'RDMA READ completed');
    const readBack = Buffer.from(await local.read({ offset: READ_BACK_OFFSET, length: WRITE_BYTES }), 'base64');
    t.ok(readBack.equals(data), `the ${WRITE_BYTES} bytes came back by RDMA READ`);

    checkWire(t, 'host 1', await local.captureReport(), before1);
    checkWire(t, 'host 2', await remote!.captureReport(), before2);

    // The other tenant's VM on host 2 has an address in the same numeric range: a1 cannot reach it.
    const q = await local.createQp();
    const refused = await local.connect({ qp: q.handle, peerGid: gidHex(OTHER_TENANT_IP), peerQpn: qb.qpn });
    t.match(refused, { ok: false, status: 'DESTINATION_UNREACHABLE' }, "another VPC's address is unreachable");
  });

  /** Puts a policy, waits for both guests' teardown events on the pair and both host QPs in ERR; new attempts refused. */
  async function ruleChangeTearsDown(t: Test, qa: { handle: number; qpn: number }, qb: { handle: number; qpn: number }, what: string) {
    const put = performance.now();
    const putWallClock = Date.now();
    await publishPolicy(writer, ETCD_PREFIX, multiHostPolicy(false));
    const [e1, e2] = await Promise.all([
      local.waitTeardown({ qp: qa.handle, timeoutMs: TEARDOWN_WAIT_MS }),
      remote!.waitTeardown({ qp: qb.handle, timeoutMs: TEARDOWN_WAIT_MS }),
    ]);
    const elapsed = performance.now() - put;
    t.match(e1, { reason: PolicyReason.RULE_CHANGED }, `${what}: a1 (host 1) got QP_POLICY_TEARDOWN, RULE_CHANGED`);
    t.match(e2, { reason: PolicyReason.RULE_CHANGED }, `${what}: a2 (host 2) got QP_POLICY_TEARDOWN, RULE_CHANGED`);
    t.comment(`${what}: etcd put -> both guests' events ${elapsed.toFixed(0)} ms`);
    if (e1 === null || e2 === null) {
      // What the guests did get, and what the backends logged: the report of the failure above.
      for (const [name, api] of [['host 1', local], ['host 2', remote!]] as const) {
        const d = await api.diagnostics({ since: putWallClock });
        t.comment(`${name}: guest events since the put: ${JSON.stringify(d.events)}; driver ${JSON.stringify(d.driver)}`);
        t.comment(`${name}: backend log:\n${d.backendLog}`);
      }
    }
    const k = await kernelStates(h1, qa.qpn, h2, qb.qpn);
    t.match(k.a, { state: 'ERR' }, `${what}: host 1's QP ${qa.qpn} is in ERR (host kernel)`);
    t.match(k.b, { state: 'ERR' }, `${what}: host 2's QP ${qb.qpn} is in ERR (host kernel)`);
    const [s1, s2] = await Promise.all([local.status(), remote!.status()]);
    t.comment(`${what}: teardown latency from the change reaching each backend: host 1 ${s1.teardown.lastMs.toFixed(2)} ms, host 2 ${s2.teardown.lastMs.toFixed(2)} ms`);
    const again = await connectPair(h1, h2);
    t.match(again.ra, { ok: false, status: 'REFUSED_BY_POLICY', detail: 0 }, `${what}: a new attempt from host 1 is refused (the VPC default)`);
    t.match(again.rb, { ok: false, status: 'REFUSED_BY_POLICY', detail: 0 }, `${what}: a new attempt from host 2 is refused`);
  }

  t.test('a rule change in etcd tears the connection down on both hosts', async (t) => {
    const { qa, qb } = await connectPairFromScratch(t);
    await ruleChangeTearsDown(t, qa, qb, 'rule 10 removed');
  });

  t.test('one etcd member killed: changes still reach both hosts and are enforced', async (t) => {
    // The member host 1's backend watches (both were given the same order, so host 2's too).
    const s1 = await local.status();
    const watched = ETCD_MEMBERS.find((m) => clientUrl(m) === s1.controlPlane.metrics.endpoint);
    if (watched === undefined) throw new Error(`host 1 watches ${s1.controlPlane.metrics.endpoint}, which is no member`);
    if (watched.host === 'host-1') await local.killEtcd({ name: watched.name });
    else await remote!.killEtcd({ name: watched.name });
    t.pass(`killed ${watched.name} (${clientUrl(watched)}, on ${watched.host}), the member host 1's backend watched`);

    // An update: rule 10 back. Both backends must apply it through the two live members. The put itself may meet
    // the election that follows the kill (no leader yet): the writer tries again until the cluster answers.
    const { value: revision, ms: putMs } = await until(
      () => publishPolicy(writer, ETCD_PREFIX, multiHostPolicy(true)).catch(() => undefined),
      PROPAGATION_MS,
      'the two live members to take a put',
    );
    t.comment(`the put went through ${putMs.toFixed(0)} ms after the kill`);
    for (const [name, api] of [['host 1', local], ['host 2', remote!]] as const) {
      const { value, ms } = await until(async () => {
        const s = await api.status();
        return s.controlPlane.metrics.appliedRevision >= revision ? s : undefined;
      }, PROPAGATION_MS, `${name} to apply revision ${revision}`);
      t.comment(`${name} applied revision ${revision} after ${ms.toFixed(0)} ms, now watching ${value.controlPlane.metrics.endpoint}`);
      t.not(value.controlPlane.metrics.endpoint, clientUrl(watched), `${name} moved to a live member`);
    }
    const { qa, qb, ra, rb } = await connectPair(h1, h2);
    t.same([ra, rb], [{ ok: true }, { ok: true }], 'with rule 10 back, a new connection is allowed on both hosts');
    await sendAndCheck(t, h1, qa.handle, h2, qb.handle, 5);
    await ruleChangeTearsDown(t, qa, qb, 'rule 10 removed again, one member dead');
    t.comment(`rule ${ALLOW_RULE_ID} decided the allowed connections; the VPC default (deny, detail 0) the refused ones`);
  });

  /** A fresh pair across the hosts, connected and checked with one SEND (each test stands on its own). */
  async function connectPairFromScratch(t: Test) {
    const { qa, qb, ra, rb } = await connectPair(h1, h2);
    t.same([ra, rb], [{ ok: true }, { ok: true }], 'a connected pair across the hosts');
    await sendAndCheck(t, h1, qa.handle, h2, qb.handle, 9);
    return { qa, qb };
  }
}
