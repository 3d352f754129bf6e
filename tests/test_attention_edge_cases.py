"""Attention edge cases other projects' suites catch (issue 19), and a few ported semantics.

- bfloat16 rounds to nearest like a GPU, also under the Triton interpreter (whose float32 ->
  bfloat16 conversion truncates): exact values where the answer is exact, and errors no bigger
  than twice torch's own bfloat16 error, without an absolute floor to hide a bias.
- Any batch launches: the grids stay within CUDA's limits for N = 65536 and 70000 (PyTorch's
  test_transformers has a test for exactly that batch), checked on the grids the launchers ask for.
- Padded tiles (a block of queries outnumbering the keys left) form no inf or NaN: numpy's
  warnings are errors here.
- Ported: huge bfloat16 scores (torch's large-bf16 NaN test), a head dim of 1 with a stride
  other than 1 (torch's singleton head dim test), a mask with arbitrary strides, float16 scores
  large enough to overflow a careless backward (flash-attention's bwd overflow test).
- A float mask of finfo.min (transformers' way of masking) attends like torch: uniformly where a
  whole row carries it, on both kernels; a NaN in it makes its row NaN, as in torch.
- Forward-mode AD (dual inputs): no kernel has a jvp, so every path raises rather than return an
  output whose tangent went missing (torch.func.jvp users get an error, not a zero derivative).
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fasttf
from fasttf import reference
from fasttf.kernels import attention_backward as backward_kernels
from fasttf.kernels import attention_common as common
from fasttf.kernels import attention_forward as forward_kernels
from fasttf.ops.attention import attention_with_weights
from fasttf.testing import assert_close_to_reference

from conftest import kernel_device

pytestmark = pytest.mark.skipif(not (common.INTERPRET or torch.cuda.is_available()),
                                reason="needs a GPU or TRITON_INTERPRET=1 (make test sets it)")


def run_three_ways(query, key, value, dtype, grad_out=None, **kwargs):
    """(fasttf's, torch's SDPA's, float64 reference's) [out, dq, dk, dv], from float tensors."""
    device = kernel_device()
    results = []
    for name, dt in (("fasttf", dtype), ("torch", dtype), ("reference", torch.float64)):
        inputs = [t.detach().to(device=device, dtype=dt).clone().requires_grad_() for t in (query, key, value)]
        if name == "fasttf":
            out = fasttf.scaled_dot_product_attention(*inputs, **kwargs)
        elif name == "torch":
            out = F.scaled_dot_product_attention(*inputs, **kwargs)
        else:
            out = reference.scaled_dot_product_attention(*inputs, kwargs.get("attn_mask"), 0.0,
                                                         kwargs.get("is_causal", False))
        out.backward((torch.ones_like(out) if grad_out is None else grad_out).to(device=device, dtype=dt))
        results.append([out.detach(), *(t.grad for t in inputs)])
    return results


# ----------------------------------------------------------------------------------------------
# bfloat16 rounding


def test_bfloat16_uniform_attention_is_exact(attention_backend):
    """Issue 19's repro: 80 equal scores, values 1. Round to nearest gives exactly 1 (the
    interpreter's truncation gave 0.9961 in dV)."""
    q = torch.zeros(1, 1, 80, 16, dtype=torch.bfloat16, device=kernel_device(), requires_grad=True)
    k = torch.zeros_like(q, requires_grad=True)
    v = torch.ones_like(q, requires_grad=True)
    out = fasttf.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    assert torch.equal(out, torch.ones_like(out))
    assert torch.equal(v.grad, torch.ones_like(v.grad))
    assert torch.equal(q.grad, torch.zeros_like(q.grad)) and torch.equal(k.grad, torch.zeros_like(k.grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_sums_are_rounded_to_nearest_once(dtype, attention_backend):
    """Four equal keys (P = 1/4, exact) and values that are multiples of 1/8: every float32 sum
    in the kernel is exact, so each stored result must be the one round-to-nearest of the exact
    answer (truncation gets about half of them one step low)."""
    device = kernel_device()
    generator = torch.Generator().manual_seed(6)
    q = torch.zeros(1, 1, 80, 16, dtype=dtype, device=device, requires_grad=True)
    k = torch.zeros(1, 1, 4, 16, dtype=dtype, device=device, requires_grad=True)
    v_exact = torch.randint(-2000, 2000, (1, 1, 4, 16), generator=generator).double() / 8
    grad_exact = torch.randint(-2000, 2000, (1, 1, 80, 16), generator=generator).double() / 8
    v = v_exact.to(device=device, dtype=dtype).requires_grad_()
    out = fasttf.scaled_dot_product_attention(q, k, v)
    out.backward(grad_exact.to(device=device, dtype=dtype))
    v_held = v.detach().double().cpu()  # the values as the dtype holds them
    grad_held = grad_exact.to(dtype).double()
    assert torch.equal(out.cpu(), v_held.mean(dim=2, keepdim=True).expand(1, 1, 80, 16).to(dtype))
    assert torch.equal(v.grad.cpu(), (grad_held.sum(dim=2, keepdim=True) / 4).expand(1, 1, 4, 16).to(dtype))


BF16_CASES = [  # (L, S, E, is_causal): issue 19's cases and a few across blocks
    (339, 1, 16, False),   # one key: dV is a plain sum of dO, off by up to 4 steps when truncated
    (255, 3, 16, True),    # causal, three keys: dQ's error was 3x torch's
    (40, 37, 24, True),
    (17, 50, 8, False),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "x".join(map(str, c)))
def test_bfloat16_error_within_twice_torchs_without_floor(case):
    length_q, length_k, head_dim, is_causal = case
    generator = torch.Generator().manual_seed(sum(case))
    query, key, value = (torch.randn(1, 2, n, head_dim, generator=generator) for n in (length_q, length_k, length_k))
    grad_out = torch.randn(1, 2, length_q, head_dim, generator=generator)
    mine, theirs, truth = run_three_ways(query, key, value, torch.bfloat16, grad_out, is_causal=is_causal)
    for name, a, b, c in zip(("output", "grad query", "grad key", "grad value"), mine, theirs, truth):
        assert_close_to_reference(a, c, b, name, floor=1e-6)  # 1e-6: only for an exact torch result


# ----------------------------------------------------------------------------------------------
# Batches of 65536 and more: every launch grid within CUDA's limits


class _GridRecorder:
    """Stands in for a kernel: records the grid the launcher asks for, for every tile the kernel
    could be tuned to, and launches nothing."""

    TILES = [{"BLOCK_M": block_m, "BLOCK_N": block_n} for tiles in common.GPU_TILES.values()
             for block_m, block_n, *_ in tiles] + [{"BLOCK_M": common.INTERPRET_BLOCK, "BLOCK_N": common.INTERPRET_BLOCK}]

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for meta in self.TILES:
                self.grids.append(grid({**kwargs, **meta}) if callable(grid) else grid)
        return launch


@pytest.mark.parametrize("batch", [65536, 70000])
def test_launch_grids_stay_within_cuda_limits_for_any_batch(batch, monkeypatch):
    grids = []
    for module, name in ((forward_kernels, "_attention_fwd_kernel"), (backward_kernels, "_attention_bwd_dkdv_kernel"),
                         (backward_kernels, "_attention_bwd_dq_kernel"),
                         (backward_kernels, "_attention_bwd_rowdot_kernel"),
                         (common, "_dropout_keep_mask_kernel")):
        monkeypatch.setattr(module, name, _GridRecorder(grids))
    query = torch.zeros(batch, 2, 33, 8)
    out, lse = forward_kernels.attention_forward(query, query, query, None, 0.1, False, 1.0,
                                                 torch.zeros(1, dtype=torch.int64))
    backward_kernels.attention_backward(out, query, query, query, out, lse, None, 0.1, True, 1.0,
                                        torch.zeros(1, dtype=torch.int64))
    common.dropout_keep_mask(batch, 2, 33, 33, 0.1, torch.zeros(1, dtype=torch.int64), "cpu")
    assert len(grids) >= 5
    for grid in grids:
        assert all(0 < size <= limit for size, limit in zip(grid, common.MAX_GRID)), grid
        assert math.prod(grid) >= batch * 2  # every (batch, head) gets programs


def test_grid_decodes_every_block_head_and_batch_once():
    """`grid` and `program_coords` agree: program p is (block p % B, head, batch) with blocks fastest."""
    length, block, heads, batch = 40, 16, 3, 70000
    (programs,) = common.grid(length, block, heads, batch)
    assert programs == 3 * heads * batch
    pid = torch.arange(programs)
    off_bh = pid // 3
    coords = torch.stack([(pid % 3) * block, off_bh % heads, off_bh // heads], dim=1)
    assert coords[:, 2].max() == batch - 1 and torch.unique(coords, dim=0).shape[0] == programs


# ----------------------------------------------------------------------------------------------
# Padded tiles: no inf or NaN is ever formed


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("is_causal", [False, True])
def test_padded_key_rows_form_no_inf(dtype, is_causal):
    """A query block outnumbering the keys left: the padded keys must not overflow exp2 (a very
    negative lse would make 2^-lse2 huge) nor the float16 casts."""
    generator = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(1, 2, n, 16, generator=generator) for n in (40, 3, 3))
    mask = torch.full((40, 3), -30.0)  # every score very negative: lse2 ~ -43, 2^43 overflows float16
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is rounding
        warnings.simplefilter("error")
        mine, theirs, truth = run_three_ways(query, key, value, dtype, attn_mask=mask.to(dtype=dtype),
                                             is_causal=is_causal)
    for name, a, b, c in zip(("output", "grad query", "grad key", "grad value"), mine, theirs, truth):
        assert torch.isfinite(a).all(), name
        assert_close_to_reference(a, c, b, name)


# ----------------------------------------------------------------------------------------------
# Ported semantics


def test_huge_bfloat16_scores_give_no_nan():
    """torch's large-bf16 test: scores around 1e11 must not overflow into NaN."""
    q = torch.full((1, 1, 3, 64), 133120.0)
    k = torch.full((1, 1, 5, 64), 133120.0)
    v = torch.randn(1, 1, 5, 64, generator=torch.Generator().manual_seed(0))
    mine, theirs, truth = run_three_ways(q, k, v, torch.bfloat16)
    for name, a, b, c in zip(("output", "grad query", "grad key", "grad value"), mine, theirs, truth):
        assert not torch.isnan(a).any(), name
        assert_close_to_reference(a, c, b, name)


def test_head_dim_one_with_a_stride_other_than_one():
    """torch's singleton head dim test: q (1, 1, 2, 1) as a transposed view, stride 1 nowhere."""
    device = kernel_device()
    query = torch.tensor([[[[1.0, 2.0]]]], device=device).transpose(-1, -2)
    assert query.stride(-1) != 1
    key = torch.tensor([[[[1.0], [3.0]]]], device=device)
    value = torch.tensor([[[[1.0], [-1.0]]]], device=device)
    out = fasttf.scaled_dot_product_attention(query, key, value)
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(query, key, value))


def test_mask_with_arbitrary_strides():
    """torch's non-contiguous bias test: a mask viewed through as_strided, read as it is."""
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(2, 2, n, 8, generator=generator) for n in (19, 21, 21))
    storage = torch.randn(4000, generator=generator)
    mask = storage.as_strided((2, 2, 19, 21), (7, 1000, 3, 47))
    mine, theirs, truth = run_three_ways(query, key, value, torch.float32, attn_mask=mask)
    for name, a, b, c in zip(("output", "grad query", "grad key", "grad value"), mine, theirs, truth):
        assert_close_to_reference(a, c, b, name)


def test_float16_backward_does_not_overflow_on_large_scores():
    """flash-attention's bwd overflow test: q and k scaled by 5 in float16, gradients finite
    and as accurate as torch's."""
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(1, 2, n, 32, generator=generator) for n in (37, 41, 41))
    mine, theirs, truth = run_three_ways(query * 5, key * 5, value, torch.float16, is_causal=True)
    for name, a, b, c in zip(("output", "grad query", "grad key", "grad value"), mine, theirs, truth):
        assert torch.isfinite(a).all(), name
        assert_close_to_reference(a, c, b, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_mask_of_finfo_min_attends_uniformly_like_torch(dtype, attention_backend):
    """A row whose float mask is finfo(dtype).min at every key (HF-style masking of a padded row)
    attends uniformly over all keys in torch; finfo.min * log2(e) overflowed to -inf in the Triton
    kernel, which then gave 0. Other rows mix finfo.min keys (weight 0) with ordinary ones."""
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(1, 2, 6, 16, generator=generator) for _ in range(3))
    mask = torch.zeros(6, 6, dtype=dtype)
    mask[0, :] = torch.finfo(dtype).min  # every key: uniform
    mask[1:, 3:] = torch.finfo(dtype).min  # some keys: ignored
    grad_out = torch.randn(1, 2, 6, 16, generator=generator)
    ours, theirs, reference_result = run_three_ways(query, key, value, dtype, grad_out, attn_mask=mask.to(dtype))
    torch.testing.assert_close(ours[0][:, :, 0].float(), value.to(dtype).float().mean(dim=2), rtol=0.02, atol=0.02)
    for name, mine, torchs, exact in zip(("out", "dq", "dk", "dv"), ours, theirs, reference_result):
        assert torch.isfinite(mine).all(), name
        assert_close_to_reference(mine, exact, torchs, name=name)


def test_nan_in_a_float_mask_poisons_its_row_like_torch(attention_backend):
    """A NaN score (here from the mask) makes its row NaN in torch; the native kernel's exp once
    clamped NaN to a tiny weight and returned a finite, wrong row. Other rows stay finite."""
    generator = torch.Generator().manual_seed(6)
    device = kernel_device()
    query, key, value = (torch.randn(1, 2, 5, 16, generator=generator).to(device) for _ in range(3))
    mask = torch.zeros(5, 5, device=device)
    mask[2, 1] = float("nan")
    ours = fasttf.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert torch.isnan(theirs[:, :, 2]).all()  # torch's semantics, which the kernels follow
    assert torch.isnan(ours[:, :, 2]).all()
    rows = [0, 1, 3, 4]
    torch.testing.assert_close(ours[:, :, rows], theirs[:, :, rows], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# FASTTF_GPU_TILES: other tile lists for a GPU experiment, checked before any kernel sees them


def test_gpu_tiles_from_env_replace_the_named_kind_only():
    default = {"fwd": [(64, 64, 4, 2)], "bwd": [(32, 32, 4, 1)]}
    tiles, replaced = common.tiles_from_env(" fwd=128x128x8x3, 128x64x8x4 ; ", default)
    assert tiles == {"fwd": [(128, 128, 8, 3), (128, 64, 8, 4)], "bwd": [(32, 32, 4, 1)]}
    assert replaced == {"fwd"}
    assert common.tiles_from_env(None, default) == (default, set())
    assert common.tiles_from_env("", default) == (default, set())


@pytest.mark.parametrize("value", ["fwd", "fwd=", "fwd=128x128x8", "fwd=128x128x8x3x1", "fwd=128xAx8x3",
                                   "both=64x64x4x2", "fwd=96x64x4x2", "fwd=8x64x4x2", "fwd=64x64x3x2",
                                   "fwd=64x64x4x0", "fwd=-64x64x4x2"])
def test_gpu_tiles_from_env_refuse_what_is_not_a_tile(value):
    with pytest.raises(ValueError, match="FASTTF_GPU_TILES"):
        common.tiles_from_env(value, {"fwd": [(64, 64, 4, 2)], "bwd": [(32, 32, 4, 1)]})


def test_tiles_named_in_the_env_skip_the_head_dim_pruning(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "GPU_TILES_FROM_ENV", {"fwd"})
    wide = [type("Config", (), {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 128}})() for _ in range(2)]
    args = {"BLOCK_E": 256, "BLOCK_EV": 256, "Q": torch.empty(1, dtype=torch.bfloat16)}
    monkeypatch.setattr(common, "AUTOTUNE", True)
    assert common.prune_for("fwd")(wide, args) == wide
    assert common.prune(wide, args) == wide[-1:]  # the built-in rule would keep none but the last
    assert common.prune_for("bwd") is common.prune
    monkeypatch.setattr(common, "AUTOTUNE", False)
    assert common.prune_for("fwd")(wide, args) == wide[:1]


@pytest.mark.parametrize("mode", ["inference", "no input requires grad"])
def test_a_forward_mode_tangent_raises_instead_of_being_dropped(attention_backend, mode):
    device = kernel_device()
    query, key, value = (torch.randn(1, 2, 4, 16, device=device) for _ in range(3))
    with forward_ad.dual_level(), torch.set_grad_enabled(mode != "inference"):
        dual = forward_ad.make_dual(query, torch.ones_like(query))
        for call in (lambda: fasttf.scaled_dot_product_attention(dual, key, value),
                     lambda: attention_with_weights(dual, key, value)):
            with pytest.raises(RuntimeError, match="jvp"):
                call()
