// positional_encoding on the GPU:  y[r, i] = x[r, i] * scale + PE(p(r), i)
//   PE(p, 2k) = sin(p * w_k), PE(p, 2k + 1) = cos(p * w_k), w_k = base^(-2k / D)
// PE is computed in float64 (positions of many thousands times w_0 = 1 need more than float32's
// 24 bits to stay within float32 rounding) and rounded to the compute type, once per value:
//  - from a table of positions [0, table_rows) that dispatch.cpp caches per (device, D, base,
//    compute type), built by sinusoid_table_kernel, as the CPU op caches its own; a position
//    outside the table is computed in registers by the same expression (same bits);
//  - each thread takes VEC consecutive columns of one time step t and `n_per_thread` sequences:
//    with one offset for all sequences, the VEC values of PE are loaded once for all of them; it
//    loads kSeqBatch sequences' x before it stores their y (loads in flight, see kSeqBatch).
// The first version computed pow, sin and cos in float64 for every element: 631 GB/s on an H100
// against 2767 for a copy, 0.4-0.6x eager's `x * scale + pe[:T]` (bench/results, 2026-11-26).
// x * scale + PE is one fma in the compute type (float32, or float64 for float64 tensors).
// Also: the backward dx = dy * scale (launch_scale).
#include <algorithm>

#include "common.cuh"

namespace fasttf {
namespace cuda {
namespace {

// PE(position, i) in float64 (fasttf.reference.sinusoid_table's expression: the same bits), rounded to A.
template <typename A>
__device__ __forceinline__ A sinusoid(int64_t position, int64_t i, int64_t dim, double base) {
  const double inv_freq = pow(base, -(2.0 * static_cast<double>(i / 2)) / static_cast<double>(dim));
  const double angle = static_cast<double>(position) * inv_freq;
  return static_cast<A>((i & 1) ? cos(angle) : sin(angle));
}

// PE(position, i0 .. i0 + VEC - 1): from the table where it holds the position, else computed.
// TABLE_ONLY: the launcher has checked that the table holds every position of the call.
template <typename A, int VEC, bool TABLE_ONLY>
__device__ __forceinline__ void sinusoids(int64_t position, int64_t i0, const PositionArgs& args, A* pe) {
  const A* table = static_cast<const A*>(args.table);
  if (TABLE_ONLY || (table != nullptr && position >= 0 && position < args.table_rows)) {
    // one aligned access of VEC values (two for 8 floats): dim and i0 are multiples of VEC (pick_vec)
    load_acc<A, VEC>(table + position * args.dim + i0, pe);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) pe[j] = sinusoid<A>(position, i0 + j, args.dim, args.base);
  }
}

template <typename A>
__global__ void sinusoid_table_kernel(A* __restrict__ table, int64_t rows, int64_t dim, double base) {
  const int64_t total = rows * dim;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    table[item] = sinusoid<A>(item / dim, item % dim, dim, base);
  }
}

// Sequences a thread loads before it stores: their loads are independent, so kSeqBatch of them are in
// flight at once (a loop of load, fma, store per sequence kept one 16-byte load per thread in flight:
// 73-82% of the copy bandwidth on an H100, 2026-11-27, where residual_add's two loads a thread reach it).
constexpr int kSeqBatch = 4;

// Work item = (sequence chunk, t, column group), the column group fastest (coalesced rows).
// TABLE_ONLY (every position in the table, the usual call): the kernel has no float64 pow / sin / cos
// in it. Their registers set the whole kernel's count (114 for bfloat16 VEC = 8, 84 for float32 VEC =
// 4: 2 or 3 blocks of 256 threads an SM, 32-48 KiB of loads in flight an SM) and their code spread the
// hot path through 7024 instructions; an H200 ran the bfloat16 forward at 52% of its copy bandwidth.
// Without them: 70 and 48 registers (3 and 5 blocks an SM, 48 and 80 KiB in flight), 1000 instructions.
template <typename T, int VEC, bool TABLE_ONLY>
__global__ void positional_encoding_kernel(const T* __restrict__ x, T* __restrict__ y, PositionArgs args,
                                           int64_t n_per_thread) {
  using A = acc_t<T>;
  const A scale = static_cast<A>(args.scale);
  const int64_t per_row = args.dim / VEC;
  const int64_t chunks = (args.n_mod + n_per_thread - 1) / n_per_thread;
  const int64_t total = chunks * args.t_mod * per_row;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = (item % per_row) * VEC;
    const int64_t t = (item / per_row) % args.t_mod;
    const int64_t n_begin = item / (per_row * args.t_mod) * n_per_thread;
    const int64_t n_end = n_begin + n_per_thread < args.n_mod ? n_begin + n_per_thread : args.n_mod;
    A pe[VEC];
    if (args.offsets == nullptr) sinusoids<A, VEC, TABLE_ONLY>(t + args.offset, i0, args, pe);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kSeqBatch) {
      A v[kSeqBatch][VEC];
#pragma unroll
      for (int b = 0; b < kSeqBatch; ++b) {
        if (n0 + b < n_end) load_acc<T, VEC>(x + (t * args.t_div + (n0 + b) * args.n_div) * args.dim + i0, v[b]);
      }
#pragma unroll
      for (int b = 0; b < kSeqBatch; ++b) {
        if (n0 + b >= n_end) break;
        if (!TABLE_ONLY && args.offsets != nullptr) sinusoids<A, VEC, false>(t + args.offsets[n0 + b], i0, args, pe);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[b][j] = fma_acc(v[b][j], scale, pe[j]);
        store_acc<T, VEC>(y + (t * args.t_div + (n0 + b) * args.n_div) * args.dim + i0, v[b]);
      }
    }
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

// Enough work items to fill the GPU (about 2^18 threads) before a thread takes several sequences.
constexpr int64_t kTargetThreads = int64_t(1) << 18;

cudaError_t launch_positional_encoding(DType dtype, const void* x, void* y, const PositionArgs& args,
                                       cudaStream_t stream) {
  if (args.rows == 0 || args.dim == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const int vec = pick_vec<T>(args.dim, x, y);
    const int64_t items = args.rows * (args.dim / vec);
    const int64_t n_per_thread = std::max<int64_t>(1, std::min<int64_t>(args.n_mod, items / kTargetThreads));
    const int64_t chunks = (args.n_mod + n_per_thread - 1) / n_per_thread;
    const unsigned int blocks = blocks_for(chunks * args.t_mod * (args.dim / vec), kThreads);
    // positions t + offset, t < t_mod, all in the table (per-sequence offsets live on the device: not checked)
    const bool table_only = args.table != nullptr && args.offsets == nullptr && args.offset >= 0 &&
                            args.offset <= args.table_rows - args.t_mod;  // (no overflow for a far offset)
    dispatch_vec(vec, [&](auto v) {
      if (table_only) {
        positional_encoding_kernel<T, v, true><<<blocks, kThreads, 0, stream>>>(xp, yp, args, n_per_thread);
      } else {
        positional_encoding_kernel<T, v, false><<<blocks, kThreads, 0, stream>>>(xp, yp, args, n_per_thread);
      }
    });
    return cudaGetLastError();
  });
}

cudaError_t launch_sinusoid_table(bool float64, void* table, int64_t rows, int64_t dim, double base,
                                  cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  const unsigned int blocks = blocks_for(rows * dim, kThreads);
  if (float64) {
    sinusoid_table_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<double*>(table), rows, dim, base);
  } else {
    sinusoid_table_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<float*>(table), rows, dim, base);
  }
  return cudaGetLastError();
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
    dispatch_vec(vec, [&](auto v) { scale_kernel<T, v><<<blocks, kThreads, 0, stream>>>(xp, op, n, scale); });
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fasttf
