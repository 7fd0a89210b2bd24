// Set-up of the QEMU tests (test/qemu/), kept out of test/ so tap does not run it as a test file: the project's patched QEMU (located or built by scripts/qemu/build.sh) under
// qtest, attached through vhost-user-device-pci to this process's own vhost-user back-end server, and the qtest
// guest driver probing the virtio-pci function. Each test gets a fresh folder, server and QEMU; `finish()` stops
// QEMU and the server and reports what native resources were left over.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { QemuQtest, VirtioPciDevice, type GuestRam, type QemuQtestOptions } from '../index.ts';
import { nativeStats } from '../../../vmm-device/native/sys.ts';
import { VhostUserServer } from '../../../vmm-device/transport/vhost-user/server.ts';
import type { VhostUserSession } from '../../../vmm-device/transport/vhost-user/session.ts';
import { HEADER_SIZE, decodeHeader, frontendRequestFromCode } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import { INVERT_CONFIG_SIZE, INVERT_DEVICE_ID, InvertDevice } from './invert-device.ts';

export const host = new SysHost();
export const QUEUES = 2;
export const QUEUE_SIZE = 64;
/** How long QEMU waits before reconnecting to a vanished back-end (chardev reconnect-ms). */
export const RECONNECT_MS = 100;

/** One message the front-end sent, as the server's wire tap saw it. */
export interface FrontendMessage {
  /** Request name (ADD_MEM_REG), or `unknown N`. */
  name: string;
  code: number;
  payload: Uint8Array;
  fdCount: number;
}

export interface Backend {
  server: VhostUserServer;
  /** Every request the front-end sent, oldest first, over every connection. */
  requests: FrontendMessage[];
  device: InvertDevice;
  log: RecordingLogger;
  /** The session of the current connection, once QEMU connected. */
  session(): Promise<VhostUserSession>;
  close(): void;
}

export function startBackend(socketPath: string, serial: bigint, regions?: ReadonlyMap<number, bigint>): Backend {
  const log = new RecordingLogger('backend');
  const device = new InvertDevice(QUEUES, serial, regions);
  const server = new VhostUserServer({ path: socketPath, host, model: device, log });
  const requests: FrontendMessage[] = [];
  server.onWire = (e) => {
    if (e.direction !== 'in') return;
    const h = decodeHeader(e.bytes.subarray(0, HEADER_SIZE));
    requests.push({ name: frontendRequestFromCode(h.request) ?? `unknown ${h.request}`, code: h.request, payload: e.bytes.slice(HEADER_SIZE), fdCount: e.fdCount });
  };
  let current: VhostUserSession | undefined;
  const waiting: ((s: VhostUserSession) => void)[] = [];
  server.onSession = (s) => {
    current = s;
    for (const resolve of waiting.splice(0)) resolve(s);
  };
  server.onClose = () => {
    current = undefined;
  };
  server.listen();
  return {
    server,
    requests,
    device,
    log,
    session: () => (current !== undefined ? Promise.resolve(current) : new Promise((resolve) => waiting.push(resolve))),
    close: () => server.close(),
  };
}

/** QEMU arguments of the vhost-user device: the generic device with virtio ID 42 and one page per notify queue. */
export function vhostUserDeviceArgs(socketPath: string, options: { reconnect?: boolean } = {}): string[] {
  const chardev = `socket,id=vu,path=${socketPath}${options.reconnect ? `,reconnect-ms=${RECONNECT_MS}` : ''}`;
  return [
    '-chardev', chardev,
    '-device',
    `vhost-user-device-pci,chardev=vu,virtio-id=${INVERT_DEVICE_ID},num_vqs=${QUEUES},vq_size=${QUEUE_SIZE},` +
      `config_size=${INVERT_CONFIG_SIZE},page-per-vq=on`,
  ];
}

export interface QemuRig {
  dir: string;
  socketPath: string;
  backend: Backend;
  qemu: QemuQtest;
  dev: VirtioPciDevice;
  ram: GuestRam;
  /** Stops QEMU and the back-end, removes the folder; returns the addon's counts after the back-end let go. */
  finish(): Promise<{ watchers: number; mappings: number }>;
}

export interface RigOptions {
  serial?: bigint;
  reconnect?: boolean;
  /** Shared memory regions the device model declares (id -> bytes). */
  regions?: ReadonlyMap<number, bigint>;
  /** QEMU's RAM size, a QMP channel, memory slots for hot-added RAM. */
  qemu?: Pick<QemuQtestOptions, 'ramMiB' | 'qmp' | 'hotplug'>;
}

export async function startRig(options: RigOptions = {}): Promise<QemuRig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-qemu-test-'));
  const socketPath = path.join(dir, 'vu.sock');
  const backend = startBackend(socketPath, options.serial ?? 0x1122_3344_5566_7788n, options.regions);
  let qemu: QemuQtest;
  try {
    qemu = await QemuQtest.start({ ...options.qemu, workDir: dir, args: vhostUserDeviceArgs(socketPath, options) });
  } catch (error) {
    backend.close();
    fs.rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  let dev: VirtioPciDevice;
  try {
    dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: INVERT_DEVICE_ID });
  } catch (error) {
    await qemu.stop();
    backend.close();
    fs.rmSync(dir, { recursive: true, force: true });
    throw new Error(`${(error as Error).message}\nQEMU stderr:\n${qemu.stderr}`);
  }
  const rig: QemuRig = {
    dir,
    socketPath,
    backend,
    qemu,
    dev,
    ram: qemu.ram,
    finish: async () => {
      await rig.qemu.stop();
      rig.backend.close();
      fs.rmSync(dir, { recursive: true, force: true });
      return nativeStats();
    },
  };
  return rig;
}

/** Loop turns to let pass before counting native resources. */
const SETTLE_TURNS = 5;

/**
 * The addon's counts of mappings and watchers once pending closes have run (a stopped watcher's uv handle is
 * closed on a later loop turn).
 */
export async function sysStatsSettled(): Promise<{ watchers: number; mappings: number }> {
  for (let i = 0; i < SETTLE_TURNS; i++) await new Promise((resolve) => setImmediate(resolve));
  return nativeStats();
}

/** Resolves once `done()` holds, checking every few ms; rejects after `ms`. */
export async function until(done: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
