"""fasttf.scaled_dot_product_attention's eager entry in C++ (csrc/sdpa_fast_path.cpp): the CPU calls
it recognises checked and run without the Python path, every other call left to it.

Each call below runs twice, through the entry and with the entry switched off (the Python path
alone), and must give the same bits -- output and gradients -- or the same error, type and message;
calls with dropout from the same torch.manual_seed (both draw the seed from torch's generator).
"""

import math
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fasttf
from fasttf import _extension
from fasttf.ops import attention as attention_op
from fasttf.ops import attention_cpu

from test_attention import make_inputs

pytestmark = pytest.mark.skipif(not _extension.is_available(), reason="needs the C++ extension")


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.delenv("FASTTF_CPU_ATTENTION", raising=False)


class OpCalls(TorchDispatchMode):
    """Records the ops that reach the dispatcher's Python key, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def run(call, monkeypatch, fast, seed=7):
    """call() with the C++ entry on or off, from `seed`: (outputs, None) or (None, (error type, message))."""
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(attention_op, "_native_sdpa_or_none", None)
        torch.manual_seed(seed)
        try:
            return call(), None
        except Exception as error:  # noqa: BLE001  (compared between the two paths)
            return None, (type(error), str(error))


def inputs(dtype=torch.float32, rank=4, heads_kv=2, requires_grad=False):
    query, key, value = make_inputs(2 if rank == 4 else None, 4, 5, 7, 8, 6, heads_kv=heads_kv, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (query, key, value)]


MASKS = {
    "none": lambda q: None,
    "bool (L, S)": lambda q: torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.3,
    "float (N, 1, L, S)": lambda q: torch.randn(2, 1, 5, 7, dtype=q.dtype),
    "float (S,)": lambda q: torch.randn(7, dtype=q.dtype),
    "bool, a row all False": lambda q: torch.ones(5, 7, dtype=torch.bool).index_fill_(0, torch.tensor([2]), False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [4, 3])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_the_entry_gives_the_python_paths_bits(monkeypatch, dtype, rank, mask_kind, is_causal):
    seed = zlib.crc32(repr((dtype, rank, mask_kind, is_causal)).encode())  # a seed a case: every bit matters
    for scale, dropout_p in ((None, 0.0), (0.3, 0), (None, 0.4), (0.5, 1.0)):
        query, key, value = inputs(dtype, rank, requires_grad=True)
        mask = MASKS[mask_kind](query)
        if mask is not None and rank == 3 and mask.dim() == 4:
            mask = mask[0]
        if mask is not None and mask.is_floating_point():
            mask.requires_grad_()
        leaves = [t for t in (query, key, value, mask) if t is not None and t.requires_grad]
        with torch.no_grad():  # the entry takes it
            assert _extension._C.native_sdpa_or_none(query, key, value, mask, dropout_p, is_causal, scale,
                                                     True) is not None
            if dropout_p > 0:  # and draws one seed from the generator, as draw_dropout_seed
                torch.manual_seed(7)
                _extension._C.native_sdpa_or_none(query, key, value, mask, dropout_p, is_causal, scale, True)
                after_the_call = torch.randint(0, 2**62, (1,))
                torch.manual_seed(7)
                attention_op.draw_dropout_seed(query.device)
                assert torch.equal(after_the_call, torch.randint(0, 2**62, (1,)))
        grad_out = torch.randn(*query.shape[:-1], value.size(-1), dtype=dtype)

        def call():
            out = fasttf.scaled_dot_product_attention(query, key, value, mask, dropout_p, is_causal, scale,
                                                      enable_gqa=True)
            return (out, out.stride(), *torch.autograd.grad(out, leaves, grad_out))

        mine, error = run(call, monkeypatch, fast=True, seed=seed)
        theirs, their_error = run(call, monkeypatch, fast=False, seed=seed)
        assert error is None and their_error is None, (error, their_error)
        assert mine[1] == theirs[1]
        for a, b in zip(mine[:1] + mine[2:], theirs[:1] + theirs[2:], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_entry_takes_the_common_call_and_hands_the_kernel_the_callers_mask(monkeypatch):
    python_path = []
    forward = attention_cpu.attention_forward
    monkeypatch.setattr(attention_cpu, "attention_forward", lambda *args: python_path.append(args) or forward(*args))
    query, key, value = inputs()
    mask = torch.randn(7)
    with OpCalls() as recorded:
        out = fasttf.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    assert python_path == []
    kernels = [args for func, args in recorded.calls if func is torch.ops.fasttf.native_attention_forward.default]
    assert len(kernels) == 1 and kernels[0][3] is mask and kernels[0][6] == 1.0 / math.sqrt(8)
    assert out.shape == (2, 4, 5, 6)
    # the calls the entry leaves to Python: there a bad one raises, naming the argument, and another
    # (dropout_p a tensor) runs the same kernel
    with pytest.raises(RuntimeError, match="attn_mask of dtype bool or query's dtype"):
        fasttf.scaled_dot_product_attention(query, key, value, attn_mask=mask.double(), enable_gqa=True)
    fasttf.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=torch.tensor(0.2), enable_gqa=True)
    assert len(python_path) == 1 and python_path[0][3] is mask and python_path[0][4] == pytest.approx(0.2)


def case(**changes):
    """The arguments of a call, the common one with `changes` made."""
    query, key, value = inputs()
    arguments = dict(query=query, key=key, value=value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=True)
    arguments.update({name: change(arguments) if callable(change) else change for name, change in changes.items()})
    return arguments


LEFT_TO_PYTHON = {  # each must come back None from the entry: the Python path decides
    "dropout_p a tensor": dict(dropout_p=torch.tensor(0.0)),
    "dropout_p an int 1": dict(dropout_p=1),
    "dropout_p out of range": dict(dropout_p=-0.5),
    "dropout_p past 1": dict(dropout_p=1.5),
    "dropout_p NaN": dict(dropout_p=float("nan")),
    "is_causal an int": dict(is_causal=1),
    "enable_gqa an int": dict(enable_gqa=1),
    "scale an int": dict(scale=1),
    "scale a tensor": dict(scale=torch.tensor(0.5)),
    "query not a tensor": dict(query=lambda a: a["query"].tolist()),
    "mask not a tensor": dict(attn_mask=[[True]]),
    "integer inputs": dict(query=lambda a: a["query"].int(), key=lambda a: a["key"].int(),
                           value=lambda a: a["value"].int()),
    "dtypes differ": dict(key=lambda a: a["key"].double()),
    "meta tensors": dict(query=lambda a: a["query"].to("meta"), key=lambda a: a["key"].to("meta"),
                         value=lambda a: a["value"].to("meta")),
    "key on meta": dict(key=lambda a: a["key"].to("meta")),
    "2-D": dict(query=lambda a: a["query"][0, 0], key=lambda a: a["key"][0, 0], value=lambda a: a["value"][0, 0]),
    "ranks differ": dict(key=lambda a: a["key"][0]),
    "batch sizes differ": dict(key=lambda a: a["key"][:1], value=lambda a: a["value"][:1]),
    "value heads differ": dict(value=lambda a: a["value"][:, :1]),
    "heads differ without enable_gqa": dict(enable_gqa=False),
    "heads not a multiple": dict(query=lambda a: a["query"][:, :3]),
    "no key heads": dict(key=lambda a: a["key"][:, :0], value=lambda a: a["value"][:, :0]),
    "head dims differ": dict(key=lambda a: a["key"][..., :4]),
    "lengths differ": dict(value=lambda a: a["value"][:, :, :6]),
    "mask of another float dtype": dict(attn_mask=torch.zeros(5, 7, dtype=torch.float64)),
    "mask of an int dtype": dict(attn_mask=torch.zeros(5, 7, dtype=torch.int64)),
    "mask that does not broadcast": dict(attn_mask=torch.zeros(5, 6)),
    "mask of too many dims": dict(attn_mask=torch.zeros(1, 2, 4, 5, 7)),
    "mask on meta": dict(attn_mask=torch.zeros(5, 7, device="meta")),
}


@pytest.mark.parametrize("name", list(LEFT_TO_PYTHON))
def test_the_entry_leaves_every_other_call_to_the_python_path(monkeypatch, name):
    arguments = case(**LEFT_TO_PYTHON[name])
    assert _extension._C.native_sdpa_or_none(**arguments) is None
    mine, error = run(lambda: fasttf.scaled_dot_product_attention(**arguments), monkeypatch, fast=True)
    theirs, their_error = run(lambda: fasttf.scaled_dot_product_attention(**arguments), monkeypatch, fast=False)
    assert error == their_error
    if error is None:
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("value", ["triton", "NATIVE", " native", ""])
def test_the_entry_leaves_any_switch_but_native_to_the_python_path(monkeypatch, value):
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", value)
    assert _extension._C.native_sdpa_or_none(**case()) is None
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "native")
    assert _extension._C.native_sdpa_or_none(**case()) is not None
