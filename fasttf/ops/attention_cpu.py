"""fasttf's own attention kernel on the CPU (csrc/cpu/attention*.cpp) and which kernel a CPU call runs.

FASTTF_CPU_ATTENTION, read at every call:
  "native" (or unset): the C++ flash-style kernel of the extension (float32, bfloat16, float16 with
      float32 math; float64 in float64; any head dim);
  "triton": the Triton kernel under the Triton interpreter (TRITON_INTERPRET=1 must be set before
      triton is imported), a slow correctness path.
CUDA tensors always run the Triton kernels.

The extension's ops (what fasttf::attention_forward/_weights/_backward call for CPU tensors):

    torch.ops.fasttf.native_attention_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed)
        -> (out, lse)                      lse = natural-log log-sum-exp, float32 (float64 for float64)
    torch.ops.fasttf.native_attention_weights(q, k, lse, attn_mask, dropout_p, is_causal, scale, seed,
                                              average_heads) -> weights
    torch.ops.fasttf.native_attention_forward_weights(q, k, v, attn_mask, dropout_p, is_causal, scale, seed,
                                                      average_heads) -> (out, lse, weights)
                                       the two above in one kernel (need_weights=True, eager)
    torch.ops.fasttf.native_attention_backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal,
                                               scale, seed, grad_weights, average_heads, mask_requires_grad)
        -> (dq, dk, dv, dmask)             dmask empty unless mask_requires_grad
    torch.ops.fasttf.native_attention_keep_mask(q, k, dropout_p, seed) -> keep (N, H, L, S) bool

native_attention_forward has its autograd in C++ (csrc/autograd.cpp): fasttf.scaled_dot_product_attention's
eager calls on CPU tensors call it through its pybind11 entry, gradients and all; out comes back laid
out (N, L, H, Ev) (fasttf.ops.attention_output_like).

Dropout keeps element (b, h, i, j) when Philox4x32-10(seed, ((b H + h) L + i) S + j) >= p 2^32
(csrc/philox.h); the seed is the same one-element int64 tensor the Triton path draws.
"""

import os

import torch
from torch import Tensor

from fasttf import _extension
from fasttf._checks import no_second_order
from fasttf.ops import attention_output_like, stat_dtype

ENV = "FASTTF_CPU_ATTENTION"
CHOICES = ("native", "triton")


def cpu_kernel() -> str:
    """The kernel FASTTF_CPU_ATTENTION names now: "native" (the default) or "triton"."""
    choice = os.environ.get(ENV, "").strip().lower() or "native"
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be 'native' or 'triton', got {os.environ.get(ENV)!r}")
    return choice


def runs_native(tensor: Tensor) -> bool:
    """Whether an attention call on `tensor` runs the C++ CPU kernel."""
    return tensor.device.type == "cpu" and (os.environ.get(ENV) is None or cpu_kernel() == "native")


def require_interpreter(interpret: bool) -> None:
    """FASTTF_CPU_ATTENTION=triton on CPU tensors needs the Triton interpreter: a clear error if it is off."""
    if not interpret:
        raise RuntimeError(f"fasttf.scaled_dot_product_attention: {ENV}=triton runs the Triton kernel on CPU "
                           f"tensors under the Triton interpreter, which needs TRITON_INTERPRET=1 set before "
                           f"triton is imported; unset {ENV} (or set it to 'native') for fasttf's C++ CPU kernel")


def native_ops():
    """torch.ops.fasttf, once the extension (which holds the C++ kernel) is known to be built."""
    _extension.require("scaled_dot_product_attention")
    return torch.ops.fasttf


def attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    """(out, lse) of the C++ kernel; the contract of fasttf::attention_forward. These wrappers call the
    ops through their pybind11 entries in eager mode (~3 us less a call than torch.ops; the same
    dispatch), through torch.ops under torch.compile."""
    ops = _extension.direct() or native_ops()
    return ops.native_attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)


def attention_weights(query, key, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
    """The attention weights after dropout, (N, L, S) head-averaged or (N, H, L, S)."""
    ops = _extension.direct() or native_ops()
    return ops.native_attention_weights(query, key, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads)


def attention_forward_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
    """(out, lse, weights): attention_forward then attention_weights in one kernel, which keeps a query
    block's scores over all keys instead of computing Q K^T again for the weights."""
    ops = _extension.direct() or native_ops()
    return ops.native_attention_forward_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, seed,
                                                average_heads)


def attention_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, seed,
                       grad_weights, average_heads, mask_requires_grad):
    """(dq, dk, dv, dmask) of the C++ kernel; dmask empty unless mask_requires_grad."""
    ops = _extension.direct() or native_ops()
    return ops.native_attention_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                                         scale, seed, grad_weights, average_heads, mask_requires_grad)


def multi_head_attention(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
                         batch_first, key_padding_mask=None, need_weights=False, average_attn_weights=True):
    """fasttf.MultiheadAttention's inference call (no dropout, no mask but a key padding mask; nothing
    records a gradient) in one op: in-projection, attention_forward (attention_forward_weights where
    need_weights), out-projection, as the module's Python path makes them (the same bits). (out,
    weights or None)."""
    ops = _extension.direct() or native_ops()
    out, weights = ops.native_multi_head_attention(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight,
                                                   out_proj_bias, num_heads, batch_first, key_padding_mask,
                                                   need_weights, average_attn_weights)
    return out, (weights if need_weights else None)


def dropout_keep_mask(query: Tensor, key: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """The bool keep-mask (N, H, L, S) the C++ kernel draws for this seed."""
    return native_ops().native_attention_keep_mask(query, key, float(dropout_p), seed)


if _extension.is_available():

    @torch.library.register_fake("fasttf::native_attention_forward")
    def _forward_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
        n, h, length, _ = q.shape
        return attention_output_like(q, v), q.new_empty((n, h, length), dtype=stat_dtype(q.dtype))

    @torch.library.register_fake("fasttf::native_attention_weights")
    def _weights_fake(q, k, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
        n, h, length, _ = q.shape
        shape = (n, length, k.size(2)) if average_heads else (n, h, length, k.size(2))
        return q.new_empty(shape)

    @torch.library.register_fake("fasttf::native_attention_forward_weights")
    def _forward_weights_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
        out, lse = _forward_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, seed)
        return out, lse, _weights_fake(q, k, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads)

    @torch.library.register_fake("fasttf::native_attention_backward")
    def _backward_fake(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, grad_weights,
                       average_heads, mask_requires_grad):
        if mask_requires_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
            dmask = attn_mask.new_empty(attn_mask.shape)
        else:
            dmask = q.new_empty((0,))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask

    @torch.library.register_fake("fasttf::native_multi_head_attention")
    def _multi_head_fake(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
                         batch_first, key_padding_mask=None, need_weights=False, average_attn_weights=True):
        out = query.new_empty((*query.shape[:-1], out_proj_weight.size(0)))
        if not need_weights:
            return out, query.new_empty((0,))
        batch, length = (0, 1) if batch_first else (1, 0)  # key's length is on the same dim as query's
        n, target, source = query.size(batch), query.size(length), key.size(length)
        return out, query.new_empty((n, target, source) if average_attn_weights else (n, num_heads, target, source))

    # The C++ autograd of native_attention_forward (csrc/autograd.cpp) calls the backward op; that op's
    # own backward (a second order) raises SecondOrderError, never a silent zero or torch's warning.
    torch.library.register_autograd(
        "fasttf::native_attention_backward",
        no_second_order("scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention "
                                                        "(or fasttf.reference.scaled_dot_product_attention)"),
        setup_context=lambda ctx, inputs, output: None)

    @torch.library.register_fake("fasttf::native_attention_keep_mask")
    def _keep_mask_fake(q, k, dropout_p, seed):
        return q.new_empty((q.size(0), q.size(1), q.size(2), k.size(2)), dtype=torch.bool)
