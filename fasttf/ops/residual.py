"""residual_add and add_layer_norm: the extension's kernels as autograd-aware torch.library ops.

    residual_add:    out = residual + x * m
    add_layer_norm:  s = residual + x * m,  out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias
    m = keep / (1 - dropout_p) with keep from Philox(seed, flat index) (csrc/philox.h); m = 1 when
    dropout is off. The seed is a 0-dim int64 CPU tensor drawn from torch's default (CPU)
    generator, so torch.manual_seed makes the mask repeatable, and the same seed gives the same
    mask on the CPU and the GPU; the backward regenerates the mask from it (nothing stored).

Ops: torch.ops.fasttf.residual_add(x, residual, dropout_p, seed),
residual_add_backward(grad, dropout_p, seed) -> dx, dropout_keep_mask(like, dropout_p, seed),
add_layer_norm(x, residual, weight, bias, eps, dropout_p, seed) -> (out, s, mean, rstd),
add_layer_norm_backward(grad_out, grad_s, s, mean, rstd, weight, need_dweight, need_dbias,
dropout_p, seed) -> (dresidual, dx, dweight, dbias); dx is empty when dropout is off (then dx =
dresidual), dweight/dbias are empty when not asked for.
"""

import torch

from fasttf import _extension
from fasttf._checks import check_dropout_p, check_same_device, no_second_order
from fasttf.ops import stat_dtype

_extension_ready = _extension.is_available()
_SEED_HIGH = 2 ** 62


def dropout_seed() -> torch.Tensor:
    """A fresh dropout seed from torch's default CPU generator (a 0-dim int64 CPU tensor)."""
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device="cpu")


def dropout_keep_mask(like: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The keep-mask (bool, shaped like `like`) that residual_add/add_layer_norm draw for this seed."""
    check_dropout_p("dropout_keep_mask", dropout_p)
    _extension.require("dropout_keep_mask")
    return torch.ops.fasttf.dropout_keep_mask(like, float(dropout_p), seed)


if _extension_ready:

    @torch.library.register_fake("fasttf::residual_add")
    def _residual_add_fake(x, residual, dropout_p=0.0, seed=None):
        # also the op's Meta kernel, which the dispatcher picks when any argument is on meta: the
        # device check of the real kernels has to be here too
        check_same_device("residual_add", x=x, residual=residual)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fasttf::residual_add_backward")
    def _residual_add_backward_fake(grad, dropout_p, seed):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fasttf::dropout_keep_mask")
    def _dropout_keep_mask_fake(like, dropout_p, seed):
        return torch.empty(like.shape, dtype=torch.bool, device=like.device)

    # residual_add's and add_layer_norm's autograd kernels are in C++ (csrc/autograd.cpp): no Python
    # autograd.Function on the way of a call.

    def _residual_add_backward_setup(ctx, inputs, output):
        ctx.dropout_p, ctx.seed = inputs[1], inputs[2]

    def _residual_add_backward_backward(ctx, grad):  # dx = dy * m is linear in dy
        return torch.ops.fasttf.residual_add_backward(grad, ctx.dropout_p, ctx.seed), None, None

    torch.library.register_autograd("fasttf::residual_add_backward", _residual_add_backward_backward,
                                    setup_context=_residual_add_backward_setup)

    @torch.library.register_fake("fasttf::add_layer_norm")
    def _add_layer_norm_fake(x, residual, weight, bias, eps, dropout_p, seed):
        check_same_device("add_layer_norm", x=x, residual=residual, weight=weight, bias=bias)  # (see above)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        s = torch.empty_like(x, memory_format=torch.contiguous_format)
        rows = x.numel() // x.size(-1)
        stats = dict(dtype=stat_dtype(x.dtype), device=x.device)
        return out, s, torch.empty(rows, **stats), torch.empty(rows, **stats)

    @torch.library.register_fake("fasttf::add_layer_norm_backward")
    def _add_layer_norm_backward_fake(grad_out, grad_s, s, mean, rstd, weight, need_dweight, need_dbias,
                                      dropout_p, seed):
        dim = s.size(-1)
        dres = torch.empty_like(s, memory_format=torch.contiguous_format)
        dx = torch.empty_like(s, memory_format=torch.contiguous_format) if dropout_p > 0.0 else s.new_empty(0)
        return (dres, dx, s.new_empty(dim if need_dweight else 0), s.new_empty(dim if need_dbias else 0))

    torch.library.register_autograd(  # its backward is not differentiable: a clear error, never a silent one
        "fasttf::add_layer_norm_backward",
        no_second_order("add_layer_norm", "torch.nn.functional.layer_norm(residual + dropout(x), ...)"),
        setup_context=lambda ctx, inputs, output: None)


def _drops_nothing(dropout_p, training: bool) -> bool:
    """p = 0, or eval mode with a valid p: the call may take the op's direct entry without dropout
    (an invalid p still reaches check_dropout_p and raises, in eval mode too)."""
    return dropout_p == 0.0 or (not training and 0.0 <= dropout_p < 1.0)


def residual_add(x: torch.Tensor, residual: torch.Tensor, *, dropout_p: float = 0.0,
                 training: bool = True) -> torch.Tensor:
    """`residual + dropout(x)` in one pass of the extension's kernel."""
    if _drops_nothing(dropout_p, training) and (extension := _extension.direct(x, residual)) is not None:
        return extension.residual_add(x, residual, 0.0, None)
    check_same_device("residual_add", x=x, residual=residual)
    check_dropout_p("residual_add", dropout_p)
    extension = _extension.require("residual_add")
    p = float(dropout_p) if training else 0.0
    seed = dropout_seed() if p > 0.0 else None
    if torch.compiler.is_compiling():
        return torch.ops.fasttf.residual_add.default(x, residual, p, seed)
    return extension.residual_add(x, residual, p, seed)  # the same op through pybind11: ~1.5 us less a call


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   *, eps: float = 1e-5, dropout_p: float = 0.0, training: bool = True):
    """`(layer_norm(s) * weight + bias, s)` with `s = residual + dropout(x)`, one pass over x and residual."""
    if _drops_nothing(dropout_p, training) and (extension := _extension.direct(x, residual, weight, bias)) is not None:
        out, s, _, _ = extension.add_layer_norm(x, residual, weight, bias, float(eps), 0.0, None)
        return out, s
    op = "add_layer_norm"
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)
    check_dropout_p(op, dropout_p)
    if not eps >= 0.0:
        raise ValueError(f"fasttf.{op}: expected eps >= 0, got {eps}")
    extension = _extension.require(op)
    p = float(dropout_p) if training else 0.0
    seed = dropout_seed() if p > 0.0 else None
    if torch.compiler.is_compiling():
        out, s, _, _ = torch.ops.fasttf.add_layer_norm.default(x, residual, weight, bias, float(eps), p, seed)
    else:  # the same op through pybind11: ~1.5 us less a call
        out, s, _, _ = extension.add_layer_norm(x, residual, weight, bias, float(eps), p, seed)
    return out, s
