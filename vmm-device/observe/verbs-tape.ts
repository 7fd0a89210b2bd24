// The host's answers to the device's verbs, kept with a recording so that a replay is deterministic.
//
// A session recorded over real verbs carries host values in its answers: QPNs, lkeys and rkeys (rxe draws a random
// byte into each key), the CQ depth the host rounded to, the device and port attributes. The test double of an
// offline replay numbers its objects its own way, so without these values the replay's answers differ from the
// recording wherever a host value appears. RecordingVerbs (in the backend) writes each answer-bearing call's
// outcome on a tape: the host values of its result, or its error. ReplayingVerbs (in the replay) performs every
// call on the double, which keeps the objects' bookkeeping, and hands back the recorded outcome instead: the same
// host values, the same errors. Calls are matched per verb in order, which the control queue makes deterministic
// (one command at a time, each command's verbs in a fixed order).
//
// Not taped: the data path (post, poll, notify: their answers are completions, which a recording of guest-visible
// answers already holds), asynchronous events (the host raises them at times a replay cannot reproduce), the
// doorbell engine (a thread, not an answer).

import { VerbsError } from '../verbs/host-verbs.ts';
import type * as hv from '../verbs/host-verbs.ts';
import type { RecvWrList, SendWrList, WcBuffer } from '../verbs/layout.ts';

/** Entries a tape keeps; past it the tape counts what it dropped and a replay of that session reports it. */
export const MAX_TAPE_ENTRIES = 1 << 18;

/** A JSON value with bigints and byte arrays encoded ({$bigint}, {$bytes}). */
export type TapeValue = unknown;

export interface TapeEntry {
  /** The HostVerbs method. */
  call: string;
  /** The host values of the result (see hostValues), or absent for a call that only succeeded or failed. */
  ok?: TapeValue;
  /** The call failed: the VerbsError's fields. */
  error?: { verb: string; errno: string; message: string; badWrIndex?: number };
}

export interface TapeDump {
  entries: TapeEntry[];
  dropped: number;
}

const encode = (v: unknown): unknown =>
  JSON.parse(
    JSON.stringify(v, (_k, x: unknown) => {
      if (typeof x === 'bigint') return { $bigint: x.toString() };
      if (x instanceof Uint8Array) return { $bytes: Buffer.from(x.buffer, x.byteOffset, x.byteLength).toString('hex') };
      return x;
    }),
  );

const decode = (v: unknown): unknown =>
  JSON.parse(JSON.stringify(v), (_k, x: unknown) => {
    if (x !== null && typeof x === 'object' && !Array.isArray(x)) {
      const o = x as Record<string, unknown>;
      if (typeof o['$bigint'] === 'string' && Object.keys(o).length === 1) return BigInt(o['$bigint']);
      if (typeof o['$bytes'] === 'string' && Object.keys(o).length === 1) return new Uint8Array(Buffer.from(o['$bytes'], 'hex'));
    }
    return x;
  });

/** The fields of a handle that the host chose and a guest may see; the rest (ids) belong to whoever holds it. */
function hostValues(call: string, result: unknown): unknown {
  const r = result as Record<string, unknown>;
  switch (call) {
    case 'createCq':
      return { cqe: r['cqe'] };
    case 'createQp':
      return { qpNum: r['qpNum'], cap: r['cap'] };
    case 'regMr':
      return { lkey: r['lkey'], rkey: r['rkey'] };
    case 'createMappedCq':
      return { cqe: r['cqe'], queue: slots(r['queue']) };
    case 'createMappedQp':
      return { qpNum: r['qpNum'], cap: r['cap'], sq: slots(r['sq']), rq: slots(r['rq']) };
    case 'queryDevice':
    case 'queryPort':
    case 'queryGidTable':
    case 'queryQp':
    case 'hostQueueFormat':
      return result;
    default:
      return undefined;
  }
}

function slots(q: unknown): unknown {
  const b = q as hv.HostQueueBuffer;
  return { numSlots: b.numSlots, slotSize: b.slotSize, size: b.size };
}

/** The tape a recording backend writes (bounded). */
export class VerbsTape {
  private readonly list: TapeEntry[] = [];
  private dropped = 0;

  add(entry: TapeEntry): void {
    if (this.list.length >= MAX_TAPE_ENTRIES) {
      this.dropped++;
      return;
    }
    this.list.push(entry);
  }

  dump(): TapeDump {
    return { entries: [...this.list], dropped: this.dropped };
  }
}

function errorEntry(call: string, e: unknown): TapeEntry {
  if (e instanceof VerbsError) {
    return { call, error: { verb: e.verb, errno: e.errno, message: e.message, ...(e.badWrIndex === undefined ? {} : { badWrIndex: e.badWrIndex }) } };
  }
  return { call, error: { verb: call, errno: 'EIO', message: (e as Error).message } };
}

/** HostVerbs that pass every call to `inner` and write the outcome of the answer-bearing ones on `tape`. */
export class RecordingVerbs implements hv.HostVerbs {
  constructor(
    private readonly inner: hv.HostVerbs,
    private readonly tape: VerbsTape,
  ) {}

  private async taped<T>(call: string, run: () => Promise<T>): Promise<T> {
    try {
      const result = await run();
      const values = hostValues(call, result);
      this.tape.add(values === undefined ? { call } : { call, ok: encode(values) });
      return result;
    } catch (e) {
      this.tape.add(errorEntry(call, e));
      throw e;
    }
  }

  listDevices(): hv.DeviceInfo[] {
    return this.inner.listDevices();
  }
  openDevice(name: string, options?: hv.OpenDeviceOptions): Promise<hv.DeviceHandle> {
    return this.taped('openDevice', () => this.inner.openDevice(name, options));
  }
  closeDevice(device: hv.DeviceHandle): Promise<void> {
    return this.taped('closeDevice', () => this.inner.closeDevice(device));
  }
  queryDevice(device: hv.DeviceHandle): Promise<hv.DeviceAttr> {
    return this.taped('queryDevice', () => this.inner.queryDevice(device));
  }
  queryPort(device: hv.DeviceHandle, port: number): Promise<hv.PortAttr> {
    return this.taped('queryPort', () => this.inner.queryPort(device, port));
  }
  queryGidTable(device: hv.DeviceHandle): Promise<hv.GidEntry[]> {
    return this.taped('queryGidTable', () => this.inner.queryGidTable(device));
  }
  allocPd(device: hv.DeviceHandle): Promise<hv.PdHandle> {
    return this.taped('allocPd', () => this.inner.allocPd(device));
  }
  deallocPd(pd: hv.PdHandle): Promise<void> {
    return this.taped('deallocPd', () => this.inner.deallocPd(pd));
  }
  createCq(device: hv.DeviceHandle, cqe: number, options?: hv.CreateCqOptions): Promise<hv.CqHandle> {
    return this.taped('createCq', () => this.inner.createCq(device, cqe, options));
  }
  destroyCq(cq: hv.CqHandle): Promise<void> {
    return this.taped('destroyCq', () => this.inner.destroyCq(cq));
  }
  reqNotifyCq(cq: hv.CqHandle, solicitedOnly: boolean): void {
    this.inner.reqNotifyCq(cq, solicitedOnly);
  }
  pollCq(cq: hv.CqHandle, out: WcBuffer, max?: number): number {
    return this.inner.pollCq(cq, out, max);
  }
  createQp(pd: hv.PdHandle, init: hv.QpInitAttr): Promise<hv.QpHandle> {
    return this.taped('createQp', () => this.inner.createQp(pd, init));
  }
  modifyQp(qp: hv.QpHandle, attr: hv.QpAttr): Promise<void> {
    return this.taped('modifyQp', () => this.inner.modifyQp(qp, attr));
  }
  queryQp(qp: hv.QpHandle): Promise<hv.QpQueryResult> {
    return this.taped('queryQp', () => this.inner.queryQp(qp));
  }
  destroyQp(qp: hv.QpHandle): Promise<void> {
    return this.taped('destroyQp', () => this.inner.destroyQp(qp));
  }
  regMr(pd: hv.PdHandle, memory: ArrayBuffer, options: hv.RegMrOptions): Promise<hv.MrHandle> {
    return this.taped('regMr', () => this.inner.regMr(pd, memory, options));
  }
  deregMr(mr: hv.MrHandle): Promise<void> {
    return this.taped('deregMr', () => this.inner.deregMr(mr));
  }
  createAh(pd: hv.PdHandle, attr: hv.AhAttr): Promise<hv.AhHandle> {
    return this.taped('createAh', () => this.inner.createAh(pd, attr));
  }
  destroyAh(ah: hv.AhHandle): Promise<void> {
    return this.taped('destroyAh', () => this.inner.destroyAh(ah));
  }
  hostQueueFormat(device: hv.DeviceHandle): number {
    const f = this.inner.hostQueueFormat(device);
    this.tape.add({ call: 'hostQueueFormat', ok: f });
    return f;
  }
  createMappedCq(device: hv.DeviceHandle, cqe: number, options?: hv.CreateCqOptions): Promise<hv.MappedCqHandle> {
    return this.taped('createMappedCq', () => this.inner.createMappedCq(device, cqe, options));
  }
  createMappedQp(pd: hv.PdHandle, init: hv.QpInitAttr): Promise<hv.MappedQpHandle> {
    return this.taped('createMappedQp', () => this.inner.createMappedQp(pd, init));
  }
  createDoorbellEngine(device: hv.DeviceHandle, options: hv.DoorbellEngineOptions): Promise<hv.DoorbellEngine> {
    return this.inner.createDoorbellEngine(device, options);
  }
  postSend(qp: hv.QpHandle, wrs: SendWrList): void {
    this.inner.postSend(qp, wrs);
  }
  postRecv(qp: hv.QpHandle, wrs: RecvWrList): void {
    this.inner.postRecv(qp, wrs);
  }
}

/**
 * HostVerbs for a replay: every call runs on `inner` (the test double), and the answer-bearing ones answer what the
 * tape recorded. A call the tape does not have, or whose recorded outcome the double cannot follow (the host failed
 * where the double succeeded is followed: the double's object is released; the reverse is not), is noted in
 * `mismatches` and answered by the double.
 */
export class ReplayingVerbs implements hv.HostVerbs {
  private readonly queues = new Map<string, TapeEntry[]>();
  /** Where the replay could not follow the tape. */
  readonly mismatches: string[] = [];

  constructor(
    private readonly inner: hv.HostVerbs,
    tape: TapeDump,
  ) {
    for (const e of tape.entries) {
      const q = this.queues.get(e.call);
      if (q === undefined) this.queues.set(e.call, [e]);
      else q.push(e);
    }
    if (tape.dropped > 0) this.mismatches.push(`the tape dropped ${tape.dropped} host answers past ${MAX_TAPE_ENTRIES}`);
  }

  private following = true;

  /**
   * Stops following the tape: later calls are the double's alone (the replay's own teardown, which the recording
   * may not hold: a recording is written before its backend closes the device).
   */
  stopFollowing(): void {
    this.following = false;
  }

  private next(call: string): TapeEntry | undefined {
    if (!this.following) return undefined;
    const e = this.queues.get(call)?.shift();
    if (e === undefined) this.mismatches.push(`${call}: no recorded host answer left; the double answered`);
    return e;
  }

  private async replayed<T>(call: string, run: () => Promise<T>, overlay: (result: T, values: unknown) => T, undo?: (result: T) => Promise<void>): Promise<T> {
    const rec = this.next(call);
    let result: T;
    try {
      result = await run();
    } catch (e) {
      if (rec !== undefined && rec.error === undefined) this.mismatches.push(`${call}: the host succeeded, the double failed (${(e as Error).message})`);
      throw e;
    }
    if (rec === undefined) return result;
    if (rec.error !== undefined) {
      await undo?.(result).catch(() => undefined);
      throw new ReplayedVerbsError(rec.error);
    }
    return rec.ok === undefined ? result : overlay(result, decode(rec.ok));
  }

  listDevices(): hv.DeviceInfo[] {
    return this.inner.listDevices();
  }
  openDevice(name: string, options?: hv.OpenDeviceOptions): Promise<hv.DeviceHandle> {
    return this.replayed('openDevice', () => this.inner.openDevice(name, options), (r) => r, (d) => this.inner.closeDevice(d));
  }
  closeDevice(device: hv.DeviceHandle): Promise<void> {
    return this.replayed('closeDevice', () => this.inner.closeDevice(device), (r) => r);
  }
  queryDevice(device: hv.DeviceHandle): Promise<hv.DeviceAttr> {
    return this.replayed('queryDevice', () => this.inner.queryDevice(device), (_r, v) => v as hv.DeviceAttr);
  }
  queryPort(device: hv.DeviceHandle, port: number): Promise<hv.PortAttr> {
    return this.replayed('queryPort', () => this.inner.queryPort(device, port), (_r, v) => v as hv.PortAttr);
  }
  queryGidTable(device: hv.DeviceHandle): Promise<hv.GidEntry[]> {
    return this.replayed('queryGidTable', () => this.inner.queryGidTable(device), (_r, v) => v as hv.GidEntry[]);
  }
  allocPd(device: hv.DeviceHandle): Promise<hv.PdHandle> {
    return this.replayed('allocPd', () => this.inner.allocPd(device), (r) => r, (pd) => this.inner.deallocPd(pd));
  }
  deallocPd(pd: hv.PdHandle): Promise<void> {
    return this.replayed('deallocPd', () => this.inner.deallocPd(pd), (r) => r);
  }
  createCq(device: hv.DeviceHandle, cqe: number, options?: hv.CreateCqOptions): Promise<hv.CqHandle> {
    return this.replayed('createCq', () => this.inner.createCq(device, cqe, options), (r, v) => Object.freeze({ ...r, ...(v as object) }), (cq) => this.inner.destroyCq(cq));
  }
  destroyCq(cq: hv.CqHandle): Promise<void> {
    return this.replayed('destroyCq', () => this.inner.destroyCq(cq), (r) => r);
  }
  reqNotifyCq(cq: hv.CqHandle, solicitedOnly: boolean): void {
    this.inner.reqNotifyCq(cq, solicitedOnly);
  }
  pollCq(cq: hv.CqHandle, out: WcBuffer, max?: number): number {
    return this.inner.pollCq(cq, out, max);
  }
  createQp(pd: hv.PdHandle, init: hv.QpInitAttr): Promise<hv.QpHandle> {
    return this.replayed('createQp', () => this.inner.createQp(pd, init), (r, v) => Object.freeze({ ...r, ...(v as object) }), (qp) => this.inner.destroyQp(qp));
  }
  modifyQp(qp: hv.QpHandle, attr: hv.QpAttr): Promise<void> {
    return this.replayed('modifyQp', () => this.inner.modifyQp(qp, attr), (r) => r);
  }
  queryQp(qp: hv.QpHandle): Promise<hv.QpQueryResult> {
    return this.replayed('queryQp', () => this.inner.queryQp(qp), (_r, v) => v as hv.QpQueryResult);
  }
  destroyQp(qp: hv.QpHandle): Promise<void> {
    return this.replayed('destroyQp', () => this.inner.destroyQp(qp), (r) => r);
  }
  regMr(pd: hv.PdHandle, memory: ArrayBuffer, options: hv.RegMrOptions): Promise<hv.MrHandle> {
    return this.replayed('regMr', () => this.inner.regMr(pd, memory, options), (r, v) => Object.freeze({ ...r, ...(v as object) }), (mr) => this.inner.deregMr(mr));
  }
  deregMr(mr: hv.MrHandle): Promise<void> {
    return this.replayed('deregMr', () => this.inner.deregMr(mr), (r) => r);
  }
  createAh(pd: hv.PdHandle, attr: hv.AhAttr): Promise<hv.AhHandle> {
    return this.replayed('createAh', () => this.inner.createAh(pd, attr), (r) => r, (ah) => this.inner.destroyAh(ah));
  }
  destroyAh(ah: hv.AhHandle): Promise<void> {
    return this.replayed('destroyAh', () => this.inner.destroyAh(ah), (r) => r);
  }
  hostQueueFormat(device: hv.DeviceHandle): number {
    const f = this.inner.hostQueueFormat(device);
    const rec = this.next('hostQueueFormat');
    return rec !== undefined && typeof rec.ok === 'number' ? rec.ok : f;
  }
  createMappedCq(device: hv.DeviceHandle, cqe: number, options?: hv.CreateCqOptions): Promise<hv.MappedCqHandle> {
    return this.replayed(
      'createMappedCq',
      () => this.inner.createMappedCq(device, cqe, options),
      (r, v) => {
        const o = v as { cqe: number; queue: object };
        return Object.freeze({ ...r, cqe: o.cqe, queue: Object.freeze({ ...r.queue, ...o.queue }) });
      },
      (cq) => this.inner.destroyCq(cq),
    );
  }
  createMappedQp(pd: hv.PdHandle, init: hv.QpInitAttr): Promise<hv.MappedQpHandle> {
    return this.replayed(
      'createMappedQp',
      () => this.inner.createMappedQp(pd, init),
      (r, v) => {
        const o = v as { qpNum: number; cap: hv.QpCap; sq: object; rq: object };
        return Object.freeze({ ...r, qpNum: o.qpNum, cap: o.cap, sq: Object.freeze({ ...r.sq, ...o.sq }), rq: Object.freeze({ ...r.rq, ...o.rq }) });
      },
      (qp) => this.inner.destroyQp(qp),
    );
  }
  createDoorbellEngine(device: hv.DeviceHandle, options: hv.DoorbellEngineOptions): Promise<hv.DoorbellEngine> {
    return this.inner.createDoorbellEngine(device, options);
  }
  postSend(qp: hv.QpHandle, wrs: SendWrList): void {
    this.inner.postSend(qp, wrs);
  }
  postRecv(qp: hv.QpHandle, wrs: RecvWrList): void {
    this.inner.postRecv(qp, wrs);
  }
}

/** A recorded host failure, thrown again by the replay (same verb, errno and message). */
class ReplayedVerbsError extends VerbsError {
  constructor(e: NonNullable<TapeEntry['error']>) {
    super(e.verb, e.errno, '', e.badWrIndex);
    this.message = e.message;
  }
}
