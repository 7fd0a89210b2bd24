// bench:scale's device path on this machine, with FakeVerbs instead of rxe0 (no test host, no TCG): two VMs through
// the reference front-end with HOST_QUEUE_MAPPING, mapped CQs shared by 16 QPs, N pairs created and connected, then
// destroyed, printing wall and CPU milliseconds per window of pairs. A cost that grows with the number of live QPs
// shows as a growing window, in seconds instead of the test host's hours; run it under `node --cpu-prof` to see
// where. FakeVerbs is not rxe (no kernel queues, no doorbell thread): the figures of record come from bench.ts.
//   node --import tsx/esm bench/scale/fake.ts        (add --cpu-prof --cpu-prof-dir=DIR for a profile)
//   VRDMA_SCALE_FAKE_QPS=2048      pairs (QPs per VM)
//   VRDMA_SCALE_FAKE_WINDOW=256    pairs per printed window
//   VRDMA_SCALE_FAKE_SETUP_ONLY=1  skip the destroys (the device's reset releases everything)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AccessFlag } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type MappedCq, type MappedQp } from '../../guest-driver-spec/driver/index.ts';
import { attachDevice, Cleanups } from '../../guest-driver-spec/driver/attach.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { Mtu } from '../../vmm-device/verbs/constants.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { DEFAULT_MAX_MAPPED_QUEUES } from '../../vmm-device/rdma/mapped/plan.ts';
import { positiveInt } from '../common/test-host.ts';

const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
];
const N = positiveInt('VRDMA_SCALE_FAKE_QPS', 2048, 65_536);
const WINDOW = positiveInt('VRDMA_SCALE_FAKE_WINDOW', 256, 65_536);
const SETUP_ONLY = process.env['VRDMA_SCALE_FAKE_SETUP_ONLY'] === '1';
const QPS_PER_CQ = 16;
const ALL = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;

async function main() {
  // FakeVerbs counts its objects by a walk over all of them (its own O(n), not the device's): off for this profile.
  (FakeVerbs.prototype as unknown as { count: () => number }).count = () => 0;
  const verbs = new FakeVerbs({ maxQp: 4 * N + 64, maxCq: 4 * N + 64 });
  const host = new SysHost();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-scale-fake-'));
  const cleanups = new Cleanups();
  const cqs = Math.ceil(N / QPS_PER_CQ);
  const maxMappedQueues = Math.max(DEFAULT_MAX_MAPPED_QUEUES, 2 * N + cqs);
  const open = async (name: string) => {
    const device = await RdmaDevice.open({
      verbs, hostDevice: 'fake0', vmId: name, resolver: new StaticAddressResolver(TABLE), log: new RecordingLogger(name), aliases: new FakeAliasMapper(),
      hostQueueMapping: 'polled', maxMappedQueues, quotas: { maxQp: N, maxCq: cqs, maxPd: 4, maxMr: 16, maxQpWr: 64, maxCqe: 256 },
    });
    cleanups.add(name, () => device.close());
    const transport = await attachDevice({ kind: 'frontend', model: device, host, dir, name, cleanups, frontendRamBytes: 64 << 20 });
    const ctx = await RdmaContext.open(transport);
    cleanups.add(`${name} ctx`, () => ctx.close());
    return { device, ctx, pd: await ctx.allocPd() };
  };
  const a = await open('vm-a');
  const b = await open('vm-b');
  const caps = { type: 'RC', maxSendWr: 16, maxRecvWr: 16, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } as const;
  let aCq: MappedCq | undefined;
  let bCq: MappedCq | undefined;
  const pairs: [MappedQp, MappedQp][] = [];
  const all: MappedCq[] = [];
  let t = process.hrtime.bigint();
  const t0 = t;
  let cpu = process.cpuUsage();
  /** Wall and CPU (user + system of this process) milliseconds since the last call: CPU time moves less with the load of a shared machine. */
  const lap = () => {
    const n = process.hrtime.bigint();
    const c = process.cpuUsage(cpu);
    const out = `${(Number(n - t) / 1e6).toFixed(0)} ms wall, ${((c.user + c.system) / 1e3).toFixed(0)} ms CPU`;
    t = n;
    cpu = process.cpuUsage();
    return out;
  };
  for (let i = 0; i < N; i++) {
    if (i % QPS_PER_CQ === 0) {
      aCq = await a.ctx.createCq(64, { map: true });
      bCq = await b.ctx.createCq(64, { map: true });
      all.push(aCq, bCq);
    }
    const qa = await a.ctx.createQp(a.pd, { ...caps, sendCq: aCq!, recvCq: aCq! });
    const qb = await b.ctx.createQp(b.pd, { ...caps, sendCq: bCq!, recvCq: bCq! });
    await qa.connect({ gid: b.ctx.gid, qpn: qb.qpNum }, { accessFlags: ALL, pathMtu: Mtu.MTU_1024 });
    await qb.connect({ gid: a.ctx.gid, qpn: qa.qpNum }, { accessFlags: ALL, pathMtu: Mtu.MTU_1024 });
    pairs.push([qa, qb]);
    if ((i + 1) % WINDOW === 0) {
      console.log(`setup ${i + 1} pairs: window ${lap()}`);
    }
  }
  console.log(`setup total ${(Number(process.hrtime.bigint() - t0) / 1e6).toFixed(0)} ms`);
  lap();
  if (SETUP_ONLY) pairs.length = 0;
  let k = 0;
  for (const [qa, qb] of pairs) {
    await qa.destroy();
    await qb.destroy();
    if (++k % WINDOW === 0) {
      console.log(`destroy ${k} pairs: window ${lap()}`);
    }
  }
  if (!SETUP_ONLY) for (const cq of all) await cq.destroy();
  for (const e of await cleanups.runAll()) console.log(e);
  fs.rmSync(dir, { recursive: true, force: true });
}
main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
