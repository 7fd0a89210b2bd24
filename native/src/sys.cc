#include "sys.h"

namespace vrdma {
Napi::Object InitSys(Napi::Env env) { return Napi::Object::New(env); }
}
