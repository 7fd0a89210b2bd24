// What the Jazzer.js 2.1.0 addon expects from Code Intelligence's patched libFuzzer and upstream libFuzzer 14
// (Debian's libclang-rt-14-dev) does not have, expressed with upstream's own entry points:
//   - the death callback. The addon keeps libFuzzer's "dump the current input and print the final stats" callback
//     in libfuzzer::PrintCrashingInput and calls it when the JavaScript target reported a finding; the patched
//     libFuzzer handed it over through __jazzer_set_death_callback, upstream hands the same callback
//     (Fuzzer::StaticDeathCallback) to __sanitizer_set_death_callback when a sanitizer runtime defines it. No
//     sanitizer runtime is linked, so this file defines it and forwards to the addon's setter.
//   - the *_with_pc trace hooks, which take the JavaScript call site's id as the "PC". Upstream's hooks take the PC
//     from their return address instead, so all JavaScript comparisons share one PC: libFuzzer still learns the
//     compared values (its table of recent compares feeds the dictionary mutations); only -use_value_profile loses
//     the per-site distinction. Edge coverage (the 8-bit counters) is unaffected.
#include <cstddef>
#include <cstdint>

extern "C" {
void __jazzer_set_death_callback(void (*callback)());
void __sanitizer_set_death_callback(void (*callback)()) { __jazzer_set_death_callback(callback); }

void __sanitizer_cov_trace_const_cmp8(uint64_t arg1, uint64_t arg2);
void __sanitizer_cov_trace_pc_indir(uintptr_t callee);

void __sanitizer_cov_trace_const_cmp8_with_pc(uintptr_t, uint64_t arg1, uint64_t arg2) {
  __sanitizer_cov_trace_const_cmp8(arg1, arg2);
}
void __sanitizer_cov_trace_pc_indir_with_pc(void *, uintptr_t callee) { __sanitizer_cov_trace_pc_indir(callee); }
}
