// A small verbs-like API over the virtio-rdma driver, for tests and the demo: open a device, PDs, CQs, QPs (RC and
// UD), MRs, AHs, post send and receive work requests, poll CQs and arm them. Each call is the spec's command or
// data-path step, nothing more; the names follow libibverbs where a reader expects them.
//
//   const ctx = await RdmaContext.open(transport);
//   const pd = await ctx.allocPd();
//   const cq = await ctx.createCq(64);
//   const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: 16, maxRecvWr: 16 });
//   const buf = ctx.allocBuffer(4096);
//   const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE);
//   await qp.connect({ gid: peerGid, qpn: peerQpn });
//   await qp.postSend([{ wrId: 1n, opcode: 'SEND', sgList: [mr.sge(0, 64)], signaled: true }]);
//   const wcs = await cq.waitPoll(1, 5000);

import {
  AccessFlag,
  ArmCqRequest,
  Command,
  CreateAhRequest,
  CreateCqRequest,
  CreateQpRequest,
  Cqe,
  DestroyQpResponse,
  DoorbellType,
  Empty,
  FeatureBit,
  HandleRequest,
  HandleResponse,
  Limits,
  QpState,
  QpType,
  QueryDeviceResponse,
  QueryGidRequest,
  QueryGidResponse,
  QueryPortRequest,
  QueryPortResponse,
  RecvWqe,
  RegMrContinueRequest,
  RegMrRequest,
  RegMrResponse,
  SendFlag,
  SendOpcode,
  SendWqe,
  WcOpcode,
  WcStatus,
  encodeSges,
  mrPageCount,
  ringOccupancy,
  ringPages,
} from '../../vmm-device/abi/rdma/index.ts';
import { GuestBuffer, VirtualAddressSpace, type GuestBufferOptions } from './buffer.ts';
import { VirtioRdmaDriver, type DeviceEvent, type DriverOptions } from './driver.ts';
import { ProtocolError, UsageError, wcStatusName } from './errors.ts';
import type { DriverTransport } from './transport.ts';
import type { AllocatableRange } from './memory.ts';
import { QpBase, type AddressVector, type QpCaps, type QpTypeName } from './qp-base.ts';
import type { RecvWr, SendWr, Sge, WorkCompletion } from './work-request.ts';
import { MappedCq } from './mapped/mapped-cq.ts';
import type { MappedQp } from './mapped/mapped-qp.ts';
import { cqResponseLayout, createMappedCq, createMappedQp, qpResponseLayout } from './mapped/mapped-verbs.ts';

export * from './qp-base.ts';
export * from './work-request.ts';
export { MappedCq } from './mapped/mapped-cq.ts';
export { MappedQp } from './mapped/mapped-qp.ts';

export type QueryDevice = ReturnType<typeof QueryDeviceResponse.decode>;
export type QueryPort = ReturnType<typeof QueryPortResponse.decode>;

/** Ring page size the driver uses for CQ, SQ and RQ rings (4 KiB, always allowed). */
export const RING_PAGE_SHIFT = Limits.MIN_PAGE_SHIFT;

function nameOf(table: Readonly<Record<string, number>>, value: number): string {
  for (const [k, v] of Object.entries(table)) if (v === value) return k;
  return `unknown(${value})`;
}

/** Index block field offsets (QueueIndex). */
const PRODUCER = 0;
const CONSUMER = 4;

// ---------------------------------------------------------------------------------------------------------------
// Objects

export class Pd {
  constructor(
    readonly ctx: RdmaContext,
    readonly handle: number,
  ) {}
  dealloc(): Promise<void> {
    return this.ctx.deallocPd(this);
  }
}

export class Ah {
  constructor(
    readonly ctx: RdmaContext,
    readonly handle: number,
    readonly pd: Pd,
  ) {}
  destroy(): Promise<void> {
    return this.ctx.destroyAh(this);
  }
}

export class Mr {
  constructor(
    readonly ctx: RdmaContext,
    readonly handle: number,
    readonly pd: Pd,
    readonly iova: bigint,
    readonly length: bigint,
    readonly lkey: number,
    readonly rkey: number,
    readonly buffer: GuestBuffer | undefined,
  ) {}
  /** An SGE over [offset, offset + length) of the region. */
  sge(offset: number, length: number): Sge {
    return { addr: this.iova + BigInt(offset), length, lkey: this.lkey };
  }
  dereg(): Promise<void> {
    return this.ctx.deregMr(this);
  }
}

/** A ring in guest memory with its QueueIndex block (section 10.2). */
class Ring {
  readonly buffer: GuestBuffer;
  readonly indexGpa: number;
  constructor(
    readonly ctx: RdmaContext,
    readonly depth: number,
    readonly entrySize: number,
    /** Pages and index block inside this guest-physical range (default: anywhere). */
    within?: AllocatableRange,
  ) {
    this.buffer = ctx.allocBuffer(depth * entrySize, { pageShift: RING_PAGE_SHIFT, placement: 'scattered', ...(within !== undefined ? { within } : {}) });
    // Section 8.17: the index block is zeroed before CREATE_CQ / CREATE_QP names it.
    try {
      this.indexGpa = ctx.driver.memory.allocZeroed(Limits.QUEUE_INDEX_SIZE, Limits.QUEUE_INDEX_SIZE, within);
    } catch (e) {
      this.buffer.release();
      throw e;
    }
  }
  get pages(): readonly bigint[] {
    return this.buffer.pages;
  }
  get numPages(): number {
    return ringPages(this.depth, this.entrySize, RING_PAGE_SHIFT);
  }
  entryOffset(n: number): number {
    return ((n >>> 0) % this.depth) * this.entrySize;
  }
  load(field: number): number {
    return this.ctx.driver.memory.loadU32(this.indexGpa + field);
  }
  store(field: number, value: number): void {
    this.ctx.driver.memory.storeU32(this.indexGpa + field, value);
  }
  release(): void {
    this.buffer.release();
    this.ctx.driver.memory.release(this.indexGpa);
  }
}

export class Cq {
  readonly mode = 'relay';
  private consumer = 0;
  destroyed = false;
  constructor(
    readonly ctx: RdmaContext,
    readonly handle: number,
    readonly depth: number,
    readonly ring: Ring,
  ) {}

  /**
   * Takes up to `max` completions (section 10.2, driver polling): read producer_index, then the CQEs, then write
   * consumer_index.
   */
  poll(max = this.depth): WorkCompletion[] {
    const producer = this.ring.load(PRODUCER);
    const ready = ringOccupancy(producer, this.consumer);
    if (ready > this.depth) throw new ProtocolError(`CQ ${this.handle}: producer_index ${producer} is ${ready} ahead of ${this.consumer}, depth ${this.depth}`);
    const out: WorkCompletion[] = [];
    const n = Math.min(ready, max);
    for (let i = 0; i < n; i++) {
      const c = Cqe.decode(this.ring.buffer.read(this.ring.entryOffset(this.consumer), Limits.CQE_SIZE));
      out.push({
        wrId: c.wr_id,
        qpHandle: c.qp_handle,
        status: c.status,
        statusName: wcStatusName(c.status),
        opcode: c.opcode,
        opcodeName: nameOf(WcOpcode, c.opcode),
        byteLen: c.byte_len,
        immData: c.imm_data,
        srcQp: c.src_qp,
        wcFlags: c.wc_flags,
        vendorErr: c.vendor_err,
      });
      this.consumer = (this.consumer + 1) >>> 0;
    }
    if (n > 0) this.ring.store(CONSUMER, this.consumer);
    return out;
  }

  /**
   * Arms the CQ (section 10.7). By default with a doorbell record (no round trip); `viaCommand` uses ARM_CQ, whose
   * arm is in effect when the response returns. consumer_index was written by the last poll, as 10.10 requires.
   * The caller polls again after arming (a completion may have landed between its last poll and the arm).
   */
  async reqNotify(solicitedOnly = false, viaCommand = false): Promise<void> {
    if (viaCommand) {
      await this.ctx.driver.command(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: this.handle, solicited_only: solicitedOnly ? 1 : 0 }), [], Empty);
      return;
    }
    await this.ctx.driver.doorbell([{ handle: this.handle, type: solicitedOnly ? DoorbellType.CQ_ARM_SOLICITED : DoorbellType.CQ_ARM_NEXT }]);
  }

  /** Waits for this CQ's COMPLETION event. */
  waitEvent(timeoutMs: number): Promise<DeviceEvent | undefined> {
    return this.ctx.driver.waitCompletionEvent(this.handle, timeoutMs);
  }

  /**
   * Collects `count` completions within `timeoutMs`, sleeping on completion events between polls (arm, poll
   * again, wait), as an interrupt-driven guest does. Returns what arrived (fewer on timeout).
   */
  async waitPoll(count: number, timeoutMs: number): Promise<WorkCompletion[]> {
    const deadline = Date.now() + timeoutMs;
    const got = this.poll(count);
    while (got.length < count) {
      await this.reqNotify(false);
      got.push(...this.poll(count - got.length));
      if (got.length >= count) break;
      const left = deadline - Date.now();
      if (left <= 0) break;
      await this.waitEvent(left);
      got.push(...this.poll(count - got.length));
    }
    return got;
  }

  destroy(): Promise<void> {
    return this.ctx.destroyCq(this);
  }
}


export interface CreateQpOptions<C = Cq> extends Partial<QpCaps> {
  type: QpTypeName;
  /** Relayed CQs make a relayed QP; mapped CQs (createCq with `map`) a mapped RC QP (section 13.3). */
  sendCq: C;
  recvCq: C;
  sqSigAll?: boolean;
}


/** Opcodes that may carry inline data (section 10.3). */
const INLINE_OPCODES = new Set<SendWr['opcode']>(['SEND', 'SEND_WITH_IMM', 'RDMA_WRITE', 'RDMA_WRITE_WITH_IMM']);

/** Encodes one send WQE (section 10.3). Exported for encoding tests. */
export function encodeSendWqe(wr: SendWr): Uint8Array {
  const sges = wr.sgList ?? [];
  let flags = (wr.signaled ? SendFlag.SIGNALED : 0) | (wr.solicited ? SendFlag.SOLICITED : 0) | (wr.fence ? SendFlag.FENCE : 0);
  let payload: Uint8Array;
  let numSge = 0;
  let inlineLength = 0;
  if (wr.inline !== undefined) {
    if (sges.length > 0) throw new UsageError('a WQE carries inline data or SGEs, not both');
    if (!INLINE_OPCODES.has(wr.opcode)) throw new UsageError(`${wr.opcode} cannot carry inline data`);
    if (wr.inline.byteLength > Limits.SQ_WQE_MAX_INLINE) throw new UsageError(`inline data of ${wr.inline.byteLength} bytes (at most ${Limits.SQ_WQE_MAX_INLINE})`);
    flags |= SendFlag.INLINE;
    payload = new Uint8Array(64);
    payload.set(wr.inline);
    inlineLength = wr.inline.byteLength;
  } else {
    if (sges.length > Limits.SQ_WQE_MAX_SGE) throw new UsageError(`${sges.length} SGEs (a send WQE holds ${Limits.SQ_WQE_MAX_SGE})`);
    payload = encodeSges(sges, Limits.SQ_WQE_MAX_SGE);
    numSge = sges.length;
  }
  return SendWqe.encode({
    wr_id: wr.wrId,
    opcode: SendOpcode[wr.opcode],
    flags,
    num_sge: numSge,
    imm_data: (wr.imm ?? 0) >>> 0,
    remote_addr: wr.remoteAddr ?? 0n,
    rkey: wr.rkey ?? 0,
    inline_length: inlineLength,
    compare_add: wr.compareAdd ?? 0n,
    swap: wr.swap ?? 0n,
    ah_handle: wr.ah?.handle ?? 0,
    remote_qpn: wr.remoteQpn ?? 0,
    remote_qkey: wr.remoteQkey ?? 0,
    payload,
  });
}

/** Encodes one receive WQE (section 10.4). */
export function encodeRecvWqe(wr: RecvWr): Uint8Array {
  if (wr.sgList.length > Limits.RQ_WQE_MAX_SGE) throw new UsageError(`${wr.sgList.length} SGEs (a receive WQE holds ${Limits.RQ_WQE_MAX_SGE})`);
  return RecvWqe.encode({ wr_id: wr.wrId, num_sge: wr.sgList.length, sges: encodeSges(wr.sgList, Limits.RQ_WQE_MAX_SGE) });
}


class WorkQueue {
  producer = 0;
  constructor(
    readonly ring: Ring,
    readonly depth: number,
  ) {}
}

export class Qp extends QpBase {
  readonly mode = 'relay';
  constructor(
    readonly ctx: RdmaContext,
    handle: number,
    qpNum: number,
    type: QpTypeName,
    readonly pd: Pd,
    readonly sendCq: Cq,
    readonly recvCq: Cq,
    caps: QpCaps,
    readonly sq: WorkQueue,
    readonly rq: WorkQueue,
  ) {
    super(ctx.driver, handle, qpNum, type, caps);
  }

  /**
   * Writes the WQEs into the SQ ring, then producer_index (store-release), then one SQ doorbell record
   * (section 10.2 and 10.6). Throws before writing anything if the ring has no room for all of them.
   */
  async postSend(wrs: readonly SendWr[]): Promise<void> {
    for (const wr of wrs) {
      // The device would complete it with LOC_QP_OP_ERR and move the QP to ERR (section 10.8): refuse it here.
      const n = wr.inline?.byteLength ?? 0;
      if (n > this.caps.maxInlineData) throw new UsageError(`inline data of ${n} bytes (at most ${this.caps.maxInlineData} in this QP)`);
    }
    const wqes = wrs.map(encodeSendWqe);
    this.post(this.sq, wqes, 'SQ');
    await this.ctx.driver.doorbell([{ handle: this.handle, type: DoorbellType.SQ }]);
  }

  async postRecv(wrs: readonly RecvWr[]): Promise<void> {
    const wqes = wrs.map(encodeRecvWqe);
    this.post(this.rq, wqes, 'RQ');
    await this.ctx.driver.doorbell([{ handle: this.handle, type: DoorbellType.RQ }]);
  }

  /** Writes raw WQE bytes (tests of the device's WQE checks) and rings the doorbell. */
  async postRaw(queue: 'SQ' | 'RQ', wqes: readonly Uint8Array[]): Promise<void> {
    this.post(queue === 'SQ' ? this.sq : this.rq, wqes, queue);
    await this.ctx.driver.doorbell([{ handle: this.handle, type: queue === 'SQ' ? DoorbellType.SQ : DoorbellType.RQ }]);
  }

  private post(wq: WorkQueue, wqes: readonly Uint8Array[], name: string): void {
    if (this.destroyed) throw new UsageError(`QP ${this.handle} is destroyed`);
    const consumer = wq.ring.load(CONSUMER);
    const used = ringOccupancy(wq.producer, consumer);
    if (used + wqes.length > wq.depth) {
      throw new UsageError(`QP ${this.handle} ${name}: ${wqes.length} WQEs do not fit (${used} of ${wq.depth} outstanding)`);
    }
    for (const w of wqes) {
      wq.ring.buffer.write(wq.ring.entryOffset(wq.producer), w);
      wq.producer = (wq.producer + 1) >>> 0;
    }
    wq.ring.store(PRODUCER, wq.producer);
  }

  destroy(): Promise<{ sqFlushed: number; rqFlushed: number; flushDropped: number }> {
    return this.ctx.destroyQp(this);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The context

export interface CreateCqOptions {
  /** Guest-physical range that holds the ring's pages and its index block. */
  within?: AllocatableRange;
  /** A mapped CQ (section 13): the host's CQ polled in place. Needs HOST_QUEUE_MAPPING. */
  map?: boolean;
}

export interface RegMrOptions {
  /** Pages per command; default the device's max_pages_per_command (smaller values force REG_MR_CONTINUE). */
  pagesPerCommand?: number;
}

export class RdmaContext {
  readonly vas = new VirtualAddressSpace();

  private constructor(readonly driver: VirtioRdmaDriver) {}

  /** openDevice: initializes the device over a transport (section 6). */
  static async open(transport: DriverTransport, options: DriverOptions = {}): Promise<RdmaContext> {
    return new RdmaContext(await VirtioRdmaDriver.open(transport, options));
  }

  get config() {
    return this.driver.config;
  }

  /** The VM's own virtual GID (configuration `gid`), what a peer names this VM by. */
  get gid(): Uint8Array {
    return this.driver.config.gid;
  }

  allocBuffer(length: number, options: GuestBufferOptions = {}): GuestBuffer {
    return GuestBuffer.allocate(this.driver.memory, this.vas, length, options);
  }

  queryDevice(): Promise<QueryDevice> {
    return this.driver.command(Command.QUERY_DEVICE, new Uint8Array(0), [], QueryDeviceResponse);
  }

  queryPort(port: number = Limits.PORT_NUM): Promise<QueryPort> {
    return this.driver.command(Command.QUERY_PORT, QueryPortRequest.encode({ port_num: port }), [], QueryPortResponse);
  }

  async queryGid(index = 0, port: number = Limits.PORT_NUM): Promise<{ gid: Uint8Array; gidType: number }> {
    const r = await this.driver.command(Command.QUERY_GID, QueryGidRequest.encode({ port_num: port, index }), [], QueryGidResponse);
    return { gid: r.gid, gidType: r.gid_type };
  }

  async allocPd(): Promise<Pd> {
    const r = await this.driver.command(Command.CREATE_PD, new Uint8Array(0), [], HandleResponse);
    return new Pd(this, r.handle);
  }

  async deallocPd(pd: Pd): Promise<void> {
    await this.driver.command(Command.DESTROY_PD, HandleRequest.encode({ handle: pd.handle }), [], Empty);
  }

  /**
   * CREATE_CQ with a ring of `depth` CQEs (rounded up to a power of two) in 4 KiB pages; `options.within` places the
   * ring and its index block in that guest-physical range (RAM hot-added after DRIVER_OK, say).
   */
  createCq(depth: number, options: CreateCqOptions & { map: true }): Promise<MappedCq>;
  createCq(depth: number, options?: CreateCqOptions & { map?: false }): Promise<Cq>;
  async createCq(depth: number, options: CreateCqOptions = {}): Promise<Cq | MappedCq> {
    const cqeCount = roundUpPow2(depth);
    if (options.map === true) return createMappedCq(this.driver, cqeCount);
    const ring = new Ring(this, cqeCount, Limits.CQE_SIZE, options.within);
    try {
      const body = CreateCqRequest.encode({ cqe_count: cqeCount, page_shift: RING_PAGE_SHIFT, num_pages: ring.numPages, index_gpa: BigInt(ring.indexGpa) });
      const r = await this.driver.command(Command.CREATE_CQ, body, ring.pages, cqResponseLayout(this.driver));
      if (r.cqe_count !== cqeCount) throw new ProtocolError(`CREATE_CQ: depth ${r.cqe_count} in effect, ${cqeCount} asked`);
      return new Cq(this, r.cq_handle, cqeCount, ring);
    } catch (e) {
      ring.release();
      throw e;
    }
  }

  async destroyCq(cq: Cq): Promise<void> {
    await this.driver.command(Command.DESTROY_CQ, HandleRequest.encode({ handle: cq.handle }), [], Empty);
    cq.destroyed = true;
    // Section 8.17: the ring stays in guest RAM until the response; now it is the driver's again.
    cq.ring.release();
    this.driver.takeEvents((e) => e.handle === cq.handle);
  }

  createQp(pd: Pd, o: CreateQpOptions<MappedCq>): Promise<MappedQp>;
  createQp(pd: Pd, o: CreateQpOptions): Promise<Qp>;
  async createQp(pd: Pd, o: CreateQpOptions<Cq | MappedCq>): Promise<Qp | MappedQp> {
    const cfg = this.driver.config;
    const caps: QpCaps = {
      maxSendWr: roundUpPow2(o.maxSendWr ?? 16),
      maxRecvWr: roundUpPow2(o.maxRecvWr ?? 16),
      maxSendSge: o.maxSendSge ?? Math.min(cfg.max_send_sge, Limits.SQ_WQE_MAX_SGE),
      maxRecvSge: o.maxRecvSge ?? Math.min(cfg.max_recv_sge, Limits.RQ_WQE_MAX_SGE),
      maxInlineData: o.maxInlineData ?? (this.driver.has(FeatureBit.INLINE) ? cfg.max_inline_data : 0),
    };
    const { sendCq, recvCq } = o;
    if (sendCq instanceof MappedCq || recvCq instanceof MappedCq) {
      // Section 13.3: a mapped QP has mapped CQs only, and only RC is mapped (13.8); the device checks it too.
      if (!(sendCq instanceof MappedCq && recvCq instanceof MappedCq) || o.type !== 'RC') throw new UsageError('a mapped QP is RC with a mapped send and receive CQ');
      return createMappedQp(this.driver, { pd, sendCq, recvCq, caps, sqSigAll: o.sqSigAll ?? false });
    }
    const sqRing = new Ring(this, caps.maxSendWr, Limits.SQ_WQE_SIZE);
    let rqRing: Ring | undefined;
    try {
      rqRing = new Ring(this, caps.maxRecvWr, Limits.RQ_WQE_SIZE);
      const body = CreateQpRequest.encode({
        pd_handle: pd.handle,
        send_cq_handle: sendCq.handle,
        recv_cq_handle: recvCq.handle,
        qp_type: QpType[o.type],
        sq_sig_all: o.sqSigAll ? 1 : 0,
        sq_page_shift: RING_PAGE_SHIFT,
        rq_page_shift: RING_PAGE_SHIFT,
        max_send_wr: caps.maxSendWr,
        max_recv_wr: caps.maxRecvWr,
        max_send_sge: caps.maxSendSge,
        max_recv_sge: caps.maxRecvSge,
        max_inline_data: caps.maxInlineData,
        sq_num_pages: sqRing.numPages,
        rq_num_pages: rqRing.numPages,
        sq_index_gpa: BigInt(sqRing.indexGpa),
        rq_index_gpa: BigInt(rqRing.indexGpa),
      });
      const r = await this.driver.command(Command.CREATE_QP, body, [...sqRing.pages, ...rqRing.pages], qpResponseLayout(this.driver));
      const got: QpCaps = { maxSendWr: r.max_send_wr, maxRecvWr: r.max_recv_wr, maxSendSge: r.max_send_sge, maxRecvSge: r.max_recv_sge, maxInlineData: r.max_inline_data };
      if (got.maxSendWr !== caps.maxSendWr || got.maxRecvWr !== caps.maxRecvWr || got.maxSendSge !== caps.maxSendSge || got.maxRecvSge !== caps.maxRecvSge || got.maxInlineData !== caps.maxInlineData) {
        throw new ProtocolError(`CREATE_QP: capabilities in effect ${JSON.stringify(got)} differ from the request`);
      }
      return new Qp(this, r.qp_handle, r.qp_num, o.type, pd, sendCq, recvCq, caps, new WorkQueue(sqRing, caps.maxSendWr), new WorkQueue(rqRing, caps.maxRecvWr));
    } catch (e) {
      sqRing.release();
      rqRing?.release();
      throw e;
    }
  }

  async destroyQp(qp: Qp): Promise<{ sqFlushed: number; rqFlushed: number; flushDropped: number }> {
    const r = await this.driver.command(Command.DESTROY_QP, HandleRequest.encode({ handle: qp.handle }), [], DestroyQpResponse);
    qp.destroyed = true;
    qp.sq.ring.release();
    qp.rq.ring.release();
    this.driver.takeEvents((e) => e.handle === qp.handle);
    return { sqFlushed: r.sq_flushed, rqFlushed: r.rq_flushed, flushDropped: r.flush_dropped };
  }

  /**
   * Registers a region (section 8.14): a GuestBuffer (its iova and pages), or an explicit description. A page list
   * longer than max_pages_per_command goes in REG_MR then REG_MR_CONTINUE commands, in order.
   */
  async regMr(
    pd: Pd,
    region: GuestBuffer | { iova: bigint; length: bigint; pageShift: number; pages: readonly bigint[] },
    access: number,
    options: RegMrOptions = {},
  ): Promise<Mr> {
    const isBuffer = region instanceof GuestBuffer;
    const iova = region.iova;
    const length = isBuffer ? BigInt(region.length) : region.length;
    const pageShift = region.pageShift;
    const pages = region.pages;
    const total = mrPageCount(iova, length, pageShift);
    if (BigInt(pages.length) !== total) throw new UsageError(`region needs ${total} pages, ${pages.length} given`);
    const perCommand = options.pagesPerCommand ?? this.driver.config.max_pages_per_command;
    if (perCommand < 1 || perCommand > this.driver.config.max_pages_per_command) throw new UsageError(`pagesPerCommand ${perCommand}`);
    const first = pages.slice(0, perCommand);
    const body = RegMrRequest.encode({
      pd_handle: pd.handle,
      access_flags: access,
      iova,
      length,
      page_shift: pageShift,
      total_pages: Number(total),
      num_pages: first.length,
    });
    let r = await this.driver.command(Command.REG_MR, body, first, RegMrResponse);
    const handle = r.mr_handle;
    try {
      while (r.pages_received < pages.length) {
        const start = r.pages_received;
        const chunk = pages.slice(start, start + perCommand);
        const cont = RegMrContinueRequest.encode({ mr_handle: handle, start_index: start, num_pages: chunk.length });
        const next = await this.driver.command(Command.REG_MR_CONTINUE, cont, chunk, RegMrResponse);
        if (next.mr_handle !== handle || next.pages_received !== start + chunk.length) {
          throw new ProtocolError(`REG_MR_CONTINUE: handle ${next.mr_handle} with ${next.pages_received} pages, expected ${handle} with ${start + chunk.length}`);
        }
        r = next;
      }
    } catch (e) {
      // A pending MR counts against the limits (section 8.14): give it back.
      await this.driver.command(Command.DEREG_MR, HandleRequest.encode({ handle }), [], Empty).catch(() => undefined);
      throw e;
    }
    return new Mr(this, handle, pd, iova, length, r.lkey, r.rkey, isBuffer ? region : undefined);
  }

  async deregMr(mr: Mr): Promise<void> {
    await this.driver.command(Command.DEREG_MR, HandleRequest.encode({ handle: mr.handle }), [], Empty);
  }

  async createAh(pd: Pd, av: AddressVector): Promise<Ah> {
    const body = CreateAhRequest.encode({
      pd_handle: pd.handle,
      flow_label: av.flowLabel ?? 0,
      port_num: Limits.PORT_NUM,
      sgid_index: 0,
      hop_limit: av.hopLimit ?? 64,
      traffic_class: av.trafficClass ?? 0,
      sl: av.sl ?? 0,
      dgid: av.dgid,
    });
    const r = await this.driver.command(Command.CREATE_AH, body, [], HandleResponse);
    return new Ah(this, r.handle, pd);
  }

  async destroyAh(ah: Ah): Promise<void> {
    await this.driver.command(Command.DESTROY_AH, HandleRequest.encode({ handle: ah.handle }), [], Empty);
  }

  /** Resets the device (every object destroyed on the device side, section 11.5) and closes the transport. */
  async close(): Promise<void> {
    await this.driver.close();
    await this.driver.transport.close();
  }
}

function roundUpPow2(n: number): number {
  if (!Number.isInteger(n) || n < 1 || n > Limits.MAX_QUEUE_DEPTH) throw new UsageError(`queue depth ${n}`);
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

export { AccessFlag, WcStatus, WcOpcode, QpState };
