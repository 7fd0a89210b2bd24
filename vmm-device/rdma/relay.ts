// The relay, version 1's DataPath (spec section 10): the device takes WQEs from the guest's SQ and RQ rings, checks a
// private copy of each, posts it to the host QP with the guest's addresses as they are (MRs are registered at the
// guest's iova), polls the host CQs on their completion events, writes CQEs into the guest's CQ rings in WQE order,
// and raises completion notifications per the arm state. Everything here is synchronous: it runs on a doorbell or
// a host event and never leaves work half done across an await. Every value in guest-shared memory (an index, a
// WQE) is read once into private memory, then checked, then used; every loop a guest value drives is bounded by the
// ring's depth. A QP or CQ whose ring left guest RAM (Qp.ringsLost, Cq.ringLost) is never read or written again.

import {
  AccessFlag,
  CqErrorReason,
  Cqe,
  EventType,
  FeatureBit,
  Limits,
  QpFatalReason,
  QpState,
  QpType,
  RecvWqe,
  SendFlag,
  SendOpcode,
  SendWqe,
  WcFlag,
  WcStatus,
  decodeSges,
  ringOccupancy,
  type SgeValue,
} from '../abi/rdma/index.ts';
import { SendFlags as HostSendFlags, WcFlags as HostWcFlags, WrOpcode } from '../verbs/constants.ts';
import { VerbsError } from '../verbs/host-verbs.ts';
import { RecvWrList, SendWrList, WcBuffer, type SendWr, type Sge as HostSge } from '../verbs/layout.ts';
import { gidFromIpv4, gidKey } from './address-resolver.ts';
import { mtuBytes } from './limits.ts';
import type { DataPath, DataPathHost, FlushCounts } from './data-path.ts';
import { ArmState, trackQpCall, type CompletionInfo, type Cq, type Mr, type Outstanding, type Qp, type QpWorkQueue } from './objects.ts';

/** Completions taken from a host CQ per poll call. */
const POLL_BATCH = 64;

const SEND_OPCODES: Record<number, number> = {
  [SendOpcode.RDMA_WRITE]: WrOpcode.RDMA_WRITE,
  [SendOpcode.RDMA_WRITE_WITH_IMM]: WrOpcode.RDMA_WRITE_WITH_IMM,
  [SendOpcode.SEND]: WrOpcode.SEND,
  [SendOpcode.SEND_WITH_IMM]: WrOpcode.SEND_WITH_IMM,
  [SendOpcode.RDMA_READ]: WrOpcode.RDMA_READ,
  [SendOpcode.ATOMIC_CMP_AND_SWP]: WrOpcode.ATOMIC_CMP_AND_SWP,
  [SendOpcode.ATOMIC_FETCH_AND_ADD]: WrOpcode.ATOMIC_FETCH_AND_ADD,
};

/** Opcodes that may carry inline data (spec 10.3): they send local bytes; READ and atomics write local memory. */
const INLINE_OPCODES = new Set<number>([SendOpcode.SEND, SendOpcode.SEND_WITH_IMM, SendOpcode.RDMA_WRITE, SendOpcode.RDMA_WRITE_WITH_IMM]);

/** Host completion statuses the spec's WcStatus table carries with the same number; the rest are GENERAL_ERR. */
const GUEST_WC_STATUSES = new Set<number>(Object.values(WcStatus));

function flushed(): CompletionInfo {
  return { status: WcStatus.WR_FLUSH_ERR, opcode: 0, byteLen: 0, immData: 0, srcQp: 0, wcFlags: 0, vendorErr: 0 };
}

function failed(status: number): CompletionInfo {
  return { status, opcode: 0, byteLen: 0, immData: 0, srcQp: 0, wcFlags: 0, vendorErr: 0 };
}

/** A WQE the device refuses: its completion status (section 10.8). */
class WqeError extends Error {
  constructor(readonly status: number) {
    super(`WQE refused with status ${status}`);
  }
}

export class RelayDataPath implements DataPath {
  private readonly qpByNum = new Map<number, Qp>();
  private readonly qpByHost = new Map<number, Qp>();
  private readonly cqByHost = new Map<number, Cq>();
  /** lkey -> registered MR (pending MRs have no key yet). */
  private readonly mrByLkey = new Map<number, Mr>();
  private readonly wcs = new WcBuffer(POLL_BATCH);
  private readonly sendList = new SendWrList();
  private readonly recvList = new RecvWrList();
  private readonly wqeBytes = new Uint8Array(Limits.SQ_WQE_SIZE);

  constructor(private readonly host: DataPathHost) {}

  reset(): void {
    this.qpByNum.clear();
    this.qpByHost.clear();
    this.cqByHost.clear();
    this.mrByLkey.clear();
  }

  addQp(qp: Qp): void {
    this.qpByNum.set(qp.host.qpNum, qp);
    this.qpByHost.set(qp.host.id, qp);
  }
  removeQp(qp: Qp): void {
    this.qpByNum.delete(qp.host.qpNum);
    this.qpByHost.delete(qp.host.id);
  }
  addCq(cq: Cq): void {
    this.cqByHost.set(cq.host.id, cq);
  }
  removeCq(cq: Cq): void {
    this.cqByHost.delete(cq.host.id);
  }
  addMr(mr: Mr): void {
    this.mrByLkey.set(mr.host!.lkey, mr);
  }
  removeMr(mr: Mr): void {
    if (mr.host !== undefined && this.mrByLkey.get(mr.host.lkey) === mr) this.mrByLkey.delete(mr.host.lkey);
  }
  qpByHostId(id: number): Qp | undefined {
    return this.qpByHost.get(id);
  }
  cqByHostId(id: number): Cq | undefined {
    return this.cqByHost.get(id);
  }

  private get memory() {
    return this.host.memory;
  }

  // ------------------------------------------------------------------------------------------ taking WQEs

  /** Reads the RQ's producer index and posts the new receive WQEs (INIT, RTR, RTS) or flushes them (ERR). */
  takeRecvs(qp: Qp): void {
    if (!this.usable(qp) || qp.state === QpState.RESET) return;
    const wq = qp.rq;
    const producer = wq.ring.readProducer(this.memory); // the one read of this index (spec 10.11)
    if (!this.checkProducer(qp, wq, producer)) return;
    const list = this.recvList;
    list.clear();
    const posted: Outstanding[] = [];
    // checkProducer bounds producer - consumer by the depth; the count bounds the loop whatever happens meanwhile.
    for (let n = 0; wq.consumer !== producer && n < wq.ring.depth; n++) {
      const inError = qp.state === QpState.ERR;
      if (!inError && wq.inHost >= wq.ring.depth) break; // the host RQ is full: resume on a completion
      const bytes = this.wqeBytes.subarray(0, Limits.RQ_WQE_SIZE);
      this.memory.read(wq.ring.entryGpa(wq.consumer), bytes); // the one read of this WQE (spec 10.11)
      wq.consumer = (wq.consumer + 1) >>> 0;
      const wqe = RecvWqe.decode(bytes);
      const entry: Outstanding = { hostWrId: wq.nextSeq++ * 2 + 1, wrId: wqe.wr_id, signaled: true };
      wq.outstanding.push(entry);
      qp.relayed = (qp.relayed ?? 0) + 1;
      if (inError) {
        entry.done = flushed();
        continue;
      }
      try {
        if (wqe.num_sge > qp.maxRecvSge) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
        const sges = decodeSges(wqe.sges, wqe.num_sge);
        const sgList = this.checkSges(qp, sges, AccessFlag.LOCAL_WRITE);
        if (qp.qpType === QpType.UD) entry.grh = { sges: sges.map((s) => ({ addr: s.addr, length: s.length, lkey: s.lkey })) };
        list.push({ wrId: entry.hostWrId, sgList });
        posted.push(entry);
        wq.inHost++;
      } catch (e) {
        if (!(e instanceof WqeError)) throw e;
        entry.done = failed(e.status);
        this.postRecvs(qp, list, posted);
        list.clear();
        posted.length = 0;
        this.errorFromWqe(qp);
      }
    }
    this.postRecvs(qp, list, posted);
    wq.ring.writeConsumer(this.memory, wq.consumer);
    this.emit(qp, wq, qp.recvCq, true);
  }

  /** Reads the SQ's producer index and posts the new send WQEs (RTS) or flushes them (ERR). */
  takeSends(qp: Qp): void {
    if (!this.usable(qp) || (qp.state !== QpState.RTS && qp.state !== QpState.ERR)) return;
    const wq = qp.sq;
    const producer = wq.ring.readProducer(this.memory); // the one read of this index (spec 10.11)
    if (!this.checkProducer(qp, wq, producer)) return;
    const list = this.sendList;
    list.clear();
    const posted: Outstanding[] = [];
    for (let n = 0; wq.consumer !== producer && n < wq.ring.depth; n++) {
      const inError = qp.state === QpState.ERR;
      if (!inError && wq.inHost >= wq.ring.depth) break;
      const bytes = this.wqeBytes;
      this.memory.read(wq.ring.entryGpa(wq.consumer), bytes);
      wq.consumer = (wq.consumer + 1) >>> 0;
      const wqe = SendWqe.decode(bytes);
      const entry: Outstanding = {
        hostWrId: wq.nextSeq++ * 2,
        wrId: wqe.wr_id,
        signaled: qp.sqSigAll || (wqe.flags & SendFlag.SIGNALED) !== 0,
      };
      wq.outstanding.push(entry);
      qp.relayed = (qp.relayed ?? 0) + 1;
      if (inError) {
        entry.done = flushed();
        continue;
      }
      try {
        const wr = this.checkSend(qp, wqe);
        wr.wrId = entry.hostWrId;
        list.push(wr);
        posted.push(entry);
        wq.inHost++;
      } catch (e) {
        if (!(e instanceof WqeError)) throw e;
        entry.done = failed(e.status);
        this.postSends(qp, list, posted);
        list.clear();
        posted.length = 0;
        this.errorFromWqe(qp);
      }
    }
    this.postSends(qp, list, posted);
    wq.ring.writeConsumer(this.memory, wq.consumer);
    this.emit(qp, wq, qp.sendCq, false);
  }

  /** A QP whose rings the device may read: alive, rings inside guest RAM, device active. */
  private usable(qp: Qp): boolean {
    return !qp.destroyed && qp.ringsLost !== true && this.host.isActive;
  }

  /** producer_index (read once by the caller) more than the depth ahead: QP_FATAL WQ_OVERFLOW, no completions. */
  private checkProducer(qp: Qp, wq: QpWorkQueue, producer: number): boolean {
    if (ringOccupancy(producer, wq.consumer) <= wq.ring.depth) return true;
    wq.consumer = producer;
    wq.ring.writeConsumer(this.memory, producer);
    this.host.queueEvent(EventType.QP_FATAL, qp.handle, QpFatalReason.WQ_OVERFLOW);
    // Already in ERR (moveToError reads the rings itself): no second move, which would recurse on a guest that
    // keeps the index bogus.
    if (qp.state !== QpState.ERR) this.toError(qp);
    return false;
  }

  /** Starts a move to ERR from a synchronous path; the event loop continues it (guarded). */
  private toError(qp: Qp): void {
    this.host.background('moving a QP to ERR', this.moveToError(qp));
  }

  /** Checks SGEs against the QP's PD's MRs (section 10.8): host SGEs with the guest's addresses unchanged. */
  private checkSges(qp: Qp, sges: SgeValue[], access: number): HostSge[] {
    return sges.map((s) => {
      const mr = this.mrByLkey.get(s.lkey);
      if (mr === undefined || mr.pd !== qp.pd || mr.host === undefined) throw new WqeError(WcStatus.LOC_PROT_ERR);
      if (s.addr < mr.iova || s.addr + BigInt(s.length) > mr.iova + mr.length) throw new WqeError(WcStatus.LOC_PROT_ERR);
      if ((mr.access & access) !== access) throw new WqeError(WcStatus.LOC_PROT_ERR);
      return { addr: s.addr, length: s.length, lkey: s.lkey };
    });
  }

  private checkSend(qp: Qp, wqe: ReturnType<typeof SendWqe.decode>): SendWr {
    const op = wqe.opcode;
    const hostOp = SEND_OPCODES[op];
    const dev = this.host;
    if (hostOp === undefined) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
    if ((wqe.flags & ~(SendFlag.SIGNALED | SendFlag.SOLICITED | SendFlag.FENCE | SendFlag.INLINE)) !== 0) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
    const inline = (wqe.flags & SendFlag.INLINE) !== 0;
    const withImm = op === SendOpcode.RDMA_WRITE_WITH_IMM || op === SendOpcode.SEND_WITH_IMM;
    const atomic = op === SendOpcode.ATOMIC_CMP_AND_SWP || op === SendOpcode.ATOMIC_FETCH_AND_ADD;
    if (withImm && !dev.hasFeature(FeatureBit.IMMEDIATE)) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
    if (atomic && !dev.hasFeature(FeatureBit.ATOMIC)) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
    if (qp.qpType === QpType.UD && op !== SendOpcode.SEND && op !== SendOpcode.SEND_WITH_IMM) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
    let hostFlags = HostSendFlags.SIGNALED; // every host send is tracked by its completion
    if ((wqe.flags & SendFlag.SOLICITED) !== 0) hostFlags |= HostSendFlags.SOLICITED;
    if ((wqe.flags & SendFlag.FENCE) !== 0) hostFlags |= HostSendFlags.FENCE;
    const wr: SendWr = { wrId: 0, opcode: hostOp, sendFlags: hostFlags };
    let total: number;
    if (inline) {
      // Spec 10.3: the payload holds inline_length bytes (num_sge is ignored). `wqe` is the device's private copy
      // of the WQE (takeSends read it once), and SendWrList.push copies these bytes into the host list: the guest
      // cannot change what is posted, and no MR is involved (the host copies inline data at ibv_post_send).
      if (!dev.hasFeature(FeatureBit.INLINE) || !INLINE_OPCODES.has(op)) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
      if (wqe.inline_length > qp.maxInlineData || wqe.inline_length > Limits.SQ_WQE_MAX_INLINE) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
      wr.inline = wqe.payload.subarray(0, wqe.inline_length);
      total = wqe.inline_length;
    } else {
      if (wqe.num_sge > qp.maxSendSge) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
      const sges = decodeSges(wqe.payload, wqe.num_sge);
      if (atomic && (sges.length !== 1 || sges[0]!.length !== 8 || wqe.remote_addr % 8n !== 0n)) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
      const localWrite = op === SendOpcode.RDMA_READ || atomic;
      wr.sgList = this.checkSges(qp, sges, localWrite ? AccessFlag.LOCAL_WRITE : 0);
      total = sges.reduce((n, s) => n + s.length, 0);
    }
    if (total > dev.maxMsgSize) throw new WqeError(WcStatus.LOC_LEN_ERR);
    if (withImm) wr.immData = wqe.imm_data;
    if (op === SendOpcode.RDMA_WRITE || op === SendOpcode.RDMA_WRITE_WITH_IMM || op === SendOpcode.RDMA_READ || atomic) {
      wr.remoteAddr = wqe.remote_addr;
      wr.rkey = wqe.rkey;
    }
    if (atomic) {
      wr.compareAdd = wqe.compare_add;
      wr.swap = wqe.swap;
    }
    if (qp.qpType === QpType.UD) {
      if (total > mtuBytes(dev.activeMtu)) throw new WqeError(WcStatus.LOC_LEN_ERR);
      const ah = dev.ah(wqe.ah_handle);
      if (ah === undefined || ah.pd !== qp.pd || ah.revoked !== undefined) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
      if (wqe.remote_qpn > Limits.QPN_MAX) throw new WqeError(WcStatus.LOC_QP_OP_ERR);
      wr.ah = ah.host;
      wr.remoteQpn = wqe.remote_qpn;
      wr.remoteQkey = dev.address.qkey; // the VPC's Q_Key; the guest's remote_qkey is not put on the wire (12.4)
    }
    return wr;
  }

  private postRecvs(qp: Qp, list: RecvWrList, posted: Outstanding[]): void {
    if (list.count === 0) return;
    try {
      this.host.verbs.postRecv(qp.host, list);
    } catch (e) {
      this.hostRefusedPost(qp, qp.rq, posted, e);
    }
  }

  private postSends(qp: Qp, list: SendWrList, posted: Outstanding[]): void {
    if (list.count === 0) return;
    try {
      this.host.verbs.postSend(qp.host, list);
    } catch (e) {
      this.hostRefusedPost(qp, qp.sq, posted, e);
    }
  }

  /** The host did not take work requests from `badWrIndex` on: they complete with an error, the QP goes to ERR. */
  private hostRefusedPost(qp: Qp, wq: QpWorkQueue, posted: Outstanding[], e: unknown): void {
    const from = e instanceof VerbsError && e.badWrIndex !== undefined ? e.badWrIndex : 0;
    this.host.counters.hostErrors++;
    this.host.log.log('warn', 'host refused posted work requests', { qp: qp.handle, error: (e as Error).message });
    for (const entry of posted.slice(from)) {
      entry.done = failed(qp.state === QpState.ERR ? WcStatus.WR_FLUSH_ERR : WcStatus.GENERAL_ERR);
      wq.inHost--;
    }
    this.errorFromWqe(qp);
  }

  /** A WQE error moves the QP to ERR (section 10.8): the rest of both rings is flushed. */
  private errorFromWqe(qp: Qp): void {
    if (qp.state !== QpState.ERR) this.toError(qp);
  }

  // ------------------------------------------------------------------------------------------ errors and flush

  /** Moves a QP to ERR: the data path flushes at once, the host QP follows (its flush completions come later). */
  async moveToError(qp: Qp): Promise<void> {
    if (qp.state === QpState.RESET) this.discardRings(qp);
    const was = qp.state;
    qp.state = QpState.ERR;
    this.takeSends(qp);
    this.takeRecvs(qp);
    if (was === QpState.ERR) {
      // Already on its way (an error completion started the move): the caller may destroy next, so wait for it.
      await qp.hostIdle;
      return;
    }
    try {
      await trackQpCall(qp, this.host.verbs.modifyQp(qp.host, { qpState: QpState.ERR }));
    } catch (e) {
      this.host.counters.hostErrors++;
      this.host.log.log('warn', 'host refused to move a QP to ERR', { qp: qp.handle, error: (e as Error).message });
    }
  }

  /** The host moved the QP to ERR by itself (an async event or an error completion). */
  hostMovedToError(qp: Qp): void {
    if (qp.state === QpState.ERR || qp.destroyed) return;
    qp.state = QpState.ERR;
    this.takeSends(qp);
    this.takeRecvs(qp);
  }

  /** RESET: outstanding work is discarded without completions, both rings emptied (section 8.11). */
  discardRings(qp: Qp): void {
    for (const wq of [qp.sq, qp.rq]) {
      wq.outstanding.length = 0;
      wq.inHost = 0;
      if (qp.ringsLost === true) continue;
      wq.consumer = wq.ring.readProducer(this.memory);
      wq.ring.writeConsumer(this.memory, wq.consumer);
    }
  }

  /**
   * DESTROY_QP (section 11.1). The host destroy is where the wait happens: the addon moves the host QP to ERR,
   * waits (at most FLUSH_LIMIT_MS, verbs/constants.ts) until every work request it counted outstanding has
   * completed, keeps those completions for the next pollCq, and destroys. In-flight work is counted there only;
   * here the completions are drained into the guest's CQs and whatever is still outstanding completes as flushed.
   */
  async destroyQp(qp: Qp, destroyHost: () => Promise<void>): Promise<FlushCounts> {
    const counts: FlushCounts = { sq: 0, rq: 0, dropped: 0 };
    const flushing = qp.state !== QpState.RESET; // a QP in RESET holds no work
    if (flushing) {
      qp.flushCounts = counts;
      await this.moveToError(qp);
    }
    await destroyHost();
    if (!flushing || !this.host.isActive) return counts;
    this.drain(qp.sendCq);
    if (qp.recvCq !== qp.sendCq) this.drain(qp.recvCq);
    for (const [wq, cq, recv] of [
      [qp.sq, qp.sendCq, false],
      [qp.rq, qp.recvCq, true],
    ] as const) {
      for (const entry of wq.outstanding) entry.done ??= flushed();
      wq.inHost = 0;
      this.emit(qp, wq, cq, recv);
    }
    delete qp.flushCounts;
    return counts;
  }

  // ------------------------------------------------------------------------------------------ completions

  /** The host CQ's completion event: drain it, re-arm it, drain again (closing the arm race). */
  onHostCqEvent(cq: Cq): void {
    if (cq.destroyed || !this.host.isActive) return;
    this.drain(cq);
    try {
      this.host.verbs.reqNotifyCq(cq.host, false);
    } catch (e) {
      this.host.log.log('error', 're-arming a host CQ failed', { cq: cq.handle, error: (e as Error).message });
    }
    this.drain(cq);
  }

  /** Moves every completion of a host CQ into the guest's rings. */
  drain(cq: Cq): void {
    const touched = new Set<Qp>();
    for (;;) {
      if (cq.destroyed || !this.host.isActive) return;
      let n: number;
      try {
        n = this.host.verbs.pollCq(cq.host, this.wcs);
      } catch (e) {
        this.host.log.log('error', 'polling a host CQ failed', { cq: cq.handle, error: (e as Error).message });
        return;
      }
      for (let i = 0; i < n; i++) {
        const qp = this.qpByNum.get(this.wcs.qpNum(i));
        if (qp === undefined || qp.destroyed) continue;
        this.hostCompletion(qp, i);
        touched.add(qp);
      }
      if (n < this.wcs.capacity) break;
    }
    // Completions freed host queue slots: take the WQEs that were waiting for room.
    for (const qp of touched) {
      if (qp.destroyed) continue;
      this.takeSends(qp);
      this.takeRecvs(qp);
    }
  }

  private hostCompletion(qp: Qp, i: number): void {
    const w = this.wcs;
    const hostWrId = w.wrId(i);
    const recv = hostWrId % 2 === 1;
    const wq = recv ? qp.rq : qp.sq;
    const entry = wq.outstanding.find((e) => e.hostWrId === hostWrId && e.done === undefined);
    if (entry === undefined) return; // discarded by a RESET meanwhile
    wq.inHost--;
    const status = GUEST_WC_STATUSES.has(w.status(i)) ? w.status(i) : WcStatus.GENERAL_ERR;
    const hostFlags = w.wcFlags(i);
    entry.done = {
      status,
      opcode: w.opcode(i),
      byteLen: w.byteLen(i),
      immData: w.immData(i),
      srcQp: w.srcQp(i),
      wcFlags: ((hostFlags & HostWcFlags.WITH_IMM) !== 0 ? WcFlag.WITH_IMM : 0) | ((hostFlags & HostWcFlags.GRH) !== 0 ? WcFlag.GRH : 0),
      vendorErr: status === WcStatus.SUCCESS ? 0 : w.vendorErr(i),
    };
    if (status === WcStatus.SUCCESS && recv && qp.qpType === QpType.UD) this.rewriteRoutingHeader(qp, entry);
    if (status !== WcStatus.SUCCESS && status !== WcStatus.WR_FLUSH_ERR && qp.state !== QpState.ERR) this.toError(qp);
    this.emit(qp, wq, recv ? qp.recvCq : qp.sendCq, recv);
  }

  /**
   * UD receive (section 10.9): the host wrote the routing header with host addresses; the guest sees the sender's
   * and its own virtual addresses. A sender with no address in the guest's VPC is not shown at all.
   */
  private rewriteRoutingHeader(qp: Qp, entry: Outstanding): void {
    const done = entry.done!;
    done.wcFlags |= WcFlag.GRH;
    const sges = entry.grh?.sges ?? [];
    const grh = this.mrBytes(sges[0], Limits.GRH_SIZE);
    let source: Uint8Array | undefined;
    if (grh !== undefined) {
      const ipv4 = grh[20]! >> 4 === 4;
      const hostSource = ipv4 ? gidFromIpv4(`${grh[32]}.${grh[33]}.${grh[34]}.${grh[35]}`) : grh.slice(8, 24);
      source = this.host.reverseSource(hostSource, done.srcQp);
      if (source !== undefined) {
        const own = this.host.address.gid;
        if (ipv4) {
          grh.set(source.subarray(12, 16), 32);
          grh.set(own.subarray(12, 16), 36);
          ipv4Checksum(grh.subarray(20, 40));
        } else {
          grh.set(source, 8);
          grh.set(own, 24);
        }
        return;
      }
    }
    // Unknown sender (or no room for the header): zero what was received and complete with GENERAL_ERR.
    let left = done.byteLen;
    for (const s of sges) {
      const n = Math.min(left, s.length);
      this.mrBytes(s, n)?.fill(0);
      left -= n;
    }
    this.host.log.log('warn', 'UD datagram from a sender outside the VPC hidden', { qp: qp.handle, srcQp: done.srcQp, key: grh ? gidKey(grh.slice(8, 24)) : '' });
    entry.done = failed(WcStatus.GENERAL_ERR);
  }

  /** The backend's view of `length` bytes of an MR's SGE (the MR is one contiguous range of the mapping). */
  private mrBytes(s: { addr: bigint; length: number; lkey: number } | undefined, length: number): Uint8Array | undefined {
    if (s === undefined || s.length < length) return undefined;
    const mr = this.mrByLkey.get(s.lkey);
    if (mr === undefined || mr.backing === undefined) return undefined;
    const off = Number(s.addr - mr.iova);
    return new Uint8Array(mr.backing.buffer, mr.backing.offset + off, length);
  }

  /** Writes the completions at the head of a work queue that are known, in WQE order (section 10.5). */
  private emit(qp: Qp, wq: QpWorkQueue, cq: Cq, recv: boolean): void {
    while (wq.outstanding.length > 0 && wq.outstanding[0]!.done !== undefined) {
      const entry = wq.outstanding.shift()!;
      const done = entry.done!;
      if (!recv && done.status === WcStatus.SUCCESS && !entry.signaled) continue;
      const counts = qp.flushCounts;
      const written = this.writeCqe(cq, qp, entry.wrId, done, recv, counts !== undefined);
      if (counts !== undefined && done.status === WcStatus.WR_FLUSH_ERR) {
        if (!written) counts.dropped++;
        else if (recv) counts.rq++;
        else counts.sq++;
      }
    }
  }

  /** Writes one CQE unless the CQ is full or in error (section 10.8); raises the notification per the arm. */
  private writeCqe(cq: Cq, qp: Qp, wrId: bigint, done: CompletionInfo, recv: boolean, destroying: boolean): boolean {
    if (cq.error || cq.destroyed || !this.host.isActive) return false; // a CQ whose ring left guest RAM is in error
    const memory = this.memory;
    const consumer = cq.ring.readConsumer(memory);
    const occupancy = ringOccupancy(cq.producer, consumer);
    if (occupancy >= cq.ring.depth) {
      if (!destroying) this.cqError(cq, occupancy > cq.ring.depth ? CqErrorReason.INDEX_INVALID : CqErrorReason.OVERRUN);
      return false;
    }
    const success = done.status === WcStatus.SUCCESS;
    const cqe = Cqe.encode({
      wr_id: wrId,
      qp_handle: qp.handle,
      byte_len: success ? done.byteLen : 0,
      imm_data: success ? done.immData : 0,
      src_qp: success ? done.srcQp : 0,
      status: done.status,
      opcode: success ? done.opcode : 0,
      wc_flags: success ? done.wcFlags : 0,
      vendor_err: done.vendorErr,
    });
    memory.write(cq.ring.entryGpa(cq.producer), cqe);
    cq.producer = (cq.producer + 1) >>> 0;
    cq.ring.writeProducer(memory, cq.producer); // after the CQE (section 10.2)
    this.host.counters.completionsWritten++;
    // SOLICITED arm: the host gives no solicited mark on a completion while its CQ is armed for every one, so
    // every receive and every error notifies (a superset; the driver tolerates extra notifications, 9.4).
    if (cq.arm === ArmState.NEXT || (cq.arm === ArmState.SOLICITED && (!success || recv))) this.notify(cq);
    return true;
  }

  private notify(cq: Cq): void {
    cq.arm = ArmState.DISARMED;
    this.host.queueEvent(EventType.COMPLETION, cq.handle, 0);
  }

  /** ARM_CQ or an arm record (section 10.7). */
  arm(cq: Cq, solicited: boolean): void {
    if (!(solicited && cq.arm === ArmState.NEXT)) cq.arm = solicited ? ArmState.SOLICITED : ArmState.NEXT;
    if (cq.ring.readConsumer(this.memory) !== cq.producer) this.notify(cq);
  }

  /** The CQ is in error: no more completions; every QP using it moves to ERR (section 10.8). */
  cqError(cq: Cq, reason: number, qpReason: number = QpFatalReason.CQ_OVERRUN): void {
    if (cq.error) return;
    cq.error = true;
    this.host.queueEvent(EventType.CQ_ERROR, cq.handle, reason);
    for (const qp of cq.qps) {
      if (qp.state === QpState.ERR) continue;
      this.host.queueEvent(EventType.QP_FATAL, qp.handle, qpReason);
      this.toError(qp);
    }
  }
}

/** Recomputes the header checksum of a 20-byte IPv4 header in place. */
function ipv4Checksum(h: Uint8Array): void {
  h[10] = 0;
  h[11] = 0;
  let sum = 0;
  for (let i = 0; i < 20; i += 2) sum += (h[i]! << 8) | h[i + 1]!;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  const c = ~sum & 0xffff;
  h[10] = c >> 8;
  h[11] = c & 0xff;
}
