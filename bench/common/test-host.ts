// What the benches that run inside the soft-RoCE test host share: rxe0 and its address (scripts/rxe/guest.sh), the
// RoCE v2 GID perftest (-x) and the native baselines use, the two benchmark VMs' address table, and how a bench
// reads its size knobs from the environment.
import type { GidTableEntry } from '../../vmm-device/rdma/index.ts';

export const RXE_DEVICE = 'rxe0';
/** rxe0's netdev address inside the test host (scripts/rxe/guest.sh). */
export const RXE_HOST_IP = '10.233.0.1';
/** The RoCE v2 GID of rxe0 that perftest (-x) and the native baseline use; the device picks its own the same way. */
export const GID_INDEX = 1;
export const PORT = 1;
/** The two benchmark VMs, one VPC, both on this host. */
export const ADDRESS_TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'bench', virtualIp: '192.168.9.1', hostIp: RXE_HOST_IP },
  { vmId: 'vm-b', vpc: 'bench', virtualIp: '192.168.9.2', hostIp: RXE_HOST_IP },
];

/** The environment variable `name` as a whole number in 1..max, `fallback` when unset or empty; anything else throws. */
export function positiveInt(name: string, fallback: number, max: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > max) throw new Error(`${name}=${raw}: a whole number from 1 to ${max}`);
  return n;
}
