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
//     stage 1: per chunk of rows, each column's partial sums. Where a block's threads hold a whole
//              row (D <= 512 * VEC: 2048 float32, 4096 bfloat16 values), one block takes a chunk of
//              16+ rows, adds its columns' partials in registers as it computes ds, and writes them
//              once: dout and s are read once. Else a second kernel (column tile, row chunk) re-reads them.
//     stage 2: 32 lanes of chunks a column (chunks l, l + 32, ... in order), then the lanes in order,
//              both with compensated (Kahan) sums.
// The first H100 lease measured the two-kernel version: forward+backward at 57-66% of the copy
// bandwidth (dout and s read twice, the 2 x 1024 x D partials added by D threads).
#include "common.cuh"

namespace fasttf {
namespace cuda {
namespace {

constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxChunks = 65535;  // gridDim.y
// Rows a block's threads hold whole: chunks of 16 rows or more, about 4096 chunks for big tensors. An
// H100 runs 5-8 of these blocks on each of its 132 SMs, so 4096 make ~6 waves (the last one's idle tail
// ~10%); 16 rows keep the float partials (written, then read) at 2/16 of a pass over dout.
constexpr int64_t kHeldRowMaxDim = 4096;
constexpr int64_t kHeldRowChunks = 4096;
constexpr int64_t kHeldRowMinChunkRows = 16;

// Rows per chunk of the dweight/dbias partial sums.
int64_t chunk_rows(int64_t rows, int64_t dim) {
  if (dim <= kHeldRowMaxDim) {
    const int64_t spread = (rows + kHeldRowChunks - 1) / kHeldRowChunks;
    return spread > kHeldRowMinChunkRows ? spread : kHeldRowMinChunkRows;
  }
  const int64_t needed = (rows + kMaxChunks - 1) / kMaxChunks;  // >= 64 rows, <= 65535 chunks
  return needed > kMinChunkRows ? needed : kMinChunkRows;
}
constexpr int kColumnThreads = 256;
constexpr int kReduceLanes = 32;  // warps of the stage-2 block, each over its own chunks

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
    load_acc_or<T, VEC>(weight, c, A(1), w);
    load_acc_or<T, VEC>(bias, c, A(0), b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = fma_acc((v[j] - mean) * rstd, w[j], b[j]);
    store_acc<T, VEC>(out + base + c, v);
  }
}

// The second pass of a row's backward at columns [at, at + VEC): v holds s on entry;
// ds = rstd * (g - c1 - xhat * c2) + grad_s into dresidual, and ds * m into dx with dropout.
template <typename T, int VEC, bool DROPOUT>
__device__ __forceinline__ void store_grads(const T* __restrict__ grad_s, T* __restrict__ dresidual,
                                            T* __restrict__ dx, int64_t at, const acc_t<T>* dy, acc_t<T>* v,
                                            const acc_t<T>* w, acc_t<T> mean, acc_t<T> rstd, acc_t<T> c1,
                                            acc_t<T> c2, uint64_t seed, uint32_t threshold, acc_t<T> scale) {
  using A = acc_t<T>;
  A gs[VEC], m[VEC];
  load_acc_or<T, VEC>(grad_s, at, A(0), gs);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A xhat = (v[j] - mean) * rstd;
    v[j] = rstd * (mul_rn(dy[j], w[j]) - c1 - xhat * c2) + gs[j];
  }
  store_acc<T, VEC>(dresidual + at, v);
  if (DROPOUT) {
    dropout_multipliers<VEC>(seed, static_cast<uint64_t>(at), threshold, scale, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= m[j];
    store_acc<T, VEC>(dx + at, v);
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
    load_acc_or<T, VEC>(weight, c, A(1), w);
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
    A dy[VEC], v[VEC], w[VEC];
    load_acc<T, VEC>(grad_out + base + c, dy);
    load_acc<T, VEC>(s + base + c, v);
    load_acc_or<T, VEC>(weight, c, A(1), w);
    store_grads<T, VEC, DROPOUT>(grad_s, dresidual, dx, base + c, dy, v, w, mean, rstd, c1, c2, seed, threshold, scale);
  }
}

// The backward of a chunk of rows with the dweight/dbias partials added on the way (stage 1 fused):
// one block per chunk, each thread one group of VEC columns (D <= blockDim * VEC), which holds a row's
// dout and s from the sums to ds and its columns' partials across the chunk's rows. The same
// arithmetic, in the same order, as add_layer_norm_backward_kernel and affine_partials_kernel.
template <typename T, int VEC, bool DROPOUT>
__global__ void add_layer_norm_backward_chunk_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ grad_s, const T* __restrict__ s,
    const acc_t<T>* __restrict__ mean_in, const acc_t<T>* __restrict__ rstd_in, const T* __restrict__ weight,
    T* __restrict__ dresidual, T* __restrict__ dx, acc_t<T>* __restrict__ partials, int64_t rows, int64_t dim,
    int64_t rows_per_chunk, uint64_t seed, uint32_t threshold, acc_t<T> scale) {
  using A = acc_t<T>;
  __shared__ A shared32[32];
  const int64_t chunk = blockIdx.x;
  const int64_t c = threadIdx.x * VEC;
  const bool active = c < dim;
  A w[VEC], dw[VEC] = {}, db[VEC] = {};
  load_acc_or<T, VEC>(active ? weight : nullptr, c, A(1), w);
  const int64_t row_begin = chunk * rows_per_chunk, row_end = min(rows, row_begin + rows_per_chunk);
  // the next row's dout, s, mean and rstd are loaded before this row's two block sums, so that they are
  // in flight while the block waits at its barriers (one row in flight a block was 57-67% of the copy
  // bandwidth on an H100 / H200)
  Pack<T, VEC> dy_next, v_next;
  A mean_next = 0, rstd_next = 0;
  if (active && row_begin < row_end) {
    dy_next = load_pack<T, VEC>(grad_out + row_begin * dim + c);
    v_next = load_pack<T, VEC>(s + row_begin * dim + c);
    mean_next = mean_in[row_begin], rstd_next = rstd_in[row_begin];
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * dim;
    const A mean = mean_next, rstd = rstd_next;
    A dy[VEC], v[VEC];
    A sum_g = 0, sum_gx = 0;
    if (active) {
      to_acc<T, VEC>(dy_next, dy);
      to_acc<T, VEC>(v_next, v);
      if (row + 1 < row_end) {
        dy_next = load_pack<T, VEC>(grad_out + base + dim + c);
        v_next = load_pack<T, VEC>(s + base + dim + c);
        mean_next = mean_in[row + 1], rstd_next = rstd_in[row + 1];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A g = mul_rn(dy[j], w[j]);
        sum_g += g;
        sum_gx += g * (v[j] - mean) * rstd;
        const A xhat = (v[j] - mean) * rstd;
        dw[j] += dy[j] * xhat;
        db[j] += dy[j];
      }
    }
    const A c1 = block_sum(sum_g, shared32) / static_cast<A>(dim);  // every thread of the block
    const A c2 = block_sum(sum_gx, shared32) / static_cast<A>(dim);
    if (!active) continue;
    store_grads<T, VEC, DROPOUT>(grad_s, dresidual, dx, base + c, dy, v, w, mean, rstd, c1, c2, seed, threshold, scale);
  }
  if (!active) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    partials[(2 * chunk) * dim + c + j] = dw[j];
    partials[(2 * chunk + 1) * dim + c + j] = db[j];
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

// A compensated (Kahan) sum: `lost` keeps the low bits each add rounds away, so the ~chunks / 32
// partials a warp adds and the 32 lane sums cost ~1 rounding in all rather than one each (a 70001-row
// dbias was 2.4x torch's error with plain adds). __fadd_rn: never contracted or reordered.
template <typename A>
struct CompensatedSum {
  A sum = 0, lost = 0;
  __device__ __forceinline__ void add(A value) {
    const A y = add_rn(value, -lost);
    const A t = add_rn(sum, y);
    lost = add_rn(add_rn(t, -sum), -y);
    sum = t;
  }
  __device__ __forceinline__ A value() const { return add_rn(sum, -lost); }
};

// Stage 2: a block of 32 columns x kReduceLanes warps; warp l adds chunks l, l + kReduceLanes, ... in
// order (a warp reads 32 consecutive columns), then the first warp adds the lanes' sums in lane order.
// Both compensated: stage 2 adds ~chunks partials a column, stage 1 only 16+ rows a chunk.
template <typename T>
__global__ void affine_reduce_kernel(const acc_t<T>* __restrict__ partials, T* __restrict__ dweight,
                                     T* __restrict__ dbias, int64_t chunks, int64_t dim) {
  using A = acc_t<T>;
  __shared__ A lane_sums[2][kReduceLanes][32];  // [lane][column]: a warp reads or writes 32 consecutive
  const int column = threadIdx.x % 32, lane = threadIdx.x / 32;
  const int64_t col = blockIdx.x * static_cast<int64_t>(32) + column;
  CompensatedSum<A> dw, db;
  if (col < dim) {
    for (int64_t chunk = lane; chunk < chunks; chunk += kReduceLanes) {
      dw.add(partials[(2 * chunk) * dim + col]);
      db.add(partials[(2 * chunk + 1) * dim + col]);
    }
  }
  lane_sums[0][lane][column] = dw.value();
  lane_sums[1][lane][column] = db.value();
  __syncthreads();
  if (lane != 0 || col >= dim) return;
  CompensatedSum<A> dw_all, db_all;
  for (int l = 0; l < kReduceLanes; ++l) {
    dw_all.add(lane_sums[0][l][column]);
    db_all.add(lane_sums[1][l][column]);
  }
  if (dweight) dweight[col] = from_acc<T>(dw_all.value());
  if (dbias) dbias[col] = from_acc<T>(db_all.value());
}

}  // namespace

int64_t add_layer_norm_partial_rows(int64_t rows, int64_t dim) {
  if (rows == 0) return 0;
  const int64_t per_chunk = chunk_rows(rows, dim);
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
    const int vec_rows = pick_vec<T>(dim, x, residual, out, s);
    const int vec_affine = pick_vec<T>(dim, weight, bias);
    const int vec = vec_rows < vec_affine ? vec_rows : vec_affine;
    auto args = [&](auto kernel) {
      kernel<<<static_cast<unsigned int>(rows), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
          static_cast<const T*>(bias), static_cast<T*>(out), static_cast<T*>(s), static_cast<A*>(mean),
          static_cast<A*>(rstd), dim, static_cast<A>(eps), seed, threshold, static_cast<A>(scale));
    };
    dispatch_vec(vec, [&](auto v) {
      dropout ? args(add_layer_norm_kernel<T, v, true>) : args(add_layer_norm_kernel<T, v, false>);
    });
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
    const bool need_partials = dweight != nullptr || dbias != nullptr;
    const int64_t per_chunk = need_partials ? chunk_rows(rows, dim) : 1;
    const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
    const int vec_rows = pick_vec<T>(dim, grad_out, grad_s, s, dresidual);
    const int vec_affine = pick_vec<T>(dim, weight, dx);
    const int vec = vec_rows < vec_affine ? vec_rows : vec_affine;
    // a block's threads hold a row whole: one block per chunk, the partials added on the way
    const bool held_rows = need_partials && dim <= 512 * vec;
    auto args = [&](auto kernel) {  // one block per row
      kernel<<<static_cast<unsigned int>(rows), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(grad_s), static_cast<const T*>(s), mean_a, rstd_a,
          static_cast<const T*>(weight), static_cast<T*>(dresidual), static_cast<T*>(dx), dim, seed, threshold,
          static_cast<A>(scale));
    };
    auto held = [&](auto kernel) {  // one block per chunk of rows
      kernel<<<static_cast<unsigned int>(chunks), row_threads(dim, vec), 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(grad_s), static_cast<const T*>(s), mean_a, rstd_a,
          static_cast<const T*>(weight), static_cast<T*>(dresidual), static_cast<T*>(dx), static_cast<A*>(partials),
          rows, dim, per_chunk, seed, threshold, static_cast<A>(scale));
    };
    dispatch_vec(vec, [&](auto v) {
      if (held_rows) {
        dropout ? held(add_layer_norm_backward_chunk_kernel<T, v, true>)
                : held(add_layer_norm_backward_chunk_kernel<T, v, false>);
      } else {
        dropout ? args(add_layer_norm_backward_kernel<T, v, true>) : args(add_layer_norm_backward_kernel<T, v, false>);
      }
    });
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess || !need_partials) return error;
    if (!held_rows) {
      const dim3 grid(static_cast<unsigned int>((dim + kColumnThreads - 1) / kColumnThreads),
                      static_cast<unsigned int>(chunks));
      affine_partials_kernel<T><<<grid, kColumnThreads, 0, stream>>>(static_cast<const T*>(grad_out),
                                                                     static_cast<const T*>(s), mean_a, rstd_a,
                                                                     static_cast<A*>(partials), rows, dim, per_chunk);
    }
    affine_reduce_kernel<T><<<static_cast<unsigned int>((dim + 31) / 32), 32 * kReduceLanes, 0, stream>>>(
        static_cast<const A*>(partials), static_cast<T*>(dweight), static_cast<T*>(dbias), chunks, dim);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fasttf
