// The attention weights W = p z (after dropout, as torch's multi-head attention returns them),
// recomputed from the saved lse: p = exp(scale Q K^T + bias - lse) tile by tile (attention.h).
// average_heads: one task per (batch, query block) sums its H heads in a row buffer and writes
// the mean, so no (N, H, L, S) tensor is made. And the dropout keep-mask the kernels draw, for
// tests to replay.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "attention.h"

namespace fasttf {
namespace cpu {
namespace attention {
namespace {

// w[(task rows) x S] (+)= p z for head h of batch b, rows [i0, i1); keys past the causal end untouched.
template <typename acc_t, typename in_t>
void head_weights(const Problem<acc_t, in_t>& p, const acc_t* lse, int64_t b, int64_t h, int64_t i0, int64_t i1,
                  acc_t* w, bool accumulate, std::vector<acc_t>& tile, std::vector<acc_t>& z) {
  const int64_t rows = i1 - i0, hk = h / p.group, key_end = p.key_end(i1);
  for (int64_t j0 = 0; j0 < key_end; j0 += kBlockN) {
    const int64_t n = std::min(j0 + kBlockN, key_end) - j0;
    const int64_t r0 = p.row_start(i0, j0) - i0;
    gemm(false, true, rows - r0, n, p.E, p.scale, p.q_row(b, h, i0 + r0), p.q_sl, p.k_row(b, hk, j0), p.k_sl,
         acc_t(0), tile.data() + r0 * kBlockN, kBlockN);
    for (int64_t r = r0; r < rows; ++r) {
      acc_t* row = tile.data() + r * kBlockN;
      const acc_t l = lse[(b * p.H + h) * p.L + i0 + r];
      if (l == std::numeric_limits<acc_t>::infinity()) continue;  // fully masked row: weights 0
      add_bias(row, n, p.mask, b, h, i0 + r, j0, p.causal);
      exp_shift_sum(row, n, l);
      if (p.dropout.on) {
        apply_dropout(p.dropout, p.flat(b, h, i0 + r, j0), n, row, z.data());
      }
      acc_t* dst = w + r * p.S + j0;
      if (accumulate) {
        for (int64_t j = 0; j < n; ++j) dst[j] += row[j];
      } else {
        std::copy(row, row + n, dst);
      }
    }
  }
}

template <typename acc_t, typename in_t>
void weights_kernel(const Problem<acc_t, in_t>& p, const acc_t* lse, bool average_heads, acc_t* w) {
  const int64_t blocks_m = (p.L + kBlockM - 1) / kBlockM;
  const int64_t heads = average_heads ? 1 : p.H;
  at::parallel_for(0, p.N * heads * blocks_m, 1, [&](int64_t begin, int64_t end) {
    SingleThreadBlas single_thread_blas;
    std::vector<acc_t> tile(kBlockM * kBlockN), z(kBlockN);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks_m, i0 = (task % blocks_m) * kBlockM, i1 = std::min(i0 + kBlockM, p.L);
      acc_t* dst = w + (bh * p.L + i0) * p.S;  // zero-filled by the caller
      if (!average_heads) {
        head_weights(p, lse, bh / p.H, bh % p.H, i0, i1, dst, false, tile, z);
        continue;
      }
      for (int64_t h = 0; h < p.H; ++h) head_weights(p, lse, bh, h, i0, i1, dst, true, tile, z);
      const acc_t inv = acc_t(1) / static_cast<acc_t>(p.H);
      for (int64_t x = 0; x < (i1 - i0) * p.S; ++x) dst[x] *= inv;
    }
  });
}

}  // namespace
}  // namespace attention

at::Tensor native_attention_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                    const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
                                    const OptTensor& seed, bool average_heads) {
  using namespace attention;
  check_inputs("native_attention_weights", q, k, k, attn_mask, dropout_p, seed);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "fasttf.native_attention_weights: expected lse of shape (N, H, L), got ", shape_str(lse.sizes()));
  const auto qa = as_kernel_operand(q), ka = as_kernel_operand(k);
  const auto acc = qa.options().dtype(qa.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto lsea = lse.to(acc).contiguous();
  const int64_t N = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2);
  auto w = average_heads ? at::zeros({N, L, S}, acc) : at::zeros({N, H, L, S}, acc);
  if (qa.scalar_type() == at::kDouble) {
    weights_kernel(make_problem<double>(qa, ka, ka, attn_mask, dropout_p, is_causal, scale, seed),
                   lsea.data_ptr<double>(), average_heads, w.data_ptr<double>());
  } else if (qa.scalar_type() == at::kBFloat16) {
    weights_kernel(make_problem<float, at::BFloat16>(qa, ka, ka, attn_mask, dropout_p, is_causal, scale, seed),
                   lsea.data_ptr<float>(), average_heads, w.data_ptr<float>());
  } else {
    weights_kernel(make_problem<float>(qa, ka, ka, attn_mask, dropout_p, is_causal, scale, seed),
                   lsea.data_ptr<float>(), average_heads, w.data_ptr<float>());
  }
  return w.to(q.scalar_type());
}

at::Tensor native_attention_keep_mask(const at::Tensor& q, const at::Tensor& k, double dropout_p,
                                      const OptTensor& seed) {
  using namespace attention;
  check_inputs("native_attention_keep_mask", q, k, k, std::nullopt, dropout_p, seed);
  const int64_t N = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2);
  auto keep = at::ones({N, H, L, S}, q.options().dtype(at::kBool));
  const DropoutSpec d = dropout_spec(dropout_p, seed);
  if (!d.on) return keep;
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, N * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) keep_row(d, row * S, S, out + row * S);
  });
  return keep;
}

at::ScalarType native_attention_operand_type(at::ScalarType dtype) { return attention::operand_type(dtype); }

}  // namespace cpu
}  // namespace fasttf
