// The attention weights W = p z (after dropout, as torch's multi-head attention returns them),
// recomputed from the saved lse: p = exp(scale Q K^T + bias - lse) tile by tile (attention.h).
// average_heads: one task per (batch, query block) sums its H heads in a row buffer and writes
// the mean, so no (N, H, L, S) tensor is made. And the dropout keep-mask the kernels draw, for
// tests to replay.
//
// native_attention_forward_weights: out, lse and W in one kernel (float32 / float64 products; float32 on
// the AVX2 micro-kernel where the forward uses it), for need_weights=True calls: a query block's scores
// over all keys are kept in a row buffer, so that
//   s = scale Q K^T + bias (one product), lse = m + log sum exp(s - m), p = exp(s - m) / sum,
//   W (+)= p z, out = (p z) V (one product)
// where the flash forward and then the weights kernel make three (Q K^T twice).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "attention.h"

namespace fasttf {
namespace cpu {
namespace attention {
namespace {

// One row of weights: dst = row, or dst += row where the heads are averaged (they are added first).
template <typename acc_t>
void put_weights_row(acc_t* dst, const acc_t* row, int64_t n, bool accumulate) {
  if (accumulate) {
    for (int64_t j = 0; j < n; ++j) dst[j] += row[j];
  } else {
    std::copy(row, row + n, dst);
  }
}

// The heads' sum in w (count values) made their mean.
template <typename acc_t>
void divide_by_heads(acc_t* w, int64_t count, int64_t heads) {
  const acc_t inv = acc_t(1) / static_cast<acc_t>(heads);
  for (int64_t x = 0; x < count; ++x) w[x] *= inv;
}

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
      put_weights_row(w + r * p.S + j0, row, n, accumulate);
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
      divide_by_heads(dst, (i1 - i0) * p.S, p.H);
    }
  });
}

// Rows of a query block the merged forward keeps scores for: rows x S floats per thread.
constexpr int64_t kMergedBlockM = 64;
constexpr int64_t kMergedMaxBytes = int64_t(64) << 20;  // per thread; past it, the two kernels

// out: (N, H, L, Ev) through its strides; lse contiguous (N, H, L); w zero-filled, (N, L, S) or (N, H, L, S).
template <typename acc_t>
void forward_weights_kernel(const Problem<acc_t>& p, const at::Tensor& out_tensor, acc_t* lse, bool average_heads,
                            acc_t* w) {
  acc_t* const out = out_tensor.data_ptr<acc_t>();
  const int64_t o_sb = out_tensor.stride(0), o_sh = out_tensor.stride(1), o_sl = out_tensor.stride(2);
  const int64_t block_m = std::max<int64_t>(1, std::min(kMergedBlockM, p.L));
  const int64_t blocks_m = (p.L + block_m - 1) / block_m;
  const int64_t ld = padded_stride(p.S);
  const int64_t heads = average_heads ? 1 : p.H;
  constexpr bool kFloat = std::is_same_v<acc_t, float>;
  bool panels = false;  // the two products on the AVX2 micro-kernel (attention_panels.cpp)
  if constexpr (kFloat) panels = panel_products(p);
  at::parallel_for(0, p.N * heads * blocks_m, 1, [&](int64_t begin, int64_t end) {
    SingleThreadBlas single_thread_blas;
    const auto scores = scratch<acc_t>(block_m * ld);
    std::vector<acc_t> z(p.S);
    Panels keys_t, values;  // this thread's head of K^T and V
    if constexpr (kFloat) {
      if (panels) keys_t = head_panels(p, /*values=*/false, /*keys_as_columns=*/true);
      if (panels) values = head_panels(p, /*values=*/true, /*keys_as_columns=*/false);
    }
    // rows [i0, i1) of head h: out and lse written, p z into the weights rows w_rows (added or copied)
    auto head_rows = [&](int64_t b, int64_t h, int64_t i0, int64_t i1, acc_t* w_rows, bool accumulate) {
      const int64_t rows = i1 - i0, hk = h / p.group, key_end = p.key_end(i1);
      acc_t* s = scores.get();
      if (key_end == 0) {  // no key to attend to (S = 0): out 0, weights 0, lse +inf
        for (int64_t r = 0; r < rows; ++r) {
          std::fill_n(out + b * o_sb + h * o_sh + (i0 + r) * o_sl, p.Ev, acc_t(0));
          lse[(b * p.H + h) * p.L + i0 + r] = std::numeric_limits<acc_t>::infinity();
        }
        return;
      }
      if constexpr (kFloat) {
        if (panels) {
          pack_panels(p, b, hk, keys_t), pack_panels(p, b, hk, values);  // when the head changes
          panel_product(keys_t, p.q_row(b, h, i0), p.q_sl, rows, 0, key_end, p.scale, s, ld);
        }
      }
      if (!panels) {
        gemm(false, true, rows, key_end, p.E, p.scale, p.q_row(b, h, i0), p.q_sl, p.k_row(b, hk, 0), p.k_sl,
             acc_t(0), s, ld);
      }
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* row = s + r * ld;
        const int64_t i = i0 + r;
        add_bias(row, key_end, p.mask, b, h, i, 0, p.causal);
        const acc_t top = row_max(row, key_end);
        acc_t& lse_i = lse[(b * p.H + h) * p.L + i];
        if (top == -std::numeric_limits<acc_t>::infinity()) {  // fully masked: out 0, weights 0, lse +inf
          std::fill(row, row + key_end, acc_t(0));
          lse_i = std::numeric_limits<acc_t>::infinity();
          continue;
        }
        const acc_t sum = exp_shift_sum(row, key_end, top);
        lse_i = top + std::log(sum);
        const acc_t inv = acc_t(1) / sum;
        for (int64_t j = 0; j < key_end; ++j) row[j] *= inv;
        if (p.dropout.on) apply_dropout(p.dropout, p.flat(b, h, i, 0), key_end, row, z.data());
        put_weights_row(w_rows + r * p.S, row, key_end, accumulate);
      }
      acc_t* o = out + b * o_sb + h * o_sh + i0 * o_sl;
      if constexpr (kFloat) {
        if (panels) {  // it adds into o
          for (int64_t r = 0; r < rows; ++r) std::fill_n(o + r * o_sl, p.Ev, 0.0f);
          panel_product(values, s, ld, rows, 0, key_end, 1.0f, o, o_sl);
        }
      }
      if (!panels) {
        gemm(false, false, rows, p.Ev, key_end, acc_t(1), s, ld, p.v_row(b, hk, 0), p.v_sl, acc_t(0), o, o_sl);
      }
    };
    auto task_rows = [&](int64_t task, int64_t& i0, int64_t& i1) {
      i0 = (task % blocks_m) * block_m, i1 = std::min(i0 + block_m, p.L);
      return w + ((task / blocks_m) * p.L + i0) * p.S;  // the task's weights rows
    };
    if (!average_heads) {  // consecutive tasks share (b, h): a head is packed once for them
      for (int64_t task = begin; task < end; ++task) {
        int64_t i0, i1;
        acc_t* w_rows = task_rows(task, i0, i1);
        head_rows(task / blocks_m / p.H, task / blocks_m % p.H, i0, i1, w_rows, false);
      }
      return;
    }
    // Averaged: the heads outermost over this thread's tasks of one batch, so that a head is packed
    // once for all of them; each row still adds its heads in the order 0 .. H - 1.
    for (int64_t first = begin; first < end;) {
      const int64_t b = first / blocks_m, stop = std::min(end, (b + 1) * blocks_m);
      for (int64_t h = 0; h < p.H; ++h) {
        for (int64_t task = first; task < stop; ++task) {
          int64_t i0, i1;
          acc_t* w_rows = task_rows(task, i0, i1);
          head_rows(b, h, i0, i1, w_rows, true);
        }
      }
      for (int64_t task = first; task < stop; ++task) {
        int64_t i0, i1;
        acc_t* w_rows = task_rows(task, i0, i1);
        divide_by_heads(w_rows, (i1 - i0) * p.S, p.H);
      }
      first = stop;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_attention_forward_weights(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask, double dropout_p,
    bool is_causal, double scale, const OptTensor& seed, bool average_heads) {
  using namespace attention;
  check_inputs("native_attention_forward_weights", q, k, v, attn_mask, dropout_p, seed);
  const auto qa = as_kernel_operand(q), ka = as_kernel_operand(k), va = as_kernel_operand(v);
  const auto operand = qa.scalar_type();
  const int64_t N = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2);
  const int64_t acc_bytes = operand == at::kDouble ? 8 : 4;
  if (operand == at::kBFloat16 || std::min(kMergedBlockM, L) * padded_stride(S) * acc_bytes > kMergedMaxBytes) {
    auto [out, lse] = native_attention_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
    return {out, lse, native_attention_weights(q, k, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads)};
  }
  const auto acc = qa.options().dtype(operand);  // float32 or float64 here
  // out laid out (N, L, H, Ev) in memory like native_attention_forward's
  auto out = at::empty({N, L, H, v.size(3)}, acc).transpose(1, 2);
  auto lse = at::empty({N, H, L}, acc);
  auto w = average_heads ? at::zeros({N, L, S}, acc) : at::zeros({N, H, L, S}, acc);
  if (operand == at::kDouble) {
    forward_weights_kernel(make_problem<double>(qa, ka, va, attn_mask, dropout_p, is_causal, scale, seed), out,
                           lse.data_ptr<double>(), average_heads, w.data_ptr<double>());
  } else {
    forward_weights_kernel(make_problem<float>(qa, ka, va, attn_mask, dropout_p, is_causal, scale, seed), out,
                           lse.data_ptr<float>(), average_heads, w.data_ptr<float>());
  }
  return {out.to(q.scalar_type()), lse, w.to(q.scalar_type())};
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
