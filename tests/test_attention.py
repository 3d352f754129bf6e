"""fasttf.scaled_dot_product_attention (Triton FlashAttention-2) against fasttf.reference in float64.

Every case runs the kernel (strict mode: a fallback would raise) in float32 on the CPU under the
Triton interpreter (CUDA too when there is a GPU, in float16 and bfloat16 as well) and checks the
output and the three gradients with the accuracy rule of DESIGN.md: error vs float64 at most
2x torch's own SDPA error in the same dtype, plus a small floor. Shapes are tiny: the interpreter
is slow per program, and the kernels use 16 x 16 blocks under it, so lengths of 17..70 exercise
several blocks, partial blocks and the causal diagonal.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fasttf
from fasttf import reference
from fasttf import _fallback as fallback
from fasttf._fallback import FallbackError
from fasttf.kernels import attention as kernels
from fasttf.ops import attention as attention_op
from fasttf.testing import assert_close_to_reference

from conftest import devices

pytestmark = pytest.mark.skipif(not (kernels.INTERPRET or torch.cuda.is_available()),
                                reason="needs a GPU or TRITON_INTERPRET=1 (make test sets it)")

# the CPU runs the kernels only under the interpreter (float32: numpy has no bfloat16 tl.dot)
DEVICE_DTYPES = ([("cpu", torch.float32)] if kernels.INTERPRET else []) + \
    [("cuda", dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32) if "cuda" in devices()]


def use_triton_kernel(monkeypatch):
    """The Triton kernel for this test (it checks what the Triton launcher saw, or its fallbacks)."""
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")


def make_inputs(batch, heads, length_q, length_k, head_dim, value_dim=None, heads_kv=None, device=None,
                dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value_dim = head_dim if value_dim is None else value_dim
    heads_kv = heads if heads_kv is None else heads_kv
    lead = (batch,) if batch is not None else ()

    def rand(*shape):
        return torch.randn(*lead, *shape, generator=generator).to(device=device, dtype=dtype)

    return rand(heads, length_q, head_dim), rand(heads_kv, length_k, head_dim), rand(heads_kv, length_k, value_dim)


def torch_style_mask(attn_mask, is_causal, query, key):
    """The same masking in a form torch's SDPA takes: it trips on a 1-D mask on the CPU (so: an
    expanded view) and refuses a mask together with is_causal (so: causal folded into the mask)."""
    if attn_mask is None:
        return None, is_causal
    attn_mask = attn_mask.expand(*query.shape[:-1], key.size(-2))
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        attn_mask = attn_mask & causal if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~causal, -math.inf)
    return attn_mask, False


def check_against_reference(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                            dropout_p=0.0, dropout_mask=None, run=None):
    """The kernel's output and gradients vs float64 reference, judged against torch's SDPA error."""
    generator = torch.Generator().manual_seed(1)
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]  # same storage and strides
    run = run or (lambda q, k, v: fasttf.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa))
    out = run(*inputs)
    grad_out = torch.randn(out.shape, generator=generator).to(out)
    out.backward(grad_out)

    inputs64 = [t.detach().double().requires_grad_() for t in (query, key, value)]
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.dtype != torch.bool else attn_mask
    out64 = reference.scaled_dot_product_attention(*inputs64, mask64, dropout_p, is_causal, scale, enable_gqa,
                                                   dropout_mask=dropout_mask)
    out64.backward(grad_out.double())

    baseline_inputs = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    if dropout_p > 0.0:  # torch cannot replay a given dropout mask: its error is the reference's in dtype
        baseline = reference.scaled_dot_product_attention(*baseline_inputs, attn_mask, dropout_p, is_causal,
                                                          scale, enable_gqa, dropout_mask=dropout_mask)
    else:
        torch_mask, torch_causal = torch_style_mask(attn_mask, is_causal, query, key)
        baseline = F.scaled_dot_product_attention(*baseline_inputs, attn_mask=torch_mask, is_causal=torch_causal,
                                                  scale=scale, enable_gqa=enable_gqa)
    baseline.backward(grad_out)

    assert_close_to_reference(out, out64, baseline, "output")
    for name, mine, truth, theirs in zip(("grad query", "grad key", "grad value"), inputs, inputs64,
                                         baseline_inputs):
        assert_close_to_reference(mine.grad, truth.grad, theirs.grad, name)
    return out, inputs


# ----------------------------------------------------------------------------------------------
# Shapes: lengths around and across the 16-row blocks, L != S, L = 1, head dims 1..256, Ev != E

SHAPES = [  # (N, H, L, S, E, Ev)
    (1, 1, 1, 1, 1, 1),
    (1, 1, 1, 37, 8, 8),      # decoding: one query
    (2, 3, 17, 33, 24, 24),   # several blocks, partial last ones, E not a power of two
    (1, 2, 33, 16, 16, 16),   # L > S
    (1, 1, 16, 32, 16, 16),   # exact multiples of the block
    (1, 1, 70, 70, 64, 64),
    (1, 2, 9, 5, 100, 100),
    (1, 1, 18, 20, 256, 256),
    (1, 2, 20, 19, 8, 40),    # value head dim != query head dim
    (2, 1, 21, 3, 40, 1),
]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_against_reference(shape, is_causal, device, dtype, attention_backend):
    batch, heads, length_q, length_k, head_dim, value_dim = shape
    query, key, value = make_inputs(batch, heads, length_q, length_k, head_dim, value_dim, device=device,
                                    dtype=dtype)
    check_against_reference(query, key, value, is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_inputs_without_batch_dim(is_causal, attention_backend):
    query, key, value = make_inputs(None, 3, 19, 23, 8)
    out, _ = check_against_reference(query, key, value, is_causal=is_causal)
    assert out.shape == (3, 19, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_half_precision(dtype, is_causal, attention_backend):
    query, key, value = make_inputs(2, 2, 20, 25, 16, dtype=dtype)
    check_against_reference(query, key, value, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_masks_and_gqa(dtype, attention_backend):
    query, key, value = make_inputs(1, 4, 19, 33, 24, 8, heads_kv=2, dtype=dtype)
    generator = torch.Generator().manual_seed(5)
    float_mask = torch.randn(1, 4, 1, 33, generator=generator).to(dtype)
    check_against_reference(query, key, value, attn_mask=float_mask, enable_gqa=True)
    check_against_reference(query, key, value, attn_mask=torch.rand(19, 33, generator=generator) > 0.3,
                            is_causal=True, enable_gqa=True)


def test_scale(attention_backend):
    query, key, value = make_inputs(1, 2, 17, 18, 8)
    check_against_reference(query, key, value, scale=0.9)
    check_against_reference(query, key, value, scale=0.05, is_causal=True)


# ----------------------------------------------------------------------------------------------
# Masks: bool and float, every broadcast shape, combined with causal; rows with no key left

MASK_SHAPES = [(19, 23), (23,), (1, 23), (2, 1, 1, 23), (3, 19, 1), (2, 3, 19, 23), (1, 3, 1, 23)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_broadcast(mask_shape, kind, is_causal, attention_backend):
    query, key, value = make_inputs(2, 3, 19, 23, 8)
    generator = torch.Generator().manual_seed(7)
    if kind == "bool":
        mask = torch.rand(mask_shape, generator=generator) > 0.3
    else:
        mask = torch.randn(mask_shape, generator=generator)
    check_against_reference(query, key, value, attn_mask=mask, is_causal=is_causal)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_output_is_laid_out_as_torch_flash_lays_it_out(attention_backend, dtype):
    # (N, H, L, Ev) laid out (N, L, H, Ev), as torch's flash kernels return it: merging the heads (what
    # an attention module does next) is a view; the same strides with and without a gradient, and in
    # the fake (meta) kernel that torch.compile plans with
    query, key, value = make_inputs(2, 3, 5, 7, 8, 4, dtype=dtype)
    for requires_grad in (False, True):
        out = fasttf.scaled_dot_product_attention(query.requires_grad_(requires_grad), key, value)
        assert out.shape == (2, 3, 5, 4) and out.stride() == (60, 4, 12, 1)
        out.transpose(1, 2).view(2, 5, 12)  # a view: raises if it needed a copy
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fake = [mode.from_tensor(tensor) for tensor in (query.detach(), key, value)]
    with mode:
        out, _ = torch.ops.fasttf.attention_forward(*fake, None, 0.0, False, 0.5, None)
        assert out.stride() == (60, 4, 12, 1)


def test_mask_is_read_through_broadcast_strides_not_copied(monkeypatch):
    """The kernel gets a stride-0 view of the caller's mask: same storage, nothing expanded."""
    use_triton_kernel(monkeypatch)
    query, key, value = make_inputs(2, 3, 19, 23, 8)
    mask = torch.randn(1, 1, 19, 23)
    seen = {}
    launch = kernels.attention_forward

    def spy(q, k, v, expanded_mask, *args):
        seen["mask"] = expanded_mask
        return launch(q, k, v, expanded_mask, *args)

    monkeypatch.setattr(kernels, "attention_forward", spy)
    fasttf.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert seen["mask"].shape == (2, 3, 19, 23)
    assert seen["mask"].data_ptr() == mask.data_ptr()
    assert seen["mask"].stride()[:2] == (0, 0)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_output_and_zero_grads(kind, is_causal, attention_backend):
    query, key, value = make_inputs(1, 2, 20, 21, 8)
    allowed = torch.rand(20, 21, generator=torch.Generator().manual_seed(3)) > 0.5
    allowed[[0, 5, 17]] = False  # rows with no key at all, in the first and the second block
    mask = allowed if kind == "bool" else torch.zeros(20, 21).masked_fill(~allowed, float("-inf"))
    out, inputs = check_against_reference(query, key, value, attn_mask=mask, is_causal=is_causal)
    for row in (0, 5, 17):
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        assert torch.equal(inputs[0].grad[:, :, row], torch.zeros_like(inputs[0].grad[:, :, row]))
    for tensor in (out, *(t.grad for t in inputs)):
        assert not torch.isnan(tensor).any()


def test_causal_with_mask_that_empties_a_whole_block_of_rows(attention_backend):
    query, key, value = make_inputs(1, 1, 40, 40, 16)
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[16:32, :] = False  # one whole query block masked: lse = +inf for all its rows
    mask[:, 20:] = False    # and the keys of the last blocks for everyone
    check_against_reference(query, key, value, attn_mask=mask, is_causal=True)


# ----------------------------------------------------------------------------------------------
# Strides: the views multi-head attention makes, and GQA without repeating K/V


def test_non_contiguous_views_as_multihead_attention_makes(monkeypatch):
    use_triton_kernel(monkeypatch)
    batch, length, heads, head_dim = 2, 21, 3, 8
    generator = torch.Generator().manual_seed(0)
    packed = torch.randn(length, batch, 3 * heads * head_dim, generator=generator)  # (L, N, 3 D) in-projection

    def split_heads(x):  # (L, N, D) -> (N, H, L, head_dim): a permuted view, not a copy
        return x.view(length, batch, heads, head_dim).permute(1, 2, 0, 3)

    query, key, value = (split_heads(part) for part in packed.chunk(3, dim=-1))
    assert not query.is_contiguous()
    seen = []
    launch = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda q, k, v, *args: seen.append((q, k, v)) or
                        launch(q, k, v, *args))
    fasttf.scaled_dot_product_attention(query, key, value)
    for given, passed in zip((query, key, value), seen[0]):  # the kernel read the views themselves
        assert passed.data_ptr() == given.data_ptr() and passed.stride() == given.stride()
    check_against_reference(query, key, value)
    check_against_reference(query, key, value, is_causal=True)
    transposed_mask = (torch.rand(length, length, generator=generator) > 0.3).t()
    check_against_reference(query, key, value, attn_mask=transposed_mask)


@pytest.mark.parametrize("heads,heads_kv", [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_grouped_query_attention(heads, heads_kv, is_causal, attention_backend):
    query, key, value = make_inputs(2, heads, 18, 35, 16, 8, heads_kv=heads_kv)
    mask = torch.rand(2, heads, 18, 35, generator=torch.Generator().manual_seed(2)) > 0.2
    check_against_reference(query, key, value, is_causal=is_causal, enable_gqa=True)
    check_against_reference(query, key, value, attn_mask=mask, enable_gqa=True)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only sets the kernel
@given(batch=st.integers(1, 2), heads_kv=st.integers(1, 2), group=st.integers(1, 2),
       length_q=st.integers(1, 40), length_k=st.integers(1, 40), head_dim=st.sampled_from([1, 8, 16, 24, 64]),
       value_dim=st.sampled_from([4, 16, 33]), is_causal=st.booleans(),
       mask=st.sampled_from(["none", "bool", "float"]), transpose=st.booleans())
def test_random_configurations(batch, heads_kv, group, length_q, length_k, head_dim, value_dim, is_causal, mask,
                               transpose, attention_backend):
    heads = heads_kv * group
    query, key, value = make_inputs(batch, heads, length_q, length_k, head_dim, value_dim, heads_kv=heads_kv)
    if transpose:  # the same values stored (N, L, H, E): strided views
        query, key, value = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    generator = torch.Generator().manual_seed(length_q * 41 + length_k)
    attn_mask = {"none": None, "bool": torch.rand(length_q, length_k, generator=generator) > 0.4,
                 "float": torch.randn(batch, 1, length_q, length_k, generator=generator)}[mask]
    check_against_reference(query, key, value, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=group > 1)


# ----------------------------------------------------------------------------------------------
# Dropout inside the kernel: replayable mask, right fraction, repeatable under torch.manual_seed


def run_with_dropout(query, key, value, dropout_p, torch_seed, **kwargs):
    torch.manual_seed(torch_seed)
    return fasttf.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, **kwargs)


def kernel_keep_mask(query, key, dropout_p, torch_seed):
    torch.manual_seed(torch_seed)
    seed = attention_op.draw_dropout_seed(query.device)
    return attention_op.dropout_keep_mask(query, key, dropout_p, seed)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_replays_in_the_reference(is_causal, attention_backend):
    query, key, value = make_inputs(2, 2, 19, 37, 8, 16, heads_kv=1)
    dropout_p = 0.3
    keep = kernel_keep_mask(query, key, dropout_p, torch_seed=11)
    assert keep.shape == (2, 2, 19, 37) and keep.dtype == torch.bool
    mask = torch.rand(19, 37, generator=torch.Generator().manual_seed(4)) > 0.2
    check_against_reference(
        query, key, value, attn_mask=mask, is_causal=is_causal, enable_gqa=True, dropout_p=dropout_p,
        dropout_mask=keep, run=lambda q, k, v: run_with_dropout(q, k, v, dropout_p, 11, attn_mask=mask,
                                                                is_causal=is_causal, enable_gqa=True))


def test_dropout_without_batch_dim_replays(attention_backend):
    query, key, value = make_inputs(None, 2, 17, 18, 8)
    keep = kernel_keep_mask(query, key, 0.5, torch_seed=3)
    assert keep.shape == (2, 17, 18)
    check_against_reference(query, key, value, dropout_p=0.5, dropout_mask=keep,
                            run=lambda q, k, v: run_with_dropout(q, k, v, 0.5, 3))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keeps_the_right_fraction(dropout_p, attention_backend):
    query, key, _ = make_inputs(2, 4, 64, 64, 1)
    keep = kernel_keep_mask(query, key, dropout_p, torch_seed=int(dropout_p * 100))
    count = keep.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / count)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 5 * sigma
    # no structure across rows/columns: each row's and column's kept fraction near 1 - p as well
    for means in (keep.float().mean(dim=-1), keep.float().mean(dim=-2)):
        row_sigma = math.sqrt(dropout_p * (1 - dropout_p) / 64)
        assert (means - (1 - dropout_p)).abs().max().item() < 6 * row_sigma


def test_dropout_repeats_under_manual_seed_and_changes_without(attention_backend):
    query, key, value = make_inputs(1, 2, 20, 20, 8)
    first = run_with_dropout(query, key, value, 0.4, torch_seed=5)
    again = run_with_dropout(query, key, value, 0.4, torch_seed=5)
    other = run_with_dropout(query, key, value, 0.4, torch_seed=6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(kernel_keep_mask(query, key, 0.4, 5), kernel_keep_mask(query, key, 0.4, 6))


def test_dropout_one_drops_everything(attention_backend):
    query, key, value = make_inputs(1, 1, 5, 6, 8)
    out = run_with_dropout(query, key, value, 1.0, torch_seed=0)
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# Where it runs: strict mode proves the kernel ran; other dtypes and head dims fall back


def test_float64_falls_back_to_the_reference(monkeypatch):
    use_triton_kernel(monkeypatch)
    query, key, value = make_inputs(1, 2, 5, 6, 8, dtype=torch.float64)
    with pytest.raises(FallbackError, match="dtype"):
        fasttf.scaled_dot_product_attention(query, key, value)


def test_float64_without_strict_matches_reference(monkeypatch):
    use_triton_kernel(monkeypatch)
    monkeypatch.delenv("FASTTF_STRICT")
    monkeypatch.setattr(fallback, "_warned", set())  # each warning once per process: reset
    query, key, value = make_inputs(1, 2, 5, 6, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="dtype"):
        out = fasttf.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(query, key, value, is_causal=True))


def test_cpu_triton_without_interpreter_raises(monkeypatch):
    """FASTTF_CPU_ATTENTION=triton on CPU tensors needs the interpreter: a clear error, no silent fallback."""
    use_triton_kernel(monkeypatch)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.delenv("FASTTF_STRICT")
    query, key, value = make_inputs(1, 2, 5, 6, 8, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fasttf.scaled_dot_product_attention(query, key, value)


def test_head_dim_above_256_falls_back(monkeypatch):
    use_triton_kernel(monkeypatch)
    query, key, value = make_inputs(1, 1, 3, 4, 300)
    with pytest.raises(FallbackError, match="head dim"):
        fasttf.scaled_dot_product_attention(query, key, value)


# ----------------------------------------------------------------------------------------------
# Bad input: torch's error type (RuntimeError), naming the argument


def bad_inputs():
    # (name, the bad arguments made from good (q, k, v), words the message must hold, whether torch's
    # SDPA refuses it too: its CPU math path broadcasts batch sizes and ranks that fasttf refuses as
    # mistakes, and its CUDA kernels do not check dropout_p)
    def ones(q, *shape, dtype):
        return torch.ones(*shape, dtype=dtype, device=q.device)

    return [
        ("rank", lambda q, k, v: dict(query=q[0, 0], key=k[0, 0], value=v[0, 0]), "4-D", False),
        ("mixed rank", lambda q, k, v: dict(query=q, key=k[0], value=v[0]), "key 3-D", False),
        ("batch", lambda q, k, v: dict(key=k[:1], value=v[:1]), "batch", False),
        ("heads", lambda q, k, v: dict(key=k[:, :3], value=v[:, :3]), "heads", True),
        ("value heads", lambda q, k, v: dict(value=v[:, :2], enable_gqa=True), "value", False),
        ("gqa not a multiple", lambda q, k, v: dict(key=k[:, :3], value=v[:, :3], enable_gqa=True), "multiple", True),
        ("head dim", lambda q, k, v: dict(key=k[..., :7]), "head dim", True),
        ("value length", lambda q, k, v: dict(value=v[:, :, :5]), "value", False),
        ("dtype", lambda q, k, v: dict(key=k.double()), "dtype", True),
        ("int mask", lambda q, k, v: dict(attn_mask=ones(q, 5, 6, dtype=torch.int64)), "attn_mask", True),
        ("float64 mask", lambda q, k, v: dict(attn_mask=ones(q, 5, 6, dtype=torch.float64)), "attn_mask", True),
        ("mask shape", lambda q, k, v: dict(attn_mask=ones(q, 5, 7, dtype=torch.bool)), "attn_mask", True),
        ("mask rank", lambda q, k, v: dict(attn_mask=ones(q, 1, 2, 4, 5, 6, dtype=torch.bool)), "attn_mask", True),
        ("dropout_p", lambda q, k, v: dict(dropout_p=1.5), "dropout_p", "cpu"),
        ("meta device", lambda q, k, v: dict(key=k.to("meta")), "device", False),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda case: case[0])
def test_bad_input_raises_like_torch(case):
    _, make_bad, words, torch_refuses = case
    query, key, value = make_inputs(2, 4, 5, 6, 8)
    arguments = dict(query=query, key=key, value=value) | make_bad(query, key, value)
    with pytest.raises(RuntimeError, match=words):
        fasttf.scaled_dot_product_attention(**arguments)
    if torch_refuses is True or torch_refuses == query.device.type:
        with pytest.raises(RuntimeError):  # torch refuses the same input
            F.scaled_dot_product_attention(**arguments)


def test_non_tensor_raises_type_error():
    query, key, value = make_inputs(1, 1, 2, 2, 4)
    with pytest.raises(TypeError, match="key"):
        fasttf.scaled_dot_product_attention(query, key.tolist(), value)


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def op_arguments():
    query, key, value = make_inputs(2, 4, 10, 13, 8, 6, heads_kv=2)
    mask = torch.randn(10, 13)
    seed = torch.tensor([1234], dtype=torch.int64)
    return [
        (query, key, value, None, 0.0, False, 0.3, None),
        (query, key, value, mask, 0.2, True, 0.3, seed),
        (query.transpose(1, 2).contiguous().transpose(1, 2), key, value, mask > 0, 0.0, True, 0.5, None),
    ]


@pytest.mark.parametrize("index", range(3))
def test_opcheck_forward(index, attention_backend):
    arguments = op_arguments()[index]
    arguments = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.dtype == torch.float32
                      and a.dim() == 4 else a for a in arguments)
    torch.library.opcheck(torch.ops.fasttf.attention_forward.default, arguments)


def test_opcheck_backward(attention_backend):
    query, key, value, mask, dropout_p, is_causal, scale, seed = op_arguments()[1]
    out, lse = torch.ops.fasttf.attention_forward(query, key, value, mask, dropout_p, is_causal, scale, seed)
    torch.library.opcheck(torch.ops.fasttf.attention_backward.default,
                          (torch.randn_like(out), query, key, value, out, lse, mask, dropout_p, is_causal, scale,
                           seed, None, False, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, attention_backend):
    query, key, value = make_inputs(2, 2, 17, 20, 8)
    mask = torch.rand(17, 20, generator=torch.Generator().manual_seed(0)) > 0.2

    def attend(q, k, v):
        return fasttf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)

    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    check_against_reference(query, key, value, attn_mask=mask, is_causal=True, run=compiled)


def test_torch_compile_with_dropout_replays(attention_backend):
    query, key, value = make_inputs(1, 2, 17, 20, 8)

    def attend(q, k, v):
        return fasttf.scaled_dot_product_attention(q, k, v, dropout_p=0.25)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    keep = kernel_keep_mask(query, key, 0.25, torch_seed=9)
    torch.manual_seed(9)
    out = compiled(query, key, value)
    expected = reference.scaled_dot_product_attention(query.double(), key.double(), value.double(), dropout_p=0.25,
                                                      dropout_mask=keep)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
