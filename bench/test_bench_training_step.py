"""A whole training step of fasttf.models.Transformer (the encoder-decoder of the lecture notes):
forward, cross-entropy, backward, Adam step, zero_grad; backend="torch" (the eager twin) against
backend="fasttf" with the same weights.

    GPU: d_model 512, 8 heads, 6 + 6 layers, feed-forward 2048, dropout 0.1, bfloat16 weights,
         N = 16384 / L sentence pairs of L = 128 and 512 words (source and target).
    CPU: two groups:
         - "(native)": a small model (d_model 256, 4 heads, 2 + 2 layers, N = 8, L = 64) where the
           fasttf backend runs all its C++ CPU kernels (attention with FASTTF_CPU_ATTENTION=native,
           positional encoding, add + LayerNorm): the CPU speed path;
         - "(interpreter)": a tiny model (d_model 64, 2 heads, 1 + 1 layers, N = 4, L = 32) where the
           fasttf backend runs its Triton attention under the interpreter (FASTTF_CPU_ATTENTION=triton;
           not a speed path).
"""

import pytest
import torch

import fasttf
from harness import DEVICE, ON_GPU, TINY, dtype_name, interpreter_active, measure

VOCAB = 1000


def configs():
    """(label, dtype, N, L, model kwargs) of every group on this device."""
    if TINY:
        return [("", torch.float32, 2, 8, dict(d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                               dim_feedforward=32))]
    if ON_GPU:
        big = dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048)
        return [("", torch.bfloat16, 16384 // length, length, big) for length in (128, 512)]
    return [(" (interpreter)", torch.float32, 4, 32,
             dict(d_model=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128)),
            (" (native)", torch.float32, 8, 64,
             dict(d_model=256, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=1024))]


@pytest.mark.parametrize("backend", ("fasttf", "torch"))
@pytest.mark.parametrize("config", configs(), ids=lambda c: f"{dtype_name(c[1])}-N{c[2]}-L{c[3]}-D{c[4]['d_model']}")
def test_training_step(benchmark, monkeypatch, config, backend):
    label, dtype, batch, length, kwargs = config
    if backend == "fasttf" and not ON_GPU:
        if label == " (interpreter)" and not interpreter_active():
            pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
        monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton" if label == " (interpreter)" else "native")
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    src, tgt = (torch.randint(2, VOCAB, (batch, length + 1), device=DEVICE, generator=generator) for _ in range(2))
    src = src[:, :length]

    def training_step(backend):
        """One step's closure over a fresh model (the same weights for both backends) and its Adam."""
        torch.manual_seed(0)
        model = fasttf.models.Transformer(VOCAB, VOCAB, dropout=0.1, max_len=max(length, 64), backend="torch",
                                          **kwargs)
        if backend == "fasttf":
            model = model.with_backend("fasttf")
        model = model.to(device=DEVICE, dtype=dtype).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            _, loss = model(src, tgt[:, :-1], tgt[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        return step

    step = training_step(backend)
    # the interleaved speedup against the torch backend, for fasttf's speed rows (not the interpreter's)
    twin = training_step("torch") if backend == "fasttf" and label != " (interpreter)" else None

    impl = "fasttf" if backend == "fasttf" else "torch (eager twin)"
    if backend == "fasttf" and not ON_GPU:
        impl += label
    layers = kwargs["num_encoder_layers"] + kwargs["num_decoder_layers"]
    measure(benchmark, step, group=f"training step {dtype_name(dtype)}{label}: N={batch} L={length} "
                                   f"D={kwargs['d_model']} H={kwargs['num_heads']} layers={layers}",
            impl=impl, eager_twin=backend == "torch", twin=twin, op="training step", mode="fwd+bwd+adam",
            dtype=dtype_name(dtype), batch=batch, seq_len=length, dim=kwargs["d_model"],
            series=f"training step {dtype_name(dtype)} D={kwargs['d_model']}{label}",
            tokens=2 * batch * length)
