"""Deterministic backward, as a promise (README): for every kernel, two backward runs on the same
inputs give bit-identical gradients (torch.equal), on the CPU and on CUDA where there is a GPU.
The attention kernels' own cases (dropout, GQA, a broadcast mask's gradient, gradients through
the weights) are in test_attention_weights_and_mask_grad.py; here each op once, large enough
that a parallel reduction would have several workers."""

import pytest
import torch

import fasttf
from fasttf import _extension
from fasttf.kernels import attention as kernels

from conftest import devices, kernel_device

needs_extension = pytest.mark.skipif(not _extension.is_available(), reason="the extension is not built")


def twice(step, *inputs):
    """The gradients of two runs of step (same seeds), as two lists."""
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(0)
        out = step(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o) for i, o in enumerate(outs)]
        runs.append(torch.autograd.grad(outs, leaves, grads))
    return runs


def assert_bit_identical(runs):
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_add_layer_norm_backward_is_deterministic(device):
    x, residual = torch.randn(2, 4096, 64, device=device), torch.randn(2, 4096, 64, device=device)
    weight, bias = torch.randn(64, device=device), torch.randn(64, device=device)
    assert_bit_identical(twice(lambda *t: fasttf.add_layer_norm(*t, dropout_p=0.1), x, residual, weight, bias))


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_residual_add_and_positional_encoding_backward_are_deterministic(device):
    x, residual = torch.randn(4, 512, 64, device=device), torch.randn(4, 512, 64, device=device)
    assert_bit_identical(twice(lambda a, b: fasttf.residual_add(a, b, dropout_p=0.2), x, residual))
    assert_bit_identical(twice(lambda a: fasttf.positional_encoding(a, scale=2.0), x))


@pytest.mark.skipif(not (kernels.INTERPRET or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_attention_backward_is_deterministic(attention_backend):
    device = kernel_device()
    query, key, value = (torch.randn(2, 2, 40, 16, device=device) for _ in range(3))
    mask = torch.randn(2, 1, 1, 40, device=device)
    assert_bit_identical(twice(lambda q, k, v, m: fasttf.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                                      dropout_p=0.1),
                               query, key, value, mask))
    mha = fasttf.MultiheadAttention(32, 2, dropout=0.1, device=device)
    x = torch.randn(30, 2, 32, device=device)
    assert_bit_identical(twice(lambda a: mha(a, a, a), x))
