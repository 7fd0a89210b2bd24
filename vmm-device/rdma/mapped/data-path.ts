// The data path of mapped QPs and CQs (spec 13.6 to 13.9), and the router that sends each call to the relay or to
// it by the object's mode, so that relayed and mapped QPs live side by side behind the one DataPath the device and
// its commands use. Nothing here reads or writes guest memory: the host reads and writes the mapped queues itself.

import { ArmState, type Cq, type Mr, type Qp } from '../objects.ts';
import { EventType, QpFatalReason, QpState } from '../../abi/rdma/index.ts';
import type { DataPath, DataPathHost, FlushCounts } from '../data-path.ts';
import { trackQpCall } from '../objects.ts';
import type { MappingManager } from './manager.ts';

export class MappedDataPath implements DataPath {
  private readonly qpByHost = new Map<number, Qp>();
  private readonly cqByHost = new Map<number, Cq>();

  constructor(
    private readonly host: DataPathHost,
    private readonly manager: () => MappingManager | undefined,
  ) {}

  reset(): void {
    this.qpByHost.clear();
    this.cqByHost.clear();
  }
  addQp(qp: Qp): void {
    this.qpByHost.set(qp.host.id, qp);
  }
  removeQp(qp: Qp): void {
    this.qpByHost.delete(qp.host.id);
  }
  addCq(cq: Cq): void {
    this.cqByHost.set(cq.host.id, cq);
  }
  removeCq(cq: Cq): void {
    this.cqByHost.delete(cq.host.id);
  }
  addMr(_mr: Mr): void {}
  removeMr(_mr: Mr): void {}
  qpByHostId(id: number): Qp | undefined {
    return this.qpByHost.get(id);
  }
  cqByHostId(id: number): Cq | undefined {
    return this.cqByHost.get(id);
  }

  /** The move to RTS, or a QP in ERR: execute the SQ doorbell once (spec 13.6: remembered doorbells). */
  takeSends(qp: Qp): void {
    if (qp.destroyed || !this.host.isActive) return;
    if (qp.state !== QpState.RTS && qp.state !== QpState.ERR) return; // remembered: the move to RTS rings
    const slot = qp.mapped?.slot;
    if (slot !== undefined) this.manager()?.ring(slot);
  }

  /** The RQ of a mapped QP needs no doorbell: the host reads its producer index when a message arrives. */
  takeRecvs(_qp: Qp): void {}

  /** Arms the host CQ with the same solicited flag (spec 13.7); its completion event becomes COMPLETION. */
  arm(cq: Cq, solicited: boolean): void {
    if (!(solicited && cq.arm === ArmState.NEXT)) cq.arm = solicited ? ArmState.SOLICITED : ArmState.NEXT;
    try {
      this.host.verbs.reqNotifyCq(cq.host, cq.arm === ArmState.SOLICITED);
    } catch (e) {
      this.host.counters.hostErrors++;
      this.host.log.log('error', 'arming a mapped host CQ failed', { cq: cq.handle, error: (e as Error).message });
    }
  }

  /** ERR on the host (it flushes into the mapped CQs); the doorbell is executed so later WQEs are flushed too. */
  async moveToError(qp: Qp): Promise<void> {
    const was = qp.state;
    qp.state = QpState.ERR;
    if (was === QpState.ERR) {
      await qp.hostIdle;
      return;
    }
    try {
      await trackQpCall(qp, this.host.verbs.modifyQp(qp.host, { qpState: QpState.ERR }));
    } catch (e) {
      this.host.counters.hostErrors++;
      this.host.log.log('warn', 'host refused to move a mapped QP to ERR', { qp: qp.handle, error: (e as Error).message });
      return;
    }
    this.takeSends(qp);
  }

  hostMovedToError(qp: Qp): void {
    if (qp.destroyed) return;
    qp.state = QpState.ERR;
  }

  /** The host empties its own queues on RESET (rxe writes 0 into both indexes, spec 13.8). */
  discardRings(_qp: Qp): void {}

  /**
   * DESTROY_QP of a mapped QP (spec 13.9): ERR (unless RESET), the doorbell detached and its slot freed, both queues
   * unmapped with the transport's confirmation awaited (bounded), the host QP destroyed, the ranges released. The
   * host writes its flush completions into the mapped CQs itself: the device counts none.
   */
  async destroyQp(qp: Qp, destroyHost: () => Promise<void>): Promise<FlushCounts> {
    const m = qp.mapped!;
    const manager = this.manager();
    const epoch = manager?.currentEpoch ?? -1;
    if (qp.state !== QpState.RESET) await this.moveToError(qp);
    if (m.slot !== undefined) {
      manager?.detach(m.slot);
      manager?.releaseSlot(m.slot, epoch);
      m.slot = undefined;
    }
    // Both unmaps at once: the transport sends them as one batch (one wake-up of the VMM for the two).
    const [sqGone, rqGone] = manager === undefined ? [true, true] : await Promise.all([manager.unmap(m.sq), manager.unmap(m.rq)]);
    await destroyHost();
    manager?.releaseQueue(m.sq, epoch, sqGone);
    manager?.releaseQueue(m.rq, epoch, rqGone);
    return { sq: 0, rq: 0, dropped: 0 };
  }

  /** The host signalled a completion event for an armed mapped CQ: COMPLETION, and the CQ is disarmed. */
  onHostCqEvent(cq: Cq): void {
    if (cq.destroyed || !this.host.isActive || cq.arm === ArmState.DISARMED) return;
    cq.arm = ArmState.DISARMED;
    this.host.queueEvent(EventType.COMPLETION, cq.handle, 0);
  }

  /** A mapped CQ in error (the host's CQ_ERR): CQ_ERROR, and its QPs to ERR with QP_FATAL (spec 13.7). */
  cqError(cq: Cq, reason: number, qpReason: number = QpFatalReason.CQ_OVERRUN): void {
    if (cq.error) return;
    cq.error = true;
    this.host.queueEvent(EventType.CQ_ERROR, cq.handle, reason);
    for (const qp of cq.qps) {
      if (qp.state === QpState.ERR) continue;
      this.host.queueEvent(EventType.QP_FATAL, qp.handle, qpReason);
      this.host.background('moving a mapped QP of a CQ in error to ERR', this.moveToError(qp));
    }
  }
}

/** Sends each call to the relay or to the mapped data path by the object's mode. */
export class RoutedDataPath implements DataPath {
  constructor(
    readonly relay: DataPath,
    readonly mapped: MappedDataPath,
  ) {}

  private qpPath(qp: Qp): DataPath {
    return qp.mapped !== undefined ? this.mapped : this.relay;
  }
  private cqPath(cq: Cq): DataPath {
    return cq.mapped !== undefined ? this.mapped : this.relay;
  }

  reset(): void {
    this.relay.reset();
    this.mapped.reset();
  }
  addQp(qp: Qp): void {
    this.qpPath(qp).addQp(qp);
  }
  removeQp(qp: Qp): void {
    this.qpPath(qp).removeQp(qp);
  }
  addCq(cq: Cq): void {
    this.cqPath(cq).addCq(cq);
  }
  removeCq(cq: Cq): void {
    this.cqPath(cq).removeCq(cq);
  }
  addMr(mr: Mr): void {
    this.relay.addMr(mr);
  }
  removeMr(mr: Mr): void {
    this.relay.removeMr(mr);
  }
  qpByHostId(id: number): Qp | undefined {
    return this.relay.qpByHostId(id) ?? this.mapped.qpByHostId(id);
  }
  cqByHostId(id: number): Cq | undefined {
    return this.relay.cqByHostId(id) ?? this.mapped.cqByHostId(id);
  }
  takeSends(qp: Qp): void {
    this.qpPath(qp).takeSends(qp);
  }
  takeRecvs(qp: Qp): void {
    this.qpPath(qp).takeRecvs(qp);
  }
  arm(cq: Cq, solicited: boolean): void {
    this.cqPath(cq).arm(cq, solicited);
  }
  moveToError(qp: Qp): Promise<void> {
    return this.qpPath(qp).moveToError(qp);
  }
  hostMovedToError(qp: Qp): void {
    this.qpPath(qp).hostMovedToError(qp);
  }
  discardRings(qp: Qp): void {
    this.qpPath(qp).discardRings(qp);
  }
  destroyQp(qp: Qp, destroyHost: () => Promise<void>): Promise<FlushCounts> {
    return this.qpPath(qp).destroyQp(qp, destroyHost);
  }
  onHostCqEvent(cq: Cq): void {
    this.cqPath(cq).onHostCqEvent(cq);
  }
  cqError(cq: Cq, reason: number, qpReason?: number): void {
    this.cqPath(cq).cqError(cq, reason, qpReason);
  }
}
