"""Attention, forward and forward+backward: fasttf's Triton kernel against what a user has today.

One group per (mode, dtype, head dim, causal, sequence length); in each group:

    fasttf                 fasttf.scaled_dot_product_attention: Triton on the GPU; on the CPU fasttf's
                           C++ kernel ("fasttf (native)", FASTTF_CPU_ATTENTION=native), and its Triton
                           kernel under the Triton interpreter at one tiny shape ("interpreter" groups)
    torch sdpa             F.scaled_dot_product_attention, torch's own choice of backend (the eager twin)
    torch sdpa[math|flash|efficient|cudnn]   one backend forced with torch.nn.attention.sdpa_kernel
    fasttf.reference       softmax(q k^T * scale) v, the plain-torch twin
    torch MHA core         what nn.MultiheadAttention's default path (need_weights=True) runs between
                           its projections: baddbmm, softmax, bmm, and the head-averaged weights
    flash_attn             flash_attn.flash_attn_func, where the package is installed (CUDA)

Shapes: on a GPU, L = S = 128 ... 16384 with N = 16384 / L sequences and H = 2048 / E heads (the
tokens and the model width stay fixed, as in FlashAttention's own benchmarks), E = 64 and 128,
float16 and bfloat16, causal and not. On the CPU, float32, E = 64, N = 2, H = 8, L = 256 ... 4096,
bfloat16 at L = 256, 1024, 4096 (AMX tile products where the CPU has them, csrc/cpu/attention_amx.cpp),
and the cases where torch's CPU SDPA leaves its flash kernel for the math path: dropout 0.1
("dropout"), a learned float bias (H, L, S) that requires grad ("bias"), and a bool mask (L, S)
("bool mask", which torch's flash kernel takes). Run with FASTTF_BENCH_THREADS=1 and =2.
TFLOP/s count 4·N·H·L·S·E for the forward, 3.5x that forward+backward, half when causal.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fasttf
from fasttf import reference
from harness import DEVICE, ON_GPU, TINY, attention_flops, dtype_name, forward_backward, interpreter_active, measure

try:
    from flash_attn import flash_attn_func
except ImportError:  # not installed: its rows are left out
    flash_attn_func = None

# Implementations that materialise the L x S scores run up to this many score elements (N·H·L·S).
MAX_MATERIALISED_SCORES = 2**31


def shapes():
    """(dtype, head_dim, causal, (N, H, L)) of every attention group on this device."""
    if TINY:
        dtype = torch.float16 if ON_GPU else torch.float32
        return [(dtype, 16, causal, (1, 2, 16)) for causal in (False, True)]
    if ON_GPU:
        return [(dtype, head_dim, causal, (16384 // length, 2048 // head_dim, length))
                for dtype in (torch.float16, torch.bfloat16) for head_dim in (64, 128) for causal in (False, True)
                for length in (128, 256, 512, 1024, 2048, 4096, 8192, 16384)]
    return [(torch.float32, 64, causal, (2, 8, length)) for causal in (False, True)
            for length in (256, 512, 1024, 2048, 4096)] + \
        [(torch.bfloat16, 64, causal, (2, 8, length)) for causal in (False, True) for length in (256, 1024, 4096)]


# CPU groups beyond no mask / causal: (label, keyword arguments made from (q, k, v), requires grad)
CPU_VARIANTS = ("dropout", "bias", "bool mask")


def variant_shapes():
    if ON_GPU:
        return []
    if TINY:
        return [(torch.float32, 16, False, (1, 2, 16), variant) for variant in CPU_VARIANTS]
    return [(torch.float32, 64, False, (2, 8, length), variant) for variant in CPU_VARIANTS
            for length in (256, 512, 1024, 2048, 4096)]


def variant_arguments(variant, q, length, backward):
    """The extra SDPA arguments of a variant group, made once per benchmark (not timed)."""
    generator = torch.Generator().manual_seed(1)
    if variant == "dropout":
        return dict(dropout_p=0.1), ()
    if variant == "bias":
        bias = (0.1 * torch.randn(q.size(1), length, length, generator=generator)).requires_grad_(backward)
        return dict(attn_mask=bias), ((bias,) if backward else ())
    return dict(attn_mask=torch.rand(length, length, generator=generator) > 0.2), ()


def interpreter_shapes():
    """The one CPU shape where fasttf's kernel runs (under the Triton interpreter)."""
    if ON_GPU or TINY:
        return []
    return [(torch.float32, 64, False, (1, 2, 128))]


def torch_style(q, k, kwargs):
    """torch's CPU SDPA trips on masks of fewer dims than the scores: an expanded view."""
    mask = kwargs.get("attn_mask")
    if mask is None:
        return kwargs
    return dict(kwargs, attn_mask=mask.expand(q.size(0), q.size(1), q.size(2), k.size(2)))


def fasttf_attention(q, k, v, causal, **kwargs):
    return fasttf.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)


def sdpa_with(backend):
    def attend(q, k, v, causal, **kwargs):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **torch_style(q, k, kwargs))
    return attend


def mha_core(q, k, v, causal):
    """nn.MultiheadAttention's need_weights=True path after the projections (per head, batched)."""
    batch, heads, length_q, head_dim = q.shape
    length_k = k.size(2)
    q3 = q.reshape(batch * heads, length_q, head_dim) * (1.0 / math.sqrt(head_dim))
    k3 = k.reshape(batch * heads, length_k, head_dim)
    v3 = v.reshape(batch * heads, length_k, head_dim)
    if causal:
        mask = torch.full((length_q, length_k), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        weights = torch.baddbmm(mask, q3, k3.transpose(1, 2))
    else:
        weights = torch.bmm(q3, k3.transpose(1, 2))
    weights = torch.softmax(weights, dim=-1)
    out = torch.bmm(weights, v3)
    weights.view(batch, heads, length_q, length_k).mean(dim=1)  # the averaged weights MHA returns
    return out.view(batch, heads, length_q, head_dim)


def implementations():
    """(name, attend(q, k, v, causal), eager twin?, materialises scores?) for this device."""
    impls = [
        ("fasttf", fasttf_attention, False, False),
        ("torch sdpa", lambda q, k, v, causal, **kw: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, **torch_style(q, k, kw)), True, False),
        ("torch sdpa[math]", sdpa_with(SDPBackend.MATH), False, True),
        ("torch sdpa[flash]", sdpa_with(SDPBackend.FLASH_ATTENTION), False, False),
    ]
    if ON_GPU:
        impls += [("torch sdpa[efficient]", sdpa_with(SDPBackend.EFFICIENT_ATTENTION), False, False),
                  ("torch sdpa[cudnn]", sdpa_with(SDPBackend.CUDNN_ATTENTION), False, False)]
    impls += [
        ("fasttf.reference",
         lambda q, k, v, causal, **kw: reference.scaled_dot_product_attention(
             q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), causal), False, True),
        ("torch MHA core", mha_core, False, True),
    ]
    if flash_attn_func is not None and ON_GPU:
        # flash_attn takes (N, L, H, E); the transposes are views, flash_attn copies if it must
        impls.append(("flash_attn", lambda q, k, v, causal: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2), False, False))
    return impls


IMPLS = implementations()
EAGER_TWIN = next(impl for impl in IMPLS if impl[2])
MODES = ("fwd", "fwd+bwd")


def group_name(mode, dtype, head_dim, causal, batch, heads, length, label=""):
    mask = "causal" if causal else "full"
    return f"attention {mode} {dtype_name(dtype)} E={head_dim} {mask}{label}: L=S={length} N={batch} H={heads}"


def run_attention(benchmark, monkeypatch, mode, impl, shape, label="", variant=None):
    name, attend, eager_twin, materialises = impl
    dtype, head_dim, causal, (batch, heads, length) = shape[:4]
    if materialises and batch * heads * length * length > MAX_MATERIALISED_SCORES:
        pytest.skip(f"{name} materialises the {batch}x{heads}x{length}x{length} scores")
    impl_name = name
    if name == "fasttf" and not ON_GPU:
        if label:  # the Triton kernel under the interpreter
            monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")
            impl_name = "fasttf (interpreter)"
        else:  # fasttf's C++ CPU kernel
            monkeypatch.setenv("FASTTF_CPU_ATTENTION", "native")
            impl_name = "fasttf (native)"
    backward = mode == "fwd+bwd"
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def tensor():
        return torch.randn(batch, heads, length, head_dim, device=DEVICE, dtype=dtype, generator=generator,
                           requires_grad=backward)

    q, k, v = tensor(), tensor(), tensor()
    kwargs, extra_inputs = variant_arguments(variant, q, length, backward) if variant else ({}, ())
    grad_out = (torch.randn(batch, heads, length, head_dim, device=DEVICE, dtype=dtype, generator=generator)
                if backward else None)

    def timed_call(attend):
        if backward:
            return forward_backward(lambda: attend(q, k, v, causal, **kwargs), (q, k, v, *extra_inputs), grad_out)

        def fn():
            with torch.no_grad():
                return attend(q, k, v, causal, **kwargs)
        return fn

    fn = timed_call(attend)
    # fasttf's speed rows (not the interpreter's) are also timed interleaved with the eager twin
    twin = timed_call(EAGER_TWIN[1]) if name == "fasttf" and not label else None
    if variant:
        label = f" {variant}"
    measure(benchmark, fn, group=group_name(mode, dtype, head_dim, causal, batch, heads, length, label),
            impl=impl_name, eager_twin=eager_twin, twin=twin, op="attention", mode=mode, dtype=dtype_name(dtype),
            head_dim=head_dim, causal=causal, batch=batch, heads=heads, seq_len=length,
            series=f"attention {mode} {dtype_name(dtype)} E={head_dim} {'causal' if causal else 'full'}{label}",
            flops=attention_flops(batch, heads, length, length, head_dim, causal, backward))


def shape_id(shape):
    dtype, head_dim, causal, (batch, heads, length) = shape
    return f"{dtype_name(dtype)}-E{head_dim}-{'causal' if causal else 'full'}-L{length}-N{batch}-H{heads}"


@pytest.mark.parametrize("impl", IMPLS, ids=[impl[0] for impl in IMPLS])
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_attention(benchmark, monkeypatch, mode, shape, impl):
    run_attention(benchmark, monkeypatch, mode, impl, shape)


INTERPRETER_IMPLS = [impl for impl in IMPLS if impl[0] in ("fasttf", "torch sdpa", "torch sdpa[math]",
                                                           "fasttf.reference")]


@pytest.mark.parametrize("impl", INTERPRETER_IMPLS, ids=[impl[0] for impl in INTERPRETER_IMPLS])
@pytest.mark.parametrize("shape", interpreter_shapes(), ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_attention_interpreter(benchmark, monkeypatch, mode, shape, impl):
    """fasttf's kernel under the Triton interpreter beside torch at the same tiny shape."""
    if not interpreter_active():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported: fasttf attention on the CPU "
                    "falls back to torch's SDPA")
    run_attention(benchmark, monkeypatch, mode, impl, shape, label=" (interpreter)")


VARIANT_IMPLS = [impl for impl in IMPLS if impl[0] in ("fasttf", "torch sdpa", "torch sdpa[math]", "torch sdpa[flash]")]


def variant_id(shape):
    return shape_id(shape[:4]) + "-" + shape[4].replace(" ", "-")


@pytest.mark.parametrize("impl", VARIANT_IMPLS, ids=[impl[0] for impl in VARIANT_IMPLS])
@pytest.mark.parametrize("shape", variant_shapes(), ids=variant_id)
@pytest.mark.parametrize("mode", MODES)
def test_attention_cpu_variants(benchmark, monkeypatch, mode, shape, impl):
    """CPU: dropout, learned bias, bool mask; torch's flash kernel where it takes the case."""
    variant = shape[4]
    if impl[0] == "torch sdpa[flash]" and (variant == "dropout" or (variant == "bias" and mode == "fwd+bwd")):
        pytest.skip("torch's CPU flash kernel takes no dropout and gives no mask gradient")
    run_attention(benchmark, monkeypatch, mode, impl, shape, variant=variant)
