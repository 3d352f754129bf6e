// The attention kernels' row passes over one tile row: mask bias, max, exp-and-sum, dropout
// multipliers (from dropout.cpp's Philox). The plain loops are compiled for AVX-512, AVX2 and
// x86-64 and picked at run time (FASTTF_PER_ISA, simd.h); exp-and-sum is written in
// AVX-512 and AVX2 intrinsics, chosen at run time.
//
// exp(x) for x <= 0 (scores minus their row max, or minus lse), in base 2:
//   t = x * log2(e),  n = round(t),  f = t - n in [-1/2, 1/2],  exp(x) = 2^n * p(f),
// p a degree-6 fit of 2^f (relative error 7e-8, about 1 ulp, in float32 Horner); t below -125
// gives 0 (so -inf gives exactly 0: masked keys carry no weight, and no result is subnormal);
// NaN stays NaN. AVX-512 applies 2^n with vscalefps, the others through the exponent bits.
// GCC 12's AVX-512 headers trip its own uninitialised-value warnings (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention.h"
#include "dropout.h"
#include "simd.h"

namespace fasttf {
namespace cpu {
namespace attention {
namespace {

// The constants of that exp, shared by the scalar and vector versions.
constexpr float kExp2Low = -125.0f;  // t below: 0
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Poly[7] = {1.4990888303e-4f, 1.3393083354e-3f, 9.6196737140e-3f, 5.5503472686e-2f,
                                2.4022637308e-1f, 6.9314718246e-1f, 1.0f};  // highest power first

inline float exp_nonpositive(float x) {
  const float t = x * kLog2e;
  if (!(t >= kExp2Low)) return t != t ? t : 0.0f;  // below the range (or -inf): 0; NaN stays
  const float n = std::nearbyint(t);
  const float f = t - n;
  float poly = kExp2Poly[0];
  for (int c = 1; c < 7; ++c) poly = poly * f + kExp2Poly[c];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return poly * two_n;
}

template <typename scalar_t>
inline float mask_value(const void* data, int64_t offset) {
  return static_cast<float>(static_cast<const scalar_t*>(data)[offset]);
}

// row[j] = keep[j] ? row[j] : -inf.
FASTTF_BODY void mask_row_body(float* row, const bool* keep, int64_t n) {
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(keep);
  for (int64_t j = 0; j < n; ++j) row[j] = bytes[j] != 0 ? row[j] : -std::numeric_limits<float>::infinity();
}
FASTTF_PER_ISA(void, mask_row, (float* row, const bool* keep, int64_t n), (row, keep, n))

void mask_row(double* row, const bool* keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] = keep[j] ? row[j] : -std::numeric_limits<double>::infinity();
}

// row[j] += bias[j].
FASTTF_BODY void add_row_body(float* row, const float* bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
}
FASTTF_PER_ISA(void, add_row, (float* row, const float* bias, int64_t n), (row, bias, n))

void add_row(double* row, const float* bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] += static_cast<double>(bias[j]);
}

}  // namespace

template <typename acc_t>
void add_bias(acc_t* row, int64_t n, const MaskView& mask, int64_t b, int64_t h, int64_t i, int64_t j0,
              bool causal) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (mask.kind != MaskView::kNone) {
    const int64_t base = b * mask.sb + h * mask.sh + i * mask.sl + j0 * mask.ss, ss = mask.ss;
    if (mask.kind == MaskView::kBool) {
      const bool* m = static_cast<const bool*>(mask.data) + base;
      if (ss == 1) {  // the common layout: vector blends, no branch on the (random) mask bits
        mask_row(row, m, n);
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = m[j * ss] ? row[j] : kNegInf;
      }
    } else {
      switch (mask.dtype) {
        case at::kFloat: {
          const float* m = static_cast<const float*>(mask.data) + base;
          if (ss == 1) {
            add_row(row, m, n);
          } else {
            for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(m[j * ss]);
          }
          break;
        }
        case at::kDouble: {
          const double* m = static_cast<const double*>(mask.data) + base;
          for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(m[j * ss]);
          break;
        }
        case at::kHalf:
          for (int64_t j = 0; j < n; ++j) row[j] += mask_value<at::Half>(mask.data, base + j * ss);
          break;
        case at::kBFloat16:
          for (int64_t j = 0; j < n; ++j) row[j] += mask_value<at::BFloat16>(mask.data, base + j * ss);
          break;
        default:
          TORCH_CHECK(false, "fasttf attention: attn_mask of an unsupported dtype");
      }
    }
  }
  if (causal) {
    for (int64_t j = std::max<int64_t>(i - j0 + 1, 0); j < n; ++j) row[j] = kNegInf;
  }
}

template void add_bias<float>(float*, int64_t, const MaskView&, int64_t, int64_t, int64_t, int64_t, bool);
template void add_bias<double>(double*, int64_t, const MaskView&, int64_t, int64_t, int64_t, int64_t, bool);

namespace {

// The max of a row (NaN ignored), four vector accumulators so the loop runs at load speed, not
// at vmaxps latency (one accumulator: 4 values a cycle, 3% of the forward at L=1024).
__attribute__((target("avx512f"))) float row_max_avx512(const float* x, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(x + j), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(x + j + 16), m1);
    m2 = _mm512_max_ps(_mm512_loadu_ps(x + j + 32), m2);
    m3 = _mm512_max_ps(_mm512_loadu_ps(x + j + 48), m3);
  }
  for (; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    m0 = _mm512_max_ps(_mm512_mask_loadu_ps(lowest, lanes, x + j), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// The same on eight lanes (AVX2): GCC leaves the plain loop below scalar (a max reduction needs
// -ffinite-math-only), which was 8% of the float32 forward at L=1024 on an AMD EPYC (Zen 3).
// _mm256_max_ps(a, b) gives b where a is NaN, so NaN is ignored as in the loop.
__attribute__((target("avx2"))) float row_max_avx2(const float* x, int64_t n) {
  const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + j), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + j + 8), m1);
    m2 = _mm256_max_ps(_mm256_loadu_ps(x + j + 16), m2);
    m3 = _mm256_max_ps(_mm256_loadu_ps(x + j + 24), m3);
  }
  for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(_mm256_loadu_ps(x + j), m0);
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  float m = lanes[0];
  for (int lane = 1; lane < 8; ++lane) m = lanes[lane] > m ? lanes[lane] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

float row_max_plain(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

}  // namespace

float row_max(const float* x, int64_t n) {
  if (has_avx512()) return row_max_avx512(x, n);
  return has_avx2_fma() ? row_max_avx2(x, n) : row_max_plain(x, n);
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

namespace {

// The same exp, eight lanes at a time (AVX2 + FMA); 2^n from the exponent bits.
__attribute__((target("avx2,fma"))) float exp_shift_sum_avx2(float* x, int64_t n, float m) {
  const __m256 shift = _mm256_set1_ps(m), low = _mm256_set1_ps(kExp2Low), log2e = _mm256_set1_ps(kLog2e);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift), log2e);
    const __m256 under = _mm256_cmp_ps(t, low, _CMP_LT_OQ);  // NaN: not under, stays NaN
    const __m256 whole = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, whole);
    __m256 poly = _mm256_set1_ps(kExp2Poly[0]);
    for (int c = 1; c < 7; ++c) poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(kExp2Poly[c]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_andnot_ps(under, _mm256_mul_ps(poly, _mm256_castsi256_ps(bits)));
    _mm256_storeu_ps(x + j, result);
    total = _mm256_add_ps(total, result);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, total);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - m);
    sum += x[j];
  }
  return sum;
}

// exp(x - m) of the lanes of x (0 in the others, and where the exponent is below the range; NaN
// stays NaN) in sixteen lanes (AVX-512), 2^f by the Horner polynomial `poly` (highest power first),
// 2^n by vscalefps: the float32 exp's body, and with a shorter polynomial the bfloat16 forward's.
template <int kTerms>
__attribute__((target("avx512f"), always_inline)) inline __m512 exp_shift_lanes(const float* x, __mmask16 lanes,
                                                                                __m512 shift,
                                                                                const float (&poly)[kTerms]) {
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x), shift), _mm512_set1_ps(kLog2e));
  const __mmask16 kept = _mm512_mask_cmp_ps_mask(lanes, t, _mm512_set1_ps(kExp2Low), _CMP_NLT_UQ);  // NaN: kept
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 value = _mm512_set1_ps(poly[0]);
  for (int c = 1; c < kTerms; ++c) value = _mm512_fmadd_ps(value, f, _mm512_set1_ps(poly[c]));
  return _mm512_maskz_scalef_ps(kept, value, whole);
}

// The row's tail through lane masks.
__attribute__((target("avx512f"))) float exp_shift_sum_avx512(float* x, int64_t n, float m) {
  const __m512 shift = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    const __m512 result = exp_shift_lanes(x + j, lanes, shift, kExp2Poly);
    _mm512_mask_storeu_ps(x + j, lanes, result);
    total = _mm512_add_ps(total, result);
  }
  return _mm512_reduce_add_ps(total);
}

// For the bfloat16 forward: exp(x - m) rounded to bfloat16 into out (vcvtneps2bf16: to nearest even;
// the results are 0 or at least 2^-125, never subnormal), summed unrounded; x is left as it was.
// Cheaper than the float32 exp, as good as 8 bits need: a degree-4 fit of 2^f (relative error 3.7e-6,
// 1 at f = 0). (t = x log2e - m log2e in one FMA would save an op but err by |m| 2^-24 in t: inf
// for scores of 1e11, test_huge_bfloat16_scores_give_no_nan.)
constexpr float kExp2PolyShort[5] = {9.5701003e-3f, 5.5917863e-2f, 2.4024744e-1f, 6.9312180e-1f, 1.0f};

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) float exp_shift_sum_bf16_avx512(const float* x,
                                                                                              int64_t n, float m,
                                                                                              uint16_t* out) {
  const __m512 shift = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    const __m512 result = exp_shift_lanes(x + j, lanes, shift, kExp2PolyShort);
    _mm256_mask_storeu_epi16(out + j, lanes, (__m256i)_mm512_cvtneps_pbh(result));
    total = _mm512_add_ps(total, result);
  }
  return _mm512_reduce_add_ps(total);
}

}  // namespace

float exp_shift_sum(const float* x, int64_t n, float m, at::BFloat16* out) {
  TORCH_INTERNAL_ASSERT(bf16_products());
  return exp_shift_sum_bf16_avx512(x, n, m, reinterpret_cast<uint16_t*>(out));
}

float exp_shift_sum(float* x, int64_t n, float m) {
  if (has_avx512()) return exp_shift_sum_avx512(x, n, m);
  if (has_avx2_fma()) return exp_shift_sum_avx2(x, n, m);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - m);
    sum += x[j];
  }
  return sum;
}

double exp_shift_sum(double* x, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = x[j] == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(x[j] - m);
    x[j] = e;
    sum += e;
  }
  return sum;
}

namespace {

FASTTF_BODY float row_dot_body(const float* a, const float* b, int64_t n) {
  float part[8] = {};  // lane t sums the j = t mod 8 (the compiler keeps them in one vector)
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int t = 0; t < 8; ++t) part[t] += a[j + t] * b[j + t];
  }
  for (int t = 0; j < n; ++j, ++t) part[t] += a[j] * b[j];
  return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}

FASTTF_BODY void flush_wide_body(float* part, double* sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<double>(part[j]);
  std::memset(part, 0, n * sizeof(float));
}

}  // namespace

FASTTF_PER_ISA(float, row_dot, (const float* a, const float* b, int64_t n), (a, b, n))

double row_dot(const double* a, const double* b, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

FASTTF_PER_ISA(void, flush_wide, (float* part, double* sum, int64_t n), (part, sum, n))

namespace {

template <typename T>
FASTTF_BODY void softmax_grad_row_body(const T* p, T* dp, T d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}

}  // namespace

FASTTF_PER_ISA(void, softmax_grad_row, (const float* p, float* dp, float d, int64_t n), (p, dp, d, n))

void softmax_grad_row(const double* p, double* dp, double d, int64_t n) { softmax_grad_row_body(p, dp, d, n); }

void softmax_grad_row_dropout(const DropoutSpec& dropout, int64_t start, const float* p, float* pz, float* dp, float d,
                              int64_t n, float*) {
  dropout_softmax_grad(dropout.seed, start, n, dropout.threshold, static_cast<float>(dropout.scale), p, pz, dp, d);
}

void softmax_grad_row_dropout(const DropoutSpec& dropout, int64_t start, const double* p, double* pz, double* dp,
                              double d, int64_t n, double* z) {
  dropout_row(dropout, start, n, z);
  for (int64_t j = 0; j < n; ++j) {
    pz[j] = p[j] * z[j];
    dp[j] = p[j] * (dp[j] * z[j] - d);
  }
}

void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, float* z) {
  dropout_multipliers(d.seed, start, n, d.threshold, static_cast<float>(d.scale), z);
}

void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, double* z) {
  dropout_multipliers(d.seed, start, n, d.threshold, d.scale, z);
}

void apply_dropout(const DropoutSpec& d, int64_t start, int64_t n, float* row, float*) {
  dropout_apply(d.seed, start, n, d.threshold, static_cast<float>(d.scale), row);
}

void apply_dropout(const DropoutSpec& d, int64_t start, int64_t n, double* row, double* z) {
  dropout_row(d, start, n, z);
  for (int64_t j = 0; j < n; ++j) row[j] *= z[j];
}

namespace {

// dst[j] = src[j] rounded to bfloat16, to nearest even (NaN stays NaN), the bits of c10::BFloat16(x)
// in integer ops the compiler vectorises.
FASTTF_BODY void round_row_plain_body(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, src + j, sizeof(bits));
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[j] = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
  }
}
FASTTF_PER_ISA(void, round_row_plain, (const float* src, uint16_t* dst, int64_t n), (src, dst, n))

// round_row_plain's integer rounding on 16 lanes of AVX-512 written out (the compiler's version of
// the loop above ran 8 lanes of AVX2 instructions and was 9% of a bfloat16 forward+backward):
// the same bits, NaN to 0x7fc0, subnormals kept (VCVTNEPS2BF16 would flush them).
// (AVX-512F only, like has_avx512's check.)
__attribute__((target("avx512f"))) __m512i round_lanes(__m512i bits) {
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
}

__attribute__((target("avx512f"))) void round_row_lanes(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i packed = _mm512_cvtepi32_epi16(round_lanes(_mm512_loadu_si512(src + j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), packed);
  }
  if (j < n) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm512_mask_cvtepi32_storeu_epi16(dst + j, lanes, round_lanes(_mm512_maskz_loadu_epi32(lanes, src + j)));
  }
}

void round_row(const float* src, uint16_t* dst, int64_t n) {
  if (has_avx512()) {
    round_row_lanes(src, dst, n);
  } else {
    round_row_plain(src, dst, n);
  }
}

}  // namespace

FASTTF_BODY void scale_row_body(float* row, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) row[j] *= scale;
}
FASTTF_PER_ISA(void, scale_row, (float* row, int64_t n, float scale), (row, n, scale))

namespace {

// row *= scale, and the max of the result (NaN ignored), in one pass: four accumulators as row_max.
__attribute__((target("avx512f"))) float scale_row_max_avx512(float* x, int64_t n, float scale) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), factor = _mm512_set1_ps(scale);
  __m512 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(x + j), factor);
    const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(x + j + 16), factor);
    const __m512 c = _mm512_mul_ps(_mm512_loadu_ps(x + j + 32), factor);
    const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(x + j + 48), factor);
    _mm512_storeu_ps(x + j, a), _mm512_storeu_ps(x + j + 16, b);
    _mm512_storeu_ps(x + j + 32, c), _mm512_storeu_ps(x + j + 48, d);
    m0 = _mm512_max_ps(a, m0), m1 = _mm512_max_ps(b, m1), m2 = _mm512_max_ps(c, m2), m3 = _mm512_max_ps(d, m3);
  }
  for (; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + j), factor);
    _mm512_mask_storeu_ps(x + j, lanes, a);
    m0 = _mm512_max_ps(_mm512_mask_blend_ps(lanes, lowest, a), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

}  // namespace

float scale_row_max(float* row, int64_t n, float scale) {
  if (has_avx512()) return scale_row_max_avx512(row, n, scale);
  scale_row(row, n, scale);
  return row_max(row, n);
}

void round_rows(const float* src, at::BFloat16* dst, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) round_row(src + r * ld, reinterpret_cast<uint16_t*>(dst + r * ld), n);
}

void keep_row(const DropoutSpec& d, int64_t start, int64_t n, bool* keep) {
  if (d.scale == 0.0) {  // dropout_p = 1: nothing kept (the threshold 2^32 has no uint32)
    std::fill(keep, keep + n, false);
    return;
  }
  dropout_keep_bytes(d.seed, start, n, d.threshold, keep);
}

}  // namespace attention

at::Tensor round_to_bfloat16(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "fasttf._round_to_bfloat16: expected a float32 ",
              "CPU tensor");
  const auto src = x.contiguous();
  auto out = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
  attention::round_rows(src.data_ptr<float>(), out.data_ptr<at::BFloat16>(), 1, src.numel(), src.numel());
  return out;
}

}  // namespace cpu
}  // namespace fasttf
