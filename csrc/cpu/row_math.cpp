// See row_math.h. Each function is one or two passes over a row that sits in L1.
#include "row_math.h"

#include <cmath>

// No fused multiply-add contraction: residual + x * m rounds like torch's eager
// `residual + F.dropout(x)`, so the two agree bit for bit in float32/float64.
#pragma GCC optimize("fp-contract=off")

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTTF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTTF_CLONES
#endif

namespace fasttf {
namespace cpu {

#define FASTTF_ROW_MATH_IMPL(T)                                                                                  \
  FASTTF_CLONES void add_row(const T* __restrict x, const T* __restrict residual, const T* __restrict m,         \
                             T* __restrict out, int64_t n) {                                                  \
    if (residual && m) {                                                                                       \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = residual[j] + x[j] * m[j];                   \
    } else if (residual) {                                                                                     \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = residual[j] + x[j];                          \
    } else if (m) {                                                                                            \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = x[j] * m[j];                                 \
    } else {                                                                                                   \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = x[j];                                        \
    }                                                                                                          \
  }                                                                                                            \
  FASTTF_CLONES void scale_add_row(const T* __restrict x, T scale, const T* __restrict pe, T* __restrict out,   \
                                   int64_t n) {                                                                \
    if (pe) {                                                                                                  \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = x[j] * scale + pe[j];                        \
    } else {                                                                                                   \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = x[j] * scale;                                \
    }                                                                                                          \
  }                                                                                                            \
  FASTTF_CLONES void row_stats(const T* __restrict s, int64_t n, T eps, T* mean, T* rstd) {                      \
    T sum = 0;                                                                                                 \
    _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; ++j) sum += s[j];                         \
    const T mu = sum / static_cast<T>(n);                                                                      \
    T squares = 0;                                                                                             \
    _Pragma("omp simd reduction(+ : squares)") for (int64_t j = 0; j < n; ++j) {                               \
      const T d = s[j] - mu;                                                                                   \
      squares += d * d;                                                                                        \
    }                                                                                                          \
    *mean = mu;                                                                                                \
    *rstd = T(1) / std::sqrt(squares / static_cast<T>(n) + eps);                                               \
  }                                                                                                            \
  FASTTF_CLONES void norm_row(const T* __restrict s, T mean, T rstd, const T* __restrict w,                     \
                              const T* __restrict b, T* __restrict out, int64_t n) {                           \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = (s[j] - mean) * rstd * w[j] + b[j];            \
  }                                                                                                            \
  FASTTF_CLONES void norm_backward_sums(const T* __restrict dy, const T* __restrict s, const T* __restrict w,   \
                                        T mean, T rstd, int64_t n, T* c1, T* c2) {                             \
    T sum_g = 0, sum_gx = 0;                                                                                   \
    _Pragma("omp simd reduction(+ : sum_g, sum_gx)") for (int64_t j = 0; j < n; ++j) {                         \
      const T g = dy[j] * w[j];                                                                                \
      sum_g += g;                                                                                              \
      sum_gx += g * ((s[j] - mean) * rstd);                                                                    \
    }                                                                                                          \
    *c1 = sum_g / static_cast<T>(n);                                                                           \
    *c2 = sum_gx / static_cast<T>(n);                                                                          \
  }                                                                                                            \
  FASTTF_CLONES void norm_backward_row(const T* __restrict dy, const T* __restrict s, const T* __restrict w,     \
                                       const T* __restrict gs, const T* __restrict m, T mean, T rstd, T c1,     \
                                       T c2, T* __restrict ds, T* __restrict dx, T* __restrict dw_part,         \
                                       T* __restrict db_part, int64_t n) {                                     \
    if (gs) {                                                                                                  \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                                    \
        ds[j] = rstd * (dy[j] * w[j] - c1 - (s[j] - mean) * rstd * c2) + gs[j];                                 \
      }                                                                                                        \
    } else {                                                                                                   \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                                    \
        ds[j] = rstd * (dy[j] * w[j] - c1 - (s[j] - mean) * rstd * c2);                                         \
      }                                                                                                        \
    }                                                                                                          \
    if (dx) {                                                                                                  \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) dx[j] = ds[j] * m[j];                                 \
    }                                                                                                          \
    if (dw_part) {                                                                                             \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                                    \
        dw_part[j] += dy[j] * ((s[j] - mean) * rstd);                                                          \
        db_part[j] += dy[j];                                                                                   \
      }                                                                                                        \
    }                                                                                                          \
  }

FASTTF_ROW_MATH_IMPL(float)
FASTTF_ROW_MATH_IMPL(double)

}  // namespace cpu
}  // namespace fasttf
