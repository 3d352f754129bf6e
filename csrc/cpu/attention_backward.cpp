// The CPU attention backward (math in attention.h): p recomputed tile by tile from the saved lse (kept
// from the D_i pass instead where the weights have a gradient).
//
// Deterministic without atomics: one task per (batch, key/value head) owns dK and dV of that head
// and dQ of all its query heads (the GQA group), so every sum runs in one fixed order whatever
// the thread count:
//
//   for each query head h of the group, each query block i (D_i = rowsum(dO_i * O_i) first,
//   plus rowsum(W_i * dW_i) over all keys when the weights have a gradient),
//     for each key block j (is_causal: trimmed as in the forward)
//       p  = exp(scale Q_i K_j^T + bias - lse_i)          (BLAS + row pass)
//       dp = (dO_i V_j^T + dW_ij) * z                     (BLAS)
//       dV_j += (p z)^T dO_i                              (BLAS)
//       ds = p (dp - D_i)                                 -> the float mask's gradient
//       dK_j += scale ds^T Q_i,  dQ_i += scale ds K_j     (BLAS)
//   (on the bfloat16 products, attention.h: p z and ds rounded to bfloat16 for their products;
//   dQ, dK, dV summed in float32. float32: dK and dV summed over more than kFlushBlocks query blocks
//   (the group's heads' blocks) are added into float64 sums every kFlushBlocks blocks: MKL's
//   products with beta = 1 rounded them once a block, up to 3x torch's error at L group ~ 1500, E = 8.)
// (BLAS: MKL's gemm; float32 on a CPU whose widest vectors are AVX2: the products by a K or V
// operand on the micro-kernel of attention_panels.cpp, a head's K and V packed once by its task.
// (p z)^T dO and ds^T Q stay on MKL: the micro-kernel reading the transposed tile, dO_i and Q_i packed,
// measured the same on an AMD EPYC (L = 1024, 1 thread: 18.4% of the backward's samples against
// MKL's 18.8% with its packing; results bit-equal, both sum k in order with FMAs).)
//
// The mask gradient: ds is added straight into it where tasks can own disjoint parts of it (a
// mask broadcast over batches or heads folds them into one task); otherwise ds of every
// (b, h, i, j) lands in an (N, H, L, S) buffer, then is summed over the mask's broadcast dims in a
// fixed order (reduce_to_mask). Both add in the order (b, h, i, j). A float32 sum of more than
// kWideSumTerms terms an element (a mask broadcast over the queries, or over many batches and heads)
// runs in float64: one after the other in float32, N H L terms of a (S,) mask's gradient erred up
// to 5x torch's (whose sum over the broadcast dims is blocked). A mask broadcast over the keys gets
// no ds at all (run_backward: its gradient is 0).
#include <ATen/Parallel.h>

#include <algorithm>
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

template <typename acc_t, typename in_t = acc_t>
struct Grads {
  const in_t *dout, *out;  // in the operand type of q, k, v
  const acc_t* lse;
  int64_t do_sb, do_sh, do_sl, o_sb, o_sh, o_sl;
  const acc_t* dw = nullptr;  // contiguous (N, H, L, S), or (N, L, S) when averaged
  bool dw_averaged = false;
  // dQ, dK, dV in the operand type: on the bfloat16 products summed in float32 scratch by the task
  // that owns them and rounded once at its end (dK, dV: per (batch, kv head); dQ: per query block)
  in_t* dq;
  in_t* dk;
  in_t* dv;
  acc_t* dmask_full = nullptr;  // (N, H, L, S), summed into the mask's shape afterwards, or null
  // or the mask gradient added in place, at dmask + b dm_sb + h dm_sh + i dm_sl + j (its (N, H, L, S)
  // expanded strides; its last dim is S), tasks folding the batches / kv heads it is broadcast over
  acc_t* dmask = nullptr;
  double* dmask_wide = nullptr;  // or in float64 (long float32 sums), at the same offsets
  int64_t dm_sb = 0, dm_sh = 0, dm_sl = 0;
  bool fold_batches = false, fold_heads = false;
};

template <typename acc_t, typename in_t>
const acc_t* dw_row(const Problem<acc_t, in_t>& p, const Grads<acc_t, in_t>& g, int64_t b, int64_t h, int64_t i) {
  return g.dw_averaged ? g.dw + (b * p.L + i) * p.S : g.dw + ((b * p.H + h) * p.L + i) * p.S;
}

// dmask[b, h, i, j0 + j] += ds[j] for j < n, through the mask's expanded strides (a mask constant
// along the keys never gets here: its gradient is 0).
template <typename acc_t, typename in_t, typename dm_t>
void add_mask_grad(dm_t* dmask, const Grads<acc_t, in_t>& g, int64_t b, int64_t h, int64_t i, int64_t j0,
                   const acc_t* ds, int64_t n) {
  dm_t* dst = dmask + b * g.dm_sb + h * g.dm_sh + i * g.dm_sl + j0;
  if constexpr (std::is_same_v<dm_t, acc_t>) {
    add_rows(ds, dst, static_cast<const acc_t*>(nullptr), dst, n);  // dst += ds
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] += ds[j];
  }
}

template <typename acc_t, typename in_t>
void backward_kernel(const Problem<acc_t, in_t>& p, const Grads<acc_t, in_t>& g) {
  constexpr bool kRound = !std::is_same_v<in_t, acc_t>;  // p z and ds rounded for bfloat16 products
  const acc_t dw_scale = g.dw_averaged ? acc_t(1) / static_cast<acc_t>(p.H) : acc_t(1);
  const Tiles tiles = backward_tiles(p.causal, p.L);
  // no larger than the problem: small calls allocate small tile buffers
  const int64_t block_m = std::max<int64_t>(1, std::min(tiles.m, p.L));
  const int64_t block_n = std::max<int64_t>(1, std::min(tiles.n, p.S));
  // A task owns every batch (kv head) when the mask gradient is added in place and the mask is
  // broadcast over batches (heads), so no two tasks add into one of its elements.
  const int64_t task_batches = g.fold_batches ? p.N : 1, task_heads = g.fold_heads ? p.Hkv : 1;
  // the rounded ds rows: room for a zero after an odd n (ds K on the tiles multiplies key pairs)
  const int64_t ld_ds = block_n + (block_n & 1);
  // the float tiles' row stride (p, dp, p z): padded, for the products that read them transposed
  const int64_t ld = padded_stride(block_n);
  bool amx = false;  // Q K^T, dO V^T and ds K on AMX tiles, K^T, V^T and K packed first (attention_amx.cpp)
  PackedKV packed;
  if constexpr (kRound) {
    amx = amx_products(p, /*backward=*/true);
    if (amx) packed = pack_kv(p, block_n, /*v_transposed=*/true);
  }
  constexpr bool kFloat = std::is_same_v<acc_t, float> && std::is_same_v<in_t, float>;
  bool panels = false;  // Q K^T, dO V^T and ds K on the AVX2 micro-kernel (attention_panels.cpp)
  if constexpr (kFloat) panels = panel_products(p);
  // With a gradient for the weights, D_i needs p over all keys before the first ds: the p tiles of that
  // pass are kept (a query block by every key, per thread, up to 64 MiB) and the main pass reads them
  // instead of computing Q K^T and the exp again (8 block products, not 9, for need_weights=True).
  const int64_t key_blocks = (p.S + block_n - 1) / block_n;
  const bool keep_p = g.dw != nullptr && key_blocks * block_m * ld * static_cast<int64_t>(sizeof(acc_t)) <= (64 << 20);
  constexpr int64_t kFlushBlocks = 4;  // ~1% at L = 1024 - 2048; adding every block into float64 cost 4-8%
  const bool wide_kv = kFloat && ((p.L + block_m - 1) / block_m) * p.group > kFlushBlocks;
  at::parallel_for(0, (p.N / task_batches) * (p.Hkv / task_heads), 1, [&](int64_t begin, int64_t end) {
    SingleThreadBlas single_thread_blas;
    const auto ptile = scratch<acc_t>(block_m * ld), dptile = scratch<acc_t>(block_m * ld);
    const auto kept_p = scratch<acc_t>(keep_p ? key_blocks * block_m * ld : 0);
    // where the p tile of the key block at j0 is computed, or kept
    auto p_tile = [&](int64_t j0) { return keep_p ? kept_p.get() + (j0 / block_n) * block_m * ld : ptile.get(); };
    const auto pztile = scratch<acc_t>(p.dropout.on ? block_m * ld : 0);
    const auto pz_rounded = scratch<in_t>(kRound ? block_m * block_n : 0);
    const auto ds_rounded = scratch<in_t>(kRound ? block_m * ld_ds : 0);
    std::vector<acc_t> z(block_n), delta(block_m);
    const auto dk_acc = scratch<acc_t>(kRound ? p.S * p.E : 0), dv_acc = scratch<acc_t>(kRound ? p.S * p.Ev : 0);
    const auto dq_acc = scratch<acc_t>(kRound ? block_m * p.E : 0);
    // wide_kv: dK and dV summed in float64, kFlushBlocks query blocks at a time
    const auto dk_wide = scratch<double>(wide_kv ? p.S * p.E : 0), dv_wide = scratch<double>(wide_kv ? p.S * p.Ev : 0);
    Panels keys_t, values_t, keys;  // the task's head of K^T, V^T and K, for the micro-kernel
    if constexpr (kFloat) {
      if (panels) {
        keys_t = head_panels(p, /*values=*/false, /*keys_as_columns=*/true);
        values_t = head_panels(p, /*values=*/true, /*keys_as_columns=*/true);
        keys = head_panels(p, /*values=*/false, /*keys_as_columns=*/false);
      }
    }
    for (int64_t task = begin; task < end; ++task) {
     const int64_t b_first = (task / (p.Hkv / task_heads)) * task_batches;
     const int64_t hk_first = (task % (p.Hkv / task_heads)) * task_heads;
     for (int64_t b = b_first; b < b_first + task_batches; ++b)
     for (int64_t hk = hk_first; hk < hk_first + task_heads; ++hk) {
      acc_t* dk;
      acc_t* dv;
      if constexpr (kRound) {
        dk = dk_acc.get(), dv = dv_acc.get();
      } else {
        dk = g.dk + (b * p.Hkv + hk) * p.S * p.E, dv = g.dv + (b * p.Hkv + hk) * p.S * p.Ev;
      }
      std::fill(dk, dk + p.S * p.E, acc_t(0));  // here, not by at::zeros: one pass less, and in cache
      std::fill(dv, dv + p.S * p.Ev, acc_t(0));
      if (wide_kv) {
        std::fill(dk_wide.get(), dk_wide.get() + p.S * p.E, 0.0);
        std::fill(dv_wide.get(), dv_wide.get() + p.S * p.Ev, 0.0);
      }
      int64_t blocks_in_float = 0;  // query blocks summed into dk, dv since the last flush (wide_kv)
      auto flush = [&] {  // dk_wide += dk, dk = 0 (dv likewise); wide_kv is float32's alone
        if constexpr (kFloat) {
          flush_wide(dk, dk_wide.get(), p.S * p.E);
          flush_wide(dv, dv_wide.get(), p.S * p.Ev);
        }
        blocks_in_float = 0;
      };
      if constexpr (kFloat) {
        if (panels) pack_panels(p, b, hk, keys_t), pack_panels(p, b, hk, values_t), pack_panels(p, b, hk, keys);
      }
      for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
        for (int64_t i0 = 0; i0 < p.L; i0 += block_m) {
          const int64_t i1 = std::min(i0 + block_m, p.L), rows = i1 - i0, key_end = p.key_end(i1);
          const in_t* q_i = p.q_row(b, h, i0);
          const in_t* do_i = g.dout + b * g.do_sb + h * g.do_sh + i0 * g.do_sl;
          const acc_t* lse_i = g.lse + (b * p.H + h) * p.L + i0;
          acc_t* dq_i;
          if constexpr (kRound) {
            dq_i = dq_acc.get();
          } else {
            dq_i = g.dq + ((b * p.H + h) * p.L + i0) * p.E;
          }
          std::fill(dq_i, dq_i + rows * p.E, acc_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            const in_t* o = g.out + b * g.o_sb + h * g.o_sh + (i0 + r) * g.o_sl;
            const in_t* d = do_i + r * g.do_sl;
            if constexpr (std::is_same_v<in_t, acc_t>) {
              delta[r] = row_dot(d, o, p.Ev);
            } else {
              acc_t sum = 0;
              for (int64_t e = 0; e < p.Ev; ++e) sum += static_cast<acc_t>(d[e]) * static_cast<acc_t>(o[e]);
              delta[r] = sum;
            }
          }
          // Recomputes p (rows r0.. of `tile`) for the key block at j0; returns r0.
          auto probabilities = [&](int64_t j0, int64_t n, acc_t* tile) {
            const int64_t r0 = p.row_start(i0, j0) - i0;
            if constexpr (kRound) {
              if (amx) amx_scores(p, packed, b, h, i0 + r0, rows - r0, j0, n, tile + r0 * ld, ld);
            }
            if constexpr (kFloat) {
              if (panels) {
                panel_product(keys_t, p.q_row(b, h, i0 + r0), p.q_sl, rows - r0, j0, n, p.scale, tile + r0 * ld, ld);
              }
            }
            if (!amx && !panels) {
              gemm(false, true, rows - r0, n, p.E, p.scale, p.q_row(b, h, i0 + r0), p.q_sl, p.k_row(b, hk, j0),
                   p.k_sl, acc_t(0), tile + r0 * ld, ld);
            }
            for (int64_t r = r0; r < rows; ++r) {
              acc_t* row = tile + r * ld;
              if (lse_i[r] == std::numeric_limits<acc_t>::infinity()) {
                std::fill(row, row + n, acc_t(0));
                continue;
              }
              if constexpr (kRound) {
                if (amx) scale_row(row, n, p.scale);  // the tiles multiply unscaled
              }
              add_bias(row, n, p.mask, b, h, i0 + r, j0, p.causal);
              exp_shift_sum(row, n, lse_i[r]);
            }
            return r0;
          };
          if (g.dw != nullptr) {  // D_i += sum_j W_ij dW_ij, W = p z
            for (int64_t j0 = 0; j0 < key_end; j0 += block_n) {
              const int64_t n = std::min(j0 + block_n, key_end) - j0;
              acc_t* tile = p_tile(j0);
              const int64_t r0 = probabilities(j0, n, tile);
              for (int64_t r = r0; r < rows; ++r) {
                const acc_t* row = tile + r * ld;
                const acc_t* dw = dw_row(p, g, b, h, i0 + r) + j0;
                if (p.dropout.on) dropout_row(p.dropout, p.flat(b, h, i0 + r, j0), n, z.data());
                acc_t sum = 0;
                for (int64_t j = 0; j < n; ++j) sum += row[j] * (p.dropout.on ? z[j] : acc_t(1)) * dw[j];
                delta[r] += sum * dw_scale;
              }
            }
          }
          for (int64_t j0 = 0; j0 < key_end; j0 += block_n) {
            const int64_t n = std::min(j0 + block_n, key_end) - j0;
            acc_t* tile = p_tile(j0);
            const int64_t r0 = keep_p ? p.row_start(i0, j0) - i0 : probabilities(j0, n, tile), m = rows - r0;
            acc_t* dp = dptile.get() + r0 * ld;
            if constexpr (kRound) {
              if (amx) amx_dp(p, packed, b, h, m, j0, n, do_i + r0 * g.do_sl, g.do_sl, dp, ld);
            }
            if constexpr (kFloat) {
              if (panels) panel_product(values_t, do_i + r0 * g.do_sl, g.do_sl, m, j0, n, 1.0f, dp, ld);
            }
            if (!amx && !panels) {
              gemm(false, true, m, n, p.Ev, acc_t(1), do_i + r0 * g.do_sl, g.do_sl, p.v_row(b, hk, j0), p.v_sl,
                   acc_t(0), dp, ld);
            }
            const acc_t* pz = tile + r0 * ld;
            if (p.dropout.on) pz = pztile.get() + r0 * ld;
            for (int64_t r = r0; r < rows; ++r) {
              acc_t* pr = tile + r * ld;
              acc_t* dpr = dptile.get() + r * ld;
              if (g.dw != nullptr) {
                const acc_t* dw = dw_row(p, g, b, h, i0 + r) + j0;
                for (int64_t j = 0; j < n; ++j) dpr[j] += dw_scale * dw[j];
              }
              if (p.dropout.on) {
                softmax_grad_row_dropout(p.dropout, p.flat(b, h, i0 + r, j0), pr, pztile.get() + r * ld, dpr, delta[r],
                                         n, z.data());
              } else {
                softmax_grad_row(pr, dpr, delta[r], n);
              }
              if (g.dmask_full != nullptr) {
                std::copy(dpr, dpr + n, g.dmask_full + p.flat(b, h, i0 + r, j0));
              } else if (g.dmask != nullptr) {  // in place, in reduce_to_mask's order
                add_mask_grad(g.dmask, g, b, h, i0 + r, j0, dpr, n);
              } else if (g.dmask_wide != nullptr) {
                add_mask_grad(g.dmask_wide, g, b, h, i0 + r, j0, dpr, n);
              }
              if constexpr (kRound) {
                tile_operand<in_t>(p.dropout.on ? pztile.get() + r * ld : pr, pz_rounded.get() + r * block_n, 1,
                                   n, block_n);
                tile_operand<in_t>(dpr, ds_rounded.get() + r * ld_ds, 1, n, ld_ds);
                if (n & 1) ds_rounded[r * ld_ds + n] = in_t(0.0f);  // the last key pair's missing half
              }
            }
            const in_t* pz_op;  // the operands (p z) and ds, rounded to in_t
            const in_t* ds_op;
            if constexpr (kRound) {
              pz_op = pz_rounded.get() + r0 * block_n, ds_op = ds_rounded.get() + r0 * ld_ds;
            } else {
              pz_op = pz, ds_op = dp;
            }
            const int64_t ld_ds_op = kRound ? ld_ds : ld, ld_pz_op = kRound ? block_n : ld;
            gemm(true, false, n, p.Ev, m, acc_t(1), pz_op, ld_pz_op, do_i + r0 * g.do_sl, g.do_sl, acc_t(1),
                 dv + j0 * p.Ev, p.Ev);
            gemm(true, false, n, p.E, m, p.scale, ds_op, ld_ds_op, q_i + r0 * p.q_sl, p.q_sl, acc_t(1),
                 dk + j0 * p.E, p.E);
            if (amx) {
              // MKL configures the AMX tiles its own way: the next brgemm must set its configuration again
              // (torch's brgemm keeps it per thread while its own kernel is the last one used)
              amx_release();
              if constexpr (kRound) amx_dq(p, packed, b, h, m, j0, n, ds_op, ld_ds, dq_i + r0 * p.E);  // unscaled
            } else if (panels) {
              if constexpr (kFloat) {
                panel_product(keys, ds_op, ld_ds_op, m, j0, n, p.scale, dq_i + r0 * p.E, p.E);
              }
            } else {
              gemm(false, false, m, p.E, n, p.scale, ds_op, ld_ds_op, p.k_row(b, hk, j0), p.k_sl, acc_t(1),
                   dq_i + r0 * p.E, p.E);
            }
          }
          if (wide_kv && ++blocks_in_float == kFlushBlocks) flush();
          if constexpr (kRound) {
            if (amx) scale_row(dq_i, rows * p.E, p.scale);  // the tiles summed ds K unscaled
            round_rows(dq_i, g.dq + ((b * p.H + h) * p.L + i0) * p.E, 1, rows * p.E, rows * p.E);
          }
        }
      }
      if constexpr (kRound) {
        round_rows(dk, g.dk + (b * p.Hkv + hk) * p.S * p.E, 1, p.S * p.E, p.S * p.E);
        round_rows(dv, g.dv + (b * p.Hkv + hk) * p.S * p.Ev, 1, p.S * p.Ev, p.S * p.Ev);
      }
      if (wide_kv) {
        if (blocks_in_float > 0) flush();
        std::copy(dk_wide.get(), dk_wide.get() + p.S * p.E, dk);  // rounded to float32 once
        std::copy(dv_wide.get(), dv_wide.get() + p.S * p.Ev, dv);
      }
     }
    }
    if (amx) amx_release();
  });
}

// dmask[a, c, x, y] = sum of full[n, h, i, j] over the (n, h, i, j) that mask element broadcasts
// to, summed in float64 in one fixed order (each output row by one task); the mask's last dim is S.
template <typename acc_t>
at::Tensor reduce_to_mask(const at::Tensor& full, const at::Tensor& mask) {
  const int64_t N = full.size(0), H = full.size(1), L = full.size(2), S = full.size(3);
  int64_t ms[4] = {1, 1, 1, 1};
  for (int64_t d = 0; d < mask.dim(); ++d) ms[4 - mask.dim() + d] = mask.size(d);
  auto dmask = at::zeros({ms[0], ms[1], ms[2], ms[3]}, full.options().dtype(at::kDouble));
  const acc_t* src = full.data_ptr<acc_t>();
  double* dst = dmask.data_ptr<double>();
  at::parallel_for(0, ms[0] * ms[1] * ms[2], 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t a = row / (ms[1] * ms[2]), c = (row / ms[2]) % ms[1], x = row % ms[2];
      double* out = dst + row * ms[3];
      for (int64_t n = (ms[0] == 1 ? 0 : a); n < (ms[0] == 1 ? N : a + 1); ++n)
        for (int64_t h = (ms[1] == 1 ? 0 : c); h < (ms[1] == 1 ? H : c + 1); ++h)
          for (int64_t i = (ms[2] == 1 ? 0 : x); i < (ms[2] == 1 ? L : x + 1); ++i) {
            const acc_t* in = src + ((n * H + h) * L + i) * S;
            for (int64_t j = 0; j < S; ++j) out[j] += in[j];  // ms[3] == S: see run_backward
          }
    }
  });
  return dmask.view(mask.sizes());
}

template <typename acc_t, typename in_t = acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
    const OptTensor& seed, const OptTensor& grad_weights, bool average_heads, bool mask_requires_grad) {
  const auto qa = as_kernel_operand(q), ka = as_kernel_operand(k), va = as_kernel_operand(v);
  const auto doa = as_kernel_operand(grad_out), oa = as_kernel_operand(out);
  const at::TensorOptions acc = qa.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto lsea = lse.to(acc).contiguous();
  const auto problem = make_problem<acc_t, in_t>(qa, ka, va, attn_mask, dropout_p, is_causal, scale, seed);
  const at::TensorOptions grad = qa.options().dtype(c10::CppTypeToScalarType<in_t>::value);  // Grads::dq
  auto dq = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, grad);  // written by its task
  auto dk = at::empty({k.size(0), k.size(1), k.size(2), k.size(3)}, grad);
  auto dv = at::empty({v.size(0), v.size(1), v.size(2), v.size(3)}, grad);
  Grads<acc_t, in_t> g;
  g.dout = doa.data_ptr<in_t>(), g.out = oa.data_ptr<in_t>(), g.lse = lsea.data_ptr<acc_t>();
  g.do_sb = doa.stride(0), g.do_sh = doa.stride(1), g.do_sl = doa.stride(2);
  g.o_sb = oa.stride(0), g.o_sh = oa.stride(1), g.o_sl = oa.stride(2);
  g.dq = dq.data_ptr<in_t>(), g.dk = dk.data_ptr<in_t>(), g.dv = dv.data_ptr<in_t>();
  at::Tensor dw;
  if (grad_weights.has_value() && grad_weights->defined()) {
    if (average_heads) {
      TORCH_CHECK(grad_weights->dim() == 3, "fasttf.native_attention_backward: expected grad_weights of shape ",
                  "(N, L, S) (average_heads), got ", shape_str(grad_weights->sizes()));
    } else {
      TORCH_CHECK(grad_weights->dim() == 4, "fasttf.native_attention_backward: expected grad_weights of shape ",
                  "(N, H, L, S), got ", shape_str(grad_weights->sizes()));
    }
    dw = grad_weights->to(acc).contiguous();
    g.dw = dw.data_ptr<acc_t>();
    g.dw_averaged = average_heads;
  }
  at::Tensor dmask_full;
  const bool want_dmask = mask_requires_grad && attn_mask.has_value() && attn_mask->defined() &&
                          attn_mask->scalar_type() != at::kBool;
  at::Tensor dmask = at::empty({0}, q.options());
  // A mask constant along the keys (last dim 1) adds one value to a whole row of scores, which the
  // softmax does not see: its gradient is exactly 0 (each row's ds sums to 0; summed in floats they
  // gave rounding noise, which is what torch returns).
  const bool constant_along_keys = want_dmask && (attn_mask->dim() == 0 || attn_mask->size(-1) == 1);
  if (want_dmask && !constant_along_keys) {
    // In place when that leaves at least kMinTasks tasks (a mask over every batch, or one
    // broadcast over batches with several kv heads); else through the (N, H, L, S) buffer.
    constexpr int64_t kMinTasks = 4, kWideSumTerms = 16;
    const int64_t full_sizes[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    int64_t terms = 1;  // the ds summed into one element of the mask's gradient: its broadcast dims' sizes
    for (int64_t d = 0; d < 4; ++d) {
      const int64_t mask_dim = d - (4 - attn_mask->dim());
      if (mask_dim < 0 || attn_mask->size(mask_dim) == 1) terms *= full_sizes[d];
    }
    const bool wide = std::is_same_v<acc_t, float> && terms > kWideSumTerms;
    dmask = at::zeros(attn_mask->sizes(), wide ? acc.dtype(at::kDouble) : acc);
    const auto strides = dmask.expand(full_sizes).strides();
    g.fold_batches = strides[0] == 0 && problem.N > 1;
    g.fold_heads = strides[1] == 0 && problem.Hkv > 1;
    const int64_t tasks = (g.fold_batches ? 1 : problem.N) * (g.fold_heads ? 1 : problem.Hkv);
    if (tasks >= kMinTasks) {
      if (wide) {
        g.dmask_wide = dmask.data_ptr<double>();
      } else {
        g.dmask = dmask.data_ptr<acc_t>();
      }
      g.dm_sb = strides[0], g.dm_sh = strides[1], g.dm_sl = strides[2];
    } else {
      g.fold_batches = g.fold_heads = false;
      dmask_full = at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, acc);
      g.dmask_full = dmask_full.data_ptr<acc_t>();
    }
  }
  backward_kernel(problem, g);
  if (constant_along_keys) {
    dmask = at::zeros(attn_mask->sizes(), attn_mask->options());
  } else if (want_dmask) {
    if (g.dmask_full != nullptr) dmask = reduce_to_mask<acc_t>(dmask_full, *attn_mask);
    dmask = dmask.to(attn_mask->scalar_type());
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dmask};
}

}  // namespace
}  // namespace attention

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> native_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
    const OptTensor& seed, const OptTensor& grad_weights, bool average_heads, bool mask_requires_grad) {
  using namespace attention;
  check_inputs("native_attention_backward", q, k, v, attn_mask, dropout_p, seed);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == q.size(0) &&
                  out.size(1) == q.size(1) && out.size(2) == q.size(2) && out.size(3) == v.size(3),
              "fasttf.native_attention_backward: expected grad_out and out of shape (N, H, L, Ev), got ",
              shape_str(grad_out.sizes()), " and ", shape_str(out.sizes()));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "fasttf.native_attention_backward: expected lse of shape (N, H, L), got ", shape_str(lse.sizes()));
  if (q.scalar_type() == at::kDouble) {
    return run_backward<double>(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed,
                                grad_weights, average_heads, mask_requires_grad);
  }
  if (operand_type(q.scalar_type()) == at::kBFloat16) {
    return run_backward<float, at::BFloat16>(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale,
                                             seed, grad_weights, average_heads, mask_requires_grad);
  }
  return run_backward<float>(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed,
                             grad_weights, average_heads, mask_requires_grad);
}

}  // namespace cpu
}  // namespace fasttf
