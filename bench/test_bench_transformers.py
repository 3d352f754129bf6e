"""A Hugging Face transformers Llama on attn_implementation="fasttf" against the same model on "sdpa"
and on "eager" (the eager twin: what transformers runs without an optimised backend), same weights:
the forward (eval, no grad) and a training step (forward, loss, backward, AdamW step, zero_grad).

    GPU: a Llama-style model of 8 layers, hidden 2048, 32 heads over 4 key/value heads (GQA),
         feed-forward 5632, vocab 32000, bfloat16, one sequence of L = 4096 tokens.
    CPU: two groups, as in test_bench_training_step.py: " (native)", a small model where the
         fasttf rows run fasttf's C++ attention kernel (FASTTF_CPU_ATTENTION=native, the CPU speed
         path), and " (interpreter)", a tiny model where they run the Triton kernel under the
         interpreter (FASTTF_CPU_ATTENTION=triton; not a speed path).
Needs the extra fasttf[transformers]; skipped without it.
"""

import pytest
import torch

from harness import DEVICE, ON_GPU, TINY, dtype_name, interpreter_active, measure

transformers = pytest.importorskip("transformers")


def configs():
    """(label, dtype, batch, length, LlamaConfig kwargs) of every group on this device."""
    if TINY:
        return [("", torch.float32, 1, 8, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=64))]
    if ON_GPU:
        return [("", torch.bfloat16, 1, 4096, dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                                  num_attention_heads=32, num_key_value_heads=4, vocab_size=32000))]
    return [(" (interpreter)", torch.float32, 1, 32, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)),
            (" (native)", torch.float32, 2, 256,
             dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1000))]


@pytest.mark.parametrize("implementation", ("fasttf", "sdpa", "eager"))
@pytest.mark.parametrize("mode", ("fwd", "train"))
@pytest.mark.parametrize("config", configs(),
                         ids=lambda c: f"{dtype_name(c[1])}-N{c[2]}-L{c[3]}-D{c[4]['hidden_size']}")
def test_llama(benchmark, monkeypatch, config, mode, implementation):
    label, dtype, batch, length, kwargs = config
    if implementation == "fasttf":
        import fasttf.integrations.transformers  # noqa: F401  (registers "fasttf")
        if not ON_GPU and label == " (interpreter)" and not interpreter_active():
            pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
        if not ON_GPU:
            monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton" if label == " (interpreter)" else "native")
    torch.manual_seed(0)
    config_ = transformers.LlamaConfig(max_position_embeddings=max(length, 64), **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config_, attn_implementation=implementation)
    model = model.to(device=DEVICE, dtype=dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, kwargs["vocab_size"], (batch, length), device=DEVICE, generator=generator)

    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return model(input_ids=ids).logits
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    impl = f'transformers "{implementation}"' + (label if implementation == "fasttf" and not ON_GPU else "")
    layers, hidden = kwargs["num_hidden_layers"], kwargs["hidden_size"]
    measure(benchmark, step, group=f"transformers Llama {mode} {dtype_name(dtype)}{label}: N={batch} L={length} "
                                   f"D={hidden} layers={layers}",
            impl=impl, eager_twin=implementation == "eager", op="transformers llama",
            mode="fwd" if mode == "fwd" else "fwd+bwd+adamw", dtype=dtype_name(dtype), batch=batch, seq_len=length,
            dim=hidden, series=f"transformers Llama {mode} {dtype_name(dtype)} D={hidden}{label}",
            tokens=batch * length)
