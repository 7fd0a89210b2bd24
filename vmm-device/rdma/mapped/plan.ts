// What the device declares for host queue mapping before the guest starts (spec sections 5, 13.2, 13.13): the
// configuration fields, the shared memory region's size and the doorbell pages, fixed for the device's life.
//
// The region is sized for max_mapped_queues queues of the largest depth the configuration allows (the largest of an
// SQ of max_qp_wr WQEs with max_send_sge SGEs, an RQ likewise, a CQ of max_cqe entries, in the RXE format's
// geometry), plus the doorbell pages in front. It is guest physical address space only (a BAR), never memory.

import { DoorbellMode, HostQueueFormat, MappingLimits } from '../../abi/rdma/index.ts';
import { SLOTS_PER_PAGE } from './region.ts';

/** The shared memory region (its id in the transport) holding the doorbell pages and every mapped queue. */
export const REGION_SHMID = 0;
/** Default of max_mapped_queues: 1,024 QPs' SQ and RQ with a CQ each need 3,072; the default max_qp is 1,024. */
export const DEFAULT_MAX_MAPPED_QUEUES = 3072;
/** The region may not exceed 64 GiB of guest physical address space (QEMU's default 64-bit PCI hole is 32 GiB+). */
export const MAX_REGION_BYTES = 64n << 30n;
/** How long the device waits for the transport to confirm one unmap before it treats the mapping as lost. */
export const UNMAP_TIMEOUT_MS = 5000;

export type MappingMode = 'off' | 'polled' | 'notify';

export interface MappingPlan {
  format: number;
  doorbellMode: number;
  maxMappedQueues: number;
  /** Mapped QPs at most: floor(max_mapped_queues / 2), and max_qp. */
  maxMappedQps: number;
  doorbellPages: number;
  /** Bytes of the doorbell pages at the start of the region. */
  doorbellBytes: bigint;
  /** Bytes of the largest mapped queue. */
  largestQueue: bigint;
  regionSize: bigint;
}

const PAGE = MappingLimits.MAPPING_ALIGN;

function pow2AtLeast(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** Bytes the VMM maps for one RXE queue of `depth` entries of `elemBytes` (spec 13.4): header, slots, page rounded. */
export function rxeQueueBytes(depth: number, elemBytes: number): bigint {
  const slots = pow2AtLeast(depth + 1);
  const slot = pow2AtLeast(Math.max(MappingLimits.RXE_MIN_SLOT_SIZE, elemBytes));
  return BigInt(Math.ceil((MappingLimits.RXE_QUEUE_HEADER_SIZE + slots * slot) / PAGE) * PAGE);
}

/** RXE element sizes (spec 13.4): a send WQE's SGEs or inline bytes, a receive WQE's SGEs, a CQ slot. */
export const rxeSendElem = (sge: number, inline: number): number => MappingLimits.RXE_SEND_WQE_BASE + Math.max(16 * Math.max(1, sge), inline);
export const rxeRecvElem = (sge: number): number => MappingLimits.RXE_RECV_WQE_BASE + 16 * Math.max(1, sge);
export const RXE_CQ_ELEM = MappingLimits.RXE_CQE_SLOT_SIZE;

/**
 * The plan for a device whose host format is `format` (NONE: no mapping), or undefined when the device does not
 * offer HOST_QUEUE_MAPPING. Throws a RangeError when the region would exceed MAX_REGION_BYTES (a start-up error:
 * lower max_mapped_queues or the depths).
 */
export function planMapping(
  format: number,
  mode: MappingMode,
  c: { max_qp: number; max_qp_wr: number; max_cqe: number; max_send_sge: number; max_recv_sge: number; max_inline_data: number },
  maxMappedQueues = DEFAULT_MAX_MAPPED_QUEUES,
): MappingPlan | undefined {
  if (mode === 'off' || format !== HostQueueFormat.RXE) return undefined;
  if (!Number.isInteger(maxMappedQueues) || maxMappedQueues < 1 || maxMappedQueues > 0xffff_ffff) {
    throw new RangeError(`max_mapped_queues ${maxMappedQueues} is outside 1..2^32-1`);
  }
  const maxMappedQps = Math.min(c.max_qp, Math.floor(maxMappedQueues / 2));
  const doorbellPages = Math.max(1, Math.ceil(maxMappedQps / SLOTS_PER_PAGE));
  const doorbellBytes = BigInt(doorbellPages * MappingLimits.DOORBELL_PAGE_SIZE);
  const largestQueue = [
    rxeQueueBytes(c.max_qp_wr, rxeSendElem(c.max_send_sge, c.max_inline_data)),
    rxeQueueBytes(c.max_qp_wr, rxeRecvElem(c.max_recv_sge)),
    rxeQueueBytes(c.max_cqe, RXE_CQ_ELEM),
  ].reduce((a, b) => (a > b ? a : b));
  const regionSize = doorbellBytes + BigInt(maxMappedQueues) * largestQueue;
  if (regionSize > MAX_REGION_BYTES) {
    throw new RangeError(
      `host queue mapping: ${maxMappedQueues} queues of up to ${largestQueue} bytes need a ${regionSize}-byte region, above ${MAX_REGION_BYTES}; lower max_mapped_queues or the queue depths`,
    );
  }
  return {
    format,
    doorbellMode: mode === 'notify' ? DoorbellMode.NOTIFY : DoorbellMode.POLLED,
    maxMappedQueues,
    maxMappedQps,
    doorbellPages,
    doorbellBytes,
    largestQueue,
    regionSize,
  };
}
