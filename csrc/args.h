// Argument checks and shapes shared by the CPU and CUDA entry points of every op. Each check
// names the op and the argument (TORCH_CHECK raises RuntimeError, TORCH_CHECK_VALUE ValueError).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace fasttf {

inline void check_dropout(const char* op, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fasttf.", op, ": expected dropout_p in [0, 1), got ",
                    float_str(dropout_p));
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->defined(), "fasttf.", op,
                      ": dropout_p > 0 needs a seed (a 0-dim int64 CPU tensor)");
  }
  if (seed.has_value() && seed->defined()) {
    TORCH_CHECK_VALUE(seed->dim() == 0 && seed->scalar_type() == at::kLong && seed->device().is_cpu(), "fasttf.",
                      op, ": expected seed to be a 0-dim int64 CPU tensor, got ", seed->scalar_type(), " of shape ",
                      shape_str(seed->sizes()), " on ", seed->device().str());
  }
}

inline uint64_t seed_value(const std::optional<at::Tensor>& seed) {
  return (seed.has_value() && seed->defined()) ? static_cast<uint64_t>(seed->item<int64_t>()) : 0u;
}

// Where row r of a contiguous x of positional_encoding sits:  t = (r / t_div) % t_mod,
// n = (r / n_div) % n_mod;  its position is t + offset (or t + offsets[n]).
struct PositionLayout {
  int64_t rows, dim, length, batch;
  int64_t t_div, t_mod, n_div, n_mod;
};

inline PositionLayout check_positional_encoding(const at::Tensor& x, const std::optional<at::Tensor>& offsets,
                                                double base, bool batch_first) {
  const char* op = "positional_encoding";
  check_floating(op, x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "fasttf.positional_encoding: expected x of shape (N, T, D), ",
                    "(T, N, D) or (T, D), got ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(base > 0.0, "fasttf.positional_encoding: expected base > 0, got ", float_str(base));
  PositionLayout layout{};
  layout.dim = x.size(-1);
  layout.rows = layout.dim == 0 ? 0 : x.numel() / layout.dim;
  if (x.dim() == 2) {
    layout.length = x.size(0);
    layout.batch = 1;
    layout.t_div = 1, layout.t_mod = layout.length, layout.n_div = 1, layout.n_mod = 1;
  } else if (batch_first) {
    layout.batch = x.size(0), layout.length = x.size(1);
    layout.t_div = 1, layout.t_mod = layout.length, layout.n_div = layout.length, layout.n_mod = layout.batch;
  } else {
    layout.length = x.size(0), layout.batch = x.size(1);
    layout.t_div = layout.batch, layout.t_mod = layout.length, layout.n_div = 1, layout.n_mod = layout.batch;
  }
  if (layout.t_mod == 0) layout.t_mod = 1;
  if (layout.n_mod == 0) layout.n_mod = 1;
  if (offsets.has_value() && offsets->defined()) {
    const auto& o = *offsets;
    check_same_device(op, x, "x", o, "offset");
    TORCH_CHECK_VALUE(o.scalar_type() == at::kLong, "fasttf.positional_encoding: expected offset to be an int or ",
                      "an int64 tensor, got ", o.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 3 && o.dim() == 1 && o.size(0) == layout.batch,
                      "fasttf.positional_encoding: expected a tensor offset of shape (N,) = (", int_str(layout.batch),
                      ",) for x of shape ", shape_str(x.sizes()), " (batch_first=", bool_str(batch_first), "), got ",
                      shape_str(o.sizes()));
  }
  return layout;
}

inline void check_residual_pair(const char* op, const at::Tensor& x, const at::Tensor& residual) {
  check_same_device(op, x, "x", residual, "residual");
  check_floating(op, x, "x");
  check_same_dtype(op, x, "x", residual, "residual");
  check_same_shape(op, x, "x", residual, "residual");
}

inline void check_norm_affine(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& param,
                              const char* name) {
  if (!param.has_value() || !param->defined()) return;
  check_same_device(op, x, "x", *param, name);
  check_same_dtype(op, x, "x", *param, name);
  TORCH_CHECK_VALUE(param->dim() == 1 && param->size(0) == x.size(-1), "fasttf.", op, ": expected ", name,
                    " of shape (", int_str(x.size(-1)), ",) (the last dim of x), got ",
                    shape_str(param->sizes()));
}

inline void check_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "add_layer_norm";
  check_residual_pair(op, x, residual);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "fasttf.add_layer_norm: expected x with a non-empty last dim, ",
                    "got ", shape_str(x.sizes()));
  check_norm_affine(op, x, weight, "weight");
  check_norm_affine(op, x, bias, "bias");
  TORCH_CHECK_VALUE(eps >= 0.0, "fasttf.add_layer_norm: expected eps >= 0, got ", float_str(eps));
  check_dropout(op, dropout_p, seed);
}

// positional_encoding's PE tables (CPU and CUDA), cached per (D, base, compute type): the rows a table
// that must hold `positions` rows gets, where the one held now has `held_rows` (0: none) -- at
// least 1024, at least double the held one, at most kMaxSinusoidTableBytes -- or 0 where `positions`
// rows of `row_bytes` do not fit.
constexpr int64_t kMaxSinusoidTableBytes = int64_t(64) << 20;
inline int64_t sinusoid_table_rows(int64_t positions, int64_t held_rows, int64_t row_bytes) {
  const int64_t max_rows = row_bytes > 0 ? kMaxSinusoidTableBytes / row_bytes : 0;
  if (positions > max_rows) return 0;
  return std::min(std::max<int64_t>({positions, 1024, 2 * held_rows}), max_rows);  // >= positions: fits
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// add_layer_norm's mean and rstd (and its dweight/dbias partial sums): float64 for float64, else float32.
inline at::ScalarType stat_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fasttf
