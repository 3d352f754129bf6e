// The CUDA implementations of the fasttf ops (compiled only in a CUDA build, FASTTF_WITH_CUDA):
// the shared argument checks, contiguous inputs and fresh outputs, then the raw-pointer
// launchers of the .cu files on the current stream. The dtypes are the CPU's: float32, float64,
// float16 and bfloat16.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "../args.h"
#include "../ops.h"
#include "launchers.h"

namespace fasttf {
namespace cuda {
namespace {

DType cuda_dtype(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fasttf.", op, ": expected float32, float64, float16 or bfloat16 tensors, got ",
                  t.scalar_type());
  }
}

void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "fasttf.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mut_ptr_or_null(at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

// PE of positions [0, rows) cached per (device, D, base, compute type), as the CPU op caches its
// own table (csrc/cpu/positional_encoding.cpp), sized by the same rule (sinusoid_table_rows,
// args.h); an undefined tensor where none fits. A new table is built on
// `stream`, which is then synchronised: another stream may read the table next. While `stream` is
// captured into a CUDA graph nothing is built (a sync is not allowed there); the table at hand is
// used and the positions past it are computed in the kernel.
at::Tensor sinusoid_table(const at::Device& device, int64_t dim, double base, bool float64, int64_t positions,
                          cudaStream_t stream) {
  const int64_t row_bytes = dim * (float64 ? 8 : 4);
  if (positions <= 0 || sinusoid_table_rows(positions, 0, row_bytes) == 0) return at::Tensor();
  static std::mutex mutex;
  // never destroyed: freeing CUDA memory in a static destructor can run after the CUDA context is gone
  static auto* tables = new std::map<std::tuple<int, int64_t, double, bool>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(static_cast<int>(device.index()), dim, base, float64);
  const auto found = tables->find(key);
  if (found != tables->end() && found->second.size(0) >= positions) return found->second;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return found != tables->end() ? found->second : at::Tensor();
  const int64_t rows = sinusoid_table_rows(positions, found != tables->end() ? found->second.size(0) : 0, row_bytes);
  auto table = at::empty({rows, dim}, at::TensorOptions().device(device).dtype(float64 ? at::kDouble : at::kFloat));
  check_launch("positional_encoding", launch_sinusoid_table(float64, table.data_ptr(), rows, dim, base, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  (*tables)[key] = table;
  return table;
}

}  // namespace

at::Tensor positional_encoding(const at::Tensor& x, const OptTensor& offsets, int64_t offset, double scale,
                               double base, bool batch_first) {
  const PositionLayout layout = check_positional_encoding(x, offsets, base, batch_first);
  const DType dtype = cuda_dtype("positional_encoding", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_c = x.contiguous();
  auto y = at::empty_like(x_c);
  at::Tensor offsets_c = has(offsets) ? offsets->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // the positions the table should hold: t + offset for every t (a far offset: [0, T) only, the rest
  // computed); with per-sequence offsets, unknown here without a sync: [0, T)
  const bool one_offset = !offsets_c.defined() && offset >= 0 && offset < (int64_t(1) << 32);
  const at::Tensor table = layout.rows == 0 ? at::Tensor() :
      sinusoid_table(x.device(), layout.dim, base, dtype == DType::kFloat64,
                     one_offset ? offset + layout.t_mod : layout.t_mod, stream);
  PositionArgs args{layout.rows, layout.dim, layout.t_div, layout.t_mod, layout.n_div, layout.n_mod, offset,
                    offsets_c.defined() ? offsets_c.data_ptr<int64_t>() : nullptr, scale, base,
                    table.defined() ? table.data_ptr() : nullptr, table.defined() ? table.size(0) : 0};
  check_launch("positional_encoding", launch_positional_encoding(dtype, x_c.data_ptr(), y.data_ptr(), args, stream));
  return y;
}

at::Tensor positional_encoding_backward(const at::Tensor& grad, double scale) {
  const DType dtype = cuda_dtype("positional_encoding_backward", grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  auto dx = at::empty_like(g);
  check_launch("positional_encoding_backward", launch_scale(dtype, g.data_ptr(), dx.data_ptr(), g.numel(), scale,
                                                            c10::cuda::getCurrentCUDAStream()));
  return dx;
}

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& residual, double dropout_p, const OptTensor& seed) {
  check_residual_pair("residual_add", x, residual);
  check_dropout("residual_add", dropout_p, seed);
  const DType dtype = cuda_dtype("residual_add", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_c = x.contiguous();
  const auto r_c = residual.contiguous();
  auto out = at::empty_like(x_c);
  check_launch("residual_add", launch_residual_add(dtype, x_c.data_ptr(), r_c.data_ptr(), out.data_ptr(),
                                                   x_c.numel(), dropout_p, seed_value(seed),
                                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

namespace {
// t * m: residual_add's dx and dropout itself (forward and backward).
at::Tensor scaled_by_mask(const char* op, const at::Tensor& t, double dropout_p, const OptTensor& seed) {
  check_dropout(op, dropout_p, seed);
  const DType dtype = cuda_dtype(op, t);
  const c10::cuda::CUDAGuard guard(t.device());
  const auto t_c = t.contiguous();
  auto out = at::empty_like(t_c);
  check_launch(op, launch_residual_add(dtype, t_c.data_ptr(), nullptr, out.data_ptr(), t_c.numel(), dropout_p,
                                       seed_value(seed), c10::cuda::getCurrentCUDAStream()));
  return out;
}
}  // namespace

at::Tensor residual_add_backward(const at::Tensor& grad, double dropout_p, const OptTensor& seed) {
  return scaled_by_mask("residual_add_backward", grad, dropout_p, seed);
}

at::Tensor dropout(const at::Tensor& input, double dropout_p, const OptTensor& seed) {
  return scaled_by_mask("dropout", input, dropout_p, seed);
}

at::Tensor dropout_keep_mask(const at::Tensor& like, double dropout_p, const OptTensor& seed) {
  check_dropout("dropout_keep_mask", dropout_p, seed);
  const c10::cuda::CUDAGuard guard(like.device());
  auto keep = at::empty(like.sizes(), like.options().dtype(at::kBool).memory_format(at::MemoryFormat::Contiguous));
  check_launch("dropout_keep_mask", launch_dropout_keep_mask(keep.data_ptr<bool>(), keep.numel(), dropout_p,
                                                             seed_value(seed), c10::cuda::getCurrentCUDAStream()));
  return keep;
}

Tensor4 add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
                       const OptTensor& bias, double eps, double dropout_p, const OptTensor& seed) {
  check_add_layer_norm(x, residual, weight, bias, eps, dropout_p, seed);
  const DType dtype = cuda_dtype("add_layer_norm", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_c = x.contiguous();
  const auto r_c = residual.contiguous();
  const at::Tensor w_c = has(weight) ? weight->contiguous() : at::Tensor();
  const at::Tensor b_c = has(bias) ? bias->contiguous() : at::Tensor();
  const int64_t dim = x_c.size(-1);
  const int64_t rows = x_c.numel() / dim;
  auto out = at::empty_like(x_c);
  auto s = at::empty_like(x_c);
  auto mean = at::empty({rows}, x_c.options().dtype(stat_dtype(x_c)));
  auto rstd = at::empty({rows}, x_c.options().dtype(stat_dtype(x_c)));
  check_launch("add_layer_norm",
               launch_add_layer_norm(dtype, x_c.data_ptr(), r_c.data_ptr(), ptr_or_null(w_c), ptr_or_null(b_c),
                                     out.data_ptr(), s.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                     rows, dim, eps, dropout_p, seed_value(seed), c10::cuda::getCurrentCUDAStream()));
  return {out, s, mean, rstd};
}

Tensor4 add_layer_norm_backward(const at::Tensor& grad_out, const OptTensor& grad_s, const at::Tensor& s,
                                const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                                bool need_dweight, bool need_dbias, double dropout_p, const OptTensor& seed) {
  const char* op = "add_layer_norm_backward";
  check_same_shape(op, s, "s", grad_out, "grad_out");
  check_same_dtype(op, s, "s", grad_out, "grad_out");
  if (has(grad_s)) {
    check_same_shape(op, s, "s", *grad_s, "grad_s");
    check_same_dtype(op, s, "s", *grad_s, "grad_s");
  }
  check_norm_affine(op, s, weight, "weight");
  check_dropout(op, dropout_p, seed);
  const DType dtype = cuda_dtype(op, s);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t dim = s.size(-1);
  const int64_t rows = dim == 0 ? 0 : s.numel() / dim;
  TORCH_CHECK_VALUE(mean.numel() == rows && rstd.numel() == rows, "fasttf.", op, ": expected mean and rstd of ",
                    int_str(rows), " values (one per row), got ", int_str(mean.numel()), " and ",
                    int_str(rstd.numel()));
  const auto dy_c = grad_out.contiguous();
  const auto s_c = s.contiguous();
  const auto mean_c = mean.contiguous().to(stat_dtype(s));
  const auto rstd_c = rstd.contiguous().to(stat_dtype(s));
  const at::Tensor gs_c = has(grad_s) ? grad_s->contiguous() : at::Tensor();
  const at::Tensor w_c = has(weight) ? weight->contiguous() : at::Tensor();
  const bool dropout = dropout_p > 0.0;
  auto dres = at::empty_like(s_c);
  auto dx = dropout ? at::empty_like(s_c) : at::empty({0}, s_c.options());
  auto dweight = at::empty({need_dweight ? dim : 0}, s_c.options());
  auto dbias = at::empty({need_dbias ? dim : 0}, s_c.options());
  const bool need_partials = need_dweight || need_dbias;
  auto partials = at::empty({need_partials ? add_layer_norm_partial_rows(rows, dim) : 0, dim},
                            s_c.options().dtype(stat_dtype(s_c)));
  check_launch(op, launch_add_layer_norm_backward(
                       dtype, dy_c.data_ptr(), ptr_or_null(gs_c), s_c.data_ptr(), mean_c.data_ptr(),
                       rstd_c.data_ptr(), ptr_or_null(w_c), dres.data_ptr(), mut_ptr_or_null(dx),
                       mut_ptr_or_null(dweight), mut_ptr_or_null(dbias),
                       need_partials ? partials.data_ptr() : nullptr, rows, dim, dropout_p, seed_value(seed),
                       c10::cuda::getCurrentCUDAStream()));
  return {dres, dx, dweight, dbias};
}

}  // namespace cuda
}  // namespace fasttf
