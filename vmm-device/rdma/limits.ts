// The device's limits (spec section 5): what the configuration advertises, derived from the host RNIC's own
// attributes and capped by the backend's per-VM quotas. Every number a guest request is checked against comes
// from here.

import {
  AtomicCap,
  DeviceConfig,
  FeatureBit,
  Limits,
  LinkLayer,
  minPagesPerCommand,
} from '../abi/rdma/index.ts';
import type { DeviceAttr, PortAttr } from '../verbs/host-verbs.ts';
import type { VirtualAddress } from './address-resolver.ts';

/** Per-VM quotas the backend imposes (spec section 12.6); each is further capped by what the host offers. */
export interface DeviceQuotas {
  maxPd: number;
  maxCq: number;
  maxQp: number;
  maxMr: number;
  maxAh: number;
  maxQpWr: number;
  maxCqe: number;
  maxMrPages: number;
  /** Bytes of registered memory (MR_BYTES), pending registrations included. */
  maxMrBytes: bigint;
}

/**
 * Defaults well inside every ceiling: 1,024 QPs and 1,024 CQs map 3,072 of the backend's mappings, against a per-VM
 * ceiling of about 17,700 QPs each with its CQ at the default vm.max_map_count of 65,530 (mapping-budget.ts: the
 * device caps max_qp and max_cq there, and vrdma-backend refuses a larger quota at start), and they leave room for
 * dozens of VMs on one rxe device (the host ledger reserves each VM's limits: admission-ledger.ts).
 */
export const DEFAULT_QUOTAS: DeviceQuotas = {
  maxPd: 1024,
  maxCq: 1024,
  maxQp: 1024,
  maxMr: 4096,
  maxAh: 1024,
  maxQpWr: 4096,
  maxCqe: 8192,
  /** 1 GiB in 4 KiB pages. */
  maxMrPages: 262144,
  maxMrBytes: 4n << 30n,
};

/** Page sizes the device accepts in page lists: 4 KiB and 2 MiB. */
export const PAGE_SIZE_MASK = (1n << 12n) | (1n << 21n);
/** Page-list entries of one command: enough for the largest ring (section 5.2) and a 2 MiB chunk of an MR. */
export const MAX_PAGES_PER_COMMAND = 512;
/** READ/atomic depth offered at most (rxe offers 128; a guest needs far fewer). */
const MAX_RD_ATOM = 16;

/** Feature bits this device always offers (spec section 4); one doorbell queue (no MULTI_DOORBELL). */
export const OFFERED_FEATURES =
  (1n << BigInt(FeatureBit.RC)) | (1n << BigInt(FeatureBit.UD)) | (1n << BigInt(FeatureBit.ATOMIC)) | (1n << BigInt(FeatureBit.IMMEDIATE));

/** The feature bits offered with a configuration: INLINE exactly when `max_inline_data` is above 0 (spec 4.2). */
export function offeredFeatures(config: { max_inline_data: number } | undefined): bigint {
  return OFFERED_FEATURES | ((config?.max_inline_data ?? 0) > 0 ? 1n << BigInt(FeatureBit.INLINE) : 0n);
}

/**
 * `max_inline_data` of the configuration: the spec's SQ_WQE_MAX_INLINE, or less when the host takes less. The host's
 * capacity (DeviceAttr.maxInlineData) is what NativeVerbs learned by creating an RC and a UD QP asking for it, since
 * ibv_query_device reports no inline limit; a host QP created with the guest's max_inline_data then always exists,
 * and the relay posts each inline WQE's bytes with IBV_SEND_INLINE. A host that reports none (undefined, 0) gets
 * no INLINE: the device has no other way to send bytes that live in no registered MR.
 */
export function maxInlineData(host: DeviceAttr): number {
  const h = host.maxInlineData ?? 0;
  return Number.isInteger(h) && h > 0 ? Math.min(Limits.SQ_WQE_MAX_INLINE, h) : 0;
}

export type DeviceConfigValue = ReturnType<typeof DeviceConfig.decode>;

function largestPowerOfTwoAtMost(n: number): number {
  let p = 1;
  while (p * 2 <= n) p *= 2;
  return p;
}

/** Node GUID from the virtual MAC (EUI-64: flip the U/L bit, insert ff:fe). */
export function nodeGuidFromMac(mac: Uint8Array): bigint {
  const b = [mac[0]! ^ 0x02, mac[1]!, mac[2]!, 0xff, 0xfe, mac[3]!, mac[4]!, mac[5]!];
  // Stored little-endian in the config; the value is the big-endian reading of the EUI-64 bytes.
  return b.reduce((acc, x) => (acc << 8n) | BigInt(x), 0n);
}

export function computeConfig(host: DeviceAttr, port: PortAttr, quotas: DeviceQuotas, address: VirtualAddress): DeviceConfigValue {
  const maxQpWr = Math.min(largestPowerOfTwoAtMost(Math.min(host.maxQpWr, quotas.maxQpWr)), Limits.MAX_QUEUE_DEPTH);
  const maxCqe = Math.min(largestPowerOfTwoAtMost(Math.min(host.maxCqe, quotas.maxCqe)), Limits.MAX_QUEUE_DEPTH);
  const pagesPerCommand = Math.max(MAX_PAGES_PER_COMMAND, minPagesPerCommand(maxQpWr, maxCqe));
  const maxMrPages = Math.min(quotas.maxMrPages, 0xffff_ffff);
  const hostMrSize = host.maxMrSize;
  const maxMrSize = [hostMrSize, BigInt(maxMrPages) << 12n, quotas.maxMrBytes].reduce((a, b) => (a < b ? a : b));
  return {
    max_pd: Math.min(host.maxPd, quotas.maxPd),
    max_cq: Math.min(host.maxCq, quotas.maxCq),
    max_qp: Math.min(host.maxQp, quotas.maxQp),
    max_mr: Math.min(host.maxMr, quotas.maxMr),
    max_ah: Math.min(host.maxAh, quotas.maxAh),
    max_qp_wr: maxQpWr,
    max_cqe: maxCqe,
    max_send_sge: Math.min(Limits.SQ_WQE_MAX_SGE, host.maxSge),
    max_recv_sge: Math.min(Limits.RQ_WQE_MAX_SGE, host.maxSge),
    max_inline_data: maxInlineData(host),
    max_mr_size: maxMrSize,
    page_size_mask: PAGE_SIZE_MASK,
    max_mr_pages: maxMrPages,
    max_pages_per_command: pagesPerCommand,
    max_qp_rd_atom: Math.min(host.maxQpRdAtom, MAX_RD_ATOM),
    max_qp_init_rd_atom: Math.min(host.maxQpInitRdAtom, MAX_RD_ATOM),
    max_msg_size: Math.min(port.maxMsgSz, 0xffff_ffff),
    num_doorbell_queues: 1,
    gid_tbl_len: 1,
    node_guid: nodeGuidFromMac(address.mac),
    port_state: port.state,
    active_mtu: port.activeMtu,
    max_mtu: port.maxMtu,
    link_layer: LinkLayer.ETHERNET,
    active_width: port.activeWidth & 0xff,
    active_speed: port.activeSpeed & 0xff,
    atomic_cap: host.atomicCap !== 0 ? AtomicCap.HCA : AtomicCap.NONE,
    gid: address.gid.slice(),
    mac: address.mac.slice(),
  };
}

/** Bytes of an MTU enum value (spec Mtu table). */
export function mtuBytes(mtu: number): number {
  return 128 << mtu;
}
