// What the CPU kernels compile per x86 level, and which level this CPU has.
//
// FASTTF_PER_ISA(ret, name, params, args): `ret name params` runs the always-inline
// `name##_body args` (declared FASTTF_BODY) compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) or
// plain x86-64, whichever this CPU has (has_avx512() / has_avx2_fma(), so FASTTF_CPU_ISA reaches
// it): for loops the compiler vectorises. Hand-written intrinsics instead carry target("...")
// attributes and are chosen at run time the same way. (GCC's target_clones picked at load time,
// which FASTTF_CPU_ISA could not reach: the tests' AVX2 runs still ran AVX-512 loops.)
#pragma once
#include <cstdlib>
#include <cstring>

#define FASTTF_BODY __attribute__((always_inline)) inline

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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTTF_ISA_VERSIONS 1
#define FASTTF_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FASTTF_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
// `ret name params` calling name##_avx512, name##_avx2 or name##_x86_64 (defined by the caller, with
// the FASTTF_TARGET_* attributes) with args, the best this CPU has: the one dispatch rule of the
// per-ISA builds (FASTTF_PER_ISA here, FASTTF_BY_WIDTH in row_math.cpp).
#define FASTTF_DISPATCH_ISA(ret, name, params, args) \
  ret name params {                                  \
    if (has_avx512()) return name##_avx512 args;     \
    if (has_avx2_fma()) return name##_avx2 args;     \
    return name##_x86_64 args;                       \
  }
#define FASTTF_PER_ISA(ret, name, params, args)                                  \
  namespace {                                                                    \
  FASTTF_TARGET_AVX512 ret name##_avx512 params { return name##_body args; }     \
  FASTTF_TARGET_AVX2 ret name##_avx2 params { return name##_body args; }         \
  ret name##_x86_64 params { return name##_body args; }                          \
  }                                                                              \
  FASTTF_DISPATCH_ISA(ret, name, params, args)
#else
#define FASTTF_ISA_VERSIONS 0
#define FASTTF_PER_ISA(ret, name, params, args) \
  ret name params { return name##_body args; }
#endif

}  // namespace cpu
}  // namespace fasttf
