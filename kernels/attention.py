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

from fasttf.kernels.attention_backward import attention_backward
from fasttf.kernels.attention_common import INTERPRET, dropout_keep_mask
from fasttf.kernels.attention_forward import attention_forward

__all__ = ["INTERPRET", "attention_forward", "attention_backward", "dropout_keep_mask"]
