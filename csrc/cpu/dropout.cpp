// Dropout multipliers and keep masks from Philox4x32-10 (see ../philox.h and dropout.h).
//
// Two generators of the same words: 64 independent blocks in plain loops the compiler vectorises
// (FASTTF_CLONES), and on AVX-512 sixteen blocks in the lanes of four registers (one per word),
// the 32x32 -> 64-bit products from vpmuludq on the even and odd lanes, the keep bits compared in
// the registers and the four word vectors interleaved back into element order (element 4 t + w
// is word w of block t) with two rounds of two-source permutes.
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

FASTTF_CLONES void multipliers_vectorised(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale,
                                          float* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold ? scale : 0.0f; });
}

#if defined(__x86_64__)
#define FASTTF_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// (lo, hi) = the low and high 32 bits of a * b, lane by lane.
FASTTF_AVX512 void mulhilo16(__m512i a, __m512i b, __m512i* lo, __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// out[4 t + w] = (word w of block first_block + t) >= threshold ? scale : 0, for t < 16.
__attribute__((target("avx512f"))) void multipliers64_avx512(uint64_t seed, uint64_t first_block, uint32_t threshold,
                                                             float scale, float* out) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block)));
  __m512i c0 = _mm512_add_epi32(base, lanes);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base);  // the low word wrapped
  const __m512i high = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block >> 32)));
  __m512i c1 = _mm512_mask_add_epi32(high, carry, high, _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i lo0, hi0, lo1, hi1;
    mulhilo16(m0, c0, &lo0, &hi0);
    mulhilo16(m1, c2, &lo1, &hi1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i limit = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 kept = _mm512_set1_ps(scale);
  const __m512 z0 = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(c0, limit), kept);
  const __m512 z1 = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(c1, limit), kept);
  const __m512 z2 = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(c2, limit), kept);
  const __m512 z3 = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(c3, limit), kept);
  // Pairs: u = (z0[t], z1[t]) and v = (z2[t], z3[t]) for t < 8 (lo) and t >= 8 (hi); then quads.
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i quad_lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  const __m512i quad_hi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
  const __m512 u_lo = _mm512_permutex2var_ps(z0, pair_lo, z1), u_hi = _mm512_permutex2var_ps(z0, pair_hi, z1);
  const __m512 v_lo = _mm512_permutex2var_ps(z2, pair_lo, z3), v_hi = _mm512_permutex2var_ps(z2, pair_hi, z3);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(u_lo, quad_lo, v_lo));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(u_lo, quad_hi, v_lo));
  _mm512_storeu_ps(out + 32, _mm512_permutex2var_ps(u_hi, quad_lo, v_hi));
  _mm512_storeu_ps(out + 48, _mm512_permutex2var_ps(u_hi, quad_hi, v_hi));
}

void multipliers_avx512(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* out) {
  alignas(64) float batch[64];
  int64_t done = 0;
  while (done < n) {
    const int64_t index = start + done, skip = index & 3;
    const int64_t take = std::min<int64_t>(64 - skip, n - done);
    if (skip == 0 && take == 64) {
      multipliers64_avx512(seed, static_cast<uint64_t>(index) >> 2, threshold, scale, out + done);
    } else {
      multipliers64_avx512(seed, static_cast<uint64_t>(index) >> 2, threshold, scale, batch);
      std::memcpy(out + done, batch + skip, take * sizeof(float));
    }
    done += take;
  }
}
#endif

}  // namespace

void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* out) {
#if defined(__x86_64__)
  if (has_avx512()) return multipliers_avx512(seed, start, n, threshold, scale, out);
#endif
  multipliers_vectorised(seed, start, n, threshold, scale, out);
}

FASTTF_CLONES void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, double scale,
                                       double* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold ? scale : 0.0; });
}

FASTTF_CLONES void dropout_keep_bytes(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, bool* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold; });
}

}  // namespace cpu
}  // namespace fasttf
