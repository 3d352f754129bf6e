"""fasttf.dropout against fasttf.reference (float64) and eager `x * keep / (1 - p)` with the same
keep-mask, torch.nn.functional.dropout's semantics at the edges (eval mode, p = 0 and 1, inplace,
bad p), the mask's statistics and replay, gradients, and the torch.library op."""

import math

import pytest
import torch
import torch.nn.functional as F

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
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_forward_and_backward_against_reference_and_eager(device, dtype, shape, p):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    out, seed = run_with_seed(lambda: fasttf.dropout(x, p), 5)
    keep = dropout_keep_mask(x, p, seed)
    x64 = x.detach().double().requires_grad_()
    out64 = reference.dropout(x64, p, dropout_mask=keep)
    xe = x.detach().clone().requires_grad_()
    oute = xe * keep * (1.0 / (1.0 - p))  # what F.dropout computes with this mask
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, out64, oute, "out")
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out, oute, rtol=0, atol=0)  # the same math, bit for bit
    assert torch.equal(out == 0, ~keep | (x == 0))
    dy = torch.randn_like(out)
    out.backward(dy)
    out64.backward(dy.double())
    oute.backward(dy)
    assert_close_to_reference(x.grad, x64.grad, xe.grad, "dinput")


def test_non_contiguous_input_draws_by_its_logical_order():
    torch.manual_seed(0)
    x = torch.randn(6, 10).t()  # (10, 6), strides (1, 10)
    out, seed = run_with_seed(lambda: fasttf.dropout(x, 0.3), 2)
    keep = dropout_keep_mask(x, 0.3, seed)
    torch.testing.assert_close(out, x * keep * (1.0 / 0.7), rtol=0, atol=0)


def test_the_mask_is_residual_adds():
    """One Philox stream for every fasttf dropout: the same seed keeps the same elements."""
    x = torch.randn(5, 77)
    seed = torch.tensor(123456789)
    out = torch.ops.fasttf.dropout(x, 0.35, seed)
    torch.testing.assert_close(out, torch.ops.fasttf.residual_add(x, torch.zeros_like(x), 0.35, seed), rtol=0, atol=0)
    torch.testing.assert_close(out, torch.ops.fasttf.residual_add_backward(x, 0.35, seed), rtol=0, atol=0)


def test_eval_mode_and_p_zero_return_the_input_itself_as_torch_does():
    x = torch.randn(4, 5, requires_grad=True)
    for kwargs in (dict(p=0.5, training=False), dict(p=0.0), dict(p=0.0, inplace=True)):
        assert fasttf.dropout(x, **kwargs) is x
        assert F.dropout(x, **kwargs) is x  # (the semantics this follows)
    ints = torch.arange(6)  # any dtype passes through when nothing drops
    assert fasttf.dropout(ints, 0.5, training=False) is ints


def test_p_one_drops_everything_like_torch():
    x = torch.tensor([1.0, -2.0, float("inf"), float("nan")], requires_grad=True)
    out = fasttf.dropout(x, 1.0)
    torch.testing.assert_close(out, F.dropout(x, 1.0), equal_nan=True)  # inf * 0 = NaN there too
    out[:2].sum().backward()
    assert torch.equal(x.grad, torch.zeros(4))
    y = torch.randn(3) + 1
    assert fasttf.dropout(y, 1.0, inplace=True) is y and torch.equal(y, torch.zeros(3))


def test_inplace_writes_the_input_and_gradients_flow_through_it():
    torch.manual_seed(0)
    leaf = torch.randn(8, 16, requires_grad=True)
    y = leaf * 2
    expected, seed = run_with_seed(lambda: fasttf.dropout(y.detach(), 0.25), 4)
    torch.manual_seed(4)
    out = fasttf.dropout(y, 0.25, inplace=True)
    assert out is y
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    keep = dropout_keep_mask(y, 0.25, seed)
    torch.testing.assert_close(leaf.grad, 2 * keep / 0.75)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):  # as torch's in-place dropout
        fasttf.dropout(leaf, 0.25, inplace=True)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_and_mean(p):
    n = 1 << 20
    x = torch.ones(n)
    torch.manual_seed(11)
    out = fasttf.dropout(x, p)
    kept = (out != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 6 * sigma, (kept, 1 - p)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    assert abs(out.double().mean().item() - 1.0) < 6 * sigma / (1 - p)


def test_repeatable_under_manual_seed_and_fresh_otherwise():
    x = torch.randn(1000)
    torch.manual_seed(123)
    first, second = fasttf.dropout(x, 0.5), fasttf.dropout(x, 0.5)
    torch.manual_seed(123)
    assert torch.equal(first, fasttf.dropout(x, 0.5))
    assert not torch.equal(first, second)


def test_gradcheck_float64_first_and_second_order():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(77)
    op = torch.ops.fasttf.dropout
    assert torch.autograd.gradcheck(lambda a: op(a, 0.4, seed), (x,))
    assert torch.autograd.gradgradcheck(lambda a: op(a, 0.4, seed), (x,))


def test_opcheck():
    seed = torch.tensor(5)
    torch.library.opcheck(torch.ops.fasttf.dropout.default, (torch.randn(3, 33, requires_grad=True), 0.25, seed))
    torch.library.opcheck(torch.ops.fasttf.dropout.default, (torch.randn(4, 9, dtype=torch.bfloat16), 0.5, seed))


def test_torch_compile_fullgraph():
    def f(x):
        return fasttf.dropout(torch.relu(x), 0.3) * 2

    x = torch.randn(4, 8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, seed = run_with_seed(lambda: compiled(x), 3)
    keep = dropout_keep_mask(x, 0.3, seed)
    torch.testing.assert_close(out, torch.relu(x) * keep / 0.7 * 2)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (x > 0) * keep / 0.7 * 2)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_p_outside_range_raises_value_error_naming_p(p):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="fasttf.dropout: expected p in \\[0, 1\\]"):
        fasttf.dropout(x, p)
    with pytest.raises(ValueError, match="fasttf.dropout: expected p in \\[0, 1\\]"):  # in eval mode too
        fasttf.dropout(x, p, training=False)


@pytest.mark.parametrize("bad, error, match", [
    (torch.ones(3, dtype=torch.int64), RuntimeError, "expected input to be float32, float64, float16 or bfloat16, got"),
    (torch.ones(3, dtype=torch.complex64), RuntimeError, "expected input to be float32"),
    ([1.0, 2.0], TypeError, "expected input to be a torch.Tensor, got list"),
])
def test_bad_input_names_the_argument(bad, error, match):
    with pytest.raises(error, match=match):
        fasttf.dropout(bad, 0.5)


def test_the_op_checks_its_arguments_too():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="fasttf.dropout: dropout_p > 0 needs a seed"):
        torch.ops.fasttf.dropout(x, 0.5, None)
    with pytest.raises(ValueError, match="fasttf.dropout: expected dropout_p in \\[0, 1\\)"):
        torch.ops.fasttf.dropout(x, 1.0, torch.tensor(1))
    with pytest.raises(RuntimeError, match="fasttf.dropout: expected input to be float32"):
        torch.ops.fasttf.dropout(torch.ones(3, dtype=torch.int32), 0.5, torch.tensor(1))
