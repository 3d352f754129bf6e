"""The gradient of a float attention mask: dS summed over the dims the mask was broadcast along.

The mask is added to the scores, so its gradient is dS = P * (dP - D) (attention_backward.py),
summed over every (batch, head) the mask was broadcast over:
    dMask[b', h', i, j] = sum_{b in B(b'), h in H(h')} P_bhij (dP_bhij - D_bhi)
with B(b') = all batches when the mask's batch dim is 1 (else {b'}), H(h') likewise for heads.
One program per (query block, key block, b', h'): it loops over its (b, h) in a fixed order, summing
with compensation (Kahan: N H terms one after the other in float32 erred up to 3x torch's sum),
recomputing P (from lse2) and dP = (dO V^T + dW') Z / (1 - p_drop) for its tile. No atomics:
two runs give bit-identical results. The sum over broadcast L (masks like (N, 1, 1, S)) is taken
afterwards by the op (fasttf/ops/attention.py) on this kernel's (N', H', L, S) output; a mask broadcast
over S never gets here (its gradient is 0: the op returns zeros).
"""

import torch
import triton
import triton.language as tl

from fasttf.kernels.attention_backward import backward_constants, weights_grad_args
from fasttf.kernels.attention_common import (
    LOG2E, dot, dropout_keep, probs_tile, tile_blocks, tile_coords, tile_grid)


@triton.jit
def _attention_mask_grad_kernel(Q, K, V, Mask, Seed, dOut, dW, Lse, Delta, dMask,
                                stride_qz, stride_qh, stride_qm, stride_qe,
                                stride_kz, stride_kh, stride_kn, stride_ke,
                                stride_vz, stride_vh, stride_vn, stride_ve,
                                stride_mz, stride_mh, stride_mm, stride_mn,
                                stride_doz, stride_doh, stride_dom, stride_doe,
                                stride_wz, stride_wh, stride_wm, stride_wn,
                                N, H, GROUP, L, S, E, EV, MASK_N, MASK_H, qk_scale, dw_scale, dropout_p,
                                dropout_scale,
                                BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, CAUSAL: tl.constexpr,
                                MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_DW: tl.constexpr,
                                INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, start_n, outer = tile_coords(L, S, BLOCK_M, BLOCK_N)
    mask_h = outer % MASK_H
    mask_b = outer // MASK_H
    # the mask's batch (head) dim is 1 or N (H): its program sums N // MASK_N batches (H // MASK_H heads)
    batch_count = N // MASK_N
    head_count = H // MASK_H
    if CAUSAL:  # a tile wholly above the diagonal has dS = 0: visit no (batch, head)
        batch_count = tl.where(start_n > start_m + BLOCK_M - 1, 0, batch_count)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L
    in_tile = row_ok[:, None] & (offs_n[None, :] < S)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    lost = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # what acc's float32 adds dropped (compensated sum)
    for i in range(0, batch_count):
        off_b = mask_b + i  # mask_b = 0 when the mask's batch dim is broadcast
        for j in range(0, head_count):
            off_h = mask_h + j
            off_bh = off_b * H + off_h
            off_hkv = off_h // GROUP
            q = tl.load(Q + off_b.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                        + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                        mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
            do = tl.load(dOut + off_b.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                         + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                         mask=row_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
            vt = tl.load(V + off_b.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
                         + offs_n[None, :] * stride_vn + offs_ev[:, None] * stride_ve,
                         mask=(offs_n[None, :] < S) & (offs_ev[:, None] < EV), other=0.0)
            lse = tl.load(Lse + off_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + off_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
            k_base = K + off_b.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
            mask_base = Mask + off_b.to(tl.int64) * stride_mz + off_h.to(tl.int64) * stride_mh
            p = probs_tile(q, k_base, mask_base, lse, offs_m, offs_n, offs_e, stride_kn, stride_ke, stride_mm,
                           stride_mn, L, S, E, qk_scale, CAUSAL, MASK_KIND, INPUT_PRECISION, EMULATE_BF16)
            dp = dot(do, vt, None, EMULATE_BF16, INPUT_PRECISION)
            if HAS_DW:
                dp += tl.load(dW + off_b.to(tl.int64) * stride_wz + off_h.to(tl.int64) * stride_wh
                              + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                              mask=in_tile, other=0.0).to(tl.float32) * dw_scale
            if DROPOUT:
                dp = tl.where(dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p), dp * dropout_scale, 0.0)
            term = p * (dp - delta[:, None]) - lost
            total = acc + term
            lost = (total - acc) - term
            acc = total
    out_ptrs = dMask + (outer.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=in_tile)


def attention_mask_grad(grad_out, query, key, value, lse, delta, mask, mask_batch, mask_heads, dropout_p,
                        is_causal, scale, seed, grad_weights=None):
    """-> dS summed over the batches (mask_batch == 1) and heads (mask_heads == 1) the mask was
    broadcast over: float32 (mask_batch, mask_heads, L, S). `delta`: D as the backward used it."""
    batch, heads, length_q, head_dim = query.shape
    length_k, value_dim = key.shape[2], value.shape[3]
    dmask = torch.zeros((mask_batch, mask_heads, length_q, length_k), dtype=torch.float32, device=query.device)
    if dmask.numel() == 0 or batch == 0 or heads == 0:
        return dmask
    mask_ptr, mask_strides, seed_ptr, dropout_scale, constants = backward_constants(
        query, key, value, mask, dropout_p, is_causal, seed)
    del constants["EVEN_E"], constants["EVEN_EV"]
    dw_ptr, dw_strides, dw_scale = weights_grad_args(grad_weights, query)
    block_m, block_n, num_warps = tile_blocks(max(head_dim, value_dim), query.dtype)
    _attention_mask_grad_kernel[tile_grid(length_q, length_k, block_m, block_n, mask_batch * mask_heads)](
        query, key, value, mask_ptr, seed_ptr, grad_out, dw_ptr, lse, delta, dmask,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(), *dw_strides,
        batch, heads, heads // key.shape[1], length_q, length_k, head_dim, value_dim, mask_batch, mask_heads,
        scale * LOG2E, dw_scale, dropout_p, dropout_scale,
        HAS_DW=grad_weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **constants)
    return dmask
