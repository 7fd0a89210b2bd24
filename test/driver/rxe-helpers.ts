// Helpers of the driver's tests that run inside the soft-RoCE test host (scripts/rxe/run.sh). The guard, the rxe
// device name and the data pattern come from the verbs tests' harness (test/rxe/fixture/harness.ts); this file adds
// the address of rxe0's netdev and an exact count of this process's host objects.

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

export type { RdmaResources as HostObjects, RdmaResources } from '../rxe/fixture/harness.ts';

export const NO_HOST_OBJECTS = { qp: 0, cq: 0, mr: 0, pd: 0 } as const;

/**
 * The QPs, CQs, MRs and PDs that process `pid` holds on the host, as `rdma resource show` lists them (counted per
 * thread of the process: see the harness).
 */
export { rdmaResourcesOf as hostObjectsOf, rdmaResourcesOf } from '../rxe/fixture/harness.ts';
