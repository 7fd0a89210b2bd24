// The data path as the device core sees it: what moves work between the guest's rings and the host's queues.
// Version 1's relay (relay.ts) is one implementation; the mapped data path (section 13) will be another. An
// implementation gets a narrow DataPathHost, never the device itself, so neither imports the other.

import type { GuestMemory } from '../memory/guest-memory.ts';
import type { Logger } from '../util/log.ts';
import type { HostVerbs } from '../verbs/host-verbs.ts';
import type { VirtualAddress } from './address-resolver.ts';
import type { Ah, Cq, Mr, Qp } from './objects.ts';

/** Flush completions a DESTROY_QP wrote and could not write (DestroyQpResponse, spec 11.1). */
export interface FlushCounts {
  sq: number;
  rq: number;
  dropped: number;
}

/** What a data path may use of the device: the guest's memory and objects, the host verbs, events, counters. */
export interface DataPathHost {
  /** The current guest memory map (it changes on memoryChanged; never keep it across calls). */
  readonly memory: GuestMemory;
  readonly verbs: HostVerbs;
  /** False once reset, broken or not yet activated: touch neither the guest nor the host. */
  readonly isActive: boolean;
  hasFeature(bit: number): boolean;
  readonly maxMsgSize: number;
  readonly activeMtu: number;
  /** The VM's own virtual address (its GID and VPC Q_Key). */
  readonly address: VirtualAddress;
  ah(handle: number): Ah | undefined;
  /** The virtual GID of a UD sender, from its host GID and QPN; undefined when it has none in this VM's VPC. */
  reverseSource(hostGid: Uint8Array, srcQp: number): Uint8Array | undefined;
  queueEvent(type: number, handle: number, detail: number): void;
  readonly counters: { hostErrors: number; completionsWritten: number };
  readonly log: Logger;
  /** Runs work the event loop continues later: an unexpected rejection is the device's failure, never unhandled. */
  background(what: string, p: Promise<unknown>): void;
}

export interface DataPath {
  /** Forgets every object (device reset). */
  reset(): void;
  addQp(qp: Qp): void;
  removeQp(qp: Qp): void;
  addCq(cq: Cq): void;
  removeCq(cq: Cq): void;
  addMr(mr: Mr): void;
  removeMr(mr: Mr): void;
  qpByHostId(id: number): Qp | undefined;
  cqByHostId(id: number): Cq | undefined;
  /** An SQ doorbell record (or the move to RTS): take the new send WQEs. */
  takeSends(qp: Qp): void;
  /** An RQ doorbell record (or a move to INIT, RTR, RTS): take the new receive WQEs. */
  takeRecvs(qp: Qp): void;
  /** ARM_CQ or an arm record (section 10.7). */
  arm(cq: Cq, solicited: boolean): void;
  /** Moves a QP to ERR: outstanding work is flushed (section 11.1); resolves when the host QP followed. */
  moveToError(qp: Qp): Promise<void>;
  /** The host moved the QP to ERR by itself (an async event). */
  hostMovedToError(qp: Qp): void;
  /** MODIFY_QP to or from RESET: outstanding work discarded without completions (section 8.11). */
  discardRings(qp: Qp): void;
  /**
   * DESTROY_QP (section 11.1): ERR, then `destroyHost` (which waits, at most FLUSH_LIMIT_MS, for the host's flush
   * completions), then the completions the host gave, then whatever is still outstanding completes as flushed.
   */
  destroyQp(qp: Qp, destroyHost: () => Promise<void>): Promise<FlushCounts>;
  /** The host CQ's completion event: drain it into the guest's rings, re-arm it. */
  onHostCqEvent(cq: Cq): void;
  /** The CQ is in error: no more completions; its QPs move to ERR with QP_FATAL `qpReason` (section 10.8). */
  cqError(cq: Cq, reason: number, qpReason?: number): void;
}
