// The dropout RNG shared by the CPU and CUDA kernels (plain C++, no torch headers, so nvcc -c
// compiles it too): Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (block & 0xffffffff, block >> 32, 0, 0),  block = element_index / 4
//   word    = philox(key, counter)[element_index % 4]          (32 uniform bits per element)
//   keep    = word >= threshold,  threshold = floor(p * 2^32)  -> P(keep) = 1 - p
//
// So an element's keep bit depends only on (seed, its flat index in the contiguous tensor): the
// forward and the backward (which regenerates the mask instead of storing it), the CPU and the
// GPU all draw the same mask for the same seed.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTTF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTTF_HOST_DEVICE inline
#endif

namespace fasttf {

struct PhiloxWords {
  uint32_t w[4];
};

FASTTF_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Four 32-bit words for one counter block.
FASTTF_HOST_DEVICE PhiloxWords philox4x32_10(uint64_t seed, uint64_t block) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  PhiloxWords out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// floor(p * 2^32) for p in [0, 1): an element is kept when its word is >= this.
FASTTF_HOST_DEVICE uint32_t dropout_threshold(double dropout_p) {
  const double scaled = dropout_p * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

FASTTF_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return philox4x32_10(seed, index >> 2).w[index & 3] >= threshold;
}

}  // namespace fasttf
