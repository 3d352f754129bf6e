"""fasttf's ops: each a torch.autograd.Function over its kernels, registered as torch.ops.fasttf.*."""

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics a kernel saves for its backward (attention's lse, LayerNorm's
    mean and rstd): its math dtype, float64 for float64 inputs and float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_output_like(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An empty attention output as every fasttf attention kernel returns it: (N, H, L, Ev), laid out
    (N, L, H, Ev) in memory (torch's flash layout: merging the heads afterwards is a view, not a copy)."""
    batch, heads, length, _ = query.shape
    return query.new_empty((batch, length, heads, value.size(3))).transpose(1, 2)
