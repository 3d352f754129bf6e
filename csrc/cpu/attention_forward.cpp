// The CPU attention forward (math in attention.h): one task per (batch, head, query block) with
// at::parallel_for; each streams the key blocks with an online softmax.
//
//   for each key block [j0, j1):   (is_causal: only blocks with j0 < i1, only rows i >= j0,
//                                   only keys j < i1: the tile is trimmed row by row)
//     s = scale Q K^T + bias                                  (BLAS)
//     m_new = max(m, rowmax s);  p = exp(s - m_new);  l = l exp(m - m_new) + rowsum p
//     acc = acc exp(m - m_new) + (p * z) V                    (BLAS, beta = 1; p * z rounded to
//                                                              bfloat16 first on the bfloat16 products)
//   out = acc / l,  lse = m + log l   (l = 0: out 0, lse +inf); out laid out (N, L, H, Ev) in memory
// (BLAS: MKL's gemm; float32 on a CPU whose widest vectors are AVX2: the products by a K or V
// operand on the micro-kernel of attention_panels.cpp, a head's K and V packed once a thread)
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "attention.h"
#include "row_math.h"

namespace fasttf {
namespace cpu {
namespace attention {
namespace {

// out: (N, H, L, Ev) through its strides (the caller's layout is (N, L, H, Ev)); lse contiguous (N, H, L)
template <typename acc_t, typename in_t>
void forward_kernel(const Problem<acc_t, in_t>& p, const at::Tensor& out_tensor, acc_t* lse) {
  constexpr bool kRoundP = !std::is_same_v<in_t, acc_t>;  // (p z) V on bfloat16 operands
  using out_t = std::conditional_t<kRoundP, in_t, acc_t>;  // bfloat16 output written directly
  out_t* const out = out_tensor.data_ptr<out_t>();
  const int64_t o_sb = out_tensor.stride(0), o_sh = out_tensor.stride(1), o_sl = out_tensor.stride(2);
  const Tiles tiles = forward_tiles(p.causal, p.L);
  // no larger than the problem: small calls allocate small tile buffers
  const int64_t block_m = std::max<int64_t>(1, std::min(tiles.m, p.L));
  const int64_t block_n = std::max<int64_t>(1, std::min(tiles.n, p.S));
  const int64_t blocks_m = (p.L + block_m - 1) / block_m;
  const int64_t tasks = p.N * p.H * blocks_m;
  const int64_t ld_p = block_n + (block_n & 1);  // the rounded p z rows: room for a zero after an odd n
  const int64_t ld_s = padded_stride(block_n);    // the float scores' rows
  bool amx = false;  // bfloat16 products on AMX tiles, K and V packed first (attention_amx.cpp)
  PackedKV packed;
  if constexpr (kRoundP) {
    amx = amx_products(p, /*backward=*/false);
    if (amx) packed = pack_kv(p, block_n, /*v_transposed=*/false);
  }
  constexpr bool kFloat = std::is_same_v<acc_t, float> && std::is_same_v<in_t, float>;
  bool panels = false;  // float32 products on the AVX2 micro-kernel (attention_panels.cpp)
  if constexpr (kFloat) panels = panel_products(p);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    SingleThreadBlas single_thread_blas;
    const auto scores = scratch<acc_t>(block_m * ld_s);
    const auto scores_rounded = scratch<in_t>(kRoundP ? block_m * ld_p : 0);
    const auto acc = scratch<acc_t>(block_m * p.Ev);  // the (p z) V sums: C of a block product
    std::vector<acc_t> m(block_m), l(block_m), z(block_n);
    Panels keys_t, values;  // this thread's head of K^T and V, for the micro-kernel
    if constexpr (kFloat) {
      if (panels) keys_t = head_panels(p, /*values=*/false, /*keys_as_columns=*/true);
      if (panels) values = head_panels(p, /*values=*/true, /*keys_as_columns=*/false);
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks_m, b = bh / p.H, h = bh % p.H, hk = h / p.group;
      const int64_t i0 = (task % blocks_m) * block_m, i1 = std::min(i0 + block_m, p.L), rows = i1 - i0;
      if constexpr (kFloat) {
        if (panels) pack_panels(p, b, hk, keys_t), pack_panels(p, b, hk, values);
      }
      std::fill(acc.get(), acc.get() + rows * p.Ev, acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      const int64_t key_end = p.key_end(i1);
      for (int64_t j0 = 0; j0 < key_end; j0 += block_n) {
        const int64_t n = std::min(j0 + block_n, key_end) - j0;
        const int64_t r0 = p.row_start(i0, j0) - i0;
        acc_t* s = scores.get() + r0 * ld_s;
        if constexpr (kRoundP) {
          if (amx) amx_scores(p, packed, b, h, i0 + r0, rows - r0, j0, n, s, ld_s);
        }
        if constexpr (kFloat) {
          if (panels) {
            panel_product(keys_t, p.q_row(b, h, i0 + r0), p.q_sl, rows - r0, j0, n, p.scale, s, ld_s);
          }
        }
        if (!amx && !panels) {
          gemm(false, true, rows - r0, n, p.E, p.scale, p.q_row(b, h, i0 + r0), p.q_sl, p.k_row(b, hk, j0), p.k_sl,
               acc_t(0), s, ld_s);
        }
        for (int64_t r = r0; r < rows; ++r) {
          acc_t* row = scores.get() + r * ld_s;
          const int64_t i = i0 + r;
          acc_t row_top = -std::numeric_limits<acc_t>::infinity();  // the row's max after scale and bias
          if (amx && p.mask.kind == MaskView::kNone && !p.causal) {  // the tiles multiply unscaled
            if constexpr (kRoundP) row_top = scale_row_max(row, n, p.scale);
          } else {
            if constexpr (kRoundP) {
              if (amx) scale_row(row, n, p.scale);
            }
            add_bias(row, n, p.mask, b, h, i, j0, p.causal);
            row_top = row_max(row, n);
          }
          const acc_t m_new = std::max(m[r], row_top);
          if (m_new == -std::numeric_limits<acc_t>::infinity()) {  // nothing seen yet in this row
            std::fill(row, row + n, acc_t(0));
            if constexpr (kRoundP) tile_operand<in_t>(row, scores_rounded.get() + r * ld_p, 1, n, ld_p);
            continue;
          }
          const acc_t alpha = std::exp(m[r] - m_new);  // 0 when m was -inf
          in_t* rounded = nullptr;  // the row's operand for (p z) V when it is not row itself
          acc_t sum;
          if constexpr (kRoundP) {
            rounded = scores_rounded.get() + r * ld_p;
            // p straight into its rounded operand when there is no dropout to apply first
            sum = p.dropout.on ? exp_shift_sum(row, n, m_new) : exp_shift_sum(row, n, m_new, rounded);
          } else {
            sum = exp_shift_sum(row, n, m_new);
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != acc_t(1)) {  // acc_r *= alpha
            acc_t* a = acc.get() + r * p.Ev;
            scale_add_rows(a, alpha, static_cast<const acc_t*>(nullptr), a, p.Ev);
          }
          if (p.dropout.on) {
            apply_dropout(p.dropout, p.flat(b, h, i, j0), n, row, z.data());
            if constexpr (kRoundP) tile_operand<in_t>(row, rounded, 1, n, ld_p);
          }
        }
        if constexpr (kRoundP) {
          const in_t* pz = scores_rounded.get() + r0 * ld_p;  // the (p z) operand
          if (amx) {
            if (n & 1) {  // a pair of keys at a time: the last one of an odd n weighs 0
              for (int64_t r = r0; r < rows; ++r) scores_rounded[r * ld_p + n] = in_t(0.0f);
            }
            amx_output(p, packed, b, h, rows - r0, j0, n, pz, ld_p, acc.get() + r0 * p.Ev);
          } else {
            gemm(false, false, rows - r0, p.Ev, n, acc_t(1), pz, ld_p, p.v_row(b, hk, j0), p.v_sl, acc_t(1),
                 acc.get() + r0 * p.Ev, p.Ev);
          }
        } else if (panels) {
          if constexpr (kFloat) {
            panel_product(values, s, ld_s, rows - r0, j0, n, 1.0f, acc.get() + r0 * p.Ev, p.Ev);
          }
        } else {
          gemm(false, false, rows - r0, p.Ev, n, acc_t(1), s, ld_s, p.v_row(b, hk, j0), p.v_sl, acc_t(1),
               acc.get() + r0 * p.Ev, p.Ev);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        out_t* o = out + b * o_sb + h * o_sh + (i0 + r) * o_sl;
        acc_t* a = acc.get() + r * p.Ev;
        const acc_t inv = l[r] > acc_t(0) ? acc_t(1) / l[r] : acc_t(0);
        if constexpr (kRoundP) {
          for (int64_t e = 0; e < p.Ev; ++e) a[e] *= inv;
          round_rows(a, o, 1, p.Ev, p.Ev);
        } else {
          for (int64_t e = 0; e < p.Ev; ++e) o[e] = a[e] * inv;
        }
        lse[(b * p.H + h) * p.L + i0 + r] =
            l[r] > acc_t(0) ? m[r] + std::log(l[r]) : std::numeric_limits<acc_t>::infinity();
      }
    }
    if (amx) amx_release();
  });
}

}  // namespace
}  // namespace attention

std::tuple<at::Tensor, at::Tensor> native_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const OptTensor& attn_mask,
                                                            double dropout_p, bool is_causal, double scale,
                                                            const OptTensor& seed) {
  using namespace attention;
  check_inputs("native_attention_forward", q, k, v, attn_mask, dropout_p, seed);
  const auto qa = as_kernel_operand(q), ka = as_kernel_operand(k), va = as_kernel_operand(v);
  const auto operand = qa.scalar_type();  // float32, float64 or bfloat16 (operand_type)
  // out in torch's flash layout: (N, L, H, Ev) in memory, returned as its (N, H, L, Ev) view, so that
  // merging the heads afterwards ((N, L, H * Ev), what attention modules do next) is a view, not a copy
  const auto acc_options = qa.options().dtype(operand == at::kDouble ? at::kDouble : at::kFloat);
  // the output in the accumulation type, converted after; bfloat16 products write bfloat16 directly
  auto out = at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, operand == at::kBFloat16 ? qa.options()
                                                                                               : acc_options)
                 .transpose(1, 2);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, acc_options);
  if (operand == at::kDouble) {
    forward_kernel(make_problem<double>(qa, ka, va, attn_mask, dropout_p, is_causal, scale, seed), out,
                   lse.data_ptr<double>());
  } else if (operand == at::kBFloat16) {
    forward_kernel(make_problem<float, at::BFloat16>(qa, ka, va, attn_mask, dropout_p, is_causal, scale, seed), out,
                   lse.data_ptr<float>());
  } else {
    forward_kernel(make_problem<float>(qa, ka, va, attn_mask, dropout_p, is_causal, scale, seed), out,
                   lse.data_ptr<float>());
  }
  return {out.to(q.scalar_type()), lse};
}

}  // namespace cpu
}  // namespace fasttf
