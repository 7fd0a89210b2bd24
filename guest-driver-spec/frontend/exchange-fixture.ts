// Golden-byte fixtures of vhost-user message exchanges (format: fixtures/vhost-user/README.md). A fixture is the
// exact bytes a front-end sent and the exact bytes the back-end answered, with the fds that travelled with each
// message described by kind, so that any back-end implementation can replay the front-end side and compare.

import fs from 'node:fs';
import { FrontendRequest as R, HEADER_SIZE, decodeHeader, decodeInflight, requestName } from '../../vmm-device/transport/vhost-user/messages.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';
import type { VhostUserFrontend, WireRecord } from './frontend.ts';

export const EXCHANGE_FORMAT = 'vrdma-vhost-user-exchange/1';

export type FdSpec = { kind: 'memfd'; size: number } | { kind: 'eventfd' } | { kind: 'socket' };

export type ExchangeStep =
  | { dir: 'frontend->backend'; request: string; hex: string; fds: FdSpec[] }
  | { dir: 'backend->frontend'; request: string; hex: string; fdCount: number }
  | { dir: 'backend-closes' };

export interface ExchangeFixture {
  format: typeof EXCHANGE_FORMAT;
  name: string;
  description: string;
  /** The device behind the back-end when the fixture was recorded. */
  device: Record<string, unknown>;
  steps: ExchangeStep[];
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
export const unhex = (s: string): Uint8Array => new Uint8Array(Buffer.from(s, 'hex'));

/** What fds a front-end message carries, from its request code and payload. */
export function fdSpecsFor(bytes: Uint8Array, fdCount: number): FdSpec[] {
  if (fdCount === 0) return [];
  const h = decodeHeader(bytes);
  const payload = bytes.subarray(HEADER_SIZE);
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  switch (h.request) {
    case R.SET_MEM_TABLE:
      return Array.from({ length: fdCount }, (_, i) => {
        const at = 8 + 32 * i;
        return { kind: 'memfd', size: Number(dv.getBigUint64(at + 8, true) + dv.getBigUint64(at + 24, true)) };
      });
    case R.ADD_MEM_REG:
      return [{ kind: 'memfd', size: Number(dv.getBigUint64(16, true) + dv.getBigUint64(32, true)) }];
    case R.SET_INFLIGHT_FD: {
      const d = decodeInflight(payload)!;
      return [{ kind: 'memfd', size: Number(d.mmapOffset + d.mmapSize) }];
    }
    case R.SET_BACKEND_REQ_FD:
      return [{ kind: 'socket' }];
    default:
      return Array.from({ length: fdCount }, () => ({ kind: 'eventfd' as const }));
  }
}

/** Turns a front-end's recorded wire log into fixture steps. */
export function stepsFromRecord(record: readonly WireRecord[], backendClosed: boolean): ExchangeStep[] {
  const steps: ExchangeStep[] = record.map((w) => {
    const request = requestName(decodeHeader(w.bytes).request);
    return w.direction === 'frontend->backend'
      ? { dir: 'frontend->backend', request, hex: hex(w.bytes), fds: fdSpecsFor(w.bytes, w.fdCount) }
      : { dir: 'backend->frontend', request, hex: hex(w.bytes), fdCount: w.fdCount };
  });
  if (backendClosed) steps.push({ dir: 'backend-closes' });
  return steps;
}

export function writeFixture(path: string, f: ExchangeFixture): void {
  fs.writeFileSync(path, JSON.stringify(f, null, 2) + '\n');
}

export function readFixture(path: string): ExchangeFixture {
  const f = JSON.parse(fs.readFileSync(path, 'utf8')) as ExchangeFixture;
  if (f.format !== EXCHANGE_FORMAT) throw new Error(`${path}: format ${String(f.format)}, expected ${EXCHANGE_FORMAT}`);
  return f;
}

/** One difference between a replay and the fixture. */
export interface ReplayMismatch {
  step: number;
  expected: string;
  actual: string;
}

/**
 * Replays the front-end side of a fixture against a connected back-end: sends each front-end message with fresh fds
 * of the kinds described (memfds of the sizes given, eventfds, socket pairs), and compares every back-end message
 * byte for byte. Returns the mismatches (empty when the back-end behaves exactly as recorded).
 */
export async function replayFixture(fe: VhostUserFrontend, host: SysHost, f: ExchangeFixture): Promise<ReplayMismatch[]> {
  const mismatches: ReplayMismatch[] = [];
  const created: number[] = [];
  try {
    for (const [i, s] of f.steps.entries()) {
      if (s.dir === 'frontend->backend') {
        const fds = s.fds.map((spec) => {
          if (spec.kind === 'memfd') return host.memfd('fixture', spec.size);
          if (spec.kind === 'eventfd') return host.eventfd();
          const [a, b] = host.socketPair();
          created.push(a);
          return b;
        });
        created.push(...fds);
        fe.sendRaw(unhex(s.hex), fds);
      } else if (s.dir === 'backend->frontend') {
        let m;
        try {
          m = await fe.readMessage();
        } catch (e) {
          mismatches.push({ step: i, expected: `${s.request} ${s.hex}`, actual: (e as Error).message });
          break;
        }
        const bytes = new Uint8Array(HEADER_SIZE + m.payload.length);
        const dv = new DataView(bytes.buffer);
        dv.setUint32(0, m.header.request, true);
        dv.setUint32(4, m.header.flags, true);
        dv.setUint32(8, m.header.size, true);
        bytes.set(m.payload, HEADER_SIZE);
        for (const fd of m.fds) host.close(fd);
        if (hex(bytes) !== s.hex || m.fds.length !== s.fdCount) {
          mismatches.push({ step: i, expected: `${s.hex} (${s.fdCount} fds)`, actual: `${hex(bytes)} (${m.fds.length} fds)` });
        }
      } else if (!(await fe.waitClosed())) {
        mismatches.push({ step: i, expected: 'the back-end closes the connection', actual: 'still open' });
      }
    }
  } finally {
    for (const fd of created) host.close(fd);
  }
  return mismatches;
}
