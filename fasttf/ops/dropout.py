"""dropout: torch.nn.functional.dropout on the extension's Philox mask, one pass each way.

    out = input * m,   m = keep / (1 - p),   keep = Philox(seed, flat index) >= floor(p * 2^32)
    backward: dinput = dout * m, the mask regenerated from the seed (nothing stored)

The mask is the one residual_add and add_layer_norm draw (csrc/philox.h): the seed is a 0-dim int64
CPU tensor drawn from torch's default generator, so torch.manual_seed repeats a call, and
`fasttf.ops.residual.dropout_keep_mask(input, p, seed)` gives the keep bits a seed drew. On the CPU
torch's own dropout draws its mask with bernoulli_ from a Mersenne Twister, one element at a time on
one thread: ~10 ns an element on a core of the CPU report's AMD EPYC, this pass ~0.8 (the multipliers
in registers, csrc/cpu/dropout.cpp's dropout_scale), so 8-12x faster forward, 5-7x forward+backward.

Op: torch.ops.fasttf.dropout(input, dropout_p, seed), differentiable (its backward is itself with
the same seed, so second-order gradients work too); fasttf.dropout calls it through pybind11 in eager
mode, as residual_add does.
"""

import torch

from fasttf import _extension
from fasttf.ops.residual import dropout_seed

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

if _extension.is_available():

    @torch.library.register_fake("fasttf::dropout")
    def _dropout_fake(input, dropout_p, seed):
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    # its autograd kernel is in C++ (csrc/autograd.cpp: a plain graph node keeping the seed)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`torch.nn.functional.dropout(input, p, training, inplace)`, the mask from fasttf's Philox stream.

    As torch's: `input` itself when not training or p = 0, `input * 0` at p = 1 (NaN stays NaN),
    ValueError for p outside [0, 1]; `inplace` writes the result into `input` and returns it.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"fasttf.dropout: expected input to be a torch.Tensor, got {type(input).__name__}")
    if not 0.0 <= p <= 1.0:  # `not` so that NaN fails too
        raise ValueError(f"fasttf.dropout: expected p in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if input.dtype not in _DTYPES:
        raise RuntimeError(f"fasttf.dropout: expected input to be float32, float64, float16 or bfloat16, "
                           f"got {input.dtype}")
    if p == 1.0:  # nothing kept; the threshold 2^32 has no uint32, so no kernel call
        return input.mul_(0.0) if inplace else input * 0.0
    extension = _extension.require("dropout")
    if torch.compiler.is_compiling():
        out = torch.ops.fasttf.dropout.default(input, float(p), dropout_seed())
    else:  # the same op through pybind11: ~1.5 us less a call
        out = extension.dropout(input, float(p), dropout_seed())
    return input.copy_(out) if inplace else out
