"""Small calls, where the cost of a call (Python, dispatch, allocation) weighs as much as the math:
decoding a word at a time, small models, inference on a few tokens. Each against the eager twin a
user has today, timed interleaved with it:

    SDPA decode step       fasttf.scaled_dot_product_attention vs F.scaled_dot_product_attention, one
                           query (N, H, E) = (1, 8, 64) over S cached keys, no_grad, with and without
                           a (N, 1, 1, S) bool padding mask
    SDPA small training    the same, forward+backward, (N, H, L, E) = (2, 2, 8, 16)
    MultiheadAttention     fasttf.MultiheadAttention vs nn.MultiheadAttention, eval, no_grad,
      inference            need_weights=False and True (the modules' default), without and with a bool
                           key padding mask (every other sequence's last quarter padded): torch's fused
                           C++ fast path, torch._native_multi_head_attention, takes all four, and so
                           does fasttf's one-op call, fasttf::native_multi_head_attention; D = 512,
                           H = 8, self-attention over (N, L) tokens
    greedy decode          fasttf.models.Transformer(backend="fasttf") vs backend="torch", same weights,
                           d_model 128, 8 heads, 2 + 2 layers, 16 source words, 24 words decoded with
                           the key/value cache

On a GPU the same shapes (float32): there the launch of each kernel is the cost of a call.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttf
from fasttf.models import Transformer
from harness import DEVICE, TINY, dtype_name, forward_backward, measure


def sdpa_decode_cases():
    return [(length, masked) for length in ((16,) if TINY else (16, 1024)) for masked in (False, True)]


def attend(impl):
    return fasttf.scaled_dot_product_attention if impl == "fasttf" else F.scaled_dot_product_attention


@pytest.mark.parametrize("impl", ("fasttf", "torch"))
@pytest.mark.parametrize("case", sdpa_decode_cases(), ids=lambda c: f"S{c[0]}{'-mask' if c[1] else ''}")
def test_sdpa_decode_step(benchmark, case, impl):
    length, masked = case
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, 8, 1, 64, device=DEVICE, generator=generator)
    k, v = (torch.randn(1, 8, length, 64, device=DEVICE, generator=generator) for _ in range(2))
    mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device=DEVICE) if masked else None

    def call(fn):
        def step():
            with torch.no_grad():
                return fn(q, k, v, attn_mask=mask)
        return step

    measure(benchmark, call(attend(impl)), group=f"small calls: SDPA decode step float32 (1, 8, 1, 64) over S={length}"
                                                f"{' with a padding mask' if masked else ''}",
            impl=impl, eager_twin=impl == "torch", twin=call(attend("torch")) if impl == "fasttf" else None,
            op="sdpa decode step", mode="fwd", dtype="float32", seq_len=length)


@pytest.mark.parametrize("impl", ("fasttf", "torch"))
def test_sdpa_small_training_call(benchmark, impl):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, device=DEVICE, generator=generator, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, 8, 16, device=DEVICE, generator=generator)

    def call(fn):
        return forward_backward(lambda: fn(q, k, v), (q, k, v), grad_out)

    measure(benchmark, call(attend(impl)), group="small calls: SDPA fwd+bwd float32 (2, 2, 8, 16)", impl=impl,
            eager_twin=impl == "torch", twin=call(attend("torch")) if impl == "fasttf" else None,
            op="sdpa small training call", mode="fwd+bwd", dtype="float32", seq_len=8)


def mha_cases():
    return [(1, 1)] if TINY else [(1, 1), (1, 64), (8, 64), (8, 256)]


@pytest.mark.parametrize("impl", ("fasttf", "torch"))
@pytest.mark.parametrize("padded", (False, True), ids=("", "padded"))
@pytest.mark.parametrize("need_weights", (False, True), ids=("", "weights"))
@pytest.mark.parametrize("case", mha_cases(), ids=lambda c: f"N{c[0]}-L{c[1]}")
def test_multihead_attention_inference(benchmark, case, need_weights, padded, impl):
    batch, length = case
    dim = 64 if TINY else 512
    torch.manual_seed(0)
    torch_module = nn.MultiheadAttention(dim, 8, batch_first=True, device=DEVICE).eval()
    modules = {"torch": torch_module, "fasttf": fasttf.MultiheadAttention.from_torch(torch_module).eval()}
    x = torch.randn(batch, length, dim, device=DEVICE)
    # padded: a bool key padding mask, every other sequence's last quarter padded
    lengths = torch.tensor([length - (length // 4) * (n % 2) for n in range(batch)], device=DEVICE)
    key_padding_mask = torch.arange(length, device=DEVICE) >= lengths[:, None] if padded else None

    def call(module):
        def run():
            with torch.no_grad():
                return module(x, x, x, need_weights=need_weights, key_padding_mask=key_padding_mask)
        return run

    measure(benchmark, call(modules[impl]), group=f"small calls: MultiheadAttention inference float32 N={batch} "
                                                  f"L={length} D={dim} H=8"
                                                  f"{' with weights (need_weights=True)' if need_weights else ''}"
                                                  f"{' with a key padding mask' if padded else ''}",
            impl=impl, eager_twin=impl == "torch", twin=call(torch_module) if impl == "fasttf" else None,
            op="MultiheadAttention inference", mode="fwd", dtype=dtype_name(torch.float32), batch=batch,
            seq_len=length, dim=dim)


@pytest.mark.parametrize("impl", ("fasttf", "torch"))
def test_greedy_decode(benchmark, impl):
    size = dict(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64) if TINY \
        else dict(d_model=128, num_heads=8, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=512)
    words = 4 if TINY else 24
    torch.manual_seed(0)
    # eos_id outside the vocabulary the source draws from, so both decode the same number of words
    models = {"fasttf": Transformer(1000, 1000, eos_id=999, backend="fasttf", **size).to(DEVICE).eval()}
    models["torch"] = models["fasttf"].with_backend("torch").to(DEVICE).eval()
    source = torch.randint(2, 998, (1, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def call(model):
        return lambda: model.greedy_decode(source, max_new_tokens=words)

    measure(benchmark, call(models[impl]), group=f"small calls: greedy decode float32 d_model={size['d_model']}, "
                                                 f"{words} words",
            impl=impl, eager_twin=impl == "torch", twin=call(models["torch"]) if impl == "fasttf" else None,
            op="greedy decode", mode="fwd", dtype="float32", seq_len=words)
