// Dropout multipliers and keep masks from Philox4x32-10 (see ../philox.h and dropout.h).
//
// Three generators of the same words: 64 independent blocks in plain loops the compiler vectorises
// (FASTTF_PER_ISA; the double multipliers and keep bytes, and float on CPUs without AVX2), and for
// float multipliers on AVX-512 sixteen blocks as two sets of eight 64-bit lanes (see PhiloxLanes),
// on AVX2 twelve blocks as three sets of four, the keep bits compared in registers and interleaved
// back into element order (element 4 t + w is word w of block t); the AVX generators hand their
// multipliers, still in registers, to an op: store them, scale a row by them, or the attention
// backward's softmax gradient through dropout (no multiplier buffer: ~1.6% of its backward at
// (2, 8, 1024, 64), 1 thread).
#include "dropout.h"

// GCC 12's AVX-512 headers trip its own uninitialised-value warnings (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "../philox.h"
#include "simd.h"


namespace fasttf {
namespace cpu {
namespace {

constexpr int64_t kBlocksPerBatch = 64;  // 256 words: independent Philox blocks the compiler vectorises

// words[j] = philox word of element (first_block * 4 + j), for `blocks` whole blocks.
template <int64_t kBlocks>
__attribute__((always_inline)) inline void philox_words(uint64_t seed, uint64_t first_block, uint32_t* words) {
  uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int64_t b = 0; b < kBlocks; ++b) {
    const uint64_t block = first_block + static_cast<uint64_t>(b);
    c0[b] = static_cast<uint32_t>(block);
    c1[b] = static_cast<uint32_t>(block >> 32);
    c2[b] = 0u;
    c3[b] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t b = 0; b < kBlocks; ++b) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[b];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[b];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[b] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[b] ^ k1;
      c1[b] = static_cast<uint32_t>(p1);
      c3[b] = static_cast<uint32_t>(p0);
      c0[b] = n0;
      c2[b] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int64_t b = 0; b < kBlocks; ++b) {
    words[4 * b] = c0[b];
    words[4 * b + 1] = c1[b];
    words[4 * b + 2] = c2[b];
    words[4 * b + 3] = c3[b];
  }
}

// Calls emit(j, word) for j in [0, n), word = the Philox word of element start + j.
template <typename Emit>
__attribute__((always_inline)) inline void for_each_word(uint64_t seed, int64_t start, int64_t n, Emit emit) {
  uint32_t words[4 * kBlocksPerBatch];
  int64_t done = 0;
  while (done < n) {
    const int64_t index = start + done;
    const uint64_t first_block = static_cast<uint64_t>(index) >> 2;
    const int64_t skip = index & 3;
    philox_words<kBlocksPerBatch>(seed, first_block, words);
    int64_t take = 4 * kBlocksPerBatch - skip;
    if (take > n - done) take = n - done;
    for (int64_t j = 0; j < take; ++j) emit(done + j, words[skip + j]);
    done += take;
  }
}

FASTTF_BODY void multipliers_vectorised_body(uint64_t seed, int64_t start, int64_t n, uint32_t threshold,
                                             float scale, float* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold ? scale : 0.0f; });
}
FASTTF_PER_ISA(void, multipliers_vectorised,
               (uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* out),
               (seed, start, n, threshold, scale, out))

FASTTF_BODY void scale_vectorised_body(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale,
                                       const float* x, float* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = x[j] * (word >= threshold ? scale : 0.0f); });
}
FASTTF_PER_ISA(void, scale_vectorised,
               (uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, const float* x, float* out),
               (seed, start, n, threshold, scale, x, out))

FASTTF_BODY void softmax_grad_vectorised_body(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale,
                                              const float* p, float* pz, float* dp, float d) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) {
    const float z = word >= threshold ? scale : 0.0f;
    pz[j] = p[j] * z;
    dp[j] = p[j] * (dp[j] * z - d);
  });
}
FASTTF_PER_ISA(void, softmax_grad_vectorised,
               (uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, const float* p, float* pz,
                float* dp, float d),
               (seed, start, n, threshold, scale, p, pz, dp, d))

FASTTF_BODY void dropout_multipliers_body(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, double scale,
                                          double* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold ? scale : 0.0; });
}

FASTTF_BODY void dropout_keep_bytes_body(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, bool* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold; });
}

#if defined(__x86_64__)
#define FASTTF_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define FASTTF_AVX2 __attribute__((target("avx2"), always_inline)) inline

// What a generator does with the multipliers z of the call's elements j ... (16 at a time on
// AVX-512, 8 on AVX2, or one): the ops of dropout.h, all with z in registers.
struct FillOp {  // out = z
  float* out;
  FASTTF_AVX512 void put(int64_t j, __m512 z) const { _mm512_storeu_ps(out + j, z); }
  FASTTF_AVX2 void put(int64_t j, __m256 z) const { _mm256_storeu_ps(out + j, z); }
  void put(int64_t j, float z) const { out[j] = z; }
};
struct ScaleOp {  // out = x z (x may be out)
  const float* x;
  float* out;
  FASTTF_AVX512 void put(int64_t j, __m512 z) const {
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), z));
  }
  FASTTF_AVX2 void put(int64_t j, __m256 z) const {
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), z));
  }
  void put(int64_t j, float z) const { out[j] = x[j] * z; }
};
struct SoftmaxGradOp {  // pz = p z, dp = p (dp z - d)
  const float* p;
  float* pz;
  float* dp;
  float d;
  FASTTF_AVX512 void put(int64_t j, __m512 z) const {
    const __m512 pj = _mm512_loadu_ps(p + j);
    _mm512_storeu_ps(pz + j, _mm512_mul_ps(pj, z));
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(pj, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(dp + j), z),
                                                             _mm512_set1_ps(d))));
  }
  FASTTF_AVX2 void put(int64_t j, __m256 z) const {
    const __m256 pj = _mm256_loadu_ps(p + j);
    _mm256_storeu_ps(pz + j, _mm256_mul_ps(pj, z));
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(pj, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(dp + j), z),
                                                             _mm256_set1_ps(d))));
  }
  void put(int64_t j, float z) const {
    pz[j] = p[j] * z;
    dp[j] = p[j] * (dp[j] * z - d);
  }
};

// Philox4x32-10 of eight consecutive blocks, one per 64-bit lane, each counter word in the low half
// of its lane: vpmuludq multiplies the low halves into a full 64-bit product (lo, hi) with no
// shuffles, and what the high halves carry never reaches a low half (they are only xor-ed and
// shifted away), so they are left as they fall.
struct PhiloxLanes {
  __m512i c0, c1, c2, c3;
};

FASTTF_AVX512 PhiloxLanes philox_start(uint64_t first_block) {
  const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first_block)),
                                         _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  return {block, _mm512_srli_epi64(block, 32), _mm512_setzero_si512(), _mm512_setzero_si512()};
}

FASTTF_AVX512 void philox_round(PhiloxLanes& x, __m512i k0, __m512i k1) {
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
  const __m512i p0 = _mm512_mul_epu32(x.c0, m0), p1 = _mm512_mul_epu32(x.c2, m1);
  x.c0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), x.c1), k0);
  x.c2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), x.c3), k1);
  x.c1 = p1;
  x.c3 = p0;
}

// The 32 multipliers of those eight blocks in element order (element 4 t + w = word w of block t):
// words (w0, w1) and (w2, w3) paired in 64-bit lanes, the pairs interleaved block by block.
FASTTF_AVX512 void philox_multipliers(const PhiloxLanes& x, __m512i limit, __m512 kept, __m512* first,
                                      __m512* second) {
  const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, x.c0, _mm512_slli_epi64(x.c1, 32));
  const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, x.c2, _mm512_slli_epi64(x.c3, 32));
  const __m512i lo = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), w23);
  const __m512i hi = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), w23);
  *first = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(lo, limit), kept);
  *second = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(hi, limit), kept);
}

// z[0..63]: the multipliers of elements 4 first_block ... 4 first_block + 63 (sixteen blocks, in
// two independent sets of eight for the multiplier's latency).
FASTTF_AVX512 void multipliers64(uint64_t seed, uint64_t first_block, uint32_t threshold, float scale, __m512 z[4]) {
  PhiloxLanes a = philox_start(first_block), b = philox_start(first_block + 8);
  __m512i k0 = _mm512_set1_epi64(static_cast<uint32_t>(seed)), k1 = _mm512_set1_epi64(static_cast<uint32_t>(seed >> 32));
  const __m512i w0 = _mm512_set1_epi64(0x9E3779B9), w1 = _mm512_set1_epi64(0xBB67AE85);
  for (int round = 0; round < 10; ++round) {
    philox_round(a, k0, k1);
    philox_round(b, k0, k1);
    k0 = _mm512_add_epi32(k0, w0);  // 32-bit lanes: the key's low half wraps like a uint32
    k1 = _mm512_add_epi32(k1, w1);
  }
  const __m512i limit = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 kept = _mm512_set1_ps(scale);
  philox_multipliers(a, limit, kept, &z[0], &z[1]);
  philox_multipliers(b, limit, kept, &z[2], &z[3]);
}

// op.put(j, multipliers of elements start + j ...) for j < n.
template <typename Op>
__attribute__((target("avx512f"))) void multipliers_avx512(uint64_t seed, int64_t start, int64_t n, uint32_t threshold,
                                                           float scale, const Op& op) {
  alignas(64) float batch[64];
  __m512 z[4];
  int64_t done = 0;
  while (done < n) {
    const int64_t index = start + done, skip = index & 3;
    const int64_t take = std::min<int64_t>(64 - skip, n - done);
    multipliers64(seed, static_cast<uint64_t>(index) >> 2, threshold, scale, z);
    if (skip == 0 && take == 64) {
      for (int q = 0; q < 4; ++q) op.put(done + 16 * q, z[q]);
    } else {
      for (int q = 0; q < 4; ++q) _mm512_store_ps(batch + 16 * q, z[q]);
      for (int64_t j = 0; j < take; ++j) op.put(done + j, batch[skip + j]);
    }
    done += take;
  }
}

// The same on AVX2: four blocks a register (64-bit lanes, words in the low halves as above), two
// independent sets; AVX2 has no unsigned compare, so word >= limit is max(word, limit) == word.

struct PhiloxLanes4 {
  __m256i c0, c1, c2, c3;
};

FASTTF_AVX2 PhiloxLanes4 philox_start4(uint64_t first_block) {
  const __m256i block = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first_block)),
                                         _mm256_setr_epi64x(0, 1, 2, 3));
  return {block, _mm256_srli_epi64(block, 32), _mm256_setzero_si256(), _mm256_setzero_si256()};
}

FASTTF_AVX2 void philox_round4(PhiloxLanes4& x, __m256i k0, __m256i k1) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
  const __m256i p0 = _mm256_mul_epu32(x.c0, m0), p1 = _mm256_mul_epu32(x.c2, m1);
  x.c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x.c1), k0);
  x.c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x.c3), k1);
  x.c1 = p1;
  x.c3 = p0;
}

// The 16 multipliers of those four blocks in element order: (w0, w1) and (w2, w3) paired in 64-bit
// lanes, then blocks 0-1 and 2-3 gathered from the two registers' 128-bit halves.
FASTTF_AVX2 void philox_multipliers4(const PhiloxLanes4& x, __m256i limit, __m256 kept, __m256* first,
                                     __m256* second) {
  const __m256i w01 = _mm256_blend_epi32(x.c0, _mm256_slli_epi64(x.c1, 32), 0xAA);
  const __m256i w23 = _mm256_blend_epi32(x.c2, _mm256_slli_epi64(x.c3, 32), 0xAA);
  const __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
  const __m256i lo = _mm256_permute2x128_si256(even, odd, 0x20), hi = _mm256_permute2x128_si256(even, odd, 0x31);
  const __m256i keep_lo = _mm256_cmpeq_epi32(_mm256_max_epu32(lo, limit), lo);
  const __m256i keep_hi = _mm256_cmpeq_epi32(_mm256_max_epu32(hi, limit), hi);
  *first = _mm256_and_ps(_mm256_castsi256_ps(keep_lo), kept);
  *second = _mm256_and_ps(_mm256_castsi256_ps(keep_hi), kept);
}

// The AVX2 generator's batch: kAvx2Sets independent sets of four blocks. A round is a chain of
// vpmuludq, vpsrlq and two vpxor (~6 cycles) holding 8 instructions a set for four vector pipes
// (2 cycles a set), so two sets left the pipes a third idle and three fill them. Measured on an AMD
// EPYC (Zen 3), dropout_apply over rows of 512: 0.81 ns an element with two sets, 0.73 with three,
// 1.08 with four (16 registers of state, spilled).
constexpr int kAvx2Sets = 3;
constexpr int64_t kAvx2Batch = 16 * kAvx2Sets;  // elements

// z[0 .. 2 kAvx2Sets): the multipliers of elements 4 first_block ... 4 first_block + kAvx2Batch - 1.
FASTTF_AVX2 void multipliers_batch(uint64_t seed, uint64_t first_block, uint32_t threshold, float scale, __m256 z[]) {
  PhiloxLanes4 sets[kAvx2Sets];
  for (int s = 0; s < kAvx2Sets; ++s) sets[s] = philox_start4(first_block + 4 * s);
  __m256i k0 = _mm256_set1_epi64x(static_cast<uint32_t>(seed)), k1 = _mm256_set1_epi64x(static_cast<uint32_t>(seed >> 32));
  const __m256i w0 = _mm256_set1_epi64x(0x9E3779B9), w1 = _mm256_set1_epi64x(0xBB67AE85);
  for (int round = 0; round < 10; ++round) {
    for (int s = 0; s < kAvx2Sets; ++s) philox_round4(sets[s], k0, k1);
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  const __m256i limit = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256 kept = _mm256_set1_ps(scale);
  for (int s = 0; s < kAvx2Sets; ++s) philox_multipliers4(sets[s], limit, kept, &z[2 * s], &z[2 * s + 1]);
}

// multipliers_avx512's loop at AVX2 width (a shared template cannot hold both: GCC refuses to inline
// target-specific intrinsics into a function, or a lambda, compiled for another target).
template <typename Op>
__attribute__((target("avx2"))) void multipliers_avx2(uint64_t seed, int64_t start, int64_t n, uint32_t threshold,
                                                      float scale, const Op& op) {
  alignas(32) float batch[kAvx2Batch];
  __m256 z[2 * kAvx2Sets];
  int64_t done = 0;
  while (done < n) {
    const int64_t index = start + done, skip = index & 3;
    const int64_t take = std::min<int64_t>(kAvx2Batch - skip, n - done);
    multipliers_batch(seed, static_cast<uint64_t>(index) >> 2, threshold, scale, z);
    int64_t j = 0;  // whole vectors where the batch starts on its first element
    for (int q = 0; skip == 0 && j + 8 <= take; ++q, j += 8) op.put(done + j, z[q]);
    if (j < take) {  // the rest one value at a time
      for (int q = 0; q < 2 * kAvx2Sets; ++q) _mm256_store_ps(batch + 8 * q, z[q]);
      for (; j < take; ++j) op.put(done + j, batch[skip + j]);
    }
    done += take;
  }
}
#endif

}  // namespace

void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* out) {
#if defined(__x86_64__)
  if (has_avx512()) return multipliers_avx512(seed, start, n, threshold, scale, FillOp{out});
  if (has_avx2_fma()) return multipliers_avx2(seed, start, n, threshold, scale, FillOp{out});
#endif
  multipliers_vectorised(seed, start, n, threshold, scale, out);
}

void dropout_scale(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, const float* x,
                   float* out) {
#if defined(__x86_64__)
  if (has_avx512()) return multipliers_avx512(seed, start, n, threshold, scale, ScaleOp{x, out});
  if (has_avx2_fma()) return multipliers_avx2(seed, start, n, threshold, scale, ScaleOp{x, out});
#endif
  scale_vectorised(seed, start, n, threshold, scale, x, out);
}

void dropout_softmax_grad(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, const float* p,
                          float* pz, float* dp, float d) {
#if defined(__x86_64__)
  if (has_avx512()) return multipliers_avx512(seed, start, n, threshold, scale, SoftmaxGradOp{p, pz, dp, d});
  if (has_avx2_fma()) return multipliers_avx2(seed, start, n, threshold, scale, SoftmaxGradOp{p, pz, dp, d});
#endif
  softmax_grad_vectorised(seed, start, n, threshold, scale, p, pz, dp, d);
}

void dropout_apply(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* x) {
  dropout_scale(seed, start, n, threshold, scale, x, x);
}

FASTTF_PER_ISA(void, dropout_multipliers,
               (uint64_t seed, int64_t start, int64_t n, uint32_t threshold, double scale, double* out),
               (seed, start, n, threshold, scale, out))

FASTTF_PER_ISA(void, dropout_keep_bytes, (uint64_t seed, int64_t start, int64_t n, uint32_t threshold, bool* out),
               (seed, start, n, threshold, out))

}  // namespace cpu
}  // namespace fasttf
