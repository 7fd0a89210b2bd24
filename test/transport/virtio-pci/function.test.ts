// The device side of virtio-pci driven by register accesses as a guest driver makes them (no VMM in between): the
// layout and capability bytes, feature negotiation through the select/window registers, queue set-up with 64-bit
// addresses written as two halves, a doorbell served by the model, INTx with the read-to-clear ISR and its
// level re-assertion, MSI-X vectors, the device configuration window, bad accesses counted, reset, and a memory
// change rebuilding a running queue.
import t from 'tap';
import { SplitDriver, TestGuestMemory } from '../../../guest-driver-spec/testkit/index.ts';
import { INVERT_CONFIG_MAGIC, INVERT_F_TEST, InvertDevice } from '../../../guest-driver-spec/qtest/rig/invert-device.ts';
import { GuestMemory } from '../../../vmm-device/memory/guest-memory.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import { STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK } from '../../../vmm-device/abi/virtio.ts';
import { VirtioPciFunction } from '../../../vmm-device/transport/virtio-pci/function.ts';
import {
  CAP_COMMON_CFG,
  CAP_DEVICE_CFG,
  CAP_ISR_CFG,
  CAP_NOTIFY_CFG,
  COMMON,
  COMMON_OFFSET,
  DEVICE_CFG_OFFSET,
  ISR_CONFIG,
  ISR_OFFSET,
  ISR_QUEUE,
  NOTIFY_OFFSET,
  NOTIFY_OFF_MULTIPLIER,
  NO_VECTOR,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  VIRTIO_BAR,
} from '../../../vmm-device/transport/virtio-pci/layout.ts';

const QUEUES = 2;
const F_VERSION_1 = 1n << 32n;

class Rig {
  readonly device = new InvertDevice(QUEUES, 0x1122_3344_5566_7788n);
  readonly log = new RecordingLogger('pci');
  msix = false;
  readonly msixSent: number[] = [];
  intxRaised = 0;
  readonly fn: VirtioPciFunction;
  readonly mem = new TestGuestMemory({ regions: [{ gpa: 0x10000, size: 0x40000 }], rng: 7 });

  constructor() {
    this.fn = new VirtioPciFunction({
      model: this.device,
      log: this.log,
      interrupts: { msixEnabled: () => this.msix, msix: (v) => this.msixSent.push(v), intx: () => this.intxRaised++ },
    });
    this.fn.setMemory(this.mem.memory);
  }

  read(offset: number, width: number): number | bigint {
    const out = new Uint8Array(width);
    this.fn.barRead(VIRTIO_BAR, offset, out);
    const v = new DataView(out.buffer);
    return width === 1 ? v.getUint8(0) : width === 2 ? v.getUint16(0, true) : width === 4 ? v.getUint32(0, true) : v.getBigUint64(0, true);
  }
  write(offset: number, width: number, value: number | bigint): boolean {
    const bytes = new Uint8Array(width);
    const v = new DataView(bytes.buffer);
    if (width === 1) v.setUint8(0, Number(value));
    else if (width === 2) v.setUint16(0, Number(value), true);
    else if (width === 4) v.setUint32(0, Number(value), true);
    else v.setBigUint64(0, BigInt(value), true);
    return this.fn.barWrite(VIRTIO_BAR, offset, bytes);
  }
  common(field: number, width: number): number | bigint {
    return this.read(COMMON_OFFSET + field, width);
  }
  setCommon(field: number, width: number, value: number | bigint): void {
    this.write(COMMON_OFFSET + field, width, value);
  }
  status(): number {
    return Number(this.common(COMMON.deviceStatus, 1));
  }
  features(): bigint {
    let f = 0n;
    for (const sel of [0, 1]) {
      this.setCommon(COMMON.deviceFeatureSelect, 4, sel);
      f |= BigInt(this.common(COMMON.deviceFeature, 4)) << BigInt(32 * sel);
    }
    return f;
  }
  negotiate(features: bigint): void {
    this.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE);
    this.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for (const sel of [0, 1]) {
      this.setCommon(COMMON.driverFeatureSelect, 4, sel);
      this.setCommon(COMMON.driverFeature, 4, Number((features >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
    this.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
  }
  /** Queue set-up as Linux does it: 64-bit addresses as two 32-bit halves, low first. */
  setupQueue(index: number, size: number): SplitDriver {
    const driver = new SplitDriver({ mem: this.mem, size, eventIdx: false, indirect: false });
    this.setCommon(COMMON.queueSelect, 2, index);
    this.setCommon(COMMON.queueSize, 2, size);
    for (const [field, addr] of [[COMMON.queueDesc, driver.descAddr], [COMMON.queueDriver, driver.availAddr], [COMMON.queueDevice, driver.usedAddr]] as const) {
      this.setCommon(field, 4, addr % 2 ** 32);
      this.setCommon(field + 4, 4, Math.floor(addr / 2 ** 32));
    }
    this.setCommon(COMMON.queueEnable, 2, 1);
    return driver;
  }
  notify(index: number): void {
    this.write(NOTIFY_OFFSET + index * NOTIFY_OFF_MULTIPLIER, 2, index);
  }
}

t.test('the PCI layout: IDs, BARs, the four virtio capabilities and MSI-X', async (t) => {
  const { fn } = new Rig();
  const l = fn.layout;
  t.equal(l.vendorId, 0x1af4);
  t.equal(l.deviceId, 0x1040 + 42, 'modern device ID: 0x1040 + virtio ID');
  t.ok(l.subsystemId >= 0x40, 'subsystem ID >= 0x40 (modern only)');
  t.equal(l.revision, 1);
  const types = l.capabilities.map((c) => [c[0], c[3]]);
  t.same(types, [[PCI_CAP_ID_VNDR, CAP_COMMON_CFG], [PCI_CAP_ID_VNDR, CAP_ISR_CFG], [PCI_CAP_ID_VNDR, CAP_NOTIFY_CFG], [PCI_CAP_ID_VNDR, CAP_DEVICE_CFG]]);
  const notify = new DataView(l.capabilities[2]!.buffer);
  t.equal(notify.getUint8(2), 20, 'notify capability is 20 bytes');
  t.equal(notify.getUint32(16, true), NOTIFY_OFF_MULTIPLIER, 'notify_off_multiplier');
  t.equal(notify.getUint32(12, true), QUEUES * NOTIFY_OFF_MULTIPLIER, 'one doorbell per queue');
  t.equal(new DataView(l.capabilities[3]!.buffer).getUint32(12, true), 16, 'device config of the model\'s size');
  t.equal(l.msixCapability[0], PCI_CAP_ID_MSIX);
  t.equal(new DataView(l.msixCapability.buffer).getUint16(2, true), QUEUES, 'table size N-1 for a vector per queue plus config');
  for (const cap of l.capabilities) {
    const v = new DataView(cap.buffer);
    const bar = l.bars.find((b) => b.index === v.getUint8(4));
    t.ok(bar !== undefined && v.getUint32(8, true) + v.getUint32(12, true) <= bar.size, `capability ${cap[3]} inside its BAR`);
  }
});

t.test('feature negotiation through the select and window registers', async (t) => {
  const r = new Rig();
  t.equal(r.common(COMMON.numQueues, 2), QUEUES);
  const offered = r.features();
  t.ok((offered & F_VERSION_1) !== 0n && (offered & INVERT_F_TEST) !== 0n, 'VERSION_1 and the model bit offered');
  r.setCommon(COMMON.deviceFeatureSelect, 4, 7);
  t.equal(r.common(COMMON.deviceFeature, 4), 0, 'a select beyond the feature words reads 0');
  r.negotiate(F_VERSION_1 | INVERT_F_TEST | (1n << 60n));
  t.equal(r.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 'FEATURES_OK kept');
  t.equal(r.fn.core.features, F_VERSION_1 | INVERT_F_TEST, 'the unoffered bit masked off');
  t.equal(r.fn.core.counters.unofferedFeatureBits, 1, 'and counted');

  const legacy = new Rig();
  legacy.negotiate(INVERT_F_TEST);
  t.equal(legacy.status() & STATUS_FEATURES_OK, 0, 'without VERSION_1 FEATURES_OK does not stick');
});

t.test('queue set-up, a doorbell served by the model, INTx with the read-to-clear ISR', async (t) => {
  const r = new Rig();
  r.negotiate(F_VERSION_1);
  r.setCommon(COMMON.queueSelect, 2, 0);
  t.equal(r.common(COMMON.queueSize, 2), 128, 'queue_size reads the model\'s maximum');
  t.equal(r.common(COMMON.queueNotifyOff, 2), 0);
  r.setCommon(COMMON.queueSelect, 2, QUEUES);
  t.equal(r.common(COMMON.queueSize, 2), 0, 'a queue beyond num_queues reads size 0');
  const q0 = r.setupQueue(0, 16);
  r.setCommon(COMMON.queueSelect, 2, 0);
  t.equal(BigInt(r.common(COMMON.queueDesc, 8)), BigInt(q0.descAddr), 'queue_desc reads back (64-bit read)');
  t.equal(r.common(COMMON.queueEnable, 2), 1);
  r.setCommon(COMMON.queueSize, 2, 32);
  t.equal(r.common(COMMON.queueSize, 2), 16, 'queue_size cannot change once enabled');
  t.equal(r.fn.counters.lateQueueWrites, 1);
  r.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  t.equal(r.device.activations, 1, 'DRIVER_OK activated the model');

  const built = q0.add({ buffers: [{ len: 4 }, { len: 8, write: true }] });
  r.mem.write(built.segments[0]!.addr, Uint8Array.of(1, 2, 3, 4));
  r.notify(0);
  t.equal(r.device.served, 1, 'the doorbell reached the model');
  t.same(q0.readUsed(), [{ id: built.id, len: 4 }]);
  t.equal(r.intxRaised, 1, 'INTx asserted');
  r.fn.intxUnmasked();
  t.equal(r.intxRaised, 2, 'an unmask while the ISR holds a reason asserts INTx again (level-triggered)');
  t.equal(r.read(ISR_OFFSET, 1), ISR_QUEUE, 'ISR: queue interrupt');
  t.equal(r.read(ISR_OFFSET, 1), 0, 'reading cleared it');
  r.fn.intxUnmasked();
  t.equal(r.intxRaised, 2, 'no reason left: the unmask raises nothing');
});

t.test('MSI-X: queue and config vectors, an out-of-range vector reads back NO_VECTOR', async (t) => {
  const r = new Rig();
  r.msix = true;
  r.negotiate(F_VERSION_1);
  r.setCommon(COMMON.msixConfig, 2, 0);
  t.equal(r.common(COMMON.msixConfig, 2), 0);
  const q0 = r.setupQueue(0, 8);
  r.setCommon(COMMON.queueSelect, 2, 0);
  r.setCommon(COMMON.queueMsixVector, 2, 1);
  t.equal(r.common(COMMON.queueMsixVector, 2), 1);
  r.setCommon(COMMON.queueSelect, 2, 1);
  r.setCommon(COMMON.queueMsixVector, 2, 99);
  t.equal(r.common(COMMON.queueMsixVector, 2), NO_VECTOR, 'a vector beyond the table is refused');
  r.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  q0.add({ buffers: [{ len: 2 }, { len: 2, write: true }] });
  r.notify(0);
  t.same(r.msixSent, [1], 'queue 0 signalled on its vector');
  t.equal(r.intxRaised, 0, 'no INTx with MSI-X on');
  t.equal(r.fn.isrStatus, 0, 'the ISR is not used with MSI-X');
  r.fn.core.configChanged();
  t.same(r.msixSent, [1, 0], 'a config change on msix_config\'s vector');
});

t.test('the device configuration window, bad accesses, read-only fields, reset', async (t) => {
  const r = new Rig();
  t.equal(r.read(DEVICE_CFG_OFFSET, 4), INVERT_CONFIG_MAGIC, 'config through BAR0');
  t.equal(r.read(DEVICE_CFG_OFFSET + 8, 8), 0x1122_3344_5566_7788n, '64-bit config read');
  t.notOk(r.write(DEVICE_CFG_OFFSET, 4, 1), 'a write to read-only device config is refused');
  t.notOk(r.fn.barRead(VIRTIO_BAR, 0x3ffc, new Uint8Array(4)), 'nothing at the end of the BAR');
  t.notOk(r.fn.barRead(1, 0, new Uint8Array(4)), 'no BAR1');
  t.notOk(r.fn.barRead(VIRTIO_BAR, COMMON_OFFSET, new Uint8Array(16)), 'a 16-byte access is not a register access');
  t.equal(r.fn.counters.badAccesses, 3, 'counted');
  r.setCommon(COMMON.numQueues, 2, 9);
  t.equal(r.common(COMMON.numQueues, 2), QUEUES, 'num_queues is read-only');
  t.equal(r.fn.counters.readOnlyWrites, 1);

  r.negotiate(F_VERSION_1);
  r.setupQueue(0, 8);
  r.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  r.setCommon(COMMON.deviceStatus, 1, 0);
  t.equal(r.status(), 0, 'status 0 after the reset write');
  t.equal(r.device.resets, 1, 'the model was reset');
  r.setCommon(COMMON.queueSelect, 2, 0);
  t.equal(r.common(COMMON.queueEnable, 2), 0, 'queues disabled again');
  t.equal(r.common(COMMON.queueSize, 2), 128, 'queue size back to the maximum');
});

t.test('a queue outside guest memory is refused with NEEDS_RESET; a memory change rebuilds a running queue', async (t) => {
  const r = new Rig();
  r.negotiate(F_VERSION_1);
  r.setCommon(COMMON.queueSelect, 2, 1);
  r.setCommon(COMMON.queueSize, 2, 8);
  r.setCommon(COMMON.queueDesc, 8, 0x9000_0000n);
  r.setCommon(COMMON.queueEnable, 2, 1);
  t.equal(r.common(COMMON.queueEnable, 2), 0, 'the enable did not take');
  t.equal(r.fn.counters.badQueues, 1);
  t.ok(r.status() & STATUS_DEVICE_NEEDS_RESET, 'NEEDS_RESET');
  t.ok(r.fn.isrStatus & ISR_CONFIG, 'with a configuration interrupt');

  const s = new Rig();
  s.negotiate(F_VERSION_1);
  const q = s.setupQueue(0, 8);
  s.setCommon(COMMON.deviceStatus, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  const [region] = s.mem.memory.regionList;
  s.fn.setMemory(new GuestMemory([{ guestPhysAddr: region!.guestPhysAddr, size: region!.size, buffer: region!.buffer, bufferOffset: region!.bufferOffset }]));
  t.equal(s.device.memoryMaps.length, 1, 'the model heard of the new map');
  q.add({ buffers: [{ len: 1 }, { len: 1, write: true }] });
  s.notify(0);
  t.equal(s.device.served, 1, 'the rebuilt queue serves');
  s.fn.setMemory(GuestMemory.empty());
  t.ok(s.status() & STATUS_DEVICE_NEEDS_RESET, 'a queue whose memory went away breaks the device');
});
