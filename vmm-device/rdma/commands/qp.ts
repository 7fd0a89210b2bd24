// CREATE_QP, MODIFY_QP, QUERY_QP, DESTROY_QP (spec 8.10 to 8.13). MODIFY_QP checks every attribute the mask
// names before the host sees any; the guest's view of its attributes (QUERY_QP) is what it asked for.

import {
  AccessFlag,
  Command,
  CreateQpRequest,
  CreateQpResponse,
  DEFINED_ACCESS_FLAGS,
  DEFINED_MAP_FLAGS,
  MapFlag,
  DEFINED_QP_ATTR_MASK,
  DestroyQpResponse,
  EventType,
  FeatureBit,
  HandleRequest,
  Limits,
  ModifyQpRequest,
  OPTIONAL_QP_ATTRS,
  QpAttr,
  QpAttrMask,
  QpState,
  QpType,
  QueryQpResponse,
  REQUIRED_QP_ATTRS,
  ResourceKind,
  SUPPORTED_QP_ATTR_MASK,
  isPowerOfTwo,
  ringPages,
  transitionKey,
} from '../../abi/rdma/index.ts';
import type { QpAttr as HostQpAttr } from '../../verbs/host-verbs.ts';
import { VerbsError } from '../../verbs/host-verbs.ts';
import { GuestRing, trackQpCall, type Qp } from '../objects.ts';
import { HOST_PORT, type CommandContext, type CommandGroup } from './context.ts';
import { fail } from './errors.ts';
import { checkIndexBlock, pageShiftOk, readPages } from './pages.ts';
import { createMappedQp, qpMappedBody } from '../mapped/commands.ts';

async function createQp(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const r = CreateQpRequest.decode(body);
  const o = (f: string): number => CreateQpRequest.offsetOf(f);
  const c = ctx.config;
  if (r.qp_type !== QpType.RC && r.qp_type !== QpType.UD) fail('INVALID_ARGUMENT', o('qp_type'));
  if (!ctx.hasFeature(r.qp_type === QpType.RC ? FeatureBit.RC : FeatureBit.UD)) fail('NOT_SUPPORTED', o('qp_type'));
  // With HOST_QUEUE_MAPPING, map_flags chooses the mode (spec 13.3, 13.8: RC only); otherwise it is reserved.
  const mapping = ctx.hasFeature(FeatureBit.HOST_QUEUE_MAPPING);
  const mapFlags = mapping ? (r.map_flags ?? 0) : 0;
  if ((mapFlags & ~DEFINED_MAP_FLAGS) !== 0) fail('INVALID_ARGUMENT', o('map_flags'));
  if ((mapFlags & MapFlag.MAP) !== 0) {
    if (r.qp_type === QpType.UD) fail('INVALID_ARGUMENT', o('map_flags'));
    return createMappedQp(ctx, r);
  }
  const pd = ctx.pds.get(r.pd_handle);
  if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
  const sendCq = ctx.cqs.get(r.send_cq_handle);
  if (sendCq === undefined) fail('INVALID_HANDLE', o('send_cq_handle'));
  const recvCq = ctx.cqs.get(r.recv_cq_handle);
  if (recvCq === undefined) fail('INVALID_HANDLE', o('recv_cq_handle'));
  if (sendCq.error) fail('WRONG_STATE', o('send_cq_handle'));
  if (recvCq.error) fail('WRONG_STATE', o('recv_cq_handle'));
  // Each CQ is written by the host (mapped) or by the relay, never both (spec 13.3).
  if (sendCq.mapped !== undefined) fail('INVALID_ARGUMENT', o('send_cq_handle'));
  if (recvCq.mapped !== undefined) fail('INVALID_ARGUMENT', o('recv_cq_handle'));
  if (r.sq_sig_all > 1) fail('INVALID_ARGUMENT', o('sq_sig_all'));
  if (!isPowerOfTwo(r.max_send_wr) || r.max_send_wr > c.max_qp_wr) fail('INVALID_ARGUMENT', o('max_send_wr'));
  if (!isPowerOfTwo(r.max_recv_wr) || r.max_recv_wr > c.max_qp_wr) fail('INVALID_ARGUMENT', o('max_recv_wr'));
  if (r.max_send_sge > c.max_send_sge) fail('INVALID_ARGUMENT', o('max_send_sge'));
  if (r.max_recv_sge > c.max_recv_sge) fail('INVALID_ARGUMENT', o('max_recv_sge'));
  if (r.max_inline_data > c.max_inline_data) fail('INVALID_ARGUMENT', o('max_inline_data'));
  if (!pageShiftOk(ctx, r.sq_page_shift)) fail('INVALID_ARGUMENT', o('sq_page_shift'));
  if (!pageShiftOk(ctx, r.rq_page_shift)) fail('INVALID_ARGUMENT', o('rq_page_shift'));
  if (r.sq_num_pages !== ringPages(r.max_send_wr, Limits.SQ_WQE_SIZE, r.sq_page_shift)) fail('INVALID_ARGUMENT', o('sq_num_pages'));
  if (r.rq_num_pages !== ringPages(r.max_recv_wr, Limits.RQ_WQE_SIZE, r.rq_page_shift)) fail('INVALID_ARGUMENT', o('rq_num_pages'));
  const sqIndex = checkIndexBlock(ctx, r.sq_index_gpa, o('sq_index_gpa'));
  const rqIndex = checkIndexBlock(ctx, r.rq_index_gpa, o('rq_index_gpa'));
  const base = CreateQpRequest.size;
  const sqPages = readPages(ctx, body, base, 0, r.sq_num_pages, r.sq_page_shift, base);
  const rqPages = readPages(ctx, body, base, r.sq_num_pages, r.rq_num_pages, r.rq_page_shift, base);
  if (ctx.qps.full) fail('NO_RESOURCES', ResourceKind.QP);
  const gen = ctx.generation;
  const host = await ctx.hostCall(
    () =>
      ctx.verbs.createQp(pd.host, {
        qpType: r.qp_type,
        sendCq: sendCq.host,
        recvCq: recvCq.host,
        // Every host send is signaled (the device tracks each one); the guest's sq_sig_all decides its CQEs.
        sqSigAll: false,
        maxSendWr: r.max_send_wr,
        maxRecvWr: r.max_recv_wr,
        maxSendSge: Math.max(1, r.max_send_sge),
        maxRecvSge: Math.max(1, r.max_recv_sge),
        // The relay posts inline WQEs with IBV_SEND_INLINE: the host QP takes what the guest's may carry.
        maxInlineData: r.max_inline_data,
      }),
  );
  ctx.checkGeneration(gen, () => ctx.verbs.destroyQp(host));
  if (sendCq.destroyed || recvCq.destroyed || ctx.pds.get(pd.handle) !== pd) {
    // Cannot happen (requests run one at a time), but a QP must never outlive its CQs.
    ctx.release(ctx.verbs.destroyQp(host));
    fail('DEVICE_ERROR');
  }
  const queue = (ring: GuestRing) => ({ ring, consumer: 0, outstanding: [], inHost: 0, nextSeq: 0 });
  const qp: Qp = {
    handle: 0,
    host,
    pd,
    sendCq,
    recvCq,
    qpType: r.qp_type,
    sqSigAll: r.sq_sig_all === 1,
    maxSendSge: r.max_send_sge,
    maxRecvSge: r.max_recv_sge,
    maxInlineData: r.max_inline_data,
    sq: queue(new GuestRing(r.max_send_wr, Limits.SQ_WQE_SIZE, r.sq_page_shift, sqPages, sqIndex)),
    rq: queue(new GuestRing(r.max_recv_wr, Limits.RQ_WQE_SIZE, r.rq_page_shift, rqPages, rqIndex)),
    state: QpState.RESET,
    attr: {},
    destroyed: false,
  };
  qp.handle = ctx.qps.add(qp);
  pd.qps++;
  sendCq.qps.add(qp);
  recvCq.qps.add(qp);
  ctx.data.addQp(qp);
  ctx.resolver.registerQp(ctx.vmId, host.qpNum);
  qp.sq.ring.writeConsumer(ctx.memory, 0);
  qp.rq.ring.writeConsumer(ctx.memory, 0);
  const v1 = CreateQpResponse.encode({
    qp_handle: qp.handle,
    qp_num: host.qpNum,
    max_send_wr: r.max_send_wr,
    max_recv_wr: r.max_recv_wr,
    max_send_sge: r.max_send_sge,
    max_recv_sge: r.max_recv_sge,
    max_inline_data: r.max_inline_data,
  });
  return mapping ? qpMappedBody(ctx, qp, v1) : v1;
}

async function modifyQp(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const r = ModifyQpRequest.decode(body);
  const a = QpAttr.decode(r.attr);
  const at = (f: string): number => ModifyQpRequest.offsetOf('attr') + QpAttr.offsetOf(f);
  const MASK = ModifyQpRequest.offsetOf('attr_mask');
  const qp = ctx.qps.get(r.qp_handle);
  if (qp === undefined) fail('INVALID_HANDLE', 0);
  const mask = r.attr_mask;
  if ((mask & ~DEFINED_QP_ATTR_MASK) !== 0) fail('INVALID_ARGUMENT', MASK);
  if ((mask & ~SUPPORTED_QP_ATTR_MASK) !== 0) fail('NOT_SUPPORTED', MASK);
  if ((mask & QpAttrMask.STATE) === 0) fail('INVALID_ARGUMENT', MASK);
  const to = a.qp_state;
  if (to > QpState.ERR) fail('INVALID_ARGUMENT', at('qp_state'));
  if (to === QpState.SQD || to === QpState.SQE) fail('NOT_SUPPORTED', at('qp_state'));
  let required: number;
  let optional: number;
  if (to === QpState.RESET || to === QpState.ERR) {
    required = QpAttrMask.STATE;
    optional = 0;
  } else {
    const key = transitionKey(qp.qpType, qp.state, to);
    const req = REQUIRED_QP_ATTRS[key];
    if (req === undefined) fail('WRONG_STATE', at('qp_state'));
    required = req;
    optional = OPTIONAL_QP_ATTRS[key] ?? 0;
  }
  if ((mask & required) !== required || (mask & ~(required | optional)) !== 0) fail('INVALID_ARGUMENT', MASK);
  const has = (bit: number): boolean => (mask & bit) !== 0;
  const c = ctx.config;
  const host: HostQpAttr = { qpState: to };
  if (has(QpAttrMask.ACCESS_FLAGS)) {
    if ((a.qp_access_flags & ~DEFINED_ACCESS_FLAGS) !== 0) fail('INVALID_ARGUMENT', at('qp_access_flags'));
    if ((a.qp_access_flags & AccessFlag.REMOTE_ATOMIC) !== 0 && !ctx.hasFeature(FeatureBit.ATOMIC)) fail('NOT_SUPPORTED', at('qp_access_flags'));
    host.qpAccessFlags = a.qp_access_flags;
  }
  if (has(QpAttrMask.QKEY)) {
    if ((a.qkey & Limits.QKEY_CONTROLLED_BIT) !== 0) fail('INVALID_ARGUMENT', at('qkey'));
    host.qkey = ctx.address.qkey; // the VPC's Q_Key, never the guest's (spec 12.4)
  }
  if (has(QpAttrMask.RQ_PSN)) {
    if (a.rq_psn > Limits.QPN_MAX) fail('INVALID_ARGUMENT', at('rq_psn'));
    host.rqPsn = a.rq_psn;
  }
  if (has(QpAttrMask.SQ_PSN)) {
    if (a.sq_psn > Limits.QPN_MAX) fail('INVALID_ARGUMENT', at('sq_psn'));
    host.sqPsn = a.sq_psn;
  }
  if (has(QpAttrMask.DEST_QPN)) {
    if (a.dest_qp_num > Limits.QPN_MAX) fail('INVALID_ARGUMENT', at('dest_qp_num'));
    host.destQpNum = a.dest_qp_num;
  }
  if (has(QpAttrMask.PATH_MTU)) {
    if (a.path_mtu < 1 || a.path_mtu > c.active_mtu) fail('INVALID_ARGUMENT', at('path_mtu'));
    host.pathMtu = a.path_mtu;
  }
  if (has(QpAttrMask.TIMEOUT)) {
    if (a.timeout > 31) fail('INVALID_ARGUMENT', at('timeout'));
    host.timeout = a.timeout;
  }
  if (has(QpAttrMask.RETRY_CNT)) {
    if (a.retry_cnt > 7) fail('INVALID_ARGUMENT', at('retry_cnt'));
    host.retryCnt = a.retry_cnt;
  }
  if (has(QpAttrMask.RNR_RETRY)) {
    if (a.rnr_retry > 7) fail('INVALID_ARGUMENT', at('rnr_retry'));
    host.rnrRetry = a.rnr_retry;
  }
  if (has(QpAttrMask.MIN_RNR_TIMER)) {
    if (a.min_rnr_timer > 31) fail('INVALID_ARGUMENT', at('min_rnr_timer'));
    host.minRnrTimer = a.min_rnr_timer;
  }
  if (has(QpAttrMask.MAX_QP_RD_ATOMIC)) {
    if (a.max_rd_atomic > c.max_qp_init_rd_atom) fail('INVALID_ARGUMENT', at('max_rd_atomic'));
    host.maxRdAtomic = a.max_rd_atomic;
  }
  if (has(QpAttrMask.MAX_DEST_RD_ATOMIC)) {
    if (a.max_dest_rd_atomic > c.max_qp_rd_atom) fail('INVALID_ARGUMENT', at('max_dest_rd_atomic'));
    host.maxDestRdAtomic = a.max_dest_rd_atomic;
  }
  if (has(QpAttrMask.PORT)) {
    if (a.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', at('port_num'));
    host.portNum = HOST_PORT;
  }
  if (has(QpAttrMask.PKEY_INDEX)) {
    if (a.pkey_index !== 0) fail('INVALID_ARGUMENT', at('pkey_index'));
    host.pkeyIndex = 0;
  }
  if (has(QpAttrMask.AV)) {
    if (a.sgid_index !== 0) fail('INVALID_ARGUMENT', at('sgid_index'));
    if (a.flow_label > 0xfffff) fail('INVALID_ARGUMENT', at('flow_label'));
    if (a.sl > Limits.SL_MAX) fail('INVALID_ARGUMENT', at('sl'));
    const res = ctx.resolver.resolve(ctx.vmId, a.dgid, qp.qpType);
    if (res.kind === 'unreachable') fail('DESTINATION_UNREACHABLE', at('dgid'));
    if (res.kind === 'refused') fail('REFUSED_BY_POLICY', res.rule);
    host.ahAttr = {
      portNum: HOST_PORT,
      sl: a.sl,
      grh: {
        dgid: res.hostGid,
        sgidIndex: ctx.sourceGidIndex,
        hopLimit: a.hop_limit,
        flowLabel: a.flow_label,
        trafficClass: res.trafficClass ?? ctx.address.trafficClass ?? a.traffic_class,
      },
    };
  }
  // The guest's dest_qp_num must be a QP of the VM its dgid resolved to, unconnected or connected to this QP
  // (spec 12.3, connection tracking): checked in the QPN registry before the host QP moves to RTR.
  if (to === QpState.RTR && qp.qpType === QpType.RC && has(QpAttrMask.AV) && has(QpAttrMask.DEST_QPN) && ctx.resolver.checkPeerQp !== undefined) {
    const asked = ctx.generation;
    const peer = await ctx.resolver.checkPeerQp(ctx.vmId, { qpn: qp.host.qpNum, peerGid: a.dgid.slice(), peerQpn: a.dest_qp_num });
    ctx.checkGeneration(asked);
    if (!peer.ok) fail('DESTINATION_UNREACHABLE', at('dest_qp_num'));
  }
  const gen = ctx.generation;
  const from = qp.state;
  if (to === QpState.ERR) {
    // The state changes at once for the data path; the flush follows the host's completions (section 11.1).
    await ctx.data.moveToError(qp);
    ctx.checkGeneration(gen);
  } else {
    try {
      await trackQpCall(qp, ctx.verbs.modifyQp(qp.host, host));
    } catch (e) {
      ctx.checkGeneration(gen);
      if (e instanceof VerbsError) {
        ctx.counters.hostErrors++;
        ctx.log.log('warn', 'host refused a QP transition', { qp: qp.handle, from, to, error: e.message });
        fail('DEVICE_ERROR');
      }
      throw e;
    }
    ctx.checkGeneration(gen);
    if (qp.destroyed) fail('INVALID_HANDLE', 0);
    qp.state = to;
    if (to === QpState.RESET || from === QpState.RESET) ctx.data.discardRings(qp);
  }
  // The guest's own view (QUERY_QP): what it asked for, virtual dgid and requested traffic class included.
  for (const f of QpAttr.fields) {
    if (f.type === 'reserved' || f.name === 'qp_state') continue;
    if (has(fieldMask(f.name))) qp.attr[f.name] = (a as Record<string, number | Uint8Array>)[f.name]!;
  }
  if (to === QpState.RTS) ctx.data.takeSends(qp);
  if (to === QpState.INIT || to === QpState.RTR || to === QpState.RTS) ctx.data.takeRecvs(qp);
  if (to === QpState.RTR && qp.qpType === QpType.RC && has(QpAttrMask.AV) && ctx.resolver.qpConnected !== undefined) {
    // The transition succeeded; a policy change that came in since the resolution ends the connection now.
    const answer = ctx.resolver.qpConnected(ctx.vmId, { qpn: qp.host.qpNum, guestHandle: qp.handle, qpType: qp.qpType, peerGid: a.dgid.slice(), peerQpn: a.dest_qp_num });
    if (!answer.ok) await ctx.policyTeardownQp(qp, answer.teardown.detail);
  }
  return new Uint8Array(0);
}

function queryQp(ctx: CommandContext, body: Uint8Array): Uint8Array {
  const { handle } = HandleRequest.decode(body);
  const qp = ctx.qps.get(handle);
  if (qp === undefined) fail('INVALID_HANDLE', 0);
  const attr: Record<string, number | Uint8Array> = {};
  for (const f of QpAttr.fields) {
    if (f.type === 'reserved') continue;
    attr[f.name] = qp.attr[f.name] ?? (f.type === 'bytes' ? new Uint8Array(f.size) : 0);
  }
  attr['qp_state'] = qp.state;
  return QueryQpResponse.encode({
    attr: QpAttr.encode(attr as ReturnType<typeof QpAttr.decode>),
    qp_num: qp.host.qpNum,
    max_send_wr: qp.sq.ring.depth,
    max_recv_wr: qp.rq.ring.depth,
    max_send_sge: qp.maxSendSge,
    max_recv_sge: qp.maxRecvSge,
    max_inline_data: qp.maxInlineData,
    qp_type: qp.qpType,
    sq_sig_all: qp.sqSigAll ? 1 : 0,
  });
}

async function destroyQp(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const { handle } = HandleRequest.decode(body);
  const qp = ctx.qps.get(handle);
  if (qp === undefined) fail('INVALID_HANDLE', 0);
  const gen = ctx.generation;
  // The QP keeps its handle while the host destroy waits for the flush (doorbells meanwhile are flushed too).
  const counts = await ctx.data.destroyQp(qp, () =>
    ctx.destroyHost(async () => {
      await qp.hostIdle; // a move to ERR still running would make the host refuse the destroy (EBUSY)
      qp.hostGone = true; // a reset from now on leaves the host QP to this destroy
      await trackQpCall(qp, ctx.verbs.destroyQp(qp.host));
    }),
  );
  ctx.checkGeneration(gen);
  qp.destroyed = true;
  ctx.qps.delete(handle);
  qp.pd.qps--;
  qp.sendCq.qps.delete(qp);
  qp.recvCq.qps.delete(qp);
  ctx.data.removeQp(qp);
  ctx.resolver.unregisterQp(ctx.vmId, qp.host.qpNum);
  ctx.discardEvents(handle, [EventType.QP_FATAL, EventType.QP_REQ_ERR, EventType.QP_ACCESS_ERR, EventType.COMM_EST, EventType.QP_POLICY_TEARDOWN, EventType.DOORBELL_ERROR]);
  return DestroyQpResponse.encode({ sq_flushed: counts.sq, rq_flushed: counts.rq, flush_dropped: counts.dropped });
}

/** The QpAttrMask bit that covers a QpAttr field. */
function fieldMask(name: string): number {
  switch (name) {
    case 'qp_access_flags':
      return QpAttrMask.ACCESS_FLAGS;
    case 'qkey':
      return QpAttrMask.QKEY;
    case 'rq_psn':
      return QpAttrMask.RQ_PSN;
    case 'sq_psn':
      return QpAttrMask.SQ_PSN;
    case 'dest_qp_num':
      return QpAttrMask.DEST_QPN;
    case 'path_mtu':
      return QpAttrMask.PATH_MTU;
    case 'timeout':
      return QpAttrMask.TIMEOUT;
    case 'retry_cnt':
      return QpAttrMask.RETRY_CNT;
    case 'rnr_retry':
      return QpAttrMask.RNR_RETRY;
    case 'min_rnr_timer':
      return QpAttrMask.MIN_RNR_TIMER;
    case 'max_rd_atomic':
      return QpAttrMask.MAX_QP_RD_ATOMIC;
    case 'max_dest_rd_atomic':
      return QpAttrMask.MAX_DEST_RD_ATOMIC;
    case 'port_num':
      return QpAttrMask.PORT;
    case 'pkey_index':
      return QpAttrMask.PKEY_INDEX;
    default:
      return QpAttrMask.AV; // sgid_index, hop_limit, flow_label, traffic_class, sl, dgid
  }
}

export const qpCommands: CommandGroup = {
  [Command.CREATE_QP]: createQp,
  [Command.MODIFY_QP]: modifyQp,
  [Command.QUERY_QP]: queryQp,
  [Command.DESTROY_QP]: destroyQp,
};
