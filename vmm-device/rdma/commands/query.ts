// QUERY_DEVICE, QUERY_PORT, QUERY_GID (spec 8.3 to 8.5): answered from the configuration computed at open.

import {
  Command,
  GidType,
  Limits,
  PortState,
  QueryDeviceResponse,
  QueryGidRequest,
  QueryGidResponse,
  QueryPortRequest,
  QueryPortResponse,
} from '../../abi/rdma/index.ts';
import { VIRTIO_ID_RDMA } from '../../abi/virtio.ts';
import type { CommandContext, CommandGroup } from './context.ts';
import { fail } from './errors.ts';

/** Vendor values QUERY_DEVICE reports (chosen by the device, spec 8.3): 0x1af4 is the virtio vendor. */
const VENDOR_ID = 0x1af4;
const VENDOR_PART_ID = VIRTIO_ID_RDMA;
const HW_VER = 1;

function queryDevice(ctx: CommandContext): Uint8Array {
  const c = ctx.config;
  return QueryDeviceResponse.encode({
    node_guid: c.node_guid,
    max_mr_size: c.max_mr_size,
    page_size_mask: c.page_size_mask,
    vendor_id: VENDOR_ID,
    vendor_part_id: VENDOR_PART_ID,
    hw_ver: HW_VER,
    max_qp: c.max_qp,
    max_qp_wr: c.max_qp_wr,
    max_send_sge: c.max_send_sge,
    max_recv_sge: c.max_recv_sge,
    max_cq: c.max_cq,
    max_cqe: c.max_cqe,
    max_mr: c.max_mr,
    max_pd: c.max_pd,
    max_ah: c.max_ah,
    max_qp_rd_atom: c.max_qp_rd_atom,
    max_qp_init_rd_atom: c.max_qp_init_rd_atom,
    max_inline_data: c.max_inline_data,
    max_mr_pages: c.max_mr_pages,
    atomic_cap: c.atomic_cap,
    phys_port_cnt: 1,
  });
}

function queryPort(ctx: CommandContext, body: Uint8Array): Uint8Array {
  const r = QueryPortRequest.decode(body);
  if (r.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', QueryPortRequest.offsetOf('port_num'));
  const c = ctx.config;
  return QueryPortResponse.encode({
    port_cap_flags: 0,
    max_msg_size: c.max_msg_size,
    gid_tbl_len: 1,
    pkey_tbl_len: 1,
    state: c.port_state,
    max_mtu: c.max_mtu,
    active_mtu: c.active_mtu,
    link_layer: c.link_layer,
    active_width: c.active_width,
    active_speed: c.active_speed,
    phys_state: c.port_state === PortState.ACTIVE ? 5 : 3,
  });
}

function queryGid(ctx: CommandContext, body: Uint8Array): Uint8Array {
  const r = QueryGidRequest.decode(body);
  if (r.port_num !== Limits.PORT_NUM) fail('INVALID_ARGUMENT', QueryGidRequest.offsetOf('port_num'));
  if (r.index >= ctx.config.gid_tbl_len) fail('INVALID_ARGUMENT', QueryGidRequest.offsetOf('index'));
  return QueryGidResponse.encode({ gid: ctx.config.gid.slice(), gid_type: GidType.ROCE_V2 });
}

export const queryCommands: CommandGroup = {
  [Command.QUERY_DEVICE]: queryDevice,
  [Command.QUERY_PORT]: queryPort,
  [Command.QUERY_GID]: queryGid,
};
