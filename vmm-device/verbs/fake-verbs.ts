// FakeVerbs: a test double of HostVerbs for the error paths real soft-RoCE cannot produce on demand (ENOMEM from
// ibv_create_qp, a failing ibv_reg_mr, a completion with an arbitrary error status, ...).
//
// It models the object lifecycle exactly as NativeVerbs enforces it (EBADF for a destroyed or wrong-kind handle,
// EBUSY for a parent with children, the same errno names), QP states for posting, and completions: a signaled send
// WR completes at once with SUCCESS (or an injected status), a receive WR waits until the QP enters ERR or is
// destroyed and is then flushed (WR_FLUSH_ERR). It moves NO data: tests of data movement run against rxe. What a
// caller posts can be watched (onPostSend): a test sees the work requests as the host would have taken them.
//
// Failures are injected per verb name (the libibverbs function: 'ibv_create_qp', 'ibv_reg_mr', ...).

import { QpState, QpType, SendFlags, WcOpcode, WcStatus, WrOpcode } from './constants.ts';
// The interface's types, as hv.* (they are many and NativeVerbs imports the same list).
import type * as hv from './host-verbs.ts';
import { VerbsError } from './host-verbs.ts';
import { decodeRecvWrs, decodeSendWrs } from './layout.ts';
import type { DecodedSendWr, RecvWrList, SendWrList, WcBuffer, WorkCompletion } from './layout.ts';
import type { AliasMapper, AliasPiece } from '../memory/alias.ts';
import { FakeDoorbellEngine, FakeQueueBuffer } from './fake-mapped.ts';

export type FakeVerbName =
  | 'ibv_get_device_list'
  | 'ibv_open_device'
  | 'ibv_close_device'
  | 'ibv_query_device'
  | 'ibv_query_port'
  | 'ibv_query_gid_table'
  | 'ibv_alloc_pd'
  | 'ibv_dealloc_pd'
  | 'ibv_create_cq'
  | 'ibv_destroy_cq'
  | 'ibv_req_notify_cq'
  | 'ibv_poll_cq'
  | 'ibv_create_qp'
  | 'ibv_modify_qp'
  | 'ibv_query_qp'
  | 'ibv_destroy_qp'
  | 'ibv_reg_mr'
  | 'ibv_reg_mr_iova'
  | 'ibv_dereg_mr'
  | 'ibv_create_ah'
  | 'ibv_destroy_ah'
  | 'ibv_post_send'
  | 'ibv_post_recv'
  | 'create_mapped_cq'
  | 'create_mapped_qp'
  | 'doorbell_engine';

type Kind = 'device' | 'pd' | 'cq' | 'qp' | 'mr' | 'ah';

interface FakeObject {
  kind: Kind;
  id: number;
  parents: number[];
  children: number;
}
interface FakeCq extends FakeObject {
  handle: hv.CqHandle;
  queue: WorkCompletion[];
  armed: 'none' | 'any' | 'solicited';
  onEvent: (() => void) | undefined;
  /** A mapped CQ's buffer (spec 13): pollCq refuses it. */
  mapped?: FakeQueueBuffer;
}
interface FakeQp extends FakeObject {
  handle: hv.QpHandle;
  state: number;
  attr: hv.QpAttr;
  sendCq: number;
  recvCq: number;
  sqSigAll: boolean;
  recvQueue: bigint[];
  sendOutstanding: number;
  /** A mapped QP's SQ and RQ buffers (spec 13): postSend and postRecv refuse it. */
  mapped?: { sq: FakeQueueBuffer; rq: FakeQueueBuffer };
}
interface FakeDevice extends FakeObject {
  options: hv.OpenDeviceOptions;
}

export interface FakeVerbsConfig {
  devices?: hv.DeviceInfo[];
  /** Limits reported by queryDevice and enforced on create (ENOMEM beyond them). */
  maxQp?: number;
  maxCq?: number;
  maxMr?: number;
  maxPd?: number;
  maxQpWr?: number;
  maxCqe?: number;
  /** HostQueueFormat reported by hostQueueFormat (default 1, RXE: the double makes rxe-shaped buffers). */
  hostQueueFormat?: number;
  /**
   * Inline capacity reported by queryDevice (DeviceAttr.maxInlineData) and enforced as rxe does: createQp refuses
   * a larger cap.max_inline_data with EINVAL, postSend an inline WR longer than the QP's with EINVAL. Default 0, a
   * host without inline data (the device then does not offer INLINE).
   */
  maxInlineData?: number;
}

/** Legal modify_qp state transitions (IB spec 10.3.1), RESET and ERR reachable from every state. */
const TRANSITIONS: Record<number, readonly number[]> = {
  [QpState.RESET]: [QpState.RESET, QpState.INIT],
  [QpState.INIT]: [QpState.INIT, QpState.RTR],
  [QpState.RTR]: [QpState.RTS],
  [QpState.RTS]: [QpState.RTS, QpState.SQD],
  [QpState.SQD]: [QpState.RTS, QpState.SQD],
  [QpState.SQE]: [QpState.RTS],
  [QpState.ERR]: [],
};

/** Opcodes that may carry inline data (they send local bytes; READ and atomics write local memory). */
const INLINE_OPCODES = new Set<number>([WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM]);

const SEND_OPCODE_TO_WC: Record<number, number> = {
  [WrOpcode.RDMA_WRITE]: WcOpcode.RDMA_WRITE,
  [WrOpcode.RDMA_WRITE_WITH_IMM]: WcOpcode.RDMA_WRITE,
  [WrOpcode.SEND]: WcOpcode.SEND,
  [WrOpcode.SEND_WITH_IMM]: WcOpcode.SEND,
  [WrOpcode.RDMA_READ]: WcOpcode.RDMA_READ,
  [WrOpcode.ATOMIC_CMP_AND_SWP]: WcOpcode.COMP_SWAP,
  [WrOpcode.ATOMIC_FETCH_AND_ADD]: WcOpcode.FETCH_ADD,
};

export class FakeVerbs implements hv.HostVerbs {
  private readonly config: Required<FakeVerbsConfig>;
  private readonly objects = new Map<number, FakeObject>();
  private readonly destroying = new Set<number>();
  private nextId = 1;
  private readonly failures = new Map<string, { errno: string; remaining: number }>();
  private readonly completionStatuses: number[] = [];
  /** Every verb called, in order (name only): lets a test assert what the code under test did. */
  readonly calls: string[] = [];
  /** Called with the work requests of each postSend the double accepts, as native code would parse them. */
  onPostSend: ((qp: hv.QpHandle, wrs: DecodedSendWr[]) => void) | undefined;

  constructor(config: FakeVerbsConfig = {}) {
    this.config = {
      devices: config.devices ?? [{ name: 'fake0', guid: '0000:0000:0000:0001', nodeType: 1, transportType: 0 }],
      maxQp: config.maxQp ?? 1024,
      maxCq: config.maxCq ?? 1024,
      maxMr: config.maxMr ?? 1024,
      maxPd: config.maxPd ?? 1024,
      maxQpWr: config.maxQpWr ?? 4096,
      maxCqe: config.maxCqe ?? 65536,
      hostQueueFormat: config.hostQueueFormat ?? 1,
      maxInlineData: config.maxInlineData ?? 0,
    };
  }

  // ------------------------------------------------------------------------------------------- injection

  /** The next `times` calls of `verb` fail with `errno` (Infinity: until clearFailures). */
  failNext(verb: FakeVerbName, errno: string, times = 1): void {
    this.failures.set(verb, { errno, remaining: times });
  }

  clearFailures(): void {
    this.failures.clear();
  }

  /** The next signaled send completions get these statuses (WcStatus), in order, instead of SUCCESS. */
  injectCompletionStatus(...statuses: number[]): void {
    this.completionStatuses.push(...statuses);
  }

  /** Delivers an asynchronous event to the device's listener, as the hardware would. */
  raiseAsyncEvent(device: hv.DeviceHandle, event: hv.AsyncEvent): void {
    const d = this.objects.get(device.id) as FakeDevice | undefined;
    d?.options.onAsyncEvent?.(event);
  }

  /**
   * The host signals a completion event for `cq` as it would after a completion it wrote (a mapped CQ's completions
   * are written by the host where the double cannot see them): only when armed, and the arm is used up.
   */
  raiseCompletionEvent(cq: hv.CqHandle): boolean {
    const c = this.objects.get(cq.id) as FakeCq | undefined;
    if (c === undefined || c.kind !== 'cq' || c.armed === 'none') return false;
    c.armed = 'none';
    if (c.onEvent !== undefined) setImmediate(c.onEvent);
    return true;
  }

  /** A QP's state and destination QP number as the double keeps them (undefined: no such QP). */
  qpConnection(qp: hv.QpHandle): { readonly state: number; readonly destQpNum: number | undefined } | undefined {
    const q = this.objects.get(qp.id) as FakeQp | undefined;
    return q === undefined || q.kind !== 'qp' ? undefined : { state: q.state, destQpNum: q.attr.destQpNum };
  }

  /**
   * A SEND of `byteLen` bytes from QP `srcQp` arrives at the QP numbered `qpNum` (for a double that connects its own
   * QPs): completes the oldest receive posted there, if that QP is in RTR or RTS and has one. False otherwise (real
   * RC would retry, RNR; the double drops it).
   */
  deliverSend(qpNum: number, srcQp: number, byteLen: number, solicited: boolean): boolean {
    for (const o of this.objects.values()) {
      const q = o as FakeQp;
      if (o.kind !== 'qp' || q.handle.qpNum !== qpNum) continue;
      if (q.state !== QpState.RTR && q.state !== QpState.RTS) return false;
      const wrId = q.recvQueue.shift();
      if (wrId === undefined) return false;
      this.pushCompletion(q.recvCq, { ...this.wc(q, wrId, WcStatus.SUCCESS, WcOpcode.RECV, byteLen), srcQp }, solicited);
      return true;
    }
    return false;
  }

  /** Live objects by kind (a leak check for code under test). */
  liveObjects(): Record<Kind, number> {
    const out: Record<Kind, number> = { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 };
    for (const o of this.objects.values()) out[o.kind]++;
    return out;
  }

  // ------------------------------------------------------------------------------------------- helpers

  private enter(verb: FakeVerbName): void {
    this.calls.push(verb);
    const f = this.failures.get(verb);
    if (f === undefined) return;
    f.remaining--;
    if (f.remaining <= 0) this.failures.delete(verb);
    throw new VerbsError(verb, f.errno, 'injected failure');
  }

  private lookup<T extends FakeObject>(verb: string, kind: Kind, id: number, forDestroy = false): T {
    const o = this.objects.get(id);
    const name = kind === 'device' ? 'context' : kind;
    if (o === undefined) throw new VerbsError(verb, 'EBADF', `${name} handle ${id} does not exist or was already destroyed`);
    if (o.kind !== kind)
      throw new VerbsError(verb, 'EBADF', `${name} handle ${id} is a ${o.kind === 'device' ? 'context' : o.kind} handle`);
    if (this.destroying.has(id)) throw new VerbsError(verb, 'EBADF', `${name} handle ${id} is being destroyed`);
    if (forDestroy && o.children > 0)
      throw new VerbsError(verb, 'EBUSY', `${name} ${id} still has ${o.children} dependent object(s); destroy them first`);
    return o as T;
  }

  private add<T extends FakeObject>(o: Omit<T, 'id' | 'children'>): T {
    const full = { ...o, id: this.nextId++, children: 0 } as T;
    for (const p of full.parents) this.objects.get(p)!.children++;
    this.objects.set(full.id, full);
    return full;
  }

  private remove(o: FakeObject): void {
    for (const p of o.parents) {
      const parent = this.objects.get(p);
      if (parent !== undefined) parent.children--;
    }
    this.objects.delete(o.id);
  }

  private count(kind: Kind): number {
    let n = 0;
    for (const o of this.objects.values()) if (o.kind === kind) n++;
    return n;
  }

  /** Destroys after a turn of the event loop, invalid from the start, like the native thread-pool verbs. */
  private async destroy(verb: FakeVerbName, kind: Kind, id: number, before?: (o: FakeObject) => void): Promise<void> {
    const o = this.lookup(verb, kind, id, true);
    this.destroying.add(id);
    await new Promise((r) => setImmediate(r));
    this.destroying.delete(id);
    this.enter(verb); // an injected failure leaves the object alive and valid, as a refused native destroy does
    before?.(o);
    this.remove(o);
    const m = (o as { mapped?: FakeQueueBuffer | { sq: FakeQueueBuffer; rq: FakeQueueBuffer } }).mapped;
    if (m instanceof FakeQueueBuffer) m.close();
    else if (m !== undefined) {
      m.sq.close();
      m.rq.close();
    }
  }

  private pushCompletion(cqId: number, wc: WorkCompletion, solicited: boolean): void {
    const cq = this.objects.get(cqId) as FakeCq | undefined;
    if (cq === undefined) return;
    cq.queue.push(wc);
    if (cq.armed === 'any' || (cq.armed === 'solicited' && (solicited || wc.status !== WcStatus.SUCCESS))) {
      cq.armed = 'none';
      const fire = cq.onEvent;
      if (fire !== undefined) setImmediate(fire);
    }
  }

  private wc(qp: FakeQp, wrId: bigint, status: number, opcode: number, byteLen = 0): WorkCompletion {
    return {
      wrId,
      status,
      opcode,
      vendorErr: 0,
      byteLen,
      immData: 0,
      qpNum: qp.handle.qpNum,
      srcQp: 0,
      wcFlags: 0,
      pkeyIndex: 0,
      slid: 0,
      sl: 0,
      dlidPathBits: 0,
    };
  }

  private flushReceives(qp: FakeQp): void {
    for (const wrId of qp.recvQueue.splice(0))
      this.pushCompletion(qp.recvCq, this.wc(qp, wrId, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV), false);
  }

  // ------------------------------------------------------------------------------------------- HostVerbs

  listDevices(): hv.DeviceInfo[] {
    this.enter('ibv_get_device_list');
    return this.config.devices.map((d) => ({ ...d }));
  }

  async openDevice(name: string, options: hv.OpenDeviceOptions = {}): Promise<hv.DeviceHandle> {
    this.enter('ibv_open_device');
    if (!this.config.devices.some((d) => d.name === name))
      throw new VerbsError(
        'ibv_open_device',
        'ENODEV',
        `no RDMA device named ${name} (devices: ${this.config.devices.map((d) => d.name).join(', ') || 'none'})`,
      );
    const d = this.add<FakeDevice>({ kind: 'device', parents: [], options });
    return Object.freeze({ kind: 'device', id: d.id, name });
  }

  closeDevice(device: hv.DeviceHandle): Promise<void> {
    return this.destroy('ibv_close_device', 'device', device.id);
  }

  async queryDevice(device: hv.DeviceHandle): Promise<hv.DeviceAttr> {
    this.lookup('ibv_query_device', 'device', device.id);
    this.enter('ibv_query_device');
    const c = this.config;
    return {
      fwVer: 'fake',
      nodeGuid: '0000:0000:0000:0001',
      sysImageGuid: '0000:0000:0000:0001',
      maxMrSize: 1n << 40n,
      pageSizeCap: 4096n,
      vendorId: 0,
      vendorPartId: 0,
      hwVer: 0,
      maxQp: c.maxQp,
      maxQpWr: c.maxQpWr,
      deviceCapFlags: 0,
      maxSge: 32,
      maxSgeRd: 32,
      maxCq: c.maxCq,
      maxCqe: c.maxCqe,
      maxMr: c.maxMr,
      maxPd: c.maxPd,
      maxQpRdAtom: 128,
      maxQpInitRdAtom: 128,
      atomicCap: 1,
      maxAh: 1024,
      maxPkeys: 64,
      physPortCnt: 1,
      maxInlineData: c.maxInlineData,
    };
  }

  async queryPort(device: hv.DeviceHandle, port: number): Promise<hv.PortAttr> {
    this.lookup('ibv_query_port', 'device', device.id);
    this.enter('ibv_query_port');
    if (port !== 1) throw new VerbsError('ibv_query_port', 'EINVAL', `port ${port} does not exist`);
    return {
      state: 4,
      maxMtu: 5,
      activeMtu: 3,
      gidTblLen: 16,
      portCapFlags: 0,
      maxMsgSz: 0x80000000,
      pkeyTblLen: 64,
      lid: 0,
      smLid: 0,
      lmc: 0,
      activeWidth: 1,
      activeSpeed: 1,
      physState: 5,
      linkLayer: 2,
    };
  }

  async queryGidTable(device: hv.DeviceHandle): Promise<hv.GidEntry[]> {
    this.lookup('ibv_query_gid_table', 'device', device.id);
    this.enter('ibv_query_gid_table');
    const v4 = new Uint8Array(16);
    v4.set([0xff, 0xff, 10, 0, 0, 1], 10);
    return [{ gid: v4, index: 1, port: 1, type: 2, ndevIfindex: 2 }];
  }

  async allocPd(device: hv.DeviceHandle): Promise<hv.PdHandle> {
    this.lookup('ibv_alloc_pd', 'device', device.id);
    this.enter('ibv_alloc_pd');
    if (this.count('pd') >= this.config.maxPd) throw new VerbsError('ibv_alloc_pd', 'ENOMEM', 'Cannot allocate memory');
    const pd = this.add<FakeObject>({ kind: 'pd', parents: [device.id] });
    return Object.freeze({ kind: 'pd', id: pd.id });
  }

  deallocPd(pd: hv.PdHandle): Promise<void> {
    return this.destroy('ibv_dealloc_pd', 'pd', pd.id);
  }

  async createCq(device: hv.DeviceHandle, cqe: number, options: hv.CreateCqOptions = {}): Promise<hv.CqHandle> {
    this.lookup('ibv_create_cq', 'device', device.id);
    this.enter('ibv_create_cq');
    if (!Number.isInteger(cqe) || cqe < 1 || cqe > this.config.maxCqe)
      throw new VerbsError('ibv_create_cq', 'EINVAL', `cqe ${cqe} is not in 1..${this.config.maxCqe}`);
    if (this.count('cq') >= this.config.maxCq) throw new VerbsError('ibv_create_cq', 'ENOMEM', 'Cannot allocate memory');
    const cq = this.add<FakeCq>({
      kind: 'cq',
      parents: [device.id],
      handle: undefined as unknown as hv.CqHandle,
      queue: [],
      armed: 'none',
      onEvent: options.onCompletionEvent,
    });
    cq.handle = Object.freeze({ kind: 'cq', id: cq.id, cqe });
    return cq.handle;
  }

  destroyCq(cq: hv.CqHandle): Promise<void> {
    return this.destroy('ibv_destroy_cq', 'cq', cq.id);
  }

  reqNotifyCq(cq: hv.CqHandle, solicitedOnly: boolean): void {
    const c = this.lookup<FakeCq>('ibv_req_notify_cq', 'cq', cq.id);
    this.enter('ibv_req_notify_cq');
    c.armed = solicitedOnly ? 'solicited' : 'any';
  }

  pollCq(cq: hv.CqHandle, out: WcBuffer, max: number = out.capacity): number {
    const c = this.lookup<FakeCq>('ibv_poll_cq', 'cq', cq.id);
    this.enter('ibv_poll_cq');
    if (c.mapped !== undefined) throw new VerbsError('ibv_poll_cq', 'EINVAL', 'a mapped CQ is polled by the process that maps it');
    const n = Math.min(max, out.capacity, c.queue.length);
    const taken = c.queue.splice(0, n);
    for (let i = 0; i < n; i++) out.write(i, taken[i]!);
    out.count = n;
    return n;
  }

  async createQp(pd: hv.PdHandle, init: hv.QpInitAttr): Promise<hv.QpHandle> {
    const verb = 'ibv_create_qp';
    this.lookup(verb, 'pd', pd.id);
    this.lookup(verb, 'cq', init.sendCq.id);
    this.lookup(verb, 'cq', init.recvCq.id);
    this.enter(verb);
    if (init.qpType !== QpType.RC && init.qpType !== QpType.UD)
      throw new VerbsError(verb, 'EINVAL', `qpType ${init.qpType} is not RC (2) or UD (4)`);
    if (init.maxSendWr > this.config.maxQpWr || init.maxRecvWr > this.config.maxQpWr)
      throw new VerbsError(verb, 'EINVAL', `more than ${this.config.maxQpWr} work requests`);
    if (init.maxInlineData > this.config.maxInlineData)
      throw new VerbsError(verb, 'EINVAL', `max_inline_data ${init.maxInlineData} above the device's ${this.config.maxInlineData}`);
    if (this.count('qp') >= this.config.maxQp) throw new VerbsError(verb, 'ENOMEM', 'Cannot allocate memory');
    const parents = init.sendCq.id === init.recvCq.id ? [pd.id, init.sendCq.id] : [pd.id, init.sendCq.id, init.recvCq.id];
    const qp = this.add<FakeQp>({
      kind: 'qp',
      parents,
      handle: undefined as unknown as hv.QpHandle,
      state: QpState.RESET,
      attr: {},
      sendCq: init.sendCq.id,
      recvCq: init.recvCq.id,
      sqSigAll: init.sqSigAll === true,
      recvQueue: [],
      sendOutstanding: 0,
    });
    const cap = {
      maxSendWr: init.maxSendWr,
      maxRecvWr: init.maxRecvWr,
      maxSendSge: init.maxSendSge,
      maxRecvSge: init.maxRecvSge,
      maxInlineData: init.maxInlineData,
    };
    qp.handle = Object.freeze({ kind: 'qp', id: qp.id, qpNum: 0x100 + qp.id, qpType: init.qpType, cap: Object.freeze(cap) });
    return qp.handle;
  }

  async modifyQp(qp: hv.QpHandle, attr: hv.QpAttr): Promise<void> {
    const verb = 'ibv_modify_qp';
    const q = this.lookup<FakeQp>(verb, 'qp', qp.id);
    this.enter(verb);
    if (Object.keys(attr).length === 0) throw new VerbsError(verb, 'EINVAL', 'no attribute given');
    if (attr.qpState !== undefined) {
      const to = attr.qpState;
      if (to !== QpState.RESET && to !== QpState.ERR && !(TRANSITIONS[q.state] ?? []).includes(to))
        throw new VerbsError(verb, 'EINVAL', `QP state ${q.state} cannot go to ${to}`);
      q.state = to;
      if (to === QpState.ERR) this.flushReceives(q);
      if (to === QpState.RESET) q.recvQueue.length = 0;
    }
    q.attr = { ...q.attr, ...attr };
    await new Promise((r) => setImmediate(r));
  }

  async queryQp(qp: hv.QpHandle): Promise<hv.QpQueryResult> {
    const q = this.lookup<FakeQp>('ibv_query_qp', 'qp', qp.id);
    this.enter('ibv_query_qp');
    const a = q.attr;
    return {
      qpNum: q.handle.qpNum,
      qpType: q.handle.qpType,
      qpState: q.state,
      curQpState: q.state,
      pkeyIndex: a.pkeyIndex ?? 0,
      portNum: a.portNum ?? 0,
      qpAccessFlags: a.qpAccessFlags ?? 0,
      qkey: a.qkey ?? 0,
      pathMtu: a.pathMtu ?? 0,
      destQpNum: a.destQpNum ?? 0,
      rqPsn: a.rqPsn ?? 0,
      sqPsn: a.sqPsn ?? 0,
      maxRdAtomic: a.maxRdAtomic ?? 0,
      maxDestRdAtomic: a.maxDestRdAtomic ?? 0,
      minRnrTimer: a.minRnrTimer ?? 0,
      timeout: a.timeout ?? 0,
      retryCnt: a.retryCnt ?? 0,
      rnrRetry: a.rnrRetry ?? 0,
      ahAttr: a.ahAttr ?? { portNum: 0 },
      cap: q.handle.cap,
      sqSigAll: q.sqSigAll,
    };
  }

  destroyQp(qp: hv.QpHandle): Promise<void> {
    return this.destroy('ibv_destroy_qp', 'qp', qp.id, (o) => this.flushReceives(o as FakeQp));
  }

  async regMr(pd: hv.PdHandle, memory: ArrayBuffer, options: hv.RegMrOptions): Promise<hv.MrHandle> {
    const verb = options.iova !== undefined ? 'ibv_reg_mr_iova' : 'ibv_reg_mr';
    this.lookup(verb, 'pd', pd.id);
    this.enter(verb);
    const offset = options.offset ?? 0;
    const length = options.length ?? memory.byteLength - offset;
    if (length <= 0 || offset < 0 || offset + length > memory.byteLength)
      throw new VerbsError(verb, 'EINVAL', `range ${offset}+${length} is outside the ${memory.byteLength}-byte buffer`);
    if (this.count('mr') >= this.config.maxMr) throw new VerbsError(verb, 'ENOMEM', 'Cannot allocate memory');
    const mr = this.add<FakeObject>({ kind: 'mr', parents: [pd.id] });
    const key = 0x1000 + mr.id;
    return Object.freeze({
      kind: 'mr',
      id: mr.id,
      lkey: key,
      rkey: key,
      addr: BigInt(options.iova ?? 0x10_0000 * mr.id + offset),
      length,
    });
  }

  deregMr(mr: hv.MrHandle): Promise<void> {
    return this.destroy('ibv_dereg_mr', 'mr', mr.id);
  }

  async createAh(pd: hv.PdHandle, attr: hv.AhAttr): Promise<hv.AhHandle> {
    this.lookup('ibv_create_ah', 'pd', pd.id);
    this.enter('ibv_create_ah');
    if (attr.grh !== undefined && attr.grh.dgid.length !== 16)
      throw new VerbsError('ibv_create_ah', 'EINVAL', `ahAttr.grh.dgid must be 16 bytes, got ${attr.grh.dgid.length}`);
    const ah = this.add<FakeObject>({ kind: 'ah', parents: [pd.id] });
    return Object.freeze({ kind: 'ah', id: ah.id });
  }

  destroyAh(ah: hv.AhHandle): Promise<void> {
    return this.destroy('ibv_destroy_ah', 'ah', ah.id);
  }

  // Host queue mapping (spec section 13): memfd-backed rxe-shaped buffers and a doorbell engine (fake-mapped.ts).
  /** The engines made so far (the last is the device's current one): a test drives and inspects them. */
  readonly engines: FakeDoorbellEngine[] = [];

  hostQueueFormat(device: hv.DeviceHandle): number {
    this.lookup('host_queue_format', 'device', device.id);
    return this.config.hostQueueFormat;
  }

  async createMappedCq(device: hv.DeviceHandle, cqe: number, options: hv.CreateCqOptions = {}): Promise<hv.MappedCqHandle> {
    this.lookup('create_mapped_cq', 'device', device.id);
    this.enter('create_mapped_cq');
    const plain = await this.createCq(device, cqe, options);
    const cq = this.objects.get(plain.id) as FakeCq;
    // rxe: a CQ slot holds struct ib_uverbs_wc (48 bytes) in a 128-byte element (spec 13.4).
    cq.mapped = new FakeQueueBuffer(`fake-cq-${cq.id}`, cqe, 128);
    cq.handle = Object.freeze({ ...plain, queue: cq.mapped });
    return cq.handle as hv.MappedCqHandle;
  }

  async createMappedQp(pd: hv.PdHandle, init: hv.QpInitAttr): Promise<hv.MappedQpHandle> {
    const verb = 'create_mapped_qp';
    this.lookup(verb, 'pd', pd.id);
    const send = this.lookup<FakeCq>(verb, 'cq', init.sendCq.id);
    const recv = this.lookup<FakeCq>(verb, 'cq', init.recvCq.id);
    this.enter(verb);
    if (init.qpType !== QpType.RC) throw new VerbsError(verb, 'EINVAL', 'only RC QPs are mapped');
    if (send.mapped === undefined || recv.mapped === undefined) throw new VerbsError(verb, 'EINVAL', 'a mapped QP needs mapped CQs');
    const plain = await this.createQp(pd, init);
    const qp = this.objects.get(plain.id) as FakeQp;
    const sq = new FakeQueueBuffer(`fake-sq-${qp.id}`, init.maxSendWr, 208 + 16 * Math.max(1, init.maxSendSge));
    const rq = new FakeQueueBuffer(`fake-rq-${qp.id}`, init.maxRecvWr, 40 + 16 * Math.max(1, init.maxRecvSge));
    qp.mapped = { sq, rq };
    qp.handle = Object.freeze({ ...plain, sq, rq });
    return qp.handle as hv.MappedQpHandle;
  }

  async createDoorbellEngine(device: hv.DeviceHandle, options: hv.DoorbellEngineOptions): Promise<hv.DoorbellEngine> {
    this.lookup('doorbell_engine', 'device', device.id);
    this.enter('doorbell_engine');
    if (!Number.isInteger(options.pages) || options.pages < 1) throw new VerbsError('doorbell_engine', 'EINVAL', `pages ${options.pages}`);
    const e = new FakeDoorbellEngine(options);
    this.engines.push(e);
    return e;
  }

  postSend(qp: hv.QpHandle, wrs: SendWrList): void {
    const verb = 'ibv_post_send';
    const q = this.lookup<FakeQp>(verb, 'qp', qp.id);
    this.enter(verb);
    if (q.mapped !== undefined) throw new VerbsError(verb, 'EINVAL', 'a mapped QP takes its work requests from its mapped queue', 0);
    const list = decodeSendWrs(wrs.bytes, wrs.count);
    if (q.state !== QpState.RTS && q.state !== QpState.SQD && q.state !== QpState.ERR)
      throw new VerbsError(verb, 'EINVAL', 'work request 0 and later not posted', 0);
    let taken = 0;
    try {
      for (; taken < list.length; taken++) this.takeSend(verb, q, list[taken]!, taken);
    } finally {
      if (taken > 0) this.onPostSend?.(qp, list.slice(0, taken));
    }
  }

  /** One send WR of postSend (work request `i` of the list): refused with badWrIndex i, or completed at once. */
  private takeSend(verb: FakeVerbName, q: FakeQp, wr: DecodedSendWr, i: number): void {
    if (q.handle.qpType === QpType.UD) {
      if (wr.opcode !== WrOpcode.SEND && wr.opcode !== WrOpcode.SEND_WITH_IMM)
        throw new VerbsError(verb, 'EINVAL', `work request ${i} and later not posted`, i);
      this.lookup(verb, 'ah', wr.ahId);
    }
    const wcOpcode = SEND_OPCODE_TO_WC[wr.opcode];
    if (wcOpcode === undefined) throw new VerbsError(verb, 'EINVAL', `work request ${i} and later not posted`, i);
    // rxe's provider: inline data longer than the QP's max_inline_data, or on an opcode that reads or fetches,
    // refuses the post.
    if (wr.inline !== undefined && (wr.inline.length > q.handle.cap.maxInlineData || !INLINE_OPCODES.has(wr.opcode)))
      throw new VerbsError(verb, 'EINVAL', `work request ${i} and later not posted`, i);
    const status =
      q.state === QpState.ERR ? WcStatus.WR_FLUSH_ERR : (this.completionStatuses.shift() ?? WcStatus.SUCCESS);
    if (q.sqSigAll || (wr.sendFlags & SendFlags.SIGNALED) !== 0 || status !== WcStatus.SUCCESS) {
      const bytes = wr.inline?.length ?? wr.sgList.reduce((s, g) => s + g.length, 0);
      this.pushCompletion(q.sendCq, this.wc(q, wr.wrId, status, wcOpcode, bytes), false);
    }
    if (status !== WcStatus.SUCCESS && q.state !== QpState.ERR) {
      q.state = QpState.ERR; // an error completion moves an RC QP to ERR, which flushes what is queued
      this.flushReceives(q);
    }
  }

  postRecv(qp: hv.QpHandle, wrs: RecvWrList): void {
    const verb = 'ibv_post_recv';
    const q = this.lookup<FakeQp>(verb, 'qp', qp.id);
    this.enter(verb);
    if (q.mapped !== undefined) throw new VerbsError(verb, 'EINVAL', 'a mapped QP takes its work requests from its mapped queue', 0);
    const list = decodeRecvWrs(wrs.bytes, wrs.count);
    if (q.state === QpState.RESET) throw new VerbsError(verb, 'EINVAL', 'work request 0 and later not posted', 0);
    for (const wr of list) {
      if (q.state === QpState.ERR)
        this.pushCompletion(q.recvCq, this.wc(q, wr.wrId, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV), false);
      else q.recvQueue.push(wr.wrId);
    }
  }
}

/**
 * The AliasMapper for the verbs test double, which moves no data: an alias is a private copy of the pieces taken
 * at map time (the double's registrations never read it). It checks what the native mapper checks (page-multiple
 * pieces inside their buffers) and counts live aliases, so a test can assert that every alias was unmapped.
 */
export class FakeAliasMapper implements AliasMapper {
  private readonly aliases = new Set<ArrayBuffer>();
  /** Aliases mapped so far (a test asserts that the scattered path ran). */
  mapped = 0;

  constructor(private readonly pageSize = 4096) {}

  map(pieces: readonly AliasPiece[]): ArrayBuffer {
    if (pieces.length === 0) throw new RangeError('mapAlias: no pieces');
    let total = 0;
    for (const [i, p] of pieces.entries()) {
      if (p.offset % this.pageSize !== 0 || p.length % this.pageSize !== 0 || p.length === 0)
        throw new RangeError(`mapAlias: piece ${i} is not a whole number of ${this.pageSize}-byte pages`);
      if (p.offset + p.length > p.buffer.byteLength) throw new RangeError(`mapAlias: piece ${i} is outside its buffer`);
      total += p.length;
    }
    const alias = new ArrayBuffer(total);
    const bytes = new Uint8Array(alias);
    let at = 0;
    for (const p of pieces) {
      bytes.set(new Uint8Array(p.buffer, p.offset, p.length), at);
      at += p.length;
    }
    this.aliases.add(alias);
    this.mapped++;
    return alias;
  }

  unmap(alias: ArrayBuffer): void {
    if (!this.aliases.delete(alias)) throw new Error('munmap of a range that is not a live alias');
  }

  /** Aliases mapped and not yet unmapped. */
  get live(): number {
    return this.aliases.size;
  }
}
