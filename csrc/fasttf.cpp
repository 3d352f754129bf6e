// fasttf._C: the TORCH_LIBRARY schemas of the extension's ops, their CPU (and CUDA) kernels, and
// pybind11 bindings of the same functions (fasttf._C.<op>).
//
// Dropout takes its seed as an input (a 0-dim int64 CPU tensor drawn in Python from torch's
// generator), so every op is a pure function of its inputs; the backward ops regenerate the
// keep-mask from the same seed (csrc/philox.h) instead of storing it.
#include <torch/extension.h>

#include "cpu/dropout.h"
#include "cpu/row_math.h"
#include "philox.h"
#include "ops.h"
#include "sdpa_fast_path.h"

TORCH_LIBRARY(fasttf, m) {
  m.def("positional_encoding(Tensor x, Tensor? offsets, int offset, float scale, float base, bool batch_first) "
        "-> Tensor");
  m.def("positional_encoding_backward(Tensor grad, float scale) -> Tensor");
  m.def("residual_add(Tensor x, Tensor residual, float dropout_p=0.0, Tensor? seed=None) -> Tensor");
  m.def("residual_add_backward(Tensor grad, float dropout_p, Tensor? seed) -> Tensor");
  m.def("dropout(Tensor input, float dropout_p, Tensor? seed) -> Tensor");
  m.def("dropout_keep_mask(Tensor like, float dropout_p, Tensor? seed) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
        "Tensor? seed) -> (Tensor out, Tensor s, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_backward(Tensor grad_out, Tensor? grad_s, Tensor s, Tensor mean, Tensor rstd, "
        "Tensor? weight, bool need_dweight, bool need_dbias, float dropout_p, Tensor? seed) "
        "-> (Tensor dresidual, Tensor dx, Tensor dweight, Tensor dbias)");
  // The CPU attention kernels (cpu/attention*.cpp); dmask is empty unless mask_requires_grad.
  m.def("native_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, "
        "bool is_causal, float scale, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def("native_attention_weights(Tensor q, Tensor k, Tensor lse, Tensor? attn_mask, float dropout_p, "
        "bool is_causal, float scale, Tensor? seed, bool average_heads) -> Tensor");
  m.def("native_attention_forward_weights(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, "
        "bool is_causal, float scale, Tensor? seed, bool average_heads) -> (Tensor out, Tensor lse, Tensor weights)");
  m.def("native_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? attn_mask, float dropout_p, bool is_causal, float scale, Tensor? seed, Tensor? grad_weights, "
        "bool average_heads, bool mask_requires_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def("native_attention_keep_mask(Tensor q, Tensor k, float dropout_p, Tensor? seed) -> Tensor");
  m.def("native_multi_head_attention(Tensor query, Tensor key, Tensor value, Tensor in_proj_weight, "
        "Tensor? in_proj_bias, Tensor out_proj_weight, Tensor? out_proj_bias, int num_heads, bool batch_first, "
        "Tensor? key_padding_mask=None, bool need_weights=False, bool average_attn_weights=True) "
        "-> (Tensor out, Tensor weights)");
}

#define FASTTF_IMPL_OPS(ns)                                                   \
  m.impl("positional_encoding", &fasttf::ns::positional_encoding);            \
  m.impl("positional_encoding_backward", &fasttf::ns::positional_encoding_backward); \
  m.impl("residual_add", &fasttf::ns::residual_add);                          \
  m.impl("residual_add_backward", &fasttf::ns::residual_add_backward);        \
  m.impl("dropout", &fasttf::ns::dropout);                                    \
  m.impl("dropout_keep_mask", &fasttf::ns::dropout_keep_mask);                \
  m.impl("add_layer_norm", &fasttf::ns::add_layer_norm);                      \
  m.impl("add_layer_norm_backward", &fasttf::ns::add_layer_norm_backward);

TORCH_LIBRARY_IMPL(fasttf, CPU, m) {
  FASTTF_IMPL_OPS(cpu)
  m.impl("native_attention_forward", &fasttf::cpu::native_attention_forward);
  m.impl("native_attention_weights", &fasttf::cpu::native_attention_weights);
  m.impl("native_attention_forward_weights", &fasttf::cpu::native_attention_forward_weights);
  m.impl("native_attention_backward", &fasttf::cpu::native_attention_backward);
  m.impl("native_attention_keep_mask", &fasttf::cpu::native_attention_keep_mask);
  m.impl("native_multi_head_attention", &fasttf::cpu::native_multi_head_attention);
}

#ifdef FASTTF_WITH_CUDA
TORCH_LIBRARY_IMPL(fasttf, CUDA, m) { FASTTF_IMPL_OPS(cuda) }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttf's C++/CUDA kernels; the ops are also registered as torch.ops.fasttf.*";
#ifdef FASTTF_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // The same ops through pybind11 (they dispatch on the device like torch.ops.fasttf.*).
  m.def("positional_encoding", [](const at::Tensor& x, const fasttf::OptTensor& offsets, int64_t offset, double scale,
                                  double base, bool batch_first) {
    static const auto op =
        fasttf::dispatcher_op<decltype(fasttf::cpu::positional_encoding)>("fasttf::positional_encoding");
    return op.call(x, offsets, offset, scale, base, batch_first);
  }, py::arg("x"), py::arg("offsets"), py::arg("offset"), py::arg("scale"), py::arg("base"), py::arg("batch_first"));
  m.def("residual_add", [](const at::Tensor& x, const at::Tensor& residual, double dropout_p, const fasttf::OptTensor& seed) {
    static const auto op = fasttf::dispatcher_op<decltype(fasttf::cpu::residual_add)>("fasttf::residual_add");
    return op.call(x, residual, dropout_p, seed);
  }, py::arg("x"), py::arg("residual"), py::arg("dropout_p") = 0.0, py::arg("seed") = py::none());
  m.def("dropout", [](const at::Tensor& input, double dropout_p, const fasttf::OptTensor& seed) {
    static const auto op = fasttf::dispatcher_op<decltype(fasttf::cpu::dropout)>("fasttf::dropout");
    return op.call(input, dropout_p, seed);
  }, py::arg("input"), py::arg("dropout_p"), py::arg("seed"));
  m.def("dropout_keep_mask", [](const at::Tensor& like, double dropout_p, const fasttf::OptTensor& seed) {
    static const auto op = fasttf::dispatcher_op<decltype(fasttf::cpu::dropout_keep_mask)>("fasttf::dropout_keep_mask");
    return op.call(like, dropout_p, seed);
  }, py::arg("like"), py::arg("dropout_p"), py::arg("seed"));
  m.def("add_layer_norm", [](const at::Tensor& x, const at::Tensor& residual, const fasttf::OptTensor& weight,
                             const fasttf::OptTensor& bias, double eps, double dropout_p, const fasttf::OptTensor& seed) {
    static const auto op = fasttf::dispatcher_op<decltype(fasttf::cpu::add_layer_norm)>("fasttf::add_layer_norm");
    return op.call(x, residual, weight, bias, eps, dropout_p, seed);
  }, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("dropout_p"),
     py::arg("seed"));
  m.def("native_attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const fasttf::OptTensor& attn_mask, double dropout_p, bool is_causal,
                                       double scale, const fasttf::OptTensor& seed) {
    static const auto op =
        fasttf::dispatcher_op<decltype(fasttf::cpu::native_attention_forward)>("fasttf::native_attention_forward");
    return op.call(q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"),
     py::arg("scale"), py::arg("seed"));
  m.def("native_attention_weights", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                       const fasttf::OptTensor& attn_mask, double dropout_p, bool is_causal,
                                       double scale, const fasttf::OptTensor& seed, bool average_heads) {
    static const auto op =
        fasttf::dispatcher_op<decltype(fasttf::cpu::native_attention_weights)>("fasttf::native_attention_weights");
    return op.call(q, k, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads);
  }, py::arg("q"), py::arg("k"), py::arg("lse"), py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"),
     py::arg("scale"), py::arg("seed"), py::arg("average_heads"));
  m.def("native_attention_forward_weights", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const fasttf::OptTensor& attn_mask, double dropout_p, bool is_causal,
                                               double scale, const fasttf::OptTensor& seed, bool average_heads) {
    static const auto op = fasttf::dispatcher_op<decltype(fasttf::cpu::native_attention_forward_weights)>(
        "fasttf::native_attention_forward_weights");
    return op.call(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, average_heads);
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"),
     py::arg("scale"), py::arg("seed"), py::arg("average_heads"));
  m.def("native_attention_backward", [](const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        const fasttf::OptTensor& attn_mask, double dropout_p, bool is_causal,
                                        double scale, const fasttf::OptTensor& seed,
                                        const fasttf::OptTensor& grad_weights, bool average_heads,
                                        bool mask_requires_grad) {
    static const auto op =
        fasttf::dispatcher_op<decltype(fasttf::cpu::native_attention_backward)>("fasttf::native_attention_backward");
    return op.call(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, grad_weights,
                   average_heads, mask_requires_grad);
  }, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
     py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"), py::arg("seed"),
     py::arg("grad_weights"), py::arg("average_heads"), py::arg("mask_requires_grad"));
  m.def("native_multi_head_attention", [](const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          const at::Tensor& in_proj_weight, const fasttf::OptTensor& in_proj_bias,
                                          const at::Tensor& out_proj_weight, const fasttf::OptTensor& out_proj_bias,
                                          int64_t num_heads, bool batch_first,
                                          const fasttf::OptTensor& key_padding_mask, bool need_weights,
                                          bool average_attn_weights) {
    static const auto op = fasttf::dispatcher_op<decltype(fasttf::cpu::native_multi_head_attention)>(
        "fasttf::native_multi_head_attention");
    return op.call(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
                   batch_first, key_padding_mask, need_weights, average_attn_weights);
  }, py::arg("query"), py::arg("key"), py::arg("value"), py::arg("in_proj_weight"), py::arg("in_proj_bias"),
     py::arg("out_proj_weight"), py::arg("out_proj_bias"), py::arg("num_heads"), py::arg("batch_first"),
     py::arg("key_padding_mask") = py::none(), py::arg("need_weights") = false, py::arg("average_attn_weights") = true);
  // fasttf.scaled_dot_product_attention's eager CPU call, or None (sdpa_fast_path.cpp)
  m.def("native_sdpa_or_none", &fasttf::native_sdpa_or_none, py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"), py::arg("enable_gqa"));
  // For tests and reports: the dtype the CPU attention kernel's block products read inputs of a dtype in.
  m.def("_cpu_attention_operand_dtype", &fasttf::cpu::native_attention_operand_type, py::arg("dtype"));
  // For tests and reports: whether float32 block products run on the AVX2 micro-kernel (attention_panels.cpp).
  m.def("_cpu_attention_panels", &fasttf::cpu::native_attention_panels);
  // For tests: float32 rounded to bfloat16 by the CPU attention kernel's rounding (round_rows).
  m.def("_round_to_bfloat16", &fasttf::cpu::round_to_bfloat16, py::arg("x"));
  // For tests: the CPU dropout multipliers of elements [start, start + n) as the kernels draw them
  // (each x86 path of dropout.cpp: vectorised loops, AVX-512), beside the keep bytes.
  m.def("_dropout_multipliers", [](uint64_t seed, int64_t start, int64_t n, double dropout_p) {
    auto out = at::empty({n}, at::kFloat);
    fasttf::cpu::dropout_multipliers(seed, start, n, fasttf::dropout_threshold(dropout_p),
                                     static_cast<float>(1.0 / (1.0 - dropout_p)), out.data_ptr<float>());
    return out;
  }, py::arg("seed"), py::arg("start"), py::arg("n"), py::arg("dropout_p"));
  // For tests and reports: whether a CPU elementwise call moving `bytes` in all streams its outputs
  // past the caches (cpu/row_math.h).
  m.def("_cpu_streams_stores", &fasttf::cpu::streams, py::arg("bytes"));
}
