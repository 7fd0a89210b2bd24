// The RDMA device as the fuzz targets drive it: one RdmaDevice over FakeVerbs per process, with control, event and
// doorbell split queues laid out by the driver-side kit in ArrayBuffer guest memory. Each input is one life of the
// device between two virtio resets, as a guest lives it after a reboot: the rig zeroes guest RAM, lays the queues
// out again (same seed, same layout: an input replays alone as it ran in the campaign) and activates the device;
// at the end it resets the device. Building the device once (host device open, /proc read for the mapping budget,
// 2 MiB of guest RAM) instead of per input is most of the speed; the reset is the real guest action and must leave
// nothing behind, which finish() asserts on every input, so the campaign fuzzes reset too.
// Waits are event-loop turns, not timers (FakeVerbs completes within a few turns), and every wait is bounded: a
// request the device neither answers nor refuses (by breaking the queue) is a finding.
// finish() checks, after every input: the device reported no failure of its own (deviceFailed: what no driver
// action may cause); after reset: every host object it created is released (FakeVerbs' live object counts, MR
// aliases), it holds no QP, it touches guest memory no more (no read or write through GuestMemory, no byte of the
// zeroed RAM written, guard bytes intact); and no guest memory access of the input fell outside the guest's regions.
import { PAGE, TABLE, pageList, qpAttr, type GuestMr } from '../../rdma/guest.ts';
import { FakeAliasMapper, FakeVerbs } from '../../../vmm-device/verbs/fake-verbs.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4 } from '../../../vmm-device/rdma/index.ts';
import {
  AccessFlag,
  COMMANDS,
  Command,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpRequest,
  CreateQpResponse,
  CtrlResponseHeader,
  HandleResponse,
  Limits,
  ModifyQpRequest,
  QpAttr,
  QpAttrMask,
  RegMrRequest,
  RegMrResponse,
  Status,
  encodeRequest,
  ringPages,
} from '../../../vmm-device/abi/rdma/index.ts';
import { FuzzInvariantError, assertNoOutsideAccess, auditGuestMemory, invariant, quietLogger } from './harness.ts';
import { FuzzCq, FuzzGuest, FuzzQp, asKitGuest } from './rdma-guest.ts';

/** Bytes of each of the guest's two RAM regions. */
export const REGION_SIZE = 1 << 20;
/** Event-loop turns a control request or a doorbell buffer may take over FakeVerbs before it counts as lost. */
export const MAX_TURNS = 2_000;
/** Largest readable or writable part a target builds (the kit allocates them from guest memory). */
export const MAX_PART = 8 << 10;

/** Event-loop turns after a reset during which the device must leave guest memory alone (finish). */
export const RESET_QUIET_TURNS = 4;

export const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

export interface Answer {
  status: number;
  detail: number;
  body: Uint8Array;
  used: number;
}

export class Rig {
  private static shared: Promise<Rig> | undefined;
  private tag = 1n;
  /** Status and detail of every control answer of this input (the test checks an input answers alike after others). */
  answers: number[] = [];
  private constructor(
    readonly verbs: FakeVerbs,
    readonly aliases: FakeAliasMapper,
    readonly g: FuzzGuest,
  ) {}

  /** The process's rig, reactivated for a new input (a fresh driver over zeroed RAM, the device after a reset). */
  static async open(): Promise<Rig> {
    Rig.shared ??= Rig.create();
    const rig = await Rig.shared;
    rig.tag = 1n;
    rig.answers = [];
    rig.g.start();
    return rig;
  }

  private static async create(): Promise<Rig> {
    auditGuestMemory();
    const verbs = new FakeVerbs();
    const aliases = new FakeAliasMapper();
    const device = await RdmaDevice.open({
      verbs,
      hostDevice: 'fake0',
      vmId: 'vm-a',
      resolver: new StaticAddressResolver(TABLE),
      log: quietLogger,
      aliases,
    });
    return new Rig(verbs, aliases, new FuzzGuest(device, REGION_SIZE));
  }

  /**
   * Whether the device set DEVICE_NEEDS_RESET (a queue it declared broken). After that it processes nothing more
   * from any queue (spec 7.5), so the waits below end there.
   */
  get needsReset(): boolean {
    return this.g.broken.length > 0;
  }

  /** Spec 7.5 lists the only four causes of DEVICE_NEEDS_RESET; a target whose input cannot cause them calls this. */
  assertNoReset(target: string, why: string): void {
    const b = this.g.broken[0];
    invariant(b === undefined, `${target}: DEVICE_NEEDS_RESET (queue ${b?.queue}: ${b?.error.message}) although ${why}`);
  }

  /** Raw readable bytes + a writable part on the control queue; undefined once the device needs a reset. */
  async raw(readable: Uint8Array, writable: number): Promise<{ used: number; written: Uint8Array } | undefined> {
    if (this.needsReset) return undefined;
    const { g } = this;
    const buffers = [];
    if (readable.length > 0) {
      const at = g.mem.alloc(readable.length, { align: 8 });
      g.mem.write(at, readable);
      buffers.push({ addr: at, len: readable.length });
    }
    const respAddr = writable > 0 ? g.mem.alloc(writable, { align: 8 }) : 0;
    if (writable > 0) buffers.push({ addr: respAddr, len: writable, write: true });
    if (buffers.length === 0) buffers.push({ len: 0 });
    const built = g.ctrl.add({ buffers });
    g.device.queueNotify(0);
    for (let i = 0; i < MAX_TURNS; i++) {
      const u = g.ctrl.readUsed().find((x) => x.id === built.id);
      if (u !== undefined) {
        invariant(u.len <= writable, `control: used length ${u.len} > writable ${writable}`);
        return { used: u.len, written: writable > 0 ? g.mem.read(respAddr, writable) : new Uint8Array(0) };
      }
      if (this.needsReset || g.failures.length > 0) return undefined;
      await turn();
    }
    throw new FuzzInvariantError(`control request neither answered nor refused after ${MAX_TURNS} turns`);
  }

  /** One framed control request; undefined once the device needs a reset. */
  async cmd(command: number, body: Uint8Array, pages: readonly bigint[] = [], responseSize = 256): Promise<Answer | undefined> {
    const tag = this.tag++;
    const size = CtrlResponseHeader.size + responseSize;
    const r = await this.raw(encodeRequest(command, tag, body, pages), size);
    if (r === undefined) return undefined;
    invariant(r.used >= CtrlResponseHeader.size, `control: answer of ${r.used} bytes has no header`);
    const h = CtrlResponseHeader.decode(r.written);
    this.answers.push(h.status, h.detail);
    invariant(h.tag === tag, `control: answer tag ${h.tag} for request ${tag}`);
    invariant(h.status >= 0 && h.status <= Status.DEVICE_ERROR, `control: status ${h.status} outside the spec's set`);
    invariant(h.status === Status.OK || r.used === CtrlResponseHeader.size, `control: failed answer carries a body`);
    return { status: h.status, detail: h.detail, body: r.written.subarray(CtrlResponseHeader.size, r.used), used: r.used };
  }

  /** A doorbell buffer of raw bytes; waits until the device returned it (or needs a reset). */
  async ring(bytes: Uint8Array): Promise<void> {
    if (this.needsReset) return;
    const { g } = this;
    const buffers = [];
    if (bytes.length > 0) {
      const at = g.mem.alloc(bytes.length, { align: 8 });
      g.mem.write(at, bytes);
      buffers.push({ addr: at, len: bytes.length });
    } else buffers.push({ len: 0 });
    const built = g.doorbell.add({ buffers });
    g.device.queueNotify(2);
    for (let i = 0; i < MAX_TURNS; i++) {
      if (g.doorbell.readUsed().some((u) => u.id === built.id)) return;
      if (this.needsReset || g.failures.length > 0) return;
      await turn();
    }
    throw new FuzzInvariantError(`doorbell buffer not returned after ${MAX_TURNS} turns`);
  }

  /** Lets the device run what it queued (completions, events). */
  async idle(turns = 8): Promise<void> {
    for (let i = 0; i < turns; i++) await turn();
  }

  /** A command that must succeed (the rig's own set-up); its response body. */
  async ok(command: number, body: Uint8Array, pages: readonly bigint[] = []): Promise<Uint8Array> {
    const a = await this.cmd(command, body, pages, COMMANDS.get(command)!.response.size);
    if (a?.status !== Status.OK) throw new Error(`rig: command 0x${command.toString(16)} failed: status ${a?.status} detail ${a?.detail}`);
    return a.body;
  }

  /**
   * PD, CQ, an RC QP brought to RTS, and an MR of two pages: the valid state the WQE and doorbell targets start from.
   * The same requests as test/rdma/guest.ts sends, waited for with event-loop turns instead of its 1 ms timers.
   */
  async connectedQp(depth = 16): Promise<{ pd: number; cq: FuzzCq; qp: FuzzQp; mr: GuestMr }> {
    const { g } = this;
    const pd = HandleResponse.decode(await this.ok(Command.CREATE_PD, new Uint8Array(0))).handle;
    const cqPages = ringPages(depth, Limits.CQE_SIZE, 12);
    const cqRing = g.allocPages(cqPages);
    const cqIndex = g.allocPages(1);
    const cqBody = CreateCqRequest.encode({ cqe_count: depth, page_shift: 12, num_pages: cqPages, index_gpa: BigInt(cqIndex) });
    const cqHandle = CreateCqResponse.decode(await this.ok(Command.CREATE_CQ, cqBody, pageList(cqRing, cqPages))).cq_handle;
    const cq = new FuzzCq(asKitGuest(g), cqHandle, depth, cqRing, cqIndex);
    const sqPages = ringPages(depth, Limits.SQ_WQE_SIZE, 12);
    const rqPages = ringPages(depth, Limits.RQ_WQE_SIZE, 12);
    const sq = g.allocPages(sqPages);
    const rq = g.allocPages(rqPages);
    const idx = g.allocPages(1);
    const qpBody = CreateQpRequest.encode({
      pd_handle: pd,
      send_cq_handle: cqHandle,
      recv_cq_handle: cqHandle,
      qp_type: 2,
      sq_sig_all: 0,
      sq_page_shift: 12,
      rq_page_shift: 12,
      max_send_wr: depth,
      max_recv_wr: depth,
      max_send_sge: g.config.max_send_sge,
      max_recv_sge: g.config.max_recv_sge,
      max_inline_data: 0,
      sq_num_pages: sqPages,
      rq_num_pages: rqPages,
      sq_index_gpa: BigInt(idx),
      rq_index_gpa: BigInt(idx + 64),
    });
    const q = CreateQpResponse.decode(await this.ok(Command.CREATE_QP, qpBody, [...pageList(sq, sqPages), ...pageList(rq, rqPages)]));
    const qp = new FuzzQp(asKitGuest(g), q.qp_handle, q.qp_num, depth, sq, rq, idx, idx + 64);
    const mrPages = 2;
    const mrGpa = g.allocPages(mrPages);
    const iova = 0x7f00_0000_0000n;
    const access = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;
    const mrBody = RegMrRequest.encode({ pd_handle: pd, access_flags: access, iova, length: BigInt(mrPages * PAGE), page_shift: 12, total_pages: mrPages, num_pages: mrPages });
    const m = RegMrResponse.decode(await this.ok(Command.REG_MR, mrBody, pageList(mrGpa, mrPages)));
    const mr: GuestMr = { handle: m.mr_handle, lkey: m.lkey, rkey: m.rkey, gpa: mrGpa, iova, length: mrPages * PAGE };
    const S = QpAttrMask;
    const steps: [number, Parameters<typeof qpAttr>[0]][] = [
      [S.STATE | S.PKEY_INDEX | S.PORT | S.ACCESS_FLAGS, { qp_state: 1, port_num: 1, qp_access_flags: 7 }],
      [
        S.STATE | S.AV | S.PATH_MTU | S.DEST_QPN | S.RQ_PSN | S.MAX_DEST_RD_ATOMIC | S.MIN_RNR_TIMER,
        { qp_state: 2, path_mtu: 1, dest_qp_num: 0x42, max_dest_rd_atomic: 1, min_rnr_timer: 1, hop_limit: 64, dgid: gidFromIpv4('192.168.7.2') },
      ],
      [S.STATE | S.SQ_PSN | S.TIMEOUT | S.RETRY_CNT | S.RNR_RETRY | S.MAX_QP_RD_ATOMIC, { qp_state: 3, timeout: 14, retry_cnt: 7, rnr_retry: 7, max_rd_atomic: 1 }],
    ];
    for (const [mask, attr] of steps) {
      await this.ok(Command.MODIFY_QP, ModifyQpRequest.encode({ qp_handle: qp.handle, attr_mask: mask, attr: QpAttr.encode(qpAttr(attr)) }));
    }
    return { pd, cq, qp, mr };
  }

  /**
   * The checks every input ends with, then the device's reset and what the reset must leave: no host object, no QP,
   * no access to guest memory from then on (the driver side touches nothing until the next open()).
   */
  async finish(target: string): Promise<void> {
    const { g, verbs } = this;
    try {
      invariant(g.failures.length === 0, `${target}: device failure without a host cause: ${g.failures[0]?.message}`);
    } finally {
      g.stop();
    }
    await g.device.settled();
    const live = verbs.liveObjects();
    const left = Object.entries(live).filter(([kind, n]) => kind !== 'device' && n > 0);
    invariant(left.length === 0, `${target}: host objects left after reset: ${JSON.stringify(left)}`);
    invariant(this.aliases.live === 0, `${target}: ${this.aliases.live} MR aliases left mapped after reset`);
    invariant(g.device.qpCounters().length === 0 && !g.device.isActive, `${target}: the device kept QPs or stayed active after reset`);
    // Late work of the reset input (a completion, an event flush) gets these turns to show itself.
    await this.idle(RESET_QUIET_TURNS);
    const after = g.accessesAfterReset();
    invariant(after.length === 0, `${target}: the device touched guest memory after reset: ${after.join('; ')}`);
    assertNoOutsideAccess(target);
  }
}

export { PAGE, pageList, qpAttr };
