"""fasttf: the Transformer of the lecture notes on fused kernels, a one-line swap for PyTorch users.

    fasttf.scaled_dot_product_attention   Triton FlashAttention-2 kernel pair (kernels/attention.py)
    fasttf.MultiheadAttention             drop-in for torch.nn.MultiheadAttention on that kernel
    fasttf.positional_encoding            C++/CUDA extension fasttf._C
    fasttf.residual_add, add_layer_norm   C++/CUDA extension fasttf._C
    fasttf.dropout                        drop-in for torch.nn.functional.dropout, the same extension
    fasttf.models.Transformer             the encoder-decoder of the notes, backend "fasttf" or "torch"
    fasttf.reference                      plain-PyTorch twins of all of the above
"""

from fasttf import reference
from fasttf._checks import SecondOrderError
from fasttf._fallback import FallbackError, strict_mode
from fasttf.multihead_attention import MultiheadAttention, multi_head_attention_forward, replace_multihead_attention
from fasttf.ops.attention import scaled_dot_product_attention
from fasttf.ops.dropout import dropout
from fasttf.ops.positional_encoding import positional_encoding
from fasttf.ops.residual import add_layer_norm, residual_add

from fasttf import models  # noqa: E402  (models use the ops above)

__version__ = "0.1.0"

__all__ = [
    "FallbackError",
    "MultiheadAttention",
    "SecondOrderError",
    "add_layer_norm",
    "dropout",
    "models",
    "multi_head_attention_forward",
    "positional_encoding",
    "reference",
    "replace_multihead_attention",
    "residual_add",
    "scaled_dot_product_attention",
    "strict_mode",
]
