"""Plain-PyTorch versions of every fasttf op, written to be read, not to be fast.

Every kernel in fasttf is tested against these, and these are tested against torch itself
(tests/test_reference.py). They run in whatever dtype they are given: the tests pass float64
copies to get a reference of known accuracy.
"""

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Attention


def attention_probs(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T * scale + mask) over the keys, shape (..., H, L, S).

    A bool mask says True = attend; a float mask is added to the scores; `is_causal` keeps key j
    for query i when j <= i (top-left aligned, torch's `tril(ones(L, S))`). A row whose every key
    is masked gets probabilities 0 (so output 0 and zero gradients), never NaN.
    """
    length_q, length_k = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale

    allowed = None
    if is_causal:
        allowed = torch.ones(length_q, length_k, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            scores = scores + attn_mask
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))

    empty_row = scores.amax(dim=-1, keepdim=True) == float("-inf")
    probs = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1)
    return probs.masked_fill(empty_row, 0.0)


def dropout_mask_like(tensor, dropout_p, generator=None):
    """A fresh keep-mask: True where a value survives dropout with probability 1 - dropout_p."""
    noise = torch.rand(tensor.shape, generator=generator, device=tensor.device)
    return noise >= dropout_p


def apply_dropout(values, dropout_p, dropout_mask=None):
    """Dropout with a given keep-mask (or a fresh one): kept values are scaled by 1 / (1 - p)."""
    if dropout_p == 0.0:
        return values
    if dropout_mask is None:
        dropout_mask = dropout_mask_like(values, dropout_p)
    return values * dropout_mask / (1.0 - dropout_p)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, dropout_mask=None):
    """torch.nn.functional.scaled_dot_product_attention, spelled out.

    q (N, H, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev) -> (N, H, L, Ev). `dropout_mask`, a bool
    keep-mask of shape (N, H, L, S), lets a test replay the dropout a kernel drew.
    """
    probs = attention_probs(query, key, attn_mask, is_causal, scale, enable_gqa)
    probs = apply_dropout(probs, dropout_p, dropout_mask)
    if enable_gqa:
        value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
    return probs @ value


def multi_head_attention(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                         out_proj_bias, key_padding_mask=None, attn_mask=None, need_weights=True,
                         average_attn_weights=True, dropout_p=0.0):
    """nn.MultiheadAttention's forward for (L, N, D) inputs, spelled out.

    Masks follow nn.MultiheadAttention: a bool True means *masked*; float masks are added.
    attn_mask is (L, S) or (N * num_heads, L, S); key_padding_mask is (N, S).
    Returns (output (L, N, D), weights (N, L, S) averaged or (N, H, L, S) per head, or None).
    """
    length_q, batch, embed_dim = query.shape
    length_k = key.size(0)
    head_dim = embed_dim // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def split_heads(x, length):  # (length, N, D) -> (N, H, length, head_dim)
        return x.reshape(length, batch, num_heads, head_dim).permute(1, 2, 0, 3)

    q = split_heads(F.linear(query, w_q, b_q), length_q)
    k = split_heads(F.linear(key, w_k, b_k), length_k)
    v = split_heads(F.linear(value, w_v, b_v), length_k)

    def as_additive(mask):  # bool True = masked -> -inf; float stays as it is
        if mask is None or mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))

    mask = as_additive(attn_mask)
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(batch, num_heads, length_q, length_k)
    if key_padding_mask is not None:
        padding = as_additive(key_padding_mask).reshape(batch, 1, 1, length_k)
        mask = padding if mask is None else mask + padding

    probs = attention_probs(q, k, mask)
    heads = apply_dropout(probs, dropout_p) @ v  # (N, H, L, head_dim)
    merged = heads.permute(2, 0, 1, 3).reshape(length_q, batch, embed_dim)
    output = F.linear(merged, out_proj_weight, out_proj_bias)
    if not need_weights:
        return output, None
    return output, probs.mean(dim=1) if average_attn_weights else probs


# ----------------------------------------------------------------------------------------------
# Positional encoding, residual add, add + LayerNorm


def sinusoid_table(positions, dim, base=10000.0):
    """PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(p / base^(2i/D)), in float64.

    `positions` is a tensor of any shape; the result has one more dim of size `dim`.
    """
    pair = torch.arange(dim, device=positions.device) // 2
    inv_freq = base ** (-(2.0 * pair.double()) / dim)
    angles = positions.double().unsqueeze(-1) * inv_freq
    even = (torch.arange(dim, device=positions.device) % 2) == 0
    return torch.where(even, torch.sin(angles), torch.cos(angles))


def positional_encoding(x, offset=0, *, scale=1.0, base=10000.0, batch_first=True):
    """x * scale + PE, with p = offset + position; x is (N, T, D), (T, N, D) or (T, D).

    `offset` is an int or a LongTensor (N,) of per-sequence offsets (decoding with a cache).
    """
    dim = x.size(-1)
    time_dim = 0 if (x.dim() == 2 or not batch_first) else 1
    length = x.size(time_dim)
    steps = torch.arange(length, device=x.device)
    if isinstance(offset, torch.Tensor) and offset.dim() == 1:
        positions = offset.to(x.device).unsqueeze(1) + steps  # (N, T)
        if not batch_first:
            positions = positions.t()  # (T, N)
    else:
        positions = steps + int(offset)
        if x.dim() == 3:
            positions = positions.unsqueeze(0) if batch_first else positions.unsqueeze(1)
    pe = sinusoid_table(positions, dim, base)
    return (x.double() * scale + pe).to(x.dtype)


def dropout(input, p=0.5, training=True, inplace=False, dropout_mask=None):
    """torch.nn.functional.dropout: kept values scaled by 1 / (1 - p), the others 0 (all 0 at p = 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    out = input * 0.0 if p == 1.0 else apply_dropout(input, p, dropout_mask)
    return input.copy_(out) if inplace else out


def residual_add(x, residual, *, dropout_p=0.0, training=True, dropout_mask=None):
    """residual + dropout(x): the residual connection of the notes."""
    if training and dropout_p > 0.0:
        x = apply_dropout(x, dropout_p, dropout_mask)
    return residual + x


def layer_norm(s, weight, bias, eps=1e-5):
    """(s - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance)."""
    mean = s.mean(dim=-1, keepdim=True)
    var = ((s - mean) ** 2).mean(dim=-1, keepdim=True)
    normed = (s - mean) / torch.sqrt(var + eps)
    if weight is not None:
        normed = normed * weight
    if bias is not None:
        normed = normed + bias
    return normed


def add_layer_norm(x, residual, weight, bias, *, eps=1e-5, dropout_p=0.0, training=True, dropout_mask=None):
    """(layer_norm(s), s) with s = residual + dropout(x): serves post-LN (use the first) and pre-LN."""
    s = residual_add(x, residual, dropout_p=dropout_p, training=training, dropout_mask=dropout_mask)
    return layer_norm(s, weight, bias, eps), s


# ----------------------------------------------------------------------------------------------
# The encoder-decoder Transformer of the lecture notes


def Transformer(*args, **kwargs):  # noqa: N802  (a constructor, named as the class it builds)
    """The notes' encoder-decoder in plain PyTorch: `fasttf.models.Transformer(backend="torch")`.

    One model file serves both backends; with backend="torch" it uses only nn.MultiheadAttention,
    the eager positional encoding above and F.layer_norm(residual + dropout(x)).
    """
    from fasttf.models.transformer import Transformer as Model

    return Model(*args, backend="torch", **kwargs)
