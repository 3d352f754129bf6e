// Dropout multipliers and keep masks from Philox4x32-10 (see ../philox.h and dropout.h).
#include "dropout.h"

#include "../philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTTF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTTF_CLONES
#endif

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

}  // namespace

FASTTF_CLONES void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale,
                                       float* out) {
  for_each_word(seed, start, n, [&](int64_t j, uint32_t word) { out[j] = word >= threshold ? scale : 0.0f; });
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
