// The virtio-rdma device model (virtio device ID 42) over HostVerbs, as guest-driver-spec/virtio-rdma.md defines it.
// This file is the device core: open/close, the virtio model (config, activation, reset), host async events,
// memory map changes, the VPC hooks, and the guard every entry from the event loop goes through. The control
// commands are a table of handlers by object (commands/), the queues have their own files (control-queue.ts,
// event-queue.ts, doorbells.ts), and the data path sits behind the DataPath interface (relay.ts is version 1's).
//
// One instance serves one VM. Guest handles index the tables of this instance only; host handles never leave it.
// Every await in a command is followed by a check that no reset happened meanwhile: a host object created for a
// request that a reset overtook is released at once, never left behind.

import { CqErrorReason, DeviceConfig, DoorbellMode, EventType, FeatureBit, QpFatalReason, QpState, ResourceKind } from '../abi/rdma/index.ts';
import { VIRTIO_ID_RDMA } from '../abi/virtio.ts';
import type { AliasMapper } from '../memory/alias.ts';
import type { GuestMemory } from '../memory/guest-memory.ts';
import type { Logger } from '../util/log.ts';
import type { ActivationContext, TransportFacts, VirtioDeviceModel } from '../virtio/device.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import { VirtqueueError } from '../virtqueue/errors.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import type { AsyncEvent, DeviceHandle, HostVerbs, PortAttr } from '../verbs/host-verbs.ts';
import { GidType as HostGidType } from '../verbs/constants.ts';
import type { GidEntry } from '../verbs/host-verbs.ts';
import type { AddressResolver, ConnectionTeardown, VirtualAddress } from './address-resolver.ts';
import { HOST_PORT, CommandError, ResetDuringRequest, releaseMr, type CommandContext } from './commands/index.ts';
import { ControlQueue } from './control-queue.ts';
import type { DataPath, DataPathHost } from './data-path.ts';
import { DoorbellQueue } from './doorbells.ts';
import { EventQueue } from './event-queue.ts';
import { HandleTable } from './handle-table.ts';
import { computeConfig, DEFAULT_QUOTAS, offeredFeatures, type DeviceConfigValue, type DeviceQuotas } from './limits.ts';
import { capToMappings, MappingBudget, withMappingBudget } from './mapping-budget.ts';
import { trackQpCall, type Ah, type Cq, type Mr, type Pd, type Qp } from './objects.ts';
import { RelayDataPath } from './relay.ts';
import { recheckObjects } from './memory-map.ts';
import { VerbsError } from '../verbs/host-verbs.ts';
import { MappedDataPath, RoutedDataPath } from './mapped/data-path.ts';
import { MappingManager } from './mapped/manager.ts';
import { planMapping, REGION_SHMID, type MappingMode } from './mapped/plan.ts';
import { HOST_QUEUE_MAPPING_BIT, logPlan, mappingRefusal, qpCounters, resetMapped, ringAllMapped, type QpCounters } from './mapped/device-hooks.ts';

/** Queue indexes of this device: control, event, one doorbell queue (no MULTI_DOORBELL). */
export const CONTROLQ = 0;
export const EVENTQ = 1;
export const DOORBELLQ = 2;
export const QUEUE_COUNT = 3;
/** mapdoorbellq (spec 3, 13.6): queue 2 + N, only with HOST_QUEUE_MAPPING in NOTIFY mode. */
export const MAPDOORBELLQ = 3;
/** Largest queue size the device accepts (virtio's largest). */
export const MAX_QUEUE_SIZE = 32768;
/**
 * How long a reset's release waits for the command it overtook (still in the host) and that command's undo before
 * releasing the parents anyway: a host call that never returns must not hold the release forever. Past it, a PD or
 * CQ the late child still holds is refused (EBUSY) and counted in hostErrors.
 */
export const RESET_INFLIGHT_WAIT_MS = 5000;

export interface RdmaDeviceOptions {
  verbs: HostVerbs;
  /** Host RDMA device name (rxe0). */
  hostDevice: string;
  vmId: string;
  resolver: AddressResolver;
  quotas?: Partial<DeviceQuotas>;
  log: Logger;
  /**
   * Maps scattered guest pages of an MR into one range for the host registration. Over NativeVerbs:
   * nativeAliasMapper (vmm-device/host/alias.ts); over FakeVerbs: FakeAliasMapper.
   */
  aliases: AliasMapper;
  /** The process's memory mappings the guest's objects may use (issue 16); default: read from /proc at open. */
  mappings?: MappingBudget;
  /**
   * Host queue mapping (spec 13): offered when the host has a HostQueueFormat and this is not 'off' (default 'off';
   * the vrdma-backend command defaults to 'polled'). 'notify' adds mapdoorbellq.
   */
  hostQueueMapping?: MappingMode;
  /** max_mapped_queues (default DEFAULT_MAX_MAPPED_QUEUES, mapped/plan.ts). */
  maxMappedQueues?: number;
  /** Bound on one unmap's confirmation (default UNMAP_TIMEOUT_MS); tests shorten it. */
  unmapTimeoutMs?: number;
  /** Closes an fd the device was handed (NOTIFY mode's lent call fd); the model imports nothing from the addon. */
  closeFd?: (fd: number) => void;
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
  /** Memory map changes while active, and the objects each put in error (spec 10.8). */
  memoryChanges: number;
  ringsLost: number;
  mrsLost: number;
  /** Unexpected errors caught at an entry from the event loop (NEEDS_RESET through ctx.deviceFailed). */
  deviceFailures: number;
  /** Host queue mapping (spec 13): maps refused, unmaps not confirmed, queues mapped. */
  mapFailures: number;
  unmapFailures: number;
  queuesMapped: number;
}

export class RdmaDevice implements VirtioDeviceModel, CommandContext {
  readonly deviceId = VIRTIO_ID_RDMA;
  readonly configSize = DeviceConfig.size;
  /** Host queue mapping: present when the device offers HOST_QUEUE_MAPPING (fixed at open). */
  mapping: MappingManager | undefined;
  private readonly mappingOptions: Pick<RdmaDeviceOptions, 'hostQueueMapping' | 'maxMappedQueues' | 'unmapTimeoutMs' | 'closeFd'>;

  get deviceFeatures(): bigint {
    return offeredFeatures(this.config) | (this.mapping !== undefined ? HOST_QUEUE_MAPPING_BIT : 0n);
  }
  get queueCount(): number {
    return this.mapping?.plan.doorbellMode === DoorbellMode.NOTIFY ? QUEUE_COUNT + 1 : QUEUE_COUNT;
  }
  /** Spec 13.13: the one region of the doorbell pages and the mapped queues, declared before the guest starts. */
  get sharedMemoryRegions(): ReadonlyMap<number, bigint> | undefined {
    return this.mapping === undefined ? undefined : new Map([[REGION_SHMID, this.mapping.plan.regionSize]]);
  }

  readonly verbs: HostVerbs;
  readonly mappings: MappingBudget;
  readonly vmId: string;
  readonly resolver: AddressResolver;
  readonly log: Logger;
  readonly aliases: AliasMapper;
  readonly counters: RdmaCounters = {
    commands: {},
    errors: {},
    fatal: 0,
    doorbellErrors: 0,
    eventsWritten: 0,
    completionsWritten: 0,
    hostErrors: 0,
    policyTeardowns: 0,
    memoryChanges: 0,
    ringsLost: 0,
    mrsLost: 0,
    deviceFailures: 0,
    mapFailures: 0,
    unmapFailures: 0,
    queuesMapped: 0,
  };

  hostDevice!: DeviceHandle;
  private hostGidIndex = 0;
  private hostPort!: PortAttr;
  address!: VirtualAddress;
  config!: DeviceConfigValue;
  private configBytes: Uint8Array = new Uint8Array(DeviceConfig.size);

  // Per-activation state.
  private ctx: ActivationContext | undefined;
  /** The guest memory map in force: the activation's, then each memoryChanged's. */
  private mem: GuestMemory | undefined;
  features = 0n;
  /** Bumped by every reset: work started before it must not touch the guest or keep host objects. */
  generation = 0;
  private broken = false;
  readonly pds: HandleTable<Pd>;
  readonly cqs: HandleTable<Cq>;
  readonly qps: HandleTable<Qp>;
  readonly mrs: HandleTable<Mr>;
  readonly ahs: HandleTable<Ah>;
  /** Registered bytes, pending MRs included (the MR_BYTES quota). */
  mrBytes = 0n;
  readonly quotas: DeviceQuotas;
  readonly data: DataPath;
  readonly events: EventQueue;
  private readonly control: ControlQueue;
  private readonly doorbells: DoorbellQueue;

  /** Host objects being released (destroys, resets): awaited before the next activation serves requests. */
  private readonly releasingSet = new Set<Promise<unknown>>();
  /** Undos of host objects created for requests a reset overtook (checkGeneration): a reset's release awaits them. */
  private readonly undoing = new Set<Promise<unknown>>();
  /** Detaches the policy sink (resolvers with connection tracking only). */
  private detachPolicy: (() => void) | undefined;
  private closed = false;

  private constructor(opts: RdmaDeviceOptions) {
    // Every host QP and CQ is charged to the mapping budget (mapping-budget.ts): a guest inside its quota can never
    // use up the mappings the backend itself needs.
    this.mappings = opts.mappings ?? MappingBudget.fromProc();
    this.verbs = withMappingBudget(opts.verbs, this.mappings);
    this.vmId = opts.vmId;
    this.resolver = opts.resolver;
    this.log = opts.log;
    this.aliases = opts.aliases;
    this.quotas = { ...DEFAULT_QUOTAS, ...opts.quotas };
    // Placeholders until open() computed the limits.
    this.pds = new HandleTable(0);
    this.cqs = new HandleTable(0);
    this.qps = new HandleTable(0);
    this.mrs = new HandleTable(0);
    this.ahs = new HandleTable(0);
    const dpHost = this.dataPathHost();
    this.data = new RoutedDataPath(new RelayDataPath(dpHost), new MappedDataPath(dpHost, () => this.mapping));
    this.mappingOptions = opts;
    // The queues get the device itself through their narrow host interfaces (EventQueueHost, DoorbellHost,
    // ControlHost): it implements each.
    this.events = new EventQueue(this, EVENTQ);
    this.doorbells = new DoorbellQueue(this, DOORBELLQ);
    this.control = new ControlQueue(this, CONTROLQ);
  }

  // For the queues (ControlHost, DoorbellHost).
  get commands(): CommandContext {
    return this;
  }
  get maxPagesPerCommand(): number {
    return this.config.max_pages_per_command;
  }
  get releasing(): boolean {
    return this.releasingSet.size > 0;
  }
  qp(handle: number): Qp | undefined {
    return this.qps.get(handle);
  }
  cq(handle: number): Cq | undefined {
    return this.cqs.get(handle);
  }

  /** The narrow view the data path gets (DataPathHost): no tables, no queues, no control. */
  private dataPathHost(): DataPathHost {
    const dev = this;
    return {
      get memory() {
        return dev.memory;
      },
      verbs: dev.verbs,
      get isActive() {
        return dev.isActive;
      },
      hasFeature: (bit) => dev.hasFeature(bit),
      get maxMsgSize() {
        return dev.config.max_msg_size;
      },
      get activeMtu() {
        return dev.config.active_mtu;
      },
      get address() {
        return dev.address;
      },
      ah: (h) => dev.ahs.get(h),
      reverseSource: (gid, srcQp) => dev.resolver.reverse(dev.vmId, gid, srcQp),
      queueEvent: (type, handle, detail) => dev.queueEvent(type, handle, detail),
      counters: dev.counters,
      log: dev.log,
      background: (what, p) => dev.background(what, p),
    };
  }

  /** Opens the host device, picks the host GID, and computes the configuration. */
  static async open(opts: RdmaDeviceOptions): Promise<RdmaDevice> {
    const dev = new RdmaDevice(opts);
    const address = opts.resolver.ownAddress(opts.vmId);
    if (address === undefined) throw new Error(`VM ${opts.vmId} has no virtual address in the address table`);
    dev.address = address;
    dev.hostDevice = await opts.verbs.openDevice(opts.hostDevice, {
      onAsyncEvent: dev.guard('host async event', (e: AsyncEvent) => dev.onHostAsyncEvent(e)),
      onEventError: (e) => opts.log.log('error', 'host event watcher failed', { error: e.message }),
    });
    try {
      const attr = await opts.verbs.queryDevice(dev.hostDevice);
      dev.hostPort = await opts.verbs.queryPort(dev.hostDevice, HOST_PORT);
      dev.hostGidIndex = pickHostGidIndex(await opts.verbs.queryGidTable(dev.hostDevice), opts.hostDevice);
      dev.config = capToMappings(computeConfig(attr, dev.hostPort, dev.quotas, address), dev.mappings);
      const mode = opts.hostQueueMapping ?? 'off';
      const plan = planMapping(mode === 'off' ? 0 : opts.verbs.hostQueueFormat(dev.hostDevice), mode, dev.config, opts.maxMappedQueues);
      logPlan(opts.log, plan, mode === 'off' ? 'turned off' : 'the host has no HostQueueFormat');
      if (plan !== undefined) {
        dev.mapping = new MappingManager({ verbs: dev.verbs, hostDevice: dev.hostDevice, log: opts.log, counters: dev.counters, closeFd: opts.closeFd }, plan, { ...(opts.unmapTimeoutMs !== undefined ? { unmapTimeoutMs: opts.unmapTimeoutMs } : {}) });
        dev.config = { ...dev.config, host_queue_format: plan.format, doorbell_mode: plan.doorbellMode, max_mapped_queues: plan.maxMappedQueues };
      }
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
    dev.detachPolicy = opts.resolver.attachDevice?.(opts.vmId, dev.guard('policy teardown', (n: ConnectionTeardown) => dev.onPolicyTeardown(n)));
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
    while (this.releasingSet.size > 0) await Promise.allSettled([...this.releasingSet]);
  }

  /** The host GID index programmed into every host QP and AH (the guest never chooses it). */
  get sourceGidIndex(): number {
    return this.hostGidIndex;
  }

  get memory(): GuestMemory {
    return this.mem!;
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

  /**
   * Spec 4.2: FEATURES_OK only with at least one of RC and UD; spec 13.16: with HOST_QUEUE_MAPPING only when the
   * transport can map into the device's region (for a core that asks its model).
   */
  acceptFeatures(features: bigint, transport?: TransportFacts): boolean {
    if ((features & ((1n << BigInt(FeatureBit.RC)) | (1n << BigInt(FeatureBit.UD)))) === 0n) return false;
    const refusal = mappingRefusal(features, this.mapping?.plan, transport);
    if (refusal !== undefined) this.log.log('warn', 'FEATURES_OK refused: HOST_QUEUE_MAPPING accepted but the transport cannot map', { why: refusal });
    return refusal === undefined;
  }

  activate(ctx: ActivationContext): void {
    if (!this.acceptFeatures(ctx.features)) throw new Error('the driver accepted neither RC nor UD (spec 4.2)');
    for (const i of [CONTROLQ, EVENTQ, DOORBELLQ]) {
      if (ctx.queues[i] === undefined) throw new Error(`queue ${i} is not set up (spec 3.1)`);
    }
    this.ctx = ctx;
    this.mem = ctx.memory;
    this.features = ctx.features;
    this.broken = false;
    this.events.clear();
    if ((ctx.features & HOST_QUEUE_MAPPING_BIT) !== 0n) {
      this.mapping?.activate(ctx.hostPages, ctx.queueOffload, this.queueCount > MAPDOORBELLQ ? MAPDOORBELLQ : undefined);
    }
  }

  queueNotify(index: number): void {
    if (!this.isActive) return;
    if (index === CONTROLQ) this.background('control queue', this.control.run());
    else if (index === EVENTQ) this.events.flush();
    else if (index === DOORBELLQ) this.doorbells.serve();
    else if (index === MAPDOORBELLQ) ringAllMapped(this.mapping, this.qps.values());
  }

  /** Per-QP counters (relayed work requests, mapped doorbells), for the status view and metrics. */
  qpCounters(): QpCounters[] {
    return qpCounters(this.mapping, this.qps.values());
  }

  /**
   * Device reset, transport disconnect or VMM death: forget every guest object at once (nothing of the guest is
   * touched again) and release the host objects in the background, QPs first (moved to ERR so peers see the end).
   */
  reset(): void {
    this.generation++;
    this.ctx = undefined;
    this.mem = undefined;
    this.broken = false;
    this.features = 0n;
    this.events.clear();
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
    // Spec 13.10: doorbells stop now; the mappings go after the host QPs are in ERR and before anything is destroyed.
    const unmapAll = resetMapped(this.mapping, qps, cqs);
    if (qps.length + ahs.length + mrs.length + cqs.length + pds.length === 0) {
      this.release(unmapAll()); // an engine with no QP left (its pages may still be mapped)
      return;
    }
    this.release(
      (async () => {
        const v = this.verbs;
        // The command the reset overtook may still be in the host, creating a child of these PDs and CQs: wait
        // (bounded) for it to leave its handler and for its undo, so that children go before their parents.
        await this.withinInflightWait(async () => {
          await this.control.idle();
          await Promise.allSettled([...this.undoing]);
        });
        // Host calls still running on a QP (a command the reset overtook, a move to ERR, a DESTROY_QP's host
        // destroy) end before anything else; a QP a DESTROY_QP already handed to the host is left to it.
        await Promise.allSettled(qps.map((q) => q.hostIdle));
        const live = qps.filter((q) => q.hostGone !== true);
        await Promise.allSettled(live.map((q) => trackQpCall(q, v.modifyQp(q.host, { qpState: QpState.ERR }))));
        await unmapAll();
        await Promise.allSettled(live.map(async (q) => {
          await q.hostIdle;
          await v.destroyQp(q.host);
        }));
        await Promise.allSettled(qps.map((q) => q.hostIdle));
        await Promise.allSettled(ahs.map((a) => v.destroyAh(a.host)));
        await Promise.allSettled(mrs.filter((m) => m.host !== undefined).map((m) => releaseMr(v, this.aliases, m.host!, m.alias)));
        await Promise.allSettled(cqs.map((c) => v.destroyCq(c.host)));
        const results = await Promise.allSettled(pds.map((p) => v.deallocPd(p.host)));
        const failed = results.filter((r) => r.status === 'rejected').length;
        if (failed > 0) this.log.log('error', 'reset: host refused to release PDs', { failed });
      })(),
    );
  }

  /** Runs `wait`, giving up after RESET_INFLIGHT_WAIT_MS (logged): the release then goes on regardless. */
  private async withinInflightWait(wait: () => Promise<void>): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<boolean>((r) => (timer = setTimeout(() => r(true), RESET_INFLIGHT_WAIT_MS)));
    const late = await Promise.race([wait().then(() => false), expired]);
    clearTimeout(timer);
    if (late) this.log.log('warn', 'reset: a command overtaken by the reset is still in the host; releasing anyway', { waitedMs: RESET_INFLIGHT_WAIT_MS });
  }

  /** Tracks a host release so that settled() (and the next activation) can wait for it. */
  release(p: Promise<unknown>): void {
    const tracked = p.catch((e: unknown) => {
      this.counters.hostErrors++;
      this.log.log('error', 'host release failed', { error: (e as Error).message });
    });
    this.releasingSet.add(tracked);
    void tracked.finally(() => this.releasingSet.delete(tracked));
  }

  /** A guest-caused framing error the spec makes fatal (section 7.5): NEEDS_RESET, every host QP to ERR. */
  fatal(queue: number, why: string): void {
    if (this.broken || this.ctx === undefined) return;
    this.counters.fatal++;
    this.stop();
    this.ctx.queueBroken(queue, new Error(why));
  }

  /** Stops serving until the next reset: every host QP to ERR, so peers see the end. */
  private stop(): void {
    this.broken = true;
    for (const qp of this.qps.values()) {
      if (qp.hostGone !== true) this.release(trackQpCall(qp, this.verbs.modifyQp(qp.host, { qpState: QpState.ERR })));
    }
  }

  // ------------------------------------------------------------------------------------------ event-loop guard

  /**
   * Wraps an entry into the model from the event loop (a host event, a policy callback): whatever it throws is the
   * device's failure (NEEDS_RESET through the core, logged), never an exception that ends the process.
   */
  guard<A extends unknown[]>(what: string, fn: (...args: A) => void): (...args: A) => void {
    return (...args: A) => {
      try {
        fn(...args);
      } catch (e) {
        this.failed(what, e);
      }
    };
  }

  /** Work the event loop continues later (a promise continuation): a rejection is the device's failure. */
  background(what: string, p: Promise<unknown>): void {
    p.catch((e: unknown) => this.failed(what, e));
  }

  private failed(what: string, e: unknown): void {
    const error = e instanceof Error ? e : new Error(String(e));
    this.counters.deviceFailures++;
    this.log.log('error', 'device failure on the event loop', { where: what, error: error.message });
    const ctx = this.ctx;
    if (ctx === undefined || this.broken) return; // reset meanwhile, or already failed: nothing left to report
    this.stop();
    try {
      ctx.deviceFailed(new Error(`${what}: ${error.message}`));
    } catch (e2) {
      this.log.log('error', 'reporting a device failure failed', { error: (e2 as Error).message });
    }
  }

  cqEventHandler(cq: () => Cq | undefined): () => void {
    return this.guard('host CQ event', () => {
      const c = cq();
      if (c !== undefined) this.data.onHostCqEvent(c);
    });
  }

  // ------------------------------------------------------------------------------------------ queues

  queue(index: number): DeviceQueue | undefined {
    return this.ctx?.queues[index];
  }

  /** Pops a chain; a malformed ring is the driver's fault (NEEDS_RESET through queueBroken). */
  popChain(index: number): DescriptorChain | null {
    const q = this.queue(index);
    if (q === undefined) return null;
    const c = q.pop();
    if (c instanceof VirtqueueError) {
      const ctx = this.ctx;
      this.stop();
      ctx?.queueBroken(index, c);
      return null;
    }
    return c;
  }

  pushUsed(index: number, chain: DescriptorChain, len: number): void {
    const q = this.queue(index)!;
    q.pushUsed(chain, len);
    if (q.needsNotification()) this.ctx!.interrupt(index);
  }

  /** Queues an event (coalesced per type and handle, section 9.3) and writes what the driver has buffers for. */
  queueEvent(type: number, handle: number, detail: number): void {
    if (this.ctx === undefined) return;
    this.events.push(type, handle, detail);
  }

  discardEvents(handle: number, types: readonly number[]): void {
    this.events.discard(handle, types);
  }

  get waitingEvents(): number {
    return this.events.waiting;
  }

  // ------------------------------------------------------------------------------------------ command helpers

  checkGeneration(gen: number, undo?: () => Promise<unknown>): void {
    if (gen === this.generation) return;
    if (undo !== undefined) {
      const p = undo();
      this.release(p);
      const done: Promise<unknown> = p.then(
        () => this.undoing.delete(done),
        () => this.undoing.delete(done),
      );
      this.undoing.add(done);
    }
    throw new ResetDuringRequest();
  }

  async hostCall<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof VerbsError) {
        this.counters.hostErrors++;
        this.log.log('warn', 'host refused an allocation', { error: e.message });
        throw new CommandError('NO_RESOURCES', ResourceKind.HOST);
      }
      throw e;
    }
  }

  async destroyHost(fn: () => Promise<void>): Promise<void> {
    const p = fn();
    this.release(p);
    await p.catch(() => undefined);
  }

  // ------------------------------------------------------------------------------------------ memory map

  /**
   * The guest memory map changed while active (spec 10.8). Called before the transport unmaps any dropped region:
   * memory-map.ts re-checks every ring and MR synchronously and nothing keeps a view into the old map.
   */
  memoryChanged(memory: GuestMemory): void {
    if (this.ctx === undefined) return;
    this.mem = memory;
    if (this.broken) return;
    this.counters.memoryChanges++;
    // Events wait until the transport has rebuilt its own rings over the new map (right after this returns).
    this.events.held = true;
    try {
      recheckObjects(this, memory);
    } finally {
      this.events.held = false;
    }
    // Write the events once the transport's rings are rebuilt: the next turn of the event loop.
    setImmediate(this.guard('event queue after a memory map change', () => this.events.flush()));
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
      this.background('policy teardown', this.policyTeardownQp(qp, n.detail));
    } else {
      const ah = this.ahs.get(c.guestHandle);
      if (ah === undefined || ah.handle !== c.local) return;
      this.revokeAh(ah, n.detail);
    }
  }

  /** Spec 11.4: the QP moves to ERR (its work flushed), then QP_POLICY_TEARDOWN with the PolicyReason. */
  async policyTeardownQp(qp: Qp, reason: number): Promise<void> {
    const gen = this.generation;
    this.counters.policyTeardowns++;
    await this.data.moveToError(qp); // flush completions first, then the event
    if (gen === this.generation && !qp.destroyed) this.queueEvent(EventType.QP_POLICY_TEARDOWN, qp.handle, reason);
  }

  /** Spec 12.3: later UD sends to an AH whose destination is no longer allowed complete with LOC_QP_OP_ERR. */
  revokeAh(ah: Ah, reason: number): void {
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
