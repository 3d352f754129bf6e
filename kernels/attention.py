"""FlashAttention-2 in Triton: the launchers fasttf.ops.attention calls, and the math, once.

For one (batch b, head h) with kv head g = h // (H // Hkv):

    s_ij  = scale * q_i . k_j  (+ mask_ij if the mask is float; -inf where a bool mask is False,
            where j > i under is_causal, and for padding keys j >= S)
    p_ij  = exp(s_ij - lse_i),     lse_i = log sum_j exp(s_ij)      (softmax over the keys)
    z_ij  = keep bit of dropout (Philox: tl.rand(seed, ((b*H + h)*L + i)*S + j) >= p_drop)
    o_i   = sum_j p_ij z_ij / (1 - p_drop) v_j

Everything runs in base 2: s2 = s * log2(e) (scale*log2(e) folded into one multiplier, the float
mask multiplied by log2(e)), exp2 instead of exp, and the stored log-sum-exp is lse2 = lse * log2(e).
A row whose keys are all masked has l_i = 0: its output is 0 and its lse2 is +inf, so every
recomputed p_ij is exp2(-inf) = 0 in the backward and its gradients are 0 (never NaN).

Where to read on:
    attention_common.py     tiles and autotuning, the one-axis grid (any batch), the dot and the
                            bfloat16 rounding that act under the interpreter as on a GPU, dropout
                            bits, mask tiles
    attention_forward.py    the forward kernel: online softmax, out and lse2
    attention_backward.py   D, dK/dV, dQ (with the gradient of the returned weights folded into dP)
    attention_weights.py    the weights P after dropout from the saved lse2 (head-averaged in the
                            kernel), and D's extra term when their gradient flows back
    attention_mask_grad.py  the gradient of a float mask, summed over its broadcast dims

Every launcher takes 4-D views (N, H, L, E) with any strides; `mask` is already expanded (a
stride-0 view, never a copy) to (N, H, L, S) or None; `seed` an int64 tensor of one element.
Grids are one axis of programs (CUDA's x axis, up to 2^31 - 1), so any batch size launches.
"""

import torch

from fasttf.kernels import attention_backward as _backward
from fasttf.kernels.attention_common import INTERPRET, dropout_keep_mask
from fasttf.kernels.attention_forward import attention_forward
from fasttf.kernels.attention_mask_grad import attention_mask_grad
from fasttf.kernels.attention_weights import add_weights_delta, attention_weights


def attention_backward(grad_out, query, key, value, out, lse, mask, dropout_p, is_causal, scale, seed,
                       grad_weights=None, mask_grad_shape=None):
    """-> (dq, dk, dv, dmask). grad_weights: the gradient of attention_weights' result ((N, L, S)
    averaged, or (N, H, L, S)) or None. mask_grad_shape: None, or (mask_batch, mask_heads) (each
    1 or N, H) for a float mask's gradient, then dmask is float32 (mask_batch, mask_heads, L, S)
    summed over the broadcast batches and heads; else dmask is None."""
    if out.numel() == 0 or query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        grad_q, grad_k, grad_v = _backward.attention_backward(grad_out, query, key, value, out, lse, mask,
                                                              dropout_p, is_causal, scale, seed)
        dmask = None
        if mask_grad_shape is not None:
            dmask = query.new_zeros((*mask_grad_shape, query.size(2), key.size(2)), dtype=torch.float32)
        return grad_q, grad_k, grad_v, dmask
    delta = _backward.attention_delta(grad_out, out, query.size(1))
    if grad_weights is not None:
        add_weights_delta(delta, grad_weights, query, key, value, lse, mask, dropout_p, is_causal, scale, seed)
    grad_q, grad_k, grad_v = _backward.attention_backward(grad_out, query, key, value, out, lse, mask, dropout_p,
                                                          is_causal, scale, seed, grad_weights, delta)
    dmask = None
    if mask_grad_shape is not None:
        dmask = attention_mask_grad(grad_out, query, key, value, lse, delta, mask, *mask_grad_shape, dropout_p,
                                    is_causal, scale, seed, grad_weights)
    return grad_q, grad_k, grad_v, dmask


__all__ = ["INTERPRET", "attention_forward", "attention_backward", "attention_weights", "dropout_keep_mask"]
