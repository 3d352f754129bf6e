// What the CPU kernels compile per x86 level, and which level this CPU has.
//
// FASTTF_CLONES: a function compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and plain x86-64,
// the best clone picked when the library loads (GCC target_clones): for loops the compiler
// vectorises. Hand-written intrinsics instead carry target("...") attributes and are chosen at
// run time with has_avx2_fma() / has_avx512().
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTTF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTTF_CLONES
#endif

namespace fasttf {
namespace cpu {

#if defined(__x86_64__)
// FASTTF_CPU_ISA=avx2 or =generic, read once, turns the hand-written AVX-512 (and AVX2) paths and
// row_math's wider vectors off, so the tests run the fallbacks on a machine that has more
// (tests/test_cpu_isa_fallbacks.py).
inline int isa_limit() {
  static const int limit = [] {
    const char* isa = std::getenv("FASTTF_CPU_ISA");
    if (isa == nullptr) return 2;
    if (std::strcmp(isa, "generic") == 0) return 0;
    return std::strcmp(isa, "avx2") == 0 ? 1 : 2;
  }();
  return limit;
}
inline bool has_avx2_fma() {
  static const bool yes =
      isa_limit() >= 1 && (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  return yes;
}
inline bool has_avx512() {
  static const bool yes = isa_limit() >= 2 && (__builtin_cpu_init(), __builtin_cpu_supports("avx512f")) && has_avx2_fma();
  return yes;
}
#else
inline bool has_avx2_fma() { return false; }
inline bool has_avx512() { return false; }
#endif

}  // namespace cpu
}  // namespace fasttf
