"""Second-order gradients through every fasttf op: correct (checked against torch with
create_graph=True) or one clear SecondOrderError naming the op and what to use instead. Never
torch's "may lead to silently incorrect behavior" warning: warnings are errors here."""

import warnings

import pytest
import torch

import fasttf
from fasttf import _extension

needs_extension = pytest.mark.skipif(not _extension.is_available(), reason="the extension is not built")


def gradient_penalty(fn, *inputs):
    """d/d(inputs) of |d fn / d inputs[0]|^2: a double backward through fn."""
    (grad,) = torch.autograd.grad((fn(*inputs) ** 3).sum(), inputs[0], create_graph=True)
    return torch.autograd.grad(grad.square().sum(), inputs)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@needs_extension
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_residual_add_twice_differentiable(dropout_p):
    x, residual = torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    torch.manual_seed(0)
    ours = gradient_penalty(lambda a, b: fasttf.residual_add(a, b, dropout_p=dropout_p), *leaves(x, residual))
    torch.manual_seed(0)  # the same seed: the same keep bits, replayed
    keep = fasttf.ops.residual.dropout_keep_mask(x, dropout_p, fasttf.ops.residual.dropout_seed()) \
        if dropout_p > 0 else torch.ones_like(x, dtype=torch.bool)
    theirs = gradient_penalty(lambda a, b: b + a * keep / (1 - dropout_p), *leaves(x, residual))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@needs_extension
@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_positional_encoding_twice_differentiable(scale):
    x = torch.randn(2, 9, 12)
    ours = gradient_penalty(lambda a: fasttf.positional_encoding(a, scale=scale), *leaves(x))
    theirs = gradient_penalty(lambda a: fasttf.reference.positional_encoding(a, scale=scale), *leaves(x))
    torch.testing.assert_close(ours[0], theirs[0])


@needs_extension
def test_add_layer_norm_double_backward_raises_a_clear_error():
    x, residual, weight, bias = leaves(torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8))
    out, _ = fasttf.add_layer_norm(x, residual, weight, bias)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(fasttf.SecondOrderError, match=r"fasttf.add_layer_norm: second-order.*layer_norm"):
        grad.sum().backward()


def test_attention_double_backward_raises_a_clear_error():
    from fasttf.kernels import attention as kernels
    if not (kernels.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
    query, key, value = leaves(*(torch.randn(1, 2, 5, 8, device=device) for _ in range(3)))
    with pytest.raises(fasttf.SecondOrderError, match=r"fasttf.scaled_dot_product_attention: second-order.*"
                                                      r"torch.nn.functional.scaled_dot_product_attention"):
        gradient_penalty(fasttf.scaled_dot_product_attention, query, key, value)
    mha = fasttf.MultiheadAttention(8, 2)
    x = leaves(torch.randn(5, 2, 8, device=device))[0]
    mha.to(device)
    with pytest.raises(fasttf.SecondOrderError, match="scaled_dot_product_attention"):
        gradient_penalty(lambda a: mha(a, a, a)[0], x)
