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

import { GuestMemory, GuestMemoryError, type MemoryRegionSpec } from '../../memory/guest-memory.ts';
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
import { PACKED_EVENT_SIZE, descTableSize, splitAvailSize, splitUsedSize } from '../../abi/virtqueue.ts';
import { checkQueueOptions, createQueue } from '../../virtqueue/index.ts';
import type { DeviceQueue, QueueOptions } from '../../virtqueue/queue.ts';
import type { HostOps, Watch } from './host.ts';
import { InflightArea, InflightPackedQueue, InflightSplitQueue, inflightAreaSize, walkSplitHead, type SplitResubmission } from './inflight.ts';
import {
  BackendRequest,
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
  SUPPORTED_PROTOCOL_FEATURES,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_VERSION,
  VRING_NOFD_MASK,
  VhostUserProtocolError,
  bit,
  decodeRequest,
  encodeConfig,
  encodeHeader,
  encodeInflight,
  encodeU64,
  encodeVringArea,
  encodeVringState,
  hasBit,
  requestName,
  type FrontendMessage,
  type MessageHeader,
  type ProtocolErrorKind,
  type RegionSpec,
} from './messages.ts';
import type { BackendChannel } from './backend-channel.ts';

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

interface MappedRegion {
  spec: RegionSpec;
  fd: number;
  /** The whole mapping: [0, mmapOffset + size) of the fd. */
  buffer: ArrayBuffer;
}

interface Ring {
  num: number | undefined;
  addr: { desc: number; avail: number; used: number; flags: number } | undefined;
  /** SET_VRING_BASE value (split: next avail index; packed: index | wrap << 15). */
  base: number;
  kickFd: number | undefined;
  callFd: number | undefined;
  errFd: number | undefined;
  kickWatch: Watch | undefined;
  /** SET_VRING_ENABLE state. */
  enabled: boolean;
  queue: DeviceQueue | undefined;
}

function newRing(): Ring {
  return {
    num: undefined,
    addr: undefined,
    base: 0,
    kickFd: undefined,
    callFd: undefined,
    errFd: undefined,
    kickWatch: undefined,
    enabled: false,
    queue: undefined,
  };
}

const PACKED_WRAP_BIT = 1 << 15;

/** The descriptor area as u16 words (the packed inflight tracking reads the raw descriptors it copies). */
function ringWords(opts: QueueOptions): Uint16Array {
  const d = opts.rings.desc;
  return new Uint16Array(d.buffer, d.byteOffset, d.byteLength >> 1);
}

function hasResubmissions(q: DeviceQueue | undefined): boolean {
  return (q instanceof InflightSplitQueue || q instanceof InflightPackedQueue) && q.pendingResubmissions > 0;
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
  private ackedFeatures = 0n;
  private featuresSet = false;
  private protocolFeatures = 0n;
  private protocolFeaturesSet = false;
  private owner = false;
  /** The status byte as the front-end last set it (GET_STATUS adds the core's NEEDS_RESET). */
  private status = 0;
  private regions: MappedRegion[] = [];
  private memory: GuestMemory = GuestMemory.empty();
  private readonly rings: Ring[];
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
    this.core = new VirtioDeviceCore(opts.model, {
      interrupt: (i) => this.interrupt(i),
      configInterrupt: () => this.configInterrupt(),
    }, opts.log.child('core'));
    this.offeredFeatures = this.core.offeredFeatures | bit(VHOST_USER_F_PROTOCOL_FEATURES);
    this.rings = Array.from({ length: opts.model.queueCount }, newRing);
  }

  get queueCount(): number {
    return this.rings.length;
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
    const ring = (index: number): Ring => {
      const r = this.rings[index];
      if (r === undefined) state(`queue index ${index} is not below the queue count ${this.rings.length}`);
      return r!;
    };

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
        return { payload: encodeU64(SUPPORTED_PROTOCOL_FEATURES) };
      case 'SET_PROTOCOL_FEATURES': {
        const unoffered = m.features & ~SUPPORTED_PROTOCOL_FEATURES;
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
        // Deprecated; vhost-user.rst recommends ignoring it or disabling all rings. Rings are disabled.
        for (const r of this.rings) r.enabled = false;
        return undefined;
      case 'GET_QUEUE_NUM':
        needProtocol('MQ');
        return { payload: encodeU64(BigInt(this.rings.length)) };
      case 'GET_MAX_MEM_SLOTS':
        needProtocol('CONFIGURE_MEM_SLOTS');
        return { payload: encodeU64(BigInt(MAX_RAM_SLOTS)) };
      case 'SET_MEM_TABLE':
        this.setMemTable(m.regions, m.regions.map(() => take()));
        return undefined;
      case 'ADD_MEM_REG':
        needProtocol('CONFIGURE_MEM_SLOTS');
        this.addRegion(m.region, take());
        return undefined;
      case 'REM_MEM_REG':
        needProtocol('CONFIGURE_MEM_SLOTS');
        this.removeRegion(m.region);
        return undefined;
      case 'SET_VRING_NUM': {
        const r = ring(m.index);
        if (r.queue !== undefined) state(`ring ${m.index} is started; stop it (GET_VRING_BASE) first`);
        const max = this.core.model.maxQueueSize(m.index);
        if (m.num < 1 || m.num > max) state(`ring ${m.index} size ${m.num} is not in 1..${max}`);
        if (!this.packed && (m.num & (m.num - 1)) !== 0) state(`split ring ${m.index} size ${m.num} is not a power of two`);
        r.num = m.num;
        return undefined;
      }
      case 'SET_VRING_ADDR': {
        const r = ring(m.index);
        if (r.num === undefined) state(`ring ${m.index} has no size yet (SET_VRING_NUM first)`);
        if (this.packed && (m.avail % 4 !== 0 || m.used % 4 !== 0)) {
          state('packed ring event suppression areas must be 4-byte aligned');
        }
        const addr = { desc: m.desc, avail: m.avail, used: m.used, flags: m.flags };
        this.resolveRings(m.index, r.num!, addr); // throws BadState when an area is not inside one region
        r.addr = addr;
        if (r.queue !== undefined) this.restartQueue(m.index, r);
        return undefined;
      }
      case 'SET_VRING_BASE': {
        const r = ring(m.index);
        if (r.queue !== undefined) state(`ring ${m.index} is started; stop it (GET_VRING_BASE) first`);
        if (this.packed) {
          if ((m.num & ~(PACKED_WRAP_BIT | 0x7fff)) !== 0) state(`packed ring base 0x${m.num.toString(16)} has bits above 15`);
          if (r.num !== undefined && (m.num & 0x7fff) >= r.num) state(`packed ring base index ${m.num & 0x7fff} is not below the size ${r.num}`);
        } else if (m.num > 0xffff) {
          state(`split ring base ${m.num} does not fit 16 bits`);
        }
        r.base = m.num;
        return undefined;
      }
      case 'GET_VRING_BASE': {
        const r = ring(m.index);
        const base = this.stopRing(m.index, r);
        return { payload: encodeVringState({ index: m.index, num: base }) };
      }
      case 'SET_VRING_KICK': {
        const r = ring(m.index);
        if (!m.hasFd) state('polling mode (a kick without an fd) is not supported');
        this.setKick(m.index, r, take());
        return undefined;
      }
      case 'SET_VRING_CALL': {
        const r = ring(m.index);
        const fd = m.hasFd ? take() : undefined;
        if (r.callFd !== undefined) this.safeClose(r.callFd);
        r.callFd = fd;
        return undefined;
      }
      case 'SET_VRING_ERR': {
        const r = ring(m.index);
        const fd = m.hasFd ? take() : undefined;
        if (r.errFd !== undefined) this.safeClose(r.errFd);
        r.errFd = fd;
        return undefined;
      }
      case 'SET_VRING_ENABLE': {
        const r = ring(m.index);
        r.enabled = m.enable;
        // Buffers posted while the ring was disabled are served now.
        if (m.enable && r.queue !== undefined && this.core.isActive) this.notifyCore(m.index);
        return undefined;
      }
      case 'SET_BACKEND_REQ_FD': {
        needProtocol('BACKEND_REQ');
        const fd = take();
        this.setBackendChannel(this.makeChannel(fd));
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
        if (this.rings.some((r) => r.queue !== undefined)) state('the inflight area cannot change while a ring is started');
        if (m.numQueues > this.rings.length) state(`num_queues ${m.numQueues} exceeds the queue count ${this.rings.length}`);
        const max = this.core.model.maxQueueSize(0);
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
        if (this.rings.some((r) => r.queue !== undefined)) {
          this.safeClose(fd);
          state('the inflight area cannot change while a ring is started');
        }
        if (m.numQueues > this.rings.length) {
          this.safeClose(fd);
          state(`num_queues ${m.numQueues} exceeds the queue count ${this.rings.length}`);
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

  // -------------------------------------------------------------------------------------------------------------
  // Memory

  private checkFileHolds(fd: number, spec: RegionSpec, code: number): number {
    const size = this.host.fileSize(fd);
    const need = spec.mmapOffset + spec.size;
    if (need > size) {
      throw new VhostUserProtocolError('BadPayload', code, `region [mmap offset ${spec.mmapOffset}, +${spec.size}) ends past the end of its fd (${size} bytes)`);
    }
    return need;
  }

  /** Maps each region's fd from offset 0 (mmap offsets need not be page aligned) to mmapOffset + size. */
  private mapRegion(spec: RegionSpec, fd: number, code: number): MappedRegion {
    const length = this.checkFileHolds(fd, spec, code);
    let buffer: ArrayBuffer;
    try {
      buffer = this.host.mmapShared(fd, length, 0);
    } catch (e) {
      throw new VhostUserProtocolError('HostError', code, `mmap of ${length} bytes failed: ${(e as Error).message}`);
    }
    return { spec, fd, buffer };
  }

  private buildMemory(regions: MappedRegion[], code: number): GuestMemory {
    const specs: MemoryRegionSpec[] = regions.map((r) => ({
      guestPhysAddr: r.spec.guestPhysAddr,
      size: r.spec.size,
      userAddr: r.spec.userAddr,
      buffer: r.buffer,
      bufferOffset: r.spec.mmapOffset,
    }));
    try {
      return new GuestMemory(specs);
    } catch (e) {
      if (e instanceof GuestMemoryError) throw new VhostUserProtocolError('BadPayload', code, e.message);
      throw e;
    }
  }

  private unmapRegion(r: MappedRegion): void {
    try {
      this.host.munmap(r.buffer);
    } catch (e) {
      this.log.log('error', 'munmap failed', { error: (e as Error).message });
    }
    this.safeClose(r.fd);
  }

  private setMemTable(specs: RegionSpec[], fds: number[]): void {
    const code = FrontendRequest.SET_MEM_TABLE;
    const mapped: MappedRegion[] = [];
    try {
      specs.forEach((s, i) => mapped.push(this.mapRegion(s, fds[i]!, code)));
      const memory = this.buildMemory(mapped, code);
      this.replaceMemory(mapped, memory, this.regions);
    } catch (e) {
      for (const r of mapped) this.unmapRegion(r);
      for (const fd of fds.slice(mapped.length)) this.safeClose(fd);
      throw e;
    }
  }

  private addRegion(spec: RegionSpec, fd: number): void {
    const code = FrontendRequest.ADD_MEM_REG;
    if (this.regions.length >= MAX_RAM_SLOTS) {
      this.safeClose(fd);
      throw new VhostUserProtocolError('BadState', code, `all ${MAX_RAM_SLOTS} memory slots are in use`);
    }
    let r: MappedRegion;
    try {
      r = this.mapRegion(spec, fd, code);
    } catch (e) {
      this.safeClose(fd);
      throw e;
    }
    try {
      const next = [...this.regions, r];
      this.replaceMemory(next, this.buildMemory(next, code), []);
    } catch (e) {
      this.unmapRegion(r);
      throw e;
    }
  }

  private removeRegion(spec: RegionSpec): void {
    const code = FrontendRequest.REM_MEM_REG;
    // Identified by guest address, user address and size; the mmap offset is ignored (vhost-user.rst).
    const i = this.regions.findIndex(
      (r) => r.spec.guestPhysAddr === spec.guestPhysAddr && r.spec.userAddr === spec.userAddr && r.spec.size === spec.size,
    );
    if (i < 0) {
      throw new VhostUserProtocolError('BadState', code, `no region at guest 0x${spec.guestPhysAddr.toString(16)} user 0x${spec.userAddr.toString(16)} size ${spec.size}`);
    }
    const next = this.regions.filter((_, j) => j !== i);
    this.replaceMemory(next, this.buildMemory(next, code), [this.regions[i]!]);
  }

  /**
   * Installs a new memory map and unmaps `dropped`. Started rings are rebuilt over the new map (their views
   * pointed into the old mappings); a ring whose areas are no longer inside guest memory breaks its queue.
   */
  private replaceMemory(regions: MappedRegion[], memory: GuestMemory, dropped: MappedRegion[]): void {
    this.regions = regions;
    this.memory = memory;
    this.core.setMemory(memory);
    this.rings.forEach((r, i) => {
      if (r.queue !== undefined) this.restartQueue(i, r);
    });
    for (const d of dropped) this.unmapRegion(d);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Rings

  /** Views of the three ring areas through the front-end's virtual addresses, each inside one region. */
  private resolveRings(index: number, num: number, addr: { desc: number; avail: number; used: number }): QueueOptions['rings'] {
    const code = FrontendRequest.SET_VRING_ADDR;
    if (this.regions.length === 0) throw new VhostUserProtocolError('BadState', code, 'no memory table yet (SET_MEM_TABLE first)');
    const sizes = this.packed
      ? { desc: descTableSize(num), driver: PACKED_EVENT_SIZE, device: PACKED_EVENT_SIZE }
      : { desc: descTableSize(num), driver: splitAvailSize(num), device: splitUsedSize(num) };
    const area = (what: string, uva: number, len: number): Uint8Array => {
      const v = this.memory.contiguousUser(uva, len);
      if (v === undefined) {
        throw new VhostUserProtocolError('BadState', code, `ring ${index} ${what} [0x${uva.toString(16)}, +${len}) is not inside one memory region`);
      }
      return v;
    };
    return {
      desc: area('descriptor area', addr.desc, sizes.desc),
      driver: area(this.packed ? 'driver area' : 'available ring', addr.avail, sizes.driver),
      device: area(this.packed ? 'device area' : 'used ring', addr.used, sizes.device),
    };
  }

  private queueOptions(index: number, r: Ring): QueueOptions {
    const rings = this.resolveRings(index, r.num!, r.addr!);
    const opts: QueueOptions = {
      size: r.num!,
      rings,
      memory: this.memory,
      eventIdx: (this.ackedFeatures & bit(Number(F_EVENT_IDX))) !== 0n,
      indirect: (this.ackedFeatures & bit(Number(F_INDIRECT_DESC))) !== 0n,
    };
    if (this.packed) {
      // QEMU's packed base: the next available slot with its wrap counter in bit 15; the used side resumes there
      // too (everything before it was completed when the ring stopped).
      const wrap = (r.base & PACKED_WRAP_BIT) !== 0;
      opts.state = { nextAvail: r.base & 0x7fff, availWrap: wrap, nextUsed: r.base & 0x7fff, usedWrap: wrap };
    } else {
      // Split: SET_VRING_BASE carries only the available index; the used side resumes from the used index the
      // driver sees (the queue reads it when nextUsed is absent).
      opts.state = { nextAvail: r.base & 0xffff, nextUsed: Atomics.load(new Uint16Array(rings.device.buffer, rings.device.byteOffset, 2), 1) };
    }
    return opts;
  }

  private setKick(index: number, r: Ring, fd: number): void {
    const code = FrontendRequest.SET_VRING_KICK;
    const refuse = (why: string): never => {
      this.safeClose(fd);
      throw new VhostUserProtocolError('BadState', code, why);
    };
    if (r.num === undefined || r.addr === undefined) refuse(`ring ${index} is not configured (SET_VRING_NUM and SET_VRING_ADDR first)`);
    let opts: QueueOptions;
    try {
      opts = this.queueOptions(index, r);
    } catch (e) {
      refuse((e as Error).message);
    }
    const why = checkQueueOptions(this.packed ? 'packed' : 'split', opts!);
    if (why !== undefined) refuse(`ring ${index}: ${why}`);
    // A new kick fd for a started ring replaces the old one; the queue keeps its position.
    const previous = r.queue;
    const state = previous?.getState();
    if (state !== undefined) opts!.state = state;
    this.stopKickWatch(r);
    r.kickFd = fd;
    if (previous instanceof InflightSplitQueue) {
      previous.rebind(createQueue('split', opts!), this.headWalker(opts!));
    } else if (previous instanceof InflightPackedQueue) {
      previous.rebind(createQueue('packed', opts!), ringWords(opts!), opts!.memory);
    } else if (previous === undefined && !this.packed && this.inflight !== undefined) {
      r.queue = this.trackedSplitQueue(index, opts!);
    } else if (previous === undefined && this.packed && this.inflight !== undefined) {
      r.queue = this.trackedPackedQueue(index, opts!);
    } else {
      r.queue = createQueue(this.packed ? 'packed' : 'split', opts!);
    }
    this.core.setQueue(index, r.queue);
    r.kickWatch = this.host.watchReadable(fd, () => this.onKick(index));
    if (this.core.isActive && hasResubmissions(r.queue)) this.notifyCore(index);
  }

  /**
   * A packed ring starting with an inflight area. The area, not SET_VRING_BASE, says where the ring is once it
   * has tracked it: a packed ring has no used index in guest memory, and QEMU does not restore its base after
   * losing the back-end. The chains in flight are resubmitted first; the driver's next available slot is past them.
   */
  private trackedPackedQueue(index: number, opts: QueueOptions): DeviceQueue {
    const region = this.inflight!.packedRegion(index, opts.size);
    if (typeof region === 'string') {
      this.log.log('warn', 'ring not tracked in the inflight area', { queue: index, reason: region });
      return createQueue('packed', opts);
    }
    const ring = ringWords(opts);
    const recovered = region.recover(ring, opts.size, { index: opts.state!.nextAvail, wrap: opts.state!.availWrap ?? true });
    if (recovered.invalid > 0) {
      this.counters.badInflightEntries += recovered.invalid;
      this.log.log('warn', 'malformed inflight entries ignored', { queue: index, entries: recovered.invalid });
    }
    if (!recovered.fresh) {
      const s = recovered.state;
      if (s.nextAvail !== opts.state!.nextAvail || s.availWrap !== opts.state!.availWrap) {
        this.log.log('info', 'packed ring resumes where the inflight area says', { queue: index, base: opts.state!.nextAvail | (opts.state!.availWrap === true ? PACKED_WRAP_BIT : 0), avail: s.nextAvail | (s.availWrap ? PACKED_WRAP_BIT : 0) });
      }
      opts.state = s;
    }
    if (recovered.chains.length > 0) this.log.log('info', 'resubmitting requests in flight', { queue: index, count: recovered.chains.length });
    return new InflightPackedQueue(createQueue('packed', opts), ring, region, recovered, opts.memory, opts.indirect);
  }

  private headWalker(opts: QueueOptions): (head: number) => ReturnType<typeof walkSplitHead> {
    return (head) => walkSplitHead(opts.rings.desc, opts.size, opts.memory, opts.indirect, head);
  }

  /**
   * A split ring starting with an inflight area: what the area says was in flight is resubmitted first, and the
   * ring resumes after it (used->idx + chains in flight, as the front-end's SET_VRING_BASE after a back-end crash
   * is used->idx: QEMU's restore of last_avail_idx).
   */
  private trackedSplitQueue(index: number, opts: QueueOptions): DeviceQueue {
    const region = this.inflight!.splitRegion(index, opts.size);
    if (typeof region === 'string') {
      this.log.log('warn', 'ring not tracked in the inflight area', { queue: index, reason: region });
      return createQueue('split', opts);
    }
    const recovered: SplitResubmission = region.recover(opts.size, opts.state!.nextUsed);
    if (recovered.invalid.length > 0) {
      this.counters.badInflightEntries += recovered.invalid.length;
      this.log.log('warn', 'inflight entries beyond the ring size ignored', { queue: index, heads: recovered.invalid.join(',') });
    }
    if (recovered.heads.length > 0) {
      opts.state = { nextAvail: (recovered.usedIdx + recovered.heads.length) & 0xffff, nextUsed: recovered.usedIdx };
      this.log.log('info', 'resubmitting requests in flight', { queue: index, count: recovered.heads.length });
    }
    return new InflightSplitQueue(createQueue('split', opts), region, recovered, this.headWalker(opts));
  }

  /** Rings restarted with chains in flight get them served without waiting for a kick that may never come. */
  private serveResubmissions(): void {
    this.rings.forEach((r, i) => {
      if (hasResubmissions(r.queue)) this.notifyCore(i);
    });
  }

  /** Rebuilds a started ring's queue (new memory map or new addresses), keeping its position. */
  private restartQueue(index: number, r: Ring): void {
    const old = r.queue!;
    const st = old.getState();
    r.base = this.packed ? (st.nextAvail | (st.availWrap ? PACKED_WRAP_BIT : 0)) : st.nextAvail;
    try {
      const opts = this.queueOptions(index, r);
      opts.state = this.packed ? st : { nextAvail: st.nextAvail, nextUsed: st.nextUsed };
      if (old instanceof InflightSplitQueue) {
        old.rebind(createQueue('split', opts), this.headWalker(opts));
      } else if (old instanceof InflightPackedQueue) {
        old.rebind(createQueue('packed', opts), ringWords(opts), opts.memory);
      } else {
        r.queue = createQueue(this.packed ? 'packed' : 'split', opts);
      }
      this.core.setQueue(index, r.queue);
    } catch (e) {
      this.log.log('error', 'ring no longer inside guest memory after a memory map change', { queue: index, error: (e as Error).message });
      r.queue = undefined;
      this.core.queueBroken(index, e as Error);
    }
  }

  private stopKickWatch(r: Ring): void {
    r.kickWatch?.stop();
    r.kickWatch = undefined;
    if (r.kickFd !== undefined) this.safeClose(r.kickFd);
    r.kickFd = undefined;
  }

  /** GET_VRING_BASE: stops the ring and returns where the front-end resumes. */
  private stopRing(index: number, r: Ring): number {
    this.stopKickWatch(r);
    let base = r.base;
    if (r.queue !== undefined) {
      const st = r.queue.getState();
      base = this.packed ? (st.nextAvail | (st.availWrap ? PACKED_WRAP_BIT : 0)) : st.nextAvail;
      r.queue = undefined;
    }
    r.base = base;
    return base;
  }

  private onKick(index: number): void {
    const r = this.rings[index];
    if (r === undefined || r.kickFd === undefined) return;
    if (r.queue !== undefined && this.core.isActive && !this.core.isQueueStopped(index) && (r.enabled || !this.protocolFeaturesAcked)) {
      // A running ring is served before its kick eventfd is read, so that the read syscall is not on the request's
      // path. The read may consume a kick for a buffer the driver published after the drain ended (the driver
      // publishes before it kicks, so that buffer is visible now): hence the second look.
      this.notifyCore(index);
      const value = this.readKick(index, r);
      if (value === undefined) return;
      this.counters.kicks++;
      if (r.queue?.hasAvailable() === true && !this.core.isQueueStopped(index)) this.notifyCore(index);
      return;
    }
    const value = this.readKick(index, r);
    if (value === undefined) return;
    this.counters.kicks++;
    const enabled = r.enabled || !this.protocolFeaturesAcked;
    if (r.queue === undefined || !enabled) {
      this.counters.droppedKicks++;
      return;
    }
    if (!this.core.isActive) {
      this.activateCore();
      this.serveResubmissions();
    }
    this.notifyCore(index);
  }

  /** Reads (resets) a ring's kick eventfd: its count, undefined when nothing was pending or the read failed. */
  private readKick(index: number, r: Ring): bigint | undefined {
    try {
      return this.host.eventfdRead(r.kickFd!);
    } catch (e) {
      this.log.log('error', 'kick eventfd read failed', { queue: index, error: (e as Error).message });
      this.stopKickWatch(r);
      return undefined;
    }
  }

  /** With VHOST_USER_F_PROTOCOL_FEATURES acked, rings start disabled until SET_VRING_ENABLE (vhost-user.rst). */
  private get protocolFeaturesAcked(): boolean {
    return hasBit(this.ackedFeatures, VHOST_USER_F_PROTOCOL_FEATURES);
  }

  private notifyCore(index: number): void {
    try {
      this.core.notify(index);
    } catch (e) {
      // A model that throws is a bug in the model or a driver error it did not catch: the device needs a reset,
      // the process goes on.
      this.core.queueBroken(index, e as Error);
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Status and device lifecycle

  private setStatus(value: number): void {
    if (value === 0) {
      // A device reset: the device model releases what the driver created, and nothing is in flight any more.
      this.core.reset();
      this.inflight?.clearAll(this.packed ? 'packed' : 'split');
      this.status = 0;
      return;
    }
    const added = value & ~this.status;
    this.status = value;
    if ((added & STATUS_DRIVER_OK) !== 0 && !this.core.isActive) {
      this.activateCore();
      this.serveResubmissions();
    }
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
    this.core.setMemory(this.memory);
    this.rings.forEach((r, i) => this.core.setQueue(i, r.queue));
    this.core.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    this.log.log('info', 'device started', { queues: this.rings.filter((r) => r.queue !== undefined).length });
  }

  private resetDevice(): void {
    this.core.reset();
    this.inflight?.clearAll(this.packed ? 'packed' : 'split');
    this.status = 0;
    this.ackedFeatures = 0n;
    this.featuresSet = false;
    this.rings.forEach((r, i) => this.clearRing(i, r));
  }

  private clearRing(_index: number, r: Ring): void {
    this.stopKickWatch(r);
    if (r.callFd !== undefined) this.safeClose(r.callFd);
    if (r.errFd !== undefined) this.safeClose(r.errFd);
    Object.assign(r, newRing());
  }

  private interrupt(index: number): void {
    const fd = this.rings[index]?.callFd;
    if (fd === undefined) return;
    this.counters.interrupts++;
    try {
      this.host.eventfdWrite(fd, 1n);
    } catch (e) {
      this.log.log('error', 'call eventfd write failed', { queue: index, error: (e as Error).message });
    }
  }

  private configInterrupt(): void {
    // A broken queue: tell the front-end on that ring's error fd (QEMU reports "vhost vring error").
    this.rings.forEach((r, i) => {
      if (r.errFd !== undefined && r.queue !== undefined && this.core.isQueueStopped(i)) {
        try {
          this.host.eventfdWrite(r.errFd, 1n);
        } catch {
          /* the front-end closed it; nothing to tell */
        }
      }
    });
    if (this.hasProtocol(ProtocolFeature.CONFIG) && this.backendChannel !== undefined) {
      this.backendChannel.configChanged().catch((e: unknown) => {
        this.log.log('warn', 'CONFIG_CHANGE_MSG not delivered', { error: (e as Error).message });
      });
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Back-end channel

  private makeChannel(fd: number): BackendChannel {
    // Imported lazily to keep the dependency one-way in the type graph.
    return this.channelFactory(fd);
  }

  /** Set by the connection: builds the back-end channel over an fd the front-end gave. */
  channelFactory: (fd: number) => BackendChannel = (fd) => {
    this.safeClose(fd);
    throw new VhostUserProtocolError('HostError', FrontendRequest.SET_BACKEND_REQ_FD, 'no back-end channel factory');
  };

  /**
   * VRING_HOST_NOTIFIER_MSG: asks the front-end to map `size` bytes at `offset` of `fd` over queue `index`'s notify
   * page. Valid only after DRIVER_OK with HOST_NOTIFIER, BACKEND_REQ and BACKEND_SEND_FD negotiated. Resolves to
   * the front-end's answer (0 = mapped) when REPLY_ACK is negotiated, else undefined.
   */
  async setHostNotifier(index: number, fd: number | undefined, size: number, offset: number): Promise<bigint | undefined> {
    for (const f of ['HOST_NOTIFIER', 'BACKEND_REQ', 'BACKEND_SEND_FD'] as const) {
      if (!this.hasProtocol(ProtocolFeature[f])) throw new Error(`host notifier: protocol feature ${f} was not negotiated`);
    }
    if ((this.status & STATUS_DRIVER_OK) === 0 && !this.core.isActive) throw new Error('host notifier: only valid after DRIVER_OK');
    if (index < 0 || index >= this.rings.length) throw new RangeError(`host notifier: queue ${index} is not below ${this.rings.length}`);
    const ch = this.backendChannel;
    if (ch === undefined) throw new Error('host notifier: no back-end channel (SET_BACKEND_REQ_FD was not received)');
    const u64 = BigInt(index) | (fd === undefined ? BigInt(VRING_NOFD_MASK) : 0n);
    const payload = encodeVringArea({ u64, size: BigInt(size), offset: BigInt(offset) });
    return ch.request(BackendRequest.VRING_HOST_NOTIFIER_MSG, payload, fd === undefined ? [] : [fd]);
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
    this.rings.forEach((r, i) => this.clearRing(i, r));
    for (const r of this.regions) this.unmapRegion(r);
    this.regions = [];
    this.memory = GuestMemory.empty();
    this.inflight?.release();
    this.inflight = undefined;
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
    rings: { num?: number; base: number; started: boolean; enabled: boolean; kick: boolean; call: boolean; err: boolean }[];
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
      regions: this.regions.map((r) => r.spec),
      rings: this.rings.map((r) => ({
        ...(r.num === undefined ? {} : { num: r.num }),
        base: r.base,
        started: r.queue !== undefined,
        enabled: r.enabled,
        kick: r.kickFd !== undefined,
        call: r.callFd !== undefined,
        err: r.errFd !== undefined,
      })),
      inflight: this.inflight !== undefined,
      backendChannel: this.backendChannel !== undefined,
    };
  }

  /** The guest memory map (tests, host-notifier users). */
  get guestMemory(): GuestMemory {
    return this.memory;
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
