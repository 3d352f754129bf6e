"""The extension's C++ autograd kernels (csrc/autograd.cpp): which calls record a graph.

A call records one (through its torch::autograd::Function) when grad mode is on and an input requires
grad; every other call -- no_grad, inference_mode, inputs without grad -- runs the kernel directly,
with the same values and no grad_fn. A forward-mode (dual) input still goes through the Function,
which raises: the C++ Function API has no jvp, and a kernel run directly would drop the tangent
silently. The backward calls its backward op below autograd unless the backward is itself recorded
(create_graph=True: tests/test_second_order_gradients.py).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fasttf
from conftest import devices
from fasttf.ops.attention import attention_with_weights


def _attention(q, k, v):
    return fasttf.scaled_dot_product_attention(q, k, v)


def _attention_weights(q, k, v):  # a Python autograd.Function where a graph is recorded, else the kernel
    return attention_with_weights(q, k, v)[1]


def _cases():
    """(name, function of the inputs returning a tensor, the inputs' shapes, devices): the elementwise
    ops' autograd is the C++ one on every device; attention's only on the CPU (CUDA runs Triton's)."""
    return [
        ("residual_add", lambda x, r: fasttf.residual_add(x, r), [(2, 5, 8), (2, 5, 8)], devices()),
        ("add_layer_norm", lambda x, r, w, b: fasttf.add_layer_norm(x, r, w, b)[0], [(2, 5, 8), (2, 5, 8), (8,), (8,)],
         devices()),
        ("add_layer_norm s", lambda x, r, w, b: fasttf.add_layer_norm(x, r, w, b)[1],
         [(2, 5, 8), (2, 5, 8), (8,), (8,)], devices()),
        ("positional_encoding", lambda x: fasttf.positional_encoding(x), [(2, 5, 8)], devices()),
        ("attention", _attention, [(1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)], ["cpu"]),
        ("attention weights", _attention_weights, [(1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)], ["cpu"]),
    ]


CASES = [(name, function, shapes, device) for name, function, shapes, on in _cases() for device in on]


def _id(case):
    return f"{case[0]}-{case[3]}"


def _inputs(shapes, requires_grad, device):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator).to(device).requires_grad_(requires_grad) for shape in shapes]


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "native")


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no input requires grad"])
def test_calls_without_grad_record_no_graph(case, context):
    _, function, shapes, device = case
    expected = function(*_inputs(shapes, requires_grad=True, device=device))
    assert expected.requires_grad and expected.grad_fn is not None
    if context == "no_grad":
        with torch.no_grad():
            out = function(*_inputs(shapes, requires_grad=True, device=device))
    elif context == "inference_mode":
        with torch.inference_mode():
            out = function(*_inputs(shapes, requires_grad=True, device=device))
        assert out.is_inference()
    else:
        out = function(*_inputs(shapes, requires_grad=False, device=device))
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_one_input_requiring_grad_records_the_graph(case):
    _, function, shapes, device = case
    every = _inputs(shapes, requires_grad=True, device=device)
    (expected,) = torch.autograd.grad(function(*every).square().sum(), every[0])
    inputs = _inputs(shapes, requires_grad=False, device=device)
    inputs[0].requires_grad_(True)  # the first only: x, the query
    out = function(*inputs)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.square().sum(), inputs[0])
    assert bool(grad.abs().sum() > 0)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(case):
    _, function, shapes, device = case
    inputs = _inputs(shapes, requires_grad=False, device=device)
    with fwAD.dual_level():
        inputs[0] = fwAD.make_dual(inputs[0], torch.ones_like(inputs[0]))
        with pytest.raises(RuntimeError, match="jvp"):
            function(*inputs)
