// Feature negotiation of the virtio-rdma device through the virtio device core (vmm-device/virtio): the core asks
// the model (VirtioDeviceModel.acceptFeatures) before it keeps FEATURES_OK, so a driver that accepts neither RC
// nor UD sees FEATURES_OK refused at once (spec 4.2), instead of a device that fails only at DRIVER_OK.

import t, { type Test } from 'tap';
import { FeatureBit } from '../../vmm-device/abi/rdma/index.ts';
import { VirtioDeviceCore } from '../../vmm-device/virtio/core.ts';
import type { VirtioDeviceModel } from '../../vmm-device/virtio/device.ts';
import {
  F_VERSION_1,
  STATUS_ACKNOWLEDGE as ACK,
  STATUS_DRIVER as DRV,
  STATUS_FEATURES_OK as FOK,
} from '../../vmm-device/abi/virtio.ts';
import { RdmaDevice, StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { TABLE } from './guest.ts';

const V1 = 1n << F_VERSION_1;
const RC = 1n << BigInt(FeatureBit.RC);
const UD = 1n << BigInt(FeatureBit.UD);

async function device(t: Test): Promise<RdmaDevice> {
  const d = await RdmaDevice.open({ verbs: new FakeVerbs(), hostDevice: 'fake0', vmId: 'vm-a', resolver: new StaticAddressResolver(TABLE), log: new RecordingLogger('device'), aliases: new FakeAliasMapper() });
  t.teardown(() => d.close());
  return d;
}

/** ACKNOWLEDGE, DRIVER, the feature write, FEATURES_OK; returns the status the driver reads back. */
function negotiate(core: VirtioDeviceCore, features: bigint): number {
  core.setStatus(ACK);
  core.setStatus(ACK | DRV);
  core.setDriverFeatures(features);
  core.setStatus(ACK | DRV | FOK);
  return core.deviceStatus;
}

t.test('FEATURES_OK is refused by the RDMA device when the driver accepts neither RC nor UD', async (t) => {
  const log = new RecordingLogger('core');
  const core = new VirtioDeviceCore(await device(t), { interrupt: () => undefined, configInterrupt: () => undefined }, log);
  t.equal(negotiate(core, V1) & FOK, 0, 'FEATURES_OK not kept: the driver sees the refusal');
  t.equal(core.counters.featuresRejected, 1, 'counted');
  t.ok(log.lines.some((e) => /refused by the device model/.test(e.message)), 'logged');
  core.setStatus(0);
  for (const [name, f] of [['RC', V1 | RC], ['UD', V1 | UD], ['RC and UD', V1 | RC | UD]] as const) {
    t.equal(negotiate(core, f) & FOK, FOK, `accepted with ${name}`);
    core.setStatus(0);
  }
  t.equal(core.counters.featuresRejected, 1, 'no other refusal');
  t.equal(negotiate(core, RC | UD) & FOK, 0, 'without VERSION_1 the core refuses before asking the model');
  t.equal(core.counters.featuresRejected, 2);
});

t.test('a model without acceptFeatures is not asked; one that throws gets FEATURES_OK refused, not a crash', async (t) => {
  const base = await device(t);
  const plain: VirtioDeviceModel = {
    deviceId: base.deviceId,
    queueCount: base.queueCount,
    deviceFeatures: base.deviceFeatures,
    configSize: base.configSize,
    maxQueueSize: () => 256,
    readConfig: () => undefined,
    writeConfig: () => false,
    activate: () => undefined,
    queueNotify: () => undefined,
    reset: () => undefined,
  };
  const hooks = { interrupt: () => undefined, configInterrupt: () => undefined };
  t.equal(negotiate(new VirtioDeviceCore(plain, hooks, new RecordingLogger('core')), V1) & FOK, FOK, 'no hook: VERSION_1 is enough');
  const throwing: VirtioDeviceModel = {
    ...plain,
    acceptFeatures: () => {
      throw new Error('model bug');
    },
  };
  const log = new RecordingLogger('core');
  const core = new VirtioDeviceCore(throwing, hooks, log);
  t.equal(negotiate(core, V1 | RC) & FOK, 0, 'refused');
  t.equal(core.counters.featuresRejected, 1);
  t.ok(log.lines.some((e) => e.level === 'error' && /model bug/.test(JSON.stringify(e))), 'the failure is logged');
});
