// The host queue mapping part of NativeVerbs (spec section 13): the addon's mapped CQs and QPs (created with raw
// uverbs commands and never mapped in this process: native/src/verbs/mapped.h says why and how their geometry is
// derived) and its doorbell engine (native/src/verbs/doorbell.cc). native-verbs.ts keeps the handles in its maps
// so that events and destroys treat them as CQs and QPs.

import { HostQueueFormat } from '../abi/rdma/constants.ts';
import type { DoorbellEngine, DoorbellEngineOptions, HostQueueBuffer, QpHandle } from './host-verbs.ts';
import { VerbsError } from './host-verbs.ts';

/** rdma_rxe's vendor id (RXE_VENDOR_ID of the kernel's rxe_param.h): the devices whose queues are in RXE format. */
export const RXE_VENDOR_ID = 0xffffff;

/** Doorbell pages an engine may take (MAX_DOORBELL_PAGES of doorbell.cc). */
export const MAX_DOORBELL_PAGES = 64;
export const DOORBELL_PAGE_BYTES = 4096;
export const DOORBELL_SLOTS_PER_PAGE = 512;

export interface RawQueue {
  offset: bigint;
  size: bigint;
  numSlots: number;
  slotSize: number;
}

/** The addon's functions for mapped objects and doorbell engines (native/src/verbs/init.cc). */
export interface RawMappedVerbs {
  createMappedCq(
    ctx: number,
    cqe: number,
    compVector?: number,
  ): Promise<{ cq: number; cqe: number; cmdFd: number; queue: RawQueue }>;
  createMappedQp(
    pd: number,
    init: Record<string, unknown>,
  ): Promise<{ qp: number; qpNum: number; cap: QpHandle['cap']; cmdFd: number; sq: RawQueue; rq: RawQueue }>;
  createDoorbellEngine(ctx: number, pages: number, notify: boolean): { engine: number; fd: number; size: bigint };
  doorbellAttach(engine: number, slot: number, qp: number): void;
  doorbellDetach(engine: number, slot: number): void;
  doorbellRing(engine: number, slot: number): void;
  doorbellSetWakeFd(engine: number, fd: number): void;
  doorbellCounters(engine: number, slot: number): { executed: bigint; refused: bigint };
  doorbellClose(engine: number): void;
}

/** The queue format of a device with vendor id `vendorId` (NONE when unknown). */
export function queueFormatOf(vendorId: number | undefined): number {
  return vendorId === RXE_VENDOR_ID ? HostQueueFormat.RXE : HostQueueFormat.NONE;
}

export function hostQueueBuffer(fd: number, q: RawQueue): HostQueueBuffer {
  return Object.freeze({ fd, fdOffset: q.offset, size: q.size, numSlots: q.numSlots, slotSize: q.slotSize });
}

/**
 * The DoorbellEngine over the addon's engine `id`. Its methods are synchronous in the addon (each takes the
 * engine's mutex, which the thread holds for one pass over the attached slots, a few system calls at most).
 */
export class NativeDoorbellEngine implements DoorbellEngine {
  private closed = false;

  constructor(
    private readonly raw: RawMappedVerbs,
    private readonly id: number,
    readonly fd: number,
    readonly size: bigint,
    private readonly toError: (e: unknown) => unknown,
  ) {}

  static create(
    raw: RawMappedVerbs,
    ctx: number,
    options: DoorbellEngineOptions,
    toError: (e: unknown) => unknown,
  ): NativeDoorbellEngine {
    if (options.wake !== 'polled' && options.wake !== 'notify')
      throw new VerbsError('doorbell_engine', 'EINVAL', `wake must be 'polled' or 'notify', not ${String(options.wake)}`);
    const r = NativeDoorbellEngine.call(toError, () => raw.createDoorbellEngine(ctx, options.pages, options.wake === 'notify'));
    return new NativeDoorbellEngine(raw, r.engine, r.fd, r.size, toError);
  }

  private static call<T>(toError: (e: unknown) => unknown, f: () => T): T {
    try {
      return f();
    } catch (e) {
      throw toError(e);
    }
  }

  private do<T>(f: () => T): T {
    return NativeDoorbellEngine.call(this.toError, f);
  }

  attach(slot: number, qp: QpHandle): void {
    this.do(() => this.raw.doorbellAttach(this.id, slot, qp.id));
  }

  detach(slot: number): void {
    this.do(() => this.raw.doorbellDetach(this.id, slot));
  }

  ring(slot: number): void {
    this.do(() => this.raw.doorbellRing(this.id, slot));
  }

  setWakeFd(fd: number | undefined): void {
    this.do(() => this.raw.doorbellSetWakeFd(this.id, fd ?? -1));
  }

  counters(slot: number): { executed: bigint; refused: bigint } {
    return this.do(() => this.raw.doorbellCounters(this.id, slot));
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    try {
      this.raw.doorbellClose(this.id);
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(this.toError(e));
    }
  }
}
