// The virtio core as the guard between the transport's event loop and the device model: every call into the model
// (activation, kicks, memory map changes, configuration, feature checks, reset) goes through the core, and whatever
// the model throws stays there: NEEDS_RESET (except for a reset, which cannot be refused), counted and logged.
import t from 'tap';
import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import {
  VirtioDeviceCore,
  bit,
  F_VERSION_1,
  STATUS_ACKNOWLEDGE as ACK,
  STATUS_DRIVER as DRV,
  STATUS_FEATURES_OK as FOK,
  STATUS_DRIVER_OK as DOK,
  STATUS_DEVICE_NEEDS_RESET as NEEDS_RESET,
  type ActivationContext,
  type VirtioDeviceModel,
} from '../../vmm-device/virtio/index.ts';
import { SplitQueue } from '../../vmm-device/virtqueue/index.ts';

type Entry = 'activate' | 'queueNotify' | 'memoryChanged' | 'readConfig' | 'writeConfig' | 'acceptFeatures' | 'reset' | 'maxQueueSize';

/** A model that throws from the entries named in `failing`, and records every call. */
class ThrowingModel implements VirtioDeviceModel {
  readonly deviceId = 42;
  readonly queueCount = 1;
  readonly deviceFeatures = 0n;
  readonly configSize = 4;
  readonly failing = new Set<Entry>();
  readonly calls: Entry[] = [];
  ctx: ActivationContext | undefined;
  private enter(e: Entry): void {
    this.calls.push(e);
    if (this.failing.has(e)) throw new Error(`injected ${e} failure`);
  }
  maxQueueSize(): number {
    this.enter('maxQueueSize');
    return 16;
  }
  acceptFeatures(): boolean {
    this.enter('acceptFeatures');
    return true;
  }
  readConfig(): void {
    this.enter('readConfig');
  }
  writeConfig(): boolean {
    this.enter('writeConfig');
    return true;
  }
  activate(ctx: ActivationContext): void {
    this.enter('activate');
    this.ctx = ctx;
  }
  memoryChanged(): void {
    this.enter('memoryChanged');
  }
  queueNotify(): void {
    this.enter('queueNotify');
  }
  reset(): void {
    this.enter('reset');
  }
}

function memory(): GuestMemory {
  return new GuestMemory([{ guestPhysAddr: 0, size: 0x4000, buffer: new ArrayBuffer(0x4000) }]);
}

function queue(mem: GuestMemory): SplitQueue {
  const b = new Uint8Array(0x4000);
  return new SplitQueue({ size: 16, rings: { desc: b.subarray(0, 256), driver: b.subarray(0x1000, 0x1026), device: b.subarray(0x2000, 0x2086) }, memory: mem, eventIdx: false, indirect: false });
}

function setup(failing: Entry[] = []) {
  const model = new ThrowingModel();
  for (const f of failing) model.failing.add(f);
  const log = new RecordingLogger();
  const irqs: string[] = [];
  const core = new VirtioDeviceCore(model, { interrupt: (i) => irqs.push(`q${i}`), configInterrupt: () => irqs.push('config') }, log);
  const mem = memory();
  core.setMemory(mem);
  core.setQueue(0, queue(mem));
  const start = (): void => {
    core.setStatus(ACK);
    core.setStatus(ACK | DRV);
    core.setDriverFeatures(bit(F_VERSION_1));
    core.setStatus(ACK | DRV | FOK);
    core.setStatus(ACK | DRV | FOK | DOK);
  };
  return { model, log, irqs, core, start };
}

const needsReset = (core: VirtioDeviceCore): boolean => (core.deviceStatus & NEEDS_RESET) !== 0;

t.test('a throwing kick handler: NEEDS_RESET, counted, logged with where and the stack; nothing escapes', async (t) => {
  const { core, model, log, irqs, start } = setup(['queueNotify']);
  start();
  t.doesNotThrow(() => core.notify(0));
  t.ok(needsReset(core));
  t.equal(core.counters.deviceFailures, 1);
  t.match(log.lines.find((l) => l.message.includes('device model failed')), { level: 'error', fields: { where: 'kick of queue 0', error: 'injected queueNotify failure', stack: /Error: injected/ } });
  t.same(irqs, ['config'], 'the driver is told (configuration change)');
  core.notify(0);
  t.equal(model.calls.filter((c) => c === 'queueNotify').length, 1, 'a failed model gets no more kicks until the reset');
  t.equal(core.counters.ignoredKicks, 1);
  core.setStatus(0);
  model.failing.clear();
  core.setQueue(0, queue(memory()));
  start();
  core.notify(0);
  t.equal(model.calls.filter((c) => c === 'queueNotify').length, 2, 'after the reset it serves again');
});

t.test('a throwing memoryChanged: NEEDS_RESET; only an active model is told', async (t) => {
  const { core, model, start } = setup(['memoryChanged']);
  core.setMemory(memory());
  t.notOk(model.calls.includes('memoryChanged'), 'before DRIVER_OK the model is not told (it gets the memory at activation)');
  start();
  t.doesNotThrow(() => core.setMemory(memory()));
  t.equal(core.counters.memoryChanges, 1);
  t.ok(needsReset(core));
  t.equal(core.counters.deviceFailures, 1);
});

t.test('a throwing activation: NEEDS_RESET, the device is not active, the later reset reaches the model', async (t) => {
  const { core, model, log, start } = setup(['activate']);
  t.doesNotThrow(start);
  t.equal(core.isActive, false);
  t.ok(needsReset(core));
  t.equal(core.counters.deviceFailures, 1);
  t.match(log.lines.find((l) => l.message.includes('device model failed')), { fields: { where: 'activation' } });
  core.notify(0);
  t.equal(core.counters.ignoredKicks, 1, 'kicks of an inactive device are ignored');
  core.setStatus(0);
  t.same(model.calls.filter((c) => c === 'reset'), ['reset'], 'the half-started model is reset (releases what it made)');
});

t.test('a throwing reset: the device is reset all the same, counted and logged, nothing escapes', async (t) => {
  const { core, model, log, start } = setup(['reset']);
  start();
  t.equal(core.isActive, true);
  t.doesNotThrow(() => core.setStatus(0));
  t.equal(core.deviceStatus, 0, 'status 0: a reset cannot be refused');
  t.equal(core.isActive, false);
  t.equal(core.queue(0), undefined);
  t.equal(core.counters.deviceFailures, 1);
  t.match(log.lines.find((l) => l.message.includes('failed to reset')), { level: 'error', fields: { error: 'injected reset failure' } });
  t.ok(model.calls.includes('reset'));
});

t.test('throwing configuration accesses and queue size limits: refused, NEEDS_RESET', async (t) => {
  const { core, start } = setup(['readConfig', 'writeConfig', 'maxQueueSize']);
  start();
  t.equal(core.readConfig(0, 4), undefined);
  t.equal(core.writeConfig(0, Uint8Array.of(1)), false);
  t.equal(core.maxQueueSize(0), 0, 'no queue size is accepted');
  t.ok(needsReset(core));
  t.equal(core.counters.deviceFailures, 3);
});

t.test('a throwing feature check: FEATURES_OK refused, never activated', async (t) => {
  const { core, model, start } = setup(['acceptFeatures']);
  t.doesNotThrow(start);
  t.equal(core.deviceStatus & FOK, 0);
  t.equal(core.isActive, false);
  t.notOk(model.calls.includes('activate'));
});

t.test('deviceFailed from the model (a host event callback that caught its own error): NEEDS_RESET', async (t) => {
  const { core, model, irqs, start } = setup();
  start();
  model.ctx!.deviceFailed(new Error('completion for an unknown CQ'));
  t.ok(needsReset(core));
  t.equal(core.counters.deviceFailures, 1);
  t.same(irqs, ['config']);
});

t.test('a queue stopped by a driver bug stays stopped when the transport rebuilds it (new memory map)', async (t) => {
  const { core, start } = setup();
  start();
  core.queueBroken(0, new Error('driver bug'));
  t.ok(core.isQueueStopped(0));
  const mem = memory();
  core.setQueue(0, queue(mem));
  core.setMemory(mem);
  t.ok(core.isQueueStopped(0), 'still stopped: only a reset restarts it');
  core.setStatus(0);
  t.notOk(core.isQueueStopped(0), 'the reset clears it');
});
