"""fasttf.residual_add with and without dropout: against fasttf.reference (float64) and the eager
`residual + F.dropout(x, p)` math with the same keep-mask, the mask's replay from its seed in the
backward, its statistics, and its repeatability under torch.manual_seed."""

import pytest
import torch

import fasttf
from fasttf import reference
from fasttf.ops.residual import dropout_keep_mask
from fasttf.testing import assert_close_to_reference
from conftest import devices, run_with_seed

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(7,), (3, 33), (2, 5, 64), (4, 3, 129)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_and_backward_against_reference_and_eager(device, dtype, shape, dropout_p):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    out, seed = run_with_seed(lambda: fasttf.residual_add(x, residual, dropout_p=dropout_p), 5)
    mask = dropout_keep_mask(x, dropout_p, seed) if dropout_p else None
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, residual))
    out64 = reference.residual_add(x64, r64, dropout_p=dropout_p, dropout_mask=mask)
    xe, re = (t.detach().clone().requires_grad_() for t in (x, residual))
    oute = re + (xe * mask * (1.0 / (1.0 - dropout_p)) if dropout_p else xe)  # what F.dropout computes
    assert_close_to_reference(out, out64, oute, "out")
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out, oute, rtol=0, atol=0)  # the same math, bit for bit
    dy = torch.randn_like(out)
    out.backward(dy)
    out64.backward(dy.double())
    oute.backward(dy)
    assert_close_to_reference(x.grad, x64.grad, xe.grad, "dx")
    assert_close_to_reference(residual.grad, r64.grad, re.grad, "dresidual")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [5, 8, 67, 1031])
def test_16_bit_sums_round_like_eager_bit_for_bit(dtype, length):
    """Without dropout the sum is eager's `residual + x`: float32 math, rounded to nearest even, in every
    lane of the vector body and the scalar tail (lengths off the 8/16-lane vectors), including ties, the
    overflow to inf, subnormal results, inf - inf and NaN. (csrc/cpu/row_math.cpp converts 16-bit values
    differently per vector width; test_cpu_isa_fallbacks.py runs this at each.)"""
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(length, generator=generator).to(dtype)
    residual = torch.randn(length, generator=generator).to(dtype)
    info = torch.finfo(dtype)
    ulp_half = info.eps / 2  # half an ulp of 1: 1 + it is a tie, rounded down to 1 (even)
    pairs = [(1.0, ulp_half), (1.0 + 2 * ulp_half, ulp_half), (-1.0, -ulp_half), (info.max, info.max),
             (info.tiny, -info.tiny / 2), (info.tiny / 4, info.tiny / 8), (float("inf"), float("-inf")),
             (float("nan"), 1.0), (float("-inf"), 3.0), (0.0, -0.0)]
    for index, (a, b) in enumerate(pairs[:length]):
        x[index * 7 % length], residual[index * 7 % length] = a, b
    out = fasttf.residual_add(x, residual)
    expected = residual + x
    assert out.dtype == dtype
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


@pytest.mark.parametrize("device", devices())
def test_eval_mode_and_zero_p_skip_dropout(device):
    x, residual = torch.randn(4, 10, device=device), torch.randn(4, 10, device=device)
    torch.testing.assert_close(fasttf.residual_add(x, residual, dropout_p=0.5, training=False), residual + x,
                               rtol=0, atol=0)
    torch.testing.assert_close(fasttf.residual_add(x, residual), residual + x, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(device):
    torch.manual_seed(1)
    x = torch.randn(6, 8, 5, device=device).transpose(0, 2)
    residual = torch.randn(5, 8, 12, device=device)[:, :, ::2].contiguous()[:, :, :6]
    out, seed = run_with_seed(lambda: fasttf.residual_add(x, residual, dropout_p=0.2), 9)
    mask = dropout_keep_mask(x, 0.2, seed)
    expected = reference.residual_add(x.double(), residual.double(), dropout_p=0.2, dropout_mask=mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_repeatable_under_manual_seed_and_fresh_otherwise():
    x, residual = torch.randn(64, 64), torch.zeros(64, 64)
    torch.manual_seed(123)
    first = fasttf.residual_add(x, residual, dropout_p=0.5)
    second = fasttf.residual_add(x, residual, dropout_p=0.5)
    torch.manual_seed(123)
    again = fasttf.residual_add(x, residual, dropout_p=0.5)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_kept_fraction_and_independence(dropout_p):
    n = 400_000
    mask = dropout_keep_mask(torch.empty(n), dropout_p, torch.tensor(987654321987))
    kept = mask.double().mean().item()
    sigma = ((1 - dropout_p) * dropout_p / n) ** 0.5
    assert abs(kept - (1 - dropout_p)) < 5 * sigma, (kept, 1 - dropout_p)
    # neighbours (inside one Philox block and across blocks) are uncorrelated
    m = mask.double() - mask.double().mean()
    for lag in (1, 2, 3, 4, 5, 512):
        corr = (m[:-lag] * m[lag:]).mean() / m.var()
        assert abs(corr.item()) < 5 / n ** 0.5, (lag, corr.item())
    # a different seed gives a different mask, the same seed the same
    other = dropout_keep_mask(torch.empty(n), dropout_p, torch.tensor(987654321988))
    assert (mask != other).double().mean().item() > dropout_p * (1 - dropout_p)
    assert torch.equal(mask, dropout_keep_mask(torch.empty(n), dropout_p, torch.tensor(987654321987)))


def test_mask_depends_only_on_seed_and_index():
    seed = torch.tensor(42)
    whole = dropout_keep_mask(torch.empty(10, 100), 0.4, seed)
    assert torch.equal(whole.flatten(), dropout_keep_mask(torch.empty(1000), 0.4, seed))


def test_gradcheck_float64():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(77)
    op = torch.ops.fasttf.residual_add
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, 0.4, seed), (x, residual))
    assert torch.autograd.gradcheck(lambda a, b: fasttf.residual_add(a, b), (x, residual))


def test_opcheck():
    x, residual = torch.randn(3, 33, requires_grad=True), torch.randn(3, 33, requires_grad=True)
    seed = torch.tensor(5)
    ops = torch.ops.fasttf
    torch.library.opcheck(ops.residual_add.default, (x, residual, 0.0, None))
    torch.library.opcheck(ops.residual_add.default, (x, residual, 0.25, seed))
    torch.library.opcheck(ops.residual_add_backward.default, (torch.randn(4, 9), 0.25, seed))
    torch.library.opcheck(ops.dropout_keep_mask.default, (torch.randn(4, 9), 0.25, seed))


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5])
def test_dropout_p_outside_range(dropout_p):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="dropout_p in \\[0, 1\\)"):
        fasttf.residual_add(x, x, dropout_p=dropout_p)
    with pytest.raises(ValueError, match="dropout_p in \\[0, 1\\)"):  # in eval mode too, where nothing drops
        fasttf.residual_add(x, x, dropout_p=dropout_p, training=False)
    with pytest.raises(ValueError, match="dropout_p in \\[0, 1\\)"):  # the C++ check
        torch.ops.fasttf.residual_add(x, x, dropout_p, torch.tensor(1))


@pytest.mark.parametrize("x, residual, match", [
    (torch.randn(3, 4), torch.randn(3, 5), "residual to have the shape of x"),
    (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), "residual to have the dtype of x"),
    (torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64), "x to be float32"),
    (torch.randn(3, 4), torch.randn(3, 4, device="meta"), "residual is on meta"),
])
def test_bad_input_names_the_argument(x, residual, match):
    with pytest.raises(RuntimeError, match=match):
        fasttf.residual_add(x, residual)


def test_cpp_refuses_a_bad_seed():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.fasttf.residual_add(x, x, 0.5, None)
    with pytest.raises(ValueError, match="seed to be a 0-dim int64 CPU tensor"):
        torch.ops.fasttf.residual_add(x, x, 0.5, torch.tensor([1, 2]))


def test_the_op_entries_refuse_two_devices_too():
    # one argument on meta makes the dispatcher pick the op's Meta (fake) kernel, which must check too
    x, on_meta = torch.randn(3, 4), torch.randn(3, 4, device="meta")
    with pytest.raises(RuntimeError, match="x is on cpu and residual is on meta"):
        torch.ops.fasttf.residual_add(x, on_meta, 0.0, None)
    with pytest.raises(RuntimeError, match="x is on cpu and weight is on meta"):
        torch.ops.fasttf.add_layer_norm(x, x, torch.randn(4, device="meta"), None, 1e-5, 0.0, None)
    with pytest.raises(RuntimeError, match="x is on cpu and offset is on meta"):
        torch.ops.fasttf.positional_encoding(x, torch.tensor([1, 2, 3], device="meta"), 0, 1.0, 1e4, True)
