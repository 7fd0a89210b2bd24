// One vhost-user front-end connection's state machine (the back-end side). It receives decoded-but-unchecked
// messages from the connection (connection.ts), checks everything that depends on state, acts, and says what to
// answer: a reply, nothing, or "close the connection". It owns every fd and mapping the front-end gave it and
// releases them all in `release()`.
//
// The virtio device itself is the device core (vmm-device/virtio/core.ts) over a device model. vhost-user does not
// carry the guest's status writes one by one, so the session drives the core through a proper virtio init sequence
// itself when the device is to start: on SET_STATUS with DRIVER_OK, or on the first kick of an enabled ring,
// whichever comes first (rings started later are then not seen by the model until the next reset). SET_STATUS 0
// (and RESET_DEVICE) reset the device, which releases what the driver created. The kick fallback is for a
// front-end that negotiates STATUS but never sends SET_STATUS: stock QEMU 10's generic vhost-user device (its
// vhost_dev.vq_index_end stays 0); the project's QEMU recipe fixes that (scripts/qemu/README.md).
//
// With an inflight area (INFLIGHT_SHMFD), split and packed rings are tracked in it (inflight.ts): a ring that starts
// with chains still marked in flight, after a back-end restart, gets them resubmitted before anything new.
//
// The jobs around it live beside it: the memory table (memory-table.ts; a new map rebuilds the rings, then reaches
// the model, and only then are dropped regions unmapped), the rings and their kicks (ring-set.ts, rings.ts), and
// the services the device model gets at activation: host-page mapping (host-pages.ts) and queue offload
// (offload.ts).

import { GuestMemory, GuestMemoryError } from '../../memory/guest-memory.ts';
import type { Logger } from '../../util/log.ts';
import { VirtioDeviceCore } from '../../virtio/core.ts';
import {
  F_EVENT_IDX,
  F_INDIRECT_DESC,
  F_RING_PACKED,
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
} from '../../abi/virtio.ts';
import type { VirtioDeviceModel } from '../../virtio/device.ts';
import type { HostOps } from '../../host/host.ts';
import { InflightArea, inflightAreaSize } from './inflight.ts';
import {
  CONFIG_FLAG_MIGRATION,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendRequest,
  MAX_QUEUES,
  MAX_RAM_SLOTS,
  ProtocolFeature,
  REPLY_ACK_FAILURE,
  REPLY_ACK_SUCCESS,
  REQUESTS_WITH_REPLY,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_VERSION,
  VhostUserProtocolError,
  bit,
  decodeRequest,
  encodeConfig,
  encodeHeader,
  encodeInflight,
  encodeU64,
  encodeVringState,
  hasBit,
  requestName,
  type FrontendMessage,
  type MessageHeader,
  type ProtocolErrorKind,
  type RegionSpec,
} from './messages.ts';
import type { BackendChannel } from './backend-channel.ts';
import { MemoryTable } from './memory-table.ts';
import type { RingEnv } from './rings.ts';
import { RingSet } from './ring-set.ts';
import { VhostUserHostPages, sendHostNotifier, type HostPagesEnv } from './host-pages.ts';
import type { VhostUserQueueOffload } from './offload.ts';
import { answerGetShmemConfig, offeredProtocolFeatures, shmemConfigReply } from './shmem.ts';

/** What the connection must do after a message. */
export interface Outcome {
  /** A whole reply message (header + payload) to send, with fds. */
  reply?: { bytes: Uint8Array; fds: number[] };
  /** Close the connection, with the reason logged. */
  close?: string;
}

/** Counters a session keeps (the server sums them over connections). */
export interface SessionCounters {
  messages: number;
  /** Messages refused, by error kind. */
  badMessages: Record<ProtocolErrorKind, number>;
  kicks: number;
  /** Kicks for a ring that is stopped, disabled, or broken. */
  droppedKicks: number;
  interrupts: number;
  /** Inflight-area entries that named a descriptor beyond the ring (ignored at a ring start). */
  badInflightEntries: number;
}

export function newCounters(): SessionCounters {
  return {
    messages: 0,
    badMessages: { BadHeader: 0, UnknownRequest: 0, UnsupportedRequest: 0, BadSize: 0, BadFdCount: 0, BadPayload: 0, BadState: 0, HostError: 0 },
    kicks: 0,
    droppedKicks: 0,
    interrupts: 0,
    badInflightEntries: 0,
  };
}

export interface SessionOptions {
  host: HostOps;
  model: VirtioDeviceModel;
  log: Logger;
  counters?: SessionCounters;
}

export class VhostUserSession {
  private readonly host: HostOps;
  private readonly log: Logger;
  readonly core: VirtioDeviceCore;
  readonly counters: SessionCounters;
  /** Virtio features offered in GET_FEATURES (the core's, plus vhost-user's PROTOCOL_FEATURES bit). */
  readonly offeredFeatures: bigint;
  /** The host-page mapping service handed to the device model at activation. */
  readonly hostPages: VhostUserHostPages;
  /** The queue offload handed to the device model at activation. */
  readonly queueOffload: VhostUserQueueOffload;
  /** Protocol features offered in GET_PROTOCOL_FEATURES (SHMEM when the model declares shared memory regions). */
  readonly offeredProtocolFeatures: bigint;
  /** The GET_SHMEM_CONFIG reply, when the model declares regions. */
  private readonly shmemConfig: Uint8Array | undefined;
  private ackedFeatures = 0n;
  private featuresSet = false;
  private protocolFeatures = 0n;
  private protocolFeaturesSet = false;
  private owner = false;
  /** The status byte as the front-end last set it (GET_STATUS adds the core's NEEDS_RESET). */
  private status = 0;
  private readonly table: MemoryTable;
  private readonly hostPagesEnv: HostPagesEnv;
  private readonly rings: RingSet;
  private backendChannel: BackendChannel | undefined;
  private inflight: InflightArea | undefined;
  private released = false;

  constructor(opts: SessionOptions) {
    this.host = opts.host;
    this.log = opts.log;
    this.counters = opts.counters ?? newCounters();
    if (opts.model.queueCount < 1 || opts.model.queueCount > MAX_QUEUES) {
      throw new RangeError(`device has ${opts.model.queueCount} queues; vhost-user carries 1..${MAX_QUEUES}`);
    }
    this.table = new MemoryTable(opts.host, opts.log, (memory) => this.installMemory(memory));
    const regions = opts.model.sharedMemoryRegions ?? new Map<number, bigint>();
    this.shmemConfig = regions.size > 0 ? shmemConfigReply(regions, opts.host.pageSize) : undefined;
    this.offeredProtocolFeatures = offeredProtocolFeatures(regions);
    const session = this;
    this.hostPagesEnv = {
      hasProtocol: (n) => this.hasProtocol(n),
      get channel() {
        return session.backendChannel;
      },
      get driverOk() {
        return (session.status & STATUS_DRIVER_OK) !== 0 || session.core.isActive;
      },
      queueCount: opts.model.queueCount,
      pageSize: opts.host.pageSize,
      regions,
    };
    this.hostPages = new VhostUserHostPages(this.hostPagesEnv);
    this.rings = new RingSet(opts.model.queueCount, {
      host: opts.host,
      log: opts.log,
      get core() {
        return session.core;
      },
      counters: this.counters,
      ringEnv: () => this.ringEnv,
      protocolFeaturesAcked: () => hasBit(this.ackedFeatures, VHOST_USER_F_PROTOCOL_FEATURES),
      startDevice: () => this.startDevice(),
    });
    this.queueOffload = this.rings.offload;
    this.core = new VirtioDeviceCore(
      opts.model,
      {
        interrupt: (i) => this.rings.interrupt(i),
        configInterrupt: () => this.configInterrupt(),
        hostPages: this.hostPages,
        queueOffload: this.queueOffload,
      },
      opts.log.child('core'),
    );
    this.offeredFeatures = this.core.offeredFeatures | bit(VHOST_USER_F_PROTOCOL_FEATURES);
  }

  get queueCount(): number {
    return this.rings.count;
  }

  /** Protocol features negotiated (what SET_PROTOCOL_FEATURES accepted). */
  get negotiatedProtocolFeatures(): bigint {
    return this.protocolFeatures;
  }

  private hasProtocol(n: number): boolean {
    return hasBit(this.protocolFeatures, n);
  }

  /** The negotiated channel to the front-end, or undefined. */
  get channel(): BackendChannel | undefined {
    return this.backendChannel;
  }

  setBackendChannel(ch: BackendChannel | undefined): void {
    this.backendChannel?.close();
    this.backendChannel = ch;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Message entry point

  /**
   * Handles one request whose header passed checkRequestHeader. Takes ownership of `fds`: every fd is either kept
   * by the session or closed before this returns.
   */
  handle(h: MessageHeader, payload: Uint8Array, fds: number[]): Outcome {
    this.counters.messages++;
    const owned = [...fds];
    const take = (): number => {
      const fd = owned.shift();
      if (fd === undefined) throw new Error('internal: fd count was validated');
      return fd;
    };
    try {
      // GET_SHMEM_CONFIG stays out of decodeRequest (shmem-messages.ts says why).
      if (h.request === FrontendRequest.GET_SHMEM_CONFIG) {
        const config = answerGetShmemConfig(h, payload, fds.length, this.hasProtocol(ProtocolFeature.SHMEM), this.shmemConfig);
        return this.success(h, { payload: config });
      }
      const msg = decodeRequest(h, payload, fds.length);
      const replyPayload = this.dispatch(msg, take);
      return this.success(h, replyPayload);
    } catch (e) {
      return this.failure(h, e);
    } finally {
      for (const fd of owned) this.safeClose(fd);
    }
  }

  private success(h: MessageHeader, r: ReplyPayload | undefined): Outcome {
    if (r !== undefined) return { reply: { bytes: replyBytes(h.request, r.payload), fds: r.fds ?? [] } };
    if ((h.flags & FLAG_NEED_REPLY) !== 0 && this.hasProtocol(ProtocolFeature.REPLY_ACK)) {
      return { reply: { bytes: replyBytes(h.request, encodeU64(REPLY_ACK_SUCCESS)), fds: [] } };
    }
    return {};
  }

  /**
   * A refused request: an error reply where the protocol has one (GET_CONFIG's empty payload, or a REPLY_ACK
   * failure when the front-end asked for an ack on a request without its own reply), else close.
   */
  private failure(h: MessageHeader, e: unknown): Outcome {
    const err =
      e instanceof VhostUserProtocolError
        ? e
        : new VhostUserProtocolError(e instanceof GuestMemoryError ? 'BadPayload' : 'HostError', h.request, (e as Error).message ?? String(e));
    this.counters.badMessages[err.kind]++;
    const fields = { request: requestName(h.request), kind: err.kind, reason: err.reason };
    if (h.request === FrontendRequest.GET_CONFIG && err.kind !== 'BadSize' && err.kind !== 'BadFdCount') {
      this.log.log('warn', 'GET_CONFIG refused; empty reply', fields);
      return { reply: { bytes: replyBytes(h.request, new Uint8Array(0)), fds: [] } };
    }
    if (h.request === FrontendRequest.GET_SHMEM_CONFIG) {
      // Framing is intact (the payload was read whole): an empty reply, which QEMU takes as a failed request, keeps
      // the connection, as for GET_CONFIG.
      this.log.log('warn', 'GET_SHMEM_CONFIG refused; empty reply', fields);
      return { reply: { bytes: replyBytes(h.request, new Uint8Array(0)), fds: [] } };
    }
    const ackable = !REQUESTS_WITH_REPLY.has(h.request) && (h.flags & FLAG_NEED_REPLY) !== 0 && this.hasProtocol(ProtocolFeature.REPLY_ACK);
    if (ackable) {
      this.log.log('warn', 'request refused; REPLY_ACK failure sent', fields);
      return { reply: { bytes: replyBytes(h.request, encodeU64(REPLY_ACK_FAILURE)), fds: [] } };
    }
    this.log.log('error', 'request refused; closing the connection', fields);
    return { close: `${requestName(h.request)}: ${err.kind}: ${err.reason}` };
  }

  private dispatch(m: FrontendMessage, take: () => number): ReplyPayload | undefined {
    const code = FrontendRequest[m.type];
    const state = (why: string): never => {
      throw new VhostUserProtocolError('BadState', code, why);
    };
    const needProtocol = (name: keyof typeof ProtocolFeature): void => {
      if (!this.hasProtocol(ProtocolFeature[name])) state(`protocol feature ${name} was not negotiated`);
    };
    const rings = this.rings;

    switch (m.type) {
      case 'GET_FEATURES':
        return { payload: encodeU64(this.offeredFeatures) };
      case 'SET_FEATURES': {
        const unoffered = m.features & ~this.offeredFeatures;
        if (unoffered !== 0n) state(`feature bits 0x${unoffered.toString(16)} were not offered`);
        this.ackedFeatures = m.features;
        this.featuresSet = true;
        return undefined;
      }
      case 'GET_PROTOCOL_FEATURES':
        return { payload: encodeU64(this.offeredProtocolFeatures) };
      case 'SET_PROTOCOL_FEATURES': {
        const unoffered = m.features & ~this.offeredProtocolFeatures;
        if (unoffered !== 0n) state(`protocol feature bits 0x${unoffered.toString(16)} were not offered`);
        this.protocolFeatures = m.features;
        this.protocolFeaturesSet = true;
        return undefined;
      }
      case 'SET_OWNER':
        if (this.owner) state('the session already has an owner');
        this.owner = true;
        return undefined;
      case 'RESET_OWNER':
        rings.disableAll();
        return undefined;
      case 'GET_QUEUE_NUM':
        needProtocol('MQ');
        return { payload: encodeU64(BigInt(rings.count)) };
      case 'GET_MAX_MEM_SLOTS':
        needProtocol('CONFIGURE_MEM_SLOTS');
        return { payload: encodeU64(BigInt(MAX_RAM_SLOTS)) };
      case 'SET_MEM_TABLE':
        this.table.setTable(m.regions, m.regions.map(() => take()));
        return undefined;
      case 'ADD_MEM_REG':
        needProtocol('CONFIGURE_MEM_SLOTS');
        this.table.add(m.region, take());
        return undefined;
      case 'REM_MEM_REG':
        needProtocol('CONFIGURE_MEM_SLOTS');
        this.table.remove(m.region);
        return undefined;
      case 'SET_VRING_NUM':
        rings.setNum(m.index, m.num);
        return undefined;
      case 'SET_VRING_ADDR':
        rings.setAddr(m.index, { desc: m.desc, avail: m.avail, used: m.used, flags: m.flags });
        return undefined;
      case 'SET_VRING_BASE':
        rings.setBase(m.index, m.num);
        return undefined;
      case 'GET_VRING_BASE':
        return { payload: encodeVringState({ index: m.index, num: rings.stop(m.index) }) };
      case 'SET_VRING_KICK':
        rings.ring(m.index, code);
        if (!m.hasFd) state('polling mode (a kick without an fd) is not supported');
        rings.setKick(m.index, take());
        return undefined;
      case 'SET_VRING_CALL':
        rings.ring(m.index, code);
        rings.setCall(m.index, m.hasFd ? take() : undefined);
        return undefined;
      case 'SET_VRING_ERR':
        rings.ring(m.index, code);
        rings.setErr(m.index, m.hasFd ? take() : undefined);
        return undefined;
      case 'SET_VRING_ENABLE':
        rings.setEnable(m.index, m.enable);
        return undefined;
      case 'SET_BACKEND_REQ_FD': {
        needProtocol('BACKEND_REQ');
        this.setBackendChannel(this.channelFactory(take()));
        return undefined;
      }
      case 'GET_CONFIG': {
        needProtocol('CONFIG');
        const data = this.core.readConfig(m.offset, m.size);
        if (data === undefined) state(`config access [${m.offset}, ${m.offset + m.size}) is outside the ${this.core.model.configSize}-byte config space`);
        return { payload: encodeConfig({ offset: m.offset, flags: m.flags, data: data! }) };
      }
      case 'SET_CONFIG': {
        needProtocol('CONFIG');
        if (m.offset + m.data.length > this.core.model.configSize) {
          state(`config access [${m.offset}, ${m.offset + m.data.length}) is outside the ${this.core.model.configSize}-byte config space`);
        }
        if (!this.core.writeConfig(m.offset, m.data) && m.flags !== CONFIG_FLAG_MIGRATION) {
          state(`config bytes [${m.offset}, ${m.offset + m.data.length}) are read-only`);
        }
        return undefined;
      }
      case 'SET_STATUS':
        needProtocol('STATUS');
        this.setStatus(m.status);
        return undefined;
      case 'GET_STATUS':
        needProtocol('STATUS');
        return { payload: encodeU64(BigInt(this.status | (this.core.deviceStatus & STATUS_DEVICE_NEEDS_RESET))) };
      case 'RESET_DEVICE':
        needProtocol('RESET_DEVICE');
        this.resetDevice();
        return undefined;
      case 'GET_INFLIGHT_FD': {
        needProtocol('INFLIGHT_SHMFD');
        if (rings.anyStarted) state('the inflight area cannot change while a ring is started');
        if (m.numQueues > rings.count) state(`num_queues ${m.numQueues} exceeds the queue count ${rings.count}`);
        const max = this.core.maxQueueSize(0);
        if (m.queueSize > max) state(`queue_size ${m.queueSize} exceeds the maximum ${max}`);
        const size = inflightAreaSize(m.numQueues, m.queueSize);
        const fd = this.host.memfd('vhost-user-inflight', size);
        let area: InflightArea;
        try {
          area = InflightArea.create(this.host, fd, size, m.numQueues, m.queueSize);
        } catch (e) {
          this.safeClose(fd);
          throw e;
        }
        this.inflight?.release();
        this.inflight = area;
        // The reply lends the area's memfd: sendmsg gives the front-end its own copy, ours stays with the area.
        return { payload: encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: m.numQueues, queueSize: m.queueSize }), fds: [fd] };
      }
      case 'SET_INFLIGHT_FD': {
        needProtocol('INFLIGHT_SHMFD');
        const fd = take();
        if (rings.anyStarted) {
          this.safeClose(fd);
          state('the inflight area cannot change while a ring is started');
        }
        if (m.numQueues > rings.count) {
          this.safeClose(fd);
          state(`num_queues ${m.numQueues} exceeds the queue count ${rings.count}`);
        }
        let area: InflightArea;
        try {
          area = InflightArea.attach(this.host, fd, m.mmapSize, m.mmapOffset, m.numQueues, m.queueSize);
        } catch (e) {
          this.safeClose(fd);
          throw e;
        }
        this.inflight?.release();
        this.inflight = area;
        return undefined;
      }
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Features

  private get packed(): boolean {
    return (this.ackedFeatures & bit(Number(F_RING_PACKED))) !== 0n;
  }

  /** Virtio features for the device core (the vhost-user-only bits removed). */
  private get virtioFeatures(): bigint {
    return this.ackedFeatures & ~bit(VHOST_USER_F_PROTOCOL_FEATURES);
  }

  /** What building a ring's queue depends on, as of now. */
  private get ringEnv(): RingEnv {
    return {
      memory: this.table.memory,
      hasMemory: !this.table.empty,
      packed: this.packed,
      eventIdx: (this.ackedFeatures & bit(Number(F_EVENT_IDX))) !== 0n,
      indirect: (this.ackedFeatures & bit(Number(F_INDIRECT_DESC))) !== 0n,
      inflight: this.inflight,
      log: this.log,
      badInflightEntries: (n) => (this.counters.badInflightEntries += n),
    };
  }

  // -------------------------------------------------------------------------------------------------------------
  // Memory

  /**
   * A new memory map (the table calls this before it unmaps any dropped region). Started rings are rebuilt over
   * it first (their views pointed into the old mappings; a ring no longer inside guest memory breaks its queue),
   * then the device model is told through the core, so that when the model re-checks what it holds the queues it
   * reads are already the new ones, and the old regions are still mapped while it lets go of them.
   */
  private installMemory(memory: GuestMemory): void {
    this.rings.rebuildAll();
    this.core.setMemory(memory);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Status and device lifecycle

  private setStatus(value: number): void {
    if (value === 0) {
      // A device reset: the device model releases what the driver created, and nothing is in flight any more.
      this.core.reset();
      this.rings.reclaimTakes('device reset (SET_STATUS 0)');
      this.inflight?.clearAll(this.packed ? 'packed' : 'split');
      this.status = 0;
      return;
    }
    const added = value & ~this.status;
    this.status = value;
    if ((added & STATUS_DRIVER_OK) !== 0 && !this.core.isActive) this.startDevice();
  }

  /** Starts the device (DRIVER_OK, or the first kick of an enabled ring) and serves rings restarted mid-flight. */
  private startDevice(): void {
    this.activateCore();
    this.rings.serveResubmissions();
  }

  /**
   * Runs the virtio init sequence on the core with what the front-end negotiated: features, memory, started
   * queues, DRIVER_OK. A refusal shows as NEEDS_RESET in GET_STATUS.
   */
  private activateCore(): void {
    if (this.core.deviceStatus !== 0) this.core.reset();
    this.core.setStatus(STATUS_ACKNOWLEDGE);
    this.core.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    this.core.setDriverFeatures(this.virtioFeatures);
    this.core.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if ((this.core.deviceStatus & STATUS_FEATURES_OK) === 0) {
      this.log.log('error', 'the device refused the negotiated features', { features: '0x' + this.virtioFeatures.toString(16) });
      return;
    }
    this.core.setMemory(this.table.memory);
    this.rings.all.forEach((r, i) => this.core.setQueue(i, r.queue));
    this.core.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    this.log.log('info', 'device started', { queues: this.rings.all.filter((r) => r.queue !== undefined).length });
  }

  private resetDevice(): void {
    this.core.reset();
    this.inflight?.clearAll(this.packed ? 'packed' : 'split');
    this.status = 0;
    this.ackedFeatures = 0n;
    this.featuresSet = false;
    this.rings.clearAll('device reset (RESET_DEVICE)');
  }

  private configInterrupt(): void {
    this.rings.signalBroken();
    if (this.hasProtocol(ProtocolFeature.CONFIG) && this.backendChannel !== undefined) {
      this.backendChannel.configChanged().catch((e: unknown) => {
        this.log.log('warn', 'CONFIG_CHANGE_MSG not delivered', { error: (e as Error).message });
      });
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Back-end channel

  /** Set by the connection: builds the back-end channel over an fd the front-end gave. */
  channelFactory: (fd: number) => BackendChannel = (fd) => {
    this.safeClose(fd);
    throw new VhostUserProtocolError('HostError', FrontendRequest.SET_BACKEND_REQ_FD, 'no back-end channel factory');
  };

  /**
   * VRING_HOST_NOTIFIER_MSG (host-pages.ts): asks the front-end to map `size` bytes at `offset` of `fd` over queue
   * `index`'s notify page, or to remove it (`fd` undefined). Resolves to the front-end's answer (0 = mapped) when
   * REPLY_ACK is negotiated, else undefined. Device models use hostPages (HostPageMapper) instead.
   */
  setHostNotifier(index: number, fd: number | undefined, size: number, offset: number): Promise<bigint | undefined> {
    return sendHostNotifier(this.hostPagesEnv, index, fd, size, BigInt(offset));
  }

  // -------------------------------------------------------------------------------------------------------------
  // Teardown

  private safeClose(fd: number): void {
    try {
      this.host.close(fd);
    } catch (e) {
      this.log.log('error', 'close failed', { fd, error: (e as Error).message });
    }
  }

  /** Releases everything: device reset, kick watchers, fds, mappings, inflight area, back-end channel. */
  release(): void {
    if (this.released) return;
    this.released = true;
    try {
      this.core.reset();
    } catch (e) {
      this.log.log('error', 'device reset failed during release', { error: (e as Error).message });
    }
    this.rings.clearAll('the connection closed');
    this.table.release();
    this.inflight?.release();
    this.inflight = undefined;
    // The VMM drops every shared memory mapping when the back-end goes away (spec 13.14): forget them too.
    const dropped = this.hostPages.shmem.dropAll();
    if (dropped > 0) this.log.log('info', 'shared memory mappings dropped with the connection', { dropped });
    this.setBackendChannel(undefined);
  }

  /** For tests and diagnostics: a snapshot of the session's state. */
  describe(): {
    owner: boolean;
    featuresSet: boolean;
    ackedFeatures: bigint;
    protocolFeatures: bigint;
    protocolFeaturesSet: boolean;
    status: number;
    regions: RegionSpec[];
    rings: ReturnType<RingSet['describe']>;
    inflight: boolean;
    backendChannel: boolean;
  } {
    return {
      owner: this.owner,
      featuresSet: this.featuresSet,
      ackedFeatures: this.ackedFeatures,
      protocolFeatures: this.protocolFeatures,
      protocolFeaturesSet: this.protocolFeaturesSet,
      status: this.status | (this.core.deviceStatus & STATUS_DEVICE_NEEDS_RESET),
      regions: this.table.specs,
      rings: this.rings.describe(),
      inflight: this.inflight !== undefined,
      backendChannel: this.backendChannel !== undefined,
    };
  }

  /** The guest memory map (tests, host-notifier users). */
  get guestMemory(): GuestMemory {
    return this.table.memory;
  }
}

interface ReplyPayload {
  payload: Uint8Array;
  fds?: number[];
}

/** A reply: same request code, flags exactly REPLY | version (QEMU checks that), the payload. */
export function replyBytes(request: number, payload: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(12 + payload.length);
  encodeHeader({ request, flags: FLAG_REPLY | VHOST_USER_VERSION, size: payload.length }, bytes);
  bytes.set(payload, 12);
  return bytes;
}
