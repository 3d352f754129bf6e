"""FlashAttention-2 in Triton: the forward, the backward (D pre-kernel, dK/dV, dQ) and their launchers.

The math, once. For one (batch b, head h) with kv head g = h // (H // Hkv):

    s_ij  = scale * q_i . k_j  (+ mask_ij if the mask is float; -inf where a bool mask is False,
            where j > i under is_causal, and for padding keys j >= S)
    p_ij  = exp(s_ij - lse_i),     lse_i = log sum_j exp(s_ij)      (softmax over the keys)
    z_ij  = keep bit of dropout (Philox: tl.rand(seed, ((b*H + h)*L + i)*S + j) >= p_drop)
    o_i   = sum_j p_ij z_ij / (1 - p_drop) v_j

Everything runs in base 2: s2 = s * log2(e) (scale*log2(e) folded into one multiplier, the float
mask multiplied by log2(e)), exp2 instead of exp, and the stored log-sum-exp is lse2 = lse * log2(e).
A row whose keys are all masked has l_i = 0: its output is 0 and its lse2 is +inf, so every
recomputed p_ij is exp2(-inf) = 0 in the backward and its gradients are 0 (never NaN).

Forward (one program per query block of BLOCK_M rows): stream key blocks of BLOCK_N through an
online softmax
    m_new = max(m, rowmax(s2)),  alpha = exp2(m - m_new),  p = exp2(s2 - m_new)
    l = l * alpha + rowsum(p),   acc = acc * alpha + (p z / (1 - p_drop)) V
and finish with o = acc / l, lse2 = m + log2(l).

Backward, with dO the incoming gradient, P recomputed from lse2, Pd = P Z / (1 - p_drop):
    D_i  = sum_e dO_ie O_ie  (= sum_j Pd_ij dPd_ij)                 pre-kernel
    dV   = Pd^T dO,   dPd = dO V^T,   dP = dPd Z / (1 - p_drop)
    dS   = P * (dP - D),   dQ = scale * dS K,   dK = scale * dS^T Q
dK/dV: one program per key block, looping over the query blocks of every query head of its kv
head (GQA sums in registers). dQ: one program per query block, looping over the key blocks. No
atomics; the L x S matrix only ever exists one BLOCK_M x BLOCK_N tile at a time.

Causal (top-left, key j allowed for query i when j <= i): key blocks past the diagonal are never
visited (loop bounds); only the blocks that straddle the diagonal or the sequence ends pay for the
element masks.
"""

import os

import torch
import triton
import triton.language as tl

# Under the interpreter (TRITON_INTERPRET=1 before triton was imported) every program instance
# runs in numpy: one small fixed config, and small blocks so tiny tests still exercise the loops.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


# On a GPU the autotuner times a short list of tiles known to suit Hopper/Ampere (BLOCK_M, BLOCK_N,
# num_warps, num_stages) and keeps the fastest per key; FASTTF_AUTOTUNE=0 (the test suite) takes
# the first tile that fits instead, so a test compiles one kernel, not the whole list.
_GPU_TILES = {
    "fwd": [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
            (64, 32, 4, 2), (32, 32, 4, 1)],
    "bwd": [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (128, 64, 8, 2),
            (64, 32, 4, 2), (32, 32, 4, 1)],
}
AUTOTUNE = not INTERPRET and os.environ.get("FASTTF_AUTOTUNE", "1") != "0"


def _configs(kind):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
            for block_m, block_n, num_warps, num_stages in _GPU_TILES[kind]]


def _prune(configs, named_args, **kwargs):
    """Big head dims (and float32, twice the bytes) do not fit big tiles in shared memory and
    registers: keep the tiles that can; without autotuning, the first of them."""
    if INTERPRET:
        return configs
    head_dim = max(named_args.get("BLOCK_E", kwargs.get("BLOCK_E", 64)),
                   named_args.get("BLOCK_EV", kwargs.get("BLOCK_EV", 64)))
    width = head_dim * named_args["Q"].element_size() // 2  # in float16 columns
    if width <= 64:
        kept = configs
    elif width <= 128:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
    elif width <= 256:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_M"] <= 64]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_M"] <= 32]
    kept = kept or configs[-1:]
    return kept if AUTOTUNE else kept[:1]


_AUTOTUNE_KEY = ["BLOCK_E", "BLOCK_EV", "CAUSAL", "MASK_KIND", "DROPOUT", "L_ROUNDED", "S_ROUNDED"]


def _padded_dim(dim):
    """Head dims are padded (masked loads) to a power of two >= 16, the smallest tl.dot tile."""
    return max(16, triton.next_power_of_2(dim))


# ----------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b. DOT_FP32: the interpreter's bfloat16 tl.dot is wrong (numpy has no bfloat16), so
    under it bfloat16 tiles are multiplied as the float32 values they hold (the same products)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p):
    """The keep bit of element (row offs_m, col offs_n) of the (batch, head) off_bh."""
    offsets = (off_bh.to(tl.int64) * L + offs_m[:, None].to(tl.int64)) * S + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_keep_transposed(seed, off_bh, offs_m, offs_n, L, S, dropout_p):
    """The same bits as _dropout_keep, laid out (BLOCK_N, BLOCK_M) for the dK/dV kernel."""
    offsets = (off_bh.to(tl.int64) * L + offs_m[None, :].to(tl.int64)) * S + offs_n[:, None].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND: tl.constexpr):
    """The attention-mask tile (BLOCK_M, BLOCK_N): float values (log2 units) or the bool as int1.
    Called with (offs_n, offs_m, stride_mn, stride_mm, S, L) it loads the transposed tile."""
    in_range = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
    if MASK_KIND == 2:
        return tl.load(ptrs, mask=in_range, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        return tl.load(ptrs, mask=in_range, other=0) != 0


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, seed, off_bh,
               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
               offs_m, offs_e, offs_ev, lo, hi, L, S, E, EV, qk_scale, dropout_p, dropout_scale,
               BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               DROPOUT: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
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
        s = _dot(q, kt, None, DOT_FP32, INPUT_PRECISION) * qk_scale
        if MASK_KIND == 2:
            s += _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND)
        if MASK_KIND == 1:
            s = tl.where(_load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND),
                         s, float("-inf"))
        if BOUNDARY:
            allowed = offs_n[None, :] < S
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 at 0
        p = tl.math.exp2(s - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        acc = _dot(p.to(v.dtype), v, acc, DOT_FP32, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})
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
                          INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
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
                               EVEN_E, EVEN_EV, INPUT_PRECISION, DOT_FP32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, seed, off_bh,
                               stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                               offs_m, offs_e, offs_ev, full_end, end, L, S, E, EV, qk_scale, dropout_p,
                               dropout_scale, BLOCK_N, True, CAUSAL, MASK_KIND, DROPOUT,
                               EVEN_E, EVEN_EV, INPUT_PRECISION, DOT_FP32)

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    o_ptrs = Out + off_b.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh \
        + offs_m[:, None] * stride_om + offs_ev[None, :] * stride_oe
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_ev[None, :] < EV))
    tl.store(Lse + off_bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_bwd_rowdot_kernel(Out, dOut, Delta, H, L, EV,
                                 stride_oz, stride_oh, stride_om, stride_oe,
                                 stride_dz, stride_dh, stride_dm, stride_de,
                                 BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    """D_i = sum_e dO_ie O_ie for one block of rows."""
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * H + off_h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    in_range = (offs_m[:, None] < L) & (offs_ev[None, :] < EV)
    o = tl.load(Out + off_b.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_ev[None, :] * stride_oe, mask=in_range, other=0.0)
    do = tl.load(dOut + off_b.to(tl.int64) * stride_dz + off_h.to(tl.int64) * stride_dh
                 + offs_m[:, None] * stride_dm + offs_ev[None, :] * stride_de, mask=in_range, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, seed, off_bh,
                    stride_qm, stride_qe, stride_dom, stride_doe, stride_mm, stride_mn,
                    offs_n, offs_e, offs_ev, lo, hi, L, S, E, EV, qk_scale, dropout_p, dropout_scale,
                    BLOCK_M: tl.constexpr, APPLY_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
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
        st = _dot(k, tl.trans(q), None, DOT_FP32, INPUT_PRECISION) * qk_scale
        if MASK_KIND == 2:
            st += _load_mask_tile(mask_base, offs_n, offs_m, stride_mn, stride_mm, S, L, MASK_KIND)  # transposed
        pt = tl.math.exp2(st - lse[None, :])
        if MASK_KIND == 1:
            pt = tl.where(_load_mask_tile(mask_base, offs_n, offs_m, stride_mn, stride_mm, S, L, MASK_KIND), pt, 0.0)
        if APPLY_CAUSAL:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dpt = _dot(v, tl.trans(do), None, DOT_FP32, INPUT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep_transposed(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
            pdt = tl.where(keep, pt * dropout_scale, 0.0)
            dpt = tl.where(keep, dpt * dropout_scale, 0.0)
        else:
            pdt = pt
        dv = _dot(pdt.to(do.dtype), do, dv, DOT_FP32, INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, dk, DOT_FP32, INPUT_PRECISION)
    return dk, dv


@triton.autotune(configs=_configs("bwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, Mask, Seed, dOut, Lse, Delta, dK, dV,
                               stride_qz, stride_qh, stride_qm, stride_qe,
                               stride_kz, stride_kh, stride_kn, stride_ke,
                               stride_vz, stride_vh, stride_vn, stride_ve,
                               stride_mz, stride_mh, stride_mm, stride_mn,
                               stride_doz, stride_doh, stride_dom, stride_doe,
                               stride_dkz, stride_dkh, stride_dkn, stride_dke,
                               stride_dvz, stride_dvh, stride_dvn, stride_dve,
                               H, GROUP, L, S, E, EV, qk_scale, scale, dropout_p, dropout_scale,
                               L_ROUNDED, S_ROUNDED,
                               BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, EVEN_E: tl.constexpr,
                               EVEN_EV: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                               DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2)
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
        lse_base = Lse + off_bh.to(tl.int64) * L
        delta_base = Delta + off_bh.to(tl.int64) * L
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, seed,
                                     off_bh, stride_qm, stride_qe, stride_dom, stride_doe, stride_mm, stride_mn,
                                     offs_n, offs_e, offs_ev, lo, mid, L, S, E, EV, qk_scale, dropout_p,
                                     dropout_scale, BLOCK_M, True, MASK_KIND, DROPOUT, INPUT_PRECISION, DOT_FP32)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, seed,
                                 off_bh, stride_qm, stride_qe, stride_dom, stride_doe, stride_mm, stride_mn,
                                 offs_n, offs_e, offs_ev, mid, L, L, S, E, EV, qk_scale, dropout_p,
                                 dropout_scale, BLOCK_M, False, MASK_KIND, DROPOUT, INPUT_PRECISION, DOT_FP32)

    dk = dk * scale
    tl.store(dK + off_b.to(tl.int64) * stride_dkz + off_hkv.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             dk.to(dK.dtype.element_ty), mask=key_ok[:, None] & (offs_e[None, :] < E))
    tl.store(dV + off_b.to(tl.int64) * stride_dvz + off_hkv.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
             dv.to(dV.dtype.element_ty), mask=key_ok[:, None] & (offs_ev[None, :] < EV))


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, seed, off_bh,
                  stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                  offs_m, offs_e, offs_ev, lo, hi, L, S, E, EV, qk_scale, dropout_p, dropout_scale,
                  BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                  DROPOUT: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
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
        s = _dot(q, tl.trans(k), None, DOT_FP32, INPUT_PRECISION) * qk_scale
        if MASK_KIND == 2:
            s += _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND)
        p = tl.math.exp2(s - lse[:, None])
        if MASK_KIND == 1:
            p = tl.where(_load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND),
                         p, 0.0)
        if BOUNDARY:
            allowed = offs_n[None, :] < S
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = _dot(do, vt, None, DOT_FP32, INPUT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_FP32, INPUT_PRECISION)
    return dq


@triton.autotune(configs=_configs("bwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, Mask, Seed, dOut, Lse, Delta, dQ,
                             stride_qz, stride_qh, stride_qm, stride_qe,
                             stride_kz, stride_kh, stride_kn, stride_ke,
                             stride_vz, stride_vh, stride_vn, stride_ve,
                             stride_mz, stride_mh, stride_mm, stride_mn,
                             stride_doz, stride_doh, stride_dom, stride_doe,
                             stride_dqz, stride_dqh, stride_dqm, stride_dqe,
                             H, GROUP, L, S, E, EV, qk_scale, scale, dropout_p, dropout_scale,
                             L_ROUNDED, S_ROUNDED,
                             BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, EVEN_E: tl.constexpr, EVEN_EV: tl.constexpr,
                             CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
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
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, seed, off_bh,
                       stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                       offs_m, offs_e, offs_ev, 0, full_end, L, S, E, EV, qk_scale, dropout_p, dropout_scale,
                       BLOCK_N, False, CAUSAL, MASK_KIND, DROPOUT, EVEN_E, EVEN_EV,
                       INPUT_PRECISION, DOT_FP32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, seed, off_bh,
                       stride_kn, stride_ke, stride_vn, stride_ve, stride_mm, stride_mn,
                       offs_m, offs_e, offs_ev, full_end, end, L, S, E, EV, qk_scale, dropout_p, dropout_scale,
                       BLOCK_N, True, CAUSAL, MASK_KIND, DROPOUT, EVEN_E, EVEN_EV,
                       INPUT_PRECISION, DOT_FP32)
    dq = dq * scale
    tl.store(dQ + off_b.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
             dq.to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < E))


@triton.jit
def _dropout_keep_mask_kernel(Seed, Keep, H, L, S, dropout_p,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep bits the attention kernels draw, for tests: Keep (N*H, L, S) uint8."""
    off_bh = tl.program_id(2) * H + tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(Seed)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
        tl.store(Keep + (off_bh.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :], keep.to(tl.uint8),
                 mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are 4-D views (N, H, L, E) with any strides; `mask` is already expanded (a
# stride-0 view, never a copy) to (N, H, L, S) or None; `seed` an int64 tensor of one element.
# Grids are (blocks, heads, batch): each axis stays within CUDA's limits (65535 on axes 1 and 2).


def _input_precision(dtype):
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_in_fp32(dtype):
    return INTERPRET and dtype == torch.bfloat16


def _mask_args(mask, query):
    if mask is None:
        return query, (0, 0, 0, 0), MASK_NONE  # never read: any pointer will do
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), MASK_BOOL
    return mask, mask.stride(), MASK_FLOAT


def _dropout_args(dropout_p, seed, query):
    dropout = dropout_p > 0.0
    dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return (seed if dropout else query), dropout, dropout_scale


def attention_forward(query, key, value, mask, dropout_p, is_causal, scale, seed):
    """-> (out (N, H, L, Ev) contiguous, lse2 (N, H, L) float32: log2-sum-exp2 of the scores)."""
    batch, heads, length_q, head_dim = query.shape
    heads_kv, length_k, value_dim = key.shape[1], key.shape[2], value.shape[3]
    out = torch.empty((batch, heads, length_q, value_dim), dtype=query.dtype, device=query.device)
    lse = torch.empty((batch, heads, length_q), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse
    mask_ptr, mask_strides, mask_kind = _mask_args(mask, query)
    seed_ptr, dropout, dropout_scale = _dropout_args(dropout_p, seed, query)

    def grid(meta):
        return (triton.cdiv(length_q, meta["BLOCK_M"]), heads, batch)

    _attention_fwd_kernel[grid](
        query, key, value, mask_ptr, seed_ptr, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *out.stride(),
        heads, heads // heads_kv, length_q, length_k, head_dim, value_dim,
        scale * LOG2E, dropout_p, dropout_scale,
        triton.next_power_of_2(length_q), triton.next_power_of_2(length_k),
        BLOCK_E=_padded_dim(head_dim), BLOCK_EV=_padded_dim(value_dim), EVEN_E=_padded_dim(head_dim) == head_dim,
        EVEN_EV=_padded_dim(value_dim) == value_dim, CAUSAL=is_causal,
        MASK_KIND=mask_kind, DROPOUT=dropout, INPUT_PRECISION=_input_precision(query.dtype),
        DOT_FP32=_dot_in_fp32(query.dtype))
    return out, lse


def attention_backward(grad_out, query, key, value, out, lse, mask, dropout_p, is_causal, scale, seed):
    """-> (dq, dk, dv), each contiguous and of its input's shape and dtype."""
    batch, heads, length_q, head_dim = query.shape
    heads_kv, length_k, value_dim = key.shape[1], key.shape[2], value.shape[3]
    grad_q = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    grad_k = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    grad_v = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if grad_q.numel() == 0 or grad_k.numel() == 0 or grad_v.numel() == 0 or out.numel() == 0:
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    mask_ptr, mask_strides, mask_kind = _mask_args(mask, query)
    seed_ptr, dropout, dropout_scale = _dropout_args(dropout_p, seed, query)
    block_e, block_ev = _padded_dim(head_dim), _padded_dim(value_dim)
    group = heads // heads_kv
    lengths_rounded = (triton.next_power_of_2(length_q), triton.next_power_of_2(length_k))
    constants = dict(BLOCK_E=block_e, BLOCK_EV=block_ev, EVEN_E=block_e == head_dim, EVEN_EV=block_ev == value_dim,
                     CAUSAL=is_causal, MASK_KIND=mask_kind,
                     DROPOUT=dropout, INPUT_PRECISION=_input_precision(query.dtype),
                     DOT_FP32=_dot_in_fp32(query.dtype))

    delta = torch.empty((batch, heads, length_q), dtype=torch.float32, device=query.device)
    rowdot_block = 16 if INTERPRET else 64
    _attention_bwd_rowdot_kernel[(triton.cdiv(length_q, rowdot_block), heads, batch)](
        out, grad_out, delta, heads, length_q, value_dim, *out.stride(), *grad_out.stride(),
        BLOCK_M=rowdot_block, BLOCK_EV=block_ev)

    _attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(length_k, meta["BLOCK_N"]), heads_kv, batch)](
        query, key, value, mask_ptr, seed_ptr, grad_out, lse, delta, grad_k, grad_v,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(),
        *grad_k.stride(), *grad_v.stride(),
        heads, group, length_q, length_k, head_dim, value_dim, scale * LOG2E, scale,
        dropout_p, dropout_scale, *lengths_rounded, **constants)
    _attention_bwd_dq_kernel[lambda meta: (triton.cdiv(length_q, meta["BLOCK_M"]), heads, batch)](
        query, key, value, mask_ptr, seed_ptr, grad_out, lse, delta, grad_q,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(), *grad_q.stride(),
        heads, group, length_q, length_k, head_dim, value_dim, scale * LOG2E, scale,
        dropout_p, dropout_scale, *lengths_rounded, **constants)
    return grad_q, grad_k, grad_v


def dropout_keep_mask(batch, heads, length_q, length_k, dropout_p, seed, device):
    """The bool keep-mask (N, H, L, S) the attention kernels draw for this seed and dropout_p."""
    keep = torch.empty((batch, heads, length_q, length_k), dtype=torch.uint8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    block = 16 if INTERPRET else 64
    _dropout_keep_mask_kernel[(triton.cdiv(length_q, block), heads, batch)](
        seed, keep, heads, length_q, length_k, dropout_p, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


__all__ = ["INTERPRET", "attention_forward", "attention_backward", "dropout_keep_mask"]
