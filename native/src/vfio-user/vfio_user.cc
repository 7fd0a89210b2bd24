// The `vfioUser` part of the addon: libvfio-user (built by scripts/vfio-user/libvfio-user.sh) behind one class.
// A Context is a vfio-user server for one PCI function on a Unix socket, created non-blocking
// (LIBVFIO_USER_FLAG_ATTACH_NB): JS watches pollFd() on Node's loop and calls attach() / run() when it is
// readable, so the caller owns the loop. libvfio-user answers the protocol itself (version, region and irq info,
// config space header and the capabilities it knows, MSI-X, DMA bookkeeping) and calls back for the rest; each
// callback is a synchronous call into the JS object given at construction, made from inside run() (or attach(),
// destroy()), so it runs on the JS thread and a JS exception simply propagates out of run().
//
// Callbacks (all optional except regionAccess): regionAccess(region, offset, bytes, isWrite) -> bytes done or
// -errno; dmaMap(iova, length, fd, fdOffset, prot) (fd is a dup the callee owns, -1 when the region cannot be
// mapped); dmaUnmap(iova, length); reset(type) -> 0 or -errno; quiesce() -> 0 or -errno; irqState(type, start,
// count, masked); log(level, message).
#include "vfio_user.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

// The library's headers are C11: their _Static_assert is C++'s static_assert.
#define _Static_assert static_assert
extern "C" {
#include <vfio-user/libvfio-user.h>
}
#undef _Static_assert

#include <string>

#include "dma_fd.h"
#include "stall_timer.h"

namespace vrdma {
namespace {

// Largest integer a JS number holds exactly: guest addresses beyond it are refused (no guest RAM is there).
constexpr uint64_t kMaxSafeInteger = (uint64_t{1} << 53) - 1;
// libvfio-user's standard config space size for a conventional PCI function.
constexpr uint32_t kConfigSpaceSize = 256;
// Largest register access handed to JS in one call (libvfio-user bounds REGION_READ/WRITE by its max transfer).
constexpr size_t kMaxAccessBytes = 1 << 20;

void ThrowErrno(Napi::Env env, const char* what, int err) {
  const char* name = strerrorname_np(err);
  Napi::Error error = Napi::Error::New(env, std::string(what) + ": " + (name != nullptr ? name : std::to_string(err)));
  error.Set("errno", name != nullptr ? name : ("E" + std::to_string(err)).c_str());
  error.Set("code", Napi::Number::New(env, err));
  error.ThrowAsJavaScriptException();
}

class Context : public Napi::ObjectWrap<Context> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Context",
                       {InstanceMethod("pciInit", &Context::PciInit), InstanceMethod("writeConfig", &Context::WriteConfig),
                        InstanceMethod("readConfig", &Context::ReadConfig), InstanceMethod("addCapability", &Context::AddCapability),
                        InstanceMethod("setupRegion", &Context::SetupRegion), InstanceMethod("setupIrqs", &Context::SetupIrqs),
                        InstanceMethod("realize", &Context::Realize), InstanceMethod("attach", &Context::Attach),
                        InstanceMethod("pollFd", &Context::PollFd), InstanceMethod("run", &Context::Run),
                        InstanceMethod("trigger", &Context::Trigger), InstanceMethod("destroy", &Context::Destroy)});
  }

  Context(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Context>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsObject()) {
      Napi::TypeError::New(env, "new Context(socketPath, callbacks)").ThrowAsJavaScriptException();
      return;
    }
    callbacks_ = Napi::Persistent(info[1].As<Napi::Object>());
    const std::string path = info[0].As<Napi::String>().Utf8Value();
    ctx_ = vfu_create_ctx(VFU_TRANS_SOCK, path.c_str(), LIBVFIO_USER_FLAG_ATTACH_NB, this, VFU_DEV_TYPE_PCI);
    if (ctx_ == nullptr) {
      ThrowErrno(env, "vfu_create_ctx", errno);
      return;
    }
    env_ = env;
    if (!stall_.Create()) {
      ThrowErrno(env, "timer_create", errno);
      return;
    }
    vfu_setup_log(ctx_, OnLog, LOG_INFO);
    if (vfu_setup_device_dma(ctx_, OnDmaRegister, OnDmaUnregister) != 0 || vfu_setup_device_reset_cb(ctx_, OnReset) != 0) {
      ThrowErrno(env, "vfu_setup_device_dma/reset", errno);
      return;
    }
    vfu_setup_device_quiesce_cb(ctx_, OnQuiesce);
  }

  ~Context() override {
    // Garbage collected without destroy(): no JS may run from here.
    js_ok_ = false;
    if (ctx_ != nullptr) vfu_destroy_ctx(ctx_);
  }

 private:
  vfu_ctx_t* ctx_ = nullptr;
  napi_env env_ = nullptr;
  Napi::ObjectReference callbacks_;
  // False once a callback threw (the exception is pending until run() returns) or while tearing down.
  bool js_ok_ = true;
  StallTimer stall_;  // bounds how long a stalled client can block attach() and run()

  static Context* Of(vfu_ctx_t* ctx) { return static_cast<Context*>(vfu_get_private(ctx)); }

  // Calls callbacks[name](args); undefined (and no call) when JS may not run or the callback is absent.
  Napi::Value CallJs(const char* name, std::initializer_list<napi_value> args) {
    if (!js_ok_ || env_ == nullptr) return Napi::Value();
    Napi::Env env(env_);
    Napi::Value fn = callbacks_.Value().Get(name);
    if (!fn.IsFunction()) return env.Undefined();
    Napi::Value result = fn.As<Napi::Function>().Call(callbacks_.Value(), args);
    if (env.IsExceptionPending()) {
      js_ok_ = false;
      return Napi::Value();
    }
    return result;
  }

  // A callback's numeric answer: 0 or -errno. Anything else, or a throw, is EIO.
  int ErrnoAnswer(Napi::Value v) {
    if (v.IsEmpty()) return EIO;
    if (v.IsUndefined()) return 0;
    if (!v.IsNumber()) return EIO;
    const int n = v.As<Napi::Number>().Int32Value();
    return n < 0 ? -n : 0;
  }

  template <int kRegion>
  static ssize_t OnAccess(vfu_ctx_t* ctx, char* buf, size_t count, loff_t offset, bool is_write) {
    Context* self = Of(ctx);
    if (!self->js_ok_ || count > kMaxAccessBytes) {
      errno = self->js_ok_ ? EINVAL : EIO;
      return -1;
    }
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    Napi::Uint8Array bytes = Napi::Uint8Array::New(env, count);
    if (is_write) memcpy(bytes.Data(), buf, count);
    Napi::Value v = self->CallJs("regionAccess", {Napi::Number::New(env, kRegion), Napi::Number::New(env, static_cast<double>(offset)), bytes,
                                                  Napi::Boolean::New(env, is_write)});
    if (v.IsEmpty() || !v.IsNumber()) {
      errno = EIO;
      return -1;
    }
    const int64_t done = v.As<Napi::Number>().Int64Value();
    if (done < 0) {
      errno = static_cast<int>(-done);
      return -1;
    }
    if (static_cast<size_t>(done) != count) {
      errno = EIO;
      return -1;
    }
    if (!is_write) memcpy(buf, bytes.Data(), count);
    return static_cast<ssize_t>(count);
  }

  static vfu_region_access_cb_t* AccessFor(int region) {
    switch (region) {
      case 0: return OnAccess<0>;
      case 1: return OnAccess<1>;
      case 2: return OnAccess<2>;
      case 3: return OnAccess<3>;
      case 4: return OnAccess<4>;
      case 5: return OnAccess<5>;
      default: return nullptr;
    }
  }

  static void OnDmaRegister(vfu_ctx_t* ctx, vfu_dma_info_t* info) {
    Context* self = Of(ctx);
    if (!self->js_ok_) return;
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    const uint64_t iova = reinterpret_cast<uint64_t>(info->iova.iov_base);
    const uint64_t length = info->iova.iov_len;
    int fd = -1;
    uint64_t fd_offset = 0;
    if (info->vaddr != nullptr) fd = DmaMappingFd(info->mapping.iov_base, info->vaddr, &fd_offset);
    if (iova > kMaxSafeInteger || length > kMaxSafeInteger - iova || fd_offset > kMaxSafeInteger) {
      if (fd >= 0) close(fd);
      fd = -EOVERFLOW;
    }
    self->CallJs("dmaMap", {Napi::Number::New(env, static_cast<double>(iova & kMaxSafeInteger)), Napi::Number::New(env, static_cast<double>(length & kMaxSafeInteger)),
                            Napi::Number::New(env, fd), Napi::Number::New(env, static_cast<double>(fd_offset)), Napi::Number::New(env, info->prot)});
  }

  static void OnDmaUnregister(vfu_ctx_t* ctx, vfu_dma_info_t* info) {
    Context* self = Of(ctx);
    if (!self->js_ok_) return;
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    const uint64_t iova = reinterpret_cast<uint64_t>(info->iova.iov_base);
    self->CallJs("dmaUnmap", {Napi::Number::New(env, static_cast<double>(iova & kMaxSafeInteger)),
                              Napi::Number::New(env, static_cast<double>(info->iova.iov_len & kMaxSafeInteger))});
  }

  static int OnReset(vfu_ctx_t* ctx, vfu_reset_type_t type) {
    Context* self = Of(ctx);
    if (!self->js_ok_) return 0;  // tearing down: the JS side resets itself
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    const int err = self->ErrnoAnswer(self->CallJs("reset", {Napi::Number::New(env, static_cast<int>(type))}));
    if (err == 0) return 0;
    errno = err;
    return -1;
  }

  static int OnQuiesce(vfu_ctx_t* ctx) {
    Context* self = Of(ctx);
    if (!self->js_ok_) return 0;
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    const int err = self->ErrnoAnswer(self->CallJs("quiesce", {}));
    if (err == 0) return 0;
    errno = err;
    return -1;
  }

  static void OnIrqState(vfu_ctx_t* ctx, uint32_t start, uint32_t count, bool mask, int type) {
    Context* self = Of(ctx);
    if (!self->js_ok_) return;
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    self->CallJs("irqState", {Napi::Number::New(env, type), Napi::Number::New(env, start), Napi::Number::New(env, count), Napi::Boolean::New(env, mask)});
  }
  static void OnIntxState(vfu_ctx_t* ctx, uint32_t start, uint32_t count, bool mask) { OnIrqState(ctx, start, count, mask, VFU_DEV_INTX_IRQ); }
  static void OnMsixState(vfu_ctx_t* ctx, uint32_t start, uint32_t count, bool mask) { OnIrqState(ctx, start, count, mask, VFU_DEV_MSIX_IRQ); }

  static void OnLog(vfu_ctx_t* ctx, int level, const char* msg) {
    Context* self = Of(ctx);
    if (self == nullptr || !self->js_ok_ || self->env_ == nullptr) return;
    Napi::Env env(self->env_);
    Napi::HandleScope scope(env);
    self->CallJs("log", {Napi::Number::New(env, level), Napi::String::New(env, msg)});
  }

  bool Live(Napi::Env env) {
    if (ctx_ != nullptr) return true;
    Napi::Error::New(env, "vfio-user context destroyed").ThrowAsJavaScriptException();
    return false;
  }

  static uint32_t U32(const Napi::CallbackInfo& info, size_t i) { return info[i].IsNumber() ? info[i].As<Napi::Number>().Uint32Value() : 0; }

  // pciInit(vendor, device, subVendor, subDevice, classBase, classSub, classProg, revision)
  Napi::Value PciInit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    if (vfu_pci_init(ctx_, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, static_cast<int>(U32(info, 7))) != 0) {
      ThrowErrno(env, "vfu_pci_init", errno);
      return Napi::Value();
    }
    vfu_pci_set_id(ctx_, U32(info, 0), U32(info, 1), U32(info, 2), U32(info, 3));
    vfu_pci_set_class(ctx_, U32(info, 4), U32(info, 5), U32(info, 6));
    return env.Undefined();
  }

  // writeConfig(offset, bytes): raw bytes into config space (before realize: interrupt pin, revision).
  Napi::Value WriteConfig(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    const uint32_t offset = U32(info, 0);
    if (!info[1].IsTypedArray() || offset > kConfigSpaceSize || info[1].As<Napi::Uint8Array>().ByteLength() > kConfigSpaceSize - offset) {
      Napi::RangeError::New(env, "writeConfig: bytes outside the 256-byte config space").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    Napi::Uint8Array bytes = info[1].As<Napi::Uint8Array>();
    memcpy(reinterpret_cast<uint8_t*>(vfu_pci_get_config_space(ctx_)) + offset, bytes.Data(), bytes.ByteLength());
    return env.Undefined();
  }

  Napi::Value ReadConfig(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    const uint32_t offset = U32(info, 0), length = U32(info, 1);
    if (offset > kConfigSpaceSize || length > kConfigSpaceSize - offset) {
      Napi::RangeError::New(env, "readConfig: outside the 256-byte config space").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    Napi::Uint8Array out = Napi::Uint8Array::New(env, length);
    memcpy(out.Data(), reinterpret_cast<uint8_t*>(vfu_pci_get_config_space(ctx_)) + offset, length);
    return out;
  }

  // addCapability(pos, flags, bytes) -> its offset in config space
  Napi::Value AddCapability(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    if (!info[2].IsTypedArray() || info[2].As<Napi::Uint8Array>().ByteLength() < 2 || info[2].As<Napi::Uint8Array>().ByteLength() > kConfigSpaceSize) {
      Napi::TypeError::New(env, "addCapability(pos, flags, bytes)").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    Napi::Uint8Array bytes = info[2].As<Napi::Uint8Array>();
    alignas(4) uint8_t data[kConfigSpaceSize];
    memcpy(data, bytes.Data(), bytes.ByteLength());
    ssize_t at = vfu_pci_add_capability(ctx_, U32(info, 0), static_cast<int>(U32(info, 1)), data);
    if (at < 0) {
      ThrowErrno(env, "vfu_pci_add_capability", errno);
      return Napi::Value();
    }
    return Napi::Number::New(env, static_cast<double>(at));
  }

  // setupRegion(index, size, flags, fd, fdOffset, areas: [offset, length][]): a BAR trapped to regionAccess, with
  // the listed areas of `fd` (when fd >= 0) mapped by the client instead (sparse mmap). libvfio-user keeps the fd.
  Napi::Value SetupRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    const int index = static_cast<int>(U32(info, 0));
    if (AccessFor(index) == nullptr || !info[1].IsNumber() || !info[3].IsNumber() || !info[5].IsArray()) {
      Napi::TypeError::New(env, "setupRegion(bar 0..5, size, flags, fd, fdOffset, areas)").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    const size_t size = static_cast<size_t>(info[1].As<Napi::Number>().Int64Value());
    const int fd = info[3].As<Napi::Number>().Int32Value();
    const uint64_t fd_offset = static_cast<uint64_t>(info[4].As<Napi::Number>().Int64Value());
    Napi::Array list = info[5].As<Napi::Array>();
    constexpr uint32_t kMaxAreas = 16;
    struct iovec areas[kMaxAreas];
    const uint32_t count = list.Length();
    if (count > kMaxAreas || (count > 0 && fd < 0)) {
      Napi::RangeError::New(env, "setupRegion: at most 16 mmap areas, and only with an fd").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    for (uint32_t i = 0; i < count; i++) {
      Napi::Array pair = list.Get(i).As<Napi::Array>();
      areas[i].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(pair.Get(0u).As<Napi::Number>().Int64Value()));
      areas[i].iov_len = static_cast<size_t>(pair.Get(1u).As<Napi::Number>().Int64Value());
    }
    if (vfu_setup_region(ctx_, index, size, AccessFor(index), static_cast<int>(U32(info, 2)), count > 0 ? areas : nullptr, count, fd, fd_offset) != 0) {
      ThrowErrno(env, "vfu_setup_region", errno);
      return Napi::Value();
    }
    return env.Undefined();
  }

  // setupIrqs(type, count): INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4; INTx and MSI-X report masks to irqState.
  Napi::Value SetupIrqs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    const uint32_t type = U32(info, 0);
    if (type >= VFU_DEV_NUM_IRQS || vfu_setup_device_nr_irqs(ctx_, static_cast<vfu_dev_irq_type>(type), U32(info, 1)) != 0) {
      ThrowErrno(env, "vfu_setup_device_nr_irqs", type >= VFU_DEV_NUM_IRQS ? EINVAL : errno);
      return Napi::Value();
    }
    if (type == VFU_DEV_INTX_IRQ) vfu_setup_irq_state_callback(ctx_, VFU_DEV_INTX_IRQ, OnIntxState);
    if (type == VFU_DEV_MSIX_IRQ) vfu_setup_irq_state_callback(ctx_, VFU_DEV_MSIX_IRQ, OnMsixState);
    return env.Undefined();
  }

  Napi::Value Realize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    if (vfu_realize_ctx(ctx_) != 0) ThrowErrno(env, "vfu_realize_ctx", errno);
    return env.Undefined();
  }

  // attach() -> true when a client connected, false when none is waiting yet (EAGAIN).
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    js_ok_ = true;
    stall_.Arm(true);
    const int rc = vfu_attach_ctx(ctx_);
    const int err = errno;
    stall_.Arm(false);
    if (rc == 0) return Napi::Boolean::New(env, true);
    if (env.IsExceptionPending()) return Napi::Value();
    // EINTR: the client stalled during the VERSION exchange; libvfio-user closed it. Wait for the next one.
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) return Napi::Boolean::New(env, false);
    ThrowErrno(env, "vfu_attach_ctx", err);
    return Napi::Value();
  }

  Napi::Value PollFd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    return Napi::Number::New(env, vfu_get_poll_fd(ctx_));
  }

  // run() -> messages handled (0 when none was waiting), or -1 when the client went away (ENOTCONN: attach again,
  // on the new pollFd()). Other failures throw with their errno. A callback's exception propagates from here.
  Napi::Value Run(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    js_ok_ = true;
    stall_.Arm(true);
    int n = vfu_run_ctx(ctx_);
    int err = errno;
    stall_.Arm(false);
    if (env.IsExceptionPending()) return Napi::Value();
    if (n >= 0) return Napi::Number::New(env, n);
    if (err == EINTR) {
      // A stalled client: mid-message, or not reading its replies. Its stream can no longer be trusted: shut the
      // socket so that libvfio-user sees the end of it and cleans up as for a lost connection.
      shutdown(vfu_get_poll_fd(ctx_), SHUT_RDWR);
      n = vfu_run_ctx(ctx_);
      err = errno;
      if (env.IsExceptionPending()) return Napi::Value();
      if (n >= 0) return Napi::Number::New(env, n);
    }
    if (err == ENOTCONN || err == ECONNRESET || err == ESHUTDOWN) return Napi::Number::New(env, -1);
    ThrowErrno(env, "vfu_run_ctx", err);
    return Napi::Value();
  }

  // trigger(vector) -> 0, or the errno (ENOENT: the client gave no eventfd for it; EINVAL: beyond the vectors).
  Napi::Value Trigger(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Live(env)) return Napi::Value();
    return Napi::Number::New(env, vfu_irq_trigger(ctx_, U32(info, 0)) == 0 ? 0 : errno);
  }

  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (ctx_ == nullptr) return env.Undefined();
    js_ok_ = false;  // the JS side releases its own state; no callback runs during the teardown
    vfu_destroy_ctx(ctx_);
    ctx_ = nullptr;
    return env.Undefined();
  }
};

}  // namespace

Napi::Object InitVfioUser(Napi::Env env) {
  Napi::Object exports = Napi::Object::New(env);
  exports.Set("Context", Context::Define(env));
  exports.Set("CONFIG_SPACE_SIZE", Napi::Number::New(env, kConfigSpaceSize));
  exports.Set("STALL_TIMEOUT_MS", Napi::Number::New(env, StallTimer::kTimeoutMs));
  return exports;
}

}  // namespace vrdma
