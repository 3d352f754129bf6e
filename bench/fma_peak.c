// One core's float32 FMA peak, the ceiling the CPU report's GFLOP/s are read against:
//   12 independent accumulators (more than FMA latency x FMA pipes, so none waits) of
//   a = a * b + c on 8-float AVX2 vectors, 16 flops an FMA.
//
//   gcc -O2 -mavx2 -mfma bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
//   (two cores: run two copies at once, `/tmp/fma_peak & /tmp/fma_peak & wait`)
//
// Measured on the AMD EPYC (Zen 3) of the CPU report, 2026-11-28: 98-102 GFLOP/s a core, 94 + 101
// with both cores busy (issue 15's text estimated 78 at 2.45 GHz; the core runs faster than that).
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

enum { kAccumulators = 12 };

int main(void) {
  __m256 acc[kAccumulators];
  const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < kAccumulators; ++i) acc[i] = _mm256_set1_ps((float)i);
  const long steps = 400000000L / kAccumulators;
  for (int run = 0; run < 3; ++run) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long s = 0; s < steps; ++s) {
#pragma GCC unroll 12
      for (int i = 0; i < kAccumulators; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    float sum = 0.0f;  // the result is used, so the loop is not optimised away
    for (int i = 0; i < kAccumulators; ++i) sum += acc[i][0];
    printf("%.1f GFLOP/s (checksum %g)\n", (double)steps * kAccumulators * 16 / seconds / 1e9, sum);
  }
  return 0;
}
