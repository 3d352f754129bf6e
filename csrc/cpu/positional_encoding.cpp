// positional_encoding on the CPU:  y[r, i] = x[r, i] * scale + PE[p(r), i]
//   PE[p, 2k] = sin(p * w_k),  PE[p, 2k + 1] = cos(p * w_k),  w_k = base^(-2k / D)
// p(r) = t(r) + offset (or + offsets[n(r)]), see PositionLayout in ../args.h.
//
// PE comes from a table cached per (D, base, float|double), computed in float64 once and grown
// as positions need it: one fused pass that reads x and the table and writes y measured faster
// than computing sin/cos per element (see the issue-4 note). Positions outside the table's range
// (negative, or a table over kMaxSinusoidTableBytes, args.h) are computed directly in float64.
#include <ATen/Parallel.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "../args.h"
#include "../ops.h"
#include "row_math.h"
#include "rows.h"

namespace fasttf {
namespace cpu {
namespace {


// w_k = base^(-2k / D) for every dim i (k = i / 2), in float64 as the reference computes it.
std::vector<double> inverse_frequencies(int64_t dim, double base) {
  std::vector<double> inv(dim);
  for (int64_t i = 0; i < dim; ++i) inv[i] = std::pow(base, -(2.0 * static_cast<double>(i / 2)) / dim);
  return inv;
}

template <typename acc_t>
void sinusoid_row(int64_t position, const std::vector<double>& inv_freq, acc_t* out) {
  const int64_t dim = static_cast<int64_t>(inv_freq.size());
  for (int64_t i = 0; i < dim; ++i) {
    const double angle = static_cast<double>(position) * inv_freq[i];
    out[i] = static_cast<acc_t>((i & 1) ? std::cos(angle) : std::sin(angle));
  }
}

// The cached table for positions [0, rows) (at least), or an undefined tensor when too big.
at::Tensor sinusoid_table(int64_t dim, double base, at::ScalarType acc_dtype, int64_t positions) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, double, int>, at::Tensor> tables;
  const int64_t row_bytes = dim * (acc_dtype == at::kDouble ? 8 : 4);
  if (sinusoid_table_rows(positions, 0, row_bytes) == 0) return at::Tensor();
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(dim, base, static_cast<int>(acc_dtype));
  auto found = tables.find(key);
  if (found != tables.end() && found->second.size(0) >= positions) return found->second;
  const int64_t rows = sinusoid_table_rows(positions, found != tables.end() ? found->second.size(0) : 0, row_bytes);
  auto table = at::empty({rows, dim}, at::TensorOptions().dtype(acc_dtype));
  const auto inv_freq = inverse_frequencies(dim, base);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "sinusoid_table", [&] {
    scalar_t* data = table.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) sinusoid_row<scalar_t>(p, inv_freq, data + p * dim);
    });
  });
  tables[key] = table;
  return table;
}

}  // namespace

at::Tensor positional_encoding(const at::Tensor& x, const OptTensor& offsets, int64_t offset, double scale,
                               double base, bool batch_first) {
  const PositionLayout layout = check_positional_encoding(x, offsets, base, batch_first);
  const auto x_c = x.contiguous();
  auto y = at::empty_like(x_c);
  if (layout.rows == 0) return y;
  const int64_t dim = layout.dim;
  at::Tensor offsets_c;
  const int64_t* offset_data = nullptr;
  int64_t min_offset = offset, max_offset = offset;
  if (has(offsets)) {
    offsets_c = offsets->contiguous();
    offset_data = offsets_c.data_ptr<int64_t>();
    for (int64_t n = 0; n < layout.batch; ++n) {
      min_offset = n == 0 ? offset_data[n] : std::min(min_offset, offset_data[n]);
      max_offset = n == 0 ? offset_data[n] : std::max(max_offset, offset_data[n]);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "positional_encoding_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    at::Tensor table;
    if (min_offset >= 0) table = sinusoid_table(dim, base, acc_dtype, max_offset + layout.length);
    const acc_t* table_data = table.defined() ? table.data_ptr<acc_t>() : nullptr;
    const std::vector<double> inv_freq = table_data ? std::vector<double>() : inverse_frequencies(dim, base);
    const scalar_t* xp = x_c.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t scale_acc = static_cast<acc_t>(scale);
    const bool stream = streams(2 * x_c.numel() * static_cast<int64_t>(sizeof(scalar_t)));  // y past the caches?
    at::parallel_for(0, layout.rows, std::max<int64_t>(1, 16384 / dim), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> pe_buffer(table_data ? 0 : dim);
      int64_t rows_taken;
      for (int64_t r = begin; r < end; r += rows_taken) {
        const int64_t t = (r / layout.t_div) % layout.t_mod;
        const int64_t n = (r / layout.n_div) % layout.n_mod;
        const int64_t position = t + (offset_data ? offset_data[n] : offset);
        const acc_t* pe;
        rows_taken = 1;
        if (table_data) {
          pe = table_data + position * dim;
          // (N, T, D) and (T, D): the next rows of one sequence are the next positions, the next rows
          // of the table, so a run of them is one call over run * D values (per row, a call's fixed
          // cost was most of a row of 64 values)
          if (layout.t_div == 1) rows_taken = std::min(end - r, layout.t_mod - t);
        } else {
          sinusoid_row<acc_t>(position, inv_freq, pe_buffer.data());
          pe = pe_buffer.data();
        }
        scale_add_rows(xp + r * dim, scale_acc, pe, yp + r * dim, rows_taken * dim, stream);
      }
      if (stream) end_streamed_stores();
    });
  });
  return y;
}

// dx = dy * scale
at::Tensor positional_encoding_backward(const at::Tensor& grad, double scale) {
  check_floating("positional_encoding_backward", grad, "grad");
  const auto g = grad.contiguous();
  auto dx = at::empty_like(g);
  const int64_t n = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "positional_encoding_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t scale_acc = static_cast<acc_t>(scale);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const bool stream = streams(2 * n * static_cast<int64_t>(sizeof(scalar_t)));
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      scale_add_rows(gp + begin, scale_acc, static_cast<const acc_t*>(nullptr), dp + begin, end - begin, stream);
      if (stream) end_streamed_stores();
    });
  });
  return dx;
}

}  // namespace cpu
}  // namespace fasttf
