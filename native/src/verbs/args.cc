// Errors that name the verb, the readers of JS arguments, and the conversions of libibverbs structures to and
// from JS objects: what every verb of the addon's `verbs` object uses.
#include <endian.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common.h"

namespace vrdma::verbs {

// ---------------------------------------------------------------------------------------------- errors

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : "E" + std::to_string(err);
}

Napi::Error VerbError(Napi::Env env, const std::string& verb, int err, const std::string& detail) {
  std::string name = ErrnoName(err);
  std::string message = verb + ": " + name + " (" + (detail.empty() ? std::string(strerror(err)) : detail) + ")";
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("verb", Napi::String::New(env, verb));
  e.Set("errno", Napi::String::New(env, name));
  e.Set("code", Napi::String::New(env, name));
  e.Set("errnoNumber", Napi::Number::New(env, err));
  return e;
}

Napi::Value Throw(Napi::Env env, const std::string& verb, int err, const std::string& detail) {
  VerbError(env, verb, err, detail).ThrowAsJavaScriptException();
  return env.Undefined();
}

int ErrnoOr(int fallback) { return errno != 0 ? errno : fallback; }

// ---------------------------------------------------------------------------------------------- argument reading

// Each reader returns false after throwing a precise EINVAL naming the verb and the field.
bool ReadU64(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint64_t* out) {
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) {
      Throw(env, verb, EINVAL, std::string(field) + " does not fit in 64 bits");
      return false;
    }
    *out = x;
    return true;
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d))) {
      Throw(env, verb, EINVAL, std::string(field) + " must be an integer in 0..2^53-1 (or a bigint)");
      return false;
    }
    *out = static_cast<uint64_t>(d);
    return true;
  }
  Throw(env, verb, EINVAL, std::string(field) + " must be a number or bigint");
  return false;
}

bool ReadUint(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint64_t max, uint64_t* out) {
  if (!v.IsNumber()) {
    Throw(env, verb, EINVAL, std::string(field) + " must be a number");
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= static_cast<double>(max)) || d != static_cast<double>(static_cast<uint64_t>(d))) {
    Throw(env, verb, EINVAL, std::string(field) + " must be an integer in 0.." + std::to_string(max));
    return false;
  }
  *out = static_cast<uint64_t>(d);
  return true;
}

bool ReadBool(Napi::Object obj, const char* field) {
  Napi::Value v = obj.Get(field);
  return v.IsBoolean() && v.As<Napi::Boolean>().Value();
}

// A byte view argument (Uint8Array, or any TypedArray/DataView treated as bytes).
bool ReadBytes(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint8_t** data, size_t* len) {
  if (v.IsTypedArray()) {
    Napi::TypedArray ta = v.As<Napi::TypedArray>();
    Napi::ArrayBuffer ab = ta.ArrayBuffer();
    *data = static_cast<uint8_t*>(ab.Data()) + ta.ByteOffset();
    *len = ta.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    Napi::DataView dv = v.As<Napi::DataView>();
    *data = static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset();
    *len = dv.ByteLength();
    return true;
  }
  Throw(env, verb, EINVAL, std::string(field) + " must be a Uint8Array");
  return false;
}

// ---------------------------------------------------------------------------------------------- conversions

Napi::Value GidToJs(Napi::Env env, const ibv_gid& gid) {
  Napi::Uint8Array a = Napi::Uint8Array::New(env, 16);
  memcpy(a.Data(), gid.raw, 16);
  return a;
}

std::string Hex64(uint64_t be) {
  // GUIDs are big-endian in libibverbs.
  uint64_t v = be64toh(be);
  char buf[24];
  snprintf(buf, sizeof buf, "%04x:%04x:%04x:%04x", static_cast<unsigned>((v >> 48) & 0xffff),
           static_cast<unsigned>((v >> 32) & 0xffff), static_cast<unsigned>((v >> 16) & 0xffff),
           static_cast<unsigned>(v & 0xffff));
  return buf;
}

bool ReadAhAttr(Napi::Env env, const char* verb, Napi::Value v, ibv_ah_attr* ah) {
  memset(ah, 0, sizeof *ah);
  if (!v.IsObject()) {
    Throw(env, verb, EINVAL, "ahAttr must be an object");
    return false;
  }
  Napi::Object o = v.As<Napi::Object>();
  if (!ReadField(env, verb, o, "dlid", &ah->dlid, nullptr) || !ReadField(env, verb, o, "sl", &ah->sl, nullptr, 15) ||
      !ReadField(env, verb, o, "srcPathBits", &ah->src_path_bits, nullptr, 127) ||
      !ReadField(env, verb, o, "staticRate", &ah->static_rate, nullptr) ||
      !ReadRequired(env, verb, o, "portNum", &ah->port_num))
    return false;
  Napi::Value grh = o.Get("grh");
  if (grh.IsUndefined() || grh.IsNull()) return true;
  if (!grh.IsObject()) {
    Throw(env, verb, EINVAL, "ahAttr.grh must be an object");
    return false;
  }
  Napi::Object g = grh.As<Napi::Object>();
  ah->is_global = 1;
  uint8_t* gid = nullptr;
  size_t gidLen = 0;
  if (!ReadBytes(env, verb, "ahAttr.grh.dgid", g.Get("dgid"), &gid, &gidLen)) return false;
  if (gidLen != 16) {
    Throw(env, verb, EINVAL, "ahAttr.grh.dgid must be 16 bytes, got " + std::to_string(gidLen));
    return false;
  }
  memcpy(ah->grh.dgid.raw, gid, 16);
  if (!ReadField(env, verb, g, "flowLabel", &ah->grh.flow_label, nullptr, 0xfffff) ||
      !ReadRequired(env, verb, g, "sgidIndex", &ah->grh.sgid_index) ||
      !ReadField(env, verb, g, "hopLimit", &ah->grh.hop_limit, nullptr) ||
      !ReadField(env, verb, g, "trafficClass", &ah->grh.traffic_class, nullptr))
    return false;
  return true;
}

Napi::Object AhAttrToJs(Napi::Env env, const ibv_ah_attr& ah) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("dlid", ah.dlid);
  o.Set("sl", ah.sl);
  o.Set("srcPathBits", ah.src_path_bits);
  o.Set("staticRate", ah.static_rate);
  o.Set("portNum", ah.port_num);
  if (ah.is_global) {
    Napi::Object g = Napi::Object::New(env);
    g.Set("dgid", GidToJs(env, ah.grh.dgid));
    g.Set("flowLabel", ah.grh.flow_label);
    g.Set("sgidIndex", ah.grh.sgid_index);
    g.Set("hopLimit", ah.grh.hop_limit);
    g.Set("trafficClass", ah.grh.traffic_class);
    o.Set("grh", g);
  }
  return o;
}

Napi::Object CapToJs(Napi::Env env, const ibv_qp_cap& cap) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("maxSendWr", cap.max_send_wr);
  o.Set("maxRecvWr", cap.max_recv_wr);
  o.Set("maxSendSge", cap.max_send_sge);
  o.Set("maxRecvSge", cap.max_recv_sge);
  o.Set("maxInlineData", cap.max_inline_data);
  return o;
}

}  // namespace vrdma::verbs
