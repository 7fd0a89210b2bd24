// What every QP of the verbs API shares, whichever data path it uses (relay, section 10; mapped, section 13): its
// attributes and the MODIFY_QP / QUERY_QP commands that move it through the state machine of section 8.11.

import {
  AccessFlag,
  Command,
  Empty,
  HandleRequest,
  Limits,
  ModifyQpRequest,
  Mtu,
  QpAttr,
  QpAttrMask,
  QpState,
  QpType,
  QueryQpResponse,
} from '../../vmm-device/abi/rdma/index.ts';
import type { VirtioRdmaDriver } from './driver.ts';
import { UsageError } from './errors.ts';
import type { DataPathMode } from './work-request.ts';

export type QpStateName = keyof typeof QpState;
export type QpTypeName = keyof typeof QpType;
export type QpAttrValue = ReturnType<typeof QpAttr.decode>;

export interface QpCaps {
  maxSendWr: number;
  maxRecvWr: number;
  maxSendSge: number;
  maxRecvSge: number;
  maxInlineData: number;
}

export interface AddressVector {
  /** The destination's VIRTUAL GID (the peer VM's configuration gid). */
  dgid: Uint8Array;
  hopLimit?: number;
  flowLabel?: number;
  trafficClass?: number;
  sl?: number;
}

/** Attributes of MODIFY_QP; the mask is made of the attributes present (STATE always). */
export interface ModifyQpAttrs {
  state: QpStateName;
  accessFlags?: number;
  qkey?: number;
  rqPsn?: number;
  sqPsn?: number;
  destQpn?: number;
  pathMtu?: number;
  timeout?: number;
  retryCnt?: number;
  rnrRetry?: number;
  minRnrTimer?: number;
  maxRdAtomic?: number;
  maxDestRdAtomic?: number;
  port?: number;
  pkeyIndex?: number;
  av?: AddressVector;
  /** Sends exactly this mask instead of the computed one (tests of the device's checks). */
  attrMaskOverride?: number;
}

/** The MODIFY_QP request body for these attributes (section 8.11). Exported for encoding tests. */
export function encodeModifyQp(qpHandle: number, a: ModifyQpAttrs): Uint8Array {
  let mask = QpAttrMask.STATE;
  const set = (bit: number, present: boolean): void => {
    if (present) mask |= bit;
  };
  set(QpAttrMask.ACCESS_FLAGS, a.accessFlags !== undefined);
  set(QpAttrMask.QKEY, a.qkey !== undefined);
  set(QpAttrMask.RQ_PSN, a.rqPsn !== undefined);
  set(QpAttrMask.SQ_PSN, a.sqPsn !== undefined);
  set(QpAttrMask.DEST_QPN, a.destQpn !== undefined);
  set(QpAttrMask.PATH_MTU, a.pathMtu !== undefined);
  set(QpAttrMask.TIMEOUT, a.timeout !== undefined);
  set(QpAttrMask.RETRY_CNT, a.retryCnt !== undefined);
  set(QpAttrMask.RNR_RETRY, a.rnrRetry !== undefined);
  set(QpAttrMask.MIN_RNR_TIMER, a.minRnrTimer !== undefined);
  set(QpAttrMask.MAX_QP_RD_ATOMIC, a.maxRdAtomic !== undefined);
  set(QpAttrMask.MAX_DEST_RD_ATOMIC, a.maxDestRdAtomic !== undefined);
  set(QpAttrMask.PORT, a.port !== undefined);
  set(QpAttrMask.PKEY_INDEX, a.pkeyIndex !== undefined);
  set(QpAttrMask.AV, a.av !== undefined);
  const attr = QpAttr.encode({
    qp_state: QpState[a.state],
    qp_access_flags: a.accessFlags ?? 0,
    qkey: a.qkey ?? 0,
    rq_psn: a.rqPsn ?? 0,
    sq_psn: a.sqPsn ?? 0,
    dest_qp_num: a.destQpn ?? 0,
    path_mtu: a.pathMtu ?? 0,
    timeout: a.timeout ?? 0,
    retry_cnt: a.retryCnt ?? 0,
    rnr_retry: a.rnrRetry ?? 0,
    min_rnr_timer: a.minRnrTimer ?? 0,
    max_rd_atomic: a.maxRdAtomic ?? 0,
    max_dest_rd_atomic: a.maxDestRdAtomic ?? 0,
    port_num: a.port ?? 0,
    pkey_index: a.pkeyIndex ?? 0,
    // Section 8.17: the driver names its own GID only by index 0.
    sgid_index: 0,
    hop_limit: a.av?.hopLimit ?? 0,
    flow_label: a.av?.flowLabel ?? 0,
    traffic_class: a.av?.trafficClass ?? 0,
    sl: a.av?.sl ?? 0,
    dgid: a.av?.dgid ?? new Uint8Array(Limits.GID_SIZE),
  });
  return ModifyQpRequest.encode({ qp_handle: qpHandle, attr_mask: a.attrMaskOverride ?? mask, attr });
}

/** Defaults of an RC connection (INIT -> RTR -> RTS) that tests and the demo use. */
export const RC_DEFAULTS = {
  accessFlags: AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ,
  pathMtu: Mtu.MTU_1024,
  rqPsn: 0,
  sqPsn: 0,
  maxDestRdAtomic: 1,
  maxRdAtomic: 1,
  minRnrTimer: 12,
  timeout: 14,
  retryCnt: 7,
  rnrRetry: 7,
  hopLimit: 64,
} as const;

/** Q_Key the demo and tests use on UD QPs (bit 31 clear: not a controlled Q_Key). */
export const DEFAULT_QKEY = 0x1111_1111;

/** The state and connection verbs of a QP; the data path (post send, post receive) is the subclass's. */
export abstract class QpBase {
  state: QpStateName = 'RESET';
  destroyed = false;
  abstract readonly mode: DataPathMode;
  constructor(
    readonly driver: VirtioRdmaDriver,
    readonly handle: number,
    /** The wire QPN (the host QP's for a mapped QP). */
    readonly qpNum: number,
    readonly type: QpTypeName,
    readonly caps: QpCaps,
  ) {}

  async modify(attrs: ModifyQpAttrs): Promise<void> {
    await this.driver.command(Command.MODIFY_QP, encodeModifyQp(this.handle, attrs), [], Empty);
    this.state = attrs.state;
  }

  async query(): Promise<{ attr: QpAttrValue; qpNum: number; caps: QpCaps; type: number; sqSigAll: number }> {
    const r = await this.driver.command(Command.QUERY_QP, HandleRequest.encode({ handle: this.handle }), [], QueryQpResponse);
    return {
      attr: QpAttr.decode(r.attr),
      qpNum: r.qp_num,
      caps: { maxSendWr: r.max_send_wr, maxRecvWr: r.max_recv_wr, maxSendSge: r.max_send_sge, maxRecvSge: r.max_recv_sge, maxInlineData: r.max_inline_data },
      type: r.qp_type,
      sqSigAll: r.sq_sig_all,
    };
  }

  /** RC: RESET -> INIT -> RTR (destination = the peer VM's virtual GID and wire QPN) -> RTS. */
  async connect(peer: { gid: Uint8Array; qpn: number }, o: Partial<typeof RC_DEFAULTS> & { accessFlags?: number } = {}): Promise<void> {
    if (this.type !== 'RC') throw new UsageError('connect() is for RC QPs; UD QPs use readyUd()');
    const c = { ...RC_DEFAULTS, ...o };
    const steps: ModifyQpAttrs[] = [];
    if (this.state === 'RESET') steps.push({ state: 'INIT', pkeyIndex: 0, port: Limits.PORT_NUM, accessFlags: c.accessFlags });
    steps.push({
      state: 'RTR',
      av: { dgid: peer.gid, hopLimit: c.hopLimit },
      pathMtu: c.pathMtu,
      destQpn: peer.qpn,
      rqPsn: c.rqPsn,
      maxDestRdAtomic: c.maxDestRdAtomic,
      minRnrTimer: c.minRnrTimer,
    });
    steps.push({ state: 'RTS', sqPsn: c.sqPsn, timeout: c.timeout, retryCnt: c.retryCnt, rnrRetry: c.rnrRetry, maxRdAtomic: c.maxRdAtomic });
    await this.modifyAll(steps);
  }

  /**
   * Several MODIFY_QPs in one batch (one notification, one wait: the device executes them in order, section 7.3).
   * After a refusal the later steps are refused too (WRONG_STATE); the first refusal is what the caller sees, and
   * `state` is the last state reached.
   */
  async modifyAll(steps: readonly ModifyQpAttrs[]): Promise<void> {
    const items = steps.map((a) => ({ command: Command.MODIFY_QP, body: encodeModifyQp(this.handle, a), pages: [], response: Empty }));
    try {
      await this.driver.commandBatch(items);
      this.state = steps[steps.length - 1]?.state ?? this.state;
    } catch (e) {
      // Which steps went through the first error does not say: ask the device (an error path, one more command).
      const now = await this.query().catch(() => undefined);
      const name = (Object.keys(QpState) as QpStateName[]).find((k) => QpState[k] === now?.attr.qp_state);
      if (name !== undefined) this.state = name;
      throw e;
    }
  }

  /** UD: RESET -> INIT (qkey) -> RTR -> RTS. */
  async readyUd(qkey = DEFAULT_QKEY): Promise<void> {
    if (this.type !== 'UD') throw new UsageError('readyUd() is for UD QPs');
    await this.modify({ state: 'INIT', pkeyIndex: 0, port: Limits.PORT_NUM, qkey });
    await this.modify({ state: 'RTR' });
    await this.modify({ state: 'RTS', sqPsn: 0 });
  }
}
