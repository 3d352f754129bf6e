// The attention kernels' row passes over one tile row: mask bias, max, exp-and-sum, dropout
// multipliers. The float loops are omp simd, compiled for AVX-512, AVX2 and plain x86-64 and
// picked when the library loads (GCC target_clones), like the other CPU ops' row math.
//
// exp(x) for x <= 0 (scores minus their row max, or minus lse): x = n ln2 + r, |r| <= ln2 / 2,
// exp(x) = 2^n * poly(r), the Cephes expf polynomial (about 1 ulp); x below -87 gives 0 (and
// -inf gives exactly 0, so masked keys carry no weight).
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
      for (int64_t j = 0; j < n; ++j) row[j] = m[j * ss] ? row[j] : kNegInf;
    } else {
      switch (mask.dtype) {
        case at::kFloat: {
          const float* m = static_cast<const float*>(mask.data) + base;
          for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(m[j * ss]);
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

FASTTF_CLONES float exp_shift_sum(float* x, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(x[j] - m);
    x[j] = e;
    sum += e;
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

FASTTF_CLONES void dropout_row(const DropoutSpec& d, int64_t start, int64_t n, float* z) {
  const uint32_t threshold = d.threshold;
  const float scale = static_cast<float>(d.scale);
  for_each_word(d.seed, start, n, [&](int64_t j, uint32_t w) { z[j] = w >= threshold ? scale : 0.0f; });
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
