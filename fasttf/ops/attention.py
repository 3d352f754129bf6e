"""fasttf.scaled_dot_product_attention: the Triton FlashAttention-2 pair (kernels/attention.py) as
torch.library ops with autograd, behind torch's SDPA signature and input checks.

    torch.ops.fasttf.attention_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed) -> (out, lse2)
    torch.ops.fasttf.attention_weights(q, k, lse2, attn_mask, dropout_p, is_causal, scale, seed,
                                       average_heads) -> weights (after dropout; (N, L, S) averaged)
    torch.ops.fasttf.attention_backward(grad_out, q, k, v, out, lse2, attn_mask, dropout_p, is_causal,
                                        scale, seed, grad_weights, average_heads, mask_requires_grad)
        -> (grad_q, grad_k, grad_v, grad_mask)   (grad_mask: attn_mask's shape and dtype, or an
                                                  empty tensor when mask_requires_grad is False)

Both take 4-D (N, H, L, E) tensors of any strides; the mask is the caller's (broadcastable to
(N, H, L, S)) and is expanded inside as a stride-0 view. `seed` is an int64 tensor of one element
drawn from torch's generator (so torch.manual_seed repeats the dropout) or None when dropout_p == 0;
the ops themselves are deterministic, which keeps torch.compile and opcheck happy. Their backward
is deterministic too (no atomics): the same inputs give bit-identical gradients. Second-order
gradients raise `SecondOrderError`, naming the op and what to use instead.

Where it runs: CUDA tensors run the Triton kernels (float16, bfloat16, float32; other dtypes run
fasttf.reference after `fall_back`). CPU tensors run fasttf's C++ kernel (fasttf/ops/attention_cpu.py,
every float dtype) unless FASTTF_CPU_ATTENTION=triton, which runs the Triton kernels under the
interpreter (TRITON_INTERPRET=1 set before triton is imported; else a clear error).
"""

import math

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fasttf import _extension, reference
from fasttf._checks import SecondOrderError, check_same_device, check_tensor, no_second_order  # noqa: F401
from fasttf._fallback import fall_back
from fasttf.kernels import attention as _kernels
from fasttf.ops import attention_output_like, stat_dtype
from fasttf.ops import attention_cpu as _cpu  # the C++ CPU kernel and FASTTF_CPU_ATTENTION

OP = "scaled_dot_product_attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# An eager CPU call checked and run in C++, or None for the Python path below, which takes every call
# the entry does not recognise, errors included (csrc/sdpa_fast_path.cpp: ~8 us of Python less a call,
# as much as a decode step's kernel takes).
_native_sdpa_or_none = getattr(_extension._C, "native_sdpa_or_none", None)


# ----------------------------------------------------------------------------------------------
# The torch.library ops


def _expanded_mask(attn_mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """The mask as a (N, H, L, S) view: broadcast dims get stride 0, nothing is copied."""
    if attn_mask is None:
        return None
    return attn_mask.expand(query.size(0), query.size(1), query.size(2), key.size(2))


def _require_kernel_device(tensor: Tensor) -> None:
    if tensor.device.type != "cuda" and not _kernels.INTERPRET:
        raise RuntimeError(f"torch.ops.fasttf.attention_*: the Triton kernels need CUDA tensors, or "
                           f"TRITON_INTERPRET=1 set before triton is imported; got {tensor.device}")


def _run_forward_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    """(out, lse) from the kernel for this device: fasttf::attention_forward's body, also called
    directly where no gradient is needed (see scaled_dot_product_attention)."""
    if _cpu.runs_native(query):  # fasttf's C++ CPU kernel
        return _cpu.attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
    _require_kernel_device(query)
    return _kernels.attention_forward(query, key, value, _expanded_mask(attn_mask, query, key), dropout_p,
                                      is_causal, scale, seed)


@torch.library.custom_op("fasttf::attention_forward", mutates_args=())
def attention_forward(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
                      is_causal: bool, scale: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return _run_forward_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)


@attention_forward.register_fake
def _attention_forward_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    batch, heads, length_q, _ = query.shape
    out = attention_output_like(query, value)
    lse = query.new_empty((batch, heads, length_q), dtype=stat_dtype(query.dtype))
    return out, lse


def _mask_grad_shape(attn_mask: Tensor) -> tuple[int, ...]:
    """attn_mask's shape with leading 1s up to 4-D (N', H', L', S'), each 1 or the full size."""
    return (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)


def _run_backward_kernel(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, seed,
                         grad_weights, average_heads, mask_requires_grad):
    """(grad_q, grad_k, grad_v, grad_mask) from the kernels for this device: fasttf::attention_backward's
    body, also called directly by the eager autograd (_EagerAttention)."""
    if _cpu.runs_native(query):  # fasttf's C++ CPU kernel: dmask empty unless asked for, as below
        return _cpu.attention_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                                       scale, seed, grad_weights, average_heads, mask_requires_grad)
    _require_kernel_device(query)
    if grad_weights is not None and grad_weights.dim() != (3 if average_heads else 4):
        raise RuntimeError(f"torch.ops.fasttf.attention_backward: grad_weights of shape {tuple(grad_weights.shape)} "
                           f"does not match average_heads={average_heads}")
    mask_grad = mask_requires_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    shape4 = _mask_grad_shape(attn_mask) if mask_grad else None
    # A mask constant along the keys (last dim 1) adds one value to a whole row of scores, which the
    # softmax does not see: its gradient is exactly 0 (as in the CPU kernel, csrc/cpu/attention_backward.cpp).
    kernel_mask_grad = mask_grad and shape4[3] != 1
    grad_q, grad_k, grad_v, dmask = _kernels.attention_backward(
        grad_out, query, key, value, out, lse, _expanded_mask(attn_mask, query, key), dropout_p, is_causal, scale,
        seed, grad_weights, shape4[:2] if kernel_mask_grad else None)
    if not mask_grad:
        return grad_q, grad_k, grad_v, query.new_empty(0)
    if not kernel_mask_grad:
        return grad_q, grad_k, grad_v, torch.zeros_like(attn_mask, memory_format=torch.contiguous_format)
    # the kernel summed the broadcast batches and heads; broadcast query positions are summed here
    if shape4[2] == 1 and dmask.size(2) != 1:
        dmask = dmask.sum(dim=2, keepdim=True)
    return grad_q, grad_k, grad_v, dmask.reshape(attn_mask.shape).to(attn_mask.dtype)


@torch.library.custom_op("fasttf::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                       attn_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float,
                       seed: Tensor | None, grad_weights: Tensor | None, average_heads: bool,
                       mask_requires_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run_backward_kernel(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
                                seed, grad_weights, average_heads, mask_requires_grad)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
                             seed, grad_weights, average_heads, mask_requires_grad):
    mask_grad = mask_requires_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else query.new_empty(0)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dmask


def _run_weights_kernel(query, key, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
    """fasttf::attention_weights' body, also called directly in eager mode (_AttentionWithWeights)."""
    if _cpu.runs_native(query):  # fasttf's C++ CPU kernel
        return _cpu.attention_weights(query, key, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads)
    _require_kernel_device(query)
    return _kernels.attention_weights(query, key, lse, _expanded_mask(attn_mask, query, key), dropout_p, is_causal,
                                      scale, seed, average_heads)


@torch.library.custom_op("fasttf::attention_weights", mutates_args=())
def attention_weights(query: Tensor, key: Tensor, lse: Tensor, attn_mask: Tensor | None, dropout_p: float,
                      is_causal: bool, scale: float, seed: Tensor | None, average_heads: bool) -> Tensor:
    return _run_weights_kernel(query, key, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads)


@attention_weights.register_fake
def _attention_weights_fake(query, key, lse, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
    batch, heads, length_q, _ = query.shape
    return query.new_empty((batch, length_q, key.size(2)) if average_heads else (batch, heads, length_q, key.size(2)))


def _save(ctx, inputs, out, lse, average_heads=False, eager=False):
    """What the backward of every attention autograd needs: the inputs, out and lse, the options, and
    whether the forward ran in eager mode (then the backward may call the kernels directly)."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.average_heads = dropout_p, is_causal, scale, average_heads
    ctx.eager = eager


def _gradients(ctx, grad_out, grad_weights=None):
    """(grad_q, grad_k, grad_v, grad_mask or None) from one backward call: the kernels called directly
    after an eager forward; else (torch.compile traces it), and when the gradient itself must be
    differentiable (create_graph=True), fasttf::attention_backward, whose own backward raises SecondOrderError."""
    query, key, value, out, lse, attn_mask, seed = ctx.saved_tensors
    mask_requires_grad = ctx.needs_input_grad[3] and attn_mask is not None and attn_mask.dtype != torch.bool
    direct = ctx.eager and not torch.is_grad_enabled()
    grad_q, grad_k, grad_v, grad_mask = (_run_backward_kernel if direct else attention_backward)(
        grad_out, query, key, value, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed, grad_weights,
        ctx.average_heads, mask_requires_grad)
    return grad_q, grad_k, grad_v, (grad_mask if mask_requires_grad else None)


def _setup_context(ctx, inputs, output):
    out, lse = output
    _save(ctx, inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    return *_gradients(ctx, grad_out), None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """fasttf::attention_forward with its registered autograd, in eager mode, for the Triton kernels
    (the C++ CPU kernel has its autograd in C++, csrc/autograd.cpp): the same kernels, saved tensors
    and gradients, without the custom op's autograd wrapper, redispatch and dynamo guards (~85 us a
    forward+backward, more than the kernels at small sizes). torch.compile uses the op."""

    @staticmethod
    def forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
        return _run_forward_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (a separate setup_context: torch.func transforms accept it)
        out, lse = output
        _save(ctx, inputs, out, lse, eager=True)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return *_gradients(ctx, grad_out), None, None, None, None


_no_second_order = no_second_order(OP, "torch.nn.functional.scaled_dot_product_attention (or fasttf.reference."
                                       "scaled_dot_product_attention)")


def _remember_nothing(ctx, inputs, output):
    pass


attention_backward.register_autograd(_no_second_order, setup_context=_remember_nothing)
attention_weights.register_autograd(_no_second_order, setup_context=_remember_nothing)


class _AttentionWithWeights(torch.autograd.Function):
    """out and the weights from one kernel pair: the forward saves lse2, the weights kernel reads
    it; the backward takes both incoming gradients in one call of attention_backward."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, seed, average_heads):
        inputs = (query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
        eager = not torch.compiler.is_compiling()
        if eager and _cpu.runs_native(query):  # one C++ kernel for out, lse and the weights
            out, lse, weights = _cpu.attention_forward_weights(*inputs, average_heads)
        elif eager:  # the ops' bodies
            out, lse = _run_forward_kernel(*inputs)
            weights = _run_weights_kernel(query, key, lse, *inputs[3:], average_heads)
        else:  # the ops, which torch.compile traces
            out, lse = torch.ops.fasttf.attention_forward(*inputs)
            weights = torch.ops.fasttf.attention_weights(query, key, lse, *inputs[3:], average_heads)
        _save(ctx, inputs, out, lse, average_heads, eager)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        if grad_out is None:
            grad_out = torch.zeros_like(ctx.saved_tensors[3])
        return *_gradients(ctx, grad_out, grad_weights), None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Dropout seed and keep-mask (so tests can replay the kernel's dropout in the reference)


def draw_dropout_seed(device) -> Tensor:
    """The seed the next dropout call draws: one int64 from torch's generator of `device`."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(query: Tensor, key: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """The bool keep-mask (N, H, L, S) (or (H, L, S) for 3-D inputs) that the kernels draw with
    `seed`: `reference.scaled_dot_product_attention(..., dropout_mask=mask)` replays it."""
    heads, length_q, length_k = query.size(-3), query.size(-2), key.size(-2)
    batch = query.size(0) if query.dim() == 4 else 1
    if _cpu.runs_native(query):  # fasttf's C++ CPU kernel
        keep = _cpu.dropout_keep_mask(query if query.dim() == 4 else query.unsqueeze(0),
                                      key if key.dim() == 4 else key.unsqueeze(0), dropout_p, seed)
        return keep if query.dim() == 4 else keep[0]
    _require_kernel_device(query)
    keep = _kernels.dropout_keep_mask(batch, heads, length_q, length_k, dropout_p, seed.to(query.device),
                                      query.device)
    return keep if query.dim() == 4 else keep[0]


# ----------------------------------------------------------------------------------------------
# Input checks: the error types torch's SDPA raises (RuntimeError), each naming the argument


def _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa):
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP, name, tensor)
    if attn_mask is not None:
        check_tensor(OP, "attn_mask", attn_mask)
    device = query.device
    if not (key.device == device and value.device == device and (attn_mask is None or attn_mask.device == device)):
        check_same_device(OP, query=query, key=key, value=value, attn_mask=attn_mask)  # raises, naming them
    # shapes read once: each Tensor.size(d) call costs ~0.2 us, a torch.Size index far less
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    rank = len(q_shape)
    if rank not in (3, 4) or len(k_shape) != rank or len(v_shape) != rank:
        raise RuntimeError(f"fasttf.{OP}: expected query, key and value all 4-D (N, H, L, E) or all 3-D "
                           f"(H, L, E), got query {rank}-D, key {len(k_shape)}-D, value {len(v_shape)}-D")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"fasttf.{OP}: expected query, key and value to have the same dtype, got "
                           f"query.dtype {query.dtype}, key.dtype {key.dtype}, value.dtype {value.dtype}")
    if rank == 4 and not (q_shape[0] == k_shape[0] == v_shape[0]):
        raise RuntimeError(f"fasttf.{OP}: expected one batch size, got query {q_shape[0]}, key {k_shape[0]}, "
                           f"value {v_shape[0]}")
    heads, heads_kv = q_shape[-3], k_shape[-3]
    if v_shape[-3] != heads_kv:
        raise RuntimeError(f"fasttf.{OP}: expected key and value to have the same number of heads, got "
                           f"key {heads_kv} and value {v_shape[-3]}")
    if enable_gqa:
        if heads_kv == 0 or heads % heads_kv != 0:
            raise RuntimeError(f"fasttf.{OP}: enable_gqa needs the number of query heads ({heads}) to be a "
                               f"multiple of the number of key/value heads ({heads_kv})")
    elif heads != heads_kv:
        raise RuntimeError(f"fasttf.{OP}: query has {heads} heads but key/value have {heads_kv}; pass "
                           f"enable_gqa=True for grouped-query attention")
    if k_shape[-1] != q_shape[-1]:
        raise RuntimeError(f"fasttf.{OP}: expected key's head dim ({k_shape[-1]}) to equal query's "
                           f"({q_shape[-1]})")
    if v_shape[-2] != k_shape[-2]:
        raise RuntimeError(f"fasttf.{OP}: expected value's sequence length ({v_shape[-2]}) to equal key's "
                           f"({k_shape[-2]})")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise RuntimeError(f"fasttf.{OP}: expected attn_mask of dtype bool or query's dtype {query.dtype}, "
                               f"got {attn_mask.dtype}")
        scores_shape = (*q_shape[:-1], k_shape[-2])
        if not _broadcasts_to(attn_mask.shape, scores_shape):
            raise RuntimeError(f"fasttf.{OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                               f"the scores' shape {tuple(scores_shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"fasttf.{OP}: expected dropout_p between 0 and 1, got {dropout_p}")


def _broadcasts_to(shape, target) -> bool:
    """Whether `shape` broadcasts to `target` (torch.broadcast_shapes costs ~45 us a call)."""
    return len(shape) <= len(target) and all(size in (1, full) for size, full in zip(reversed(shape), reversed(target)))


def _fallback_reason(query: Tensor, value: Tensor, native: bool) -> str | None:
    """Why this call cannot run a fasttf kernel, or None (native: it runs the C++ CPU kernel)."""
    if native:  # the C++ CPU kernel takes every float dtype and head dim
        return None
    if query.device.type == "cpu":
        _cpu.require_interpreter(_kernels.INTERPRET)  # FASTTF_CPU_ATTENTION=triton without the interpreter
    if query.dtype not in KERNEL_DTYPES:
        return f"dtype {query.dtype} is not one of float16, bfloat16, float32"
    if query.device.type != "cuda" and not _kernels.INTERPRET:
        return (f"the Triton kernels need a CUDA tensor (got {query.device}) or TRITON_INTERPRET=1 "
                f"set before triton is imported")
    head_dim = max(query.size(-1), value.size(-1))
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def _plain_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The fallback: torch's own SDPA where it takes the call as it is (kernel dtypes, no mask with
    is_causal, no mask gradient), else fasttf.reference, which takes everything."""
    torch_takes_it = (query.dtype in KERNEL_DTYPES and not (attn_mask is not None and is_causal)
                      and not (attn_mask is not None and attn_mask.requires_grad))
    if torch_takes_it:
        if attn_mask is not None:  # a view: torch's CPU SDPA trips on masks of fewer dims
            attn_mask = attn_mask.expand(*query.shape[:-1], key.size(-2))
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                  enable_gqa)


# ----------------------------------------------------------------------------------------------
# The public function


def _scale_and_fallback(query, value, scale, native) -> tuple[float, bool]:
    """After the argument checks, for both entry points: the scale (default 1/sqrt(E)) and whether
    this call falls back to plain torch (warned, or raised under FASTTF_STRICT=1)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    reason = _fallback_reason(query, value, native)
    if reason is not None:
        fall_back(OP, reason)
    return scale, reason is not None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, fused: q (N, H, L, E), k (N, Hkv, S, E),
    v (N, Hkv, S, Ev) -> (N, H, L, Ev), or the same without the batch dim.

    Bool mask True = attend, float mask added; any shape broadcastable to (N, H, L, S). is_causal is
    top-left aligned. A row with every key masked gives 0 (and zero gradients). Differentiable in
    query, key, value and a float attn_mask (its gradient summed over the dims it was broadcast along).
    """
    if _native_sdpa_or_none is not None and not torch.compiler.is_compiling():
        out = _native_sdpa_or_none(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa)
    native = _cpu.runs_native(query)  # read once a call (FASTTF_CPU_ATTENTION)
    scale, fallback = _scale_and_fallback(query, value, scale, native)
    if fallback:
        return _plain_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    batched = query.dim() == 4
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    seed = draw_dropout_seed(query.device) if dropout_p > 0.0 else None
    arguments = (query, key, value, attn_mask, float(dropout_p), bool(is_causal), float(scale), seed)
    if torch.compiler.is_compiling():  # the op, which torch.compile traces
        out, _ = attention_forward(*arguments)
    elif native:  # the C++ kernel, with its autograd in C++ (csrc/autograd.cpp) where a gradient is tracked
        out, _ = _cpu.attention_forward(*arguments)
    elif _needs_autograd(query, key, value, attn_mask):  # the op's autograd without its layers
        out, _ = _EagerAttention.apply(*arguments)
    else:  # inference: the kernel alone
        out, _ = _run_forward_kernel(*arguments)
    return out if batched else out.squeeze(0)


def runs_native_eagerly(query: Tensor) -> bool:
    """Whether scaled_dot_product_attention on `query` would run the C++ CPU kernel, eagerly (not traced)."""
    return _cpu.runs_native(query) and not torch.compiler.is_compiling()


native_multi_head_attention = _cpu.multi_head_attention  # for fasttf.MultiheadAttention, where runs_native_eagerly


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call goes through its autograd Function: a graph to record, or a forward-mode tangent
    (the Function raises for it, having no jvp; the kernel run alone would drop it silently)."""
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return True
    if getattr(forward_ad, "_current_level", 0) < 0:  # outside every dual level (torch's own record of them)
        return False  # no tensor carries a tangent: ~0.4 us a tensor saved
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)


# ----------------------------------------------------------------------------------------------
# With the weights (fasttf.MultiheadAttention's need_weights=True)


def _plain_with_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, average_heads):
    """The fallback: softmax(q k^T * scale + mask) -> dropout -> @ v, materialising the (N, H, L, S)
    weights as torch's multi_head_attention_forward does. A row with every key masked gets 0."""
    group = query.size(1) // key.size(1)
    if group != 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query * scale) @ key.transpose(-2, -1)  # q scaled first, as torch
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    empty_row = scores.amax(dim=-1, keepdim=True) == float("-inf")
    weights = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1).masked_fill(empty_row, 0.0)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return weights @ value, (weights.mean(dim=1) if average_heads else weights)


def attention_with_weights(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                           dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                           average_heads: bool = True, enable_gqa: bool = False) -> tuple[Tensor, Tensor]:
    """(scaled_dot_product_attention(...), its weights after dropout) for 4-D (N, H, L, E) inputs:
    weights (N, L, S) averaged over the heads, else (N, H, L, S), in query's dtype, written by a
    kernel from the saved log-sum-exp (nothing L x S is saved for backward). Both are
    differentiable; gradients flow through the weights into query, key and a float mask."""
    _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa)
    if query.dim() != 4:
        raise RuntimeError(f"fasttf.{OP}: attention_with_weights expects 4-D (N, H, L, E) inputs, got {query.dim()}-D")
    native = _cpu.runs_native(query)  # read once a call (FASTTF_CPU_ATTENTION)
    scale, fallback = _scale_and_fallback(query, value, scale, native)
    if fallback:
        return _plain_with_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, average_heads)
    seed = draw_dropout_seed(query.device) if dropout_p > 0.0 else None
    arguments = (query, key, value, attn_mask, float(dropout_p), bool(is_causal), float(scale), seed)
    if native and not torch.compiler.is_compiling() and not _needs_autograd(query, key, value, attn_mask):
        out, _, weights = _cpu.attention_forward_weights(*arguments, bool(average_heads))  # inference: ~30 us less
        return out, weights
    return _AttentionWithWeights.apply(*arguments, bool(average_heads))
