// What observing costs the device side per chain (pop + pushUsed of a 64-byte request with a 16-byte answer):
// the bare queue, the queue behind the model wrapper with the recorder off (--flight-events 0: only the control
// queue is timed), and with the flight recorder on. Same run, alternating, ratios against the bare queue.
//   npx tsx test/observe/recorder-overhead.ts
import { SplitDriver, TestGuestMemory } from '../../guest-driver-spec/testkit/index.ts';
import { SplitQueue } from '../../vmm-device/virtqueue/index.ts';
import { observeModel } from '../../vmm-device/observe/observed-model.ts';
import { FlightRecorder, NO_RECORDER } from '../../vmm-device/observe/recorder.ts';
import type { VirtioDeviceModel, ActivationContext } from '../../vmm-device/virtio/device.ts';
import type { DeviceQueue } from '../../vmm-device/virtqueue/queue.ts';

function run(mode: 'plain' | 'wrapper' | 'recorder', n: number): number {
  const mem = new TestGuestMemory({ regions: [{ gpa: 0x10000, size: 4 << 20 }], rng: 1, maxGap: 0 });
  const d = new SplitDriver({ mem, size: 256 });
  let q: DeviceQueue = new SplitQueue(d.queueOptions());
  if (mode !== 'plain') {
    let got: DeviceQueue | undefined;
    const model = { deviceId: 42, queueCount: 1, deviceFeatures: 0n, configSize: 0, maxQueueSize: () => 256, readConfig() {}, writeConfig: () => false, activate(ctx: ActivationContext) { got = ctx.queues[0]; }, queueNotify() {}, reset() {} } as VirtioDeviceModel;
    const w = observeModel(model, { recorder: mode === 'recorder' ? new FlightRecorder({ device: {} }) : NO_RECORDER });
    w.activate({ features: 0n, memory: mem.memory, queues: [q], interrupt() {}, queueBroken() {}, deviceFailed() {}, log: { log() {}, child() { return this; } } });
    q = got!;
  }
  const req = mem.alloc(64, { align: 8 });
  const resp = mem.alloc(16, { align: 8 });
  const chains: any[] = [];
  let total = 0n;
  for (let i = 0; i < n / 128; i++) {
    for (let k = 0; k < 128; k++) d.add({ buffers: [{ addr: req, len: 64 }, { addr: resp, len: 16, write: true }] });
    const t0 = process.hrtime.bigint();
    for (let k = 0; k < 128; k++) chains.push(q.pop());
    for (const c of chains) q.pushUsed(c, 16);
    total += process.hrtime.bigint() - t0;
    chains.length = 0;
    d.readUsed();
  }
  return Number(total) / n;
}
for (let r = 0; r < 3; r++) {
  const base = run('plain', 64000), w = run('wrapper', 64000), obs = run('recorder', 64000);
  console.log(`round ${r}: device side plain ${base.toFixed(0)} ns/chain, wrapper alone ${w.toFixed(0)}, wrapper+recorder ${obs.toFixed(0)} (ratio ${(obs / base).toFixed(2)})`);
}
