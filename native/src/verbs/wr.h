// Work requests and completions cross the boundary in fixed little-endian layouts, mirrored by
// vmm-device/verbs/layout.ts and vmm-device/verbs/constants.ts (keep them in step; native-verbs.ts checks the
// addon's `limits` against constants.ts at load, and test/verbs/layout.test.ts checks the encodings against each
// other through the *ForTest functions):
//
//   send WR (SEND_WR_HEADER_BYTES = 64) followed by num_sge SGEs:
//     0 wr_id u64 | 8 opcode u32 | 12 send_flags u32 | 16 num_sge u32 | 20 imm_data u32 (host order; invalidate
//     rkey for SEND_WITH_INV) | 24 remote_addr u64 | 32 rkey u32 | 36 ah handle u32 (UD) | 40 compare_add u64 |
//     48 swap u64 | 56 remote_qpn u32 | 60 remote_qkey u32
//   inline send WR (IBV_SEND_INLINE in send_flags): the header with num_sge = 1, then one SGE whose length is the
//     number of inline bytes (at most MAX_INLINE_PER_WR) and whose addr and lkey are 0, then those bytes (no
//     padding). The caller never names memory for inline data: the parser points the host SGE at the bytes inside
//     the list buffer, which ibv_post_send copies before it returns (IBV_SEND_INLINE: the lkey is not used and
//     the buffer may be reused at once).
//   recv WR (RECV_WR_HEADER_BYTES = 16) followed by num_sge SGEs:
//     0 wr_id u64 | 8 num_sge u32 | 12 reserved u32
//   SGE (SGE_BYTES = 16): 0 addr u64 | 8 length u32 | 12 lkey u32
//   work completion (WC_BYTES = 48):
//     0 wr_id u64 | 8 status u32 | 12 opcode u32 | 16 vendor_err u32 | 20 byte_len u32 | 24 imm_data u32 (host
//     order) | 28 qp_num u32 | 32 src_qp u32 | 36 wc_flags u32 | 40 pkey_index u16 | 42 slid u16 | 44 sl u8 |
//     45 dlid_path_bits u8 | 46 reserved u16
#pragma once
#include <infiniband/verbs.h>

#include <cstdint>

namespace vrdma::verbs {

constexpr uint32_t SEND_WR_HEADER_BYTES = 64;
constexpr uint32_t RECV_WR_HEADER_BYTES = 16;
constexpr uint32_t SGE_BYTES = 16;
constexpr uint32_t WC_BYTES = 48;
/** Work requests in one post_send/post_recv call. */
constexpr uint32_t MAX_WRS_PER_POST = 1024;
/** Scatter/gather entries in one work request (rxe allows 32; real devices fewer: the provider checks). */
constexpr uint32_t MAX_SGE_PER_WR = 32;
/** Completions in one poll_cq call. */
constexpr uint32_t MAX_WC_PER_POLL = 4096;
/** Inline bytes in one send work request (rxe takes up to its RXE_MAX_INLINE_DATA; a guest WQE holds 64). */
constexpr uint32_t MAX_INLINE_PER_WR = 1024;
/** The inline capacity ProbeMaxInline asks for first: the most a virtio-rdma send WQE carries (spec Limits). */
constexpr uint32_t INLINE_PROBE_MAX = 64;
/** The smallest inline capacity ProbeMaxInline asks for before it reports none. */
constexpr uint32_t INLINE_PROBE_MIN = 8;

// Writes one completion at `p` (WC_BYTES) in the layout above.
void WriteWc(uint8_t* p, const ibv_wc& wc);

// The largest inline payload, from INLINE_PROBE_MAX halving down to INLINE_PROBE_MIN, with which both an RC and
// a UD QP of `ctx` can be created; 0 when none can (or the throwaway PD or CQ cannot be made). ibv_query_device
// reports no inline limit: a provider refuses ibv_create_qp when cap.max_inline_data exceeds what it supports
// (rxe: EINVAL above RXE_MAX_INLINE_DATA) and otherwise guarantees at least what was asked, so a created QP is
// the one sound answer. Runs on a worker thread; every object it makes is destroyed before it returns.
uint32_t ProbeMaxInline(ibv_context* ctx);

}  // namespace vrdma::verbs
