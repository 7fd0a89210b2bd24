/*
 * bench:rdma's guest side at native speed (bench code only): the loops of ib_write_lat, ib_send_lat, ib_read_lat
 * and ib_write_bw over two mapped RC QPs (spec section 13), as a guest's user-space provider would run them. The
 * JavaScript bench hands over byte views of what the reference front-end maps into this process: each QP's host
 * SQ, RQ and CQ (struct rxe_queue_buf with its slots), its MappedDoorbell slot, and the guest RAM of its buffer.
 * Nothing here calls the device or the backend: a WQE is written into the SQ slot, producer_index is stored with
 * release order, the doorbell slot gets the new index (POLLED mode: the backend's doorbell thread sees it; NOTIFY
 * mode: then 1 is added to the mapdoorbellq's kick eventfd, which is what QEMU's ioeventfd does for the guest's
 * notify write), and completions are read in place. Both VMs run in this one thread, as the two perftest processes
 * take turns.
 *
 * Every wait is bounded by a deadline; a miss returns an error string instead of spinning forever.
 */
#include <node_api.h>
#include <infiniband/verbs.h>
#include <rdma/ib_user_verbs.h>
#include <rdma/rdma_user_rxe.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* One wait (a completion, a peer's byte) may take this long before the loop gives up. */
#define WAIT_NS 10000000000LL
#define MAX_ITERS 10000000u

typedef struct {
  uint8_t *base; /* the queue header */
  size_t len;
  uint32_t mask;
  uint32_t slot;
} queue_t;

typedef struct {
  queue_t sq, rq, cq;
  uint32_t *db;
  /* NOTIFY mode: the kick eventfd of mapdoorbellq (the front-end's); -1 in POLLED mode. */
  int kick;
  uint8_t *buf;
  size_t buf_len;
  uint64_t iova;
  uint32_t lkey;
  uint64_t peer_iova;
  uint32_t rkey;
  uint32_t sq_prod, rq_prod, cq_cons, ssn;
  /* Signaled send WQEs whose completion has not been taken yet. */
  uint32_t owed;
} side_t;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct rxe_queue_buf *hdr(queue_t *q) { return (struct rxe_queue_buf *)q->base; }
static uint8_t *slot_at(queue_t *q, uint32_t i) { return q->base + sizeof(struct rxe_queue_buf) + (size_t)(i & q->mask) * q->slot; }

/* ---- the provider's three operations ------------------------------------------------------------------------- */

/* One send WQE as rdma-core's rxe provider fills it; returns 0, or -1 when the SQ is full. */
static int post_send(side_t *s, uint32_t opcode, uint32_t flags, uint64_t local_off, uint32_t len, uint64_t remote_off) {
  uint32_t cons = __atomic_load_n(&hdr(&s->sq)->consumer_index, __ATOMIC_ACQUIRE) & s->sq.mask;
  if (((s->sq_prod + 1) & s->sq.mask) == cons) return -1;
  struct rxe_send_wqe *w = (struct rxe_send_wqe *)slot_at(&s->sq, s->sq_prod);
  memset(w, 0, sizeof(*w));
  w->wr.wr_id = s->ssn;
  w->wr.opcode = opcode;
  w->wr.send_flags = flags;
  if (opcode == IBV_WR_RDMA_WRITE || opcode == IBV_WR_RDMA_READ) {
    w->wr.wr.rdma.remote_addr = s->peer_iova + remote_off;
    w->wr.wr.rdma.rkey = s->rkey;
    w->iova = s->peer_iova + remote_off;
  }
  if (flags & IBV_SEND_INLINE) {
    memcpy(w->dma.inline_data, s->buf + local_off, len);
    w->dma.num_sge = 0;
  } else {
    w->dma.sge[0].addr = s->iova + local_off;
    w->dma.sge[0].length = len;
    w->dma.sge[0].lkey = s->lkey;
    w->dma.num_sge = 1;
  }
  w->dma.length = len;
  w->dma.resid = len;
  w->ssn = s->ssn++;
  if (flags & IBV_SEND_SIGNALED) s->owed++;
  s->sq_prod = (s->sq_prod + 1) & s->sq.mask;
  __atomic_store_n(&hdr(&s->sq)->producer_index, s->sq_prod, __ATOMIC_RELEASE);
  __atomic_store_n(s->db, s->sq_prod, __ATOMIC_RELEASE); /* the doorbell slot: the SQ's new producer index */
  if (s->kick >= 0) {
    /* The guest's notify write, as QEMU's ioeventfd turns it into an eventfd signal. A failure cannot happen with a
     * valid eventfd (the counter would have to reach 2^64 - 1); the engine's scan would still see the slot later. */
    uint64_t one = 1;
    ssize_t n = write(s->kick, &one, sizeof one);
    (void)n;
  }
  return 0;
}

static int post_recv(side_t *s, uint64_t local_off, uint32_t len) {
  uint32_t cons = __atomic_load_n(&hdr(&s->rq)->consumer_index, __ATOMIC_ACQUIRE) & s->rq.mask;
  if (((s->rq_prod + 1) & s->rq.mask) == cons) return -1;
  struct rxe_recv_wqe *w = (struct rxe_recv_wqe *)slot_at(&s->rq, s->rq_prod);
  memset(w, 0, sizeof(*w));
  w->wr_id = local_off;
  w->dma.sge[0].addr = s->iova + local_off;
  w->dma.sge[0].length = len;
  w->dma.sge[0].lkey = s->lkey;
  w->dma.num_sge = 1;
  w->dma.length = len;
  w->dma.resid = len;
  s->rq_prod = (s->rq_prod + 1) & s->rq.mask;
  __atomic_store_n(&hdr(&s->rq)->producer_index, s->rq_prod, __ATOMIC_RELEASE);
  return 0;
}

/* Takes every completion there is; counts receives and sends; -1 with the first error status. */
static int poll_cq(side_t *s, uint32_t *recvs, uint32_t *sends, uint32_t *bad_status) {
  uint32_t prod = __atomic_load_n(&hdr(&s->cq)->producer_index, __ATOMIC_ACQUIRE) & s->cq.mask;
  int rc = 0;
  while (s->cq_cons != prod) {
    struct ib_uverbs_wc *wc = (struct ib_uverbs_wc *)slot_at(&s->cq, s->cq_cons);
    if (wc->status != 0 && rc == 0) {
      *bad_status = wc->status;
      rc = -1;
    }
    if (wc->opcode & 128) (*recvs)++;
    else {
      (*sends)++;
      if (s->owed > 0) s->owed--;
    }
    s->cq_cons = (s->cq_cons + 1) & s->cq.mask;
  }
  __atomic_store_n(&hdr(&s->cq)->consumer_index, s->cq_cons, __ATOMIC_RELEASE);
  return rc;
}

/* ---- argument plumbing ---------------------------------------------------------------------------------------- */

static const char *view_of(napi_env env, napi_value obj, const char *name, uint8_t **data, size_t *len) {
  napi_value v;
  bool is;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok || napi_is_typedarray(env, v, &is) != napi_ok || !is) return name;
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &type, len, (void **)data, &ab, &off) != napi_ok || type != napi_uint8_array) return name;
  return NULL;
}

static const char *u64_of(napi_env env, napi_value obj, const char *name, uint64_t *out) {
  napi_value v;
  bool lossless;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok || napi_get_value_bigint_uint64(env, v, out, &lossless) != napi_ok) return name;
  return NULL;
}

static const char *u32_of(napi_env env, napi_value obj, const char *name, uint32_t *out) {
  napi_value v;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok || napi_get_value_uint32(env, v, out) != napi_ok) return name;
  return NULL;
}

static const char *queue_of(napi_env env, napi_value obj, const char *name, queue_t *q) {
  const char *e = view_of(env, obj, name, &q->base, &q->len);
  if (e) return e;
  if (q->len < sizeof(struct rxe_queue_buf)) return name;
  q->mask = hdr(q)->index_mask;
  uint32_t log2 = hdr(q)->log2_elem_size;
  if (log2 > 16) return name;
  q->slot = 1u << log2;
  /* The view must hold every slot the header names: the bench never writes outside what it was given. */
  if (sizeof(struct rxe_queue_buf) + ((size_t)q->mask + 1) * q->slot > q->len) return name;
  return NULL;
}

static const char *side_of(napi_env env, napi_value cfg, const char *name, side_t *s) {
  napi_value o;
  if (napi_get_named_property(env, cfg, name, &o) != napi_ok) return name;
  const char *e;
  size_t dblen;
  uint8_t *db;
  memset(s, 0, sizeof(*s));
  if ((e = queue_of(env, o, "sq", &s->sq)) || (e = queue_of(env, o, "rq", &s->rq)) || (e = queue_of(env, o, "cq", &s->cq))) return e;
  if ((e = view_of(env, o, "doorbell", &db, &dblen))) return e;
  if (dblen < 4 || ((uintptr_t)db & 3)) return "doorbell";
  s->db = (uint32_t *)db;
  if ((e = view_of(env, o, "buf", &s->buf, &s->buf_len))) return e;
  uint32_t kick = 0xffffffffu;
  napi_value kv;
  bool has = false;
  if (napi_has_named_property(env, o, "kick", &has) == napi_ok && has) {
    if (napi_get_named_property(env, o, "kick", &kv) != napi_ok || napi_get_value_uint32(env, kv, &kick) != napi_ok || kick > 0x7fffffffu) return "kick";
  }
  s->kick = kick == 0xffffffffu ? -1 : (int)kick;
  if ((e = u64_of(env, o, "iova", &s->iova)) || (e = u32_of(env, o, "lkey", &s->lkey)) || (e = u64_of(env, o, "peerIova", &s->peer_iova)) ||
      (e = u32_of(env, o, "rkey", &s->rkey)))
    return e;
  /* Resume where the JavaScript driver left the indexes. */
  s->sq_prod = __atomic_load_n(&hdr(&s->sq)->producer_index, __ATOMIC_ACQUIRE) & s->sq.mask;
  s->rq_prod = __atomic_load_n(&hdr(&s->rq)->producer_index, __ATOMIC_ACQUIRE) & s->rq.mask;
  s->cq_cons = __atomic_load_n(&hdr(&s->cq)->consumer_index, __ATOMIC_ACQUIRE) & s->cq.mask;
  return NULL;
}

/* ---- the loops -------------------------------------------------------------------------------------------------- */

typedef struct {
  const char *error;
  uint32_t status;
} outcome_t;

#define FAIL(why) \
  do { \
    out.error = (why); \
    return out; \
  } while (0)

/* Waits until `s` has `want` more receives (and takes any send completions on the way). */
static outcome_t wait_recvs(side_t *s, uint32_t want) {
  outcome_t out = {0, 0};
  uint32_t recvs = 0, sends = 0;
  int64_t deadline = now_ns() + WAIT_NS;
  while (recvs < want) {
    if (poll_cq(s, &recvs, &sends, &out.status) < 0) FAIL("a completion with an error status");
    if (now_ns() > deadline) FAIL("no receive completion within the deadline");
  }
  return out;
}

static outcome_t post_or_drain(side_t *s, uint32_t opcode, uint32_t flags, uint64_t local_off, uint32_t len, uint64_t remote_off) {
  outcome_t out = {0, 0};
  uint32_t recvs = 0, sends = 0;
  int64_t deadline = now_ns() + WAIT_NS;
  while (post_send(s, opcode, flags, local_off, len, remote_off) < 0) {
    if (poll_cq(s, &recvs, &sends, &out.status) < 0) FAIL("a completion with an error status");
    if (now_ns() > deadline) FAIL("the SQ stayed full");
  }
  return out;
}

/* Takes completions until every signaled send WQE of `s` has completed: a loop leaves nothing for the next. */
static outcome_t drain(side_t *s) {
  outcome_t out = {0, 0};
  uint32_t recvs = 0, sends = 0;
  int64_t deadline = now_ns() + WAIT_NS;
  while (s->owed > 0) {
    if (poll_cq(s, &recvs, &sends, &out.status) < 0) FAIL("a completion with an error status");
    if (now_ns() > deadline) FAIL("signaled send completions missing");
  }
  return out;
}

/* ib_write_lat: each side WRITEs `size` bytes (inline) into the peer's buffer and spins on the last byte of its own. */
static outcome_t write_lat(side_t *a, side_t *b, uint32_t size, uint32_t iters, double *samples) {
  outcome_t out = {0, 0};
  const uint64_t RX = 0, TX = 4096;
  if (size < 1 || TX + size > a->buf_len || TX + size > b->buf_len) FAIL("size");
  side_t *sides[2] = {a, b};
  /* Marks start at 1: a byte left by an earlier loop must not look like this loop's first message. */
  memset(a->buf + RX, 0, size);
  memset(b->buf + RX, 0, size);
  for (uint32_t i = 0; i < iters; i++) {
    int64_t t0 = now_ns();
    for (int k = 0; k < 2; k++) {
      side_t *from = sides[k], *to = sides[1 - k];
      uint8_t mark = (uint8_t)(i * 2 + k + 1);
      from->buf[TX + size - 1] = mark;
      uint32_t flags = IBV_SEND_SIGNALED | (size <= 64 ? IBV_SEND_INLINE : 0);
      out = post_or_drain(from, IBV_WR_RDMA_WRITE, flags, TX, size, RX);
      if (out.error) return out;
      volatile uint8_t *seen = &to->buf[RX + size - 1];
      int64_t deadline = now_ns() + WAIT_NS;
      while (*seen != mark)
        if (now_ns() > deadline) FAIL("the peer's byte did not change within the deadline");
      uint32_t r = 0, s = 0;
      if (poll_cq(from, &r, &s, &out.status) < 0) FAIL("a completion with an error status");
    }
    samples[i] = (double)(now_ns() - t0) / 2.0;
  }
  if ((out = drain(a)).error || (out = drain(b)).error) return out;
  return out;
}

/* ib_send_lat: SEND `size` bytes, the peer polls its CQ for the RECV, re-posts it and answers. */
static outcome_t send_lat(side_t *a, side_t *b, uint32_t size, uint32_t iters, double *samples) {
  outcome_t out = {0, 0};
  const uint32_t PREPOSTED = 8;
  side_t *sides[2] = {a, b};
  /* Up to PREPOSTED receives outstanding per side (an earlier loop may have left some posted). */
  for (int k = 0; k < 2; k++) {
    side_t *s = sides[k];
    uint32_t cons = __atomic_load_n(&hdr(&s->rq)->consumer_index, __ATOMIC_ACQUIRE) & s->rq.mask;
    while (((s->rq_prod - cons) & s->rq.mask) < PREPOSTED)
      if (post_recv(s, 0, 4096) < 0) FAIL("the RQ is too small for the pre-posted receives");
  }
  for (uint32_t i = 0; i < iters; i++) {
    int64_t t0 = now_ns();
    for (int k = 0; k < 2; k++) {
      side_t *from = sides[k], *to = sides[1 - k];
      out = post_or_drain(from, IBV_WR_SEND, IBV_SEND_SIGNALED | (size <= 64 ? IBV_SEND_INLINE : 0), 4096, size, 0);
      if (out.error) return out;
      out = wait_recvs(to, 1);
      if (out.error) return out;
      if (post_recv(to, 0, 4096) < 0) FAIL("the RQ is full");
    }
    samples[i] = (double)(now_ns() - t0) / 2.0;
  }
  if ((out = drain(a)).error || (out = drain(b)).error) return out;
  return out;
}

/* ib_read_lat: READ `size` bytes of the peer and wait for the completion; a sample is the whole operation. */
static outcome_t read_lat(side_t *a, uint32_t size, uint32_t iters, double *samples) {
  outcome_t out = {0, 0};
  for (uint32_t i = 0; i < iters; i++) {
    int64_t t0 = now_ns();
    out = post_or_drain(a, IBV_WR_RDMA_READ, IBV_SEND_SIGNALED, 8192, size, 0);
    if (out.error) return out;
    if ((out = drain(a)).error) return out; /* the READ is the only signaled WQE owed */
    samples[i] = (double)(now_ns() - t0);
  }
  return out;
}

/* ib_write_bw: `iters` WRITEs of `size` bytes, one signaled every `every`, as many in flight as the SQ holds. */
static outcome_t write_bw(side_t *a, uint32_t size, uint32_t iters, uint32_t every, double *elapsed) {
  outcome_t out = {0, 0};
  if (size > a->buf_len) FAIL("size");
  if ((out = drain(a)).error) return out;
  int64_t t0 = now_ns();
  for (uint32_t i = 0; i < iters; i++) {
    int sig = i + 1 == iters || (i + 1) % every == 0;
    out = post_or_drain(a, IBV_WR_RDMA_WRITE, sig ? IBV_SEND_SIGNALED : 0, 0, size, 0);
    if (out.error) return out;
  }
  if ((out = drain(a)).error) return out;
  *elapsed = (double)(now_ns() - t0);
  return out;
}

/* run(kind, cfg): kind "write_lat" | "send_lat" | "read_lat" | "write_bw"; cfg {a, b, size, iters, every}.
 * Returns a Float64Array: one-way latency samples in ns (read: whole operations), or [elapsed ns] for write_bw. */
static napi_value run(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char kind[32] = {0};
  size_t klen;
  if (argc < 2 || napi_get_value_string_utf8(env, argv[0], kind, sizeof kind, &klen) != napi_ok) {
    napi_throw_type_error(env, NULL, "run(kind, cfg)");
    return NULL;
  }
  side_t a, b;
  uint32_t size, iters, every = 1;
  const char *e;
  if ((e = side_of(env, argv[1], "a", &a)) || (e = side_of(env, argv[1], "b", &b)) || (e = u32_of(env, argv[1], "size", &size)) ||
      (e = u32_of(env, argv[1], "iters", &iters))) {
    char msg[96];
    snprintf(msg, sizeof msg, "mapped_loop: bad or missing %s", e);
    napi_throw_type_error(env, NULL, msg);
    return NULL;
  }
  u32_of(env, argv[1], "every", &every);
  if (iters < 1 || iters > MAX_ITERS || every < 1) {
    napi_throw_range_error(env, NULL, "mapped_loop: iters or every out of range");
    return NULL;
  }
  int bw = strcmp(kind, "write_bw") == 0;
  size_t n = bw ? 1 : iters;
  napi_value ab, result;
  double *samples;
  napi_create_arraybuffer(env, n * sizeof(double), (void **)&samples, &ab);
  outcome_t o;
  if (strcmp(kind, "write_lat") == 0) o = write_lat(&a, &b, size, iters, samples);
  else if (strcmp(kind, "send_lat") == 0) o = send_lat(&a, &b, size, iters, samples);
  else if (strcmp(kind, "read_lat") == 0) o = read_lat(&a, size, iters, samples);
  else if (bw) o = write_bw(&a, size, iters, every, samples);
  else {
    napi_throw_type_error(env, NULL, "mapped_loop: unknown kind");
    return NULL;
  }
  if (o.error) {
    char msg[160];
    snprintf(msg, sizeof msg, "mapped_loop %s: %s (status %u)", kind, o.error, o.status);
    napi_throw_error(env, NULL, msg);
    return NULL;
  }
  napi_create_typedarray(env, napi_float64_array, n, ab, 0, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "run", NAPI_AUTO_LENGTH, run, NULL, &fn);
  napi_set_named_property(env, exports, "run", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
