// The per-row math of add_layer_norm, residual_add and positional_encoding on the CPU.
//
// One overload per storage type S of a row in memory (float, double, bfloat16, half); the math is
// in T = float (double for double). The rows are read and written in their own dtype: 16-bit
// values are widened and rounded back (round to nearest even, as c10::BFloat16/c10::Half do)
// in vector registers, so no pass converts a row into a buffer first.
//
// Written with GCC vector extensions, once per vector width: 64 bytes (16 floats) compiled for
// AVX-512, 32 for AVX2 and 16 for plain x86-64, picked at run time (FASTTF_CPU_ISA forces a lower
// one, simd.h); reductions keep four vector accumulators so they run at load throughput, not at
// add latency. ATen's own AVX2/AVX-512 at::vec::Vectorized needs Sleef headers the torch wheel
// does not ship, so an extension only gets its portable flavour.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fasttf {
namespace cpu {

// Streaming stores: with stream = true a row function writes its outputs past the caches (x86
// non-temporal stores, for the rows whose outputs start aligned to a vector; the others and the
// tails store as usual). A cached store first reads the line it writes (read for ownership), so a
// written pass costs two passes of memory traffic where a streamed one costs one -- worth it only
// when the outputs would not stay cached for the next op anyway: streams(bytes) says so for a call
// that reads and writes `bytes` in all, when that is at least half the last-level cache (its size
// from Linux's sysfs, 32 MiB if unknown; FASTTF_CPU_STREAM_MIN_BYTES sets the bound, read once; 0
// streams every call). A thread that streamed calls end_streamed_stores() (a store fence) before
// its part of the call returns. Streamed or not, the values written are the same.
bool streams(int64_t bytes);
void end_streamed_stores();

// add_norm_rows and its backward work on up to this many rows at once (short rows in pairs, their
// latencies overlapped; each row's arithmetic the same as alone): their scratch holds as many rows.
constexpr int64_t kNormRowsAtOnce = 2;

#define FASTTF_ROW_MATH(S, T)                                                                                   \
  /* out = (residual ? residual : 0) + x * (m ? m : 1), over n contiguous values */                           \
  void add_rows(const S* x, const S* residual, const T* m, S* out, int64_t n, bool stream = false);            \
  /* out = x * scale + (pe ? pe : 0) */                                                                         \
  void scale_add_rows(const S* x, T scale, const T* pe, S* out, int64_t n, bool stream = false);                \
  /* `rows` rows of add_layer_norm, row r at x + r * n (and residual, m, s, out; mean + r, rstd + r):    \
     s = residual + x * (m ? m : 1)  (stored as S),                                                            \
     mean = sum(s) / n,  rstd = 1 / sqrt(sum((s - mean)^2) / n + eps)  (of s as stored),                       \
     out = (s - mean) * rstd * w + b; with stream, out only is streamed (s stays cached: norm_rows.cpp).       \
     s_buf: kNormRowsAtOnce * n values of scratch (unused when S == T). */                                      \
  void add_norm_rows(const S* x, const S* residual, const T* m, const T* w, const T* b, T eps, S* s, S* out,    \
                     T* s_buf, T* mean, T* rstd, int64_t n, int64_t rows, bool stream = false);                 \
  /* their backward, with xhat = (s - mean) * rstd, g = dy * w, rows at stride n as above:                    \
     ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + (grad_s ? grad_s : 0);  dx = ds * m (if dx);          \
     dw_part += dy * xhat, db_part += dy (if dw_part; row after row).  dy_buf, s_buf: kNormRowsAtOnce * n      \
     values of scratch each (unused when S == T). */                                                            \
  void add_norm_backward_rows(const S* dy, const S* s, const S* grad_s, const T* m, const T* w, const T* mean,  \
                              const T* rstd, S* ds, S* dx, T* dw_part, T* db_part, T* dy_buf, T* s_buf,         \
                              int64_t n, int64_t rows, bool stream = false);

FASTTF_ROW_MATH(float, float)
FASTTF_ROW_MATH(double, double)
FASTTF_ROW_MATH(c10::BFloat16, float)
FASTTF_ROW_MATH(c10::Half, float)

#undef FASTTF_ROW_MATH

}  // namespace cpu
}  // namespace fasttf
