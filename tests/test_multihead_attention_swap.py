"""MultiheadAttention.from_torch and replace_multihead_attention: the swap keeps weights, modes and
numbers, and the fused kernel really runs afterwards -- in eval mode too, where torch's encoder
layer would otherwise call its own fused fast path and bypass the attention's forward."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fasttf
from conftest import kernel_device

DEVICE = kernel_device()


@pytest.fixture
def no_torch_fast_path(monkeypatch):
    """torch's fused encoder-layer and nested-tensor paths must not run."""
    import torch._dynamo  # noqa: F401  first, unpatched: its trace rules index torch's functions once, on import

    def refuse(*args, **kwargs):
        raise AssertionError("torch's fused fast path ran instead of fasttf")

    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask"):
        monkeypatch.setattr(torch, name, refuse)


@pytest.mark.parametrize("options", [dict(), dict(kdim=3, vdim=5, bias=False, batch_first=True),
                                     dict(add_bias_kv=True, add_zero_attn=True, dropout=0.1)])
@pytest.mark.parametrize("training", [False, True])
def test_from_torch_copies_configuration_weights_and_mode(options, training, monkeypatch):
    monkeypatch.delenv("FASTTF_STRICT")  # float64, to compare exactly: the kernels have no float64, this falls back
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, dtype=torch.float64, **options).train(training)
    theirs.out_proj.weight.requires_grad_(False)
    ours = fasttf.MultiheadAttention.from_torch(theirs)
    assert type(ours) is fasttf.MultiheadAttention and ours.training == training
    for name in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "add_zero_attn",
                 "_qkv_same_embed_dim"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for (name, mine), their in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(mine, their) and mine.dtype == torch.float64 and mine.device == their.device, name
        assert mine.data_ptr() != their.data_ptr(), name  # a copy
        assert mine.requires_grad == their.requires_grad, name
    ours.eval(), theirs.eval()
    kdim, vdim = options.get("kdim", 8), options.get("vdim", 8)
    shape = (lambda length, dim: (2, length, dim)) if options.get("batch_first") else (lambda length, dim: (length, 2, dim))
    query = torch.randn(shape(3, 8), dtype=torch.float64)
    key, value = torch.randn(shape(4, kdim), dtype=torch.float64), torch.randn(shape(4, vdim), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float64 fallback's warning
        for output, expected in zip(ours(query, key, value), theirs(query, key, value)):
            torch.testing.assert_close(output, expected)


def test_from_torch_refuses_other_modules():
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        fasttf.MultiheadAttention.from_torch(nn.Linear(4, 4))


def _small_transformer(batch_first):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." for batch_first=False
        return nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16,
                              dropout=0.0, batch_first=batch_first)


@pytest.mark.parametrize("batch_first", [False, True])
def test_replace_in_a_transformer_keeps_weights_and_numbers(batch_first, kernel_calls, no_torch_fast_path):
    theirs = _small_transformer(batch_first)
    model = copy.deepcopy(theirs)
    parameters = dict(model.named_parameters())
    assert fasttf.replace_multihead_attention(model) is model
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 4 and all(type(m) is fasttf.MultiheadAttention for m in attentions)
    for name, param in model.named_parameters():  # the very same tensors: optimizers keep working
        assert param is parameters[name], name
    assert model.state_dict().keys() == theirs.state_dict().keys()

    n, s, t = 2, 5, 4
    src = torch.randn((n, s, 8) if batch_first else (s, n, 8))
    tgt = torch.randn((n, t, 8) if batch_first else (t, n, 8))
    masks = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(t), tgt_is_causal=True,
                 src_key_padding_mask=torch.tensor([[False] * s, [False] * (s - 2) + [True] * 2]))
    masks["memory_key_padding_mask"] = masks["src_key_padding_mask"]
    for training in (True, False):
        model.train(training), theirs.train(training)
        expected = theirs(src, tgt, **masks)
        kernel_calls.clear()
        output = model(src, tgt, **masks)
        assert len(kernel_calls) == 2 + 2  # encoder self-attention x2, decoder self- and cross-attention
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
        if training:
            expected_grads = torch.autograd.grad(expected.sum(), list(theirs.parameters()))
            grads = torch.autograd.grad(output.sum(), list(model.parameters()))
            for grad, expected_grad in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.explicit_device
@pytest.mark.parametrize("padding", [False, True])
def test_swapped_encoder_layer_runs_fasttf_in_eval(padding, kernel_calls, no_torch_fast_path):
    """torch's TransformerEncoderLayer takes torch._transformer_encoder_layer_fwd here (eval,
    batch_first, even heads, no grad), bypassing self_attn.forward: after the swap, fasttf's
    forward and kernel run instead."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).to(DEVICE).eval()
    layer = fasttf.replace_multihead_attention(copy.deepcopy(theirs))
    assert type(layer.self_attn) is fasttf.MultiheadAttention
    src = torch.randn(2, 5, 8).to(DEVICE)
    key_padding_mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]).to(DEVICE) if padding else None
    with torch.no_grad():
        with pytest.raises(AssertionError, match="fast path ran"):  # torch's layer would take it
            theirs(src, src_key_padding_mask=key_padding_mask)
        output = layer(src, src_key_padding_mask=key_padding_mask)
        expected = theirs.train()(src, src_key_padding_mask=key_padding_mask)  # dropout 0: same numbers
    assert [(call["heads"], call["length_q"]) for call in kernel_calls] == [(2, 5)]
    # the attention module's inference call in one op (fasttf::native_multi_head_attention), the
    # layer's padding mask (made float by the layer, as torch's does) included
    assert kernel_calls[0].get("one_op", False)
    assert (kernel_calls[0]["key_padding_mask"] is not None) == padding
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.explicit_device
def test_swapped_encoder_skips_the_nested_tensor_path(kernel_calls, no_torch_fast_path):
    """nn.TransformerEncoder in eval with a padding mask turns its input into a NestedTensor and
    its layers take torch's fused path; the swap turns both off and fasttf's kernel runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).to(DEVICE).eval()
    assert theirs.use_nested_tensor
    encoder = fasttf.replace_multihead_attention(copy.deepcopy(theirs))
    assert not encoder.use_nested_tensor
    src = torch.randn(2, 5, 8).to(DEVICE)
    key_padding_mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]).to(DEVICE)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="fast path ran"):  # torch's encoder would nest
            theirs(src, src_key_padding_mask=key_padding_mask)
        output = encoder(src, src_key_padding_mask=key_padding_mask)
        expected = theirs.train()(src, src_key_padding_mask=key_padding_mask)  # dropout 0: same numbers
    assert len(kernel_calls) == 2
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


def test_replace_keeps_shared_modules_shared_and_swaps_a_bare_attention():
    shared = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Sequential(nn.Linear(8, 8))})
    fasttf.replace_multihead_attention(model)
    assert type(model["a"]) is fasttf.MultiheadAttention and model["a"] is model["b"]
    bare = nn.MultiheadAttention(8, 2).eval()
    swapped = fasttf.replace_multihead_attention(bare)
    assert type(swapped) is fasttf.MultiheadAttention and not swapped.training
    assert swapped.in_proj_weight is bare.in_proj_weight and swapped.out_proj is bare.out_proj
