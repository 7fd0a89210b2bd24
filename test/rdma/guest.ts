// A test guest for the virtio-rdma device: the lead's driver-side kit lays out the control, event and doorbell
// queues in (seeded, gapped) test guest memory, and this file speaks the spec's control framing, rings and
// doorbells over them, byte for byte, using only vmm-device/abi/rdma for formats. It plays the guest in the
// host-side tests (over FakeVerbs) and in the rxe tests (over NativeVerbs).

import {
  Command,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpRequest,
  CreateQpResponse,
  CtrlResponseHeader,
  DoorbellRecord,
  Event,
  FeatureBit,
  HandleRequest,
  HandleResponse,
  Limits,
  ModifyQpRequest,
  QpAttr,
  COMMANDS,
  MAPPED_RESPONSES,
  RegMrRequest,
  RegMrResponse,
  Cqe,
  SendWqe,
  RecvWqe,
  encodeRequest,
  encodeSges,
  ringPages,
  Status,
  QpAttrMask,
  type SgeValue,
} from '../../vmm-device/abi/rdma/index.ts';
import { SplitDriver, TestGuestMemory } from '../../guest-driver-spec/testkit/index.ts';
import { SplitQueue } from '../../vmm-device/virtqueue/index.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import type { HostVerbs } from '../../vmm-device/verbs/host-verbs.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import type { RdmaDeviceOptions } from '../../vmm-device/rdma/rdma-device.ts';
import type { HostPageMapper, QueueOffload } from '../../vmm-device/virtio/device.ts';
import { F_VERSION_1 } from '../../vmm-device/abi/virtio.ts';
import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import * as sys from '../../vmm-device/native/sys.ts';
import type { AliasMapper } from '../../vmm-device/memory/alias.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { FakeAliasMapper } from '../../vmm-device/verbs/fake-verbs.ts';

export const PAGE = 4096;
/** How long a test waits for the device to answer (host verbs on TCG rxe are slow). */
export const ANSWER_TIMEOUT_MS = 20_000;

export const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
  { vmId: 'vm-c', vpc: 'red', virtualIp: '192.168.7.3', hostIp: '10.0.0.1' },
];

export const ALL_FEATURES =
  (1n << F_VERSION_1) |
  (1n << BigInt(FeatureBit.RC)) |
  (1n << BigInt(FeatureBit.UD)) |
  (1n << BigInt(FeatureBit.ATOMIC)) |
  (1n << BigInt(FeatureBit.IMMEDIATE));

export interface Answer {
  status: number;
  detail: number;
  tag: bigint;
  body: Uint8Array;
  used: number;
}

export interface GuestOptions {
  verbs: HostVerbs;
  hostDevice?: string;
  vmId?: string;
  resolver?: StaticAddressResolver;
  features?: bigint;
  seed?: number;
  /** Bytes of each of the two RAM regions. */
  regionSize?: number;
  quotas?: ConstructorParameters<typeof Object>[0];
  /**
   * Back guest RAM with page-aligned shared memfd mappings, as a vhost-user front-end does. Needed with a real
   * RNIC: the kernel registers an MR only when the host address and the iova have the same offset in their page
   * (ib_uverbs_reg_mr), and a plain ArrayBuffer is not page aligned.
   */
  memfdRam?: boolean;
  /** Default: the native mapper over memfd RAM (real aliases), else FakeAliasMapper (plain ArrayBuffers). */
  aliases?: AliasMapper;
  /** More options of the device (host queue mapping: hostQueueMapping, maxMappedQueues, ...). */
  device?: Partial<RdmaDeviceOptions>;
  /** The transport's services handed to the model at activation (spec 13: the shared memory mapper). */
  hostPages?: HostPageMapper;
  queueOffload?: QueueOffload;
}

export class TestGuest {
  readonly mem: TestGuestMemory;
  readonly ctrl: SplitDriver;
  readonly eventq: SplitDriver;
  readonly doorbell: SplitDriver;
  readonly queues: SplitQueue[];
  readonly interrupts = [0, 0, 0];
  readonly broken: { queue: number; error: Error }[] = [];
  /** What the device reported through deviceFailed (a failure no driver action caused). */
  readonly failures: Error[] = [];
  readonly log = new RecordingLogger('device');
  private tag = 1n;

  private constructor(
    readonly device: RdmaDevice,
    regionSize: number,
    seed: number,
    memfdRam: boolean,
  ) {
    const regions = [
      { gpa: 0x10_0000, size: regionSize },
      { gpa: 0x1000_0000, size: regionSize },
    ];
    this.mem = new TestGuestMemory({ regions, rng: seed, maxGap: 64, ...(memfdRam ? { guardBytes: 0 } : {}) });
    if (memfdRam) {
      // The kit allocates by plan; only the backing changes: the same regions over memfd mappings.
      const specs = regions.map((r) => {
        const fd = sys.memfdCreate('test-guest-ram', r.size);
        const buffer = sys.mmap(fd, 0, r.size, true);
        sys.close(fd); // the mapping keeps the memory
        return { guestPhysAddr: r.gpa, size: r.size, buffer };
      });
      (this.mem as unknown as { memory: GuestMemory }).memory = new GuestMemory(specs);
    }
    this.ctrl = new SplitDriver({ mem: this.mem, size: 64 });
    this.eventq = new SplitDriver({ mem: this.mem, size: 64 });
    this.doorbell = new SplitDriver({ mem: this.mem, size: 64 });
    this.queues = [this.ctrl, this.eventq, this.doorbell].map((d) => new SplitQueue(d.queueOptions()));
  }

  static async open(opts: GuestOptions): Promise<TestGuest> {
    const log = new RecordingLogger('device');
    const device = await RdmaDevice.open({
      verbs: opts.verbs,
      hostDevice: opts.hostDevice ?? 'fake0',
      vmId: opts.vmId ?? 'vm-a',
      resolver: opts.resolver ?? new StaticAddressResolver(TABLE),
      log,
      aliases: opts.aliases ?? (opts.memfdRam === true ? nativeAliasMapper : new FakeAliasMapper()),
      ...(opts.quotas !== undefined ? { quotas: opts.quotas as object } : {}),
      ...opts.device,
    });
    const g = new TestGuest(device, opts.regionSize ?? 8 << 20, opts.seed ?? 42, opts.memfdRam ?? false);
    g.hostPages = opts.hostPages;
    g.queueOffload = opts.queueOffload;
    g.activate(opts.features ?? ALL_FEATURES);
    return g;
  }

  hostPages: HostPageMapper | undefined;
  queueOffload: QueueOffload | undefined;

  /** DRIVER_OK with these features (as the core calls the model). */
  activate(features: bigint): void {
    this.device.activate({
      ...(this.hostPages !== undefined ? { hostPages: this.hostPages } : {}),
      ...(this.queueOffload !== undefined ? { queueOffload: this.queueOffload } : {}),
      features,
      memory: this.mem.memory,
      queues: this.queues,
      interrupt: (i) => this.interrupts[i]!++,
      queueBroken: (queue, error) => this.broken.push({ queue, error }),
      deviceFailed: (error) => this.failures.push(error),
      log: this.log,
    });
  }

  get config() {
    return this.device.config;
  }

  /** When set, allocPages takes pages from here instead (a test's own region, e.g. one hot-added later). */
  pageSource: ((n: number) => number) | undefined;

  /** Zeroed guest memory, page aligned. */
  allocPages(n: number, region?: number): number {
    if (this.pageSource !== undefined) {
      const at = this.pageSource(n);
      this.mem.write(at, new Uint8Array(n * PAGE));
      return at;
    }
    const gpa = this.mem.alloc(n * PAGE, { align: PAGE, ...(region !== undefined ? { region } : {}) });
    this.mem.write(gpa, new Uint8Array(n * PAGE));
    return gpa;
  }

  /** Sends raw readable bytes with a writable part of `writable` bytes; resolves with the used element. */
  async raw(readable: Uint8Array, writable: number): Promise<{ used: number; written: Uint8Array }> {
    const reqAddr = this.mem.alloc(Math.max(1, readable.length), { align: 8 });
    this.mem.write(reqAddr, readable);
    const buffers = [];
    if (readable.length > 0) buffers.push({ addr: reqAddr, len: readable.length });
    const respAddr = writable > 0 ? this.mem.alloc(writable, { align: 8 }) : 0;
    if (writable > 0) {
      this.mem.write(respAddr, new Uint8Array(writable));
      buffers.push({ addr: respAddr, len: writable, write: true });
    }
    const built = this.ctrl.add({ buffers });
    this.device.queueNotify(0);
    const used = await waitFor(() => this.ctrl.readUsed().find((u) => u.id === built.id), 'control answer');
    return { used: used.len, written: writable > 0 ? this.mem.read(respAddr, writable) : new Uint8Array(0) };
  }

  /** One control request; `responseSize` defaults to the command's response body. */
  async cmd(command: number, body: Uint8Array = new Uint8Array(0), pages: readonly bigint[] = [], responseSize?: number): Promise<Answer> {
    const tag = this.tag++;
    const spec = COMMANDS.get(command);
    // With HOST_QUEUE_MAPPING negotiated CREATE_CQ and CREATE_QP answer larger bodies (spec 13.3); they begin with
    // the version 1 bodies, so the decoders of those still read them.
    const mapped = this.device.hasFeature(FeatureBit.HOST_QUEUE_MAPPING) ? MAPPED_RESPONSES.get(command) : undefined;
    const size = CtrlResponseHeader.size + (responseSize ?? mapped?.size ?? spec?.response.size ?? 0);
    const { used, written } = await this.raw(encodeRequest(command, tag, body, pages), size);
    const h = CtrlResponseHeader.decode(written);
    return { status: h.status, detail: h.detail, tag: h.tag, body: written.subarray(CtrlResponseHeader.size, used), used };
  }

  /** A command that must succeed; returns its response body. */
  async ok(command: number, body?: Uint8Array, pages?: readonly bigint[]): Promise<Uint8Array> {
    const a = await this.cmd(command, body, pages);
    if (a.status !== Status.OK) throw new Error(`command 0x${command.toString(16)} failed: status ${a.status} detail ${a.detail}`);
    return a.body;
  }

  async createPd(): Promise<number> {
    return HandleResponse.decode(await this.ok(Command.CREATE_PD)).handle;
  }

  async createCq(depth = 16): Promise<GuestCq> {
    const pages = ringPages(depth, Limits.CQE_SIZE, 12);
    const ring = this.allocPages(pages);
    const index = this.allocPages(1);
    const body = CreateCqRequest.encode({ cqe_count: depth, page_shift: 12, num_pages: pages, index_gpa: BigInt(index) });
    const r = CreateCqResponse.decode(await this.ok(Command.CREATE_CQ, body, pageList(ring, pages)));
    return new GuestCq(this, r.cq_handle, depth, ring, index);
  }

  async createQp(pd: number, send: GuestCq, recv: GuestCq, qpType = 2, depth = 16, sqSigAll = 0): Promise<GuestQp> {
    const sqPages = ringPages(depth, Limits.SQ_WQE_SIZE, 12);
    const rqPages = ringPages(depth, Limits.RQ_WQE_SIZE, 12);
    const sq = this.allocPages(sqPages);
    const rq = this.allocPages(rqPages);
    const idx = this.allocPages(1);
    const body = CreateQpRequest.encode({
      pd_handle: pd,
      send_cq_handle: send.handle,
      recv_cq_handle: recv.handle,
      qp_type: qpType,
      sq_sig_all: sqSigAll,
      sq_page_shift: 12,
      rq_page_shift: 12,
      max_send_wr: depth,
      max_recv_wr: depth,
      max_send_sge: this.config.max_send_sge,
      max_recv_sge: this.config.max_recv_sge,
      max_inline_data: 0,
      sq_num_pages: sqPages,
      rq_num_pages: rqPages,
      sq_index_gpa: BigInt(idx),
      rq_index_gpa: BigInt(idx + 64),
    });
    const r = CreateQpResponse.decode(await this.ok(Command.CREATE_QP, body, [...pageList(sq, sqPages), ...pageList(rq, rqPages)]));
    return new GuestQp(this, r.qp_handle, r.qp_num, depth, sq, rq, idx, idx + 64);
  }

  /** A memory region of `bytes` at a page-aligned guest buffer; iova = the guest's "virtual" address. */
  async regMr(pd: number, bytes: number, access: number, iova = 0x7f00_0000_0000n): Promise<GuestMr> {
    const pages = Math.ceil(bytes / PAGE);
    const gpa = this.allocPages(pages);
    const body = RegMrRequest.encode({ pd_handle: pd, access_flags: access, iova, length: BigInt(bytes), page_shift: 12, total_pages: pages, num_pages: pages });
    const r = RegMrResponse.decode(await this.ok(Command.REG_MR, body, pageList(gpa, pages)));
    return { handle: r.mr_handle, lkey: r.lkey, rkey: r.rkey, gpa, iova, length: bytes };
  }

  async modifyQp(qp: number, mask: number, attr: Partial<ReturnType<typeof QpAttr.decode>>): Promise<Answer> {
    return this.cmd(Command.MODIFY_QP, ModifyQpRequest.encode({ qp_handle: qp, attr_mask: mask, attr: QpAttr.encode(qpAttr(attr)) }));
  }

  async destroy(command: number, handle: number): Promise<Answer> {
    return this.cmd(command, HandleRequest.encode({ handle }));
  }

  /** Posts `n` event buffers of `len` bytes. */
  postEventBuffers(n: number, len: number = Limits.EVENT_SIZE): void {
    for (let i = 0; i < n; i++) this.eventq.add({ buffers: [{ len, write: true }] });
    this.device.queueNotify(1);
  }

  /** Events written since the last call. */
  readEvents(): ReturnType<typeof Event.decode>[] {
    return this.eventq.readUsed().map((u) => {
      // The kit reclaims descriptors; read the buffer through the descriptor it used (single-buffer chains).
      const d = this.eventq.readDescriptor(u.id);
      return Event.decode(this.mem.read(Number(d.addr), Limits.EVENT_SIZE));
    });
  }

  async waitEvents(n: number): Promise<ReturnType<typeof Event.decode>[]> {
    const got: ReturnType<typeof Event.decode>[] = [];
    await waitFor(() => {
      got.push(...this.readEvents());
      return got.length >= n ? true : undefined;
    }, `${n} events`);
    return got;
  }

  /** Rings the doorbell with these records (one buffer); returns once the device returned it. */
  async ring(records: { handle: number; type: number }[], extraBytes = 0): Promise<void> {
    const bytes = new Uint8Array(records.length * Limits.DOORBELL_RECORD_SIZE + extraBytes);
    records.forEach((r, i) => DoorbellRecord.encode(r, bytes, i * Limits.DOORBELL_RECORD_SIZE));
    const addr = this.mem.alloc(bytes.length, { align: 8 });
    this.mem.write(addr, bytes);
    const built = this.doorbell.add({ buffers: [{ addr, len: bytes.length }] });
    this.device.queueNotify(2);
    await waitFor(() => this.doorbell.readUsed().find((u) => u.id === built.id), 'doorbell buffer returned');
  }
}

export interface GuestMr {
  handle: number;
  lkey: number;
  rkey: number;
  gpa: number;
  iova: bigint;
  length: number;
}

export class GuestCq {
  consumer = 0;
  constructor(
    readonly guest: TestGuest,
    readonly handle: number,
    readonly depth: number,
    readonly ring: number,
    readonly index: number,
  ) {}

  get producer(): number {
    return this.guest.mem.readU32(this.index);
  }

  /** Takes the CQEs the device wrote, advancing consumer_index. */
  poll(): ReturnType<typeof Cqe.decode>[] {
    const out = [];
    const p = this.producer;
    while (this.consumer !== p) {
      const at = this.ring + (this.consumer % this.depth) * Limits.CQE_SIZE;
      out.push(Cqe.decode(this.guest.mem.read(at, Limits.CQE_SIZE)));
      this.consumer = (this.consumer + 1) >>> 0;
    }
    this.guest.mem.writeU32(this.index + 4, this.consumer);
    return out;
  }

  async waitFor(n: number): Promise<ReturnType<typeof Cqe.decode>[]> {
    const got: ReturnType<typeof Cqe.decode>[] = [];
    await waitFor(() => {
      got.push(...this.poll());
      return got.length >= n ? true : undefined;
    }, `${n} completions on CQ ${this.handle}`);
    return got;
  }
}

export class GuestQp {
  sqProducer = 0;
  rqProducer = 0;
  constructor(
    readonly guest: TestGuest,
    readonly handle: number,
    readonly qpn: number,
    readonly depth: number,
    readonly sq: number,
    readonly rq: number,
    readonly sqIndex: number,
    readonly rqIndex: number,
  ) {}

  get sqConsumer(): number {
    return this.guest.mem.readU32(this.sqIndex + 4);
  }
  get rqConsumer(): number {
    return this.guest.mem.readU32(this.rqIndex + 4);
  }

  /** Writes a send WQE and advances producer_index (no doorbell). */
  writeSend(wqe: Partial<ReturnType<typeof SendWqe.decode>> & { sges?: SgeValue[] }): void {
    const { sges, ...rest } = wqe;
    const full = {
      wr_id: 0n,
      opcode: 2,
      flags: 1,
      num_sge: sges?.length ?? 0,
      imm_data: 0,
      remote_addr: 0n,
      rkey: 0,
      inline_length: 0,
      compare_add: 0n,
      swap: 0n,
      ah_handle: 0,
      remote_qpn: 0,
      remote_qkey: 0,
      payload: encodeSges(sges ?? [], Limits.SQ_WQE_MAX_SGE),
      ...rest,
    };
    this.guest.mem.write(this.sq + (this.sqProducer % this.depth) * Limits.SQ_WQE_SIZE, SendWqe.encode(full));
    this.sqProducer = (this.sqProducer + 1) >>> 0;
    this.guest.mem.writeU32(this.sqIndex, this.sqProducer);
  }

  writeRecv(wrId: bigint, sges: SgeValue[], numSge = sges.length): void {
    const wqe = RecvWqe.encode({ wr_id: wrId, num_sge: numSge, sges: encodeSges(sges, Limits.RQ_WQE_MAX_SGE) });
    this.guest.mem.write(this.rq + (this.rqProducer % this.depth) * Limits.RQ_WQE_SIZE, wqe);
    this.rqProducer = (this.rqProducer + 1) >>> 0;
    this.guest.mem.writeU32(this.rqIndex, this.rqProducer);
  }
}

export function pageList(gpa: number, pages: number): bigint[] {
  return Array.from({ length: pages }, (_, i) => BigInt(gpa + i * PAGE));
}

/** A QpAttr value with every field zero unless given. */
export function qpAttr(v: Partial<ReturnType<typeof QpAttr.decode>>): ReturnType<typeof QpAttr.decode> {
  return {
    qp_state: 0,
    qp_access_flags: 0,
    qkey: 0,
    rq_psn: 0,
    sq_psn: 0,
    dest_qp_num: 0,
    path_mtu: 0,
    timeout: 0,
    retry_cnt: 0,
    rnr_retry: 0,
    min_rnr_timer: 0,
    max_rd_atomic: 0,
    max_dest_rd_atomic: 0,
    port_num: 0,
    pkey_index: 0,
    sgid_index: 0,
    hop_limit: 0,
    flow_label: 0,
    traffic_class: 0,
    sl: 0,
    dgid: new Uint8Array(16),
    ...v,
  };
}

/** Polls `check` on the event loop until it returns a value, or fails after ANSWER_TIMEOUT_MS. */
/**
 * Takes an RC QP of the guest to RTS with fixed attributes (destination QPN 0x42 at 192.168.7.2, MTU 256, all
 * access rights); every MODIFY_QP must answer OK.
 */
export async function connectRc(g: TestGuest, qp: Pick<GuestQp, 'handle'>): Promise<void> {
  const S = QpAttrMask;
  const steps: [number, Parameters<TestGuest['modifyQp']>[2]][] = [
    [S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, { qp_state: 1, port_num: 1, qp_access_flags: 7 }],
    [
      S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER,
      { qp_state: 2, path_mtu: 1, dest_qp_num: 0x42, max_dest_rd_atomic: 1, min_rnr_timer: 1, hop_limit: 64, dgid: gidFromIpv4('192.168.7.2') },
    ],
    [S.STATE | S.SQ_PSN | S.TIMEOUT | S.RETRY_CNT | S.RNR_RETRY | S.MAX_QP_RD_ATOMIC, { qp_state: 3, timeout: 14, retry_cnt: 7, rnr_retry: 7, max_rd_atomic: 1 }],
  ];
  for (const [mask, attr] of steps) {
    const a = await g.modifyQp(qp.handle, mask, attr);
    if (a.status !== Status.OK) throw new Error(`modify failed ${a.status} ${a.detail}`);
  }
}

export async function waitFor<T>(check: () => T | undefined, what: string, timeoutMs = ANSWER_TIMEOUT_MS): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}
