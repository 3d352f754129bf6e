// positional_encoding on the GPU:  y[r, i] = x[r, i] * scale + PE(p(r), i)
//   PE(p, 2k) = sin(p * w_k), PE(p, 2k + 1) = cos(p * w_k), w_k = base^(-2k / D)
// The angle is computed in registers in float64 (no table in memory): positions of many
// thousands times w_0 = 1 need more than float32's 24 bits to stay within float32 rounding.
// x * scale + PE is one fma in the compute type (float32, or float64 for float64 tensors).
// Each thread handles VEC consecutive values of one row (16-byte accesses when aligned).
// Also: the backward dx = dy * scale (launch_scale).
#include "common.cuh"

namespace fasttf {
namespace cuda {
namespace {

template <typename T, int VEC>
__global__ void positional_encoding_kernel(const T* __restrict__ x, T* __restrict__ y, PositionArgs args) {
  using A = acc_t<T>;
  const A scale = static_cast<A>(args.scale);
  const int64_t per_row = args.dim / VEC;
  const int64_t total = args.rows * per_row;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = item / per_row;
    const int64_t i0 = (item % per_row) * VEC;
    const int64_t t = (r / args.t_div) % args.t_mod;
    const int64_t n = (r / args.n_div) % args.n_mod;
    const double position = static_cast<double>(t + (args.offsets ? args.offsets[n] : args.offset));
    A v[VEC];
    load_acc<T, VEC>(x + r * args.dim + i0, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t i = i0 + j;
      // the reference's own expression (fasttf.reference.sinusoid_table): the same float64 bits
      const double inv_freq = pow(args.base, -(2.0 * static_cast<double>(i / 2)) / static_cast<double>(args.dim));
      const double angle = position * inv_freq;
      const A pe = static_cast<A>((i & 1) ? cos(angle) : sin(angle));
      v[j] = fma_acc(v[j], scale, pe);
    }
    store_acc<T, VEC>(y + r * args.dim + i0, v);
  }
}

template <typename T, int VEC>
__global__ void scale_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n, acc_t<T> scale) {
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item * VEC < n;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t<T> v[VEC];
    load_acc<T, VEC>(x + item * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= scale;
    store_acc<T, VEC>(out + item * VEC, v);
  }
}

constexpr int kThreads = 256;

}  // namespace

cudaError_t launch_positional_encoding(DType dtype, const void* x, void* y, const PositionArgs& args,
                                       cudaStream_t stream) {
  if (args.rows == 0 || args.dim == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const int vec = pick_vec<T>(args.dim, x, y);
    const unsigned int blocks = blocks_for(args.rows * (args.dim / vec), kThreads);
    switch (vec) {
      case 8: positional_encoding_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(xp, yp, args); break;
      case 4: positional_encoding_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(xp, yp, args); break;
      case 2: positional_encoding_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(xp, yp, args); break;
      default: positional_encoding_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xp, yp, args); break;
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_scale(DType dtype, const void* x, void* out, int64_t n, double scale_d, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const acc_t<T> scale = static_cast<acc_t<T>>(scale_d);
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    const int vec = pick_vec<T>(n, x, out);
    const unsigned int blocks = blocks_for(n / vec, kThreads);
    switch (vec) {
      case 8: scale_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(xp, op, n, scale); break;
      case 4: scale_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(xp, op, n, scale); break;
      case 2: scale_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(xp, op, n, scale); break;
      default: scale_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xp, op, n, scale); break;
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fasttf
