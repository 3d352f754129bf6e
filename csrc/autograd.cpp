// The autograd kernels of residual_add, add_layer_norm, positional_encoding, dropout and the CPU attention kernel,
// in C++ (torch::autograd::Function; positional_encoding, dropout and residual_add without dropout plain graph
// nodes):
// without a Python autograd.Function on the way, a call costs about what eager's `residual + x`
// costs, which matters at small D where the kernels take tens of microseconds. The forward
// calls the device kernel below autograd; the backward calls the backward op through the
// dispatcher (so a backward op's own autograd registration, in Python, still applies).
//
//   residual_add:   dresidual = dy,  dx = dy (no kernel) or residual_add_backward(dy, p, seed)
//   add_layer_norm: (dresidual, dx, dweight, dbias) = add_layer_norm_backward(dout, ds, ...), dx = dresidual
//                   without dropout; mean and rstd are outputs without a gradient.
//   positional_encoding: dx = positional_encoding_backward(dy, scale)
//   dropout:        dinput = dropout(dy, p, seed)
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include "ops.h"

namespace fasttf {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::TypedOperatorHandle<decltype(cpu::residual_add)> residual_add_op() {
  static const auto handle = dispatcher_op<decltype(cpu::residual_add)>("fasttf::residual_add");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::residual_add_backward)> residual_add_backward_op() {
  static const auto handle = dispatcher_op<decltype(cpu::residual_add_backward)>("fasttf::residual_add_backward");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::dropout)> dropout_op() {
  static const auto handle = dispatcher_op<decltype(cpu::dropout)>("fasttf::dropout");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::add_layer_norm)> add_layer_norm_op() {
  static const auto handle = dispatcher_op<decltype(cpu::add_layer_norm)>("fasttf::add_layer_norm");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::add_layer_norm_backward)> add_layer_norm_backward_op() {
  static const auto handle = dispatcher_op<decltype(cpu::add_layer_norm_backward)>("fasttf::add_layer_norm_backward");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::positional_encoding)> positional_encoding_op() {
  static const auto handle = dispatcher_op<decltype(cpu::positional_encoding)>("fasttf::positional_encoding");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::positional_encoding_backward)> positional_encoding_backward_op() {
  static const auto handle =
      dispatcher_op<decltype(cpu::positional_encoding_backward)>("fasttf::positional_encoding_backward");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::native_attention_forward)> attention_forward_op() {
  static const auto handle = dispatcher_op<decltype(cpu::native_attention_forward)>("fasttf::native_attention_forward");
  return handle;
}

c10::TypedOperatorHandle<decltype(cpu::native_attention_backward)> attention_backward_op() {
  static const auto handle =
      dispatcher_op<decltype(cpu::native_attention_backward)>("fasttf::native_attention_backward");
  return handle;
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const OptTensor& t) { return t.has_value() && has_tangent(*t); }

// A plain node (below) would drop a forward-mode tangent silently, and a Function raises a generic
// error for one (the C++ API has no jvp): the ops recording plain nodes check first, naming the input.
void check_no_tangent(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(!has_tangent(t), "fasttf.", op, ": jvp (forward-mode AD) is not implemented; ", name,
              " carries a forward-mode tangent (torch.autograd.forward_ad or torch.func.jvp)");
}

// The backward ops' own autograd kernels are in Python (torch.library.register_autograd: a double
// backward, or a clear error that there is none); they matter only where the backward is itself
// recorded (create_graph=True: grad mode on inside it). Elsewhere the backward calls the op below
// autograd, skipping ~25 us of Python a call.
template <typename Call>
auto call_backward_op(Call call) {
  if (at::GradMode::is_enabled()) return call();
  at::AutoDispatchBelowADInplaceOrView guard;
  return call();
}

// Whether a call records a graph: grad mode on and an input that requires grad, or an input with a
// forward-mode tangent (which raises there: a Function's C++ API has no jvp). The other
// calls -- inference, no_grad, inputs without grad -- run the kernel directly: Function::apply builds a
// graph node even when it is not kept, ~1 us of a call.
template <typename... Tensors>
bool needs_autograd(const Tensors&... inputs) {
  return torch::autograd::compute_requires_grad(inputs...) || (has_tangent(inputs) || ...);
}

// Plain graph nodes, as the generated autograd code records for an aten op (AddBackward0 for eager's
// `residual + x`, MulBackward0 for `x * scale`), for the calls whose backward saves no tensor:
// residual_add without dropout (every training step of a model without dropout) and
// positional_encoding. A Function's CppNode costs more (context, saved data, input metadata, a mutex
// in its backward): residual_add, forward + torch.autograd.grad, float32, 1 thread, medians of 3000
// calls alternating with eager's (AMD EPYC): (8, 512, 4) 0.89x eager's -> 0.97x, (8, 512, 64) 0.91x ->
// 0.98-1.09x, with eager first in each pair (second, (8, 512, 4) reads 1.02-1.04x). Dropout keeps
// a Function (ResidualAddDropout, below); a forward-mode tangent raises first (check_no_tangent).
struct ResidualAddBackward : public torch::autograd::Node {
  // out = residual + x: both gradients are the incoming one
  variable_list apply(variable_list&& grads) override { return {grads[0], grads[0]}; }
  std::string name() const override { return "fasttf::ResidualAddBackward"; }
};

struct PositionalEncodingBackward : public torch::autograd::Node {
  double scale = 1.0;
  // out = x * scale + pe: dx = dout * scale
  variable_list apply(variable_list&& grads) override {
    at::Tensor dx;
    if (grads[0].defined()) {
      dx = call_backward_op([&] { return positional_encoding_backward_op().call(grads[0], scale); });
    }
    return {dx};
  }
  std::string name() const override { return "fasttf::PositionalEncodingBackward"; }
};

struct DropoutBackward : public torch::autograd::Node {
  double dropout_p = 0.0;
  OptTensor seed;  // a 0-dim int64 CPU tensor (no gradient, no graph)
  // out = input * m: dinput = dout * m, the same op with the same seed (so a double backward records it again)
  variable_list apply(variable_list&& grads) override {
    at::Tensor dx;
    if (grads[0].defined()) dx = call_backward_op([&] { return dropout_op().call(grads[0], dropout_p, seed); });
    return {dx};
  }
  std::string name() const override { return "fasttf::DropoutBackward"; }
};

// Runs `forward` (the kernel, below autograd) and records `node` as its output's grad_fn, with an edge
// to each of `inputs`; under a functorch transform (torch.func.grad, vjp) it raises the Function's error
// instead, not a graph the transform does not know.
template <typename Node, typename Forward, typename... Inputs>
at::Tensor with_plain_node(c10::intrusive_ptr<Node> node, Forward forward, const Inputs&... inputs) {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward();
  }
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(out, node);
  return out;
}

// out = residual + dropout(x), dropout_p > 0 (without dropout: ResidualAddBackward above). The backward
// regenerates x's keep bits from the saved seed: dx = keep * dout / (1 - p), dresidual = dout.
class ResidualAddDropout : public torch::autograd::Function<ResidualAddDropout> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual, double dropout_p,
                            const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = residual_add_op().call(x, residual, dropout_p, seed);  // checks the arguments, the seed's too
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->save_for_backward({*seed});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    at::Tensor dx;
    if (grad.defined()) {
      const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
      const at::Tensor seed = ctx->get_saved_variables()[0];
      dx = call_backward_op([&] { return residual_add_backward_op().call(grad, dropout_p, optional_of(seed)); });
    }
    return {dx, grad, at::Tensor(), at::Tensor()};
  }
};

class AddLayerNorm : public torch::autograd::Function<AddLayerNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps, double dropout_p,
                               const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, s, mean, rstd] = add_layer_norm_op().call(x, residual, weight, bias, eps, dropout_p, seed);
    ctx->save_for_backward({s, mean, rstd, weight.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // an unused output (s, mean, rstd) costs no tensor of zeros
    return {out, s, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3], &seed = saved[4];
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    at::Tensor grad_out = grads[0];
    const at::Tensor& grad_s = grads[1];
    if (!grad_out.defined() && !grad_s.defined()) return variable_list(7);
    if (!grad_out.defined()) grad_out = at::zeros_like(s);
    // needs_input_grad counts the tensor inputs only: x, residual, then weight and bias when given
    const bool need_dweight = weight.defined() && ctx->needs_input_grad(2);
    const bool need_dbias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(weight.defined() ? 3 : 2);
    auto [dresidual, dx, dweight, dbias] = call_backward_op([&] {
      return add_layer_norm_backward_op().call(grad_out, optional_of(grad_s), s, mean, rstd, optional_of(weight),
                                               need_dweight, need_dbias, dropout_p, optional_of(seed));
    });
    if (dropout_p == 0.0) dx = dresidual;
    return {dx,
            dresidual,
            need_dweight ? dweight : at::Tensor(),
            need_dbias ? dbias : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// The CPU attention kernel pair (fasttf.scaled_dot_product_attention's eager calls on CPU tensors):
//   (dq, dk, dv, dmask) = native_attention_backward(dout, q, k, v, out, lse, ...), dmask only for a
//   float mask that requires grad; lse is an output without a gradient.
class NativeAttention : public torch::autograd::Function<NativeAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
                               const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_forward_op().call(q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
    ctx->save_for_backward({q, k, v, out, lse, attn_mask.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor &mask = saved[5], &seed = saved[6];
    if (!grads[0].defined()) return variable_list(8);
    // needs_input_grad counts the tensor inputs only: q, k, v, then the mask when given
    const bool mask_requires_grad = mask.defined() && mask.scalar_type() != at::kBool && ctx->needs_input_grad(3);
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble(), scale = ctx->saved_data["scale"].toDouble();
    const bool is_causal = ctx->saved_data["is_causal"].toBool();
    auto [dq, dk, dv, dmask] = call_backward_op([&] {
      return attention_backward_op().call(grads[0], q, k, v, out, lse, optional_of(mask), dropout_p, is_causal, scale,
                                          optional_of(seed), OptTensor(), false, mask_requires_grad);
    });
    return {dq, dk, dv, mask_requires_grad ? dmask : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> native_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const OptTensor& attn_mask,
                                                             double dropout_p, bool is_causal, double scale,
                                                             const OptTensor& seed) {
  if (!needs_autograd(q, k, v, attn_mask)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_forward_op().call(q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
  }
  auto outputs = NativeAttention::apply(q, k, v, attn_mask, dropout_p, is_causal, scale, seed);
  return {outputs[0], outputs[1]};
}

at::Tensor positional_encoding_autograd(const at::Tensor& x, const OptTensor& offsets, int64_t offset, double scale,
                                        double base, bool batch_first) {
  if (!needs_autograd(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return positional_encoding_op().call(x, offsets, offset, scale, base, batch_first);
  }
  check_no_tangent("positional_encoding", "x", x);
  auto node = c10::make_intrusive<PositionalEncodingBackward>();
  node->scale = scale;
  return with_plain_node(
      node, [&] { return positional_encoding_op().call(x, offsets, offset, scale, base, batch_first); }, x);
}

at::Tensor residual_add_autograd(const at::Tensor& x, const at::Tensor& residual, double dropout_p,
                                 const OptTensor& seed) {
  if (!needs_autograd(x, residual)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return residual_add_op().call(x, residual, dropout_p, seed);
  }
  check_no_tangent("residual_add", "x", x);
  check_no_tangent("residual_add", "residual", residual);
  if (dropout_p > 0.0) return ResidualAddDropout::apply(x, residual, dropout_p, seed);
  return with_plain_node(
      c10::make_intrusive<ResidualAddBackward>(),
      [&] { return residual_add_op().call(x, residual, dropout_p, seed); },  // checks the arguments
      x, residual);
}

// fasttf.dropout: a plain node too (its backward keeps only the seed, no tensor of the graph).
at::Tensor dropout_autograd(const at::Tensor& input, double dropout_p, const OptTensor& seed) {
  if (!needs_autograd(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dropout_op().call(input, dropout_p, seed);
  }
  check_no_tangent("dropout", "input", input);
  auto node = c10::make_intrusive<DropoutBackward>();
  node->dropout_p = dropout_p;
  node->seed = seed;
  return with_plain_node(node, [&] { return dropout_op().call(input, dropout_p, seed); }, input);  // checks
}

Tensor4 add_layer_norm_autograd(const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
                                const OptTensor& bias, double eps, double dropout_p, const OptTensor& seed) {
  if (!needs_autograd(x, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return add_layer_norm_op().call(x, residual, weight, bias, eps, dropout_p, seed);
  }
  auto outputs = AddLayerNorm::apply(x, residual, weight, bias, eps, dropout_p, seed);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttf, Autograd, m) {
  m.impl("residual_add", &residual_add_autograd);
  m.impl("dropout", &dropout_autograd);
  m.impl("add_layer_norm", &add_layer_norm_autograd);
  m.impl("positional_encoding", &positional_encoding_autograd);
  m.impl("native_attention_forward", &native_attention_autograd);
}

}  // namespace fasttf
