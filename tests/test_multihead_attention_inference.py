"""fasttf.MultiheadAttention's inference call in one C++ op (fasttf::native_multi_head_attention):
taken where nothing records a gradient, for plain calls on the CPU kernel with or without the
weights, with the very bits of the module's Python path (fasttf.multi_head_attention_forward), and
left alone by every other call."""

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import fasttf
from fasttf.multihead_attention import _multi_head_attention_forward
from fasttf.ops import attention as attention_op
from conftest import INTERPRET


@pytest.fixture
def one_op_calls(monkeypatch):
    """The module's calls of the one-op path (the op still runs)."""
    calls = []
    one_op = attention_op.native_multi_head_attention

    def spy(*args):
        calls.append(args)
        return one_op(*args)

    monkeypatch.setattr(attention_op, "native_multi_head_attention", spy)
    return calls


def python_path(module, query, key, value, need_weights=False, average_attn_weights=True, key_padding_mask=None):
    """The module's own Python path for the same call (what forward runs when the one op is not
    taken): (out, weights or None)."""
    return _multi_head_attention_forward(
        query, key, value, module.embed_dim, module.num_heads, module.in_proj_weight, module.in_proj_bias,
        module.bias_k, module.bias_v, module.add_zero_attn, module.dropout, module.out_proj.weight,
        module.out_proj.bias, module.training, key_padding_mask, need_weights, None, not module._qkv_same_embed_dim,
        module.q_proj_weight, module.k_proj_weight, module.v_proj_weight, None, None, average_attn_weights, False,
        batch_first=module.batch_first, stacklevel=2)


def inputs(kind, batch_first, dtype, embed_dim=16):
    batch, length, source = 3, 5, 7
    def sequence(n):
        return torch.randn((batch, n, embed_dim) if batch_first else (n, batch, embed_dim), dtype=dtype)
    x = sequence(length)
    if kind == "self":
        return x, x, x
    if kind == "cross":  # encoder-decoder attention: key is value
        memory = sequence(source)
        return x, memory, memory
    return x, sequence(source), sequence(source)  # three tensors


WEIGHTS = {"no weights": dict(need_weights=False), "weights": dict(need_weights=True),
           "per-head weights": dict(need_weights=True, average_attn_weights=False)}
PADDING = ("none", "bool", "float")


def padding_mask(kind, batch, source, dtype):
    """A key padding mask in torch's convention: the last keys of some sequences padded (never all)."""
    if kind == "none":
        return None
    padded = torch.arange(source) >= torch.tensor([source, source - 2, 1])[:batch, None]
    if kind == "bool":
        return padded
    return torch.zeros(batch, source, dtype=dtype).masked_fill(padded, float("-inf")) + 0.1 * torch.randn(
        batch, source).to(dtype)


@pytest.mark.parametrize("kind", ["self", "cross", "three"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("weights_asked", WEIGHTS, ids=list(WEIGHTS))
@pytest.mark.parametrize("padding", PADDING)
def test_one_op_gives_the_python_paths_bits(one_op_calls, kind, batch_first, dtype, grad_mode, weights_asked, padding):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=dtype).eval()
    ours = fasttf.MultiheadAttention.from_torch(theirs)
    query, key, value = inputs(kind, batch_first, dtype)
    options = dict(WEIGHTS[weights_asked], key_padding_mask=padding_mask(padding, 3, 5 if kind == "self" else 7,
                                                                         dtype))
    with grad_mode():
        got, weights = ours(query, key, value, **options)
        expected, expected_weights = python_path(ours, query, key, value, **options)
        baseline, baseline_weights = theirs(query, key, value, **options)
    assert len(one_op_calls) == 1
    assert got.shape == expected.shape == baseline.shape and got.dtype == dtype
    assert torch.equal(got, expected)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got, baseline, rtol=tolerance, atol=tolerance)
    if not options["need_weights"]:
        assert weights is None and expected_weights is None
        return
    batch, length, source = 3, 5, (5 if kind == "self" else 7)
    assert weights.shape == baseline_weights.shape == ((batch, length, source) if options.get("average_attn_weights",
                                                       True) else (batch, 4, length, source))
    assert weights.dtype == dtype and torch.equal(weights, expected_weights)
    torch.testing.assert_close(weights, baseline_weights, rtol=tolerance, atol=tolerance)
    assert torch.allclose(weights.double().sum(-1), torch.ones((), dtype=torch.float64), atol=tolerance * 4)


def test_training_without_dropout_under_no_grad_takes_it(one_op_calls):
    ours = fasttf.MultiheadAttention(8, 2, dropout=0.0).train()
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        got, weights = ours(x, x, x)
        expected, expected_weights = python_path(ours, x, x, x, need_weights=True)
    assert torch.equal(got, expected) and torch.equal(weights, expected_weights)
    assert len(one_op_calls) == 1


@pytest.mark.parametrize("padding", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_a_fully_padded_sequence_gives_the_python_paths_zeros(one_op_calls, padding, need_weights):
    """Every key of a sequence padded: attention 0 before the out-projection (its bias after it) and
    weights 0, as on the Python path (torch's weights path gives NaN there)."""
    ours = fasttf.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    padded = torch.tensor([[False, True, False], [True, True, True]])
    mask = padded if padding == "bool" else torch.zeros(2, 3).masked_fill(padded, float("-inf"))
    with torch.no_grad():
        got, weights = ours(x, x, x, key_padding_mask=mask, need_weights=need_weights)
        expected, expected_weights = python_path(ours, x, x, x, need_weights, key_padding_mask=mask)
    assert len(one_op_calls) == 1 and torch.equal(got, expected)
    assert torch.equal(got[1], ours.out_proj.bias.detach().expand(3, 8))
    if need_weights:
        assert torch.equal(weights, expected_weights) and torch.all(weights[1] == 0)


def test_a_frozen_module_takes_it_in_grad_mode(one_op_calls):
    """With grad mode on but nothing requiring a gradient, nothing is recorded either way: one op."""
    ours = fasttf.MultiheadAttention(8, 2, batch_first=True).eval().requires_grad_(False)
    x = torch.randn(2, 3, 8)
    got, weights = ours(x, x, x)
    with torch.no_grad():
        expected, expected_weights = python_path(ours, x, x, x, need_weights=True)
    assert torch.equal(got, expected) and torch.equal(weights, expected_weights)
    assert len(one_op_calls) == 1 and got.grad_fn is None
    ours.in_proj_weight.requires_grad_(True)  # now something is recorded: the Python path
    assert ours(x, x, x)[0].grad_fn is not None and len(one_op_calls) == 1


@pytest.mark.parametrize("need_weights", [False, True])
def test_a_forward_mode_tangent_raises_instead_of_being_dropped(one_op_calls, need_weights):
    """The op has no autograd: a dual input (forward-mode AD runs under no_grad too) takes the
    Python path, whose kernels raise for it, never an output without its tangent."""
    ours = fasttf.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises((RuntimeError, NotImplementedError), match="jvp"):
            ours(dual, dual, dual, need_weights=need_weights)
    assert one_op_calls == []


CALLS_IT_LEAVES = {
    "grad enabled": dict(),
    "attn_mask": dict(attn_mask=torch.zeros(5, 5)),
    "key_padding_mask and attn_mask": dict(attn_mask=torch.zeros(5, 5), key_padding_mask=torch.zeros(3, 5)),
    "is_causal": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=True),
    "dropout in training": dict(module=dict(dropout=0.1), train=True),
    "add_bias_kv": dict(module=dict(add_bias_kv=True)),
    "add_zero_attn": dict(module=dict(add_zero_attn=True)),
    "kdim / vdim": dict(module=dict(kdim=6, vdim=6)),
    "unbatched": dict(unbatched=True),
    "triton kernel": dict(env="triton"),
}


@pytest.mark.parametrize("mask, error, match", [
    (torch.zeros(3, 5, dtype=torch.float64), RuntimeError, "expected attn_mask of dtype bool or query's dtype"),
    (torch.zeros(5, 3, dtype=torch.bool), AssertionError, r"Expected key_padded_mask.shape\[0\] to be 3, but got 5"),
    (torch.zeros(3, dtype=torch.bool), AssertionError, "For batched"),
], ids=["float64", "transposed", "1-D"])
def test_a_key_padding_mask_the_op_does_not_take_raises_on_the_python_path(one_op_calls, mask, error, match):
    module = fasttf.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad(), pytest.raises(error, match=match):
        module(x, x, x, key_padding_mask=mask)
    assert one_op_calls == []


def test_a_learned_padding_mask_in_grad_mode_keeps_the_python_path(one_op_calls):
    module = fasttf.MultiheadAttention(8, 2, batch_first=True).eval().requires_grad_(False)
    x = torch.randn(3, 5, 8)
    mask = torch.zeros(3, 5, requires_grad=True)
    module(x, x, x, key_padding_mask=mask)[0].sum().backward()
    assert one_op_calls == [] and mask.grad is not None


@pytest.mark.parametrize("case", CALLS_IT_LEAVES, ids=list(CALLS_IT_LEAVES))
def test_every_other_call_keeps_the_python_path(one_op_calls, monkeypatch, case):
    options = dict(CALLS_IT_LEAVES[case])
    if options.pop("env", None):
        if not INTERPRET:
            pytest.skip("FASTTF_CPU_ATTENTION=triton needs the Triton interpreter on the CPU")
        monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")
    torch.manual_seed(1)
    module = fasttf.MultiheadAttention(8, 2, batch_first=True, **options.pop("module", {}))
    module.train(options.pop("train", False))
    x = torch.randn(5, 8) if options.pop("unbatched", False) else torch.randn(3, 5, 8)
    kv = torch.randn(3, 5, 6) if module.kdim == 6 else x
    if case == "grad enabled":
        module(x, kv, kv, need_weights=False)
    else:
        with torch.no_grad():
            module(x, kv, kv, **{"need_weights": False, **options})
    assert one_op_calls == []


@pytest.mark.parametrize("kind", ["self", "cross", "three"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("weights_asked", WEIGHTS, ids=list(WEIGHTS))
def test_opcheck(kind, batch_first, weights_asked):
    torch.manual_seed(2)
    module = fasttf.MultiheadAttention(16, 4)
    query, key, value = inputs(kind, batch_first, torch.float32)
    options = WEIGHTS[weights_asked]
    padding = padding_mask("bool", 3, 5 if kind == "self" else 7, torch.float32)
    torch.library.opcheck(torch.ops.fasttf.native_multi_head_attention.default,
                          (query, key, value, module.in_proj_weight.detach(), module.in_proj_bias.detach(),
                           module.out_proj.weight.detach(), None, 4, batch_first, padding, options["need_weights"],
                           options.get("average_attn_weights", True)))


@pytest.mark.parametrize("change, match", [
    (dict(num_heads=3), "expected num_heads to divide the embedding dim 16, got num_heads 3"),
    (dict(in_proj_weight=torch.randn(16, 16)), r"expected in_proj_weight of shape \[48, 16\], got \[16, 16\]"),
    (dict(query=torch.randn(5, 16)), "expected 3-D query, key and value, got 2-D, 3-D, 3-D"),
    (dict(key=torch.randn(4, 7, 16), value=torch.randn(4, 7, 16)), "expected one batch size"),
    (dict(key_padding_mask=torch.zeros(5, 3, dtype=torch.bool)), r"expected key_padding_mask of shape \[3, 5\], "
                                                                  r"got \[5, 3\]"),
    (dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.float64)),
     "expected key_padding_mask of dtype bool or query's dtype Float, got Double"),
])
def test_op_errors_name_the_argument(change, match):
    x = torch.randn(3, 5, 16)
    arguments = dict(query=x, key=x, value=x, in_proj_weight=torch.randn(48, 16), in_proj_bias=None,
                     out_proj_weight=torch.randn(16, 16), out_proj_bias=None, num_heads=4, batch_first=True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fasttf.native_multi_head_attention(**(arguments | change))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_under_no_grad_traces_the_python_path(one_op_calls):
    """Traced, the module takes the Python path (its ops are what torch.compile knows); the eager
    call beside it takes the one op: the two agree."""
    torch.manual_seed(3)
    module = fasttf.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(lambda a: module(a, a, a, need_weights=False)[0], fullgraph=True)
    with torch.no_grad():
        traced = compiled(x)
        assert one_op_calls == []
        eager = module(x, x, x, need_weights=False)[0]
    assert len(one_op_calls) == 1
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
