// See row_math.h: add_layer_norm's rows, forward (add_norm_rows) and backward
// (add_norm_backward_rows), with the vector machinery of row_vectors.h. Short rows go in pairs: a row
// of 64 floats costs about as much in its fixed chain of latencies (the sums' trees, a division, a
// square root, a division) as in its values, and two rows' chains overlap; each row's arithmetic is
// the same as alone, so a row's results do not depend on its neighbours.
#include <cmath>
#include <type_traits>

#include "row_math.h"
#include "row_vectors.h"

namespace fasttf {
namespace cpu {
namespace {

// R rows of add_layer_norm at once (row r at x + r * n, ..., mean + r), each computed as if alone.
// Pass 1 writes s (16-bit types: its values as stored, widened, to s_buf too) and sums it; pass 2
// sums the squared deviations from L1; pass 3 writes out -- streamed with kStream. s is always
// stored through the cache: the backward and the next residual read it, and in a loop of calls x,
// residual and s stay in a last-level cache that x, residual, s and out together overflow. (On an
// AMD EPYC with 32 MiB of L3, (8, 512, 512) float32, 2 threads: s and out both streamed read
// 1.2-1.3x eager's forward, out alone 1.35-1.6x; bfloat16 1.0-1.1x against 1.35-1.55x.)
template <typename S, typename T, int W, int R, bool kDropout, bool kStream>
FASTTF_INLINE void add_norm_rows_impl(const S* x, const S* residual, const T* m, const T* w, const T* b, T eps, S* s,
                                      S* out, T* s_buf, T* mean, T* rstd, int64_t n) {
  constexpr bool kFromS = std::is_same_v<S, T>;
  T sums[R], squares[R], mu[R], rs[R];
  sum_lanes<T, W, R>(
      n,
      [&](int r, int64_t j, auto tag) FASTTF_LAMBDA {
        constexpr int V = decltype(tag)::value;
        const int64_t k = r * n + j;
        auto value = ld<T, V>(x + k);
        if constexpr (kDropout) value = value * ld<T, V>(m + k);
        value = ld<T, V>(residual + k) + value;
        if constexpr (kFromS) {
          st<V>(s + k, value);
        } else {
          value = store_rounded<V, T>(s + k, value);  // the statistics of s as stored (the backward's)
          st<V>(s_buf + k, value);
        }
        return value;
      },
      sums);
  const T* sv;
  if constexpr (kFromS) {
    sv = s;
  } else {
    sv = s_buf;
  }
  each_row<R>([&](int r) FASTTF_LAMBDA { mu[r] = sums[r] / static_cast<T>(n); });
  sum_lanes<T, W, R>(
      n,
      [&](int r, int64_t j, auto tag) FASTTF_LAMBDA {
        const auto d = ld<T, decltype(tag)::value>(sv + r * n + j) - mu[r];
        return d * d;
      },
      squares);
  each_row<R>([&](int r) FASTTF_LAMBDA {
    rs[r] = T(1) / std::sqrt(squares[r] / static_cast<T>(n) + eps);
    mean[r] = mu[r];
    rstd[r] = rs[r];
  });
  for_lanes<T, W>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr int V = decltype(tag)::value;
    const auto wj = ld<T, V>(w + j), bj = ld<T, V>(b + j);
    each_row<R>([&](int r) FASTTF_LAMBDA {
      st_out<V, kStream>(out + r * n + j, (ld<T, V>(sv + r * n + j) - mu[r]) * rs[r] * wj + bj);
    });
  });
}

// R rows of the backward at once; dw_part / db_part take the rows' terms in row order, as one row at a
// time would.
template <typename S, typename T, int W, int R, bool kGradS, bool kDropout, bool kParts, bool kStream>
FASTTF_INLINE void add_norm_backward_rows_impl(const S* dy, const S* s, const S* grad_s, const T* m, const T* w,
                                               const T* mean, const T* rstd, S* ds, S* dx, T* dw_part, T* db_part,
                                               T* dy_buf, T* s_buf, int64_t n) {
  constexpr bool kSame = std::is_same_v<S, T>;
  T sum_g[R], sum_gx[R], c1[R], c2[R];
  sum2_lanes<T, W, R>(
      n,
      [&](int r, int64_t j, auto tag, auto& acc_g, auto& acc_gx) FASTTF_LAMBDA {
        constexpr int V = decltype(tag)::value;
        const int64_t k = r * n + j;
        const auto dyj = ld<T, V>(dy + k);
        const auto sj = ld<T, V>(s + k);
        if constexpr (!kSame) {
          st<V>(dy_buf + k, dyj);
          st<V>(s_buf + k, sj);
        }
        const auto g = dyj * ld<T, V>(w + j);
        acc_g += g;
        acc_gx += g * ((sj - mean[r]) * rstd[r]);
      },
      sum_g, sum_gx);
  each_row<R>([&](int r) FASTTF_LAMBDA {
    c1[r] = sum_g[r] / static_cast<T>(n);
    c2[r] = sum_gx[r] / static_cast<T>(n);
  });
  const T* dyv;
  const T* sv;
  if constexpr (kSame) {
    dyv = dy, sv = s;
  } else {
    dyv = dy_buf, sv = s_buf;
  }
  for_lanes<T, W>(n, [&](int64_t j, auto tag) FASTTF_LAMBDA {
    constexpr int V = decltype(tag)::value;
    const auto wj = ld<T, V>(w + j);
    std::remove_const_t<decltype(wj)> dw{}, db{};
    if constexpr (kParts) dw = ld<T, V>(dw_part + j), db = ld<T, V>(db_part + j);
    each_row<R>([&](int r) FASTTF_LAMBDA {
      const int64_t k = r * n + j;
      const auto dyj = ld<T, V>(dyv + k);
      const auto xhat = (ld<T, V>(sv + k) - mean[r]) * rstd[r];
      auto dsj = rstd[r] * (dyj * wj - c1[r] - xhat * c2[r]);
      if constexpr (kGradS) dsj = dsj + ld<T, V>(grad_s + k);
      st_out<V, kStream>(ds + k, dsj);
      if constexpr (kDropout) st_out<V, kStream>(dx + k, dsj * ld<T, V>(m + k));
      if constexpr (kParts) {
        dw = dw + dyj * xhat;
        db = db + dyj;
      }
    });
    if constexpr (kParts) {
      st<V>(dw_part + j, dw);
      st<V>(db_part + j, db);
    }
  });
}

// Rows at once: two while a row of n values of T is at most 512 bytes, short enough that its fixed
// latency (the sums' trees, the division, the square root) costs about as much as its values; one
// otherwise. (Longer rows in pairs measured slower: the backward at D = 512 float32 by 15% on rows
// in L2, the forward at (8, 512, 512) streamed from memory by 10-20%, on an AMD EPYC, 1 thread.)
template <typename T>
FASTTF_INLINE bool pairs_rows(int64_t n) {
  return n * static_cast<int64_t>(sizeof(T)) <= 512;
}

// group(rows_tag, i) over rows [0, rows): rows_tag an integral_constant of the group's size R, i its
// first row; kNormRowsAtOnce rows a group while pairs_rows, one otherwise (the scratch holds a group).
template <typename T, typename G>
FASTTF_INLINE void for_row_groups(int64_t n, int64_t rows, G group) {
  constexpr int kMany = static_cast<int>(kNormRowsAtOnce);
  int64_t i = 0;
  if (pairs_rows<T>(n)) {
    for (; i + kMany <= rows; i += kMany) group(std::integral_constant<int, kMany>{}, i);
  }
  for (; i < rows; ++i) group(std::integral_constant<int, 1>{}, i);
}

// Whether each of rows [i, i + R) of p (stride n) suits streamed stores.
template <typename S, typename T, int W>
FASTTF_INLINE bool rows_aligned(const S* p, int64_t n, int rows) {
  for (int r = 0; r < rows; ++r) {
    if (!vector_aligned<S, T, W>(p + r * n)) return false;
  }
  return true;
}

template <typename S, typename T, int W>
FASTTF_INLINE void add_norm_rows_any(const S* x, const S* residual, const T* m, const T* w, const T* b, T eps, S* s,
                                     S* out, T* s_buf, T* mean, T* rstd, int64_t n, int64_t rows, bool stream) {
  const auto group = [&](auto rows_tag, int64_t i) FASTTF_LAMBDA {
    constexpr int R = decltype(rows_tag)::value;
    const int64_t at = i * n;
    const bool streamed = stream && rows_aligned<S, T, W>(out + at, n, R);
    const T* mi = m ? m + at : nullptr;
#define FASTTF_FORWARD_ARGS x + at, residual + at, mi, w, b, eps, s + at, out + at, s_buf, mean + i, rstd + i, n
    if (m) {
      streamed ? add_norm_rows_impl<S, T, W, R, true, true>(FASTTF_FORWARD_ARGS)
               : add_norm_rows_impl<S, T, W, R, true, false>(FASTTF_FORWARD_ARGS);
    } else {
      streamed ? add_norm_rows_impl<S, T, W, R, false, true>(FASTTF_FORWARD_ARGS)
               : add_norm_rows_impl<S, T, W, R, false, false>(FASTTF_FORWARD_ARGS);
    }
#undef FASTTF_FORWARD_ARGS
  };
  for_row_groups<T>(n, rows, group);
}

template <typename S, typename T, int W>
FASTTF_INLINE void add_norm_backward_rows_any(const S* dy, const S* s, const S* grad_s, const T* m, const T* w,
                                              const T* mean, const T* rstd, S* ds, S* dx, T* dw_part, T* db_part,
                                              T* dy_buf, T* s_buf, int64_t n, int64_t rows, bool stream) {
  const auto group = [&](auto rows_tag, int64_t i) FASTTF_LAMBDA {
    constexpr int R = decltype(rows_tag)::value;
    const int64_t at = i * n;
    const bool streamed =
        stream && rows_aligned<S, T, W>(ds + at, n, R) && (dx == nullptr || rows_aligned<S, T, W>(dx + at, n, R));
    const int variant = (streamed ? 8 : 0) | (grad_s ? 4 : 0) | (dx ? 2 : 0) | (dw_part ? 1 : 0);
    const S* grad_s_i = grad_s ? grad_s + at : nullptr;
    const T* m_i = m ? m + at : nullptr;
    S* dx_i = dx ? dx + at : nullptr;
#define FASTTF_BACKWARD_CASE(k)                                                                                 \
  case k:                                                                                                       \
    add_norm_backward_rows_impl<S, T, W, R, (k & 4) != 0, (k & 2) != 0, (k & 1) != 0, (k & 8) != 0>(           \
        dy + at, s + at, grad_s_i, m_i, w, mean + i, rstd + i, ds + at, dx_i, dw_part, db_part, dy_buf, s_buf, n); \
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
      FASTTF_BACKWARD_CASE(8)
      FASTTF_BACKWARD_CASE(9)
      FASTTF_BACKWARD_CASE(10)
      FASTTF_BACKWARD_CASE(11)
      FASTTF_BACKWARD_CASE(12)
      FASTTF_BACKWARD_CASE(13)
      FASTTF_BACKWARD_CASE(14)
      FASTTF_BACKWARD_CASE(15)
    }
#undef FASTTF_BACKWARD_CASE
  };
  for_row_groups<T>(n, rows, group);
}

}  // namespace

#define FASTTF_NORM_ROWS_IMPL(S, T)                                                                                  \
  FASTTF_BY_WIDTH(S, T, add_norm_rows,                                                                               \
                  (const S* x, const S* residual, const T* m, const T* w, const T* b, T eps, S* s, S* out, T* s_buf,  \
                   T* mean, T* rstd, int64_t n, int64_t rows, bool stream),                                          \
                  (x, residual, m, w, b, eps, s, out, s_buf, mean, rstd, n, rows, stream))                            \
  FASTTF_BY_WIDTH(S, T, add_norm_backward_rows,                                                                      \
                  (const S* dy, const S* s, const S* grad_s, const T* m, const T* w, const T* mean, const T* rstd,    \
                   S* ds, S* dx, T* dw_part, T* db_part, T* dy_buf, T* s_buf, int64_t n, int64_t rows, bool stream),  \
                  (dy, s, grad_s, m, w, mean, rstd, ds, dx, dw_part, db_part, dy_buf, s_buf, n, rows, stream))

FASTTF_NORM_ROWS_IMPL(float, float)
FASTTF_NORM_ROWS_IMPL(double, double)
FASTTF_NORM_ROWS_IMPL(c10::BFloat16, float)
FASTTF_NORM_ROWS_IMPL(c10::Half, float)

}  // namespace cpu
}  // namespace fasttf
