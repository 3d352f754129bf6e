"""fasttf.MultiheadAttention: torch.nn.MultiheadAttention on fasttf's fused attention kernel.

A true drop-in. The class subclasses `torch.nn.MultiheadAttention` and keeps its constructor,
attributes, parameter initialisation and `state_dict` keys, so checkpoints load both ways; only
`forward` is new, and it is built on `multi_head_attention_forward` below, which has the exact
signature and semantics (checks, error types and messages, warnings) of
`torch.nn.functional.multi_head_attention_forward`.

Where the attention itself runs:

- `need_weights=False`: fasttf's fused kernel (`fasttf.scaled_dot_product_attention`), in training
  and inference, forward and backward, whatever the options (masks, `add_bias_kv`,
  `add_zero_attn`, `kdim/vdim`, `static_k/v`, dropout). Masks reach the kernel as small as torch's
  semantics allow: an `(L, S)` mask stays `(L, S)`, a key padding mask is viewed as `(N, 1, 1, S)`,
  an `(N * num_heads, L, S)` mask is viewed (not copied) as `(N, num_heads, L, S)`; when both a
  mask and a key padding mask are given they are merged as torch merges them (bool: either
  masks; float: added), into `(N, 1, L, S)`, or `(N, num_heads, L, S)` only if the attn mask
  already is that big.
- The in-projection is one matmul for self-attention (two when only key is value, as torch's) and
  q, k, v reach the kernel as strided views of its product, never copied into a head-major layout.
- Inference (no_grad / inference_mode) without dropout or an attn_mask on the CPU kernel, the call
  of a decode step or an encoder in eval, with or without the weights or a key padding mask: the
  whole forward in one C++ op (fasttf::native_multi_head_attention, the same ATen calls and
  kernels, so the same bits), where torch's module takes its own C++ fast path; the Python path's
  tensor calls cost ~50 us at one token.
- `need_weights=True`: the same kernel, and a second one that writes the weights from the saved
  log-sum-exp (`fasttf.ops.attention.attention_with_weights`): `(N, L, S)` averaged over the heads
  inside the kernel when `average_attn_weights=True`, else `(N, num_heads, L, S)`; after dropout,
  with the keep bits the output used, as torch returns them. Their gradient flows back through
  the backward kernels; nothing of size L x S is saved for backward -- the only L x S memory is
  the weights the caller asked for.
- A float mask that requires grad (a learned bias): the kernels give its gradient, summed over
  the dims it was broadcast along. Only a dtype the kernel lacks (float64) or a head dim over 256
  leaves the kernel, through `fall_back()` (FASTTF_STRICT=1 makes it an error).

Fully masked rows (a query whose every key is masked): torch's `need_weights=True` path returns
NaN there (softmax over nothing); fasttf returns what torch's SDPA path (`need_weights=False`)
returns: attention output 0 before the output projection (so `out_proj.bias` after it), weights
0, gradients 0 -- on both paths, never NaN.

Mask conventions (torch's): in this module a bool True means *masked* (the opposite of
`scaled_dot_product_attention`, where True means attend); a float mask is added to the scores.
`is_causal` is, as in torch, a hint that `attn_mask` is the causal mask: it needs `attn_mask`,
and the kernel's own causal masking replaces the mask only when there is no key padding mask
and no weights are asked for (torch's weights path reads the mask itself).
"""

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttf.ops import attention as _attention_op  # looked up at call time: tests can spy on it

# ----------------------------------------------------------------------------------------------
# Masks. Inside this file a mask stays in torch MHA's convention (bool True = masked, float =
# added) until it is handed to the kernel, which wants SDPA's (bool True = attend).


def _check_mask_dtype(mask: Tensor | None, mask_name: str) -> None:
    """torch's `_canonical_mask` check: only bool and floating masks."""
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {mask_name} are supported")


_MODULE_CALL_FILE = nn.modules.module.__file__  # torch's Module.__call__ (_wrapped_call_impl, _call_impl)


def _warn_if_mismatched(key_padding_mask: Tensor | None, attn_mask: Tensor | None, stacklevel: int) -> None:
    """torch's deprecation warning for a key padding mask and an attn mask of different dtypes,
    located at the line that called fasttf: `stacklevel` is warnings.warn's as counted from this
    function, naming the entry point's caller; it is moved on past the frames of torch's
    Module.__call__ (how many depends on hooks and on the torch version), so that a module's
    warning names the line that called the module, not torch's module.py."""
    if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
        try:
            frame = sys._getframe(stacklevel - 1)  # the frame that stacklevel names
        except ValueError:  # fewer frames than that: leave it to warnings.warn
            frame = None
        while frame is not None and frame.f_back is not None and frame.f_code.co_filename == _MODULE_CALL_FILE:
            frame = frame.f_back
            stacklevel += 1
        warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                      "Use same type for both instead.", stacklevel=stacklevel)


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = masked) as torch turns it into a float one: 0 or -inf, in `dtype`."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _append_unmasked_key(mask: Tensor | None) -> Tensor | None:
    """One more key column that nothing masks (for bias_k/bias_v and add_zero_attn)."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_zeros(mask.shape[:-1] + (1,))], dim=-1)


def _merge_for_sdpa(attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """attn_mask (L, S) or (N, H, L, S) and key_padding_mask (N, 1, 1, S), MHA convention, into one
    mask in SDPA's convention, broadcastable to (N, H, L, S) and no bigger than it must be.

    Both bool: masked where either masks, returned as True = attend. Otherwise both become
    additive (bool -> 0 / -inf in the query's dtype, as torch does) and are added. (A key padding
    mask alone is turned so in C++ too, by the one-op inference call: csrc/cpu/multi_head_attention.cpp.)"""
    masks = [mask for mask in (attn_mask, key_padding_mask) if mask is not None]
    if not masks:
        return None
    if all(mask.dtype == torch.bool for mask in masks):
        masked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~masked
    additive = [_as_additive(mask, dtype) for mask in masks]
    return additive[0] if len(additive) == 1 else additive[0] + additive[1]


# ----------------------------------------------------------------------------------------------
# Projections


def _in_projection_packed(query: Tensor, key: Tensor, value: Tensor, weight: Tensor,
                          bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """torch's `F._in_projection_packed` (one matmul when query is key is value, two when only key
    is value, else three) without its copy: q, k, v come back as strided views of the product, which
    the kernel reads as they are, and `unbind`'s backward writes their gradients into one tensor
    (torch's indexing would zero-fill three and add them)."""
    embed_dim = query.size(-1)
    if key is value:
        if query is key:
            return _split_last(F.linear(query, weight, bias), 3, embed_dim).unbind(-2)
        weight_q, weight_kv = weight.split([embed_dim, 2 * embed_dim])
        b_q, b_kv = (None, None) if bias is None else bias.split([embed_dim, 2 * embed_dim])
        k, v = _split_last(F.linear(key, weight_kv, b_kv), 2, embed_dim).unbind(-2)
        return F.linear(query, weight_q, b_q), k, v
    weight_q, weight_k, weight_v = weight.chunk(3)
    b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
    return F.linear(query, weight_q, b_q), F.linear(key, weight_k, b_k), F.linear(value, weight_v, b_v)


def _split_last(x: Tensor, parts: int, size: int) -> Tensor:
    """x (..., parts * size) as (..., parts, size): a view (Tensor.unflatten, the same, costs ~1.5 us more)."""
    return x.view(*x.shape[:-1], parts, size)


def _split_heads(x: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """(S, N, H * E), or (N, S, H * E) when batch_first, -> (N, H, S, E): a view of any strided x."""
    heads = _split_last(x, num_heads, x.size(-1) // num_heads)
    return heads.transpose(1, 2) if batch_first else heads.permute(1, 2, 0, 3)


def _out_projection(heads: Tensor, weight: Tensor, bias: Tensor | None, batch_first: bool) -> Tensor:
    """(N, H, L, E) -> (N * L, H * E) -> out projection -> (N, L, embed_dim), or the same in (L, N)
    order: the kernel's output is laid out (N, L, H, E), so the batch-first merge is a view."""
    bsz, num_heads, tgt_len, head_dim = heads.shape
    if batch_first:
        merged = heads.transpose(1, 2).reshape(bsz * tgt_len, num_heads * head_dim)
        return F.linear(merged, weight, bias).view(bsz, tgt_len, -1)
    merged = heads.permute(2, 0, 1, 3).reshape(tgt_len * bsz, num_heads * head_dim)
    return F.linear(merged, weight, bias).view(tgt_len, bsz, -1)


# ----------------------------------------------------------------------------------------------
# The functional form


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`torch.nn.functional.multi_head_attention_forward`, on fasttf's fused kernel.

    Same signature, shapes, checks, error types and messages as torch's (query `(L, N, E)` or
    unbatched `(L, E)`, sequence first). The attention runs in fasttf's fused kernel
    (`fasttf.scaled_dot_product_attention`, and with `need_weights=True` the weights kernel too).
    Fully masked rows give attention output 0 (before the output projection) and weights 0,
    never NaN.
    """
    return _multi_head_attention_forward(
        query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
        add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask, need_weights,
        attn_mask, use_separate_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight, static_k, static_v,
        average_attn_weights, is_causal, batch_first=False, stacklevel=2)


def _as_torch_sees(x: Tensor, batch_first: bool) -> torch.Size:
    """x's shape as torch's module reports it in errors: sequence first (it transposes batch-first input)."""
    return x.transpose(0, 1).shape if batch_first else x.shape


def _multi_head_attention_forward(
    query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn,
    dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask, need_weights, attn_mask,
    use_separate_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight, static_k, static_v, average_attn_weights,
    is_causal, *, batch_first: bool, stacklevel: int,
) -> tuple[Tensor, Tensor | None]:
    """multi_head_attention_forward, whose 3-D query, key, value and output are (N, L, E) when
    batch_first (fasttf.MultiheadAttention(batch_first=True) calls it so: the projections read and
    write its tensors as they are, no transposed copies), else (L, N, E). `stacklevel`: the one
    warnings.warn would take in the entry point that calls this (2: that entry point's caller),
    for the mismatched-masks warning."""
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:  # run as a batch of one, squeeze at the end
        batch_first = False
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)

    if batch_first:
        bsz, tgt_len, embed_dim = query.shape
        src_len = key.shape[1]
    else:
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]

    _check_mask_dtype(key_padding_mask, "key_padding_mask")
    _warn_if_mismatched(key_padding_mask, attn_mask, stacklevel + 2)  # + this frame and the helper's
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint stands for the mask: the kernel masks causally itself
    else:
        _check_mask_dtype(attn_mask, "attn_mask")
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {_as_torch_sees(key, batch_first)[:2]} do not "
                                 f"match value's {_as_torch_sees(value, batch_first)[:2]}")
    elif key.shape != value.shape:
        raise AssertionError(f"key shape {_as_torch_sees(key, batch_first)} does not match value shape "
                             f"{_as_torch_sees(value, batch_first)}")

    # in-projection: one matmul for self-attention (two when only key is value), q, k, v views of it
    if not use_separate_proj_weight:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        q, k, v = _in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        for name, weight in (("q", q_proj_weight), ("k", k_proj_weight), ("v", v_proj_weight)):
            if weight is None:
                raise AssertionError(f"use_separate_proj_weight is True but {name}_proj_weight is None")
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)

    # attn_mask: (L, S) stays 2-D (broadcast by the kernel); (N * H, L, S) becomes (N, H, L, S) below
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    # bias_k / bias_v: one more key and value, appended to every sequence
    if bias_k is not None and bias_v is not None:
        if static_k is not None:
            raise AssertionError("bias cannot be added to static key.")
        if static_v is not None:
            raise AssertionError("bias cannot be added to static value.")
        if batch_first:
            k = torch.cat([k, bias_k.repeat(bsz, 1, 1)], dim=1)
            v = torch.cat([v, bias_v.repeat(bsz, 1, 1)], dim=1)
        else:
            k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = _append_unmasked_key(attn_mask)
        key_padding_mask = _append_unmasked_key(key_padding_mask)
    elif bias_k is not None:
        raise AssertionError("bias_k is set but bias_v is None")
    elif bias_v is not None:
        raise AssertionError("bias_v is set but bias_k is None")

    # heads: (S, N, H * E) -> (N, H, S, E), views (the kernel reads any strides); static_k/v come
    # in torch's (N * H, S, E) layout
    q = _split_heads(q, num_heads, batch_first)
    if static_k is None:
        k = _split_heads(k, num_heads, batch_first)
    else:
        if static_k.size(0) != bsz * num_heads:
            raise AssertionError(f"expecting static_k.size(0) of {bsz * num_heads}, but got {static_k.size(0)}")
        if static_k.size(2) != head_dim:
            raise AssertionError(f"expecting static_k.size(2) of {head_dim}, but got {static_k.size(2)}")
        k = static_k.unflatten(0, (bsz, num_heads))
    if static_v is None:
        v = _split_heads(v, num_heads, batch_first)
    else:
        if static_v.size(0) != bsz * num_heads:
            raise AssertionError(f"expecting static_v.size(0) of {bsz * num_heads}, but got {static_v.size(0)}")
        if static_v.size(2) != head_dim:
            raise AssertionError(f"expecting static_v.size(2) of {head_dim}, but got {static_v.size(2)}")
        v = static_v.unflatten(0, (bsz, num_heads))

    if add_zero_attn:  # one more key and value, all zeros
        zeros = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=2)
        v = torch.cat([v, zeros.to(v.dtype)], dim=2)
        attn_mask = _append_unmasked_key(attn_mask)
        key_padding_mask = _append_unmasked_key(key_padding_mask)

    src_len = k.size(2)
    if key_padding_mask is not None:
        if key_padding_mask.shape[0] != bsz:
            raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}")
        if key_padding_mask.shape[1] != src_len:
            raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got "
                                 f"{key_padding_mask.shape[1]}")
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unflatten(0, (bsz, num_heads))  # splitting a dim: always a view

    if not training:
        dropout_p = 0.0

    mask = _merge_for_sdpa(attn_mask, key_padding_mask, query.dtype)

    if need_weights:  # the fused kernel and the weights kernel (torch's weights path reads the mask itself)
        heads, weights = _attention_op.attention_with_weights(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                              is_causal=is_causal and mask is None,
                                                              average_heads=average_attn_weights)
    else:  # the fused kernel (which itself falls back, visibly, for what it cannot do)
        heads = _attention_op.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                           is_causal=is_causal)
        weights = None

    output = _out_projection(heads, out_proj_weight, out_proj_bias, batch_first)
    if not is_batched:
        output = output.squeeze(1)
        if weights is not None:
            weights = weights.squeeze(0)
    return output, weights


# ----------------------------------------------------------------------------------------------
# The module


def _keep_torch_fast_paths_off(module, args):
    """A no-op forward pre-hook every fasttf.MultiheadAttention carries.

    `nn.TransformerEncoderLayer.forward` in eval mode calls `torch._transformer_encoder_layer_fwd`
    with the attention's weights, bypassing `self_attn.forward`, unless a forward (pre-)hook is
    attached to one of its modules: torch keeps its fast path off then, so that hooks run. This
    hook is that condition: an encoder layer holding a fasttf attention always calls its forward.
    """
    return None


class MultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` whose attention runs on fasttf's fused kernel.

    Same constructor, attributes, parameter initialisation and `state_dict` keys as torch's (it
    subclasses it), so checkpoints load both ways. `forward` has torch's signature and semantics;
    it never takes torch's fast path and always runs `fasttf.multi_head_attention_forward`:

    - Every call runs the fused kernel, training or not, forward and backward: `need_weights=True`
      (torch's default) adds a kernel that writes the weights from the saved log-sum-exp
      (head-averaged inside it); a learned float mask gets its gradient from the kernels.
    - A query whose every key is masked gets output `out_proj.bias` (attention 0 before the
      projection) and weights 0, as torch's SDPA path gives; torch's weight path gives NaN there.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.register_forward_pre_hook(_keep_torch_fast_paths_off)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """torch.nn.MultiheadAttention.forward: same arguments, shapes, results and errors."""
        _check_mask_dtype(key_padding_mask, "key_padding_mask")  # torch checks these first
        _check_mask_dtype(attn_mask, "attn_mask")
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("fasttf.MultiheadAttention does not support NestedTensor inputs: pass a padded "
                                 "tensor and a key_padding_mask")
        if attn_mask is None and not is_causal:
            projections = self._projections_for_one_op(query, key, value, key_padding_mask)
            if projections is not None:
                return _attention_op.native_multi_head_attention(query, key, value, *projections, self.num_heads,
                                                                 self.batch_first, key_padding_mask, need_weights,
                                                                 average_attn_weights)
        return _multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            self.training, key_padding_mask, need_weights, attn_mask, not self._qkv_same_embed_dim,
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, None, None, average_attn_weights, is_causal,
            batch_first=self.batch_first, stacklevel=2)  # past Module.__call__: see _warn_if_mismatched

    def _projections_for_one_op(self, query: Tensor, key: Tensor, value: Tensor,
                                key_padding_mask: Tensor | None) -> tuple | None:
        """(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias) where this call runs as one C++
        op (fasttf::native_multi_head_attention), else None.

        No attn_mask (the caller checked): the common inference call (a decode step, an encoder in
        eval; weights or not; a (N, S) key padding mask, bool or of query's dtype, or none) with
        packed weights, no dropout, no extra keys, batched 3-D CPU inputs of this embed_dim on the
        C++ kernel, where nothing records a gradient (no_grad, inference_mode, or nothing requires
        one) or carries a forward-mode tangent (the op has no autograd: the Python path raises for a
        tangent, which the op would drop). The op makes the same ATen calls and kernels as
        _multi_head_attention_forward, so the same bits (tested), without its ~60 us of Python at
        one token, where torch's module takes its own C++ fast path. (A parameter is ~1.3 us to
        fetch through Module.__getattr__: each is fetched once.)"""
        if _attention_op._needs_autograd(query, key, value, key_padding_mask):
            return None  # a training call (an input requiring grad) leaves first, not after ~10 us of lookups
        batch_dim = 0 if self.batch_first else 1
        if not (query.dim() == 3 and key.dim() == 3 and key.shape == value.shape and self._qkv_same_embed_dim
                and query.size(-1) == self.embed_dim and key.size(-1) == self.embed_dim
                and query.size(batch_dim) == key.size(batch_dim)
                and (self.dropout == 0.0 or not self.training) and self.bias_k is None and not self.add_zero_attn):
            return None
        if key_padding_mask is not None and not (
                key_padding_mask.shape == (key.size(batch_dim), key.size(1 - batch_dim))
                and key_padding_mask.dtype in (torch.bool, query.dtype) and key_padding_mask.is_cpu):
            return None  # the Python path raises for it, or converts it
        if not _attention_op.runs_native_eagerly(query):
            return None
        projections = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        if projections[0] is None or _attention_op._needs_autograd(*projections):
            return None
        return projections

    @classmethod
    def _like(cls, module: nn.MultiheadAttention, device) -> "MultiheadAttention":
        """An empty fasttf attention with `module`'s configuration."""
        return cls(module.embed_dim, module.num_heads, dropout=module.dropout,
                   bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                   add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                   batch_first=module.batch_first, device=device, dtype=module.out_proj.weight.dtype)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A fasttf copy of a torch.nn.MultiheadAttention: same configuration, weights (copied),
        device, dtype, requires_grad flags and training mode."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"fasttf.MultiheadAttention.from_torch: expected a torch.nn.MultiheadAttention, "
                            f"got {type(module).__name__}")
        new = cls._like(module, module.out_proj.weight.device)
        new.load_state_dict(module.state_dict())
        for (name, mine), theirs in zip(new.named_parameters(), module.parameters()):
            mine.requires_grad_(theirs.requires_grad)
        return new.train(module.training)

    @classmethod
    def _sharing(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A fasttf attention that holds `module`'s own parameters (same objects, not copies)."""
        new = cls._like(module, "meta")
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"):
            setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        return new.train(module.training)


def replace_multihead_attention(model: nn.Module) -> nn.Module:
    """Swap every `torch.nn.MultiheadAttention` in `model` for a `fasttf.MultiheadAttention`, in place.

    The new modules hold the very same parameter tensors (an optimizer built before the swap
    keeps working) and training modes. Only modules of exactly that type are swapped (a subclass
    may have its own forward). Every `nn.TransformerEncoder` holding one gets `use_nested_tensor = False`
    (its eval-mode nested-tensor path would hand NestedTensors to the attention) and every
    encoder layer keeps torch's fused fast path off (see `_keep_torch_fast_paths_off`), so the
    fasttf kernel really runs, in eval too. Forward hooks of the old modules are not carried
    over. Returns `model` (or the new module when `model` itself is an attention).
    """
    swapped: dict[int, MultiheadAttention] = {}  # a module shared in two places stays shared

    def swap(module):
        if id(module) not in swapped:
            swapped[id(module)] = MultiheadAttention._sharing(module)
        return swapped[id(module)]

    if type(model) is nn.MultiheadAttention:
        return swap(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # not named_children(): it skips repeats
            if type(child) is nn.MultiheadAttention:
                setattr(parent, name, swap(child))
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(
                isinstance(module, MultiheadAttention) for module in encoder.modules()):
            encoder.use_nested_tensor = False
    return model
