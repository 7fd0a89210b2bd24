// The device verbs: list, open (with its completion channel and event watchers), close, query device, port and
// GID table; and the protection domain, the one object a context parents directly besides CQs.
#include <cerrno>
#include <cstring>

#include "events.h"
#include "jobs.h"
#include "verbs_api.h"
#include "wr.h"

namespace vrdma::verbs {

namespace {

/** GID table entries read by queryGidTable. */
constexpr size_t MAX_GID_ENTRIES = 1024;

}  // namespace

Napi::Value ListDevices(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int n = 0;
  errno = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) return Throw(env, "ibv_get_device_list", ErrnoOr(ENOSYS));
  Napi::Array arr = Napi::Array::New(env, n);
  for (int i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", ibv_get_device_name(list[i]));
    o.Set("guid", Hex64(ibv_get_device_guid(list[i])));
    o.Set("nodeType", static_cast<int>(list[i]->node_type));
    o.Set("transportType", static_cast<int>(list[i]->transport_type));
    arr.Set(static_cast<uint32_t>(i), o);
  }
  ibv_free_device_list(list);
  return arr;
}

namespace {

struct Opened {
  ibv_context* ctx = nullptr;
  ibv_comp_channel* channel = nullptr;
  // The device's vendor id: what names its provider's queue format (rdma_rxe: 0xFFFFFF, RXE_VENDOR_ID).
  uint32_t vendorId = 0;
};

// On the pool: opens device `name` with a completion channel, both event fds non-blocking.
int OpenOnPool(const std::string& name, Opened& out, std::string& detail) {
  int n = 0;
  errno = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) {
    detail = "cannot list RDMA devices: " + std::string(strerror(ErrnoOr(ENOSYS)));
    return ErrnoOr(ENOSYS);
  }
  ibv_device* dev = nullptr;
  std::string names;
  for (int i = 0; i < n; i++) {
    const char* devName = ibv_get_device_name(list[i]);
    if (name == devName) dev = list[i];
    names += (names.empty() ? "" : ", ") + std::string(devName);
  }
  if (dev == nullptr) {
    ibv_free_device_list(list);
    detail = "no RDMA device named " + name + " (devices: " + (names.empty() ? "none" : names) + ")";
    return ENODEV;
  }
  errno = 0;
  out.ctx = ibv_open_device(dev);
  int err = out.ctx == nullptr ? ErrnoOr(ENODEV) : 0;
  ibv_free_device_list(list);
  if (err != 0) return err;
  errno = 0;
  out.channel = ibv_create_comp_channel(out.ctx);
  if (out.channel == nullptr) {
    err = ErrnoOr(ENOMEM);
    detail = "ibv_create_comp_channel failed: " + ErrnoName(err);
    ibv_close_device(out.ctx);
    return err;
  }
  ibv_device_attr attr;
  if (ibv_query_device(out.ctx, &attr) == 0) out.vendorId = attr.vendor_id;
  if ((err = SetNonBlocking(out.channel->fd)) != 0 || (err = SetNonBlocking(out.ctx->async_fd)) != 0) {
    detail = "cannot make the event fds non-blocking";
    ibv_destroy_comp_channel(out.channel);
    ibv_close_device(out.ctx);
    return err;
  }
  return 0;
}

}  // namespace

// openDevice(name, onCqEvent(cqIds, err), onAsyncEvent(event, err)) -> Promise<{context, channelFd, asyncFd}>
Napi::Value OpenDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const char* verb = "ibv_open_device";
  if (!info[0].IsString() || !info[1].IsFunction() || !info[2].IsFunction())
    return Throw(env, verb, EINVAL, "expected (name: string, onCqEvent: function, onAsyncEvent: function)");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  auto onCq = std::make_shared<Napi::FunctionReference>(Napi::Persistent(info[1].As<Napi::Function>()));
  auto onAsync = std::make_shared<Napi::FunctionReference>(Napi::Persistent(info[2].As<Napi::Function>()));
  return RunJob<Opened>(
      env, verb, {}, [name](Opened& out, std::string& detail) { return OpenOnPool(name, out, detail); },
      [st, onCq, onAsync, verb](Napi::Env env, Opened& out) -> Napi::Value {
        Entry* e = Register(st, Kind::Context, out.ctx, {});
        e->channel = out.channel;
        e->onCqEvent = std::move(*onCq);
        e->onAsyncEvent = std::move(*onAsync);
        e->asyncContext = std::make_unique<Napi::AsyncContext>(env, "vrdma.verbs.events");
        int rc = StartWatchers(st, e);
        if (rc != 0) {
          // No watcher is left in the loop: the device is closed here (a rare path; the loop thread may block
          // briefly) and its handle never reaches JS.
          e->onCqEvent.Reset();
          e->onAsyncEvent.Reset();
          Unregister(st, e);
          ibv_destroy_comp_channel(out.channel);
          ibv_close_device(out.ctx);
          return Throw(env, verb, -rc, std::string("cannot watch the device's event fds: ") + uv_strerror(rc));
        }
        Napi::Object o = Napi::Object::New(env);
        o.Set("context", e->id);
        o.Set("channelFd", out.channel->fd);
        o.Set("asyncFd", out.ctx->async_fd);
        o.Set("vendorId", out.vendorId);
        return o;
      });
}

Napi::Value CloseDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const char* verb = "ibv_close_device";
  Entry* e = Lookup(st, env, verb, info[0], Kind::Context, true);
  if (e == nullptr) return env.Undefined();
  e->destroying = true;
  // The watchers go first, on this thread, before their fds are closed by the job.
  ClosePoll(e->channelPoll);
  ClosePoll(e->asyncPoll);
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  ibv_comp_channel* channel = e->channel;
  return RunJob<NoOut>(
      env, verb, {},
      [ctx, channel](NoOut&, std::string& detail) -> int {
        if (channel != nullptr && ibv_destroy_comp_channel(channel) != 0) {
          detail = "ibv_destroy_comp_channel failed";
          return ErrnoOr(EBUSY);
        }
        return ibv_close_device(ctx) != 0 ? ErrnoOr(EIO) : 0;
      },
      nullptr, [st, e](bool) { Unregister(st, e); });  // the fds are gone either way
}

Napi::Value QueryDevice(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_device", Kind::Context, e);
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  struct Attr {
    ibv_device_attr a;
    uint32_t maxInline = 0;
  };
  return RunJob<Attr>(
      env, verb, {e},
      [ctx](Attr& out, std::string&) {
        int rc = ibv_query_device(ctx, &out.a);
        if (rc == 0) out.maxInline = ProbeMaxInline(ctx);  // ibv_device_attr has no inline limit (wr.h)
        return rc;
      },
      [](Napi::Env env, Attr& out) -> Napi::Value {
        const ibv_device_attr& a = out.a;
        Napi::Object o = Napi::Object::New(env);
        o.Set("maxInlineData", out.maxInline);
        o.Set("fwVer", a.fw_ver);
        o.Set("nodeGuid", Hex64(a.node_guid));
        o.Set("sysImageGuid", Hex64(a.sys_image_guid));
        o.Set("maxMrSize", Napi::BigInt::New(env, static_cast<uint64_t>(a.max_mr_size)));
        o.Set("pageSizeCap", Napi::BigInt::New(env, static_cast<uint64_t>(a.page_size_cap)));
        o.Set("vendorId", a.vendor_id);
        o.Set("vendorPartId", a.vendor_part_id);
        o.Set("hwVer", a.hw_ver);
        o.Set("maxQp", a.max_qp);
        o.Set("maxQpWr", a.max_qp_wr);
        o.Set("deviceCapFlags", a.device_cap_flags);
        o.Set("maxSge", a.max_sge);
        o.Set("maxSgeRd", a.max_sge_rd);
        o.Set("maxCq", a.max_cq);
        o.Set("maxCqe", a.max_cqe);
        o.Set("maxMr", a.max_mr);
        o.Set("maxPd", a.max_pd);
        o.Set("maxQpRdAtom", a.max_qp_rd_atom);
        o.Set("maxQpInitRdAtom", a.max_qp_init_rd_atom);
        o.Set("atomicCap", static_cast<int>(a.atomic_cap));
        o.Set("maxAh", a.max_ah);
        o.Set("maxPkeys", a.max_pkeys);
        o.Set("physPortCnt", a.phys_port_cnt);
        return o;
      });
}

Napi::Value QueryPort(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_port", Kind::Context, e);
  uint64_t port = 0;
  if (!ReadUint(env, verb, "port", info[1], 255, &port)) return env.Undefined();
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  return RunJob<ibv_port_attr>(
      env, verb, {e},
      [ctx, port](ibv_port_attr& a, std::string&) { return ibv_query_port(ctx, static_cast<uint8_t>(port), &a); },
      [](Napi::Env env, ibv_port_attr& a) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("state", static_cast<int>(a.state));
        o.Set("maxMtu", static_cast<int>(a.max_mtu));
        o.Set("activeMtu", static_cast<int>(a.active_mtu));
        o.Set("gidTblLen", a.gid_tbl_len);
        o.Set("portCapFlags", a.port_cap_flags);
        o.Set("maxMsgSz", a.max_msg_sz);
        o.Set("pkeyTblLen", a.pkey_tbl_len);
        o.Set("lid", a.lid);
        o.Set("smLid", a.sm_lid);
        o.Set("lmc", a.lmc);
        o.Set("activeWidth", a.active_width);
        o.Set("activeSpeed", a.active_speed);
        o.Set("physState", a.phys_state);
        o.Set("linkLayer", a.link_layer);
        return o;
      });
}

namespace {

struct GidTable {
  std::vector<ibv_gid_entry> entries = std::vector<ibv_gid_entry>(MAX_GID_ENTRIES);
  ssize_t count = 0;
};

}  // namespace

Napi::Value QueryGidTable(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_gid_table", Kind::Context, e);
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  return RunJob<GidTable>(
      env, verb, {e},
      [ctx](GidTable& t, std::string&) -> int {
        t.count = ibv_query_gid_table(ctx, t.entries.data(), t.entries.size(), 0);
        return t.count < 0 ? static_cast<int>(-t.count) : 0;
      },
      [](Napi::Env env, GidTable& t) -> Napi::Value {
        Napi::Array arr = Napi::Array::New(env, static_cast<size_t>(t.count));
        for (ssize_t i = 0; i < t.count; i++) {
          const ibv_gid_entry& g = t.entries[static_cast<size_t>(i)];
          Napi::Object o = Napi::Object::New(env);
          o.Set("gid", GidToJs(env, g.gid));
          o.Set("index", g.gid_index);
          o.Set("port", g.port_num);
          o.Set("type", g.gid_type);
          o.Set("ndevIfindex", g.ndev_ifindex);
          arr.Set(static_cast<uint32_t>(i), o);
        }
        return arr;
      });
}

Napi::Value AllocPd(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_alloc_pd", Kind::Context, ctxE);
  ibv_context* ctx = static_cast<ibv_context*>(ctxE->obj);
  return RunJob<ibv_pd*>(
      env, verb, {ctxE},
      [ctx](ibv_pd*& pd, std::string&) {
        errno = 0;
        pd = ibv_alloc_pd(ctx);
        return CreatedOr(pd, ENOMEM);
      },
      [st, ctxE](Napi::Env env, ibv_pd*& pd) -> Napi::Value {
        return Napi::Number::New(env, Register(st, Kind::Pd, pd, {ctxE->id})->id);
      });
}

Napi::Value DeallocPd(const Napi::CallbackInfo& info) {
  return DestroyJob(info, "ibv_dealloc_pd", Kind::Pd, [](void* o) { return ibv_dealloc_pd(static_cast<ibv_pd*>(o)); });
}

}  // namespace vrdma::verbs
