// The layer rules (.dependency-cruiser.cjs) catch what they are meant to: a tree that breaks each rule once is
// cruised with the project's own configuration, and every violation must be reported under its rule's name. The
// project's tree itself is checked by `npm run check:layers` (a CI step of its own).
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync, copyFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Files of a small tree: path -> the paths it imports. */
const tree: Record<string, string[]> = {
  'vmm-device/abi/virtio.ts': ['vmm-device/util/log.ts'], // abi-is-the-bottom
  'vmm-device/util/log.ts': [],
  'vmm-device/native/sys.ts': [],
  'vmm-device/memory/guest-memory.ts': ['vmm-device/virtqueue/queue.ts'], // memory-layer (upward)
  'vmm-device/virtqueue/queue.ts': ['vmm-device/abi/virtio.ts'],
  'vmm-device/virtio/core.ts': ['vmm-device/transport/vhost-user/session.ts'], // virtio-core-layer (upward)
  'vmm-device/transport/vhost-user/session.ts': ['vmm-device/transport/vfio-user/server.ts'], // transports-are-siblings
  'vmm-device/transport/vfio-user/server.ts': ['vmm-device/virtio/core.ts'],
  'vmm-device/rdma/device.ts': ['vmm-device/native/sys.ts', 'vmm-device/rdma/data-path.ts'], // rdma-model-layer
  'vmm-device/rdma/data-path.ts': ['vmm-device/rdma/device.ts'], // no-circular
  'vmm-device/verbs/host-verbs.ts': ['vmm-device/rdma/device.ts'], // verbs-layer (upward)
  'vmm-device/vpc/engine.ts': ['vmm-device/transport/vhost-user/session.ts'], // vpc-beside-the-model
  'vmm-device/cli/main.ts': ['guest-driver-spec/driver/driver.ts'], // device-not-above-tooling
  'guest-driver-spec/driver/driver.ts': ['vmm-device/abi/virtio.ts'],
};

function cruise(dir: string): Set<string> {
  let out: string;
  try {
    out = execFileSync(join(root, 'node_modules/.bin/depcruise'), ['--config', '.dependency-cruiser.cjs', '--output-type', 'json', 'vmm-device', 'guest-driver-spec'], {
      cwd: dir,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
  } catch (e) {
    out = (e as { stdout: string }).stdout; // exits non-zero when it finds violations
  }
  const result = JSON.parse(out) as { summary: { violations: { rule: { name: string }; from: string; to: string }[] } };
  return new Set(result.summary.violations.map((v) => `${v.rule.name} ${v.from}`));
}

t.test('every layer rule reports the import that breaks it', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vrdma-layers-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  for (const [file, imports] of Object.entries(tree)) {
    mkdirSync(join(dir, dirname(file)), { recursive: true });
    const lines = imports.map((imp, i) => {
      let rel = join(...new Array(file.split('/').length - 1).fill('..'), imp);
      if (!rel.startsWith('.')) rel = './' + rel;
      return `import * as m${i} from '${rel}';\nexport const u${i} = m${i};`;
    });
    writeFileSync(join(dir, file), lines.join('\n') + '\nexport const here = 1;\n');
  }
  copyFileSync(join(root, '.dependency-cruiser.cjs'), join(dir, '.dependency-cruiser.cjs'));
  copyFileSync(join(root, 'tsconfig.json'), join(dir, 'tsconfig.json'));
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
  const found = cruise(dir);
  const expected = [
    'abi-is-the-bottom vmm-device/abi/virtio.ts',
    'memory-layer vmm-device/memory/guest-memory.ts',
    'virtio-core-layer vmm-device/virtio/core.ts',
    'transports-are-siblings vmm-device/transport/vhost-user/session.ts',
    'rdma-model-layer vmm-device/rdma/device.ts',
    'no-circular vmm-device/rdma/data-path.ts',
    'verbs-layer vmm-device/verbs/host-verbs.ts',
    'vpc-beside-the-model vmm-device/vpc/engine.ts',
    'device-not-above-tooling vmm-device/cli/main.ts',
  ];
  for (const e of expected) t.ok(found.has(e), `reported: ${e}`);
  // Allowed imports stay quiet: the queue importing the ABI, the driver importing the device's ABI.
  t.notOk([...found].some((f) => f.endsWith(' vmm-device/virtqueue/queue.ts')), 'virtqueue -> abi is allowed');
  t.notOk([...found].some((f) => f.endsWith(' guest-driver-spec/driver/driver.ts')), 'guest-driver-spec -> vmm-device is allowed');
  t.end();
});
