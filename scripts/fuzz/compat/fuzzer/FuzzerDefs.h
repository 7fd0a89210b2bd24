// The two declarations of libFuzzer's internal header FuzzerDefs.h that the Jazzer.js addon sources use. Debian's
// libclang-rt-14-dev ships the compiled library (libclang_rt.fuzzer_no_main) but not libFuzzer's internal headers;
// these match the symbols that library defines (checked by scripts/fuzz/build.sh with nm).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fuzzer {
typedef int (*UserCallback)(const uint8_t *Data, size_t Size);
int FuzzerDriver(int *argc, char ***argv, UserCallback Callback);
} // namespace fuzzer
