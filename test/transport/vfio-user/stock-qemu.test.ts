// The peers of the vfio-user transport, before any server of ours: an UNMODIFIED QEMU (Debian trixie-backports,
// run from its chroot by scripts/vfio-user/stock-qemu.sh) attaches libvfio-user's own sample server (built from
// the copy Debian bundles in its qemu source by scripts/vfio-user/libvfio-user.sh) as a vfio-user-pci function,
// and the qtest guest sees that server's PCI function: the toolchain issue 13 builds on works end to end.
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PciConfig, QemuQtest, enumerateBus0 } from '../../../guest-driver-spec/qtest/index.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
/** libvfio-user's gpio-pci-idio-16 sample presents this PCI function (samples/gpio-pci-idio-16.c). */
const SAMPLE_VENDOR_ID = 0x494f;
const SAMPLE_DEVICE_ID = 0x0dc8;
/** How long the sample server may take to create its socket. */
const SOCKET_WAIT_MS = 10_000;

function lastLine(script: string): string {
  return execFileSync('bash', [path.join(root, script)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop()!;
}

async function waitForFile(file: string, ms: number): Promise<void> {
  const until = Date.now() + ms;
  while (!fs.existsSync(file)) {
    if (Date.now() > until) throw new Error(`${file} did not appear within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

t.test('stock QEMU attaches a libvfio-user server as a vfio-user-pci function', async (t) => {
  const qemuBinary = lastLine('scripts/vfio-user/stock-qemu.sh');
  const version = execFileSync(qemuBinary, ['--version'], { encoding: 'utf8' }).split('\n')[0]!;
  t.comment(`stock QEMU: ${version}`);
  t.match(version, /^QEMU emulator version (\d+)\.(\d+)/, 'the wrapper runs the chroot QEMU');
  const [, major, minor] = /version (\d+)\.(\d+)/.exec(version)!.map(Number) as [number, number, number];
  t.ok(major! > 10 || (major === 10 && minor! >= 1), `QEMU ${major}.${minor} has the vfio-user client (>= 10.1)`);

  const prefix = lastLine('scripts/vfio-user/libvfio-user.sh');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vfio-user-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'gpio.sock');
  const server = spawn(path.join(prefix, 'bin/gpio-pci-idio-16'), [socketPath], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, LD_LIBRARY_PATH: path.join(prefix, 'lib') },
  });
  server.stderr!.resume();
  t.teardown(() => server.kill('SIGKILL'));
  await waitForFile(socketPath, SOCKET_WAIT_MS);

  const qemu = await QemuQtest.start({
    binary: qemuBinary,
    workDir: dir,
    args: ['-device', JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socketPath, type: 'unix' } })],
  });
  t.teardown(() => qemu.stop());
  const functions = await enumerateBus0(new PciConfig(qemu.qtest));
  const sample = functions.find((f) => f.vendorId === SAMPLE_VENDOR_ID);
  t.ok(sample, `the server's function is on bus 0 (found ${functions.map((f) => f.vendorId.toString(16) + ':' + f.deviceId.toString(16)).join(', ')})`);
  t.equal(sample?.deviceId, SAMPLE_DEVICE_ID, 'with the device ID the server set');

  await qemu.stop();
  const chrootDir = path.join(path.dirname(qemuBinary), 'root');
  const leftMounts = fs.readFileSync('/proc/mounts', 'utf8').split('\n').filter((l) => l.includes(chrootDir));
  t.same(leftMounts, [], 'the chroot\'s bind mounts went with the QEMU process (private mount namespace)');
});
