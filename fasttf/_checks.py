"""Input checks shared by the Python entry points. Each error names the op and the argument."""

import torch


class SecondOrderError(RuntimeError):
    """A second-order gradient through an op whose backward kernels are not differentiable."""


def no_second_order(op: str, instead: str):
    """An autograd backward for a backward op: raises SecondOrderError naming the op and what to
    use instead, so a double backward never runs silently wrong (nor warns)."""

    def backward(ctx, *grads):
        raise SecondOrderError(f"fasttf.{op}: second-order gradients (differentiating its gradient again, "
                               f"e.g. after torch.autograd.grad(..., create_graph=True)) are not supported by its "
                               f"kernels; use {instead} for double backward")

    return backward


def check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fasttf.{op}: expected {name} to be a torch.Tensor, got {type(value).__name__}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """All the given (non-None) tensors must live on one device; the first one named sets it."""
    first_name, first = None, None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        check_tensor(op, name, tensor)
        if first is None:
            first_name, first = name, tensor
        elif tensor.device != first.device:
            raise RuntimeError(f"fasttf.{op}: expected all tensors on one device, but {first_name} is on "
                               f"{first.device} and {name} is on {tensor.device}")


def check_dropout_p(op: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fasttf.{op}: expected dropout_p in [0, 1), got {dropout_p}")
