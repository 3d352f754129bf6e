// residual_add on the GPU, one pass:  out = residual + x * m,  m = keep(seed, i) / (1 - p)
// (m = 1 when p == 0; residual == nullptr gives the dropout backward dx = dy * m). The product
// and the sum are rounded separately, as eager `residual + dropout(x)` rounds them. The keep bits
// come from Philox(seed, i / 4) (../philox.h), the same stream as the CPU kernels. Each thread
// handles VEC consecutive values (16-byte accesses when aligned). Also the keep-mask itself.
#include "common.cuh"

namespace fasttf {
namespace cuda {
namespace {

template <typename T, int VEC, bool DROPOUT, bool RESIDUAL>
__global__ void residual_add_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ out,
                                    int64_t n, uint64_t seed, uint32_t threshold, acc_t<T> scale) {
  using A = acc_t<T>;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item * VEC < n;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = item * VEC;
    A v[VEC], r[VEC], m[VEC];
    load_acc<T, VEC>(x + i0, v);
    if (RESIDUAL) {
      load_acc<T, VEC>(residual + i0, r);
    }
    if (DROPOUT) dropout_multipliers<VEC>(seed, static_cast<uint64_t>(i0), threshold, scale, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A kept = DROPOUT ? mul_rn(v[j], m[j]) : v[j];
      v[j] = RESIDUAL ? add_rn(r[j], kept) : kept;
    }
    store_acc<T, VEC>(out + i0, v);
  }
}

__global__ void keep_mask_kernel(bool* __restrict__ keep, int64_t n, uint64_t seed, uint32_t threshold) {
  for (int64_t block = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; block * 4 < n;
       block += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PhiloxWords w = philox4x32_10(seed, static_cast<uint64_t>(block));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (block * 4 + k < n) keep[block * 4 + k] = w.w[k] >= threshold;
    }
  }
}

constexpr int kThreads = 256;

template <typename T, int VEC>
void launch_vec(const T* x, const T* residual, T* out, int64_t n, bool dropout, uint64_t seed, uint32_t threshold,
                acc_t<T> scale, cudaStream_t stream) {
  const unsigned int blocks = blocks_for(n / VEC, kThreads);
  if (dropout && residual) {
    residual_add_kernel<T, VEC, true, true><<<blocks, kThreads, 0, stream>>>(x, residual, out, n, seed, threshold, scale);
  } else if (dropout) {
    residual_add_kernel<T, VEC, true, false><<<blocks, kThreads, 0, stream>>>(x, residual, out, n, seed, threshold, scale);
  } else if (residual) {
    residual_add_kernel<T, VEC, false, true><<<blocks, kThreads, 0, stream>>>(x, residual, out, n, seed, threshold, scale);
  } else {
    residual_add_kernel<T, VEC, false, false><<<blocks, kThreads, 0, stream>>>(x, residual, out, n, seed, threshold, scale);
  }
}

}  // namespace

cudaError_t launch_residual_add(DType dtype, const void* x, const void* residual, void* out, int64_t n,
                                double dropout_p, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool dropout = dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(dropout_p);
  const double scale = 1.0 / (1.0 - dropout_p);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const acc_t<T> scale_acc = static_cast<acc_t<T>>(scale);
    const T* xp = static_cast<const T*>(x);
    const T* rp = static_cast<const T*>(residual);
    T* op = static_cast<T*>(out);
    dispatch_vec(pick_vec<T>(n, x, residual, out), [&](auto vec) {
      launch_vec<T, vec>(xp, rp, op, n, dropout, seed, threshold, scale_acc, stream);
    });
    return cudaGetLastError();
  });
}

cudaError_t launch_dropout_keep_mask(bool* keep, int64_t n, double dropout_p, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  keep_mask_kernel<<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, stream>>>(keep, n, seed,
                                                                             dropout_threshold(dropout_p));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fasttf
