// libibverbs numbers the backend uses (values of <infiniband/verbs.h>, rdma-core 44), and the limits of the binary
// layouts shared with native/src/verbs.cc.

export const QpType = { RC: 2, UC: 3, UD: 4 } as const;
export type QpType = (typeof QpType)[keyof typeof QpType];

export const QpState = { RESET: 0, INIT: 1, RTR: 2, RTS: 3, SQD: 4, SQE: 5, ERR: 6 } as const;
export type QpState = (typeof QpState)[keyof typeof QpState];

/** enum ibv_mtu. */
export const Mtu = { MTU_256: 1, MTU_512: 2, MTU_1024: 3, MTU_2048: 4, MTU_4096: 5 } as const;
export type Mtu = (typeof Mtu)[keyof typeof Mtu];

/** enum ibv_wr_opcode. */
export const WrOpcode = {
  RDMA_WRITE: 0,
  RDMA_WRITE_WITH_IMM: 1,
  SEND: 2,
  SEND_WITH_IMM: 3,
  RDMA_READ: 4,
  ATOMIC_CMP_AND_SWP: 5,
  ATOMIC_FETCH_AND_ADD: 6,
  LOCAL_INV: 7,
  BIND_MW: 8,
  SEND_WITH_INV: 9,
} as const;
export type WrOpcode = (typeof WrOpcode)[keyof typeof WrOpcode];

/** enum ibv_send_flags. */
export const SendFlags = { FENCE: 1, SIGNALED: 2, SOLICITED: 4, INLINE: 8, IP_CSUM: 16 } as const;

/** enum ibv_access_flags (the ones a device model may pass on). */
export const Access = {
  LOCAL_WRITE: 1,
  REMOTE_WRITE: 2,
  REMOTE_READ: 4,
  REMOTE_ATOMIC: 8,
  MW_BIND: 16,
  ZERO_BASED: 32,
  ON_DEMAND: 64,
} as const;

/** enum ibv_wc_status, in order. */
export const WC_STATUS_NAMES = [
  'SUCCESS',
  'LOC_LEN_ERR',
  'LOC_QP_OP_ERR',
  'LOC_EEC_OP_ERR',
  'LOC_PROT_ERR',
  'WR_FLUSH_ERR',
  'MW_BIND_ERR',
  'BAD_RESP_ERR',
  'LOC_ACCESS_ERR',
  'REM_INV_REQ_ERR',
  'REM_ACCESS_ERR',
  'REM_OP_ERR',
  'RETRY_EXC_ERR',
  'RNR_RETRY_EXC_ERR',
  'LOC_RDD_VIOL_ERR',
  'REM_INV_RD_REQ_ERR',
  'REM_ABORT_ERR',
  'INV_EECN_ERR',
  'INV_EEC_STATE_ERR',
  'FATAL_ERR',
  'RESP_TIMEOUT_ERR',
  'GENERAL_ERR',
] as const;
export type WcStatusName = (typeof WC_STATUS_NAMES)[number];
export const WcStatus = Object.fromEntries(WC_STATUS_NAMES.map((n, i) => [n, i])) as {
  readonly [K in WcStatusName]: number;
};
export function wcStatusName(status: number): string {
  return WC_STATUS_NAMES[status] ?? `UNKNOWN_${status}`;
}

/** enum ibv_wc_opcode. */
export const WcOpcode = {
  SEND: 0,
  RDMA_WRITE: 1,
  RDMA_READ: 2,
  COMP_SWAP: 3,
  FETCH_ADD: 4,
  BIND_MW: 5,
  LOCAL_INV: 6,
  RECV: 128,
  RECV_RDMA_WITH_IMM: 129,
} as const;

/** enum ibv_wc_flags. */
export const WcFlags = { GRH: 1, WITH_IMM: 2, IP_CSUM_OK: 4, WITH_INV: 8 } as const;

/** enum ibv_gid_type. */
export const GidType = { IB: 0, ROCE_V1: 1, ROCE_V2: 2 } as const;

/** enum ibv_port_state. */
export const PortState = { NOP: 0, DOWN: 1, INIT: 2, ARMED: 3, ACTIVE: 4, ACTIVE_DEFER: 5 } as const;

/** Bytes of a UD receive buffer's leading Global Routing Header (always present on RoCE). */
export const GRH_BYTES = 40;

// Binary layouts (native/src/verbs.cc states the same numbers; `limits` from the addon is checked against them).
export const SEND_WR_HEADER_BYTES = 64;
export const RECV_WR_HEADER_BYTES = 16;
export const SGE_BYTES = 16;
export const WC_BYTES = 48;
/** Work requests in one post call. */
export const MAX_WRS_PER_POST = 1024;
/** Scatter/gather entries in one work request. */
export const MAX_SGE_PER_WR = 32;
/** Completions in one poll call. */
export const MAX_WC_PER_POLL = 4096;
/** Inline bytes in one send work request (SendWr.inline). */
export const MAX_INLINE_PER_WR = 1024;

/**
 * How long destroying a QP with work outstanding waits for the host's flush completions (every receive and
 * signaled send) before it gives up on the rest and completes them as flushed itself. One deadline for the whole
 * backend: the device model's relay and the addon's destroy both use this value (the addon receives it per call).
 */
export const FLUSH_LIMIT_MS = 5000;
