// fasttf.MultiheadAttention's inference call in one op: in-projection, the CPU attention kernel,
// out-projection, with the heads split and merged as views in between:
//
//   q, k, v = query W_q^T + b_q, key W_k^T + b_k, value W_v^T + b_v   (one product when query is key
//                                                                      is value, two when key is value)
//   p_h     = softmax(q_h k_h^T / sqrt(E / H) + m)  for each head h, m the key padding mask
//                                                  (bool True = masked: -inf; float: added)
//   heads   = p_h v_h                              (native_attention_forward, or with need_weights
//                                                   native_attention_forward_weights, which also
//   weights = mean_h p_h  (or every p_h)            writes the weights, averaged or per head)
//   out     = concat_h(heads) W_o^T + b_o
//
// The same ATen calls, on the same operands, as the module's Python path (fasttf/multihead_attention.py:
// _in_projection_packed, _split_heads, _merge_for_sdpa of a padding mask alone, _out_projection), so the
// same bits (tests/test_multihead_attention_inference.py keeps the twins equal); only the ~15 Python-level
// tensor calls between them are gone (~50 us at one token on a 2.45 GHz core, where torch's module
// takes its own C++ fast path, torch._native_multi_head_attention, with or without the weights). No
// autograd: the module calls it where no gradient is recorded. Like torch's op it returns (out,
// weights), weights an empty tensor when need_weights is false.
#include "../checks.h"
#include "../ops.h"

#include <cmath>
#include <tuple>

namespace fasttf {
namespace cpu {
namespace {

// (a, b, H * E) -> (N, H, S, E): a view; (a, b) is (N, S) when batch_first, else (S, N)
at::Tensor split_heads(const at::Tensor& x, int64_t heads, bool batch_first) {
  const auto split = x.view({x.size(0), x.size(1), heads, x.size(2) / heads});
  return batch_first ? split.transpose(1, 2) : split.permute({1, 2, 0, 3});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> native_multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& in_proj_weight,
    const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
    int64_t num_heads, bool batch_first, const OptTensor& key_padding_mask, bool need_weights,
    bool average_attn_weights) {
  const char* const op = "native_multi_head_attention";
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3, "fasttf.", op,
              ": expected 3-D query, key and value, got ", int_str(query.dim()), "-D, ", int_str(key.dim()), "-D, ",
              int_str(value.dim()), "-D");
  const int64_t embed_dim = query.size(2);
  TORCH_CHECK(num_heads > 0 && embed_dim % num_heads == 0, "fasttf.", op, ": expected num_heads to divide ",
              "the embedding dim ", int_str(embed_dim), ", got num_heads ", int_str(num_heads));
  TORCH_CHECK(in_proj_weight.dim() == 2 && in_proj_weight.size(0) == 3 * embed_dim, "fasttf.", op,
              ": expected in_proj_weight of shape [", int_str(3 * embed_dim), ", ", int_str(embed_dim), "], got ",
              shape_str(in_proj_weight.sizes()));
  const int64_t batch_dim = batch_first ? 0 : 1;
  TORCH_CHECK(key.size(batch_dim) == query.size(batch_dim) && value.size(batch_dim) == query.size(batch_dim),
              "fasttf.", op, ": expected one batch size, got query ", shape_str(query.sizes()), ", key ",
              shape_str(key.sizes()), ", value ", shape_str(value.sizes()));
  const int64_t bsz = query.size(batch_dim), src_len = key.size(1 - batch_dim);
  TORCH_CHECK(!key_padding_mask || (key_padding_mask->dim() == 2 && key_padding_mask->size(0) == bsz &&
                                    key_padding_mask->size(1) == src_len),
              "fasttf.", op, ": expected key_padding_mask of shape [", int_str(bsz), ", ", int_str(src_len), "], got ",
              shape_str(key_padding_mask ? key_padding_mask->sizes() : at::IntArrayRef()));
  TORCH_CHECK(!key_padding_mask || key_padding_mask->scalar_type() == at::kBool ||
                  key_padding_mask->scalar_type() == query.scalar_type(),
              "fasttf.", op, ": expected key_padding_mask of dtype bool or query's dtype ", query.scalar_type(),
              ", got ", key_padding_mask ? key_padding_mask->scalar_type() : query.scalar_type());
  // inference only (the op has no autograd): the ATen calls below skip the autograd and view-tracking
  // layers of the dispatcher, as under inference_mode (~1 us a call under no_grad otherwise)
  const at::AutoDispatchBelowADInplaceOrView below_autograd;

  at::Tensor q, k, v;
  const auto bias_part = [&](int64_t first, int64_t parts) {
    return in_proj_bias ? OptTensor(in_proj_bias->narrow(0, first * embed_dim, parts * embed_dim)) : OptTensor();
  };
  if (key.is_same(value) && query.is_same(key)) {  // self-attention: one product, q, k, v views of it
    const auto qkv = at::linear(query, in_proj_weight, in_proj_bias);
    const auto parts = qkv.view({qkv.size(0), qkv.size(1), 3, embed_dim}).unbind(2);
    q = parts[0], k = parts[1], v = parts[2];
  } else if (key.is_same(value)) {  // encoder-decoder attention: q, then k and v from one product
    q = at::linear(query, in_proj_weight.narrow(0, 0, embed_dim), bias_part(0, 1));
    const auto kv = at::linear(key, in_proj_weight.narrow(0, embed_dim, 2 * embed_dim), bias_part(1, 2));
    const auto parts = kv.view({kv.size(0), kv.size(1), 2, embed_dim}).unbind(2);
    k = parts[0], v = parts[1];
  } else {
    q = at::linear(query, in_proj_weight.narrow(0, 0, embed_dim), bias_part(0, 1));
    k = at::linear(key, in_proj_weight.narrow(0, embed_dim, embed_dim), bias_part(1, 1));
    v = at::linear(value, in_proj_weight.narrow(0, 2 * embed_dim, embed_dim), bias_part(2, 1));
  }
  const auto heads_q = split_heads(q, num_heads, batch_first), heads_k = split_heads(k, num_heads, batch_first),
             heads_v = split_heads(v, num_heads, batch_first);
  const double scale = 1.0 / std::sqrt(static_cast<double>(embed_dim / num_heads));
  // the padding mask as the kernel takes it (SDPA's convention: bool True = attend), (N, 1, 1, S)
  OptTensor mask;
  if (key_padding_mask) {
    const auto padding = key_padding_mask->view({bsz, 1, 1, src_len});
    mask = padding.scalar_type() == at::kBool ? at::logical_not(padding) : padding;
  }
  at::Tensor heads, weights;
  if (need_weights) {
    std::tie(heads, std::ignore, weights) =
        native_attention_forward_weights(heads_q, heads_k, heads_v, mask, 0.0, false, scale, {}, average_attn_weights);
  } else {
    heads = std::get<0>(native_attention_forward(heads_q, heads_k, heads_v, mask, 0.0, false, scale, {}));
    weights = at::empty({0}, query.options());
  }

  // (N, H, L, E), laid out (N, L, H, E) -> (N * L, H * E) -> out projection -> (N, L, out) or (L, N, out)
  const int64_t tgt_len = heads.size(2);
  const auto merged = batch_first ? heads.transpose(1, 2).reshape({bsz * tgt_len, embed_dim})
                                  : heads.permute({2, 0, 1, 3}).reshape({tgt_len * bsz, embed_dim});
  const auto out = at::linear(merged, out_proj_weight, out_proj_bias);
  return {batch_first ? out.view({bsz, tgt_len, -1}) : out.view({tgt_len, bsz, -1}), weights};
}

}  // namespace cpu
}  // namespace fasttf
