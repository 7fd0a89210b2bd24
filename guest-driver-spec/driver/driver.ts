// The virtio-rdma driver core (spec sections 4 to 10, the driver's side): initialization and feature negotiation,
// the configuration with its generation check, the control queue (one request at a time, framed per section 7),
// the event queue (buffers kept posted, events parsed and re-posted), and doorbell records on the doorbell queue.
// The verbs-like API (verbs.ts) builds on this; this file knows nothing of PDs or QPs beyond their encodings.

import {
  Command,
  CtrlRequestHeader,
  CtrlResponseHeader,
  DeviceConfig,
  DoorbellRecord,
  DoorbellMode,
  Event,
  EventType,
  FeatureBit,
  HostQueueFormat,
  Limits,
  Queue,
  RESERVED_FEATURE_BITS,
  Status,
  encodeRequest,
} from '../../vmm-device/abi/rdma/index.ts';
import {
  F_EVENT_IDX,
  F_VERSION_1,
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
} from '../../vmm-device/abi/virtio.ts';
import { CommandError, DeviceError, ProtocolError, UsageError, commandName, eventTypeName } from './errors.ts';
import type { DriverTransport } from './transport.ts';
import type { DriverVirtqueue } from './virtqueue.ts';

export type DeviceConfigValue = ReturnType<typeof DeviceConfig.decode>;

/** Queue sizes the driver asks for (section 3.1: at least 8 control and 16 event entries), capped by the device. */
export const CONTROLQ_SIZE = 16;
export const EVENTQ_SIZE = 64;
export const DOORBELLQ_SIZE = 128;
/** How long the driver waits for one control response; creating and connecting QPs call host verbs. */
export const COMMAND_TIMEOUT_MS = 15_000;
/** Records the driver puts in one doorbell buffer (the spec allows up to DOORBELL_MAX_RECORDS). */
export const DOORBELL_RECORDS_PER_BUFFER = 32;
/** Reads of the configuration before giving up on a generation that keeps changing. */
export const CONFIG_GENERATION_RETRIES = 16;
/** How long the driver waits for a free doorbell descriptor before it calls the device stuck. */
export const DOORBELL_WAIT_MS = 5_000;

/** Device-specific features this driver implements and accepts when offered (never bits 6-8, never 9-23). */
export const DRIVER_FEATURES =
  (1n << BigInt(FeatureBit.RC)) |
  (1n << BigInt(FeatureBit.UD)) |
  (1n << BigInt(FeatureBit.ATOMIC)) |
  (1n << BigInt(FeatureBit.IMMEDIATE)) |
  (1n << BigInt(FeatureBit.INLINE));

/**
 * Transport features this driver accepts when offered: VIRTIO_F_EVENT_IDX, so that a batch of control requests
 * costs one interrupt (the driver asks for the one after the batch's last answer) rather than one per request.
 */
export const DRIVER_TRANSPORT_FEATURES = 1n << F_EVENT_IDX;

/** Host queue formats this driver writes (section 13.4); a device with another format is driven without mapping. */
export const KNOWN_HOST_QUEUE_FORMATS: readonly number[] = [HostQueueFormat.RXE];
/** Bytes of configuration that hold host_queue_format, doorbell_mode and max_mapped_queues (section 5). */
const MAPPING_CONFIG = { offset: 118, size: 6 } as const;
/** Entries of mapdoorbellq: it carries no buffers (section 3), so the smallest ring does. */
const MAPDOORBELLQ_SIZE = 8;

/** What the driver learnt of host queue mapping when it accepted HOST_QUEUE_MAPPING (section 13.2). */
export interface MappingFacts {
  format: number;
  doorbellMode: number;
  maxMappedQueues: number;
  /** mapdoorbellq (2 + N; N = 1 since this driver does not negotiate MULTI_DOORBELL). */
  notifyQueue: number;
}

/** One request of driver.commandBatch(). */
export interface BatchItem {
  command: number;
  body: Uint8Array;
  pages: readonly bigint[];
  response: ResponseLayout<unknown>;
}

interface Pending {
  item: BatchItem;
  tag: bigint;
  reqGpa: number;
  respGpa: number;
  id: number;
  used: number;
}

/** What driver.command() needs of a response layout: its size and its decoder. */
export interface ResponseLayout<R> {
  readonly size: number;
  decode(bytes: Uint8Array, offset?: number): R;
}

export interface DriverOptions {
  /** Features to leave out even when offered (tests of NOT_SUPPORTED paths). */
  withoutFeatures?: bigint;
  controlQueueSize?: number;
  eventQueueSize?: number;
  doorbellQueueSize?: number;
  commandTimeoutMs?: number;
}

export interface DeviceEvent {
  type: number;
  typeName: string;
  count: number;
  handle: number;
  detail: number;
  sequence: bigint;
}

export function hasFeature(features: bigint, bit: number): boolean {
  return ((features >> BigInt(bit)) & 1n) === 1n;
}

/** The driver's counters: what a test or an operator reads to see what happened. */
export interface DriverCounters {
  commands: number;
  commandErrors: number;
  events: number;
  doorbellBuffers: number;
  doorbellRecords: number;
  kicks: number;
  protocolErrors: number;
}

export class VirtioRdmaDriver {
  readonly counters: DriverCounters = { commands: 0, commandErrors: 0, events: 0, doorbellBuffers: 0, doorbellRecords: 0, kicks: 0, protocolErrors: 0 };
  private nextTag = 1n;
  private commandChain: Promise<unknown> = Promise.resolve();
  private readonly eventBuffers = new Map<number, number>();
  private eventArena = 0;
  private readonly pendingEvents: DeviceEvent[] = [];
  private eventWait: Promise<boolean> | undefined;
  private eventListeners: ((e: DeviceEvent) => void)[] = [];
  private doorbellArena = 0;
  private readonly doorbellFreeSlots: number[] = [];
  private readonly doorbellInFlight = new Map<number, number>();
  private nextEventSequence = 0n;
  private closed = false;
  readonly commandTimeoutMs: number;

  private constructor(
    readonly transport: DriverTransport,
    readonly features: bigint,
    public config: DeviceConfigValue,
    readonly controlq: DriverVirtqueue,
    readonly eventq: DriverVirtqueue,
    readonly doorbellq: DriverVirtqueue,
    options: DriverOptions,
    /** Set when HOST_QUEUE_MAPPING is negotiated (section 13). */
    readonly mapping?: MappingFacts,
  ) {
    this.commandTimeoutMs = options.commandTimeoutMs ?? COMMAND_TIMEOUT_MS;
  }

  get memory() {
    return this.transport.memory;
  }

  /**
   * Generic virtio initialization (section 6): reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK,
   * configuration, queues 0, 1 and 2, DRIVER_OK, then event buffers posted.
   */
  static async open(transport: DriverTransport, options: DriverOptions = {}): Promise<VirtioRdmaDriver> {
    await transport.reset();
    await transport.setStatus(STATUS_ACKNOWLEDGE);
    await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    const fail = async (why: string): Promise<never> => {
      await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED);
      throw new DeviceError(why);
    };
    const offered = await transport.deviceFeatures();
    if (!hasFeature(offered, Number(F_VERSION_1))) return fail('the device does not offer VIRTIO_F_VERSION_1');
    for (const b of RESERVED_FEATURE_BITS) {
      // Section 4.2: a v1 device never offers them. The driver does not accept them either way (section 4.1).
      // HOST_QUEUE_MAPPING is defined by section 13 and this driver implements it, whatever the list still says.
      if (b !== FeatureBit.HOST_QUEUE_MAPPING && hasFeature(offered, b)) return fail(`the device offers reserved feature bit ${b}`);
    }
    let wanted = ((DRIVER_FEATURES | DRIVER_TRANSPORT_FEATURES) & ~(options.withoutFeatures ?? 0n)) | (1n << F_VERSION_1);
    // Section 13.15: accept HOST_QUEUE_MAPPING only for a known host_queue_format, and only with a transport that
    // can reach shared memory regions. The configuration may be read before FEATURES_OK (virtio 1.x 3.1.1).
    let mappingConfig: Omit<MappingFacts, 'notifyQueue'> | undefined;
    const mapBit = 1n << BigInt(FeatureBit.HOST_QUEUE_MAPPING);
    if ((offered & mapBit) !== 0n && ((options.withoutFeatures ?? 0n) & mapBit) === 0n && transport.sharedMemory !== undefined) {
      const c = await transport.readConfig(MAPPING_CONFIG.offset, MAPPING_CONFIG.size);
      const v = new DataView(c.buffer, c.byteOffset, c.byteLength);
      const format = c[0]!;
      const doorbellMode = c[1]!;
      if (KNOWN_HOST_QUEUE_FORMATS.includes(format) && (doorbellMode === DoorbellMode.POLLED || doorbellMode === DoorbellMode.NOTIFY)) {
        mappingConfig = { format, doorbellMode, maxMappedQueues: v.getUint32(2, true) };
        wanted |= mapBit;
      }
    }
    const features = offered & wanted;
    if (!hasFeature(features, FeatureBit.RC) && !hasFeature(features, FeatureBit.UD)) {
      return fail('the device offers neither RC nor UD (section 4.1)');
    }
    await transport.writeDriverFeatures(features);
    await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (((await transport.getStatus()) & STATUS_FEATURES_OK) === 0) {
      // Section 13.16: a device refuses FEATURES_OK with HOST_QUEUE_MAPPING when its transport cannot map after all
      // (a VMM without the shared memory region). Start over without it (virtio: reset, negotiate again): relayed.
      if ((features & mapBit) !== 0n) return VirtioRdmaDriver.open(transport, { ...options, withoutFeatures: (options.withoutFeatures ?? 0n) | mapBit });
      return fail('the device refused FEATURES_OK');
    }
    const config = await readConfig(transport);
    checkConfig(config);

    const ring = { eventIdx: hasFeature(features, Number(F_EVENT_IDX)) };
    const queueSize = async (index: number, want: number): Promise<number> => {
      const max = await transport.maxQueueSize(index);
      if (max < 1) throw new DeviceError(`queue ${index} is not available`);
      let size = 1;
      while (size * 2 <= Math.min(want, max)) size *= 2;
      return size;
    };
    const controlq = await transport.setupQueue(Queue.CONTROLQ, await queueSize(Queue.CONTROLQ, options.controlQueueSize ?? CONTROLQ_SIZE), ring);
    const eventq = await transport.setupQueue(Queue.EVENTQ, await queueSize(Queue.EVENTQ, options.eventQueueSize ?? EVENTQ_SIZE), ring);
    const doorbellq = await transport.setupQueue(
      Queue.DOORBELLQ_FIRST,
      await queueSize(Queue.DOORBELLQ_FIRST, options.doorbellQueueSize ?? DOORBELLQ_SIZE),
      ring,
    );
    const mapping = mappingConfig === undefined ? undefined : { ...mappingConfig, notifyQueue: Queue.DOORBELLQ_FIRST + 1 };
    // Section 13.15: in NOTIFY mode mapdoorbellq is set up before DRIVER_OK; it never carries a buffer.
    if (mapping?.doorbellMode === DoorbellMode.NOTIFY) await transport.setupQueue(mapping.notifyQueue, await queueSize(mapping.notifyQueue, MAPDOORBELLQ_SIZE), ring);
    await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    const status = await transport.getStatus();
    if ((status & STATUS_DEVICE_NEEDS_RESET) !== 0) throw new DeviceError('the device set DEVICE_NEEDS_RESET at DRIVER_OK');
    if ((status & STATUS_FEATURES_OK) === 0) return fail(`the device refused the features 0x${features.toString(16)} (status 0x${status.toString(16)})`);
    const driver = new VirtioRdmaDriver(transport, features, config, controlq, eventq, doorbellq, options, mapping);
    await driver.postEventBuffers();
    driver.setUpDoorbellPool();
    return driver;
  }

  has(bit: number): boolean {
    return hasFeature(this.features, bit);
  }

  /** Re-reads the configuration (after a configuration change: port state, GID, MAC). */
  async refreshConfig(): Promise<DeviceConfigValue> {
    this.config = await readConfig(this.transport);
    return this.config;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Control queue (section 7)

  /**
   * Sends one control request and returns the decoded response body. Requests go one at a time (the device
   * executes them in order anyway, section 7.3), so a response always belongs to the one request in flight.
   */
  command<R>(command: number, body: Uint8Array, pages: readonly bigint[], response: ResponseLayout<R>): Promise<R> {
    const run = this.commandChain.then(() => this.exchange(command, body, pages, response));
    this.commandChain = run.catch(() => undefined);
    return run;
  }

  /**
   * Sends several control requests at once and returns their decoded bodies in order (the device executes them in
   * order, section 7.3): one notification and one wait instead of one round trip each. Every request runs, and the
   * first error (in request order) is thrown once all have come back; a later request of a failed sequence fails
   * on its own terms (for MODIFY_QP: WRONG_STATE). Falls back to one at a time when the queue cannot hold them all.
   */
  commandBatch(items: readonly BatchItem[]): Promise<unknown[]> {
    const run = this.commandChain.then(async () => {
      const descriptors = items.reduce((n, i) => n + 2 + (i.pages.length > 0 ? 1 : 0) + (i.response.size > 0 ? 1 : 0), 0);
      if (descriptors > this.controlq.freeDescriptors) {
        const out: unknown[] = [];
        for (const i of items) out.push(await this.exchange(i.command, i.body, i.pages, i.response));
        return out;
      }
      return this.exchangeMany(items);
    });
    this.commandChain = run.catch(() => undefined);
    return run;
  }

  private async exchange<R>(command: number, body: Uint8Array, pages: readonly bigint[], response: ResponseLayout<R>): Promise<R> {
    const [r] = await this.exchangeMany([{ command, body, pages, response }]);
    return r as R;
  }

  private async exchangeMany(items: readonly BatchItem[]): Promise<unknown[]> {
    if (this.closed) throw new UsageError('the driver is closed');
    const mem = this.memory;
    const pending: Pending[] = [];
    try {
      let kick = false;
      for (const i of items) {
        const tag = this.nextTag++;
        const request = encodeRequest(i.command, tag, i.body, i.pages);
        const fixedEnd = CtrlRequestHeader.size + i.body.byteLength;
        // The readable part: header and fixed body in one buffer, the page list in a second (descriptor boundaries
        // carry no meaning, section 7.1; a long page list is its own buffer as in a scatter-gather list).
        const reqGpa = mem.alloc(request.byteLength);
        const p: Pending = { item: i, tag, reqGpa, respGpa: 0, id: -1, used: -1 };
        pending.push(p);
        p.respGpa = mem.allocZeroed(CtrlResponseHeader.size + i.response.size);
        mem.write(reqGpa, request);
        const buffers = [{ gpa: reqGpa, len: fixedEnd, write: false }];
        if (request.byteLength > fixedEnd) buffers.push({ gpa: reqGpa + fixedEnd, len: request.byteLength - fixedEnd, write: false });
        buffers.push({ gpa: p.respGpa, len: CtrlResponseHeader.size, write: true });
        if (i.response.size > 0) buffers.push({ gpa: p.respGpa + CtrlResponseHeader.size, len: i.response.size, write: true });
        const r = this.controlq.add(buffers);
        p.id = r.id;
        kick ||= r.kick;
        this.counters.commands++;
      }
      if (kick) await this.kick(Queue.CONTROLQ);
      await this.waitAllUsed(pending, this.commandTimeoutMs);
      const out: unknown[] = [];
      let failure: unknown;
      for (const p of pending) {
        try {
          out.push(this.complete(p));
        } catch (e) {
          failure ??= e;
          out.push(undefined);
        }
      }
      if (failure !== undefined) throw failure;
      return out;
    } finally {
      for (const p of pending) {
        mem.release(p.reqGpa);
        if (p.respGpa !== 0) mem.release(p.respGpa);
      }
    }
  }

  /** Checks one response (section 7.1) and decodes its body. */
  private complete(p: Pending): unknown {
    const { command, response } = p.item;
    const used = p.used;
    const written = this.memory.read(p.respGpa, CtrlResponseHeader.size + response.size);
    if (used < CtrlResponseHeader.size) return this.protocol(`${commandName(command)}: used length ${used} holds no response header`);
    const header = CtrlResponseHeader.decode(written);
    if (header.tag !== p.tag) return this.protocol(`${commandName(command)}: response tag ${header.tag}, request tag ${p.tag}`);
    if (header.status !== Status.OK) {
      if (used !== CtrlResponseHeader.size) return this.protocol(`${commandName(command)}: error status with used length ${used} (section 7.1: 16)`);
      this.counters.commandErrors++;
      throw new CommandError(command, header.status, header.detail);
    }
    if (header.detail !== 0) return this.protocol(`${commandName(command)}: OK with detail ${header.detail}`);
    if (used !== CtrlResponseHeader.size + response.size) {
      return this.protocol(`${commandName(command)}: used length ${used}, expected ${CtrlResponseHeader.size + response.size}`);
    }
    return response.decode(written, CtrlResponseHeader.size);
  }

  /** Waits until every chain of `pending` came back on the control queue (the only chains in flight there). */
  private async waitAllUsed(pending: Pending[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const byId = new Map(pending.map((p) => [p.id, p]));
    let left = pending.length;
    for (;;) {
      for (const u of this.controlq.takeUsed()) {
        const p = byId.get(u.id);
        if (p === undefined || p.used >= 0) this.protocol(`queue ${this.controlq.index}: the device returned chain ${u.id}, which is not in flight`);
        p.used = u.len;
        left--;
      }
      if (left === 0) return;
      const wait = deadline - Date.now();
      if (wait <= 0) {
        const first = pending.find((p) => p.used < 0)!;
        const status = await this.transport.getStatus();
        const why = (status & STATUS_DEVICE_NEEDS_RESET) !== 0 ? 'the device set DEVICE_NEEDS_RESET' : `no answer within ${timeoutMs} ms`;
        throw new DeviceError(`${commandName(first.item.command)} (tag ${first.tag}): ${why}`);
      }
      // EVENT_IDX: one interrupt, after the last chain still in flight; chains used meanwhile are taken first.
      if (this.controlq.armInterrupt(left)) continue;
      await this.transport.waitInterrupt(this.controlq.index, wait);
    }
  }

  private protocol(message: string): never {
    this.counters.protocolErrors++;
    throw new ProtocolError(message);
  }

  private async kick(queue: number): Promise<void> {
    this.counters.kicks++;
    await this.transport.notify(queue);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Event queue (section 9)

  private async postEventBuffers(): Promise<void> {
    const n = this.eventq.size;
    this.eventArena = this.memory.allocZeroed(n * Limits.EVENT_SIZE, Limits.EVENT_SIZE);
    let kick = false;
    for (let i = 0; i < n; i++) {
      const gpa = this.eventArena + i * Limits.EVENT_SIZE;
      const r = this.eventq.add([{ gpa, len: Limits.EVENT_SIZE, write: true }]);
      this.eventBuffers.set(r.id, gpa);
      kick ||= r.kick;
    }
    if (kick) await this.kick(Queue.EVENTQ);
  }

  /** Reads the events the device wrote since the last call and posts their buffers again. */
  pumpEvents(): DeviceEvent[] {
    const used = this.eventq.takeUsed();
    // Every buffer of the batch is read before any is posted again: takeUsed() freed all their descriptors, so
    // add() may hand out an id that a later entry of this batch still names, and that entry would then be looked up
    // to the buffer just zeroed and re-posted (two events in one batch lost the second).
    const returned = used.map((u) => {
      const gpa = this.eventBuffers.get(u.id);
      if (gpa === undefined) this.protocol(`event queue: the device returned chain ${u.id}, which is not posted`);
      this.eventBuffers.delete(u.id);
      return { u, gpa, bytes: this.memory.read(gpa, Limits.EVENT_SIZE) };
    });
    const out: DeviceEvent[] = [];
    let kick = false;
    for (const { gpa } of returned) {
      this.memory.fill(gpa, Limits.EVENT_SIZE, 0);
      const r = this.eventq.add([{ gpa, len: Limits.EVENT_SIZE, write: true }]);
      this.eventBuffers.set(r.id, gpa);
      kick ||= r.kick;
    }
    for (const { u, bytes } of returned) {
      if (u.len !== Limits.EVENT_SIZE) {
        this.counters.protocolErrors++;
        continue; // section 9.5: used length 32; a shorter write is not an event the driver can trust
      }
      const e = Event.decode(bytes);
      const event: DeviceEvent = { ...e, typeName: eventTypeName(e.type) };
      if (event.sequence !== this.nextEventSequence) this.counters.protocolErrors++;
      this.nextEventSequence = event.sequence + 1n;
      this.counters.events++;
      out.push(event);
    }
    if (kick) void this.kick(Queue.EVENTQ);
    for (const e of out) {
      this.pendingEvents.push(e);
      for (const l of this.eventListeners) l(e);
    }
    return out;
  }

  /** Calls `fn` for every event as it is read (completion events included). Returns the unsubscribe function. */
  onEvent(fn: (e: DeviceEvent) => void): () => void {
    this.eventListeners.push(fn);
    return () => {
      this.eventListeners = this.eventListeners.filter((l) => l !== fn);
    };
  }

  /** Events read and not yet taken by takeEvent/takeEvents. */
  takeEvents(filter: (e: DeviceEvent) => boolean = () => true): DeviceEvent[] {
    const out: DeviceEvent[] = [];
    for (let i = 0; i < this.pendingEvents.length; ) {
      if (filter(this.pendingEvents[i]!)) out.push(...this.pendingEvents.splice(i, 1));
      else i++;
    }
    return out;
  }

  /** Waits for an event that matches `filter` and takes it; undefined on timeout. */
  async waitEvent(filter: (e: DeviceEvent) => boolean, timeoutMs: number): Promise<DeviceEvent | undefined> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.pumpEvents();
      const i = this.pendingEvents.findIndex(filter);
      if (i >= 0) return this.pendingEvents.splice(i, 1)[0];
      const left = deadline - Date.now();
      if (left <= 0 || this.closed) return undefined;
      if (this.eventq.armInterrupt(1)) continue; // an event came meanwhile: read it rather than sleep
      // One waiter on the interrupt at a time: concurrent callers share it and all re-check.
      this.eventWait ??= this.transport.waitInterrupt(Queue.EVENTQ, left).finally(() => (this.eventWait = undefined));
      await this.eventWait;
    }
  }

  /** Waits for a COMPLETION event of CQ `handle`. */
  waitCompletionEvent(cqHandle: number, timeoutMs: number): Promise<DeviceEvent | undefined> {
    return this.waitEvent((e) => e.type === EventType.COMPLETION && e.handle === cqHandle, timeoutMs);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Doorbells (section 10.6)

  private setUpDoorbellPool(): void {
    const slots = this.doorbellq.size;
    const bytes = DOORBELL_RECORDS_PER_BUFFER * Limits.DOORBELL_RECORD_SIZE;
    this.doorbellArena = this.memory.alloc(slots * bytes, 64);
    for (let i = slots - 1; i >= 0; i--) this.doorbellFreeSlots.push(this.doorbellArena + i * bytes);
  }

  private reclaimDoorbells(): void {
    for (const u of this.doorbellq.takeUsed()) {
      const gpa = this.doorbellInFlight.get(u.id);
      if (gpa === undefined) {
        this.protocol(`doorbell queue: the device returned chain ${u.id}, which is not in flight`);
      }
      this.doorbellInFlight.delete(u.id);
      this.doorbellFreeSlots.push(gpa);
    }
  }

  /**
   * Rings the doorbell with these records (section 10.6): buffers of at most DOORBELL_RECORDS_PER_BUFFER records,
   * device-readable only, then one notification if the device asks for it.
   */
  async doorbell(records: readonly { handle: number; type: number }[]): Promise<void> {
    if (records.length === 0) return;
    if (this.closed) throw new UsageError('the driver is closed');
    let kick = false;
    for (let start = 0; start < records.length; start += DOORBELL_RECORDS_PER_BUFFER) {
      const batch = records.slice(start, start + DOORBELL_RECORDS_PER_BUFFER);
      const gpa = await this.doorbellSlot();
      const bytes = new Uint8Array(batch.length * Limits.DOORBELL_RECORD_SIZE);
      batch.forEach((r, i) => DoorbellRecord.encode(r, bytes, i * Limits.DOORBELL_RECORD_SIZE));
      this.memory.write(gpa, bytes);
      const r = this.doorbellq.add([{ gpa, len: bytes.byteLength, write: false }]);
      this.doorbellInFlight.set(r.id, gpa);
      this.counters.doorbellBuffers++;
      this.counters.doorbellRecords += batch.length;
      kick ||= r.kick;
    }
    if (kick) await this.kick(Queue.DOORBELLQ_FIRST);
  }

  private async doorbellSlot(): Promise<number> {
    const deadline = Date.now() + DOORBELL_WAIT_MS;
    for (;;) {
      this.reclaimDoorbells();
      const slot = this.doorbellFreeSlots.pop();
      if (slot !== undefined && this.doorbellq.freeDescriptors > 0) return slot;
      if (slot !== undefined) this.doorbellFreeSlots.push(slot);
      const left = deadline - Date.now();
      if (left <= 0) throw new DeviceError(`doorbell queue full for ${DOORBELL_WAIT_MS} ms: the device returns no doorbell buffers`);
      if (this.doorbellq.armInterrupt(1)) continue;
      await this.transport.waitInterrupt(Queue.DOORBELLQ_FIRST, left);
    }
  }

  /** Doorbell buffers the device has not returned yet. */
  get doorbellsInFlight(): number {
    this.reclaimDoorbells();
    return this.doorbellInFlight.size;
  }

  // ---------------------------------------------------------------------------------------------------------

  /** Resets the device (it destroys every object, section 11.5) and releases the driver's guest memory. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.commandChain;
    await this.transport.reset();
    if (this.eventArena !== 0) this.memory.release(this.eventArena);
    if (this.doorbellArena !== 0) this.memory.release(this.doorbellArena);
  }
}

/** Reads the whole configuration inside a generation check (section 5.3: gid and mac must be consistent). */
export async function readConfig(transport: DriverTransport): Promise<DeviceConfigValue> {
  for (let i = 0; i < CONFIG_GENERATION_RETRIES; i++) {
    const before = await transport.configGeneration();
    const bytes = await transport.readConfig(0, DeviceConfig.size);
    const after = await transport.configGeneration();
    if (before === after) return DeviceConfig.decode(bytes);
  }
  throw new DeviceError(`the configuration generation changed on each of ${CONFIG_GENERATION_RETRIES} reads`);
}

/** The driver's checks of section 5.2 values it relies on; a device that breaks them is not driven. */
export function checkConfig(c: DeviceConfigValue): void {
  const bad = (why: string): never => {
    throw new ProtocolError(`device configuration: ${why}`);
  };
  if ((c.page_size_mask & (1n << BigInt(Limits.MIN_PAGE_SHIFT))) === 0n) bad('page_size_mask lacks 4 KiB pages');
  const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(c.max_qp_wr) || c.max_qp_wr > Limits.MAX_QUEUE_DEPTH) bad(`max_qp_wr ${c.max_qp_wr}`);
  if (!pow2(c.max_cqe) || c.max_cqe > Limits.MAX_QUEUE_DEPTH) bad(`max_cqe ${c.max_cqe}`);
  if (c.max_send_sge > Limits.SQ_WQE_MAX_SGE) bad(`max_send_sge ${c.max_send_sge}`);
  if (c.max_recv_sge > Limits.RQ_WQE_MAX_SGE) bad(`max_recv_sge ${c.max_recv_sge}`);
  if (c.max_inline_data > Limits.SQ_WQE_MAX_INLINE) bad(`max_inline_data ${c.max_inline_data}`);
  if (c.max_pages_per_command < 1) bad('max_pages_per_command 0');
  if (c.gid_tbl_len !== 1) bad(`gid_tbl_len ${c.gid_tbl_len}`);
}

export { Command };
