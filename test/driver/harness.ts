// A driver rig over real vhost-user: a back-end server on a unix socket in a temporary folder with a device model
// behind it, memfd guest RAM in two regions with a hole between them, and the driver's transport over the
// reference front-end. finish() closes everything and reports native mappings and watchers left over.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { VhostUserTransport } from '../../guest-driver-spec/driver/index.ts';
import { nativeStats } from '../../vmm-device/native/sys.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import type { VirtioDeviceModel } from '../../vmm-device/virtio/device.ts';

export const host = new SysHost();

/** Guest RAM of the rig: 4 MiB at 0 and 8 MiB at 256 MiB (a hole between, as on a PC with a PCI window). */
export const RIG_RAM = [
  { gpa: 0, size: 4 << 20 },
  { gpa: 0x1000_0000, size: 8 << 20 },
] as const;

export interface DriverRig {
  server: VhostUserServer;
  ram: GuestRam;
  transport: VhostUserTransport;
  log: RecordingLogger;
  finish(): Promise<{ watchers: number; mappings: number }>;
}

let counter = 0;

export async function driverRig(model: VirtioDeviceModel, queues = 3): Promise<DriverRig> {
  const before = nativeStats();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-driver-'));
  const socketPath = path.join(dir, `d${counter++}.sock`);
  const log = new RecordingLogger('driver-test');
  const server = new VhostUserServer({ path: socketPath, host, model, log });
  server.listen();
  const ram = new GuestRam(host, RIG_RAM.map((r) => ({ ...r })));
  let transport: VhostUserTransport;
  try {
    transport = await VhostUserTransport.open({ host, socketPath, ram, queues });
  } catch (e) {
    server.close();
    ram.release();
    throw e;
  }
  return {
    server,
    ram,
    transport,
    log,
    finish: async () => {
      await transport.close();
      server.close();
      ram.release();
      await new Promise((res) => setImmediate(res));
      fs.rmSync(dir, { recursive: true, force: true });
      const after = nativeStats();
      return { watchers: after.watchers - before.watchers, mappings: after.mappings - before.mappings };
    },
  };
}
