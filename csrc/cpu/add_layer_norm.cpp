// add_layer_norm on the CPU, one row of D values at a time (at::parallel_for over rows):
//   s    = residual + x * m                      (m: dropout multiplier, 1 without dropout)
//   mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps)
//   out  = (s - mean) * rstd * weight + bias
// backward, with xhat = (s - mean) * rstd and g = dout * weight:
//   ds        = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_s
//   dresidual = ds,   dx = ds * m
//   dweight   = sum_rows dout * xhat,   dbias = sum_rows dout
// dweight/dbias: a partial sum per fixed block of kRowsPerBlock rows, then the partials are added
// in block order, so the result does not depend on the number of threads.
// The row passes are in norm_rows.cpp: per row, the forward reads x and residual once and writes s
// and out (the statistics come from s in L1), the backward reads dy and s once and writes
// dresidual (and dx with dropout); see row_math.h for the vectorisation.
#include <ATen/Parallel.h>

#include <cmath>

#include "../args.h"
#include "../ops.h"
#include "../philox.h"
#include "dropout.h"
#include "row_math.h"
#include "rows.h"

namespace fasttf {
namespace cpu {
namespace {

constexpr int64_t kRowsPerBlock = 32;

template <typename scalar_t>
std::vector<acc_type<scalar_t>> affine_or(const OptTensor& param, int64_t dim, double fill) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> out(dim, static_cast<acc_t>(fill));
  if (has(param)) {
    const auto p = param->contiguous();
    const scalar_t* data = p.data_ptr<scalar_t>();
    for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<acc_t>(data[i]);
  }
  return out;
}

int64_t grain_rows(int64_t dim) { return std::max<int64_t>(1, 8192 / dim); }

}  // namespace

Tensor4 add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
                       const OptTensor& bias, double eps, double dropout_p, const OptTensor& seed) {
  check_add_layer_norm(x, residual, weight, bias, eps, dropout_p, seed);
  const auto x_c = x.contiguous();
  const auto r_c = residual.contiguous();
  const int64_t dim = x_c.size(-1);
  const int64_t rows = x_c.numel() / dim;
  auto out = at::empty_like(x_c);
  auto s = at::empty_like(x_c);
  auto mean = at::empty({rows}, x_c.options().dtype(stat_dtype(x_c)));
  auto rstd = at::empty({rows}, x_c.options().dtype(stat_dtype(x_c)));
  const uint64_t seed_v = seed_value(seed);
  const bool dropout = dropout_p > 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "add_layer_norm_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto w = affine_or<scalar_t>(weight, dim, 1.0);
    const auto b = affine_or<scalar_t>(bias, dim, 0.0);
    const DropoutRow<acc_t> drop{seed_v, dropout_threshold(dropout_p), static_cast<acc_t>(1.0 / (1.0 - dropout_p))};
    const scalar_t* xp = x_c.data_ptr<scalar_t>();
    const scalar_t* rp = r_c.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* rstd_p = rstd.data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);
    const bool stream = streams(4 * x_c.numel() * static_cast<int64_t>(sizeof(scalar_t)));  // out past the caches?
    at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
      const bool buffered = !std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> s_buffer(buffered ? kNormRowsAtOnce * dim : 0), m_buffer(dropout ? kNormRowsAtOnce * dim : 0);
      // without dropout all the rows in one call; with it kNormRowsAtOnce rows a call, their multipliers first
      const int64_t step = dropout ? kNormRowsAtOnce : end - begin;
      for (int64_t row = begin; row < end; row += step) {
        const int64_t count = std::min(step, end - row), at_ = row * dim;
        if (dropout) drop.fill(at_, count * dim, m_buffer.data());
        add_norm_rows(xp + at_, rp + at_, dropout ? m_buffer.data() : nullptr, w.data(), b.data(), eps_acc, sp + at_,
                      op + at_, s_buffer.data(), mean_p + row, rstd_p + row, dim, count, stream);
      }
      if (stream) end_streamed_stores();
    });
  });
  return {out, s, mean, rstd};
}

Tensor4 add_layer_norm_backward(const at::Tensor& grad_out, const OptTensor& grad_s, const at::Tensor& s,
                                const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                                bool need_dweight, bool need_dbias, double dropout_p, const OptTensor& seed) {
  const char* op = "add_layer_norm_backward";
  check_floating(op, s, "s");
  check_same_shape(op, s, "s", grad_out, "grad_out");
  check_same_dtype(op, s, "s", grad_out, "grad_out");
  if (has(grad_s)) {
    check_same_shape(op, s, "s", *grad_s, "grad_s");
    check_same_dtype(op, s, "s", *grad_s, "grad_s");
  }
  check_norm_affine(op, s, weight, "weight");
  check_dropout(op, dropout_p, seed);
  const int64_t dim = s.size(-1);
  const int64_t rows = dim == 0 ? 0 : s.numel() / dim;
  TORCH_CHECK_VALUE(mean.numel() == rows && rstd.numel() == rows, "fasttf.", op, ": expected mean and rstd of ",
                    int_str(rows), " values (one per row), got ", int_str(mean.numel()), " and ",
                    int_str(rstd.numel()));
  const auto dy_c = grad_out.contiguous();
  const auto s_c = s.contiguous();
  const auto mean_c = mean.contiguous().to(stat_dtype(s));
  const auto rstd_c = rstd.contiguous().to(stat_dtype(s));
  at::Tensor gs_c = has(grad_s) ? grad_s->contiguous() : at::Tensor();
  const bool dropout = dropout_p > 0.0;
  auto dres = at::empty_like(s_c);
  auto dx = dropout ? at::empty_like(s_c) : at::empty({0}, s_c.options());
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool need_partials = need_dweight || need_dbias;
  auto partials = at::empty({need_partials ? 2 * blocks : 0, dim}, s_c.options().dtype(stat_dtype(s_c)));
  const uint64_t seed_v = seed_value(seed);
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_c.scalar_type(), "add_layer_norm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto w = affine_or<scalar_t>(weight, dim, 1.0);
    const DropoutRow<acc_t> drop{seed_v, dropout_threshold(dropout_p), static_cast<acc_t>(1.0 / (1.0 - dropout_p))};
    const scalar_t* dyp = dy_c.data_ptr<scalar_t>();
    const scalar_t* gsp = gs_c.defined() ? gs_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = s_c.data_ptr<scalar_t>();
    const acc_t* mean_p = mean_c.data_ptr<acc_t>();
    const acc_t* rstd_p = rstd_c.data_ptr<acc_t>();
    scalar_t* drp = dres.data_ptr<scalar_t>();
    scalar_t* dxp = dropout ? dx.data_ptr<scalar_t>() : nullptr;
    acc_t* partial_p = need_partials ? partials.data_ptr<acc_t>() : nullptr;
    const int64_t passes = 3 + (gsp ? 1 : 0) + (dropout ? 1 : 0);  // dy, s, ds (grad_s, dx)
    const bool stream = streams(passes * s_c.numel() * static_cast<int64_t>(sizeof(scalar_t)));
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
      const int64_t scratch = kNormRowsAtOnce * dim;
      std::vector<acc_t> dy_buffer(kSame ? 0 : scratch), s_buffer(kSame ? 0 : scratch), m_buffer(dropout ? scratch : 0);
      for (int64_t block = block_begin; block < block_end; ++block) {
        acc_t* dw_part = need_partials ? partial_p + (2 * block) * dim : nullptr;
        acc_t* db_part = need_partials ? partial_p + (2 * block + 1) * dim : nullptr;
        if (need_partials) {
          std::fill(dw_part, dw_part + dim, acc_t(0));
          std::fill(db_part, db_part + dim, acc_t(0));
        }
        // the block's rows in one call; with dropout kNormRowsAtOnce rows a call, their multipliers first
        const int64_t row_end = std::min(rows, (block + 1) * kRowsPerBlock);
        const int64_t step = dropout ? kNormRowsAtOnce : kRowsPerBlock;
        for (int64_t row = block * kRowsPerBlock; row < row_end; row += step) {
          const int64_t count = std::min(step, row_end - row), at_ = row * dim;
          if (dropout) drop.fill(at_, count * dim, m_buffer.data());
          add_norm_backward_rows(dyp + at_, sp + at_, gsp ? gsp + at_ : nullptr, dropout ? m_buffer.data() : nullptr,
                                 w.data(), mean_p + row, rstd_p + row, drp + at_, dxp ? dxp + at_ : nullptr, dw_part,
                                 db_part, dy_buffer.data(), s_buffer.data(), dim, count, stream);
        }
      }
      if (stream) end_streamed_stores();
    });
    // stage 2: add the per-block partials in block order
    if (need_partials) {
      auto sum_w = at::empty({dim}, s_c.options().dtype(stat_dtype(s_c)));
      auto sum_b = at::empty({dim}, s_c.options().dtype(stat_dtype(s_c)));
      acc_t* targets[2] = {sum_w.data_ptr<acc_t>(), sum_b.data_ptr<acc_t>()};
      at::parallel_for(0, dim, 256, [&](int64_t begin, int64_t end) {
        for (int64_t k = 0; k < 2; ++k) {
          acc_t* target = targets[k];
          std::fill(target + begin, target + end, acc_t(0));
          for (int64_t block = 0; block < blocks; ++block) {
            const acc_t* part = partial_p + (2 * block + k) * dim;
            add_rows(part + begin, target + begin, static_cast<const acc_t*>(nullptr), target + begin, end - begin);
          }
        }
      });
      dweight = need_dweight ? sum_w.to(s_c.scalar_type()) : at::Tensor();
      dbias = need_dbias ? sum_b.to(s_c.scalar_type()) : at::Tensor();
    }
  });
  if (!dweight.defined()) dweight = at::empty({0}, s_c.options());
  if (!dbias.defined()) dbias = at::empty({0}, s_c.options());
  return {dres, dx, dweight, dbias};
}

}  // namespace cpu
}  // namespace fasttf
