"""fasttf.add_layer_norm: (layer_norm(s) * weight + bias, s), s = residual + dropout(x), against
fasttf.reference (float64) and eager F.layer_norm with the same keep-mask, forward and backward
(dx, dresidual, dweight, dbias, with gradient flowing into both outputs)."""

import pytest
import torch
import torch.nn.functional as F

import fasttf
from fasttf import reference
from fasttf.ops.residual import dropout_keep_mask, dropout_seed
from fasttf.testing import assert_close_to_reference
from conftest import devices

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def check_against_reference(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, grad_into_s=True):
    torch.manual_seed(11)
    seed = dropout_seed()
    torch.manual_seed(11)
    out, s = fasttf.add_layer_norm(x, residual, weight, bias, eps=eps, dropout_p=dropout_p)
    mask = dropout_keep_mask(x, dropout_p, seed) if dropout_p else None

    def copies(dtype):
        return [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, residual, weight, bias)]

    x64, r64, w64, b64 = copies(torch.float64)
    out64, s64 = reference.add_layer_norm(x64, r64, w64, b64, eps=eps, dropout_p=dropout_p, dropout_mask=mask)
    xe, re, we, be = copies(x.dtype)
    se = re + (xe * mask * (1.0 / (1.0 - dropout_p)) if dropout_p else xe)
    oute = F.layer_norm(se, (x.size(-1),), we, be, eps)
    assert out.dtype == x.dtype and s.dtype == x.dtype
    assert_close_to_reference(out, out64, oute, "out")
    assert_close_to_reference(s, s64, se, "s")
    dy, ds = torch.randn_like(out), torch.randn_like(s)
    for o, so, d in ((out, s, dy), (out64, s64, dy.double()), (oute, se, dy)):
        loss = (o * d).sum() + ((so * ds.to(so.dtype)).sum() if grad_into_s else 0)
        loss.backward()
    names = ("dx", "dresidual", "dweight", "dbias")
    for name, got, truth, eager in zip(names, (x, residual, weight, bias), [x64, r64, w64, b64], [xe, re, we, be]):
        if got is not None:
            assert_close_to_reference(got.grad, truth.grad, eager.grad, name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1), (2, 5, 7), (4, 33), (2, 3, 64), (3, 130)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_against_reference_and_eager(device, dtype, shape, dropout_p):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(shape[-1], device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(shape[-1], device=device, dtype=dtype, requires_grad=True)
    check_against_reference(x, residual, weight, bias, dropout_p=dropout_p)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_weight_or_bias_may_be_none(device, affine):
    torch.manual_seed(1)
    x, residual = (torch.randn(6, 20, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(20, device=device, requires_grad=True) if affine == "weight" else None
    bias = torch.randn(20, device=device, requires_grad=True) if affine == "bias" else None
    check_against_reference(x, residual, weight, bias, eps=1e-3, dropout_p=0.1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_rows_up_to_16384(device, dtype):
    torch.manual_seed(2)
    x, residual = (torch.randn(3, 16384, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(16384, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    check_against_reference(x, residual, weight, bias, dropout_p=0.1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape, dropout_p", [((300, 48), 0.0), ((70001, 64), 0.1)])
def test_many_rows_the_partial_sums_of_dweight_dbias(device, shape, dropout_p):
    """dweight / dbias add up every row: at 70001 rows a sum of plain float adds in chunk order was
    2.4x torch's error on an H200 (the CUDA reduce is compensated since); the CPU op's too."""
    torch.manual_seed(3)
    x, residual = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(shape[-1], device=device, requires_grad=True) for _ in range(2))
    check_against_reference(x, residual, weight, bias, dropout_p=dropout_p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA backward's row chunks")
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (70001, 64)), (torch.bfloat16, (2, 1100, 4096)),
                                          (torch.float32, (1500, 4096))])
def test_gpu_row_chunks_of_the_partial_sums(dtype, shape):
    """csrc/cuda/add_layer_norm.cu: rows of D <= 512 * VEC are held by one block's threads, which take a
    chunk of >= 16 rows (here 18, the last one short; and 4096-wide bfloat16 rows) and add dweight/dbias
    partials on the way; float32 at D = 4096 takes the two-kernel path with the same chunks. Twice the
    same call gives the same bits (no atomics)."""
    torch.manual_seed(6)
    x, residual = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(shape[-1], device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    check_against_reference(x, residual, weight, bias, dropout_p=0.1)
    grads = []
    for _ in range(2):
        out, _ = fasttf.add_layer_norm(x, residual, weight, bias)
        grads.append(torch.autograd.grad(out, (weight, bias), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("device", devices())
def test_only_out_used_and_non_contiguous_inputs(device):
    torch.manual_seed(4)
    x = torch.randn(9, 4, 10, device=device).transpose(0, 1).requires_grad_()  # (4, 9, 10) strided
    residual = torch.randn(4, 9, 20, device=device)[:, :, ::2].requires_grad_()
    weight = torch.randn(30, device=device)[::3].requires_grad_()
    bias = torch.randn(10, device=device, requires_grad=True)
    check_against_reference(x, residual, weight, bias, dropout_p=0.3, grad_into_s=False)


def test_dweight_dbias_do_not_depend_on_the_thread_count():
    torch.manual_seed(5)
    x, residual = torch.randn(257, 40, requires_grad=True), torch.randn(257, 40)
    weight, bias = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            weight.grad = bias.grad = None
            fasttf.add_layer_norm(x, residual, weight, bias)[0].pow(2).sum().backward()
            grads.append((weight.grad.clone(), bias.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [7, 64, 65, 300])
def test_each_row_does_not_depend_on_its_neighbours(dtype, dim):
    """The CPU kernel takes short rows in pairs (csrc/cpu/norm_rows.cpp) and a thread's first row may
    start either: a row's out, s and gradients are the same bits whichever row it is paired with."""
    generator = torch.Generator().manual_seed(dim)
    x, residual, grad_out, grad_s = (torch.randn(9, dim, generator=generator).to(dtype) for _ in range(4))
    weight, bias = (torch.randn(dim, generator=generator).to(dtype).requires_grad_() for _ in range(2))

    def rows(first):
        xs, rs = x[first:].clone().requires_grad_(), residual[first:].clone().requires_grad_()
        out, s = fasttf.add_layer_norm(xs, rs, weight, bias)
        return (out, s) + torch.autograd.grad((out, s), (xs, rs), (grad_out[first:], grad_s[first:]))

    for every_row, but_the_first in zip(rows(0), rows(1)):
        assert torch.equal(every_row[1:], but_the_first)


def test_eval_mode_skips_dropout():
    x, residual, weight, bias = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8), torch.randn(8)
    out, s = fasttf.add_layer_norm(x, residual, weight, bias, dropout_p=0.5, training=False)
    torch.testing.assert_close(s, residual + x, rtol=0, atol=0)
    torch.testing.assert_close(out, F.layer_norm(residual + x, (8,), weight, bias))


def test_gradcheck_float64():
    torch.manual_seed(6)
    x, residual = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    op = torch.ops.fasttf.add_layer_norm
    seed = torch.tensor(31)
    assert torch.autograd.gradcheck(lambda *t: op(*t, 1e-5, 0.3, seed)[:2], (x, residual, weight, bias))
    assert torch.autograd.gradcheck(lambda *t: op(*t, 1e-5, 0.0, None)[:2], (x, residual, weight, bias))
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, None, None, 0.1, 0.0, None)[0], (x, residual))


def test_opcheck():
    torch.manual_seed(7)
    x, residual = (torch.randn(3, 2, 9, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(9, requires_grad=True) for _ in range(2))
    ops = torch.ops.fasttf
    seed = torch.tensor(8)
    torch.library.opcheck(ops.add_layer_norm.default, (x, residual, weight, bias, 1e-5, 0.0, None))
    torch.library.opcheck(ops.add_layer_norm.default, (x, residual, None, bias, 1e-5, 0.25, seed))
    _, s, mean, rstd = (t.detach() for t in ops.add_layer_norm(x, residual, weight, bias, 1e-5, 0.25, seed))
    dy = torch.randn_like(s)  # (detached: the backward op's own backward raises SecondOrderError by design)
    torch.library.opcheck(ops.add_layer_norm_backward.default,
                          (dy, dy, s.detach(), mean, rstd, weight.detach(), True, True, 0.25, seed))
    torch.library.opcheck(ops.add_layer_norm_backward.default,
                          (dy, None, s.detach(), mean, rstd, None, False, False, 0.0, None))


class Block(torch.nn.Module):
    """positional_encoding -> linear -> add_layer_norm: the ops inside a compiled model."""

    def __init__(self, dim, dropout_p):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.dropout_p = dropout_p

    def forward(self, x):
        h = fasttf.positional_encoding(x, 2, scale=x.size(-1) ** 0.5)
        out, s = fasttf.add_layer_norm(self.linear(h), h, self.norm.weight, self.norm.bias,
                                       dropout_p=self.dropout_p, training=self.training)
        return out + fasttf.residual_add(s, out, dropout_p=self.dropout_p, training=self.training)


def test_torch_compile_fullgraph_inductor():
    torch.manual_seed(8)
    block = Block(16, 0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    expected = block(x)
    expected.sum().backward()
    expected_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(block, fullgraph=True, backend="inductor")(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    for g, e in zip([x.grad] + [p.grad for p in block.parameters()], expected_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_fullgraph_with_dropout():
    torch.manual_seed(9)
    block = Block(16, 0.25)
    x = torch.randn(2, 5, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    block.eval()
    torch.testing.assert_close(compiled(x), Block.forward(block, x))


@pytest.mark.parametrize("bad, error, match", [
    (dict(weight=torch.randn(7)), ValueError, r"weight of shape \(8,\)"),
    (dict(bias=torch.randn(8, 1)), ValueError, r"bias of shape \(8,\)"),
    (dict(weight=torch.randn(8, dtype=torch.float64)), RuntimeError, "weight to have the dtype of x"),
    (dict(residual=torch.randn(5, 9)), RuntimeError, "residual to have the shape of x"),
    (dict(residual=torch.randn(5, 8, device="meta")), RuntimeError, "residual is on meta"),
    (dict(eps=-1e-5), ValueError, "eps >= 0"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p in \[0, 1\)"),
    (dict(x=torch.ones(5, 8, dtype=torch.int32), residual=torch.ones(5, 8, dtype=torch.int32),
          weight=None, bias=None), RuntimeError, "x to be float32"),
])
@pytest.mark.parametrize("training", (True, False))
def test_bad_input_names_the_argument(bad, error, match, training):
    args = dict(x=torch.randn(5, 8), residual=torch.randn(5, 8), weight=torch.randn(8), bias=torch.randn(8),
                eps=1e-5, dropout_p=0.1) | bad
    with pytest.raises(error, match=match):  # eval mode (where nothing drops) checks as much as training
        fasttf.add_layer_norm(args["x"], args["residual"], args["weight"], args["bias"], eps=args["eps"],
                              dropout_p=args["dropout_p"], training=training)


def test_cpp_checks_too():
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"weight of shape \(8,\)"):
        torch.ops.fasttf.add_layer_norm(x, x, torch.randn(3), None, 1e-5, 0.0, None)
    with pytest.raises(ValueError, match="eps >= 0"):
        torch.ops.fasttf.add_layer_norm(x, x, None, None, -1.0, 0.0, None)
