"""The accuracy rule of DESIGN.md, for the tests (and for anyone checking a kernel).

A kernel's result in dtype T passes when its error against a float64 reference is at most twice
the error of PyTorch's own implementation in dtype T against the same reference, plus a small
absolute floor (the rule flash-attention's tests use).
"""

import torch

# The absolute floor added to 2x torch's error, per dtype: a few units in the last place at O(1).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                              name: str = "output", floor: float | None = None) -> None:
    """actual: the kernel's result; reference: float64 truth; baseline: torch's own result in
    actual's dtype. Fails with both errors in the message."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in the kernel's result"
    floor = FLOOR.get(actual.dtype, 1e-5) if floor is None else floor
    error, torch_error = max_error(actual, reference), max_error(baseline, reference)
    bound = 2.0 * torch_error + floor
    assert error <= bound, (f"{name}: max error {error:.3g} vs float64 > bound {bound:.3g} "
                            f"(2 x torch's error {torch_error:.3g} + floor {floor:.3g}) in {actual.dtype}")
