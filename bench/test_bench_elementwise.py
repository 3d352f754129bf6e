"""The extension's elementwise ops, forward and forward+backward, each against the eager twin a user
writes today (the group's baseline for the speedup):

    positional_encoding  fasttf.positional_encoding(x, scale=sqrt(D))   vs  x * sqrt(D) + pe[:T]  (pe cached)
    residual_add         fasttf.residual_add(x, residual, dropout_p=p)  vs  residual + F.dropout(x, p)
    add_layer_norm       fasttf.add_layer_norm(x, residual, w, b, dropout_p=p)
                                                           vs  F.layer_norm(residual + F.dropout(x, p), (D,), w, b)
    dropout              fasttf.dropout(x, p)                           vs  F.dropout(x, p)

GB/s count the op's minimum I/O in bytes, M = N·T·D elements of b bytes each; the backward of an add
needs no new tensor where no dropout scales it (the gradient passes through as it is):
    positional_encoding  forward 2M·b (read x, write y); backward +2M·b (read dy, write dx)
    residual_add         forward 3M·b (read x, residual, write y); backward +0 (p = 0: dx = dresidual = dy)
                         or +2M·b (p > 0: read dy, write dx)
    add_layer_norm       forward 4M·b (read x, residual, write y, s); backward +3M·b (read dy, s, write
                         dresidual) or +4M·b (p > 0: also write dx)
    dropout              forward 2M·b (read x, write y); backward +2M·b (read dy, write dx)
(dropout's keep-mask is not counted: fasttf regenerates it from a seed, eager torch writes and reads it).
Each group also times `out.copy_(x)` of one (N, T, D) tensor (2M·b bytes): the bandwidth a memory-bound
op can reach on this device, measured in the same run (issue 4's GPU target: >= 85% of it); the
report gives every entry's GB/s as a fraction of it.

Shapes: CPU float32 (N, T, D) = (8, T, 512) for T = 128, 512, 2048 ((8, 512, 512) is issue 4's target:
fasttf >= 1.5x eager forward, >= 1.2x forward+backward); GPU float32, float16, bfloat16 (8, T, 1024)
for T = 512, 2048, 8192. FASTTF_BENCH_ELEMENTWISE=dims instead runs issue 18's matrix on any device:
float32 and bfloat16, (8, 512, D) for D = 64, 512, 768, 4096 (run it once per FASTTF_BENCH_THREADS).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fasttf
from fasttf import reference
from harness import DEVICE, ON_GPU, TINY, dtype_name, forward_backward, measure


def shapes():
    """(dtype, (N, T, D)) of every group on this device."""
    if TINY:
        return [(torch.float32, (2, 8, 16))]
    if os.environ.get("FASTTF_BENCH_ELEMENTWISE") == "dims":
        return [(dtype, (8, 512, dim)) for dtype in (torch.float32, torch.bfloat16) for dim in (64, 512, 768, 4096)]
    if ON_GPU:
        return [(dtype, (8, length, 1024)) for dtype in (torch.float32, torch.float16, torch.bfloat16)
                for length in (512, 2048, 8192)]
    return [(torch.float32, (8, length, 512)) for length in (128, 512, 2048)]


# the op's minimum bytes read + written in units of M·b: (forward, backward without dropout, with dropout)
IO_UNITS = {"positional_encoding": (2, 2, 2), "residual_add": (3, 0, 2), "add_layer_norm": (4, 3, 4),
            "dropout": (2, 2, 2)}


def io_units(op, backward, dropout_p):
    forward, backward_plain, backward_dropout = IO_UNITS[op]
    if not backward:
        return forward
    return forward + (backward_dropout if dropout_p > 0 else backward_plain)


MODES = ("fwd", "fwd+bwd")


def make_case(op, impl, dropout_p, dtype, shape, backward):
    """(forward closure, differentiable inputs) for one op and implementation."""
    batch, length, dim = shape
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def tensor(*size):
        return torch.randn(*size, device=DEVICE, dtype=dtype, generator=generator, requires_grad=backward)

    x = tensor(batch, length, dim)
    if op == "positional_encoding":
        scale = math.sqrt(dim)
        if impl == "fasttf":
            return (lambda: fasttf.positional_encoding(x, scale=scale)), (x,)
        # what a user writes: a table computed once (here for the positions in use), then one fused line
        pe = reference.sinusoid_table(torch.arange(length, device=DEVICE), dim).to(dtype)
        return (lambda: x * scale + pe[:length]), (x,)
    if op == "dropout":
        if impl == "fasttf":
            return (lambda: fasttf.dropout(x, dropout_p)), (x,)
        return (lambda: F.dropout(x, dropout_p)), (x,)
    residual = tensor(batch, length, dim)
    if op == "residual_add":
        if impl == "fasttf":
            return (lambda: fasttf.residual_add(x, residual, dropout_p=dropout_p)), (x, residual)
        return (lambda: residual + F.dropout(x, dropout_p)), (x, residual)
    weight = (1.0 + 0.1 * torch.randn(dim, device=DEVICE, generator=generator)).to(dtype).requires_grad_(backward)
    bias = (0.1 * torch.randn(dim, device=DEVICE, generator=generator)).to(dtype).requires_grad_(backward)
    inputs = (x, residual, weight, bias)
    if impl == "fasttf":
        return (lambda: fasttf.add_layer_norm(x, residual, weight, bias, dropout_p=dropout_p)[0]), inputs
    return (lambda: F.layer_norm(residual + F.dropout(x, dropout_p), (dim,), weight, bias)), inputs


def timed_call(op, impl, dropout_p, dtype, shape, backward):
    """The closure a benchmark times: the forward under no_grad, or forward then backward."""
    forward, inputs = make_case(op, impl, dropout_p, dtype, shape, backward)
    if backward:
        generator = torch.Generator(device=DEVICE).manual_seed(1)
        grad_out = torch.randn(*shape, device=DEVICE, dtype=dtype, generator=generator)
        return forward_backward(forward, inputs, grad_out)

    def fn():
        with torch.no_grad():
            return forward()
    return fn


CASES = [("positional_encoding", 0.0), ("residual_add", 0.0), ("residual_add", 0.1), ("add_layer_norm", 0.0),
         ("add_layer_norm", 0.1), ("dropout", 0.1)]


@pytest.mark.parametrize("impl", ("fasttf", "eager", "copy"))
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: f"{dtype_name(s[0])}-{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + (f"-p{c[1]}" if c[0] != "positional_encoding" else ""))
@pytest.mark.parametrize("mode", MODES)
def test_elementwise(benchmark, mode, case, shape, impl):
    op, dropout_p = case
    dtype, (batch, length, dim) = shape
    backward = mode == "fwd+bwd"
    variant = "" if op == "positional_encoding" else f" p={dropout_p}"
    elements = batch * length * dim
    element_size = torch.finfo(dtype).bits // 8
    group = f"{op} {mode} {dtype_name(dtype)}{variant}: N={batch} T={length} D={dim}"
    series = f"{op} {mode} {dtype_name(dtype)}{variant} D={dim}"
    if impl == "copy":  # the bandwidth a memory-bound op can reach: out.copy_(x), 2M·b bytes
        source = torch.randn(batch, length, dim, device=DEVICE, dtype=dtype)
        target = torch.empty_like(source)
        measure(benchmark, lambda: target.copy_(source), group=group, impl="device copy (bandwidth reference)",
                bandwidth_reference=True, op=op, mode=mode, dtype=dtype_name(dtype), dropout_p=dropout_p,
                batch=batch, seq_len=length, dim=dim, series=series, bytes_moved=2 * elements * element_size)
        return
    fn = timed_call(op, impl, dropout_p, dtype, (batch, length, dim), backward)
    twin = timed_call(op, "eager", dropout_p, dtype, (batch, length, dim), backward) if impl == "fasttf" else None
    units = io_units(op, backward, dropout_p)
    measure(benchmark, fn, group=group, impl=impl if impl == "fasttf" else "eager torch", eager_twin=impl == "eager",
            twin=twin,
            op=op, mode=mode, dtype=dtype_name(dtype), dropout_p=dropout_p, batch=batch, seq_len=length, dim=dim,
            series=series, bytes_moved=units * elements * element_size)
