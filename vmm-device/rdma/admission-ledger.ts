// The host-wide quota ledger (issue 12 item 4): admission of a VM's object quotas against the host RNIC's capacity,
// across the backends of one host (one process per VM).
//
// Each VM's device limits are min(host capacity, its quota); without an account across backends one VM could take
// every host PD and another VM's CREATE_PD failed. So a backend RESERVES its VM's limits when it starts: the sum of
// the reservations of the live backends of a host device, its own included, must stay within what the device
// offers (DeviceAttr maxPd, maxCq, maxQp, maxMr, maxAh), or the backend refuses to start, saying what is left. A
// VM then always gets its whole quota: no other VM can starve it, whatever they do at run time.
//
// Where: the host directory (`--host-dir`), DIR/ledger/<device>/<vm>.json = {vm, pid, limits}. Why a directory with
// a lock file rather than a registry process: nothing to run or restart, no single process whose death blocks every
// backend start; the critical section (read the reservations, write one) is a few file operations. The lock is a
// file created with O_EXCL holding the holder's pid: a holder that died is detected (its pid is gone) and its lock
// removed. A reservation whose pid is dead is stale (the VM's host objects died with the backend) and is dropped.
// With a VPC policy the document is checked first (sum of the quotas of a host's VMs <= its declared capacity, at
// load: schema.ts); the ledger still holds the device's real limits for hosts that declare none.

import { mkdirSync, openSync, readdirSync, readFileSync, renameSync, unlinkSync, writeFileSync, closeSync, writeSync } from 'node:fs';
import path from 'node:path';
import { pidAlive } from './qp-registry-dir.ts';

export const LEDGER_KINDS = ['pds', 'cqs', 'qps', 'mrs', 'ahs'] as const;
export type LedgerKind = (typeof LEDGER_KINDS)[number];
export type LedgerAmounts = Record<LedgerKind, number>;

/** How long a start waits for another backend's critical section (a few file operations) before giving up. */
export const LEDGER_LOCK_WAIT_MS = 5000;
const LOCK_RETRY_MS = 10;
/** Reservation files are tiny; a larger one was not written by a backend and is ignored (not trusted). */
const MAX_RESERVATION_BYTES = 4096;

const NOUN: Record<LedgerKind, string> = { pds: 'PDs', cqs: 'CQs', qps: 'QPs', mrs: 'MRs', ahs: 'AHs' };

export class AdmissionError extends Error {}

export interface Reservation {
  vm: string;
  pid: number;
  limits: LedgerAmounts;
}

export interface AdmitOptions {
  dir: string;
  /** The host RDMA device (rxe0): the ledger is per device. */
  device: string;
  vm: string;
  /** What the VM's device will allow: min(quota, host) per kind. */
  limits: LedgerAmounts;
  /** What the host device offers all VMs together. */
  capacity: LedgerAmounts;
  /** How the error names the setting of each kind (a flag such as `--max-qp 1024`, or `the policy's quota`). */
  describe: (kind: LedgerKind, value: number) => string;
  lockWaitMs?: number;
}

/** A VM's admitted reservation; release() withdraws it (backend shutdown). */
export class HostReservation {
  constructor(
    readonly file: string,
    readonly reservation: Reservation,
  ) {}

  release(): void {
    try {
      const j = JSON.parse(readFileSync(this.file, 'utf8')) as { pid?: unknown };
      if (j.pid === process.pid) unlinkSync(this.file);
    } catch {
      // gone already
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function withLock<T>(dir: string, waitMs: number, fn: () => T): Promise<T> {
  const lock = path.join(dir, '.lock');
  const deadline = Date.now() + waitMs;
  for (;;) {
    let fd: number | undefined;
    try {
      fd = openSync(lock, 'wx', 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    if (fd !== undefined) {
      try {
        writeSync(fd, String(process.pid));
        closeSync(fd);
        return fn();
      } finally {
        unlinkSync(lock);
      }
    }
    let holder = NaN;
    try {
      holder = Number(readFileSync(lock, 'utf8'));
    } catch {
      continue; // released meanwhile
    }
    // An empty file: the holder is between creating and writing it; only a dead holder's lock is removed.
    if (Number.isInteger(holder) && holder > 0 && !pidAlive(holder)) {
      try {
        unlinkSync(lock);
      } catch {
        // another waiter removed it first
      }
      continue;
    }
    if (Date.now() >= deadline) throw new AdmissionError(`the host ledger ${dir} stayed locked by pid ${holder} for ${waitMs} ms`);
    await sleep(LOCK_RETRY_MS);
  }
}

function readReservation(file: string): Reservation | undefined {
  try {
    const text = readFileSync(file, 'utf8');
    if (text.length > MAX_RESERVATION_BYTES) return undefined;
    const j = JSON.parse(text) as Reservation;
    if (typeof j.vm !== 'string' || typeof j.pid !== 'number' || typeof j.limits !== 'object' || j.limits === null) return undefined;
    for (const k of LEDGER_KINDS) if (!Number.isSafeInteger(j.limits[k]) || j.limits[k] < 0) return undefined;
    return j;
  } catch {
    return undefined;
  }
}

/** The live reservations of a device's ledger (stale ones removed), read under the lock. */
function liveReservations(dir: string): Reservation[] {
  const out: Reservation[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith('.json')) continue;
    const file = path.join(dir, name);
    const r = readReservation(file);
    if (r === undefined || !pidAlive(r.pid)) {
      try {
        unlinkSync(file);
      } catch {
        // removed by another backend
      }
      continue;
    }
    out.push(r);
  }
  return out;
}

/**
 * Reserves `limits` for VM `vm` on the host device, or throws AdmissionError naming the setting that does not fit,
 * the capacity, and what the other VMs hold.
 */
export async function admitOnHost(o: AdmitOptions): Promise<HostReservation> {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(o.device)) throw new RangeError(`not a device name: ${o.device}`);
  const dir = path.join(o.dir, 'ledger', o.device);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const file = path.join(dir, `${Buffer.from(o.vm).toString('hex')}.json`);
  return withLock(dir, o.lockWaitMs ?? LEDGER_LOCK_WAIT_MS, () => {
    const live = liveReservations(dir);
    const twin = live.find((r) => r.vm === o.vm && r.pid !== process.pid);
    if (twin !== undefined) throw new AdmissionError(`--vm-id ${o.vm}: another backend (pid ${twin.pid}) already serves this VM on ${o.device}`);
    const sameVm = live.filter((r) => r.vm !== o.vm);
    for (const kind of LEDGER_KINDS) {
      const held = sameVm.reduce((s, r) => s + r.limits[kind], 0);
      const want = o.limits[kind];
      if (held + want > o.capacity[kind]) {
        const left = Math.max(0, o.capacity[kind] - held);
        const who = sameVm
          .filter((r) => r.limits[kind] > 0)
          .map((r) => `${r.vm} ${r.limits[kind]}`)
          .join(', ');
        throw new AdmissionError(
          `${o.describe(kind, want)}: host device ${o.device} offers ${o.capacity[kind]} ${NOUN[kind]} to all VMs together and ` +
            `${held} are reserved by the other backends of this host (${who}): at most ${left} are left for VM ${o.vm}`,
        );
      }
    }
    const reservation: Reservation = { vm: o.vm, pid: process.pid, limits: { ...o.limits } };
    const tmp = `${file}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(reservation), { mode: 0o600 });
    renameSync(tmp, file);
    return new HostReservation(file, reservation);
  });
}
