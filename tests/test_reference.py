"""fasttf.reference against torch itself and against the numbers of the lecture notes."""

import math

import pytest
import torch
import torch.nn.functional as F

from fasttf import reference

torch.manual_seed(0)


def _qkv(n, h, hkv, length_q, length_k, e, ev, dtype=torch.float64):
    q = torch.randn(n, h, length_q, e, dtype=dtype)
    k = torch.randn(n, hkv, length_k, e, dtype=dtype)
    v = torch.randn(n, hkv, length_k, ev, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("length_q,length_k", [(1, 1), (1, 7), (5, 5), (7, 3), (3, 9)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(length_q, length_k, is_causal):
    q, k, v = _qkv(2, 3, 3, length_q, length_k, 8, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    actual = reference.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("mask_shape", [(4, 6), (1, 1, 4, 6), (2, 1, 1, 6), (2, 3, 4, 6), (1, 6)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_match_torch(mask_shape, kind):
    q, k, v = _qkv(2, 3, 3, 4, 6, 5, 7)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True  # no fully masked rows here: torch's math path gives NaN for those on old versions
    else:
        mask = torch.randn(mask_shape, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(reference.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)


def test_sdpa_gqa_scale_and_grads_match_torch():
    q, k, v = _qkv(2, 6, 2, 5, 4, 8, 3)
    for t in (q, k, v):
        t.requires_grad_(True)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    actual = reference.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    actual_grads = torch.autograd.grad(actual, (q, k, v), grad)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


def test_sdpa_fully_masked_row_gives_zero_output_and_gradients():
    q, k, v = _qkv(1, 2, 2, 3, 4, 4, 4)
    q.requires_grad_(True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))
    assert not torch.isnan(q.grad).any()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_sdpa_dropout_with_a_given_mask():
    q, k, v = _qkv(1, 1, 1, 4, 5, 3, 3)
    keep = torch.rand(1, 1, 4, 5) > 0.5
    probs = reference.attention_probs(q, k)
    expected = (probs * keep / 0.5) @ v
    torch.testing.assert_close(reference.scaled_dot_product_attention(q, k, v, dropout_p=0.5, dropout_mask=keep),
                               expected)


def test_dropout_keeps_the_expected_fraction():
    keep = reference.dropout_mask_like(torch.empty(200_000), 0.25, generator=torch.Generator().manual_seed(1))
    fraction = keep.double().mean().item()
    # binomial standard deviation sqrt(p (1 - p) / n) ~ 1e-3: 5 sigma
    assert abs(fraction - 0.75) < 5e-3


def test_dropout_follows_torchs_functional_dropout():
    x = torch.randn(6, 40, dtype=torch.float64)
    keep = torch.rand(6, 40) >= 0.3
    torch.testing.assert_close(reference.dropout(x, 0.3, dropout_mask=keep), x * keep / 0.7)
    for kwargs in (dict(p=0.5, training=False), dict(p=0.0)):
        assert reference.dropout(x, **kwargs) is x and F.dropout(x, **kwargs) is x
    torch.testing.assert_close(reference.dropout(x, 1.0), F.dropout(x, 1.0))
    y = x.clone()
    assert reference.dropout(y, 0.3, inplace=True, dropout_mask=keep) is y
    torch.testing.assert_close(y, x * keep / 0.7)
    torch.manual_seed(3)
    kept = (reference.dropout(torch.ones(100_000), 0.25) != 0).double().mean().item()
    assert abs(kept - 0.75) < 0.01
    with pytest.raises(ValueError, match="between 0 and 1"):
        reference.dropout(x, 1.5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float"])
def test_multi_head_attention_matches_torch(batch_first, masks):
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(12, 3, dtype=torch.float64).eval()
    query, key = torch.randn(5, 2, 12, dtype=torch.float64), torch.randn(7, 2, 12, dtype=torch.float64)
    attn_mask = padding = None
    if masks == "bool":
        attn_mask = torch.rand(5, 7) > 0.7
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[1, -2:] = True
        attn_mask[:, 0] = False
    elif masks == "float":
        attn_mask = torch.randn(2 * 3, 5, 7, dtype=torch.float64)
    expected, expected_weights = mha(query, key, key, key_padding_mask=padding, attn_mask=attn_mask)
    actual, actual_weights = reference.multi_head_attention(
        query, key, key, 3, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias,
        key_padding_mask=padding, attn_mask=attn_mask)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_weights, expected_weights)


def test_positional_encoding_matches_the_notes():
    # The notes: the first word (position 0) gets 0, 1, 0, 1 from the sine/cosine squiggles.
    pe = reference.positional_encoding(torch.zeros(1, 3, 4, dtype=torch.float64))
    torch.testing.assert_close(pe[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    # ... and the second word sin(1), cos(1) on the widest-frequency squiggles.
    torch.testing.assert_close(pe[0, 1, :2], torch.tensor([math.sin(1.0), math.cos(1.0)], dtype=torch.float64))
    torch.testing.assert_close(pe[0, 1, 2:], torch.tensor([math.sin(0.01), math.cos(0.01)], dtype=torch.float64))


def test_positional_encoding_layouts_offsets_and_odd_dims():
    x = torch.randn(3, 6, 5, dtype=torch.float64)  # odd D
    pe = reference.sinusoid_table(torch.arange(20), 5)
    torch.testing.assert_close(reference.positional_encoding(x, scale=2.0), 2.0 * x + pe[:6])
    torch.testing.assert_close(reference.positional_encoding(x, 4), x + pe[4:10])
    offsets = torch.tensor([0, 2, 7])
    per_seq = reference.positional_encoding(x, offsets)
    for n in range(3):
        torch.testing.assert_close(per_seq[n], x[n] + pe[offsets[n]:offsets[n] + 6])
    seq_first = reference.positional_encoding(x.transpose(0, 1), offsets, batch_first=False)
    torch.testing.assert_close(seq_first.transpose(0, 1), per_seq)
    torch.testing.assert_close(reference.positional_encoding(x[0]), x[0] + pe[:6])


def test_add_layer_norm_matches_torch():
    x, residual = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    weight, bias = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    normed, summed = reference.add_layer_norm(x, residual, weight, bias, eps=1e-6)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, F.layer_norm(x + residual, (10,), weight, bias, eps=1e-6))
    keep = torch.rand(4, 10) > 0.1
    _, dropped = reference.add_layer_norm(x, residual, None, None, dropout_p=0.1, dropout_mask=keep)
    torch.testing.assert_close(dropped, residual + x * keep / 0.9)
    _, evaluated = reference.add_layer_norm(x, residual, None, None, dropout_p=0.1, training=False)
    torch.testing.assert_close(evaluated, residual + x)


def test_reference_transformer_is_plain_torch():
    """fasttf.reference.Transformer runs torch's own attention modules, no fasttf op."""
    torch.manual_seed(5)
    model = reference.Transformer(11, 13, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                  dim_feedforward=16, dropout=0.0).double().eval()
    assert model.backend == "torch"
    attentions = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attentions and all(type(m) is torch.nn.MultiheadAttention for m in attentions)
    src = torch.randint(1, 11, (2, 5))
    tgt = torch.randint(1, 13, (2, 4))
    logits, _ = model(src, tgt)
    assert logits.shape == (2, 4, 13) and torch.isfinite(logits).all()
