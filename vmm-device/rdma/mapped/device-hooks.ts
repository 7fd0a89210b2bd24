// What the device core (rdma-device.ts) does for host queue mapping at its own points: the feature judgement with
// the transport's facts (spec 13.2, 13.16), the reset's order (13.10), the kicks of mapdoorbellq without an
// offloaded engine, and the per-QP counters. Kept here so the core stays about the core.

import { FeatureBit, QpState } from '../../abi/rdma/index.ts';
import type { Logger } from '../../util/log.ts';
import type { TransportFacts } from '../../virtio/device.ts';
import type { Cq, MappedQueue, Qp } from '../objects.ts';
import type { MappingManager } from './manager.ts';
import { REGION_SHMID, type MappingPlan } from './plan.ts';

export const HOST_QUEUE_MAPPING_BIT = 1n << BigInt(FeatureBit.HOST_QUEUE_MAPPING);

/**
 * Spec 13.16: a driver that accepted HOST_QUEUE_MAPPING gets FEATURES_OK only when the transport can map into the
 * device's region now (the region exposed with at least the declared size). Returns the reason of a refusal.
 */
export function mappingRefusal(features: bigint, plan: MappingPlan | undefined, transport: TransportFacts | undefined): string | undefined {
  if ((features & HOST_QUEUE_MAPPING_BIT) === 0n) return undefined;
  if (plan === undefined) return 'HOST_QUEUE_MAPPING was not offered';
  if (transport === undefined) return undefined; // activation re-checks without facts: FEATURES_OK judged them
  const pages = transport.hostPages;
  if (pages === undefined) return 'the transport maps no host pages';
  const size = pages.sharedMemory.get(REGION_SHMID);
  if (size === undefined || size < plan.regionSize) {
    return `shared memory region ${REGION_SHMID} of ${plan.regionSize} bytes is not mapped by the transport (${pages.missing.join('; ') || `it exposes ${size ?? 0n} bytes`})`;
  }
  return undefined;
}

/**
 * Device reset with mapped objects (spec 13.10), synchronous part: stops every doorbell (slots detached) and renews
 * the manager. Returns the step the reset's release runs after the host QPs are in ERR and before it destroys them:
 * unmap every queue and the doorbell pages, bounded, and close the engine.
 */
export function resetMapped(manager: MappingManager | undefined, qps: readonly Qp[], cqs: readonly Cq[]): () => Promise<void> {
  if (manager === undefined) return async () => undefined;
  const queues: MappedQueue[] = [];
  for (const qp of qps) {
    const m = qp.mapped;
    if (m === undefined) continue;
    if (m.slot !== undefined) manager.detach(m.slot);
    m.slot = undefined;
    queues.push(m.sq, m.rq);
  }
  for (const cq of cqs) if (cq.mapped !== undefined) queues.push(cq.mapped);
  return manager.reset(queues);
}

/** A kick of mapdoorbellq that reached the model (no engine took the queue): every slot of a QP in RTS or ERR is executed. */
export function ringAllMapped(manager: MappingManager | undefined, qps: Iterable<Qp>): void {
  if (manager === undefined) return;
  for (const qp of qps) {
    const slot = qp.mapped?.slot;
    if (slot !== undefined && (qp.state === QpState.RTS || qp.state === QpState.ERR)) manager.ring(slot);
  }
}

/** Per-QP counters: work requests the relay's JavaScript handled, doorbells the engine executed and the host refused. */
export interface QpCounters {
  handle: number;
  qpNum: number;
  mapped: boolean;
  relayedWorkRequests: number;
  doorbellsExecuted: bigint;
  doorbellsRefused: bigint;
}

export function qpCounters(manager: MappingManager | undefined, qps: Iterable<Qp>): QpCounters[] {
  const out: QpCounters[] = [];
  for (const qp of qps) {
    const d = manager?.counters(qp.mapped?.slot) ?? { executed: 0n, refused: 0n };
    out.push({ handle: qp.handle, qpNum: qp.host.qpNum, mapped: qp.mapped !== undefined, relayedWorkRequests: qp.relayed ?? 0, doorbellsExecuted: d.executed, doorbellsRefused: d.refused });
  }
  return out;
}

export function logPlan(log: Logger, plan: MappingPlan | undefined, why: string): void {
  if (plan === undefined) log.log('info', 'host queue mapping not offered', { why });
  else log.log('info', 'host queue mapping offered', { format: plan.format, doorbellMode: plan.doorbellMode, maxMappedQueues: plan.maxMappedQueues, regionBytes: plan.regionSize.toString() });
}
