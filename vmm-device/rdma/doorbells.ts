// The doorbell queue (spec section 10.6): buffers of 8-byte records naming a QP's SQ or RQ, or a CQ to arm. A
// record carries no index; the data path reads the ring's producer_index itself. Bad records are reported by
// DOORBELL_ERROR events and never make the device need a reset.

import { DoorbellErrorReason, DoorbellRecord, DoorbellType, EventType, Limits, QpState } from '../abi/rdma/index.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import type { DataPath } from './data-path.ts';
import type { EventQueue } from './event-queue.ts';
import { UNKNOWN_HANDLE_KEY } from './event-queue.ts';
import type { Cq, Qp } from './objects.ts';

export interface DoorbellHost {
  readonly isActive: boolean;
  queue(index: number): DeviceQueue | undefined;
  popChain(index: number): DescriptorChain | null;
  pushUsed(index: number, chain: DescriptorChain, len: number): void;
  fatal(queue: number, why: string): void;
  qp(handle: number): Qp | undefined;
  cq(handle: number): Cq | undefined;
  readonly data: DataPath;
  readonly events: EventQueue;
  readonly counters: { doorbellErrors: number };
}

export class DoorbellQueue {
  constructor(
    private readonly host: DoorbellHost,
    private readonly index: number,
  ) {}

  /** Serves every available buffer; bounded by the ring (each buffer is popped once). */
  serve(): void {
    const q = this.host.queue(this.index);
    if (q === undefined) return;
    do {
      q.disableNotifications();
      for (;;) {
        if (!this.host.isActive) return;
        const chain = this.host.popChain(this.index);
        if (chain === null) break;
        if (chain.writableBytes !== 0) {
          this.host.fatal(this.index, `doorbell buffer with ${chain.writableBytes} writable bytes (spec 7.5 case 4)`);
          return;
        }
        this.serveBuffer(chain);
        this.host.pushUsed(this.index, chain, 0);
      }
    } while (this.host.isActive && q.enableNotifications());
  }

  private serveBuffer(chain: DescriptorChain): void {
    const total = Math.floor(chain.readableBytes / Limits.DOORBELL_RECORD_SIZE);
    const n = Math.min(total, Limits.DOORBELL_MAX_RECORDS);
    const bytes = chain.reader().read(n * Limits.DOORBELL_RECORD_SIZE); // one private copy of the records
    for (let i = 0; i < n; i++) {
      const rec = DoorbellRecord.decode(bytes, i * Limits.DOORBELL_RECORD_SIZE);
      this.serveRecord(rec.handle, rec.type);
    }
    if (chain.readableBytes % Limits.DOORBELL_RECORD_SIZE !== 0) this.error(0, DoorbellErrorReason.PARTIAL_RECORD);
    if (total > Limits.DOORBELL_MAX_RECORDS) this.error(0, DoorbellErrorReason.TOO_MANY_RECORDS);
  }

  private serveRecord(handle: number, type: number): void {
    switch (type) {
      case DoorbellType.SQ:
      case DoorbellType.RQ: {
        const qp = this.host.qp(handle);
        if (qp === undefined) return this.unknown(handle, DoorbellErrorReason.UNKNOWN_HANDLE);
        // A mapped QP's doorbell is its slot (spec 13.6): records naming it are ignored and reported.
        if (qp.state === QpState.RESET || qp.mapped !== undefined) return this.error(handle, DoorbellErrorReason.WRONG_STATE);
        if (type === DoorbellType.SQ) this.host.data.takeSends(qp);
        else this.host.data.takeRecvs(qp);
        return;
      }
      case DoorbellType.CQ_ARM_NEXT:
      case DoorbellType.CQ_ARM_SOLICITED: {
        const cq = this.host.cq(handle);
        if (cq === undefined) return this.unknown(handle, DoorbellErrorReason.UNKNOWN_HANDLE);
        if (cq.error) return this.error(handle, DoorbellErrorReason.WRONG_STATE);
        this.host.data.arm(cq, type === DoorbellType.CQ_ARM_SOLICITED);
        return;
      }
      default:
        // Keyed by the handle when it names an object (bounded by the objects), else in the shared slot.
        if (this.host.qp(handle) !== undefined || this.host.cq(handle) !== undefined) return this.error(handle, DoorbellErrorReason.UNKNOWN_TYPE);
        return this.unknown(handle, DoorbellErrorReason.UNKNOWN_TYPE);
    }
  }

  private error(handle: number, reason: number): void {
    this.host.counters.doorbellErrors++;
    this.host.events.push(EventType.DOORBELL_ERROR, handle, reason);
  }

  /** A record whose handle (or type) names no object: one shared waiting slot (section 9.3 bound). */
  private unknown(handle: number, reason: number): void {
    this.host.counters.doorbellErrors++;
    this.host.events.push(EventType.DOORBELL_ERROR, handle, reason, UNKNOWN_HANDLE_KEY);
  }
}
