// The `sys` part of the addon: the few system calls JavaScript cannot make. Every function validates its
// arguments, makes one system call (or a short fixed sequence), and reports a failure as a JS exception built by
// the SysError class that vmm-device/native/sys.ts registers (syscall, errno name, errno number). Built without
// C++ exceptions: a failing helper throws into JS and returns an empty value, and every caller returns at once.
//
// All registries are thread_local: a Node worker thread that loads the addon gets its own, and everything here
// runs on the thread of the JS environment that created it (the uv loop thread).
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace vrdma {
namespace {

// The kernel's own limit on fds in one SCM_RIGHTS message (SCM_MAX_FD in include/net/scm.h).
constexpr uint32_t kMaxFdsPerMessage = 253;
// Largest integer a JS number holds exactly: sizes and offsets beyond it cannot come from JS faithfully.
constexpr double kMaxSafeInteger = 9007199254740991.0;

// ---------------------------------------------------------------------------------------------------------------
// Errors

thread_local Napi::FunctionReference* g_sys_error_class = nullptr;

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  if (name != nullptr) return name;
  return "E" + std::to_string(err);
}

// Throws `new SysError(syscall, errnoName, errno, detail)` (or a plain Error with the same fields when sys.ts has
// not registered the class yet).
void ThrowSys(Napi::Env env, const char* syscall, int err, const std::string& detail = "") {
  const std::string name = ErrnoName(err);
  if (g_sys_error_class != nullptr && !g_sys_error_class->IsEmpty()) {
    Napi::Object error = g_sys_error_class->New({Napi::String::New(env, syscall), Napi::String::New(env, name),
                                                 Napi::Number::New(env, err), Napi::String::New(env, detail)});
    if (env.IsExceptionPending()) return;
    napi_throw(env, error);
    return;
  }
  std::string message = std::string(syscall) + ": " + name;
  if (!detail.empty()) message += " (" + detail + ")";
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("syscall", syscall);
  error.Set("errno", name);
  error.Set("code", Napi::Number::New(env, err));
  error.ThrowAsJavaScriptException();
}

void ThrowType(Napi::Env env, const std::string& message) {
  Napi::TypeError::New(env, message).ThrowAsJavaScriptException();
}

void ThrowRange(Napi::Env env, const std::string& message) {
  Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
}

// ---------------------------------------------------------------------------------------------------------------
// Argument readers: each returns false after throwing a TypeError/RangeError naming the argument.

bool ArgFd(const Napi::CallbackInfo& info, size_t index, const char* what, int* out) {
  Napi::Env env = info.Env();
  if (info.Length() <= index || !info[index].IsNumber()) {
    ThrowType(env, std::string(what) + " must be a file descriptor (a number)");
    return false;
  }
  double value = info[index].As<Napi::Number>().DoubleValue();
  if (!(value >= 0) || value > std::numeric_limits<int>::max() || value != static_cast<double>(static_cast<int>(value))) {
    ThrowRange(env, std::string(what) + " must be a non-negative integer file descriptor, got " + std::to_string(value));
    return false;
  }
  *out = static_cast<int>(value);
  return true;
}

bool ArgUint(const Napi::CallbackInfo& info, size_t index, const char* what, double max, uint64_t* out) {
  Napi::Env env = info.Env();
  if (info.Length() <= index || !info[index].IsNumber()) {
    ThrowType(env, std::string(what) + " must be a number");
    return false;
  }
  double value = info[index].As<Napi::Number>().DoubleValue();
  if (!(value >= 0) || value > max || value != static_cast<double>(static_cast<uint64_t>(value))) {
    ThrowRange(env, std::string(what) + " must be an integer in [0, " + std::to_string(static_cast<uint64_t>(max)) +
                        "], got " + std::to_string(value));
    return false;
  }
  *out = static_cast<uint64_t>(value);
  return true;
}

bool ArgString(const Napi::CallbackInfo& info, size_t index, const char* what, std::string* out) {
  if (info.Length() <= index || !info[index].IsString()) {
    ThrowType(info.Env(), std::string(what) + " must be a string");
    return false;
  }
  *out = info[index].As<Napi::String>().Utf8Value();
  return true;
}

bool ArgBool(const Napi::CallbackInfo& info, size_t index, const char* what, bool* out) {
  if (info.Length() <= index || !info[index].IsBoolean()) {
    ThrowType(info.Env(), std::string(what) + " must be a boolean");
    return false;
  }
  *out = info[index].As<Napi::Boolean>().Value();
  return true;
}

// The bytes of a Uint8Array (or any TypedArray/DataView-free view): pointer and length, no copy.
bool ArgBytes(const Napi::CallbackInfo& info, size_t index, const char* what, uint8_t** data, size_t* length) {
  if (info.Length() <= index || !info[index].IsTypedArray()) {
    ThrowType(info.Env(), std::string(what) + " must be a Uint8Array");
    return false;
  }
  Napi::TypedArray array = info[index].As<Napi::TypedArray>();
  if (array.TypedArrayType() != napi_uint8_array) {
    ThrowType(info.Env(), std::string(what) + " must be a Uint8Array");
    return false;
  }
  Napi::Uint8Array bytes = array.As<Napi::Uint8Array>();
  *data = bytes.Data();
  *length = bytes.ByteLength();
  return true;
}

bool ArgFdList(const Napi::CallbackInfo& info, size_t index, const char* what, std::vector<int>* out) {
  Napi::Env env = info.Env();
  if (info.Length() <= index || !info[index].IsArray()) {
    ThrowType(env, std::string(what) + " must be an array of file descriptors");
    return false;
  }
  Napi::Array array = info[index].As<Napi::Array>();
  uint32_t count = array.Length();
  if (count > kMaxFdsPerMessage) {
    ThrowRange(env, std::string(what) + ": " + std::to_string(count) + " fds, at most " +
                        std::to_string(kMaxFdsPerMessage) + " fit in one message");
    return false;
  }
  out->reserve(count);
  for (uint32_t i = 0; i < count; i++) {
    Napi::Value item = array.Get(i);
    if (env.IsExceptionPending()) return false;
    double value = item.IsNumber() ? item.As<Napi::Number>().DoubleValue() : -1;
    if (!(value >= 0) || value > std::numeric_limits<int>::max() ||
        value != static_cast<double>(static_cast<int>(value))) {
      ThrowRange(env, std::string(what) + "[" + std::to_string(i) + "] is not a file descriptor");
      return false;
    }
    out->push_back(static_cast<int>(value));
  }
  return true;
}

bool IsAgain(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

// ---------------------------------------------------------------------------------------------------------------
// Readiness watchers (uv_poll on Node's loop)

struct Watcher {
  uint32_t id;
  int fd;
  napi_env env;
  uv_poll_t handle;
  Napi::FunctionReference callback;
  std::unique_ptr<Napi::AsyncContext> context;
  bool stopped = false;
};

thread_local std::unordered_map<uint32_t, Watcher*> g_watchers;
thread_local uint32_t g_next_watcher_id = 1;
thread_local bool g_cleanup_hook_added = false;

// Values of the `events` bitmask given to watch callbacks (libuv's own values).
constexpr int kEventReadable = UV_READABLE;
constexpr int kEventWritable = UV_WRITABLE;
constexpr int kEventDisconnect = UV_DISCONNECT;

void OnWatcherClosed(uv_handle_t* handle) { delete static_cast<Watcher*>(handle->data); }

// Stops a watcher: no callback runs after this returns; the uv handle is closed and the Watcher freed by libuv's
// close callback (a later loop iteration), never while libuv may still touch it. The async context is destroyed
// there too, not here: stop() may be called from inside the callback, while MakeCallback still uses it.
void StopWatcher(Watcher* watcher) {
  if (watcher->stopped) return;
  watcher->stopped = true;
  g_watchers.erase(watcher->id);
  uv_poll_stop(&watcher->handle);
  watcher->callback.Reset();
  uv_close(reinterpret_cast<uv_handle_t*>(&watcher->handle), OnWatcherClosed);
}

void StopWatchersOfFd(int fd) {
  std::vector<Watcher*> matching;
  for (auto& entry : g_watchers) {
    if (entry.second->fd == fd) matching.push_back(entry.second);
  }
  for (Watcher* watcher : matching) StopWatcher(watcher);
}

void OnPoll(uv_poll_t* handle, int status, int events) {
  Watcher* watcher = static_cast<Watcher*>(handle->data);
  if (watcher->stopped) return;
  Napi::Env env(watcher->env);
  Napi::HandleScope scope(env);
  // MakeCallback (not Call): runs the microtask queue afterwards and gives async_hooks a context, as any libuv
  // callback into JS must.
  Napi::Value error_name = status < 0 ? Napi::Value(Napi::String::New(env, uv_err_name(status))) : env.Undefined();
  watcher->callback.MakeCallback(env.Global(),
                                 {Napi::Number::New(env, status), Napi::Number::New(env, events), error_name},
                                 *watcher->context);
  if (env.IsExceptionPending()) {
    // A throwing callback is an uncaught exception of the process, exactly as in a JS event handler.
    Napi::Error error = env.GetAndClearPendingException();
    napi_fatal_exception(env, error.Value());
  }
}

// The environment is going away (a worker thread ends): no JS runs any more, so the async contexts are destroyed
// now, while the environment they belong to still exists.
void CleanupWatchers(void*) {
  std::vector<Watcher*> all;
  for (auto& entry : g_watchers) all.push_back(entry.second);
  for (Watcher* watcher : all) {
    StopWatcher(watcher);
    watcher->context.reset();
  }
  if (g_sys_error_class != nullptr) {
    g_sys_error_class->Reset();
    delete g_sys_error_class;
    g_sys_error_class = nullptr;
  }
}

Napi::Value WatcherStop(const Napi::CallbackInfo& info) {
  uint32_t id = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(info.Data()));
  auto found = g_watchers.find(id);
  if (found != g_watchers.end()) StopWatcher(found->second);  // stopping twice is a no-op
  return info.Env().Undefined();
}

// watch(fd, readable, writable, callback(status, events, errorName)) -> { stop(), fd }
Napi::Value Watch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  bool readable, writable;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgBool(info, 1, "readable", &readable) ||
      !ArgBool(info, 2, "writable", &writable))
    return Napi::Value();
  if (info.Length() < 4 || !info[3].IsFunction()) {
    ThrowType(env, "callback must be a function");
    return Napi::Value();
  }
  if (!readable && !writable) {
    ThrowRange(env, "watch: ask for readable, writable or both");
    return Napi::Value();
  }
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    Napi::Error::New(env, "watch: no uv loop").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  if (!g_cleanup_hook_added) {
    napi_add_env_cleanup_hook(env, CleanupWatchers, nullptr);
    g_cleanup_hook_added = true;
  }
  auto watcher = std::make_unique<Watcher>();
  watcher->fd = fd;
  watcher->env = env;
  int rc = uv_poll_init(loop, &watcher->handle, fd);
  if (rc != 0) {
    // Nothing to close: a failed uv_poll_init leaves no handle in the loop. EEXIST means another watcher is
    // active on this fd.
    ThrowSys(env, "uv_poll_init", -rc, "fd " + std::to_string(fd));
    return Napi::Value();
  }
  watcher->handle.data = watcher.get();
  int events = (readable ? kEventReadable | kEventDisconnect : 0) | (writable ? kEventWritable : 0);
  rc = uv_poll_start(&watcher->handle, events, OnPoll);
  if (rc != 0) {
    Watcher* raw = watcher.release();
    raw->stopped = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&raw->handle), OnWatcherClosed);
    ThrowSys(env, "uv_poll_start", -rc, "fd " + std::to_string(fd));
    return Napi::Value();
  }
  watcher->callback = Napi::Persistent(info[3].As<Napi::Function>());
  watcher->context = std::make_unique<Napi::AsyncContext>(env, "vrdma.sys.watch");
  watcher->id = g_next_watcher_id++;
  if (g_next_watcher_id == 0) g_next_watcher_id = 1;
  Watcher* raw = watcher.release();
  g_watchers[raw->id] = raw;

  Napi::Object handle = Napi::Object::New(env);
  handle.Set("stop", Napi::Function::New(env, WatcherStop, "stop", reinterpret_cast<void*>(uintptr_t{raw->id})));
  handle.Set("fd", Napi::Number::New(env, fd));
  return handle;
}

// ---------------------------------------------------------------------------------------------------------------
// Unix stream sockets

bool FillSockaddr(Napi::Env env, const std::string& path, const char* syscall, sockaddr_un* address) {
  memset(address, 0, sizeof(*address));
  address->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address->sun_path) || path.find('\0') != std::string::npos) {
    ThrowSys(env, syscall, ENAMETOOLONG,
             "socket path must be 1.." + std::to_string(sizeof(address->sun_path) - 1) + " bytes: " + path);
    return false;
  }
  memcpy(address->sun_path, path.data(), path.size());
  return true;
}

bool SetNonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL);
  return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

// A socket file at `path` that nobody listens on any more (a crashed server's leftover) is removed; a live one
// (a connect succeeds) is left alone and reported as EADDRINUSE.
bool RemoveStaleSocket(Napi::Env env, const std::string& path, const sockaddr_un& address) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return true;  // nothing there: bind decides
  if (!S_ISSOCK(st.st_mode)) return true;          // not a socket: never removed, bind reports EADDRINUSE
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe < 0) {
    ThrowSys(env, "socket", errno);
    return false;
  }
  int rc = connect(probe, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  int err = errno;
  close(probe);
  if (rc == 0) {
    ThrowSys(env, "bind", EADDRINUSE, "a server is listening on " + path);
    return false;
  }
  if (err == ECONNREFUSED || err == ENOENT) {
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      ThrowSys(env, "unlink", errno, path);
      return false;
    }
  }
  return true;
}

// listenUnix(path, backlog) -> fd (non-blocking, close-on-exec)
Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  uint64_t backlog;
  if (!ArgString(info, 0, "path", &path) || !ArgUint(info, 1, "backlog", 4096, &backlog)) return Napi::Value();
  sockaddr_un address;
  if (!FillSockaddr(env, path, "bind", &address)) return Napi::Value();
  if (!RemoveStaleSocket(env, path, address)) return Napi::Value();
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowSys(env, "socket", errno);
    return Napi::Value();
  }
  if (bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    int err = errno;
    close(fd);
    ThrowSys(env, "bind", err, path);
    return Napi::Value();
  }
  if (listen(fd, static_cast<int>(backlog)) != 0) {
    int err = errno;
    close(fd);
    unlink(path.c_str());
    ThrowSys(env, "listen", err, path);
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// acceptUnix(fd) -> fd | null when no connection is pending
Napi::Value AcceptUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  int client;
  do {
    client = accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  } while (client < 0 && errno == EINTR);
  if (client < 0) {
    if (IsAgain(errno)) return env.Null();
    ThrowSys(env, "accept4", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, client);
}

// connectUnix(path) -> fd (connected, then made non-blocking: a Unix connect completes at once or fails)
Napi::Value ConnectUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  if (!ArgString(info, 0, "path", &path)) return Napi::Value();
  sockaddr_un address;
  if (!FillSockaddr(env, path, "connect", &address)) return Napi::Value();
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowSys(env, "socket", errno);
    return Napi::Value();
  }
  int rc;
  do {
    rc = connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    int err = errno;
    close(fd);
    ThrowSys(env, "connect", err, path);
    return Napi::Value();
  }
  if (!SetNonblocking(fd)) {
    int err = errno;
    close(fd);
    ThrowSys(env, "fcntl", err);
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// socketPair() -> [fd, fd] (connected Unix stream sockets, non-blocking, close-on-exec)
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) {
    ThrowSys(env, "socketpair", errno);
    return Napi::Value();
  }
  Napi::Array pair = Napi::Array::New(env, 2);
  pair.Set(uint32_t{0}, Napi::Number::New(env, fds[0]));
  pair.Set(uint32_t{1}, Napi::Number::New(env, fds[1]));
  return pair;
}

Napi::Value Shutdown(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  if (shutdown(fd, SHUT_RDWR) != 0 && errno != ENOTCONN) {
    ThrowSys(env, "shutdown", errno);
    return Napi::Value();
  }
  return env.Undefined();
}

// close(fd): stops any watcher on the fd first, so a later fd with the same number is never watched by mistake.
Napi::Value Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  StopWatchersOfFd(fd);
  // Linux releases the fd even when close reports EINTR: never retry.
  if (close(fd) != 0 && errno != EINTR) {
    ThrowSys(env, "close", errno);
    return Napi::Value();
  }
  return env.Undefined();
}

// sendMsg(fd, data, fds) -> bytes sent | null when the socket buffer is full (nothing was sent, no fd passed).
// A short count means only part of data went; the fds travel with the first byte.
Napi::Value SendMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint8_t* data;
  size_t length;
  std::vector<int> fds;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgBytes(info, 1, "data", &data, &length) || !ArgFdList(info, 2, "fds", &fds))
    return Napi::Value();
  if (length == 0) {
    ThrowRange(env, "sendMsg: data must hold at least one byte (fds travel with data)");
    return Napi::Value();
  }
  iovec iov{data, length};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    message.msg_control = control.data();
    message.msg_controllen = control.size();
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t sent;
  do {
    sent = sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) {
    if (IsAgain(errno)) return env.Null();
    ThrowSys(env, "sendmsg", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, static_cast<double>(sent));
}

// recvMsg(fd, buf, maxFds) -> { bytes, fds } | null when nothing is ready. bytes 0: the peer closed.
// More fds than maxFds (MSG_CTRUNC) is an error; the fds that did arrive are closed first.
Napi::Value RecvMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint8_t* data;
  size_t length;
  uint64_t max_fds;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgBytes(info, 1, "buf", &data, &length) ||
      !ArgUint(info, 2, "maxFds", kMaxFdsPerMessage, &max_fds))
    return Napi::Value();
  if (length == 0) {
    ThrowRange(env, "recvMsg: buf must have room for at least one byte");
    return Napi::Value();
  }
  iovec iov{data, length};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  // Room for max_fds fds; with max_fds 0 there is still a small control buffer so that fds sent anyway are
  // detected (MSG_CTRUNC) rather than silently dropped by the kernel.
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (max_fds > 0 ? max_fds : 1)), 0);
  message.msg_control = control.data();
  message.msg_controllen = max_fds > 0 ? control.size() : 0;
  ssize_t received;
  do {
    received = recvmsg(fd, &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (received < 0 && errno == EINTR);
  if (received < 0) {
    if (IsAgain(errno)) return env.Null();
    ThrowSys(env, "recvmsg", errno);
    return Napi::Value();
  }
  std::vector<int> fds;
  bool foreign_control = false;
  for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr; header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_RIGHTS) {
      size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* cursor = CMSG_DATA(header);
      for (size_t i = 0; i < count; i++) {
        int passed;
        memcpy(&passed, cursor + i * sizeof(int), sizeof(int));
        fds.push_back(passed);
      }
    } else {
      foreign_control = true;
    }
  }
  if ((message.msg_flags & MSG_CTRUNC) != 0 || fds.size() > max_fds || foreign_control) {
    for (int passed : fds) close(passed);
    ThrowSys(env, "recvmsg", EMSGSIZE,
             foreign_control ? "unexpected control message"
                             : "control data truncated (MSG_CTRUNC): the peer sent more than maxFds=" +
                                   std::to_string(max_fds) + " fds; the " + std::to_string(fds.size()) +
                                   " that arrived were closed");
    return Napi::Value();
  }
  Napi::Object result = Napi::Object::New(env);
  Napi::Array fd_array = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) fd_array.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  result.Set("bytes", Napi::Number::New(env, static_cast<double>(received)));
  result.Set("fds", fd_array);
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// memfd, fstat, dup

Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name;
  uint64_t size;
  if (!ArgString(info, 0, "name", &name) || !ArgUint(info, 1, "size", kMaxSafeInteger, &size)) return Napi::Value();
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    ThrowSys(env, "memfd_create", errno, name);
    return Napi::Value();
  }
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int err = errno;
    close(fd);
    ThrowSys(env, "ftruncate", err, std::to_string(size) + " bytes");
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

Napi::Value FdSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ThrowSys(env, "fstat", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, static_cast<double>(st.st_size));
}

Napi::Value Dup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    ThrowSys(env, "dup", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, copy);
}

// ---------------------------------------------------------------------------------------------------------------
// mmap as an external ArrayBuffer

// One MAP_SHARED mapping behind one ArrayBuffer. munmap() (explicit) and the finalizer (garbage collection) may
// come in either order, and detaching may run the finalizer synchronously: the flags make whichever comes last
// free the record, and the pages are unmapped exactly once.
struct Mapping {
  void* address;
  size_t length;
  bool unmapped = false;
  bool finalized = false;
  bool in_explicit_unmap = false;
};

thread_local std::unordered_map<void*, Mapping*> g_mappings;

void FinalizeMapping(Napi::Env, void*, Mapping* mapping) {
  mapping->finalized = true;
  if (mapping->in_explicit_unmap) return;  // munmap() is running and frees the record
  if (!mapping->unmapped) {
    auto found = g_mappings.find(mapping->address);
    if (found != g_mappings.end() && found->second == mapping) g_mappings.erase(found);
    ::munmap(mapping->address, mapping->length);
    mapping->unmapped = true;
  }
  delete mapping;
}

// mmap(fd, offset, length, writable) -> ArrayBuffer over the shared mapping (no copy)
Napi::Value Mmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint64_t offset, length;
  bool writable;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgUint(info, 1, "offset", kMaxSafeInteger, &offset) ||
      !ArgUint(info, 2, "length", kMaxSafeInteger, &length) || !ArgBool(info, 3, "writable", &writable))
    return Napi::Value();
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (offset % page != 0) {
    ThrowSys(env, "mmap", EINVAL,
             "offset " + std::to_string(offset) + " is not a multiple of the page size " + std::to_string(page));
    return Napi::Value();
  }
  if (length == 0) {
    ThrowSys(env, "mmap", EINVAL, "length must be at least 1 byte");
    return Napi::Value();
  }
  void* address = ::mmap(nullptr, static_cast<size_t>(length), PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED,
                         fd, static_cast<off_t>(offset));
  if (address == MAP_FAILED) {
    ThrowSys(env, "mmap", errno,
             "fd " + std::to_string(fd) + " offset " + std::to_string(offset) + " length " + std::to_string(length));
    return Napi::Value();
  }
  Mapping* mapping = new Mapping{address, static_cast<size_t>(length)};
  Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(env, address, mapping->length, FinalizeMapping, mapping);
  if (env.IsExceptionPending()) {
    ::munmap(address, mapping->length);
    delete mapping;
    return Napi::Value();
  }
  g_mappings[address] = mapping;
  return buffer;
}

// Most pieces one mapAlias() call takes (a bound on the work and on the VMAs one call can create).
constexpr uint32_t kMaxAliasPieces = 1u << 20;

// mapAlias([[buffer, offset, length], ...]) -> one ArrayBuffer whose bytes are the given pieces of existing
// MAP_SHARED mappings (made by mmap() above), back to back, with no copy: the same pages seen at a second,
// contiguous range of addresses. It reserves the whole range PROT_NONE, then moves a second view of each piece
// onto its place with mremap(old_size 0, MREMAP_FIXED), which for a shared mapping creates a new mapping of the
// same pages. Offsets and lengths are page multiples. Released like any mapping: munmap() or garbage collection.
Napi::Value MapAlias(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowType(env, "mapAlias: argument must be an array of [ArrayBuffer, offset, length]");
    return Napi::Value();
  }
  Napi::Array list = info[0].As<Napi::Array>();
  const uint32_t count = list.Length();
  if (count == 0 || count > kMaxAliasPieces) {
    ThrowSys(env, "mapAlias", EINVAL, "between 1 and " + std::to_string(kMaxAliasPieces) + " pieces, got " + std::to_string(count));
    return Napi::Value();
  }
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  struct Piece {
    char* source;
    size_t length;
  };
  std::vector<Piece> pieces;
  pieces.reserve(count);
  uint64_t total = 0;
  for (uint32_t i = 0; i < count; i++) {
    Napi::Value item = list.Get(i);
    const std::string at = "piece " + std::to_string(i);
    if (!item.IsArray() || item.As<Napi::Array>().Length() != 3) {
      ThrowType(env, "mapAlias: " + at + " must be [ArrayBuffer, offset, length]");
      return Napi::Value();
    }
    Napi::Array triple = item.As<Napi::Array>();
    Napi::Value b = triple.Get(0u), o = triple.Get(1u), l = triple.Get(2u);
    if (!b.IsArrayBuffer() || !o.IsNumber() || !l.IsNumber()) {
      ThrowType(env, "mapAlias: " + at + " must be [ArrayBuffer, offset, length]");
      return Napi::Value();
    }
    Napi::ArrayBuffer buffer = b.As<Napi::ArrayBuffer>();
    auto found = g_mappings.find(buffer.Data());
    if (buffer.IsDetached() || found == g_mappings.end() || found->second->length != buffer.ByteLength()) {
      ThrowType(env, "mapAlias: " + at + ": the ArrayBuffer was not returned by mmap() (only shared mappings alias)");
      return Napi::Value();
    }
    const double od = o.As<Napi::Number>().DoubleValue(), ld = l.As<Napi::Number>().DoubleValue();
    if (!(od >= 0 && od <= kMaxSafeInteger && od == static_cast<double>(static_cast<uint64_t>(od))) ||
        !(ld >= 1 && ld <= kMaxSafeInteger && ld == static_cast<double>(static_cast<uint64_t>(ld)))) {
      ThrowSys(env, "mapAlias", EINVAL, at + ": offset and length must be integers, length at least 1");
      return Napi::Value();
    }
    const uint64_t offset = static_cast<uint64_t>(od), length = static_cast<uint64_t>(ld);
    if (offset % page != 0 || length % page != 0) {
      ThrowSys(env, "mapAlias", EINVAL, at + ": offset " + std::to_string(offset) + " and length " + std::to_string(length) +
                                            " must be multiples of the page size " + std::to_string(page));
      return Napi::Value();
    }
    if (offset > buffer.ByteLength() || length > buffer.ByteLength() - offset) {
      ThrowSys(env, "mapAlias", EINVAL, at + ": [" + std::to_string(offset) + ", +" + std::to_string(length) +
                                            ") is outside the mapping of " + std::to_string(buffer.ByteLength()) + " bytes");
      return Napi::Value();
    }
    if (length > static_cast<uint64_t>(kMaxSafeInteger) - total) {
      ThrowSys(env, "mapAlias", EINVAL, "the pieces add up to more than 2^53 bytes");
      return Napi::Value();
    }
    total += length;
    pieces.push_back(Piece{static_cast<char*>(buffer.Data()) + offset, static_cast<size_t>(length)});
  }
  void* base = ::mmap(nullptr, static_cast<size_t>(total), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) {
    ThrowSys(env, "mapAlias", errno, "reserving " + std::to_string(total) + " bytes");
    return Napi::Value();
  }
  char* place = static_cast<char*>(base);
  for (size_t i = 0; i < pieces.size(); i++) {
    void* got = ::mremap(pieces[i].source, 0, pieces[i].length, MREMAP_MAYMOVE | MREMAP_FIXED, place);
    if (got == MAP_FAILED) {
      int err = errno;
      ::munmap(base, static_cast<size_t>(total));  // the views already placed go with the reservation
      ThrowSys(env, "mapAlias", err, "piece " + std::to_string(i) + " (mremap)");
      return Napi::Value();
    }
    place += pieces[i].length;
  }
  Mapping* mapping = new Mapping{base, static_cast<size_t>(total)};
  Napi::ArrayBuffer out = Napi::ArrayBuffer::New(env, base, mapping->length, FinalizeMapping, mapping);
  if (env.IsExceptionPending()) {
    ::munmap(base, mapping->length);
    delete mapping;
    return Napi::Value();
  }
  g_mappings[base] = mapping;
  return out;
}

// munmap(arrayBuffer): detaches the buffer (every view of it becomes length 0) THEN unmaps. A second call on the
// same buffer is a no-op.
Napi::Value Munmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArrayBuffer()) {
    ThrowType(env, "munmap: argument must be an ArrayBuffer returned by mmap()");
    return Napi::Value();
  }
  Napi::ArrayBuffer buffer = info[0].As<Napi::ArrayBuffer>();
  if (buffer.IsDetached()) return env.Undefined();  // already unmapped
  auto found = g_mappings.find(buffer.Data());
  if (found == g_mappings.end() || found->second->length != buffer.ByteLength()) {
    ThrowType(env, "munmap: this ArrayBuffer was not returned by mmap()");
    return Napi::Value();
  }
  Mapping* mapping = found->second;
  g_mappings.erase(found);
  mapping->in_explicit_unmap = true;
  buffer.Detach();
  int rc = ::munmap(mapping->address, mapping->length);
  int err = errno;
  mapping->unmapped = true;
  mapping->in_explicit_unmap = false;
  if (mapping->finalized) delete mapping;
  if (rc != 0) {
    ThrowSys(env, "munmap", err);
    return Napi::Value();
  }
  return env.Undefined();
}

// ---------------------------------------------------------------------------------------------------------------
// eventfd

Napi::Value EventfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t initial;
  bool nonblock, semaphore;
  if (!ArgUint(info, 0, "initial", 4294967295.0, &initial) || !ArgBool(info, 1, "nonblock", &nonblock) ||
      !ArgBool(info, 2, "semaphore", &semaphore))
    return Napi::Value();
  int flags = EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0) | (semaphore ? EFD_SEMAPHORE : 0);
  int fd = eventfd(static_cast<unsigned int>(initial), flags);
  if (fd < 0) {
    ThrowSys(env, "eventfd", errno);
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// eventfdRead(fd) -> bigint counter | null when it is zero (non-blocking eventfd)
Napi::Value EventfdRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  uint64_t value = 0;
  ssize_t got;
  do {
    got = read(fd, &value, sizeof(value));
  } while (got < 0 && errno == EINTR);
  if (got < 0) {
    if (IsAgain(errno)) return env.Null();
    ThrowSys(env, "read", errno, "eventfd " + std::to_string(fd));
    return Napi::Value();
  }
  if (got != sizeof(value)) {
    ThrowSys(env, "read", EINVAL, "fd " + std::to_string(fd) + " is not an eventfd (short read)");
    return Napi::Value();
  }
  return Napi::BigInt::New(env, value);
}

// eventfdWrite(fd, bigint) -> true, or false when the counter would overflow (non-blocking eventfd)
Napi::Value EventfdWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  if (info.Length() < 2 || !info[1].IsBigInt()) {
    ThrowType(env, "eventfdWrite: value must be a bigint");
    return Napi::Value();
  }
  bool lossless = false;
  uint64_t value = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) {
    ThrowRange(env, "eventfdWrite: value must fit in 64 unsigned bits");
    return Napi::Value();
  }
  ssize_t put;
  do {
    put = write(fd, &value, sizeof(value));
  } while (put < 0 && errno == EINTR);
  if (put < 0) {
    if (IsAgain(errno)) return Napi::Boolean::New(env, false);
    ThrowSys(env, "write", errno, "eventfd " + std::to_string(fd));
    return Napi::Value();
  }
  if (put != sizeof(value)) {
    ThrowSys(env, "write", EINVAL, "fd " + std::to_string(fd) + " is not an eventfd (short write)");
    return Napi::Value();
  }
  return Napi::Boolean::New(env, true);
}

// ---------------------------------------------------------------------------------------------------------------

Napi::Value PageSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(sysconf(_SC_PAGESIZE)));
}

// setErrorClass(SysError): the constructor used for every system-call failure from now on.
Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsFunction()) {
    ThrowType(env, "setErrorClass: argument must be a class");
    return Napi::Value();
  }
  if (g_sys_error_class == nullptr) g_sys_error_class = new Napi::FunctionReference();
  *g_sys_error_class = Napi::Persistent(info[0].As<Napi::Function>());
  if (!g_cleanup_hook_added) {
    napi_add_env_cleanup_hook(env, CleanupWatchers, nullptr);
    g_cleanup_hook_added = true;
  }
  return env.Undefined();
}

// Diagnostics for tests: how many watchers and mappings this thread holds.
Napi::Value Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object stats = Napi::Object::New(env);
  stats.Set("watchers", Napi::Number::New(env, static_cast<double>(g_watchers.size())));
  stats.Set("mappings", Napi::Number::New(env, static_cast<double>(g_mappings.size())));
  return stats;
}

}  // namespace

Napi::Object InitSys(Napi::Env env) {
  Napi::Object sys = Napi::Object::New(env);
  sys.Set("listenUnix", Napi::Function::New(env, ListenUnix, "listenUnix"));
  sys.Set("acceptUnix", Napi::Function::New(env, AcceptUnix, "acceptUnix"));
  sys.Set("connectUnix", Napi::Function::New(env, ConnectUnix, "connectUnix"));
  sys.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  sys.Set("shutdown", Napi::Function::New(env, Shutdown, "shutdown"));
  sys.Set("close", Napi::Function::New(env, Close, "close"));
  sys.Set("sendMsg", Napi::Function::New(env, SendMsg, "sendMsg"));
  sys.Set("recvMsg", Napi::Function::New(env, RecvMsg, "recvMsg"));
  sys.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  sys.Set("fdSize", Napi::Function::New(env, FdSize, "fdSize"));
  sys.Set("dup", Napi::Function::New(env, Dup, "dup"));
  sys.Set("mmap", Napi::Function::New(env, Mmap, "mmap"));
  sys.Set("munmap", Napi::Function::New(env, Munmap, "munmap"));
  sys.Set("mapAlias", Napi::Function::New(env, MapAlias, "mapAlias"));
  sys.Set("eventfdCreate", Napi::Function::New(env, EventfdCreate, "eventfdCreate"));
  sys.Set("eventfdRead", Napi::Function::New(env, EventfdRead, "eventfdRead"));
  sys.Set("eventfdWrite", Napi::Function::New(env, EventfdWrite, "eventfdWrite"));
  sys.Set("watch", Napi::Function::New(env, Watch, "watch"));
  sys.Set("pageSize", Napi::Function::New(env, PageSize, "pageSize"));
  sys.Set("setErrorClass", Napi::Function::New(env, SetErrorClass, "setErrorClass"));
  sys.Set("stats", Napi::Function::New(env, Stats, "stats"));
  sys.Set("EVENT_READABLE", Napi::Number::New(env, kEventReadable));
  sys.Set("EVENT_WRITABLE", Napi::Number::New(env, kEventWritable));
  sys.Set("EVENT_DISCONNECT", Napi::Number::New(env, kEventDisconnect));
  sys.Set("MAX_FDS_PER_MESSAGE", Napi::Number::New(env, kMaxFdsPerMessage));
  return sys;
}

}  // namespace vrdma
