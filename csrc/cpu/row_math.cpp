// See row_math.h: add_rows and scale_add_rows (residual_add, positional_encoding), and whether a call
// streams its stores. The vector machinery (ld / st / st_out, the per-ISA builds) is in row_vectors.h.
#include "row_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

#include "row_vectors.h"

namespace fasttf {
namespace cpu {
namespace {

template <typename S, typename T, int W, bool kResidual, bool kDropout, bool kStream>
FASTTF_INLINE void add_rows_impl(const S* x, const S* residual, const T* m, S* out, int64_t n) {
  for_lanes<T, W>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr int V = decltype(tag)::value;
    auto value = ld<T, V>(x + j);
    if constexpr (kDropout) value = value * ld<T, V>(m + j);
    if constexpr (kResidual) value = ld<T, V>(residual + j) + value;
    st_out<V, kStream>(out + j, value);
  });
}

template <typename S, typename T, int W, bool kStream>
FASTTF_INLINE void add_rows_variant(const S* x, const S* residual, const T* m, S* out, int64_t n) {
  if (residual && m) {
    add_rows_impl<S, T, W, true, true, kStream>(x, residual, m, out, n);
  } else if (residual) {
    add_rows_impl<S, T, W, true, false, kStream>(x, residual, m, out, n);
  } else if (m) {
    add_rows_impl<S, T, W, false, true, kStream>(x, residual, m, out, n);
  } else {
    add_rows_impl<S, T, W, false, false, kStream>(x, residual, m, out, n);
  }
}

template <typename S, typename T, int W>
FASTTF_INLINE void add_rows_any(const S* x, const S* residual, const T* m, S* out, int64_t n, bool stream) {
  if (stream && vector_aligned<S, T, W>(out)) {
    add_rows_variant<S, T, W, true>(x, residual, m, out, n);
  } else {
    add_rows_variant<S, T, W, false>(x, residual, m, out, n);
  }
}

template <typename S, typename T, int W, bool kPe, bool kStream>
FASTTF_INLINE void scale_add_rows_impl(const S* x, T scale, const T* pe, S* out, int64_t n) {
  for_lanes<T, W>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr int V = decltype(tag)::value;
    auto value = ld<T, V>(x + j) * scale;
    if constexpr (kPe) value = value + ld<T, V>(pe + j);
    st_out<V, kStream>(out + j, value);
  });
}

template <typename S, typename T, int W>
FASTTF_INLINE void scale_add_rows_any(const S* x, T scale, const T* pe, S* out, int64_t n, bool stream) {
  const bool streamed = stream && vector_aligned<S, T, W>(out);
  if (pe) {
    streamed ? scale_add_rows_impl<S, T, W, true, true>(x, scale, pe, out, n)
             : scale_add_rows_impl<S, T, W, true, false>(x, scale, pe, out, n);
  } else {
    streamed ? scale_add_rows_impl<S, T, W, false, true>(x, scale, pe, out, n)
             : scale_add_rows_impl<S, T, W, false, false>(x, scale, pe, out, n);
  }
}

}  // namespace

#define FASTTF_ROW_MATH_IMPL(S, T)                                                                              \
  FASTTF_BY_WIDTH(S, T, add_rows, (const S* x, const S* residual, const T* m, S* out, int64_t n, bool stream), \
                  (x, residual, m, out, n, stream))                                                             \
  FASTTF_BY_WIDTH(S, T, scale_add_rows, (const S* x, T scale, const T* pe, S* out, int64_t n, bool stream),    \
                  (x, scale, pe, out, n, stream))

FASTTF_ROW_MATH_IMPL(float, float)
FASTTF_ROW_MATH_IMPL(double, double)
FASTTF_ROW_MATH_IMPL(c10::BFloat16, float)
FASTTF_ROW_MATH_IMPL(c10::Half, float)

namespace {

// The last-level cache's size in bytes from Linux's sysfs (cpu0's highest cache level), or 0.
int64_t last_level_cache_bytes() {
  int64_t bytes = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream size_file(dir + "size");
    int64_t kib = 0;
    char unit = 0;
    if (!(size_file >> kib >> unit) || unit != 'K') continue;
    bytes = std::max(bytes, kib * 1024);
  }
  return bytes;
}

int64_t stream_min_bytes() {
  static const int64_t bound = [] {
    if (const char* env = std::getenv("FASTTF_CPU_STREAM_MIN_BYTES")) {
      char* end = nullptr;
      const long long value = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && value >= 0) return static_cast<int64_t>(value);
    }
    const int64_t cache = last_level_cache_bytes();
    return (cache > 0 ? cache : int64_t(32) << 20) / 2;
  }();
  return bound;
}

}  // namespace

bool streams(int64_t bytes) {
#if FASTTF_ISA_VERSIONS
  return bytes >= stream_min_bytes();
#else
  (void)bytes;
  return false;
#endif
}

void end_streamed_stores() {
#if FASTTF_ISA_VERSIONS
  __builtin_ia32_sfence();
#endif
}

}  // namespace cpu
}  // namespace fasttf
