"""The attention forward kernel (FlashAttention-2) and its launcher.

One program per (query block of BLOCK_M rows, head, batch): stream key blocks of BLOCK_N through
an online softmax, in base 2 (s2 = scale * log2(e) * q.k + log2(e) * mask):
    m_new = max(m, rowmax(s2)),  alpha = exp2(m - m_new),  p = exp2(s2 - m_new)
    l = l * alpha + rowsum(p),   acc = acc * alpha + (p z / (1 - p_drop)) V
and finish with o = acc / l, lse2 = m + log2(l). A row whose keys are all masked has l = 0: its
output is 0 and its lse2 +inf. Causal (top-left): key blocks past the diagonal are never visited;
only the blocks that straddle the diagonal or the end of the keys pay for the element masks.
"""

import torch
import triton
import triton.language as tl

from fasttf.kernels.attention_common import (
    AUTOTUNE_KEY, LOG2E, configs, dot, dropout_args, dropout_keep, emulate_bf16, grid, input_precision, mask_args,
    masked_scores, padded_dim, program_coords, prune_for, to_dtype)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, seed, off_bh,
               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
               offs_m, offs_e, offs_ev, lo, hi, L, S, E, EV, qk_scale, dropout_p, dropout_scale,
               BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               DROPOUT: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_e[:, None] * stride_ke  # K^T tile (E, N)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_ev[None, :] * stride_ve
        if BOUNDARY:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < S) & (offs_e[:, None] < E), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < S) & (offs_ev[None, :] < EV), other=0.0)
        else:
            if EVEN_E:
                kt = tl.load(kt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_e[:, None] < E, other=0.0)
            if EVEN_EV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_ev[None, :] < EV, other=0.0)
        s = dot(q, kt, None, EMULATE_BF16, INPUT_PRECISION) * qk_scale
        s = masked_scores(s, mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND, BOUNDARY, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 at 0
        p = tl.math.exp2(s - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        acc = dot(to_dtype(p, v.dtype, EMULATE_BF16), v, acc, EMULATE_BF16, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=configs("fwd"), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_for("fwd")})
@triton.jit
def _attention_fwd_kernel(Q, K, V, Mask, Seed, Out, Lse,
                          stride_qz, stride_qh, stride_qm, stride_qe,
                          stride_kz, stride_kh, stride_kn, stride_ke,
                          stride_vz, stride_vh, stride_vn, stride_ve,
                          stride_mz, stride_mh, stride_mm, stride_mn,
                          stride_oz, stride_oh, stride_om, stride_oe,
                          H, GROUP, L, S, E, EV, qk_scale, dropout_p, dropout_scale, L_ROUNDED, S_ROUNDED,
                          BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
                          CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_h, off_b = program_coords(L, BLOCK_M, H, CAUSAL)
    off_bh = off_b * H + off_h
    off_hkv = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)

    q_base = Q + off_b.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    mask_base = Mask + off_b.to(tl.int64) * stride_mz + off_h.to(tl.int64) * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
                mask=(offs_m[:, None] < L) & (offs_e[None, :] < E), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)

    # Key blocks [0, full_end) need no element mask; [full_end, end) straddle the diagonal or S.
    if CAUSAL:
        end = tl.minimum(S, start_m + BLOCK_M)
        full_end = tl.minimum((start_m + 1) // BLOCK_N, S // BLOCK_N) * BLOCK_N
    else:
        end = S
        full_end = (S // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, seed, off_bh,
                               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                               offs_m, offs_e, offs_ev, 0, full_end, L, S, E, EV, qk_scale, dropout_p,
                               dropout_scale, BLOCK_N, False, CAUSAL, MASK_KIND, DROPOUT,
                               EVEN_E, EVEN_EV, INPUT_PRECISION, EMULATE_BF16)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, seed, off_bh,
                               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                               offs_m, offs_e, offs_ev, full_end, end, L, S, E, EV, qk_scale, dropout_p,
                               dropout_scale, BLOCK_N, True, CAUSAL, MASK_KIND, DROPOUT,
                               EVEN_E, EVEN_EV, INPUT_PRECISION, EMULATE_BF16)

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    o_ptrs = Out + off_b.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh \
        + offs_m[:, None] * stride_om + offs_ev[None, :] * stride_oe
    tl.store(o_ptrs, to_dtype(out, Out.dtype.element_ty, EMULATE_BF16),
             mask=(offs_m[:, None] < L) & (offs_ev[None, :] < EV))
    tl.store(Lse + off_bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


def attention_forward(query, key, value, mask, dropout_p, is_causal, scale, seed):
    """-> (out (N, H, L, Ev), laid out (N, L, H, Ev) in memory as torch's flash kernels lay it out (merging
    the heads afterwards is a view), lse2 (N, H, L) float32: log2-sum-exp2 of the scores)."""
    batch, heads, length_q, head_dim = query.shape
    heads_kv, length_k, value_dim = key.shape[1], key.shape[2], value.shape[3]
    out = torch.empty((batch, length_q, heads, value_dim), dtype=query.dtype, device=query.device).transpose(1, 2)
    lse = torch.empty((batch, heads, length_q), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse
    mask_ptr, mask_strides, mask_kind = mask_args(mask, query)
    seed_ptr, dropout, dropout_scale = dropout_args(dropout_p, seed, query)
    _attention_fwd_kernel[lambda meta: grid(length_q, meta["BLOCK_M"], heads, batch)](
        query, key, value, mask_ptr, seed_ptr, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *out.stride(),
        heads, heads // heads_kv, length_q, length_k, head_dim, value_dim,
        scale * LOG2E, dropout_p, dropout_scale,
        triton.next_power_of_2(length_q), triton.next_power_of_2(length_k),
        BLOCK_E=padded_dim(head_dim), BLOCK_EV=padded_dim(value_dim), EVEN_E=padded_dim(head_dim) == head_dim,
        EVEN_EV=padded_dim(value_dim) == value_dim, CAUSAL=is_causal,
        MASK_KIND=mask_kind, DROPOUT=dropout, INPUT_PRECISION=input_precision(query.dtype),
        EMULATE_BF16=emulate_bf16(query.dtype))
    return out, lse
