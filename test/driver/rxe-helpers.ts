// Helpers of the driver's tests that run inside the soft-RoCE test host (scripts/rxe/run.sh). The guard, the rxe
// device name and the data pattern come from the verbs tests' harness (test/rxe/fixture/harness.ts); this file adds
// the address of rxe0's netdev and an exact count of this process's host objects.

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { requireTestHost as requireTestHostOfHarness } from '../rxe/fixture/harness.ts';

export { RXE_DEVICE, pattern } from '../rxe/fixture/harness.ts';

/** rxe0's netdev address inside the test host (scripts/rxe/guest.sh): every VM of these tests lives on it. */
export const RXE_HOST_IP = '10.233.0.1';

/** Fails the whole file at once when run outside the test host, with the command to use (for `file`, if given). */
export function requireTestHost(file?: string): void {
  if (file !== undefined && process.env['VRDMA_IN_TEST_HOST'] !== '1') {
    throw new Error(`${file} runs inside the soft-RoCE test host: bash scripts/rxe/run.sh -- npx tap ${file}`);
  }
  requireTestHostOfHarness();
}

export type { HostObjects as RdmaResources };

export interface HostObjects {
  qp: number;
  cq: number;
  mr: number;
  pd: number;
}

export const NO_HOST_OBJECTS: HostObjects = { qp: 0, cq: 0, mr: 0, pd: 0 };

/** The kinds `rdma resource show` lists per process. */
const KINDS = ['qp', 'cq', 'mr', 'pd'] as const;

/**
 * The QPs, CQs, MRs and PDs that process `pid` holds on the host, as `rdma resource show` lists them.
 *
 * The kernel names the owner of a user object by the TASK that created it (restrack keeps `current`), and prints
 * that task's id: the addon makes its verbs calls on libuv's worker threads, so most entries carry the id of one
 * of this process's THREADS, not the process id (comparing with the process id alone found nothing, which made
 * every leak check vacuous). An entry belongs to `pid` when its id is `pid` or one of `pid`'s threads. Objects of
 * the kernel itself (rxe's own PD, CQ and QP) carry no pid and are never counted.
 */
export function hostObjectsOf(pid: number): HostObjects {
  const threads = new Set<number>([pid]);
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) threads.add(Number(tid));
  const out: HostObjects = { ...NO_HOST_OBJECTS };
  for (const kind of KINDS) {
    const json = execFileSync('rdma', ['-j', 'resource', 'show', kind], { encoding: 'utf8' });
    const entries = JSON.parse(json.trim() === '' ? '[]' : json) as { pid?: number }[];
    out[kind] = entries.filter((e) => e.pid !== undefined && threads.has(e.pid)).length;
  }
  return out;
}

/** The same count under the name other tests import it by. */
export const rdmaResourcesOf = hostObjectsOf;
