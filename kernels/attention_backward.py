"""The attention backward kernels (FlashAttention-2): D, dK/dV, dQ, and their launcher.

With dO the incoming gradient of the output, P recomputed from the saved lse2 (p = exp2(s2 -
lse2)), Z the dropout keep bits and Pd = P Z / (1 - p_drop) (the weights after dropout):
    dPd  = dO V^T + dW           (dW: the incoming gradient of the returned weights, if any;
                                  divided by H when they were averaged over the heads)
    D_i  = sum_j Pd_ij dPd_ij    = sum_e dO_ie O_ie  (+ sum_j Pd_ij dW_ij: attention_weights.py)
    dV   = Pd^T dO,   dP = dPd Z / (1 - p_drop),   dS = P * (dP - D)
    dQ   = scale * dS K,   dK = scale * dS^T Q,     dMask = dS summed over the mask's broadcast
                                                    dims (attention_mask_grad.py)
dK/dV: one program per key block, looping over the query blocks of every query head of its kv head
(GQA sums in registers). dQ: one program per query block, looping over the key blocks. No atomics,
so two runs give bit-identical gradients; the L x S matrix only exists one tile at a time.
Masked scores (bool mask, causal, keys or queries past the ends) are set to -inf before exp2, so
no inf or NaN is ever formed, not even in padded tiles.
"""

import torch
import triton
import triton.language as tl

from fasttf.kernels.attention_common import (
    AUTOTUNE_KEY, INTERPRET, INTERPRET_BLOCK, LOG2E, configs, dot, dropout_args, dropout_keep,
    dropout_keep_transposed, emulate_bf16, grid, input_precision, load_mask_tile, mask_args, masked_scores,
    padded_dim, program_coords, prune_for, to_dtype)


@triton.jit
def _attention_bwd_rowdot_kernel(Out, dOut, Delta, H, L, EV,
                                 stride_oz, stride_oh, stride_om, stride_oe,
                                 stride_dz, stride_dh, stride_dm, stride_de,
                                 BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    """D_i = sum_e dO_ie O_ie for one block of rows."""
    start_m, off_h, off_b = program_coords(L, BLOCK_M, H, False)
    off_bh = off_b * H + off_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    in_range = (offs_m[:, None] < L) & (offs_ev[None, :] < EV)
    o = tl.load(Out + off_b.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_ev[None, :] * stride_oe, mask=in_range, other=0.0)
    do = tl.load(dOut + off_b.to(tl.int64) * stride_dz + off_h.to(tl.int64) * stride_dh
                 + offs_m[:, None] * stride_dm + offs_ev[None, :] * stride_de, mask=in_range, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, key_ok, q_base, do_base, mask_base, dw_base, lse_base, delta_base, seed, off_bh,
                    stride_qm, stride_qe, stride_dom, stride_doe, stride_mm, stride_mn, stride_wm, stride_wn,
                    offs_n, offs_e, offs_ev, lo, hi, L, S, E, EV, qk_scale, dw_scale, dropout_p, dropout_scale,
                    BLOCK_M: tl.constexpr, APPLY_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                    DROPOUT: tl.constexpr, HAS_DW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    EMULATE_BF16: tl.constexpr):
    # Works on transposed tiles (keys along rows): sT (BLOCK_N, BLOCK_M).
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                     mask=row_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # padding rows: p = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        st = dot(k, tl.trans(q), None, EMULATE_BF16, INPUT_PRECISION) * qk_scale
        if MASK_KIND == 2:
            st += load_mask_tile(mask_base, offs_n, offs_m, stride_mn, stride_mm, S, L, MASK_KIND)  # transposed
        allowed = key_ok[:, None]  # padded keys (a query block outnumbering the keys left): -inf, p = 0
        if MASK_KIND == 1:
            allowed = allowed & load_mask_tile(mask_base, offs_n, offs_m, stride_mn, stride_mm, S, L, MASK_KIND)
        if APPLY_CAUSAL:
            allowed = allowed & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.math.exp2(tl.where(allowed, st, float("-inf")) - lse[None, :])
        dpt = dot(v, tl.trans(do), None, EMULATE_BF16, INPUT_PRECISION)
        if HAS_DW:
            dpt += tl.load(dw_base + offs_n[:, None] * stride_wn + offs_m[None, :] * stride_wm,
                           mask=key_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32) * dw_scale
        if DROPOUT:
            keep = dropout_keep_transposed(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
            pdt = tl.where(keep, pt * dropout_scale, 0.0)
            dpt = tl.where(keep, dpt * dropout_scale, 0.0)
        else:
            pdt = pt
        dv = dot(to_dtype(pdt, do.dtype, EMULATE_BF16), do, dv, EMULATE_BF16, INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = dot(to_dtype(dst, q.dtype, EMULATE_BF16), q, dk, EMULATE_BF16, INPUT_PRECISION)
    return dk, dv


@triton.autotune(configs=configs("bwd"), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_for("bwd")})
@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, Mask, Seed, dOut, dW, Lse, Delta, dK, dV,
                               stride_qz, stride_qh, stride_qm, stride_qe,
                               stride_kz, stride_kh, stride_kn, stride_ke,
                               stride_vz, stride_vh, stride_vn, stride_ve,
                               stride_mz, stride_mh, stride_mm, stride_mn,
                               stride_doz, stride_doh, stride_dom, stride_doe,
                               stride_wz, stride_wh, stride_wm, stride_wn,
                               stride_dkz, stride_dkh, stride_dkn, stride_dke,
                               stride_dvz, stride_dvh, stride_dvn, stride_dve,
                               H, HKV, GROUP, L, S, E, EV, qk_scale, scale, dw_scale, dropout_p, dropout_scale,
                               L_ROUNDED, S_ROUNDED,
                               BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, EVEN_E: tl.constexpr,
                               EVEN_EV: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                               DROPOUT: tl.constexpr, HAS_DW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                               EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, off_hkv, off_b = program_coords(S, BLOCK_N, HKV, False)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    key_ok = offs_n < S

    k = tl.load(K + off_b.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=key_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
                mask=key_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    # Causal: query blocks before this key block see none of it; [lo, mid) straddle the diagonal.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M, L)
    else:
        lo = 0
        mid = 0
    for g in range(0, GROUP):  # every query head that reads this kv head (GQA): sum in registers
        off_h = off_hkv * GROUP + g
        off_bh = off_b * H + off_h
        q_base = Q + off_b.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        do_base = dOut + off_b.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        mask_base = Mask + off_b.to(tl.int64) * stride_mz + off_h.to(tl.int64) * stride_mh
        dw_base = dW + off_b.to(tl.int64) * stride_wz + off_h.to(tl.int64) * stride_wh
        lse_base = Lse + off_bh.to(tl.int64) * L
        delta_base = Delta + off_bh.to(tl.int64) * L
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, key_ok, q_base, do_base, mask_base, dw_base, lse_base,
                                     delta_base, seed, off_bh, stride_qm, stride_qe, stride_dom, stride_doe,
                                     stride_mm, stride_mn, stride_wm, stride_wn, offs_n, offs_e, offs_ev, lo, mid,
                                     L, S, E, EV, qk_scale, dw_scale, dropout_p, dropout_scale, BLOCK_M, True,
                                     MASK_KIND, DROPOUT, HAS_DW, INPUT_PRECISION, EMULATE_BF16)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, key_ok, q_base, do_base, mask_base, dw_base, lse_base,
                                 delta_base, seed, off_bh, stride_qm, stride_qe, stride_dom, stride_doe,
                                 stride_mm, stride_mn, stride_wm, stride_wn, offs_n, offs_e, offs_ev, mid, L,
                                 L, S, E, EV, qk_scale, dw_scale, dropout_p, dropout_scale, BLOCK_M, False,
                                 MASK_KIND, DROPOUT, HAS_DW, INPUT_PRECISION, EMULATE_BF16)

    dk = dk * scale
    tl.store(dK + off_b.to(tl.int64) * stride_dkz + off_hkv.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             to_dtype(dk, dK.dtype.element_ty, EMULATE_BF16), mask=key_ok[:, None] & (offs_e[None, :] < E))
    tl.store(dV + off_b.to(tl.int64) * stride_dvz + off_hkv.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
             to_dtype(dv, dV.dtype.element_ty, EMULATE_BF16), mask=key_ok[:, None] & (offs_ev[None, :] < EV))


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, dw_base, seed, off_bh,
                  stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn, stride_wm, stride_wn,
                  offs_m, offs_e, offs_ev, lo, hi, L, S, E, EV, qk_scale, dw_scale, dropout_p, dropout_scale,
                  BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                  DROPOUT: tl.constexpr, HAS_DW: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_e[None, :] * stride_ke
        vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_ev[:, None] * stride_ve  # V^T tile (Ev, N)
        if BOUNDARY:
            k = tl.load(k_ptrs, mask=(offs_n[:, None] < S) & (offs_e[None, :] < E), other=0.0)
            vt = tl.load(vt_ptrs, mask=(offs_n[None, :] < S) & (offs_ev[:, None] < EV), other=0.0)
        else:
            if EVEN_E:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_e[None, :] < E, other=0.0)
            if EVEN_EV:
                vt = tl.load(vt_ptrs)
            else:
                vt = tl.load(vt_ptrs, mask=offs_ev[:, None] < EV, other=0.0)
        s = dot(q, tl.trans(k), None, EMULATE_BF16, INPUT_PRECISION) * qk_scale
        s = masked_scores(s, mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND, BOUNDARY, CAUSAL)
        p = tl.math.exp2(s - lse[:, None])
        dp = dot(do, vt, None, EMULATE_BF16, INPUT_PRECISION)
        if HAS_DW:
            dp += tl.load(dw_base + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                          mask=(offs_m[:, None] < L) & (offs_n[None, :] < S), other=0.0).to(tl.float32) * dw_scale
        if DROPOUT:
            keep = dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(to_dtype(ds, k.dtype, EMULATE_BF16), k, dq, EMULATE_BF16, INPUT_PRECISION)
    return dq


@triton.autotune(configs=configs("bwd"), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_for("bwd")})
@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, Mask, Seed, dOut, dW, Lse, Delta, dQ,
                             stride_qz, stride_qh, stride_qm, stride_qe,
                             stride_kz, stride_kh, stride_kn, stride_ke,
                             stride_vz, stride_vh, stride_vn, stride_ve,
                             stride_mz, stride_mh, stride_mm, stride_mn,
                             stride_doz, stride_doh, stride_dom, stride_doe,
                             stride_wz, stride_wh, stride_wm, stride_wn,
                             stride_dqz, stride_dqh, stride_dqm, stride_dqe,
                             H, GROUP, L, S, E, EV, qk_scale, scale, dw_scale, dropout_p, dropout_scale,
                             L_ROUNDED, S_ROUNDED,
                             BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
                             CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                             HAS_DW: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_h, off_b = program_coords(L, BLOCK_M, H, CAUSAL)
    off_bh = off_b * H + off_h
    off_hkv = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L

    q = tl.load(Q + off_b.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    do = tl.load(dOut + off_b.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
                 mask=row_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
    lse = tl.load(Lse + off_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + off_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    mask_base = Mask + off_b.to(tl.int64) * stride_mz + off_h.to(tl.int64) * stride_mh
    dw_base = dW + off_b.to(tl.int64) * stride_wz + off_h.to(tl.int64) * stride_wh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)

    if CAUSAL:
        end = tl.minimum(S, start_m + BLOCK_M)
        full_end = tl.minimum((start_m + 1) // BLOCK_N, S // BLOCK_N) * BLOCK_N
    else:
        end = S
        full_end = (S // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, dw_base, seed, off_bh,
                       stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn, stride_wm, stride_wn,
                       offs_m, offs_e, offs_ev, 0, full_end, L, S, E, EV, qk_scale, dw_scale, dropout_p,
                       dropout_scale, BLOCK_N, False, CAUSAL, MASK_KIND, DROPOUT, HAS_DW, EVEN_E, EVEN_EV,
                       INPUT_PRECISION, EMULATE_BF16)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, dw_base, seed, off_bh,
                       stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn, stride_wm, stride_wn,
                       offs_m, offs_e, offs_ev, full_end, end, L, S, E, EV, qk_scale, dw_scale, dropout_p,
                       dropout_scale, BLOCK_N, True, CAUSAL, MASK_KIND, DROPOUT, HAS_DW, EVEN_E, EVEN_EV,
                       INPUT_PRECISION, EMULATE_BF16)
    dq = dq * scale
    tl.store(dQ + off_b.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             to_dtype(dq, dQ.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & (offs_e[None, :] < E))


def backward_constants(query, key, value, mask, dropout_p, is_causal, seed):
    """The launch arguments every backward kernel shares (also the weights and mask-gradient ones)."""
    head_dim, value_dim = query.shape[3], value.shape[3]
    mask_ptr, mask_strides, mask_kind = mask_args(mask, query)
    seed_ptr, dropout, dropout_scale = dropout_args(dropout_p, seed, query)
    block_e, block_ev = padded_dim(head_dim), padded_dim(value_dim)
    constants = dict(BLOCK_E=block_e, BLOCK_EV=block_ev, EVEN_E=block_e == head_dim, EVEN_EV=block_ev == value_dim,
                     CAUSAL=is_causal, MASK_KIND=mask_kind, DROPOUT=dropout,
                     INPUT_PRECISION=input_precision(query.dtype), EMULATE_BF16=emulate_bf16(query.dtype))
    return mask_ptr, mask_strides, seed_ptr, dropout_scale, constants


def weights_grad_args(grad_weights, query):
    """(pointer, strides (z, h, m, n), scale) of the incoming weights gradient: (N, H, L, S), or
    (N, L, S) when the weights were averaged over the H heads (head stride 0, scale 1 / H)."""
    if grad_weights is None:
        return query, (0, 0, 0, 0), 0.0
    if grad_weights.dim() == 3:
        stride_z, stride_m, stride_n = grad_weights.stride()
        return grad_weights, (stride_z, 0, stride_m, stride_n), 1.0 / query.size(1)
    return grad_weights, grad_weights.stride(), 1.0


def attention_delta(grad_out, out, heads):
    """D (N, H, L) float32: the row dot products of dO and O."""
    batch, _, length_q, value_dim = out.shape
    delta = torch.empty((batch, heads, length_q), dtype=torch.float32, device=out.device)
    block = INTERPRET_BLOCK if INTERPRET else 64
    _attention_bwd_rowdot_kernel[grid(length_q, block, heads, batch)](
        out, grad_out, delta, heads, length_q, value_dim, *out.stride(), *grad_out.stride(),
        BLOCK_M=block, BLOCK_EV=padded_dim(value_dim))
    return delta


def attention_backward(grad_out, query, key, value, out, lse, mask, dropout_p, is_causal, scale, seed,
                       grad_weights=None, delta=None):
    """-> (dq, dk, dv), each contiguous and of its input's shape and dtype. `delta`: D when the
    caller computed it already (with the weights' term)."""
    batch, heads, length_q, head_dim = query.shape
    heads_kv, length_k, value_dim = key.shape[1], key.shape[2], value.shape[3]
    grad_q = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    grad_k = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    grad_v = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if grad_q.numel() == 0 or grad_k.numel() == 0 or grad_v.numel() == 0 or out.numel() == 0:
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    mask_ptr, mask_strides, seed_ptr, dropout_scale, constants = backward_constants(
        query, key, value, mask, dropout_p, is_causal, seed)
    dw_ptr, dw_strides, dw_scale = weights_grad_args(grad_weights, query)
    group = heads // heads_kv
    lengths_rounded = (triton.next_power_of_2(length_q), triton.next_power_of_2(length_k))
    if delta is None:
        delta = attention_delta(grad_out, out, heads)

    _attention_bwd_dkdv_kernel[lambda meta: grid(length_k, meta["BLOCK_N"], heads_kv, batch)](
        query, key, value, mask_ptr, seed_ptr, grad_out, dw_ptr, lse, delta, grad_k, grad_v,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(), *dw_strides,
        *grad_k.stride(), *grad_v.stride(),
        heads, heads_kv, group, length_q, length_k, head_dim, value_dim, scale * LOG2E, scale, dw_scale,
        dropout_p, dropout_scale, *lengths_rounded, HAS_DW=grad_weights is not None, **constants)
    _attention_bwd_dq_kernel[lambda meta: grid(length_q, meta["BLOCK_M"], heads, batch)](
        query, key, value, mask_ptr, seed_ptr, grad_out, dw_ptr, lse, delta, grad_q,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(), *dw_strides,
        *grad_q.stride(),
        heads, group, length_q, length_k, head_dim, value_dim, scale * LOG2E, scale, dw_scale,
        dropout_p, dropout_scale, *lengths_rounded, HAS_DW=grad_weights is not None, **constants)
    return grad_q, grad_k, grad_v
