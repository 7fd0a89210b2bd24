// The qtest guest driver against devices QEMU itself implements (no back-end of ours involved): the protocol
// client, PCI enumeration and BAR placement, the virtio-pci capability walk, the init sequence, a virtqueue
// round trip with QEMU's own virtio-rng, and INTx through the intercepted I/O APIC.
import t from 'tap';
import {
  ISR_QUEUE,
  QemuQtest,
  QtestError,
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VirtioPciDevice,
  PciConfig,
  enumerateBus0,
} from '../../guest-driver-spec/qtest/index.ts';

const VIRTIO_ID_RNG = 4;
/** Modern-only, so the function has the virtio 1.x device ID 0x1044 on the conventional-PCI `pc` machine too. */
const RNG_ARGS = ['-device', 'virtio-rng-pci,disable-legacy=on'];

t.test('the qtest protocol: values, memory, errors as QtestError', async (t) => {
  const qemu = await QemuQtest.start({ args: RNG_ARGS });
  t.teardown(() => qemu.stop());
  const q = qemu.qtest;
  await q.writeq(0x20_0000, 0x0102_0304_0506_0708n);
  t.equal(await q.readq(0x20_0000), 0x0102_0304_0506_0708n);
  t.equal(await q.readl(0x20_0000), 0x0506_0708, 'little-endian guest RAM');
  t.equal(await q.readb(0x20_0007), 0x01);
  const block = Uint8Array.from({ length: 3000 }, (_, i) => (i * 7) & 0xff);
  await q.write(0x30_0001, block);
  t.same(await q.read(0x30_0001, block.length), block, 'b64write/b64read round trip at an odd address');
  await q.memset(0x30_0001, 10, 0xab);
  t.same([...(await q.read(0x30_0000, 12))], [0, ...new Array(10).fill(0xab), block[10]]);
  await t.rejects(q.command('no_such_command'), QtestError, 'an unknown command is a QtestError');
  t.equal(await q.readb(0x20_0000), 0x08, 'the client still works after an error');
  await t.rejects(q.writel(0x1000, 2 ** 32), RangeError, 'values are range-checked before they go out');
});

t.test('PCI enumeration and the virtio-pci capabilities of a QEMU virtio-rng', async (t) => {
  const qemu = await QemuQtest.start({ args: RNG_ARGS });
  t.teardown(() => qemu.stop());
  const functions = await enumerateBus0(new PciConfig(qemu.qtest));
  const names = functions.map((f) => f.name);
  t.ok(names.includes('00:00.0 8086:1237'), `the i440FX host bridge (${names.join(', ')})`);
  t.ok(names.includes('00:01.0 8086:7000'), 'the PIIX3 ISA bridge');

  const dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: VIRTIO_ID_RNG });
  t.equal(dev.pci.deviceId, 0x1044);
  for (const bar of dev.pci.bars) {
    t.ok(bar.address !== undefined && bar.address % bar.size === 0, `BAR${bar.index} (${bar.kind}, ${bar.size} bytes) naturally aligned`);
  }
  const types = dev.caps.map((c) => c.cfgType);
  for (const type of [VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG]) {
    t.ok(types.includes(type), `capability type ${type} found`);
  }
  t.ok((dev.notifyCap.notifyOffMultiplier ?? -1) >= 0, `notify_off_multiplier ${dev.notifyCap.notifyOffMultiplier}`);
  // The common configuration answers at the address the driver chose for its BAR.
  await dev.reset();
  t.equal(await dev.status(), 0);
  t.equal(await dev.numQueues(), 1, 'virtio-rng has one queue');
});

t.test('the init sequence, a virtqueue round trip with QEMU virtio-rng, INTx and the ISR', async (t) => {
  const qemu = await QemuQtest.start({ args: RNG_ARGS });
  t.teardown(() => qemu.stop());
  const dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: VIRTIO_ID_RNG });
  const features = await dev.negotiate(0n);
  t.equal(features, 1n << VIRTIO_F_VERSION_1);
  t.equal(await dev.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 'FEATURES_OK stuck');
  t.equal(await dev.driverFeatures(), 1n << VIRTIO_F_VERSION_1, 'the driver features read back');

  const queue = await dev.setupQueue(0, qemu.ram, 8);
  const addresses = await dev.readQueueAddresses(0);
  t.same(addresses, { desc: BigInt(queue.descAddr), driver: BigInt(queue.availAddr), device: BigInt(queue.usedAddr), enabled: 1 });
  await dev.driverOk();
  t.equal(await dev.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
  t.notOk(dev.interruptRaised(), 'no interrupt before any buffer');

  const head = await queue.add([], [64]);
  await dev.notify(queue);
  await dev.waitInterrupt();
  t.equal(await dev.readIsr(), ISR_QUEUE, 'the ISR reports a queue interrupt');
  t.notOk(dev.interruptRaised(), 'the ISR read lowered INTx (an "IRQ lower" line came)');
  t.equal(await dev.readIsr(), 0, 'and cleared the ISR');
  const [used] = await queue.waitUsed(1);
  t.equal(used?.id, head);
  t.ok((used?.len ?? 0) > 0 && (used?.len ?? 0) <= 64, `the device wrote ${used?.len} bytes`);
  t.ok(used?.written.some((b) => b !== 0), 'random bytes, not the zeroes the driver left there');
  t.equal(qemu.qtest.irqRaiseCount(dev.intxIrq!), 1, 'one interrupt for one buffer');

  // With VIRTQ_AVAIL_F_NO_INTERRUPT the device fills the buffer without interrupting.
  await queue.setNoInterrupt(true);
  await queue.add([], [16]);
  await dev.notify(queue);
  await queue.waitUsed(1);
  t.equal(qemu.qtest.irqRaiseCount(dev.intxIrq!), 1, 'no interrupt while the driver suppresses them');

  await dev.reset();
  t.equal(await dev.status(), 0, 'reset reads back 0');
});
