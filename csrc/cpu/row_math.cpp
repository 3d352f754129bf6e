// See row_math.h. Each kernel is a template over the storage type S and the math type T, written
// once for a vector of kLanes values and for one value (the row's tail): `ld`/`st` load and store
// either, converting S <-> T.
#include "row_math.h"

#include <cmath>
#include <type_traits>

#include "simd.h"

// No fused multiply-add contraction: residual + x * m rounds like torch's eager
// `residual + F.dropout(x)`, so the two agree bit for bit in float32/float64.
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors in always-inline helpers: no ABI is crossed

#define FASTTF_INLINE __attribute__((always_inline)) inline
#define FASTTF_LAMBDA __attribute__((always_inline))  // inlined into each clone, not compiled once for x86-64

namespace fasttf {
namespace cpu {
namespace {

// 64 bytes of T (16 floats or 8 doubles), and the same for unaligned memory.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
  typedef T memory __attribute__((vector_size(64), aligned(alignof(T)), may_alias));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

typedef float F32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32), aligned(2), may_alias));

// bfloat16 <-> float: the top half of the float's bits; rounding to nearest even, NaN -> 0x7FC0.
FASTTF_INLINE F32x16 bf16_to_float(U16x16 h) { return (F32x16)(__builtin_convertvector(h, U32x16) << 16); }

// The bfloat16 bits of f, in the low half of each 32-bit lane.
FASTTF_INLINE U32x16 bf16_bits(F32x16 f) {
  const U32x16 u = (U32x16)f;
  const U32x16 rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const U32x16 nan = (U32x16)(f != f);
  return (rounded & ~nan) | (0x7FC0u & nan);
}

FASTTF_INLINE U16x16 float_to_bf16(F32x16 f) { return __builtin_convertvector(bf16_bits(f), U16x16); }

// half <-> float, bit for bit c10's portable fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value.
FASTTF_INLINE F32x16 half_to_float(U16x16 h) {
  const U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  const U32x16 sign = w & 0x80000000u;
  const U32x16 two_w = w + w;
  const F32x16 normalized = (F32x16)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const F32x16 denormalized = (F32x16)((two_w >> 17) | (126u << 23)) - 0.5f;
  const U32x16 small = (U32x16)(two_w < (1u << 27));
  return (F32x16)(sign | (((U32x16)denormalized & small) | ((U32x16)normalized & ~small)));
}

FASTTF_INLINE U16x16 float_to_half(F32x16 f) {
  const U32x16 w = (U32x16)f;
  const F32x16 magnitude = (F32x16)(w & 0x7FFFFFFFu);
  F32x16 base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
  const U32x16 shl1_w = w + w;
  const U32x16 sign = w & 0x80000000u;
  U32x16 bias = shl1_w & 0xFF000000u;
  const U32x16 low = (U32x16)(bias < 0x71000000u);
  bias = (bias & ~low) | (0x71000000u & low);
  base = (F32x16)((bias >> 1) + 0x07800000u) + base;
  const U32x16 bits = (U32x16)base;
  const U32x16 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const U32x16 nan = (U32x16)(shl1_w > 0xFF000000u);
  return __builtin_convertvector((sign >> 16) | ((0x7E00u & nan) | (nonsign & ~nan)), U16x16);
}

// kLanes<T> values of S at p as a Vec<T>, and back.
template <typename T, typename S>
FASTTF_INLINE Vec<T> load_vec(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return *reinterpret_cast<const typename VecOf<T>::memory*>(p);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return bf16_to_float(*reinterpret_cast<const U16x16*>(p));
  } else {
    static_assert(std::is_same_v<S, c10::Half>, "a storage type of row_math");
    return half_to_float(*reinterpret_cast<const U16x16*>(p));
  }
}

template <typename S, typename T>
FASTTF_INLINE void store_vec(S* p, Vec<T> v) {
  if constexpr (std::is_same_v<S, T>) {
    *reinterpret_cast<typename VecOf<T>::memory*>(p) = v;
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    *reinterpret_cast<U16x16*>(p) = float_to_bf16(v);
  } else {
    *reinterpret_cast<U16x16*>(p) = float_to_half(v);
  }
}

// A vector or one value, by the tag of the loop: ld<T, V>(p) and st<V>(p, value).
template <typename T, bool V, typename S>
FASTTF_INLINE auto ld(const S* p) {
  if constexpr (V) {
    return load_vec<T>(p);
  } else {
    return static_cast<T>(*p);
  }
}

template <bool V, typename S, typename X>
FASTTF_INLINE void st(S* p, X value) {
  if constexpr (V) {
    store_vec<S, decltype(value[0] + 0)>(p, value);
  } else {
    *p = static_cast<S>(value);
  }
}

// Stores value at p as S and returns what was stored, as T (bfloat16: without reading it back).
template <bool V, typename T, typename S, typename X>
FASTTF_INLINE X store_rounded(S* p, X value) {
  if constexpr (V && std::is_same_v<S, c10::BFloat16>) {
    const U32x16 bits = bf16_bits(value);
    *reinterpret_cast<U16x16*>(p) = __builtin_convertvector(bits, U16x16);
    return (F32x16)(bits << 16);
  } else {
    st<V>(p, value);
    return ld<T, V>(p);
  }
}

using VecTag = std::true_type;
using OneTag = std::false_type;

// The sum of a vector's lanes as a tree of shuffles (log2 of the lanes steps, not a chain of adds).
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef int64_t I64x8 __attribute__((vector_size(64)));

FASTTF_INLINE float horizontal_sum(F32x16 v) {
  v += __builtin_shuffle(v, I32x16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, I32x16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, I32x16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, I32x16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

FASTTF_INLINE double horizontal_sum(Vec<double> v) {
  v += __builtin_shuffle(v, I64x8{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, I64x8{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, I64x8{1, 0, 3, 2, 5, 4, 7, 6});
  return v[0];
}

// body(j, tag) for every j in [0, n): vectors of kLanes<T>, then the tail one value at a time.
template <typename T, typename F>
FASTTF_INLINE void for_lanes(int64_t n, F body) {
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>) body(j, VecTag{});
  for (; j < n; ++j) body(j, OneTag{});
}

// sum over j of term(j, tag), four vector accumulators (term runs once per j, in order).
template <typename T, typename F>
FASTTF_INLINE T sum_lanes(int64_t n, F term) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> a0{}, a1{}, a2{}, a3{};
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    a0 += term(j, VecTag{});
    a1 += term(j + L, VecTag{});
    a2 += term(j + 2 * L, VecTag{});
    a3 += term(j + 3 * L, VecTag{});
  }
  for (; j + L <= n; j += L) a0 += term(j, VecTag{});
  T sum = horizontal_sum((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) sum += term(j, OneTag{});
  return sum;
}

// Two sums at once: term(j, tag, &first, &second) adds to both; two accumulators each.
template <typename T, typename F>
FASTTF_INLINE void sum2_lanes(int64_t n, F term, T* first, T* second) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> a0{}, a1{}, b0{}, b1{};
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    term(j, VecTag{}, a0, b0);
    term(j + L, VecTag{}, a1, b1);
  }
  for (; j + L <= n; j += L) term(j, VecTag{}, a0, b0);
  T a = horizontal_sum(a0 + a1), b = horizontal_sum(b0 + b1);
  for (; j < n; ++j) term(j, OneTag{}, a, b);
  *first = a;
  *second = b;
}

template <typename S, typename T, bool kResidual, bool kDropout>
FASTTF_INLINE void add_rows_impl(const S* x, const S* residual, const T* m, S* out, int64_t n) {
  for_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr bool V = decltype(tag)::value;
    auto value = ld<T, V>(x + j);
    if constexpr (kDropout) value = value * ld<T, V>(m + j);
    if constexpr (kResidual) value = ld<T, V>(residual + j) + value;
    st<V>(out + j, value);
  });
}

template <typename S, typename T>
FASTTF_INLINE void add_rows_any(const S* x, const S* residual, const T* m, S* out, int64_t n) {
  if (residual && m) {
    add_rows_impl<S, T, true, true>(x, residual, m, out, n);
  } else if (residual) {
    add_rows_impl<S, T, true, false>(x, residual, m, out, n);
  } else if (m) {
    add_rows_impl<S, T, false, true>(x, residual, m, out, n);
  } else {
    add_rows_impl<S, T, false, false>(x, residual, m, out, n);
  }
}

template <typename S, typename T>
FASTTF_INLINE void scale_add_rows_any(const S* x, T scale, const T* pe, S* out, int64_t n) {
  if (pe) {
    for_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
      constexpr bool V = decltype(tag)::value;
      st<V>(out + j, ld<T, V>(x + j) * scale + ld<T, V>(pe + j));
    });
  } else {
    for_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
      constexpr bool V = decltype(tag)::value;
      st<V>(out + j, ld<T, V>(x + j) * scale);
    });
  }
}

// Pass 1 writes s (and its values as stored, widened, to s_buf) and sums it; pass 2 sums the
// squared deviations from L1; pass 3 writes out.
template <typename S, typename T, bool kDropout>
FASTTF_INLINE void add_norm_row_impl(const S* x, const S* residual, const T* m, const T* w, const T* b, T eps, S* s,
                                     S* out, T* s_buf, T* mean, T* rstd, int64_t n) {
  constexpr bool kSame = std::is_same_v<S, T>;
  const T sum = sum_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr bool V = decltype(tag)::value;
    auto value = ld<T, V>(x + j);
    if constexpr (kDropout) value = value * ld<T, V>(m + j);
    value = ld<T, V>(residual + j) + value;
    if constexpr (kSame) {
      st<V>(s + j, value);
    } else {
      value = store_rounded<V, T>(s + j, value);  // the statistics of s as stored, which the backward reads
      st<V>(s_buf + j, value);
    }
    return value;
  });
  const T* sv;
  if constexpr (kSame) {
    sv = s;
  } else {
    sv = s_buf;
  }
  const T mu = sum / static_cast<T>(n);
  const T squares = sum_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    const auto d = ld<T, decltype(tag)::value>(sv + j) - mu;
    return d * d;
  });
  const T rs = T(1) / std::sqrt(squares / static_cast<T>(n) + eps);
  *mean = mu;
  *rstd = rs;
  for_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr bool V = decltype(tag)::value;
    st<V>(out + j, (ld<T, V>(sv + j) - mu) * rs * ld<T, V>(w + j) + ld<T, V>(b + j));
  });
}

template <typename S, typename T, bool kGradS, bool kDropout, bool kParts>
FASTTF_INLINE void add_norm_backward_row_impl(const S* dy, const S* s, const S* grad_s, const T* m, const T* w,
                                              T mean, T rstd, S* ds, S* dx, T* dw_part, T* db_part, T* dy_buf,
                                              T* s_buf, int64_t n) {
  constexpr bool kSame = std::is_same_v<S, T>;
  T sum_g, sum_gx;
  sum2_lanes<T>(
      n,
      [&](int64_t j, auto tag, auto& acc_g, auto& acc_gx) FASTTF_LAMBDA {
        constexpr bool V = decltype(tag)::value;
        const auto dyj = ld<T, V>(dy + j);
        const auto sj = ld<T, V>(s + j);
        if constexpr (!kSame) {
          st<V>(dy_buf + j, dyj);
          st<V>(s_buf + j, sj);
        }
        const auto g = dyj * ld<T, V>(w + j);
        acc_g += g;
        acc_gx += g * ((sj - mean) * rstd);
      },
      &sum_g, &sum_gx);
  const T c1 = sum_g / static_cast<T>(n), c2 = sum_gx / static_cast<T>(n);
  const T* dyv;
  const T* sv;
  if constexpr (kSame) {
    dyv = dy, sv = s;
  } else {
    dyv = dy_buf, sv = s_buf;
  }
  for_lanes<T>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr bool V = decltype(tag)::value;
    const auto dyj = ld<T, V>(dyv + j);
    const auto xhat = (ld<T, V>(sv + j) - mean) * rstd;
    auto dsj = rstd * (dyj * ld<T, V>(w + j) - c1 - xhat * c2);
    if constexpr (kGradS) dsj = dsj + ld<T, V>(grad_s + j);
    st<V>(ds + j, dsj);
    if constexpr (kDropout) st<V>(dx + j, dsj * ld<T, V>(m + j));
    if constexpr (kParts) {
      st<V>(dw_part + j, ld<T, V>(dw_part + j) + dyj * xhat);
      st<V>(db_part + j, ld<T, V>(db_part + j) + dyj);
    }
  });
}

template <typename S, typename T>
FASTTF_INLINE void add_norm_backward_row_any(const S* dy, const S* s, const S* grad_s, const T* m, const T* w, T mean,
                                             T rstd, S* ds, S* dx, T* dw_part, T* db_part, T* dy_buf, T* s_buf,
                                             int64_t n) {
  const int variant = (grad_s ? 4 : 0) | (dx ? 2 : 0) | (dw_part ? 1 : 0);
#define FASTTF_BACKWARD_CASE(k)                                                                                    \
  case k:                                                                                                          \
    add_norm_backward_row_impl<S, T, (k & 4) != 0, (k & 2) != 0, (k & 1) != 0>(dy, s, grad_s, m, w, mean, rstd, ds, \
                                                                              dx, dw_part, db_part, dy_buf, s_buf, \
                                                                              n);                                  \
    break;
  switch (variant) {
    FASTTF_BACKWARD_CASE(0)
    FASTTF_BACKWARD_CASE(1)
    FASTTF_BACKWARD_CASE(2)
    FASTTF_BACKWARD_CASE(3)
    FASTTF_BACKWARD_CASE(4)
    FASTTF_BACKWARD_CASE(5)
    FASTTF_BACKWARD_CASE(6)
    FASTTF_BACKWARD_CASE(7)
  }
#undef FASTTF_BACKWARD_CASE
}

}  // namespace

#define FASTTF_ROW_MATH_IMPL(S, T)                                                                                 \
  FASTTF_CLONES void add_rows(const S* x, const S* residual, const T* m, S* out, int64_t n) {                     \
    add_rows_any<S, T>(x, residual, m, out, n);                                                                    \
  }                                                                                                                \
  FASTTF_CLONES void scale_add_rows(const S* x, T scale, const T* pe, S* out, int64_t n) {                        \
    scale_add_rows_any<S, T>(x, scale, pe, out, n);                                                                \
  }                                                                                                                \
  FASTTF_CLONES void add_norm_row(const S* x, const S* residual, const T* m, const T* w, const T* b, T eps, S* s,  \
                                  S* out, T* s_buf, T* mean, T* rstd, int64_t n) {                                 \
    if (m) {                                                                                                       \
      add_norm_row_impl<S, T, true>(x, residual, m, w, b, eps, s, out, s_buf, mean, rstd, n);                      \
    } else {                                                                                                       \
      add_norm_row_impl<S, T, false>(x, residual, m, w, b, eps, s, out, s_buf, mean, rstd, n);                     \
    }                                                                                                              \
  }                                                                                                                \
  FASTTF_CLONES void add_norm_backward_row(const S* dy, const S* s, const S* grad_s, const T* m, const T* w,       \
                                           T mean, T rstd, S* ds, S* dx, T* dw_part, T* db_part, T* dy_buf,        \
                                           T* s_buf, int64_t n) {                                                  \
    add_norm_backward_row_any<S, T>(dy, s, grad_s, m, w, mean, rstd, ds, dx, dw_part, db_part, dy_buf, s_buf, n);  \
  }

FASTTF_ROW_MATH_IMPL(float, float)
FASTTF_ROW_MATH_IMPL(double, double)
FASTTF_ROW_MATH_IMPL(c10::BFloat16, float)
FASTTF_ROW_MATH_IMPL(c10::Half, float)

}  // namespace cpu
}  // namespace fasttf
