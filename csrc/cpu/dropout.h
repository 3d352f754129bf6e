// Dropout multipliers on the CPU from the shared Philox stream (../philox.h):
//   out[j] = keep(seed, start + j) ? scale : 0,   scale = 1 / (1 - p)
// written for a whole row (or chunk) at once so the kernels multiply by a buffer. The generators
// are written for AVX-512, AVX2 and plain x86-64, and the best one this CPU has is picked at run
// time (simd.h; FASTTF_CPU_ISA caps it).
#pragma once
#include <cstdint>

namespace fasttf {
namespace cpu {

void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* out);
void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, double scale, double* out);
// out[j] = x[j] * the multiplier of element start + j, in registers (no multiplier buffer; x may be out):
// ~0.75 ns an element on an AMD EPYC (Zen 3) core against ~1.0 for dropout_multipliers' stores alone.
void dropout_scale(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, const float* x,
                   float* out);
// x[j] *= the multiplier of element start + j (the forward's p * z without a multiplier buffer).
void dropout_apply(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, float* x);
// pz[j] = p[j] m_j and dp[j] = p[j] (dp[j] m_j - d), m_j the multiplier of element start + j: the attention
// backward's softmax gradient through dropout, the multipliers in registers.
void dropout_softmax_grad(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, float scale, const float* p,
                          float* pz, float* dp, float d);
void dropout_keep_bytes(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, bool* out);

// The multipliers for the acc type of a kernel.
template <typename acc_t>
struct DropoutRow {
  uint64_t seed;
  uint32_t threshold;
  acc_t scale;
  void fill(int64_t start, int64_t n, acc_t* out) const {
    dropout_multipliers(seed, start, n, threshold, scale, out);
  }
};

}  // namespace cpu
}  // namespace fasttf
