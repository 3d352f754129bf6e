// The attention kernels' row passes over one tile row: mask bias, max, exp-and-sum, dropout
// multipliers. The float loops are omp simd, compiled for AVX-512, AVX2 and plain x86-64 and
// picked when the library loads (GCC target_clones), like the other CPU ops' row math.
//
// exp(x) for x <= 0 (scores minus their row max, or minus lse): x = n ln2 + r, |r| <= ln2 / 2,
// exp(x) = 2^n * poly(r), the Cephes expf polynomial (about 1 ulp); x below -87 gives 0 (and
// -inf gives exactly 0, so masked keys carry no weight).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "../philox.h"
#include "attention.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTTF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTTF_CLONES
#endif

namespace fasttf {
namespace cpu {
namespace attention {
namespace {

inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e = poly * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : e * two_n;
}

template <typename scalar_t>
inline float mask_value(const void* data, int64_t offset) {
  return static_cast<float>(static_cast<const scalar_t*>(data)[offset]);
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
      if (ss == 1) {  // the common layout: a loop the compiler vectorises
        for (int64_t j = 0; j < n; ++j) row[j] = m[j] ? row[j] : kNegInf;
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = m[j * ss] ? row[j] : kNegInf;
      }
    } else {
      switch (mask.dtype) {
        case at::kFloat: {
          const float* m = static_cast<const float*>(mask.data) + base;
          if (ss == 1) {
            for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(m[j]);
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

FASTTF_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

namespace {

// The same exp, eight lanes at a time (AVX2 + FMA): round-to-nearest n, the Cephes polynomial, 2^n
// from the exponent bits; lanes below -87 give 0.
__attribute__((target("avx2,fma"))) float exp_shift_sum_avx2(float* x, int64_t n, float m) {
  const __m256 shift = _mm256_set1_ps(m), low = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f), one = _mm256_set1_ps(1.0f);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + j), shift);
    const __m256 under = _mm256_cmp_ps(v, low, _CMP_LT_OQ);
    v = _mm256_max_ps(v, low);
    const __m256 fn = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fn, c1, v);
    r = _mm256_fnmadd_ps(fn, c2, r);
    __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 e = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_andnot_ps(under, _mm256_mul_ps(e, _mm256_castsi256_ps(bits)));
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

bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  return yes;
}

}  // namespace

float exp_shift_sum(float* x, int64_t n, float m) {
  if (has_avx2()) return exp_shift_sum_avx2(x, n, m);
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

constexpr int64_t kBatchBlocks = 16;  // Philox blocks (4 words each) generated side by side

// words[w] = the Philox word of element first_block * 4 + w, for kBatchBlocks blocks.
__attribute__((always_inline)) inline void philox_batch(uint64_t seed, uint64_t first_block, uint32_t* words) {
  uint32_t c0[kBatchBlocks], c1[kBatchBlocks], c2[kBatchBlocks], c3[kBatchBlocks];
  for (int64_t t = 0; t < kBatchBlocks; ++t) {
    const uint64_t block = first_block + static_cast<uint64_t>(t);
    c0[t] = static_cast<uint32_t>(block), c1[t] = static_cast<uint32_t>(block >> 32), c2[t] = 0u, c3[t] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t t = 0; t < kBatchBlocks; ++t) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[t];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[t];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[t] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[t] ^ k1;
      c1[t] = static_cast<uint32_t>(p1), c3[t] = static_cast<uint32_t>(p0), c0[t] = n0, c2[t] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int64_t t = 0; t < kBatchBlocks; ++t) {
    words[4 * t] = c0[t], words[4 * t + 1] = c1[t], words[4 * t + 2] = c2[t], words[4 * t + 3] = c3[t];
  }
}

// emit(j, word) for j in [0, n): word = the Philox word of element start + j (csrc/philox.h).
template <typename Emit>
__attribute__((always_inline)) inline void for_each_word(uint64_t seed, int64_t start, int64_t n, Emit emit) {
  uint32_t words[4 * kBatchBlocks];
  int64_t done = 0;
  while (done < n) {
    const int64_t index = start + done, skip = index & 3;
    philox_batch(seed, static_cast<uint64_t>(index) >> 2, words);
    const int64_t take = std::min<int64_t>(4 * kBatchBlocks - skip, n - done);
    for (int64_t j = 0; j < take; ++j) emit(done + j, words[skip + j]);
    done += take;
  }
}

}  // namespace

namespace {

// 32-bit a * b -> (low, high) halves, eight lanes.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i b, __m256i* lo, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Philox4x32-10 of eight consecutive blocks (csrc/philox.h), eight lanes: words[4 t + w] = word w of
// block first_block + t.
__attribute__((target("avx2"))) void philox8(uint64_t seed, uint64_t first_block, uint32_t* words) {
  alignas(32) uint32_t lo_words[8], hi_words[8];
  for (int t = 0; t < 8; ++t) {
    lo_words[t] = static_cast<uint32_t>(first_block + t);
    hi_words[t] = static_cast<uint32_t>((first_block + t) >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_words));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i lo0, hi0, lo1, hi1;
    mulhilo8(m0, c0, &lo0, &hi0);
    mulhilo8(m1, c2, &lo1, &hi1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  alignas(32) uint32_t w[4][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[0]), c0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[1]), c1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[2]), c2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[3]), c3);
  for (int t = 0; t < 8; ++t) {
    words[4 * t] = w[0][t], words[4 * t + 1] = w[1][t], words[4 * t + 2] = w[2][t], words[4 * t + 3] = w[3][t];
  }
}

}  // namespace

void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, float* z) {
  const uint32_t threshold = d.threshold;
  const float scale = static_cast<float>(d.scale);
  if (!has_avx2()) {
    for_each_word(d.seed, start, n, [&](int64_t j, uint32_t w) { z[j] = w >= threshold ? scale : 0.0f; });
    return;
  }
  uint32_t words[32];
  int64_t done = 0;
  while (done < n) {
    const int64_t index = start + done, skip = index & 3;
    philox8(d.seed, static_cast<uint64_t>(index) >> 2, words);
    const int64_t take = std::min<int64_t>(32 - skip, n - done);
    for (int64_t j = 0; j < take; ++j) z[done + j] = words[skip + j] >= threshold ? scale : 0.0f;
    done += take;
  }
}

void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, double* z) {
  const uint32_t threshold = d.threshold;
  for_each_word(d.seed, start, n, [&](int64_t j, uint32_t w) { z[j] = w >= threshold ? d.scale : 0.0; });
}

FASTTF_CLONES void keep_row(const DropoutSpec& d, int64_t start, int64_t n, bool* keep) {
  const uint32_t threshold = d.threshold;
  const bool none_kept = d.scale == 0.0;  // dropout_p = 1
  for_each_word(d.seed, start, n, [&](int64_t j, uint32_t w) { keep[j] = !none_kept && w >= threshold; });
}

}  // namespace attention
}  // namespace cpu
}  // namespace fasttf
