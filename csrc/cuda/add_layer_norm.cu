// add_layer_norm on the GPU: one block per row of D values (D up to 16384 and beyond), each
// thread VEC consecutive values at a time (16-byte accesses when aligned). Computed in float32
// (float64 for float64 tensors); mean and rstd are kept in that type for the backward.
//   forward:   s = residual + x * m  (written once, re-read by the same thread from cache)
//              mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps)   (two passes)
//              out = (s - mean) * rstd * weight + bias
//   backward:  xhat = (s - mean) * rstd, g = dout * weight
//              ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_s
//              dresidual = ds, dx = ds * m (m regenerated from the seed, ../philox.h)
//   dweight = sum_rows dout * xhat, dbias = sum_rows dout, deterministic and without atomics:
//     stage 1: block (column tile, row chunk) writes its partial sums for a chunk of >= 64 rows
//     stage 2: one thread per column adds the chunks' partials in chunk order.
#include "common.cuh"

namespace fasttf {
namespace cuda {
namespace {

constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxChunks = 65535;  // gridDim.y

// Rows per chunk of the dweight/dbias partial sums: 64, more when there are > 65535 chunks.
int64_t chunk_rows(int64_t rows) {
  const int64_t needed = (rows + kMaxChunks - 1) / kMaxChunks;
  return needed > kMinChunkRows ? needed : kMinChunkRows;
}
constexpr int kColumnThreads = 256;

int row_threads(int64_t dim, int vec) {
  int64_t threads = ((dim / vec + 31) / 32) * 32;
  if (threads < 32) threads = 32;
  if (threads > 512) threads = 512;
  return static_cast<int>(threads);
}

template <typename T, int VEC, bool DROPOUT>
__global__ void add_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                      const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out,
                                      T* __restrict__ s, acc_t<T>* __restrict__ mean_out,
                                      acc_t<T>* __restrict__ rstd_out, int64_t dim, acc_t<T> eps, uint64_t seed,
                                      uint32_t threshold, acc_t<T> scale) {
  using A = acc_t<T>;
  __shared__ A shared32[32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * dim;
  A sum = 0;
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    A v[VEC], r[VEC], m[VEC];
    load_acc<T, VEC>(x + base + c, v);
    load_acc<T, VEC>(residual + base + c, r);
    if (DROPOUT) dropout_multipliers<VEC>(seed, static_cast<uint64_t>(base + c), threshold, scale, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = add_rn(r[j], DROPOUT ? mul_rn(v[j], m[j]) : v[j]);
    }
    store_acc<T, VEC>(s + base + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += to_acc(from_acc<T>(v[j]));  // the stored (rounded) s
  }
  const A mean = block_sum(sum, shared32) / static_cast<A>(dim);
  A squares = 0;
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    A v[VEC];
    load_acc<T, VEC>(s + base + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += (v[j] - mean) * (v[j] - mean);
  }
  const A rstd = rsqrt_acc(block_sum(squares, shared32) / static_cast<A>(dim) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    A v[VEC], w[VEC], b[VEC];
    load_acc<T, VEC>(s + base + c, v);
    if (weight) {
      load_acc<T, VEC>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1;
    }
    if (bias) {
      load_acc<T, VEC>(bias + c, b);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b[j] = 0;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = fma_acc((v[j] - mean) * rstd, w[j], b[j]);
    store_acc<T, VEC>(out + base + c, v);
  }
}

// g = dout * weight is rounded once (mul_rn) and used so in both passes: for a row of one value,
// g - mean(g) is then exactly 0 and ds exactly grad_s, as in torch.
template <typename T, int VEC, bool DROPOUT>
__global__ void add_layer_norm_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ grad_s,
                                               const T* __restrict__ s, const acc_t<T>* __restrict__ mean_in,
                                               const acc_t<T>* __restrict__ rstd_in, const T* __restrict__ weight,
                                               T* __restrict__ dresidual, T* __restrict__ dx, int64_t dim,
                                               uint64_t seed, uint32_t threshold, acc_t<T> scale) {
  using A = acc_t<T>;
  __shared__ A shared32[32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * dim;
  const A mean = mean_in[row], rstd = rstd_in[row];
  A sum_g = 0, sum_gx = 0;
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    A dy[VEC], v[VEC], w[VEC];
    load_acc<T, VEC>(grad_out + base + c, dy);
    load_acc<T, VEC>(s + base + c, v);
    if (weight) {
      load_acc<T, VEC>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A g = mul_rn(dy[j], w[j]);
      sum_g += g;
      sum_gx += g * (v[j] - mean) * rstd;
    }
  }
  const A c1 = block_sum(sum_g, shared32) / static_cast<A>(dim);
  const A c2 = block_sum(sum_gx, shared32) / static_cast<A>(dim);
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    A dy[VEC], v[VEC], w[VEC], gs[VEC], m[VEC];
    load_acc<T, VEC>(grad_out + base + c, dy);
    load_acc<T, VEC>(s + base + c, v);
    if (weight) {
      load_acc<T, VEC>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1;
    }
    if (grad_s) {
      load_acc<T, VEC>(grad_s + base + c, gs);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) gs[j] = 0;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A xhat = (v[j] - mean) * rstd;
      v[j] = rstd * (mul_rn(dy[j], w[j]) - c1 - xhat * c2) + gs[j];
    }
    store_acc<T, VEC>(dresidual + base + c, v);
    if (DROPOUT) {
      dropout_multipliers<VEC>(seed, static_cast<uint64_t>(base + c), threshold, scale, m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] *= m[j];
      store_acc<T, VEC>(dx + base + c, v);
    }
  }
}

// Stage 1: partials[2 * chunk][col] = sum dout * xhat, partials[2 * chunk + 1][col] = sum dout
// over the rows of one chunk. Threads of a block take consecutive columns (coalesced).
template <typename T>
__global__ void affine_partials_kernel(const T* __restrict__ grad_out, const T* __restrict__ s,
                                       const acc_t<T>* __restrict__ mean_in, const acc_t<T>* __restrict__ rstd_in,
                                       acc_t<T>* __restrict__ partials, int64_t rows, int64_t dim,
                                       int64_t rows_per_chunk) {
  using A = acc_t<T>;
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (col >= dim) return;
  const int64_t row_end = min(rows, (chunk + 1) * rows_per_chunk);
  A dw = 0, db = 0;
  for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
    const A dy = to_acc(grad_out[row * dim + col]);
    const A xhat = (to_acc(s[row * dim + col]) - mean_in[row]) * rstd_in[row];
    dw += dy * xhat;
    db += dy;
  }
  partials[(2 * chunk) * dim + col] = dw;
  partials[(2 * chunk + 1) * dim + col] = db;
}

// Stage 2: the chunks' partials added in chunk order, one thread per column.
template <typename T>
__global__ void affine_reduce_kernel(const acc_t<T>* __restrict__ partials, T* __restrict__ dweight,
                                     T* __restrict__ dbias, int64_t chunks, int64_t dim) {
  using A = acc_t<T>;
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= dim) return;
  A dw = 0, db = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    dw += partials[(2 * chunk) * dim + col];
    db += partials[(2 * chunk + 1) * dim + col];
  }
  if (dweight) dweight[col] = from_acc<T>(dw);
  if (dbias) dbias[col] = from_acc<T>(db);
}

}  // namespace

int64_t add_layer_norm_partial_rows(int64_t rows) {
  const int64_t per_chunk = chunk_rows(rows);
  return 2 * ((rows + per_chunk - 1) / per_chunk);
}

cudaError_t launch_add_layer_norm(DType dtype, const void* x, const void* residual, const void* weight,
                                  const void* bias, void* out, void* s, void* mean, void* rstd, int64_t rows,
                                  int64_t dim, double eps, double dropout_p, uint64_t seed, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const bool dropout = dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(dropout_p);
  const double scale = 1.0 / (1.0 - dropout_p);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    auto args = [&](auto kernel, int vec) {
      kernel<<<static_cast<unsigned int>(rows), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
          static_cast<const T*>(bias), static_cast<T*>(out), static_cast<T*>(s), static_cast<A*>(mean),
          static_cast<A*>(rstd), dim, static_cast<A>(eps), seed, threshold, static_cast<A>(scale));
    };
    const int vec = pick_vec<T>(dim, x, residual, out, s);
    const int vec_affine = pick_vec<T>(dim, weight, bias);
    switch (vec < vec_affine ? vec : vec_affine) {
      case 8: dropout ? args(add_layer_norm_kernel<T, 8, true>, 8) : args(add_layer_norm_kernel<T, 8, false>, 8); break;
      case 4: dropout ? args(add_layer_norm_kernel<T, 4, true>, 4) : args(add_layer_norm_kernel<T, 4, false>, 4); break;
      case 2: dropout ? args(add_layer_norm_kernel<T, 2, true>, 2) : args(add_layer_norm_kernel<T, 2, false>, 2); break;
      default: dropout ? args(add_layer_norm_kernel<T, 1, true>, 1) : args(add_layer_norm_kernel<T, 1, false>, 1); break;
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_add_layer_norm_backward(DType dtype, const void* grad_out, const void* grad_s, const void* s,
                                           const void* mean, const void* rstd, const void* weight,
                                           void* dresidual, void* dx, void* dweight, void* dbias, void* partials,
                                           int64_t rows, int64_t dim, double dropout_p, uint64_t seed,
                                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const bool dropout = dropout_p > 0.0 && dx != nullptr;
  const uint32_t threshold = dropout_threshold(dropout_p);
  const double scale = 1.0 / (1.0 - dropout_p);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const A* mean_a = static_cast<const A*>(mean);
    const A* rstd_a = static_cast<const A*>(rstd);
    auto args = [&](auto kernel, int vec) {
      kernel<<<static_cast<unsigned int>(rows), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(grad_s), static_cast<const T*>(s), mean_a, rstd_a,
          static_cast<const T*>(weight), static_cast<T*>(dresidual), static_cast<T*>(dx), dim, seed, threshold,
          static_cast<A>(scale));
    };
    const int vec = pick_vec<T>(dim, grad_out, grad_s, s, dresidual);
    const int vec2 = pick_vec<T>(dim, weight, dx);
    switch (vec < vec2 ? vec : vec2) {
      case 8: dropout ? args(add_layer_norm_backward_kernel<T, 8, true>, 8) : args(add_layer_norm_backward_kernel<T, 8, false>, 8); break;
      case 4: dropout ? args(add_layer_norm_backward_kernel<T, 4, true>, 4) : args(add_layer_norm_backward_kernel<T, 4, false>, 4); break;
      case 2: dropout ? args(add_layer_norm_backward_kernel<T, 2, true>, 2) : args(add_layer_norm_backward_kernel<T, 2, false>, 2); break;
      default: dropout ? args(add_layer_norm_backward_kernel<T, 1, true>, 1) : args(add_layer_norm_backward_kernel<T, 1, false>, 1); break;
    }
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess || (dweight == nullptr && dbias == nullptr)) return error;
    const int64_t per_chunk = chunk_rows(rows);
    const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
    const dim3 grid(static_cast<unsigned int>((dim + kColumnThreads - 1) / kColumnThreads),
                    static_cast<unsigned int>(chunks));
    affine_partials_kernel<T><<<grid, kColumnThreads, 0, stream>>>(static_cast<const T*>(grad_out),
                                                                   static_cast<const T*>(s), mean_a, rstd_a,
                                                                   static_cast<A*>(partials), rows, dim, per_chunk);
    affine_reduce_kernel<T><<<static_cast<unsigned int>((dim + kColumnThreads - 1) / kColumnThreads), kColumnThreads,
                             0, stream>>>(static_cast<const A*>(partials), static_cast<T*>(dweight),
                                          static_cast<T*>(dbias), chunks, dim);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fasttf
