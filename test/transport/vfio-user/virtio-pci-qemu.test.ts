// An UNMODIFIED QEMU (Debian trixie-backports, scripts/vfio-user/stock-qemu.sh) attaches this project's vfio-user
// server as a vfio-user-pci function: the qtest guest driver finds a modern virtio-pci function with virtio ID 42,
// walks its capabilities, negotiates, runs requests through a virtqueue with INTx and the ISR, resets the device,
// and the server outlives QEMU (killed) and serves the next one. The device behind is the invert test device.
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  ISR_QUEUE,
  QemuQtest,
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VirtioPciDevice,
  type QtestSplitQueue,
} from '../../../guest-driver-spec/qtest/index.ts';
import { hotAddMemory } from '../../../guest-driver-spec/qtest/memory-hotplug.ts';
import { INVERT_CONFIG_MAGIC, INVERT_F_TEST, InvertDevice } from '../../../guest-driver-spec/qtest/rig/invert-device.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { createLogger } from '../../../vmm-device/util/log.ts';
import { VfioUserServer } from '../../../vmm-device/transport/vfio-user/server.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const QUEUES = 2;
const QUEUE_SIZE = 64;
const host = new SysHost();

const qemuBinary = execFileSync('bash', [path.join(root, 'scripts/vfio-user/stock-qemu.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  .trim()
  .split('\n')
  .pop()!;
const qemuVersion = execFileSync(qemuBinary, ['--version'], { encoding: 'utf8' }).split('\n')[0]!;

function vfioUserArgs(socketPath: string): string[] {
  return ['-device', JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socketPath, type: 'unix' } })];
}

interface Rig {
  dir: string;
  socketPath: string;
  device: InvertDevice;
  server: VfioUserServer;
}

function startServer(t: Test, dir?: string): Rig {
  const d = dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vfu-'));
  if (dir === undefined) t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  const socketPath = path.join(d, 'vfu.sock');
  const device = new InvertDevice(QUEUES, 0x0123_4567_89ab_cdefn);
  const server = new VfioUserServer({ path: socketPath, host, model: device, log: createLogger('vfio-user-test', { level: process.env.VRDMA_TEST_LOG === '1' ? 'debug' : 'error' }) });
  server.listen();
  t.teardown(() => server.close());
  return { dir: d, socketPath, device, server };
}

async function startQemu(t: Test, rig: Rig): Promise<{ qemu: QemuQtest; dev: VirtioPciDevice }> {
  const qemu = await QemuQtest.start({ binary: qemuBinary, workDir: rig.dir, args: vfioUserArgs(rig.socketPath) });
  t.teardown(() => qemu.stop());
  const dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: 42 });
  return { qemu, dev };
}

/** QEMU's vfio-user client posts BAR writes (no reply awaited): what a write does in the server may come later. */
async function until(done: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const inverted = (b: Uint8Array): number[] => [...b].map((x) => x ^ 0xff);

async function roundTrip(t: Test, dev: VirtioPciDevice, queue: QtestSplitQueue, request: Uint8Array): Promise<void> {
  const head = await queue.add([request], [request.length + 8]);
  await dev.notify(queue);
  await dev.waitInterrupt();
  t.equal(await dev.readIsr(), ISR_QUEUE, 'the ISR says: a queue interrupt');
  const [used] = await queue.waitUsed(1);
  t.equal(used?.id, head, 'the chain came back');
  t.same([...(used?.written ?? [])], inverted(request), 'the answer is the request inverted: it went through the device');
}

async function bringUp(dev: VirtioPciDevice, qemu: QemuQtest): Promise<QtestSplitQueue[]> {
  await dev.negotiate(INVERT_F_TEST);
  const queues: QtestSplitQueue[] = [];
  for (let i = 0; i < QUEUES; i++) queues.push(await dev.setupQueue(i, qemu.ram, QUEUE_SIZE));
  await dev.driverOk();
  return queues;
}

t.comment(`stock QEMU: ${qemuVersion} (${qemuBinary})`);

t.test('the PCI function, its capabilities, features and device configuration through stock QEMU', async (t) => {
  const rig = startServer(t);
  const { dev } = await startQemu(t, rig);
  t.ok(rig.server.isAttached, 'QEMU attached over vfio-user');
  t.equal(dev.pci.vendorId, 0x1af4);
  t.equal(dev.pci.deviceId, 0x1040 + 42, 'a modern virtio-pci function with virtio ID 42, which QEMU never looked at');
  const types = dev.caps.map((c) => c.cfgType);
  for (const type of [VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_DEVICE_CFG]) {
    t.ok(types.includes(type), `capability type ${type}`);
  }
  t.equal(dev.notifyCap.notifyOffMultiplier, 4, 'notify_off_multiplier');
  t.equal(dev.configLength, 16, 'device configuration of the model\'s size');

  const offered = await dev.deviceFeatures();
  t.ok(offered & (1n << VIRTIO_F_VERSION_1), 'VERSION_1 offered');
  t.ok(offered & INVERT_F_TEST, 'the model\'s feature offered');
  const negotiated = await dev.negotiate(INVERT_F_TEST);
  t.equal(negotiated, (1n << VIRTIO_F_VERSION_1) | INVERT_F_TEST);
  t.equal(await dev.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 'FEATURES_OK stuck');
  t.equal(await dev.driverFeatures(), negotiated, 'driver features read back');
  t.equal(await dev.numQueues(), QUEUES);
  t.equal(await dev.queueMaxSize(0), 128, 'queue size limit from the model');
  t.equal(await dev.queueMaxSize(QUEUES), 0, 'a queue beyond num_queues reads size 0');
  const config = await dev.configRead(0, 16);
  const view = new DataView(config.buffer);
  t.equal(view.getUint32(0, true), INVERT_CONFIG_MAGIC, 'device configuration from the model');
  t.equal(view.getBigUint64(8, true), 0x0123_4567_89ab_cdefn);
  t.ok(rig.server.counters.dmaMaps > 0, `guest RAM arrived as ${rig.server.counters.dmaMaps} DMA_MAP regions`);
  t.ok(rig.server.fn.guestMemory.regionList.length > 0, 'and is mapped from its fd');
});

t.test('requests through a virtqueue with INTx and the ISR; a guest reset; the device starts again', async (t) => {
  const rig = startServer(t);
  const { qemu, dev } = await startQemu(t, rig);
  let queues = await bringUp(dev, qemu);
  await until(() => rig.device.activations === 1, 'activation');
  t.equal(rig.device.activations, 1, 'DRIVER_OK activated the model');
  await roundTrip(t, dev, queues[0]!, new TextEncoder().encode('over vfio-user'));
  await roundTrip(t, dev, queues[1]!, Uint8Array.of(1, 2, 3, 4));
  t.equal(rig.device.served, 2);

  await dev.reset();
  t.equal(await dev.status(), 0, 'status reads back 0 after the reset');
  t.equal(rig.device.resets, 1, 'the model was reset');
  queues = await bringUp(dev, qemu);
  await until(() => rig.device.activations === 2, 'the second activation');
  t.equal(rig.device.activations, 2, 'the next DRIVER_OK started it again');
  await roundTrip(t, dev, queues[0]!, Uint8Array.of(9, 8, 7));
});

t.test('QEMU killed: the server resets the device, releases guest memory and serves the next QEMU', async (t) => {
  const rig = startServer(t);
  const first = await startQemu(t, rig);
  await bringUp(first.dev, first.qemu);
  const mapped = rig.server.fn.guestMemory.regionList.length;
  t.ok(mapped > 0);
  process.kill(first.qemu.pid, 'SIGKILL');
  const deadline = Date.now() + 10_000;
  while (rig.server.isAttached && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  t.notOk(rig.server.isAttached, 'the server saw the client go');
  t.equal(rig.server.fn.guestMemory.regionList.length, 0, 'guest memory released');
  t.ok(rig.device.resets >= 1, 'the model was reset');

  const second = await startQemu(t, rig);
  const queues = await bringUp(second.dev, second.qemu);
  await roundTrip(t, second.dev, queues[0]!, Uint8Array.of(0x55));
  t.equal(rig.server.counters.connections, 2, 'two clients served by one server');
});

t.test('the server restarted on the same socket path: the QEMU that lost it sees the function gone, a new QEMU is served', async (t) => {
  const rig = startServer(t);
  const first = await startQemu(t, rig);
  await bringUp(first.dev, first.qemu);
  rig.server.close();
  t.notOk(fs.existsSync(rig.socketPath), 'the socket file went with the server');
  const restarted = startServer(t, rig.dir);
  t.equal(restarted.socketPath, rig.socketPath, 'the same path');
  const second = await startQemu(t, restarted);
  const queues = await bringUp(second.dev, second.qemu);
  await roundTrip(t, second.dev, queues[1]!, Uint8Array.of(0xaa, 0x55));
  t.equal(restarted.server.counters.connections, 1);
  await first.qemu.stop(); // QEMU 11.1 keeps running without its server; it is stopped here, not awaited as an exit
});

t.test('RAM hot-added while the device runs arrives as DMA_MAP: the model hears of the new map, the queues go on', async (t) => {
  const rig = startServer(t);
  const qemu = await QemuQtest.start({ binary: qemuBinary, workDir: rig.dir, args: vfioUserArgs(rig.socketPath), qmp: true, hotplug: { slots: 2, maxMiB: 512 } });
  t.teardown(() => qemu.stop());
  const dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: 42 });
  const queues = await bringUp(dev, qemu);
  await until(() => rig.device.activations === 1, 'activation');
  const maps = rig.server.counters.dmaMaps;
  const dimm = await hotAddMemory(qemu.qmp!, { id: 'dimm0', sizeMiB: 64 });
  await until(() => rig.server.fn.guestMemory.findRegion(dimm.gpa) !== undefined, 'the DIMM in guest memory');
  t.ok(rig.server.counters.dmaMaps > maps, 'a DMA_MAP for the DIMM');
  t.ok(rig.device.memoryMaps.length >= 1, 'the running model was told of the new map (memoryChanged)');
  t.ok(rig.device.memoryMaps.at(-1)!.findRegion(dimm.gpa) !== undefined, 'and the map it got has the DIMM');
  await roundTrip(t, dev, queues[0]!, Uint8Array.of(4, 2));
});
