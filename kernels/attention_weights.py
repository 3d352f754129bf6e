"""The attention weights from the saved lse2, and the term their gradient adds to D.

Weights, as torch's multi_head_attention_forward returns them (after dropout):
    W_ij = P_ij z_ij / (1 - p_drop),   P_ij = exp2(s2_ij - lse2_i)       (N, H, L, S), or
    W_ij = (1 / H) sum_h W_hij                                          (N, L, S) averaged
One program per (query block, key block, batch [, head]); when averaging it loops over the H heads
and sums in registers: no (N, H, L, S) intermediate. Same keep bits as the forward (same seed and
element index), fully masked rows give 0.

When W's gradient dW flows back, dPd = dO V^T + dW' (dW' = dW, or dW / H broadcast over the heads
when averaged) and D_i = sum_j Pd_ij dPd_ij gains the term
    sum_j W_hij dW'_ij                                                  (this file's delta kernel)
added to rowdot(dO, O); the backward kernels add dW' into dPd tile by tile. Nothing L x S is saved.
"""

import torch
import triton
import triton.language as tl

from fasttf.kernels.attention_backward import backward_constants, weights_grad_args
from fasttf.kernels.attention_common import (
    LOG2E, dropout_keep, grid, probs_tile, program_coords, tile_blocks, tile_coords, tile_grid, to_dtype)


@triton.jit
def _attention_weights_kernel(Q, K, Mask, Seed, Lse, W,
                              stride_qz, stride_qh, stride_qm, stride_qe,
                              stride_kz, stride_kh, stride_kn, stride_ke,
                              stride_mz, stride_mh, stride_mm, stride_mn,
                              stride_wz, stride_wh, stride_wm, stride_wn,
                              H, GROUP, L, S, E, qk_scale, dropout_p, dropout_scale,
                              BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                              DROPOUT: tl.constexpr, AVERAGE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, start_n, outer = tile_coords(L, S, BLOCK_M, BLOCK_N)
    if AVERAGE:
        off_b = outer
        head_lo = outer * 0  # a tensor like outer % H, not a Python int
        head_count = H
    else:
        off_b = outer // H
        head_lo = outer % H
        head_count = 1
    if CAUSAL:  # a tile wholly above the diagonal is zeros: visit no head
        head_count = tl.where(start_n > start_m + BLOCK_M - 1, 0, head_count)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < L
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, head_count):
        off_h = head_lo + i
        off_bh = off_b * H + off_h
        q = tl.load(Q + off_b.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                    + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        lse = tl.load(Lse + off_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
        k_base = K + off_b.to(tl.int64) * stride_kz + (off_h // GROUP).to(tl.int64) * stride_kh
        mask_base = Mask + off_b.to(tl.int64) * stride_mz + off_h.to(tl.int64) * stride_mh
        p = probs_tile(q, k_base, mask_base, lse, offs_m, offs_n, offs_e, stride_kn, stride_ke, stride_mm,
                       stride_mn, L, S, E, qk_scale, CAUSAL, MASK_KIND, INPUT_PRECISION, EMULATE_BF16)
        if DROPOUT:
            p = tl.where(dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p), p * dropout_scale, 0.0)
        acc += p
    if AVERAGE:
        acc = acc / H
    w_base = W + off_b.to(tl.int64) * stride_wz
    if not AVERAGE:
        w_base += head_lo.to(tl.int64) * stride_wh
    w_ptrs = w_base + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    tl.store(w_ptrs, to_dtype(acc, W.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & (offs_n[None, :] < S))


@triton.jit
def _attention_weights_delta_kernel(Q, K, Mask, Seed, Lse, dW, Delta,
                                    stride_qz, stride_qh, stride_qm, stride_qe,
                                    stride_kz, stride_kh, stride_kn, stride_ke,
                                    stride_mz, stride_mh, stride_mm, stride_mn,
                                    stride_wz, stride_wh, stride_wm, stride_wn,
                                    H, GROUP, L, S, E, qk_scale, dw_scale, dropout_p, dropout_scale,
                                    BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                                    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                    EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Delta_i += sum_j W_ij dW'_ij for one block of rows of one (batch, head), over all keys."""
    start_m, off_h, off_b = program_coords(L, BLOCK_M, H, False)
    off_bh = off_b * H + off_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < L
    q = tl.load(Q + off_b.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    lse = tl.load(Lse + off_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
    k_base = K + off_b.to(tl.int64) * stride_kz + (off_h // GROUP).to(tl.int64) * stride_kh
    mask_base = Mask + off_b.to(tl.int64) * stride_mz + off_h.to(tl.int64) * stride_mh
    dw_base = dW + off_b.to(tl.int64) * stride_wz + off_h.to(tl.int64) * stride_wh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    extra = tl.zeros([BLOCK_M], tl.float32)
    end = S
    if CAUSAL:  # key blocks past the diagonal hold no weight
        end = tl.minimum(S, start_m + BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        p = probs_tile(q, k_base, mask_base, lse, offs_m, offs_n, offs_e, stride_kn, stride_ke, stride_mm,
                       stride_mn, L, S, E, qk_scale, CAUSAL, MASK_KIND, INPUT_PRECISION, EMULATE_BF16)
        if DROPOUT:
            p = tl.where(dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p), p * dropout_scale, 0.0)
        dw = tl.load(dw_base + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                     mask=row_ok[:, None] & (offs_n[None, :] < S), other=0.0).to(tl.float32)
        extra += tl.sum(p * dw, 1)
    delta_ptrs = Delta + off_bh.to(tl.int64) * L + offs_m
    tl.store(delta_ptrs, tl.load(delta_ptrs, mask=row_ok, other=0.0) + extra * dw_scale, mask=row_ok)


def _shared_args(query, key, value, mask, dropout_p, is_causal, seed):
    mask_ptr, mask_strides, seed_ptr, dropout_scale, constants = backward_constants(
        query, key, value, mask, dropout_p, is_causal, seed)
    kept = {name: constants[name] for name in ("BLOCK_E", "CAUSAL", "MASK_KIND", "DROPOUT", "INPUT_PRECISION",
                                               "EMULATE_BF16")}
    return mask_ptr, mask_strides, seed_ptr, dropout_scale, kept


def attention_weights(query, key, lse, mask, dropout_p, is_causal, scale, seed, average_heads):
    """-> the weights after dropout in query's dtype: (N, L, S) averaged over heads, else (N, H, L, S)."""
    batch, heads, length_q, head_dim = query.shape
    heads_kv, length_k = key.shape[1], key.shape[2]
    shape = (batch, length_q, length_k) if average_heads else (batch, heads, length_q, length_k)
    weights = torch.empty(shape, dtype=query.dtype, device=query.device)
    if weights.numel() == 0:
        return weights
    if heads == 0 or head_dim == 0:
        return weights.zero_()
    mask_ptr, mask_strides, seed_ptr, dropout_scale, constants = _shared_args(query, key, key, mask, dropout_p,
                                                                              is_causal, seed)
    w_strides = (weights.stride(0), 0, *weights.stride()[1:]) if average_heads else weights.stride()
    block_m, block_n, num_warps = tile_blocks(head_dim, query.dtype)
    outer = batch if average_heads else batch * heads
    _attention_weights_kernel[tile_grid(length_q, length_k, block_m, block_n, outer)](
        query, key, mask_ptr, seed_ptr, lse, weights,
        *query.stride(), *key.stride(), *mask_strides, *w_strides,
        heads, heads // heads_kv, length_q, length_k, head_dim, scale * LOG2E, dropout_p, dropout_scale,
        AVERAGE=average_heads, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **constants)
    return weights


def add_weights_delta(delta, grad_weights, query, key, value, lse, mask, dropout_p, is_causal, scale, seed):
    """delta += sum_j W_ij dW'_ij, in place (see the module docstring)."""
    batch, heads, length_q, head_dim = query.shape
    mask_ptr, mask_strides, seed_ptr, dropout_scale, constants = _shared_args(query, key, value, mask, dropout_p,
                                                                              is_causal, seed)
    dw_ptr, dw_strides, dw_scale = weights_grad_args(grad_weights, query)
    block_m, block_n, num_warps = tile_blocks(head_dim, query.dtype)
    _attention_weights_delta_kernel[grid(length_q, block_m, heads, batch)](
        query, key, mask_ptr, seed_ptr, lse, dw_ptr, delta,
        *query.stride(), *key.stride(), *mask_strides, *dw_strides,
        heads, heads // key.shape[1], length_q, key.shape[2], head_dim, scale * LOG2E, dw_scale, dropout_p,
        dropout_scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **constants)
    return delta
