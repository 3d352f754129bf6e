// The CUDA launchers: raw pointers and a cudaStream_t, no torch types, so the .cu files compile
// with `nvcc -c` alone. dispatch.cpp maps at::Tensor arguments onto these.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fasttf {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Row r of x: t = (r / t_div) % t_mod, n = (r / n_div) % n_mod; position = t + (offsets ? offsets[n] : offset).
struct PositionArgs {
  int64_t rows, dim, t_div, t_mod, n_div, n_mod, offset;
  const int64_t* offsets;  // device pointer or nullptr
  double scale;
  double base;
  // PE of positions [0, table_rows), [table_rows][dim] values of the compute type (float, or
  // double for float64 tensors), from launch_sinusoid_table; nullptr: every value computed.
  const void* table;
  int64_t table_rows;
};

// y = x * scale + PE(position): PE read from args.table where it holds the position, else
// computed in registers (float64 angles, the same expression and bits as the table's).
cudaError_t launch_positional_encoding(DType dtype, const void* x, void* y, const PositionArgs& args,
                                       cudaStream_t stream);

// table[p, i] = PE(p, i) for p < rows, in float64 rounded to float (or kept in double).
cudaError_t launch_sinusoid_table(bool float64, void* table, int64_t rows, int64_t dim, double base,
                                  cudaStream_t stream);

// out = scale * x (the positional encoding's backward).
cudaError_t launch_scale(DType dtype, const void* x, void* out, int64_t n, double scale, cudaStream_t stream);

// out = (residual ? residual : 0) + x * m,  m = keep(seed, i) / (1 - p) (1 when p == 0).
cudaError_t launch_residual_add(DType dtype, const void* x, const void* residual, void* out, int64_t n,
                                double dropout_p, uint64_t seed, cudaStream_t stream);

// keep[i] = philox(seed, i) >= floor(p * 2^32)
cudaError_t launch_dropout_keep_mask(bool* keep, int64_t n, double dropout_p, uint64_t seed, cudaStream_t stream);

// s = residual + x * m; out = (s - mean) * rstd * weight + bias; mean/rstd per row, in the compute type
// (float64 for float64 tensors, else float32).
cudaError_t launch_add_layer_norm(DType dtype, const void* x, const void* residual, const void* weight,
                                  const void* bias, void* out, void* s, void* mean, void* rstd, int64_t rows,
                                  int64_t dim, double eps, double dropout_p, uint64_t seed, cudaStream_t stream);

// Rows: ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_s, g = dout * weight; dresidual = ds,
// dx = ds * m (when dx != nullptr). Then dweight/dbias (when not nullptr) in two deterministic stages:
// per-(row chunk, column) partial sums into `partials` (compute type, partial_rows(rows, dim) * dim values),
// then one deterministic reduce over the chunks.
int64_t add_layer_norm_partial_rows(int64_t rows, int64_t dim);
cudaError_t launch_add_layer_norm_backward(DType dtype, const void* grad_out, const void* grad_s, const void* s,
                                           const void* mean, const void* rstd, const void* weight,
                                           void* dresidual, void* dx, void* dweight, void* dbias, void* partials,
                                           int64_t rows, int64_t dim, double dropout_p, uint64_t seed,
                                           cudaStream_t stream);

}  // namespace cuda
}  // namespace fasttf
