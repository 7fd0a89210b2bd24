// Attaches a device model to a guest the reference driver can use: the device's own vhost-user server, and in
// front of it either a real QEMU (qtest mode, the project's vhost-user-device-pci with virtio ID 42) or the
// reference vhost-user front-end; or the device's vfio-user server with an UNMODIFIED QEMU in front
// (vfio-user-pci, scripts/vfio-user/stock-qemu.sh). The demo, bench:rdma and the tests that run two VMs share it.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';
import type { VirtioDeviceModel } from '../../vmm-device/virtio/device.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { VfioUserServer } from '../../vmm-device/transport/vfio-user/server.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { GuestRam } from '../frontend/guest-ram.ts';
import { QemuQtest } from '../qtest/index.ts';
import { QtestTransport } from './qtest-transport.ts';
import type { DriverTransport } from './transport.ts';
import { VhostUserTransport } from './vhost-user-transport.ts';

/**
 * Who plays the VMM: the project's QEMU under qtest (vhost-user), the reference vhost-user front-end, or an
 * unmodified QEMU under qtest with the device as a vfio-user PCI function.
 */
export type TransportKind = 'qemu' | 'frontend' | 'vfio-user';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
let stockQemuPath: string | undefined;

/**
 * The unmodified QEMU (>= 10.1, the vfio-user client): $VRDMA_STOCK_QEMU if set (scripts/demo.sh sets it outside
 * the test host, whose root is read-only), else the last line scripts/vfio-user/stock-qemu.sh prints (it installs
 * the chroot when the cache lacks it).
 */
export function findStockQemu(): string {
  stockQemuPath ??= process.env['VRDMA_STOCK_QEMU'] || execFileSync('bash', [path.join(repoRoot, 'scripts/vfio-user/stock-qemu.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop()!;
  return stockQemuPath;
}

/** The first line of `<binary> --version` ("QEMU emulator version ..."): tests and the demo print it. */
export function qemuVersion(binary: string): string {
  return execFileSync(binary, ['--version'], { encoding: 'utf8' }).split('\n')[0]!;
}

/** QEMU's device line for a vfio-user PCI function served on `socketPath`. */
export function vfioUserDeviceArgs(socketPath: string): string[] {
  return ['-device', JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socketPath, type: 'unix' } })];
}

/** The QEMU device line for a vhost-user virtio-rdma device on chardev `chardev` (three queues of 256). */
export const QEMU_RDMA_DEVICE = 'vhost-user-device-pci,chardev=vu,virtio-id=42,num_vqs=3,vq_size=256,config_size=128,page-per-vq=on';

/** Releases run last-in first-out; every release runs even when one fails, and the failures are returned. */
export class Cleanups {
  private readonly steps: { what: string; run: () => Promise<unknown> }[] = [];

  add(what: string, run: () => Promise<unknown>): void {
    this.steps.push({ what, run });
  }

  async runAll(): Promise<string[]> {
    const errors: string[] = [];
    for (const step of this.steps.splice(0).reverse()) {
      try {
        await step.run();
      } catch (e) {
        errors.push(`release of ${step.what}: ${(e as Error).message}`);
      }
    }
    return errors;
  }
}

export interface AttachOptions {
  kind: TransportKind;
  model: VirtioDeviceModel & { queueCount: number };
  host: SysHost;
  /** Where the socket (and QEMU's files) go. */
  dir: string;
  /** Names the socket, the logs and the cleanup steps. */
  name: string;
  cleanups: Cleanups;
  /** Guest RAM of the front-end variant (one region at guest-physical 0). */
  frontendRamBytes: number;
}

/**
 * Serves `model` over vhost-user and opens the driver's transport to it through QEMU or the reference front-end;
 * or over vfio-user through the unmodified QEMU.
 */
export async function attachDevice(o: AttachOptions): Promise<DriverTransport> {
  const socketPath = path.join(o.dir, `${o.name}.sock`);
  if (o.kind === 'vfio-user') {
    const server = new VfioUserServer({ path: socketPath, host: o.host, model: o.model, log: new RecordingLogger(`${o.name}-vfio-user`) });
    server.listen();
    o.cleanups.add(`${o.name} vfio-user server`, async () => server.close());
    const qemu = await QemuQtest.start({ binary: findStockQemu(), workDir: o.dir, args: vfioUserDeviceArgs(socketPath) });
    o.cleanups.add(`${o.name} QEMU`, () => qemu.stop());
    const transport = await QtestTransport.open({ qemu, host: o.host });
    o.cleanups.add(`${o.name} qtest transport`, () => transport.close());
    return transport;
  }
  const server = new VhostUserServer({ path: socketPath, host: o.host, model: o.model, log: new RecordingLogger(`${o.name}-vhost-user`) });
  server.listen();
  o.cleanups.add(`${o.name} vhost-user server`, async () => server.close());
  if (o.kind === 'qemu') {
    const qemu = await QemuQtest.start({ workDir: o.dir, args: ['-chardev', `socket,id=vu,path=${socketPath}`, '-device', QEMU_RDMA_DEVICE] });
    // QEMU's exit closes the vhost-user connection, which releases the VM's host objects.
    o.cleanups.add(`${o.name} QEMU`, () => qemu.stop());
    const transport = await QtestTransport.open({ qemu, host: o.host });
    o.cleanups.add(`${o.name} qtest transport`, () => transport.close());
    return transport;
  }
  const ram = new GuestRam(o.host, [{ gpa: 0, size: o.frontendRamBytes }]);
  o.cleanups.add(`${o.name} guest RAM`, async () => ram.release());
  const transport = await VhostUserTransport.open({ host: o.host, socketPath, ram, queues: o.model.queueCount });
  o.cleanups.add(`${o.name} front-end transport`, () => transport.close());
  return transport;
}
