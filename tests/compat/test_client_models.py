"""Client models as their authors wrote them, every attention swapped by
fasttf.replace_multihead_attention: torch's nn.Transformer (encoder and decoder, padding masks on
source, target and memory, a causal target mask) and torchvision's VisionTransformer. The swapped
model against the unswapped one, by the accuracy rule (fasttf.testing): float32 outputs and the
gradient of every parameter against the same model in float64, with the unswapped float32 model's
error as the bound, in training and in eval mode, and in eval under no_grad (where torch's encoder
layer takes its own fused fast path unless the swap stops it). A spy counts the fasttf kernel calls.

torchvision is installed only in `make compat`'s virtualenv (torch 2.14, torchvision 0.29): in
`make test`'s, which has no torchvision, the VisionTransformer test is skipped, the nn.Transformer
tests run."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fasttf
from fasttf.testing import assert_close_to_reference
from conftest import kernel_device

DEVICE = kernel_device()


@pytest.fixture
def kernel_calls(monkeypatch):
    """The query shapes of every call of fasttf's attention kernel (which still runs): of
    scaled_dot_product_attention, and of fasttf.MultiheadAttention's one-op inference call
    (native_multi_head_attention: the module's query, before the projection)."""
    calls = []
    for name in ("scaled_dot_product_attention", "native_multi_head_attention"):
        kernel = getattr(fasttf.ops.attention, name)

        def spy(*args, kernel=kernel, **kwargs):
            calls.append(tuple(args[0].shape))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(fasttf.ops.attention, name, spy)
    return calls


def compare_swapped(model, make_inputs, kernel_calls, expected_calls):
    """model: the author's, float32. make_inputs(dtype) -> (args, kwargs) of its forward."""
    model = model.to(DEVICE)
    truth = copy.deepcopy(model).double()
    ours = fasttf.replace_multihead_attention(copy.deepcopy(model))
    assert all(type(m) is fasttf.MultiheadAttention for m in ours.modules() if isinstance(m, nn.MultiheadAttention))
    models = {"ours": ours, "truth": truth, "torch": model}
    for mode, grad in (("train", True), ("eval", True), ("eval", False)):
        outputs = {}
        for name, module in models.items():
            module.train(mode == "train")
            args, kwargs = make_inputs(torch.float64 if name == "truth" else torch.float32)
            module.zero_grad(set_to_none=True)
            kernel_calls.clear()
            with torch.set_grad_enabled(grad):
                outputs[name] = module(*args, **kwargs)
            if name == "ours":
                assert len(kernel_calls) == expected_calls, (mode, grad, kernel_calls)
        where = f"{mode}{'' if grad else ', no_grad'}"
        assert_close_to_reference(outputs["ours"], outputs["truth"], outputs["torch"], f"output ({where})")
        if not grad:
            continue
        weights = torch.randn(outputs["ours"].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        for name, output in outputs.items():
            (output * weights.to(output.dtype)).sum().backward()
        parameters = [dict(models[name].named_parameters()) for name in ("ours", "truth", "torch")]
        assert parameters[0].keys() == parameters[1].keys() == parameters[2].keys()
        for key in parameters[0]:
            mine, true, theirs = (p[key].grad for p in parameters)
            assert_close_to_reference(mine, true, theirs, f"grad of {key} ({where})")


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_with_padding_and_causal_masks(batch_first, kernel_calls):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but self.use_nested_tensor is False ..."
        model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                               dropout=0.0, batch_first=batch_first)
    n, s, t = 3, 7, 5
    src, tgt = torch.randn(n, s, 32), torch.randn(n, t, 32)
    src_padding = torch.tensor([[False] * s, [False] * (s - 3) + [True] * 3, [False] * (s - 1) + [True]])
    tgt_padding = torch.tensor([[False] * t, [False] * (t - 2) + [True] * 2, [False] * t])

    def make_inputs(dtype):
        to = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
        masks = dict(src_key_padding_mask=src_padding, tgt_key_padding_mask=tgt_padding,
                     memory_key_padding_mask=src_padding,
                     tgt_mask=nn.Transformer.generate_square_subsequent_mask(t, dtype=dtype), tgt_is_causal=True)
        return (to(src).to(DEVICE, dtype), to(tgt).to(DEVICE, dtype)), {k: v.to(DEVICE) if torch.is_tensor(v) else v
                                                                     for k, v in masks.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "mismatched key_padding_mask and attn_mask is deprecated"
        compare_swapped(model, make_inputs, kernel_calls, expected_calls=2 + 2 * 2)


def test_torchvision_vision_transformer(kernel_calls):
    models = pytest.importorskip("torchvision.models", reason="torchvision is installed in make compat's venv")
    torch.manual_seed(0)
    model = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                     mlp_dim=128, num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    compare_swapped(model, lambda dtype: ((images.to(DEVICE, dtype),), {}), kernel_calls, expected_calls=2)
