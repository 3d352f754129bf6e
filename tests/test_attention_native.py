"""fasttf's C++ CPU attention kernel (csrc/cpu/attention*.cpp) beyond the tests both kernels share
(tests/test_attention.py): every dtype, shapes across its tiles (csrc/cpu/attention.h) that the interpreter
cannot afford, head dims past 256, the attention weights, the mask gradient and the weights'
gradient against fasttf.reference in float64, thread-count independence, dropout replay, opcheck
of its ops, and the FASTTF_CPU_ATTENTION switch. No interpreter needed: this is plain C++.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fasttf
from fasttf import reference
from fasttf.kernels import attention as kernels
from fasttf.ops import attention as attention_op
from fasttf.ops import attention_cpu
from fasttf.testing import assert_close_to_reference

from test_attention import check_against_reference, kernel_keep_mask, make_inputs, run_with_dropout, torch_style_mask


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "native")


# ----------------------------------------------------------------------------------------------
# Output and gradients against the float64 reference (accuracy rule of DESIGN.md)

SHAPES = [  # (N, H, L, S, E, Ev). Tiles (csrc/cpu/attention.h): forward 256 query rows x 512 keys,
    # backward 128 x 512; causal 64 x 256 in both, 128 x 512 from L = 2048; weights 64 x 256
    (1, 2, 64, 128, 32, 32),
    (2, 2, 130, 260, 16, 24),
    (1, 1, 200, 70, 8, 8),
    (1, 3, 1, 300, 64, 64),
    (1, 1, 65, 129, 300, 20),  # head dim past Triton's 256
    (1, 2, 300, 1100, 16, 16),  # several blocks of every tile, partial last ones
    (1, 1, 2100, 2100, 8, 8),  # the long-sequence causal tiles
    (1, 2, 33, 47, 15, 6),  # odd head dim and key count: bfloat16 on MKL's products, not the AMX tiles' pairs
    (2, 1, 21, 3, 40, 1),  # odd value head dim: the bfloat16 forward's P V on AMX tiles, its backward on MKL's
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_and_dtypes_against_reference(shape, is_causal, dtype):
    batch, heads, length_q, length_k, head_dim, value_dim = shape
    query, key, value = make_inputs(batch, heads, length_q, length_k, head_dim, value_dim, dtype=dtype)
    check_against_reference(query, key, value, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_large_masked_gqa_strided(is_causal, dtype):
    query, key, value = make_inputs(2, 4, 150, 291, 32, 16, heads_kv=2, dtype=dtype)
    query = query.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, H, E) storage
    key = key.transpose(1, 2).contiguous().transpose(1, 2)
    generator = torch.Generator().manual_seed(3)
    check_against_reference(query, key, value, attn_mask=torch.rand(150, 291, generator=generator) > 0.3,
                            is_causal=is_causal, enable_gqa=True)
    check_against_reference(query, key, value, attn_mask=torch.randn(2, 1, 150, 1, generator=generator).to(dtype),
                            is_causal=is_causal, enable_gqa=True)


# (N, H, Hkv, mask shape): the backward adds the mask gradient in place where the tasks (one per
# batch and kv head, folding those the mask is broadcast over) number at least 4, else through an
# (N, H, L, S) buffer; both against the float64 reference, with GQA, broadcasts over L and over S.
MASK_GRADIENT_LAYOUTS = [
    (3, 4, 4, (4, 19, 23)),  # in place, batches folded
    (3, 4, 4, (1, 4, 1, 23)),  # in place, batches folded, broadcast over L
    (3, 4, 4, (4, 19, 1)),  # constant along the keys: exactly 0
    (3, 8, 4, (8, 19, 23)),  # in place, two query heads per task (GQA)
    (3, 4, 4, (3, 4, 19, 23)),  # in place, nothing folded
    (3, 4, 4, (3, 1, 19, 23)),  # 3 tasks: the buffer
    (2, 4, 4, (19, 23)),  # 1 task: the buffer
]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("layout", MASK_GRADIENT_LAYOUTS, ids=str)
def test_mask_gradient_in_place_and_through_the_buffer(layout, is_causal):
    batch, heads, heads_kv, mask_shape = layout
    query, key, value = make_inputs(batch, heads, 19, 23, 8, heads_kv=heads_kv)
    mask = torch.randn(mask_shape, generator=torch.Generator().manual_seed(2))
    inputs = [t.detach().clone().requires_grad_() for t in (query, key, value, mask)]
    out = fasttf.scaled_dot_product_attention(*inputs[:3], attn_mask=inputs[3], is_causal=is_causal, enable_gqa=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, inputs, grad_out)
    inputs64 = [t.detach().double().requires_grad_() for t in (query, key, value, mask)]
    truth = reference.scaled_dot_product_attention(*inputs64[:3], inputs64[3], is_causal=is_causal, enable_gqa=True)
    truths = torch.autograd.grad(truth, inputs64, grad_out.double())
    for name, got, want in zip(("query", "key", "value", "mask"), grads, truths):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


# Masks whose gradient sums many ds an element (N H L of a (S,) mask): float32 sums of more than 16
# terms run in float64 (one after the other in float32 they erred 3-5x torch's, which blocks its sum).
LONG_SUM_MASKS = [(65,), (1, 65), (6, 1, 65), (512, 1), (6, 1, 1), (1, 6, 512, 65)]


@pytest.mark.parametrize("mask_shape", LONG_SUM_MASKS, ids=str)
def test_mask_gradient_long_sums_against_torch(mask_shape):
    query, key, value = make_inputs(3, 6, 512, 65, 64, heads_kv=2)
    mask = torch.randn(mask_shape, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(3, 6, 512, 64, generator=torch.Generator().manual_seed(6))
    grads = {}
    for name, run, dtype in (("fasttf", fasttf.scaled_dot_product_attention, torch.float32),
                             ("torch", F.scaled_dot_product_attention, torch.float32),
                             ("float64", F.scaled_dot_product_attention, torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (query, key, value, mask)]
        out = run(*inputs[:3], attn_mask=inputs[3], enable_gqa=True)
        grads[name] = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    for index, name in enumerate(("query", "key", "value", "mask")):
        assert_close_to_reference(grads["fasttf"][index], grads["float64"][index], grads["torch"][index],
                                  f"grad {name}")


# dK and dV summed over many query blocks (L x the GQA group): float32 sums go to float64 every 4
# blocks. Rounded once a block (MKL's products with beta = 1), these two erred 53x and 2.6x torch's dV error.
LONG_KV_SUMS = [(1, 3, 1, 256, 1, 128, 1, 0), (3, 6, 2, 512, 3, 33, 40, 1)]  # (N, H, Hkv, L, S, E, Ev, seed)


@pytest.mark.parametrize("shape", LONG_KV_SUMS, ids=str)
def test_key_and_value_gradients_long_sums_against_torch(shape):
    batch, heads, heads_kv, length_q, length_k, head_dim, value_dim, seed = shape
    query, key, value = make_inputs(batch, heads, length_q, length_k, head_dim, value_dim, heads_kv=heads_kv,
                                    seed=seed)
    grad_out = torch.randn(batch, heads, length_q, value_dim, generator=torch.Generator().manual_seed(seed))
    grads = {}
    for name, run, dtype in (("fasttf", fasttf.scaled_dot_product_attention, torch.float32),
                             ("torch", F.scaled_dot_product_attention, torch.float32),
                             ("float64", F.scaled_dot_product_attention, torch.float64)):
        inputs = [t.to(dtype).requires_grad_() for t in (query, key, value)]
        out = run(*inputs, is_causal=True, enable_gqa=True)
        grads[name] = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    for index, name in enumerate(("query", "key", "value")):
        assert_close_to_reference(grads["fasttf"][index], grads["float64"][index], grads["torch"][index],
                                  f"grad {name}")


# Random configurations across the kernel's tiles (lengths at the 128 / 256 / 512 block edges), every
# dtype, masks of many broadcast shapes (a float mask's gradient too), dropout replayed, GQA, (N, L, H, E)
# storage: output and gradients against float64 by the accuracy rule. Kept out: S or L < 8 and, in half
# precision, head dims < 16, where the flash backward's D = rowsum(dO * O) (O rounded to the dtype)
# against torch's math rowsum(dP * P) fails the rule now and then (torch's error is ~0 there).
RANDOM_LENGTHS = [8, 15, 16, 17, 100, 127, 128, 129, 255, 256, 257, 511, 513]
RANDOM_MASKS = ["none", "bool L S", "float L S", "float S", "float N 1 L S", "float H 1 1", "learned S",
                "learned L S", "learned N H L S", "learned 1 H 1 S"]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), heads_kv=st.integers(1, 2), group=st.integers(1, 3),
       length_q=st.sampled_from(RANDOM_LENGTHS), length_k=st.sampled_from(RANDOM_LENGTHS),
       head_dim=st.sampled_from([16, 33, 64, 80]), value_dim=st.sampled_from([16, 40, 64]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       is_causal=st.booleans(), mask_kind=st.sampled_from(RANDOM_MASKS), dropout=st.booleans(),
       transpose=st.booleans())
def test_random_configurations_across_tiles(batch, heads_kv, group, length_q, length_k, head_dim, value_dim, dtype,
                                            is_causal, mask_kind, dropout, transpose):
    heads = heads_kv * group
    query, key, value = make_inputs(batch, heads, length_q, length_k, head_dim, value_dim, heads_kv=heads_kv,
                                    dtype=dtype, seed=length_q + length_k)
    if transpose:  # the same values stored (N, L, H, E): strided views
        query, key, value = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    kind, *dims = mask_kind.split()
    sizes = {"N": batch, "H": heads, "L": length_q, "S": length_k, "1": 1}
    generator = torch.Generator().manual_seed(length_q * 7 + length_k)
    mask = None
    if kind == "bool":
        mask = torch.rand([sizes[d] for d in dims], generator=generator) > 0.3
    elif kind in ("float", "learned"):
        mask = torch.randn([sizes[d] for d in dims], generator=generator).to(dtype)
    dropout_p = 0.3 if dropout else 0.0
    keep = kernel_keep_mask(query, key, dropout_p, torch_seed=7) if dropout else None
    learned = kind == "learned"
    inputs = [t.detach().requires_grad_(index < 3 or learned) for index, t in
              enumerate((query, key, value, mask if mask is not None else torch.zeros(())))]
    torch.manual_seed(7)
    out = fasttf.scaled_dot_product_attention(*inputs[:3], attn_mask=inputs[3] if mask is not None else None,
                                              dropout_p=dropout_p, is_causal=is_causal, enable_gqa=group > 1)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    wanted = inputs[:4] if learned else inputs[:3]
    grads = torch.autograd.grad(out, wanted, grad_out)
    results = {}
    for name, run_dtype in (("float64", torch.float64), ("baseline", dtype)):
        ins = [t.detach().to(run_dtype).requires_grad_(index < 3 or learned) for index, t in enumerate(inputs)]
        run_mask = ins[3] if mask is not None and mask.dtype != torch.bool else mask
        if name == "baseline" and not dropout:  # torch's SDPA; with dropout the reference replays the mask
            torch_mask, torch_causal = torch_style_mask(run_mask, is_causal, ins[0], ins[1])
            result = F.scaled_dot_product_attention(*ins[:3], attn_mask=torch_mask, is_causal=torch_causal,
                                                    enable_gqa=group > 1)
        else:
            result = reference.scaled_dot_product_attention(*ins[:3], run_mask, dropout_p, is_causal, None,
                                                            group > 1, dropout_mask=keep)
        results[name] = (result, torch.autograd.grad(result, ins[:4] if learned else ins[:3], grad_out.to(run_dtype)))
    assert_close_to_reference(out, results["float64"][0], results["baseline"][0], "output")
    for index, name in enumerate(("grad query", "grad key", "grad value", "grad mask")[:len(grads)]):
        assert_close_to_reference(grads[index], results["float64"][1][index], results["baseline"][1][index], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_dropout_replays_in_the_reference(dtype):
    query, key, value = make_inputs(2, 2, 140, 270, 16, heads_kv=1, dtype=dtype)
    keep = kernel_keep_mask(query, key, 0.2, torch_seed=4)
    mask = torch.rand(140, 270, generator=torch.Generator().manual_seed(1)) > 0.2
    check_against_reference(query, key, value, attn_mask=mask, is_causal=True, enable_gqa=True, dropout_p=0.2,
                            dropout_mask=keep,
                            run=lambda q, k, v: run_with_dropout(q, k, v, 0.2, 4, attn_mask=mask, is_causal=True,
                                                                 enable_gqa=True))


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []


def test_bfloat16_rounding_is_torchs_bit_for_bit():
    """The kernel rounds p z, ds, the output and the gradients to bfloat16 with its own row loop
    (AVX-512 lanes, or the compiler's vectors under FASTTF_CPU_ISA): to nearest even, NaN quiet,
    subnormals kept, as c10::BFloat16 does."""
    from fasttf import _C
    awkward = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.005859375, 1.0078125, 3.39e38, -3.39e38, 3.4028235e38,
                            float("inf"), float("-inf"), float("nan"), -float("nan"), 1e-39, -1e-40, 1.4e-45,
                            1.1754942e-38, 2.5e-38], dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    spread = torch.randn(4099, generator=generator) * 10.0 ** torch.randint(-44, 38, (4099,), generator=generator)
    bits = torch.randint(-2**31, 2**31 - 1, (4099,), generator=generator, dtype=torch.int64).to(torch.int32)
    for x in (awkward, spread.float(), bits.view(torch.float32)):
        for n in (x.numel(), 15, 17):  # whole vectors and a masked tail
            got, want = _C._round_to_bfloat16(x[:n]), x[:n].bfloat16()
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan)
            assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_bfloat16_products_run_where_the_cpu_has_them():
    """bfloat16 q, k, v stay bfloat16 in the block products on a CPU with AVX512-BF16 (MKL's bfloat16
    GEMM, AMX tiles where there are some), unless FASTTF_CPU_ISA caps the ISA; else they are converted."""
    from fasttf import _C
    has = "avx512_bf16" in cpu_flags() and os.environ.get("FASTTF_CPU_ISA", "") in ("", "avx512")
    assert _C._cpu_attention_operand_dtype(torch.bfloat16) == (torch.bfloat16 if has else torch.float32)
    assert _C._cpu_attention_operand_dtype(torch.float16) == torch.float32
    assert _C._cpu_attention_operand_dtype(torch.float32) == torch.float32
    assert _C._cpu_attention_operand_dtype(torch.float64) == torch.float64


def test_float32_products_on_the_avx2_micro_kernel_where_avx2_is_widest():
    """float32 block products run on the hand-written AVX2 micro-kernel (K and V packed in 16-column panels)
    on a CPU whose widest vectors are AVX2, or with FASTTF_CPU_ISA=avx2 (tests/test_cpu_isa_fallbacks.py
    runs this file so); else on MKL's sgemm. SHAPES above cover its edges: row counts past multiples of 6,
    key counts and head dims past multiples of 16, and query blocks too short to pack for (L < 32)."""
    from fasttf import _C
    flags, isa = cpu_flags(), os.environ.get("FASTTF_CPU_ISA", "")
    avx2 = "avx2" in flags and "fma" in flags and isa != "generic"
    widest = "avx512f" not in flags or isa == "avx2"
    assert _C._cpu_attention_panels() == (avx2 and widest)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_bfloat16_rounds_p_as_torch_does(mask_kind):
    """On the bfloat16 products the output is (p rounded to bfloat16) V / l, as in torch's CPU flash kernel:
    judged against torch's own bfloat16 SDPA (the accuracy rule) on long rows, where rounding p matters."""
    query, key, value = make_inputs(2, 4, 300, 700, 64, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    mask = {None: None, "bool": torch.rand(300, 700, generator=generator) > 0.2,
            "float": torch.randn(2, 1, 300, 700, generator=generator).to(torch.bfloat16)}[mask_kind]
    check_against_reference(query, key, value, attn_mask=mask)


def test_float64_and_big_head_dims_run_natively():  # strict mode: a fallback would raise
    query, key, value = make_inputs(1, 2, 5, 6, 300, dtype=torch.float64)
    out = fasttf.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(query, key, value, is_causal=True))


# ----------------------------------------------------------------------------------------------
# Weights, their gradient and the mask gradient (the ops' contract), in float64 and float32


def native_call(query, key, value, mask, dropout_p, is_causal, scale, seed, average_heads, grad_out, grad_weights,
                mask_requires_grad):
    out, lse = attention_cpu.attention_forward(query, key, value, mask, dropout_p, is_causal, scale, seed)
    weights = attention_cpu.attention_weights(query, key, lse, mask, dropout_p, is_causal, scale, seed,
                                              average_heads)
    dq, dk, dv, dmask = torch.ops.fasttf.attention_backward(grad_out, query, key, value, out, lse, mask, dropout_p,
                                                            is_causal, scale, seed, grad_weights, average_heads,
                                                            mask_requires_grad)
    return out, weights, (dq, dk, dv, dmask if mask_requires_grad else None)  # dmask: empty when not asked for


def reference_call(query, key, value, mask, dropout_p, is_causal, scale, keep, average_heads, grad_out,
                   grad_weights):
    inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    mask64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.detach().double().requires_grad_())
    group = query.size(1) // key.size(1)
    probs = reference.attention_probs(inputs[0], inputs[1], mask64, is_causal, scale, enable_gqa=group > 1)
    weights = reference.apply_dropout(probs, dropout_p, keep)
    out = weights @ inputs[2].repeat_interleave(group, dim=1)
    returned = weights.mean(dim=1) if average_heads else weights
    loss = (out * grad_out.double()).sum()
    if grad_weights is not None:
        loss = loss + (returned * grad_weights.double()).sum()
    wanted = inputs + ([mask64] if mask64 is not None and mask64.requires_grad else [])
    grads = torch.autograd.grad(loss, wanted)
    return out, returned, grads


CASES = [  # (mask shape or None, mask kind, is_causal, dropout_p, average_heads, with grad_weights)
    ((2, 4, 70, 150), "float", False, 0.0, False, False),
    ((70, 150), "float", True, 0.0, True, True),
    ((4, 1, 150), "float", False, 0.3, True, True),
    ((2, 1, 70, 1), "float", True, 0.2, False, True),
    ((150,), "bool", True, 0.1, False, True),
    (None, None, False, 0.0, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_weights_and_gradients_against_reference(case, dtype):
    mask_shape, kind, is_causal, dropout_p, average_heads, with_grad_weights = case
    query, key, value = make_inputs(2, 4, 70, 150, 16, 8, heads_kv=2, dtype=dtype)
    generator = torch.Generator().manual_seed(11)
    mask = None
    if kind == "float":
        mask = torch.randn(mask_shape, generator=generator).to(dtype)
        if mask.dim() >= 2 and mask.size(-2) > 1:
            mask[..., :3, :] = -math.inf  # rows with no key left
        else:
            mask[..., :3] = -math.inf  # keys nobody sees
    elif kind == "bool":
        mask = torch.rand(mask_shape, generator=generator) > 0.3
    scale = 0.3
    seed = torch.tensor([77], dtype=torch.int64) if dropout_p > 0 else None
    keep = attention_cpu.dropout_keep_mask(query, key, dropout_p, seed) if dropout_p > 0 else None
    grad_out = torch.randn(2, 4, 70, 8, generator=generator).to(dtype)
    weights_shape = (2, 70, 150) if average_heads else (2, 4, 70, 150)
    grad_weights = torch.randn(weights_shape, generator=generator).to(dtype) if with_grad_weights else None
    mask_grad = kind == "float"
    out, weights, grads = native_call(query, key, value, mask, dropout_p, is_causal, scale, seed, average_heads,
                                      grad_out, grad_weights, mask_grad)
    out64, weights64, grads64 = reference_call(query, key, value, mask, dropout_p, is_causal, scale, keep,
                                               average_heads, grad_out, grad_weights)
    # bfloat16: results rounded to 8 bits, p z and ds rounded before their products (bfloat16 products), and
    # D_i = rowsum(dO * O) read from the rounded output (as torch does): a mask broadcast over keys gets a
    # gradient of ~0 from cancelling terms of size ~1 (case (2, 1, 70, 1)), off by ~2^-9 of them times 4 heads
    tolerance = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-4),
                 torch.bfloat16: dict(atol=4e-2, rtol=2e-2)}[dtype]
    torch.testing.assert_close(out.double(), out64, **tolerance)
    torch.testing.assert_close(weights.double(), weights64, **tolerance)
    assert weights.dtype == dtype and weights.shape == weights_shape
    for name, mine, truth in zip(("dq", "dk", "dv", "dmask"), grads, grads64):
        assert mine.shape == truth.shape, name
        torch.testing.assert_close(mine.double(), truth, **tolerance, msg=name)
    assert (grads[3] is None) == (not mask_grad)
    for tensor in (out, weights, *(g for g in grads if g is not None)):
        assert not torch.isnan(tensor).any()


def test_mask_gradient_is_deterministic_and_thread_count_independent():
    query, key, value = make_inputs(2, 4, 130, 140, 16)
    mask = torch.randn(4, 130, 140, generator=torch.Generator().manual_seed(2))
    seed = torch.tensor([5], dtype=torch.int64)
    grad_out = torch.randn(2, 4, 130, 16, generator=torch.Generator().manual_seed(3))
    grad_weights = torch.randn(2, 130, 140, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 1, 3):
            torch.set_num_threads(count)
            out, weights, grads = native_call(query, key, value, mask, 0.1, True, 0.25, seed, True, grad_out,
                                              grad_weights, True)
            results.append((out, weights, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for first, again in zip(results[0], other):
            assert torch.equal(first, again)


# ----------------------------------------------------------------------------------------------
# Dropout bits, opcheck, the switch


def test_keep_mask_replays_through_the_public_function():
    query, key, value = make_inputs(1, 2, 33, 40, 8)
    keep = kernel_keep_mask(query, key, 0.4, torch_seed=8)
    assert keep.shape == (1, 2, 33, 40) and 0.5 < keep.float().mean().item() < 0.7
    torch.manual_seed(8)
    seed = attention_op.draw_dropout_seed("cpu")
    assert torch.equal(keep, attention_cpu.dropout_keep_mask(query, key, 0.4, seed))


def op_arguments():
    query, key, value = make_inputs(2, 4, 10, 13, 8, 6, heads_kv=2)
    mask = torch.randn(1, 4, 10, 1)
    seed = torch.tensor([1234], dtype=torch.int64)
    return query, key, value, mask, seed


def test_opcheck_native_ops():
    query, key, value, mask, seed = op_arguments()
    ops = torch.ops.fasttf
    for arguments in ((query, key, value, None, 0.0, False, 0.3, None), (query, key, value, mask, 0.2, True, 0.3, seed),
                      (query.transpose(1, 2).contiguous().transpose(1, 2), key, value, mask > 0, 0.0, True, 0.5,
                       None)):
        torch.library.opcheck(ops.native_attention_forward.default, arguments)
    out, lse = ops.native_attention_forward(query, key, value, mask, 0.2, True, 0.3, seed)
    for average in (False, True):
        torch.library.opcheck(ops.native_attention_weights.default,
                              (query, key, lse, mask, 0.2, True, 0.3, seed, average))
        grad_weights = torch.randn((2, 10, 13) if average else (2, 4, 10, 13))
        for mask_grad in (False, True):
            torch.library.opcheck(ops.native_attention_backward.default,
                                  (torch.randn_like(out), query, key, value, out, lse, mask, 0.2, True, 0.3, seed,
                                   grad_weights, average, mask_grad))
    torch.library.opcheck(ops.native_attention_keep_mask.default, (query, key, 0.2, seed))
    for average in (False, True):
        torch.library.opcheck(ops.native_attention_forward_weights.default,
                              (query, key, value, mask, 0.2, True, 0.3, seed, average))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_forward_with_weights_in_one_kernel_matches_the_two(dtype, is_causal, average):
    """native_attention_forward_weights (need_weights=True: one Q K^T, the scores of a query block kept)
    gives what native_attention_forward then native_attention_weights give: the same keep bits, out and
    the weights within rounding (p = exp(s - m) / sum there, exp(s - lse) in the weights kernel), lse
    within rounding, +inf and zeros on a fully masked row. GQA, L != S, Ev != E, 70 query rows (two
    blocks of 64); bfloat16 in float32 where the CPU has no bfloat16 products (as the forward), else
    through the two kernels."""
    query, key, value = (t.to(dtype) for t in make_inputs(2, 4, 70, 90, 8, 6, heads_kv=2))
    mask = torch.randn(70, 90, dtype=dtype)
    mask[5] = float("-inf")
    seed = torch.tensor([99], dtype=torch.int64)
    ops = torch.ops.fasttf
    for dropout_p in (0.0, 0.3):
        args = (query, key, value, mask, dropout_p, is_causal, 0.3, seed)
        out, lse, weights = ops.native_attention_forward_weights(*args, average)
        out2, lse2 = ops.native_attention_forward(*args)
        weights2 = ops.native_attention_weights(query, key, lse2, *args[3:], average)
        assert out.stride() == out2.stride() and out.dtype == out2.dtype == dtype
        for mine, theirs in ((out, out2), (lse, lse2), (weights, weights2)):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
            tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7}[mine.dtype]
            torch.testing.assert_close(mine.double(), theirs.double(), rtol=tolerance, atol=min(tolerance, 1e-5))
        assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5])) and torch.isinf(lse[:, :, 5]).all()
        if dtype != torch.bfloat16:  # the one kernel ran, not the two: its out rounds otherwise somewhere
            assert not torch.equal(out, out2)


def test_native_ran(monkeypatch):
    """The public function's Python path runs the C++ kernel, handing it the caller's mask (never expanded
    or copied); its C++ entry for the common call does the same (test_attention_fast_path.py)."""
    monkeypatch.setattr(attention_op, "_native_sdpa_or_none", None)
    calls = []
    forward = attention_cpu.attention_forward
    monkeypatch.setattr(attention_cpu, "attention_forward", lambda *args: calls.append(args) or forward(*args))
    query, key, value = make_inputs(2, 3, 9, 11, 8)
    mask = torch.randn(11)
    fasttf.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert len(calls) == 1 and calls[0][3] is mask


def test_bad_switch_value_raises(monkeypatch):
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "cuda")
    query, key, value = make_inputs(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="FASTTF_CPU_ATTENTION"):
        fasttf.scaled_dot_product_attention(query, key, value)


def test_switch_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    query, key, value = make_inputs(1, 1, 3, 3, 4)
    fasttf.scaled_dot_product_attention(query, key, value)  # native
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fasttf.scaled_dot_product_attention(query, key, value)
    monkeypatch.delenv("FASTTF_CPU_ATTENTION")
    fasttf.scaled_dot_product_attention(query, key, value)


def test_dropout_trains_without_interpreter_under_strict(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    query, key, value = (t.requires_grad_() for t in make_inputs(2, 2, 30, 30, 8))
    fasttf.scaled_dot_product_attention(query, key, value, dropout_p=0.1, is_causal=True).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (query, key, value))


def test_learned_bias_gets_its_gradient_from_the_native_kernel():
    query, key, value = (t.requires_grad_() for t in make_inputs(2, 3, 20, 30, 8))
    bias = torch.randn(3, 20, 30, requires_grad=True)
    fasttf.scaled_dot_product_attention(query, key, value, bias, is_causal=True).square().sum().backward()
    inputs64 = [t.detach().double().requires_grad_() for t in (query, key, value, bias)]
    reference.scaled_dot_product_attention(*inputs64[:3], inputs64[3], is_causal=True).square().sum().backward()
    for mine, truth in zip((query, key, value, bias), inputs64):
        torch.testing.assert_close(mine.grad.double(), truth.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cpu_kernel", ["native", "triton"])
def test_eager_calls_skip_the_custom_ops_and_match_them(monkeypatch, cpu_kernel):
    # in eager mode the kernels are called directly (fasttf::attention_forward / _backward's autograd,
    # redispatch and dynamo layers serve torch.compile): the same kernels, so the same bits -- the
    # output without a gradient to track, and with one the output and every gradient, a learned mask's too
    if cpu_kernel == "triton" and not kernels.INTERPRET:
        pytest.skip("the Triton kernel on the CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", cpu_kernel)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator, requires_grad=True) for _ in range(3))
    mask = torch.randn(5, 5, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 3, 5, 8, generator=generator)
    out_op, _ = torch.ops.fasttf.attention_forward(q, k, v, mask, 0.0, False, 8 ** -0.5, None)
    grads_op = torch.autograd.grad(out_op, (q, k, v, mask), grad_out)
    custom_op_calls = []
    for name in ("attention_forward", "attention_backward"):
        real_op = getattr(attention_op, name)
        monkeypatch.setattr(attention_op, name,
                            lambda *args, real_op=real_op: custom_op_calls.append(args) or real_op(*args))
    with torch.no_grad():
        assert torch.equal(fasttf.scaled_dot_product_attention(q, k, v, attn_mask=mask), out_op)
    assert torch.equal(fasttf.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask.detach()),
                       out_op)
    out = fasttf.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # the C++ kernel's autograd is C++ (csrc/autograd.cpp); the Triton kernel's an autograd.Function
    assert ("NativeAttention" in out.grad_fn.name()) == (cpu_kernel == "native")
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out)
    assert custom_op_calls == []
    assert torch.equal(out, out_op)
    for grad, grad_op in zip(grads, grads_op, strict=True):
        assert torch.equal(grad, grad_op)


def test_weights_without_a_graph_skip_the_autograd_function(monkeypatch):
    """Inference asking for the weights (nn.MultiheadAttention's default need_weights=True) runs the
    kernel directly, ~30 us a call less; a call that records a graph goes through the Function."""
    query, key, value = make_inputs(1, 2, 5, 7, 8)
    expected = attention_op.attention_with_weights(query, key, value)
    applied = []
    apply = attention_op._AttentionWithWeights.apply
    monkeypatch.setattr(attention_op._AttentionWithWeights, "apply", lambda *args: applied.append(1) or apply(*args))
    with torch.no_grad():
        out, weights = attention_op.attention_with_weights(query, key, value)
    assert applied == [] and torch.equal(out, expected[0]) and torch.equal(weights, expected[1])
    attention_op.attention_with_weights(query.requires_grad_(), key, value)
    assert applied == [1]
