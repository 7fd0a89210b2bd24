// A reference vhost-user front-end: plays QEMU's part against a back-end. It sends the requests QEMU 10 sends, in
// QEMU's order (hw/virtio/vhost-user.c and vhost.c), with memfd guest RAM and kick/call eventfds, and checks each
// reply the way QEMU does (flags exactly REPLY | version, same request code, the reply layout's size). A raw mode
// sends any bytes with any fds, so conformance tests can feed a back-end every malformed message.
//
//   const fe = await VhostUserFrontend.connect(host, path);
//   const init = await fe.init();                 // GET_FEATURES ... SET_VRING_CALL/ERR per queue
//   await fe.start({ ram, features, queues });     // after the guest's DRIVER_OK: SET_FEATURES ... SET_STATUS
//   fe.kick(0); await fe.waitCall(0);
//   await fe.stop();                               // GET_VRING_BASE per queue, SET_STATUS 0

import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FrontendRequest as R,
  HEADER_SIZE,
  MAX_FDS_PER_MESSAGE,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_VERSION,
  VRING_NOFD_MASK,
  bit,
  checkReplyHeader,
  decodeConfig,
  decodeHeader,
  decodeInflight,
  decodeU64,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMemTable,
  encodeMessage,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  hasBit,
  requestName,
  type InflightDesc,
  type MessageHeader,
} from '../../vmm-device/transport/vhost-user/messages.ts';
import type { Watch } from '../../vmm-device/host/host.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';
import { GuestRam, type RamRegion } from './guest-ram.ts';
import { BACKEND_ANSWER_FLAGS, FrontendShmem, wantsAnswer } from './shmem.ts';
import { SHMEM_CONFIG_SIZE, decodeShmemConfig } from '../../vmm-device/transport/vhost-user/shmem-messages.ts';

/** How long the front-end waits for a reply before giving up (QEMU blocks forever; tests must not). */
export const REPLY_TIMEOUT_MS = 3000;

export interface ReceivedMessage {
  header: MessageHeader;
  payload: Uint8Array;
  fds: number[];
}

/** One recorded message (fixtures): direction, the exact bytes, and how many fds travelled with them. */
export interface WireRecord {
  direction: 'frontend->backend' | 'backend->frontend';
  bytes: Uint8Array;
  fdCount: number;
}

export class FrontendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FrontendError';
  }
}

export interface QueueSetup {
  index: number;
  size: number;
  /** Guest physical addresses of the three areas (sent as front-end VAs, as QEMU does). */
  desc: number;
  avail: number;
  used: number;
  /** SET_VRING_BASE value; default 0. */
  base?: number;
}

export interface StartOptions {
  ram: GuestRam;
  /** Virtio features the guest accepted (PROTOCOL_FEATURES is added, as QEMU adds backend_features). */
  features: bigint;
  queues: QueueSetup[];
  /**
   * The inflight area, as the project's patched QEMU handles it (vhost-user-blk's way): asked for once with
   * GET_INFLIGHT_FD (`numQueues`, `queueSize`) when `kept` is absent, then handed to the back-end with
   * SET_INFLIGHT_FD before the rings start, at every start and after every back-end restart.
   */
  inflight?: { numQueues: number; queueSize: number; kept?: KeptInflightArea };
}

/**
 * An inflight area the front-end keeps across back-end restarts (QEMU's struct vhost_inflight): the memfd the
 * back-end gave and the layout it described. The front-end never interprets it.
 */
export class KeptInflightArea {
  constructor(
    private readonly host: SysHost,
    readonly fd: number,
    readonly desc: InflightDesc,
  ) {}

  release(): void {
    this.host.close(this.fd);
  }
}

export class VhostUserFrontend {
  private buffered = new Uint8Array(0);
  private pendingFds: number[] = [];
  private readonly inbox: ReceivedMessage[] = [];
  private waiter: { resolve: () => void } | undefined;
  private watch: Watch | undefined;
  private eof = false;
  private closedLocally = false;
  /** Protocol features negotiated by init(). */
  protocolFeatures = 0n;
  backendFeatures = 0n;
  readonly kickFds = new Map<number, number>();
  readonly callFds = new Map<number, number>();
  readonly errFds = new Map<number, number>();
  /** Every message sent and received, when recording. */
  record: WireRecord[] | undefined;
  /** The front-end end of the back-end channel, when SET_BACKEND_REQ_FD was sent. */
  backendChannelFd: number | undefined;
  /** RAM regions start() gave the back-end with ADD_MEM_REG on this connection. */
  private readonly regionsAdded = new Set<RamRegion>();
  /** Shared memory regions (SHMEM negotiated, GET_SHMEM_CONFIG answered) and what the back-end mapped in them. */
  shmem: FrontendShmem | undefined;
  private channelWatch: Watch | undefined;

  private constructor(
    readonly host: SysHost,
    readonly fd: number,
  ) {
    this.watch = host.watchReadable(fd, () => this.onReadable());
  }

  static async connect(host: SysHost, path: string): Promise<VhostUserFrontend> {
    return new VhostUserFrontend(host, host.connectUnix(path));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Raw mode

  /** Sends a message built from parts (any request code, flags and payload, with any fds). */
  send(request: number, payload: Uint8Array = new Uint8Array(0), fds: readonly number[] = [], flags = VHOST_USER_VERSION): void {
    this.sendRaw(encodeMessage(request, flags, payload), fds);
  }

  /** Sends exact bytes (possibly not a valid message) with fds. */
  sendRaw(bytes: Uint8Array, fds: readonly number[] = []): void {
    this.record?.push({ direction: 'frontend->backend', bytes: bytes.slice(), fdCount: fds.length });
    this.host.sendMessage(this.fd, bytes, fds);
  }

  private onReadable(): void {
    for (;;) {
      const r = this.host.recv(this.fd, 4096, MAX_FDS_PER_MESSAGE);
      if (r.kind === 'again') break;
      if (r.kind === 'eof') {
        this.eof = true;
        this.watch?.stop();
        this.watch = undefined;
        // The back-end went away: its shared memory mappings go with it, as QEMU drops them (spec 13.14).
        this.shmem?.dropAll();
        break;
      }
      this.pendingFds.push(...r.fds);
      const joined = new Uint8Array(this.buffered.length + r.bytes.length);
      joined.set(this.buffered);
      joined.set(r.bytes, this.buffered.length);
      this.buffered = joined;
      while (this.buffered.length >= HEADER_SIZE) {
        const header = decodeHeader(this.buffered);
        if (this.buffered.length < HEADER_SIZE + header.size) break;
        const payload = this.buffered.slice(HEADER_SIZE, HEADER_SIZE + header.size);
        this.record?.push({ direction: 'backend->frontend', bytes: this.buffered.slice(0, HEADER_SIZE + header.size), fdCount: this.pendingFds.length });
        this.buffered = this.buffered.slice(HEADER_SIZE + header.size);
        this.inbox.push({ header, payload, fds: this.pendingFds });
        this.pendingFds = [];
      }
    }
    this.waiter?.resolve();
  }

  /** The next message from the back-end; rejects when the back-end closed the connection or on timeout. */
  async readMessage(timeoutMs = REPLY_TIMEOUT_MS): Promise<ReceivedMessage> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.inbox.shift();
      if (m !== undefined) return m;
      if (this.eof) throw new FrontendError('back-end closed the connection');
      const left = deadline - Date.now();
      if (left <= 0) throw new FrontendError(`no message from the back-end within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = {
          resolve: () => {
            clearTimeout(t);
            this.waiter = undefined;
            resolve();
          },
        };
      });
    }
  }

  /** Resolves true when the back-end closes the connection within the time, false otherwise (a message arriving first is kept). */
  async waitClosed(timeoutMs = REPLY_TIMEOUT_MS): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.eof) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = {
          resolve: () => {
            clearTimeout(t);
            this.waiter = undefined;
            resolve();
          },
        };
      });
    }
    return true;
  }

  get closedByBackend(): boolean {
    return this.eof;
  }

  /** Messages received and not read yet. */
  get unread(): number {
    return this.inbox.length;
  }

  /** Reads a reply and checks it as QEMU does; returns its payload. */
  async reply(request: number, expectedSize?: number): Promise<ReceivedMessage> {
    const m = await this.readMessage();
    const why = checkReplyHeader(m.header, request);
    if (why !== undefined) throw new FrontendError(`${requestName(request)}: ${why}`);
    if (expectedSize !== undefined && m.header.size !== expectedSize) {
      throw new FrontendError(`${requestName(request)}: reply of ${m.header.size} bytes, expected ${expectedSize}`);
    }
    return m;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Typed requests

  private get replyAck(): boolean {
    return hasBit(this.protocolFeatures, ProtocolFeature.REPLY_ACK);
  }

  /** Sends a request without its own reply; with REPLY_ACK (and `ack`), asks for and checks the ack. */
  async request(request: number, payload: Uint8Array = new Uint8Array(0), fds: readonly number[] = [], ack = true): Promise<void> {
    const needReply = ack && this.replyAck;
    this.send(request, payload, fds, VHOST_USER_VERSION | (needReply ? FLAG_NEED_REPLY : 0));
    if (needReply) {
      const m = await this.reply(request, 8);
      const v = decodeU64(m.payload)!;
      if (v !== 0n) throw new FrontendError(`${requestName(request)}: back-end answered failure (${v})`);
    }
  }

  async getU64(request: number): Promise<bigint> {
    this.send(request);
    const m = await this.reply(request, 8);
    return decodeU64(m.payload)!;
  }

  /**
   * Waits until the back-end has processed everything sent so far: requests without a reply give no other sign.
   * (QEMU does the same: GET_FEATURES as a barrier when REPLY_ACK is missing.)
   */
  async sync(): Promise<void> {
    await this.getFeatures();
  }

  getFeatures(): Promise<bigint> {
    return this.getU64(R.GET_FEATURES);
  }
  getProtocolFeatures(): Promise<bigint> {
    return this.getU64(R.GET_PROTOCOL_FEATURES);
  }
  /** QEMU sends SET_PROTOCOL_FEATURES without asking for an ack. */
  setProtocolFeatures(f: bigint): Promise<void> {
    this.protocolFeatures = f;
    return this.request(R.SET_PROTOCOL_FEATURES, encodeU64(f), [], false);
  }
  setFeatures(f: bigint): Promise<void> {
    return this.request(R.SET_FEATURES, encodeU64(f), [], false);
  }
  setOwner(): Promise<void> {
    return this.request(R.SET_OWNER, undefined, [], false);
  }

  async getVringBase(index: number): Promise<number> {
    this.send(R.GET_VRING_BASE, encodeVringState({ index, num: 0 }));
    const m = await this.reply(R.GET_VRING_BASE, 8);
    const s = decodeVringState(m.payload)!;
    if (s.index !== index) throw new FrontendError(`GET_VRING_BASE: reply for ring ${s.index}, expected ${index}`);
    return s.num;
  }

  /** SET_VRING_KICK/CALL/ERR with an fd, or with the NOFD flag when fd is undefined. */
  setVringFile(request: number, index: number, fd: number | undefined): Promise<void> {
    const v = BigInt(index) | (fd === undefined ? BigInt(VRING_NOFD_MASK) : 0n);
    return this.request(request, encodeU64(v), fd === undefined ? [] : [fd], false);
  }

  async getConfig(offset: number, size: number): Promise<Uint8Array> {
    this.send(R.GET_CONFIG, encodeConfig({ offset, flags: 0, data: new Uint8Array(size) }));
    const m = await this.reply(R.GET_CONFIG);
    if (m.header.size !== 12 + size) throw new FrontendError(`GET_CONFIG: reply of ${m.header.size} bytes, expected ${12 + size}`);
    return decodeConfig(m.payload)!.data.slice();
  }

  setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    return this.request(R.SET_CONFIG, encodeConfig({ offset, flags, data }));
  }

  async getStatus(): Promise<number> {
    return Number(await this.getU64(R.GET_STATUS));
  }
  setStatus(status: number): Promise<void> {
    return this.request(R.SET_STATUS, encodeU64(BigInt(status)), [], false);
  }
  /** QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS with the bits added when some are missing. */
  async addStatus(bits: number): Promise<void> {
    const s = await this.getStatus();
    if ((s & bits) === bits) return;
    await this.setStatus(s | bits);
  }

  /** GET_SHMEM_CONFIG: the regions by id, checked as QEMU checks them (size, nregions, page multiples). */
  async getShmemConfig(): Promise<Map<number, bigint>> {
    this.send(R.GET_SHMEM_CONFIG);
    const m = await this.reply(R.GET_SHMEM_CONFIG, SHMEM_CONFIG_SIZE);
    const regions = decodeShmemConfig(m.payload);
    if (regions === undefined) throw new FrontendError('GET_SHMEM_CONFIG: nregions disagrees with the sizes');
    for (const [id, size] of regions) {
      if (size % BigInt(this.host.pageSize) !== 0n) throw new FrontendError(`GET_SHMEM_CONFIG: region ${id} size ${size} is not a page multiple`);
    }
    return regions;
  }

  async getInflightFd(numQueues: number, queueSize: number): Promise<{ desc: InflightDesc; fd: number | undefined }> {
    this.send(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues, queueSize }));
    const m = await this.reply(R.GET_INFLIGHT_FD, 24);
    return { desc: decodeInflight(m.payload)!, fd: m.fds[0] };
  }

  setMemTable(regions: readonly RamRegion[]): Promise<void> {
    return this.request(R.SET_MEM_TABLE, encodeMemTable(regions.map(GuestRam.describe)), regions.map((r) => r.fd));
  }
  addMemReg(r: RamRegion): Promise<void> {
    return this.request(R.ADD_MEM_REG, encodeSingleRegion(GuestRam.describe(r)), [r.fd]);
  }
  remMemReg(r: RamRegion): Promise<void> {
    return this.request(R.REM_MEM_REG, encodeSingleRegion({ ...GuestRam.describe(r), mmapOffset: 0n }));
  }

  // ---------------------------------------------------------------------------------------------------------
  // QEMU's sequences

  /**
   * What QEMU does when the vhost-user device is created (vhost_user_backend_init, vhost_dev_init): features,
   * protocol features (all the back-end offers that QEMU knows), queue count, memory slots, the back-end channel,
   * SET_OWNER, then a call and an error eventfd for every queue.
   */
  async init(opts: {
    queues: number;
    backendChannel?: boolean;
    /**
     * With SHMEM negotiated: 'serve' (default) maps and unmaps what the back-end asks on its channel, as QEMU does;
     * 'manual' leaves every back-end request to nextBackendRequest/answerBackendRequest.
     */
    shmem?: 'serve' | 'manual';
  }): Promise<{ features: bigint; protocolFeatures: bigint; queueNum: number; maxMemSlots: number }> {
    const features = await this.getFeatures();
    this.backendFeatures = features;
    let queueNum = 1;
    let maxMemSlots = 8;
    if (hasBit(features, VHOST_USER_F_PROTOCOL_FEATURES)) {
      const offered = await this.getProtocolFeatures();
      // The protocol features the project's QEMU knows: QEMU 10's (below VHOST_USER_PROTOCOL_F_MAX, 20) and SHMEM (22).
      const known = ((1n << 20n) - 1n) | bit(ProtocolFeature.SHMEM);
      await this.setProtocolFeatures(offered & known);
      if (hasBit(this.protocolFeatures, ProtocolFeature.MQ)) queueNum = Number(await this.getU64(R.GET_QUEUE_NUM));
      if (queueNum < opts.queues) throw new FrontendError(`back-end offers ${queueNum} queues, ${opts.queues} needed`);
      if (hasBit(this.protocolFeatures, ProtocolFeature.CONFIGURE_MEM_SLOTS)) maxMemSlots = Number(await this.getU64(R.GET_MAX_MEM_SLOTS));
      if (opts.backendChannel !== false && hasBit(this.protocolFeatures, ProtocolFeature.BACKEND_REQ)) {
        const [ours, theirs] = this.host.socketPair();
        this.backendChannelFd = ours;
        try {
          await this.request(R.SET_BACKEND_REQ_FD, undefined, [theirs]);
        } finally {
          this.host.close(theirs);
        }
      }
      if (hasBit(this.protocolFeatures, ProtocolFeature.SHMEM)) {
        // QEMU asks when it creates the device, and sizes the BAR that holds the regions from the answer.
        this.shmem = new FrontendShmem(await this.getShmemConfig(), this.host.pageSize);
        if (opts.shmem !== 'manual' && this.backendChannelFd !== undefined) {
          const fd = this.backendChannelFd;
          this.channelWatch = this.host.watchReadable(fd, () => this.pumpChannel());
        }
      }
    }
    await this.setOwner();
    for (let i = 0; i < opts.queues; i++) {
      const call = this.host.eventfd();
      this.callFds.set(i, call);
      await this.setVringFile(R.SET_VRING_CALL, i, call);
      const err = this.host.eventfd();
      this.errFds.set(i, err);
      await this.setVringFile(R.SET_VRING_ERR, i, err);
    }
    return { features, protocolFeatures: this.protocolFeatures, queueNum, maxMemSlots };
  }

  /**
   * What QEMU does after the guest sets DRIVER_OK (vhost_dev_start): SET_FEATURES (+ FEATURES_OK via STATUS),
   * the memory table, for each queue NUM, BASE, ADDR, KICK and CALL, SET_VRING_ENABLE, then DRIVER_OK via STATUS.
   */
  async start(o: StartOptions): Promise<KeptInflightArea | undefined> {
    const features = o.features | (hasBit(this.backendFeatures, VHOST_USER_F_PROTOCOL_FEATURES) ? bit(VHOST_USER_F_PROTOCOL_FEATURES) : 0n);
    let inflight: KeptInflightArea | undefined;
    if (o.inflight !== undefined && hasBit(this.protocolFeatures, ProtocolFeature.INFLIGHT_SHMFD)) {
      await this.setFeatures(features); // vhost_dev_prepare_inflight: the back-end learns the ring layout first
      inflight = o.inflight.kept;
      if (inflight === undefined) {
        const got = await this.getInflightFd(o.inflight.numQueues, o.inflight.queueSize);
        if (got.fd === undefined) throw new FrontendError('GET_INFLIGHT_FD: the reply carried no fd');
        inflight = new KeptInflightArea(this.host, got.fd, got.desc);
      }
      await this.request(R.SET_INFLIGHT_FD, encodeInflight(inflight.desc), [inflight.fd], false);
    }
    await this.setFeatures(features);
    const status = hasBit(this.protocolFeatures, ProtocolFeature.STATUS);
    if (status) await this.addStatus(0x8 /* FEATURES_OK */);
    if (hasBit(this.protocolFeatures, ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      // QEMU sends only the difference from what the back-end has (vhost_user_add_remove_regions).
      for (const r of o.ram.regions) {
        if (this.regionsAdded.has(r)) continue;
        await this.addMemReg(r);
        this.regionsAdded.add(r);
      }
    } else {
      await this.setMemTable(o.ram.regions);
    }
    for (const q of o.queues) {
      await this.request(R.SET_VRING_NUM, encodeVringState({ index: q.index, num: q.size }), [], false);
      await this.request(R.SET_VRING_BASE, encodeVringState({ index: q.index, num: q.base ?? 0 }), [], false);
      await this.request(
        R.SET_VRING_ADDR,
        encodeVringAddr({
          index: q.index,
          flags: 0,
          desc: BigInt(o.ram.gpaToUser(q.desc)),
          used: BigInt(o.ram.gpaToUser(q.used)),
          avail: BigInt(o.ram.gpaToUser(q.avail)),
          log: 0n,
        }),
        [],
        false,
      );
      const kick = this.kickFds.get(q.index) ?? this.host.eventfd();
      this.kickFds.set(q.index, kick);
      await this.setVringFile(R.SET_VRING_KICK, q.index, kick);
      const call = this.callFds.get(q.index) ?? this.host.eventfd();
      this.callFds.set(q.index, call);
      await this.setVringFile(R.SET_VRING_CALL, q.index, call);
    }
    if (hasBit(features, VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (const q of o.queues) await this.request(R.SET_VRING_ENABLE, encodeVringState({ index: q.index, num: 1 }));
    }
    if (status) await this.addStatus(0x1 | 0x2 | 0x4);
    return inflight;
  }

  /** What QEMU does on vhost_dev_stop: disable rings, GET_VRING_BASE each, SET_STATUS 0. Returns the bases. */
  async stop(queues: readonly number[]): Promise<number[]> {
    if (hasBit(this.backendFeatures, VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (const q of queues) await this.request(R.SET_VRING_ENABLE, encodeVringState({ index: q, num: 0 }));
    }
    const bases: number[] = [];
    for (const q of queues) bases.push(await this.getVringBase(q));
    if (hasBit(this.protocolFeatures, ProtocolFeature.STATUS)) await this.setStatus(0);
    return bases;
  }

  /** The guest notified queue `index` (QEMU's ioeventfd fires the kick eventfd). */
  kick(index: number): void {
    const fd = this.kickFds.get(index);
    if (fd === undefined) throw new FrontendError(`queue ${index} has no kick eventfd`);
    this.host.eventfdWrite(fd, 1n);
  }

  /** Waits until the call (or error) eventfd of a queue fires; resolves its counter, or 0n on timeout. */
  async waitEventfd(fd: number, timeoutMs = REPLY_TIMEOUT_MS): Promise<bigint> {
    const now = this.host.eventfdRead(fd);
    if (now !== undefined) return now;
    return new Promise((resolve) => {
      const w = this.host.watchReadable(fd, () => {
        const v = this.host.eventfdRead(fd);
        if (v === undefined) return;
        clearTimeout(t);
        w.stop();
        resolve(v);
      });
      const t = setTimeout(() => {
        w.stop();
        resolve(0n);
      }, timeoutMs);
    });
  }

  waitCall(index: number, timeoutMs?: number): Promise<bigint> {
    const fd = this.callFds.get(index);
    if (fd === undefined) throw new FrontendError(`queue ${index} has no call eventfd`);
    return this.waitEventfd(fd, timeoutMs);
  }

  // ---------------------------------------------------------------------------------------------------------
  // The back-end channel (requests from the back-end: CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG)

  private channelBuffered = new Uint8Array(0);
  private channelFds: number[] = [];
  private readonly channelInbox: ReceivedMessage[] = [];
  private channelEof = false;

  /**
   * Reads what the back-end sent on its channel: SHMEM_MAP/UNMAP are served at once when the front-end serves shared
   * memory (init's `shmem`), everything else waits in the inbox for nextBackendRequest.
   */
  private pumpChannel(): void {
    const fd = this.backendChannelFd;
    if (fd === undefined || this.channelEof) return;
    for (;;) {
      this.serveChannelMessages(fd);
      // Read exactly what the message being received still lacks (its header, then its payload), as QEMU does: the
      // back-end may send several requests before the first answer, and the fds of each arrive with its first bytes.
      const have = this.channelBuffered.length;
      const need = have < HEADER_SIZE ? HEADER_SIZE - have : HEADER_SIZE + decodeHeader(this.channelBuffered).size - have;
      const r = this.host.recv(fd, need, MAX_FDS_PER_MESSAGE);
      if (r.kind === 'again') break;
      if (r.kind === 'eof') {
        this.channelEof = true;
        this.channelWatch?.stop();
        this.channelWatch = undefined;
        break;
      }
      this.channelFds.push(...r.fds);
      const joined = new Uint8Array(this.channelBuffered.length + r.bytes.length);
      joined.set(this.channelBuffered);
      joined.set(r.bytes, this.channelBuffered.length);
      this.channelBuffered = joined;
    }
  }

  /** Serves (SHMEM_MAP/UNMAP) or keeps (the rest) every whole message received on the back-end channel. */
  private serveChannelMessages(fd: number): void {
    while (this.channelBuffered.length >= HEADER_SIZE) {
      const header = decodeHeader(this.channelBuffered);
      if (this.channelBuffered.length < HEADER_SIZE + header.size) break;
      const payload = this.channelBuffered.slice(HEADER_SIZE, HEADER_SIZE + header.size);
      this.channelBuffered = this.channelBuffered.slice(HEADER_SIZE + header.size);
      const fds = this.channelFds;
      this.channelFds = [];
      const shm = header.request === BackendRequest.SHMEM_MAP || header.request === BackendRequest.SHMEM_UNMAP;
      if (shm && this.shmem !== undefined && this.channelWatch !== undefined) {
        const answer = this.shmem.serve(header.request, payload, fds);
        if (wantsAnswer(header)) this.host.sendMessage(fd, encodeMessage(header.request, BACKEND_ANSWER_FLAGS, encodeU64(answer)), []);
      } else {
        this.channelInbox.push({ header, payload, fds });
      }
    }
  }

  /** The next request the back-end sent on its channel (header, payload, fds), or undefined on timeout. */
  async nextBackendRequest(timeoutMs = REPLY_TIMEOUT_MS): Promise<ReceivedMessage | undefined> {
    if (this.backendChannelFd === undefined) throw new FrontendError('no back-end channel (init() with backendChannel)');
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.pumpChannel();
      const m = this.channelInbox.shift();
      if (m !== undefined) return m;
      if (this.channelEof || Date.now() >= deadline) return undefined;
      await new Promise((res) => setTimeout(res, 5));
    }
  }

  /** Answers a back-end request (REPLY_ACK): u64 0 for success. */
  answerBackendRequest(request: number, value: bigint): void {
    const fd = this.backendChannelFd;
    if (fd === undefined) throw new FrontendError('no back-end channel');
    this.host.sendMessage(fd, encodeMessage(request, 0x4 | VHOST_USER_VERSION, encodeU64(value)), []);
  }

  /** Closes the connection and every eventfd this front-end created. */
  close(): void {
    if (this.closedLocally) return;
    this.closedLocally = true;
    this.watch?.stop();
    this.watch = undefined;
    const close = (fd: number): void => {
      try {
        this.host.close(fd);
      } catch {
        /* already closed */
      }
    };
    for (const m of [this.kickFds, this.callFds, this.errFds]) {
      for (const fd of m.values()) close(fd);
      m.clear();
    }
    for (const m of this.inbox) for (const fd of m.fds) close(fd);
    for (const fd of this.pendingFds) close(fd);
    for (const m of this.channelInbox) for (const fd of m.fds) close(fd);
    for (const fd of this.channelFds) close(fd);
    this.channelWatch?.stop();
    this.channelWatch = undefined;
    this.shmem?.dropAll();
    if (this.backendChannelFd !== undefined) close(this.backendChannelFd);
    close(this.fd);
  }
}
