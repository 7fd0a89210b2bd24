// Helpers of the driver's tests that run inside the soft-RoCE test host (scripts/rxe/run.sh): the guard that
// refuses to run elsewhere, the host-side leak check through `rdma resource show`, and data patterns.

import { execFileSync } from 'node:child_process';

export const RXE_DEVICE = 'rxe0';
/** rxe0's netdev address inside the test host (scripts/rxe/guest.sh): every VM of these tests lives on it. */
export const RXE_HOST_IP = '10.233.0.1';

/** Fails the whole file at once when run outside the test host, with the command to use. */
export function requireTestHost(file: string): void {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1') {
    throw new Error(`${file} runs inside the soft-RoCE test host: bash scripts/rxe/run.sh -- npx tap ${file}`);
  }
}

export interface RdmaResources {
  qp: number;
  cq: number;
  mr: number;
  pd: number;
}

/** QPs, CQs, MRs and PDs that process `pid` holds on the host, as `rdma resource show` lists them. */
export function rdmaResourcesOf(pid: number): RdmaResources {
  const out: RdmaResources = { qp: 0, cq: 0, mr: 0, pd: 0 };
  for (const kind of ['qp', 'cq', 'mr', 'pd'] as const) {
    const json = execFileSync('rdma', ['-j', 'resource', 'show', kind], { encoding: 'utf8' });
    const entries = JSON.parse(json.trim() === '' ? '[]' : json) as { pid?: number }[];
    out[kind] = entries.filter((e) => e.pid === pid).length;
  }
  return out;
}

/** Bytes that differ at every position and for every seed, so a misplaced or stale byte is seen. */
export function pattern(size: number, seed: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 131 + seed * 17 + (i >> 8)) & 0xff;
  return b;
}
