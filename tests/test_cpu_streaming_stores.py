"""The CPU elementwise ops' streaming stores (csrc/cpu/row_math.h): a call that moves at least half
the last-level cache writes its outputs past the caches. The values are the same either way: each
op's outputs and gradients with every call streamed (FASTTF_CPU_STREAM_MIN_BYTES=0, read once per
process, so in a fresh one) equal those of a process that streams none, bit for bit, at each x86
path (FASTTF_CPU_ISA) -- rows aligned and not (D = 7, 65), every dtype, with and without dropout,
grad_s, weight and bias. test_cpu_isa_fallbacks.py runs the ops' own tests with every call streamed.

Run as a script (`python test_cpu_streaming_stores.py OUT`) it saves those outputs to OUT."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fasttf
from fasttf import _C

HERE = Path(__file__)
NEVER = str(1 << 62)
STREAMS_HERE = sys.platform.startswith("linux") and _C._cpu_streams_stores(1 << 40)


def outputs():
    """Every output and gradient of the three ops over a grid of small cases, by case name."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for dim in (7, 64, 65, 512):
            generator = torch.Generator().manual_seed(dim)
            shape = (3, 5, dim)

            def rand(*size):
                return torch.randn(size, generator=generator).to(dtype).requires_grad_()

            x, residual, weight, bias = rand(*shape), rand(*shape), rand(dim), rand(dim)
            grad_out, grad_s = torch.randn(shape, generator=generator).to(dtype), rand(*shape).detach()
            inputs = (x, residual, weight, bias)
            for p in (0.0, 0.2):
                for affine in (True, False):
                    torch.manual_seed(1)
                    out, s = fasttf.add_layer_norm(x, residual, weight if affine else None, bias if affine else None,
                                                   dropout_p=p)
                    wanted = inputs if affine else inputs[:2]
                    grads = torch.autograd.grad((out, s), wanted, (grad_out, grad_s))
                    results[f"add_layer_norm {dtype} D={dim} p={p} affine={affine}"] = (out, s) + grads
                torch.manual_seed(1)
                out = fasttf.residual_add(x, residual, dropout_p=p)
                results[f"residual_add {dtype} D={dim} p={p}"] = (out,) + torch.autograd.grad(out, (x, residual),
                                                                                              grad_out)
            if dim % 2 == 0:
                out = fasttf.positional_encoding(x, 3, scale=1.5)
                results[f"positional_encoding {dtype} D={dim}"] = (out,) + torch.autograd.grad(out, x, grad_out)
    return {name: [t.detach() for t in tensors] for name, tensors in results.items()}


def bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def outputs_in_a_process(tmp_path, name, **env):
    path = tmp_path / f"{name}.pt"
    result = subprocess.run([sys.executable, str(HERE), str(path)], env=dict(os.environ, **env), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(path)


def test_the_bound_is_read_once_from_the_environment():
    script = ("from fasttf import _C; import sys; "
              "print(_C._cpu_streams_stores(0), _C._cpu_streams_stores(999), _C._cpu_streams_stores(1000))")
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, FASTTF_CPU_STREAM_MIN_BYTES="1000"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = "False False True" if STREAMS_HERE else "False False False"
    assert result.stdout.split("\n")[0] == expected


@pytest.mark.skipif(not STREAMS_HERE, reason="streaming stores: x86-64 Linux builds (GCC's per-ISA builds) only")
def test_default_bound_half_the_last_level_cache():
    assert not _C._cpu_streams_stores(1 << 20)  # 1 MiB: stays cached on any CPU with a 2 MiB or larger cache
    assert _C._cpu_streams_stores(1 << 33)


@pytest.mark.skipif(not STREAMS_HERE, reason="streaming stores: x86-64 Linux builds (GCC's per-ISA builds) only")
@pytest.mark.parametrize("isa", ["best", "avx2", "generic"])
def test_streamed_outputs_equal_cached_ones_bit_for_bit(tmp_path, isa):
    env = {} if isa == "best" else {"FASTTF_CPU_ISA": isa}
    streamed = outputs_in_a_process(tmp_path, "streamed", FASTTF_CPU_STREAM_MIN_BYTES="0", **env)
    cached = outputs_in_a_process(tmp_path, "cached", FASTTF_CPU_STREAM_MIN_BYTES=NEVER, **env)
    assert streamed.keys() == cached.keys() and len(streamed) == 4 * (4 * (4 + 2) + 2)
    for name in streamed:
        assert len(streamed[name]) == len(cached[name]), name
        for a, b in zip(streamed[name], cached[name]):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(bits(a), bits(b)), name


if __name__ == "__main__":
    torch.save(outputs(), sys.argv[1])
