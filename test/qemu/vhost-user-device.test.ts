// Real QEMU (the project's patched build, under qtest) drives this project's vhost-user back-end: QEMU's
// vhost-user-device-pci with virtio ID 42 in front, the invert test device behind, and the qtest guest driver
// doing what a guest kernel's virtio-pci driver does.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import {
  startBackend,
  startRig,
  sysStatsSettled,
  until,
  vhostUserDeviceArgs,
  QUEUES,
  QUEUE_SIZE,
  RECONNECT_MS,
} from '../../guest-driver-spec/qtest/rig/vhost-user-rig.ts';
import { BackendProcess, completions } from '../../guest-driver-spec/frontend/conformance/backend-process-control.ts';
import { ECHO_F_TEST, HOLD_PREFIX } from '../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { INVERT_CONFIG_MAGIC, INVERT_F_TEST } from '../../guest-driver-spec/qtest/rig/invert-device.ts';
import {
  ISR_QUEUE,
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  QemuQtest,
  VirtioPciDevice,
  type QtestSplitQueue,
} from '../../guest-driver-spec/qtest/index.ts';
import { close, memfdCreate, mmap, munmap, pageSize } from '../../vmm-device/native/sys.ts';

const bytes = (text: string): Uint8Array => new TextEncoder().encode(text);
const inverted = (b: Uint8Array): number[] => [...b].map((x) => x ^ 0xff);

/** Negotiates, sets up every queue and sets DRIVER_OK. */
async function bringUp(dev: VirtioPciDevice, ram: QemuQtest['ram']): Promise<QtestSplitQueue[]> {
  await dev.negotiate(INVERT_F_TEST);
  const queues: QtestSplitQueue[] = [];
  for (let i = 0; i < QUEUES; i++) queues.push(await dev.setupQueue(i, ram, QUEUE_SIZE));
  await dev.driverOk();
  return queues;
}

/** Sends one request on `queue`, waits for the interrupt, acknowledges it through the ISR, returns the answer. */
async function roundTrip(t: Test, dev: VirtioPciDevice, queue: QtestSplitQueue, request: Uint8Array): Promise<void> {
  const head = await queue.add([request], [request.length + 8]);
  await dev.notify(queue);
  await dev.waitInterrupt();
  t.equal(await dev.readIsr(), ISR_QUEUE, 'the ISR says: a queue interrupt');
  t.notOk(dev.interruptRaised(), 'reading the ISR lowered INTx');
  const [used] = await queue.waitUsed(1);
  t.equal(used?.id, head, 'the chain came back');
  t.equal(used?.len, request.length, 'the device wrote as many bytes as the request had');
  t.same([...(used?.written ?? [])], inverted(request), 'the answer is the request inverted, so it went through the device');
}

t.test('PCI enumeration, capabilities and the device configuration read through QEMU from the back-end', async (t) => {
  const rig = await startRig({ serial: 0x0123_4567_89ab_cdefn });
  t.teardown(() => rig.finish());
  const { dev } = rig;
  t.equal(dev.pci.vendorId, 0x1af4);
  t.equal(dev.pci.deviceId, 0x1040 + 42, 'a modern virtio-pci function with virtio ID 42');
  t.ok(dev.notifyCap.notifyOffMultiplier === pageSize(), 'page-per-vq: one notify page per queue');
  t.equal(dev.configLength >= 16, true, `device config capability of ${dev.configLength} bytes`);

  const offered = await dev.deviceFeatures();
  t.ok(offered & (1n << VIRTIO_F_VERSION_1), 'VERSION_1 offered');
  t.ok(offered & INVERT_F_TEST, 'the back-end device feature is offered by QEMU');
  const negotiated = await dev.negotiate(INVERT_F_TEST);
  t.equal(negotiated, (1n << VIRTIO_F_VERSION_1) | INVERT_F_TEST);
  t.equal(await dev.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
  t.equal(await dev.numQueues(), QUEUES);
  // QEMU 10.0 reports 1024 here whatever vq_size says; the driver picks QUEUE_SIZE, within the back-end's limit.
  t.ok((await dev.queueMaxSize(0)) >= QUEUE_SIZE, 'queue 0 takes QUEUE_SIZE entries');

  const config = await dev.configRead(0, 16);
  const view = new DataView(config.buffer);
  t.equal(view.getUint32(0, true), INVERT_CONFIG_MAGIC, 'magic from the back-end (GET_CONFIG)');
  t.equal(view.getUint32(4, true), QUEUES);
  t.equal(view.getBigUint64(8, true), 0x0123_4567_89ab_cdefn, 'the serial this back-end was given');
  t.equal(await dev.configRead32(0), INVERT_CONFIG_MAGIC, 'a 32-bit config read agrees');
  t.equal(await dev.configRead16(8), 0xcdef);
});

t.test('a request/response round trip through a virtqueue, with INTx and the ISR', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const { dev, backend } = rig;
  const queues = await bringUp(dev, rig.ram);
  t.ok(await backend.session(), 'QEMU connected');
  t.equal(await dev.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);

  await roundTrip(t, dev, queues[0]!, bytes('hello, device'));
  await roundTrip(t, dev, queues[1]!, bytes('second queue'));
  // Several chains in one kick.
  const requests = ['one', 'two', 'three', 'four'].map(bytes);
  for (const r of requests) await queues[0]!.add([r], [16]);
  await dev.notify(queues[0]!);
  const used = await queues[0]!.waitUsed(requests.length);
  t.same(
    used.map((u) => [...u.written]),
    requests.map(inverted),
    'four chains answered in order',
  );
  t.equal(backend.device.served, 2 + requests.length);
  t.equal(queues[0]!.inFlightCount, 0, 'every chain came back');
});

t.test('a host-notifier page mapped after DRIVER_OK: a guest store lands in the back-end page', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const { dev, backend } = rig;
  const queues = await bringUp(dev, rig.ram);
  const session = await backend.session();
  await until(() => backend.device.activations === 1, 'the back-end device to activate');

  const page = pageSize();
  const doorbell = memfdCreate('doorbell', page);
  t.teardown(() => close(doorbell));
  const view = mmap(doorbell, 0, page, true);
  t.teardown(() => munmap(view));
  const words = new Uint32Array(view);

  const reply = await session.setHostNotifier(1, doorbell, page, 0);
  t.equal(reply, 0n, 'QEMU accepted the mapping (REPLY_ACK 0)');
  const notifyAddress = queues[1]!.notifyAddress!;
  await rig.qemu.qtest.writel(notifyAddress, 0xfeed_0001);
  t.equal(words[0], 0xfeed_0001, 'the guest store to queue 1 notify address is in the back-end page');
  await rig.qemu.qtest.writew(notifyAddress + 4, 0xbeef);
  t.equal(words[1]! & 0xffff, 0xbeef);
  t.equal(await rig.qemu.qtest.readl(notifyAddress), 0xfeed_0001, 'and reads come from the same page');

  // Queue 0 is untouched: its doorbell still goes to QEMU, which kicks the back-end.
  await roundTrip(t, dev, queues[0]!, bytes('queue 0 still kicks'));
  // Unmapping (no fd) gives queue 1 back to QEMU's notify handling.
  t.equal(await session.setHostNotifier(1, undefined, 0, 0), 0n, 'the mapping was removed');
  await rig.qemu.qtest.writel(notifyAddress, 0x1234);
  t.equal(words[0], 0xfeed_0001, 'a store after the unmapping no longer reaches the page');
});

t.test('the host notifier is refused before DRIVER_OK', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const { dev, backend } = rig;
  await dev.negotiate(INVERT_F_TEST);
  const session = await backend.session();
  const page = pageSize();
  const doorbell = memfdCreate('doorbell-early', page);
  t.teardown(() => close(doorbell));
  await t.rejects(session.setHostNotifier(0, doorbell, page, 0), /only valid after DRIVER_OK/);
});

t.test('QEMU restart: the back-end serves the next QEMU after the first one went away', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const { backend } = rig;
  const queues = await bringUp(rig.dev, rig.ram);
  await roundTrip(t, rig.dev, queues[0]!, bytes('first QEMU'));
  t.ok((await sysStatsSettled()).mappings > 0, 'the back-end maps the guest RAM');

  const exit = await rig.qemu.stop();
  t.ok(exit.code === 0 || exit.signal === 'SIGTERM', `QEMU ended on SIGTERM (${JSON.stringify(exit)})`);
  await until(() => backend.server.closeReasons.length === 1, 'the back-end to see the connection close');
  t.ok(backend.device.resets >= 1, 'the device was reset when its front-end left');
  const after = await sysStatsSettled();
  t.equal(after.mappings, 0, 'the guest RAM mappings were released');
  t.equal(after.watchers, 1, 'only the listening socket is still watched');

  const second = await QemuQtest.start({ workDir: rig.dir, args: vhostUserDeviceArgs(rig.socketPath) });
  rig.qemu = second;
  rig.dev = await VirtioPciDevice.probe(second.qtest, { virtioId: 42 });
  const again = await bringUp(rig.dev, second.ram);
  await until(() => backend.device.activations === 2, 'the second activation');
  await roundTrip(t, rig.dev, again[1]!, bytes('second QEMU'));
  t.equal(backend.server.connectionsServed, 2);
});

t.test('a guest reset reaches the back-end as SET_STATUS 0; the next DRIVER_OK starts the device again', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const { dev, backend } = rig;
  const queues = await bringUp(dev, rig.ram);
  const session = await backend.session();
  await until(() => backend.device.activations === 1, 'the device to start on SET_STATUS DRIVER_OK');
  t.equal(backend.device.served, 0, 'started before any kick: DRIVER_OK arrived as SET_STATUS');
  await roundTrip(t, dev, queues[0]!, bytes('before the reset'));

  await dev.reset();
  await until(() => backend.device.resets === 1, 'the device reset');
  t.equal(session.describe().status, 0, 'the back-end status is 0 (SET_STATUS 0)');
  t.notOk(session.core.isActive, 'the device is reset, not merely its rings stopped');
  t.same(session.describe().rings.map((r) => r.started), [false, false], 'the rings were stopped first (GET_VRING_BASE)');

  const again = await bringUp(dev, rig.ram);
  await until(() => backend.device.activations === 2, 'the second start');
  await roundTrip(t, dev, again[1]!, bytes('after the reset'));
});

t.test('back-end restart under a reconnecting chardev: QEMU reconnects by itself and the same guest rings go on', async (t) => {
  const rig = await startRig({ reconnect: true });
  t.teardown(() => rig.finish());
  const queues = await bringUp(rig.dev, rig.ram);
  await roundTrip(t, rig.dev, queues[0]!, bytes('before the restart'));

  rig.backend.close(); // the back-end "dies": its connection, socket, mappings and watchers go away
  const settled = await sysStatsSettled();
  t.equal(settled.watchers, 0, 'the closed back-end holds no watcher');
  t.equal(settled.mappings, 0, 'and no guest memory mapping');
  rig.backend = startBackend(rig.socketPath, 0x99n);
  await until(() => rig.backend.device.activations === 1, 'QEMU to reconnect and start the device again', 10_000);
  t.ok(rig.qemu.running, 'QEMU survived losing its back-end');
  t.equal(await rig.dev.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK, 'the guest saw nothing: still DRIVER_OK');
  await roundTrip(t, rig.dev, queues[0]!, bytes('after the restart'));
  await roundTrip(t, rig.dev, queues[1]!, bytes('the other queue too'));
  const config = await rig.dev.configRead(8, 8);
  t.equal(new DataView(config.buffer).getBigUint64(0, true), 0x99n, 'config now comes from the new back-end');
  t.equal(rig.backend.server.connectionsServed, 1);
});

t.test('back-end restart before the guest started the device: QEMU reconnects, the driver then starts it as usual', async (t) => {
  const rig = await startRig({ reconnect: true });
  t.teardown(() => rig.finish());
  await rig.backend.session();
  rig.backend.close();
  rig.backend = startBackend(rig.socketPath, 0x77n);
  await rig.backend.session(); // QEMU came back (vhost_dev_init again) with no device to restore
  t.equal(rig.backend.device.activations, 0, 'nothing started on the reconnection');
  const queues = await bringUp(rig.dev, rig.ram);
  await until(() => rig.backend.device.activations === 1, 'the device to start on DRIVER_OK');
  await roundTrip(t, rig.dev, queues[1]!, bytes('first request, second back-end'));
  t.equal(rig.backend.server.connectionsServed, 1);
});

/** QEMU's device in front of backend-process.ts (the echo device: 2 queues, 8 bytes of config). */
function echoDeviceArgs(socketPath: string): string[] {
  return [
    '-chardev', `socket,id=vu,path=${socketPath},reconnect-ms=${RECONNECT_MS}`,
    '-device', `vhost-user-device-pci,chardev=vu,virtio-id=42,num_vqs=${QUEUES},vq_size=${QUEUE_SIZE},config_size=8,page-per-vq=on`,
  ];
}

t.test('a back-end process killed with SIGKILL mid-request: QEMU reconnects, the inflight area resubmits, each request completes once', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-qemu-restart-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'vu.sock');
  const first = await BackendProcess.start(socketPath, QUEUES, 'hold');
  t.teardown(() => first.kill('SIGKILL'));
  const qemu = await QemuQtest.start({ workDir: dir, args: echoDeviceArgs(socketPath) });
  t.teardown(() => qemu.stop());
  const dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: 42 });
  await dev.negotiate(ECHO_F_TEST);
  const queue = await dev.setupQueue(0, qemu.ram, QUEUE_SIZE);
  await dev.driverOk();

  const requests = ['a', `${HOLD_PREFIX}b`, 'c', `${HOLD_PREFIX}d`];
  const heads = new Map<number, string>();
  for (const r of requests) heads.set(await queue.add([bytes(r)], [16]), r);
  await dev.notify(queue);
  await first.until((e) => e.filter((x) => x.event === 'served' || x.event === 'held').length === requests.length, 'every request to reach the device');
  const before = await queue.waitUsed(2);
  t.same(before.map((u) => heads.get(u.id)), ['a', 'c'], 'two completed before the crash');
  t.same(first.texts('held'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'two in flight in the back-end');

  t.same(await first.kill('SIGKILL'), { code: null, signal: 'SIGKILL' }, 'the back-end died by SIGKILL');
  const second = await BackendProcess.start(socketPath, QUEUES, 'echo');
  t.teardown(() => second.kill('SIGTERM'));
  await second.until((e) => e.filter((x) => x.event === 'served').length === 2, 'QEMU to reconnect and the requests in flight to be resubmitted');
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'resubmitted oldest first, nothing completed before served again');
  const resubmitted = await queue.waitUsed(2);
  t.same(resubmitted.map((u) => heads.get(u.id)), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`], 'the guest got both answers');
  t.same(resubmitted.map((u) => new TextDecoder().decode(u.written)), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`]);

  const e = await queue.add([bytes('e')], [16]);
  heads.set(e, 'e');
  await dev.notify(queue);
  const after = await queue.waitUsed(1);
  t.same(after.map((u) => heads.get(u.id)), ['e'], 'the ring goes on');
  await second.untilServed(3);
  t.same(second.texts('served'), [`${HOLD_PREFIX}b`, `${HOLD_PREFIX}d`, 'e'], 'nothing completed before the crash served again');
  const ids = [...before, ...resubmitted, ...after].map((u) => u.id);
  t.same(completions(ids), { distinct: true, count: requests.length + 1 }, 'no request completed twice, none lost');
  t.ok(qemu.running, 'QEMU ran through it');
});
