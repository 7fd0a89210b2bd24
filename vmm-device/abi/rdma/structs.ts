// Every fixed-layout structure of the virtio-rdma spec, in the order of its tables. Offsets are explicit so that a
// reader can hold this file next to virtio-rdma.md; test/spec/ checks both agree, that every byte of every structure
// is covered exactly once, and that every field is naturally aligned.

import { Command, type CommandName, Limits } from './constants.ts';
import { bytes, gated, layout, Layout, reserved, u16, u32, u64, u8 } from './struct.ts';

// ---- Section 5: device configuration ----

export const DeviceConfig = layout('DeviceConfig', 128, [
  u32('max_pd', 0),
  u32('max_cq', 4),
  u32('max_qp', 8),
  u32('max_mr', 12),
  u32('max_ah', 16),
  u32('max_qp_wr', 20),
  u32('max_cqe', 24),
  u32('max_send_sge', 28),
  u32('max_recv_sge', 32),
  u32('max_inline_data', 36),
  u64('max_mr_size', 40),
  u64('page_size_mask', 48),
  u32('max_mr_pages', 56),
  u32('max_pages_per_command', 60),
  u32('max_qp_rd_atom', 64),
  u32('max_qp_init_rd_atom', 68),
  u32('max_msg_size', 72),
  u16('num_doorbell_queues', 76),
  u16('gid_tbl_len', 78),
  u64('node_guid', 80),
  u8('port_state', 88),
  u8('active_mtu', 89),
  u8('max_mtu', 90),
  u8('link_layer', 91),
  u8('active_width', 92),
  u8('active_speed', 93),
  u8('atomic_cap', 94),
  reserved(95, 1),
  bytes('gid', 96, Limits.GID_SIZE),
  bytes('mac', 112, Limits.MAC_SIZE),
  // Section 13 (HOST_QUEUE_MAPPING): zero unless the device offers the feature.
  gated(u8('host_queue_format', 118)),
  gated(u8('doorbell_mode', 119)),
  gated(u32('max_mapped_queues', 120)),
  reserved(124, 4),
]);

// ---- Section 7: control queue framing ----

export const CtrlRequestHeader = layout('CtrlRequestHeader', 16, [
  u16('command', 0),
  reserved(2, 2),
  u32('length', 4),
  u64('tag', 8),
]);

export const CtrlResponseHeader = layout('CtrlResponseHeader', 16, [
  u16('status', 0),
  reserved(2, 2),
  u32('detail', 4),
  u64('tag', 8),
]);

// ---- Section 8: command bodies ----

/** Body of a request or response that carries nothing (length 0). */
export const Empty = layout('Empty', 0, []);

/** Request of DESTROY_PD, DESTROY_CQ, QUERY_QP, DESTROY_QP, DEREG_MR, DESTROY_AH. */
export const HandleRequest = layout('HandleRequest', 8, [u32('handle', 0), reserved(4, 4)]);

/** Response of CREATE_PD and CREATE_AH. */
export const HandleResponse = layout('HandleResponse', 8, [u32('handle', 0), reserved(4, 4)]);

export const QueryDeviceResponse = layout('QueryDeviceResponse', 96, [
  u64('node_guid', 0),
  u64('max_mr_size', 8),
  u64('page_size_mask', 16),
  u32('vendor_id', 24),
  u32('vendor_part_id', 28),
  u32('hw_ver', 32),
  u32('max_qp', 36),
  u32('max_qp_wr', 40),
  u32('max_send_sge', 44),
  u32('max_recv_sge', 48),
  u32('max_cq', 52),
  u32('max_cqe', 56),
  u32('max_mr', 60),
  u32('max_pd', 64),
  u32('max_ah', 68),
  u32('max_qp_rd_atom', 72),
  u32('max_qp_init_rd_atom', 76),
  u32('max_inline_data', 80),
  u32('max_mr_pages', 84),
  u8('atomic_cap', 88),
  u8('phys_port_cnt', 89),
  reserved(90, 6),
]);

export const QueryPortRequest = layout('QueryPortRequest', 8, [u8('port_num', 0), reserved(1, 7)]);

export const QueryPortResponse = layout('QueryPortResponse', 24, [
  u32('port_cap_flags', 0),
  u32('max_msg_size', 4),
  u32('gid_tbl_len', 8),
  u16('pkey_tbl_len', 12),
  u8('state', 14),
  u8('max_mtu', 15),
  u8('active_mtu', 16),
  u8('link_layer', 17),
  u8('active_width', 18),
  u8('active_speed', 19),
  u8('phys_state', 20),
  reserved(21, 3),
]);

export const QueryGidRequest = layout('QueryGidRequest', 8, [u8('port_num', 0), reserved(1, 3), u32('index', 4)]);

export const QueryGidResponse = layout('QueryGidResponse', 24, [
  bytes('gid', 0, Limits.GID_SIZE),
  u32('gid_type', 16),
  reserved(20, 4),
]);

export const CreateCqRequest = layout('CreateCqRequest', 24, [
  u32('cqe_count', 0),
  u8('page_shift', 4),
  reserved(5, 3),
  u32('num_pages', 8),
  gated(u32('map_flags', 12)),
  u64('index_gpa', 16),
]);

export const CreateCqResponse = layout('CreateCqResponse', 8, [u32('cq_handle', 0), u32('cqe_count', 4)]);

export const ArmCqRequest = layout('ArmCqRequest', 8, [u32('cq_handle', 0), u32('solicited_only', 4)]);

/** The attributes of a QP: the body of MODIFY_QP after handle and mask, and the start of QUERY_QP's response. */
export const QpAttr = layout('QpAttr', 64, [
  u32('qp_state', 0),
  u32('qp_access_flags', 4),
  u32('qkey', 8),
  u32('rq_psn', 12),
  u32('sq_psn', 16),
  u32('dest_qp_num', 20),
  u8('path_mtu', 24),
  u8('timeout', 25),
  u8('retry_cnt', 26),
  u8('rnr_retry', 27),
  u8('min_rnr_timer', 28),
  u8('max_rd_atomic', 29),
  u8('max_dest_rd_atomic', 30),
  u8('port_num', 31),
  u16('pkey_index', 32),
  u8('sgid_index', 34),
  u8('hop_limit', 35),
  u32('flow_label', 36),
  u8('traffic_class', 40),
  u8('sl', 41),
  reserved(42, 6),
  bytes('dgid', 48, Limits.GID_SIZE),
]);

export const CreateQpRequest = layout('CreateQpRequest', 64, [
  u32('pd_handle', 0),
  u32('send_cq_handle', 4),
  u32('recv_cq_handle', 8),
  u8('qp_type', 12),
  u8('sq_sig_all', 13),
  u8('sq_page_shift', 14),
  u8('rq_page_shift', 15),
  u32('max_send_wr', 16),
  u32('max_recv_wr', 20),
  u32('max_send_sge', 24),
  u32('max_recv_sge', 28),
  u32('max_inline_data', 32),
  u32('sq_num_pages', 36),
  u32('rq_num_pages', 40),
  gated(u32('map_flags', 44)),
  u64('sq_index_gpa', 48),
  u64('rq_index_gpa', 56),
]);

export const CreateQpResponse = layout('CreateQpResponse', 32, [
  u32('qp_handle', 0),
  u32('qp_num', 4),
  u32('max_send_wr', 8),
  u32('max_recv_wr', 12),
  u32('max_send_sge', 16),
  u32('max_recv_sge', 20),
  u32('max_inline_data', 24),
  reserved(28, 4),
]);

export const ModifyQpRequest = layout('ModifyQpRequest', 72, [
  u32('qp_handle', 0),
  u32('attr_mask', 4),
  bytes('attr', 8, 64, QpAttr),
]);

export const QueryQpResponse = layout('QueryQpResponse', 96, [
  bytes('attr', 0, 64, QpAttr),
  u32('qp_num', 64),
  u32('max_send_wr', 68),
  u32('max_recv_wr', 72),
  u32('max_send_sge', 76),
  u32('max_recv_sge', 80),
  u32('max_inline_data', 84),
  u8('qp_type', 88),
  u8('sq_sig_all', 89),
  reserved(90, 6),
]);

export const DestroyQpResponse = layout('DestroyQpResponse', 16, [
  u32('sq_flushed', 0),
  u32('rq_flushed', 4),
  u32('flush_dropped', 8),
  reserved(12, 4),
]);

export const RegMrRequest = layout('RegMrRequest', 40, [
  u32('pd_handle', 0),
  u32('access_flags', 4),
  u64('iova', 8),
  u64('length', 16),
  u8('page_shift', 24),
  reserved(25, 3),
  u32('total_pages', 28),
  u32('num_pages', 32),
  reserved(36, 4),
]);

export const RegMrContinueRequest = layout('RegMrContinueRequest', 16, [
  u32('mr_handle', 0),
  u32('start_index', 4),
  u32('num_pages', 8),
  reserved(12, 4),
]);

export const RegMrResponse = layout('RegMrResponse', 16, [
  u32('mr_handle', 0),
  u32('lkey', 4),
  u32('rkey', 8),
  u32('pages_received', 12),
]);

export const CreateAhRequest = layout('CreateAhRequest', 32, [
  u32('pd_handle', 0),
  u32('flow_label', 4),
  u8('port_num', 8),
  u8('sgid_index', 9),
  u8('hop_limit', 10),
  u8('traffic_class', 11),
  u8('sl', 12),
  reserved(13, 3),
  bytes('dgid', 16, Limits.GID_SIZE),
]);

// ---- Section 9: event queue ----

export const Event = layout('Event', 32, [
  u16('type', 0),
  reserved(2, 2),
  u32('count', 4),
  u32('handle', 8),
  u32('detail', 12),
  u64('sequence', 16),
  reserved(24, 8),
]);

// ---- Section 10: data path ----

export const QueueIndex = layout('QueueIndex', 8, [u32('producer_index', 0), u32('consumer_index', 4)]);

export const DoorbellRecord = layout('DoorbellRecord', 8, [u32('handle', 0), u8('type', 4), reserved(5, 3)]);

export const Sge = layout('Sge', 16, [u64('addr', 0), u32('length', 8), u32('lkey', 12)]);

export const SendWqe = layout('SendWqe', 128, [
  u64('wr_id', 0),
  u8('opcode', 8),
  u8('flags', 9),
  u8('num_sge', 10),
  reserved(11, 1),
  u32('imm_data', 12),
  u64('remote_addr', 16),
  u32('rkey', 24),
  u32('inline_length', 28),
  u64('compare_add', 32),
  u64('swap', 40),
  u32('ah_handle', 48),
  u32('remote_qpn', 52),
  u32('remote_qkey', 56),
  reserved(60, 4),
  bytes('payload', 64, 64),
]);

export const RecvWqe = layout('RecvWqe', 64, [
  u64('wr_id', 0),
  u32('num_sge', 8),
  reserved(12, 4),
  bytes('sges', 16, 48),
]);

export const Cqe = layout('Cqe', 32, [
  u64('wr_id', 0),
  u32('qp_handle', 8),
  u32('byte_len', 12),
  u32('imm_data', 16),
  u32('src_qp', 20),
  u8('status', 24),
  u8('opcode', 25),
  u8('wc_flags', 26),
  reserved(27, 1),
  u32('vendor_err', 28),
]);

// ---- Section 13: host queue mapping ----

/** Where one mapped host queue is in a shared memory region, and its slots. */
export const QueueMapping = layout('QueueMapping', 32, [
  u64('offset', 0),
  u64('size', 8),
  u32('num_slots', 16),
  u32('slot_size', 20),
  u8('shmid', 24),
  u8('format', 25),
  reserved(26, 6),
]);

/** CREATE_CQ's response body when HOST_QUEUE_MAPPING is negotiated (mapped CQ or not). */
export const CreateCqMappedResponse = layout('CreateCqMappedResponse', 48, [
  bytes('cq', 0, 8, CreateCqResponse),
  bytes('queue', 8, 32, QueueMapping),
  u8('mapped', 40),
  reserved(41, 7),
]);

/** CREATE_QP's response body when HOST_QUEUE_MAPPING is negotiated (mapped QP or not). */
export const CreateQpMappedResponse = layout('CreateQpMappedResponse', 112, [
  bytes('qp', 0, 32, CreateQpResponse),
  bytes('sq', 32, 32, QueueMapping),
  bytes('rq', 64, 32, QueueMapping),
  u64('doorbell_offset', 96),
  u8('doorbell_shmid', 104),
  u8('mapped', 105),
  reserved(106, 6),
]);

/** A mapped QP's doorbell slot, in a doorbell page of a shared memory region. */
export const MappedDoorbell = layout('MappedDoorbell', 8, [u32('sq_producer_index', 0), reserved(4, 4)]);

/** The header of an rxe queue buffer (Linux include/uapi/rdma/rdma_user_rxe.h, struct rxe_queue_buf). */
export const RxeQueueHeader = layout('RxeQueueHeader', 384, [
  u32('log2_elem_size', 0),
  u32('index_mask', 4),
  reserved(8, 120),
  u32('producer_index', 128),
  reserved(132, 124),
  u32('consumer_index', 256),
  reserved(260, 124),
]);

/** Every structure of the spec, by the name its table carries. */
export const ALL_LAYOUTS: ReadonlyMap<string, Layout<unknown>> = new Map(
  (
    [
      DeviceConfig,
      CtrlRequestHeader,
      CtrlResponseHeader,
      HandleRequest,
      HandleResponse,
      QueryDeviceResponse,
      QueryPortRequest,
      QueryPortResponse,
      QueryGidRequest,
      QueryGidResponse,
      CreateCqRequest,
      CreateCqResponse,
      ArmCqRequest,
      QpAttr,
      CreateQpRequest,
      CreateQpResponse,
      ModifyQpRequest,
      QueryQpResponse,
      DestroyQpResponse,
      RegMrRequest,
      RegMrContinueRequest,
      RegMrResponse,
      CreateAhRequest,
      Event,
      QueueIndex,
      DoorbellRecord,
      Sge,
      SendWqe,
      RecvWqe,
      Cqe,
      QueueMapping,
      CreateCqMappedResponse,
      CreateQpMappedResponse,
      MappedDoorbell,
      RxeQueueHeader,
    ] as Layout<unknown>[]
  ).map((l) => [l.name, l]),
);

/** What a command carries: its request body (fixed part), whether a page list follows it, its response body. */
export interface CommandSpec {
  readonly code: number;
  readonly name: CommandName;
  readonly request: Layout<unknown>;
  /** A page list (u64 entries) follows the fixed request; the fixed part's `num_pages` fields say how long. */
  readonly pageList: boolean;
  readonly response: Layout<unknown>;
}

function command(name: CommandName, request: Layout<unknown>, response: Layout<unknown>, pageList = false): CommandSpec {
  return { code: Command[name], name, request, response, pageList };
}

/** The command table of spec section 8.1, keyed by command number. */
export const COMMANDS: ReadonlyMap<number, CommandSpec> = new Map(
  [
    command('QUERY_DEVICE', Empty, QueryDeviceResponse),
    command('QUERY_PORT', QueryPortRequest, QueryPortResponse),
    command('QUERY_GID', QueryGidRequest, QueryGidResponse),
    command('CREATE_PD', Empty, HandleResponse),
    command('DESTROY_PD', HandleRequest, Empty),
    command('CREATE_CQ', CreateCqRequest, CreateCqResponse, true),
    command('DESTROY_CQ', HandleRequest, Empty),
    command('ARM_CQ', ArmCqRequest, Empty),
    command('CREATE_QP', CreateQpRequest, CreateQpResponse, true),
    command('MODIFY_QP', ModifyQpRequest, Empty),
    command('QUERY_QP', HandleRequest, QueryQpResponse),
    command('DESTROY_QP', HandleRequest, DestroyQpResponse),
    command('REG_MR', RegMrRequest, RegMrResponse, true),
    command('REG_MR_CONTINUE', RegMrContinueRequest, RegMrResponse, true),
    command('DEREG_MR', HandleRequest, Empty),
    command('CREATE_AH', CreateAhRequest, HandleResponse),
    command('DESTROY_AH', HandleRequest, Empty),
  ].map((c) => [c.code, c]),
);

/**
 * The response bodies of CREATE_CQ and CREATE_QP when HOST_QUEUE_MAPPING is negotiated (spec section 13.3): for
 * every CQ and QP, mapped or not, so that the framing check of the response buffer needs no field of the request.
 */
export const MAPPED_RESPONSES: ReadonlyMap<number, Layout<unknown>> = new Map<number, Layout<unknown>>([
  [Command.CREATE_CQ, CreateCqMappedResponse],
  [Command.CREATE_QP, CreateQpMappedResponse],
]);
