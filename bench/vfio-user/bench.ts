// bash bench/vfio-user/run.sh: the control round trip (QUERY_DEVICE through the reference driver, qtest guest) over
// vfio-user (stock QEMU 11.1.3, vfio-user-pci) against vhost-user (the project's patched QEMU,
// vhost-user-device-pci) in the same run, the same device model over the verbs test double, the same driver; and
// the cost of one trapped doorbell on the raw protocol (REGION_WRITE to the notify area and its reply), the figure
// behind keeping the notify area trapped rather than sparse-mmapped. Writes bench-results/vfio-user.json.
//   VRDMA_BENCH_ITERS   round trips per transport (default 300)
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { RdmaContext } from '../../guest-driver-spec/driver/index.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { QemuQtest } from '../../guest-driver-spec/qtest/index.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { VfioUserServer } from '../../vmm-device/transport/vfio-user/server.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { InvertDevice } from '../../guest-driver-spec/qtest/rig/invert-device.ts';
import { NOTIFY_OFFSET } from '../../vmm-device/transport/virtio-pci/layout.ts';
import { Cmd, RawClient, cat, u32s, u64 } from '../../test/transport/vfio-user/raw-client.ts';
import { percentile, record, type BenchRecord } from '../common/results.ts';
import { mergeResults } from './merge.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const ITERS = Number(process.env['VRDMA_BENCH_ITERS'] ?? 300);
const WARMUP = 20;
const host = new SysHost();
const TABLE: GidTableEntry[] = [{ vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' }];

function lastLine(script: string): string {
  return execFileSync('bash', [path.join(root, script)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop()!;
}

async function controlRoundTrips(kind: 'vfio-user' | 'vhost-user', dir: string): Promise<number[]> {
  const socketPath = path.join(dir, `${kind}.sock`);
  const device = await RdmaDevice.open({ verbs: new FakeVerbs(), hostDevice: 'fake0', vmId: 'vm-a', resolver: new StaticAddressResolver(TABLE), log: new RecordingLogger('device'), aliases: new FakeAliasMapper() });
  const log = new RecordingLogger(kind);
  const server = kind === 'vfio-user' ? new VfioUserServer({ path: socketPath, host, model: device, log }) : new VhostUserServer({ path: socketPath, host, model: device, log });
  server.listen();
  const args =
    kind === 'vfio-user'
      ? ['-device', JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socketPath, type: 'unix' } })]
      : ['-chardev', `socket,id=vu,path=${socketPath}`, '-device', 'vhost-user-device-pci,chardev=vu,virtio-id=42,num_vqs=3,vq_size=256,config_size=128'];
  const qemu = await QemuQtest.start({ workDir: dir, args, ...(kind === 'vfio-user' ? { binary: lastLine('scripts/vfio-user/stock-qemu.sh') } : {}) });
  try {
    const transport = await QtestTransport.open({ qemu, host });
    const ctx = await RdmaContext.open(transport);
    const times: number[] = [];
    for (let i = 0; i < WARMUP + ITERS; i++) {
      const start = process.hrtime.bigint();
      await ctx.queryDevice();
      if (i >= WARMUP) times.push(Number(process.hrtime.bigint() - start) / 1000);
    }
    await ctx.close();
    await transport.close();
    return times;
  } finally {
    await qemu.stop();
    server.close();
    await device.close();
  }
}

/** REGION_WRITE of a doorbell and its reply, on the raw protocol: the price of every trapped guest store. */
async function trappedDoorbells(dir: string): Promise<number[]> {
  const socketPath = path.join(dir, 'raw.sock');
  const server = new VfioUserServer({ path: socketPath, host, model: new InvertDevice(2, 1n), log: new RecordingLogger('raw') });
  server.listen();
  const c = RawClient.connect(socketPath);
  try {
    await c.negotiate();
    const doorbell = cat(u64(NOTIFY_OFFSET), u32s(0, 2), Uint8Array.of(0, 0));
    const times: number[] = [];
    for (let i = 0; i < WARMUP + ITERS; i++) {
      const start = process.hrtime.bigint();
      const r = await c.request(Cmd.REGION_WRITE, doorbell);
      if (r.errno !== 0) throw new Error(`doorbell refused: errno ${r.errno}`);
      if (i >= WARMUP) times.push(Number(process.hrtime.bigint() - start) / 1000);
    }
    return times;
  } finally {
    c.close();
    server.close();
  }
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-bench-vfu-'));
try {
  const vfio = await controlRoundTrips('vfio-user', dir);
  const vhost = await controlRoundTrips('vhost-user', dir);
  const doorbell = await trappedDoorbells(dir);
  const records: BenchRecord[] = [];
  for (const p of [50, 99]) {
    records.push(
      record(`control_round_trip_p${p}_vfio_user`, percentile(vfio, p), percentile(vhost, p),
        'the same QUERY_DEVICE round trip over vhost-user (patched QEMU 10.0 vhost-user-device-pci), qtest guest, same run', 'us', 'lower'),
    );
  }
  records.push(
    record('trapped_doorbell_p50_vfio_user', percentile(doorbell, 50), percentile(vfio, 50),
      'the whole control round trip over vfio-user (p50, same run): the share one trapped doorbell store costs', 'us', 'lower'),
  );
  const file = path.join(root, 'bench-results/vfio-user.json');
  mergeResults(file, records); // the data-path records (data-path.ts) stay
  for (const r of records) console.log(`${r.metric}: ${r.ours} ${r.unit} vs ${r.baseline} (${r.baseline_name}) ratio ${r.ratio}`);
  console.log(`wrote ${file}`);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
