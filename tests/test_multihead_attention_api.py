"""fasttf.MultiheadAttention / multi_head_attention_forward: the API around the kernel, as torch's.

Errors and warnings with torch's types and messages, torch's own no-batch-dim cases, attributes,
state_dict and checkpoints both ways, the functional form's signature and results. The options
themselves, option by option against torch, are in test_multihead_attention.py.
"""

import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttf

# ----------------------------------------------------------------------------------------------
# Errors and warnings: torch's types and messages


def _error_of(call):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Exception as error:  # noqa: BLE001 -- we compare whatever torch raises
        return type(error), str(error)
    return None


E, H, L, S, N = 8, 2, 3, 4, 2
_b, _i = torch.bool, torch.int64
INVALID_FORWARDS = {  # name: (constructor kwargs, query shape, key shape, value shape, forward kwargs)
    "4-D query": ({}, (L, N, E, 1), (S, N, E), (S, N, E), {}),
    "1-D query": ({}, (E,), (S, E), (S, E), {}),
    "batched query, 2-D key": ({}, (L, N, E), (S, E), (S, N, E), {}),
    "unbatched query, 3-D value": ({}, (L, E), (S, E), (S, N, E), {}),
    "3-D key_padding_mask": ({}, (L, N, E), (S, N, E), (S, N, E), {"key_padding_mask": torch.zeros(N, S, 1, dtype=_b)}),
    "unbatched, 2-D key_padding_mask": ({}, (L, E), (S, E), (S, E), {"key_padding_mask": torch.zeros(1, S, dtype=_b)}),
    "4-D attn_mask": ({}, (L, N, E), (S, N, E), (S, N, E), {"attn_mask": torch.zeros(1, 1, L, S, dtype=_b)}),
    "unbatched, 3-D attn_mask of the wrong shape": ({}, (L, E), (S, E), (S, E),
                                                    {"attn_mask": torch.zeros(H + 1, L, S, dtype=_b)}),
    "int key_padding_mask": ({}, (L, N, E), (S, N, E), (S, N, E), {"key_padding_mask": torch.zeros(N, S, dtype=_i)}),
    "int attn_mask": ({}, (L, N, E), (S, N, E), (S, N, E), {"attn_mask": torch.zeros(L, S, dtype=_i)}),
    "is_causal without attn_mask": ({}, (L, N, E), (S, N, E), (S, N, E), {"is_causal": True}),
    "wrong embedding dim": ({}, (L, N, E + 2), (S, N, E + 2), (S, N, E + 2), {}),
    "key and value shapes differ": ({}, (L, N, E), (S, N, E), (S + 1, N, E), {}),
    "separate weights, key and value lengths differ": ({"kdim": 3, "vdim": 5}, (L, N, E), (S, N, 3), (S + 1, N, 5), {}),
    "separate weights, wrong kdim": ({"kdim": 3, "vdim": 5}, (L, N, E), (S, N, 4), (S, N, 5), {}),
    "2-D attn_mask of the wrong shape": ({}, (L, N, E), (S, N, E), (S, N, E), {"attn_mask": torch.zeros(L, S + 1)}),
    "3-D attn_mask of the wrong shape": ({}, (L, N, E), (S, N, E), (S, N, E), {"attn_mask": torch.zeros(N, L, S)}),
    "key_padding_mask of the wrong batch": ({}, (L, N, E), (S, N, E), (S, N, E),
                                            {"key_padding_mask": torch.zeros(N + 1, S, dtype=_b)}),
    "key_padding_mask of the wrong length": ({"add_zero_attn": True}, (L, N, E), (S, N, E), (S, N, E),
                                             {"key_padding_mask": torch.zeros(N, S + 1, dtype=_b)}),
    "batch_first, batched query, 2-D key": ({"batch_first": True}, (N, L, E), (S, E), (S, E), {}),
}
# every batched case again with batch_first=True (inputs (N, L, E)): the same errors, shapes printed as torch does
INVALID_FORWARDS |= {
    "batch_first, " + name: ({**options, "batch_first": True}, *(shape[1::-1] + shape[2:] for shape in shapes), kwargs)
    for name, (options, *shapes, kwargs) in list(INVALID_FORWARDS.items())
    if "batch_first" not in options and all(len(shape) == 3 for shape in shapes)
}


@pytest.mark.parametrize("name", list(INVALID_FORWARDS))
@pytest.mark.parametrize("need_weights", [False, True])
def test_invalid_forward_raises_as_torch(name, need_weights):
    options, query_shape, key_shape, value_shape, kwargs = INVALID_FORWARDS[name]
    theirs = nn.MultiheadAttention(E, H, **options)
    ours = fasttf.MultiheadAttention(E, H, **options)
    inputs = [torch.randn(shape) for shape in (query_shape, key_shape, value_shape)]
    expected = _error_of(lambda: theirs(*inputs, need_weights=need_weights, **kwargs))
    assert expected is not None, "the case must be invalid for torch"
    assert _error_of(lambda: ours(*inputs, need_weights=need_weights, **kwargs)) == expected


@pytest.mark.parametrize("args", [(0, 2), (8, 0), (8, 3), (-4, 2)])
def test_invalid_constructor_raises_as_torch(args):
    assert _error_of(lambda: fasttf.MultiheadAttention(*args)) == _error_of(lambda: nn.MultiheadAttention(*args))


def _functional_args(**changes):
    gen = torch.Generator().manual_seed(3)
    args = dict(query=torch.randn(L, N, E, generator=gen), key=torch.randn(S, N, E, generator=gen),
                value=torch.randn(S, N, E, generator=gen), embed_dim_to_check=E, num_heads=H,
                in_proj_weight=torch.randn(3 * E, E, generator=gen), in_proj_bias=torch.randn(3 * E, generator=gen),
                bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
                out_proj_weight=torch.randn(E, E, generator=gen), out_proj_bias=torch.randn(E, generator=gen),
                training=False)
    args.update(changes)
    return args


INVALID_FUNCTIONAL = {
    "bias_k without bias_v": dict(bias_k=torch.randn(1, 1, E)),
    "bias_v without bias_k": dict(bias_v=torch.randn(1, 1, E)),
    "bias with static_k": dict(bias_k=torch.randn(1, 1, E), bias_v=torch.randn(1, 1, E),
                               static_k=torch.randn(N * H, S, E // H)),
    "bias with static_v": dict(bias_k=torch.randn(1, 1, E), bias_v=torch.randn(1, 1, E),
                               static_v=torch.randn(N * H, S, E // H)),
    "static_k of the wrong batch": dict(static_k=torch.randn(N * H + 1, S, E // H)),
    "static_k of the wrong head dim": dict(static_k=torch.randn(N * H, S, E // H + 1)),
    "static_v of the wrong batch": dict(static_v=torch.randn(N, S, E // H)),
    "static_v of the wrong head dim": dict(static_v=torch.randn(N * H, S, 1)),
    "no in_proj_weight": dict(in_proj_weight=None),
    "separate weights, no q_proj_weight": dict(use_separate_proj_weight=True, k_proj_weight=torch.randn(E, E),
                                               v_proj_weight=torch.randn(E, E)),
    "separate weights, no v_proj_weight": dict(use_separate_proj_weight=True, q_proj_weight=torch.randn(E, E),
                                               k_proj_weight=torch.randn(E, E)),
    "separate weights, wrong q_proj_weight": dict(use_separate_proj_weight=True, q_proj_weight=torch.randn(E, E + 1),
                                                  k_proj_weight=torch.randn(E, E), v_proj_weight=torch.randn(E, E)),
    "embed_dim not divisible": dict(num_heads=3, embed_dim_to_check=E),
    "wrong embed_dim_to_check": dict(embed_dim_to_check=E + 1),
}


@pytest.mark.parametrize("name", list(INVALID_FUNCTIONAL))
def test_invalid_functional_call_raises_as_torch(name):
    args = _functional_args(**INVALID_FUNCTIONAL[name])
    expected = _error_of(lambda: F.multi_head_attention_forward(**args))
    assert expected is not None, "the case must be invalid for torch"
    assert _error_of(lambda: fasttf.multi_head_attention_forward(**args)) == expected


def _warnings_of(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("padding_dtype,attn_dtype", [(torch.bool, torch.float32), (torch.float32, torch.bool),
                                                      (torch.bool, torch.bool)])
def test_mismatched_mask_types_warn_as_torch(padding_dtype, attn_dtype):
    theirs = nn.MultiheadAttention(E, H)
    ours = fasttf.MultiheadAttention(E, H)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(L, N, E)
    masks = dict(key_padding_mask=torch.zeros(N, L, dtype=padding_dtype), attn_mask=torch.zeros(L, L, dtype=attn_dtype))
    expected = _warnings_of(lambda: theirs(x, x, x, need_weights=False, **masks))
    assert _warnings_of(lambda: ours(x, x, x, need_weights=False, **masks)) == expected
    assert bool(expected) == (padding_dtype != attn_dtype)


@pytest.mark.parametrize("entry", ["module", "functional"])
def test_the_mismatched_masks_warning_names_the_callers_line(entry):
    """Not a line inside fasttf, nor torch's Module.__call__: the line that called fasttf."""
    masks = dict(key_padding_mask=torch.zeros(N, S, dtype=torch.bool), attn_mask=torch.zeros(L, S))
    args = _functional_args(need_weights=False, **masks)
    module = fasttf.MultiheadAttention(E, H)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry == "module":
            line = inspect.currentframe().f_lineno + 1
            module(args["query"], args["key"], args["value"], need_weights=False, **masks)
        else:
            line = inspect.currentframe().f_lineno + 1
            fasttf.multi_head_attention_forward(**args)
    assert [str(w.message) for w in caught] == ["Support for mismatched key_padding_mask and attn_mask is "
                                                "deprecated. Use same type for both instead."]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensor_input_is_refused_clearly():
    mha = fasttf.MultiheadAttention(E, H, batch_first=True).eval()
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(2, E)])
    with pytest.raises(AssertionError, match="NestedTensor"):
        mha(nested, nested, nested, need_weights=False)


# ----------------------------------------------------------------------------------------------
# Unbatched inputs: the no-batch-dim cases of torch's own module tests (common_modules.py)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("add_zero_attn", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_no_batch_dim_as_torch_tests_it(batch_first, bias, add_bias_kv, add_zero_attn, padding, masked):
    """embed_dim 3, 3 heads, (3, 3) inputs; key_padding_mask (S,), attn_mask (num_heads, L, S) expanded."""
    key_padding_mask = torch.tensor([False, False, True]) if padding else None
    attn_mask = torch.tensor([False, False, True]).expand((3, 3, 3)) if masked else None
    options = dict(batch_first=batch_first, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    theirs = nn.MultiheadAttention(3, 3, **options)
    ours = fasttf.MultiheadAttention(3, 3, **options)
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 3, generator=gen) for _ in range(3))
    for need_weights in (False, True):
        output, weights = ours(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                               need_weights=need_weights)
        expected, expected_weights = theirs(query, key, value, key_padding_mask=key_padding_mask,
                                            attn_mask=attn_mask, need_weights=need_weights)
        torch.testing.assert_close(output, expected)
        assert output.shape == (3, 3)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights)
            assert weights.shape == (3, 3 + add_bias_kv + add_zero_attn)
        # torch's reference for no-batch-dim: the same call with a batch of one
        batch_dim = 0 if batch_first else 1
        batched, _ = ours(*(t.unsqueeze(batch_dim) for t in (query, key, value)),
                          key_padding_mask=None if padding is False else key_padding_mask.unsqueeze(0),
                          attn_mask=attn_mask, need_weights=need_weights)
        torch.testing.assert_close(output, batched.squeeze(batch_dim))


# ----------------------------------------------------------------------------------------------
# Checkpoints, attributes, the functional form


def test_attributes_and_state_dict_are_torchs():
    for options in (dict(), dict(kdim=3, vdim=5, bias=False), dict(add_bias_kv=True, add_zero_attn=True, dropout=0.1)):
        torch.manual_seed(0)
        theirs = nn.MultiheadAttention(E, H, batch_first=True, **options)
        torch.manual_seed(0)
        ours = fasttf.MultiheadAttention(E, H, batch_first=True, **options)
        assert isinstance(ours, nn.MultiheadAttention)
        for name in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first",
                     "_qkv_same_embed_dim", "add_zero_attn"):
            assert getattr(ours, name) == getattr(theirs, name), name
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                     "bias_v"):
            mine, their = getattr(ours, name), getattr(theirs, name)
            assert (mine is None) == (their is None), name
            if mine is not None:
                assert type(mine) is type(their) and torch.equal(mine, their), name  # same initialisation
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for key, tensor in ours.state_dict().items():
            torch.testing.assert_close(tensor, theirs.state_dict()[key], rtol=0, atol=0)


def test_checkpoints_load_both_ways(tmp_path):
    torch.manual_seed(1)
    theirs = nn.MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True)
    ours = fasttf.MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True)
    torch.save(theirs.state_dict(), tmp_path / "torch.pt")
    ours.load_state_dict(torch.load(tmp_path / "torch.pt"))
    query, key, value = torch.randn(L, N, E), torch.randn(S, N, 3), torch.randn(S, N, 5)
    torch.testing.assert_close(ours(query, key, value)[0], theirs(query, key, value)[0])

    ours_again = fasttf.MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True)
    with torch.no_grad():
        for param in ours_again.parameters():
            param.normal_()
    back = nn.MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True)
    torch.save(ours_again.state_dict(), tmp_path / "fasttf.pt")
    back.load_state_dict(torch.load(tmp_path / "fasttf.pt"))
    torch.testing.assert_close(back(query, key, value)[0], ours_again(query, key, value)[0])

    buffer = io.BytesIO()  # the whole module pickles and keeps working (its pre-hook included)
    torch.save(ours_again, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is fasttf.MultiheadAttention and len(loaded._forward_pre_hooks) == 1
    torch.testing.assert_close(loaded(query, key, value)[0], ours_again(query, key, value)[0])


def test_functional_signature_is_torchs():
    assert inspect.signature(fasttf.multi_head_attention_forward) == inspect.signature(F.multi_head_attention_forward)
    ours = inspect.signature(fasttf.MultiheadAttention.forward)
    theirs = inspect.signature(nn.MultiheadAttention.forward)
    assert ours == theirs
    assert inspect.signature(fasttf.MultiheadAttention.__init__) == inspect.signature(nn.MultiheadAttention.__init__)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("variant", ["static_kv", "separate_weights", "bias_kv_zero_attn", "unbatched_causal"])
def test_functional_matches_torch(variant, need_weights):
    gen = torch.Generator().manual_seed(5)
    changes = {"training": True}
    if variant == "static_kv":
        changes.update(static_k=torch.randn(N * H, S, E // H, generator=gen),
                       static_v=torch.randn(N * H, S, E // H, generator=gen), add_zero_attn=True,
                       key_padding_mask=torch.rand(N, S, generator=gen) < 0.3,
                       attn_mask=torch.randn(L, S, generator=gen))
    elif variant == "separate_weights":
        changes.update(use_separate_proj_weight=True, in_proj_weight=None, key=torch.randn(S, N, 3, generator=gen),
                       value=torch.randn(S, N, 5, generator=gen), q_proj_weight=torch.randn(E, E, generator=gen),
                       k_proj_weight=torch.randn(E, 3, generator=gen), v_proj_weight=torch.randn(E, 5, generator=gen),
                       attn_mask=torch.rand(N * H, L, S, generator=gen) < 0.3, average_attn_weights=False)
    elif variant == "bias_kv_zero_attn":
        changes.update(bias_k=torch.randn(1, 1, E, generator=gen), bias_v=torch.randn(1, 1, E, generator=gen),
                       add_zero_attn=True, key_padding_mask=torch.randn(N, S, generator=gen),
                       attn_mask=torch.randn(N * H, L, S, generator=gen))
    else:
        x = torch.randn(L, E, generator=gen)
        changes.update(query=x, key=x, value=x, attn_mask=nn.Transformer.generate_square_subsequent_mask(L),
                       is_causal=True, key_padding_mask=torch.zeros(L))
    args = _functional_args(**changes, need_weights=need_weights)
    expected = F.multi_head_attention_forward(**args)
    actual = fasttf.multi_head_attention_forward(**args)
    torch.testing.assert_close(actual[0], expected[0])
    assert (actual[1] is None) == (expected[1] is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(actual[1], expected[1])
