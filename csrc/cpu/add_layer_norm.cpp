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
#include <ATen/Parallel.h>

#include <cmath>

#include "../args.h"
#include "../ops.h"
#include "../philox.h"
#include "dropout.h"
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
  const auto stat_dtype = x_c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mean = at::empty({rows}, x_c.options().dtype(stat_dtype));
  auto rstd = at::empty({rows}, x_c.options().dtype(stat_dtype));
  const uint64_t seed_v = seed_value(seed);
  const bool dropout = dropout_p > 0.0;
  const bool affine = has(weight) || has(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "add_layer_norm_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const auto w = affine_or<scalar_t>(weight, dim, 1.0);
    const auto b = affine_or<scalar_t>(bias, dim, 0.0);
    const DropoutRow<acc_t> drop{seed_v, dropout_threshold(dropout_p), static_cast<acc_t>(1.0 / (1.0 - dropout_p))};
    const scalar_t* xp = x_c.data_ptr<scalar_t>();
    const scalar_t* rp = r_c.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* rstd_p = rstd.data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_buffer(dim), r_buffer(dim), s_buffer(dim), o_buffer(dim), m_buffer(dropout ? dim : 0);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t at_ = row * dim;
        const acc_t* xr = load_row<scalar_t, acc_t>(xp + at_, x_buffer.data(), dim);
        const acc_t* rr = load_row<scalar_t, acc_t>(rp + at_, r_buffer.data(), dim);
        acc_t* sr = output_row<scalar_t, acc_t>(sp + at_, s_buffer.data());
        if (dropout) {
          drop.fill(at_, dim, m_buffer.data());
          map3<acc_t>(sr, xr, m_buffer.data(), rr, dim, [](auto a, auto m, auto r) { return r + a * m; });
        } else {
          map2<acc_t>(sr, xr, rr, dim, [](auto a, auto r) { return r + a; });
        }
        // the statistics of s as stored (rounded to a 16-bit type), which the backward reads
        store_row<scalar_t, acc_t>(sr, sp + at_, dim);
        sr = const_cast<acc_t*>(load_row<scalar_t, acc_t>(sp + at_, s_buffer.data(), dim));
        const acc_t mu = vec_sum(sr, dim) / static_cast<acc_t>(dim);
        // sum of squared deviations, Vectorized
        Vec acc(acc_t(0));
        const Vec mu_vec(mu);
        int64_t j = 0;
        for (; j + Vec::size() <= dim; j += Vec::size()) {
          const Vec d = Vec::loadu(sr + j) - mu_vec;
          acc = at::vec::fmadd(d, d, acc);
        }
        acc_t sq = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, acc);
        for (; j < dim; ++j) sq += (sr[j] - mu) * (sr[j] - mu);
        const acc_t rs = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(dim) + static_cast<acc_t>(eps));
        mean_p[row] = mu;
        rstd_p[row] = rs;
        acc_t* orow = output_row<scalar_t, acc_t>(op + at_, o_buffer.data());
        const Vec rs_vec(rs);
        if (affine) {
          map3<acc_t>(orow, sr, w.data(), b.data(), dim, [&](auto v, auto wv, auto bv) {
            if constexpr (std::is_same_v<decltype(v), acc_t>) return (v - mu) * rs * wv + bv;
            else return at::vec::fmadd((v - mu_vec) * rs_vec, wv, bv);
          });
        } else {
          map2<acc_t>(orow, sr, sr, dim, [&](auto v, auto) {
            if constexpr (std::is_same_v<decltype(v), acc_t>) return (v - mu) * rs;
            else return (v - mu_vec) * rs_vec;
          });
        }
        store_row<scalar_t, acc_t>(orow, op + at_, dim);
      }
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
                    rows, " values (one per row), got ", mean.numel(), " and ", rstd.numel());
  const auto stat_dtype = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto dy_c = grad_out.contiguous();
  const auto s_c = s.contiguous();
  const auto mean_c = mean.contiguous().to(stat_dtype);
  const auto rstd_c = rstd.contiguous().to(stat_dtype);
  at::Tensor gs_c = has(grad_s) ? grad_s->contiguous() : at::Tensor();
  const bool dropout = dropout_p > 0.0;
  auto dres = at::empty_like(s_c);
  auto dx = dropout ? at::empty_like(s_c) : at::empty({0}, s_c.options());
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool need_partials = need_dweight || need_dbias;
  auto partials = at::empty({need_partials ? 2 * blocks : 0, dim}, s_c.options().dtype(stat_dtype));
  const uint64_t seed_v = seed_value(seed);
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_c.scalar_type(), "add_layer_norm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
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
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<acc_t> dy_buffer(dim), s_buffer(dim), gs_buffer(dim), g_buffer(dim), xhat(dim), ds_buffer(dim),
          dx_buffer(dim), m_buffer(dropout ? dim : 0);
      for (int64_t block = block_begin; block < block_end; ++block) {
        acc_t* dw_part = need_partials ? partial_p + (2 * block) * dim : nullptr;
        acc_t* db_part = need_partials ? partial_p + (2 * block + 1) * dim : nullptr;
        if (need_partials) {
          std::fill(dw_part, dw_part + dim, acc_t(0));
          std::fill(db_part, db_part + dim, acc_t(0));
        }
        const int64_t row_end = std::min(rows, (block + 1) * kRowsPerBlock);
        for (int64_t row = block * kRowsPerBlock; row < row_end; ++row) {
          const int64_t at_ = row * dim;
          const acc_t* dy = load_row<scalar_t, acc_t>(dyp + at_, dy_buffer.data(), dim);
          const acc_t* sr = load_row<scalar_t, acc_t>(sp + at_, s_buffer.data(), dim);
          const acc_t mu = mean_p[row], rs = rstd_p[row];
          const Vec mu_vec(mu), rs_vec(rs);
          // xhat, g = dy * w, and the two row sums
          Vec sum_g(acc_t(0)), sum_gx(acc_t(0));
          int64_t j = 0;
          for (; j + Vec::size() <= dim; j += Vec::size()) {
            const Vec xh = (Vec::loadu(sr + j) - mu_vec) * rs_vec;
            const Vec g = Vec::loadu(dy + j) * Vec::loadu(w.data() + j);
            xh.store(xhat.data() + j);
            g.store(g_buffer.data() + j);
            sum_g = sum_g + g;
            sum_gx = at::vec::fmadd(g, xh, sum_gx);
          }
          acc_t c1 = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, sum_g);
          acc_t c2 = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, sum_gx);
          for (; j < dim; ++j) {
            xhat[j] = (sr[j] - mu) * rs;
            g_buffer[j] = dy[j] * w[j];
            c1 += g_buffer[j];
            c2 += g_buffer[j] * xhat[j];
          }
          c1 /= static_cast<acc_t>(dim);
          c2 /= static_cast<acc_t>(dim);
          const Vec c1_vec(c1), c2_vec(c2);
          acc_t* ds = output_row<scalar_t, acc_t>(drp + at_, ds_buffer.data());
          map2<acc_t>(ds, g_buffer.data(), xhat.data(), dim, [&](auto g, auto xh) {
            if constexpr (std::is_same_v<decltype(g), acc_t>) return rs * (g - c1 - xh * c2);
            else return rs_vec * (g - c1_vec - xh * c2_vec);
          });
          if (gsp) {
            const acc_t* gs = load_row<scalar_t, acc_t>(gsp + at_, gs_buffer.data(), dim);
            map2<acc_t>(ds, ds, gs, dim, [](auto a, auto b) { return a + b; });
          }
          if (dropout) {
            drop.fill(at_, dim, m_buffer.data());
            acc_t* dxr = output_row<scalar_t, acc_t>(dxp + at_, dx_buffer.data());
            map2<acc_t>(dxr, ds, m_buffer.data(), dim, [](auto a, auto m) { return a * m; });
            store_row<scalar_t, acc_t>(dxr, dxp + at_, dim);
          }
          store_row<scalar_t, acc_t>(ds, drp + at_, dim);
          if (need_partials) {
            map3<acc_t>(dw_part, dw_part, dy, xhat.data(), dim,
                        [](auto acc, auto d, auto xh) { return acc + d * xh; });
            map2<acc_t>(db_part, db_part, dy, dim, [](auto acc, auto d) { return acc + d; });
          }
        }
      }
    });
    // stage 2: add the per-block partials in block order
    if (need_partials) {
      auto sum_w = at::empty({dim}, s_c.options().dtype(stat_dtype));
      auto sum_b = at::empty({dim}, s_c.options().dtype(stat_dtype));
      acc_t* targets[2] = {sum_w.data_ptr<acc_t>(), sum_b.data_ptr<acc_t>()};
      at::parallel_for(0, dim, 256, [&](int64_t begin, int64_t end) {
        for (int64_t k = 0; k < 2; ++k) {
          acc_t* target = targets[k];
          std::fill(target + begin, target + end, acc_t(0));
          for (int64_t block = 0; block < blocks; ++block) {
            const acc_t* part = partial_p + (2 * block + k) * dim;
            map2<acc_t>(target + begin, target + begin, part + begin, end - begin,
                        [](auto a, auto b) { return a + b; });
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
