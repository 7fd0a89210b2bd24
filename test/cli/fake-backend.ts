// `vrdma-backend` as its own process over a verbs double: what test/cli/host-ledger.test.ts starts twice to have
// two backends of one host. The double plays one host device shared by the backends (its limits from FAKE_LIMITS);
// the ledger in --host-dir is what the backends really share. Exits with run()'s code.

import { run } from '../../vmm-device/cli/main.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import type { DeviceAttr, DeviceHandle } from '../../vmm-device/verbs/host-verbs.ts';

const limits = JSON.parse(process.env['FAKE_LIMITS'] ?? '{}') as { maxQp?: number; maxCq?: number; maxMr?: number; maxPd?: number; maxAh?: number };

class SharedDeviceDouble extends FakeVerbs {
  override async queryDevice(device: DeviceHandle): Promise<DeviceAttr> {
    const a = await super.queryDevice(device);
    return { ...a, ...(limits.maxAh === undefined ? {} : { maxAh: limits.maxAh }) };
  }
}

const code = await run(process.argv.slice(2), {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
  verbs: async () => new SharedDeviceDouble(limits),
});
process.exit(code);
