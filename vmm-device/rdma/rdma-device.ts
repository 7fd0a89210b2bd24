// The virtio-rdma device model (virtio device ID 42) over HostVerbs, as guest-driver-spec/virtio-rdma.md defines it:
// the control queue (section 7, 8), the event queue (section 9), the doorbell queue and the data path (section 10),
// destruction and reset (section 11) and the VPC duties (section 12) through an AddressResolver.
//
// One instance serves one VM. Guest handles index the tables of this instance only; host handles never leave it.
// Control requests run one at a time (section 7.3) in an async loop; the data path runs synchronously on doorbells
// and host completion events. Every await in a command is followed by a check that no reset happened meanwhile:
// a host object created for a request that a reset overtook is released at once, never left behind.

import {
  AccessFlag,
  ArmCqRequest,
  Command,
  COMMANDS,
  CreateAhRequest,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpRequest,
  CreateQpResponse,
  CtrlRequestHeader,
  CtrlResponseHeader,
  DEFINED_ACCESS_FLAGS,
  DEFINED_QP_ATTR_MASK,
  DestroyQpResponse,
  DeviceConfig,
  DoorbellErrorReason,
  DoorbellRecord,
  DoorbellType,
  Event,
  EventType,
  FeatureBit,
  GidType,
  HandleRequest,
  HandleResponse,
  Limits,
  ModifyQpRequest,
  OPTIONAL_QP_ATTRS,
  PortState,
  QpAttr,
  QpAttrMask,
  QpFatalReason,
  QpState,
  QpType,
  QueryDeviceResponse,
  QueryGidRequest,
  QueryGidResponse,
  QueryPortRequest,
  QueryPortResponse,
  QueryQpResponse,
  RegMrContinueRequest,
  RegMrRequest,
  RegMrResponse,
  REQUIRED_QP_ATTRS,
  ResourceKind,
  Status,
  SUPPORTED_QP_ATTR_MASK,
  checkRequestFraming,
  decodePageList,
  isPowerOfTwo,
  mrPageCount,
  ringPages,
  transitionKey,
  CqErrorReason,
  type CommandSpec,
  type StatusName,
} from '../abi/rdma/index.ts';
import type { GuestMemory } from '../memory/guest-memory.ts';
import { MAX_GUEST_ADDRESS } from '../memory/guest-memory.ts';
import type { Logger } from '../util/log.ts';
import type { ActivationContext, VirtioDeviceModel } from '../virtio/device.ts';
import { VIRTIO_ID_RDMA } from '../abi/virtio.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import { VirtqueueError } from '../virtqueue/errors.ts';
import type { AhAttr, AsyncEvent, DeviceHandle, GidEntry, HostVerbs, PortAttr, QpAttr as HostQpAttr } from '../verbs/host-verbs.ts';
import { VerbsError } from '../verbs/host-verbs.ts';
import { mapAlias, munmap, type AliasPiece } from '../native/sys.ts';
import { GidType as HostGidType } from '../verbs/constants.ts';
import type { AddressResolver, ConnectionAnswer, ConnectionTeardown, VirtualAddress } from './address-resolver.ts';
import { DataPath } from './data-path.ts';
import { HandleTable } from './handle-table.ts';
import { computeConfig, DEFAULT_QUOTAS, OFFERED_FEATURES, type DeviceConfigValue, type DeviceQuotas } from './limits.ts';
import { ArmState, GuestRing, trackQpCall, type Ah, type Cq, type Mr, type Pd, type Qp } from './objects.ts';
import { capToMappings, MappingBudget, withMappingBudget } from './mapping-budget.ts';

/** Queue indexes of this device: control, event, one doorbell queue (no MULTI_DOORBELL). */
export const CONTROLQ = 0;
export const EVENTQ = 1;
export const DOORBELLQ = 2;
export const QUEUE_COUNT = 3;
/** Largest queue size the device accepts (virtio's largest). */
export const MAX_QUEUE_SIZE = 32768;
/** Host port behind the guest's port 1. */
const HOST_PORT = 1;
/** Fixed body of the largest command (CREATE_QP, MODIFY_QP are 64/72 bytes) plus its page list: the most read. */
const LARGEST_FIXED_BODY = 72;
/** How long DESTROY_QP waits for the host to flush a QP's work before completing what is left itself. */
export const FLUSH_WAIT_MS = 2000;
/** Vendor values QUERY_DEVICE reports (chosen by the device, spec 8.3): 0x1af4 is the virtio vendor. */
const VENDOR_ID = 0x1af4;
const VENDOR_PART_ID = VIRTIO_ID_RDMA;
const HW_VER = 1;

export interface RdmaDeviceOptions {
  verbs: HostVerbs;
  /** Host RDMA device name (rxe0). */
  hostDevice: string;
  vmId: string;
  resolver: AddressResolver;
  quotas?: Partial<DeviceQuotas>;
  log: Logger;
  /** [tenancy, issue 16 item 2] The process's mappings the guest may use; default: from /proc when the device opens. */
  mappings?: MappingBudget;
}

/** A command's error: status and detail (section 7.4), thrown by the handlers and answered by the loop. */
class CommandError extends Error {
  constructor(
    readonly statusName: StatusName,
    readonly detail: number,
  ) {
    super(`${statusName} detail ${detail}`);
  }
}

/** A request overtaken by a device reset: answered to nobody. */
class ResetDuringRequest extends Error {}

function fail(statusName: StatusName, detail = 0): never {
  throw new CommandError(statusName, detail);
}

export interface RdmaCounters {
  /** Control requests answered, by command name. */
  commands: Record<string, number>;
  /** Error statuses returned, key `COMMAND:STATUS` (spec 7.8: counted by command and status). */
  errors: Record<string, number>;
  /** Fatal framing errors (NEEDS_RESET). */
  fatal: number;
  doorbellErrors: number;
  eventsWritten: number;
  completionsWritten: number;
  hostErrors: number;
  /** Connections torn down by the policy (spec 12.7): RC QPs moved to ERR, AHs revoked. */
  policyTeardowns: number;
}

export class RdmaDevice implements VirtioDeviceModel {
  readonly deviceId = VIRTIO_ID_RDMA;
  readonly queueCount = QUEUE_COUNT;
  readonly deviceFeatures = OFFERED_FEATURES;
  readonly configSize = DeviceConfig.size;

  readonly verbs: HostVerbs;
  readonly mappings: MappingBudget;
  readonly vmId: string;
  readonly resolver: AddressResolver;
  readonly log: Logger;
  readonly counters: RdmaCounters = {
    commands: {},
    errors: {},
    fatal: 0,
    doorbellErrors: 0,
    eventsWritten: 0,
    completionsWritten: 0,
    hostErrors: 0,
    policyTeardowns: 0,
  };

  private hostDevice!: DeviceHandle;
  private hostGidIndex = 0;
  private hostPort!: PortAttr;
  address!: VirtualAddress;
  config!: DeviceConfigValue;
  private configBytes: Uint8Array = new Uint8Array(DeviceConfig.size);

  // Per-activation state.
  private ctx: ActivationContext | undefined;
  features = 0n;
  /** Bumped by every reset: work started before it must not touch the guest or keep host objects. */
  private generation = 0;
  private broken = false;
  readonly pds: HandleTable<Pd>;
  readonly cqs: HandleTable<Cq>;
  readonly qps: HandleTable<Qp>;
  readonly mrs: HandleTable<Mr>;
  readonly ahs: HandleTable<Ah>;
  /** Registered bytes, pending MRs included (the MR_BYTES quota). */
  mrBytes = 0n;
  private readonly quotas: DeviceQuotas;
  readonly data: DataPath;

  private controlRunning = false;
  /** Host objects being released (destroys, resets): awaited before the next activation serves requests. */
  private readonly releasing = new Set<Promise<unknown>>();
  /** Waiting events, one per (type, handle), in the order they first occurred (section 9.3). */
  private readonly pendingEvents = new Map<string, { type: number; handle: number; detail: number; count: number }>();
  private eventSequence = 0n;
  /** Detaches the policy sink (resolvers with connection tracking only). */
  private detachPolicy: (() => void) | undefined;
  private closed = false;

  private constructor(opts: RdmaDeviceOptions) {
    // [tenancy, issue 16 item 2] Every host QP and CQ is charged to the mapping budget (mapping-budget.ts).
    this.mappings = opts.mappings ?? MappingBudget.fromProc();
    this.verbs = withMappingBudget(opts.verbs, this.mappings);
    this.vmId = opts.vmId;
    this.resolver = opts.resolver;
    this.log = opts.log;
    this.quotas = { ...DEFAULT_QUOTAS, ...opts.quotas };
    // Placeholders until open() computed the limits.
    this.pds = new HandleTable(0);
    this.cqs = new HandleTable(0);
    this.qps = new HandleTable(0);
    this.mrs = new HandleTable(0);
    this.ahs = new HandleTable(0);
    this.data = new DataPath(this);
  }

  /** Opens the host device, picks the host GID, and computes the configuration. */
  static async open(opts: RdmaDeviceOptions): Promise<RdmaDevice> {
    const dev = new RdmaDevice(opts);
    const address = opts.resolver.ownAddress(opts.vmId);
    if (address === undefined) throw new Error(`VM ${opts.vmId} has no virtual address in the address table`);
    dev.address = address;
    dev.hostDevice = await opts.verbs.openDevice(opts.hostDevice, {
      onAsyncEvent: (e) => dev.onHostAsyncEvent(e),
      onEventError: (e) => opts.log.log('error', 'host event watcher failed', { error: e.message }),
    });
    try {
      const attr = await opts.verbs.queryDevice(dev.hostDevice);
      dev.hostPort = await opts.verbs.queryPort(dev.hostDevice, HOST_PORT);
      dev.hostGidIndex = pickHostGidIndex(await opts.verbs.queryGidTable(dev.hostDevice), opts.hostDevice);
      dev.config = capToMappings(computeConfig(attr, dev.hostPort, dev.quotas, address), dev.mappings); // [tenancy]
    } catch (e) {
      await opts.verbs.closeDevice(dev.hostDevice).catch(() => undefined);
      throw e;
    }
    const c = dev.config;
    const tables = dev as unknown as Record<string, HandleTable<unknown>>;
    tables['pds'] = new HandleTable(c.max_pd);
    tables['cqs'] = new HandleTable(c.max_cq);
    tables['qps'] = new HandleTable(c.max_qp);
    tables['mrs'] = new HandleTable(c.max_mr);
    tables['ahs'] = new HandleTable(c.max_ah);
    dev.configBytes = DeviceConfig.encode(c);
    dev.detachPolicy = opts.resolver.attachDevice?.(opts.vmId, (n) => dev.onPolicyTeardown(n));
    return dev;
  }

  /** Releases everything and closes the host device (backend shutdown). */
  async close(): Promise<void> {
    if (this.closed) return; // a second close (shutdown racing a test's teardown) has nothing left to do
    this.closed = true;
    this.detachPolicy?.();
    this.detachPolicy = undefined;
    this.reset();
    await this.settled();
    await this.verbs.closeDevice(this.hostDevice);
  }

  /** Resolves when every host release started so far has finished. */
  async settled(): Promise<void> {
    while (this.releasing.size > 0) await Promise.allSettled([...this.releasing]);
  }

  /** The host GID index programmed into every host QP and AH (the guest never chooses it). */
  get sourceGidIndex(): number {
    return this.hostGidIndex;
  }

  get memory(): GuestMemory {
    return this.ctx!.memory;
  }

  get isActive(): boolean {
    return this.ctx !== undefined && !this.broken;
  }

  hasFeature(bit: number): boolean {
    return (this.features & (1n << BigInt(bit))) !== 0n;
  }

  // ------------------------------------------------------------------------------------------ VirtioDeviceModel

  maxQueueSize(_index: number): number {
    return MAX_QUEUE_SIZE;
  }

  readConfig(offset: number, dest: Uint8Array): void {
    dest.set(this.configBytes.subarray(offset, offset + dest.length));
  }

  writeConfig(_offset: number, _src: Uint8Array): boolean {
    return false; // read-only (spec 5.3)
  }

  /** Spec 4.2: FEATURES_OK only with at least one of RC and UD (for a core that asks its model). */
  acceptFeatures(features: bigint): boolean {
    return (features & ((1n << BigInt(FeatureBit.RC)) | (1n << BigInt(FeatureBit.UD)))) !== 0n;
  }

  activate(ctx: ActivationContext): void {
    if (!this.acceptFeatures(ctx.features)) throw new Error('the driver accepted neither RC nor UD (spec 4.2)');
    for (const i of [CONTROLQ, EVENTQ, DOORBELLQ]) {
      if (ctx.queues[i] === undefined) throw new Error(`queue ${i} is not set up (spec 3.1)`);
    }
    this.ctx = ctx;
    this.features = ctx.features;
    this.broken = false;
    this.eventSequence = 0n;
  }

  queueNotify(index: number): void {
    if (!this.isActive) return;
    if (index === CONTROLQ) void this.runControl();
    else if (index === EVENTQ) this.flushEvents();
    else if (index === DOORBELLQ) this.serveDoorbells();
  }

  /**
   * Device reset, transport disconnect or VMM death: forget every guest object at once (nothing of the guest is
   * touched again) and release the host objects in the background, QPs first (moved to ERR so peers see the end).
   */
  reset(): void {
    this.generation++;
    this.ctx = undefined;
    this.broken = false;
    this.features = 0n;
    this.pendingEvents.clear();
    const qps = [...this.qps.values()];
    const ahs = [...this.ahs.values()];
    const mrs = [...this.mrs.values()];
    const cqs = [...this.cqs.values()];
    const pds = [...this.pds.values()];
    for (const o of [...qps, ...cqs]) o.destroyed = true;
    for (const qp of qps) this.resolver.unregisterQp(this.vmId, qp.host.qpNum);
    for (const ah of ahs) this.resolver.ahDestroyed?.(this.vmId, ah.handle);
    this.qps.clear();
    this.ahs.clear();
    this.mrs.clear();
    this.cqs.clear();
    this.pds.clear();
    this.mrBytes = 0n;
    this.data.reset();
    if (qps.length + ahs.length + mrs.length + cqs.length + pds.length === 0) return;
    this.release(
      (async () => {
        const v = this.verbs;
        // Host calls still running on a QP (a command the reset overtook, a move to ERR) end before its destroy.
        await Promise.allSettled(qps.map((q) => q.hostIdle));
        await Promise.allSettled(qps.map((q) => trackQpCall(q, v.modifyQp(q.host, { qpState: QpState.ERR }))));
        await Promise.allSettled(qps.map(async (q) => {
          await q.hostIdle;
          await v.destroyQp(q.host);
        }));
        await Promise.allSettled(ahs.map((a) => v.destroyAh(a.host)));
        await Promise.allSettled(mrs.filter((m) => m.host !== undefined).map((m) => this.releaseMr(m.host!, m.alias)));
        await Promise.allSettled(cqs.map((c) => v.destroyCq(c.host)));
        const results = await Promise.allSettled(pds.map((p) => v.deallocPd(p.host)));
        const failed = results.filter((r) => r.status === 'rejected').length;
        if (failed > 0) this.log.log('error', 'reset: host refused to release PDs', { failed });
      })(),
    );
  }

  /** Tracks a host release so that settled() (and the next activation) can wait for it. */
  release(p: Promise<unknown>): void {
    const tracked = p.catch((e: unknown) => {
      this.counters.hostErrors++;
      this.log.log('error', 'host release failed', { error: (e as Error).message });
    });
    this.releasing.add(tracked);
    void tracked.finally(() => this.releasing.delete(tracked));
  }

  /** A guest-caused framing error the spec makes fatal (section 7.5): NEEDS_RESET, every host QP to ERR. */
  fatal(queue: number, why: string): void {
    if (this.broken || this.ctx === undefined) return;
    this.counters.fatal++;
    this.broken = true;
    for (const qp of this.qps.values()) this.release(trackQpCall(qp, this.verbs.modifyQp(qp.host, { qpState: QpState.ERR })));
    this.ctx.queueBroken(queue, new Error(why));
  }

  private queue(index: number): DeviceQueue | undefined {
    return this.ctx?.queues[index];
  }

  private popChain(index: number): DescriptorChain | null {
    const q = this.queue(index);
    if (q === undefined) return null;
    const c = q.pop();
    if (c instanceof VirtqueueError) {
      this.broken = true;
      for (const qp of this.qps.values()) this.release(trackQpCall(qp, this.verbs.modifyQp(qp.host, { qpState: QpState.ERR })));
      this.ctx?.queueBroken(index, c);
      return null;
    }
    return c;
  }

  private pushUsed(index: number, chain: DescriptorChain, len: number): void {
    const q = this.queue(index)!;
    q.pushUsed(chain, len);
    if (q.needsNotification()) this.ctx!.interrupt(index);
  }

  // ------------------------------------------------------------------------------------------ control queue

  private async runControl(): Promise<void> {
    if (this.controlRunning) return;
    this.controlRunning = true;
    const gen = this.generation;
    try {
      if (this.releasing.size > 0) await this.settled(); // a previous VM's objects are gone before we serve
      for (;;) {
        if (gen !== this.generation || !this.isActive) return;
        const q = this.queue(CONTROLQ)!;
        q.disableNotifications();
        const chain = this.popChain(CONTROLQ);
        if (chain === null) {
          if (!this.isActive || !q.enableNotifications()) return;
          continue;
        }
        await this.serveControl(chain, gen);
      }
    } finally {
      this.controlRunning = false;
      // A kick that came while this loop was finishing a request of an old activation.
      if (gen !== this.generation && this.isActive) void this.runControl();
    }
  }

  private async serveControl(chain: DescriptorChain, gen: number): Promise<void> {
    const readable = chain.readableBytes;
    if (readable < CtrlRequestHeader.size || chain.writableBytes < CtrlResponseHeader.size) {
      this.fatal(CONTROLQ, `control request with ${readable} readable and ${chain.writableBytes} writable bytes (spec 7.2 check 1)`);
      return;
    }
    const maxRequest = CtrlRequestHeader.size + LARGEST_FIXED_BODY + Limits.PAGE_ADDR_SIZE * this.config.max_pages_per_command;
    const bytes = chain.reader().read(Math.min(readable, maxRequest));
    const header = CtrlRequestHeader.decode(bytes);
    let framing = checkRequestFraming(bytes.subarray(0, Math.min(bytes.length, CtrlRequestHeader.size + header.length)), chain.writableBytes, this.config.max_pages_per_command);
    if (framing.kind === 'status' && framing.statusName === 'INVALID_LENGTH' && framing.detail === 0 && readable > bytes.length) {
      // The request is longer than anything valid: read no further. Its page count decides between check 4's
      // INVALID_ARGUMENT and INVALID_LENGTH exactly as if the whole request had been read.
      framing = this.frameOversized(bytes, header, readable, chain.writableBytes);
    }
    if (framing.kind === 'fatal') {
      this.fatal(CONTROLQ, framing.reason);
      return;
    }
    const name = COMMANDS.get(header.command)?.name ?? `0x${header.command.toString(16)}`;
    this.counters.commands[name] = (this.counters.commands[name] ?? 0) + 1;
    let status: StatusName = 'OK';
    let detail = 0;
    let body: Uint8Array = new Uint8Array(0);
    if (framing.kind === 'status') {
      status = framing.statusName;
      detail = framing.detail;
    } else {
      try {
        body = await this.execute(framing.spec, framing.body);
      } catch (e) {
        if (e instanceof ResetDuringRequest || gen !== this.generation) return;
        if (e instanceof CommandError) {
          status = e.statusName;
          detail = e.detail;
        } else {
          status = 'DEVICE_ERROR';
          detail = 0;
          this.counters.hostErrors++;
          this.log.log('error', 'control request failed inside the device', { command: name, error: (e as Error).message });
        }
      }
    }
    if (gen !== this.generation || !this.isActive) return; // reset meanwhile: write nothing into guest memory
    if (status !== 'OK') {
      const key = `${name}:${status}`;
      this.counters.errors[key] = (this.counters.errors[key] ?? 0) + 1;
      this.log.log('debug', 'control request refused', { command: name, status, detail });
      body = new Uint8Array(0);
    }
    const out = new Uint8Array(CtrlResponseHeader.size + body.length);
    CtrlResponseHeader.encode({ status: Status[status], detail, tag: header.tag }, out, 0);
    out.set(body, CtrlResponseHeader.size);
    chain.writer().write(out);
    this.pushUsed(CONTROLQ, chain, out.length);
  }

  private frameOversized(
    bytes: Uint8Array,
    header: { command: number; length: number; tag: bigint },
    readable: number,
    writable: number,
  ): ReturnType<typeof checkRequestFraming> {
    const spec = COMMANDS.get(header.command)!;
    const base = { kind: 'status' as const, header };
    if (header.length > readable - CtrlRequestHeader.size) return { ...base, status: Status.INVALID_LENGTH, statusName: 'INVALID_LENGTH', detail: 0 };
    // Frame the fixed body alone, with the length the guest claimed: the checks then agree with the full request.
    const fixed = bytes.slice(0, CtrlRequestHeader.size + spec.request.size);
    CtrlRequestHeader.encode({ ...header, length: spec.request.size }, fixed, 0);
    const r = checkRequestFraming(fixed, writable, this.config.max_pages_per_command);
    if (r.kind === 'status' && r.statusName === 'INVALID_ARGUMENT') return r;
    return { ...base, status: Status.INVALID_LENGTH, statusName: 'INVALID_LENGTH', detail: 0 };
  }

  private async execute(spec: CommandSpec, body: Uint8Array): Promise<Uint8Array> {
    switch (spec.code) {
      case Command.QUERY_DEVICE:
        return this.queryDevice();
      case Command.QUERY_PORT:
        return this.queryPort(body);
      case Command.QUERY_GID:
        return this.queryGid(body);
      case Command.CREATE_PD:
        return this.createPd();
      case Command.DESTROY_PD:
        return this.destroyPd(body);
      case Command.CREATE_CQ:
        return this.createCq(body);
      case Command.DESTROY_CQ:
        return this.destroyCq(body);
      case Command.ARM_CQ:
        return this.armCq(body);
      case Command.CREATE_QP:
        return this.createQp(body);
      case Command.MODIFY_QP:
        return this.modifyQp(body);
      case Command.QUERY_QP:
        return this.queryQp(body);
      case Command.DESTROY_QP:
        return this.destroyQp(body);
      case Command.REG_MR:
        return this.regMr(body);
      case Command.REG_MR_CONTINUE:
        return this.regMrContinue(body);
      case Command.DEREG_MR:
        return this.deregMr(body);
      case Command.CREATE_AH:
        return this.createAh(body);
      case Command.DESTROY_AH:
        return this.destroyAh(body);
    }
    return fail('INVALID_COMMAND');
  }

  /** Throws ResetDuringRequest (after releasing `undo`) when a reset happened during an await. */
  private checkGeneration(gen: number, undo?: () => Promise<unknown>): void {
    if (gen === this.generation) return;
    if (undo !== undefined) this.release(undo());
    throw new ResetDuringRequest();
  }

  private queryDevice(): Uint8Array {
    const c = this.config;
    return QueryDeviceResponse.encode({
      node_guid: c.node_guid,
      max_mr_size: c.max_mr_size,
      page_size_mask: c.page_size_mask,
      vendor_id: VENDOR_ID,
      vendor_part_id: VENDOR_PART_ID,
      hw_ver: HW_VER,
      max_qp: c.max_qp,
      max_qp_wr: c.max_qp_wr,
      max_send_sge: c.max_send_sge,
      max_recv_sge: c.max_recv_sge,
      max_cq: c.max_cq,
      max_cqe: c.max_cqe,
      max_mr: c.max_mr,
      max_pd: c.max_pd,
      max_ah: c.max_ah,
      max_qp_rd_atom: c.max_qp_rd_atom,
      max_qp_init_rd_atom: c.max_qp_init_rd_atom,
      max_inline_data: c.max_inline_data,
      max_mr_pages: c.max_mr_pages,
      atomic_cap: c.atomic_cap,
      phys_port_cnt: 1,
    });
  }

  private queryPort(body: Uint8Array): Uint8Array {
    const r = QueryPortRequest.decode(body);
    if (r.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', QueryPortRequest.offsetOf('port_num'));
    const c = this.config;
    return QueryPortResponse.encode({
      port_cap_flags: 0,
      max_msg_size: c.max_msg_size,
      gid_tbl_len: 1,
      pkey_tbl_len: 1,
      state: c.port_state,
      max_mtu: c.max_mtu,
      active_mtu: c.active_mtu,
      link_layer: c.link_layer,
      active_width: c.active_width,
      active_speed: c.active_speed,
      phys_state: c.port_state === PortState.ACTIVE ? 5 : 3,
    });
  }

  private queryGid(body: Uint8Array): Uint8Array {
    const r = QueryGidRequest.decode(body);
    if (r.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', QueryGidRequest.offsetOf('port_num'));
    if (r.index >= this.config.gid_tbl_len) fail('INVALID_ARGUMENT', QueryGidRequest.offsetOf('index'));
    return QueryGidResponse.encode({ gid: this.config.gid.slice(), gid_type: GidType.ROCE_V2 });
  }

  private async createPd(): Promise<Uint8Array> {
    if (this.pds.full) fail('NO_RESOURCES', ResourceKind.PD);
    const gen = this.generation;
    const host = await this.hostCall(() => this.verbs.allocPd(this.hostDevice), ResourceKind.PD);
    this.checkGeneration(gen, () => this.verbs.deallocPd(host));
    const handle = this.pds.add({ handle: 0, host, qps: 0, mrs: 0, ahs: 0 });
    this.pds.get(handle)!.handle = handle;
    return HandleResponse.encode({ handle });
  }

  /** Runs a host allocation; its refusal is NO_RESOURCES HOST (the guest's request was valid). */
  private async hostCall<T>(fn: () => Promise<T>, _kind: number): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof VerbsError) {
        this.counters.hostErrors++;
        this.log.log('warn', 'host refused an allocation', { error: e.message });
        fail('NO_RESOURCES', ResourceKind.HOST);
      }
      throw e;
    }
  }

  private async destroyPd(body: Uint8Array): Promise<Uint8Array> {
    const { handle } = HandleRequest.decode(body);
    const pd = this.pds.get(handle);
    if (pd === undefined) fail('INVALID_HANDLE', 0);
    if (pd.qps > 0) fail('BUSY', ResourceKind.QP);
    if (pd.mrs > 0) fail('BUSY', ResourceKind.MR);
    if (pd.ahs > 0) fail('BUSY', ResourceKind.AH);
    this.pds.delete(handle);
    await this.destroyHost(() => this.verbs.deallocPd(pd.host));
    return new Uint8Array(0);
  }

  /** Destroys a host object whose guest handle is already gone: a host refusal is the backend's problem (logged). */
  private async destroyHost(fn: () => Promise<void>): Promise<void> {
    const p = fn();
    this.release(p);
    await p.catch(() => undefined);
  }

  /** Reads and checks a page list (section 8.2): alignment and guest RAM, entry by entry, before any use. */
  private readPages(body: Uint8Array, fixedSize: number, first: number, count: number, pageShift: number, detailBase: number): number[] {
    const entries = decodePageList(body, fixedSize + first * Limits.PAGE_ADDR_SIZE, count);
    const pageSize = 2 ** pageShift;
    const mask = BigInt(pageSize - 1);
    const out: number[] = [];
    entries.forEach((e, i) => {
      const at = detailBase + (first + i) * Limits.PAGE_ADDR_SIZE;
      if ((e & mask) !== 0n) fail('INVALID_ARGUMENT', at);
      if (e + BigInt(pageSize) > BigInt(MAX_GUEST_ADDRESS) || !this.memory.isValidRange(Number(e), pageSize)) fail('OUT_OF_RANGE', at);
      out.push(Number(e));
    });
    return out;
  }

  private pageShiftOk(shift: number): boolean {
    return shift < 64 && (this.config.page_size_mask & (1n << BigInt(shift))) !== 0n;
  }

  /** An index block: 8-byte aligned and inside guest RAM (section 8.7, 8.10). */
  private checkIndexBlock(gpa: bigint, offset: number): number {
    if (gpa % 8n !== 0n) fail('INVALID_ARGUMENT', offset);
    if (gpa + 8n > BigInt(MAX_GUEST_ADDRESS) || !this.memory.isValidRange(Number(gpa), Limits.QUEUE_INDEX_SIZE)) fail('OUT_OF_RANGE', offset);
    return Number(gpa);
  }

  private async createCq(body: Uint8Array): Promise<Uint8Array> {
    const r = CreateCqRequest.decode(body);
    const o = (f: string): number => CreateCqRequest.offsetOf(f);
    if (!isPowerOfTwo(r.cqe_count) || r.cqe_count > this.config.max_cqe) fail('INVALID_ARGUMENT', o('cqe_count'));
    if (!this.pageShiftOk(r.page_shift)) fail('INVALID_ARGUMENT', o('page_shift'));
    if (r.num_pages !== ringPages(r.cqe_count, Limits.CQE_SIZE, r.page_shift)) fail('INVALID_ARGUMENT', o('num_pages'));
    const indexGpa = this.checkIndexBlock(r.index_gpa, o('index_gpa'));
    const pages = this.readPages(body, CreateCqRequest.size, 0, r.num_pages, r.page_shift, CreateCqRequest.size);
    if (this.cqs.full) fail('NO_RESOURCES', ResourceKind.CQ);
    const gen = this.generation;
    let cq: Cq | undefined;
    // Every host completion is a work request of a QP of this CQ, which the device drains at each event; twice the
    // guest depth leaves room for successful unsignaled sends, which take a host entry but no guest one.
    const hostCqe = r.cqe_count * 2;
    const host = await this.hostCall(
      () => this.verbs.createCq(this.hostDevice, hostCqe, { onCompletionEvent: () => cq !== undefined && this.data.onHostCqEvent(cq) }),
      ResourceKind.CQ,
    );
    this.checkGeneration(gen, () => this.verbs.destroyCq(host));
    const ring = new GuestRing(r.cqe_count, Limits.CQE_SIZE, r.page_shift, pages, indexGpa);
    cq = { handle: 0, host, ring, producer: 0, arm: ArmState.DISARMED, error: false, qps: new Set(), destroyed: false };
    cq.handle = this.cqs.add(cq);
    this.data.addCq(cq);
    ring.writeProducer(this.memory, 0);
    try {
      this.verbs.reqNotifyCq(host, false);
    } catch (e) {
      this.log.log('error', 'arming a new host CQ failed', { error: (e as Error).message });
    }
    return CreateCqResponse.encode({ cq_handle: cq.handle, cqe_count: r.cqe_count });
  }

  private async destroyCq(body: Uint8Array): Promise<Uint8Array> {
    const { handle } = HandleRequest.decode(body);
    const cq = this.cqs.get(handle);
    if (cq === undefined) fail('INVALID_HANDLE', 0);
    if (cq.qps.size > 0) fail('BUSY', ResourceKind.QP);
    cq.destroyed = true;
    this.cqs.delete(handle);
    this.data.removeCq(cq);
    this.discardEvents(handle, [EventType.COMPLETION, EventType.CQ_ERROR]);
    await this.destroyHost(() => this.verbs.destroyCq(cq.host));
    return new Uint8Array(0);
  }

  private armCq(body: Uint8Array): Uint8Array {
    const r = ArmCqRequest.decode(body);
    const cq = this.cqs.get(r.cq_handle);
    if (cq === undefined) fail('INVALID_HANDLE', 0);
    if (r.solicited_only > 1) fail('INVALID_ARGUMENT', ArmCqRequest.offsetOf('solicited_only'));
    if (cq.error) fail('WRONG_STATE', 0);
    this.data.arm(cq, r.solicited_only === 1);
    return new Uint8Array(0);
  }

  private async createQp(body: Uint8Array): Promise<Uint8Array> {
    const r = CreateQpRequest.decode(body);
    const o = (f: string): number => CreateQpRequest.offsetOf(f);
    const c = this.config;
    if (r.qp_type !== QpType.RC && r.qp_type !== QpType.UD) fail('INVALID_ARGUMENT', o('qp_type'));
    if (!this.hasFeature(r.qp_type === QpType.RC ? FeatureBit.RC : FeatureBit.UD)) fail('NOT_SUPPORTED', o('qp_type'));
    const pd = this.pds.get(r.pd_handle);
    if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
    const sendCq = this.cqs.get(r.send_cq_handle);
    if (sendCq === undefined) fail('INVALID_HANDLE', o('send_cq_handle'));
    const recvCq = this.cqs.get(r.recv_cq_handle);
    if (recvCq === undefined) fail('INVALID_HANDLE', o('recv_cq_handle'));
    if (sendCq.error) fail('WRONG_STATE', o('send_cq_handle'));
    if (recvCq.error) fail('WRONG_STATE', o('recv_cq_handle'));
    if (r.sq_sig_all > 1) fail('INVALID_ARGUMENT', o('sq_sig_all'));
    if (!isPowerOfTwo(r.max_send_wr) || r.max_send_wr > c.max_qp_wr) fail('INVALID_ARGUMENT', o('max_send_wr'));
    if (!isPowerOfTwo(r.max_recv_wr) || r.max_recv_wr > c.max_qp_wr) fail('INVALID_ARGUMENT', o('max_recv_wr'));
    if (r.max_send_sge > c.max_send_sge) fail('INVALID_ARGUMENT', o('max_send_sge'));
    if (r.max_recv_sge > c.max_recv_sge) fail('INVALID_ARGUMENT', o('max_recv_sge'));
    if (r.max_inline_data > c.max_inline_data) fail('INVALID_ARGUMENT', o('max_inline_data'));
    if (!this.pageShiftOk(r.sq_page_shift)) fail('INVALID_ARGUMENT', o('sq_page_shift'));
    if (!this.pageShiftOk(r.rq_page_shift)) fail('INVALID_ARGUMENT', o('rq_page_shift'));
    if (r.sq_num_pages !== ringPages(r.max_send_wr, Limits.SQ_WQE_SIZE, r.sq_page_shift)) fail('INVALID_ARGUMENT', o('sq_num_pages'));
    if (r.rq_num_pages !== ringPages(r.max_recv_wr, Limits.RQ_WQE_SIZE, r.rq_page_shift)) fail('INVALID_ARGUMENT', o('rq_num_pages'));
    const sqIndex = this.checkIndexBlock(r.sq_index_gpa, o('sq_index_gpa'));
    const rqIndex = this.checkIndexBlock(r.rq_index_gpa, o('rq_index_gpa'));
    const base = CreateQpRequest.size;
    const sqPages = this.readPages(body, base, 0, r.sq_num_pages, r.sq_page_shift, base);
    const rqPages = this.readPages(body, base, r.sq_num_pages, r.rq_num_pages, r.rq_page_shift, base);
    if (this.qps.full) fail('NO_RESOURCES', ResourceKind.QP);
    const gen = this.generation;
    const host = await this.hostCall(
      () =>
        this.verbs.createQp(pd.host, {
          qpType: r.qp_type,
          sendCq: sendCq.host,
          recvCq: recvCq.host,
          // Every host send is signaled (the device tracks each one); the guest's sq_sig_all decides its CQEs.
          sqSigAll: false,
          maxSendWr: r.max_send_wr,
          maxRecvWr: r.max_recv_wr,
          maxSendSge: Math.max(1, r.max_send_sge),
          maxRecvSge: Math.max(1, r.max_recv_sge),
          maxInlineData: 0,
        }),
      ResourceKind.QP,
    );
    this.checkGeneration(gen, () => this.verbs.destroyQp(host));
    if (sendCq.destroyed || recvCq.destroyed || this.pds.get(pd.handle) !== pd) {
      // Cannot happen (requests run one at a time), but a QP must never outlive its CQs.
      this.release(this.verbs.destroyQp(host));
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
    qp.handle = this.qps.add(qp);
    pd.qps++;
    sendCq.qps.add(qp);
    recvCq.qps.add(qp);
    this.data.addQp(qp);
    this.resolver.registerQp(this.vmId, host.qpNum);
    qp.sq.ring.writeConsumer(this.memory, 0);
    qp.rq.ring.writeConsumer(this.memory, 0);
    return CreateQpResponse.encode({
      qp_handle: qp.handle,
      qp_num: host.qpNum,
      max_send_wr: r.max_send_wr,
      max_recv_wr: r.max_recv_wr,
      max_send_sge: r.max_send_sge,
      max_recv_sge: r.max_recv_sge,
      max_inline_data: r.max_inline_data,
    });
  }

  private async modifyQp(body: Uint8Array): Promise<Uint8Array> {
    const r = ModifyQpRequest.decode(body);
    const a = QpAttr.decode(r.attr);
    const at = (f: string): number => ModifyQpRequest.offsetOf('attr') + QpAttr.offsetOf(f);
    const MASK = ModifyQpRequest.offsetOf('attr_mask');
    const qp = this.qps.get(r.qp_handle);
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
    const c = this.config;
    const host: HostQpAttr = { qpState: to };
    if (has(QpAttrMask.ACCESS_FLAGS)) {
      if ((a.qp_access_flags & ~DEFINED_ACCESS_FLAGS) !== 0) fail('INVALID_ARGUMENT', at('qp_access_flags'));
      if ((a.qp_access_flags & AccessFlag.REMOTE_ATOMIC) !== 0 && !this.hasFeature(FeatureBit.ATOMIC)) fail('NOT_SUPPORTED', at('qp_access_flags'));
      host.qpAccessFlags = a.qp_access_flags;
    }
    if (has(QpAttrMask.QKEY)) {
      if ((a.qkey & Limits.QKEY_CONTROLLED_BIT) !== 0) fail('INVALID_ARGUMENT', at('qkey'));
      host.qkey = this.address.qkey; // the VPC's Q_Key, never the guest's (spec 12.4)
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
      const res = this.resolver.resolve(this.vmId, a.dgid, qp.qpType);
      if (res.kind === 'unreachable') fail('DESTINATION_UNREACHABLE', at('dgid'));
      if (res.kind === 'refused') fail('REFUSED_BY_POLICY', res.rule);
      host.ahAttr = {
        portNum: HOST_PORT,
        sl: a.sl,
        grh: {
          dgid: res.hostGid,
          sgidIndex: this.hostGidIndex,
          hopLimit: a.hop_limit,
          flowLabel: a.flow_label,
          trafficClass: res.trafficClass ?? this.address.trafficClass ?? a.traffic_class,
        },
      };
    }
    // [tenancy, issue 12 item 1] The guest's dest_qp_num must be a QP of the VM its dgid resolved to, unconnected
    // or connected to this QP (spec 12.3): checked in the QPN registry before the host QP moves to RTR.
    if (to === QpState.RTR && qp.qpType === QpType.RC && has(QpAttrMask.AV) && has(QpAttrMask.DEST_QPN) && this.resolver.checkPeerQp !== undefined) {
      const asked = this.generation;
      const peer = await this.resolver.checkPeerQp(this.vmId, { qpn: qp.host.qpNum, peerGid: a.dgid.slice(), peerQpn: a.dest_qp_num });
      this.checkGeneration(asked);
      if (!peer.ok) fail('DESTINATION_UNREACHABLE', at('dest_qp_num'));
    }
    const gen = this.generation;
    const from = qp.state;
    if (to === QpState.ERR) {
      // The state changes at once for the data path; the flush follows the host's completions (section 11.1).
      await this.data.moveToError(qp);
      this.checkGeneration(gen);
    } else {
      try {
        await trackQpCall(qp, this.verbs.modifyQp(qp.host, host));
      } catch (e) {
        this.checkGeneration(gen);
        if (e instanceof VerbsError) {
          this.counters.hostErrors++;
          this.log.log('warn', 'host refused a QP transition', { qp: qp.handle, from, to, error: e.message });
          fail('DEVICE_ERROR');
        }
        throw e;
      }
      this.checkGeneration(gen);
      if (qp.destroyed) fail('INVALID_HANDLE', 0);
      qp.state = to;
      if (to === QpState.RESET || from === QpState.RESET) this.data.discardRings(qp);
    }
    // The guest's own view (QUERY_QP): what it asked for, virtual dgid and requested traffic class included.
    for (const f of QpAttr.fields) {
      if (f.type === 'reserved' || f.name === 'qp_state') continue;
      if (has(fieldMask(f.name))) qp.attr[f.name] = (a as Record<string, number | Uint8Array>)[f.name]!;
    }
    if (to === QpState.RTS) this.data.takeSends(qp);
    if (to === QpState.INIT || to === QpState.RTR || to === QpState.RTS) this.data.takeRecvs(qp);
    if (to === QpState.RTR && qp.qpType === QpType.RC && has(QpAttrMask.AV) && this.resolver.qpConnected !== undefined) {
      // The transition succeeded; a policy change that came in since the resolution ends the connection now.
      const answer = this.resolver.qpConnected(this.vmId, { qpn: qp.host.qpNum, guestHandle: qp.handle, qpType: qp.qpType, peerGid: a.dgid.slice(), peerQpn: a.dest_qp_num });
      if (!answer.ok) await this.policyTeardownQp(qp, answer.teardown.detail);
    }
    return new Uint8Array(0);
  }

  private queryQp(body: Uint8Array): Uint8Array {
    const { handle } = HandleRequest.decode(body);
    const qp = this.qps.get(handle);
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

  private async destroyQp(body: Uint8Array): Promise<Uint8Array> {
    const { handle } = HandleRequest.decode(body);
    const qp = this.qps.get(handle);
    if (qp === undefined) fail('INVALID_HANDLE', 0);
    const gen = this.generation;
    const counts = await this.data.flushForDestroy(qp);
    this.checkGeneration(gen);
    qp.destroyed = true;
    this.qps.delete(handle);
    qp.pd.qps--;
    qp.sendCq.qps.delete(qp);
    qp.recvCq.qps.delete(qp);
    this.data.removeQp(qp);
    this.resolver.unregisterQp(this.vmId, qp.host.qpNum);
    this.discardEvents(handle, [EventType.QP_FATAL, EventType.QP_REQ_ERR, EventType.QP_ACCESS_ERR, EventType.COMM_EST, EventType.QP_POLICY_TEARDOWN, EventType.DOORBELL_ERROR]);
    await this.destroyHost(async () => {
      await qp.hostIdle; // a move to ERR still running would make the host refuse the destroy (EBUSY)
      await this.verbs.destroyQp(qp.host);
    });
    return DestroyQpResponse.encode({ sq_flushed: counts.sq, rq_flushed: counts.rq, flush_dropped: counts.dropped });
  }

  private async regMr(body: Uint8Array): Promise<Uint8Array> {
    const r = RegMrRequest.decode(body);
    const o = (f: string): number => RegMrRequest.offsetOf(f);
    const pd = this.pds.get(r.pd_handle);
    if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
    const acc = r.access_flags;
    if ((acc & ~DEFINED_ACCESS_FLAGS) !== 0) fail('INVALID_ARGUMENT', o('access_flags'));
    if ((acc & (AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_ATOMIC)) !== 0 && (acc & AccessFlag.LOCAL_WRITE) === 0) fail('INVALID_ARGUMENT', o('access_flags'));
    if ((acc & AccessFlag.REMOTE_ATOMIC) !== 0 && !this.hasFeature(FeatureBit.ATOMIC)) fail('NOT_SUPPORTED', o('access_flags'));
    if (r.length === 0n || r.length > this.config.max_mr_size) fail('INVALID_ARGUMENT', o('length'));
    if (r.iova + r.length > 1n << 64n) fail('OUT_OF_RANGE', o('iova'));
    if (!this.pageShiftOk(r.page_shift)) fail('INVALID_ARGUMENT', o('page_shift'));
    const need = mrPageCount(r.iova, r.length, r.page_shift);
    if (BigInt(r.total_pages) !== need || r.total_pages > this.config.max_mr_pages) fail('INVALID_ARGUMENT', o('total_pages'));
    if (r.num_pages === 0 || r.num_pages > r.total_pages) fail('INVALID_ARGUMENT', o('num_pages'));
    if (this.mrs.full) fail('NO_RESOURCES', ResourceKind.MR);
    if (this.mrBytes + r.length > this.quotas.maxMrBytes) fail('NO_RESOURCES', ResourceKind.MR_BYTES);
    const pages = this.readPages(body, RegMrRequest.size, 0, r.num_pages, r.page_shift, RegMrRequest.size);
    const mr: Mr = { handle: 0, pd, access: acc, iova: r.iova, length: r.length, pageShift: r.page_shift, totalPages: r.total_pages, pages: [] };
    this.appendMrPages(mr, pages, RegMrRequest.size);
    if (mr.pages.length === mr.totalPages) await this.registerMr(mr);
    // Only now is anything kept: a failed REG_MR leaves no pending MR behind (spec 7.8).
    mr.handle = this.mrs.add(mr);
    pd.mrs++;
    this.mrBytes += mr.length;
    return this.mrResponse(mr);
  }

  private async regMrContinue(body: Uint8Array): Promise<Uint8Array> {
    const r = RegMrContinueRequest.decode(body);
    const o = (f: string): number => RegMrContinueRequest.offsetOf(f);
    const mr = this.mrs.get(r.mr_handle);
    if (mr === undefined) fail('INVALID_HANDLE', 0);
    if (mr.host !== undefined) fail('WRONG_STATE', 0);
    if (r.start_index !== mr.pages.length) fail('INVALID_ARGUMENT', o('start_index'));
    if (r.num_pages === 0 || r.start_index + r.num_pages > mr.totalPages) fail('INVALID_ARGUMENT', o('num_pages'));
    const pages = this.readPages(body, RegMrContinueRequest.size, 0, r.num_pages, mr.pageShift, RegMrContinueRequest.size);
    const before = mr.pages.length;
    this.appendMrPages(mr, pages, RegMrContinueRequest.size);
    if (mr.pages.length === mr.totalPages) {
      try {
        await this.registerMr(mr);
      } catch (e) {
        mr.pages.length = before; // a failed REG_MR_CONTINUE adds no page (spec 8.14)
        throw e;
      }
    }
    return this.mrResponse(mr);
  }

  /**
   * Adds checked pages to an MR. Each page must lie inside one region of guest RAM (a page across two regions is
   * NOT_SUPPORTED at its entry); where the pages sit relative to each other does not matter (registerMr).
   */
  private appendMrPages(mr: Mr, pages: number[], detailBase: number): void {
    const pageSize = 2 ** mr.pageShift;
    pages.forEach((gpa, i) => {
      const slice = this.memory.translate(gpa, pageSize);
      if (slice === undefined || slice.length < pageSize) fail('NOT_SUPPORTED', detailBase + i * Limits.PAGE_ADDR_SIZE);
    });
    mr.pages.push(...pages);
  }

  /**
   * The host registers one contiguous range of this process's memory with the guest's iova. The MR's pages are
   * runs of contiguous bytes in the backend's mapping of guest RAM: one run is registered where it is; several
   * (a guest's scattered pages) are first mapped back to back into one new range (mapAlias: the same pages, no
   * copy), which the MR keeps until its host registration is gone. Guest RAM that is not a shared mapping
   * cannot be aliased: the registration is then refused as the host's (NO_RESOURCES HOST, spec 8.14).
   */
  private backingOf(mr: Mr): { buffer: ArrayBuffer; offset: number; alias?: ArrayBuffer } {
    const pageSize = 2 ** mr.pageShift;
    const runs: AliasPiece[] = [];
    for (const gpa of mr.pages) {
      const slice = this.memory.translate(gpa, pageSize)!; // checked when the page arrived
      const pos = slice.region.bufferOffset + slice.offset;
      const last = runs[runs.length - 1];
      if (last !== undefined && last.buffer === slice.region.buffer && last.offset + last.length === pos) last.length += pageSize;
      else runs.push({ buffer: slice.region.buffer, offset: pos, length: pageSize });
    }
    const within = Number(mr.iova % BigInt(pageSize));
    if (runs.length === 1) return { buffer: runs[0]!.buffer, offset: runs[0]!.offset + within };
    try {
      const alias = mapAlias(runs);
      return { buffer: alias, offset: within, alias };
    } catch (e) {
      this.counters.hostErrors++;
      this.log.log('warn', 'scattered MR pages could not be mapped contiguously', { runs: runs.length, error: (e as Error).message });
      fail('NO_RESOURCES', ResourceKind.HOST);
    }
  }

  private async registerMr(mr: Mr): Promise<void> {
    const gen = this.generation;
    const b = this.backingOf(mr);
    let host;
    try {
      host = await this.hostCall(
        () => this.verbs.regMr(mr.pd.host, b.buffer, { offset: b.offset, length: Number(mr.length), access: mr.access, iova: mr.iova }),
        ResourceKind.MR,
      );
    } catch (e) {
      if (b.alias !== undefined) munmap(b.alias);
      throw e;
    }
    const registered = host;
    this.checkGeneration(gen, () => this.releaseMr(registered, b.alias));
    mr.host = host;
    mr.backing = { buffer: b.buffer, offset: b.offset };
    if (b.alias !== undefined) mr.alias = b.alias;
    this.data.addMr(mr);
  }

  /** Deregisters a host MR, then unmaps the contiguous view its registration used, if any. */
  private async releaseMr(host: NonNullable<Mr['host']>, alias: ArrayBuffer | undefined): Promise<void> {
    try {
      await this.verbs.deregMr(host);
    } finally {
      if (alias !== undefined) munmap(alias);
    }
  }

  private mrResponse(mr: Mr): Uint8Array {
    return RegMrResponse.encode({
      mr_handle: mr.handle,
      lkey: mr.host?.lkey ?? 0,
      rkey: mr.host?.rkey ?? 0,
      pages_received: mr.pages.length,
    });
  }

  private async deregMr(body: Uint8Array): Promise<Uint8Array> {
    const { handle } = HandleRequest.decode(body);
    const mr = this.mrs.get(handle);
    if (mr === undefined) fail('INVALID_HANDLE', 0);
    this.mrs.delete(handle);
    mr.pd.mrs--;
    this.mrBytes -= mr.length;
    if (mr.host !== undefined) {
      this.data.removeMr(mr);
      const host = mr.host;
      await this.destroyHost(() => this.releaseMr(host, mr.alias));
    }
    return new Uint8Array(0);
  }

  private async createAh(body: Uint8Array): Promise<Uint8Array> {
    const r = CreateAhRequest.decode(body);
    const o = (f: string): number => CreateAhRequest.offsetOf(f);
    if (!this.hasFeature(FeatureBit.UD)) fail('NOT_SUPPORTED', 0);
    const pd = this.pds.get(r.pd_handle);
    if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
    if (r.flow_label > 0xfffff) fail('INVALID_ARGUMENT', o('flow_label'));
    if (r.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', o('port_num'));
    if (r.sgid_index !== 0) fail('INVALID_ARGUMENT', o('sgid_index'));
    if (r.sl > Limits.SL_MAX) fail('INVALID_ARGUMENT', o('sl'));
    const res = this.resolver.resolve(this.vmId, r.dgid, QpType.UD);
    if (res.kind === 'unreachable') fail('DESTINATION_UNREACHABLE', o('dgid'));
    if (res.kind === 'refused') fail('REFUSED_BY_POLICY', res.rule);
    if (this.ahs.full) fail('NO_RESOURCES', ResourceKind.AH);
    const attr: AhAttr = {
      portNum: HOST_PORT,
      sl: r.sl,
      grh: {
        dgid: res.hostGid,
        sgidIndex: this.hostGidIndex,
        hopLimit: r.hop_limit,
        flowLabel: r.flow_label,
        trafficClass: res.trafficClass ?? this.address.trafficClass ?? r.traffic_class,
      },
    };
    const gen = this.generation;
    const host = await this.hostCall(() => this.verbs.createAh(pd.host, attr), ResourceKind.AH);
    this.checkGeneration(gen, () => this.verbs.destroyAh(host));
    const ah: Ah = { handle: 0, pd, host, dgid: r.dgid };
    ah.handle = this.ahs.add(ah);
    pd.ahs++;
    const answer: ConnectionAnswer | undefined = this.resolver.ahCreated?.(this.vmId, { guestHandle: ah.handle, peerGid: r.dgid.slice() });
    if (answer !== undefined && !answer.ok) this.revokeAh(ah, answer.teardown.detail);
    return HandleResponse.encode({ handle: ah.handle });
  }

  private async destroyAh(body: Uint8Array): Promise<Uint8Array> {
    const { handle } = HandleRequest.decode(body);
    const ah = this.ahs.get(handle);
    if (ah === undefined) fail('INVALID_HANDLE', 0);
    this.ahs.delete(handle);
    ah.pd.ahs--;
    this.resolver.ahDestroyed?.(this.vmId, handle);
    // Sends already handed to the host keep their AH until they complete: release it after the QPs' queues drain.
    await this.destroyHost(() => this.verbs.destroyAh(ah.host));
    return new Uint8Array(0);
  }

  // ------------------------------------------------------------------------------------------ event queue

  /** Queues an event (coalesced per type and handle, section 9.3) and writes what the driver has buffers for. */
  queueEvent(type: number, handle: number, detail: number): void {
    if (this.ctx === undefined) return;
    const key = `${type}:${handle}`;
    const waiting = this.pendingEvents.get(key);
    if (waiting !== undefined) waiting.count = Math.min(waiting.count + 1, 0xffff_ffff);
    else this.pendingEvents.set(key, { type, handle, detail, count: 1 });
    this.flushEvents();
  }

  private discardEvents(handle: number, types: number[]): void {
    for (const t of types) this.pendingEvents.delete(`${t}:${handle}`);
  }

  get waitingEvents(): number {
    return this.pendingEvents.size;
  }

  private flushEvents(): void {
    const q = this.queue(EVENTQ);
    if (q === undefined || !this.isActive) return;
    while (this.pendingEvents.size > 0) {
      const chain = this.popChain(EVENTQ);
      if (chain === null) {
        if (!this.isActive || !q.enableNotifications()) return;
        continue;
      }
      if (chain.readableBytes !== 0 || chain.writableBytes < Limits.EVENT_SIZE) {
        this.fatal(EVENTQ, `event buffer with ${chain.readableBytes} readable and ${chain.writableBytes} writable bytes (spec 7.5 case 3)`);
        return;
      }
      const [key, e] = this.pendingEvents.entries().next().value!;
      this.pendingEvents.delete(key);
      chain.writer().write(Event.encode({ type: e.type, count: e.count, handle: e.handle, detail: e.detail, sequence: this.eventSequence }));
      this.eventSequence++;
      this.counters.eventsWritten++;
      this.pushUsed(EVENTQ, chain, Limits.EVENT_SIZE);
    }
  }

  // ------------------------------------------------------------------------------------------ doorbells

  private serveDoorbells(): void {
    const q = this.queue(DOORBELLQ);
    if (q === undefined) return;
    do {
      q.disableNotifications();
      for (;;) {
        if (!this.isActive) return;
        const chain = this.popChain(DOORBELLQ);
        if (chain === null) break;
        if (chain.writableBytes !== 0) {
          this.fatal(DOORBELLQ, `doorbell buffer with ${chain.writableBytes} writable bytes (spec 7.5 case 4)`);
          return;
        }
        this.serveDoorbellBuffer(chain);
        this.pushUsed(DOORBELLQ, chain, 0);
      }
    } while (this.isActive && q.enableNotifications());
  }

  private serveDoorbellBuffer(chain: DescriptorChain): void {
    const total = Math.floor(chain.readableBytes / Limits.DOORBELL_RECORD_SIZE);
    const n = Math.min(total, Limits.DOORBELL_MAX_RECORDS);
    const bytes = chain.reader().read(n * Limits.DOORBELL_RECORD_SIZE);
    for (let i = 0; i < n; i++) {
      const rec = DoorbellRecord.decode(bytes, i * Limits.DOORBELL_RECORD_SIZE);
      this.serveRecord(rec.handle, rec.type);
    }
    if (chain.readableBytes % Limits.DOORBELL_RECORD_SIZE !== 0) this.doorbellError(0, DoorbellErrorReason.PARTIAL_RECORD);
    if (total > Limits.DOORBELL_MAX_RECORDS) this.doorbellError(0, DoorbellErrorReason.TOO_MANY_RECORDS);
  }

  private serveRecord(handle: number, type: number): void {
    switch (type) {
      case DoorbellType.SQ:
      case DoorbellType.RQ: {
        const qp = this.qps.get(handle);
        if (qp === undefined) return this.doorbellError(handle, DoorbellErrorReason.UNKNOWN_HANDLE);
        if (qp.state === QpState.RESET) return this.doorbellError(handle, DoorbellErrorReason.WRONG_STATE);
        if (type === DoorbellType.SQ) this.data.takeSends(qp);
        else this.data.takeRecvs(qp);
        return;
      }
      case DoorbellType.CQ_ARM_NEXT:
      case DoorbellType.CQ_ARM_SOLICITED: {
        const cq = this.cqs.get(handle);
        if (cq === undefined) return this.doorbellError(handle, DoorbellErrorReason.UNKNOWN_HANDLE);
        if (cq.error) return this.doorbellError(handle, DoorbellErrorReason.WRONG_STATE);
        this.data.arm(cq, type === DoorbellType.CQ_ARM_SOLICITED);
        return;
      }
      default:
        return this.doorbellError(handle, DoorbellErrorReason.UNKNOWN_TYPE);
    }
  }

  private doorbellError(handle: number, reason: number): void {
    this.counters.doorbellErrors++;
    this.queueEvent(EventType.DOORBELL_ERROR, handle, reason);
  }

  // ------------------------------------------------------------------------------------------ VPC hooks

  /**
   * Connection tracking for the VPC work (spec 12.3): every connected QP (one that went to RTR with a destination)
   * for which `decide` returns a PolicyReason is moved to ERR, its work flushed, then QP_POLICY_TEARDOWN is queued.
   * Returns the handles torn down.
   */
  async teardownConnections(decide: (c: { handle: number; qpType: number; dgid: Uint8Array }) => number | undefined): Promise<number[]> {
    const done: number[] = [];
    for (const qp of [...this.qps.values()]) {
      const dgid = qp.attr['dgid'];
      if (qp.destroyed || qp.state === QpState.ERR || !(dgid instanceof Uint8Array)) continue;
      const reason = decide({ handle: qp.handle, qpType: qp.qpType, dgid: dgid.slice() });
      if (reason === undefined) continue;
      await this.policyTeardownQp(qp, reason);
      done.push(qp.handle);
    }
    return done;
  }

  /**
   * The resolver's sink (AddressResolver.attachDevice): called synchronously inside a policy change, once per
   * connection of this VM that became illegal. A notice naming an object that no longer exists (destroyed, reset,
   * re-created under the same handle) is ignored.
   */
  private onPolicyTeardown(n: ConnectionTeardown): void {
    if (this.ctx === undefined) return;
    const c = n.connection;
    if (c.kind === 'RC') {
      const qp = this.qps.get(c.guestHandle);
      if (qp === undefined || qp.host.qpNum !== c.local || qp.destroyed || qp.state === QpState.ERR) return;
      void this.policyTeardownQp(qp, n.detail);
    } else {
      const ah = this.ahs.get(c.guestHandle);
      if (ah === undefined || ah.handle !== c.local) return;
      this.revokeAh(ah, n.detail);
    }
  }

  /** Spec 11.4: the QP moves to ERR (its work flushed), then QP_POLICY_TEARDOWN with the PolicyReason. */
  private async policyTeardownQp(qp: Qp, reason: number): Promise<void> {
    const gen = this.generation;
    this.counters.policyTeardowns++;
    await this.data.moveToError(qp); // flush completions first, then the event
    if (gen === this.generation && !qp.destroyed) this.queueEvent(EventType.QP_POLICY_TEARDOWN, qp.handle, reason);
  }

  /** Spec 12.3: later UD sends to an AH whose destination is no longer allowed complete with LOC_QP_OP_ERR. */
  private revokeAh(ah: Ah, reason: number): void {
    if (ah.revoked !== undefined) return;
    ah.revoked = reason;
    this.counters.policyTeardowns++;
  }

  // ------------------------------------------------------------------------------------------ host events

  private onHostAsyncEvent(e: AsyncEvent): void {
    if (this.ctx === undefined) return;
    const qp = e.qp === undefined ? undefined : this.data.qpByHostId(e.qp.id);
    const cq = e.cq === undefined ? undefined : this.data.cqByHostId(e.cq.id);
    switch (e.type) {
      case 'QP_FATAL':
      case 'QP_REQ_ERR':
      case 'QP_ACCESS_ERR':
        if (qp === undefined) return;
        this.data.hostMovedToError(qp);
        this.queueEvent(
          e.type === 'QP_FATAL' ? EventType.QP_FATAL : e.type === 'QP_REQ_ERR' ? EventType.QP_REQ_ERR : EventType.QP_ACCESS_ERR,
          qp.handle,
          e.type === 'QP_FATAL' ? QpFatalReason.HOST_ERROR : 0,
        );
        return;
      case 'COMM_EST':
        if (qp !== undefined) this.queueEvent(EventType.COMM_EST, qp.handle, 0);
        return;
      case 'CQ_ERR':
        if (cq !== undefined) this.data.cqError(cq, CqErrorReason.HOST_ERROR);
        return;
      case 'PORT_ACTIVE':
        this.queueEvent(EventType.PORT_ACTIVE, 0, 1);
        return;
      case 'PORT_ERR':
        this.queueEvent(EventType.PORT_ERR, 0, 1);
        return;
      case 'DEVICE_FATAL':
        for (const q of this.qps.values()) this.data.hostMovedToError(q);
        for (const c of this.cqs.values()) c.error = true;
        this.queueEvent(EventType.DEVICE_FATAL, 0, 0);
        return;
      default:
        this.log.log('debug', 'host async event not forwarded', { type: e.type });
    }
  }
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

/** The host GID the device sends from: the port's RoCE v2 IPv4-mapped entry (the guest never chooses it). */
export function pickHostGidIndex(table: GidEntry[], device: string): number {
  const v2 = table.filter((g) => g.port === HOST_PORT && g.type === HostGidType.ROCE_V2);
  const v4 = v2.find((g) => g.gid.subarray(0, 10).every((b) => b === 0) && g.gid[10] === 0xff && g.gid[11] === 0xff);
  const pick = v4 ?? v2[0];
  if (pick === undefined) {
    throw new Error(`${device} has no RoCE v2 GID on port ${HOST_PORT}: give its netdev an IPv4 address (ip addr add ... dev <netdev>)`);
  }
  return pick.index;
}
