"""The MultiheadAttention module, forward+backward (self-attention, batch_first, no mask):

    fasttf.MultiheadAttention (need_weights=False: the fused kernel)
    torch nn.MultiheadAttention, default call (need_weights=True: bmm + softmax + bmm)  (the eager twin)
    torch nn.MultiheadAttention, need_weights=False (torch's SDPA path)

Same weights in all three (fasttf.MultiheadAttention.from_torch). The backward reaches the input and
every parameter. TFLOP/s count the attention only (4·N·H·L·S·E x3.5), not the projections, so they
read as "attention work done per second" for the module.

Shapes: GPU D = 1024, H = 16 (E = 64), N = 16384 / L, L = 512, 2048, 8192, float16 and bfloat16.
CPU: fasttf's C++ attention kernel (FASTTF_CPU_ATTENTION=native, the default), D = 512, H = 8,
L = 256 and 1024, float32.

test_multihead_attention_need_weights: torch's default call (need_weights=True, head-averaged
weights) on both modules, the weights in the loss too (their gradient flows back):
    fasttf.MultiheadAttention: the fused kernel + the weights kernel (nothing L x S saved)
    torch nn.MultiheadAttention (the eager twin): bmm + softmax + bmm, (N, H, L, S) saved
extra_info saved_bytes: the bytes autograd saves for backward in one forward (saved_tensors_hooks,
each storage once). GPU: L = 256 ... 4096, N = 16384 / L, D = 1024, H = 16, float16 and bfloat16.
CPU (the C++ kernel): N = 1, D = 512, H = 8, L = 256, 1024, 4096, float32.
"""

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import fasttf
from harness import DEVICE, ON_GPU, TINY, attention_flops, dtype_name, measure


def shapes():
    """(dtype, (N, L, D, H), label) of every group on this device."""
    if TINY:
        return [(torch.float16 if ON_GPU else torch.float32, (2, 16, 32, 2), "")]
    if ON_GPU:
        return [(dtype, (16384 // length, length, 1024, 16), "") for dtype in (torch.float16, torch.bfloat16)
                for length in (512, 2048, 8192)]
    return [(torch.float32, (2, length, 512, 8), "") for length in (256, 1024)]


IMPLS = (("fasttf", False), ("torch need_weights=True", True), ("torch need_weights=False", False))


@pytest.mark.parametrize("impl", IMPLS, ids=[impl[0] for impl in IMPLS])
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: f"{dtype_name(s[0])}-{'x'.join(map(str, s[1]))}")
def test_multihead_attention(benchmark, shape, impl):
    name, eager_twin = impl
    dtype, (batch, length, dim, heads), label = shape
    torch.manual_seed(0)
    torch_module = nn.MultiheadAttention(dim, heads, batch_first=True, device=DEVICE, dtype=dtype)
    module = fasttf.MultiheadAttention.from_torch(torch_module) if name == "fasttf" else torch_module
    need_weights = name == "torch need_weights=True"
    x = torch.randn(batch, length, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, length, dim, device=DEVICE, dtype=dtype)

    def step(module, need_weights):
        inputs = (x, *module.parameters())

        def fn():
            out = module(x, x, x, need_weights=need_weights)[0]
            return torch.autograd.grad(out, inputs, grad_out)
        return fn

    fn = step(module, need_weights)
    twin = step(torch_module, True) if name == "fasttf" else None  # the eager twin, for the interleaved speedup
    impl_name = f"{name} (native)" if name == "fasttf" and not ON_GPU else name
    measure(benchmark, fn, group=f"MultiheadAttention fwd+bwd {dtype_name(dtype)}{label}: N={batch} L={length} "
                                 f"D={dim} H={heads}",
            impl=impl_name, eager_twin=eager_twin, twin=twin, op="MultiheadAttention", mode="fwd+bwd", dtype=dtype_name(dtype),
            batch=batch, seq_len=length, dim=dim, heads=heads,
            series=f"MultiheadAttention fwd+bwd {dtype_name(dtype)} D={dim} H={heads}{label}",
            flops=attention_flops(batch, heads, length, length, dim // heads, False, True))


def need_weights_shapes():
    if TINY:
        return [(torch.float16 if ON_GPU else torch.float32, (2, 16, 32, 2), "")]
    if ON_GPU:
        return [(dtype, (16384 // length, length, 1024, 16), "") for dtype in (torch.float16, torch.bfloat16)
                for length in (256, 512, 1024, 2048, 4096)]
    return [(torch.float32, (1, length, 512, 8), "") for length in (256, 1024, 4096)]


def saved_bytes(forward) -> int:
    """Bytes autograd saves for backward during one forward (each storage counted once)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


NEED_WEIGHTS_IMPLS = ("fasttf", "torch")


@pytest.mark.parametrize("impl", NEED_WEIGHTS_IMPLS)
@pytest.mark.parametrize("shape", need_weights_shapes(), ids=lambda s: f"{dtype_name(s[0])}-{'x'.join(map(str, s[1]))}")
def test_multihead_attention_need_weights(benchmark, shape, impl):
    dtype, (batch, length, dim, heads), label = shape
    torch.manual_seed(0)
    torch_module = nn.MultiheadAttention(dim, heads, batch_first=True, device=DEVICE, dtype=dtype)
    module = fasttf.MultiheadAttention.from_torch(torch_module) if impl == "fasttf" else torch_module
    x = torch.randn(batch, length, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, length, dim, device=DEVICE, dtype=dtype)
    grad_weights = torch.randn(batch, length, length, device=DEVICE, dtype=dtype)

    def step(module):
        inputs = (x, *module.parameters())

        def fn():
            out, weights = module(x, x, x)  # torch's default call: need_weights=True, averaged
            return torch.autograd.grad((out, weights), inputs, (grad_out, grad_weights))
        return fn

    fn = step(module)
    twin = step(torch_module) if impl == "fasttf" else None
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: module(x, x, x))
    impl_name = f"{impl} (native)" if impl == "fasttf" and not ON_GPU else impl
    measure(benchmark, fn, group=f"MultiheadAttention need_weights=True fwd+bwd {dtype_name(dtype)}{label}: "
                                 f"N={batch} L={length} D={dim} H={heads}",
            impl=impl_name, eager_twin=impl == "torch", twin=twin, op="MultiheadAttention need_weights", mode="fwd+bwd",
            dtype=dtype_name(dtype), batch=batch, seq_len=length, dim=dim, heads=heads,
            series=f"MultiheadAttention need_weights=True fwd+bwd {dtype_name(dtype)} D={dim} H={heads}{label}",
            flops=attention_flops(batch, heads, length, length, dim // heads, False, True))
