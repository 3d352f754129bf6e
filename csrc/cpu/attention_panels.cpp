// The float32 block products on CPUs whose widest vectors are AVX2: a hand-written 6 x 16
// micro-kernel over a head's K and V, packed once per thread (attention.h, "Panels").
//
//   c[i][j] = alpha sum_t a[i][t] B[t][j] (+ c[i][j])       B: one panel of 16 columns, k rows
//   each step t: two 8-float rows of B loaded once, a[i][t] broadcast for 6 rows i,
//                12 FMAs into 12 accumulator registers (of 16)
//
// MKL's sgemm multiplies the same tiles at 80-86 GFLOP/s on one AMD EPYC (Zen 3) core, the
// micro-kernel at 95-98: MKL packs both operands of every call again (a key block's K once per
// query block), here a thread packs the K and V of a (batch, kv head) once, when its first task
// of that head starts, into the layout the micro-kernel streams (a head's worth of scratch per
// thread: the whole call's K and V packed up front had put 12 MiB more on the peak memory of a
// (2, 8, 1024, 64) forward+backward, 16 -> 28 MiB, against torch's 272 with dropout). On
// AVX-512 CPUs the products stay on MKL (its AVX-512 kernels; this one was not measured there).
#include <immintrin.h>

#include <algorithm>

#include "../ops.h"
#include "attention.h"
#include "simd.h"

namespace fasttf {
namespace cpu {
namespace attention {
namespace {

constexpr int64_t kPanel = 16;      // columns of a panel: two AVX2 vectors
constexpr int64_t kMinQueries = 32;  // query rows per kv head below which packing costs what it saves

int64_t panels_of(int64_t columns) { return (columns + kPanel - 1) / kPanel; }

// x [rows x dim] (row stride ld, unit stride along dim) into panels:
//   keys as columns: panel t = [dim][16], column c the row 16 t + c of x (X^T)
//   else:            panel t = [rows][16], column c the column 16 t + c of x (X)
// the columns past the last one zero.
void pack_head(const float* x, int64_t ld, int64_t rows, int64_t dim, bool keys_as_columns, float* dst) {
  if (keys_as_columns) {
    for (int64_t t = 0; t < panels_of(rows); ++t) {
      float* panel = dst + t * dim * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t row = t * kPanel + c;
        if (row < rows) {
          for (int64_t e = 0; e < dim; ++e) panel[e * kPanel + c] = x[row * ld + e];
        } else {
          for (int64_t e = 0; e < dim; ++e) panel[e * kPanel + c] = 0.0f;
        }
      }
    }
    return;
  }
  for (int64_t t = 0; t < panels_of(dim); ++t) {
    float* panel = dst + t * rows * kPanel;
    const int64_t columns = std::min(kPanel, dim - t * kPanel);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x + r * ld + t * kPanel;
      std::copy(src, src + columns, panel + r * kPanel);
      std::fill(panel + r * kPanel + columns, panel + (r + 1) * kPanel, 0.0f);
    }
  }
}

#if FASTTF_ISA_VERSIONS
#define FASTTF_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

// c[MR x 16] = alpha a[MR x k] panel (+ c); with kAllColumns false only the lanes set in mask0 / mask1
// (columns 0-7 / 8-15) are read and written, the others untouched.
template <int MR, bool kAllColumns>
FASTTF_AVX2_INLINE void micro_tile(int64_t k, const float* a, int64_t lda, const float* panel, float* c,
                                   int64_t ldc, float alpha, bool accumulate, __m256i mask0, __m256i mask1) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t t = 0; t < k; ++t) {
    const __m256 b0 = _mm256_loadu_ps(panel + t * kPanel), b1 = _mm256_loadu_ps(panel + t * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + t);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
    __m256 c0 = _mm256_mul_ps(acc[r][0], scale), c1 = _mm256_mul_ps(acc[r][1], scale);
    if constexpr (kAllColumns) {
      if (accumulate) c0 = _mm256_add_ps(c0, _mm256_loadu_ps(row)), c1 = _mm256_add_ps(c1, _mm256_loadu_ps(row + 8));
      _mm256_storeu_ps(row, c0), _mm256_storeu_ps(row + 8, c1);
    } else {
      if (accumulate) {
        c0 = _mm256_add_ps(c0, _mm256_maskload_ps(row, mask0));
        c1 = _mm256_add_ps(c1, _mm256_maskload_ps(row + 8, mask1));
      }
      _mm256_maskstore_ps(row, mask0, c0), _mm256_maskstore_ps(row + 8, mask1, c1);
    }
  }
}

// c[m x columns] (columns <= 16) = alpha a[m x k] panel (+ c): six rows at a time, then the rest.
template <bool kAllColumns>
FASTTF_AVX2_INLINE void panel_rows(int64_t m, int64_t k, const float* a, int64_t lda, const float* panel, float* c,
                                   int64_t ldc, float alpha, bool accumulate, __m256i mask0, __m256i mask1) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    micro_tile<6, kAllColumns>(k, a + i * lda, lda, panel, c + i * ldc, ldc, alpha, accumulate, mask0, mask1);
  const float* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: micro_tile<5, kAllColumns>(k, ai, lda, panel, ci, ldc, alpha, accumulate, mask0, mask1); break;
    case 4: micro_tile<4, kAllColumns>(k, ai, lda, panel, ci, ldc, alpha, accumulate, mask0, mask1); break;
    case 3: micro_tile<3, kAllColumns>(k, ai, lda, panel, ci, ldc, alpha, accumulate, mask0, mask1); break;
    case 2: micro_tile<2, kAllColumns>(k, ai, lda, panel, ci, ldc, alpha, accumulate, mask0, mask1); break;
    case 1: micro_tile<1, kAllColumns>(k, ai, lda, panel, ci, ldc, alpha, accumulate, mask0, mask1); break;
    default: break;
  }
}

// c[m x n] = alpha a[m x k] B (+ c), B the n columns of consecutive panels (panel_stride floats
// apart), each k rows of 16.
__attribute__((target("avx2,fma"))) void panels_product(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                                        int64_t lda, const float* panels, int64_t panel_stride,
                                                        bool accumulate, float* c, int64_t ldc) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t t = 0;
  for (; (t + 1) * kPanel <= n; ++t)
    panel_rows<true>(m, k, a, lda, panels + t * panel_stride, c + t * kPanel, ldc, alpha, accumulate, all, all);
  if (t * kPanel < n) {
    const int left = static_cast<int>(n - t * kPanel);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);
    const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(left - 8), lane);
    panel_rows<false>(m, k, a, lda, panels + t * panel_stride, c + t * kPanel, ldc, alpha, accumulate, mask0, mask1);
  }
}
#else
void panels_product(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, bool, float*,
                    int64_t) {
  TORCH_INTERNAL_ASSERT(false, "fasttf: the panel products need GCC on x86-64");
}
#endif

}  // namespace

bool panel_products(const Problem<float>& p) { return native_attention_panels() && p.L * p.group >= kMinQueries; }

Panels head_panels(const Problem<float>& p, bool values, bool keys_as_columns) {
  Panels x;
  x.values = values;
  x.dim = values ? p.Ev : p.E;
  x.keys_as_columns = keys_as_columns;
  x.panel_stride = keys_as_columns ? x.dim * kPanel : p.S * kPanel;
  x.data = scratch<float>((keys_as_columns ? panels_of(p.S) : panels_of(x.dim)) * x.panel_stride);
  return x;
}

void pack_panels(const Problem<float>& p, int64_t b, int64_t hk, Panels& x) {
  const int64_t bh = b * p.Hkv + hk;
  if (x.packed == bh) return;
  pack_head(x.values ? p.v_row(b, hk, 0) : p.k_row(b, hk, 0), x.values ? p.v_sl : p.k_sl, p.S, x.dim,
            x.keys_as_columns, x.data.get());
  x.packed = bh;
}

void panel_product(const Panels& x, const float* a, int64_t lda, int64_t rows, int64_t j0, int64_t n, float alpha,
                   float* c, int64_t ldc) {
  if (x.keys_as_columns) {
    TORCH_INTERNAL_ASSERT(j0 % kPanel == 0, "fasttf: a key block starts at a panel");
    panels_product(rows, n, x.dim, alpha, a, lda, x.data.get() + (j0 / kPanel) * x.panel_stride, x.panel_stride,
                   false, c, ldc);
  } else {
    panels_product(rows, x.dim, n, alpha, a, lda, x.data.get() + j0 * kPanel, x.panel_stride, true, c, ldc);
  }
}

}  // namespace attention

bool native_attention_panels() { return FASTTF_ISA_VERSIONS && has_avx2_fma() && !has_avx512(); }

}  // namespace cpu
}  // namespace fasttf
