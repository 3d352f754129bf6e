"""fasttf's attention inside Hugging Face transformers models: attn_implementation="fasttf".

    import fasttf.integrations.transformers  # registers "fasttf" (register() does it again, harmlessly)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fasttf")

Importing this module registers two functions under the name "fasttf":
- with `transformers.AttentionInterface`: `attention_forward`, which every model whose attention
  layers call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` then calls instead of torch's SDPA;
- with `transformers.masking_utils.AttentionMaskInterface`: transformers' own `sdpa_mask`, so the
  model builds the masks it builds for "sdpa" (bool, True = attend, (B, 1, Lq, Lk) stride-0
  views; None where `is_causal` or no mask says the same), which is fasttf's mask convention.
  Without a mask function registered, transformers would pass no padding mask at all.

What `attention_forward` does with what models pass (query (B, H, Lq, D), key/value
(B, Hkv, Lk, D), output (B, Lq, H, D), as transformers' sdpa integration):
- grouped-query attention: `enable_gqa=True`, key/value are never repeated;
- causal: `is_causal=True` when the model says so (the `is_causal` keyword, else
  `module.is_causal`), no mask came and Lq > 1. fasttf's `is_causal` is top-left aligned, like
  torch's: the mask function leaves the mask out only where top-left is right (Lq == Lk, or a
  prefill with nothing cached: q_offset == 0); with a cache and Lq != Lk it builds the mask, and
  with Lq == 1 the single query sees every cached key (is_causal False). As in the sdpa
  integration, a causal prefill into a longer static cache drops the empty cache slots;
- masks: bool (True = attend) or float (added; cast to the query's dtype), 4-D, broadcast;
- dropout: `dropout` when `module.training`, else none (fasttf's Philox dropout, seeded from
  torch's generator);
- `scaling`: the kernel's `scale` (None: 1/sqrt(D)); cross attention: Lk != Lq, no causal;
- `position_bias` (T5, MT5, UMT5, LongT5, Pix2Struct...): combined with the mask into one float
  mask, as the sdpa integration does (masked: -inf, where sdpa writes the dtype's lowest value,
  so a fully masked row gives 0 as it does with bool masks). In training that mask requires
  grad: the kernel gives its gradient, summed over the dims it was broadcast along;
- `sliding_window` (Mistral, Qwen2, Gemma...): the window is in the mask transformers builds for
  "fasttf" (its mask functions take the window, and never skip the mask where it matters). If no
  mask comes and the window would cut keys, a causal window mask is built here; a bidirectional
  one raises ValueError;
- `output_attentions=True` (keyword or config): the output and the weights (B, H, Lq, Lk) come
  from one kernel pair (`fasttf.ops.attention.attention_with_weights`): the weights are written
  from the saved log-sum-exp, after dropout as eager attention returns them, differentiable;
  a fully masked row gives weights 0;
- `softcap` (Gemma 2's attn_logit_softcapping), `s_aux` / `sinks` (attention sinks, gpt-oss)
  change the softmax itself and are not in the kernel: ValueError naming the feature, never
  silently ignored.

Tested with transformers 5.17 and 5.24 (setup.py's extra "transformers" pins the range).
"""

import torch
from torch import Tensor

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - the extra is not installed
    raise ImportError("fasttf.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'fasttf[transformers]'") from error

from fasttf.ops import attention as _attention  # looked up at call time (tests count the calls)

NAME = "fasttf"

__all__ = ["NAME", "attention_forward", "register"]


def _refuse_unsupported(module, softcap, s_aux, sinks) -> None:
    model = type(module).__name__
    if softcap is not None:
        raise ValueError(f"attn_implementation='fasttf' does not support attention logit soft-capping "
                         f"(softcap={softcap}, from {model}: Gemma 2's config.attn_logit_softcapping); set it to "
                         f"None in the config or use attn_implementation='eager'")
    for name, value in (("s_aux", s_aux), ("sinks", sinks)):
        if value is not None:
            raise ValueError(f"attn_implementation='fasttf' does not support attention sinks ({name}, from {model}); "
                             f"use attn_implementation='eager'")


def _sliding_window_mask(sliding_window: int, causal: bool, length_q: int, length_k: int,
                         device) -> Tensor | None:
    """The window as a bool (Lq, Lk) mask, or None when it cuts no key. Only for calls that come
    without a mask: query i sits at position i when causal (top-left, as is_causal), at Lk - 1
    when it is the single decoding query. Keys within the window: 0 <= q_pos - k_pos < window."""
    if not causal and length_q > 1:
        if length_k <= sliding_window:
            return None
        raise ValueError(f"attn_implementation='fasttf': sliding_window={sliding_window} with no attention mask on a "
                         f"bidirectional layer of {length_k} keys; pass the mask transformers builds for it")
    farthest = length_q - 1 if causal else length_k - 1  # the largest q_pos - k_pos
    if farthest < sliding_window:
        return None
    q_pos = torch.arange(length_q, device=device) if causal else torch.full((1,), length_k - 1, device=device)
    distance = q_pos[:, None] - torch.arange(length_k, device=device)[None, :]
    return (distance >= 0) & (distance < sliding_window)


def _with_position_bias(position_bias: Tensor, attention_mask: Tensor | None, causal: bool, query: Tensor,
                        length_k: int) -> Tensor:
    """T5's learned relative bias and the mask as one float mask: the bias where a key is attended,
    -inf where it is masked (the sdpa integration writes the dtype's lowest value there; -inf keeps
    fasttf's rule for bool masks: a row with every key masked gives 0)."""
    bias = position_bias.to(query.dtype)
    if attention_mask is None:
        if not causal:
            return bias
        attention_mask = torch.ones(query.size(2), length_k, dtype=torch.bool, device=query.device).tril()
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask, float("-inf"))
    return bias + attention_mask


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: Tensor | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, s_aux: Tensor | None = None,
                      sinks: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature on fasttf.scaled_dot_product_attention:
    query (B, H, Lq, D), key/value (B, Hkv, Lk, D|Dv) -> ((B, Lq, H, Dv), weights or None)."""
    _refuse_unsupported(module, softcap, s_aux, sinks)
    length_q = query.size(2)
    enable_gqa = query.size(1) != key.size(1)

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(length_q > 1 and attention_mask is None and causal)
    # A causal prefill into a longer (static) cache: the keys past the queries are empty slots that
    # top-left is_causal masks anyway; drop them, as the sdpa integration does.
    if causal and key.size(2) > length_q:
        key, value = key[:, :, :length_q], value[:, :, :length_q]
        if position_bias is not None:
            position_bias = position_bias[..., :length_q]
    length_k = key.size(2)

    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    if sliding_window is not None and attention_mask is None:
        window = _sliding_window_mask(int(sliding_window), causal, length_q, length_k, query.device)
        if window is not None:
            attention_mask, causal = window, False
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask, causal, query, length_k)
        causal = False

    dropout_p = float(dropout) if getattr(module, "training", True) else 0.0
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        out, weights = _attention.attention_with_weights(query, key, value, attn_mask=attention_mask,
                                                         dropout_p=dropout_p, is_causal=causal, scale=scaling,
                                                         average_heads=False, enable_gqa=enable_gqa)
    else:
        out, weights = _attention.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=causal, scale=scaling,
            enable_gqa=enable_gqa), None
    return out.transpose(1, 2).contiguous(), weights


def register(name: str = NAME) -> str:
    """Registers fasttf under `name` with transformers' attention and mask interfaces (again,
    harmlessly: the same functions replace themselves). Returns the name."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
