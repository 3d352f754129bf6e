"""fasttf.MultiheadAttention / multi_head_attention_forward against torch's, option by option.

The same state_dict in both modules, the same inputs: outputs, weights and gradients (inputs and
parameters) must agree. float32 runs strict (FASTTF_STRICT=1: every call, need_weights=True and
learned masks included, must go through the fused kernels) and is judged by the accuracy rule of DESIGN.md against torch in float64;
float64 runs with strict off (the kernel is float32/16/bf16: float64 falls back inside it) and must
match torch in float64 closely. Shapes are tiny: the kernel runs under the Triton interpreter.
"""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttf
from fasttf.testing import assert_close_to_reference
from conftest import kernel_device

# ----------------------------------------------------------------------------------------------
# Random configurations of every option


def random_config(seed):
    rng = random.Random(seed)
    num_heads = rng.choice([1, 2, 4])
    head_dim = rng.choice([2, 4]) if num_heads > 1 else rng.choice([4, 8, 16])
    embed_dim = num_heads * head_dim
    separate = rng.random() < 0.3
    cfg = dict(
        embed_dim=embed_dim, num_heads=num_heads, bias=rng.random() < 0.8,
        add_bias_kv=rng.random() < 0.3, add_zero_attn=rng.random() < 0.3,
        kdim=rng.choice([3, 5]) if separate else None, vdim=rng.choice([3, 6]) if separate else None,
        batch_first=rng.random() < 0.5,
        batched=rng.random() < 0.8, batch=rng.randint(1, 3), length_q=rng.randint(1, 6), length_k=rng.randint(1, 6),
        self_attention=(not separate) and rng.random() < 0.3,
        attn_mask=rng.choice(["none", "bool2d", "float2d", "bool3d", "float3d", "causal"]),
        key_padding_mask=rng.choice(["none", "bool", "float"]),
        need_weights=rng.random() < 0.5, average_attn_weights=rng.random() < 0.5,
        training=rng.random() < 0.5,
        dtype=torch.float64 if rng.random() < 0.25 else torch.float32,
    )
    cfg["learned_masks"] = rng.random() < 0.5  # float masks require grad (a learned bias): their gradients too
    if cfg["self_attention"]:
        cfg["length_k"] = cfg["length_q"]
    cfg["is_causal"] = cfg["attn_mask"] == "causal" and rng.random() < 0.7
    # encoder-decoder attention: key is value (the memory), query another tensor -- the packed
    # in-projection's two-matmul case
    cfg["key_is_value"] = not cfg["self_attention"] and not separate and rng.random() < 0.5
    return cfg


def make_inputs(cfg, seed):
    """query, key, value and the forward kwargs; no row is fully masked (column 0 stays free)."""
    gen = torch.Generator().manual_seed(seed)
    n, length_q, length_k, heads = cfg["batch"], cfg["length_q"], cfg["length_k"], cfg["num_heads"]
    dtype = cfg["dtype"]

    def seq(length, dim):
        if not cfg["batched"]:
            shape = (length, dim)
        else:
            shape = (n, length, dim) if cfg["batch_first"] else (length, n, dim)
        return torch.randn(shape, generator=gen, dtype=dtype)

    query = seq(length_q, cfg["embed_dim"])
    if cfg["self_attention"]:
        key = value = query
    else:
        key = seq(length_k, cfg["kdim"] or cfg["embed_dim"])
        value = key if cfg["key_is_value"] else seq(length_k, cfg["vdim"] or cfg["embed_dim"])

    def bool_mask(shape):
        mask = torch.rand(shape, generator=gen) < 0.35
        mask[..., 0] = False
        return mask

    mask_batch = (n * heads,) if cfg["batched"] else (heads,)
    kind = cfg["attn_mask"]
    attn_mask = {
        "none": lambda: None,
        "bool2d": lambda: bool_mask((length_q, length_k)),
        "float2d": lambda: torch.randn((length_q, length_k), generator=gen, dtype=dtype),
        "bool3d": lambda: bool_mask(mask_batch + (length_q, length_k)),
        "float3d": lambda: torch.randn(mask_batch + (length_q, length_k), generator=gen, dtype=dtype),
        "causal": lambda: ~torch.ones(length_q, length_k, dtype=torch.bool).tril(),
    }[kind]()
    padding_shape = (n, length_k) if cfg["batched"] else (length_k,)
    key_padding_mask = {
        "none": lambda: None,
        "bool": lambda: bool_mask(padding_shape),
        "float": lambda: torch.randn(padding_shape, generator=gen, dtype=dtype),
    }[cfg["key_padding_mask"]]()
    kwargs = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=cfg["need_weights"],
                  average_attn_weights=cfg["average_attn_weights"], is_causal=cfg["is_causal"])
    return (query, key, value), kwargs


def module_pair(cfg, dropout=0.0):
    """A torch module and a fasttf module with the same weights (bias_k/v and biases made nonzero)."""
    options = dict(dropout=dropout, bias=cfg["bias"], add_bias_kv=cfg["add_bias_kv"],
                   add_zero_attn=cfg["add_zero_attn"], kdim=cfg["kdim"], vdim=cfg["vdim"],
                   batch_first=cfg["batch_first"], dtype=cfg["dtype"])
    theirs = nn.MultiheadAttention(cfg["embed_dim"], cfg["num_heads"], **options)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.dim() == 1:
                param.uniform_(-0.5, 0.5)
    ours = fasttf.MultiheadAttention(cfg["embed_dim"], cfg["num_heads"], **options)
    ours.load_state_dict(theirs.state_dict())
    ours.train(cfg["training"])
    theirs.train(cfg["training"])
    return theirs, ours


def cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def run(module, inputs, kwargs, dtype, seed, learned=False):
    """Forward and backward with fixed random cotangents: every result, by name (with learned:
    the gradients of float masks too)."""
    module = module.to(dtype)
    leaves = {}
    tensors = []
    for name, tensor in zip(("query", "key", "value"), inputs):
        if id(tensor) not in leaves:  # self-attention: one leaf, one gradient
            leaves[id(tensor)] = (name, cast(tensor, dtype).detach().requires_grad_(True))
        tensors.append(leaves[id(tensor)][1])
    kwargs = {k: cast(v, dtype) for k, v in kwargs.items()}
    for name in ("attn_mask", "key_padding_mask"):
        if learned and kwargs.get(name) is not None and kwargs[name].is_floating_point():
            kwargs[name] = kwargs[name].detach().requires_grad_(True)
            leaves[name] = (name, kwargs[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatched mask dtypes: deprecated, tested elsewhere
        output, weights = module(*tensors, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = (output * torch.randn(output.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    results = {"output": output}
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
        results["weights"] = weights
    names = [name for name, _ in leaves.values()] + [name for name, _ in module.named_parameters()]
    wrt = [leaf for _, leaf in leaves.values()] + list(module.parameters())
    for name, grad in zip(names, torch.autograd.grad(loss, wrt)):
        results["grad " + name] = grad
    return {name: value.detach() for name, value in results.items()}


def assert_same_results(ours, theirs, reference=None):
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        if reference is None:  # float64: both must agree to float64 precision
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-10, msg=name)
        else:
            assert_close_to_reference(ours[name], reference[name], theirs[name], name=name)


SWEEP = range(120)


@pytest.mark.parametrize("seed", SWEEP)
def test_random_configuration_matches_torch(seed, monkeypatch, kernel_calls):
    cfg = random_config(seed)
    inputs, kwargs = make_inputs(cfg, seed)
    theirs, ours = module_pair(cfg)
    learned = cfg["learned_masks"]
    if cfg["dtype"] == torch.float64:
        monkeypatch.delenv("FASTTF_STRICT")  # the kernel has no float64: it falls back inside
        assert_same_results(run(ours, inputs, kwargs, torch.float64, seed, learned),
                            run(theirs, inputs, kwargs, torch.float64, seed, learned))
    else:
        reference = run(theirs, inputs, kwargs, torch.float64, seed, learned)
        baseline = run(theirs, inputs, kwargs, torch.float32, seed, learned)
        assert_same_results(run(ours, inputs, kwargs, torch.float32, seed, learned), baseline, reference)
    assert len(kernel_calls) == 1  # strict: float32 calls really ran the kernels, with weights or without


def test_sweep_covers_every_option():
    configs = [random_config(seed) for seed in SWEEP]
    for option in ("bias", "add_bias_kv", "add_zero_attn", "batch_first", "batched", "self_attention",
                   "key_is_value", "need_weights", "average_attn_weights", "training", "is_causal", "learned_masks"):
        assert {c[option] for c in configs} == {False, True}, option
    assert {c["attn_mask"] for c in configs} == {"none", "bool2d", "float2d", "bool3d", "float3d", "causal"}
    assert {c["key_padding_mask"] for c in configs} == {"none", "bool", "float"}
    assert {c["dtype"] for c in configs} == {torch.float32, torch.float64}
    assert any(c["kdim"] for c in configs) and any(c["kdim"] is None for c in configs)
    assert any(c["attn_mask"] != "none" and c["key_padding_mask"] != "none" for c in configs)
    learned = [c for c in configs if c["learned_masks"] and c["dtype"] == torch.float32]
    assert {c["attn_mask"] for c in learned} >= {"float2d", "float3d"} and any(
        c["key_padding_mask"] == "float" for c in learned)
    assert any(c["need_weights"] and c["attn_mask"].startswith("float") for c in learned)


# ----------------------------------------------------------------------------------------------
# Fully masked rows: torch's weight path gives NaN, its SDPA path 0; fasttf gives 0 on both


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_give_what_torch_sdpa_gives(need_weights):
    cfg = dict(random_config(0), embed_dim=8, num_heads=2, bias=True, add_bias_kv=False, add_zero_attn=False,
               kdim=None, vdim=None, batch_first=True, training=True, dtype=torch.float32)
    theirs, ours = module_pair(cfg)
    query = torch.randn(2, 3, 8, requires_grad=True)
    key_padding_mask = torch.tensor([[False, True, False, True], [True, True, True, True]])  # batch 1: all keys
    attn_mask = torch.zeros(3, 4, dtype=torch.bool)
    attn_mask[1, [0, 2]] = True  # batch 0, query 1: its last two free keys masked too
    kv = torch.randn(2, 4, 8)
    expected, _ = theirs(query, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)
    _, torch_weights = theirs(query, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                              average_attn_weights=False)
    output, weights = ours(query, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(output[1], ours.out_proj.bias.expand(3, 8))  # attention 0, then the bias
    torch.testing.assert_close(output[0, 1], ours.out_proj.bias)
    if need_weights:
        assert torch.isnan(torch_weights[1]).all() and torch.isnan(torch_weights[0, :, 1]).all()
        torch.testing.assert_close(weights, torch_weights.nan_to_num(0.0))
    (grad,) = torch.autograd.grad(output.sum(), query)
    assert not torch.isnan(grad).any()
    assert (grad[1] == 0).all() and (grad[0, 1] == 0).all()


# ----------------------------------------------------------------------------------------------
# Dropout: training only


def test_dropout_applies_in_training_only():
    cfg = dict(random_config(0), embed_dim=8, num_heads=2, bias=True, add_bias_kv=False, add_zero_attn=False,
               kdim=None, vdim=None, batch_first=False, training=False, dtype=torch.float32)
    theirs, ours = module_pair(cfg, dropout=0.5)
    query, kv = torch.randn(5, 3, 8), torch.randn(7, 3, 8)
    expected, _ = theirs(query, kv, kv, need_weights=False)
    evaluated, weights = ours(query, kv, kv, need_weights=False)
    assert weights is None
    torch.testing.assert_close(evaluated, expected)
    ours.train()
    trained, _ = ours(query, kv, kv, need_weights=False)
    assert trained.shape == expected.shape == (5, 3, 8)
    assert not torch.allclose(trained, evaluated)
    trained_again, _ = ours(query, kv, kv, need_weights=False)
    assert not torch.allclose(trained, trained_again)  # a fresh dropout mask each call
    torch.manual_seed(11)
    replayed, _ = ours(query, kv, kv, need_weights=False)
    torch.manual_seed(11)
    torch.testing.assert_close(ours(query, kv, kv, need_weights=False)[0], replayed)  # torch's generator


def test_dropout_with_weights_are_the_ones_the_output_used():
    """need_weights=True in training: the weights come after dropout (as torch returns them), from
    the keep bits the output used: the output is the out-projection of weights @ values."""
    cfg = dict(random_config(0), embed_dim=8, num_heads=2, bias=True, add_bias_kv=False, add_zero_attn=False,
               kdim=None, vdim=None, batch_first=True, training=True, dtype=torch.float32)
    _, ours = module_pair(cfg, dropout=0.3)
    query, kv = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    output, weights = ours(query, kv, kv, average_attn_weights=False)
    assert weights.shape == (2, 2, 5, 6)
    assert (weights == 0).any()  # dropped
    kept_rows = weights.sum(-1)
    assert (kept_rows > 1.01).any()  # rescaled by 1 / (1 - p): rows no longer sum to 1
    values = F.linear(kv, ours.in_proj_weight[16:], ours.in_proj_bias[16:]).view(2, 6, 2, 4).transpose(1, 2)
    heads = (weights @ values).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(output, ours.out_proj(heads))
    torch.manual_seed(3)
    again = ours(query, kv, kv, average_attn_weights=True)
    torch.manual_seed(3)
    output, weights = ours(query, kv, kv, average_attn_weights=False)
    torch.testing.assert_close(again[0], output)  # torch's generator draws the seed
    torch.testing.assert_close(again[1], weights.mean(dim=1))
    ours.eval()
    _, weights = ours(query, kv, kv)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))


# ----------------------------------------------------------------------------------------------
# Masks reach the kernel as small as they can be


@pytest.mark.parametrize("attn,padding,expected_shape,expected_dtype", [
    ("2d", None, (4, 6), torch.bool),
    (None, "bool", (3, 1, 1, 6), torch.bool),
    ("2d", "bool", (3, 1, 4, 6), torch.bool),
    ("2d", "float", (3, 1, 4, 6), torch.float32),
    ("3d", None, (3, 2, 4, 6), torch.bool),
    ("3d", "bool", (3, 2, 4, 6), torch.bool),
    (None, None, None, None),
])
def test_masks_reach_the_kernel_unexpanded(kernel_calls, attn, padding, expected_shape, expected_dtype):
    mha = fasttf.MultiheadAttention(8, 2, batch_first=True)
    query, kv = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    attn_mask = {None: None, "2d": torch.rand(4, 6) < 0.3, "3d": torch.rand(6, 4, 6) < 0.3}[attn]
    key_padding_mask = {None: None, "bool": torch.rand(3, 6) < 0.3, "float": torch.randn(3, 6)}[padding]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mha(query, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)
    (call,) = kernel_calls
    mask = call.get("attn_mask")
    assert (None if mask is None else tuple(mask.shape)) == expected_shape
    if mask is not None:
        assert mask.dtype == expected_dtype
        if expected_dtype == torch.bool:  # SDPA's convention: True = attend
            masked = torch.zeros(expected_shape, dtype=torch.bool)
            if attn == "2d":
                masked = masked | attn_mask
            if attn == "3d":
                masked = masked | attn_mask.view(3, 2, 4, 6)
            if padding:
                masked = masked | key_padding_mask.view(3, 1, 1, 6)
            assert torch.equal(mask, ~masked)


def test_3d_float_mask_is_viewed_not_copied(kernel_calls):
    mha = fasttf.MultiheadAttention(8, 2)
    query, kv = torch.randn(4, 3, 8), torch.randn(6, 3, 8)
    attn_mask = torch.randn(6, 4, 6)
    mha(query, kv, kv, attn_mask=attn_mask, need_weights=False)
    mask = kernel_calls[0]["attn_mask"]
    assert mask.shape == (3, 2, 4, 6) and mask.data_ptr() == attn_mask.data_ptr()


@pytest.mark.parametrize("batch_first", (False, True))
def test_packed_projections_reach_the_kernel_uncopied(kernel_calls, batch_first):
    """q, k, v of self-attention are views of one in-projection (k, v of one for encoder-decoder
    attention): no copy between the matmul and the kernel, whose gradients still match torch's."""
    theirs = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    ours = fasttf.MultiheadAttention.from_torch(theirs)
    x, memory = (torch.randn(3, 5, 8), torch.randn(3, 4, 8)) if batch_first else (torch.randn(5, 3, 8),
                                                                                   torch.randn(4, 3, 8))
    for query, kv in ((x, x), (x, memory)):
        ours(query, kv, kv, need_weights=False)
        call = kernel_calls[-1]
        q, k, v = call["query"], call["key"], call["value"]
        # one product (S, N, 2 or 3, 8): each token's k and v (and q) 8 floats apart, not copied apart
        assert v.data_ptr() - k.data_ptr() == 8 * 4
        if query is kv:
            assert k.data_ptr() - q.data_ptr() == 8 * 4
        leaves = [t.detach().requires_grad_() for t in {id(query): query, id(kv): kv}.values()]
        query_leaf, kv_leaf = leaves[0], leaves[-1]
        expected = torch.autograd.grad(theirs(query_leaf, kv_leaf, kv_leaf, need_weights=False)[0].sum(),
                                       [*leaves, *theirs.parameters()])
        got = torch.autograd.grad(ours(query_leaf, kv_leaf, kv_leaf, need_weights=False)[0].sum(),
                                  [*leaves, *ours.parameters()])
        for mine, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_is_causal_hint_goes_to_the_kernel_without_a_mask(kernel_calls):
    mha = fasttf.MultiheadAttention(8, 2)
    x = torch.randn(5, 2, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    expected, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    output, _ = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    torch.testing.assert_close(output, expected)
    assert kernel_calls[1]["is_causal"] is True and kernel_calls[1].get("attn_mask") is None


@pytest.mark.parametrize("need_weights", [False, True])
def test_a_learned_mask_runs_the_kernel_and_gets_its_gradient(need_weights, kernel_calls):
    """A learned additive mask (relative position bias), strict: no fallback, torch's gradient."""
    mha = fasttf.MultiheadAttention(8, 2)
    torch_mha = nn.MultiheadAttention(8, 2)
    torch_mha.load_state_dict(mha.state_dict())
    x = torch.randn(5, 2, 8)
    bias = torch.randn(5, 5, requires_grad=True)
    output, weights = mha(x, x, x, attn_mask=bias, need_weights=need_weights)
    expected, expected_weights = torch_mha(x, x, x, attn_mask=bias, need_weights=need_weights)
    assert len(kernel_calls) == 1
    torch.testing.assert_close(output, expected)
    loss, expected_loss = output.sum(), expected.sum()
    if need_weights:
        torch.testing.assert_close(weights, expected_weights)
        loss, expected_loss = loss + (weights ** 2).sum(), expected_loss + (expected_weights ** 2).sum()
    torch.testing.assert_close(torch.autograd.grad(loss, bias)[0], torch.autograd.grad(expected_loss, bias)[0])


def test_float64_is_a_visible_fallback(monkeypatch):
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")  # the Triton kernel has no float64 (the C++ one has)
    mha = fasttf.MultiheadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    with pytest.raises(fasttf.FallbackError):
        mha(x, x, x, need_weights=False)
    with pytest.raises(fasttf.FallbackError):  # the weights come from the kernel too: float64 falls back
        mha(x, x, x, need_weights=True)


# ----------------------------------------------------------------------------------------------
# Half precision and torch.compile


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_kernel(dtype, kernel_calls):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    ours = fasttf.MultiheadAttention.from_torch(theirs).to(dtype)
    baseline = nn.MultiheadAttention(16, 2, batch_first=True, dtype=dtype)
    baseline.load_state_dict(ours.state_dict())
    x, padding = torch.randn(2, 7, 16, dtype=torch.float64), torch.rand(2, 7) < 0.3
    padding[:, 0] = False
    output = ours(*(x.to(dtype),) * 3, key_padding_mask=padding, need_weights=False)[0]
    assert output.dtype == dtype and len(kernel_calls) == 1
    assert_close_to_reference(output, theirs(x, x, x, key_padding_mask=padding, need_weights=False)[0],
                              baseline(*(x.to(dtype),) * 3, key_padding_mask=padding, need_weights=False)[0])


@pytest.mark.explicit_device  # dynamo traces no default-device mode
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_takes_the_module_whole():
    torch.manual_seed(0)
    device = kernel_device()
    mha = fasttf.MultiheadAttention(8, 2, batch_first=True, device=device).eval()
    x = torch.randn(2, 5, 8, device=device)
    mask = nn.Transformer.generate_square_subsequent_mask(5, device=device)
    compiled = torch.compile(lambda a: mha(a, a, a, attn_mask=mask, is_causal=True, need_weights=False)[0],
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), mha(x, x, x, attn_mask=mask, need_weights=False)[0])
