"""One small case of every public op, to prove fasttf on another torch than CI's: `make compat` runs
this folder in a second virtualenv with the newest torch (README, "Supported versions"); `make test`
runs it too, with CI's torch. Forward and backward against fasttf.reference in float64 by the
accuracy rule (fasttf.testing), strict mode on (tests/conftest.py), so every kernel really ran; the
torch.library registrations (opcheck) and a fullgraph torch.compile trace through all of them."""

import pytest
import torch
from torch import nn

import fasttf
from fasttf import reference
from fasttf.testing import assert_close_to_reference
from conftest import kernel_device

DEVICE = kernel_device()


def check_op(ours, theirs, *inputs):
    """ours(*inputs) in float32 against theirs (fasttf.reference) on float64 copies, with theirs on
    the float32 inputs as torch's own error: outputs and the gradients of every input."""
    runs = []
    for dtype in (torch.float32, torch.float64, torch.float32):
        tensors = [t.detach().to(dtype).requires_grad_() for t in inputs]
        runs.append((tensors, (ours if not runs else theirs)(*tensors)))
    (mine, out), (truth, out64), (base, out_base) = runs
    outs, outs64, outs_base = (o if isinstance(o, tuple) else (o,) for o in (out, out64, out_base))
    torch.manual_seed(1)
    grads_out = [torch.randn_like(o) for o in outs]
    for index, (o, o64, ob, g) in enumerate(zip(outs, outs64, outs_base, grads_out)):
        assert_close_to_reference(o, o64, ob, f"output {index}")
    for tensors, results in ((mine, outs), (truth, outs64), (base, outs_base)):
        torch.autograd.backward(results, [g.to(r.dtype) for g, r in zip(grads_out, results)])
    for index, (t, t64, tb) in enumerate(zip(mine, truth, base)):
        assert_close_to_reference(t.grad, t64.grad, tb.grad, f"grad of input {index}")


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


@pytest.mark.parametrize("is_causal", [False, True])
def test_scaled_dot_product_attention(is_causal):
    torch.manual_seed(0)
    mask = torch.rand(5, 7, device=DEVICE) > 0.3
    check_op(lambda q, k, v: fasttf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal),
             lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal),
             randn(2, 2, 5, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 8))


def test_positional_encoding():
    torch.manual_seed(0)
    check_op(lambda x: fasttf.positional_encoding(x, 3, scale=2.0),
             lambda x: reference.positional_encoding(x, 3, scale=2.0), randn(2, 5, 8))


def test_residual_add():
    torch.manual_seed(0)
    check_op(fasttf.residual_add, reference.residual_add, randn(3, 33), randn(3, 33))


def test_dropout():
    torch.manual_seed(0)
    x = randn(3, 33)
    seed = torch.tensor(12345)
    keep = fasttf.ops.residual.dropout_keep_mask(x, 0.3, seed)
    check_op(lambda t: torch.ops.fasttf.dropout(t, 0.3, seed),
             lambda t: reference.dropout(t, 0.3, dropout_mask=keep), x)


def test_add_layer_norm():
    torch.manual_seed(0)
    check_op(lambda x, r, w, b: fasttf.add_layer_norm(x, r, w, b),
             lambda x, r, w, b: reference.add_layer_norm(x, r, w, b),
             randn(2, 5, 16), randn(2, 5, 16), randn(16), randn(16))


def test_multihead_attention_with_a_padding_mask():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True, device=DEVICE)
    ours = fasttf.MultiheadAttention.from_torch(theirs)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2], device=DEVICE)

    def run(module):
        def call(query, key):
            module.to(query.dtype)
            return module(query, key, key, key_padding_mask=padding, need_weights=False)[0]
        return call

    check_op(run(ours), run(theirs), randn(2, 5, 16), randn(2, 6, 16))


def test_the_notes_transformer_on_both_backends():
    torch.manual_seed(0)
    config = dict(d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                  dropout=0.0)
    fast = fasttf.models.Transformer(11, 13, backend="fasttf", **config).to(DEVICE)
    plain = fasttf.models.Transformer(11, 13, backend="torch", **config).to(DEVICE)
    plain.load_state_dict(fast.state_dict())
    src = torch.tensor([[3, 4, 5, 1], [6, 1, 0, 0]], device=DEVICE)
    tgt_in = torch.tensor([[1, 7, 8], [1, 9, 0]], device=DEVICE)
    logits, loss = fast(src, tgt_in, tgt_in)
    expected, expected_loss = plain(src, tgt_in, tgt_in)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    loss.backward(), expected_loss.backward()
    for (name, mine), theirs in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert fast.greedy_decode(src, max_new_tokens=3).tokens.shape[0] == 2


def test_torch_library_opcheck():
    torch.manual_seed(0)
    ops = torch.ops.fasttf
    x, residual = randn(2, 3, 8).requires_grad_(), randn(2, 3, 8).requires_grad_()
    weight, bias = randn(8).requires_grad_(), randn(8).requires_grad_()
    torch.library.opcheck(ops.positional_encoding.default, (x, None, 3, 2.0, 10000.0, True))
    torch.library.opcheck(ops.residual_add.default, (x, residual))
    torch.library.opcheck(ops.dropout.default, (x, 0.25, torch.tensor(8)))
    torch.library.opcheck(ops.add_layer_norm.default, (x, residual, weight, bias, 1e-5, 0.25, torch.tensor(8)))
    q, k, v = (randn(1, 2, 5, 8).requires_grad_() for _ in range(3))
    torch.library.opcheck(ops.attention_forward.default, (q, k, v, None, 0.0, True, 0.3, None))


def test_torch_compile_fullgraph_through_every_op():
    torch.manual_seed(0)
    attention = fasttf.MultiheadAttention(8, 2, batch_first=True, device=DEVICE)
    weight, bias = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)

    def block(x):
        h = fasttf.positional_encoding(x, 0, scale=2.0)
        a = attention(h, h, h, need_weights=False, is_causal=True,
                      attn_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=DEVICE))[0]
        normed, s = fasttf.add_layer_norm(a, h, weight, bias)
        return fasttf.residual_add(fasttf.dropout(normed, 0.5, training=False), s)

    x = randn(2, 5, 8)
    expected = block(x)
    torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x), expected)
