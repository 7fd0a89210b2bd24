// The backend process's memory mappings as a resource (issue 16 item 2).
//
// Linux caps the mappings of one process at vm.max_map_count (65,530 by default). rxe maps each QP's send and
// receive queue and each CQ's queue into the process that created them (ibv_create_qp, ibv_create_cq), and the
// device maps a contiguous view for each MR of scattered pages (mapAlias): one VM that created 21,633 QPs with their
// CQs left its backend at exactly 65,530 mappings, and V8, unable to map a new heap page, aborted. A guest inside its
// quota must never be able to kill its backend, so the device treats mappings as a budget: what the process held
// when the device opened plus MAP_HEADROOM for the backend itself (V8's heap, thread stacks, guest RAM regions) stay
// out of the guest's reach; the rest is the guest's, and each object is charged what it maps.
//
// The per-VM ceiling that follows, with the default vm.max_map_count and a fresh backend (~100 mappings):
//   floor((65,530 - ~100 - MAP_HEADROOM - max_mr) / 3) QPs, each with its own CQ: about 17,700 with max_mr 4,096.
// The configuration's max_qp and max_cq never exceed it (mappingCeiling), and `vrdma-backend` refuses at start a
// quota above it (vmm-device/cli/admission.ts). In the mapped data path (spec section 13) the queue mappings move
// into the VMM's process, where the VMM's own vm.max_map_count bounds them the same way.

import { readFileSync } from 'node:fs';
import type { CqHandle, HostVerbs, QpHandle } from '../verbs/host-verbs.ts';
import { VerbsError } from '../verbs/host-verbs.ts';

/**
 * Mappings kept for the backend itself beyond what it held when the device opened. V8 maps its heap in 256 KiB
 * pages: 8,192 of them are a 2 GiB heap, above the default heap limit of Node 20 on a host of a few GiB, with room
 * for thread stacks, the guest's RAM regions (vhost-user sends at most a few hundred) and the addon's eventfds.
 */
export const MAP_HEADROOM = 8192;
/** rxe maps a QP's send queue and its receive queue. */
export const MAPPINGS_PER_QP = 2;
/** rxe maps a CQ's queue. */
export const MAPPINGS_PER_CQ = 1;
/** The device's contiguous view of an MR of scattered pages (mapAlias), at most one per MR. */
export const MAPPINGS_PER_MR = 1;
/** Linux's default vm.max_map_count, when /proc cannot say. */
export const DEFAULT_MAX_MAP_COUNT = 65530;
/**
 * Test-only: the vm.max_map_count the backend assumes instead of /proc/sys/vm/max_map_count, so that a test (and CI)
 * reaches the ceiling in hundreds of QPs rather than 20,000.
 */
export const MAX_MAP_COUNT_ENV = 'VRDMA_TEST_MAX_MAP_COUNT';

export function readMaxMapCount(): number {
  const forced = process.env[MAX_MAP_COUNT_ENV];
  if (forced !== undefined && /^\d+$/.test(forced)) return Number(forced);
  try {
    const n = Number(readFileSync('/proc/sys/vm/max_map_count', 'utf8').trim());
    return Number.isSafeInteger(n) && n > 0 ? n : DEFAULT_MAX_MAP_COUNT;
  } catch {
    return DEFAULT_MAX_MAP_COUNT;
  }
}

/** The mappings this process holds now (lines of /proc/self/maps). */
export function countMappings(): number {
  try {
    const text = readFileSync('/proc/self/maps', 'utf8');
    let n = 0;
    for (let i = text.indexOf('\n'); i !== -1; i = text.indexOf('\n', i + 1)) n++;
    return n;
  } catch {
    return 0;
  }
}

export class MappingBudget {
  private used = 0;

  constructor(
    /** Mappings the guest's objects may hold together. */
    readonly total: number,
  ) {
    if (!Number.isSafeInteger(total)) throw new RangeError(`a mapping budget is an integer, got ${total}`);
  }

  /** vm.max_map_count minus what the process holds now minus MAP_HEADROOM (never negative). */
  static fromProc(headroom = MAP_HEADROOM): MappingBudget {
    return new MappingBudget(Math.max(0, readMaxMapCount() - countMappings() - headroom));
  }

  get available(): number {
    return this.total - this.used;
  }

  get charged(): number {
    return this.used;
  }

  charge(n: number): boolean {
    if (this.used + n > this.total) return false;
    this.used += n;
    return true;
  }

  release(n: number): void {
    this.used = Math.max(0, this.used - n);
  }
}

/**
 * The most QPs (each with its own CQ) and CQs a VM can be given within `budget` after reserving one mapping per MR
 * of `maxMr`: both caps together never map more than the budget (2 per QP + 1 per CQ + 1 per MR).
 */
export function mappingCeiling(budget: number, maxMr: number): number {
  return Math.max(0, Math.floor((budget - maxMr * MAPPINGS_PER_MR) / (MAPPINGS_PER_QP + MAPPINGS_PER_CQ)));
}

/** The configuration with max_qp and max_cq within the budget's ceiling (spec 12.6). */
export function capToMappings<C extends { max_qp: number; max_cq: number; max_mr: number }>(config: C, budget: MappingBudget): C {
  const ceiling = mappingCeiling(budget.available, config.max_mr);
  return { ...config, max_qp: Math.min(config.max_qp, ceiling), max_cq: Math.min(config.max_cq, ceiling) };
}

/**
 * HostVerbs that charge each QP and CQ to the budget before the host maps it, and give it back once the host
 * destroyed it. Beyond the budget the create fails as the host's would (ENOMEM): the device answers NO_RESOURCES.
 * A safety net: the configuration's max_qp and max_cq already keep a guest within the budget (mappingCeiling).
 */
export function withMappingBudget(verbs: HostVerbs, budget: MappingBudget): HostVerbs {
  const refuse = (verb: string, need: number): never => {
    throw new VerbsError(verb, 'ENOMEM', `the backend's mapping budget is spent (${budget.available} of ${budget.total} left, ${need} needed; vm.max_map_count)`);
  };
  // Every other member forwards to `verbs` at each call, looked up then, so the wrapper behaves as the wrapped
  // object does now (a test double whose verb is replaced after the device opened included).
  const target = verbs as unknown as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (let p: object | null = verbs; p !== null && p !== Object.prototype; p = Object.getPrototypeOf(p)) {
    for (const k of Object.getOwnPropertyNames(p)) {
      if (k === 'constructor' || k in out) continue;
      if (typeof target[k] === 'function') out[k] = (...args: unknown[]) => (target[k] as (...a: unknown[]) => unknown).apply(verbs, args);
      else Object.defineProperty(out, k, { get: () => target[k], enumerable: true });
    }
  }
  return Object.assign(out as unknown as HostVerbs, {
    async createQp(...args: Parameters<HostVerbs['createQp']>): Promise<QpHandle> {
      if (!budget.charge(MAPPINGS_PER_QP)) refuse('ibv_create_qp', MAPPINGS_PER_QP);
      try {
        return await verbs.createQp(...args);
      } catch (e) {
        budget.release(MAPPINGS_PER_QP);
        throw e;
      }
    },
    async destroyQp(qp: QpHandle): Promise<void> {
      await verbs.destroyQp(qp);
      if (!('sq' in qp)) budget.release(MAPPINGS_PER_QP); // a mapped QP (spec 13) is mapped by the VMM, not here
    },
    async createCq(...args: Parameters<HostVerbs['createCq']>): Promise<CqHandle> {
      if (!budget.charge(MAPPINGS_PER_CQ)) refuse('ibv_create_cq', MAPPINGS_PER_CQ);
      try {
        return await verbs.createCq(...args);
      } catch (e) {
        budget.release(MAPPINGS_PER_CQ);
        throw e;
      }
    },
    async destroyCq(cq: CqHandle): Promise<void> {
      await verbs.destroyCq(cq);
      if (!('queue' in cq)) budget.release(MAPPINGS_PER_CQ);
    },
  });
}
