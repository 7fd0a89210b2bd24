// Numbers of the virtio-rdma spec (virtio-rdma.md): device ID, queues, feature bits, commands, statuses, enums and
// the limits fixed by the v1 formats. Each `as const` object here matches one constants table of the spec, and
// test/spec/ checks that they agree value by value.

/** Virtio device ID of an RDMA device (the only number the virtio spec standardises for it). */
export const VIRTIO_ID_RDMA = 42;

/** Virtqueue indexes (spec section 3). Doorbell queues are DOORBELLQ_FIRST .. DOORBELLQ_FIRST + n - 1. */
export const Queue = {
  CONTROLQ: 0,
  EVENTQ: 1,
  DOORBELLQ_FIRST: 2,
} as const;

/** Device-specific feature bits (spec section 4). */
export const FeatureBit = {
  RC: 0,
  UD: 1,
  ATOMIC: 2,
  IMMEDIATE: 3,
  INLINE: 4,
  MULTI_DOORBELL: 5,
  HOST_QUEUE_MAPPING: 6,
  MIGRATION: 7,
  SRQ: 8,
} as const;

/**
 * Feature bits this implementation neither offers nor accepts: MIGRATION and SRQ are reserved by the spec.
 * HOST_QUEUE_MAPPING (section 13) is offered by a device whose host and transport can map (section 13.16).
 */
export const RESERVED_FEATURE_BITS: readonly number[] = [FeatureBit.MIGRATION, FeatureBit.SRQ];

/** Control-queue command numbers (spec section 8). */
export const Command = {
  QUERY_DEVICE: 0x01,
  QUERY_PORT: 0x02,
  QUERY_GID: 0x03,
  CREATE_PD: 0x10,
  DESTROY_PD: 0x11,
  CREATE_CQ: 0x20,
  DESTROY_CQ: 0x21,
  ARM_CQ: 0x22,
  CREATE_QP: 0x30,
  MODIFY_QP: 0x31,
  QUERY_QP: 0x32,
  DESTROY_QP: 0x33,
  REG_MR: 0x40,
  REG_MR_CONTINUE: 0x41,
  DEREG_MR: 0x42,
  CREATE_AH: 0x50,
  DESTROY_AH: 0x51,
} as const;
export type CommandName = keyof typeof Command;

/** Command numbers kept for the host queue mapping mode (section 13); a v1 device answers INVALID_COMMAND. */
export const RESERVED_COMMAND_RANGE = { first: 0x100, last: 0x1ff } as const;

/** Status of a control request (spec section 7.4). */
export const Status = {
  OK: 0,
  INVALID_COMMAND: 1,
  INVALID_LENGTH: 2,
  INVALID_HANDLE: 3,
  INVALID_ARGUMENT: 4,
  NO_RESOURCES: 5,
  OUT_OF_RANGE: 6,
  NOT_SUPPORTED: 7,
  REFUSED_BY_POLICY: 8,
  DESTINATION_UNREACHABLE: 9,
  WRONG_STATE: 10,
  BUSY: 11,
  DEVICE_ERROR: 12,
} as const;
export type StatusName = keyof typeof Status;

/** Response `detail` with status NO_RESOURCES: which limit was reached (spec section 7.4). */
export const ResourceKind = {
  PD: 1,
  CQ: 2,
  QP: 3,
  MR: 4,
  AH: 5,
  MR_BYTES: 6,
  HOST: 7,
  MAPPING: 8,
} as const;

/** Event types on the event queue (spec section 9). */
export const EventType = {
  COMPLETION: 1,
  CQ_ERROR: 2,
  QP_FATAL: 3,
  QP_REQ_ERR: 4,
  QP_ACCESS_ERR: 5,
  COMM_EST: 6,
  PORT_ACTIVE: 7,
  PORT_ERR: 8,
  GID_CHANGE: 9,
  DEVICE_FATAL: 10,
  QP_POLICY_TEARDOWN: 11,
  DOORBELL_ERROR: 12,
} as const;

/** `detail` of QP_FATAL events. */
export const QpFatalReason = {
  HOST_ERROR: 1,
  WQ_OVERFLOW: 2,
  RING_UNREADABLE: 3,
  CQ_OVERRUN: 4,
  MR_LOST: 5,
} as const;

/** `detail` of CQ_ERROR events. */
export const CqErrorReason = {
  OVERRUN: 1,
  INDEX_INVALID: 2,
  HOST_ERROR: 3,
  RING_UNREADABLE: 4,
} as const;

/** `detail` of QP_POLICY_TEARDOWN events. */
export const PolicyReason = {
  RULE_CHANGED: 1,
  PEER_REMOVED: 2,
  MAPPING_CHANGED: 3,
  OPERATOR: 4,
} as const;

/** `detail` of DOORBELL_ERROR events. */
export const DoorbellErrorReason = {
  UNKNOWN_HANDLE: 1,
  UNKNOWN_TYPE: 2,
  PARTIAL_RECORD: 3,
  WRONG_STATE: 4,
  TOO_MANY_RECORDS: 5,
} as const;

/** Doorbell record types (spec section 10.5). */
export const DoorbellType = {
  SQ: 1,
  RQ: 2,
  CQ_ARM_NEXT: 3,
  CQ_ARM_SOLICITED: 4,
} as const;

export const QpType = {
  RC: 2,
  UD: 4,
} as const;

export const QpState = {
  RESET: 0,
  INIT: 1,
  RTR: 2,
  RTS: 3,
  SQD: 4,
  SQE: 5,
  ERR: 6,
} as const;

/** MODIFY_QP attr_mask bits (spec section 8.9). */
export const QpAttrMask = {
  STATE: 1 << 0,
  CUR_STATE: 1 << 1,
  EN_SQD_ASYNC_NOTIFY: 1 << 2,
  ACCESS_FLAGS: 1 << 3,
  PKEY_INDEX: 1 << 4,
  PORT: 1 << 5,
  QKEY: 1 << 6,
  AV: 1 << 7,
  PATH_MTU: 1 << 8,
  TIMEOUT: 1 << 9,
  RETRY_CNT: 1 << 10,
  RNR_RETRY: 1 << 11,
  RQ_PSN: 1 << 12,
  MAX_QP_RD_ATOMIC: 1 << 13,
  ALT_PATH: 1 << 14,
  MIN_RNR_TIMER: 1 << 15,
  SQ_PSN: 1 << 16,
  MAX_DEST_RD_ATOMIC: 1 << 17,
  PATH_MIG_STATE: 1 << 18,
  CAP: 1 << 19,
  DEST_QPN: 1 << 20,
} as const;

/** attr_mask bits a v1 device accepts; the other defined bits get NOT_SUPPORTED, undefined bits INVALID_ARGUMENT. */
export const SUPPORTED_QP_ATTR_MASK =
  QpAttrMask.STATE |
  QpAttrMask.ACCESS_FLAGS |
  QpAttrMask.PKEY_INDEX |
  QpAttrMask.PORT |
  QpAttrMask.QKEY |
  QpAttrMask.AV |
  QpAttrMask.PATH_MTU |
  QpAttrMask.TIMEOUT |
  QpAttrMask.RETRY_CNT |
  QpAttrMask.RNR_RETRY |
  QpAttrMask.RQ_PSN |
  QpAttrMask.MAX_QP_RD_ATOMIC |
  QpAttrMask.MIN_RNR_TIMER |
  QpAttrMask.SQ_PSN |
  QpAttrMask.MAX_DEST_RD_ATOMIC |
  QpAttrMask.DEST_QPN;

/** Every bit defined in QpAttrMask (bits above DEST_QPN are undefined). */
export const DEFINED_QP_ATTR_MASK = (QpAttrMask.DEST_QPN << 1) - 1;

/** Attributes each transition requires (spec section 8.9, table "Required attributes"). Key: `${type}:${from}->${to}`. */
export const REQUIRED_QP_ATTRS: Readonly<Record<string, number>> = {
  [`${QpType.RC}:${QpState.RESET}->${QpState.INIT}`]:
    QpAttrMask.STATE | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.ACCESS_FLAGS,
  [`${QpType.RC}:${QpState.INIT}->${QpState.RTR}`]:
    QpAttrMask.STATE |
    QpAttrMask.AV |
    QpAttrMask.PATH_MTU |
    QpAttrMask.DEST_QPN |
    QpAttrMask.RQ_PSN |
    QpAttrMask.MAX_DEST_RD_ATOMIC |
    QpAttrMask.MIN_RNR_TIMER,
  [`${QpType.RC}:${QpState.RTR}->${QpState.RTS}`]:
    QpAttrMask.STATE |
    QpAttrMask.SQ_PSN |
    QpAttrMask.TIMEOUT |
    QpAttrMask.RETRY_CNT |
    QpAttrMask.RNR_RETRY |
    QpAttrMask.MAX_QP_RD_ATOMIC,
  [`${QpType.UD}:${QpState.RESET}->${QpState.INIT}`]:
    QpAttrMask.STATE | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.QKEY,
  [`${QpType.UD}:${QpState.INIT}->${QpState.RTR}`]: QpAttrMask.STATE,
  [`${QpType.UD}:${QpState.RTR}->${QpState.RTS}`]: QpAttrMask.STATE | QpAttrMask.SQ_PSN,
  [`${QpType.RC}:${QpState.INIT}->${QpState.INIT}`]: QpAttrMask.STATE,
  [`${QpType.RC}:${QpState.RTS}->${QpState.RTS}`]: QpAttrMask.STATE,
  [`${QpType.UD}:${QpState.INIT}->${QpState.INIT}`]: QpAttrMask.STATE,
  [`${QpType.UD}:${QpState.RTS}->${QpState.RTS}`]: QpAttrMask.STATE,
};

/**
 * Attributes a transition accepts besides the required ones (spec section 8.11, table "Optional attributes").
 * Transitions to RESET and ERR take STATE only. A transition absent from both tables is WRONG_STATE.
 */
export const OPTIONAL_QP_ATTRS: Readonly<Record<string, number>> = {
  [`${QpType.RC}:${QpState.INIT}->${QpState.INIT}`]: QpAttrMask.ACCESS_FLAGS | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT,
  [`${QpType.RC}:${QpState.INIT}->${QpState.RTR}`]: QpAttrMask.ACCESS_FLAGS | QpAttrMask.PKEY_INDEX,
  [`${QpType.RC}:${QpState.RTR}->${QpState.RTS}`]: QpAttrMask.ACCESS_FLAGS | QpAttrMask.MIN_RNR_TIMER,
  [`${QpType.RC}:${QpState.RTS}->${QpState.RTS}`]: QpAttrMask.ACCESS_FLAGS | QpAttrMask.MIN_RNR_TIMER,
  [`${QpType.UD}:${QpState.INIT}->${QpState.INIT}`]: QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.QKEY,
  [`${QpType.UD}:${QpState.INIT}->${QpState.RTR}`]: QpAttrMask.PKEY_INDEX | QpAttrMask.QKEY,
  [`${QpType.UD}:${QpState.RTR}->${QpState.RTS}`]: QpAttrMask.QKEY,
  [`${QpType.UD}:${QpState.RTS}->${QpState.RTS}`]: QpAttrMask.QKEY,
};

/** Key of REQUIRED_QP_ATTRS / OPTIONAL_QP_ATTRS. */
export function transitionKey(qpType: number, from: number, to: number): string {
  return `${qpType}:${from}->${to}`;
}

/** Memory access flags of REG_MR and of the QP's qp_access_flags. */
export const AccessFlag = {
  LOCAL_WRITE: 1 << 0,
  REMOTE_WRITE: 1 << 1,
  REMOTE_READ: 1 << 2,
  REMOTE_ATOMIC: 1 << 3,
} as const;
export const DEFINED_ACCESS_FLAGS = 0xf;

export const Mtu = {
  MTU_256: 1,
  MTU_512: 2,
  MTU_1024: 3,
  MTU_2048: 4,
  MTU_4096: 5,
} as const;

export const PortState = {
  DOWN: 1,
  INIT: 2,
  ARMED: 3,
  ACTIVE: 4,
} as const;

export const LinkLayer = {
  ETHERNET: 2,
} as const;

export const GidType = {
  ROCE_V2: 2,
} as const;

export const AtomicCap = {
  NONE: 0,
  HCA: 1,
} as const;

/** Send WQE opcodes (spec section 10.3). */
export const SendOpcode = {
  RDMA_WRITE: 0,
  RDMA_WRITE_WITH_IMM: 1,
  SEND: 2,
  SEND_WITH_IMM: 3,
  RDMA_READ: 4,
  ATOMIC_CMP_AND_SWP: 6,
  ATOMIC_FETCH_AND_ADD: 7,
} as const;

/** Send WQE flags. */
export const SendFlag = {
  SIGNALED: 1 << 0,
  SOLICITED: 1 << 1,
  INLINE: 1 << 2,
  FENCE: 1 << 3,
} as const;
export const DEFINED_SEND_FLAGS = 0xf;

/** CQE opcodes (spec section 10.4). */
export const WcOpcode = {
  SEND: 0,
  RDMA_WRITE: 1,
  RDMA_READ: 2,
  COMP_SWAP: 3,
  FETCH_ADD: 4,
  RECV: 128,
  RECV_RDMA_WITH_IMM: 129,
} as const;

/** CQE status values (spec section 10.4). */
export const WcStatus = {
  SUCCESS: 0,
  LOC_LEN_ERR: 1,
  LOC_QP_OP_ERR: 2,
  LOC_PROT_ERR: 4,
  WR_FLUSH_ERR: 5,
  BAD_RESP_ERR: 7,
  LOC_ACCESS_ERR: 8,
  REM_INV_REQ_ERR: 9,
  REM_ACCESS_ERR: 10,
  REM_OP_ERR: 11,
  RETRY_EXC_ERR: 12,
  RNR_RETRY_EXC_ERR: 13,
  REM_ABORT_ERR: 16,
  FATAL_ERR: 19,
  RESP_TIMEOUT_ERR: 20,
  GENERAL_ERR: 21,
} as const;

/** CQE wc_flags. */
export const WcFlag = {
  WITH_IMM: 1 << 0,
  GRH: 1 << 1,
} as const;

/** Sizes and limits fixed by the v1 formats (spec section 10.1 and the layout tables). */
export const Limits = {
  /** The only port number. */
  PORT_NUM: 1,
  /** Handles are in [1, HANDLE_MAX]; 0 never names an object. */
  HANDLE_MAX: 0xff_ffff,
  /** Wire QP numbers are 24 bits. */
  QPN_MAX: 0xff_ffff,
  /** Service levels (QpAttr `sl`, CreateAhRequest `sl`) are 4 bits: 0 to 15. */
  SL_MAX: 15,
  /** Smallest page shift of page lists and rings (4 KiB). */
  MIN_PAGE_SHIFT: 12,
  /** Largest page shift a v1 device may advertise in page_size_mask (1 GiB). */
  MAX_PAGE_SHIFT: 30,
  /** Bytes of one page-list entry (a little-endian u64 guest physical address). */
  PAGE_ADDR_SIZE: 8,
  SQ_WQE_SIZE: 128,
  RQ_WQE_SIZE: 64,
  CQE_SIZE: 32,
  SGE_SIZE: 16,
  /** SGEs that fit in a send WQE's payload area. */
  SQ_WQE_MAX_SGE: 4,
  /** Inline bytes that fit in a send WQE's payload area. */
  SQ_WQE_MAX_INLINE: 64,
  /** SGEs in a receive WQE. */
  RQ_WQE_MAX_SGE: 3,
  EVENT_SIZE: 32,
  DOORBELL_RECORD_SIZE: 8,
  QUEUE_INDEX_SIZE: 8,
  /** Bytes of the global routing header area at the start of a UD receive buffer. */
  GRH_SIZE: 40,
  GID_SIZE: 16,
  MAC_SIZE: 6,
  /** Q_Keys with this bit set are controlled Q_Keys: the guest may not use them. */
  QKEY_CONTROLLED_BIT: 0x8000_0000,
  /** Largest queue depth (WQEs or CQEs) a v1 device may advertise: indexes are free-running u32 counters. */
  MAX_QUEUE_DEPTH: 1 << 22,
  /** Records the device takes from one doorbell buffer; later ones are ignored and reported (bounded work per buffer). */
  DOORBELL_MAX_RECORDS: 256,
} as const;

// ---- Section 13: host queue mapping ----

/** The format of mapped host queues (configuration `host_queue_format`, QueueMapping `format`). */
export const HostQueueFormat = {
  NONE: 0,
  RXE: 1,
} as const;

/** `map_flags` of CreateCqRequest and CreateQpRequest (with HOST_QUEUE_MAPPING). */
export const MapFlag = {
  MAP: 0x1,
} as const;
export const DEFINED_MAP_FLAGS = 0x1;

/** How the device learns of a mapped doorbell (configuration `doorbell_mode`). */
export const DoorbellMode = {
  POLLED: 0,
  NOTIFY: 1,
} as const;

/** Sizes of the mapped mode (section 13). */
export const MappingLimits = {
  MAPPING_ALIGN: 4096,
  DOORBELL_SLOT_SIZE: 8,
  DOORBELL_PAGE_SIZE: 4096,
  RXE_QUEUE_HEADER_SIZE: 384,
  RXE_SEND_WQE_BASE: 208,
  RXE_RECV_WQE_BASE: 40,
  RXE_CQE_SLOT_SIZE: 128,
  RXE_MIN_SLOT_SIZE: 64,
} as const;
