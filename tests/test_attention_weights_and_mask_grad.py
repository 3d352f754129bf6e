"""The attention weights from the kernel, the gradient of a learned float mask, deterministic
backward, and second-order gradients (issue 14), against float64 references.

- attention_with_weights: the weights after dropout (the keep bits the output used), (N, L, S)
  averaged over heads or (N, H, L, S), and the gradients that flow through them; nothing L x S
  saved for backward.
- A float mask that requires grad: its gradient, summed over every broadcast dim, from the kernel
  (strict mode: no fallback), for every mask shape and 3-D inputs.
- Two backward runs are bit-identical (no atomics), with weights, dropout and a mask gradient.
- A double backward raises one clear error naming the op, never torch's warning.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fasttf
from fasttf import reference
from fasttf.kernels import attention as kernels
from fasttf.ops import attention as attention_op
from fasttf.testing import assert_close_to_reference

from conftest import kernel_device

pytestmark = pytest.mark.skipif(not (kernels.INTERPRET or torch.cuda.is_available()),
                                reason="needs a GPU or TRITON_INTERPRET=1 (make test sets it)")


def make(shape, seed, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(device=kernel_device(), dtype=dtype)


def reference_with_weights(query, key, value, mask, is_causal, scale, average_heads, keep=None, dropout_p=0.0):
    """float64 truth: softmax(q k^T scale + mask) (0 on fully masked rows), dropout replayed from keep."""
    query, key, value = (t.double() for t in (query, key, value))
    group = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ key.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    if is_causal:
        causal = torch.ones(query.size(2), key.size(2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    empty = scores.amax(-1, keepdim=True) == -math.inf
    weights = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if keep is not None:
        weights = weights * keep / (1.0 - dropout_p)
    out = weights @ value
    return out, (weights.mean(1) if average_heads else weights)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def compare_with_weights(query, key, value, mask=None, is_causal=False, average_heads=True, dropout_p=0.0,
                         learned_mask=False):
    """Output, weights and every gradient (q, k, v, mask) against float64, by DESIGN.md's rule
    (torch's own error: the same computation in the kernel's dtype)."""
    scale = 1.0 / math.sqrt(query.size(-1))
    mask_leaf = [mask.detach().clone().requires_grad_()] if learned_mask else []
    ins = leaves(query, key, value) + mask_leaf
    torch.manual_seed(5)
    out, weights = attention_op.attention_with_weights(*ins[:3], ins[3] if learned_mask else mask, dropout_p,
                                                       is_causal, average_heads=average_heads,
                                                       enable_gqa=query.size(1) != key.size(1))
    keep = None
    if dropout_p > 0.0:
        torch.manual_seed(5)
        keep = attention_op.dropout_keep_mask(query, key, dropout_p, attention_op.draw_dropout_seed(query.device))
    grad_out, grad_w = make(out.shape, 11, out.dtype), make(weights.shape, 12, weights.dtype)
    grads = torch.autograd.grad((out * grad_out).sum() + (weights * grad_w).sum(), ins)

    results = []
    for dtype in (torch.float64, query.dtype):
        these = [t.detach().to(dtype).requires_grad_() for t in ins]
        this_mask = these[3] if learned_mask else (mask if mask is None or mask.dtype == torch.bool else mask.to(dtype))
        o, w = reference_with_weights(*these[:3], this_mask, is_causal, scale, average_heads, keep, dropout_p)
        o, w = o.to(dtype), w.to(dtype)
        g = torch.autograd.grad((o * grad_out.to(dtype)).sum() + (w * grad_w.to(dtype)).sum(), these)
        results.append([o, w, *g])
    truth, baseline = results
    names = ["output", "weights", "grad query", "grad key", "grad value", "grad mask"]
    for name, mine, t, b in zip(names, [out, weights, *grads], truth, baseline):
        assert mine.shape == t.shape, name
        assert_close_to_reference(mine, t, b, name)
    return out, weights, grads


# ----------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("average_heads", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 19, 23, 8), (1, 2, 33, 16, 16), (1, 1, 1, 37, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_weights_and_their_gradients(shape, is_causal, average_heads, attention_backend):
    batch, heads, length_q, length_k, dim = shape
    query, key, value = (make((batch, heads, n, dim), seed) for seed, n in enumerate((length_q, length_k, length_k)))
    compare_with_weights(query, key, value, is_causal=is_causal, average_heads=average_heads)


@pytest.mark.parametrize("is_causal", [False, True])
def test_weight_gradient_over_several_key_blocks_native(is_causal, monkeypatch):
    """The C++ backward keeps the p tiles of its D_i pass (rowsum of W * dW over all keys) for the main
    pass: shapes of several query and key blocks (128 x 512 tiles; causal trims row starts), the last
    ones short, with dropout, a learned mask and a fully masked row."""
    if kernel_device() != "cpu":
        pytest.skip("the C++ kernel runs on CPU tensors")
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "native")
    length_q, length_k = (600, 600) if is_causal else (150, 1100)
    query, key, value = (make((1, 2, n, 8), seed) for seed, n in enumerate((length_q, length_k, length_k)))
    mask = make((length_q, length_k), 7)
    mask[3] = float("-inf")
    compare_with_weights(query, key, value, mask, is_causal=is_causal, dropout_p=0.2, learned_mask=True)


@pytest.mark.parametrize("kind", ["bool", "float", "learned"])
def test_weights_with_masks_gqa_and_fully_masked_rows(kind, attention_backend):
    query = make((2, 4, 20, 8), 0)
    key, value = make((2, 2, 21, 8), 1), make((2, 2, 21, 8), 2)
    allowed = torch.rand(2, 1, 20, 21, generator=torch.Generator().manual_seed(3)) > 0.4
    allowed[:, :, [0, 17]] = False  # rows with no key at all
    allowed = allowed.to(kernel_device())
    mask = allowed if kind == "bool" else make((2, 1, 20, 21), 4).masked_fill(~allowed, -math.inf)
    out, weights, _ = compare_with_weights(query, key, value, mask, average_heads=False, learned_mask=kind == "learned")
    assert torch.equal(weights[:, :, [0, 17]], torch.zeros_like(weights[:, :, [0, 17]]))


@pytest.mark.parametrize("average_heads", [True, False])
def test_weights_after_dropout_are_the_keep_bits_the_output_used(average_heads, attention_backend):
    query, key, value = (make((2, 2, n, 8), seed) for seed, n in enumerate((18, 20, 20)))
    mask = make((18, 20), 7)
    compare_with_weights(query, key, value, mask, is_causal=True, average_heads=average_heads, dropout_p=0.3,
                         learned_mask=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_in_half_precision(dtype, attention_backend):
    query, key, value = (make((1, 2, n, 16), seed, dtype) for seed, n in enumerate((20, 25, 25)))
    compare_with_weights(query, key, value, make((20, 25), 8, dtype), is_causal=True, average_heads=True,
                         learned_mask=True)


def test_nothing_l_by_s_is_saved_for_backward(attention_backend):
    """Only O(N H L) besides the inputs: the weights the caller asked for are the only L x S memory."""
    length = 64
    query, key, value = leaves(*(make((1, 2, length, 8), seed) for seed in range(3)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, weights = attention_op.attention_with_weights(query, key, value, is_causal=True)
    assert weights.shape == (1, length, length)
    assert saved and max(saved) < length * length


# ----------------------------------------------------------------------------------------------
# Mask gradient: every broadcast shape, 3-D inputs


MASK_SHAPES = [(19, 23), (23,), (3, 19, 23), (2, 1, 1, 23), (1, 3, 19, 23), (2, 3, 19, 23), (3, 19, 1),
               (2, 1, 19, 23), (1, 1, 1, 1)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mask_gradient_for_every_broadcast_shape(mask_shape, is_causal, attention_backend):
    query, key, value = (make((2, 3, n, 8), seed) for seed, n in enumerate((19, 23, 23)))
    mask = make(mask_shape, 9)
    ins = leaves(query, key, value, mask)
    out = fasttf.scaled_dot_product_attention(*ins[:3], attn_mask=ins[3], is_causal=is_causal)  # strict: kernel
    grad_out = make(out.shape, 10)
    grads = torch.autograd.grad(out, ins, grad_out)
    assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
    truth_ins = leaves(*(t.double() for t in (query, key, value, mask)))
    truth = reference.scaled_dot_product_attention(*truth_ins[:3], truth_ins[3], is_causal=is_causal)
    truth_grads = torch.autograd.grad(truth, truth_ins, grad_out.double())
    base_ins = leaves(query, key, value, mask)
    base = F.scaled_dot_product_attention(*base_ins[:3], attn_mask=base_ins[3].expand(2, 3, 19, 23).masked_fill(
        ~torch.ones(19, 23, dtype=torch.bool, device=mask.device).tril(), -math.inf) if is_causal else base_ins[3])
    base_grads = torch.autograd.grad(base, base_ins, grad_out)
    for name, a, t, b in zip(("grad query", "grad key", "grad value", "grad mask"), grads, truth_grads, base_grads):
        assert_close_to_reference(a, t, b, name)


@pytest.mark.parametrize("mask_shape", [(4, 19, 23), (19, 23), (1, 19, 1)])
def test_mask_gradient_without_batch_dim(mask_shape, attention_backend):
    query, key, value = (make((4, n, 8), seed) for seed, n in enumerate((19, 23, 23)))
    mask = make(mask_shape, 9)
    ins = leaves(query, key, value, mask)
    out = fasttf.scaled_dot_product_attention(*ins[:3], attn_mask=ins[3])
    (grad,) = torch.autograd.grad(out.sum(), ins[3])
    truth_ins = leaves(*(t.double() for t in (query, key, value, mask)))
    (truth,) = torch.autograd.grad(reference.scaled_dot_product_attention(*truth_ins[:3], truth_ins[3]).sum(),
                                   truth_ins[3])
    assert grad.shape == mask.shape
    torch.testing.assert_close(grad.double(), truth, atol=1e-5, rtol=1e-4)


def test_mask_gradient_with_dropout_and_gqa(attention_backend):
    query = make((2, 4, 18, 8), 0)
    key, value = make((2, 2, 21, 8), 1), make((2, 2, 21, 8), 2)
    mask = make((4, 1, 21), 3)
    ins = leaves(query, key, value, mask)
    torch.manual_seed(4)
    out = fasttf.scaled_dot_product_attention(*ins[:3], attn_mask=ins[3], dropout_p=0.25, enable_gqa=True)
    torch.manual_seed(4)
    keep = attention_op.dropout_keep_mask(query, key, 0.25, attention_op.draw_dropout_seed(query.device))
    grads = torch.autograd.grad(out.sum(), ins)
    truth_ins = leaves(*(t.double() for t in (query, key, value, mask)))
    truth = reference.scaled_dot_product_attention(*truth_ins[:3], truth_ins[3], 0.25, enable_gqa=True,
                                                   dropout_mask=keep)
    for a, t in zip(grads, torch.autograd.grad(truth.sum(), truth_ins)):
        torch.testing.assert_close(a.double(), t, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("mask_shape", [(3, 19, 1), (2, 3, 19, 1), (3, 1, 1), (1,)], ids=str)
def test_mask_constant_along_the_keys_gets_exactly_zero_gradient(mask_shape, dropout_p, attention_backend):
    """Such a mask adds one value to a whole row of scores, which the softmax does not see: every
    row of dS sums to 0, so its gradient is 0 exactly (torch returns the rounding noise of that sum),
    whatever the loss reads: the output, the weights, with dropout and causal."""
    query, key, value = (make((2, 3, n, 8), seed) for seed, n in enumerate((19, 23, 23)))
    ins = leaves(query, key, value, make(mask_shape, 9) * 4)
    torch.manual_seed(5)
    out, weights = attention_op.attention_with_weights(*ins[:3], attn_mask=ins[3], dropout_p=dropout_p,
                                                       is_causal=True)
    loss = (out * make(out.shape, 10)).sum() + (weights * make(weights.shape, 11)).sum()
    grads = torch.autograd.grad(loss, ins)
    assert grads[3].shape == ins[3].shape and grads[3].dtype == ins[3].dtype
    assert torch.equal(grads[3], torch.zeros_like(ins[3]))
    truth_ins = leaves(*(t.double() for t in (query, key, value, ins[3].detach())))
    truth = reference.scaled_dot_product_attention(*truth_ins[:3], truth_ins[3], is_causal=True)
    (truth_grad,) = torch.autograd.grad(truth.sum(), truth_ins[3])
    assert truth_grad.abs().max() < 1e-12  # the float64 reference agrees up to its rounding
    assert all(g.abs().sum() > 0 for g in grads[:3])


# ----------------------------------------------------------------------------------------------
# Deterministic backward


def test_two_backward_runs_are_bit_identical(attention_backend):
    """No atomics anywhere: dq, dk, dv, the mask's gradient (summed over a broadcast batch and
    heads) and the gradient through the weights, twice, bit for bit."""
    query = make((2, 4, 37, 16), 0)
    key, value = make((2, 2, 41, 16), 1), make((2, 2, 41, 16), 2)
    mask = make((37, 41), 3)
    grad_out = make((2, 4, 37, 16), 4)

    def sdpa_grads():
        ins = leaves(query, key, value, mask)
        torch.manual_seed(0)
        out = fasttf.scaled_dot_product_attention(*ins[:3], attn_mask=ins[3], dropout_p=0.2, is_causal=True,
                                                  enable_gqa=True)
        return torch.autograd.grad(out, ins, grad_out)

    def weights_grads():
        ins = leaves(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), mask)
        torch.manual_seed(0)
        out, weights = attention_op.attention_with_weights(*ins, dropout_p=0.2)
        return torch.autograd.grad((out * grad_out).sum() + weights.square().sum(), ins)

    for run in (sdpa_grads, weights_grads):
        first, second = run(), run()
        for a, b in zip(first, second):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Second-order gradients: one clear error, never torch's warning


def test_double_backward_raises_a_clear_error(attention_backend):
    query, key, value = leaves(*(make((1, 2, 9, 8), seed) for seed in range(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never "may lead to silently incorrect behavior"
        out = fasttf.scaled_dot_product_attention(query, key, value)
        (grad_q,) = torch.autograd.grad(out.square().sum(), query, create_graph=True)
        with pytest.raises(RuntimeError, match="fasttf.scaled_dot_product_attention: second-order gradients.*"
                                               "torch.nn.functional.scaled_dot_product_attention"):
            grad_q.sum().backward()
        out, weights = attention_op.attention_with_weights(query, key, value)
        (grad_k,) = torch.autograd.grad(weights.square().sum(), key, create_graph=True)
        with pytest.raises(RuntimeError, match="second-order gradients"):
            grad_k.sum().backward()


# ----------------------------------------------------------------------------------------------
# torch.library


def test_opcheck_weights_and_backward_with_weights_and_mask_gradient():
    query, key, value = (make((2, 4, n, 8), seed) for seed, n in enumerate((10, 13, 13)))
    mask, seed = make((4, 1, 13), 3), torch.tensor([77], dtype=torch.int64)
    out, lse = torch.ops.fasttf.attention_forward(query, key, value, mask, 0.2, True, 0.3, seed)
    for average in (True, False):
        torch.library.opcheck(torch.ops.fasttf.attention_weights.default,
                              (query, key, lse, mask, 0.2, True, 0.3, seed, average))
        weights = torch.ops.fasttf.attention_weights(query, key, lse, mask, 0.2, True, 0.3, seed, average)
        torch.library.opcheck(torch.ops.fasttf.attention_backward.default,
                              (torch.randn_like(out), query, key, value, out, lse, mask, 0.2, True, 0.3, seed,
                               torch.randn_like(weights), average, True))


def test_torch_compile_fullgraph_with_weights_and_a_learned_mask(attention_backend):
    query, key, value = (make((1, 2, n, 8), seed) for seed, n in enumerate((17, 20, 20)))
    mask = make((17, 20), 3)

    def attend(q, k, v, m):
        out, weights = attention_op.attention_with_weights(q, k, v, m, is_causal=True)
        return (out * 2).sum() + weights.square().sum()

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    ins, eager_ins = leaves(query, key, value, mask), leaves(query, key, value, mask)
    for a, b in zip(torch.autograd.grad(compiled(*ins), ins), torch.autograd.grad(attend(*eager_ins), eager_ins)):
        torch.testing.assert_close(a, b)
