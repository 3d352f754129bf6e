// residual_add on the CPU, one pass:
//   out = residual + x * m,   m = keep(seed, i) / (1 - p)   (m = 1 without dropout)
// backward:  dresidual = dy (no kernel),  dx = dy * m  (the mask regenerated from the seed).
// dropout (fasttf.dropout) is the same pass without a residual: out = input * m, backward dy * m.
#include <ATen/Parallel.h>

#include "../args.h"
#include "../ops.h"
#include "../philox.h"
#include "dropout.h"
#include "row_math.h"
#include "rows.h"

namespace fasttf {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;   // elements per step of the dropout multipliers: the buffer stays in L1
constexpr int64_t kGrain = 16384;  // elements a thread takes at least

// out = (residual ? residual : 0) + x * m over a flat contiguous tensor.
// out streamed past the caches when the call moves more bytes than they keep (row_math.h).
template <typename scalar_t>
void add_dropout(const scalar_t* x, const scalar_t* residual, scalar_t* out, int64_t n, double dropout_p,
                 uint64_t seed) {
  using acc_t = acc_type<scalar_t>;
  const bool stream = streams((residual ? 3 : 2) * n * static_cast<int64_t>(sizeof(scalar_t)));
  if (dropout_p == 0.0) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      add_rows(x + begin, residual ? residual + begin : nullptr, static_cast<const acc_t*>(nullptr), out + begin,
               end - begin, stream);
      if (stream) end_streamed_stores();
    });
    return;
  }
  const DropoutRow<acc_t> drop{seed, dropout_threshold(dropout_p), static_cast<acc_t>(1.0 / (1.0 - dropout_p))};
  if constexpr (std::is_same_v<scalar_t, float>) {
    // x * m with the multipliers in registers (dropout_scale, dropout.h: no multiplier buffer to fill),
    // then + residual in place while the chunk is in L1: the roundings of eager's `residual + x * m`
    // (x * m rounded, then the sum)
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (residual == nullptr) {  // dropout itself, residual_add's dx
        dropout_scale(seed, begin, end - begin, drop.threshold, drop.scale, x + begin, out + begin);
        return;
      }
      for (int64_t c = begin; c < end; c += kChunk) {
        const int64_t len = std::min(kChunk, end - c);
        dropout_scale(seed, c, len, drop.threshold, drop.scale, x + c, out + c);
        add_rows(out + c, residual + c, static_cast<const acc_t*>(nullptr), out + c, len, stream);
      }
      if (stream) end_streamed_stores();
    });
    return;
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t m_buffer[kChunk];
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t len = std::min(kChunk, end - c);
      drop.fill(c, len, m_buffer);
      add_rows(x + c, residual ? residual + c : nullptr, m_buffer, out + c, len, stream);
    }
    if (stream) end_streamed_stores();
  });
}

// t * m: dropout itself (fasttf.dropout, forward and backward) and residual_add's dx.
at::Tensor scaled_by_mask(const char* op, const char* name, const at::Tensor& t, double dropout_p,
                          const OptTensor& seed) {
  check_floating(op, t, name);
  check_dropout(op, dropout_p, seed);
  const auto t_c = t.contiguous();
  auto out = at::empty_like(t_c);
  const uint64_t seed_v = seed_value(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_c.scalar_type(), "scaled_by_mask_cpu", [&] {
    add_dropout<scalar_t>(t_c.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), t_c.numel(), dropout_p,
                          seed_v);
  });
  return out;
}

}  // namespace

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& residual, double dropout_p, const OptTensor& seed) {
  check_residual_pair("residual_add", x, residual);
  check_dropout("residual_add", dropout_p, seed);
  const auto x_c = x.contiguous();
  const auto r_c = residual.contiguous();
  auto out = at::empty_like(x_c);
  const uint64_t seed_v = seed_value(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "residual_add_cpu", [&] {
    add_dropout<scalar_t>(x_c.data_ptr<scalar_t>(), r_c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x_c.numel(),
                          dropout_p, seed_v);
  });
  return out;
}

at::Tensor residual_add_backward(const at::Tensor& grad, double dropout_p, const OptTensor& seed) {
  return scaled_by_mask("residual_add_backward", "grad", grad, dropout_p, seed);
}

at::Tensor dropout(const at::Tensor& input, double dropout_p, const OptTensor& seed) {
  return scaled_by_mask("dropout", "input", input, dropout_p, seed);
}

// keep[i] = philox word of (seed, i) >= floor(p * 2^32), for a tensor shaped like `like`.
at::Tensor dropout_keep_mask(const at::Tensor& like, double dropout_p, const OptTensor& seed) {
  check_dropout("dropout_keep_mask", dropout_p, seed);
  auto keep = at::empty(like.sizes(), like.options().dtype(at::kBool).memory_format(at::MemoryFormat::Contiguous));
  const uint64_t seed_v = seed_value(seed);
  const uint32_t threshold = dropout_threshold(dropout_p);
  bool* data = keep.data_ptr<bool>();
  at::parallel_for(0, keep.numel(), 16384, [&](int64_t begin, int64_t end) {
    dropout_keep_bytes(seed_v, begin, end - begin, threshold, data + begin);
  });
  return keep;
}

}  // namespace cpu
}  // namespace fasttf
