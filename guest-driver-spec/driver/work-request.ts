// The work requests and completions of the driver's verbs API, shared by both data paths: the relay's rings
// (section 10, verbs.ts) and the mapped host queues (section 13, mapped/). Each path encodes them in its own format.
import { SendOpcode, type SgeValue } from '../../vmm-device/abi/rdma/index.ts';

export type SendOpcodeName = keyof typeof SendOpcode;
export type Sge = SgeValue;

/** Which data path a QP or CQ uses: the device's relay (section 10) or the host's queues mapped in (section 13). */
export type DataPathMode = 'relay' | 'mapped';

export interface SendWr {
  wrId: bigint;
  opcode: SendOpcodeName;
  sgList?: readonly Sge[];
  /** Inline payload (sets INLINE; needs the feature and the QP's max_inline_data). */
  inline?: Uint8Array;
  signaled?: boolean;
  solicited?: boolean;
  fence?: boolean;
  imm?: number;
  remoteAddr?: bigint;
  rkey?: number;
  compareAdd?: bigint;
  swap?: bigint;
  /** UD: destination (an Ah of verbs.ts; only the relay sends UD). */
  ah?: { readonly handle: number };
  remoteQpn?: number;
  remoteQkey?: number;
}

export interface RecvWr {
  wrId: bigint;
  sgList: readonly Sge[];
}

/** One completion in the spec's numbering (section 10.4), whichever path produced it. */
export interface WorkCompletion {
  wrId: bigint;
  qpHandle: number;
  status: number;
  statusName: string;
  opcode: number;
  opcodeName: string;
  byteLen: number;
  immData: number;
  srcQp: number;
  wcFlags: number;
  vendorErr: number;
}
