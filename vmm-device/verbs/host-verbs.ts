// HostVerbs: the host's RDMA verbs as the device model sees them. Two implementations: NativeVerbs (libibverbs
// through the addon; native-verbs.ts) and FakeVerbs (a test double with injectable failures; fake-verbs.ts).
// Nothing here names the addon.
//
// Objects are named by handles. A handle stops being valid the moment its destroy starts; every later use fails
// with a VerbsError whose errno is EBADF. Destroying an object that others depend on (a PD with QPs, MRs or AHs;
// a CQ used by a QP; a device with PDs or CQs) fails with EBUSY. Verbs that may sleep or pin memory return
// Promises; post, poll and notify are synchronous.

import type { RecvWrList, SendWrList, WcBuffer } from './layout.ts';

/** A verb's failure: `verb` is the libibverbs function, `errno` the errno name (`ibv_create_qp: EINVAL (...)`). */
export class VerbsError extends Error {
  constructor(
    readonly verb: string,
    readonly errno: string,
    detail: string,
    /** For a refused post: the index of the first work request that was not posted (the ones before were). */
    readonly badWrIndex?: number,
  ) {
    super(`${verb}: ${errno} (${detail})`);
    this.name = 'VerbsError';
  }

  get code(): string {
    return this.errno;
  }
}

export interface DeviceInfo {
  name: string;
  /** Node GUID, `xxxx:xxxx:xxxx:xxxx`. */
  guid: string;
  nodeType: number;
  transportType: number;
}

export interface DeviceHandle {
  readonly kind: 'device';
  readonly id: number;
  readonly name: string;
}
export interface PdHandle {
  readonly kind: 'pd';
  readonly id: number;
}
export interface CqHandle {
  readonly kind: 'cq';
  readonly id: number;
  /** Entries the CQ actually has (at least the number asked for). */
  readonly cqe: number;
}
export interface QpHandle {
  readonly kind: 'qp';
  readonly id: number;
  readonly qpNum: number;
  /** QpType. */
  readonly qpType: number;
  /** The capabilities the QP actually has. */
  readonly cap: QpCap;
}
export interface MrHandle {
  readonly kind: 'mr';
  readonly id: number;
  readonly lkey: number;
  readonly rkey: number;
  /** First address of the MR as work requests name it: the iova if one was given, else the process address. */
  readonly addr: bigint;
  readonly length: number;
}
export interface AhHandle {
  readonly kind: 'ah';
  readonly id: number;
}

/**
 * A host queue buffer another process maps (spec section 13.1): the host created it without mapping it here, and
 * the provider admits exactly one mmap of `fdOffset` on `fd` (rxe_mmap), which the VMM makes (SHMEM_MAP).
 */
export interface HostQueueBuffer {
  /** The device's uverbs file (borrowed: valid while the device is open; the caller never closes it). */
  readonly fd: number;
  /** The mmap offset from the host's create response. */
  readonly fdOffset: bigint;
  /** Bytes to map: the queue header and every slot, a multiple of the page size. */
  readonly size: bigint;
  /** Slots of the queue: a power of two, at least the depth plus 1. */
  readonly numSlots: number;
  /** Bytes of one slot: a power of two. */
  readonly slotSize: number;
}

/** A CQ whose buffer this process never maps: pollCq fails with EINVAL; reqNotifyCq and its events work. */
export interface MappedCqHandle extends CqHandle {
  readonly queue: HostQueueBuffer;
}

/** An RC QP whose SQ and RQ this process never maps: postSend and postRecv fail with EINVAL. */
export interface MappedQpHandle extends QpHandle {
  readonly sq: HostQueueBuffer;
  readonly rq: HostQueueBuffer;
}

/** How the doorbell thread learns of a store (spec 13.6, DoorbellMode). */
export type DoorbellWake = 'polled' | 'notify';

export interface DoorbellEngineOptions {
  /** Doorbell pages (4096 bytes, 512 eight-byte slots each), at least 1. */
  pages: number;
  /** 'polled': the thread watches the slots; 'notify': it looks at them when the wake fd is signalled. */
  wake: DoorbellWake;
}

/**
 * The executor of mapped SQ doorbells (spec 13.6): a native thread that watches the slots of its doorbell pages and,
 * for each attached slot whose value differs from the one it acted on last, issues the host SQ doorbell of the slot's
 * QP (rxe: the POST_SEND command with no work request on the device's uverbs file), with no JavaScript per doorbell.
 */
export interface DoorbellEngine {
  /** The memory of the doorbell pages (a memfd the engine owns; closed by close()), for the VMM to map. */
  readonly fd: number;
  /** Bytes of that memory: pages * 4096. */
  readonly size: bigint;
  /** Slot `slot` (0 .. pages * 512 - 1) now rings `qp`'s SQ; the value it acted on last is the slot's value now. */
  attach(slot: number, qp: MappedQpHandle): void;
  /** Stops serving the slot: when this returns the thread executes no doorbell of that QP any more. */
  detach(slot: number): void;
  /** Executes the slot's doorbell once now (the device calls it when the QP reaches RTS, or enters ERR). */
  ring(slot: number): void;
  /** 'notify' mode: the eventfd whose signal wakes the thread (a dup the engine owns); undefined stops listening. */
  setWakeFd(fd: number | undefined): void;
  /** Doorbells the thread executed for the slot's QP since attach, and how many the host refused. */
  counters(slot: number): { executed: bigint; refused: bigint };
  /** Stops the thread (every slot detached) and frees the pages. */
  close(): Promise<void>;
}

export interface AsyncEvent {
  /** ibv_event_type without the IBV_EVENT_ prefix: QP_FATAL, PORT_ACTIVE, ... */
  type: string;
  typeNumber: number;
  qp?: QpHandle;
  cq?: CqHandle;
  port?: number;
}

export interface OpenDeviceOptions {
  /** Affiliated and unaffiliated asynchronous events (already acknowledged). */
  onAsyncEvent?: (event: AsyncEvent) => void;
  /** A failure of the device's event watchers (the fds became unusable). */
  onEventError?: (err: Error) => void;
}

export interface DeviceAttr {
  fwVer: string;
  nodeGuid: string;
  sysImageGuid: string;
  maxMrSize: bigint;
  pageSizeCap: bigint;
  vendorId: number;
  vendorPartId: number;
  hwVer: number;
  maxQp: number;
  maxQpWr: number;
  deviceCapFlags: number;
  maxSge: number;
  maxSgeRd: number;
  maxCq: number;
  maxCqe: number;
  maxMr: number;
  maxPd: number;
  maxQpRdAtom: number;
  maxQpInitRdAtom: number;
  atomicCap: number;
  maxAh: number;
  maxPkeys: number;
  physPortCnt: number;
  /**
   * The largest inline payload (64, 32, 16 or 8 bytes) an RC and a UD QP of this device can be created with, 0 for
   * none: ibv_device_attr carries no inline limit, so NativeVerbs learns it by creating throwaway QPs.
   */
  maxInlineData?: number;
}

export interface PortAttr {
  /** PortState. */
  state: number;
  maxMtu: number;
  activeMtu: number;
  gidTblLen: number;
  portCapFlags: number;
  maxMsgSz: number;
  pkeyTblLen: number;
  lid: number;
  smLid: number;
  lmc: number;
  activeWidth: number;
  activeSpeed: number;
  physState: number;
  /** 1 InfiniBand, 2 Ethernet (RoCE). */
  linkLayer: number;
}

export interface GidEntry {
  gid: Uint8Array;
  index: number;
  port: number;
  /** GidType. */
  type: number;
  ndevIfindex: number;
}

export interface CreateCqOptions {
  /** Called (on the event loop) after a completion event for this CQ, once re-armed by reqNotifyCq. */
  onCompletionEvent?: () => void;
  compVector?: number;
}

export interface QpCap {
  maxSendWr: number;
  maxRecvWr: number;
  maxSendSge: number;
  maxRecvSge: number;
  maxInlineData: number;
}

export interface QpInitAttr extends QpCap {
  /** QpType.RC or QpType.UD. */
  qpType: number;
  sendCq: CqHandle;
  recvCq: CqHandle;
  /** Every send WR completes with a WC (otherwise only SIGNALED ones). */
  sqSigAll?: boolean;
}

export interface GlobalRoute {
  /** 16 bytes. */
  dgid: Uint8Array;
  flowLabel?: number;
  sgidIndex: number;
  hopLimit?: number;
  trafficClass?: number;
}

export interface AhAttr {
  dlid?: number;
  sl?: number;
  srcPathBits?: number;
  staticRate?: number;
  portNum: number;
  /** Required on RoCE. */
  grh?: GlobalRoute;
}

/** Attributes for modifyQp: the ones present are applied (they form the attribute mask). */
export interface QpAttr {
  qpState?: number;
  pkeyIndex?: number;
  portNum?: number;
  qpAccessFlags?: number;
  qkey?: number;
  /** Mtu. */
  pathMtu?: number;
  destQpNum?: number;
  rqPsn?: number;
  sqPsn?: number;
  maxRdAtomic?: number;
  maxDestRdAtomic?: number;
  minRnrTimer?: number;
  timeout?: number;
  retryCnt?: number;
  rnrRetry?: number;
  ahAttr?: AhAttr;
}

export interface QpQueryResult extends Required<Omit<QpAttr, 'ahAttr'>> {
  qpNum: number;
  qpType: number;
  curQpState: number;
  ahAttr: AhAttr;
  cap: QpCap;
  sqSigAll: boolean;
}

export interface RegMrOptions {
  /** Byte offset of the region in the ArrayBuffer (default 0). */
  offset?: number;
  /** Bytes (default: the rest of the buffer). */
  length?: number;
  /** Access bits. */
  access: number;
  /**
   * The address work requests use for the first byte (ibv_reg_mr_iova): e.g. the guest's own address. It must
   * have the same offset within a page as the memory (guest RAM mapped page by page always does).
   */
  iova?: number | bigint;
}

export interface HostVerbs {
  /** RDMA devices of this host (throws a VerbsError when the host has no RDMA support at all). */
  listDevices(): DeviceInfo[];
  openDevice(name: string, options?: OpenDeviceOptions): Promise<DeviceHandle>;
  closeDevice(device: DeviceHandle): Promise<void>;
  queryDevice(device: DeviceHandle): Promise<DeviceAttr>;
  queryPort(device: DeviceHandle, port: number): Promise<PortAttr>;
  queryGidTable(device: DeviceHandle): Promise<GidEntry[]>;

  allocPd(device: DeviceHandle): Promise<PdHandle>;
  deallocPd(pd: PdHandle): Promise<void>;

  createCq(device: DeviceHandle, cqe: number, options?: CreateCqOptions): Promise<CqHandle>;
  destroyCq(cq: CqHandle): Promise<void>;
  /** Arms the CQ for one completion event (any completion, or only solicited ones). */
  reqNotifyCq(cq: CqHandle, solicitedOnly: boolean): void;
  /** Writes up to `max` (default: the buffer's capacity) completions into `out`; returns and sets out.count. */
  pollCq(cq: CqHandle, out: WcBuffer, max?: number): number;

  createQp(pd: PdHandle, init: QpInitAttr): Promise<QpHandle>;
  modifyQp(qp: QpHandle, attr: QpAttr): Promise<void>;
  queryQp(qp: QpHandle): Promise<QpQueryResult>;
  destroyQp(qp: QpHandle): Promise<void>;

  /** Registers `memory` (kept alive while registered). */
  regMr(pd: PdHandle, memory: ArrayBuffer, options: RegMrOptions): Promise<MrHandle>;
  deregMr(mr: MrHandle): Promise<void>;

  createAh(pd: PdHandle, attr: AhAttr): Promise<AhHandle>;
  destroyAh(ah: AhHandle): Promise<void>;

  /** HostQueueFormat (abi/rdma/constants.ts) of `device`'s user queues; NONE when they cannot be mapped. */
  hostQueueFormat(device: DeviceHandle): number;
  /**
   * A CQ created for another process to map (spec 13): this process never maps its buffer. Completion events,
   * reqNotifyCq and destroyCq work as for createCq; the caller unmaps it everywhere before destroyCq.
   */
  createMappedCq(device: DeviceHandle, cqe: number, options?: CreateCqOptions): Promise<MappedCqHandle>;
  /**
   * An RC QP created for another process to map: its send and receive CQs are mapped CQs (EINVAL otherwise).
   * modifyQp, queryQp and destroyQp work as for createQp; the caller unmaps both queues before destroyQp.
   */
  createMappedQp(pd: PdHandle, init: QpInitAttr): Promise<MappedQpHandle>;
  /** Starts a doorbell engine for `device`'s mapped QPs. */
  createDoorbellEngine(device: DeviceHandle, options: DoorbellEngineOptions): Promise<DoorbellEngine>;

  /** Posts the whole list; on refusal throws a VerbsError with badWrIndex. */
  postSend(qp: QpHandle, wrs: SendWrList): void;
  postRecv(qp: QpHandle, wrs: RecvWrList): void;
}

/**
 * The attributes of host device `device`, read with an open and a close of their own: what the backend reads once at
 * start, before its device model opens the device, to check the quotas it was given (cli/admission.ts). The replay of
 * a recorded session repeats it, so that a test double numbers the objects that follow as the recording's backend did.
 */
export async function hostAttrOf(verbs: HostVerbs, device: string): Promise<DeviceAttr> {
  const dev = await verbs.openDevice(device);
  try {
    return await verbs.queryDevice(dev);
  } finally {
    await verbs.closeDevice(dev);
  }
}
