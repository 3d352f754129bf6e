"""The extension's C++ autograd kernels (csrc/autograd.cpp): which calls record a graph.

A call records one (through its torch::autograd::Function; positional_encoding and residual_add
without dropout through plain nodes, as eager's `x * scale + pe` and `residual + x` record MulBackward0
and AddBackward0) when grad mode is on and an input requires grad; every other call -- no_grad,
inference_mode, inputs without grad -- runs the kernel directly, with the same values and no grad_fn.
A forward-mode (dual) input raises (through the Function, or residual_add's and positional_encoding's
own check, naming the input): the C++ Function API has no jvp, and a kernel run directly would drop the
tangent silently. The backward calls its backward op below autograd unless the backward is itself
recorded (create_graph=True: tests/test_second_order_gradients.py).
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


# ----------------------------------------------------------------------------------------------
# residual_add without dropout and positional_encoding: plain graph nodes (as eager's AddBackward0 and
# MulBackward0), not a Function: their backward saves no tensor


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requiring_grad", ["both", "x", "residual"])
def test_residual_add_without_dropout_records_a_plain_node(device, requiring_grad):
    x, residual = _inputs([(2, 5, 8), (2, 5, 8)], requires_grad=False, device=device)
    x.requires_grad_(requiring_grad in ("both", "x"))
    residual.requires_grad_(requiring_grad in ("both", "residual"))
    out = fasttf.residual_add(x, residual)
    assert out.grad_fn.name() == "fasttf::ResidualAddBackward"
    leaves = [t for t in (x, residual) if t.requires_grad]
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    again = torch.autograd.grad(out, leaves, 2 * grad_out)
    for grad, twice in zip(first, again):
        torch.testing.assert_close(grad, grad_out, rtol=0, atol=0)  # d(residual + x) = the incoming gradient
        torch.testing.assert_close(twice, 2 * grad_out, rtol=0, atol=0)
    # nothing saved, so a freed graph still runs, as eager's `residual + x` (AddBackward0) does
    eager = residual + x
    torch.autograd.grad(eager, leaves, grad_out)
    for expected, grad in zip(torch.autograd.grad(eager, leaves, grad_out), torch.autograd.grad(out, leaves, grad_out)):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("offsets", [False, True])
def test_positional_encoding_records_a_plain_node(device, offsets):
    (x,) = _inputs([(3, 5, 8)], requires_grad=True, device=device)
    kwargs = {"offset": torch.tensor([0, 4, 9], device=device)} if offsets else {"offset": 2}
    out = fasttf.positional_encoding(x, scale=3.0, **kwargs)
    assert out.grad_fn.name() == "fasttf::PositionalEncodingBackward"
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(grad, grad_out * 3.0, rtol=0, atol=0)  # d(x * scale + pe) = scale


@pytest.mark.parametrize("device", devices())
def test_plain_nodes_accumulate_and_run_hooks(device):
    x, residual = _inputs([(3, 4), (3, 4)], requires_grad=True, device=device)
    seen = []
    out = fasttf.residual_add(x, residual)
    out.register_hook(lambda grad: seen.append(grad.clone()))
    (out * 3).sum().backward()
    fasttf.residual_add(x, residual).sum().backward()
    fasttf.positional_encoding(x, scale=0.5).sum().backward()
    assert len(seen) == 1 and bool((seen[0] == 3).all())
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.5), rtol=0, atol=0)
    torch.testing.assert_close(residual.grad, torch.full_like(residual, 4.0), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dual", ["x", "residual"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_residual_add_dual_input_raises_naming_it(device, dual, dropout_p):
    x, residual = _inputs([(2, 5, 8), (2, 5, 8)], requires_grad=False, device=device)
    with fwAD.dual_level():
        if dual == "x":
            x = fwAD.make_dual(x, torch.ones_like(x))
        else:
            residual = fwAD.make_dual(residual, torch.ones_like(residual))
        with pytest.raises(RuntimeError, match=f"residual_add: jvp .* {dual} carries a forward-mode tangent"):
            fasttf.residual_add(x, residual, dropout_p=dropout_p)


def test_residual_add_with_dropout_keeps_the_function():
    x, residual = _inputs([(2, 5, 8), (2, 5, 8)], requires_grad=True, device="cpu")
    assert "ResidualAdd" in fasttf.residual_add(x, residual, dropout_p=0.1).grad_fn.name()
    assert fasttf.residual_add(x, residual, dropout_p=0.1).grad_fn.name() != "fasttf::ResidualAddBackward"


@pytest.mark.parametrize("op", ["residual_add", "positional_encoding"])
def test_plain_nodes_under_torch_func_grad_raise_as_the_functions_do(op):
    x, residual = _inputs([(3, 4), (3, 4)], requires_grad=False, device="cpu")
    function = {"residual_add": lambda a: fasttf.residual_add(a, residual),
                "positional_encoding": lambda a: fasttf.positional_encoding(a)}[op]
    with pytest.raises(RuntimeError, match="functorch"):
        torch.func.grad(lambda a: function(a).sum())(x)
    assert function(x.requires_grad_()).grad_fn.name().startswith("fasttf::")  # and the next call records again
