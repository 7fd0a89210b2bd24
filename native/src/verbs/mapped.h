// CQs and QPs created for another process to map (spec section 13: host queue mapping), and the doorbell engine
// that rings their send queues.
//
// Why raw uverbs commands: rdma_rxe admits exactly one mmap of each queue's offset of the uverbs file, and the rxe
// provider of libibverbs makes that mmap itself inside ibv_create_cq/ibv_create_qp. A queue meant for the VMM (so
// the guest) is therefore created with the write() commands CREATE_CQ and CREATE_QP on the context's cmd_fd,
// asking for rxe's driver response (struct mminfo {offset, size} per queue) and never mapped here: the VMM makes the
// only mmap. They are destroyed with DESTROY_CQ and DESTROY_QP for the same reason (the provider's destroy would
// munmap a mapping that does not exist and free a struct it never allocated).
//
// The rest of libibverbs still works on them: this addon allocates the public struct ibv_cq / ibv_qp itself
// (context, handle, qp_num, pd, CQs, state, mutex and cond, the handle id as cq_context/qp_context) and passes its
// address as the kernel object's user_handle, so completion-channel and async events return it as the object
// pointer exactly as for the provider's objects. Checked against rdma-core v44 (this machine's libibverbs): what
// touches such a struct is ibv_modify_qp / ibv_query_qp (rxe_modify_qp and rxe_query_qp only call
// ibv_cmd_modify_qp / ibv_cmd_query_qp: handle, context, qp_context, the CQs, srq, qp_type, state),
// ibv_req_notify_cq (ibv_cmd_req_notify_cq: handle, context), ibv_get_cq_event (cq_context, the context's no-op
// cq_event), ibv_ack_cq_events and ibv_ack_async_event (mutex, cond, the event counters). Nothing else of the
// provider is ever called on them: poll and post are EINVAL, destroy is the raw command.
//
// The queue geometry cannot be read from the queue header (mapping it here would use up the only mmap), so it is
// derived from the create response as rdma_rxe's rxe_queue_init lays the queue out: slots = (depth + 1) rounded up
// to a power of two; slot = element size rounded up to a power of two and to at least a cache line (64 bytes);
// element = struct rxe_send_wqe + max(max_send_sge * 16, max_inline_data) for an SQ, struct rxe_recv_wqe +
// max_recv_sge * 16 for an RQ, and struct rxe_cqe (a union holding the kernel's struct ib_wc, between 64 and 128
// bytes) for a CQ. The response's size (the header of 384 bytes and every slot, page aligned) must then agree:
// when it does not, the object is destroyed and the create fails with EPROTO (a kernel whose layout differs).
#pragma once
#include "common.h"

namespace vrdma::verbs {

// mapped.cc
Napi::Value CreateMappedCq(const Napi::CallbackInfo& info);
Napi::Value CreateMappedQp(const Napi::CallbackInfo& info);
// Whether info[0] names a live mapped CQ or QP (no exception either way).
bool IsMappedArg(const Napi::CallbackInfo& info);
// destroyCq / destroyQp of a mapped object (objects.cc dispatches here).
Napi::Value DestroyMappedCq(const Napi::CallbackInfo& info);
Napi::Value DestroyMappedQp(const Napi::CallbackInfo& info);
// Destroys a mapped CQ or QP with the raw command and frees the addon's struct (the environment's cleanup).
void ReleaseMapped(Entry* e);
// The raw DESTROY of a mapped CQ / QP (0 or errno) and the free of its struct (on the JS thread, after events).
int DestroyMappedCqCommand(ibv_cq* cq);
int DestroyMappedQpCommand(ibv_qp* qp);
void FreeMappedCq(ibv_cq* cq);
void FreeMappedQp(ibv_qp* qp);
// One write()-style uverbs command: `req` (its first u64 is the response address when `respBytes` > 0) after the
// header. 0 or errno.
int WriteCommand(int cmdFd, uint32_t command, const void* req, size_t reqBytes, size_t respBytes);

// doorbell.cc
Napi::Value CreateDoorbellEngine(const Napi::CallbackInfo& info);
Napi::Value DoorbellAttach(const Napi::CallbackInfo& info);
Napi::Value DoorbellDetach(const Napi::CallbackInfo& info);
Napi::Value DoorbellRing(const Napi::CallbackInfo& info);
Napi::Value DoorbellSetWakeFd(const Napi::CallbackInfo& info);
Napi::Value DoorbellCounters(const Napi::CallbackInfo& info);
Napi::Value CloseDoorbellEngine(const Napi::CallbackInfo& info);
// Detaches the mapped QP `qp` from its engine, if any (synchronous: the engine's thread is done with it).
void DetachQpFromEngine(State* st, Entry* qp);
// Stops the engine's thread and frees it (its QPs are detached). The entry stays registered.
void StopEngine(State* st, Entry* engine);

}  // namespace vrdma::verbs
