// The device's objects: what one guest handle stands for. Host handles live only here, never in anything the
// guest reads. Rings are guest memory described by page lists (spec section 10.2).

import type { AliasPiece } from '../memory/alias.ts';
import type { GuestMemory } from '../memory/guest-memory.ts';
import type { HostPageMapper } from '../virtio/device.ts';
import type { AhHandle, CqHandle, MrHandle, PdHandle, QpHandle } from '../verbs/host-verbs.ts';

export interface Pd {
  handle: number;
  host: PdHandle;
  qps: number;
  mrs: number;
  ahs: number;
}

/** A ring of `depth` entries of `entrySize` bytes in guest pages, with its QueueIndex block. */
export class GuestRing {
  constructor(
    readonly depth: number,
    readonly entrySize: number,
    readonly pageShift: number,
    /** Guest physical address of each page (checked inside guest RAM at creation). */
    readonly pages: readonly number[],
    readonly indexGpa: number,
  ) {}

  /** True when every page and the index block lie in guest RAM of `memory` (a memory map change re-checks it). */
  insideOf(memory: GuestMemory): boolean {
    const pageSize = 2 ** this.pageShift;
    return memory.isValidRange(this.indexGpa, 8) && this.pages.every((p) => memory.isValidRange(p, pageSize));
  }

  /** Guest physical address of entry n (a free-running index). An entry never crosses a page. */
  entryGpa(n: number): number {
    const byte = ((n >>> 0) % this.depth) * this.entrySize;
    const page = Math.floor(byte / 2 ** this.pageShift);
    return this.pages[page]! + (byte - page * 2 ** this.pageShift);
  }

  readProducer(memory: GuestMemory): number {
    return readU32(memory, this.indexGpa);
  }
  readConsumer(memory: GuestMemory): number {
    return readU32(memory, this.indexGpa + 4);
  }
  writeProducer(memory: GuestMemory, value: number): void {
    writeU32(memory, this.indexGpa, value);
  }
  writeConsumer(memory: GuestMemory, value: number): void {
    writeU32(memory, this.indexGpa + 4, value);
  }
}

const scratch = new Uint8Array(4);
const scratchView = new DataView(scratch.buffer);

export function readU32(memory: GuestMemory, gpa: number): number {
  memory.read(gpa, scratch);
  return scratchView.getUint32(0, true);
}

export function writeU32(memory: GuestMemory, gpa: number, value: number): void {
  scratchView.setUint32(0, value >>> 0, true);
  memory.write(gpa, scratch);
}

export const ArmState = { DISARMED: 0, NEXT: 1, SOLICITED: 2 } as const;

export interface Cq {
  handle: number;
  host: CqHandle;
  ring: GuestRing;
  /** The device's producer index (it alone writes it into the index block). */
  producer: number;
  arm: number;
  /** Set on overrun, invalid index or host error: no more completions, only DESTROY_CQ (spec section 10.8). */
  error: boolean;
  /** Its ring or index block left guest RAM (memory map change): never read or written again (error is set too). */
  ringLost?: boolean;
  /** QPs using this CQ as send or receive CQ. */
  qps: Set<Qp>;
  destroyed: boolean;
  /**
   * A mapped CQ (spec 13): the host writes its completions into the guest's mapping; `ring` is then a placeholder
   * with no pages that nothing reads (the data path, the memory-map re-check and the relay skip mapped objects).
   */
  mapped?: MappedQueue;
}

/** One mapped host queue: where it is in the shared memory region, and whether the VMM maps it now. */
export interface MappedQueue {
  /** The range of the region held for it. */
  offset: bigint;
  length: bigint;
  /** Bytes the VMM maps there (the host buffer's size, at most `length`). */
  size: bigint;
  /** The transport confirmed the map and no unmap has been asked since. */
  live: boolean;
  /** The transport's mapper that mapped it (a reset's unmap uses it after the activation is gone). */
  mapper: HostPageMapper;
}

/** A mapped QP's queues and doorbell slot (spec 13.3, 13.6). */
export interface MappedQpState {
  sq: MappedQueue;
  rq: MappedQueue;
  /** Doorbell slot in the engine; undefined once detached (destroy, reset). */
  slot: number | undefined;
}

/** One work request the device took from a ring and has not completed into the guest CQ yet. */
export interface Outstanding {
  /** Host wr_id: the key host completions come back with. */
  hostWrId: number;
  wrId: bigint;
  /** Send: a successful completion is written only when signaled (or sq_sig_all). Receives always. */
  signaled: boolean;
  /** Set when the completion is known (from the host, or decided by the device); written in WQE order. */
  done?: CompletionInfo;
  /** UD receives: where the 40-byte routing header area is (iova and lkey of the first SGE). */
  grh?: { sges: { addr: bigint; length: number; lkey: number }[] };
}

export interface CompletionInfo {
  status: number;
  opcode: number;
  byteLen: number;
  immData: number;
  srcQp: number;
  wcFlags: number;
  vendorErr: number;
}

export interface QpWorkQueue {
  ring: GuestRing;
  /** The device's consumer index (it alone writes it). */
  consumer: number;
  /** Taken and not yet completed into the guest CQ, in WQE order. */
  outstanding: Outstanding[];
  /** Of those, how many the host holds (bounded by the depth: the host queue has depth entries). */
  inHost: number;
  nextSeq: number;
}

export interface Qp {
  handle: number;
  host: QpHandle;
  pd: Pd;
  sendCq: Cq;
  recvCq: Cq;
  qpType: number;
  sqSigAll: boolean;
  maxSendSge: number;
  maxRecvSge: number;
  maxInlineData: number;
  sq: QpWorkQueue;
  rq: QpWorkQueue;
  state: number;
  /** The guest's own view of its attributes (QUERY_QP): values last applied, virtual dgid included. */
  attr: Record<string, number | Uint8Array>;
  destroyed: boolean;
  /** DESTROY_QP has handed the host QP to its destroy: a reset meanwhile leaves it to that destroy. */
  hostGone?: boolean;
  /** A ring page or index block left guest RAM (memory map change): the rings are never read or written again. */
  ringsLost?: boolean;
  /** A mapped QP (spec 13): its rings are placeholders with no pages, as for a mapped CQ. */
  mapped?: MappedQpState;
  /** Work requests the relay's JavaScript took from this QP's rings (0 for a mapped QP: the per-QP counter). */
  relayed?: number;
  /** Set while DESTROY_QP flushes: flush completions written and dropped (DestroyQpResponse). */
  flushCounts?: { sq: number; rq: number; dropped: number };
  /**
   * Settles when the host calls on this QP started so far (modify) have ended. A destroy waits for it: the host
   * refuses to destroy an object with a call in progress (EBUSY), which would leave the QP and its CQs behind.
   */
  hostIdle?: Promise<void>;
}

/** Records a host call on a QP so that its destroy waits for it (Qp.hostIdle); returns the call. */
export function trackQpCall<T>(qp: Qp, call: Promise<T>): Promise<T> {
  const before = qp.hostIdle;
  qp.hostIdle = Promise.allSettled([before, call]).then(() => undefined);
  return call;
}

export interface Mr {
  handle: number;
  pd: Pd;
  access: number;
  iova: bigint;
  length: bigint;
  pageShift: number;
  totalPages: number;
  /** Guest physical address of each page received so far. */
  pages: number[];
  /** Where the region's first byte is in the backend's mapping (set from the first page). */
  backing?: { buffer: ArrayBuffer; offset: number };
  /**
   * When the pages are not contiguous in the backend's mapping of guest RAM: one contiguous view of them made for
   * the host registration (AliasMapper.map), unmapped once the host MR is deregistered.
   */
  alias?: ArrayBuffer;
  /** The runs of the backend's mapping the registration covers: a memory map change keeps the MR only if unchanged. */
  runs?: AliasPiece[];
  host?: MrHandle;
  /**
   * Guest RAM under it left the memory map (spec 10.8): the host registration is gone (or was never made, for a
   * pending MR); WQEs naming its lkey complete with LOC_PROT_ERR; only DEREG_MR remains.
   */
  lost?: boolean;
}

export interface Ah {
  handle: number;
  pd: Pd;
  host: AhHandle;
  dgid: Uint8Array;
  /** PolicyReason once the policy no longer allows its destination: UD sends to it fail (spec 12.3). */
  revoked?: number;
}
