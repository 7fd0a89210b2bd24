// A mapped RC QP (spec sections 13.3 to 13.6): its host SQ and RQ in the guest's shared memory window. Posting
// writes rxe WQEs into the slots, then the queue header's producer_index (store-release), and for the SQ the QP's
// MappedDoorbell slot (and, in NOTIFY mode, a notification of mapdoorbellq). Nothing of the device runs per WQE.

import { Command, DestroyQpResponse, DoorbellMode, HandleRequest } from '../../../vmm-device/abi/rdma/index.ts';
import type { VirtioRdmaDriver } from '../driver.ts';
import { UsageError } from '../errors.ts';
import { QpBase, type QpCaps } from '../qp-base.ts';
import type { SharedMemoryWindow } from '../transport.ts';
import type { RecvWr, SendWr } from '../work-request.ts';
import type { MappedCq } from './mapped-cq.ts';
import { encodeRxeRecvWqe, encodeRxeSendWqe } from './rxe-abi.ts';
import type { RxeQueue } from './rxe-queue.ts';

export interface MappedDoorbellSlot {
  window: SharedMemoryWindow;
  offset: bigint;
  /** DoorbellMode of the device (configuration `doorbell_mode`). */
  mode: number;
  /** mapdoorbellq's index, notified after the store in NOTIFY mode. */
  notifyQueue: number;
}

export class MappedQp extends QpBase {
  readonly mode = 'mapped';
  private sqProducer: number;
  private rqProducer: number;
  /** The provider's send sequence number, one per send WQE. */
  private ssn = 0;
  /** Doorbells rung (stores into the slot): a test's and an operator's view of the guest side. */
  doorbells = 0;

  constructor(
    driver: VirtioRdmaDriver,
    handle: number,
    qpNum: number,
    caps: QpCaps,
    readonly pd: { readonly handle: number },
    readonly sendCq: MappedCq,
    readonly recvCq: MappedCq,
    readonly sq: RxeQueue,
    readonly rq: RxeQueue,
    readonly doorbell: MappedDoorbellSlot,
    producers: { sq: number; rq: number },
  ) {
    super(driver, handle, qpNum, 'RC', caps);
    this.sqProducer = producers.sq;
    this.rqProducer = producers.rq;
  }

  /**
   * Writes the WQEs into the host SQ, then producer_index, then rings the doorbell slot. Every WQE is encoded and
   * the room checked before the first byte is written, so a refused list leaves the queue as it was.
   */
  async postSend(wrs: readonly SendWr[]): Promise<void> {
    this.checkLive();
    const limits = { slotSize: this.sq.slotSize, maxSge: this.caps.maxSendSge, maxInline: this.caps.maxInlineData };
    const wqes = wrs.map((wr, i) => encodeRxeSendWqe(wr, this.ssn + i, limits));
    await this.write(this.sq, this.sqProducer, wqes, 'SQ');
    this.ssn = (this.ssn + wqes.length) >>> 0;
    this.sqProducer = (this.sqProducer + wqes.length) & this.sq.mask;
    await this.sq.storeProducer(this.sqProducer);
    await this.ringDoorbell();
  }

  /** Writes the WQEs into the host RQ and advances producer_index; the RQ needs no doorbell (13.6). */
  async postRecv(wrs: readonly RecvWr[]): Promise<void> {
    this.checkLive();
    const limits = { slotSize: this.rq.slotSize, maxSge: this.caps.maxRecvSge };
    const wqes = wrs.map((wr) => encodeRxeRecvWqe(wr, limits));
    await this.write(this.rq, this.rqProducer, wqes, 'RQ');
    this.rqProducer = (this.rqProducer + wqes.length) & this.rq.mask;
    await this.rq.storeProducer(this.rqProducer);
  }

  /**
   * Writes raw bytes at the next slots of a queue and advances its producer_index (and rings for the SQ), for the
   * tests of what the host does with WQEs a hostile guest writes. `producer` overrides the index stored.
   */
  async postRaw(queue: 'SQ' | 'RQ', wqes: readonly Uint8Array[], producer?: number): Promise<void> {
    this.checkLive();
    const q = queue === 'SQ' ? this.sq : this.rq;
    const start = queue === 'SQ' ? this.sqProducer : this.rqProducer;
    await this.write(q, start, wqes, queue);
    const next = producer ?? ((start + wqes.length) & q.mask);
    if (queue === 'SQ') this.sqProducer = next & q.mask;
    else this.rqProducer = next & q.mask;
    await q.storeProducer(next);
    if (queue === 'SQ') await this.ringDoorbell();
  }

  /** One store of the SQ producer index into the doorbell slot, then the notification in NOTIFY mode (13.6). */
  async ringDoorbell(value = this.sqProducer): Promise<void> {
    await this.doorbell.window.writeU32(this.doorbell.offset, value);
    this.doorbells++;
    if (this.doorbell.mode === DoorbellMode.NOTIFY) await this.driver.transport.notify(this.doorbell.notifyQueue);
  }

  private async write(q: RxeQueue, producer: number, wqes: readonly Uint8Array[], name: string): Promise<void> {
    const consumer = await q.loadConsumer();
    const free = q.mask - q.used(producer, consumer);
    if (wqes.length > free) throw new UsageError(`QP ${this.handle} ${name}: ${wqes.length} WQEs do not fit (${free} slots free)`);
    for (let i = 0; i < wqes.length; i++) {
      const slot = (producer + i) & q.mask;
      const w = wqes[i]!;
      if (w.byteLength > q.slotSize) throw new UsageError(`QP ${this.handle} ${name}: a WQE of ${w.byteLength} bytes in a slot of ${q.slotSize}`);
      const view = q.slotView(slot, w.byteLength);
      if (view !== undefined) view.set(w);
      else await q.window.write(q.slotOffset(slot), w);
    }
  }

  private checkLive(): void {
    // Section 13.15: after DESTROY_QP's response the range and the slot are no longer the driver's.
    if (this.destroyed) throw new UsageError(`QP ${this.handle} is destroyed`);
  }

  async destroy(): Promise<{ sqFlushed: number; rqFlushed: number; flushDropped: number }> {
    const r = await this.driver.command(Command.DESTROY_QP, HandleRequest.encode({ handle: this.handle }), [], DestroyQpResponse);
    this.destroyed = true;
    this.sendCq.qpHandles.delete(this.qpNum);
    this.recvCq.qpHandles.delete(this.qpNum);
    this.driver.takeEvents((e) => e.handle === this.handle);
    return { sqFlushed: r.sq_flushed, rqFlushed: r.rq_flushed, flushDropped: r.flush_dropped };
  }
}
