import t from 'tap';
import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import {
  VirtioDeviceCore,
  drainQueue,
  bit,
  F_VERSION_1,
  F_EVENT_IDX,
  STATUS_ACKNOWLEDGE as ACK,
  STATUS_DRIVER as DRV,
  STATUS_FEATURES_OK as FOK,
  STATUS_DRIVER_OK as DOK,
  STATUS_DEVICE_NEEDS_RESET,
  type ActivationContext,
  type VirtioDeviceModel,
} from '../../vmm-device/virtio/index.ts';
import { SplitQueue } from '../../vmm-device/virtqueue/index.ts';

/** A device with 8 bytes of config (bytes 0-3 read-only, 4-7 writable) that records what the core did to it. */
class RecordingModel implements VirtioDeviceModel {
  readonly deviceId = 42;
  readonly queueCount = 2;
  readonly deviceFeatures = bit(0n) | bit(1n);
  readonly configSize = 8;
  readonly config = Uint8Array.from([1, 2, 3, 4, 0, 0, 0, 0]);
  ctx: ActivationContext | undefined;
  resets = 0;
  kicks: number[] = [];
  maxQueueSize(): number {
    return 256;
  }
  readConfig(offset: number, dest: Uint8Array): void {
    dest.set(this.config.subarray(offset, offset + dest.length));
  }
  writeConfig(offset: number, src: Uint8Array): boolean {
    if (offset < 4) return false;
    this.config.set(src, offset);
    return true;
  }
  activate(ctx: ActivationContext): void {
    this.ctx = ctx;
  }
  queueNotify(index: number): void {
    this.kicks.push(index);
    const q = this.ctx!.queues[index]!;
    const err = drainQueue(q, (c) => q.pushUsed(c, 0));
    if (err !== undefined) this.ctx!.queueBroken(index, err);
  }
  reset(): void {
    this.resets++;
    this.ctx = undefined;
  }
}

function setup() {
  const model = new RecordingModel();
  const log = new RecordingLogger();
  const irqs: string[] = [];
  const core = new VirtioDeviceCore(model, { interrupt: (i) => irqs.push(`q${i}`), configInterrupt: () => irqs.push('config') }, log);
  return { model, log, irqs, core };
}

function initTo(core: VirtioDeviceCore, features: bigint): void {
  core.setStatus(ACK);
  core.setStatus(ACK | DRV);
  core.setDriverFeatures(features);
  core.setStatus(ACK | DRV | FOK);
}

t.test('feature bits never offered are masked, counted and logged', async (t) => {
  const { core, log } = setup();
  t.equal(core.offeredFeatures & bit(F_VERSION_1), bit(F_VERSION_1), 'VERSION_1 offered');
  initTo(core, bit(F_VERSION_1) | bit(0n) | bit(5n));
  t.equal(core.features, bit(F_VERSION_1) | bit(0n));
  t.equal(core.counters.unofferedFeatureBits, 1);
  t.match(log.lines.map((l) => l.message).join('\n'), /not offered/);
  t.equal(core.deviceStatus, ACK | DRV | FOK);
});

t.test('FEATURES_OK is refused without VERSION_1', async (t) => {
  const { core } = setup();
  initTo(core, bit(0n));
  t.equal(core.deviceStatus & FOK, 0, 'driver reads back status without FEATURES_OK');
  t.equal(core.counters.featuresRejected, 1);
  core.setStatus(ACK | DRV | FOK | DOK);
  t.equal(core.isActive, false, 'never activated');
});

t.test('status writes must follow the initialisation order', async (t) => {
  const { core } = setup();
  core.setStatus(DRV);
  t.equal(core.deviceStatus, 0, 'DRIVER without ACKNOWLEDGE ignored');
  core.setStatus(ACK);
  core.setStatus(ACK | DRV | FOK | DOK);
  t.equal(core.deviceStatus, ACK, 'skipping FEATURES_OK ignored');
  core.setStatus(ACK | DRV);
  core.setDriverFeatures(bit(F_VERSION_1));
  core.setStatus(ACK | DRV | FOK);
  core.setStatus(ACK | FOK);
  t.equal(core.deviceStatus, ACK | DRV | FOK, 'clearing a bit without reset ignored');
  core.setDriverFeatures(bit(F_VERSION_1) | bit(F_EVENT_IDX));
  t.equal(core.features, bit(F_VERSION_1), 'feature write after FEATURES_OK ignored');
  t.equal(core.counters.invalidStatusWrites, 3);
  t.equal(core.counters.lateFeatureWrites, 1);
});

t.test('config space accesses are bounds-checked; read-only ranges refuse writes', async (t) => {
  const { core, model } = setup();
  t.same(core.readConfig(0, 4), Uint8Array.from([1, 2, 3, 4]));
  t.equal(core.readConfig(6, 4), undefined, 'crosses the end');
  t.equal(core.readConfig(-1, 1), undefined);
  t.equal(core.writeConfig(0, Uint8Array.of(9)), false, 'read-only');
  t.equal(core.writeConfig(4, Uint8Array.of(9, 9)), true);
  t.equal(model.config[5], 9);
  t.equal(core.writeConfig(7, Uint8Array.of(1, 1)), false, 'out of bounds');
  t.equal(core.counters.configAccessErrors, 4);
  const g = core.configGeneration;
  core.configChanged();
  t.equal(core.configGeneration, g + 1);
});

t.test('DRIVER_OK activates; a broken ring sets NEEDS_RESET, stops the queue and notifies; reset releases', async (t) => {
  const { core, model, irqs } = setup();
  const buf = new ArrayBuffer(0x10000);
  const memory = new GuestMemory([{ guestPhysAddr: 0, size: 0x10000, buffer: buf }]);
  const bytes = new Uint8Array(buf);
  const size = 16;
  const q = new SplitQueue({
    size,
    rings: { desc: bytes.subarray(0, 256), driver: bytes.subarray(0x1000, 0x1000 + 38), device: bytes.subarray(0x2000, 0x2000 + 134) },
    memory,
    eventIdx: false,
    indirect: false,
  });
  core.setMemory(memory);
  core.setQueue(0, q);
  core.notify(0);
  t.equal(core.counters.ignoredKicks, 1, 'kick before DRIVER_OK ignored');
  initTo(core, bit(F_VERSION_1));
  core.setStatus(ACK | DRV | FOK | DOK);
  t.equal(core.isActive, true);
  t.ok(model.ctx);
  // The driver publishes avail.idx = size + 1: more than a queue can hold.
  new DataView(buf).setUint16(0x1002, size + 1, true);
  core.notify(0);
  t.same(model.kicks, [0]);
  t.equal(core.deviceStatus & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
  t.equal(core.counters.queueErrors, 1);
  t.same(irqs, ['config']);
  t.equal(core.isQueueStopped(0), true);
  core.notify(0);
  t.same(model.kicks, [0], 'stopped queue gets no more kicks');
  core.setStatus(0);
  t.equal(model.resets, 1);
  t.equal(core.deviceStatus, 0);
  t.equal(core.queue(0), undefined);
});
