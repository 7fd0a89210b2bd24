// bench:rdma's connection set-up loop alone (issue 11 item 7): two VMs through the reference front-end, then per
// connection CREATE_QP, then INIT/RTR/RTS in one batch (the destroy after it untimed), relayed and mapped, printing
// the p50 of each step.
//   - VRDMA_SETUP_VERBS=fake (default): FakeVerbs on this machine (no test host, no TCG). FakeVerbs answers at once,
//     so what is printed is the device path's own cost (driver, virtqueues, front-end, vhost-user, device model,
//     policy), the part bench:rdma's ratio adds to the host verbs; run it under `node --cpu-prof` to see where it
//     goes. VRDMA_SETUP_COUNT=1 also counts the host calls (eventfd, poll watchers, socket messages, mmap).
//   - VRDMA_SETUP_VERBS=rxe: NativeVerbs on rxe0 inside the soft-RoCE test host, against the same four verbs
//     straight on NativeVerbs in the same run (bench:rdma's baseline, rounds alternating), printing the ratio. It
//     runs in a minute where bench:rdma runs its whole set; bench:rdma's rows stay the figures of record.
//   node --import tsx/esm bench/setup/bench.ts        (add --cpu-prof --cpu-prof-dir=DIR for a profile)
//   npm run rxe:run -- env VRDMA_SETUP_VERBS=rxe node --import tsx/esm bench/setup/bench.ts
//   VRDMA_SETUP_ITERS=2000     connections per mode and round (fake; rxe: 20), after VRDMA_SETUP_WARMUP (200; rxe: 2)
//   VRDMA_SETUP_ROUNDS=1       rounds (rxe: 2), device and native alternating which goes first
//   VRDMA_SETUP_MODES=relayed,mapped
//   VRDMA_SETUP_TRANSPORT=frontend (default) | qemu   who plays the VMM: the reference front-end (bench:rdma's mapped rows)
//                              or the project's QEMU under qtest (bench:rdma's headline relayed row)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AccessFlag } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type Cq, type MappedCq, type Pd } from '../../guest-driver-spec/driver/index.ts';
import { attachDevice, Cleanups } from '../../guest-driver-spec/driver/attach.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { Access, GidType, Mtu, QpState, QpType } from '../../vmm-device/verbs/constants.ts';
import type { CqHandle, GidEntry, HostVerbs, PdHandle, QpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { ADDRESS_TABLE, GID_INDEX, PORT, RXE_DEVICE, positiveInt } from '../common/test-host.ts';

const FAKE_TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
];
const VERBS = process.env['VRDMA_SETUP_VERBS'] ?? 'fake';
if (VERBS !== 'fake' && VERBS !== 'rxe') throw new Error(`VRDMA_SETUP_VERBS: 'fake' or 'rxe', not '${VERBS}'`);
const RXE = VERBS === 'rxe';
const ITERS = positiveInt('VRDMA_SETUP_ITERS', RXE ? 20 : 2000, 1_000_000);
const WARMUP = positiveInt('VRDMA_SETUP_WARMUP', RXE ? 2 : 200, 1_000_000);
const ROUNDS = positiveInt('VRDMA_SETUP_ROUNDS', RXE ? 2 : 1, 100);
const MODES = (process.env['VRDMA_SETUP_MODES'] ?? 'relayed,mapped').split(',').map((s) => s.trim());
for (const m of MODES) if (m !== 'relayed' && m !== 'mapped') throw new Error(`VRDMA_SETUP_MODES: unknown mode '${m}'`);
const TRANSPORT = (process.env['VRDMA_SETUP_TRANSPORT'] ?? 'frontend') as 'frontend' | 'qemu';
if (TRANSPORT !== 'frontend' && TRANSPORT !== 'qemu') throw new Error(`VRDMA_SETUP_TRANSPORT: 'frontend' or 'qemu', not '${TRANSPORT}'`);
/** bench:rdma's SETUP_QP_DEPTH. */
const DEPTH = 16;
const ALL = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;
const FRONTEND_RAM_BYTES = 16 << 20;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1] ?? NaN;
};
const us = (from: bigint, to: bigint): number => Number(to - from) / 1e3;

/** Counts calls of SysHost's methods (one process plays guest, VMM and back-end: all of them together). */
function countHostCalls(host: SysHost): Map<string, number> {
  const counts = new Map<string, number>();
  const h = host as unknown as Record<string, (...a: unknown[]) => unknown>;
  for (const name of ['eventfdRead', 'eventfdWrite', 'watchReadable', 'sendMessage', 'recv', 'mmapShared', 'munmap', 'close']) {
    const f = h[name]!.bind(host);
    h[name] = (...a: unknown[]) => {
      counts.set(name, (counts.get(name) ?? 0) + 1);
      return f(...a);
    };
  }
  return counts;
}

interface Steps {
  create: number[];
  connect: number[];
  total: number[];
}
const steps = (): Steps => ({ create: [], connect: [], total: [] });

interface NativeSetup {
  verbs: HostVerbs;
  pd: PdHandle;
  cq: CqHandle;
  peer: QpHandle;
  gid: GidEntry;
}

/** bench:rdma's baseline: the four verbs straight on NativeVerbs. */
async function nativeConnection(n: NativeSetup, out: Steps): Promise<void> {
  const v = n.verbs;
  const t0 = process.hrtime.bigint();
  const qp = await v.createQp(n.pd, { qpType: QpType.RC, sendCq: n.cq, recvCq: n.cq, maxSendWr: DEPTH, maxRecvWr: DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
  const t1 = process.hrtime.bigint();
  await v.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: PORT, qpAccessFlags: Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ });
  await v.modifyQp(qp, { qpState: QpState.RTR, pathMtu: Mtu.MTU_1024, destQpNum: n.peer.qpNum, rqPsn: 0, maxDestRdAtomic: 1, minRnrTimer: 12, ahAttr: { portNum: PORT, grh: { dgid: n.gid.gid, sgidIndex: GID_INDEX, hopLimit: 64 } } });
  await v.modifyQp(qp, { qpState: QpState.RTS, sqPsn: 0, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 1 });
  const t2 = process.hrtime.bigint();
  await v.destroyQp(qp);
  out.create.push(us(t0, t1));
  out.connect.push(us(t1, t2));
  out.total.push(us(t0, t2));
}

async function main() {
  if (RXE && process.env['VRDMA_IN_TEST_HOST'] !== '1') throw new Error('VRDMA_SETUP_VERBS=rxe runs inside the soft-RoCE test host (npm run rxe:run -- ...)');
  const verbs: HostVerbs = RXE ? new NativeVerbs() : new FakeVerbs();
  const host = new SysHost();
  const counts = process.env['VRDMA_SETUP_COUNT'] === '1' ? countHostCalls(host) : undefined;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-setup-'));
  const cleanups = new Cleanups();
  const table = RXE ? ADDRESS_TABLE : FAKE_TABLE;
  const open = async (name: string) => {
    const device = await RdmaDevice.open({
      verbs, hostDevice: RXE ? RXE_DEVICE : 'fake0', vmId: name, resolver: new StaticAddressResolver(table), log: new RecordingLogger(name),
      aliases: RXE ? nativeAliasMapper : new FakeAliasMapper(), hostQueueMapping: 'polled', closeFd: (fd) => host.close(fd),
    });
    cleanups.add(name, () => device.close());
    const transport = await attachDevice({ kind: TRANSPORT, model: device, host, dir, name, cleanups, frontendRamBytes: FRONTEND_RAM_BYTES });
    const ctx = await RdmaContext.open(transport);
    cleanups.add(`${name} ctx`, () => ctx.close());
    return { ctx, pd: await ctx.allocPd() };
  };
  let native: NativeSetup | undefined;
  if (RXE) {
    const device = await verbs.openDevice(RXE_DEVICE);
    const gid = (await verbs.queryGidTable(device)).find((g) => g.index === GID_INDEX && g.type === GidType.ROCE_V2);
    if (gid === undefined) throw new Error(`${RXE_DEVICE} has no RoCE v2 GID at index ${GID_INDEX}`);
    const pd = await verbs.allocPd(device);
    const cq = await verbs.createCq(device, 4 * DEPTH);
    const peer = await verbs.createQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, maxSendWr: DEPTH, maxRecvWr: DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 });
    native = { verbs, pd, cq, peer, gid };
    cleanups.add('native', async () => {
      await verbs.destroyQp(peer);
      await verbs.destroyCq(cq);
      await verbs.deallocPd(pd);
      await verbs.closeDevice(device);
    });
  }
  const a = await open('vm-a');
  const b = await open('vm-b');
  const caps = { type: 'RC', maxSendWr: DEPTH, maxRecvWr: DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } as const;
  const peerCq = await b.ctx.createCq(4 * DEPTH);
  const peer = await b.ctx.createQp(b.pd, { ...caps, sendCq: peerCq, recvCq: peerCq });
  for (const mode of MODES) {
    const cq: Cq | MappedCq = mode === 'mapped' ? await a.ctx.createCq(4 * DEPTH, { map: true }) : await a.ctx.createCq(4 * DEPTH);
    const dev = steps();
    const nat = steps();
    const perStep = { create: new Map<string, number>(), connect: new Map<string, number>() };
    const add = (into: Map<string, number>, before: Map<string, number>, after: Map<string, number>) => {
      for (const [k, v] of after) into.set(k, (into.get(k) ?? 0) + v - (before.get(k) ?? 0));
    };
    const none = new Map<string, number>();
    const snap = () => (counts === undefined ? none : new Map(counts));
    const deviceConnection = async (keep: boolean) => {
      const c0 = snap();
      const t0 = process.hrtime.bigint();
      const qp = await a.ctx.createQp(a.pd as Pd, { ...caps, sendCq: cq as MappedCq, recvCq: cq as MappedCq });
      const t1 = process.hrtime.bigint();
      const c1 = snap();
      const t1c = process.hrtime.bigint(); // the snapshot is not the connect's time
      await qp.connect({ gid: b.ctx.gid, qpn: peer.qpNum }, { accessFlags: ALL, pathMtu: Mtu.MTU_1024 });
      const t2 = process.hrtime.bigint();
      const c2 = snap();
      await qp.destroy();
      if (!keep) return;
      dev.create.push(us(t0, t1));
      dev.connect.push(us(t1c, t2));
      dev.total.push(us(t0, t1) + us(t1c, t2));
      add(perStep.create, c0, c1);
      add(perStep.connect, c1, c2);
    };
    for (let i = 0; i < WARMUP; i++) await deviceConnection(false);
    const cpu0 = process.cpuUsage();
    for (let r = 0; r < ROUNDS; r++) {
      const runDevice = async () => {
        for (let i = 0; i < ITERS; i++) await deviceConnection(true);
      };
      const runNative = async () => {
        if (native !== undefined) for (let i = 0; i < ITERS; i++) await nativeConnection(native, nat);
      };
      if (r % 2 === 0) {
        await runDevice();
        await runNative();
      } else {
        await runNative();
        await runDevice();
      }
    }
    const c = process.cpuUsage(cpu0);
    const p = (s: Steps) => `p50 ${median(s.total).toFixed(1)} us (create ${median(s.create).toFixed(1)}, INIT+RTR+RTS ${median(s.connect).toFixed(1)})`;
    const n = ROUNDS * ITERS;
    let line = `${mode}: device ${p(dev)}`;
    if (native !== undefined) line += `; native ${p(nat)}; ratio ${(median(dev.total) / median(nat.total)).toFixed(3)}x`;
    else line += `; process CPU ${((c.user + c.system) / n).toFixed(1)} us per connection with its destroy`;
    console.log(`${line}; ${n} connections through ${TRANSPORT === 'qemu' ? 'qtest QEMU' : 'the reference front-end'}`);
    if (counts !== undefined) {
      const per = (m: Map<string, number>) => [...m].filter(([, v]) => v !== 0).map(([k, v]) => `${k} ${(v / n).toFixed(2)}`).join(', ');
      console.log(`  host calls per connection: create: ${per(perStep.create)}; connect: ${per(perStep.connect)}`);
    }
    await cq.destroy();
  }
  // One control round trip with no host verb behind it (QUERY_PORT answers from the device's own state): what each
  // of a connection's two round trips costs before any verb runs.
  const rt: number[] = [];
  for (let i = 0; i < WARMUP + ITERS; i++) {
    const t0 = process.hrtime.bigint();
    await a.ctx.queryPort();
    if (i >= WARMUP) rt.push(us(t0, process.hrtime.bigint()));
  }
  console.log(`control round trip (QUERY_PORT, no host verb): p50 ${median(rt).toFixed(1)} us; ${ITERS} requests`);
  await peer.destroy();
  await peerCq.destroy();
  for (const e of await cleanups.runAll()) console.log(e);
  fs.rmSync(dir, { recursive: true, force: true });
}
main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
