// add_layer_norm on the GPU: one block per row of D values (D up to 16384 and beyond), each
// thread VEC consecutive values at a time (16-byte accesses when aligned).
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
                                      T* __restrict__ s, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      int64_t dim, float eps, uint64_t seed, uint32_t threshold, float scale) {
  __shared__ float shared32[32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * dim;
  float sum = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC], r[VEC], m[VEC];
    load_floats<T, VEC>(x + base + c, v);
    load_floats<T, VEC>(residual + base + c, r);
    if (DROPOUT) dropout_multipliers<VEC>(seed, static_cast<uint64_t>(base + c), threshold, scale, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = r[j] + (DROPOUT ? v[j] * m[j] : v[j]);
    }
    store_floats<T, VEC>(s + base + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += to_float(from_float<T>(v[j]));  // the stored (rounded) s
  }
  const float mean = block_sum(sum, shared32) / static_cast<float>(dim);
  float squares = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC];
    load_floats<T, VEC>(s + base + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += (v[j] - mean) * (v[j] - mean);
  }
  const float rstd = rsqrtf(block_sum(squares, shared32) / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float v[VEC], w[VEC], b[VEC];
    load_floats<T, VEC>(s + base + c, v);
    if (weight) {
      load_floats<T, VEC>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1.0f;
    }
    if (bias) {
      load_floats<T, VEC>(bias + c, b);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = fmaf((v[j] - mean) * rstd, w[j], b[j]);
    store_floats<T, VEC>(out + base + c, v);
  }
}

template <typename T, int VEC, bool DROPOUT>
__global__ void add_layer_norm_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ grad_s,
                                               const T* __restrict__ s, const float* __restrict__ mean_in,
                                               const float* __restrict__ rstd_in, const T* __restrict__ weight,
                                               T* __restrict__ dresidual, T* __restrict__ dx, int64_t dim,
                                               uint64_t seed, uint32_t threshold, float scale) {
  __shared__ float shared32[32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * dim;
  const float mean = mean_in[row], rstd = rstd_in[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float dy[VEC], v[VEC], w[VEC];
    load_floats<T, VEC>(grad_out + base + c, dy);
    load_floats<T, VEC>(s + base + c, v);
    if (weight) {
      load_floats<T, VEC>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float g = dy[j] * w[j];
      sum_g += g;
      sum_gx += g * (v[j] - mean) * rstd;
    }
  }
  const float c1 = block_sum(sum_g, shared32) / static_cast<float>(dim);
  const float c2 = block_sum(sum_gx, shared32) / static_cast<float>(dim);
  for (int64_t c = threadIdx.x * VEC; c < dim; c += blockDim.x * VEC) {
    float dy[VEC], v[VEC], w[VEC], gs[VEC], m[VEC];
    load_floats<T, VEC>(grad_out + base + c, dy);
    load_floats<T, VEC>(s + base + c, v);
    if (weight) {
      load_floats<T, VEC>(weight + c, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1.0f;
    }
    if (grad_s) {
      load_floats<T, VEC>(grad_s + base + c, gs);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) gs[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xhat = (v[j] - mean) * rstd;
      v[j] = rstd * (dy[j] * w[j] - c1 - xhat * c2) + gs[j];
    }
    store_floats<T, VEC>(dresidual + base + c, v);
    if (DROPOUT) {
      dropout_multipliers<VEC>(seed, static_cast<uint64_t>(base + c), threshold, scale, m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] *= m[j];
      store_floats<T, VEC>(dx + base + c, v);
    }
  }
}

// Stage 1: partials[2 * chunk][col] = sum dout * xhat, partials[2 * chunk + 1][col] = sum dout
// over the rows of one chunk. Threads of a block take consecutive columns (coalesced).
template <typename T>
__global__ void affine_partials_kernel(const T* __restrict__ grad_out, const T* __restrict__ s,
                                       const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                       float* __restrict__ partials, int64_t rows, int64_t dim,
                                       int64_t rows_per_chunk) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (col >= dim) return;
  const int64_t row_end = min(rows, (chunk + 1) * rows_per_chunk);
  float dw = 0.0f, db = 0.0f;
  for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
    const float dy = to_float(grad_out[row * dim + col]);
    const float xhat = (to_float(s[row * dim + col]) - mean_in[row]) * rstd_in[row];
    dw += dy * xhat;
    db += dy;
  }
  partials[(2 * chunk) * dim + col] = dw;
  partials[(2 * chunk + 1) * dim + col] = db;
}

// Stage 2: the chunks' partials added in chunk order, one thread per column.
template <typename T>
__global__ void affine_reduce_kernel(const float* __restrict__ partials, T* __restrict__ dweight,
                                     T* __restrict__ dbias, int64_t chunks, int64_t dim) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= dim) return;
  float dw = 0.0f, db = 0.0f;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    dw += partials[(2 * chunk) * dim + col];
    db += partials[(2 * chunk + 1) * dim + col];
  }
  if (dweight) dweight[col] = from_float<T>(dw);
  if (dbias) dbias[col] = from_float<T>(db);
}

}  // namespace

int64_t add_layer_norm_partial_rows(int64_t rows) {
  const int64_t per_chunk = chunk_rows(rows);
  return 2 * ((rows + per_chunk - 1) / per_chunk);
}

cudaError_t launch_add_layer_norm(DType dtype, const void* x, const void* residual, const void* weight,
                                  const void* bias, void* out, void* s, float* mean, float* rstd, int64_t rows,
                                  int64_t dim, double eps, double dropout_p, uint64_t seed, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const bool dropout = dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(dropout_p);
  const float scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto args = [&](auto kernel, int vec) {
      kernel<<<static_cast<unsigned int>(rows), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
          static_cast<const T*>(bias), static_cast<T*>(out), static_cast<T*>(s), mean, rstd, dim,
          static_cast<float>(eps), seed, threshold, scale);
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
                                           const float* mean, const float* rstd, const void* weight,
                                           void* dresidual, void* dx, void* dweight, void* dbias, float* partials,
                                           int64_t rows, int64_t dim, double dropout_p, uint64_t seed,
                                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const bool dropout = dropout_p > 0.0 && dx != nullptr;
  const uint32_t threshold = dropout_threshold(dropout_p);
  const float scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto args = [&](auto kernel, int vec) {
      kernel<<<static_cast<unsigned int>(rows), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(grad_s), static_cast<const T*>(s), mean, rstd,
          static_cast<const T*>(weight), static_cast<T*>(dresidual), static_cast<T*>(dx), dim, seed, threshold,
          scale);
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
                                                                   static_cast<const T*>(s), mean, rstd, partials,
                                                                   rows, dim, per_chunk);
    affine_reduce_kernel<T><<<static_cast<unsigned int>((dim + kColumnThreads - 1) / kColumnThreads), kColumnThreads,
                             0, stream>>>(partials, static_cast<T*>(dweight), static_cast<T*>(dbias), chunks, dim);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fasttf
