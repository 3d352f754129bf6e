"""fasttf's ops: each a torch.autograd.Function over its kernels, registered as torch.ops.fasttf.*."""

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics a kernel saves for its backward (attention's lse, LayerNorm's
    mean and rstd): its math dtype, float64 for float64 inputs and float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32
