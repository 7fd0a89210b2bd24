// NativeVerbs: HostVerbs over libibverbs (native/src/verbs/). The only file that touches the addon's verbs part.

import { loadAddon } from '../native/addon.ts';
import {
  FLUSH_LIMIT_MS,
  MAX_INLINE_PER_WR,
  MAX_SGE_PER_WR,
  MAX_WC_PER_POLL,
  MAX_WRS_PER_POST,
  RECV_WR_HEADER_BYTES,
  SEND_WR_HEADER_BYTES,
  SGE_BYTES,
  WC_BYTES,
} from './constants.ts';
import type {
  AhAttr,
  AhHandle,
  AsyncEvent,
  CqHandle,
  CreateCqOptions,
  DeviceAttr,
  DoorbellEngine,
  DoorbellEngineOptions,
  DeviceHandle,
  DeviceInfo,
  GidEntry,
  HostVerbs,
  MappedCqHandle,
  MappedQpHandle,
  MrHandle,
  OpenDeviceOptions,
  PdHandle,
  PortAttr,
  QpAttr,
  QpHandle,
  QpInitAttr,
  QpQueryResult,
  RegMrOptions,
} from './host-verbs.ts';
import { VerbsError } from './host-verbs.ts';
import type { RecvWrList, SendWrList, WcBuffer } from './layout.ts';
import { NativeDoorbellEngine, hostQueueBuffer, queueFormatOf } from './native-mapped.ts';
import type { RawMappedVerbs } from './native-mapped.ts';

/** What to tell someone whose machine has no RDMA device. */
export const NO_RDMA_DEVICE_HINT =
  'this host has no RDMA device. Get one with `rdma link add rxe0 type rxe netdev <if>` on a kernel with ' +
  'rdma_rxe (soft-RoCE), or run inside the project\'s soft-RoCE test host: `npm run test:rxe` or ' +
  '`bash scripts/rxe/run.sh -- <command>`';

interface NativeError extends Error {
  verb?: string;
  errno?: string;
  badWrIndex?: number;
}

type CqEventCallback = (cqIds: number[] | null, err: Error | null) => void;
type AsyncEventCallback = (event: RawAsyncEvent | null, err: Error | null) => void;
interface RawAsyncEvent {
  type: string;
  typeNumber: number;
  qp?: number;
  cq?: number;
  port?: number;
}

/** The addon's verbs part as native/src/verbs/init.cc builds it. */
interface RawVerbs extends RawMappedVerbs {
  listDevices(): DeviceInfo[];
  openDevice(
    name: string,
    onCq: CqEventCallback,
    onAsync: AsyncEventCallback,
  ): Promise<{ context: number; channelFd: number; asyncFd: number; vendorId: number }>;
  closeDevice(ctx: number): Promise<void>;
  queryDevice(ctx: number): Promise<DeviceAttr>;
  queryPort(ctx: number, port: number): Promise<PortAttr>;
  queryGidTable(ctx: number): Promise<GidEntry[]>;
  allocPd(ctx: number): Promise<number>;
  deallocPd(pd: number): Promise<void>;
  createCq(ctx: number, cqe: number, compVector?: number): Promise<{ cq: number; cqe: number }>;
  destroyCq(cq: number): Promise<void>;
  reqNotifyCq(cq: number, solicitedOnly: boolean): void;
  pollCq(cq: number, out: Uint8Array, max: number): number;
  createQp(pd: number, init: Record<string, unknown>): Promise<{ qp: number; qpNum: number; cap: QpHandle['cap'] }>;
  modifyQp(qp: number, attr: QpAttr): Promise<void>;
  queryQp(qp: number): Promise<QpQueryResult>;
  destroyQp(qp: number, flushLimitMs: number): Promise<void>;
  regMr(
    pd: number,
    memory: ArrayBuffer,
    offset: number,
    length: number,
    access: number,
    iova?: number | bigint,
  ): Promise<{ mr: number; lkey: number; rkey: number; addr: bigint }>;
  deregMr(mr: number): Promise<void>;
  bufferAddress(memory: ArrayBuffer): bigint;
  createAh(pd: number, attr: AhAttr): Promise<number>;
  destroyAh(ah: number): Promise<void>;
  postSend(qp: number, wrs: Uint8Array, count: number): void;
  postRecv(qp: number, wrs: Uint8Array, count: number): void;
  parseSendWrsForTest(wrs: Uint8Array, count: number, isUd: boolean): unknown[];
  parseRecvWrsForTest(wrs: Uint8Array, count: number): unknown[];
  writeWcForTest(out: Uint8Array, index: number, wc: unknown): void;
  limits: Record<string, number>;
}

const EXPECTED_LIMITS: Record<string, number> = {
  SEND_WR_HEADER_BYTES,
  RECV_WR_HEADER_BYTES,
  SGE_BYTES,
  WC_BYTES,
  MAX_WRS_PER_POST,
  MAX_SGE_PER_WR,
  MAX_WC_PER_POLL,
  MAX_INLINE_PER_WR,
};

let rawVerbs: RawVerbs | undefined;

/** The addon's verbs part, checked to use the same layouts as layout.ts (a stale build fails here, not later). */
export function loadRawVerbs(): RawVerbs {
  if (rawVerbs !== undefined) return rawVerbs;
  const raw = loadAddon().verbs as unknown as RawVerbs;
  for (const [name, value] of Object.entries(EXPECTED_LIMITS)) {
    if (raw.limits?.[name] !== value)
      throw new Error(
        `the native addon's verbs layout differs from vmm-device/verbs (${name}: ${raw.limits?.[name]} vs ${value}): ` +
          'rebuild it with `bash scripts/build-native.sh`',
      );
  }
  rawVerbs = raw;
  return raw;
}

function detailOf(e: NativeError): string {
  const prefix = `${e.verb}: ${e.errno} (`;
  return e.message.startsWith(prefix) && e.message.endsWith(')') ? e.message.slice(prefix.length, -1) : e.message;
}

/** Turns the addon's error into a VerbsError (other errors pass through unchanged). */
function toVerbsError(e: unknown): unknown {
  const n = e as NativeError;
  if (n instanceof Error && typeof n.verb === 'string' && typeof n.errno === 'string')
    return new VerbsError(n.verb, n.errno, detailOf(n), n.badWrIndex);
  return e;
}

async function call<T>(p: () => Promise<T>): Promise<T> {
  try {
    return await p();
  } catch (e) {
    throw toVerbsError(e);
  }
}

function noDeviceError(e: unknown): unknown {
  const v = toVerbsError(e);
  if (v instanceof VerbsError && v.errno === 'ENOSYS') return new VerbsError(v.verb, v.errno, NO_RDMA_DEVICE_HINT);
  return v;
}

interface DeviceState {
  handle: DeviceHandle;
  options: OpenDeviceOptions;
  vendorId: number;
}

export class NativeVerbs implements HostVerbs {
  private readonly raw: RawVerbs;
  private readonly cqs = new Map<number, { handle: CqHandle; onEvent: (() => void) | undefined }>();
  private readonly qps = new Map<number, QpHandle>();
  private readonly mrs = new Map<number, MrHandle>();
  private readonly devices = new Map<number, DeviceState>();

  constructor(raw: RawVerbs = loadRawVerbs()) {
    this.raw = raw;
  }

  listDevices(): DeviceInfo[] {
    try {
      return this.raw.listDevices();
    } catch (e) {
      throw noDeviceError(e);
    }
  }

  async openDevice(name: string, options: OpenDeviceOptions = {}): Promise<DeviceHandle> {
    let opened: { context: number; vendorId: number };
    // Filled in once the device is open; the event callbacks cannot fire before (they need a CQ or QP).
    let state: DeviceState | undefined;
    try {
      opened = await this.raw.openDevice(
        name,
        (ids, err) => this.dispatchCqEvents(ids, err, state),
        (event, err) => this.dispatchAsyncEvent(event, err, state),
      );
    } catch (e) {
      const v = noDeviceError(e);
      if (v instanceof VerbsError && v.errno === 'ENODEV' && v.message.includes('devices: none'))
        throw new VerbsError(v.verb, v.errno, `no RDMA device named ${name}: ${NO_RDMA_DEVICE_HINT}`);
      throw v;
    }
    const handle: DeviceHandle = Object.freeze({ kind: 'device', id: opened.context, name });
    state = { handle, options, vendorId: opened.vendorId };
    this.devices.set(handle.id, state);
    return handle;
  }

  private dispatchCqEvents(ids: number[] | null, err: Error | null, state: DeviceState | undefined): void {
    if (err !== null) {
      state?.options.onEventError?.(toVerbsError(err) as Error);
      return;
    }
    for (const id of ids ?? []) this.cqs.get(id)?.onEvent?.();
  }

  private dispatchAsyncEvent(event: RawAsyncEvent | null, err: Error | null, state: DeviceState | undefined): void {
    if (state === undefined) return;
    if (err !== null || event === null) {
      if (err !== null) state.options.onEventError?.(toVerbsError(err) as Error);
      return;
    }
    const out: AsyncEvent = { type: event.type, typeNumber: event.typeNumber };
    if (event.qp !== undefined) {
      const qp = this.qps.get(event.qp);
      if (qp === undefined) return; // already destroyed
      out.qp = qp;
    }
    if (event.cq !== undefined) {
      const cq = this.cqs.get(event.cq);
      if (cq === undefined) return;
      out.cq = cq.handle;
    }
    if (event.port !== undefined) out.port = event.port;
    state.options.onAsyncEvent?.(out);
  }

  async closeDevice(device: DeviceHandle): Promise<void> {
    await call(() => this.raw.closeDevice(device.id));
    this.devices.delete(device.id);
  }

  queryDevice(device: DeviceHandle): Promise<DeviceAttr> {
    return call(() => this.raw.queryDevice(device.id));
  }

  queryPort(device: DeviceHandle, port: number): Promise<PortAttr> {
    return call(() => this.raw.queryPort(device.id, port));
  }

  queryGidTable(device: DeviceHandle): Promise<GidEntry[]> {
    return call(() => this.raw.queryGidTable(device.id));
  }

  async allocPd(device: DeviceHandle): Promise<PdHandle> {
    const id = await call(() => this.raw.allocPd(device.id));
    return Object.freeze({ kind: 'pd', id });
  }

  deallocPd(pd: PdHandle): Promise<void> {
    return call(() => this.raw.deallocPd(pd.id));
  }

  async createCq(device: DeviceHandle, cqe: number, options: CreateCqOptions = {}): Promise<CqHandle> {
    const r = await call(() => this.raw.createCq(device.id, cqe, options.compVector));
    const handle: CqHandle = Object.freeze({ kind: 'cq', id: r.cq, cqe: r.cqe });
    this.cqs.set(handle.id, { handle, onEvent: options.onCompletionEvent });
    return handle;
  }

  async destroyCq(cq: CqHandle): Promise<void> {
    await call(() => this.raw.destroyCq(cq.id));
    this.cqs.delete(cq.id);
  }

  reqNotifyCq(cq: CqHandle, solicitedOnly: boolean): void {
    try {
      this.raw.reqNotifyCq(cq.id, solicitedOnly);
    } catch (e) {
      throw toVerbsError(e);
    }
  }

  pollCq(cq: CqHandle, out: WcBuffer, max: number = out.capacity): number {
    try {
      out.count = 0;
      const n = this.raw.pollCq(cq.id, out.bytes, Math.min(max, out.capacity));
      out.count = n;
      return n;
    } catch (e) {
      throw toVerbsError(e);
    }
  }

  async createQp(pd: PdHandle, init: QpInitAttr): Promise<QpHandle> {
    const r = await call(() =>
      this.raw.createQp(pd.id, {
        qpType: init.qpType,
        sendCq: init.sendCq.id,
        recvCq: init.recvCq.id,
        maxSendWr: init.maxSendWr,
        maxRecvWr: init.maxRecvWr,
        maxSendSge: init.maxSendSge,
        maxRecvSge: init.maxRecvSge,
        maxInlineData: init.maxInlineData,
        sqSigAll: init.sqSigAll === true,
      }),
    );
    const handle: QpHandle = Object.freeze({
      kind: 'qp',
      id: r.qp,
      qpNum: r.qpNum,
      qpType: init.qpType,
      cap: Object.freeze(r.cap),
    });
    this.qps.set(handle.id, handle);
    return handle;
  }

  modifyQp(qp: QpHandle, attr: QpAttr): Promise<void> {
    return call(() => this.raw.modifyQp(qp.id, attr));
  }

  queryQp(qp: QpHandle): Promise<QpQueryResult> {
    return call(() => this.raw.queryQp(qp.id));
  }

  async destroyQp(qp: QpHandle): Promise<void> {
    // The flush wait of the addon's destroy is the backend's one flush deadline.
    await call(() => this.raw.destroyQp(qp.id, FLUSH_LIMIT_MS));
    this.qps.delete(qp.id);
  }

  async regMr(pd: PdHandle, memory: ArrayBuffer, options: RegMrOptions): Promise<MrHandle> {
    const offset = options.offset ?? 0;
    const length = options.length ?? memory.byteLength - offset;
    const r = await call(() => this.raw.regMr(pd.id, memory, offset, length, options.access, options.iova));
    const handle: MrHandle = Object.freeze({ kind: 'mr', id: r.mr, lkey: r.lkey, rkey: r.rkey, addr: r.addr, length });
    this.mrs.set(handle.id, handle);
    return handle;
  }

  /**
   * The process address of a buffer's first byte (what a work request names for memory registered without an
   * iova). An iova must have the same offset within a page as the memory it names.
   */
  bufferAddress(memory: ArrayBuffer): bigint {
    return this.raw.bufferAddress(memory);
  }

  async deregMr(mr: MrHandle): Promise<void> {
    await call(() => this.raw.deregMr(mr.id));
    this.mrs.delete(mr.id);
  }

  async createAh(pd: PdHandle, attr: AhAttr): Promise<AhHandle> {
    const id = await call(() => this.raw.createAh(pd.id, attr));
    return Object.freeze({ kind: 'ah', id });
  }

  destroyAh(ah: AhHandle): Promise<void> {
    return call(() => this.raw.destroyAh(ah.id));
  }

  // Host queue mapping (spec section 13): native-mapped.ts and native/src/verbs/mapped.h.
  hostQueueFormat(device: DeviceHandle): number {
    return queueFormatOf(this.devices.get(device.id)?.vendorId);
  }

  async createMappedCq(device: DeviceHandle, cqe: number, options: CreateCqOptions = {}): Promise<MappedCqHandle> {
    const r = await call(() => this.raw.createMappedCq(device.id, cqe, options.compVector));
    const handle: MappedCqHandle = Object.freeze({
      kind: 'cq',
      id: r.cq,
      cqe: r.cqe,
      queue: hostQueueBuffer(r.cmdFd, r.queue),
    });
    this.cqs.set(handle.id, { handle, onEvent: options.onCompletionEvent });
    return handle;
  }

  async createMappedQp(pd: PdHandle, init: QpInitAttr): Promise<MappedQpHandle> {
    const r = await call(() =>
      this.raw.createMappedQp(pd.id, {
        qpType: init.qpType,
        sendCq: init.sendCq.id,
        recvCq: init.recvCq.id,
        maxSendWr: init.maxSendWr,
        maxRecvWr: init.maxRecvWr,
        maxSendSge: init.maxSendSge,
        maxRecvSge: init.maxRecvSge,
        maxInlineData: init.maxInlineData,
        sqSigAll: init.sqSigAll === true,
      }),
    );
    const handle: MappedQpHandle = Object.freeze({
      kind: 'qp',
      id: r.qp,
      qpNum: r.qpNum,
      qpType: init.qpType,
      cap: Object.freeze(r.cap),
      sq: hostQueueBuffer(r.cmdFd, r.sq),
      rq: hostQueueBuffer(r.cmdFd, r.rq),
    });
    this.qps.set(handle.id, handle);
    return handle;
  }

  createDoorbellEngine(device: DeviceHandle, options: DoorbellEngineOptions): Promise<DoorbellEngine> {
    try {
      return Promise.resolve(NativeDoorbellEngine.create(this.raw, device.id, options, toVerbsError));
    } catch (e) {
      return Promise.reject(toVerbsError(e));
    }
  }

  postSend(qp: QpHandle, wrs: SendWrList): void {
    try {
      this.raw.postSend(qp.id, wrs.bytes, wrs.count);
    } catch (e) {
      throw toVerbsError(e);
    }
  }

  postRecv(qp: QpHandle, wrs: RecvWrList): void {
    try {
      this.raw.postRecv(qp.id, wrs.bytes, wrs.count);
    } catch (e) {
      throw toVerbsError(e);
    }
  }
}
