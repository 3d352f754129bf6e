"""positional_encoding: `x * scale + PE` in one pass of the extension's kernel.

    y[..., p, 2k]     = x[..., p, 2k] * scale     + sin(p * base^(-2k / D))
    y[..., p, 2k + 1] = x[..., p, 2k + 1] * scale + cos(p * base^(-2k / D))
    p = offset + position (offset: an int, or a LongTensor (N,) of per-sequence offsets)
    backward: dx = dy * scale (offset gets no gradient)

torch.ops.fasttf.positional_encoding(x, offsets, offset, scale, base, batch_first) is the op;
torch.ops.fasttf.positional_encoding_backward(grad, scale) its backward kernel.
"""

import torch

from fasttf import _extension
from fasttf._checks import check_same_device, check_tensor

_extension_ready = _extension.is_available()

if _extension_ready:

    @torch.library.register_fake("fasttf::positional_encoding")
    def _positional_encoding_fake(x, offsets, offset, scale, base, batch_first):
        # also the op's Meta kernel, picked when any argument is on meta: the real kernels' device check
        check_same_device("positional_encoding", x=x, offset=offsets)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fasttf::positional_encoding_backward")
    def _positional_encoding_backward_fake(grad, scale):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    # positional_encoding's autograd kernel is in C++ (csrc/autograd.cpp): dx = positional_encoding_backward(dy, scale)

    def _setup_backward_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    def _backward_backward(ctx, grad):  # the backward is linear in grad: its own backward is itself
        return torch.ops.fasttf.positional_encoding_backward(grad, ctx.scale), None

    torch.library.register_autograd("fasttf::positional_encoding_backward", _backward_backward,
                                    setup_context=_setup_backward_context)


def positional_encoding(x: torch.Tensor, offset=0, *, scale: float = 1.0, base: float = 10000.0,
                        batch_first: bool = True) -> torch.Tensor:
    """`x * scale + PE` for x of shape (N, T, D), (T, N, D) with batch_first=False, or (T, D)."""
    if type(offset) is int and (extension := _extension.direct(x)) is not None:
        return extension.positional_encoding(x, None, offset, float(scale), float(base), bool(batch_first))
    op = "positional_encoding"
    check_tensor(op, "x", x)
    offsets = None
    if isinstance(offset, torch.Tensor):
        check_same_device(op, x=x, offset=offset)
        if offset.dtype != torch.int64:
            raise ValueError(f"fasttf.{op}: expected offset to be an int or an int64 tensor, got {offset.dtype}")
        if offset.dim() == 0:
            offset = int(offset)
        else:
            batch = x.size(0) if batch_first else (x.size(1) if x.dim() == 3 else None)
            if x.dim() != 3 or offset.shape != (batch,):
                raise ValueError(f"fasttf.{op}: expected a tensor offset of shape (N,) = ({batch},) for x of shape "
                                 f"{tuple(x.shape)} (batch_first={batch_first}), got {tuple(offset.shape)}")
            offsets, offset = offset, 0
    elif isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"fasttf.{op}: expected offset to be an int or an int64 tensor, got {type(offset).__name__}")
    extension = _extension.require(op)
    if torch.compiler.is_compiling():
        return torch.ops.fasttf.positional_encoding.default(x, offsets, offset, float(scale), float(base),
                                                            bool(batch_first))
    # the same op through pybind11: ~1.5 us less a call
    return extension.positional_encoding(x, offsets, offset, float(scale), float(base), bool(batch_first))
