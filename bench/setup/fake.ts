// bench:rdma's connection set-up path on this machine, with FakeVerbs instead of rxe0 (no test host, no TCG): two
// VMs through the reference front-end, then bench:rdma's set-up loop (CREATE_QP, then INIT/RTR/RTS in one batch;
// the destroy after it untimed), relayed and mapped, printing per connection the wall and CPU microseconds of each
// step. FakeVerbs answers at once, so what is printed is the device path's own cost (driver, virtqueues, front-end,
// vhost-user, device model, policy), the part bench:rdma's ratio adds to the host verbs. Run it under
// `node --cpu-prof` to see where it goes. The figures of record come from bench:rdma in the test host.
//   node --import tsx/esm bench/setup/fake.ts        (add --cpu-prof --cpu-prof-dir=DIR for a profile)
//   VRDMA_SETUP_FAKE_ITERS=2000     connections per mode (after VRDMA_SETUP_FAKE_WARMUP=200 untimed ones)
//   VRDMA_SETUP_FAKE_MODES=relayed,mapped
//   VRDMA_SETUP_FAKE_COUNT=1        also count the host calls (eventfd, poll watchers, socket messages, mmap) per connection
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AccessFlag } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type Cq, type MappedCq, type Pd } from '../../guest-driver-spec/driver/index.ts';
import { attachDevice, Cleanups } from '../../guest-driver-spec/driver/attach.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { Mtu } from '../../vmm-device/verbs/constants.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { positiveInt } from '../common/test-host.ts';

const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
];
const ITERS = positiveInt('VRDMA_SETUP_FAKE_ITERS', 2000, 1_000_000);
const WARMUP = positiveInt('VRDMA_SETUP_FAKE_WARMUP', 200, 1_000_000);
const MODES = (process.env['VRDMA_SETUP_FAKE_MODES'] ?? 'relayed,mapped').split(',').map((s) => s.trim());
for (const m of MODES) if (m !== 'relayed' && m !== 'mapped') throw new Error(`VRDMA_SETUP_FAKE_MODES: unknown mode '${m}'`);
/** bench:rdma's SETUP_QP_DEPTH. */
const DEPTH = 16;
const ALL = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1] ?? NaN;
};

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

async function main() {
  const verbs = new FakeVerbs();
  const host = new SysHost();
  const counts = process.env['VRDMA_SETUP_FAKE_COUNT'] === '1' ? countHostCalls(host) : undefined;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-setup-fake-'));
  const cleanups = new Cleanups();
  const open = async (name: string) => {
    const device = await RdmaDevice.open({
      verbs, hostDevice: 'fake0', vmId: name, resolver: new StaticAddressResolver(TABLE), log: new RecordingLogger(name), aliases: new FakeAliasMapper(),
      hostQueueMapping: 'polled',
    });
    cleanups.add(name, () => device.close());
    const transport = await attachDevice({ kind: 'frontend', model: device, host, dir, name, cleanups, frontendRamBytes: 16 << 20 });
    const ctx = await RdmaContext.open(transport);
    cleanups.add(`${name} ctx`, () => ctx.close());
    return { ctx, pd: await ctx.allocPd() };
  };
  const a = await open('vm-a');
  const b = await open('vm-b');
  const caps = { type: 'RC', maxSendWr: DEPTH, maxRecvWr: DEPTH, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } as const;
  const peerCq = await b.ctx.createCq(4 * DEPTH);
  const peer = await b.ctx.createQp(b.pd, { ...caps, sendCq: peerCq, recvCq: peerCq });
  for (const mode of MODES) {
    const cq: Cq | MappedCq = mode === 'mapped' ? await a.ctx.createCq(4 * DEPTH, { map: true }) : await a.ctx.createCq(4 * DEPTH);
    const steps = { create: new Map<string, number>(), connect: new Map<string, number>(), destroy: new Map<string, number>() };
    const snap = () => new Map(counts ?? []);
    const add = (into: Map<string, number>, before: Map<string, number>) => {
      for (const [k, v] of counts ?? []) into.set(k, (into.get(k) ?? 0) + v - (before.get(k) ?? 0));
    };
    const wall = { create: [] as number[], connect: [] as number[], destroy: [] as number[] };
    const cpuStart = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < WARMUP + ITERS; i++) {
      const c0 = counts === undefined || i < WARMUP ? undefined : snap();
      const s0 = process.hrtime.bigint();
      const qp = await a.ctx.createQp(a.pd as Pd, { ...caps, sendCq: cq as MappedCq, recvCq: cq as MappedCq });
      const s1 = process.hrtime.bigint();
      const c1 = c0 && snap();
      await qp.connect({ gid: b.ctx.gid, qpn: peer.qpNum }, { accessFlags: ALL, pathMtu: Mtu.MTU_1024 });
      const s2 = process.hrtime.bigint();
      const c2 = c0 && snap();
      await qp.destroy();
      const s3 = process.hrtime.bigint();
      if (i < WARMUP) continue;
      if (c0 !== undefined) {
        add(steps.create, c0);
        add(steps.connect, c1!);
        add(steps.destroy, c2!);
        // add() counted from each snapshot to now: take the later steps back out of the earlier ones.
      }
      wall.create.push(Number(s1 - s0) / 1e3);
      wall.connect.push(Number(s2 - s1) / 1e3);
      wall.destroy.push(Number(s3 - s2) / 1e3);
    }
    const elapsed = Number(process.hrtime.bigint() - t0) / 1e3 / (WARMUP + ITERS);
    const c = process.cpuUsage(cpuStart);
    const cpu = (c.user + c.system) / (WARMUP + ITERS);
    console.log(
      `${mode}: p50 per connection (create + INIT/RTR/RTS) ${(median(wall.create) + median(wall.connect)).toFixed(1)} us ` +
        `(create ${median(wall.create).toFixed(1)}, connect ${median(wall.connect).toFixed(1)}; untimed destroy ${median(wall.destroy).toFixed(1)}); ` +
        `mean with destroy ${elapsed.toFixed(1)} us wall, ${cpu.toFixed(1)} us CPU, ${ITERS} connections after ${WARMUP} warm-up`,
    );
    if (counts !== undefined) {
      const per = (m: Map<string, number>) => [...m].filter(([, v]) => v !== 0).map(([k, v]) => `${k} ${(v / ITERS).toFixed(2)}`).join(', ');
      // Each map counted from its step's start to the connection's end: differences give the step alone.
      const minus = (a: Map<string, number>, b: Map<string, number>) => new Map([...a].map(([k, v]) => [k, v - (b.get(k) ?? 0)]));
      console.log(`  host calls per connection: create: ${per(minus(steps.create, steps.connect))}`);
      console.log(`  connect: ${per(minus(steps.connect, steps.destroy))}`);
      console.log(`  untimed destroy: ${per(steps.destroy)}`);
    }
    await cq.destroy();
  }
  await peer.destroy();
  for (const e of await cleanups.runAll()) console.log(e);
  fs.rmSync(dir, { recursive: true, force: true });
}
main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
