// Memory map changes (spec 10.8 "Memory map changes"): every ring and MR the device holds is re-checked against the
// new map, synchronously, before the transport unmaps anything. Rings (QP SQ/RQ, CQ, their index blocks) are
// addressed by guest physical address, so one still inside guest RAM simply continues over the new map; one that
// is not is never touched again and its QP (QP_FATAL RING_UNREADABLE) or CQ (CQ_ERROR RING_UNREADABLE, its QPs
// QP_FATAL RING_UNREADABLE) is in error. A registered MR whose pages are not exactly where its host registration
// has them (a region removed, or replaced even at the same addresses) is deregistered on the host at once, because
// the range the host pinned is about to be unmapped; its PD's QPs move to ERR with QP_FATAL MR_LOST. Memory added is
// usable at once (page lists are checked against the current map).

import { CqErrorReason, EventType, QpFatalReason, QpState } from '../abi/rdma/index.ts';
import type { AliasMapper } from '../memory/alias.ts';
import type { GuestMemory } from '../memory/guest-memory.ts';
import type { HostVerbs } from '../verbs/host-verbs.ts';
import { mrStillMapped, releaseMr } from './commands/mr.ts';
import type { DataPath } from './data-path.ts';
import type { HandleTable } from './handle-table.ts';
import type { Cq, Mr, Qp } from './objects.ts';

/** What the re-check needs of the device. */
export interface MemoryCheckHost {
  readonly qps: HandleTable<Qp>;
  readonly cqs: HandleTable<Cq>;
  readonly mrs: HandleTable<Mr>;
  readonly data: DataPath;
  readonly verbs: HostVerbs;
  readonly aliases: AliasMapper;
  readonly counters: { ringsLost: number; mrsLost: number };
  queueEvent(type: number, handle: number, detail: number): void;
  release(p: Promise<unknown>): void;
  background(what: string, p: Promise<unknown>): void;
}

export function recheckObjects(dev: MemoryCheckHost, memory: GuestMemory): void {
  for (const qp of dev.qps.values()) {
    // A mapped QP or CQ has no ring in guest RAM (spec 13.1): the host's queue is not part of the memory map.
    if (qp.mapped !== undefined || qp.ringsLost === true || (qp.sq.ring.insideOf(memory) && qp.rq.ring.insideOf(memory))) continue;
    qp.ringsLost = true;
    dev.counters.ringsLost++;
    if (qp.state !== QpState.ERR) dev.queueEvent(EventType.QP_FATAL, qp.handle, QpFatalReason.RING_UNREADABLE);
    dev.background('moving a QP whose ring left guest RAM to ERR', dev.data.moveToError(qp));
  }
  for (const cq of dev.cqs.values()) {
    if (cq.mapped !== undefined || cq.ringLost === true || cq.ring.insideOf(memory)) continue;
    cq.ringLost = true;
    dev.counters.ringsLost++;
    if (cq.error) continue; // already in error: no more completions, nothing to report
    dev.data.cqError(cq, CqErrorReason.RING_UNREADABLE, QpFatalReason.RING_UNREADABLE);
  }
  for (const mr of dev.mrs.values()) {
    if (mr.lost === true) continue;
    if (mr.host === undefined) {
      // Pending (REG_MR_CONTINUE to come): a page gone now makes its registration fail later; mark it now.
      if (mr.pages.every((p) => memory.isValidRange(p, 2 ** mr.pageShift))) continue;
      mr.lost = true;
      dev.counters.mrsLost++;
      continue;
    }
    if (mrStillMapped(memory, mr)) continue;
    loseMr(dev, mr);
  }
}

/** An MR's guest RAM left the map: host registration released, its PD's QPs to ERR (spec 10.8). */
function loseMr(dev: MemoryCheckHost, mr: Mr): void {
  const host = mr.host!;
  mr.lost = true;
  dev.counters.mrsLost++;
  dev.data.removeMr(mr);
  mr.host = undefined;
  mr.backing = undefined;
  mr.runs = undefined;
  const alias = mr.alias;
  mr.alias = undefined;
  dev.release(releaseMr(dev.verbs, dev.aliases, host, alias));
  for (const qp of dev.qps.values()) {
    if (qp.pd !== mr.pd || qp.state === QpState.ERR || qp.state === QpState.RESET) continue;
    dev.queueEvent(EventType.QP_FATAL, qp.handle, QpFatalReason.MR_LOST);
    dev.background('moving a QP whose MR lost its memory to ERR', dev.data.moveToError(qp));
  }
}
