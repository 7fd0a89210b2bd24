// A mapped CQ (spec sections 13.3, 13.4 and 13.7): the host's rxe CQ in the guest's shared memory window. The
// driver polls it in place (load-acquire of producer_index, the ib_uverbs_wc slots, store-release of
// consumer_index), arms it with ARM_CQ and polls again once the arm is in effect, since the device cannot see the
// CQ's indexes and raises no event for completions already there.

import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { ArmCqRequest, Command, Empty, HandleRequest } from '../../../vmm-device/abi/rdma/index.ts';
import type { DeviceEvent, VirtioRdmaDriver } from '../driver.ts';
import { UsageError } from '../errors.ts';
import type { WorkCompletion } from '../work-request.ts';
import { UverbsWc, decodeUverbsWc, toWorkCompletion } from './rxe-abi.ts';
import type { RxeQueue } from './rxe-queue.ts';

/** Completions one poll takes at most: a guest-independent bound on the loop (the host's index is masked anyway). */
export const MAPPED_POLL_MAX = 1024;

export class MappedCq {
  readonly mode = 'mapped';
  destroyed = false;
  private consumer: number;
  /** Wire QPN -> QP handle of the mapped QPs that complete here (a host completion names the wire QPN, 13.4). */
  readonly qpHandles = new Map<number, number>();
  /** Completions whose wire QPN names no mapped QP of this CQ (a host completion the driver cannot attribute). */
  strayCompletions = 0;

  constructor(
    readonly driver: VirtioRdmaDriver,
    readonly handle: number,
    readonly depth: number,
    readonly queue: RxeQueue,
    initialConsumer: number,
  ) {
    this.consumer = initialConsumer;
  }

  /** Takes up to `max` completions from the host CQ in place. */
  async poll(max = this.depth): Promise<WorkCompletion[]> {
    if (this.destroyed) throw new UsageError(`CQ ${this.handle} is destroyed: its range is no longer the driver's (13.15)`);
    const q = this.queue;
    const producer = await q.loadProducer();
    const n = Math.min(q.used(producer, this.consumer), max, MAPPED_POLL_MAX);
    const out: WorkCompletion[] = [];
    for (let i = 0; i < n; i++) {
      const slot = (this.consumer + i) & q.mask;
      const bytes = q.slotView(slot, UverbsWc.SIZE) ?? (await q.window.read(q.slotOffset(slot), UverbsWc.SIZE));
      const wc = decodeUverbsWc(bytes);
      const qpHandle = this.qpHandles.get(wc.qpNum) ?? 0;
      if (qpHandle === 0) this.strayCompletions++;
      out.push(toWorkCompletion(wc, qpHandle));
    }
    if (n > 0) {
      this.consumer = (this.consumer + n) & q.mask;
      await q.storeConsumer(this.consumer);
    }
    return out;
  }

  /** Arms the host CQ through ARM_CQ (13.7): in effect when the response returns. The caller polls again after it. */
  async reqNotify(solicitedOnly = false): Promise<void> {
    await this.driver.command(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: this.handle, solicited_only: solicitedOnly ? 1 : 0 }), [], Empty);
  }

  waitEvent(timeoutMs: number): Promise<DeviceEvent | undefined> {
    return this.driver.waitCompletionEvent(this.handle, timeoutMs);
  }

  /** Collects `count` completions within `timeoutMs`: poll, arm, poll again, wait for the event (13.15). */
  async waitPoll(count: number, timeoutMs: number): Promise<WorkCompletion[]> {
    const deadline = Date.now() + timeoutMs;
    const got = await this.poll(count);
    while (got.length < count) {
      await this.reqNotify(false);
      got.push(...(await this.poll(count - got.length)));
      if (got.length >= count) break;
      const left = deadline - Date.now();
      if (left <= 0) break;
      await this.waitEvent(left);
      got.push(...(await this.poll(count - got.length)));
    }
    return got;
  }

  /** Spins on the CQ without arming (a busy-polling guest): what latency measurements use. */
  async spinPoll(count: number, timeoutMs: number): Promise<WorkCompletion[]> {
    const deadline = Date.now() + timeoutMs;
    const got: WorkCompletion[] = [];
    while (got.length < count && Date.now() < deadline) {
      const more = await this.poll(count - got.length);
      got.push(...more);
      // A window with a direct view answers in microtasks: let the event loop (and an in-process device) run.
      if (more.length === 0) await yieldToLoop();
    }
    return got;
  }

  async destroy(): Promise<void> {
    await this.driver.command(Command.DESTROY_CQ, HandleRequest.encode({ handle: this.handle }), [], Empty);
    this.destroyed = true;
    this.driver.takeEvents((e) => e.handle === this.handle);
  }
}
