/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio-rdma wire formats (guest-driver-spec/virtio-rdma.md, version 1, sections 4 to 10).
 * Every multi-byte field is little-endian (spec 1.3); the BUILD_BUG_ONs in main.c pin each size to its table.
 */
#ifndef VIRTIO_RDMA_SPEC_H
#define VIRTIO_RDMA_SPEC_H

#include <linux/types.h>

#define VIRTIO_ID_RDMA_DEVICE 42

/* Virtqueues (spec 3). */
#define VRDMA_VQ_CTRL 0
#define VRDMA_VQ_EVENT 1
#define VRDMA_VQ_DOORBELL0 2

/* Feature bits (spec 4). */
#define VIRTIO_RDMA_F_RC 0
#define VIRTIO_RDMA_F_UD 1
#define VIRTIO_RDMA_F_ATOMIC 2
#define VIRTIO_RDMA_F_IMMEDIATE 3
#define VIRTIO_RDMA_F_INLINE 4
#define VIRTIO_RDMA_F_MULTI_DOORBELL 5
#define VIRTIO_RDMA_F_HOST_QUEUE_MAPPING 6

/* Device configuration (spec 5), 128 bytes. */
struct vrdma_config {
	__le32 max_pd, max_cq, max_qp, max_mr, max_ah, max_qp_wr, max_cqe;
	__le32 max_send_sge, max_recv_sge, max_inline_data;
	__le64 max_mr_size, page_size_mask;
	__le32 max_mr_pages, max_pages_per_command, max_qp_rd_atom, max_qp_init_rd_atom, max_msg_size;
	__le16 num_doorbell_queues, gid_tbl_len;
	__le64 node_guid;
	u8 port_state, active_mtu, max_mtu, link_layer, active_width, active_speed, atomic_cap, reserved0;
	u8 gid[16];
	u8 mac[6];
	u8 host_queue_format, doorbell_mode;
	__le32 max_mapped_queues;
	u8 reserved1[4];
};

/* Control queue (spec 7). */
struct vrdma_req_hdr {
	__le16 command;
	u8 reserved[2];
	__le32 length;
	__le64 tag;
};

struct vrdma_resp_hdr {
	__le16 status;
	u8 reserved[2];
	__le32 detail;
	__le64 tag;
};

enum vrdma_cmd {
	VRDMA_CMD_QUERY_DEVICE = 0x01,
	VRDMA_CMD_QUERY_PORT = 0x02,
	VRDMA_CMD_QUERY_GID = 0x03,
	VRDMA_CMD_CREATE_PD = 0x10,
	VRDMA_CMD_DESTROY_PD = 0x11,
	VRDMA_CMD_CREATE_CQ = 0x20,
	VRDMA_CMD_DESTROY_CQ = 0x21,
	VRDMA_CMD_ARM_CQ = 0x22,
	VRDMA_CMD_CREATE_QP = 0x30,
	VRDMA_CMD_MODIFY_QP = 0x31,
	VRDMA_CMD_QUERY_QP = 0x32,
	VRDMA_CMD_DESTROY_QP = 0x33,
	VRDMA_CMD_REG_MR = 0x40,
	VRDMA_CMD_REG_MR_CONTINUE = 0x41,
	VRDMA_CMD_DEREG_MR = 0x42,
	VRDMA_CMD_CREATE_AH = 0x50,
	VRDMA_CMD_DESTROY_AH = 0x51,
};

enum vrdma_status {
	VRDMA_S_OK = 0,
	VRDMA_S_INVALID_COMMAND = 1,
	VRDMA_S_INVALID_LENGTH = 2,
	VRDMA_S_INVALID_HANDLE = 3,
	VRDMA_S_INVALID_ARGUMENT = 4,
	VRDMA_S_NO_RESOURCES = 5,
	VRDMA_S_OUT_OF_RANGE = 6,
	VRDMA_S_NOT_SUPPORTED = 7,
	VRDMA_S_REFUSED_BY_POLICY = 8,
	VRDMA_S_DESTINATION_UNREACHABLE = 9,
	VRDMA_S_WRONG_STATE = 10,
	VRDMA_S_BUSY = 11,
	VRDMA_S_DEVICE_ERROR = 12,
};

struct vrdma_handle { __le32 handle; u8 reserved[4]; };

/* 8.3 */
struct vrdma_query_device_resp {
	__le64 node_guid, max_mr_size, page_size_mask;
	__le32 vendor_id, vendor_part_id, hw_ver, max_qp, max_qp_wr, max_send_sge, max_recv_sge;
	__le32 max_cq, max_cqe, max_mr, max_pd, max_ah, max_qp_rd_atom, max_qp_init_rd_atom;
	__le32 max_inline_data, max_mr_pages;
	u8 atomic_cap, phys_port_cnt, reserved[6];
};

/* 8.4 */
struct vrdma_query_port_req { u8 port_num, reserved[7]; };
struct vrdma_query_port_resp {
	__le32 port_cap_flags, max_msg_size, gid_tbl_len;
	__le16 pkey_tbl_len;
	u8 state, max_mtu, active_mtu, link_layer, active_width, active_speed, phys_state, reserved[3];
};

/* 8.5 */
struct vrdma_query_gid_req { u8 port_num, reserved[3]; __le32 index; };
struct vrdma_query_gid_resp { u8 gid[16]; __le32 gid_type; u8 reserved[4]; };

/* 8.7 */
struct vrdma_create_cq_req {
	__le32 cqe_count;
	u8 page_shift, reserved[3];
	__le32 num_pages, map_flags;
	__le64 index_gpa;
};
struct vrdma_create_cq_resp { __le32 cq_handle, cqe_count; };

/* 8.9 */
struct vrdma_arm_cq_req { __le32 cq_handle, solicited_only; };

/* 8.10 */
struct vrdma_create_qp_req {
	__le32 pd_handle, send_cq_handle, recv_cq_handle;
	u8 qp_type, sq_sig_all, sq_page_shift, rq_page_shift;
	__le32 max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data;
	__le32 sq_num_pages, rq_num_pages, map_flags;
	__le64 sq_index_gpa, rq_index_gpa;
};
struct vrdma_create_qp_resp {
	__le32 qp_handle, qp_num, max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data;
	u8 reserved[4];
};
#define VRDMA_QPT_RC 2
#define VRDMA_QPT_UD 4

/* 8.11 */
struct vrdma_qp_attr {
	__le32 qp_state, qp_access_flags, qkey, rq_psn, sq_psn, dest_qp_num;
	u8 path_mtu, timeout, retry_cnt, rnr_retry, min_rnr_timer, max_rd_atomic, max_dest_rd_atomic, port_num;
	__le16 pkey_index;
	u8 sgid_index, hop_limit;
	__le32 flow_label;
	u8 traffic_class, sl, reserved[6];
	u8 dgid[16];
};
struct vrdma_modify_qp_req { __le32 qp_handle, attr_mask; struct vrdma_qp_attr attr; };

/* QpAttrMask: the same bit values as enum ib_qp_attr_mask for every bit version 1 knows. */
#define VRDMA_QP_STATE 0x1
#define VRDMA_QP_ACCESS_FLAGS 0x8
#define VRDMA_QP_PKEY_INDEX 0x10
#define VRDMA_QP_PORT 0x20
#define VRDMA_QP_QKEY 0x40
#define VRDMA_QP_AV 0x80
#define VRDMA_QP_PATH_MTU 0x100
#define VRDMA_QP_TIMEOUT 0x200
#define VRDMA_QP_RETRY_CNT 0x400
#define VRDMA_QP_RNR_RETRY 0x800
#define VRDMA_QP_RQ_PSN 0x1000
#define VRDMA_QP_MAX_QP_RD_ATOMIC 0x2000
#define VRDMA_QP_MIN_RNR_TIMER 0x8000
#define VRDMA_QP_SQ_PSN 0x10000
#define VRDMA_QP_MAX_DEST_RD_ATOMIC 0x20000
#define VRDMA_QP_DEST_QPN 0x100000
#define VRDMA_QP_KNOWN_MASK 0x13bff9

/* 8.12, 8.13 */
struct vrdma_query_qp_resp {
	struct vrdma_qp_attr attr;
	__le32 qp_num, max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data;
	u8 qp_type, sq_sig_all, reserved[6];
};
struct vrdma_destroy_qp_resp { __le32 sq_flushed, rq_flushed, flush_dropped; u8 reserved[4]; };

/* 8.14 */
struct vrdma_reg_mr_req {
	__le32 pd_handle, access_flags;
	__le64 iova, length;
	u8 page_shift, reserved0[3];
	__le32 total_pages, num_pages;
	u8 reserved1[4];
};
struct vrdma_reg_mr_continue_req { __le32 mr_handle, start_index, num_pages; u8 reserved[4]; };
struct vrdma_reg_mr_resp { __le32 mr_handle, lkey, rkey, pages_received; };
#define VRDMA_ACCESS_LOCAL_WRITE 0x1
#define VRDMA_ACCESS_REMOTE_WRITE 0x2
#define VRDMA_ACCESS_REMOTE_READ 0x4
#define VRDMA_ACCESS_REMOTE_ATOMIC 0x8

/* 8.16 */
struct vrdma_create_ah_req {
	__le32 pd_handle, flow_label;
	u8 port_num, sgid_index, hop_limit, traffic_class, sl, reserved[3];
	u8 dgid[16];
};

/* Event queue (spec 9). */
struct vrdma_event {
	__le16 type;
	u8 reserved0[2];
	__le32 count, handle, detail;
	__le64 sequence;
	u8 reserved1[8];
};
enum vrdma_event_type {
	VRDMA_EV_COMPLETION = 1,
	VRDMA_EV_CQ_ERROR = 2,
	VRDMA_EV_QP_FATAL = 3,
	VRDMA_EV_QP_REQ_ERR = 4,
	VRDMA_EV_QP_ACCESS_ERR = 5,
	VRDMA_EV_COMM_EST = 6,
	VRDMA_EV_PORT_ACTIVE = 7,
	VRDMA_EV_PORT_ERR = 8,
	VRDMA_EV_GID_CHANGE = 9,
	VRDMA_EV_DEVICE_FATAL = 10,
	VRDMA_EV_QP_POLICY_TEARDOWN = 11,
	VRDMA_EV_DOORBELL_ERROR = 12,
};

/* Data path (spec 10). */
struct vrdma_queue_index { __le32 producer_index, consumer_index; };

struct vrdma_sge { __le64 addr; __le32 length, lkey; };

struct vrdma_send_wqe {
	__le64 wr_id;
	u8 opcode, flags, num_sge, reserved0;
	__le32 imm_data;
	__le64 remote_addr;
	__le32 rkey, inline_length;
	__le64 compare_add, swap;
	__le32 ah_handle, remote_qpn, remote_qkey;
	u8 reserved1[4];
	union {
		struct vrdma_sge sge[4];
		u8 inline_data[64];
	} payload;
};
#define VRDMA_WR_RDMA_WRITE 0
#define VRDMA_WR_RDMA_WRITE_WITH_IMM 1
#define VRDMA_WR_SEND 2
#define VRDMA_WR_SEND_WITH_IMM 3
#define VRDMA_WR_RDMA_READ 4
#define VRDMA_WR_ATOMIC_CMP_AND_SWP 6
#define VRDMA_WR_ATOMIC_FETCH_AND_ADD 7
#define VRDMA_SEND_SIGNALED 0x1
#define VRDMA_SEND_SOLICITED 0x2
#define VRDMA_SEND_INLINE 0x4
#define VRDMA_SEND_FENCE 0x8

struct vrdma_recv_wqe {
	__le64 wr_id;
	__le32 num_sge;
	u8 reserved[4];
	struct vrdma_sge sge[3];
};

struct vrdma_cqe {
	__le64 wr_id;
	__le32 qp_handle, byte_len, imm_data, src_qp;
	u8 status, opcode, wc_flags, reserved;
	__le32 vendor_err;
};
#define VRDMA_WC_SEND 0
#define VRDMA_WC_RDMA_WRITE 1
#define VRDMA_WC_RDMA_READ 2
#define VRDMA_WC_COMP_SWAP 3
#define VRDMA_WC_FETCH_ADD 4
#define VRDMA_WC_RECV 128
#define VRDMA_WC_RECV_RDMA_WITH_IMM 129
#define VRDMA_WC_F_WITH_IMM 0x1
#define VRDMA_WC_F_GRH 0x2

struct vrdma_doorbell { __le32 handle; u8 type, reserved[3]; };
#define VRDMA_DB_SQ 1
#define VRDMA_DB_RQ 2
#define VRDMA_DB_CQ_ARM_NEXT 3
#define VRDMA_DB_CQ_ARM_SOLICITED 4

/* Limits (spec 10.1). */
#define VRDMA_PAGE_SHIFT 12
#define VRDMA_SQ_WQE_SIZE 128
#define VRDMA_RQ_WQE_SIZE 64
#define VRDMA_CQE_SIZE 32
#define VRDMA_EVENT_SIZE 32
#define VRDMA_GRH_SIZE 40
#define VRDMA_QKEY_CONTROLLED_BIT 0x80000000u
#define VRDMA_HANDLE_MAX 0xffffff

#endif
