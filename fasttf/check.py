"""Runs every fasttf op, kernel against fasttf.reference (float64), and prints their agreement.

    python -m fasttf.check [--device cpu|cuda]

Exits non-zero when an op disagrees with its reference by more than the DESIGN.md rule allows.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import fasttf
from fasttf import reference
from fasttf.testing import FLOOR, max_error


def _cases(device, dtype):
    """(name, kernel thunk, float64 reference thunk, torch-in-dtype thunk) for each op."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = randn(2, 4, 37, 32), randn(2, 4, 45, 32), randn(2, 4, 45, 32)
    x, residual = randn(2, 37, 64), randn(2, 37, 64)
    weight, bias = randn(64), randn(64)
    d = lambda t: t.double()  # noqa: E731
    yield ("scaled_dot_product_attention (causal)",
           lambda: fasttf.scaled_dot_product_attention(q, k, v, is_causal=True),
           lambda: reference.scaled_dot_product_attention(d(q), d(k), d(v), is_causal=True),
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    yield ("positional_encoding",
           lambda: fasttf.positional_encoding(x, 3, scale=8.0),
           lambda: reference.positional_encoding(d(x), 3, scale=8.0),
           lambda: reference.positional_encoding(x, 3, scale=8.0))
    yield ("residual_add",
           lambda: fasttf.residual_add(x, residual),
           lambda: d(residual) + d(x),
           lambda: residual + x)
    yield ("add_layer_norm",
           lambda: fasttf.add_layer_norm(x, residual, weight, bias)[0],
           lambda: reference.add_layer_norm(d(x), d(residual), d(weight), d(bias))[0],
           lambda: F.layer_norm(residual + x, (64,), weight, bias))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if args.device == "cuda" else [])
    failed = 0
    print(f"fasttf {fasttf.__version__} on {args.device}, torch {torch.__version__}")
    print(f"{'op':40s} {'dtype':9s} {'fasttf err':>11s} {'torch err':>11s} {'ms':>8s}  verdict")
    for dtype in dtypes:
        for name, kernel, truth, baseline in _cases(args.device, dtype):
            start = time.perf_counter()
            out = kernel()
            elapsed = (time.perf_counter() - start) * 1e3
            expected = truth()
            error, torch_error = max_error(out, expected), max_error(baseline(), expected)
            ok = error <= 2 * torch_error + FLOOR[dtype]
            failed += not ok
            print(f"{name:40s} {str(dtype)[6:]:9s} {error:11.2e} {torch_error:11.2e} {elapsed:8.1f}  "
                  f"{'agrees' if ok else 'DISAGREES'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
