// Shared set-up for the vhost-user conformance tests: a real back-end server on a real unix socket in a temporary
// folder, the echo device behind it, and the reference front-end connected to it. Everything goes through the
// native sys addon (sockets with SCM_RIGHTS, memfds, mmap, eventfds). `finish()` closes both ends and checks that
// the back-end released every mapping and watcher it held (the addon counts them).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { GuestRam } from '../guest-ram.ts';
import { VhostUserFrontend } from '../frontend.ts';
import { nativeStats } from '../../../vmm-device/native/sys.ts';
import { VhostUserServer } from '../../../vmm-device/transport/vhost-user/server.ts';
import type { VhostUserSession } from '../../../vmm-device/transport/vhost-user/session.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import { EchoDevice } from './echo-device.ts';
import { GuestAllocator, SplitRingDriver } from '../guest-driver.ts';
import {
  FLAG_NEED_REPLY,
  VHOST_USER_VERSION,
  decodeU64,
  encodeU64,
  ProtocolFeature,
  SUPPORTED_PROTOCOL_FEATURES,
  bit,
  encodeVringAddr,
  encodeVringState,
  FrontendRequest as R,
} from '../../../vmm-device/transport/vhost-user/messages.ts';

export const host = new SysHost();
export const V = VHOST_USER_VERSION;
export const NEED_REPLY = V | FLAG_NEED_REPLY;

export interface Rig {
  dir: string;
  path: string;
  server: VhostUserServer;
  device: EchoDevice;
  log: RecordingLogger;
  fe: VhostUserFrontend;
  /** The back-end session of the current connection (set once the server accepted it). */
  session(): VhostUserSession;
  /** Guest RAM the test created through `ram()`; released by finish(). */
  rams: GuestRam[];
  ram(plans?: { gpa: number; size: number; mmapOffset?: number; userAddr?: number }[]): GuestRam;
  /** Waits for the server to accept (the session exists). */
  accepted(): Promise<VhostUserSession>;
  /** Closes the front-end and the server; returns the native mappings/watchers (and fds, when any) left over. */
  finish(): Promise<{ watchers: number; mappings: number; fds?: number }>;
}

let counter = 0;

/** Open fds of this process (a leak check: every fd a test made the back-end take must be closed again). */
export function openFdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** `device`: a model of the test's own (an EchoDevice that also records what it was told). */
export async function rig(opts: { queues?: number; device?: EchoDevice } = {}): Promise<Rig> {
  const before = nativeStats();
  const fdsBefore = openFdCount();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhost-user-test-'));
  const sockPath = path.join(dir, `vu${counter++}.sock`);
  const log = new RecordingLogger('vhost-user');
  const device = opts.device ?? new EchoDevice(opts.queues ?? 2);
  const server = new VhostUserServer({ path: sockPath, host, model: device, log });
  let current: VhostUserSession | undefined;
  let onAccept: (() => void) | undefined;
  server.onSession = (s) => {
    current = s;
    onAccept?.();
  };
  server.listen();
  const fe = await VhostUserFrontend.connect(host, sockPath);
  const rams: GuestRam[] = [];
  const r: Rig = {
    dir,
    path: sockPath,
    server,
    device,
    log,
    fe,
    rams,
    session: () => {
      if (current === undefined) throw new Error('no session accepted yet');
      return current;
    },
    ram: (plans = [{ gpa: 0, size: 0x40000 }]) => {
      const ram = new GuestRam(host, plans);
      rams.push(ram);
      return ram;
    },
    accepted: async () => {
      if (current !== undefined) return current;
      await new Promise<void>((resolve) => (onAccept = resolve));
      return current!;
    },
    finish: async () => {
      fe.close();
      server.close();
      for (const ram of rams) ram.release();
      await new Promise((res) => setImmediate(res));
      fs.rmSync(dir, { recursive: true, force: true });
      const after = nativeStats();
      const leaked = { watchers: after.watchers - before.watchers, mappings: after.mappings - before.mappings };
      const fds = openFdCount() - fdsBefore;
      return fds === 0 ? leaked : { ...leaked, fds };
    },
  };
  await r.accepted();
  return r;
}

/** Negotiates protocol features as QEMU would (all offered) unless `features` says which. */
export async function negotiate(r: Rig, features: bigint = SUPPORTED_PROTOCOL_FEATURES): Promise<void> {
  await r.fe.getFeatures();
  await r.fe.getProtocolFeatures();
  await r.fe.setProtocolFeatures(features);
}

/** Protocol features without REPLY_ACK: a bad message must then close the connection. */
export const WITHOUT_REPLY_ACK = SUPPORTED_PROTOCOL_FEATURES & ~bit(ProtocolFeature.REPLY_ACK);

/** Sends a request with NEED_REPLY and returns the u64 the back-end acked with (0 success, non-zero failure). */
export async function ack(r: Rig, request: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = []): Promise<bigint> {
  r.fe.send(request, payload, fds, NEED_REPLY);
  const m = await r.fe.reply(request, 8);
  return decodeU64(m.payload)!;
}

/** The last log line the back-end wrote about a refused request. */
export function lastRefusal(r: Rig): { request: string; kind: string; reason: string } | undefined {
  for (let i = r.log.lines.length - 1; i >= 0; i--) {
    const f = r.log.lines[i]!.fields;
    if (f !== undefined && typeof f.kind === 'string' && typeof f.reason === 'string') {
      return { request: String(f.request), kind: f.kind, reason: f.reason };
    }
  }
  return undefined;
}

export { encodeU64 };

type T = Pick<typeof import('tap').default, 'ok' | 'equal' | 'match' | 'notOk' | 'same'>;

/**
 * The back-end closed the connection for `request` with a log line naming it, the error kind and the reason; the
 * bad-message counter moved; and the server goes on listening (a new front-end is served).
 */
export async function expectClose(t: T, r: Rig, request: string, kind: string, reason: RegExp): Promise<void> {
  const before = r.server.counters.badMessages[kind as keyof typeof r.server.counters.badMessages];
  t.ok(await r.fe.waitClosed(), `${request}: the back-end closed the connection`);
  t.match(lastRefusal(r), { request, kind, reason }, 'log line names the request, the kind and the reason');
  t.ok(r.server.counters.badMessages[kind as keyof typeof r.server.counters.badMessages] >= Math.max(1, before), 'counted');
  const again = await VhostUserFrontend.connect(host, r.path);
  try {
    t.ok((await again.getFeatures()) > 0n, 'the server serves the next connection');
  } finally {
    again.close();
  }
}

/** With REPLY_ACK negotiated and NEED_REPLY set: the back-end answers failure (1) and keeps the connection. */
export async function expectAckFailure(
  t: T,
  r: Rig,
  request: number,
  payload: Uint8Array,
  fds: number[],
  expected: { request: string; kind: string; reason: RegExp },
): Promise<void> {
  t.equal(await ack(r, request, payload, fds), 1n, `${expected.request}: REPLY_ACK failure`);
  t.match(lastRefusal(r), expected, 'log line names the request, the kind and the reason');
  t.notOk(r.fe.closedByBackend, 'connection kept');
}

/** Protocol features negotiated (all by default), virtio features set, and `ram` as the memory table. */
export async function prepare(r: Rig, o: { protocol?: bigint; features?: bigint; ram?: GuestRam } = {}): Promise<GuestRam> {
  await negotiate(r, o.protocol ?? SUPPORTED_PROTOCOL_FEATURES);
  await r.fe.setFeatures(o.features ?? (bit(32) | bit(30)));
  const ram = o.ram ?? r.ram();
  await r.fe.setMemTable(ram.regions);
  return ram;
}

/** Configures and starts ring `index` (NUM, BASE, ADDR, KICK, CALL, ENABLE) over a split ring driver in `ram`. */
export async function startRing(r: Rig, ram: GuestRam, alloc: GuestAllocator, index: number, size: number): Promise<SplitRingDriver> {
  const d = new SplitRingDriver(ram, alloc, size);
  await r.fe.request(R.SET_VRING_NUM, encodeVringState({ index, num: size }));
  await r.fe.request(R.SET_VRING_BASE, encodeVringState({ index, num: 0 }));
  await r.fe.request(R.SET_VRING_ADDR, ringAddr(ram, index, d));
  for (const m of [r.fe.kickFds, r.fe.callFds]) {
    const old = m.get(index);
    if (old !== undefined) host.close(old);
  }
  const kick = host.eventfd();
  r.fe.kickFds.set(index, kick);
  await r.fe.setVringFile(R.SET_VRING_KICK, index, kick);
  const call = host.eventfd();
  r.fe.callFds.set(index, call);
  await r.fe.setVringFile(R.SET_VRING_CALL, index, call);
  await r.fe.request(R.SET_VRING_ENABLE, encodeVringState({ index, num: 1 }));
  return d;
}

/** SET_VRING_ADDR payload for a driver's rings (front-end virtual addresses). */
export function ringAddr(ram: GuestRam, index: number, d: { addrs: { desc: number; avail: number; used: number } }, flags = 0): Uint8Array {
  return encodeVringAddr({
    index,
    flags,
    desc: BigInt(ram.gpaToUser(d.addrs.desc)),
    used: BigInt(ram.gpaToUser(d.addrs.used)),
    avail: BigInt(ram.gpaToUser(d.addrs.avail)),
    log: 0n,
  });
}
