// The extension's kernels, one declaration per device. Schemas and bindings live in fasttf.cpp.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace fasttf {

using OptTensor = std::optional<at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The dispatcher's handle of op `name`, typed by the C++ function type of its kernels (e.g.
// `decltype(cpu::residual_add)`): a call through it dispatches on device and autograd like torch.ops.
template <typename Signature>
c10::TypedOperatorHandle<Signature> dispatcher_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

#define FASTTF_DECLARE_OPS                                                                                        \
  at::Tensor positional_encoding(const at::Tensor& x, const OptTensor& offsets, int64_t offset, double scale,   \
                                 double base, bool batch_first);                                                \
  at::Tensor positional_encoding_backward(const at::Tensor& grad, double scale);                                \
  at::Tensor residual_add(const at::Tensor& x, const at::Tensor& residual, double dropout_p,                    \
                          const OptTensor& seed);                                                               \
  at::Tensor residual_add_backward(const at::Tensor& grad, double dropout_p, const OptTensor& seed);            \
  at::Tensor dropout(const at::Tensor& input, double dropout_p, const OptTensor& seed);                        \
  at::Tensor dropout_keep_mask(const at::Tensor& like, double dropout_p, const OptTensor& seed);                \
  Tensor4 add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,              \
                         const OptTensor& bias, double eps, double dropout_p, const OptTensor& seed);           \
  Tensor4 add_layer_norm_backward(const at::Tensor& grad_out, const OptTensor& grad_s, const at::Tensor& s,     \
                                  const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,      \
                                  bool need_dweight, bool need_dbias, double dropout_p, const OptTensor& seed);

namespace cpu {
FASTTF_DECLARE_OPS

// fasttf's flash-style attention on the CPU (cpu/attention*.cpp): the kernels behind
// fasttf::attention_forward/_weights/_backward for CPU tensors (fasttf/ops/attention_cpu.py).
std::tuple<at::Tensor, at::Tensor> native_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const OptTensor& attn_mask,
                                                            double dropout_p, bool is_causal, double scale,
                                                            const OptTensor& seed);
at::Tensor native_attention_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                    const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
                                    const OptTensor& seed, bool average_heads);
// (out, lse, weights) of one call, as native_attention_forward then native_attention_weights give them
// (need_weights=True; one Q K^T product where the two make two).
std::tuple<at::Tensor, at::Tensor, at::Tensor> native_attention_forward_weights(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask, double dropout_p,
    bool is_causal, double scale, const OptTensor& seed, bool average_heads);
Tensor4 native_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
                                  const OptTensor& seed, const OptTensor& grad_weights, bool average_heads,
                                  bool mask_requires_grad);
at::Tensor native_attention_keep_mask(const at::Tensor& q, const at::Tensor& k, double dropout_p,
                                      const OptTensor& seed);
// fasttf.MultiheadAttention's inference call: in-projection, native_attention_forward (_weights where
// need_weights), out-projection (cpu/multi_head_attention.cpp); no dropout, no mask but a key padding
// mask, no autograd. (out, weights), weights empty unless need_weights.
std::tuple<at::Tensor, at::Tensor> native_multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& in_proj_weight,
    const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
    int64_t num_heads, bool batch_first, const OptTensor& key_padding_mask, bool need_weights,
    bool average_attn_weights);
// The dtype the block products read q, k, v of this dtype in (float32, float64, or bfloat16 where
// the CPU has bfloat16 dot products: cpu/attention.h).
at::ScalarType native_attention_operand_type(at::ScalarType dtype);
// Whether the CPU attention kernel's float32 block products run on its AVX2 micro-kernel (AVX2 the widest
// ISA, FASTTF_CPU_ISA counted), not MKL's sgemm.
bool native_attention_panels();
// x rounded to bfloat16 as the CPU attention kernel rounds its operands (for tests).
at::Tensor round_to_bfloat16(const at::Tensor& x);
}  // namespace cpu

#ifdef FASTTF_WITH_CUDA
namespace cuda {
FASTTF_DECLARE_OPS
}  // namespace cuda
#endif

}  // namespace fasttf
